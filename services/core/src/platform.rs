//! The platform aggregate: what exists above tenants (the admin keys).

use crate::keys::{KeyCreated, generate_key, hash_key};
use gatehouse_events::{
    Aggregate, AppendRequest, DomainEvent, EventStore, Loaded, Metadata, RecordedEvent, StoreError,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Events of the platform stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum PlatformEvent {
    /// A platform admin key was created; only its hash is kept.
    AdminKeyCreated(KeyCreated),
}

impl DomainEvent for PlatformEvent {}

/// The platform: its admin keys' hashes.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Platform {
    /// Hashes of the admin keys.
    pub admin_key_hashes: Vec<String>,
}

impl Aggregate for Platform {
    const STREAM_TYPE: &'static str = "platform";
    type Event = PlatformEvent;

    fn apply(&mut self, event: PlatformEvent, _: &RecordedEvent) {
        match event {
            PlatformEvent::AdminKeyCreated(created) => self.admin_key_hashes.push(created.key_hash),
        }
    }
}

/// Makes sure an admin key exists. With `configured` (from `GATEHOUSE_ADMIN_KEY`) that key is
/// registered if it is not yet; otherwise a new key is created when the platform has none.
/// Returns the key when one was generated (to be shown once), `None` otherwise.
pub async fn ensure_admin_key(
    store: &dyn EventStore,
    configured: Option<&str>,
) -> Result<Option<String>, StoreError> {
    gatehouse_events::retry::retry_on_conflict(5, || async {
        let platform = Loaded::<Platform>::load(store, Uuid::nil()).await?;
        let (generated, hash) = match configured {
            Some(key) => {
                let hash = hash_key(key);
                if platform.state.admin_key_hashes.contains(&hash) {
                    return Ok(None);
                }
                (None, hash)
            }
            None if !platform.state.admin_key_hashes.is_empty() => return Ok(None),
            None => {
                let (key, hash) = generate_key();
                (Some(key), hash)
            }
        };
        let event = PlatformEvent::AdminKeyCreated(KeyCreated {
            key_id: Uuid::now_v7(),
            key_hash: hash,
            personal_data: false,
        });
        let mut request = AppendRequest::new(Metadata::system());
        request.push(event.to_new_event(Uuid::nil(), &platform.stream)?);
        request.expect(&platform.stream, platform.expected());
        store.append(request).await?;
        Ok(generated)
    })
    .await
}
