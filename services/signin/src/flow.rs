//! The SignIn aggregate: one attempt to sign in, as a state machine whose every step is an
//! event of stream `signin/<id>`.
//!
//! ```text
//!  SignInStarted ─┬─ password ──▶ [PASSWORD] ──PasswordRejected──▶ [PASSWORD] (lockout counts)
//!                 │                   │ PrimaryVerified ─────────────────────────────────────┐
//!                 ├─ email code ─▶ [EMAIL_CODE] ──PrimaryVerified────────────────────────────┤
//!                 └─ federated ──▶ [FEDERATION] (PASSWORD and EMAIL_CODE may switch to it)   │
//!                   FederationStarted ─▶ [FEDERATION_CALLBACK]                               │
//!                     ├─ refused (state, code, ID token, provider...) ─ FederationFailed ─▶  │
//!                     │      [FEDERATION] again                                              │
//!                     ├─ identity known, or new (sign-up) ─ FederationSucceeded,             │
//!                     │      PrimaryVerified ────────────────────────────────────────────────┤
//!                     └─ email has an account ─ LinkRequired ─▶ [LINK_ACCOUNT]               │
//!                            password or emailed code ─ PrimaryVerified, IdentityLinked,     │
//!                            PrimaryVerified ────────────────────────────────────────────────┤
//!                                                                                            ▼
//!              RiskAssessed (hook) ◀──────────────────────────────────────────────────────────┘
//!                     ▼
//!              PolicyEvaluated (Conditional Access + tenant/app MFA: block, or the
//!                     │             controls to meet, in order MFA → phone → new password)
//!                     ├── blocked ────────────────────────────────────▶ SignInFailed
//!                     ├── nothing (left) to meet ─────────────────────▶ SignInCompleted
//!                     ├── MfaRequired ──▶ [SELECT_MFA_METHOD] ──MfaMethodSelected──▶ [MFA_CODE]
//!                     │                      ▲  (email/SMS: MfaChallengeIssued)       │
//!                     │                      └──── MfaCodeRejected (≤ 5) ─────────────┤
//!                     │                                                   MfaVerified ▼
//!                     │                                           next control, or SignInCompleted
//!                     ├── no second factor yet, or phone required ─▶ [PHONE_NUMBER]
//!                     │       ─ChallengeIssued─▶ [PHONE_CODE] ─PhoneVerified (+ MfaVerified
//!                     │       when MFA was pending)─▶ next control, or SignInCompleted
//!                     ├── no second factor yet, the tenant takes TOTP first ─▶
//!                     │       TotpRegistrationRequired [TOTP_REGISTRATION] (TotpSecretIssued:
//!                     │       a secret of this flow's own) ─first code─ TotpRegistered,
//!                     │       MfaVerified ─▶ next control, or SignInCompleted
//!                     └── password change ─PasswordChangeRequired─▶ [NEW_PASSWORD]
//!                             ─PasswordChanged─▶ next control, or SignInCompleted
//!  (after each control met, the next pending one is asked; the last completes the flow)
//!  any open step ── deadline ──▶ SignInExpired │ CancelSignIn ──▶ SignInCancelled
//!                ── too many wrong codes, account disabled ──▶ SignInFailed
//! ```
//!
//! The aggregate only folds facts; deciding (checking passwords and codes, issuing sessions)
//! is [`crate::engine`]'s, run by the flow's actor ([`crate::actor`]).

use chrono::{DateTime, Duration, Utc};
use gatehouse_directory::tenant::MfaMethod;
use gatehouse_events::{Aggregate, DomainEvent, RecordedEvent};
pub use gatehouse_policy::model::Control;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// How long a flow may take.
pub const FLOW_LIFETIME: Duration = Duration::minutes(10);
/// Wrong codes a flow accepts before it fails.
pub const MAX_WRONG_CODES: u32 = 5;
/// Codes (email, SMS) a flow may send.
pub const MAX_CHALLENGES: u32 = 5;

/// How the person proves who they are first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Primary {
    /// Email and password.
    Password,
    /// A code sent by email.
    EmailOtp,
    /// An identity provider (chosen with StartFederation).
    Federated,
}

