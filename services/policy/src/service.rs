//! `gatehouse.v1.PolicyService`: policies, named locations, groups, What If and Backtest.

use crate::backtest::{self, Counts};
use crate::engine::{Context, Outcome, PolicySet, PrimaryKind};
use crate::model::{
    AppAssignment, Conditions, Control, Controls, Definition, Grant, Group, GroupEvent,
    LocationCondition, LocationDefinition, LocationEvent, MAX_NAME, NamedLocation, Operator,
    Platform, Policy, PolicyEvent, PolicyState, PrimaryCondition, RiskLevel, SessionControls,
    UserAssignment,
};
use crate::view::{PolicyView, TenantPolicies};
use chrono::{DateTime, Utc};
use gatehouse_core::error::Validation;
use gatehouse_core::geo::Geo;
use gatehouse_core::{ApiError, Caller, request};
use gatehouse_directory::application::Application;
use gatehouse_directory::tenant::MfaMethod;
use gatehouse_directory::tenant_service::{
    mfa_from_proto, mfa_to_proto, parse_id, requested_tenant, rfc3339,
};
use gatehouse_directory::user::User;
use gatehouse_events::{
    Aggregate, AppendRequest, DomainEvent, EventStore, ExpectedVersion, Loaded, Metadata,
};
use gatehouse_proto::v1 as pb;
use std::net::IpAddr;
use std::sync::Arc;
use tonic::{Request, Response, Status};
use uuid::Uuid;

/// Most policies per tenant.
pub const MAX_POLICIES: usize = 500;
/// Most named locations per tenant.
pub const MAX_LOCATIONS: usize = 200;

/// The PolicyService implementation.
pub struct PolicyApi {
    store: Arc<dyn EventStore>,
    view: Arc<PolicyView>,
    geo: Arc<Geo>,
}

fn answer<T>(result: Result<T, ApiError>) -> Result<Response<T>, Status> {
    result.map(Response::new).map_err(Status::from)
}

fn ids(field: &str, values: &[String], validation: &mut Validation) -> Vec<Uuid> {
    let mut out = Vec::with_capacity(values.len());
    for (i, value) in values.iter().enumerate() {
        match Uuid::try_parse(value) {
            Ok(id) if !out.contains(&id) => out.push(id),
            Ok(_) => validation.add(&format!("{field}[{i}]"), "is listed twice"),
            Err(_) => validation.add(&format!("{field}[{i}]"), "must be a UUID"),
        }
    }
    out
}

fn risk_from(field: &str, values: &[i32], validation: &mut Validation) -> Vec<RiskLevel> {
    let mut out = Vec::new();
    for (i, value) in values.iter().enumerate() {
        match pb::RiskLevel::try_from(*value) {
            Ok(pb::RiskLevel::None) => out.push(RiskLevel::None),
            Ok(pb::RiskLevel::Low) => out.push(RiskLevel::Low),
            Ok(pb::RiskLevel::Medium) => out.push(RiskLevel::Medium),
            Ok(pb::RiskLevel::High) => out.push(RiskLevel::High),
            _ => validation.add(&format!("{field}[{i}]"), "unknown risk level"),
        }
    }
    out
}

fn risk_to(level: RiskLevel) -> i32 {
    (match level {
        RiskLevel::None => pb::RiskLevel::None,
        RiskLevel::Low => pb::RiskLevel::Low,
        RiskLevel::Medium => pb::RiskLevel::Medium,
        RiskLevel::High => pb::RiskLevel::High,
    }) as i32
}

fn platform_to(platform: Platform) -> i32 {
    (match platform {
        Platform::Android => pb::ClientPlatform::Android,
        Platform::Ios => pb::ClientPlatform::Ios,
        Platform::Windows => pb::ClientPlatform::Windows,
        Platform::Macos => pb::ClientPlatform::Macos,
        Platform::Linux => pb::ClientPlatform::Linux,
        Platform::Other => pb::ClientPlatform::Other,
    }) as i32
}

fn control_to(control: Control) -> i32 {
    (match control {
        Control::Mfa => pb::GrantControl::Mfa,
        Control::PhoneVerified => pb::GrantControl::PhoneVerified,
        Control::PasswordChange => pb::GrantControl::PasswordChange,
    }) as i32
}

fn state_from(value: i32, default: Option<PolicyState>) -> Result<PolicyState, ApiError> {
    match pb::PolicyState::try_from(value) {
        Ok(pb::PolicyState::Enabled) => Ok(PolicyState::Enabled),
        Ok(pb::PolicyState::Disabled) => Ok(PolicyState::Disabled),
        Ok(pb::PolicyState::ReportOnly) => Ok(PolicyState::ReportOnly),
        Ok(pb::PolicyState::Unspecified) if default.is_some() => Ok(default.unwrap_or_default()),
        _ => Err(ApiError::invalid(
            "state",
            "must be ENABLED, DISABLED or REPORT_ONLY",
        )),
    }
}

