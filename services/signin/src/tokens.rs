//! Signing keys and JWTs.
//!
//! Each tenant has a `signing_keys/<tenant id>` stream: every `SigningKeyAdded` makes a new
//! ES256 (P-256) key current. The private scalar is sealed with the tenant's data key; the
//! public point is in clear so the JWKS can be served from the log. A superseded key stays
//! published until the last token it signed has expired (`publish_until`).
//!
//! Keys are generated with the `p256` crate; signing and verification use `ring`, whose
//! P-256 is several times faster (signing was most of a refresh's CPU with `p256`).
//!
//! JWTs are compact JWS with `alg` pinned to `ES256` on both sides: a token whose header says
//! anything else (`none`, `HS256` with the public key as a secret, ...) or names an unknown
//! `kid` is refused before any signature is checked. Parsed keys are cached per tenant (parsing
//! per token costs 1.4–1.9×); the cache is refreshed when a `kid` is unknown or it is older
//! than [`CACHE_TTL`], so a key rotated by another process is picked up.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Duration, Utc};
use gatehouse_core::ApiError;
use gatehouse_core::crypto::{Crypto, Sealed};
use gatehouse_directory::tenant::TokenLifetimes;
use gatehouse_events::{
    Aggregate, DomainEvent, EventStore, Loaded, Metadata, RecordedEvent, execute,
};
use p256::ecdsa::SigningKey;
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, UnparsedPublicKey,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use uuid::Uuid;

/// The only algorithm issued and accepted.
pub const ALG: &str = "ES256";
/// How long parsed keys are trusted before the stream is read again.
pub const CACHE_TTL: Duration = Duration::seconds(30);
/// Clock skew tolerated on `exp` / `nbf`.
pub const LEEWAY_SECONDS: i64 = 30;

/// Events of a tenant's signing-key stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum SigningKeyEvent {
    /// A new current key; the previous one stays published until `previous_publish_until`.
    SigningKeyAdded {
        /// Key id.
        kid: String,
        /// `ES256`.
        alg: String,
        /// Public point, base64url.
        x: String,
        /// Public point, base64url.
        y: String,
        /// The private scalar (base64url), sealed with the tenant's data key.
        private: Sealed,
        /// Until when the key it replaces must stay published.
        previous_publish_until: Option<DateTime<Utc>>,
    },
}

impl DomainEvent for SigningKeyEvent {}

/// A key as recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Key id.
    pub kid: String,
    /// Public point.
    pub x: String,
    /// Public point.
    pub y: String,
    /// Sealed private scalar.
    pub private: Sealed,
    /// `None` while current.
    pub publish_until: Option<DateTime<Utc>>,
}

/// A tenant's signing keys, oldest first; the last is current.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct SigningKeys {
    /// The keys.
    pub keys: Vec<KeyRecord>,
}

impl Aggregate for SigningKeys {
    const STREAM_TYPE: &'static str = "signing_keys";
    type Event = SigningKeyEvent;

    fn apply(&mut self, event: SigningKeyEvent, _: &RecordedEvent) {
        let SigningKeyEvent::SigningKeyAdded {
            kid,
            x,
            y,
            private,
            previous_publish_until,
            ..
        } = event;
        if let Some(previous) = self.keys.last_mut() {
            previous.publish_until = previous_publish_until;
        }
        self.keys.push(KeyRecord {
            kid,
            x,
            y,
            private,
            publish_until: None,
        });
    }
}

impl SigningKeys {
    /// Keys a verifier may still meet at `now`.
    pub fn published(&self, now: DateTime<Utc>) -> impl Iterator<Item = &KeyRecord> {
        self.keys
            .iter()
            .filter(move |k| k.publish_until.is_none_or(|until| until > now))
    }
}

/// A tenant's keys, parsed.
struct TenantKeys {
    loaded_at: DateTime<Utc>,
    current: Option<(String, Arc<EcdsaKeyPair>)>,
    verifying: HashMap<String, UnparsedPublicKey<Vec<u8>>>,
    jwks: Value,
}

/// Signs and verifies the tenants' JWTs.
pub struct Keys {
    store: Arc<dyn EventStore>,
    crypto: Arc<Crypto>,
    issuer_base: String,
    cache: Mutex<HashMap<Uuid, Arc<TenantKeys>>>,
    rng: SystemRandom,
}

/// Why a token was refused (never more precise than this towards a caller).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a compact JWS, or not JSON.
    #[error("malformed token")]
    Malformed,
    /// `alg` is not ES256.
    #[error("algorithm not accepted")]
    Algorithm,
    /// No such key.
    #[error("unknown signing key")]
    UnknownKey,
    /// Bad signature.
    #[error("bad signature")]
    Signature,
    /// Wrong issuer, expired or not yet valid.
    #[error("token not valid now")]
    Claims,
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn generate() -> (SigningKey, String, String, String) {
    let mut seed = [0u8; 32];
    loop {
        rand::Rng::fill(&mut rand::rng(), &mut seed);
        if let Ok(key) = SigningKey::from_slice(&seed) {
            let point = key.verifying_key().to_encoded_point(false);
            let x = point.x().map(|x| b64(x)).unwrap_or_default();
            let y = point.y().map(|y| b64(y)).unwrap_or_default();
            return (key, b64(&seed), x, y);
        }
    }
}

