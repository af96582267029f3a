//! Identity providers for the federation tests, and a browser to sign in at them.
//!
//! - [`OidcProvider`]: panva's oidc-provider (a certified OpenID provider) run by node from
//!   `tests/oidc/provider.mjs`: one static client, code flow with PKCE S256, login form,
//!   automatic consent. Needs `npm ci --prefix tests/oidc` (`./test.sh` runs it).
//! - [`FakeOidc`]: an OpenID provider in this process whose ID tokens can be made wrong on
//!   purpose ([`Defects`]), whose signing key can rotate and which can go away.
//! - [`FakeFacebook`]: Facebook's OAuth dialog, token endpoint and Graph `/me`.
//! - [`authorize`]: the user's browser, from an authorization URL to the redirect back to the
//!   client (which it returns without following).
//!
//! The fakes serve on `127.0.0.1:<free port>` from their own thread and runtime, so that
//! [`FakeOidc::shutdown`] is synchronous and complete: when it returns, the port refuses
//! connections and every connection it had accepted is closed.

use super::{Error, tests_dir};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::future::IntoFuture;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use url::Url;

// ---------------------------------------------------------------------------------------------
// Small helpers the tests use too.

/// `n` random bytes, base64url without padding.
pub fn random_string(n: usize) -> Result<String, Error> {
    let mut bytes = vec![0u8; n];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| "the system random generator failed")?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

/// The PKCE S256 challenge of a code verifier: base64url(SHA-256(verifier)).
pub fn pkce_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        verifier.as_bytes(),
    ))
}

/// A fresh PKCE pair: (code_verifier, S256 code_challenge).
pub fn pkce() -> Result<(String, String), Error> {
    let verifier = random_string(32)?;
    let challenge = pkce_challenge(&verifier);
    Ok((verifier, challenge))
}

/// The decoded header and payload of a compact JWT (its signature is NOT checked).
pub fn jwt_parts(jwt: &str) -> Result<(Value, Value), Error> {
    let mut parts = jwt.split('.');
    let (Some(header), Some(payload), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("not a compact JWS: {jwt:?}").into());
    };
    let header = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header)?)?;
    let payload = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload)?)?;
    Ok((header, payload))
}

