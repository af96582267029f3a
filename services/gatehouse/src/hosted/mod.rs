//! The OpenID Connect endpoints and the hosted sign-in pages, on the HTTP port, per tenant
//! under its issuer `…/tenants/<tenant>`:
//!
//! | path | what |
//! |---|---|
//! | `GET\|POST /authorize` | checks the request ([`Oidc::validate`]); a live browser session for the app answers at once, otherwise the sign-in page |
//! | `POST /interaction` | every form of the pages: each runs one command of the sign-in flow |
//! | `POST /token` | `authorization_code` (PKCE) and `refresh_token` grants |
//! | `GET\|POST /userinfo` | the access token's user |
//! | `POST /revoke` | RFC 7009 |
//! | `GET\|POST /logout` | RP-initiated logout (the browser's session always ends) |
//! | `GET  /federation/start` | a provider's button: a flow that starts with federation |
//! | `GET  /federation/callback` | the provider's answer, to the flow in the cookie |
//!
//! The pages drive the same flow actors as `SignInService` (one workflow, two front doors):
//! the flow's id and the app's request live in a cookie sealed by the server
//! ([`Crypto::seal_token`]), never in the page, so that neither can be swapped. Forms carry a
//! CSRF token that must match the one sealed in that cookie. Cookies are `HttpOnly`,
//! `SameSite=Lax`, scoped to the tenant's path, and `Secure` when the public URL is https.
//! Pages send a CSP that allows only the stylesheet and forms to this server and the app's
//! redirect URI, and may not be framed.

pub mod pages;
pub mod text;

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Path, Query, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chrono::Utc;
use gatehouse_core::ApiError;
use gatehouse_core::crypto::Crypto;
use gatehouse_core::request::{CORRELATION_HEADER, http_client_context};
use gatehouse_directory::identity_provider_service::IdentityProviderApi;
use gatehouse_directory::tenant::{MfaMethod, PrimaryMethod};
use gatehouse_directory::user_service::UserApi;
use gatehouse_events::{Actor, Metadata};
use gatehouse_proto::v1 as pb;
use gatehouse_proto::v1::user_service_server::UserService;
use gatehouse_signin::Flows;
use gatehouse_signin::directory::Directory;
use gatehouse_signin::engine::{self, Command, Reply, Scope};
use gatehouse_signin::flow::{Outcome, Primary, Step};
use gatehouse_signin::oidc::{
    AuthRequest, AuthorizeError, AuthorizeParams, BrowserSession, ClientCredentials, LogoutParams,
    OAuthError, Oidc, Prompt, TokenForm,
};
use gatehouse_signin::signin_service::reason_text;
use pages::Page;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use subtle::ConstantTimeEq;
use text::{EN, Text};
use uuid::Uuid;

/// The cookie holding the sign-in in progress.
const INTERACTION_COOKIE: &str = "gh_interaction";
/// The cookie holding the browser's session.
const SESSION_COOKIE: &str = "gh_session";
const INTERACTION_PURPOSE: &str = "hosted interaction v1";
const SESSION_PURPOSE: &str = "hosted browser session v1";
/// How long a browser may take over the pages of one authorization request.
const INTERACTION_SECONDS: i64 = 30 * 60;
/// Largest form accepted.
const MAX_FORM: usize = 16 * 1024;
/// Largest sealed interaction cookie (browsers keep 4 096 bytes per cookie, name included).
const MAX_COOKIE: usize = 3_900;
/// Longest email kept in the interaction (longer ones are refused by the flow anyway).
const MAX_EMAIL: usize = 320;

/// What the browser keeps (sealed) while the person signs in.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Interaction {
    request: AuthRequest,
    csrf: String,
    flow: Option<Uuid>,
    email: Option<String>,
    started: i64,
    /// The page shown while no flow runs.
    #[serde(default)]
    screen: Screen,
}

/// Pages outside a sign-in flow.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
enum Screen {
    #[default]
    SignIn,
    SignUp,
    /// The code sent to a new account's email.
    VerifyEmail {
        user_id: Uuid,
    },
    /// Forgotten password: the email.
    ResetStart,
    /// The reset code and the new password.
    ResetComplete,
}

/// The provider's HTTP side.
pub struct Hosted {
    oidc: Arc<Oidc>,
    flows: Arc<Flows>,
    crypto: Arc<Crypto>,
    directory: Arc<Directory>,
    users: Arc<UserApi>,
    providers: Arc<IdentityProviderApi>,
    /// Cookies get `Secure` (the public URL is https).
    secure: bool,
    text: &'static Text,
}

impl Hosted {
    /// The endpoints over the provider, the flows, sign-up and the identity providers.
    pub fn new(
        oidc: Arc<Oidc>,
        flows: Arc<Flows>,
        crypto: Arc<Crypto>,
        directory: Arc<Directory>,
        users: Arc<UserApi>,
        providers: Arc<IdentityProviderApi>,
        secure: bool,
    ) -> Self {
        Hosted {
            oidc,
            flows,
            crypto,
            directory,
            users,
            providers,
            secure,
            text: &EN,
        }
    }
}

/// The routes (they need `ConnectInfo<SocketAddr>`).
pub fn router(hosted: Arc<Hosted>) -> Router {
    Router::new()
        .route(
            "/tenants/{tenant}/authorize",
            get(authorize_get).post(authorize_post),
        )
        .route("/tenants/{tenant}/interaction", post(interaction))
        .route("/tenants/{tenant}/token", post(token))
        .route("/tenants/{tenant}/userinfo", get(userinfo).post(userinfo))
        .route("/tenants/{tenant}/revoke", post(revoke))
        .route("/tenants/{tenant}/logout", get(logout).post(logout_post))
        .route("/tenants/{tenant}/federation/start", get(federation_start))
        .route(
            "/tenants/{tenant}/federation/callback",
            get(federation_return),
        )
        .route("/hosted.css", get(css))
        .with_state(hosted)
}

async fn css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        pages::CSS,
    )
        .into_response()
}

