//! `vigil status`: [`fetch`] reads `/healthz` and `/api/v1/entities` from a running daemon
//! over plain HTTP/1.1 (blocking std `TcpStream`, bounded reads and timeouts), and
//! [`render`] turns them into a text table of cells and of vigil's own tasks.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::model::{Entities, Health, TaskView};

/// Connect, read and write timeout of [`fetch`]: the daemon answers from memory, so a
/// second is generous; past it the command reports the daemon as unreachable.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(3);

/// Largest response accepted (an entity tree of thousands of cells is a few MiB); a larger
/// one is refused rather than buffered without bound.
pub const MAX_RESPONSE_BYTES: u64 = 32 * 1024 * 1024;

/// Errors of `vigil status`.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// Connecting, writing or reading failed.
    #[error("cannot talk to vigil at {addr}: {source}")]
    Io {
        /// Daemon address.
        addr: SocketAddr,
        /// OS error.
        source: std::io::Error,
    },
    /// The response was larger than [`MAX_RESPONSE_BYTES`].
    #[error("the response of {path} is over {MAX_RESPONSE_BYTES} bytes")]
    TooLarge {
        /// Request path.
        path: &'static str,
    },
    /// Not an HTTP/1.x response vigil would send.
    #[error("malformed HTTP response to {path}: {problem}")]
    Malformed {
        /// Request path.
        path: &'static str,
        /// What is wrong.
        problem: &'static str,
    },
    /// An unexpected status code.
    #[error("{path} answered HTTP {code}")]
    Status {
        /// Request path.
        path: &'static str,
        /// Status code.
        code: u16,
    },
    /// The body was not the expected JSON.
    #[error("the body of {path} is not the expected JSON: {source}")]
    Json {
        /// Request path.
        path: &'static str,
        /// Parser error.
        source: serde_json::Error,
    },
}

fn get(addr: SocketAddr, path: &'static str) -> Result<(u16, Vec<u8>), StatusError> {
    let io = |source| StatusError::Io { addr, source };
    let mut stream = TcpStream::connect_timeout(&addr, FETCH_TIMEOUT).map_err(io)?;
    stream.set_read_timeout(Some(FETCH_TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(FETCH_TIMEOUT)).map_err(io)?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).map_err(io)?;
    let mut raw = Vec::new();
    (&mut stream)
        .take(MAX_RESPONSE_BYTES + 1)
        .read_to_end(&mut raw)
        .map_err(io)?;
    if raw.len() as u64 > MAX_RESPONSE_BYTES {
        return Err(StatusError::TooLarge { path });
    }
    parse_response(path, &raw)
}

fn parse_response(path: &'static str, raw: &[u8]) -> Result<(u16, Vec<u8>), StatusError> {
    let malformed = |problem| StatusError::Malformed { path, problem };
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| malformed("no end of headers"))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| malformed("head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    if !parts.next().unwrap_or_default().starts_with("HTTP/1.") {
        return Err(malformed("not an HTTP/1.x status line"));
    }
    let code: u16 = parts
        .next()
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| malformed("bad status code"))?;
    let mut content_length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(malformed("bad header line"));
        };
        let name = name.trim().to_ascii_lowercase();
        if name == "transfer-encoding" {
            return Err(malformed("chunked bodies are not expected"));
        }
        if name == "content-length" {
            content_length = Some(
                value
                    .trim()
                    .parse::<usize>()
                    .map_err(|_| malformed("bad content-length"))?,
            );
        }
    }
    let body = &raw[end + 4..];
    let body = match content_length {
        Some(n) if n > body.len() => return Err(malformed("body shorter than content-length")),
        Some(n) => &body[..n],
        None => body,
    };
    Ok((code, body.to_vec()))
}

