//! `vmtest-guest`: the program `/init` runs inside the test VM. It refuses to run unless the
//! kernel command line carries the harness token, then runs each requested scenario and
//! reports it on the console with `VMTEST BEGIN`/`VMTEST END` markers, then `VMTEST DONE`.
//! Scenarios drive the real `vigil` binary (at `/bin/vigil`) through its command line.

use std::fmt::{Display, Write as _};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vmtest::guard::{self, pattern_byte, GuardError, HYBRID_BYTES, HYBRID_PORT, HYBRID_WRITE};
use vmtest::markers::{format_begin, format_end, Outcome, DONE};
use vmtest::vsock::{self, VsockError, VsockListener};

/// Where the harness puts the vigil binary in the initramfs.
const VIGIL_BIN: &str = "/bin/vigil";
/// vsock port vigil listens on in the scenarios (the contract's example config).
const VIGIL_PORT: u32 = 7000;
/// Port of the vsock-smoke listener (any free port; nothing else listens in the guest).
const SMOKE_PORT: u32 = 5555;
/// Bytes moved by vsock-smoke: 1 MiB, enough for many credit updates on the loopback.
const SMOKE_BYTES: usize = 1 << 20;
/// Emitters and events per emitter in `ingest` (the brief's 4 × 2,000).
const INGEST_EMITTERS: usize = 4;
const INGEST_EVENTS: u64 = 2_000;
/// Frames per write for emitters: batching keeps 6.12's small-packet reset away.
const EMIT_BATCH: u32 = 16;
/// Payload size used in kernel-stats, so the expected byte total is known.
const STATS_PAYLOAD: u64 = 200;
/// Events of the emitter that kernel-stats SIGKILLs mid-stream: far more than it sends in
/// the second or so before the kill (if it ever finishes first, the scenario says so).
const KILLED_EMITTER_EVENTS: u64 = 1_000_000;
/// How long to wait for `vigil ctl ping` to answer `ok` (TCG is slow to start a daemon).
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// Upper bound for any single vigil command (emit of 2,000 events under TCG included).
const COMMAND_TIMEOUT: Duration = Duration::from_mins(4);
/// How long a SIGTERMed `vigil run` may take to exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to poll the peers table for an expected change.
const PEERS_POLL_TIMEOUT: Duration = Duration::from_secs(30);
/// Interval between polls (of ping, peers, child exit).
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Why a scenario did not pass.
#[derive(Debug, thiserror::Error)]
enum ScenarioError {
    #[error("skipped: {0}")]
    Skip(&'static str),
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error(transparent)]
    Guard(#[from] GuardError),
    #[error("{what} failed: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{what}: expected {expected}, got {got}")]
    Mismatch {
        what: &'static str,
        expected: String,
        got: String,
    },
    #[error("`vigil {cmd}` exited with {status}: {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("`vigil {cmd}` did not finish within {secs} s")]
    Timeout { cmd: String, secs: u64 },
    #[error("`vigil {cmd}` printed no JSON ({line:?}): {source}")]
    Json {
        cmd: String,
        line: String,
        source: serde_json::Error,
    },
    #[error("{what} did not happen within {secs} s (last seen: {last})")]
    NeverHappened {
        what: &'static str,
        secs: u64,
        last: String,
    },
}

type Res<T> = Result<T, ScenarioError>;

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> ScenarioError {
    move |source| ScenarioError::Io { what, source }
}

fn mismatch(what: &'static str, expected: impl Display, got: impl Display) -> ScenarioError {
    ScenarioError::Mismatch {
        what,
        expected: expected.to_string(),
        got: got.to_string(),
    }
}

fn main() -> ExitCode {
    let cmdline = match guard::read_cmdline() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmtest-guest: {e}");
            return ExitCode::from(2);
        }
    };
    if !guard::cmdline_has_token(&cmdline) {
        eprintln!("vmtest-guest: {}", GuardError::NotTestVm);
        return ExitCode::from(2);
    }
    let mut failed = false;
    for name in guard::scenarios_from_cmdline(&cmdline) {
        println!("{}", format_begin(&name));
        let started = Instant::now();
        let result = run_scenario(&name);
        let secs = started.elapsed().as_secs_f64();
        let (outcome, reason) = match result {
            Ok(detail) => (Outcome::Pass, format!("{detail} ({secs:.1} s)")),
            Err(ScenarioError::Skip(why)) => (Outcome::Skip, why.to_string()),
            Err(e) => (Outcome::Fail, format!("{e} ({secs:.1} s)")),
        };
        failed |= outcome == Outcome::Fail;
        println!("{}", format_end(&name, outcome, &reason));
    }
    println!("{DONE}");
    let _ = std::io::stdout().flush();
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn run_scenario(name: &str) -> Res<String> {
    match name {
        "vsock-smoke" => vsock_smoke(),
        "ingest" => ingest(),
        "kernel-stats" => kernel_stats(),
        "identity" => identity(),
        "silence" => silence(),
        "killswitch" => killswitch(),
        guard::HYBRID_SCENARIO => hybrid_guest(),
        _ => Err(ScenarioError::Skip("unknown scenario name")),
    }
}

