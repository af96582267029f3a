//! Catch-up-then-live subscriptions over any [`EventStore`].
//!
//! A subscription is a pull stream: it reads a batch after its cursor, yields it, and when
//! the log has nothing new it waits for the store's change signal (or the poll interval, for
//! appends made by other processes). Because [`EventStore::read_all`] never returns events
//! past the point where every transaction has finished, the cursor only moves over events
//! that can no longer change, so a subscriber sees each committed event exactly once and in
//! position order. A slow consumer slows only itself: nothing is buffered beyond one batch.

use crate::envelope::{Position, RecordedEvent};
use crate::error::StoreError;
use crate::store::{EventFilter, EventStore, ReadBatch};
use futures::{Stream, StreamExt};
use std::sync::Arc;

/// Events read per round trip.
pub const BATCH: usize = 1000;

/// Every matching event after `after`, then live ones as they commit. Resume a subscription
/// by passing the position of the last event it delivered.
pub fn subscribe(
    store: Arc<dyn EventStore>,
    after: Position,
    filter: EventFilter,
) -> impl Stream<Item = Result<RecordedEvent, StoreError>> + Send + 'static {
    subscribe_batches(store, after, filter).flat_map(|batch| {
        let items: Vec<Result<RecordedEvent, StoreError>> = match batch {
            Ok(batch) => batch.events.into_iter().map(Ok).collect(),
            Err(error) => vec![Err(error)],
        };
        futures::stream::iter(items)
    })
}

/// The same subscription as batches, each with the position it is safe to resume from
/// ([`ReadBatch::next`], which also moves past events the filter skipped). Empty batches
/// are not yielded.
pub fn subscribe_batches(
    store: Arc<dyn EventStore>,
    after: Position,
    filter: EventFilter,
) -> impl Stream<Item = Result<ReadBatch, StoreError>> + Send + 'static {
    async_stream::try_stream! {
        let mut changes = store.changes();
        let poll = store.poll_interval();
        let mut cursor = after;
        loop {
            // Mark the signal seen before reading, so an append that lands during the read
            // wakes the next wait instead of being missed.
            changes.borrow_and_update();
            let batch = store.read_all(cursor, &filter, BATCH).await?;
            let caught_up = batch.events.len() < BATCH;
            let moved = batch.next > cursor;
            cursor = batch.next;
            if moved {
                yield batch;
            }
            if caught_up {
                let _ = tokio::time::timeout(poll, changes.changed()).await;
            }
        }
    }
}
