//! `cargo xtask bench silence`: drives the real `vigil run` binary.
//! 1. Idle CPU with 10,000 registered idle cells (AF_VSOCK cells with a 60 s window, so every
//!    deadline is pending during the measurement): CPU-seconds of the daemon over 20 s of wall
//!    time, from /proc/<pid>/stat.
//! 2. Detection latency: hybrid cells with a 1 s window get a few events each from
//!    `vigil emit`, then go quiet; for each `agent_silenced` in the journal, lateness =
//!    (elapsedMs − keepaliveWindowMs) + (recordedtime − time): from the deadline to the
//!    event made durable.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

const IDLE_CELLS: u32 = 10_000;
const LATENCY_CELLS: u32 = 50;

struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Ask for a clean stop (SIGTERM), then make sure.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
    }
}

fn start(vigil: &Path, dir: &Path, cells: &str) -> Result<Daemon> {
    let socket = dir.join("admin.sock");
    let cfg = format!(
        "host_name = \"bench\"\nstate_dir = \"{d}/state\"\n[listen]\nvsock = false\n[admin]\nsocket = \"{s}\"\n[journal]\ndir = \"{d}/journal\"\n[http]\naddr = \"\"\n{cells}",
        d = dir.display(),
        s = socket.display()
    );
    std::fs::write(dir.join("vigil.toml"), cfg)?;
    let child = Command::new(vigil)
        .args(["run", "--config"])
        .arg(dir.join("vigil.toml"))
        .env("VIGIL_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .context("starting vigil run")?;
    let d = Daemon { child, socket };
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        let ok = Command::new(vigil)
            .args(["ctl", "--socket"])
            .arg(&d.socket)
            .arg("ping")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(d);
        }
        if Instant::now() > deadline {
            bail!("vigil did not answer on its admin socket within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat
        .rsplit_once(") ")
        .map(|x| x.1)
        .context("bad /proc stat")?;
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    Ok(ticks / 100.0)
}

pub fn run(vigil: &Path) -> Result<String> {
    let base = std::env::temp_dir().join(format!("vigil-bench-silence-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base)?;
    let mut out = String::new();

    // 1. Idle CPU.
    let idle_dir = base.join("idle");
    std::fs::create_dir_all(&idle_dir)?;
    let mut cells = String::new();
    for i in 0..IDLE_CELLS {
        cells.push_str(&format!(
            "[[cell]]\ncell_id = \"idle-{i}\"\nrun_id = \"r1\"\ncid = {}\nkeepalive_ms = 60000\n",
            i + 3
        ));
    }
    let d = start(vigil, &idle_dir, &cells)?;
    std::thread::sleep(Duration::from_secs(2));
    let pid = d.child.id();
    let c0 = cpu_seconds(pid)?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(20));
    let c1 = cpu_seconds(pid)?;
    let wall = t0.elapsed().as_secs_f64();
    drop(d);
    let pct = (c1 - c0) / wall * 100.0;
    out.push_str("| measure | value | goal |\n|---|---:|---:|\n");
    out.push_str(&format!("| idle CPU, {IDLE_CELLS} registered idle cells (all deadlines pending), {wall:.0} s | {pct:.3} % of one core | < 1 % |\n"));

    // 2. Detection latency.
    let lat_dir = base.join("latency");
    std::fs::create_dir_all(&lat_dir)?;
    let mut cells = String::new();
    for i in 0..LATENCY_CELLS {
        cells.push_str(&format!("[[cell]]\ncell_id = \"lat-{i}\"\nrun_id = \"r1\"\nuds_path = \"{}/c{i}.vsock\"\nkeepalive_ms = 1000\n", lat_dir.display()));
    }
    let d = start(vigil, &lat_dir, &cells)?;
    for i in 0..LATENCY_CELLS {
        let st = Command::new(vigil)
            .args(["emit", "--unix"])
            .arg(lat_dir.join(format!("c{i}.vsock_7000")))
            .args(["--stream", "s", "--count", "5", "--ack-timeout-ms", "2000"])
            .stdout(Stdio::null())
            .status()?;
        if !st.success() {
            bail!("vigil emit to cell lat-{i} failed");
        }
    }
    std::thread::sleep(Duration::from_secs(3));
    drop(d);
    let tail = Command::new(vigil)
        .arg("tail")
        .arg(lat_dir.join("journal"))
        .args([
            "--type",
            "dev.vigil.cell.observability.v1.guest.agent_silenced",
        ])
        .output()?;
    let mut late_ms: Vec<f64> = Vec::new();
    for line in String::from_utf8_lossy(&tail.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let data = &v["data"];
        let over = data["elapsedMs"].as_f64().unwrap_or(0.0)
            - data["keepaliveWindowMs"].as_f64().unwrap_or(0.0);
        let t = parse_rfc3339_ns(v["time"].as_str().unwrap_or(""));
        let r = parse_rfc3339_ns(v["recordedtime"].as_str().unwrap_or(""));
        late_ms.push(over + (r - t) as f64 / 1e6);
    }
    if late_ms.len() != LATENCY_CELLS as usize {
        bail!(
            "expected {LATENCY_CELLS} agent_silenced events, found {}",
            late_ms.len()
        );
    }
    late_ms.sort_by(f64::total_cmp);
    let p = |q: f64| late_ms[((late_ms.len() - 1) as f64 * q).round() as usize];
    out.push_str(&format!("| detection latency past the window, deadline → journaled, {LATENCY_CELLS} cells: p50 | {:.2} ms | ≤ 10 ms |\n", p(0.5)));
    out.push_str(&format!(
        "| detection latency past the window: p99 | {:.2} ms | ≤ 10 ms |\n",
        p(0.99)
    ));
    let _ = std::fs::remove_dir_all(&base);
    Ok(out)
}

/// Nanoseconds of an RFC 3339 UTC time's time-of-day part (enough for differences within a
/// day, which is all the bench needs).
fn parse_rfc3339_ns(text: &str) -> i64 {
    let Some(clock) = text.split('T').nth(1) else {
        return 0;
    };
    let clock = clock.trim_end_matches('Z');
    let clock = clock.split('+').next().unwrap_or(clock);
    let mut parts = clock.split(':');
    let hours: i64 = parts.next().and_then(|x| x.parse().ok()).unwrap_or(0);
    let minutes: i64 = parts.next().and_then(|x| x.parse().ok()).unwrap_or(0);
    let seconds = parts.next().unwrap_or("0");
    let (whole, frac) = seconds.split_once('.').unwrap_or((seconds, "0"));
    let whole: i64 = whole.parse().unwrap_or(0);
    let frac = format!("{frac:0<9}");
    let nanos: i64 = frac[..9].parse().unwrap_or(0);
    ((hours * 60 + minutes) * 60 + whole) * 1_000_000_000 + nanos
}
