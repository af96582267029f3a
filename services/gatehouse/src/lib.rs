//! # Layout
//!
//! The `gatehouse` binary: it assembles the services over one event store.
//!
//! - [`config`]: flags, environment and file, resolved into one [`config::Config`].
//! - [`server`]: `gatehouse serve`: the store, the admin key, the gRPC server (services,
//!   health, reflection) and the HTTP server, with graceful shutdown.
//! - [`http`]: `/healthz` and `/metrics`.
//! - [`bench`]: `gatehouse bench append|replay|signin`, measured against raw baselines.
//! - [`bench_signin`]: the sign-in benchmark (a real server process, raw argon2id beside it).
#![forbid(unsafe_code)]

pub mod bench;
pub mod bench_policy;
pub mod bench_signin;
pub mod config;
pub mod http;
pub mod server;
