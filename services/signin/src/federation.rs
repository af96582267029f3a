//! The relying party: talking to a tenant's identity providers for a federated sign-in.
//!
//! OpenID Connect kinds (Google, Apple, generic) use discovery and the `openidconnect` crate:
//! authorization code flow with `state`, `nonce` and PKCE S256, the code exchanged with the
//! client secret, the ID token checked (signature against the provider's JWKS, `iss`, `aud`,
//! `exp`, `nonce`) and RFC 9207's `iss` response parameter compared when present. Facebook is
//! OAuth 2.0 plus the Graph API's `/me`.
//!
//! The per-attempt secrets (`state`, `nonce`, PKCE verifier) are never stored: they are
//! derived from the master key, the flow id and the attempt number ([`Secrets::derive`]), so
//! the log holds nothing that would let a reader finish someone else's sign-in.
//!
//! Discovery documents (with their JWKS) are cached per issuer for [`METADATA_TTL`]; an ID
//! token signed by a key the cached set does not have triggers one fresh fetch before it is
//! refused (key rotation). That fetch is not rate-limited: ID tokens come only from the
//! provider's own token endpoint, so no one but the provider can cause it. The HTTP client
//! follows no redirects (SSRF), gives up after [`TIMEOUT`] and reads at most [`MAX_RESPONSE`]
//! bytes of any answer.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use gatehouse_core::crypto::Crypto;
use gatehouse_directory::identity_provider::{
    FACEBOOK_DIALOG, FACEBOOK_GRAPH, Kind, ProviderConfig,
};
use openidconnect::core::{CoreAuthenticationFlow, CoreClient, CoreProviderMetadata};
use openidconnect::{
    AuthorizationCode, ClaimsVerificationError, ClientId, ClientSecret, CsrfToken, IssuerUrl,
    Nonce, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, RequestTokenError, Scope,
    SignatureVerificationError,
};
use openidconnect::{TokenResponse, reqwest};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// How long a discovery document and its keys are trusted.
pub const METADATA_TTL: Duration = Duration::from_secs(600);
/// Every call to a provider.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// The largest answer read from a provider (discovery, keys, tokens, `/me`).
pub const MAX_RESPONSE: usize = 256 * 1024;

/// One attempt's secrets, derived (never stored).
pub struct Secrets {
    /// `state`: ties the callback to this flow and attempt.
    pub state: String,
    /// `nonce`: ties the ID token to this attempt.
    pub nonce: String,
    /// PKCE verifier (64 hex characters).
    pub verifier: String,
}

impl Secrets {
    /// The secrets of attempt `attempt` of flow `flow_id`.
    pub fn derive(crypto: &Crypto, flow_id: Uuid, attempt: u32) -> Secrets {
        // 64 hex characters: a valid PKCE verifier (RFC 7636: 43 to 128 unreserved
        // characters) and 256 bits for state and nonce.
        let derive = |purpose: &str| crypto.code_digest(flow_id, purpose, &attempt.to_string());
        Secrets {
            state: derive("federation_state"),
            nonce: derive("federation_nonce"),
            verifier: derive("federation_pkce"),
        }
    }
}

/// Who the provider says the person is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The provider's stable id for the person.
    pub subject: String,
    /// Email, when the provider gave one.
    pub email: Option<String>,
    /// The provider verified that email.
    pub email_verified: bool,
    /// Display name.
    pub name: Option<String>,
}

/// Why a federation attempt failed. [`FederationError::reason`] is what the flow records;
/// the detail goes to the log only (it may quote the provider).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FederationError {
    /// The provider sent an error to the callback (`access_denied` when consent was denied).
    Provider(String),
    /// The callback's `state` is not this attempt's.
    InvalidState,
    /// The callback's RFC 9207 `iss` is not the provider's issuer.
    InvalidIssuer,
    /// The callback has no code.
    MissingCode,
    /// The provider refused the code (bad, reused, PKCE mismatch).
    InvalidGrant(String),
    /// The ID token failed a check.
    InvalidIdToken(String),
    /// The provider could not be reached or answered garbage.
    Unavailable(String),
    /// The provider's answer had no subject.
    MissingSubject,
}

impl FederationError {
    /// The reason recorded on the flow and answered to the caller.
    pub fn reason(&self) -> String {
        match self {
            FederationError::Provider(code) => code.clone(),
            FederationError::InvalidState => "invalid_state".into(),
            FederationError::InvalidIssuer => "invalid_issuer".into(),
            FederationError::MissingCode => "missing_code".into(),
            FederationError::InvalidGrant(_) => "invalid_grant".into(),
            FederationError::InvalidIdToken(_) => "invalid_id_token".into(),
            FederationError::Unavailable(_) => "provider_unavailable".into(),
            FederationError::MissingSubject => "missing_subject".into(),
        }
    }

