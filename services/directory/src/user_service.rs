//! `gatehouse.v1.UserService`.

use crate::application::{Application, CLIENT_ID_CLAIM};
use crate::contact::{normalize_email, validate_phone};
use crate::identity_provider::IdentityProvider;
use crate::lockout::{Lockout, LockoutEvent};
use crate::paging::Page;
use crate::tenant::{PasswordPolicy, PrimaryMethod, Tenant};
use crate::tenant_service::{parse_id, rfc3339};
use crate::user::{
    self, Channel, CodePurpose, EMAIL_CLAIM, IDENTITY_CLAIM, Message, Profile, Status, User,
    UserEvent, answer_code, identity_key, invalid_code,
};
use chrono::Utc;
use gatehouse_core::crypto::Crypto;
use gatehouse_core::error::Validation;
use gatehouse_core::passwords::Passwords;
use gatehouse_core::{ApiError, Caller, request};
use gatehouse_events::view::LiveView;
use gatehouse_events::{
    Actor, Aggregate, AppendRequest, ClaimKey, DomainEvent, EventFilter, EventStore,
    ExpectedVersion, Loaded, Metadata, RecordedEvent, StoreError, execute,
};
use gatehouse_proto::v1 as pb;
use rand::Rng;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status as GrpcStatus};
use uuid::Uuid;

const MAX_PASSWORD: usize = 256;
const MAX_ATTRIBUTE_VALUE: usize = 256;
const MAX_CODE: usize = 16;
/// Users examined at most for one filtered page (the email filter decrypts each).
const MAX_SCAN: usize = 5_000;

#[derive(Debug, Clone, Copy)]
struct UserRow {
    status: Status,
}

/// Each tenant's users in creation order, with their status.
type UserList = HashMap<Uuid, BTreeMap<Uuid, UserRow>>;

fn list_apply(users: &mut UserList, event: &RecordedEvent) {
    let Ok(decoded) = UserEvent::decode(event) else {
        return;
    };
    let tenant = users.entry(event.tenant_id).or_default();
    let id = event.stream.id;
    let status = match decoded {
        UserEvent::UserSignedUp { .. } => Status::PendingVerification,
        UserEvent::UserCreated { .. }
        | UserEvent::UserSignedUpFederated { .. }
        | UserEvent::UserEnabled => Status::Active,
        UserEvent::EmailVerified => match tenant.get(&id) {
            Some(row) if row.status == Status::PendingVerification => Status::Active,
            _ => return,
        },
        UserEvent::UserDisabled => Status::Disabled,
        UserEvent::UserErased => {
            tenant.remove(&id);
            return;
        }
        _ => return,
    };
    tenant.insert(id, UserRow { status });
}

/// The UserService implementation.
pub struct UserApi {
    store: Arc<dyn EventStore>,
    crypto: Arc<Crypto>,
    passwords: Passwords,
    list: LiveView<UserList>,
}

/// Self-service RPCs need no key; a key that is sent must belong to the tenant (a platform
/// backend calling for another tenant is a mistake to refuse, not to serve).
fn self_service<T>(request: &Request<T>, tenant_id: Uuid) -> Result<(), ApiError> {
    match request.extensions().get::<Caller>() {
        Some(caller) => caller.require_tenant(tenant_id, "tenant"),
        None => Ok(()),
    }
}

/// A six-digit code.
fn new_code() -> String {
    format!("{:06}", rand::rng().random_range(0..1_000_000u32))
}

fn status_to_proto(status: Status) -> pb::UserStatus {
    match status {
        Status::PendingVerification => pb::UserStatus::PendingVerification,
        Status::Active => pb::UserStatus::Active,
        Status::Disabled => pb::UserStatus::Disabled,
        Status::Absent | Status::Erased => pb::UserStatus::Unspecified,
    }
}

impl UserApi {
    /// Builds the service, catching up the user list.
    pub async fn new(
        store: Arc<dyn EventStore>,
        crypto: Arc<Crypto>,
        passwords: Passwords,
    ) -> Result<Self, StoreError> {
        let filter = EventFilter {
            stream_types: vec![User::STREAM_TYPE.into()],
            ..EventFilter::default()
        };
        let list = LiveView::start(store.clone(), filter, UserList::new(), list_apply).await?;
        Ok(UserApi {
            store,
            crypto,
            passwords,
            list,
        })
    }

    async fn tenant(&self, tenant_id: Uuid) -> Result<Tenant, ApiError> {
        let tenant = Loaded::<Tenant>::load(self.store.as_ref(), tenant_id)
            .await?
            .state;
        if !tenant.exists() {
            return Err(ApiError::NotFound("tenant".into()));
        }
        Ok(tenant)
    }

    /// A user of `tenant_id`; any other (or none) is not found.
    async fn user(&self, tenant_id: Uuid, user_id: Uuid) -> Result<Loaded<User>, ApiError> {
        let loaded = Loaded::<User>::load(self.store.as_ref(), user_id).await?;
        if !loaded.state.exists() || loaded.state.tenant_id != Some(tenant_id) {
            return Err(ApiError::NotFound("user".into()));
        }
        Ok(loaded)
    }

    async fn user_by_email(&self, tenant_id: Uuid, email: &str) -> Result<Option<Uuid>, ApiError> {
        let key = self.email_claim(tenant_id, email);
        Ok(self
            .store
            .claim_owner(&key)
            .await?
            .filter(|s| s.kind == User::STREAM_TYPE)
            .map(|s| s.id))
    }

