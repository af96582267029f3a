//! # Layout
//!
//! What we learned from the log: read models built by folding events.
//!
//! - [`Projection`]: the contract of a read model: which events it wants and how it folds one.
//! - [`rebuild`]: replays the log from the start into a projection, up to the head at the
//!   time the rebuild began.
//! - [`runtime`]: SQL read models beside the log, written exactly once with their position,
//!   one runner per projection across replicas (a lease), rebuilt into a new generation and
//!   swapped in without downtime, stopped by a poison event.
//! - [`lease`]: leases for background workers that run in one replica at a time.
//! - [`activity`]: the sign-in log and activity counters of SPEC §7.
//! - [`event_counts`]: the smallest real projection (events per type), used by
//!   `gatehouse bench replay` to measure what the replay machinery itself costs.
//!
//! Projections only read the log; they never call services.
#![forbid(unsafe_code)]

pub mod activity;
pub mod event_counts;
pub mod lease;
pub mod runtime;

use gatehouse_events::{EventFilter, EventStore, Position, RecordedEvent, StoreError};

/// Every SQL projection the server runs.
pub fn all() -> Vec<runtime::Factory> {
    vec![std::sync::Arc::new(activity::Activity::boxed)]
}

/// A read model folded from the log.
pub trait Projection {
    /// Which events it needs.
    fn filter(&self) -> EventFilter {
        EventFilter::default()
    }

    /// Folds one event.
    fn apply(&mut self, event: &RecordedEvent);
}

/// Events read per round trip while rebuilding.
pub const REBUILD_BATCH: usize = 10_000;

/// What a rebuild did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rebuilt {
    /// Events folded.
    pub events: u64,
    /// Position the projection has reached; resume live from here.
    pub position: Position,
}

/// Replays every matching event from the start of the log into `projection`, until it has
/// caught up with the log as it was when the rebuild started.
pub async fn rebuild(
    store: &dyn EventStore,
    projection: &mut impl Projection,
) -> Result<Rebuilt, StoreError> {
    let filter = projection.filter();
    let mut rebuilt = Rebuilt {
        events: 0,
        position: 0,
    };
    let mut batch = store.read_all(0, &filter, REBUILD_BATCH).await?;
    loop {
        let done = batch.events.len() < REBUILD_BATCH;
        rebuilt.events += batch.events.len() as u64;
        rebuilt.position = batch.next;
        // Read the next batch while this one is folded.
        let (next, ()) = futures::join!(
            async {
                if done {
                    Ok(None)
                } else {
                    store
                        .read_all(rebuilt.position, &filter, REBUILD_BATCH)
                        .await
                        .map(Some)
                }
            },
            async {
                for event in &batch.events {
                    projection.apply(event);
                }
            }
        );
        match next? {
            Some(next) => batch = next,
            None => return Ok(rebuilt),
        }
    }
}
