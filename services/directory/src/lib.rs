//! # Layout
//!
//! The directory: who exists. One file per aggregate and one per gRPC service.
//!
//! - [`tenant`]: the Tenant aggregate: settings and API keys (pure `decide`/`apply`).
//! - [`tenant_service`]: `gatehouse.v1.TenantService`, and the live tenant list behind
//!   `ListTenants`.
//! - [`application`]: the Application aggregate: client id (a unique claim per tenant),
//!   hashed secret, redirect URIs, grant types.
//! - [`user`]: the User aggregate: sealed personal data, codes, lifecycle; its notifications
//!   are events too (the outbox is the log).
//! - [`user_service`]: `gatehouse.v1.UserService` handlers.
//! - [`lockout`]: smart lockout per account, reserved before a password is checked.
//! - [`contact`]: email normalisation and phone validation.
//! - [`notifier`]: delivers the users' notifications from the log, once each.
//! - [`paging`]: `page_size` / `page_token` for every List RPC.
//! - [`application_service`]: the `gatehouse.v1.ApplicationService` handlers.
//! - [`identity_provider`]: the IdentityProvider aggregate (social / OpenID Connect providers,
//!   the client secret sealed); [`identity_provider_service`] its gRPC service.
//!
//! This crate decides from aggregates loaded from the event store; it never reads a
//! projection's table to make a decision.
#![forbid(unsafe_code)]

pub mod application;
pub mod application_service;
pub mod contact;
pub mod identity_provider;
pub mod identity_provider_service;
pub mod lockout;
pub mod notifier;
pub mod paging;
pub mod tenant;
pub mod tenant_service;
pub mod user;
pub mod user_service;

pub use application_service::ApplicationApi;
pub use identity_provider_service::IdentityProviderApi;
pub use tenant_service::TenantApi;
pub use user_service::UserApi;
