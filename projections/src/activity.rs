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
//! Ids that are always UUIDs (flows, tenants, active users) are `UUID` columns: PostgreSQL
//! compares and sorts them as 16 bytes. The sign-in log's user (none when the email has no
//! account) and app ids (none for risk detections) stay text, empty when there is none.
//!
//! A flow's later events do not repeat its app or user, so the projection remembers the flows
//! still open (restored from `signins` rows still `pending` after a restart).

use crate::runtime::{Conflict, Poison, SqlProjection, Writes};
use foldhash::{HashMap, HashMapExt, HashSet};
use gatehouse_events::readmodel::SqlValue;
use gatehouse_events::{EventFilter, RecordedEvent};
use serde::Deserialize;
use std::borrow::Cow;
use std::sync::Arc;
use uuid::Uuid;

/// The projection's name.
pub const NAME: &str = "activity";
const HOUR: i64 = 3_600_000_000;
const DAY: i64 = 24 * HOUR;

const TABLES: &[(&str, &str)] = &[
    (
        "signins",
        r#"CREATE TABLE IF NOT EXISTS {t} (
            flow_id UUID NOT NULL,
            tenant_id UUID NOT NULL DEFAULT '00000000-0000-0000-0000-000000000000',
            application_id TEXT COLLATE "binary" NOT NULL DEFAULT '',
            started_at BIGINT NOT NULL DEFAULT 0,
            user_id TEXT COLLATE "binary" NOT NULL DEFAULT '',
            ip TEXT COLLATE "binary" NOT NULL DEFAULT '',
            country TEXT COLLATE "binary" NOT NULL DEFAULT '',
            browser TEXT COLLATE "binary" NOT NULL DEFAULT '',
            os TEXT COLLATE "binary" NOT NULL DEFAULT '',
            primary_method TEXT COLLATE "binary" NOT NULL DEFAULT '',
            mfa_method TEXT COLLATE "binary" NOT NULL DEFAULT '',
            policies TEXT COLLATE "binary" NOT NULL DEFAULT '',
            risk_level TEXT COLLATE "binary" NOT NULL DEFAULT '',
            outcome TEXT COLLATE "binary" NOT NULL DEFAULT 'pending',
            reason TEXT COLLATE "binary" NOT NULL DEFAULT '',
            ended_at BIGINT NOT NULL DEFAULT 0,
            blocked_by TEXT COLLATE "binary" NOT NULL DEFAULT ''
        );
        CREATE UNIQUE INDEX IF NOT EXISTS {t}_key ON {t} (flow_id);
        CREATE INDEX IF NOT EXISTS {t}_time ON {t} (tenant_id, started_at)"#,
    ),
    (
        "activity",
        r#"CREATE TABLE IF NOT EXISTS {t} (
            tenant_id UUID NOT NULL,
            application_id TEXT COLLATE "binary" NOT NULL,
            hour BIGINT NOT NULL,
            metric TEXT COLLATE "binary" NOT NULL,
            dimension TEXT COLLATE "binary" NOT NULL,
            count BIGINT NOT NULL DEFAULT 0
        );
        CREATE UNIQUE INDEX IF NOT EXISTS {t}_key
            ON {t} (tenant_id, hour, metric, dimension, application_id)"#,
    ),
    (
        "active_users",
        r#"CREATE TABLE IF NOT EXISTS {t} (
            tenant_id UUID NOT NULL,
            application_id TEXT COLLATE "binary" NOT NULL,
            day BIGINT NOT NULL,
            user_id UUID NOT NULL
        );
        CREATE UNIQUE INDEX IF NOT EXISTS {t}_key ON {t} (tenant_id, day, application_id, user_id)"#,
    ),
];

/// What the projection remembers of an open flow (every pending sign-in of every tenant is
/// here, so it is small: 60 bytes, ids as UUIDs and the rest as numbers of shared strings).
#[derive(Debug, Clone, Default)]
struct Flow {
    tenant_id: Uuid,
    user_id: Option<Uuid>,
    application_id: Sym,
    method: Sym,
    country: Sym,
    browser: Sym,
    os: Sym,
    blocked_by: Sym,
}

// Pending flows of every tenant live here: keep them small.
const _: () = assert!(std::mem::size_of::<Flow>() <= 60);

