//! The User aggregate: one customer of a tenant.
//!
//! Personal data never appears in clear in an event: the email and profile (`profile`), the
//! phone (`phone`), the password hash (`credential`) and every message to the user
//! (`NotificationRequested.message`) are sealed with the user's data key
//! ([`gatehouse_core::crypto`]); erasing the user destroys that key. The email's uniqueness
//! is a claim on its blind index, and so is each linked identity (provider + subject). One-time
//! codes are kept only as digests.
//!
//! ```text
//!   SignUp ──▶ pending_verification ──VerifyEmail──▶ active ◀──EnableUser── disabled
//!   CreateUser ─────────────────────────────────────▶ active ──DisableUser─▶ disabled
//!   federated sign-up (UserSignedUpFederated + IdentityLinked) ──▶ active
//!   any ──EraseUser──▶ erased (final)
//! ```

use chrono::{DateTime, Duration, Utc};
use gatehouse_core::ApiError;
use gatehouse_core::crypto::Sealed;
use gatehouse_events::{Aggregate, DomainEvent, RecordedEvent};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use uuid::Uuid;

/// Claim scope of email blind indexes.
pub const EMAIL_CLAIM: &str = "email";
/// Claim scope of linked identities (provider and subject, blind-indexed).
pub const IDENTITY_CLAIM: &str = "identity";

/// The value blind-indexed for an identity claim.
pub fn identity_key(provider_id: Uuid, subject: &str) -> String {
    format!("{provider_id}\n{subject}")
}
/// How long a code lives.
pub const CODE_LIFETIME: Duration = Duration::minutes(10);
/// Wrong answers before a code is dead.
pub const CODE_ATTEMPTS: u32 = 5;

/// What is sealed as `profile`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// Normalised email.
    pub email: String,
    /// Collected attributes.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

/// What is sealed as a notification's `message`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Email address or phone number.
    pub to: String,
    /// Subject line (email).
    pub subject: String,
    /// Text.
    pub body: String,
    /// The one-time code it carries, if any.
    pub code: Option<String>,
}

/// Delivery channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    /// Email.
    Email,
    /// SMS.
    Sms,
}

/// What a one-time code is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CodePurpose {
    /// Email verification after sign-up.
    VerifyEmail,
    /// Password reset.
    ResetPassword,
    /// Phone verification.
    VerifyPhone,
}

impl CodePurpose {
    /// How the code travels and what the message says: (channel, subject, text before the code).
    pub fn wording(self) -> (Channel, &'static str, &'static str) {
        match self {
            CodePurpose::VerifyEmail => (
                Channel::Email,
                "Verify your email",
                "Your verification code is",
            ),
            CodePurpose::ResetPassword => (
                Channel::Email,
                "Reset your password",
                "Your password reset code is",
            ),
            CodePurpose::VerifyPhone => (Channel::Sms, "", "Your verification code is"),
        }
    }

    /// The purpose string mixed into the code digest.
    pub fn as_str(self) -> &'static str {
        match self {
            CodePurpose::VerifyEmail => "verify_email",
            CodePurpose::ResetPassword => "reset_password",
            CodePurpose::VerifyPhone => "verify_phone",
        }
    }
}

