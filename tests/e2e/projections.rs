//! Read models in the running server: the activity projection killed (SIGKILL) while it
//! applies a growing log neither double counts nor misses anything after a restart; two
//! replicas on one PostgreSQL database run it once (one holds the lease, the other takes over
//! when the leader dies); `/metrics` shows its position and lag; `gatehouse projections
//! rebuild` swaps in identical tables while the server runs.

use crate::support;

use gatehouse_events::readmodel::{SqlValue, Statement};
use gatehouse_events::{AppendRequest, EventStore, Metadata, NewEvent, Position, StreamId};
use gatehouse_projections::activity::Activity;
use gatehouse_projections::runtime;
use serde_json::json;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{Error, Server, TestResult};
use uuid::Uuid;

/// What the test appended.
#[derive(Default)]
struct Truth {
    completed: i64,
    failed: i64,
    users: BTreeSet<String>,
}

/// `flows` sign-in flows of one tenant and app, one append each (as another process would).
async fn append_flows(
    store: &Arc<dyn EventStore>,
    truth: &mut Truth,
    tenant: Uuid,
    app: Uuid,
    users: &[Uuid],
    flows: usize,
) -> Result<Position, Error> {
    let mut last = 0;
    for n in 0..flows {
        let user = users[(n * 7 + truth.users.len()) % users.len()];
        let stream = StreamId::new("signin", Uuid::now_v7());
        let mut append = AppendRequest::new(Metadata::system());
        let mut push = |event_type: &str, payload: serde_json::Value| {
            append.push(NewEvent {
                tenant_id: tenant,
                stream: stream.clone(),
                event_type: event_type.into(),
                schema_version: 1,
                payload,
            });
        };
        push(
            "SignInStarted",
            json!({"application_id": app, "client_id": "c", "method": "password",
                   "user_id": user, "lockout_id": user, "expires_at": chrono::Utc::now()}),
        );
        if n % 5 == 0 {
            push("SignInFailed", json!({"reason": "account_disabled"}));
            truth.failed += 1;
        } else {
            push("SignInCompleted", json!({"session_id": Uuid::now_v7()}));
            truth.completed += 1;
            truth.users.insert(user.to_string());
        }
        last = store.append(append).await?.last_position();
    }
    Ok(last)
}

async fn scalar(store: &Arc<dyn EventStore>, sql: &str, tenant: Uuid) -> Result<i64, Error> {
    let projection = Activity::boxed();
    let names = runtime::active_tables(store.as_ref(), projection.as_ref()).await?;
    let rows = store
        .read_model_query(Statement::new(
            runtime::substitute(sql, &names),
            vec![tenant.into()],
        ))
        .await?;
    Ok(rows
        .first()
        .and_then(|r| r.first())
        .map_or(0, SqlValue::int))
}

