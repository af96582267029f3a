//! Smart lockout: failed primary attempts per account, counted apart for familiar and
//! unfamiliar locations, with a growing lock.
//!
//! The stream's id is the user's id, or for an email without an account an id derived from
//! its blind index: an unknown email locks exactly like a real account, so the lock tells an
//! attacker nothing about who exists.
//!
//! **Concurrency.** An attempt is *reserved* (`AttemptStarted`, appended with the exact
//! version the decision saw) before the password is checked, and a reservation is refused
//! while `failures + reservations in flight ≥ threshold`. Fifty concurrent guesses race on the
//! stream's version; every loser reloads and decides again, so at most `threshold` passwords
//! are ever checked before the lock (ZITADEL counted after checking: GHSA-7h8m-vrxx-vr4m). A
//! reservation whose outcome never arrived (the process died) counts as a failure once stale.
//!
//! ```text
//!   open ──AttemptStarted──▶ in flight ──AttemptFailed──▶ open (failures+1)
//!                                │                         │ failures = threshold
//!                                └──AttemptSucceeded──▶ open (failures = 0, location familiar)
//!                                                          ▼
//!                                     locked until t ──(t passes | LockCleared)──▶ open
//! ```

use crate::tenant::LockoutPolicy;
use chrono::{DateTime, Duration, Utc};
use gatehouse_events::{Aggregate, DomainEvent, RecordedEvent};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use uuid::Uuid;

/// A reservation older than this is taken for a failure (its process is gone).
pub const STALE_ATTEMPT: Duration = Duration::minutes(2);
/// Most familiar locations remembered per account (oldest forgotten first).
pub const MAX_FAMILIAR: usize = 50;

/// Events of a lockout stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum LockoutEvent {
    /// A primary attempt is about to be checked.
    AttemptStarted {
        /// The sign-in flow making it.
        attempt: Uuid,
        /// From a familiar location.
        familiar: bool,
    },
    /// The attempt failed; `locked_until` is set when it reached the threshold.
    AttemptFailed {
        /// The flow.
        attempt: Uuid,
        /// Counted as familiar.
        familiar: bool,
        /// The lock it started.
        locked_until: Option<DateTime<Utc>>,
    },
    /// The attempt succeeded: its class starts again from zero and the location is familiar.
    AttemptSucceeded {
        /// The flow.
        attempt: Uuid,
        /// Counted as familiar.
        familiar: bool,
        /// Blind index of the location (IP /24 or /48).
        location: Option<String>,
    },
    /// An administrator lifted the lock (UnlockUser).
    LockCleared,
}

impl DomainEvent for LockoutEvent {}

/// One class of attempts (familiar or unfamiliar).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Counter {
    /// Failures since the last success or lock.
    pub failures: u32,
    /// Locks so far (the next one lasts longer).
    pub locks: u32,
    /// Locked until.
    pub locked_until: Option<DateTime<Utc>>,
}

/// A lockout stream's state.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Lockout {
    /// Attempts from familiar locations.
    pub familiar: Counter,
    /// Attempts from elsewhere.
    pub unfamiliar: Counter,
    /// Reservations without an outcome: flow → (started, familiar).
    pub in_flight: BTreeMap<Uuid, (DateTime<Utc>, bool)>,
    /// Locations of past successes (blind indexes).
    pub locations: BTreeSet<String>,
    /// Order the locations were added, to forget the oldest.
    pub location_order: Vec<String>,
}

impl Aggregate for Lockout {
    const STREAM_TYPE: &'static str = "lockout";
    // Every password attempt adds two events: a user signing in daily for years would
    // otherwise be replayed whole at each attempt.
    const SNAPSHOT_EVERY: Option<u64> = Some(32);
    type Event = LockoutEvent;

