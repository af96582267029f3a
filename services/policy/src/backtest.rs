//! Backtest: a draft policy against the sign-ins the log recorded.
//!
//! Reads the tenant's `signin` streams straight from the log (not a projection): each flow
//! that reached the policy step (its primary method succeeded) in the time range is rebuilt
//! as the context policies saw — user, app, client IP and user agent of the step, the country
//! recorded then, sign-in risk, primary method, and whether the user's phone was verified *at
//! that position* — and
//! the draft is evaluated against it as if enabled. Groups and named locations are today's:
//! the draft is judged as it would be saved now.
//!
//! The flow events are read by their public schema (type names and fields of the log), as any
//! downstream consumer does, so this crate needs no dependency on the sign-in service.

use crate::engine::{Context, Outcome, PolicySet, PrimaryKind};
use crate::model::{Control, Controls, Platform, RiskLevel};
use crate::view::TenantPolicies;
use chrono::{DateTime, Utc};
use gatehouse_core::ApiError;
use gatehouse_directory::user::User;
use gatehouse_events::store::StreamBounds;
use gatehouse_events::{EventFilter, EventStore, Loaded, Position};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use uuid::Uuid;

/// Stream type of sign-in flows.
const SIGNIN: &str = "signin";
const PAGE: usize = 1000;

/// Counts for one app, one user, or all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// Sign-ins evaluated.
    pub evaluated: u32,
    /// Would have been blocked.
    pub blocked: u32,
    /// Would have been asked for a control not yet met.
    pub challenged: u32,
    /// Some of the affected sign-ins.
    pub samples: Vec<Uuid>,
}

/// What a draft would have done.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Every evaluated sign-in.
    pub total: Counts,
    /// Challenged sign-ins that had completed without any second factor.
    pub completed_without_mfa: u32,
    /// Per app, by app id.
    pub by_app: Vec<(Uuid, Counts)>,
    /// Per user, by user id.
    pub by_user: Vec<(Uuid, Counts)>,
    /// The log position read up to.
    pub through: Position,
}

#[derive(Deserialize)]
struct Started {
    application_id: Uuid,
    user_id: Option<Uuid>,
    method: String,
}

/// `FederationSucceeded` / `LinkRequired`: who the provider vouched for; for a link, how
/// the person proves the account (`password`, `email_otp`), which is what policies judge.
#[derive(Deserialize)]
struct Federated {
    provider_id: Uuid,
    kind: String,
    user_id: Uuid,
    #[serde(default)]
    proof: Option<String>,
}

#[derive(Deserialize)]
struct Risk {
    level: String,
}

#[derive(Deserialize)]
struct Evaluated {
    #[serde(default)]
    country: Option<String>,
}

#[derive(Default)]
struct Flow {
    app: Uuid,
    user: Option<Uuid>,
    method: String,
    /// The identity provider (id, kind) of a federated sign-in.
    provider: Option<(String, String)>,
    verified_at: Option<Position>,
    ip: Option<IpAddr>,
    user_agent: String,
    risk: RiskLevel,
    country: Option<[u8; 2]>,
    mfa: bool,
    completed: bool,
}

