//! Gatehouse as an OpenID Connect provider, on SQLite and (when configured) PostgreSQL:
//!
//! - a real relying party, panva's `openid-client` v6 (`tests/oidc/rp.mjs`), runs discovery,
//!   the authorization code flow with PKCE through the hosted pages (password, then the TOTP
//!   an app's MFA requirement asks for), the code exchange with ID token validation,
//!   userinfo, refresh, a silent `prompt=none` sign-in, RP-initiated logout and revocation;
//!   the log shows the codes issued and redeemed and the sessions ended;
//! - what an attacker or a broken app tries is refused: an unregistered redirect URI (an
//!   error page, no redirect), an unknown app, a public app without PKCE, `plain` PKCE, a
//!   missing or wrong verifier, a wrong redirect URI at the token endpoint, a code used twice
//!   (refused, and the tokens issued for it revoked), a wrong client secret, an expired code,
//!   `prompt=none` without a session, a form without the page's CSRF token, a form without
//!   the interaction cookie; and the pages' security headers and cookie attributes.

use crate::support;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use gatehouse_events::{EventFilter, EventStore, RecordedEvent};
use gatehouse_proto::v1 as pb;
use gatehouse_proto::v1::application_service_client::ApplicationServiceClient;
use reqwest::StatusCode;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use support::world::{PASSWORD, World};
use support::{Error, Server, TestResult, req};

const REDIRECT: &str = "http://127.0.0.1:9/callback";
const POST_LOGOUT: &str = "http://127.0.0.1:9/signed-out";

/// A browser without a browser: keeps cookies, follows nothing, fills in forms.
struct Browser {
    http: reqwest::Client,
    cookies: HashMap<String, String>,
    /// Every Set-Cookie line seen (to check attributes).
    set_cookies: Vec<String>,
}

struct Page {
    status: StatusCode,
    location: Option<String>,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Page {
    fn field(&self, name: &str) -> Result<String, Error> {
        let marker = format!("name=\"{name}\" value=\"");
        let start = self
            .body
            .find(&marker)
            .ok_or_else(|| format!("no {name} field in the page: {}", self.body))?
            + marker.len();
        let end = self.body[start..].find('"').ok_or("unterminated value")?;
        Ok(self.body[start..start + end].replace("&amp;", "&"))
    }

    /// The query of the redirect's target.
    fn redirect_query(&self) -> Result<HashMap<String, String>, Error> {
        let location = self
            .location
            .as_deref()
            .ok_or_else(|| format!("expected a redirect, got {}: {}", self.status, self.body))?;
        let url = url::Url::parse(location)?;
        Ok(url.query_pairs().into_owned().collect())
    }
}

impl Browser {
    fn new() -> Result<Browser, Error> {
        Ok(Browser {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()?,
            cookies: HashMap::new(),
            set_cookies: Vec::new(),
        })
    }

    async fn send(&mut self, request: reqwest::RequestBuilder) -> Result<Page, Error> {
        let cookie = self
            .cookies
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join("; ");
        let response = request.header("cookie", cookie).send().await?;
        for line in response.headers().get_all("set-cookie") {
            let line = line.to_str()?.to_string();
            let pair = line.split(';').next().unwrap_or_default();
            if let Some((name, value)) = pair.split_once('=') {
                if value.is_empty() || line.contains("Max-Age=0") {
                    self.cookies.remove(name);
                } else {
                    self.cookies.insert(name.to_string(), value.to_string());
                }
            }
            self.set_cookies.push(line);
        }
        Ok(Page {
            status: response.status(),
            location: response
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            headers: response.headers().clone(),
            body: response.text().await?,
        })
    }

    async fn get(&mut self, url: &str) -> Result<Page, Error> {
        let request = self.http.get(url);
        self.send(request).await
    }

    async fn post(&mut self, url: &str, form: &[(&str, &str)]) -> Result<Page, Error> {
        let request = self.http.post(url).form(form);
        self.send(request).await
    }

