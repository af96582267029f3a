//! SQLite backend: the embedded default, on `rusqlite`.
//!
//! # Why rusqlite and a dedicated writer thread
//!
//! SQLite has one writer at a time, so positions are dense and in commit order for free. We
//! lean into that: one OS thread owns the write connection and drains a queue of appends,
//! running each in its own `SAVEPOINT` inside one transaction per batch (group commit: one
//! fsync for many commands, each command still all-or-nothing and answered on its own).
//! Reads run on a small pool of read connections on tokio's blocking pool. `rusqlite` reads
//! several times faster than sqlx's SQLite driver (see README, benchmarks).
//!
//! Durability: WAL with `synchronous=FULL`: an append is on disk before its caller hears of it.

use crate::envelope::{
    Actor, AppendRequest, ClaimKey, ClientContext, ExpectedVersion, RecordedEvent, StreamId,
};
use crate::error::StoreError;
use crate::integrity::{Hash, SEALER_CHECKPOINT, Seal, SignedCheckpoint};
use crate::readmodel::{Column, Rows, SqlValue, Statement, Write};
use crate::store::{AppendOutcome, EventFilter, EventStore, ReadBatch, StreamBounds};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params, params_from_iter};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/sqlite/0001_event_log.sql"),
    include_str!("../migrations/sqlite/0002_subject_keys_and_checkpoints.sql"),
    include_str!("../migrations/sqlite/0003_integrity.sql"),
    include_str!("../migrations/sqlite/0004_projections.sql"),
    include_str!("../migrations/sqlite/0005_worker_leases.sql"),
];
const COLUMNS: &str = "position, event_id, tenant_id, stream_type, stream_id, version, event_type, \
    schema_version, recorded_at, correlation_id, causation_id, actor, client_ip, user_agent, payload";
/// Appends committed together at most.
const GROUP_COMMIT: usize = 256;
/// Read connections kept open.
const READERS: usize = 4;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// A write other than an append, run in its own savepoint in the writer's transaction.
type WriteFn = Box<dyn FnOnce(&Connection) -> Result<(), StoreError> + Send>;

enum Job {
    Append(Box<AppendRequest>, Reply<AppendOutcome>),
    Write(WriteFn, Reply<()>),
}

/// The SQLite event store.
pub struct SqliteStore {
    jobs: mpsc::Sender<Job>,
    readers: Arc<Mutex<Vec<Connection>>>,
    path: PathBuf,
    changes: Arc<watch::Sender<u64>>,
    tail: crate::subscription::Tail,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file, applies migrations and starts the writer.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| StoreError::Backend(format!("{}: {e}", parent.display())))?;
        }
        let writer_path = path.clone();
        let mut writer = tokio::task::spawn_blocking(move || open_writer(&writer_path))
            .await
            .map_err(|e| StoreError::Backend(e.to_string()))??;
        let changes = Arc::new(watch::channel(0u64).0);
        let (jobs, mut queue) = mpsc::channel::<Job>(4096);
        let writer_changes = changes.clone();
        std::thread::Builder::new()
            .name("gatehouse-sqlite-writer".into())
            .spawn(move || {
                while let Some(first) = queue.blocking_recv() {
                    let mut group = vec![first];
                    while group.len() < GROUP_COMMIT {
                        match queue.try_recv() {
                            Ok(job) => group.push(job),
                            Err(_) => break,
                        }
                    }
                    if commit_group(&mut writer, group) {
                        writer_changes.send_modify(|n| *n = n.wrapping_add(1));
                    }
                }
            })
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        Ok(SqliteStore {
            jobs,
            readers: Arc::new(Mutex::new(Vec::new())),
            path,
            changes,
            tail: Default::default(),
        })
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn submit<T>(&self, job: impl FnOnce(Reply<T>) -> Job) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(job(reply))
            .await
            .map_err(|_| StoreError::Backend("the SQLite writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Backend("the SQLite writer has stopped".into()))?
    }

    /// Runs a write on the writer thread, in its own savepoint of the next group.
    async fn write(
        &self,
        write: impl FnOnce(&Connection) -> Result<(), StoreError> + Send + 'static,
    ) -> Result<(), StoreError> {
        self.submit(|reply| Job::Write(Box::new(write), reply))
            .await
    }

    /// Runs `read` on a pooled read connection on the blocking pool.
    async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let readers = self.readers.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let pooled = readers.lock().map_err(|_| poisoned())?.pop();
            let connection = match pooled {
                Some(connection) => connection,
                None => open_reader(&path)?,
            };
            let result = read(&connection);
            let mut pool = readers.lock().map_err(|_| poisoned())?;
            if pool.len() < READERS {
                pool.push(connection);
            }
            result
        })
        .await
        .map_err(|e| StoreError::Backend(e.to_string()))?
    }
}

