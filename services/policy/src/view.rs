//! Each tenant's policies, named locations and groups, compiled, in memory, following the
//! log (any process's writes arrive through the shared tail within milliseconds; the writer
//! waits for its own before answering, so a caller that changed a policy sees it enforced
//! on its next sign-in).

use crate::engine::PolicySet;
use crate::model::{Group, GroupEvent, LocationDefinition, NamedLocation, Policy};
use gatehouse_events::view::LiveView;
use gatehouse_events::{
    Aggregate, DomainEvent, EventFilter, EventStore, Position, RecordedEvent, StoreError,
};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// One tenant's Conditional Access configuration: the aggregates' own states, folded by
/// their own `apply`.
#[derive(Debug, Clone, Default)]
pub struct TenantPolicies {
    /// Policies by id (UUIDv7: creation order), deleted ones removed.
    pub policies: BTreeMap<Uuid, Policy>,
    /// Named locations by id, deleted ones removed.
    pub locations: BTreeMap<Uuid, NamedLocation>,
    /// Groups by id.
    pub groups: BTreeMap<Uuid, Group>,
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
            .map(|(id, l)| (*id, l.definition.clone()))
            .collect()
    }

    fn recompile(&mut self) {
        let locations = self.location_map();
        self.compiled = Arc::new(PolicySet::compile(
            self.policies
                .iter()
                .map(|(id, policy)| (*id, policy.state, &policy.definition)),
            &locations,
        ));
    }
}

type State = HashMap<Uuid, TenantPolicies>;

/// Folds `event` into the state of its stream in `map`; the decoded event, when it decodes.
fn fold<A: Aggregate>(map: &mut BTreeMap<Uuid, A>, event: &RecordedEvent) -> Option<A::Event>
where
    A::Event: Clone,
{
    let decoded = A::Event::decode(event).ok()?;
    map.entry(event.stream.id)
        .or_default()
        .apply(decoded.clone(), event);
    Some(decoded)
}

fn apply(state: &mut State, event: &RecordedEvent) {
    let tenant = state.entry(event.tenant_id).or_default();
    let id = event.stream.id;
    let changed_policies = match event.stream.kind.as_str() {
        kind if kind == Policy::STREAM_TYPE => fold(&mut tenant.policies, event).is_some(),
        kind if kind == NamedLocation::STREAM_TYPE => fold(&mut tenant.locations, event).is_some(),
        kind if kind == Group::STREAM_TYPE => {
            match fold(&mut tenant.groups, event) {
                Some(GroupEvent::MemberAdded { user_id }) => {
                    let groups = tenant.member_of.entry(user_id).or_default();
                    if let Err(at) = groups.binary_search(&id) {
                        groups.insert(at, id);
                    }
                }
                Some(GroupEvent::MemberRemoved { user_id }) => {
                    if let Some(groups) = tenant.member_of.get_mut(&user_id) {
                        groups.retain(|g| *g != id);
                    }
                }
                _ => {}
            }
            false
        }
        _ => false,
    };
    if changed_policies {
        tenant.policies.retain(|_, policy| policy.exists());
        tenant.locations.retain(|_, location| !location.deleted);
        tenant.recompile();
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
