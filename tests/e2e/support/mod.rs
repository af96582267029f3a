//! Running `gatehouse serve` as a real process for end-to-end tests.

#![allow(dead_code)]

pub mod oidc;
pub mod world;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// A request carrying `authorization: Bearer <key>`.
pub fn req<T>(message: T, key: &str) -> Result<tonic::Request<T>, Error> {
    let mut request = tonic::Request::new(message);
    let value = tonic::metadata::MetadataValue::try_from(format!("Bearer {key}"))?;
    request.metadata_mut().insert("authorization", value);
    Ok(request)
}

/// Checks that a call failed with `code` (and, when given, named `field` as bad).
pub fn expect(
    result: Result<(), tonic::Status>,
    code: tonic::Code,
    field: Option<&str>,
    case: &str,
) -> Result<(), Error> {
    let status = result.err().ok_or_else(|| format!("{case}: accepted"))?;
    if status.code() != code {
        return Err(format!("{case}: {:?} {}", status.code(), status.message()).into());
    }
    if let Some(field) = field
        && !bad_fields(&status).iter().any(|f| f == field)
    {
        return Err(format!("{case}: {field} not named in {:?}", bad_fields(&status)).into());
    }
    Ok(())
}

/// The fields a status names as bad (`google.rpc.BadRequest`).
pub fn bad_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_details_bad_request()
        .map(|bad| bad.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// Every risk detection recorded so far: each `RiskDetected` event and its payload.
pub async fn detections(
    store: &std::sync::Arc<dyn gatehouse_events::EventStore>,
) -> Result<Vec<(gatehouse_events::RecordedEvent, serde_json::Value)>, Error> {
    let filter = gatehouse_events::EventFilter {
        stream_types: vec!["detection".into()],
        ..gatehouse_events::EventFilter::default()
    };
    let batch = store.read_all(0, &filter, 10_000).await?;
    batch
        .events
        .into_iter()
        .map(|e| {
            let payload = serde_json::from_str(e.payload.get())?;
            Ok((e, payload))
        })
        .collect()
}

/// Paris, France.
pub const PARIS: &str = "127.0.0.61";
/// New York, United States: 5 837 km from Paris.
pub const NEW_YORK: &str = "127.0.0.62";
/// Japan, no coordinates known.
pub const JAPAN: &str = "127.0.0.63";

/// A GeoIP database in MaxMind format written by `mmdb-writer`, with coordinates and ASNs.
pub fn geoip_database(dir: &Path) -> Result<PathBuf, Error> {
    let mut writer = mmdb_writer::Writer::new("GeoIP2-City");
    let places = [
        (
            PARIS,
            serde_json::json!({"country": {"iso_code": "FR"}, "location": {"latitude": 48.8566, "longitude": 2.3522}, "autonomous_system_number": 3215}),
        ),
        (
            NEW_YORK,
            serde_json::json!({"country": {"iso_code": "US"}, "location": {"latitude": 40.7128, "longitude": -74.0060}, "autonomous_system_number": 7018}),
        ),
        (
            JAPAN,
            serde_json::json!({"country": {"iso_code": "JP"}, "autonomous_system_number": 2516}),
        ),
    ];
    for (ip, record) in places {
        writer.insert(
            format!("{ip}/32").parse::<mmdb_writer::ipnet::IpNet>()?,
            &record,
        )?;
    }
    let path = dir.join("city.mmdb");
    std::fs::write(&path, writer.to_bytes()?)?;
    Ok(path)
}

/// A running server process; killed when dropped.
pub struct Server {
    pub child: Child,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    /// Lines the server printed on stdout before it was ready.
    pub stdout: Vec<String>,
    /// How long it took from spawn to the ready line.
    pub startup: Duration,
}

impl Server {
    /// Starts `gatehouse serve` on free ports with `--data data` (and `--database-url` when
    /// given), and waits for its ready line.
    pub fn start(
        data: &Path,
        database_url: Option<&str>,
    ) -> Result<Server, Box<dyn std::error::Error + Send + Sync>> {
        Server::start_with_env(data, database_url, &[])
    }

    pub fn start_with_env(
        data: &Path,
        database_url: Option<&str>,
        env: &[(&str, &str)],
    ) -> Result<Server, Box<dyn std::error::Error + Send + Sync>> {
        let mut command = Command::new(env!("CARGO_BIN_EXE_gatehouse"));
        command
            .arg("serve")
            .arg("--breached-passwords")
            .arg(tests_dir().join("data/breached-sha1.txt"))
            .arg("--data")
            .arg(data)
            .args(["--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0"])
            .env_remove("GATEHOUSE_ADMIN_KEY")
            .env_remove("GATEHOUSE_DATABASE_URL")
            .env_remove("GATEHOUSE_MASTER_KEY")
            .env("GATEHOUSE_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(url) = database_url {
            command.arg("--database-url").arg(url);
        }
        for (key, value) in env {
            command.env(key, value);
        }
        let started = Instant::now();
        let mut child = command.spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (lines_tx, lines_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(line) => {
                        if lines_tx.send(line).is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        });
        let mut printed = Vec::new();
        loop {
            let line = lines_rx
                .recv_timeout(Duration::from_secs(60))
                .map_err(|_| {
                    let _ = child.kill();
                    format!("server not ready; it printed {printed:?}")
                })?;
            if let Some(rest) = line.strip_prefix("gatehouse ready ") {
                let mut grpc = None;
                let mut http = None;
                for part in rest.split_whitespace() {
                    if let Some(addr) = part.strip_prefix("grpc=") {
                        grpc = Some(addr.parse()?);
                    }
                    if let Some(addr) = part.strip_prefix("http=") {
                        http = Some(addr.parse()?);
                    }
                }
                let startup = started.elapsed();
                // Keep draining stdout so the server never blocks on a full pipe.
                std::thread::spawn(move || while lines_rx.recv().is_ok() {});
                return Ok(Server {
                    child,
                    grpc: grpc.ok_or("no grpc address")?,
                    http: http.ok_or("no http address")?,
                    stdout: printed,
                    startup,
                });
            }
            printed.push(line);
        }
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// The admin key the server printed on first start, if it did.
    pub fn printed_admin_key(&self) -> Option<String> {
        self.stdout
            .iter()
            .find(|line| line.starts_with("platform admin key"))
            .and_then(|line| line.rsplit(' ').next())
            .map(str::to_owned)
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn stop(
        mut self,
    ) -> Result<std::process::ExitStatus, Box<dyn std::error::Error + Send + Sync>> {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()?;
        if !status.success() {
            return Err("kill failed".into());
        }
        let asked = Instant::now();
        let deadline = asked + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait()? {
                eprintln!("server stopped {:?} after SIGTERM", asked.elapsed());
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return Err("server did not stop on SIGTERM".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A plain HTTP/1.1 GET: (status code, body).
    pub fn http_get(
        &self,
        path: &str,
    ) -> Result<(u16, String), Box<dyn std::error::Error + Send + Sync>> {
        let mut stream = TcpStream::connect(self.http)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.http
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let status = response
            .split_whitespace()
            .nth(1)
            .ok_or("no status")?
            .parse()?;
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The PostgreSQL URL of a fresh database, when the run has one.
pub async fn postgres_url() -> Result<Option<String>, Box<dyn std::error::Error + Send + Sync>> {
    Ok(gatehouse_events::testing::fresh_postgres_url().await?)
}

/// The Python interpreter with the black-box clients' packages (see test.sh).
pub fn python() -> PathBuf {
    std::env::var_os("GATEHOUSE_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("python3"))
}

/// Path of a file under the repository's `tests/` folder.
pub fn tests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests")
}

/// One line of the embedded outbox (`<data>/outbox.ndjson`).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Sent {
    pub id: String,
    pub channel: String,
    pub to: String,
    pub subject: String,
    pub body: String,
    pub code: Option<String>,
    pub tenant_id: String,
    pub user_id: String,
}

/// Everything delivered to the outbox so far.
pub fn outbox(data: &Path) -> Vec<Sent> {
    std::fs::read_to_string(data.join("outbox.ndjson"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// Waits (up to 15 s) for the `nth` (0-based) message to `to` and returns it.
pub fn wait_for_message(
    data: &Path,
    to: &str,
    nth: usize,
) -> Result<Sent, Box<dyn std::error::Error + Send + Sync>> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let sent: Vec<Sent> = outbox(data).into_iter().filter(|m| m.to == to).collect();
        if let Some(message) = sent.get(nth) {
            return Ok(message.clone());
        }
        if Instant::now() > deadline {
            return Err(format!("no message #{nth} to {to} in the outbox (has {sent:?})").into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
