//! Typed domain events and aggregates rebuilt from them.
//!
//! We do not use `cqrs-es`: it has no global position, no subscriptions, no unique claims
//! and no multi-stream appends, which the store needs (README, design notes). What remains
//! of an aggregate framework is this small module:
//!
//! - a [`DomainEvent`] is a serde enum tagged by `type`; the tag becomes the stored event
//!   type and the rest the payload. Its schema history is a list of [`Upcasters`]: the current
//!   schema version of a type is one more than the last upcaster registered for it, so the
//!   version written and the upcasters read can never disagree.
//! - an [`Aggregate`] folds its events with `apply`; commands are plain functions
//!   `decide(&state, command, …) -> Result<Vec<Event>, Error>` in each service, with I/O,
//!   clock and randomness passed in.
//! - [`Loaded::load`] rebuilds an aggregate (from a snapshot when it has one) and remembers
//!   its version for the optimistic-concurrency check of the next append.
//! - a [`StateCache`] keeps recently loaded states of hot aggregates and brings each up to
//!   date with only the events appended since.

use crate::envelope::{
    AppendRequest, ExpectedVersion, Metadata, NewEvent, Position, RecordedEvent, StreamId,
};
use crate::error::StoreError;
use crate::retry::{AsConflict, DEFAULT_ATTEMPTS, retry_on_conflict};
use crate::store::{EventStore, StreamBounds};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use uuid::Uuid;

/// Turns a payload stored at `from_version` into the shape of `from_version + 1`.
pub type Upcast = fn(Value) -> Result<Value, String>;

/// The schema history of one event enum.
#[derive(Default)]
pub struct Upcasters {
    steps: Vec<(&'static str, u32, Upcast)>,
}

impl Upcasters {
    /// No upcasters: every type is at schema version 1.
    pub const fn new() -> Self {
        Upcasters { steps: Vec::new() }
    }

    /// Registers the step from `from_version` to `from_version + 1` for `event_type`.
    pub fn step(mut self, event_type: &'static str, from_version: u32, upcast: Upcast) -> Self {
        self.steps.push((event_type, from_version, upcast));
        self
    }

    /// The schema version new events of `event_type` are written at.
    pub fn current_version(&self, event_type: &str) -> u32 {
        self.steps
            .iter()
            .filter(|(t, ..)| *t == event_type)
            .map(|(_, from, _)| from + 1)
            .max()
            .unwrap_or(1)
    }

    /// Brings `payload` from `version` to the current version of `event_type`.
    pub fn upcast(
        &self,
        event_type: &str,
        mut version: u32,
        mut payload: Value,
    ) -> Result<Value, String> {
        let current = self.current_version(event_type);
        while version < current {
            let step = self
                .steps
                .iter()
                .find(|(t, from, _)| *t == event_type && *from == version)
                .ok_or_else(|| format!("no upcaster from version {version}"))?;
            payload = (step.2)(payload)?;
            version += 1;
        }
        Ok(payload)
    }
}

static NO_UPCASTERS: Upcasters = Upcasters::new();

/// A serde enum of one aggregate's events, internally tagged with `#[serde(tag = "type")]`.
pub trait DomainEvent: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The schema history; the default has none (every type at version 1).
    fn upcasters() -> &'static Upcasters {
        &NO_UPCASTERS
    }

    /// Splits the event into (type, schema version, payload) for appending.
    fn encode(&self) -> Result<(String, u32, Value), StoreError> {
        let value = serde_json::to_value(self).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let Value::Object(mut fields) = value else {
            return Err(StoreError::Invalid(
                "an event must serialise to an object".into(),
            ));
        };
        let Some(Value::String(event_type)) = fields.remove("type") else {
            return Err(StoreError::Invalid(
                "an event enum needs #[serde(tag = \"type\")]".into(),
            ));
        };
        let version = Self::upcasters().current_version(&event_type);
        Ok((event_type, version, Value::Object(fields)))
    }

    /// Reads a stored event as the current type, upcasting old payloads.
    fn decode(event: &RecordedEvent) -> Result<Self, StoreError> {
        let decode_error = |reason: String| event.decode_error(reason);
        let upcasters = Self::upcasters();
        if event.schema_version == upcasters.current_version(&event.event_type) {
            // The common case: splice the tag into the stored text, no intermediate value.
            let text = event.payload.get().trim_start();
            let body = text
                .strip_prefix('{')
                .ok_or_else(|| decode_error("payload is not an object".into()))?;
            let tag = serde_json::to_string(&event.event_type)
                .map_err(|e| decode_error(e.to_string()))?;
            let separator = if body.trim_start().starts_with('}') {
                ""
            } else {
                ","
            };
            let tagged = format!("{{\"type\":{tag}{separator}{body}");
            return serde_json::from_str(&tagged).map_err(|e| decode_error(e.to_string()));
        }
        let payload = upcasters
            .upcast(
                &event.event_type,
                event.schema_version,
                event.payload_value()?,
            )
            .map_err(decode_error)?;
        let mut fields = match payload {
            Value::Object(fields) => fields,
            Value::Null => Map::new(),
            _ => return Err(decode_error("payload is not an object".into())),
        };
        fields.insert("type".into(), Value::String(event.event_type.clone()));
        serde_json::from_value(Value::Object(fields)).map_err(|e| decode_error(e.to_string()))
    }

    /// Builds the [`NewEvent`] that appends this event to `stream`.
    fn to_new_event(&self, tenant_id: Uuid, stream: &StreamId) -> Result<NewEvent, StoreError> {
        let (event_type, schema_version, payload) = self.encode()?;
        Ok(NewEvent {
            tenant_id,
            stream: stream.clone(),
            event_type,
            schema_version,
            payload,
        })
    }
}

