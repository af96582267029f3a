//! Gatehouse split into its services, one process each, on PostgreSQL and NATS (SPEC §2):
//! `directory`, `signin` (two replicas), `policy`, `risk`, `insights` (two replicas) and
//! `events`, every one `gatehouse serve --service NAME` on its own ports against one
//! database, with the same master and admin keys.
//!
//! - A customer signs up (directory: the emailed code), enrols TOTP (directory), and signs in
//!   to an app under a Conditional Access policy (policy) that requires MFA, with the flow's
//!   steps alternating between the two `signin` replicas.
//! - One `signin` replica is killed mid-flow: the other finishes the flow.
//! - The other services see it: the events service reads the completed sign-in and relays it
//!   to JetStream; the insights service lists both sign-ins and counts each once although two
//!   insights processes run (one holds the projection's lease); the risk service confirms the
//!   account compromised, and a `signin` replica then refuses the session's refresh.
//! - A process answers only its own services (the others are UNIMPLEMENTED), and `/metrics`
//!   counts its RPCs per method.

use crate::support;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use gatehouse_proto::v1 as pb;
use gatehouse_proto::v1::event_service_client::EventServiceClient;
use gatehouse_proto::v1::insights_service_client::InsightsServiceClient;
use gatehouse_proto::v1::risk_service_client::RiskServiceClient;
use gatehouse_proto::v1::session_service_client::SessionServiceClient;
use gatehouse_proto::v1::user_service_client::UserServiceClient;
use std::path::Path;
use std::time::{Duration, Instant};
use support::world::{World, completed, connect, step_is, totp};
use support::{Error, Server, TestResult, req, wait_for_message};

const ADMIN_KEY: &str = "gh_services-test-admin-key-0123456789abcdef";
const PASSWORD: &str = "a long and new passphrase";

fn start(
    data: &Path,
    url: &str,
    service: &str,
    nats: &str,
) -> Result<Server, Box<dyn std::error::Error + Send + Sync>> {
    let master = URL_SAFE_NO_PAD.encode([7u8; 32]);
    std::fs::create_dir_all(data)?;
    Server::start_with_env(
        data,
        Some(url),
        &[
            ("GATEHOUSE_SERVICES", service),
            ("GATEHOUSE_ADMIN_KEY", ADMIN_KEY),
            ("GATEHOUSE_MASTER_KEY", &master),
            ("GATEHOUSE_NATS_URL", nats),
            (
                "GATEHOUSE_RELAY_EVENTS",
                if service == "events" { "true" } else { "false" },
            ),
        ],
    )
}

/// The world as seen through another process's channel.
async fn through(world: &World, server: &Server) -> Result<World, Error> {
    Ok(World {
        channel: connect(server).await?,
        ..world.clone()
    })
}