/// Events of a user stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum UserEvent {
    /// A customer signed up through an app; the email is not verified yet.
    UserSignedUp {
        /// The app they signed up through.
        application_id: Uuid,
        /// Email and attributes.
        profile: Sealed,
        /// The password hash.
        credential: Sealed,
        /// The password is in the breached-password list (the tenant lets such passwords
        /// through): Identity Protection records leaked credentials.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        breached: bool,
    },
    /// A customer signed up through an identity provider (no password; the identity is
    /// linked by the `IdentityLinked` that follows).
    UserSignedUpFederated {
        /// The app they signed up through.
        application_id: Uuid,
        /// Email and attributes.
        profile: Sealed,
        /// The provider verified the email.
        email_verified: bool,
    },
    /// A platform team created the user.
    UserCreated {
        /// Email and attributes.
        profile: Sealed,
        /// The password hash, if any.
        credential: Option<Sealed>,
        /// Whether the email counts as verified.
        email_verified: bool,
    },
    /// A one-time code was issued (only its digest is kept).
    CodeIssued {
        /// What it is for.
        purpose: CodePurpose,
        /// HMAC digest of the code.
        digest: String,
        /// Expiry.
        expires_at: DateTime<Utc>,
    },
    /// A wrong code was entered.
    CodeRejected {
        /// For which purpose.
        purpose: CodePurpose,
    },
    /// The email was verified.
    EmailVerified,
    /// The profile attributes were replaced.
    ProfileUpdated {
        /// Email and attributes.
        profile: Sealed,
    },
    /// The password changed (after the current one, or a reset code).
    PasswordChanged {
        /// The new hash.
        credential: Sealed,
        /// `change`, `reset`, or `policy` (asked for by the sign-in).
        reason: String,
        /// The new password is in the breached-password list.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        breached: bool,
    },
    /// An unverified phone was set.
    PhoneAdded {
        /// The number.
        phone: Sealed,
    },
    /// The phone was verified.
    PhoneVerified,
    /// Sign-in refused until enabled.
    UserDisabled,
    /// Enabled again.
    UserEnabled,
    /// A smart-lockout was lifted.
    UserUnlocked,
    /// A message to the user (the outbox: the notifier delivers it from the log).
    NotificationRequested {
        /// Email or SMS.
        channel: Channel,
        /// Recipient, subject, text and code.
        message: Sealed,
    },
    /// The user was erased; their data key is destroyed.
    UserErased,
    /// A TOTP secret was generated; it counts once a first code confirms it.
    TotpEnrollmentStarted {
        /// The secret (base32), sealed.
        secret: Sealed,
    },
    /// The pending TOTP secret was confirmed by a valid code.
    TotpEnrolled {
        /// The time step of the confirming code (refused from now on).
        step: u64,
    },
    /// A TOTP code was accepted; codes of this step or earlier are refused from now on.
    TotpCodeAccepted {
        /// The accepted time step.
        step: u64,
    },
    /// A fresh set of recovery codes replaced any earlier one (only digests are kept).
    RecoveryCodesGenerated {
        /// One digest per code.
        digests: Vec<String>,
    },
    /// A recovery code was spent.
    RecoveryCodeUsed {
        /// Its index in the set.
        index: usize,
    },
    /// An identity at a provider was linked (the claim on `identity` makes it unique).
    IdentityLinked {
        /// The provider.
        provider_id: Uuid,
        /// Blind index of provider and subject (the claim's value).
        identity: String,
        /// The provider's subject, sealed.
        subject: Sealed,
    },
    /// A linked identity was removed.
    IdentityUnlinked {
        /// Its blind index.
        identity: String,
    },
    /// A second factor was removed.
    MfaMethodRemoved {
        /// `totp`, `recovery_code` or `sms_otp` (the phone is removed).
        method: String,
    },
}

impl DomainEvent for UserEvent {}

/// Lifecycle state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// No such user.
    #[default]
    Absent,
    /// Signed up, email unverified.
    PendingVerification,
    /// Can sign in.
    Active,
    /// Sign-in refused.
    Disabled,
    /// Erased.
    Erased,
}

/// A pending code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingCode {
    /// HMAC digest.
    pub digest: String,
    /// Expiry.
    pub expires_at: DateTime<Utc>,
    /// Wrong answers so far.
    pub failures: u32,
}

/// A user's state.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct User {
    /// Lifecycle.
    pub status: Status,
    /// Sealed email and attributes.
    pub profile: Option<Sealed>,
    /// Sealed password hash.
    pub credential: Option<Sealed>,
    /// Email verified.
    pub email_verified: bool,
    /// Sealed phone.
    pub phone: Option<Sealed>,
    /// Phone verified.
    pub phone_verified: bool,
    /// Pending codes by purpose.
    pub codes: BTreeMap<String, PendingCode>,
    /// Creation time.
    pub created_at: Option<DateTime<Utc>>,
    /// The owning tenant.
    pub tenant_id: Option<Uuid>,
    /// Second factors.
    #[serde(default)]
    pub mfa: MfaState,
    /// Linked identities by blind index (the claim's value).
    #[serde(default)]
    pub identities: BTreeMap<String, LinkedIdentity>,
}