    fn email_claim(&self, tenant_id: Uuid, email: &str) -> ClaimKey {
        ClaimKey {
            tenant_id,
            scope: EMAIL_CLAIM.into(),
            value: self.crypto.blind_index(tenant_id, EMAIL_CLAIM, email),
        }
    }

    /// Checks a new password against the tenant's policy and the breached list.
    fn check_password(
        &self,
        field: &str,
        password: &str,
        policy: &PasswordPolicy,
        validation: &mut Validation,
    ) {
        check_new_password(field, password, policy, &self.passwords, validation);
    }

    fn check_attributes(
        attributes: &HashMap<String, String>,
        collected: &[String],
        validation: &mut Validation,
    ) {
        for (name, value) in attributes {
            if !collected.contains(name) {
                let shown: String = name.chars().take(64).collect();
                validation.add(
                    &format!("attributes[{shown}]"),
                    "is not collected by this tenant",
                );
            } else if value.trim().is_empty() || value.chars().count() > MAX_ATTRIBUTE_VALUE {
                validation.add(
                    &format!("attributes[{name}]"),
                    format!("must be 1 to {MAX_ATTRIBUTE_VALUE} characters"),
                );
            }
        }
    }

    /// A notification event: the message sealed for the user.
    async fn notification(
        &self,
        tenant_id: Uuid,
        user_id: Uuid,
        channel: Channel,
        message: Message,
    ) -> Result<UserEvent, ApiError> {
        Ok(UserEvent::NotificationRequested {
            channel,
            message: self.crypto.seal(tenant_id, user_id, &message).await?,
        })
    }

    async fn code_events(
        &self,
        tenant_id: Uuid,
        user_id: Uuid,
        purpose: CodePurpose,
        to: String,
    ) -> Result<Vec<UserEvent>, ApiError> {
        let (channel, subject, text) = purpose.wording();
        let code = new_code();
        let digest = self.crypto.code_digest(user_id, purpose.as_str(), &code);
        let message = Message {
            to,
            subject: subject.into(),
            body: format!("{text} {code}. It expires in 10 minutes."),
            code: Some(code),
        };
        Ok(vec![
            UserEvent::CodeIssued {
                purpose,
                digest,
                expires_at: Utc::now() + user::CODE_LIFETIME,
            },
            self.notification(tenant_id, user_id, channel, message)
                .await?,
        ])
    }

    async fn append(
        &self,
        tenant_id: Uuid,
        loaded: &Loaded<User>,
        metadata: Metadata,
        events: &[UserEvent],
        prepare: impl FnOnce(&mut AppendRequest),
    ) -> Result<u64, ApiError> {
        let mut request = AppendRequest::new(metadata);
        request.expect(&loaded.stream, loaded.expected());
        for event in events {
            request.push(event.to_new_event(tenant_id, &loaded.stream)?);
        }
        prepare(&mut request);
        Ok(self.store.append(request).await?.last_position())
    }

    async fn to_proto(
        &self,
        tenant_id: Uuid,
        user_id: Uuid,
        state: &User,
    ) -> Result<pb::User, ApiError> {
        let profile: Option<Profile> = match &state.profile {
            Some(sealed) => self.crypto.open(user_id, sealed).await?,
            None => None,
        };
        let phone: Option<String> = match &state.phone {
            Some(sealed) => self.crypto.open(user_id, sealed).await?,
            None => None,
        };
        let profile = profile.unwrap_or(Profile {
            email: String::new(),
            attributes: BTreeMap::new(),
        });
        Ok(pb::User {
            id: user_id.to_string(),
            tenant_id: tenant_id.to_string(),
            email: profile.email,
            email_verified: state.email_verified,
            phone: phone.unwrap_or_default(),
            phone_verified: state.phone_verified,
            attributes: profile.attributes.into_iter().collect(),
            status: status_to_proto(state.status) as i32,
            created_at: state.created_at.map(rfc3339).unwrap_or_default(),
            has_password: state.credential.is_some(),
        })
    }

