//! PostgreSQL backend: the production store.
//!
//! # Ordering
//!
//! A position is `(transaction id << 20) + index in the append`, computed inside the append's
//! transaction (see `migrations/postgres/0001_event_log.sql`). Position order is therefore
//! transaction-id order, and [`EventStore::read_all`] only returns positions below
//! `pg_snapshot_xmin(pg_current_snapshot()) << 20`: every transaction with a smaller id has
//! finished, so nothing can commit behind a position a reader has passed. No timestamps, no
//! gap timeouts, and writers never wait for each other. A long-running transaction holds the
//! horizon back (readers wait; nothing is skipped).
//!
//! # Live tailing
//!
//! Appends from this process wake local subscribers at once. Other processes learn of appends
//! through `LISTEN gatehouse_events`; each process sends at most one `NOTIFY` per burst of
//! appends from a separate connection, outside the append transaction, because a `NOTIFY`
//! inside it would serialise every commit on PostgreSQL's notify-queue lock.

use crate::envelope::{
    Actor, AppendRequest, ClaimKey, ClientContext, ExpectedVersion, RecordedEvent, StreamId,
};
use crate::error::StoreError;
use crate::store::{AppendOutcome, EventFilter, EventStore, ReadBatch, StreamBounds};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::postgres::{PgDatabaseError, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::Row;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use uuid::Uuid;

const CHANNEL: &str = "gatehouse_events";
const COLUMNS: &str = "position, event_id, tenant_id, stream_type, stream_id, version, event_type, \
    schema_version, recorded_at, correlation_id, causation_id, actor, context, payload";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The PostgreSQL event store.
pub struct PgStore {
    pool: PgPool,
    changes: Arc<watch::Sender<u64>>,
    appended: Arc<Notify>,
    tasks: Vec<JoinHandle<()>>,
}

impl PgStore {
    /// Connects, applies migrations, checks that positions can still grow, and starts the
    /// listener and notifier tasks.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await?;
        MIGRATOR.run(&pool).await?;
        check_positions_can_grow(&pool).await?;

        let changes = Arc::new(watch::channel(0u64).0);
        let appended = Arc::new(Notify::new());
        let tasks = vec![
            tokio::spawn(listen(pool.clone(), changes.clone())),
            tokio::spawn(notify_others(pool.clone(), appended.clone())),
        ];
        Ok(PgStore { pool, changes, appended, tasks })
    }

    /// The connection pool (benchmarks and projections share it).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn append_once(&self, request: &AppendRequest) -> Result<AppendOutcome, StoreError> {
        let streams = &request.streams;
        let s_types: Vec<&str> = streams.iter().map(|(s, _)| s.kind.as_str()).collect();
        let s_ids: Vec<Uuid> = streams.iter().map(|(s, _)| s.id).collect();
        let s_expected: Vec<i64> = streams
            .iter()
            .map(|(_, expected)| match expected {
                ExpectedVersion::Any => -1,
                ExpectedVersion::Exact(v) => *v as i64,
            })
            .collect();
        let n = request.events.len();
        let mut e_stream = Vec::with_capacity(n);
        let mut e_ids = Vec::with_capacity(n);
        let mut e_tenants = Vec::with_capacity(n);
        let mut e_types = Vec::with_capacity(n);
        let mut e_schemas = Vec::with_capacity(n);
        let mut e_payloads = Vec::with_capacity(n);
        for (stream, event) in &request.events {
            e_stream.push(*stream as i32 + 1);
            e_ids.push(Uuid::now_v7());
            e_tenants.push(event.tenant_id);
            e_types.push(event.event_type.as_str());
            e_schemas.push(event.schema_version as i32);
            e_payloads.push(event.payload.to_string());
        }
        let claim_columns = |claims: &[(usize, ClaimKey)]| {
            let mut tenants = Vec::with_capacity(claims.len());
            let mut scopes = Vec::with_capacity(claims.len());
            let mut values = Vec::with_capacity(claims.len());
            let mut owners = Vec::with_capacity(claims.len());
            for (owner, key) in claims {
                tenants.push(key.tenant_id);
                scopes.push(key.scope.clone());
                values.push(key.value.clone());
                owners.push(*owner as i32 + 1);
            }
            (tenants, scopes, values, owners)
        };
        let (c_tenants, c_scopes, c_values, c_owners) = claim_columns(&request.claims);
        let (r_tenants, r_scopes, r_values, r_owners) = claim_columns(&request.releases);
        let metadata = &request.metadata;
        let context = metadata.context.as_ref().map(|c| serde_json::json!(c));

        let rows = sqlx::query(
            "SELECT out_position, out_version FROM gatehouse_append($1, $2, $3, $4, $5, $6, $7, $8, \
             $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22)",
        )
        .bind(&s_types)
        .bind(&s_ids)
        .bind(&s_expected)
        .bind(&e_stream)
        .bind(&e_ids)
        .bind(&e_tenants)
        .bind(&e_types)
        .bind(&e_schemas)
        .bind(&e_payloads)
        .bind(request.recorded_at)
        .bind(metadata.correlation_id)
        .bind(metadata.causation_id)
        .bind(metadata.actor.to_string())
        .bind(context)
        .bind(&c_tenants)
        .bind(&c_scopes)
        .bind(&c_values)
        .bind(&c_owners)
        .bind(&r_tenants)
        .bind(&r_scopes)
        .bind(&r_values)
        .bind(&r_owners)
        .fetch_all(&self.pool)
        .await
        .map_err(|error| append_error(error, request))?;

        let mut landed: Vec<(i64, i64)> = rows
            .iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect::<Result<_, sqlx::Error>>()?;
        landed.sort_unstable();
        if landed.len() != n {
            return Err(StoreError::Backend(format!("append returned {} of {n} events", landed.len())));
        }
        Ok(AppendOutcome {
            events: e_ids
                .into_iter()
                .zip(landed)
                .map(|(id, (position, version))| (id, position as u64, version as u64))
                .collect(),
        })
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Maps the append function's errors to typed store errors.
fn append_error(error: sqlx::Error, request: &AppendRequest) -> StoreError {
    let Some(db) = error.as_database_error().and_then(|e| e.try_downcast_ref::<PgDatabaseError>())
    else {
        return error.into();
    };
    match (db.code(), db.constraint()) {
        ("GH001", _) => {
            let detail = db.detail().unwrap_or_default();
            let (index, actual) = detail.split_once(':').unwrap_or(("1", ""));
            let index = index.parse::<usize>().unwrap_or(1).saturating_sub(1);
            let (stream, expected) = request.streams.get(index).cloned().unwrap_or_else(|| {
                (StreamId::new("unknown", Uuid::nil()), ExpectedVersion::Any)
            });
            StoreError::Conflict {
                stream,
                expected: match expected {
                    ExpectedVersion::Exact(v) => v,
                    ExpectedVersion::Any => 0,
                },
                actual: actual.parse().ok(),
            }
        }
        ("23505", Some("events_stream_version")) => {
            // A concurrent append to one of our streams committed between our version check
            // and our insert. Report the first stream we appended to.
            let (stream, expected) = request.streams[request.events[0].0].clone();
            StoreError::Conflict {
                stream,
                expected: match expected {
                    ExpectedVersion::Exact(v) => v,
                    ExpectedVersion::Any => 0,
                },
                actual: None,
            }
        }
        ("23505", Some("unique_claims_key")) => {
            // DETAIL: Key (tenant_id, scope, value)=(<tenant>, <scope>, <value>) already exists.
            let detail = db.detail().unwrap_or_default();
            let scope = detail
                .split_once(")=(")
                .and_then(|(_, rest)| rest.split(", ").nth(1))
                .map(str::to_owned)
                .or_else(|| request.claims.first().map(|(_, k)| k.scope.clone()))
                .unwrap_or_default();
            StoreError::ClaimTaken { scope }
        }
        _ => error.into(),
    }
}

/// After a restore into another cluster, transaction ids may be behind the positions
/// already in the log, and new events would land behind old ones. Refuse to start.
async fn check_positions_can_grow(pool: &PgPool) -> Result<(), StoreError> {
    let row = sqlx::query(
        "SELECT coalesce(max(position), 0) >> 20, \
                pg_snapshot_xmax(pg_current_snapshot())::text::bigint FROM events",
    )
    .fetch_one(pool)
    .await?;
    let (last_xid, next_xid): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
    if last_xid >= next_xid {
        return Err(StoreError::Backend(format!(
            "the log's last position belongs to transaction {last_xid}, but this PostgreSQL \
             cluster is only at transaction {next_xid} (was the database restored into a new \
             cluster?); advance the cluster's transaction ids past {last_xid} before starting"
        )));
    }
    Ok(())
}

/// Wakes local subscribers whenever any process announces an append.
async fn listen(pool: PgPool, changes: Arc<watch::Sender<u64>>) {
    loop {
        let listener = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(CHANNEL).await?;
            loop {
                listener.recv().await?;
                changes.send_modify(|n| *n = n.wrapping_add(1));
            }
            #[allow(unreachable_code)]
            Ok::<(), sqlx::Error>(())
        };
        if let Err(error) = listener.await {
            tracing::warn!(%error, "event listener lost its connection; reconnecting");
        }
        // Whatever was announced while disconnected is found by the subscribers' polling.
        changes.send_modify(|n| *n = n.wrapping_add(1));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Sends one NOTIFY per burst of local appends, outside their transactions.
async fn notify_others(pool: PgPool, appended: Arc<Notify>) {
    loop {
        appended.notified().await;
        if let Err(error) = sqlx::query("SELECT pg_notify($1, '')").bind(CHANNEL).execute(&pool).await
        {
            tracing::warn!(%error, "could not announce appends to other processes");
        }
    }
}

#[async_trait]
impl EventStore for PgStore {
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError> {
        request.validate()?;
        let only_any = request.streams.iter().all(|(_, e)| *e == ExpectedVersion::Any);
        let mut attempts = 0;
        let outcome = loop {
            match self.append_once(&request).await {
                // With no expectation the caller never saw a version; a race on the version
                // number is ours to retry, not theirs.
                Err(StoreError::Conflict { .. }) if only_any && attempts < 10 => attempts += 1,
                other => break other?,
            }
        };
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
        self.appended.notify_one();
        Ok(outcome)
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        bounds: StreamBounds,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM events WHERE stream_type = $1 AND stream_id = $2 AND version > $3 \
             AND ($4::bigint IS NULL OR position <= $4) \
             AND ($5::timestamptz IS NULL OR recorded_at <= $5) ORDER BY version"
        );
        let rows = sqlx::query(&sql)
            .bind(&stream.kind)
            .bind(stream.id)
            .bind(bounds.after_version as i64)
            .bind(bounds.up_to_position.map(|p| p as i64))
            .bind(bounds.up_to_time)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|row| decode(row, 0)).collect()
    }

    async fn read_all(
        &self,
        after: u64,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<ReadBatch, StoreError> {
        // One statement, one snapshot: the horizon and the events below it.
        let sql = format!(
            "WITH h AS (SELECT (pg_snapshot_xmin(pg_current_snapshot())::text::bigint << 20) AS horizon) \
             SELECT h.horizon, e.* FROM h LEFT JOIN LATERAL ( \
               SELECT {COLUMNS} FROM events \
               WHERE position > $1 AND position < h.horizon \
                 AND ($2::uuid IS NULL OR tenant_id = $2) \
                 AND (cardinality($3::text[]) = 0 OR stream_type = ANY($3)) \
                 AND (cardinality($4::text[]) = 0 OR event_type = ANY($4)) \
               ORDER BY position LIMIT $5) e ON true"
        );
        let rows = sqlx::query(&sql)
            .bind(after as i64)
            .bind(filter.tenant_id)
            .bind(&filter.stream_types)
            .bind(&filter.event_types)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        let horizon: i64 = match rows.first() {
            Some(row) => row.try_get(0)?,
            None => return Ok(ReadBatch { events: Vec::new(), next: after }),
        };
        let mut events = Vec::with_capacity(rows.len());
        for row in &rows {
            if row.try_get::<Option<i64>, _>(1)?.is_some() {
                events.push(decode(row, 1)?);
            }
        }
        let next = if events.len() >= limit {
            events.last().map_or(after, |e| e.position)
        } else {
            after.max((horizon as u64).saturating_sub(1))
        };
        Ok(ReadBatch { events, next })
    }

    async fn claim_owner(&self, key: &ClaimKey) -> Result<Option<StreamId>, StoreError> {
        let row = sqlx::query(
            "SELECT stream_type, stream_id FROM unique_claims \
             WHERE tenant_id = $1 AND scope = $2 AND value = $3",
        )
        .bind(key.tenant_id)
        .bind(&key.scope)
        .bind(&key.value)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| Ok(StreamId { kind: row.try_get(0)?, id: row.try_get(1)? })).transpose()
    }

    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<(u64, Value)>, StoreError> {
        let row = sqlx::query(
            "SELECT version, state FROM snapshots WHERE stream_type = $1 AND stream_id = $2",
        )
        .bind(&stream.kind)
        .bind(stream.id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            let version: i64 = row.try_get(0)?;
            Ok((version as u64, row.try_get::<sqlx::types::Json<Value>, _>(1)?.0))
        })
        .transpose()
    }

    async fn save_snapshot(
        &self,
        stream: &StreamId,
        version: u64,
        state: &Value,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO snapshots (stream_type, stream_id, version, state) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (stream_type, stream_id) DO UPDATE SET version = EXCLUDED.version, \
             state = EXCLUDED.state WHERE snapshots.version < EXCLUDED.version",
        )
        .bind(&stream.kind)
        .bind(stream.id)
        .bind(version as i64)
        .bind(sqlx::types::Json(state))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn poll_interval(&self) -> Duration {
        Duration::from_millis(50)
    }

    fn backend(&self) -> &'static str {
        "postgres"
    }
}

/// Decodes the event columns starting at `offset`.
fn decode(row: &PgRow, offset: usize) -> Result<RecordedEvent, StoreError> {
    let actor: String = row.try_get(offset + 11)?;
    let context: Option<sqlx::types::Json<ClientContext>> = row.try_get(offset + 12)?;
    let recorded_at: DateTime<Utc> = row.try_get(offset + 8)?;
    Ok(RecordedEvent {
        position: row.try_get::<i64, _>(offset)? as u64,
        id: row.try_get(offset + 1)?,
        tenant_id: row.try_get(offset + 2)?,
        stream: StreamId { kind: row.try_get(offset + 3)?, id: row.try_get(offset + 4)? },
        version: row.try_get::<i64, _>(offset + 5)? as u64,
        event_type: row.try_get(offset + 6)?,
        schema_version: row.try_get::<i32, _>(offset + 7)? as u32,
        recorded_at,
        correlation_id: row.try_get(offset + 9)?,
        causation_id: row.try_get(offset + 10)?,
        actor: actor.parse::<Actor>().map_err(StoreError::Backend)?,
        context: context.map(|c| c.0),
        payload: row.try_get::<sqlx::types::Json<Value>, _>(offset + 13)?.0,
    })
}
