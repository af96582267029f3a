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
use std::time::Duration;
use tokio::sync::broadcast;

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
///
/// Catching up reads the store with the subscriber's filter. Following live does not: every
/// subscription of a process shares one reader of the log, the store's [`Tail`], and filters
/// its batches in memory, so an append costs one read however many views follow the log.
/// A tail batch that starts past the subscriber's cursor (it fell behind, or the tail started
/// later) is bridged by reading the store, so nothing is skipped; events at or below the
/// cursor are dropped, so nothing is seen twice.
pub fn subscribe_batches(
    store: Arc<dyn EventStore>,
    after: Position,
    filter: EventFilter,
) -> impl Stream<Item = Result<ReadBatch, StoreError>> + Send + 'static {
    async_stream::try_stream! {
        let mut cursor = after;
        loop {
            let batch = store.read_all(cursor, &filter, BATCH).await?;
            let caught_up = batch.events.len() < BATCH;
            let moved = batch.next > cursor;
            cursor = batch.next;
            if moved {
                yield batch;
            }
            if caught_up {
                break;
            }
        }
        loop {
            let mut batches = Tail::subscribe(&store, cursor);
            loop {
                let shared = match batches.recv().await {
                    Ok(shared) => shared,
                    // Missed batches are bridged by the gap rule below.
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => break,
                };
                if shared.next <= cursor {
                    continue;
                }
                while cursor < shared.from {
                    let batch = store.read_all(cursor, &filter, BATCH).await?;
                    let moved = batch.next > cursor;
                    cursor = cursor.max(batch.next);
                    if moved && !batch.events.is_empty() {
                        yield batch;
                    }
                    if !moved {
                        break;
                    }
                }
                let events: Vec<RecordedEvent> = shared
                    .events
                    .iter()
                    .filter(|e| e.position > cursor && filter.matches(e))
                    .cloned()
                    .collect();
                cursor = cursor.max(shared.next);
                if !events.is_empty() {
                    yield ReadBatch { events, next: cursor };
                }
            }
        }
    }
}

/// How often a consumer that commits per batch (the sealer, the projection runners, the
/// relay) commits under load: see [`at_most_every`].
pub const COMMIT_EVERY: Duration = Duration::from_millis(50);

/// `batches` merged so that a consumer committing once per batch commits at most once per
/// `every`. The first batch after a quiet spell passes at once; a batch arriving sooner after
/// the last one is held until `every` has passed since it, merged with those that follow
/// (up to [`BATCH`] events). Idle, nothing waits; under load, one commit carries what many
/// appends wrote instead of each append causing a commit of its own in every consumer.
pub fn at_most_every<S>(
    batches: S,
    every: Duration,
) -> impl Stream<Item = Result<ReadBatch, StoreError>> + Send + 'static
where
    S: Stream<Item = Result<ReadBatch, StoreError>> + Send + 'static,
{
    async_stream::try_stream! {
        let mut batches = Box::pin(batches);
        let mut last: Option<tokio::time::Instant> = None;
        while let Some(first) = batches.next().await {
            let mut merged = first?;
            if let Some(last) = last {
                let until = last + every;
                while merged.events.len() < BATCH {
                    match tokio::time::timeout_at(until, batches.next()).await {
                        Ok(Some(more)) => {
                            let more = more?;
                            merged.events.extend(more.events);
                            merged.next = merged.next.max(more.next);
                        }
                        Ok(None) | Err(_) => break,
                    }
                }
            }
            last = Some(tokio::time::Instant::now());
            yield merged;
        }
    }
}

/// A batch of the whole log as the tail read it: every event in `(from, next]`.
#[derive(Debug)]
pub struct TailBatch {
    /// The tail's cursor before the read.
    pub from: Position,
    /// Every event after `from`, in position order.
    pub events: Vec<RecordedEvent>,
    /// The read's resume position.
    pub next: Position,
}

/// Batches kept for slow subscribers before they must bridge by reading.
const TAIL_CAPACITY: usize = 256;
/// The tail reads the log at most this often when woken by appends: under load one read
/// brings many appends (every view of the process a little later), idle it reads at once.
const TAIL_EVERY: Duration = Duration::from_millis(2);

/// One reader of the whole log per store and process, fanning its batches out to every live
/// subscription. It starts with the first live subscriber and stops when the last one is
/// gone (or the store is dropped: it holds the store weakly).
#[derive(Default)]
pub struct Tail {
    sender: std::sync::Mutex<Option<broadcast::Sender<Arc<TailBatch>>>>,
}

