//! `gatehouse.v1.TenantService`.

use crate::paging::Page;
use crate::tenant::{
    self, ApiKeyState, LockoutPolicy, MfaMethod, PasswordPolicy, PrimaryMethod, RiskSettings,
    Tenant, TenantSettings, TokenLifetimes,
};
use chrono::{DateTime, SecondsFormat, Utc};
use gatehouse_core::error::Validation;
use gatehouse_core::keys::generate_key;
use gatehouse_core::{ApiError, Caller, KeyRing, request};
use gatehouse_events::view::LiveView;
use gatehouse_events::{
    Aggregate, DomainEvent, EventFilter, EventStore, Loaded, RecordedEvent, StoreError, execute,
};
use gatehouse_proto::v1 as pb;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};
use uuid::Uuid;

#[derive(Debug, Clone)]
struct TenantRow {
    display_name: String,
    created_at: DateTime<Utc>,
}

/// Tenants in id (= creation) order, for listing.
type TenantList = BTreeMap<Uuid, TenantRow>;

fn list_apply(tenants: &mut TenantList, event: &RecordedEvent) {
    if let Ok(tenant::TenantEvent::TenantCreated { display_name, .. }) =
        tenant::TenantEvent::decode(event)
    {
        tenants.insert(
            event.stream.id,
            TenantRow {
                display_name,
                created_at: event.recorded_at,
            },
        );
    }
}

/// The TenantService implementation.
pub struct TenantApi {
    store: Arc<dyn EventStore>,
    keys: Arc<KeyRing>,
    list: LiveView<TenantList>,
}

impl TenantApi {
    /// Builds the service, catching up the tenant list.
    pub async fn new(store: Arc<dyn EventStore>, keys: Arc<KeyRing>) -> Result<Self, StoreError> {
        let filter = EventFilter {
            stream_types: vec![Tenant::STREAM_TYPE.into()],
            event_types: vec!["TenantCreated".into()],
            ..EventFilter::default()
        };
        let list = LiveView::start(store.clone(), filter, TenantList::new(), list_apply).await?;
        Ok(TenantApi { store, keys, list })
    }

    async fn create(
        &self,
        request: Request<pb::CreateTenantRequest>,
    ) -> Result<pb::Tenant, ApiError> {
        let caller = Caller::of(&request)?;
        caller.require_admin()?;
        let metadata = request::metadata(&request, caller.actor());
        let message = request.get_ref();
        let settings = match &message.settings {
            Some(settings) => settings_from_proto(settings)?,
            None => TenantSettings::default(),
        };
        let id = Uuid::now_v7();
        let created =
            execute::<Tenant, ApiError, _>(self.store.as_ref(), id, id, &metadata, |state| {
                tenant::create(state, &message.display_name, settings.clone())
            })
            .await?;
        if let Some(position) = created.last_position {
            // Read-your-writes for a List right after the create.
            self.list.wait_for(position, Duration::from_secs(2)).await;
        }
        Ok(tenant_to_proto(id, &created.state))
    }

    async fn load(
        &self,
        caller: &Caller,
        field: &str,
        tenant_id: &str,
    ) -> Result<(Uuid, Tenant), ApiError> {
        let id = parse_id(field, tenant_id)?;
        caller.require_tenant(id, "tenant")?;
        let loaded = Loaded::<Tenant>::load(self.store.as_ref(), id).await?;
        if !loaded.state.exists() {
            return Err(ApiError::NotFound("tenant".into()));
        }
        Ok((id, loaded.state))
    }

    async fn get(&self, request: Request<pb::GetTenantRequest>) -> Result<pb::Tenant, ApiError> {
        let caller = Caller::of(&request)?;
        let (id, tenant) = self
            .load(&caller, "tenant_id", &request.get_ref().tenant_id)
            .await?;
        Ok(tenant_to_proto(id, &tenant))
    }

    fn list(
        &self,
        request: Request<pb::ListTenantsRequest>,
    ) -> Result<pb::ListTenantsResponse, ApiError> {
        Caller::of(&request)?.require_admin()?;
        let message = request.get_ref();
        let page = Page::parse(message.page_size, &message.page_token)?;
        let (tenants, next_page_token) = self.list.read(|list| page.take(list));
        // Settings come from the aggregate in GetTenant; the list is the directory view.
        let tenants = tenants
            .into_iter()
            .map(|(id, row)| pb::Tenant {
                id: id.to_string(),
                display_name: row.display_name,
                created_at: rfc3339(row.created_at),
                settings: None,
            })
            .collect();
        Ok(pb::ListTenantsResponse {
            tenants,
            next_page_token,
        })
    }

