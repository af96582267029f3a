//! `gatehouse.v1.IdentityProviderService`.

use crate::identity_provider::{
    ClaimMapping, ConfigInput, IdentityProvider, IdentityProviderEvent, Kind, ProviderConfig,
};
use crate::tenant_service::{parse_id, requested_tenant, rfc3339};
use gatehouse_core::crypto::Crypto;
use gatehouse_core::error::Validation;
use gatehouse_core::{ApiError, Caller, request};
use gatehouse_events::view::LiveView;
use gatehouse_events::{
    Aggregate, AppendRequest, DomainEvent, EventFilter, EventStore, Loaded, RecordedEvent,
    StoreError,
};
use gatehouse_proto::v1 as pb;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};
use uuid::Uuid;

/// Each tenant's providers, in creation order (UUIDv7 ids).
type ProviderList = HashMap<Uuid, BTreeMap<Uuid, IdentityProvider>>;

fn list_apply(list: &mut ProviderList, event: &RecordedEvent) {
    let Ok(decoded) = IdentityProviderEvent::decode(event) else {
        return;
    };
    let tenant = list.entry(event.tenant_id).or_default();
    if matches!(decoded, IdentityProviderEvent::IdentityProviderDeleted) {
        tenant.remove(&event.stream.id);
    } else {
        tenant
            .entry(event.stream.id)
            .or_default()
            .apply(decoded, event);
    }
}

/// The IdentityProviderService implementation.
pub struct IdentityProviderApi {
    store: Arc<dyn EventStore>,
    crypto: Arc<Crypto>,
    list: LiveView<ProviderList>,
}

fn kind_from_proto(value: i32) -> Option<Kind> {
    match pb::IdentityProviderKind::try_from(value) {
        Ok(pb::IdentityProviderKind::Google) => Some(Kind::Google),
        Ok(pb::IdentityProviderKind::Facebook) => Some(Kind::Facebook),
        Ok(pb::IdentityProviderKind::Apple) => Some(Kind::Apple),
        Ok(pb::IdentityProviderKind::Oidc) => Some(Kind::Oidc),
        _ => None,
    }
}

fn kind_to_proto(kind: Kind) -> pb::IdentityProviderKind {
    match kind {
        Kind::Google => pb::IdentityProviderKind::Google,
        Kind::Facebook => pb::IdentityProviderKind::Facebook,
        Kind::Apple => pb::IdentityProviderKind::Apple,
        Kind::Oidc => pb::IdentityProviderKind::Oidc,
    }
}

fn input_from_proto(config: Option<&pb::IdentityProviderConfig>) -> ConfigInput {
    let Some(config) = config else {
        return ConfigInput::default();
    };
    let mapping = config.claim_mapping.clone().unwrap_or_default();
    ConfigInput {
        kind: kind_from_proto(config.kind),
        display_name: config.display_name.trim().to_string(),
        issuer: config.issuer.trim().to_string(),
        client_id: config.client_id.clone(),
        client_secret: config.client_secret.clone(),
        scopes: config.scopes.clone(),
        claim_mapping: ClaimMapping {
            email: mapping.email,
            name: mapping.name,
            email_verified: mapping.email_verified,
        },
        base_url: config.base_url.trim().to_string(),
    }
}

fn to_proto(tenant_id: Uuid, id: Uuid, provider: &IdentityProvider) -> pb::IdentityProvider {
    let Some(config) = &provider.config else {
        return pb::IdentityProvider {
            id: id.to_string(),
            tenant_id: tenant_id.to_string(),
            ..Default::default()
        };
    };
    pb::IdentityProvider {
        id: id.to_string(),
        tenant_id: tenant_id.to_string(),
        kind: kind_to_proto(config.kind) as i32,
        display_name: config.display_name.clone(),
        issuer: config.issuer.clone(),
        client_id: config.client_id.clone(),
        has_client_secret: !config.client_secret.0.is_empty(),
        scopes: config.scopes.clone(),
        claim_mapping: Some(pb::ClaimMapping {
            email: config.claim_mapping.email.clone(),
            name: config.claim_mapping.name.clone(),
            email_verified: config.claim_mapping.email_verified.clone(),
        }),
        base_url: config.base_url.clone(),
        created_at: provider.created_at.map(rfc3339).unwrap_or_default(),
    }
}

