//! Users over gRPC against a running server: self-service sign-up with the code from the
//! outbox, duplicates without account enumeration, password policy and breached passwords,
//! reset and change, phone verification, disable and enable, erasure. SQLite always;
//! PostgreSQL when configured.

use crate::support;

use gatehouse_proto::v1 as pb;
use pb::application_service_client::ApplicationServiceClient;
use pb::tenant_service_client::TenantServiceClient;
use pb::user_service_client::UserServiceClient;
use std::collections::HashMap;
use support::{Server, TestResult, wait_for_message};
use tonic::Code;
use tonic::transport::Channel;

use support::{Error, bad_fields, expect, req};

/// A tenant collecting `given_name`, with one public app, and a tenant key.
struct Setup {
    users: UserServiceClient<Channel>,
    tenant_id: String,
    client_id: String,
    key: String,
    admin: String,
}

async fn setup(server: &Server) -> Result<Setup, Error> {
    let channel = tonic::transport::Endpoint::from_shared(server.grpc_url())?
        .connect()
        .await?;
    let admin = server.printed_admin_key().ok_or("no admin key")?;
    let mut tenants = TenantServiceClient::new(channel.clone());
    let tenant = tenants
        .create_tenant(req(
            pb::CreateTenantRequest {
                display_name: "Contoso".into(),
                settings: None,
            },
            &admin,
        )?)
        .await?
        .into_inner();
    let mut settings = tenant.settings.clone().ok_or("no settings")?;
    settings.collected_attributes = vec!["given_name".into()];
    tenants
        .update_tenant_settings(req(
            pb::UpdateTenantSettingsRequest {
                tenant_id: tenant.id.clone(),
                settings: Some(settings),
            },
            &admin,
        )?)
        .await?;
    let key = tenants
        .create_api_key(req(
            pb::CreateApiKeyRequest {
                tenant_id: tenant.id.clone(),
                name: "backend".into(),
                personal_data: false,
            },
            &admin,
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
                grant_types: vec![pb::GrantType::AuthorizationCode as i32],
                client_type: pb::ClientType::Public as i32,
                require_mfa: false,
            },
            &key,
        )?)
        .await?
        .into_inner()
        .application
        .ok_or("no app")?;
    Ok(Setup {
        users: UserServiceClient::new(channel),
        tenant_id: tenant.id,
        client_id: app.client_id,
        key,
        admin,
    })
}

fn sign_up(s: &Setup, email: &str, password: &str) -> pb::SignUpRequest {
    pb::SignUpRequest {
        tenant_id: s.tenant_id.clone(),
        client_id: s.client_id.clone(),
        email: email.into(),
        password: password.into(),
        attributes: HashMap::from([("given_name".to_string(), "Ada".to_string())]),
    }
}

fn user_ref(s: &Setup, user_id: &str) -> pb::UserRef {
    pb::UserRef {
        tenant_id: s.tenant_id.clone(),
        user_id: user_id.into(),
    }
}

const PASSWORD: &str = "correct horse battery staple";

