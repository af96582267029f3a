//! `gatehouse bench append|replay`: the event store measured against the raw driver on the
//! same machine in the same run, so the figures are ratios that survive a noisy machine.
//!
//! - **append**: 8 concurrent writers, 1, 5 and 100 events per command, each command an
//!   append to the writer's own stream with an exact expected version; baseline: the same rows
//!   as one multi-row `INSERT` per command into a plain table, by the same driver.
//! - **replay**: a log of N events (default 1 000 000) rebuilt into the trivial
//!   [`EventCounts`] projection; baseline: the fastest raw scan of the same rows.
//!
//! Each measurement alternates baseline and store twice and keeps the better of each.
//! The last line printed is one JSON object.

use crate::config::{BenchArgs, BenchKind};
use futures::StreamExt;
use gatehouse_events::readmodel::{Statement, Write};
use gatehouse_events::testing::{create_database, drop_database};
use gatehouse_events::{AppendRequest, EventStore, ExpectedVersion, Metadata, NewEvent, StreamId};
use gatehouse_projections::event_counts::EventCounts;
use serde_json::{Value, json};
use sqlx::Row;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

const WRITERS: usize = 8;

/// Runs one benchmark.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.which == BenchKind::Policy {
        // Pure computation: no store.
        let report = crate::bench_policy::run(&args);
        if args.json {
            println!("{report}");
        }
        return Ok(());
    }
    let target = Target::create(args.database_url.as_deref()).await?;
    let result = match args.which {
        BenchKind::Append => append(&target, &args).await,
        BenchKind::Replay => replay(&target, &args).await,
        BenchKind::Signin => {
            let durability = target.durability().await?;
            crate::bench_signin::run(target.server_url(), &args, durability).await
        }
        BenchKind::Policy => unreachable!("handled above"),
    };
    target.remove().await;
    let report = result?;
    if args.json {
        println!("{report}");
    }
    Ok(())
}

/// A scratch store: a fresh PostgreSQL database, or SQLite in a temporary directory.
enum Target {
    Postgres {
        server: String,
        name: String,
        url: String,
    },
    Sqlite {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
    },
}

impl Target {
    async fn create(database_url: Option<&str>) -> anyhow::Result<Self> {
        Ok(match database_url {
            Some(server) => {
                let name = format!("gatehouse_bench_{}", Uuid::new_v4().simple());
                let url = create_database(server, &name).await?;
                Target::Postgres {
                    server: server.to_string(),
                    name,
                    url,
                }
            }
            None => {
                let dir = tempfile::tempdir()?;
                let path = dir.path().join("events.db");
                Target::Sqlite { _dir: dir, path }
            }
        })
    }

    fn url(&self) -> String {
        match self {
            Target::Postgres { url, .. } => url.clone(),
            Target::Sqlite { path, .. } => format!("sqlite://{}", path.display()),
        }
    }

    /// What `gatehouse serve --database-url` takes (`None`: SQLite in its own data dir).
    fn server_url(&self) -> Option<String> {
        match self {
            Target::Postgres { url, .. } => Some(url.clone()),
            Target::Sqlite { .. } => None,
        }
    }

    async fn remove(&self) {
        if let Target::Postgres { server, name, .. } = self
            && let Err(error) = drop_database(server, name).await
        {
            eprintln!("could not drop scratch database {name}: {error}");
        }
    }

    /// How durable a commit is, stated with every figure.
    async fn durability(&self) -> anyhow::Result<Value> {
        Ok(match self {
            Target::Postgres { url, .. } => {
                let pool = sqlx::PgPool::connect(url).await?;
                let sync: String = sqlx::query_scalar("SHOW synchronous_commit")
                    .fetch_one(&pool)
                    .await?;
                let fsync: String = sqlx::query_scalar("SHOW fsync").fetch_one(&pool).await?;
                let version: String = sqlx::query_scalar("SHOW server_version")
                    .fetch_one(&pool)
                    .await?;
                pool.close().await;
                json!({ "backend": "postgres", "server_version": version, "synchronous_commit": sync, "fsync": fsync })
            }
            Target::Sqlite { .. } => {
                json!({ "backend": "sqlite", "journal_mode": "wal", "synchronous": "full" })
            }
        })
    }
}