/// Reads health and the entity tree from the daemon's HTTP endpoint.
pub fn fetch(addr: SocketAddr) -> Result<(Health, Entities), StatusError> {
    let (code, body) = get(addr, "/healthz")?;
    if code != 200 && code != 503 {
        return Err(StatusError::Status {
            path: "/healthz",
            code,
        });
    }
    let health: Health = serde_json::from_slice(&body).map_err(|source| StatusError::Json {
        path: "/healthz",
        source,
    })?;
    let (code, body) = get(addr, "/api/v1/entities")?;
    if code != 200 {
        return Err(StatusError::Status {
            path: "/api/v1/entities",
            code,
        });
    }
    let entities: Entities = serde_json::from_slice(&body).map_err(|source| StatusError::Json {
        path: "/api/v1/entities",
        source,
    })?;
    Ok((health, entities))
}

fn age(ms: Option<u64>) -> String {
    match ms {
        None => "-".to_owned(),
        Some(ms) if ms < 1_000 => format!("{ms}ms"),
        Some(ms) if ms < 60_000 => format!("{:.1}s", ms as f64 / 1_000.0),
        Some(ms) if ms < 3_600_000 => format!("{}m{:02}s", ms / 60_000, (ms / 1_000) % 60),
        Some(ms) => format!("{}h{:02}m", ms / 3_600_000, (ms / 60_000) % 60),
    }
}

fn duration_ns(ns: Option<u64>) -> String {
    match ns {
        None => "-".to_owned(),
        Some(ns) if ns < 1_000 => format!("{ns}ns"),
        Some(ns) if ns < 1_000_000 => format!("{:.1}us", ns as f64 / 1e3),
        Some(ns) if ns < 1_000_000_000 => format!("{:.1}ms", ns as f64 / 1e6),
        Some(ns) => format!("{:.2}s", ns as f64 / 1e9),
    }
}