// ---- vsock-smoke: kernel only -------------------------------------------------------------

fn vsock_smoke() -> Res<String> {
    let listener = VsockListener::bind(libc::VMADDR_CID_LOCAL, SMOKE_PORT)?;
    let sender = std::thread::spawn(move || -> Res<u64> {
        let mut s = vsock::connect(libc::VMADDR_CID_LOCAL, SMOKE_PORT)?;
        let data: Vec<u8> = (0..SMOKE_BYTES).map(pattern_byte).collect();
        // Uneven chunks exercise partial credit windows.
        for chunk in data.chunks(70_001) {
            s.write_all(chunk).map_err(io("smoke send"))?;
        }
        // SAFETY: shutdown(2) on the descriptor owned by `s`, which outlives the call.
        unsafe {
            libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(&s), libc::SHUT_WR);
        }
        let mut ack = [0u8; 8];
        s.read_exact(&mut ack).map_err(io("smoke ack read"))?;
        Ok(u64::from_le_bytes(ack))
    });
    let mut conn = listener.accept()?;
    let mut got = Vec::with_capacity(SMOKE_BYTES);
    conn.read_to_end(&mut got).map_err(io("smoke receive"))?;
    conn.write_all(&(got.len() as u64).to_le_bytes())
        .map_err(io("smoke ack send"))?;
    let acked = sender
        .join()
        .map_err(|_| mismatch("smoke sender thread", "to finish", "a panic"))??;
    if got.len() != SMOKE_BYTES {
        return Err(mismatch("bytes received", SMOKE_BYTES, got.len()));
    }
    if let Some(bad) = (0..SMOKE_BYTES).find(|&i| got[i] != pattern_byte(i)) {
        return Err(mismatch("byte at offset", pattern_byte(bad), got[bad]));
    }
    if acked != SMOKE_BYTES as u64 {
        return Err(mismatch("acked byte count", SMOKE_BYTES, acked));
    }
    Ok(format!("{SMOKE_BYTES} bytes over vsock CID 1 checked"))
}

// ---- hybrid-guests: this guest's half (the host half lives in the harness) ---------------

/// In `vigil` mode (`vmtest_hybrid=vigil`): emits [`HYBRID_EVENTS`] with `vigil emit` to
/// CID 2 (in this VM, the emulated vhost-device-vsock device, whose host side is the
/// `vigil run` of the harness) and requires every event acked. Otherwise sends
/// [`HYBRID_BYTES`] of pattern to the harness and checks its byte-count acknowledgement
/// (the guest closes only after the ack: vhost-device-vsock does not pass SHUT_WR on).
fn hybrid_guest() -> Res<String> {
    let cmdline = guard::read_cmdline()?;
    if guard::cmdline_value(&cmdline, guard::HYBRID_MODE_KEY) == Some("vigil") {
        if !Path::new(VIGIL_BIN).exists() {
            return Err(ScenarioError::Skip("no vigil binary in the initramfs"));
        }
        guard::ensure_test_vm()?;
        let mut args = strings(&["emit", "--vsock"]);
        args.push(format!("{}:{HYBRID_PORT}", libc::VMADDR_CID_HOST));
        args.extend(strings(&["--stream", "hybrid", "--count"]));
        args.push(guard::HYBRID_EVENTS.to_string());
        args.extend(strings(&["--batch", "16"]));
        let out = vigil_output(&args, COMMAND_TIMEOUT)?;
        let r = parse_report(&out.stdout)?;
        if r.acked_through != guard::HYBRID_EVENTS || r.error.is_some() {
            return Err(mismatch(
                "hybrid emit acked_through",
                guard::HYBRID_EVENTS,
                format!("{} (error {:?})", r.acked_through, r.error),
            ));
        }
        return Ok(format!(
            "{} events emitted to host vigil via CID 2 port {HYBRID_PORT}, all acked ({:.0} ev/s)",
            guard::HYBRID_EVENTS,
            r.events_per_sec
        ));
    }
    let mut s = vsock::connect(libc::VMADDR_CID_HOST, HYBRID_PORT)?;
    let data: Vec<u8> = (0..HYBRID_BYTES).map(pattern_byte).collect();
    for chunk in data.chunks(HYBRID_WRITE) {
        s.write_all(chunk).map_err(io("hybrid send"))?;
    }
    let mut ack = [0u8; 8];
    s.read_exact(&mut ack).map_err(io("hybrid ack read"))?;
    let acked = u64::from_le_bytes(ack);
    if acked != HYBRID_BYTES as u64 {
        return Err(mismatch("host ack of hybrid bytes", HYBRID_BYTES, acked));
    }
    Ok(format!(
        "{HYBRID_BYTES} bytes to host CID 2 port {HYBRID_PORT}, acked"
    ))
}