    /// Submits the page's form for `action` with `fields` (and the page's CSRF token).
    async fn submit(
        &mut self,
        issuer_http: &str,
        page: &Page,
        fields: &[(&str, &str)],
    ) -> Result<Page, Error> {
        let csrf = page.field("csrf")?;
        let action = page.field("action")?;
        let mut form = vec![("csrf", csrf.as_str()), ("action", action.as_str())];
        form.extend_from_slice(fields);
        let target = format!("{issuer_http}/interaction");
        self.post(&target, &form).await
    }
}

struct Setup {
    world: World,
    store: Arc<dyn EventStore>,
    /// Confidential, requires MFA.
    web: pb::RegisterApplicationResponse,
    /// Public (PKCE), no MFA.
    spa: pb::RegisterApplicationResponse,
    email: String,
    totp_secret: String,
}

async fn register(
    world: &World,
    client_type: pb::ClientType,
    require_mfa: bool,
) -> Result<pb::RegisterApplicationResponse, Error> {
    Ok(ApplicationServiceClient::new(world.channel.clone())
        .register_application(req(
            pb::RegisterApplicationRequest {
                tenant_id: world.tenant_id.clone(),
                display_name: "Claims portal".into(),
                redirect_uris: vec![REDIRECT.into()],
                post_logout_redirect_uris: vec![POST_LOGOUT.into()],
                grant_types: vec![
                    pb::GrantType::AuthorizationCode as i32,
                    pb::GrantType::RefreshToken as i32,
                ],
                client_type: client_type as i32,
                require_mfa,
            },
            &world.key,
        )?)
        .await?
        .into_inner())
}

async fn setup(server: &Server, data: &Path, database_url: Option<&str>) -> Result<Setup, Error> {
    let admin = server.printed_admin_key().ok_or("no admin key")?;
    let world = World::new(server, &admin).await?;
    let web = register(&world, pb::ClientType::Confidential, true).await?;
    let spa = register(&world, pb::ClientType::Public, false).await?;
    let email = "ada@contoso.example".to_string();
    let user_id = world.create_user(&email, true).await?;
    let totp_secret = world.enroll_totp(&user_id).await?;
    let url = database_url.map_or_else(
        || format!("sqlite://{}", data.join("events.db").display()),
        str::to_string,
    );
    let store = gatehouse_events::connect(&url).await?;
    Ok(Setup {
        world,
        store,
        web,
        spa,
        email,
        totp_secret,
    })
}

fn client_id(app: &pb::RegisterApplicationResponse) -> Result<String, Error> {
    Ok(app
        .application
        .as_ref()
        .ok_or("no application")?
        .client_id
        .clone())
}

async fn session_events(store: &Arc<dyn EventStore>) -> Result<Vec<RecordedEvent>, Error> {
    let filter = EventFilter {
        stream_types: vec!["session".into()],
        ..EventFilter::default()
    };
    Ok(store.read_all(0, &filter, 10_000).await?.events)
}

/// openid-client signs in, refreshes, signs in silently, logs out and revokes.
async fn relying_party(setup: &Setup) -> TestResult {
    let world = &setup.world;
    let output = Command::new("node")
        .arg(support::tests_dir().join("oidc/rp.mjs"))
        .env("GATEHOUSE_ISSUER", world.issuer())
        .env("CLIENT_ID", client_id(&setup.web)?)
        .env("CLIENT_SECRET", &setup.web.client_secret)
        .env("REDIRECT_URI", REDIRECT)
        .env("POST_LOGOUT_URI", POST_LOGOUT)
        .env("EMAIL", &setup.email)
        .env("PASSWORD", PASSWORD)
        .env("TOTP_SECRET", &setup.totp_secret)
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "the relying party failed: {}\n{stdout}",
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    let seen: Value = serde_json::from_str(stdout.trim())?;
    eprintln!("openid-client saw {seen}");
    let check = |what: &str, ok: bool| -> TestResult {
        if ok {
            Ok(())
        } else {
            Err(format!("{what}: {seen}").into())
        }
    };
    check(
        "discovery names the issuer and S256",
        seen["discovery"]["issuer"] == world.issuer().as_str()
            && seen["discovery"]["pkce"] == serde_json::json!(["S256"]),
    )?;
    check(
        "the pages asked for the password, a method and the TOTP code",
        seen["steps"] == serde_json::json!(["start_password", "select_mfa", "mfa_code"]),
    )?;
    let sub = seen["id_token"]["sub"].as_str().unwrap_or_default();
    check(
        "the ID token names the user, echoes the nonce and says MFA",
        !sub.is_empty()
            && seen["id_token"]["nonce_matched"] == true
            && seen["id_token"]["email"] == setup.email.as_str()
            && seen["id_token"]["amr"]
                .as_array()
                .is_some_and(|amr| amr.iter().any(|m| m == "mfa")),
    )?;
    check(
        "userinfo answers for the same user",
        seen["userinfo"]["sub"] == sub && seen["userinfo"]["email"] == setup.email.as_str(),
    )?;
    check(
        "the first exchange hands out a refresh token, and refresh rotates it",
        seen["refresh_token_issued"] == true
            && seen["refreshed"]["rotated"] == true
            && seen["refreshed"]["same_subject"] == true,
    )?;
    check(
        "prompt=none with the browser's session gives a code without pages (no new refresh token)",
        seen["silent"]["same_subject"] == true && seen["silent"]["refresh_token_issued"] == false,
    )?;
    check(
        "logout goes back to the registered URI with the state",
        seen["logout"]["status"] == 303 && seen["logout"]["state_returned"] == true,
    )?;
    check(
        "after logout the access token, the refresh token and the browser session are gone",
        seen["after_logout_userinfo"] != "accepted"
            && seen["after_logout_refresh"] == "invalid_grant"
            && seen["after_logout_prompt_none"] == "login_required",
    )?;
    check(
        "a revoked refresh token is refused",
        seen["after_revoke_refresh"] == "invalid_grant",
    )?;

    // The log tells the same story.
    let events = session_events(&setup.store).await?;
    let count = |kind: &str| events.iter().filter(|e| e.event_type == kind).count();
    let revoked: Vec<String> = events
        .iter()
        .filter(|e| e.event_type == "SessionRevoked")
        .filter_map(|e| e.payload_as::<Value>().ok())
        .filter_map(|p| p.get("reason").and_then(Value::as_str).map(str::to_string))
        .collect();
    if count("AuthorizationCodeIssued") != 3 || count("AuthorizationCodeRedeemed") != 3 {
        return Err(format!(
            "expected 3 codes issued and redeemed, got {} and {}",
            count("AuthorizationCodeIssued"),
            count("AuthorizationCodeRedeemed")
        )
        .into());
    }
    if !revoked.iter().any(|r| r == "logout") || !revoked.iter().any(|r| r == "revoked_by_app") {
        return Err(format!("sessions ended for {revoked:?}").into());
    }
    Ok(())
}

fn authorize_url(world: &World, client_id: &str, extra: &[(&str, &str)]) -> Result<String, Error> {
    let mut url = url::Url::parse(&format!("{}/authorize", world.issuer()))?;
    {
        let mut query = url.query_pairs_mut();
        query
            .append_pair("client_id", client_id)
            .append_pair("redirect_uri", REDIRECT)
            .append_pair("response_type", "code")
            .append_pair("scope", "openid")
            .append_pair("state", "st4te");
        for (name, value) in extra {
            query.append_pair(name, value);
        }
    }
    Ok(url.to_string())
}

/// PKCE S256 of a verifier.
fn challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        verifier.as_bytes(),
    ))
}

