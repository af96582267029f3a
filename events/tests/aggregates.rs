//! Typed events, upcasting and aggregate loading (with snapshots).

use gatehouse_events::aggregate::Upcasters;
use gatehouse_events::store::StreamBounds;
use gatehouse_events::testing;
use gatehouse_events::{
    Aggregate, AppendRequest, DomainEvent, Loaded, Metadata, NewEvent, RecordedEvent, StateCache,
    StreamId,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::LazyLock;
use uuid::Uuid;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Version 2 of `MemberJoined` split `name` into `display_name` and added `source`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
enum ClubEvent {
    MemberJoined {
        display_name: String,
        source: String,
    },
    MemberLeft {
        display_name: String,
    },
}

static CLUB_UPCASTERS: LazyLock<Upcasters> = LazyLock::new(|| {
    Upcasters::new().step("MemberJoined", 1, |mut payload| {
        let name = payload
            .get("name")
            .cloned()
            .ok_or("v1 MemberJoined without name")?;
        payload["display_name"] = name;
        payload["source"] = json!("legacy");
        if let Some(fields) = payload.as_object_mut() {
            fields.remove("name");
        }
        Ok(payload)
    })
});

impl DomainEvent for ClubEvent {
    fn upcasters() -> &'static Upcasters {
        &CLUB_UPCASTERS
    }
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Club {
    members: Vec<String>,
    sources: Vec<String>,
}

impl Aggregate for Club {
    const STREAM_TYPE: &'static str = "club";
    const SNAPSHOT_EVERY: Option<u64> = Some(10);
    type Event = ClubEvent;

    fn apply(&mut self, event: ClubEvent, _: &RecordedEvent) {
        match event {
            ClubEvent::MemberJoined {
                display_name,
                source,
            } => {
                self.members.push(display_name);
                self.sources.push(source);
            }
            ClubEvent::MemberLeft { display_name } => self.members.retain(|m| *m != display_name),
        }
    }
}

#[tokio::test]
async fn an_event_stored_at_schema_version_1_loads_as_version_2() -> TestResult {
    for store in testing::all().await? {
        let store = store.store;
        let id = Uuid::now_v7();
        let stream = Club::stream(id);
        // Written by an older release: schema 1, field `name`.
        let mut old = AppendRequest::new(Metadata::system());
        old.push(NewEvent {
            tenant_id: Uuid::nil(),
            stream: stream.clone(),
            event_type: "MemberJoined".into(),
            schema_version: 1,
            payload: json!({ "name": "Ada" }),
        });
        store.append(old).await?;
        // Written now: schema 2.
        let new = ClubEvent::MemberJoined {
            display_name: "Grace".into(),
            source: "sign_up".into(),
        };
        assert_eq!(
            new.encode()?.1,
            2,
            "new events are written at the current schema version"
        );
        let mut request = AppendRequest::new(Metadata::system());
        request.push(new.to_new_event(Uuid::nil(), &stream)?);
        store.append(request).await?;

        let stored = store.read_stream(&stream, StreamBounds::default()).await?;
        assert_eq!(
            stored[0].schema_version, 1,
            "old events are never rewritten"
        );
        assert_eq!(
            ClubEvent::decode(&stored[0])?,
            ClubEvent::MemberJoined {
                display_name: "Ada".into(),
                source: "legacy".into()
            }
        );
        let club = Loaded::<Club>::load(store.as_ref(), id).await?;
        assert_eq!(club.state.members, vec!["Ada", "Grace"]);
        assert_eq!(club.state.sources, vec!["legacy", "sign_up"]);
        assert_eq!(club.version, 2);
    }
    Ok(())
}

#[tokio::test]
async fn a_long_stream_loads_from_its_snapshot_and_the_events_after_it() -> TestResult {
    for store in testing::all().await? {
        let store = store.store;
        let id = Uuid::now_v7();
        let stream: StreamId = Club::stream(id);
        let join = |n: usize| ClubEvent::MemberJoined {
            display_name: format!("m{n}"),
            source: "s".into(),
        };
        for n in 0..25 {
            let mut request = AppendRequest::new(Metadata::system());
            request.push(join(n).to_new_event(Uuid::nil(), &stream)?);
            store.append(request).await?;
        }
        let first = Loaded::<Club>::load(store.as_ref(), id).await?;
        assert_eq!(first.state.members.len(), 25);
        let (version, snapshot) = store
            .load_snapshot(&stream)
            .await?
            .ok_or("no snapshot taken")?;
        assert_eq!(version, 25);
        assert_eq!(
            snapshot["state"]["members"].as_array().map(Vec::len),
            Some(25)
        );

        let mut request = AppendRequest::new(Metadata::system());
        request.push(
            ClubEvent::MemberLeft {
                display_name: "m0".into(),
            }
            .to_new_event(Uuid::nil(), &stream)?,
        );
        store.append(request).await?;
        let second = Loaded::<Club>::load(store.as_ref(), id).await?;
        assert_eq!(second.version, 26);
        assert_eq!(second.state.members.len(), 24);
        assert!(!second.state.members.contains(&"m0".to_string()));

        // The state as it was at version 5, for auditors.
        let at = store.read_stream(&stream, StreamBounds::default()).await?[4].position;
        let past = Loaded::<Club>::load_at(
            store.as_ref(),
            id,
            StreamBounds {
                up_to_position: Some(at),
                ..Default::default()
            },
        )
        .await?;
        assert_eq!(past.state.members.len(), 5);
    }
    Ok(())
}

/// A kept state is brought up to date by what another handle on the store appended since, and
/// always equals a fresh load, also after the cache, full, forgot it.
#[tokio::test]
async fn a_kept_state_follows_appends_made_elsewhere_and_equals_a_fresh_load() -> TestResult {
    for test_store in testing::all().await? {
        let store = test_store.store.clone();
        let elsewhere = test_store.reopen().await?;
        let cache = StateCache::<Club>::new(2);
        let ids = [Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7()];
        let append = |id: Uuid, event: ClubEvent| {
            let elsewhere = elsewhere.clone();
            async move {
                let mut request = AppendRequest::new(Metadata::system());
                request.push(event.to_new_event(Uuid::nil(), &Club::stream(id))?);
                elsewhere.append(request).await?;
                TestResult::Ok(())
            }
        };
        let join = |name: &str| ClubEvent::MemberJoined {
            display_name: name.into(),
            source: "s".into(),
        };
        let same_as_fresh = |kept: &Loaded<Club>, fresh: &Loaded<Club>| {
            assert_eq!(
                (&kept.state.members, kept.version),
                (&fresh.state.members, fresh.version)
            );
        };

        let empty = cache.load(store.as_ref(), ids[0]).await?;
        assert_eq!((empty.version, empty.state.members.len()), (0, 0));
        for name in ["Ada", "Grace", "Edsger"] {
            append(ids[0], join(name)).await?;
        }
        let kept = cache.load(store.as_ref(), ids[0]).await?;
        assert_eq!(kept.state.members, ["Ada", "Grace", "Edsger"]);
        same_as_fresh(&kept, &Loaded::load(store.as_ref(), ids[0]).await?);

        append(
            ids[0],
            ClubEvent::MemberLeft {
                display_name: "Grace".into(),
            },
        )
        .await?;
        let kept = cache.load(store.as_ref(), ids[0]).await?;
        assert_eq!(kept.state.members, ["Ada", "Edsger"]);
        assert_eq!(kept.version, 4);
        same_as_fresh(&kept, &Loaded::load(store.as_ref(), ids[0]).await?);

        // Two more clubs fill the cache; whichever it forgot, loads stay right.
        for (n, id) in ids.iter().enumerate().skip(1) {
            append(*id, join(&format!("member of {n}"))).await?;
            cache.load(store.as_ref(), *id).await?;
        }
        append(ids[0], join("Barbara")).await?;
        for id in ids {
            same_as_fresh(
                &cache.load(store.as_ref(), id).await?,
                &Loaded::load(store.as_ref(), id).await?,
            );
        }
        let kept = cache.load(store.as_ref(), ids[0]).await?;
        assert_eq!(kept.state.members, ["Ada", "Edsger", "Barbara"]);
    }
    Ok(())
}