/// The value of query parameter `name` in `url`, if present.
pub fn query_param(url: &Url, name: &str) -> Option<String> {
    url.query_pairs()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------------------------
// oidc-provider under node.

/// panva's oidc-provider serving one static client (`tests/oidc/provider.mjs`); killed by
/// [`OidcProvider::stop`] or when dropped (and it exits by itself when its stdin closes, so a
/// test process that dies never leaves it running).
///
/// Logins: any login with any password; the login is the `sub` and the `email`,
/// `email_verified` is false for logins starting with `unverified`, `name` is `User <login>`.
/// ID tokens are RS256 and carry the scope claims; the authorization response carries `iss`.
pub struct OidcProvider {
    /// `http://127.0.0.1:<port>`, also the base of every endpoint.
    pub issuer: String,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
}

impl OidcProvider {
    /// Starts the provider with a client that authenticates with `client_secret` (basic; post
    /// works too) and may redirect to `redirect_uris`; waits (30 s at most) until it listens.
    pub fn start(
        client_id: &str,
        client_secret: &str,
        redirect_uris: &[&str],
    ) -> Result<OidcProvider, Error> {
        let dir = tests_dir().join("oidc");
        if !dir.join("node_modules/oidc-provider").is_dir() {
            return Err(format!(
                "{} is missing: run `npm ci --prefix tests/oidc` (./test.sh does) to install \
                 oidc-provider for the federation tests",
                dir.join("node_modules").display()
            )
            .into());
        }
        if redirect_uris.iter().any(|uri| uri.contains(',')) {
            return Err("a redirect URI with a comma cannot be passed to provider.mjs".into());
        }
        let mut child = Command::new("node")
            .arg(dir.join("provider.mjs"))
            // `--name=value`: a value starting with '-' (random secrets do) is otherwise
            // refused by node's parseArgs as ambiguous.
            .arg(format!("--client-id={client_id}"))
            .arg(format!("--client-secret={client_secret}"))
            .arg(format!("--redirect-uris={}", redirect_uris.join(",")))
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot run node (needed for the federation tests): {e}"))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        // From here on, `provider` kills the child on every early return.
        let mut provider = OidcProvider {
            issuer: String::new(),
            child: Some(child),
            stdin,
        };
        let stdout = stdout.ok_or("no stdout from node")?;
        let (lines_tx, lines_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut printed = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match lines_rx.recv_timeout(left) {
                Ok(line) => line,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "oidc-provider not ready after 30 s; it printed {printed:?}"
                    )
                    .into());
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = provider.child.as_mut().map(|child| child.wait());
                    return Err(format!(
                        "oidc-provider exited before it was ready ({status:?}); it printed \
                         {printed:?} (its errors are on stderr)"
                    )
                    .into());
                }
            };
            if let Some(issuer) = line.strip_prefix("oidc-provider ready ") {
                provider.issuer = issuer.trim().to_string();
                Url::parse(&provider.issuer)?;
                // Keep draining stdout so that node never blocks on a full pipe.
                std::thread::spawn(move || while lines_rx.recv().is_ok() {});
                return Ok(provider);
            }
            printed.push(line);
        }
    }

    /// Kills the provider and waits for it to exit.
    pub fn stop(&mut self) {
        self.stdin = None;
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------------
// The browser.

/// Acts as the user's browser at an authorization URL: follows the provider's redirects by
/// hand (keeping its cookies), signs in with `login` (any password) at the first form that
/// asks for a login, submits any other form it meets (consent), and returns the first
/// redirect that leaves the provider's origin (the redirect to the client's redirect_uri,
/// with its `code`, `state`, `iss` or `error`) WITHOUT requesting it.
///
/// Fails when the provider answers with anything else (an error page, a page without a form,
/// a login form again after login), naming the page.
pub async fn authorize(authorization_url: &str, login: &str) -> Result<Url, Error> {
    let mut url = Url::parse(authorization_url)?;
    let origin = url.origin();
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()?;
    let mut jar = CookieJar::default();
    let mut post: Option<Vec<(String, String)>> = None;
    let mut logged_in = false;
    for _ in 0..20 {
        let mut request = match post.take() {
            Some(fields) => client.post(url.clone()).form(&fields),
            None => client.get(url.clone()),
        };
        if let Some(cookies) = jar.header(&url) {
            request = request.header(header::COOKIE, cookies);
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("browser: {url}: {e}"))?;
        let status = response.status();
        for value in response.headers().get_all(header::SET_COOKIE) {
            jar.store(&url, value.to_str()?);
        }
        if status.is_redirection() {
            let location = response
                .headers()
                .get(header::LOCATION)
                .ok_or_else(|| format!("browser: {url} answered {status} without Location"))?
                .to_str()?;
            let next = url.join(location)?;
            if next.origin() != origin {
                return Ok(next);
            }
            url = next;
            continue;
        }
        let body = response.text().await?;
        if !status.is_success() {
            return Err(format!("browser: {url} answered {status}: {}", page_text(&body)).into());
        }
        let form = parse_form(&body).ok_or_else(|| {
            format!(
                "browser: {url} answered {status} with a page without a form: {}",
                page_text(&body)
            )
        })?;
        let mut fields = form.fields;
        let asks_login = fields.iter().any(|(name, _)| name == "login");
        if asks_login {
            if logged_in {
                return Err(format!(
                    "browser: {url} showed its login form again after signing in as {login}: {}",
                    page_text(&body)
                )
                .into());
            }
            logged_in = true;
        }
        for (name, value) in &mut fields {
            match name.as_str() {
                "login" => *value = login.to_string(),
                "password" => *value = "any password".to_string(),
                _ => {}
            }
        }
        if !form.method.eq_ignore_ascii_case("post") {
            return Err(format!("browser: {url} has a {} form", form.method).into());
        }
        let action = url.join(&form.action)?;
        if action.origin() != origin {
            return Err(format!("browser: {url} has a form posting to {action}").into());
        }
        url = action;
        post = Some(fields);
    }
    Err(format!("browser: still at the provider after 20 requests ({url})").into())
}

/// The cookies of one origin (the provider's), by name and path.
#[derive(Default)]
struct CookieJar {
    cookies: Vec<(String, String, String)>, // name, value, path
}

impl CookieJar {
    fn store(&mut self, url: &Url, set_cookie: &str) {
        let mut parts = set_cookie.split(';');
        let Some((name, value)) = parts.next().and_then(|pair| pair.split_once('=')) else {
            return;
        };
        let (name, value) = (name.trim().to_string(), value.trim().to_string());
        // RFC 6265 5.1.4: the default path is the request path up to its last '/'.
        let mut path = match url.path().rfind('/') {
            Some(0) | None => "/".to_string(),
            Some(i) => url.path()[..i].to_string(),
        };
        let mut max_age = None;
        let mut expires_past = false;
        for attribute in parts {
            let (key, val) = attribute.split_once('=').unwrap_or((attribute, ""));
            let val = val.trim();
            match key.trim().to_ascii_lowercase().as_str() {
                "path" if val.starts_with('/') => path = val.to_string(),
                "max-age" => max_age = val.parse::<i64>().ok(),
                "expires" => {
                    expires_past = match chrono::DateTime::parse_from_rfc2822(val) {
                        Ok(at) => at.timestamp() <= now(),
                        Err(_) => val.contains("1970"),
                    }
                }
                _ => {}
            }
        }
        let expired = max_age.map_or(expires_past, |age| age <= 0);
        self.cookies.retain(|(n, _, p)| !(*n == name && *p == path));
        if !expired {
            self.cookies.push((name, value, path));
        }
    }

    fn header(&self, url: &Url) -> Option<String> {
        let request_path = url.path();
        let mut matching: Vec<_> = self
            .cookies
            .iter()
            .filter(|(_, _, path)| {
                request_path == path
                    || (request_path.starts_with(path.as_str())
                        && (path.ends_with('/') || request_path[path.len()..].starts_with('/')))
            })
            .collect();
        if matching.is_empty() {
            return None;
        }
        matching.sort_by_key(|(_, _, path)| std::cmp::Reverse(path.len()));
        let pairs: Vec<String> = matching
            .iter()
            .map(|(name, value, _)| format!("{name}={value}"))
            .collect();
        Some(pairs.join("; "))
    }
}

struct Form {
    action: String,
    method: String,
    /// Inputs with a name, in order, with their value attribute (or "").
    fields: Vec<(String, String)>,
}

/// The first `<form>` of a page and its `<input>`s (enough for oidc-provider's pages).
fn parse_form(html: &str) -> Option<Form> {
    let lower = html.to_ascii_lowercase();
    let start = lower.find("<form")?;
    let tag_end = start + lower[start..].find('>')?;
    let attributes = tag_attributes(&html[start + 5..tag_end]);
    let end = lower[tag_end..]
        .find("</form")
        .map_or(html.len(), |i| tag_end + i);
    let mut fields = Vec::new();
    let mut at = tag_end;
    while let Some(i) = lower[at..end].find("<input") {
        let input_start = at + i + 6;
        let input_end = input_start + lower[input_start..end].find('>')?;
        let input = tag_attributes(&html[input_start..input_end]);
        if let Some(name) = input.get("name") {
            let value = input.get("value").cloned().unwrap_or_default();
            fields.push((name.clone(), value));
        }
        at = input_end;
    }
    Some(Form {
        action: attributes.get("action").cloned().unwrap_or_default(),
        method: attributes
            .get("method")
            .cloned()
            .unwrap_or_else(|| "get".to_string()),
        fields,
    })
}

/// The attributes of a tag (the text between its name and `>`), names lowercased, values
/// unescaped.
fn tag_attributes(text: &str) -> HashMap<String, String> {
    let mut attributes = HashMap::new();
    let mut rest = text.trim_start_matches('/');
    loop {
        rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == '/');
        if rest.is_empty() {
            return attributes;
        }
        let name_end = rest
            .find(|c: char| c.is_whitespace() || c == '=' || c == '/')
            .unwrap_or(rest.len());
        let name = rest[..name_end].to_ascii_lowercase();
        rest = rest[name_end..].trim_start();
        let mut value = String::new();
        if let Some(after) = rest.strip_prefix('=') {
            let after = after.trim_start();
            if let Some(quote) = after.chars().next().filter(|c| *c == '"' || *c == '\'') {
                let inner = &after[1..];
                let close = inner.find(quote).unwrap_or(inner.len());
                value = html_unescape(&inner[..close]);
                rest = inner.get(close + 1..).unwrap_or("");
            } else {
                let end = after.find(char::is_whitespace).unwrap_or(after.len());
                value = html_unescape(&after[..end]);
                rest = &after[end..];
            }
        }
        attributes.insert(name, value);
    }
}

