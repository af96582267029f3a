//! One typed configuration, from flags, environment (`GATEHOUSE_*`) and an optional TOML
//! file, in that order of precedence, with defaults that work out of the box.
//! `deploy/gatehouse.example.toml` documents every option.

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The `gatehouse` command line.
#[derive(Debug, Parser)]
#[command(
    name = "gatehouse",
    version,
    about = "Customer identity on an event log"
)]
pub struct Cli {
    /// TOML configuration file (flags and environment override it).
    #[arg(long, env = "GATEHOUSE_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (embedded SQLite store by default).
    Serve(Box<ServeArgs>),
    /// Apply the event store's migrations and exit.
    Migrate(StoreArgs),
    /// Measure the event store (see README, Benchmarks).
    Bench(BenchArgs),
    /// Audit the log: verify its hash chain, replay states and timelines, export and import.
    Audit(AuditArgs),
    /// Read models: their status, and rebuilding one from the log.
    Projections(ProjectionsArgs),
}

/// `gatehouse projections`.
#[derive(Debug, Args, Clone)]
pub struct ProjectionsArgs {
    /// Store location (the same options as `serve`).
    #[command(flatten)]
    pub store: StoreArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: ProjectionsCommand,
}

/// `gatehouse projections …`.
#[derive(Debug, Subcommand, Clone)]
pub enum ProjectionsCommand {
    /// Each projection's generation, position, lease and failure, as JSON lines.
    Status,
    /// Replays the log into fresh tables and swaps them in; the running server keeps serving
    /// the old ones until then, and continues on the new ones.
    Rebuild {
        /// The projection (see `status`).
        name: String,
    },
}

/// `gatehouse audit`.
#[derive(Debug, Args, Clone)]
pub struct AuditArgs {
    /// Store location (the same options as `serve`).
    #[command(flatten)]
    pub store: StoreArgs,
    /// The master key (base64url), to read personal data and derive the audit key
    /// [default: `<data>/master.key` when it exists; otherwise personal data stays redacted].
    #[arg(long, env = "GATEHOUSE_MASTER_KEY", hide_env_values = true)]
    pub master_key: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: AuditCommand,
}

/// `gatehouse audit …`.
#[derive(Debug, Subcommand, Clone)]
pub enum AuditCommand {
    /// Recompute the hash chain against its seals and signed checkpoints; exits 1 at the
    /// first broken link, which it names.
    Verify {
        /// Only this tenant's chain.
        #[arg(long)]
        tenant: Option<String>,
        /// Check checkpoint signatures with this Ed25519 public key (hex) instead of the one
        /// derived from the master key.
        #[arg(long)]
        public_key: Option<String>,
        /// Seal what is not sealed yet before verifying (as the server would within seconds).
        #[arg(long)]
        seal: bool,
    },
    /// An aggregate's state at a position or time, as JSON.
    State {
        /// Aggregate type: user, session, policy, userrisk, signin, tenant, …
        stream_type: String,
        /// Aggregate id.
        id: String,
        /// A position (digits) or an RFC 3339 time [default: now].
        #[arg(long, default_value = "")]
        at: String,
    },
    /// Every event touching a user, IP address, session or correlation id, one line each.
    Timeline {
        /// A user id.
        #[arg(long, group = "subject")]
        user: Option<String>,
        /// A client IP address.
        #[arg(long, group = "subject")]
        ip: Option<String>,
        /// A session id.
        #[arg(long, group = "subject")]
        session: Option<String>,
        /// A correlation id.
        #[arg(long, group = "subject")]
        correlation: Option<String>,
        /// Only this tenant's events.
        #[arg(long)]
        tenant: Option<String>,
        /// Print each event as JSON (NDJSON) instead of a line of text.
        #[arg(long)]
        json: bool,
    },
    /// Write a tenant's events (and its users' wrapped data keys) as NDJSON to stdout.
    Export {
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// RFC 3339: only events recorded at or after this time.
        #[arg(long)]
        from: Option<String>,
        /// RFC 3339: only events recorded before this time.
        #[arg(long)]
        to: Option<String>,
    },
    /// Read an export (a file, or `-` for stdin) into an empty store and seal it.
    Import {
        /// The NDJSON file.
        file: PathBuf,
    },
}

