//! Bounded retry for commands that lose an optimistic-concurrency race.
//!
//! A command reloads its aggregate, decides again and appends with the new expected
//! version. The bound keeps a hot stream from spinning forever; the jitter keeps two
//! losers from colliding again in lock-step.

use crate::error::StoreError;
use rand::Rng;
use std::future::Future;
use std::time::Duration;

/// Default number of attempts for a command.
pub const DEFAULT_ATTEMPTS: u32 = 5;

/// Runs `command` until it succeeds, fails with something other than a conflict, or has
/// been tried `attempts` times. The last conflict is returned when attempts run out.
pub async fn retry_on_conflict<T, E, F, Fut>(attempts: u32, mut command: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: AsConflict,
{
    let mut attempt = 1;
    loop {
        match command().await {
            Err(error) if error.is_conflict() && attempt < attempts => {
                let jitter = rand::rng().random_range(0..=(2u64 << attempt.min(6)));
                tokio::time::sleep(Duration::from_millis(jitter)).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Errors that can say whether they are an optimistic-concurrency conflict.
pub trait AsConflict {
    /// True when retrying the command may succeed.
    fn is_conflict(&self) -> bool;
}

impl AsConflict for StoreError {
    fn is_conflict(&self) -> bool {
        StoreError::is_conflict(self)
    }
}
