//! `gatehouse bench policy`: one sign-in evaluated against a tenant's 100 Conditional Access
//! policies (compiled once, as the live view does), over 1024 varied sign-in contexts.
//!
//! The policies mix what tenants write: per-app MFA, listed users and groups with
//! exclusions, country and CIDR blocks, trusted-location exclusions, platform and risk
//! conditions, report-only copies, sign-in frequency. Prints `us_per_eval` (target < 10 µs).

use crate::config::BenchArgs;
use gatehouse_directory::tenant::MfaMethod;
use gatehouse_policy::engine::{Context, Decision, PolicySet, PrimaryKind};
use gatehouse_policy::model::{
    AppAssignment, Conditions, Control, Controls, Definition, Grant, LocationCondition,
    LocationDefinition, Operator, Platform, PolicyState, RiskLevel, SessionControls,
    UserAssignment,
};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;
use uuid::Uuid;

const POLICIES: usize = 100;
const CONTEXTS: usize = 1024;

/// A small deterministic generator (the figures must not depend on a seed source).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

fn id(rng: &mut Rng) -> Uuid {
    Uuid::from_u64_pair(rng.next(), rng.next())
}

/// Runs the benchmark and returns its report.
pub fn run(args: &BenchArgs) -> Value {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let users: Vec<Uuid> = (0..5000).map(|_| id(&mut rng)).collect();
    let groups: Vec<Uuid> = (0..20).map(|_| id(&mut rng)).collect();
    let apps: Vec<Uuid> = (0..30).map(|_| id(&mut rng)).collect();
    let mut locations = HashMap::new();
    let mut location_ids = Vec::new();
    for n in 0..10u8 {
        let location = if n % 2 == 0 {
            LocationDefinition {
                name: format!("offices {n}"),
                ranges: (0..20u8)
                    .map(|k| format!("10.{n}.{k}.0/24"))
                    .chain((0..5u8).map(|k| format!("2001:db8:{n}:{k}::/64")))
                    .collect(),
                countries: vec![],
                trusted: n < 4,
            }
        } else {
            LocationDefinition {
                name: format!("countries {n}"),
                ranges: vec![],
                countries: ["KP", "IR", "SY", "CU", "RU", "BY"]
                    .iter()
                    .take(1 + n as usize % 6)
                    .map(|c| c.to_string())
                    .collect(),
                trusted: false,
            }
        };
        let location_id = id(&mut rng);
        locations.insert(location_id, location);
        location_ids.push(location_id);
    }
    let mut definitions = Vec::new();
    for n in 0..POLICIES {
        let mut d = Definition {
            name: format!("policy {n}"),
            ..Definition::default()
        };
        d.users = match n % 4 {
            0 => UserAssignment {
                all: true,
                exclude_users: vec![users[0]],
                ..Default::default()
            },
            1 => UserAssignment {
                include_users: (0..50).map(|_| rng.pick(&users)).collect(),
                ..Default::default()
            },
            2 => UserAssignment {
                include_groups: vec![rng.pick(&groups), rng.pick(&groups)],
                exclude_groups: vec![rng.pick(&groups)],
                ..Default::default()
            },
            _ => UserAssignment {
                all: true,
                exclude_groups: vec![rng.pick(&groups)],
                ..Default::default()
            },
        };
        d.apps = if n % 3 == 0 {
            AppAssignment {
                all: true,
                exclude: vec![rng.pick(&apps)],
                ..Default::default()
            }
        } else {
            AppAssignment {
                include: (0..3).map(|_| rng.pick(&apps)).collect(),
                ..Default::default()
            }
        };
        d.conditions = Conditions {
            sign_in_risk: if n % 5 == 0 {
                vec![RiskLevel::Medium, RiskLevel::High]
            } else {
                vec![]
            },
            user_risk: if n % 7 == 0 {
                vec![RiskLevel::High]
            } else {
                vec![]
            },
            locations: match n % 4 {
                0 => LocationCondition {
                    any: true,
                    exclude_trusted: true,
                    ..Default::default()
                },
                1 => LocationCondition {
                    include: vec![rng.pick(&location_ids), rng.pick(&location_ids)],
                    ..Default::default()
                },
                _ => LocationCondition::default(),
            },
            platforms: if n % 6 == 0 {
                vec![Platform::Android, Platform::Ios]
            } else {
                vec![]
            },
            primary_methods: vec![],
        };
        d.grant = if n % 10 == 1 {
            // Blocks are for places: a country list (odd locations are countries).
            d.conditions.locations = LocationCondition {
                include: vec![location_ids[1 + 2 * (n / 10 % 5)]],
                ..Default::default()
            };
            Grant {
                block: true,
                ..Default::default()
            }
        } else {
            Grant {
                block: false,
                operator: if n % 2 == 0 {
                    Operator::And
                } else {
                    Operator::Or
                },
                controls: if n % 8 == 0 {
                    vec![Control::Mfa, Control::PhoneVerified]
                } else {
                    vec![Control::Mfa]
                },
                authentication_strength: if n % 9 == 0 {
                    vec![MfaMethod::Totp]
                } else {
                    vec![]
                },
            }
        };
        d.session = SessionControls {
            sign_in_frequency_seconds: (n % 11 == 0).then_some(3600),
            persistent: None,
        };
        let state = if n % 5 == 4 {
            PolicyState::ReportOnly
        } else {
            PolicyState::Enabled
        };
        definitions.push((Uuid::from_u64_pair(0, n as u64), state, d));
    }
    let compile_start = Instant::now();
    let set = PolicySet::compile(
        definitions.iter().map(|(id, state, d)| (*id, *state, d)),
        &locations,
    );
    let compile_us = compile_start.elapsed().as_secs_f64() * 1e6;

    let platforms = [
        Platform::Windows,
        Platform::Macos,
        Platform::Android,
        Platform::Ios,
        Platform::Linux,
    ];
    let countries = [*b"FR", *b"US", *b"DE", *b"KP", *b"BR", *b"JP"];
    let risks = [
        RiskLevel::None,
        RiskLevel::None,
        RiskLevel::Low,
        RiskLevel::High,
    ];
    let memberships: Vec<Vec<Uuid>> = (0..CONTEXTS)
        .map(|_| {
            let mut g: Vec<Uuid> = (0..rng.below(3)).map(|_| rng.pick(&groups)).collect();
            g.sort_unstable();
            g.dedup();
            g
        })
        .collect();
    let contexts: Vec<Context> = (0..CONTEXTS)
        .map(|i| Context {
            user_id: rng.pick(&users),
            groups: &memberships[i],
            app_id: rng.pick(&apps),
            ip: Some(IpAddr::V4(Ipv4Addr::new(
                if i % 3 == 0 { 10 } else { 203 },
                rng.below(10) as u8,
                rng.below(30) as u8,
                7,
            ))),
            country: Some(rng.pick(&countries)),
            platform: rng.pick(&platforms),
            sign_in_risk: rng.pick(&risks),
            user_risk: rng.pick(&risks),
            primary: PrimaryKind::Password,
            satisfied: Controls::NONE,
        })
        .collect();

    let mut decision = Decision::default();
    // Warm up, and count what the policies decide (shows the mix is not trivial).
    let (mut blocked, mut challenged) = (0u32, 0u32);
    for context in &contexts {
        set.evaluate_into(context, &mut decision);
        blocked += u32::from(decision.blocked_by.is_some());
        challenged += u32::from(decision.blocked_by.is_none() && !decision.required.is_empty());
    }
    let budget = args.seconds.max(0.05);
    let start = Instant::now();
    let mut evaluations = 0u64;
    while start.elapsed().as_secs_f64() < budget {
        for context in &contexts {
            set.evaluate_into(black_box(context), &mut decision);
            black_box(&decision);
        }
        evaluations += CONTEXTS as u64;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let us_per_eval = elapsed * 1e6 / evaluations as f64;
    println!(
        "policy evaluation: {POLICIES} policies ({} report-only), {CONTEXTS} contexts: \
         {us_per_eval:.3} µs per sign-in ({evaluations} evaluations in {elapsed:.2} s; \
         compiled in {compile_us:.0} µs; {blocked} blocked, {challenged} challenged of {CONTEXTS})",
        definitions
            .iter()
            .filter(|(_, s, _)| *s == PolicyState::ReportOnly)
            .count()
    );
    json!({
        "benchmark": "policy",
        "policies": POLICIES,
        "contexts": CONTEXTS,
        "evaluations": evaluations,
        "us_per_eval": us_per_eval,
        "target_us_per_eval": 10.0,
        "compile_us": compile_us,
        "blocked": blocked,
        "challenged": challenged,
    })
}
