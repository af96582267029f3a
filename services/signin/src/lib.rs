//! # Layout
//!
//! Sign-in: flows, second factors, lockout's use, sessions and tokens.
//!
//! - [`flow`]: the SignIn aggregate and its state machine (diagram there).
//! - [`engine`]: what each step decides and appends; the risk and policy hooks.
//! - [`federation`]: the relying party of federated sign-ins (OpenID Connect, Facebook).
//! - [`actor`]: one ractor actor per busy flow, the supervisor, the registry, deadlines.
//! - [`directory`]: tenants' settings and apps as sign-in reads them (a live view).
//! - [`otp`]: TOTP with replay protection, recovery codes.
//! - [`session`]: the Session aggregate and refresh-token families.
//! - [`tokens`]: per-tenant ES256 signing keys, JWT signing and verification, JWKS.
//! - [`signin_service`], [`mfa_service`], [`session_service`]: the gRPC services.
//! - [`oidc`]: the OpenID Connect provider's decisions (codes, tokens, logout); its HTTP
//!   endpoints and hosted pages are the server's.
#![forbid(unsafe_code)]

pub mod actor;
pub mod directory;
pub mod engine;
pub mod federation;
pub mod flow;
pub mod mfa_service;
pub mod oidc;
pub mod otp;
pub mod session;
pub mod session_service;
pub mod signin_service;
pub mod tokens;

pub use actor::{Deadlines, Flows};
pub use directory::Directory;
pub use engine::Engine;
pub use mfa_service::MfaApi;
pub use session_service::SessionApi;
pub use signin_service::SignInApi;
pub use tokens::Keys;