/// A string the projection keeps once (an app id, method, country, browser, OS, reason or
/// policy id: few distinct values), by its number; 0 is the empty string.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
struct Sym(u32);

/// The activity projection.
#[derive(Debug)]
pub struct Activity {
    flows: HashMap<Uuid, Flow>,
    /// Each string kept, at its number.
    strings: Vec<Arc<str>>,
    numbers: HashMap<Arc<str>, Sym>,
}

impl Default for Activity {
    fn default() -> Self {
        let empty: Arc<str> = Arc::from("");
        let mut numbers = HashMap::new();
        numbers.insert(empty.clone(), Sym(0));
        Activity {
            flows: HashMap::new(),
            strings: vec![empty],
            numbers,
        }
    }
}

impl Activity {
    /// A fresh instance.
    pub fn boxed() -> Box<dyn SqlProjection> {
        Box::new(Activity::default())
    }
}

/// The payload fields the projection reads, borrowed from the stored JSON text where they
/// hold no escapes. Other fields are skipped unparsed; a field of another JSON type than
/// expected reads as empty, as a missing one does.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Fields<'a> {
    #[serde(borrow)]
    application_id: Text<'a>,
    #[serde(borrow)]
    user_id: Text<'a>,
    #[serde(borrow)]
    method: Text<'a>,
    #[serde(borrow)]
    kind: Text<'a>,
    #[serde(borrow)]
    level: Text<'a>,
    #[serde(borrow)]
    reason: Text<'a>,
    #[serde(borrow)]
    blocked_by: Text<'a>,
    #[serde(borrow)]
    country: Text<'a>,
    #[serde(borrow)]
    properties: Option<Properties<'a>>,
    #[serde(borrow)]
    policies: Option<Vec<Applied<'a>>>,
}

/// `RiskAssessed.properties`: the country is `location.country` (or `country` without a
/// location).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Properties<'a> {
    #[serde(borrow)]
    location: Option<Location<'a>>,
    #[serde(borrow)]
    country: Text<'a>,
    #[serde(borrow)]
    browser: Text<'a>,
    #[serde(borrow)]
    os: Text<'a>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Location<'a> {
    #[serde(borrow)]
    country: Text<'a>,
}

/// One policy of `PolicyEvaluated.policies`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Applied<'a> {
    #[serde(borrow)]
    policy_id: Text<'a>,
    #[serde(borrow)]
    result: Text<'a>,
}

/// A JSON string, or empty for any other JSON value.
#[derive(Debug, Default)]
struct Text<'a>(Cow<'a, str>);

impl std::ops::Deref for Text<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v)))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Text<'de>, E> {
                Ok(Text::default())
            }
            fn visit_i64<E>(self, _: i64) -> Result<Text<'de>, E> {
                Ok(Text::default())
            }
            fn visit_u64<E>(self, _: u64) -> Result<Text<'de>, E> {
                Ok(Text::default())
            }
            fn visit_f64<E>(self, _: f64) -> Result<Text<'de>, E> {
                Ok(Text::default())
            }
            fn visit_unit<E>(self) -> Result<Text<'de>, E> {
                Ok(Text::default())
            }
            fn visit_none<E>(self) -> Result<Text<'de>, E> {
                Ok(Text::default())
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Text<'de>, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Text::default())
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Text<'de>, A::Error> {
                while map
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Text::default())
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

fn user_of(value: &str) -> Option<Uuid> {
    Uuid::try_parse(value).ok()
}

/// A row of `activity`: tenant, app, hour, metric, dimension.
type CounterKey = (Uuid, Sym, i64, &'static str, Sym);
/// A row of `active_users`: tenant, day, app, user.
type ActiveKey = (Uuid, i64, Sym, Uuid);

/// The columns of `signins` a flow's events set (all but its key), in the order rows list them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Column {
    ApplicationId,
    BlockedBy,
    Browser,
    Country,
    EndedAt,
    Ip,
    MfaMethod,
    Os,
    Outcome,
    Policies,
    PrimaryMethod,
    Reason,
    RiskLevel,
    StartedAt,
    TenantId,
    UserId,
}

