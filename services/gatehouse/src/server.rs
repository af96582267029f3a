//! `gatehouse serve`: every service on one gRPC port, health and metrics on HTTP.

use crate::config::{Config, LogFormat};
use crate::http;
use gatehouse_core::KeyRing;
use gatehouse_core::keys::Authenticate;
use gatehouse_core::platform::ensure_admin_key;
use gatehouse_directory::{ApplicationApi, TenantApi};
use gatehouse_proto::v1::application_service_server::ApplicationServiceServer;
use gatehouse_proto::v1::tenant_service_server::TenantServiceServer;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;
use tonic_health::ServingStatus;

/// How long in-flight requests may take to finish after SIGTERM.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs the server until SIGTERM or Ctrl-C; in-flight requests get [`SHUTDOWN_GRACE`].
pub async fn serve(config: Config) -> anyhow::Result<()> {
    init_logging(config.log_format);
    std::fs::create_dir_all(&config.data_dir)?;
    let store = gatehouse_events::connect(&config.store_url()).await?;
    tracing::info!(backend = store.backend(), "event store open");

    if let Some(key) = ensure_admin_key(store.as_ref(), config.admin_key.as_deref()).await? {
        let path = config.data_dir.join("admin.key");
        write_secret(&path, &key)?;
        // Shown once: only its hash is stored.
        println!(
            "platform admin key (shown once; also written to {}): {key}",
            path.display()
        );
    }

    let keys = Arc::new(KeyRing::start(store.clone()).await?);
    let authenticate = Authenticate(keys.clone());
    let tenants = Arc::new(TenantApi::new(store.clone(), keys.clone()).await?);
    let applications = Arc::new(ApplicationApi::new(store.clone()).await?);

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<TenantServiceServer<TenantApi>>()
        .await;
    health_reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(gatehouse_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(gatehouse_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let grpc_listener = TcpListener::bind(config.grpc).await?;
    let http_listener = TcpListener::bind(config.http).await?;
    let (grpc_addr, http_addr) = (grpc_listener.local_addr()?, http_listener.local_addr()?);
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_rx_grace = stop_rx.clone();

    let grpc = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(InterceptedService::new(
            TenantServiceServer::from_arc(tenants),
            authenticate.clone(),
        ))
        .add_service(InterceptedService::new(
            ApplicationServiceServer::from_arc(applications),
            authenticate,
        ))
        .serve_with_incoming_shutdown(
            tokio_stream_listener(grpc_listener),
            stopped(stop_rx.clone()),
        );
    let metrics = Arc::new(http::Metrics::new());
    let http =
        axum::serve(http_listener, http::router(metrics)).with_graceful_shutdown(stopped(stop_rx));

    tracing::info!(%grpc_addr, %http_addr, "gatehouse ready");
    // A line that scripts and tests wait for.
    println!("gatehouse ready grpc={grpc_addr} http={http_addr}");
    let _ = std::io::stdout().flush();

    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    });
    let servers = async { tokio::join!(grpc, http) };
    tokio::pin!(servers);
    let finished = tokio::select! {
        finished = &mut servers => Some(finished),
        () = async {
            stopped(stop_rx_grace).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => None,
    };
    match finished {
        Some((grpc, http)) => {
            grpc?;
            http?;
        }
        None => {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "connections still open after the grace period; exiting")
        }
    }
    health_reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    Ok(())
}

fn tokio_stream_listener(
    listener: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| {
            let _ = stream.set_nodelay(true);
            stream
        });
        Some((accepted, listener))
    })
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Writes a secret readable by the owner only.
fn write_secret(path: &Path, secret: &str) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    writeln!(file, "{secret}")?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GATEHOUSE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