fn state_to(state: PolicyState) -> i32 {
    (match state {
        PolicyState::Enabled => pb::PolicyState::Enabled,
        PolicyState::Disabled => pb::PolicyState::Disabled,
        PolicyState::ReportOnly => pb::PolicyState::ReportOnly,
    }) as i32
}

/// Parses `password`, `email_otp`, `federated`, `federated:<provider>`.
pub fn primary_from(text: &str) -> Option<PrimaryCondition> {
    match text {
        "password" => Some(PrimaryCondition::Password),
        "email_otp" => Some(PrimaryCondition::EmailOtp),
        "federated" => Some(PrimaryCondition::Federated(None)),
        other => other
            .strip_prefix("federated:")
            .filter(|p| !p.is_empty() && p.len() <= 100)
            .map(|p| PrimaryCondition::Federated(Some(p.to_string()))),
    }
}

fn primary_to(method: &PrimaryCondition) -> String {
    match method {
        PrimaryCondition::Password => "password".into(),
        PrimaryCondition::EmailOtp => "email_otp".into(),
        PrimaryCondition::Federated(None) => "federated".into(),
        PrimaryCondition::Federated(Some(p)) => format!("federated:{p}"),
    }
}

/// A definition from its message, recording every rule it breaks.
pub fn definition_from(d: Option<&pb::PolicyDefinition>, v: &mut Validation) -> Definition {
    let Some(d) = d else {
        v.add("definition", "is required");
        return Definition::default();
    };
    let users = d.users.clone().unwrap_or_default();
    let apps = d.apps.clone().unwrap_or_default();
    let conditions = d.conditions.clone().unwrap_or_default();
    let locations = conditions.locations.clone().unwrap_or_default();
    let grant = d.grant.clone().unwrap_or_default();
    let session = d.session.unwrap_or_default();
    let mut platforms = Vec::new();
    for (i, value) in conditions.platforms.iter().enumerate() {
        match pb::ClientPlatform::try_from(*value) {
            Ok(pb::ClientPlatform::Android) => platforms.push(Platform::Android),
            Ok(pb::ClientPlatform::Ios) => platforms.push(Platform::Ios),
            Ok(pb::ClientPlatform::Windows) => platforms.push(Platform::Windows),
            Ok(pb::ClientPlatform::Macos) => platforms.push(Platform::Macos),
            Ok(pb::ClientPlatform::Linux) => platforms.push(Platform::Linux),
            Ok(pb::ClientPlatform::Other) => platforms.push(Platform::Other),
            _ => v.add(&format!("conditions.platforms[{i}]"), "unknown platform"),
        }
    }
    let mut primary_methods = Vec::new();
    for (i, text) in conditions.primary_methods.iter().enumerate() {
        match primary_from(text) {
            Some(method) => primary_methods.push(method),
            None => v.add(
                &format!("conditions.primary_methods[{i}]"),
                "must be password, email_otp, federated or federated:<provider>",
            ),
        }
    }
    let mut controls = Vec::new();
    for (i, value) in grant.controls.iter().enumerate() {
        let control = match pb::GrantControl::try_from(*value) {
            Ok(pb::GrantControl::Mfa) => Control::Mfa,
            Ok(pb::GrantControl::PhoneVerified) => Control::PhoneVerified,
            Ok(pb::GrantControl::PasswordChange) => Control::PasswordChange,
            _ => {
                v.add(&format!("grant.controls[{i}]"), "unknown control");
                continue;
            }
        };
        if !controls.contains(&control) {
            controls.push(control);
        }
    }
    let operator = match pb::GrantOperator::try_from(grant.operator) {
        Ok(pb::GrantOperator::Or) => Operator::Or,
        Ok(pb::GrantOperator::And) => Operator::And,
        Err(_) => {
            v.add("grant.operator", "must be AND or OR");
            Operator::And
        }
    };
    let mut strength = Vec::new();
    for (i, value) in grant.authentication_strength.iter().enumerate() {
        match mfa_from_proto(*value) {
            Some(method) => strength.push(method),
            None => v.add(
                &format!("grant.authentication_strength[{i}]"),
                "unknown method",
            ),
        }
    }
    let definition = Definition {
        name: d.name.trim().to_string(),
        users: UserAssignment {
            all: users.all,
            include_users: ids("users.include_users", &users.include_users, v),
            include_groups: ids("users.include_groups", &users.include_groups, v),
            exclude_users: ids("users.exclude_users", &users.exclude_users, v),
            exclude_groups: ids("users.exclude_groups", &users.exclude_groups, v),
        },
        apps: AppAssignment {
            all: apps.all,
            include: ids("apps.include", &apps.include, v),
            exclude: ids("apps.exclude", &apps.exclude, v),
        },
        conditions: Conditions {
            sign_in_risk: risk_from("conditions.sign_in_risk", &conditions.sign_in_risk, v),
            user_risk: risk_from("conditions.user_risk", &conditions.user_risk, v),
            locations: LocationCondition {
                any: locations.any,
                include: ids("conditions.locations.include", &locations.include, v),
                include_trusted: locations.include_trusted,
                exclude: ids("conditions.locations.exclude", &locations.exclude, v),
                exclude_trusted: locations.exclude_trusted,
            },
            platforms,
            primary_methods,
        },
        grant: Grant {
            block: grant.block,
            operator,
            controls,
            authentication_strength: strength,
        },
        session: SessionControls {
            sign_in_frequency_seconds: session.sign_in_frequency_seconds,
            persistent: session.persistent_session,
        },
    };
    definition.validate(v);
    definition
}

