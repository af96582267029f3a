//! The event envelope (SPEC §8) and the shape of an append.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use std::fmt;
use uuid::Uuid;

/// Global position in the log: strictly increasing in the order subscribers see events.
/// Positions are unique but not dense (PostgreSQL leaves gaps; SQLite does not).
pub type Position = u64;

/// One aggregate's stream: its type (`user`, `tenant`, `signin`, …) and id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StreamId {
    /// Aggregate type.
    pub kind: String,
    /// Aggregate id.
    pub id: Uuid,
}

impl StreamId {
    /// A stream of aggregate type `kind`.
    pub fn new(kind: impl Into<String>, id: Uuid) -> Self {
        StreamId {
            kind: kind.into(),
            id,
        }
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.kind, self.id)
    }
}

/// Who caused an event. Stored as text: `system`, `anonymous`, `admin`, `user:<id>`,
/// `api_key:<id>`, `app:<client id>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Actor {
    /// Gatehouse itself (timers, detectors, start-up).
    System,
    /// An unauthenticated caller (sign-up, sign-in).
    Anonymous,
    /// The platform admin key.
    PlatformAdmin,
    /// A signed-in end user.
    User(Uuid),
    /// A tenant API key.
    ApiKey(Uuid),
    /// An application, by client id.
    Application(String),
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Actor::System => f.write_str("system"),
            Actor::Anonymous => f.write_str("anonymous"),
            Actor::PlatformAdmin => f.write_str("admin"),
            Actor::User(id) => write!(f, "user:{id}"),
            Actor::ApiKey(id) => write!(f, "api_key:{id}"),
            Actor::Application(client_id) => write!(f, "app:{client_id}"),
        }
    }
}

impl std::str::FromStr for Actor {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let parse_id = |id: &str| Uuid::parse_str(id).map_err(|e| format!("actor '{text}': {e}"));
        match text.split_once(':') {
            None => match text {
                "system" => Ok(Actor::System),
                "anonymous" => Ok(Actor::Anonymous),
                "admin" => Ok(Actor::PlatformAdmin),
                _ => Err(format!("unknown actor '{text}'")),
            },
            Some(("user", id)) => parse_id(id).map(Actor::User),
            Some(("api_key", id)) => parse_id(id).map(Actor::ApiKey),
            Some(("app", client_id)) => Ok(Actor::Application(client_id.to_owned())),
            Some(_) => Err(format!("unknown actor '{text}'")),
        }
    }
}

/// Where a request came from, recorded on the events it caused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientContext {
    /// Client IP address as seen by Gatehouse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// The client's `User-Agent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
}

/// What every event of one command shares.
#[derive(Debug, Clone)]
pub struct Metadata {
    /// Ties together everything one request caused, across services.
    pub correlation_id: Uuid,
    /// The event (or command) that caused this one, if any.
    pub causation_id: Option<Uuid>,
    /// Who did it.
    pub actor: Actor,
    /// Where the request came from.
    pub context: Option<ClientContext>,
}

impl Metadata {
    /// Metadata for work Gatehouse does by itself, with a fresh correlation id.
    pub fn system() -> Self {
        Metadata {
            correlation_id: Uuid::now_v7(),
            causation_id: None,
            actor: Actor::System,
            context: None,
        }
    }
}

/// An event to append. The store assigns id, position, version and recorded time.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// The tenant the event belongs to (`Uuid::nil()` for platform-level events).
    pub tenant_id: Uuid,
    /// The stream it extends.
    pub stream: StreamId,
    /// Past-tense event type, e.g. `UserSignedUp`.
    pub event_type: String,
    /// Schema version of `payload`.
    pub schema_version: u32,
    /// The event's data (never a secret in clear).
    pub payload: Value,
}

/// Which version a command expects a stream to be at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// No expectation: append after whatever is there.
    Any,
    /// Exactly this version; `Exact(0)` means the stream must not exist yet.
    Exact(u64),
}

/// A unique fact, such as an email address in a tenant. The value should already be
/// normalised; callers that claim personal data should claim a keyed hash of it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClaimKey {
    /// Tenant the fact is unique in.
    pub tenant_id: Uuid,
    /// What kind of fact, e.g. `email`.
    pub scope: String,
    /// The fact itself.
    pub value: String,
}

/// One atomic append: events for one or more streams, with expected versions and unique
/// claims taken or released, all or nothing.
#[derive(Debug, Clone)]
pub struct AppendRequest {
    pub(crate) streams: Vec<(StreamId, ExpectedVersion)>,
    pub(crate) events: Vec<(usize, NewEvent)>,
    pub(crate) claims: Vec<(usize, ClaimKey)>,
    pub(crate) releases: Vec<(usize, ClaimKey)>,
    pub(crate) metadata: Metadata,
    pub(crate) recorded_at: DateTime<Utc>,
}

