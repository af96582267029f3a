//! Audit replay over the log (SPEC §8), shared by EventService and `gatehouse audit`:
//!
//! - [`state_at`]: any aggregate as it was at a position or a time, as JSON.
//! - [`timeline`]: every event touching a user, an IP address, a session or a correlation id,
//!   in log order, each with a one-line [`describe`].
//! - [`Disclosure`]: what a caller may read of personal data. Fields that hold personal data
//!   (`profile`, `phone`, `subject`, sealed with the user's key) are opened for callers
//!   allowed to read personal data and replaced by `"[redacted]"` for the rest; after the
//!   user's erasure they read `"[erased]"` for everyone. Secrets (`credential`, `message`,
//!   `secret`, `private`, `client_secret`, TOTP secrets) are never disclosed: `"[secret]"`.
//! - [`export`] and [`import`]: a tenant's events (and its users' wrapped data keys) as NDJSON,
//!   and back into an empty store for offline replay.

use chrono::{DateTime, Utc};
use gatehouse_core::ApiError;
use gatehouse_core::crypto::{Crypto, Sealed};
use gatehouse_events::integrity::Sealer;
use gatehouse_events::store::StreamBounds;
use gatehouse_events::{Aggregate, EventFilter, EventStore, Loaded, Position, RecordedEvent};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::sync::Arc;
use uuid::Uuid;

/// Payload and state fields holding personal data, sealed with the user's data key.
const PERSONAL: &[&str] = &["profile", "phone", "subject"];
/// Fields holding secrets, never disclosed.
const SECRET: &[&str] = &[
    "credential",
    "message",
    "secret",
    "private",
    "client_secret",
    "totp_secret",
    "pending_totp_secret",
];

/// Events read per round trip while scanning.
const SCAN_BATCH: usize = 10_000;

/// What a caller may read of personal data.
#[derive(Clone)]
pub struct Disclosure {
    crypto: Arc<Crypto>,
    personal_data: bool,
}

impl Disclosure {
    /// Opens personal data when `personal_data`, redacts it otherwise.
    pub fn new(crypto: Arc<Crypto>, personal_data: bool) -> Self {
        Disclosure {
            crypto,
            personal_data,
        }
    }

    /// An event's payload as the caller may see it.
    pub async fn payload(&self, event: &RecordedEvent) -> Result<Value, ApiError> {
        let mut payload = event
            .payload_value()
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let subject = (event.stream.kind == "user").then_some(event.stream.id);
        self.apply(&mut payload, subject).await;
        Ok(payload)
    }

    /// A state (or payload) as the caller may see it; `subject` is the user whose key seals
    /// its personal fields, unless a nested `user_id` says otherwise.
    pub async fn apply(&self, value: &mut Value, subject: Option<Uuid>) {
        // Iterative walk: (value, the user sealing it).
        let mut stack: Vec<(&mut Value, Option<Uuid>)> = vec![(value, subject)];
        while let Some((value, subject)) = stack.pop() {
            match value {
                Value::Object(fields) => {
                    let subject = fields
                        .get("user_id")
                        .and_then(Value::as_str)
                        .and_then(|id| Uuid::parse_str(id).ok())
                        .or(subject);
                    for (key, field) in fields.iter_mut() {
                        if SECRET.contains(&key.as_str()) && !field.is_null() {
                            *field = Value::String("[secret]".into());
                        } else if PERSONAL.contains(&key.as_str()) && field.is_string() {
                            *field = self.open(field, subject).await;
                        } else {
                            stack.push((field, subject));
                        }
                    }
                }
                Value::Array(items) => stack.extend(items.iter_mut().map(|v| (v, subject))),
                _ => {}
            }
        }
    }

    async fn open(&self, sealed: &Value, subject: Option<Uuid>) -> Value {
        let (Some(text), Some(subject)) = (sealed.as_str(), subject) else {
            return Value::String("[redacted]".into());
        };
        let sealed = Sealed(text.to_string());
        match self.crypto.open::<Value>(subject, &sealed).await {
            Ok(None) => Value::String("[erased]".into()),
            Ok(Some(_)) if !self.personal_data => Value::String("[redacted]".into()),
            Ok(Some(value)) => value,
            Err(_) => Value::String("[redacted]".into()),
        }
    }
}

