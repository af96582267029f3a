//! `gatehouse.v1.RiskService`: the reports (detections, risky users, risky sign-ins, a
//! user's history, the export) read [`RiskView`]; the analyst's actions append to the
//! user's `userrisk` stream (ConfirmCompromised also revokes the user's sessions, through
//! [`Sessions`], and the detector records it as an `admin_confirmed_compromised` detection).

use crate::user_risk::{RiskState, UserRisk, UserRiskEvent};
use crate::view::{DetectionRecord, RiskView, RiskySignIn, TenantRisk};
use chrono::{DateTime, Duration, Utc};
use gatehouse_core::keys::Caller;
use gatehouse_core::{ApiError, request};
use gatehouse_directory::tenant::Tenant;
use gatehouse_directory::tenant_service::{parse_id, rfc3339};
use gatehouse_directory::user::User;
use gatehouse_events::{Aggregate, DomainEvent, EventStore, Loaded, Metadata, Position};
use gatehouse_policy::model::RiskLevel;
use gatehouse_proto::v1 as pb;
use gatehouse_proto::v1::risk_service_server::RiskService;
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use uuid::Uuid;

/// Ends a user's sessions (implemented by the session service).
#[tonic::async_trait]
pub trait Sessions: Send + Sync {
    /// Revokes every active session of `user_id` with `reason`; how many.
    async fn revoke_all(
        &self,
        tenant_id: Uuid,
        user_id: Uuid,
        reason: &str,
        metadata: &Metadata,
    ) -> Result<usize, ApiError>;
}

/// The RiskService implementation.
pub struct RiskApi {
    store: Arc<dyn EventStore>,
    view: Arc<RiskView>,
    sessions: Arc<dyn Sessions>,
}

/// Detections per export chunk.
const CHUNK: usize = 200;

fn page_size(requested: u32) -> usize {
    match requested {
        0 => 100,
        n => n.min(500) as usize,
    }
}

fn optional_level(field: &str, text: &str) -> Result<Option<RiskLevel>, ApiError> {
    match text {
        "" => Ok(None),
        "low" | "medium" | "high" => Ok(RiskLevel::parse(text)),
        _ => Err(ApiError::invalid(field, "must be low, medium or high")),
    }
}

fn optional_time(field: &str, text: &str) -> Result<Option<DateTime<Utc>>, ApiError> {
    if text.is_empty() {
        return Ok(None);
    }
    DateTime::parse_from_rfc3339(text)
        .map(|t| Some(t.with_timezone(&Utc)))
        .map_err(|_| ApiError::invalid(field, "must be an RFC 3339 time"))
}

fn optional_id(field: &str, text: &str) -> Result<Option<Uuid>, ApiError> {
    if text.is_empty() {
        Ok(None)
    } else {
        parse_id(field, text).map(Some)
    }
}

fn page_token(text: &str) -> Result<Option<u64>, ApiError> {
    if text.is_empty() {
        return Ok(None);
    }
    text.parse()
        .map(Some)
        .map_err(|_| ApiError::invalid("page_token", "is not a token from a previous answer"))
}

/// A time range, from inclusive, to exclusive.
struct Range(Option<DateTime<Utc>>, Option<DateTime<Utc>>);

impl Range {
    fn parse(from: &str, to: &str) -> Result<Self, ApiError> {
        Ok(Range(
            optional_time("from", from)?,
            optional_time("to", to)?,
        ))
    }

    fn contains(&self, at: DateTime<Utc>) -> bool {
        self.0.is_none_or(|from| at >= from) && self.1.is_none_or(|to| at < to)
    }
}

fn id_text(id: Option<Uuid>) -> String {
    id.map(|id| id.to_string()).unwrap_or_default()
}