fn definition_to(d: &Definition) -> pb::PolicyDefinition {
    let strings = |ids: &[Uuid]| ids.iter().map(Uuid::to_string).collect::<Vec<_>>();
    let c = &d.conditions;
    pb::PolicyDefinition {
        name: d.name.clone(),
        users: Some(pb::UserAssignment {
            all: d.users.all,
            include_users: strings(&d.users.include_users),
            include_groups: strings(&d.users.include_groups),
            exclude_users: strings(&d.users.exclude_users),
            exclude_groups: strings(&d.users.exclude_groups),
        }),
        apps: Some(pb::AppAssignment {
            all: d.apps.all,
            include: strings(&d.apps.include),
            exclude: strings(&d.apps.exclude),
        }),
        conditions: Some(pb::PolicyConditions {
            sign_in_risk: c.sign_in_risk.iter().map(|l| risk_to(*l)).collect(),
            user_risk: c.user_risk.iter().map(|l| risk_to(*l)).collect(),
            locations: Some(pb::LocationCondition {
                any: c.locations.any,
                include: strings(&c.locations.include),
                include_trusted: c.locations.include_trusted,
                exclude: strings(&c.locations.exclude),
                exclude_trusted: c.locations.exclude_trusted,
            }),
            platforms: c.platforms.iter().map(|p| platform_to(*p)).collect(),
            primary_methods: c.primary_methods.iter().map(primary_to).collect(),
        }),
        grant: Some(pb::GrantControls {
            block: d.grant.block,
            operator: match d.grant.operator {
                Operator::And => pb::GrantOperator::And,
                Operator::Or => pb::GrantOperator::Or,
            } as i32,
            controls: d.grant.controls.iter().map(|c| control_to(*c)).collect(),
            authentication_strength: d
                .grant
                .authentication_strength
                .iter()
                .map(|m| mfa_to_proto(*m))
                .collect(),
        }),
        session: Some(pb::SessionControls {
            sign_in_frequency_seconds: d.session.sign_in_frequency_seconds,
            persistent_session: d.session.persistent,
        }),
    }
}

fn policy_to(tenant_id: Uuid, id: Uuid, policy: &Policy) -> pb::Policy {
    pb::Policy {
        id: id.to_string(),
        tenant_id: tenant_id.to_string(),
        definition: Some(definition_to(&policy.definition)),
        state: state_to(policy.state),
        created_at: policy.created_at.map(rfc3339).unwrap_or_default(),
        updated_at: policy.updated_at.map(rfc3339).unwrap_or_default(),
    }
}

fn location_to(tenant_id: Uuid, id: Uuid, l: &LocationDefinition) -> pb::NamedLocation {
    pb::NamedLocation {
        id: id.to_string(),
        tenant_id: tenant_id.to_string(),
        name: l.name.clone(),
        ranges: l.ranges.clone(),
        countries: l.countries.clone(),
        trusted: l.trusted,
    }
}

fn group_to(tenant_id: Uuid, id: Uuid, group: &Group) -> pb::Group {
    pb::Group {
        id: id.to_string(),
        tenant_id: tenant_id.to_string(),
        name: group.name.clone(),
        member_ids: group.members.iter().map(Uuid::to_string).collect(),
    }
}

/// A user of the tenant, or none.
async fn user_of(
    store: &dyn EventStore,
    tenant_id: Uuid,
    user_id: Uuid,
) -> Result<Option<Loaded<User>>, ApiError> {
    let user = Loaded::<User>::load(store, user_id).await?;
    Ok((user.state.exists() && user.state.tenant_id == Some(tenant_id)).then_some(user))
}

impl PolicyApi {
    /// The service over a store and the live policy view.
    pub fn new(store: Arc<dyn EventStore>, view: Arc<PolicyView>, geo: Arc<Geo>) -> Self {
        PolicyApi { store, view, geo }
    }

    /// The tenant named in a request, checked against the caller and required to exist.
    async fn tenant(&self, caller: &Caller, tenant_id: &str) -> Result<Uuid, ApiError> {
        requested_tenant(self.store.as_ref(), caller, tenant_id).await
    }

