//! The Session aggregate: what a completed sign-in leaves, and its refresh-token family.
//!
//! A refresh token is `<session id>.<32 random bytes>`, opaque to apps; the log keeps only
//! its SHA-256. Each refresh rotates it: the presented token must be the current one. A token
//! that *was* current (a rotated one) coming back means two parties hold the family, so the
//! whole session is revoked (`RefreshTokenReused`, then `SessionRevoked`) — the thief and the
//! user both lose it, and the risk detections see the event.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Duration, Utc};
use gatehouse_events::{Aggregate, DomainEvent, RecordedEvent};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

/// Events of a session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum SessionEvent {
    /// A sign-in completed.
    SessionStarted {
        /// Who.
        user_id: Uuid,
        /// To which app.
        application_id: Uuid,
        /// Its client id.
        client_id: String,
        /// The flow.
        sign_in_id: Uuid,
        /// RFC 8176 methods.
        amr: Vec<String>,
        /// SHA-256 of the first refresh token.
        refresh_digest: String,
        /// When the refresh token expires.
        refresh_expires_at: DateTime<Utc>,
        /// Absolute end of the session.
        expires_at: DateTime<Utc>,
        /// Conditional Access sign-in frequency: refresh stops this long after sign-in.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sign_in_frequency_seconds: Option<u32>,
        /// Conditional Access persistent browser session.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        persistent: Option<bool>,
    },
    /// The refresh token was rotated.
    RefreshTokenRotated {
        /// SHA-256 of the new token.
        refresh_digest: String,
        /// Its expiry.
        refresh_expires_at: DateTime<Utc>,
    },
    /// A rotated refresh token was presented again.
    RefreshTokenReused {
        /// Which generation came back (0 = the first).
        generation: usize,
        /// The session's user (read by Identity Protection: an anomalous token).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user_id: Option<Uuid>,
    },
    /// The hosted pages gave an app an authorization code for this session (OpenID Connect).
    AuthorizationCodeIssued {
        /// SHA-256 of the code (the code itself is never stored).
        code_digest: String,
        /// The redirect URI it was sent to (the token request must name the same).
        redirect_uri: String,
        /// PKCE S256 challenge, when the app sent one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code_challenge: Option<String>,
        /// The app's nonce, copied into the ID token.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nonce: Option<String>,
        /// Whether redeeming it rotates the refresh token and hands the app the new one
        /// (false for a code from an existing browser session: the app holds its token).
        with_refresh_token: bool,
        /// When it stops being redeemable.
        expires_at: DateTime<Utc>,
    },
    /// The code was exchanged for tokens (once: a second exchange revokes the session).
    AuthorizationCodeRedeemed {
        /// Which code.
        code_digest: String,
    },
    /// The session ended early.
    SessionRevoked {
        /// `token_reuse`, `revoked`, `user_disabled`...
        reason: String,
    },
}

impl DomainEvent for SessionEvent {}

/// A session's state.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Session {
    /// Tenant.
    pub tenant_id: Uuid,
    /// Who.
    pub user_id: Uuid,
    /// App.
    pub application_id: Uuid,
    /// Its client id.
    pub client_id: String,
    /// Flow.
    pub sign_in_id: Uuid,
    /// Methods.
    pub amr: Vec<String>,
    /// Every refresh digest issued, oldest first; the last is current.
    pub refresh_digests: Vec<String>,
    /// Current refresh token's expiry.
    pub refresh_expires_at: Option<DateTime<Utc>>,
    /// Absolute expiry.
    pub expires_at: Option<DateTime<Utc>>,
    /// Start.
    pub created_at: Option<DateTime<Utc>>,
    /// Authentication time (for `auth_time`).
    pub auth_time: Option<DateTime<Utc>>,
    /// Why it was revoked.
    pub revoked: Option<String>,
    /// Where it started.
    pub ip: Option<String>,
    /// With what.
    pub user_agent: Option<String>,
    /// Sign in again this long after `auth_time`.
    pub sign_in_frequency_seconds: Option<u32>,
    /// Persistent browser session (Conditional Access).
    pub persistent: Option<bool>,
    /// Authorization codes issued for it (OpenID Connect), oldest first.
    #[serde(default)]
    pub codes: Vec<IssuedCode>,
}

