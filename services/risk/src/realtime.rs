//! The real-time checks of a sign-in, run by the flow before Conditional Access: is the client
//! IP an anonymiser (Tor exits, open proxies, VPN egress — `anonymous_ip`, medium) or known to
//! be malicious (`malicious_ip`, high)? The sign-in risk is the highest level found. The lists
//! are files the operator keeps current (reloaded on change).

use crate::iplist::IpList;
use gatehouse_policy::model::RiskLevel;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

/// One detection, as recorded on the flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Detection {
    /// `anonymous_ip`, `malicious_ip`, or (added by the password step) `leaked_credentials`.
    pub kind: String,
    /// Its level.
    pub level: RiskLevel,
    /// What was seen.
    pub evidence: String,
}

/// The real-time checks and their lists.
#[derive(Default)]
pub struct RealtimeRisk {
    anonymous: Option<Arc<IpList>>,
    malicious: Option<Arc<IpList>>,
}

impl RealtimeRisk {
    /// No lists: every sign-in is of no risk.
    pub fn none() -> Self {
        RealtimeRisk::default()
    }

    /// Watches the configured lists (each optional).
    pub fn watch(anonymous: Option<&Path>, malicious: Option<&Path>) -> Result<Self, String> {
        Ok(RealtimeRisk {
            anonymous: anonymous.map(IpList::watch).transpose()?,
            malicious: malicious.map(IpList::watch).transpose()?,
        })
    }

    /// The detections for a sign-in from `ip`, and the sign-in risk level.
    pub fn assess(&self, ip: Option<IpAddr>) -> (RiskLevel, Vec<Detection>) {
        let mut detections = Vec::new();
        if let Some(ip) = ip {
            let checks = [
                (
                    &self.anonymous,
                    "anonymous_ip",
                    RiskLevel::Medium,
                    "an anonymiser",
                ),
                (
                    &self.malicious,
                    "malicious_ip",
                    RiskLevel::High,
                    "a known-malicious address",
                ),
            ];
            for (list, kind, level, what) in checks {
                if list.as_ref().is_some_and(|list| list.contains(ip)) {
                    detections.push(Detection {
                        kind: kind.into(),
                        level,
                        evidence: format!("{ip} is listed as {what}"),
                    });
                }
            }
        }
        let level = detections
            .iter()
            .map(|d| d.level)
            .max()
            .unwrap_or(RiskLevel::None);
        (level, detections)
    }
}