fn html_unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let Some(semi) = rest.find(';').filter(|semi| *semi <= 10) else {
            out.push('&');
            rest = &rest[1..];
            continue;
        };
        let entity = &rest[1..semi];
        let decoded = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ => entity
                .strip_prefix("#x")
                .or_else(|| entity.strip_prefix("#X"))
                .and_then(|hex| u32::from_str_radix(hex, 16).ok())
                .or_else(|| entity.strip_prefix('#').and_then(|dec| dec.parse().ok()))
                .and_then(char::from_u32),
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[semi + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// A page's text, for error messages: tags and scripts/styles removed, whitespace collapsed,
/// at most 600 characters.
fn page_text(html: &str) -> String {
    let mut text = String::new();
    let mut rest = html;
    while let Some(i) = rest.find('<') {
        text.push_str(&rest[..i]);
        text.push(' ');
        let lower = rest[i..].to_ascii_lowercase();
        let skip_to = if lower.starts_with("<script") {
            lower.find("</script>").map(|e| e + 9)
        } else if lower.starts_with("<style") {
            lower.find("</style>").map(|e| e + 8)
        } else {
            lower.find('>').map(|e| e + 1)
        };
        match skip_to {
            Some(e) => rest = &rest[i + e..],
            None => {
                rest = "";
                break;
            }
        }
    }
    text.push_str(rest);
    let text = html_unescape(&text);
    let collapsed: Vec<&str> = text.split_whitespace().collect();
    collapsed.join(" ").chars().take(600).collect()
}

// ---------------------------------------------------------------------------------------------
// A fake server on its own thread.

/// An axum app on `127.0.0.1:<free port>`, served by a current-thread runtime on a thread of
/// its own. Stopping ends the runtime, which drops the listener and every connection.
struct Background {
    addr: SocketAddr,
    stop: Mutex<
        Option<(
            tokio::sync::oneshot::Sender<()>,
            std::thread::JoinHandle<()>,
        )>,
    >,
}

impl Background {
    /// Serves `app` on `listener` (bound by the caller, who needed its port first).
    fn spawn(
        name: &str,
        listener: std::net::TcpListener,
        app: Router,
    ) -> Result<Background, Error> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let listener = {
            let _context = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                runtime.block_on(async move {
                    tokio::select! {
                        result = axum::serve(listener, app).into_future() => {
                            if let Err(e) = result {
                                eprintln!("fake provider stopped serving: {e}");
                            }
                        }
                        _ = stop_rx => {}
                    }
                });
                // Dropping the runtime drops the listener and every connection task.
                drop(runtime);
            })?;
        Ok(Background {
            addr,
            stop: Mutex::new(Some((stop_tx, thread))),
        })
    }

    fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn stop(&self) {
        if let Some((stop, thread)) = lock(&self.stop).take() {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop();
    }
}