/// An aggregate at a point of the log.
#[derive(Debug, Clone, Serialize)]
pub struct AggregateAt {
    /// Aggregate type.
    pub stream_type: String,
    /// Aggregate id.
    pub stream_id: Uuid,
    /// Its tenant (nil for platform streams and aggregates that did not exist yet).
    pub tenant_id: Uuid,
    /// Its version then (0: it did not exist yet).
    pub version: u64,
    /// Position of its last event then.
    pub position: Position,
    /// Recorded time of its last event then.
    pub recorded_at: Option<DateTime<Utc>>,
    /// Its state, as the caller may see it.
    pub state: Value,
}

/// The aggregate types [`state_at`] knows.
pub const AGGREGATE_TYPES: &[&str] = &[
    "application",
    "detection",
    "group",
    "idp",
    "location",
    "lockout",
    "platform",
    "policy",
    "session",
    "signin",
    "tenant",
    "user",
    "userrisk",
];

async fn fold<A: Aggregate>(
    store: &dyn EventStore,
    id: Uuid,
    bounds: StreamBounds,
) -> Result<Value, ApiError> {
    let loaded = Loaded::<A>::load_at(store, id, bounds)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    serde_json::to_value(&loaded.state).map_err(|e| ApiError::Internal(e.to_string()))
}

/// The state of aggregate `stream_type`/`id` as it was at `bounds` (a position, a time, or
/// now), with personal data as `disclosure` allows.
pub async fn state_at(
    store: &dyn EventStore,
    stream_type: &str,
    id: Uuid,
    bounds: StreamBounds,
    disclosure: &Disclosure,
) -> Result<AggregateAt, ApiError> {
    use gatehouse_directory as d;
    use gatehouse_policy::model as p;
    let mut state = match stream_type {
        "application" => fold::<d::application::Application>(store, id, bounds).await?,
        "detection" => fold::<gatehouse_risk::detector::Detection>(store, id, bounds).await?,
        "group" => fold::<p::Group>(store, id, bounds).await?,
        "idp" => fold::<d::identity_provider::IdentityProvider>(store, id, bounds).await?,
        "location" => fold::<p::NamedLocation>(store, id, bounds).await?,
        "lockout" => fold::<d::lockout::Lockout>(store, id, bounds).await?,
        "platform" => fold::<gatehouse_core::platform::Platform>(store, id, bounds).await?,
        "policy" => fold::<p::Policy>(store, id, bounds).await?,
        "session" => fold::<gatehouse_signin::session::Session>(store, id, bounds).await?,
        "signin" => fold::<gatehouse_signin::flow::SignIn>(store, id, bounds).await?,
        "tenant" => fold::<d::tenant::Tenant>(store, id, bounds).await?,
        "user" => fold::<d::user::User>(store, id, bounds).await?,
        "userrisk" => fold::<gatehouse_risk::user_risk::UserRisk>(store, id, bounds).await?,
        other => {
            return Err(ApiError::invalid(
                "stream_type",
                format!(
                    "unknown aggregate type '{other}'; one of {}",
                    AGGREGATE_TYPES.join(", ")
                ),
            ));
        }
    };
    // The last event within the bounds tells the version, position and tenant.
    let stream = gatehouse_events::StreamId::new(stream_type, id);
    let events = store
        .read_stream(&stream, bounds)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let last = events.last();
    let subject = matches!(stream_type, "user" | "userrisk").then_some(id);
    disclosure.apply(&mut state, subject).await;
    Ok(AggregateAt {
        stream_type: stream_type.to_string(),
        stream_id: id,
        tenant_id: last.map_or(Uuid::nil(), |e| e.tenant_id),
        version: last.map_or(0, |e| e.version),
        position: last.map_or(0, |e| e.position),
        recorded_at: last.map(|e| e.recorded_at),
        state,
    })
}