async fn the_user_lifecycle(database_url: Option<String>) -> TestResult {
    let data = tempfile::tempdir()?;
    let server = Server::start(data.path(), database_url.as_deref())?;
    let mut s = setup(&server).await?;

    // Sign-up with no key → the code arrives in the outbox → verify → active.
    let signed_up = s
        .users
        .sign_up(sign_up(&s, "  Ada.Lovelace@Example.COM ", PASSWORD))
        .await?
        .into_inner();
    let email = "ada.lovelace@example.com";
    let mail = wait_for_message(data.path(), email, 0)?;
    let code = mail
        .code
        .clone()
        .ok_or("no code in the verification email")?;
    assert_eq!(mail.user_id, signed_up.user_id);
    let verify = |code: &str| pb::VerifyEmailRequest {
        tenant_id: s.tenant_id.clone(),
        user_id: signed_up.user_id.clone(),
        code: code.into(),
    };
    let wrong = if code == "000000" { "111111" } else { "000000" };
    let refused = s
        .users
        .verify_email(verify(wrong))
        .await
        .err()
        .ok_or("a wrong code was accepted")?;
    assert_eq!(
        (refused.code(), bad_fields(&refused)),
        (Code::InvalidArgument, vec!["code".to_string()])
    );
    let pending = s
        .users
        .get_user(req(
            pb::GetUserRequest {
                tenant_id: s.tenant_id.clone(),
                user_id: signed_up.user_id.clone(),
            },
            &s.key,
        )?)
        .await?
        .into_inner();
    assert_eq!(pending.status, pb::UserStatus::PendingVerification as i32);
    s.users.verify_email(verify(&code)).await?;
    let user = s
        .users
        .get_user(req(
            pb::GetUserRequest {
                tenant_id: s.tenant_id.clone(),
                user_id: signed_up.user_id.clone(),
            },
            &s.key,
        )?)
        .await?
        .into_inner();
    assert_eq!(user.status, pb::UserStatus::Active as i32);
    assert_eq!(user.email, email);
    assert!(user.email_verified && user.has_password);
    assert_eq!(
        user.attributes.get("given_name").map(String::as_str),
        Some("Ada")
    );
    let reused = s
        .users
        .verify_email(verify(&code))
        .await
        .err()
        .map(|e| e.code());
    assert_eq!(reused, Some(Code::InvalidArgument), "a used code is dead");

    // The same email again: the same kind of answer, a notice to the owner, no second user.
    let again = s
        .users
        .sign_up(sign_up(
            &s,
            "ADA.lovelace@example.com",
            "another long passphrase",
        ))
        .await?
        .into_inner();
    assert_ne!(again.user_id, signed_up.user_id);
    let notice = wait_for_message(data.path(), email, 1)?;
    assert_eq!(notice.code, None);
    assert_eq!(
        notice.user_id, signed_up.user_id,
        "the notice goes to the existing account"
    );
    let fake = pb::VerifyEmailRequest {
        tenant_id: s.tenant_id.clone(),
        user_id: again.user_id.clone(),
        code: code.clone(),
    };
    assert_eq!(
        s.users.verify_email(fake).await.err().map(|e| e.code()),
        Some(Code::InvalidArgument)
    );
    let listed = s
        .users
        .list_users(req(
            pb::ListUsersRequest {
                tenant_id: s.tenant_id.clone(),
                email_prefix: "ada".into(),
                ..Default::default()
            },
            &s.key,
        )?)
        .await?
        .into_inner();
    assert_eq!(listed.users.len(), 1);
    let duplicate = pb::CreateUserRequest {
        tenant_id: s.tenant_id.clone(),
        email: email.into(),
        password: String::new(),
        attributes: HashMap::new(),
        email_verified: true,
    };
    assert_eq!(
        s.users
            .create_user(req(duplicate, &s.key)?)
            .await
            .err()
            .map(|e| e.code()),
        Some(Code::AlreadyExists)
    );

    // Password policy: too short, on the built-in list, on the configured list.
    for (password, why) in [
        ("short", "needs at least 8"),
        ("password123", "breached"),
        ("Tr0ub4dor&3", "breached"),
    ] {
        let status = s
            .users
            .sign_up(sign_up(&s, "grace@example.com", password))
            .await
            .err()
            .ok_or("weak password accepted")?;
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(bad_fields(&status), ["password"]);
        assert!(
            status.message().contains(why),
            "{password}: {}",
            status.message()
        );
    }
    let status = s
        .users
        .sign_up(pb::SignUpRequest {
            attributes: HashMap::from([("ssn".to_string(), "1".to_string())]),
            ..sign_up(&s, "grace@example.com", PASSWORD)
        })
        .await
        .err()
        .ok_or("uncollected attribute accepted")?;
    assert_eq!(bad_fields(&status), ["attributes[ssn]"]);

    // Password reset: same answer for an unknown email; the code works once.
    s.users
        .start_password_reset(pb::StartPasswordResetRequest {
            tenant_id: s.tenant_id.clone(),
            email: "nobody@example.com".into(),
        })
        .await?;
    s.users
        .start_password_reset(pb::StartPasswordResetRequest {
            tenant_id: s.tenant_id.clone(),
            email: email.into(),
        })
        .await?;
    let reset = wait_for_message(data.path(), email, 2)?;
    let reset_code = reset.code.ok_or("no reset code")?;
    let complete = |code: &str, password: &str| pb::CompletePasswordResetRequest {
        tenant_id: s.tenant_id.clone(),
        email: email.into(),
        code: code.into(),
        new_password: password.into(),
    };
    let wrong = if reset_code == "000000" {
        "111111"
    } else {
        "000000"
    };
    assert_eq!(
        s.users
            .complete_password_reset(complete(wrong, "a brand new passphrase"))
            .await
            .err()
            .map(|e| e.code()),
        Some(Code::InvalidArgument)
    );
    s.users
        .complete_password_reset(complete(&reset_code, "a brand new passphrase"))
        .await?;
    assert_eq!(
        s.users
            .complete_password_reset(complete(&reset_code, "yet another passphrase"))
            .await
            .err()
            .map(|e| e.code()),
        Some(Code::InvalidArgument)
    );
    assert!(
        outbox_to(data.path(), "nobody@example.com").is_empty(),
        "an unknown email gets nothing"
    );

    // Change password needs the current one.
    let change = |current: &str| pb::ChangePasswordRequest {
        tenant_id: s.tenant_id.clone(),
        user_id: signed_up.user_id.clone(),
        current_password: current.into(),
        new_password: "the newest passphrase".into(),
    };
    let status = s
        .users
        .change_password(req(change(PASSWORD), &s.key)?)
        .await
        .err()
        .ok_or("an old password was accepted")?;
    assert_eq!(bad_fields(&status), ["current_password"]);
    s.users
        .change_password(req(change("a brand new passphrase"), &s.key)?)
        .await?;

    // Phone: SMS code, verified.
    let with_phone = s
        .users
        .add_phone(req(
            pb::AddPhoneRequest {
                tenant_id: s.tenant_id.clone(),
                user_id: signed_up.user_id.clone(),
                phone: "+14155550100".into(),
            },
            &s.key,
        )?)
        .await?
        .into_inner();
    assert_eq!(
        (with_phone.phone.as_str(), with_phone.phone_verified),
        ("+14155550100", false)
    );
    let sms = wait_for_message(data.path(), "+14155550100", 0)?;
    assert_eq!(sms.channel, "sms");
    let verified = s
        .users
        .verify_phone(req(
            pb::VerifyPhoneRequest {
                tenant_id: s.tenant_id.clone(),
                user_id: signed_up.user_id.clone(),
                code: sms.code.ok_or("no sms code")?,
            },
            &s.key,
        )?)
        .await?
        .into_inner();
    assert!(verified.phone_verified);

    // Disable, enable, unlock.
    let disabled = s
        .users
        .disable_user(req(user_ref(&s, &signed_up.user_id), &s.key)?)
        .await?
        .into_inner();
    assert_eq!(disabled.status, pb::UserStatus::Disabled as i32);
    let listed = s
        .users
        .list_users(req(
            pb::ListUsersRequest {
                tenant_id: s.tenant_id.clone(),
                status: pb::UserStatus::Disabled as i32,
                ..Default::default()
            },
            &s.key,
        )?)
        .await?
        .into_inner();
    assert_eq!(listed.users.len(), 1);
    let enabled = s
        .users
        .enable_user(req(user_ref(&s, &signed_up.user_id), &s.key)?)
        .await?
        .into_inner();
    assert_eq!(enabled.status, pb::UserStatus::Active as i32);
    s.users
        .unlock_user(req(user_ref(&s, &signed_up.user_id), &s.key)?)
        .await?;

    // Five wrong codes kill a code.
    let grace = s
        .users
        .sign_up(sign_up(&s, "grace@example.com", PASSWORD))
        .await?
        .into_inner();
    let grace_code = wait_for_message(data.path(), "grace@example.com", 0)?
        .code
        .ok_or("no code")?;
    let wrong = if grace_code == "000000" {
        "111111"
    } else {
        "000000"
    };
    for _ in 0..5 {
        let attempt = pb::VerifyEmailRequest {
            tenant_id: s.tenant_id.clone(),
            user_id: grace.user_id.clone(),
            code: wrong.into(),
        };
        assert!(s.users.verify_email(attempt).await.is_err());
    }
    let late = pb::VerifyEmailRequest {
        tenant_id: s.tenant_id.clone(),
        user_id: grace.user_id.clone(),
        code: grace_code,
    };
    assert_eq!(
        s.users.verify_email(late).await.err().map(|e| e.code()),
        Some(Code::InvalidArgument),
        "the right code after 5 wrong ones"
    );

    // Another tenant may have the same email.
    let other = s.admin.clone();
    let mut tenants = TenantServiceClient::new(
        tonic::transport::Endpoint::from_shared(server.grpc_url())?
            .connect()
            .await?,
    );
    let tenant_b = tenants
        .create_tenant(req(
            pb::CreateTenantRequest {
                display_name: "Fabrikam".into(),
                settings: None,
            },
            &other,
        )?)
        .await?
        .into_inner();
    let in_b = pb::CreateUserRequest {
        tenant_id: tenant_b.id.clone(),
        email: email.into(),
        password: PASSWORD.into(),
        attributes: HashMap::new(),
        email_verified: true,
    };
    let created = s.users.create_user(req(in_b, &other)?).await?.into_inner();
    assert_eq!(
        (created.email.as_str(), created.status),
        (email, pb::UserStatus::Active as i32)
    );
    Ok(())
}

