//! The log for auditors and downstream services, against the running server and the
//! `gatehouse audit` commands, on SQLite and (when configured) PostgreSQL:
//!
//! - EventService `Subscribe`: a subscriber started mid-stream gets history then live events
//!   without gap or duplicate; resuming from a position; filters; tenant isolation; a
//!   subscriber that never reads holds back no append and later gets everything in order.
//! - Disclosure: personal data decrypted only for keys allowed to read it, secrets never,
//!   and nobody's after erasure.
//! - GetAggregateAt and GetTimeline over gRPC: states at a time, paging, tenant isolation.
//! - An incident (a password spray, a successful sign-in from a new country, the analyst's
//!   ConfirmCompromised) reconstructed by `audit timeline` and `audit state --at`.
//! - Export, import into an empty store (SQLite, whatever the source), the same answers and
//!   the same chain heads.
//! - Tampering with event rows directly in the database (altered, deleted, inserted, and
//!   altered then resealed) found by `audit verify` at the right position.

use crate::support;

use futures::StreamExt;
use gatehouse_events::{
    AppendRequest, EventFilter, EventStore, Metadata, NewEvent, RecordedEvent, StreamId,
};
use gatehouse_proto::v1 as pb;
use gatehouse_proto::v1::event_service_client::EventServiceClient;
use gatehouse_proto::v1::insights_service_client::InsightsServiceClient;
use gatehouse_proto::v1::risk_service_client::RiskServiceClient;
use gatehouse_proto::v1::tenant_service_client::TenantServiceClient;
use gatehouse_proto::v1::user_service_client::UserServiceClient;
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::world::{PASSWORD, World, completed, connect_from};
use support::{Error, NEW_YORK, PARIS, Server, TestResult, geoip_database, req};
use tonic::transport::Channel;

fn events(world: &World) -> EventServiceClient<Channel> {
    EventServiceClient::new(world.channel.clone())
}