fn poisoned() -> StoreError {
    StoreError::Backend("reader pool lock poisoned".into())
}

fn configure(connection: &Connection) -> Result<(), StoreError> {
    connection.busy_timeout(Duration::from_secs(10))?;
    connection.pragma_update(None, "journal_mode", "WAL")?;
    connection.pragma_update(None, "synchronous", "FULL")?;
    Ok(())
}

fn open_writer(path: &Path) -> Result<Connection, StoreError> {
    let mut connection = Connection::open(path)?;
    configure(&connection)?;
    let tx = connection.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let applied: usize = tx.pragma_query_value(None, "user_version", |row| row.get(0))?;
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(applied) {
        tx.execute_batch(migration)?;
        tx.pragma_update(None, "user_version", index + 1)?;
    }
    tx.commit()?;
    Ok(connection)
}

fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let connection = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    connection.busy_timeout(Duration::from_secs(10))?;
    Ok(connection)
}

/// Commits a group of jobs in one transaction, each in its own savepoint. Returns whether
/// anything was appended.
fn commit_group(connection: &mut Connection, group: Vec<Job>) -> bool {
    if let Err(error) = connection.execute_batch("BEGIN IMMEDIATE") {
        for job in group {
            job.answer().error(StoreError::Backend(error.to_string()));
        }
        return false;
    }
    // Answers wait for the commit: nobody hears "appended" before it is durable.
    let mut done = Vec::with_capacity(group.len());
    for job in group {
        done.push(match job {
            Job::Append(request, reply) => (
                Answer::Append(reply),
                in_savepoint(connection, |c| append_in(c, &request).map(Some)),
            ),
            Job::Write(write, reply) => (
                Answer::Write(reply),
                in_savepoint(connection, |c| write(c).map(|()| None)),
            ),
        });
    }
    if let Err(error) = connection.execute_batch("COMMIT") {
        let _ = connection.execute_batch("ROLLBACK");
        for (answer, _) in done {
            answer.error(StoreError::Backend(format!("commit failed: {error}")));
        }
        return false;
    }
    let mut appended = false;
    for (answer, result) in done {
        match (answer, result) {
            (Answer::Append(reply), Ok(outcome)) => {
                appended = true;
                let _ = reply.send(outcome.ok_or_else(|| StoreError::Backend("no outcome".into())));
            }
            (Answer::Write(reply), Ok(_)) => {
                let _ = reply.send(Ok(()));
            }
            (answer, Err(error)) => answer.error(error),
        }
    }
    appended
}

/// Runs one job in a savepoint: all of it, or (on error) none of it.
fn in_savepoint<T>(
    connection: &Connection,
    job: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    connection.execute_batch("SAVEPOINT job")?;
    let result = job(connection);
    if result.is_err() {
        connection.execute_batch("ROLLBACK TO job")?;
    }
    connection.execute_batch("RELEASE job")?;
    result
}

/// Where a job's result goes.
enum Answer {
    Append(Reply<AppendOutcome>),
    Write(Reply<()>),
}

