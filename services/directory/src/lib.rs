//! # Layout
//!
//! The directory: who exists. One file per aggregate and one per gRPC service.
//!
//! - [`tenant`]: the Tenant aggregate (pure `decide`/`apply`).
//! - [`tenant_service`]: `gatehouse.v1.TenantService`, and the live tenant list behind
//!   `ListTenants`.
//!
//! This crate decides from aggregates loaded from the event store; it never reads a
//! projection's table to make a decision.
#![forbid(unsafe_code)]

pub mod tenant;
pub mod tenant_service;

pub use tenant_service::TenantApi;