fn json_response(status: StatusCode, body: Value) -> Response {
    (
        status,
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::CONTENT_TYPE, "application/json"),
        ],
        body.to_string(),
    )
        .into_response()
}

fn found(location: &Url) -> Response {
    (
        StatusCode::FOUND,
        [(header::LOCATION, location.to_string())],
    )
        .into_response()
}

fn form_fields(body: &[u8]) -> HashMap<String, String> {
    url::form_urlencoded::parse(body).into_owned().collect()
}

fn internal(e: impl std::fmt::Display) -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("fake provider: {e}"),
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------------
// FakeOidc.

/// Ways [`FakeOidc`] gets things wrong on purpose; all false = a correct provider.
#[derive(Clone, Default, Debug)]
pub struct Defects {
    /// The ID token's nonce is not the one of the authorization request.
    pub wrong_nonce: bool,
    /// The ID token's `iat` and `exp` are an hour (and more) in the past.
    pub expired: bool,
    /// The ID token's `aud` is another client.
    pub wrong_audience: bool,
    /// The ID token is signed by a key that is NOT in the JWKS (with the JWKS key's kid).
    pub foreign_key: bool,
    /// The ID token's `iss` is another issuer.
    pub wrong_issuer: bool,
    /// The `iss` parameter of the authorization response (RFC 9207); None = the issuer.
    pub iss_param: Option<String>,
    /// The authorization response has no `iss` parameter at all (wins over `iss_param`).
    pub omit_iss_param: bool,
}

struct SigningKey {
    kid: String,
    pair: EcdsaKeyPair,
}

impl SigningKey {
    fn generate(rng: &SystemRandom, kid: String) -> Result<SigningKey, Error> {
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, rng)
            .map_err(|_| "cannot generate a P-256 key")?;
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), rng)
            .map_err(|e| format!("cannot load the P-256 key: {e}"))?;
        Ok(SigningKey { kid, pair })
    }

    fn jwk(&self) -> Value {
        // The uncompressed point: 0x04 ‖ x (32 bytes) ‖ y (32 bytes).
        let point = self.pair.public_key().as_ref();
        let (x, y) = (
            point.get(1..33).unwrap_or_default(),
            point.get(33..65).unwrap_or_default(),
        );
        json!({
            "kty": "EC",
            "crv": "P-256",
            "x": URL_SAFE_NO_PAD.encode(x),
            "y": URL_SAFE_NO_PAD.encode(y),
            "kid": self.kid,
            "alg": "ES256",
            "use": "sig",
        })
    }
}

fn sign_es256(
    pair: &EcdsaKeyPair,
    kid: &str,
    claims: &Value,
    rng: &SystemRandom,
) -> Result<String, Error> {
    let header = json!({ "alg": "ES256", "typ": "JWT", "kid": kid });
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header)?),
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims)?)
    );
    let signature = pair
        .sign(rng, input.as_bytes())
        .map_err(|_| "ES256 signing failed")?;
    Ok(format!(
        "{input}.{}",
        URL_SAFE_NO_PAD.encode(signature.as_ref())
    ))
}

#[derive(Clone, Debug)]
struct OidcUser {
    sub: String,
    email: String,
    email_verified: bool,
    name: String,
}

struct OidcCode {
    client_id: String,
    redirect_uri: String,
    nonce: Option<String>,
    challenge: String,
    user: OidcUser,
    used: bool,
}

struct OidcState {
    key: SigningKey,
    /// Signs with the current kid but is never published.
    foreign: EcdsaKeyPair,
    rotations: usize,
    defects: Defects,
    user: OidcUser,
    codes: HashMap<String, OidcCode>,
    access_tokens: HashMap<String, OidcUser>,
    authorizations: Vec<HashMap<String, String>>,
}

struct OidcShared {
    issuer: String,
    client_id: String,
    client_secret: String,
    rng: SystemRandom,
    token_requests: AtomicUsize,
    jwks_requests: AtomicUsize,
    state: Mutex<OidcState>,
}

/// A configurable OpenID provider for negative tests: discovery, JWKS, `/authorize` (no
/// login: it redirects straight back with a code), `/token` (client_secret_basic or _post,
/// PKCE S256, single-use codes), `/userinfo`; ES256 ID tokens. Stops when dropped.
pub struct FakeOidc {
    /// `http://127.0.0.1:<port>`, also the base of every endpoint.
    pub issuer: String,
    shared: Arc<OidcShared>,
    server: Background,
}

