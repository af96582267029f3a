//! The IdentityProvider aggregate: a social or OpenID Connect provider a tenant's customers
//! may sign up and sign in with (stream `idp/<id>`).
//!
//! The client secret is sealed with the provider's own data key (the provider is the
//! subject), so it never appears in clear in the log. Talking to the provider (discovery,
//! code exchange, ID token checks) is the sign-in crate's `federation` module.

use chrono::{DateTime, Utc};
use gatehouse_core::crypto::Sealed;
use gatehouse_core::error::Validation;
use gatehouse_events::{Aggregate, DomainEvent, RecordedEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Longest display name, in characters.
pub const MAX_DISPLAY_NAME: usize = 100;
/// Longest URL, client id or claim name.
const MAX_TEXT: usize = 2048;
/// Most extra scopes.
const MAX_SCOPES: usize = 20;
/// Google's issuer.
pub const GOOGLE_ISSUER: &str = "https://accounts.google.com";
/// Apple's issuer.
pub const APPLE_ISSUER: &str = "https://appleid.apple.com";
/// Facebook's Graph API.
pub const FACEBOOK_GRAPH: &str = "https://graph.facebook.com/v19.0";
/// Facebook's login dialog (for the default Graph API base).
pub const FACEBOOK_DIALOG: &str = "https://www.facebook.com/v19.0/dialog/oauth";

/// How Gatehouse talks to the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// OpenID Connect, Google's issuer by default.
    Google,
    /// OAuth 2.0 and the Graph API's `/me`.
    Facebook,
    /// OpenID Connect, Apple's issuer by default.
    Apple,
    /// Any OpenID Connect provider.
    Oidc,
}

impl Kind {
    /// The lowercase name used in Conditional Access (`federated:<kind>`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Google => "google",
            Kind::Facebook => "facebook",
            Kind::Apple => "apple",
            Kind::Oidc => "oidc",
        }
    }
}

/// Which claims hold what (empty: the default name).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimMapping {
    /// Default `email`.
    pub email: String,
    /// Default `name`.
    pub name: String,
    /// Default `email_verified`.
    pub email_verified: String,
}

impl ClaimMapping {
    /// The claim holding the email.
    pub fn email(&self) -> &str {
        non_empty(&self.email, "email")
    }

    /// The claim holding the display name.
    pub fn name(&self) -> &str {
        non_empty(&self.name, "name")
    }

    /// The claim saying whether the email is verified.
    pub fn email_verified(&self) -> &str {
        non_empty(&self.email_verified, "email_verified")
    }
}

fn non_empty<'a>(value: &'a str, default: &'a str) -> &'a str {
    if value.is_empty() { default } else { value }
}

/// A provider's configuration as stored (the secret sealed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderConfig {
    /// Protocol.
    pub kind: Kind,
    /// Shown to people.
    pub display_name: String,
    /// Issuer (OpenID Connect kinds), defaults filled in.
    pub issuer: String,
    /// Our client id at the provider.
    pub client_id: String,
    /// Our client secret, sealed for the provider.
    pub client_secret: Sealed,
    /// Scopes besides `openid`.
    pub scopes: Vec<String>,
    /// Claim names.
    pub claim_mapping: ClaimMapping,
    /// Facebook's Graph API base URL.
    pub base_url: String,
}

/// A configuration as a caller gives it, before the secret is sealed.
#[derive(Debug, Clone, Default)]
pub struct ConfigInput {
    /// Protocol (`None`: not given).
    pub kind: Option<Kind>,
    /// Shown to people.
    pub display_name: String,
    /// Issuer; empty takes the kind's default.
    pub issuer: String,
    /// Client id.
    pub client_id: String,
    /// Client secret; empty keeps the stored one (update) or is refused (create).
    pub client_secret: String,
    /// Scopes; empty takes the kind's default.
    pub scopes: Vec<String>,
    /// Claim names.
    pub claim_mapping: ClaimMapping,
    /// Facebook's base URL; empty takes the default.
    pub base_url: String,
}

