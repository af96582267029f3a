//! `gatehouse serve`: the services the configuration names (all by default) on one gRPC
//! port, their HTTP routes beside health and metrics, and their background workers.

use crate::config::{Config, LogFormat, Service};
use crate::dashboard;
use crate::event_service::EventApi;
use crate::http;
use crate::insights_service::Insights;
use gatehouse_core::KeyRing;
use gatehouse_core::crypto::Crypto;
use gatehouse_core::geo::Geo;
use gatehouse_core::keys::{Authenticate, AuthenticateIfPresent};
use gatehouse_core::net::Cidr;
use gatehouse_core::passwords::{BreachedPasswords, Passwords};
use gatehouse_core::platform::ensure_admin_key;
use gatehouse_directory::UserApi;
use gatehouse_directory::notifier::{self, ByChannel, NdjsonOutbox, SmtpSender, WebhookSender};
use gatehouse_directory::{ApplicationApi, IdentityProviderApi, TenantApi};
use gatehouse_events::integrity::Sealer;
use gatehouse_policy::{PolicyApi, PolicyView};
use gatehouse_projections::lease::WorkerLease;
use gatehouse_projections::runtime::Runner;
use gatehouse_proto::v1::application_service_server::ApplicationServiceServer;
use gatehouse_proto::v1::event_service_server::EventServiceServer;
use gatehouse_proto::v1::identity_provider_service_server::IdentityProviderServiceServer;
use gatehouse_proto::v1::insights_service_server::InsightsServiceServer;
use gatehouse_proto::v1::mfa_service_server::MfaServiceServer;
use gatehouse_proto::v1::policy_service_server::PolicyServiceServer;
use gatehouse_proto::v1::risk_service_server::RiskServiceServer;
use gatehouse_proto::v1::session_service_server::SessionServiceServer;
use gatehouse_proto::v1::sign_in_service_server::SignInServiceServer;
use gatehouse_proto::v1::tenant_service_server::TenantServiceServer;
use gatehouse_proto::v1::user_service_server::UserServiceServer;
use gatehouse_risk::RealtimeRisk;
use gatehouse_risk::publish::Publisher;
use gatehouse_risk::service::RiskApi;
use gatehouse_risk::view::RiskView;
use gatehouse_signin::federation::Federation;
use gatehouse_signin::oidc::Oidc;
use gatehouse_signin::{Deadlines, Directory, Engine, Flows, Keys, MfaApi, SessionApi, SignInApi};
use std::io::Write;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;
use tonic_health::ServingStatus;

/// How often overdue flows are looked for.
const DEADLINE_TICK: std::time::Duration = std::time::Duration::from_secs(1);

