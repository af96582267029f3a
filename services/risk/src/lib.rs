//! # Layout
//!
//! Identity Protection (SPEC §6): detections, user and sign-in risk, the analyst's reports
//! and actions.
//!
//! - [`realtime`]: the checks the sign-in flow runs before Conditional Access (anonymiser
//!   and malicious IPs), the sign-in risk level they make, and the sign-in's properties.
//! - [`detector`]: the checkpointed subscriber of the log that records every detection as a
//!   `detection/<id>` stream (exactly once, even when events are folded again): the flow's
//!   real-time findings, and what only the log shows (brute force, password spray, atypical
//!   travel, unfamiliar properties, token reuse, leaked passwords at sign-up or change).
//! - [`user_risk`]: the UserRisk aggregate (level, state, history).
//! - [`view`]: the read side (detections, risky users, risky sign-ins), following the log.
//! - [`service`]: the `gatehouse.v1.RiskService` implementation.
//! - [`publish`]: new detections to NATS.
//! - [`iplist`]: CIDR list files (anonymisers, known-malicious addresses), reloaded on change.
#![forbid(unsafe_code)]

pub mod detector;
pub mod iplist;
pub mod publish;
pub mod realtime;
pub mod service;
pub mod user_risk;
pub mod view;

pub use realtime::{Detection, Properties, RealtimeRisk};
