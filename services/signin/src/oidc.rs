//! The OpenID Connect provider's decisions: which authorization requests are accepted, the
//! authorization codes, and the token, userinfo, revocation and logout endpoints.
//!
//! HTTP and the hosted pages live in the server (`services/gatehouse/src/hosted/`); the
//! person signs in through the same [`crate::actor::Flows`] as the gRPC API, so a completed
//! flow has already started a [`Session`]. This module then gives the app a code for that
//! session, and the token endpoint exchanges it:
//!
//! ```text
//!  /authorize ──validate──▶ hosted pages ──flow completes──▶ AuthorizationCodeIssued
//!       │ (a live browser session for this app: no pages)            │
//!       └──────────────────────────────────────────────────────────────┤
//!                                                        302 redirect_uri?code&state&iss
//!  /token (code + PKCE verifier) ──▶ AuthorizationCodeRedeemed (+ RefreshTokenRotated)
//! ```
//!
//! A code is `<session id>.<32 random bytes>`; the session's stream keeps its SHA-256, the
//! redirect URI, the PKCE challenge and the nonce. Redeeming appends to the session with its
//! exact version, so of two racing exchanges of one code one wins, and the other — like any
//! later one — is a reuse: the session is revoked, and with it every token from that code
//! (RFC 6749 §4.1.2).

use crate::directory::{AppInfo, Directory};
use crate::engine::{Tokens, issue_tokens};
use crate::session::{
    Session, SessionEvent, capped, find_code, new_refresh_token, refresh_digest, session_of,
};
use crate::session_service::SessionApi;
use crate::tokens::Keys;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Duration, Utc};
use gatehouse_core::ApiError;
use gatehouse_core::crypto::Crypto;
use gatehouse_directory::application::{ClientType, GrantType};
use gatehouse_directory::user::{Status as UserStatus, User};
use gatehouse_events::{AppendRequest, DomainEvent, EventStore, Loaded, Metadata, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use subtle::ConstantTimeEq;
use uuid::Uuid;

/// How long an authorization code can be exchanged, unless configured.
pub const CODE_LIFETIME: Duration = Duration::seconds(60);
/// Longest `state` and `nonce` accepted (they travel in a cookie while the person signs in).
pub const MAX_PARAMETER: usize = 512;
/// Longest `login_hint` accepted (an email address).
pub const MAX_LOGIN_HINT: usize = 254;
/// `max_age` beyond this (a century) counts as this.
const MAX_AGE_CAP: i64 = 100 * 365 * 24 * 3600;

/// `prompt`: what the app asks of the sign-in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prompt {
    /// Sign in again even with a live browser session.
    Login,
    /// Never show a page: a code from the browser session, or `login_required`.
    None,
}

/// An accepted authorization request (kept, sealed, in the browser while the person signs in).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuthRequest {
    /// The tenant (the issuer).
    pub tenant_id: Uuid,
    /// The app.
    pub client_id: String,
    /// One of the app's redirect URIs, exactly.
    pub redirect_uri: String,
    /// Returned to the app as is.
    pub state: Option<String>,
    /// Copied into the ID token.
    pub nonce: Option<String>,
    /// PKCE S256 challenge.
    pub code_challenge: Option<String>,
    /// `login` or `none`.
    pub prompt: Option<Prompt>,
    /// Seconds since the last authentication the app accepts.
    pub max_age: Option<i64>,
    /// The email to prefill.
    pub login_hint: Option<String>,
}

/// The query of `/authorize`, as received.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct AuthorizeParams {
    pub client_id: Option<String>,
    pub redirect_uri: Option<String>,
    pub response_type: Option<String>,
    pub scope: Option<String>,
    pub state: Option<String>,
    pub nonce: Option<String>,
    pub code_challenge: Option<String>,
    pub code_challenge_method: Option<String>,
    pub prompt: Option<String>,
    pub max_age: Option<String>,
    pub login_hint: Option<String>,
    pub request: Option<String>,
    pub request_uri: Option<String>,
}

