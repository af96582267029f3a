//! Worker leases on SQLite and (when configured) PostgreSQL: one holder at a time, renewal by
//! the holder only, takeover after expiry or release, and `run` starts the work only while
//! the lease is held and stops it when the lease is lost.

use gatehouse_events::testing::{self, TestStore};
use gatehouse_projections::lease::WorkerLease;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

async fn leases_on(test: TestStore) -> TestResult {
    let store = test.store.clone();
    let lease = Duration::from_millis(400);
    let a = WorkerLease::new(store.clone(), "worker", "a".into()).with_lease(lease);
    let b = WorkerLease::new(store.clone(), "worker", "b".into()).with_lease(lease);
    assert!(a.hold().await?, "a free lease is taken");
    assert!(!b.hold().await?, "a held lease is not taken");
    assert!(a.hold().await?, "the holder renews");
    // Another worker's lease is its own.
    let other = WorkerLease::new(store.clone(), "other", "b".into()).with_lease(lease);
    assert!(other.hold().await?);
    // Released: taken at once.
    a.release().await?;
    assert!(b.hold().await?, "a released lease is taken");
    assert!(!a.hold().await?);
    // Expired: taken by another.
    tokio::time::sleep(lease + Duration::from_millis(100)).await;
    assert!(a.hold().await?, "an expired lease is taken over");
    assert!(
        !b.hold().await?,
        "the old holder cannot renew a lease taken over"
    );
    a.release().await?;

    // `run`: one of two replicas works; when it loses the lease (here: released by hand, as
    // a takeover would look to it), its work stops and the other's starts.
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let starts = Arc::new(AtomicUsize::new(0));
    let replica = |owner: &str| {
        let (running, most, starts) = (running.clone(), most.clone(), starts.clone());
        let lease = WorkerLease::new(store.clone(), "runner", owner.into())
            .with_lease(Duration::from_millis(300));
        tokio::spawn(lease.run(move || {
            let (running, most, starts) = (running.clone(), most.clone(), starts.clone());
            async move {
                starts.fetch_add(1, Ordering::SeqCst);
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                // Counted down when aborted, too.
                struct Done(Arc<AtomicUsize>);
                impl Drop for Done {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                let _done = Done(running);
                std::future::pending::<()>().await;
            }
        }))
    };
    let first = replica("one");
    let second = replica("two");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        running.load(Ordering::SeqCst),
        1,
        "exactly one replica works"
    );
    assert_eq!(starts.load(Ordering::SeqCst), 1);
    // The worker's replica dies: the other takes over once the lease runs out.
    let holder = store
        .read_model_query(gatehouse_events::readmodel::Statement::new(
            "SELECT owner FROM worker_leases WHERE name = 'runner'",
            Vec::new(),
        ))
        .await?;
    let owner = holder
        .first()
        .and_then(|row| row.first())
        .map(|v| v.text())
        .unwrap_or_default();
    if owner == "one" {
        first.abort();
    } else {
        second.abort();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while starts.load(Ordering::SeqCst) < 2 {
        assert!(std::time::Instant::now() < deadline, "no takeover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        running.load(Ordering::SeqCst),
        1,
        "one replica works after the takeover"
    );
    assert_eq!(most.load(Ordering::SeqCst), 1, "never two at once");
    first.abort();
    second.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_leases_on_sqlite() -> TestResult {
    leases_on(testing::sqlite().await?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_leases_on_postgres() -> TestResult {
    let Some(store) = testing::postgres().await? else {
        eprintln!("GATEHOUSE_TEST_DATABASE_URL not set: PostgreSQL run skipped");
        return Ok(());
    };
    leases_on(store).await
}