    /// Rejects ids that name nothing in the tenant.
    async fn check_references(
        &self,
        tenant_id: Uuid,
        d: &Definition,
        v: &mut Validation,
    ) -> Result<(), ApiError> {
        let users = [
            ("users.include_users", &d.users.include_users),
            ("users.exclude_users", &d.users.exclude_users),
        ];
        for (field, ids) in users {
            for (i, id) in ids.iter().enumerate() {
                if user_of(self.store.as_ref(), tenant_id, *id)
                    .await?
                    .is_none()
                {
                    v.add(&format!("{field}[{i}]"), "is not a user of this tenant");
                }
            }
        }
        for (field, ids) in [
            ("apps.include", &d.apps.include),
            ("apps.exclude", &d.apps.exclude),
        ] {
            for (i, id) in ids.iter().enumerate() {
                let app = Loaded::<Application>::load(self.store.as_ref(), *id).await?;
                if !app.state.exists() || app.state.tenant_id != Some(tenant_id) {
                    v.add(&format!("{field}[{i}]"), "is not an app of this tenant");
                }
            }
        }
        self.view.read(tenant_id, |tenant| {
            for (field, ids) in [
                ("users.include_groups", &d.users.include_groups),
                ("users.exclude_groups", &d.users.exclude_groups),
            ] {
                for (i, id) in ids.iter().enumerate() {
                    if !tenant.groups.contains_key(id) {
                        v.add(&format!("{field}[{i}]"), "is not a group of this tenant");
                    }
                }
            }
            let l = &d.conditions.locations;
            for (field, ids) in [
                ("conditions.locations.include", &l.include),
                ("conditions.locations.exclude", &l.exclude),
            ] {
                for (i, id) in ids.iter().enumerate() {
                    if !tenant.locations.contains_key(id) {
                        v.add(
                            &format!("{field}[{i}]"),
                            "is not a named location of this tenant",
                        );
                    }
                }
            }
        });
        Ok(())
    }

    /// Validates a definition from a request, including its references and warnings.
    async fn checked_definition(
        &self,
        tenant_id: Uuid,
        d: Option<&pb::PolicyDefinition>,
        acknowledge: bool,
    ) -> Result<Definition, ApiError> {
        let mut validation = Validation::new();
        let definition = definition_from(d, &mut validation);
        // Shape first: an oversized id list is refused before any id is looked up.
        validation.finish()?;
        let mut validation = Validation::new();
        self.check_references(tenant_id, &definition, &mut validation)
            .await?;
        validation.finish()?;
        let warnings = definition.warnings();
        if !warnings.is_empty() && !acknowledge {
            let text: Vec<String> = warnings
                .iter()
                .map(|w| format!("{}: {}", w.field, w.message))
                .collect();
            return Err(ApiError::FailedPrecondition(format!(
                "{}; set acknowledge_warnings to save it anyway",
                text.join("; ")
            )));
        }
        Ok(definition)
    }

    /// Appends and waits until this process's view has the write (read-your-writes).
    async fn write<E: DomainEvent>(
        &self,
        tenant_id: Uuid,
        metadata: Metadata,
        stream: &gatehouse_events::StreamId,
        expected: ExpectedVersion,
        event: &E,
    ) -> Result<(), ApiError> {
        let mut request = AppendRequest::new(metadata);
        request.expect(stream, expected);
        request.push(event.to_new_event(tenant_id, stream)?);
        let outcome = self.store.append(request).await?;
        if !self.view.wait_for(outcome.last_position()).await {
            tracing::warn!("policy view is behind the log");
        }
        Ok(())
    }

    /// Starts a new stream of `A` with its first event; its id and state.
    async fn create_stream<A: Aggregate>(
        &self,
        tenant_id: Uuid,
        metadata: Metadata,
        event: &A::Event,
    ) -> Result<(Uuid, A), ApiError> {
        let id = Uuid::now_v7();
        let stream = A::stream(id);
        self.write(
            tenant_id,
            metadata,
            &stream,
            ExpectedVersion::Exact(0),
            event,
        )
        .await?;
        Ok((id, Loaded::<A>::load(self.store.as_ref(), id).await?.state))
    }

    async fn policy(&self, tenant_id: Uuid, id: &str) -> Result<Loaded<Policy>, ApiError> {
        let id = parse_id("policy_id", id)?;
        let loaded = Loaded::<Policy>::load(self.store.as_ref(), id).await?;
        if !loaded.state.exists() || loaded.state.tenant_id != Some(tenant_id) {
            return Err(ApiError::NotFound("policy".into()));
        }
        Ok(loaded)
    }

