//! `gatehouse.v1.SignInService`: unauthenticated, scoped by tenant and app client id.

use crate::actor::Flows;
use crate::engine::{Command, Reply, Scope};
use crate::flow::{Outcome, Primary, Step};
use gatehouse_core::keys::Caller;
use gatehouse_core::{ApiError, request};
use gatehouse_directory::tenant_service::{mfa_from_proto, mfa_to_proto, parse_id, rfc3339};
use gatehouse_events::Actor;
use gatehouse_proto::v1 as pb;
use std::sync::Arc;
use tonic::{Request, Response, Status};
use uuid::Uuid;

/// The SignInService implementation.
pub struct SignInApi {
    flows: Arc<Flows>,
}

fn to_proto(reply: Reply) -> pb::SignIn {
    let flow = &reply.flow;
    let (status, reason, session_id) = match &flow.outcome {
        None => (pb::SignInStatus::InProgress, String::new(), String::new()),
        Some(Outcome::Completed(session)) => (
            pb::SignInStatus::Completed,
            String::new(),
            session.to_string(),
        ),
        Some(Outcome::Failed(reason)) => (
            if reason == "blocked_by_policy" {
                pb::SignInStatus::Blocked
            } else {
                pb::SignInStatus::Failed
            },
            reason_text(reason).into(),
            String::new(),
        ),
        Some(Outcome::Expired) => (pb::SignInStatus::Expired, String::new(), String::new()),
        Some(Outcome::Cancelled) => (pb::SignInStatus::Cancelled, String::new(), String::new()),
    };
    let step = match flow.step {
        Step::None => pb::SignInStep::Unspecified,
        Step::Password => pb::SignInStep::Password,
        Step::EmailCode => pb::SignInStep::EmailCode,
        Step::SelectMfaMethod => pb::SignInStep::SelectMfaMethod,
        Step::MfaCode => pb::SignInStep::MfaCode,
        Step::PhoneNumber => pb::SignInStep::PhoneNumber,
        Step::PhoneCode => pb::SignInStep::PhoneCode,
        Step::NewPassword => pb::SignInStep::NewPassword,
        Step::TotpRegistration => pb::SignInStep::TotpRegistration,
        Step::Federation => pb::SignInStep::Federation,
        Step::FederationCallback => pb::SignInStep::FederationCallback,
        Step::LinkAccount => pb::SignInStep::LinkAccount,
        Step::Done => pb::SignInStep::None,
    };
    let link_method = match flow.link.as_ref().map(|link| link.proof) {
        Some(Primary::Password) => pb::PrimaryMethod::Password,
        Some(Primary::EmailOtp) => pb::PrimaryMethod::EmailOtp,
        _ => pb::PrimaryMethod::Unspecified,
    };
    pb::SignIn {
        id: reply.id.to_string(),
        status: status as i32,
        next_step: step as i32,
        mfa_methods: flow.mfa_methods.iter().copied().map(mfa_to_proto).collect(),
        challenge_method: flow.selected.map(mfa_to_proto).unwrap_or_default(),
        expires_at: flow.expires_at.map(rfc3339).unwrap_or_default(),
        reason,
        session_id,
        tokens: reply.tokens.map(|t| pb::Tokens {
            access_token: t.access_token,
            id_token: t.id_token,
            refresh_token: t.refresh_token,
            token_type: "Bearer".into(),
            expires_in: t.expires_in,
        }),
        federation_error: flow.federation_error.clone().unwrap_or_default(),
        link_method: link_method as i32,
    }
}

/// A failed sign-in's reason, for people.
pub fn reason_text(reason: &str) -> &'static str {
    match reason {
        "too_many_wrong_codes" => "too many wrong codes",
        "account_disabled" => "the account is disabled",
        "email_not_verified" => "the email address is not verified yet",
        "no_second_factor" => "a second factor is required and none is available",
        "blocked_by_policy" => "an access policy of this organisation blocks this sign-in",
        "user_at_risk" => {
            "this account may be compromised and has no second factor to prove it is yours; \
             contact the organisation to restore access"
        }
        _ => "the sign-in failed",
    }
}

