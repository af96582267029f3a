//! The detector: a subscriber of the log that turns what it reads into detections.
//!
//! Offline (found by folding the log):
//! - `brute_force` (medium): many failed passwords against one account (its lockout stream:
//!   an email without an account counts as one too) within the window.
//! - `password_spray` (high): failed passwords from one network (the IPv4 /24 or IPv6 /48 of
//!   the client) against many distinct accounts within the window.
//! - `atypical_travel` (medium): two successful sign-ins of a user farther apart than the
//!   tenant's plausible speed allows (and farther than its minimum distance).
//! - `unfamiliar_sign_in_properties` (low for one new property, medium for more): a
//!   successful sign-in from a country, network operator (ASN), browser family or operating
//!   system the user never signed in with, once the user is past the learning period.
//! - `anomalous_token` (high): a rotated refresh token came back (the session was revoked).
//! - `admin_confirmed_compromised` (high): an analyst's ConfirmCompromised.
//!
//! Real-time (decided inside the request, recorded here from the event that says so):
//! - `anonymous_ip`, `malicious_ip`, `leaked_credentials` from a flow's `RiskAssessed`;
//! - `leaked_credentials` from a sign-up or password change with a breached password.
//!
//! Each detection is its own stream `detection/<id>` with one `RiskDetected` event naming
//! the events (ids and positions) that caused it; when it names a user, the same append adds
//! `RiskRaised` to the user's `userrisk` stream. The id is derived from the detection's kind,
//! its subject and the event that triggered it, and the append expects a new stream, so a
//! detector that folds events again (after a restart from its checkpoint, or on another
//! replica) records nothing twice: it reaches the same decisions from the same events in
//! the same order, and the store refuses the copies. The state is checkpointed (see
//! [`run`]). Thresholds are each tenant's (its settings
//! events are folded too, so a replay judges with the settings of the time). After a
//! brute force or spray detection the same subject is quiet for one window.
//!
//! It reads sign-in and session events by their public schema (it does not depend on the
//! sign-in crate, which depends on this one).

use crate::realtime::Properties;
use crate::user_risk::{UserRisk, UserRiskEvent};
use chrono::{DateTime, Duration, Utc};
use futures::StreamExt;
use gatehouse_core::geo::Location;
use gatehouse_core::net::network_of;
use gatehouse_directory::tenant::RiskSettings;
use gatehouse_events::{
    Aggregate, AppendRequest, DomainEvent, EventFilter, EventStore, ExpectedVersion, Metadata,
    Position, RecordedEvent, StoreError, StreamId,
};
use gatehouse_policy::model::RiskLevel;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use uuid::Uuid;

/// One event that contributed to a detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    /// The event's id.
    pub event_id: Uuid,
    /// Its position in the log.
    pub position: Position,
}

impl Evidence {
    fn of(event: &RecordedEvent) -> Self {
        Evidence {
            event_id: event.id,
            position: event.position,
        }
    }
}

/// Events of a detection stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum DetectionEvent {
    /// Something risky was found.
    RiskDetected {
        /// `brute_force`, `password_spray`, `anonymous_ip`...
        kind: String,
        /// Its level.
        level: RiskLevel,
        /// `offline` (from the log) or `realtime` (in the request).
        timing: String,
        /// The account, when it is known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user_id: Option<Uuid>,
        /// The sign-in it was found in, for sign-in detections.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sign_in_id: Option<Uuid>,
        /// The network or address the attempts came from.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        source: Option<String>,
        /// What was seen, in words.
        description: String,
        /// The events that caused it.
        evidence: Vec<Evidence>,
    },
}

impl DomainEvent for DetectionEvent {}

/// A detection's state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Detection {
    /// Its kind (empty before it exists).
    pub kind: String,
    /// Its level.
    pub level: RiskLevel,
    /// The account.
    pub user_id: Option<Uuid>,
}

impl Aggregate for Detection {
    const STREAM_TYPE: &'static str = "detection";
    type Event = DetectionEvent;

    fn apply(&mut self, event: DetectionEvent, _envelope: &RecordedEvent) {
        let DetectionEvent::RiskDetected {
            kind,
            level,
            user_id,
            ..
        } = event;
        self.kind = kind;
        self.level = level;
        self.user_id = user_id;
    }
}

/// `PasswordRejected`, as far as the detector cares (events recorded before it carried the
/// account are not counted).
#[derive(Deserialize)]
struct Rejected {
    lockout_id: Option<Uuid>,
    user_id: Option<Uuid>,
}

/// A real-time detection as the flow records it.
#[derive(Deserialize)]
struct FlowDetection {
    kind: String,
    level: RiskLevel,
    evidence: String,
}

/// `RiskAssessed`, as far as the detector cares.
#[derive(Deserialize)]
struct Assessed {
    #[serde(default)]
    detections: Vec<FlowDetection>,
    user_id: Option<Uuid>,
    properties: Option<Properties>,
}

/// A sign-up or password change: was the password breached?
#[derive(Deserialize)]
struct NewPassword {
    #[serde(default)]
    breached: bool,
}

/// `RefreshTokenReused`.
#[derive(Deserialize)]
struct Reused {
    generation: usize,
    user_id: Option<Uuid>,
}