/// Why an authorization request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthorizeError {
    /// The app or its redirect URI cannot be trusted: an error page, never a redirect.
    Page(String),
    /// Back to the app with an OAuth error (`redirect_uri?error=…&state=…&iss=…`).
    Redirect {
        redirect_uri: String,
        error: &'static str,
        description: String,
        state: Option<String>,
    },
}

/// An error of the token, userinfo or revocation endpoint (RFC 6749 §5.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthError {
    /// HTTP status.
    pub status: u16,
    /// `invalid_request`, `invalid_client`, `invalid_grant`...
    pub error: &'static str,
    /// For the developer.
    pub description: String,
    /// The client authenticated with HTTP Basic (a 401 then names the scheme).
    pub basic: bool,
}

impl OAuthError {
    fn new(status: u16, error: &'static str, description: impl Into<String>) -> Self {
        OAuthError {
            status,
            error,
            description: description.into(),
            basic: false,
        }
    }

    fn request(description: impl Into<String>) -> Self {
        Self::new(400, "invalid_request", description)
    }

    fn grant(description: impl Into<String>) -> Self {
        Self::new(400, "invalid_grant", description)
    }

    fn internal(error: impl std::fmt::Display) -> Self {
        tracing::error!(%error, "oidc endpoint failed");
        Self::new(500, "server_error", "the request could not be completed")
    }
}

impl From<StoreError> for OAuthError {
    fn from(error: StoreError) -> Self {
        OAuthError::internal(error)
    }
}

/// How the client authenticated at the token or revocation endpoint.
#[derive(Debug, Clone, Default)]
pub struct ClientCredentials {
    /// From `Authorization: Basic` (already form-decoded).
    pub basic: Option<(String, String)>,
    /// `client_id` of the form.
    pub client_id: Option<String>,
    /// `client_secret` of the form.
    pub client_secret: Option<String>,
}

/// The form of `/token`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TokenForm {
    pub grant_type: Option<String>,
    pub code: Option<String>,
    pub redirect_uri: Option<String>,
    pub code_verifier: Option<String>,
    pub refresh_token: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
}

/// What the browser keeps of its session with Gatehouse (sealed in a cookie).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrowserSession {
    /// Tenant.
    pub tenant_id: Uuid,
    /// The session of the last sign-in.
    pub session_id: Uuid,
}

/// A relying party's request to end the person's session (RP-initiated logout).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct LogoutParams {
    pub id_token_hint: Option<String>,
    pub post_logout_redirect_uri: Option<String>,
    pub state: Option<String>,
    pub client_id: Option<String>,
}

/// The provider.
pub struct Oidc {
    store: Arc<dyn EventStore>,
    crypto: Arc<Crypto>,
    keys: Arc<Keys>,
    directory: Arc<Directory>,
    sessions: Arc<SessionApi>,
    code_lifetime: Duration,
}

fn bounded(name: &str, value: Option<String>) -> Result<Option<String>, String> {
    match value {
        Some(v) if v.len() > MAX_PARAMETER => {
            Err(format!("{name} must be at most {MAX_PARAMETER} bytes"))
        }
        Some(v) if v.is_empty() => Ok(None),
        other => Ok(other),
    }
}

/// PKCE: `BASE64URL(SHA-256(verifier)) == challenge`, in constant time.
fn pkce_matches(verifier: &str, challenge: &str) -> bool {
    let computed = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    computed.as_bytes().ct_eq(challenge.as_bytes()).into()
}

