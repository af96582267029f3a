//! The event relay to NATS JetStream against a real `nats-server` the test runs itself (so it
//! can stop and restart it): every event of the log arrives in stream `GATEHOUSE_EVENTS`
//! exactly once per `Nats-Msg-Id` (its event id), on `gatehouse.<tenant>.<stream
//! type>.<event type>` with the envelope as its body, across a restart of the relay (the
//! server killed right after appends, its checkpoint rewound as if it had died before saving
//! it, so everything is published again) and a restart of NATS (users created while it is
//! down for longer than an acknowledgement's timeout); and a downstream pull consumer on
//! `gatehouse.*.user.*` reads exactly the user streams' events.
//! SQLite always; PostgreSQL when configured. Needs `/usr/sbin/nats-server`.

use crate::support;

use async_nats::jetstream::{self, consumer, stream::Stream as JsStream};
use futures::StreamExt;
use gatehouse_events::{EventFilter, EventStore, RecordedEvent};
use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::world::{World, connect};
use support::{Error, Server, TestResult};

const NATS_SERVER: &str = "/usr/sbin/nats-server";
const STREAM: &str = "GATEHOUSE_EVENTS";
/// The header the relay sets. Lookups use `async_nats::header::NATS_MESSAGE_ID`: async-nats
/// parses well-known headers into typed names, and a lookup by this string finds nothing.
const MSG_ID: &str = "Nats-Msg-Id";
/// Users the scenario creates, over all its phases.
const USERS: usize = 45;

/// A `nats-server` with JetStream on a fixed port and store directory; killed when dropped.
struct Nats {
    child: Child,
    port: u16,
}

