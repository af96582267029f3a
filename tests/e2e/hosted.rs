//! The hosted pages in a real browser (Debian's headless Chromium driven by playwright-core,
//! `tests/browser/hosted.mjs`), against a running Gatehouse on SQLite:
//!
//! - a customer signs up from an app's sign-in page (the attribute the tenant collects, the
//!   emailed code), then signs in to that app, whose Conditional Access policy requires MFA:
//!   having no second factor, they enrol an authenticator app on the way (QR code and key);
//!   the app redeems its code and gets an ID token that says MFA, for a verified email;
//! - a customer signs in to another app with their account at an upstream OpenID provider
//!   (panva's oidc-provider as "Test provider"), end to end in the browser: the provider's
//!   login page, back through Gatehouse, signed up just in time, to the app.
//!
//! Screenshots of every page are saved under `target/tmp/hosted-*.png`.

use crate::support;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use gatehouse_events::EventFilter;
use gatehouse_proto::v1 as pb;
use gatehouse_proto::v1::application_service_client::ApplicationServiceClient;
use gatehouse_proto::v1::identity_provider_service_client::IdentityProviderServiceClient;
use serde_json::{Value, json};
use std::path::Path;
use std::process::Command;
use support::oidc::OidcProvider;
use support::world::World;
use support::{Error, Server, TestResult, req};

const PROVIDER_CLIENT: &str = "gatehouse-hosted";
const PROVIDER_SECRET: &str = "a-long-hosted-client-secret-0123456789";

/// The apps' web server: answers every request with a small page (the browser lands on it
/// with the code; the test reads the code from the browser's address).
fn app_server() -> Result<String, Error> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?;
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { break };
            let mut buffer = [0u8; 8192];
            let _ = std::io::Read::read(&mut stream, &mut buffer);
            let _ = std::io::Write::write_all(
                &mut stream,
                b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: 19\r\n\
                  connection: close\r\n\r\n<p>the app page</p>",
            );
        }
    });
    Ok(format!("http://{address}/app/callback"))
}

async fn public_app(world: &World, name: &str, callback: &str) -> Result<pb::Application, Error> {
    ApplicationServiceClient::new(world.channel.clone())
        .register_application(req(
            pb::RegisterApplicationRequest {
                tenant_id: world.tenant_id.clone(),
                display_name: name.into(),
                redirect_uris: vec![callback.into()],
                post_logout_redirect_uris: vec![],
                grant_types: vec![
                    pb::GrantType::AuthorizationCode as i32,
                    pb::GrantType::RefreshToken as i32,
                ],
                client_type: pb::ClientType::Public as i32,
                require_mfa: false,
            },
            &world.key,
        )?)
        .await?
        .into_inner()
        .application
        .ok_or_else(|| "no application".into())
}

/// PKCE S256 of a verifier.
fn challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        verifier.as_bytes(),
    ))
}

fn authorize_url(
    world: &World,
    client_id: &str,
    callback: &str,
    verifier: &str,
) -> Result<String, Error> {
    let mut url = url::Url::parse(&format!("{}/authorize", world.issuer()))?;
    url.query_pairs_mut()
        .append_pair("client_id", client_id)
        .append_pair("redirect_uri", callback)
        .append_pair("response_type", "code")
        .append_pair("scope", "openid email")
        .append_pair("state", "browser-state")
        .append_pair("nonce", "browser-nonce")
        .append_pair("code_challenge", &challenge(verifier))
        .append_pair("code_challenge_method", "S256");
    Ok(url.to_string())
}

/// The app's side: the code of the callback URL, exchanged with the verifier; the ID token's
/// claims.
async fn redeem(
    world: &World,
    client_id: &str,
    redirect_uri: &str,
    callback: &str,
    verifier: &str,
) -> Result<Value, Error> {
    let url = url::Url::parse(callback)?;
    let query: std::collections::HashMap<String, String> = url.query_pairs().into_owned().collect();
    if query.get("state").map(String::as_str) != Some("browser-state")
        || query.get("iss") != Some(&world.issuer())
    {
        return Err(format!("the callback lacks state or iss: {callback}").into());
    }
    let code = query.get("code").ok_or("no code in the callback")?;
    let response = reqwest::Client::new()
        .post(format!("{}/token", world.issuer()))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", redirect_uri),
            ("client_id", client_id),
            ("code_verifier", verifier),
        ])
        .send()
        .await?;
    let status = response.status();
    let tokens: Value = response.json().await?;
    if !status.is_success() {
        return Err(format!("the token exchange failed: {status} {tokens}").into());
    }
    let payload = tokens["id_token"]
        .as_str()
        .and_then(|t| t.split('.').nth(1))
        .ok_or("no ID token")?;
    Ok(serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload)?)?)
}