fn metadata(peer: SocketAddr, headers: &HeaderMap) -> Metadata {
    let forwarded = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok());
    let user_agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok());
    Metadata {
        correlation_id: headers
            .get(CORRELATION_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Uuid::try_parse(v).ok())
            .unwrap_or_else(Uuid::now_v7),
        causation_id: None,
        actor: Actor::Anonymous,
        context: Some(http_client_context(Some(peer.ip()), forwarded, user_agent)),
    }
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, value)| value)
}

fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

fn tenant_of(tenant: &str) -> Option<Uuid> {
    Uuid::try_parse(tenant).ok()
}

/// Headers every page and redirect carries.
fn protect(response: &mut Response, form_targets: &str) {
    let headers = response.headers_mut();
    let csp = format!(
        "default-src 'none'; style-src 'self'; img-src 'self' data:; \
         form-action 'self'{form_targets}; frame-ancestors 'none'; base-uri 'none'"
    );
    if let Ok(value) = HeaderValue::from_str(&csp) {
        headers.insert(header::CONTENT_SECURITY_POLICY, value);
    }
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

/// The origin of an app's redirect URI, for the CSP's `form-action` (a form's answer that
/// redirects to the app counts as the form's target).
fn origin_of(uri: &str) -> String {
    url::Url::parse(uri)
        .ok()
        .map(|url| url.origin().ascii_serialization())
        .filter(|origin| origin != "null")
        .map(|origin| format!(" {origin}"))
        .unwrap_or_default()
}

fn html(status: StatusCode, body: String, form_targets: &str) -> Response {
    let mut response = (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response();
    protect(&mut response, form_targets);
    response
}

fn redirect(location: &str, form_targets: &str) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    protect(&mut response, form_targets);
    response
}

impl Hosted {
    fn error_page(&self, status: StatusCode, message: &str) -> Response {
        html(
            status,
            pages::message(self.text, self.text.error_title, message),
            "",
        )
    }

    fn set_cookie(
        &self,
        response: &mut Response,
        tenant_id: Uuid,
        name: &str,
        value: &str,
        max_age: Option<i64>,
    ) {
        let mut cookie =
            format!("{name}={value}; Path=/tenants/{tenant_id}/; HttpOnly; SameSite=Lax");
        if let Some(seconds) = max_age {
            cookie.push_str(&format!("; Max-Age={}", seconds.max(0)));
        }
        if self.secure {
            cookie.push_str("; Secure");
        }
        if let Ok(value) = HeaderValue::from_str(&cookie) {
            response.headers_mut().append(header::SET_COOKIE, value);
        }
    }

    fn interaction_of(&self, tenant_id: Uuid, headers: &HeaderMap) -> Option<Interaction> {
        let interaction: Interaction = self
            .crypto
            .open_token(INTERACTION_PURPOSE, cookie(headers, INTERACTION_COOKIE)?)?;
        (interaction.request.tenant_id == tenant_id
            && Utc::now().timestamp() - interaction.started < INTERACTION_SECONDS)
            .then_some(interaction)
    }

    fn browser_of(&self, tenant_id: Uuid, headers: &HeaderMap) -> Option<BrowserSession> {
        let browser: BrowserSession = self
            .crypto
            .open_token(SESSION_PURPOSE, cookie(headers, SESSION_COOKIE)?)?;
        (browser.tenant_id == tenant_id).then_some(browser)
    }

    /// The page of the flow's current step (or, without a flow, of the interaction's screen),
    /// with the interaction cookie.
    async fn render(
        &self,
        interaction: &Interaction,
        reply: Option<&Reply>,
        error: Option<&str>,
        metadata: &Metadata,
    ) -> Response {
        let tenant_id = interaction.request.tenant_id;
        let text = self.text;
        let post_to = format!("/tenants/{tenant_id}/interaction");
        let email = interaction.email.clone().unwrap_or_default();
        let settings = match self.directory.tenant(tenant_id).await {
            Ok(Some(settings)) => settings,
            _ => return self.error_page(StatusCode::NOT_FOUND, text.went_wrong),
        };
        let allows = |method: PrimaryMethod| settings.allowed_primary_methods.contains(&method);
        let providers: Vec<(String, String)> = if allows(PrimaryMethod::Federated) {
            self.providers
                .offered(tenant_id)
                .into_iter()
                .map(|(id, name)| {
                    let url = format!(
                        "/tenants/{tenant_id}/federation/start?provider={id}&csrf={}",
                        interaction.csrf
                    );
                    (name, url)
                })
                .collect()
        } else {
            Vec::new()
        };
        let sign_in = Page::SignIn {
            email: &email,
            email_otp: allows(PrimaryMethod::EmailOtp),
            sign_up: settings.sign_up_enabled && allows(PrimaryMethod::Password),
            providers: &providers,
        };
        let totp;
        let mut error = error.map(str::to_string);
        let page = match reply.map(|r| (&r.flow, r)) {
            None => match &interaction.screen {
                Screen::SignIn => sign_in,
                Screen::SignUp => Page::SignUp {
                    email: &email,
                    attributes: &settings.collected_attributes,
                },
                Screen::VerifyEmail { .. } => Page::VerifyEmail { email: &email },
                Screen::ResetStart => Page::ResetStart { email: &email },
                Screen::ResetComplete => Page::ResetComplete { email: &email },
            },
            Some((flow, reply)) => match flow.step {
                Step::Password => Page::Password {
                    email: &email,
                    note: None,
                },
                Step::LinkAccount => Page::Password {
                    email: "",
                    note: Some(text.link_account),
                },
                Step::EmailCode => Page::EmailCode,
                Step::SelectMfaMethod => Page::SelectMfa {
                    methods: &flow.mfa_methods,
                },
                Step::MfaCode => Page::MfaCode {
                    method: flow.selected.unwrap_or(MfaMethod::Totp),
                    others: flow.mfa_methods.len() > 1,
                },
                Step::PhoneNumber => Page::PhoneNumber,
                Step::PhoneCode => Page::PhoneCode,
                Step::NewPassword => Page::NewPassword,
                Step::TotpRegistration => {
                    let enrolment = match &reply.totp {
                        Some(enrolment) => Ok(enrolment.clone()),
                        None => self
                            .command(interaction, reply.id, Command::TotpRegistration, metadata)
                            .await
                            .and_then(|r| {
                                r.totp
                                    .ok_or_else(|| ApiError::Internal("no enrolment".into()))
                            }),
                    };
                    match enrolment {
                        Ok(enrolment) => {
                            totp = (STANDARD.encode(&enrolment.qr_png), enrolment.secret);
                            Page::TotpRegistration {
                                qr_png_base64: &totp.0,
                                secret: &totp.1,
                            }
                        }
                        Err(error) => {
                            tracing::error!(%error, "hosted pages: the TOTP enrolment");
                            return self
                                .error_page(StatusCode::INTERNAL_SERVER_ERROR, text.went_wrong);
                        }
                    }
                }
                // Back from (or waiting for) an identity provider: the sign-in page again,
                // to retry or choose another way.
                Step::Federation | Step::FederationCallback => {
                    if flow.federation_error.is_some() && error.is_none() {
                        error = Some(text.federation_failed.to_string());
                    }
                    sign_in
                }
                Step::None | Step::Done => {
                    return self.error_page(StatusCode::CONFLICT, text.not_here);
                }
            },
        };
        let body = pages::step(text, &page, &post_to, &interaction.csrf, error.as_deref());
        let mut response = html(
            if error.is_some() {
                StatusCode::BAD_REQUEST
            } else {
                StatusCode::OK
            },
            body,
            &origin_of(&interaction.request.redirect_uri),
        );
        self.keep(&mut response, interaction);
        response
    }

    /// Stores the interaction in its cookie; one too large for a browser to keep (some 4 KB)
    /// turns the answer into an error page rather than being dropped by the browser.
    fn keep(&self, response: &mut Response, interaction: &Interaction) {
        let sealed = self.crypto.seal_token(INTERACTION_PURPOSE, interaction);
        if sealed.len() > MAX_COOKIE {
            *response = self.error_page(StatusCode::BAD_REQUEST, self.text.too_large);
            return;
        }
        self.set_cookie(
            response,
            interaction.request.tenant_id,
            INTERACTION_COOKIE,
            &sealed,
            Some(INTERACTION_SECONDS),
        );
    }

    /// Sends the browser back to the app with an error, and forgets the interaction.
    fn back_with_error(&self, request: &AuthRequest, error: &str, description: &str) -> Response {
        let location = self.oidc.redirect_with_error(
            request.tenant_id,
            &request.redirect_uri,
            error,
            description,
            request.state.as_deref(),
        );
        let mut response = redirect(&location, &origin_of(&request.redirect_uri));
        self.set_cookie(
            &mut response,
            request.tenant_id,
            INTERACTION_COOKIE,
            "",
            Some(0),
        );
        response
    }

    /// A completed flow: a code for its session, the browser session cookie, back to the app.
    async fn complete(
        &self,
        request: &AuthRequest,
        session_id: Uuid,
        with_refresh_token: bool,
        metadata: &Metadata,
    ) -> Response {
        let code = match self
            .oidc
            .issue_code(request, session_id, with_refresh_token, metadata)
            .await
        {
            Ok(code) => code,
            Err(error) => {
                tracing::error!(%error, "hosted pages: issuing a code");
                return self.error_page(StatusCode::INTERNAL_SERVER_ERROR, self.text.went_wrong);
            }
        };
        let location = self.oidc.redirect_with_code(request, &code);
        let mut response = redirect(&location, &origin_of(&request.redirect_uri));
        let browser = BrowserSession {
            tenant_id: request.tenant_id,
            session_id,
        };
        let sealed = self.crypto.seal_token(SESSION_PURPOSE, &browser);
        // The cookie lives as long as the session may (a session cookie when Conditional
        // Access said the browser session must not persist).
        let max_age = match self.session_end(request.tenant_id, session_id).await {
            Some((Some(false), _)) => None,
            Some((_, end)) => Some(end),
            None => Some(0),
        };
        self.set_cookie(
            &mut response,
            request.tenant_id,
            SESSION_COOKIE,
            &sealed,
            max_age,
        );
        self.set_cookie(
            &mut response,
            request.tenant_id,
            INTERACTION_COOKIE,
            "",
            Some(0),
        );
        response
    }

    /// A session's persistence and seconds left.
    async fn session_end(&self, tenant_id: Uuid, session_id: Uuid) -> Option<(Option<bool>, i64)> {
        let session = self.oidc.session(tenant_id, session_id).await?;
        let left = session.expires_at? - Utc::now();
        Some((session.persistent, left.num_seconds()))
    }

    async fn authorize(
        &self,
        tenant: &str,
        params: AuthorizeParams,
        peer: SocketAddr,
        headers: &HeaderMap,
    ) -> Response {
        let Some(tenant_id) = tenant_of(tenant) else {
            return self.error_page(StatusCode::NOT_FOUND, self.text.went_wrong);
        };
        let request = match self.oidc.validate(tenant_id, params).await {
            Ok((request, _)) => request,
            Err(AuthorizeError::Page(message)) => {
                return self.error_page(StatusCode::BAD_REQUEST, &message);
            }
            Err(AuthorizeError::Redirect {
                redirect_uri,
                error,
                description,
                state,
            }) => {
                let location = self.oidc.redirect_with_error(
                    tenant_id,
                    &redirect_uri,
                    error,
                    &description,
                    state.as_deref(),
                );
                return redirect(&location, &origin_of(&redirect_uri));
            }
        };
        let metadata = metadata(peer, headers);
        let browser = self.browser_of(tenant_id, headers);
        match self.oidc.reusable_session(&request, browser.as_ref()).await {
            Ok(Some(session_id)) => {
                return self.complete(&request, session_id, false, &metadata).await;
            }
            Ok(None) if request.prompt == Some(Prompt::None) => {
                return self.back_with_error(&request, "login_required", "the person must sign in");
            }
            Ok(None) => {}
            Err(error) => {
                tracing::error!(%error, "authorize: reading the browser session");
                return self.error_page(StatusCode::INTERNAL_SERVER_ERROR, self.text.went_wrong);
            }
        }
        let interaction = Interaction {
            email: request.login_hint.clone(),
            request,
            csrf: random_token(),
            flow: None,
            started: Utc::now().timestamp(),
            screen: Screen::SignIn,
        };
        self.render(&interaction, None, None, &metadata).await
    }

    /// Runs a command on the interaction's flow.
    async fn command(
        &self,
        interaction: &Interaction,
        flow: Uuid,
        command: Command,
        metadata: &Metadata,
    ) -> Result<Reply, ApiError> {
        let scope = Scope {
            tenant_id: interaction.request.tenant_id,
            client_id: Some(interaction.request.client_id.clone()),
        };
        self.flows
            .call(flow, command, scope, metadata.clone())
            .await
    }

    /// The interaction of a request whose form (or link) carries the page's CSRF token.
    fn checked(
        &self,
        tenant: &str,
        headers: &HeaderMap,
        csrf: Option<&str>,
    ) -> Result<Interaction, Box<Response>> {
        let Some(tenant_id) = tenant_of(tenant) else {
            return Err(Box::new(
                self.error_page(StatusCode::NOT_FOUND, self.text.went_wrong),
            ));
        };
        let Some(interaction) = self.interaction_of(tenant_id, headers) else {
            return Err(Box::new(
                self.error_page(StatusCode::BAD_REQUEST, self.text.expired),
            ));
        };
        let csrf = csrf.unwrap_or_default();
        if !bool::from(csrf.as_bytes().ct_eq(interaction.csrf.as_bytes())) {
            return Err(Box::new(
                self.error_page(StatusCode::FORBIDDEN, self.text.expired),
            ));
        }
        Ok(interaction)
    }

    async fn submit(
        &self,
        tenant: &str,
        form: HashMap<String, String>,
        peer: SocketAddr,
        headers: &HeaderMap,
    ) -> Response {
        let mut interaction =
            match self.checked(tenant, headers, form.get("csrf").map(String::as_str)) {
                Ok(interaction) => interaction,
                Err(response) => return *response,
            };
        let metadata = metadata(peer, headers);
        let field = |name: &str| form.get(name).cloned().unwrap_or_default();
        let action = field("action");
        let result = match (action.as_str(), interaction.flow) {
            ("cancel", flow) => {
                if let Some(flow) = flow {
                    let _ = self
                        .command(&interaction, flow, Command::Cancel, &metadata)
                        .await;
                }
                return self.back_with_error(
                    &interaction.request,
                    "access_denied",
                    "the person cancelled the sign-in",
                );
            }
            ("restart" | "show_sign_in" | "show_sign_up" | "show_reset", flow) => {
                if let Some(flow) = flow {
                    let _ = self
                        .command(&interaction, flow, Command::Cancel, &metadata)
                        .await;
                }
                interaction.flow = None;
                interaction.screen = match action.as_str() {
                    "show_sign_up" => Screen::SignUp,
                    "show_reset" => Screen::ResetStart,
                    _ => Screen::SignIn,
                };
                if action == "restart" {
                    interaction.email = None;
                }
                return self.render(&interaction, None, None, &metadata).await;
            }
            ("sign_up", None) => {
                return self
                    .sign_up(interaction, &form, peer, headers, &metadata)
                    .await;
            }
            ("verify_email", None) => {
                return self
                    .verify_email(interaction, &field("code"), peer, headers, &metadata)
                    .await;
            }
            ("reset_start", None) => {
                return self
                    .reset_start(interaction, &field("email"), peer, headers, &metadata)
                    .await;
            }
            ("reset_complete", None) => {
                return self
                    .reset_complete(interaction, &form, peer, headers, &metadata)
                    .await;
            }
            ("start_password" | "start_email_code", _) => {
                let method = if action == "start_password" {
                    Primary::Password
                } else {
                    Primary::EmailOtp
                };
                interaction.email = Some(field("email").trim().chars().take(MAX_EMAIL).collect());
                let password = (method == Primary::Password).then(|| field("password"));
                self.start(&mut interaction, method, password, &metadata)
                    .await
            }
            (_, None) => return self.render(&interaction, None, None, &metadata).await,
            (action, Some(flow)) => {
                let command = match action {
                    "password" => Command::Password(field("password")),
                    "email_code" => Command::EmailCode(field("code")),
                    "select_mfa" => match field("method").as_str() {
                        "totp" => Command::SelectMfa(MfaMethod::Totp),
                        "email_otp" => Command::SelectMfa(MfaMethod::EmailOtp),
                        "sms_otp" => Command::SelectMfa(MfaMethod::SmsOtp),
                        "recovery_code" => Command::SelectMfa(MfaMethod::RecoveryCode),
                        _ => Command::Get,
                    },
                    "mfa_code" => Command::MfaCode(field("code")),
                    "phone_number" => Command::PhoneNumber(field("phone")),
                    "phone_code" => Command::PhoneCode(field("code")),
                    "new_password" => Command::NewPassword(field("password")),
                    "totp_registration" => Command::TotpRegistrationCode(field("code")),
                    _ => Command::Get,
                };
                let choose = action == "choose_mfa";
                match self.command(&interaction, flow, command, &metadata).await {
                    Ok(mut reply) if choose && reply.flow.step == Step::MfaCode => {
                        // Back to the list of methods: only the page changes.
                        reply.flow.step = Step::SelectMfaMethod;
                        Ok(reply)
                    }
                    Ok(reply) => Ok(reply),
                    Err(error) => Err((error, self.current(&interaction, flow, &metadata).await)),
                }
            }
        };
        self.answer(&interaction, result, &metadata).await
    }

    /// The flow as it is now (after a refused command).
    async fn current(
        &self,
        interaction: &Interaction,
        flow: Uuid,
        metadata: &Metadata,
    ) -> Option<Reply> {
        self.command(interaction, flow, Command::Get, metadata)
            .await
            .ok()
    }

    /// Starts a flow for the interaction's email (and submits the password when given).
    async fn start(
        &self,
        interaction: &mut Interaction,
        method: Primary,
        password: Option<String>,
        metadata: &Metadata,
    ) -> Result<Reply, (ApiError, Option<Reply>)> {
        let flow = Uuid::now_v7();
        let start = Command::Start {
            client_id: interaction.request.client_id.clone(),
            email: interaction.email.clone().unwrap_or_default(),
            method,
        };
        let reply = self
            .command(interaction, flow, start, metadata)
            .await
            .map_err(|e| (e, None))?;
        interaction.flow = Some(flow);
        interaction.screen = Screen::SignIn;
        match password {
            Some(password) if reply.flow.step == Step::Password => self
                .command(interaction, flow, Command::Password(password), metadata)
                .await
                .map_err(|e| (e, Some(reply))),
            _ => Ok(reply),
        }
    }

    /// The page after a command: the next step, the same one with the error, or back to
    /// the app when the flow has ended.
    async fn answer(
        &self,
        interaction: &Interaction,
        result: Result<Reply, (ApiError, Option<Reply>)>,
        metadata: &Metadata,
    ) -> Response {
        match result {
            Ok(reply) => self.after(interaction, reply, metadata).await,
            Err((error, current)) => {
                if let Some(current) = current.as_ref().filter(|c| c.flow.outcome.is_some()) {
                    return self.after(interaction, current.clone(), metadata).await;
                }
                let message = self.message_of(&error);
                self.render(interaction, current.as_ref(), Some(&message), metadata)
                    .await
            }
        }
    }

    /// A tonic request for the directory's self-service RPCs, from the browser's address.
    fn grpc_request<T>(message: T, peer: SocketAddr, headers: &HeaderMap) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request
            .extensions_mut()
            .insert(tonic::transport::server::TcpConnectInfo {
                local_addr: None,
                remote_addr: Some(peer),
            });
        for name in [
            header::USER_AGENT.as_str(),
            "x-forwarded-for",
            CORRELATION_HEADER,
        ] {
            if let Some(value) = headers.get(name).and_then(|v| v.to_str().ok())
                && let Ok(value) = value.parse()
            {
                request.metadata_mut().insert(name, value);
            }
        }
        request
    }

    /// Sign-up (UserService.SignUp): the code goes to the email, the next page asks for it.
    async fn sign_up(
        &self,
        mut interaction: Interaction,
        form: &HashMap<String, String>,
        peer: SocketAddr,
        headers: &HeaderMap,
        metadata: &Metadata,
    ) -> Response {
        let email = form
            .get("email")
            .cloned()
            .unwrap_or_default()
            .trim()
            .to_string();
        let attributes = form
            .iter()
            .filter_map(|(name, value)| {
                let name = name.strip_prefix("attribute_")?;
                (!value.trim().is_empty()).then(|| (name.to_string(), value.trim().to_string()))
            })
            .collect();
        interaction.email = Some(email.chars().take(MAX_EMAIL).collect());
        interaction.screen = Screen::SignUp;
        let request = Self::grpc_request(
            pb::SignUpRequest {
                tenant_id: interaction.request.tenant_id.to_string(),
                client_id: interaction.request.client_id.clone(),
                email,
                password: form.get("password").cloned().unwrap_or_default(),
                attributes,
            },
            peer,
            headers,
        );
        match UserService::sign_up(self.users.as_ref(), request).await {
            Ok(response) => {
                match Uuid::try_parse(&response.get_ref().user_id) {
                    Ok(user_id) => interaction.screen = Screen::VerifyEmail { user_id },
                    Err(_) => {
                        return self
                            .error_page(StatusCode::INTERNAL_SERVER_ERROR, self.text.went_wrong);
                    }
                }
                self.render(&interaction, None, None, metadata).await
            }
            Err(status) => {
                let message = self.status_message(&status);
                self.render(&interaction, None, Some(&message), metadata)
                    .await
            }
        }
    }

    /// The emailed code of a sign-up; right, the sign-in continues with the password.
    async fn verify_email(
        &self,
        interaction: Interaction,
        code: &str,
        peer: SocketAddr,
        headers: &HeaderMap,
        metadata: &Metadata,
    ) -> Response {
        let Screen::VerifyEmail { user_id } = interaction.screen else {
            return self.render(&interaction, None, None, metadata).await;
        };
        let request = Self::grpc_request(
            pb::VerifyEmailRequest {
                tenant_id: interaction.request.tenant_id.to_string(),
                user_id: user_id.to_string(),
                code: code.to_string(),
            },
            peer,
            headers,
        );
        if let Err(status) = UserService::verify_email(self.users.as_ref(), request).await {
            let message = self.status_message(&status);
            return self
                .render(&interaction, None, Some(&message), metadata)
                .await;
        }
        // Verified: a sign-in for the new account (the password is asked again: it is never
        // kept between pages).
        self.sign_in_with_note(interaction, self.text.email_verified, metadata)
            .await
    }

    /// Starts a password sign-in for the interaction's email and asks for the password, with
    /// a note (the email was verified, the password changed).
    async fn sign_in_with_note(
        &self,
        mut interaction: Interaction,
        note: &str,
        metadata: &Metadata,
    ) -> Response {
        let started = self
            .start(&mut interaction, Primary::Password, None, metadata)
            .await;
        match started {
            Ok(reply) if reply.flow.step == Step::Password => {
                let tenant_id = interaction.request.tenant_id;
                let email = interaction.email.clone().unwrap_or_default();
                let body = pages::step(
                    self.text,
                    &Page::Password {
                        email: &email,
                        note: Some(note),
                    },
                    &format!("/tenants/{tenant_id}/interaction"),
                    &interaction.csrf,
                    None,
                );
                let mut response = html(
                    StatusCode::OK,
                    body,
                    &origin_of(&interaction.request.redirect_uri),
                );
                self.keep(&mut response, &interaction);
                response
            }
            other => self.answer(&interaction, other, metadata).await,
        }
    }

    /// Forgotten password: a code to the email (UserService.StartPasswordReset, which
    /// answers the same whether or not the email has an account).
    async fn reset_start(
        &self,
        mut interaction: Interaction,
        email: &str,
        peer: SocketAddr,
        headers: &HeaderMap,
        metadata: &Metadata,
    ) -> Response {
        interaction.email = Some(email.trim().chars().take(MAX_EMAIL).collect());
        let request = Self::grpc_request(
            pb::StartPasswordResetRequest {
                tenant_id: interaction.request.tenant_id.to_string(),
                email: email.trim().to_string(),
            },
            peer,
            headers,
        );
        match UserService::start_password_reset(self.users.as_ref(), request).await {
            Ok(_) => {
                interaction.screen = Screen::ResetComplete;
                self.render(&interaction, None, None, metadata).await
            }
            Err(status) => {
                let message = self.status_message(&status);
                self.render(&interaction, None, Some(&message), metadata)
                    .await
            }
        }
    }

    /// The reset code and the new password; then a sign-in with it.
    async fn reset_complete(
        &self,
        interaction: Interaction,
        form: &HashMap<String, String>,
        peer: SocketAddr,
        headers: &HeaderMap,
        metadata: &Metadata,
    ) -> Response {
        if !matches!(interaction.screen, Screen::ResetComplete) {
            return self.render(&interaction, None, None, metadata).await;
        }
        let field = |name: &str| form.get(name).cloned().unwrap_or_default();
        let request = Self::grpc_request(
            pb::CompletePasswordResetRequest {
                tenant_id: interaction.request.tenant_id.to_string(),
                email: interaction.email.clone().unwrap_or_default(),
                code: field("code"),
                new_password: field("password"),
            },
            peer,
            headers,
        );
        match UserService::complete_password_reset(self.users.as_ref(), request).await {
            Ok(_) => {
                self.sign_in_with_note(interaction, self.text.password_reset, metadata)
                    .await
            }
            Err(status) => {
                let message = self.status_message(&status);
                self.render(&interaction, None, Some(&message), metadata)
                    .await
            }
        }
    }

    fn status_message(&self, status: &tonic::Status) -> String {
        match status.code() {
            tonic::Code::InvalidArgument => {
                let details = tonic_types::StatusExt::get_details_bad_request(status);
                match details {
                    Some(bad) if !bad.field_violations.is_empty() => {
                        self.message_of(&ApiError::InvalidArgument(
                            bad.field_violations
                                .into_iter()
                                .map(|v| {
                                    gatehouse_core::error::FieldViolation::new(
                                        v.field,
                                        v.description,
                                    )
                                })
                                .collect(),
                        ))
                    }
                    _ => self.text.went_wrong.to_string(),
                }
            }
            tonic::Code::Internal | tonic::Code::Unknown => self.text.went_wrong.to_string(),
            _ => self.message_of(&ApiError::FailedPrecondition(status.message().to_string())),
        }
    }

    /// After a command: the next page, or back to the app when the flow has ended.
    async fn after(
        &self,
        interaction: &Interaction,
        reply: Reply,
        metadata: &Metadata,
    ) -> Response {
        // Only the command that completed the flow carries its tokens. A flow that had ended
        // before this request (a second submit of the last form, a replayed cookie) gets a
        // code like a browser session's, without a new refresh token, so that the first
        // code's stays the session's only one.
        let completed_now = reply.tokens.is_some();
        match &reply.flow.outcome {
            None => self.render(interaction, Some(&reply), None, metadata).await,
            Some(Outcome::Completed(session_id)) => {
                self.complete(&interaction.request, *session_id, completed_now, metadata)
                    .await
            }
            Some(Outcome::Failed(reason)) => {
                self.back_with_error(&interaction.request, "access_denied", reason_text(reason))
            }
            Some(Outcome::Expired) => {
                self.back_with_error(&interaction.request, "access_denied", "the sign-in expired")
            }
            Some(Outcome::Cancelled) => self.back_with_error(
                &interaction.request,
                "access_denied",
                "the sign-in was cancelled",
            ),
        }
    }

    /// A provider's button: a flow that starts with federation, then off to the provider.
    async fn federation_start(
        &self,
        tenant: &str,
        query: &HashMap<String, String>,
        peer: SocketAddr,
        headers: &HeaderMap,
    ) -> Response {
        let mut interaction =
            match self.checked(tenant, headers, query.get("csrf").map(String::as_str)) {
                Ok(interaction) => interaction,
                Err(response) => return *response,
            };
        let metadata = metadata(peer, headers);
        let Some(provider_id) = query.get("provider").and_then(|p| Uuid::try_parse(p).ok()) else {
            return self.error_page(StatusCode::BAD_REQUEST, self.text.went_wrong);
        };
        let started = match self
            .start(&mut interaction, Primary::Federated, None, &metadata)
            .await
        {
            Ok(reply) => reply,
            Err(result) => return self.answer(&interaction, Err(result), &metadata).await,
        };
        let callback =
            engine::federation_callback(&self.oidc.issuer(interaction.request.tenant_id));
        let command = Command::StartFederation {
            provider_id,
            redirect_uri: callback,
        };
        match self
            .command(&interaction, started.id, command, &metadata)
            .await
        {
            Ok(reply) => match &reply.authorization_url {
                Some(url) => {
                    let mut response = redirect(url, "");
                    self.keep(&mut response, &interaction);
                    response
                }
                None => self.error_page(StatusCode::INTERNAL_SERVER_ERROR, self.text.went_wrong),
            },
            Err(error) => {
                let current = self.current(&interaction, started.id, &metadata).await;
                self.answer(&interaction, Err((error, current)), &metadata)
                    .await
            }
        }
    }

    /// The provider sends the person back here: the flow checks its answer.
    async fn federation_callback(
        &self,
        tenant: &str,
        raw_query: &str,
        peer: SocketAddr,
        headers: &HeaderMap,
    ) -> Response {
        let Some(tenant_id) = tenant_of(tenant) else {
            return self.error_page(StatusCode::NOT_FOUND, self.text.went_wrong);
        };
        // No CSRF token here (the provider sends the person): the flow's own state, nonce
        // and PKCE bind the answer to this sign-in.
        let Some(interaction) = self.interaction_of(tenant_id, headers) else {
            return self.error_page(StatusCode::BAD_REQUEST, self.text.expired);
        };
        let Some(flow) = interaction.flow else {
            return self.error_page(StatusCode::BAD_REQUEST, self.text.expired);
        };
        let metadata = metadata(peer, headers);
        let command = Command::CompleteFederation(raw_query.to_string());
        let result = match self.command(&interaction, flow, command, &metadata).await {
            Ok(reply) => Ok(reply),
            Err(error) => Err((error, self.current(&interaction, flow, &metadata).await)),
        };
        self.answer(&interaction, result, &metadata).await
    }

    fn message_of(&self, error: &ApiError) -> String {
        match error {
            ApiError::InvalidArgument(violations) => violations
                .iter()
                .map(|v| {
                    let mut text = format!("{} {}", v.field.replace('_', " "), v.description);
                    if let Some(first) = text.get(..1) {
                        text.replace_range(..1, &first.to_uppercase());
                    }
                    text.push('.');
                    text
                })
                .collect::<Vec<_>>()
                .join(" "),
            ApiError::CredentialRefused(m)
            | ApiError::TooManyAttempts(m)
            | ApiError::FailedPrecondition(m)
            | ApiError::Unavailable(m) => {
                let mut text = m.clone();
                if let Some(first) = text.get(..1) {
                    text.replace_range(..1, &first.to_uppercase());
                }
                text.push('.');
                text
            }
            _ => self.text.went_wrong.to_string(),
        }
    }
}

