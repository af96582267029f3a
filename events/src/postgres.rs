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
//! # Group commit
//!
//! Appends queue up and [`COMMITTERS`] connections each take whatever is waiting (up to
//! [`GROUP_COMMANDS`] commands) into one `gatehouse_append` call: one transaction and one WAL
//! flush for the group, each command still checked and applied all-or-nothing on its own.
//! A command whose expected version or claim fails is reported alone; if a concurrent
//! transaction wins a race (a unique violation), the group is rolled back and replayed one
//! command at a time so only the loser sees the error. Two committers measured best on the
//! 2-core machines (README, benchmarks). A committer that has answered its group yields once
//! before taking the next, so that the callers it woke can queue their next commands for it.
//!
//! # Grouped reads
//!
//! Stream reads queue the same way: [`READERS`] connections each take whatever reads are
//! waiting (up to [`GROUP_READS`]) into one query, a lateral join of the streams asked for with
//! their events. Most reads are a [`crate::StateCache`]'s checks that a kept state is still
//! current, which usually find nothing: a refresh of a session's tokens checks its tenant,
//! session, app and user. Alone, each paid a round trip and a statement; grouped, concurrent
//! commands share them (README, benchmarks). A read that finds no other waiting runs at once,
//! as the plain query. Each read still sees everything committed before it was asked.
//!
//! # Live tailing
//!
//! Appends from this process wake local subscribers at once. Other processes learn of appends
//! through `LISTEN gatehouse_events`; each process sends at most one `NOTIFY` per burst of
//! appends from a separate connection, outside the append transaction, because a `NOTIFY`
//! inside it would serialise every commit on PostgreSQL's notify-queue lock. Its payload is
//! the sending store's random id, and a store ignores its own: its subscribers were woken
//! when it committed, and hearing itself would make them read the log once more for nothing.

use crate::envelope::{
    Actor, AppendRequest, ClaimKey, ClientContext, ExpectedVersion, RecordedEvent, StreamId,
};
use crate::error::StoreError;
use crate::integrity::{Hash, SEALER_CHECKPOINT, Seal, SignedCheckpoint};
use crate::readmodel::{Column, Rows, SqlValue, Statement, Write, numbered};
use crate::store::{AppendOutcome, EventFilter, EventStore, ReadBatch, StreamBounds};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde_json::Value;
use sqlx::Row;
use sqlx::postgres::{PgDatabaseError, PgListener, PgPool, PgPoolOptions, PgRow};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use uuid::Uuid;

const CHANNEL: &str = "gatehouse_events";
/// Connections committing groups of appends concurrently (measured: 1, 2, 4, 8 → 2 is best
/// on 2 cores; more committers make smaller groups, fewer leave the CPU idle during fsync).
const COMMITTERS: usize = 2;
/// Commands committed together at most.
const GROUP_COMMANDS: usize = 64;
/// Events committed together at most (a group may exceed it by its last command).
const GROUP_EVENTS: usize = 10_000;
/// Connections reading groups of streams concurrently (measured: 2 gave 1 802 – 2 144
/// refreshes/s, 4 gave 1 713 – 1 894; fewer readers make larger groups).
const READERS: usize = 2;
/// Streams read together at most.
const GROUP_READS: usize = 64;
/// Longest delay before other processes hear of an append (besides their polling).
const NOTIFY_EVERY: Duration = Duration::from_millis(2);
const COLUMNS: &str = "position, event_id, tenant_id, stream_type, stream_id, version, event_type, \
    schema_version, recorded_at, correlation_id, causation_id, actor, client_ip, user_agent, payload";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The PostgreSQL event store.
pub struct PgStore {
    pool: PgPool,
    changes: Arc<watch::Sender<u64>>,
    queue: mpsc::Sender<Pending>,
    reads: mpsc::Sender<PendingRead>,
    tasks: Vec<JoinHandle<()>>,
    tail: crate::subscription::Tail,
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
        let (queue, pending) = mpsc::channel(4096);
        let pending = Arc::new(Mutex::new(pending));
        let origin = Uuid::now_v7().to_string();
        let mut tasks = vec![
            tokio::spawn(listen(pool.clone(), changes.clone(), origin.clone())),
            tokio::spawn(notify_others(pool.clone(), appended.clone(), origin)),
        ];
        for _ in 0..COMMITTERS {
            tasks.push(tokio::spawn(commit_groups(
                pool.clone(),
                pending.clone(),
                changes.clone(),
                appended.clone(),
            )));
        }
        let (reads, waiting) = mpsc::channel(4096);
        let waiting = Arc::new(Mutex::new(waiting));
        for _ in 0..READERS {
            tasks.push(tokio::spawn(read_groups(pool.clone(), waiting.clone())));
        }
        Ok(PgStore {
            pool,
            changes,
            queue,
            reads,
            tasks,
            tail: Default::default(),
        })
    }

    /// The connection pool (benchmarks and projections share it).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// One command waiting for its group.
struct Pending {
    request: AppendRequest,
    reply: oneshot::Sender<Result<AppendOutcome, StoreError>>,
}

/// Takes whatever commands are queued (up to a group's size) and commits them together.
async fn commit_groups(
    pool: PgPool,
    queue: Arc<Mutex<mpsc::Receiver<Pending>>>,
    changes: Arc<watch::Sender<u64>>,
    appended: Arc<Notify>,
) {
    loop {
        let mut events = 0;
        let Some(group) = next_group(&queue, |group: &[Pending]| {
            events += group.last().map_or(0, |p| p.request.events.len());
            group.len() < GROUP_COMMANDS && events < GROUP_EVENTS
        })
        .await
        else {
            return;
        };
        let requests: Vec<&AppendRequest> = group.iter().map(|p| &p.request).collect();
        let results = commit(&pool, &requests).await;
        if results.iter().any(Result::is_ok) {
            changes.send_modify(|n| *n = n.wrapping_add(1));
            appended.notify_one();
        }
        for (pending, result) in group.into_iter().zip(results) {
            let _ = pending.reply.send(result);
        }
        // The callers just answered are often about to send their next command. Let the
        // tasks woken above run before taking the next group, so that it carries them too
        // instead of leaving with the first one that arrived (8 writers over 2 committers:
        // 2.6 → 3.9 commands per group). With nothing else ready this returns at once.
        tokio::task::yield_now().await;
    }
}

/// Waits for the first queued item, then takes whatever else is queued while `room` (given
/// the group so far) says the group has room.
async fn next_group<T>(
    queue: &Mutex<mpsc::Receiver<T>>,
    mut room: impl FnMut(&[T]) -> bool,
) -> Option<Vec<T>> {
    let mut queue = queue.lock().await;
    let mut group = vec![queue.recv().await?];
    while room(&group) {
        match queue.try_recv() {
            Ok(item) => group.push(item),
            Err(_) => break,
        }
    }
    Some(group)
}

