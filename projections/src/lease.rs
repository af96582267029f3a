//! Leases for background workers that should run in one replica at a time (the notifier,
//! the NATS relay), in the store beside the log: a row per worker with its owner and expiry.
//!
//! A replica takes a free or expired lease, renews it every third of its length, and stops
//! its worker when a renewal finds the lease gone (it paused past the expiry and another
//! replica took over). The workers this guards are at-least-once by design (checkpointed,
//! deduplicated downstream), so the moment of overlap a lease cannot exclude — a paused
//! owner waking up before its next renewal — costs a duplicate delivery at worst, never a
//! lost one.

use gatehouse_events::readmodel::Statement;
use gatehouse_events::{EventStore, StoreError};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// How long a lease lasts without renewal.
pub const LEASE: Duration = Duration::from_secs(15);

/// One worker's lease.
pub struct WorkerLease {
    store: Arc<dyn EventStore>,
    name: &'static str,
    owner: String,
    lease: Duration,
}

fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

impl WorkerLease {
    /// The lease of worker `name` as `owner` (unique per process).
    pub fn new(store: Arc<dyn EventStore>, name: &'static str, owner: String) -> Self {
        WorkerLease {
            store,
            name,
            owner,
            lease: LEASE,
        }
    }

    /// Leases last `lease` instead (tests of takeover).
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Takes the lease when it is free or expired, or renews it when held; whether this
    /// replica holds it now.
    pub async fn hold(&self) -> Result<bool, StoreError> {
        self.store
            .read_model_commit(
                None,
                // The table is a migration's (0005): DDL here would race between workers.
                vec![
                    Statement::new(
                        "INSERT INTO worker_leases (name, owner, lease_until) VALUES (?, '', 0) \
                     ON CONFLICT (name) DO NOTHING",
                        vec![self.name.into()],
                    )
                    .into(),
                ],
            )
            .await?;
        let now = now_micros();
        self.store
            .read_model_commit(
                Some(Statement::new(
                    "UPDATE worker_leases SET owner = ?, lease_until = ? WHERE name = ? \
                     AND (owner = ? OR owner = '' OR lease_until < ?)",
                    vec![
                        self.owner.clone().into(),
                        (now + self.lease.as_micros() as i64).into(),
                        self.name.into(),
                        self.owner.clone().into(),
                        now.into(),
                    ],
                )),
                Vec::new(),
            )
            .await
    }

    /// Gives the lease up (at shutdown), so that another replica takes over at once.
    pub async fn release(&self) -> Result<(), StoreError> {
        self.store
            .read_model_commit(
                None,
                vec![
                    Statement::new(
                        "UPDATE worker_leases SET owner = '', lease_until = 0 WHERE name = ? \
                     AND owner = ?",
                        vec![self.name.into(), self.owner.clone().into()],
                    )
                    .into(),
                ],
            )
            .await
            .map(|_| ())
    }

    /// Runs `work` whenever this replica holds the lease, forever: started when the lease is
    /// taken, stopped when it is lost (and started again when it is taken back). Dropping the
    /// returned future (aborting its task) stops the work too.
    pub async fn run<F, Fut>(self, work: F)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let renew = self.lease / 3;
        loop {
            match tokio::time::timeout(renew, self.hold()).await {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => {
                    tokio::time::sleep(renew).await;
                    continue;
                }
                Ok(Err(error)) => {
                    tracing::warn!(worker = self.name, %error, "worker lease: store unavailable");
                    tokio::time::sleep(renew).await;
                    continue;
                }
                Err(_) => {
                    tracing::warn!(worker = self.name, "worker lease: the store did not answer");
                    continue;
                }
            }
            tracing::info!(worker = self.name, owner = %self.owner, "worker lease taken");
            let mut task = AbortOnDrop(tokio::spawn(work()));
            let mut held_until = tokio::time::Instant::now() + self.lease;
            loop {
                tokio::select! {
                    _ = &mut task.0 => {
                        // The worker ended by itself (its subscription closed): give the
                        // lease back, pause, and start over.
                        let _ = self.release().await;
                        tokio::time::sleep(renew).await;
                        break;
                    }
                    _ = tokio::time::sleep(renew) => {
                        // A renewal may take at most what is left of the lease.
                        let left = held_until.saturating_duration_since(tokio::time::Instant::now());
                        match tokio::time::timeout(left, self.hold()).await {
                            Ok(Ok(true)) => held_until = tokio::time::Instant::now() + self.lease,
                            Ok(Ok(false)) => {
                                tracing::warn!(worker = self.name, "worker lease lost: stopping");
                                break;
                            }
                            // Unsure whether it is still held: keep working until the lease
                            // would run out, then stop.
                            Ok(Err(error)) => {
                                tracing::warn!(worker = self.name, %error, "worker lease: renewal failed");
                                if tokio::time::Instant::now() + renew >= held_until {
                                    break;
                                }
                            }
                            Err(_) => {
                                tracing::warn!(worker = self.name, "worker lease ran out unrenewed: stopping");
                                break;
                            }
                        }
                    }
                }
            }
            // `task` is dropped here: the work stops.
        }
    }
}

/// A task aborted when this is dropped (when its lease is lost, or the runner itself stops).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
