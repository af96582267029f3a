//! Sign-in flows over gRPC against a running server: password with and without MFA, TOTP
//! codes computed by pyotp (and refused on reuse), recovery codes, email and SMS codes from
//! the outbox, exhausted codes, passwordless email codes, smart lockout under 50 concurrent
//! guesses, flows that survive SIGKILL and move between processes, tokens checked by PyJWT
//! against /jwks, refresh rotation with reuse detection, key rotation, expiry. SQLite always;
//! PostgreSQL when configured.

use crate::support;

use gatehouse_proto::v1 as pb;
use std::path::Path;
use std::time::{Duration, Instant};
use support::world::{PASSWORD, World, code_of, completed, connect, py, step_is, totp};
use support::{Error, Server, TestResult, req, wait_for_message};
use tonic::Code;

async fn run_all(data: &Path, database_url: Option<&str>) -> TestResult {
    let server = Server::start(data, database_url)?;
    let admin = server.printed_admin_key().ok_or("no admin key")?;
    let world = World::new(&server, &admin).await?;

    tokens_and_refresh(&world).await?;
    enumeration(&world).await?;
    passwordless(&world, data).await?;
    lockout(&world).await?;
    mfa_flows(&world, data).await?;
    key_rotation(&world).await?;

    // SIGKILL while a flow waits for its MFA code; the restarted process completes it.
    world.set_require_mfa(true).await?;
    let flow = world
        .start("mfa@example.com", pb::PrimaryMethod::Password)
        .await?;
    let flow = world.password(&flow, PASSWORD).await?;
    step_is(&flow, pb::SignInStep::SelectMfaMethod)?;
    let flow = world.select(&flow, pb::MfaMethod::EmailOtp).await?;
    let sent = wait_for_message(data, "mfa@example.com", 2)?;
    let mut server = server;
    server.child.kill()?;
    server.child.wait()?;
    drop(server);
    let server = Server::start(data, database_url)?;
    let world = World {
        channel: connect(&server).await?,
        http: server.http,
        ..world
    };
    let done = world.mfa_code(&flow, &sent.code.ok_or("no code")?).await?;
    completed(&done)?;
    server.stop()?;
    Ok(())
}

