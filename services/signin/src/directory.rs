//! Tenants' settings and apps, as sign-in steps read them on every request.
//!
//! A live view of the tenant and application streams, so a step does not replay a tenant's
//! stream (its API keys included) each time. A miss — a tenant or app created a moment ago
//! that the view has not reached yet — falls back to the store, so a new app can sign people
//! in at once.

use gatehouse_directory::application::{Application, CLIENT_ID_CLAIM};
use gatehouse_directory::tenant::{Tenant, TenantSettings};
use gatehouse_events::view::LiveView;
use gatehouse_events::{
    Aggregate, ClaimKey, DomainEvent, EventFilter, EventStore, Loaded, RecordedEvent, StoreError,
};
use std::collections::HashMap;
use std::sync::Arc;
use uuid::Uuid;

#[derive(Default)]
struct State {
    tenants: HashMap<Uuid, Tenant>,
    apps: HashMap<Uuid, Application>,
    by_client: HashMap<(Uuid, String), Uuid>,
}

fn apply(state: &mut State, event: &RecordedEvent) {
    match event.stream.kind.as_str() {
        Tenant::STREAM_TYPE => {
            if let Ok(decoded) = <Tenant as Aggregate>::Event::decode(event) {
                state
                    .tenants
                    .entry(event.stream.id)
                    .or_default()
                    .apply(decoded, event);
            }
        }
        Application::STREAM_TYPE => {
            if let Ok(decoded) = <Application as Aggregate>::Event::decode(event) {
                let app = state.apps.entry(event.stream.id).or_default();
                app.apply(decoded, event);
                if !app.client_id.is_empty() {
                    state
                        .by_client
                        .insert((event.tenant_id, app.client_id.clone()), event.stream.id);
                }
            }
        }
        _ => {}
    }
}

/// What sign-in needs to know of tenants and apps.
pub struct Directory {
    store: Arc<dyn EventStore>,
    view: LiveView<State>,
}

/// An app as sign-in sees it.
#[derive(Debug, Clone)]
pub struct AppInfo {
    /// Its id.
    pub id: Uuid,
    /// Every sign-in to it needs a second factor.
    pub require_mfa: bool,
}

impl Directory {
    /// Catches up with the tenant and application streams.
    pub async fn start(store: Arc<dyn EventStore>) -> Result<Self, StoreError> {
        let filter = EventFilter {
            stream_types: vec![Tenant::STREAM_TYPE.into(), Application::STREAM_TYPE.into()],
            ..EventFilter::default()
        };
        let view = LiveView::start(store.clone(), filter, State::default(), apply).await?;
        Ok(Directory { store, view })
    }

    /// A tenant's settings, `None` when it does not exist.
    pub async fn tenant(&self, tenant_id: Uuid) -> Result<Option<TenantSettings>, StoreError> {
        let cached = self.view.read(|s| {
            s.tenants
                .get(&tenant_id)
                .filter(|t| t.exists())
                .map(|t| t.settings.clone())
        });
        if cached.is_some() {
            return Ok(cached);
        }
        let loaded = Loaded::<Tenant>::load(self.store.as_ref(), tenant_id).await?;
        Ok(loaded.state.exists().then_some(loaded.state.settings))
    }

    /// The live app of a tenant with this client id.
    pub async fn application(
        &self,
        tenant_id: Uuid,
        client_id: &str,
    ) -> Result<Option<AppInfo>, StoreError> {
        let info = |id: Uuid, app: &Application| {
            (app.exists() && app.tenant_id == Some(tenant_id)).then(|| AppInfo {
                id,
                require_mfa: app.config.as_ref().is_some_and(|c| c.require_mfa),
            })
        };
        let cached = self.view.read(|s| {
            s.by_client
                .get(&(tenant_id, client_id.to_string()))
                .and_then(|id| s.apps.get(id).map(|app| info(*id, app)))
        });
        if let Some(found) = cached {
            return Ok(found);
        }
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
        let app = Loaded::<Application>::load(self.store.as_ref(), owner.id).await?;
        Ok(info(owner.id, &app.state))
    }
}