async fn run(data: &Path) -> TestResult {
    let server = Server::start(data, None)?;
    let admin = server.printed_admin_key().ok_or("no admin key")?;
    let world = World::new(&server, &admin).await?;
    // Sign-up collects a given name; MFA is by authenticator app only (so a new account has
    // none and enrols one); identity providers are allowed.
    world
        .update_settings(|settings| {
            settings.sign_up_enabled = true;
            settings.collected_attributes = vec!["given_name".into()];
            settings.allowed_primary_methods = vec![
                pb::PrimaryMethod::Password as i32,
                pb::PrimaryMethod::Federated as i32,
            ];
            settings.mfa_methods = vec![pb::MfaMethod::Totp as i32];
            Ok(())
        })
        .await?;
    let app_callback = app_server()?;
    let portal = public_app(&world, "Claims portal", &app_callback).await?;
    world
        .require_mfa_policy("MFA for the claims portal", &portal.id)
        .await?;
    let shop = public_app(&world, "Shop", &app_callback).await?;
    let callback = format!("{}/federation/callback", world.issuer());
    let provider = OidcProvider::start(PROVIDER_CLIENT, PROVIDER_SECRET, &[&callback])?;
    IdentityProviderServiceClient::new(world.channel.clone())
        .create_identity_provider(req(
            pb::CreateIdentityProviderRequest {
                tenant_id: world.tenant_id.clone(),
                config: Some(pb::IdentityProviderConfig {
                    kind: pb::IdentityProviderKind::Oidc as i32,
                    display_name: "Test provider".into(),
                    issuer: provider.issuer.clone(),
                    client_id: PROVIDER_CLIENT.into(),
                    client_secret: PROVIDER_SECRET.into(),
                    ..Default::default()
                }),
            },
            &world.key,
        )?)
        .await?;

    let portal_verifier = "p".repeat(43);
    let shop_verifier = "s".repeat(43);
    let screenshots = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let config = json!({
        "gatehouse": format!("http://{}/", server.http),
        "signup_url": authorize_url(&world, &portal.client_id, &app_callback, &portal_verifier)?,
        "federation_url": authorize_url(&world, &shop.client_id, &app_callback, &shop_verifier)?,
        "callback": app_callback,
        "email": "grace@contoso.example",
        "password": "a new and long passphrase",
        "given_name": "Grace",
        "outbox": data.join("outbox.ndjson"),
        "provider_login": "linus@provider.example",
        "screenshots": screenshots,
    });
    let output = Command::new("node")
        .arg(support::tests_dir().join("browser/hosted.mjs"))
        .arg(config.to_string())
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: Value = serde_json::from_str(stdout.trim()).map_err(|e| {
        format!(
            "hosted.mjs printed {stdout:?} ({e}); stderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    eprintln!("the browser reported {report}");
    if !output.status.success() || report["errors"].as_array().is_none_or(|e| !e.is_empty()) {
        return Err(format!("the browser reported {report}").into());
    }
    if report["qr_width"].as_u64().unwrap_or(0) < 100
        || report["totp_secret"].as_str().is_none_or(|s| s.len() < 16)
        || report["verified_note"]
            .as_str()
            .is_none_or(|n| !n.contains("verified"))
    {
        return Err(format!("the enrolment page: {report}").into());
    }
    for shot in report["screenshots"].as_array().ok_or("no screenshots")? {
        let size = std::fs::metadata(shot.as_str().unwrap_or_default())?.len();
        if size < 5_000 {
            return Err(format!("screenshot {shot} is {size} bytes").into());
        }
    }

    // The portal's tokens: the new, verified account, signed in with MFA (the app it enrolled).
    let claims = redeem(
        &world,
        &portal.client_id,
        &app_callback,
        report["signup_callback"].as_str().unwrap_or_default(),
        &portal_verifier,
    )
    .await?;
    let amr: Vec<&str> = claims["amr"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if claims["email"] != "grace@contoso.example"
        || claims["email_verified"] != true
        || claims["nonce"] != "browser-nonce"
        || !amr.contains(&"pwd")
        || !amr.contains(&"otp")
        || !amr.contains(&"mfa")
    {
        return Err(format!("the portal's ID token: {claims}").into());
    }
    // The shop's tokens: the provider's person, signed up just in time, no MFA asked.
    let claims = redeem(
        &world,
        &shop.client_id,
        &app_callback,
        report["federation_callback"].as_str().unwrap_or_default(),
        &shop_verifier,
    )
    .await?;
    if claims["email"] != "linus@provider.example" || claims["amr"] != json!(["fed"]) {
        return Err(format!("the shop's ID token: {claims}").into());
    }

    // The log: sign-up, verification, the app enrolled inside the flow, the federated sign-up.
    let store =
        gatehouse_events::connect(&format!("sqlite://{}", data.join("events.db").display()))
            .await?;
    let events = store
        .read_all(0, &EventFilter::default(), 100_000)
        .await?
        .events;
    for kind in [
        "UserSignedUp",
        "EmailVerified",
        "TotpRegistrationRequired",
        "TotpEnrolled",
        "TotpRegistered",
        "FederationSucceeded",
        "AuthorizationCodeRedeemed",
    ] {
        if !events.iter().any(|e| e.event_type == kind) {
            let seen: std::collections::BTreeSet<&str> =
                events.iter().map(|e| e.event_type.as_str()).collect();
            return Err(format!("no {kind} in the log; it has {seen:?}").into());
        }
    }
    drop(provider);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosted_pages_in_a_browser() -> TestResult {
    let dir = tempfile::tempdir()?;
    run(dir.path()).await
}
