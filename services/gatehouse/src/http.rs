//! The HTTP side: `/healthz` (liveness) and `/metrics` (Prometheus text format), the
//! issuers' discovery and JWKS, and the gRPC server's per-RPC metrics layer.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use gatehouse_events::EventStore;
use gatehouse_events::readmodel::Statement;
use gatehouse_projections::runtime::Status;
use gatehouse_signin::{Keys, tokens};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::Instant;
use uuid::Uuid;

/// Metrics shared by the process's components.
pub struct Metrics {
    registry: Registry,
    uptime: Gauge<f64, std::sync::atomic::AtomicU64>,
    started: Instant,
    projections: Vec<(&'static str, tokio::sync::watch::Receiver<Status>)>,
    store: Option<Arc<dyn EventStore>>,
    projection: ProjectionGauges,
    flows: Option<(Arc<std::sync::atomic::AtomicUsize>, Gauge)>,
    notifier: Option<Gauge>,
}

/// Per projection: where it is and how far behind.
#[derive(Default)]
struct ProjectionGauges {
    position: Family<Vec<(String, String)>, Gauge>,
    lag_positions: Family<Vec<(String, String)>, Gauge>,
    lag_seconds: Family<Vec<(String, String)>, Gauge<f64, std::sync::atomic::AtomicU64>>,
    leased: Family<Vec<(String, String)>, Gauge>,
    failed: Family<Vec<(String, String)>, Gauge>,
}

impl Metrics {
    /// The registry with the process-wide metrics.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("gatehouse");
        let uptime = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "uptime_seconds",
            "Seconds since the process started",
            uptime.clone(),
        );
        let info = Gauge::<i64>::default();
        info.set(1);
        registry.register(
            "build_info",
            "Always 1; the version is in the help text",
            info,
        );
        let projection = ProjectionGauges::default();
        registry.register(
            "projection_position",
            "Log position the projection has applied",
            projection.position.clone(),
        );
        registry.register(
            "projection_lag_positions",
            "Log positions between the head and what the projection applied (PostgreSQL positions are sparse)",
            projection.lag_positions.clone(),
        );
        registry.register(
            "projection_lag_seconds",
            "Age of the last event applied while the projection is behind; 0 when caught up",
            projection.lag_seconds.clone(),
        );
        registry.register(
            "projection_leased",
            "1 when this process runs the projection (holds its lease)",
            projection.leased.clone(),
        );
        registry.register(
            "projection_failed",
            "1 when a poison event stopped the projection",
            projection.failed.clone(),
        );
        Metrics {
            registry,
            uptime,
            started: Instant::now(),
            projections: Vec::new(),
            store: None,
            projection,
            flows: None,
            notifier: None,
        }
    }

    /// Exports the sign-in flows in flight (the signin service).
    pub fn watch_flows(&mut self, open: Arc<std::sync::atomic::AtomicUsize>) {
        let gauge = Gauge::default();
        self.registry.register(
            "signin_flows_open",
            "Sign-in flows started and not ended yet, across every process",
            gauge.clone(),
        );
        self.flows = Some((open, gauge));
    }

    /// Exports the notifier's backlog (the directory service).
    pub fn watch_notifier(&mut self, store: Arc<dyn EventStore>) {
        let gauge = Gauge::default();
        self.registry.register(
            "notifier_backlog_positions",
            "Log positions between the head and the notifier's checkpoint (PostgreSQL positions are sparse)",
            gauge.clone(),
        );
        self.store = Some(store);
        self.notifier = Some(gauge);
    }

    /// Exports the lag of projections run by this process.
    pub fn watch_projections(
        &mut self,
        store: Arc<dyn EventStore>,
        projections: Vec<(&'static str, tokio::sync::watch::Receiver<Status>)>,
    ) {
        self.store = Some(store);
        self.projections = projections;
    }

    /// Reads the log's head and sets the projection, flow and notifier gauges.
    async fn refresh(&self) {
        if let Some((open, gauge)) = &self.flows {
            gauge.set(open.load(std::sync::atomic::Ordering::Relaxed) as i64);
        }
        let Some(store) = &self.store else {
            return;
        };
        let head = store
            .read_model_query(Statement::new(
                "SELECT CAST(coalesce(max(position), 0) AS BIGINT) FROM events",
                Vec::new(),
            ))
            .await
            .ok()
            .and_then(|rows| rows.first().and_then(|r| r.first()).map(|v| v.int()))
            .unwrap_or(0);
        if let Some(gauge) = &self.notifier {
            let checkpoint = store
                .load_checkpoint(gatehouse_directory::notifier::CHECKPOINT)
                .await
                .ok()
                .flatten()
                .unwrap_or(0);
            gauge.set((head - checkpoint as i64).max(0));
        }
        for (name, status) in &self.projections {
            let status = status.borrow().clone();
            let labels = vec![("projection".to_string(), name.to_string())];
            let position = status.position as i64;
            self.projection
                .position
                .get_or_create(&labels)
                .set(position);
            self.projection
                .lag_positions
                .get_or_create(&labels)
                .set((head - position).max(0));
            let behind = match (status.caught_up, status.last_event_at) {
                (false, Some(at)) => {
                    (chrono::Utc::now() - at).num_milliseconds().max(0) as f64 / 1000.0
                }
                _ => 0.0,
            };
            self.projection
                .lag_seconds
                .get_or_create(&labels)
                .set(behind);
            self.projection
                .leased
                .get_or_create(&labels)
                .set(i64::from(status.leased));
            self.projection
                .failed
                .get_or_create(&labels)
                .set(i64::from(status.failure.is_some()));
        }
    }

    /// Registers the per-RPC metrics; the layer records into them.
    pub fn rpc(&mut self) -> Arc<RpcMetrics> {
        let rpc = Arc::new(RpcMetrics {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
        });
        self.registry.register(
            "rpc_requests",
            "gRPC calls answered, by method and status code (0 = OK)",
            rpc.requests.clone(),
        );
        self.registry.register(
            "rpc_duration_seconds",
            "Seconds from a gRPC call to its answer's headers, by method",
            rpc.latency.clone(),
        );
        rpc
    }

    /// Registers a metric of a component.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    fn render(&self) -> Result<String, std::fmt::Error> {
        self.uptime.set(self.started.elapsed().as_secs_f64());
        let mut text = String::new();
        encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Health and metrics (every process).
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(render_metrics))
        .with_state(metrics)
}

