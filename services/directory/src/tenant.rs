//! The Tenant aggregate: one company's directory, its settings and its API keys.

use chrono::{DateTime, Utc};
use gatehouse_core::ApiError;
use gatehouse_core::error::Validation;
use gatehouse_events::{Aggregate, DomainEvent, RecordedEvent, Upcasters};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::LazyLock;
use uuid::Uuid;

/// Longest tenant display name, in characters.
pub const MAX_DISPLAY_NAME: usize = 200;
/// Longest API key name, in characters.
pub const MAX_KEY_NAME: usize = 100;
/// Most live API keys per tenant.
pub const MAX_API_KEYS: usize = 50;

/// How a customer may prove who they are first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrimaryMethod {
    /// Email and password.
    Password,
    /// A one-time code sent by email (passwordless).
    EmailOtp,
    /// A social or OpenID Connect identity provider.
    Federated,
}

/// Second factors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MfaMethod {
    /// Authenticator app codes.
    Totp,
    /// Codes by email.
    EmailOtp,
    /// Codes by SMS.
    SmsOtp,
    /// Single-use recovery codes.
    RecoveryCode,
}

/// Password rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasswordPolicy {
    /// Minimum length in characters (8 to 256).
    pub min_length: u32,
    /// At least one uppercase letter.
    pub require_uppercase: bool,
    /// At least one lowercase letter.
    pub require_lowercase: bool,
    /// At least one digit.
    pub require_digit: bool,
    /// At least one character that is neither letter nor digit.
    pub require_symbol: bool,
    /// Refuse passwords found in the breached-password list.
    pub reject_breached: bool,
}

/// Smart-lockout rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockoutPolicy {
    /// Failed attempts before a lockout.
    pub threshold: u32,
    /// First lockout, seconds.
    pub first_lockout_seconds: u32,
    /// Multiplier for each further lockout.
    pub growth_factor: u32,
    /// Longest lockout, seconds.
    pub max_lockout_seconds: u32,
}

/// Token and session lifetimes, seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenLifetimes {
    /// Access token.
    pub access_token_seconds: u32,
    /// ID token.
    pub id_token_seconds: u32,
    /// Refresh token.
    pub refresh_token_seconds: u32,
    /// Absolute session lifetime.
    pub session_seconds: u32,
}

/// When Identity Protection speaks up (SPEC §6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RiskSettings {
    /// Brute force: failed passwords on one account within the window.
    pub brute_force_failures: u32,
    /// Password spray: distinct accounts failing from one network within the window.
    pub spray_accounts: u32,
    /// The window of both, minutes.
    pub window_minutes: u32,
    /// Atypical travel: the fastest plausible journey between two sign-ins, km/h.
    pub travel_speed_kmh: u32,
    /// Atypical travel: shorter distances are never atypical (GeoIP is not precise), km.
    pub travel_min_km: u32,
    /// Unfamiliar properties: successful sign-ins a user needs before new properties count.
    pub learning_sign_ins: u32,
    /// Unfamiliar properties: days since the user's first sign-in before they count.
    pub learning_days: u32,
    /// Low-level detections stop counting towards user risk after this many days.
    pub low_risk_age_days: u32,
}

impl Default for RiskSettings {
    fn default() -> Self {
        RiskSettings {
            brute_force_failures: 20,
            spray_accounts: 20,
            window_minutes: 60,
            travel_speed_kmh: 900,
            travel_min_km: 500,
            learning_sign_ins: 10,
            learning_days: 5,
            low_risk_age_days: 180,
        }
    }
}

/// Everything a tenant can configure about sign-up and sign-in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantSettings {
    /// Customers may sign themselves up.
    pub sign_up_enabled: bool,
    /// Allowed primary methods.
    pub allowed_primary_methods: Vec<PrimaryMethod>,
    /// Password rules.
    pub password_policy: PasswordPolicy,
    /// Lockout rules.
    pub lockout_policy: LockoutPolicy,
    /// Offered second factors.
    pub mfa_methods: Vec<MfaMethod>,
    /// MFA for every sign-in.
    pub require_mfa: bool,
    /// Token lifetimes.
    pub token_lifetimes: TokenLifetimes,
    /// Profile attributes collected at sign-up.
    pub collected_attributes: Vec<String>,
    /// Identity Protection thresholds (defaults for settings recorded before they existed).
    #[serde(default)]
    pub risk: RiskSettings,
}