/// A tenant's settings event, as far as the detector cares.
#[derive(Deserialize)]
struct SettingsEvent {
    settings: RiskOnly,
}

#[derive(Deserialize)]
struct RiskOnly {
    #[serde(default)]
    risk: RiskSettings,
}

#[derive(Clone, Copy, Serialize, Deserialize)]
struct Failure {
    at: DateTime<Utc>,
    account: Uuid,
    evidence: Evidence,
}

/// Failures of one subject within the window, and when it may speak again.
#[derive(Default, Serialize, Deserialize)]
struct Window {
    failures: VecDeque<Failure>,
    quiet_until: Option<DateTime<Utc>>,
}

impl Window {
    fn push(&mut self, failure: Failure, window: Duration) -> bool {
        if self.quiet_until.is_some_and(|until| failure.at < until) {
            return false;
        }
        while self
            .failures
            .front()
            .is_some_and(|oldest| failure.at - oldest.at > window)
        {
            self.failures.pop_front();
        }
        self.failures.push_back(failure);
        true
    }

    fn fire(&mut self, at: DateTime<Utc>, window: Duration) -> Vec<Failure> {
        self.quiet_until = Some(at + window);
        self.failures.drain(..).collect()
    }
}

/// A flow past its password, until it ends: the account and properties its risk
/// assessment recorded, and that event. (Only these flows are remembered: a flood of
/// started flows costs the detector nothing.)
#[derive(Serialize, Deserialize)]
struct Flow {
    tenant_id: Uuid,
    user_id: Uuid,
    properties: Properties,
    assessed: Evidence,
    at: DateTime<Utc>,
}

/// The longest a sign-in flow may live (the server's `sign_in_lifetime` is at most a day).
const MAX_FLOW_LIFETIME: i64 = 86_400;

/// Most values remembered per property and user.
const MAX_KNOWN: usize = 64;

/// What a user's successful sign-ins looked like.
#[derive(Default, Serialize, Deserialize)]
struct History {
    first: Option<DateTime<Utc>>,
    successes: u32,
    countries: BTreeSet<String>,
    asns: BTreeSet<u32>,
    browsers: BTreeSet<String>,
    oses: BTreeSet<String>,
    last: Option<(DateTime<Utc>, Location, Evidence)>,
}

/// Remembers `value`; true when it was new. A user with more values than are remembered
/// has nothing unfamiliar left.
fn learn<T: Ord>(known: &mut BTreeSet<T>, value: Option<T>) -> bool {
    match value {
        Some(value) if known.len() < MAX_KNOWN => known.insert(value),
        _ => false,
    }
}

/// A detection found by folding the log, not yet recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    /// Its stream id (derived: the same decision always has the same id).
    pub id: Uuid,
    /// The tenant.
    pub tenant_id: Uuid,
    /// When the event that triggered it was recorded.
    pub caused_at: DateTime<Utc>,
    /// What to record.
    pub event: DetectionEvent,
}

impl Found {
    fn new(tenant_id: Uuid, subject: &str, trigger: &RecordedEvent, event: DetectionEvent) -> Self {
        let DetectionEvent::RiskDetected { kind, .. } = &event;
        Found {
            id: derived_id(kind, subject, trigger.id),
            tenant_id,
            caused_at: trigger.recorded_at,
            event,
        }
    }
}

/// How a detection weighs on its user's risk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserEffect {
    /// None: failed attempts prove nothing about the account, and anyone who knows an email
    /// could otherwise raise its owner's risk (the detection is still reported).
    None,
    /// Until remediated in its sign-in (a second factor passed there) or later.
    SignIn,
    /// Until the user changes the password securely or an analyst closes it: a breached
    /// password, a stolen refresh token, a confirmed compromise stay true after one MFA.
    User,
}

/// The effect of a detection of `kind` on its user's risk.
pub fn user_effect(kind: &str) -> UserEffect {
    match kind {
        "brute_force" | "password_spray" => UserEffect::None,
        "anonymous_ip" | "malicious_ip" | "atypical_travel" | "unfamiliar_sign_in_properties" => {
            UserEffect::SignIn
        }
        _ => UserEffect::User,
    }
}

/// The detector's state: pure folding of the log, no I/O.
#[derive(Default)]
pub struct Detector {
    tenants: HashMap<Uuid, RiskSettings>,
    flows: HashMap<Uuid, Flow>,
    accounts: HashMap<(Uuid, Uuid), Window>,
    networks: HashMap<(Uuid, String), Window>,
    users: HashMap<(Uuid, Uuid), History>,
    events_since_prune: usize,
}

fn derived_id(kind: &str, subject: &str, trigger: Uuid) -> Uuid {
    let digest = Sha256::new()
        .chain_update(kind.as_bytes())
        .chain_update([0])
        .chain_update(subject.as_bytes())
        .chain_update([0])
        .chain_update(trigger.as_bytes())
        .finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    // A version-8 (custom) UUID.
    bytes[6] = (bytes[6] & 0x0f) | 0x80;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    Uuid::from_bytes(bytes)
}

/// The client address of an event, when it has a valid one.
fn ip_of(event: &RecordedEvent) -> Option<IpAddr> {
    event.context.as_ref()?.ip.as_deref()?.parse().ok()
}