async fn token_request(
    world: &World,
    form: &[(&str, &str)],
    basic: Option<(&str, &str)>,
) -> Result<(StatusCode, Value, reqwest::header::HeaderMap), Error> {
    let mut request = reqwest::Client::new()
        .post(format!("{}/token", world.issuer()))
        .form(form);
    if let Some((id, secret)) = basic {
        request = request.basic_auth(id, Some(secret));
    }
    let response = request.send().await?;
    let status = response.status();
    let headers = response.headers().clone();
    let body: Value = response.json().await?;
    Ok((status, body, headers))
}

/// Signs in to the public app through the pages (password only): the code, and the browser.
async fn code_for_spa(
    setup: &Setup,
    browser: &mut Browser,
    verifier: &str,
) -> Result<String, Error> {
    let spa = client_id(&setup.spa)?;
    let url = authorize_url(
        &setup.world,
        &spa,
        &[
            ("code_challenge", &challenge(verifier)),
            ("code_challenge_method", "S256"),
            ("nonce", "n0nce"),
        ],
    )?;
    let page = browser.get(&url).await?;
    let back = browser
        .submit(
            &setup.world.issuer(),
            &page,
            &[("email", &setup.email), ("password", PASSWORD)],
        )
        .await?;
    let query = back.redirect_query()?;
    if query.get("state").map(String::as_str) != Some("st4te")
        || query.get("iss") != Some(&setup.world.issuer())
    {
        return Err(format!("the redirect lacks state or iss: {query:?}").into());
    }
    Ok(query.get("code").ok_or("no code")?.clone())
}