async fn federation_start(
    State(hosted): State<Arc<Hosted>>,
    Path(tenant): Path<String>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let query = parse_form(query.unwrap_or_default().as_bytes());
    hosted
        .federation_start(&tenant, &query, peer, &headers)
        .await
}

async fn federation_return(
    State(hosted): State<Arc<Hosted>>,
    Path(tenant): Path<String>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    hosted
        .federation_callback(&tenant, &query.unwrap_or_default(), peer, &headers)
        .await
}

async fn authorize_get(
    State(hosted): State<Arc<Hosted>>,
    Path(tenant): Path<String>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    query: Result<Query<AuthorizeParams>, QueryRejection>,
) -> Response {
    let Ok(Query(params)) = query else {
        return hosted.error_page(StatusCode::BAD_REQUEST, hosted.text.went_wrong);
    };
    hosted.authorize(&tenant, params, peer, &headers).await
}

/// Parses an `application/x-www-form-urlencoded` body (a repeated field keeps its first
/// value: OAuth forbids repeats, and the first is what every check saw).
fn parse_form(body: &[u8]) -> HashMap<String, String> {
    let mut form = HashMap::new();
    for (name, value) in url::form_urlencoded::parse(body) {
        form.entry(name.into_owned())
            .or_insert_with(|| value.into_owned());
    }
    form
}

