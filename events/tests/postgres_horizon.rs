//! PostgreSQL only: what its transactions and locks must do (a transaction that started
//! earlier but commits later is not skipped; pooled connections and read-model fences).
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

/// A read-model fence that checks a row (a rebuild's writer lanes, each on its own connection)
/// lets other checks of that row commit while it is open, and holds the row against changes
/// (giving up the claim) until it commits. A fence that changed the row would make every other
/// lane wait for its commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checking_fences_commit_side_by_side_and_hold_their_row()
-> Result<(), Box<dyn std::error::Error>> {
    use gatehouse_events::readmodel::{SqlValue, Statement, Write};
    let Some(test_store) = testing::postgres().await? else {
        return Ok(());
    };
    let store = test_store.store.clone();
    let one = |sql: &str, params: Vec<SqlValue>| -> Vec<Write> {
        vec![Statement::new(sql, params).into()]
    };
    // A registry row whose rebuild of generation 2 holds its claim.
    let mut holder = sqlx::PgConnection::connect(&test_store.url).await?;
    let name = format!("fenced-{}", Uuid::now_v7());
    sqlx::query("INSERT INTO projections (name, generation, building) VALUES ($1, 1, 2)")
        .bind(&name)
        .execute(&mut holder)
        .await?;
    let check = Statement::new(
        "SELECT name FROM projections WHERE name = ? AND building = ?",
        vec![name.clone().into(), 2i64.into()],
    );
    assert!(check.is_check());

    // The first commit passes its fence, then waits inside its transaction for a lock the
    // test holds.
    sqlx::query("SELECT pg_advisory_lock(4242)")
        .execute(&mut holder)
        .await?;
    let first = tokio::spawn({
        let (store, check) = (store.clone(), check.clone());
        let wait = one("SELECT pg_advisory_xact_lock_shared(4242)", Vec::new());
        async move { store.read_model_commit(Some(check), wait).await }
    });
    let mut waiting = 0i64;
    for _ in 0..3000 {
        waiting = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock' AND wait_event = 'advisory'",
        )
        .fetch_one(&mut holder)
        .await?;
        if waiting == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(waiting, 1, "the first commit waits inside its transaction");

    // A second check of the row commits meanwhile (it would wait forever behind a change).
    let second = tokio::time::timeout(
        Duration::from_secs(30),
        store.read_model_commit(Some(check.clone()), Vec::new()),
    )
    .await
    .map_err(|_| "a second check waited for the first commit")??;
    assert!(second, "the claim is still there");

    // Giving up the claim waits for the open commit.
    let mut changer = sqlx::PgConnection::connect(&test_store.url).await?;
    sqlx::query("SET lock_timeout = '300ms'")
        .execute(&mut changer)
        .await?;
    let give_up = "UPDATE projections SET building = 0 WHERE name = $1";
    let refused = match sqlx::query(give_up).bind(&name).execute(&mut changer).await {
        Ok(_) => return Err("the claim was given up under an open commit".into()),
        Err(error) => error,
    };
    let code = refused
        .as_database_error()
        .and_then(|e| e.code())
        .map(|c| c.to_string());
    assert_eq!(code.as_deref(), Some("55P03"), "lock timeout: {refused}");

    // Once it has committed, the claim can go, and then a check finds nothing: the commit
    // writes nothing.
    sqlx::query("SELECT pg_advisory_unlock(4242)")
        .execute(&mut holder)
        .await?;
    assert!(first.await??, "the first commit landed");
    sqlx::query(give_up)
        .bind(&name)
        .execute(&mut changer)
        .await?;
    let written = one(
        "UPDATE projections SET failure = 'written' WHERE name = ?",
        vec![name.clone().into()],
    );
    let fenced = store.read_model_commit(Some(check), written).await?;
    assert!(!fenced, "no claim, no commit");
    let failure: String = sqlx::query_scalar("SELECT failure FROM projections WHERE name = $1")
        .bind(&name)
        .fetch_one(&mut holder)
        .await?;
    assert_eq!(failure, "", "the fenced commit changed nothing");
    Ok(())
}