impl Nats {
    /// Starts it and waits until it accepts connections.
    fn start(port: u16, store: &Path, log: &Path) -> Result<Nats, Error> {
        if !Path::new(NATS_SERVER).exists() {
            return Err(format!(
                "{NATS_SERVER} is missing: the relay test runs its own NATS server (install nats-server)"
            )
            .into());
        }
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let child = Command::new(NATS_SERVER)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(store)
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()?;
        let mut nats = Nats { child, port };
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = nats.child.try_wait()? {
                return Err(
                    format!("nats-server exited with {status}; see {}", log.display()).into(),
                );
            }
            if Instant::now() > deadline {
                return Err(format!("nats-server not listening; see {}", log.display()).into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(nats)
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops it the way an operator would (SIGTERM) and waits for it to exit.
    fn stop(&mut self) -> TestResult {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()?;
        if !status.success() {
            return Err("kill -TERM nats-server failed".into());
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                return Err("nats-server did not stop on SIGTERM".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16, Error> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn jetstream_at(url: &str) -> Result<jetstream::Context, Error> {
    let client = async_nats::connect(url)
        .await
        .map_err(|e| format!("NATS at {url}: {e}"))?;
    Ok(jetstream::new(client))
}

/// One message of the stream, as a downstream reader sees it.
#[derive(Debug)]
struct Relayed {
    subject: String,
    msg_id: Option<String>,
    body: serde_json::Value,
}

/// Every message stored in the stream, in stream order.
async fn stream_messages(js: &jetstream::Context) -> Result<Vec<Relayed>, Error> {
    let mut stream: JsStream = js.get_stream(STREAM).await?;
    let state = stream.info().await?.state.clone();
    let mut messages = Vec::new();
    if state.messages == 0 {
        return Ok(messages);
    }
    for sequence in state.first_sequence..=state.last_sequence {
        let message = stream.get_raw_message(sequence).await?;
        messages.push(Relayed {
            subject: message.subject.to_string(),
            msg_id: message
                .headers
                .get(async_nats::header::NATS_MESSAGE_ID)
                .map(|v| v.to_string()),
            body: serde_json::from_slice(&message.payload)?,
        });
    }
    if messages.len() as u64 != state.messages {
        return Err(format!(
            "stream state says {} messages, read {}",
            state.messages,
            messages.len()
        )
        .into());
    }
    Ok(messages)
}

async fn log_events(store: &Arc<dyn EventStore>) -> Result<Vec<RecordedEvent>, Error> {
    Ok(store
        .read_all(0, &EventFilter::default(), 1_000_000)
        .await?
        .events)
}

/// Waits (30 s at most) until the stream holds as many messages as the log has events, each
/// event id among them.
async fn wait_relayed(
    js: &jetstream::Context,
    store: &Arc<dyn EventStore>,
    when: &str,
) -> TestResult {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let events = log_events(store).await?;
        // NATS may still be recovering its streams after a restart: not readable yet.
        let seen = match stream_messages(js).await {
            Ok(messages) => {
                let ids: BTreeSet<String> =
                    messages.iter().filter_map(|m| m.msg_id.clone()).collect();
                if messages.len() >= events.len()
                    && events.iter().all(|e| ids.contains(&e.id.to_string()))
                {
                    return Ok(());
                }
                format!("{} messages", messages.len())
            }
            Err(error) => format!("stream not readable: {error}"),
        };
        if Instant::now() > deadline {
            return Err(format!(
                "{when}: the log has {} events, the stream {seen}",
                events.len()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn create_users(world: &World, phase: &str, n: usize) -> TestResult {
    for i in 0..n {
        world
            .create_user(&format!("{phase}{i}@example.com"), true)
            .await?;
    }
    Ok(())
}

/// The subject the relay must use for `event`.
fn subject_of(event: &RecordedEvent) -> String {
    format!(
        "gatehouse.{}.{}.{}",
        event.tenant_id, event.stream.kind, event.event_type
    )
}

/// Every event of the log is in the stream exactly once, on its subject, with its id as
/// `Nats-Msg-Id` and its envelope as the body; nothing else is there.
fn check_stream(events: &[RecordedEvent], messages: &[Relayed]) -> TestResult {
    let mut by_id: BTreeMap<String, usize> = BTreeMap::new();
    for message in messages {
        let id = message
            .msg_id
            .clone()
            .ok_or_else(|| format!("a message without {MSG_ID} on {}", message.subject))?;
        *by_id.entry(id).or_default() += 1;
    }
    let repeated: Vec<_> = by_id.iter().filter(|(_, n)| **n > 1).collect();
    if !repeated.is_empty() {
        return Err(format!("event ids stored more than once: {repeated:?}").into());
    }
    let log_ids: BTreeSet<String> = events.iter().map(|e| e.id.to_string()).collect();
    let stream_ids: BTreeSet<String> = by_id.into_keys().collect();
    if log_ids != stream_ids {
        return Err(format!(
            "missing from the stream: {:?}; in the stream but not the log: {:?}",
            log_ids.difference(&stream_ids).collect::<Vec<_>>(),
            stream_ids.difference(&log_ids).collect::<Vec<_>>()
        )
        .into());
    }
    if messages.len() != events.len() {
        return Err(format!("{} messages for {} events", messages.len(), events.len()).into());
    }
    let events: BTreeMap<String, &RecordedEvent> =
        events.iter().map(|e| (e.id.to_string(), e)).collect();
    for message in messages {
        let id = message.msg_id.as_deref().unwrap_or_default();
        let event = events.get(id).ok_or("an unknown id")?;
        if message.subject != subject_of(event) {
            return Err(format!(
                "event {id} on {}, expected {}",
                message.subject,
                subject_of(event)
            )
            .into());
        }
        if message.body != serde_json::to_value(event)? {
            return Err(format!(
                "event {id}: the body {} is not the envelope {event:?}",
                message.body
            )
            .into());
        }
    }
    Ok(())
}

/// A downstream service: a durable pull consumer on `gatehouse.*.user.*` reading everything
/// there is; the events it got.
async fn read_user_events(stream: &JsStream) -> Result<Vec<(String, RecordedEvent)>, Error> {
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("user-events".into()),
            filter_subject: "gatehouse.*.user.*".into(),
            deliver_policy: consumer::DeliverPolicy::All,
            ack_policy: consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    let mut got = Vec::new();
    loop {
        let mut batch = consumer
            .fetch()
            .max_messages(500)
            .expires(Duration::from_secs(1))
            .messages()
            .await?;
        let before = got.len();
        while let Some(message) = batch.next().await {
            let message = message?;
            let event: RecordedEvent = serde_json::from_slice(&message.payload)?;
            got.push((message.subject.to_string(), event));
            message.ack().await?;
        }
        if got.len() == before {
            return Ok(got);
        }
    }
}

async fn run_all(dir: &Path, database_url: Option<&str>) -> TestResult {
    let data = dir.join("data");
    let nats_store: PathBuf = dir.join("nats");
    let nats_log = dir.join("nats.log");
    let port = free_port()?;
    let mut nats = Nats::start(port, &nats_store, &nats_log)?;
    let nats_url = nats.url();
    let env = [
        ("GATEHOUSE_NATS_URL", nats_url.as_str()),
        ("GATEHOUSE_RELAY_EVENTS", "true"),
    ];
    let started = Instant::now();
    let server = Server::start_with_env(&data, database_url, &env)?;
    let admin = server.printed_admin_key().ok_or("no admin key")?;
    let world = World::new(&server, &admin).await?;
    let store_url = database_url.map_or_else(
        || format!("sqlite://{}", data.join("events.db").display()),
        str::to_string,
    );
    let store = gatehouse_events::connect(&store_url).await?;

    // Relayed as they happen.
    create_users(&world, "first", 10).await?;
    let js = jetstream_at(&nats_url).await?;
    wait_relayed(&js, &store, "while running").await?;

    // The relay killed mid-stream (SIGKILL right after the appends), then restarted. Its
    // checkpoint is rewound as if it had died after publishing but before saving it: the
    // whole log is published again, and must not be stored again.
    create_users(&world, "killed", 10).await?;
    drop(server);
    store.save_checkpoint("relay:nats", 0).await?;
    let server = Server::start_with_env(&data, database_url, &env)?;
    let world = World {
        channel: connect(&server).await?,
        http: server.http,
        ..world
    };
    create_users(&world, "restarted", 10).await?;
    wait_relayed(&js, &store, "after the relay's restart").await?;

    // NATS down while users sign up, then back on the same port and store.
    nats.stop()?;
    create_users(&world, "nats-down", 10).await?;
    // Longer than JetStream's 5 s wait for an acknowledgement: the relay gives up on the
    // publications in flight and reconnects (with backoff) until NATS is back.
    tokio::time::sleep(Duration::from_secs(7)).await;
    drop(nats);
    let _nats = Nats::start(port, &nats_store, &nats_log)?;
    create_users(&world, "nats-back", 5).await?;
    let js = jetstream_at(&nats_url).await?;
    wait_relayed(&js, &store, "after NATS's restart").await?;
    // Anything still in flight would show up as a repeat now.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let events = log_events(&store).await?;
    let messages = stream_messages(&js).await?;
    check_stream(&events, &messages)?;
    let last = events.last().map(|e| e.position).ok_or("an empty log")?;
    let checkpoint = store.load_checkpoint("relay:nats").await?.unwrap_or(0);
    if checkpoint < last {
        return Err(
            format!("the relay's checkpoint {checkpoint} is behind the log's end {last}").into(),
        );
    }

    // A downstream consumer of the users' events gets each of them once, and nothing else.
    let stream = js.get_stream(STREAM).await?;
    let read = read_user_events(&stream).await?;
    let expected: BTreeSet<String> = events
        .iter()
        .filter(|e| e.stream.kind == "user")
        .map(|e| e.id.to_string())
        .collect();
    let got: BTreeSet<String> = read.iter().map(|(_, e)| e.id.to_string()).collect();
    if got != expected || read.len() != expected.len() {
        return Err(format!(
            "the consumer read {} messages ({} ids), the log has {} user events",
            read.len(),
            got.len(),
            expected.len()
        )
        .into());
    }
    if let Some((subject, event)) = read
        .iter()
        .find(|(subject, event)| event.stream.kind != "user" || *subject != subject_of(event))
    {
        return Err(format!("the consumer read {event:?} on {subject}").into());
    }
    let created = read
        .iter()
        .filter(|(_, e)| e.event_type == "UserCreated")
        .count();
    if created != USERS {
        return Err(
            format!("the consumer read {created} UserCreated, {USERS} users were created").into(),
        );
    }
    eprintln!(
        "relayed {} events ({} of user streams) in {:?}",
        events.len(),
        read.len(),
        started.elapsed()
    );
    server.stop()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_event_is_relayed_once_across_restarts_on_sqlite() -> TestResult {
    let dir = tempfile::tempdir()?;
    run_all(dir.path(), None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_event_is_relayed_once_across_restarts_on_postgres() -> TestResult {
    let Some(url) = support::postgres_url().await? else {
        eprintln!("GATEHOUSE_TEST_DATABASE_URL not set: PostgreSQL run skipped");
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    run_all(dir.path(), Some(&url)).await
}
