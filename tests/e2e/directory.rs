//! The directory over gRPC against a running server: tenants, settings, API keys and
//! applications, tenant isolation and validation. SQLite always; PostgreSQL when configured.

use crate::support;

use gatehouse_proto::v1 as pb;
use pb::application_service_client::ApplicationServiceClient;
use pb::tenant_service_client::TenantServiceClient;
use pb::user_service_client::UserServiceClient;
use std::collections::HashMap;
use support::{Server, TestResult};
use tonic::Code;
use tonic::transport::Channel;

use support::{Error, bad_fields, expect, req};

struct Directory {
    tenants: TenantServiceClient<Channel>,
    apps: ApplicationServiceClient<Channel>,
    users: UserServiceClient<Channel>,
    admin: String,
}

impl Directory {
    async fn connect(server: &Server) -> Result<Self, Error> {
        let channel = tonic::transport::Endpoint::from_shared(server.grpc_url())?
            .connect()
            .await?;
        Ok(Directory {
            tenants: TenantServiceClient::new(channel.clone()),
            apps: ApplicationServiceClient::new(channel.clone()),
            users: UserServiceClient::new(channel),
            admin: server.printed_admin_key().ok_or("no admin key")?,
        })
    }

    async fn tenant(&mut self, name: &str) -> Result<pb::Tenant, Error> {
        let request = pb::CreateTenantRequest {
            display_name: name.into(),
            settings: None,
        };
        Ok(self
            .tenants
            .create_tenant(req(request, &self.admin)?)
            .await?
            .into_inner())
    }

    async fn key(
        &mut self,
        tenant: &pb::Tenant,
        with: &str,
    ) -> Result<pb::CreateApiKeyResponse, Error> {
        let request = pb::CreateApiKeyRequest {
            tenant_id: tenant.id.clone(),
            name: "platform team".into(),
            personal_data: false,
        };
        Ok(self
            .tenants
            .create_api_key(req(request, with)?)
            .await?
            .into_inner())
    }

    async fn app(
        &mut self,
        tenant: &pb::Tenant,
        key: &str,
        name: &str,
        client_type: pb::ClientType,
    ) -> Result<pb::RegisterApplicationResponse, Error> {
        let request = pb::RegisterApplicationRequest {
            tenant_id: tenant.id.clone(),
            display_name: name.into(),
            redirect_uris: vec!["https://insurance.example/callback".into()],
            post_logout_redirect_uris: vec![],
            grant_types: vec![
                pb::GrantType::AuthorizationCode as i32,
                pb::GrantType::RefreshToken as i32,
            ],
            client_type: client_type as i32,
            require_mfa: false,
        };
        Ok(self
            .apps
            .register_application(req(request, key)?)
            .await?
            .into_inner())
    }
}