// ---- vigil driving helpers ----------------------------------------------------------------

/// Runs `vigil ARGS` to completion with a timeout, collecting stdout/stderr.
fn vigil_output(args: &[String], timeout: Duration) -> Res<Output> {
    let child = Command::new(VIGIL_BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io("spawning vigil"))?;
    wait_output(child, &args.join(" "), timeout)
}

fn wait_output(mut child: Child, cmd: &str, timeout: Duration) -> Res<Output> {
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let out_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(o) = out.as_mut() {
            let _ = o.read_to_end(&mut b);
        }
        b
    });
    let err_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(e) = err.as_mut() {
            let _ = e.read_to_end(&mut b);
        }
        b
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().map_err(io("waiting for vigil"))? {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ScenarioError::Timeout {
                cmd: cmd.to_string(),
                secs: timeout.as_secs(),
            });
        }
        std::thread::sleep(POLL_INTERVAL);
    };
    Ok(Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    })
}

fn last_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .chars()
        .take(200)
        .collect()
}

/// Runs `vigil ARGS` and requires exit status 0; returns stdout.
fn vigil_ok(args: &[String]) -> Res<String> {
    let out = vigil_output(args, COMMAND_TIMEOUT)?;
    if !out.status.success() {
        return Err(ScenarioError::Command {
            cmd: args.join(" "),
            status: out.status.to_string(),
            stderr: last_line(&out.stderr),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_string()).collect()
}

fn parse_json(cmd: &str, text: &str) -> Res<Value> {
    serde_json::from_str(text.trim()).map_err(|source| ScenarioError::Json {
        cmd: cmd.to_string(),
        line: text.chars().take(120).collect(),
        source,
    })
}

/// One `vigil emit` report line.
#[derive(Debug)]
struct EmitReport {
    sent: u64,
    acked_through: u64,
    error: Option<String>,
    events_per_sec: f64,
}

fn parse_report(stdout: &[u8]) -> Res<EmitReport> {
    let line = last_line(stdout);
    let v = parse_json("emit", &line)?;
    Ok(EmitReport {
        sent: v["sent"].as_u64().unwrap_or(0),
        acked_through: v["acked_through"].as_u64().unwrap_or(0),
        error: v["error"].as_str().map(str::to_string),
        events_per_sec: v["events_per_sec"].as_f64().unwrap_or(0.0),
    })
}

fn emit_args(stream: &str, count: u64, extra: &[&str]) -> Vec<String> {
    let mut a = strings(&["emit", "--vsock"]);
    a.push(format!("1:{VIGIL_PORT}"));
    a.extend(strings(&["--stream", stream, "--count"]));
    a.push(count.to_string());
    a.push("--batch".into());
    a.push(EMIT_BATCH.to_string());
    a.extend(strings(extra));
    a
}

/// Spawns an emitter without waiting for it.
fn spawn_emit(stream: &str, count: u64, extra: &[&str]) -> Res<Child> {
    guard::ensure_test_vm()?;
    Command::new(VIGIL_BIN)
        .args(emit_args(stream, count, extra))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io("spawning vigil emit"))
}

fn finish_emit(child: Child, stream: &str) -> Res<EmitReport> {
    let out = wait_output(child, &format!("emit --stream {stream}"), COMMAND_TIMEOUT)?;
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Err(ScenarioError::Command {
            cmd: format!("emit --stream {stream}"),
            status: out.status.to_string(),
            stderr: last_line(&out.stderr),
        });
    }
    parse_report(&out.stdout)
}

/// A cell row of the generated config.
struct Cell {
    id: &'static str,
    run: &'static str,
    cid: u32,
}