#[allow(clippy::too_many_arguments)]
fn detected(
    kind: &str,
    level: RiskLevel,
    timing: &str,
    user_id: Option<Uuid>,
    sign_in_id: Option<Uuid>,
    source: Option<String>,
    description: String,
    evidence: Vec<Evidence>,
) -> DetectionEvent {
    DetectionEvent::RiskDetected {
        kind: kind.into(),
        level,
        timing: timing.into(),
        user_id,
        sign_in_id,
        source,
        description,
        evidence,
    }
}

impl Detector {
    /// A detector that knows no tenant yet (each tenant's settings come from the log).
    pub fn new() -> Self {
        Detector::default()
    }

    /// The events the detector reads.
    pub fn filter() -> EventFilter {
        EventFilter {
            stream_types: vec![
                "tenant".into(),
                "signin".into(),
                "user".into(),
                "session".into(),
                UserRisk::STREAM_TYPE.into(),
            ],
            event_types: [
                "TenantCreated",
                "TenantSettingsUpdated",
                "PasswordRejected",
                "RiskAssessed",
                "SignInCompleted",
                "SignInFailed",
                "SignInCancelled",
                "SignInExpired",
                "UserSignedUp",
                "PasswordChanged",
                "RefreshTokenReused",
                "CompromiseConfirmed",
            ]
            .map(String::from)
            .to_vec(),
            ..EventFilter::default()
        }
    }

    fn settings(&self, tenant_id: Uuid) -> RiskSettings {
        self.tenants.get(&tenant_id).cloned().unwrap_or_default()
    }

    /// Folds one event; returns what it reveals.
    pub fn observe(&mut self, event: &RecordedEvent) -> Vec<Found> {
        self.events_since_prune += 1;
        if self.events_since_prune >= 10_000 {
            self.prune(event.recorded_at);
        }
        let tenant_id = event.tenant_id;
        match (event.stream.kind.as_str(), event.event_type.as_str()) {
            ("tenant", "TenantCreated" | "TenantSettingsUpdated") => {
                if let Ok(settings) = event.payload_as::<SettingsEvent>() {
                    self.tenants.insert(tenant_id, settings.settings.risk);
                }
                Vec::new()
            }
            ("signin", "PasswordRejected") => self.failure(event),
            ("signin", "RiskAssessed") => self.assessed(event),
            ("signin", "SignInCompleted") => self.succeeded(event),
            ("signin", "SignInFailed" | "SignInCancelled" | "SignInExpired") => {
                self.flows.remove(&event.stream.id);
                Vec::new()
            }
            ("user", "UserSignedUp" | "PasswordChanged") => {
                let breached = event
                    .payload_as::<NewPassword>()
                    .is_ok_and(|payload| payload.breached);
                if !breached {
                    return Vec::new();
                }
                let user_id = event.stream.id;
                let when = if event.event_type == "UserSignedUp" {
                    "at sign-up"
                } else {
                    "at a password change"
                };
                vec![Found::new(
                    tenant_id,
                    &user_id.to_string(),
                    event,
                    detected(
                        "leaked_credentials",
                        RiskLevel::High,
                        "realtime",
                        Some(user_id),
                        None,
                        ip_of(event).map(|ip| ip.to_string()),
                        format!("the password chosen {when} is in the breached-password list"),
                        vec![Evidence::of(event)],
                    ),
                )]
            }
            ("session", "RefreshTokenReused") => {
                let Ok(reused) = event.payload_as::<Reused>() else {
                    return Vec::new();
                };
                vec![Found::new(
                    tenant_id,
                    &event.stream.id.to_string(),
                    event,
                    detected(
                        "anomalous_token",
                        RiskLevel::High,
                        "offline",
                        reused.user_id,
                        None,
                        ip_of(event).map(|ip| ip.to_string()),
                        format!(
                            "refresh token generation {} of session {} was used again after it \
                             was rotated; the session was revoked",
                            reused.generation, event.stream.id
                        ),
                        vec![Evidence::of(event)],
                    ),
                )]
            }
            (kind, "CompromiseConfirmed") if kind == UserRisk::STREAM_TYPE => {
                let user_id = event.stream.id;
                vec![Found::new(
                    tenant_id,
                    &user_id.to_string(),
                    event,
                    detected(
                        crate::user_risk::ADMIN_CONFIRMED,
                        RiskLevel::High,
                        "offline",
                        Some(user_id),
                        None,
                        None,
                        "an analyst confirmed the account compromised".into(),
                        vec![Evidence::of(event)],
                    ),
                )]
            }
            _ => Vec::new(),
        }
    }

    /// Forgets flows and windows older than the longest window (memory stays bounded by the
    /// traffic of a window; user histories stay, one per user).
    fn prune(&mut self, now: DateTime<Utc>) {
        self.events_since_prune = 0;
        let longest = self
            .tenants
            .values()
            .map(|s| s.window_minutes)
            .chain([RiskSettings::default().window_minutes])
            .max()
            .unwrap_or(60);
        let horizon = now - Duration::minutes(i64::from(longest) + 10);
        // A flow ends with an event (completed, failed, cancelled, expired) that removes
        // it; one older than the longest flow lifetime (a day) is forgotten all the same.
        self.flows
            .retain(|_, flow| now - flow.at < Duration::seconds(MAX_FLOW_LIFETIME));
        let stale = |w: &Window| {
            w.failures.back().is_none_or(|last| last.at < horizon)
                && w.quiet_until.is_none_or(|until| until < now)
        };
        self.accounts.retain(|_, w| !stale(w));
        self.networks.retain(|_, w| !stale(w));
    }