    async fn create(
        &self,
        request: Request<pb::CreatePolicyRequest>,
    ) -> Result<pb::Policy, ApiError> {
        let caller = Caller::of(&request)?;
        let metadata = request::metadata(&request, caller.actor());
        let m = request.get_ref();
        let tenant_id = self.tenant(&caller, &m.tenant_id).await?;
        let state = state_from(m.state, Some(PolicyState::ReportOnly))?;
        let definition = self
            .checked_definition(tenant_id, m.definition.as_ref(), m.acknowledge_warnings)
            .await?;
        if self.view.read(tenant_id, |t| t.policies.len()) >= MAX_POLICIES {
            return Err(ApiError::FailedPrecondition(format!(
                "a tenant has at most {MAX_POLICIES} policies"
            )));
        }
        let event = PolicyEvent::PolicyCreated { definition, state };
        let (id, policy) = self
            .create_stream::<Policy>(tenant_id, metadata, &event)
            .await?;
        Ok(policy_to(tenant_id, id, &policy))
    }

    async fn update(
        &self,
        request: Request<pb::UpdatePolicyRequest>,
    ) -> Result<pb::Policy, ApiError> {
        let caller = Caller::of(&request)?;
        let metadata = request::metadata(&request, caller.actor());
        let m = request.get_ref();
        let tenant_id = self.tenant(&caller, &m.tenant_id).await?;
        let loaded = self.policy(tenant_id, &m.policy_id).await?;
        let definition = self
            .checked_definition(tenant_id, m.definition.as_ref(), m.acknowledge_warnings)
            .await?;
        let event = PolicyEvent::PolicyUpdated { definition };
        self.write(
            tenant_id,
            metadata,
            &loaded.stream,
            loaded.expected(),
            &event,
        )
        .await?;
        let id = loaded.stream.id;
        let loaded = Loaded::<Policy>::load(self.store.as_ref(), id).await?;
        Ok(policy_to(tenant_id, id, &loaded.state))
    }

    async fn set_state(
        &self,
        request: Request<pb::SetPolicyStateRequest>,
    ) -> Result<pb::Policy, ApiError> {
        let caller = Caller::of(&request)?;
        let metadata = request::metadata(&request, caller.actor());
        let m = request.get_ref();
        let tenant_id = self.tenant(&caller, &m.tenant_id).await?;
        let state = state_from(m.state, None)?;
        let loaded = self.policy(tenant_id, &m.policy_id).await?;
        let id = loaded.stream.id;
        if loaded.state.state != state {
            let event = PolicyEvent::PolicyStateChanged { state };
            self.write(
                tenant_id,
                metadata,
                &loaded.stream,
                loaded.expected(),
                &event,
            )
            .await?;
        }
        let loaded = Loaded::<Policy>::load(self.store.as_ref(), id).await?;
        Ok(policy_to(tenant_id, id, &loaded.state))
    }

    async fn delete(
        &self,
        request: Request<pb::PolicyRef>,
    ) -> Result<pb::DeletePolicyResponse, ApiError> {
        let caller = Caller::of(&request)?;
        let metadata = request::metadata(&request, caller.actor());
        let m = request.get_ref();
        let tenant_id = self.tenant(&caller, &m.tenant_id).await?;
        let loaded = self.policy(tenant_id, &m.policy_id).await?;
        self.write(
            tenant_id,
            metadata,
            &loaded.stream,
            loaded.expected(),
            &PolicyEvent::PolicyDeleted,
        )
        .await?;
        Ok(pb::DeletePolicyResponse {})
    }

    async fn get(&self, request: Request<pb::PolicyRef>) -> Result<pb::Policy, ApiError> {
        let caller = Caller::of(&request)?;
        let m = request.get_ref();
        let tenant_id = self.tenant(&caller, &m.tenant_id).await?;
        let loaded = self.policy(tenant_id, &m.policy_id).await?;
        Ok(policy_to(tenant_id, loaded.stream.id, &loaded.state))
    }

    async fn list(
        &self,
        request: Request<pb::ListPoliciesRequest>,
    ) -> Result<pb::ListPoliciesResponse, ApiError> {
        let caller = Caller::of(&request)?;
        let tenant_id = self.tenant(&caller, &request.get_ref().tenant_id).await?;
        let policies = self.view.read(tenant_id, |tenant| {
            tenant
                .policies
                .iter()
                .map(|(id, policy)| policy_to(tenant_id, *id, policy))
                .collect()
        });
        Ok(pb::ListPoliciesResponse { policies })
    }

    async fn create_location(
        &self,
        request: Request<pb::CreateNamedLocationRequest>,
    ) -> Result<pb::NamedLocation, ApiError> {
        let caller = Caller::of(&request)?;
        let metadata = request::metadata(&request, caller.actor());
        let m = request.get_ref();
        let tenant_id = self.tenant(&caller, &m.tenant_id).await?;
        let definition = LocationDefinition {
            name: m.name.trim().to_string(),
            ranges: m.ranges.iter().map(|r| r.trim().to_string()).collect(),
            countries: m
                .countries
                .iter()
                .map(|c| c.trim().to_uppercase())
                .collect(),
            trusted: m.trusted,
        };
        let mut validation = Validation::new();
        definition.validate(&mut validation);
        validation.finish()?;
        if self.view.read(tenant_id, |t| t.locations.len()) >= MAX_LOCATIONS {
            return Err(ApiError::FailedPrecondition(format!(
                "a tenant has at most {MAX_LOCATIONS} named locations"
            )));
        }
        let event = LocationEvent::NamedLocationCreated { definition };
        let (id, location) = self
            .create_stream::<NamedLocation>(tenant_id, metadata, &event)
            .await?;
        Ok(location_to(tenant_id, id, &location.definition))
    }