/// A parsed form as one of the endpoints' parameter structs (each field an optional string
/// named as in the form; unknown fields ignored).
fn form_as<T: serde::de::DeserializeOwned>(form: &HashMap<String, String>) -> Option<T> {
    serde_json::to_value(form)
        .ok()
        .and_then(|value| serde_json::from_value(value).ok())
}

fn form_body(headers: &HeaderMap, body: &[u8]) -> Option<HashMap<String, String>> {
    let form_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    (form_type && body.len() <= MAX_FORM).then(|| parse_form(body))
}

async fn authorize_post(
    State(hosted): State<Arc<Hosted>>,
    Path(tenant): Path<String>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Some(form) = form_body(&headers, &body) else {
        return hosted.error_page(StatusCode::BAD_REQUEST, hosted.text.went_wrong);
    };
    let Some(params) = form_as::<AuthorizeParams>(&form) else {
        return hosted.error_page(StatusCode::BAD_REQUEST, hosted.text.went_wrong);
    };
    hosted.authorize(&tenant, params, peer, &headers).await
}

async fn interaction(
    State(hosted): State<Arc<Hosted>>,
    Path(tenant): Path<String>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Some(form) = form_body(&headers, &body) else {
        return hosted.error_page(StatusCode::BAD_REQUEST, hosted.text.went_wrong);
    };
    hosted.submit(&tenant, form, peer, &headers).await
}