    fn failure(&mut self, event: &RecordedEvent) -> Vec<Found> {
        let Ok(Rejected {
            lockout_id: Some(account),
            user_id,
        }) = event.payload_as::<Rejected>()
        else {
            return Vec::new();
        };
        let tenant_id = event.tenant_id;
        let settings = self.settings(tenant_id);
        let failure = Failure {
            at: event.recorded_at,
            account,
            evidence: Evidence::of(event),
        };
        let window = Duration::minutes(i64::from(settings.window_minutes));
        let mut found = Vec::new();

        let attempts = self.accounts.entry((tenant_id, account)).or_default();
        if attempts.push(failure, window)
            && attempts.failures.len() >= settings.brute_force_failures as usize
        {
            let failures = attempts.fire(failure.at, window);
            found.push(Found::new(
                tenant_id,
                &account.to_string(),
                event,
                detected(
                    "brute_force",
                    RiskLevel::Medium,
                    "offline",
                    user_id,
                    None,
                    None,
                    format!(
                        "{} failed passwords on one account within {} minutes",
                        failures.len(),
                        window.num_minutes()
                    ),
                    failures.iter().map(|f| f.evidence).collect(),
                ),
            ));
        }

        if let Some(ip) = ip_of(event) {
            let network = network_of(ip);
            let attempts = self
                .networks
                .entry((tenant_id, network.clone()))
                .or_default();
            if attempts.push(failure, window) {
                let accounts: HashSet<Uuid> = attempts.failures.iter().map(|f| f.account).collect();
                if accounts.len() >= settings.spray_accounts as usize {
                    let failures = attempts.fire(failure.at, window);
                    found.push(Found::new(
                        tenant_id,
                        &network,
                        event,
                        detected(
                            "password_spray",
                            RiskLevel::High,
                            "offline",
                            None,
                            None,
                            Some(network.clone()),
                            format!(
                                "failed passwords against {} accounts from one network within \
                                 {} minutes",
                                accounts.len(),
                                window.num_minutes()
                            ),
                            failures.iter().map(|f| f.evidence).collect(),
                        ),
                    ));
                }
            }
        }
        found
    }

    /// The flow's real-time detections, recorded as detections; its properties kept for the
    /// checks made when it succeeds.
    fn assessed(&mut self, event: &RecordedEvent) -> Vec<Found> {
        let Ok(assessed) = event.payload_as::<Assessed>() else {
            return Vec::new();
        };
        let flow_id = event.stream.id;
        let user_id = assessed.user_id;
        if let Some(user_id) = user_id {
            self.flows.insert(
                flow_id,
                Flow {
                    tenant_id: event.tenant_id,
                    user_id,
                    properties: assessed.properties.unwrap_or_default(),
                    assessed: Evidence::of(event),
                    at: event.recorded_at,
                },
            );
        }
        let source = ip_of(event).map(|ip| ip.to_string());
        assessed
            .detections
            .into_iter()
            .map(|detection| {
                Found::new(
                    event.tenant_id,
                    &flow_id.to_string(),
                    event,
                    detected(
                        &detection.kind,
                        detection.level,
                        "realtime",
                        user_id,
                        Some(flow_id),
                        source.clone(),
                        detection.evidence,
                        vec![Evidence::of(event)],
                    ),
                )
            })
            .collect()
    }