    async fn list_locations(
        &self,
        request: Request<pb::ListNamedLocationsRequest>,
    ) -> Result<pb::ListNamedLocationsResponse, ApiError> {
        let caller = Caller::of(&request)?;
        let tenant_id = self.tenant(&caller, &request.get_ref().tenant_id).await?;
        let locations = self.view.read(tenant_id, |t| {
            t.locations
                .iter()
                .map(|(id, l)| location_to(tenant_id, *id, &l.definition))
                .collect()
        });
        Ok(pb::ListNamedLocationsResponse { locations })
    }

    async fn create_group(
        &self,
        request: Request<pb::CreateGroupRequest>,
    ) -> Result<pb::Group, ApiError> {
        let caller = Caller::of(&request)?;
        let metadata = request::metadata(&request, caller.actor());
        let m = request.get_ref();
        let tenant_id = self.tenant(&caller, &m.tenant_id).await?;
        let name = m.name.trim().to_string();
        let mut validation = Validation::new();
        validation.text("name", &name, 1, MAX_NAME);
        validation.finish()?;
        let event = GroupEvent::GroupCreated { name };
        let (id, group) = self
            .create_stream::<Group>(tenant_id, metadata, &event)
            .await?;
        Ok(group_to(tenant_id, id, &group))
    }

    async fn member(
        &self,
        request: Request<pb::GroupMemberRequest>,
        add: bool,
    ) -> Result<pb::Group, ApiError> {
        let caller = Caller::of(&request)?;
        let metadata = request::metadata(&request, caller.actor());
        let m = request.get_ref();
        let tenant_id = self.tenant(&caller, &m.tenant_id).await?;
        let group_id = parse_id("group_id", &m.group_id)?;
        let user_id = parse_id("user_id", &m.user_id)?;
        let group = Loaded::<Group>::load(self.store.as_ref(), group_id).await?;
        if group.state.tenant_id != Some(tenant_id) {
            return Err(ApiError::NotFound("group".into()));
        }
        if add
            && user_of(self.store.as_ref(), tenant_id, user_id)
                .await?
                .is_none()
        {
            return Err(ApiError::invalid("user_id", "is not a user of this tenant"));
        }
        let member = group.state.members.contains(&user_id);
        let event = match (add, member) {
            (true, false) => Some(GroupEvent::MemberAdded { user_id }),
            (false, true) => Some(GroupEvent::MemberRemoved { user_id }),
            _ => None,
        };
        if let Some(event) = event {
            self.write(tenant_id, metadata, &group.stream, group.expected(), &event)
                .await?;
        }
        let loaded = Loaded::<Group>::load(self.store.as_ref(), group_id).await?;
        Ok(group_to(tenant_id, group_id, &loaded.state))
    }

    async fn list_groups(
        &self,
        request: Request<pb::ListGroupsRequest>,
    ) -> Result<pb::ListGroupsResponse, ApiError> {
        let caller = Caller::of(&request)?;
        let tenant_id = self.tenant(&caller, &request.get_ref().tenant_id).await?;
        let groups = self.view.read(tenant_id, |t| {
            t.groups
                .iter()
                .map(|(id, group)| group_to(tenant_id, *id, group))
                .collect()
        });
        Ok(pb::ListGroupsResponse { groups })
    }

