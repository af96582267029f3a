//! API keys: who a bearer key belongs to.
//!
//! Keys are 32 random bytes (base64url, prefixed `gh_`), so a fast hash is enough: only
//! SHA-256 of a key is ever stored (in the events that create it). The [`KeyRing`] is a
//! live view of those events, so a key created or revoked through any process is honoured by
//! every process within a subscription round trip.

use crate::error::ApiError;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use gatehouse_events::view::LiveView;
use gatehouse_events::{Actor, EventFilter, EventStore, RecordedEvent, StoreError};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Status};
use uuid::Uuid;

/// Event type of a new platform admin key (payload: [`KeyCreated`]).
pub const ADMIN_KEY_CREATED: &str = "AdminKeyCreated";
/// Event type of a new tenant API key (payload: [`KeyCreated`]).
pub const API_KEY_CREATED: &str = "ApiKeyCreated";
/// Event type of a revoked tenant API key (payload: [`KeyRevoked`]).
pub const API_KEY_REVOKED: &str = "ApiKeyRevoked";

/// Payload fields every key-creation event carries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyCreated {
    /// The key's id (shown in listings; not secret).
    pub key_id: Uuid,
    /// Hex SHA-256 of the key.
    pub key_hash: String,
    /// A tenant key that may read personal data (the admin key always may).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub personal_data: bool,
}

/// Payload fields of a key revocation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyRevoked {
    /// The revoked key's id.
    pub key_id: Uuid,
}

/// Who is calling, as established from the bearer key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The platform admin key: manages tenants, and may act in any tenant.
    PlatformAdmin,
    /// A tenant API key: only its own tenant.
    Tenant {
        /// The key's tenant.
        tenant_id: Uuid,
        /// The key's id.
        key_id: Uuid,
        /// The key may read personal data.
        personal_data: bool,
    },
}

impl Caller {
    /// The caller as the actor recorded on events.
    pub fn actor(&self) -> Actor {
        match self {
            Caller::PlatformAdmin => Actor::PlatformAdmin,
            Caller::Tenant { key_id, .. } => Actor::ApiKey(*key_id),
        }
    }

    /// True when the caller may see personal data in clear (EventService): the admin key,
    /// and tenant keys created with `personal_data`.
    pub fn may_read_personal_data(&self) -> bool {
        match self {
            Caller::PlatformAdmin => true,
            Caller::Tenant { personal_data, .. } => *personal_data,
        }
    }

    /// Only the platform admin key.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self {
            Caller::PlatformAdmin => Ok(()),
            Caller::Tenant { .. } => Err(ApiError::PermissionDenied(
                "this needs the platform admin key".into(),
            )),
        }
    }

    /// The admin key, or a key of `tenant_id`. Another tenant's resources are reported as
    /// not found, so a key cannot probe which ids exist elsewhere.
    pub fn require_tenant(&self, tenant_id: uuid::Uuid, what: &str) -> Result<(), ApiError> {
        match self {
            Caller::PlatformAdmin => Ok(()),
            Caller::Tenant { tenant_id: own, .. } if *own == tenant_id => Ok(()),
            Caller::Tenant { .. } => Err(ApiError::NotFound(what.into())),
        }
    }

    /// The caller established by the auth interceptor.
    pub fn of<T>(request: &Request<T>) -> Result<Caller, ApiError> {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .ok_or(ApiError::Unauthenticated)
    }
}

/// A new random key and its stored hash.
pub fn generate_key() -> (String, String) {
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let key = format!("gh_{}", URL_SAFE_NO_PAD.encode(secret));
    let hash = hash_key(&key);
    (key, hash)
}

/// Hex SHA-256 of a key.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

#[derive(Default)]
struct Keys {
    by_hash: HashMap<String, Caller>,
    hash_by_id: HashMap<Uuid, String>,
}

fn apply(keys: &mut Keys, event: &RecordedEvent) {
    match event.event_type.as_str() {
        ADMIN_KEY_CREATED | API_KEY_CREATED => {
            let Ok(created) = event.payload_as::<KeyCreated>() else {
                return;
            };
            let caller = if event.event_type == ADMIN_KEY_CREATED {
                Caller::PlatformAdmin
            } else {
                Caller::Tenant {
                    tenant_id: event.tenant_id,
                    key_id: created.key_id,
                    personal_data: created.personal_data,
                }
            };
            keys.hash_by_id
                .insert(created.key_id, created.key_hash.clone());
            keys.by_hash.insert(created.key_hash, caller);
        }
        API_KEY_REVOKED => {
            if let Ok(revoked) = event.payload_as::<KeyRevoked>()
                && let Some(hash) = keys.hash_by_id.remove(&revoked.key_id)
            {
                keys.by_hash.remove(&hash);
            }
        }
        _ => {}
    }
}

/// Every live key, kept current from the log.
pub struct KeyRing {
    view: LiveView<Keys>,
}

impl KeyRing {
    /// Catches up with the log's key events and follows them.
    pub async fn start(store: Arc<dyn EventStore>) -> Result<Self, StoreError> {
        let filter = EventFilter {
            event_types: vec![
                ADMIN_KEY_CREATED.into(),
                API_KEY_CREATED.into(),
                API_KEY_REVOKED.into(),
            ],
            ..EventFilter::default()
        };
        Ok(KeyRing {
            view: LiveView::start(store, filter, Keys::default(), apply).await?,
        })
    }

    /// The caller a bearer key belongs to.
    pub fn authenticate(&self, key: &str) -> Option<Caller> {
        let hash = hash_key(key);
        self.view.read(|keys| keys.by_hash.get(&hash).cloned())
    }

    /// Waits until a key event at `position` is honoured (after creating or revoking a key).
    pub async fn wait_for(&self, position: u64) -> bool {
        self.view.wait_for(position, Duration::from_secs(5)).await
    }
}

/// Tonic interceptor: requires `authorization: Bearer <key>` and puts the [`Caller`] in the
/// request's extensions. Health and reflection are mounted without it.
#[derive(Clone)]
pub struct Authenticate(pub Arc<KeyRing>);

impl tonic::service::Interceptor for Authenticate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let caller = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| {
                value
                    .strip_prefix("Bearer ")
                    .or_else(|| value.strip_prefix("bearer "))
            })
            .filter(|key| key.len() <= 256)
            .and_then(|key| self.0.authenticate(key.trim()));
        match caller {
            Some(caller) => {
                request.extensions_mut().insert(caller);
                Ok(request)
            }
            None => Err(ApiError::Unauthenticated.into_status()),
        }
    }
}

/// Tonic interceptor for services with self-service RPCs: a request without a key passes
/// with no [`Caller`] (each handler decides), but a key that is present must be valid.
#[derive(Clone)]
pub struct AuthenticateIfPresent(pub Arc<KeyRing>);

impl tonic::service::Interceptor for AuthenticateIfPresent {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if request.metadata().get("authorization").is_none() {
            return Ok(request);
        }
        tonic::service::Interceptor::call(&mut Authenticate(self.0.clone()), request)
    }
}