/// Waits (60 s at most) until the projection's counts equal the truth.
async fn counts_match(
    store: &Arc<dyn EventStore>,
    tenant: Uuid,
    truth: &Truth,
    case: &str,
) -> TestResult {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let attempts = scalar(store, "SELECT CAST(coalesce(SUM(count), 0) AS BIGINT) FROM {activity} WHERE tenant_id = ? AND metric = 'attempts'", tenant).await?;
        let successes = scalar(store, "SELECT CAST(coalesce(SUM(count), 0) AS BIGINT) FROM {activity} WHERE tenant_id = ? AND metric = 'successes'", tenant).await?;
        let failures = scalar(store, "SELECT CAST(coalesce(SUM(count), 0) AS BIGINT) FROM {activity} WHERE tenant_id = ? AND metric = 'failures'", tenant).await?;
        let logged = scalar(
            store,
            "SELECT CAST(COUNT(*) AS BIGINT) FROM {signins} WHERE tenant_id = ?",
            tenant,
        )
        .await?;
        let users = scalar(store, "SELECT CAST(COUNT(DISTINCT user_id) AS BIGINT) FROM {active_users} WHERE tenant_id = ?", tenant).await?;
        let want = (
            truth.completed + truth.failed,
            truth.completed,
            truth.failed,
            truth.completed + truth.failed,
            truth.users.len() as i64,
        );
        let got = (attempts, successes, failures, logged, users);
        if got == want {
            return Ok(());
        }
        // More than the truth is double counting: never acceptable, not even for a moment.
        if attempts > want.0 || successes > want.1 || failures > want.2 {
            return Err(format!("{case}: double counted: {got:?} > {want:?}").into());
        }
        if Instant::now() > deadline {
            return Err(format!("{case}: counts {got:?}, expected {want:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// InsightsService over the same history, through the admin key.
async fn insights(server: &Server, admin: &str, tenant: Uuid, truth: &Truth) -> TestResult {
    use gatehouse_proto::v1 as pb;
    use gatehouse_proto::v1::insights_service_client::InsightsServiceClient;
    let channel = support::world::connect(server).await?;
    let mut client = InsightsServiceClient::new(channel.clone());
    let now = chrono::Utc::now();
    let (from, to) = (
        (now - chrono::Duration::days(1)).to_rfc3339(),
        (now + chrono::Duration::days(1)).to_rfc3339(),
    );
    let summary = client
        .get_activity_summary(support::req(
            pb::GetActivitySummaryRequest {
                tenant_id: tenant.to_string(),
                from: from.clone(),
                to: to.clone(),
                ..Default::default()
            },
            admin,
        )?)
        .await?
        .into_inner();
    let disabled = summary
        .failures_by_reason
        .iter()
        .find(|c| c.dimension == "account_disabled")
        .map_or(0, |c| c.count);
    if summary.attempts != truth.completed + truth.failed
        || summary.successes != truth.completed
        || disabled != truth.failed
        || summary.active_users != truth.users.len() as i64
    {
        return Err(format!("summary {summary:?}").into());
    }
    let series = client
        .query_activity(support::req(
            pb::QueryActivityRequest {
                tenant_id: tenant.to_string(),
                from: from.clone(),
                to: to.clone(),
                granularity: "hour".into(),
                metrics: vec!["successes".into(), "failures".into()],
                group_by: vec!["dimension".into()],
                ..Default::default()
            },
            admin,
        )?)
        .await?
        .into_inner();
    let total = |metric: &str| -> i64 {
        series
            .points
            .iter()
            .filter(|p| p.metric == metric)
            .map(|p| p.value)
            .sum()
    };
    if total("successes") != truth.completed || total("failures") != truth.failed {
        return Err(format!("series {:?}", series.points).into());
    }
    // The failed sign-ins, seven at a time, newest first.
    let (mut token, mut seen, mut last) = (String::new(), 0, String::new());
    loop {
        let page = client
            .list_sign_ins(support::req(
                pb::ListSignInsRequest {
                    tenant_id: tenant.to_string(),
                    outcome: "failure".into(),
                    page_size: 7,
                    page_token: token.clone(),
                    ..Default::default()
                },
                admin,
            )?)
            .await?
            .into_inner();
        for record in &page.sign_ins {
            if record.outcome != "failure" || record.reason != "account_disabled" {
                return Err(format!("a listed sign-in: {record:?}").into());
            }
            if !last.is_empty() && record.started_at > last {
                return Err("the sign-in log is not newest first".into());
            }
            last = record.started_at.clone();
        }
        seen += page.sign_ins.len() as i64;
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    if seen != truth.failed {
        return Err(format!("{seen} failed sign-ins listed, {} expected", truth.failed).into());
    }
    // Bad input names its field.
    let bad = client
        .query_activity(support::req(
            pb::QueryActivityRequest {
                tenant_id: tenant.to_string(),
                from,
                to,
                granularity: "week".into(),
                metrics: vec!["successes".into()],
                ..Default::default()
            },
            admin,
        )?)
        .await;
    support::expect(
        bad.map(|_| ()),
        tonic::Code::InvalidArgument,
        Some("granularity"),
        "a week",
    )?;
    Ok(())
}

/// A metric's value for the activity projection, from `/metrics`.
fn metric(server: &Server, name: &str) -> Result<f64, Error> {
    let (_, body) = server.http_get("/metrics")?;
    let prefix = format!("gatehouse_{name}{{projection=\"activity\"}} ");
    body.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .ok_or_else(|| format!("no {name} in /metrics").into())
        .and_then(|v| v.trim().parse::<f64>().map_err(Into::into))
}

fn projections_cli(data: &Path, url: Option<&str>, args: &[&str]) -> Result<String, Error> {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"));
    command
        .arg("projections")
        .arg("--data")
        .arg(data)
        .env_remove("GATEHOUSE_DATABASE_URL");
    if let Some(url) = url {
        command.arg("--database-url").arg(url);
    }
    let output = command.args(args).output()?;
    if !output.status.success() {
        return Err(format!(
            "projections {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    Ok(String::from_utf8(output.stdout)?)
}

async fn run_all(data: &Path, url: Option<&str>) -> TestResult {
    let store_url = url.map_or_else(
        || format!("sqlite://{}", data.join("events.db").display()),
        str::to_string,
    );
    let mut server = Server::start(data, url)?;
    let store = gatehouse_events::connect(&store_url).await?;
    let (tenant, app) = (Uuid::now_v7(), Uuid::now_v7());
    let users: Vec<Uuid> = (0..30).map(|_| Uuid::now_v7()).collect();
    let mut truth = Truth::default();
    append_flows(&store, &mut truth, tenant, app, &users, 200).await?;
    counts_match(&store, tenant, &truth, "first start").await?;
    let admin = server.printed_admin_key().ok_or("no admin key")?;
    insights(&server, &admin, tenant, &truth).await?;
    if metric(&server, "projection_leased")? != 1.0
        || metric(&server, "projection_position")? <= 0.0
    {
        return Err("the server does not report running the projection".into());
    }

    // SIGKILL while the log grows, then a restart.
    let appending = {
        let store = store.clone();
        let users = users.clone();
        tokio::spawn(async move {
            let mut more = Truth::default();
            append_flows(&store, &mut more, tenant, app, &users, 600)
                .await
                .map(|_| more)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.child.kill()?;
    server.child.wait()?;
    let more = appending.await??;
    truth.completed += more.completed;
    truth.failed += more.failed;
    truth.users.extend(more.users);
    // The killed process's lease has to run out first (15 s).
    let server = Server::start(data, url)?;
    counts_match(&store, tenant, &truth, "after SIGKILL and restart").await?;
    let lag = metric(&server, "projection_lag_seconds")?;
    if lag != 0.0 {
        return Err(format!("caught up, yet {lag} s behind").into());
    }

    // A second replica on the same PostgreSQL database stands by, then takes over.
    if url.is_some() {
        let second_dir = tempfile::tempdir()?;
        std::fs::copy(
            data.join("master.key"),
            second_dir.path().join("master.key"),
        )?;
        let second = Server::start(second_dir.path(), url)?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let leaders = metric(&server, "projection_leased")? + metric(&second, "projection_leased")?;
        if leaders != 1.0 {
            return Err(format!("{leaders} replicas lead the projection").into());
        }
        let mut more = Truth::default();
        append_flows(&store, &mut more, tenant, app, &users, 100).await?;
        truth.completed += more.completed;
        truth.failed += more.failed;
        truth.users.extend(more.users);
        counts_match(&store, tenant, &truth, "two replicas").await?;
        server.stop()?;
        let mut more = Truth::default();
        append_flows(&store, &mut more, tenant, app, &users, 100).await?;
        truth.completed += more.completed;
        truth.failed += more.failed;
        truth.users.extend(more.users);
        counts_match(&store, tenant, &truth, "the standby took over").await?;
        if metric(&second, "projection_leased")? != 1.0 {
            return Err("the standby does not lead".into());
        }
        return rebuild_check(data, url, &store, tenant, &truth).await;
    }
    rebuild_check(data, url, &store, tenant, &truth).await?;
    server.stop()?;
    Ok(())
}

/// `gatehouse projections rebuild` while a server runs: the same counts, a new generation.
async fn rebuild_check(
    data: &Path,
    url: Option<&str>,
    store: &Arc<dyn EventStore>,
    tenant: Uuid,
    truth: &Truth,
) -> TestResult {
    let out = projections_cli(data, url, &["rebuild", "activity"])?;
    let report: serde_json::Value = serde_json::from_str(out.trim())?;
    if report["generation"].as_i64().unwrap_or(0) < 2 {
        return Err(format!("rebuild: {report}").into());
    }
    counts_match(store, tenant, truth, "after rebuild").await?;
    let status = projections_cli(data, url, &["status"])?;
    let status: serde_json::Value = serde_json::from_str(status.trim())?;
    if status["generation"] != report["generation"] || status["failure"] != "" {
        return Err(format!("status after rebuild: {status}").into());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projections_on_sqlite() -> TestResult {
    let dir = tempfile::tempdir()?;
    run_all(dir.path(), None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projections_on_postgres() -> TestResult {
    let Some(url) = support::postgres_url().await? else {
        eprintln!("GATEHOUSE_TEST_DATABASE_URL not set: PostgreSQL run skipped");
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    run_all(dir.path(), Some(&url)).await
}