    /// A successful sign-in: atypical travel since the last one, unfamiliar properties.
    fn succeeded(&mut self, event: &RecordedEvent) -> Vec<Found> {
        let Some(Flow {
            tenant_id,
            user_id,
            properties,
            assessed,
            ..
        }) = self.flows.remove(&event.stream.id)
        else {
            return Vec::new();
        };
        let settings = self.settings(tenant_id);
        let history = self.users.entry((tenant_id, user_id)).or_default();
        let at = event.recorded_at;
        let evidence = vec![assessed, Evidence::of(event)];
        let mut found = Vec::new();

        if let Some((last_at, last_location, last_evidence)) = &history.last
            && let Some(km) = last_location.distance_km(&properties.location)
        {
            let hours = ((at - *last_at).num_seconds().max(60)) as f64 / 3600.0;
            let speed = km / hours;
            if km >= f64::from(settings.travel_min_km)
                && speed > f64::from(settings.travel_speed_kmh)
            {
                let place = |l: &Location| l.country.clone().unwrap_or_else(|| "?".into());
                found.push(Found::new(
                    tenant_id,
                    &user_id.to_string(),
                    event,
                    detected(
                        "atypical_travel",
                        RiskLevel::Medium,
                        "offline",
                        Some(user_id),
                        Some(event.stream.id),
                        ip_of(event).map(|ip| ip.to_string()),
                        format!(
                            "successful sign-ins from {} and {} {km:.0} km apart within {} \
                             minutes ({speed:.0} km/h)",
                            place(last_location),
                            place(&properties.location),
                            (at - *last_at).num_minutes()
                        ),
                        [*last_evidence]
                            .into_iter()
                            .chain(evidence.clone())
                            .collect(),
                    ),
                ));
            }
        }

        let learned = history.successes >= settings.learning_sign_ins
            && history.first.is_some_and(|first| {
                at - first >= Duration::days(i64::from(settings.learning_days))
            });
        let location = &properties.location;
        let new: Vec<String> = [
            learn(&mut history.countries, location.country.clone())
                .then(|| format!("country {}", location.country.as_deref().unwrap_or(""))),
            learn(&mut history.asns, location.asn)
                .then(|| format!("network AS{}", location.asn.unwrap_or(0))),
            learn(&mut history.browsers, properties.browser.clone())
                .then(|| format!("browser {}", properties.browser.as_deref().unwrap_or(""))),
            learn(&mut history.oses, properties.os.clone()).then(|| {
                format!(
                    "operating system {}",
                    properties.os.as_deref().unwrap_or("")
                )
            }),
        ]
        .into_iter()
        .flatten()
        .collect();
        if learned && !new.is_empty() {
            found.push(Found::new(
                tenant_id,
                &user_id.to_string(),
                event,
                detected(
                    "unfamiliar_sign_in_properties",
                    if new.len() > 1 {
                        RiskLevel::Medium
                    } else {
                        RiskLevel::Low
                    },
                    "offline",
                    Some(user_id),
                    Some(event.stream.id),
                    ip_of(event).map(|ip| ip.to_string()),
                    format!("a sign-in with a new {}", new.join(", a new ")),
                    evidence.clone(),
                ),
            ));
        }

        history.first.get_or_insert(at);
        history.successes = history.successes.saturating_add(1);
        if location.latitude.is_some() {
            history.last = Some((at, location.clone(), assessed));
        }
        found
    }
}

/// The detector's state as a checkpoint: maps as lists (JSON keys are strings only).
#[derive(Serialize, Deserialize)]
struct Saved {
    format: u32,
    tenants: Vec<(Uuid, RiskSettings)>,
    flows: Vec<(Uuid, Flow)>,
    accounts: Vec<((Uuid, Uuid), Window)>,
    networks: Vec<((Uuid, String), Window)>,
    users: Vec<((Uuid, Uuid), History)>,
}

/// Bumped when the saved state changes shape (an old checkpoint is then ignored).
const SAVED_FORMAT: u32 = 1;

impl Detector {
    /// The state, for a checkpoint.
    fn save(&self) -> Result<serde_json::Value, serde_json::Error> {
        /// [`Saved`], borrowed.
        #[derive(Serialize)]
        struct SavedRef<'a> {
            format: u32,
            tenants: Vec<(&'a Uuid, &'a RiskSettings)>,
            flows: Vec<(&'a Uuid, &'a Flow)>,
            accounts: Vec<(&'a (Uuid, Uuid), &'a Window)>,
            networks: Vec<(&'a (Uuid, String), &'a Window)>,
            users: Vec<(&'a (Uuid, Uuid), &'a History)>,
        }
        // Saved as one JSON text: a tree of values would cost many times the state's size
        // in allocations, every few seconds.
        serde_json::to_string(&SavedRef {
            format: SAVED_FORMAT,
            tenants: self.tenants.iter().collect(),
            flows: self.flows.iter().collect(),
            accounts: self.accounts.iter().collect(),
            networks: self.networks.iter().collect(),
            users: self.users.iter().collect(),
        })
        .map(serde_json::Value::String)
    }

    /// The state of a checkpoint, unless it is of another format.
    fn restore(value: serde_json::Value) -> Option<Detector> {
        let serde_json::Value::String(text) = value else {
            return None;
        };
        let saved: Saved = serde_json::from_str(&text).ok()?;
        (saved.format == SAVED_FORMAT).then(|| Detector {
            tenants: saved.tenants.into_iter().collect(),
            flows: saved.flows.into_iter().collect(),
            accounts: saved.accounts.into_iter().collect(),
            networks: saved.networks.into_iter().collect(),
            users: saved.users.into_iter().collect(),
            events_since_prune: 0,
        })
    }
}

/// Where the detector keeps its checkpoint: the snapshot of this (event-less) stream, whose
/// version is the position of the last event folded into it.
pub fn checkpoint_stream() -> StreamId {
    StreamId::new("riskdetector", Uuid::nil())
}

/// How often the detector saves its checkpoint while events arrive.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Records a detection once: a copy (the same id) is refused by the store and ignored.
/// A detection naming a user raises that user's risk in the same append.
pub async fn record(store: &dyn EventStore, found: &Found) -> Result<bool, StoreError> {
    let stream = StreamId::new(Detection::STREAM_TYPE, found.id);
    let mut request = AppendRequest::new(Metadata::system());
    request.expect(&stream, ExpectedVersion::Exact(0));
    request.push(found.event.to_new_event(found.tenant_id, &stream)?);
    let DetectionEvent::RiskDetected {
        kind,
        level,
        user_id,
        sign_in_id,
        ..
    } = &found.event;
    let effect = user_effect(kind);
    if let (Some(user_id), true) = (user_id, effect != UserEffect::None) {
        let user_risk = StreamId::new(UserRisk::STREAM_TYPE, *user_id);
        let raised = UserRiskEvent::RiskRaised {
            detection_id: found.id,
            kind: kind.clone(),
            level: *level,
            sign_in_id: sign_in_id.filter(|_| effect == UserEffect::SignIn),
            caused_at: Some(found.caused_at),
        };
        request.push(raised.to_new_event(found.tenant_id, &user_risk)?);
    }
    match store.append(request).await {
        Ok(_) => Ok(true),
        Err(StoreError::Conflict { .. }) => Ok(false),
        Err(other) => Err(other),
    }
}

