//! `gatehouse.v1.ApplicationService`.

use crate::application::{
    self, AppConfig, Application, ApplicationEvent, CLIENT_ID_CLAIM, ClientType, GrantType,
};
use crate::paging::Page;
use crate::tenant_service::{parse_id, requested_tenant, rfc3339};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use gatehouse_core::error::Validation;
use gatehouse_core::keys::generate_key;
use gatehouse_core::{ApiError, Caller, request};
use gatehouse_events::view::LiveView;
use gatehouse_events::{
    Aggregate, AppendRequest, ClaimKey, DomainEvent, EventFilter, EventStore, ExpectedVersion,
    Loaded, RecordedEvent, StoreError,
};
use gatehouse_proto::v1 as pb;
use rand::RngCore;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};
use uuid::Uuid;

#[derive(Debug, Clone)]
struct AppRow {
    client_id: String,
    client_type: ClientType,
    config: AppConfig,
    created_at: DateTime<Utc>,
}

/// Each tenant's live apps in registration order.
type AppList = HashMap<Uuid, BTreeMap<Uuid, AppRow>>;

fn list_apply(apps: &mut AppList, event: &RecordedEvent) {
    let Ok(decoded) = ApplicationEvent::decode(event) else {
        return;
    };
    let tenant = apps.entry(event.tenant_id).or_default();
    match decoded {
        ApplicationEvent::ApplicationRegistered {
            client_id,
            client_type,
            config,
            ..
        } => {
            tenant.insert(
                event.stream.id,
                AppRow {
                    client_id,
                    client_type,
                    config,
                    created_at: event.recorded_at,
                },
            );
        }
        ApplicationEvent::ApplicationUpdated { config } => {
            if let Some(row) = tenant.get_mut(&event.stream.id) {
                row.config = config;
            }
        }
        ApplicationEvent::ApplicationDeleted => {
            tenant.remove(&event.stream.id);
        }
    }
}

/// The ApplicationService implementation.
pub struct ApplicationApi {
    store: Arc<dyn EventStore>,
    list: LiveView<AppList>,
}

impl ApplicationApi {
    /// Builds the service, catching up the app list.
    pub async fn new(store: Arc<dyn EventStore>) -> Result<Self, StoreError> {
        let filter = EventFilter {
            stream_types: vec![Application::STREAM_TYPE.into()],
            ..EventFilter::default()
        };
        let list = LiveView::start(store.clone(), filter, AppList::new(), list_apply).await?;
        Ok(ApplicationApi { store, list })
    }

    /// The tenant named in a request, checked against the caller and required to exist.
    async fn tenant(&self, caller: &Caller, tenant_id: &str) -> Result<Uuid, ApiError> {
        requested_tenant(self.store.as_ref(), caller, tenant_id).await
    }

    /// An app of `tenant_id`; another tenant's app is reported as not found.
    async fn app(
        &self,
        tenant_id: Uuid,
        application_id: &str,
    ) -> Result<Loaded<Application>, ApiError> {
        let id = parse_id("application_id", application_id)?;
        let loaded = Loaded::<Application>::load(self.store.as_ref(), id).await?;
        if !loaded.state.exists() || loaded.state.tenant_id != Some(tenant_id) {
            return Err(ApiError::NotFound("application".into()));
        }
        Ok(loaded)
    }

