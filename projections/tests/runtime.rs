//! The projection runtime against real stores (SQLite always, PostgreSQL when configured),
//! with the activity projection over a generated history whose true counts the test knows:
//!
//! - the counters, the sign-in log and the distinct daily and monthly active users match;
//! - a runner stopped between batches (its task aborted mid-stream) and a successor that takes
//!   the lease over neither double count nor miss anything;
//! - two runners on one store apply every batch once (one holds the lease);
//! - a rebuild gives the same tables as the live projection and is swapped in while the live
//!   runner goes on; a rebuild with no runner beside it, over many batches, leaves the keys
//!   and secondary indexes it builds after its rows;
//! - a poison event stops the projection at its position, recorded, and a new runner refuses
//!   to go past it.

use chrono::{DateTime, Duration as Span, TimeZone, Utc};
use gatehouse_events::readmodel::{SqlValue, Statement};
use gatehouse_events::testing::{self, TestStore};
use gatehouse_events::{
    AppendRequest, ClientContext, EventStore, Metadata, NewEvent, Position, StreamId,
};
use gatehouse_projections::activity::{self, Activity};
use gatehouse_projections::runtime::{self, Factory, Runner, Status};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

type Error = Box<dyn std::error::Error + Send + Sync>;

fn factory() -> Factory {
    Arc::new(Activity::boxed)
}

/// What the generated history holds, counted as it is generated.
#[derive(Default, Debug)]
struct Truth {
    attempts: BTreeMap<String, i64>,
    successes: BTreeMap<String, i64>,
    failures: BTreeMap<(String, String), i64>,
    by_country: BTreeMap<(String, String), i64>,
    mfa: BTreeMap<String, i64>,
    /// (tenant, day) → users.
    daily: BTreeMap<(String, i64), BTreeSet<String>>,
    /// tenant → users over the whole period.
    monthly: BTreeMap<String, BTreeSet<String>>,
    /// (tenant, app, day) → users.
    per_app: BTreeMap<(String, String, i64), BTreeSet<String>>,
    flows: i64,
}

