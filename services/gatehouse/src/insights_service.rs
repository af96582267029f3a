//! InsightsService (proto/gatehouse/v1/insights.proto): the activity projection's tables
//! read for people — headline numbers, time series and the sign-in log. The HTTP dashboard
//! asks the same questions through [`Insights`].

use chrono::{DateTime, Datelike, SecondsFormat, TimeZone, Utc};
use gatehouse_core::ApiError;
use gatehouse_core::keys::Caller;
use gatehouse_events::EventStore;
use gatehouse_events::readmodel::{SqlValue, Statement};
use gatehouse_projections::activity::{Activity, NAME};
use gatehouse_projections::runtime;
use gatehouse_proto::v1 as pb;
use gatehouse_proto::v1::insights_service_server::InsightsService;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};
use uuid::Uuid;

const HOUR: i64 = 3_600_000_000;
const DAY: i64 = 24 * HOUR;
/// Longest period of a query, per granularity (days).
const MAX_DAYS_HOURLY: i64 = 31;
const MAX_DAYS: i64 = 3 * 366;
/// Every counter metric of the activity projection.
pub const METRICS: &[&str] = &[
    "attempts",
    "successes",
    "failures",
    "blocks",
    "signups",
    "mfa_challenges",
    "mfa_completions",
    "signins_by_method",
    "signins_by_country",
    "signins_by_os",
    "signins_by_browser",
    "risk_detections",
];
/// The distinct-users metric.
pub const ACTIVE_USERS: &str = "active_users";

/// Reads the activity projection.
#[derive(Clone)]
pub struct Insights {
    store: Arc<dyn EventStore>,
}

fn internal(error: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(error.to_string())
}

fn time(field: &str, text: &str) -> Result<DateTime<Utc>, ApiError> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| ApiError::invalid(field, "an RFC 3339 time"))
}

/// A period [from, to) in microseconds, checked.
fn period(from: &str, to: &str, max_days: i64) -> Result<(i64, i64), ApiError> {
    let (from, to) = (time("from", from)?, time("to", to)?);
    if to <= from {
        return Err(ApiError::invalid("to", "must be after from"));
    }
    if (to - from).num_days() > max_days {
        return Err(ApiError::invalid(
            "to",
            format!("the period may span at most {max_days} days at this granularity"),
        ));
    }
    Ok((from.timestamp_micros(), to.timestamp_micros()))
}