/// Runs `gatehouse audit` on the test's store; (exit code, stdout).
fn audit(data: &Path, database_url: Option<&str>, args: &[&str]) -> Result<(i32, String), Error> {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"));
    command
        .arg("audit")
        .arg("--data")
        .arg(data)
        .env_remove("GATEHOUSE_DATABASE_URL")
        .env_remove("GATEHOUSE_MASTER_KEY")
        .env("GATEHOUSE_LOG", "warn");
    if let Some(url) = database_url {
        command.arg("--database-url").arg(url);
    }
    let output = command.args(args).output()?;
    let stdout = String::from_utf8(output.stdout)?;
    let code = output.status.code().ok_or("audit was killed")?;
    if code != 0 && code != 1 {
        return Err(format!(
            "audit {args:?} failed ({code}): {}",
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    Ok((code, stdout))
}

fn json(text: &str) -> Result<Value, Error> {
    Ok(serde_json::from_str(text.trim())?)
}

/// Every event of the store matching `filter`, in position order.
async fn all_events(
    store: &Arc<dyn EventStore>,
    filter: &EventFilter,
) -> Result<Vec<RecordedEvent>, Error> {
    let (mut after, mut found) = (0, Vec::new());
    loop {
        let batch = store.read_all(after, filter, 10_000).await?;
        let more = batch.events.len() == 10_000;
        after = batch.next;
        found.extend(batch.events);
        if !more {
            return Ok(found);
        }
    }
}

/// Reads `n` events from a subscription (15 s at most).
async fn take(
    stream: &mut tonic::Streaming<pb::Event>,
    n: usize,
    what: &str,
) -> Result<Vec<pb::Event>, Error> {
    let mut got = Vec::with_capacity(n);
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.next()).await {
            Ok(Some(event)) => got.push(event?),
            Ok(None) => return Err(format!("{what}: the stream ended after {}", got.len()).into()),
            Err(_) => return Err(format!("{what}: {} of {n} events arrived", got.len()).into()),
        }
    }
    Ok(got)
}

/// Checks that a subscription delivered exactly `expected`, in order, and then nothing more
/// for a moment (no duplicate, nothing extra).
async fn delivers_exactly(
    stream: &mut tonic::Streaming<pb::Event>,
    expected: &[RecordedEvent],
    what: &str,
) -> TestResult {
    let got = take(stream, expected.len(), what).await?;
    let got_ids: Vec<&str> = got.iter().map(|e| e.id.as_str()).collect();
    let want: Vec<String> = expected.iter().map(|e| e.id.to_string()).collect();
    if got_ids != want {
        return Err(format!("{what}: got {got_ids:?}, expected {want:?}").into());
    }
    if let Ok(Some(extra)) = tokio::time::timeout(Duration::from_millis(500), stream.next()).await {
        return Err(format!("{what}: one more event than the log holds: {extra:?}").into());
    }
    Ok(())
}

async fn subscribe(
    world: &World,
    key: &str,
    after: u64,
    filter: pb::EventFilter,
) -> Result<tonic::Streaming<pb::Event>, tonic::Status> {
    let request = req(
        pb::SubscribeRequest {
            after,
            filter: Some(filter),
        },
        key,
    )
    .map_err(|e| tonic::Status::internal(e.to_string()))?;
    Ok(events(world).subscribe(request).await?.into_inner())
}

/// Subscribe: history then live, resume, filters, isolation.
async fn subscriptions(world: &World, other: &World, store: &Arc<dyn EventStore>) -> TestResult {
    let users_of = |tenant: &str| -> Result<EventFilter, Error> {
        Ok(EventFilter {
            tenant_id: Some(tenant.parse()?),
            stream_types: vec!["user".into()],
            ..EventFilter::default()
        })
    };
    for i in 0..5 {
        world
            .create_user(&format!("early{i}@example.com"), true)
            .await?;
    }
    let history = all_events(store, &users_of(&world.tenant_id)?).await?;
    let filter = pb::EventFilter {
        tenant_id: world.tenant_id.clone(),
        stream_types: vec!["user".into()],
        ..Default::default()
    };
    // Started mid-stream: it must get the history, then what is appended while it runs.
    let mut live = subscribe(world, &world.key, 0, filter.clone()).await?;
    let first = take(&mut live, history.len(), "history").await?;
    for i in 0..20 {
        world
            .create_user(&format!("live{i}@example.com"), true)
            .await?;
        other
            .create_user(&format!("elsewhere{i}@example.com"), true)
            .await?;
    }
    let expected = all_events(store, &users_of(&world.tenant_id)?).await?;
    delivers_exactly(&mut live, &expected[first.len()..], "live").await?;

    // Resumed from the position of the 10th event: exactly what follows it.
    let tenth = expected.get(9).ok_or("too few events")?;
    let mut resumed = subscribe(world, &world.key, tenth.position, filter.clone()).await?;
    delivers_exactly(&mut resumed, &expected[10..], "resumed").await?;

    // An event-type filter.
    let mut created = subscribe(
        world,
        &world.key,
        0,
        pb::EventFilter {
            event_types: vec!["UserCreated".into()],
            ..filter.clone()
        },
    )
    .await?;
    let of_type: Vec<RecordedEvent> = expected
        .iter()
        .filter(|e| e.event_type == "UserCreated")
        .cloned()
        .collect();
    if of_type.len() != 25 {
        return Err(format!("{} UserCreated events", of_type.len()).into());
    }
    delivers_exactly(&mut created, &of_type, "UserCreated only").await?;

    // A tenant key sees its own tenant only: another tenant's id is not found, and no
    // filter means its own events.
    let denied = subscribe(world, &other.key, 0, filter.clone()).await;
    match denied {
        Err(status) if status.code() == tonic::Code::NotFound => {}
        Ok(mut stream) => match stream.next().await {
            Some(Err(status)) if status.code() == tonic::Code::NotFound => {}
            other => return Err(format!("another tenant's subscription: {other:?}").into()),
        },
        Err(status) => return Err(format!("another tenant's subscription: {status}").into()),
    }
    let mut own = subscribe(
        world,
        &other.key,
        0,
        pb::EventFilter {
            stream_types: vec!["user".into()],
            ..Default::default()
        },
    )
    .await?;
    let others = all_events(store, &users_of(&other.tenant_id)?).await?;
    delivers_exactly(&mut own, &others, "the other tenant's own events").await?;

    // Bad input is refused with the field named.
    let bad = subscribe(
        world,
        &world.key,
        0,
        pb::EventFilter {
            event_types: vec!["User Created; DROP".into()],
            ..Default::default()
        },
    )
    .await;
    match bad {
        Err(status) if status.code() == tonic::Code::InvalidArgument => Ok(()),
        other => Err(format!("a malformed event type: {:?}", other.err()).into()),
    }
}

/// ReadEvents pages, and personal data as each key may see it.
async fn disclosure(world: &World, store: &Arc<dyn EventStore>) -> TestResult {
    let created = all_events(
        store,
        &EventFilter {
            tenant_id: Some(world.tenant_id.parse()?),
            event_types: vec!["UserCreated".into()],
            ..EventFilter::default()
        },
    )
    .await?;
    let first = created.first().ok_or("no UserCreated")?;
    let read = |key: String| {
        let mut client = events(world);
        let request = req(
            pb::ReadEventsRequest {
                after: first.position - 1,
                filter: Some(pb::EventFilter {
                    event_types: vec!["UserCreated".into()],
                    ..Default::default()
                }),
                page_size: 1,
            },
            &key,
        );
        async move {
            let page = client.read_events(request?).await?.into_inner();
            let event = page.events.first().ok_or("empty page")?;
            json(&event.payload_json)
        }
    };
    let redacted = read(world.key.clone()).await?;
    if redacted["profile"] != "[redacted]" || redacted["credential"] != "[secret]" {
        return Err(format!("a key without personal data saw {redacted}").into());
    }
    let admin = read(world.admin.clone()).await?;
    if admin["profile"]["email"] != "early0@example.com" || admin["credential"] != "[secret]" {
        return Err(format!("the admin key saw {admin}").into());
    }
    // A tenant key may not create a key that reads personal data; the admin key may.
    let create = |key: &str, personal_data: bool| {
        let mut tenants = TenantServiceClient::new(world.channel.clone());
        let request = req(
            pb::CreateApiKeyRequest {
                tenant_id: world.tenant_id.clone(),
                name: "auditor".into(),
                personal_data,
            },
            key,
        );
        async move { Ok::<_, Error>(tenants.create_api_key(request?).await) }
    };
    match create(&world.key, true).await? {
        Err(status) if status.code() == tonic::Code::PermissionDenied => {}
        other => return Err(format!("a tenant key granted personal data: {other:?}").into()),
    }
    let auditor = create(&world.admin, true).await??.into_inner();
    if !auditor.key.as_ref().is_some_and(|k| k.personal_data) {
        return Err(format!("auditor key: {auditor:?}").into());
    }
    let opened = read(auditor.secret.clone()).await?;
    if opened["profile"]["email"] != "early0@example.com" || opened["credential"] != "[secret]" {
        return Err(format!("the auditor key saw {opened}").into());
    }
    // A key revoked while its subscription is open stops receiving at once.
    let head = all_events(store, &EventFilter::default())
        .await?
        .last()
        .map_or(0, |e| e.position);
    let mut open = subscribe(world, &auditor.secret, head, pb::EventFilter::default()).await?;
    TenantServiceClient::new(world.channel.clone())
        .revoke_api_key(req(
            pb::RevokeApiKeyRequest {
                tenant_id: world.tenant_id.clone(),
                key_id: auditor
                    .key
                    .as_ref()
                    .map(|k| k.id.clone())
                    .unwrap_or_default(),
            },
            &world.admin,
        )?)
        .await?;
    world
        .create_user("after.revocation@example.com", true)
        .await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout(Duration::from_secs(10), open.next()).await {
            Ok(Some(Err(status))) if status.code() == tonic::Code::Unauthenticated => break,
            // Events appended before the revocation may still come; not the new user's.
            Ok(Some(Ok(event)))
                if !event.payload_json.contains("after.revocation")
                    && Instant::now() < deadline => {}
            other => return Err(format!("a revoked key's subscription: {other:?}").into()),
        }
    }
    Ok(())
}

