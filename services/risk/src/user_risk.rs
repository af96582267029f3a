//! The UserRisk aggregate (`userrisk/<user id>`): how much a user is at risk, and why.
//!
//! Its level comes from the user's open detections (the highest one; a low one stops
//! counting after the tenant's `low_risk_age_days`), its state from what happened last:
//!
//! ```text
//!   (none) ──RiskRaised──▶ at_risk ──SignInRemediated (its last open sign-in detection)──▶ remediated
//!                             │    ──RiskRemediated (secure password change)──────────▶ remediated
//!                             │    ──RiskDismissed (analyst)───────────────────────────▶ dismissed
//!                             │    ──ConfirmedSafe (analyst)───────────────────────────▶ confirmed_safe
//!   any ──CompromiseConfirmed (analyst)──▶ confirmed_compromised (high until a secure password change)
//! ```
//!
//! Detections are written by the detector (with `RiskRaised`, in the same append as the
//! detection's own stream, so a replayed detector raises nothing twice); a sign-in's
//! remediation is written by the flow when its second factor passes — possibly before the
//! detector has recorded that sign-in's detections, so the aggregate remembers remediated
//! sign-ins and a late detection of one of them is born closed.

use chrono::{DateTime, Duration, Utc};
use gatehouse_events::{Aggregate, DomainEvent, RecordedEvent};
use gatehouse_policy::model::RiskLevel;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use uuid::Uuid;

/// The detection kind of an analyst's ConfirmCompromised.
pub const ADMIN_CONFIRMED: &str = "admin_confirmed_compromised";

/// Events of a userrisk stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum UserRiskEvent {
    /// A detection names the user.
    RiskRaised {
        /// The detection (`detection/<id>`).
        detection_id: Uuid,
        /// Its kind.
        kind: String,
        /// Its level.
        level: RiskLevel,
        /// The sign-in it was found in, when passing MFA there remediates it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sign_in_id: Option<Uuid>,
        /// When the event that caused it was recorded (a detector that lags behind, or
        /// replays old history, raises nothing that a later remediation already closed).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        caused_at: Option<DateTime<Utc>>,
    },
    /// A second factor was passed in this sign-in after its risk was found.
    SignInRemediated {
        /// The sign-in.
        sign_in_id: Uuid,
    },
    /// The user proved themselves and changed their password: every open detection closes.
    RiskRemediated {
        /// `secure_password_change`.
        reason: String,
    },
    /// An analyst confirmed the account compromised (sessions revoked, password reset forced).
    CompromiseConfirmed,
    /// An analyst judged the open detections false positives.
    ConfirmedSafe,
    /// An analyst dismissed the user's risk.
    RiskDismissed,
}

impl DomainEvent for UserRiskEvent {}

/// A user's risk state.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum RiskState {
    /// Nothing was ever found.
    #[default]
    None,
    /// Open detections.
    AtRisk,
    /// An analyst said so.
    ConfirmedCompromised,
    /// A second factor or a secure password change closed the risk.
    Remediated,
    /// An analyst dismissed it.
    Dismissed,
    /// An analyst judged it a false positive.
    ConfirmedSafe,
}

impl RiskState {
    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            RiskState::None => "none",
            RiskState::AtRisk => "at_risk",
            RiskState::ConfirmedCompromised => "confirmed_compromised",
            RiskState::Remediated => "remediated",
            RiskState::Dismissed => "dismissed",
            RiskState::ConfirmedSafe => "confirmed_safe",
        }
    }

    /// Parses a name.
    pub fn parse(text: &str) -> Option<Self> {
        [
            RiskState::None,
            RiskState::AtRisk,
            RiskState::ConfirmedCompromised,
            RiskState::Remediated,
            RiskState::Dismissed,
            RiskState::ConfirmedSafe,
        ]
        .into_iter()
        .find(|state| state.as_str() == text)
    }
}

/// An open detection of the user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpenDetection {
    /// Its kind.
    pub kind: String,
    /// Its level.
    pub level: RiskLevel,
    /// When it was raised.
    pub at: DateTime<Utc>,
    /// Its sign-in, for real-time ones.
    pub sign_in_id: Option<Uuid>,
}