    async fn sign_up(
        &self,
        request: Request<pb::SignUpRequest>,
    ) -> Result<pb::SignUpResponse, ApiError> {
        let metadata = request::metadata(&request, Actor::Anonymous);
        let message = request.get_ref();
        let mut validation = Validation::new();
        let tenant_id = parse_id("tenant_id", &message.tenant_id)?;
        self_service(&request, tenant_id)?;
        validation.text("client_id", &message.client_id, 1, 64);
        let email = normalize_email(&message.email)
            .map_err(|reason| validation.add("email", reason))
            .ok();
        validation.finish()?;
        let tenant = self.tenant(tenant_id).await?;
        let settings = &tenant.settings;
        if !settings.sign_up_enabled
            || !settings
                .allowed_primary_methods
                .contains(&PrimaryMethod::Password)
        {
            return Err(ApiError::FailedPrecondition(
                "sign-up with a password is not enabled for this tenant".into(),
            ));
        }
        let app = self
            .store
            .claim_owner(&ClaimKey {
                tenant_id,
                scope: CLIENT_ID_CLAIM.into(),
                value: message.client_id.clone(),
            })
            .await?;
        let app_id = match app {
            Some(stream)
                if Loaded::<Application>::load(self.store.as_ref(), stream.id)
                    .await?
                    .state
                    .exists() =>
            {
                stream.id
            }
            _ => {
                return Err(ApiError::invalid(
                    "client_id",
                    "is not an application of this tenant",
                ));
            }
        };
        let mut validation = Validation::new();
        self.check_password(
            "password",
            &message.password,
            &settings.password_policy,
            &mut validation,
        );
        Self::check_attributes(
            &message.attributes,
            &settings.collected_attributes,
            &mut validation,
        );
        validation.finish()?;
        let email = email.unwrap_or_default();

        // Hash first, whichever way this goes: an existing email must cost the same time.
        let credential_hash = self
            .passwords
            .hash(message.password.clone())
            .await
            .map_err(ApiError::Internal)?;
        let answer_id = Uuid::now_v7();
        if let Some(owner) = self.user_by_email(tenant_id, &email).await? {
            self.notify_existing(tenant_id, owner, &email, metadata)
                .await?;
            return Ok(pb::SignUpResponse {
                user_id: answer_id.to_string(),
            });
        }
        let user_id = answer_id;
        let profile = Profile {
            email: email.clone(),
            attributes: message.attributes.clone().into_iter().collect(),
        };
        let mut events = vec![UserEvent::UserSignedUp {
            application_id: app_id,
            profile: self.crypto.seal(tenant_id, user_id, &profile).await?,
            credential: self
                .crypto
                .seal(tenant_id, user_id, &credential_hash)
                .await?,
            breached: self.passwords.breached().contains(&message.password),
        }];
        events.extend(
            self.code_events(tenant_id, user_id, CodePurpose::VerifyEmail, email.clone())
                .await?,
        );
        let loaded = Loaded::<User> {
            state: User::default(),
            version: 0,
            stream: User::stream(user_id),
        };
        let claim = self.email_claim(tenant_id, &email);
        let appended = self
            .append(tenant_id, &loaded, metadata.clone(), &events, |r| {
                r.expect(&loaded.stream, ExpectedVersion::Exact(0));
                r.claim(&loaded.stream, claim);
            })
            .await;
        match appended {
            Ok(position) => {
                self.list.wait_for(position, Duration::from_secs(2)).await;
                Ok(pb::SignUpResponse {
                    user_id: user_id.to_string(),
                })
            }
            // Another sign-up took the email in the meantime: answer as if new.
            Err(ApiError::AlreadyExists(_)) => {
                let _ = self.crypto.erase(user_id).await;
                Ok(pb::SignUpResponse {
                    user_id: user_id.to_string(),
                })
            }
            Err(error) => Err(error),
        }
    }

    /// Tells the owner of an email that someone tried to sign up with it.
    async fn notify_existing(
        &self,
        tenant_id: Uuid,
        owner: Uuid,
        email: &str,
        metadata: Metadata,
    ) -> Result<(), ApiError> {
        let message = Message {
            to: email.to_string(),
            subject: "Someone tried to sign up with your email".into(),
            body: "Someone tried to create an account with this email address. You already have one: \
                   sign in, or reset your password if you forgot it. If it was not you, ignore this message."
                .into(),
            code: None,
        };
        let event = self
            .notification(tenant_id, owner, Channel::Email, message)
            .await?;
        execute::<User, ApiError, _>(self.store.as_ref(), tenant_id, owner, &metadata, |state| {
            Ok(if state.exists() {
                vec![event.clone()]
            } else {
                Vec::new()
            })
        })
        .await?;
        Ok(())
    }

    /// Answers a code on a user's stream: appends the outcome, and fails for a wrong code.
    async fn answer(
        &self,
        tenant_id: Uuid,
        user_id: Option<Uuid>,
        purpose: CodePurpose,
        code: &str,
        metadata: Metadata,
        on_success: impl Fn(&User) -> Result<Vec<UserEvent>, ApiError>,
    ) -> Result<User, ApiError> {
        if code.is_empty() || code.len() > MAX_CODE {
            return Err(invalid_code());
        }
        let Some(user_id) = user_id else {
            return Err(invalid_code());
        };
        let crypto = &self.crypto;
        let now = Utc::now();
        let done = execute::<User, ApiError, _>(
            self.store.as_ref(),
            tenant_id,
            user_id,
            &metadata,
            |state| {
                // Another tenant's user answers exactly like no user at all.
                if state.tenant_id != Some(tenant_id) {
                    return Err(invalid_code());
                }
                let success = on_success(state)?;
                answer_code(
                    state,
                    purpose,
                    now,
                    |digest| crypto.code_matches(user_id, purpose.as_str(), code, digest),
                    success,
                )
            },
        )
        .await?;
        // Every success consumes the code; a code still pending means this answer was wrong.
        if done.state.codes.contains_key(purpose.as_str()) {
            return Err(invalid_code());
        }
        Ok(done.state)
    }

    async fn verify_email(
        &self,
        request: Request<pb::VerifyEmailRequest>,
    ) -> Result<pb::VerifyEmailResponse, ApiError> {
        let metadata = request::metadata(&request, Actor::Anonymous);
        let message = request.get_ref();
        let tenant_id = parse_id("tenant_id", &message.tenant_id)?;
        self_service(&request, tenant_id)?;
        let user_id = Uuid::parse_str(&message.user_id).ok();
        self.answer(
            tenant_id,
            user_id,
            CodePurpose::VerifyEmail,
            message.code.trim(),
            metadata,
            |_| Ok(vec![UserEvent::EmailVerified]),
        )
        .await?;
        Ok(pb::VerifyEmailResponse {})
    }