impl Answer {
    fn error(self, error: StoreError) {
        match self {
            Answer::Append(reply) => {
                let _ = reply.send(Err(error));
            }
            Answer::Write(reply) => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

impl Job {
    fn answer(self) -> Answer {
        match self {
            Job::Append(_, reply) => Answer::Append(reply),
            Job::Write(_, reply) => Answer::Write(reply),
        }
    }
}

fn append_in(
    connection: &Connection,
    request: &AppendRequest,
) -> Result<AppendOutcome, StoreError> {
    let mut versions = Vec::with_capacity(request.streams.len());
    {
        let mut current = connection.prepare_cached(
            "SELECT coalesce(max(version), 0) FROM events WHERE stream_type = ?1 AND stream_id = ?2",
        )?;
        for (stream, expected) in &request.streams {
            let version: i64 =
                current.query_row(params![stream.kind, stream.id.as_bytes()], |row| row.get(0))?;
            let version = version as u64;
            if let ExpectedVersion::Exact(expected) = *expected
                && expected != version
            {
                return Err(StoreError::Conflict {
                    stream: stream.clone(),
                    expected,
                    actual: Some(version),
                });
            }
            versions.push(version);
        }
    }
    if !request.releases.is_empty() {
        let mut release = connection.prepare_cached(
            "DELETE FROM unique_claims WHERE tenant_id = ?1 AND scope = ?2 AND value = ?3 \
             AND stream_type = ?4 AND stream_id = ?5",
        )?;
        for (owner, key) in &request.releases {
            let stream = &request.streams[*owner].0;
            release.execute(params![
                key.tenant_id.as_bytes(),
                key.scope,
                key.value,
                stream.kind,
                stream.id.as_bytes()
            ])?;
        }
    }
    if !request.claims.is_empty() {
        let mut claim = connection.prepare_cached(
            "INSERT INTO unique_claims (tenant_id, scope, value, stream_type, stream_id) \
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
        )?;
        for (owner, key) in &request.claims {
            let stream = &request.streams[*owner].0;
            let inserted = claim.execute(params![
                key.tenant_id.as_bytes(),
                key.scope,
                key.value,
                stream.kind,
                stream.id.as_bytes()
            ])?;
            if inserted == 0 {
                return Err(StoreError::ClaimTaken {
                    scope: key.scope.clone(),
                });
            }
        }
    }
    let metadata = &request.metadata;
    let actor = metadata.actor.to_string();
    let context = metadata.context.as_ref();
    let ip = context.and_then(|c| c.ip.as_deref());
    let user_agent = context.and_then(|c| c.user_agent.as_deref());
    let recorded_at = request.recorded_at.timestamp_micros();
    let mut insert = connection.prepare_cached(
        "INSERT INTO events (event_id, tenant_id, stream_type, stream_id, version, event_type, \
         schema_version, recorded_at, correlation_id, causation_id, actor, client_ip, user_agent, payload) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
    )?;
    let mut events = Vec::with_capacity(request.events.len());
    for (stream_index, event) in &request.events {
        let id = Uuid::now_v7();
        versions[*stream_index] += 1;
        let version = versions[*stream_index];
        insert.execute(params![
            id.as_bytes(),
            event.tenant_id.as_bytes(),
            event.stream.kind,
            event.stream.id.as_bytes(),
            version as i64,
            event.event_type,
            event.schema_version,
            recorded_at,
            metadata.correlation_id.as_bytes(),
            metadata
                .causation_id
                .as_ref()
                .map(|c| c.as_bytes().to_vec()),
            actor,
            ip,
            user_agent,
            event.payload.to_string(),
        ])?;
        events.push((id, connection.last_insert_rowid() as u64, version));
    }
    Ok(AppendOutcome { events })
}

fn save_snapshot_in(
    connection: &Connection,
    stream: &StreamId,
    version: u64,
    state: &str,
) -> Result<(), StoreError> {
    connection
        .prepare_cached(
            "INSERT INTO snapshots (stream_type, stream_id, version, state) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (stream_type, stream_id) DO UPDATE SET version = excluded.version, \
             state = excluded.state WHERE snapshots.version < excluded.version",
        )?
        .execute(params![stream.kind, stream.id.as_bytes(), version as i64, state])?;
    Ok(())
}

fn uuid_at(row: &Row<'_>, index: usize) -> rusqlite::Result<Uuid> {
    let bytes = row.get_ref(index)?.as_blob()?;
    Uuid::from_slice(bytes).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(index, rusqlite::types::Type::Blob, Box::new(e))
    })
}

fn sql_value(value: &SqlValue) -> rusqlite::types::Value {
    match value {
        SqlValue::Int(value) => rusqlite::types::Value::Integer(*value),
        SqlValue::Text(text) => rusqlite::types::Value::Text(text.clone()),
        SqlValue::Uuid(id) => rusqlite::types::Value::Text(id.to_string()),
    }
}

/// Runs a read-model statement (several statements when it has no parameters, for DDL);
/// the rows it changed.
fn execute_statement(connection: &Connection, statement: &Statement) -> Result<usize, StoreError> {
    if statement.params.is_empty() && statement.sql.trim_end().trim_end_matches(';').contains(';') {
        connection.execute_batch(&statement.sql)?;
        return Ok(0);
    }
    Ok(connection
        .prepare_cached(&statement.sql)?
        .execute(params_from_iter(statement.params.iter().map(sql_value)))?)
}

/// The rows a read-model fence changed, or found if it is a check.
fn fenced_rows(connection: &Connection, fence: &Statement) -> Result<usize, StoreError> {
    if !fence.is_check() {
        return execute_statement(connection, fence);
    }
    let mut statement = connection.prepare_cached(&fence.sql)?;
    let mut rows = statement.query(params_from_iter(fence.params.iter().map(sql_value)))?;
    let mut found = 0;
    while rows.next()?.is_some() {
        found += 1;
    }
    Ok(found)
}

/// Every row of `rows` through one prepared statement.
fn insert_rows(connection: &Connection, rows: &Rows) -> Result<(), StoreError> {
    let len = rows.checked_len()?;
    let placeholders = vec!["?"; rows.columns.len()].join(", ");
    let mut statement = connection.prepare_cached(&format!(
        "INSERT INTO {} ({}) VALUES ({placeholders}) {}",
        rows.table,
        rows.columns.join(", "),
        rows.on_conflict
    ))?;
    for row in 0..len {
        for (index, column) in rows.values.iter().enumerate() {
            match column {
                Column::Int(values) => statement.raw_bind_parameter(index + 1, values[row])?,
                Column::Text(values) => {
                    statement.raw_bind_parameter(index + 1, values[row].as_str())?
                }
                Column::Uuid(values) => statement.raw_bind_parameter(
                    index + 1,
                    &*values[row]
                        .hyphenated()
                        .encode_lower(&mut Uuid::encode_buffer()),
                )?,
            }
        }
        statement.raw_execute()?;
    }
    Ok(())
}

fn hash_of(bytes: Vec<u8>) -> Result<Hash, StoreError> {
    bytes
        .try_into()
        .map_err(|_| StoreError::Backend("a seal is not 32 bytes".into()))
}

fn decode_seal(row: &Row<'_>) -> Result<Seal, StoreError> {
    Ok(Seal {
        position: row.get::<_, i64>(0)? as u64,
        tenant_id: uuid_at(row, 1)?,
        hash: hash_of(row.get(2)?)?,
    })
}

fn decode(row: &Row<'_>) -> Result<RecordedEvent, StoreError> {
    let causation_id = match row.get_ref(10)?.as_blob_or_null()? {
        Some(bytes) => {
            Some(Uuid::from_slice(bytes).map_err(|e| StoreError::Backend(e.to_string()))?)
        }
        None => None,
    };
    let ip: Option<String> = row.get(12)?;
    let user_agent: Option<String> = row.get(13)?;
    let micros: i64 = row.get(8)?;
    Ok(RecordedEvent {
        position: row.get::<_, i64>(0)? as u64,
        id: uuid_at(row, 1)?,
        tenant_id: uuid_at(row, 2)?,
        stream: StreamId {
            kind: row.get(3)?,
            id: uuid_at(row, 4)?,
        },
        version: row.get::<_, i64>(5)? as u64,
        event_type: row.get(6)?,
        schema_version: row.get(7)?,
        recorded_at: DateTime::<Utc>::from_timestamp_micros(micros)
            .ok_or_else(|| StoreError::Backend(format!("bad timestamp {micros}")))?,
        correlation_id: uuid_at(row, 9)?,
        causation_id,
        actor: row
            .get_ref(11)?
            .as_str()?
            .parse::<Actor>()
            .map_err(StoreError::Backend)?,
        context: (ip.is_some() || user_agent.is_some()).then_some(ClientContext { ip, user_agent }),
        payload: serde_json::value::RawValue::from_string(row.get::<_, String>(14)?)
            .map_err(|e| StoreError::Backend(e.to_string()))?,
    })
}

#[async_trait]
impl EventStore for SqliteStore {
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError> {
        request.validate()?;
        self.submit(|reply| Job::Append(Box::new(request), reply))
            .await
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        bounds: StreamBounds,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let stream = stream.clone();
        self.read(move |connection| {
            let sql = format!(
                "SELECT {COLUMNS} FROM events WHERE stream_type = ?1 AND stream_id = ?2 \
                 AND version > ?3 AND position <= ?4 AND recorded_at <= ?5 ORDER BY version"
            );
            let mut statement = connection.prepare_cached(&sql)?;
            let mut rows = statement.query(params![
                stream.kind,
                stream.id.as_bytes(),
                bounds.after_version as i64,
                bounds.up_to_position.map_or(i64::MAX, |p| p as i64),
                bounds.up_to_time.map_or(i64::MAX, |t| t.timestamp_micros()),
            ])?;
            let mut events = Vec::new();
            while let Some(row) = rows.next()? {
                events.push(decode(row)?);
            }
            Ok(events)
        })
        .await
    }

