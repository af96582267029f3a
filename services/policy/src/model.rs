//! The aggregates of Conditional Access: Policy, NamedLocation and Group.
//!
//! A policy is assignments (which users, which apps) + conditions (all must match) + grant
//! controls + session controls + a state. Every change is an event whose envelope names the
//! actor who made it; the definition is stored whole in each change, so the state of a policy
//! at any past position is one fold away (Backtest and audits rely on that).

use chrono::{DateTime, Utc};
use gatehouse_core::error::Validation;
pub use gatehouse_core::net::{Cidr, to_u128};
use gatehouse_directory::tenant::MfaMethod;
use gatehouse_events::{Aggregate, DomainEvent, RecordedEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Longest name of a policy, location or group.
pub const MAX_NAME: usize = 200;
/// Most ids in one assignment list.
pub const MAX_IDS: usize = 1000;
/// Most CIDR ranges in one named location.
pub const MAX_RANGES: usize = 2000;

/// Whether a policy is enforced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyState {
    /// Evaluated and enforced.
    Enabled,
    /// Not evaluated.
    #[default]
    Disabled,
    /// Evaluated and recorded, not enforced.
    ReportOnly,
}

/// A risk level (sign-in or user).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum RiskLevel {
    /// No risk found.
    #[default]
    None,
    /// Low.
    Low,
    /// Medium.
    Medium,
    /// High.
    High,
}

impl RiskLevel {
    /// Parses `none`, `low`, `medium`, `high`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "none" | "" => Some(RiskLevel::None),
            "low" => Some(RiskLevel::Low),
            "medium" => Some(RiskLevel::Medium),
            "high" => Some(RiskLevel::High),
            _ => None,
        }
    }

    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            RiskLevel::None => "none",
            RiskLevel::Low => "low",
            RiskLevel::Medium => "medium",
            RiskLevel::High => "high",
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// A client platform, as the user agent claims it (unverified, like every peer's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Platform {
    /// Android.
    Android,
    /// iOS and iPadOS.
    Ios,
    /// Windows.
    Windows,
    /// macOS.
    Macos,
    /// Linux (not Android).
    Linux,
    /// Anything else, or no user agent.
    #[default]
    Other,
}

impl Platform {
    /// The platform a user agent names. Order matters: Android agents say "Linux", iOS
    /// agents say "like Mac OS X".
    pub fn of_user_agent(agent: &str) -> Platform {
        let has = |needle: &str| agent.contains(needle);
        if has("Android") {
            Platform::Android
        } else if has("iPhone") || has("iPad") || has("iPod") || has("CPU OS") {
            Platform::Ios
        } else if has("Windows") {
            Platform::Windows
        } else if has("Macintosh") || has("Mac OS X") {
            Platform::Macos
        } else if has("Linux") || has("X11") || has("CrOS") {
            Platform::Linux
        } else {
            Platform::Other
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// How the person proved who they are first.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "provider")]
pub enum PrimaryCondition {
    /// Email and password.
    Password,
    /// A code sent by email.
    EmailOtp,
    /// A federated identity provider (any when `None`).
    Federated(Option<String>),
}

/// A grant control. The order of the variants is the order they are asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Control {
    /// A second factor.
    Mfa,
    /// A verified phone number.
    PhoneVerified,
    /// A new password.
    PasswordChange,
}

impl Control {
    /// Every control, in the order they are asked for.
    pub const ALL: [Control; 3] = [
        Control::Mfa,
        Control::PhoneVerified,
        Control::PasswordChange,
    ];

    /// Its bit in a [`Controls`] set.
    pub fn bit(self) -> u8 {
        1 << self as u8
    }

    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Control::Mfa => "mfa",
            Control::PhoneVerified => "phone_verified",
            Control::PasswordChange => "password_change",
        }
    }
}

/// A set of controls, as bits (no allocation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Controls(pub u8);

impl Controls {
    /// No control.
    pub const NONE: Controls = Controls(0);

    /// The set of `controls`.
    pub fn of(controls: &[Control]) -> Controls {
        Controls(controls.iter().fold(0, |bits, c| bits | c.bit()))
    }
    /// Contains `control`.
    pub fn has(self, control: Control) -> bool {
        self.0 & control.bit() != 0
    }
    /// Empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    /// Union.
    pub fn union(self, other: Controls) -> Controls {
        Controls(self.0 | other.0)
    }
    /// The members, in the order they are asked for.
    pub fn list(self) -> Vec<Control> {
        Control::ALL.into_iter().filter(|c| self.has(*c)).collect()
    }
}

