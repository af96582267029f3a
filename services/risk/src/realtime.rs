//! The real-time checks of a sign-in, run by the flow before Conditional Access: is the client
//! IP an anonymiser (Tor exits, open proxies, VPN egress — `anonymous_ip`, medium) or known to
//! be malicious (`malicious_ip`, high)? The sign-in risk is the highest level found. The lists
//! are files the operator keeps current (reloaded on change).

use crate::iplist::IpList;
use gatehouse_core::geo::Location;
use gatehouse_policy::model::{Platform, RiskLevel};
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

/// Where a sign-in came from and with what: the properties whose novelty Identity Protection
/// judges (country, network operator, browser family, operating system) and the coordinates
/// atypical travel measures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Properties {
    /// Country, coordinates, ASN.
    #[serde(flatten)]
    pub location: Location,
    /// Browser family (`chrome`, `firefox`, `safari`, `edge`, `opera`, `other`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub browser: Option<String>,
    /// Operating system (`windows`, `macos`, `linux`, `android`, `ios`, `other`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
}

impl Properties {
    /// The properties of a client at `location` with `user_agent`.
    pub fn of(location: Location, user_agent: Option<&str>) -> Self {
        Properties {
            location,
            browser: user_agent.map(|agent| browser_family(agent).into()),
            os: user_agent.map(|agent| {
                match Platform::of_user_agent(agent) {
                    Platform::Android => "android",
                    Platform::Ios => "ios",
                    Platform::Windows => "windows",
                    Platform::Macos => "macos",
                    Platform::Linux => "linux",
                    Platform::Other => "other",
                }
                .into()
            }),
        }
    }
}

/// The browser family a user agent claims. Order matters: Edge and Opera agents also say
/// "Chrome", Chrome agents also say "Safari".
pub fn browser_family(agent: &str) -> &'static str {
    let has = |needle: &str| agent.contains(needle);
    if has("Edg/") || has("Edge/") {
        "edge"
    } else if has("OPR/") || has("Opera") {
        "opera"
    } else if has("Firefox/") || has("FxiOS/") {
        "firefox"
    } else if has("Chrome/") || has("Chromium/") || has("CriOS/") {
        "chrome"
    } else if has("Safari/") {
        "safari"
    } else {
        "other"
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn browser_families_are_told_apart() {
        let chrome = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0 Safari/537.36";
        let edge =
            "Mozilla/5.0 (Windows NT 10.0) AppleWebKit/537.36 Chrome/130.0 Safari/537.36 Edg/130.0";
        let safari = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_0) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.0 Safari/605.1.15";
        let firefox = "Mozilla/5.0 (X11; Linux x86_64; rv:131.0) Gecko/20100101 Firefox/131.0";
        assert_eq!(browser_family(chrome), "chrome");
        assert_eq!(browser_family(edge), "edge");
        assert_eq!(browser_family(safari), "safari");
        assert_eq!(browser_family(firefox), "firefox");
        assert_eq!(browser_family("grpc-python/1.66"), "other");
        let properties = Properties::of(Location::default(), Some(safari));
        assert_eq!(properties.os.as_deref(), Some("macos"));
    }
}