    async fn create(&self, request: Request<pb::CreateUserRequest>) -> Result<pb::User, ApiError> {
        let caller = Caller::of(&request)?;
        let metadata = request::metadata(&request, caller.actor());
        let message = request.get_ref();
        let tenant_id = parse_id("tenant_id", &message.tenant_id)?;
        caller.require_tenant(tenant_id, "tenant")?;
        let tenant = self.tenant(tenant_id).await?;
        let mut validation = Validation::new();
        let email = normalize_email(&message.email)
            .map_err(|reason| validation.add("email", reason))
            .ok();
        if !message.password.is_empty() {
            self.check_password(
                "password",
                &message.password,
                &tenant.settings.password_policy,
                &mut validation,
            );
        }
        Self::check_attributes(
            &message.attributes,
            &tenant.settings.collected_attributes,
            &mut validation,
        );
        validation.finish()?;
        let email = email.unwrap_or_default();
        if self.user_by_email(tenant_id, &email).await?.is_some() {
            return Err(ApiError::AlreadyExists(
                "a user with this email already exists".into(),
            ));
        }
        let user_id = Uuid::now_v7();
        let credential = match message.password.as_str() {
            "" => None,
            password => {
                let hash = self
                    .passwords
                    .hash(password.to_string())
                    .await
                    .map_err(ApiError::Internal)?;
                Some(self.crypto.seal(tenant_id, user_id, &hash).await?)
            }
        };
        let profile = Profile {
            email: email.clone(),
            attributes: message.attributes.clone().into_iter().collect(),
        };
        let events = vec![UserEvent::UserCreated {
            profile: self.crypto.seal(tenant_id, user_id, &profile).await?,
            credential,
            email_verified: message.email_verified,
        }];
        let loaded = Loaded::<User> {
            state: User::default(),
            version: 0,
            stream: User::stream(user_id),
        };
        let claim = self.email_claim(tenant_id, &email);
        let position = self
            .append(tenant_id, &loaded, metadata, &events, |r| {
                r.claim(&loaded.stream, claim);
            })
            .await?;
        self.list.wait_for(position, Duration::from_secs(2)).await;
        let created = self.user(tenant_id, user_id).await?;
        self.to_proto(tenant_id, user_id, &created.state).await
    }

    async fn caller_and_user(
        &self,
        caller: &Caller,
        tenant_id: &str,
        user_id: &str,
    ) -> Result<(Uuid, Loaded<User>), ApiError> {
        let tenant_id = parse_id("tenant_id", tenant_id)?;
        let user_id = parse_id("user_id", user_id)?;
        caller.require_tenant(tenant_id, "user")?;
        Ok((tenant_id, self.user(tenant_id, user_id).await?))
    }

    async fn get(&self, request: Request<pb::GetUserRequest>) -> Result<pb::User, ApiError> {
        let caller = Caller::of(&request)?;
        let message = request.get_ref();
        let (tenant_id, user) = self
            .caller_and_user(&caller, &message.tenant_id, &message.user_id)
            .await?;
        self.to_proto(tenant_id, user.stream.id, &user.state).await
    }

