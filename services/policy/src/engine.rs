//! The evaluation engine: a pure function from (a tenant's compiled policies, a sign-in's
//! context) to a [`Decision`].
//!
//! Policies are compiled once per change ([`PolicySet::compile`]): id lists sorted for binary
//! search, named locations resolved into CIDR prefixes and country codes, risk levels,
//! platforms and controls turned into bit sets. [`PolicySet::evaluate_into`] then allocates
//! nothing: it fills a caller-owned [`Decision`] whose vector keeps its capacity.
//!
//! Rules (SPEC §5): a policy applies when its users, apps and every condition match; the first
//! condition that does not is reported. Disabled policies are skipped. Every applicable
//! enabled policy must be satisfied: controls are unioned, `block` wins, authentication
//! strengths intersect, the shortest sign-in frequency wins and a non-persistent session wins.
//! Report-only policies are evaluated and reported, never enforced. Controls already met
//! (`Context::satisfied`, e.g. a phone verified earlier) are not asked again; with the OR
//! operator, one met control satisfies the policy, otherwise the first in the fixed order
//! (MFA → phone → password change) is asked.

use crate::model::{
    Cidr, Control, Controls, Definition, LocationDefinition, Operator, Platform, PolicyState,
    PrimaryCondition, RiskLevel, platform_bit, platform_mask, risk_bit, risk_mask, to_u128,
};
use gatehouse_directory::tenant::MfaMethod;
use std::collections::HashMap;
use std::net::IpAddr;
use uuid::Uuid;

/// How the person proved who they are first, in a context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrimaryKind<'a> {
    /// Password.
    Password,
    /// Emailed code.
    EmailOtp,
    /// A federated provider: its id and kind (`federated:<provider>` names either).
    Federated {
        /// The provider's id.
        id: &'a str,
        /// Its kind (`google`, `facebook`, `apple`, `oidc`).
        kind: &'a str,
    },
}

/// What is known about a sign-in when policies are evaluated.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The user.
    pub user_id: Uuid,
    /// The groups the user belongs to, sorted.
    pub groups: &'a [Uuid],
    /// The app (by id).
    pub app_id: Uuid,
    /// Client IP.
    pub ip: Option<IpAddr>,
    /// Country of the IP (ISO alpha-2), when known.
    pub country: Option<[u8; 2]>,
    /// Platform from the user agent.
    pub platform: Platform,
    /// Sign-in risk.
    pub sign_in_risk: RiskLevel,
    /// User risk.
    pub user_risk: RiskLevel,
    /// Primary method.
    pub primary: PrimaryKind<'a>,
    /// Controls already met (a verified phone).
    pub satisfied: Controls,
}

/// The condition that kept a policy from applying.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Condition {
    /// The user is not included, or is excluded.
    Users,
    /// The app is not included, or is excluded.
    Applications,
    /// The location is not included, or is excluded.
    Locations,
    /// The platform is not listed.
    Platforms,
    /// The sign-in risk level is not listed.
    SignInRisk,
    /// The user risk level is not listed.
    UserRisk,
    /// The primary method is not listed.
    PrimaryMethod,
}

impl Condition {
    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Condition::Users => "users",
            Condition::Applications => "applications",
            Condition::Locations => "locations",
            Condition::Platforms => "platforms",
            Condition::SignInRisk => "sign_in_risk",
            Condition::UserRisk => "user_risk",
            Condition::PrimaryMethod => "primary_method",
        }
    }
}

/// One policy's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Did not apply: this condition did not match.
    NotApplied(Condition),
    /// Applies and blocks.
    Block,
    /// Applies; these controls are still required (empty: already satisfied).
    Grant(Controls),
}

/// A policy's result in a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyResult {
    /// The policy.
    pub policy: Uuid,
    /// Evaluated for the record only.
    pub report_only: bool,
    /// The result.
    pub outcome: Outcome,
}

