//! The tamper-evident log (SPEC §8): a hash chain over each tenant's events, sealed by a
//! follower of the log, and signed checkpoints of the chain heads.
//!
//! # A sealer, not hashing at append
//!
//! A link covers the previous link of the same tenant, so hashing at append would make every
//! append of a tenant wait for the one before it to commit — on PostgreSQL, where concurrent
//! transactions commit out of position order and the group committer batches them, that
//! would serialise the writers it exists to overlap. Instead the [`Sealer`] follows the log
//! (a subscription: it sees committed events exactly once, in position order) and writes one
//! seal per event within a poll interval of its commit:
//!
//! ```text
//!   link(n) = SHA-256( link(n-1) of the same tenant ‖ canonical bytes of event n )
//! ```
//!
//! with 32 zero bytes before a tenant's first event. The canonical bytes are every envelope
//! field but the position, and the payload as JSON with sorted keys ([`canonical`]). Leaving
//! the position out means a faithful export imported into another store yields the same chain
//! heads; the seal's own position still pins each link to its place in the log, so a deleted,
//! inserted or reordered row is found. Seals are deterministic, so replicas that seal at the
//! same time write identical rows (and ignore each other's).
//!
//! # Signed checkpoints
//!
//! Whoever can write the events table can also recompute the seals. So every
//! [`CHECKPOINT_EVERY`] the sealer signs each moved tenant's head (tenant, position, head,
//! time) with an Ed25519 key ([`AuditKey`]) that lives outside the database (derived from the
//! master key); the auditor checks the signatures with the public key alone. A signed
//! checkpoint proves that the log prefix up to its position existed, with exactly that
//! content, at that time.
//!
//! # Verifying
//!
//! [`verify`] walks the events and the seals together in position order, recomputing every
//! link, and reports the first position where they disagree: an event whose link differs from
//! its seal (altered), a seal with no event (deleted), an event below the sealed point with no
//! seal (inserted), a signed checkpoint the chain does not reach (rewritten and resealed), or a
//! bad signature. Events after the sealed point are counted as not yet sealed.

use crate::envelope::{Position, RecordedEvent};
use crate::error::StoreError;
use crate::store::{EventFilter, EventStore, ReadBatch};
use chrono::{DateTime, SecondsFormat, Utc};
use futures::StreamExt;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// A link of the chain.
pub type Hash = [u8; 32];

/// The link before a tenant's first event.
pub const GENESIS: Hash = [0; 32];

/// The consumer checkpoint naming how far the log is sealed.
pub const SEALER_CHECKPOINT: &str = "integrity:sealer";

/// How often the sealer signs the heads that moved.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(10);

/// Events and seals read per round trip while verifying.
const VERIFY_BATCH: usize = 10_000;

/// The seal of one event: its tenant's chain link at its position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seal {
    /// The event's position.
    pub position: Position,
    /// The event's tenant.
    pub tenant_id: Uuid,
    /// The link.
    pub hash: Hash,
}

/// A signed statement that a tenant's chain had `head` at `position` at `signed_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCheckpoint {
    /// The tenant.
    pub tenant_id: Uuid,
    /// Position of the tenant's last sealed event.
    pub position: Position,
    /// The link at that position.
    pub head: Hash,
    /// When it was signed.
    pub signed_at: DateTime<Utc>,
    /// Which key signed it ([`AuditKey::key_id`]).
    pub key_id: String,
    /// Ed25519 signature of [`SignedCheckpoint::message`].
    pub signature: Vec<u8>,
}

impl SignedCheckpoint {
    /// The signed bytes: a versioned, line-separated text an auditor can rebuild by hand.
    pub fn message(&self) -> Vec<u8> {
        format!(
            "gatehouse checkpoint v1\n{}\n{}\n{}\n{}\n",
            self.tenant_id,
            self.position,
            hex::encode(self.head),
            self.signed_at.to_rfc3339_opts(SecondsFormat::Micros, true)
        )
        .into_bytes()
    }
}

/// The Ed25519 key that signs checkpoints.
pub struct AuditKey {
    pair: Ed25519KeyPair,
    key_id: String,
}