impl Default for TenantSettings {
    /// NIST SP 800-63B-style defaults: length and a breached-password check rather than
    /// character classes; lockout after 10 failures for 1 minute, doubling up to 30 minutes.
    fn default() -> Self {
        TenantSettings {
            sign_up_enabled: true,
            allowed_primary_methods: vec![PrimaryMethod::Password],
            password_policy: PasswordPolicy {
                min_length: 8,
                require_uppercase: false,
                require_lowercase: false,
                require_digit: false,
                require_symbol: false,
                reject_breached: true,
            },
            lockout_policy: LockoutPolicy {
                threshold: 10,
                first_lockout_seconds: 60,
                growth_factor: 2,
                max_lockout_seconds: 30 * 60,
            },
            mfa_methods: vec![
                MfaMethod::Totp,
                MfaMethod::EmailOtp,
                MfaMethod::RecoveryCode,
            ],
            require_mfa: false,
            token_lifetimes: TokenLifetimes {
                access_token_seconds: 15 * 60,
                id_token_seconds: 15 * 60,
                refresh_token_seconds: 14 * 86_400,
                session_seconds: 30 * 86_400,
            },
            collected_attributes: Vec::new(),
            risk: RiskSettings::default(),
        }
    }
}

impl TenantSettings {
    /// Records every rule the settings break, with field paths under `prefix`.
    pub fn validate(&self, prefix: &str, validation: &mut Validation) {
        let field = |name: &str| format!("{prefix}.{name}");
        let mut range = |name: &str, value: u32, min: u32, max: u32| {
            if !(min..=max).contains(&value) {
                validation.add(&field(name), format!("must be between {min} and {max}"));
            }
        };
        range(
            "password_policy.min_length",
            self.password_policy.min_length,
            8,
            256,
        );
        let lockout = &self.lockout_policy;
        range("lockout_policy.threshold", lockout.threshold, 1, 100);
        range(
            "lockout_policy.first_lockout_seconds",
            lockout.first_lockout_seconds,
            1,
            86_400,
        );
        range("lockout_policy.growth_factor", lockout.growth_factor, 1, 10);
        range(
            "lockout_policy.max_lockout_seconds",
            lockout.max_lockout_seconds,
            1,
            30 * 86_400,
        );
        let tokens = &self.token_lifetimes;
        range(
            "token_lifetimes.access_token_seconds",
            tokens.access_token_seconds,
            60,
            86_400,
        );
        range(
            "token_lifetimes.id_token_seconds",
            tokens.id_token_seconds,
            60,
            86_400,
        );
        range(
            "token_lifetimes.refresh_token_seconds",
            tokens.refresh_token_seconds,
            3_600,
            365 * 86_400,
        );
        range(
            "token_lifetimes.session_seconds",
            tokens.session_seconds,
            3_600,
            365 * 86_400,
        );
        let risk = &self.risk;
        range(
            "risk.brute_force_failures",
            risk.brute_force_failures,
            2,
            10_000,
        );
        range("risk.spray_accounts", risk.spray_accounts, 2, 10_000);
        range("risk.window_minutes", risk.window_minutes, 1, 7 * 24 * 60);
        range("risk.travel_speed_kmh", risk.travel_speed_kmh, 100, 20_000);
        range("risk.travel_min_km", risk.travel_min_km, 0, 20_000);
        range("risk.learning_sign_ins", risk.learning_sign_ins, 0, 1_000);
        range("risk.learning_days", risk.learning_days, 0, 365);
        range("risk.low_risk_age_days", risk.low_risk_age_days, 1, 3_650);
        if lockout.max_lockout_seconds < lockout.first_lockout_seconds {
            validation.add(
                &field("lockout_policy.max_lockout_seconds"),
                "must be at least first_lockout_seconds",
            );
        }
        if tokens.session_seconds < tokens.refresh_token_seconds {
            validation.add(
                &field("token_lifetimes.session_seconds"),
                "must be at least refresh_token_seconds",
            );
        }
        if self.allowed_primary_methods.is_empty() {
            validation.add(
                &field("allowed_primary_methods"),
                "needs at least one method",
            );
        }
        if has_duplicates(&self.allowed_primary_methods) {
            validation.add(&field("allowed_primary_methods"), "lists a method twice");
        }
        if has_duplicates(&self.mfa_methods) {
            validation.add(&field("mfa_methods"), "lists a method twice");
        }
        if self.require_mfa
            && !self
                .mfa_methods
                .iter()
                .any(|m| *m != MfaMethod::RecoveryCode)
        {
            validation.add(
                &field("require_mfa"),
                "needs an MFA method other than recovery codes",
            );
        }
        if self.collected_attributes.len() > 20 {
            validation.add(&field("collected_attributes"), "at most 20 attributes");
        }
        for (i, name) in self.collected_attributes.iter().enumerate() {
            let valid = (1..=64).contains(&name.len())
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !valid {
                validation.add(
                    &format!("{prefix}.collected_attributes[{i}]"),
                    "1 to 64 characters of a-z, 0-9 and _",
                );
            }
        }
        if has_duplicates(&self.collected_attributes) {
            validation.add(&field("collected_attributes"), "lists an attribute twice");
        }
    }
}