    async fn what_if(
        &self,
        request: Request<pb::WhatIfRequest>,
    ) -> Result<pb::WhatIfResponse, ApiError> {
        let caller = Caller::of(&request)?;
        let m = request.get_ref();
        let tenant_id = self.tenant(&caller, &m.tenant_id).await?;
        let mut v = Validation::new();
        let user_id = Uuid::try_parse(&m.user_id).ok();
        let app_id = Uuid::try_parse(&m.application_id).ok();
        if user_id.is_none() {
            v.add("user_id", "must be a UUID");
        }
        if app_id.is_none() {
            v.add("application_id", "must be a UUID");
        }
        let ip: Option<IpAddr> = match m.ip.trim() {
            "" => None,
            text => text.parse().map_or_else(
                |_| {
                    v.add("ip", "must be an IPv4 or IPv6 address");
                    None
                },
                Some,
            ),
        };
        let country = match m.country.trim() {
            "" => None,
            text => {
                let upper = text.to_uppercase();
                let code = <[u8; 2]>::try_from(upper.as_bytes())
                    .ok()
                    .filter(|c| c.iter().all(u8::is_ascii_uppercase));
                if code.is_none() {
                    v.add("country", "must be an ISO 3166-1 alpha-2 code");
                }
                code
            }
        };
        let risk = |field: &str, value: i32, v: &mut Validation| match value {
            0 => RiskLevel::None,
            other => risk_from(field, &[other], v)
                .first()
                .copied()
                .unwrap_or_default(),
        };
        let sign_in_risk = risk("sign_in_risk", m.sign_in_risk, &mut v);
        let user_risk = risk("user_risk", m.user_risk, &mut v);
        let primary = match m.primary_method.as_str() {
            "" => Some(PrimaryCondition::Password),
            text => primary_from(text),
        };
        if primary.is_none() || primary == Some(PrimaryCondition::Federated(None)) {
            v.add(
                "primary_method",
                "must be password, email_otp or federated:<provider>",
            );
        }
        v.finish()?;
        // No country given: the GeoIP database's, as a real sign-in would get.
        let country = country.or_else(|| ip.and_then(|ip| self.geo.country(ip)));
        let (Some(user_id), Some(app_id)) = (user_id, app_id) else {
            return Err(ApiError::Internal("validated ids".into()));
        };
        let user = user_of(self.store.as_ref(), tenant_id, user_id)
            .await?
            .ok_or_else(|| ApiError::invalid("user_id", "is not a user of this tenant"))?;
        let app = Loaded::<Application>::load(self.store.as_ref(), app_id).await?;
        if !app.state.exists() || app.state.tenant_id != Some(tenant_id) {
            return Err(ApiError::invalid(
                "application_id",
                "is not an app of this tenant",
            ));
        }
        let primary = match &primary {
            Some(PrimaryCondition::EmailOtp) => PrimaryKind::EmailOtp,
            Some(PrimaryCondition::Federated(Some(p))) => PrimaryKind::Federated { id: p, kind: p },
            _ => PrimaryKind::Password,
        };
        let platform = Platform::of_user_agent(&m.user_agent);
        let satisfied = if user.state.phone_verified {
            Controls::of(&[Control::PhoneVerified])
        } else {
            Controls::NONE
        };
        self.view.read(tenant_id, |tenant| {
            let context = Context {
                user_id,
                groups: tenant.groups_of(user_id),
                app_id,
                ip,
                country,
                platform,
                sign_in_risk,
                user_risk,
                primary,
                satisfied,
            };
            Ok(explain(tenant, &tenant.compiled, &context, platform))
        })
    }

    async fn backtest(
        &self,
        request: Request<pb::BacktestRequest>,
    ) -> Result<pb::BacktestResponse, ApiError> {
        let caller = Caller::of(&request)?;
        let m = request.get_ref();
        let tenant_id = self.tenant(&caller, &m.tenant_id).await?;
        let mut v = Validation::new();
        let definition = definition_from(m.draft.as_ref(), &mut v);
        v.finish()?;
        let mut v = Validation::new();
        self.check_references(tenant_id, &definition, &mut v)
            .await?;
        let time = |field: &str, text: &str, v: &mut Validation| {
            DateTime::parse_from_rfc3339(text)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| v.add(field, "must be an RFC 3339 time"))
                .ok()
        };
        let from = time("from", &m.from, &mut v);
        let to = time("to", &m.to, &mut v);
        if let (Some(from), Some(to)) = (from, to)
            && from >= to
        {
            v.add("to", "must be after from");
        }
        if m.samples > 50 {
            v.add("samples", "at most 50");
        }
        v.finish()?;
        let (Some(from), Some(to)) = (from, to) else {
            return Err(ApiError::Internal("validated times".into()));
        };
        let samples = if m.samples == 0 {
            5
        } else {
            m.samples as usize
        };
        let (set, member_of) = self.view.read(tenant_id, |tenant| {
            let set = PolicySet::compile(
                [(Uuid::nil(), PolicyState::Enabled, &definition)],
                &tenant.location_map(),
            );
            (set, tenant.clone())
        });
        let report = backtest::run(
            self.store.as_ref(),
            tenant_id,
            &set,
            &member_of,
            from,
            to,
            samples,
        )
        .await?;
        let counts = |rows: Vec<(Uuid, Counts)>| {
            rows.into_iter()
                .map(|(id, c)| pb::BacktestCount {
                    id: id.to_string(),
                    evaluated: c.evaluated,
                    blocked: c.blocked,
                    challenged: c.challenged,
                    sample_sign_in_ids: c.samples.iter().map(Uuid::to_string).collect(),
                })
                .collect()
        };
        Ok(pb::BacktestResponse {
            evaluated: report.total.evaluated,
            blocked: report.total.blocked,
            challenged: report.total.challenged,
            completed_without_mfa: report.completed_without_mfa,
            by_app: counts(report.by_app),
            by_user: counts(report.by_user),
            through_position: report.through,
        })
    }
}

