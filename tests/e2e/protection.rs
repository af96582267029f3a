//! Identity Protection end to end, against the running server with a GeoIP database, an
//! anonymiser list and a real NATS server:
//!
//! - scripted attacks, each checked for its detection's kind, level, timing and evidence (the
//!   events in the log that caused it): an anonymiser sign-in, two sign-ins 5 800 km apart
//!   minutes apart, a first sign-in from a new country and browser after the learning
//!   period, a leaked password at sign-up and at sign-in, a reused refresh token; and none
//!   for an ordinary user signing in as usual;
//! - risk-based Conditional Access: "sign-in risk ≥ medium → MFA" challenges the anonymiser
//!   sign-in and passing MFA remediates it; "user risk high → MFA and password change"
//!   forces a change that remediates the user; a user at high risk without MFA is blocked;
//! - the analyst's actions (ConfirmCompromised revokes sessions and forces a password change;
//!   ConfirmSafe, DismissRisk), the reports with filters and paging, the NDJSON and CSV
//!   export, and a NATS subscriber receiving a detection.
//!
//! SQLite always; PostgreSQL when configured. NATS at `GATEHOUSE_TEST_NATS_URL` (default
//! `nats://127.0.0.1:4222`) must be running.

use crate::support;

use futures::StreamExt;
use gatehouse_events::{EventFilter, EventStore, RecordedEvent};
use gatehouse_proto::v1 as pb;
use gatehouse_proto::v1::policy_service_client::PolicyServiceClient;
use gatehouse_proto::v1::risk_service_client::RiskServiceClient;
use gatehouse_proto::v1::user_service_client::UserServiceClient;
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::world::{PASSWORD, World, completed, step_is, totp};
use support::{Error, JAPAN, NEW_YORK, PARIS, Server, TestResult, detections, geoip_database, req};
use tonic::transport::Channel;

const CHROME_WINDOWS: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 \
                              (KHTML, like Gecko) Chrome/130.0 Safari/537.36";
const FIREFOX_LINUX: &str =
    "Mozilla/5.0 (X11; Linux x86_64; rv:131.0) Gecko/20100101 Firefox/131.0";
/// Listed as an anonymiser.
const ANONYMISER: &str = "127.0.0.98";
/// In the built-in breached-password list.
const LEAKED: &str = "password123";

/// A world whose connections come from `source` with `user_agent`.
async fn client(
    world: &World,
    server: &Server,
    source: &str,
    user_agent: &str,
) -> Result<World, Error> {
    let channel = tonic::transport::Endpoint::from_shared(server.grpc_url())?
        .local_address(Some(source.parse()?))
        .user_agent(user_agent)?
        .connect()
        .await?;
    Ok(World {
        channel,
        ..world.clone()
    })
}

fn risk(world: &World) -> RiskServiceClient<Channel> {
    RiskServiceClient::new(world.channel.clone())
}

/// A password sign-in that completes without anything else asked.
async fn signs_in(world: &World, email: &str, password: &str) -> Result<pb::SignIn, Error> {
    let flow = world.start(email, pb::PrimaryMethod::Password).await?;
    let done = world.password(&flow, password).await?;
    completed(&done)?;
    Ok(done)
}

/// Passes the TOTP step of a flow waiting for a second factor.
async fn pass_totp(world: &World, flow: &pb::SignIn, secret: &str) -> Result<pb::SignIn, Error> {
    step_is(flow, pb::SignInStep::SelectMfaMethod)?;
    let flow = world.select(flow, pb::MfaMethod::Totp).await?;
    Ok(world.mfa_code(&flow, &totp(secret, 0)?).await?)
}

/// Waits (15 s at most) for the one detection of `kind` naming `user_id`.
async fn detection_of(
    store: &Arc<dyn EventStore>,
    kind: &str,
    user_id: &str,
) -> Result<(RecordedEvent, serde_json::Value), Error> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let found: Vec<_> = detections(store)
            .await?
            .into_iter()
            .filter(|(_, p)| p["kind"] == kind && p["user_id"] == user_id)
            .collect();
        match found.as_slice() {
            [one] => return Ok(one.clone()),
            [] if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            _ => return Err(format!("{kind} for {user_id}: {found:?}").into()),
        }
    }
}

