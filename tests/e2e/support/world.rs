//! A tenant with a key and an app on a running server, and the sign-in calls tests make.

use super::{Error, Server, TestResult, python, req, tests_dir};
use gatehouse_proto::v1 as pb;
use pb::application_service_client::ApplicationServiceClient;
use pb::mfa_service_client::MfaServiceClient;
use pb::session_service_client::SessionServiceClient;
use pb::sign_in_service_client::SignInServiceClient;
use pb::tenant_service_client::TenantServiceClient;
use pb::user_service_client::UserServiceClient;
use std::process::Command;
use tonic::Code;
use tonic::transport::Channel;

pub const PASSWORD: &str = "correct horse battery staple";

/// Clients of one server, a tenant with a key and an app.
#[derive(Clone)]
pub struct World {
    pub channel: Channel,
    pub admin: String,
    pub key: String,
    pub tenant_id: String,
    pub client_id: String,
    /// The app's id (policies name apps by id).
    pub app_id: String,
    pub http: std::net::SocketAddr,
}

/// A channel whose connections come from `source` (any 127.0.0.0/8 address is this host, so
/// tests can sign in "from" different addresses without a proxy).
pub async fn connect_from(server: &Server, source: &str) -> Result<Channel, Error> {
    Ok(tonic::transport::Endpoint::from_shared(server.grpc_url())?
        .local_address(Some(source.parse()?))
        .connect()
        .await?)
}

pub async fn connect(server: &Server) -> Result<Channel, Error> {
    Ok(tonic::transport::Endpoint::from_shared(server.grpc_url())?
        .connect()
        .await?)
}

impl World {
    pub async fn new(server: &Server, admin: &str) -> Result<World, Error> {
        let channel = connect(server).await?;
        let mut tenants = TenantServiceClient::new(channel.clone());
        let tenant = tenants
            .create_tenant(req(
                pb::CreateTenantRequest {
                    display_name: "Contoso".into(),
                    settings: None,
                },
                admin,
            )?)
            .await?
            .into_inner();
        let mut settings = tenant.settings.clone().ok_or("no settings")?;
        settings.allowed_primary_methods = vec![
            pb::PrimaryMethod::Password as i32,
            pb::PrimaryMethod::EmailOtp as i32,
        ];
        settings.mfa_methods = vec![
            pb::MfaMethod::Totp as i32,
            pb::MfaMethod::EmailOtp as i32,
            pb::MfaMethod::SmsOtp as i32,
            pb::MfaMethod::RecoveryCode as i32,
        ];
        if let Some(lockout) = settings.lockout_policy.as_mut() {
            lockout.threshold = 5;
            lockout.first_lockout_seconds = 3;
        }
        tenants
            .update_tenant_settings(req(
                pb::UpdateTenantSettingsRequest {
                    tenant_id: tenant.id.clone(),
                    settings: Some(settings),
                },
                admin,
            )?)
            .await?;
        let key = tenants
            .create_api_key(req(
                pb::CreateApiKeyRequest {
                    tenant_id: tenant.id.clone(),
                    name: "backend".into(),
                    personal_data: false,
                },
                admin,
            )?)
            .await?
            .into_inner()
            .secret;
        let app = ApplicationServiceClient::new(channel.clone())
            .register_application(req(
                pb::RegisterApplicationRequest {
                    tenant_id: tenant.id.clone(),
                    display_name: "Auto insurance".into(),
                    redirect_uris: vec!["https://auto.example/cb".into()],
                    post_logout_redirect_uris: vec![],
                    grant_types: vec![
                        pb::GrantType::AuthorizationCode as i32,
                        pb::GrantType::RefreshToken as i32,
                    ],
                    client_type: pb::ClientType::Public as i32,
                    require_mfa: false,
                },
                &key,
            )?)
            .await?
            .into_inner()
            .application
            .ok_or("no application")?;
        Ok(World {
            channel,
            admin: admin.to_string(),
            key,
            tenant_id: tenant.id,
            client_id: app.client_id,
            app_id: app.id,
            http: server.http,
        })
    }

    /// Registers another app of the tenant; the world for signing in to it.
    pub async fn with_app(&self, name: &str) -> Result<World, Error> {
        let app = ApplicationServiceClient::new(self.channel.clone())
            .register_application(req(
                pb::RegisterApplicationRequest {
                    tenant_id: self.tenant_id.clone(),
                    display_name: name.into(),
                    redirect_uris: vec!["https://app.example/cb".into()],
                    post_logout_redirect_uris: vec![],
                    grant_types: vec![
                        pb::GrantType::AuthorizationCode as i32,
                        pb::GrantType::RefreshToken as i32,
                    ],
                    client_type: pb::ClientType::Public as i32,
                    require_mfa: false,
                },
                &self.key,
            )?)
            .await?
            .into_inner()
            .application
            .ok_or("no application")?;
        Ok(World {
            client_id: app.client_id,
            app_id: app.id,
            ..self.clone()
        })
    }

