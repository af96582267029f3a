//! The Tenant aggregate: one company's directory.

use chrono::{DateTime, Utc};
use gatehouse_core::ApiError;
use gatehouse_core::error::Validation;
use gatehouse_events::{Aggregate, DomainEvent, RecordedEvent};
use serde::{Deserialize, Serialize};

/// Longest tenant display name, in characters.
pub const MAX_DISPLAY_NAME: usize = 200;

/// Events of a tenant stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum TenantEvent {
    /// The tenant was created.
    TenantCreated {
        /// Human name.
        display_name: String,
    },
}

impl DomainEvent for TenantEvent {}

/// A tenant's state.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Tenant {
    /// Human name.
    pub display_name: String,
    /// When it was created (`None` while the stream does not exist).
    pub created_at: Option<DateTime<Utc>>,
}

impl Aggregate for Tenant {
    const STREAM_TYPE: &'static str = "tenant";
    type Event = TenantEvent;

    fn apply(&mut self, event: TenantEvent, envelope: &RecordedEvent) {
        match event {
            TenantEvent::TenantCreated { display_name } => {
                self.display_name = display_name;
                self.created_at = Some(envelope.recorded_at);
            }
        }
    }
}

/// Creates a tenant.
pub fn create(state: &Tenant, display_name: &str) -> Result<Vec<TenantEvent>, ApiError> {
    let mut validation = Validation::new();
    validation.text("display_name", display_name, 1, MAX_DISPLAY_NAME);
    validation.finish()?;
    if state.created_at.is_some() {
        return Err(ApiError::AlreadyExists("the tenant already exists".into()));
    }
    Ok(vec![TenantEvent::TenantCreated {
        display_name: display_name.trim().to_string(),
    }])
}