fn detection_to_proto(d: &DetectionRecord) -> pb::RiskDetection {
    pb::RiskDetection {
        id: d.id.to_string(),
        tenant_id: d.tenant_id.to_string(),
        kind: d.kind.clone(),
        level: d.level.as_str().into(),
        timing: d.timing.clone(),
        user_id: id_text(d.user_id),
        sign_in_id: id_text(d.sign_in_id),
        source: d.source.clone().unwrap_or_default(),
        description: d.description.clone(),
        evidence: d
            .evidence
            .iter()
            .map(|e| pb::Evidence {
                event_id: e.event_id.to_string(),
                position: e.position,
            })
            .collect(),
        detected_at: rfc3339(d.detected_at),
    }
}

fn user_risk_to_proto(user_id: Uuid, risk: &UserRisk, low_age: Duration) -> pb::UserRisk {
    pb::UserRisk {
        user_id: user_id.to_string(),
        level: risk.level(Utc::now(), low_age).as_str().into(),
        state: risk.state.as_str().into(),
        open_detection_ids: risk.open.keys().map(Uuid::to_string).collect(),
        updated_at: risk.updated_at.map(rfc3339).unwrap_or_default(),
    }
}

fn sign_in_to_proto(s: &RiskySignIn) -> pb::RiskySignIn {
    pb::RiskySignIn {
        sign_in_id: s.id.to_string(),
        user_id: id_text(s.user_id),
        level: s.level.as_str().into(),
        state: if s.remediated {
            "remediated"
        } else {
            "at_risk"
        }
        .into(),
        detections: s.detections.clone(),
        ip: s.ip.clone().unwrap_or_default(),
        country: s.country.clone().unwrap_or_default(),
        at: rfc3339(s.at),
    }
}

/// One CSV field, quoted when it must be; a leading formula character is neutralised so
/// that a spreadsheet opening the export runs nothing an attacker put in a field.
fn csv_field(text: &str) -> String {
    let text = if text.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{text}")
    } else {
        text.to_string()
    };
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text
    }
}

const CSV_HEADER: &str =
    "id,detected_at,kind,level,timing,user_id,sign_in_id,source,description,evidence\n";

fn csv_line(d: &DetectionRecord) -> String {
    let evidence = d
        .evidence
        .iter()
        .map(|e| format!("{}@{}", e.event_id, e.position))
        .collect::<Vec<_>>()
        .join(" ");
    let fields = [
        d.id.to_string(),
        rfc3339(d.detected_at),
        d.kind.clone(),
        d.level.as_str().into(),
        d.timing.clone(),
        id_text(d.user_id),
        id_text(d.sign_in_id),
        d.source.clone().unwrap_or_default(),
        d.description.clone(),
        evidence,
    ];
    let mut line = fields
        .iter()
        .map(|f| csv_field(f))
        .collect::<Vec<_>>()
        .join(",");
    line.push('\n');
    line
}

impl RiskApi {
    /// The service over the store, its view, and the sessions it revokes.
    pub fn new(
        store: Arc<dyn EventStore>,
        view: Arc<RiskView>,
        sessions: Arc<dyn Sessions>,
    ) -> Self {
        RiskApi {
            store,
            view,
            sessions,
        }
    }

    fn tenant_of<T>(request: &Request<T>, tenant_id: &str) -> Result<(Uuid, Caller), ApiError> {
        let caller = Caller::of(request)?;
        let tenant_id = parse_id("tenant_id", tenant_id)?;
        caller.require_tenant(tenant_id, "tenant")?;
        Ok((tenant_id, caller))
    }

    /// How long low detections count in `tenant_id`.
    async fn low_age(&self, tenant_id: Uuid) -> Result<Duration, ApiError> {
        let tenant = Loaded::<Tenant>::load(self.store.as_ref(), tenant_id).await?;
        if tenant.state.created_at.is_none() {
            return Err(ApiError::NotFound("tenant".into()));
        }
        Ok(Duration::days(i64::from(
            tenant.state.settings.risk.low_risk_age_days,
        )))
    }