    async fn list(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Result<pb::ListUsersResponse, ApiError> {
        let caller = Caller::of(&request)?;
        let message = request.get_ref();
        let tenant_id = parse_id("tenant_id", &message.tenant_id)?;
        caller.require_tenant(tenant_id, "tenant")?;
        self.tenant(tenant_id).await?;
        let page = Page::parse(message.page_size, &message.page_token)?;
        let size = page.size;
        if message.email_prefix.chars().count() > crate::contact::MAX_EMAIL {
            return Err(ApiError::invalid(
                "email_prefix",
                "must be at most 254 characters",
            ));
        }
        let prefix: String = {
            use unicode_normalization::UnicodeNormalization;
            message
                .email_prefix
                .trim()
                .nfkc()
                .collect::<String>()
                .to_lowercase()
        };
        let wanted = match pb::UserStatus::try_from(message.status) {
            Ok(pb::UserStatus::Unspecified) => None,
            Ok(pb::UserStatus::PendingVerification) => Some(Status::PendingVerification),
            Ok(pb::UserStatus::Active) => Some(Status::Active),
            Ok(pb::UserStatus::Disabled) => Some(Status::Disabled),
            Err(_) => return Err(ApiError::invalid("status", "unknown status")),
        };
        let candidates: Vec<Uuid> = self.list.read(|users| {
            let Some(tenant) = users.get(&tenant_id) else {
                return Vec::new();
            };
            page.entries(tenant)
                .filter(|(_, row)| wanted.is_none_or(|w| row.status == w))
                .map(|(id, _)| *id)
                .take(MAX_SCAN)
                .collect()
        });
        let mut users = Vec::new();
        let mut last_examined = None;
        for id in candidates {
            if users.len() == size {
                break;
            }
            last_examined = Some(id);
            let Ok(user) = self.user(tenant_id, id).await else {
                continue;
            };
            let proto = self.to_proto(tenant_id, id, &user.state).await?;
            if proto.email.starts_with(&prefix) {
                users.push(proto);
            }
        }
        let next_page_token = match (users.len() == size, last_examined) {
            (true, Some(last)) => last.to_string(),
            _ => String::new(),
        };
        Ok(pb::ListUsersResponse {
            users,
            next_page_token,
        })
    }

    /// Runs a keyed command on one user and answers with the user.
    async fn command(
        &self,
        caller: &Caller,
        metadata: Metadata,
        tenant_id: &str,
        user_id: &str,
        decide: impl Fn(&User) -> Result<Vec<UserEvent>, ApiError>,
    ) -> Result<pb::User, ApiError> {
        let (tenant_id, user) = self.caller_and_user(caller, tenant_id, user_id).await?;
        let done = execute::<User, ApiError, _>(
            self.store.as_ref(),
            tenant_id,
            user.stream.id,
            &metadata,
            |state| {
                if !state.exists() {
                    return Err(ApiError::NotFound("user".into()));
                }
                decide(state)
            },
        )
        .await?;
        if let Some(position) = done.last_position {
            self.list.wait_for(position, Duration::from_secs(2)).await;
        }
        self.to_proto(tenant_id, user.stream.id, &done.state).await
    }

    async fn update_profile(
        &self,
        request: Request<pb::UpdateProfileRequest>,
    ) -> Result<pb::User, ApiError> {
        let caller = Caller::of(&request)?;
        let metadata = request::metadata(&request, caller.actor());
        let message = request.get_ref();
        let (tenant_id, user) = self
            .caller_and_user(&caller, &message.tenant_id, &message.user_id)
            .await?;
        let tenant = self.tenant(tenant_id).await?;
        let mut validation = Validation::new();
        Self::check_attributes(
            &message.attributes,
            &tenant.settings.collected_attributes,
            &mut validation,
        );
        validation.finish()?;
        let current: Profile = match &user.state.profile {
            Some(sealed) => self
                .crypto
                .open(user.stream.id, sealed)
                .await?
                .ok_or_else(|| ApiError::NotFound("user".into()))?,
            None => return Err(ApiError::NotFound("user".into())),
        };
        let profile = Profile {
            email: current.email,
            attributes: message.attributes.clone().into_iter().collect(),
        };
        let sealed = self
            .crypto
            .seal(tenant_id, user.stream.id, &profile)
            .await?;
        self.command(
            &caller,
            metadata,
            &message.tenant_id,
            &message.user_id,
            |_| {
                Ok(vec![UserEvent::ProfileUpdated {
                    profile: sealed.clone(),
                }])
            },
        )
        .await
    }

    async fn credential(&self, user_id: Uuid, state: &User) -> Result<Option<String>, ApiError> {
        match &state.credential {
            Some(sealed) => Ok(self.crypto.open::<String>(user_id, sealed).await?),
            None => Ok(None),
        }
    }

    async fn change_password(
        &self,
        request: Request<pb::ChangePasswordRequest>,
    ) -> Result<pb::ChangePasswordResponse, ApiError> {
        let caller = Caller::of(&request)?;
        let metadata = request::metadata(&request, caller.actor());
        let message = request.get_ref();
        let (tenant_id, user) = self
            .caller_and_user(&caller, &message.tenant_id, &message.user_id)
            .await?;
        let tenant = self.tenant(tenant_id).await?;
        let mut validation = Validation::new();
        if message.current_password.is_empty() || message.current_password.len() > MAX_PASSWORD * 4
        {
            validation.add("current_password", "is required");
        }
        self.check_password(
            "new_password",
            &message.new_password,
            &tenant.settings.password_policy,
            &mut validation,
        );
        validation.finish()?;
        let hash = self.credential(user.stream.id, &user.state).await?;
        if !self
            .passwords
            .verify(message.current_password.clone(), hash)
            .await
        {
            return Err(ApiError::invalid(
                "current_password",
                "is not the current password",
            ));
        }
        let new_hash = self
            .passwords
            .hash(message.new_password.clone())
            .await
            .map_err(ApiError::Internal)?;
        let sealed = self
            .crypto
            .seal(tenant_id, user.stream.id, &new_hash)
            .await?;
        let breached = self.passwords.breached().contains(&message.new_password);
        self.command(
            &caller,
            metadata,
            &message.tenant_id,
            &message.user_id,
            |_| {
                Ok(vec![UserEvent::PasswordChanged {
                    credential: sealed.clone(),
                    reason: "change".into(),
                    breached,
                }])
            },
        )
        .await?;
        Ok(pb::ChangePasswordResponse {})
    }

    async fn start_password_reset(
        &self,
        request: Request<pb::StartPasswordResetRequest>,
    ) -> Result<pb::StartPasswordResetResponse, ApiError> {
        let metadata = request::metadata(&request, Actor::Anonymous);
        let message = request.get_ref();
        let tenant_id = parse_id("tenant_id", &message.tenant_id)?;
        self_service(&request, tenant_id)?;
        let email =
            normalize_email(&message.email).map_err(|reason| ApiError::invalid("email", reason))?;
        self.tenant(tenant_id).await?;
        // The same answer whether or not the email has an account.
        if let Some(user_id) = self.user_by_email(tenant_id, &email).await? {
            let events = self
                .code_events(tenant_id, user_id, CodePurpose::ResetPassword, email)
                .await?;
            execute::<User, ApiError, _>(
                self.store.as_ref(),
                tenant_id,
                user_id,
                &metadata,
                |state| {
                    Ok(
                        if matches!(state.status, Status::Active | Status::PendingVerification) {
                            events.clone()
                        } else {
                            Vec::new()
                        },
                    )
                },
            )
            .await?;
        }
        Ok(pb::StartPasswordResetResponse {})
    }

    async fn complete_password_reset(
        &self,
        request: Request<pb::CompletePasswordResetRequest>,
    ) -> Result<pb::CompletePasswordResetResponse, ApiError> {
        let metadata = request::metadata(&request, Actor::Anonymous);
        let message = request.get_ref();
        let tenant_id = parse_id("tenant_id", &message.tenant_id)?;
        self_service(&request, tenant_id)?;
        let email =
            normalize_email(&message.email).map_err(|reason| ApiError::invalid("email", reason))?;
        let tenant = self.tenant(tenant_id).await?;
        let mut validation = Validation::new();
        self.check_password(
            "new_password",
            &message.new_password,
            &tenant.settings.password_policy,
            &mut validation,
        );
        validation.finish()?;
        let user_id = self.user_by_email(tenant_id, &email).await?;
        // Hashed before the code is checked so that a wrong code and an unknown email take
        // the same time; a user id is needed to seal, so unknown emails seal nothing.
        let new_hash = self
            .passwords
            .hash(message.new_password.clone())
            .await
            .map_err(ApiError::Internal)?;
        let sealed = match user_id {
            Some(id) => Some(self.crypto.seal(tenant_id, id, &new_hash).await?),
            None => None,
        };
        let breached = self.passwords.breached().contains(&message.new_password);
        self.answer(
            tenant_id,
            user_id,
            CodePurpose::ResetPassword,
            message.code.trim(),
            metadata,
            |_| {
                Ok(sealed
                    .iter()
                    .map(|credential| UserEvent::PasswordChanged {
                        credential: credential.clone(),
                        reason: "reset".into(),
                        breached,
                    })
                    .collect())
            },
        )
        .await?;
        Ok(pb::CompletePasswordResetResponse {})
    }

    async fn add_phone(&self, request: Request<pb::AddPhoneRequest>) -> Result<pb::User, ApiError> {
        let caller = Caller::of(&request)?;
        let metadata = request::metadata(&request, caller.actor());
        let message = request.get_ref();
        let phone =
            validate_phone(&message.phone).map_err(|reason| ApiError::invalid("phone", reason))?;
        let (tenant_id, user) = self
            .caller_and_user(&caller, &message.tenant_id, &message.user_id)
            .await?;
        let user_id = user.stream.id;
        let mut events = vec![UserEvent::PhoneAdded {
            phone: self.crypto.seal(tenant_id, user_id, &phone).await?,
        }];
        events.extend(
            self.code_events(tenant_id, user_id, CodePurpose::VerifyPhone, phone)
                .await?,
        );
        self.command(
            &caller,
            metadata,
            &message.tenant_id,
            &message.user_id,
            |_| Ok(events.clone()),
        )
        .await
    }

    async fn verify_phone(
        &self,
        request: Request<pb::VerifyPhoneRequest>,
    ) -> Result<pb::User, ApiError> {
        let caller = Caller::of(&request)?;
        let metadata = request::metadata(&request, caller.actor());
        let message = request.get_ref();
        let (tenant_id, user) = self
            .caller_and_user(&caller, &message.tenant_id, &message.user_id)
            .await?;
        let state = self
            .answer(
                tenant_id,
                Some(user.stream.id),
                CodePurpose::VerifyPhone,
                message.code.trim(),
                metadata,
                |_| Ok(vec![UserEvent::PhoneVerified]),
            )
            .await?;
        self.to_proto(tenant_id, user.stream.id, &state).await
    }

    async fn set_status(
        &self,
        request: Request<pb::UserRef>,
        decide: fn(&User) -> Result<Vec<UserEvent>, ApiError>,
    ) -> Result<pb::User, ApiError> {
        let caller = Caller::of(&request)?;
        let metadata = request::metadata(&request, caller.actor());
        let message = request.get_ref();
        self.command(
            &caller,
            metadata,
            &message.tenant_id,
            &message.user_id,
            decide,
        )
        .await
    }

    /// Records the unlock on the user and clears the account's lockout stream with it.
    async fn unlock(&self, request: Request<pb::UserRef>) -> Result<pb::User, ApiError> {
        let caller = Caller::of(&request)?;
        let metadata = request::metadata(&request, caller.actor());
        let message = request.get_ref();
        let (tenant_id, user) = self
            .caller_and_user(&caller, &message.tenant_id, &message.user_id)
            .await?;
        let user_id = user.stream.id;
        let mut append = AppendRequest::new(metadata.clone());
        append.expect(&user.stream, user.expected());
        append.push(UserEvent::UserUnlocked.to_new_event(tenant_id, &user.stream)?);
        let lockout = Lockout::stream(user_id);
        append.push(LockoutEvent::LockCleared.to_new_event(tenant_id, &lockout)?);
        let position = self.store.append(append).await?.last_position();
        self.list.wait_for(position, Duration::from_secs(2)).await;
        let user = self.user(tenant_id, user_id).await?;
        self.to_proto(tenant_id, user_id, &user.state).await
    }

    async fn erase(
        &self,
        request: Request<pb::UserRef>,
    ) -> Result<pb::EraseUserResponse, ApiError> {
        let caller = Caller::of(&request)?;
        let metadata = request::metadata(&request, caller.actor());
        let message = request.get_ref();
        let (tenant_id, user) = self
            .caller_and_user(&caller, &message.tenant_id, &message.user_id)
            .await?;
        let user_id = user.stream.id;
        let profile: Option<Profile> = match &user.state.profile {
            Some(sealed) => self.crypto.open(user_id, sealed).await?,
            None => None,
        };
        let position = self
            .append(tenant_id, &user, metadata, &[UserEvent::UserErased], |r| {
                if let Some(profile) = &profile {
                    r.release(&user.stream, self.email_claim(tenant_id, &profile.email));
                }
                for identity in user.state.identities.keys() {
                    r.release(&user.stream, identity_claim(tenant_id, identity));
                }
            })
            .await?;
        // After the event: if the process dies in between, erasing again finishes the job.
        self.crypto.erase(user_id).await?;
        self.list.wait_for(position, Duration::from_secs(2)).await;
        Ok(pb::EraseUserResponse {})
    }
}

/// The claim of a linked identity, by its blind index.
pub fn identity_claim(tenant_id: Uuid, identity: &str) -> ClaimKey {
    ClaimKey {
        tenant_id,
        scope: IDENTITY_CLAIM.into(),
        value: identity.to_string(),
    }
}

impl UserApi {
    /// The identity's blind index, checking the provider is the tenant's (linking) or at
    /// least that the id is well formed (unlinking: a deleted provider's identities stay
    /// unlinkable).
    async fn identity(
        &self,
        tenant_id: Uuid,
        provider_id: &str,
        subject: &str,
        must_exist: bool,
    ) -> Result<(Uuid, String), ApiError> {
        let provider_id = parse_id("identity_provider_id", provider_id)?;
        if subject.is_empty() || subject.len() > 255 {
            return Err(ApiError::invalid("subject", "must be 1 to 255 bytes"));
        }
        if must_exist {
            let provider = Loaded::<IdentityProvider>::load(self.store.as_ref(), provider_id)
                .await?
                .state;
            if provider.of_tenant(tenant_id).is_none() {
                return Err(ApiError::NotFound("identity provider".into()));
            }
        }
        let identity = self.crypto.blind_index(
            tenant_id,
            IDENTITY_CLAIM,
            &identity_key(provider_id, subject),
        );
        Ok((provider_id, identity))
    }

