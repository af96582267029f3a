//! Conditional Access over gRPC against a running server: the seed's two scenarios (MFA for
//! one app; a verified phone for "home insurance" only), blocks by CIDR named location with a
//! break-glass exclusion, trusted-location exclusion, report-only policies recorded on the
//! flow but not enforced, blocks by country (GeoIP database written by the test), block
//! winning over grant, password change, sign-in frequency at
//! refresh, sign-in risk from anonymiser / malicious IP lists (reloaded while running) and
//! from a leaked (breached-list) password,
//! validation, What If explanations and a Backtest over a recorded history.
//! Sign-ins come from different loopback source addresses (127.0.0.x), which the server sees
//! as the client IP, or through 127.0.0.1 as a trusted proxy with `X-Forwarded-For`. SQLite always; PostgreSQL when configured.

use crate::support;

use gatehouse_events::{EventStore, StreamId};
use gatehouse_proto::v1 as pb;
use pb::policy_service_client::PolicyServiceClient;
use pb::user_service_client::UserServiceClient;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use support::world::{PASSWORD, World, completed, connect_from, step_is, totp};
use support::{Error, Server, TestResult, req, wait_for_message};
use tonic::Code;
use tonic::transport::Channel;

fn policies(world: &World) -> PolicyServiceClient<Channel> {
    PolicyServiceClient::new(world.channel.clone())
}

fn all_users() -> pb::UserAssignment {
    pb::UserAssignment {
        all: true,
        ..Default::default()
    }
}