impl SignInApi {
    /// Serves flows through `flows`.
    pub fn new(flows: Arc<Flows>) -> Self {
        SignInApi { flows }
    }

    async fn run<T>(
        &self,
        request: &Request<T>,
        tenant_id: &str,
        client_id: &str,
        sign_in_id: Option<&str>,
        command: Command,
    ) -> Result<Reply, ApiError> {
        let tenant_id = parse_id("tenant_id", tenant_id)?;
        // A key, when sent, must be the tenant's (a backend calling on a customer's behalf).
        if let Some(caller) = request.extensions().get::<Caller>() {
            caller.require_tenant(tenant_id, "tenant")?;
        }
        if client_id.is_empty() || client_id.len() > 128 {
            return Err(ApiError::invalid("client_id", "is required"));
        }
        let id = match sign_in_id {
            Some(id) => parse_id("sign_in_id", id)?,
            None => Uuid::now_v7(),
        };
        let scope = Scope {
            tenant_id,
            client_id: Some(client_id.to_string()),
        };
        let metadata = request::metadata(request, Actor::Anonymous);
        self.flows.call(id, command, scope, metadata).await
    }
}

/// A request naming an existing flow.
trait FlowRequest {
    /// Tenant id, client id, flow id.
    fn flow(&self) -> (&str, &str, &str);
}

macro_rules! flow_request {
    ($($message:ty),*) => {$(
        impl FlowRequest for $message {
            fn flow(&self) -> (&str, &str, &str) {
                (&self.tenant_id, &self.client_id, &self.sign_in_id)
            }
        }
    )*};
}

flow_request!(
    pb::SubmitPasswordRequest,
    pb::SubmitCodeRequest,
    pb::SelectMfaMethodRequest,
    pb::SubmitPhoneVerificationRequest,
    pb::CompleteFederationRequest,
    pb::SignInRef
);

impl SignInApi {
    /// Runs the command a request on an existing flow asks for.
    async fn step<T: FlowRequest>(
        &self,
        request: Request<T>,
        command: impl FnOnce(&T) -> Result<Command, ApiError>,
    ) -> Result<Response<pb::SignIn>, Status> {
        let m = request.get_ref();
        let (tenant_id, client_id, sign_in_id) = m.flow();
        let result = match command(m) {
            Ok(command) => {
                self.run(&request, tenant_id, client_id, Some(sign_in_id), command)
                    .await
            }
            Err(error) => Err(error),
        };
        answer(result.map(to_proto))
    }
}

fn answer(result: Result<pb::SignIn, ApiError>) -> Result<Response<pb::SignIn>, Status> {
    result.map(Response::new).map_err(Status::from)
}

#[tonic::async_trait]
impl pb::sign_in_service_server::SignInService for SignInApi {
    async fn start_sign_in(
        &self,
        request: Request<pb::StartSignInRequest>,
    ) -> Result<Response<pb::SignIn>, Status> {
        let m = request.get_ref();
        let method = match pb::PrimaryMethod::try_from(m.method) {
            Ok(pb::PrimaryMethod::Unspecified | pb::PrimaryMethod::Password) => {
                Ok(Primary::Password)
            }
            Ok(pb::PrimaryMethod::EmailOtp) => Ok(Primary::EmailOtp),
            Ok(pb::PrimaryMethod::Federated) => Ok(Primary::Federated),
            _ => Err(ApiError::invalid(
                "method",
                "must be PASSWORD, EMAIL_OTP or FEDERATED",
            )),
        };
        let command = method.map(|method| Command::Start {
            client_id: m.client_id.clone(),
            email: m.email.clone(),
            method,
        });
        answer(match command {
            Ok(command) => self
                .run(&request, &m.tenant_id, &m.client_id, None, command)
                .await
                .map(to_proto),
            Err(error) => Err(error),
        })
    }