/// A running `vigil run` with its own state, journal and admin socket under /tmp/<name>.
struct Vigil {
    child: Option<Child>,
    root: PathBuf,
}

impl Vigil {
    /// Writes the config (keys as in docs/config.md: `[listen] port`/`vsock`; the brief's
    /// draft named them `vsock_port`/`hybrid_port`), starts `vigil run`, waits for ping.
    fn start(name: &str, cells: &[Cell]) -> Res<Self> {
        let mut extra = String::new();
        for c in cells {
            let _ = write!(
                extra,
                "\n[[cell]]\ncell_id = \"{}\"\nrun_id = \"{}\"\ncid = {}\n",
                c.id, c.run, c.cid
            );
        }
        Self::start_with(name, &extra)
    }

    /// Like [`Vigil::start`], with the cells given as config text (for extra keys).
    fn start_with(name: &str, cells_toml: &str) -> Res<Self> {
        Self::launch(name, cells_toml, true)
    }

    /// Starts again on the state and journal a previous [`Vigil::start_with`] left.
    fn start_with_existing(name: &str, cells_toml: &str) -> Res<Self> {
        Self::launch(name, cells_toml, false)
    }

    fn launch(name: &str, cells_toml: &str, fresh: bool) -> Res<Self> {
        if !Path::new(VIGIL_BIN).exists() {
            return Err(ScenarioError::Skip(
                "no vigil binary in the initramfs (its musl build failed on the host)",
            ));
        }
        let root = PathBuf::from("/tmp").join(name);
        if fresh {
            let _ = std::fs::remove_dir_all(&root);
        }
        std::fs::create_dir_all(root.join("state")).map_err(io("creating state dir"))?;
        let mut cfg = format!(
            "host_name = \"vmtest\"\nstate_dir = \"{r}/state\"\n\n[listen]\nport = \
             {VIGIL_PORT}\nvsock = true\n\n[admin]\nsocket = \"{r}/admin.sock\"\n\n\
             [journal]\ndir = \"{r}/journal\"\n",
            r = root.display()
        );
        cfg.push_str(cells_toml);
        let cfg_path = root.join("vigil.toml");
        std::fs::write(&cfg_path, cfg).map_err(io("writing vigil.toml"))?;
        let log = std::fs::File::create(root.join("vigil.log")).map_err(io("creating log"))?;
        let log2 = log.try_clone().map_err(io("cloning log fd"))?;
        let child = Command::new(VIGIL_BIN)
            .arg("run")
            .arg("--config")
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(io("spawning vigil run"))?;
        let mut v = Self {
            child: Some(child),
            root,
        };
        v.wait_ready()?;
        Ok(v)
    }

    fn socket(&self) -> String {
        self.root.join("admin.sock").display().to_string()
    }

    fn journal(&self) -> String {
        self.root.join("journal").display().to_string()
    }

    fn log_tail(&self) -> String {
        std::fs::read(self.root.join("vigil.log"))
            .map(|b| last_line(&b))
            .unwrap_or_default()
    }

    fn ctl(&self, args: &[&str]) -> Res<String> {
        let mut a = vec!["ctl".to_string(), "--socket".to_string(), self.socket()];
        a.extend(strings(args));
        vigil_ok(&a)
    }

    fn wait_ready(&mut self) -> Res<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Some(st) = child.try_wait().map_err(io("polling vigil run"))? {
                    self.child = None;
                    return Err(ScenarioError::Command {
                        cmd: "run".into(),
                        status: st.to_string(),
                        stderr: self.log_tail(),
                    });
                }
            }
            match self.ctl(&["ping"]) {
                Ok(out) if out.trim() == "ok" => return Ok(()),
                Ok(out) => last = out.trim().to_string(),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(POLL_INTERVAL * 2);
        }
        Err(ScenarioError::NeverHappened {
            what: "vigil ctl ping -> ok",
            secs: READY_TIMEOUT.as_secs(),
            last,
        })
    }

    fn peers(&self) -> Res<Vec<Value>> {
        let out = self.ctl(&["peers", "--json"])?;
        match parse_json("ctl peers --json", &out)? {
            Value::Array(rows) => Ok(rows
                .into_iter()
                .filter(|r| r["local_port"].as_u64() == Some(u64::from(VIGIL_PORT)))
                .collect()),
            other => Err(mismatch("peers --json", "a JSON array", other)),
        }
    }

    /// SIGTERM, then require a clean exit within [`STOP_TIMEOUT`].
    fn stop(&mut self) -> Res<()> {
        let Some(mut child) = self.child.take() else {
            return Err(mismatch("vigil run", "running", "already exited"));
        };
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(st) = child.try_wait().map_err(io("waiting for vigil run"))? {
                if st.success() {
                    return Ok(());
                }
                return Err(ScenarioError::Command {
                    cmd: "run (after SIGTERM)".into(),
                    status: st.to_string(),
                    stderr: self.log_tail(),
                });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(ScenarioError::Timeout {
                    cmd: "run (after SIGTERM)".into(),
                    secs: STOP_TIMEOUT.as_secs(),
                });
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    fn verify(&self) -> Res<()> {
        let pubkey = self.root.join("state/host.key.pub").display().to_string();
        vigil_ok(&strings(&["verify", &self.journal(), "--pubkey", &pubkey])).map(|_| ())
    }

    fn tail(&self) -> Res<Vec<Value>> {
        let out = vigil_ok(&strings(&["tail", &self.journal()]))?;
        out.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| parse_json("tail", l))
            .collect()
    }
}