/// Tokens verified by PyJWT against /jwks; forgeries refused; refresh rotation and reuse.
async fn tokens_and_refresh(world: &World) -> TestResult {
    world.create_user("plain@example.com", true).await?;
    let tokens = world.sign_in("plain@example.com").await?;
    let (ok, claims) = py(&[
        "verify",
        &world.jwks_url(),
        &world.issuer(),
        &world.client_id,
        &tokens.id_token,
    ])?;
    if !ok {
        return Err(format!("PyJWT refused the ID token: {claims}").into());
    }
    let claims: serde_json::Value = serde_json::from_str(&claims)?;
    if claims["email"] != "plain@example.com" || claims["amr"] != serde_json::json!(["pwd"]) {
        return Err(format!("unexpected claims {claims}").into());
    }
    let (ok, _) = py(&[
        "verify",
        &world.jwks_url(),
        &world.issuer(),
        &world.client_id,
        &tokens.access_token,
    ])?;
    if !ok {
        return Err("PyJWT refused the access token".into());
    }
    world.verify(&tokens.access_token).await?;

    // alg "none" and a token signed by a key Gatehouse never published: both refused, by
    // Gatehouse and by PyJWT.
    let (_, forged) = py(&["forge", &tokens.access_token])?;
    let forged: Vec<&str> = forged.lines().collect();
    if forged.len() != 2 {
        return Err("forge printed no tokens".into());
    }
    for token in &forged {
        let refused = world.verify(token).await;
        if refused.as_ref().map_err(|s| s.code()).err() != Some(Code::Unauthenticated) {
            return Err(format!("forged token accepted: {refused:?}").into());
        }
        let (ok, _) = py(&[
            "verify",
            &world.jwks_url(),
            &world.issuer(),
            &world.client_id,
            token,
        ])?;
        if ok {
            return Err("PyJWT accepted a forged token".into());
        }
    }

    // Rotation: the old refresh token stops working; presenting it again revokes the family.
    let refresh = |token: &str| world.refresh_request(token);
    let first = tokens.refresh_token.clone();
    let second = world
        .sessions()
        .refresh_session(refresh(&first))
        .await?
        .into_inner();
    if second.refresh_token == first {
        return Err("refresh token not rotated".into());
    }
    world.verify(&second.access_token).await?;
    // A long chain: the session is then loaded from a snapshot (one every 32 events), which
    // must still know the first token.
    let mut third = second;
    for _ in 0..40 {
        third = world
            .sessions()
            .refresh_session(refresh(&third.refresh_token))
            .await?
            .into_inner();
    }
    let reuse = world.sessions().refresh_session(refresh(&first)).await;
    if reuse.map_err(|s| s.code()).err() != Some(Code::Unauthenticated) {
        return Err("a rotated refresh token was accepted".into());
    }
    // The whole family is gone, the newest token included, and its access tokens too.
    let after = world
        .sessions()
        .refresh_session(refresh(&third.refresh_token))
        .await;
    if after.map_err(|s| s.code()).err() != Some(Code::Unauthenticated) {
        return Err("the family survived a reuse".into());
    }
    if world.verify(&third.access_token).await.is_ok() {
        return Err("an access token of a revoked session verified".into());
    }
    let user_id = world
        .sessions()
        .list_sessions(req(
            pb::ListSessionsRequest {
                tenant_id: world.tenant_id.clone(),
                user_id: String::new(),
                include_ended: true,
            },
            &world.key,
        )?)
        .await;
    if user_id.map_err(|s| s.code()).err() != Some(Code::InvalidArgument) {
        return Err("ListSessions without a user id accepted".into());
    }

    // A deleted application's sessions refresh no more.
    let short = world.with_app("Short-lived").await?;
    let tokens = short.sign_in("plain@example.com").await?;
    let refreshed = short
        .sessions()
        .refresh_session(short.refresh_request(&tokens.refresh_token))
        .await?
        .into_inner();
    gatehouse_proto::v1::application_service_client::ApplicationServiceClient::new(
        world.channel.clone(),
    )
    .delete_application(req(
        pb::DeleteApplicationRequest {
            tenant_id: world.tenant_id.clone(),
            application_id: short.app_id.clone(),
        },
        &world.key,
    )?)
    .await?;
    let after = short
        .sessions()
        .refresh_session(short.refresh_request(&refreshed.refresh_token))
        .await;
    if after.map_err(|s| s.code()).err() != Some(Code::Unauthenticated) {
        return Err("a deleted application's session refreshed".into());
    }
    Ok(())
}

/// An unknown email and a wrong password get the same answer.
async fn enumeration(world: &World) -> TestResult {
    let known = world
        .start("plain@example.com", pb::PrimaryMethod::Password)
        .await?;
    let unknown = world
        .start("nobody@example.com", pb::PrimaryMethod::Password)
        .await?;
    if known.next_step != unknown.next_step || known.status != unknown.status {
        return Err("start differs for an unknown email".into());
    }
    let a = world
        .password(&known, "wrong password!")
        .await
        .err()
        .ok_or("accepted")?;
    let b = world
        .password(&unknown, PASSWORD)
        .await
        .err()
        .ok_or("accepted")?;
    if a.code() != Code::Unauthenticated || a.code() != b.code() || a.message() != b.message() {
        return Err(format!("answers differ: {a:?} / {b:?}").into());
    }
    // Another tenant's client id does not reach the flow.
    let stranger = world
        .signin()
        .get_sign_in(pb::SignInRef {
            tenant_id: world.tenant_id.clone(),
            client_id: "not-the-app".into(),
            sign_in_id: known.id.clone(),
        })
        .await;
    if stranger.map_err(|s| s.code()).err() != Some(Code::NotFound) {
        return Err("a flow answered another client id".into());
    }
    // StartSignIn looks the tenant, the app and the email up at once; the answer still names
    // the tenant before the app.
    let start = |tenant_id: String, client_id: &str| pb::StartSignInRequest {
        tenant_id,
        client_id: client_id.into(),
        email: "plain@example.com".into(),
        method: pb::PrimaryMethod::Password as i32,
    };
    let no_app = world
        .signin()
        .start_sign_in(start(world.tenant_id.clone(), "not-the-app"))
        .await
        .err()
        .ok_or("a flow started for an unknown app")?;
    let no_tenant = world
        .signin()
        .start_sign_in(start(uuid::Uuid::now_v7().to_string(), "not-the-app"))
        .await
        .err()
        .ok_or("a flow started for an unknown tenant")?;
    if no_app.code() != Code::NotFound
        || no_app.message() != "application not found"
        || no_tenant.code() != Code::NotFound
        || no_tenant.message() != "tenant not found"
    {
        return Err(format!("unknown app / tenant: {no_app:?} / {no_tenant:?}").into());
    }
    Ok(())
}