impl AppendRequest {
    /// An empty append recorded now.
    pub fn new(metadata: Metadata) -> Self {
        AppendRequest {
            streams: Vec::new(),
            events: Vec::new(),
            claims: Vec::new(),
            releases: Vec::new(),
            metadata,
            recorded_at: Utc::now(),
        }
    }

    /// Requires `stream` to be at `expected` when the append commits.
    pub fn expect(&mut self, stream: &StreamId, expected: ExpectedVersion) -> &mut Self {
        let index = self.stream_index(stream);
        self.streams[index].1 = expected;
        self
    }

    /// Adds an event (its stream is expected at `Any` unless [`Self::expect`] says otherwise).
    pub fn push(&mut self, event: NewEvent) -> &mut Self {
        let index = self.stream_index(&event.stream);
        self.events.push((index, event));
        self
    }

    /// Takes a unique claim for `owner`; the append fails with `ClaimTaken` if another
    /// stream holds it.
    pub fn claim(&mut self, owner: &StreamId, key: ClaimKey) -> &mut Self {
        let index = self.stream_index(owner);
        self.claims.push((index, key));
        self
    }

    /// Releases a claim held by `owner` (a claim held by another stream is left alone).
    pub fn release(&mut self, owner: &StreamId, key: ClaimKey) -> &mut Self {
        let index = self.stream_index(owner);
        self.releases.push((index, key));
        self
    }

    /// Overrides the recorded time (imports and tests).
    pub fn recorded_at(&mut self, at: DateTime<Utc>) -> &mut Self {
        self.recorded_at = at;
        self
    }

    /// Number of events in the append.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// True when the append holds no event.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The shared metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    fn stream_index(&mut self, stream: &StreamId) -> usize {
        match self.streams.iter().position(|(s, _)| s == stream) {
            Some(index) => index,
            None => {
                self.streams.push((stream.clone(), ExpectedVersion::Any));
                self.streams.len() - 1
            }
        }
    }

    /// Checks what the database cannot: at least one event, bounded size.
    pub(crate) fn validate(&self) -> Result<(), crate::StoreError> {
        if self.events.is_empty() {
            return Err(crate::StoreError::Invalid(
                "an append needs at least one event".into(),
            ));
        }
        if self.events.len() >= (1 << 20) {
            return Err(crate::StoreError::Invalid(
                "too many events in one append".into(),
            ));
        }
        Ok(())
    }
}

/// An event as stored: the full envelope.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecordedEvent {
    /// UUIDv7 event id.
    pub id: Uuid,
    /// Position in the global log.
    pub position: Position,
    /// Owning tenant (`Uuid::nil()` for platform events).
    pub tenant_id: Uuid,
    /// The stream.
    pub stream: StreamId,
    /// Version of the stream after this event (1 for the first event).
    pub version: u64,
    /// Event type.
    pub event_type: String,
    /// Schema version of the stored payload (before upcasting).
    pub schema_version: u32,
    /// When the event was recorded.
    pub recorded_at: DateTime<Utc>,
    /// Correlation id of the request that caused it.
    pub correlation_id: Uuid,
    /// What caused it.
    pub causation_id: Option<Uuid>,
    /// Who caused it.
    #[serde(with = "actor_text")]
    pub actor: Actor,
    /// Where the request came from.
    pub context: Option<ClientContext>,
    /// The event's data as stored JSON text (parsed only when it is read: replaying a log
    /// mostly routes events, and parsing every payload would triple its cost).
    pub payload: Box<RawValue>,
}

impl RecordedEvent {
    /// The envelope of an event decided but not stored yet (position and version 0, empty
    /// payload), for folding decisions into a state before they are appended.
    pub fn pending(tenant_id: Uuid, stream: StreamId, recorded_at: DateTime<Utc>) -> Self {
        RecordedEvent {
            id: Uuid::nil(),
            position: 0,
            tenant_id,
            stream,
            version: 0,
            event_type: String::new(),
            schema_version: 0,
            recorded_at,
            correlation_id: Uuid::nil(),
            causation_id: None,
            actor: Actor::System,
            context: None,
            payload: RawValue::NULL.to_owned(),
        }
    }

    /// The payload as a JSON value.
    pub fn payload_value(&self) -> Result<Value, crate::StoreError> {
        serde_json::from_str(self.payload.get()).map_err(|e| self.decode_error(e.to_string()))
    }

    /// The payload read as `T` (without upcasting; see [`crate::DomainEvent::decode`]).
    pub fn payload_as<T: serde::de::DeserializeOwned>(&self) -> Result<T, crate::StoreError> {
        serde_json::from_str(self.payload.get()).map_err(|e| self.decode_error(e.to_string()))
    }

    pub(crate) fn decode_error(&self, reason: String) -> crate::StoreError {
        crate::StoreError::Decode {
            event_type: self.event_type.clone(),
            schema_version: self.schema_version,
            reason,
        }
    }
}

mod actor_text {
    use super::Actor;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(actor: &Actor, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(actor)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Actor, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}