/// What the enabled policies demand of one sign-in, and every policy's result.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    /// Every enabled and report-only policy, in the set's order.
    pub results: Vec<PolicyResult>,
    /// The first enabled policy that blocks.
    pub blocked_by: Option<Uuid>,
    /// Controls still required (ask in [`Control::ALL`] order).
    pub required: Controls,
    /// The second factors that count for MFA, as [`method_bit`]s (`u8::MAX`: any).
    pub mfa_methods: u8,
    /// Shortest sign-in frequency, seconds.
    pub sign_in_frequency: Option<u32>,
    /// Persistent browser session (false wins).
    pub persistent: Option<bool>,
}

impl Decision {
    /// The MFA methods that count, from `offered`.
    pub fn allows(&self, method: MfaMethod) -> bool {
        self.mfa_methods & method_bit(method) != 0
    }
}

/// A second factor's bit.
pub fn method_bit(method: MfaMethod) -> u8 {
    match method {
        MfaMethod::Totp => 1,
        MfaMethod::EmailOtp => 2,
        MfaMethod::SmsOtp => 4,
        MfaMethod::RecoveryCode => 8,
    }
}

/// CIDR ranges and countries of one or more named locations.
#[derive(Debug, Clone, Default)]
struct Place {
    ranges: Vec<Cidr>,
    countries: Vec<[u8; 2]>,
}

impl Place {
    fn add(&mut self, location: &LocationDefinition) {
        self.ranges
            .extend(location.ranges.iter().filter_map(|r| Cidr::parse(r).ok()));
        self.countries.extend(
            location
                .countries
                .iter()
                .filter_map(|c| <[u8; 2]>::try_from(c.as_bytes()).ok()),
        );
    }

    fn contains(&self, ip: Option<u128>, country: Option<[u8; 2]>) -> bool {
        ip.is_some_and(|ip| self.ranges.iter().any(|r| r.contains(ip)))
            || country.is_some_and(|c| self.countries.contains(&c))
    }
}

/// A policy ready for evaluation.
#[derive(Debug, Clone)]
struct Compiled {
    id: Uuid,
    report_only: bool,
    users_all: bool,
    include_users: Vec<Uuid>,
    include_groups: Vec<Uuid>,
    exclude_users: Vec<Uuid>,
    exclude_groups: Vec<Uuid>,
    apps_all: bool,
    include_apps: Vec<Uuid>,
    exclude_apps: Vec<Uuid>,
    location_any: bool,
    include_place: Place,
    include_trusted: bool,
    exclude_place: Place,
    exclude_trusted: bool,
    sign_in_risk: u8,
    user_risk: u8,
    platforms: u8,
    /// Bits: 1 password, 2 email code, 4 any federated; u8::MAX: any method.
    primary: u8,
    providers: Vec<String>,
    block: bool,
    operator: Operator,
    controls: Controls,
    strength: u8,
    frequency: Option<u32>,
    persistent: Option<bool>,
}

/// A tenant's policies, compiled.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    policies: Vec<Compiled>,
    trusted: Place,
}

fn sorted(ids: &[Uuid]) -> Vec<Uuid> {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    ids
}

fn has(sorted: &[Uuid], id: &Uuid) -> bool {
    sorted.binary_search(id).is_ok()
}

fn any_shared(sorted: &[Uuid], other: &[Uuid]) -> bool {
    other.iter().any(|id| has(sorted, id))
}