impl IdentityProviderApi {
    /// Builds the service, catching up the provider list.
    pub async fn new(store: Arc<dyn EventStore>, crypto: Arc<Crypto>) -> Result<Self, StoreError> {
        let filter = EventFilter {
            stream_types: vec![IdentityProvider::STREAM_TYPE.into()],
            ..EventFilter::default()
        };
        let list = LiveView::start(store.clone(), filter, ProviderList::new(), list_apply).await?;
        Ok(IdentityProviderApi {
            store,
            crypto,
            list,
        })
    }

    /// The tenant's providers as a sign-in page offers them: id and display name, in
    /// creation order.
    pub fn offered(&self, tenant_id: Uuid) -> Vec<(Uuid, String)> {
        self.list.read(|list| {
            list.get(&tenant_id)
                .map(|providers| {
                    providers
                        .iter()
                        .filter_map(|(id, provider)| {
                            Some((*id, provider.config.as_ref()?.display_name.clone()))
                        })
                        .collect()
                })
                .unwrap_or_default()
        })
    }

    /// A provider of `tenant_id`; another tenant's, or a deleted one, is not found.
    async fn provider(
        &self,
        tenant_id: Uuid,
        id: &str,
    ) -> Result<Loaded<IdentityProvider>, ApiError> {
        let id = parse_id("identity_provider_id", id)?;
        let loaded = Loaded::<IdentityProvider>::load(self.store.as_ref(), id).await?;
        if loaded.state.of_tenant(tenant_id).is_none() {
            return Err(ApiError::NotFound("identity provider".into()));
        }
        Ok(loaded)
    }

    /// Validates a configuration and seals its secret (`kept`: the stored one, on update).
    async fn config(
        &self,
        tenant_id: Uuid,
        provider_id: Uuid,
        config: Option<&pb::IdentityProviderConfig>,
        kept: Option<&ProviderConfig>,
    ) -> Result<ProviderConfig, ApiError> {
        let mut input = input_from_proto(config);
        let mut validation = Validation::new();
        if config.is_none() {
            validation.add("config", "is required");
        } else {
            input.normalize(kept.is_none(), &mut validation);
        }
        validation.finish()?;
        let kind = input
            .kind
            .ok_or_else(|| ApiError::invalid("config.kind", "is required"))?;
        let client_secret = match (input.client_secret.as_str(), kept) {
            ("", Some(kept)) => kept.client_secret.clone(),
            (secret, _) => self.crypto.seal(tenant_id, provider_id, &secret).await?,
        };
        Ok(ProviderConfig {
            kind,
            display_name: input.display_name,
            issuer: input.issuer,
            client_id: input.client_id,
            client_secret,
            scopes: input.scopes,
            claim_mapping: input.claim_mapping,
            base_url: input.base_url,
        })
    }

    async fn write(
        &self,
        tenant_id: Uuid,
        loaded: &Loaded<IdentityProvider>,
        event: IdentityProviderEvent,
        metadata: gatehouse_events::Metadata,
    ) -> Result<(), ApiError> {
        let mut append = AppendRequest::new(metadata);
        append.expect(&loaded.stream, loaded.expected());
        append.push(event.to_new_event(tenant_id, &loaded.stream)?);
        let outcome = self.store.append(append).await?;
        self.list
            .wait_for(outcome.last_position(), Duration::from_secs(2))
            .await;
        Ok(())
    }

    async fn create(
        &self,
        request: Request<pb::CreateIdentityProviderRequest>,
    ) -> Result<pb::IdentityProvider, ApiError> {
        let caller = Caller::of(&request)?;
        let metadata = request::metadata(&request, caller.actor());
        let message = request.get_ref();
        let tenant_id = requested_tenant(self.store.as_ref(), &caller, &message.tenant_id).await?;
        let id = Uuid::now_v7();
        let config = self
            .config(tenant_id, id, message.config.as_ref(), None)
            .await?;
        let loaded = Loaded::<IdentityProvider> {
            state: IdentityProvider::default(),
            version: 0,
            stream: IdentityProvider::stream(id),
        };
        let event = IdentityProviderEvent::IdentityProviderCreated { config };
        self.write(tenant_id, &loaded, event, metadata).await?;
        let created = self.provider(tenant_id, &id.to_string()).await?;
        Ok(to_proto(tenant_id, id, &created.state))
    }

    async fn get(
        &self,
        request: Request<pb::IdentityProviderRef>,
    ) -> Result<pb::IdentityProvider, ApiError> {
        let caller = Caller::of(&request)?;
        let message = request.get_ref();
        let tenant_id = requested_tenant(self.store.as_ref(), &caller, &message.tenant_id).await?;
        let loaded = self
            .provider(tenant_id, &message.identity_provider_id)
            .await?;
        Ok(to_proto(tenant_id, loaded.stream.id, &loaded.state))
    }

