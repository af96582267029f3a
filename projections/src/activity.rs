//! Activity insights (SPEC §7): the sign-in log and the activity counters, one projection.
//!
//! Tables (logical names):
//!
//! - `signins`: one row per sign-in flow: tenant, app, start, user, IP, country, browser, OS,
//!   primary method (`password`, `email_otp`, `federated:<kind>`), MFA method, the Conditional
//!   Access policies that applied, risk level, outcome (`pending`, `success`, `failure`,
//!   `blocked`, `expired`, `cancelled`), reason, end.
//! - `activity`: counters per tenant, app, hour (UTC, microseconds), metric and dimension:
//!   `attempts` (flows started), `successes`, `failures` by reason (each refused password or
//!   code, and each flow that failed), `blocks` by policy, `signups` (self-service and
//!   federated), `mfa_challenges` and `mfa_completions` by method, `signins_by_method`,
//!   `signins_by_country`, `signins_by_os`, `signins_by_browser` (successes), and
//!   `risk_detections` by kind (app empty). Days and months are sums of hours.
//! - `active_users`: one row per tenant, app, day and user who completed a sign-in: daily and
//!   monthly active users are exact `COUNT(DISTINCT user_id)` over it.
//!
//! A flow's later events do not repeat its app or user, so the projection remembers the flows
//! still open (restored from `signins` rows still `pending` after a restart).

use crate::runtime::{Key, Poison, SqlProjection, Writes};
use gatehouse_events::readmodel::SqlValue;
use gatehouse_events::{EventFilter, RecordedEvent};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use uuid::Uuid;

/// The projection's name.
pub const NAME: &str = "activity";
const HOUR: i64 = 3_600_000_000;
const DAY: i64 = 24 * HOUR;

const TABLES: &[(&str, &str)] = &[
    (
        "signins",
        "CREATE TABLE IF NOT EXISTS {t} (
            flow_id TEXT PRIMARY KEY,
            tenant_id TEXT NOT NULL DEFAULT '',
            application_id TEXT NOT NULL DEFAULT '',
            started_at BIGINT NOT NULL DEFAULT 0,
            user_id TEXT NOT NULL DEFAULT '',
            ip TEXT NOT NULL DEFAULT '',
            country TEXT NOT NULL DEFAULT '',
            browser TEXT NOT NULL DEFAULT '',
            os TEXT NOT NULL DEFAULT '',
            primary_method TEXT NOT NULL DEFAULT '',
            mfa_method TEXT NOT NULL DEFAULT '',
            policies TEXT NOT NULL DEFAULT '',
            risk_level TEXT NOT NULL DEFAULT '',
            outcome TEXT NOT NULL DEFAULT 'pending',
            reason TEXT NOT NULL DEFAULT '',
            ended_at BIGINT NOT NULL DEFAULT 0,
            blocked_by TEXT NOT NULL DEFAULT ''
        );
        CREATE INDEX IF NOT EXISTS {t}_time ON {t} (tenant_id, started_at)",
    ),
    (
        "activity",
        "CREATE TABLE IF NOT EXISTS {t} (
            tenant_id TEXT NOT NULL,
            application_id TEXT NOT NULL,
            hour BIGINT NOT NULL,
            metric TEXT NOT NULL,
            dimension TEXT NOT NULL,
            count BIGINT NOT NULL DEFAULT 0,
            PRIMARY KEY (tenant_id, hour, metric, dimension, application_id)
        )",
    ),
    (
        "active_users",
        "CREATE TABLE IF NOT EXISTS {t} (
            tenant_id TEXT NOT NULL,
            application_id TEXT NOT NULL,
            day BIGINT NOT NULL,
            user_id TEXT NOT NULL,
            PRIMARY KEY (tenant_id, day, application_id, user_id)
        )",
    ),
];

/// What the projection remembers of an open flow (every pending sign-in of every tenant is
/// here, so it is small: ids as UUIDs, the rest shared strings of few distinct values).
#[derive(Debug, Clone, Default)]
struct Flow {
    tenant_id: Uuid,
    application_id: Arc<str>,
    user_id: Option<Uuid>,
    method: Arc<str>,
    country: Arc<str>,
    browser: Arc<str>,
    os: Arc<str>,
    blocked_by: Arc<str>,
}

/// The activity projection.
#[derive(Debug, Default)]
pub struct Activity {
    flows: HashMap<Uuid, Flow>,
    /// One copy of each app id, method, country, browser, OS and policy id seen.
    strings: HashSet<Arc<str>>,
}

impl Activity {
    /// A fresh instance.
    pub fn boxed() -> Box<dyn SqlProjection> {
        Box::new(Activity::default())
    }
}

