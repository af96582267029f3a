//! # Layout
//!
//! What every gRPC service of Gatehouse shares, and nothing a single service owns:
//!
//! - [`keys`]: API keys (platform admin and tenant keys): generation, hashing, the
//!   [`keys::KeyRing`] that authenticates a bearer key, and the tonic interceptor.
//! - [`platform`]: the platform aggregate and the admin key created on first start.
//! - [`request`]: correlation id and client context read from a request, as event metadata.
//! - [`error`]: [`error::ApiError`], the one place where domain errors become `tonic::Status`.
//! - [`crypto`]: the master key, per-subject data keys (crypto-shredding), blind indexes.
//! - [`passwords`]: argon2id on the blocking pool, the breached-password list.
//! - [`files`]: files that hold secrets.
#![forbid(unsafe_code)]

pub mod crypto;
pub mod error;
pub mod files;
pub mod geo;
pub mod keys;
pub mod net;
pub mod passwords;
pub mod platform;
pub mod request;

pub use error::{ApiError, FieldViolation};
pub use keys::{Caller, KeyRing};