/// Their names, at each [`Column`]'s number.
const COLUMNS: [&str; 16] = [
    "application_id",
    "blocked_by",
    "browser",
    "country",
    "ended_at",
    "ip",
    "mfa_method",
    "os",
    "outcome",
    "policies",
    "primary_method",
    "reason",
    "risk_level",
    "started_at",
    "tenant_id",
    "user_id",
];

/// The values a batch sets in a flow's row, at each [`Column`]'s number (the last one set
/// wins).
type SignInRow = [Option<SqlValue>; COLUMNS.len()];

/// The row changes of one batch, in typed maps until the batch is handed to [`Writes`].
#[derive(Default)]
struct Batch {
    signins: HashMap<Uuid, Box<SignInRow>>,
    counters: HashMap<CounterKey, i64>,
    active: HashSet<ActiveKey>,
}

impl Batch {
    fn set(&mut self, flow_id: Uuid, column: Column, value: impl Into<SqlValue>) {
        let row = self
            .signins
            .entry(flow_id)
            .or_insert_with(|| Box::new(std::array::from_fn(|_| None)));
        row[column as usize] = Some(value.into());
    }

    fn count(&mut self, key: CounterKey) {
        *self.counters.entry(key).or_default() += 1;
    }

    /// Hands the batch's rows over, grouped by the columns they set.
    fn write(self, writes: &mut Writes, strings: &[Arc<str>]) {
        let text = |sym: Sym| -> SqlValue {
            strings
                .get(sym.0 as usize)
                .map_or_else(String::new, |s| s.to_string())
                .into()
        };
        // Rows by the set of columns they set (a bit per column).
        let mut shapes: HashMap<u32, Vec<Vec<SqlValue>>> = HashMap::new();
        for (flow_id, row) in self.signins {
            let shape = row
                .iter()
                .enumerate()
                .filter(|(_, value)| value.is_some())
                .fold(0u32, |shape, (i, _)| shape | 1 << i);
            let mut values = Vec::with_capacity(shape.count_ones() as usize + 1);
            values.push(SqlValue::Uuid(flow_id));
            values.extend(row.into_iter().flatten());
            shapes.entry(shape).or_default().push(values);
        }
        for (shape, rows) in shapes {
            let columns: Vec<&'static str> = (0..COLUMNS.len())
                .filter(|i| shape & 1 << i != 0)
                .map(|i| COLUMNS[i])
                .collect();
            writes.rows("signins", &["flow_id"], &columns, Conflict::Set, rows);
        }
        let counters = self
            .counters
            .into_iter()
            .map(
                |((tenant_id, application_id, hour, metric, dimension), count)| {
                    vec![
                        SqlValue::Uuid(tenant_id),
                        SqlValue::Int(hour),
                        metric.into(),
                        text(dimension),
                        text(application_id),
                        SqlValue::Int(count),
                    ]
                },
            )
            .collect();
        writes.rows(
            "activity",
            &["tenant_id", "hour", "metric", "dimension", "application_id"],
            &["count"],
            Conflict::Add,
            counters,
        );
        let active = self
            .active
            .into_iter()
            .map(|(tenant_id, day, application_id, user_id)| {
                vec![
                    SqlValue::Uuid(tenant_id),
                    SqlValue::Int(day),
                    text(application_id),
                    SqlValue::Uuid(user_id),
                ]
            })
            .collect();
        writes.rows(
            "active_users",
            &["tenant_id", "day", "application_id", "user_id"],
            &[],
            Conflict::Keep,
            active,
        );
    }
}

fn hour_of(at: i64) -> i64 {
    at - at.rem_euclid(HOUR)
}

impl Activity {
    /// The number of `value`, kept once.
    fn intern(&mut self, value: &str) -> Sym {
        if let Some(sym) = self.numbers.get(value) {
            return *sym;
        }
        let sym = Sym(self.strings.len() as u32);
        let shared: Arc<str> = Arc::from(value);
        self.strings.push(shared.clone());
        self.numbers.insert(shared, sym);
        sym
    }

    /// Counts one for the flow's tenant and app, at its hour.
    fn count(
        &mut self,
        batch: &mut Batch,
        flow_id: Uuid,
        at: i64,
        metric: &'static str,
        dimension: &str,
    ) {
        let dimension = self.intern(dimension);
        if let Some(flow) = self.flows.get(&flow_id) {
            batch.count((
                flow.tenant_id,
                flow.application_id,
                hour_of(at),
                metric,
                dimension,
            ));
        }
    }