async fn run(root: &Path, url: &str) -> TestResult {
    let nats = std::env::var("GATEHOUSE_TEST_NATS_URL")
        .unwrap_or_else(|_| "nats://127.0.0.1:4222".to_string());
    let directory = start(&root.join("directory"), url, "directory", &nats)?;
    let mut signin_a = Some(start(&root.join("signin-a"), url, "signin", &nats)?);
    let signin_b = start(&root.join("signin-b"), url, "signin", &nats)?;
    let policy = start(&root.join("policy"), url, "policy", &nats)?;
    let risk = start(&root.join("risk"), url, "risk", &nats)?;
    let insights_a = start(&root.join("insights-a"), url, "insights", &nats)?;
    let insights_b = start(&root.join("insights-b"), url, "insights", &nats)?;
    let events = start(&root.join("events"), url, "events", &nats)?;

    // The tenant, its app and key, through the directory.
    let world = World::new(&directory, ADMIN_KEY).await?;
    let a = through(&world, signin_a.as_ref().ok_or("no replica a")?).await?;
    let b = through(&world, &signin_b).await?;

    // A process answers its own services only.
    let elsewhere = a.start("x@example.com", pb::PrimaryMethod::Password).await;
    if elsewhere.is_err() {
        return Err(format!("signin did not answer StartSignIn: {elsewhere:?}").into());
    }
    let not_here = through(&world, &directory)
        .await?
        .start("x@example.com", pb::PrimaryMethod::Password)
        .await;
    if not_here.map_err(|s| s.code()).err() != Some(tonic::Code::Unimplemented) {
        return Err("the directory process answered SignInService".into());
    }

    // Sign-up and the emailed code (the directory's notifier delivers to its outbox).
    let email = "ines@example.com";
    let mut users = UserServiceClient::new(world.channel.clone());
    let signed_up = users
        .sign_up(pb::SignUpRequest {
            tenant_id: world.tenant_id.clone(),
            client_id: world.client_id.clone(),
            email: email.into(),
            password: PASSWORD.into(),
            attributes: Default::default(),
        })
        .await?
        .into_inner();
    let code = wait_for_message(&root.join("directory"), email, 0)?
        .code
        .ok_or("no code")?;
    users
        .verify_email(pb::VerifyEmailRequest {
            tenant_id: world.tenant_id.clone(),
            user_id: signed_up.user_id.clone(),
            code,
        })
        .await?;
    let secret = world.enroll_totp(&signed_up.user_id).await?;

    // A policy (the policy service) requires MFA for the app.
    through(&world, &policy)
        .await?
        .require_mfa_policy("MFA everywhere", &world.app_id)
        .await?;

    // The sign-in, its steps alternating between the replicas. Both learn of the policy
    // from the log: until they do, a password completes the flow, so wait for the MFA step.
    let deadline = Instant::now() + Duration::from_secs(20);
    let flow = loop {
        let flow = a.start(email, pb::PrimaryMethod::Password).await?;
        let flow = b.password(&flow, PASSWORD).await?;
        if flow.next_step == pb::SignInStep::SelectMfaMethod as i32 {
            break flow;
        }
        if Instant::now() > deadline {
            return Err(format!("the policy never reached the replicas: {flow:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let flow = a.select(&flow, pb::MfaMethod::Totp).await?;
    step_is(&flow, pb::SignInStep::MfaCode)?;
    let done = b.mfa_code(&flow, &totp(&secret, 0)?).await?;
    completed(&done)?;
    let first_flow = done.id.clone();
    let tokens = done.tokens.ok_or("no tokens")?;

    // Replica a dies mid-flow; b finishes the flow from the log. (The TOTP code is the next
    // step's: the current one was spent.)
    let flow = a.start(email, pb::PrimaryMethod::Password).await?;
    let flow = a.password(&flow, PASSWORD).await?;
    step_is(&flow, pb::SignInStep::SelectMfaMethod)?;
    drop(signin_a.take());
    let flow = b.select(&flow, pb::MfaMethod::Totp).await?;
    let done = b.mfa_code(&flow, &totp(&secret, 30)?).await?;
    completed(&done)?;
    let second_flow = done.id.clone();

    // The events service reads both sign-ins' completion, and relays them to JetStream.
    // (Readers see events below the visibility horizon, which other transactions on the
    // same PostgreSQL server may hold back for a moment: read until both are there.)
    let mut log = EventServiceClient::new(connect(&events).await?);
    let deadline = Instant::now() + Duration::from_secs(30);
    let completions = loop {
        let (mut after, mut completions) = (0, Vec::new());
        loop {
            let page = log
                .read_events(req(
                    pb::ReadEventsRequest {
                        after,
                        filter: Some(pb::EventFilter {
                            tenant_id: world.tenant_id.clone(),
                            event_types: vec!["SignInCompleted".into()],
                            ..Default::default()
                        }),
                        page_size: 1000,
                    },
                    &world.key,
                )?)
                .await?
                .into_inner();
            completions.extend(page.events.into_iter().map(|e| (e.stream_id, e.position)));
            after = page.next_after;
            if page.end {
                break;
            }
        }
        let ids: Vec<&str> = completions.iter().map(|(id, _)| id.as_str()).collect();
        if ids.contains(&first_flow.as_str()) && ids.contains(&second_flow.as_str()) {
            break completions;
        }
        if Instant::now() > deadline {
            return Err(format!("the events service read {ids:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let client = async_nats::connect(&nats).await?;
    let jetstream = async_nats::jetstream::new(client);
    let subject = format!("gatehouse.{}.signin.SignInCompleted", world.tenant_id);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found = match jetstream.get_stream("GATEHOUSE_EVENTS").await {
            Ok(stream) => stream
                .get_last_raw_message_by_subject(&subject)
                .await
                .is_ok(),
            Err(_) => false,
        };
        if found {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("nothing relayed on {subject}").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The insights services: both sign-ins, each counted once (one process leads).
    let position = completions.iter().map(|(_, p)| *p).max().unwrap_or(0);
    for insights in [&insights_a, &insights_b] {
        let mut client = InsightsServiceClient::new(connect(insights).await?);
        let listed = client
            .list_sign_ins(req(
                pb::ListSignInsRequest {
                    tenant_id: world.tenant_id.clone(),
                    page_size: 50,
                    min_position: position,
                    ..Default::default()
                },
                &world.key,
            )?)
            .await?
            .into_inner();
        let ours: Vec<&pb::SignInRecord> = listed
            .sign_ins
            .iter()
            .filter(|s| s.id == first_flow || s.id == second_flow)
            .collect();
        if ours.len() != 2 || ours.iter().any(|s| s.outcome != "success") {
            return Err(format!("insights listed {:?}", listed.sign_ins).into());
        }
        let now = chrono::Utc::now();
        let summary = client
            .get_activity_summary(req(
                pb::GetActivitySummaryRequest {
                    tenant_id: world.tenant_id.clone(),
                    from: (now - chrono::Duration::hours(1)).to_rfc3339(),
                    to: (now + chrono::Duration::hours(1)).to_rfc3339(),
                    application_id: String::new(),
                    min_position: position,
                },
                &world.key,
            )?)
            .await?
            .into_inner();
        if summary.successes != 2 || summary.mfa_completions != 2 || summary.active_users != 1 {
            return Err(format!("counted twice or not at all: {summary:?}").into());
        }
    }
    let leaders = [&insights_a, &insights_b]
        .iter()
        .map(|server| server.http_get("/metrics"))
        .collect::<Result<Vec<_>, _>>()?
        .iter()
        .filter(|(_, text)| text.contains("gatehouse_projection_leased{projection=\"activity\"} 1"))
        .count();
    if leaders != 1 {
        return Err(format!("{leaders} insights processes lead the projection").into());
    }

    // The risk service: the analyst confirms the account compromised; a signin replica then
    // refuses the session's refresh.
    RiskServiceClient::new(connect(&risk).await?)
        .confirm_compromised(req(
            pb::UserRiskRequest {
                tenant_id: world.tenant_id.clone(),
                user_id: signed_up.user_id.clone(),
            },
            &world.key,
        )?)
        .await?;
    let refused = SessionServiceClient::new(connect(&signin_b).await?)
        .refresh_session(pb::RefreshSessionRequest {
            tenant_id: world.tenant_id.clone(),
            client_id: world.client_id.clone(),
            refresh_token: tokens.refresh_token.clone(),
        })
        .await;
    if refused.is_ok() {
        return Err("a compromised account's session was refreshed".into());
    }

    // Per-RPC metrics on the signin replica.
    let (_, metrics) = signin_b.http_get("/metrics")?;
    if !metrics.contains(
        "gatehouse_rpc_requests_total{method=\"gatehouse.v1.SignInService/SubmitMfaCode\",code=\"0\"}",
    ) || !metrics.contains("gatehouse_rpc_duration_seconds_bucket")
    {
        return Err(format!("no RPC metrics on signin: {metrics}").into());
    }
    if !metrics.contains("gatehouse_signin_flows_open") {
        return Err("no flows-in-flight gauge on signin".into());
    }
    let (_, metrics) = directory.http_get("/metrics")?;
    if !metrics.contains("gatehouse_notifier_backlog_positions") {
        return Err("no notifier backlog on directory".into());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_in_separate_processes() -> TestResult {
    let Some(url) = support::postgres_url().await? else {
        eprintln!("GATEHOUSE_TEST_DATABASE_URL not set: the multi-process run needs PostgreSQL");
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    run(dir.path(), &url).await
}