fn oauth_json(status: StatusCode, value: serde_json::Value) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
            (header::PRAGMA, "no-cache"),
        ],
        value.to_string(),
    )
        .into_response()
}

fn oauth_error(error: OAuthError) -> Response {
    let status = StatusCode::from_u16(error.status).unwrap_or(StatusCode::BAD_REQUEST);
    let mut response = oauth_json(
        status,
        serde_json::json!({ "error": error.error, "error_description": error.description }),
    );
    if status == StatusCode::UNAUTHORIZED {
        let challenge = if error.error == "invalid_token" {
            "Bearer error=\"invalid_token\"".to_string()
        } else if error.basic {
            "Basic realm=\"gatehouse\"".to_string()
        } else {
            String::new()
        };
        if let Ok(value) = HeaderValue::from_str(&challenge)
            && !challenge.is_empty()
        {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, value);
        }
    }
    response
}

/// `Authorization: Basic` with form-encoded id and secret (RFC 6749 §2.3.1).
fn basic_credentials(headers: &HeaderMap) -> Result<Option<(String, String)>, OAuthError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let malformed = || OAuthError {
        status: 401,
        error: "invalid_client",
        description: "malformed Basic credentials".into(),
        basic: true,
    };
    let value = value.to_str().map_err(|_| malformed())?;
    let Some(encoded) = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))
    else {
        return Ok(None);
    };
    let decoded = STANDARD.decode(encoded.trim()).map_err(|_| malformed())?;
    let decoded = String::from_utf8(decoded).map_err(|_| malformed())?;
    let (id, secret) = decoded.split_once(':').ok_or_else(malformed)?;
    let decode = |part: &str| {
        url::form_urlencoded::parse(part.as_bytes())
            .next()
            .map(|(name, _)| name.into_owned())
            .unwrap_or_default()
    };
    Ok(Some((decode(id), decode(secret))))
}