/// RFC 7636 §4.1: 43 to 128 unreserved characters.
fn valid_verifier(verifier: &str) -> bool {
    (43..=128).contains(&verifier.len())
        && verifier
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

impl Oidc {
    /// The provider over the sign-in's parts.
    pub fn new(
        store: Arc<dyn EventStore>,
        crypto: Arc<Crypto>,
        keys: Arc<Keys>,
        directory: Arc<Directory>,
        sessions: Arc<SessionApi>,
    ) -> Self {
        Oidc {
            store,
            crypto,
            keys,
            directory,
            sessions,
            code_lifetime: CODE_LIFETIME,
        }
    }

    /// Codes live `lifetime` instead of [`CODE_LIFETIME`].
    pub fn with_code_lifetime(mut self, lifetime: Duration) -> Self {
        self.code_lifetime = lifetime;
        self
    }

    /// The issuer of a tenant.
    pub fn issuer(&self, tenant_id: Uuid) -> String {
        self.keys.issuer(tenant_id)
    }

    /// Checks an authorization request. The app and redirect URI come first: until both are
    /// known good, nothing is sent anywhere (an open redirector is how codes get stolen).
    pub async fn validate(
        &self,
        tenant_id: Uuid,
        params: AuthorizeParams,
    ) -> Result<(AuthRequest, AppInfo), AuthorizeError> {
        let page = |m: &str| AuthorizeError::Page(m.to_string());
        let client_id = params
            .client_id
            .filter(|c| !c.is_empty())
            .ok_or_else(|| page("The request names no application (client_id)."))?;
        let app = match self.directory.application(tenant_id, &client_id).await {
            Ok(Some(app)) => app,
            Ok(None) => return Err(page("This application is not registered.")),
            Err(error) => {
                tracing::error!(%error, "authorize: reading the application");
                return Err(page("Something went wrong. Try again."));
            }
        };
        let redirect_uri = params
            .redirect_uri
            .filter(|uri| app.redirect_uris.iter().any(|r| r == uri))
            .ok_or_else(|| page("The redirect URI is not registered for this application."))?;
        let state = bounded("state", params.state).map_err(|e| page(&e))?;
        let back = |error: &'static str, description: &str| AuthorizeError::Redirect {
            redirect_uri: redirect_uri.clone(),
            error,
            description: description.to_string(),
            state: state.clone(),
        };
        if params.request.is_some() || params.request_uri.is_some() {
            return Err(back(
                "request_not_supported",
                "request objects are not supported",
            ));
        }
        if params.response_type.as_deref().is_none_or(str::is_empty) {
            return Err(back("invalid_request", "response_type is missing"));
        }
        if params.response_type.as_deref() != Some("code") {
            return Err(back(
                "unsupported_response_type",
                "only response_type=code is supported",
            ));
        }
        if !app.grant_types.contains(&GrantType::AuthorizationCode) {
            return Err(back(
                "unauthorized_client",
                "the application may not use the authorization code grant",
            ));
        }
        if !params
            .scope
            .as_deref()
            .is_some_and(|s| s.split(' ').any(|s| s == "openid"))
        {
            return Err(back("invalid_scope", "the scope must include openid"));
        }
        let code_challenge = match (
            params.code_challenge.filter(|c| !c.is_empty()),
            params.code_challenge_method.as_deref(),
        ) {
            (Some(challenge), Some("S256")) if challenge.len() == 43 => Some(challenge),
            (Some(_), Some("S256")) => {
                return Err(back(
                    "invalid_request",
                    "code_challenge must be 43 characters",
                ));
            }
            (Some(_), _) => {
                return Err(back(
                    "invalid_request",
                    "code_challenge_method must be S256",
                ));
            }
            (None, _) if app.client_type == ClientType::Public => {
                return Err(back(
                    "invalid_request",
                    "PKCE (code_challenge with S256) is required for this application",
                ));
            }
            (None, _) => None,
        };
        let mut prompt = None;
        let values: Vec<&str> = params
            .prompt
            .as_deref()
            .unwrap_or("")
            .split(' ')
            .filter(|v| !v.is_empty())
            .collect();
        for value in &values {
            match *value {
                "consent" | "select_account" => {}
                "login" => prompt = Some(Prompt::Login),
                "none" => prompt = Some(Prompt::None),
                _ => return Err(back("invalid_request", "unknown prompt value")),
            }
        }
        if values.contains(&"none") && values.len() > 1 {
            return Err(back(
                "invalid_request",
                "prompt=none cannot be combined with other values",
            ));
        }
        let max_age = match params.max_age.as_deref() {
            None | Some("") => None,
            Some(text) => match text.parse::<i64>() {
                // Beyond a century it means "any age": capped, so that time arithmetic holds.
                Ok(seconds) if seconds >= 0 => Some(seconds.min(MAX_AGE_CAP)),
                _ => {
                    return Err(back(
                        "invalid_request",
                        "max_age must be a whole number of seconds",
                    ));
                }
            },
        };
        let nonce = bounded("nonce", params.nonce).map_err(|e| back("invalid_request", &e))?;
        let login_hint = match params.login_hint.filter(|h| !h.is_empty()) {
            Some(hint) if hint.len() > MAX_LOGIN_HINT => {
                return Err(back(
                    "invalid_request",
                    &format!("login_hint must be at most {MAX_LOGIN_HINT} bytes"),
                ));
            }
            hint => hint,
        };
        Ok((
            AuthRequest {
                tenant_id,
                client_id,
                redirect_uri,
                state,
                nonce,
                code_challenge,
                prompt,
                max_age,
                login_hint,
            },
            app,
        ))
    }

    /// A session of the tenant.
    pub async fn session(&self, tenant_id: Uuid, session_id: Uuid) -> Option<Session> {
        let session = Loaded::<Session>::load(self.store.as_ref(), session_id)
            .await
            .ok()?
            .state;
        (session.exists() && session.tenant_id == tenant_id).then_some(session)
    }

    /// The browser's session when it can answer `request` without a page: live, for this
    /// app, recent enough for `max_age`, and not asked to sign in again.
    pub async fn reusable_session(
        &self,
        request: &AuthRequest,
        browser: Option<&BrowserSession>,
    ) -> Result<Option<Uuid>, StoreError> {
        let Some(browser) = browser else {
            return Ok(None);
        };
        if request.prompt == Some(Prompt::Login) || browser.tenant_id != request.tenant_id {
            return Ok(None);
        }
        let session = Loaded::<Session>::load(self.store.as_ref(), browser.session_id)
            .await?
            .state;
        let now = Utc::now();
        let recent = match (request.max_age, session.auth_time) {
            (Some(seconds), Some(at)) => Duration::try_seconds(seconds)
                .and_then(|age| at.checked_add_signed(age))
                .is_none_or(|until| until > now),
            (Some(_), None) => false,
            (None, _) => true,
        };
        Ok((session.is_active(now)
            && session.tenant_id == request.tenant_id
            && session.client_id == request.client_id
            && recent
            && !session.needs_reauthentication(now)
            && !self.sessions.compromised(&session))
        .then_some(browser.session_id))
    }

    /// Gives the app a code for `session_id` (a flow just completed it, or the browser's
    /// session answers a new request). `with_refresh_token`: redeeming it hands out a new
    /// refresh token.
    pub async fn issue_code(
        &self,
        request: &AuthRequest,
        session_id: Uuid,
        with_refresh_token: bool,
        metadata: &Metadata,
    ) -> Result<String, ApiError> {
        let (code, code_digest) = new_refresh_token(session_id);
        let event = SessionEvent::AuthorizationCodeIssued {
            code_digest,
            redirect_uri: request.redirect_uri.clone(),
            code_challenge: request.code_challenge.clone(),
            nonce: request.nonce.clone(),
            with_refresh_token,
            expires_at: Utc::now() + self.code_lifetime,
        };
        gatehouse_events::execute::<Session, ApiError, _>(
            self.store.as_ref(),
            request.tenant_id,
            session_id,
            metadata,
            |session| {
                if !session.is_active(Utc::now())
                    || session.tenant_id != request.tenant_id
                    || session.client_id != request.client_id
                {
                    return Err(ApiError::FailedPrecondition("the session has ended".into()));
                }
                Ok(vec![event.clone()])
            },
        )
        .await?;
        Ok(code)
    }

    /// Where the browser goes with a code (RFC 9207: `iss` too).
    pub fn redirect_with_code(&self, request: &AuthRequest, code: &str) -> String {
        let mut query = vec![("code", code.to_string())];
        if let Some(state) = &request.state {
            query.push(("state", state.clone()));
        }
        query.push(("iss", self.issuer(request.tenant_id)));
        with_query(&request.redirect_uri, &query)
    }

    /// Where the browser goes with an error.
    pub fn redirect_with_error(
        &self,
        tenant_id: Uuid,
        redirect_uri: &str,
        error: &str,
        description: &str,
        state: Option<&str>,
    ) -> String {
        let mut query = vec![
            ("error", error.to_string()),
            ("error_description", description.to_string()),
        ];
        if let Some(state) = state {
            query.push(("state", state.to_string()));
        }
        query.push(("iss", self.issuer(tenant_id)));
        with_query(redirect_uri, &query)
    }

    /// Authenticates the client of a token or revocation request.
    async fn client(
        &self,
        tenant_id: Uuid,
        credentials: &ClientCredentials,
    ) -> Result<(String, AppInfo), OAuthError> {
        let basic = credentials.basic.is_some();
        let refused = |description: &str| OAuthError {
            basic,
            ..OAuthError::new(401, "invalid_client", description)
        };
        let (client_id, secret) = match (&credentials.basic, &credentials.client_secret) {
            (Some(_), Some(_)) => {
                return Err(OAuthError::request(
                    "use one client authentication method, not two",
                ));
            }
            (Some((id, secret)), None) => {
                if credentials.client_id.as_ref().is_some_and(|c| c != id) {
                    return Err(OAuthError::request(
                        "client_id does not match the credentials",
                    ));
                }
                (id.clone(), Some(secret.clone()))
            }
            (None, secret) => (
                credentials
                    .client_id
                    .clone()
                    .ok_or_else(|| refused("no client authentication"))?,
                secret.clone(),
            ),
        };
        let app = self
            .directory
            .application(tenant_id, &client_id)
            .await?
            .ok_or_else(|| refused("client authentication failed"))?;
        match (app.client_type, &app.client_secret_hash, secret) {
            (ClientType::Confidential, Some(hash), Some(secret)) => {
                let presented = gatehouse_core::keys::hash_key(&secret);
                if !bool::from(presented.as_bytes().ct_eq(hash.as_bytes())) {
                    return Err(refused("client authentication failed"));
                }
            }
            (ClientType::Public, _, None) => {}
            (ClientType::Public, _, Some(_)) => {
                return Err(refused("this application has no secret"));
            }
            _ => return Err(refused("client authentication failed")),
        }
        Ok((client_id, app))
    }

    /// `/token`.
    pub async fn token(
        &self,
        tenant_id: Uuid,
        credentials: ClientCredentials,
        form: TokenForm,
        metadata: &Metadata,
    ) -> Result<Value, OAuthError> {
        let (client_id, app) = self.client(tenant_id, &credentials).await?;
        match form.grant_type.as_deref() {
            Some("authorization_code") => {
                if !app.grant_types.contains(&GrantType::AuthorizationCode) {
                    return Err(OAuthError::new(
                        400,
                        "unauthorized_client",
                        "the application may not use this grant",
                    ));
                }
                let code = form
                    .code
                    .ok_or_else(|| OAuthError::request("code is missing"))?;
                let redirect_uri = form
                    .redirect_uri
                    .ok_or_else(|| OAuthError::request("redirect_uri is missing"))?;
                let refresh = app.grant_types.contains(&GrantType::RefreshToken);
                let tokens = self
                    .redeem(
                        tenant_id,
                        &client_id,
                        &code,
                        &redirect_uri,
                        form.code_verifier.as_deref(),
                        refresh,
                        metadata,
                    )
                    .await?;
                Ok(token_response(tokens))
            }
            Some("refresh_token") => {
                if !app.grant_types.contains(&GrantType::RefreshToken) {
                    return Err(OAuthError::new(
                        400,
                        "unauthorized_client",
                        "the application may not use this grant",
                    ));
                }
                let token = form
                    .refresh_token
                    .ok_or_else(|| OAuthError::request("refresh_token is missing"))?;
                match self
                    .sessions
                    // The client was authenticated above (its secret, or none for a public
                    // app).
                    .refresh_tokens(tenant_id, &client_id, &token, true, metadata)
                    .await
                {
                    Ok(tokens) => Ok(token_response(tokens)),
                    Err(ApiError::CredentialRefused(message)) => Err(OAuthError::grant(message)),
                    Err(other) => Err(OAuthError::internal(other)),
                }
            }
            Some(_) => Err(OAuthError::new(
                400,
                "unsupported_grant_type",
                "grant_type must be authorization_code or refresh_token",
            )),
            None => Err(OAuthError::request("grant_type is missing")),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn redeem(
        &self,
        tenant_id: Uuid,
        client_id: &str,
        code: &str,
        redirect_uri: &str,
        verifier: Option<&str>,
        refresh_allowed: bool,
        metadata: &Metadata,
    ) -> Result<Tokens, OAuthError> {
        let invalid = || OAuthError::grant("the code is invalid or has expired");
        let session_id = session_of(code).ok_or_else(invalid)?;
        let digest = refresh_digest(code);
        let settings = self
            .directory
            .tenant(tenant_id)
            .await?
            .ok_or_else(invalid)?;
        for _ in 0..5 {
            let now = Utc::now();
            let session = Loaded::<Session>::load(self.store.as_ref(), session_id).await?;
            let state = &session.state;
            if !state.exists() || state.tenant_id != tenant_id || state.client_id != client_id {
                return Err(invalid());
            }
            let Some(issued) = find_code(state, &digest) else {
                return Err(invalid());
            };
            if issued.redeemed {
                // A code used twice: whoever holds it now may not be the app. End the
                // session, and with it every token issued for the code.
                self.sessions
                    .end_session(tenant_id, session_id, "code_reuse", metadata)
                    .await
                    .map_err(OAuthError::internal)?;
                return Err(OAuthError::grant(
                    "the code was used already; the tokens issued for it are revoked",
                ));
            }
            if issued.expires_at <= now {
                return Err(invalid());
            }
            if issued.redirect_uri != redirect_uri {
                return Err(OAuthError::grant(
                    "redirect_uri does not match the authorization request",
                ));
            }
            match (&issued.code_challenge, verifier) {
                (Some(challenge), Some(verifier)) => {
                    if !valid_verifier(verifier) || !pkce_matches(verifier, challenge) {
                        return Err(OAuthError::grant("the code_verifier does not match"));
                    }
                }
                (Some(_), None) => return Err(OAuthError::grant("code_verifier is missing")),
                (None, Some(_)) => {
                    return Err(OAuthError::grant(
                        "the authorization request had no code_challenge",
                    ));
                }
                (None, None) => {}
            }
            if !state.is_active(now) || self.sessions.compromised(state) {
                return Err(OAuthError::grant("the session has ended"));
            }
            let user = Loaded::<User>::load(self.store.as_ref(), state.user_id).await?;
            if user.state.status != UserStatus::Active {
                return Err(OAuthError::grant("the session has ended"));
            }
            let mut append = AppendRequest::new(metadata.clone());
            append.expect(&session.stream, session.expected());
            let redeemed = SessionEvent::AuthorizationCodeRedeemed {
                code_digest: issued.digest.clone(),
            };
            append.push(
                redeemed
                    .to_new_event(tenant_id, &session.stream)
                    .map_err(OAuthError::internal)?,
            );
            let refresh_token = if issued.with_refresh_token && refresh_allowed {
                let (token, new_digest) = new_refresh_token(session_id);
                let rotated = SessionEvent::RefreshTokenRotated {
                    refresh_digest: new_digest,
                    refresh_expires_at: capped(
                        now,
                        settings.token_lifetimes.refresh_token_seconds,
                        state.expires_at,
                    ),
                };
                append.push(
                    rotated
                        .to_new_event(tenant_id, &session.stream)
                        .map_err(OAuthError::internal)?,
                );
                token
            } else {
                String::new()
            };
            let tokens = issue_tokens(
                &self.keys,
                &self.crypto,
                session_id,
                state,
                &user.state,
                &settings,
                refresh_token,
                metadata,
                issued.nonce.as_deref(),
            )
            .await
            .map_err(OAuthError::internal)?;
            match self.store.append(append).await {
                Ok(_) => return Ok(tokens),
                // Another exchange of the same code won: the next round sees it redeemed.
                Err(StoreError::Conflict { .. }) => continue,
                Err(other) => return Err(other.into()),
            }
        }
        Err(OAuthError::internal("the session kept changing"))
    }

    /// Checks an access token and the session behind it; its claims.
    async fn access(&self, tenant_id: Uuid, token: &str) -> Option<(Value, Session)> {
        let claims = self.keys.verify(tenant_id, token, Utc::now()).await.ok()?;
        // ID tokens are signed by the same key: only access tokens carry a scope.
        claims.get("scope")?;
        let session_id = Uuid::try_parse(claims.get("sid")?.as_str()?).ok()?;
        let session = Loaded::<Session>::load(self.store.as_ref(), session_id)
            .await
            .ok()?
            .state;
        (session.is_active(Utc::now()) && session.tenant_id == tenant_id)
            .then_some((claims, session))
    }

    /// `/userinfo`: the claims of the access token's user.
    pub async fn userinfo(&self, tenant_id: Uuid, access_token: &str) -> Result<Value, OAuthError> {
        let refused = || {
            OAuthError::new(
                401,
                "invalid_token",
                "the access token is invalid or has expired",
            )
        };
        let (_, session) = self
            .access(tenant_id, access_token)
            .await
            .ok_or_else(refused)?;
        let user = Loaded::<User>::load(self.store.as_ref(), session.user_id).await?;
        if user.state.status != UserStatus::Active {
            return Err(refused());
        }
        // An unreadable profile (erased) means no email claim, not a failed request.
        let email = user
            .state
            .email(&self.crypto, session.user_id)
            .await
            .ok()
            .flatten();
        let mut claims = json!({ "sub": session.user_id.to_string() });
        if let Some(email) = email {
            claims["email"] = json!(email);
            claims["email_verified"] = json!(user.state.email_verified);
        }
        Ok(claims)
    }

    /// `/revoke` (RFC 7009): a refresh or access token of this client ends its session.
    /// Unknown tokens are not an error (the answer says nothing about them).
    pub async fn revoke(
        &self,
        tenant_id: Uuid,
        credentials: ClientCredentials,
        token: Option<String>,
        metadata: &Metadata,
    ) -> Result<(), OAuthError> {
        let (client_id, _) = self.client(tenant_id, &credentials).await?;
        let token = token.ok_or_else(|| OAuthError::request("token is missing"))?;
        let session_id = if let Some(session_id) = session_of(&token) {
            let session = Loaded::<Session>::load(self.store.as_ref(), session_id)
                .await?
                .state;
            let digest = refresh_digest(&token);
            let known = session
                .refresh_digests
                .iter()
                .any(|d| bool::from(d.as_bytes().ct_eq(digest.as_bytes())));
            (known && session.client_id == client_id).then_some(session_id)
        } else {
            match self.access(tenant_id, &token).await {
                Some((claims, session)) if session.client_id == client_id => claims
                    .get("sid")
                    .and_then(Value::as_str)
                    .and_then(|sid| Uuid::try_parse(sid).ok()),
                _ => None,
            }
        };
        if let Some(session_id) = session_id {
            match self
                .sessions
                .end_session(tenant_id, session_id, "revoked_by_app", metadata)
                .await
            {
                Ok(_) | Err(ApiError::NotFound(_)) => {}
                Err(other) => return Err(OAuthError::internal(other)),
            }
        }
        Ok(())
    }

    /// RP-initiated logout: ends the session the ID token hint names and the browser's, and
    /// says where to send the person (a registered post-logout URI, or `None`: a page).
    pub async fn logout(
        &self,
        tenant_id: Uuid,
        params: &LogoutParams,
        browser: Option<&BrowserSession>,
        metadata: &Metadata,
    ) -> Result<Option<String>, String> {
        // The browser's own session ends first, whatever else the request gets wrong: a
        // person who asked to sign out is signed out.
        if let Some(browser) = browser.filter(|b| b.tenant_id == tenant_id) {
            self.end(tenant_id, browser.session_id, metadata).await?;
        }
        let mut client_id = params.client_id.clone().filter(|c| !c.is_empty());
        let mut sessions = Vec::new();
        if let Some(hint) = params.id_token_hint.as_deref().filter(|h| !h.is_empty()) {
            let claims = self
                .verify_hint(tenant_id, hint)
                .await
                .ok_or("The sign-out request carries an ID token this service did not issue.")?;
            let audience = claims
                .get("aud")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if client_id.as_deref().is_some_and(|c| c != audience) {
                return Err("The sign-out request names two different applications.".into());
            }
            client_id = Some(audience.to_string());
            if let Some(sid) = claims
                .get("sid")
                .and_then(Value::as_str)
                .and_then(|s| Uuid::try_parse(s).ok())
            {
                sessions.push(sid);
            }
        }
        let redirect = match params
            .post_logout_redirect_uri
            .as_deref()
            .filter(|u| !u.is_empty())
        {
            None => None,
            Some(uri) => {
                let client_id = client_id
                    .as_deref()
                    .ok_or("The sign-out request names no application.")?;
                let app = self
                    .directory
                    .application(tenant_id, client_id)
                    .await
                    .map_err(|_| "Something went wrong. Try again.")?
                    .ok_or("This application is not registered.")?;
                if !app.post_logout_redirect_uris.iter().any(|u| u == uri) {
                    return Err(
                        "The address to return to is not registered for this application.".into(),
                    );
                }
                let mut query = Vec::new();
                if let Some(state) = params.state.as_deref().filter(|s| !s.is_empty()) {
                    query.push(("state", state.to_string()));
                }
                Some(with_query(uri, &query))
            }
        };
        for session_id in sessions {
            self.end(tenant_id, session_id, metadata).await?;
        }
        Ok(redirect)
    }

    /// Ends a session for logout (one already ended, or unknown, is fine).
    async fn end(
        &self,
        tenant_id: Uuid,
        session_id: Uuid,
        metadata: &Metadata,
    ) -> Result<(), String> {
        match self
            .sessions
            .end_session(tenant_id, session_id, "logout", metadata)
            .await
        {
            Ok(_) | Err(ApiError::NotFound(_)) => Ok(()),
            Err(error) => {
                tracing::error!(%error, "logout: ending a session");
                Err("Something went wrong. Try again.".into())
            }
        }
    }

    /// An ID token hint is checked as it was when issued: an expired one still names the
    /// session (OpenID Connect RP-Initiated Logout §2).
    async fn verify_hint(&self, tenant_id: Uuid, token: &str) -> Option<Value> {
        let payload = token.split('.').nth(1)?;
        let unverified: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
        let issued_at = DateTime::<Utc>::from_timestamp(unverified.get("iat")?.as_i64()?, 0)?;
        let claims = self.keys.verify(tenant_id, token, issued_at).await.ok()?;
        // Only ID tokens: access tokens carry a scope.
        claims.get("scope").is_none().then_some(claims)
    }
}

/// The token endpoint's answer.
fn token_response(tokens: Tokens) -> Value {
    let mut answer = json!({
        "access_token": tokens.access_token,
        "token_type": "Bearer",
        "expires_in": tokens.expires_in,
        "id_token": tokens.id_token,
        "scope": "openid",
    });
    if !tokens.refresh_token.is_empty() {
        answer["refresh_token"] = json!(tokens.refresh_token);
    }
    answer
}

/// `uri` with `query` added to whatever query it has.
pub fn with_query(uri: &str, query: &[(&str, String)]) -> String {
    match url::Url::parse(uri) {
        Ok(mut url) => {
            {
                let mut pairs = url.query_pairs_mut();
                for (name, value) in query {
                    pairs.append_pair(name, value);
                }
            }
            url.to_string()
        }
        Err(_) => uri.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_s256_matches_the_rfc_7636_example() {
        // RFC 7636 Appendix B.
        let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        assert!(valid_verifier(verifier));
        assert!(pkce_matches(
            verifier,
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        ));
        assert!(!pkce_matches(
            verifier,
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cN"
        ));
        assert!(!valid_verifier("short"));
        assert!(!valid_verifier(&"a".repeat(129)));
        assert!(!valid_verifier(&format!("{}!", "a".repeat(50))));
    }

    #[test]
    fn query_is_added_to_the_redirect_uris_own() {
        let uri = with_query(
            "https://app.example/cb?tab=1",
            &[("code", "a b".into()), ("state", "x&y".into())],
        );
        assert_eq!(uri, "https://app.example/cb?tab=1&code=a+b&state=x%26y");
    }
}