impl Drop for Vigil {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn sum_field(rows: &[Value], field: &str) -> u64 {
    rows.iter().filter_map(|r| r[field].as_u64()).sum()
}

fn max_field(rows: &[Value], field: &str) -> u64 {
    rows.iter()
        .filter_map(|r| r[field].as_u64())
        .max()
        .unwrap_or(0)
}

// ---- ingest -------------------------------------------------------------------------------

fn ingest() -> Res<String> {
    let mut vigil = Vigil::start(
        "ingest",
        &[Cell {
            id: "cell-a",
            run: "run-1",
            cid: 1,
        }],
    )?;
    let mut children = Vec::new();
    for i in 0..INGEST_EMITTERS {
        let stream = format!("ingest-{i}");
        children.push((spawn_emit(&stream, INGEST_EVENTS, &[])?, stream));
    }
    let mut rate = 0.0;
    for (child, stream) in children {
        let r = finish_emit(child, &stream)?;
        if let Some(e) = r.error {
            return Err(mismatch("emit error", "null", e));
        }
        if r.acked_through != INGEST_EVENTS || r.sent != INGEST_EVENTS {
            return Err(mismatch(
                "emit sent/acked_through",
                INGEST_EVENTS,
                format!("{}/{} on {stream}", r.sent, r.acked_through),
            ));
        }
        rate += r.events_per_sec;
    }
    vigil.stop()?;
    vigil.verify()?;
    let events = vigil.tail()?;
    let total = INGEST_EMITTERS as u64 * INGEST_EVENTS;
    // vigil journals its own events too (e.g. per-connection ones); count the guest events
    // of our streams, each (stream, guestseq) exactly once, and name the others.
    let mut seen = std::collections::HashSet::new();
    let mut others: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    for e in &events {
        if e.get("cellid").is_some() && e["cellid"] != "cell-a" {
            return Err(mismatch("cellid", "cell-a", &e["cellid"]));
        }
        let stream = e["streamid"].as_str().unwrap_or("");
        let Some(idx) = stream
            .strip_prefix("ingest-")
            .and_then(|i| i.parse::<usize>().ok())
            .filter(|&i| i < INGEST_EMITTERS)
        else {
            *others
                .entry(e["type"].as_str().unwrap_or("?").to_string())
                .or_default() += 1;
            continue;
        };
        let seq = json_u64(&e["guestseq"]).unwrap_or(0);
        if !(1..=INGEST_EVENTS).contains(&seq) {
            return Err(mismatch("guestseq", format!("1..={INGEST_EVENTS}"), seq));
        }
        if !seen.insert((idx, seq)) {
            return Err(mismatch(
                "events per (stream, guestseq)",
                1,
                format!("2 for {stream}/{seq}"),
            ));
        }
    }
    if seen.len() as u64 != total {
        return Err(mismatch("distinct guest events in tail", total, seen.len()));
    }
    let others: Vec<String> = others.iter().map(|(t, n)| format!("{t}×{n}")).collect();
    Ok(format!(
        "{total} events acked, verified and tailed (all cell-a; other events: {}); emit rate \
         sum {rate:.0} ev/s",
        if others.is_empty() {
            "none".to_string()
        } else {
            others.join(" ")
        }
    ))
}

/// A JSON number or a decimal string (CloudEvents extensions are often strings).
fn json_u64(v: &Value) -> Option<u64> {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

// ---- kernel-stats -------------------------------------------------------------------------

fn kernel_stats() -> Res<String> {
    let vigil = Vigil::start(
        "kernel-stats",
        &[Cell {
            id: "cell-a",
            run: "run-1",
            cid: 1,
        }],
    )?;
    let payload = STATS_PAYLOAD.to_string();
    let extra = ["--payload-bytes", payload.as_str()];
    let first = finish_emit(spawn_emit("stats-1", INGEST_EVENTS, &extra)?, "stats-1")?;
    if first.acked_through != INGEST_EVENTS {
        return Err(mismatch(
            "first emitter acked",
            INGEST_EVENTS,
            first.acked_through,
        ));
    }
    let rows1 = vigil.peers()?;
    let packets = sum_field(&rows1, "packets");
    let bytes = sum_field(&rows1, "bytes");
    if packets == 0 {
        return Err(mismatch("packets for local_port 7000", "> 0", packets));
    }
    let min_bytes = INGEST_EVENTS * STATS_PAYLOAD;
    if bytes < min_bytes {
        return Err(mismatch(
            "bytes for local_port 7000",
            format!(">= {min_bytes}"),
            bytes,
        ));
    }
    let last1 = max_field(&rows1, "last_data_ns");

    let second = finish_emit(spawn_emit("stats-2", INGEST_EVENTS, &extra)?, "stats-2")?;
    if second.acked_through != INGEST_EVENTS {
        return Err(mismatch(
            "second emitter acked",
            INGEST_EVENTS,
            second.acked_through,
        ));
    }
    let rows2 = vigil.peers()?;
    let last2 = max_field(&rows2, "last_data_ns");
    if last2 <= last1 {
        return Err(mismatch(
            "last_data_ns advancing",
            format!("> {last1}"),
            last2,
        ));
    }

    // Kill an emitter mid-stream: its row must record a reset or shutdown.
    let known: Vec<u64> = rows2.iter().filter_map(|r| r["port"].as_u64()).collect();
    let mut victim = spawn_emit("stats-killed", KILLED_EMITTER_EVENTS, &extra)?;
    let new_port = poll_peers(&vigil, "killed emitter's connection in peers", |rows| {
        rows.iter()
            .filter(|r| r["packets"].as_u64().unwrap_or(0) > 0)
            .filter_map(|r| r["port"].as_u64())
            .find(|p| !known.contains(p))
    });
    let new_port = match new_port {
        Ok(p) => p,
        Err(e) => {
            let _ = victim.kill();
            let _ = victim.wait();
            return Err(e);
        }
    };
    victim.kill().map_err(io("SIGKILL of emitter"))?;
    let status = victim.wait().map_err(io("reaping the killed emitter"))?;
    if std::os::unix::process::ExitStatusExt::signal(&status) != Some(libc::SIGKILL) {
        return Err(mismatch(
            "killed emitter",
            "to die by SIGKILL mid-stream",
            format!("it finished first ({status}); raise KILLED_EMITTER_EVENTS"),
        ));
    }
    let closes = poll_peers(&vigil, "rst+shutdown of the killed emitter", |rows| {
        rows.iter()
            .find(|r| r["port"].as_u64() == Some(new_port))
            .map(|r| r["rst"].as_u64().unwrap_or(0) + r["shutdown"].as_u64().unwrap_or(0))
            .filter(|&n| n > 0)
    })?;
    Ok(format!(
        "packets={packets} bytes={bytes} last_data_ns {last1}->{last2}; killed port \
         {new_port} rst+shutdown={closes}"
    ))
}

/// Polls the peers table until `check` finds something, for at most [`PEERS_POLL_TIMEOUT`].
fn poll_peers<T>(
    vigil: &Vigil,
    what: &'static str,
    mut check: impl FnMut(&[Value]) -> Option<T>,
) -> Res<T> {
    let deadline = Instant::now() + PEERS_POLL_TIMEOUT;
    let mut last = String::new();
    while Instant::now() < deadline {
        let rows = vigil.peers()?;
        if let Some(v) = check(&rows) {
            return Ok(v);
        }
        last = format!("{} rows", rows.len());
        std::thread::sleep(POLL_INTERVAL * 2);
    }
    Err(ScenarioError::NeverHappened {
        what,
        secs: PEERS_POLL_TIMEOUT.as_secs(),
        last,
    })
}

// ---- identity -----------------------------------------------------------------------------

fn identity() -> Res<String> {
    let mut vigil = Vigil::start("identity", &[])?;
    let refused = finish_emit(
        spawn_emit("id-unregistered", 10, &["--ack-timeout-ms", "5000"])?,
        "id-unregistered",
    )?;
    let said_unregistered = refused
        .error
        .as_deref()
        .is_some_and(|e| e.contains("UNREGISTERED"));
    if !said_unregistered && refused.acked_through != 0 {
        return Err(mismatch(
            "emit from an unregistered CID",
            "error UNREGISTERED or acked 0",
            format!("acked {} error {:?}", refused.acked_through, refused.error),
        ));
    }
    vigil.ctl(&[
        "cell", "add", "--cell", "cell-b", "--run", "run-7", "--cid", "1",
    ])?;
    let listed = vigil.ctl(&["cell", "list", "--json"])?;
    if !listed.contains("cell-b") {
        return Err(mismatch("cell list", "cell-b listed", listed.trim()));
    }
    let count = 100;
    let r = finish_emit(
        spawn_emit("id-claims", count, &["--claim", "cell_id=evil"])?,
        "id-claims",
    )?;
    if r.acked_through != count {
        return Err(mismatch(
            "claims emitter acked",
            count,
            format!("{} ({:?})", r.acked_through, r.error),
        ));
    }
    vigil.stop()?;
    vigil.verify()?;
    let events = vigil.tail()?;
    if let Some(bad) = events.iter().find(|e| e["cellid"] == "evil") {
        return Err(mismatch("no event with cellid evil", "none", bad));
    }
    let ours: Vec<&Value> = events
        .iter()
        .filter(|e| e["streamid"] == "id-claims")
        .collect();
    if ours.len() as u64 != count {
        return Err(mismatch("events of stream id-claims", count, ours.len()));
    }
    for e in &ours {
        if e["cellid"] != "cell-b" || e["runid"] != "run-7" {
            return Err(mismatch(
                "cellid/runid",
                "cell-b/run-7",
                format!("{}/{}", e["cellid"], e["runid"]),
            ));
        }
        if !e["guestclaims"].to_string().contains("evil") {
            return Err(mismatch(
                "guestclaims",
                "to hold cell_id=evil",
                &e["guestclaims"],
            ));
        }
    }
    Ok(format!(
        "unregistered refused ({}); {count} events as cell-b/run-7 with claim only in guestclaims",
        refused.error.unwrap_or_else(|| "acked 0".into())
    ))
}

// ---- silence: guest_silent with kernel evidence, resumed, receiver_stalled -----------------

const SILENCED: &str = "dev.vigil.cell.observability.v1.guest.agent_silenced";
const RESUMED: &str = "dev.vigil.cell.observability.v1.guest.agent_resumed";
const STALLED: &str = "dev.vigil.host.observability.v1.receiver_stalled";

/// Sends a signal to a child process.
fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

fn silence() -> Res<String> {
    let mut vigil = Vigil::start_with(
        "silence",
        "\n[[cell]]\ncell_id = \"quiet\"\nrun_id = \"r1\"\ncid = 1\nkeepalive_ms = 1500\n",
    )?;
    // 1. The guest goes quiet with its connection open (SIGSTOP): the kernel sees no data
    //    either, so the class is guest_silent, with kernel evidence. SIGCONT resumes it.
    let child = spawn_emit("quiet", 300, &["--rate", "50", "--ack-timeout-ms", "30000"])?;
    std::thread::sleep(Duration::from_secs(2));
    signal(&child, libc::SIGSTOP);
    std::thread::sleep(Duration::from_secs(4));
    signal(&child, libc::SIGCONT);
    let r = finish_emit(child, "quiet")?;
    if r.acked_through != 300 {
        return Err(mismatch("quiet emitter acked", 300, r.acked_through));
    }
    // 2. A new run; the guest keeps sending while vigil's drain thread is stalled: the host
    //    is at fault (receiver_stalled), not the guest.
    vigil.ctl(&[
        "cell",
        "add",
        "--cell",
        "quiet",
        "--run",
        "r2",
        "--cid",
        "1",
        "--keepalive-ms",
        "1500",
    ])?;
    let child = spawn_emit("busy", 500, &["--rate", "100", "--ack-timeout-ms", "30000"])?;
    std::thread::sleep(Duration::from_secs(1));
    vigil.ctl(&["debug", "stall-drain", "--ms", "4000"])?;
    let r = finish_emit(child, "busy")?;
    if r.acked_through != 500 {
        return Err(mismatch(
            "busy emitter acked (nothing lost across the stall)",
            500,
            r.acked_through,
        ));
    }
    vigil.stop()?;
    vigil.verify()?;
    let events = vigil.tail()?;
    let of = |ty: &str| -> Vec<&Value> { events.iter().filter(|e| e["type"] == ty).collect() };
    let silenced = of(SILENCED);
    if silenced.len() != 1 || silenced[0]["runid"] != "r1" {
        return Err(mismatch(
            "agent_silenced events",
            "one, for run r1",
            silenced.len(),
        ));
    }
    let d = &silenced[0]["data"];
    if d["class"] != "guest_silent" {
        return Err(mismatch("silence class", "guest_silent", &d["class"]));
    }
    if !d["kernelEvidence"].is_object() {
        return Err(mismatch(
            "kernelEvidence",
            "the kernel's per-peer facts",
            &d["kernelEvidence"],
        ));
    }
    if d["elapsedMs"].as_u64() < d["keepaliveWindowMs"].as_u64() {
        return Err(mismatch("elapsedMs >= keepaliveWindowMs", "true", d));
    }
    let resumed = of(RESUMED);
    if resumed.len() != 1 || resumed[0]["data"]["silentMs"].as_u64().unwrap_or(0) == 0 {
        return Err(mismatch(
            "agent_resumed",
            "one, with silentMs > 0",
            resumed.len(),
        ));
    }
    let stalled = of(STALLED);
    if stalled.len() != 1 || stalled[0]["runid"] != "r2" {
        return Err(mismatch(
            "receiver_stalled events",
            "one, for run r2",
            stalled.len(),
        ));
    }
    if of(SILENCED).iter().any(|e| e["runid"] == "r2") {
        return Err(mismatch(
            "agent_silenced for r2",
            "none (the guest kept sending)",
            "one",
        ));
    }
    Ok(format!(
        "guest_silent after {} ms with kernel evidence {}, resumed after {} ms, receiver_stalled for r2 (kernelLastDataNs {})",
        d["elapsedMs"], d["kernelEvidence"], resumed[0]["data"]["silentMs"], stalled[0]["data"]["kernelLastDataNs"]
    ))
}

// ---- killswitch: allow, deny, hold released by resume, sticky across a restart ------------

/// The decisions `vigil emit --ask` printed for one policy query over AF_VSOCK.
fn ask(op_action: &str, timeout_ms: u64) -> Res<Vec<String>> {
    let child = spawn_emit(
        "asker",
        0,
        &[
            "--ask",
            op_action,
            "--ack-timeout-ms",
            &timeout_ms.to_string(),
        ],
    )?;
    let out = wait_output(child, "emit --ask", COMMAND_TIMEOUT)?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["decision"].as_str().map(str::to_string))
        .collect())
}

