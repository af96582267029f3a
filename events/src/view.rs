//! In-memory views: a fold of part of the log, kept current by a subscription.
//!
//! For small, hot lookups that every request needs (API keys, the tenant list) and that must
//! follow appends made by any process. A view catches up before it is handed out, so a
//! fresh process never answers from an empty view; [`LiveView::wait_for`] lets a command
//! that just appended see its own write.

use crate::envelope::{Position, RecordedEvent};
use crate::error::StoreError;
use crate::store::{EventFilter, EventStore};
use crate::subscription::{BATCH, subscribe_batches};
use futures::StreamExt;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A fold of the events matching a filter, with the position it has reached.
pub struct LiveView<S> {
    state: Arc<RwLock<S>>,
    reached: watch::Receiver<Position>,
    task: JoinHandle<()>,
}

impl<S: Send + Sync + 'static> LiveView<S> {
    /// Catches up with the log, then follows it in a background task.
    pub async fn start(
        store: Arc<dyn EventStore>,
        filter: EventFilter,
        mut state: S,
        apply: fn(&mut S, &RecordedEvent),
    ) -> Result<Self, StoreError> {
        let mut cursor = 0;
        loop {
            let batch = store.read_all(cursor, &filter, BATCH).await?;
            batch
                .events
                .iter()
                .for_each(|event| apply(&mut state, event));
            cursor = batch.next;
            if batch.events.len() < BATCH {
                break;
            }
        }
        let state = Arc::new(RwLock::new(state));
        let (reached_tx, reached) = watch::channel(cursor);
        let shared = state.clone();
        let task = tokio::spawn(async move {
            let mut cursor = cursor;
            loop {
                let mut batches =
                    Box::pin(subscribe_batches(store.clone(), cursor, filter.clone()));
                while let Some(batch) = batches.next().await {
                    match batch {
                        Ok(batch) => {
                            if let Ok(mut state) = shared.write() {
                                batch
                                    .events
                                    .iter()
                                    .for_each(|event| apply(&mut state, event));
                            }
                            cursor = batch.next;
                            reached_tx.send_replace(cursor);
                        }
                        Err(error) => {
                            tracing::warn!(%error, "live view lost its subscription; resuming");
                            break;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        Ok(LiveView {
            state,
            reached,
            task,
        })
    }

    /// Reads the current state.
    pub fn read<R>(&self, read: impl FnOnce(&S) -> R) -> R {
        match self.state.read() {
            Ok(state) => read(&state),
            Err(poisoned) => read(&poisoned.into_inner()),
        }
    }

    /// Waits until the view has applied everything up to `position`; false on timeout.
    pub async fn wait_for(&self, position: Position, timeout: Duration) -> bool {
        let mut reached = self.reached.clone();
        tokio::time::timeout(timeout, reached.wait_for(|p| *p >= position))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

impl<S> Drop for LiveView<S> {
    fn drop(&mut self) {
        self.task.abort();
    }
}