/// Parses `--at`/`at`: a position (digits) or an RFC 3339 time.
pub fn parse_at(text: &str) -> Result<StreamBounds, ApiError> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(StreamBounds::default());
    }
    if let Ok(position) = text.parse::<u64>() {
        return Ok(StreamBounds {
            up_to_position: Some(position),
            ..StreamBounds::default()
        });
    }
    let time = DateTime::parse_from_rfc3339(text).map_err(|_| {
        ApiError::invalid("at", "a position (digits) or an RFC 3339 time".to_string())
    })?;
    Ok(StreamBounds {
        up_to_time: Some(time.with_timezone(&Utc)),
        ..StreamBounds::default()
    })
}

/// What a timeline follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// A user id.
    User(Uuid),
    /// A client IP address.
    Ip(String),
    /// A session id.
    Session(Uuid),
    /// A correlation id (one request and what it caused).
    Correlation(Uuid),
}

impl Subject {
    /// True when `event` names the subject directly.
    fn named_by(&self, event: &RecordedEvent, payload: &Value) -> bool {
        match self {
            Subject::Correlation(id) => event.correlation_id == *id,
            Subject::User(id) | Subject::Session(id) => {
                event.stream.id == *id
                    || event.actor == gatehouse_events::Actor::User(*id)
                    || mentions(payload, &id.to_string())
            }
            Subject::Ip(ip) => {
                event
                    .context
                    .as_ref()
                    .and_then(|c| c.ip.as_deref())
                    .is_some_and(|own| own == ip)
                    || mentions(payload, ip)
            }
        }
    }
}

/// True when a string in `value` equals `needle`.
fn mentions(value: &Value, needle: &str) -> bool {
    match value {
        Value::String(text) => text == needle,
        Value::Array(items) => items.iter().any(|v| mentions(v, needle)),
        Value::Object(fields) => fields.values().any(|v| mentions(v, needle)),
        _ => false,
    }
}

/// Streams included whole once one of their events names the subject: a sign-in flow or a
/// session is one story, and its first events (before the user is known) belong to it.
const WHOLE_STREAMS: &[&str] = &["signin", "session"];

/// Bounds of a timeline.
#[derive(Debug, Clone, Copy, Default)]
pub struct Range {
    /// Only events recorded at or after this time.
    pub from: Option<DateTime<Utc>>,
    /// Only events recorded before this time.
    pub to: Option<DateTime<Utc>>,
}

impl Range {
    fn contains(&self, at: DateTime<Utc>) -> bool {
        self.from.is_none_or(|from| at >= from) && self.to.is_none_or(|to| at < to)
    }
}

/// Every event of `tenant_id` (or of all tenants) touching `subject` within `range`, in log
/// order. Two scans of the log: the first finds the flows and sessions that name the subject,
/// the second collects their events and every event naming it.
pub async fn timeline(
    store: &dyn EventStore,
    tenant_id: Option<Uuid>,
    subject: &Subject,
    range: Range,
) -> Result<Vec<RecordedEvent>, ApiError> {
    let filter = EventFilter {
        tenant_id,
        ..EventFilter::default()
    };
    let mut whole: HashSet<Uuid> = HashSet::new();
    let mut found = Vec::new();
    for pass in 0..2 {
        let mut after = 0;
        loop {
            let batch = store
                .read_all(after, &filter, SCAN_BATCH)
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            let more = batch.events.len() >= SCAN_BATCH;
            after = batch.next;
            for event in batch.events {
                if !range.contains(event.recorded_at) {
                    continue;
                }
                let payload = event.payload_value().unwrap_or(Value::Null);
                let named = subject.named_by(&event, &payload);
                if pass == 0 {
                    if named && WHOLE_STREAMS.contains(&event.stream.kind.as_str()) {
                        whole.insert(event.stream.id);
                    }
                } else if named || whole.contains(&event.stream.id) {
                    found.push(event);
                }
            }
            if !more {
                break;
            }
        }
    }
    Ok(found)
}