    async fn start_federation(
        &self,
        request: Request<pb::StartFederationRequest>,
    ) -> Result<Response<pb::StartFederationResponse>, Status> {
        let m = request.get_ref();
        let command =
            parse_id("identity_provider_id", &m.identity_provider_id).map(|provider_id| {
                Command::StartFederation {
                    provider_id,
                    redirect_uri: m.redirect_uri.clone(),
                }
            });
        let reply = match command {
            Ok(command) => {
                self.run(
                    &request,
                    &m.tenant_id,
                    &m.client_id,
                    Some(&m.sign_in_id),
                    command,
                )
                .await
            }
            Err(error) => Err(error),
        }?;
        Ok(Response::new(pb::StartFederationResponse {
            authorization_url: reply.authorization_url.clone().unwrap_or_default(),
            sign_in: Some(to_proto(reply)),
        }))
    }

    async fn complete_federation(
        &self,
        request: Request<pb::CompleteFederationRequest>,
    ) -> Result<Response<pb::SignIn>, Status> {
        self.step(request, |m| {
            Ok(Command::CompleteFederation(m.callback_query.clone()))
        })
        .await
    }

    async fn submit_password(
        &self,
        request: Request<pb::SubmitPasswordRequest>,
    ) -> Result<Response<pb::SignIn>, Status> {
        self.step(request, |m| Ok(Command::Password(m.password.clone())))
            .await
    }

    async fn submit_email_code(
        &self,
        request: Request<pb::SubmitCodeRequest>,
    ) -> Result<Response<pb::SignIn>, Status> {
        self.step(request, |m| Ok(Command::EmailCode(m.code.clone())))
            .await
    }

    async fn select_mfa_method(
        &self,
        request: Request<pb::SelectMfaMethodRequest>,
    ) -> Result<Response<pb::SignIn>, Status> {
        self.step(request, |m| {
            mfa_from_proto(m.method)
                .map(Command::SelectMfa)
                .ok_or_else(|| ApiError::invalid("method", "is required"))
        })
        .await
    }

    async fn submit_mfa_code(
        &self,
        request: Request<pb::SubmitCodeRequest>,
    ) -> Result<Response<pb::SignIn>, Status> {
        self.step(request, |m| Ok(Command::MfaCode(m.code.clone())))
            .await
    }

    async fn submit_phone_verification(
        &self,
        request: Request<pb::SubmitPhoneVerificationRequest>,
    ) -> Result<Response<pb::SignIn>, Status> {
        self.step(request, |m| match (m.phone.is_empty(), m.code.is_empty()) {
            (false, true) => Ok(Command::PhoneNumber(m.phone.clone())),
            (true, false) => Ok(Command::PhoneCode(m.code.clone())),
            _ => Err(ApiError::invalid(
                "phone",
                "send either the phone or the code",
            )),
        })
        .await
    }

    async fn submit_new_password(
        &self,
        request: Request<pb::SubmitPasswordRequest>,
    ) -> Result<Response<pb::SignIn>, Status> {
        self.step(request, |m| Ok(Command::NewPassword(m.password.clone())))
            .await
    }

    async fn get_totp_registration(
        &self,
        request: Request<pb::SignInRef>,
    ) -> Result<Response<pb::TotpRegistration>, Status> {
        let m = request.get_ref();
        let reply = self
            .run(
                &request,
                &m.tenant_id,
                &m.client_id,
                Some(&m.sign_in_id),
                Command::TotpRegistration,
            )
            .await?;
        let totp = reply
            .totp
            .ok_or_else(|| Status::internal("no authenticator app to register"))?;
        Ok(Response::new(pb::TotpRegistration {
            secret: totp.secret,
            otpauth_uri: totp.otpauth_uri,
            qr_png: totp.qr_png,
        }))
    }

    async fn submit_totp_registration(
        &self,
        request: Request<pb::SubmitCodeRequest>,
    ) -> Result<Response<pb::SignIn>, Status> {
        self.step(request, |m| {
            Ok(Command::TotpRegistrationCode(m.code.clone()))
        })
        .await
    }

    async fn get_sign_in(
        &self,
        request: Request<pb::SignInRef>,
    ) -> Result<Response<pb::SignIn>, Status> {
        self.step(request, |_| Ok(Command::Get)).await
    }

    async fn cancel_sign_in(
        &self,
        request: Request<pb::SignInRef>,
    ) -> Result<Response<pb::SignIn>, Status> {
        self.step(request, |_| Ok(Command::Cancel)).await
    }
}