fn expect_decisions(what: &'static str, got: &[String], want: &[&str]) -> Res<()> {
    if got.iter().map(String::as_str).eq(want.iter().copied()) {
        Ok(())
    } else {
        Err(mismatch(what, want.join(","), got.join(",")))
    }
}

fn killswitch() -> Res<String> {
    let cells = "\n[[cell]]\ncell_id = \"k\"\nrun_id = \"r1\"\ncid = 1\n";
    let mut vigil = Vigil::start_with("killswitch", cells)?;
    expect_decisions("first query", &ask("t1:s1:exec", 5_000)?, &["ALLOW"])?;
    vigil.ctl(&["op", "terminate", "k", "t1:s1"])?;
    expect_decisions("after terminate", &ask("t1:s1:exec", 5_000)?, &["DENY"])?;
    vigil.ctl(&["op", "pause", "k", "t2:s2"])?;
    let held = spawn_emit(
        "asker",
        0,
        &["--ask", "t2:s2:exec", "--ack-timeout-ms", "60000"],
    )?;
    std::thread::sleep(Duration::from_millis(1_500));
    vigil.ctl(&["op", "resume", "k", "t2:s2"])?;
    let out = wait_output(held, "emit --ask (held)", COMMAND_TIMEOUT)?;
    let got: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["decision"].as_str().map(str::to_string))
        .collect();
    expect_decisions("held query released by resume", &got, &["HOLD", "ALLOW"])?;
    vigil.stop()?;
    let mut vigil = Vigil::start_with_existing("killswitch", cells)?;
    expect_decisions("after a restart", &ask("t1:s1:exec", 5_000)?, &["DENY"])?;
    vigil.stop()?;
    vigil.verify()?;
    Ok("allow; deny after terminate; hold released by resume; deny sticky across a restart".into())
}