impl FakeOidc {
    /// Starts the provider for one client. Its user is `fake-sub-1` /
    /// `fake-user@example.com` (verified) until [`FakeOidc::set_user`].
    pub async fn start(client_id: &str, client_secret: &str) -> Result<FakeOidc, Error> {
        let rng = SystemRandom::new();
        let key = SigningKey::generate(&rng, format!("fake-key-0-{}", random_string(6)?))?;
        let foreign = SigningKey::generate(&rng, String::new())?.pair;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let issuer = format!("http://{}", listener.local_addr()?);
        let shared = Arc::new(OidcShared {
            issuer: issuer.clone(),
            client_id: client_id.to_string(),
            client_secret: client_secret.to_string(),
            rng,
            token_requests: AtomicUsize::new(0),
            jwks_requests: AtomicUsize::new(0),
            state: Mutex::new(OidcState {
                key,
                foreign,
                rotations: 0,
                defects: Defects::default(),
                user: OidcUser {
                    sub: "fake-sub-1".to_string(),
                    email: "fake-user@example.com".to_string(),
                    email_verified: true,
                    name: "User fake-sub-1".to_string(),
                },
                codes: HashMap::new(),
                access_tokens: HashMap::new(),
                authorizations: Vec::new(),
            }),
        });
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(oidc_discovery))
            .route("/jwks", get(oidc_jwks))
            .route("/authorize", get(oidc_authorize))
            .route("/token", axum::routing::post(oidc_token))
            .route("/userinfo", get(oidc_userinfo).post(oidc_userinfo))
            .with_state(shared.clone());
        let server = Background::spawn("fake-oidc", listener, app)?;
        Ok(FakeOidc {
            issuer,
            shared,
            server,
        })
    }

    /// The defects of the ID tokens and authorization responses issued from now on.
    pub fn set_defects(&self, defects: Defects) {
        lock(&self.shared.state).defects = defects;
    }

    /// The user who "signs in" at the next authorization requests (name `User <sub>`).
    pub fn set_user(&self, sub: &str, email: &str, email_verified: bool) {
        lock(&self.shared.state).user = OidcUser {
            sub: sub.to_string(),
            email: email.to_string(),
            email_verified,
            name: format!("User {sub}"),
        };
    }

    /// A new signing key with a new kid; the JWKS then serves only the new key.
    pub fn rotate_key(&self) {
        let mut state = lock(&self.shared.state);
        state.rotations += 1;
        let kid = format!(
            "fake-key-{}-{}",
            state.rotations,
            random_string(6).unwrap_or_default()
        );
        if let Ok(key) = SigningKey::generate(&self.shared.rng, kid) {
            state.key = key;
        }
    }

    /// The kid of the current signing key.
    pub fn kid(&self) -> String {
        lock(&self.shared.state).key.kid.clone()
    }

    /// Requests to `/token` so far (each one, whatever its outcome).
    pub fn token_requests(&self) -> usize {
        self.shared.token_requests.load(Ordering::SeqCst)
    }

    /// Requests to `/jwks` so far.
    pub fn jwks_requests(&self) -> usize {
        self.shared.jwks_requests.load(Ordering::SeqCst)
    }

    /// The query parameters of every request to `/authorize` so far, in order.
    pub fn authorization_requests(&self) -> Vec<HashMap<String, String>> {
        lock(&self.shared.state).authorizations.clone()
    }

    /// Stops serving: when this returns, connections to the port are refused and the ones it
    /// had accepted are closed.
    pub fn shutdown(&self) {
        self.server.stop();
    }
}

async fn oidc_discovery(State(shared): State<Arc<OidcShared>>) -> Response {
    let issuer = &shared.issuer;
    json_response(
        StatusCode::OK,
        json!({
            "issuer": issuer,
            "authorization_endpoint": format!("{issuer}/authorize"),
            "token_endpoint": format!("{issuer}/token"),
            "jwks_uri": format!("{issuer}/jwks"),
            "userinfo_endpoint": format!("{issuer}/userinfo"),
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": ["authorization_code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256"],
            "scopes_supported": ["openid", "email", "profile"],
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "nonce", "email", "email_verified", "name"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "code_challenge_methods_supported": ["S256"],
            "authorization_response_iss_parameter_supported": true,
        }),
    )
}

async fn oidc_jwks(State(shared): State<Arc<OidcShared>>) -> Response {
    shared.jwks_requests.fetch_add(1, Ordering::SeqCst);
    let jwk = lock(&shared.state).key.jwk();
    json_response(StatusCode::OK, json!({ "keys": [jwk] }))
}

