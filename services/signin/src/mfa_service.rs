//! `gatehouse.v1.MfaService`: enrolling and removing a user's second factors.

use crate::directory::Directory;
use crate::engine::available_methods;
use crate::otp;
use chrono::Utc;
use gatehouse_core::crypto::Crypto;
use gatehouse_core::keys::Caller;
use gatehouse_core::{ApiError, request};
use gatehouse_directory::tenant::MfaMethod;
use gatehouse_directory::tenant_service::parse_id;
use gatehouse_directory::tenant_service::{mfa_from_proto, mfa_to_proto};
use gatehouse_directory::user::{User, UserEvent};
use gatehouse_events::{EventStore, Loaded, Metadata, execute};
use gatehouse_proto::v1 as pb;
use std::sync::Arc;
use tonic::{Request, Response, Status};
use uuid::Uuid;

const RECOVERY: &str = "recovery_code";
const MAX_ISSUER: usize = 64;

/// The MfaService implementation.
pub struct MfaApi {
    store: Arc<dyn EventStore>,
    crypto: Arc<Crypto>,
    directory: Arc<Directory>,
}

impl MfaApi {
    /// Serves MFA enrolment.
    pub fn new(store: Arc<dyn EventStore>, crypto: Arc<Crypto>, directory: Arc<Directory>) -> Self {
        MfaApi {
            store,
            crypto,
            directory,
        }
    }

    /// Authorises the caller for the user's tenant and loads the user.
    async fn user<T>(
        &self,
        request: &Request<T>,
        tenant_id: &str,
        user_id: &str,
    ) -> Result<(Uuid, Loaded<User>, Metadata), ApiError> {
        let caller = Caller::of(request)?;
        let tenant_id = parse_id("tenant_id", tenant_id)?;
        let user_id = parse_id("user_id", user_id)?;
        caller.require_tenant(tenant_id, "user")?;
        let user = Loaded::<User>::load(self.store.as_ref(), user_id).await?;
        if !user.state.exists() || user.state.tenant_id != Some(tenant_id) {
            return Err(ApiError::NotFound("user".into()));
        }
        Ok((tenant_id, user, request::metadata(request, caller.actor())))
    }

    async fn describe(
        &self,
        tenant_id: Uuid,
        user: &User,
    ) -> Result<pb::ListMfaMethodsResponse, ApiError> {
        let settings = self
            .directory
            .tenant(tenant_id)
            .await?
            .ok_or_else(|| ApiError::NotFound("tenant".into()))?;
        Ok(pb::ListMfaMethodsResponse {
            methods: available_methods(user, &settings, None)
                .into_iter()
                .map(mfa_to_proto)
                .collect(),
            totp_enrolled: user.mfa.totp_secret.is_some(),
            totp_pending: user.mfa.pending_totp_secret.is_some(),
            recovery_codes_left: user.mfa.recovery_codes_left() as u32,
            phone_verified: user.phone_verified,
            email_verified: user.email_verified,
        })
    }

    async fn run(
        &self,
        tenant_id: Uuid,
        user_id: Uuid,
        metadata: &Metadata,
        decide: impl Fn(&User) -> Result<Vec<UserEvent>, ApiError>,
    ) -> Result<User, ApiError> {
        let executed = execute::<User, ApiError, _>(
            self.store.as_ref(),
            tenant_id,
            user_id,
            metadata,
            |user| {
                if !user.exists() {
                    return Err(ApiError::NotFound("user".into()));
                }
                decide(user)
            },
        )
        .await?;
        Ok(executed.state)
    }
}

fn answer<T>(result: Result<T, ApiError>) -> Result<Response<T>, Status> {
    result.map(Response::new).map_err(Status::from)
}

#[tonic::async_trait]
impl pb::mfa_service_server::MfaService for MfaApi {
    async fn start_totp_enrollment(
        &self,
        request: Request<pb::StartTotpEnrollmentRequest>,
    ) -> Result<Response<pb::StartTotpEnrollmentResponse>, Status> {
        answer(
            async {
                let m = request.get_ref();
                let issuer = match m.issuer.trim() {
                    "" => otp::DEFAULT_ISSUER.to_string(),
                    issuer if issuer.chars().count() <= MAX_ISSUER => issuer.to_string(),
                    _ => {
                        return Err(ApiError::invalid(
                            "issuer",
                            format!("must be at most {MAX_ISSUER} characters"),
                        ));
                    }
                };
                let (tenant_id, user, metadata) =
                    self.user(&request, &m.tenant_id, &m.user_id).await?;
                let user_id = user.stream.id;
                let email = user
                    .state
                    .email(&self.crypto, user_id)
                    .await?
                    .unwrap_or_else(|| user_id.to_string());
                let secret = otp::new_secret();
                let sealed = self.crypto.seal(tenant_id, user_id, &secret).await?;
                let (uri, png) = otp::enrollment(&secret, &issuer, &email)?;
                self.run(tenant_id, user_id, &metadata, |_| {
                    Ok(vec![UserEvent::TotpEnrollmentStarted {
                        secret: sealed.clone(),
                    }])
                })
                .await?;
                Ok(pb::StartTotpEnrollmentResponse {
                    secret,
                    otpauth_uri: uri,
                    qr_png: png,
                })
            }
            .await,
        )
    }

