//! Password hashing (argon2id) and the breached-password list.
//!
//! Hashing is deliberately slow and memory-hungry, so it never runs on the async workers: it
//! runs on one dedicated thread per core, each reusing its argon2 memory ([`Passwords`]).

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordVerifier};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use sha1::{Digest, Sha1};
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

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

/// Hashing and verification on dedicated threads, one per core.
///
/// Each thread keeps its argon2 memory (19 MiB, allocated at its first hash) for its whole
/// life instead of allocating it per hash: a fresh allocation per verify costs about a quarter of the throughput. Jobs wait
/// in one queue, so at most one hash runs per core (admission control: a burst queues
/// instead of time-slicing every hash into ten times its latency).
///
/// The queue is not let grow without bound for sign-ins: past [`ADMITTED_PER_THREAD`] checks
/// per thread, waiting or running, a sign-in is turned away at once ([`Passwords::admit`])
/// instead of waiting longer than its caller would (a burst of 3 000 at once had the last ones
/// time out after 30 s with an internal error, their checks still running for nobody).
#[derive(Clone)]
pub struct Passwords {
    jobs: std::sync::mpsc::Sender<Job>,
    breached: Arc<BreachedPasswords>,
    admitted: Arc<AtomicUsize>,
    admit_limit: usize,
}

/// Sign-in password checks admitted at most per hashing thread, waiting or running: about
/// five seconds of queue at 20 ms a verify.
pub const ADMITTED_PER_THREAD: usize = 256;

/// A sign-in's place among the admitted password checks, given back when dropped.
pub struct Admission {
    admitted: Arc<AtomicUsize>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.admitted.fetch_sub(1, Ordering::AcqRel);
    }
}

type Job = Box<dyn FnOnce(&mut Vec<Block>) + Send>;

fn params() -> Params {
    Params::new(MEMORY_KIB, ITERATIONS, 1, Some(OUTPUT_LEN)).unwrap_or_default()
}

/// Length of the stored hash.
const OUTPUT_LEN: usize = 32;
/// Length of generated salts.
const SALT_LEN: usize = 16;

/// Hashes `password` with `salt` and `params` into `out`, in `memory` (resized as needed).
fn hash_into(
    password: &[u8],
    salt: &[u8],
    params: Params,
    out: &mut [u8],
    memory: &mut Vec<Block>,
) -> Result<(), argon2::Error> {
    let blocks = params.block_count();
    if memory.len() != blocks {
        memory.resize(blocks, Block::default());
    }
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params).hash_password_into_with_memory(
        password,
        salt,
        out,
        &mut memory[..],
    )
}

/// A PHC string (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`) for a new hash.
fn hash_phc(password: &str, memory: &mut Vec<Block>) -> Result<String, String> {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD_NO_PAD;
    let mut salt = [0u8; SALT_LEN];
    argon2::password_hash::rand_core::RngCore::fill_bytes(&mut OsRng, &mut salt);
    let params = params();
    let mut out = [0u8; OUTPUT_LEN];
    hash_into(password.as_bytes(), &salt, params.clone(), &mut out, memory)
        .map_err(|e| e.to_string())?;
    Ok(format!(
        "$argon2id$v=19$m={},t={},p={}${}${}",
        params.m_cost(),
        params.t_cost(),
        params.p_cost(),
        STANDARD_NO_PAD.encode(salt),
        STANDARD_NO_PAD.encode(out)
    ))
}

/// Checks `password` against a PHC string, in `memory`.
fn verify_phc(password: &str, phc: &str, memory: &mut Vec<Block>) -> bool {
    use subtle::ConstantTimeEq;
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    if parsed.algorithm.as_str() != "argon2id" {
        // Anything else is checked by the crate (slower, but correct).
        return argon2()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok();
    }
    let (Ok(params), Some(salt), Some(expected)) =
        (Params::try_from(&parsed), parsed.salt, parsed.hash)
    else {
        return false;
    };
    let mut salt_bytes = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_bytes) else {
        return false;
    };
    let expected = expected.as_bytes();
    let mut out = vec![0u8; expected.len()];
    let params = match Params::new(
        params.m_cost(),
        params.t_cost(),
        params.p_cost(),
        Some(expected.len()),
    ) {
        Ok(params) => params,
        Err(_) => return false,
    };
    hash_into(password.as_bytes(), salt, params, &mut out, memory).is_ok()
        && bool::from(out.ct_eq(expected))
}

fn argon2() -> Argon2<'static> {
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params())
}

impl Passwords {
    /// One hashing thread per core.
    pub fn new(breached: BreachedPasswords) -> Self {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        Passwords::with_threads(breached, cores)
    }

