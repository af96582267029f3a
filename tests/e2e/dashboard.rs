//! The dashboard in a real headless browser (Debian's Chromium, driven by `playwright-core`):
//! it loads, signs in with a tenant key, its charts render the seeded activity (checked
//! against the counts the test seeded), the sign-in log's outcome filter changes what is
//! shown, and a screenshot is saved (`target/tmp/dashboard.png`). The JSON API behind it
//! refuses a missing or foreign key.

use crate::support;

use chrono::{Duration as Span, Utc};
use gatehouse_events::{AppendRequest, ClientContext, Metadata, NewEvent, StreamId};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use support::world::{PASSWORD, World, completed, connect_from};
use support::{Error, NEW_YORK, PARIS, Server, TestResult, geoip_database};
use uuid::Uuid;

/// What the seeded history holds.
#[derive(Default, Debug)]
struct Truth {
    attempts: i64,
    failures: i64,
    by_country: BTreeMap<String, i64>,
    mfa: BTreeMap<String, i64>,
    detections: BTreeMap<String, i64>,
}

/// Synthetic flows and detections of the last 20 days, two apps, three countries.
async fn seed(
    store: &std::sync::Arc<dyn gatehouse_events::EventStore>,
    tenant: Uuid,
    apps: [Uuid; 2],
    truth: &mut Truth,
) -> TestResult {
    let countries = ["FR", "US", "JP"];
    for n in 0..120i64 {
        let user = Uuid::from_u128(1000 + (n % 17) as u128);
        let at = Utc::now() - Span::hours(1 + (n * 37) % (20 * 24));
        let country = countries[(n % 3) as usize];
        let mut append = AppendRequest::new(Metadata {
            context: Some(ClientContext {
                ip: Some(format!("198.51.100.{}", n % 250)),
                user_agent: None,
            }),
            ..Metadata::system()
        });
        append.recorded_at(at);
        let flow = StreamId::new("signin", Uuid::now_v7());
        let mut push = |event_type: &str, payload: Value| {
            append.push(NewEvent {
                tenant_id: tenant,
                stream: flow.clone(),
                event_type: event_type.into(),
                schema_version: 1,
                payload,
            });
        };
        push(
            "SignInStarted",
            json!({"application_id": apps[(n % 2) as usize], "client_id": "c", "method": "password",
                   "user_id": user, "lockout_id": user, "expires_at": at}),
        );
        push(
            "RiskAssessed",
            json!({"level": "none", "user_id": user, "properties":
                   {"location": {"country": country}, "browser": "Chrome", "os": "Windows"}}),
        );
        truth.attempts += 1;
        if n % 4 == 0 {
            let method = if n % 8 == 0 { "totp" } else { "sms" };
            push("MfaMethodSelected", json!({"method": method}));
            push("MfaVerified", json!({"method": method}));
            *truth.mfa.entry(method.into()).or_default() += 1;
        }
        if n % 6 == 5 {
            push("SignInFailed", json!({"reason": "account_disabled"}));
            truth.failures += 1;
        } else {
            push("SignInCompleted", json!({"session_id": Uuid::now_v7()}));
            *truth.by_country.entry(country.into()).or_default() += 1;
        }
        store.append(append).await?;
    }
    for (n, kind) in ["password_spray", "atypical_travel", "password_spray"]
        .iter()
        .enumerate()
    {
        let mut append = AppendRequest::new(Metadata::system());
        append.recorded_at(Utc::now() - Span::days(n as i64 + 1));
        append.push(NewEvent {
            tenant_id: tenant,
            stream: StreamId::new("detection", Uuid::now_v7()),
            event_type: "RiskDetected".into(),
            schema_version: 1,
            payload: json!({"kind": kind, "level": "medium"}),
        });
        store.append(append).await?;
        *truth.detections.entry(kind.to_string()).or_default() += 1;
    }
    Ok(())
}

/// A chart's labels and first dataset as a map.
fn chart(report: &Value, id: &str) -> Result<BTreeMap<String, i64>, Error> {
    let chart = &report["charts"][id];
    let labels = chart["labels"].as_array().ok_or(format!("no chart {id}"))?;
    let data = chart["data"][0]
        .as_array()
        .ok_or(format!("no data in {id}"))?;
    Ok(labels
        .iter()
        .zip(data)
        .map(|(l, v)| {
            (
                l.as_str().unwrap_or("").to_string(),
                v.as_i64().unwrap_or(0),
            )
        })
        .collect())
}

fn api_status(server: &Server, path: &str, key: Option<&str>) -> Result<u16, Error> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(server.http)?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response
        .split_whitespace()
        .nth(1)
        .ok_or("no status")?
        .parse()?)
}