    async fn confirm_totp_enrollment(
        &self,
        request: Request<pb::ConfirmTotpEnrollmentRequest>,
    ) -> Result<Response<pb::ListMfaMethodsResponse>, Status> {
        answer(
            async {
                let m = request.get_ref();
                let (tenant_id, user, metadata) =
                    self.user(&request, &m.tenant_id, &m.user_id).await?;
                let user_id = user.stream.id;
                let Some(sealed) = &user.state.mfa.pending_totp_secret else {
                    return Err(ApiError::FailedPrecondition(
                        "no TOTP enrolment is pending; start one first".into(),
                    ));
                };
                let secret: String = self
                    .crypto
                    .open(user_id, sealed)
                    .await?
                    .ok_or_else(|| ApiError::NotFound("user".into()))?;
                let now = Utc::now().timestamp().max(0) as u64;
                let code = m.code.clone();
                let state = self
                    .run(tenant_id, user_id, &metadata, |user| {
                        if user.mfa.pending_totp_secret.as_ref() != Some(sealed) {
                            return Err(ApiError::Aborted);
                        }
                        match otp::accept(&secret, &code, now, user.mfa.totp_last_step) {
                            Some(step) => Ok(vec![UserEvent::TotpEnrolled { step }]),
                            None => Err(ApiError::invalid("code", "is invalid or has expired")),
                        }
                    })
                    .await?;
                self.describe(tenant_id, &state).await
            }
            .await,
        )
    }

    async fn remove_mfa_method(
        &self,
        request: Request<pb::RemoveMfaMethodRequest>,
    ) -> Result<Response<pb::ListMfaMethodsResponse>, Status> {
        answer(
            async {
                let m = request.get_ref();
                let method = match mfa_from_proto(m.method) {
                    Some(MfaMethod::Totp) => "totp",
                    Some(MfaMethod::RecoveryCode) => "recovery_code",
                    Some(MfaMethod::SmsOtp) => "sms_otp",
                    Some(MfaMethod::EmailOtp) => {
                        return Err(ApiError::invalid(
                            "method",
                            "email codes go with the email address and cannot be removed",
                        ));
                    }
                    None => return Err(ApiError::invalid("method", "is required")),
                };
                let (tenant_id, user, metadata) =
                    self.user(&request, &m.tenant_id, &m.user_id).await?;
                let state = self
                    .run(tenant_id, user.stream.id, &metadata, |user| {
                        let present = match method {
                            "totp" => {
                                user.mfa.totp_secret.is_some()
                                    || user.mfa.pending_totp_secret.is_some()
                            }
                            "recovery_code" => !user.mfa.recovery_codes.is_empty(),
                            _ => user.phone.is_some(),
                        };
                        if !present {
                            return Err(ApiError::NotFound("method".into()));
                        }
                        Ok(vec![UserEvent::MfaMethodRemoved {
                            method: method.into(),
                        }])
                    })
                    .await?;
                self.describe(tenant_id, &state).await
            }
            .await,
        )
    }

    async fn list_mfa_methods(
        &self,
        request: Request<pb::MfaUserRef>,
    ) -> Result<Response<pb::ListMfaMethodsResponse>, Status> {
        answer(
            async {
                let m = request.get_ref();
                let (tenant_id, user, _) = self.user(&request, &m.tenant_id, &m.user_id).await?;
                self.describe(tenant_id, &user.state).await
            }
            .await,
        )
    }

    async fn regenerate_recovery_codes(
        &self,
        request: Request<pb::MfaUserRef>,
    ) -> Result<Response<pb::RegenerateRecoveryCodesResponse>, Status> {
        answer(
            async {
                let m = request.get_ref();
                let (tenant_id, user, metadata) =
                    self.user(&request, &m.tenant_id, &m.user_id).await?;
                let user_id = user.stream.id;
                let codes = otp::new_recovery_codes();
                let digests: Vec<String> = codes
                    .iter()
                    .map(|c| {
                        self.crypto
                            .code_digest(user_id, RECOVERY, &otp::normalize_recovery_code(c))
                    })
                    .collect();
                self.run(tenant_id, user_id, &metadata, |_| {
                    Ok(vec![UserEvent::RecoveryCodesGenerated {
                        digests: digests.clone(),
                    }])
                })
                .await?;
                Ok(pb::RegenerateRecoveryCodesResponse { codes })
            }
            .await,
        )
    }
}