/// Where the event store lives.
#[derive(Debug, Args, Clone, Default)]
pub struct StoreArgs {
    /// Data directory: the SQLite store, `admin.key`, the outbox [default: ./data].
    #[arg(long, env = "GATEHOUSE_DATA")]
    pub data: Option<PathBuf>,
    /// `postgres://…` to use PostgreSQL instead of the embedded SQLite store.
    #[arg(long, env = "GATEHOUSE_DATABASE_URL")]
    pub database_url: Option<String>,
}

/// `gatehouse serve`.
#[derive(Debug, Args, Clone, Default)]
pub struct ServeArgs {
    /// Store location.
    #[command(flatten)]
    pub store: StoreArgs,
    /// gRPC listen address [default: 127.0.0.1:50051].
    #[arg(long, env = "GATEHOUSE_GRPC")]
    pub grpc: Option<SocketAddr>,
    /// HTTP listen address (health, metrics, OIDC) [default: 127.0.0.1:8080].
    #[arg(long, env = "GATEHOUSE_HTTP")]
    pub http: Option<SocketAddr>,
    /// Log format [default: text].
    #[arg(long, env = "GATEHOUSE_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Export traces (a span per gRPC call) to this OTLP/HTTP endpoint, e.g.
    /// `http://collector:4318/v1/traces` [default: none].
    #[arg(long, env = "GATEHOUSE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// The services this process runs (repeatable, or comma-separated) [default: all].
    #[arg(
        long = "service",
        env = "GATEHOUSE_SERVICES",
        value_enum,
        value_delimiter = ','
    )]
    pub services: Vec<Service>,
    /// Send email through this SMTP server (`smtp://user:pass@host:587?tls=required`,
    /// `smtps://…`); without it, email goes to `<data>/outbox.ndjson`.
    #[arg(long, env = "GATEHOUSE_SMTP_URL")]
    pub smtp_url: Option<String>,
    /// The From address of email [default: no-reply@gatehouse.invalid].
    #[arg(long, env = "GATEHOUSE_SMTP_FROM")]
    pub smtp_from: Option<String>,
    /// Send SMS by POSTing to this webhook; without it, SMS goes to `<data>/outbox.ndjson`.
    #[arg(long, env = "GATEHOUSE_SMS_WEBHOOK_URL")]
    pub sms_webhook_url: Option<String>,
    /// The public base URL of the HTTP side, used in token issuers
    /// (`<public_url>/tenants/<id>`) [default: http://<http address>].
    #[arg(long, env = "GATEHOUSE_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Seconds a flow's actor outlives its last message; a flow waiting longer than that is
    /// only its events until the next message rebuilds it [default: 30].
    #[arg(long, env = "GATEHOUSE_FLOW_IDLE_SECONDS")]
    pub flow_idle_seconds: Option<u32>,
    /// Seconds a sign-in flow may take before it expires [default: 600].
    #[arg(long, env = "GATEHOUSE_SIGN_IN_LIFETIME")]
    pub sign_in_lifetime: Option<u32>,
    /// Seconds an OpenID Connect authorization code can be exchanged [default: 60].
    #[arg(long, env = "GATEHOUSE_AUTHORIZATION_CODE_SECONDS")]
    pub authorization_code_seconds: Option<u32>,
    /// Breached-password list: one SHA-1 hex digest (optionally `:COUNT`) per line, as Have I
    /// Been Pwned publishes it; added to a small built-in list of common passwords.
    #[arg(long, env = "GATEHOUSE_BREACHED_PASSWORDS")]
    pub breached_passwords: Option<PathBuf>,
    /// GeoIP database (MaxMind format with `country.iso_code`, e.g. GeoLite2-Country) for
    /// country named locations; without it no address has a country.
    #[arg(long, env = "GATEHOUSE_GEOIP_DATABASE")]
    pub geoip_database: Option<PathBuf>,
    /// GeoIP ASN database (MaxMind format with `autonomous_system_number`, e.g.
    /// GeoLite2-ASN) for the network operator of unfamiliar sign-in properties.
    #[arg(long, env = "GATEHOUSE_GEOIP_ASN_DATABASE")]
    pub geoip_asn_database: Option<PathBuf>,
    /// NATS server (`nats://host:4222`) new risk detections are published to, on
    /// `risk.<tenant>.detection`; none by default.
    #[arg(long, env = "GATEHOUSE_NATS_URL")]
    pub nats_url: Option<String>,
    /// Relay the event log to the NATS server's JetStream stream `GATEHOUSE_EVENTS`, on
    /// `gatehouse.<tenant>.<stream type>.<event type>` (needs `--nats-url`).
    #[arg(long, env = "GATEHOUSE_RELAY_EVENTS")]
    pub relay_events: bool,
    /// Relay only these stream types (comma-separated) [default: every event].
    #[arg(long, env = "GATEHOUSE_RELAY_STREAM_TYPES", value_delimiter = ',')]
    pub relay_stream_types: Vec<String>,
    /// Seconds between signed checkpoints of the log's hash chain [default: 10].
    #[arg(long, env = "GATEHOUSE_INTEGRITY_CHECKPOINT_SECONDS")]
    pub integrity_checkpoint_seconds: Option<u64>,
    /// Proxies (CIDR ranges, comma-separated) whose `X-Forwarded-For` gives the client IP;
    /// without them the client IP is the connection's peer.
    #[arg(long, env = "GATEHOUSE_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<String>,
    /// Anonymiser ranges (Tor exits, proxies, VPN egress): one CIDR range or address per
    /// line; a sign-in from one is of medium risk. Reloaded when the file changes.
    #[arg(long, env = "GATEHOUSE_ANONYMOUS_IP_LIST")]
    pub anonymous_ip_list: Option<PathBuf>,
    /// Known-malicious ranges, same format; a sign-in from one is of high risk.
    #[arg(long, env = "GATEHOUSE_MALICIOUS_IP_LIST")]
    pub malicious_ip_list: Option<PathBuf>,
}

