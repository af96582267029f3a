//! # Layout
//!
//! The `gatehouse` binary: it assembles the services over one event store.
//!
//! - [`config`]: flags, environment and file, resolved into one [`config::Config`].
//! - [`server`]: `gatehouse serve`: the store, the admin key, the gRPC server (services,
//!   health, reflection) and the HTTP server, with graceful shutdown.
//! - [`http`]: `/healthz`, `/metrics`, OpenID Connect discovery and JWKS.
//! - [`hosted`]: the OpenID Connect endpoints and the hosted sign-in pages.
//! - [`dashboard`]: the dashboard page and the JSON API it reads.
//! - [`insights_service`]: InsightsService (and the dashboard's questions) over the activity
//!   projection.
//! - [`projections_cli`]: `gatehouse projections status|rebuild`.
//! - [`event_service`]: EventService, the log for auditors and downstream services.
//! - [`audit`]: audit replay (state at a point, timelines, disclosure of personal data,
//!   export and import), shared by EventService and `gatehouse audit`.
//! - [`relay`]: the event log relayed to NATS JetStream (`--relay-events`).
//! - [`bench`]: `gatehouse bench append|replay|signin`, measured against raw baselines.
//! - [`bench_signin`]: the sign-in benchmark (a real server process, raw argon2id beside it).
#![forbid(unsafe_code)]

pub mod audit;
pub mod bench;
pub mod bench_policy;
pub mod bench_signin;
pub mod config;
pub mod dashboard;
pub mod event_service;
pub mod hosted;
pub mod http;
pub mod insights_service;
pub mod projections_cli;
pub mod relay;
pub mod server;
