//! Tenants' settings and apps, as sign-in steps read them.
//!
//! Read from their streams on every step rather than from a live view: a tenant that turns
//! MFA on, or an app that is deleted, takes effect on the very next step in every process.
//! The states are kept ([`StateCache`]), so a step reads only what was appended to the
//! stream since, usually nothing.

use gatehouse_directory::application::{
    AppConfig, Application, CLIENT_ID_CLAIM, ClientType, GrantType,
};
use gatehouse_directory::tenant::{Tenant, TenantSettings};
use gatehouse_events::{Aggregate, ClaimKey, EventStore, StateCache, StoreError};
use std::sync::Arc;
use uuid::Uuid;

/// What sign-in needs to know of tenants and apps.
pub struct Directory {
    store: Arc<dyn EventStore>,
    tenants: StateCache<Tenant>,
    applications: StateCache<Application>,
}

/// Tenants and apps whose states a process keeps.
const KEPT: usize = 1024;

/// An app as sign-in sees it.
#[derive(Debug, Clone)]
pub struct AppInfo {
    /// Its id.
    pub id: Uuid,
    /// Every sign-in to it needs a second factor.
    pub require_mfa: bool,
    /// Its registered redirect URIs.
    pub redirect_uris: Vec<String>,
    /// Where RP-initiated logout may send the person back to.
    pub post_logout_redirect_uris: Vec<String>,
    /// Public (PKCE, no secret) or confidential.
    pub client_type: ClientType,
    /// Hex SHA-256 of the client secret (confidential apps).
    pub client_secret_hash: Option<String>,
    /// Grants it may use.
    pub grant_types: Vec<GrantType>,
}

impl Directory {
    /// Reads from `store`.
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Directory {
            store,
            tenants: StateCache::new(KEPT),
            applications: StateCache::new(KEPT),
        }
    }

    /// A tenant's settings, `None` when it does not exist.
    pub async fn tenant(&self, tenant_id: Uuid) -> Result<Option<TenantSettings>, StoreError> {
        let loaded = self.tenants.load(self.store.as_ref(), tenant_id).await?;
        Ok(loaded.state.exists().then_some(loaded.state.settings))
    }

    /// The live app of a tenant with this client id.
    pub async fn application(
        &self,
        tenant_id: Uuid,
        client_id: &str,
    ) -> Result<Option<AppInfo>, StoreError> {
        if client_id.is_empty() || client_id.len() > 128 {
            return Ok(None);
        }
        let claim = ClaimKey {
            tenant_id,
            scope: CLIENT_ID_CLAIM.into(),
            value: client_id.to_string(),
        };
        let Some(owner) = self.store.claim_owner(&claim).await? else {
            return Ok(None);
        };
        if owner.kind != Application::STREAM_TYPE {
            return Ok(None);
        }
        self.application_by_id(tenant_id, owner.id).await
    }

    /// The live app of a tenant with this id.
    pub async fn application_by_id(
        &self,
        tenant_id: Uuid,
        id: Uuid,
    ) -> Result<Option<AppInfo>, StoreError> {
        let state = self.applications.load(self.store.as_ref(), id).await?.state;
        if !state.exists() || state.tenant_id != Some(tenant_id) {
            return Ok(None);
        }
        let config = state.config.unwrap_or_else(|| AppConfig {
            display_name: String::new(),
            redirect_uris: Vec::new(),
            post_logout_redirect_uris: Vec::new(),
            grant_types: Vec::new(),
            require_mfa: false,
        });
        Ok(Some(AppInfo {
            id,
            require_mfa: config.require_mfa,
            redirect_uris: config.redirect_uris,
            post_logout_redirect_uris: config.post_logout_redirect_uris,
            client_type: state.client_type.unwrap_or(ClientType::Public),
            client_secret_hash: state.client_secret_hash,
            grant_types: config.grant_types,
        }))
    }
}