/// Explains a decision policy by policy.
fn explain(
    tenant: &TenantPolicies,
    set: &PolicySet,
    context: &Context<'_>,
    platform: Platform,
) -> pb::WhatIfResponse {
    let decision = set.evaluate(context);
    let policies = decision
        .results
        .iter()
        .map(|result| {
            let row = tenant.policies.get(&result.policy);
            let (applies, failed, block, controls) = match result.outcome {
                Outcome::NotApplied(condition) => (false, condition.as_str(), false, vec![]),
                Outcome::Block => (true, "", true, vec![]),
                Outcome::Grant(controls) => (
                    true,
                    "",
                    false,
                    controls.list().into_iter().map(control_to).collect(),
                ),
            };
            pb::PolicyEvaluation {
                policy_id: result.policy.to_string(),
                name: row.map(|r| r.definition.name.clone()).unwrap_or_default(),
                state: state_to(row.map_or(PolicyState::Enabled, |r| r.state)),
                applies,
                failed_condition: failed.into(),
                block,
                controls,
            }
        })
        .collect();
    let methods = [
        MfaMethod::Totp,
        MfaMethod::EmailOtp,
        MfaMethod::SmsOtp,
        MfaMethod::RecoveryCode,
    ];
    pb::WhatIfResponse {
        policies,
        blocked: decision.blocked_by.is_some(),
        blocked_by: decision
            .blocked_by
            .map(|id| id.to_string())
            .unwrap_or_default(),
        required_controls: decision
            .required
            .list()
            .into_iter()
            .map(control_to)
            .collect(),
        mfa_methods: if decision.required.has(Control::Mfa) {
            methods
                .into_iter()
                .filter(|m| decision.allows(*m))
                .map(mfa_to_proto)
                .collect()
        } else {
            vec![]
        },
        sign_in_frequency_seconds: decision.sign_in_frequency,
        platform: platform_to(platform),
    }
}

#[tonic::async_trait]
impl pb::policy_service_server::PolicyService for PolicyApi {
    async fn create_policy(
        &self,
        request: Request<pb::CreatePolicyRequest>,
    ) -> Result<Response<pb::Policy>, Status> {
        answer(self.create(request).await)
    }
    async fn get_policy(
        &self,
        request: Request<pb::PolicyRef>,
    ) -> Result<Response<pb::Policy>, Status> {
        answer(self.get(request).await)
    }
    async fn update_policy(
        &self,
        request: Request<pb::UpdatePolicyRequest>,
    ) -> Result<Response<pb::Policy>, Status> {
        answer(self.update(request).await)
    }
    async fn delete_policy(
        &self,
        request: Request<pb::PolicyRef>,
    ) -> Result<Response<pb::DeletePolicyResponse>, Status> {
        answer(self.delete(request).await)
    }
    async fn list_policies(
        &self,
        request: Request<pb::ListPoliciesRequest>,
    ) -> Result<Response<pb::ListPoliciesResponse>, Status> {
        answer(self.list(request).await)
    }
    async fn set_policy_state(
        &self,
        request: Request<pb::SetPolicyStateRequest>,
    ) -> Result<Response<pb::Policy>, Status> {
        answer(self.set_state(request).await)
    }
    async fn create_named_location(
        &self,
        request: Request<pb::CreateNamedLocationRequest>,
    ) -> Result<Response<pb::NamedLocation>, Status> {
        answer(self.create_location(request).await)
    }
    async fn list_named_locations(
        &self,
        request: Request<pb::ListNamedLocationsRequest>,
    ) -> Result<Response<pb::ListNamedLocationsResponse>, Status> {
        answer(self.list_locations(request).await)
    }
    async fn create_group(
        &self,
        request: Request<pb::CreateGroupRequest>,
    ) -> Result<Response<pb::Group>, Status> {
        answer(PolicyApi::create_group(self, request).await)
    }
    async fn add_group_member(
        &self,
        request: Request<pb::GroupMemberRequest>,
    ) -> Result<Response<pb::Group>, Status> {
        answer(self.member(request, true).await)
    }
    async fn remove_group_member(
        &self,
        request: Request<pb::GroupMemberRequest>,
    ) -> Result<Response<pb::Group>, Status> {
        answer(self.member(request, false).await)
    }
    async fn list_groups(
        &self,
        request: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        answer(PolicyApi::list_groups(self, request).await)
    }
    async fn what_if(
        &self,
        request: Request<pb::WhatIfRequest>,
    ) -> Result<Response<pb::WhatIfResponse>, Status> {
        answer(PolicyApi::what_if(self, request).await)
    }
    async fn backtest(
        &self,
        request: Request<pb::BacktestRequest>,
    ) -> Result<Response<pb::BacktestResponse>, Status> {
        answer(PolicyApi::backtest(self, request).await)
    }
}