/// The tenant's user events as a Python `grpcio` client, knowing only reflection, receives
/// them from `Subscribe`, and its integrity report.
async fn python_subscriber(
    server: &Server,
    world: &World,
    store: &Arc<dyn EventStore>,
) -> TestResult {
    let expected = all_events(
        store,
        &EventFilter {
            tenant_id: Some(world.tenant_id.parse()?),
            stream_types: vec!["user".into()],
            ..EventFilter::default()
        },
    )
    .await?;
    let output = std::process::Command::new(support::python())
        .arg(support::tests_dir().join("python/events_client.py"))
        .arg(server.grpc.to_string())
        .arg(&world.key)
        .arg(expected.len().to_string())
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "events_client.py: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    let lines: Vec<&str> = stdout.lines().collect();
    let want: Vec<String> = expected
        .iter()
        .map(|e| format!("{} {} {}", e.position, e.id, e.event_type))
        .collect();
    if lines.len() != want.len() + 1 || lines[..want.len()] != want[..] {
        return Err(format!("the Python subscriber printed:\n{stdout}").into());
    }
    if !lines[want.len()].starts_with("intact true ") {
        return Err(format!("the Python client's report: {}", lines[want.len()]).into());
    }
    Ok(())
}

/// After erasure, a user's personal data is unreadable for everyone, the admin key included.
async fn erasure(world: &World, store: &Arc<dyn EventStore>) -> TestResult {
    let erased = world.create_user("erased@example.com", true).await?;
    UserServiceClient::new(world.channel.clone())
        .erase_user(req(
            pb::UserRef {
                tenant_id: world.tenant_id.clone(),
                user_id: erased.clone(),
            },
            &world.admin,
        )?)
        .await?;
    let stream = all_events(
        store,
        &EventFilter {
            tenant_id: Some(world.tenant_id.parse()?),
            stream_types: vec!["user".into()],
            event_types: vec!["UserCreated".into()],
        },
    )
    .await?
    .into_iter()
    .find(|e| e.stream.id.to_string() == erased)
    .ok_or("no UserCreated for the erased user")?;
    let page = events(world)
        .read_events(req(
            pb::ReadEventsRequest {
                after: stream.position - 1,
                filter: Some(pb::EventFilter {
                    stream_id: erased.clone(),
                    ..Default::default()
                }),
                page_size: 10,
            },
            &world.admin,
        )?)
        .await?
        .into_inner();
    let created = page
        .events
        .iter()
        .find(|e| e.event_type == "UserCreated")
        .ok_or("UserCreated not read")?;
    let payload = json(&created.payload_json)?;
    if payload["profile"] != "[erased]" || payload["credential"] != "[secret]" {
        return Err(format!("an erased user's payload: {payload}").into());
    }
    if page.events.iter().any(|e| e.stream_id != erased) {
        return Err("the stream_id filter let other streams through".into());
    }
    Ok(())
}

