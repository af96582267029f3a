//! `gatehouse.v1.SessionService`: refresh-token rotation with reuse detection, revocation,
//! listing, and the signing keys.

use crate::directory::Directory;
use crate::engine::{Tokens, issue_tokens};
use crate::session::{
    Presented, Session, SessionEvent, capped, new_refresh_token, refresh_digest, session_of,
};
use crate::tokens::Keys;
use chrono::Utc;
use gatehouse_core::crypto::Crypto;
use gatehouse_core::keys::Caller;
use gatehouse_core::{ApiError, request};
use gatehouse_directory::application::ClientType;
use gatehouse_directory::tenant_service::{parse_id, rfc3339};
use gatehouse_directory::user::{Status as UserStatus, User};
use gatehouse_events::view::LiveView;
use gatehouse_events::{
    Actor, Aggregate, AppendRequest, DomainEvent, EventFilter, EventStore, Loaded, Metadata,
    RecordedEvent, StateCache, StoreError,
};
use gatehouse_proto::v1 as pb;
use std::collections::HashMap;
use std::sync::Arc;
use tonic::{Request, Response, Status};
use uuid::Uuid;

/// Sessions per user (ids only; each is loaded from its stream when listed).
#[derive(Default)]
struct ByUser(HashMap<Uuid, Vec<Uuid>>);

fn index(by_user: &mut ByUser, event: &RecordedEvent) {
    if event.event_type == "SessionStarted" {
        #[derive(serde::Deserialize)]
        struct Started {
            user_id: Uuid,
        }
        if let Ok(started) = event.payload_as::<Started>() {
            by_user
                .0
                .entry(started.user_id)
                .or_default()
                .push(event.stream.id);
        }
    }
}

/// The SessionService implementation.
pub struct SessionApi {
    store: Arc<dyn EventStore>,
    crypto: Arc<Crypto>,
    keys: Arc<Keys>,
    directory: Arc<Directory>,
    by_user: LiveView<ByUser>,
    user_risk: Option<Arc<gatehouse_risk::view::RiskView>>,
    /// Sessions and their users as refreshes last saw them (each refresh reads only what was
    /// appended since: a rotation adds one event, a user's stream rarely moves).
    sessions: StateCache<Session>,
    users: StateCache<User>,
}

/// Sessions (and as many users) whose states a process keeps for their next refresh.
const KEPT: usize = 4096;

fn refused() -> ApiError {
    ApiError::CredentialRefused("the refresh token is invalid or has expired".into())
}

fn session_to_proto(id: Uuid, session: &Session) -> pb::Session {
    pb::Session {
        id: id.to_string(),
        tenant_id: session.tenant_id.to_string(),
        user_id: session.user_id.to_string(),
        application_id: session.application_id.to_string(),
        sign_in_id: session.sign_in_id.to_string(),
        amr: session.amr.clone(),
        created_at: session.created_at.map(rfc3339).unwrap_or_default(),
        expires_at: session.expires_at.map(rfc3339).unwrap_or_default(),
        revoked: session.revoked.is_some(),
        revoked_reason: session.revoked.clone().unwrap_or_default(),
        ip: session.ip.clone().unwrap_or_default(),
        user_agent: session.user_agent.clone().unwrap_or_default(),
    }
}

impl SessionApi {
    /// Catches up the per-user session index.
    pub async fn new(
        store: Arc<dyn EventStore>,
        crypto: Arc<Crypto>,
        keys: Arc<Keys>,
        directory: Arc<Directory>,
    ) -> Result<Self, StoreError> {
        let filter = EventFilter {
            stream_types: vec![Session::STREAM_TYPE.into()],
            event_types: vec!["SessionStarted".into()],
            ..EventFilter::default()
        };
        let by_user = LiveView::start(store.clone(), filter, ByUser::default(), index).await?;
        Ok(SessionApi {
            store,
            crypto,
            keys,
            directory,
            by_user,
            user_risk: None,
            sessions: StateCache::new(KEPT),
            users: StateCache::new(KEPT),
        })
    }

    /// Refuses (and ends) sessions of users an analyst confirmed compromised, as `view`
    /// has them: a session that escaped ConfirmCompromised's revocation (started while it
    /// ran) ends at its next refresh.
    pub fn with_user_risk(mut self, view: Arc<gatehouse_risk::view::RiskView>) -> Self {
        self.user_risk = Some(view);
        self
    }