/// Whether all or any of the listed controls must be met.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operator {
    /// Every control.
    #[default]
    And,
    /// One of them.
    Or,
}

/// Which users a policy is for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserAssignment {
    /// Every user of the tenant.
    pub all: bool,
    /// These users.
    pub include_users: Vec<Uuid>,
    /// Members of these groups.
    pub include_groups: Vec<Uuid>,
    /// Never these users (break-glass accounts).
    pub exclude_users: Vec<Uuid>,
    /// Never members of these groups.
    pub exclude_groups: Vec<Uuid>,
}

/// Which apps a policy is for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppAssignment {
    /// Every app of the tenant.
    pub all: bool,
    /// These apps (by id).
    pub include: Vec<Uuid>,
    /// Never these.
    pub exclude: Vec<Uuid>,
}

/// Where the sign-in comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocationCondition {
    /// Any location, known or not (the default when nothing is included).
    pub any: bool,
    /// Inside one of these named locations.
    pub include: Vec<Uuid>,
    /// Inside any trusted named location.
    pub include_trusted: bool,
    /// Not inside one of these.
    pub exclude: Vec<Uuid>,
    /// Not inside any trusted named location.
    pub exclude_trusted: bool,
}

/// Conditions: every one that is set must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conditions {
    /// Sign-in risk levels (empty: any).
    pub sign_in_risk: Vec<RiskLevel>,
    /// User risk levels (empty: any).
    pub user_risk: Vec<RiskLevel>,
    /// Locations.
    pub locations: LocationCondition,
    /// Client platforms (empty: any).
    pub platforms: Vec<Platform>,
    /// Primary methods (empty: any).
    pub primary_methods: Vec<PrimaryCondition>,
}

/// What an applicable policy demands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Refuse the sign-in.
    pub block: bool,
    /// All or any of `controls`.
    pub operator: Operator,
    /// The controls.
    pub controls: Vec<Control>,
    /// The second factors that count for `mfa` (empty: any the tenant offers).
    pub authentication_strength: Vec<MfaMethod>,
}

/// What an applicable policy sets on the session.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionControls {
    /// Sign in again after this many seconds (refresh is refused afterwards).
    pub sign_in_frequency_seconds: Option<u32>,
    /// Whether the browser session survives closing the browser.
    pub persistent: Option<bool>,
}

/// Everything a policy says.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Definition {
    /// Human name.
    pub name: String,
    /// Users.
    pub users: UserAssignment,
    /// Apps.
    pub apps: AppAssignment,
    /// Conditions.
    pub conditions: Conditions,
    /// Grant controls.
    pub grant: Grant,
    /// Session controls.
    pub session: SessionControls,
}

/// Why a policy would never do anything, or would lock everyone out: accepted only with an
/// explicit acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// The field.
    pub field: &'static str,
    /// What is wrong.
    pub message: &'static str,
}

impl Definition {
    /// Records every rule the definition breaks (shape only: ids are checked against the
    /// directory by the service).
    pub fn validate(&self, validation: &mut Validation) {
        validation.text("name", &self.name, 1, MAX_NAME);
        let lists = [
            ("users.include_users", &self.users.include_users),
            ("users.include_groups", &self.users.include_groups),
            ("users.exclude_users", &self.users.exclude_users),
            ("users.exclude_groups", &self.users.exclude_groups),
            ("apps.include", &self.apps.include),
            ("apps.exclude", &self.apps.exclude),
            (
                "conditions.locations.include",
                &self.conditions.locations.include,
            ),
            (
                "conditions.locations.exclude",
                &self.conditions.locations.exclude,
            ),
        ];
        for (field, ids) in lists {
            if ids.len() > MAX_IDS {
                validation.add(field, format!("at most {MAX_IDS} ids"));
            }
        }
        let grant = &self.grant;
        if grant.block && !grant.controls.is_empty() {
            validation.add("grant", "block cannot be combined with other controls");
        }
        if !grant.block && grant.controls.is_empty() && self.session == SessionControls::default() {
            validation.add(
                "grant",
                "needs block, at least one control, or a session control",
            );
        }
        if grant.controls.contains(&Control::PasswordChange)
            && !(grant.controls.contains(&Control::Mfa) && grant.operator == Operator::And)
        {
            // Otherwise whoever stole the password would be the one to choose the next.
            validation.add(
                "grant.controls",
                "password_change needs mfa with the AND operator",
            );
        }
        if !grant.authentication_strength.is_empty() && !grant.controls.contains(&Control::Mfa) {
            validation.add(
                "grant.authentication_strength",
                "only applies to the mfa control",
            );
        }
        if let Some(seconds) = self.session.sign_in_frequency_seconds
            && !(1..=90 * 86_400).contains(&seconds)
        {
            validation.add(
                "session.sign_in_frequency_seconds",
                "must be between 1 second and 90 days",
            );
        }
    }