async fn oidc_authorize(
    State(shared): State<Arc<OidcShared>>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let mut state = lock(&shared.state);
    state.authorizations.push(params.clone());
    if params.get("client_id") != Some(&shared.client_id) {
        return (StatusCode::BAD_REQUEST, "unknown client_id").into_response();
    }
    let Some(redirect_uri) = params.get("redirect_uri") else {
        return (StatusCode::BAD_REQUEST, "redirect_uri is required").into_response();
    };
    let Ok(mut location) = Url::parse(redirect_uri) else {
        return (StatusCode::BAD_REQUEST, "redirect_uri is not a URL").into_response();
    };
    let iss = if state.defects.omit_iss_param {
        None
    } else {
        Some(
            state
                .defects
                .iss_param
                .clone()
                .unwrap_or_else(|| shared.issuer.clone()),
        )
    };
    let error = if params.get("response_type").map(String::as_str) != Some("code") {
        Some(("unsupported_response_type", "response_type must be code"))
    } else if !params
        .get("scope")
        .is_some_and(|scope| scope.split(' ').any(|s| s == "openid"))
    {
        Some(("invalid_scope", "scope must include openid"))
    } else if params.get("code_challenge").is_none_or(|c| c.is_empty())
        || params.get("code_challenge_method").map(String::as_str) != Some("S256")
    {
        Some(("invalid_request", "PKCE with S256 is required"))
    } else {
        None
    };
    {
        let mut query = location.query_pairs_mut();
        match error {
            Some((error, description)) => {
                query
                    .append_pair("error", error)
                    .append_pair("error_description", description);
            }
            None => {
                let Ok(code) = random_string(24) else {
                    return internal("no randomness");
                };
                let user = state.user.clone();
                state.codes.insert(
                    code.clone(),
                    OidcCode {
                        client_id: shared.client_id.clone(),
                        redirect_uri: redirect_uri.clone(),
                        nonce: params.get("nonce").cloned(),
                        challenge: params.get("code_challenge").cloned().unwrap_or_default(),
                        user,
                        used: false,
                    },
                );
                query.append_pair("code", &code);
            }
        }
        if let Some(state_param) = params.get("state") {
            query.append_pair("state", state_param);
        }
        if let Some(iss) = &iss {
            query.append_pair("iss", iss);
        }
    }
    found(&location)
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    json_response(
        status,
        json!({ "error": error, "error_description": description }),
    )
}

/// An OAuth error response: status, `error`, `error_description`.
type OAuthError = (StatusCode, &'static str, &'static str);

/// The client's (id, secret) from `Authorization: Basic` (RFC 6749 2.3.1: each part
/// form-urlencoded) or from the form; Err when both or neither are given.
fn client_credentials(
    headers: &HeaderMap,
    form: &HashMap<String, String>,
) -> Result<(String, String), OAuthError> {
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            value
                .strip_prefix("Basic ")
                .or(value.strip_prefix("basic "))
        });
    match (basic, form.get("client_secret")) {
        (Some(_), Some(_)) => Err((
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "client authentication must only be provided using one mechanism",
        )),
        (Some(encoded), None) => {
            let decoded = STANDARD
                .decode(encoded.trim())
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .and_then(|text| {
                    let (id, secret) = text.split_once(':')?;
                    let unescape = |part: &str| -> String {
                        url::form_urlencoded::parse(format!("x={part}").as_bytes())
                            .next()
                            .map(|(_, value)| value.into_owned())
                            .unwrap_or_default()
                    };
                    Some((unescape(id), unescape(secret)))
                });
            decoded.ok_or((
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "bad Authorization header",
            ))
        }
        (None, Some(secret)) => Ok((
            form.get("client_id").cloned().unwrap_or_default(),
            secret.clone(),
        )),
        (None, None) => Err((
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "no client authentication",
        )),
    }
}

async fn oidc_token(
    State(shared): State<Arc<OidcShared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    shared.token_requests.fetch_add(1, Ordering::SeqCst);
    let form = form_fields(&body);
    let (client_id, secret) = match client_credentials(&headers, &form) {
        Ok(credentials) => credentials,
        Err((status, error, description)) => return oauth_error(status, error, description),
    };
    if client_id != shared.client_id || secret != shared.client_secret {
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client authentication failed",
        );
    }
    if form.get("grant_type").map(String::as_str) != Some("authorization_code") {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "grant_type must be authorization_code",
        );
    }
    let mut state = lock(&shared.state);
    let Some(code) = form
        .get("code")
        .and_then(|code| state.codes.get_mut(code.as_str()))
    else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "unknown code");
    };
    if code.used {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "code already used",
        );
    }
    code.used = true;
    if code.client_id != client_id {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "code issued to another client",
        );
    }
    if form.get("redirect_uri") != Some(&code.redirect_uri) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "redirect_uri differs from the authorization request's",
        );
    }
    let verifier = form.get("code_verifier").map(String::as_str).unwrap_or("");
    if verifier.is_empty() || pkce_challenge(verifier) != code.challenge {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "code_verifier does not match code_challenge",
        );
    }
    let user = code.user.clone();
    let requested_nonce = code.nonce.clone();
    let defects = state.defects.clone();
    let issued_at = if defects.expired {
        now() - 3600 - 300
    } else {
        now()
    };
    let mut claims = json!({
        "iss": if defects.wrong_issuer { "https://wrong-issuer.example" } else { shared.issuer.as_str() },
        "sub": user.sub,
        "aud": if defects.wrong_audience { "another-client" } else { client_id.as_str() },
        "iat": issued_at,
        "exp": issued_at + 300,
        "email": user.email,
        "email_verified": user.email_verified,
        "name": user.name,
    });
    let nonce = if defects.wrong_nonce {
        Some(format!(
            "not-the-nonce-{}",
            random_string(8).unwrap_or_default()
        ))
    } else {
        requested_nonce
    };
    if let (Some(nonce), Some(object)) = (nonce, claims.as_object_mut()) {
        object.insert("nonce".to_string(), Value::String(nonce));
    }
    let signer = if defects.foreign_key {
        &state.foreign
    } else {
        &state.key.pair
    };
    let id_token = match sign_es256(signer, &state.key.kid, &claims, &shared.rng) {
        Ok(token) => token,
        Err(e) => return internal(e),
    };
    let Ok(access_token) = random_string(24) else {
        return internal("no randomness");
    };
    state.access_tokens.insert(access_token.clone(), user);
    json_response(
        StatusCode::OK,
        json!({
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": 300,
            "id_token": id_token,
        }),
    )
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
}