    fn tenant_of<T>(request: &Request<T>, tenant_id: &str) -> Result<(Uuid, Caller), ApiError> {
        let caller = Caller::of(request)?;
        let tenant_id = parse_id("tenant_id", tenant_id)?;
        caller.require_tenant(tenant_id, "tenant")?;
        Ok((tenant_id, caller))
    }

    async fn refresh(
        &self,
        request: Request<pb::RefreshSessionRequest>,
    ) -> Result<pb::Tokens, ApiError> {
        let m = request.get_ref();
        let tenant_id = parse_id("tenant_id", &m.tenant_id)?;
        // Without a key the refresh token is the only credential: enough for a public app,
        // not for a confidential one, whose tokens also need its secret (RFC 6749 §6).
        let client_authenticated = match request.extensions().get::<Caller>() {
            Some(caller) => {
                caller.require_tenant(tenant_id, "tenant")?;
                true
            }
            None => false,
        };
        let metadata = request::metadata(&request, Actor::Anonymous);
        let tokens = self
            .refresh_tokens(
                tenant_id,
                &m.client_id,
                &m.refresh_token,
                client_authenticated,
                &metadata,
            )
            .await?;
        Ok(pb::Tokens {
            access_token: tokens.access_token,
            id_token: tokens.id_token,
            refresh_token: tokens.refresh_token,
            token_type: "Bearer".into(),
            expires_in: tokens.expires_in,
        })
    }

    /// Rotates a refresh token of app `client_id`: new tokens, or a refusal (a rotated token
    /// presented again revokes the session; the app was deleted). A confidential app's
    /// tokens also need the client authenticated (its secret, or the tenant's key). Shared by
    /// RefreshSession and the OpenID Connect token endpoint.
    pub async fn refresh_tokens(
        &self,
        tenant_id: Uuid,
        client_id: &str,
        refresh_token: &str,
        client_authenticated: bool,
        metadata: &Metadata,
    ) -> Result<Tokens, ApiError> {
        let session_id = session_of(refresh_token).ok_or_else(refused)?;
        let digest = refresh_digest(refresh_token);
        // Reads that do not depend on each other are asked at once: on PostgreSQL they share
        // a round trip and a statement.
        let (settings, session) = tokio::join!(
            self.directory.tenant(tenant_id),
            self.sessions.load(self.store.as_ref(), session_id),
        );
        let settings = settings?.ok_or_else(refused)?;
        let mut first = Some(session?);
        for _ in 0..5 {
            let now = Utc::now();
            let session = match first.take() {
                Some(session) => session,
                None => self.sessions.load(self.store.as_ref(), session_id).await?,
            };
            let state = &session.state;
            if !state.exists() || state.tenant_id != tenant_id || state.client_id != client_id {
                return Err(refused());
            }
            // The session's own app, by id (a deleted app's sessions refresh no more), and
            // its client authenticated if it is confidential: both before the token's digest
            // is checked or anything recorded, so neither answer depends on the token's secret.
            // Its user is read beside the app whatever the token turns out to be.
            let (app, user) = tokio::join!(
                self.directory
                    .application_by_id(tenant_id, state.application_id),
                self.users.load(self.store.as_ref(), state.user_id),
            );
            let app = app?.ok_or_else(refused)?;
            let user = user?;
            if app.client_type == ClientType::Confidential && !client_authenticated {
                return Err(ApiError::PermissionDenied(
                    "a confidential application refreshes at the token endpoint with its \
                     secret, or here with the tenant's API key"
                        .into(),
                ));
            }
            let mut append = AppendRequest::new(metadata.clone());
            append.expect(&session.stream, session.expected());
            match state.presented(&digest, now) {
                Presented::Invalid => return Err(refused()),
                Presented::Rotated(generation) => {
                    // Two holders of one family: end it for both.
                    for event in [
                        SessionEvent::RefreshTokenReused {
                            generation,
                            user_id: Some(session.state.user_id),
                        },
                        SessionEvent::SessionRevoked {
                            reason: "token_reuse".into(),
                        },
                    ] {
                        append.push(event.to_new_event(tenant_id, &session.stream)?);
                    }
                    match self.store.append(append).await {
                        Ok(_) => return Err(refused()),
                        Err(StoreError::Conflict { .. }) => continue,
                        Err(other) => return Err(other.into()),
                    }
                }
                Presented::Current
                    if state.needs_reauthentication(now) || self.compromised(state) =>
                {
                    // A policy's sign-in frequency has passed, or the account was confirmed
                    // compromised: the session ends here.
                    let reason = if self.compromised(state) {
                        "compromised"
                    } else {
                        "sign_in_frequency"
                    };
                    let event = SessionEvent::SessionRevoked {
                        reason: reason.into(),
                    };
                    append.push(event.to_new_event(tenant_id, &session.stream)?);
                    match self.store.append(append).await {
                        Ok(_) => {
                            return Err(ApiError::CredentialRefused(
                                "sign in again: this session has ended".into(),
                            ));
                        }
                        Err(StoreError::Conflict { .. }) => continue,
                        Err(other) => return Err(other.into()),
                    }
                }
                Presented::Current => {
                    if user.state.status != UserStatus::Active {
                        return Err(refused());
                    }
                    let (token, new_digest) = new_refresh_token(session_id);
                    let tokens = issue_tokens(
                        &self.keys,
                        &self.crypto,
                        session_id,
                        state,
                        &user.state,
                        &settings,
                        token,
                        metadata,
                        None,
                    )
                    .await?;
                    let event = SessionEvent::RefreshTokenRotated {
                        refresh_digest: new_digest,
                        refresh_expires_at: capped(
                            now,
                            settings.token_lifetimes.refresh_token_seconds,
                            state.expires_at,
                        ),
                    };
                    append.push(event.to_new_event(tenant_id, &session.stream)?);
                    match self.store.append(append).await {
                        Ok(_) => return Ok(tokens),
                        // A racing refresh with the same token won; ours is now a reuse.
                        Err(StoreError::Conflict { .. }) => continue,
                        Err(other) => return Err(other.into()),
                    }
                }
            }
        }
        Err(ApiError::Aborted)
    }