    async fn register(
        &self,
        request: Request<pb::RegisterApplicationRequest>,
    ) -> Result<pb::RegisterApplicationResponse, ApiError> {
        let caller = Caller::of(&request)?;
        let metadata = request::metadata(&request, caller.actor());
        let message = request.get_ref();
        let mut validation = Validation::new();
        let config = config_from_proto(
            &mut validation,
            &message.display_name,
            &message.redirect_uris,
            &message.post_logout_redirect_uris,
            &message.grant_types,
            message.require_mfa,
        );
        let client_type = match pb::ClientType::try_from(message.client_type) {
            Ok(pb::ClientType::Confidential) => ClientType::Confidential,
            Ok(pb::ClientType::Public) => ClientType::Public,
            _ => {
                validation.add("client_type", "must be CONFIDENTIAL or PUBLIC");
                ClientType::Public
            }
        };
        validation.finish()?;
        let tenant_id = self.tenant(&caller, &message.tenant_id).await?;
        let (secret, secret_hash) = match client_type {
            ClientType::Confidential => {
                let (secret, hash) = generate_key();
                (secret, Some(hash))
            }
            ClientType::Public => (String::new(), None),
        };
        let mut raw = [0u8; 18];
        rand::rng().fill_bytes(&mut raw);
        let client_id = URL_SAFE_NO_PAD.encode(raw);

        let id = Uuid::now_v7();
        let loaded = Loaded::<Application>::load(self.store.as_ref(), id).await?;
        let events = application::register(
            &loaded.state,
            client_id.clone(),
            client_type,
            secret_hash,
            config,
        )?;
        let mut append = AppendRequest::new(metadata);
        append.expect(&loaded.stream, ExpectedVersion::Exact(0));
        append.claim(
            &loaded.stream,
            ClaimKey {
                tenant_id,
                scope: CLIENT_ID_CLAIM.into(),
                value: client_id,
            },
        );
        for event in &events {
            append.push(event.to_new_event(tenant_id, &loaded.stream)?);
        }
        let outcome = self.store.append(append).await?;
        self.list
            .wait_for(outcome.last_position(), Duration::from_secs(2))
            .await;
        let registered = Loaded::<Application>::load(self.store.as_ref(), id).await?;
        Ok(pb::RegisterApplicationResponse {
            application: Some(app_to_proto(tenant_id, id, &registered.state)),
            client_secret: secret,
        })
    }

    async fn get(
        &self,
        request: Request<pb::GetApplicationRequest>,
    ) -> Result<pb::Application, ApiError> {
        let caller = Caller::of(&request)?;
        let message = request.get_ref();
        let tenant_id = self.tenant(&caller, &message.tenant_id).await?;
        let app = self.app(tenant_id, &message.application_id).await?;
        Ok(app_to_proto(tenant_id, app.stream.id, &app.state))
    }

    async fn list(
        &self,
        request: Request<pb::ListApplicationsRequest>,
    ) -> Result<pb::ListApplicationsResponse, ApiError> {
        let caller = Caller::of(&request)?;
        let message = request.get_ref();
        let tenant_id = self.tenant(&caller, &message.tenant_id).await?;
        let page = Page::parse(message.page_size, &message.page_token)?;
        let (rows, next_page_token) = self.list.read(|apps| {
            apps.get(&tenant_id)
                .map(|tenant| page.take(tenant))
                .unwrap_or_default()
        });
        let applications = rows
            .into_iter()
            .map(|(id, row)| {
                row_to_proto(
                    tenant_id,
                    id,
                    &row.client_id,
                    row.client_type,
                    &row.config,
                    row.created_at,
                )
            })
            .collect();
        Ok(pb::ListApplicationsResponse {
            applications,
            next_page_token,
        })
    }

    async fn update(
        &self,
        request: Request<pb::UpdateApplicationRequest>,
    ) -> Result<pb::Application, ApiError> {
        let caller = Caller::of(&request)?;
        let metadata = request::metadata(&request, caller.actor());
        let message = request.get_ref();
        let mut validation = Validation::new();
        let config = config_from_proto(
            &mut validation,
            &message.display_name,
            &message.redirect_uris,
            &message.post_logout_redirect_uris,
            &message.grant_types,
            message.require_mfa,
        );
        validation.finish()?;
        let tenant_id = self.tenant(&caller, &message.tenant_id).await?;
        let app = self.app(tenant_id, &message.application_id).await?;
        let updated = gatehouse_events::execute::<Application, ApiError, _>(
            self.store.as_ref(),
            tenant_id,
            app.stream.id,
            &metadata,
            |state| application::update(state, config.clone()),
        )
        .await?;
        if let Some(position) = updated.last_position {
            self.list.wait_for(position, Duration::from_secs(2)).await;
        }
        Ok(app_to_proto(tenant_id, app.stream.id, &updated.state))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteApplicationRequest>,
    ) -> Result<pb::DeleteApplicationResponse, ApiError> {
        let caller = Caller::of(&request)?;
        let metadata = request::metadata(&request, caller.actor());
        let message = request.get_ref();
        let tenant_id = self.tenant(&caller, &message.tenant_id).await?;
        let app = self.app(tenant_id, &message.application_id).await?;
        let events = application::delete(&app.state)?;
        let mut append = AppendRequest::new(metadata);
        append.expect(&app.stream, app.expected());
        append.release(
            &app.stream,
            ClaimKey {
                tenant_id,
                scope: CLIENT_ID_CLAIM.into(),
                value: app.state.client_id.clone(),
            },
        );
        for event in &events {
            append.push(event.to_new_event(tenant_id, &app.stream)?);
        }
        let outcome = self.store.append(append).await?;
        self.list
            .wait_for(outcome.last_position(), Duration::from_secs(2))
            .await;
        Ok(pb::DeleteApplicationResponse {})
    }
}