async fn oidc_userinfo(State(shared): State<Arc<OidcShared>>, headers: HeaderMap) -> Response {
    let user =
        bearer(&headers).and_then(|token| lock(&shared.state).access_tokens.get(&token).cloned());
    match user {
        Some(user) => json_response(
            StatusCode::OK,
            json!({
                "sub": user.sub,
                "email": user.email,
                "email_verified": user.email_verified,
                "name": user.name,
            }),
        ),
        None => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer error=\"invalid_token\"")],
        )
            .into_response(),
    }
}

// ---------------------------------------------------------------------------------------------
// FakeFacebook.

#[derive(Clone, Debug)]
struct FacebookUser {
    id: String,
    name: String,
    email: Option<String>,
}

struct FacebookCode {
    redirect_uri: String,
    challenge: Option<String>,
    user: FacebookUser,
    used: bool,
}

struct FacebookState {
    deny: bool,
    user: FacebookUser,
    codes: HashMap<String, FacebookCode>,
    tokens: HashMap<String, FacebookUser>,
    dialogs: Vec<HashMap<String, String>>,
}

struct FacebookShared {
    client_id: String,
    client_secret: String,
    state: Mutex<FacebookState>,
}

/// Facebook Login and the Graph API, as far as a sign-in uses them: the OAuth dialog,
/// `/oauth/access_token` and `/me`, each also under a version prefix (`/v21.0/me`). The
/// dialog redirects straight back (the user is always signed in to "Facebook"). Stops when
/// dropped.
pub struct FakeFacebook {
    /// `http://127.0.0.1:<port>`: stands for both www.facebook.com and graph.facebook.com.
    pub base_url: String,
    shared: Arc<FacebookShared>,
    server: Background,
}

impl FakeFacebook {
    /// Starts the fake for one app. Its user is `10000000001`, "Fake Facebook User",
    /// `fb-user@example.com` until [`FakeFacebook::set_user`].
    pub async fn start(client_id: &str, client_secret: &str) -> Result<FakeFacebook, Error> {
        let shared = Arc::new(FacebookShared {
            client_id: client_id.to_string(),
            client_secret: client_secret.to_string(),
            state: Mutex::new(FacebookState {
                deny: false,
                user: FacebookUser {
                    id: "10000000001".to_string(),
                    name: "Fake Facebook User".to_string(),
                    email: Some("fb-user@example.com".to_string()),
                },
                codes: HashMap::new(),
                tokens: HashMap::new(),
                dialogs: Vec::new(),
            }),
        });
        let app = Router::new()
            .route("/dialog/oauth", get(facebook_dialog))
            .route("/{version}/dialog/oauth", get(facebook_dialog))
            .route(
                "/oauth/access_token",
                get(facebook_access_token_get).post(facebook_access_token_post),
            )
            .route(
                "/{version}/oauth/access_token",
                get(facebook_access_token_get).post(facebook_access_token_post),
            )
            .route("/me", get(facebook_me))
            .route("/{version}/me", get(facebook_me))
            .with_state(shared.clone());
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let server = Background::spawn("fake-facebook", listener, app)?;
        Ok(FakeFacebook {
            base_url: server.base_url(),
            shared,
            server,
        })
    }

    /// The user of the next dialogs; `email: None` = a user without (or not sharing) one.
    pub fn set_user(&self, id: &str, name: &str, email: Option<&str>) {
        lock(&self.shared.state).user = FacebookUser {
            id: id.to_string(),
            name: name.to_string(),
            email: email.map(str::to_string),
        };
    }

    /// Whether the user declines the next dialogs (`error=access_denied`).
    pub fn set_deny(&self, deny: bool) {
        lock(&self.shared.state).deny = deny;
    }

    /// The query parameters of every request to the dialog so far, in order.
    pub fn dialog_requests(&self) -> Vec<HashMap<String, String>> {
        lock(&self.shared.state).dialogs.clone()
    }