/// Evaluates `set` (the draft alone) against the flows started in `[from, to)`.
pub async fn run(
    store: &dyn EventStore,
    tenant_id: Uuid,
    set: &PolicySet,
    tenant: &TenantPolicies,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    samples: usize,
) -> Result<Report, ApiError> {
    let filter = EventFilter {
        tenant_id: Some(tenant_id),
        stream_types: vec![SIGNIN.into()],
        event_types: vec![
            "SignInStarted".into(),
            "PrimaryVerified".into(),
            "FederationSucceeded".into(),
            "LinkRequired".into(),
            "RiskAssessed".into(),
            "PolicyEvaluated".into(),
            "MfaVerified".into(),
            "SignInCompleted".into(),
        ],
    };
    let mut flows: BTreeMap<Uuid, Flow> = BTreeMap::new();
    let mut cursor = 0;
    loop {
        let batch = store.read_all(cursor, &filter, PAGE).await?;
        for event in &batch.events {
            let id = event.stream.id;
            let payload = event.payload.get();
            if event.event_type == "SignInStarted" {
                if event.recorded_at < from || event.recorded_at >= to {
                    continue;
                }
                let started: Started = serde_json::from_str(payload)
                    .map_err(|e| ApiError::Internal(format!("sign-in {id}: {e}")))?;
                flows.insert(
                    id,
                    Flow {
                        app: started.application_id,
                        user: started.user_id,
                        method: started.method,
                        ..Flow::default()
                    },
                );
                continue;
            }
            let Some(flow) = flows.get_mut(&id) else {
                continue;
            };
            match event.event_type.as_str() {
                "PrimaryVerified" => {
                    flow.verified_at = Some(event.position);
                    let context = event.context.clone().unwrap_or_default();
                    flow.ip = context.ip.and_then(|ip| ip.parse().ok());
                    flow.user_agent = context.user_agent.unwrap_or_default();
                }
                "FederationSucceeded" | "LinkRequired" => {
                    if let Ok(federated) = serde_json::from_str::<Federated>(payload) {
                        flow.user = Some(federated.user_id);
                        match federated.proof {
                            Some(proof) => flow.method = proof,
                            None => {
                                flow.provider =
                                    Some((federated.provider_id.to_string(), federated.kind));
                            }
                        }
                    }
                }
                "RiskAssessed" => {
                    if let Ok(risk) = serde_json::from_str::<Risk>(payload) {
                        flow.risk = RiskLevel::parse(&risk.level).unwrap_or_default();
                    }
                }
                "PolicyEvaluated" => {
                    if let Ok(evaluated) = serde_json::from_str::<Evaluated>(payload) {
                        flow.country = evaluated
                            .country
                            .and_then(|c| <[u8; 2]>::try_from(c.as_bytes()).ok());
                    }
                }
                "MfaVerified" => flow.mfa = true,
                "SignInCompleted" => flow.completed = true,
                _ => {}
            }
        }
        cursor = batch.next;
        if batch.events.len() < PAGE {
            break;
        }
    }

    let mut report = Report {
        through: cursor,
        ..Report::default()
    };
    let mut by_app: HashMap<Uuid, Counts> = HashMap::new();
    let mut by_user: HashMap<Uuid, Counts> = HashMap::new();
    for (id, flow) in &flows {
        let (Some(user_id), Some(position)) = (flow.user, flow.verified_at) else {
            continue;
        };
        let bounds = StreamBounds {
            after_version: 0,
            up_to_position: Some(position),
            up_to_time: None,
        };
        let user = Loaded::<User>::load_at(store, user_id, bounds).await?;
        let satisfied = if user.state.phone_verified {
            Controls::of(&[Control::PhoneVerified])
        } else {
            Controls::NONE
        };
        let primary = match (&flow.provider, flow.method.as_str()) {
            (Some((id, kind)), _) => PrimaryKind::Federated { id, kind },
            (None, "email_otp") => PrimaryKind::EmailOtp,
            _ => PrimaryKind::Password,
        };
        let context = Context {
            user_id,
            groups: tenant.groups_of(user_id),
            app_id: flow.app,
            ip: flow.ip,
            country: flow.country,
            platform: Platform::of_user_agent(&flow.user_agent),
            sign_in_risk: flow.risk,
            user_risk: RiskLevel::None,
            primary,
            satisfied,
        };
        let decision = set.evaluate(&context);
        let (blocked, challenged) = match decision.results.first().map(|r| r.outcome) {
            Some(Outcome::Block) => (true, false),
            Some(Outcome::Grant(controls)) => (false, !controls.is_empty()),
            _ => (false, false),
        };
        if challenged && flow.completed && !flow.mfa {
            report.completed_without_mfa += 1;
        }
        for counts in [
            &mut report.total,
            by_app.entry(flow.app).or_default(),
            by_user.entry(user_id).or_default(),
        ] {
            counts.evaluated += 1;
            counts.blocked += u32::from(blocked);
            counts.challenged += u32::from(challenged);
            if (blocked || challenged) && counts.samples.len() < samples {
                counts.samples.push(*id);
            }
        }
    }
    let sorted = |map: HashMap<Uuid, Counts>| {
        let mut rows: Vec<(Uuid, Counts)> = map.into_iter().collect();
        rows.sort_by(|a, b| {
            (b.1.blocked + b.1.challenged)
                .cmp(&(a.1.blocked + a.1.challenged))
                .then(a.0.cmp(&b.0))
        });
        rows
    };
    report.by_app = sorted(by_app);
    report.by_user = sorted(by_user);
    Ok(report)
}