/// Events of a sign-in flow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum SignInEvent {
    /// A flow began. The email itself is not recorded: only the account it names (if any)
    /// and the lockout stream it counts against.
    SignInStarted {
        /// The app (by id) the person signs in to.
        application_id: Uuid,
        /// Its client id.
        client_id: String,
        /// Primary method.
        method: Primary,
        /// The account, when the email has one.
        user_id: Option<Uuid>,
        /// The lockout stream.
        lockout_id: Uuid,
        /// When the flow ends by itself.
        expires_at: DateTime<Utc>,
    },
    /// A code was sent for the email step (for an unknown email, nothing is sent).
    EmailCodeIssued {
        /// Digest of the code.
        digest: String,
        /// Expiry.
        expires_at: DateTime<Utc>,
    },
    /// A wrong password, or a locked account whose password was not checked.
    PasswordRejected {
        /// `invalid_credentials` or `locked_out`.
        reason: String,
        /// The lockout stream the attempt counted against (the account, or the email when
        /// it has none): Identity Protection counts failures per account from this alone.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lockout_id: Option<Uuid>,
        /// The account, when the email has one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user_id: Option<Uuid>,
    },
    /// A federation attempt began. Its `state`, `nonce` and PKCE verifier are derived from
    /// the master key, the flow and `attempt`, never stored.
    FederationStarted {
        /// The identity provider.
        provider_id: Uuid,
        /// 1 for the flow's first attempt, then 2, ...
        attempt: u32,
        /// Where the provider sends the person back.
        redirect_uri: String,
    },
    /// The attempt failed (denied consent, wrong state, bad code, invalid ID token,
    /// unreachable provider, sign-up not allowed...); another may follow.
    FederationFailed {
        /// The identity provider.
        provider_id: Uuid,
        /// Why (see `FederationError::reason` and the engine).
        reason: String,
    },
    /// The provider vouched for the person, whose account has this identity (returning, or
    /// signed up just now by this sign-in).
    FederationSucceeded {
        /// The identity provider.
        provider_id: Uuid,
        /// Its kind (`google`, `facebook`, `apple`, `oidc`), for Conditional Access.
        kind: String,
        /// The account.
        user_id: Uuid,
        /// The account was created by this sign-in.
        signed_up: bool,
    },
    /// The provider's email belongs to an account without this identity: the person must
    /// prove that account before the identity is linked.
    LinkRequired {
        /// The identity provider.
        provider_id: Uuid,
        /// Its kind.
        kind: String,
        /// The account to prove.
        user_id: Uuid,
        /// How: `password`, or `email_otp` (a code sent to the account's email).
        proof: Primary,
        /// The provider's subject, sealed for the account.
        subject: gatehouse_core::crypto::Sealed,
    },
    /// The account was proved and the identity linked to it.
    IdentityLinked {
        /// The identity provider.
        provider_id: Uuid,
    },
    /// The primary method succeeded.
    PrimaryVerified {
        /// `pwd` or `email_otp`.
        method: String,
    },
    /// Real-time risk: the sign-in risk level and the detections that made it.
    RiskAssessed {
        /// `none`, `low`, `medium`, `high`.
        level: String,
        /// What the real-time checks found (anonymiser, malicious IP, leaked password).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        detections: Vec<gatehouse_risk::Detection>,
        /// The account (Identity Protection keeps its history of places and devices).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user_id: Option<Uuid>,
        /// Where and from what the sign-in came, as located at the time (replays of the
        /// log judge what was known then, not today's GeoIP database).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        properties: Option<gatehouse_risk::Properties>,
    },
    /// A second factor was passed after risk was found: this sign-in's risk is remediated.
    SignInRiskRemediated,
    /// What the policies decided: every evaluated policy's result (report-only ones
    /// included), the block, the controls to ask for and the session controls.
    PolicyEvaluated {
        /// A second factor is required.
        mfa_required: bool,
        /// What required it (`tenant`, `application`, `policy`), empty when nothing did.
        reasons: Vec<String>,
        /// Controls still required, in the order they are asked for.
        #[serde(default)]
        controls: Vec<Control>,
        /// Each Conditional Access policy's result.
        #[serde(default)]
        policies: Vec<PolicyRecord>,
        /// The enabled policy that blocks the sign-in.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        blocked_by: Option<Uuid>,
        /// The second factors that count (authentication strength); `None`: any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mfa_methods: Option<Vec<MfaMethod>>,
        /// Sign in again after this many seconds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sign_in_frequency_seconds: Option<u32>,
        /// Persistent browser session.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        persistent: Option<bool>,
        /// The client IP's country (GeoIP), when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        country: Option<String>,
    },
    /// A Conditional Access policy asks for a new password.
    PasswordChangeRequired,
    /// The new password was set.
    PasswordChanged,
    /// A second factor is required; these may be used.
    MfaRequired {
        /// Usable methods.
        methods: Vec<MfaMethod>,
    },
    /// The user has no second factor: they register a phone now.
    PhoneRegistrationRequired,
    /// The user has no second factor: they register an authenticator app (TOTP) now.
    TotpRegistrationRequired,
    /// The secret of the app being registered, made for this flow alone (sealed for the user).
    TotpSecretIssued {
        /// The base32 secret, sealed.
        secret: gatehouse_core::crypto::Sealed,
    },
    /// The authenticator app was registered (its first code was right).
    TotpRegistered,
    /// A method was chosen.
    MfaMethodSelected {
        /// The method.
        method: MfaMethod,
    },
    /// A code was sent (email / SMS second factor, or phone registration).
    ChallengeIssued {
        /// Email or SMS.
        method: MfaMethod,
        /// Digest of the code.
        digest: String,
        /// Expiry.
        expires_at: DateTime<Utc>,
    },
    /// A wrong code.
    CodeRejected {
        /// For which method (`email_otp` primary included).
        method: String,
    },
    /// The phone number was proved by its code.
    PhoneVerified,
    /// The second factor succeeded.
    MfaVerified {
        /// The method.
        method: MfaMethod,
    },
    /// The flow ended with a session.
    SignInCompleted {
        /// The session.
        session_id: Uuid,
    },
    /// The flow ended without one.
    SignInFailed {
        /// Why (`too_many_wrong_codes`, `account_disabled`, `email_not_verified`,
        /// `no_second_factor`, `blocked_by_policy`, `user_at_risk`: a user at high risk with
        /// no second factor).
        reason: String,
    },
    /// The deadline passed.
    SignInExpired,
    /// The person gave up.
    SignInCancelled,
}