    fn apply(&mut self, event: LockoutEvent, envelope: &RecordedEvent) {
        match event {
            LockoutEvent::AttemptStarted { attempt, familiar } => {
                self.in_flight
                    .insert(attempt, (envelope.recorded_at, familiar));
            }
            LockoutEvent::AttemptFailed {
                attempt,
                familiar,
                locked_until,
            } => {
                self.in_flight.remove(&attempt);
                let counter = self.counter_mut(familiar);
                counter.failures += 1;
                if locked_until.is_some() {
                    counter.locked_until = locked_until;
                    counter.locks += 1;
                    counter.failures = 0;
                }
            }
            LockoutEvent::AttemptSucceeded {
                attempt,
                familiar,
                location,
            } => {
                self.in_flight.remove(&attempt);
                let counter = self.counter_mut(familiar);
                counter.failures = 0;
                counter.locks = 0;
                if let Some(location) = location
                    && self.locations.insert(location.clone())
                {
                    self.location_order.push(location);
                    if self.location_order.len() > MAX_FAMILIAR {
                        let oldest = self.location_order.remove(0);
                        self.locations.remove(&oldest);
                    }
                }
            }
            LockoutEvent::LockCleared => {
                self.familiar = Counter::default();
                self.unfamiliar = Counter::default();
                self.in_flight.clear();
            }
        }
    }
}

/// Why an attempt may not be checked now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Locked {
    /// When to try again (`None`: when attempts in flight finish).
    pub until: Option<DateTime<Utc>>,
}

impl Lockout {
    fn counter_mut(&mut self, familiar: bool) -> &mut Counter {
        if familiar {
            &mut self.familiar
        } else {
            &mut self.unfamiliar
        }
    }

    /// The counter of a class.
    pub fn counter(&self, familiar: bool) -> &Counter {
        if familiar {
            &self.familiar
        } else {
            &self.unfamiliar
        }
    }

    /// Whether `location` succeeded before.
    pub fn is_familiar(&self, location: Option<&str>) -> bool {
        location.is_some_and(|l| self.locations.contains(l))
    }

    /// The state after events decided but not yet appended.
    pub fn after(&self, events: &[LockoutEvent], now: DateTime<Utc>) -> Lockout {
        let mut state = self.clone();
        for event in events {
            apply_local(&mut state, event, now);
        }
        state
    }

    /// The events that fail stale reservations (their processes died mid-check).
    fn fail_stale(&self, policy: &LockoutPolicy, now: DateTime<Utc>) -> Vec<LockoutEvent> {
        let mut state = self.clone();
        let mut events = Vec::new();
        let stale: Vec<(Uuid, bool)> = self
            .in_flight
            .iter()
            .filter(|(_, (started, _))| now - *started > STALE_ATTEMPT)
            .map(|(id, (_, familiar))| (*id, *familiar))
            .collect();
        for (attempt, familiar) in stale {
            let event = state.failure(attempt, familiar, policy, now);
            apply_local(&mut state, &event, now);
            events.push(event);
        }
        events
    }

    /// Reserves an attempt, or says how long the class is locked. Stale reservations are
    /// failed first.
    pub fn reserve(
        &self,
        attempt: Uuid,
        familiar: bool,
        policy: &LockoutPolicy,
        now: DateTime<Utc>,
    ) -> Result<Vec<LockoutEvent>, Locked> {
        let mut events = self.fail_stale(policy, now);
        let state = self.after(&events, now);
        let counter = state.counter(familiar);
        if let Some(until) = counter.locked_until
            && until > now
        {
            return Err(Locked { until: Some(until) });
        }
        let in_flight = state
            .in_flight
            .values()
            .filter(|(_, f)| *f == familiar)
            .count() as u32;
        if counter.failures + in_flight >= policy.threshold {
            return Err(Locked { until: None });
        }
        events.push(LockoutEvent::AttemptStarted { attempt, familiar });
        Ok(events)
    }

    /// The failure of a reserved attempt (with the lock it starts at the threshold).
    pub fn failure(
        &self,
        attempt: Uuid,
        familiar: bool,
        policy: &LockoutPolicy,
        now: DateTime<Utc>,
    ) -> LockoutEvent {
        let counter = self.counter(familiar);
        let locked_until = (counter.failures + 1 >= policy.threshold).then(|| {
            let growth = u64::from(policy.growth_factor.max(1)).saturating_pow(counter.locks);
            let seconds = u64::from(policy.first_lockout_seconds)
                .saturating_mul(growth)
                .min(u64::from(policy.max_lockout_seconds));
            now + Duration::seconds(seconds as i64)
        });
        LockoutEvent::AttemptFailed {
            attempt,
            familiar,
            locked_until,
        }
    }
}