    /// What went wrong, for the server log.
    pub fn detail(&self) -> String {
        match self {
            FederationError::InvalidGrant(detail)
            | FederationError::InvalidIdToken(detail)
            | FederationError::Unavailable(detail) => detail.clone(),
            other => other.reason(),
        }
    }
}

/// A provider's `error` code, kept only when it looks like one (it is echoed to callers).
fn error_code(value: &str) -> String {
    let plausible = !value.is_empty()
        && value.len() <= 64
        && value.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
    if plausible {
        value.to_string()
    } else {
        "provider_error".into()
    }
}

struct Cached {
    metadata: Arc<CoreProviderMetadata>,
    fetched: Instant,
}

/// A failed call to a provider, described without its URL (which may carry tokens).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HttpError(String);

impl From<reqwest::Error> for HttpError {
    fn from(error: reqwest::Error) -> Self {
        HttpError(error.without_url().to_string())
    }
}

/// Reads a response's body, refusing more than [`MAX_RESPONSE`] bytes.
async fn read_body(mut response: reqwest::Response) -> Result<Vec<u8>, HttpError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > MAX_RESPONSE {
            return Err(HttpError(format!(
                "the answer is larger than {MAX_RESPONSE} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The HTTP client `openidconnect` calls: reqwest, with the body cap.
async fn send(
    http: reqwest::Client,
    request: openidconnect::HttpRequest,
) -> Result<openidconnect::HttpResponse, HttpError> {
    let (parts, body) = request.into_parts();
    let response = http
        .request(parts.method, parts.uri.to_string())
        .headers(parts.headers)
        .body(body)
        .send()
        .await?;
    let status = response.status();
    let headers = response.headers().clone();
    let body = read_body(response).await?;
    let mut answer = openidconnect::http::Response::new(body);
    *answer.status_mut() = status;
    *answer.headers_mut() = headers;
    Ok(answer)
}

/// Reads a JSON answer (capped).
async fn json(response: reqwest::Response) -> Result<Value, FederationError> {
    let body = read_body(response)
        .await
        .map_err(|e| FederationError::Unavailable(e.to_string()))?;
    serde_json::from_slice(&body).map_err(|e| FederationError::Unavailable(e.to_string()))
}

/// Talks to identity providers.
pub struct Federation {
    http: reqwest::Client,
    metadata: Mutex<HashMap<String, Cached>>,
}

impl Federation {
    /// A relying party with its own HTTP client (no redirects, timeouts).
    pub fn new() -> Result<Federation, String> {
        let http = reqwest::ClientBuilder::new()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .timeout(TIMEOUT)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Federation {
            http,
            metadata: Mutex::new(HashMap::new()),
        })
    }

    /// The provider's discovery document, from the cache unless it is stale or `refresh`.
    async fn discover(
        &self,
        issuer: &str,
        refresh: bool,
    ) -> Result<Arc<CoreProviderMetadata>, FederationError> {
        if !refresh
            && let Ok(cache) = self.metadata.lock()
            && let Some(cached) = cache.get(issuer)
            && cached.fetched.elapsed() < METADATA_TTL
        {
            return Ok(cached.metadata.clone());
        }
        let url = IssuerUrl::new(issuer.to_string())
            .map_err(|e| FederationError::Unavailable(format!("issuer: {e}")))?;
        let client = |request| send(self.http.clone(), request);
        let metadata = CoreProviderMetadata::discover_async(url, &client)
            .await
            .map_err(|e| FederationError::Unavailable(format!("discovery: {e}")))?;
        let metadata = Arc::new(metadata);
        if let Ok(mut cache) = self.metadata.lock() {
            cache.insert(
                issuer.to_string(),
                Cached {
                    metadata: metadata.clone(),
                    fetched: Instant::now(),
                },
            );
        }
        Ok(metadata)
    }

    fn client(
        metadata: &CoreProviderMetadata,
        config: &ProviderConfig,
        client_secret: &str,
        redirect_uri: &str,
    ) -> Result<
        CoreClient<
            openidconnect::EndpointSet,
            openidconnect::EndpointNotSet,
            openidconnect::EndpointNotSet,
            openidconnect::EndpointNotSet,
            openidconnect::EndpointMaybeSet,
            openidconnect::EndpointMaybeSet,
        >,
        FederationError,
    > {
        let redirect = RedirectUrl::new(redirect_uri.to_string())
            .map_err(|e| FederationError::Unavailable(format!("redirect URI: {e}")))?;
        Ok(CoreClient::from_provider_metadata(
            metadata.clone(),
            ClientId::new(config.client_id.clone()),
            Some(ClientSecret::new(client_secret.to_string())),
        )
        .set_redirect_uri(redirect))
    }

    /// Where to send the person: the provider's authorization endpoint with this attempt's
    /// `state`, `nonce` (OpenID Connect) and PKCE S256 challenge.
    pub async fn authorization_url(
        &self,
        config: &ProviderConfig,
        secrets: &Secrets,
        redirect_uri: &str,
    ) -> Result<String, FederationError> {
        let challenge = PkceCodeChallenge::from_code_verifier_sha256(&PkceCodeVerifier::new(
            secrets.verifier.clone(),
        ));
        if config.kind == Kind::Facebook {
            let dialog = if config.base_url == FACEBOOK_GRAPH {
                FACEBOOK_DIALOG.to_string()
            } else {
                format!("{}/dialog/oauth", config.base_url)
            };
            let mut url = url::Url::parse(&dialog)
                .map_err(|e| FederationError::Unavailable(format!("dialog URL: {e}")))?;
            url.query_pairs_mut()
                .append_pair("client_id", &config.client_id)
                .append_pair("redirect_uri", redirect_uri)
                .append_pair("state", &secrets.state)
                .append_pair("response_type", "code")
                .append_pair("scope", &config.scopes.join(","))
                .append_pair("code_challenge", challenge.as_str())
                .append_pair("code_challenge_method", "S256");
            return Ok(url.into());
        }
        let metadata = self.discover(&config.issuer, false).await?;
        // The secret is not needed to build the URL.
        let client = Self::client(&metadata, config, "", redirect_uri)?;
        let state = secrets.state.clone();
        let nonce = secrets.nonce.clone();
        let mut request = client
            .authorize_url(
                CoreAuthenticationFlow::AuthorizationCode,
                move || CsrfToken::new(state),
                move || Nonce::new(nonce),
            )
            .set_pkce_challenge(challenge);
        for scope in &config.scopes {
            request = request.add_scope(Scope::new(scope.clone()));
        }
        let (url, _, _) = request.url();
        Ok(url.into())
    }

    /// Checks the callback's query and turns its code into the person's claims.
    pub async fn complete(
        &self,
        config: &ProviderConfig,
        client_secret: &str,
        secrets: &Secrets,
        redirect_uri: &str,
        query: &str,
    ) -> Result<Claims, FederationError> {
        let params: HashMap<String, String> =
            url::form_urlencoded::parse(query.trim_start_matches('?').as_bytes())
                .into_owned()
                .collect();
        let state_ok = params.get("state").is_some_and(|state| {
            use subtle::ConstantTimeEq;
            state.as_bytes().ct_eq(secrets.state.as_bytes()).into()
        });
        if let Some(error) = params.get("error") {
            // A denial is only believed for this attempt (a forged one would end nothing
            // worse than a failed attempt, but it is still not this attempt's answer).
            return Err(if state_ok {
                FederationError::Provider(error_code(error))
            } else {
                FederationError::InvalidState
            });
        }
        if !state_ok {
            return Err(FederationError::InvalidState);
        }
        let code = params
            .get("code")
            .filter(|code| !code.is_empty() && code.len() <= 4096)
            .ok_or(FederationError::MissingCode)?;
        if config.kind == Kind::Facebook {
            return self
                .facebook(config, client_secret, secrets, redirect_uri, code)
                .await;
        }
        let metadata = self.discover(&config.issuer, false).await?;
        // RFC 9207: when the provider names itself, it must be the one we sent the person to
        // (a mix-up attack sends another provider's code here).
        if let Some(iss) = params.get("iss")
            && iss != metadata.issuer().as_str()
        {
            return Err(FederationError::InvalidIssuer);
        }
        let client = Self::client(&metadata, config, client_secret, redirect_uri)?;
        let response = client
            .exchange_code(AuthorizationCode::new(code.clone()))
            .map_err(|e| FederationError::Unavailable(format!("token endpoint: {e}")))?
            .set_pkce_verifier(PkceCodeVerifier::new(secrets.verifier.clone()))
            .request_async(&|request| send(self.http.clone(), request))
            .await
            .map_err(|e| match e {
                RequestTokenError::ServerResponse(response) => {
                    FederationError::InvalidGrant(response.error().to_string())
                }
                RequestTokenError::Request(e) => FederationError::Unavailable(e.to_string()),
                other => FederationError::Unavailable(other.to_string()),
            })?;
        let id_token = response
            .id_token()
            .ok_or_else(|| FederationError::InvalidIdToken("no ID token".into()))?;
        let nonce = Nonce::new(secrets.nonce.clone());
        let verified = {
            let verifier = client.id_token_verifier();
            match id_token.claims(&verifier, &nonce) {
                Ok(claims) => Ok(claims.subject().to_string()),
                Err(e) => Err(e),
            }
        };
        let subject = match verified {
            Ok(subject) => subject,
            Err(ClaimsVerificationError::SignatureVerification(
                SignatureVerificationError::NoMatchingKey,
            )) => {
                // Perhaps the provider rotated its keys: fetch them once more.
                let metadata = self.discover(&config.issuer, true).await?;
                let client = Self::client(&metadata, config, client_secret, redirect_uri)?;
                let verifier = client.id_token_verifier();
                id_token
                    .claims(&verifier, &nonce)
                    .map(|claims| claims.subject().to_string())
                    .map_err(|e| FederationError::InvalidIdToken(e.to_string()))?
            }
            Err(e) => return Err(FederationError::InvalidIdToken(e.to_string())),
        };
        // The signature is verified: read the payload for the mapped claims.
        let payload = id_token
            .to_string()
            .split('.')
            .nth(1)
            .and_then(|part| URL_SAFE_NO_PAD.decode(part).ok())
            .and_then(|bytes| serde_json::from_slice::<Map<String, Value>>(&bytes).ok())
            .ok_or_else(|| FederationError::InvalidIdToken("unreadable payload".into()))?;
        Ok(mapped(config, subject, &payload, false))
    }

    async fn facebook(
        &self,
        config: &ProviderConfig,
        client_secret: &str,
        secrets: &Secrets,
        redirect_uri: &str,
        code: &str,
    ) -> Result<Claims, FederationError> {
        // The secret goes in the body, never in a URL (URLs end up in error messages).
        let token = self
            .http
            .post(format!("{}/oauth/access_token", config.base_url))
            .form(&[
                ("client_id", config.client_id.as_str()),
                ("redirect_uri", redirect_uri),
                ("client_secret", client_secret),
                ("code", code),
                ("code_verifier", secrets.verifier.as_str()),
            ])
            .send()
            .await
            .map_err(unavailable)?;
        let token = json(token).await?;
        let access_token = token
            .get("access_token")
            .and_then(Value::as_str)
            .ok_or_else(|| FederationError::InvalidGrant(token.to_string()))?;
        let mapping = &config.claim_mapping;
        let me = self
            .http
            .get(format!("{}/me", config.base_url))
            .query(&[(
                "fields",
                format!("id,{},{}", mapping.name(), mapping.email()),
            )])
            .bearer_auth(access_token)
            .send()
            .await
            .map_err(unavailable)?;
        let me = json(me).await?;
        let Value::Object(me) = me else {
            return Err(FederationError::Unavailable("/me is not an object".into()));
        };
        let subject = me
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty())
            .ok_or(FederationError::MissingSubject)?
            .to_string();
        // Facebook returns only confirmed emails.
        Ok(mapped(config, subject, &me, true))
    }
}

/// A network failure, described without its URL (which may carry tokens).
fn unavailable(error: reqwest::Error) -> FederationError {
    FederationError::Unavailable(error.without_url().to_string())
}

/// The claims named by the provider's mapping.
fn mapped(
    config: &ProviderConfig,
    subject: String,
    claims: &Map<String, Value>,
    email_always_verified: bool,
) -> Claims {
    let mapping = &config.claim_mapping;
    let text = |name: &str| {
        claims
            .get(name)
            .and_then(Value::as_str)
            .filter(|value| !value.is_empty())
            .map(str::to_string)
    };
    let email_verified = email_always_verified
        || match claims.get(mapping.email_verified()) {
            Some(Value::Bool(verified)) => *verified,
            // Some providers (Apple) send it as a string.
            Some(Value::String(verified)) => verified == "true",
            _ => false,
        };
    Claims {
        subject,
        email: text(mapping.email()),
        email_verified,
        name: text(mapping.name()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer answering every connection with `size` bytes of JSON-ish body.
    async fn peer(size: usize) -> std::io::Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut request = [0u8; 4096];
                let _ = socket.read(&mut request).await;
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {size}\r\n\r\n");
                let _ = socket.write_all(head.as_bytes()).await;
                let _ = socket.write_all(&vec![b' '; size]).await;
            }
        });
        Ok(format!("http://{address}/"))
    }

    #[tokio::test]
    async fn answers_larger_than_the_cap_are_refused() -> Result<(), Box<dyn std::error::Error>> {
        let http = reqwest::Client::new();
        let request = |url: &str| {
            openidconnect::http::Request::builder()
                .uri(url)
                .body(Vec::new())
        };
        let small = peer(1000).await?;
        let answer = send(http.clone(), request(&small)?).await?;
        assert_eq!(answer.body().len(), 1000);
        let large = peer(MAX_RESPONSE + 1).await?;
        let refused = send(http, request(&large)?).await;
        assert!(refused.is_err_and(|e| e.to_string().contains("larger than")));
        Ok(())
    }

    #[test]
    fn provider_error_codes_are_echoed_only_when_plausible() {
        assert_eq!(error_code("access_denied"), "access_denied");
        assert_eq!(error_code("<script>"), "provider_error");
        assert_eq!(error_code(&"a".repeat(65)), "provider_error");
    }
}
