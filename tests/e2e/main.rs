//! Gatehouse's end-to-end tests, against the `gatehouse` binary, on SQLite and (when
//! `GATEHOUSE_TEST_DATABASE_URL` is set) PostgreSQL.
//!
//! One test binary with a module per area: each test binary links every dependency with its
//! debug info, so twelve binaries cost twelve links and gigabytes of disk for the same code.
//! Run one area with `cargo test --test e2e audit::`.

mod support;

mod audit;
mod dashboard;
mod directory;
mod federation;
mod hosted;
mod oidc;
mod policy;
mod projections;
mod protection;
mod relay;
mod risk;
mod serve;
mod services;
mod signin;
mod users;
