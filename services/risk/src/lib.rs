//! # Layout
//!
//! Identity Protection (SPEC §6). Today: the real-time checks the sign-in flow runs before
//! Conditional Access, and the offline detector that follows the log.
//!
//! - [`detector`]: brute force and password spray, found by folding the log and recorded as
//!   `detection/<id>` streams (exactly once, even when the log is replayed).
//! - [`iplist`]: CIDR list files (anonymisers, known-malicious addresses), reloaded on change.
//! - [`realtime`]: a sign-in's detections and the sign-in risk level they make.
#![forbid(unsafe_code)]

pub mod detector;
pub mod iplist;
pub mod realtime;

pub use realtime::{Detection, RealtimeRisk};