    async fn read_all(
        &self,
        after: u64,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<ReadBatch, StoreError> {
        let filter = filter.clone();
        self.read(move |connection| {
            let mut sql =
                format!("SELECT {COLUMNS} FROM events WHERE position > ? AND position <= ?");
            if filter.tenant_id.is_some() {
                sql.push_str(" AND tenant_id = ?");
            }
            let placeholders = |n: usize| vec!["?"; n].join(", ");
            if !filter.stream_types.is_empty() {
                sql.push_str(&format!(
                    " AND stream_type IN ({})",
                    placeholders(filter.stream_types.len())
                ));
            }
            if !filter.event_types.is_empty() {
                sql.push_str(&format!(
                    " AND event_type IN ({})",
                    placeholders(filter.event_types.len())
                ));
            }
            sql.push_str(" ORDER BY position LIMIT ?");

            // One read transaction: the head and the events below it come from one snapshot.
            connection.execute_batch("BEGIN")?;
            let result = (|| {
                let head: i64 = connection.query_row(
                    "SELECT coalesce(max(position), 0) FROM events",
                    [],
                    |row| row.get(0),
                )?;
                let mut values: Vec<rusqlite::types::Value> =
                    vec![(after as i64).into(), head.into()];
                if let Some(tenant) = filter.tenant_id {
                    values.push(tenant.as_bytes().to_vec().into());
                }
                values.extend(filter.stream_types.iter().cloned().map(Into::into));
                values.extend(filter.event_types.iter().cloned().map(Into::into));
                values.push((limit as i64).into());
                let mut statement = connection.prepare_cached(&sql)?;
                let mut rows = statement.query(params_from_iter(values))?;
                let mut events = Vec::with_capacity(limit.min(1024));
                while let Some(row) = rows.next()? {
                    events.push(decode(row)?);
                }
                let next = if events.len() >= limit {
                    events.last().map_or(after, |e| e.position)
                } else {
                    after.max(head as u64)
                };
                Ok(ReadBatch { events, next })
            })();
            connection.execute_batch("COMMIT")?;
            result
        })
        .await
    }

    async fn claim_owner(&self, key: &ClaimKey) -> Result<Option<StreamId>, StoreError> {
        let key = key.clone();
        self.read(move |connection| {
            Ok(connection
                .prepare_cached(
                    "SELECT stream_type, stream_id FROM unique_claims \
                     WHERE tenant_id = ?1 AND scope = ?2 AND value = ?3",
                )?
                .query_row(
                    params![key.tenant_id.as_bytes(), key.scope, key.value],
                    |row| {
                        Ok(StreamId {
                            kind: row.get(0)?,
                            id: uuid_at(row, 1)?,
                        })
                    },
                )
                .optional()?)
        })
        .await
    }

    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<(u64, Value)>, StoreError> {
        let stream = stream.clone();
        let row: Option<(i64, String)> = self
            .read(move |connection| {
                Ok(connection
                    .prepare_cached(
                        "SELECT version, state FROM snapshots WHERE stream_type = ?1 AND stream_id = ?2",
                    )?
                    .query_row(params![stream.kind, stream.id.as_bytes()], |row| {
                        Ok((row.get(0)?, row.get(1)?))
                    })
                    .optional()?)
            })
            .await?;
        row.map(|(version, state)| {
            Ok((
                version as u64,
                serde_json::from_str(&state).map_err(|e| StoreError::Backend(e.to_string()))?,
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
        let (stream, state) = (stream.clone(), state.to_string());
        self.write(move |c| save_snapshot_in(c, &stream, version, &state))
            .await
    }

    async fn put_subject_key(
        &self,
        subject_id: Uuid,
        tenant_id: Uuid,
        wrapped_key: Vec<u8>,
    ) -> Result<Vec<u8>, StoreError> {
        self.write(move |c| {
            c.prepare_cached(
                "INSERT INTO subject_keys (subject_id, tenant_id, wrapped_key, created_at) \
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
            )?
            .execute(params![
                subject_id.as_bytes(),
                tenant_id.as_bytes(),
                wrapped_key,
                Utc::now().timestamp_micros()
            ])?;
            Ok(())
        })
        .await?;
        self.subject_key(subject_id)
            .await?
            .ok_or_else(|| StoreError::Backend("subject key vanished".into()))
    }

    async fn subject_key(&self, subject_id: Uuid) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(move |c| {
            Ok(
                c.prepare_cached("SELECT wrapped_key FROM subject_keys WHERE subject_id = ?1")?
                    .query_row(params![subject_id.as_bytes()], |row| row.get(0))
                    .optional()?,
            )
        })
        .await
    }

    async fn destroy_subject_key(&self, subject_id: Uuid) -> Result<(), StoreError> {
        self.write(move |c| {
            c.prepare_cached("DELETE FROM subject_keys WHERE subject_id = ?1")?
                .execute(params![subject_id.as_bytes()])?;
            Ok(())
        })
        .await
    }

    async fn load_checkpoint(&self, name: &str) -> Result<Option<u64>, StoreError> {
        let name = name.to_string();
        self.read(move |c| {
            let position: Option<i64> = c
                .prepare_cached("SELECT position FROM checkpoints WHERE name = ?1")?
                .query_row(params![name], |row| row.get(0))
                .optional()?;
            Ok(position.map(|p| p as u64))
        })
        .await
    }

    async fn save_checkpoint(&self, name: &str, position: u64) -> Result<(), StoreError> {
        let name = name.to_string();
        self.write(move |c| {
            c.prepare_cached(
                "INSERT INTO checkpoints (name, position) VALUES (?1, ?2) \
                 ON CONFLICT (name) DO UPDATE SET position = excluded.position",
            )?
            .execute(params![name, position as i64])?;
            Ok(())
        })
        .await
    }

    async fn save_seals(&self, seals: Vec<Seal>, sealed_up_to: u64) -> Result<(), StoreError> {
        self.write(move |c| {
            let mut insert = c.prepare_cached(
                "INSERT INTO event_seals (position, tenant_id, hash) VALUES (?1, ?2, ?3) \
                 ON CONFLICT DO NOTHING",
            )?;
            for seal in &seals {
                insert.execute(params![
                    seal.position as i64,
                    seal.tenant_id.as_bytes(),
                    seal.hash.as_slice()
                ])?;
            }
            c.prepare_cached(
                "INSERT INTO checkpoints (name, position) VALUES (?1, ?2) ON CONFLICT (name) \
                 DO UPDATE SET position = max(position, excluded.position)",
            )?
            .execute(params![SEALER_CHECKPOINT, sealed_up_to as i64])?;
            Ok(())
        })
        .await
    }

    async fn read_seals(
        &self,
        tenant_id: Option<Uuid>,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Seal>, StoreError> {
        self.read(move |c| {
            let mut statement = c.prepare_cached(
                "SELECT position, tenant_id, hash FROM event_seals WHERE position > ?1 \
                 AND (?2 IS NULL OR tenant_id = ?2) ORDER BY position LIMIT ?3",
            )?;
            let mut rows = statement.query(params![
                after as i64,
                tenant_id.map(|t| t.as_bytes().to_vec()),
                limit as i64
            ])?;
            let mut seals = Vec::new();
            while let Some(row) = rows.next()? {
                seals.push(decode_seal(row)?);
            }
            Ok(seals)
        })
        .await
    }

    async fn last_seal(
        &self,
        tenant_id: Uuid,
        at_or_before: u64,
    ) -> Result<Option<Seal>, StoreError> {
        self.read(move |c| {
            let mut statement = c.prepare_cached(
                "SELECT position, tenant_id, hash FROM event_seals WHERE tenant_id = ?1 \
                 AND position <= ?2 ORDER BY position DESC LIMIT 1",
            )?;
            let mut rows = statement.query(params![tenant_id.as_bytes(), at_or_before as i64])?;
            match rows.next()? {
                Some(row) => Ok(Some(decode_seal(row)?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn save_integrity_checkpoint(
        &self,
        checkpoint: &SignedCheckpoint,
    ) -> Result<(), StoreError> {
        let checkpoint = checkpoint.clone();
        self.write(move |c| {
            c.prepare_cached(
                "INSERT INTO integrity_checkpoints (tenant_id, position, head, signed_at, key_id, signature) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
            )?
            .execute(params![
                checkpoint.tenant_id.as_bytes(),
                checkpoint.position as i64,
                checkpoint.head.as_slice(),
                checkpoint.signed_at.timestamp_micros(),
                checkpoint.key_id,
                checkpoint.signature
            ])?;
            Ok(())
        })
        .await
    }

    async fn integrity_checkpoints(
        &self,
        tenant_id: Option<Uuid>,
    ) -> Result<Vec<SignedCheckpoint>, StoreError> {
        self.read(move |c| {
            let mut statement = c.prepare_cached(
                "SELECT tenant_id, position, head, signed_at, key_id, signature FROM integrity_checkpoints \
                 WHERE ?1 IS NULL OR tenant_id = ?1 ORDER BY position",
            )?;
            let mut rows = statement.query(params![tenant_id.map(|t| t.as_bytes().to_vec())])?;
            let mut checkpoints = Vec::new();
            while let Some(row) = rows.next()? {
                let micros: i64 = row.get(3)?;
                checkpoints.push(SignedCheckpoint {
                    tenant_id: uuid_at(row, 0)?,
                    position: row.get::<_, i64>(1)? as u64,
                    head: hash_of(row.get(2)?)?,
                    signed_at: DateTime::<Utc>::from_timestamp_micros(micros)
                        .ok_or_else(|| StoreError::Backend(format!("bad timestamp {micros}")))?,
                    key_id: row.get(4)?,
                    signature: row.get(5)?,
                });
            }
            Ok(checkpoints)
        })
        .await
    }

    async fn import(&self, events: Vec<RecordedEvent>) -> Result<(), StoreError> {
        for chunk in events.chunks(10_000) {
            let chunk = chunk.to_vec();
            self.write(move |c| {
                let mut insert = c.prepare_cached(
                    "INSERT INTO events (event_id, tenant_id, stream_type, stream_id, version, event_type, \
                     schema_version, recorded_at, correlation_id, causation_id, actor, client_ip, user_agent, payload) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
                )?;
                for event in &chunk {
                    let context = event.context.as_ref();
                    insert.execute(params![
                        event.id.as_bytes(),
                        event.tenant_id.as_bytes(),
                        event.stream.kind,
                        event.stream.id.as_bytes(),
                        event.version as i64,
                        event.event_type,
                        event.schema_version,
                        event.recorded_at.timestamp_micros(),
                        event.correlation_id.as_bytes(),
                        event.causation_id.map(|c| c.as_bytes().to_vec()),
                        event.actor.to_string(),
                        context.and_then(|c| c.ip.as_deref()),
                        context.and_then(|c| c.user_agent.as_deref()),
                        event.payload.get(),
                    ])?;
                }
                Ok(())
            })
            .await?;
        }
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
        Ok(())
    }

    async fn read_model_commit(
        &self,
        fence: Option<Statement>,
        writes: Vec<Write>,
    ) -> Result<bool, StoreError> {
        let fenced = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = fenced.clone();
        let result = self
            .write(move |c| {
                if let Some(fence) = &fence
                    && fenced_rows(c, fence)? != 1
                {
                    flag.store(true, std::sync::atomic::Ordering::SeqCst);
                    // An error rolls the savepoint back: nothing of this commit stays.
                    return Err(StoreError::Backend("fenced".into()));
                }
                for write in &writes {
                    match write {
                        Write::Sql(statement) => {
                            execute_statement(c, statement)?;
                        }
                        Write::Rows(rows) => insert_rows(c, rows)?,
                    }
                }
                Ok(())
            })
            .await;
        match result {
            Err(_) if fenced.load(std::sync::atomic::Ordering::SeqCst) => Ok(false),
            Err(error) => Err(error),
            Ok(()) => Ok(true),
        }
    }

    async fn read_model_query(&self, query: Statement) -> Result<Vec<Vec<SqlValue>>, StoreError> {
        self.read(move |c| {
            let mut statement = c.prepare_cached(&query.sql)?;
            let columns = statement.column_count();
            let mut rows = statement.query(params_from_iter(query.params.iter().map(sql_value)))?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                let mut values = Vec::with_capacity(columns);
                for i in 0..columns {
                    values.push(match row.get_ref(i)? {
                        rusqlite::types::ValueRef::Integer(value) => SqlValue::Int(value),
                        rusqlite::types::ValueRef::Real(value) => SqlValue::Int(value as i64),
                        rusqlite::types::ValueRef::Text(text) => {
                            SqlValue::Text(String::from_utf8_lossy(text).into_owned())
                        }
                        rusqlite::types::ValueRef::Null => SqlValue::Int(0),
                        rusqlite::types::ValueRef::Blob(_) => SqlValue::Text(String::new()),
                    });
                }
                out.push(values);
            }
            Ok(out)
        })
        .await
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn poll_interval(&self) -> Duration {
        // Appends from this process wake subscribers at once; this catches other processes.
        Duration::from_millis(200)
    }

    fn tail(&self) -> &crate::subscription::Tail {
        &self.tail
    }

    fn backend(&self) -> &'static str {
        "sqlite"
    }
}