    async fn identities(
        &self,
        user_id: Uuid,
        state: &User,
    ) -> Result<pb::ListIdentitiesResponse, ApiError> {
        let mut identities = Vec::new();
        for linked in state.identities.values() {
            let subject: Option<String> = self.crypto.open(user_id, &linked.subject).await?;
            identities.push(pb::Identity {
                identity_provider_id: linked.provider_id.to_string(),
                subject: subject.unwrap_or_default(),
                linked_at: rfc3339(linked.linked_at),
            });
        }
        identities.sort_by(|a, b| a.linked_at.cmp(&b.linked_at));
        Ok(pb::ListIdentitiesResponse { identities })
    }

    async fn link_identity(
        &self,
        request: Request<pb::LinkIdentityRequest>,
    ) -> Result<pb::ListIdentitiesResponse, ApiError> {
        let caller = Caller::of(&request)?;
        let metadata = request::metadata(&request, caller.actor());
        let message = request.get_ref();
        let (tenant_id, user) = self
            .caller_and_user(&caller, &message.tenant_id, &message.user_id)
            .await?;
        let user_id = user.stream.id;
        let (provider_id, identity) = self
            .identity(
                tenant_id,
                &message.identity_provider_id,
                &message.subject,
                true,
            )
            .await?;
        if user.state.identities.contains_key(&identity) {
            return self.identities(user_id, &user.state).await;
        }
        let event = UserEvent::IdentityLinked {
            provider_id,
            identity: identity.clone(),
            subject: self
                .crypto
                .seal(tenant_id, user_id, &message.subject)
                .await?,
        };
        let claim = identity_claim(tenant_id, &identity);
        self.append(tenant_id, &user, metadata, &[event], |r| {
            r.claim(&user.stream, claim);
        })
        .await
        .map_err(|e| match e {
            ApiError::AlreadyExists(_) => {
                ApiError::AlreadyExists("this identity is linked to another user".into())
            }
            other => other,
        })?;
        let user = self.user(tenant_id, user_id).await?;
        self.identities(user_id, &user.state).await
    }