fn sample_event(tenant: Uuid, stream: &StreamId, n: usize) -> NewEvent {
    NewEvent {
        tenant_id: tenant,
        stream: stream.clone(),
        event_type: [
            "SignInStarted",
            "PasswordVerified",
            "MfaChallengeIssued",
            "SignInCompleted",
            "SessionIssued",
        ][n % 5]
            .to_string(),
        schema_version: 1,
        payload: json!({ "user_id": stream.id, "ip": "203.0.113.7", "method": "password", "n": n }),
    }
}

fn metadata() -> Metadata {
    Metadata {
        context: Some(gatehouse_events::ClientContext {
            ip: Some("203.0.113.7".into()),
            user_agent: Some("bench/1.0".into()),
        }),
        ..Metadata::system()
    }
}

/// Events per second of `WRITERS` tasks appending `size`-event commands for `seconds`.
async fn measure_store(
    store: Arc<dyn EventStore>,
    size: usize,
    seconds: f64,
) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..WRITERS)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let tenant = Uuid::now_v7();
                let stream = StreamId::new("bench", Uuid::now_v7());
                let mut version = 0u64;
                while Instant::now() < deadline {
                    let mut request = AppendRequest::new(metadata());
                    request.expect(&stream, ExpectedVersion::Exact(version));
                    for n in 0..size {
                        request.push(sample_event(tenant, &stream, n));
                    }
                    store.append(request).await?;
                    version += size as u64;
                }
                Ok::<u64, anyhow::Error>(version)
            })
        })
        .collect();
    let mut events = 0;
    for task in tasks {
        events += task.await??;
    }
    Ok(events as f64 / started.elapsed().as_secs_f64())
}

/// The same rows as [`measure_store`], as one plain multi-row INSERT per command.
async fn measure_raw(target: &Target, size: usize, seconds: f64) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut events = 0u64;
    match target {
        Target::Postgres { url, .. } => {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(WRITERS as u32)
                .connect(url)
                .await?;
            sqlx::query(
                "CREATE TABLE IF NOT EXISTS bench_raw (id bigserial PRIMARY KEY, event_id uuid NOT NULL, \
                 tenant_id uuid NOT NULL, stream_type text NOT NULL, stream_id uuid NOT NULL, version bigint NOT NULL, \
                 event_type text NOT NULL, schema_version integer NOT NULL, recorded_at timestamptz NOT NULL, \
                 correlation_id uuid NOT NULL, causation_id uuid, actor text NOT NULL, client_ip text, user_agent text, payload jsonb NOT NULL)",
            )
            .execute(&pool)
            .await?;
            let tasks: Vec<_> = (0..WRITERS)
                .map(|_| {
                    let pool = pool.clone();
                    tokio::spawn(async move {
                        let tenant = Uuid::now_v7();
                        let stream = StreamId::new("bench", Uuid::now_v7());
                        let mut version = 0i64;
                        while Instant::now() < deadline {
                            let meta = metadata();
                            let events: Vec<NewEvent> = (0..size).map(|n| sample_event(tenant, &stream, n)).collect();
                            let ids: Vec<Uuid> = events.iter().map(|_| Uuid::now_v7()).collect();
                            let versions: Vec<i64> = (1..=size as i64).map(|v| version + v).collect();
                            sqlx::query(
                                "INSERT INTO bench_raw (event_id, tenant_id, stream_type, stream_id, version, event_type, \
                                 schema_version, recorded_at, correlation_id, causation_id, actor, client_ip, user_agent, payload) \
                                 SELECT e.id, e.tenant, e.stype, e.sid, e.version, e.etype, e.schema, $8, $9, NULL, $10, $11, $13, e.payload::jsonb \
                                 FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::uuid[], $5::bigint[], $6::text[], $7::int[], $12::text[]) \
                                 AS e(id, tenant, stype, sid, version, etype, schema, payload)",
                            )
                            .bind(&ids)
                            .bind(events.iter().map(|e| e.tenant_id).collect::<Vec<_>>())
                            .bind(events.iter().map(|e| e.stream.kind.clone()).collect::<Vec<_>>())
                            .bind(events.iter().map(|e| e.stream.id).collect::<Vec<_>>())
                            .bind(&versions)
                            .bind(events.iter().map(|e| e.event_type.clone()).collect::<Vec<_>>())
                            .bind(events.iter().map(|e| e.schema_version as i32).collect::<Vec<_>>())
                            .bind(chrono::Utc::now())
                            .bind(meta.correlation_id)
                            .bind(meta.actor.to_string())
                            .bind("203.0.113.7")
                            .bind(events.iter().map(|e| e.payload.to_string()).collect::<Vec<_>>())
                            .bind("bench/1.0")
                            .execute(&pool)
                            .await?;
                            version += size as i64;
                        }
                        Ok::<u64, anyhow::Error>(version as u64)
                    })
                })
                .collect();
            for task in tasks {
                events += task.await??;
            }
            pool.close().await;
        }
        Target::Sqlite { path, .. } => {
            // SQLite has one writer: the baseline is one connection serving all writers.
            let connection = rusqlite::Connection::open(path.with_extension("raw.db"))?;
            connection.pragma_update(None, "journal_mode", "WAL")?;
            connection.pragma_update(None, "synchronous", "FULL")?;
            connection.execute_batch(
                "CREATE TABLE IF NOT EXISTS bench_raw (id INTEGER PRIMARY KEY, event_id BLOB NOT NULL, \
                 tenant_id BLOB NOT NULL, stream_type TEXT NOT NULL, stream_id BLOB NOT NULL, version INTEGER NOT NULL, \
                 event_type TEXT NOT NULL, schema_version INTEGER NOT NULL, recorded_at INTEGER NOT NULL, \
                 correlation_id BLOB NOT NULL, causation_id BLOB, actor TEXT NOT NULL, client_ip TEXT, user_agent TEXT, payload TEXT NOT NULL)",
            )?;
            let connection = Arc::new(Mutex::new(connection));
            let tasks: Vec<_> = (0..WRITERS)
                .map(|_| {
                    let connection = connection.clone();
                    tokio::spawn(async move {
                        let tenant = Uuid::now_v7();
                        let stream = StreamId::new("bench", Uuid::now_v7());
                        let mut version = 0i64;
                        while Instant::now() < deadline {
                            let connection = connection.clone();
                            let start = version;
                            let stream = stream.clone();
                            tokio::task::spawn_blocking(move || {
                                raw_sqlite_insert(&connection, tenant, &stream, start, size)
                            })
                            .await??;
                            version += size as i64;
                        }
                        Ok::<u64, anyhow::Error>(version as u64)
                    })
                })
                .collect();
            for task in tasks {
                events += task.await??;
            }
        }
    }
    Ok(events as f64 / started.elapsed().as_secs_f64())
}