async fn run(data: &Path) -> TestResult {
    let geoip = geoip_database(data)?;
    let server = Server::start_with_env(
        data,
        None,
        &[("GATEHOUSE_GEOIP_DATABASE", geoip.to_str().ok_or("path")?)],
    )?;
    let admin = server.printed_admin_key().ok_or("no admin key")?;
    let world = World::new(&server, &admin).await?;
    let other = World::new(&server, &admin).await?;
    let store =
        gatehouse_events::connect(&format!("sqlite://{}", data.join("events.db").display()))
            .await?;
    let tenant: Uuid = world.tenant_id.parse()?;
    let mut truth = Truth::default();
    seed(
        &store,
        tenant,
        [world.app_id.parse()?, Uuid::now_v7()],
        &mut truth,
    )
    .await?;
    // Real sign-ins too: two from France, one from the United States.
    world.create_user("dana@example.com", true).await?;
    for source in [PARIS, PARIS, NEW_YORK] {
        let from = World {
            channel: connect_from(&server, source).await?,
            ..world.clone()
        };
        let flow = from
            .start(
                "dana@example.com",
                gatehouse_proto::v1::PrimaryMethod::Password,
            )
            .await?;
        completed(&from.password(&flow, PASSWORD).await?)?;
        truth.attempts += 1;
        let country = if source == PARIS { "FR" } else { "US" };
        *truth.by_country.entry(country.into()).or_default() += 1;
    }

    // The JSON API: no key, a wrong key, another tenant's key.
    let summary = format!(
        "/api/insights/summary?tenant_id={}&from={}&to={}",
        world.tenant_id,
        (Utc::now() - Span::days(30)).format("%Y-%m-%dT%H:%M:%SZ"),
        (Utc::now() + Span::days(1)).format("%Y-%m-%dT%H:%M:%SZ"),
    );
    for (key, want, case) in [
        (None, 401, "no key"),
        (Some("gh_wrong"), 401, "a wrong key"),
        (Some(other.key.as_str()), 404, "another tenant's key"),
        (Some(world.key.as_str()), 200, "the tenant's key"),
    ] {
        let got = api_status(&server, &summary, key)?;
        if got != want {
            return Err(format!("{case}: HTTP {got}, expected {want}").into());
        }
    }

    // Wait until the projection has everything, through the API the page uses.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (status, body) = {
            use std::io::{Read, Write};
            let mut stream = std::net::TcpStream::connect(server.http)?;
            write!(
                stream,
                "GET {summary} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
                world.key
            )?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
            (
                response.split_whitespace().nth(1).unwrap_or("").to_string(),
                body,
            )
        };
        let attempts = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["attempts"].as_i64());
        if status == "200" && attempts == Some(truth.attempts) {
            break;
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "the summary never showed {} attempts: {body}",
                truth.attempts
            )
            .into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    let output = Command::new("node")
        .arg(support::tests_dir().join("browser/dashboard.mjs"))
        .arg(format!("http://{}/", server.http))
        .arg(&world.key)
        .arg(&screenshot)
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: Value = serde_json::from_str(stdout.trim()).map_err(|e| {
        format!(
            "dashboard.mjs printed {stdout:?} ({e}); stderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    if !output.status.success() || report["errors"].as_array().is_none_or(|e| !e.is_empty()) {
        return Err(format!("the browser reported {report}").into());
    }
    let first = &report["first"];
    for id in [
        "chart-signins",
        "chart-active",
        "chart-mfa",
        "chart-countries",
        "chart-apps",
        "chart-risk",
    ] {
        if first["charts"][id]["painted"].as_i64().unwrap_or(0) < 100 {
            return Err(format!("{id} drew nothing: {}", first["charts"][id]).into());
        }
    }
    if chart(first, "chart-countries")? != truth.by_country {
        return Err(format!(
            "countries chart {:?}, seeded {:?}",
            chart(first, "chart-countries")?,
            truth.by_country
        )
        .into());
    }
    if chart(first, "chart-mfa")? != truth.mfa {
        return Err(format!(
            "MFA chart {:?}, seeded {:?}",
            chart(first, "chart-mfa")?,
            truth.mfa
        )
        .into());
    }
    // Real sign-ins may add detections of their own (their timing is the detector's).
    let risk = chart(first, "chart-risk")?;
    if truth
        .detections
        .iter()
        .any(|(k, v)| risk.get(k).is_none_or(|got| got < v))
    {
        return Err(format!("risk chart {risk:?}, seeded {:?}", truth.detections).into());
    }
    let sum = |id: &str, dataset: usize| -> i64 {
        first["charts"][id]["data"][dataset]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_i64).sum())
            .unwrap_or(0)
    };
    if sum("chart-signins", 0) != truth.attempts || sum("chart-active", 0) == 0 {
        return Err(format!(
            "sign-ins chart {} attempts (seeded {}), active users {}",
            sum("chart-signins", 0),
            truth.attempts,
            sum("chart-active", 0)
        )
        .into());
    }
    let apps: i64 = chart(first, "chart-apps")?.values().sum();
    let successes: i64 = truth.by_country.values().sum();
    if apps != successes || first["summary"]["attempts"] != truth.attempts {
        return Err(format!("apps chart {apps}, summary {}", first["summary"]).into());
    }
    // The filter changed what the sign-in log shows: all failures, as many as were seeded.
    let outcomes = |r: &Value| -> Vec<String> {
        r["outcomes"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (before, after) = (outcomes(first), outcomes(&report["filtered"]));
    if !before.iter().any(|o| o == "success")
        || after.len() as i64 != truth.failures
        || after.iter().any(|o| o != "failure")
    {
        return Err(format!("sign-in log before {before:?}, after filtering {after:?}").into());
    }
    let size = std::fs::metadata(&screenshot)?.len();
    if size < 20_000 {
        return Err(format!("screenshot of {size} bytes").into());
    }
    eprintln!(
        "dashboard screenshot: {} ({size} bytes)",
        screenshot.display()
    );
    server.stop()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_chromium() -> TestResult {
    let dir = tempfile::tempdir()?;
    run(dir.path()).await
}
