//! # Layout
//!
//! Conditional Access (SPEC §5).
//!
//! - [`model`]: the Policy, NamedLocation and Group aggregates, and a policy's definition.
//! - [`engine`]: compiled policy sets and the pure evaluation function.
//! - [`view`]: each tenant's policies, locations and groups in memory, following the log.
//! - [`backtest`]: a draft policy against the sign-ins recorded in the log.
//! - [`service`]: the gRPC PolicyService (CRUD, What If, Backtest).
#![forbid(unsafe_code)]

pub mod backtest;
pub mod engine;
pub mod model;
pub mod service;
pub mod view;

pub use engine::{Context, Decision, PolicySet, PrimaryKind};
pub use service::PolicyApi;
pub use view::PolicyView;