/// State rebuilt from one stream's events.
pub trait Aggregate: Default + Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The stream type, e.g. `user`.
    const STREAM_TYPE: &'static str;
    /// Take a snapshot after this many events have been replayed since the last one
    /// (`None`: never; most streams are short).
    const SNAPSHOT_EVERY: Option<u64> = None;
    /// Bump when the aggregate's shape changes, so old snapshots are ignored.
    const SNAPSHOT_SCHEMA: u32 = 1;
    /// Its events.
    type Event: DomainEvent;

    /// Folds one event into the state. Events are facts: applying never fails.
    fn apply(&mut self, event: Self::Event, envelope: &RecordedEvent);

    /// The stream of the aggregate with this id.
    fn stream(id: Uuid) -> StreamId {
        StreamId::new(Self::STREAM_TYPE, id)
    }
}

/// An aggregate with the version it was loaded at.
#[derive(Debug, Clone)]
pub struct Loaded<A> {
    /// The state.
    pub state: A,
    /// The stream's version (0: the stream does not exist).
    pub version: u64,
    /// The stream.
    pub stream: StreamId,
}

impl<A: Aggregate> Loaded<A> {
    /// Loads the current state, from the latest snapshot onwards when the aggregate keeps them.
    pub async fn load(store: &dyn EventStore, id: Uuid) -> Result<Self, StoreError> {
        let stream = A::stream(id);
        let mut loaded = Loaded {
            state: A::default(),
            version: 0,
            stream,
        };
        if A::SNAPSHOT_EVERY.is_some()
            && let Some((version, snapshot)) = store.load_snapshot(&loaded.stream).await?
            && snapshot.get("schema").and_then(Value::as_u64) == Some(A::SNAPSHOT_SCHEMA as u64)
            && let Some(Ok(state)) = snapshot
                .get("state")
                .map(|s| serde_json::from_value::<A>(s.clone()))
        {
            loaded.state = state;
            loaded.version = version;
        }
        let bounds = StreamBounds {
            after_version: loaded.version,
            ..StreamBounds::default()
        };
        let replayed = loaded.apply_all(store.read_stream(&loaded.stream, bounds).await?)?;
        if let Some(every) = A::SNAPSHOT_EVERY
            && replayed >= every
        {
            let state = serde_json::to_value(&loaded.state)
                .map_err(|e| StoreError::Invalid(e.to_string()))?;
            let snapshot = serde_json::json!({ "schema": A::SNAPSHOT_SCHEMA, "state": state });
            // A lost snapshot only costs a longer replay next time.
            if let Err(error) = store
                .save_snapshot(&loaded.stream, loaded.version, &snapshot)
                .await
            {
                tracing::warn!(%error, stream = %loaded.stream, "could not save snapshot");
            }
        }
        Ok(loaded)
    }

    /// Applies whatever was appended to the stream since this copy was loaded (another
    /// process may have moved it on); how many events that was.
    pub async fn refresh(&mut self, store: &dyn EventStore) -> Result<u64, StoreError> {
        let bounds = StreamBounds {
            after_version: self.version,
            ..StreamBounds::default()
        };
        self.apply_all(store.read_stream(&self.stream, bounds).await?)
    }

    /// Loads the state as it was at a position or time (audit replay; no snapshots).
    pub async fn load_at(
        store: &dyn EventStore,
        id: Uuid,
        bounds: StreamBounds,
    ) -> Result<Self, StoreError> {
        let stream = A::stream(id);
        let mut loaded = Loaded {
            state: A::default(),
            version: 0,
            stream,
        };
        let bounds = StreamBounds {
            after_version: 0,
            ..bounds
        };
        loaded.apply_all(store.read_stream(&loaded.stream, bounds).await?)?;
        Ok(loaded)
    }

    /// The expectation for appending after what was loaded.
    pub fn expected(&self) -> ExpectedVersion {
        ExpectedVersion::Exact(self.version)
    }