/// A client's request to the token or revocation endpoint: the tenant, the form and how the
/// client authenticated; or the error answer.
fn client_request(
    tenant: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(Uuid, HashMap<String, String>, ClientCredentials), Box<Response>> {
    let Some(tenant_id) = tenant_of(tenant) else {
        return Err(Box::new(StatusCode::NOT_FOUND.into_response()));
    };
    let Some(form) = form_body(headers, body) else {
        return Err(Box::new(oauth_error(OAuthError {
            status: 400,
            error: "invalid_request",
            description: "the body must be application/x-www-form-urlencoded".into(),
            basic: false,
        })));
    };
    let basic = basic_credentials(headers).map_err(|error| Box::new(oauth_error(error)))?;
    let credentials = ClientCredentials {
        basic,
        client_id: form.get("client_id").cloned(),
        client_secret: form.get("client_secret").cloned(),
    };
    Ok((tenant_id, form, credentials))
}

async fn token(
    State(hosted): State<Arc<Hosted>>,
    Path(tenant): Path<String>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let (tenant_id, form, credentials) = match client_request(&tenant, &headers, &body) {
        Ok(request) => request,
        Err(response) => return *response,
    };
    let Some(token_form) = form_as::<TokenForm>(&form) else {
        return oauth_error(OAuthError {
            status: 400,
            error: "invalid_request",
            description: "the form could not be read".into(),
            basic: false,
        });
    };
    let metadata = metadata(peer, &headers);
    match hosted
        .oidc
        .token(tenant_id, credentials, token_form, &metadata)
        .await
    {
        Ok(answer) => oauth_json(StatusCode::OK, answer),
        Err(error) => oauth_error(error),
    }
}

async fn userinfo(
    State(hosted): State<Arc<Hosted>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(tenant_id) = tenant_of(&tenant) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let Some(token) = token else {
        let mut response = StatusCode::UNAUTHORIZED.into_response();
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    };
    match hosted.oidc.userinfo(tenant_id, token).await {
        Ok(claims) => oauth_json(StatusCode::OK, claims),
        Err(error) => oauth_error(error),
    }
}

async fn revoke(
    State(hosted): State<Arc<Hosted>>,
    Path(tenant): Path<String>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let (tenant_id, form, credentials) = match client_request(&tenant, &headers, &body) {
        Ok(request) => request,
        Err(response) => return *response,
    };
    let metadata = metadata(peer, &headers);
    match hosted
        .oidc
        .revoke(
            tenant_id,
            credentials,
            form.get("token").cloned(),
            &metadata,
        )
        .await
    {
        Ok(()) => StatusCode::OK.into_response(),
        Err(error) => oauth_error(error),
    }
}

async fn logout(
    State(hosted): State<Arc<Hosted>>,
    Path(tenant): Path<String>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    query: Result<Query<LogoutParams>, QueryRejection>,
) -> Response {
    let Ok(Query(params)) = query else {
        return hosted.error_page(StatusCode::BAD_REQUEST, hosted.text.went_wrong);
    };
    hosted.logout(&tenant, params, peer, &headers).await
}

/// RP-initiated logout by form POST (the specification allows both).
async fn logout_post(
    State(hosted): State<Arc<Hosted>>,
    Path(tenant): Path<String>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Some(form) = form_body(&headers, &body) else {
        return hosted.error_page(StatusCode::BAD_REQUEST, hosted.text.went_wrong);
    };
    let Some(params) = form_as::<LogoutParams>(&form) else {
        return hosted.error_page(StatusCode::BAD_REQUEST, hosted.text.went_wrong);
    };
    hosted.logout(&tenant, params, peer, &headers).await
}

impl Hosted {
    async fn logout(
        &self,
        tenant: &str,
        params: LogoutParams,
        peer: SocketAddr,
        headers: &HeaderMap,
    ) -> Response {
        let Some(tenant_id) = tenant_of(tenant) else {
            return self.error_page(StatusCode::NOT_FOUND, self.text.went_wrong);
        };
        let browser = self.browser_of(tenant_id, headers);
        let metadata = metadata(peer, headers);
        let mut response = match self
            .oidc
            .logout(tenant_id, &params, browser.as_ref(), &metadata)
            .await
        {
            Ok(Some(location)) => redirect(&location, ""),
            Ok(None) => html(
                StatusCode::OK,
                pages::message(self.text, self.text.signed_out_title, self.text.signed_out),
                "",
            ),
            Err(message) => self.error_page(StatusCode::BAD_REQUEST, &message),
        };
        // The browser's session cookie goes in every case (its session ended first).
        self.set_cookie(&mut response, tenant_id, SESSION_COOKIE, "", Some(0));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_by_exact_name() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("xgh_session=evil; gh_session=good; other=1"),
        );
        assert_eq!(cookie(&headers, SESSION_COOKIE), Some("good"));
        assert_eq!(cookie(&headers, INTERACTION_COOKIE), None);
    }

    #[test]
    fn basic_credentials_are_form_decoded() -> Result<(), String> {
        let mut headers = HeaderMap::new();
        let encoded = STANDARD.encode("my%20app:s%3Acret+x");
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {encoded}")).map_err(|e| e.to_string())?,
        );
        let parsed = basic_credentials(&headers).map_err(|e| e.description)?;
        assert_eq!(parsed, Some(("my app".to_string(), "s:cret x".to_string())));
        Ok(())
    }

    #[test]
    fn a_repeated_form_field_keeps_its_first_value() {
        let form = parse_form(b"code=first&code=second&x=%20y");
        assert_eq!(form.get("code").map(String::as_str), Some("first"));
        assert_eq!(form.get("x").map(String::as_str), Some(" y"));
    }

    #[test]
    fn form_action_names_the_redirect_uris_origin() {
        assert_eq!(
            origin_of("https://app.example:8443/cb?x=1"),
            " https://app.example:8443"
        );
        assert_eq!(origin_of("not a uri"), "");
    }
}
