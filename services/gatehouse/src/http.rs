//! The HTTP side: `/healthz` (liveness) and `/metrics` (Prometheus text format).

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::Instant;

/// Metrics shared by the process's components.
pub struct Metrics {
    registry: Registry,
    uptime: Gauge<f64, std::sync::atomic::AtomicU64>,
    started: Instant,
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
        Metrics {
            registry,
            uptime,
            started: Instant::now(),
        }
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

/// The HTTP routes.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(render_metrics))
        .with_state(metrics)
}

async fn render_metrics(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
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
