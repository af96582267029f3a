//! The offline detector: a subscriber of the log that finds attacks no single sign-in shows.
//!
//! - `brute_force` (medium): many failed passwords against one account (its lockout stream:
//!   an email without an account counts as one too) within the window.
//! - `password_spray` (high): failed passwords from one network (the IPv4 /24 or IPv6 /48 of
//!   the client) against many distinct accounts within the window.
//!
//! Each detection is its own stream `detection/<id>` with one `RiskDetected` event naming
//! the events (ids and positions) that caused it. The id is derived from the detection's kind,
//! its subject and the event that crossed the threshold, and the append expects a new stream,
//! so a detector that replays the log (a restart, another replica) records nothing twice:
//! the state it folds is rebuilt from the same events in the same order, it reaches the same
//! decisions, and the store refuses the copies. After a detection the same subject is quiet
//! for one window (one attack, one detection).
//!
//! It reads sign-in events by their public schema (it does not depend on the sign-in crate,
//! which depends on this one).

use chrono::{DateTime, Duration, Utc};
use futures::StreamExt;
use gatehouse_core::net::network_of;
use gatehouse_events::{
    Aggregate, AppendRequest, DomainEvent, EventFilter, EventStore, ExpectedVersion, Metadata,
    Position, RecordedEvent, StoreError, StreamId,
};
use gatehouse_policy::model::RiskLevel;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use uuid::Uuid;

/// When the detector speaks up.
#[derive(Debug, Clone)]
pub struct Thresholds {
    /// Failed passwords on one account within the window.
    pub brute_force_failures: usize,
    /// Distinct accounts failing from one network within the window.
    pub spray_accounts: usize,
    /// The window.
    pub window: Duration,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            brute_force_failures: 20,
            spray_accounts: 20,
            window: Duration::hours(1),
        }
    }
}

/// One event that contributed to a detection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    /// The event's id.
    pub event_id: Uuid,
    /// Its position in the log.
    pub position: Position,
}

/// Events of a detection stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum DetectionEvent {
    /// Something risky was found.
    RiskDetected {
        /// `brute_force`, `password_spray`.
        kind: String,
        /// Its level.
        level: RiskLevel,
        /// `offline` (from the log) or `realtime` (in the flow).
        timing: String,
        /// The account, when it is known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user_id: Option<Uuid>,
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

/// `SignInStarted`, as far as the detector cares.
#[derive(Deserialize)]
struct Started {
    user_id: Option<Uuid>,
    lockout_id: Uuid,
}

#[derive(Clone, Copy)]
struct Failure {
    at: DateTime<Utc>,
    account: Uuid,
    evidence: (Uuid, Position),
}

/// Failures of one subject within the window, and when it may speak again.
#[derive(Default)]
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

/// A detection found by folding the log, not yet recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    /// Its stream id (derived: the same decision always has the same id).
    pub id: Uuid,
    /// The tenant.
    pub tenant_id: Uuid,
    /// What to record.
    pub event: DetectionEvent,
}

/// The detector's state: pure folding of the log, no I/O.
pub struct Detector {
    thresholds: Thresholds,
    flows: HashMap<Uuid, (Uuid, Started, DateTime<Utc>)>,
    accounts: HashMap<(Uuid, Uuid), Window>,
    networks: HashMap<(Uuid, String), Window>,
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

impl Detector {
    /// A detector with these thresholds.
    pub fn new(thresholds: Thresholds) -> Self {
        Detector {
            thresholds,
            flows: HashMap::new(),
            accounts: HashMap::new(),
            networks: HashMap::new(),
            events_since_prune: 0,
        }
    }

    /// The events the detector reads.
    pub fn filter() -> EventFilter {
        EventFilter {
            stream_types: vec!["signin".into()],
            event_types: vec!["SignInStarted".into(), "PasswordRejected".into()],
            ..EventFilter::default()
        }
    }

    /// Folds one event; returns what it reveals.
    pub fn observe(&mut self, event: &RecordedEvent) -> Vec<Found> {
        self.events_since_prune += 1;
        if self.events_since_prune >= 10_000 {
            self.prune(event.recorded_at);
        }
        match event.event_type.as_str() {
            "SignInStarted" => {
                if let Ok(started) = serde_json::from_str::<Started>(event.payload.get()) {
                    self.flows.insert(
                        event.stream.id,
                        (event.tenant_id, started, event.recorded_at),
                    );
                }
                Vec::new()
            }
            "PasswordRejected" => self.failure(event),
            _ => Vec::new(),
        }
    }