/// `gatehouse bench`.
#[derive(Debug, Args, Clone)]
pub struct BenchArgs {
    /// Which benchmark.
    #[arg(value_enum)]
    pub which: BenchKind,
    /// PostgreSQL server to measure (a scratch database is created and dropped);
    /// SQLite in a temporary directory otherwise.
    #[arg(long, env = "GATEHOUSE_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Print a JSON object as the last line.
    #[arg(long)]
    pub json: bool,
    /// Seconds per measured run (append).
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Events in the log (replay).
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Flows brought to the TOTP step (signin). Of the flows past the 200 left waiting, half
    /// make the closed loop: 3 000 gives it 1 400 steps, enough for its rate to settle.
    #[arg(long, default_value_t = 3000)]
    pub flows: usize,
    /// Pending flows for the memory measurement (signin).
    #[arg(long, default_value_t = 100_000)]
    pub pending: usize,
}

/// The benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchKind {
    /// Append throughput vs a raw multi-row INSERT.
    Append,
    /// Projection rebuild throughput vs a raw scan.
    Replay,
    /// Password sign-ins end to end vs raw argon2; commands without a password; memory.
    Signin,
    /// Conditional Access: one sign-in evaluated against 100 policies.
    Policy,
}

/// A service of Gatehouse: what `serve --service` runs. Each serves its gRPC services (and
/// HTTP routes) and runs its background workers; all of them read and write the one log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Service {
    /// Every service below.
    All,
    /// Tenants, applications, users, MFA enrolment, identity providers; the notifier.
    Directory,
    /// Sign-in flows, sessions, the OpenID Connect endpoints and hosted pages; flow deadlines.
    Signin,
    /// Conditional Access policies, named locations, groups, What If, Backtest.
    Policy,
    /// Identity Protection (RiskService); the offline detector.
    Risk,
    /// Projections, InsightsService and the dashboard.
    Insights,
    /// EventService, the sealer, the NATS relay.
    Events,
}