impl Tail {
    /// A receiver of the store's tail, starting the tail at `cursor` if it is not running.
    pub fn subscribe(
        store: &Arc<dyn EventStore>,
        cursor: Position,
    ) -> broadcast::Receiver<Arc<TailBatch>> {
        let tail = store.tail();
        let mut sender = match tail.sender.lock() {
            Ok(sender) => sender,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(running) = sender.as_ref().filter(|s| s.receiver_count() > 0) {
            return running.subscribe();
        }
        let (tx, rx) = broadcast::channel(TAIL_CAPACITY);
        *sender = Some(tx.clone());
        tokio::spawn(follow(Arc::downgrade(store), tx, cursor));
        rx
    }
}

async fn follow(
    store: std::sync::Weak<dyn EventStore>,
    sender: broadcast::Sender<Arc<TailBatch>>,
    mut cursor: Position,
) {
    let everything = EventFilter::default();
    let Some(first) = store.upgrade() else {
        return;
    };
    let mut changes = first.changes();
    let poll = first.poll_interval();
    drop(first);
    loop {
        if sender.receiver_count() == 0 {
            return;
        }
        let Some(store) = store.upgrade() else {
            return;
        };
        changes.borrow_and_update();
        let last_read = tokio::time::Instant::now();
        let batch = match store.read_all(cursor, &everything, BATCH).await {
            Ok(batch) => batch,
            Err(error) => {
                tracing::warn!(%error, "log tail read failed; retrying");
                drop(store);
                tokio::time::sleep(poll).await;
                continue;
            }
        };
        drop(store);
        let caught_up = batch.events.len() < BATCH;
        if batch.next > cursor {
            let shared = TailBatch {
                from: cursor,
                events: batch.events,
                next: batch.next,
            };
            cursor = shared.next;
            if sender.send(Arc::new(shared)).is_err() {
                return;
            }
        }
        if caught_up {
            let _ = tokio::time::timeout(poll, changes.changed()).await;
            if last_read.elapsed() < TAIL_EVERY {
                tokio::time::sleep_until(last_read + TAIL_EVERY).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::StreamId;
    use chrono::Utc;
    use tokio::sync::mpsc;
    use uuid::Uuid;

    fn batch(positions: &[Position]) -> ReadBatch {
        let events = positions
            .iter()
            .map(|&position| {
                let mut event = RecordedEvent::pending(
                    Uuid::nil(),
                    StreamId::new("t", Uuid::nil()),
                    Utc::now(),
                );
                event.position = position;
                event
            })
            .collect();
        ReadBatch {
            events,
            next: positions.last().copied().unwrap_or(0),
        }
    }

    fn positions(batch: &ReadBatch) -> Vec<Position> {
        batch.events.iter().map(|e| e.position).collect()
    }

    #[tokio::test]
    async fn batches_close_together_are_merged_and_nothing_is_lost() -> Result<(), StoreError> {
        let (sender, mut receiver) = mpsc::unbounded_channel::<Result<ReadBatch, StoreError>>();
        let source = async_stream::stream! {
            while let Some(item) = receiver.recv().await {
                yield item;
            }
        };
        let every = Duration::from_millis(300);
        let mut merged = Box::pin(at_most_every(source, every));
        let closed = || StoreError::Backend("test channel closed".into());

        // The first batch after a quiet spell passes on its own, without waiting.
        sender.send(Ok(batch(&[1, 2]))).map_err(|_| closed())?;
        let first = merged.next().await.ok_or_else(closed)??;
        assert_eq!(positions(&first), vec![1, 2]);
        assert_eq!(first.next, 2);

        // Two more right after it: held until `every` has passed, then handed on as one.
        sender.send(Ok(batch(&[3]))).map_err(|_| closed())?;
        sender.send(Ok(batch(&[4, 5]))).map_err(|_| closed())?;
        let second = merged.next().await.ok_or_else(closed)??;
        assert_eq!(positions(&second), vec![3, 4, 5]);
        assert_eq!(second.next, 5);

        // An error is passed on, not swallowed into a merge.
        sender
            .send(Err(StoreError::Backend("read failed".into())))
            .map_err(|_| closed())?;
        assert!(matches!(
            merged.next().await,
            Some(Err(StoreError::Backend(_)))
        ));
        Ok(())
    }
}
