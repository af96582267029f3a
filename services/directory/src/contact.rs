//! Email addresses and phone numbers: normalisation and validation.

use unicode_normalization::UnicodeNormalization;

/// Longest email address (RFC 5321 path limit).
pub const MAX_EMAIL: usize = 254;

/// Trims, applies Unicode NFKC and lowercases the whole address, then checks its shape.
/// Lowercasing the local part is a deliberate choice: two customers whose addresses differ only
/// by case are one mailbox in practice, and treating them as two enables look-alike accounts.
pub fn normalize_email(raw: &str) -> Result<String, &'static str> {
    let email: String = raw.trim().nfkc().collect::<String>().to_lowercase();
    if email.is_empty() {
        return Err("is required");
    }
    if email.chars().count() > MAX_EMAIL {
        return Err("must be at most 254 characters");
    }
    let Some((local, domain)) = email.rsplit_once('@') else {
        return Err("must be an email address");
    };
    let bad_char = |c: char| {
        c.is_whitespace()
            || c.is_control()
            || matches!(
                c,
                '<' | '>' | '(' | ')' | ',' | ';' | ':' | '\\' | '"' | '[' | ']' | '@'
            )
    };
    if local.is_empty()
        || local.len() > 64
        || local.chars().any(bad_char)
        || local.starts_with('.')
        || local.ends_with('.')
        || local.contains("..")
    {
        return Err("must be an email address");
    }
    let labels: Vec<&str> = domain.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_alphanumeric() || c == '-')
    };
    if domain.len() > 253 || labels.len() < 2 || !labels.iter().all(label_ok) {
        return Err("must be an email address");
    }
    Ok(email)
}

/// Checks an E.164 number: `+`, then 8 to 15 digits, the first not 0.
pub fn validate_phone(phone: &str) -> Result<String, &'static str> {
    let phone = phone.trim();
    let digits = phone
        .strip_prefix('+')
        .ok_or("must be in E.164 form, e.g. +14155550100")?;
    if !(8..=15).contains(&digits.len())
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || digits.starts_with('0')
    {
        return Err("must be in E.164 form, e.g. +14155550100");
    }
    Ok(phone.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_trimmed_folded_and_case_insensitive() {
        assert_eq!(
            normalize_email("  Ada.Lovelace@Example.COM "),
            Ok("ada.lovelace@example.com".into())
        );
        // NFKC: a full-width letter becomes its ASCII form.
        assert_eq!(
            normalize_email("ａda@example.com"),
            Ok("ada@example.com".into())
        );
        assert_eq!(normalize_email("ÄDA@bücher.de"), Ok("äda@bücher.de".into()));
    }

    #[test]
    fn malformed_emails_are_refused() {
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.com",
            "ada@example",
            "a da@example.com",
            "ada@@example.com",
            "ada@exa_mple.com",
            ".ada@example.com",
            "ada..l@example.com",
            "ada@-example.com",
        ] {
            assert!(normalize_email(bad).is_err(), "{bad:?} accepted");
        }
        assert!(normalize_email(&format!("{}@example.com", "a".repeat(65))).is_err());
    }

    #[test]
    fn phones_must_be_e164() {
        assert_eq!(validate_phone("+14155550100"), Ok("+14155550100".into()));
        for bad in [
            "14155550100",
            "+1415",
            "+0123456789",
            "+1415555010012345",
            "+1415-555-0100",
        ] {
            assert!(validate_phone(bad).is_err(), "{bad:?} accepted");
        }
    }
}