fn apps(ids: &[&str]) -> pb::AppAssignment {
    pb::AppAssignment {
        include: ids.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn all_apps() -> pb::AppAssignment {
    pb::AppAssignment {
        all: true,
        ..Default::default()
    }
}

/// Conditions: inside one of these named locations.
fn in_locations(include: Vec<String>) -> Option<pb::PolicyConditions> {
    Some(pb::PolicyConditions {
        locations: Some(pb::LocationCondition {
            include,
            ..Default::default()
        }),
        ..Default::default()
    })
}

fn grant(controls: &[pb::GrantControl]) -> pb::GrantControls {
    pb::GrantControls {
        controls: controls.iter().map(|c| *c as i32).collect(),
        ..Default::default()
    }
}

fn block() -> pb::GrantControls {
    pb::GrantControls {
        block: true,
        ..Default::default()
    }
}

async fn create(
    world: &World,
    definition: pb::PolicyDefinition,
    state: pb::PolicyState,
) -> Result<pb::Policy, tonic::Status> {
    let request = req(
        pb::CreatePolicyRequest {
            tenant_id: world.tenant_id.clone(),
            definition: Some(definition),
            state: state as i32,
            acknowledge_warnings: false,
        },
        &world.key,
    )
    .map_err(|e| tonic::Status::internal(e.to_string()))?;
    policies(world)
        .create_policy(request)
        .await
        .map(|r| r.into_inner())
}

async fn set_state(world: &World, policy: &pb::Policy, state: pb::PolicyState) -> TestResult {
    policies(world)
        .set_policy_state(req(
            pb::SetPolicyStateRequest {
                tenant_id: world.tenant_id.clone(),
                policy_id: policy.id.clone(),
                state: state as i32,
            },
            &world.key,
        )?)
        .await?;
    Ok(())
}

async fn location(
    world: &World,
    name: &str,
    ranges: &[&str],
    trusted: bool,
) -> Result<String, Error> {
    Ok(policies(world)
        .create_named_location(req(
            pb::CreateNamedLocationRequest {
                tenant_id: world.tenant_id.clone(),
                name: name.into(),
                ranges: ranges.iter().map(|s| s.to_string()).collect(),
                countries: vec![],
                trusted,
            },
            &world.key,
        )?)
        .await?
        .into_inner()
        .id)
}

/// The world signing in from `source`.
async fn from(world: &World, server: &Server, source: &str) -> Result<World, Error> {
    Ok(World {
        channel: connect_from(server, source).await?,
        ..world.clone()
    })
}

/// A password sign-in; the answer to the password.
async fn password_step(world: &World, email: &str) -> Result<pb::SignIn, Error> {
    let flow = world.start(email, pb::PrimaryMethod::Password).await?;
    Ok(world.password(&flow, PASSWORD).await?)
}

fn with_header<T>(
    forwarded: &str,
    mut request: tonic::Request<T>,
) -> Result<tonic::Request<T>, Error> {
    request
        .metadata_mut()
        .insert("x-forwarded-for", forwarded.parse()?);
    Ok(request)
}

/// A password sign-in whose requests carry `X-Forwarded-For: forwarded`.
async fn forwarded_password_step(
    world: &World,
    email: &str,
    forwarded: &str,
) -> Result<pb::SignIn, Error> {
    let flow = world
        .signin()
        .start_sign_in(with_header(
            forwarded,
            tonic::Request::new(pb::StartSignInRequest {
                tenant_id: world.tenant_id.clone(),
                client_id: world.client_id.clone(),
                email: email.into(),
                method: pb::PrimaryMethod::Password as i32,
            }),
        )?)
        .await?
        .into_inner();
    Ok(world
        .signin()
        .submit_password(with_header(
            forwarded,
            tonic::Request::new(pb::SubmitPasswordRequest {
                tenant_id: world.tenant_id.clone(),
                client_id: world.client_id.clone(),
                sign_in_id: flow.id,
                password: PASSWORD.into(),
            }),
        )?)
        .await?
        .into_inner())
}

fn status_is(flow: &pb::SignIn, status: pb::SignInStatus) -> TestResult {
    if flow.status != status as i32 {
        return Err(format!("expected {status:?}, got {flow:?}").into());
    }
    Ok(())
}

/// Reads the PolicyEvaluated event of a flow straight from the log.
async fn evaluation(
    store: &Arc<dyn EventStore>,
    flow: &pb::SignIn,
) -> Result<serde_json::Value, Error> {
    flow_event(store, flow, "PolicyEvaluated").await
}

/// Reads the first event of a type on a flow straight from the log.
async fn flow_event(
    store: &Arc<dyn EventStore>,
    flow: &pb::SignIn,
    event_type: &str,
) -> Result<serde_json::Value, Error> {
    let stream = StreamId::new("signin", flow.id.parse()?);
    let events = store.read_stream(&stream, Default::default()).await?;
    let event = events
        .iter()
        .find(|e| e.event_type == event_type)
        .ok_or(format!("no {event_type} on the flow"))?;
    Ok(serde_json::from_str(event.payload.get())?)
}

/// A GeoIP database in MaxMind format, written by `mmdb-writer`: 127.0.0.88 is in North
/// Korea, 127.0.0.1 in France.
fn geoip_database(dir: &Path) -> Result<std::path::PathBuf, Error> {
    let mut writer = mmdb_writer::Writer::new("GeoLite2-Country");
    for (network, country) in [("127.0.0.88/32", "KP"), ("127.0.0.1/32", "FR")] {
        let record = serde_json::json!({ "country": { "iso_code": country } });
        writer.insert(network.parse::<mmdb_writer::ipnet::IpNet>()?, &record)?;
    }
    let path = dir.join("countries.mmdb");
    std::fs::write(&path, writer.to_bytes()?)?;
    Ok(path)
}

async fn run_all(data: &Path, database_url: Option<&str>) -> TestResult {
    let geoip = geoip_database(data)?;
    let geoip = geoip.to_str().ok_or("path")?;
    let anonymous = data.join("anonymous-ips.txt");
    let malicious = data.join("malicious-ips.txt");
    std::fs::write(&anonymous, "# test anonymiser\n127.0.0.98/32\n")?;
    std::fs::write(&malicious, "# nothing yet\n")?;
    // 127.0.0.1 plays the load balancer: its X-Forwarded-For is believed, no one else's.
    let server = Server::start_with_env(
        data,
        database_url,
        &[
            ("GATEHOUSE_GEOIP_DATABASE", geoip),
            ("GATEHOUSE_TRUSTED_PROXIES", "127.0.0.1/32"),
            (
                "GATEHOUSE_ANONYMOUS_IP_LIST",
                anonymous.to_str().ok_or("path")?,
            ),
            (
                "GATEHOUSE_MALICIOUS_IP_LIST",
                malicious.to_str().ok_or("path")?,
            ),
        ],
    )?;
    let admin = server.printed_admin_key().ok_or("no admin key")?;
    let auto = World::new(&server, &admin).await?;
    let home = auto.with_app("Home insurance").await?;
    let url = database_url.map_or_else(
        || format!("sqlite://{}", data.join("events.db").display()),
        str::to_string,
    );
    let store = gatehouse_events::connect(&url).await?;

    scenario_one_app_requires_mfa(&auto).await?;
    scenario_home_insurance_requires_a_phone(&auto, &home, data).await?;
    locations_report_only_and_block_wins(&server, &auto, &home, &store).await?;
    password_change(&auto, data).await?;
    sign_in_frequency(&auto).await?;
    validation(&auto).await?;
    what_if(&auto, &home).await?;
    country_block(&server, &auto, &store).await?;
    risk_based_access(&server, &auto, &store, &malicious).await?;
    let fresh = World::new(&server, &admin).await?;
    backtest(&server, &fresh).await?;
    isolation(&auto, &fresh).await?;
    server.stop()?;
    Ok(())
}

/// Seed scenario 1: "all users, this app → MFA": a password alone does not complete, a
/// password and a TOTP code do. Disabled, the policy stops applying.
async fn scenario_one_app_requires_mfa(auto: &World) -> TestResult {
    let alice = auto.create_user("alice@example.com", true).await?;
    let secret = auto.enroll_totp(&alice).await?;
    let policy = create(
        auto,
        pb::PolicyDefinition {
            name: "MFA for auto insurance".into(),
            users: Some(all_users()),
            apps: Some(apps(&[&auto.app_id])),
            grant: Some(grant(&[pb::GrantControl::Mfa])),
            ..Default::default()
        },
        pb::PolicyState::Enabled,
    )
    .await?;
    let flow = password_step(auto, "alice@example.com").await?;
    step_is(&flow, pb::SignInStep::SelectMfaMethod)?;
    if flow.tokens.is_some() {
        return Err("tokens before the second factor".into());
    }
    let flow = auto.select(&flow, pb::MfaMethod::Totp).await?;
    let done = auto.mfa_code(&flow, &totp(&secret, 0)?).await?;
    completed(&done)?;
    set_state(auto, &policy, pb::PolicyState::Disabled).await?;
    completed(&password_step(auto, "alice@example.com").await?)?;
    Ok(())
}

/// Seed scenario 2: "auto insurance" signs in with a password only; "home insurance" needs a
/// verified phone, so a user without one registers it (SMS code from the outbox) first.
async fn scenario_home_insurance_requires_a_phone(
    auto: &World,
    home: &World,
    data: &Path,
) -> TestResult {
    auto.create_user("bob@example.com", true).await?;
    create(
        home,
        pb::PolicyDefinition {
            name: "Verified phone for home insurance".into(),
            users: Some(all_users()),
            apps: Some(apps(&[&home.app_id])),
            grant: Some(grant(&[pb::GrantControl::PhoneVerified])),
            ..Default::default()
        },
        pb::PolicyState::Enabled,
    )
    .await?;
    completed(&password_step(auto, "bob@example.com").await?)?;
    let flow = password_step(home, "bob@example.com").await?;
    step_is(&flow, pb::SignInStep::PhoneNumber)?;
    let phone = |phone: &str, code: &str| pb::SubmitPhoneVerificationRequest {
        tenant_id: home.tenant_id.clone(),
        client_id: home.client_id.clone(),
        sign_in_id: flow.id.clone(),
        phone: phone.into(),
        code: code.into(),
    };
    let waiting = home
        .signin()
        .submit_phone_verification(phone("+14155550123", ""))
        .await?
        .into_inner();
    step_is(&waiting, pb::SignInStep::PhoneCode)?;
    let sms = wait_for_message(data, "+14155550123", 0)?;
    let done = home
        .signin()
        .submit_phone_verification(phone("", &sms.code.ok_or("no code")?))
        .await?
        .into_inner();
    completed(&done)?;
    // Verified now: the next sign-in to home insurance asks nothing more.
    completed(&password_step(home, "bob@example.com").await?)?;
    Ok(())
}

/// Block by CIDR location with a break-glass exclusion; trusted-location exclusion; a
/// report-only block recorded on the flow but not enforced; block wins over grant.
async fn locations_report_only_and_block_wins(
    server: &Server,
    auto: &World,
    home: &World,
    store: &Arc<dyn EventStore>,
) -> TestResult {
    auto.create_user("carol@example.com", true).await?;
    let breakglass = auto.create_user("breakglass@example.com", true).await?;
    let banned = location(auto, "Banned network", &["127.0.0.66/32"], false).await?;
    let office = location(auto, "Office", &["127.0.0.77/32"], true).await?;
    let block_banned = create(
        auto,
        pb::PolicyDefinition {
            name: "Block the banned network".into(),
            users: Some(pb::UserAssignment {
                all: true,
                exclude_users: vec![breakglass.clone()],
                ..Default::default()
            }),
            apps: Some(all_apps()),
            conditions: in_locations(vec![banned.clone()]),
            grant: Some(block()),
            ..Default::default()
        },
        pb::PolicyState::Enabled,
    )
    .await?;
    let mfa_outside = create(
        auto,
        pb::PolicyDefinition {
            name: "MFA outside the office".into(),
            users: Some(all_users()),
            apps: Some(apps(&[&auto.app_id])),
            conditions: Some(pb::PolicyConditions {
                locations: Some(pb::LocationCondition {
                    any: true,
                    exclude_trusted: true,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            grant: Some(grant(&[pb::GrantControl::Mfa])),
            ..Default::default()
        },
        pb::PolicyState::Enabled,
    )
    .await?;
    let banned_auto = from(auto, server, "127.0.0.66").await?;
    let flow = password_step(&banned_auto, "carol@example.com").await?;
    status_is(&flow, pb::SignInStatus::Blocked)?;
    if flow.reason.is_empty() || flow.tokens.is_some() {
        return Err(format!("a block must say why and issue nothing: {flow:?}").into());
    }
    // Block wins over grant: both policies applied, the flow records both.
    let recorded = evaluation(store, &flow).await?;
    if recorded["blocked_by"] != block_banned.id.as_str() {
        return Err(format!("block not recorded: {recorded}").into());
    }
    let results = recorded["policies"].as_array().ok_or("no policies")?;
    let result_of = |id: &str| {
        results
            .iter()
            .find(|r| r["policy_id"] == id)
            .map(|r| r["result"].as_str().unwrap_or_default().to_string())
    };
    if result_of(&block_banned.id).as_deref() != Some("block")
        || result_of(&mfa_outside.id).as_deref() != Some("grant")
    {
        return Err(format!("policy results: {recorded}").into());
    }
    // The break-glass account is excluded from the block (and does MFA elsewhere rules).
    let flow = password_step(&banned_auto, "breakglass@example.com").await?;
    status_is(&flow, pb::SignInStatus::InProgress)?;
    step_is(&flow, pb::SignInStep::SelectMfaMethod)?;
    // From the trusted office: no MFA. From elsewhere: MFA.
    let office_auto = from(auto, server, "127.0.0.77").await?;
    completed(&password_step(&office_auto, "carol@example.com").await?)?;
    let flow = password_step(auto, "carol@example.com").await?;
    step_is(&flow, pb::SignInStep::SelectMfaMethod)?;
    // Behind the trusted proxy (127.0.0.1), X-Forwarded-For names the client...
    let flow = forwarded_password_step(auto, "carol@example.com", "127.0.0.66").await?;
    status_is(&flow, pb::SignInStatus::Blocked)?;
    // ... from anyone else it is ignored: claiming the office does not skip MFA.
    let elsewhere = from(auto, server, "127.0.0.5").await?;
    let flow = forwarded_password_step(&elsewhere, "carol@example.com", "127.0.0.77").await?;
    step_is(&flow, pb::SignInStep::SelectMfaMethod)?;
    // The office stops being trusted... by a new location list: office included in a
    // report-only block for home insurance, which never stops anyone.
    let shadow = create(
        home,
        pb::PolicyDefinition {
            name: "Would block the office from home insurance".into(),
            users: Some(all_users()),
            apps: Some(apps(&[&home.app_id])),
            conditions: in_locations(vec![office]),
            grant: Some(block()),
            ..Default::default()
        },
        pb::PolicyState::ReportOnly,
    )
    .await?;
    let office_home = from(home, server, "127.0.0.77").await?;
    let flow = password_step(&office_home, "carol@example.com").await?;
    // Carol has no phone: home insurance asks for one (the report-only block did nothing).
    step_is(&flow, pb::SignInStep::PhoneNumber)?;
    let recorded = evaluation(store, &flow).await?;
    let shadow_result = recorded["policies"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["policy_id"] == shadow.id.as_str()))
        .ok_or(format!("report-only policy not recorded: {recorded}"))?;
    if shadow_result["result"] != "block" || shadow_result["report_only"] != true {
        return Err(format!("report-only result: {shadow_result}").into());
    }
    if !recorded["blocked_by"].is_null() {
        return Err("a report-only policy blocked".into());
    }
    set_state(auto, &mfa_outside, pb::PolicyState::Disabled).await?;
    set_state(auto, &block_banned, pb::PolicyState::Disabled).await?;
    set_state(auto, &shadow, pb::PolicyState::Disabled).await?;
    Ok(())
}

/// A policy for a group asks its members for MFA then a new password within the flow; a
/// password change without MFA is refused as a policy.
async fn password_change(auto: &World, data: &Path) -> TestResult {
    let dave = auto.create_user("dave@example.com", true).await?;
    let mut client = policies(auto);
    let group = client
        .create_group(req(
            pb::CreateGroupRequest {
                tenant_id: auto.tenant_id.clone(),
                name: "Leaked passwords".into(),
            },
            &auto.key,
        )?)
        .await?
        .into_inner();
    client
        .add_group_member(req(
            pb::GroupMemberRequest {
                tenant_id: auto.tenant_id.clone(),
                group_id: group.id.clone(),
                user_id: dave.clone(),
            },
            &auto.key,
        )?)
        .await?;
    let policy = create(
        auto,
        pb::PolicyDefinition {
            name: "New password for the leaked group".into(),
            users: Some(pb::UserAssignment {
                include_groups: vec![group.id.clone()],
                ..Default::default()
            }),
            apps: Some(all_apps()),
            grant: Some(grant(&[pb::GrantControl::PasswordChange])),
            ..Default::default()
        },
        pb::PolicyState::Enabled,
    )
    .await;
    if policy.map_err(|s| s.code()).err() != Some(Code::InvalidArgument) {
        return Err("a password change without MFA was accepted".into());
    }
    let policy = create(
        auto,
        pb::PolicyDefinition {
            name: "New password for the leaked group".into(),
            users: Some(pb::UserAssignment {
                include_groups: vec![group.id.clone()],
                ..Default::default()
            }),
            apps: Some(all_apps()),
            grant: Some(grant(&[
                pb::GrantControl::PasswordChange,
                pb::GrantControl::Mfa,
            ])),
            ..Default::default()
        },
        pb::PolicyState::Enabled,
    )
    .await?;
    // Not a member: nothing asked.
    completed(&password_step(auto, "alice@example.com").await?)?;
    // MFA first (the fixed order), by an emailed code, then the new password.
    let flow = password_step(auto, "dave@example.com").await?;
    step_is(&flow, pb::SignInStep::SelectMfaMethod)?;
    let flow = auto.select(&flow, pb::MfaMethod::EmailOtp).await?;
    let sent = wait_for_message(data, "dave@example.com", 0)?;
    let flow = auto.mfa_code(&flow, &sent.code.ok_or("no code")?).await?;
    step_is(&flow, pb::SignInStep::NewPassword)?;
    let submit = |password: &str| pb::SubmitPasswordRequest {
        tenant_id: auto.tenant_id.clone(),
        client_id: auto.client_id.clone(),
        sign_in_id: flow.id.clone(),
        password: password.into(),
    };
    for bad in ["short", PASSWORD] {
        let refused = auto.signin().submit_new_password(submit(bad)).await;
        if refused.map_err(|s| s.code()).err() != Some(Code::InvalidArgument) {
            return Err(format!("new password {bad:?} accepted").into());
        }
    }
    let done = auto
        .signin()
        .submit_new_password(submit("a brand new passphrase 42"))
        .await?
        .into_inner();
    completed(&done)?;
    set_state(auto, &policy, pb::PolicyState::Disabled).await?;
    let flow = auto
        .start("dave@example.com", pb::PrimaryMethod::Password)
        .await?;
    completed(&auto.password(&flow, "a brand new passphrase 42").await?)?;
    Ok(())
}

/// A sign-in frequency of 2 seconds: refresh works at first, then requires a new sign-in.
async fn sign_in_frequency(auto: &World) -> TestResult {
    let policy = create(
        auto,
        pb::PolicyDefinition {
            name: "Sign in again every 2 seconds".into(),
            users: Some(all_users()),
            apps: Some(apps(&[&auto.app_id])),
            session: Some(pb::SessionControls {
                sign_in_frequency_seconds: Some(2),
                persistent_session: None,
            }),
            ..Default::default()
        },
        pb::PolicyState::Enabled,
    )
    .await?;
    let tokens = auto.sign_in("alice@example.com").await?;
    let refresh = |token: String| pb::RefreshSessionRequest {
        tenant_id: auto.tenant_id.clone(),
        client_id: auto.client_id.clone(),
        refresh_token: token,
    };
    let rotated = auto
        .sessions()
        .refresh_session(refresh(tokens.refresh_token))
        .await?
        .into_inner();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let refused = auto
        .sessions()
        .refresh_session(refresh(rotated.refresh_token))
        .await;
    match refused {
        Err(status) if status.code() == Code::Unauthenticated => {}
        other => return Err(format!("refresh after the frequency: {other:?}").into()),
    }
    set_state(auto, &policy, pb::PolicyState::Disabled).await?;
    // Without the policy, sessions refresh past 2 seconds.
    let tokens = auto.sign_in("alice@example.com").await?;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    auto.sessions()
        .refresh_session(refresh(tokens.refresh_token))
        .await?;
    Ok(())
}

/// Unknown ids are refused; a policy that can never apply or that blocks everyone needs an
/// explicit acknowledgement; nothing is saved by a refused request.
async fn validation(auto: &World) -> TestResult {
    let before = policies(auto)
        .list_policies(req(
            pb::ListPoliciesRequest {
                tenant_id: auto.tenant_id.clone(),
            },
            &auto.key,
        )?)
        .await?
        .into_inner()
        .policies
        .len();
    let unknown = uuid::Uuid::now_v7().to_string();
    let cases = [
        (
            pb::PolicyDefinition {
                name: "unknown app".into(),
                users: Some(all_users()),
                apps: Some(apps(&[&unknown])),
                grant: Some(grant(&[pb::GrantControl::Mfa])),
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            pb::PolicyDefinition {
                name: "unknown user".into(),
                users: Some(pb::UserAssignment {
                    include_users: vec![unknown.clone()],
                    ..Default::default()
                }),
                apps: Some(apps(&[&auto.app_id])),
                grant: Some(grant(&[pb::GrantControl::Mfa])),
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            pb::PolicyDefinition {
                name: "block with other controls".into(),
                users: Some(all_users()),
                apps: Some(apps(&[&auto.app_id])),
                grant: Some(pb::GrantControls {
                    block: true,
                    controls: vec![pb::GrantControl::Mfa as i32],
                    ..Default::default()
                }),
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            pb::PolicyDefinition {
                name: "everyone blocked".into(),
                users: Some(all_users()),
                apps: Some(all_apps()),
                grant: Some(block()),
                ..Default::default()
            },
            Code::FailedPrecondition,
        ),
        (
            pb::PolicyDefinition {
                name: "nobody".into(),
                users: Some(pb::UserAssignment::default()),
                apps: Some(apps(&[&auto.app_id])),
                grant: Some(grant(&[pb::GrantControl::Mfa])),
                ..Default::default()
            },
            Code::FailedPrecondition,
        ),
    ];
    for (definition, code) in cases {
        let name = definition.name.clone();
        match create(auto, definition, pb::PolicyState::Enabled).await {
            Err(status) if status.code() == code => {}
            other => return Err(format!("{name}: expected {code:?}, got {other:?}").into()),
        }
    }
    // Acknowledged, the lock-everyone-out policy is saved (disabled, then deleted).
    let saved = policies(auto)
        .create_policy(req(
            pb::CreatePolicyRequest {
                tenant_id: auto.tenant_id.clone(),
                definition: Some(pb::PolicyDefinition {
                    name: "everyone blocked".into(),
                    users: Some(all_users()),
                    apps: Some(all_apps()),
                    grant: Some(block()),
                    ..Default::default()
                }),
                state: pb::PolicyState::Disabled as i32,
                acknowledge_warnings: true,
            },
            &auto.key,
        )?)
        .await?
        .into_inner();
    completed(&password_step(auto, "alice@example.com").await?)?;
    policies(auto)
        .delete_policy(req(
            pb::PolicyRef {
                tenant_id: auto.tenant_id.clone(),
                policy_id: saved.id,
            },
            &auto.key,
        )?)
        .await?;
    let after = policies(auto)
        .list_policies(req(
            pb::ListPoliciesRequest {
                tenant_id: auto.tenant_id.clone(),
            },
            &auto.key,
        )?)
        .await?
        .into_inner()
        .policies
        .len();
    if before != after {
        return Err(format!("refused requests saved policies: {before} → {after}").into());
    }
    Ok(())
}

/// What If explains each policy: applied, or the first condition that did not match.
async fn what_if(auto: &World, home: &World) -> TestResult {
    let mut client = policies(auto);
    let countries = client
        .create_named_location(req(
            pb::CreateNamedLocationRequest {
                tenant_id: auto.tenant_id.clone(),
                name: "Embargoed".into(),
                ranges: vec![],
                countries: vec!["kp".into()],
                trusted: false,
            },
            &auto.key,
        )?)
        .await?
        .into_inner();
    if countries.countries != vec!["KP".to_string()] {
        return Err(format!("country not normalised: {countries:?}").into());
    }
    let embargo = create(
        auto,
        pb::PolicyDefinition {
            name: "Block embargoed countries".into(),
            users: Some(pb::UserAssignment {
                all: true,
                exclude_users: vec![],
                exclude_groups: vec![],
                ..Default::default()
            }),
            apps: Some(all_apps()),
            conditions: Some(pb::PolicyConditions {
                locations: Some(pb::LocationCondition {
                    include: vec![countries.id.clone()],
                    ..Default::default()
                }),
                platforms: vec![pb::ClientPlatform::Android as i32],
                ..Default::default()
            }),
            grant: Some(block()),
            ..Default::default()
        },
        pb::PolicyState::Enabled,
    )
    .await?;
    let bob = find_user(auto, "bob@example.com").await?;
    let ask = |country: &str, agent: &str, app: &str| pb::WhatIfRequest {
        tenant_id: auto.tenant_id.clone(),
        user_id: bob.clone(),
        application_id: app.into(),
        ip: "198.51.100.7".into(),
        user_agent: agent.into(),
        country: country.into(),
        sign_in_risk: pb::RiskLevel::None as i32,
        user_risk: pb::RiskLevel::None as i32,
        primary_method: "password".into(),
    };
    let android = "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36";
    let answer = client
        .what_if(req(ask("KP", android, &auto.app_id), &auto.key)?)
        .await?
        .into_inner();
    if !answer.blocked || answer.blocked_by != embargo.id {
        return Err(format!("What If did not block: {answer:?}").into());
    }
    let explained = |answer: &pb::WhatIfResponse, name: &str| {
        answer
            .policies
            .iter()
            .find(|p| p.name == name)
            .cloned()
            .ok_or(format!("{name} not explained in {answer:?}"))
    };
    // The home insurance phone policy does not apply to auto: on applications.
    let phone = explained(&answer, "Verified phone for home insurance")?;
    if phone.applies || phone.failed_condition != "applications" {
        return Err(format!("phone policy explanation: {phone:?}").into());
    }
    // From France: the embargo does not apply, on locations; from KP on Windows: platforms.
    let answer = client
        .what_if(req(ask("FR", android, &auto.app_id), &auto.key)?)
        .await?
        .into_inner();
    let embargo_result = explained(&answer, "Block embargoed countries")?;
    if answer.blocked || embargo_result.failed_condition != "locations" {
        return Err(format!("embargo from FR: {answer:?}").into());
    }
    let windows = "Mozilla/5.0 (Windows NT 10.0; Win64; x64)";
    let answer = client
        .what_if(req(ask("KP", windows, &auto.app_id), &auto.key)?)
        .await?
        .into_inner();
    if answer.blocked
        || explained(&answer, "Block embargoed countries")?.failed_condition != "platforms"
    {
        return Err(format!("embargo on Windows: {answer:?}").into());
    }
    // Bob has a verified phone: home insurance asks nothing more of him.
    let answer = client
        .what_if(req(ask("FR", windows, &home.app_id), &auto.key)?)
        .await?
        .into_inner();
    let phone = explained(&answer, "Verified phone for home insurance")?;
    if !phone.applies || !phone.controls.is_empty() || !answer.required_controls.is_empty() {
        return Err(format!("phone policy for bob at home: {answer:?}").into());
    }
    let bad = client
        .what_if(req(
            pb::WhatIfRequest {
                ip: "not an ip".into(),
                ..ask("FR", windows, &home.app_id)
            },
            &auto.key,
        )?)
        .await;
    if bad.map_err(|s| s.code()).err() != Some(Code::InvalidArgument) {
        return Err("What If accepted a bad IP".into());
    }
    set_state(auto, &embargo, pb::PolicyState::Disabled).await?;
    Ok(())
}

/// A block of a country named location, located by the GeoIP database; recorded country.
async fn country_block(server: &Server, auto: &World, store: &Arc<dyn EventStore>) -> TestResult {
    let embargoed = policies(auto)
        .create_named_location(req(
            pb::CreateNamedLocationRequest {
                tenant_id: auto.tenant_id.clone(),
                name: "North Korea".into(),
                ranges: vec![],
                countries: vec!["KP".into()],
                trusted: false,
            },
            &auto.key,
        )?)
        .await?
        .into_inner();
    let policy = create(
        auto,
        pb::PolicyDefinition {
            name: "Block North Korea".into(),
            users: Some(all_users()),
            apps: Some(all_apps()),
            conditions: in_locations(vec![embargoed.id]),
            grant: Some(block()),
            ..Default::default()
        },
        pb::PolicyState::Enabled,
    )
    .await?;
    let from_kp = from(auto, server, "127.0.0.88").await?;
    let flow = password_step(&from_kp, "alice@example.com").await?;
    status_is(&flow, pb::SignInStatus::Blocked)?;
    let recorded = evaluation(store, &flow).await?;
    if recorded["country"] != "KP" || recorded["blocked_by"] != policy.id.as_str() {
        return Err(format!("country block not recorded: {recorded}").into());
    }
    let flow = password_step(auto, "alice@example.com").await?;
    completed(&flow)?;
    // What If locates an IP the same way when no country is given.
    let alice = find_user(auto, "alice@example.com").await?;
    let answer = policies(auto)
        .what_if(req(
            pb::WhatIfRequest {
                tenant_id: auto.tenant_id.clone(),
                user_id: alice,
                application_id: auto.app_id.clone(),
                ip: "127.0.0.88".into(),
                ..Default::default()
            },
            &auto.key,
        )?)
        .await?
        .into_inner();
    if !answer.blocked || answer.blocked_by != policy.id {
        return Err(format!("What If did not locate the IP: {answer:?}").into());
    }
    set_state(auto, &policy, pb::PolicyState::Disabled).await?;
    Ok(())
}

/// "Sign-in risk medium or high → MFA": a sign-in from a listed anonymiser (medium) or, once
/// the malicious list file changes, from a listed malicious address (high) is challenged,
/// with the detection recorded on the flow; an ordinary sign-in is not.
async fn risk_based_access(
    server: &Server,
    auto: &World,
    store: &Arc<dyn EventStore>,
    malicious: &Path,
) -> TestResult {
    let policy = create(
        auto,
        pb::PolicyDefinition {
            name: "MFA for risky sign-ins".into(),
            users: Some(all_users()),
            apps: Some(all_apps()),
            conditions: Some(pb::PolicyConditions {
                sign_in_risk: vec![pb::RiskLevel::Medium as i32, pb::RiskLevel::High as i32],
                ..Default::default()
            }),
            grant: Some(grant(&[pb::GrantControl::Mfa])),
            ..Default::default()
        },
        pb::PolicyState::Enabled,
    )
    .await?;
    let ordinary = password_step(auto, "alice@example.com").await?;
    completed(&ordinary)?;
    let risk = flow_event(store, &ordinary, "RiskAssessed").await?;
    if risk["level"] != "none" || !risk["detections"].is_null() {
        return Err(format!("an ordinary sign-in was found risky: {risk}").into());
    }
    let anonymised = from(auto, server, "127.0.0.98").await?;
    let flow = password_step(&anonymised, "alice@example.com").await?;
    step_is(&flow, pb::SignInStep::SelectMfaMethod)?;
    let risk = flow_event(store, &flow, "RiskAssessed").await?;
    if risk["level"] != "medium" || risk["detections"][0]["kind"] != "anonymous_ip" {
        return Err(format!("anonymiser not detected: {risk}").into());
    }
    // The operator adds an address to the malicious list; the running server picks it up.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    std::fs::write(malicious, "127.0.0.97\n")?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let hostile = from(auto, server, "127.0.0.97").await?;
    let flow = password_step(&hostile, "alice@example.com").await?;
    step_is(&flow, pb::SignInStep::SelectMfaMethod)?;
    let risk = flow_event(store, &flow, "RiskAssessed").await?;
    if risk["level"] != "high" || risk["detections"][0]["kind"] != "malicious_ip" {
        return Err(format!("malicious address not detected: {risk}").into());
    }
    // A right password that is in the breached-password list: leaked credentials (high).
    // The tenant lets the account keep it (no breached-password check) for the test.
    auto.reject_breached(false).await?;
    UserServiceClient::new(auto.channel.clone())
        .create_user(req(
            pb::CreateUserRequest {
                tenant_id: auto.tenant_id.clone(),
                email: "leaky@example.com".into(),
                password: "password123".into(),
                email_verified: true,
                ..Default::default()
            },
            &auto.key,
        )?)
        .await?;
    auto.reject_breached(true).await?;
    let flow = auto
        .start("leaky@example.com", pb::PrimaryMethod::Password)
        .await?;
    let flow = auto.password(&flow, "password123").await?;
    step_is(&flow, pb::SignInStep::SelectMfaMethod)?;
    let risk = flow_event(store, &flow, "RiskAssessed").await?;
    if risk["level"] != "high"
        || risk["detections"][0]["kind"] != "leaked_credentials"
        || risk["detections"].as_array().map(Vec::len) != Some(1)
    {
        return Err(format!("leaked password not detected: {risk}").into());
    }
    set_state(auto, &policy, pb::PolicyState::Disabled).await?;
    Ok(())
}

/// Another tenant's key sees nothing of this tenant's policies, by tenant id or by policy id.
async fn isolation(auto: &World, other: &World) -> TestResult {
    let listed = policies(auto)
        .list_policies(req(
            pb::ListPoliciesRequest {
                tenant_id: auto.tenant_id.clone(),
            },
            &auto.key,
        )?)
        .await?
        .into_inner()
        .policies;
    let some = listed.first().ok_or("no policies")?;
    let by_tenant = policies(auto)
        .list_policies(req(
            pb::ListPoliciesRequest {
                tenant_id: auto.tenant_id.clone(),
            },
            &other.key,
        )?)
        .await;
    let by_id = policies(auto)
        .get_policy(req(
            pb::PolicyRef {
                tenant_id: other.tenant_id.clone(),
                policy_id: some.id.clone(),
            },
            &other.key,
        )?)
        .await;
    let disable = policies(auto)
        .set_policy_state(req(
            pb::SetPolicyStateRequest {
                tenant_id: other.tenant_id.clone(),
                policy_id: some.id.clone(),
                state: pb::PolicyState::Disabled as i32,
            },
            &other.key,
        )?)
        .await;
    for (what, result) in [
        ("list", by_tenant.map(|_| ())),
        ("get", by_id.map(|_| ())),
        ("set state", disable.map(|_| ())),
    ] {
        if result.map_err(|s| s.code()).err() != Some(Code::NotFound) {
            return Err(format!("another tenant's key could {what} a policy").into());
        }
    }
    Ok(())
}

async fn find_user(world: &World, email: &str) -> Result<String, Error> {
    let users = UserServiceClient::new(world.channel.clone())
        .list_users(req(
            pb::ListUsersRequest {
                tenant_id: world.tenant_id.clone(),
                ..Default::default()
            },
            &world.key,
        )?)
        .await?
        .into_inner()
        .users;
    users
        .into_iter()
        .find(|u| u.email == email)
        .map(|u| u.id)
        .ok_or_else(|| format!("no user {email}").into())
}

/// A recorded history in a fresh tenant; drafts evaluated against it, counts checked.
async fn backtest(server: &Server, auto: &World) -> TestResult {
    let home = auto.with_app("Home insurance").await?;
    let before = chrono::Utc::now() - chrono::Duration::seconds(1);
    let u1 = auto.create_user("u1@example.com", true).await?;
    let u2 = auto.create_user("u2@example.com", true).await?;
    auto.create_user("u3@example.com", true).await?;
    // History: u1 → auto twice (once from 127.0.0.66), u2 → home, u3 → home after a wrong
    // password (the wrong password's flow never reached the policy step), u1 → an unknown
    // email attempt (no account: never evaluated).
    completed(&password_step(auto, "u1@example.com").await?)?;
    let banned_auto = from(auto, server, "127.0.0.66").await?;
    completed(&password_step(&banned_auto, "u1@example.com").await?)?;
    completed(&password_step(&home, "u2@example.com").await?)?;
    let wrong = home
        .start("u3@example.com", pb::PrimaryMethod::Password)
        .await?;
    if home.password(&wrong, "not the password").await.is_ok() {
        return Err("wrong password accepted".into());
    }
    completed(&password_step(&home, "u3@example.com").await?)?;
    let nobody = auto
        .start("nobody@example.com", pb::PrimaryMethod::Password)
        .await?;
    let _ = auto.password(&nobody, PASSWORD).await;
    let after = chrono::Utc::now() + chrono::Duration::seconds(1);

    let mut client = policies(auto);
    let run =
        |draft: pb::PolicyDefinition, from: chrono::DateTime<chrono::Utc>| pb::BacktestRequest {
            tenant_id: auto.tenant_id.clone(),
            draft: Some(draft),
            from: from.to_rfc3339(),
            to: after.to_rfc3339(),
            samples: 5,
        };
    let mfa_home = pb::PolicyDefinition {
        name: "MFA for home".into(),
        users: Some(all_users()),
        apps: Some(apps(&[&home.app_id])),
        grant: Some(grant(&[pb::GrantControl::Mfa])),
        ..Default::default()
    };
    let report = client
        .backtest(req(run(mfa_home.clone(), before), &auto.key)?)
        .await?
        .into_inner();
    if (
        report.evaluated,
        report.challenged,
        report.blocked,
        report.completed_without_mfa,
    ) != (4, 2, 0, 2)
    {
        return Err(format!("MFA-for-home backtest: {report:?}").into());
    }
    let home_row = report
        .by_app
        .iter()
        .find(|r| r.id == home.app_id)
        .ok_or("no home row")?;
    let auto_row = report
        .by_app
        .iter()
        .find(|r| r.id == auto.app_id)
        .ok_or("no auto row")?;
    if (
        home_row.evaluated,
        home_row.challenged,
        home_row.sample_sign_in_ids.len(),
    ) != (2, 2, 2)
        || (auto_row.evaluated, auto_row.challenged) != (2, 0)
    {
        return Err(format!("per-app counts: {report:?}").into());
    }
    if report
        .by_user
        .iter()
        .find(|r| r.id == u2)
        .map(|r| r.challenged)
        != Some(1)
        || report
            .by_user
            .iter()
            .find(|r| r.id == u1)
            .map(|r| r.challenged)
            != Some(0)
    {
        return Err(format!("per-user counts: {report:?}").into());
    }

    // A block of 127.0.0.66: one sign-in (u1's second).
    let banned = location(auto, "Banned", &["127.0.0.66/32"], false).await?;
    let block_banned = pb::PolicyDefinition {
        name: "Block banned".into(),
        users: Some(all_users()),
        apps: Some(all_apps()),
        conditions: in_locations(vec![banned]),
        grant: Some(block()),
        ..Default::default()
    };
    let report = client
        .backtest(req(run(block_banned, before), &auto.key)?)
        .await?
        .into_inner();
    if (report.evaluated, report.blocked, report.challenged) != (4, 1, 0)
        || report
            .by_user
            .iter()
            .find(|r| r.id == u1)
            .map(|r| r.blocked)
            != Some(1)
    {
        return Err(format!("block backtest: {report:?}").into());
    }
    // A range that ends before the history: nothing evaluated.
    let empty = client
        .backtest(req(
            pb::BacktestRequest {
                to: before.to_rfc3339(),
                ..run(mfa_home.clone(), before - chrono::Duration::hours(1))
            },
            &auto.key,
        )?)
        .await?
        .into_inner();
    if empty.evaluated != 0 {
        return Err(format!("range not honoured: {empty:?}").into());
    }
    let backwards = client
        .backtest(req(
            run(mfa_home, after + chrono::Duration::hours(1)),
            &auto.key,
        )?)
        .await;
    if backwards.map_err(|s| s.code()).err() != Some(Code::InvalidArgument) {
        return Err("a backwards range was accepted".into());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conditional_access_on_sqlite() -> TestResult {
    let dir = tempfile::tempdir()?;
    run_all(dir.path(), None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conditional_access_on_postgres() -> TestResult {
    let Some(url) = support::postgres_url().await? else {
        eprintln!("GATEHOUSE_TEST_DATABASE_URL not set: PostgreSQL run skipped");
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    run_all(dir.path(), Some(&url)).await
}