    /// Forgets flows and windows older than the window (memory stays bounded).
    fn prune(&mut self, now: DateTime<Utc>) {
        self.events_since_prune = 0;
        // A flow lives 10 minutes by default: keep it for a window past its start.
        let horizon = now - self.thresholds.window - Duration::minutes(10);
        self.flows.retain(|_, (_, _, started)| *started > horizon);
        let stale = |w: &Window| {
            w.failures.back().is_none_or(|last| last.at < horizon)
                && w.quiet_until.is_none_or(|until| until < now)
        };
        self.accounts.retain(|_, w| !stale(w));
        self.networks.retain(|_, w| !stale(w));
    }

    fn failure(&mut self, event: &RecordedEvent) -> Vec<Found> {
        let Some((tenant_id, started, _)) = self.flows.get(&event.stream.id) else {
            return Vec::new();
        };
        let tenant_id = *tenant_id;
        let (account, user_id) = (started.lockout_id, started.user_id);
        let failure = Failure {
            at: event.recorded_at,
            account,
            evidence: (event.id, event.position),
        };
        let window = self.thresholds.window;
        let mut found = Vec::new();

        let attempts = self.accounts.entry((tenant_id, account)).or_default();
        if attempts.push(failure, window)
            && attempts.failures.len() >= self.thresholds.brute_force_failures
        {
            let failures = attempts.fire(failure.at, window);
            found.push(Found {
                id: derived_id("brute_force", &account.to_string(), event.id),
                tenant_id,
                event: DetectionEvent::RiskDetected {
                    kind: "brute_force".into(),
                    level: RiskLevel::Medium,
                    timing: "offline".into(),
                    user_id,
                    source: None,
                    description: format!(
                        "{} failed passwords on one account within {} minutes",
                        failures.len(),
                        window.num_minutes()
                    ),
                    evidence: evidence(&failures),
                },
            });
        }

        let ip = event
            .context
            .as_ref()
            .and_then(|c| c.ip.as_deref()?.parse::<IpAddr>().ok());
        if let Some(ip) = ip {
            let network = network_of(ip);
            let attempts = self
                .networks
                .entry((tenant_id, network.clone()))
                .or_default();
            if attempts.push(failure, window) {
                let accounts: HashSet<Uuid> = attempts.failures.iter().map(|f| f.account).collect();
                if accounts.len() >= self.thresholds.spray_accounts {
                    let failures = attempts.fire(failure.at, window);
                    found.push(Found {
                        id: derived_id("password_spray", &network, event.id),
                        tenant_id,
                        event: DetectionEvent::RiskDetected {
                            kind: "password_spray".into(),
                            level: RiskLevel::High,
                            timing: "offline".into(),
                            user_id: None,
                            source: Some(network),
                            description: format!(
                                "failed passwords against {} accounts from one network within \
                                 {} minutes",
                                accounts.len(),
                                window.num_minutes()
                            ),
                            evidence: evidence(&failures),
                        },
                    });
                }
            }
        }
        found
    }
}

fn evidence(failures: &[Failure]) -> Vec<Evidence> {
    failures
        .iter()
        .map(|f| Evidence {
            event_id: f.evidence.0,
            position: f.evidence.1,
        })
        .collect()
}

/// Records a detection once: a copy (the same id) is refused by the store and ignored.
pub async fn record(store: &dyn EventStore, found: &Found) -> Result<bool, StoreError> {
    let stream = StreamId::new(Detection::STREAM_TYPE, found.id);
    let mut request = AppendRequest::new(Metadata::system());
    request.expect(&stream, ExpectedVersion::Exact(0));
    request.push(found.event.to_new_event(found.tenant_id, &stream)?);
    match store.append(request).await {
        Ok(_) => Ok(true),
        Err(StoreError::Conflict { .. }) => Ok(false),
        Err(other) => Err(other),
    }
}

/// Follows the log from the beginning and records what the detector finds, until the
/// subscription ends. Replaying from the start on every start is what makes restarts exact
/// (see the module documentation).
pub async fn run(store: Arc<dyn EventStore>, thresholds: Thresholds) {
    let mut detector = Detector::new(thresholds);
    let mut events = Box::pin(gatehouse_events::subscription::subscribe(
        store.clone(),
        0,
        Detector::filter(),
    ));
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => {
                for found in detector.observe(&event) {
                    // The store may be briefly unavailable: a detection is not dropped for it.
                    let mut delay = std::time::Duration::from_millis(100);
                    while let Err(error) = record(store.as_ref(), &found).await {
                        tracing::warn!(%error, "a risk detection could not be recorded; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(std::time::Duration::from_secs(30));
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, "the risk detector stopped");
                return;
            }
        }
    }
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
            self.position += 1;
            self.at += Duration::seconds(5);
            let mut event =
                RecordedEvent::pending(self.tenant, StreamId::new("signin", flow), self.at);
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
                let rejected = r#"{"reason":"invalid_credentials"}"#.to_string();
                self.push(flow, "PasswordRejected", rejected, ip);
            }
        }

        fn detect(&self) -> Vec<Found> {
            let mut detector = Detector::new(Thresholds::default());
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
}