    async fn update_settings(
        &self,
        request: Request<pb::UpdateTenantSettingsRequest>,
    ) -> Result<pb::Tenant, ApiError> {
        let caller = Caller::of(&request)?;
        let metadata = request::metadata(&request, caller.actor());
        let message = request.get_ref();
        let id = parse_id("tenant_id", &message.tenant_id)?;
        caller.require_tenant(id, "tenant")?;
        let settings = match &message.settings {
            Some(settings) => settings_from_proto(settings)?,
            None => return Err(ApiError::invalid("settings", "is required")),
        };
        let updated =
            execute::<Tenant, ApiError, _>(self.store.as_ref(), id, id, &metadata, |state| {
                tenant::update_settings(state, settings.clone())
            })
            .await?;
        Ok(tenant_to_proto(id, &updated.state))
    }

    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<pb::CreateApiKeyResponse, ApiError> {
        let caller = Caller::of(&request)?;
        let metadata = request::metadata(&request, caller.actor());
        let message = request.get_ref();
        let id = parse_id("tenant_id", &message.tenant_id)?;
        caller.require_tenant(id, "tenant")?;
        if message.personal_data && !caller.may_read_personal_data() {
            return Err(ApiError::PermissionDenied(
                "only a caller that may read personal data can create a key that may".into(),
            ));
        }
        let (secret, hash) = generate_key();
        let key_id = Uuid::now_v7();
        let created =
            execute::<Tenant, ApiError, _>(self.store.as_ref(), id, id, &metadata, |state| {
                tenant::create_api_key(
                    state,
                    key_id,
                    hash.clone(),
                    &message.name,
                    message.personal_data,
                )
            })
            .await?;
        if let Some(position) = created.last_position {
            // The key works on this replica as soon as the caller has it.
            self.keys.wait_for(position).await;
        }
        let key = created
            .state
            .api_keys
            .get(&key_id)
            .ok_or_else(|| ApiError::Internal("key not applied".into()))?;
        Ok(pb::CreateApiKeyResponse {
            key: Some(key_to_proto(id, key_id, key)),
            secret,
        })
    }

    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<pb::ListApiKeysResponse, ApiError> {
        let caller = Caller::of(&request)?;
        let (id, tenant) = self
            .load(&caller, "tenant_id", &request.get_ref().tenant_id)
            .await?;
        Ok(pb::ListApiKeysResponse {
            keys: tenant
                .api_keys
                .iter()
                .map(|(key_id, key)| key_to_proto(id, *key_id, key))
                .collect(),
        })
    }

    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<pb::ApiKey, ApiError> {
        let caller = Caller::of(&request)?;
        let metadata = request::metadata(&request, caller.actor());
        let message = request.get_ref();
        let id = parse_id("tenant_id", &message.tenant_id)?;
        let key_id = parse_id("key_id", &message.key_id)?;
        caller.require_tenant(id, "tenant")?;
        let revoked =
            execute::<Tenant, ApiError, _>(self.store.as_ref(), id, id, &metadata, |state| {
                if !state.exists() {
                    return Err(ApiError::NotFound("tenant".into()));
                }
                tenant::revoke_api_key(state, key_id)
            })
            .await?;
        if let Some(position) = revoked.last_position {
            self.keys.wait_for(position).await;
        }
        let key = revoked
            .state
            .api_keys
            .get(&key_id)
            .ok_or_else(|| ApiError::NotFound("API key".into()))?;
        Ok(key_to_proto(id, key_id, key))
    }
}

/// Parses a UUID field, naming the field when it is malformed.
pub fn parse_id(field: &str, value: &str) -> Result<Uuid, ApiError> {
    if value.is_empty() {
        return Err(ApiError::invalid(field, "is required"));
    }
    if value.len() > 36 {
        return Err(ApiError::invalid(field, "must be a UUID"));
    }
    Uuid::parse_str(value).map_err(|_| ApiError::invalid(field, "must be a UUID"))
}

/// The tenant a request names: a UUID, the caller's own (or the caller is the platform
/// admin), and existing.
pub async fn requested_tenant(
    store: &dyn EventStore,
    caller: &Caller,
    tenant_id: &str,
) -> Result<Uuid, ApiError> {
    let id = parse_id("tenant_id", tenant_id)?;
    caller.require_tenant(id, "tenant")?;
    if !Loaded::<Tenant>::load(store, id).await?.state.exists() {
        return Err(ApiError::NotFound("tenant".into()));
    }
    Ok(id)
}

