//! Identity Protection's read side, in memory, following the log: every tenant's detections,
//! its users' risk (the UserRisk aggregates, folded by their own `apply`) and its risky
//! sign-ins. The reports of [`crate::service`] and the sign-in flow's user-risk check read it.

use crate::detector::{Detection, DetectionEvent, Evidence};
use crate::realtime::Properties;
use crate::user_risk::{UserRisk, UserRiskEvent};
use chrono::{DateTime, Duration, Utc};
use gatehouse_events::view::LiveView;
use gatehouse_events::{
    Aggregate, DomainEvent, EventFilter, EventStore, Position, RecordedEvent, StoreError,
};
use gatehouse_policy::model::RiskLevel;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use uuid::Uuid;

/// A detection as reports, exports and NATS subscribers see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DetectionRecord {
    /// The detection's stream id.
    pub id: Uuid,
    /// The tenant.
    pub tenant_id: Uuid,
    /// Its kind.
    pub kind: String,
    /// Its level.
    pub level: RiskLevel,
    /// `realtime` or `offline`.
    pub timing: String,
    /// The account, when known.
    pub user_id: Option<Uuid>,
    /// The sign-in, for sign-in detections.
    pub sign_in_id: Option<Uuid>,
    /// The address or network.
    pub source: Option<String>,
    /// What was seen.
    pub description: String,
    /// The events that caused it.
    pub evidence: Vec<Evidence>,
    /// When it was recorded.
    pub detected_at: DateTime<Utc>,
}

impl DetectionRecord {
    /// The record of `event` in detection stream `id`.
    pub fn new(id: Uuid, tenant_id: Uuid, event: DetectionEvent, at: DateTime<Utc>) -> Self {
        let DetectionEvent::RiskDetected {
            kind,
            level,
            timing,
            user_id,
            sign_in_id,
            source,
            description,
            evidence,
        } = event;
        DetectionRecord {
            id,
            tenant_id,
            kind,
            level,
            timing,
            user_id,
            sign_in_id,
            source,
            description,
            evidence,
            detected_at: at,
        }
    }
}

/// A sign-in whose real-time risk was above none.
#[derive(Debug, Clone, PartialEq)]
pub struct RiskySignIn {
    /// The flow.
    pub id: Uuid,
    /// The account.
    pub user_id: Option<Uuid>,
    /// The sign-in risk.
    pub level: RiskLevel,
    /// The kinds found.
    pub detections: Vec<String>,
    /// The client address.
    pub ip: Option<String>,
    /// Its country.
    pub country: Option<String>,
    /// When it was assessed.
    pub at: DateTime<Utc>,
    /// A second factor passed afterwards.
    pub remediated: bool,
}

/// One tenant's risk.
#[derive(Default)]
pub struct TenantRisk {
    /// Detections by the position of their event.
    pub detections: BTreeMap<Position, DetectionRecord>,
    /// Users' risk.
    pub users: HashMap<Uuid, UserRisk>,
    /// Risky sign-ins by the position of their assessment.
    pub sign_ins: BTreeMap<Position, RiskySignIn>,
    sign_in_positions: HashMap<Uuid, Position>,
}

type State = HashMap<Uuid, TenantRisk>;

#[derive(Deserialize)]
struct Assessed {
    level: String,
    #[serde(default)]
    detections: Vec<crate::Detection>,
    user_id: Option<Uuid>,
    properties: Option<Properties>,
}

fn apply(state: &mut State, event: &RecordedEvent) {
    let tenant = state.entry(event.tenant_id).or_default();
    match event.stream.kind.as_str() {
        kind if kind == Detection::STREAM_TYPE => {
            if let Ok(detection) = DetectionEvent::decode(event) {
                tenant.detections.insert(
                    event.position,
                    DetectionRecord::new(
                        event.stream.id,
                        event.tenant_id,
                        detection,
                        event.recorded_at,
                    ),
                );
            }
        }
        kind if kind == UserRisk::STREAM_TYPE => {
            if let Ok(decoded) = UserRiskEvent::decode(event) {
                tenant
                    .users
                    .entry(event.stream.id)
                    .or_default()
                    .apply(decoded, event);
            }
        }
        _ => match event.event_type.as_str() {
            "RiskAssessed" => {
                let Ok(assessed) = event.payload_as::<Assessed>() else {
                    return;
                };
                let level = RiskLevel::parse(&assessed.level).unwrap_or_default();
                if level == RiskLevel::None {
                    return;
                }
                tenant
                    .sign_in_positions
                    .insert(event.stream.id, event.position);
                tenant.sign_ins.insert(
                    event.position,
                    RiskySignIn {
                        id: event.stream.id,
                        user_id: assessed.user_id,
                        level,
                        detections: assessed.detections.into_iter().map(|d| d.kind).collect(),
                        ip: event.context.as_ref().and_then(|c| c.ip.clone()),
                        country: assessed.properties.and_then(|p| p.location.country),
                        at: event.recorded_at,
                        remediated: false,
                    },
                );
            }
            "SignInRiskRemediated" => {
                if let Some(position) = tenant.sign_in_positions.get(&event.stream.id)
                    && let Some(sign_in) = tenant.sign_ins.get_mut(position)
                {
                    sign_in.remediated = true;
                }
            }
            _ => {}
        },
    }
}

/// Every tenant's risk, kept current.
pub struct RiskView {
    view: LiveView<State>,
}

impl RiskView {
    /// Catches up with the log and follows it.
    pub async fn start(store: Arc<dyn EventStore>) -> Result<Self, StoreError> {
        let filter = EventFilter {
            stream_types: vec![
                Detection::STREAM_TYPE.into(),
                UserRisk::STREAM_TYPE.into(),
                "signin".into(),
            ],
            event_types: [
                "RiskDetected",
                "RiskRaised",
                "SignInRemediated",
                "RiskRemediated",
                "CompromiseConfirmed",
                "ConfirmedSafe",
                "RiskDismissed",
                "RiskAssessed",
                "SignInRiskRemediated",
            ]
            .map(String::from)
            .to_vec(),
            ..EventFilter::default()
        };
        let view = LiveView::start(store, filter, State::new(), apply).await?;
        Ok(RiskView { view })
    }

    /// Reads one tenant's risk (an empty one when it has none).
    pub fn read<R>(&self, tenant_id: Uuid, read: impl FnOnce(&TenantRisk) -> R) -> R {
        self.view.read(|state| match state.get(&tenant_id) {
            Some(tenant) => read(tenant),
            None => read(&TenantRisk::default()),
        })
    }

    /// A user's risk level now, and whether an analyst's confirmed compromise still asks
    /// for a password change.
    pub fn user_risk(
        &self,
        tenant_id: Uuid,
        user_id: Uuid,
        low_age: Duration,
    ) -> (RiskLevel, bool) {
        self.read(tenant_id, |tenant| {
            tenant
                .users
                .get(&user_id)
                .map_or((RiskLevel::None, false), |risk| {
                    (risk.level(Utc::now(), low_age), risk.must_change_password())
                })
        })
    }

    /// An analyst confirmed the user compromised and no secure password change followed.
    pub fn must_change_password(&self, tenant_id: Uuid, user_id: Uuid) -> bool {
        self.read(tenant_id, |tenant| {
            tenant
                .users
                .get(&user_id)
                .is_some_and(UserRisk::must_change_password)
        })
    }

    /// Waits until the view includes `position` (a write just made); false after 5 seconds.
    pub async fn wait_for(&self, position: Position) -> bool {
        self.view
            .wait_for(position, std::time::Duration::from_secs(5))
            .await
    }
}
