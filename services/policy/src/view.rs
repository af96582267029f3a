//! Each tenant's policies, named locations and groups, compiled, in memory, following the
//! log (any process's writes arrive through the shared tail within milliseconds; the writer
//! waits for its own before answering, so a caller that changed a policy sees it enforced
//! on its next sign-in).

use crate::engine::PolicySet;
use crate::model::{
    Definition, Group, GroupEvent, LocationDefinition, LocationEvent, NamedLocation, Policy,
    PolicyEvent, PolicyState,
};
use chrono::{DateTime, Utc};
use gatehouse_events::view::LiveView;
use gatehouse_events::{
    Aggregate, DomainEvent, EventFilter, EventStore, Position, RecordedEvent, StoreError,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// A policy as listed.
#[derive(Debug, Clone)]
pub struct PolicyRow {
    /// What it says.
    pub definition: Definition,
    /// Its state.
    pub state: PolicyState,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last changed.
    pub updated_at: DateTime<Utc>,
}

/// A group as listed.
#[derive(Debug, Clone, Default)]
pub struct GroupRow {
    /// Name.
    pub name: String,
    /// Members.
    pub members: BTreeSet<Uuid>,
}

/// One tenant's Conditional Access configuration.
#[derive(Debug, Clone, Default)]
pub struct TenantPolicies {
    /// Policies by id (UUIDv7: creation order), deleted ones removed.
    pub policies: BTreeMap<Uuid, PolicyRow>,
    /// Named locations by id.
    pub locations: BTreeMap<Uuid, LocationDefinition>,
    /// Groups by id.
    pub groups: BTreeMap<Uuid, GroupRow>,
    /// The groups of each user, sorted.
    member_of: HashMap<Uuid, Vec<Uuid>>,
    /// The enabled and report-only policies, compiled.
    pub compiled: Arc<PolicySet>,
}

impl TenantPolicies {
    /// The groups `user` belongs to, sorted.
    pub fn groups_of(&self, user: Uuid) -> &[Uuid] {
        self.member_of.get(&user).map_or(&[], Vec::as_slice)
    }

    /// Locations by id, for compiling a draft.
    pub fn location_map(&self) -> HashMap<Uuid, LocationDefinition> {
        self.locations
            .iter()
            .map(|(id, l)| (*id, l.clone()))
            .collect()
    }

    fn recompile(&mut self) {
        let locations = self.location_map();
        self.compiled = Arc::new(PolicySet::compile(
            self.policies
                .iter()
                .map(|(id, row)| (*id, row.state, &row.definition)),
            &locations,
        ));
    }
}

type State = HashMap<Uuid, TenantPolicies>;

fn apply(state: &mut State, event: &RecordedEvent) {
    let tenant = state.entry(event.tenant_id).or_default();
    let id = event.stream.id;
    match event.stream.kind.as_str() {
        kind if kind == Policy::STREAM_TYPE => {
            let Ok(decoded) = PolicyEvent::decode(event) else {
                return;
            };
            match decoded {
                PolicyEvent::PolicyCreated { definition, state } => {
                    tenant.policies.insert(
                        id,
                        PolicyRow {
                            definition,
                            state,
                            created_at: event.recorded_at,
                            updated_at: event.recorded_at,
                        },
                    );
                }
                PolicyEvent::PolicyUpdated { definition } => {
                    if let Some(row) = tenant.policies.get_mut(&id) {
                        row.definition = definition;
                        row.updated_at = event.recorded_at;
                    }
                }
                PolicyEvent::PolicyStateChanged { state } => {
                    if let Some(row) = tenant.policies.get_mut(&id) {
                        row.state = state;
                        row.updated_at = event.recorded_at;
                    }
                }
                PolicyEvent::PolicyDeleted => {
                    tenant.policies.remove(&id);
                }
            }
            tenant.recompile();
        }
        kind if kind == NamedLocation::STREAM_TYPE => {
            let Ok(decoded) = LocationEvent::decode(event) else {
                return;
            };
            match decoded {
                LocationEvent::NamedLocationCreated { definition }
                | LocationEvent::NamedLocationUpdated { definition } => {
                    tenant.locations.insert(id, definition);
                }
                LocationEvent::NamedLocationDeleted => {
                    tenant.locations.remove(&id);
                }
            }
            tenant.recompile();
        }
        kind if kind == Group::STREAM_TYPE => {
            let Ok(decoded) = GroupEvent::decode(event) else {
                return;
            };
            match decoded {
                GroupEvent::GroupCreated { name } => {
                    tenant.groups.insert(
                        id,
                        GroupRow {
                            name,
                            members: BTreeSet::new(),
                        },
                    );
                }
                GroupEvent::MemberAdded { user_id } => {
                    if let Some(group) = tenant.groups.get_mut(&id) {
                        group.members.insert(user_id);
                        let groups = tenant.member_of.entry(user_id).or_default();
                        if let Err(at) = groups.binary_search(&id) {
                            groups.insert(at, id);
                        }
                    }
                }
                GroupEvent::MemberRemoved { user_id } => {
                    if let Some(group) = tenant.groups.get_mut(&id) {
                        group.members.remove(&user_id);
                    }
                    if let Some(groups) = tenant.member_of.get_mut(&user_id) {
                        groups.retain(|g| *g != id);
                    }
                }
            }
        }
        _ => {}
    }
}

/// Every tenant's Conditional Access configuration, kept current.
pub struct PolicyView {
    view: LiveView<State>,
}

impl PolicyView {
    /// Catches up with the log and follows it.
    pub async fn start(store: Arc<dyn EventStore>) -> Result<Self, StoreError> {
        let filter = EventFilter {
            stream_types: vec![
                Policy::STREAM_TYPE.into(),
                NamedLocation::STREAM_TYPE.into(),
                Group::STREAM_TYPE.into(),
            ],
            ..EventFilter::default()
        };
        let view = LiveView::start(store, filter, State::new(), apply).await?;
        Ok(PolicyView { view })
    }

    /// Reads one tenant's configuration (an empty one when it has none).
    pub fn read<R>(&self, tenant_id: Uuid, read: impl FnOnce(&TenantPolicies) -> R) -> R {
        self.view.read(|state| match state.get(&tenant_id) {
            Some(tenant) => read(tenant),
            None => read(&TenantPolicies::default()),
        })
    }

    /// The compiled policies of a tenant and the groups of a user (one short read lock).
    pub fn for_sign_in(&self, tenant_id: Uuid, user_id: Uuid) -> (Arc<PolicySet>, Vec<Uuid>) {
        self.read(tenant_id, |tenant| {
            (tenant.compiled.clone(), tenant.groups_of(user_id).to_vec())
        })
    }

    /// Waits until the view includes `position` (a write just made); false after 5 seconds.
    pub async fn wait_for(&self, position: Position) -> bool {
        self.view.wait_for(position, Duration::from_secs(5)).await
    }
}
