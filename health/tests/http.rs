//! The HTTP endpoint against a fake source, over real loopback TCP.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vigil_health::http::{HttpConfig, HttpError, HttpServer, NowFn};
use vigil_health::model::{CellEntity, Entities, Health, HealthSource, HostInfo, VigilEntity};
use vigil_health::Metrics;
use vigil_timing::SlotTable;

struct Fake {
    health: Mutex<Health>,
    metrics: Metrics,
    table: SlotTable,
    last_now: AtomicU64,
}

impl HealthSource for Fake {
    fn health(&self) -> Health {
        self.health.lock().unwrap().clone()
    }
    fn entities(&self, now_ns: u64) -> Entities {
        self.last_now.store(now_ns, Ordering::SeqCst);
        Entities {
            host: HostInfo {
                hostname: "host-a".into(),
                version: "0.1.0".into(),
                uptime_ms: now_ns / 1_000_000,
            },
            vigil: VigilEntity::from_table(&self.table.snapshot_all()),
            cells: vec![CellEntity {
                cell_id: "cell-1".into(),
                run_id: "run-9".into(),
                state: "active".into(),
                last_frame_age_ms: Some(12),
                frames: 77,
                frames_per_sec: 3.5,
                silence_class: None,
                holds: 1,
                tasks: vec![],
            }],
        }
    }
    fn metrics(&self) -> String {
        self.metrics.render()
    }
}

async fn start() -> (HttpServer, Arc<Fake>) {
    let table = SlotTable::new(8).unwrap();
    let mut writer = table.register_writer("drain").unwrap();
    writer.start(1_000);
    writer.execution(500, 2_000);
    let fake = Arc::new(Fake {
        health: Mutex::new(Health::Ready),
        metrics: Metrics::new(),
        table,
        last_now: AtomicU64::new(0),
    });
    fake.metrics
        .register_cell("cell-1")
        .unwrap()
        .received(5, 500);
    fake.metrics.connection_closed("peer_closed");
    fake.metrics.observe_fsync(Duration::from_micros(300));
    let config = HttpConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        allow_non_loopback: false,
    };
    let now: NowFn = Arc::new(|| 5_000_000_000);
    let server = HttpServer::bind(&config, fake.clone(), now).await.unwrap();
    (server, fake)
}

/// Sends raw bytes, reads until the server closes; returns (status, headers, body).
fn raw(addr: SocketAddr, request: &[u8]) -> Option<(u16, HashMap<String, String>, String)> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut lines = head.split("\r\n");
    let code = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Some((code, headers, body.to_owned()))
}

fn get(addr: SocketAddr, method: &str, path: &str) -> (u16, HashMap<String, String>, String) {
    let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    tokio::task::block_in_place(|| raw(addr, req.as_bytes())).expect("an HTTP response")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_ready_degraded_starting() {
    let (server, fake) = start().await;
    let addr = server.local_addr();
    let (code, headers, body) = get(addr, "GET", "/healthz");
    assert_eq!(code, 200);
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(body, r#"{"status":"ready"}"#);

    *fake.health.lock().unwrap() = Health::Degraded {
        reasons: vec!["journal: no space left".into()],
    };
    let (code, _, body) = get(addr, "GET", "/healthz");
    assert_eq!(code, 503);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "degraded");
    assert_eq!(v["reasons"][0], "journal: no space left");

    *fake.health.lock().unwrap() = Health::Starting;
    let (code, _, body) = get(addr, "GET", "/healthz");
    assert_eq!(code, 503);
    assert_eq!(body, r#"{"status":"starting"}"#);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entities_shape() {
    let (server, fake) = start().await;
    let (code, _, body) = get(server.local_addr(), "GET", "/api/v1/entities");
    assert_eq!(code, 200);
    assert_eq!(
        fake.last_now.load(Ordering::SeqCst),
        5_000_000_000,
        "clock passed through"
    );
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["host"]["hostname"], "host-a");
    assert_eq!(v["host"]["uptimeMs"], 5_000);
    let task = &v["vigil"]["tasks"][0];
    assert_eq!(task["name"], "drain");
    assert_eq!(task["liveness"], "running");
    assert_eq!(task["executions"], 1);
    assert_eq!(task["ewmaDurationNs"], 500);
    let cell = &v["cells"][0];
    for key in [
        "cellId",
        "runId",
        "state",
        "lastFrameAgeMs",
        "frames",
        "framesPerSec",
        "silenceClass",
        "holds",
        "tasks",
    ] {
        assert!(cell.get(key).is_some(), "cell lacks {key}: {cell}");
    }
    assert_eq!(cell["cellId"], "cell-1");
    assert_eq!(cell["frames"], 77);
    // Round trip through the status client's types.
    let (health, entities) =
        tokio::task::block_in_place(|| vigil_health::fetch(server.local_addr())).unwrap();
    assert_eq!(health, Health::Ready);
    assert_eq!(entities.cells[0].holds, 1);
    assert_eq!(entities.vigil.tasks[0].name, "drain");
    let screen = vigil_health::render(&entities, &health);
    assert!(
        screen.contains("cell-1") && screen.contains("drain"),
        "{screen}"
    );
    server.shutdown().await;
}

/// An independent check of the Prometheus text format 0.0.4: every line is a comment, a
/// HELP/TYPE line, or `name{labels} value`; every sample belongs to a declared family (with
/// histogram suffixes); counters are named `*_total`; values parse as floats.
fn check_prometheus_text(text: &str) -> usize {
    let mut families: HashMap<String, String> = HashMap::new();
    let mut samples = 0;
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let keyword = parts.next().unwrap();
            let name = parts.next().unwrap_or_default();
            match keyword {
                "HELP" => assert!(valid_name(name), "bad HELP name in {line:?}"),
                "TYPE" => {
                    let t = parts.next().unwrap_or_default();
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&t),
                        "bad type in {line:?}"
                    );
                    if t == "counter" {
                        assert!(name.ends_with("_total"), "counter without _total: {line:?}");
                    }
                    assert!(
                        families.insert(name.to_owned(), t.to_owned()).is_none(),
                        "TYPE twice: {line:?}"
                    );
                }
                _ => {}
            }
            continue;
        }
        assert!(!line.starts_with('#'), "bad comment {line:?}");
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line:?}"));
        assert!(
            value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
            "bad value in {line:?}"
        );
        let name = match series.split_once('{') {
            Some((name, labels)) => {
                let labels = labels
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels: {line:?}"));
                for pair in labels.split(',').filter(|p| !p.is_empty()) {
                    let (k, v) = pair
                        .split_once('=')
                        .unwrap_or_else(|| panic!("bad label {pair:?}"));
                    assert!(valid_name(k), "bad label name {k:?}");
                    assert!(
                        v.len() >= 2 && v.starts_with('"') && v.ends_with('"'),
                        "bad label value {v:?}"
                    );
                }
                name
            }
            None => series,
        };
        assert!(valid_name(name), "bad metric name in {line:?}");
        let family = [
            name,
            name.trim_end_matches("_bucket"),
            name.trim_end_matches("_sum"),
            name.trim_end_matches("_count"),
        ]
        .into_iter()
        .find(|n| families.contains_key(*n))
        .unwrap_or_else(|| panic!("sample {name} of no declared family"));
        if family != name {
            assert_eq!(
                families[family], "histogram",
                "suffix on a non-histogram: {line:?}"
            );
        }
        samples += 1;
    }
    samples
}