/// `PasswordRejected` → `password rejected`.
fn words(event_type: &str) -> String {
    let mut text = String::new();
    for (i, c) in event_type.chars().enumerate() {
        if c.is_uppercase() {
            if i > 0 {
                text.push(' ');
            }
            text.extend(c.to_lowercase());
        } else {
            text.push(c);
        }
    }
    text
}

/// A one-line, human description of an event: what happened, to what, by whom, from where,
/// and the details that matter to an investigator (reasons, levels, kinds, methods).
pub fn describe(event: &RecordedEvent) -> String {
    let payload = event.payload_value().unwrap_or(Value::Null);
    let mut details = Vec::new();
    for key in [
        "kind", "level", "reason", "method", "outcome", "state", "country",
    ] {
        match payload.get(key) {
            Some(Value::String(text)) if !text.is_empty() => details.push(format!("{key} {text}")),
            Some(Value::Number(n)) => details.push(format!("{key} {n}")),
            _ => {}
        }
    }
    if let Some(Value::Array(detections)) = payload.get("detections")
        && !detections.is_empty()
    {
        let kinds: Vec<String> = detections
            .iter()
            .filter_map(|d| d.get("kind").and_then(Value::as_str).or(d.as_str()))
            .map(str::to_string)
            .collect();
        details.push(format!("detections {}", kinds.join("+")));
    }
    if let Some(country) = payload
        .get("properties")
        .and_then(|p| p.get("country"))
        .and_then(Value::as_str)
    {
        details.push(format!("country {country}"));
    }
    let mut line = format!(
        "{} on {} {}",
        words(&event.event_type),
        event.stream.kind,
        event.stream.id
    );
    if !details.is_empty() {
        line.push_str(&format!(" ({})", details.join(", ")));
    }
    line.push_str(&format!(" by {}", event.actor));
    if let Some(ip) = event.context.as_ref().and_then(|c| c.ip.as_deref()) {
        line.push_str(&format!(" from {ip}"));
    }
    line
}

/// One line of an export.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExportLine {
    /// A user's wrapped data key (useless without the master key), so that the import reads
    /// personal data like the source did.
    SubjectKey {
        /// The user.
        subject_id: Uuid,
        /// Their tenant.
        tenant_id: Uuid,
        /// The key wrapped by the master key, hex.
        wrapped_key: String,
    },
    /// An event, envelope and payload as stored.
    Event(Box<RecordedEvent>),
}

/// Writes `tenant_id`'s events recorded in `range` as NDJSON, preceded by the wrapped data
/// keys of its users. Returns the number of events written.
pub async fn export(
    store: &dyn EventStore,
    tenant_id: Uuid,
    range: Range,
    out: &mut dyn Write,
) -> Result<u64, ApiError> {
    let internal = |e: &dyn std::fmt::Display| ApiError::Internal(e.to_string());
    let filter = EventFilter {
        tenant_id: Some(tenant_id),
        stream_types: vec!["user".into()],
        ..EventFilter::default()
    };
    let mut users = std::collections::BTreeSet::new();
    let mut after = 0;
    loop {
        let batch = store
            .read_all(after, &filter, SCAN_BATCH)
            .await
            .map_err(|e| internal(&e))?;
        users.extend(batch.events.iter().map(|e| e.stream.id));
        after = batch.next;
        if batch.events.len() < SCAN_BATCH {
            break;
        }
    }
    for subject_id in users {
        if let Some(wrapped) = store
            .subject_key(subject_id)
            .await
            .map_err(|e| internal(&e))?
        {
            let line = ExportLine::SubjectKey {
                subject_id,
                tenant_id,
                wrapped_key: hex::encode(&wrapped),
            };
            serde_json::to_writer(&mut *out, &line).map_err(|e| internal(&e))?;
            out.write_all(b"\n").map_err(|e| internal(&e))?;
        }
    }
    let filter = EventFilter {
        tenant_id: Some(tenant_id),
        ..EventFilter::default()
    };
    let (mut after, mut written) = (0, 0);
    loop {
        let batch = store
            .read_all(after, &filter, SCAN_BATCH)
            .await
            .map_err(|e| internal(&e))?;
        let more = batch.events.len() >= SCAN_BATCH;
        after = batch.next;
        for event in batch.events {
            if range.contains(event.recorded_at) {
                serde_json::to_writer(&mut *out, &ExportLine::Event(Box::new(event)))
                    .map_err(|e| internal(&e))?;
                out.write_all(b"\n").map_err(|e| internal(&e))?;
                written += 1;
            }
        }
        if !more {
            break;
        }
    }
    out.flush().map_err(|e| internal(&e))?;
    Ok(written)
}

