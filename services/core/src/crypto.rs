//! Personal data and secrets at rest.
//!
//! - The **master key** (32 bytes: `GATEHOUSE_MASTER_KEY`, base64url, or `<data>/master.key`
//!   created on first start) wraps every subject's data key and derives the keys of blind
//!   indexes and code digests. Every replica of a deployment needs the same master key.
//! - Each **subject** (a user) has its own random data key, stored wrapped in the store's
//!   `subject_keys` table, outside the event payloads. Personal data in events is sealed with
//!   it (XChaCha20-Poly1305, random 192-bit nonces). Erasing the subject destroys the key: the
//!   log stays whole and replayable while the sealed fields become unreadable.
//! - **Blind indexes** (HMAC-SHA256) stand in for personal data where equality is needed, such
//!   as the unique claim on an email, so no claim holds an address in clear.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use gatehouse_events::{EventStore, StoreError};
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::path::Path;
use std::sync::Arc;
use uuid::Uuid;

/// Why sealing or opening failed.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A sealed value or wrapped key did not authenticate (tampered, or another master key).
    #[error("sealed data does not authenticate")]
    Tampered,
    /// The master key is malformed.
    #[error("master key: {0}")]
    MasterKey(String),
}

/// Bytes sealed for one subject: base64url(nonce ‖ ciphertext ‖ tag).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Sealed(pub String);

/// The master key and the subject keys it wraps.
///
/// Unwrapped subject keys are cached (every sign-in step opens sealed data, and each fetch was
/// a store round trip). An erased subject is remembered as erased, never cached again, and
/// evicted: by [`Crypto::erase`] in this process, and by [`Crypto::follow_erasures`] for
/// `UserErased` events appended by any process.
pub struct Crypto {
    master: [u8; 32],
    store: Arc<dyn EventStore>,
    keys: std::sync::Mutex<std::collections::HashMap<Uuid, [u8; 32]>>,
    erased: std::sync::Mutex<std::collections::HashSet<Uuid>>,
}

/// Most subject keys kept unwrapped in memory (about 6 MiB); the cache starts over when full.
const KEY_CACHE: usize = 100_000;

fn hmac_with(key: &[u8]) -> Hmac<Sha256> {
    match <Hmac<Sha256> as Mac>::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    }
}

fn seal_with(key: &[u8; 32], plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
    let cipher = XChaCha20Poly1305::new(key.into());
    let mut nonce = [0u8; 24];
    rand::rng().fill_bytes(&mut nonce);
    let mut out = nonce.to_vec();
    // Encryption with a valid key and nonce cannot fail.
    if let Ok(ciphertext) = cipher.encrypt(
        XNonce::from_slice(&nonce),
        Payload {
            msg: plaintext,
            aad,
        },
    ) {
        out.extend(ciphertext);
    }
    out
}

fn open_with(key: &[u8; 32], sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
    if sealed.len() < 24 + 16 {
        return Err(CryptoError::Tampered);
    }
    let (nonce, ciphertext) = sealed.split_at(24);
    XChaCha20Poly1305::new(key.into())
        .decrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad,
            },
        )
        .map_err(|_| CryptoError::Tampered)
}

impl Crypto {
    /// Uses `master` over `store`'s subject keys.
    pub fn new(master: [u8; 32], store: Arc<dyn EventStore>) -> Self {
        Crypto {
            master,
            store,
            keys: Default::default(),
            erased: Default::default(),
        }
    }

    /// Forgets erased users' keys as their `UserErased` events arrive from the log (from any
    /// process). Runs until the store's subscription ends.
    pub async fn follow_erasures(self: Arc<Self>) {
        let filter = gatehouse_events::EventFilter {
            event_types: vec!["UserErased".into()],
            ..Default::default()
        };
        let mut erasures = Box::pin(gatehouse_events::subscription::subscribe(
            self.store.clone(),
            0,
            filter,
        ));
        while let Some(event) = futures::StreamExt::next(&mut erasures).await {
            match event {
                Ok(event) => self.forget(event.stream.id),
                Err(error) => {
                    tracing::warn!(%error, "erasure follower stopped; clearing the key cache");
                    self.clear();
                    return;
                }
            }
        }
    }