    fn list_detections(
        &self,
        request: &Request<pb::ListRiskDetectionsRequest>,
    ) -> Result<pb::ListRiskDetectionsResponse, ApiError> {
        let m = request.get_ref();
        let (tenant_id, _) = Self::tenant_of(request, &m.tenant_id)?;
        let level = optional_level("level", &m.level)?;
        let user = optional_id("user_id", &m.user_id)?;
        let range = Range::parse(&m.from, &m.to)?;
        if !matches!(m.timing.as_str(), "" | "realtime" | "offline") {
            return Err(ApiError::invalid("timing", "must be realtime or offline"));
        }
        let before = page_token(&m.page_token)?.unwrap_or(Position::MAX);
        let size = page_size(m.page_size);
        let (page, more) = self.view.read(tenant_id, |tenant| {
            let mut matching = tenant.detections.range(..before).rev().filter(|(_, d)| {
                level.is_none_or(|l| d.level == l)
                    && (m.kind.is_empty() || d.kind == m.kind)
                    && (m.timing.is_empty() || d.timing == m.timing)
                    && user.is_none_or(|u| d.user_id == Some(u))
                    && range.contains(d.detected_at)
            });
            let page: Vec<(Position, pb::RiskDetection)> = matching
                .by_ref()
                .take(size)
                .map(|(p, d)| (*p, detection_to_proto(d)))
                .collect();
            (page, matching.next().is_some())
        });
        Ok(pb::ListRiskDetectionsResponse {
            next_page_token: match (more, page.last()) {
                (true, Some((position, _))) => position.to_string(),
                _ => String::new(),
            },
            detections: page.into_iter().map(|(_, d)| d).collect(),
        })
    }

    async fn list_users(
        &self,
        request: &Request<pb::ListRiskyUsersRequest>,
    ) -> Result<pb::ListRiskyUsersResponse, ApiError> {
        let m = request.get_ref();
        let (tenant_id, _) = Self::tenant_of(request, &m.tenant_id)?;
        let level = optional_level("level", &m.level)?;
        let state = match m.state.as_str() {
            "" => None,
            text => Some(
                RiskState::parse(text)
                    .filter(|s| *s != RiskState::None)
                    .ok_or_else(|| {
                        ApiError::invalid(
                            "state",
                            "must be at_risk, confirmed_compromised, remediated, dismissed or \
                             confirmed_safe",
                        )
                    })?,
            ),
        };
        let range = Range::parse(&m.from, &m.to)?;
        // The token is the last user's sort key (last change, id): pages stay stable as
        // users' risk changes, a changed user moving to the front.
        let after: Option<(i64, Uuid)> = match m.page_token.as_str() {
            "" => None,
            token => Some(
                token
                    .split_once(':')
                    .and_then(|(at, id)| Some((at.parse().ok()?, id.parse().ok()?)))
                    .ok_or_else(|| {
                        ApiError::invalid("page_token", "is not a token from a previous answer")
                    })?,
            ),
        };
        let size = page_size(m.page_size);
        let low_age = self.low_age(tenant_id).await?;
        let now = Utc::now();
        let mut users = self.view.read(tenant_id, |tenant| {
            tenant
                .users
                .iter()
                .filter(|(_, risk)| {
                    risk.state != RiskState::None
                        && level.is_none_or(|l| risk.level(now, low_age) == l)
                        && state.is_none_or(|s| risk.state == s)
                        && risk.updated_at.is_some_and(|at| range.contains(at))
                })
                .map(|(id, risk)| {
                    let at = risk.updated_at.map_or(0, |at| at.timestamp_micros());
                    ((-at, *id), user_risk_to_proto(*id, risk, low_age))
                })
                .filter(|(key, _)| after.is_none_or(|(at, id)| *key > (-at, id)))
                .collect::<Vec<_>>()
        });
        users.sort_by_key(|(key, _)| *key);
        let more = users.len() > size;
        users.truncate(size);
        Ok(pb::ListRiskyUsersResponse {
            next_page_token: match (more, users.last()) {
                (true, Some(((at, id), _))) => format!("{}:{id}", -at),
                _ => String::new(),
            },
            users: users.into_iter().map(|(_, u)| u).collect(),
        })
    }

