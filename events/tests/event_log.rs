//! The event log's guarantees, on every backend available to the run (SQLite always,
//! PostgreSQL when `GATEHOUSE_TEST_DATABASE_URL` is set).

use futures::StreamExt;
use gatehouse_events::store::StreamBounds;
use gatehouse_events::testing::{self, TestStore};
use gatehouse_events::{
    AppendRequest, ClaimKey, EventFilter, EventStore, ExpectedVersion, Metadata, NewEvent,
    RecordedEvent, StoreError, StreamId, subscribe,
};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn event(tenant: Uuid, stream: &StreamId, n: usize) -> NewEvent {
    testing::counted(tenant, stream, n as u64)
}

fn append_of(events: impl IntoIterator<Item = NewEvent>) -> AppendRequest {
    let mut request = AppendRequest::new(Metadata::system());
    for e in events {
        request.push(e);
    }
    request
}

/// Collects events from a subscription until `count` have arrived (or a generous timeout).
async fn collect(
    store: Arc<dyn EventStore>,
    after: u64,
    filter: EventFilter,
    count: usize,
) -> Result<Vec<RecordedEvent>, StoreError> {
    let mut stream = Box::pin(subscribe(store, after, filter));
    let mut seen = Vec::new();
    while seen.len() < count {
        match tokio::time::timeout(Duration::from_secs(60), stream.next()).await {
            Ok(Some(event)) => seen.push(event?),
            Ok(None) => break,
            Err(_) => {
                return Err(StoreError::Backend(format!(
                    "timed out after {} of {count} events",
                    seen.len()
                )));
            }
        }
    }
    Ok(seen)
}