    /// What makes this definition suspicious (never applies; blocks everyone).
    pub fn warnings(&self) -> Vec<Warning> {
        let mut warnings = Vec::new();
        let users = &self.users;
        if !users.all && users.include_users.is_empty() && users.include_groups.is_empty() {
            warnings.push(Warning {
                field: "users",
                message: "includes no user, so the policy can never apply",
            });
        }
        if !users.all
            && !users.include_users.is_empty()
            && users.include_groups.is_empty()
            && users
                .include_users
                .iter()
                .all(|u| users.exclude_users.contains(u))
        {
            warnings.push(Warning {
                field: "users",
                message: "excludes every user it includes, so the policy can never apply",
            });
        }
        let apps = &self.apps;
        // An empty include list counts as "every included app excluded".
        if !apps.all && apps.include.iter().all(|a| apps.exclude.contains(a)) {
            warnings.push(Warning {
                field: "apps",
                message: "includes no app, so the policy can never apply",
            });
        }
        let locations = &self.conditions.locations;
        if !locations.include.is_empty()
            && locations
                .include
                .iter()
                .all(|l| locations.exclude.contains(l))
            && !locations.any
            && !locations.include_trusted
        {
            warnings.push(Warning {
                field: "conditions.locations",
                message: "excludes every location it includes, so the policy can never apply",
            });
        }
        // Every sign-in of every user: all users, all apps, no narrowing condition.
        let everywhere = Conditions {
            locations: LocationCondition {
                any: self.conditions.locations.any,
                ..LocationCondition::default()
            },
            ..Conditions::default()
        };
        if self.grant.block
            && users.all
            && users.exclude_users.is_empty()
            && users.exclude_groups.is_empty()
            && apps.all
            && apps.exclude.is_empty()
            && self.conditions == everywhere
        {
            warnings.push(Warning {
                field: "users.exclude_users",
                message: "blocks every user with no exclusion: keep a break-glass account out of it",
            });
        }
        warnings
    }
}

/// Events of a policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum PolicyEvent {
    /// Created.
    PolicyCreated {
        /// What it says.
        definition: Definition,
        /// Initial state.
        state: PolicyState,
    },
    /// Replaced.
    PolicyUpdated {
        /// What it says now.
        definition: Definition,
    },
    /// Enabled, disabled or report-only.
    PolicyStateChanged {
        /// The new state.
        state: PolicyState,
    },
    /// Gone.
    PolicyDeleted,
}

impl DomainEvent for PolicyEvent {}

/// A policy's state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Policy {
    /// Tenant.
    pub tenant_id: Option<Uuid>,
    /// What it says.
    pub definition: Definition,
    /// Whether it is enforced.
    pub state: PolicyState,
    /// Deleted.
    pub deleted: bool,
    /// When created.
    pub created_at: Option<DateTime<Utc>>,
    /// When last changed.
    pub updated_at: Option<DateTime<Utc>>,
}

impl Policy {
    /// Created and not deleted.
    pub fn exists(&self) -> bool {
        self.tenant_id.is_some() && !self.deleted
    }
}

impl Aggregate for Policy {
    const STREAM_TYPE: &'static str = "policy";
    type Event = PolicyEvent;

    fn apply(&mut self, event: PolicyEvent, envelope: &RecordedEvent) {
        self.updated_at = Some(envelope.recorded_at);
        match event {
            PolicyEvent::PolicyCreated { definition, state } => {
                self.tenant_id = Some(envelope.tenant_id);
                self.definition = definition;
                self.state = state;
                self.created_at = Some(envelope.recorded_at);
            }
            PolicyEvent::PolicyUpdated { definition } => self.definition = definition,
            PolicyEvent::PolicyStateChanged { state } => self.state = state,
            PolicyEvent::PolicyDeleted => self.deleted = true,
        }
    }
}

/// A named location: CIDR ranges or countries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocationDefinition {
    /// Human name.
    pub name: String,
    /// CIDR ranges (IPv4 and IPv6).
    pub ranges: Vec<String>,
    /// ISO 3166-1 alpha-2 country codes, upper case.
    pub countries: Vec<String>,
    /// Trusted (e.g. the office).
    pub trusted: bool,
}