impl PolicySet {
    /// Compiles the enabled and report-only policies (disabled ones are left out), in the
    /// order given, against the tenant's named locations.
    pub fn compile<'a>(
        policies: impl IntoIterator<Item = (Uuid, PolicyState, &'a Definition)>,
        locations: &HashMap<Uuid, LocationDefinition>,
    ) -> PolicySet {
        let mut trusted = Place::default();
        for location in locations.values().filter(|l| l.trusted) {
            trusted.add(location);
        }
        let place = |ids: &[Uuid]| {
            let mut place = Place::default();
            for location in ids.iter().filter_map(|id| locations.get(id)) {
                place.add(location);
            }
            place
        };
        let compiled = policies
            .into_iter()
            .filter(|(_, state, _)| *state != PolicyState::Disabled)
            .map(|(id, state, d)| {
                let l = &d.conditions.locations;
                let location_any = l.any || (l.include.is_empty() && !l.include_trusted);
                let (primary, providers) = if d.conditions.primary_methods.is_empty() {
                    (u8::MAX, Vec::new())
                } else {
                    let mut bits = 0;
                    let mut providers = Vec::new();
                    for method in &d.conditions.primary_methods {
                        match method {
                            PrimaryCondition::Password => bits |= 1,
                            PrimaryCondition::EmailOtp => bits |= 2,
                            PrimaryCondition::Federated(None) => bits |= 4,
                            PrimaryCondition::Federated(Some(p)) => providers.push(p.clone()),
                        }
                    }
                    (bits, providers)
                };
                let strength = if d.grant.authentication_strength.is_empty() {
                    u8::MAX
                } else {
                    d.grant
                        .authentication_strength
                        .iter()
                        .fold(0, |bits, m| bits | method_bit(*m))
                };
                Compiled {
                    id,
                    report_only: state == PolicyState::ReportOnly,
                    users_all: d.users.all,
                    include_users: sorted(&d.users.include_users),
                    include_groups: sorted(&d.users.include_groups),
                    exclude_users: sorted(&d.users.exclude_users),
                    exclude_groups: sorted(&d.users.exclude_groups),
                    apps_all: d.apps.all,
                    include_apps: sorted(&d.apps.include),
                    exclude_apps: sorted(&d.apps.exclude),
                    location_any,
                    include_place: place(&l.include),
                    include_trusted: l.include_trusted,
                    exclude_place: place(&l.exclude),
                    exclude_trusted: l.exclude_trusted,
                    sign_in_risk: risk_mask(&d.conditions.sign_in_risk),
                    user_risk: risk_mask(&d.conditions.user_risk),
                    platforms: platform_mask(&d.conditions.platforms),
                    primary,
                    providers,
                    block: d.grant.block,
                    operator: d.grant.operator,
                    controls: Controls::of(&d.grant.controls),
                    strength,
                    frequency: d.session.sign_in_frequency_seconds,
                    persistent: d.session.persistent,
                }
            })
            .collect();
        PolicySet {
            policies: compiled,
            trusted,
        }
    }

    /// Policies evaluated (enabled and report-only).
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    /// No policy is evaluated.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// Evaluates every policy against `context`.
    pub fn evaluate(&self, context: &Context<'_>) -> Decision {
        let mut decision = Decision::default();
        self.evaluate_into(context, &mut decision);
        decision
    }

    /// Evaluates into `decision`, reusing its memory.
    pub fn evaluate_into(&self, context: &Context<'_>, decision: &mut Decision) {
        decision.results.clear();
        decision.blocked_by = None;
        decision.required = Controls::NONE;
        decision.mfa_methods = u8::MAX;
        decision.sign_in_frequency = None;
        decision.persistent = None;
        let ip = context.ip.map(to_u128);
        for policy in &self.policies {
            let outcome = match self.first_mismatch(policy, context, ip) {
                Some(condition) => Outcome::NotApplied(condition),
                None if policy.block => Outcome::Block,
                None => Outcome::Grant(required(policy, context.satisfied)),
            };
            decision.results.push(PolicyResult {
                policy: policy.id,
                report_only: policy.report_only,
                outcome,
            });
            if policy.report_only {
                continue;
            }
            match outcome {
                Outcome::NotApplied(_) => continue,
                Outcome::Block => {
                    decision.blocked_by.get_or_insert(policy.id);
                }
                Outcome::Grant(controls) => {
                    decision.required = decision.required.union(controls);
                    if controls.has(Control::Mfa) {
                        decision.mfa_methods &= policy.strength;
                    }
                }
            }
            if let Some(seconds) = policy.frequency {
                decision.sign_in_frequency = Some(
                    decision
                        .sign_in_frequency
                        .map_or(seconds, |s| s.min(seconds)),
                );
            }
            if let Some(persistent) = policy.persistent {
                decision.persistent = Some(decision.persistent.unwrap_or(true) && persistent);
            }
        }
    }

