//! Delivers the users' notifications (codes, notices) from the log.
//!
//! The outbox is the log: a notification is a `NotificationRequested` event appended with
//! the command that caused it, so no code is lost if the process dies after the append. This
//! checkpointed subscriber opens each message with the user's key (skipping users erased
//! since), hands it to a [`Sender`], retries with backoff until it is delivered, and only then
//! moves its checkpoint. Senders deduplicate by event id, so a redelivery after a crash
//! between delivery and checkpoint reaches nobody twice.

use crate::user::{Channel, Message, User, UserEvent};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use gatehouse_core::crypto::Crypto;
use gatehouse_events::subscription::subscribe_batches;
use gatehouse_events::{
    Aggregate, DomainEvent, EventFilter, EventStore, RecordedEvent, StoreError,
};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uuid::Uuid;

/// Name of the notifier's checkpoint.
pub const CHECKPOINT: &str = "notifier";

/// One message to deliver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// The event id (the deduplication key).
    pub id: Uuid,
    /// Email or SMS.
    pub channel: Channel,
    /// Recipient.
    pub to: String,
    /// Subject (email).
    pub subject: String,
    /// Text.
    pub body: String,
    /// The code it carries, if any.
    pub code: Option<String>,
    /// The user's tenant.
    pub tenant_id: Uuid,
    /// The user.
    pub user_id: Uuid,
    /// When it was requested.
    pub created_at: DateTime<Utc>,
}

/// Where messages go: SMTP, an SMS webhook, or a file.
#[async_trait::async_trait]
pub trait Sender: Send + Sync + 'static {
    /// Delivers once; delivering an id already delivered does nothing.
    async fn send(&self, delivery: &Delivery) -> Result<(), String>;
}

/// The embedded-mode sender: one JSON line per message in `<data>/outbox.ndjson`, where a
/// person or a test can read the code.
pub struct NdjsonOutbox {
    path: PathBuf,
    delivered: Mutex<HashSet<Uuid>>,
}