impl AuditKey {
    /// The key with this 32-byte seed (derive it from a secret kept outside the database).
    pub fn from_seed(seed: &[u8; 32]) -> Result<Self, StoreError> {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed)
            .map_err(|_| StoreError::Invalid("bad audit key seed".into()))?;
        let key_id = key_id(pair.public_key().as_ref());
        Ok(AuditKey { pair, key_id })
    }

    /// The public key (32 bytes), for auditors.
    pub fn public_key(&self) -> Vec<u8> {
        self.pair.public_key().as_ref().to_vec()
    }

    /// A short name of the key: hex of the first 8 bytes of SHA-256 of the public key.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Signs a checkpoint of `head`.
    pub fn sign(&self, tenant_id: Uuid, position: Position, head: Hash) -> SignedCheckpoint {
        let mut checkpoint = SignedCheckpoint {
            tenant_id,
            position,
            head,
            // Whole microseconds: what both stores keep.
            signed_at: DateTime::from_timestamp_micros(Utc::now().timestamp_micros())
                .unwrap_or_default(),
            key_id: self.key_id.clone(),
            signature: Vec::new(),
        };
        checkpoint.signature = self.pair.sign(&checkpoint.message()).as_ref().to_vec();
        checkpoint
    }
}

/// The id of a public key.
pub fn key_id(public_key: &[u8]) -> String {
    hex::encode(&Sha256::digest(public_key)[..8])
}

/// The bytes a link covers: every envelope field but the position, as a JSON array, with the
/// payload's object keys sorted (serde_json's map is ordered by key) and the time in whole
/// microseconds, so both stores give the same bytes for the same event.
pub fn canonical(event: &RecordedEvent) -> Result<Vec<u8>, StoreError> {
    let payload: Value = event.payload_value()?;
    let context = event.context.as_ref();
    let fields = serde_json::json!([
        "gatehouse event v1",
        event.id,
        event.tenant_id,
        event.stream.kind,
        event.stream.id,
        event.version,
        event.event_type,
        event.schema_version,
        event.recorded_at.timestamp_micros(),
        event.correlation_id,
        event.causation_id,
        event.actor.to_string(),
        context.and_then(|c| c.ip.as_deref()),
        context.and_then(|c| c.user_agent.as_deref()),
        payload,
    ]);
    serde_json::to_vec(&fields).map_err(|e| StoreError::Invalid(e.to_string()))
}

/// The link after `previous` for `event`.
pub fn link(previous: &Hash, event: &RecordedEvent) -> Result<Hash, StoreError> {
    let mut hasher = Sha256::new();
    hasher.update(previous);
    hasher.update(canonical(event)?);
    Ok(hasher.finalize().into())
}

/// Follows the log and seals it; signs moved heads every [`CHECKPOINT_EVERY`].
pub struct Sealer {
    store: Arc<dyn EventStore>,
    key: Option<Arc<AuditKey>>,
    checkpoint_every: Duration,
}

impl Sealer {
    /// A sealer of `store`, signing checkpoints with `key` when there is one.
    pub fn new(store: Arc<dyn EventStore>, key: Option<Arc<AuditKey>>) -> Self {
        Sealer {
            store,
            key,
            checkpoint_every: CHECKPOINT_EVERY,
        }
    }

    /// Signs checkpoints this often instead (tests).
    pub fn checkpoint_every(mut self, every: Duration) -> Self {
        self.checkpoint_every = every;
        self
    }