    fn signin(&mut self, event: &RecordedEvent, payload: &Fields, batch: &mut Batch) {
        let flow_id = event.stream.id;
        let at = event.recorded_at.timestamp_micros();
        match event.event_type.as_str() {
            "SignInStarted" => {
                let flow = Flow {
                    tenant_id: event.tenant_id,
                    application_id: self.intern(&payload.application_id),
                    user_id: user_of(&payload.user_id),
                    method: self.intern(&payload.method),
                    ..Flow::default()
                };
                batch.set(flow_id, Column::TenantId, event.tenant_id);
                batch.set(flow_id, Column::ApplicationId, &*payload.application_id);
                batch.set(flow_id, Column::StartedAt, at);
                batch.set(flow_id, Column::UserId, &*payload.user_id);
                batch.set(flow_id, Column::PrimaryMethod, &*payload.method);
                let ip = event.context.as_ref().and_then(|c| c.ip.clone());
                batch.set(flow_id, Column::Ip, ip.unwrap_or_default());
                self.flows.insert(flow_id, flow);
                self.count(batch, flow_id, at, "attempts", "");
            }
            "FederationSucceeded" => {
                let method = format!("federated:{}", &*payload.kind);
                batch.set(flow_id, Column::PrimaryMethod, method.as_str());
                batch.set(flow_id, Column::UserId, &*payload.user_id);
                let method = self.intern(&method);
                if let Some(flow) = self.flows.get_mut(&flow_id) {
                    flow.method = method;
                    flow.user_id = user_of(&payload.user_id);
                }
            }
            "RiskAssessed" => {
                batch.set(flow_id, Column::RiskLevel, &*payload.level);
                let empty = Properties::default();
                let properties = payload.properties.as_ref().unwrap_or(&empty);
                let country = match &properties.location {
                    Some(location) => &location.country,
                    None => &properties.country,
                };
                batch.set(flow_id, Column::Country, &**country);
                batch.set(flow_id, Column::Browser, &*properties.browser);
                batch.set(flow_id, Column::Os, &*properties.os);
                if !payload.user_id.is_empty() {
                    batch.set(flow_id, Column::UserId, &*payload.user_id);
                }
                let shared = (
                    self.intern(country),
                    self.intern(&properties.browser),
                    self.intern(&properties.os),
                );
                if let Some(flow) = self.flows.get_mut(&flow_id) {
                    (flow.country, flow.browser, flow.os) = shared;
                    if !payload.user_id.is_empty() {
                        flow.user_id = user_of(&payload.user_id);
                    }
                }
            }
            "PolicyEvaluated" => {
                let applied: Vec<&str> = payload
                    .policies
                    .iter()
                    .flatten()
                    .filter(|p| {
                        !matches!(&*p.result, "not_applied" | "notApplied" | "not_applicable")
                    })
                    .map(|p| &*p.policy_id)
                    .collect();
                batch.set(flow_id, Column::Policies, applied.join(","));
                batch.set(flow_id, Column::BlockedBy, &*payload.blocked_by);
                let shared = (
                    self.intern(&payload.blocked_by),
                    self.intern(&payload.country),
                );
                if let Some(flow) = self.flows.get_mut(&flow_id) {
                    flow.blocked_by = shared.0;
                    if flow.country == Sym::default() && !payload.country.is_empty() {
                        flow.country = shared.1;
                        batch.set(flow_id, Column::Country, &*payload.country);
                    }
                }
            }
            "MfaMethodSelected" => {
                self.count(batch, flow_id, at, "mfa_challenges", &payload.method);
            }
            "MfaVerified" => {
                batch.set(flow_id, Column::MfaMethod, &*payload.method);
                self.count(batch, flow_id, at, "mfa_completions", &payload.method);
            }
            "PasswordRejected" | "FederationFailed" => {
                self.count(batch, flow_id, at, "failures", &payload.reason);
            }
            "CodeRejected" => self.count(batch, flow_id, at, "failures", "wrong_code"),
            "SignInCompleted" => {
                batch.set(flow_id, Column::Outcome, "success");
                batch.set(flow_id, Column::EndedAt, at);
                if let Some(flow) = self.flows.remove(&flow_id) {
                    let hour = hour_of(at);
                    let (tenant, app) = (flow.tenant_id, flow.application_id);
                    for (metric, dimension) in [
                        ("successes", Sym::default()),
                        ("signins_by_method", flow.method),
                        ("signins_by_country", flow.country),
                        ("signins_by_os", flow.os),
                        ("signins_by_browser", flow.browser),
                    ] {
                        batch.count((tenant, app, hour, metric, dimension));
                    }
                    if let Some(user_id) = flow.user_id {
                        batch
                            .active
                            .insert((tenant, at - at.rem_euclid(DAY), app, user_id));
                    }
                }
            }
            "SignInFailed" => {
                let blocked = &*payload.reason == "blocked_by_policy";
                batch.set(
                    flow_id,
                    Column::Outcome,
                    if blocked { "blocked" } else { "failure" },
                );
                batch.set(flow_id, Column::Reason, &*payload.reason);
                batch.set(flow_id, Column::EndedAt, at);
                self.count(batch, flow_id, at, "failures", &payload.reason);
                if let Some(flow) = self.flows.remove(&flow_id)
                    && blocked
                {
                    // The flow already holds the policy's number: no string round trip.
                    batch.count((
                        flow.tenant_id,
                        flow.application_id,
                        hour_of(at),
                        "blocks",
                        flow.blocked_by,
                    ));
                }
            }
            "SignInExpired" | "SignInCancelled" => {
                let outcome = if event.event_type == "SignInExpired" {
                    "expired"
                } else {
                    "cancelled"
                };
                batch.set(flow_id, Column::Outcome, outcome);
                batch.set(flow_id, Column::EndedAt, at);
                self.flows.remove(&flow_id);
            }
            _ => {}
        }
    }
}