/// Follows the log and records what the detector finds, until the subscription ends; each
/// new detection is also published to NATS when a publisher is given.
///
/// It starts from its checkpoint (the folded state and the position it covers, saved every
/// few seconds once everything found up to that position is recorded), or from the start of
/// the log without one. A crash after a checkpoint folds the events after it again: the same
/// decisions, the same ids, copies refused (see the module documentation). Every replica
/// may run it; their checkpoints are folds of the same log, so any one of them will do.
pub async fn run(store: Arc<dyn EventStore>, publisher: Option<crate::publish::Publisher>) {
    let stream = checkpoint_stream();
    let (mut detector, from) = match store.load_snapshot(&stream).await {
        Ok(Some((position, value))) => match Detector::restore(value) {
            Some(detector) => (detector, position),
            None => (Detector::new(), 0),
        },
        Ok(None) => (Detector::new(), 0),
        Err(error) => {
            tracing::warn!(%error, "the risk detector's checkpoint could not be read; replaying the log");
            (Detector::new(), 0)
        }
    };
    let (mut folded, mut saved) = (from, from);
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    let mut events = Box::pin(gatehouse_events::subscription::subscribe(
        store.clone(),
        folded,
        Detector::filter(),
    ));
    loop {
        let event = tokio::select! {
            next = events.next() => match next {
                Some(Ok(event)) => event,
                other => {
                    // The store went away: resume after what was folded, a moment later.
                    if let Some(Err(error)) = other {
                        tracing::warn!(%error, "the risk detector lost the log; resuming");
                    }
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    events = Box::pin(gatehouse_events::subscription::subscribe(
                        store.clone(),
                        folded,
                        Detector::filter(),
                    ));
                    continue;
                }
            },
            _ = tick.tick() => {
                // Everything found up to `folded` is recorded: the state there is a checkpoint.
                if folded > saved {
                    match save(store.as_ref(), &stream, &detector, folded).await {
                        Ok(()) => saved = folded,
                        Err(error) => {
                            tracing::warn!(%error, "the risk detector's checkpoint was not saved")
                        }
                    }
                }
                continue;
            }
        };
        for found in detector.observe(&event) {
            // The store may be briefly unavailable: a detection is not dropped for it.
            let mut delay = std::time::Duration::from_millis(100);
            let new = loop {
                match record(store.as_ref(), &found).await {
                    Ok(new) => break new,
                    Err(error) => {
                        tracing::warn!(%error, "a risk detection could not be recorded; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(std::time::Duration::from_secs(30));
                    }
                }
            };
            if let (true, Some(publisher)) = (new, &publisher) {
                publisher.detection(&found, Utc::now()).await;
            }
        }
        folded = event.position;
    }
}

async fn save(
    store: &dyn EventStore,
    stream: &StreamId,
    detector: &Detector,
    position: Position,
) -> Result<(), String> {
    let state = detector.save().map_err(|e| e.to_string())?;
    store
        .save_snapshot(stream, position, &state)
        .await
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gatehouse_events::ClientContext;
    use serde_json::value::RawValue;

    /// A synthetic log: sign-in flows and their failed passwords.
    struct Log {
        tenant: Uuid,
        position: Position,
        at: DateTime<Utc>,
        events: Vec<RecordedEvent>,
    }

    impl Log {
        fn new() -> Self {
            Log {
                tenant: Uuid::from_u128(7),
                position: 0,
                at: DateTime::<Utc>::from_timestamp(1_800_000_000, 0).unwrap_or_default(),
                events: Vec::new(),
            }
        }

        fn push(&mut self, flow: Uuid, event_type: &str, payload: String, ip: &str) {
            self.push_to("signin", flow, event_type, payload, ip);
        }

        fn push_to(&mut self, kind: &str, id: Uuid, event_type: &str, payload: String, ip: &str) {
            self.position += 1;
            self.at += Duration::seconds(5);
            let mut event = RecordedEvent::pending(self.tenant, StreamId::new(kind, id), self.at);
            event.id = Uuid::from_u128(u128::from(self.position) << 64);
            event.position = self.position;
            event.event_type = event_type.into();
            event.context = Some(ClientContext {
                ip: Some(ip.into()),
                user_agent: None,
            });
            if let Ok(raw) = RawValue::from_string(payload) {
                event.payload = raw;
            }
            self.events.push(event);
        }

        /// A flow on `account` with `failures` wrong passwords from `ip`.
        fn attempt(&mut self, account: u128, failures: usize, ip: &str) {
            let flow = Uuid::from_u128(u128::from(self.position) + 1_000_000);
            let started = format!(
                r#"{{"application_id":"{}","client_id":"c","method":"password","user_id":"{}","lockout_id":"{}","expires_at":"2030-01-01T00:00:00Z"}}"#,
                Uuid::nil(),
                Uuid::from_u128(account),
                Uuid::from_u128(account)
            );
            self.push(flow, "SignInStarted", started, ip);
            for _ in 0..failures {
                let rejected = format!(
                    r#"{{"reason":"invalid_credentials","lockout_id":"{}","user_id":"{}"}}"#,
                    Uuid::from_u128(account),
                    Uuid::from_u128(account)
                );
                self.push(flow, "PasswordRejected", rejected, ip);
            }
        }

        /// A successful sign-in of `user` from `ip` with these properties.
        fn success(&mut self, user: u128, ip: &str, properties: serde_json::Value) -> Uuid {
            let flow = Uuid::from_u128(u128::from(self.position) + 1_000_000);
            let started = format!(
                r#"{{"application_id":"{}","client_id":"c","method":"password","user_id":"{}","lockout_id":"{}","expires_at":"2030-01-01T00:00:00Z"}}"#,
                Uuid::nil(),
                Uuid::from_u128(user),
                Uuid::from_u128(user)
            );
            self.push(flow, "SignInStarted", started, ip);
            let assessed = serde_json::json!({
                "level": "none",
                "user_id": Uuid::from_u128(user),
                "properties": properties,
            });
            self.push(flow, "RiskAssessed", assessed.to_string(), ip);
            let completed = serde_json::json!({ "session_id": Uuid::nil() });
            self.push(flow, "SignInCompleted", completed.to_string(), ip);
            flow
        }

        fn detect(&self) -> Vec<Found> {
            let mut detector = Detector::new();
            self.events
                .iter()
                .flat_map(|e| detector.observe(e))
                .collect()
        }
    }

    fn kinds(found: &[Found]) -> Vec<String> {
        found
            .iter()
            .map(|f| match &f.event {
                DetectionEvent::RiskDetected { kind, .. } => kind.clone(),
            })
            .collect()
    }

    #[test]
    fn thirty_wrong_passwords_on_one_account_are_one_brute_force() {
        let mut log = Log::new();
        log.attempt(1, 30, "203.0.113.9");
        let found = log.detect();
        assert_eq!(kinds(&found), ["brute_force"]);
        let DetectionEvent::RiskDetected {
            evidence, user_id, ..
        } = &found[0].event;
        assert_eq!(evidence.len(), 20);
        assert_eq!(*user_id, Some(Uuid::from_u128(1)));
    }

    #[test]
    fn one_network_against_fifty_accounts_is_one_spray() {
        let mut log = Log::new();
        for account in 0..50 {
            log.attempt(100 + account, 1, &format!("198.51.100.{}", account % 3));
        }
        let found = log.detect();
        assert_eq!(kinds(&found), ["password_spray"]);
        let DetectionEvent::RiskDetected {
            source, evidence, ..
        } = &found[0].event;
        assert_eq!(source.as_deref(), Some("198.51.100.0/24"));
        assert_eq!(evidence.len(), 20);
    }

    #[test]
    fn ordinary_typos_and_failures_spread_over_time_are_not_attacks() {
        let mut log = Log::new();
        for account in 0..10 {
            log.attempt(account, 2, &format!("192.0.2.{account}"));
        }
        // 19 failures on one account, then a quiet hour, then 19 more.
        log.attempt(500, 19, "192.0.2.200");
        log.at += Duration::hours(2);
        log.attempt(500, 19, "192.0.2.200");
        assert!(log.detect().is_empty());
    }

    #[test]
    fn replaying_the_log_finds_the_same_detections_with_the_same_ids() {
        let mut log = Log::new();
        log.attempt(1, 25, "203.0.113.9");
        for account in 0..30 {
            log.attempt(200 + account, 1, "203.0.113.10");
        }
        let first = log.detect();
        assert_eq!(first.len(), 2);
        assert_eq!(first, log.detect());
    }

    fn paris() -> serde_json::Value {
        serde_json::json!({"country": "FR", "latitude": 48.8566, "longitude": 2.3522,
            "asn": 3215, "browser": "chrome", "os": "windows"})
    }

    fn new_york() -> serde_json::Value {
        serde_json::json!({"country": "US", "latitude": 40.7128, "longitude": -74.006,
            "asn": 7018, "browser": "chrome", "os": "windows"})
    }

    #[test]
    fn paris_then_new_york_minutes_later_is_atypical_travel_hours_later_is_not() {
        let mut log = Log::new();
        log.success(1, "192.0.2.1", paris());
        // Ten minutes later, 5 837 km away.
        log.at += Duration::minutes(10);
        log.success(1, "198.51.100.1", new_york());
        log.success(2, "192.0.2.2", paris());
        log.at += Duration::hours(10);
        log.success(2, "198.51.100.2", new_york());
        let found = log.detect();
        assert_eq!(kinds(&found), ["atypical_travel"]);
        let DetectionEvent::RiskDetected {
            user_id,
            evidence,
            level,
            description,
            ..
        } = &found[0].event;
        assert_eq!(*user_id, Some(Uuid::from_u128(1)));
        assert_eq!(*level, RiskLevel::Medium);
        // The first sign-in's assessment, the second's assessment and its completion.
        assert_eq!(evidence.len(), 3);
        assert!(description.contains("FR and US"), "{description}");
    }

    #[test]
    fn new_properties_count_only_after_the_learning_period() {
        let mut log = Log::new();
        // A new user's first sign-ins are all new: nothing to say while it learns.
        log.success(1, "192.0.2.1", paris());
        log.success(
            1,
            "192.0.2.1",
            serde_json::json!({"country": "DE", "browser": "firefox"}),
        );
        for _ in 0..10 {
            log.success(1, "192.0.2.1", paris());
        }
        log.at += Duration::days(6);
        log.success(1, "192.0.2.1", paris());
        assert!(log.detect().is_empty());
        // Past 10 sign-ins and 5 days: one new property is low, two are medium.
        log.success(
            1,
            "192.0.2.1",
            serde_json::json!({"country": "FR", "latitude": 48.8566,
            "longitude": 2.3522, "asn": 3215, "browser": "safari", "os": "windows"}),
        );
        log.success(
            1,
            "192.0.2.1",
            serde_json::json!({"country": "JP", "asn": 2516,
            "browser": "chrome", "os": "windows"}),
        );
        let found = log.detect();
        assert_eq!(
            kinds(&found),
            [
                "unfamiliar_sign_in_properties",
                "unfamiliar_sign_in_properties"
            ]
        );
        let levels: Vec<RiskLevel> = found
            .iter()
            .map(|f| match &f.event {
                DetectionEvent::RiskDetected { level, .. } => *level,
            })
            .collect();
        assert_eq!(levels, [RiskLevel::Low, RiskLevel::Medium]);
    }

    #[test]
    fn real_time_findings_token_reuse_and_leaked_passwords_are_recorded_with_their_event() {
        let mut log = Log::new();
        let flow = Uuid::from_u128(42);
        log.push(
            flow,
            "SignInStarted",
            format!(
                r#"{{"user_id":"{}","lockout_id":"{}"}}"#,
                Uuid::from_u128(1),
                Uuid::from_u128(1)
            ),
            "192.0.2.1",
        );
        let assessed = serde_json::json!({"level": "high", "user_id": Uuid::from_u128(1),
            "detections": [
                {"kind": "anonymous_ip", "level": "medium", "evidence": "listed"},
                {"kind": "malicious_ip", "level": "high", "evidence": "listed"}]});
        log.push(flow, "RiskAssessed", assessed.to_string(), "192.0.2.1");
        let reused = serde_json::json!({"generation": 0, "user_id": Uuid::from_u128(2)});
        log.push_to(
            "session",
            Uuid::from_u128(7),
            "RefreshTokenReused",
            reused.to_string(),
            "192.0.2.9",
        );
        log.push_to(
            "user",
            Uuid::from_u128(3),
            "UserSignedUp",
            r#"{"breached":true}"#.into(),
            "192.0.2.3",
        );
        log.push_to(
            "user",
            Uuid::from_u128(4),
            "UserSignedUp",
            "{}".into(),
            "192.0.2.4",
        );
        let found = log.detect();
        assert_eq!(
            kinds(&found),
            [
                "anonymous_ip",
                "malicious_ip",
                "anomalous_token",
                "leaked_credentials"
            ]
        );
        let DetectionEvent::RiskDetected {
            timing,
            sign_in_id,
            evidence,
            ..
        } = &found[0].event;
        assert_eq!(timing, "realtime");
        assert_eq!(*sign_in_id, Some(flow));
        assert_eq!(evidence[0].position, 2);
        assert_ne!(found[0].id, found[1].id);
        let DetectionEvent::RiskDetected { user_id, .. } = &found[3].event;
        assert_eq!(*user_id, Some(Uuid::from_u128(3)));
    }

    #[test]
    fn a_tenant_s_own_thresholds_apply_from_its_settings_event_on() {
        let mut log = Log::new();
        log.attempt(1, 6, "203.0.113.9");
        let settings = serde_json::json!({"settings": {"risk": {"brute_force_failures": 5}}});
        log.push_to(
            "tenant",
            log.tenant,
            "TenantSettingsUpdated",
            settings.to_string(),
            "192.0.2.1",
        );
        assert!(log.detect().is_empty());
        log.attempt(2, 5, "203.0.113.10");
        assert_eq!(kinds(&log.detect()), ["brute_force"]);
    }

    #[test]
    fn a_restored_checkpoint_goes_on_as_if_it_had_never_stopped() -> Result<(), serde_json::Error> {
        let mut log = Log::new();
        log.attempt(1, 12, "203.0.113.9");
        log.success(5, "192.0.2.1", paris());
        let half = log.events.len();
        log.attempt(1, 12, "203.0.113.9");
        log.success(5, "198.51.100.1", new_york());
        let straight = log.detect();
        assert_eq!(kinds(&straight), ["brute_force", "atypical_travel"]);
        let mut first = Detector::new();
        let mut found: Vec<Found> = log.events[..half]
            .iter()
            .flat_map(|e| first.observe(e))
            .collect();
        let saved = first.save()?;
        let mut second = Detector::restore(saved).ok_or(serde::de::Error::custom("format"))?;
        found.extend(log.events[half..].iter().flat_map(|e| second.observe(e)));
        assert_eq!(found, straight);
        Ok(())
    }
}