fn valid_name(n: &str) -> bool {
    let mut chars = n.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_is_prometheus_text() {
    let (server, _fake) = start().await;
    let (code, headers, body) = get(server.local_addr(), "GET", "/metrics");
    assert_eq!(code, 200);
    assert_eq!(
        headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let samples = check_prometheus_text(&body);
    assert!(samples > 20, "only {samples} samples");
    assert!(body.contains("vigil_frames_received_total{cell=\"cell-1\"} 5\n"));
    assert!(body.contains("vigil_connection_closes_total{reason=\"peer_closed\"} 1\n"));
    assert!(body.contains("vigil_journal_fsync_seconds_bucket{le=\"0.0005\"} 1\n"));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_found_and_method_not_allowed() {
    let (server, _fake) = start().await;
    let addr = server.local_addr();
    assert_eq!(get(addr, "GET", "/nope").0, 404);
    assert_eq!(get(addr, "GET", "/healthz/extra").0, 404);
    let (code, headers, _) = get(addr, "POST", "/healthz");
    assert_eq!(code, 405);
    assert_eq!(headers["allow"], "GET, HEAD");
    assert_eq!(get(addr, "DELETE", "/metrics").0, 405);
    // A body is ignored.
    let req =
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";
    let (code, _, _) = tokio::task::block_in_place(|| raw(addr, req)).unwrap();
    assert_eq!(code, 405);
    let (code, _, body) = get(addr, "HEAD", "/healthz");
    assert_eq!(code, 200);
    assert!(body.is_empty());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_requests_do_not_hurt() {
    let (server, _fake) = start().await;
    let addr = server.local_addr();
    tokio::task::block_in_place(|| {
        let garbage = raw(addr, b"\x00\x01\x02 not http at all\r\n\r\n");
        assert_eq!(garbage.map(|g| g.0), Some(400), "garbage is answered 400");
        let mut huge = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', 64 * 1024));
        huge.extend_from_slice(b"\r\n\r\n");
        assert_eq!(
            raw(addr, &huge).map(|r| r.0),
            Some(431),
            "an oversized head is answered 431"
        );
        // Half a request then close.
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /hea").unwrap();
        drop(s);
    });
    // Still serving.
    assert_eq!(get(addr, "GET", "/healthz").0, 200);
    server.shutdown().await;
    assert!(
        TcpStream::connect(addr).is_err(),
        "listener closed after shutdown"
    );
}

#[tokio::test]
async fn non_loopback_needs_opt_in() {
    let fake: Arc<dyn HealthSource> = start_fake();
    let config = HttpConfig {
        addr: "0.0.0.0:0".parse().unwrap(),
        allow_non_loopback: false,
    };
    let now: NowFn = Arc::new(|| 0);
    let err = HttpServer::bind(&config, fake, now).await.unwrap_err();
    assert!(matches!(err, HttpError::NonLoopback { .. }), "{err}");
    assert_eq!(
        HttpConfig::default().addr.to_string(),
        vigil_health::DEFAULT_HTTP_ADDR
    );
}

fn start_fake() -> Arc<dyn HealthSource> {
    Arc::new(Fake {
        health: Mutex::new(Health::Ready),
        metrics: Metrics::new(),
        table: SlotTable::new(1).unwrap(),
        last_now: AtomicU64::new(0),
    })
}