fn raw_sqlite_insert(
    connection: &Mutex<rusqlite::Connection>,
    tenant: Uuid,
    stream: &StreamId,
    version: i64,
    size: usize,
) -> anyhow::Result<()> {
    let meta = metadata();
    let mut sql = String::from(
        "INSERT INTO bench_raw (event_id, tenant_id, stream_type, stream_id, version, event_type, schema_version, \
         recorded_at, correlation_id, causation_id, actor, client_ip, user_agent, payload) VALUES ",
    );
    let mut values: Vec<rusqlite::types::Value> = Vec::with_capacity(size * 14);
    for n in 0..size {
        if n > 0 {
            sql.push(',');
        }
        sql.push_str("(?,?,?,?,?,?,?,?,?,?,?,?,?,?)");
        let event = sample_event(tenant, stream, n);
        values.extend([
            Uuid::now_v7().as_bytes().to_vec().into(),
            tenant.as_bytes().to_vec().into(),
            event.stream.kind.into(),
            stream.id.as_bytes().to_vec().into(),
            (version + n as i64 + 1).into(),
            event.event_type.into(),
            1i64.into(),
            chrono::Utc::now().timestamp_micros().into(),
            meta.correlation_id.as_bytes().to_vec().into(),
            rusqlite::types::Value::Null,
            meta.actor.to_string().into(),
            "203.0.113.7".to_string().into(),
            "bench/1.0".to_string().into(),
            event.payload.to_string().into(),
        ]);
    }
    let mut connection = connection
        .lock()
        .map_err(|_| anyhow::anyhow!("lock poisoned"))?;
    let tx = connection.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.prepare_cached(&sql)?
        .execute(rusqlite::params_from_iter(values))?;
    tx.commit()?;
    Ok(())
}