impl DomainEvent for SignInEvent {}

/// Where a flow stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Not started.
    #[default]
    None,
    /// Waiting for the password.
    Password,
    /// Waiting for the emailed code (passwordless).
    EmailCode,
    /// Waiting for a second-factor choice.
    SelectMfaMethod,
    /// Waiting for a second-factor code.
    MfaCode,
    /// Waiting for a phone number to register.
    PhoneNumber,
    /// Waiting for the code sent to it.
    PhoneCode,
    /// Waiting for a new password (a policy asks for a change).
    NewPassword,
    /// Waiting for the first code of an authenticator app being registered.
    TotpRegistration,
    /// Waiting for StartFederation.
    Federation,
    /// Waiting for the provider's answer (CompleteFederation).
    FederationCallback,
    /// Waiting for proof of the account the provider's email belongs to.
    LinkAccount,
    /// Ended.
    Done,
}

/// How a flow ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// With a session.
    Completed(Uuid),
    /// Refused.
    Failed(String),
    /// Deadline passed.
    Expired,
    /// Given up.
    Cancelled,
}

/// An outstanding code.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Challenge {
    /// Its method (`email_otp` for the passwordless step).
    pub method: MfaMethod,
    /// Digest.
    pub digest: String,
    /// Expiry.
    pub expires_at: DateTime<Utc>,
}

/// One Conditional Access policy's result, as recorded on the flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRecord {
    /// The policy.
    pub policy_id: Uuid,
    /// Evaluated for the record only.
    #[serde(default)]
    pub report_only: bool,
    /// `not_applied`, `block` or `grant`.
    pub result: String,
    /// For `not_applied`: the first condition that did not match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_condition: Option<String>,
    /// For `grant`: the controls it still asked for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub controls: Vec<Control>,
}

/// The federation attempt in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FederationAttempt {
    /// The identity provider.
    pub provider_id: Uuid,
    /// Its number in the flow (secrets are derived from it).
    pub attempt: u32,
    /// Where the provider sends the person back.
    pub redirect_uri: String,
}

/// An identity waiting for proof of the account it is to be linked to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingLink {
    /// The identity provider.
    pub provider_id: Uuid,
    /// How the account is proved.
    pub proof: Primary,
    /// The provider's subject, sealed for the account.
    pub subject: gatehouse_core::crypto::Sealed,
}