    /// Seals forever, resuming after errors from what is stored.
    pub async fn run(self) {
        loop {
            if let Err(error) = self.follow().await {
                tracing::warn!(%error, "the sealer stopped; resuming from its checkpoint");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Seals everything committed so far, signs the moved heads, and returns the sealed point
    /// (imports, the audit commands and tests).
    pub async fn catch_up(&self) -> Result<Position, StoreError> {
        let mut chain = Chain::load(&*self.store).await?;
        loop {
            let batch = self
                .store
                .read_all(chain.sealed, &EventFilter::default(), VERIFY_BATCH)
                .await?;
            let more = batch.events.len() >= VERIFY_BATCH;
            if batch.next > chain.sealed {
                chain.seal(&*self.store, batch).await?;
            }
            if !more {
                break;
            }
        }
        self.sign(&mut chain).await?;
        Ok(chain.sealed)
    }

    async fn follow(&self) -> Result<(), StoreError> {
        let mut chain = Chain::load(&*self.store).await?;
        let mut last_signed = Instant::now();
        let mut batches = Box::pin(crate::subscription::at_most_every(
            crate::subscription::subscribe_batches(
                self.store.clone(),
                chain.sealed,
                EventFilter::default(),
            ),
            crate::subscription::COMMIT_EVERY,
        ));
        loop {
            let wait = self.checkpoint_every.saturating_sub(last_signed.elapsed());
            match tokio::time::timeout(wait, batches.next()).await {
                Ok(Some(batch)) => chain.seal(&*self.store, batch?).await?,
                Ok(None) => return Err(StoreError::Backend("the log subscription ended".into())),
                Err(_) => {}
            }
            if last_signed.elapsed() >= self.checkpoint_every {
                self.sign(&mut chain).await?;
                last_signed = Instant::now();
            }
        }
    }

    async fn sign(&self, chain: &mut Chain) -> Result<(), StoreError> {
        let Some(key) = &self.key else {
            chain.moved.clear();
            return Ok(());
        };
        let moved: Vec<Uuid> = chain.moved.iter().copied().collect();
        for tenant_id in moved {
            if let Some((position, head)) = chain.heads.get(&tenant_id) {
                let checkpoint = key.sign(tenant_id, *position, *head);
                self.store.save_integrity_checkpoint(&checkpoint).await?;
            }
            // Forgotten only once signed: a failed save signs it on the next round.
            chain.moved.remove(&tenant_id);
        }
        Ok(())
    }
}

/// The sealer's place in the log and the heads it has extended.
struct Chain {
    sealed: Position,
    heads: HashMap<Uuid, (Position, Hash)>,
    moved: HashSet<Uuid>,
}

impl Chain {
    async fn load(store: &dyn EventStore) -> Result<Self, StoreError> {
        Ok(Chain {
            sealed: store.load_checkpoint(SEALER_CHECKPOINT).await?.unwrap_or(0),
            heads: HashMap::new(),
            moved: HashSet::new(),
        })
    }

    /// Seals a batch read after `self.sealed`, with the sealed point, in one transaction.
    async fn seal(&mut self, store: &dyn EventStore, batch: ReadBatch) -> Result<(), StoreError> {
        let mut seals = Vec::with_capacity(batch.events.len());
        for event in &batch.events {
            let previous = match self.heads.get(&event.tenant_id) {
                Some((_, hash)) => *hash,
                None => store
                    .last_seal(event.tenant_id, self.sealed)
                    .await?
                    .map_or(GENESIS, |seal| seal.hash),
            };
            let hash = link(&previous, event)?;
            self.heads.insert(event.tenant_id, (event.position, hash));
            self.moved.insert(event.tenant_id);
            seals.push(Seal {
                position: event.position,
                tenant_id: event.tenant_id,
                hash,
            });
        }
        store.save_seals(seals, batch.next).await?;
        self.sealed = batch.next;
        Ok(())
    }
}

/// The first place where the log and its chain disagree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    /// Position of the first broken link.
    pub position: Position,
    /// Its tenant.
    pub tenant_id: Uuid,
    /// What is wrong there.
    pub reason: String,
}

/// What [`verify`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Sealed events whose links were recomputed.
    pub events_checked: u64,
    /// Everything at or below this position is sealed.
    pub sealed_up_to: Position,
    /// Events after the sealed point (not checked yet).
    pub unsealed: u64,
    /// Each tenant's last link: (position, hash).
    pub heads: BTreeMap<Uuid, (Position, Hash)>,
    /// Signed checkpoints whose signature and head were checked.
    pub checkpoints_checked: u64,
    /// The first broken link, if any.
    pub broken: Option<Broken>,
}

impl Report {
    /// True when nothing is broken.
    pub fn intact(&self) -> bool {
        self.broken.is_none()
    }
}

/// Pages through a sorted source one item at a time.
struct Paged<T> {
    items: std::collections::VecDeque<T>,
    done: bool,
}

impl<T> Paged<T> {
    fn new() -> Self {
        Paged {
            items: Default::default(),
            done: false,
        }
    }
}

async fn sealed_now(store: &dyn EventStore) -> Result<Position, StoreError> {
    Ok(store.load_checkpoint(SEALER_CHECKPOINT).await?.unwrap_or(0))
}

/// Recomputes the chain of one tenant (or of all) and checks it against the seals and the
/// signed checkpoints (signatures checked with `public_key`; without one, checkpoints are
/// checked against the chain only).
pub async fn verify(
    store: &dyn EventStore,
    tenant_id: Option<Uuid>,
    public_key: Option<&[u8]>,
) -> Result<Report, StoreError> {
    let sealed_up_to = store.load_checkpoint(SEALER_CHECKPOINT).await?.unwrap_or(0);
    let mut report = Report {
        sealed_up_to,
        ..Report::default()
    };
    let mut checkpoints: BTreeMap<Position, Vec<SignedCheckpoint>> = BTreeMap::new();
    for checkpoint in store.integrity_checkpoints(tenant_id).await? {
        checkpoints
            .entry(checkpoint.position)
            .or_default()
            .push(checkpoint);
    }
    let filter = EventFilter {
        tenant_id,
        ..EventFilter::default()
    };
    let (mut events, mut seals) = (Paged::new(), Paged::new());
    let (mut event_cursor, mut seal_cursor) = (0, 0);
    let mut links: HashMap<Uuid, Hash> = HashMap::new();
    let broken = |position, tenant_id, reason: &str| Broken {
        position,
        tenant_id,
        reason: reason.to_string(),
    };
    loop {
        if events.items.is_empty() && !events.done {
            let batch = store.read_all(event_cursor, &filter, VERIFY_BATCH).await?;
            events.done = batch.events.len() < VERIFY_BATCH;
            event_cursor = batch.next;
            events.items.extend(batch.events);
        }
        if seals.items.is_empty() && !seals.done {
            let batch = store
                .read_seals(tenant_id, seal_cursor, VERIFY_BATCH)
                .await?;
            seals.done = batch.len() < VERIFY_BATCH;
            if let Some(last) = batch.last() {
                seal_cursor = last.position;
            }
            // Seals and the sealed point commit together and the point only rises, so a seal
            // above it means the point was lowered (to pass rewritten events off as new).
            // (A running sealer may have moved on since the walk began: ask again.)
            if let Some(beyond) = batch.iter().find(|s| s.position > sealed_up_to)
                && sealed_now(store).await? < beyond.position
            {
                report.broken = Some(broken(
                    beyond.position,
                    beyond.tenant_id,
                    "a seal lies above the sealed point (the sealed point was moved back)",
                ));
                return Ok(report);
            }
            seals
                .items
                .extend(batch.into_iter().filter(|s| s.position <= sealed_up_to));
        }
        let event_at = events.items.front().map(|e: &RecordedEvent| e.position);
        let seal_at = seals.items.front().map(|s: &Seal| s.position);
        let position = match (event_at, seal_at) {
            (None, None) => break,
            (Some(e), Some(s)) => e.min(s),
            (Some(e), None) => e,
            (None, Some(s)) => s,
        };
        if position > sealed_up_to {
            // Seals never pass the sealed point, so only unsealed events remain.
            report.unsealed += events.items.len() as u64;
            events.items.clear();
            if events.done {
                break;
            }
            continue;
        }
        let event = (event_at == Some(position))
            .then(|| events.items.pop_front())
            .flatten();
        let seal = (seal_at == Some(position))
            .then(|| seals.items.pop_front())
            .flatten();
        let (event, seal) = match (event, seal) {
            (Some(event), Some(seal)) => (event, seal),
            (None, Some(seal)) => {
                report.broken = Some(broken(
                    position,
                    seal.tenant_id,
                    "a sealed event is missing (deleted from the log)",
                ));
                return Ok(report);
            }
            (Some(event), None) => {
                report.broken = Some(broken(
                    position,
                    event.tenant_id,
                    "an event below the sealed point has no seal (inserted into the log)",
                ));
                return Ok(report);
            }
            (None, None) => break,
        };
        let previous = links.get(&event.tenant_id).copied().unwrap_or(GENESIS);
        let hash = link(&previous, &event)?;
        report.events_checked += 1;
        if seal.tenant_id != event.tenant_id || seal.hash != hash {
            report.broken = Some(broken(
                position,
                event.tenant_id,
                "the event does not match its seal (altered, or the log was reordered)",
            ));
            return Ok(report);
        }
        links.insert(event.tenant_id, hash);
        report.heads.insert(event.tenant_id, (position, hash));
        for checkpoint in checkpoints.remove(&position).unwrap_or_default() {
            report.checkpoints_checked += 1;
            if checkpoint.tenant_id != event.tenant_id || checkpoint.head != hash {
                report.broken = Some(broken(
                    position,
                    checkpoint.tenant_id,
                    &format!(
                        "the chain differs from the checkpoint signed at {} (the log before it \
                         was rewritten and resealed)",
                        checkpoint
                            .signed_at
                            .to_rfc3339_opts(SecondsFormat::Secs, true)
                    ),
                ));
                return Ok(report);
            }
            if let Some(public_key) = public_key {
                let valid = checkpoint.key_id == key_id(public_key)
                    && UnparsedPublicKey::new(&ED25519, public_key)
                        .verify(&checkpoint.message(), &checkpoint.signature)
                        .is_ok();
                if !valid {
                    report.broken = Some(broken(
                        position,
                        checkpoint.tenant_id,
                        "a checkpoint's signature does not verify with the audit key",
                    ));
                    return Ok(report);
                }
            }
        }
    }
    // A signed checkpoint whose position the walk never reached names an event that is gone,
    // or lies above a sealed point that was moved back.
    let now = sealed_now(store).await?;
    if let Some((position, checkpoint)) = checkpoints
        .into_iter()
        .filter(|(p, _)| *p <= sealed_up_to || *p > now)
        .find_map(|(p, c)| c.into_iter().next().map(|c| (p, c)))
    {
        report.broken = Some(broken(
            position,
            checkpoint.tenant_id,
            "a signed checkpoint names an event that is not in the sealed log",
        ));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Actor, StreamId};

    fn event(payload: &str) -> Result<RecordedEvent, StoreError> {
        let mut event = RecordedEvent::pending(
            Uuid::nil(),
            StreamId::new("user", Uuid::nil()),
            DateTime::from_timestamp_micros(1_700_000_000_000_001).unwrap_or_default(),
        );
        event.actor = Actor::System;
        event.payload = serde_json::value::RawValue::from_string(payload.into())
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        Ok(event)
    }

    #[test]
    fn canonical_bytes_ignore_key_order_and_whitespace() -> Result<(), StoreError> {
        let a = canonical(&event(r#"{"b": 1, "a": {"y": 2, "x": [1, 2]}}"#)?)?;
        let b = canonical(&event(r#"{"a":{"x":[1,2],"y":2},"b":1}"#)?)?;
        assert_eq!(a, b);
        let c = canonical(&event(r#"{"a":{"x":[2,1],"y":2},"b":1}"#)?)?;
        assert_ne!(a, c);
        Ok(())
    }

    #[test]
    fn checkpoints_verify_with_the_public_key_only() -> Result<(), StoreError> {
        let key = AuditKey::from_seed(&[7; 32])?;
        let checkpoint = key.sign(Uuid::nil(), 42, [1; 32]);
        let public = key.public_key();
        let check = |c: &SignedCheckpoint| {
            UnparsedPublicKey::new(&ED25519, &public)
                .verify(&c.message(), &c.signature)
                .is_ok()
        };
        assert!(check(&checkpoint));
        let mut forged = checkpoint.clone();
        forged.head = [2; 32];
        assert!(!check(&forged));
        Ok(())
    }
}