/// Reads an app's configuration, recording every bad field in `validation`.
fn config_from_proto(
    validation: &mut Validation,
    display_name: &str,
    redirect_uris: &[String],
    post_logout_redirect_uris: &[String],
    grant_types: &[i32],
    require_mfa: bool,
) -> AppConfig {
    let mut grants = Vec::new();
    for (i, value) in grant_types.iter().enumerate() {
        match pb::GrantType::try_from(*value) {
            Ok(pb::GrantType::AuthorizationCode)
                if !grants.contains(&GrantType::AuthorizationCode) =>
            {
                grants.push(GrantType::AuthorizationCode)
            }
            Ok(pb::GrantType::RefreshToken) if !grants.contains(&GrantType::RefreshToken) => {
                grants.push(GrantType::RefreshToken)
            }
            Ok(pb::GrantType::AuthorizationCode | pb::GrantType::RefreshToken) => {
                validation.add(&format!("grant_types[{i}]"), "is listed twice")
            }
            _ => validation.add(&format!("grant_types[{i}]"), "unknown grant type"),
        }
    }
    let config = AppConfig {
        display_name: display_name.trim().to_string(),
        redirect_uris: redirect_uris.to_vec(),
        post_logout_redirect_uris: post_logout_redirect_uris.to_vec(),
        grant_types: grants,
        require_mfa,
    };
    config.validate(validation);
    config
}

fn row_to_proto(
    tenant_id: Uuid,
    id: Uuid,
    client_id: &str,
    client_type: ClientType,
    config: &AppConfig,
    created_at: DateTime<Utc>,
) -> pb::Application {
    pb::Application {
        id: id.to_string(),
        tenant_id: tenant_id.to_string(),
        client_id: client_id.to_string(),
        display_name: config.display_name.clone(),
        redirect_uris: config.redirect_uris.clone(),
        post_logout_redirect_uris: config.post_logout_redirect_uris.clone(),
        grant_types: config
            .grant_types
            .iter()
            .map(|g| match g {
                GrantType::AuthorizationCode => pb::GrantType::AuthorizationCode as i32,
                GrantType::RefreshToken => pb::GrantType::RefreshToken as i32,
            })
            .collect(),
        client_type: match client_type {
            ClientType::Confidential => pb::ClientType::Confidential as i32,
            ClientType::Public => pb::ClientType::Public as i32,
        },
        created_at: rfc3339(created_at),
        require_mfa: config.require_mfa,
    }
}

fn app_to_proto(tenant_id: Uuid, id: Uuid, app: &Application) -> pb::Application {
    match (&app.config, app.client_type, app.created_at) {
        (Some(config), Some(client_type), Some(created_at)) => row_to_proto(
            tenant_id,
            id,
            &app.client_id,
            client_type,
            config,
            created_at,
        ),
        _ => pb::Application {
            id: id.to_string(),
            tenant_id: tenant_id.to_string(),
            ..Default::default()
        },
    }
}

#[tonic::async_trait]
impl pb::application_service_server::ApplicationService for ApplicationApi {
    async fn register_application(
        &self,
        request: Request<pb::RegisterApplicationRequest>,
    ) -> Result<Response<pb::RegisterApplicationResponse>, Status> {
        Ok(Response::new(self.register(request).await?))
    }

    async fn get_application(
        &self,
        request: Request<pb::GetApplicationRequest>,
    ) -> Result<Response<pb::Application>, Status> {
        Ok(Response::new(self.get(request).await?))
    }

    async fn list_applications(
        &self,
        request: Request<pb::ListApplicationsRequest>,
    ) -> Result<Response<pb::ListApplicationsResponse>, Status> {
        Ok(Response::new(self.list(request).await?))
    }

    async fn update_application(
        &self,
        request: Request<pb::UpdateApplicationRequest>,
    ) -> Result<Response<pb::Application>, Status> {
        Ok(Response::new(self.update(request).await?))
    }

    async fn delete_application(
        &self,
        request: Request<pb::DeleteApplicationRequest>,
    ) -> Result<Response<pb::DeleteApplicationResponse>, Status> {
        Ok(Response::new(self.delete(request).await?))
    }
}