/// A flow's state.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct SignIn {
    /// Tenant.
    pub tenant_id: Uuid,
    /// App.
    pub application_id: Uuid,
    /// Client id.
    pub client_id: String,
    /// Primary method.
    pub method: Option<Primary>,
    /// The account (none for an unknown email).
    pub user_id: Option<Uuid>,
    /// The lockout stream.
    pub lockout_id: Uuid,
    /// Deadline.
    pub expires_at: Option<DateTime<Utc>>,
    /// Current step.
    pub step: Step,
    /// Usable second factors.
    pub mfa_methods: Vec<MfaMethod>,
    /// The chosen one.
    pub selected: Option<MfaMethod>,
    /// Outstanding code.
    pub challenge: Option<Challenge>,
    /// Codes sent.
    pub challenges_sent: u32,
    /// Wrong codes so far.
    pub wrong_codes: u32,
    /// Authentication methods used (RFC 8176 values).
    pub amr: Vec<String>,
    /// The sign-in risk found by the real-time checks.
    pub risk: gatehouse_policy::model::RiskLevel,
    /// A second factor passed after the risk was found.
    pub risk_remediated: bool,
    /// A phone was registered and verified in this flow.
    pub phone_registered: bool,
    /// An authenticator app was registered in this flow.
    #[serde(default)]
    pub totp_registered: bool,
    /// The secret of the app being registered in this flow (sealed for the user).
    #[serde(default)]
    pub totp_secret: Option<gatehouse_core::crypto::Sealed>,
    /// A second factor the user had before this flow was passed (one registered in the flow
    /// proves only that whoever holds the password also holds a phone).
    pub registered_factor_passed: bool,
    /// The ending.
    pub outcome: Option<Outcome>,
    /// Start time.
    pub started_at: Option<DateTime<Utc>>,
    /// Controls still to meet, in order.
    pub pending: Vec<Control>,
    /// The second factors that count (authentication strength); `None`: any.
    pub mfa_allowed: Option<Vec<MfaMethod>>,
    /// Session controls decided by the policies.
    pub sign_in_frequency_seconds: Option<u32>,
    /// Persistent browser session.
    pub persistent: Option<bool>,
    /// Federation attempts started.
    pub federation_attempts: u32,
    /// The attempt waiting for its callback.
    pub federation: Option<FederationAttempt>,
    /// Why the last attempt failed.
    pub federation_error: Option<String>,
    /// The provider (id, kind) that vouched for the person.
    pub provider: Option<(Uuid, String)>,
    /// An identity waiting for proof of the account.
    pub link: Option<PendingLink>,
    /// The policy this copy of the flow runs under (a cache, not a fact: never stored, read
    /// again whenever the flow is reloaded).
    #[serde(skip)]
    pub policy: Option<std::sync::Arc<FlowPolicy>>,
}

/// What a flow's steps need of the tenant and app.
#[derive(Debug, Clone)]
pub struct FlowPolicy {
    /// The tenant's settings.
    pub settings: gatehouse_directory::tenant::TenantSettings,
    /// The app requires a second factor.
    pub app_requires_mfa: bool,
}

impl Aggregate for SignIn {
    const STREAM_TYPE: &'static str = "signin";
    type Event = SignInEvent;