impl Service {
    /// Every service one process can run.
    pub const EACH: [Service; 6] = [
        Service::Directory,
        Service::Signin,
        Service::Policy,
        Service::Risk,
        Service::Insights,
        Service::Events,
    ];

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Service::All => "all",
            Service::Directory => "directory",
            Service::Signin => "signin",
            Service::Policy => "policy",
            Service::Risk => "risk",
            Service::Insights => "insights",
            Service::Events => "events",
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The configuration file. Unknown keys are an error, so a typo does not pass silently.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// See [`StoreArgs::data`].
    pub data: Option<PathBuf>,
    /// See [`StoreArgs::database_url`].
    pub database_url: Option<String>,
    /// See [`ServeArgs::grpc`].
    pub grpc: Option<SocketAddr>,
    /// See [`ServeArgs::http`].
    pub http: Option<SocketAddr>,
    /// See [`ServeArgs::log_format`].
    pub log_format: Option<LogFormat>,
    /// See [`ServeArgs::services`].
    pub services: Option<Vec<Service>>,
    /// See [`ServeArgs::otlp_endpoint`].
    pub otlp_endpoint: Option<String>,
    /// See [`ServeArgs::breached_passwords`].
    pub breached_passwords: Option<PathBuf>,
    /// See [`ServeArgs::geoip_database`].
    pub geoip_database: Option<PathBuf>,
    /// See [`ServeArgs::geoip_asn_database`].
    pub geoip_asn_database: Option<PathBuf>,
    /// See [`ServeArgs::nats_url`].
    pub nats_url: Option<String>,
    /// See [`ServeArgs::integrity_checkpoint_seconds`].
    pub integrity_checkpoint_seconds: Option<u64>,
    /// See [`ServeArgs::relay_events`].
    pub relay_events: Option<bool>,
    /// See [`ServeArgs::relay_stream_types`].
    pub relay_stream_types: Option<Vec<String>>,
    /// See [`ServeArgs::trusted_proxies`].
    pub trusted_proxies: Option<Vec<String>>,
    /// See [`ServeArgs::anonymous_ip_list`].
    pub anonymous_ip_list: Option<PathBuf>,
    /// See [`ServeArgs::malicious_ip_list`].
    pub malicious_ip_list: Option<PathBuf>,
    /// See [`ServeArgs::smtp_url`].
    pub smtp_url: Option<String>,
    /// See [`ServeArgs::smtp_from`].
    pub smtp_from: Option<String>,
    /// See [`ServeArgs::sms_webhook_url`].
    pub sms_webhook_url: Option<String>,
    /// See [`ServeArgs::public_url`].
    pub public_url: Option<String>,
    /// See [`ServeArgs::sign_in_lifetime`].
    pub sign_in_lifetime: Option<u32>,
    /// See [`ServeArgs::authorization_code_seconds`].
    pub authorization_code_seconds: Option<u32>,
    /// See [`ServeArgs::flow_idle_seconds`].
    pub flow_idle_seconds: Option<u32>,
}

impl FileConfig {
    /// Reads the file, or the defaults when there is none.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let Some(path) = path else {
            return Ok(FileConfig::default());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))
    }
}

/// The resolved configuration of `gatehouse serve`.
#[derive(Debug, Clone)]
pub struct Config {
    /// Data directory.
    pub data_dir: PathBuf,
    /// PostgreSQL URL, or `None` for the embedded SQLite store.
    pub database_url: Option<String>,
    /// gRPC listen address.
    pub grpc: SocketAddr,
    /// HTTP listen address.
    pub http: SocketAddr,
    /// Log format.
    pub log_format: LogFormat,
    /// OTLP/HTTP endpoint traces go to.
    pub otlp_endpoint: Option<String>,
    /// The services this process runs (never empty, never `All`: resolved to each).
    pub services: std::collections::BTreeSet<Service>,
    /// Platform admin key from `GATEHOUSE_ADMIN_KEY` (never from a flag or file).
    pub admin_key: Option<String>,
    /// Master key from `GATEHOUSE_MASTER_KEY` (base64url, 32 bytes), else `<data>/master.key`.
    pub master_key: Option<String>,
    /// Breached-password file.
    pub breached_passwords: Option<PathBuf>,
    /// GeoIP database.
    pub geoip_database: Option<PathBuf>,
    /// GeoIP ASN database.
    pub geoip_asn_database: Option<PathBuf>,
    /// NATS for risk detections and the event relay.
    pub nats_url: Option<String>,
    /// Relay the event log to NATS JetStream.
    pub relay_events: bool,
    /// Stream types the relay publishes (empty: all).
    pub relay_stream_types: Vec<String>,
    /// How often the sealer signs the chain heads that moved.
    pub integrity_checkpoint_every: std::time::Duration,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<String>,
    /// Anonymiser IP list file.
    pub anonymous_ip_list: Option<PathBuf>,
    /// Malicious IP list file.
    pub malicious_ip_list: Option<PathBuf>,
    /// SMTP server for email.
    pub smtp_url: Option<String>,
    /// From address of email.
    pub smtp_from: String,
    /// Webhook for SMS.
    pub sms_webhook_url: Option<String>,
    /// Public base URL of the HTTP side.
    pub public_url: Option<String>,
    /// Seconds a sign-in flow may take.
    pub sign_in_lifetime: u32,
    /// Seconds an authorization code can be exchanged.
    pub authorization_code_seconds: u32,
    /// Seconds a flow actor outlives its last message.
    pub flow_idle_seconds: u32,
}