    async fn revoke(
        &self,
        request: Request<pb::RevokeSessionRequest>,
    ) -> Result<pb::Session, ApiError> {
        let m = request.get_ref();
        let (tenant_id, caller) = Self::tenant_of(&request, &m.tenant_id)?;
        let session_id = parse_id("session_id", &m.session_id)?;
        let metadata = request::metadata(&request, caller.actor());
        let state = self
            .end_session(tenant_id, session_id, "revoked", &metadata)
            .await?;
        Ok(session_to_proto(session_id, &state))
    }

    /// Revokes a session of the tenant for `reason` (nothing when it has ended already).
    pub async fn end_session(
        &self,
        tenant_id: Uuid,
        session_id: Uuid,
        reason: &str,
        metadata: &Metadata,
    ) -> Result<Session, ApiError> {
        let executed = gatehouse_events::execute::<Session, ApiError, _>(
            self.store.as_ref(),
            tenant_id,
            session_id,
            metadata,
            |session| {
                if !session.exists() || session.tenant_id != tenant_id {
                    return Err(ApiError::NotFound("session".into()));
                }
                Ok(if session.revoked.is_some() {
                    Vec::new()
                } else {
                    vec![SessionEvent::SessionRevoked {
                        reason: reason.into(),
                    }]
                })
            },
        )
        .await?;
        Ok(executed.state)
    }

    /// The session's user was confirmed compromised: it is refused (and ended).
    pub fn compromised(&self, session: &Session) -> bool {
        self.user_risk
            .as_ref()
            .is_some_and(|view| view.must_change_password(session.tenant_id, session.user_id))
    }

    async fn list(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<pb::ListSessionsResponse, ApiError> {
        let m = request.get_ref();
        let (tenant_id, _) = Self::tenant_of(&request, &m.tenant_id)?;
        let user_id = parse_id("user_id", &m.user_id)?;
        let ids = self
            .by_user
            .read(|index| index.0.get(&user_id).cloned().unwrap_or_default());
        let now = Utc::now();
        let mut sessions = Vec::new();
        for id in ids.into_iter().rev() {
            let session = Loaded::<Session>::load(self.store.as_ref(), id)
                .await?
                .state;
            if session.tenant_id != tenant_id || (!m.include_ended && !session.is_active(now)) {
                continue;
            }
            sessions.push(session_to_proto(id, &session));
        }
        Ok(pb::ListSessionsResponse { sessions })
    }
}

fn answer<T>(result: Result<T, ApiError>) -> Result<Response<T>, Status> {
    result.map(Response::new).map_err(Status::from)
}

#[tonic::async_trait]
impl pb::session_service_server::SessionService for SessionApi {
    async fn refresh_session(
        &self,
        request: Request<pb::RefreshSessionRequest>,
    ) -> Result<Response<pb::Tokens>, Status> {
        answer(self.refresh(request).await)
    }

