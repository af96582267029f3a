//! EventService: the log for auditors and downstream services (proto/gatehouse/v1/event.proto).
//!
//! Reads go straight to the store; `Subscribe` is the store's catch-up-then-live subscription
//! ([`gatehouse_events::subscription`]), pulled as the client reads (HTTP/2 flow control), so
//! a stalled subscriber holds back nothing but its own stream. The replay, timeline and
//! disclosure rules live in [`crate::audit`], shared with `gatehouse audit`.

use crate::audit::{self, Disclosure, Range, Subject};
use chrono::{DateTime, SecondsFormat, Utc};
use futures::{Stream, StreamExt};
use gatehouse_core::ApiError;
use gatehouse_core::crypto::Crypto;
use gatehouse_core::keys::{Caller, KeyRing};
use gatehouse_events::integrity;
use gatehouse_events::{EventFilter, EventStore, RecordedEvent};
use gatehouse_proto::v1 as pb;
use gatehouse_proto::v1::event_service_server::EventService;
use std::pin::Pin;
use std::sync::Arc;
use tonic::{Request, Response, Status};
use uuid::Uuid;

/// Longest list in a filter, and longest name in it.
const MAX_FILTER_ITEMS: usize = 50;
const MAX_NAME: usize = 100;

/// The EventService.
pub struct EventApi {
    store: Arc<dyn EventStore>,
    crypto: Arc<Crypto>,
    keys: Arc<KeyRing>,
    audit_public_key: Vec<u8>,
}

impl EventApi {
    /// The service over `store`; `crypto` opens personal data and names the audit key.
    pub fn new(
        store: Arc<dyn EventStore>,
        crypto: Arc<Crypto>,
        keys: Arc<KeyRing>,
    ) -> Result<Self, ApiError> {
        let audit_public_key = crypto
            .audit_key()
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .public_key();
        Ok(EventApi {
            store,
            crypto,
            keys,
            audit_public_key,
        })
    }

    fn disclosure(&self, caller: &Caller) -> Disclosure {
        Disclosure::new(self.crypto.clone(), caller.may_read_personal_data())
    }
}

/// The tenant a request reads: its own for a tenant key, the one named (or all) for the admin.
fn scope(caller: &Caller, tenant_id: &str) -> Result<Option<Uuid>, ApiError> {
    if tenant_id.is_empty() {
        return Ok(match caller {
            Caller::PlatformAdmin => None,
            Caller::Tenant { tenant_id, .. } => Some(*tenant_id),
        });
    }
    let id =
        Uuid::parse_str(tenant_id).map_err(|_| ApiError::invalid("tenant_id", "not a valid id"))?;
    caller.require_tenant(id, "tenant")?;
    Ok(Some(id))
}

fn time(field: &str, text: &str) -> Result<Option<DateTime<Utc>>, ApiError> {
    if text.is_empty() {
        return Ok(None);
    }
    DateTime::parse_from_rfc3339(text)
        .map(|t| Some(t.with_timezone(&Utc)))
        .map_err(|_| ApiError::invalid(field, "an RFC 3339 time"))
}

fn names(field: &str, items: &[String]) -> Result<Vec<String>, ApiError> {
    if items.len() > MAX_FILTER_ITEMS {
        return Err(ApiError::invalid(
            field,
            format!("at most {MAX_FILTER_ITEMS} items"),
        ));
    }
    if let Some(bad) = items.iter().find(|i| {
        i.is_empty()
            || i.len() > MAX_NAME
            || !i.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    }) {
        return Err(ApiError::invalid(
            field,
            format!(
                "'{}' is not a type name",
                bad.chars().take(MAX_NAME).collect::<String>()
            ),
        ));
    }
    Ok(items.to_vec())
}

/// A request's filter: what the store filters, and what is checked per event.
struct Filter {
    store: EventFilter,
    stream_id: Option<Uuid>,
    range: Range,
}

impl Filter {
    fn parse(caller: &Caller, filter: Option<&pb::EventFilter>) -> Result<Self, ApiError> {
        let empty = pb::EventFilter::default();
        let f = filter.unwrap_or(&empty);
        let stream_id = if f.stream_id.is_empty() {
            None
        } else {
            Some(
                Uuid::parse_str(&f.stream_id)
                    .map_err(|_| ApiError::invalid("filter.stream_id", "not a valid id"))?,
            )
        };
        Ok(Filter {
            store: EventFilter {
                tenant_id: scope(caller, &f.tenant_id)?,
                stream_types: names("filter.stream_types", &f.stream_types)?,
                event_types: names("filter.event_types", &f.event_types)?,
            },
            stream_id,
            range: Range {
                from: time("filter.from", &f.from)?,
                to: time("filter.to", &f.to)?,
            },
        })
    }