fn assert_strictly_increasing(events: &[RecordedEvent], backend: &str) {
    for pair in events.windows(2) {
        assert!(
            pair[0].position < pair[1].position,
            "{backend}: position {} followed by {}",
            pair[0].position,
            pair[1].position
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_never_lose_skip_or_reorder_an_event() -> TestResult {
    for TestStore { store, .. } in testing::all().await? {
        let backend = store.backend();
        let tenant = Uuid::now_v7();
        let shared: Vec<StreamId> = (0..3)
            .map(|_| StreamId::new("shared", Uuid::now_v7()))
            .collect();
        let writers = 8;
        let commands_per_writer = 250;

        // The subscriber runs while the writers write; it stops once it has seen as many
        // events as the writers were told were appended (checked below).
        let (total_tx, total_rx) = tokio::sync::oneshot::channel::<usize>();
        let subscriber = {
            let store = store.clone();
            tokio::spawn(async move {
                let mut stream = Box::pin(subscribe(store, 0, EventFilter::default()));
                let mut seen: Vec<RecordedEvent> = Vec::new();
                let mut total_rx = total_rx;
                let mut total: Option<usize> = None;
                loop {
                    if total.is_some_and(|t| seen.len() >= t) {
                        // Anything beyond the total would be a duplicate or an invention.
                        if let Ok(Some(extra)) =
                            tokio::time::timeout(Duration::from_millis(300), stream.next()).await
                        {
                            seen.push(extra?);
                        }
                        return Ok::<_, StoreError>(seen);
                    }
                    tokio::select! {
                        t = &mut total_rx, if total.is_none() => total = t.ok(),
                        next = tokio::time::timeout(Duration::from_secs(60), stream.next()) => match next {
                            Ok(Some(event)) => seen.push(event?),
                            _ => return Err(StoreError::Backend(format!("subscriber stalled at {}", seen.len()))),
                        },
                    }
                }
            })
        };

        let mut handles = Vec::new();
        for writer in 0..writers {
            let store = store.clone();
            let shared = shared.clone();
            handles.push(tokio::spawn(async move {
                let own = StreamId::new("own", Uuid::now_v7());
                let mut own_version = 0;
                let mut acknowledged: Vec<Uuid> = Vec::new();
                for command in 0..commands_per_writer {
                    let size = 1 + (command + writer) % 5;
                    let result = if command % 3 == 0 {
                        // Overlapping streams, with an exact expected version: conflicts are
                        // expected and retried by reloading the version.
                        let stream = &shared[command % shared.len()];
                        gatehouse_events::retry::retry_on_conflict(50, || async {
                            let version = store
                                .read_stream(stream, StreamBounds::default())
                                .await?
                                .len() as u64;
                            let mut request =
                                append_of((0..size).map(|n| event(tenant, stream, n)));
                            request.expect(stream, ExpectedVersion::Exact(version));
                            store.append(request).await
                        })
                        .await
                    } else {
                        let mut request = append_of((0..size).map(|n| event(tenant, &own, n)));
                        request.expect(&own, ExpectedVersion::Exact(own_version));
                        store.append(request).await
                    };
                    match result {
                        Ok(outcome) => {
                            if command % 3 != 0 {
                                own_version += size as u64;
                            }
                            acknowledged.extend(outcome.events.iter().map(|e| e.0));
                        }
                        Err(StoreError::Conflict { .. }) => {}
                        Err(other) => return Err(other),
                    }
                }
                Ok(acknowledged)
            }));
        }
        let mut acknowledged = HashSet::new();
        for handle in handles {
            acknowledged.extend(handle.await??);
        }
        assert!(
            acknowledged.len() > 2000,
            "{backend}: only {} events appended",
            acknowledged.len()
        );
        let _ = total_tx.send(acknowledged.len());
        let seen = subscriber.await??;

        assert_strictly_increasing(&seen, backend);
        let ids: Vec<Uuid> = seen.iter().map(|e| e.id).collect();
        let unique: HashSet<Uuid> = ids.iter().copied().collect();
        assert_eq!(
            unique.len(),
            ids.len(),
            "{backend}: the subscriber saw an event twice"
        );
        assert_eq!(
            seen.len(),
            acknowledged.len(),
            "{backend}: seen vs acknowledged"
        );
        assert_eq!(
            unique, acknowledged,
            "{backend}: the subscriber saw other events than were acknowledged"
        );
        // Versions in each shared stream are dense: no lost write.
        for stream in &shared {
            let events = store.read_stream(stream, StreamBounds::default()).await?;
            for (i, e) in events.iter().enumerate() {
                assert_eq!(
                    e.version,
                    i as u64 + 1,
                    "{backend}: version gap in {stream}"
                );
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_two_conflicting_appends_exactly_one_wins() -> TestResult {
    for TestStore { store, .. } in testing::all().await? {
        let tenant = Uuid::now_v7();
        let stream = StreamId::new("account", Uuid::now_v7());
        store.append(append_of([event(tenant, &stream, 0)])).await?;
        let attempts = (0..16).map(|n| {
            let store = store.clone();
            let stream = stream.clone();
            tokio::spawn(async move {
                let mut request = append_of([event(tenant, &stream, n)]);
                request.expect(&stream, ExpectedVersion::Exact(1));
                store.append(request).await
            })
        });
        let results = futures::future::join_all(attempts).await;
        let mut wins = 0;
        for result in results {
            match result? {
                Ok(_) => wins += 1,
                Err(StoreError::Conflict {
                    stream: s,
                    expected: 1,
                    ..
                }) => assert_eq!(s, stream),
                Err(other) => panic!("{}: unexpected {other}", store.backend()),
            }
        }
        assert_eq!(wins, 1, "{}: exactly one append may win", store.backend());
        assert_eq!(
            store
                .read_stream(&stream, StreamBounds::default())
                .await?
                .len(),
            2
        );

        // A stale expectation is refused outright, and a stream that must not exist must not.
        let mut stale = append_of([event(tenant, &stream, 9)]);
        stale.expect(&stream, ExpectedVersion::Exact(0));
        assert!(matches!(
            store.append(stale).await,
            Err(StoreError::Conflict {
                actual: Some(2),
                ..
            })
        ));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_append_writes_nothing() -> TestResult {
    for TestStore { store, .. } in testing::all().await? {
        let tenant = Uuid::now_v7();
        let a = StreamId::new("a", Uuid::now_v7());
        let b = StreamId::new("b", Uuid::now_v7());
        store.append(append_of([event(tenant, &b, 0)])).await?;
        // Two streams in one append; the second's expectation is wrong.
        let mut request = append_of([event(tenant, &a, 1), event(tenant, &b, 2)]);
        request.expect(&b, ExpectedVersion::Exact(5));
        request.claim(
            &a,
            ClaimKey {
                tenant_id: tenant,
                scope: "email".into(),
                value: "x".into(),
            },
        );
        assert!(store.append(request).await.is_err());
        assert!(
            store
                .read_stream(&a, StreamBounds::default())
                .await?
                .is_empty()
        );
        assert_eq!(
            store.read_stream(&b, StreamBounds::default()).await?.len(),
            1
        );
        let key = ClaimKey {
            tenant_id: tenant,
            scope: "email".into(),
            value: "x".into(),
        };
        assert_eq!(
            store.claim_owner(&key).await?,
            None,
            "{}: claim leaked",
            store.backend()
        );
        assert!(matches!(
            store.append(AppendRequest::new(Metadata::system())).await,
            Err(StoreError::Invalid(_))
        ));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resumed_subscription_continues_without_loss_or_duplicates() -> TestResult {
    for test_store in testing::all().await? {
        let store = test_store.store.clone();
        let backend = store.backend();
        let tenant = Uuid::now_v7();
        let stream = StreamId::new("resume", Uuid::now_v7());
        for n in 0..120 {
            store.append(append_of([event(tenant, &stream, n)])).await?;
        }
        // First life: read 50, remember the last position, and stop.
        let first = collect(store.clone(), 0, EventFilter::default(), 50).await?;
        let saved = first.last().map(|e| e.position).unwrap_or(0);
        drop(store);

        // Second life: a new store (as after a process restart), more appends, resume.
        let store = test_store.reopen().await?;
        for n in 120..150 {
            store.append(append_of([event(tenant, &stream, n)])).await?;
        }
        let rest = collect(store.clone(), saved, EventFilter::default(), 100).await?;
        let all: Vec<RecordedEvent> = first.into_iter().chain(rest).collect();
        assert_strictly_increasing(&all, backend);
        let ns: Vec<u64> = all
            .iter()
            .filter_map(|e| e.payload_value().ok()?["n"].as_u64())
            .collect();
        assert_eq!(
            ns,
            (0..150).collect::<Vec<u64>>(),
            "{backend}: resumed stream lost or repeated events"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_unique_claim_goes_to_exactly_one_of_two_concurrent_sign_ups() -> TestResult {
    for TestStore { store, .. } in testing::all().await? {
        let backend = store.backend();
        let (tenant_a, tenant_b) = (Uuid::now_v7(), Uuid::now_v7());
        let email = |tenant| ClaimKey {
            tenant_id: tenant,
            scope: "email".into(),
            value: "ada@example.com".into(),
        };
        let sign_up = |tenant: Uuid| {
            let store = store.clone();
            tokio::spawn(async move {
                let user = StreamId::new("user", Uuid::now_v7());
                let mut request = append_of([event(tenant, &user, 0)]);
                request.expect(&user, ExpectedVersion::Exact(0));
                request.claim(&user, email(tenant));
                store.append(request).await.map(|_| user)
            })
        };
        let attempts = futures::future::join_all((0..8).map(|_| sign_up(tenant_a))).await;
        let mut winners = Vec::new();
        for attempt in attempts {
            match attempt? {
                Ok(user) => winners.push(user),
                Err(StoreError::ClaimTaken { scope }) => assert_eq!(scope, "email"),
                Err(other) => panic!("{backend}: unexpected {other}"),
            }
        }
        assert_eq!(
            winners.len(),
            1,
            "{backend}: exactly one sign-up may take the email"
        );
        assert_eq!(
            store.claim_owner(&email(tenant_a)).await?,
            Some(winners[0].clone())
        );

        // Another tenant may hold the same email.
        let other = sign_up(tenant_b).await??;
        assert_eq!(store.claim_owner(&email(tenant_b)).await?, Some(other));

        // Releasing with the append frees it for the next owner.
        let mut release = append_of([event(tenant_a, &winners[0], 1)]);
        release.release(&winners[0], email(tenant_a));
        store.append(release).await?;
        assert_eq!(store.claim_owner(&email(tenant_a)).await?, None);
        sign_up(tenant_a).await??;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_reads_back_up_to_a_position_or_time() -> TestResult {
    for TestStore { store, .. } in testing::all().await? {
        let tenant = Uuid::now_v7();
        let stream = StreamId::new("history", Uuid::now_v7());
        let start = chrono::Utc::now() - chrono::Duration::hours(3);
        let mut positions = Vec::new();
        for n in 0..3 {
            let mut request = append_of([event(tenant, &stream, n)]);
            request.recorded_at(start + chrono::Duration::hours(n as i64));
            positions.push(store.append(request).await?.last_position());
        }
        let up_to_second = StreamBounds {
            up_to_position: Some(positions[1]),
            ..Default::default()
        };
        assert_eq!(store.read_stream(&stream, up_to_second).await?.len(), 2);
        let first_hour = StreamBounds {
            up_to_time: Some(start + chrono::Duration::minutes(30)),
            ..Default::default()
        };
        assert_eq!(store.read_stream(&stream, first_hour).await?.len(), 1);
        let tenant_only = EventFilter {
            tenant_id: Some(tenant),
            ..Default::default()
        };
        let batch = store.read_all(0, &tenant_only, 100).await?;
        assert_eq!(batch.events.len(), 3);
        assert!(batch.next >= positions[2]);
        let other_type = EventFilter {
            event_types: vec!["Other".into()],
            ..Default::default()
        };
        assert!(store.read_all(0, &other_type, 100).await?.events.is_empty());
    }
    Ok(())
}

/// Live subscriptions share one reader of the log (the tail). A subscriber that falls far
/// behind it (more batches than the tail keeps) and one that starts late with a filter both
/// still see every event once, in order: gaps are bridged by reading the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscribers_sharing_the_tail_lose_nothing_when_they_lag() -> TestResult {
    for test_store in testing::all().await? {
        let store = test_store.store.clone();
        let backend = store.backend();
        let tenant = Uuid::now_v7();
        let (odd, even) = (
            StreamId::new("odd", Uuid::now_v7()),
            StreamId::new("even", Uuid::now_v7()),
        );
        store.append(append_of([event(tenant, &even, 0)])).await?;
        // A slow subscriber: caught up and following the tail (its next() is waiting), then
        // not read while 799 appends go by, far more batches than the tail keeps.
        let mut slow = Box::pin(subscribe(store.clone(), 0, EventFilter::default()));
        let mut slow_seen = vec![slow.next().await.ok_or("no first event")??];
        let waiting = tokio::time::timeout(Duration::from_millis(200), slow.next()).await;
        assert!(
            waiting.is_err(),
            "{backend}: an event before any was appended"
        );
        // A fast one keeps the tail running and busy.
        let fast = tokio::spawn(collect(store.clone(), 0, EventFilter::default(), 800));
        for n in 1..800 {
            let stream = if n % 2 == 0 { &even } else { &odd };
            store.append(append_of([event(tenant, stream, n)])).await?;
        }
        let fast = fast.await??;
        let late = collect(
            store.clone(),
            0,
            EventFilter {
                stream_types: vec!["odd".into()],
                ..EventFilter::default()
            },
            400,
        )
        .await?;
        while slow_seen.len() < 800 {
            match tokio::time::timeout(Duration::from_secs(60), slow.next()).await {
                Ok(Some(event)) => slow_seen.push(event?),
                _ => break,
            }
        }
        for (name, seen, expected) in [
            ("fast", &fast, (0..800).collect::<Vec<u64>>()),
            ("slow", &slow_seen, (0..800).collect()),
            ("late odd", &late, (0..800).filter(|n| n % 2 == 1).collect()),
        ] {
            assert_strictly_increasing(seen, backend);
            let ns: Vec<u64> = seen
                .iter()
                .filter_map(|e| e.payload_value().ok()?["n"].as_u64())
                .collect();
            assert_eq!(
                ns, expected,
                "{backend}: {name} subscriber lost or repeated events"
            );
        }
    }
    Ok(())
}