    fn forget(&self, subject_id: Uuid) {
        if let Ok(mut erased) = self.erased.lock() {
            erased.insert(subject_id);
        }
        if let Ok(mut keys) = self.keys.lock() {
            keys.remove(&subject_id);
        }
    }

    fn clear(&self) {
        if let Ok(mut keys) = self.keys.lock() {
            keys.clear();
        }
    }

    fn cached(&self, subject_id: Uuid) -> Result<Option<[u8; 32]>, ()> {
        if self.erased.lock().is_ok_and(|e| e.contains(&subject_id)) {
            return Err(());
        }
        Ok(self
            .keys
            .lock()
            .ok()
            .and_then(|keys| keys.get(&subject_id).copied()))
    }

    fn remember(&self, subject_id: Uuid, key: [u8; 32]) {
        if let Ok(mut keys) = self.keys.lock() {
            if keys.len() >= KEY_CACHE {
                keys.clear();
            }
            keys.insert(subject_id, key);
        }
    }

    /// The master key from `configured` (base64url of 32 bytes), else `<data>/master.key`,
    /// created (mode 0600) when missing.
    pub fn load_master_key(
        configured: Option<&str>,
        data_dir: &Path,
    ) -> Result<[u8; 32], CryptoError> {
        let decode = |text: &str| -> Result<[u8; 32], CryptoError> {
            let bytes = URL_SAFE_NO_PAD
                .decode(text.trim())
                .map_err(|e| CryptoError::MasterKey(format!("not base64url: {e}")))?;
            bytes
                .try_into()
                .map_err(|_| CryptoError::MasterKey("must be 32 bytes".into()))
        };
        if let Some(text) = configured {
            return decode(text);
        }
        let path = data_dir.join("master.key");
        match std::fs::read_to_string(&path) {
            Ok(text) => decode(&text),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                rand::rng().fill_bytes(&mut key);
                crate::files::write_secret(&path, &URL_SAFE_NO_PAD.encode(key))
                    .map_err(|e| CryptoError::MasterKey(format!("{}: {e}", path.display())))?;
                Ok(key)
            }
            Err(error) => Err(CryptoError::MasterKey(format!(
                "{}: {error}",
                path.display()
            ))),
        }
    }

    fn derived(&self, purpose: &str) -> Hmac<Sha256> {
        let mut mac = hmac_with(&self.master);
        mac.update(purpose.as_bytes());
        hmac_with(&mac.finalize().into_bytes())
    }

    /// The Ed25519 key that signs the log's integrity checkpoints, derived from the master key:
    /// every replica derives the same key and the database never holds it.
    pub fn audit_key(&self) -> Result<gatehouse_events::integrity::AuditKey, CryptoError> {
        let seed: [u8; 32] = self
            .derived("gatehouse audit signing v1")
            .finalize()
            .into_bytes()
            .into();
        Ok(gatehouse_events::integrity::AuditKey::from_seed(&seed)?)
    }

    /// Seals `value` (as JSON) for the process itself, e.g. into a browser cookie: encrypted
    /// and authenticated under a key derived from the master key for `purpose`, so that every
    /// replica opens it, nobody else reads or forges it, and a value sealed for one purpose
    /// does not open as another.
    pub fn seal_token<T: Serialize>(&self, purpose: &str, value: &T) -> String {
        let key = self.token_key(purpose);
        let plaintext = serde_json::to_vec(value).unwrap_or_default();
        URL_SAFE_NO_PAD.encode(seal_with(&key, &plaintext, purpose.as_bytes()))
    }

    /// Opens what [`Crypto::seal_token`] sealed for `purpose`; `None` when it was not (or was
    /// altered).
    pub fn open_token<T: serde::de::DeserializeOwned>(
        &self,
        purpose: &str,
        token: &str,
    ) -> Option<T> {
        let bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
        let plaintext = open_with(&self.token_key(purpose), &bytes, purpose.as_bytes()).ok()?;
        serde_json::from_slice(&plaintext).ok()
    }

    fn token_key(&self, purpose: &str) -> [u8; 32] {
        let mut mac = self.derived("gatehouse sealed token v1");
        mac.update(purpose.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// A stable, non-reversible stand-in for `value` (hex), unique per tenant and scope.
    pub fn blind_index(&self, tenant_id: Uuid, scope: &str, value: &str) -> String {
        let mut mac = self.derived("gatehouse blind index v1");
        mac.update(tenant_id.as_bytes());
        mac.update(scope.as_bytes());
        mac.update(&[0]);
        mac.update(value.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// A digest of a one-time code for one subject and purpose (what events keep of codes).
    pub fn code_digest(&self, subject_id: Uuid, purpose: &str, code: &str) -> String {
        let mut mac = self.derived("gatehouse code v1");
        mac.update(subject_id.as_bytes());
        mac.update(purpose.as_bytes());
        mac.update(&[0]);
        mac.update(code.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// Compares a code with a digest in constant time.
    pub fn code_matches(&self, subject_id: Uuid, purpose: &str, code: &str, digest: &str) -> bool {
        use subtle::ConstantTimeEq;
        self.code_digest(subject_id, purpose, code)
            .as_bytes()
            .ct_eq(digest.as_bytes())
            .into()
    }

    async fn subject_key(
        &self,
        tenant_id: Uuid,
        subject_id: Uuid,
        create: bool,
    ) -> Result<Option<[u8; 32]>, CryptoError> {
        match self.cached(subject_id) {
            Err(()) => return Ok(None),
            Ok(Some(key)) => return Ok(Some(key)),
            Ok(None) => {}
        }
        let wrapped = match self.store.subject_key(subject_id).await? {
            Some(wrapped) => wrapped,
            None if create => {
                let mut key = [0u8; 32];
                rand::rng().fill_bytes(&mut key);
                let wrapped = seal_with(&self.master, &key, subject_id.as_bytes());
                // Another request may have created it first: use whichever was stored.
                self.store
                    .put_subject_key(subject_id, tenant_id, wrapped)
                    .await?
            }
            None => return Ok(None),
        };
        let key = open_with(&self.master, &wrapped, subject_id.as_bytes())?;
        let key: [u8; 32] = key.try_into().map_err(|_| CryptoError::Tampered)?;
        self.remember(subject_id, key);
        Ok(Some(key))
    }

    /// Seals `value` (as JSON) for a subject, creating its data key on first use.
    pub async fn seal<T: Serialize>(
        &self,
        tenant_id: Uuid,
        subject_id: Uuid,
        value: &T,
    ) -> Result<Sealed, CryptoError> {
        let key = self
            .subject_key(tenant_id, subject_id, true)
            .await?
            .ok_or(CryptoError::Tampered)?;
        let plaintext =
            serde_json::to_vec(value).map_err(|e| CryptoError::MasterKey(e.to_string()))?;
        Ok(Sealed(URL_SAFE_NO_PAD.encode(seal_with(
            &key,
            &plaintext,
            subject_id.as_bytes(),
        ))))
    }

    /// Opens a subject's sealed value; `None` once the subject is erased.
    pub async fn open<T: serde::de::DeserializeOwned>(
        &self,
        subject_id: Uuid,
        sealed: &Sealed,
    ) -> Result<Option<T>, CryptoError> {
        let Some(key) = self.subject_key(Uuid::nil(), subject_id, false).await? else {
            return Ok(None);
        };
        let bytes = URL_SAFE_NO_PAD
            .decode(&sealed.0)
            .map_err(|_| CryptoError::Tampered)?;
        let plaintext = open_with(&key, &bytes, subject_id.as_bytes())?;
        serde_json::from_slice(&plaintext)
            .map(Some)
            .map_err(|_| CryptoError::Tampered)
    }

    /// Destroys a subject's data key: everything sealed for it becomes unreadable.
    pub async fn erase(&self, subject_id: Uuid) -> Result<(), CryptoError> {
        self.forget(subject_id);
        Ok(self.store.destroy_subject_key(subject_id).await?)
    }
}