    async fn unlink_identity(
        &self,
        request: Request<pb::UnlinkIdentityRequest>,
    ) -> Result<pb::ListIdentitiesResponse, ApiError> {
        let caller = Caller::of(&request)?;
        let metadata = request::metadata(&request, caller.actor());
        let message = request.get_ref();
        let (tenant_id, user) = self
            .caller_and_user(&caller, &message.tenant_id, &message.user_id)
            .await?;
        let user_id = user.stream.id;
        let (_, identity) = self
            .identity(
                tenant_id,
                &message.identity_provider_id,
                &message.subject,
                false,
            )
            .await?;
        if !user.state.identities.contains_key(&identity) {
            return Err(ApiError::NotFound("identity".into()));
        }
        if user.state.credential.is_none() && user.state.identities.len() == 1 {
            return Err(ApiError::FailedPrecondition(
                "this is the user's only way to sign in: set a password or link another \
                 identity first"
                    .into(),
            ));
        }
        let event = UserEvent::IdentityUnlinked {
            identity: identity.clone(),
        };
        let claim = identity_claim(tenant_id, &identity);
        self.append(tenant_id, &user, metadata, &[event], |r| {
            r.release(&user.stream, claim);
        })
        .await?;
        let user = self.user(tenant_id, user_id).await?;
        self.identities(user_id, &user.state).await
    }

