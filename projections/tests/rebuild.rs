//! A rebuild folds every event of the log exactly once.

use gatehouse_events::testing;
use gatehouse_events::{AppendRequest, Metadata, NewEvent, StreamId};
use gatehouse_projections::event_counts::EventCounts;
use gatehouse_projections::rebuild;
use serde_json::json;
use uuid::Uuid;

#[tokio::test]
async fn a_rebuild_counts_every_event_once() -> Result<(), Box<dyn std::error::Error>> {
    for test_store in testing::all().await? {
        let store = test_store.store;
        let stream = StreamId::new("counted", Uuid::now_v7());
        // More than one rebuild batch, in appends of 700.
        for chunk in 0..16 {
            let mut request = AppendRequest::new(Metadata::system());
            for n in 0..700 {
                let event_type = if n % 7 == 0 { "Seventh" } else { "Other" };
                request.push(NewEvent {
                    tenant_id: Uuid::nil(),
                    stream: stream.clone(),
                    event_type: event_type.into(),
                    schema_version: 1,
                    payload: json!({ "chunk": chunk, "n": n }),
                });
            }
            store.append(request).await?;
        }
        let mut counts = EventCounts::default();
        let rebuilt = rebuild(store.as_ref(), &mut counts).await?;
        assert_eq!(rebuilt.events, 11_200);
        assert_eq!(counts.by_type.get("Seventh"), Some(&1_600));
        assert_eq!(counts.by_type.get("Other"), Some(&9_600));
        assert!(rebuilt.position >= counts.last_position);
    }
    Ok(())
}