fn has_duplicates<T: PartialEq>(items: &[T]) -> bool {
    items
        .iter()
        .enumerate()
        .any(|(i, a)| items[..i].contains(a))
}

/// Events of a tenant stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum TenantEvent {
    /// The tenant was created.
    TenantCreated {
        /// Human name.
        display_name: String,
        /// Initial settings.
        settings: TenantSettings,
    },
    /// The settings were replaced.
    TenantSettingsUpdated {
        /// The new settings.
        settings: TenantSettings,
    },
    /// An API key was created; only its hash is kept.
    ApiKeyCreated {
        /// Key id.
        key_id: Uuid,
        /// Hex SHA-256 of the secret.
        key_hash: String,
        /// Human name.
        name: String,
        /// The key may read personal data (schema version 2; version 1 keys may not).
        personal_data: bool,
    },
    /// An API key was revoked.
    ApiKeyRevoked {
        /// Key id.
        key_id: Uuid,
    },
}

/// `ApiKeyCreated` version 1 → 2: keys created before `personal_data` existed may not read
/// personal data.
fn api_key_created_v1(mut payload: Value) -> Result<Value, String> {
    let Value::Object(fields) = &mut payload else {
        return Err("ApiKeyCreated payload is not an object".into());
    };
    fields.entry("personal_data").or_insert(Value::Bool(false));
    Ok(payload)
}

static UPCASTERS: LazyLock<Upcasters> =
    LazyLock::new(|| Upcasters::new().step("ApiKeyCreated", 1, api_key_created_v1));

impl DomainEvent for TenantEvent {
    fn upcasters() -> &'static Upcasters {
        &UPCASTERS
    }
}

/// What the tenant knows of one API key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyState {
    /// Human name.
    pub name: String,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Revocation time.
    pub revoked_at: Option<DateTime<Utc>>,
    /// The key may read personal data.
    #[serde(default)]
    pub personal_data: bool,
}

/// A tenant's state.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Tenant {
    /// Human name.
    pub display_name: String,
    /// When it was created (`None` while the stream does not exist).
    pub created_at: Option<DateTime<Utc>>,
    /// Current settings.
    pub settings: TenantSettings,
    /// API keys by id.
    pub api_keys: BTreeMap<Uuid, ApiKeyState>,
}

impl Aggregate for Tenant {
    const STREAM_TYPE: &'static str = "tenant";
    type Event = TenantEvent;

    fn apply(&mut self, event: TenantEvent, envelope: &RecordedEvent) {
        match event {
            TenantEvent::TenantCreated {
                display_name,
                settings,
            } => {
                self.display_name = display_name;
                self.settings = settings;
                self.created_at = Some(envelope.recorded_at);
            }
            TenantEvent::TenantSettingsUpdated { settings } => self.settings = settings,
            TenantEvent::ApiKeyCreated {
                key_id,
                name,
                personal_data,
                ..
            } => {
                self.api_keys.insert(
                    key_id,
                    ApiKeyState {
                        name,
                        created_at: envelope.recorded_at,
                        revoked_at: None,
                        personal_data,
                    },
                );
            }
            TenantEvent::ApiKeyRevoked { key_id } => {
                if let Some(key) = self.api_keys.get_mut(&key_id) {
                    key.revoked_at = Some(envelope.recorded_at);
                }
            }
        }
    }
}