/// An identity at a provider, linked to the user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkedIdentity {
    /// The provider.
    pub provider_id: Uuid,
    /// The provider's subject, sealed.
    pub subject: Sealed,
    /// When.
    pub linked_at: DateTime<Utc>,
}

/// A user's second factors.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct MfaState {
    /// The sealed TOTP secret, once confirmed.
    pub totp_secret: Option<Sealed>,
    /// A generated secret awaiting its first code.
    pub pending_totp_secret: Option<Sealed>,
    /// The last TOTP step accepted (replay protection).
    pub totp_last_step: u64,
    /// Recovery code digests; `None` once spent.
    pub recovery_codes: Vec<Option<String>>,
}

impl MfaState {
    /// Unspent recovery codes.
    pub fn recovery_codes_left(&self) -> usize {
        self.recovery_codes.iter().flatten().count()
    }
}

impl Aggregate for User {
    const STREAM_TYPE: &'static str = "user";
    type Event = UserEvent;

    fn apply(&mut self, event: UserEvent, envelope: &RecordedEvent) {
        match event {
            UserEvent::UserSignedUp {
                profile,
                credential,
                ..
            } => {
                self.status = Status::PendingVerification;
                self.tenant_id = Some(envelope.tenant_id);
                self.profile = Some(profile);
                self.credential = Some(credential);
                self.created_at = Some(envelope.recorded_at);
            }
            UserEvent::UserSignedUpFederated {
                profile,
                email_verified,
                ..
            } => {
                self.status = Status::Active;
                self.tenant_id = Some(envelope.tenant_id);
                self.profile = Some(profile);
                self.email_verified = email_verified;
                self.created_at = Some(envelope.recorded_at);
            }
            UserEvent::IdentityLinked {
                provider_id,
                identity,
                subject,
            } => {
                self.identities.insert(
                    identity,
                    LinkedIdentity {
                        provider_id,
                        subject,
                        linked_at: envelope.recorded_at,
                    },
                );
            }
            UserEvent::IdentityUnlinked { identity } => {
                self.identities.remove(&identity);
            }
            UserEvent::UserCreated {
                profile,
                credential,
                email_verified,
            } => {
                self.status = Status::Active;
                self.tenant_id = Some(envelope.tenant_id);
                self.profile = Some(profile);
                self.credential = credential;
                self.email_verified = email_verified;
                self.created_at = Some(envelope.recorded_at);
            }
            UserEvent::CodeIssued {
                purpose,
                digest,
                expires_at,
            } => {
                self.codes.insert(
                    purpose.as_str().into(),
                    PendingCode {
                        digest,
                        expires_at,
                        failures: 0,
                    },
                );
            }
            UserEvent::CodeRejected { purpose } => {
                if let Some(code) = self.codes.get_mut(purpose.as_str()) {
                    code.failures += 1;
                }
            }
            UserEvent::EmailVerified => {
                self.email_verified = true;
                self.codes.remove(CodePurpose::VerifyEmail.as_str());
                if self.status == Status::PendingVerification {
                    self.status = Status::Active;
                }
            }
            UserEvent::ProfileUpdated { profile } => self.profile = Some(profile),
            UserEvent::PasswordChanged { credential, .. } => {
                self.credential = Some(credential);
                self.codes.remove(CodePurpose::ResetPassword.as_str());
            }
            UserEvent::PhoneAdded { phone } => {
                self.phone = Some(phone);
                self.phone_verified = false;
            }
            UserEvent::PhoneVerified => {
                self.phone_verified = true;
                self.codes.remove(CodePurpose::VerifyPhone.as_str());
            }
            UserEvent::UserDisabled => self.status = Status::Disabled,
            UserEvent::UserEnabled => self.status = Status::Active,
            UserEvent::UserUnlocked | UserEvent::NotificationRequested { .. } => {}
            UserEvent::TotpEnrollmentStarted { secret } => {
                self.mfa.pending_totp_secret = Some(secret);
            }
            UserEvent::TotpEnrolled { step } => {
                self.mfa.totp_secret = self.mfa.pending_totp_secret.take();
                self.mfa.totp_last_step = step;
            }
            UserEvent::TotpCodeAccepted { step } => {
                self.mfa.totp_last_step = self.mfa.totp_last_step.max(step);
            }
            UserEvent::RecoveryCodesGenerated { digests } => {
                self.mfa.recovery_codes = digests.into_iter().map(Some).collect();
            }
            UserEvent::RecoveryCodeUsed { index } => {
                if let Some(code) = self.mfa.recovery_codes.get_mut(index) {
                    *code = None;
                }
            }
            UserEvent::MfaMethodRemoved { method } => match method.as_str() {
                "totp" => {
                    self.mfa.totp_secret = None;
                    self.mfa.pending_totp_secret = None;
                }
                "recovery_code" => self.mfa.recovery_codes.clear(),
                "sms_otp" => {
                    self.phone = None;
                    self.phone_verified = false;
                }
                _ => {}
            },
            UserEvent::UserErased => {
                *self = User {
                    status: Status::Erased,
                    created_at: self.created_at,
                    tenant_id: self.tenant_id,
                    ..User::default()
                };
            }
        }
    }
}