    fn list_sign_ins(
        &self,
        request: &Request<pb::ListRiskySignInsRequest>,
    ) -> Result<pb::ListRiskySignInsResponse, ApiError> {
        let m = request.get_ref();
        let (tenant_id, _) = Self::tenant_of(request, &m.tenant_id)?;
        let level = optional_level("level", &m.level)?;
        let remediated = match m.state.as_str() {
            "" => None,
            "at_risk" => Some(false),
            "remediated" => Some(true),
            _ => return Err(ApiError::invalid("state", "must be at_risk or remediated")),
        };
        let user = optional_id("user_id", &m.user_id)?;
        let range = Range::parse(&m.from, &m.to)?;
        let before = page_token(&m.page_token)?.unwrap_or(Position::MAX);
        let size = page_size(m.page_size);
        let (page, more) = self.view.read(tenant_id, |tenant| {
            let mut matching = tenant.sign_ins.range(..before).rev().filter(|(_, s)| {
                level.is_none_or(|l| s.level == l)
                    && remediated.is_none_or(|r| s.remediated == r)
                    && user.is_none_or(|u| s.user_id == Some(u))
                    && range.contains(s.at)
            });
            let page: Vec<(Position, pb::RiskySignIn)> = matching
                .by_ref()
                .take(size)
                .map(|(p, s)| (*p, sign_in_to_proto(s)))
                .collect();
            (page, matching.next().is_some())
        });
        Ok(pb::ListRiskySignInsResponse {
            next_page_token: match (more, page.last()) {
                (true, Some((position, _))) => position.to_string(),
                _ => String::new(),
            },
            sign_ins: page.into_iter().map(|(_, s)| s).collect(),
        })
    }

    /// The user of a request, checked to be of the tenant.
    async fn user_of(&self, tenant_id: Uuid, user_id: &str) -> Result<Uuid, ApiError> {
        let user_id = parse_id("user_id", user_id)?;
        let user = Loaded::<User>::load(self.store.as_ref(), user_id).await?;
        if !user.state.exists() || user.state.tenant_id != Some(tenant_id) {
            return Err(ApiError::NotFound("user".into()));
        }
        Ok(user_id)
    }

    async fn history(
        &self,
        request: &Request<pb::UserRiskRequest>,
    ) -> Result<pb::UserRiskHistory, ApiError> {
        let m = request.get_ref();
        let (tenant_id, _) = Self::tenant_of(request, &m.tenant_id)?;
        let user_id = self.user_of(tenant_id, &m.user_id).await?;
        let low_age = self.low_age(tenant_id).await?;
        let events = self
            .store
            .read_stream(&UserRisk::stream(user_id), Default::default())
            .await?;
        let mut risk = UserRisk::default();
        let mut changes = Vec::new();
        for event in &events {
            let decoded = UserRiskEvent::decode(event)?;
            let (detection_id, kind, level) = match &decoded {
                UserRiskEvent::RiskRaised {
                    detection_id,
                    kind,
                    level,
                    ..
                } => (
                    detection_id.to_string(),
                    kind.clone(),
                    level.as_str().into(),
                ),
                _ => Default::default(),
            };
            risk.apply(decoded, event);
            changes.push(pb::UserRiskChange {
                r#type: event.event_type.clone(),
                detection_id,
                kind,
                level,
                at: rfc3339(event.recorded_at),
                actor: event.actor.to_string(),
                state: risk.state.as_str().into(),
                position: event.position,
            });
        }
        Ok(pb::UserRiskHistory {
            risk: Some(user_risk_to_proto(user_id, &risk, low_age)),
            changes,
        })
    }

