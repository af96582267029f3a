//! The one mapping from domain errors to gRPC statuses.
//!
//! Handlers return `Result<_, ApiError>`; services convert their domain errors into
//! [`ApiError`] with `From`, and only [`ApiError::into_status`] builds a `tonic::Status`:
//! code, human message and `google.rpc.BadRequest` field violations.

use gatehouse_events::StoreError;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// One bad field of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// Field path, e.g. `display_name`.
    pub field: String,
    /// What is wrong with it.
    pub description: String,
}

impl FieldViolation {
    /// A violation of `field`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        FieldViolation {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// Every error a Gatehouse RPC can answer with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Bad input; nothing was written.
    #[error("invalid request")]
    InvalidArgument(Vec<FieldViolation>),
    /// No bearer key, or one Gatehouse does not know.
    #[error("a valid API key is required")]
    Unauthenticated,
    /// The key is valid but may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// The resource does not exist (or the caller may not know that it does).
    #[error("{0} not found")]
    NotFound(String),
    /// The resource already exists.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request conflicts with the resource's current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A sign-in credential was refused (wrong password or code, unknown account: one answer).
    #[error("{0}")]
    CredentialRefused(String),
    /// Too many attempts; try later.
    #[error("{0}")]
    TooManyAttempts(String),
    /// A peer Gatehouse depends on (an identity provider) could not be reached, or Gatehouse is
    /// too busy for the request now; the caller may retry.
    #[error("{0}")]
    Unavailable(String),
    /// Lost a race too many times; the caller may retry.
    #[error("the resource changed concurrently; retry")]
    Aborted,
    /// Something failed inside Gatehouse; details are logged, not returned.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// A single bad field.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        ApiError::InvalidArgument(vec![FieldViolation::new(field, description)])
    }

    /// The status sent to the caller.
    pub fn into_status(self) -> Status {
        match self {
            ApiError::InvalidArgument(violations) => {
                let summary = violations
                    .iter()
                    .map(|v| format!("{}: {}", v.field, v.description))
                    .collect::<Vec<_>>()
                    .join("; ");
                let mut details = ErrorDetails::new();
                for v in &violations {
                    details.add_bad_request_violation(v.field.clone(), v.description.clone());
                }
                Status::with_error_details(
                    Code::InvalidArgument,
                    format!("invalid request: {summary}"),
                    details,
                )
            }
            ApiError::Unauthenticated => Status::unauthenticated("a valid API key is required"),
            ApiError::PermissionDenied(message) => Status::permission_denied(message),
            ApiError::NotFound(what) => Status::not_found(format!("{what} not found")),
            ApiError::AlreadyExists(message) => Status::already_exists(message),
            ApiError::Unavailable(message) => Status::unavailable(message),
            ApiError::FailedPrecondition(message) => Status::failed_precondition(message),
            ApiError::CredentialRefused(message) => Status::unauthenticated(message),
            ApiError::TooManyAttempts(message) => Status::resource_exhausted(message),
            ApiError::Aborted => Status::aborted("the resource changed concurrently; retry"),
            ApiError::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                Status::internal("internal error")
            }
        }
    }
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Self {
        error.into_status()
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Conflict { .. } => ApiError::Aborted,
            StoreError::ClaimTaken { scope } => {
                ApiError::AlreadyExists(format!("this {scope} is already taken"))
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<crate::crypto::CryptoError> for ApiError {
    fn from(error: crate::crypto::CryptoError) -> Self {
        match error {
            crate::crypto::CryptoError::Store(store) => store.into(),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl gatehouse_events::retry::AsConflict for ApiError {
    fn is_conflict(&self) -> bool {
        matches!(self, ApiError::Aborted)
    }
}

/// Collects field violations while validating a request.
#[derive(Debug, Default)]
pub struct Validation {
    violations: Vec<FieldViolation>,
}

impl Validation {
    /// Starts a validation.
    pub fn new() -> Self {
        Validation::default()
    }

    /// Records a violation.
    pub fn add(&mut self, field: &str, description: impl Into<String>) {
        self.violations
            .push(FieldViolation::new(field, description));
    }

    /// Checks a required string's length in characters (after trimming).
    pub fn text(&mut self, field: &str, value: &str, min: usize, max: usize) {
        let length = value.trim().chars().count();
        if length < min {
            self.add(
                field,
                if min == 1 {
                    "is required".to_string()
                } else {
                    format!("needs at least {min} characters")
                },
            );
        } else if length > max {
            self.add(field, format!("must be at most {max} characters"));
        }
    }

    /// Ok when nothing was wrong.
    pub fn finish(self) -> Result<(), ApiError> {
        if self.violations.is_empty() {
            Ok(())
        } else {
            Err(ApiError::InvalidArgument(self.violations))
        }
    }
}