/// How long in-flight requests may take to finish after SIGTERM.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs the server until SIGTERM or Ctrl-C; in-flight requests get [`SHUTDOWN_GRACE`].
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let names: Vec<&str> = config.services.iter().map(|s| s.name()).collect();
    let tracer = init_logging(
        config.log_format,
        config.otlp_endpoint.as_deref(),
        &names.join("+"),
    )?;
    std::fs::create_dir_all(&config.data_dir)?;
    let store = gatehouse_events::connect(&config.store_url()).await?;
    tracing::info!(backend = store.backend(), "event store open");

    if let Some(key) = ensure_admin_key(store.as_ref(), config.admin_key.as_deref()).await? {
        let path = config.data_dir.join("admin.key");
        gatehouse_core::files::write_secret(&path, &key)?;
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
    let master_key = Crypto::load_master_key(config.master_key.as_deref(), &config.data_dir)?;
    let crypto = Arc::new(Crypto::new(master_key, store.clone()));
    let erasures = tokio::spawn(crypto.clone().follow_erasures());
    let breached = BreachedPasswords::load(config.breached_passwords.as_deref())?;
    let passwords = Passwords::new(breached);
    let users = Arc::new(UserApi::new(store.clone(), crypto.clone(), passwords.clone()).await?);

    let grpc_listener = TcpListener::bind(config.grpc).await?;
    let http_listener = TcpListener::bind(config.http).await?;
    let (grpc_addr, http_addr) = (grpc_listener.local_addr()?, http_listener.local_addr()?);
    let issuer_base = config
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{http_addr}"));
    let directory = Arc::new(Directory::new(store.clone()));
    let signing = Arc::new(Keys::new(
        store.clone(),
        crypto.clone(),
        issuer_base.clone(),
    ));
    let proxies = config
        .trusted_proxies
        .iter()
        .map(|range| Cidr::parse(range.trim()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("trusted proxies: {e}"))?;
    gatehouse_core::request::trust_proxies(proxies);
    let geo = Arc::new(
        Geo::open_optional(config.geoip_database.as_deref())
            .and_then(|geo| geo.with_asn_database(config.geoip_asn_database.as_deref()))
            .map_err(anyhow::Error::msg)?,
    );
    let risk = Arc::new(
        RealtimeRisk::watch(
            config.anonymous_ip_list.as_deref(),
            config.malicious_ip_list.as_deref(),
        )
        .map_err(anyhow::Error::msg)?,
    );
    let policy_view = Arc::new(PolicyView::start(store.clone()).await?);
    let risk_view = Arc::new(RiskView::start(store.clone()).await?);
    let policies = Arc::new(PolicyApi::new(
        store.clone(),
        policy_view.clone(),
        geo.clone(),
    ));
    let engine = Arc::new(
        Engine::new(
            store.clone(),
            crypto.clone(),
            passwords,
            signing.clone(),
            directory.clone(),
            policy_view,
        )
        .with_flow_lifetime(chrono::Duration::seconds(i64::from(
            config.sign_in_lifetime,
        )))
        .with_geo(geo)
        .with_risk(risk)
        .with_user_risk(risk_view.clone())
        .with_federation(Arc::new(Federation::new().map_err(anyhow::Error::msg)?)),
    );
    let identity_providers =
        Arc::new(IdentityProviderApi::new(store.clone(), crypto.clone()).await?);
    let idle = std::time::Duration::from_secs(u64::from(config.flow_idle_seconds));
    let flows = Arc::new(Flows::start(engine, idle).await?);
    // Overdue flows are ended by the signin service (every replica: one append wins).
    let deadlines = if config.runs(Service::Signin) {
        Some(Deadlines::start(store.clone(), flows.clone(), DEADLINE_TICK).await?)
    } else {
        None
    };
    let sign_in = Arc::new(SignInApi::new(flows.clone()));
    let mfa = Arc::new(MfaApi::new(
        store.clone(),
        crypto.clone(),
        directory.clone(),
    ));
    let sessions = Arc::new(
        SessionApi::new(
            store.clone(),
            crypto.clone(),
            signing.clone(),
            directory.clone(),
        )
        .await?
        .with_user_risk(risk_view.clone()),
    );
    // The OpenID Connect provider and its hosted pages drive the same flows.
    let hosted = Arc::new(crate::hosted::Hosted::new(
        Arc::new(
            Oidc::new(
                store.clone(),
                crypto.clone(),
                signing.clone(),
                directory.clone(),
                sessions.clone(),
            )
            .with_code_lifetime(chrono::Duration::seconds(i64::from(
                config.authorization_code_seconds,
            ))),
        ),
        flows,
        crypto.clone(),
        directory,
        users.clone(),
        identity_providers.clone(),
        issuer_base.starts_with("https://"),
    ));
    let events = Arc::new(EventApi::new(store.clone(), crypto.clone(), keys.clone())?);
    let insights = Insights::new(store.clone());
    // The sealer extends each tenant's hash chain within moments of a commit and signs the
    // heads with the audit key (every replica may run it: seals are deterministic).
    let audit_key = Arc::new(crypto.audit_key()?);
    // Background workers, each in the service that owns it. `workers` are aborted at exit.
    let mut workers: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    let owner = format!("{}-{}", std::process::id(), uuid::Uuid::now_v7());
    if config.runs(Service::Events) {
        workers.push(tokio::spawn(
            Sealer::new(store.clone(), Some(audit_key))
                .checkpoint_every(config.integrity_checkpoint_every)
                .run(),
        ));
    }
    if config.runs(Service::Directory) {
        // One replica delivers (a lease): two would race on one checkpoint and send twice.
        let (store, crypto, senders) = (store.clone(), crypto.clone(), senders(&config)?);
        let lease = WorkerLease::new(store.clone(), "notifier", owner.clone());
        workers.push(tokio::spawn(lease.run(move || {
            notifier::run(store.clone(), crypto.clone(), senders.clone())
        })));
    }
    // Read models: each projection runs in one replica at a time (a lease in the store); the
    // others stand by and take over when its lease runs out.
    let projection_runners: Vec<Arc<Runner>> = if config.runs(Service::Insights) {
        gatehouse_projections::all()
            .into_iter()
            .map(|factory| Arc::new(Runner::new(store.clone(), factory, owner.clone())))
            .collect()
    } else {
        Vec::new()
    };
    let projection_tasks: Vec<_> = projection_runners
        .iter()
        .map(|runner| {
            let runner = runner.clone();
            tokio::spawn(async move {
                let poison = runner.run().await;
                tracing::error!(
                    projection = runner.name(),
                    position = poison.position,
                    reason = %poison.reason,
                    "a projection stopped on an event it cannot apply; fix it and run \
                     `gatehouse projections rebuild`"
                );
            })
        })
        .collect();
    let risk_api = Arc::new(RiskApi::new(store.clone(), risk_view, sessions.clone()));
    let dashboard = crate::dashboard::Dashboard {
        keys: keys.clone(),
        insights: insights.clone(),
        risk: risk_api.clone(),
    };
    if config.runs(Service::Risk) {
        // Detections go to NATS when it is configured; a configured NATS that cannot be
        // reached stops the start (an operator asked for it).
        let publisher = match &config.nats_url {
            Some(url) => Some(Publisher::connect(url).await.map_err(anyhow::Error::msg)?),
            None => None,
        };
        // The risk detector follows the log in one replica (a lease). Its writes are
        // idempotent (a detection is recorded once whoever finds it), so a takeover's overlap
        // repeats work, never a detection; the lease saves the other replicas the work.
        let store = store.clone();
        let lease = WorkerLease::new(store.clone(), "detector", owner.clone());
        workers.push(tokio::spawn(lease.run(move || {
            gatehouse_risk::detector::run(store.clone(), publisher.clone())
        })));
    }
    // The event relay to JetStream, when asked for, in one replica (a lease): it reconnects
    // by itself, so a NATS that is down only delays it (its checkpoint is in the store).
    if let (Some(url), true, true) = (
        &config.nats_url,
        config.relay_events,
        config.runs(Service::Events),
    ) {
        let (store, url) = (store.clone(), url.clone());
        let filter = gatehouse_events::EventFilter {
            stream_types: config.relay_stream_types.clone(),
            ..gatehouse_events::EventFilter::default()
        };
        let lease = WorkerLease::new(store.clone(), "relay", owner.clone());
        workers.push(tokio::spawn(lease.run(move || {
            crate::relay::run(store.clone(), url.clone(), filter.clone())
        })));
    }

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    if config.runs(Service::Directory) {
        health_reporter
            .set_serving::<TenantServiceServer<TenantApi>>()
            .await;
        health_reporter
            .set_serving::<ApplicationServiceServer<ApplicationApi>>()
            .await;
        health_reporter
            .set_serving::<UserServiceServer<UserApi>>()
            .await;
        health_reporter
            .set_serving::<MfaServiceServer<MfaApi>>()
            .await;
        health_reporter
            .set_serving::<IdentityProviderServiceServer<IdentityProviderApi>>()
            .await;
    }
    if config.runs(Service::Signin) {
        health_reporter
            .set_serving::<SignInServiceServer<SignInApi>>()
            .await;
        health_reporter
            .set_serving::<SessionServiceServer<SessionApi>>()
            .await;
    }
    if config.runs(Service::Policy) {
        health_reporter
            .set_serving::<PolicyServiceServer<PolicyApi>>()
            .await;
    }
    if config.runs(Service::Risk) {
        health_reporter
            .set_serving::<RiskServiceServer<RiskApi>>()
            .await;
    }
    if config.runs(Service::Events) {
        health_reporter
            .set_serving::<EventServiceServer<EventApi>>()
            .await;
    }
    if config.runs(Service::Insights) {
        health_reporter
            .set_serving::<InsightsServiceServer<Insights>>()
            .await;
    }
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

    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_rx_grace = stop_rx.clone();

    let mut metrics = http::Metrics::new();
    let rpc_metrics = metrics.rpc();
    metrics.watch_projections(
        store.clone(),
        projection_runners
            .iter()
            .map(|runner| (runner.name(), runner.status()))
            .collect(),
    );
    if let Some(deadlines) = &deadlines {
        metrics.watch_flows(deadlines.open_flows());
    }
    if config.runs(Service::Directory) {
        metrics.watch_notifier(store.clone());
    }
    let metrics = Arc::new(metrics);
    let runs = |service| config.runs(service);
    let grpc = tonic::transport::Server::builder()
        .layer(crate::http::RpcMetricsLayer::new(rpc_metrics.clone()))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_optional_service(runs(Service::Directory).then(|| {
            InterceptedService::new(TenantServiceServer::from_arc(tenants), authenticate.clone())
        }))
        .add_optional_service(runs(Service::Directory).then(|| {
            InterceptedService::new(
                ApplicationServiceServer::from_arc(applications),
                authenticate.clone(),
            )
        }))
        // Sign-up and password reset are self-service: no key needed, a wrong key refused.
        .add_optional_service(runs(Service::Directory).then(|| {
            InterceptedService::new(
                UserServiceServer::from_arc(users),
                AuthenticateIfPresent(keys.clone()),
            )
        }))
        .add_optional_service(runs(Service::Directory).then(|| {
            InterceptedService::new(MfaServiceServer::from_arc(mfa), Authenticate(keys.clone()))
        }))
        .add_optional_service(runs(Service::Directory).then(|| {
            InterceptedService::new(
                IdentityProviderServiceServer::from_arc(identity_providers),
                Authenticate(keys.clone()),
            )
        }))
        // Sign-in and refresh are unauthenticated (scoped by tenant and client id).
        .add_optional_service(runs(Service::Signin).then(|| {
            InterceptedService::new(
                SignInServiceServer::from_arc(sign_in),
                AuthenticateIfPresent(keys.clone()),
            )
        }))
        .add_optional_service(runs(Service::Signin).then(|| {
            InterceptedService::new(
                SessionServiceServer::from_arc(sessions),
                AuthenticateIfPresent(keys.clone()),
            )
        }))
        .add_optional_service(runs(Service::Policy).then(|| {
            InterceptedService::new(
                PolicyServiceServer::from_arc(policies),
                Authenticate(keys.clone()),
            )
        }))
        .add_optional_service(runs(Service::Risk).then(|| {
            InterceptedService::new(
                RiskServiceServer::from_arc(risk_api.clone()),
                Authenticate(keys.clone()),
            )
        }))
        .add_optional_service(runs(Service::Events).then(|| {
            InterceptedService::new(
                EventServiceServer::from_arc(events),
                Authenticate(keys.clone()),
            )
        }))
        .add_optional_service(runs(Service::Insights).then(|| {
            InterceptedService::new(
                InsightsServiceServer::new(insights.clone()),
                Authenticate(keys.clone()),
            )
        }))
        .serve_with_incoming_shutdown(
            tokio_stream_listener(grpc_listener),
            stopped(stop_rx.clone()),
        );
    // Health and metrics everywhere; the issuers' endpoints with sign-in; the dashboard with
    // insights.
    let mut routes = http::router(metrics);
    if config.runs(Service::Signin) {
        routes = routes
            .merge(http::oidc_router(signing))
            .merge(crate::hosted::router(hosted));
    }
    if config.runs(Service::Insights) {
        routes = routes.merge(dashboard::router(dashboard));
    }
    let http = axum::serve(
        http_listener,
        routes.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(stopped(stop_rx));

    tracing::info!(%grpc_addr, %http_addr, services = ?names, "gatehouse ready");
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
    for task in workers.iter().chain(&projection_tasks) {
        task.abort();
    }
    // The workers' leases go back at once, so that a standby replica takes over without
    // waiting for them to run out (releasing one held by another replica changes nothing).
    for worker in ["notifier", "relay", "detector"] {
        let _ = WorkerLease::new(store.clone(), worker, owner.clone())
            .release()
            .await;
    }
    erasures.abort();
    // The last spans go out before the process does.
    if let Some(tracer) = tracer {
        let _ = tokio::task::spawn_blocking(move || tracer.shutdown()).await;
    }
    health_reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    Ok(())
}

/// SMTP and the SMS webhook when configured; the `<data>/outbox.ndjson` file otherwise.
fn senders(config: &Config) -> anyhow::Result<Arc<dyn notifier::Sender>> {
    let file: Arc<dyn notifier::Sender> =
        Arc::new(NdjsonOutbox::open(config.data_dir.join("outbox.ndjson"))?);
    let email: Arc<dyn notifier::Sender> = match &config.smtp_url {
        Some(url) => Arc::new(SmtpSender::new(url, &config.smtp_from).map_err(anyhow::Error::msg)?),
        None => file.clone(),
    };
    let sms: Arc<dyn notifier::Sender> = match &config.sms_webhook_url {
        Some(url) => Arc::new(WebhookSender::new(url).map_err(anyhow::Error::msg)?),
        None => file,
    };
    Ok(Arc::new(ByChannel { email, sms }))
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

/// Log lines on stderr (text or JSON), and spans to an OTLP collector when one is
/// configured; the tracer provider, to flush at exit.
fn init_logging(
    format: LogFormat,
    otlp: Option<&str>,
    services: &str,
) -> anyhow::Result<Option<opentelemetry_sdk::trace::SdkTracerProvider>> {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig;
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // GATEHOUSE_LOG filters the log lines only: spans are exported at info whatever it says.
    let filter = tracing_subscriber::EnvFilter::try_from_env("GATEHOUSE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let lines: Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync> =
        match format {
            LogFormat::Text => tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .boxed(),
            LogFormat::Json => tracing_subscriber::fmt::layer()
                .json()
                .with_writer(std::io::stderr)
                .boxed(),
        };
    let provider = match otlp {
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(endpoint)
                .build()
                .map_err(|e| anyhow::anyhow!("OTLP exporter for {endpoint}: {e}"))?;
            Some(
                opentelemetry_sdk::trace::SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(
                        opentelemetry_sdk::Resource::builder()
                            .with_service_name(format!("gatehouse-{services}"))
                            .build(),
                    )
                    .build(),
            )
        }
        None => None,
    };
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("gatehouse"))
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
    });
    let _ = tracing_subscriber::registry()
        .with(lines.with_filter(filter))
        .with(otel)
        .try_init();
    Ok(provider)
}