impl User {
    /// The user's email, opened from the sealed profile (`None` without one, or once the
    /// user is erased).
    pub async fn email(
        &self,
        crypto: &gatehouse_core::crypto::Crypto,
        user_id: Uuid,
    ) -> Result<Option<String>, gatehouse_core::crypto::CryptoError> {
        Ok(match &self.profile {
            Some(sealed) => crypto
                .open::<Profile>(user_id, sealed)
                .await?
                .map(|p| p.email),
            None => None,
        })
    }

    /// Exists and is not erased.
    pub fn exists(&self) -> bool {
        !matches!(self.status, Status::Absent | Status::Erased)
    }
}

/// The outcome of checking a code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeCheck {
    /// Right code, in time.
    Accepted,
    /// Wrong code (counted).
    Rejected,
    /// No live code: none issued, expired, or too many wrong answers.
    Dead,
}

/// Checks `matches` (the digest comparison, done by the caller with the master key) against
/// the pending code for `purpose` at `now`.
pub fn check_code(
    state: &User,
    purpose: CodePurpose,
    now: DateTime<Utc>,
    matches: impl Fn(&str) -> bool,
) -> CodeCheck {
    match state.codes.get(purpose.as_str()) {
        Some(code) if code.expires_at > now && code.failures < CODE_ATTEMPTS => {
            if matches(&code.digest) {
                CodeCheck::Accepted
            } else {
                CodeCheck::Rejected
            }
        }
        _ => CodeCheck::Dead,
    }
}

/// The error every failed code answers with, whatever the reason (no such user, wrong,
/// expired, exhausted): a caller learns nothing about which.
pub fn invalid_code() -> ApiError {
    ApiError::invalid("code", "is invalid or has expired")
}

/// The events of answering a code: success events, or one `CodeRejected`.
pub fn answer_code(
    state: &User,
    purpose: CodePurpose,
    now: DateTime<Utc>,
    matches: impl Fn(&str) -> bool,
    on_success: Vec<UserEvent>,
) -> Result<Vec<UserEvent>, ApiError> {
    if !state.exists() {
        return Err(invalid_code());
    }
    match check_code(state, purpose, now, matches) {
        CodeCheck::Accepted => Ok(on_success),
        // The rejection is recorded even though the call fails: attempts must count.
        CodeCheck::Rejected => Ok(vec![UserEvent::CodeRejected { purpose }]),
        CodeCheck::Dead => Err(invalid_code()),
    }
}
