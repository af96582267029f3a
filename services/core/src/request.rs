//! Event metadata from a gRPC request: correlation id and client context.

use gatehouse_events::{Actor, ClientContext, Metadata};
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

/// The client context of a request: the peer address and user agent (truncated).
pub fn client_context<T>(request: &Request<T>) -> ClientContext {
    ClientContext {
        ip: request.remote_addr().map(|addr| addr.ip().to_string()),
        user_agent: request
            .metadata()
            .get("user-agent")
            .and_then(|value| value.to_str().ok())
            .map(|ua| ua.chars().take(MAX_USER_AGENT).collect()),
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