    /// An analyst's action on a user's risk.
    async fn act(
        &self,
        request: &Request<pb::UserRiskRequest>,
        action: UserRiskEvent,
    ) -> Result<pb::UserRisk, ApiError> {
        let m = request.get_ref();
        let (tenant_id, caller) = Self::tenant_of(request, &m.tenant_id)?;
        let user_id = self.user_of(tenant_id, &m.user_id).await?;
        let low_age = self.low_age(tenant_id).await?;
        let metadata = request::metadata(request, caller.actor());
        let compromised = action == UserRiskEvent::CompromiseConfirmed;
        let executed = gatehouse_events::execute::<UserRisk, ApiError, _>(
            self.store.as_ref(),
            tenant_id,
            user_id,
            &metadata,
            |risk| {
                if compromised {
                    // Idempotent: a retry (say, after a revocation failed) adds nothing.
                    return Ok(if risk.state == RiskState::ConfirmedCompromised {
                        Vec::new()
                    } else {
                        vec![action.clone()]
                    });
                }
                let open = matches!(
                    risk.state,
                    RiskState::AtRisk | RiskState::ConfirmedCompromised
                );
                if !open {
                    return Err(ApiError::FailedPrecondition(format!(
                        "the user's risk is {}: there is nothing open to close",
                        risk.state.as_str()
                    )));
                }
                Ok(vec![action.clone()])
            },
        )
        .await?;
        // The view first: from here on this process's sign-ins ask for a new password and
        // its refreshes of the user's sessions are refused; then every session is revoked.
        if let Some(position) = executed.last_position {
            self.view.wait_for(position).await;
        }
        if compromised {
            self.sessions
                .revoke_all(tenant_id, user_id, "compromised", &metadata)
                .await?;
        }
        Ok(user_risk_to_proto(user_id, &executed.state, low_age))
    }

    /// The export, as a stream of chunks read from the view a page at a time (the whole
    /// export is never held in memory), up to the detections recorded when it began.
    fn export(
        &self,
        request: &Request<pb::ExportRiskDetectionsRequest>,
    ) -> Result<ExportStream, ApiError> {
        let m = request.get_ref();
        let (tenant_id, _) = Self::tenant_of(request, &m.tenant_id)?;
        let range = Range::parse(&m.from, &m.to)?;
        let csv = match m.format.as_str() {
            "" | "ndjson" => false,
            "csv" => true,
            _ => return Err(ApiError::invalid("format", "must be ndjson or csv")),
        };
        let view = self.view.clone();
        let end = view.read(tenant_id, |tenant| {
            tenant.detections.keys().next_back().copied().unwrap_or(0)
        });
        let stream = async_stream::try_stream! {
            if csv {
                yield pb::ExportChunk {
                    data: CSV_HEADER.as_bytes().to_vec(),
                };
            }
            let mut after = 0;
            while after < end {
                let page = view.read(tenant_id, |tenant| {
                    export_page(tenant, after, end, &range, CHUNK)
                });
                let Some((last, _)) = page.last() else {
                    break;
                };
                after = *last;
                let mut data = Vec::new();
                for (_, record) in &page {
                    if csv {
                        data.extend_from_slice(csv_line(record).as_bytes());
                    } else {
                        serde_json::to_writer(&mut data, record)
                            .map_err(|e| Status::internal(e.to_string()))?;
                        data.push(b'\n');
                    }
                }
                yield pb::ExportChunk { data };
            }
        };
        Ok(Box::pin(stream))
    }
}

/// Up to `limit` detections in `range` after position `after`, up to `end`.
fn export_page(
    tenant: &TenantRisk,
    after: Position,
    end: Position,
    range: &Range,
    limit: usize,
) -> Vec<(Position, DetectionRecord)> {
    if after >= end {
        return Vec::new();
    }
    tenant
        .detections
        .range(after + 1..=end)
        .filter(|(_, d)| range.contains(d.detected_at))
        .take(limit)
        .map(|(p, d)| (*p, d.clone()))
        .collect()
}