/// Queues an item made with a reply channel and waits for the answer; `worker` names who
/// answers, for the error when they have stopped.
async fn ask<M, T>(
    queue: &mpsc::Sender<M>,
    item: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> M,
    worker: &str,
) -> Result<T, StoreError> {
    let (reply, answer) = oneshot::channel();
    let stopped = || StoreError::Backend(format!("the {worker} have stopped"));
    queue.send(item(reply)).await.map_err(|_| stopped())?;
    answer.await.map_err(|_| stopped())?
}

/// One stream read waiting for its group.
struct PendingRead {
    stream: StreamId,
    bounds: StreamBounds,
    reply: oneshot::Sender<Result<Vec<RecordedEvent>, StoreError>>,
}

/// Takes whatever stream reads are queued (up to [`GROUP_READS`]) and runs them as one query.
async fn read_groups(pool: PgPool, queue: Arc<Mutex<mpsc::Receiver<PendingRead>>>) {
    loop {
        let Some(group) = next_group(&queue, |group| group.len() < GROUP_READS).await else {
            return;
        };
        let reads: Vec<(&StreamId, StreamBounds)> =
            group.iter().map(|r| (&r.stream, r.bounds)).collect();
        let results = match read_group(&pool, &reads).await {
            Ok(results) => results.into_iter().map(Ok).collect(),
            // A read of one ran alone already: its error is its own.
            Err(error) if reads.len() == 1 => vec![Err(error)],
            // Each read alone, so that each caller gets its own error.
            Err(_) => {
                let mut results = Vec::with_capacity(reads.len());
                for (stream, bounds) in &reads {
                    results.push(read_one(&pool, stream, *bounds).await);
                }
                results
            }
        };
        for (read, result) in group.into_iter().zip(results) {
            let _ = read.reply.send(result);
        }
        // As for appends: let the callers just answered queue their next reads.
        tokio::task::yield_now().await;
    }
}

/// Reads several streams in one query: each stream's events in version order.
async fn read_group(
    pool: &PgPool,
    reads: &[(&StreamId, StreamBounds)],
) -> Result<Vec<Vec<RecordedEvent>>, StoreError> {
    if let [(stream, bounds)] = reads {
        return Ok(vec![read_one(pool, stream, *bounds).await?]);
    }
    let kinds: Vec<&str> = reads.iter().map(|(s, _)| s.kind.as_str()).collect();
    let ids: Vec<Uuid> = reads.iter().map(|(s, _)| s.id).collect();
    let after: Vec<i64> = reads.iter().map(|(_, b)| b.after_version as i64).collect();
    let up_to: Vec<Option<i64>> = reads
        .iter()
        .map(|(_, b)| b.up_to_position.map(|p| p as i64))
        .collect();
    let up_to_time: Vec<Option<DateTime<Utc>>> = reads.iter().map(|(_, b)| b.up_to_time).collect();
    let sql = format!(
        "SELECT s.n, e.* FROM unnest($1::text[], $2::uuid[], $3::bigint[], $4::bigint[], \
           $5::timestamptz[]) WITH ORDINALITY AS s(kind, id, after, up_to, up_to_time, n) \
         CROSS JOIN LATERAL (SELECT {COLUMNS} FROM events WHERE stream_type = s.kind \
           AND stream_id = s.id AND version > s.after \
           AND (s.up_to IS NULL OR position <= s.up_to) \
           AND (s.up_to_time IS NULL OR recorded_at <= s.up_to_time) ORDER BY version) e"
    );
    let rows = sqlx::query(&sql)
        .bind(&kinds)
        .bind(&ids)
        .bind(&after)
        .bind(&up_to)
        .bind(&up_to_time)
        .fetch_all(pool)
        .await?;
    let mut results = vec![Vec::new(); reads.len()];
    for row in &rows {
        let n = row.try_get::<i64, _>(0)? as usize;
        let events = results
            .get_mut(n.wrapping_sub(1))
            .ok_or_else(|| StoreError::Backend("a read of no stream".into()))?;
        events.push(decode(row, 1)?);
    }
    for events in &mut results {
        events.sort_by_key(|e: &RecordedEvent| e.version);
    }
    Ok(results)
}

async fn read_one(
    pool: &PgPool,
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
        .fetch_all(pool)
        .await?;
    rows.iter().map(|row| decode(row, 0)).collect()
}

/// Commits a group; if a concurrent transaction won a race and rolled the group back, each
/// command is committed on its own so that only the loser sees the error.
async fn commit(pool: &PgPool, group: &[&AppendRequest]) -> Vec<Result<AppendOutcome, StoreError>> {
    if let [request] = group {
        return vec![commit_one(pool, request).await];
    }
    match call(pool, group).await {
        Ok(results) => results,
        Err(_) => {
            let mut results = Vec::with_capacity(group.len());
            for request in group {
                results.push(commit_one(pool, request).await);
            }
            results
        }
    }
}

async fn commit_one(pool: &PgPool, request: &AppendRequest) -> Result<AppendOutcome, StoreError> {
    let only_any = request
        .streams
        .iter()
        .all(|(_, e)| *e == ExpectedVersion::Any);
    let mut attempts = 0;
    loop {
        match call(pool, &[request]).await {
            Ok(mut results) => {
                return results
                    .pop()
                    .unwrap_or_else(|| Err(StoreError::Backend("no result".into())));
            }
            Err(error) => match race_error(error, request) {
                // With no expectation the caller never saw a version; a race on the version
                // number is ours to retry, not theirs.
                StoreError::Conflict { .. } if only_any && attempts < 10 => attempts += 1,
                other => return Err(other),
            },
        }
    }
}

