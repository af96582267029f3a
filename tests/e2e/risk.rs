//! Identity Protection's offline detector against the running server: 30 wrong passwords on
//! one account are one `brute_force` detection, failed passwords against 50 accounts from
//! one network one `password_spray`, an ordinary user's typo nothing; the detections name
//! the events that caused them; and a restarted server (whose detector resumes from its
//! checkpoint) records no detection twice and misses none that straddles the restart. SQLite always; PostgreSQL
//! when configured.

use crate::support;

use gatehouse_events::{EventFilter, EventStore, RecordedEvent};
use gatehouse_proto::v1 as pb;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::world::{PASSWORD, World, completed, connect, connect_from};
use support::{Error, Server, TestResult, detections};

/// Waits (15 s at most) until `done` holds for the recorded detections.
async fn wait_for(
    store: &Arc<dyn EventStore>,
    what: &str,
    done: impl Fn(&[(RecordedEvent, serde_json::Value)]) -> bool,
) -> Result<Vec<(RecordedEvent, serde_json::Value)>, Error> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let found = detections(store).await?;
        if done(&found) {
            return Ok(found);
        }
        if Instant::now() > deadline {
            return Err(format!("{what}: detections are {found:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn of_kind<'a>(
    found: &'a [(RecordedEvent, serde_json::Value)],
    kind: &str,
) -> Vec<&'a serde_json::Value> {
    found
        .iter()
        .map(|(_, payload)| payload)
        .filter(|p| p["kind"] == kind)
        .collect()
}

/// `n` wrong passwords, each in its own flow (refusals and lockouts are the point).
async fn wrong_passwords(world: &World, email: &str, n: usize) -> TestResult {
    for _ in 0..n {
        let flow = world.start(email, pb::PrimaryMethod::Password).await?;
        let _refused = world.password(&flow, "not the password").await;
    }
    Ok(())
}

async fn run_all(data: &Path, database_url: Option<&str>) -> TestResult {
    let server = Server::start(data, database_url)?;
    let admin = server.printed_admin_key().ok_or("no admin key")?;
    let world = World::new(&server, &admin).await?;
    let url = database_url.map_or_else(
        || format!("sqlite://{}", data.join("events.db").display()),
        str::to_string,
    );
    let store = gatehouse_events::connect(&url).await?;
    let alice = world.create_user("alice@example.com", true).await?;
    let bob = world.create_user("bob@example.com", true).await?;
    world.create_user("dave@example.com", true).await?;

    // An ordinary user: a typo, then the right password.
    wrong_passwords(&world, "bob@example.com", 1).await?;
    completed(
        &world
            .password(
                &world
                    .start("bob@example.com", pb::PrimaryMethod::Password)
                    .await?,
                PASSWORD,
            )
            .await?,
    )?;

    // Brute force: 30 wrong passwords on alice (most refused by the lockout unchecked).
    wrong_passwords(&world, "alice@example.com", 30).await?;
    // Spray: one wrong password for each of 50 addresses, from 127.0.0.55.
    let sprayer = World {
        channel: connect_from(&server, "127.0.0.55").await?,
        ..world.clone()
    };
    for i in 0..50 {
        wrong_passwords(&sprayer, &format!("victim{i}@example.org"), 1).await?;
    }
    let found = wait_for(&store, "brute force and spray", |found| {
        !of_kind(found, "brute_force").is_empty() && !of_kind(found, "password_spray").is_empty()
    })
    .await?;
    let brute = of_kind(&found, "brute_force");
    let [brute] = brute.as_slice() else {
        return Err(format!("expected one brute force, got {brute:?}").into());
    };
    if brute["user_id"] != alice.as_str()
        || brute["level"] != "medium"
        || brute["timing"] != "offline"
    {
        return Err(format!("brute force detection: {brute}").into());
    }
    let spray = of_kind(&found, "password_spray");
    let [spray] = spray.as_slice() else {
        return Err(format!("expected one spray, got {spray:?}").into());
    };
    if spray["source"] != "127.0.0.0/24" || spray["level"] != "high" {
        return Err(format!("spray detection: {spray}").into());
    }
    // The evidence names real events: failed passwords of sign-in flows.
    for detection in [brute, spray] {
        let evidence = detection["evidence"].as_array().ok_or("no evidence")?;
        if evidence.len() < 20 {
            return Err(format!("thin evidence: {detection}").into());
        }
        for item in evidence {
            let position = item["position"].as_u64().ok_or("position")?;
            let batch = store
                .read_all(position - 1, &EventFilter::default(), 1)
                .await?;
            let event = batch.events.first().ok_or("evidence not in the log")?;
            if event.event_type != "PasswordRejected"
                || event.id.to_string() != item["event_id"].as_str().unwrap_or_default()
            {
                return Err(format!("evidence {item} is {event:?}").into());
            }
        }
    }
    if found.iter().any(|(_, p)| p["user_id"] == bob.as_str()) {
        return Err("an ordinary user's typo was reported".into());
    }

    // Half an attack on dave, a restart, the other half. The detector restarts from its
    // checkpoint (waited for here: it covers dave's first half), so the first half is known
    // only through the checkpoint's state — the detection proves it was restored.
    wrong_passwords(&world, "dave@example.com", 10).await?;
    let failures = EventFilter {
        event_types: vec!["PasswordRejected".into()],
        ..EventFilter::default()
    };
    let last_failure = store
        .read_all(0, &failures, 100_000)
        .await?
        .events
        .last()
        .map(|e| e.position)
        .ok_or("no failures")?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let checkpoint = store
            .load_snapshot(&gatehouse_risk::detector::checkpoint_stream())
            .await?;
        if checkpoint.is_some_and(|(position, _)| position >= last_failure) {
            break;
        }
        if Instant::now() > deadline {
            return Err("the detector saved no checkpoint covering the attack".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    server.stop()?;
    let server = Server::start(data, database_url)?;
    let world = World {
        channel: connect(&server).await?,
        http: server.http,
        ..world
    };
    wrong_passwords(&world, "dave@example.com", 10).await?;
    let found = wait_for(&store, "brute force across the restart", |found| {
        of_kind(found, "brute_force").len() >= 2
    })
    .await?;
    // The replay re-found alice's and the spray: recorded once each all the same.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let found_again = detections(&store).await?;
    if found_again.len() != found.len() || of_kind(&found_again, "password_spray").len() != 1 {
        return Err(format!("duplicates after the restart: {found_again:?}").into());
    }
    let brute = of_kind(&found_again, "brute_force");
    if brute.len() != 2 || !brute.iter().any(|d| d["user_id"] == alice.as_str()) {
        return Err(format!("brute force after the restart: {brute:?}").into());
    }
    server.stop()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn offline_detections_on_sqlite() -> TestResult {
    let dir = tempfile::tempdir()?;
    run_all(dir.path(), None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn offline_detections_on_postgres() -> TestResult {
    let Some(url) = support::postgres_url().await? else {
        eprintln!("GATEHOUSE_TEST_DATABASE_URL not set: PostgreSQL run skipped");
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    run_all(dir.path(), Some(&url)).await
}