fn text(value: &Value, key: &str) -> String {
    value
        .get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn user_of(value: &str) -> Option<Uuid> {
    Uuid::try_parse(value).ok()
}

impl Activity {
    /// The shared copy of `value`.
    fn intern(&mut self, value: &str) -> Arc<str> {
        if let Some(shared) = self.strings.get(value) {
            return shared.clone();
        }
        let shared: Arc<str> = Arc::from(value);
        self.strings.insert(shared.clone());
        shared
    }

    fn count(writes: &mut Writes, flow: &Flow, at: i64, metric: &'static str, dimension: &str) {
        counter(
            writes,
            &flow.tenant_id.to_string(),
            &flow.application_id,
            at,
            metric,
            dimension,
        );
    }

    fn signin(&mut self, event: &RecordedEvent, payload: &Value, writes: &mut Writes) {
        let flow_id = event.stream.id;
        let id = flow_id.to_string();
        let at = event.recorded_at.timestamp_micros();
        let key: Key = vec![("flow_id", id.clone().into())];
        let set = |writes: &mut Writes, column: &'static str, value: SqlValue| {
            writes.set("signins", key.clone(), column, value);
        };
        match event.event_type.as_str() {
            "SignInStarted" => {
                let (application_id, user_id, method) = (
                    text(payload, "application_id"),
                    text(payload, "user_id"),
                    text(payload, "method"),
                );
                let flow = Flow {
                    tenant_id: event.tenant_id,
                    application_id: self.intern(&application_id),
                    user_id: user_of(&user_id),
                    method: self.intern(&method),
                    ..Flow::default()
                };
                set(writes, "tenant_id", event.tenant_id.to_string().into());
                set(writes, "application_id", application_id.into());
                set(writes, "started_at", at.into());
                set(writes, "user_id", user_id.into());
                set(writes, "primary_method", method.into());
                let ip = event.context.as_ref().and_then(|c| c.ip.clone());
                set(writes, "ip", ip.unwrap_or_default().into());
                Self::count(writes, &flow, at, "attempts", "");
                self.flows.insert(flow_id, flow);
            }
            "FederationSucceeded" => {
                let method = format!("federated:{}", text(payload, "kind"));
                let user = text(payload, "user_id");
                set(writes, "primary_method", method.clone().into());
                set(writes, "user_id", user.clone().into());
                let method = self.intern(&method);
                if let Some(flow) = self.flows.get_mut(&flow_id) {
                    flow.method = method;
                    flow.user_id = user_of(&user);
                }
            }
            "RiskAssessed" => {
                set(writes, "risk_level", text(payload, "level").into());
                let properties = payload.get("properties").cloned().unwrap_or(Value::Null);
                let location = properties.get("location").unwrap_or(&properties);
                let (country, browser, os) = (
                    text(location, "country"),
                    text(&properties, "browser"),
                    text(&properties, "os"),
                );
                set(writes, "country", country.clone().into());
                set(writes, "browser", browser.clone().into());
                set(writes, "os", os.clone().into());
                let user = text(payload, "user_id");
                if !user.is_empty() {
                    set(writes, "user_id", user.clone().into());
                }
                let shared = (
                    self.intern(&country),
                    self.intern(&browser),
                    self.intern(&os),
                );
                if let Some(flow) = self.flows.get_mut(&flow_id) {
                    (flow.country, flow.browser, flow.os) = shared;
                    if !user.is_empty() {
                        flow.user_id = user_of(&user);
                    }
                }
            }
            "PolicyEvaluated" => {
                let applied: Vec<String> = payload
                    .get("policies")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter(|p| {
                        !matches!(
                            p.get("result").and_then(Value::as_str),
                            Some("not_applied" | "notApplied" | "not_applicable")
                        )
                    })
                    .map(|p| text(p, "policy_id"))
                    .collect();
                set(writes, "policies", applied.join(",").into());
                let blocked_by = text(payload, "blocked_by");
                set(writes, "blocked_by", blocked_by.clone().into());
                let country = text(payload, "country");
                let shared = (self.intern(&blocked_by), self.intern(&country));
                if let Some(flow) = self.flows.get_mut(&flow_id) {
                    flow.blocked_by = shared.0;
                    if flow.country.is_empty() && !country.is_empty() {
                        flow.country = shared.1;
                        set(writes, "country", country.into());
                    }
                }
            }
            "MfaMethodSelected" => {
                if let Some(flow) = self.flows.get(&flow_id) {
                    Self::count(writes, flow, at, "mfa_challenges", &text(payload, "method"));
                }
            }
            "MfaVerified" => {
                let method = text(payload, "method");
                set(writes, "mfa_method", method.clone().into());
                if let Some(flow) = self.flows.get(&flow_id) {
                    Self::count(writes, flow, at, "mfa_completions", &method);
                }
            }
            "PasswordRejected" | "CodeRejected" | "FederationFailed" => {
                if let Some(flow) = self.flows.get(&flow_id) {
                    let reason = match event.event_type.as_str() {
                        "CodeRejected" => "wrong_code".to_string(),
                        _ => text(payload, "reason"),
                    };
                    Self::count(writes, flow, at, "failures", &reason);
                }
            }
            "SignInCompleted" => {
                set(writes, "outcome", "success".into());
                set(writes, "ended_at", at.into());
                if let Some(flow) = self.flows.remove(&flow_id) {
                    Self::count(writes, &flow, at, "successes", "");
                    Self::count(writes, &flow, at, "signins_by_method", &flow.method);
                    Self::count(writes, &flow, at, "signins_by_country", &flow.country);
                    Self::count(writes, &flow, at, "signins_by_os", &flow.os);
                    Self::count(writes, &flow, at, "signins_by_browser", &flow.browser);
                    if let Some(user_id) = flow.user_id {
                        writes.insert(
                            "active_users",
                            vec![
                                ("tenant_id", flow.tenant_id.to_string().into()),
                                ("day", (at - at.rem_euclid(DAY)).into()),
                                ("application_id", flow.application_id.to_string().into()),
                                ("user_id", user_id.to_string().into()),
                            ],
                        );
                    }
                }
            }
            "SignInFailed" => {
                let reason = text(payload, "reason");
                let blocked = reason == "blocked_by_policy";
                set(
                    writes,
                    "outcome",
                    if blocked { "blocked" } else { "failure" }.into(),
                );
                set(writes, "reason", reason.clone().into());
                set(writes, "ended_at", at.into());
                if let Some(flow) = self.flows.remove(&flow_id) {
                    Self::count(writes, &flow, at, "failures", &reason);
                    if blocked {
                        Self::count(writes, &flow, at, "blocks", &flow.blocked_by);
                    }
                }
            }
            "SignInExpired" | "SignInCancelled" => {
                let outcome = if event.event_type == "SignInExpired" {
                    "expired"
                } else {
                    "cancelled"
                };
                set(writes, "outcome", outcome.into());
                set(writes, "ended_at", at.into());
                self.flows.remove(&flow_id);
            }
            _ => {}
        }
    }
}