/// An authorization code of a session, as the token endpoint checks it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IssuedCode {
    /// SHA-256 of the code.
    pub digest: String,
    /// Where it was sent.
    pub redirect_uri: String,
    /// PKCE S256 challenge.
    pub code_challenge: Option<String>,
    /// Copied into the ID token.
    pub nonce: Option<String>,
    /// Redeeming it hands out a new refresh token.
    pub with_refresh_token: bool,
    /// Redeemable until.
    pub expires_at: DateTime<Utc>,
    /// Exchanged already.
    pub redeemed: bool,
}

impl Aggregate for Session {
    const STREAM_TYPE: &'static str = "session";
    // Every refresh adds an event: a session refreshed hourly for weeks would otherwise be
    // replayed whole at each refresh.
    const SNAPSHOT_EVERY: Option<u64> = Some(32);
    type Event = SessionEvent;

    fn apply(&mut self, event: SessionEvent, envelope: &RecordedEvent) {
        match event {
            SessionEvent::SessionStarted {
                user_id,
                application_id,
                client_id,
                sign_in_id,
                amr,
                refresh_digest,
                refresh_expires_at,
                expires_at,
                sign_in_frequency_seconds,
                persistent,
            } => {
                self.sign_in_frequency_seconds = sign_in_frequency_seconds;
                self.persistent = persistent;
                self.tenant_id = envelope.tenant_id;
                self.user_id = user_id;
                self.application_id = application_id;
                self.client_id = client_id;
                self.sign_in_id = sign_in_id;
                self.amr = amr;
                self.refresh_digests = vec![refresh_digest];
                self.refresh_expires_at = Some(refresh_expires_at);
                self.expires_at = Some(expires_at);
                self.created_at = Some(envelope.recorded_at);
                self.auth_time = Some(envelope.recorded_at);
                if let Some(context) = &envelope.context {
                    self.ip = context.ip.clone();
                    self.user_agent = context.user_agent.clone();
                }
            }
            SessionEvent::RefreshTokenRotated {
                refresh_digest,
                refresh_expires_at,
            } => {
                self.refresh_digests.push(refresh_digest);
                self.refresh_expires_at = Some(refresh_expires_at);
            }
            SessionEvent::RefreshTokenReused { .. } => {}
            SessionEvent::AuthorizationCodeIssued {
                code_digest,
                redirect_uri,
                code_challenge,
                nonce,
                with_refresh_token,
                expires_at,
            } => {
                // Expired codes can no longer be redeemed: the list keeps the live ones.
                let now = envelope.recorded_at;
                self.codes.retain(|code| code.expires_at > now);
                self.codes.push(IssuedCode {
                    digest: code_digest,
                    redirect_uri,
                    code_challenge,
                    nonce,
                    with_refresh_token,
                    expires_at,
                    redeemed: false,
                });
            }
            SessionEvent::AuthorizationCodeRedeemed { code_digest } => {
                if let Some(code) = self.codes.iter_mut().find(|c| c.digest == code_digest) {
                    code.redeemed = true;
                }
            }
            SessionEvent::SessionRevoked { reason } => self.revoked = Some(reason),
        }
    }
}

/// What a presented refresh token is to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presented {
    /// The current token, in time.
    Current,
    /// A rotated one: reuse.
    Rotated(usize),
    /// Unknown, expired, or the session is over.
    Invalid,
}

impl Session {
    /// Started.
    pub fn exists(&self) -> bool {
        self.created_at.is_some()
    }

    /// Started, not revoked, not past its absolute expiry.
    pub fn is_active(&self, now: DateTime<Utc>) -> bool {
        self.exists() && self.revoked.is_none() && self.expires_at.is_some_and(|at| at > now)
    }

    /// The sign-in frequency of a Conditional Access policy has passed: sign in again.
    pub fn needs_reauthentication(&self, now: DateTime<Utc>) -> bool {
        match (self.sign_in_frequency_seconds, self.auth_time) {
            (Some(seconds), Some(at)) => at + Duration::seconds(i64::from(seconds)) <= now,
            _ => false,
        }
    }