/// Applies an event decided but not yet recorded (for deciding several in a row).
fn apply_local(state: &mut Lockout, event: &LockoutEvent, now: DateTime<Utc>) {
    let envelope = RecordedEvent::pending(Uuid::nil(), Lockout::stream(Uuid::nil()), now);
    state.apply(event.clone(), &envelope);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> LockoutPolicy {
        LockoutPolicy {
            threshold: 3,
            first_lockout_seconds: 60,
            growth_factor: 2,
            max_lockout_seconds: 300,
        }
    }

    fn run(state: &mut Lockout, events: &[LockoutEvent], now: DateTime<Utc>) {
        for event in events {
            apply_local(state, event, now);
        }
    }

    #[test]
    fn reservations_in_flight_count_toward_the_threshold() {
        let now = Utc::now();
        let mut state = Lockout::default();
        for _ in 0..3 {
            let events = state
                .reserve(Uuid::now_v7(), false, &policy(), now)
                .unwrap_or_default();
            assert_eq!(events.len(), 1);
            run(&mut state, &events, now);
        }
        assert_eq!(
            state.reserve(Uuid::now_v7(), false, &policy(), now),
            Err(Locked { until: None })
        );
        // The familiar class is counted apart.
        assert!(state.reserve(Uuid::now_v7(), true, &policy(), now).is_ok());
    }

    #[test]
    fn a_snapshot_reads_back_as_the_same_state() -> Result<(), serde_json::Error> {
        // Lockout streams keep snapshots: the state must survive its JSON form whole,
        // attempts in flight (keyed by flow) and familiar locations included.
        let now = Utc::now();
        let mut state = Lockout::default();
        let won = Uuid::now_v7();
        let lost = Uuid::now_v7();
        let pending = Uuid::now_v7();
        for (attempt, familiar) in [(won, true), (lost, false), (pending, false)] {
            let events = state
                .reserve(attempt, familiar, &policy(), now)
                .unwrap_or_default();
            run(&mut state, &events, now);
        }
        let failed = state.failure(lost, false, &policy(), now);
        run(
            &mut state,
            &[
                failed,
                LockoutEvent::AttemptSucceeded {
                    attempt: won,
                    familiar: true,
                    location: Some("blind-index".into()),
                },
            ],
            now,
        );
        let read: Lockout = serde_json::from_value(serde_json::to_value(&state)?)?;
        assert_eq!(format!("{read:?}"), format!("{state:?}"));
        assert!(read.in_flight.contains_key(&pending));
        assert_eq!(read.unfamiliar.failures, 1);
        assert!(read.is_familiar(Some("blind-index")));
        Ok(())
    }

    #[test]
    fn the_lock_grows_and_caps() {
        let mut now = Utc::now();
        let mut state = Lockout::default();
        let mut lengths = Vec::new();
        for _ in 0..4 {
            for _ in 0..3 {
                let attempt = Uuid::now_v7();
                let events = state
                    .reserve(attempt, false, &policy(), now)
                    .unwrap_or_default();
                run(&mut state, &events, now);
                let failed = state.failure(attempt, false, &policy(), now);
                run(&mut state, &[failed], now);
            }
            let until = state.unfamiliar.locked_until.unwrap_or(now);
            lengths.push((until - now).num_seconds());
            assert!(
                state
                    .reserve(Uuid::now_v7(), false, &policy(), now)
                    .is_err()
            );
            now = until + Duration::seconds(1);
        }
        assert_eq!(lengths, vec![60, 120, 240, 300]);
    }

    #[test]
    fn a_stale_reservation_counts_as_a_failure() {
        let now = Utc::now();
        let mut state = Lockout::default();
        let events = state
            .reserve(Uuid::now_v7(), false, &policy(), now)
            .unwrap_or_default();
        run(&mut state, &events, now);
        let later = now + STALE_ATTEMPT + Duration::seconds(1);
        let events = state
            .reserve(Uuid::now_v7(), false, &policy(), later)
            .unwrap_or_default();
        assert!(matches!(events[0], LockoutEvent::AttemptFailed { .. }));
        assert!(matches!(events[1], LockoutEvent::AttemptStarted { .. }));
    }
}