/// Passwordless: a code by email instead of a password.
async fn passwordless(world: &World, data: &Path) -> TestResult {
    world.create_user("otp@example.com", true).await?;
    let flow = world
        .start("otp@example.com", pb::PrimaryMethod::EmailOtp)
        .await?;
    step_is(&flow, pb::SignInStep::EmailCode)?;
    let sent = wait_for_message(data, "otp@example.com", 0)?;
    let code = sent.code.ok_or("no code")?;
    let wrong = world
        .signin()
        .submit_email_code(world.code_request(&flow, "000000"))
        .await;
    if wrong.map_err(|s| s.code()).err() != Some(Code::InvalidArgument) && code != "000000" {
        return Err("a wrong email code was accepted".into());
    }
    let done = world
        .signin()
        .submit_email_code(world.code_request(&flow, &code))
        .await?
        .into_inner();
    completed(&done)?;
    // Guessing codes flow after flow meets the lockout (threshold 5), for an unknown email too.
    for attempt in 1..=6 {
        let flow = world
            .start("ghost@example.com", pb::PrimaryMethod::EmailOtp)
            .await?;
        let guess = world
            .signin()
            .submit_email_code(world.code_request(&flow, "123456"))
            .await
            .map(|r| r.into_inner());
        let expected = if attempt <= 5 {
            Code::InvalidArgument
        } else {
            Code::ResourceExhausted
        };
        if code_of(guess)? != expected {
            return Err(format!("email code guess #{attempt}: expected {expected:?}").into());
        }
    }
    Ok(())
}

/// 50 concurrent wrong passwords: exactly the threshold is checked; then even the right
/// password is refused until the lock expires.
async fn lockout(world: &World) -> TestResult {
    world.create_user("victim@example.com", true).await?;
    let mut attempts = Vec::new();
    for _ in 0..50 {
        let flow = world
            .start("victim@example.com", pb::PrimaryMethod::Password)
            .await?;
        attempts.push(flow);
    }
    let guesses = attempts
        .iter()
        .map(|flow| world.password(flow, "guess guess guess"));
    let results = futures::future::join_all(guesses).await;
    let checked = results
        .iter()
        .filter(|r| r.as_ref().err().map(|s| s.code()) == Some(Code::Unauthenticated))
        .count();
    let locked = results
        .iter()
        .filter(|r| r.as_ref().err().map(|s| s.code()) == Some(Code::ResourceExhausted))
        .count();
    if checked != 5 || locked != 45 {
        return Err(format!("threshold 5: {checked} checked, {locked} locked").into());
    }
    let locked_at = Instant::now();
    let flow = world
        .start("victim@example.com", pb::PrimaryMethod::Password)
        .await?;
    if code_of(world.password(&flow, PASSWORD).await)? != Code::ResourceExhausted {
        return Err("the right password was checked during the lock".into());
    }
    // The first lock lasts 3 s.
    tokio::time::sleep(
        Duration::from_secs(3).saturating_sub(locked_at.elapsed()) + Duration::from_millis(500),
    )
    .await;
    let done = world.password(&flow, PASSWORD).await?;
    completed(&done)
}

