//! PostgreSQL only: a transaction that started earlier but commits later must not be skipped.
//! Runs when `GATEHOUSE_TEST_DATABASE_URL` is set.

use futures::StreamExt;
use gatehouse_events::testing;
use gatehouse_events::{AppendRequest, EventFilter, Metadata, NewEvent, StreamId, subscribe};
use serde_json::json;
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
    request.push(NewEvent {
        tenant_id: tenant,
        stream: fast_stream,
        event_type: "Counted".into(),
        schema_version: 1,
        payload: json!({ "n": 1 }),
    });
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