    async fn list(
        &self,
        request: Request<pb::ListIdentityProvidersRequest>,
    ) -> Result<pb::ListIdentityProvidersResponse, ApiError> {
        let caller = Caller::of(&request)?;
        let tenant_id =
            requested_tenant(self.store.as_ref(), &caller, &request.get_ref().tenant_id).await?;
        let identity_providers = self.list.read(|list| {
            list.get(&tenant_id)
                .map(|providers| {
                    providers
                        .iter()
                        .map(|(id, provider)| to_proto(tenant_id, *id, provider))
                        .collect()
                })
                .unwrap_or_default()
        });
        Ok(pb::ListIdentityProvidersResponse { identity_providers })
    }

    async fn update(
        &self,
        request: Request<pb::UpdateIdentityProviderRequest>,
    ) -> Result<pb::IdentityProvider, ApiError> {
        let caller = Caller::of(&request)?;
        let metadata = request::metadata(&request, caller.actor());
        let message = request.get_ref();
        let tenant_id = requested_tenant(self.store.as_ref(), &caller, &message.tenant_id).await?;
        let loaded = self
            .provider(tenant_id, &message.identity_provider_id)
            .await?;
        let id = loaded.stream.id;
        let config = self
            .config(
                tenant_id,
                id,
                message.config.as_ref(),
                loaded.state.config.as_ref(),
            )
            .await?;
        // Linked identities are the subjects of this provider's issuer: pointing it elsewhere
        // would let another issuer's subjects sign in as them (and send it our secret).
        if let Some(old) = &loaded.state.config {
            let mut validation = Validation::new();
            for (field, changed) in [
                ("config.kind", old.kind != config.kind),
                ("config.issuer", old.issuer != config.issuer),
                ("config.base_url", old.base_url != config.base_url),
            ] {
                if changed {
                    validation.add(field, "cannot change; create a new identity provider");
                }
            }
            validation.finish()?;
        }
        let event = IdentityProviderEvent::IdentityProviderUpdated { config };
        self.write(tenant_id, &loaded, event, metadata).await?;
        let updated = self.provider(tenant_id, &id.to_string()).await?;
        Ok(to_proto(tenant_id, id, &updated.state))
    }

    async fn delete(
        &self,
        request: Request<pb::IdentityProviderRef>,
    ) -> Result<pb::DeleteIdentityProviderResponse, ApiError> {
        let caller = Caller::of(&request)?;
        let metadata = request::metadata(&request, caller.actor());
        let message = request.get_ref();
        let tenant_id = requested_tenant(self.store.as_ref(), &caller, &message.tenant_id).await?;
        let loaded = self
            .provider(tenant_id, &message.identity_provider_id)
            .await?;
        let event = IdentityProviderEvent::IdentityProviderDeleted;
        self.write(tenant_id, &loaded, event, metadata).await?;
        Ok(pb::DeleteIdentityProviderResponse {})
    }
}

#[tonic::async_trait]
impl pb::identity_provider_service_server::IdentityProviderService for IdentityProviderApi {
    async fn create_identity_provider(
        &self,
        request: Request<pb::CreateIdentityProviderRequest>,
    ) -> Result<Response<pb::IdentityProvider>, Status> {
        Ok(Response::new(self.create(request).await?))
    }

    async fn get_identity_provider(
        &self,
        request: Request<pb::IdentityProviderRef>,
    ) -> Result<Response<pb::IdentityProvider>, Status> {
        Ok(Response::new(self.get(request).await?))
    }

    async fn list_identity_providers(
        &self,
        request: Request<pb::ListIdentityProvidersRequest>,
    ) -> Result<Response<pb::ListIdentityProvidersResponse>, Status> {
        Ok(Response::new(self.list(request).await?))
    }

    async fn update_identity_provider(
        &self,
        request: Request<pb::UpdateIdentityProviderRequest>,
    ) -> Result<Response<pb::IdentityProvider>, Status> {
        Ok(Response::new(self.update(request).await?))
    }

    async fn delete_identity_provider(
        &self,
        request: Request<pb::IdentityProviderRef>,
    ) -> Result<Response<pb::DeleteIdentityProviderResponse>, Status> {
        Ok(Response::new(self.delete(request).await?))
    }
}
