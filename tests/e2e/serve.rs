//! `gatehouse serve` as a fresh clone runs it: an empty data directory, healthy within
//! seconds, reflection and health served, the admin key created once and enforced.

use crate::support;

use gatehouse_proto::v1::tenant_service_client::TenantServiceClient;
use gatehouse_proto::v1::{CreateTenantRequest, GetTenantRequest, ListTenantsRequest};
use support::{Server, TestResult, req};
use tonic::Code;

async fn check_a_fresh_server(database_url: Option<String>) -> TestResult {
    let data = tempfile::tempdir()?;
    let server = Server::start(data.path(), database_url.as_deref())?;
    assert!(
        server.startup.as_secs() < 30,
        "took {:?} to become ready",
        server.startup
    );

    // The admin key: printed once, written to admin.key with mode 0600.
    let key = server
        .printed_admin_key()
        .ok_or("no admin key printed on first start")?;
    let key_file = data.path().join("admin.key");
    assert_eq!(std::fs::read_to_string(&key_file)?.trim(), key);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&key_file)?.permissions().mode() & 0o777,
            0o600
        );
    }

    // Health over gRPC and HTTP; metrics.
    let channel = tonic::transport::Endpoint::from_shared(server.grpc_url())?
        .connect()
        .await?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in [
        "",
        "gatehouse.v1.TenantService",
        "gatehouse.v1.ApplicationService",
        "gatehouse.v1.UserService",
    ] {
        let request = tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        };
        let status = health.check(request).await?.into_inner().status;
        let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
        assert_eq!(status, serving, "health of {service:?}");
    }
    let (code, body) = server.http_get("/healthz")?;
    assert_eq!((code, body.trim()), (200, "ok"));
    let (code, metrics) = server.http_get("/metrics")?;
    assert_eq!(code, 200);
    assert!(metrics.contains("gatehouse_uptime_seconds"), "{metrics}");

    // The admin key works; a wrong key and no key are UNAUTHENTICATED.
    let mut tenants = TenantServiceClient::new(channel);
    let created = tenants
        .create_tenant(req(
            CreateTenantRequest {
                display_name: "Contoso Insurance".into(),
                settings: None,
            },
            &key,
        )?)
        .await?
        .into_inner();
    assert_eq!(created.display_name, "Contoso Insurance");
    let listed = tenants
        .list_tenants(req(ListTenantsRequest::default(), &key)?)
        .await?
        .into_inner();
    assert_eq!(listed.tenants.len(), 1);
    let wrong = tenants
        .list_tenants(req(ListTenantsRequest::default(), "gh_not-a-real-key")?)
        .await;
    assert_eq!(wrong.err().map(|s| s.code()), Some(Code::Unauthenticated));
    let missing = tenants.list_tenants(ListTenantsRequest::default()).await;
    assert_eq!(missing.err().map(|s| s.code()), Some(Code::Unauthenticated));
    let bad = tenants
        .create_tenant(req(
            CreateTenantRequest {
                display_name: " ".into(),
                settings: None,
            },
            &key,
        )?)
        .await;
    assert_eq!(bad.err().map(|s| s.code()), Some(Code::InvalidArgument));

    // Graceful stop; a restart keeps the key (not printed again) and the tenant.
    drop((health, tenants));
    assert!(
        server.stop()?.success(),
        "gatehouse serve must exit cleanly on SIGTERM"
    );
    let again = Server::start(data.path(), database_url.as_deref())?;
    assert_eq!(
        again.printed_admin_key(),
        None,
        "the admin key is shown only once"
    );
    let channel = tonic::transport::Endpoint::from_shared(again.grpc_url())?
        .connect()
        .await?;
    let mut tenants = TenantServiceClient::new(channel);
    let fetched = tenants
        .get_tenant(req(
            GetTenantRequest {
                tenant_id: created.id.clone(),
            },
            &key,
        )?)
        .await?
        .into_inner();
    assert_eq!(fetched, created);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_embedded_server_is_healthy_and_guards_its_api() -> TestResult {
    check_a_fresh_server(None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_postgres_server_is_healthy_and_guards_its_api() -> TestResult {
    match support::postgres_url().await? {
        Some(url) => check_a_fresh_server(Some(url)).await,
        None => Ok(()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_key_from_the_environment_is_used_and_not_printed() -> TestResult {
    let data = tempfile::tempdir()?;
    let key = "operator-chosen-admin-key-0123456789abcdef";
    let server = Server::start_with_env(data.path(), None, &[("GATEHOUSE_ADMIN_KEY", key)])?;
    assert_eq!(server.printed_admin_key(), None);
    assert!(!data.path().join("admin.key").exists());
    let channel = tonic::transport::Endpoint::from_shared(server.grpc_url())?
        .connect()
        .await?;
    let mut tenants = TenantServiceClient::new(channel);
    tenants
        .list_tenants(req(ListTenantsRequest::default(), key)?)
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_client_finds_the_services_through_reflection() -> TestResult {
    let data = tempfile::tempdir()?;
    let server = Server::start(data.path(), None)?;
    let key = server.printed_admin_key().ok_or("no admin key")?;
    let output = std::process::Command::new(support::python())
        .arg(support::tests_dir().join("python/reflection_client.py"))
        .arg(server.grpc.to_string())
        .arg(&key)
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "python client failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("v1 services: ") && stdout.contains("gatehouse.v1.TenantService"),
        "{stdout}"
    );
    assert!(stdout.contains("v1alpha services: "), "{stdout}");
    Ok(())
}

#[test]
fn migrate_applies_the_migrations_and_exits() -> TestResult {
    let data = tempfile::tempdir()?;
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .arg("migrate")
        .arg("--data")
        .arg(data.path())
        .env_remove("GATEHOUSE_DATABASE_URL")
        .output()?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("migrations applied (sqlite store)"));
    assert!(data.path().join("events.db").exists());
    Ok(())
}

/// A collector that keeps what is POSTed to it: (path, content type, body).
type Received = std::sync::Arc<std::sync::Mutex<Vec<(String, String, Vec<u8>)>>>;

/// An OTLP/HTTP collector for the test: answers 200 to every POST and keeps the request.
fn collector() -> Result<(String, Received), Box<dyn std::error::Error + Send + Sync>> {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let url = format!("http://{}/v1/traces", listener.local_addr()?);
    let received: Received = Default::default();
    let keep = received.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { break };
            let mut reader = BufReader::new(stream);
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let (mut length, mut content_type) = (0usize, String::new());
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() || line.trim().is_empty() {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if let Some(value) = lower.strip_prefix("content-length:") {
                    length = value.trim().parse().unwrap_or(0);
                }
                if let Some(value) = lower.strip_prefix("content-type:") {
                    content_type = value.trim().to_string();
                }
            }
            let mut body = vec![0u8; length];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            let path = request_line
                .split_whitespace()
                .nth(1)
                .unwrap_or("")
                .to_string();
            if let Ok(mut all) = keep.lock() {
                all.push((path, content_type, body));
            }
            let mut stream = reader.into_inner();
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    Ok((url, received))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_go_to_an_otlp_collector() -> TestResult {
    let (url, received) = collector()?;
    let data = tempfile::tempdir()?;
    let server = Server::start_with_env(data.path(), None, &[("GATEHOUSE_OTLP_ENDPOINT", &url)])?;
    let key = server.printed_admin_key().ok_or("no admin key")?;
    let mut tenants = TenantServiceClient::new(support::world::connect(&server).await?);
    let mut request = req(
        CreateTenantRequest {
            display_name: "Traced".into(),
            settings: None,
        },
        &key,
    )?;
    let correlation = "01a21c00-0000-7000-8000-000000000001";
    request
        .metadata_mut()
        .insert("x-correlation-id", correlation.parse()?);
    tenants.create_tenant(request).await?;
    // SIGTERM flushes the batch of spans before the process exits.
    let status = server.stop()?;
    assert!(status.success(), "the server exited with {status}");
    let received = received.lock().map_err(|_| "poisoned")?.clone();
    let found = received.iter().any(|(path, content_type, body)| {
        let contains = |needle: &str| body.windows(needle.len()).any(|w| w == needle.as_bytes());
        path == "/v1/traces"
            && content_type == "application/x-protobuf"
            && contains("gatehouse.v1.TenantService/CreateTenant")
            && contains(correlation)
            && contains("gatehouse-")
    });
    if !found {
        return Err(format!(
            "no span of CreateTenant among {} exports: {:?}",
            received.len(),
            received
                .iter()
                .map(|(p, c, b)| (p.clone(), c.clone(), b.len()))
                .collect::<Vec<_>>()
        )
        .into());
    }
    Ok(())
}