/// Reads an export into an empty store, then seals it (the chain heads match the source's
/// when the export holds the tenant's whole log). Returns the number of events imported.
pub async fn import(store: Arc<dyn EventStore>, input: impl BufRead) -> Result<u64, ApiError> {
    let internal = |e: &dyn std::fmt::Display| ApiError::Internal(e.to_string());
    let existing = store
        .read_all(0, &EventFilter::default(), 1)
        .await
        .map_err(|e| internal(&e))?;
    if !existing.events.is_empty() {
        return Err(ApiError::FailedPrecondition(
            "the target store is not empty: import only into a new store".into(),
        ));
    }
    let mut events = Vec::new();
    let mut imported = 0;
    for (number, line) in input.lines().enumerate() {
        let line = line.map_err(|e| internal(&e))?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed: ExportLine = serde_json::from_str(&line)
            .map_err(|e| ApiError::invalid("input", format!("line {}: {e}", number + 1)))?;
        match parsed {
            ExportLine::SubjectKey {
                subject_id,
                tenant_id,
                wrapped_key,
            } => {
                let bytes = hex::decode(&wrapped_key).map_err(|_| {
                    ApiError::invalid("input", format!("line {}: bad key", number + 1))
                })?;
                store
                    .put_subject_key(subject_id, tenant_id, bytes)
                    .await
                    .map_err(|e| internal(&e))?;
            }
            ExportLine::Event(event) => {
                events.push(*event);
                if events.len() >= 10_000 {
                    imported += events.len() as u64;
                    store
                        .import(std::mem::take(&mut events))
                        .await
                        .map_err(|e| internal(&e))?;
                }
            }
        }
    }
    imported += events.len() as u64;
    if !events.is_empty() {
        store.import(events).await.map_err(|e| internal(&e))?;
    }
    Sealer::new(store, None)
        .catch_up()
        .await
        .map_err(|e| internal(&e))?;
    Ok(imported)
}

