//! The [`EventStore`] trait: one contract, two backends.

use crate::envelope::{AppendRequest, ClaimKey, Position, RecordedEvent, StreamId};
use crate::error::StoreError;
use crate::integrity::{Seal, SignedCheckpoint};
use crate::readmodel::{SqlValue, Statement, Write};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use uuid::Uuid;

/// Where each appended event landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendOutcome {
    /// One entry per event, in append order: (event id, position, stream version).
    pub events: Vec<(Uuid, Position, u64)>,
}

impl AppendOutcome {
    /// Position of the last event of the append.
    pub fn last_position(&self) -> Position {
        self.events.last().map(|e| e.1).unwrap_or(0)
    }
}

/// Which events of the log a reader wants. Empty lists mean "all".
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Only this tenant's events.
    pub tenant_id: Option<Uuid>,
    /// Only these aggregate types.
    pub stream_types: Vec<String>,
    /// Only these event types.
    pub event_types: Vec<String>,
}

impl EventFilter {
    /// True when `event` passes the filter.
    pub fn matches(&self, event: &RecordedEvent) -> bool {
        self.tenant_id.is_none_or(|t| t == event.tenant_id)
            && (self.stream_types.is_empty() || self.stream_types.contains(&event.stream.kind))
            && (self.event_types.is_empty() || self.event_types.contains(&event.event_type))
    }
}

/// One page of the global log.
#[derive(Debug, Clone, Default)]
pub struct ReadBatch {
    /// Matching events in strictly increasing position.
    pub events: Vec<RecordedEvent>,
    /// Resume from here: every committed event at or below it has been considered (matching
    /// or not), and none will ever appear there later.
    pub next: Position,
}

/// Bounds for reading one stream.
#[derive(Debug, Clone, Copy, Default)]
pub struct StreamBounds {
    /// Only events after this stream version.
    pub after_version: u64,
    /// Only events at or below this global position.
    pub up_to_position: Option<Position>,
    /// Only events recorded at or before this time.
    pub up_to_time: Option<DateTime<Utc>>,
}

/// The append-only log, and the two small tables that live beside it: per-subject data keys
/// (kept outside event payloads so erasure can destroy them) and consumer checkpoints.
/// Implementations: [`crate::postgres::PgStore`], [`crate::sqlite::SqliteStore`].
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Appends atomically, checking expected versions and taking/releasing unique claims.
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError>;

    /// Reads one stream in version order.
    async fn read_stream(
        &self,
        stream: &StreamId,
        bounds: StreamBounds,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// Reads up to `limit` matching events after `after`, in position order, never past the
    /// point below which every transaction has finished (so no later commit lands behind it).
    async fn read_all(
        &self,
        after: Position,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<ReadBatch, StoreError>;

    /// The stream currently holding a unique claim.
    async fn claim_owner(&self, key: &ClaimKey) -> Result<Option<StreamId>, StoreError>;

    /// The latest snapshot of a stream: (version, state).
    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<(u64, Value)>, StoreError>;

    /// Replaces a stream's snapshot.
    async fn save_snapshot(
        &self,
        stream: &StreamId,
        version: u64,
        state: &Value,
    ) -> Result<(), StoreError>;

    /// Stores a subject's wrapped data key unless it already has one; returns the key it has.
    async fn put_subject_key(
        &self,
        subject_id: Uuid,
        tenant_id: Uuid,
        wrapped_key: Vec<u8>,
    ) -> Result<Vec<u8>, StoreError>;

    /// A subject's wrapped data key (`None`: never created, or destroyed by erasure).
    async fn subject_key(&self, subject_id: Uuid) -> Result<Option<Vec<u8>>, StoreError>;

    /// Destroys a subject's data key for good (crypto-shredding).
    async fn destroy_subject_key(&self, subject_id: Uuid) -> Result<(), StoreError>;

    /// Where the consumer `name` has got to in the log.
    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, StoreError>;

    /// Records where the consumer `name` has got to.
    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<(), StoreError>;

    /// Records seals of the hash chain (ignoring ones already there) and raises the sealed
    /// point ([`crate::integrity::SEALER_CHECKPOINT`]) to `sealed_up_to`, in one transaction.
    async fn save_seals(&self, seals: Vec<Seal>, sealed_up_to: Position) -> Result<(), StoreError>;

    /// Up to `limit` seals after `after` (of one tenant, or all), in position order.
    async fn read_seals(
        &self,
        tenant_id: Option<Uuid>,
        after: Position,
        limit: usize,
    ) -> Result<Vec<Seal>, StoreError>;

    /// A tenant's last seal at or below `at_or_before`.
    async fn last_seal(
        &self,
        tenant_id: Uuid,
        at_or_before: Position,
    ) -> Result<Option<Seal>, StoreError>;

    /// Stores a signed checkpoint of a tenant's chain.
    async fn save_integrity_checkpoint(
        &self,
        checkpoint: &SignedCheckpoint,
    ) -> Result<(), StoreError>;

    /// Signed checkpoints (of one tenant, or all), in position order.
    async fn integrity_checkpoints(
        &self,
        tenant_id: Option<Uuid>,
    ) -> Result<Vec<SignedCheckpoint>, StoreError>;

    /// Writes events exported from another store after the last event, in order, keeping
    /// everything but their positions (offline replay of an export; no claims, no snapshots).
    async fn import(&self, events: Vec<RecordedEvent>) -> Result<(), StoreError>;

    /// Runs read-model writes in one transaction, after `fence`, which must change exactly
    /// one row (a projection's checkpoint row, held under its lease) or, a `SELECT`
    /// ([`Statement::is_check`]), return exactly one row, which then cannot change until the
    /// commit while other checks of it still pass (PostgreSQL locks it `FOR SHARE`; SQLite's
    /// single writer holds everything). Returns false, having changed nothing, when the fence
    /// found no row. DDL is allowed.
    async fn read_model_commit(
        &self,
        fence: Option<Statement>,
        writes: Vec<Write>,
    ) -> Result<bool, StoreError>;

    /// Runs a read-model query; each row as values (integers and text).
    async fn read_model_query(&self, query: Statement) -> Result<Vec<Vec<SqlValue>>, StoreError>;

    /// A counter that changes after appends (this process's immediately, other processes'
    /// as the backend learns of them). Subscribers wait on it.
    fn changes(&self) -> watch::Receiver<u64>;

    /// How often a waiting subscriber looks again even without a change signal.
    fn poll_interval(&self) -> Duration;

    /// Backend name for logs and benchmarks: `postgres` or `sqlite`.
    fn backend(&self) -> &'static str;

    /// The process's shared reader of the log ([`crate::subscription::Tail`]).
    fn tail(&self) -> &crate::subscription::Tail;
}

/// Opens the store named by `url`: `postgres://…` or `sqlite://PATH` (a file path also works),
/// applying migrations.
pub async fn connect(url: &str) -> Result<Arc<dyn EventStore>, StoreError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(crate::postgres::PgStore::connect(url).await?))
    } else {
        let path = url.strip_prefix("sqlite://").unwrap_or(url);
        Ok(Arc::new(crate::sqlite::SqliteStore::open(path).await?))
    }
}