    fn apply_all(&mut self, events: Vec<RecordedEvent>) -> Result<u64, StoreError> {
        let mut count = 0;
        for envelope in events {
            let event = A::Event::decode(&envelope)?;
            self.version = envelope.version;
            self.state.apply(event, &envelope);
            count += 1;
        }
        Ok(count)
    }
}

/// Recently loaded states of one aggregate type, each brought up to date on the next load by
/// reading only what was appended since: one query that usually returns nothing, instead of
/// the whole stream (or the latest snapshot and what follows it) decoded and folded again. A
/// state from here is the one a fresh [`Loaded::load`] gives, since a stream only grows and
/// folding is deterministic, and it is as current: the stream is still read on every load.
/// Holds at most `capacity` states; a full cache forgets an arbitrary one. Streams that do
/// not exist are not kept, so ids made up by a caller cannot push real states out.
pub struct StateCache<A> {
    states: Mutex<HashMap<Uuid, Loaded<A>>>,
    capacity: usize,
}

impl<A: Aggregate + Clone> StateCache<A> {
    /// An empty cache holding at most `capacity` states.
    pub fn new(capacity: usize) -> Self {
        StateCache {
            states: Default::default(),
            capacity: capacity.max(1),
        }
    }

    /// The current state of aggregate `id`, as [`Loaded::load`] gives it.
    pub async fn load(&self, store: &dyn EventStore, id: Uuid) -> Result<Loaded<A>, StoreError> {
        let cached = self.lock().get(&id).cloned();
        let loaded = match cached {
            Some(mut loaded) => {
                loaded.refresh(store).await?;
                loaded
            }
            None => Loaded::load(store, id).await?,
        };
        let mut states = self.lock();
        let newer = states
            .get(&id)
            .is_none_or(|kept| kept.version < loaded.version);
        if loaded.version > 0 && newer {
            if states.len() >= self.capacity
                && !states.contains_key(&id)
                && let Some(forgotten) = states.keys().next().copied()
            {
                states.remove(&forgotten);
            }
            states.insert(id, loaded.clone());
        }
        Ok(loaded)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Uuid, Loaded<A>>> {
        self.states
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The state after a command, and where its events landed.
#[derive(Debug, Clone)]
pub struct Executed<A> {
    /// The state with the command's events applied.
    pub state: A,
    /// The stream's version after the command.
    pub version: u64,
    /// Position of the command's last event (`None`: the command decided nothing).
    pub last_position: Option<Position>,
}

/// Runs a command on one aggregate: load, `decide`, append with the loaded version as the
/// expectation, and on a conflict do it all again (bounded). `decide` is pure, so running it
/// again on fresher state is always safe.
pub async fn execute<A, E, F>(
    store: &dyn EventStore,
    tenant_id: Uuid,
    id: Uuid,
    metadata: &Metadata,
    decide: F,
) -> Result<Executed<A>, E>
where
    A: Aggregate,
    E: From<StoreError> + AsConflict,
    F: Fn(&A) -> Result<Vec<A::Event>, E>,
{
    retry_on_conflict(DEFAULT_ATTEMPTS, || async {
        let loaded = Loaded::<A>::load(store, id).await?;
        let events = decide(&loaded.state)?;
        if events.is_empty() {
            return Ok(Executed {
                state: loaded.state,
                version: loaded.version,
                last_position: None,
            });
        }
        let mut request = AppendRequest::new(metadata.clone());
        request.expect(&loaded.stream, loaded.expected());
        let mut new_events = Vec::with_capacity(events.len());
        for event in &events {
            let new_event = event.to_new_event(tenant_id, &loaded.stream)?;
            new_events.push(new_event.clone());
            request.push(new_event);
        }
        let recorded_at = request.recorded_at;
        let outcome = store.append(request).await?;
        let Loaded {
            mut state, stream, ..
        } = loaded;
        let mut version = 0;
        for ((event, new_event), (event_id, position, landed_version)) in events
            .into_iter()
            .zip(new_events)
            .zip(outcome.events.iter().copied())
        {
            let payload = serde_json::value::RawValue::from_string(new_event.payload.to_string())
                .map_err(|e| StoreError::Invalid(e.to_string()))?;
            let envelope = RecordedEvent {
                id: event_id,
                position,
                tenant_id,
                stream: stream.clone(),
                version: landed_version,
                event_type: new_event.event_type,
                schema_version: new_event.schema_version,
                recorded_at,
                correlation_id: metadata.correlation_id,
                causation_id: metadata.causation_id,
                actor: metadata.actor.clone(),
                context: metadata.context.clone(),
                payload,
            };
            state.apply(event, &envelope);
            version = landed_version;
        }
        Ok(Executed {
            state,
            version,
            last_position: Some(outcome.last_position()),
        })
    })
    .await
}