/// RFC 3339 with milliseconds, UTC.
pub fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn key_to_proto(tenant_id: Uuid, key_id: Uuid, key: &ApiKeyState) -> pb::ApiKey {
    pb::ApiKey {
        id: key_id.to_string(),
        tenant_id: tenant_id.to_string(),
        name: key.name.clone(),
        created_at: rfc3339(key.created_at),
        revoked_at: key.revoked_at.map(rfc3339).unwrap_or_default(),
        personal_data: key.personal_data,
    }
}

fn tenant_to_proto(id: Uuid, tenant: &Tenant) -> pb::Tenant {
    pb::Tenant {
        id: id.to_string(),
        display_name: tenant.display_name.clone(),
        created_at: tenant.created_at.map(rfc3339).unwrap_or_default(),
        settings: Some(settings_to_proto(&tenant.settings)),
    }
}

fn primary_to_proto(method: PrimaryMethod) -> pb::PrimaryMethod {
    match method {
        PrimaryMethod::Password => pb::PrimaryMethod::Password,
        PrimaryMethod::EmailOtp => pb::PrimaryMethod::EmailOtp,
        PrimaryMethod::Federated => pb::PrimaryMethod::Federated,
    }
}

/// A second factor for the wire.
pub fn mfa_to_proto(method: MfaMethod) -> i32 {
    (match method {
        MfaMethod::Totp => pb::MfaMethod::Totp,
        MfaMethod::EmailOtp => pb::MfaMethod::EmailOtp,
        MfaMethod::SmsOtp => pb::MfaMethod::SmsOtp,
        MfaMethod::RecoveryCode => pb::MfaMethod::RecoveryCode,
    }) as i32
}

/// A second factor from the wire (`None`: unspecified or unknown).
pub fn mfa_from_proto(value: i32) -> Option<MfaMethod> {
    match pb::MfaMethod::try_from(value).ok()? {
        pb::MfaMethod::Totp => Some(MfaMethod::Totp),
        pb::MfaMethod::EmailOtp => Some(MfaMethod::EmailOtp),
        pb::MfaMethod::SmsOtp => Some(MfaMethod::SmsOtp),
        pb::MfaMethod::RecoveryCode => Some(MfaMethod::RecoveryCode),
        pb::MfaMethod::Unspecified => None,
    }
}

fn settings_to_proto(settings: &TenantSettings) -> pb::TenantSettings {
    let p = &settings.password_policy;
    let l = &settings.lockout_policy;
    let t = &settings.token_lifetimes;
    pb::TenantSettings {
        sign_up_enabled: settings.sign_up_enabled,
        allowed_primary_methods: settings
            .allowed_primary_methods
            .iter()
            .map(|m| primary_to_proto(*m) as i32)
            .collect(),
        password_policy: Some(pb::PasswordPolicy {
            min_length: p.min_length,
            require_uppercase: p.require_uppercase,
            require_lowercase: p.require_lowercase,
            require_digit: p.require_digit,
            require_symbol: p.require_symbol,
            reject_breached: p.reject_breached,
        }),
        lockout_policy: Some(pb::LockoutPolicy {
            threshold: l.threshold,
            first_lockout_seconds: l.first_lockout_seconds,
            growth_factor: l.growth_factor,
            max_lockout_seconds: l.max_lockout_seconds,
        }),
        mfa_methods: settings
            .mfa_methods
            .iter()
            .map(|m| mfa_to_proto(*m))
            .collect(),
        require_mfa: settings.require_mfa,
        token_lifetimes: Some(pb::TokenLifetimes {
            access_token_seconds: t.access_token_seconds,
            id_token_seconds: t.id_token_seconds,
            refresh_token_seconds: t.refresh_token_seconds,
            session_seconds: t.session_seconds,
        }),
        collected_attributes: settings.collected_attributes.clone(),
        risk: Some(risk_to_proto(&settings.risk)),
    }
}

fn risk_to_proto(r: &RiskSettings) -> pb::RiskSettings {
    pb::RiskSettings {
        brute_force_failures: r.brute_force_failures,
        spray_accounts: r.spray_accounts,
        window_minutes: r.window_minutes,
        travel_speed_kmh: r.travel_speed_kmh,
        travel_min_km: r.travel_min_km,
        learning_sign_ins: r.learning_sign_ins,
        learning_days: r.learning_days,
        low_risk_age_days: r.low_risk_age_days,
    }
}