async fn refused(
    world: &World,
    what: &str,
    form: &[(&str, &str)],
    basic: Option<(&str, &str)>,
    status: StatusCode,
    error: &str,
) -> TestResult {
    let (got, body, _) = token_request(world, form, basic).await?;
    if got != status || body["error"] != error {
        return Err(format!("{what}: expected {status} {error}, got {got} {body}").into());
    }
    Ok(())
}

async fn negatives(setup: &Setup) -> TestResult {
    let world = &setup.world;
    let spa = client_id(&setup.spa)?;
    let web = client_id(&setup.web)?;
    let mut browser = Browser::new()?;

    // An unregistered redirect URI: an error page, never a redirect.
    let url = authorize_url(world, &spa, &[])?.replace(
        &url::form_urlencoded::byte_serialize(REDIRECT.as_bytes()).collect::<String>(),
        "https%3A%2F%2Fevil.example%2Fcb",
    );
    let page = browser.get(&url).await?;
    if page.status != StatusCode::BAD_REQUEST
        || page.location.is_some()
        || !page.body.contains("redirect URI is not registered")
    {
        return Err(format!("unregistered redirect URI: {} {}", page.status, page.body).into());
    }
    // An unknown app: the same.
    let page = browser
        .get(&authorize_url(world, "no-such-app", &[])?)
        .await?;
    if page.status != StatusCode::BAD_REQUEST || page.location.is_some() {
        return Err(format!("unknown client: {}", page.status).into());
    }
    // Errors the app can be told of go back to it, with state and iss.
    for (what, extra, error) in [
        ("a public app without PKCE", vec![], "invalid_request"),
        (
            "plain PKCE",
            vec![
                ("code_challenge", "x".repeat(43)),
                ("code_challenge_method", "plain".to_string()),
            ],
            "invalid_request",
        ),
        (
            "prompt=none without a session",
            vec![
                ("code_challenge", challenge(&"v".repeat(43))),
                ("code_challenge_method", "S256".into()),
                ("prompt", "none".into()),
            ],
            "login_required",
        ),
    ] {
        let extra: Vec<(&str, &str)> = extra.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let page = browser.get(&authorize_url(world, &spa, &extra)?).await?;
        let query = page.redirect_query()?;
        if query.get("error").map(String::as_str) != Some(error)
            || query.get("state").map(String::as_str) != Some("st4te")
            || query.get("iss") != Some(&world.issuer())
            || !page
                .location
                .as_deref()
                .is_some_and(|l| l.starts_with(REDIRECT))
        {
            return Err(format!("{what}: {:?}", page.location).into());
        }
    }
    let page = browser
        .get(&authorize_url(world, &spa, &[])?.replace("response_type=code", "response_type=token"))
        .await?;
    if page.redirect_query()?.get("error").map(String::as_str) != Some("unsupported_response_type")
    {
        return Err(format!("response_type=token: {:?}", page.location).into());
    }

    // The sign-in page: security headers, cookie attributes; forms need the page's token.
    let verifier = "a".repeat(20) + &"B-._~".repeat(5);
    let page = browser
        .get(&authorize_url(
            world,
            &spa,
            &[
                ("code_challenge", &challenge(&verifier)),
                ("code_challenge_method", "S256"),
                ("nonce", "n0nce"),
            ],
        )?)
        .await?;
    let csp = page
        .headers
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if page.status != StatusCode::OK
        || !csp.contains("frame-ancestors 'none'")
        || !csp.contains("default-src 'none'")
        || page.headers.get("x-frame-options").is_none()
        || !page.body.contains("<label for=\"email\">")
    {
        return Err(format!("sign-in page: {} {csp}", page.status).into());
    }
    let cookie = browser
        .set_cookies
        .iter()
        .find(|c| c.starts_with("gh_interaction="))
        .ok_or("no interaction cookie")?;
    if !cookie.contains("HttpOnly")
        || !cookie.contains("SameSite=Lax")
        || !cookie.contains(&format!("Path=/tenants/{}/", world.tenant_id))
    {
        return Err(format!("interaction cookie: {cookie}").into());
    }
    let forged = browser
        .post(
            &format!("{}/interaction", world.issuer()),
            &[
                ("csrf", "forged"),
                ("action", "start_password"),
                ("email", &setup.email),
                ("password", PASSWORD),
            ],
        )
        .await?;
    if forged.status != StatusCode::FORBIDDEN {
        return Err(format!("a form without the page's token: {}", forged.status).into());
    }
    let mut stranger = Browser::new()?;
    let cookieless = stranger
        .post(
            &format!("{}/interaction", world.issuer()),
            &[("csrf", &page.field("csrf")?), ("action", "start_password")],
        )
        .await?;
    if cookieless.status != StatusCode::BAD_REQUEST {
        return Err(format!("a form without the cookie: {}", cookieless.status).into());
    }
    // A wrong password keeps the person on the page, with the error.
    let wrong = browser
        .submit(
            &world.issuer(),
            &page,
            &[("email", &setup.email), ("password", "wrong password")],
        )
        .await?;
    if wrong.status != StatusCode::BAD_REQUEST || !wrong.body.contains("role=\"alert\"") {
        return Err(format!("a wrong password: {} {}", wrong.status, wrong.body).into());
    }
    let back = browser
        .submit(&world.issuer(), &wrong, &[("password", PASSWORD)])
        .await?;
    let code = back
        .redirect_query()?
        .get("code")
        .cloned()
        .ok_or("no code")?;

    // The token endpoint refuses what does not match the authorization request.
    let base = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", REDIRECT),
        ("client_id", spa.as_str()),
    ];
    refused(
        world,
        "no verifier",
        &base,
        None,
        StatusCode::BAD_REQUEST,
        "invalid_grant",
    )
    .await?;
    let mut wrong_verifier = base.to_vec();
    let other = "z".repeat(43);
    wrong_verifier.push(("code_verifier", &other));
    refused(
        world,
        "a wrong verifier",
        &wrong_verifier,
        None,
        StatusCode::BAD_REQUEST,
        "invalid_grant",
    )
    .await?;
    let mut wrong_redirect = base.to_vec();
    wrong_redirect[2] = ("redirect_uri", "http://127.0.0.1:9/other");
    wrong_redirect.push(("code_verifier", &verifier));
    refused(
        world,
        "another redirect URI",
        &wrong_redirect,
        None,
        StatusCode::BAD_REQUEST,
        "invalid_grant",
    )
    .await?;
    let mut good = base.to_vec();
    good.push(("code_verifier", &verifier));
    let (status, tokens, headers) = token_request(world, &good, None).await?;
    if status != StatusCode::OK
        || headers.get("cache-control").and_then(|v| v.to_str().ok()) != Some("no-store")
    {
        return Err(format!("the right exchange: {status} {tokens}").into());
    }
    let id_token = tokens["id_token"].as_str().ok_or("no id_token")?;
    let payload = id_token.split('.').nth(1).ok_or("not a JWT")?;
    let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload)?)?;
    if claims["nonce"] != "n0nce" || claims["aud"] != spa.as_str() {
        return Err(format!("ID token claims: {claims}").into());
    }
    // The same code again: refused, and the tokens it gave are revoked.
    refused(
        world,
        "a code used twice",
        &good,
        None,
        StatusCode::BAD_REQUEST,
        "invalid_grant",
    )
    .await?;
    let refresh = tokens["refresh_token"].as_str().ok_or("no refresh token")?;
    refused(
        world,
        "a refresh token from a reused code",
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh),
            ("client_id", &spa),
        ],
        None,
        StatusCode::BAD_REQUEST,
        "invalid_grant",
    )
    .await?;
    let userinfo = reqwest::Client::new()
        .get(format!("{}/userinfo", world.issuer()))
        .bearer_auth(tokens["access_token"].as_str().unwrap_or_default())
        .send()
        .await?;
    if userinfo.status() != StatusCode::UNAUTHORIZED {
        return Err(format!("userinfo after code reuse: {}", userinfo.status()).into());
    }
    let events = session_events(&setup.store).await?;
    if !events.iter().any(|e| {
        e.event_type == "SessionRevoked"
            && e.payload_as::<Value>()
                .is_ok_and(|p| p["reason"] == "code_reuse")
    }) {
        return Err("no SessionRevoked for the reused code".into());
    }

    // A confidential app must authenticate, with its own secret.
    for (what, basic) in [
        ("a wrong client secret", Some((web.as_str(), "gh_wrong"))),
        ("no client authentication", None),
    ] {
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", "x.y"),
            ("redirect_uri", REDIRECT),
        ];
        if basic.is_none() {
            form.push(("client_id", &web));
        }
        let (status, body, headers) = token_request(world, &form, basic).await?;
        if status != StatusCode::UNAUTHORIZED || body["error"] != "invalid_client" {
            return Err(format!("{what}: {status} {body}").into());
        }
        if basic.is_some() && headers.get("www-authenticate").is_none() {
            return Err(format!("{what}: no WWW-Authenticate").into());
        }
    }

    // An expired code (this server's codes live 2 s).
    let mut late = Browser::new()?;
    let verifier = "c".repeat(43);
    let code = code_for_spa(setup, &mut late, &verifier).await?;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    refused(
        world,
        "an expired code",
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
            ("client_id", &spa),
            ("code_verifier", &verifier),
        ],
        None,
        StatusCode::BAD_REQUEST,
        "invalid_grant",
    )
    .await
}