fn answer<T>(result: Result<T, ApiError>) -> Result<Response<T>, Status> {
    result.map(Response::new).map_err(Status::from)
}

type ExportStream = Pin<Box<dyn Stream<Item = Result<pb::ExportChunk, Status>> + Send>>;

#[tonic::async_trait]
impl RiskService for RiskApi {
    async fn list_risk_detections(
        &self,
        request: Request<pb::ListRiskDetectionsRequest>,
    ) -> Result<Response<pb::ListRiskDetectionsResponse>, Status> {
        answer(self.list_detections(&request))
    }

    async fn list_risky_users(
        &self,
        request: Request<pb::ListRiskyUsersRequest>,
    ) -> Result<Response<pb::ListRiskyUsersResponse>, Status> {
        answer(self.list_users(&request).await)
    }

    async fn list_risky_sign_ins(
        &self,
        request: Request<pb::ListRiskySignInsRequest>,
    ) -> Result<Response<pb::ListRiskySignInsResponse>, Status> {
        answer(self.list_sign_ins(&request))
    }

    async fn get_user_risk_history(
        &self,
        request: Request<pb::UserRiskRequest>,
    ) -> Result<Response<pb::UserRiskHistory>, Status> {
        answer(self.history(&request).await)
    }

    async fn confirm_compromised(
        &self,
        request: Request<pb::UserRiskRequest>,
    ) -> Result<Response<pb::UserRisk>, Status> {
        answer(self.act(&request, UserRiskEvent::CompromiseConfirmed).await)
    }

    async fn confirm_safe(
        &self,
        request: Request<pb::UserRiskRequest>,
    ) -> Result<Response<pb::UserRisk>, Status> {
        answer(self.act(&request, UserRiskEvent::ConfirmedSafe).await)
    }

    async fn dismiss_risk(
        &self,
        request: Request<pb::UserRiskRequest>,
    ) -> Result<Response<pb::UserRisk>, Status> {
        answer(self.act(&request, UserRiskEvent::RiskDismissed).await)
    }

    type ExportRiskDetectionsStream = ExportStream;

    async fn export_risk_detections(
        &self,
        request: Request<pb::ExportRiskDetectionsRequest>,
    ) -> Result<Response<ExportStream>, Status> {
        self.export(&request)
            .map(Response::new)
            .map_err(Status::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_export_pages_through_the_range_and_stops_at_its_end() {
        let start = DateTime::<Utc>::from_timestamp(1_800_000_000, 0).unwrap_or_default();
        let mut tenant = TenantRisk::default();
        for i in 1..=7u64 {
            let record = DetectionRecord {
                id: Uuid::from_u128(u128::from(i)),
                tenant_id: Uuid::nil(),
                kind: "brute_force".into(),
                level: RiskLevel::Medium,
                timing: "offline".into(),
                user_id: None,
                sign_in_id: None,
                source: None,
                description: String::new(),
                evidence: Vec::new(),
                detected_at: start + Duration::minutes(i as i64),
            };
            tenant.detections.insert(i * 10, record);
        }
        // Minutes 2 to 6, positions up to 60 (the export's end), two at a time.
        let range = Range(
            Some(start + Duration::minutes(2)),
            Some(start + Duration::minutes(7)),
        );
        let (mut after, mut seen) = (0, Vec::new());
        loop {
            let page = export_page(&tenant, after, 60, &range, 2);
            assert!(page.len() <= 2);
            let Some((last, _)) = page.last() else { break };
            after = *last;
            seen.extend(page.into_iter().map(|(p, _)| p));
        }
        assert_eq!(seen, [20, 30, 40, 50, 60]);
    }

    #[test]
    fn csv_fields_are_quoted_and_formulas_neutralised() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=HYPERLINK(1)"), "'=HYPERLINK(1)");
    }
}