impl ConfigInput {
    /// Fills in the kind's defaults and records every rule the input breaks. `creating`:
    /// the secret is required.
    pub fn normalize(&mut self, creating: bool, validation: &mut Validation) {
        let Some(kind) = self.kind else {
            validation.add("config.kind", "must be GOOGLE, FACEBOOK, APPLE or OIDC");
            return;
        };
        validation.text(
            "config.display_name",
            &self.display_name,
            1,
            MAX_DISPLAY_NAME,
        );
        validation.text("config.client_id", &self.client_id, 1, 512);
        if creating && self.client_secret.is_empty() {
            validation.add("config.client_secret", "is required");
        }
        if self.client_secret.chars().count() > 4096 {
            validation.add("config.client_secret", "must be at most 4096 characters");
        }
        match kind {
            Kind::Google | Kind::Apple | Kind::Oidc => {
                if self.issuer.is_empty() {
                    match kind {
                        Kind::Google => self.issuer = GOOGLE_ISSUER.into(),
                        Kind::Apple => self.issuer = APPLE_ISSUER.into(),
                        _ => validation.add("config.issuer", "is required for OIDC providers"),
                    }
                }
                if !self.issuer.is_empty() {
                    check_url("config.issuer", &self.issuer, validation);
                }
                if !self.base_url.is_empty() {
                    validation.add("config.base_url", "is only for FACEBOOK providers");
                }
                if self.scopes.is_empty() {
                    self.scopes = vec!["email".into(), "profile".into()];
                }
            }
            Kind::Facebook => {
                if !self.issuer.is_empty() {
                    validation.add("config.issuer", "FACEBOOK has no issuer; use base_url");
                }
                if self.base_url.is_empty() {
                    self.base_url = FACEBOOK_GRAPH.into();
                }
                check_url("config.base_url", &self.base_url, validation);
                if self.scopes.is_empty() {
                    self.scopes = vec!["email".into()];
                }
            }
        }
        // Normalised without a trailing slash (the issuer is compared exactly).
        while self.base_url.ends_with('/') {
            self.base_url.pop();
        }
        if self.scopes.len() > MAX_SCOPES {
            validation.add("config.scopes", format!("at most {MAX_SCOPES}"));
        }
        for (i, scope) in self.scopes.iter().enumerate() {
            let valid = !scope.is_empty()
                && scope.len() <= 128
                && scope
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\');
            if !valid {
                validation.add(
                    &format!("config.scopes[{i}]"),
                    "must be 1 to 128 visible ASCII characters",
                );
            } else if scope == "openid" {
                validation.add(&format!("config.scopes[{i}]"), "openid is always requested");
            }
        }
        for (field, value) in [
            ("email", &self.claim_mapping.email),
            ("name", &self.claim_mapping.name),
            ("email_verified", &self.claim_mapping.email_verified),
        ] {
            if value.len() > 128 || value.chars().any(char::is_control) {
                validation.add(
                    &format!("config.claim_mapping.{field}"),
                    "must be at most 128 characters, no control characters",
                );
            }
        }
    }
}

/// Provider endpoints: https, or http on a loopback address (tests, local development);
/// no credentials, query or fragment.
fn check_url(field: &str, value: &str, validation: &mut Validation) {
    if value.len() > MAX_TEXT {
        validation.add(field, format!("must be at most {MAX_TEXT} characters"));
        return;
    }
    match url::Url::parse(value) {
        Err(_) => validation.add(field, "must be an absolute URL"),
        Ok(url) => {
            let loopback = match url.host() {
                Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                Some(url::Host::Domain(host)) => host == "localhost",
                None => false,
            };
            if url.scheme() != "https" && !(url.scheme() == "http" && loopback) {
                validation.add(field, "must use https (http only for loopback addresses)");
            } else if !url.username().is_empty() || url.password().is_some() {
                validation.add(field, "must not carry credentials");
            } else if url.query().is_some() || url.fragment().is_some() {
                validation.add(field, "must not have a query or fragment");
            }
        }
    }
}

