//! PostgreSQL only: a transaction that started earlier but commits later must not be skipped.
//! Runs when `GATEHOUSE_TEST_DATABASE_URL` is set.

use futures::StreamExt;
use gatehouse_events::testing;
use gatehouse_events::{AppendRequest, EventFilter, Metadata, StreamId, subscribe};
use sqlx::{Connection, Row};
use std::time::Duration;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_earlier_transaction_committing_late_is_delivered_before_later_ones()
-> Result<(), Box<dyn std::error::Error>> {
    let Some(test_store) = testing::postgres().await? else {
        return Ok(());
    };
    let store = test_store.store.clone();
    let tenant = Uuid::now_v7();

    // A writer that has appended but not committed yet.
    let mut slow = sqlx::PgConnection::connect(&test_store.url).await?;
    let mut slow_tx = slow.begin().await?;
    let row = sqlx::query(
        "SELECT (gatehouse_append(ARRAY[1], ARRAY[1], ARRAY[0], ARRAY[0], ARRAY[now()], ARRAY[$4::uuid], \
         ARRAY[NULL::uuid], ARRAY['system'], ARRAY[NULL::text], ARRAY[NULL::text], ARRAY['slow'], ARRAY[$1::uuid], ARRAY[-1::bigint], \
         ARRAY[1], ARRAY[1], ARRAY[$2::uuid], ARRAY[$3::uuid], ARRAY['Counted'], ARRAY[1], ARRAY['{\"n\":0}'], \
         '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}'))[1]",
    )
    .bind(Uuid::now_v7())
    .bind(Uuid::now_v7())
    .bind(tenant)
    .bind(Uuid::now_v7())
    .fetch_one(&mut *slow_tx)
    .await?;
    let slow_position: i64 = row.try_get(0)?;

    // A later writer commits first.
    let fast_stream = StreamId::new("fast", Uuid::now_v7());
    let mut request = AppendRequest::new(Metadata::system());
    request.push(testing::counted(tenant, &fast_stream, 1));
    let fast_position = store.append(request).await?.last_position();
    assert!(
        fast_position > slow_position as u64,
        "positions follow transaction order"
    );

    // Readers may not pass the uncommitted transaction.
    let batch = store.read_all(0, &EventFilter::default(), 100).await?;
    assert!(
        batch.events.is_empty(),
        "the committed later event must wait for the earlier transaction"
    );
    assert!(batch.next < slow_position as u64);
    let mut subscription = Box::pin(subscribe(store.clone(), 0, EventFilter::default()));
    assert!(
        tokio::time::timeout(Duration::from_millis(500), subscription.next())
            .await
            .is_err(),
        "a subscriber must not receive anything while the earlier transaction is open"
    );

    // Once it commits, both arrive, in position order.
    slow_tx.commit().await?;
    let first = tokio::time::timeout(Duration::from_secs(10), subscription.next())
        .await?
        .ok_or("ended")??;
    let second = tokio::time::timeout(Duration::from_secs(10), subscription.next())
        .await?
        .ok_or("ended")??;
    assert_eq!(first.position, slow_position as u64);
    assert_eq!(second.position, fast_position);
    Ok(())
}

/// Read-model commits cancelled at every point of their way (a dropped request, an aborted
/// runner) leave no pooled connection inside a transaction. sqlx hands a connection whose
/// `BEGIN` was cancelled back to the pool still in that transaction (transact-rs/sqlx#4393):
/// the next borrower's statements would run inside it — an append told it succeeded that
/// never commits, two appends sharing one transaction id and so one range of positions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_commits_leave_no_connection_in_a_transaction()
-> Result<(), Box<dyn std::error::Error>> {
    use gatehouse_events::readmodel::Statement;
    let Some(test_store) = testing::postgres().await? else {
        return Ok(());
    };
    let store = test_store.store.clone();
    let mut observer = sqlx::PgConnection::connect(&test_store.url).await?;
    for round in 0..800u64 {
        let mut commit = Box::pin(
            store.read_model_commit(None, vec![Statement::new("SELECT 1", Vec::new()).into()]),
        );
        // Dropped after 0 to ~2 ms of polling: before, during and after the BEGIN round trip
        // (polled by hand: timers are too coarse for that window).
        let until = std::time::Instant::now() + Duration::from_micros(round % 40 * 50);
        loop {
            if futures::poll!(commit.as_mut()).is_ready() || std::time::Instant::now() >= until {
                break;
            }
            tokio::task::yield_now().await;
        }
        drop(commit);
        // The connection back in the pool, then what the server says of the pool's sessions
        // (a later commit on a leaked one would absorb the leak: look after each round).
        // A transaction still on its way may show as idle in transaction for a moment; a
        // leaked one stays so.
        let mut open = 0i64;
        for _ in 0..200 {
            tokio::time::sleep(Duration::from_millis(5)).await;
            open = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND pid <> pg_backend_pid() AND state LIKE 'idle in transaction%'",
            )
            .fetch_one(&mut observer)
            .await?;
            if open == 0 {
                break;
            }
        }
        assert_eq!(
            open, 0,
            "round {round}: a pooled connection was left inside a transaction"
        );
    }

    // And what appends were told is what another connection sees.
    let tenant = Uuid::now_v7();
    let mut appended = Vec::new();
    for n in 0..64 {
        let mut request = AppendRequest::new(Metadata::system());
        request.push(testing::counted(
            tenant,
            &StreamId::new("probe", Uuid::now_v7()),
            n,
        ));
        let store = store.clone();
        appended.push(tokio::spawn(async move { store.append(request).await }));
    }
    for append in appended {
        append.await??;
    }
    let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE tenant_id = $1")
        .bind(tenant)
        .fetch_one(&mut observer)
        .await?;
    assert_eq!(
        seen, 64,
        "appends reported as committed are not all visible"
    );
    Ok(())
}