/// GetAggregateAt and GetTimeline over gRPC, with tenant isolation and paging.
async fn replay_over_grpc(world: &World, other: &World, incident: &Incident) -> TestResult {
    let at = |key: &str, kind: &str, id: &str, at: &str| {
        let mut client = events(world);
        let request = req(
            pb::GetAggregateAtRequest {
                tenant_id: String::new(),
                stream_type: kind.into(),
                stream_id: id.into(),
                at: at.into(),
            },
            key,
        );
        async move { Ok::<_, Error>(client.get_aggregate_at(request?).await) }
    };
    let then = at(
        &world.key,
        "session",
        &incident.session_id,
        &incident.between,
    )
    .await??
    .into_inner();
    let now = at(&world.key, "session", &incident.session_id, "")
        .await??
        .into_inner();
    let (then_state, now_state) = (json(&then.state_json)?, json(&now.state_json)?);
    if !then_state["revoked"].is_null()
        || now_state["revoked"] != "compromised"
        || then.version >= now.version
    {
        return Err(format!("session over gRPC: then {then:?}, now {now:?}").into());
    }
    let user = at(&world.key, "user", &incident.victim, "")
        .await??
        .into_inner();
    let user_state = json(&user.state_json)?;
    if user_state["profile"] != "[redacted]" || user_state["credential"] != "[secret]" {
        return Err(format!("a key without personal data saw the user as {user_state}").into());
    }
    for (key, kind, id, at_text, code, case) in [
        (
            &other.key,
            "session",
            incident.session_id.as_str(),
            "",
            tonic::Code::NotFound,
            "another tenant's session",
        ),
        (
            &world.key,
            "session",
            incident.session_id.as_str(),
            "1",
            tonic::Code::NotFound,
            "before it existed",
        ),
        (
            &world.key,
            "nonsense",
            incident.session_id.as_str(),
            "",
            tonic::Code::InvalidArgument,
            "unknown type",
        ),
        (
            &world.key,
            "session",
            "not-an-id",
            "",
            tonic::Code::InvalidArgument,
            "bad id",
        ),
        (
            &world.key,
            "session",
            incident.session_id.as_str(),
            "yesterday",
            tonic::Code::InvalidArgument,
            "bad time",
        ),
    ] {
        match at(key, kind, id, at_text).await? {
            Err(status) if status.code() == code => {}
            other => return Err(format!("{case}: {other:?}").into()),
        }
    }

    // The victim's timeline, a page of 7 at a time.
    let mut entries = Vec::new();
    let mut after = 0;
    loop {
        let page = events(world)
            .get_timeline(req(
                pb::GetTimelineRequest {
                    subject: Some(pb::get_timeline_request::Subject::UserId(
                        incident.victim.clone(),
                    )),
                    after,
                    page_size: 7,
                    ..Default::default()
                },
                &world.key,
            )?)
            .await?
            .into_inner();
        if page.entries.len() > 7 {
            return Err("a page longer than asked".into());
        }
        entries.extend(page.entries);
        if page.next_after == 0 {
            break;
        }
        after = page.next_after;
    }
    let positions: Vec<u64> = entries
        .iter()
        .filter_map(|e| e.event.as_ref().map(|e| e.position))
        .collect();
    if entries.len() < 15 || positions.windows(2).any(|w| w[0] >= w[1]) {
        return Err(format!("timeline over gRPC: {positions:?}").into());
    }
    if !entries.iter().any(|e| {
        e.description
            .starts_with("compromise confirmed on userrisk")
            && e.event
                .as_ref()
                .is_some_and(|e| e.actor.starts_with("api_key:"))
    }) {
        return Err("the analyst's confirmation is not in the timeline".into());
    }
    // The activity projection's sign-in log tells the same story from real flows: the
    // victim's usual sign-ins from France and the attacker's from the United States.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let log = InsightsServiceClient::new(world.channel.clone())
            .list_sign_ins(req(
                pb::ListSignInsRequest {
                    user_id: incident.victim.clone(),
                    outcome: "success".into(),
                    ..Default::default()
                },
                &world.key,
            )?)
            .await?
            .into_inner()
            .sign_ins;
        let attacker = log
            .iter()
            .find(|s| s.ip == NEW_YORK && s.country == "US" && s.primary_method == "password");
        if log.len() == 3
            && attacker.is_some()
            && log.iter().filter(|s| s.country == "FR").count() == 2
        {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("the victim's sign-in log: {log:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Another tenant's key finds nothing of it.
    let foreign = events(world)
        .get_timeline(req(
            pb::GetTimelineRequest {
                subject: Some(pb::get_timeline_request::Subject::UserId(
                    incident.victim.clone(),
                )),
                ..Default::default()
            },
            &other.key,
        )?)
        .await?
        .into_inner();
    if !foreign.entries.is_empty() {
        return Err(format!("another tenant saw {} entries", foreign.entries.len()).into());
    }
    Ok(())
}

/// What the incident left behind, for the checks after the server stops.
struct Incident {
    victim: String,
    session_id: String,
    /// After the attacker's sign-in, before the analyst's action.
    between: String,
}

/// A spray from New York over six accounts, the victim's password then working from there
/// (a country the victim never signed in from), and the analyst confirming the compromise.
async fn incident(server: &Server, world: &World) -> Result<Incident, Error> {
    let victim = world.create_user("victim@example.com", true).await?;
    let paris = World {
        channel: connect_from(server, PARIS).await?,
        ..world.clone()
    };
    let attacker = World {
        channel: connect_from(server, NEW_YORK).await?,
        ..world.clone()
    };
    for _ in 0..2 {
        let flow = paris
            .start("victim@example.com", pb::PrimaryMethod::Password)
            .await?;
        completed(&paris.password(&flow, PASSWORD).await?)?;
    }
    let mut targets = vec!["victim@example.com".to_string()];
    for i in 0..5 {
        let email = format!("sprayed{i}@example.com");
        world.create_user(&email, true).await?;
        targets.push(email);
    }
    for email in &targets {
        let flow = attacker.start(email, pb::PrimaryMethod::Password).await?;
        let _ = attacker.password(&flow, "Summer2026!").await;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let flow = attacker
        .start("victim@example.com", pb::PrimaryMethod::Password)
        .await?;
    let done = attacker.password(&flow, PASSWORD).await?;
    completed(&done)?;
    let session_id = done.session_id.clone();
    if session_id.is_empty() {
        return Err(format!("no session: {done:?}").into());
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let between = chrono::Utc::now().to_rfc3339();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    RiskServiceClient::new(world.channel.clone())
        .confirm_compromised(req(
            pb::UserRiskRequest {
                tenant_id: world.tenant_id.clone(),
                user_id: victim.clone(),
            },
            &world.key,
        )?)
        .await?;
    Ok(Incident {
        victim,
        session_id,
        between,
    })
}

/// The incident as `gatehouse audit` tells it.
fn reconstruct(data: &Path, url: Option<&str>, incident: &Incident) -> TestResult {
    let (_, text) = audit(
        data,
        url,
        &["timeline", "--user", &incident.victim, "--json"],
    )?;
    let lines: Vec<Value> = text.lines().map(json).collect::<Result<_, _>>()?;
    let index = |what: &str, matches: &dyn Fn(&Value) -> bool| {
        lines
            .iter()
            .position(matches)
            .ok_or_else(|| format!("the timeline has no {what}: {text}"))
    };
    let from_new_york = |l: &Value| l["context"]["ip"] == NEW_YORK;
    let sprayed = index("rejected password from New York", &|l| {
        l["event_type"] == "PasswordRejected" && from_new_york(l)
    })?;
    let signed_in = index("sign-in from New York", &|l| {
        l["event_type"] == "SignInCompleted" && from_new_york(l)
    })?;
    let assessed = index("risk assessment naming the US", &|l| {
        l["event_type"] == "RiskAssessed"
            && from_new_york(l)
            && l["description"]
                .as_str()
                .is_some_and(|d| d.contains("country US"))
    })?;
    let confirmed = index("confirmed compromise", &|l| {
        l["event_type"] == "CompromiseConfirmed"
    })?;
    let revoked = index("session revoked", &|l| {
        l["event_type"] == "SessionRevoked" && l["stream"]["id"] == incident.session_id
    })?;
    if !(sprayed < signed_in
        && assessed < signed_in
        && signed_in < confirmed
        && confirmed < revoked)
    {
        return Err(format!(
            "order: sprayed {sprayed}, assessed {assessed}, signed in {signed_in}, confirmed \
             {confirmed}, revoked {revoked}:\n{text}"
        )
        .into());
    }
    // Positions strictly increase: log order.
    let positions: Vec<u64> = lines
        .iter()
        .filter_map(|l| l["position"].as_u64())
        .collect();
    if positions.len() != lines.len() || positions.windows(2).any(|w| w[0] >= w[1]) {
        return Err(format!("timeline out of order: {positions:?}").into());
    }
    // The human form has one line per event.
    let (_, human) = audit(data, url, &["timeline", "--user", &incident.victim])?;
    if human.lines().count() != lines.len() || !human.contains("compromise confirmed on userrisk") {
        return Err(format!("human timeline:\n{human}").into());
    }
    // The spray's other accounts are in the IP's timeline, not the victim's.
    let (_, by_ip) = audit(data, url, &["timeline", "--ip", NEW_YORK, "--json"])?;
    let rejected = by_ip
        .lines()
        .map(json)
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|l| l["event_type"] == "PasswordRejected")
        .count();
    if rejected != 6 {
        return Err(format!("{rejected} rejected passwords from New York:\n{by_ip}").into());
    }

    // States at each point.
    let state = |kind: &str, id: &str, at: &str| -> Result<Value, Error> {
        json(&audit(data, url, &["state", kind, id, "--at", at])?.1)
    };
    let session_then = state("session", &incident.session_id, &incident.between)?;
    let session_now = state("session", &incident.session_id, "")?;
    if !session_then["state"]["revoked"].is_null()
        || session_now["state"]["revoked"] != "compromised"
    {
        return Err(format!("session then {session_then}, now {session_now}").into());
    }
    let risk_then = state("userrisk", &incident.victim, &incident.between)?;
    let risk_now = state("userrisk", &incident.victim, "")?;
    if risk_then["state"]["state"] == "confirmed_compromised"
        || risk_now["state"]["state"] != "confirmed_compromised"
    {
        return Err(format!("risk then {risk_then}, now {risk_now}").into());
    }
    // At the position just before the confirmation, the risk was not confirmed either.
    let confirmed_at = lines[confirmed]["position"].as_u64().ok_or("position")?;
    let before = state(
        "userrisk",
        &incident.victim,
        &(confirmed_at - 1).to_string(),
    )?;
    if before["state"]["state"] == "confirmed_compromised" {
        return Err(format!("risk before the confirmation: {before}").into());
    }
    // The operator holds the master key: the user's profile is readable, the hash is not.
    let user = state("user", &incident.victim, "")?;
    if user["state"]["profile"]["email"] != "victim@example.com"
        || user["state"]["credential"] != "[secret]"
    {
        return Err(format!("user state: {user}").into());
    }
    Ok(())
}

/// Export the tenant, import it into an empty SQLite store, and ask the same questions.
fn export_import(
    data: &Path,
    url: Option<&str>,
    tenant_id: &str,
    incident: &Incident,
) -> TestResult {
    let (_, export) = audit(data, url, &["export", "--tenant", tenant_id])?;
    let copy = tempfile::tempdir()?;
    let file = copy.path().join("export.ndjson");
    std::fs::write(&file, &export)?;
    let target = copy.path().join("imported");
    std::fs::create_dir_all(&target)?;
    std::fs::copy(data.join("master.key"), target.join("master.key"))?;
    let (_, imported) = audit(&target, None, &["import", file.to_str().ok_or("path")?])?;
    let events = export
        .lines()
        .filter(|l| l.starts_with("{\"event\""))
        .count();
    if imported.trim() != format!("imported {events} events") || events < 50 {
        return Err(format!("import said {imported:?} for {events} events").into());
    }
    // A second import into the now non-empty store is refused.
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args(["audit", "--data"])
        .arg(&target)
        .arg("import")
        .arg(&file)
        .env_remove("GATEHOUSE_DATABASE_URL")
        .output()?;
    if again.status.success() {
        return Err("a second import was accepted".into());
    }
    for (kind, id, at) in [
        ("user", incident.victim.as_str(), ""),
        (
            "userrisk",
            incident.victim.as_str(),
            incident.between.as_str(),
        ),
        ("userrisk", incident.victim.as_str(), ""),
        (
            "session",
            incident.session_id.as_str(),
            incident.between.as_str(),
        ),
        ("session", incident.session_id.as_str(), ""),
    ] {
        let source = json(&audit(data, url, &["state", kind, id, "--at", at])?.1)?;
        let copied = json(&audit(&target, None, &["state", kind, id, "--at", at])?.1)?;
        if source["state"] != copied["state"] || source["version"] != copied["version"] {
            return Err(format!("{kind} {id} at {at:?}: {source} vs {copied}").into());
        }
    }
    // The position is not part of a link: the imported chain has the same head.
    let head = |data: &Path, url: Option<&str>| -> Result<Value, Error> {
        let report = json(&audit(data, url, &["verify", "--tenant", tenant_id])?.1)?;
        if report["intact"] != true {
            return Err(format!("verify: {report}").into());
        }
        Ok(report["heads"][0]["hash"].clone())
    };
    let (source, copied) = (head(data, url)?, head(&target, None)?);
    if source != copied || source.is_null() {
        return Err(format!("chain heads differ: {source} vs {copied}").into());
    }
    Ok(())
}

/// Direct access to the store's tables, as an attacker with database access has.
enum Database {
    Sqlite(std::path::PathBuf),
    Postgres(sqlx::PgPool),
}

impl Database {
    async fn execute(&self, sql: &str) -> TestResult {
        match self {
            Database::Sqlite(path) => {
                let connection = rusqlite::Connection::open(path)?;
                connection.execute_batch(sql)?;
            }
            Database::Postgres(pool) => {
                sqlx::raw_sql(sql).execute(pool).await?;
            }
        }
        Ok(())
    }
}

/// `audit verify`: (intact, first broken position, reason).
fn verify(data: &Path, url: Option<&str>, args: &[&str]) -> Result<(bool, u64, String), Error> {
    let mut all = vec!["verify"];
    all.extend_from_slice(args);
    let (code, text) = audit(data, url, &all)?;
    let report = json(&text)?;
    let intact = report["intact"] == true;
    if intact != (code == 0) {
        return Err(format!("exit code {code} for {report}").into());
    }
    Ok((
        intact,
        report["broken"]["position"].as_u64().unwrap_or(0),
        report["broken"]["reason"]
            .as_str()
            .unwrap_or("")
            .to_string(),
    ))
}

fn broken_at(found: (bool, u64, String), position: u64, reason: &str, case: &str) -> TestResult {
    if found.0 || found.1 != position || !found.2.contains(reason) {
        return Err(
            format!("{case}: expected broken at {position} ({reason}), got {found:?}").into(),
        );
    }
    Ok(())
}

async fn tampering(
    data: &Path,
    url: Option<&str>,
    store: &Arc<dyn EventStore>,
    tenant_id: &str,
) -> TestResult {
    let database = match url {
        Some(url) => Database::Postgres(sqlx::PgPool::connect(url).await?),
        None => Database::Sqlite(data.join("events.db")),
    };
    let intact = |case: &str| -> TestResult {
        let found = verify(data, url, &[])?;
        if !found.0 {
            return Err(format!("{case}: {found:?}").into());
        }
        Ok(())
    };
    intact("untouched")?;
    let tenant: uuid::Uuid = tenant_id.parse()?;
    let log = all_events(
        store,
        &EventFilter {
            tenant_id: Some(tenant),
            ..EventFilter::default()
        },
    )
    .await?;
    let at = |i: usize| log.get(i).map(|e| e.position).ok_or("too few events");
    let pg = url.is_some();

    // Altered: one payload changed.
    let altered = at(20)?;
    database
        .execute(&format!(
            "CREATE TABLE saved AS SELECT * FROM events WHERE position = {altered}; \
             UPDATE events SET payload = {} WHERE position = {altered}",
            if pg {
                "'{\"tampered\": true}'::jsonb"
            } else {
                "'{\"tampered\": true}'"
            }
        ))
        .await?;
    broken_at(
        verify(data, url, &[])?,
        altered,
        "does not match its seal",
        "altered",
    )?;
    // The tenant's own verification finds it too; another tenant's chain is unaffected.
    broken_at(
        verify(data, url, &["--tenant", tenant_id])?,
        altered,
        "does not match its seal",
        "altered, one tenant",
    )?;
    database
        .execute(&format!(
            "DELETE FROM events WHERE position = {altered}; \
             INSERT INTO events SELECT * FROM saved; DROP TABLE saved"
        ))
        .await?;
    intact("restored")?;

    // Deleted.
    let deleted = at(25)?;
    database
        .execute(&format!(
            "CREATE TABLE saved AS SELECT * FROM events WHERE position = {deleted}; \
             DELETE FROM events WHERE position = {deleted}"
        ))
        .await?;
    broken_at(verify(data, url, &[])?, deleted, "missing", "deleted")?;
    database
        .execute("INSERT INTO events SELECT * FROM saved; DROP TABLE saved")
        .await?;
    intact("reinserted")?;

    // Inserted: a forged event slipped in among sealed ones. PostgreSQL positions leave room
    // between transactions; SQLite's are dense, so the rows after it are moved up by one.
    let copied = at(30)?;
    let columns = "event_id, tenant_id, stream_type, stream_id, version, event_type, \
        schema_version, recorded_at, correlation_id, causation_id, actor, client_ip, user_agent, payload";
    let forged = "tenant_id, stream_type, stream_id, version + 1000000, event_type, \
        schema_version, recorded_at, correlation_id, causation_id, actor, client_ip, user_agent, payload";
    let inserted = if pg {
        let inserted = copied + (1 << 19);
        database
            .execute(&format!(
                "INSERT INTO events (position, {columns}) SELECT {inserted}, gen_random_uuid(), \
                 {forged} FROM events WHERE position = {copied}"
            ))
            .await?;
        inserted
    } else {
        database
            .execute(&format!(
                "UPDATE events SET position = -position WHERE position >= {copied}; \
                 UPDATE events SET position = 1 - position WHERE position < 0; \
                 INSERT INTO events (position, {columns}) SELECT {copied}, randomblob(16), \
                 {forged} FROM events WHERE position = {copied} + 1"
            ))
            .await?;
        copied
    };
    let reason = if pg {
        "no seal"
    } else {
        "does not match its seal"
    };
    broken_at(verify(data, url, &[])?, inserted, reason, "inserted")?;
    if pg {
        database
            .execute(&format!("DELETE FROM events WHERE position = {inserted}"))
            .await?;
    } else {
        database
            .execute(&format!(
                "DELETE FROM events WHERE position = {copied}; \
                 UPDATE events SET position = -position WHERE position > {copied}; \
                 UPDATE events SET position = -position - 1 WHERE position < 0"
            ))
            .await?;
    }
    intact("forgery removed")?;

    // An auditor with only a public key: the wrong one fails the first signature.
    let first_signed = store
        .integrity_checkpoints(None)
        .await?
        .first()
        .map(|c| c.position)
        .ok_or("no signed checkpoint")?;
    broken_at(
        verify(data, url, &["--public-key", &"ab".repeat(32)])?,
        first_signed,
        "signature",
        "wrong public key",
    )?;

    // The sealed point moved back (to pass later rewrites off as unsealed events).
    let sealed = store
        .load_checkpoint("integrity:sealer")
        .await?
        .ok_or("no sealed point")?;
    let moved_back = at(40)?;
    database
        .execute(&format!(
            "UPDATE checkpoints SET position = {moved_back} WHERE name = 'integrity:sealer'"
        ))
        .await?;
    let first_above = store
        .read_seals(None, moved_back, 1)
        .await?
        .first()
        .map(|s| s.position)
        .ok_or("no seal above")?;
    broken_at(
        verify(data, url, &[])?,
        first_above,
        "moved back",
        "sealed point moved back",
    )?;
    database
        .execute(&format!(
            "UPDATE checkpoints SET position = {sealed} WHERE name = 'integrity:sealer'"
        ))
        .await?;
    intact("sealed point restored")?;

    // Altered and resealed: whoever can write the tables recomputes the seals after the
    // change; the chain is consistent again, but no longer reaches the head signed earlier.
    let checkpoints = store.integrity_checkpoints(Some(tenant)).await?;
    let last_signed = checkpoints.last().ok_or("no signed checkpoint")?.position;
    let rewritten = log
        .iter()
        .map(|e| e.position)
        .find(|p| *p < last_signed)
        .ok_or("nothing before the checkpoint")?;
    let first_signed_after = checkpoints
        .iter()
        .map(|c| c.position)
        .find(|p| *p >= rewritten)
        .ok_or("no checkpoint after")?;
    database
        .execute(&format!(
            "UPDATE events SET payload = {} WHERE position = {rewritten}; \
             DELETE FROM event_seals WHERE position >= {rewritten}; \
             UPDATE checkpoints SET position = {} WHERE name = 'integrity:sealer'",
            if pg {
                "'{\"tampered\": true}'::jsonb"
            } else {
                "'{\"tampered\": true}'"
            },
            rewritten - 1
        ))
        .await?;
    broken_at(
        verify(data, url, &["--seal"])?,
        first_signed_after,
        "differs from the checkpoint",
        "altered and resealed",
    )?;
    Ok(())
}

async fn run_all(data: &Path, database_url: Option<&str>) -> TestResult {
    let geoip = geoip_database(data)?;
    let server = Server::start_with_env(
        data,
        database_url,
        &[
            ("GATEHOUSE_GEOIP_DATABASE", geoip.to_str().ok_or("path")?),
            ("GATEHOUSE_INTEGRITY_CHECKPOINT_SECONDS", "1"),
        ],
    )?;
    let admin = server.printed_admin_key().ok_or("no admin key")?;
    let world = World::new(&server, &admin).await?;
    let other = World::new(&server, &admin).await?;
    let url = database_url.map_or_else(
        || format!("sqlite://{}", data.join("events.db").display()),
        str::to_string,
    );
    let store = gatehouse_events::connect(&url).await?;

    // A subscriber to the whole log that never reads while everything below happens.
    let mut stalled = subscribe(&world, &admin, 0, pb::EventFilter::default()).await?;
    let started = Instant::now();
    subscriptions(&world, &other, &store).await?;
    disclosure(&world, &store).await?;
    erasure(&world, &store).await?;
    let incident = incident(&server, &world).await?;
    replay_over_grpc(&world, &other, &incident).await?;
    python_subscriber(&server, &world, &store).await?;
    // Far more than HTTP/2 lets a stream buffer (64 KiB): the stalled stream is held back by
    // flow control, and the appends go on regardless.
    let tenant: uuid::Uuid = other.tenant_id.parse()?;
    for batch in 0..40 {
        let mut append = AppendRequest::new(Metadata::system());
        for i in 0..50 {
            append.push(NewEvent {
                tenant_id: tenant,
                stream: StreamId::new("loadtest", uuid::Uuid::now_v7()),
                event_type: "LoadGenerated".into(),
                schema_version: 1,
                payload: serde_json::json!({"batch": batch, "i": i, "text": "x".repeat(300)}),
            });
        }
        tokio::time::timeout(Duration::from_secs(10), store.append(append))
            .await
            .map_err(|_| "an append waited on the stalled subscriber")??;
    }
    eprintln!(
        "activity took {:?} beside a stalled subscriber",
        started.elapsed()
    );
    // It now gets every event of the log, in order, none missing.
    let everything = all_events(&store, &EventFilter::default()).await?;
    let got = take(&mut stalled, everything.len(), "stalled subscriber").await?;
    let got: Vec<u64> = got.iter().map(|e| e.position).collect();
    let want: Vec<u64> = everything.iter().map(|e| e.position).collect();
    if got != want {
        return Err("the stalled subscriber's events differ from the log".into());
    }
    drop(stalled);

    // Sealed and signed within seconds, as the server reports it.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let report = events(&world)
            .verify_integrity(req(pb::VerifyIntegrityRequest::default(), &world.key)?)
            .await?
            .into_inner();
        if !report.intact {
            return Err(format!("live log not intact: {report:?}").into());
        }
        if report.heads.iter().any(|h| h.tenant_id != world.tenant_id) {
            return Err(format!("a tenant key saw another chain: {report:?}").into());
        }
        if report.unsealed == 0 && report.checkpoints_checked > 0 {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("not sealed in time: {report:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.stop()?;

    reconstruct(data, database_url, &incident)?;
    export_import(data, database_url, &world.tenant_id, &incident)?;
    tampering(data, database_url, &store, &world.tenant_id).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn audit_on_sqlite() -> TestResult {
    let dir = tempfile::tempdir()?;
    run_all(dir.path(), None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn audit_on_postgres() -> TestResult {
    let Some(url) = support::postgres_url().await? else {
        eprintln!("GATEHOUSE_TEST_DATABASE_URL not set: PostgreSQL run skipped");
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    run_all(dir.path(), Some(&url)).await
}