    /// An enabled Conditional Access policy, sent through this world's channel: everyone
    /// signing in to the app with id `app_id` needs MFA.
    pub async fn require_mfa_policy(&self, name: &str, app_id: &str) -> TestResult {
        gatehouse_proto::v1::policy_service_client::PolicyServiceClient::new(self.channel.clone())
            .create_policy(req(
                pb::CreatePolicyRequest {
                    tenant_id: self.tenant_id.clone(),
                    definition: Some(pb::PolicyDefinition {
                        name: name.into(),
                        users: Some(pb::UserAssignment {
                            all: true,
                            ..Default::default()
                        }),
                        apps: Some(pb::AppAssignment {
                            include: vec![app_id.into()],
                            ..Default::default()
                        }),
                        conditions: Some(pb::PolicyConditions::default()),
                        grant: Some(pb::GrantControls {
                            controls: vec![pb::GrantControl::Mfa as i32],
                            ..Default::default()
                        }),
                        session: None,
                    }),
                    state: pb::PolicyState::Enabled as i32,
                    acknowledge_warnings: false,
                },
                &self.key,
            )?)
            .await?;
        Ok(())
    }

    pub fn signin(&self) -> SignInServiceClient<Channel> {
        SignInServiceClient::new(self.channel.clone())
    }

    pub fn mfa(&self) -> MfaServiceClient<Channel> {
        MfaServiceClient::new(self.channel.clone())
    }

    pub fn sessions(&self) -> SessionServiceClient<Channel> {
        SessionServiceClient::new(self.channel.clone())
    }

    /// A RefreshSession request of this world's app, without a key.
    pub fn refresh_request(&self, token: &str) -> pb::RefreshSessionRequest {
        pb::RefreshSessionRequest {
            tenant_id: self.tenant_id.clone(),
            client_id: self.client_id.clone(),
            refresh_token: token.into(),
        }
    }

    pub async fn create_user(&self, email: &str, email_verified: bool) -> Result<String, Error> {
        Ok(UserServiceClient::new(self.channel.clone())
            .create_user(req(
                pb::CreateUserRequest {
                    tenant_id: self.tenant_id.clone(),
                    email: email.into(),
                    password: PASSWORD.into(),
                    attributes: Default::default(),
                    email_verified,
                },
                &self.key,
            )?)
            .await?
            .into_inner()
            .id)
    }

    /// Enrols a TOTP authenticator for `user_id` (confirmed with a code of the previous
    /// step, so that a sign-in may use the current one); its secret.
    pub async fn enroll_totp(&self, user_id: &str) -> Result<String, Error> {
        let mut mfa = MfaServiceClient::new(self.channel.clone());
        let enrollment = mfa
            .start_totp_enrollment(req(
                pb::StartTotpEnrollmentRequest {
                    tenant_id: self.tenant_id.clone(),
                    user_id: user_id.into(),
                    issuer: "Contoso".into(),
                },
                &self.key,
            )?)
            .await?
            .into_inner();
        // The confirming code is the previous step's (the current one is left for a sign-in
        // right after, which replay protection would refuse), accepted one step back at most:
        // computed in the last seconds of a step, it may reach the server two steps back.
        let into_step = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs_f64()
            % 30.0;
        if into_step > 26.0 {
            tokio::time::sleep(std::time::Duration::from_secs_f64(30.2 - into_step)).await;
        }
        mfa.confirm_totp_enrollment(req(
            pb::ConfirmTotpEnrollmentRequest {
                tenant_id: self.tenant_id.clone(),
                user_id: user_id.into(),
                code: totp(&enrollment.secret, -30)?,
            },
            &self.key,
        )?)
        .await?;
        Ok(enrollment.secret)
    }

    /// Changes the tenant's settings (with the admin key).
    pub async fn update_settings(
        &self,
        change: impl FnOnce(&mut pb::TenantSettings) -> TestResult,
    ) -> TestResult {
        let mut tenants = TenantServiceClient::new(self.channel.clone());
        let tenant = tenants
            .get_tenant(req(
                pb::GetTenantRequest {
                    tenant_id: self.tenant_id.clone(),
                },
                &self.admin,
            )?)
            .await?
            .into_inner();
        let mut settings = tenant.settings.ok_or("no settings")?;
        change(&mut settings)?;
        tenants
            .update_tenant_settings(req(
                pb::UpdateTenantSettingsRequest {
                    tenant_id: self.tenant_id.clone(),
                    settings: Some(settings),
                },
                &self.admin,
            )?)
            .await?;
        Ok(())
    }

    /// Turns the tenant's breached-password check on or off.
    pub async fn reject_breached(&self, on: bool) -> TestResult {
        self.update_settings(|settings| {
            settings
                .password_policy
                .as_mut()
                .ok_or("no password policy")?
                .reject_breached = on;
            Ok(())
        })
        .await
    }