/// Runs `gatehouse_append` for a group and reads each command's outcome.
async fn call(
    pool: &PgPool,
    group: &[&AppendRequest],
) -> Result<Vec<Result<AppendOutcome, StoreError>>, sqlx::Error> {
    let mut a = GroupArrays::default();
    for request in group {
        a.push(request);
    }
    let answer: Vec<i64> = sqlx::query_scalar(
        "SELECT gatehouse_append($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, \
         $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28)",
    )
    .bind(&a.cmd_streams)
    .bind(&a.cmd_events)
    .bind(&a.cmd_claims)
    .bind(&a.cmd_releases)
    .bind(&a.m_recorded)
    .bind(&a.m_correlation)
    .bind(&a.m_causation)
    .bind(&a.m_actor)
    .bind(&a.m_ip)
    .bind(&a.m_user_agent)
    .bind(&a.s_types)
    .bind(&a.s_ids)
    .bind(&a.s_expected)
    .bind(&a.e_stream)
    .bind(&a.e_offset)
    .bind(&a.e_ids)
    .bind(&a.e_tenants)
    .bind(&a.e_types)
    .bind(&a.e_schemas)
    .bind(&a.e_payloads)
    .bind(&a.c_stream)
    .bind(&a.c_tenants)
    .bind(&a.c_scopes)
    .bind(&a.c_values)
    .bind(&a.r_stream)
    .bind(&a.r_tenants)
    .bind(&a.r_scopes)
    .bind(&a.r_values)
    .fetch_one(pool)
    .await?;

    let malformed = || sqlx::Error::Protocol("unexpected answer from gatehouse_append".into());
    let (&base, mut rest) = answer.split_first().ok_or_else(malformed)?;
    let mut position = base as u64;
    let mut results = Vec::with_capacity(group.len());
    for (k, request) in group.iter().enumerate() {
        let streams = request.streams.len();
        if rest.len() < 2 + streams {
            return Err(malformed());
        }
        let (status, detail, versions) = (rest[0], rest[1], &rest[2..2 + streams]);
        rest = &rest[2 + streams..];
        let first_event = a.event_offsets[k];
        results.push(match status {
            0 => Ok(AppendOutcome {
                events: request
                    .events
                    .iter()
                    .enumerate()
                    .map(|(i, (stream, _))| {
                        let version = versions[*stream] as u64 + a.e_offset[first_event + i] as u64;
                        (a.e_ids[first_event + i], position + i as u64, version)
                    })
                    .collect(),
            }),
            1 => {
                let local = (detail as usize).saturating_sub(1 + a.stream_offsets[k]);
                let (stream, expected) = request
                    .streams
                    .get(local)
                    .cloned()
                    .unwrap_or_else(|| request.streams[0].clone());
                Err(StoreError::Conflict {
                    stream,
                    expected: match expected {
                        ExpectedVersion::Exact(v) => v,
                        ExpectedVersion::Any => 0,
                    },
                    actual: versions.get(local).map(|v| *v as u64),
                })
            }
            _ => {
                let local = (detail as usize).saturating_sub(1 + a.claim_offsets[k]);
                let scope = request
                    .claims
                    .get(local)
                    .map(|(_, key)| key.scope.clone())
                    .unwrap_or_default();
                Err(StoreError::ClaimTaken { scope })
            }
        });
        position += request.events.len() as u64;
    }
    Ok(results)
}

/// The columns of a group of commands, one command after another.
#[derive(Default)]
struct GroupArrays {
    stream_offsets: Vec<usize>,
    event_offsets: Vec<usize>,
    claim_offsets: Vec<usize>,
    cmd_streams: Vec<i32>,
    cmd_events: Vec<i32>,
    cmd_claims: Vec<i32>,
    cmd_releases: Vec<i32>,
    m_recorded: Vec<DateTime<Utc>>,
    m_correlation: Vec<Uuid>,
    m_causation: Vec<Option<Uuid>>,
    m_actor: Vec<String>,
    m_ip: Vec<Option<String>>,
    m_user_agent: Vec<Option<String>>,
    s_types: Vec<String>,
    s_ids: Vec<Uuid>,
    s_expected: Vec<i64>,
    e_stream: Vec<i32>,
    e_offset: Vec<i32>,
    e_ids: Vec<Uuid>,
    e_tenants: Vec<Uuid>,
    e_types: Vec<String>,
    e_schemas: Vec<i32>,
    e_payloads: Vec<String>,
    c_stream: Vec<i32>,
    c_tenants: Vec<Uuid>,
    c_scopes: Vec<String>,
    c_values: Vec<String>,
    r_stream: Vec<i32>,
    r_tenants: Vec<Uuid>,
    r_scopes: Vec<String>,
    r_values: Vec<String>,
}

impl GroupArrays {
    fn push(&mut self, request: &AppendRequest) {
        let s0 = self.s_types.len();
        self.stream_offsets.push(s0);
        self.event_offsets.push(self.e_ids.len());
        self.claim_offsets.push(self.c_scopes.len());
        self.cmd_streams.push(request.streams.len() as i32);
        self.cmd_events.push(request.events.len() as i32);
        self.cmd_claims.push(request.claims.len() as i32);
        self.cmd_releases.push(request.releases.len() as i32);
        let metadata = &request.metadata;
        self.m_recorded.push(request.recorded_at);
        self.m_correlation.push(metadata.correlation_id);
        self.m_causation.push(metadata.causation_id);
        self.m_actor.push(metadata.actor.to_string());
        let context = metadata.context.as_ref();
        self.m_ip.push(context.and_then(|c| c.ip.clone()));
        self.m_user_agent
            .push(context.and_then(|c| c.user_agent.clone()));
        for (stream, expected) in &request.streams {
            self.s_types.push(stream.kind.clone());
            self.s_ids.push(stream.id);
            self.s_expected.push(match expected {
                ExpectedVersion::Any => -1,
                ExpectedVersion::Exact(v) => *v as i64,
            });
        }
        let mut per_stream = vec![0i32; request.streams.len()];
        for (stream, event) in &request.events {
            per_stream[*stream] += 1;
            self.e_stream.push((s0 + stream + 1) as i32);
            self.e_offset.push(per_stream[*stream]);
            self.e_ids.push(Uuid::now_v7());
            self.e_tenants.push(event.tenant_id);
            self.e_types.push(event.event_type.clone());
            self.e_schemas.push(event.schema_version as i32);
            self.e_payloads.push(event.payload.to_string());
        }
        for (owner, key) in &request.claims {
            self.c_stream.push((s0 + owner + 1) as i32);
            self.c_tenants.push(key.tenant_id);
            self.c_scopes.push(key.scope.clone());
            self.c_values.push(key.value.clone());
        }
        for (owner, key) in &request.releases {
            self.r_stream.push((s0 + owner + 1) as i32);
            self.r_tenants.push(key.tenant_id);
            self.r_scopes.push(key.scope.clone());
            self.r_values.push(key.value.clone());
        }
    }
}