    fn first_mismatch(&self, p: &Compiled, c: &Context<'_>, ip: Option<u128>) -> Option<Condition> {
        let included = p.users_all
            || has(&p.include_users, &c.user_id)
            || any_shared(&p.include_groups, c.groups);
        let excluded = has(&p.exclude_users, &c.user_id) || any_shared(&p.exclude_groups, c.groups);
        if !included || excluded {
            return Some(Condition::Users);
        }
        if !(p.apps_all || has(&p.include_apps, &c.app_id)) || has(&p.exclude_apps, &c.app_id) {
            return Some(Condition::Applications);
        }
        let trusted = p.include_trusted || p.exclude_trusted;
        let in_trusted = trusted && self.trusted.contains(ip, c.country);
        let location_in = p.location_any
            || p.include_place.contains(ip, c.country)
            || (p.include_trusted && in_trusted);
        let location_out =
            p.exclude_place.contains(ip, c.country) || (p.exclude_trusted && in_trusted);
        if !location_in || location_out {
            return Some(Condition::Locations);
        }
        if p.platforms & platform_bit(c.platform) == 0 {
            return Some(Condition::Platforms);
        }
        if p.sign_in_risk & risk_bit(c.sign_in_risk) == 0 {
            return Some(Condition::SignInRisk);
        }
        if p.user_risk & risk_bit(c.user_risk) == 0 {
            return Some(Condition::UserRisk);
        }
        let primary = match c.primary {
            PrimaryKind::Password => p.primary & 1 != 0,
            PrimaryKind::EmailOtp => p.primary & 2 != 0,
            PrimaryKind::Federated { id, kind } => {
                p.primary & 4 != 0 || p.providers.iter().any(|x| x == id || x == kind)
            }
        };
        if !primary {
            return Some(Condition::PrimaryMethod);
        }
        None
    }
}