/// TOTP (pyotp), replay, recovery codes, email and SMS codes, exhausted codes, phone
/// registration. Returns the MFA user's id.
async fn mfa_flows(world: &World, data: &Path) -> Result<String, Error> {
    let user_id = world.create_user("mfa@example.com", true).await?;
    let user = |tenant: &str| pb::MfaUserRef {
        tenant_id: tenant.into(),
        user_id: user_id.clone(),
    };
    let enrollment = world
        .mfa()
        .start_totp_enrollment(req(
            pb::StartTotpEnrollmentRequest {
                tenant_id: world.tenant_id.clone(),
                user_id: user_id.clone(),
                issuer: "Contoso".into(),
            },
            &world.key,
        )?)
        .await?
        .into_inner();
    if !enrollment.otpauth_uri.starts_with("otpauth://totp/")
        || !enrollment.qr_png.starts_with(b"\x89PNG")
    {
        return Err("bad enrolment answer".into());
    }
    // Confirmed with the previous step's code (inside the ±1 window), so that the current
    // step is still unused for the sign-in below.
    let listed = world
        .mfa()
        .confirm_totp_enrollment(req(
            pb::ConfirmTotpEnrollmentRequest {
                tenant_id: world.tenant_id.clone(),
                user_id: user_id.clone(),
                code: totp(&enrollment.secret, -30)?,
            },
            &world.key,
        )?)
        .await?
        .into_inner();
    if !listed.totp_enrolled {
        return Err("TOTP not enrolled".into());
    }
    let codes = world
        .mfa()
        .regenerate_recovery_codes(req(user(&world.tenant_id), &world.key)?)
        .await?
        .into_inner()
        .codes;
    if codes.len() != 10 {
        return Err("not ten recovery codes".into());
    }
    world.set_require_mfa(true).await?;

    // TOTP with a code from pyotp; the same code is refused in the next flow.
    let flow = world
        .start("mfa@example.com", pb::PrimaryMethod::Password)
        .await?;
    let flow = world.password(&flow, PASSWORD).await?;
    step_is(&flow, pb::SignInStep::SelectMfaMethod)?;
    for method in [
        pb::MfaMethod::Totp,
        pb::MfaMethod::EmailOtp,
        pb::MfaMethod::RecoveryCode,
    ] {
        if !flow.mfa_methods.contains(&(method as i32)) {
            return Err(format!("{method:?} not offered: {flow:?}").into());
        }
    }
    let flow = world.select(&flow, pb::MfaMethod::Totp).await?;
    step_is(&flow, pb::SignInStep::MfaCode)?;
    let code = totp(&enrollment.secret, 0)?;
    let done = world.mfa_code(&flow, &code).await?;
    completed(&done)?;
    let amr: serde_json::Value = serde_json::from_str(
        &world
            .verify(&done.tokens.as_ref().ok_or("no tokens")?.access_token)
            .await?
            .claims_json,
    )?;
    if amr["amr"] != serde_json::json!(["pwd", "otp", "mfa"]) {
        return Err(format!("amr {amr}").into());
    }
    let flow = world
        .start("mfa@example.com", pb::PrimaryMethod::Password)
        .await?;
    let flow = world.password(&flow, PASSWORD).await?;
    let flow = world.select(&flow, pb::MfaMethod::Totp).await?;
    if code_of(world.mfa_code(&flow, &code).await)? != Code::InvalidArgument {
        return Err("a TOTP code was accepted twice".into());
    }

    // A recovery code works once.
    let flow = world.select(&flow, pb::MfaMethod::RecoveryCode).await?;
    completed(&world.mfa_code(&flow, &codes[0].to_uppercase()).await?)?;
    let flow = world
        .start("mfa@example.com", pb::PrimaryMethod::Password)
        .await?;
    let flow = world.password(&flow, PASSWORD).await?;
    let flow = world.select(&flow, pb::MfaMethod::RecoveryCode).await?;
    if code_of(world.mfa_code(&flow, &codes[0]).await)? != Code::InvalidArgument {
        return Err("a recovery code was accepted twice".into());
    }

    // Email code from the outbox (this user's first message).
    let flow = world.select(&flow, pb::MfaMethod::EmailOtp).await?;
    let sent = wait_for_message(data, "mfa@example.com", 0)?;
    completed(&world.mfa_code(&flow, &sent.code.ok_or("no code")?).await?)?;

    // Wrong codes exhausted: the fifth ends the flow.
    let flow = world
        .start("mfa@example.com", pb::PrimaryMethod::Password)
        .await?;
    let flow = world.password(&flow, PASSWORD).await?;
    let flow = world.select(&flow, pb::MfaMethod::EmailOtp).await?;
    let sent = wait_for_message(data, "mfa@example.com", 1)?;
    let right = sent.code.ok_or("no code")?;
    let wrong = if right == "111111" {
        "222222"
    } else {
        "111111"
    };
    for attempt in 1..=5 {
        let code = code_of(world.mfa_code(&flow, wrong).await)?;
        let expected = if attempt < 5 {
            Code::InvalidArgument
        } else {
            Code::FailedPrecondition
        };
        if code != expected {
            return Err(format!("wrong code #{attempt}: {code:?}").into());
        }
    }
    if code_of(world.mfa_code(&flow, &right).await)? != Code::FailedPrecondition
        || world.get(&flow).await?.status != pb::SignInStatus::Failed as i32
    {
        return Err("the flow survived five wrong codes".into());
    }

    // A user with no second factor registers an authenticator app during sign-in when the
    // tenant lists TOTP first (it does here): the secret and QR code, then its first code.
    world.create_user("newapp@example.com", false).await?;
    let flow = world
        .start("newapp@example.com", pb::PrimaryMethod::Password)
        .await?;
    let flow = world.password(&flow, PASSWORD).await?;
    step_is(&flow, pb::SignInStep::TotpRegistration)?;
    let flow_ref = pb::SignInRef {
        tenant_id: world.tenant_id.clone(),
        client_id: world.client_id.clone(),
        sign_in_id: flow.id.clone(),
    };
    let registration = world
        .signin()
        .get_totp_registration(flow_ref.clone())
        .await?
        .into_inner();
    // Asking again shows the same pending enrolment.
    let again = world
        .signin()
        .get_totp_registration(flow_ref)
        .await?
        .into_inner();
    if registration.secret != again.secret
        || !registration.otpauth_uri.starts_with("otpauth://totp/")
        || !registration.qr_png.starts_with(b"\x89PNG")
    {
        return Err(format!("the registration: {registration:?}").into());
    }
    let wrong = world
        .signin()
        .submit_totp_registration(world.code_request(&flow, "000000"))
        .await;
    if wrong.map_err(|s| s.code()).err() != Some(Code::InvalidArgument) {
        return Err("a wrong first code registered the app".into());
    }
    let done = world
        .signin()
        .submit_totp_registration(world.code_request(&flow, &totp(&registration.secret, 0)?))
        .await?
        .into_inner();
    completed(&done)?;
    // The app is now the user's second factor.
    let flow = world
        .start("newapp@example.com", pb::PrimaryMethod::Password)
        .await?;
    let flow = world.password(&flow, PASSWORD).await?;
    if flow.mfa_methods != vec![pb::MfaMethod::Totp as i32] {
        return Err(format!("TOTP not offered: {flow:?}").into());
    }

    // With SMS listed first, a user with no second factor registers a phone instead; the
    // code comes by SMS.
    let order = |first: pb::MfaMethod, second: pb::MfaMethod| {
        world.update_settings(move |settings| {
            settings.mfa_methods = vec![
                first as i32,
                pb::MfaMethod::EmailOtp as i32,
                second as i32,
                pb::MfaMethod::RecoveryCode as i32,
            ];
            Ok(())
        })
    };
    order(pb::MfaMethod::SmsOtp, pb::MfaMethod::Totp).await?;
    world.create_user("newphone@example.com", false).await?;
    let flow = world
        .start("newphone@example.com", pb::PrimaryMethod::Password)
        .await?;
    let flow = world.password(&flow, PASSWORD).await?;
    step_is(&flow, pb::SignInStep::PhoneNumber)?;
    let phone = |phone: &str, code: &str| pb::SubmitPhoneVerificationRequest {
        tenant_id: world.tenant_id.clone(),
        client_id: world.client_id.clone(),
        sign_in_id: flow.id.clone(),
        phone: phone.into(),
        code: code.into(),
    };
    let bad = world
        .signin()
        .submit_phone_verification(phone("12345", ""))
        .await;
    if bad.map_err(|s| s.code()).err() != Some(Code::InvalidArgument) {
        return Err("a bad phone number was accepted".into());
    }
    let waiting = world
        .signin()
        .submit_phone_verification(phone("+14155550100", ""))
        .await?
        .into_inner();
    step_is(&waiting, pb::SignInStep::PhoneCode)?;
    let sms = wait_for_message(data, "+14155550100", 0)?;
    if sms.channel != "sms" {
        return Err(format!("not an SMS: {sms:?}").into());
    }
    let done = world
        .signin()
        .submit_phone_verification(phone("", &sms.code.ok_or("no code")?))
        .await?
        .into_inner();
    completed(&done)?;
    // The phone is now a second factor of that user.
    let flow = world
        .start("newphone@example.com", pb::PrimaryMethod::Password)
        .await?;
    let flow = world.password(&flow, PASSWORD).await?;
    if flow.mfa_methods != vec![pb::MfaMethod::SmsOtp as i32] {
        return Err(format!("SMS not offered: {flow:?}").into());
    }
    order(pb::MfaMethod::Totp, pb::MfaMethod::SmsOtp).await?;
    Ok(user_id)
}