/// The uncompressed SEC1 point `04 ‖ x ‖ y` of a published key.
fn public_point(x: &str, y: &str) -> Option<Vec<u8>> {
    let x = URL_SAFE_NO_PAD.decode(x).ok()?;
    let y = URL_SAFE_NO_PAD.decode(y).ok()?;
    if x.len() != 32 || y.len() != 32 {
        return None;
    }
    let mut point = Vec::with_capacity(65);
    point.push(4);
    point.extend_from_slice(&x);
    point.extend_from_slice(&y);
    // Only points on the curve: ring checks when verifying; p256 checks here.
    p256::PublicKey::from_sec1_bytes(&point).ok()?;
    Some(point)
}

fn verifying_key(x: &str, y: &str) -> Option<UnparsedPublicKey<Vec<u8>>> {
    public_point(x, y).map(|point| UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point))
}

/// A ring signing key from the private scalar and the public point.
fn key_pair(scalar: &[u8], x: &str, y: &str) -> Option<EcdsaKeyPair> {
    let point = public_point(x, y)?;
    EcdsaKeyPair::from_private_key_and_public_key(
        &ECDSA_P256_SHA256_FIXED_SIGNING,
        scalar,
        &point,
        &SystemRandom::new(),
    )
    .ok()
}

impl Keys {
    /// Keys for tenants under `issuer_base` (e.g. `https://id.example.com`).
    pub fn new(store: Arc<dyn EventStore>, crypto: Arc<Crypto>, issuer_base: String) -> Self {
        Keys {
            store,
            crypto,
            issuer_base: issuer_base.trim_end_matches('/').to_string(),
            cache: Mutex::new(HashMap::new()),
            rng: SystemRandom::new(),
        }
    }

    /// The `iss` of a tenant's tokens.
    pub fn issuer(&self, tenant_id: Uuid) -> String {
        format!("{}/tenants/{tenant_id}", self.issuer_base)
    }

    /// Adds a key to a tenant: the first one when `rotate` is false and it has none, a new
    /// current one when `rotate` is true.
    pub async fn add_key(
        &self,
        tenant_id: Uuid,
        lifetimes: &TokenLifetimes,
        rotate: bool,
        metadata: &Metadata,
    ) -> Result<(), ApiError> {
        let (_, private, x, y) = generate();
        let sealed = self.crypto.seal(tenant_id, tenant_id, &private).await?;
        let kid = Uuid::new_v4().simple().to_string();
        let longest = lifetimes
            .access_token_seconds
            .max(lifetimes.id_token_seconds);
        let publish_until = Utc::now() + Duration::seconds(i64::from(longest) + LEEWAY_SECONDS);
        execute::<SigningKeys, ApiError, _>(
            self.store.as_ref(),
            tenant_id,
            tenant_id,
            metadata,
            |state| {
                if !rotate && !state.keys.is_empty() {
                    return Ok(Vec::new());
                }
                Ok(vec![SigningKeyEvent::SigningKeyAdded {
                    kid: kid.clone(),
                    alg: ALG.into(),
                    x: x.clone(),
                    y: y.clone(),
                    private: sealed.clone(),
                    previous_publish_until: Some(publish_until),
                }])
            },
        )
        .await?;
        self.forget(tenant_id);
        Ok(())
    }

