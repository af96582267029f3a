//! `gatehouse.v1.TenantService`.

use crate::tenant::{self, Tenant};
use chrono::{DateTime, SecondsFormat, Utc};
use gatehouse_core::{ApiError, Caller, request};
use gatehouse_events::view::LiveView;
use gatehouse_events::{
    Aggregate, AppendRequest, DomainEvent, EventFilter, EventStore, Loaded, RecordedEvent,
    StoreError,
};
use gatehouse_proto::v1 as pb;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};
use uuid::Uuid;

/// Most tenants on one page.
const MAX_PAGE: usize = 500;

#[derive(Debug, Clone)]
struct TenantRow {
    display_name: String,
    created_at: DateTime<Utc>,
}

/// Tenants in id (= creation) order, for listing.
type TenantList = BTreeMap<Uuid, TenantRow>;

fn list_apply(tenants: &mut TenantList, event: &RecordedEvent) {
    if let Ok(tenant::TenantEvent::TenantCreated { display_name }) =
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
    list: LiveView<TenantList>,
}

impl TenantApi {
    /// Builds the service, catching up the tenant list.
    pub async fn new(store: Arc<dyn EventStore>) -> Result<Self, StoreError> {
        let filter = EventFilter {
            stream_types: vec![Tenant::STREAM_TYPE.into()],
            event_types: vec!["TenantCreated".into()],
            ..EventFilter::default()
        };
        let list = LiveView::start(store.clone(), filter, TenantList::new(), list_apply).await?;
        Ok(TenantApi { store, list })
    }

    async fn create(
        &self,
        request: Request<pb::CreateTenantRequest>,
    ) -> Result<pb::Tenant, ApiError> {
        let caller = Caller::of(&request)?;
        caller.require_admin()?;
        let metadata = request::metadata(&request, caller.actor());
        let display_name = &request.get_ref().display_name;
        let id = Uuid::now_v7();
        let loaded = Loaded::<Tenant>::load(self.store.as_ref(), id).await?;
        let events = tenant::create(&loaded.state, display_name)?;
        let mut append = AppendRequest::new(metadata);
        append.expect(&loaded.stream, loaded.expected());
        for event in &events {
            append.push(event.to_new_event(id, &loaded.stream)?);
        }
        let outcome = self.store.append(append).await?;
        // Read-your-writes for a List right after the create.
        self.list
            .wait_for(outcome.last_position(), Duration::from_secs(2))
            .await;
        let created = Loaded::<Tenant>::load(self.store.as_ref(), id).await?;
        Ok(to_proto(id, &created.state))
    }

    async fn get(&self, request: Request<pb::GetTenantRequest>) -> Result<pb::Tenant, ApiError> {
        let caller = Caller::of(&request)?;
        let id = parse_id("tenant_id", &request.get_ref().tenant_id)?;
        caller.require_tenant(id, "tenant")?;
        let loaded = Loaded::<Tenant>::load(self.store.as_ref(), id).await?;
        if loaded.is_new() {
            return Err(ApiError::NotFound("tenant".into()));
        }
        Ok(to_proto(id, &loaded.state))
    }

    fn list(
        &self,
        request: Request<pb::ListTenantsRequest>,
    ) -> Result<pb::ListTenantsResponse, ApiError> {
        Caller::of(&request)?.require_admin()?;
        let page = request.get_ref();
        let size = match page.page_size as usize {
            0 => 100,
            n if n > MAX_PAGE => {
                return Err(ApiError::invalid(
                    "page_size",
                    format!("must be at most {MAX_PAGE}"),
                ));
            }
            n => n,
        };
        let after = match page.page_token.as_str() {
            "" => None,
            token => Some(parse_id("page_token", token)?),
        };
        let (tenants, more) = self.list.read(|list| {
            let range = match after {
                Some(after) => {
                    list.range((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
                }
                None => list.range(..),
            };
            let mut rows: Vec<pb::Tenant> = range
                .take(size + 1)
                .map(|(id, row)| pb::Tenant {
                    id: id.to_string(),
                    display_name: row.display_name.clone(),
                    created_at: rfc3339(row.created_at),
                })
                .collect();
            let more = rows.len() > size;
            rows.truncate(size);
            (rows, more)
        });
        let next_page_token = match (more, tenants.last()) {
            (true, Some(last)) => last.id.clone(),
            _ => String::new(),
        };
        Ok(pb::ListTenantsResponse {
            tenants,
            next_page_token,
        })
    }
}

/// Parses a UUID field, naming the field when it is malformed.
pub fn parse_id(field: &str, value: &str) -> Result<Uuid, ApiError> {
    if value.is_empty() {
        return Err(ApiError::invalid(field, "is required"));
    }
    Uuid::parse_str(value).map_err(|_| ApiError::invalid(field, "must be a UUID"))
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn to_proto(id: Uuid, tenant: &Tenant) -> pb::Tenant {
    pb::Tenant {
        id: id.to_string(),
        display_name: tenant.display_name.clone(),
        created_at: tenant.created_at.map(rfc3339).unwrap_or_default(),
    }
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
}