/// A new key signs; the old one stays published and its tokens still verify.
async fn key_rotation(world: &World) -> TestResult {
    world.set_require_mfa(false).await?;
    let before = world.sign_in("plain@example.com").await?;
    let jwks = world
        .sessions()
        .rotate_signing_key(req(
            pb::GetJwksRequest {
                tenant_id: world.tenant_id.clone(),
            },
            &world.key,
        )?)
        .await?
        .into_inner();
    let jwks: serde_json::Value = serde_json::from_str(&jwks.jwks_json)?;
    if jwks["keys"].as_array().map(Vec::len) != Some(2) {
        return Err(format!("after rotation: {jwks}").into());
    }
    world.verify(&before.access_token).await?;
    let after = world.sign_in("plain@example.com").await?;
    let kid = |token: &str| -> Result<String, Error> {
        use base64::Engine;
        let header = token.split('.').next().ok_or("no header")?;
        let header: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header)?,
        )?;
        Ok(header["kid"].as_str().unwrap_or_default().to_string())
    };
    if kid(&before.access_token)? == kid(&after.access_token)? {
        return Err("the new key does not sign".into());
    }
    for token in [&before.id_token, &after.id_token] {
        let (ok, reason) = py(&[
            "verify",
            &world.jwks_url(),
            &world.issuer(),
            &world.client_id,
            token,
        ])?;
        if !ok {
            return Err(format!("PyJWT after rotation: {reason}").into());
        }
    }
    // Discovery names the issuer and the JWKS.
    let server_path = format!(
        "/tenants/{}/.well-known/openid-configuration",
        world.tenant_id
    );
    let mut stream = std::net::TcpStream::connect(world.http)?;
    use std::io::{Read, Write};
    write!(
        stream,
        "GET {server_path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    if !response.contains(&format!("\"jwks_uri\":\"{}\"", world.jwks_url())) {
        return Err(format!("discovery: {response}").into());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sign_in_flows_on_sqlite() -> TestResult {
    let dir = tempfile::tempdir()?;
    run_all(dir.path(), None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sign_in_flows_on_postgres() -> TestResult {
    let Some(url) = support::postgres_url().await? else {
        eprintln!("GATEHOUSE_TEST_DATABASE_URL not set: PostgreSQL run skipped");
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    run_all(dir.path(), Some(&url)).await
}

/// A flow started on one process is completed on another over the same PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flow_moves_between_processes() -> TestResult {
    let Some(url) = support::postgres_url().await? else {
        eprintln!("GATEHOUSE_TEST_DATABASE_URL not set: PostgreSQL run skipped");
        return Ok(());
    };
    let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let a = Server::start(dir_a.path(), Some(&url))?;
    let admin = a.printed_admin_key().ok_or("no admin key")?;
    // Both processes must share the master key to read each other's sealed data.
    std::fs::copy(
        dir_a.path().join("master.key"),
        dir_b.path().join("master.key"),
    )?;
    let b = Server::start(dir_b.path(), Some(&url))?;
    let on_a = World::new(&a, &admin).await?;
    on_a.create_user("roamer@example.com", true).await?;
    let flow = on_a
        .start("roamer@example.com", pb::PrimaryMethod::Password)
        .await?;
    let on_b = World {
        channel: connect(&b).await?,
        http: b.http,
        ..on_a
    };
    let done = on_b.password(&flow, PASSWORD).await?;
    completed(&done)?;
    // And the first process sees the ending.
    let on_a = World {
        channel: connect(&a).await?,
        http: a.http,
        ..on_b
    };
    if on_a.get(&flow).await?.status != pb::SignInStatus::Completed as i32 {
        return Err("process A does not see the completion".into());
    }
    Ok(())
}

/// A flow left alone past its deadline is over: EXPIRED, and it takes no more answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_abandoned_flow_expires() -> TestResult {
    let dir = tempfile::tempdir()?;
    let server = Server::start_with_env(dir.path(), None, &[("GATEHOUSE_SIGN_IN_LIFETIME", "2")])?;
    let admin = server.printed_admin_key().ok_or("no admin key")?;
    let world = World::new(&server, &admin).await?;
    world.create_user("slow@example.com", true).await?;
    let flow = world
        .start("slow@example.com", pb::PrimaryMethod::Password)
        .await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let now = world.get(&flow).await?;
    if now.status != pb::SignInStatus::Expired as i32 {
        return Err(format!("not expired: {now:?}").into());
    }
    if code_of(world.password(&flow, PASSWORD).await)? != Code::FailedPrecondition {
        return Err("an expired flow took a password".into());
    }
    Ok(())
}