fn rfc3339(micros: i64) -> String {
    DateTime::<Utc>::from_timestamp_micros(micros)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// The start of the bucket holding `micros`.
fn bucket(micros: i64, granularity: &str) -> i64 {
    match granularity {
        "hour" => micros - micros.rem_euclid(HOUR),
        "month" => {
            let at = DateTime::<Utc>::from_timestamp_micros(micros).unwrap_or_default();
            Utc.with_ymd_and_hms(at.year(), at.month(), 1, 0, 0, 0)
                .single()
                .map_or(micros, |t| t.timestamp_micros())
        }
        _ => micros - micros.rem_euclid(DAY),
    }
}

fn optional_id(field: &str, text: &str) -> Result<Option<String>, ApiError> {
    if text.is_empty() {
        return Ok(None);
    }
    Uuid::parse_str(text)
        .map(|id| Some(id.to_string()))
        .map_err(|_| ApiError::invalid(field, "not a valid id"))
}

impl Insights {
    /// Reads `store`'s activity tables.
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Insights { store }
    }

    /// The tenant a request reads (a tenant key: its own; the admin key: the one named).
    pub fn tenant(caller: &Caller, tenant_id: &str) -> Result<Uuid, ApiError> {
        match (caller, tenant_id) {
            (Caller::Tenant { tenant_id, .. }, "") => Ok(*tenant_id),
            (Caller::PlatformAdmin, "") => Err(ApiError::invalid("tenant_id", "required")),
            (_, text) => {
                let id = Uuid::parse_str(text)
                    .map_err(|_| ApiError::invalid("tenant_id", "not a valid id"))?;
                caller.require_tenant(id, "tenant")?;
                Ok(id)
            }
        }
    }

    async fn query(
        &self,
        sql: &str,
        params: Vec<SqlValue>,
    ) -> Result<Vec<Vec<SqlValue>>, ApiError> {
        let projection = Activity::boxed();
        let names = runtime::active_tables(self.store.as_ref(), projection.as_ref())
            .await
            .map_err(internal)?;
        self.store
            .read_model_query(Statement::new(runtime::substitute(sql, &names), params))
            .await
            .map_err(internal)
    }

    /// Waits (5 s at most) until the projection has applied `position`.
    pub async fn wait_for(&self, position: u64) -> Result<(), ApiError> {
        if position == 0 {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let rows = self
                .store
                .read_model_query(Statement::new(
                    "SELECT q.position FROM projection_positions q JOIN projections p \
                     ON p.name = q.name AND p.generation = q.generation WHERE p.name = ?",
                    vec![NAME.into()],
                ))
                .await
                .map_err(internal)?;
            if rows.first().is_some_and(|r| r[0].int() as u64 >= position) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(ApiError::Unavailable(format!(
                    "the activity projection has not reached position {position} yet"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A period's headline numbers.
    pub async fn summary(
        &self,
        tenant: Uuid,
        m: &pb::GetActivitySummaryRequest,
    ) -> Result<pb::ActivitySummary, ApiError> {
        let (from, to) = period(&m.from, &m.to, MAX_DAYS)?;
        let app = optional_id("application_id", &m.application_id)?;
        self.wait_for(m.min_position).await?;
        let mut sql = "SELECT metric, dimension, CAST(SUM(count) AS BIGINT) FROM {activity} \
                       WHERE tenant_id = ? AND hour >= ? AND hour < ?"
            .to_string();
        let mut params: Vec<SqlValue> = vec![tenant.into(), from.into(), to.into()];
        if let Some(app) = &app {
            sql.push_str(" AND application_id = ?");
            params.push(app.clone().into());
        }
        sql.push_str(" GROUP BY metric, dimension");
        let rows = self.query(&sql, params).await?;
        let mut totals: HashMap<String, i64> = HashMap::new();
        let mut by: HashMap<String, Vec<pb::DimensionCount>> = HashMap::new();
        for row in rows {
            let (metric, dimension, count) = (row[0].text(), row[1].text(), row[2].int());
            *totals.entry(metric.clone()).or_default() += count;
            by.entry(metric)
                .or_default()
                .push(pb::DimensionCount { dimension, count });
        }
        let mut list = |metric: &str| {
            let mut counts = by.remove(metric).unwrap_or_default();
            counts.sort_by(|a, b| b.count.cmp(&a.count).then(a.dimension.cmp(&b.dimension)));
            counts
        };
        let total = |metric: &str| totals.get(metric).copied().unwrap_or(0);
        let mut sql = "SELECT CAST(COUNT(DISTINCT user_id) AS BIGINT) FROM {active_users} \
                       WHERE tenant_id = ? AND day >= ? AND day < ?"
            .to_string();
        let mut params: Vec<SqlValue> = vec![tenant.into(), bucket(from, "day").into(), to.into()];
        if let Some(app) = &app {
            sql.push_str(" AND application_id = ?");
            params.push(app.clone().into());
        }
        let active = self.query(&sql, params).await?;
        Ok(pb::ActivitySummary {
            attempts: total("attempts"),
            successes: total("successes"),
            failures: total("failures"),
            blocks: total("blocks"),
            signups: total("signups"),
            mfa_challenges: total("mfa_challenges"),
            mfa_completions: total("mfa_completions"),
            risk_detections: total("risk_detections"),
            active_users: active.first().map_or(0, |r| r[0].int()),
            failures_by_reason: list("failures"),
            signins_by_method: list("signins_by_method"),
            signins_by_country: list("signins_by_country"),
            mfa_completions_by_method: list("mfa_completions"),
            risk_detections_by_kind: list("risk_detections"),
        })
    }

    /// Time series.
    pub async fn series(
        &self,
        tenant: Uuid,
        m: &pb::QueryActivityRequest,
    ) -> Result<pb::QueryActivityResponse, ApiError> {
        let granularity = match m.granularity.as_str() {
            "" | "day" => "day",
            "hour" => "hour",
            "month" => "month",
            _ => return Err(ApiError::invalid("granularity", "hour, day or month")),
        };
        let max = if granularity == "hour" {
            MAX_DAYS_HOURLY
        } else {
            MAX_DAYS
        };
        let (from, to) = period(&m.from, &m.to, max)?;
        if m.metrics.is_empty() {
            return Err(ApiError::invalid("metrics", "name at least one"));
        }
        if let Some(bad) = m
            .metrics
            .iter()
            .find(|x| !METRICS.contains(&x.as_str()) && x.as_str() != ACTIVE_USERS)
        {
            return Err(ApiError::invalid(
                "metrics",
                format!(
                    "unknown metric '{}'",
                    bad.chars().take(64).collect::<String>()
                ),
            ));
        }
        let (by_app, by_dimension) = (
            m.group_by.iter().any(|g| g == "application"),
            m.group_by.iter().any(|g| g == "dimension"),
        );
        if let Some(bad) = m
            .group_by
            .iter()
            .find(|g| *g != "application" && *g != "dimension")
        {
            return Err(ApiError::invalid(
                "group_by",
                format!(
                    "'{}': application or dimension",
                    bad.chars().take(64).collect::<String>()
                ),
            ));
        }
        if m.dimension.len() > 200 {
            return Err(ApiError::invalid("dimension", "at most 200 characters"));
        }
        let app = optional_id("application_id", &m.application_id)?;
        self.wait_for(m.min_position).await?;

        // (bucket, metric, app, dimension) → value.
        let mut points: BTreeMap<(i64, String, String, String), i64> = BTreeMap::new();
        let counters: Vec<&String> = m.metrics.iter().filter(|x| *x != ACTIVE_USERS).collect();
        if !counters.is_empty() {
            let mut sql = format!(
                "SELECT hour, metric, application_id, dimension, count FROM {{activity}} \
                 WHERE tenant_id = ? AND hour >= ? AND hour < ? AND metric IN ({})",
                vec!["?"; counters.len()].join(", ")
            );
            let mut params: Vec<SqlValue> = vec![tenant.into(), from.into(), to.into()];
            params.extend(counters.iter().map(|x| SqlValue::Text(x.to_string())));
            if let Some(app) = &app {
                sql.push_str(" AND application_id = ?");
                params.push(app.clone().into());
            }
            if !m.dimension.is_empty() {
                sql.push_str(" AND dimension = ?");
                params.push(m.dimension.clone().into());
            }
            for row in self.query(&sql, params).await? {
                let key = (
                    bucket(row[0].int(), granularity),
                    row[1].text(),
                    if by_app { row[2].text() } else { String::new() },
                    if by_dimension {
                        row[3].text()
                    } else {
                        String::new()
                    },
                );
                *points.entry(key).or_default() += row[4].int();
            }
        }
        if m.metrics.iter().any(|x| x == ACTIVE_USERS) {
            if granularity == "hour" {
                return Err(ApiError::invalid(
                    "granularity",
                    "active_users is counted per day or month",
                ));
            }
            let mut sql = "SELECT day, application_id, user_id FROM {active_users} \
                           WHERE tenant_id = ? AND day >= ? AND day < ?"
                .to_string();
            let mut params: Vec<SqlValue> =
                vec![tenant.into(), bucket(from, "day").into(), to.into()];
            if let Some(app) = &app {
                sql.push_str(" AND application_id = ?");
                params.push(app.clone().into());
            }
            let mut distinct: BTreeMap<(i64, String), BTreeSet<String>> = BTreeMap::new();
            for row in self.query(&sql, params).await? {
                let app = if by_app { row[1].text() } else { String::new() };
                distinct
                    .entry((bucket(row[0].int(), granularity), app))
                    .or_default()
                    .insert(row[2].text());
            }
            for ((at, app), users) in distinct {
                points.insert(
                    (at, ACTIVE_USERS.to_string(), app, String::new()),
                    users.len() as i64,
                );
            }
        }
        Ok(pb::QueryActivityResponse {
            points: points
                .into_iter()
                .map(
                    |((at, metric, application_id, dimension), value)| pb::ActivityPoint {
                        bucket: rfc3339(at),
                        metric,
                        application_id,
                        dimension,
                        value,
                    },
                )
                .collect(),
        })
    }

    /// The sign-in log, newest first.
    pub async fn sign_ins(
        &self,
        tenant: Uuid,
        m: &pb::ListSignInsRequest,
    ) -> Result<pb::ListSignInsResponse, ApiError> {
        let size = match m.page_size {
            0 => 50,
            1..=500 => m.page_size as i64,
            _ => return Err(ApiError::invalid("page_size", "1 to 500")),
        };
        let mut sql =
            "SELECT flow_id, started_at, ended_at, user_id, application_id, ip, country, \
                       browser, os, primary_method, mfa_method, policies, risk_level, outcome, \
                       reason FROM {signins} WHERE tenant_id = ?"
                .to_string();
        let mut params: Vec<SqlValue> = vec![tenant.into()];
        if !m.from.is_empty() {
            sql.push_str(" AND started_at >= ?");
            params.push(time("from", &m.from)?.timestamp_micros().into());
        }
        if !m.to.is_empty() {
            sql.push_str(" AND started_at < ?");
            params.push(time("to", &m.to)?.timestamp_micros().into());
        }
        if let Some(user) = optional_id("user_id", &m.user_id)? {
            sql.push_str(" AND user_id = ?");
            params.push(user.into());
        }
        if let Some(app) = optional_id("application_id", &m.application_id)? {
            sql.push_str(" AND application_id = ?");
            params.push(app.into());
        }
        if !m.outcome.is_empty() {
            if ![
                "pending",
                "success",
                "failure",
                "blocked",
                "expired",
                "cancelled",
            ]
            .contains(&m.outcome.as_str())
            {
                return Err(ApiError::invalid("outcome", "unknown outcome"));
            }
            sql.push_str(" AND outcome = ?");
            params.push(m.outcome.clone().into());
        }
        if !m.country.is_empty() {
            if m.country.len() != 2 || !m.country.chars().all(|c| c.is_ascii_alphabetic()) {
                return Err(ApiError::invalid("country", "a two-letter code"));
            }
            sql.push_str(" AND country = ?");
            params.push(m.country.to_uppercase().into());
        }
        if !m.page_token.is_empty() {
            let bad = || ApiError::invalid("page_token", "not a token of this list");
            let (at, flow) = m.page_token.split_once('_').ok_or_else(bad)?;
            let at: i64 = at.parse().map_err(|_| bad())?;
            let flow = Uuid::parse_str(flow).map_err(|_| bad())?;
            sql.push_str(" AND (started_at < ? OR (started_at = ? AND flow_id < ?))");
            params.extend([at.into(), at.into(), flow.into()]);
        }
        self.wait_for(m.min_position).await?;
        sql.push_str(" ORDER BY started_at DESC, flow_id DESC LIMIT ?");
        params.push((size + 1).into());
        let mut rows = self.query(&sql, params).await?;
        let more = rows.len() as i64 > size;
        rows.truncate(size as usize);
        let next_page_token = match (more, rows.last()) {
            (true, Some(last)) => format!("{}_{}", last[1].int(), last[0].text()),
            _ => String::new(),
        };
        let when = |micros: i64| {
            if micros == 0 {
                String::new()
            } else {
                rfc3339(micros)
            }
        };
        Ok(pb::ListSignInsResponse {
            sign_ins: rows
                .into_iter()
                .map(|r| pb::SignInRecord {
                    id: r[0].text(),
                    started_at: when(r[1].int()),
                    ended_at: when(r[2].int()),
                    user_id: r[3].text(),
                    application_id: r[4].text(),
                    ip: r[5].text(),
                    country: r[6].text(),
                    browser: r[7].text(),
                    os: r[8].text(),
                    primary_method: r[9].text(),
                    mfa_method: r[10].text(),
                    policies: r[11]
                        .text()
                        .split(',')
                        .filter(|p| !p.is_empty())
                        .map(str::to_string)
                        .collect(),
                    risk_level: r[12].text(),
                    outcome: r[13].text(),
                    reason: r[14].text(),
                })
                .collect(),
            next_page_token,
        })
    }
}

fn answer<T>(result: Result<T, ApiError>) -> Result<Response<T>, Status> {
    result.map(Response::new).map_err(Status::from)
}

#[tonic::async_trait]
impl InsightsService for Insights {
    async fn get_activity_summary(
        &self,
        request: Request<pb::GetActivitySummaryRequest>,
    ) -> Result<Response<pb::ActivitySummary>, Status> {
        answer(
            async {
                let caller = Caller::of(&request)?;
                let tenant = Insights::tenant(&caller, &request.get_ref().tenant_id)?;
                self.summary(tenant, request.get_ref()).await
            }
            .await,
        )
    }

    async fn query_activity(
        &self,
        request: Request<pb::QueryActivityRequest>,
    ) -> Result<Response<pb::QueryActivityResponse>, Status> {
        answer(
            async {
                let caller = Caller::of(&request)?;
                let tenant = Insights::tenant(&caller, &request.get_ref().tenant_id)?;
                self.series(tenant, request.get_ref()).await
            }
            .await,
        )
    }

    async fn list_sign_ins(
        &self,
        request: Request<pb::ListSignInsRequest>,
    ) -> Result<Response<pb::ListSignInsResponse>, Status> {
        answer(
            async {
                let caller = Caller::of(&request)?;
                let tenant = Insights::tenant(&caller, &request.get_ref().tenant_id)?;
                self.sign_ins(tenant, request.get_ref()).await
            }
            .await,
        )
    }
}