/// The UserRisk aggregate.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UserRisk {
    /// The tenant (set by the first event).
    pub tenant_id: Option<Uuid>,
    /// Open detections by id.
    pub open: BTreeMap<Uuid, OpenDetection>,
    /// Sign-ins whose risk a second factor remediated.
    remediated_sign_ins: BTreeSet<Uuid>,
    /// When the risk was last closed (remediated, dismissed, confirmed safe): detections of
    /// what happened before are not raised again.
    closed_at: Option<DateTime<Utc>>,
    /// The state.
    pub state: RiskState,
    /// When it last changed.
    pub updated_at: Option<DateTime<Utc>>,
}

impl UserRisk {
    /// The risk level now: confirmed compromised is high; otherwise the highest open
    /// detection, low ones counting for `low_age`.
    pub fn level(&self, now: DateTime<Utc>, low_age: Duration) -> RiskLevel {
        if self.state == RiskState::ConfirmedCompromised {
            return RiskLevel::High;
        }
        self.open
            .values()
            .filter(|d| d.level != RiskLevel::Low || now - d.at < low_age)
            .map(|d| d.level)
            .max()
            .unwrap_or(RiskLevel::None)
    }

    /// An analyst confirmed the account compromised and no secure password change followed.
    pub fn must_change_password(&self) -> bool {
        self.state == RiskState::ConfirmedCompromised
    }

    fn closed(&mut self, state: RiskState, at: DateTime<Utc>) {
        self.open.clear();
        self.state = state;
        self.closed_at = Some(at);
    }
}

impl Aggregate for UserRisk {
    const STREAM_TYPE: &'static str = "userrisk";
    type Event = UserRiskEvent;