/// The controls a policy still asks for, given those already met.
fn required(policy: &Compiled, satisfied: Controls) -> Controls {
    match policy.operator {
        Operator::And => Controls(policy.controls.0 & !satisfied.0),
        Operator::Or => {
            if policy.controls.0 & satisfied.0 != 0 {
                Controls::NONE
            } else {
                Control::ALL
                    .into_iter()
                    .find(|c| policy.controls.has(*c))
                    .map_or(Controls::NONE, |c| Controls(c.bit()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AppAssignment, Grant, LocationCondition, SessionControls, UserAssignment};
    use proptest::prelude::*;

    fn mfa_for_all() -> Definition {
        Definition {
            name: "mfa".into(),
            users: UserAssignment {
                all: true,
                ..Default::default()
            },
            apps: AppAssignment {
                all: true,
                ..Default::default()
            },
            grant: Grant {
                controls: vec![Control::Mfa],
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn context(user: Uuid, app: Uuid) -> Context<'static> {
        Context {
            user_id: user,
            groups: &[],
            app_id: app,
            ip: Some(IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, 7))),
            country: Some(*b"FR"),
            platform: Platform::Windows,
            sign_in_risk: RiskLevel::None,
            user_risk: RiskLevel::None,
            primary: PrimaryKind::Password,
            satisfied: Controls::NONE,
        }
    }

    fn id(n: u8) -> Uuid {
        Uuid::from_bytes([n; 16])
    }

    #[test]
    fn block_wins_over_grant_and_report_only_is_not_enforced() {
        let grant = mfa_for_all();
        let mut block = mfa_for_all();
        block.grant = Grant {
            block: true,
            ..Default::default()
        };
        let locations = HashMap::new();
        let set = PolicySet::compile(
            [
                (id(1), PolicyState::Enabled, &grant),
                (id(2), PolicyState::ReportOnly, &block),
            ],
            &locations,
        );
        let decision = set.evaluate(&context(id(9), id(8)));
        assert_eq!(decision.blocked_by, None, "report-only never blocks");
        assert_eq!(decision.required, Controls::of(&[Control::Mfa]));
        assert_eq!(decision.results[1].outcome, Outcome::Block);
        assert!(decision.results[1].report_only);

        let set = PolicySet::compile(
            [
                (id(1), PolicyState::Enabled, &grant),
                (id(2), PolicyState::Enabled, &block),
            ],
            &locations,
        );
        assert_eq!(set.evaluate(&context(id(9), id(8))).blocked_by, Some(id(2)));
    }

    #[test]
    fn locations_include_exclude_and_trusted() {
        let mut office = LocationDefinition {
            name: "office".into(),
            ranges: vec!["198.51.100.0/24".into()],
            trusted: true,
            ..Default::default()
        };
        let banned = LocationDefinition {
            name: "banned".into(),
            countries: vec!["KP".into()],
            ..Default::default()
        };
        let mut locations = HashMap::from([(id(1), office.clone()), (id(2), banned)]);
        let mut policy = mfa_for_all();
        policy.conditions.locations = LocationCondition {
            any: true,
            exclude_trusted: true,
            ..Default::default()
        };
        let set = PolicySet::compile([(id(5), PolicyState::Enabled, &policy)], &locations);
        let at_office = context(id(9), id(8));
        assert_eq!(
            set.evaluate(&at_office).results[0].outcome,
            Outcome::NotApplied(Condition::Locations)
        );
        let mut elsewhere = at_office;
        elsewhere.ip = Some(IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, 1)));
        assert!(set.evaluate(&elsewhere).required.has(Control::Mfa));
        // The office stops being trusted: the exclusion no longer holds.
        office.trusted = false;
        locations.insert(id(1), office);
        let set = PolicySet::compile([(id(5), PolicyState::Enabled, &policy)], &locations);
        assert!(set.evaluate(&at_office).required.has(Control::Mfa));

        let mut block = mfa_for_all();
        block.grant = Grant {
            block: true,
            ..Default::default()
        };
        block.conditions.locations.include = vec![id(2)];
        let set = PolicySet::compile([(id(6), PolicyState::Enabled, &block)], &locations);
        let mut from_kp = at_office;
        from_kp.country = Some(*b"KP");
        assert_eq!(set.evaluate(&from_kp).blocked_by, Some(id(6)));
        assert_eq!(set.evaluate(&at_office).blocked_by, None);
        let mut unknown = at_office;
        unknown.country = None;
        unknown.ip = None;
        assert_eq!(set.evaluate(&unknown).blocked_by, None);
    }

    #[test]
    fn groups_operators_strength_and_session_controls() {
        let mut policy = mfa_for_all();
        policy.users = UserAssignment {
            include_groups: vec![id(7)],
            ..Default::default()
        };
        policy.grant = Grant {
            operator: Operator::Or,
            controls: vec![Control::PhoneVerified, Control::Mfa],
            authentication_strength: vec![MfaMethod::Totp],
            ..Default::default()
        };
        policy.session = SessionControls {
            sign_in_frequency_seconds: Some(3600),
            persistent: Some(false),
        };
        let mut other = mfa_for_all();
        other.session.sign_in_frequency_seconds = Some(7200);
        other.session.persistent = Some(true);
        let locations = HashMap::new();
        let set = PolicySet::compile(
            [
                (id(1), PolicyState::Enabled, &policy),
                (id(2), PolicyState::Enabled, &other),
            ],
            &locations,
        );
        let groups = [id(7)];
        let mut member = context(id(9), id(8));
        member.groups = &groups;
        let decision = set.evaluate(&member);
        assert_eq!(decision.required, Controls::of(&[Control::Mfa]));
        assert!(decision.allows(MfaMethod::Totp) && !decision.allows(MfaMethod::SmsOtp));
        assert_eq!(decision.sign_in_frequency, Some(3600));
        assert_eq!(decision.persistent, Some(false));
        // A verified phone meets the OR policy; the other still wants MFA, of any kind.
        member.satisfied = Controls::of(&[Control::PhoneVerified]);
        let decision = set.evaluate(&member);
        assert_eq!(decision.results[0].outcome, Outcome::Grant(Controls::NONE));
        assert!(decision.allows(MfaMethod::SmsOtp));
        // Not a member: the first policy does not apply, on users.
        let outsider = context(id(9), id(8));
        assert_eq!(
            set.evaluate(&outsider).results[0].outcome,
            Outcome::NotApplied(Condition::Users)
        );
    }

    #[test]
    fn conditions_are_reported_in_order() {
        let mut policy = mfa_for_all();
        policy.apps = AppAssignment {
            include: vec![id(8)],
            ..Default::default()
        };
        policy.conditions.platforms = vec![Platform::Android];
        policy.conditions.sign_in_risk = vec![RiskLevel::High];
        let set = PolicySet::compile([(id(1), PolicyState::Enabled, &policy)], &HashMap::new());
        let mut c = context(id(9), id(3));
        let first = |c: &Context| set.evaluate(c).results[0].outcome;
        assert_eq!(first(&c), Outcome::NotApplied(Condition::Applications));
        c.app_id = id(8);
        assert_eq!(first(&c), Outcome::NotApplied(Condition::Platforms));
        c.platform = Platform::Android;
        assert_eq!(first(&c), Outcome::NotApplied(Condition::SignInRisk));
        c.sign_in_risk = RiskLevel::High;
        assert_eq!(first(&c), Outcome::Grant(Controls::of(&[Control::Mfa])));
    }

    fn arb_definition() -> impl Strategy<Value = Definition> {
        let ids = prop::collection::vec((0u8..6).prop_map(id), 0..3);
        (
            any::<bool>(),
            ids.clone(),
            ids.clone(),
            any::<bool>(),
            ids.clone(),
            ids,
            any::<bool>(),
            prop::sample::subsequence(Control::ALL.to_vec(), 0..=3),
            prop::sample::subsequence(
                vec![RiskLevel::None, RiskLevel::Low, RiskLevel::High],
                0..=2,
            ),
            any::<bool>(),
        )
            .prop_map(
                |(all, inc, exc, apps_all, apps, groups, block, controls, risk, or)| Definition {
                    name: "p".into(),
                    users: UserAssignment {
                        all,
                        include_users: inc,
                        exclude_users: exc,
                        include_groups: groups,
                        ..Default::default()
                    },
                    apps: AppAssignment {
                        all: apps_all,
                        include: apps,
                        ..Default::default()
                    },
                    conditions: crate::model::Conditions {
                        sign_in_risk: risk,
                        ..Default::default()
                    },
                    grant: Grant {
                        block,
                        operator: if or { Operator::Or } else { Operator::And },
                        controls: if block { vec![] } else { controls },
                        ..Default::default()
                    },
                    session: SessionControls::default(),
                },
            )
    }

    fn arb_context() -> impl Strategy<Value = (u8, u8, u8, u8)> {
        (0u8..6, 0u8..6, 0u8..3, 0u8..6)
    }

    fn build<'a>((user, app, risk, group): (u8, u8, u8, u8), groups: &'a [Uuid; 1]) -> Context<'a> {
        let _ = group;
        let mut c = context(id(user), id(app));
        c.groups = groups;
        c.sign_in_risk = [RiskLevel::None, RiskLevel::Low, RiskLevel::High][risk as usize];
        c
    }

    proptest! {
        #[test]
        fn a_disabled_policy_never_changes_a_decision(
            policies in prop::collection::vec((arb_definition(), any::<bool>()), 0..6),
            extra in arb_definition(),
            at in 0usize..7,
            ctx in arb_context(),
        ) {
            let locations = HashMap::new();
            let states: Vec<(Uuid, PolicyState, &Definition)> = policies
                .iter()
                .enumerate()
                .map(|(i, (d, report))| {
                    let state = if *report { PolicyState::ReportOnly } else { PolicyState::Enabled };
                    (id(100 + i as u8), state, d)
                })
                .collect();
            let mut with = states.clone();
            with.insert(at.min(with.len()), (id(99), PolicyState::Disabled, &extra));
            let groups = [id(ctx.3)];
            let c = build(ctx, &groups);
            let before = PolicySet::compile(states, &locations).evaluate(&c);
            let after = PolicySet::compile(with, &locations).evaluate(&c);
            prop_assert_eq!(before, after);
        }

        #[test]
        fn a_user_excluded_from_every_policy_gets_no_control(
            policies in prop::collection::vec(arb_definition(), 0..6),
            ctx in arb_context(),
        ) {
            let locations = HashMap::new();
            let user = id(ctx.0);
            let excluded: Vec<Definition> = policies
                .into_iter()
                .map(|mut d| {
                    d.users.exclude_users.push(user);
                    d
                })
                .collect();
            let set = PolicySet::compile(
                excluded.iter().enumerate().map(|(i, d)| (id(100 + i as u8), PolicyState::Enabled, d)),
                &locations,
            );
            let groups = [id(ctx.3)];
            let decision = set.evaluate(&build(ctx, &groups));
            prop_assert!(decision.required.is_empty());
            prop_assert_eq!(decision.blocked_by, None);
            prop_assert!(decision
                .results
                .iter()
                .all(|r| r.outcome == Outcome::NotApplied(Condition::Users)));
        }

        #[test]
        fn report_only_policies_never_change_what_is_enforced(
            policies in prop::collection::vec(arb_definition(), 0..6),
            shadow in prop::collection::vec(arb_definition(), 0..4),
            ctx in arb_context(),
        ) {
            let locations = HashMap::new();
            let enforced: Vec<_> = policies
                .iter()
                .enumerate()
                .map(|(i, d)| (id(100 + i as u8), PolicyState::Enabled, d))
                .collect();
            let mut mixed = enforced.clone();
            mixed.extend(shadow.iter().enumerate().map(|(i, d)| (id(50 + i as u8), PolicyState::ReportOnly, d)));
            let groups = [id(ctx.3)];
            let c = build(ctx, &groups);
            let a = PolicySet::compile(enforced, &locations).evaluate(&c);
            let b = PolicySet::compile(mixed, &locations).evaluate(&c);
            prop_assert_eq!(a.blocked_by, b.blocked_by);
            prop_assert_eq!(a.required, b.required);
            prop_assert_eq!(a.mfa_methods, b.mfa_methods);
        }

        #[test]
        fn any_applicable_enabled_block_blocks(
            policies in prop::collection::vec(arb_definition(), 1..6),
            ctx in arb_context(),
        ) {
            let locations = HashMap::new();
            let set = PolicySet::compile(
                policies.iter().enumerate().map(|(i, d)| (id(100 + i as u8), PolicyState::Enabled, d)),
                &locations,
            );
            let groups = [id(ctx.3)];
            let decision = set.evaluate(&build(ctx, &groups));
            let first_block = decision.results.iter().find(|r| r.outcome == Outcome::Block).map(|r| r.policy);
            prop_assert_eq!(decision.blocked_by, first_block);
        }
    }
}