/// Each tenant's issuer documents: discovery and JWKS (the sign-in service).
pub fn oidc_router(keys: Arc<Keys>) -> Router {
    Router::new()
        .route("/tenants/{tenant}/jwks", get(jwks))
        .route(
            "/tenants/{tenant}/.well-known/openid-configuration",
            get(discovery),
        )
        .with_state(keys)
}

/// Metric labels: (name, value) pairs.
type Labels = Vec<(String, String)>;

/// Requests and latency per gRPC method and status code.
pub struct RpcMetrics {
    requests: Family<Labels, Counter>,
    latency: Family<Labels, Histogram, fn() -> Histogram>,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl RpcMetrics {
    /// The label of a request path: `Service/Method` for the RPCs this binary defines
    /// (Gatehouse's, health's, reflection's), `other` for anything else, so that a caller
    /// cannot mint label values (unknown paths are refused by authentication before routing,
    /// so the answer's status does not tell them apart).
    fn method(path: &str) -> String {
        static KNOWN: std::sync::OnceLock<std::collections::HashSet<String>> =
            std::sync::OnceLock::new();
        let known = KNOWN.get_or_init(|| {
            use prost::Message;
            let mut known: std::collections::HashSet<String> = [
                "grpc.health.v1.Health/Check",
                "grpc.health.v1.Health/Watch",
                "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            ]
            .into_iter()
            .map(str::to_string)
            .collect();
            if let Ok(set) =
                prost_types::FileDescriptorSet::decode(gatehouse_proto::FILE_DESCRIPTOR_SET)
            {
                for file in set.file {
                    let package = file.package.unwrap_or_default();
                    for service in file.service {
                        let service_name = service.name.unwrap_or_default();
                        for method in service.method {
                            known.insert(format!(
                                "{package}.{service_name}/{}",
                                method.name.unwrap_or_default()
                            ));
                        }
                    }
                }
            }
            known
        });
        let name = path.trim_start_matches('/');
        if known.contains(name) {
            name.to_string()
        } else {
            "other".to_string()
        }
    }

    fn record(&self, path: &str, code: &str, seconds: f64) {
        let method = Self::method(path);
        self.requests
            .get_or_create(&vec![
                ("method".to_string(), method.clone()),
                ("code".to_string(), code.to_string()),
            ])
            .inc();
        self.latency
            .get_or_create(&vec![("method".to_string(), method)])
            .observe(seconds);
    }
}

/// The tower layer that records [`RpcMetrics`] around every gRPC call. The status is the
/// `grpc-status` of a trailers-only answer (how tonic answers errors) or OK; the latency is
/// until the response headers (for streaming RPCs: until the stream starts).
#[derive(Clone)]
pub struct RpcMetricsLayer(Arc<RpcMetrics>);

impl RpcMetricsLayer {
    /// Records into `metrics`.
    pub fn new(metrics: Arc<RpcMetrics>) -> Self {
        RpcMetricsLayer(metrics)
    }
}

impl<S> tower_layer::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetricsService {
            inner,
            metrics: self.0.clone(),
        }
    }
}