impl NdjsonOutbox {
    /// Opens (or will create) the file, remembering the ids already in it.
    pub fn open(path: PathBuf) -> std::io::Result<Self> {
        let mut delivered = HashSet::new();
        match std::fs::File::open(&path) {
            Ok(file) => {
                for line in std::io::BufReader::new(file).lines() {
                    if let Ok(delivery) = serde_json::from_str::<Delivery>(&line?) {
                        delivered.insert(delivery.id);
                    }
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
        Ok(NdjsonOutbox {
            path,
            delivered: Mutex::new(delivered),
        })
    }
}

#[async_trait::async_trait]
impl Sender for NdjsonOutbox {
    async fn send(&self, delivery: &Delivery) -> Result<(), String> {
        let mut delivered = self
            .delivered
            .lock()
            .map_err(|_| "outbox lock poisoned".to_string())?;
        if delivered.contains(&delivery.id) {
            return Ok(());
        }
        let mut line = serde_json::to_string(delivery).map_err(|e| e.to_string())?;
        line.push('\n');
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        file.write_all(line.as_bytes())
            .and_then(|()| file.sync_data())
            .map_err(|e| e.to_string())?;
        delivered.insert(delivery.id);
        Ok(())
    }
}

/// Runs the notifier until the task is dropped.
pub async fn run(store: Arc<dyn EventStore>, crypto: Arc<Crypto>, sender: Arc<dyn Sender>) {
    loop {
        if let Err(error) = deliver_all(&store, &crypto, sender.as_ref()).await {
            tracing::warn!(%error, "notifier stopped; resuming from its checkpoint");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn deliver_all(
    store: &Arc<dyn EventStore>,
    crypto: &Crypto,
    sender: &dyn Sender,
) -> Result<(), StoreError> {
    let after = store.load_checkpoint(CHECKPOINT).await?.unwrap_or(0);
    let filter = EventFilter {
        stream_types: vec![User::STREAM_TYPE.into()],
        event_types: vec!["NotificationRequested".into()],
        ..EventFilter::default()
    };
    let mut batches = Box::pin(subscribe_batches(store.clone(), after, filter));
    while let Some(batch) = batches.next().await {
        let batch = batch?;
        for event in &batch.events {
            deliver(crypto, sender, event).await?;
        }
        store.save_checkpoint(CHECKPOINT, batch.next).await?;
    }
    Ok(())
}

/// Delivers one notification, retrying with backoff until the sender takes it.
async fn deliver(
    crypto: &Crypto,
    sender: &dyn Sender,
    event: &RecordedEvent,
) -> Result<(), StoreError> {
    let Ok(UserEvent::NotificationRequested { channel, message }) = UserEvent::decode(event) else {
        return Ok(());
    };
    let user_id = event.stream.id;
    let message: Message = match crypto.open(user_id, &message).await {
        Ok(Some(message)) => message,
        // Erased since: there is nobody to tell, and nothing readable to send.
        Ok(None) => return Ok(()),
        Err(error) => {
            tracing::error!(%error, event = %event.id, "cannot open a notification; skipped");
            return Ok(());
        }
    };
    let delivery = Delivery {
        id: event.id,
        channel,
        to: message.to,
        subject: message.subject,
        body: message.body,
        code: message.code,
        tenant_id: event.tenant_id,
        user_id,
        created_at: event.recorded_at,
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        match sender.send(&delivery).await {
            Ok(()) => return Ok(()),
            Err(error) => {
                tracing::warn!(%error, event = %event.id, ?backoff, "delivery failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        }
    }
}

/// Email over SMTP. `url` as lettre reads it: `smtp://user:password@host:587?tls=required`,
/// `smtps://…` (implicit TLS), or `smtp://host:port` for a local relay without TLS.
pub struct SmtpSender {
    transport: lettre::AsyncSmtpTransport<lettre::Tokio1Executor>,
    from: lettre::message::Mailbox,
}

impl SmtpSender {
    /// A sender through the SMTP server at `url`, from the address `from`.
    pub fn new(url: &str, from: &str) -> Result<Self, String> {
        let transport = lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::from_url(url)
            .map_err(|e| format!("SMTP URL: {e}"))?
            .timeout(Some(Duration::from_secs(20)))
            .build();
        let from = from
            .parse()
            .map_err(|e| format!("SMTP from address: {e}"))?;
        Ok(SmtpSender { transport, from })
    }
}

#[async_trait::async_trait]
impl Sender for SmtpSender {
    async fn send(&self, delivery: &Delivery) -> Result<(), String> {
        use lettre::AsyncTransport;
        let to = delivery.to.parse().map_err(|e| format!("recipient: {e}"))?;
        let email = lettre::Message::builder()
            .from(self.from.clone())
            .to(to)
            // The event id: receivers can drop a redelivery after a crash.
            .message_id(Some(format!("<{}@gatehouse>", delivery.id)))
            .subject(delivery.subject.clone())
            .body(delivery.body.clone())
            .map_err(|e| e.to_string())?;
        self.transport
            .send(email)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

/// SMS through an HTTP webhook: a JSON `POST` of `{id, to, body, tenant_id}` with an
/// `Idempotency-Key` header (the event id); any 2xx answer counts as delivered.
pub struct WebhookSender {
    client: reqwest::Client,
    url: String,
}

impl WebhookSender {
    /// A sender posting to `url`.
    pub fn new(url: &str) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| e.to_string())?;
        reqwest::Url::parse(url).map_err(|e| format!("SMS webhook URL: {e}"))?;
        Ok(WebhookSender {
            client,
            url: url.to_string(),
        })
    }
}

#[async_trait::async_trait]
impl Sender for WebhookSender {
    async fn send(&self, delivery: &Delivery) -> Result<(), String> {
        let body = serde_json::json!({
            "id": delivery.id,
            "to": delivery.to,
            "body": delivery.body,
            "tenant_id": delivery.tenant_id,
        });
        let response = self
            .client
            .post(&self.url)
            .header("Idempotency-Key", delivery.id.to_string())
            .json(&body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("SMS webhook answered {}", response.status()))
        }
    }
}

/// Sends each channel through its own sender.
pub struct ByChannel {
    /// For email.
    pub email: Arc<dyn Sender>,
    /// For SMS.
    pub sms: Arc<dyn Sender>,
}

#[async_trait::async_trait]
impl Sender for ByChannel {
    async fn send(&self, delivery: &Delivery) -> Result<(), String> {
        match delivery.channel {
            Channel::Email => self.email.send(delivery).await,
            Channel::Sms => self.sms.send(delivery).await,
        }
    }
}