async fn lifecycle(database_url: Option<String>) -> TestResult {
    let data = tempfile::tempdir()?;
    let server = Server::start(data.path(), database_url.as_deref())?;
    let mut d = Directory::connect(&server).await?;
    let admin = d.admin.clone();

    // Tenants and settings.
    let contoso = d.tenant("Contoso Insurance").await?;
    let settings = contoso.settings.clone().ok_or("no settings")?;
    assert!(settings.sign_up_enabled);
    assert_eq!(
        settings.password_policy.as_ref().map(|p| p.min_length),
        Some(8)
    );
    let mut changed = settings.clone();
    changed.sign_up_enabled = false;
    changed.collected_attributes = vec!["given_name".into(), "family_name".into()];
    if let Some(policy) = changed.password_policy.as_mut() {
        policy.min_length = 12;
    }
    let update = pb::UpdateTenantSettingsRequest {
        tenant_id: contoso.id.clone(),
        settings: Some(changed.clone()),
    };
    let updated = d
        .tenants
        .update_tenant_settings(req(update, &admin)?)
        .await?
        .into_inner();
    assert_eq!(updated.settings.as_ref(), Some(&changed));
    let fetched = d
        .tenants
        .get_tenant(req(
            pb::GetTenantRequest {
                tenant_id: contoso.id.clone(),
            },
            &admin,
        )?)
        .await?
        .into_inner();
    assert_eq!(fetched.settings, Some(changed.clone()));

    // Bad settings name every bad field and change nothing.
    let mut bad = changed.clone();
    if let Some(policy) = bad.password_policy.as_mut() {
        policy.min_length = 4;
    }
    if let Some(lockout) = bad.lockout_policy.as_mut() {
        lockout.threshold = 0;
    }
    bad.allowed_primary_methods = vec![];
    bad.collected_attributes = vec!["Given Name".into()];
    let update = pb::UpdateTenantSettingsRequest {
        tenant_id: contoso.id.clone(),
        settings: Some(bad),
    };
    let status = d
        .tenants
        .update_tenant_settings(req(update, &admin)?)
        .await
        .err()
        .ok_or("bad settings accepted")?;
    assert_eq!(status.code(), Code::InvalidArgument);
    let fields = bad_fields(&status);
    for field in [
        "settings.password_policy.min_length",
        "settings.lockout_policy.threshold",
        "settings.allowed_primary_methods",
        "settings.collected_attributes[0]",
    ] {
        assert!(
            fields.iter().any(|f| f == field),
            "{field} not in {fields:?}"
        );
    }
    let after = d
        .tenants
        .get_tenant(req(
            pb::GetTenantRequest {
                tenant_id: contoso.id.clone(),
            },
            &admin,
        )?)
        .await?
        .into_inner();
    assert_eq!(after.settings, Some(changed));

    // A tenant key: works for its tenant, at once; listing tenants is the admin's.
    let key = d.key(&contoso, &admin).await?;
    let secret = key.secret.clone();
    assert!(secret.starts_with("gh_") && secret.len() > 40);
    d.tenants
        .get_tenant(req(
            pb::GetTenantRequest {
                tenant_id: contoso.id.clone(),
            },
            &secret,
        )?)
        .await?;
    let denied = d
        .tenants
        .list_tenants(req(pb::ListTenantsRequest::default(), &secret)?)
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(denied, Some(Code::PermissionDenied));
    let denied = d
        .tenants
        .create_tenant(req(
            pb::CreateTenantRequest {
                display_name: "x".into(),
                settings: None,
            },
            &secret,
        )?)
        .await;
    assert_eq!(denied.err().map(|s| s.code()), Some(Code::PermissionDenied));
    let keys = d
        .tenants
        .list_api_keys(req(
            pb::ListApiKeysRequest {
                tenant_id: contoso.id.clone(),
            },
            &secret,
        )?)
        .await?
        .into_inner();
    assert_eq!(keys.keys.len(), 1);
    assert!(
        !format!("{keys:?}").contains(&secret[3..]),
        "a listing must never show the secret"
    );

    // Applications, with the tenant's own key.
    let web = d
        .app(
            &contoso,
            &secret,
            "Auto insurance",
            pb::ClientType::Confidential,
        )
        .await?;
    let spa = d
        .app(&contoso, &secret, "Home insurance", pb::ClientType::Public)
        .await?;
    assert!(
        !web.client_secret.is_empty(),
        "a confidential app gets a secret"
    );
    assert!(spa.client_secret.is_empty(), "a public app has no secret");
    let web_app = web.application.clone().ok_or("no app")?;
    let spa_app = spa.application.clone().ok_or("no app")?;
    assert_ne!(web_app.client_id, spa_app.client_id);
    let listed = d
        .apps
        .list_applications(req(
            pb::ListApplicationsRequest {
                tenant_id: contoso.id.clone(),
                ..Default::default()
            },
            &secret,
        )?)
        .await?
        .into_inner();
    assert_eq!(
        listed
            .applications
            .iter()
            .map(|a| a.display_name.as_str())
            .collect::<Vec<_>>(),
        ["Auto insurance", "Home insurance"]
    );
    let update = pb::UpdateApplicationRequest {
        tenant_id: contoso.id.clone(),
        application_id: web_app.id.clone(),
        display_name: "Auto insurance (new)".into(),
        redirect_uris: vec![
            "https://auto.example/cb".into(),
            "http://localhost:3000/cb".into(),
        ],
        post_logout_redirect_uris: vec!["https://auto.example/".into()],
        grant_types: vec![pb::GrantType::AuthorizationCode as i32],
        require_mfa: false,
    };
    let updated = d
        .apps
        .update_application(req(update, &secret)?)
        .await?
        .into_inner();
    assert_eq!(updated.redirect_uris.len(), 2);
    assert_eq!(
        updated.client_id, web_app.client_id,
        "the client id never changes"
    );
    let bad = pb::RegisterApplicationRequest {
        tenant_id: contoso.id.clone(),
        display_name: "".into(),
        redirect_uris: vec![
            "http://evil.example/cb".into(),
            "https://ok.example/cb#frag".into(),
            "not a uri".into(),
        ],
        post_logout_redirect_uris: vec![],
        grant_types: vec![pb::GrantType::RefreshToken as i32, 42],
        client_type: 0,
        require_mfa: false,
    };
    let status = d
        .apps
        .register_application(req(bad, &secret)?)
        .await
        .err()
        .ok_or("bad app accepted")?;
    let fields = bad_fields(&status);
    for field in [
        "client_type",
        "display_name",
        "redirect_uris[0]",
        "redirect_uris[1]",
        "redirect_uris[2]",
        "grant_types[1]",
        "grant_types",
    ] {
        assert!(
            fields.iter().any(|f| f == field),
            "{field} not in {fields:?}"
        );
    }
    d.apps
        .delete_application(req(
            pb::DeleteApplicationRequest {
                tenant_id: contoso.id.clone(),
                application_id: spa_app.id.clone(),
            },
            &secret,
        )?)
        .await?;
    let gone = d
        .apps
        .get_application(req(
            pb::GetApplicationRequest {
                tenant_id: contoso.id.clone(),
                application_id: spa_app.id.clone(),
            },
            &secret,
        )?)
        .await;
    assert_eq!(gone.err().map(|s| s.code()), Some(Code::NotFound));

    // Revoked: the key stops working at once.
    let revoke = pb::RevokeApiKeyRequest {
        tenant_id: contoso.id.clone(),
        key_id: key.key.as_ref().map(|k| k.id.clone()).unwrap_or_default(),
    };
    let revoked = d
        .tenants
        .revoke_api_key(req(revoke, &admin)?)
        .await?
        .into_inner();
    assert!(!revoked.revoked_at.is_empty());
    let after = d
        .tenants
        .get_tenant(req(
            pb::GetTenantRequest {
                tenant_id: contoso.id.clone(),
            },
            &secret,
        )?)
        .await;
    assert_eq!(after.err().map(|s| s.code()), Some(Code::Unauthenticated));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_keys_and_applications_live_their_lifecycle_on_sqlite() -> TestResult {
    lifecycle(None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_keys_and_applications_live_their_lifecycle_on_postgres() -> TestResult {
    match support::postgres_url().await? {
        Some(url) => lifecycle(Some(url)).await,
        None => Ok(()),
    }
}

/// Tenant A's key against every directory RPC on tenant B's resources: never B's data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_key_never_reaches_another_tenant() -> TestResult {
    let data = tempfile::tempdir()?;
    let server = Server::start(data.path(), None)?;
    let mut d = Directory::connect(&server).await?;
    let admin = d.admin.clone();
    let a = d.tenant("Tenant A").await?;
    let b = d.tenant("Tenant B").await?;
    let key_a = d.key(&a, &admin).await?.secret;
    let key_b = d.key(&b, &admin).await?;
    let key_b_id = key_b.key.as_ref().map(|k| k.id.clone()).unwrap_or_default();
    let app_b = d
        .app(&b, &admin, "B app", pb::ClientType::Confidential)
        .await?
        .application
        .ok_or("no app")?;
    let b_before = d
        .tenants
        .get_tenant(req(
            pb::GetTenantRequest {
                tenant_id: b.id.clone(),
            },
            &admin,
        )?)
        .await?
        .into_inner();

    let refused =
        |result: Result<tonic::Response<_>, tonic::Status>, rpc: &str| -> Result<(), Error> {
            let code = result.err().map(|s| s.code());
            match code {
                Some(Code::NotFound | Code::PermissionDenied) => Ok(()),
                other => {
                    Err(format!("{rpc} with tenant A's key on tenant B answered {other:?}").into())
                }
            }
        };
    let settings = b_before.settings.clone();
    refused(
        d.tenants
            .get_tenant(req(
                pb::GetTenantRequest {
                    tenant_id: b.id.clone(),
                },
                &key_a,
            )?)
            .await
            .map(|r| r.map(drop)),
        "GetTenant",
    )?;
    refused(
        d.tenants
            .list_tenants(req(pb::ListTenantsRequest::default(), &key_a)?)
            .await
            .map(|r| r.map(drop)),
        "ListTenants",
    )?;
    refused(
        d.tenants
            .update_tenant_settings(req(
                pb::UpdateTenantSettingsRequest {
                    tenant_id: b.id.clone(),
                    settings,
                },
                &key_a,
            )?)
            .await
            .map(|r| r.map(drop)),
        "UpdateTenantSettings",
    )?;
    refused(
        d.tenants
            .create_api_key(req(
                pb::CreateApiKeyRequest {
                    tenant_id: b.id.clone(),
                    name: "x".into(),
                    personal_data: false,
                },
                &key_a,
            )?)
            .await
            .map(|r| r.map(drop)),
        "CreateApiKey",
    )?;
    refused(
        d.tenants
            .list_api_keys(req(
                pb::ListApiKeysRequest {
                    tenant_id: b.id.clone(),
                },
                &key_a,
            )?)
            .await
            .map(|r| r.map(drop)),
        "ListApiKeys",
    )?;
    refused(
        d.tenants
            .revoke_api_key(req(
                pb::RevokeApiKeyRequest {
                    tenant_id: b.id.clone(),
                    key_id: key_b_id.clone(),
                },
                &key_a,
            )?)
            .await
            .map(|r| r.map(drop)),
        "RevokeApiKey",
    )?;
    // Naming its own tenant with B's key id or B's app id does not help either.
    refused(
        d.tenants
            .revoke_api_key(req(
                pb::RevokeApiKeyRequest {
                    tenant_id: a.id.clone(),
                    key_id: key_b_id.clone(),
                },
                &key_a,
            )?)
            .await
            .map(|r| r.map(drop)),
        "RevokeApiKey via own tenant",
    )?;
    let register = pb::RegisterApplicationRequest {
        tenant_id: b.id.clone(),
        display_name: "intruder".into(),
        redirect_uris: vec!["https://a.example/cb".into()],
        post_logout_redirect_uris: vec![],
        grant_types: vec![pb::GrantType::AuthorizationCode as i32],
        client_type: pb::ClientType::Public as i32,
        require_mfa: false,
    };
    refused(
        d.apps
            .register_application(req(register, &key_a)?)
            .await
            .map(|r| r.map(drop)),
        "RegisterApplication",
    )?;
    for tenant_id in [b.id.clone(), a.id.clone()] {
        refused(
            d.apps
                .get_application(req(
                    pb::GetApplicationRequest {
                        tenant_id: tenant_id.clone(),
                        application_id: app_b.id.clone(),
                    },
                    &key_a,
                )?)
                .await
                .map(|r| r.map(drop)),
            "GetApplication",
        )?;
        let update = pb::UpdateApplicationRequest {
            tenant_id: tenant_id.clone(),
            application_id: app_b.id.clone(),
            display_name: "hijacked".into(),
            redirect_uris: vec!["https://a.example/cb".into()],
            post_logout_redirect_uris: vec![],
            grant_types: vec![pb::GrantType::AuthorizationCode as i32],
            require_mfa: false,
        };
        refused(
            d.apps
                .update_application(req(update, &key_a)?)
                .await
                .map(|r| r.map(drop)),
            "UpdateApplication",
        )?;
        refused(
            d.apps
                .delete_application(req(
                    pb::DeleteApplicationRequest {
                        tenant_id: tenant_id.clone(),
                        application_id: app_b.id.clone(),
                    },
                    &key_a,
                )?)
                .await
                .map(|r| r.map(drop)),
            "DeleteApplication",
        )?;
    }
    refused(
        d.apps
            .list_applications(req(
                pb::ListApplicationsRequest {
                    tenant_id: b.id.clone(),
                    ..Default::default()
                },
                &key_a,
            )?)
            .await
            .map(|r| r.map(drop)),
        "ListApplications",
    )?;

    // Users: B's user through every UserService RPC, naming tenant B or its own tenant A.
    let user_b = d
        .users
        .create_user(req(
            pb::CreateUserRequest {
                tenant_id: b.id.clone(),
                email: "b.customer@example.com".into(),
                password: "a long enough passphrase".into(),
                attributes: HashMap::new(),
                email_verified: true,
            },
            &admin,
        )?)
        .await?
        .into_inner();
    let create = pb::CreateUserRequest {
        tenant_id: b.id.clone(),
        email: "intruder@example.com".into(),
        password: String::new(),
        attributes: HashMap::new(),
        email_verified: true,
    };
    refused(
        d.users
            .create_user(req(create, &key_a)?)
            .await
            .map(|r| r.map(drop)),
        "CreateUser",
    )?;
    let list = pb::ListUsersRequest {
        tenant_id: b.id.clone(),
        ..Default::default()
    };
    refused(
        d.users
            .list_users(req(list, &key_a)?)
            .await
            .map(|r| r.map(drop)),
        "ListUsers",
    )?;
    for tenant_id in [b.id.clone(), a.id.clone()] {
        let user = || pb::UserRef {
            tenant_id: tenant_id.clone(),
            user_id: user_b.id.clone(),
        };
        let get = pb::GetUserRequest {
            tenant_id: tenant_id.clone(),
            user_id: user_b.id.clone(),
        };
        refused(
            d.users
                .get_user(req(get, &key_a)?)
                .await
                .map(|r| r.map(drop)),
            "GetUser",
        )?;
        let profile = pb::UpdateProfileRequest {
            tenant_id: tenant_id.clone(),
            user_id: user_b.id.clone(),
            attributes: HashMap::new(),
        };
        refused(
            d.users
                .update_profile(req(profile, &key_a)?)
                .await
                .map(|r| r.map(drop)),
            "UpdateProfile",
        )?;
        let change = pb::ChangePasswordRequest {
            tenant_id: tenant_id.clone(),
            user_id: user_b.id.clone(),
            current_password: "a long enough passphrase".into(),
            new_password: "a takeover passphrase".into(),
        };
        refused(
            d.users
                .change_password(req(change, &key_a)?)
                .await
                .map(|r| r.map(drop)),
            "ChangePassword",
        )?;
        let phone = pb::AddPhoneRequest {
            tenant_id: tenant_id.clone(),
            user_id: user_b.id.clone(),
            phone: "+14155550100".into(),
        };
        refused(
            d.users
                .add_phone(req(phone, &key_a)?)
                .await
                .map(|r| r.map(drop)),
            "AddPhone",
        )?;
        let verify = pb::VerifyPhoneRequest {
            tenant_id: tenant_id.clone(),
            user_id: user_b.id.clone(),
            code: "123456".into(),
        };
        refused(
            d.users
                .verify_phone(req(verify, &key_a)?)
                .await
                .map(|r| r.map(drop)),
            "VerifyPhone",
        )?;
        refused(
            d.users
                .disable_user(req(user(), &key_a)?)
                .await
                .map(|r| r.map(drop)),
            "DisableUser",
        )?;
        refused(
            d.users
                .enable_user(req(user(), &key_a)?)
                .await
                .map(|r| r.map(drop)),
            "EnableUser",
        )?;
        refused(
            d.users
                .unlock_user(req(user(), &key_a)?)
                .await
                .map(|r| r.map(drop)),
            "UnlockUser",
        )?;
        refused(
            d.users
                .erase_user(req(user(), &key_a)?)
                .await
                .map(|r| r.map(drop)),
            "EraseUser",
        )?;
    }
    // Self-service RPCs need no key, but one sent for another tenant is refused.
    let sign_up = pb::SignUpRequest {
        tenant_id: b.id.clone(),
        client_id: app_b.client_id.clone(),
        email: "someone@example.com".into(),
        password: "a long enough passphrase".into(),
        attributes: HashMap::new(),
    };
    refused(
        d.users
            .sign_up(req(sign_up, &key_a)?)
            .await
            .map(|r| r.map(drop)),
        "SignUp",
    )?;
    let verify = pb::VerifyEmailRequest {
        tenant_id: b.id.clone(),
        user_id: user_b.id.clone(),
        code: "123456".into(),
    };
    refused(
        d.users
            .verify_email(req(verify, &key_a)?)
            .await
            .map(|r| r.map(drop)),
        "VerifyEmail",
    )?;
    let start = pb::StartPasswordResetRequest {
        tenant_id: b.id.clone(),
        email: "b.customer@example.com".into(),
    };
    refused(
        d.users
            .start_password_reset(req(start, &key_a)?)
            .await
            .map(|r| r.map(drop)),
        "StartPasswordReset",
    )?;
    let complete = pb::CompletePasswordResetRequest {
        tenant_id: b.id.clone(),
        email: "b.customer@example.com".into(),
        code: "123456".into(),
        new_password: "a takeover passphrase".into(),
    };
    refused(
        d.users
            .complete_password_reset(req(complete, &key_a)?)
            .await
            .map(|r| r.map(drop)),
        "CompletePasswordReset",
    )?;
    let user_after = d
        .users
        .get_user(req(
            pb::GetUserRequest {
                tenant_id: b.id.clone(),
                user_id: user_b.id.clone(),
            },
            &key_b.secret,
        )?)
        .await?
        .into_inner();
    assert_eq!(user_after, user_b, "B's user is untouched");
    let b_users = d
        .users
        .list_users(req(
            pb::ListUsersRequest {
                tenant_id: b.id.clone(),
                ..Default::default()
            },
            &admin,
        )?)
        .await?
        .into_inner();
    assert_eq!(b_users.users.len(), 1);

    // B is untouched: same settings, its key works, its app is as registered.
    let b_after = d
        .tenants
        .get_tenant(req(
            pb::GetTenantRequest {
                tenant_id: b.id.clone(),
            },
            &admin,
        )?)
        .await?
        .into_inner();
    assert_eq!(b_after, b_before);
    let app_after = d
        .apps
        .get_application(req(
            pb::GetApplicationRequest {
                tenant_id: b.id.clone(),
                application_id: app_b.id.clone(),
            },
            &key_b.secret,
        )?)
        .await?
        .into_inner();
    assert_eq!(app_after, app_b);
    Ok(())
}

/// Bad input to the tenant and application RPCs: each named, nothing written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_and_application_rpcs_refuse_bad_input() -> TestResult {
    let data = tempfile::tempdir()?;
    let server = Server::start(data.path(), None)?;
    let mut d = Directory::connect(&server).await?;
    let admin = d.admin.clone();
    let long = "x".repeat(300);
    let missing = uuid::Uuid::now_v7().to_string();
    for (name, case) in [
        ("", "empty name"),
        ("   ", "blank name"),
        (long.as_str(), "long name"),
    ] {
        let create = pb::CreateTenantRequest {
            display_name: name.into(),
            settings: None,
        };
        expect(
            d.tenants
                .create_tenant(req(create, &admin)?)
                .await
                .map(drop),
            Code::InvalidArgument,
            Some("display_name"),
            case,
        )?;
    }
    let tenant = d.tenant("Valid").await?;
    for (id, code) in [
        ("", Code::InvalidArgument),
        ("nope", Code::InvalidArgument),
        (missing.as_str(), Code::NotFound),
    ] {
        let get = pb::GetTenantRequest {
            tenant_id: id.into(),
        };
        expect(
            d.tenants.get_tenant(req(get, &admin)?).await.map(drop),
            code,
            None,
            "get tenant",
        )?;
        let keys = pb::ListApiKeysRequest {
            tenant_id: id.into(),
        };
        expect(
            d.tenants.list_api_keys(req(keys, &admin)?).await.map(drop),
            code,
            None,
            "list keys",
        )?;
        let apps = pb::ListApplicationsRequest {
            tenant_id: id.into(),
            ..Default::default()
        };
        expect(
            d.apps.list_applications(req(apps, &admin)?).await.map(drop),
            code,
            None,
            "list apps",
        )?;
        let get_app = pb::GetApplicationRequest {
            tenant_id: tenant.id.clone(),
            application_id: id.into(),
        };
        expect(
            d.apps
                .get_application(req(get_app, &admin)?)
                .await
                .map(drop),
            code,
            None,
            "get app",
        )?;
        let revoke = pb::RevokeApiKeyRequest {
            tenant_id: tenant.id.clone(),
            key_id: id.into(),
        };
        expect(
            d.tenants
                .revoke_api_key(req(revoke, &admin)?)
                .await
                .map(drop),
            code,
            None,
            "revoke key",
        )?;
    }
    for (name, case) in [("", "empty key name"), (long.as_str(), "long key name")] {
        let create = pb::CreateApiKeyRequest {
            tenant_id: tenant.id.clone(),
            name: name.into(),
            personal_data: false,
        };
        expect(
            d.tenants
                .create_api_key(req(create, &admin)?)
                .await
                .map(drop),
            Code::InvalidArgument,
            Some("name"),
            case,
        )?;
    }
    let update = pb::UpdateTenantSettingsRequest {
        tenant_id: tenant.id.clone(),
        settings: None,
    };
    expect(
        d.tenants
            .update_tenant_settings(req(update, &admin)?)
            .await
            .map(drop),
        Code::InvalidArgument,
        Some("settings"),
        "no settings",
    )?;
    let page = pb::ListTenantsRequest {
        page_size: 501,
        page_token: String::new(),
    };
    expect(
        d.tenants.list_tenants(req(page, &admin)?).await.map(drop),
        Code::InvalidArgument,
        Some("page_size"),
        "page size",
    )?;
    let token = pb::ListTenantsRequest {
        page_size: 10,
        page_token: "garbage".into(),
    };
    expect(
        d.tenants.list_tenants(req(token, &admin)?).await.map(drop),
        Code::InvalidArgument,
        Some("page_token"),
        "page token",
    )?;
    let long_uri = format!("https://example.com/{long}{long}{long}{long}{long}{long}{long}");
    let register = pb::RegisterApplicationRequest {
        tenant_id: tenant.id.clone(),
        display_name: long.clone(),
        redirect_uris: vec![long_uri],
        post_logout_redirect_uris: vec!["javascript:alert(1)".into()],
        grant_types: vec![],
        client_type: pb::ClientType::Confidential as i32,
        require_mfa: false,
    };
    let status = d
        .apps
        .register_application(req(register, &admin)?)
        .await
        .err()
        .ok_or("bad app accepted")?;
    let fields = bad_fields(&status);
    for field in [
        "display_name",
        "redirect_uris[0]",
        "post_logout_redirect_uris[0]",
        "grant_types",
    ] {
        assert!(
            fields.iter().any(|f| f == field),
            "{field} not in {fields:?}"
        );
    }
    // Nothing was written: one tenant, no keys, no apps.
    let tenants = d
        .tenants
        .list_tenants(req(pb::ListTenantsRequest::default(), &admin)?)
        .await?
        .into_inner();
    assert_eq!(tenants.tenants.len(), 1);
    let keys = d
        .tenants
        .list_api_keys(req(
            pb::ListApiKeysRequest {
                tenant_id: tenant.id.clone(),
            },
            &admin,
        )?)
        .await?
        .into_inner();
    assert!(keys.keys.is_empty());
    let apps = d
        .apps
        .list_applications(req(
            pb::ListApplicationsRequest {
                tenant_id: tenant.id.clone(),
                ..Default::default()
            },
            &admin,
        )?)
        .await?
        .into_inner();
    assert!(apps.applications.is_empty());
    Ok(())
}