fn outbox_to(data: &std::path::Path, to: &str) -> Vec<support::Sent> {
    support::outbox(data)
        .into_iter()
        .filter(|m| m.to == to)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_signs_up_verifies_resets_and_verifies_a_phone_on_sqlite() -> TestResult {
    the_user_lifecycle(None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_signs_up_verifies_resets_and_verifies_a_phone_on_postgres() -> TestResult {
    match support::postgres_url().await? {
        Some(url) => the_user_lifecycle(Some(url)).await,
        None => Ok(()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erased_user_leaves_a_whole_log_with_no_personal_data_in_clear() -> TestResult {
    let data = tempfile::tempdir()?;
    let server = Server::start(data.path(), None)?;
    let mut s = setup(&server).await?;
    let email = "erase.me@example.com";
    let created = s
        .users
        .create_user(req(
            pb::CreateUserRequest {
                tenant_id: s.tenant_id.clone(),
                email: email.into(),
                password: PASSWORD.into(),
                attributes: HashMap::from([("given_name".to_string(), "Zebediah".to_string())]),
                email_verified: true,
            },
            &s.key,
        )?)
        .await?
        .into_inner();
    s.users
        .add_phone(req(
            pb::AddPhoneRequest {
                tenant_id: s.tenant_id.clone(),
                user_id: created.id.clone(),
                phone: "+447700900123".into(),
            },
            &s.key,
        )?)
        .await?;
    wait_for_message(data.path(), "+447700900123", 0)?;

    s.users
        .erase_user(req(user_ref(&s, &created.id), &s.key)?)
        .await?;
    let gone = s
        .users
        .get_user(req(
            pb::GetUserRequest {
                tenant_id: s.tenant_id.clone(),
                user_id: created.id.clone(),
            },
            &s.key,
        )?)
        .await;
    assert_eq!(gone.err().map(|e| e.code()), Some(Code::NotFound));

    // The log, read directly: every event is still there, none holds the data in clear, and
    // the sealed fields can no longer be opened.
    let store = gatehouse_events::connect(&format!(
        "sqlite://{}",
        data.path().join("events.db").display()
    ))
    .await?;
    let stream = gatehouse_events::StreamId::new("user", created.id.parse()?);
    let events = store.read_stream(&stream, Default::default()).await?;
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(
        types,
        [
            "UserCreated",
            "PhoneAdded",
            "CodeIssued",
            "NotificationRequested",
            "UserErased"
        ]
    );
    for event in &events {
        let text = event.payload.get();
        for secret in [
            email,
            "erase.me",
            "Zebediah",
            "+447700900123",
            "447700900123",
            "argon2",
        ] {
            assert!(
                !text.contains(secret),
                "{} holds {secret:?} in clear: {text}",
                event.event_type
            );
        }
    }
    assert_eq!(
        store.subject_key(created.id.parse()?).await?,
        None,
        "the data key is destroyed"
    );
    let mut counts = gatehouse_projections::event_counts::EventCounts::default();
    let replayed = gatehouse_projections::rebuild(store.as_ref(), &mut counts).await?;
    assert!(
        replayed.events >= events.len() as u64,
        "the whole log replays"
    );

    // The email is free again.
    let again = s
        .users
        .create_user(req(
            pb::CreateUserRequest {
                tenant_id: s.tenant_id.clone(),
                email: email.into(),
                password: String::new(),
                attributes: HashMap::new(),
                email_verified: false,
            },
            &s.key,
        )?)
        .await?
        .into_inner();
    assert_ne!(again.id, created.id);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_user_rpc_refuses_bad_input_and_writes_nothing() -> TestResult {
    let data = tempfile::tempdir()?;
    let server = Server::start(data.path(), None)?;
    let mut s = setup(&server).await?;
    let long = "x".repeat(300);
    let missing = uuid::Uuid::now_v7().to_string();
    let key = s.key.clone();
    for (email, case) in [
        ("", "empty email"),
        ("not-an-email", "malformed email"),
        (long.as_str(), "long email"),
    ] {
        expect(
            s.users
                .sign_up(sign_up(&s, email, PASSWORD))
                .await
                .map(drop),
            Code::InvalidArgument,
            Some("email"),
            case,
        )?;
        let create = pb::CreateUserRequest {
            tenant_id: s.tenant_id.clone(),
            email: email.into(),
            password: String::new(),
            attributes: HashMap::new(),
            email_verified: false,
        };
        expect(
            s.users.create_user(req(create, &key)?).await.map(drop),
            Code::InvalidArgument,
            Some("email"),
            case,
        )?;
    }
    expect(
        s.users
            .sign_up(sign_up(&s, "ok@example.com", &long))
            .await
            .map(drop),
        Code::InvalidArgument,
        Some("password"),
        "long password",
    )?;
    expect(
        s.users
            .sign_up(pb::SignUpRequest {
                client_id: "nope".into(),
                ..sign_up(&s, "ok@example.com", PASSWORD)
            })
            .await
            .map(drop),
        Code::InvalidArgument,
        Some("client_id"),
        "unknown client id",
    )?;
    expect(
        s.users
            .sign_up(pb::SignUpRequest {
                tenant_id: "nope".into(),
                ..sign_up(&s, "ok@example.com", PASSWORD)
            })
            .await
            .map(drop),
        Code::InvalidArgument,
        Some("tenant_id"),
        "malformed tenant",
    )?;
    expect(
        s.users
            .sign_up(pb::SignUpRequest {
                tenant_id: missing.clone(),
                ..sign_up(&s, "ok@example.com", PASSWORD)
            })
            .await
            .map(drop),
        Code::NotFound,
        None,
        "unknown tenant",
    )?;
    for user_id in ["", "nope", missing.as_str()] {
        let code = if user_id == missing {
            Code::NotFound
        } else {
            Code::InvalidArgument
        };
        let get = pb::GetUserRequest {
            tenant_id: s.tenant_id.clone(),
            user_id: user_id.into(),
        };
        expect(
            s.users.get_user(req(get, &key)?).await.map(drop),
            code,
            None,
            "get user",
        )?;
        expect(
            s.users
                .disable_user(req(user_ref(&s, user_id), &key)?)
                .await
                .map(drop),
            code,
            None,
            "disable",
        )?;
        expect(
            s.users
                .enable_user(req(user_ref(&s, user_id), &key)?)
                .await
                .map(drop),
            code,
            None,
            "enable",
        )?;
        expect(
            s.users
                .unlock_user(req(user_ref(&s, user_id), &key)?)
                .await
                .map(drop),
            code,
            None,
            "unlock",
        )?;
        expect(
            s.users
                .erase_user(req(user_ref(&s, user_id), &key)?)
                .await
                .map(drop),
            code,
            None,
            "erase",
        )?;
        let profile = pb::UpdateProfileRequest {
            tenant_id: s.tenant_id.clone(),
            user_id: user_id.into(),
            attributes: HashMap::new(),
        };
        expect(
            s.users.update_profile(req(profile, &key)?).await.map(drop),
            code,
            None,
            "update profile",
        )?;
        let phone = pb::AddPhoneRequest {
            tenant_id: s.tenant_id.clone(),
            user_id: user_id.into(),
            phone: "+14155550100".into(),
        };
        expect(
            s.users.add_phone(req(phone, &key)?).await.map(drop),
            code,
            None,
            "add phone",
        )?;
    }
    let user = s
        .users
        .create_user(req(
            pb::CreateUserRequest {
                tenant_id: s.tenant_id.clone(),
                email: "valid@example.com".into(),
                password: PASSWORD.into(),
                attributes: HashMap::new(),
                email_verified: true,
            },
            &key,
        )?)
        .await?
        .into_inner();
    for phone in ["", "0044", "+1-415-555-0100", long.as_str()] {
        let add = pb::AddPhoneRequest {
            tenant_id: s.tenant_id.clone(),
            user_id: user.id.clone(),
            phone: phone.into(),
        };
        expect(
            s.users.add_phone(req(add, &key)?).await.map(drop),
            Code::InvalidArgument,
            Some("phone"),
            "bad phone",
        )?;
    }
    let profile = pb::UpdateProfileRequest {
        tenant_id: s.tenant_id.clone(),
        user_id: user.id.clone(),
        attributes: HashMap::from([("given_name".to_string(), long.clone())]),
    };
    expect(
        s.users.update_profile(req(profile, &key)?).await.map(drop),
        Code::InvalidArgument,
        Some("attributes[given_name]"),
        "long attribute",
    )?;
    expect(
        s.users
            .verify_email(pb::VerifyEmailRequest {
                tenant_id: s.tenant_id.clone(),
                user_id: user.id.clone(),
                code: long.clone(),
            })
            .await
            .map(drop),
        Code::InvalidArgument,
        Some("code"),
        "long code",
    )?;
    expect(
        s.users
            .list_users(req(
                pb::ListUsersRequest {
                    tenant_id: s.tenant_id.clone(),
                    page_size: 10_000,
                    ..Default::default()
                },
                &key,
            )?)
            .await
            .map(drop),
        Code::InvalidArgument,
        Some("page_size"),
        "page size",
    )?;
    // Keyed RPCs need a key; self-service ones refuse a wrong one.
    let anonymous = s
        .users
        .get_user(pb::GetUserRequest {
            tenant_id: s.tenant_id.clone(),
            user_id: user.id.clone(),
        })
        .await;
    expect(
        anonymous.map(drop),
        Code::Unauthenticated,
        None,
        "get user without a key",
    )?;
    expect(
        s.users
            .sign_up(req(sign_up(&s, "ok@example.com", PASSWORD), "gh_wrong")?)
            .await
            .map(drop),
        Code::Unauthenticated,
        None,
        "sign-up with a wrong key",
    )?;
    // Nothing of the above was written: one user in the directory.
    let listed = s
        .users
        .list_users(req(
            pb::ListUsersRequest {
                tenant_id: s.tenant_id.clone(),
                ..Default::default()
            },
            &key,
        )?)
        .await?
        .into_inner();
    assert_eq!(listed.users.len(), 1);
    let _ = s.admin;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_client_signs_up_and_verifies_through_reflection() -> TestResult {
    let data = tempfile::tempdir()?;
    let server = Server::start(data.path(), None)?;
    let s = setup(&server).await?;
    let output = std::process::Command::new(support::python())
        .arg(support::tests_dir().join("python/sign_up_client.py"))
        .args([
            server.grpc.to_string(),
            s.tenant_id.clone(),
            s.client_id.clone(),
            s.key.clone(),
        ])
        .arg(data.path().join("outbox.ndjson"))
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "python client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("status: USER_STATUS_ACTIVE"), "{stdout}");
    Ok(())
}

/// Kills a child process when dropped.
struct Peer(std::process::Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16, Error> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The six-digit code in a message text.
fn code_in(text: &str) -> Option<String> {
    let start = text.find("code is ")? + "code is ".len();
    let code: String = text[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    (code.len() == 6).then_some(code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codes_travel_by_smtp_and_by_the_sms_webhook() -> TestResult {
    // The SMTP peer: aiosmtpd, a real SMTP server, filing each message in a maildir.
    let maildir = tempfile::tempdir()?;
    let smtp_port = free_port()?;
    let _smtp = Peer(
        std::process::Command::new(support::python())
            .args([
                "-m",
                "aiosmtpd",
                "-n",
                "-l",
                &format!("127.0.0.1:{smtp_port}"),
                "-c",
                "aiosmtpd.handlers.Mailbox",
            ])
            // A folder that does not exist yet: aiosmtpd creates the maildir inside.
            .arg(maildir.path().join("mail"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?,
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while std::net::TcpStream::connect(("127.0.0.1", smtp_port)).is_err() {
        if std::time::Instant::now() > deadline {
            return Err("aiosmtpd did not start".into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // The SMS peer: an HTTP endpoint recording each POST and its idempotency key.
    type Posts = std::sync::Arc<std::sync::Mutex<Vec<(String, serde_json::Value)>>>;
    let posts: Posts = Default::default();
    let recorder = posts.clone();
    let app = axum::Router::new().route(
        "/sms",
        axum::routing::post(
            move |headers: axum::http::HeaderMap,
                  axum::Json(body): axum::Json<serde_json::Value>| {
                let recorder = recorder.clone();
                async move {
                    let key = headers
                        .get("idempotency-key")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    if let Ok(mut posts) = recorder.lock() {
                        posts.push((key, body));
                    }
                    "queued"
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let webhook = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });

    let data = tempfile::tempdir()?;
    let smtp_url = format!("smtp://127.0.0.1:{smtp_port}");
    let webhook_url = format!("http://{webhook}/sms");
    let server = Server::start_with_env(
        data.path(),
        None,
        &[
            ("GATEHOUSE_SMTP_URL", smtp_url.as_str()),
            ("GATEHOUSE_SMTP_FROM", "no-reply@contoso.test"),
            ("GATEHOUSE_SMS_WEBHOOK_URL", webhook_url.as_str()),
        ],
    )?;
    let mut s = setup(&server).await?;

    // Email: the verification code arrives over SMTP.
    let signed_up = s
        .users
        .sign_up(sign_up(&s, "mail.me@example.com", PASSWORD))
        .await?
        .into_inner();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let mail = loop {
        let found = std::fs::read_dir(maildir.path().join("mail/new"))
            .into_iter()
            .flatten()
            .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path()).ok())
            .find(|text| text.contains("mail.me@example.com"));
        if let Some(text) = found {
            break text;
        }
        if std::time::Instant::now() > deadline {
            return Err("no email reached the SMTP server".into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(mail.contains("From: no-reply@contoso.test"), "{mail}");
    let code = code_in(&mail).ok_or("no code in the email")?;
    s.users
        .verify_email(pb::VerifyEmailRequest {
            tenant_id: s.tenant_id.clone(),
            user_id: signed_up.user_id.clone(),
            code,
        })
        .await?;

    // SMS: the phone code arrives at the webhook, keyed by the event id.
    s.users
        .add_phone(req(
            pb::AddPhoneRequest {
                tenant_id: s.tenant_id.clone(),
                user_id: signed_up.user_id.clone(),
                phone: "+14155550123".into(),
            },
            &s.key,
        )?)
        .await?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let (key, body) = loop {
        if let Some(post) = posts.lock().map_err(|_| "poisoned")?.first().cloned() {
            break post;
        }
        if std::time::Instant::now() > deadline {
            return Err("no SMS reached the webhook".into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(body["to"], "+14155550123");
    assert_eq!(
        body["id"].as_str(),
        Some(key.as_str()),
        "the idempotency key is the event id"
    );
    let code = code_in(body["body"].as_str().unwrap_or_default()).ok_or("no code in the SMS")?;
    let user = s
        .users
        .verify_phone(req(
            pb::VerifyPhoneRequest {
                tenant_id: s.tenant_id.clone(),
                user_id: signed_up.user_id.clone(),
                code,
            },
            &s.key,
        )?)
        .await?
        .into_inner();
    assert!(user.phone_verified && user.email_verified);
    assert!(
        support::outbox(data.path()).is_empty(),
        "with SMTP and a webhook configured, nothing goes to the file"
    );
    Ok(())
}