    /// Drops a tenant's cached keys.
    pub fn forget(&self, tenant_id: Uuid) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.remove(&tenant_id);
        }
    }

    async fn load(&self, tenant_id: Uuid, fresh: bool) -> Result<Arc<TenantKeys>, ApiError> {
        let now = Utc::now();
        if !fresh
            && let Some(keys) = self
                .cache
                .lock()
                .ok()
                .and_then(|c| c.get(&tenant_id).cloned())
            && now - keys.loaded_at < CACHE_TTL
        {
            return Ok(keys);
        }
        let state = Loaded::<SigningKeys>::load(self.store.as_ref(), tenant_id)
            .await?
            .state;
        let mut verifying = HashMap::new();
        let mut jwks = Vec::new();
        for key in state.published(now) {
            if let Some(parsed) = verifying_key(&key.x, &key.y) {
                verifying.insert(key.kid.clone(), parsed);
                jwks.push(json!({
                    "kty": "EC", "crv": "P-256", "use": "sig", "alg": ALG,
                    "kid": key.kid, "x": key.x, "y": key.y,
                }));
            }
        }
        let current = match state.keys.last() {
            Some(record) => {
                let scalar: Option<String> = self.crypto.open(tenant_id, &record.private).await?;
                let key = scalar
                    .and_then(|s| URL_SAFE_NO_PAD.decode(s).ok())
                    .and_then(|bytes| key_pair(&bytes, &record.x, &record.y))
                    .ok_or_else(|| ApiError::Internal("signing key unreadable".into()))?;
                Some((record.kid.clone(), Arc::new(key)))
            }
            None => None,
        };
        let keys = Arc::new(TenantKeys {
            loaded_at: now,
            current,
            verifying,
            jwks: json!({ "keys": jwks }),
        });
        if let Ok(mut cache) = self.cache.lock() {
            cache.insert(tenant_id, keys.clone());
        }
        Ok(keys)
    }

    /// The tenant's JWKS document.
    pub async fn jwks(&self, tenant_id: Uuid) -> Result<Value, ApiError> {
        Ok(self.load(tenant_id, false).await?.jwks.clone())
    }

    /// Signs `claims` with the tenant's current key (creating the first key when needed).
    pub async fn sign(
        &self,
        tenant_id: Uuid,
        lifetimes: &TokenLifetimes,
        claims: &Value,
        metadata: &Metadata,
    ) -> Result<String, ApiError> {
        let mut keys = self.load(tenant_id, false).await?;
        if keys.current.is_none() {
            self.add_key(tenant_id, lifetimes, false, metadata).await?;
            keys = self.load(tenant_id, true).await?;
        }
        let Some((kid, key)) = &keys.current else {
            return Err(ApiError::Internal("no signing key".into()));
        };
        let header = json!({ "alg": ALG, "typ": "JWT", "kid": kid });
        let signing_input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let signature = key
            .sign(&self.rng, signing_input.as_bytes())
            .map_err(|_| ApiError::Internal("signing failed".into()))?;
        Ok(format!("{signing_input}.{}", b64(signature.as_ref())))
    }

    /// Checks a token of `tenant_id`: ES256 only, a published key, the tenant's issuer, not
    /// expired. Returns its claims.
    pub async fn verify(
        &self,
        tenant_id: Uuid,
        token: &str,
        now: DateTime<Utc>,
    ) -> Result<Value, TokenError> {
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let decode = |part: &str| {
            URL_SAFE_NO_PAD
                .decode(part)
                .map_err(|_| TokenError::Malformed)
        };
        let header: Value =
            serde_json::from_slice(&decode(header)?).map_err(|_| TokenError::Malformed)?;
        if header.get("alg").and_then(Value::as_str) != Some(ALG) {
            return Err(TokenError::Algorithm);
        }
        let kid = header
            .get("kid")
            .and_then(Value::as_str)
            .ok_or(TokenError::UnknownKey)?;
        let mut keys = self
            .load(tenant_id, false)
            .await
            .map_err(|_| TokenError::UnknownKey)?;
        if !keys.verifying.contains_key(kid) {
            keys = self
                .load(tenant_id, true)
                .await
                .map_err(|_| TokenError::UnknownKey)?;
        }
        let key = keys.verifying.get(kid).ok_or(TokenError::UnknownKey)?;
        let signature = decode(signature)?;
        let signing_input =
            &token[..token.len() - token.rsplit('.').next().map_or(0, str::len) - 1];
        key.verify(signing_input.as_bytes(), &signature)
            .map_err(|_| TokenError::Signature)?;
        let claims: Value =
            serde_json::from_slice(&decode(payload)?).map_err(|_| TokenError::Malformed)?;
        let now = now.timestamp();
        let exp = claims.get("exp").and_then(Value::as_i64);
        let nbf = claims.get("nbf").and_then(Value::as_i64).unwrap_or(0);
        if claims.get("iss").and_then(Value::as_str) != Some(self.issuer(tenant_id).as_str())
            || exp.is_none_or(|exp| exp + LEEWAY_SECONDS <= now)
            || nbf > now + LEEWAY_SECONDS
        {
            return Err(TokenError::Claims);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_sign_and_verify_through_their_encodings() {
        let (key, private, x, y) = generate();
        let scalar = URL_SAFE_NO_PAD.decode(&private).unwrap_or_default();
        assert!(SigningKey::from_slice(&scalar).is_ok_and(|r| r == key));
        let pair = key_pair(&scalar, &x, &y);
        let signature = pair
            .as_ref()
            .and_then(|p| p.sign(&SystemRandom::new(), b"message").ok());
        let verifying = verifying_key(&x, &y);
        assert!(
            verifying
                .as_ref()
                .zip(signature.as_ref())
                .is_some_and(|(v, s)| v.verify(b"message", s.as_ref()).is_ok())
        );
        assert!(verifying.is_some_and(|v| v.verify(b"other", &[0u8; 64]).is_err()));
        assert!(verifying_key("AAAA", &y).is_none());
        // A scalar that does not match the point is refused.
        let (_, other, _, _) = generate();
        let other = URL_SAFE_NO_PAD.decode(&other).unwrap_or_default();
        assert!(key_pair(&other, &x, &y).is_none());
    }
}
