//! The Application aggregate: an app of a tenant that customers sign in to.

use chrono::{DateTime, Utc};
use gatehouse_core::ApiError;
use gatehouse_core::error::Validation;
use gatehouse_events::{Aggregate, DomainEvent, RecordedEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Longest display name, in characters.
pub const MAX_DISPLAY_NAME: usize = 200;
/// Most redirect URIs of each kind.
pub const MAX_REDIRECT_URIS: usize = 20;
/// Longest redirect URI.
pub const MAX_URI: usize = 2048;
/// Claim scope of client ids (unique per tenant).
pub const CLIENT_ID_CLAIM: &str = "client_id";

/// Whether the app can keep a secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientType {
    /// Server-side app with a client secret.
    Confidential,
    /// Browser or mobile app: no secret, PKCE.
    Public,
}

/// OAuth grant types an app may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantType {
    /// Authorization code (with PKCE).
    AuthorizationCode,
    /// Refresh token rotation.
    RefreshToken,
}

/// What can be changed after registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppConfig {
    /// Human name.
    pub display_name: String,
    /// Exact redirect URIs.
    pub redirect_uris: Vec<String>,
    /// Exact post-logout redirect URIs.
    pub post_logout_redirect_uris: Vec<String>,
    /// Allowed grants.
    pub grant_types: Vec<GrantType>,
    /// Every sign-in to this app needs a second factor.
    #[serde(default)]
    pub require_mfa: bool,
}

impl AppConfig {
    /// Records every rule the configuration breaks.
    pub fn validate(&self, validation: &mut Validation) {
        validation.text("display_name", &self.display_name, 1, MAX_DISPLAY_NAME);
        validate_uris("redirect_uris", &self.redirect_uris, validation);
        validate_uris(
            "post_logout_redirect_uris",
            &self.post_logout_redirect_uris,
            validation,
        );
        if self.grant_types.is_empty() {
            validation.add("grant_types", "needs at least one grant type");
        }
        if self.grant_types.contains(&GrantType::RefreshToken)
            && !self.grant_types.contains(&GrantType::AuthorizationCode)
        {
            validation.add("grant_types", "refresh_token needs authorization_code");
        }
        if self.grant_types.contains(&GrantType::AuthorizationCode) && self.redirect_uris.is_empty()
        {
            validation.add(
                "redirect_uris",
                "authorization_code needs at least one redirect URI",
            );
        }
    }
}

/// Redirect URIs: absolute, https (http only on loopback), no fragment, no duplicates.
fn validate_uris(field: &str, uris: &[String], validation: &mut Validation) {
    if uris.len() > MAX_REDIRECT_URIS {
        validation.add(field, format!("at most {MAX_REDIRECT_URIS} URIs"));
        return;
    }
    for (i, uri) in uris.iter().enumerate() {
        let path = format!("{field}[{i}]");
        if uri.len() > MAX_URI {
            validation.add(&path, format!("must be at most {MAX_URI} characters"));
            continue;
        }
        match url::Url::parse(uri) {
            Err(_) => validation.add(&path, "must be an absolute URI"),
            Ok(parsed) => {
                let loopback =
                    matches!(parsed.host_str(), Some("localhost" | "127.0.0.1" | "[::1]"));
                if parsed.fragment().is_some() {
                    validation.add(&path, "must not have a fragment");
                } else if parsed.scheme() == "http" && !loopback {
                    validation.add(&path, "must use https (http only for localhost)");
                } else if !matches!(parsed.scheme(), "http" | "https") {
                    validation.add(&path, "must use https");
                } else if !parsed.username().is_empty() || parsed.password().is_some() {
                    validation.add(&path, "must not carry credentials");
                }
            }
        }
        if uris[..i].contains(uri) {
            validation.add(&path, "is listed twice");
        }
    }
}

/// Events of an application stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ApplicationEvent {
    /// The app was registered.
    ApplicationRegistered {
        /// Generated client id.
        client_id: String,
        /// Public or confidential.
        client_type: ClientType,
        /// Hex SHA-256 of the client secret (confidential apps).
        client_secret_hash: Option<String>,
        /// Its configuration.
        config: AppConfig,
    },
    /// The configuration was replaced.
    ApplicationUpdated {
        /// The new configuration.
        config: AppConfig,
    },
    /// The app was deleted.
    ApplicationDeleted,
}

impl DomainEvent for ApplicationEvent {}

/// An application's state.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Application {
    /// Client id (empty until registered).
    pub client_id: String,
    /// Client type.
    pub client_type: Option<ClientType>,
    /// Hash of the client secret.
    pub client_secret_hash: Option<String>,
    /// Configuration.
    pub config: Option<AppConfig>,
    /// Registration time.
    pub created_at: Option<DateTime<Utc>>,
    /// Deleted apps keep their history but no longer exist.
    pub deleted: bool,
    /// The owning tenant.
    pub tenant_id: Option<Uuid>,
}

impl Aggregate for Application {
    const STREAM_TYPE: &'static str = "application";
    type Event = ApplicationEvent;

    fn apply(&mut self, event: ApplicationEvent, envelope: &RecordedEvent) {
        match event {
            ApplicationEvent::ApplicationRegistered {
                client_id,
                client_type,
                client_secret_hash,
                config,
            } => {
                self.client_id = client_id;
                self.client_type = Some(client_type);
                self.client_secret_hash = client_secret_hash;
                self.config = Some(config);
                self.created_at = Some(envelope.recorded_at);
                self.tenant_id = Some(envelope.tenant_id);
            }
            ApplicationEvent::ApplicationUpdated { config } => self.config = Some(config),
            ApplicationEvent::ApplicationDeleted => self.deleted = true,
        }
    }
}

impl Application {
    /// Registered and not deleted.
    pub fn exists(&self) -> bool {
        self.created_at.is_some() && !self.deleted
    }
}

/// Registers an app.
pub fn register(
    state: &Application,
    client_id: String,
    client_type: ClientType,
    client_secret_hash: Option<String>,
    config: AppConfig,
) -> Result<Vec<ApplicationEvent>, ApiError> {
    let mut validation = Validation::new();
    config.validate(&mut validation);
    validation.finish()?;
    if state.created_at.is_some() {
        return Err(ApiError::AlreadyExists(
            "the application already exists".into(),
        ));
    }
    Ok(vec![ApplicationEvent::ApplicationRegistered {
        client_id,
        client_type,
        client_secret_hash,
        config,
    }])
}

/// Replaces the configuration.
pub fn update(state: &Application, config: AppConfig) -> Result<Vec<ApplicationEvent>, ApiError> {
    let mut validation = Validation::new();
    config.validate(&mut validation);
    validation.finish()?;
    if !state.exists() {
        return Err(ApiError::NotFound("application".into()));
    }
    if state.config.as_ref() == Some(&config) {
        return Ok(Vec::new());
    }
    Ok(vec![ApplicationEvent::ApplicationUpdated { config }])
}

/// Deletes the app.
pub fn delete(state: &Application) -> Result<Vec<ApplicationEvent>, ApiError> {
    if !state.exists() {
        return Err(ApiError::NotFound("application".into()));
    }
    Ok(vec![ApplicationEvent::ApplicationDeleted])
}