/// Maps a race lost to a concurrent transaction (a unique violation) to a typed error.
fn race_error(error: sqlx::Error, request: &AppendRequest) -> StoreError {
    let Some(db) = error
        .as_database_error()
        .and_then(|e| e.try_downcast_ref::<PgDatabaseError>())
    else {
        return error.into();
    };
    match (db.code(), db.constraint()) {
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

/// Wakes local subscribers whenever another process (another store than `origin`) announces
/// an append.
async fn listen(pool: PgPool, changes: Arc<watch::Sender<u64>>, origin: String) {
    loop {
        let listener = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(CHANNEL).await?;
            loop {
                if listener.recv().await?.payload() != origin {
                    changes.send_modify(|n| *n = n.wrapping_add(1));
                }
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

/// Sends one NOTIFY per burst of local appends, outside their transactions, at most one
/// every [`NOTIFY_EVERY`]: under load one announcement covers many appends. Its payload is
/// `origin`, the store's id, which the store's own listener ignores.
async fn notify_others(pool: PgPool, appended: Arc<Notify>, origin: String) {
    loop {
        appended.notified().await;
        tokio::time::sleep(NOTIFY_EVERY).await;
        if let Err(error) = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(&origin)
            .execute(&pool)
            .await
        {
            tracing::warn!(%error, "could not announce appends to other processes");
        }
    }
}

#[async_trait]
impl EventStore for PgStore {
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError> {
        request.validate()?;
        let pending = |reply| Pending { request, reply };
        ask(&self.queue, pending, "append committers").await
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        bounds: StreamBounds,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let stream = stream.clone();
        let read = |reply| PendingRead {
            stream,
            bounds,
            reply,
        };
        ask(&self.reads, read, "stream readers").await
    }

    async fn read_all(
        &self,
        after: u64,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<ReadBatch, StoreError> {
        // One statement, one snapshot: the horizon and the events below it. Only the filters
        // in use appear in the SQL, the statement is planned with its actual values each time,
        // and the horizon is applied outside the ordered scan: a bounded range whose upper end
        // the planner cannot see is estimated tiny, and it would sort the whole range per batch.
        // If the scan crosses the horizon, every event below it is in the batch (it is ordered),
        // so resuming at the horizon stays exact.
        let mut conditions = String::new();
        let mut parameter = 2;
        let mut condition = |sql: &str| {
            parameter += 1;
            conditions.push_str(" AND ");
            conditions.push_str(&sql.replace('?', &format!("${parameter}")));
        };
        if filter.tenant_id.is_some() {
            condition("tenant_id = ?");
        }
        if !filter.stream_types.is_empty() {
            condition("stream_type = ANY(?)");
        }
        if !filter.event_types.is_empty() {
            condition("event_type = ANY(?)");
        }
        // Unfiltered (the process's log tail, rebuilds), the horizon rides on each row and the
        // rows at or past it are dropped here: that statement plans in half the time of the
        // join below, and it is planned for every read (the tail reads up to 500 times a
        // second). An empty read then cannot move the cursor to the horizon, which only a
        // filtered read needs (to skip the events it does not match).
        let sql = if conditions.is_empty() {
            format!(
                "SELECT (SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint << 20) AS horizon, \
                 {COLUMNS} FROM events WHERE position > $1 ORDER BY position LIMIT $2"
            )
        } else {
            format!(
                "WITH h AS (SELECT (pg_snapshot_xmin(pg_current_snapshot())::text::bigint << 20) AS horizon) \
                 SELECT h.horizon, e.* FROM h LEFT JOIN ( \
                   SELECT {COLUMNS} FROM events WHERE position > $1{conditions} \
                   ORDER BY position LIMIT $2) e ON e.position < h.horizon"
            )
        };
        let mut query = sqlx::query(&sql)
            .persistent(false)
            .bind(after as i64)
            .bind(limit as i64);
        if let Some(tenant) = filter.tenant_id {
            query = query.bind(tenant);
        }
        if !filter.stream_types.is_empty() {
            query = query.bind(&filter.stream_types);
        }
        if !filter.event_types.is_empty() {
            query = query.bind(&filter.event_types);
        }
        // Decode rows as they arrive, while the server is still sending the rest.
        let mut rows = query.fetch(&self.pool);
        let mut horizon: Option<i64> = None;
        let mut events = Vec::with_capacity(limit.min(16_384));
        while let Some(row) = rows.next().await {
            let row = row?;
            let below = *horizon.get_or_insert(row.try_get_unchecked(0)?);
            if row
                .try_get_unchecked::<Option<i64>, _>(1)?
                .is_some_and(|position| position < below)
            {
                events.push(decode(&row, 1)?);
            }
        }
        let Some(horizon) = horizon else {
            return Ok(ReadBatch {
                events: Vec::new(),
                next: after,
            });
        };
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
        row.map(|row| {
            Ok(StreamId {
                kind: row.try_get(0)?,
                id: row.try_get(1)?,
            })
        })
        .transpose()
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
            Ok((
                version as u64,
                row.try_get::<sqlx::types::Json<Value>, _>(1)?.0,
            ))
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

    async fn put_subject_key(
        &self,
        subject_id: Uuid,
        tenant_id: Uuid,
        wrapped_key: Vec<u8>,
    ) -> Result<Vec<u8>, StoreError> {
        sqlx::query(
            "INSERT INTO subject_keys (subject_id, tenant_id, wrapped_key) VALUES ($1, $2, $3) \
             ON CONFLICT (subject_id) DO NOTHING",
        )
        .bind(subject_id)
        .bind(tenant_id)
        .bind(&wrapped_key)
        .execute(&self.pool)
        .await?;
        self.subject_key(subject_id)
            .await?
            .ok_or_else(|| StoreError::Backend("subject key vanished".into()))
    }

    async fn subject_key(&self, subject_id: Uuid) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT wrapped_key FROM subject_keys WHERE subject_id = $1")
                .bind(subject_id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn destroy_subject_key(&self, subject_id: Uuid) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM subject_keys WHERE subject_id = $1")
            .bind(subject_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn load_checkpoint(&self, name: &str) -> Result<Option<u64>, StoreError> {
        let position: Option<i64> =
            sqlx::query_scalar("SELECT position FROM checkpoints WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?;
        Ok(position.map(|p| p as u64))
    }

    async fn save_checkpoint(&self, name: &str, position: u64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO checkpoints (name, position) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET position = EXCLUDED.position",
        )
        .bind(name)
        .bind(position as i64)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn save_seals(&self, seals: Vec<Seal>, sealed_up_to: u64) -> Result<(), StoreError> {
        detached(save_seals(self.pool.clone(), seals, sealed_up_to)).await
    }

    async fn read_seals(
        &self,
        tenant_id: Option<Uuid>,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Seal>, StoreError> {
        let rows = sqlx::query(
            "SELECT position, tenant_id, hash FROM event_seals WHERE position > $1 \
             AND ($2::uuid IS NULL OR tenant_id = $2) ORDER BY position LIMIT $3",
        )
        .bind(after as i64)
        .bind(tenant_id)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode_seal).collect()
    }

    async fn last_seal(
        &self,
        tenant_id: Uuid,
        at_or_before: u64,
    ) -> Result<Option<Seal>, StoreError> {
        let row = sqlx::query(
            "SELECT position, tenant_id, hash FROM event_seals WHERE tenant_id = $1 \
             AND position <= $2 ORDER BY position DESC LIMIT 1",
        )
        .bind(tenant_id)
        .bind(at_or_before as i64)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(decode_seal).transpose()
    }

    async fn save_integrity_checkpoint(
        &self,
        checkpoint: &SignedCheckpoint,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO integrity_checkpoints (tenant_id, position, head, signed_at, key_id, signature) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .bind(checkpoint.tenant_id)
        .bind(checkpoint.position as i64)
        .bind(checkpoint.head.to_vec())
        .bind(checkpoint.signed_at)
        .bind(&checkpoint.key_id)
        .bind(&checkpoint.signature)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn integrity_checkpoints(
        &self,
        tenant_id: Option<Uuid>,
    ) -> Result<Vec<SignedCheckpoint>, StoreError> {
        let rows = sqlx::query(
            "SELECT tenant_id, position, head, signed_at, key_id, signature FROM integrity_checkpoints \
             WHERE $1::uuid IS NULL OR tenant_id = $1 ORDER BY position",
        )
        .bind(tenant_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(SignedCheckpoint {
                    tenant_id: row.try_get(0)?,
                    position: row.try_get::<i64, _>(1)? as u64,
                    head: hash_of(row.try_get(2)?)?,
                    signed_at: row.try_get(3)?,
                    key_id: row.try_get(4)?,
                    signature: row.try_get(5)?,
                })
            })
            .collect()
    }

    async fn import(&self, events: Vec<RecordedEvent>) -> Result<(), StoreError> {
        detached(import(self.pool.clone(), events)).await?;
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
        Ok(())
    }

    async fn read_model_commit(
        &self,
        fence: Option<Statement>,
        writes: Vec<Write>,
    ) -> Result<bool, StoreError> {
        detached(commit_read_model(self.pool.clone(), fence, writes)).await
    }

    async fn read_model_query(&self, query: Statement) -> Result<Vec<Vec<SqlValue>>, StoreError> {
        let sql = numbered(&query.sql);
        let rows = bind_all(&sql, &query.params, false)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                (0..row.len())
                    .map(|i| {
                        if let Ok(value) = row.try_get::<Option<i64>, _>(i) {
                            Ok(SqlValue::Int(value.unwrap_or(0)))
                        } else if let Ok(value) = row.try_get::<Option<i32>, _>(i) {
                            Ok(SqlValue::Int(i64::from(value.unwrap_or(0))))
                        } else {
                            let text = match row.try_get::<Option<String>, _>(i) {
                                Ok(text) => text,
                                // A `UUID` column reads as text, as it does on SQLite.
                                Err(error) => row
                                    .try_get::<Option<Uuid>, _>(i)
                                    .map_err(|_| error)?
                                    .map(|id| id.to_string()),
                            };
                            Ok(SqlValue::Text(text.unwrap_or_default()))
                        }
                    })
                    .collect()
            })
            .collect()
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn poll_interval(&self) -> Duration {
        Duration::from_millis(50)
    }

    fn tail(&self) -> &crate::subscription::Tail {
        &self.tail
    }

    fn backend(&self) -> &'static str {
        "postgres"
    }
}

/// The columns of an import.
#[derive(Default)]
struct ImportArrays {
    ids: Vec<Uuid>,
    tenants: Vec<Uuid>,
    stream_types: Vec<String>,
    stream_ids: Vec<Uuid>,
    versions: Vec<i64>,
    event_types: Vec<String>,
    schemas: Vec<i32>,
    recorded: Vec<DateTime<Utc>>,
    correlations: Vec<Uuid>,
    causations: Vec<Option<Uuid>>,
    actors: Vec<String>,
    ips: Vec<Option<String>>,
    user_agents: Vec<Option<String>>,
    payloads: Vec<String>,
}

impl ImportArrays {
    fn push(&mut self, event: &RecordedEvent) {
        let context = event.context.as_ref();
        self.ids.push(event.id);
        self.tenants.push(event.tenant_id);
        self.stream_types.push(event.stream.kind.clone());
        self.stream_ids.push(event.stream.id);
        self.versions.push(event.version as i64);
        self.event_types.push(event.event_type.clone());
        self.schemas.push(event.schema_version as i32);
        self.recorded.push(event.recorded_at);
        self.correlations.push(event.correlation_id);
        self.causations.push(event.causation_id);
        self.actors.push(event.actor.to_string());
        self.ips.push(context.and_then(|c| c.ip.clone()));
        self.user_agents
            .push(context.and_then(|c| c.user_agent.clone()));
        self.payloads.push(event.payload.get().to_owned());
    }
}

/// Imported events in transactions of 100 000.
async fn import(pool: PgPool, events: Vec<RecordedEvent>) -> Result<(), StoreError> {
    // One transaction per 100 000 events: positions are (transaction id << 20) + index,
    // like appends, so imported events stay below everything appended later.
    for chunk in events.chunks(100_000) {
        let mut a = ImportArrays::default();
        for event in chunk {
            a.push(event);
        }
        let mut tx = pool.begin().await?;
        sqlx::query(
            "INSERT INTO events (position, event_id, tenant_id, stream_type, stream_id, version, \
             event_type, schema_version, recorded_at, correlation_id, causation_id, actor, client_ip, \
             user_agent, payload) \
             SELECT (txid_current() << 20) + e.ord, e.id, e.tenant, e.stype, e.sid, e.version, \
             e.etype, e.schema, e.recorded, e.corr, e.caus, e.actor, e.ip, e.ua, e.payload::jsonb \
             FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::uuid[], $5::bigint[], $6::text[], \
             $7::int[], $8::timestamptz[], $9::uuid[], $10::uuid[], $11::text[], $12::text[], \
             $13::text[], $14::text[]) WITH ORDINALITY \
             AS e(id, tenant, stype, sid, version, etype, schema, recorded, corr, caus, actor, ip, ua, payload, ord)",
        )
        .bind(&a.ids)
        .bind(&a.tenants)
        .bind(&a.stream_types)
        .bind(&a.stream_ids)
        .bind(&a.versions)
        .bind(&a.event_types)
        .bind(&a.schemas)
        .bind(&a.recorded)
        .bind(&a.correlations)
        .bind(&a.causations)
        .bind(&a.actors)
        .bind(&a.ips)
        .bind(&a.user_agents)
        .bind(&a.payloads)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
    }
    Ok(())
}

/// The seals of a batch and the sealer's new checkpoint, in one transaction.
async fn save_seals(pool: PgPool, seals: Vec<Seal>, sealed_up_to: u64) -> Result<(), StoreError> {
    let positions: Vec<i64> = seals.iter().map(|s| s.position as i64).collect();
    let tenants: Vec<Uuid> = seals.iter().map(|s| s.tenant_id).collect();
    let hashes: Vec<Vec<u8>> = seals.iter().map(|s| s.hash.to_vec()).collect();
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO event_seals (position, tenant_id, hash) \
         SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::bytea[]) ON CONFLICT DO NOTHING",
    )
    .bind(&positions)
    .bind(&tenants)
    .bind(&hashes)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO checkpoints (name, position) VALUES ($1, $2) ON CONFLICT (name) \
         DO UPDATE SET position = greatest(checkpoints.position, EXCLUDED.position)",
    )
    .bind(SEALER_CHECKPOINT)
    .bind(sealed_up_to as i64)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Runs `work`, a transaction, on a task of its own and waits for it. A caller that stops
/// waiting (a cancelled request, an aborted runner) leaves it to commit or roll back by
/// itself: sqlx (0.8.6, 0.9.0) returns a connection whose `BEGIN` was cancelled to the pool
/// still inside that transaction (transact-rs/sqlx#4393), and the next borrower's statements,
/// an append among them, would run in it and never commit.
async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::spawn(work)
        .await
        .map_err(|e| StoreError::Backend(format!("a transaction's task failed: {e}")))?
}

/// Read-model writes in one transaction, after the fence.
async fn commit_read_model(
    pool: PgPool,
    fence: Option<Statement>,
    writes: Vec<Write>,
) -> Result<bool, StoreError> {
    let mut tx = pool.begin().await?;
    if let Some(fence) = fence {
        let found = if fence.is_check() {
            let sql = format!("{} FOR SHARE", numbered(&fence.sql));
            bind_all(&sql, &fence.params, true)
                .fetch_all(&mut *tx)
                .await?
                .len() as u64
        } else {
            let sql = numbered(&fence.sql);
            bind_all(&sql, &fence.params, true)
                .execute(&mut *tx)
                .await?
                .rows_affected()
        };
        if found != 1 {
            tx.rollback().await?;
            return Ok(false);
        }
    }
    for write in writes {
        match write {
            Write::Sql(statement) => {
                // Scripts without parameters (DDL) run one statement at a time.
                let parts: Vec<String> = if statement.params.is_empty() {
                    statement
                        .sql
                        .split(';')
                        .filter(|part| !part.trim().is_empty())
                        .map(str::to_string)
                        .collect()
                } else {
                    vec![numbered(&statement.sql)]
                };
                for sql in &parts {
                    bind_all(sql, &statement.params, false)
                        .execute(&mut *tx)
                        .await?;
                }
            }
            Write::Rows(rows) => {
                let len = rows.checked_len()?;
                if len == 0 {
                    continue;
                }
                if rows.on_conflict.is_empty() {
                    copy_rows(&mut tx, &rows, len).await?;
                    continue;
                }
                // Prepared once per connection and table: the statement has no plan to
                // choose (it reads its arrays and inserts), so a generic plan is as good as
                // planning it again for every batch.
                let sql = unnest_sql(&rows);
                let mut query = sqlx::query(&sql);
                for column in rows.values {
                    query = match column {
                        Column::Int(values) => query.bind(values),
                        Column::Text(values) => query.bind(values),
                        Column::Uuid(values) => query.bind(values),
                    };
                }
                query.execute(&mut *tx).await?;
            }
        }
    }
    tx.commit().await?;
    Ok(true)
}

/// Plain rows (no conflict to handle: a rebuild loading a table before its keys) go in with
/// `COPY … FROM STDIN`, in text format so that each value is parsed by its column's type.
/// The `INSERT … SELECT FROM UNNEST` of the other rows makes PostgreSQL receive every column
/// as an array, unnest it into a tuple store and read that back; `COPY` forms the tuples as
/// it parses them (`psql`, 225 000 counter rows: 0.13 s against 0.29 – 0.45 s).
async fn copy_rows(
    connection: &mut sqlx::PgConnection,
    rows: &Rows,
    len: usize,
) -> Result<(), StoreError> {
    /// Bytes sent to the server at a time.
    const CHUNK: usize = 1 << 20;
    let mut copy = connection
        .copy_in_raw(&format!(
            "COPY {} ({}) FROM STDIN",
            rows.table,
            rows.columns.join(", ")
        ))
        .await?;
    let mut data = Vec::with_capacity(CHUNK + 4096);
    for row in 0..len {
        for (i, column) in rows.values.iter().enumerate() {
            if i > 0 {
                data.push(b'\t');
            }
            match column {
                Column::Int(values) => {
                    use std::io::Write as _;
                    // Writing to a vector cannot fail.
                    let _ = write!(data, "{}", values[row]);
                }
                Column::Text(values) => copy_text(&mut data, &values[row]),
                Column::Uuid(values) => data.extend_from_slice(
                    values[row]
                        .hyphenated()
                        .encode_lower(&mut Uuid::encode_buffer())
                        .as_bytes(),
                ),
            }
        }
        data.push(b'\n');
        if data.len() >= CHUNK {
            copy.send(std::mem::take(&mut data)).await?;
            data.reserve(CHUNK + 4096);
        }
    }
    if !data.is_empty() {
        copy.send(data).await?;
    }
    copy.finish().await?;
    Ok(())
}

/// `text` as a value of `COPY`'s text format: a backslash, tab, newline or carriage return is
/// escaped with a backslash (no value is NULL, so `\N` never appears unescaped).
fn copy_text(data: &mut Vec<u8>, text: &str) {
    if !text
        .bytes()
        .any(|b| matches!(b, b'\\' | b'\t' | b'\n' | b'\r'))
    {
        data.extend_from_slice(text.as_bytes());
        return;
    }
    for byte in text.bytes() {
        match byte {
            b'\\' => data.extend_from_slice(b"\\\\"),
            b'\t' => data.extend_from_slice(b"\\t"),
            b'\n' => data.extend_from_slice(b"\\n"),
            b'\r' => data.extend_from_slice(b"\\r"),
            _ => data.push(byte),
        }
    }
}

/// `INSERT … SELECT * FROM UNNEST($1::bigint[], $2::text[], …) …`: every row of `rows` in one
/// statement of constant size.
fn unnest_sql(rows: &Rows) -> String {
    let arrays: Vec<String> = rows
        .values
        .iter()
        .enumerate()
        .map(|(i, column)| {
            let kind = match column {
                Column::Int(_) => "bigint",
                Column::Text(_) => "text",
                Column::Uuid(_) => "uuid",
            };
            format!("${}::{kind}[]", i + 1)
        })
        .collect();
    format!(
        "INSERT INTO {} ({}) SELECT * FROM UNNEST({}) {}",
        rows.table,
        rows.columns.join(", "),
        arrays.join(", "),
        rows.on_conflict
    )
}

/// A read-model statement with its values bound, placeholders numbered; `prepared` keeps it
/// prepared on the connection, for statements whose plan cannot go wrong when it is reused:
/// fences, which read the projections' registry, a few rows. (A read-model table may be
/// empty when a plan is made and large later, so other statements are planned each time.)
fn bind_all<'a>(
    sql: &'a str,
    params: &'a [SqlValue],
    prepared: bool,
) -> sqlx::query::Query<'a, sqlx::Postgres, sqlx::postgres::PgArguments> {
    let mut query = sqlx::query(sql).persistent(prepared);
    for value in params {
        query = match value {
            SqlValue::Int(value) => query.bind(*value),
            SqlValue::Text(text) => query.bind(text.clone()),
            SqlValue::Uuid(id) => query.bind(*id),
        };
    }
    query
}

fn hash_of(bytes: Vec<u8>) -> Result<Hash, StoreError> {
    bytes
        .try_into()
        .map_err(|_| StoreError::Backend("a seal is not 32 bytes".into()))
}

fn decode_seal(row: &PgRow) -> Result<Seal, StoreError> {
    Ok(Seal {
        position: row.try_get::<i64, _>(0)? as u64,
        tenant_id: row.try_get(1)?,
        hash: hash_of(row.try_get(2)?)?,
    })
}

/// Decodes the event columns starting at `offset`.
///
/// The columns' types are fixed by the migrations and [`COLUMNS`], so each value is decoded
/// without sqlx's per-value type check (`try_get_unchecked`): over a rebuild's million rows
/// that check cost about as much as decoding the values (`perf`). A column whose type changed
/// would mostly fail to decode (the binary formats differ in length or encoding), and every
/// test that reads an event from PostgreSQL decodes it here.
fn decode(row: &PgRow, offset: usize) -> Result<RecordedEvent, StoreError> {
    let actor: &str = row.try_get_unchecked(offset + 11)?;
    let ip: Option<String> = row.try_get_unchecked(offset + 12)?;
    let user_agent: Option<String> = row.try_get_unchecked(offset + 13)?;
    Ok(RecordedEvent {
        position: row.try_get_unchecked::<i64, _>(offset)? as u64,
        id: row.try_get_unchecked(offset + 1)?,
        tenant_id: row.try_get_unchecked(offset + 2)?,
        stream: StreamId {
            kind: row.try_get_unchecked(offset + 3)?,
            id: row.try_get_unchecked(offset + 4)?,
        },
        version: row.try_get_unchecked::<i64, _>(offset + 5)? as u64,
        event_type: row.try_get_unchecked(offset + 6)?,
        schema_version: row.try_get_unchecked::<i32, _>(offset + 7)? as u32,
        recorded_at: row.try_get_unchecked(offset + 8)?,
        correlation_id: row.try_get_unchecked(offset + 9)?,
        causation_id: row.try_get_unchecked(offset + 10)?,
        actor: actor.parse::<Actor>().map_err(StoreError::Backend)?,
        context: (ip.is_some() || user_agent.is_some()).then_some(ClientContext { ip, user_agent }),
        payload: row
            .try_get_unchecked::<sqlx::types::Json<Box<serde_json::value::RawValue>>, _>(
                offset + 14,
            )?
            .0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Metadata;
    use crate::store::StreamBounds;
    use crate::testing::counted as event;
    use serde_json::json;

    /// A store's listener wakes its subscribers for announcements of other stores, and not for
    /// its own (its subscribers were woken when it committed).
    #[tokio::test]
    async fn a_store_hears_other_stores_announce_appends_and_not_itself()
    -> Result<(), Box<dyn std::error::Error>> {
        let Some(url) = crate::testing::fresh_postgres_url().await? else {
            return Ok(());
        };
        let pool = PgPool::connect(&url).await?;
        let changes = Arc::new(watch::channel(0u64).0);
        let mut heard = changes.subscribe();
        let listener = tokio::spawn(listen(pool.clone(), changes.clone(), "me".into()));
        let announce = |origin: &'static str| {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANNEL)
                .bind(origin)
                .execute(&pool)
        };
        // Until the listener is listening, announcements are lost: repeat one until heard.
        let mut ready = false;
        for _ in 0..30 {
            announce("another").await?;
            if tokio::time::timeout(Duration::from_secs(1), heard.changed())
                .await
                .is_ok()
            {
                ready = true;
                break;
            }
        }
        assert!(ready, "the listener never heard another store");
        // Let any repeat still on its way land, then count from here.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = *heard.borrow_and_update();
        // Its own announcement, then another's: delivered in that order.
        announce("me").await?;
        announce("another").await?;
        tokio::time::timeout(Duration::from_secs(10), heard.changed()).await??;
        // An increment for its own would have come first; give a wrong one time to show.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            *heard.borrow(),
            before + 1,
            "only the other store's announcement wakes subscribers"
        );
        listener.abort();
        Ok(())
    }

    /// One group whose commands touch the same streams, with a stale expectation and a taken
    /// claim among them: each command sees the versions the earlier accepted ones left, the
    /// refused ones write nothing and leave nothing behind, and positions follow the group.
    #[tokio::test]
    async fn a_group_applies_each_command_on_the_versions_the_earlier_ones_left()
    -> Result<(), Box<dyn std::error::Error>> {
        let Some(url) = crate::testing::fresh_postgres_url().await? else {
            return Ok(());
        };
        let store = PgStore::connect(&url).await?;
        let tenant = Uuid::now_v7();
        let (a, b) = (
            StreamId::new("group", Uuid::now_v7()),
            StreamId::new("group", Uuid::now_v7()),
        );
        let key = ClaimKey {
            tenant_id: tenant,
            scope: "email".into(),
            value: "ada@example.com".into(),
        };
        let mut first = AppendRequest::new(Metadata::system());
        first.expect(&a, ExpectedVersion::Exact(0));
        first.push(event(tenant, &a, 1)).push(event(tenant, &a, 2));
        first.claim(&a, key.clone());
        // Stale: `first` took `a` to version 2.
        let mut stale = AppendRequest::new(Metadata::system());
        stale.expect(&a, ExpectedVersion::Exact(0));
        stale.push(event(tenant, &a, 99));
        // The claim `first` took.
        let mut claimed = AppendRequest::new(Metadata::system());
        claimed.push(event(tenant, &b, 98));
        claimed.claim(&b, key.clone());
        let mut both = AppendRequest::new(Metadata::system());
        both.expect(&a, ExpectedVersion::Exact(2));
        both.push(event(tenant, &b, 3)).push(event(tenant, &a, 4));
        both.push(event(tenant, &b, 5));
        let mut last = AppendRequest::new(Metadata::system());
        last.expect(&b, ExpectedVersion::Exact(2));
        last.push(event(tenant, &b, 6));

        let results = call(&store.pool, &[&first, &stale, &claimed, &both, &last]).await?;
        let outcomes: Vec<_> = results.iter().map(|r| r.as_ref().ok()).collect();
        let first_outcome = outcomes[0].ok_or("first refused")?;
        assert_eq!(
            first_outcome.events.iter().map(|e| e.2).collect::<Vec<_>>(),
            [1, 2]
        );
        assert!(
            matches!(&results[1], Err(StoreError::Conflict { stream, expected: 0, actual: Some(2) }) if *stream == a),
            "{:?}",
            results[1]
        );
        assert!(
            matches!(&results[2], Err(StoreError::ClaimTaken { scope }) if scope == "email"),
            "{:?}",
            results[2]
        );
        let both_outcome = outcomes[3].ok_or("both refused")?;
        assert_eq!(
            both_outcome.events.iter().map(|e| e.2).collect::<Vec<_>>(),
            [1, 3, 2]
        );
        let last_outcome = outcomes[4].ok_or("last refused")?;
        assert_eq!(last_outcome.events[0].2, 3);

        let payloads = |events: Vec<RecordedEvent>| -> Vec<(u64, u64, Value)> {
            events
                .into_iter()
                .map(|e| {
                    let payload = serde_json::from_str(e.payload.get()).unwrap_or(Value::Null);
                    (e.version, e.position, payload)
                })
                .collect()
        };
        let stored_a = payloads(store.read_stream(&a, StreamBounds::default()).await?);
        let stored_b = payloads(store.read_stream(&b, StreamBounds::default()).await?);
        let counted = |n: u32| json!({ "n": n });
        let at = |outcome: &AppendOutcome, i: usize| outcome.events[i].1;
        assert_eq!(
            stored_a,
            [
                (1, at(first_outcome, 0), counted(1)),
                (2, at(first_outcome, 1), counted(2)),
                (3, at(both_outcome, 1), counted(4)),
            ]
        );
        assert_eq!(
            stored_b,
            [
                (1, at(both_outcome, 0), counted(3)),
                (2, at(both_outcome, 2), counted(5)),
                (3, at(last_outcome, 0), counted(6)),
            ]
        );
        assert_eq!(store.claim_owner(&key).await?, Some(a));
        // Positions follow the group's order, the refused commands' left unused.
        let positions: Vec<u64> = [first_outcome, both_outcome, last_outcome]
            .iter()
            .flat_map(|o| o.events.iter().map(|e| e.1))
            .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
        let refused: u64 = 2;
        assert_eq!(positions[5] - positions[0], 5 + refused);
        Ok(())
    }

    /// Reads grouped into one query give each stream what a read of it alone gives, bounds
    /// included, whatever else shares the group; and many concurrent reads through the store
    /// (grouped as they queue) each get their own stream's events.
    #[tokio::test]
    async fn grouped_reads_give_what_each_read_alone_gives()
    -> Result<(), Box<dyn std::error::Error>> {
        let Some(url) = crate::testing::fresh_postgres_url().await? else {
            return Ok(());
        };
        let store = PgStore::connect(&url).await?;
        let tenant = Uuid::now_v7();
        let streams: Vec<StreamId> = (0..40)
            .map(|_| StreamId::new("grouped", Uuid::now_v7()))
            .collect();
        for (k, stream) in streams.iter().enumerate() {
            let mut request = AppendRequest::new(Metadata::system());
            for n in 0..(k % 5) as u64 {
                request.push(event(tenant, stream, 100 * k as u64 + n));
            }
            if !request.events.is_empty() {
                store.append(request).await?;
            }
        }
        let a = &streams[4];
        let mid = store.read_stream(a, StreamBounds::default()).await?[1].clone();
        let never = StreamId::new("grouped", Uuid::now_v7());
        let bounded = [
            (a, StreamBounds::default()),
            (
                a,
                StreamBounds {
                    after_version: 1,
                    ..StreamBounds::default()
                },
            ),
            (
                a,
                StreamBounds {
                    up_to_position: Some(mid.position),
                    ..StreamBounds::default()
                },
            ),
            (
                a,
                StreamBounds {
                    after_version: 1,
                    up_to_time: Some(mid.recorded_at),
                    ..StreamBounds::default()
                },
            ),
            (&never, StreamBounds::default()),
            (&streams[3], StreamBounds::default()),
            (
                &streams[3],
                StreamBounds {
                    after_version: 3,
                    ..StreamBounds::default()
                },
            ),
        ];
        let key = |events: &[RecordedEvent]| -> Vec<(String, Uuid, u64, u64, String)> {
            events
                .iter()
                .map(|e| {
                    let payload = e.payload.get().to_string();
                    (
                        e.stream.kind.clone(),
                        e.stream.id,
                        e.version,
                        e.position,
                        payload,
                    )
                })
                .collect()
        };
        let grouped = read_group(&store.pool, &bounded).await?;
        assert_eq!(grouped.len(), bounded.len());
        for ((stream, bounds), got) in bounded.iter().zip(&grouped) {
            let alone = read_one(&store.pool, stream, *bounds).await?;
            assert_eq!(key(got), key(&alone), "{stream} {bounds:?}");
        }
        let versions =
            |events: &[RecordedEvent]| events.iter().map(|e| e.version).collect::<Vec<_>>();
        assert_eq!(versions(&grouped[0]), [1, 2, 3, 4]);
        assert_eq!(versions(&grouped[1]), [2, 3, 4]);
        assert_eq!(versions(&grouped[2]), [1, 2]);
        assert!(grouped[4].is_empty() && grouped[6].is_empty());

        let reads = streams.iter().cycle().take(400).map(|stream| {
            let store = &store;
            async move {
                let events = store.read_stream(stream, StreamBounds::default()).await?;
                Ok::<_, StoreError>((stream, events))
            }
        });
        for result in futures::future::join_all(reads).await {
            let (stream, events) = result?;
            let k = streams
                .iter()
                .position(|s| s == stream)
                .ok_or("unknown stream")?;
            let expected: Vec<Value> = (0..(k % 5) as u64)
                .map(|n| json!({ "n": 100 * k as u64 + n }))
                .collect();
            let payloads: Vec<Value> = events
                .iter()
                .map(|e| serde_json::from_str(e.payload.get()))
                .collect::<Result<_, _>>()?;
            assert_eq!(payloads, expected, "{stream}");
            assert!(events.iter().all(|e| e.stream == *stream));
        }
        Ok(())
    }
}