fn counter(
    writes: &mut Writes,
    tenant_id: &str,
    application_id: &str,
    at: i64,
    metric: &'static str,
    dimension: &str,
) {
    writes.add(
        "activity",
        vec![
            ("tenant_id", tenant_id.into()),
            ("hour", (at - at.rem_euclid(HOUR)).into()),
            ("metric", metric.into()),
            ("dimension", dimension.into()),
            ("application_id", application_id.into()),
        ],
        "count",
        1,
    );
}

impl SqlProjection for Activity {
    fn name(&self) -> &'static str {
        NAME
    }

    fn tables(&self) -> &'static [(&'static str, &'static str)] {
        TABLES
    }

    fn filter(&self) -> EventFilter {
        EventFilter {
            stream_types: vec!["signin".into(), "user".into(), "detection".into()],
            ..EventFilter::default()
        }
    }

    fn restore_query(&self) -> Option<&'static str> {
        Some(
            "SELECT flow_id, tenant_id, application_id, user_id, primary_method, country, \
             browser, os, blocked_by FROM {signins} WHERE outcome = 'pending'",
        )
    }

    fn restore(&mut self, rows: Vec<Vec<SqlValue>>) {
        for row in rows {
            let field = |i: usize| row.get(i).map(SqlValue::text).unwrap_or_default();
            let (Ok(flow_id), Ok(tenant_id)) =
                (Uuid::try_parse(&field(0)), Uuid::try_parse(&field(1)))
            else {
                continue;
            };
            let flow = Flow {
                tenant_id,
                application_id: self.intern(&field(2)),
                user_id: user_of(&field(3)),
                method: self.intern(&field(4)),
                country: self.intern(&field(5)),
                browser: self.intern(&field(6)),
                os: self.intern(&field(7)),
                blocked_by: self.intern(&field(8)),
            };
            self.flows.insert(flow_id, flow);
        }
    }

    fn apply(&mut self, events: &[RecordedEvent], writes: &mut Writes) -> Result<(), Poison> {
        for event in events {
            let payload: Value = event.payload_value().map_err(|e| Poison {
                position: event.position,
                reason: e.to_string(),
            })?;
            if !payload.is_object() {
                return Err(Poison {
                    position: event.position,
                    reason: format!("{} payload is not an object", event.event_type),
                });
            }
            let at = event.recorded_at.timestamp_micros();
            let tenant = event.tenant_id.to_string();
            match (event.stream.kind.as_str(), event.event_type.as_str()) {
                ("signin", _) => self.signin(event, &payload, writes),
                ("user", "UserSignedUp" | "UserSignedUpFederated") => {
                    counter(
                        writes,
                        &tenant,
                        &text(&payload, "application_id"),
                        at,
                        "signups",
                        "",
                    );
                }
                ("detection", "RiskDetected") => {
                    counter(
                        writes,
                        &tenant,
                        "",
                        at,
                        "risk_detections",
                        &text(&payload, "kind"),
                    );
                }
                _ => {}
            }
        }
        Ok(())
    }
}