    fn matches(&self, event: &RecordedEvent) -> bool {
        self.stream_id.is_none_or(|id| event.stream.id == id)
            && self.range.from.is_none_or(|from| event.recorded_at >= from)
            && self.range.to.is_none_or(|to| event.recorded_at < to)
    }
}

fn page_size(requested: u32, default: u32) -> Result<usize, ApiError> {
    match requested {
        0 => Ok(default as usize),
        1..=1000 => Ok(requested as usize),
        _ => Err(ApiError::invalid("page_size", "1 to 1000")),
    }
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// An event as the caller may see it.
async fn to_proto(event: &RecordedEvent, disclosure: &Disclosure) -> Result<pb::Event, ApiError> {
    let payload = disclosure.payload(event).await?;
    let context = event.context.as_ref();
    Ok(pb::Event {
        id: event.id.to_string(),
        position: event.position,
        tenant_id: event.tenant_id.to_string(),
        stream_type: event.stream.kind.clone(),
        stream_id: event.stream.id.to_string(),
        version: event.version,
        event_type: event.event_type.clone(),
        schema_version: event.schema_version,
        recorded_at: rfc3339(event.recorded_at),
        correlation_id: event.correlation_id.to_string(),
        causation_id: event
            .causation_id
            .map(|c| c.to_string())
            .unwrap_or_default(),
        actor: event.actor.to_string(),
        client_ip: context.and_then(|c| c.ip.clone()).unwrap_or_default(),
        user_agent: context
            .and_then(|c| c.user_agent.clone())
            .unwrap_or_default(),
        payload_json: payload.to_string(),
    })
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

impl EventApi {
    async fn read_events(
        &self,
        request: Request<pb::ReadEventsRequest>,
    ) -> Result<pb::ReadEventsResponse, ApiError> {
        let caller = Caller::of(&request)?;
        let m = request.get_ref();
        let filter = Filter::parse(&caller, m.filter.as_ref())?;
        let limit = page_size(m.page_size, 100)?;
        let batch = self
            .store
            .read_all(m.after, &filter.store, limit)
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let end = batch.events.len() < limit;
        let disclosure = self.disclosure(&caller);
        let mut events = Vec::with_capacity(batch.events.len());
        for event in batch.events.iter().filter(|e| filter.matches(e)) {
            events.push(to_proto(event, &disclosure).await?);
        }
        Ok(pb::ReadEventsResponse {
            events,
            next_after: batch.next,
            end,
        })
    }

    fn subscribe(&self, request: Request<pb::SubscribeRequest>) -> Result<EventStream, ApiError> {
        let caller = Caller::of(&request)?;
        let m = request.get_ref();
        let filter = Filter::parse(&caller, m.filter.as_ref())?;
        let disclosure = self.disclosure(&caller);
        // The key is checked again for every event: a key revoked while its subscription is
        // open stops receiving at once.
        let key = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(|k| k.trim().to_string())
            .ok_or(ApiError::Unauthenticated)?;
        let keys = self.keys.clone();
        let events = gatehouse_events::subscribe(self.store.clone(), m.after, filter.store.clone());
        let stream = async_stream::try_stream! {
            let mut events = Box::pin(events);
            while let Some(event) = events.next().await {
                if keys.authenticate(&key).as_ref() != Some(&caller) {
                    Err(ApiError::Unauthenticated.into_status())?;
                }
                let event = event.map_err(|e| Status::unavailable(e.to_string()))?;
                if filter.matches(&event) {
                    yield to_proto(&event, &disclosure).await.map_err(Status::from)?;
                }
            }
        };
        Ok(Box::pin(stream))
    }

    async fn get_aggregate_at(
        &self,
        request: Request<pb::GetAggregateAtRequest>,
    ) -> Result<pb::AggregateState, ApiError> {
        let caller = Caller::of(&request)?;
        let m = request.get_ref();
        let tenant = scope(&caller, &m.tenant_id)?;
        let id = Uuid::parse_str(&m.stream_id)
            .map_err(|_| ApiError::invalid("stream_id", "not a valid id"))?;
        let bounds = audit::parse_at(&m.at)?;
        let at = audit::state_at(
            self.store.as_ref(),
            &m.stream_type,
            id,
            bounds,
            &self.disclosure(&caller),
        )
        .await?;
        if at.version == 0 || tenant.is_some_and(|t| t != at.tenant_id) {
            return Err(ApiError::NotFound(format!(
                "{} {} at that point",
                m.stream_type, m.stream_id
            )));
        }
        Ok(pb::AggregateState {
            stream_type: at.stream_type,
            stream_id: at.stream_id.to_string(),
            version: at.version,
            position: at.position,
            recorded_at: at.recorded_at.map(rfc3339).unwrap_or_default(),
            state_json: at.state.to_string(),
        })
    }

    async fn get_timeline(
        &self,
        request: Request<pb::GetTimelineRequest>,
    ) -> Result<pb::GetTimelineResponse, ApiError> {
        use pb::get_timeline_request::Subject as S;
        let caller = Caller::of(&request)?;
        let m = request.get_ref();
        let tenant = scope(&caller, &m.tenant_id)?;
        let id = |field: &str, text: &str| {
            Uuid::parse_str(text).map_err(|_| ApiError::invalid(field, "not a valid id"))
        };
        let subject = match &m.subject {
            Some(S::UserId(text)) => Subject::User(id("user_id", text)?),
            Some(S::SessionId(text)) => Subject::Session(id("session_id", text)?),
            Some(S::CorrelationId(text)) => Subject::Correlation(id("correlation_id", text)?),
            Some(S::Ip(text)) => Subject::Ip(
                text.parse::<std::net::IpAddr>()
                    .map_err(|_| ApiError::invalid("ip", "not an IP address"))?
                    .to_string(),
            ),
            None => {
                return Err(ApiError::invalid(
                    "subject",
                    "one of user_id, ip, session_id, correlation_id",
                ));
            }
        };
        let range = Range {
            from: time("from", &m.from)?,
            to: time("to", &m.to)?,
        };
        let limit = page_size(m.page_size, 200)?;
        let found = audit::timeline(self.store.as_ref(), tenant, &subject, range).await?;
        let disclosure = self.disclosure(&caller);
        let mut entries = Vec::new();
        let mut rest = found.iter().filter(|e| e.position > m.after);
        for event in rest.by_ref().take(limit) {
            entries.push(pb::TimelineEntry {
                event: Some(to_proto(event, &disclosure).await?),
                description: audit::describe(event),
            });
        }
        let next_after = match rest.next() {
            Some(_) => entries
                .last()
                .and_then(|e| e.event.as_ref())
                .map_or(0, |e| e.position),
            None => 0,
        };
        Ok(pb::GetTimelineResponse {
            entries,
            next_after,
        })
    }

    async fn verify_integrity(
        &self,
        request: Request<pb::VerifyIntegrityRequest>,
    ) -> Result<pb::IntegrityReport, ApiError> {
        let caller = Caller::of(&request)?;
        let tenant = scope(&caller, &request.get_ref().tenant_id)?;
        let report = integrity::verify(self.store.as_ref(), tenant, Some(&self.audit_public_key))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok(report_to_proto(&report, &self.audit_public_key))
    }
}

/// A verification report as the API returns it.
pub fn report_to_proto(report: &integrity::Report, public_key: &[u8]) -> pb::IntegrityReport {
    pb::IntegrityReport {
        intact: report.intact(),
        broken: report.broken.as_ref().map(|b| pb::BrokenLink {
            position: b.position,
            tenant_id: b.tenant_id.to_string(),
            reason: b.reason.clone(),
        }),
        events_checked: report.events_checked,
        sealed_up_to: report.sealed_up_to,
        unsealed: report.unsealed,
        checkpoints_checked: report.checkpoints_checked,
        heads: report
            .heads
            .iter()
            .map(|(tenant, (position, hash))| pb::ChainHead {
                tenant_id: tenant.to_string(),
                position: *position,
                hash: hex::encode(hash),
            })
            .collect(),
        audit_public_key: hex::encode(public_key),
    }
}

fn answer<T>(result: Result<T, ApiError>) -> Result<Response<T>, Status> {
    result.map(Response::new).map_err(Status::from)
}

#[tonic::async_trait]
impl EventService for EventApi {
    async fn read_events(
        &self,
        request: Request<pb::ReadEventsRequest>,
    ) -> Result<Response<pb::ReadEventsResponse>, Status> {
        answer(EventApi::read_events(self, request).await)
    }

    type SubscribeStream = EventStream;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        answer(EventApi::subscribe(self, request))
    }

    async fn get_aggregate_at(
        &self,
        request: Request<pb::GetAggregateAtRequest>,
    ) -> Result<Response<pb::AggregateState>, Status> {
        answer(EventApi::get_aggregate_at(self, request).await)
    }

    async fn get_timeline(
        &self,
        request: Request<pb::GetTimelineRequest>,
    ) -> Result<Response<pb::GetTimelineResponse>, Status> {
        answer(EventApi::get_timeline(self, request).await)
    }

    async fn verify_integrity(
        &self,
        request: Request<pb::VerifyIntegrityRequest>,
    ) -> Result<Response<pb::IntegrityReport>, Status> {
        answer(EventApi::verify_integrity(self, request).await)
    }
}