/// Generates `flows` sign-in flows over three days, two tenants, two apps each and twelve
/// users per tenant, deterministically from `seed`; one append per flow.
async fn generate(
    store: &Arc<dyn EventStore>,
    truth: &mut Truth,
    tenants: &[(Uuid, [Uuid; 2], Vec<Uuid>)],
    seed: u64,
    flows: u64,
) -> Result<Position, Error> {
    let base = Utc
        .with_ymd_and_hms(2026, 10, 1, 0, 0, 0)
        .single()
        .ok_or("time")?;
    let mut last = 0;
    for n in 0..flows {
        // splitmix64 of (seed, n): deterministic and well spread.
        let mut r = seed
            .wrapping_mul(1_000_003)
            .wrapping_add(n)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        r = (r ^ (r >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        r = (r ^ (r >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        r ^= r >> 31;
        let (tenant, apps, users) = &tenants[(r % 2) as usize];
        let app = apps[((r >> 3) % 2) as usize];
        let user = users[((r >> 5) % users.len() as u64) as usize];
        let at: DateTime<Utc> = base + Span::minutes(((r >> 9) % (3 * 24 * 60)) as i64);
        let country = ["FR", "US", "JP"][((r >> 20) % 3) as usize];
        let wrong_password = (r >> 24) % 4 == 0;
        let mfa = (r >> 27) % 3 == 0;
        let outcome = (r >> 30) % 5; // 0: failed (account_disabled), else success
        let flow = StreamId::new("signin", Uuid::now_v7());
        let mut append = AppendRequest::new(Metadata {
            context: Some(ClientContext {
                ip: Some("203.0.113.7".into()),
                user_agent: None,
            }),
            ..Metadata::system()
        });
        append.recorded_at(at);
        let mut push = |event_type: &str, payload: serde_json::Value| {
            append.push(NewEvent {
                tenant_id: *tenant,
                stream: flow.clone(),
                event_type: event_type.into(),
                schema_version: 1,
                payload,
            });
        };
        push(
            "SignInStarted",
            json!({"application_id": app, "client_id": "c", "method": "password",
                   "user_id": user, "lockout_id": user, "expires_at": at}),
        );
        let t = tenant.to_string();
        *truth.attempts.entry(t.clone()).or_default() += 1;
        if wrong_password {
            push(
                "PasswordRejected",
                json!({"reason": "invalid_credentials", "user_id": user}),
            );
            *truth
                .failures
                .entry((t.clone(), "invalid_credentials".into()))
                .or_default() += 1;
        }
        push(
            "RiskAssessed",
            json!({"level": "none", "user_id": user, "properties":
                   {"location": {"country": country}, "browser": "Firefox", "os": "Linux"}}),
        );
        if mfa {
            push("MfaMethodSelected", json!({"method": "totp"}));
            push("MfaVerified", json!({"method": "totp"}));
            *truth.mfa.entry(t.clone()).or_default() += 1;
        }
        if outcome == 0 {
            push("SignInFailed", json!({"reason": "account_disabled"}));
            *truth
                .failures
                .entry((t.clone(), "account_disabled".into()))
                .or_default() += 1;
        } else {
            push("SignInCompleted", json!({"session_id": Uuid::now_v7()}));
            *truth.successes.entry(t.clone()).or_default() += 1;
            *truth
                .by_country
                .entry((t.clone(), country.to_string()))
                .or_default() += 1;
            let day = at.timestamp_micros() - at.timestamp_micros().rem_euclid(86_400_000_000);
            truth
                .daily
                .entry((t.clone(), day))
                .or_default()
                .insert(user.to_string());
            truth
                .per_app
                .entry((t.clone(), app.to_string(), day))
                .or_default()
                .insert(user.to_string());
            truth
                .monthly
                .entry(t.clone())
                .or_default()
                .insert(user.to_string());
        }
        truth.flows += 1;
        last = store.append(append).await?.last_position();
    }
    Ok(last)
}

async fn query(
    store: &Arc<dyn EventStore>,
    sql: &str,
    params: Vec<SqlValue>,
) -> Result<Vec<Vec<SqlValue>>, Error> {
    let projection = Activity::boxed();
    let names = runtime::active_tables(store.as_ref(), projection.as_ref()).await?;
    Ok(store
        .read_model_query(Statement::new(runtime::substitute(sql, &names), params))
        .await?)
}

/// A tenant id of the truth as the value of a `UUID` column.
fn id(tenant: &str) -> Result<SqlValue, Error> {
    Ok(SqlValue::Uuid(Uuid::parse_str(tenant)?))
}

async fn sum(
    store: &Arc<dyn EventStore>,
    tenant: &str,
    metric: &str,
    dimension: Option<&str>,
) -> Result<i64, Error> {
    let mut params = vec![id(tenant)?, metric.into()];
    let mut sql = "SELECT CAST(coalesce(SUM(count), 0) AS BIGINT) FROM {activity} WHERE tenant_id = ? AND metric = ?".to_string();
    if let Some(dimension) = dimension {
        sql.push_str(" AND dimension = ?");
        params.push(dimension.into());
    }
    let rows = query(store, &sql, params).await?;
    Ok(rows
        .first()
        .and_then(|r| r.first())
        .map_or(0, SqlValue::int))
}

/// Every count the projection holds equals the truth.
async fn check(store: &Arc<dyn EventStore>, truth: &Truth, case: &str) -> Result<(), Error> {
    let fail = |what: String| -> Error { format!("{case}: {what}").into() };
    for (tenant, attempts) in &truth.attempts {
        let got = sum(store, tenant, "attempts", None).await?;
        if got != *attempts {
            return Err(fail(format!("attempts {got} != {attempts}")));
        }
        let want = truth.successes.get(tenant).copied().unwrap_or(0);
        let got = sum(store, tenant, "successes", None).await?;
        if got != want {
            return Err(fail(format!("successes {got} != {want}")));
        }
        let want = truth.mfa.get(tenant).copied().unwrap_or(0);
        let got = sum(store, tenant, "mfa_completions", Some("totp")).await?;
        if got != want {
            return Err(fail(format!("MFA completions {got} != {want}")));
        }
        // Monthly actives: distinct across days and apps.
        let rows = query(
            store,
            "SELECT CAST(COUNT(DISTINCT user_id) AS BIGINT) FROM {active_users} WHERE tenant_id = ?",
            vec![id(tenant)?],
        )
        .await?;
        let got = rows
            .first()
            .and_then(|r| r.first())
            .map_or(0, SqlValue::int);
        let want = truth.monthly.get(tenant).map_or(0, |u| u.len() as i64);
        if got != want {
            return Err(fail(format!("monthly actives {got} != {want}")));
        }
    }
    for ((tenant, reason), want) in &truth.failures {
        let got = sum(store, tenant, "failures", Some(reason)).await?;
        if got != *want {
            return Err(fail(format!("failures {reason} {got} != {want}")));
        }
    }
    for ((tenant, country), want) in &truth.by_country {
        let got = sum(store, tenant, "signins_by_country", Some(country)).await?;
        if got != *want {
            return Err(fail(format!("sign-ins from {country} {got} != {want}")));
        }
    }
    for ((tenant, day), users) in &truth.daily {
        let rows = query(
            store,
            "SELECT CAST(COUNT(DISTINCT user_id) AS BIGINT) FROM {active_users} WHERE tenant_id = ? AND day = ?",
            vec![id(tenant)?, (*day).into()],
        )
        .await?;
        let got = rows
            .first()
            .and_then(|r| r.first())
            .map_or(0, SqlValue::int);
        if got != users.len() as i64 {
            return Err(fail(format!(
                "daily actives of {day}: {got} != {}",
                users.len()
            )));
        }
    }
    for ((tenant, app, day), users) in &truth.per_app {
        let rows = query(
            store,
            "SELECT CAST(COUNT(*) AS BIGINT) FROM {active_users} WHERE tenant_id = ? AND application_id = ? AND day = ?",
            vec![id(tenant)?, app.as_str().into(), (*day).into()],
        )
        .await?;
        let got = rows
            .first()
            .and_then(|r| r.first())
            .map_or(0, SqlValue::int);
        if got != users.len() as i64 {
            return Err(fail(format!(
                "actives of app {app} on {day}: {got} != {}",
                users.len()
            )));
        }
    }
    let rows = query(
        store,
        "SELECT outcome, CAST(COUNT(*) AS BIGINT) FROM {signins} GROUP BY outcome ORDER BY outcome",
        vec![],
    )
    .await?;
    let log: BTreeMap<String, i64> = rows.iter().map(|r| (r[0].text(), r[1].int())).collect();
    let successes: i64 = truth.successes.values().sum();
    if log.get("success").copied().unwrap_or(0) != successes
        || log.values().sum::<i64>() != truth.flows
        || log.contains_key("pending")
    {
        return Err(fail(format!(
            "sign-in log outcomes {log:?}, {} flows",
            truth.flows
        )));
    }
    Ok(())
}

async fn wait(
    status: &mut tokio::sync::watch::Receiver<Status>,
    position: Position,
    what: &str,
) -> Result<(), Error> {
    let reached = tokio::time::timeout(
        Duration::from_secs(60),
        status.wait_for(|s| s.position >= position),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    if !reached {
        let now = status.borrow().clone();
        return Err(format!("{what}: the projection did not reach {position}: {now:?}").into());
    }
    Ok(())
}

/// Every row of the active tables, sorted.
async fn snapshot(store: &Arc<dyn EventStore>) -> Result<Vec<Vec<Vec<SqlValue>>>, Error> {
    let mut tables = Vec::new();
    for sql in [
        "SELECT * FROM {signins} ORDER BY flow_id",
        "SELECT * FROM {activity} ORDER BY tenant_id, hour, metric, dimension, application_id",
        "SELECT * FROM {active_users} ORDER BY tenant_id, day, application_id, user_id",
    ] {
        tables.push(query(store, sql, vec![]).await?);
    }
    Ok(tables)
}

/// The two tenants `generate` spreads flows over: (tenant, its two apps, `users` users).
fn tenants(users: usize) -> Vec<(Uuid, [Uuid; 2], Vec<Uuid>)> {
    (0..2)
        .map(|_| {
            (
                Uuid::now_v7(),
                [Uuid::now_v7(), Uuid::now_v7()],
                (0..users).map(|_| Uuid::now_v7()).collect(),
            )
        })
        .collect()
}

async fn runtime_on(test: TestStore) -> Result<(), Error> {
    let store = test.store.clone();
    let tenants = tenants(12);
    let mut truth = Truth::default();
    let head = generate(&store, &mut truth, &tenants, 1, 1500).await?;

    // One runner over the history.
    let first =
        Arc::new(Runner::new(store.clone(), factory(), "first").with_lease(Duration::from_secs(2)));
    let mut status = first.status();
    let task = tokio::spawn({
        let runner = first.clone();
        async move { runner.run().await }
    });
    wait(&mut status, head, "first runner").await?;
    check(&store, &truth, "caught up").await?;

    // Stopped between batches while the log grows; a successor takes over the lease.
    let appending = {
        let store = store.clone();
        let tenants = tenants.clone();
        tokio::spawn(async move {
            let mut more = Truth::default();
            let head = generate(&store, &mut more, &tenants, 2, 600).await;
            head.map(|h| (h, more))
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    task.abort();
    let (head, more) = appending.await??;
    merge(&mut truth, more);
    let second = Arc::new(
        Runner::new(store.clone(), factory(), "second").with_lease(Duration::from_secs(2)),
    );
    let mut status = second.status();
    let successor = tokio::spawn({
        let runner = second.clone();
        async move { runner.run().await }
    });
    wait(&mut status, head, "successor").await?;
    check(&store, &truth, "after a crash and takeover").await?;

    // Two runners at once: a rival that never gets the lease while the successor renews it.
    let rival =
        Arc::new(Runner::new(store.clone(), factory(), "rival").with_lease(Duration::from_secs(2)));
    let rival_status = rival.status();
    let rival_task = tokio::spawn({
        let runner = rival.clone();
        async move { runner.run().await }
    });
    let mut more = Truth::default();
    let head = generate(&store, &mut more, &tenants, 3, 300).await?;
    merge(&mut truth, more);
    wait(&mut status, head, "successor beside a rival").await?;
    if rival_status.borrow().leased || !status.borrow().leased {
        return Err(format!(
            "both or neither lead: {:?} {:?}",
            *rival_status.borrow(),
            *status.borrow()
        )
        .into());
    }
    check(&store, &truth, "two runners").await?;

    // Rebuild: the same tables, swapped in while the live runner goes on.
    let live = snapshot(&store).await?;
    let before = status.borrow().generation;
    let rebuilt = runtime::rebuild(&store, &factory()).await?;
    if rebuilt.generation != before + 1 || snapshot(&store).await? != live {
        return Err(format!("rebuild {rebuilt:?} differs from the live tables").into());
    }
    let mut more = Truth::default();
    let head = generate(&store, &mut more, &tenants, 4, 200).await?;
    merge(&mut truth, more);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (s, r) = (status.borrow().clone(), rival_status.borrow().clone());
        let leader = if s.leased { s } else { r };
        if leader.generation == rebuilt.generation && leader.position >= head {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("no runner moved to the new generation: {leader:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check(&store, &truth, "after the rebuild").await?;

    // A poison event: a payload that is not an object.
    let mut append = AppendRequest::new(Metadata::system());
    append.push(NewEvent {
        tenant_id: tenants[0].0,
        stream: StreamId::new("signin", Uuid::now_v7()),
        event_type: "SignInStarted".into(),
        schema_version: 1,
        payload: json!([1, 2, 3]),
    });
    let poison = store.append(append).await?.last_position();
    let stopped = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::select! {
            p = successor => p,
            p = rival_task => p,
        }
    })
    .await
    .map_err(|_| "the poison event did not stop the projection")??;
    if stopped.position >= poison || !stopped.reason.contains("not an object") {
        return Err(format!("stopped at {stopped:?}, poison at {poison}").into());
    }
    let after = Runner::new(store.clone(), factory(), "after").run().await;
    if !after.reason.contains(&format!("position {poison}")) {
        return Err(format!("a new runner went on: {after:?}").into());
    }
    check(&store, &truth, "stopped before the poison").await?;
    Ok(())
}

fn merge(truth: &mut Truth, more: Truth) {
    for (k, v) in more.attempts {
        *truth.attempts.entry(k).or_default() += v;
    }
    for (k, v) in more.successes {
        *truth.successes.entry(k).or_default() += v;
    }
    for (k, v) in more.failures {
        *truth.failures.entry(k).or_default() += v;
    }
    for (k, v) in more.by_country {
        *truth.by_country.entry(k).or_default() += v;
    }
    for (k, v) in more.mfa {
        *truth.mfa.entry(k).or_default() += v;
    }
    for (k, v) in more.daily {
        truth.daily.entry(k).or_default().extend(v);
    }
    for (k, v) in more.monthly {
        truth.monthly.entry(k).or_default().extend(v);
    }
    for (k, v) in more.per_app {
        truth.per_app.entry(k).or_default().extend(v);
    }
    truth.flows += more.flows;
}

/// A rebuild with no runner beside it (which would create missing indexes when it takes the
/// new generation), in batches of 1 000 events (so keys come again in later batches, where it
/// holds them back until its tables have their keys, and flows end batches after they start):
/// the keys and the sign-in log's time index, which a rebuild builds after its rows, are there
/// when it is done, and the tables hold the history (no key twice, no flow left pending).
async fn rebuild_alone_on(test: TestStore) -> Result<(), Error> {
    let store = test.store.clone();
    let tenants = tenants(4);
    let mut truth = Truth::default();
    generate(&store, &mut truth, &tenants, 7, 3_000).await?;
    let rebuilt = runtime::rebuild_in_batches(&store, &factory(), 1_000).await?;
    if rebuilt.events <= 10_000 {
        return Err(format!("fewer events than meant: {rebuilt:?}").into());
    }
    let catalogue = match store.backend() {
        "postgres" => "SELECT count(*) FROM pg_indexes WHERE indexname = ?",
        _ => "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name = ?",
    };
    for (table, index) in [
        ("signins", "time"),
        ("signins", "key"),
        ("activity", "key"),
        ("active_users", "key"),
    ] {
        let physical = runtime::physical(activity::NAME, table, rebuilt.generation);
        let index = format!("{physical}_{index}");
        let found = store
            .read_model_query(Statement::new(catalogue, vec![index.clone().into()]))
            .await?;
        if found.first().and_then(|row| row.first()) != Some(&SqlValue::Int(1)) {
            return Err(format!("the rebuild left no index {index}: {found:?}").into());
        }
    }
    check(&store, &truth, "a rebuild alone").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_alone_on_sqlite() -> Result<(), Error> {
    rebuild_alone_on(testing::sqlite().await?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_alone_on_postgres() -> Result<(), Error> {
    let Some(store) = testing::postgres().await? else {
        eprintln!("GATEHOUSE_TEST_DATABASE_URL not set: PostgreSQL run skipped");
        return Ok(());
    };
    rebuild_alone_on(store).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_on_sqlite() -> Result<(), Error> {
    runtime_on(testing::sqlite().await?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_on_postgres() -> Result<(), Error> {
    let Some(store) = testing::postgres().await? else {
        eprintln!("GATEHOUSE_TEST_DATABASE_URL not set: PostgreSQL run skipped");
        return Ok(());
    };
    runtime_on(store).await
}