async fn append(target: &Target, args: &BenchArgs) -> anyhow::Result<Value> {
    let durability = target.durability().await?;
    let store = gatehouse_events::connect(&target.url()).await?;
    println!("append benchmark: {WRITERS} writers, {durability}");
    let mut results = Vec::new();
    let mut headline = None;
    for size in [1usize, 5, 100] {
        let (mut raw, mut ours) = (0f64, 0f64);
        for _ in 0..2 {
            raw = raw.max(measure_raw(target, size, args.seconds).await?);
            ours = ours.max(measure_store(store.clone(), size, args.seconds).await?);
        }
        let ratio = ours / raw;
        println!(
            "  {size:>3} events/command: gatehouse {ours:>9.0} events/s, raw INSERT {raw:>9.0} events/s, ratio {ratio:.2}"
        );
        if size == 5 {
            headline = Some(ratio);
        }
        results.push(json!({
            "events_per_command": size,
            "gatehouse_events_per_s": ours.round(),
            "raw_insert_events_per_s": raw.round(),
            "ratio": (ratio * 1000.0).round() / 1000.0,
        }));
    }
    Ok(json!({
        "bench": "append",
        "writers": WRITERS,
        "durability": durability,
        "results": results,
        "ratio": headline.map(|r| (r * 1000.0).round() / 1000.0),
    }))
}

