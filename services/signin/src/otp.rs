//! TOTP (RFC 6238: SHA-1, 6 digits, 30 s) and recovery codes.
//!
//! totp-rs computes codes and draws the QR image; which steps may be accepted is decided here:
//! the current step ±1, and only steps *after* the last one accepted for the user, so a code
//! that worked once is refused again (replay protection is the caller's job in totp-rs).

use gatehouse_core::ApiError;
use rand::Rng;
use subtle::ConstantTimeEq;
use totp_rs::{Algorithm, Secret, TOTP};

/// Seconds per step.
pub const STEP_SECONDS: u64 = 30;
/// Recovery codes per set.
pub const RECOVERY_CODES: usize = 10;
/// Issuer shown in authenticator apps when the caller names none.
pub const DEFAULT_ISSUER: &str = "Gatehouse";

/// A new random secret (160 bits), base32.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 20];
    rand::rng().fill(&mut bytes);
    Secret::Raw(bytes.to_vec()).to_encoded().to_string()
}

fn totp(secret_base32: &str, issuer: Option<&str>, account: &str) -> Result<TOTP, ApiError> {
    let bytes = Secret::Encoded(secret_base32.to_string())
        .to_bytes()
        .map_err(|e| ApiError::Internal(format!("totp secret: {e:?}")))?;
    TOTP::new(
        Algorithm::SHA1,
        6,
        1,
        STEP_SECONDS,
        bytes,
        issuer.map(|i| i.replace(':', " ")),
        account.replace(':', " "),
    )
    .map_err(|e| ApiError::Internal(format!("totp: {e:?}")))
}

/// The `otpauth://` URI and its QR code (PNG).
pub fn enrollment(
    secret: &str,
    issuer: &str,
    account: &str,
) -> Result<(String, Vec<u8>), ApiError> {
    let totp = totp(secret, Some(issuer), account)?;
    let png = totp.get_qr_png().map_err(ApiError::Internal)?;
    Ok((totp.get_url(), png))
}

/// The step a code is accepted at: within ±1 of `now`'s step and after `last_step`; `None`
/// when the code matches no such step.
pub fn accept(secret: &str, code: &str, now_unix: u64, last_step: u64) -> Option<u64> {
    let code = code.trim();
    if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let totp = totp(secret, None, "user").ok()?;
    let current = now_unix / STEP_SECONDS;
    let mut accepted = None;
    // Every candidate is computed and compared, so the time does not tell which matched.
    for step in current.saturating_sub(1)..=current + 1 {
        let expected = totp.generate(step * STEP_SECONDS);
        let matches: bool = expected.as_bytes().ct_eq(code.as_bytes()).into();
        if matches && step > last_step && accepted.is_none() {
            accepted = Some(step);
        }
    }
    accepted
}

/// The code for `unix` (for tests and the benchmark's client side).
pub fn code_at(secret: &str, unix: u64) -> Result<String, ApiError> {
    Ok(totp(secret, None, "user")?.generate(unix))
}

/// Ten recovery codes, `xxxxx-xxxxx` in an alphabet without look-alikes (50 bits each).
pub fn new_recovery_codes() -> Vec<String> {
    const ALPHABET: &[u8] = b"23456789abcdefghjkmnpqrstuvwxyz";
    let mut rng = rand::rng();
    (0..RECOVERY_CODES)
        .map(|_| {
            let mut code = String::with_capacity(11);
            for i in 0..10 {
                if i == 5 {
                    code.push('-');
                }
                code.push(ALPHABET[rng.random_range(0..ALPHABET.len())] as char);
            }
            code
        })
        .collect()
}

/// A recovery code as typed, normalised (case, spaces and dashes do not matter).
pub fn normalize_recovery_code(code: &str) -> String {
    code.chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .take(32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_code_is_accepted_once_within_the_window() {
        let secret = new_secret();
        let now = 1_800_000_000u64;
        let code = code_at(&secret, now).unwrap_or_default();
        let step = now / STEP_SECONDS;
        assert_eq!(accept(&secret, &code, now, 0), Some(step));
        // Replay: the step is no longer after the last accepted one.
        assert_eq!(accept(&secret, &code, now, step), None);
        // One step late still works; two do not.
        assert_eq!(accept(&secret, &code, now + STEP_SECONDS, 0), Some(step));
        assert_eq!(accept(&secret, &code, now + 2 * STEP_SECONDS, 0), None);
        assert_eq!(accept(&secret, "12345", now, 0), None);
        assert_eq!(accept(&secret, "abcdef", now, 0), None);
    }

    #[test]
    fn recovery_codes_are_distinct_and_normalise() {
        let codes = new_recovery_codes();
        assert_eq!(codes.len(), RECOVERY_CODES);
        let distinct: std::collections::HashSet<_> = codes.iter().collect();
        assert_eq!(distinct.len(), RECOVERY_CODES);
        let code = &codes[0];
        assert_eq!(
            normalize_recovery_code(&format!(" {} ", code.to_uppercase())),
            normalize_recovery_code(code)
        );
    }
}
