//! The steps of a sign-in: what each command decides, given the flow's state.
//!
//! [`Engine::handle`] runs one command against a loaded flow and appends what it decided, in
//! one atomic append that may touch the flow, the user (a spent TOTP step or recovery code, a
//! notification), the lockout stream and the new session. Every append expects the exact
//! versions it decided from, so two processes racing on one flow, or two codes racing on one
//! user, cannot both win. The actor ([`crate::actor`]) serialises commands within a process.
//!
//! After the primary method, [`Engine::after_primary`] runs the pipeline: risk hook →
//! policy hook → required controls → completion. Later issues replace the two hooks (risk
//! detections, Conditional Access) without touching the steps around them.

use crate::directory::Directory;
use crate::federation::{Federation, Secrets};
use crate::flow::{
    Challenge, Control, FLOW_LIFETIME, FlowPolicy, MAX_CHALLENGES, MAX_WRONG_CODES, PolicyRecord,
    Primary, SignIn, SignInEvent, Step,
};
use crate::otp;
use crate::session::{Session, SessionEvent, capped, new_refresh_token};
use crate::tokens::Keys;
use chrono::{DateTime, Duration, Utc};
use gatehouse_core::ApiError;
use gatehouse_core::crypto::Crypto;
use gatehouse_core::error::Validation;
use gatehouse_core::geo::Geo;
use gatehouse_core::net::network_of;
use gatehouse_core::passwords::Passwords;
use gatehouse_directory::contact::{normalize_email, validate_phone};
use gatehouse_directory::identity_provider::{IdentityProvider, ProviderConfig};
use gatehouse_directory::lockout::{Locked, Lockout, LockoutEvent};
use gatehouse_directory::tenant::{MfaMethod, PrimaryMethod, TenantSettings};
use gatehouse_directory::user::{
    CODE_LIFETIME, Channel, EMAIL_CLAIM, IDENTITY_CLAIM, Message, Profile, Status, User, UserEvent,
    identity_key,
};
use gatehouse_directory::user_service::check_new_password;
use gatehouse_events::{
    Aggregate, AppendRequest, ClaimKey, DomainEvent, EventStore, ExpectedVersion, Loaded, Metadata,
    StoreError,
};
use gatehouse_policy::PolicyView;
use gatehouse_policy::engine::{Context, Outcome, PrimaryKind};
use gatehouse_policy::model::{Controls, Platform, RiskLevel};
use gatehouse_risk::user_risk::{UserRisk, UserRiskEvent};
use gatehouse_risk::view::RiskView;
use gatehouse_risk::{Detection, Properties, RealtimeRisk};
use rand::Rng;
use serde_json::json;
use std::net::IpAddr;
use std::sync::Arc;
use uuid::Uuid;

/// Longest password accepted at sign-in.
pub const MAX_PASSWORD: usize = 256;
/// Purpose strings mixed into code digests.
const FLOW_CODE: &str = "signin_code";
const RECOVERY: &str = "recovery_code";

/// What the caller asks of a flow.
#[derive(Debug, Clone)]
pub enum Command {
    /// Begin.
    Start {
        /// App client id.
        client_id: String,
        /// Typed email.
        email: String,
        /// Primary method.
        method: Primary,
    },
    /// The password.
    Password(String),
    /// The emailed code (passwordless).
    EmailCode(String),
    /// Choose a second factor (again: resend).
    SelectMfa(MfaMethod),
    /// A second-factor code.
    MfaCode(String),
    /// A phone number to register.
    PhoneNumber(String),
    /// Its code.
    PhoneCode(String),
    /// A new password (a policy asks for a change).
    NewPassword(String),
    /// The authenticator app to register: its secret, URI and QR code (the flow's own secret,
    /// made on the first ask).
    TotpRegistration,
    /// The registered app's first code.
    TotpRegistrationCode(String),
    /// Sign in with an identity provider of the tenant.
    StartFederation {
        /// The provider.
        provider_id: Uuid,
        /// One of the app's redirect URIs.
        redirect_uri: String,
    },
    /// The provider's answer: the redirect's query string.
    CompleteFederation(String),
    /// Read.
    Get,
    /// Give up.
    Cancel,
    /// The deadline timer fired.
    Expire,
}

/// Who may act on a flow: unauthenticated callers name the tenant and the app.
#[derive(Debug, Clone)]
pub struct Scope {
    /// Tenant.
    pub tenant_id: Uuid,
    /// App client id (`None`: the system, e.g. the deadline timer).
    pub client_id: Option<String>,
}

/// Tokens of a completed sign-in or a refresh.
#[derive(Debug, Clone)]
pub struct Tokens {
    /// JWT.
    pub access_token: String,
    /// JWT.
    pub id_token: String,
    /// Opaque.
    pub refresh_token: String,
    /// Seconds.
    pub expires_in: u32,
}

/// The answer to a command.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The flow id.
    pub id: Uuid,
    /// The flow after the command.
    pub flow: SignIn,
    /// Set when this command completed the flow.
    pub tokens: Option<Tokens>,
    /// Set by StartFederation: where to send the person.
    pub authorization_url: Option<String>,
    /// Set by TotpRegistration: the authenticator app to register.
    pub totp: Option<TotpEnrollment>,
}

/// An authenticator app to register.
#[derive(Debug, Clone)]
pub struct TotpEnrollment {
    /// Base32 secret.
    pub secret: String,
    /// `otpauth://` URI.
    pub otpauth_uri: String,
    /// The URI as a QR code (PNG).
    pub qr_png: Vec<u8>,
}

/// Decides sign-in steps.
pub struct Engine {
    store: Arc<dyn EventStore>,
    crypto: Arc<Crypto>,
    passwords: Passwords,
    keys: Arc<Keys>,
    directory: Arc<Directory>,
    policies: Arc<PolicyView>,
    geo: Arc<Geo>,
    risk: Arc<RealtimeRisk>,
    user_risk: Option<Arc<RiskView>>,
    federation: Option<Arc<Federation>>,
    flow_lifetime: Duration,
}

/// What one command appends, built up stream by stream.
struct Batch {
    request: AppendRequest,
    tenant_id: Uuid,
    flow_events: Vec<SignInEvent>,
    flow_stream: gatehouse_events::StreamId,
    recorded_at: DateTime<Utc>,
    /// Risk the step itself saw (a leaked password), added to the risk hook's.
    detections: Vec<Detection>,
}

impl Batch {
    fn new(flow: &Loaded<SignIn>, tenant_id: Uuid, metadata: &Metadata) -> Self {
        let recorded_at = Utc::now();
        let mut request = AppendRequest::new(metadata.clone());
        request.expect(&flow.stream, flow.expected());
        request.recorded_at(recorded_at);
        Batch {
            request,
            tenant_id,
            flow_events: Vec::new(),
            flow_stream: flow.stream.clone(),
            recorded_at,
            detections: Vec::new(),
        }
    }

    fn flow(&mut self, event: SignInEvent) -> Result<(), ApiError> {
        self.request
            .push(event.to_new_event(self.tenant_id, &self.flow_stream)?);
        self.flow_events.push(event);
        Ok(())
    }

    /// The flow as it will be once this batch is appended.
    fn preview(&self, flow: &Loaded<SignIn>) -> SignIn {
        let mut state = flow.state.clone();
        let envelope = gatehouse_events::RecordedEvent::pending(
            self.tenant_id,
            self.flow_stream.clone(),
            self.recorded_at,
        );
        for event in &self.flow_events {
            state.apply(event.clone(), &envelope);
        }
        state
    }

    fn claim(&mut self, owner: &gatehouse_events::StreamId, key: ClaimKey) {
        self.request.claim(owner, key);
    }

    fn other<E: DomainEvent>(
        &mut self,
        stream: &gatehouse_events::StreamId,
        expected: Option<ExpectedVersion>,
        event: &E,
    ) -> Result<(), ApiError> {
        if let Some(expected) = expected {
            self.request.expect(stream, expected);
        }
        self.request
            .push(event.to_new_event(self.tenant_id, stream)?);
        Ok(())
    }
}

/// The provider vouched for the person, whose account is `user_id`: the primary method is done.
fn vouched(
    batch: &mut Batch,
    provider_id: Uuid,
    kind: String,
    user_id: Uuid,
    signed_up: bool,
) -> Result<(), ApiError> {
    batch.flow(SignInEvent::FederationSucceeded {
        provider_id,
        kind,
        user_id,
        signed_up,
    })?;
    batch.flow(SignInEvent::PrimaryVerified {
        method: "fed".into(),
    })
}

/// A second factor passed: when it is one the user had before this flow and the sign-in's
/// risk was above none, that risk is remediated (SPEC §6), on the flow and in the user's risk.
fn mfa_passed(
    batch: &mut Batch,
    flow: &SignIn,
    user_id: Uuid,
    method: MfaMethod,
    registered_before: bool,
) -> Result<(), ApiError> {
    batch.flow(SignInEvent::MfaVerified { method })?;
    if registered_before && flow.risk > RiskLevel::None && !flow.risk_remediated {
        batch.flow(SignInEvent::SignInRiskRemediated)?;
        let sign_in_id = batch.flow_stream.id;
        batch.other(
            &UserRisk::stream(user_id),
            None,
            &UserRiskEvent::SignInRemediated { sign_in_id },
        )?;
    }
    Ok(())
}