/// The event types the projection reads (any other is skipped without parsing its payload).
fn wanted(stream_type: &str, event_type: &str) -> bool {
    match stream_type {
        "signin" => matches!(
            event_type,
            "SignInStarted"
                | "FederationSucceeded"
                | "RiskAssessed"
                | "PolicyEvaluated"
                | "MfaMethodSelected"
                | "MfaVerified"
                | "PasswordRejected"
                | "CodeRejected"
                | "FederationFailed"
                | "SignInCompleted"
                | "SignInFailed"
                | "SignInExpired"
                | "SignInCancelled"
        ),
        "user" => matches!(event_type, "UserSignedUp" | "UserSignedUpFederated"),
        "detection" => event_type == "RiskDetected",
        _ => false,
    }
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
            if tenant_id.is_nil() {
                // A row made by a later event of a flow whose start the log does not hold.
                continue;
            }
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
        let mut batch = Batch::default();
        for event in events {
            let (stream_type, event_type) = (event.stream.kind.as_str(), event.event_type.as_str());
            if !wanted(stream_type, event_type) {
                continue;
            }
            let text = event.payload.get();
            if !text.trim_start().starts_with('{') {
                return Err(Poison {
                    position: event.position,
                    reason: format!("{event_type} payload is not an object"),
                });
            }
            let payload: Fields = serde_json::from_str(text).map_err(|e| Poison {
                position: event.position,
                reason: format!("{event_type} payload: {e}"),
            })?;
            let at = event.recorded_at.timestamp_micros();
            match stream_type {
                "signin" => self.signin(event, &payload, &mut batch),
                "user" => {
                    let key = (
                        event.tenant_id,
                        self.intern(&payload.application_id),
                        hour_of(at),
                        "signups",
                        Sym::default(),
                    );
                    batch.count(key);
                }
                _ => {
                    let key = (
                        event.tenant_id,
                        Sym::default(),
                        hour_of(at),
                        "risk_detections",
                        self.intern(&payload.kind),
                    );
                    batch.count(key);
                }
            }
        }
        batch.write(writes, &self.strings);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gatehouse_events::StreamId;

    #[test]
    fn a_blocked_sign_in_counts_against_the_policy_that_blocked_it() {
        let tenant = Uuid::now_v7();
        let flow = StreamId::new("signin", Uuid::now_v7());
        let at = chrono::Utc::now();
        let mut activity = Activity::default();
        let mut batch = Batch::default();
        for (event_type, payload) in [
            (
                "SignInStarted",
                r#"{"application_id": "app-1", "method": "password"}"#,
            ),
            (
                "PolicyEvaluated",
                r#"{"blocked_by": "policy-7", "policies": []}"#,
            ),
            ("SignInFailed", r#"{"reason": "blocked_by_policy"}"#),
        ] {
            let mut event = RecordedEvent::pending(tenant, flow.clone(), at);
            event.event_type = event_type.into();
            let fields: Fields = serde_json::from_str(payload).unwrap_or_default();
            activity.signin(&event, &fields, &mut batch);
        }
        let blocks: Vec<_> = batch
            .counters
            .iter()
            .filter(|((_, _, _, metric, _), _)| *metric == "blocks")
            .map(|((t, app, _, _, by), n)| {
                let text = |sym: &Sym| activity.strings[sym.0 as usize].to_string();
                (*t, text(app), text(by), *n)
            })
            .collect();
        assert_eq!(
            blocks,
            vec![(tenant, "app-1".to_string(), "policy-7".to_string(), 1)]
        );
        assert!(activity.flows.is_empty(), "an ended flow is forgotten");
    }

    #[test]
    fn each_column_of_the_sign_in_log_is_set_under_its_own_name() {
        let flow = Uuid::now_v7();
        let mut batch = Batch::default();
        for (column, name) in [
            (Column::ApplicationId, "application_id"),
            (Column::BlockedBy, "blocked_by"),
            (Column::Browser, "browser"),
            (Column::Country, "country"),
            (Column::EndedAt, "ended_at"),
            (Column::Ip, "ip"),
            (Column::MfaMethod, "mfa_method"),
            (Column::Os, "os"),
            (Column::Outcome, "outcome"),
            (Column::Policies, "policies"),
            (Column::PrimaryMethod, "primary_method"),
            (Column::Reason, "reason"),
            (Column::RiskLevel, "risk_level"),
            (Column::StartedAt, "started_at"),
            (Column::TenantId, "tenant_id"),
            (Column::UserId, "user_id"),
        ] {
            batch.set(flow, column, "overwritten");
            batch.set(flow, column, name);
        }
        let row = &batch.signins[&flow];
        for (number, value) in row.iter().enumerate() {
            assert_eq!(value, &Some(SqlValue::Text(COLUMNS[number].into())));
        }
        // And they are the table's columns, all but its key.
        let mut declared: Vec<&str> = TABLES[0]
            .1
            .lines()
            .filter(|line| {
                [" TEXT ", " BIGINT ", " UUID "]
                    .iter()
                    .any(|t| line.contains(t))
            })
            .filter_map(|line| line.split_whitespace().next())
            .filter(|column| *column != "flow_id")
            .collect();
        declared.sort_unstable();
        assert_eq!(declared, COLUMNS);
    }

    #[test]
    fn fields_read_strings_and_nothing_else() {
        let payload = r#"{"user_id": null, "method": 7, "kind": {"a": [1, 2]}, "reason": ["x"],
            "application_id": "app\"1", "level": "high", "unknown": {"deep": [true]},
            "properties": {"location": {"country": "FR"}, "country": "US", "browser": "Firefox"},
            "policies": [{"policy_id": "p1", "result": "applied"}, {"policy_id": 3}]}"#;
        let fields: Fields = serde_json::from_str(payload).unwrap_or_default();
        assert_eq!(&*fields.user_id, "");
        assert_eq!(&*fields.method, "");
        assert_eq!(&*fields.kind, "");
        assert_eq!(&*fields.reason, "");
        assert_eq!(&*fields.application_id, "app\"1");
        assert_eq!(&*fields.level, "high");
        let properties = fields.properties.unwrap_or_default();
        let location = properties.location.unwrap_or_default();
        assert_eq!(&*location.country, "FR");
        assert_eq!(&*properties.browser, "Firefox");
        assert_eq!(&*properties.os, "");
        let policies = fields.policies.unwrap_or_default();
        assert_eq!(policies.len(), 2);
        assert_eq!(&*policies[0].policy_id, "p1");
        assert_eq!(&*policies[1].policy_id, "");
    }
}