/// See [`RpcMetricsLayer`].
#[derive(Clone)]
pub struct RpcMetricsService<S> {
    inner: S,
    metrics: Arc<RpcMetrics>,
}

impl<S, B, R> tower_service::Service<axum::http::Request<B>> for RpcMetricsService<S>
where
    S: tower_service::Service<axum::http::Request<B>, Response = axum::http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        use tracing::Instrument;
        let path = request.uri().path().to_string();
        let started = Instant::now();
        let metrics = self.metrics.clone();
        // A span per call (exported when traces are on), named by the method and carrying
        // the caller's correlation id.
        let method = RpcMetrics::method(&path);
        let correlation = request
            .headers()
            .get(gatehouse_core::request::CORRELATION_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| uuid::Uuid::try_parse(v).is_ok())
            .unwrap_or_default()
            .to_string();
        let span = tracing::info_span!(
            "grpc",
            otel.name = %method,
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.method = %method,
            correlation_id = %correlation,
            rpc.grpc.status_code = tracing::field::Empty,
        );
        let answer = self.inner.call(request);
        Box::pin(
            async move {
                let result = answer.await;
                let code = match &result {
                    Ok(response) => response
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("0")
                        .to_string(),
                    Err(_) => "14".to_string(),
                };
                tracing::Span::current().record("rpc.grpc.status_code", code.as_str());
                metrics.record(&path, &code, started.elapsed().as_secs_f64());
                result
            }
            .instrument(span),
        )
    }
}

fn json_response(value: serde_json::Value) -> axum::response::Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        value.to_string(),
    )
        .into_response()
}

/// The tenant's public signing keys (RFC 7517).
async fn jwks(State(keys): State<Arc<Keys>>, Path(tenant): Path<String>) -> impl IntoResponse {
    let Ok(tenant_id) = Uuid::try_parse(&tenant) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    match keys.jwks(tenant_id).await {
        Ok(jwks) => json_response(jwks),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// OpenID Connect discovery for a tenant's issuer.
async fn discovery(State(keys): State<Arc<Keys>>, Path(tenant): Path<String>) -> impl IntoResponse {
    let Ok(tenant_id) = Uuid::try_parse(&tenant) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let issuer = keys.issuer(tenant_id);
    json_response(serde_json::json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{issuer}/authorize"),
        "token_endpoint": format!("{issuer}/token"),
        "userinfo_endpoint": format!("{issuer}/userinfo"),
        "revocation_endpoint": format!("{issuer}/revoke"),
        "end_session_endpoint": format!("{issuer}/logout"),
        "jwks_uri": format!("{issuer}/jwks"),
        "scopes_supported": ["openid", "email"],
        "id_token_signing_alg_values_supported": [tokens::ALG],
        "subject_types_supported": ["public"],
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
        "revocation_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
        "authorization_response_iss_parameter_supported": true,
        "prompt_values_supported": ["none", "login"],
        "claims_parameter_supported": false,
        "request_parameter_supported": false,
        "request_uri_parameter_supported": false,
        "claims_supported": ["sub", "iss", "aud", "exp", "iat", "auth_time", "amr", "sid", "nonce", "email", "email_verified"],
    }))
}

async fn render_metrics(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    metrics.refresh().await;
    match metrics.render() {
        Ok(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_defined_methods_become_labels() {
        assert_eq!(
            RpcMetrics::method("/gatehouse.v1.SignInService/StartSignIn"),
            "gatehouse.v1.SignInService/StartSignIn"
        );
        assert_eq!(
            RpcMetrics::method("/grpc.health.v1.Health/Check"),
            "grpc.health.v1.Health/Check"
        );
        assert_eq!(
            RpcMetrics::method("/gatehouse.v1.TenantService/Xrandom123"),
            "other"
        );
        assert_eq!(RpcMetrics::method("/anything"), "other");
    }
}