    fn apply(&mut self, event: SignInEvent, envelope: &RecordedEvent) {
        match event {
            SignInEvent::SignInStarted {
                application_id,
                client_id,
                method,
                user_id,
                lockout_id,
                expires_at,
            } => {
                self.tenant_id = envelope.tenant_id;
                self.application_id = application_id;
                self.client_id = client_id;
                self.method = Some(method);
                self.user_id = user_id;
                self.lockout_id = lockout_id;
                self.expires_at = Some(expires_at);
                self.started_at = Some(envelope.recorded_at);
                self.step = match method {
                    Primary::Password => Step::Password,
                    Primary::EmailOtp => Step::EmailCode,
                    Primary::Federated => Step::Federation,
                };
            }
            SignInEvent::EmailCodeIssued { digest, expires_at } => {
                self.challenge = Some(Challenge {
                    method: MfaMethod::EmailOtp,
                    digest,
                    expires_at,
                });
                self.challenges_sent += 1;
            }
            SignInEvent::PasswordRejected { .. } => {}
            SignInEvent::FederationStarted {
                provider_id,
                attempt,
                redirect_uri,
            } => {
                self.federation_attempts = self.federation_attempts.max(attempt);
                self.federation = Some(FederationAttempt {
                    provider_id,
                    attempt,
                    redirect_uri,
                });
                self.federation_error = None;
                self.step = Step::FederationCallback;
            }
            SignInEvent::FederationFailed { reason, .. } => {
                self.federation = None;
                self.federation_error = Some(reason);
                self.step = Step::Federation;
            }
            SignInEvent::FederationSucceeded {
                provider_id,
                kind,
                user_id,
                ..
            } => {
                self.federation = None;
                self.user_id = Some(user_id);
                self.provider = Some((provider_id, kind));
            }
            SignInEvent::LinkRequired {
                provider_id,
                kind,
                user_id,
                proof,
                subject,
            } => {
                self.federation = None;
                self.user_id = Some(user_id);
                // Passwords (and codes) proving the account count against its lockout.
                self.lockout_id = user_id;
                self.provider = Some((provider_id, kind));
                self.link = Some(PendingLink {
                    provider_id,
                    proof,
                    subject,
                });
                self.step = Step::LinkAccount;
            }
            SignInEvent::IdentityLinked { .. } => self.link = None,
            SignInEvent::PrimaryVerified { method } => {
                self.amr.push(method);
                self.challenge = None;
                self.wrong_codes = 0;
            }
            SignInEvent::RiskAssessed { level, .. } => {
                self.risk = gatehouse_policy::model::RiskLevel::parse(&level).unwrap_or_default();
            }
            SignInEvent::SignInRiskRemediated => self.risk_remediated = true,
            SignInEvent::PolicyEvaluated {
                mfa_required,
                controls,
                mfa_methods,
                sign_in_frequency_seconds,
                persistent,
                ..
            } => {
                // Flows recorded before Conditional Access only said `mfa_required`.
                self.pending = if controls.is_empty() && mfa_required {
                    vec![Control::Mfa]
                } else {
                    controls
                };
                self.mfa_allowed = mfa_methods;
                self.sign_in_frequency_seconds = sign_in_frequency_seconds;
                self.persistent = persistent;
            }
            SignInEvent::PasswordChangeRequired => self.step = Step::NewPassword,
            SignInEvent::PasswordChanged => self.pending.retain(|c| *c != Control::PasswordChange),
            SignInEvent::MfaRequired { methods } => {
                self.mfa_methods = methods;
                self.step = Step::SelectMfaMethod;
            }
            SignInEvent::PhoneRegistrationRequired => self.step = Step::PhoneNumber,
            SignInEvent::TotpRegistrationRequired => self.step = Step::TotpRegistration,
            SignInEvent::TotpSecretIssued { secret } => self.totp_secret = Some(secret),
            SignInEvent::TotpRegistered => self.totp_registered = true,
            SignInEvent::MfaMethodSelected { method } => {
                self.selected = Some(method);
                self.challenge = None;
                self.step = Step::MfaCode;
            }
            SignInEvent::ChallengeIssued {
                method,
                digest,
                expires_at,
            } => {
                self.challenge = Some(Challenge {
                    method,
                    digest,
                    expires_at,
                });
                self.challenges_sent += 1;
                if self.step == Step::PhoneNumber {
                    self.step = Step::PhoneCode;
                }
            }
            SignInEvent::CodeRejected { .. } => self.wrong_codes += 1,
            SignInEvent::PhoneVerified => {
                self.phone_registered = true;
                self.challenge = None;
                self.pending.retain(|c| *c != Control::PhoneVerified);
            }
            SignInEvent::MfaVerified { method } => {
                let registered_now = (method == MfaMethod::SmsOtp && self.phone_registered)
                    || (method == MfaMethod::Totp && self.totp_registered);
                if !registered_now {
                    self.registered_factor_passed = true;
                }
                self.amr.push(amr_of(method).into());
                self.amr.push("mfa".into());
                self.challenge = None;
                self.pending.retain(|c| *c != Control::Mfa);
            }
            SignInEvent::SignInCompleted { session_id } => {
                self.finish(Outcome::Completed(session_id))
            }
            SignInEvent::SignInFailed { reason } => self.finish(Outcome::Failed(reason)),
            SignInEvent::SignInExpired => self.finish(Outcome::Expired),
            SignInEvent::SignInCancelled => self.finish(Outcome::Cancelled),
        }
    }
}

/// The RFC 8176 `amr` value of a second factor.
pub fn amr_of(method: MfaMethod) -> &'static str {
    match method {
        MfaMethod::Totp => "otp",
        MfaMethod::EmailOtp => "email",
        MfaMethod::SmsOtp => "sms",
        MfaMethod::RecoveryCode => "kba",
    }
}

impl SignIn {
    fn finish(&mut self, outcome: Outcome) {
        self.outcome = Some(outcome);
        self.step = Step::Done;
        self.challenge = None;
    }

    /// Started and not ended.
    pub fn is_open(&self) -> bool {
        self.started_at.is_some() && self.outcome.is_none()
    }

    /// The factor that proved who the person is: the proof of the account while an identity
    /// waits to be linked, `Federated` once a provider vouched for a linked account, else the
    /// method the flow started with.
    pub fn primary_factor(&self) -> Option<Primary> {
        match (&self.link, &self.provider) {
            (Some(link), _) => Some(link.proof),
            (None, Some(_)) => Some(Primary::Federated),
            (None, None) => self.method,
        }
    }

    /// Open but past its deadline.
    pub fn is_overdue(&self, now: DateTime<Utc>) -> bool {
        self.is_open() && self.expires_at.is_some_and(|deadline| deadline <= now)
    }
}