/// Fills the log with `count` events, 1 000 per append, 100 per stream.
async fn fill(store: &Arc<dyn EventStore>, count: u64) -> anyhow::Result<()> {
    let appends = count.div_ceil(1000);
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (store, next) = (store.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if index >= appends {
                        return Ok::<(), anyhow::Error>(());
                    }
                    let tenant = Uuid::now_v7();
                    let in_this = (count - index * 1000).min(1000) as usize;
                    let mut request = AppendRequest::new(metadata());
                    let mut stream = StreamId::new("bench", Uuid::now_v7());
                    for n in 0..in_this {
                        if n % 100 == 0 {
                            stream = StreamId::new("bench", Uuid::now_v7());
                        }
                        request.push(sample_event(tenant, &stream, n));
                    }
                    store.append(request).await?;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// The activity projection (sign-in log, counters, active users) rebuilt from a log of sign-in
/// flows into fresh tables, against a raw scan of the same rows; in its own scratch store.
async fn activity_rebuild(args: &BenchArgs) -> anyhow::Result<Value> {
    let target = Target::create(args.database_url.as_deref()).await?;
    let result = async {
        let store = gatehouse_events::connect(&target.url()).await?;
        println!(
            "activity rebuild: filling the log with {} sign-in events",
            args.events
        );
        fill_sign_ins(&store, args.events).await?;
        let factory = gatehouse_projections::all()
            .into_iter()
            .next()
            .ok_or_else(|| anyhow::anyhow!("no projection"))?;
        let (mut raw, mut ours, mut rows, mut written, mut floor) = (0f64, 0f64, 0u64, 0u64, 0f64);
        for _ in 0..2 {
            let (scanned, rate) = raw_scan(&target).await?;
            anyhow::ensure!(scanned == args.events, "raw scan saw {scanned} rows");
            raw = raw.max(rate);
            let rebuilt = gatehouse_projections::runtime::rebuild(&store, &factory).await?;
            anyhow::ensure!(
                rebuilt.events == args.events,
                "the rebuild applied {} events",
                rebuilt.events
            );
            ours = ours.max(rebuilt.events as f64 / rebuilt.seconds);
            rows = count_rows(&store, "signins", rebuilt.generation).await?;
            let (copied, seconds) = write_floor(&store, &factory, rebuilt.generation).await?;
            written = copied;
            floor = if floor == 0.0 { seconds } else { floor.min(seconds) };
        }
        let ratio = ours / raw;
        let floor_rate = args.events as f64 / floor;
        println!(
            "  activity rebuild {ours:.0} events/s into {rows} sign-in rows, raw scan {raw:.0} events/s, ratio {ratio:.2}"
        );
        println!(
            "  its {written} rows copied table to table inside the database alone take {floor:.2} s \
             ({floor_rate:.0} events/s if writing were all a rebuild did)"
        );
        Ok(json!({
            "events": args.events,
            "sign_in_rows": rows,
            "rows_written": written,
            "rebuild_events_per_s": ours.round(),
            "raw_scan_events_per_s": raw.round(),
            "ratio": (ratio * 1000.0).round() / 1000.0,
            "write_floor_seconds": (floor * 1000.0).round() / 1000.0,
            "write_floor_events_per_s": floor_rate.round(),
        }))
    }
    .await;
    target.remove().await;
    result
}

async fn count_rows(
    store: &Arc<dyn EventStore>,
    table: &str,
    generation: i64,
) -> anyhow::Result<u64> {
    let count = store
        .read_model_query(Statement::new(
            format!(
                "SELECT CAST(COUNT(*) AS BIGINT) FROM {}",
                gatehouse_projections::runtime::physical("activity", table, generation)
            ),
            Vec::new(),
        ))
        .await?;
    Ok(count.first().map_or(0, |r| r[0].int() as u64))
}

/// The least a rebuild's writing can cost: the rows it wrote, copied by the database itself
/// (`INSERT … SELECT`, no client, no conflicts) into new tables of the same definition. Returns
/// the rows and the seconds.
async fn write_floor(
    store: &Arc<dyn EventStore>,
    factory: &gatehouse_projections::runtime::Factory,
    generation: i64,
) -> anyhow::Result<(u64, f64)> {
    let projection = factory();
    let mut rows = 0;
    let mut create = Vec::new();
    let mut copy = Vec::new();
    let mut drop = Vec::new();
    for (table, ddl) in projection.tables() {
        let from = gatehouse_projections::runtime::physical(projection.name(), table, generation);
        let to = format!("bench_floor_{table}");
        rows += count_rows(store, table, generation).await?;
        drop.push(Write::from(Statement::new(
            format!("DROP TABLE IF EXISTS {to}"),
            Vec::new(),
        )));
        create.push(Write::from(Statement::new(
            ddl.replace("{t}", &to),
            Vec::new(),
        )));
        copy.push(Write::from(Statement::new(
            format!("INSERT INTO {to} SELECT * FROM {from}"),
            Vec::new(),
        )));
    }
    store.read_model_commit(None, drop.clone()).await?;
    store.read_model_commit(None, create).await?;
    let started = Instant::now();
    store.read_model_commit(None, copy).await?;
    let seconds = started.elapsed().as_secs_f64();
    store.read_model_commit(None, drop).await?;
    Ok((rows, seconds))
}

/// Sign-in flows of five events each (started, risk assessed, MFA verified, then completed,
/// or a rejected password then failed), 200 flows an append, over 30 days, 10 tenants,
/// 3 apps each, 10 000 users, 3 countries.
async fn fill_sign_ins(store: &Arc<dyn EventStore>, count: u64) -> anyhow::Result<()> {
    let appends = count.div_ceil(1000);
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let tenants: Arc<Vec<Uuid>> = Arc::new((0..10).map(|_| Uuid::now_v7()).collect());
    let base = chrono::Utc::now() - chrono::Duration::days(30);
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (store, next, tenants) = (store.clone(), next.clone(), tenants.clone());
            tokio::spawn(async move {
                loop {
                    let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if index >= appends {
                        return Ok::<(), anyhow::Error>(());
                    }
                    let in_this = (count - index * 1000).min(1000);
                    let mut request = AppendRequest::new(metadata());
                    request.recorded_at(
                        base + chrono::Duration::seconds((index * 2591) as i64 % 2_592_000),
                    );
                    for n in 0..in_this {
                        let flow = index * 200 + n / 5;
                        let tenant = tenants[(flow % 10) as usize];
                        let stream = StreamId::new("signin", Uuid::from_u64_pair(index, n / 5));
                        let user = Uuid::from_u64_pair(7, flow % 10_000);
                        let app = Uuid::from_u64_pair(8, flow % 30);
                        let failed = flow % 7 == 0;
                        let country = ["FR", "US", "JP"][(flow % 3) as usize];
                        let (event_type, payload) = match (n % 5, failed) {
                            (0, _) => (
                                "SignInStarted",
                                json!({"application_id": app, "client_id": "c",
                                "method": "password", "user_id": user, "lockout_id": user,
                                "expires_at": "2026-01-01T00:00:00Z"}),
                            ),
                            (1, _) => (
                                "RiskAssessed",
                                json!({"level": "none", "user_id": user,
                                "properties": {"location": {"country": country},
                                "browser": "Firefox", "os": "Linux"}}),
                            ),
                            (2, false) => ("MfaMethodSelected", json!({"method": "totp"})),
                            (3, false) => ("MfaVerified", json!({"method": "totp"})),
                            (4, false) => (
                                "SignInCompleted",
                                json!({"session_id": Uuid::from_u64_pair(9, flow)}),
                            ),
                            (2 | 3, true) => (
                                "PasswordRejected",
                                json!({"reason": "invalid_credentials", "user_id": user}),
                            ),
                            _ => ("SignInFailed", json!({"reason": "too_many_wrong_codes"})),
                        };
                        request.push(NewEvent {
                            tenant_id: tenant,
                            stream,
                            event_type: event_type.into(),
                            schema_version: 1,
                            payload,
                        });
                    }
                    store.append(request).await?;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// Events per second of the fastest plain scan of the log's rows by the same driver.
async fn raw_scan(target: &Target) -> anyhow::Result<(u64, f64)> {
    let started = Instant::now();
    let rows = match target {
        Target::Postgres { url, .. } => {
            let pool = sqlx::PgPool::connect(url).await?;
            let mut rows = sqlx::query(
                "SELECT position, event_id, tenant_id, stream_type, stream_id, version, event_type, schema_version, \
                 recorded_at, correlation_id, causation_id, actor, client_ip, user_agent, payload FROM events ORDER BY position",
            )
            .fetch(&pool);
            let (mut count, mut bytes) = (0u64, 0usize);
            while let Some(row) = rows.next().await {
                let row = row?;
                for column in 0..15 {
                    bytes += row.try_get_raw(column)?.as_bytes().map_or(0, <[u8]>::len);
                }
                count += 1;
            }
            drop(rows);
            pool.close().await;
            std::hint::black_box(bytes);
            count
        }
        Target::Sqlite { path, .. } => {
            let path = path.clone();
            tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
                let connection = rusqlite::Connection::open(path)?;
                let mut statement = connection.prepare(
                    "SELECT position, event_id, tenant_id, stream_type, stream_id, version, event_type, schema_version, \
                     recorded_at, correlation_id, causation_id, actor, client_ip, user_agent, payload FROM events ORDER BY position",
                )?;
                let mut rows = statement.query([])?;
                let (mut count, mut bytes) = (0u64, 0usize);
                while let Some(row) = rows.next()? {
                    for column in 0..15 {
                        bytes += match row.get_ref(column)? {
                            rusqlite::types::ValueRef::Blob(b) | rusqlite::types::ValueRef::Text(b) => b.len(),
                            _ => 8,
                        };
                    }
                    count += 1;
                }
                std::hint::black_box(bytes);
                Ok(count)
            })
            .await??
        }
    };
    Ok((rows, rows as f64 / started.elapsed().as_secs_f64()))
}

async fn replay(target: &Target, args: &BenchArgs) -> anyhow::Result<Value> {
    let durability = target.durability().await?;
    let store = gatehouse_events::connect(&target.url()).await?;
    println!(
        "replay benchmark: filling the log with {} events ({durability})",
        args.events
    );
    let fill_started = Instant::now();
    fill(&store, args.events).await?;
    let fill_rate = args.events as f64 / fill_started.elapsed().as_secs_f64();
    println!("  filled at {fill_rate:.0} events/s (appends of 1 000 events)");
    let (mut raw, mut ours) = (0f64, 0f64);
    for _ in 0..2 {
        let (rows, rate) = raw_scan(target).await?;
        anyhow::ensure!(rows == args.events, "raw scan saw {rows} rows");
        raw = raw.max(rate);
        let started = Instant::now();
        let mut counts = EventCounts::default();
        let rebuilt = gatehouse_projections::rebuild(store.as_ref(), &mut counts).await?;
        anyhow::ensure!(
            rebuilt.events == args.events,
            "rebuild folded {} events",
            rebuilt.events
        );
        ours = ours.max(rebuilt.events as f64 / started.elapsed().as_secs_f64());
    }
    let ratio = ours / raw;
    println!(
        "  projection rebuild {ours:.0} events/s, raw scan {raw:.0} events/s, ratio {ratio:.2}"
    );
    let activity = activity_rebuild(args).await?;
    Ok(json!({
        "bench": "replay",
        "events": args.events,
        "durability": durability,
        "rebuild_events_per_s": ours.round(),
        "raw_scan_events_per_s": raw.round(),
        "ratio": (ratio * 1000.0).round() / 1000.0,
        "activity": activity,
    }))
}
