//! End to end over real Unix sockets (the hybrid-vsock path): `vigil emit` → `vigil run` →
//! journal → `vigil verify` / `vigil tail`, across a restart and a full resend, plus
//! fire-once silence across a restart. Runs the real binary; as root it also loads the eBPF
//! programs (without root, vigil says kernel evidence is off and runs on).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const VIGIL: &str = env!("CARGO_BIN_EXE_vigil");

struct Daemon {
    child: Child,
    dir: PathBuf,
}

impl Daemon {
    fn start(dir: &Path) -> Daemon {
        Self::start_with_stdout(dir, Stdio::inherit())
    }

    /// Starts `vigil run` on `dir/vigil.toml`, its stdout going to `stdout`, and waits until
    /// it answers on its admin socket.
    fn start_with_stdout(dir: &Path, stdout: Stdio) -> Daemon {
        let child = Command::new(VIGIL)
            .args(["run", "--config"])
            .arg(dir.join("vigil.toml"))
            .env("VIGIL_LOG", "warn")
            .stdout(stdout)
            .stderr(std::fs::File::create(dir.join("vigil.log")).unwrap())
            .spawn()
            .expect("start vigil run");
        let d = Daemon {
            child,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ctl(dir, &["ping"]).0 {
            assert!(
                Instant::now() < deadline,
                "vigil did not come up: {}",
                std::fs::read_to_string(dir.join("vigil.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    /// SIGTERM and wait: the daemon must exit 0 (clean shutdown).
    fn stop(mut self) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "vigil exited with {status}: {}",
            std::fs::read_to_string(self.dir.join("vigil.log")).unwrap_or_default()
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ctl(dir: &Path, args: &[&str]) -> (bool, String) {
    let o = Command::new(VIGIL)
        .args(["ctl", "--socket"])
        .arg(dir.join("admin.sock"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

fn config(dir: &Path, cells: &str) {
    let cfg = format!(
        "host_name = \"e2e\"\nstate_dir = \"{d}/state\"\n[listen]\nvsock = false\n[admin]\nsocket = \"{d}/admin.sock\"\n[journal]\ndir = \"{d}/journal\"\n[http]\naddr = \"\"\n{cells}",
        d = dir.display()
    );
    std::fs::write(dir.join("vigil.toml"), cfg).unwrap();
}

/// A config with one hybrid cell `id` (run `r1`, more cell keys in `cell_keys`); returns the
/// guest-side socket path (`<uds_path>_7000`) an emitter connects to.
fn one_cell(dir: &Path, id: &str, cell_keys: &str) -> PathBuf {
    config(
        dir,
        &format!("[[cell]]\ncell_id = \"{id}\"\nrun_id = \"r1\"\nuds_path = \"{}/{id}.vsock\"\n{cell_keys}", dir.display()),
    );
    dir.join(format!("{id}.vsock_7000"))
}

/// Replaces `from` with `to` in the written config (for one-off settings).
fn patch_config(dir: &Path, from: &str, to: &str) {
    let cfg = std::fs::read_to_string(dir.join("vigil.toml")).unwrap();
    assert!(cfg.contains(from), "{from:?} not in the config");
    std::fs::write(dir.join("vigil.toml"), cfg.replace(from, to)).unwrap();
}

fn emit(path: &Path, stream: &str, count: u64, extra: &[&str]) -> serde_json::Value {
    let o = Command::new(VIGIL)
        .args(["emit", "--unix"])
        .arg(path)
        .args([
            "--stream",
            stream,
            "--count",
            &count.to_string(),
            "--ack-timeout-ms",
            "20000",
        ])
        .args(extra)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    let line = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(line.lines().last().unwrap_or("{}"))
        .unwrap_or_else(|e| panic!("emit printed {line:?}: {e}"))
}

fn tail(dir: &Path, ty: Option<&str>) -> Vec<serde_json::Value> {
    let mut c = Command::new(VIGIL);
    c.arg("tail").arg(dir.join("journal"));
    if let Some(t) = ty {
        c.args(["--type", t]);
    }
    let o = c.output().unwrap();
    assert!(
        o.status.success(),
        "tail failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn verify(dir: &Path) {
    let o = Command::new(VIGIL)
        .arg("verify")
        .arg(dir.join("journal"))
        .arg("--pubkey")
        .arg(dir.join("state/host.key.pub"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "verify failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn emit_run_verify_across_a_restart_and_a_full_resend() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    config(
        dir,
        &format!(
            "[[cell]]\ncell_id = \"web-1\"\nrun_id = \"boot-1\"\nuds_path = \"{}/web-1.vsock\"\n",
            dir.display()
        ),
    );
    let sock = dir.join("web-1.vsock_7000");
    let d = Daemon::start(dir);
    for s in ["a", "b", "c"] {
        let r = emit(
            &sock,
            s,
            2_000,
            &["--claim", "cell_id=evil", "--payload-bytes", "200"],
        );
        assert_eq!(r["sent"], 2_000, "{r}");
        assert_eq!(r["acked_through"], 2_000, "every event acked: {r}");
    }
    d.stop();
    verify(dir);
    let events = tail(dir, None);
    let mut seen: BTreeMap<(String, u64), usize> = BTreeMap::new();
    for e in events.iter().filter(|e| e.get("streamid").is_some()) {
        assert_eq!(e["cellid"], "web-1", "identity from the registry: {e}");
        assert_eq!(e["runid"], "boot-1");
        assert_eq!(e["source"], "vigil://e2e/cells/web-1");
        assert!(
            e["guestclaims"].as_str().unwrap_or("").contains("evil"),
            "claims kept apart: {e}"
        );
        let seq: u64 = e["guestseq"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .or_else(|| e["guestseq"].as_u64())
            .unwrap();
        *seen
            .entry((e["streamid"].as_str().unwrap().to_string(), seq))
            .or_default() += 1;
    }
    assert_eq!(seen.len(), 6_000);
    assert!(seen.values().all(|n| *n == 1), "each event exactly once");

    // Restart and resend everything: acked again, journaled once.
    let d = Daemon::start(dir);
    let r = emit(&sock, "a", 2_000, &[]);
    assert_eq!(r["acked_through"], 2_000, "{r}");
    let r = emit(&sock, "a", 2_500, &[]);
    assert_eq!(r["acked_through"], 2_500, "{r}");
    d.stop();
    verify(dir);
    let a: Vec<_> = tail(dir, None)
        .into_iter()
        .filter(|e| e["streamid"] == "a")
        .collect();
    assert_eq!(
        a.len(),
        2_500,
        "the resend was deduplicated; 500 new events added"
    );
}

#[test]
fn silence_fires_once_per_run_across_a_restart_and_resumes() {
    const SILENCED: &str = "dev.vigil.cell.observability.v1.guest.agent_silenced";
    const RESUMED: &str = "dev.vigil.cell.observability.v1.guest.agent_resumed";
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let sock = one_cell(dir, "quiet", "keepalive_ms = 500\n");
    let d = Daemon::start(dir);
    assert_eq!(emit(&sock, "s", 10, &[])["acked_through"], 10);
    std::thread::sleep(Duration::from_millis(1_500));
    d.stop();
    let silenced = tail(dir, Some(SILENCED));
    assert_eq!(silenced.len(), 1, "{silenced:?}");
    let data = &silenced[0]["data"];
    assert!(data["elapsedMs"].as_u64().unwrap() >= data["keepaliveWindowMs"].as_u64().unwrap());
    assert_eq!(
        data["kernelEvidence"], "none",
        "hybrid cells have no vsock packets in the host kernel"
    );
    assert_eq!(
        data["class"], "disconnected",
        "the emitter closed its connection"
    );

    // A restart does not fire again for the same run, and the next frame resumes it.
    let d = Daemon::start(dir);
    std::thread::sleep(Duration::from_millis(1_200));
    assert_eq!(emit(&sock, "s", 11, &[])["acked_through"], 11);
    std::thread::sleep(Duration::from_millis(300));
    d.stop();
    assert_eq!(
        tail(dir, Some(SILENCED)).len(),
        1,
        "fire-once across a restart"
    );
    let resumed = tail(dir, Some(RESUMED));
    assert_eq!(resumed.len(), 1, "{resumed:?}");
    assert_eq!(resumed[0]["data"]["runId"], "r1");

    // A new run starts a fresh window and a fresh fire-once.
    let d = Daemon::start(dir);
    let (ok, out) = ctl(
        dir,
        &[
            "cell",
            "add",
            "--cell",
            "quiet",
            "--run",
            "r2",
            "--uds",
            &dir.join("quiet.vsock").display().to_string(),
            "--keepalive-ms",
            "500",
        ],
    );
    assert!(ok, "{out}");
    std::thread::sleep(Duration::from_millis(1_200));
    d.stop();
    let runs: Vec<String> = tail(dir, Some(SILENCED))
        .iter()
        .map(|e| e["data"]["runId"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(runs, vec!["r1".to_string(), "r2".to_string()]);
    verify(dir);
}

#[test]
fn an_unregistered_path_is_refused_and_bad_config_is_a_sentence() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("bad.toml"), "[listen]\nmax_frame_bytes = 3\n").unwrap();
    let o = Command::new(VIGIL)
        .args(["run", "--config"])
        .arg(dir.join("bad.toml"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("max_frame_bytes"), "{err}");

    config(dir, "");
    let d = Daemon::start(dir);
    let r = emit(&dir.join("nobody.vsock_7000"), "s", 1, &[]);
    assert!(
        r["error"].is_string(),
        "no listener for an unregistered cell: {r}"
    );
    let (ok, out) = ctl(
        dir,
        &["cell", "add", "--cell", "x", "--run", "r", "--cid", "3"],
    );
    assert!(ok, "{out}");
    let (ok, _) = ctl(
        dir,
        &["cell", "add", "--cell", "y", "--run", "r", "--cid", "3"],
    );
    assert!(!ok, "a CID belongs to one cell");
    let (_, list) = ctl(dir, &["cell", "list", "--json"]);
    assert!(list.contains("\"x\""), "{list}");
    d.stop();
    // The registry survives a restart.
    let d = Daemon::start(dir);
    let (_, list) = ctl(dir, &["cell", "list", "--json"]);
    assert!(list.contains("\"x\""), "{list}");
    d.stop();
}

#[test]
fn a_stalled_receiver_is_blamed_on_the_host_not_the_guest() {
    const STALLED: &str = "dev.vigil.host.observability.v1.receiver_stalled";
    const SILENCED: &str = "dev.vigil.cell.observability.v1.guest.agent_silenced";
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let sock = one_cell(dir, "busy", "keepalive_ms = 500\n");
    let d = Daemon::start(dir);
    // The guest keeps sending (100 events/s for 3 s) while the drain thread is stalled.
    let emitter =
        std::thread::spawn(move || emit(&sock, "s", 300, &["--rate", "100", "--batch", "1"]));
    std::thread::sleep(Duration::from_millis(300));
    let (ok, out) = ctl(dir, &["debug", "stall-drain", "--ms", "1500"]);
    assert!(ok, "{out}");
    let report = emitter.join().unwrap();
    assert_eq!(
        report["acked_through"], 300,
        "nothing lost across the stall: {report}"
    );
    d.stop();
    let stalled = tail(dir, Some(STALLED));
    assert_eq!(stalled.len(), 1, "{stalled:?}");
    assert!(stalled[0]["data"]["drainLastRunNs"].as_u64().unwrap() > 0);
    assert!(
        tail(dir, Some(SILENCED)).is_empty(),
        "the guest was not silent: do not blame it"
    );
}

/// The decisions `vigil emit --ask` printed, in order.
fn ask(path: &Path, op_action: &str, timeout_ms: u64) -> Vec<String> {
    let o = Command::new(VIGIL)
        .args(["emit", "--unix"])
        .arg(path)
        .args([
            "--stream",
            "asker",
            "--count",
            "0",
            "--ask",
            op_action,
            "--ack-timeout-ms",
            &timeout_ms.to_string(),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["decision"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn kill_switch_allows_denies_holds_and_survives_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let sock = one_cell(dir, "k", "");
    let d = Daemon::start(dir);
    assert_eq!(ask(&sock, "t1:s1:exec", 2_000), vec!["ALLOW"]);
    assert_eq!(
        ctl(dir, &["op", "terminate", "k", "t1:s1"]).1.trim(),
        "terminated"
    );
    assert_eq!(ask(&sock, "t1:s1:exec", 2_000), vec!["DENY"]);
    // Sticky: a later pause or resume does not lift a terminate.
    assert_eq!(
        ctl(dir, &["op", "resume", "k", "t1:s1"]).1.trim(),
        "terminated"
    );
    assert_eq!(ask(&sock, "t1:s1:exec", 2_000), vec!["DENY"]);

    // A held query is released by resume, and does not stall other connections meanwhile.
    assert_eq!(ctl(dir, &["op", "pause", "k", "t2:s2"]).1.trim(), "paused");
    let s2 = sock.clone();
    let held = std::thread::spawn(move || ask(&s2, "t2:s2:exec", 10_000));
    std::thread::sleep(Duration::from_millis(300));
    let r = emit(&sock, "other", 200, &[]);
    assert_eq!(
        r["acked_through"], 200,
        "other connections go on while a query is held: {r}"
    );
    assert_eq!(
        ctl(dir, &["op", "resume", "k", "t2:s2"]).1.trim(),
        "running"
    );
    assert_eq!(held.join().unwrap(), vec!["HOLD", "ALLOW"]);

    // A held query is released by terminate, with a deny.
    ctl(dir, &["op", "pause", "k", "t3:s3"]);
    let s3 = sock.clone();
    let held = std::thread::spawn(move || ask(&s3, "t3:s3:exec", 10_000));
    std::thread::sleep(Duration::from_millis(300));
    ctl(dir, &["op", "terminate", "k", "t3:s3"]);
    assert_eq!(held.join().unwrap(), vec!["HOLD", "DENY"]);

    // A cell-level pause holds every op of the run.
    ctl(dir, &["cell", "pause", "k"]);
    let s4 = sock.clone();
    let held = std::thread::spawn(move || ask(&s4, "t4:s4:read", 10_000));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(ctl(dir, &["cell", "resume", "k"]).1.trim(), "running");
    assert_eq!(held.join().unwrap(), vec!["HOLD", "ALLOW"]);
    d.stop();

    // Terminates survive a restart of vigil (re-applied from the journal before queries are
    // answered); what was only paused is not.
    let d = Daemon::start(dir);
    assert_eq!(ask(&sock, "t1:s1:exec", 2_000), vec!["DENY"]);
    assert_eq!(ask(&sock, "t3:s3:exec", 2_000), vec!["DENY"]);
    assert_eq!(ask(&sock, "t2:s2:exec", 2_000), vec!["ALLOW"]);
    d.stop();
    verify(dir);
    let applied = tail(dir, Some("dev.vigil.opcontrol.v1.signal_applied"));
    assert!(applied.len() >= 8, "{applied:?}");
    let decisions = tail(dir, Some("dev.vigil.opcontrol.v1.decision"));
    let kinds: Vec<&str> = decisions
        .iter()
        .filter_map(|e| e["data"]["decision"].as_str())
        .collect();
    assert!(
        kinds.contains(&"deny_terminated") && kinds.contains(&"hold") && kinds.contains(&"allow"),
        "{kinds:?}"
    );
}

/// Signals from the upstream control plane: a real `nats-server -js`; a terminate published
/// to `vigil.control.<host>` denies the op's next query. Skips (saying so) without the binary
/// (`cargo xtask test` installs it; CI fails a skip).
#[test]
fn upstream_signals_through_a_real_nats_server() {
    let Some(bin) = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
    else {
        println!("SKIPPED upstream_signals_through_a_real_nats_server: nats-server not installed");
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "CI must have nats-server"
        );
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut nats = Command::new(bin)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir.join("nats"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nats-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = format!("nats://127.0.0.1:{port}");
    let sock = one_cell(dir, "k", "");
    patch_config(
        dir,
        "[http]\n",
        &format!("[control]\nnats_url = \"{url}\"\n[http]\n"),
    );
    let d = Daemon::start(dir);
    assert_eq!(ask(&sock, "t9:s9:exec", 2_000), vec!["ALLOW"]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = async_nats::connect(url.as_str()).await.unwrap();
        let signal = vigil_wire::pb::ControlSignal {
            cell_id: "k".into(),
            run_id: String::new(),
            op_id: "t9:s9".into(),
            signal: vigil_wire::pb::control_signal::Signal::Terminate as i32,
            issuer: "e2e".into(),
        };
        vigil_opcontrol::upstream::ensure_stream(&client)
            .await
            .unwrap();
        vigil_opcontrol::upstream::publish_signal(&client, "e2e", &signal)
            .await
            .unwrap();
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if ask(&sock, "t9:s9:exec", 2_000) == vec!["DENY"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the upstream terminate never took effect"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    d.stop();
    let applied = tail(dir, Some("dev.vigil.opcontrol.v1.signal_applied"));
    assert!(
        applied
            .iter()
            .any(|e| e["data"]["source"] == "upstream:e2e"),
        "{applied:?}"
    );
    let _ = nats.kill();
    let _ = nats.wait();
}

/// Host probes declared for a cell run when the cell registers: topology first, then the
/// first observation and the first failure, as signed, journaled events.
#[test]
fn host_probes_emit_topology_then_results_into_the_journal() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("ready"), "ready\n").unwrap();
    std::fs::write(
        dir.join("probes.toml"),
        format!(
            "[[probe]]\nname = \"ready-file\"\nkind = \"file\"\npath = \"{}/ready\"\ncontains = \"ready\"\nrun_once = true\n\n[[probe]]\nname = \"always-fails\"\nkind = \"exec\"\ncommand = [\"/bin/false\"]\nrun_once = true\nmode = \"observe\"\n",
            dir.display()
        ),
    )
    .unwrap();
    one_cell(
        dir,
        "p",
        &format!("probes = \"{}/probes.toml\"\n", dir.display()),
    );
    let d = Daemon::start(dir);
    std::thread::sleep(Duration::from_millis(1_500));
    d.stop();
    verify(dir);
    let events: Vec<serde_json::Value> = tail(dir, None)
        .into_iter()
        .filter(|e| {
            e["type"]
                .as_str()
                .unwrap_or("")
                .starts_with("dev.vigil.probe.v1.")
        })
        .collect();
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types.first(),
        Some(&"dev.vigil.probe.v1.topology_declared"),
        "{types:?}"
    );
    assert!(
        types.contains(&"dev.vigil.probe.v1.observed_first"),
        "{types:?}"
    );
    assert!(types.contains(&"dev.vigil.probe.v1.result"), "{types:?}");
    assert!(events
        .iter()
        .all(|e| e["cellid"] == "p" && e["runid"] == "r1"));
    let failed: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| {
            e["data"].to_string().contains("always-fails")
                && e["type"] == "dev.vigil.probe.v1.result"
        })
        .collect();
    assert!(
        failed.iter().all(|e| e["data"]["status"] == "fail"),
        "{failed:?}"
    );
}

/// The stdout sink: CloudEvent JSON lines on vigil's standard output, acked after the write,
/// for piping into other tools.
#[test]
fn stdout_sink_prints_cloudevents_and_acks_them() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let sock = one_cell(dir, "s", "");
    patch_config(dir, "[journal]\n", "[journal]\nsink = \"stdout\"\n");
    let events_file = std::fs::File::create(dir.join("events.jsonl")).unwrap();
    let d = Daemon::start_with_stdout(dir, events_file.into());
    let r = emit(&sock, "out", 50, &[]);
    assert_eq!(r["acked_through"], 50, "{r}");
    d.stop();
    let text = std::fs::read_to_string(dir.join("events.jsonl")).unwrap();
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|e: &serde_json::Value| e["streamid"] == "out")
        .collect();
    assert_eq!(events.len(), 50);
    assert!(events
        .iter()
        .all(|e| e["specversion"] == "1.0" && e["cellid"] == "s"));
}

/// `/metrics` and `/healthz` of a running daemon: frames counted per cell, and the journal's
/// fsync latencies in the histogram after events were made durable.
#[test]
fn metrics_count_frames_and_journal_fsyncs() {
    use std::io::{Read, Write};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sock = one_cell(dir, "m", "");
    patch_config(dir, "addr = \"\"", &format!("addr = \"127.0.0.1:{port}\""));
    let d = Daemon::start(dir);
    assert_eq!(emit(&sock, "s", 500, &[])["acked_through"], 500);
    let get = |path: &str| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    };
    assert!(get("/healthz").contains("\"ready\""));
    let metrics = get("/metrics");
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    assert!(
        value("vigil_frames_received_total{cell=\"m\"}") >= 500.0,
        "{metrics}"
    );
    assert!(
        value("vigil_journal_fsync_seconds_count") >= 1.0,
        "{metrics}"
    );
    d.stop();
}