    /// Classifies a presented token by its digest (compared in constant time).
    pub fn presented(&self, digest: &str, now: DateTime<Utc>) -> Presented {
        let found = self
            .refresh_digests
            .iter()
            .position(|d| bool::from(d.as_bytes().ct_eq(digest.as_bytes())));
        match found {
            Some(index) if index + 1 == self.refresh_digests.len() => {
                if self.is_active(now) && self.refresh_expires_at.is_some_and(|at| at > now) {
                    Presented::Current
                } else {
                    Presented::Invalid
                }
            }
            Some(index) if self.revoked.is_none() => Presented::Rotated(index),
            _ => Presented::Invalid,
        }
    }
}

/// A new refresh token for a session and its digest.
pub fn new_refresh_token(session_id: Uuid) -> (String, String) {
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let token = format!("{}.{}", session_id.simple(), URL_SAFE_NO_PAD.encode(secret));
    let digest = refresh_digest(&token);
    (token, digest)
}

/// The issued code a presented one is (by digest, compared in constant time).
pub fn find_code<'a>(session: &'a Session, digest: &str) -> Option<&'a IssuedCode> {
    session
        .codes
        .iter()
        .find(|c| bool::from(c.digest.as_bytes().ct_eq(digest.as_bytes())))
}

/// SHA-256 (hex) of a refresh token.
pub fn refresh_digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The session a refresh token names (`None` when it is not shaped like one).
pub fn session_of(token: &str) -> Option<Uuid> {
    let (id, secret) = token.split_once('.')?;
    if secret.len() != 43 {
        return None;
    }
    Uuid::try_parse(id).ok()
}

/// The expiry of a token issued now for `seconds`, capped by the session's end.
pub fn capped(now: DateTime<Utc>, seconds: u32, end: Option<DateTime<Utc>>) -> DateTime<Utc> {
    let at = now + Duration::seconds(i64::from(seconds));
    end.map_or(at, |end| at.min(end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn started(digest: &str, now: DateTime<Utc>) -> Session {
        Session {
            refresh_digests: vec![digest.into()],
            refresh_expires_at: Some(now + Duration::hours(1)),
            expires_at: Some(now + Duration::hours(2)),
            created_at: Some(now),
            ..Session::default()
        }
    }

    #[test]
    fn only_the_current_token_refreshes_and_an_old_one_is_reuse() {
        let now = Utc::now();
        let id = Uuid::now_v7();
        let (first, first_digest) = new_refresh_token(id);
        assert_eq!(session_of(&first), Some(id));
        let mut session = started(&first_digest, now);
        assert_eq!(session.presented(&first_digest, now), Presented::Current);
        let (_, second_digest) = new_refresh_token(id);
        session.refresh_digests.push(second_digest.clone());
        assert_eq!(session.presented(&second_digest, now), Presented::Current);
        assert_eq!(session.presented(&first_digest, now), Presented::Rotated(0));
        assert_eq!(
            session.presented(&refresh_digest("other"), now),
            Presented::Invalid
        );
        session.revoked = Some("token_reuse".into());
        assert_eq!(session.presented(&second_digest, now), Presented::Invalid);
        assert_eq!(session.presented(&first_digest, now), Presented::Invalid);
    }

    #[test]
    fn a_snapshot_reads_back_as_the_same_state() -> Result<(), serde_json::Error> {
        // Sessions keep snapshots: every digest ever issued must survive, or a rotated
        // token presented after the snapshot would not be recognised as reuse.
        let now = Utc::now();
        let id = Uuid::now_v7();
        let (_, first) = new_refresh_token(id);
        let mut session = started(&first, now);
        let (_, second) = new_refresh_token(id);
        session.refresh_digests.push(second.clone());
        session.amr = vec!["pwd".into(), "otp".into()];
        session.sign_in_frequency_seconds = Some(3600);
        let read: Session = serde_json::from_value(serde_json::to_value(&session)?)?;
        assert_eq!(format!("{read:?}"), format!("{session:?}"));
        assert_eq!(read.presented(&first, now), Presented::Rotated(0));
        assert_eq!(read.presented(&second, now), Presented::Current);
        Ok(())
    }

    #[test]
    fn malformed_tokens_name_no_session() {
        assert_eq!(session_of("nothing"), None);
        assert_eq!(session_of("abc.def"), None);
    }
}
