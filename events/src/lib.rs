//! # Layout
//!
//! What happened, and where it is kept.
//!
//! - [`envelope`]: the event envelope of SPEC §8 ([`RecordedEvent`]), what a command appends
//!   ([`NewEvent`], [`AppendRequest`]) and who did it ([`Actor`], [`ClientContext`]).
//! - [`store`]: the [`EventStore`] trait every backend implements: atomic multi-stream appends
//!   with expected versions and unique claims, stream and log reads, snapshots.
//! - [`subscription`]: catch-up-then-live subscriptions built on any [`EventStore`].
//! - [`postgres`] and [`sqlite`]: the two backends, each with its own migrations
//!   (`migrations/postgres`, `migrations/sqlite`) applied when the store opens.
//! - [`aggregate`]: typed domain events with schema versions and upcasters, and the small
//!   [`Aggregate`] trait with loading (and optional snapshots) from a store.
//! - [`view`]: in-memory folds of the log kept current by a subscription.
//! - [`integrity`]: the hash chain over each tenant's events, its sealer, signed checkpoints
//!   and verification.
//! - [`readmodel`]: the SQL dialect projections write their tables in, beside the log.
//! - [`retry`]: the bounded retry for commands that lose an optimistic-concurrency race.
//! - [`testing`]: stores for tests (SQLite in a temporary directory; a fresh PostgreSQL
//!   database when `GATEHOUSE_TEST_DATABASE_URL` is set) and scratch databases for benchmarks.
//!
//! This crate never decides anything about identities: it records and returns facts.
#![forbid(unsafe_code)]

pub mod aggregate;
pub mod envelope;
pub mod error;
pub mod integrity;
pub mod postgres;
pub mod readmodel;
pub mod retry;
pub mod sqlite;
pub mod store;
pub mod subscription;
pub mod testing;
pub mod view;

pub use aggregate::{Aggregate, DomainEvent, Executed, Loaded, StateCache, Upcasters, execute};
pub use envelope::{
    Actor, AppendRequest, ClaimKey, ClientContext, ExpectedVersion, Metadata, NewEvent, Position,
    RecordedEvent, StreamId,
};
pub use error::StoreError;
pub use store::{AppendOutcome, EventFilter, EventStore, ReadBatch, connect};
pub use subscription::subscribe;