    fn apply(&mut self, event: UserRiskEvent, envelope: &RecordedEvent) {
        self.tenant_id.get_or_insert(envelope.tenant_id);
        self.updated_at = Some(envelope.recorded_at);
        match event {
            UserRiskEvent::RiskRaised {
                detection_id,
                kind,
                level,
                sign_in_id,
                caused_at,
            } => {
                let caused_at = caused_at.unwrap_or(envelope.recorded_at);
                if self.closed_at.is_some_and(|closed| caused_at <= closed) {
                    return;
                }
                // The analyst's confirmation is the state itself (high until a secure
                // password change); its detection, recorded after it, opens nothing more.
                if kind == ADMIN_CONFIRMED {
                    return;
                }
                if sign_in_id.is_some_and(|id| self.remediated_sign_ins.contains(&id)) {
                    // Its sign-in was remediated before the detection was recorded.
                    if self.state == RiskState::None {
                        self.state = RiskState::Remediated;
                    }
                    return;
                }
                self.open.insert(
                    detection_id,
                    OpenDetection {
                        kind,
                        level,
                        at: caused_at,
                        sign_in_id,
                    },
                );
                if self.state != RiskState::ConfirmedCompromised {
                    self.state = RiskState::AtRisk;
                }
            }
            UserRiskEvent::SignInRemediated { sign_in_id } => {
                self.remediated_sign_ins.insert(sign_in_id);
                let before = self.open.len();
                self.open.retain(|_, d| d.sign_in_id != Some(sign_in_id));
                if before > 0 && self.open.is_empty() && self.state == RiskState::AtRisk {
                    self.state = RiskState::Remediated;
                }
            }
            UserRiskEvent::RiskRemediated { .. } => {
                self.closed(RiskState::Remediated, envelope.recorded_at)
            }
            UserRiskEvent::CompromiseConfirmed => self.state = RiskState::ConfirmedCompromised,
            UserRiskEvent::ConfirmedSafe => {
                self.closed(RiskState::ConfirmedSafe, envelope.recorded_at)
            }
            UserRiskEvent::RiskDismissed => self.closed(RiskState::Dismissed, envelope.recorded_at),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gatehouse_events::StreamId;

    fn fold(events: Vec<(UserRiskEvent, i64)>) -> UserRisk {
        let start = DateTime::<Utc>::from_timestamp(1_800_000_000, 0).unwrap_or_default();
        let mut risk = UserRisk::default();
        for (event, days) in events {
            let envelope = RecordedEvent::pending(
                Uuid::nil(),
                StreamId::new("userrisk", Uuid::nil()),
                start + Duration::days(days),
            );
            risk.apply(event, &envelope);
        }
        risk
    }

    fn raised(id: u128, level: RiskLevel, sign_in: Option<u128>) -> UserRiskEvent {
        UserRiskEvent::RiskRaised {
            detection_id: Uuid::from_u128(id),
            kind: "k".into(),
            level,
            sign_in_id: sign_in.map(Uuid::from_u128),
            caused_at: None,
        }
    }

    #[test]
    fn the_level_is_the_highest_open_detection_and_low_ones_age_out() {
        let start = DateTime::<Utc>::from_timestamp(1_800_000_000, 0).unwrap_or_default();
        let risk = fold(vec![(raised(1, RiskLevel::Low, None), 0)]);
        assert_eq!(risk.state, RiskState::AtRisk);
        let age = Duration::days(180);
        assert_eq!(risk.level(start + Duration::days(10), age), RiskLevel::Low);
        assert_eq!(
            risk.level(start + Duration::days(181), age),
            RiskLevel::None
        );
        let risk = fold(vec![
            (raised(1, RiskLevel::Low, None), 0),
            (raised(2, RiskLevel::Medium, None), 1),
        ]);
        assert_eq!(
            risk.level(start + Duration::days(400), age),
            RiskLevel::Medium
        );
    }

    #[test]
    fn a_remediated_sign_in_closes_its_detections_even_when_they_arrive_late() {
        let now = DateTime::<Utc>::from_timestamp(1_800_000_000, 0).unwrap_or_default();
        let age = Duration::days(180);
        let risk = fold(vec![
            (raised(1, RiskLevel::Medium, Some(9)), 0),
            (
                UserRiskEvent::SignInRemediated {
                    sign_in_id: Uuid::from_u128(9),
                },
                0,
            ),
        ]);
        assert_eq!(risk.state, RiskState::Remediated);
        assert_eq!(risk.level(now, age), RiskLevel::None);
        let late = fold(vec![
            (
                UserRiskEvent::SignInRemediated {
                    sign_in_id: Uuid::from_u128(9),
                },
                0,
            ),
            (raised(1, RiskLevel::Medium, Some(9)), 0),
        ]);
        assert_eq!(late.level(now, age), RiskLevel::None);
        assert_eq!(late.state, RiskState::Remediated);
    }

    #[test]
    fn analysts_and_password_changes_set_the_state() {
        let now = DateTime::<Utc>::from_timestamp(1_800_000_000, 0).unwrap_or_default();
        let age = Duration::days(180);
        let risk = fold(vec![(UserRiskEvent::CompromiseConfirmed, 0)]);
        assert_eq!(risk.level(now, age), RiskLevel::High);
        assert!(risk.must_change_password());
        let risk = fold(vec![
            (UserRiskEvent::CompromiseConfirmed, 0),
            (
                UserRiskEvent::RiskRemediated {
                    reason: "secure_password_change".into(),
                },
                0,
            ),
        ]);
        assert_eq!(risk.state, RiskState::Remediated);
        assert_eq!(risk.level(now, age), RiskLevel::None);
        let risk = fold(vec![
            (raised(1, RiskLevel::High, None), 0),
            (UserRiskEvent::RiskDismissed, 0),
        ]);
        assert_eq!(risk.state, RiskState::Dismissed);
        assert_eq!(risk.level(now, age), RiskLevel::None);
    }

    #[test]
    fn a_detection_of_something_before_the_last_remediation_is_not_raised_again() {
        let start = DateTime::<Utc>::from_timestamp(1_800_000_000, 0).unwrap_or_default();
        let late = UserRiskEvent::RiskRaised {
            detection_id: Uuid::from_u128(5),
            kind: "atypical_travel".into(),
            level: RiskLevel::Medium,
            sign_in_id: None,
            caused_at: Some(start),
        };
        let risk = fold(vec![
            (
                UserRiskEvent::RiskRemediated {
                    reason: "secure_password_change".into(),
                },
                0,
            ),
            (late, 1),
        ]);
        assert_eq!(risk.state, RiskState::Remediated);
        assert!(risk.open.is_empty());
    }
}
