//! Event metadata from a gRPC request: correlation id and client context.

use crate::net::{Cidr, to_u128};
use gatehouse_events::{Actor, ClientContext, Metadata};
use std::net::IpAddr;
use std::sync::OnceLock;
use tonic::Request;
use uuid::Uuid;

/// Header a caller may set to tie its requests together; a fresh id otherwise.
pub const CORRELATION_HEADER: &str = "x-correlation-id";
const MAX_USER_AGENT: usize = 512;

/// The correlation id of a request (the caller's when it is a valid UUID).
pub fn correlation_id<T>(request: &Request<T>) -> Uuid {
    request
        .metadata()
        .get(CORRELATION_HEADER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| Uuid::parse_str(value).ok())
        .unwrap_or_else(Uuid::now_v7)
}

static TRUSTED_PROXIES: OnceLock<Vec<Cidr>> = OnceLock::new();

/// The proxies (load balancers) in front of Gatehouse whose `X-Forwarded-For` is believed.
/// Set once at start; later calls are ignored.
pub fn trust_proxies(ranges: Vec<Cidr>) {
    let _ = TRUSTED_PROXIES.set(ranges);
}

/// The client's address: the peer, or — when the peer is a trusted proxy — the rightmost
/// `X-Forwarded-For` hop that is not a trusted proxy itself. Hops left of it were written
/// by the client and are never believed.
pub fn client_ip<T>(request: &Request<T>) -> Option<IpAddr> {
    let peer = request.remote_addr()?.ip();
    let trusted = TRUSTED_PROXIES.get().map_or(&[][..], Vec::as_slice);
    client_behind(
        peer,
        request
            .metadata()
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok()),
        trusted,
    )
}

fn client_behind<'a>(
    peer: IpAddr,
    forwarded: impl Iterator<Item = &'a str>,
    trusted: &[Cidr],
) -> Option<IpAddr> {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|range| range.contains(to_u128(ip)));
    if !is_trusted(peer) {
        return Some(peer);
    }
    let hops: Vec<&str> = forwarded.flat_map(|value| value.split(',')).collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) if is_trusted(ip) => client = ip,
            Ok(ip) => return Some(ip),
            // Garbage: believe nothing further left.
            Err(_) => break,
        }
    }
    Some(client)
}

/// The client context of a request: its address and user agent (truncated).
pub fn client_context<T>(request: &Request<T>) -> ClientContext {
    ClientContext {
        ip: client_ip(request).map(|ip| ip.to_string()),
        user_agent: request
            .metadata()
            .get("user-agent")
            .and_then(|value| value.to_str().ok())
            .map(|ua| ua.chars().take(MAX_USER_AGENT).collect()),
    }
}

/// The client context of an HTTP request (the hosted pages, the OpenID Connect endpoints):
/// the same proxy rules as gRPC's.
pub fn http_client_context<'a>(
    peer: Option<IpAddr>,
    forwarded: impl Iterator<Item = &'a str>,
    user_agent: Option<&str>,
) -> ClientContext {
    let trusted = TRUSTED_PROXIES.get().map_or(&[][..], Vec::as_slice);
    ClientContext {
        ip: peer
            .and_then(|peer| client_behind(peer, forwarded, trusted))
            .map(|ip| ip.to_string()),
        user_agent: user_agent.map(|ua| ua.chars().take(MAX_USER_AGENT).collect()),
    }
}

/// Metadata for the events a request causes.
pub fn metadata<T>(request: &Request<T>, actor: Actor) -> Metadata {
    Metadata {
        correlation_id: correlation_id(request),
        causation_id: None,
        actor,
        context: Some(client_context(request)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() -> Result<(), String> {
        let trusted = [Cidr::parse("10.0.0.0/8")?];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap_or(IpAddr::from([0u8; 4]));
        let behind =
            |peer: &str, header: &[&str]| client_behind(ip(peer), header.iter().copied(), &trusted);
        // An untrusted peer's header is ignored.
        assert_eq!(
            behind("203.0.113.9", &["198.51.100.1"]),
            Some(ip("203.0.113.9"))
        );
        // Through one trusted proxy: the hop it saw.
        assert_eq!(
            behind("10.0.0.2", &["198.51.100.1"]),
            Some(ip("198.51.100.1"))
        );
        // A client that forges a hop: only the rightmost untrusted one counts.
        assert_eq!(
            behind("10.0.0.2", &["6.6.6.6, 198.51.100.1, 10.0.0.3"]),
            Some(ip("198.51.100.1"))
        );
        assert_eq!(
            behind("10.0.0.2", &["6.6.6.6", "198.51.100.1"]),
            Some(ip("198.51.100.1"))
        );
        // Garbage stops the walk at the last trusted hop.
        assert_eq!(
            behind("10.0.0.2", &["198.51.100.1, nonsense"]),
            Some(ip("10.0.0.2"))
        );
        assert_eq!(behind("10.0.0.2", &[]), Some(ip("10.0.0.2")));
        Ok(())
    }
}