/// A six-digit code.
fn new_code() -> String {
    format!("{:06}", rand::rng().random_range(0..1_000_000u32))
}

/// The location an IP counts as for smart lockout: its /24 (IPv4) or /48 (IPv6).
fn location_of(ip: Option<&str>) -> Option<String> {
    Some(network_of(ip?.parse::<IpAddr>().ok()?))
}

fn wrong_step(flow: &SignIn) -> ApiError {
    let waiting = match flow.step {
        Step::None => "to be started",
        Step::Password => "for the password",
        Step::EmailCode => "for the emailed code",
        Step::SelectMfaMethod => "for a second-factor method",
        Step::MfaCode => "for a second-factor code",
        Step::PhoneNumber => "for a phone number",
        Step::PhoneCode => "for the code sent to the phone",
        Step::NewPassword => "for a new password",
        Step::TotpRegistration => "for the first code of an authenticator app",
        Step::Federation => "for an identity provider to be chosen",
        Step::FederationCallback => "for the identity provider's answer",
        Step::LinkAccount => "for proof of the existing account",
        Step::Done => return ApiError::FailedPrecondition("this sign-in has ended".into()),
    };
    ApiError::FailedPrecondition(format!("this sign-in is waiting {waiting}"))
}

fn wrong_credentials() -> ApiError {
    ApiError::CredentialRefused("the email or password is incorrect".into())
}

fn wrong_code() -> ApiError {
    ApiError::invalid("code", "is invalid or has expired")
}

impl Engine {
    /// An engine over the store.
    pub fn new(
        store: Arc<dyn EventStore>,
        crypto: Arc<Crypto>,
        passwords: Passwords,
        keys: Arc<Keys>,
        directory: Arc<Directory>,
        policies: Arc<PolicyView>,
    ) -> Self {
        Engine {
            store,
            crypto,
            passwords,
            keys,
            directory,
            policies,
            geo: Arc::new(Geo::none()),
            risk: Arc::new(RealtimeRisk::none()),
            user_risk: None,
            federation: None,
            flow_lifetime: FLOW_LIFETIME,
        }
    }

    /// Flows started from now on end after `lifetime` (default [`FLOW_LIFETIME`]).
    pub fn with_flow_lifetime(mut self, lifetime: Duration) -> Self {
        self.flow_lifetime = lifetime;
        self
    }

    /// Locates client IPs with `geo` (country named locations).
    pub fn with_geo(mut self, geo: Arc<Geo>) -> Self {
        self.geo = geo;
        self
    }

    /// Runs the real-time risk checks of `risk` on each sign-in.
    pub fn with_risk(mut self, risk: Arc<RealtimeRisk>) -> Self {
        self.risk = risk;
        self
    }

    /// Reads users' risk (Identity Protection) from `view`: user-risk conditions, the block
    /// of a user at high risk without a second factor, the password change an analyst's
    /// confirmed compromise asks for.
    pub fn with_user_risk(mut self, view: Arc<RiskView>) -> Self {
        self.user_risk = Some(view);
        self
    }