    async fn revoke_session(
        &self,
        request: Request<pb::RevokeSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        answer(self.revoke(request).await)
    }

    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        answer(self.list(request).await)
    }

    async fn get_jwks(
        &self,
        request: Request<pb::GetJwksRequest>,
    ) -> Result<Response<pb::GetJwksResponse>, Status> {
        answer(
            async {
                let tenant_id = parse_id("tenant_id", &request.get_ref().tenant_id)?;
                let jwks = self.keys.jwks(tenant_id).await?;
                Ok(pb::GetJwksResponse {
                    jwks_json: jwks.to_string(),
                })
            }
            .await,
        )
    }

    async fn rotate_signing_key(
        &self,
        request: Request<pb::GetJwksRequest>,
    ) -> Result<Response<pb::GetJwksResponse>, Status> {
        answer(
            async {
                let (tenant_id, caller) = Self::tenant_of(&request, &request.get_ref().tenant_id)?;
                let settings = self
                    .directory
                    .tenant(tenant_id)
                    .await?
                    .ok_or_else(|| ApiError::NotFound("tenant".into()))?;
                let metadata = request::metadata(&request, caller.actor());
                self.keys
                    .add_key(tenant_id, &settings.token_lifetimes, true, &metadata)
                    .await?;
                let jwks = self.keys.jwks(tenant_id).await?;
                Ok(pb::GetJwksResponse {
                    jwks_json: jwks.to_string(),
                })
            }
            .await,
        )
    }

    async fn verify_access_token(
        &self,
        request: Request<pb::VerifyAccessTokenRequest>,
    ) -> Result<Response<pb::VerifyAccessTokenResponse>, Status> {
        answer(
            async {
                let m = request.get_ref();
                let (tenant_id, _) = Self::tenant_of(&request, &m.tenant_id)?;
                let claims = self
                    .keys
                    .verify(tenant_id, &m.access_token, Utc::now())
                    .await
                    .map_err(|e| {
                        ApiError::CredentialRefused(format!("the token is not valid: {e}"))
                    })?;
                // A revoked session's tokens stop working at once here (resource servers that
                // only check signatures accept them until they expire).
                let session_id = claims
                    .get("sid")
                    .and_then(|s| s.as_str())
                    .and_then(|s| Uuid::try_parse(s).ok())
                    .ok_or_else(|| ApiError::CredentialRefused("the token is not valid".into()))?;
                let session = Loaded::<Session>::load(self.store.as_ref(), session_id).await?;
                if !session.state.is_active(Utc::now()) {
                    return Err(ApiError::CredentialRefused(
                        "the token's session has ended".into(),
                    ));
                }
                Ok(pb::VerifyAccessTokenResponse {
                    claims_json: claims.to_string(),
                })
            }
            .await,
        )
    }
}

#[tonic::async_trait]
impl gatehouse_risk::service::Sessions for SessionApi {
    /// Ends every active session of `user_id` with `reason`; how many it ended.
    async fn revoke_all(
        &self,
        tenant_id: Uuid,
        user_id: Uuid,
        reason: &str,
        metadata: &gatehouse_events::Metadata,
    ) -> Result<usize, ApiError> {
        let ids = self
            .by_user
            .read(|index| index.0.get(&user_id).cloned().unwrap_or_default());
        let now = Utc::now();
        let mut ended = 0;
        for id in ids {
            let executed = gatehouse_events::execute::<Session, ApiError, _>(
                self.store.as_ref(),
                tenant_id,
                id,
                metadata,
                |session| {
                    Ok(
                        if session.tenant_id == tenant_id && session.is_active(now) {
                            vec![SessionEvent::SessionRevoked {
                                reason: reason.into(),
                            }]
                        } else {
                            Vec::new()
                        },
                    )
                },
            )
            .await?;
            if executed.last_position.is_some() {
                ended += 1;
            }
        }
        Ok(ended)
    }
}