impl Config {
    /// This process runs `service`.
    pub fn runs(&self, service: Service) -> bool {
        self.services.contains(&service)
    }

    /// Flags and environment first, then the file, then defaults.
    pub fn resolve(args: ServeArgs, file: FileConfig) -> anyhow::Result<Self> {
        let admin_key = std::env::var("GATEHOUSE_ADMIN_KEY")
            .ok()
            .filter(|k| !k.is_empty());
        if let Some(key) = &admin_key
            && (key.len() < 32 || key.len() > 256)
        {
            anyhow::bail!("GATEHOUSE_ADMIN_KEY must be 32 to 256 characters");
        }
        let nats_url = args.nats_url.or(file.nats_url).filter(|u| !u.is_empty());
        let relay_events = args.relay_events || file.relay_events.unwrap_or(false);
        if relay_events && nats_url.is_none() {
            anyhow::bail!("relay_events needs nats_url (the NATS server to relay to)");
        }
        Ok(Config {
            data_dir: args
                .store
                .data
                .or(file.data)
                .unwrap_or_else(|| PathBuf::from("data")),
            database_url: args
                .store
                .database_url
                .or(file.database_url)
                .filter(|u| !u.is_empty()),
            grpc: args
                .grpc
                .or(file.grpc)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 50051))),
            http: args
                .http
                .or(file.http)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080))),
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
            otlp_endpoint: args
                .otlp_endpoint
                .or(file.otlp_endpoint)
                .filter(|e| !e.is_empty()),
            services: {
                let named = if args.services.is_empty() {
                    file.services.unwrap_or_default()
                } else {
                    args.services
                };
                if named.is_empty() || named.contains(&Service::All) {
                    Service::EACH.into_iter().collect()
                } else {
                    named.into_iter().collect()
                }
            },
            admin_key,
            master_key: std::env::var("GATEHOUSE_MASTER_KEY")
                .ok()
                .filter(|k| !k.is_empty()),
            breached_passwords: args.breached_passwords.or(file.breached_passwords),
            geoip_database: args.geoip_database.or(file.geoip_database),
            geoip_asn_database: args.geoip_asn_database.or(file.geoip_asn_database),
            nats_url,
            relay_events,
            relay_stream_types: if args.relay_stream_types.is_empty() {
                file.relay_stream_types.unwrap_or_default()
            } else {
                args.relay_stream_types
            }
            .into_iter()
            .map(|kind| kind.trim().to_string())
            .filter(|kind| !kind.is_empty())
            .collect(),
            integrity_checkpoint_every: match args
                .integrity_checkpoint_seconds
                .or(file.integrity_checkpoint_seconds)
                .unwrap_or(10)
            {
                0 => anyhow::bail!("integrity_checkpoint_seconds must be at least 1"),
                seconds => std::time::Duration::from_secs(seconds),
            },
            anonymous_ip_list: args.anonymous_ip_list.or(file.anonymous_ip_list),
            malicious_ip_list: args.malicious_ip_list.or(file.malicious_ip_list),
            trusted_proxies: if args.trusted_proxies.is_empty() {
                file.trusted_proxies.unwrap_or_default()
            } else {
                args.trusted_proxies
            },
            smtp_url: args.smtp_url.or(file.smtp_url).filter(|u| !u.is_empty()),
            smtp_from: args
                .smtp_from
                .or(file.smtp_from)
                .unwrap_or_else(|| "no-reply@gatehouse.invalid".into()),
            sms_webhook_url: args
                .sms_webhook_url
                .or(file.sms_webhook_url)
                .filter(|u| !u.is_empty()),
            flow_idle_seconds: args
                .flow_idle_seconds
                .or(file.flow_idle_seconds)
                .unwrap_or(30)
                .clamp(1, 3600),
            authorization_code_seconds: match args
                .authorization_code_seconds
                .or(file.authorization_code_seconds)
            {
                Some(seconds) if !(1..=600).contains(&seconds) => {
                    anyhow::bail!("authorization_code_seconds must be 1 to 600 seconds")
                }
                Some(seconds) => seconds,
                None => 60,
            },
            sign_in_lifetime: match args.sign_in_lifetime.or(file.sign_in_lifetime) {
                Some(seconds) if !(1..=86_400).contains(&seconds) => {
                    anyhow::bail!("sign_in_lifetime must be 1 to 86400 seconds")
                }
                Some(seconds) => seconds,
                None => 600,
            },
            public_url: match args
                .public_url
                .or(file.public_url)
                .filter(|u| !u.is_empty())
            {
                Some(url) => {
                    let parsed = url::Url::parse(&url)
                        .map_err(|e| anyhow::anyhow!("public_url {url:?}: {e}"))?;
                    if !matches!(parsed.scheme(), "http" | "https") {
                        anyhow::bail!("public_url must be an http or https URL");
                    }
                    Some(url.trim_end_matches('/').to_string())
                }
                None => None,
            },
        })
    }

    /// The event store URL: PostgreSQL when configured, else SQLite in the data directory.
    pub fn store_url(&self) -> String {
        store_url(self.database_url.as_deref(), &self.data_dir)
    }
}