    /// Signs people in with the tenants' identity providers through `federation`.
    pub fn with_federation(mut self, federation: Arc<Federation>) -> Self {
        self.federation = Some(federation);
        self
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    /// Runs `command` on the flow `id` (loaded in `flow`), appending what it decides. On
    /// success `flow` is the state after the command.
    pub async fn handle(
        &self,
        id: Uuid,
        flow: &mut Loaded<SignIn>,
        command: Command,
        scope: &Scope,
        metadata: &Metadata,
    ) -> Result<Reply, ApiError> {
        let now = Utc::now();
        if let Command::Start {
            client_id,
            email,
            method,
        } = &command
        {
            if flow.version != 0 {
                return Err(ApiError::AlreadyExists("this sign-in exists".into()));
            }
            return self
                .start(
                    id,
                    flow,
                    scope.tenant_id,
                    client_id,
                    email,
                    *method,
                    metadata,
                )
                .await;
        }
        // Unauthenticated callers reach only flows of their tenant and app.
        let in_scope = flow.version > 0
            && flow.state.tenant_id == scope.tenant_id
            && scope
                .client_id
                .as_ref()
                .is_none_or(|c| *c == flow.state.client_id);
        if !in_scope {
            return Err(ApiError::NotFound("sign-in".into()));
        }
        if flow.state.is_overdue(now) {
            self.append_flow(flow, metadata, vec![SignInEvent::SignInExpired])
                .await?;
            return match command {
                Command::Get | Command::Expire => Ok(self.reply(id, flow, None)),
                _ => Err(ApiError::FailedPrecondition(
                    "this sign-in has expired; start a new one".into(),
                )),
            };
        }
        match command {
            Command::Start { .. } | Command::Get | Command::Expire => {
                Ok(self.reply(id, flow, None))
            }
            Command::Cancel => {
                if flow.state.is_open() {
                    self.append_flow(flow, metadata, vec![SignInEvent::SignInCancelled])
                        .await?;
                }
                Ok(self.reply(id, flow, None))
            }
            Command::Password(password) => self.password(id, flow, password, metadata).await,
            Command::EmailCode(code) => self.email_code(id, flow, &code, metadata).await,
            Command::SelectMfa(method) => self.select_mfa(id, flow, method, metadata).await,
            Command::MfaCode(code) => self.mfa_code(id, flow, &code, metadata).await,
            Command::PhoneNumber(phone) => self.phone_number(id, flow, &phone, metadata).await,
            Command::PhoneCode(code) => self.phone_code(id, flow, &code, metadata).await,
            Command::NewPassword(password) => self.new_password(id, flow, password, metadata).await,
            Command::TotpRegistration => self.totp_registration(id, flow, metadata).await,
            Command::TotpRegistrationCode(code) => {
                self.totp_registration_code(id, flow, &code, metadata).await
            }
            Command::StartFederation {
                provider_id,
                redirect_uri,
            } => {
                self.start_federation(id, flow, provider_id, &redirect_uri, metadata)
                    .await
            }
            Command::CompleteFederation(query) => {
                self.complete_federation(id, flow, &query, metadata).await
            }
        }
    }

    fn reply(&self, id: Uuid, flow: &Loaded<SignIn>, tokens: Option<Tokens>) -> Reply {
        Reply {
            id,
            flow: flow.state.clone(),
            tokens,
            authorization_url: None,
            totp: None,
        }
    }

    /// Appends flow-only events.
    async fn append_flow(
        &self,
        flow: &mut Loaded<SignIn>,
        metadata: &Metadata,
        events: Vec<SignInEvent>,
    ) -> Result<(), ApiError> {
        let mut batch = Batch::new(flow, flow.state.tenant_id, metadata);
        for event in events {
            batch.flow(event)?;
        }
        self.commit(flow, batch).await
    }

    /// Appends a batch and folds its flow events into `flow`.
    async fn commit(&self, flow: &mut Loaded<SignIn>, batch: Batch) -> Result<(), ApiError> {
        let Batch {
            request,
            tenant_id,
            flow_events,
            flow_stream,
            recorded_at,
            ..
        } = batch;
        let context = request.metadata().context.clone();
        let outcome = self.store.append(request).await?;
        let mut envelope =
            gatehouse_events::RecordedEvent::pending(tenant_id, flow_stream, recorded_at);
        envelope.context = context;
        for event in flow_events {
            flow.state.apply(event, &envelope);
            flow.version += 1;
        }
        debug_assert!(!outcome.events.is_empty());
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn start(
        &self,
        id: Uuid,
        flow: &mut Loaded<SignIn>,
        tenant_id: Uuid,
        client_id: &str,
        email: &str,
        method: Primary,
        metadata: &Metadata,
    ) -> Result<Reply, ApiError> {
        let email = match method {
            // The provider will say who the person is.
            Primary::Federated => String::new(),
            _ => normalize_email(email).map_err(|e| ApiError::invalid("email", e))?,
        };
        // The tenant, the app and the email's account, looked up at once (answered in this
        // order: an unknown tenant is reported before an unknown app).
        let (tenant, app_info, owner) = tokio::join!(
            self.settings(tenant_id),
            self.directory.application(tenant_id, client_id),
            async {
                match method {
                    Primary::Federated => Ok(None),
                    _ => {
                        let claim = ClaimKey {
                            tenant_id,
                            scope: EMAIL_CLAIM.into(),
                            value: self.crypto.blind_index(tenant_id, EMAIL_CLAIM, &email),
                        };
                        self.store.claim_owner(&claim).await
                    }
                }
            },
        );
        let tenant = tenant?;
        let app_info = app_info?.ok_or_else(|| ApiError::NotFound("application".into()))?;
        let app = app_info.id;
        let policy = Arc::new(FlowPolicy {
            settings: tenant.clone(),
            app_requires_mfa: app_info.require_mfa,
        });
        let allowed = match method {
            Primary::Password => PrimaryMethod::Password,
            Primary::EmailOtp => PrimaryMethod::EmailOtp,
            Primary::Federated => PrimaryMethod::Federated,
        };
        if !tenant.allowed_primary_methods.contains(&allowed) {
            return Err(ApiError::FailedPrecondition(
                "this sign-in method is not enabled for the tenant".into(),
            ));
        }
        let user_id = owner?.filter(|s| s.kind == User::STREAM_TYPE).map(|s| s.id);
        let lockout_id = user_id.unwrap_or_else(|| {
            // An email without an account locks like one (nothing to learn from the lock).
            let digest = self.crypto.blind_index(tenant_id, "lockout", &email);
            let bytes = hex::decode(&digest[..32]).unwrap_or_default();
            Uuid::from_slice(&bytes).unwrap_or_else(|_| Uuid::new_v4())
        });
        let mut batch = Batch::new(flow, tenant_id, metadata);
        batch.flow(SignInEvent::SignInStarted {
            application_id: app,
            client_id: client_id.to_string(),
            method,
            user_id,
            lockout_id,
            expires_at: Utc::now() + self.flow_lifetime,
        })?;
        if method == Primary::EmailOtp {
            let code = new_code();
            let digest = self.crypto.code_digest(id, FLOW_CODE, &code);
            batch.flow(SignInEvent::EmailCodeIssued {
                digest,
                expires_at: Utc::now() + CODE_LIFETIME,
            })?;
            if let Some(user_id) = user_id {
                let user = Loaded::<User>::load(self.store.as_ref(), user_id).await?;
                if user.state.status == Status::Active {
                    let message = Message {
                        to: email.clone(),
                        subject: "Your sign-in code".into(),
                        body: format!("Your sign-in code is {code}. It expires in 10 minutes."),
                        code: Some(code),
                    };
                    let event = self
                        .notification(tenant_id, user_id, Channel::Email, message)
                        .await?;
                    batch.other(&User::stream(user_id), None, &event)?;
                }
            }
        }
        self.commit(flow, batch).await?;
        flow.state.policy = Some(policy);
        Ok(self.reply(id, flow, None))
    }

    async fn notification(
        &self,
        tenant_id: Uuid,
        user_id: Uuid,
        channel: Channel,
        message: Message,
    ) -> Result<UserEvent, ApiError> {
        Ok(UserEvent::NotificationRequested {
            channel,
            message: self.crypto.seal(tenant_id, user_id, &message).await?,
        })
    }

    /// Loads the flow's user (an empty one for an unknown email).
    async fn user(&self, flow: &SignIn) -> Result<Loaded<User>, ApiError> {
        self.user_by_id(flow.user_id).await
    }

    /// Loads a flow's user by its id (an empty one for an unknown email): for a step that
    /// reads the user beside something else, without holding the flow.
    async fn user_by_id(&self, user_id: Option<Uuid>) -> Result<Loaded<User>, ApiError> {
        match user_id {
            Some(user_id) => Ok(Loaded::<User>::load(self.store.as_ref(), user_id).await?),
            None => Ok(Loaded {
                state: User::default(),
                version: 0,
                stream: User::stream(Uuid::nil()),
            }),
        }
    }

    /// The tenant's settings and the app's MFA requirement, read once per loaded copy of the
    /// flow (a flow keeps the policy it started under while its actor lives).
    async fn policy(&self, flow: &mut Loaded<SignIn>) -> Result<Arc<FlowPolicy>, ApiError> {
        if let Some(policy) = &flow.state.policy {
            return Ok(policy.clone());
        }
        // Both at once: on PostgreSQL reads asked together share one statement.
        let (settings, app) = tokio::join!(
            self.settings(flow.state.tenant_id),
            self.directory
                .application_by_id(flow.state.tenant_id, flow.state.application_id),
        );
        let settings = settings?;
        let app_requires_mfa = app?.is_some_and(|app| app.require_mfa);
        let policy = Arc::new(FlowPolicy {
            settings,
            app_requires_mfa,
        });
        flow.state.policy = Some(policy.clone());
        Ok(policy)
    }

    /// The flow's policy and its user, read at once.
    async fn policy_and_user(
        &self,
        flow: &mut Loaded<SignIn>,
    ) -> Result<(Arc<FlowPolicy>, Loaded<User>), ApiError> {
        let user_id = flow.state.user_id;
        let (policy, user) = tokio::join!(self.policy(flow), self.user_by_id(user_id));
        Ok((policy?, user?))
    }

    async fn settings(&self, tenant_id: Uuid) -> Result<TenantSettings, ApiError> {
        self.directory
            .tenant(tenant_id)
            .await?
            .ok_or_else(|| ApiError::NotFound("tenant".into()))
    }

    /// The identity provider a flow names, when it is the tenant's.
    async fn provider(
        &self,
        tenant_id: Uuid,
        provider_id: Uuid,
    ) -> Result<ProviderConfig, ApiError> {
        Loaded::<IdentityProvider>::load(self.store.as_ref(), provider_id)
            .await?
            .state
            .of_tenant(tenant_id)
            .cloned()
            .ok_or_else(|| ApiError::NotFound("identity provider".into()))
    }

    fn relying_party(&self) -> Result<&Federation, ApiError> {
        self.federation.as_deref().ok_or_else(|| {
            ApiError::FailedPrecondition("federated sign-in is not available".into())
        })
    }

    async fn start_federation(
        &self,
        id: Uuid,
        flow: &mut Loaded<SignIn>,
        provider_id: Uuid,
        redirect_uri: &str,
        metadata: &Metadata,
    ) -> Result<Reply, ApiError> {
        // Before the primary method succeeded, a person may switch to (or retry) federation.
        if !matches!(
            flow.state.step,
            Step::Password | Step::EmailCode | Step::Federation | Step::FederationCallback
        ) {
            return Err(wrong_step(&flow.state));
        }
        let tenant_id = flow.state.tenant_id;
        let settings = self.policy(flow).await?.settings.clone();
        if !settings
            .allowed_primary_methods
            .contains(&PrimaryMethod::Federated)
        {
            return Err(ApiError::FailedPrecondition(
                "federated sign-in is not enabled for the tenant".into(),
            ));
        }
        let app = self
            .directory
            .application_by_id(tenant_id, flow.state.application_id)
            .await?
            .ok_or_else(|| ApiError::NotFound("application".into()))?;
        // The provider answers the app (gRPC front door), or Gatehouse's own hosted pages.
        if redirect_uri != federation_callback(&self.keys.issuer(tenant_id))
            && !app.redirect_uris.iter().any(|uri| uri == redirect_uri)
        {
            return Err(ApiError::invalid(
                "redirect_uri",
                "must be one of the application's redirect URIs",
            ));
        }
        let config = self.provider(tenant_id, provider_id).await?;
        let attempt = flow.state.federation_attempts + 1;
        let secrets = Secrets::derive(&self.crypto, id, attempt);
        let url = match self
            .relying_party()?
            .authorization_url(&config, &secrets, redirect_uri)
            .await
        {
            Ok(url) => url,
            Err(error) => {
                tracing::warn!(%provider_id, detail = %error.detail(), "federation could not start");
                self.append_flow(
                    flow,
                    metadata,
                    vec![SignInEvent::FederationFailed {
                        provider_id,
                        reason: error.reason(),
                    }],
                )
                .await?;
                return Err(ApiError::Unavailable(
                    "the identity provider could not be reached; try again or use another \
                     method"
                        .into(),
                ));
            }
        };
        self.append_flow(
            flow,
            metadata,
            vec![SignInEvent::FederationStarted {
                provider_id,
                attempt,
                redirect_uri: redirect_uri.to_string(),
            }],
        )
        .await?;
        let mut reply = self.reply(id, flow, None);
        reply.authorization_url = Some(url);
        Ok(reply)
    }

    async fn complete_federation(
        &self,
        id: Uuid,
        flow: &mut Loaded<SignIn>,
        query: &str,
        metadata: &Metadata,
    ) -> Result<Reply, ApiError> {
        let Some(attempt) = flow.state.federation.clone() else {
            return Err(wrong_step(&flow.state));
        };
        if flow.state.step != Step::FederationCallback {
            return Err(wrong_step(&flow.state));
        }
        if query.len() > 16 * 1024 {
            return Err(ApiError::invalid("callback_query", "is too long"));
        }
        let tenant_id = flow.state.tenant_id;
        let provider_id = attempt.provider_id;
        let settings = self.policy(flow).await?.settings.clone();
        let outcome = match self.provider(tenant_id, provider_id).await {
            Ok(config) => {
                let secret: Option<String> =
                    self.crypto.open(provider_id, &config.client_secret).await?;
                let secrets = Secrets::derive(&self.crypto, id, attempt.attempt);
                self.relying_party()?
                    .complete(
                        &config,
                        secret.as_deref().unwrap_or_default(),
                        &secrets,
                        &attempt.redirect_uri,
                        query,
                    )
                    .await
                    .map(|claims| (config, claims))
                    .map_err(|error| {
                        tracing::info!(%provider_id, detail = %error.detail(), "federation failed");
                        error.reason()
                    })
            }
            // Deleted meanwhile.
            Err(ApiError::NotFound(_)) => Err("provider_unavailable".to_string()),
            Err(other) => return Err(other),
        };
        let (config, claims) = match outcome {
            Ok(found) => found,
            Err(reason) => {
                return self
                    .federation_failed(id, flow, provider_id, reason, metadata)
                    .await;
            }
        };
        let kind = config.kind.as_str().to_string();
        let identity = self.crypto.blind_index(
            tenant_id,
            IDENTITY_CLAIM,
            &identity_key(provider_id, &claims.subject),
        );
        let identity_claim = ClaimKey {
            tenant_id,
            scope: IDENTITY_CLAIM.into(),
            value: identity.clone(),
        };
        let mut batch = Batch::new(flow, tenant_id, metadata);
        // 1. A returning identity.
        if let Some(owner) = self.store.claim_owner(&identity_claim).await?
            && owner.kind == User::STREAM_TYPE
        {
            let user = Loaded::<User>::load(self.store.as_ref(), owner.id).await?;
            vouched(&mut batch, provider_id, kind, owner.id, false)?;
            let tokens = self
                .after_primary(id, flow, &user, &settings, &mut batch, metadata)
                .await?;
            self.commit(flow, batch).await?;
            return Ok(self.reply(id, flow, tokens));
        }
        let email = match claims.email.as_deref().map(normalize_email) {
            Some(Ok(email)) => email,
            _ => {
                return self
                    .federation_failed(id, flow, provider_id, "email_missing".into(), metadata)
                    .await;
            }
        };
        let email_claim = ClaimKey {
            tenant_id,
            scope: EMAIL_CLAIM.into(),
            value: self.crypto.blind_index(tenant_id, EMAIL_CLAIM, &email),
        };
        // 2. The email has an account: never merged without proof of that account, and only
        // offered when the provider vouches for the email (else anyone could probe which
        // emails have accounts, and send their owners codes).
        if let Some(owner) = self.store.claim_owner(&email_claim).await?
            && owner.kind == User::STREAM_TYPE
        {
            if !claims.email_verified {
                return self
                    .federation_failed(id, flow, provider_id, "email_not_verified".into(), metadata)
                    .await;
            }
            let user = Loaded::<User>::load(self.store.as_ref(), owner.id).await?;
            let proof = if user.state.credential.is_some() {
                Primary::Password
            } else {
                Primary::EmailOtp
            };
            batch.flow(SignInEvent::LinkRequired {
                provider_id,
                kind,
                user_id: owner.id,
                proof,
                subject: self
                    .crypto
                    .seal(tenant_id, owner.id, &claims.subject)
                    .await?,
            })?;
            if proof == Primary::EmailOtp {
                let code = new_code();
                batch.flow(SignInEvent::EmailCodeIssued {
                    digest: self.crypto.code_digest(id, FLOW_CODE, &code),
                    expires_at: Utc::now() + CODE_LIFETIME,
                })?;
                if user.state.status == Status::Active {
                    let message = Message {
                        to: email.clone(),
                        subject: "Confirm it is you".into(),
                        body: format!(
                            "Someone is linking a {} account to yours. If it is you, enter \
                             {code}. It expires in 10 minutes.",
                            config.display_name
                        ),
                        code: Some(code),
                    };
                    let event = self
                        .notification(tenant_id, owner.id, Channel::Email, message)
                        .await?;
                    batch.other(&User::stream(owner.id), None, &event)?;
                }
            }
            self.commit(flow, batch).await?;
            return Ok(self.reply(id, flow, None));
        }
        // 3. New: just-in-time sign-up, when the tenant allows it and the provider vouches
        // for the email (an unverified one would squat someone else's address).
        if !settings.sign_up_enabled {
            return self
                .federation_failed(id, flow, provider_id, "sign_up_disabled".into(), metadata)
                .await;
        }
        if !claims.email_verified {
            return self
                .federation_failed(id, flow, provider_id, "email_not_verified".into(), metadata)
                .await;
        }
        let user_id = Uuid::now_v7();
        let mut attributes = std::collections::BTreeMap::new();
        if let Some(name) = &claims.name
            && settings.collected_attributes.iter().any(|a| a == "name")
        {
            attributes.insert("name".to_string(), name.chars().take(256).collect());
        }
        let profile = Profile { email, attributes };
        let stream = User::stream(user_id);
        let user_events = [
            UserEvent::UserSignedUpFederated {
                application_id: flow.state.application_id,
                profile: self.crypto.seal(tenant_id, user_id, &profile).await?,
                email_verified: true,
            },
            UserEvent::IdentityLinked {
                provider_id,
                identity,
                subject: self
                    .crypto
                    .seal(tenant_id, user_id, &claims.subject)
                    .await?,
            },
        ];
        let mut user = Loaded::<User> {
            state: User::default(),
            version: 0,
            stream: stream.clone(),
        };
        let envelope =
            gatehouse_events::RecordedEvent::pending(tenant_id, stream.clone(), Utc::now());
        for (i, event) in user_events.iter().enumerate() {
            batch.other(
                &stream,
                (i == 0).then_some(ExpectedVersion::Exact(0)),
                event,
            )?;
            user.state.apply(event.clone(), &envelope);
            user.version += 1;
        }
        batch.claim(&stream, email_claim);
        batch.claim(&stream, identity_claim);
        vouched(&mut batch, provider_id, kind, user_id, true)?;
        let tokens = self
            .after_primary(id, flow, &user, &settings, &mut batch, metadata)
            .await?;
        match self.commit(flow, batch).await {
            Ok(()) => Ok(self.reply(id, flow, tokens)),
            // Someone took the email (or identity) between the check and the append.
            Err(ApiError::AlreadyExists(_)) => {
                self.federation_failed(id, flow, provider_id, "account_conflict".into(), metadata)
                    .await
            }
            Err(other) => Err(other),
        }
    }

    /// Records a failed federation attempt; the flow waits at FEDERATION for another.
    async fn federation_failed(
        &self,
        id: Uuid,
        flow: &mut Loaded<SignIn>,
        provider_id: Uuid,
        reason: String,
        metadata: &Metadata,
    ) -> Result<Reply, ApiError> {
        self.append_flow(
            flow,
            metadata,
            vec![SignInEvent::FederationFailed {
                provider_id,
                reason,
            }],
        )
        .await?;
        Ok(self.reply(id, flow, None))
    }

    /// After the proof of an account a provider's email belongs to: the provider counts as
    /// a primary method too. The identity is linked only when the sign-in completes
    /// ([`Self::link_on_completion`]): a proof that stops at MFA or a block links nothing.
    fn proved_for_link(
        &self,
        flow: &Loaded<SignIn>,
        user: &Loaded<User>,
        batch: &mut Batch,
    ) -> Result<(), ApiError> {
        // A disabled or unverified account is refused next (after_primary).
        if flow.state.link.is_none() || user.state.status != Status::Active {
            return Ok(());
        }
        batch.flow(SignInEvent::PrimaryVerified {
            method: "fed".into(),
        })
    }

    /// Links the identity a completing flow's person proved their account for (a claim, so
    /// it stays one account's).
    async fn link_on_completion(
        &self,
        preview: &SignIn,
        user: &Loaded<User>,
        batch: &mut Batch,
    ) -> Result<(), ApiError> {
        let Some(link) = &preview.link else {
            return Ok(());
        };
        let tenant_id = preview.tenant_id;
        let subject: String = self
            .crypto
            .open(user.stream.id, &link.subject)
            .await?
            .ok_or_else(|| ApiError::FailedPrecondition("this account was erased".into()))?;
        let identity = self.crypto.blind_index(
            tenant_id,
            IDENTITY_CLAIM,
            &identity_key(link.provider_id, &subject),
        );
        let claim = ClaimKey {
            tenant_id,
            scope: IDENTITY_CLAIM.into(),
            value: identity.clone(),
        };
        match self.store.claim_owner(&claim).await? {
            // Linked meanwhile (another tab of the same person): nothing more to do.
            Some(owner) if owner == user.stream => {}
            // Another account took it meanwhile: this person still proved their own
            // account and signs in to it, unlinked.
            Some(_) => {
                tracing::info!(provider_id = %link.provider_id, "identity linked to another account meanwhile");
                return Ok(());
            }
            None => {
                batch.other(
                    &user.stream,
                    None,
                    &UserEvent::IdentityLinked {
                        provider_id: link.provider_id,
                        identity,
                        subject: link.subject.clone(),
                    },
                )?;
                batch.claim(&user.stream, claim);
            }
        }
        batch.flow(SignInEvent::IdentityLinked {
            provider_id: link.provider_id,
        })
    }

    async fn password(
        &self,
        id: Uuid,
        flow: &mut Loaded<SignIn>,
        password: String,
        metadata: &Metadata,
    ) -> Result<Reply, ApiError> {
        let proves_link = flow
            .state
            .link
            .as_ref()
            .is_some_and(|link| link.proof == Primary::Password);
        if flow.state.step != Step::Password
            && !(flow.state.step == Step::LinkAccount && proves_link)
        {
            return Err(wrong_step(&flow.state));
        }
        if password.is_empty() || password.chars().count() > MAX_PASSWORD {
            return Err(ApiError::invalid(
                "password",
                format!("must be 1 to {MAX_PASSWORD} characters"),
            ));
        }
        // 0. Too many checks already waiting: turned away before anything is recorded or
        // counted, the same answer whoever the account is.
        let _admission = self.passwords.admit().ok_or_else(|| {
            ApiError::Unavailable("too many sign-ins at once; try again in a few seconds".into())
        })?;
        let tenant_id = flow.state.tenant_id;
        let lockout_id = flow.state.lockout_id;
        // What the step reads, read at once (on PostgreSQL, reads asked together share one
        // statement). The user's hash is opened only after the attempt is reserved.
        let (policy_and_user, first_lockout) = tokio::join!(
            self.policy_and_user(flow),
            Loaded::<Lockout>::load(self.store.as_ref(), lockout_id),
        );
        let (flow_policy, user) = policy_and_user?;
        let mut first_lockout = Some(first_lockout?);
        let settings = flow_policy.settings.clone();
        let policy = settings.lockout_policy.clone();
        let ip = metadata.context.as_ref().and_then(|c| c.ip.clone());
        let location = location_of(ip.as_deref())
            .map(|prefix| self.crypto.blind_index(tenant_id, "location", &prefix));

        // 1. Reserve an attempt before anything is checked (the threshold holds under races).
        let (familiar, reserved) = loop {
            let lockout = match first_lockout.take() {
                Some(lockout) => lockout,
                None => Loaded::<Lockout>::load(self.store.as_ref(), lockout_id).await?,
            };
            let familiar = lockout.state.is_familiar(location.as_deref());
            match lockout.state.reserve(id, familiar, &policy, Utc::now()) {
                Err(Locked { until }) => {
                    self.append_flow(
                        flow,
                        metadata,
                        vec![SignInEvent::PasswordRejected {
                            reason: "locked_out".into(),
                            lockout_id: Some(flow.state.lockout_id),
                            user_id: flow.state.user_id,
                        }],
                    )
                    .await?;
                    let wait = until
                        .map(|until| (until - Utc::now()).num_seconds().max(1))
                        .map_or("later".to_string(), |s| format!("in {s} seconds"));
                    return Err(ApiError::TooManyAttempts(format!(
                        "too many failed sign-in attempts; try again {wait}"
                    )));
                }
                Ok(events) => {
                    let mut request = AppendRequest::new(metadata.clone());
                    request.expect(&lockout.stream, lockout.expected());
                    for event in &events {
                        request.push(event.to_new_event(tenant_id, &lockout.stream)?);
                    }
                    match self.store.append(request).await {
                        Ok(outcome) => {
                            // The lockout as it is after the reservation (saves a reload).
                            let state = lockout.state.after(&events, Utc::now());
                            let version = outcome.events.last().map_or(lockout.version, |e| e.2);
                            break (
                                familiar,
                                Loaded {
                                    state,
                                    version,
                                    stream: lockout.stream,
                                },
                            );
                        }
                        Err(StoreError::Conflict { .. }) => continue,
                        Err(other) => return Err(other.into()),
                    }
                }
            }
        };

        // 2. Check the password (a dummy hash for an unknown email: same time, same answer).
        let hash: Option<String> = match (&user.state.credential, user.state.exists()) {
            (Some(sealed), true) => self.crypto.open(user.stream.id, sealed).await?,
            _ => None,
        };
        // Leaked credentials: a right password that is in the breached-password list.
        let breached = self.passwords.breached().contains(&password);
        let verified = self.passwords.verify(password, hash).await;

        // 3. Record the outcome with the lockout's (reloaded only if it moved meanwhile).
        let mut known = Some(reserved);
        loop {
            let lockout = match known.take() {
                Some(lockout) => lockout,
                None => Loaded::<Lockout>::load(self.store.as_ref(), lockout_id).await?,
            };
            let mut batch = Batch::new(flow, tenant_id, metadata);
            let mut failed = None;
            if verified {
                batch.other(
                    &lockout.stream,
                    Some(lockout.expected()),
                    &LockoutEvent::AttemptSucceeded {
                        attempt: id,
                        familiar,
                        location: location.clone(),
                    },
                )?;
                batch.flow(SignInEvent::PrimaryVerified {
                    method: "pwd".into(),
                })?;
                if breached {
                    batch.detections.push(Detection {
                        kind: "leaked_credentials".into(),
                        level: RiskLevel::High,
                        evidence: "the password is in the breached-password list".into(),
                    });
                }
                self.proved_for_link(flow, &user, &mut batch)?;
            } else {
                let event = lockout.state.failure(id, familiar, &policy, Utc::now());
                batch.other(&lockout.stream, Some(lockout.expected()), &event)?;
                batch.flow(SignInEvent::PasswordRejected {
                    reason: "invalid_credentials".into(),
                    lockout_id: Some(flow.state.lockout_id),
                    user_id: flow.state.user_id,
                })?;
                failed = Some(());
            }
            let tokens = if verified {
                self.after_primary(id, flow, &user, &settings, &mut batch, metadata)
                    .await?
            } else {
                None
            };
            let flow_version = flow.version;
            match self.commit(flow, batch).await {
                Ok(()) => {
                    return match failed {
                        Some(()) => Err(wrong_credentials()),
                        None => Ok(self.reply(id, flow, tokens)),
                    };
                }
                Err(ApiError::Aborted) => {
                    // Only the lockout may move under us; a moved flow is another process's.
                    let current = Loaded::<SignIn>::load(self.store.as_ref(), id).await?;
                    if current.version != flow_version {
                        *flow = current;
                        return Err(ApiError::Aborted);
                    }
                }
                Err(other) => return Err(other),
            }
        }
    }

    /// The pipeline after the primary method: risk hook, policy hook, required controls,
    /// completion. Adds its events to `batch`; returns the tokens when the flow completes.
    async fn after_primary(
        &self,
        id: Uuid,
        flow: &Loaded<SignIn>,
        user: &Loaded<User>,
        settings: &TenantSettings,
        batch: &mut Batch,
        metadata: &Metadata,
    ) -> Result<Option<Tokens>, ApiError> {
        match user.state.status {
            Status::Active => {}
            status => {
                let reason = match status {
                    Status::PendingVerification => "email_not_verified",
                    _ => "account_disabled",
                };
                batch.flow(SignInEvent::SignInFailed {
                    reason: reason.into(),
                })?;
                return Ok(None);
            }
        }
        // Risk hook: the real-time checks, and the user's risk as Identity Protection has it.
        let client = metadata.context.as_ref();
        let client_ip = client.and_then(|c| c.ip.as_deref()?.parse().ok());
        let (mut risk, mut detections) = self.risk.assess(client_ip);
        for detection in std::mem::take(&mut batch.detections) {
            risk = risk.max(detection.level);
            detections.push(detection);
        }
        let location = client_ip.map(|ip| self.geo.locate(ip)).unwrap_or_default();
        let properties = Properties::of(location, client.and_then(|c| c.user_agent.as_deref()));
        batch.flow(SignInEvent::RiskAssessed {
            level: risk.as_str().into(),
            detections,
            user_id: Some(user.stream.id),
            properties: Some(properties),
        })?;
        let user_risk = self.user_risk(flow.state.tenant_id, user.stream.id, settings);
        if user_risk.0 == RiskLevel::High
            && available_methods(&user.state, settings, flow.state.primary_factor()).is_empty()
        {
            // No second factor to prove it is really them: nothing else can remediate.
            batch.flow(SignInEvent::SignInFailed {
                reason: "user_at_risk".into(),
            })?;
            return Ok(None);
        }
        let preview = batch.preview(flow);
        let evaluated = self.evaluate_policies(
            &preview, user, settings, risk, user_risk, client_ip, metadata,
        );
        let blocked = matches!(
            &evaluated,
            SignInEvent::PolicyEvaluated {
                blocked_by: Some(_),
                ..
            }
        );
        batch.flow(evaluated)?;
        if blocked {
            batch.flow(SignInEvent::SignInFailed {
                reason: "blocked_by_policy".into(),
            })?;
            return Ok(None);
        }
        self.advance(id, flow, user, settings, batch, metadata)
            .await
    }

    /// The user's risk level, and whether a confirmed compromise asks for a new password.
    fn user_risk(
        &self,
        tenant_id: Uuid,
        user_id: Uuid,
        settings: &TenantSettings,
    ) -> (RiskLevel, bool) {
        let low_age = Duration::days(i64::from(settings.risk.low_risk_age_days));
        self.user_risk
            .as_ref()
            .map_or((RiskLevel::None, false), |view| {
                view.user_risk(tenant_id, user_id, low_age)
            })
    }

    /// The policy hook: Conditional Access and the tenant's and app's MFA requirement,
    /// decided as one event that records every policy's result.
    #[allow(clippy::too_many_arguments)]
    fn evaluate_policies(
        &self,
        flow: &SignIn,
        user: &Loaded<User>,
        settings: &TenantSettings,
        sign_in_risk: RiskLevel,
        (user_risk, must_change_password): (RiskLevel, bool),
        ip: Option<std::net::IpAddr>,
        metadata: &Metadata,
    ) -> SignInEvent {
        let user_id = user.stream.id;
        let (set, groups) = self.policies.for_sign_in(flow.tenant_id, user_id);
        let client = metadata.context.as_ref();
        let provider_id = flow.provider.as_ref().map(|(id, _)| id.to_string());
        // While an identity waits to be linked, the account was proved by its own factor:
        // policies judge that (a password is a password sign-in, whoever vouched for the email).
        let primary = match (flow.primary_factor(), &flow.provider, &provider_id) {
            (Some(Primary::Federated), Some((_, kind)), Some(id)) => {
                PrimaryKind::Federated { id, kind }
            }
            (Some(Primary::EmailOtp), _, _) => PrimaryKind::EmailOtp,
            _ => PrimaryKind::Password,
        };
        let country = ip.and_then(|ip| self.geo.country(ip));
        let context = Context {
            user_id,
            groups: &groups,
            app_id: flow.application_id,
            ip,
            country,
            platform: client
                .and_then(|c| c.user_agent.as_deref())
                .map_or(Platform::Other, Platform::of_user_agent),
            sign_in_risk,
            user_risk,
            primary,
            satisfied: if user.state.phone_verified {
                Controls::of(&[Control::PhoneVerified])
            } else {
                Controls::NONE
            },
        };
        let decision = set.evaluate(&context);
        let mut required = decision.required;
        let mut reasons = Vec::new();
        if settings.require_mfa {
            reasons.push("tenant".to_string());
        }
        // A flow whose app could not be read asks for MFA (fail closed).
        if flow
            .policy
            .as_ref()
            .is_none_or(|policy| policy.app_requires_mfa)
        {
            reasons.push("application".to_string());
        }
        if !reasons.is_empty() {
            required = required.union(Controls::of(&[Control::Mfa]));
        }
        if decision.required.has(Control::Mfa) {
            reasons.push("policy".to_string());
        }
        if must_change_password {
            // An analyst confirmed the account compromised: prove it is them, then replace
            // the password (the secure change that remediates the user's risk).
            reasons.push("compromised".to_string());
            required = required.union(Controls::of(&[Control::Mfa, Control::PasswordChange]));
        }
        let policies = decision
            .results
            .iter()
            .map(|result| {
                let (outcome, failed, controls) = match result.outcome {
                    Outcome::NotApplied(condition) => {
                        ("not_applied", Some(condition.as_str().to_string()), vec![])
                    }
                    Outcome::Block => ("block", None, vec![]),
                    Outcome::Grant(controls) => ("grant", None, controls.list()),
                };
                PolicyRecord {
                    policy_id: result.policy,
                    report_only: result.report_only,
                    result: outcome.into(),
                    failed_condition: failed,
                    controls,
                }
            })
            .collect();
        let mfa_methods = (decision.mfa_methods != u8::MAX).then(|| {
            settings
                .mfa_methods
                .iter()
                .copied()
                .filter(|m| decision.allows(*m))
                .collect()
        });
        SignInEvent::PolicyEvaluated {
            mfa_required: required.has(Control::Mfa),
            reasons,
            controls: required.list(),
            policies,
            blocked_by: decision.blocked_by,
            mfa_methods,
            sign_in_frequency_seconds: decision.sign_in_frequency,
            persistent: decision.persistent,
            country: country.map(|c| String::from_utf8_lossy(&c).into_owned()),
        }
    }

    /// Asks for the next control still to meet, or completes the flow when none is left.
    async fn advance(
        &self,
        id: Uuid,
        flow: &Loaded<SignIn>,
        user: &Loaded<User>,
        settings: &TenantSettings,
        batch: &mut Batch,
        metadata: &Metadata,
    ) -> Result<Option<Tokens>, ApiError> {
        let preview = batch.preview(flow);
        let counts = |method: &MfaMethod| {
            preview
                .mfa_allowed
                .as_ref()
                .is_none_or(|allowed| allowed.contains(method))
        };
        let next = match preview.pending.first() {
            None => {
                return self
                    .complete(id, flow, user, settings, &preview, batch, metadata)
                    .await
                    .map(Some);
            }
            Some(Control::Mfa) => {
                let methods: Vec<MfaMethod> =
                    available_methods(&user.state, settings, preview.primary_factor())
                        .into_iter()
                        .filter(counts)
                        .collect();
                let (user_risk, _) = self.user_risk(flow.state.tenant_id, user.stream.id, settings);
                if !methods.is_empty() {
                    SignInEvent::MfaRequired { methods }
                } else if preview.risk > RiskLevel::None || user_risk > RiskLevel::None {
                    // A risky sign-in cannot register its own second factor: whoever holds
                    // a stolen password would "prove" themselves with their own phone.
                    SignInEvent::SignInFailed {
                        reason: "user_at_risk".into(),
                    }
                } else {
                    // Enrolment within the flow, of the first method the tenant lists that
                    // can be registered here: an authenticator app (proved by its first
                    // code) or a phone (proved by a texted code).
                    let registrable = settings.mfa_methods.iter().find(|method| {
                        matches!(method, MfaMethod::Totp | MfaMethod::SmsOtp) && counts(method)
                    });
                    match registrable {
                        Some(MfaMethod::Totp) => SignInEvent::TotpRegistrationRequired,
                        Some(_) => SignInEvent::PhoneRegistrationRequired,
                        None => SignInEvent::SignInFailed {
                            reason: "no_second_factor".into(),
                        },
                    }
                }
            }
            Some(Control::PhoneVerified) => SignInEvent::PhoneRegistrationRequired,
            Some(Control::PasswordChange) => SignInEvent::PasswordChangeRequired,
        };
        batch.flow(next)?;
        Ok(None)
    }

    /// Issues the session and its tokens.
    #[allow(clippy::too_many_arguments)]
    async fn complete(
        &self,
        id: Uuid,
        flow: &Loaded<SignIn>,
        user: &Loaded<User>,
        settings: &TenantSettings,
        preview: &SignIn,
        batch: &mut Batch,
        metadata: &Metadata,
    ) -> Result<Tokens, ApiError> {
        self.link_on_completion(preview, user, batch).await?;
        let amr = preview.amr.clone();
        let now = Utc::now();
        let tenant_id = flow.state.tenant_id;
        let lifetimes = &settings.token_lifetimes;
        let session_id = Uuid::now_v7();
        let (refresh_token, refresh_digest) = new_refresh_token(session_id);
        let expires_at = now + Duration::seconds(i64::from(lifetimes.session_seconds));
        let session = Session {
            tenant_id,
            user_id: user.stream.id,
            application_id: flow.state.application_id,
            client_id: flow.state.client_id.clone(),
            sign_in_id: id,
            amr: amr.clone(),
            expires_at: Some(expires_at),
            auth_time: Some(now),
            sign_in_frequency_seconds: preview.sign_in_frequency_seconds,
            ..Session::default()
        };
        let tokens = issue_tokens(
            &self.keys,
            &self.crypto,
            session_id,
            &session,
            &user.state,
            settings,
            refresh_token,
            metadata,
            None,
        )
        .await?;
        batch.other(
            &Session::stream(session_id),
            Some(ExpectedVersion::Exact(0)),
            &SessionEvent::SessionStarted {
                user_id: user.stream.id,
                application_id: flow.state.application_id,
                client_id: flow.state.client_id.clone(),
                sign_in_id: id,
                amr,
                refresh_digest,
                refresh_expires_at: capped(now, lifetimes.refresh_token_seconds, Some(expires_at)),
                expires_at,
                sign_in_frequency_seconds: preview.sign_in_frequency_seconds,
                persistent: preview.persistent,
            },
        )?;
        batch.flow(SignInEvent::SignInCompleted { session_id })?;
        Ok(tokens)
    }

    async fn email_code(
        &self,
        id: Uuid,
        flow: &mut Loaded<SignIn>,
        code: &str,
        metadata: &Metadata,
    ) -> Result<Reply, ApiError> {
        let proves_link = flow
            .state
            .link
            .as_ref()
            .is_some_and(|link| link.proof == Primary::EmailOtp);
        if flow.state.step != Step::EmailCode
            && !(flow.state.step == Step::LinkAccount && proves_link)
        {
            return Err(wrong_step(&flow.state));
        }
        let tenant_id = flow.state.tenant_id;
        // Emailed codes count against the account's lockout like passwords: without that,
        // an attacker could start flow after flow and guess five codes in each.
        let lockout_id = flow.state.lockout_id;
        let (policy_and_user, lockout) = tokio::join!(
            self.policy_and_user(flow),
            Loaded::<Lockout>::load(self.store.as_ref(), lockout_id),
        );
        let (policy, user) = policy_and_user?;
        let settings = policy.settings.clone();
        let lockout = lockout?;
        let now = Utc::now();
        let reserved = match lockout
            .state
            .reserve(id, false, &settings.lockout_policy, now)
        {
            Ok(events) => events,
            Err(Locked { .. }) => {
                return Err(ApiError::TooManyAttempts(
                    "too many failed sign-in attempts; try again later".into(),
                ));
            }
        };
        let matched = self.challenge_matches(id, &flow.state, code);
        let mut batch = Batch::new(flow, tenant_id, metadata);
        // An unknown email's code was never sent: it cannot match.
        if matched && user.state.exists() {
            batch.flow(SignInEvent::PrimaryVerified {
                method: "otp".into(),
            })?;
            self.proved_for_link(flow, &user, &mut batch)?;
            let tokens = self
                .after_primary(id, flow, &user, &settings, &mut batch, metadata)
                .await?;
            self.commit(flow, batch).await?;
            return Ok(self.reply(id, flow, tokens));
        }
        // The failure, as a reservation and its outcome at the lockout's exact version.
        let failed =
            lockout
                .state
                .after(&reserved, now)
                .failure(id, false, &settings.lockout_policy, now);
        let mut expected = Some(lockout.expected());
        for event in reserved.iter().chain([&failed]) {
            batch.other(&lockout.stream, expected.take(), event)?;
        }
        self.reject_code(flow, batch, "email_otp").await
    }

    /// Records a wrong code (failing the flow at the limit) and answers with the error.
    async fn reject_code(
        &self,
        flow: &mut Loaded<SignIn>,
        mut batch: Batch,
        method: &str,
    ) -> Result<Reply, ApiError> {
        batch.flow(SignInEvent::CodeRejected {
            method: method.into(),
        })?;
        let exhausted = flow.state.wrong_codes + 1 >= MAX_WRONG_CODES;
        if exhausted {
            batch.flow(SignInEvent::SignInFailed {
                reason: "too_many_wrong_codes".into(),
            })?;
        }
        self.commit(flow, batch).await?;
        Err(if exhausted {
            ApiError::FailedPrecondition("too many wrong codes; start a new sign-in".into())
        } else {
            wrong_code()
        })
    }

    /// Whether `code` answers the flow's outstanding emailed / texted code, in time.
    fn challenge_matches(&self, id: Uuid, flow: &SignIn, code: &str) -> bool {
        match &flow.challenge {
            Some(Challenge {
                digest, expires_at, ..
            }) if *expires_at > Utc::now() => {
                let code = code.trim();
                code.len() == 6 && self.crypto.code_matches(id, FLOW_CODE, code, digest)
            }
            _ => false,
        }
    }

    async fn select_mfa(
        &self,
        id: Uuid,
        flow: &mut Loaded<SignIn>,
        method: MfaMethod,
        metadata: &Metadata,
    ) -> Result<Reply, ApiError> {
        if !matches!(flow.state.step, Step::SelectMfaMethod | Step::MfaCode) {
            return Err(wrong_step(&flow.state));
        }
        if !flow.state.mfa_methods.contains(&method) {
            return Err(ApiError::invalid(
                "method",
                "is not available for this sign-in",
            ));
        }
        let tenant_id = flow.state.tenant_id;
        let mut batch = Batch::new(flow, tenant_id, metadata);
        batch.flow(SignInEvent::MfaMethodSelected { method })?;
        let channel = match method {
            MfaMethod::EmailOtp => Some(Channel::Email),
            MfaMethod::SmsOtp => Some(Channel::Sms),
            MfaMethod::Totp | MfaMethod::RecoveryCode => None,
        };
        if let Some(channel) = channel {
            if flow.state.challenges_sent >= MAX_CHALLENGES {
                return Err(ApiError::TooManyAttempts(
                    "too many codes sent for this sign-in; start a new one".into(),
                ));
            }
            let user = self.user(&flow.state).await?;
            let user_id = user.stream.id;
            let to: Option<String> = match channel {
                Channel::Email => user.state.email(&self.crypto, user_id).await?,
                Channel::Sms => match &user.state.phone {
                    Some(sealed) => self.crypto.open::<String>(user_id, sealed).await?,
                    None => None,
                },
            };
            let to = to.ok_or_else(|| ApiError::FailedPrecondition("no address".into()))?;
            let code = new_code();
            batch.flow(SignInEvent::ChallengeIssued {
                method,
                digest: self.crypto.code_digest(id, FLOW_CODE, &code),
                expires_at: Utc::now() + CODE_LIFETIME,
            })?;
            let message = Message {
                to,
                subject: "Your sign-in code".into(),
                body: format!("Your sign-in code is {code}. It expires in 10 minutes."),
                code: Some(code),
            };
            let event = self
                .notification(tenant_id, user_id, channel, message)
                .await?;
            batch.other(&user.stream, None, &event)?;
        }
        self.commit(flow, batch).await?;
        Ok(self.reply(id, flow, None))
    }

    async fn mfa_code(
        &self,
        id: Uuid,
        flow: &mut Loaded<SignIn>,
        code: &str,
        metadata: &Metadata,
    ) -> Result<Reply, ApiError> {
        if flow.state.step != Step::MfaCode {
            return Err(wrong_step(&flow.state));
        }
        if code.is_empty() || code.len() > 64 {
            return Err(wrong_code());
        }
        let Some(method) = flow.state.selected else {
            return Err(wrong_step(&flow.state));
        };
        let tenant_id = flow.state.tenant_id;
        let (policy, user) = self.policy_and_user(flow).await?;
        let settings = policy.settings.clone();
        let user_id = user.stream.id;
        let mut batch = Batch::new(flow, tenant_id, metadata);
        // The user event that spends the factor, appended at the user's exact version so
        // that one code cannot be spent twice by racing requests.
        let spent: Option<UserEvent> = match method {
            MfaMethod::Totp => match &user.state.mfa.totp_secret {
                Some(sealed) => {
                    let secret: Option<String> = self.crypto.open(user_id, sealed).await?;
                    let now = Utc::now().timestamp().max(0) as u64;
                    secret
                        .and_then(|s| otp::accept(&s, code, now, user.state.mfa.totp_last_step))
                        .map(|step| UserEvent::TotpCodeAccepted { step })
                }
                None => None,
            },
            MfaMethod::RecoveryCode => {
                let typed = otp::normalize_recovery_code(code);
                let digest = self.crypto.code_digest(user_id, RECOVERY, &typed);
                user.state
                    .mfa
                    .recovery_codes
                    .iter()
                    .position(|d| d.as_deref() == Some(digest.as_str()))
                    .map(|index| UserEvent::RecoveryCodeUsed { index })
            }
            MfaMethod::EmailOtp | MfaMethod::SmsOtp => {
                if self.challenge_matches(id, &flow.state, code) {
                    None
                } else {
                    return self.reject_code(flow, batch, method_name(method)).await;
                }
            }
        };
        let otp_method = matches!(method, MfaMethod::EmailOtp | MfaMethod::SmsOtp);
        match spent {
            Some(event) => batch.other(&user.stream, Some(user.expected()), &event)?,
            None if otp_method => {}
            None => return self.reject_code(flow, batch, method_name(method)).await,
        }
        mfa_passed(&mut batch, &flow.state, user_id, method, true)?;
        let tokens = self
            .advance(id, flow, &user, &settings, &mut batch, metadata)
            .await?;
        match self.commit(flow, batch).await {
            Ok(()) => Ok(self.reply(id, flow, tokens)),
            // The user moved: the same code may just have been spent by a racing request.
            Err(ApiError::Aborted) if !otp_method => Err(wrong_code()),
            Err(other) => Err(other),
        }
    }

    async fn phone_number(
        &self,
        id: Uuid,
        flow: &mut Loaded<SignIn>,
        phone: &str,
        metadata: &Metadata,
    ) -> Result<Reply, ApiError> {
        if !matches!(flow.state.step, Step::PhoneNumber | Step::PhoneCode) {
            return Err(wrong_step(&flow.state));
        }
        let phone = validate_phone(phone).map_err(|e| ApiError::invalid("phone", e))?;
        if flow.state.challenges_sent >= MAX_CHALLENGES {
            return Err(ApiError::TooManyAttempts(
                "too many codes sent for this sign-in; start a new one".into(),
            ));
        }
        let tenant_id = flow.state.tenant_id;
        let user = self.user(&flow.state).await?;
        let user_id = user.stream.id;
        let code = new_code();
        let mut batch = Batch::new(flow, tenant_id, metadata);
        batch.flow(SignInEvent::ChallengeIssued {
            method: MfaMethod::SmsOtp,
            digest: self.crypto.code_digest(id, FLOW_CODE, &code),
            expires_at: Utc::now() + CODE_LIFETIME,
        })?;
        let sealed = self.crypto.seal(tenant_id, user_id, &phone).await?;
        batch.other(&user.stream, None, &UserEvent::PhoneAdded { phone: sealed })?;
        let message = Message {
            to: phone,
            subject: String::new(),
            body: format!("Your verification code is {code}. It expires in 10 minutes."),
            code: Some(code),
        };
        let event = self
            .notification(tenant_id, user_id, Channel::Sms, message)
            .await?;
        batch.other(&user.stream, None, &event)?;
        self.commit(flow, batch).await?;
        Ok(self.reply(id, flow, None))
    }

    async fn phone_code(
        &self,
        id: Uuid,
        flow: &mut Loaded<SignIn>,
        code: &str,
        metadata: &Metadata,
    ) -> Result<Reply, ApiError> {
        if flow.state.step != Step::PhoneCode {
            return Err(wrong_step(&flow.state));
        }
        let tenant_id = flow.state.tenant_id;
        let (policy, user) = self.policy_and_user(flow).await?;
        let settings = policy.settings.clone();
        let mut batch = Batch::new(flow, tenant_id, metadata);
        if !self.challenge_matches(id, &flow.state, code) {
            return self.reject_code(flow, batch, "sms_otp").await;
        }
        batch.other(&user.stream, None, &UserEvent::PhoneVerified)?;
        batch.flow(SignInEvent::PhoneVerified)?;
        // A phone registered because no second factor existed is that second factor.
        if flow.state.pending.first() == Some(&Control::Mfa) {
            mfa_passed(
                &mut batch,
                &flow.state,
                user.stream.id,
                MfaMethod::SmsOtp,
                false,
            )?;
        }
        let tokens = self
            .advance(id, flow, &user, &settings, &mut batch, metadata)
            .await?;
        self.commit(flow, batch).await?;
        Ok(self.reply(id, flow, tokens))
    }

    /// The app to register: a secret of this flow's own, made on the first ask. (Not the
    /// user's pending enrolment: another flow, perhaps a password thief's, may have made that
    /// one and kept a copy.)
    async fn totp_registration(
        &self,
        id: Uuid,
        flow: &mut Loaded<SignIn>,
        metadata: &Metadata,
    ) -> Result<Reply, ApiError> {
        if flow.state.step != Step::TotpRegistration {
            return Err(wrong_step(&flow.state));
        }
        let tenant_id = flow.state.tenant_id;
        let user = self.user(&flow.state).await?;
        let user_id = user.stream.id;
        let secret: String = match &flow.state.totp_secret {
            Some(sealed) => self
                .crypto
                .open(user_id, sealed)
                .await?
                .ok_or_else(|| ApiError::NotFound("user".into()))?,
            None => {
                let secret = otp::new_secret();
                let sealed = self.crypto.seal(tenant_id, user_id, &secret).await?;
                self.append_flow(
                    flow,
                    metadata,
                    vec![SignInEvent::TotpSecretIssued { secret: sealed }],
                )
                .await?;
                secret
            }
        };
        let account = user
            .state
            .email(&self.crypto, user_id)
            .await?
            .unwrap_or_else(|| user_id.to_string());
        let (otpauth_uri, qr_png) = otp::enrollment(&secret, otp::DEFAULT_ISSUER, &account)?;
        let mut reply = self.reply(id, flow, None);
        reply.totp = Some(TotpEnrollment {
            secret,
            otpauth_uri,
            qr_png,
        });
        Ok(reply)
    }

    async fn totp_registration_code(
        &self,
        id: Uuid,
        flow: &mut Loaded<SignIn>,
        code: &str,
        metadata: &Metadata,
    ) -> Result<Reply, ApiError> {
        if flow.state.step != Step::TotpRegistration {
            return Err(wrong_step(&flow.state));
        }
        let tenant_id = flow.state.tenant_id;
        let (policy, user) = self.policy_and_user(flow).await?;
        let settings = policy.settings.clone();
        let user_id = user.stream.id;
        let Some(sealed) = flow.state.totp_secret.clone() else {
            return Err(ApiError::FailedPrecondition(
                "ask for the authenticator app to register first".into(),
            ));
        };
        let secret: String = self
            .crypto
            .open(user_id, &sealed)
            .await?
            .ok_or_else(|| ApiError::NotFound("user".into()))?;
        let now = Utc::now().timestamp().max(0) as u64;
        let mut batch = Batch::new(flow, tenant_id, metadata);
        let Some(step) = otp::accept(&secret, code, now, user.state.mfa.totp_last_step) else {
            return self.reject_code(flow, batch, "totp").await;
        };
        // The flow's secret becomes the user's: started and confirmed in one append.
        batch.other(
            &user.stream,
            Some(user.expected()),
            &UserEvent::TotpEnrollmentStarted { secret: sealed },
        )?;
        batch.other(&user.stream, None, &UserEvent::TotpEnrolled { step })?;
        batch.flow(SignInEvent::TotpRegistered)?;
        // An app registered because no second factor existed is that second factor.
        mfa_passed(&mut batch, &flow.state, user_id, MfaMethod::Totp, false)?;
        let tokens = self
            .advance(id, flow, &user, &settings, &mut batch, metadata)
            .await?;
        self.commit(flow, batch).await?;
        Ok(self.reply(id, flow, tokens))
    }

    async fn new_password(
        &self,
        id: Uuid,
        flow: &mut Loaded<SignIn>,
        password: String,
        metadata: &Metadata,
    ) -> Result<Reply, ApiError> {
        if flow.state.step != Step::NewPassword {
            return Err(wrong_step(&flow.state));
        }
        let tenant_id = flow.state.tenant_id;
        let settings = self.policy(flow).await?.settings.clone();
        let mut validation = Validation::new();
        check_new_password(
            "password",
            &password,
            &settings.password_policy,
            &self.passwords,
            &mut validation,
        );
        validation.finish()?;
        let user = self.user(&flow.state).await?;
        let user_id = user.stream.id;
        let current: Option<String> = match &user.state.credential {
            Some(sealed) => self.crypto.open(user_id, sealed).await?,
            None => None,
        };
        if current.is_some() && self.passwords.verify(password.clone(), current).await {
            return Err(ApiError::invalid(
                "password",
                "must differ from the current password",
            ));
        }
        let breached = self.passwords.breached().contains(&password);
        let hash = self
            .passwords
            .hash(password)
            .await
            .map_err(ApiError::Internal)?;
        let credential = self.crypto.seal(tenant_id, user_id, &hash).await?;
        let mut batch = Batch::new(flow, tenant_id, metadata);
        batch.other(
            &user.stream,
            Some(user.expected()),
            &UserEvent::PasswordChanged {
                credential,
                reason: "policy".into(),
                breached,
            },
        )?;
        batch.flow(SignInEvent::PasswordChanged)?;
        // A secure password change (after a second factor, with a password not known to be
        // breached) remediates the user's risk.
        let (user_risk, must_change) = self.user_risk(tenant_id, user_id, &settings);
        let proved = flow.state.registered_factor_passed;
        if proved && !breached && (user_risk > RiskLevel::None || must_change) {
            batch.other(
                &UserRisk::stream(user_id),
                None,
                &UserRiskEvent::RiskRemediated {
                    reason: "secure_password_change".into(),
                },
            )?;
        }
        let tokens = self
            .advance(id, flow, &user, &settings, &mut batch, metadata)
            .await?;
        self.commit(flow, batch).await?;
        Ok(self.reply(id, flow, tokens))
    }
}

fn method_name(method: MfaMethod) -> &'static str {
    match method {
        MfaMethod::Totp => "totp",
        MfaMethod::EmailOtp => "email_otp",
        MfaMethod::SmsOtp => "sms_otp",
        MfaMethod::RecoveryCode => "recovery_code",
    }
}

/// Where identity providers send people back to when they sign in through the hosted pages.
pub fn federation_callback(issuer: &str) -> String {
    format!("{issuer}/federation/callback")
}

/// The second factors a user can use now, in the tenant's order.
pub fn available_methods(
    user: &User,
    settings: &TenantSettings,
    primary: Option<Primary>,
) -> Vec<MfaMethod> {
    settings
        .mfa_methods
        .iter()
        .copied()
        .filter(|method| match method {
            MfaMethod::Totp => user.mfa.totp_secret.is_some(),
            MfaMethod::EmailOtp => user.email_verified && primary != Some(Primary::EmailOtp),
            MfaMethod::SmsOtp => user.phone_verified,
            MfaMethod::RecoveryCode => user.mfa.recovery_codes_left() > 0,
        })
        .collect()
}

/// Signs the access and ID tokens of a session; `nonce` is the OpenID Connect app's, copied
/// into the ID token.
#[allow(clippy::too_many_arguments)]
pub async fn issue_tokens(
    keys: &Keys,
    crypto: &Crypto,
    session_id: Uuid,
    session: &Session,
    user: &User,
    settings: &TenantSettings,
    refresh_token: String,
    metadata: &Metadata,
    nonce: Option<&str>,
) -> Result<Tokens, ApiError> {
    let now = Utc::now();
    let tenant_id = session.tenant_id;
    let lifetimes = &settings.token_lifetimes;
    let email = user.email(crypto, session.user_id).await?;
    let issuer = keys.issuer(tenant_id);
    let iat = now.timestamp();
    let access_exp = capped(now, lifetimes.access_token_seconds, session.expires_at);
    let id_exp = capped(now, lifetimes.id_token_seconds, session.expires_at);
    let auth_time = session.auth_time.unwrap_or(now).timestamp();
    let access = json!({
        "iss": issuer, "sub": session.user_id.to_string(), "aud": session.client_id,
        "iat": iat, "nbf": iat, "exp": access_exp.timestamp(),
        "jti": Uuid::now_v7().to_string(), "sid": session_id.to_string(),
        "client_id": session.client_id, "tid": tenant_id.to_string(),
        "amr": session.amr, "auth_time": auth_time, "scope": "openid",
    });
    let mut id = json!({
        "iss": issuer, "sub": session.user_id.to_string(), "aud": session.client_id,
        "iat": iat, "exp": id_exp.timestamp(), "auth_time": auth_time,
        "sid": session_id.to_string(), "amr": session.amr, "tid": tenant_id.to_string(),
        "email": email, "email_verified": user.email_verified,
    });
    if let Some(nonce) = nonce {
        id["nonce"] = json!(nonce);
    }
    let access_token = keys.sign(tenant_id, lifetimes, &access, metadata).await?;
    let id_token = keys.sign(tenant_id, lifetimes, &id, metadata).await?;
    Ok(Tokens {
        access_token,
        id_token,
        refresh_token,
        expires_in: (access_exp - now).num_seconds().max(0) as u32,
    })
}