/// Lays out rows in left-aligned columns separated by two spaces.
fn table(out: &mut String, rows: &[Vec<String>]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                let pad = widths[c].saturating_sub(cell.chars().count());
                line.push_str(cell);
                line.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

fn task_rows(tasks: &[TaskView]) -> Vec<Vec<String>> {
    let mut rows = vec![vec![
        "TASK".to_owned(),
        "LIVENESS".to_owned(),
        "EXECS".to_owned(),
        "ERRORS".to_owned(),
        "EWMA".to_owned(),
        "MAX".to_owned(),
        "RATE".to_owned(),
    ]];
    for t in tasks {
        rows.push(vec![
            t.name.clone(),
            t.liveness.word().to_owned(),
            t.executions.to_string(),
            t.errors.to_string(),
            duration_ns(t.ewma_duration_ns),
            duration_ns(t.max_duration_ns),
            t.rate_hz
                .map_or_else(|| "-".to_owned(), |hz| format!("{hz:.1}Hz")),
        ]);
    }
    rows
}

/// Renders the status screen: health line, cells table, vigil's task table.
pub fn render(entities: &Entities, health: &Health) -> String {
    let mut out = String::new();
    let host = &entities.host;
    let _ = writeln!(
        out,
        "vigil {} on {}  up {}  health: {}",
        host.version,
        host.hostname,
        age(Some(host.uptime_ms)),
        health.word()
    );
    if let Health::Degraded { reasons } = health {
        for r in reasons {
            let _ = writeln!(out, "  - {r}");
        }
    }
    out.push('\n');
    let _ = writeln!(out, "CELLS ({})", entities.cells.len());
    if entities.cells.is_empty() {
        out.push_str("  (none registered)\n");
    } else {
        let mut rows = vec![vec![
            "CELL".to_owned(),
            "RUN".to_owned(),
            "STATE".to_owned(),
            "LAST FRAME".to_owned(),
            "FRAMES".to_owned(),
            "FRAMES/S".to_owned(),
            "SILENCE".to_owned(),
            "HOLDS".to_owned(),
        ]];
        for c in &entities.cells {
            rows.push(vec![
                c.cell_id.clone(),
                c.run_id.clone(),
                c.state.clone(),
                age(c.last_frame_age_ms),
                c.frames.to_string(),
                format!("{:.1}", c.frames_per_sec),
                c.silence_class.clone().unwrap_or_else(|| "-".to_owned()),
                c.holds.to_string(),
            ]);
        }
        table(&mut out, &rows);
    }
    out.push('\n');
    let _ = writeln!(out, "VIGIL TASKS ({})", entities.vigil.tasks.len());
    table(&mut out, &task_rows(&entities.vigil.tasks));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CellEntity, HostInfo, TaskLiveness, VigilEntity};

    fn sample() -> Entities {
        Entities {
            host: HostInfo {
                hostname: "h1".into(),
                version: "0.1.0".into(),
                uptime_ms: 3_723_000,
            },
            vigil: VigilEntity {
                tasks: vec![TaskView {
                    name: "drain".into(),
                    liveness: TaskLiveness::Running,
                    executions: 42,
                    ewma_duration_ns: Some(1_500),
                    max_duration_ns: Some(2_000_000),
                    rate_hz: Some(100.0),
                    ..TaskView::default()
                }],
                unregistered_observations: 0,
            },
            cells: vec![
                CellEntity {
                    cell_id: "web-1".into(),
                    run_id: "r7".into(),
                    state: "active".into(),
                    last_frame_age_ms: Some(250),
                    frames: 1000,
                    frames_per_sec: 12.5,
                    silence_class: None,
                    holds: 0,
                    tasks: vec![],
                },
                CellEntity {
                    cell_id: "db-long-name".into(),
                    run_id: "r1".into(),
                    state: "silent".into(),
                    last_frame_age_ms: Some(75_000),
                    frames: 3,
                    frames_per_sec: 0.0,
                    silence_class: Some("guest_silent".into()),
                    holds: 2,
                    tasks: vec![],
                },
            ],
        }
    }

    #[test]
    fn render_shows_cells_and_tasks_aligned() {
        let health = Health::Degraded {
            reasons: vec!["journal: disk full".into()],
        };
        let text = render(&sample(), &health);
        assert!(
            text.starts_with("vigil 0.1.0 on h1  up 1h02m  health: degraded\n"),
            "{text}"
        );
        assert!(text.contains("  - journal: disk full\n"));
        let lines: Vec<&str> = text.lines().collect();
        let header = lines.iter().find(|l| l.starts_with("CELL ")).unwrap();
        let web = lines.iter().find(|l| l.starts_with("web-1")).unwrap();
        let db = lines
            .iter()
            .find(|l| l.starts_with("db-long-name"))
            .unwrap();
        // Columns line up: STATE starts at the same offset on every row.
        let col = header.find("STATE").unwrap();
        assert_eq!(&web[col..col + 6], "active");
        assert_eq!(&db[col..col + 6], "silent");
        assert!(web.contains("250ms") && web.contains("12.5"));
        assert!(db.contains("1m15s") && db.contains("guest_silent"));
        assert!(db.trim_end().ends_with('2'));
        let drain = lines.iter().find(|l| l.starts_with("drain")).unwrap();
        assert!(drain.contains("running") && drain.contains("1.5us"));
        assert!(drain.contains("2.0ms") && drain.ends_with("100.0Hz"));
    }

    #[test]
    fn render_empty() {
        let text = render(&Entities::default(), &Health::Starting);
        assert!(text.contains("health: starting"));
        assert!(text.contains("CELLS (0)\n  (none registered)"));
    }

    #[test]
    fn parse_response_checks_shape() {
        let ok = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 5\r\n\r\nhello-extra";
        assert_eq!(parse_response("/x", ok).unwrap(), (503, b"hello".to_vec()));
        assert!(matches!(
            parse_response("/x", b"garbage"),
            Err(StatusError::Malformed { .. })
        ));
        assert!(matches!(
            parse_response("/x", b"HTTP/1.1 200 OK\r\ncontent-length: 99\r\n\r\nab"),
            Err(StatusError::Malformed { .. })
        ));
        assert!(matches!(
            parse_response("/x", b"SSH-2.0 200\r\n\r\n"),
            Err(StatusError::Malformed { .. })
        ));
    }
}
