//! New detections, published to NATS on `risk.<tenant>.detection` as JSON (the
//! [`DetectionRecord`] of the reports and exports), for subscribers that act on them.
//!
//! The detector publishes a detection right after recording it, once (a replay finds it
//! recorded and publishes nothing). A publish that fails is logged, not retried: the
//! detection itself is safe in the log, and the reports and exports list it.

use crate::detector::Found;
use crate::view::DetectionRecord;
use chrono::{DateTime, Utc};

/// A connection to NATS.
#[derive(Clone)]
pub struct Publisher {
    client: async_nats::Client,
}

/// The subject of a tenant's detections.
pub fn subject(tenant_id: uuid::Uuid) -> String {
    format!("risk.{tenant_id}.detection")
}

impl Publisher {
    /// Connects to the NATS server at `url` (e.g. `nats://127.0.0.1:4222`).
    pub async fn connect(url: &str) -> Result<Self, String> {
        let client = async_nats::connect(url)
            .await
            .map_err(|e| format!("NATS at {url}: {e}"))?;
        Ok(Publisher { client })
    }

    /// Publishes a detection just recorded.
    pub async fn detection(&self, found: &Found, at: DateTime<Utc>) {
        let record = DetectionRecord::new(found.id, found.tenant_id, found.event.clone(), at);
        let payload = match serde_json::to_vec(&record) {
            Ok(payload) => payload,
            Err(error) => {
                tracing::warn!(%error, "a detection could not be encoded for NATS");
                return;
            }
        };
        let sent = async {
            self.client
                .publish(subject(found.tenant_id), payload.into())
                .await?;
            self.client.flush().await?;
            Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
        };
        // A NATS server that does not answer must not hold the detector up.
        match tokio::time::timeout(std::time::Duration::from_secs(2), sent).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, detection = %found.id, "a detection could not be published to NATS")
            }
            Err(_) => {
                tracing::warn!(detection = %found.id, "NATS did not take a detection in time")
            }
        }
    }
}