impl StoreArgs {
    /// The data directory and store URL, flags first, then the file, then `./data`.
    pub fn resolve(&self, file: &FileConfig) -> (PathBuf, String) {
        let data = self
            .data
            .clone()
            .or_else(|| file.data.clone())
            .unwrap_or_else(|| "data".into());
        let database_url = self
            .database_url
            .as_deref()
            .or(file.database_url.as_deref());
        let url = store_url(database_url, &data);
        (data, url)
    }
}

/// The event store URL for a data directory and an optional PostgreSQL URL.
pub fn store_url(database_url: Option<&str>, data_dir: &Path) -> String {
    match database_url {
        Some(url) => url.to_string(),
        None => format!("sqlite://{}", data_dir.join("events.db").display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Cli {
        Cli::parse_from(std::iter::once("gatehouse").chain(list.iter().copied()))
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("gatehouse.toml");
        std::fs::write(
            &path,
            "data = \"/srv/file\"\ngrpc = \"0.0.0.0:6000\"\nlog_format = \"json\"\n",
        )?;
        let cli = args(&[
            "--config",
            path.to_str().unwrap_or_default(),
            "serve",
            "--grpc",
            "127.0.0.1:7000",
        ]);
        let file = FileConfig::load(cli.config.as_deref())?;
        let Command::Serve(serve) = cli.command else {
            anyhow::bail!("not serve");
        };
        let config = Config::resolve(*serve, file)?;
        assert_eq!(config.grpc, "127.0.0.1:7000".parse()?, "the flag wins");
        assert_eq!(
            config.data_dir,
            PathBuf::from("/srv/file"),
            "the file beats the default"
        );
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(
            config.http,
            "127.0.0.1:8080".parse()?,
            "the default when nobody says"
        );
        assert_eq!(config.store_url(), "sqlite:///srv/file/events.db");
        Ok(())
    }

    #[test]
    fn a_typo_in_the_file_is_an_error() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("gatehouse.toml");
        std::fs::write(&path, "grcp = \"0.0.0.0:6000\"\n")?;
        let error = FileConfig::load(Some(&path))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("grcp"), "{error}");
        Ok(())
    }

    #[test]
    fn the_example_configuration_parses() -> anyhow::Result<()> {
        let example =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/gatehouse.example.toml");
        let file = FileConfig::load(Some(&example))?;
        assert_eq!(file.data, Some(PathBuf::from("data")));
        Ok(())
    }
}