fn risk_from_proto(r: &pb::RiskSettings) -> RiskSettings {
    RiskSettings {
        brute_force_failures: r.brute_force_failures,
        spray_accounts: r.spray_accounts,
        window_minutes: r.window_minutes,
        travel_speed_kmh: r.travel_speed_kmh,
        travel_min_km: r.travel_min_km,
        learning_sign_ins: r.learning_sign_ins,
        learning_days: r.learning_days,
        low_risk_age_days: r.low_risk_age_days,
    }
}

/// Reads settings from the API, naming every bad field; then checks the domain rules.
fn settings_from_proto(settings: &pb::TenantSettings) -> Result<TenantSettings, ApiError> {
    let mut validation = Validation::new();
    let mut primary = Vec::new();
    for (i, value) in settings.allowed_primary_methods.iter().enumerate() {
        match pb::PrimaryMethod::try_from(*value) {
            Ok(pb::PrimaryMethod::Password) => primary.push(PrimaryMethod::Password),
            Ok(pb::PrimaryMethod::EmailOtp) => primary.push(PrimaryMethod::EmailOtp),
            Ok(pb::PrimaryMethod::Federated) => primary.push(PrimaryMethod::Federated),
            _ => validation.add(
                &format!("settings.allowed_primary_methods[{i}]"),
                "unknown method",
            ),
        }
    }
    let mut mfa = Vec::new();
    for (i, value) in settings.mfa_methods.iter().enumerate() {
        match mfa_from_proto(*value) {
            Some(method) => mfa.push(method),
            None => validation.add(&format!("settings.mfa_methods[{i}]"), "unknown method"),
        }
    }
    let (Some(p), Some(l), Some(t)) = (
        &settings.password_policy,
        &settings.lockout_policy,
        &settings.token_lifetimes,
    ) else {
        for (name, present) in [
            (
                "settings.password_policy",
                settings.password_policy.is_some(),
            ),
            ("settings.lockout_policy", settings.lockout_policy.is_some()),
            (
                "settings.token_lifetimes",
                settings.token_lifetimes.is_some(),
            ),
        ] {
            if !present {
                validation.add(name, "is required");
            }
        }
        validation.finish()?;
        return Err(ApiError::invalid("settings", "is incomplete"));
    };
    let domain = TenantSettings {
        sign_up_enabled: settings.sign_up_enabled,
        allowed_primary_methods: primary,
        password_policy: PasswordPolicy {
            min_length: p.min_length,
            require_uppercase: p.require_uppercase,
            require_lowercase: p.require_lowercase,
            require_digit: p.require_digit,
            require_symbol: p.require_symbol,
            reject_breached: p.reject_breached,
        },
        lockout_policy: LockoutPolicy {
            threshold: l.threshold,
            first_lockout_seconds: l.first_lockout_seconds,
            growth_factor: l.growth_factor,
            max_lockout_seconds: l.max_lockout_seconds,
        },
        mfa_methods: mfa,
        require_mfa: settings.require_mfa,
        token_lifetimes: TokenLifetimes {
            access_token_seconds: t.access_token_seconds,
            id_token_seconds: t.id_token_seconds,
            refresh_token_seconds: t.refresh_token_seconds,
            session_seconds: t.session_seconds,
        },
        collected_attributes: settings.collected_attributes.clone(),
        risk: settings
            .risk
            .as_ref()
            .map_or_else(RiskSettings::default, risk_from_proto),
    };
    domain.validate("settings", &mut validation);
    validation.finish()?;
    Ok(domain)
}

#[tonic::async_trait]
impl pb::tenant_service_server::TenantService for TenantApi {
    async fn create_tenant(
        &self,
        request: Request<pb::CreateTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        Ok(Response::new(self.create(request).await?))
    }

    async fn get_tenant(
        &self,
        request: Request<pb::GetTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        Ok(Response::new(self.get(request).await?))
    }

    async fn list_tenants(
        &self,
        request: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        Ok(Response::new(self.list(request)?))
    }

    async fn update_tenant_settings(
        &self,
        request: Request<pb::UpdateTenantSettingsRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        Ok(Response::new(self.update_settings(request).await?))
    }

    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        Ok(Response::new(
            TenantApi::create_api_key(self, request).await?,
        ))
    }

    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        Ok(Response::new(
            TenantApi::list_api_keys(self, request).await?,
        ))
    }

    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        Ok(Response::new(
            TenantApi::revoke_api_key(self, request).await?,
        ))
    }
}