    /// `threads` hashing threads.
    pub fn with_threads(breached: BreachedPasswords, threads: usize) -> Self {
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        let queue = Arc::new(std::sync::Mutex::new(queue));
        for n in 0..threads.max(1) {
            let queue = queue.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("argon2-{n}"))
                .spawn(move || {
                    // Allocated by the thread's first hash and kept: an idle process does
                    // not hold 19 MiB per core it has not used yet.
                    let mut memory: Vec<Block> = Vec::new();
                    loop {
                        let job = match queue.lock() {
                            Ok(queue) => queue.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(&mut memory),
                            Err(_) => return,
                        }
                    }
                });
            if let Err(error) = spawned {
                tracing::error!(%error, "could not start a hashing thread");
            }
        }
        Passwords {
            jobs,
            breached: Arc::new(breached),
            admitted: Arc::default(),
            admit_limit: threads.max(1) * ADMITTED_PER_THREAD,
        }
    }

    /// A place for one sign-in's password check, held until the check is done; `None` when
    /// [`ADMITTED_PER_THREAD`] per thread are already admitted (the caller answers "busy"
    /// before recording or checking anything).
    pub fn admit(&self) -> Option<Admission> {
        self.admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.admit_limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Admission {
                admitted: self.admitted.clone(),
            })
    }

    /// The breached-password list.
    pub fn breached(&self) -> &BreachedPasswords {
        &self.breached
    }

    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Vec<Block>) -> T + Send + 'static,
    ) -> Option<T> {
        let (done, result) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |memory| {
            let _ = done.send(work(memory));
        });
        self.jobs.send(job).ok()?;
        result.await.ok()
    }

    /// An argon2id PHC string for `password`.
    pub async fn hash(&self, password: String) -> Result<String, String> {
        self.run(move |memory| hash_phc(&password, memory))
            .await
            .unwrap_or_else(|| Err("hashing threads stopped".into()))
    }

    /// Whether `password` matches the PHC string `hash`. With no hash (an unknown user), a
    /// hash is still computed so that the answer takes the same time.
    pub async fn verify(&self, password: String, hash: Option<String>) -> bool {
        self.run(move |memory| match hash {
            Some(hash) => verify_phc(&password, &hash, memory),
            None => {
                let _ = hash_phc(&password, memory);
                false
            }
        })
        .await
        .unwrap_or(false)
    }

    /// Verifies on the calling thread with its own memory (the benchmark's raw baseline).
    pub fn verify_blocking(password: &str, hash: &str, memory: &mut Vec<Block>) -> bool {
        verify_phc(password, hash, memory)
    }

    /// Hashes on the calling thread (benchmark setup).
    pub fn hash_blocking(password: &str, memory: &mut Vec<Block>) -> Result<String, String> {
        hash_phc(password, memory)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::password_hash::{PasswordHasher, SaltString};

    #[test]
    fn admission_stops_at_its_limit_and_each_place_comes_back() {
        let passwords = Passwords::with_threads(BreachedPasswords::default(), 2);
        let limit = 2 * ADMITTED_PER_THREAD;
        let mut held: Vec<Admission> = (0..limit).filter_map(|_| passwords.admit()).collect();
        assert_eq!(held.len(), limit);
        assert!(
            passwords.admit().is_none(),
            "one past the limit is turned away"
        );
        assert!(
            passwords.clone().admit().is_none(),
            "clones share the count"
        );
        held.pop();
        let again = passwords.admit();
        assert!(again.is_some(), "a place given back can be taken");
        assert!(passwords.admit().is_none());
        drop(held);
        drop(again);
        let all: Vec<Admission> = (0..limit).filter_map(|_| passwords.admit()).collect();
        assert_eq!(all.len(), limit, "every place came back");
    }

    #[test]
    fn hashes_interoperate_with_the_argon2_crate() {
        let mut memory = Vec::new();
        let ours = hash_phc("hunter2 hunter2", &mut memory).unwrap_or_default();
        let parsed = PasswordHash::new(&ours);
        assert!(parsed.is_ok_and(|p| argon2().verify_password(b"hunter2 hunter2", &p).is_ok()));
        let salt = SaltString::generate(&mut OsRng);
        let theirs = argon2()
            .hash_password(b"hunter2 hunter2", &salt)
            .map(|h| h.to_string())
            .unwrap_or_default();
        assert!(verify_phc("hunter2 hunter2", &theirs, &mut memory));
        assert!(verify_phc("hunter2 hunter2", &ours, &mut memory));
        assert!(!verify_phc("hunter3 hunter3", &ours, &mut memory));
        assert!(!verify_phc("hunter2 hunter2", "not a hash", &mut memory));
    }
}