    /// Stops serving (as [`FakeOidc::shutdown`]).
    pub fn shutdown(&self) {
        self.server.stop();
    }
}

fn facebook_error(code: u32, message: &str) -> Response {
    json_response(
        StatusCode::BAD_REQUEST,
        json!({
            "error": {
                "message": message,
                "type": "OAuthException",
                "code": code,
                "fbtrace_id": "FakeFacebookTrace",
            }
        }),
    )
}

async fn facebook_dialog(
    State(shared): State<Arc<FacebookShared>>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let mut state = lock(&shared.state);
    state.dialogs.push(params.clone());
    if params.get("client_id") != Some(&shared.client_id) {
        return (StatusCode::BAD_REQUEST, "Invalid App ID").into_response();
    }
    let Some(Ok(mut location)) = params.get("redirect_uri").map(|uri| Url::parse(uri)) else {
        return (
            StatusCode::BAD_REQUEST,
            "URL blocked: no valid redirect_uri",
        )
            .into_response();
    };
    let challenge = params.get("code_challenge").cloned();
    if challenge.is_some()
        && params.get("code_challenge_method").map(String::as_str) != Some("S256")
    {
        return (
            StatusCode::BAD_REQUEST,
            "code_challenge_method must be S256",
        )
            .into_response();
    }
    {
        let mut query = location.query_pairs_mut();
        if state.deny {
            query
                .append_pair("error", "access_denied")
                .append_pair("error_code", "200")
                .append_pair("error_reason", "user_denied")
                .append_pair("error_description", "Permissions error");
        } else {
            let Ok(code) = random_string(24) else {
                return internal("no randomness");
            };
            let user = state.user.clone();
            state.codes.insert(
                code.clone(),
                FacebookCode {
                    redirect_uri: params.get("redirect_uri").cloned().unwrap_or_default(),
                    challenge,
                    user,
                    used: false,
                },
            );
            query.append_pair("code", &code);
        }
        if let Some(state_param) = params.get("state") {
            query.append_pair("state", state_param);
        }
    }
    found(&location)
}

async fn facebook_access_token_get(
    State(shared): State<Arc<FacebookShared>>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    facebook_access_token(&shared, &params)
}

async fn facebook_access_token_post(
    State(shared): State<Arc<FacebookShared>>,
    Query(mut params): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    params.extend(form_fields(&body));
    facebook_access_token(&shared, &params)
}

fn facebook_access_token(shared: &FacebookShared, params: &HashMap<String, String>) -> Response {
    if params.get("client_id") != Some(&shared.client_id) {
        return facebook_error(101, "Error validating application. Invalid application ID.");
    }
    if params.get("client_secret") != Some(&shared.client_secret) {
        return facebook_error(100, "Error validating client secret.");
    }
    let mut state = lock(&shared.state);
    let Some(code) = params
        .get("code")
        .and_then(|code| state.codes.get_mut(code.as_str()))
    else {
        return facebook_error(100, "Invalid verification code format.");
    };
    if code.used {
        return facebook_error(100, "This authorization code has been used.");
    }
    code.used = true;
    if params.get("redirect_uri") != Some(&code.redirect_uri) {
        return facebook_error(
            100,
            "Error validating verification code. Please make sure your redirect_uri is \
             identical to the one you used in the OAuth dialog request",
        );
    }
    if let Some(challenge) = &code.challenge {
        let verifier = params
            .get("code_verifier")
            .map(String::as_str)
            .unwrap_or("");
        if verifier.is_empty() || pkce_challenge(verifier) != *challenge {
            return facebook_error(100, "Invalid code verifier.");
        }
    }
    let user = code.user.clone();
    let Ok(token) = random_string(32) else {
        return internal("no randomness");
    };
    state.tokens.insert(format!("EAAfake{token}"), user);
    json_response(
        StatusCode::OK,
        json!({
            "access_token": format!("EAAfake{token}"),
            "token_type": "bearer",
            "expires_in": 5183944,
        }),
    )
}

async fn facebook_me(
    State(shared): State<Arc<FacebookShared>>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let token = bearer(&headers).or_else(|| params.get("access_token").cloned());
    let Some(token) = token else {
        return facebook_error(
            2500,
            "An active access token must be used to query information about the current user.",
        );
    };
    let Some(user) = lock(&shared.state).tokens.get(&token).cloned() else {
        return facebook_error(
            190,
            "Invalid OAuth access token - Cannot parse access token",
        );
    };
    let fields = params.get("fields").map_or("id,name", String::as_str);
    let mut body = serde_json::Map::new();
    for field in fields.split(',').map(str::trim) {
        match field {
            "id" => {
                body.insert("id".to_string(), Value::String(user.id.clone()));
            }
            "name" => {
                body.insert("name".to_string(), Value::String(user.name.clone()));
            }
            "email" => {
                if let Some(email) = &user.email {
                    body.insert("email".to_string(), Value::String(email.clone()));
                }
            }
            _ => {}
        }
    }
    // The Graph API always answers with the id.
    body.insert("id".to_string(), Value::String(user.id));
    json_response(StatusCode::OK, Value::Object(body))
}
