//! Password hashing (argon2id) and the breached-password list.
//!
//! Hashing is deliberately slow and memory-hungry, so it never runs on the async workers:
//! each hash or verify takes a permit (one per core) and runs on tokio's blocking pool. A burst
//! of sign-ups queues for permits instead of starving every other request.

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use sha1::{Digest, Sha1};
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// OWASP's argon2id minimum: m = 19 MiB, t = 2, p = 1.
pub const MEMORY_KIB: u32 = 19_456;
/// Passes.
pub const ITERATIONS: u32 = 2;

/// Common passwords refused even without a breached-password file.
const BUILT_IN_BREACHED: &[&str] = &[
    "123456",
    "123456789",
    "12345678",
    "password",
    "qwerty123",
    "qwerty1",
    "111111",
    "12345",
    "secret",
    "123123",
    "1234567890",
    "1234567",
    "000000",
    "qwerty",
    "abc123",
    "password1",
    "iloveyou",
    "11111111",
    "dragon",
    "monkey",
    "123123123",
    "123321",
    "qwertyuiop",
    "00000000",
    "Password",
    "654321",
    "target123",
    "tinkle",
    "zag12wsx",
    "gwerty123",
    "1q2w3e4r",
    "1q2w3e4r5t",
    "password123",
    "Password1",
    "Password123",
    "welcome",
    "welcome1",
    "admin123",
    "letmein",
    "football",
    "baseball",
    "sunshine",
    "princess",
    "starwars",
    "whatever",
    "trustno1",
    "passw0rd",
    "Passw0rd",
    "p@ssw0rd",
    "P@ssw0rd",
    "changeme",
    "aa123456",
    "azerty",
    "1qaz2wsx",
];

/// SHA-1 digests of known-breached passwords (the HIBP format).
#[derive(Debug, Default)]
pub struct BreachedPasswords {
    digests: HashSet<[u8; 20]>,
}

impl BreachedPasswords {
    /// The built-in list, plus `file` when given: one `SHA1HEX` or `SHA1HEX:COUNT` per line
    /// (Have I Been Pwned's downloadable format, upper or lower case).
    pub fn load(file: Option<&Path>) -> std::io::Result<Self> {
        let mut digests: HashSet<[u8; 20]> = BUILT_IN_BREACHED.iter().map(|p| sha1(p)).collect();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)?;
            for (number, line) in text.lines().enumerate() {
                let hex = line.split(':').next().unwrap_or_default().trim();
                if hex.is_empty() {
                    continue;
                }
                let digest = hex::decode(hex)
                    .ok()
                    .and_then(|bytes| <[u8; 20]>::try_from(bytes).ok())
                    .ok_or_else(|| {
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("{}:{}: not a SHA-1 hex digest", path.display(), number + 1),
                        )
                    })?;
                digests.insert(digest);
            }
        }
        Ok(BreachedPasswords { digests })
    }

    /// True when the password is on the list.
    pub fn contains(&self, password: &str) -> bool {
        self.digests.contains(&sha1(password))
    }
}

fn sha1(password: &str) -> [u8; 20] {
    Sha1::digest(password.as_bytes()).into()
}

/// Hashing and verification on the blocking pool, one at a time per core.
#[derive(Clone)]
pub struct Passwords {
    permits: Arc<Semaphore>,
    breached: Arc<BreachedPasswords>,
}

fn argon2() -> Argon2<'static> {
    let params = Params::new(MEMORY_KIB, ITERATIONS, 1, None).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

impl Passwords {
    /// One hashing permit per core.
    pub fn new(breached: BreachedPasswords) -> Self {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        Passwords {
            permits: Arc::new(Semaphore::new(cores)),
            breached: Arc::new(breached),
        }
    }

    /// The breached-password list.
    pub fn breached(&self) -> &BreachedPasswords {
        &self.breached
    }

    /// An argon2id PHC string for `password`.
    pub async fn hash(&self, password: String) -> Result<String, String> {
        let _permit = self.permits.acquire().await.map_err(|e| e.to_string())?;
        tokio::task::spawn_blocking(move || {
            let salt = SaltString::generate(&mut OsRng);
            argon2()
                .hash_password(password.as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// Whether `password` matches the PHC string `hash`. With no hash (an unknown user), a
    /// hash is still computed so that the answer takes the same time.
    pub async fn verify(&self, password: String, hash: Option<String>) -> bool {
        let Ok(_permit) = self.permits.acquire().await else {
            return false;
        };
        tokio::task::spawn_blocking(move || match hash.as_deref().map(PasswordHash::new) {
            Some(Ok(parsed)) => argon2()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok(),
            _ => {
                let salt = SaltString::generate(&mut OsRng);
                let _ = argon2().hash_password(password.as_bytes(), &salt);
                false
            }
        })
        .await
        .unwrap_or(false)
    }
}
