//! Relays the event log to NATS JetStream, for systems that want Gatehouse's events without
//! reading its database.
//!
//! # What is published
//!
//! Every event (or those passing the configured [`EventFilter`]) goes to the stream
//! [`STREAM`] on `gatehouse.<tenant>.<stream type>.<event type>` (see [`subject`]), its body
//! the JSON of the [`RecordedEvent`] envelope, with the header `Nats-Msg-Id` set to the event
//! id. The relay creates the stream when it is missing (subjects `gatehouse.>`, file storage,
//! a [`DUPLICATE_WINDOW`] of two minutes); a stream an operator created first is used as it
//! is. (Risk detections are also published, at most once, on `risk.<tenant>.detection`:
//! outside `gatehouse.>`, so the stream holds envelopes only.)
//!
//! # Guarantees
//!
//! At least once, in log order, with no loss across restarts of the relay or of NATS. The
//! relay follows the log from a checkpoint kept in the store ([`CHECKPOINT`]); for each batch
//! it publishes every event, waits for every JetStream acknowledgement (a stored message), and
//! only then moves the checkpoint. Any failure (NATS down, an acknowledgement that does not
//! come, the store) drops the connection and starts again from the checkpoint, so an event is
//! never skipped; events published but not yet checkpointed are published again, and
//! JetStream drops those repeats by `Nats-Msg-Id` when they come within the duplicate window.
//! A repeat outside the window (NATS down or unreachable for longer than it, after storing a
//! message whose acknowledgement was lost) is stored twice: consumers that must see each
//! event once deduplicate by the `Nats-Msg-Id` header, which is the event id.
//!
//! Every replica started with `--relay-events` relays, sharing the one checkpoint: that is
//! safe (repeats are dropped by id) but does the work once per replica, so enable it on one.
//! Changing the filter does not revisit events the checkpoint has passed. An event NATS
//! refuses (larger than the server's `max_payload`) stops the relay at that event, retrying
//! and logging, rather than skip it.

use futures::StreamExt;
use gatehouse_events::subscription::{COMMIT_EVERY, at_most_every, subscribe_batches};
use gatehouse_events::{EventFilter, EventStore, Position, RecordedEvent};
use std::sync::Arc;
use std::time::Duration;

/// The JetStream stream events are published to.
pub const STREAM: &str = "GATEHOUSE_EVENTS";
/// The relay's checkpoint in the store.
pub const CHECKPOINT: &str = "relay:nats";
/// How long JetStream remembers a `Nats-Msg-Id` to drop a repeat of it (the stream's
/// `duplicate_window`, set when the relay creates the stream). Long enough to cover a
/// reconnect and the republication of a batch; every id held costs server memory.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// First wait before reconnecting; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Runs the relay until the task is dropped: connects to the NATS server at `url`, ensures
/// the stream, and publishes the log from the checkpoint, reconnecting after any failure.
pub async fn run(store: Arc<dyn EventStore>, url: String, filter: EventFilter) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        if let Err(error) = relay(&store, &url, &filter, &mut backoff).await {
            tracing::warn!(%error, nats = %url, retry_in = ?backoff, "event relay to NATS interrupted; resuming from its checkpoint");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One connection's worth of relaying; returns only with the failure that ended it.
async fn relay(
    store: &Arc<dyn EventStore>,
    url: &str,
    filter: &EventFilter,
    backoff: &mut Duration,
) -> anyhow::Result<()> {
    let client = async_nats::ConnectOptions::new()
        .name("gatehouse event relay")
        .connect(url)
        .await?;
    let jetstream = async_nats::jetstream::new(client);
    jetstream
        .get_or_create_stream(async_nats::jetstream::stream::Config {
            name: STREAM.into(),
            subjects: vec!["gatehouse.>".into()],
            storage: async_nats::jetstream::stream::StorageType::File,
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        })
        .await?;
    let mut saved: Position = store.load_checkpoint(CHECKPOINT).await?.unwrap_or(0);
    tracing::info!(nats = %url, after = saved, "event relay to NATS connected");
    *backoff = FIRST_BACKOFF;
    let mut batches = Box::pin(at_most_every(
        subscribe_batches(store.clone(), saved, filter.clone()),
        COMMIT_EVERY,
    ));
    while let Some(batch) = batches.next().await {
        let batch = batch?;
        // Everything first, then the acknowledgements: one round trip per batch, not per event.
        let mut acks = Vec::with_capacity(batch.events.len());
        for event in &batch.events {
            let body = serde_json::to_vec(event)?;
            let message = async_nats::jetstream::context::Publish::build()
                .payload(body.into())
                .message_id(event.id.to_string());
            acks.push(jetstream.send_publish(subject(event), message).await?);
        }
        for ack in acks {
            ack.await?;
        }
        if batch.next > saved {
            store.save_checkpoint(CHECKPOINT, batch.next).await?;
            saved = batch.next;
        }
    }
    anyhow::bail!("the log subscription ended")
}

/// The subject of an event: `gatehouse.<tenant>.<stream type>.<event type>`, each part a
/// single [`token`].
pub fn subject(event: &RecordedEvent) -> String {
    format!(
        "gatehouse.{}.{}.{}",
        event.tenant_id,
        token(&event.stream.kind),
        token(&event.event_type)
    )
}

/// `text` as one subject token: `.` (the separator), the wildcards `*` and `>`, whitespace
/// and anything but printable ASCII become `_` (NATS compares subjects byte by byte, and
/// clients differ on what else they accept); an empty text is `_`.
pub fn token(text: &str) -> String {
    if text.is_empty() {
        return "_".into();
    }
    text.chars()
        .map(|c| {
            if c.is_ascii_graphic() && !matches!(c, '.' | '*' | '>') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use gatehouse_events::StreamId;
    use uuid::Uuid;

    #[test]
    fn a_token_keeps_ordinary_names() {
        assert_eq!(token("user"), "user");
        assert_eq!(token("UserSignedUp"), "UserSignedUp");
        assert_eq!(token("sign_in-flow:2"), "sign_in-flow:2");
    }

    #[test]
    fn separators_wildcards_whitespace_and_unprintables_become_underscores() {
        assert_eq!(token("a.b"), "a_b");
        assert_eq!(token("*"), "_");
        assert_eq!(token("a>"), "a_");
        assert_eq!(token("two words\tand\nlines"), "two_words_and_lines");
        assert_eq!(token("bell\u{7}nul\u{0}del\u{7f}"), "bell_nul_del_");
        assert_eq!(token("café"), "caf_");
        assert_eq!(token(""), "_");
    }

    #[test]
    fn the_subject_names_tenant_stream_type_and_event_type() {
        let tenant = Uuid::now_v7();
        let mut event = RecordedEvent::pending(
            tenant,
            StreamId::new("user", Uuid::now_v7()),
            Default::default(),
        );
        event.event_type = "UserSignedUp".into();
        assert_eq!(
            subject(&event),
            format!("gatehouse.{tenant}.user.UserSignedUp")
        );
        event.stream.kind = "odd.kind *".into();
        event.event_type = "Odd>Type".into();
        assert_eq!(
            subject(&event),
            format!("gatehouse.{tenant}.odd_kind__.Odd_Type")
        );
    }
}