    pub async fn set_require_mfa(&self, on: bool) -> TestResult {
        self.update_settings(|settings| {
            settings.require_mfa = on;
            Ok(())
        })
        .await
    }

    pub async fn start(
        &self,
        email: &str,
        method: pb::PrimaryMethod,
    ) -> Result<pb::SignIn, tonic::Status> {
        self.signin()
            .start_sign_in(pb::StartSignInRequest {
                tenant_id: self.tenant_id.clone(),
                client_id: self.client_id.clone(),
                email: email.into(),
                method: method as i32,
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn password(
        &self,
        flow: &pb::SignIn,
        password: &str,
    ) -> Result<pb::SignIn, tonic::Status> {
        self.signin()
            .submit_password(pb::SubmitPasswordRequest {
                tenant_id: self.tenant_id.clone(),
                client_id: self.client_id.clone(),
                sign_in_id: flow.id.clone(),
                password: password.into(),
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn select(
        &self,
        flow: &pb::SignIn,
        method: pb::MfaMethod,
    ) -> Result<pb::SignIn, tonic::Status> {
        self.signin()
            .select_mfa_method(pb::SelectMfaMethodRequest {
                tenant_id: self.tenant_id.clone(),
                client_id: self.client_id.clone(),
                sign_in_id: flow.id.clone(),
                method: method as i32,
            })
            .await
            .map(|r| r.into_inner())
    }

    pub fn code_request(&self, flow: &pb::SignIn, code: &str) -> pb::SubmitCodeRequest {
        pb::SubmitCodeRequest {
            tenant_id: self.tenant_id.clone(),
            client_id: self.client_id.clone(),
            sign_in_id: flow.id.clone(),
            code: code.into(),
        }
    }

    pub async fn mfa_code(
        &self,
        flow: &pb::SignIn,
        code: &str,
    ) -> Result<pb::SignIn, tonic::Status> {
        self.signin()
            .submit_mfa_code(self.code_request(flow, code))
            .await
            .map(|r| r.into_inner())
    }

    pub async fn get(&self, flow: &pb::SignIn) -> Result<pb::SignIn, tonic::Status> {
        self.signin()
            .get_sign_in(pb::SignInRef {
                tenant_id: self.tenant_id.clone(),
                client_id: self.client_id.clone(),
                sign_in_id: flow.id.clone(),
            })
            .await
            .map(|r| r.into_inner())
    }

    /// A password sign-in that must complete (no MFA).
    pub async fn sign_in(&self, email: &str) -> Result<pb::Tokens, Error> {
        let flow = self.start(email, pb::PrimaryMethod::Password).await?;
        let done = self.password(&flow, PASSWORD).await?;
        completed(&done)?;
        Ok(done.tokens.ok_or("no tokens")?)
    }

    pub fn jwks_url(&self) -> String {
        format!("http://{}/tenants/{}/jwks", self.http, self.tenant_id)
    }

    pub fn issuer(&self) -> String {
        format!("http://{}/tenants/{}", self.http, self.tenant_id)
    }

    pub async fn verify(
        &self,
        token: &str,
    ) -> Result<pb::VerifyAccessTokenResponse, tonic::Status> {
        let request = req(
            pb::VerifyAccessTokenRequest {
                tenant_id: self.tenant_id.clone(),
                access_token: token.into(),
            },
            &self.key,
        )
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
        self.sessions()
            .verify_access_token(request)
            .await
            .map(|r| r.into_inner())
    }
}

pub fn completed(flow: &pb::SignIn) -> TestResult {
    if flow.status != pb::SignInStatus::Completed as i32 || flow.tokens.is_none() {
        return Err(format!("not completed: {flow:?}").into());
    }
    Ok(())
}

pub fn step_is(flow: &pb::SignIn, step: pb::SignInStep) -> TestResult {
    if flow.next_step != step as i32 {
        return Err(format!("expected {step:?}, got {flow:?}").into());
    }
    Ok(())
}

pub fn code_of(result: Result<pb::SignIn, tonic::Status>) -> Result<Code, Error> {
    match result {
        Ok(flow) => Err(format!("accepted: {flow:?}").into()),
        Err(status) => Ok(status.code()),
    }
}

/// Runs the Python helper; (exit success, stdout).
pub fn py(args: &[&str]) -> Result<(bool, String), Error> {
    let output = Command::new(python())
        .arg(tests_dir().join("python/tokens_client.py"))
        .args(args)
        .output()?;
    if !output.status.success() && output.stdout.is_empty() {
        return Err(format!(
            "tokens_client.py {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    Ok((
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).trim().to_string(),
    ))
}

pub fn totp(secret: &str, offset: i64) -> Result<String, Error> {
    let (ok, code) = py(&["totp", secret, &offset.to_string()])?;
    if !ok {
        return Err("pyotp failed".into());
    }
    Ok(code)
}