/// Events of an identity provider stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum IdentityProviderEvent {
    /// Configured.
    IdentityProviderCreated {
        /// The configuration.
        config: ProviderConfig,
    },
    /// Reconfigured (the whole configuration).
    IdentityProviderUpdated {
        /// The configuration.
        config: ProviderConfig,
    },
    /// Removed.
    IdentityProviderDeleted,
}

impl DomainEvent for IdentityProviderEvent {}

/// A provider's state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IdentityProvider {
    /// Owner.
    pub tenant_id: Option<Uuid>,
    /// Configuration (`None` before creation and after deletion).
    pub config: Option<ProviderConfig>,
    /// Creation time.
    pub created_at: Option<DateTime<Utc>>,
}

impl Aggregate for IdentityProvider {
    const STREAM_TYPE: &'static str = "idp";
    type Event = IdentityProviderEvent;

    fn apply(&mut self, event: IdentityProviderEvent, envelope: &RecordedEvent) {
        match event {
            IdentityProviderEvent::IdentityProviderCreated { config } => {
                self.tenant_id = Some(envelope.tenant_id);
                self.created_at = Some(envelope.recorded_at);
                self.config = Some(config);
            }
            IdentityProviderEvent::IdentityProviderUpdated { config } => {
                self.config = Some(config);
            }
            IdentityProviderEvent::IdentityProviderDeleted => self.config = None,
        }
    }
}

impl IdentityProvider {
    /// The configuration, when the provider exists and belongs to `tenant_id`.
    pub fn of_tenant(&self, tenant_id: Uuid) -> Option<&ProviderConfig> {
        self.config
            .as_ref()
            .filter(|_| self.tenant_id == Some(tenant_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(kind: Kind) -> ConfigInput {
        ConfigInput {
            kind: Some(kind),
            display_name: "Provider".into(),
            client_id: "client".into(),
            client_secret: "secret".into(),
            ..ConfigInput::default()
        }
    }

    #[test]
    fn defaults_are_filled_in_and_bad_urls_refused() {
        let mut google = input(Kind::Google);
        let mut validation = Validation::new();
        google.normalize(true, &mut validation);
        assert!(validation.finish().is_ok());
        assert_eq!(google.issuer, GOOGLE_ISSUER);
        assert_eq!(google.scopes, ["email", "profile"]);

        let mut facebook = input(Kind::Facebook);
        let mut validation = Validation::new();
        facebook.normalize(true, &mut validation);
        assert!(validation.finish().is_ok());
        assert_eq!(facebook.base_url, FACEBOOK_GRAPH);

        for issuer in [
            "http://idp.example.com",
            "https://user:pw@idp.example.com",
            "https://idp.example.com/?a=b",
            "not a url",
        ] {
            let mut oidc = input(Kind::Oidc);
            oidc.issuer = issuer.into();
            let mut validation = Validation::new();
            oidc.normalize(true, &mut validation);
            assert!(validation.finish().is_err(), "{issuer} accepted");
        }
        let mut local = input(Kind::Oidc);
        local.issuer = "http://127.0.0.1:8080".into();
        let mut validation = Validation::new();
        local.normalize(true, &mut validation);
        assert!(validation.finish().is_ok());

        let mut no_secret = input(Kind::Oidc);
        no_secret.issuer = "https://idp.example.com".into();
        no_secret.client_secret.clear();
        let mut validation = Validation::new();
        no_secret.normalize(true, &mut validation);
        assert!(validation.finish().is_err());
        let mut validation = Validation::new();
        no_secret.normalize(false, &mut validation);
        assert!(validation.finish().is_ok(), "an update may keep the secret");
    }
}