/// `gatehouse audit …`: returns the process exit code (1 when `verify` finds a broken link).
pub async fn run_cli(
    args: crate::config::AuditArgs,
    file: crate::config::FileConfig,
) -> anyhow::Result<i32> {
    use crate::config::AuditCommand;
    let (data, url) = args.store.resolve(&file);
    let store = gatehouse_events::connect(&url).await?;
    // The master key opens personal data and derives the audit key; the audit commands never
    // create one.
    let master = match &args.master_key {
        Some(text) => Some(Crypto::load_master_key(Some(text), &data)?),
        None if data.join("master.key").exists() => Some(Crypto::load_master_key(None, &data)?),
        None => None,
    };
    let crypto = Arc::new(Crypto::new(master.unwrap_or_default(), store.clone()));
    let disclosure = Disclosure::new(crypto.clone(), master.is_some());
    let tenant = |text: &Option<String>| -> anyhow::Result<Option<Uuid>> {
        Ok(text.as_deref().map(Uuid::parse_str).transpose()?)
    };
    let mut out = std::io::stdout().lock();
    match args.command {
        AuditCommand::Verify {
            tenant: t,
            public_key,
            seal,
        } => {
            if seal {
                Sealer::new(store.clone(), None).catch_up().await?;
            }
            let public_key = match (public_key, master.is_some()) {
                (Some(text), _) => Some(hex::decode(text.trim())?),
                (None, true) => Some(crypto.audit_key()?.public_key()),
                (None, false) => None,
            };
            let report = gatehouse_events::integrity::verify(
                store.as_ref(),
                tenant(&t)?,
                public_key.as_deref(),
            )
            .await?;
            let proto = crate::event_service::report_to_proto(
                &report,
                public_key.as_deref().unwrap_or_default(),
            );
            let summary = serde_json::json!({
                "intact": proto.intact,
                "broken": proto.broken.as_ref().map(|b| serde_json::json!({
                    "position": b.position, "tenant_id": b.tenant_id, "reason": b.reason,
                })),
                "events_checked": proto.events_checked,
                "sealed_up_to": proto.sealed_up_to,
                "unsealed": proto.unsealed,
                "checkpoints_checked": proto.checkpoints_checked,
                "signatures_checked": public_key.is_some(),
                "heads": proto.heads.iter().map(|h| serde_json::json!({
                    "tenant_id": h.tenant_id, "position": h.position, "hash": h.hash,
                })).collect::<Vec<_>>(),
                "audit_public_key": proto.audit_public_key,
            });
            writeln!(out, "{summary}")?;
            Ok(if report.intact() { 0 } else { 1 })
        }
        AuditCommand::State {
            stream_type,
            id,
            at,
        } => {
            let id = Uuid::parse_str(&id)?;
            let state = state_at(
                store.as_ref(),
                &stream_type,
                id,
                parse_at(&at).map_err(|e| anyhow::anyhow!("{e}"))?,
                &disclosure,
            )
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            writeln!(out, "{}", serde_json::to_string(&state)?)?;
            Ok(0)
        }
        AuditCommand::Timeline {
            user,
            ip,
            session,
            correlation,
            tenant: t,
            json,
        } => {
            let subject = match (user, ip, session, correlation) {
                (Some(id), ..) => Subject::User(Uuid::parse_str(&id)?),
                (_, Some(ip), ..) => Subject::Ip(ip.parse::<std::net::IpAddr>()?.to_string()),
                (_, _, Some(id), _) => Subject::Session(Uuid::parse_str(&id)?),
                (.., Some(id)) => Subject::Correlation(Uuid::parse_str(&id)?),
                _ => anyhow::bail!("name one of --user, --ip, --session, --correlation"),
            };
            let events = timeline(store.as_ref(), tenant(&t)?, &subject, Range::default())
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            for event in &events {
                if json {
                    let mut value = serde_json::to_value(event)?;
                    value["payload"] = disclosure
                        .payload(event)
                        .await
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    value["description"] = Value::String(describe(event));
                    writeln!(out, "{value}")?;
                } else {
                    writeln!(
                        out,
                        "{:>20}  {}  {:<28} {}",
                        event.position,
                        event
                            .recorded_at
                            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                        event.event_type,
                        describe(event)
                    )?;
                }
            }
            Ok(0)
        }
        AuditCommand::Export {
            tenant: t,
            from,
            to,
        } => {
            let tenant_id = Uuid::parse_str(&t)?;
            let time = |text: Option<String>| -> anyhow::Result<Option<DateTime<Utc>>> {
                Ok(text
                    .map(|t| DateTime::parse_from_rfc3339(&t).map(|t| t.with_timezone(&Utc)))
                    .transpose()?)
            };
            let range = Range {
                from: time(from)?,
                to: time(to)?,
            };
            let mut writer = std::io::BufWriter::new(out);
            let written = export(store.as_ref(), tenant_id, range, &mut writer)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            eprintln!("exported {written} events");
            Ok(0)
        }
        AuditCommand::Import { file } => {
            let input: Box<dyn BufRead> = if file.as_os_str() == "-" {
                Box::new(std::io::BufReader::new(std::io::stdin()))
            } else {
                Box::new(std::io::BufReader::new(std::fs::File::open(&file)?))
            };
            let imported = import(store, input)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            writeln!(out, "imported {imported} events")?;
            Ok(0)
        }
    }
}