/// The event types of a detection's evidence, read back from the log by position (and
/// checked to be the events named).
async fn evidence_types(
    store: &Arc<dyn EventStore>,
    detection: &serde_json::Value,
) -> Result<Vec<String>, Error> {
    let mut types = Vec::new();
    for item in detection["evidence"].as_array().ok_or("no evidence")? {
        let position = item["position"].as_u64().ok_or("position")?;
        let batch = store
            .read_all(position - 1, &EventFilter::default(), 1)
            .await?;
        let event = batch.events.first().ok_or("evidence not in the log")?;
        if event.id.to_string() != item["event_id"].as_str().unwrap_or_default() {
            return Err(format!("evidence {item} is {event:?}").into());
        }
        types.push(event.event_type.clone());
    }
    Ok(types)
}

fn check(detection: &serde_json::Value, level: &str, timing: &str) -> TestResult {
    if detection["level"] != level || detection["timing"] != timing {
        return Err(format!("expected {level} {timing}: {detection}").into());
    }
    Ok(())
}

/// Polls the user's risk until `done` holds (the view follows the log).
async fn user_risk_until(
    world: &World,
    user_id: &str,
    what: &str,
    done: impl Fn(&pb::UserRisk) -> bool,
) -> Result<pb::UserRiskHistory, Error> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let history = risk(world)
            .get_user_risk_history(req(
                pb::UserRiskRequest {
                    tenant_id: world.tenant_id.clone(),
                    user_id: user_id.into(),
                },
                &world.key,
            )?)
            .await?
            .into_inner();
        let current = history.risk.clone().ok_or("no risk")?;
        if done(&current) {
            return Ok(history);
        }
        if Instant::now() > deadline {
            return Err(format!("{what}: {history:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn create_policy(
    world: &World,
    definition: pb::PolicyDefinition,
) -> Result<pb::Policy, Error> {
    Ok(PolicyServiceClient::new(world.channel.clone())
        .create_policy(req(
            pb::CreatePolicyRequest {
                tenant_id: world.tenant_id.clone(),
                definition: Some(definition),
                state: pb::PolicyState::Enabled as i32,
                acknowledge_warnings: false,
            },
            &world.key,
        )?)
        .await?
        .into_inner())
}

async fn disable(world: &World, policy: &pb::Policy) -> TestResult {
    PolicyServiceClient::new(world.channel.clone())
        .set_policy_state(req(
            pb::SetPolicyStateRequest {
                tenant_id: world.tenant_id.clone(),
                policy_id: policy.id.clone(),
                state: pb::PolicyState::Disabled as i32,
            },
            &world.key,
        )?)
        .await?;
    Ok(())
}

fn everyone(
    conditions: pb::PolicyConditions,
    controls: &[pb::GrantControl],
    name: &str,
) -> pb::PolicyDefinition {
    pb::PolicyDefinition {
        name: name.into(),
        users: Some(pb::UserAssignment {
            all: true,
            ..Default::default()
        }),
        apps: Some(pb::AppAssignment {
            all: true,
            ..Default::default()
        }),
        conditions: Some(conditions),
        grant: Some(pb::GrantControls {
            controls: controls.iter().map(|c| *c as i32).collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn nats_subscriber(tenant_id: &str) -> Result<async_nats::Subscriber, Error> {
    let url =
        std::env::var("GATEHOUSE_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let client = async_nats::connect(&url)
        .await
        .map_err(|e| format!("NATS at {url} (start nats-server): {e}"))?;
    let subscriber = client
        .subscribe(format!("risk.{tenant_id}.detection"))
        .await?;
    client.flush().await?;
    Ok(subscriber)
}

async fn run_all(data: &Path, database_url: Option<&str>) -> TestResult {
    let geoip = geoip_database(data)?;
    let anonymous = data.join("anonymous-ips.txt");
    std::fs::write(&anonymous, format!("{ANONYMISER}/32\n"))?;
    let nats_url =
        std::env::var("GATEHOUSE_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let server = Server::start_with_env(
        data,
        database_url,
        &[
            ("GATEHOUSE_GEOIP_DATABASE", geoip.to_str().ok_or("path")?),
            (
                "GATEHOUSE_ANONYMOUS_IP_LIST",
                anonymous.to_str().ok_or("path")?,
            ),
            ("GATEHOUSE_NATS_URL", &nats_url),
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
    let mut nats = nats_subscriber(&world.tenant_id).await?;
    // A short learning period so that the test can pass it; second factors are an
    // authenticator app or recovery codes (no email codes: a user without either has none).
    world
        .update_settings(|settings| {
            settings.mfa_methods = vec![
                pb::MfaMethod::Totp as i32,
                pb::MfaMethod::RecoveryCode as i32,
            ];
            let risk = settings.risk.get_or_insert_with(Default::default);
            *risk = pb::RiskSettings {
                brute_force_failures: 20,
                spray_accounts: 20,
                window_minutes: 60,
                travel_speed_kmh: 900,
                travel_min_km: 500,
                learning_sign_ins: 3,
                learning_days: 0,
                low_risk_age_days: 180,
            };
            Ok(())
        })
        .await?;
    let paris = client(&world, &server, PARIS, CHROME_WINDOWS).await?;

    // An ordinary user signing in as usual, past the learning period: nothing to report.
    let olivia = world.create_user("olivia@example.com", true).await?;
    for _ in 0..5 {
        signs_in(&paris, "olivia@example.com", PASSWORD).await?;
    }

    // 1. An anonymiser sign-in, challenged by "sign-in risk ≥ medium → MFA"; passing MFA
    //    remediates it.
    let anna = world.create_user("anna@example.com", true).await?;
    let anna_totp = world.enroll_totp(&anna).await?;
    let risky_mfa = create_policy(
        &world,
        everyone(
            pb::PolicyConditions {
                sign_in_risk: vec![pb::RiskLevel::Medium as i32, pb::RiskLevel::High as i32],
                ..Default::default()
            },
            &[pb::GrantControl::Mfa],
            "MFA for risky sign-ins",
        ),
    )
    .await?;
    signs_in(&paris, "anna@example.com", PASSWORD).await?;
    let hidden = client(&world, &server, ANONYMISER, CHROME_WINDOWS).await?;
    let flow = hidden
        .start("anna@example.com", pb::PrimaryMethod::Password)
        .await?;
    let flow = hidden.password(&flow, PASSWORD).await?;
    let anonymised_flow = flow.id.clone();
    completed(&pass_totp(&hidden, &flow, &anna_totp).await?)?;
    let (_, anonymous_ip) = detection_of(&store, "anonymous_ip", &anna).await?;
    check(&anonymous_ip, "medium", "realtime")?;
    if anonymous_ip["sign_in_id"] != anonymised_flow.as_str()
        || anonymous_ip["source"] != ANONYMISER
    {
        return Err(format!("anonymiser detection: {anonymous_ip}").into());
    }
    if evidence_types(&store, &anonymous_ip).await? != ["RiskAssessed"] {
        return Err(format!("anonymiser evidence: {anonymous_ip}").into());
    }
    let history = user_risk_until(&world, &anna, "anna remediated", |r| {
        r.state == "remediated"
    })
    .await?;
    let types: Vec<&str> = history.changes.iter().map(|c| c.r#type.as_str()).collect();
    if !types.contains(&"RiskRaised")
        || !types.contains(&"SignInRemediated")
        || history.risk.as_ref().map(|r| r.level.as_str()) != Some("none")
    {
        return Err(format!("anna's risk history: {history:?}").into());
    }
    // A risky sign-in cannot register its own second factor: with SMS offered, a user with
    //    none is refused rather than asked for a phone (a password thief has a phone too).
    world.create_user("nora@example.com", true).await?;
    let sms = |on: bool| {
        world.update_settings(move |settings| {
            settings.require_mfa = on;
            settings.mfa_methods = if on {
                // SMS first: the in-flow enrolment is a phone.
                vec![pb::MfaMethod::SmsOtp as i32, pb::MfaMethod::Totp as i32]
            } else {
                vec![
                    pb::MfaMethod::Totp as i32,
                    pb::MfaMethod::RecoveryCode as i32,
                ]
            };
            Ok(())
        })
    };
    sms(true).await?;
    let flow = hidden
        .start("nora@example.com", pb::PrimaryMethod::Password)
        .await?;
    let refused = hidden.password(&flow, PASSWORD).await?;
    if refused.status != pb::SignInStatus::Failed as i32 || !refused.reason.contains("compromised")
    {
        return Err(format!("a risky sign-in registered its own phone: {refused:?}").into());
    }
    // A user without risk in the same tenant (it requires MFA: the refusal above was the
    // risk's, not the policy's) is asked for a phone. nora herself now has risk (the
    // refused sign-in's), and stays refused until an analyst closes it.
    world.create_user("nell@example.com", true).await?;
    let flow = paris
        .start("nell@example.com", pb::PrimaryMethod::Password)
        .await?;
    let flow = paris.password(&flow, PASSWORD).await?;
    step_is(&flow, pb::SignInStep::PhoneNumber)?;
    sms(false).await?;
    disable(&world, &risky_mfa).await?;

    // 2. Atypical travel: Paris, then New York minutes later.
    let tom = world.create_user("tom@example.com", true).await?;
    signs_in(&paris, "tom@example.com", PASSWORD).await?;
    let new_york = client(&world, &server, NEW_YORK, CHROME_WINDOWS).await?;
    signs_in(&new_york, "tom@example.com", PASSWORD).await?;
    let (_, travel) = detection_of(&store, "atypical_travel", &tom).await?;
    check(&travel, "medium", "offline")?;
    let description = travel["description"].as_str().unwrap_or_default();
    if !description.contains("FR and US") || !description.contains("583") {
        return Err(format!("travel: {travel}").into());
    }
    let types = evidence_types(&store, &travel).await?;
    if types != ["RiskAssessed", "RiskAssessed", "SignInCompleted"] {
        return Err(format!("travel evidence {types:?}: {travel}").into());
    }

    // 3. Unfamiliar properties: three sign-ins from Paris in Chrome on Windows (the learning
    //    period), then one from Japan in Firefox on Linux.
    let una = world.create_user("una@example.com", true).await?;
    for _ in 0..3 {
        signs_in(&paris, "una@example.com", PASSWORD).await?;
    }
    let japan = client(&world, &server, JAPAN, FIREFOX_LINUX).await?;
    signs_in(&japan, "una@example.com", PASSWORD).await?;
    let (_, unfamiliar) = detection_of(&store, "unfamiliar_sign_in_properties", &una).await?;
    check(&unfamiliar, "medium", "offline")?;
    let description = unfamiliar["description"].as_str().unwrap_or_default();
    for property in [
        "country JP",
        "browser firefox",
        "operating system linux",
        "network AS2516",
    ] {
        if !description.contains(property) {
            return Err(format!("unfamiliar: no {property} in {unfamiliar}").into());
        }
    }
    if evidence_types(&store, &unfamiliar).await? != ["RiskAssessed", "SignInCompleted"] {
        return Err(format!("unfamiliar evidence: {unfamiliar}").into());
    }

    // 4. Leaked credentials at sign-up (a tenant that lets breached passwords through) and at
    //    sign-in; the user at high risk has no second factor: the next sign-in is blocked.
    world.reject_breached(false).await?;
    let signed_up = UserServiceClient::new(world.channel.clone())
        .sign_up(pb::SignUpRequest {
            tenant_id: world.tenant_id.clone(),
            client_id: world.client_id.clone(),
            email: "sam@example.com".into(),
            password: LEAKED.into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .user_id;
    let (_, at_sign_up) = detection_of(&store, "leaked_credentials", &signed_up).await?;
    check(&at_sign_up, "high", "realtime")?;
    if evidence_types(&store, &at_sign_up).await? != ["UserSignedUp"] {
        return Err(format!("sign-up evidence: {at_sign_up}").into());
    }
    let lee = UserServiceClient::new(world.channel.clone())
        .create_user(req(
            pb::CreateUserRequest {
                tenant_id: world.tenant_id.clone(),
                email: "lee@example.com".into(),
                password: LEAKED.into(),
                email_verified: true,
                ..Default::default()
            },
            &world.key,
        )?)
        .await?
        .into_inner()
        .id;
    world.reject_breached(true).await?;
    let leaked_flow = signs_in(&paris, "lee@example.com", LEAKED).await?;
    let (_, at_sign_in) = detection_of(&store, "leaked_credentials", &lee).await?;
    check(&at_sign_in, "high", "realtime")?;
    if at_sign_in["sign_in_id"] != leaked_flow.id.as_str() {
        return Err(format!("sign-in leak: {at_sign_in}").into());
    }
    user_risk_until(&world, &lee, "lee at high risk", |r| r.level == "high").await?;
    let flow = paris
        .start("lee@example.com", pb::PrimaryMethod::Password)
        .await?;
    let blocked = paris.password(&flow, LEAKED).await?;
    if blocked.status != pb::SignInStatus::Failed as i32 || !blocked.reason.contains("compromised")
    {
        return Err(format!("a user at high risk without MFA signed in: {blocked:?}").into());
    }

    // 5. A reused refresh token.
    let rita = world.create_user("rita@example.com", true).await?;
    let rita_totp = world.enroll_totp(&rita).await?;
    let tokens = signs_in(&paris, "rita@example.com", PASSWORD)
        .await?
        .tokens
        .ok_or("no tokens")?;
    let refresh = |token: String| pb::RefreshSessionRequest {
        tenant_id: world.tenant_id.clone(),
        client_id: world.client_id.clone(),
        refresh_token: token,
    };
    world
        .sessions()
        .refresh_session(refresh(tokens.refresh_token.clone()))
        .await?;
    if world
        .sessions()
        .refresh_session(refresh(tokens.refresh_token.clone()))
        .await
        .is_ok()
    {
        return Err("a rotated refresh token was accepted".into());
    }
    let (_, reuse) = detection_of(&store, "anomalous_token", &rita).await?;
    check(&reuse, "high", "offline")?;
    if evidence_types(&store, &reuse).await? != ["RefreshTokenReused"] {
        return Err(format!("token reuse evidence: {reuse}").into());
    }

    // 6. "User risk high → MFA and a password change": rita proves herself, changes her
    //    password, and her risk is remediated; her next sign-in is ordinary.
    user_risk_until(&world, &rita, "rita at high risk", |r| r.level == "high").await?;
    let risky_users = create_policy(
        &world,
        everyone(
            pb::PolicyConditions {
                user_risk: vec![pb::RiskLevel::High as i32],
                ..Default::default()
            },
            &[pb::GrantControl::Mfa, pb::GrantControl::PasswordChange],
            "Secure password change for risky users",
        ),
    )
    .await?;
    let flow = paris
        .start("rita@example.com", pb::PrimaryMethod::Password)
        .await?;
    let flow = paris.password(&flow, PASSWORD).await?;
    let flow = pass_totp(&paris, &flow, &rita_totp).await?;
    step_is(&flow, pb::SignInStep::NewPassword)?;
    let new_password = "a new and secret passphrase";
    let done = paris
        .signin()
        .submit_new_password(pb::SubmitPasswordRequest {
            tenant_id: world.tenant_id.clone(),
            client_id: world.client_id.clone(),
            sign_in_id: flow.id.clone(),
            password: new_password.into(),
        })
        .await?
        .into_inner();
    completed(&done)?;
    let history = user_risk_until(&world, &rita, "rita remediated", |r| {
        r.state == "remediated"
    })
    .await?;
    if history.changes.last().map(|c| c.r#type.as_str()) != Some("RiskRemediated") {
        return Err(format!("rita's history: {history:?}").into());
    }
    signs_in(&paris, "rita@example.com", new_password).await?;
    disable(&world, &risky_users).await?;

    // 7. ConfirmCompromised: carl's sessions are revoked, the detection recorded, and his
    //    next sign-in asks for MFA and a new password.
    let carl = world.create_user("carl@example.com", true).await?;
    let carl_totp = world.enroll_totp(&carl).await?;
    signs_in(&paris, "carl@example.com", PASSWORD).await?;
    signs_in(&paris, "carl@example.com", PASSWORD).await?;
    let action = |user: &str| pb::UserRiskRequest {
        tenant_id: world.tenant_id.clone(),
        user_id: user.into(),
    };
    let confirmed = risk(&world)
        .confirm_compromised(req(action(&carl), &world.key)?)
        .await?
        .into_inner();
    if confirmed.state != "confirmed_compromised" || confirmed.level != "high" {
        return Err(format!("confirmed: {confirmed:?}").into());
    }
    let sessions = world
        .sessions()
        .list_sessions(req(
            pb::ListSessionsRequest {
                tenant_id: world.tenant_id.clone(),
                user_id: carl.clone(),
                include_ended: true,
            },
            &world.key,
        )?)
        .await?
        .into_inner()
        .sessions;
    if sessions.len() != 2
        || !sessions
            .iter()
            .all(|s| s.revoked && s.revoked_reason == "compromised")
    {
        return Err(format!("carl's sessions: {sessions:?}").into());
    }
    let (_, admin) = detection_of(&store, "admin_confirmed_compromised", &carl).await?;
    check(&admin, "high", "offline")?;
    if evidence_types(&store, &admin).await? != ["CompromiseConfirmed"] {
        return Err(format!("admin evidence: {admin}").into());
    }
    let flow = paris
        .start("carl@example.com", pb::PrimaryMethod::Password)
        .await?;
    let flow = paris.password(&flow, PASSWORD).await?;
    let flow = pass_totp(&paris, &flow, &carl_totp).await?;
    step_is(&flow, pb::SignInStep::NewPassword)?;
    completed(
        &paris
            .signin()
            .submit_new_password(pb::SubmitPasswordRequest {
                tenant_id: world.tenant_id.clone(),
                client_id: world.client_id.clone(),
                sign_in_id: flow.id.clone(),
                password: "carl's fresh passphrase".into(),
            })
            .await?
            .into_inner(),
    )?;
    user_risk_until(&world, &carl, "carl remediated", |r| {
        r.state == "remediated" && r.level == "none"
    })
    .await?;

    // 8. The analyst closes what is left; closing nothing is refused; another tenant's key
    //    reaches nothing.
    let safe = risk(&world)
        .confirm_safe(req(action(&tom), &world.key)?)
        .await?
        .into_inner();
    let dismissed = risk(&world)
        .dismiss_risk(req(action(&una), &world.key)?)
        .await?
        .into_inner();
    if safe.state != "confirmed_safe" || dismissed.state != "dismissed" || safe.level != "none" {
        return Err(format!("analyst actions: {safe:?} {dismissed:?}").into());
    }
    let nothing = risk(&world)
        .dismiss_risk(req(action(&olivia), &world.key)?)
        .await;
    if nothing.as_ref().map_err(|s| s.code()).err() != Some(tonic::Code::FailedPrecondition) {
        return Err(format!("dismissing nothing: {nothing:?}").into());
    }
    let foreign = risk(&world)
        .confirm_compromised(req(action(&olivia), &other.key)?)
        .await;
    if foreign.as_ref().map_err(|s| s.code()).err() != Some(tonic::Code::PermissionDenied)
        && foreign.as_ref().map_err(|s| s.code()).err() != Some(tonic::Code::NotFound)
    {
        return Err(format!("another tenant's key: {foreign:?}").into());
    }

    // 9. Reports: filters and paging.
    let list = |filter: pb::ListRiskDetectionsRequest| {
        let mut client = risk(&world);
        let key = world.key.clone();
        async move {
            Ok::<_, Error>(
                client
                    .list_risk_detections(req(filter, &key)?)
                    .await?
                    .into_inner(),
            )
        }
    };
    let base = pb::ListRiskDetectionsRequest {
        tenant_id: world.tenant_id.clone(),
        ..Default::default()
    };
    let all = list(base.clone()).await?.detections;
    let kinds: HashSet<&str> = all.iter().map(|d| d.kind.as_str()).collect();
    for kind in [
        "anonymous_ip",
        "atypical_travel",
        "unfamiliar_sign_in_properties",
        "leaked_credentials",
        "anomalous_token",
        "admin_confirmed_compromised",
    ] {
        if !kinds.contains(kind) {
            return Err(format!("no {kind} listed: {kinds:?}").into());
        }
    }
    if all.iter().any(|d| d.user_id == olivia) {
        return Err(format!("an ordinary user was reported: {all:?}").into());
    }
    let travel_only = list(pb::ListRiskDetectionsRequest {
        kind: "atypical_travel".into(),
        ..base.clone()
    })
    .await?
    .detections;
    if travel_only.len() != 1 || travel_only[0].user_id != tom {
        return Err(format!("kind filter: {travel_only:?}").into());
    }
    let high = list(pb::ListRiskDetectionsRequest {
        level: "high".into(),
        ..base.clone()
    })
    .await?
    .detections;
    if high.is_empty() || high.iter().any(|d| d.level != "high") {
        return Err(format!("level filter: {high:?}").into());
    }
    let ritas = list(pb::ListRiskDetectionsRequest {
        user_id: rita.clone(),
        ..base.clone()
    })
    .await?
    .detections;
    if ritas.len() != 1 || ritas[0].kind != "anomalous_token" {
        return Err(format!("user filter: {ritas:?}").into());
    }
    let future = list(pb::ListRiskDetectionsRequest {
        from: "2999-01-01T00:00:00Z".into(),
        ..base.clone()
    })
    .await?;
    if !future.detections.is_empty() {
        return Err(format!("time filter: {future:?}").into());
    }
    let bad = list(pb::ListRiskDetectionsRequest {
        level: "severe".into(),
        ..base.clone()
    })
    .await;
    if bad.is_ok() {
        return Err("an unknown level was accepted".into());
    }
    let mut paged = Vec::new();
    let mut token = String::new();
    loop {
        let page = list(pb::ListRiskDetectionsRequest {
            page_size: 2,
            page_token: token.clone(),
            ..base.clone()
        })
        .await?;
        if page.detections.len() > 2 {
            return Err("a page is larger than asked".into());
        }
        paged.extend(page.detections.into_iter().map(|d| d.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let ids: Vec<String> = all.iter().map(|d| d.id.clone()).collect();
    if paged != ids {
        return Err(format!("paging: {paged:?} vs {ids:?}").into());
    }
    let risky_users = |request: pb::ListRiskyUsersRequest| {
        let mut client = risk(&world);
        let request = req(
            pb::ListRiskyUsersRequest {
                tenant_id: world.tenant_id.clone(),
                ..request
            },
            &world.key,
        );
        async move { Ok::<_, Error>(client.list_risky_users(request?).await?.into_inner()) }
    };
    let users = risky_users(pb::ListRiskyUsersRequest {
        state: "dismissed".into(),
        ..Default::default()
    })
    .await?
    .users;
    if users.len() != 1 || users[0].user_id != una {
        return Err(format!("risky users, dismissed: {users:?}").into());
    }
    let users_page = |page_token: String, page_size: u32| {
        risky_users(pb::ListRiskyUsersRequest {
            page_size,
            page_token,
            ..Default::default()
        })
    };
    let every_user: Vec<String> = users_page(String::new(), 0)
        .await?
        .users
        .into_iter()
        .map(|u| u.user_id)
        .collect();
    let (mut walked, mut token) = (Vec::new(), String::new());
    loop {
        let page = users_page(token.clone(), 2).await?;
        walked.extend(page.users.into_iter().map(|u| u.user_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    // anna, nora, tom, una, sam, lee, rita, carl: every user with a risk state, each once.
    if walked != every_user || every_user.len() != 8 {
        return Err(format!("risky users paged {walked:?}, all {every_user:?}").into());
    }
    let at_high = risky_users(pb::ListRiskyUsersRequest {
        level: "high".into(),
        ..Default::default()
    })
    .await?
    .users;
    let high_ids: HashSet<&str> = at_high.iter().map(|u| u.user_id.as_str()).collect();
    if !high_ids.contains(lee.as_str())
        || high_ids.contains(rita.as_str())
        || high_ids.contains(carl.as_str())
    {
        return Err(format!("risky users, high: {at_high:?}").into());
    }
    let risky_sign_ins = |request: pb::ListRiskySignInsRequest| {
        let mut client = risk(&world);
        let request = req(
            pb::ListRiskySignInsRequest {
                tenant_id: world.tenant_id.clone(),
                ..request
            },
            &world.key,
        );
        async move {
            Ok::<_, Error>(
                client
                    .list_risky_sign_ins(request?)
                    .await?
                    .into_inner()
                    .sign_ins,
            )
        }
    };
    let remediated = risky_sign_ins(pb::ListRiskySignInsRequest {
        state: "remediated".into(),
        ..Default::default()
    })
    .await?;
    if remediated.len() != 1
        || remediated[0].sign_in_id != anonymised_flow
        || remediated[0].level != "medium"
        || remediated[0].detections != ["anonymous_ip"]
    {
        return Err(format!("remediated sign-ins: {remediated:?}").into());
    }
    let at_risk = risky_sign_ins(pb::ListRiskySignInsRequest {
        state: "at_risk".into(),
        user_id: lee.clone(),
        ..Default::default()
    })
    .await?;
    // Newest first: the blocked attempt, then the sign-in with the leaked password.
    if at_risk.len() != 2 || at_risk[1].sign_in_id != leaked_flow.id || at_risk[1].country != "FR" {
        return Err(format!("risky sign-ins at risk: {at_risk:?}").into());
    }

    // 10. The export: NDJSON has every detection, CSV a header and a line each.
    let export = |format: &str| {
        let mut client = risk(&world);
        let request = req(
            pb::ExportRiskDetectionsRequest {
                tenant_id: world.tenant_id.clone(),
                format: format.into(),
                ..Default::default()
            },
            &world.key,
        );
        async move {
            let mut stream = client.export_risk_detections(request?).await?.into_inner();
            let mut bytes = Vec::new();
            while let Some(chunk) = stream.next().await {
                bytes.extend(chunk?.data);
            }
            Ok::<_, Error>(String::from_utf8(bytes)?)
        }
    };
    let ndjson = export("ndjson").await?;
    let mut exported = HashSet::new();
    for line in ndjson.lines() {
        let record: serde_json::Value = serde_json::from_str(line)?;
        exported.insert(record["id"].as_str().ok_or("no id")?.to_string());
    }
    if exported != ids.iter().cloned().collect::<HashSet<_>>() {
        return Err(format!("NDJSON export: {ndjson}").into());
    }
    let csv = export("csv").await?;
    if !csv.starts_with("id,detected_at,kind,level") || csv.lines().count() != ids.len() + 1 {
        return Err(format!("CSV export: {csv}").into());
    }

    // 11. NATS: a subscriber of the tenant's subject received the detections as they came.
    let mut published = HashSet::new();
    while published.len() < ids.len() {
        let message = tokio::time::timeout(Duration::from_secs(10), nats.next())
            .await
            .map_err(|_| {
                format!(
                    "NATS delivered {} of {} detections",
                    published.len(),
                    ids.len()
                )
            })?
            .ok_or("the NATS subscription ended")?;
        let record: serde_json::Value = serde_json::from_slice(&message.payload)?;
        if record["tenant_id"] != world.tenant_id.as_str() {
            return Err(format!("another tenant's detection: {record}").into());
        }
        published.insert(record["id"].as_str().ok_or("no id")?.to_string());
    }
    if published != exported {
        return Err(format!("published {published:?}, recorded {exported:?}").into());
    }
    server.stop()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identity_protection_on_sqlite() -> TestResult {
    let dir = tempfile::tempdir()?;
    run_all(dir.path(), None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identity_protection_on_postgres() -> TestResult {
    let Some(url) = support::postgres_url().await? else {
        eprintln!("GATEHOUSE_TEST_DATABASE_URL not set: PostgreSQL run skipped");
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    run_all(dir.path(), Some(&url)).await
}