impl LocationDefinition {
    /// Records every rule the location breaks.
    pub fn validate(&self, validation: &mut Validation) {
        validation.text("name", &self.name, 1, MAX_NAME);
        if self.ranges.is_empty() == self.countries.is_empty() {
            validation.add("ranges", "give CIDR ranges or countries (one of the two)");
        }
        if self.ranges.len() > MAX_RANGES {
            validation.add("ranges", format!("at most {MAX_RANGES}"));
        }
        for (i, range) in self.ranges.iter().enumerate() {
            if let Err(error) = Cidr::parse(range) {
                validation.add(&format!("ranges[{i}]"), error);
            }
        }
        for (i, country) in self.countries.iter().enumerate() {
            if country.len() != 2 || !country.bytes().all(|b| b.is_ascii_uppercase()) {
                validation.add(
                    &format!("countries[{i}]"),
                    "must be an ISO 3166-1 alpha-2 code such as FR",
                );
            }
        }
    }
}

/// Events of a named location.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum LocationEvent {
    /// Created.
    NamedLocationCreated {
        /// What it is.
        definition: LocationDefinition,
    },
    /// Replaced.
    NamedLocationUpdated {
        /// What it is now.
        definition: LocationDefinition,
    },
    /// Gone.
    NamedLocationDeleted,
}

impl DomainEvent for LocationEvent {}

/// A named location's state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NamedLocation {
    /// Tenant.
    pub tenant_id: Option<Uuid>,
    /// What it is.
    pub definition: LocationDefinition,
    /// Deleted.
    pub deleted: bool,
}

impl Aggregate for NamedLocation {
    const STREAM_TYPE: &'static str = "location";
    type Event = LocationEvent;

    fn apply(&mut self, event: LocationEvent, envelope: &RecordedEvent) {
        match event {
            LocationEvent::NamedLocationCreated { definition } => {
                self.tenant_id = Some(envelope.tenant_id);
                self.definition = definition;
            }
            LocationEvent::NamedLocationUpdated { definition } => self.definition = definition,
            LocationEvent::NamedLocationDeleted => self.deleted = true,
        }
    }
}

/// Events of a group of users.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum GroupEvent {
    /// Created.
    GroupCreated {
        /// Its name.
        name: String,
    },
    /// A user joined.
    MemberAdded {
        /// Who.
        user_id: Uuid,
    },
    /// A user left.
    MemberRemoved {
        /// Who.
        user_id: Uuid,
    },
}

impl DomainEvent for GroupEvent {}

/// A group's state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Group {
    /// Tenant.
    pub tenant_id: Option<Uuid>,
    /// Name.
    pub name: String,
    /// Members.
    pub members: std::collections::BTreeSet<Uuid>,
}

impl Aggregate for Group {
    const STREAM_TYPE: &'static str = "group";
    type Event = GroupEvent;

    fn apply(&mut self, event: GroupEvent, envelope: &RecordedEvent) {
        match event {
            GroupEvent::GroupCreated { name } => {
                self.tenant_id = Some(envelope.tenant_id);
                self.name = name;
            }
            GroupEvent::MemberAdded { user_id } => {
                self.members.insert(user_id);
            }
            GroupEvent::MemberRemoved { user_id } => {
                self.members.remove(&user_id);
            }
        }
    }
}

/// Risk levels as a bit set (empty list: every level).
pub(crate) fn risk_mask(levels: &[RiskLevel]) -> u8 {
    if levels.is_empty() {
        u8::MAX
    } else {
        levels.iter().fold(0, |bits, l| bits | l.bit())
    }
}

/// Platforms as a bit set (empty list: every platform).
pub(crate) fn platform_mask(platforms: &[Platform]) -> u8 {
    if platforms.is_empty() {
        u8::MAX
    } else {
        platforms.iter().fold(0, |bits, p| bits | p.bit())
    }
}

pub(crate) fn risk_bit(level: RiskLevel) -> u8 {
    level.bit()
}

pub(crate) fn platform_bit(platform: Platform) -> u8 {
    platform.bit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_come_from_the_user_agent() {
        let cases = [
            (
                "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36",
                Platform::Android,
            ),
            (
                "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X)",
                Platform::Ios,
            ),
            (
                "Mozilla/5.0 (Windows NT 10.0; Win64; x64)",
                Platform::Windows,
            ),
            (
                "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_0)",
                Platform::Macos,
            ),
            (
                "Mozilla/5.0 (X11; Linux x86_64) Firefox/130.0",
                Platform::Linux,
            ),
            ("grpc-python/1.66", Platform::Other),
        ];
        for (agent, platform) in cases {
            assert_eq!(Platform::of_user_agent(agent), platform, "{agent}");
        }
    }
}