impl Tenant {
    /// True once created.
    pub fn exists(&self) -> bool {
        self.created_at.is_some()
    }
}

/// Creates a tenant.
pub fn create(
    state: &Tenant,
    display_name: &str,
    settings: TenantSettings,
) -> Result<Vec<TenantEvent>, ApiError> {
    let mut validation = Validation::new();
    validation.text("display_name", display_name, 1, MAX_DISPLAY_NAME);
    settings.validate("settings", &mut validation);
    validation.finish()?;
    if state.exists() {
        return Err(ApiError::AlreadyExists("the tenant already exists".into()));
    }
    Ok(vec![TenantEvent::TenantCreated {
        display_name: display_name.trim().to_string(),
        settings,
    }])
}

/// Replaces the settings.
pub fn update_settings(
    state: &Tenant,
    settings: TenantSettings,
) -> Result<Vec<TenantEvent>, ApiError> {
    let mut validation = Validation::new();
    settings.validate("settings", &mut validation);
    validation.finish()?;
    if !state.exists() {
        return Err(ApiError::NotFound("tenant".into()));
    }
    if state.settings == settings {
        return Ok(Vec::new());
    }
    Ok(vec![TenantEvent::TenantSettingsUpdated { settings }])
}

/// Adds an API key whose secret hashes to `key_hash`.
pub fn create_api_key(
    state: &Tenant,
    key_id: Uuid,
    key_hash: String,
    name: &str,
    personal_data: bool,
) -> Result<Vec<TenantEvent>, ApiError> {
    let mut validation = Validation::new();
    validation.text("name", name, 1, MAX_KEY_NAME);
    validation.finish()?;
    if !state.exists() {
        return Err(ApiError::NotFound("tenant".into()));
    }
    if state
        .api_keys
        .values()
        .filter(|k| k.revoked_at.is_none())
        .count()
        >= MAX_API_KEYS
    {
        return Err(ApiError::FailedPrecondition(format!(
            "a tenant has at most {MAX_API_KEYS} live API keys"
        )));
    }
    Ok(vec![TenantEvent::ApiKeyCreated {
        key_id,
        key_hash,
        name: name.trim().to_string(),
        personal_data,
    }])
}

/// Revokes an API key (revoking a revoked key changes nothing).
pub fn revoke_api_key(state: &Tenant, key_id: Uuid) -> Result<Vec<TenantEvent>, ApiError> {
    match state.api_keys.get(&key_id) {
        None => Err(ApiError::NotFound("API key".into())),
        Some(key) if key.revoked_at.is_some() => Ok(Vec::new()),
        Some(_) => Ok(vec![TenantEvent::ApiKeyRevoked { key_id }]),
    }
}

#[cfg(test)]
mod schema_tests {
    use super::*;
    use gatehouse_events::StreamId;

    #[test]
    fn a_version_1_api_key_is_read_as_one_that_may_not_read_personal_data()
    -> Result<(), gatehouse_events::StoreError> {
        let key_id = Uuid::now_v7();
        let mut stored = RecordedEvent::pending(
            Uuid::nil(),
            StreamId::new("tenant", Uuid::nil()),
            Utc::now(),
        );
        stored.event_type = "ApiKeyCreated".into();
        stored.schema_version = 1;
        stored.payload = serde_json::value::RawValue::from_string(format!(
            r#"{{"key_id":"{key_id}","key_hash":"00","name":"old"}}"#
        ))
        .map_err(|e| gatehouse_events::StoreError::Invalid(e.to_string()))?;
        let TenantEvent::ApiKeyCreated {
            personal_data,
            name,
            ..
        } = TenantEvent::decode(&stored)?
        else {
            return Err(gatehouse_events::StoreError::Invalid(
                "not ApiKeyCreated".into(),
            ));
        };
        assert!(!personal_data);
        assert_eq!(name, "old");
        // New keys are written at version 2, always with the field.
        let (event_type, version, payload) = TenantEvent::ApiKeyCreated {
            key_id,
            key_hash: "00".into(),
            name: "new".into(),
            personal_data: false,
        }
        .encode()?;
        assert_eq!((event_type.as_str(), version), ("ApiKeyCreated", 2));
        assert_eq!(payload["personal_data"], Value::Bool(false));
        Ok(())
    }
}