/// The pages' other ways through: the browser session (SSO), prompt=login and max_age,
/// client_secret_post, a refused logout target, a forgotten password, the emailed code.
async fn pages(setup: &Setup, data: &Path) -> TestResult {
    let world = &setup.world;
    let issuer = world.issuer();
    let mut browser = Browser::new()?;
    let verifier = "d".repeat(43);
    let pkce = [
        ("code_challenge", challenge(&verifier)),
        ("code_challenge_method", "S256".to_string()),
    ];
    let with = |extra: &[(&'static str, &str)]| -> Vec<(&'static str, String)> {
        let mut all = pkce.to_vec();
        all.extend(extra.iter().map(|(n, v)| (*n, v.to_string())));
        all
    };
    let url = |extra: Vec<(&'static str, String)>| -> Result<String, Error> {
        let extra: Vec<(&str, &str)> = extra.iter().map(|(n, v)| (*n, v.as_str())).collect();
        authorize_url(world, &client_id(&setup.spa)?, &extra)
    };
    code_for_spa(setup, &mut browser, &verifier).await?;
    if !browser.cookies.contains_key("gh_session") {
        return Err("no browser session cookie after a sign-in".into());
    }
    // The browser's session answers at once; prompt=login and max_age=0 ask again.
    let again = browser.get(&url(with(&[]))?).await?;
    if again.status != StatusCode::SEE_OTHER || !again.redirect_query()?.contains_key("code") {
        return Err(format!("no single sign-on: {}", again.status).into());
    }
    for extra in [[("prompt", "login")], [("max_age", "0")]] {
        let page = browser.get(&url(with(&extra))?).await?;
        if page.status != StatusCode::OK || !page.body.contains("name=\"password\"") {
            return Err(format!("{extra:?} did not ask to sign in: {}", page.status).into());
        }
    }

    // client_secret_post, for a confidential app (no MFA asked of this one).
    let backoffice = register(world, pb::ClientType::Confidential, false).await?;
    let backoffice_id = client_id(&backoffice)?;
    let mut fresh = Browser::new()?;
    let page = fresh
        .get(&authorize_url(world, &backoffice_id, &[])?)
        .await?;
    let back = fresh
        .submit(
            &issuer,
            &page,
            &[("email", &setup.email), ("password", PASSWORD)],
        )
        .await?;
    let code = back
        .redirect_query()?
        .get("code")
        .cloned()
        .ok_or("no code")?;
    let (status, tokens, _) = token_request(
        world,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
            ("client_id", &backoffice_id),
            ("client_secret", &backoffice.client_secret),
        ],
        None,
    )
    .await?;
    if status != StatusCode::OK {
        return Err(format!("client_secret_post: {status} {tokens}").into());
    }
    let (status, refreshed, _) = token_request(
        world,
        &[
            ("grant_type", "refresh_token"),
            (
                "refresh_token",
                tokens["refresh_token"].as_str().unwrap_or_default(),
            ),
            ("client_id", &backoffice_id),
            ("client_secret", &backoffice.client_secret),
        ],
        None,
    )
    .await?;
    if status != StatusCode::OK || refreshed["refresh_token"] == tokens["refresh_token"] {
        return Err(format!("refresh with client_secret_post: {status} {refreshed}").into());
    }
    // A logout target the app did not register: an error page, no redirect, but the person
    // who asked to sign out is signed out (the browser's session and its cookie end).
    let mut logout = url::Url::parse(&format!("{issuer}/logout"))?;
    logout
        .query_pairs_mut()
        .append_pair(
            "id_token_hint",
            tokens["id_token"].as_str().unwrap_or_default(),
        )
        .append_pair("post_logout_redirect_uri", "https://evil.example/bye");
    if !fresh.cookies.contains_key("gh_session") {
        return Err("no browser session before the logout".into());
    }
    let refused = fresh.get(logout.as_str()).await?;
    if refused.status != StatusCode::BAD_REQUEST
        || refused.location.is_some()
        || fresh.cookies.contains_key("gh_session")
    {
        return Err(format!("an unregistered logout target: {}", refused.status).into());
    }
    let (status, body, _) = token_request(
        world,
        &[
            ("grant_type", "refresh_token"),
            (
                "refresh_token",
                refreshed["refresh_token"].as_str().unwrap_or_default(),
            ),
            ("client_id", &backoffice_id),
            ("client_secret", &backoffice.client_secret),
        ],
        None,
    )
    .await?;
    if status != StatusCode::BAD_REQUEST || body["error"] != "invalid_grant" {
        return Err(format!("the browser's session outlived its logout: {status} {body}").into());
    }
    // A confidential app's refresh token is no bearer credential over gRPC without a key.
    let grpc = gatehouse_proto::v1::session_service_client::SessionServiceClient::new(
        world.channel.clone(),
    )
    .refresh_session(pb::RefreshSessionRequest {
        tenant_id: world.tenant_id.clone(),
        client_id: backoffice_id.clone(),
        refresh_token: refreshed["refresh_token"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    })
    .await;
    if grpc.map_err(|s| s.code()).err() != Some(tonic::Code::PermissionDenied) {
        return Err(
            "a confidential app's refresh token was accepted over gRPC without a key".into(),
        );
    }
    // max_age far beyond any clock, and prompt=none mixed with another value.
    let huge = browser
        .get(&url(with(&[("max_age", "99999999999999999")]))?)
        .await?;
    if huge.status != StatusCode::SEE_OTHER && huge.status != StatusCode::OK {
        return Err(format!("a huge max_age: {}", huge.status).into());
    }
    let mixed = browser
        .get(&url(with(&[("prompt", "none login")]))?)
        .await?;
    if mixed.redirect_query()?.get("error").map(String::as_str) != Some("invalid_request") {
        return Err(format!("prompt=none login: {:?}", mixed.location).into());
    }

    // A forgotten password, through the pages, then a sign-in with the new one.
    let mut forgetful = Browser::new()?;
    let start = forgetful.get(&url(with(&[]))?).await?;
    let csrf = start.field("csrf")?;
    let interaction = format!("{issuer}/interaction");
    let reset = forgetful
        .post(&interaction, &[("csrf", &csrf), ("action", "show_reset")])
        .await?;
    if !reset.body.contains("Reset your password") {
        return Err(format!("no reset page: {}", reset.body).into());
    }
    let sent_before = support::outbox(data)
        .iter()
        .filter(|m| m.to == setup.email)
        .count();
    let asked = forgetful
        .submit(&issuer, &reset, &[("email", &setup.email)])
        .await?;
    let code = support::wait_for_message(data, &setup.email, sent_before)?
        .code
        .ok_or("the reset email has no code")?;
    let new_password = "an entirely new passphrase";
    let changed = forgetful
        .submit(
            &issuer,
            &asked,
            &[("code", &code), ("password", new_password)],
        )
        .await?;
    if !changed.body.contains("Your password has been changed") {
        return Err(format!("after the reset: {}", changed.body).into());
    }
    let done = forgetful
        .submit(&issuer, &changed, &[("password", new_password)])
        .await?;
    if !done.redirect_query()?.contains_key("code") {
        return Err(format!("no sign-in with the new password: {}", done.status).into());
    }

    // The emailed code as the primary method.
    let mut passwordless = Browser::new()?;
    let page = passwordless.get(&url(with(&[]))?).await?;
    let csrf = page.field("csrf")?;
    let sent_before = support::outbox(data)
        .iter()
        .filter(|m| m.to == setup.email)
        .count();
    let asked = passwordless
        .post(
            &interaction,
            &[
                ("csrf", &csrf),
                ("action", "start_email_code"),
                ("email", &setup.email),
            ],
        )
        .await?;
    let code = support::wait_for_message(data, &setup.email, sent_before)?
        .code
        .ok_or("the sign-in email has no code")?;
    let done = passwordless
        .submit(&issuer, &asked, &[("code", &code)])
        .await?;
    if !done.redirect_query()?.contains_key("code") {
        return Err(format!("no sign-in by emailed code: {} {}", done.status, done.body).into());
    }
    Ok(())
}

async fn run(data: &Path, database_url: Option<&str>) -> TestResult {
    // The relying party's server: codes live the default 60 s.
    let server = Server::start(data, database_url)?;
    let setup = setup(&server, data, database_url).await?;
    relying_party(&setup).await?;
    // A clean stop gives the workers' leases back (the next server delivers email at once).
    server.stop()?;
    // The attacker's server (the same store): codes live 2 s, so that one can expire.
    let server = Server::start_with_env(
        data,
        database_url,
        &[("GATEHOUSE_AUTHORIZATION_CODE_SECONDS", "2")],
    )?;
    let world = World {
        channel: support::world::connect(&server).await?,
        http: server.http,
        ..setup.world.clone()
    };
    let setup = Setup { world, ..setup };
    negatives(&setup).await?;
    pages(&setup, data).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_provider_on_sqlite() -> TestResult {
    let dir = tempfile::tempdir()?;
    run(dir.path(), None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_provider_on_postgres() -> TestResult {
    let Some(url) = support::postgres_url().await? else {
        eprintln!("GATEHOUSE_TEST_DATABASE_URL not set: PostgreSQL run skipped");
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    run(dir.path(), Some(&url)).await
}