    async fn list_identities(
        &self,
        request: Request<pb::UserRef>,
    ) -> Result<pb::ListIdentitiesResponse, ApiError> {
        let caller = Caller::of(&request)?;
        let message = request.get_ref();
        let (_, user) = self
            .caller_and_user(&caller, &message.tenant_id, &message.user_id)
            .await?;
        self.identities(user.stream.id, &user.state).await
    }
}

fn disable(state: &User) -> Result<Vec<UserEvent>, ApiError> {
    Ok(if state.status == Status::Disabled {
        Vec::new()
    } else {
        vec![UserEvent::UserDisabled]
    })
}

fn enable(state: &User) -> Result<Vec<UserEvent>, ApiError> {
    match state.status {
        Status::Disabled => Ok(vec![UserEvent::UserEnabled]),
        Status::PendingVerification => Err(ApiError::FailedPrecondition(
            "the email is not verified yet".into(),
        )),
        _ => Ok(Vec::new()),
    }
}

#[tonic::async_trait]
impl pb::user_service_server::UserService for UserApi {
    async fn sign_up(
        &self,
        request: Request<pb::SignUpRequest>,
    ) -> Result<Response<pb::SignUpResponse>, GrpcStatus> {
        Ok(Response::new(UserApi::sign_up(self, request).await?))
    }
    async fn verify_email(
        &self,
        request: Request<pb::VerifyEmailRequest>,
    ) -> Result<Response<pb::VerifyEmailResponse>, GrpcStatus> {
        Ok(Response::new(UserApi::verify_email(self, request).await?))
    }
    async fn create_user(
        &self,
        request: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::User>, GrpcStatus> {
        Ok(Response::new(self.create(request).await?))
    }
    async fn get_user(
        &self,
        request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::User>, GrpcStatus> {
        Ok(Response::new(self.get(request).await?))
    }
    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, GrpcStatus> {
        Ok(Response::new(self.list(request).await?))
    }
    async fn update_profile(
        &self,
        request: Request<pb::UpdateProfileRequest>,
    ) -> Result<Response<pb::User>, GrpcStatus> {
        Ok(Response::new(UserApi::update_profile(self, request).await?))
    }
    async fn change_password(
        &self,
        request: Request<pb::ChangePasswordRequest>,
    ) -> Result<Response<pb::ChangePasswordResponse>, GrpcStatus> {
        Ok(Response::new(
            UserApi::change_password(self, request).await?,
        ))
    }
    async fn start_password_reset(
        &self,
        request: Request<pb::StartPasswordResetRequest>,
    ) -> Result<Response<pb::StartPasswordResetResponse>, GrpcStatus> {
        Ok(Response::new(
            UserApi::start_password_reset(self, request).await?,
        ))
    }
    async fn complete_password_reset(
        &self,
        request: Request<pb::CompletePasswordResetRequest>,
    ) -> Result<Response<pb::CompletePasswordResetResponse>, GrpcStatus> {
        Ok(Response::new(
            UserApi::complete_password_reset(self, request).await?,
        ))
    }
    async fn add_phone(
        &self,
        request: Request<pb::AddPhoneRequest>,
    ) -> Result<Response<pb::User>, GrpcStatus> {
        Ok(Response::new(UserApi::add_phone(self, request).await?))
    }
    async fn verify_phone(
        &self,
        request: Request<pb::VerifyPhoneRequest>,
    ) -> Result<Response<pb::User>, GrpcStatus> {
        Ok(Response::new(UserApi::verify_phone(self, request).await?))
    }
    async fn disable_user(
        &self,
        request: Request<pb::UserRef>,
    ) -> Result<Response<pb::User>, GrpcStatus> {
        Ok(Response::new(self.set_status(request, disable).await?))
    }
    async fn enable_user(
        &self,
        request: Request<pb::UserRef>,
    ) -> Result<Response<pb::User>, GrpcStatus> {
        Ok(Response::new(self.set_status(request, enable).await?))
    }
    async fn unlock_user(
        &self,
        request: Request<pb::UserRef>,
    ) -> Result<Response<pb::User>, GrpcStatus> {
        Ok(Response::new(self.unlock(request).await?))
    }
    async fn link_identity(
        &self,
        request: Request<pb::LinkIdentityRequest>,
    ) -> Result<Response<pb::ListIdentitiesResponse>, GrpcStatus> {
        Ok(Response::new(self.link_identity(request).await?))
    }

    async fn unlink_identity(
        &self,
        request: Request<pb::UnlinkIdentityRequest>,
    ) -> Result<Response<pb::ListIdentitiesResponse>, GrpcStatus> {
        Ok(Response::new(self.unlink_identity(request).await?))
    }

    async fn list_identities(
        &self,
        request: Request<pb::UserRef>,
    ) -> Result<Response<pb::ListIdentitiesResponse>, GrpcStatus> {
        Ok(Response::new(self.list_identities(request).await?))
    }

    async fn erase_user(
        &self,
        request: Request<pb::UserRef>,
    ) -> Result<Response<pb::EraseUserResponse>, GrpcStatus> {
        Ok(Response::new(self.erase(request).await?))
    }
}

/// Checks a new password against the tenant's policy and the breached list.
pub fn check_new_password(
    field: &str,
    password: &str,
    policy: &PasswordPolicy,
    passwords: &Passwords,
    validation: &mut Validation,
) {
    let length = password.chars().count();
    if length < policy.min_length as usize {
        validation.add(
            field,
            format!("needs at least {} characters", policy.min_length),
        );
        return;
    }
    if length > MAX_PASSWORD {
        validation.add(field, format!("must be at most {MAX_PASSWORD} characters"));
        return;
    }
    let classes = [
        (
            policy.require_uppercase,
            password.chars().any(char::is_uppercase),
            "an uppercase letter",
        ),
        (
            policy.require_lowercase,
            password.chars().any(char::is_lowercase),
            "a lowercase letter",
        ),
        (
            policy.require_digit,
            password.chars().any(|c| c.is_ascii_digit()),
            "a digit",
        ),
        (
            policy.require_symbol,
            password.chars().any(|c| !c.is_alphanumeric()),
            "a symbol",
        ),
    ];
    for (required, present, what) in classes {
        if required && !present {
            validation.add(field, format!("needs {what}"));
        }
    }
    if policy.reject_breached && passwords.breached().contains(password) {
        validation.add(
            field,
            "appears in a list of breached passwords; choose another",
        );
    }
}
