//! The dashboard on the HTTP port: a static page (`/`, assets under `/dashboard/`, embedded
//! in the binary; the charting library is committed as a built file, see
//! `dashboard/build.sh`) and the JSON API it reads (`/api/...`), which answers with the
//! InsightsService and RiskService messages for a bearer API key, like gRPC.

use crate::insights_service::Insights;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use gatehouse_core::ApiError;
use gatehouse_core::keys::{Caller, KeyRing};
use gatehouse_proto::v1 as pb;
use gatehouse_proto::v1::risk_service_server::RiskService;
use gatehouse_risk::service::RiskApi;
use std::collections::HashMap;
use std::sync::Arc;

const INDEX: &str = include_str!("../dashboard/index.html");
const APP: &str = include_str!("../dashboard/app.js");
const STYLE: &str = include_str!("../dashboard/style.css");
const CHART: &str = include_str!("../dashboard/vendor/chart.umd.min.js");

/// Scripts and styles from this origin only; no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
    img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// What the dashboard's API needs.
#[derive(Clone)]
pub struct Dashboard {
    /// Bearer keys.
    pub keys: Arc<KeyRing>,
    /// The activity projection.
    pub insights: Insights,
    /// Identity Protection's reports.
    pub risk: Arc<RiskApi>,
}

/// The page, its assets and its API.
pub fn router(dashboard: Dashboard) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX, false) }),
        )
        .route(
            "/dashboard/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP, false) }),
        )
        .route(
            "/dashboard/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE, false) }),
        )
        .route(
            "/dashboard/chart.umd.min.js",
            get(|| async { asset("text/javascript; charset=utf-8", CHART, true) }),
        )
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route("/api/insights/summary", get(summary))
        .route("/api/insights/activity", get(activity))
        .route("/api/insights/signins", get(sign_ins))
        .route("/api/risk/users", get(risky_users))
        .with_state(dashboard)
}

fn asset(content_type: &'static str, body: &'static str, immutable: bool) -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (
                header::CACHE_CONTROL,
                if immutable {
                    "public, max-age=86400"
                } else {
                    "no-cache"
                },
            ),
        ],
        body,
    )
        .into_response()
}

fn json(status: StatusCode, body: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

/// An error as `{"error": …, "fields": […]}` with the HTTP status of its gRPC code.
fn failure(error: ApiError) -> Response {
    let fields: Vec<String> = match &error {
        ApiError::InvalidArgument(violations) => {
            violations.iter().map(|v| v.field.clone()).collect()
        }
        _ => Vec::new(),
    };
    let status = tonic::Status::from(error);
    let code = match status.code() {
        tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
        tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    json(
        code,
        serde_json::json!({"error": status.message(), "fields": fields}).to_string(),
    )
}

fn answer<T: serde::Serialize>(result: Result<T, ApiError>) -> Response {
    match result
        .and_then(|v| serde_json::to_string(&v).map_err(|e| ApiError::Internal(e.to_string())))
    {
        Ok(body) => json(StatusCode::OK, body),
        Err(error) => failure(error),
    }
}

/// The caller of a bearer key, and the tenant it reads.
fn caller(
    dashboard: &Dashboard,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
) -> Result<(Caller, uuid::Uuid), ApiError> {
    let caller = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .filter(|key| key.len() <= 256)
        .and_then(|key| dashboard.keys.authenticate(key.trim()))
        .ok_or(ApiError::Unauthenticated)?;
    let tenant = Insights::tenant(&caller, param(query, "tenant_id"))?;
    Ok((caller, tenant))
}

fn param<'a>(query: &'a HashMap<String, String>, name: &str) -> &'a str {
    query.get(name).map(String::as_str).unwrap_or_default()
}

fn number(query: &HashMap<String, String>, name: &str) -> Result<u64, ApiError> {
    match param(query, name) {
        "" => Ok(0),
        text => text
            .parse()
            .map_err(|_| ApiError::invalid(name, "a number")),
    }
}

fn list(query: &HashMap<String, String>, name: &str) -> Vec<String> {
    param(query, name)
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .take(50)
        .map(str::to_string)
        .collect()
}

async fn summary(
    State(d): State<Dashboard>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    answer(
        async {
            let (_, tenant) = caller(&d, &headers, &q)?;
            let request = pb::GetActivitySummaryRequest {
                tenant_id: tenant.to_string(),
                from: param(&q, "from").into(),
                to: param(&q, "to").into(),
                application_id: param(&q, "application_id").into(),
                min_position: number(&q, "min_position")?,
            };
            d.insights.summary(tenant, &request).await
        }
        .await,
    )
}

async fn activity(
    State(d): State<Dashboard>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    answer(
        async {
            let (_, tenant) = caller(&d, &headers, &q)?;
            let request = pb::QueryActivityRequest {
                tenant_id: tenant.to_string(),
                from: param(&q, "from").into(),
                to: param(&q, "to").into(),
                granularity: param(&q, "granularity").into(),
                metrics: list(&q, "metrics"),
                group_by: list(&q, "group_by"),
                application_id: param(&q, "application_id").into(),
                dimension: param(&q, "dimension").into(),
                min_position: number(&q, "min_position")?,
            };
            d.insights.series(tenant, &request).await
        }
        .await,
    )
}

async fn sign_ins(
    State(d): State<Dashboard>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    answer(
        async {
            let (_, tenant) = caller(&d, &headers, &q)?;
            let request = pb::ListSignInsRequest {
                tenant_id: tenant.to_string(),
                from: param(&q, "from").into(),
                to: param(&q, "to").into(),
                user_id: param(&q, "user_id").into(),
                application_id: param(&q, "application_id").into(),
                outcome: param(&q, "outcome").into(),
                country: param(&q, "country").into(),
                page_size: u32::try_from(number(&q, "page_size")?)
                    .map_err(|_| ApiError::invalid("page_size", "1 to 500"))?,
                page_token: param(&q, "page_token").into(),
                min_position: number(&q, "min_position")?,
            };
            d.insights.sign_ins(tenant, &request).await
        }
        .await,
    )
}

async fn risky_users(
    State(d): State<Dashboard>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    answer(
        async {
            let (caller, tenant) = caller(&d, &headers, &q)?;
            let mut request = tonic::Request::new(pb::ListRiskyUsersRequest {
                tenant_id: tenant.to_string(),
                page_size: u32::try_from(number(&q, "page_size")?)
                    .map_err(|_| ApiError::invalid("page_size", "a page size"))?,
                page_token: param(&q, "page_token").into(),
                ..Default::default()
            });
            request.extensions_mut().insert(caller);
            d.risk
                .list_risky_users(request)
                .await
                .map(tonic::Response::into_inner)
                .map_err(|status| match status.code() {
                    tonic::Code::InvalidArgument => {
                        ApiError::invalid("request", status.message().to_string())
                    }
                    tonic::Code::NotFound => ApiError::NotFound(status.message().into()),
                    _ => ApiError::Internal(status.message().into()),
                })
        }
        .await,
    )
}
