//! Host probes: the pure scheduler with a manual clock, and the checks and driver against
//! real sockets, processes and files.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use vigil_health::probes::{
    cmdline_has_vmtest_token, run_check, Action, CellTarget, CellTransport, Declarations, Mode,
    ProbeDriver, ProbeError, ProbeEvent, ProbeKind, ProbeOptions, ProbeOutcome, ProbeSet,
    ProbeSpec, Status, MIN_INTERVAL_MS,
};

const SEC: u64 = 1_000_000_000;

fn target(run: &str) -> CellTarget {
    CellTarget {
        cell_id: "cell-a".into(),
        run_id: run.into(),
        transport: CellTransport::Hybrid {
            uds_path: "/nonexistent/vmm.sock".into(),
        },
    }
}

fn decls(text: &str) -> Declarations {
    Declarations::parse(text).unwrap()
}

const TWO: &str = r#"
[[probe]]
name = "ping"
kind = "unix-connect"
path = "/run/x.sock"
interval_ms = 10000

[[probe]]
name = "once"
kind = "file"
path = "/etc/hostname"
run_once = true
mode = "observe"

[[probe]]
name = "off"
kind = "exec"
command = ["/bin/true"]
mode = "disabled"
"#;

fn runs(actions: &[Action]) -> Vec<(u64, usize, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Run {
                generation,
                index,
                spec,
            } => Some((*generation, *index, spec.name.clone())),
            _ => None,
        })
        .collect()
}

fn types(actions: &[Action]) -> Vec<&'static str> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Emit(e) => Some(e.event_type().rsplit('.').next().unwrap()),
            _ => None,
        })
        .collect()
}

#[test]
fn parse_floors_interval_and_defaults() {
    let d = decls(
        r#"
[[probe]]
name = "fast"
kind = "vsock-connect"
port = 52
interval_ms = 100
"#,
    );
    assert_eq!(d.probes[0].interval_ms, MIN_INTERVAL_MS);
    assert_eq!(d.probes[0].mode, Mode::Enforce);
    assert_eq!(d.probes[0].kind, ProbeKind::VsockConnect { port: 52 });
    assert!(d.warnings[0].contains("floor"), "{:?}", d.warnings);
}

#[test]
fn unknown_mode_is_enforce_with_warning() {
    let d = decls(
        r#"
[[probe]]
name = "p"
kind = "file"
path = "/x"
mode = "enforcing"
"#,
    );
    assert_eq!(d.probes[0].mode, Mode::Enforce);
    assert!(d.warnings.iter().any(|w| w.contains("unknown probe mode")));
}

#[test]
fn invalid_declarations_are_refused() {
    for (text, needle) in [
        ("[[probe]]\nname = \"a\"\nkind = \"teleport\"\n", "unknown kind"),
        ("[[probe]]\nname = \"a\"\nkind = \"vsock-connect\"\n", "port"),
        ("[[probe]]\nname = \"a\"\nkind = \"exec\"\ncommand = []\n", "command"),
        (
            "[[probe]]\nname = \"a\"\nkind = \"file\"\npath = \"/x\"\n[[probe]]\nname = \"a\"\nkind = \"file\"\npath = \"/y\"\n",
            "twice",
        ),
        ("[[probe]]\nname = \"\"\nkind = \"file\"\npath = \"/x\"\n", "names"),
    ] {
        let err = Declarations::parse(text).unwrap_err();
        assert!(err.to_string().contains(needle), "{err} lacks {needle}");
    }
    assert!(matches!(
        Declarations::parse("[[probe]]\nname = 1\n"),
        Err(ProbeError::Toml(_))
    ));
    let mut many = String::new();
    for i in 0..65 {
        many.push_str("[[probe]]\nname = \"p");
        many.push_str(&i.to_string());
        many.push_str("\"\nkind = \"file\"\npath = \"/x\"\n");
    }
    assert!(matches!(
        Declarations::parse(&many),
        Err(ProbeError::TooMany { count: 65 })
    ));
}

#[test]
fn reset_aborts_then_declares_topology_before_any_result() {
    let mut set = ProbeSet::new(target("r1"));
    let actions = set.reset(target("r1"), &decls(TWO), 0);
    assert_eq!(actions[0], Action::AbortAll);
    let ProbeEvent::TopologyDeclared { probes, run_id, .. } = (match &actions[1] {
        Action::Emit(e) => e.clone(),
        other => panic!("expected topology, got {other:?}"),
    }) else {
        panic!("expected topology");
    };
    assert_eq!(run_id, "r1");
    assert_eq!(probes.len(), 3, "disabled probes are declared too");
    assert_eq!(probes[2].mode, Mode::Disabled);
    assert_eq!(actions.len(), 2, "no run or result in a reset");

    // One ticker per non-disabled probe.
    let started = set.step(0);
    assert_eq!(
        runs(&started),
        vec![(1, 0, "ping".into()), (1, 1, "once".into())]
    );
    // Re-stepping while in flight does not start them again.
    assert!(set.step(SEC).is_empty());

    // A new run: the old checks' completions are stale and ignored.
    let actions = set.reset(target("r2"), &decls(TWO), 2 * SEC);
    assert_eq!(actions[0], Action::AbortAll);
    assert_eq!(types(&actions), vec!["topology_declared"]);
    assert!(set.complete(1, 0, ProbeOutcome::pass("")).is_empty());
    let started = set.step(2 * SEC);
    assert_eq!(
        runs(&started),
        vec![(2, 0, "ping".into()), (2, 1, "once".into())]
    );
    let events = set.complete(2, 0, ProbeOutcome::pass("ok"));
    assert_eq!(types(&events), vec!["observed_first", "result"]);
    let Action::Emit(ProbeEvent::Result(o)) = &events[1] else {
        panic!()
    };
    assert_eq!(o.run_id, "r2");
    // Unknown index: ignored, no panic.
    assert!(set.complete(2, 99, ProbeOutcome::pass("")).is_empty());
}

#[test]
fn manual_clock_interval_and_run_once() {
    let mut set = ProbeSet::new(target("r1"));
    set.reset(target("r1"), &decls(TWO), 0);
    assert_eq!(set.next_deadline(), Some(0));
    set.step(0);
    assert_eq!(set.in_flight(), 2);
    assert_eq!(set.next_deadline(), None, "both in flight");
    set.complete(1, 0, ProbeOutcome::pass(""));
    set.complete(1, 1, ProbeOutcome::pass(""));
    // ping every 10 s from its start; `once` never again.
    assert_eq!(set.next_deadline(), Some(10 * SEC));
    assert!(set.step(10 * SEC - 1).is_empty());
    assert_eq!(runs(&set.step(10 * SEC)), vec![(1, 0, "ping".into())]);
    set.complete(1, 0, ProbeOutcome::pass(""));
    assert_eq!(runs(&set.step(20 * SEC)), vec![(1, 0, "ping".into())]);
    // A check still running at its due time is not doubled; it runs when it has finished.
    assert!(set.step(30 * SEC).is_empty());
    set.complete(1, 0, ProbeOutcome::pass(""));
    assert_eq!(set.next_deadline(), Some(30 * SEC));
    assert_eq!(runs(&set.step(31 * SEC)), vec![(1, 0, "ping".into())]);
}

#[test]
fn failure_first_is_edge_triggered() {
    let mut set = ProbeSet::new(target("r1"));
    set.reset(target("r1"), &decls(TWO), 0);
    let mut now = 0;
    let mut tick = |set: &mut ProbeSet, status: Status| {
        let run = runs(&set.step(now));
        assert_eq!(run[0].2, "ping");
        now += 10 * SEC;
        let outcome = match status {
            Status::Pass => ProbeOutcome::pass(""),
            Status::Fail => ProbeOutcome::fail("refused"),
        };
        types(&set.complete(1, 0, outcome))
    };
    // First result a failure: observed_first carries it; no pass->fail edge yet.
    assert_eq!(
        tick(&mut set, Status::Fail),
        vec!["observed_first", "result"]
    );
    assert_eq!(tick(&mut set, Status::Pass), vec!["result"]);
    assert_eq!(
        tick(&mut set, Status::Fail),
        vec!["failure_first", "result"]
    );
    assert_eq!(tick(&mut set, Status::Fail), vec!["result"]);
    assert_eq!(tick(&mut set, Status::Pass), vec!["result"]);
    assert_eq!(
        tick(&mut set, Status::Fail),
        vec!["failure_first", "result"]
    );
}

#[test]
fn event_types_and_data() {
    let mut set = ProbeSet::new(target("r1"));
    set.reset(target("r1"), &decls(TWO), 0);
    set.step(0);
    set.complete(1, 0, ProbeOutcome::pass(""));
    set.step(10 * SEC);
    let events = set.complete(1, 0, ProbeOutcome::fail("connection refused"));
    let Action::Emit(e) = &events[0] else {
        panic!()
    };
    assert_eq!(e.event_type(), "dev.vigil.probe.v1.failure_first");
    assert_eq!(e.cell_run(), ("cell-a", "r1"));
    let data = e.data();
    assert_eq!(data["cellId"], "cell-a");
    assert_eq!(data["runId"], "r1");
    assert_eq!(data["probe"], "ping");
    assert_eq!(data["kind"], "unix-connect");
    assert_eq!(data["mode"], "enforce");
    assert_eq!(data["status"], "fail");
    assert_eq!(data["reason"], "connection refused");
    let topo = &set.reset(target("r1"), &decls(TWO), 0)[1];
    let Action::Emit(t) = topo else { panic!() };
    assert_eq!(t.event_type(), "dev.vigil.probe.v1.topology_declared");
    assert_eq!(t.data()["probes"][1]["runOnce"], true);
    assert_eq!(t.data()["probes"][0]["intervalMs"], 10_000);
}

fn spec(kind: ProbeKind, timeout_ms: u64) -> ProbeSpec {
    ProbeSpec {
        name: "t".into(),
        kind,
        interval_ms: MIN_INTERVAL_MS,
        run_once: false,
        mode: Mode::Enforce,
        timeout_ms,
    }
}

#[tokio::test]
async fn exec_pass_fail_and_timeout() {
    let t = target("r");
    let o = ProbeOptions::default();
    let ok = run_check(
        &spec(
            ProbeKind::Exec {
                command: vec!["true".into()],
            },
            5_000,
        ),
        &t,
        o,
    )
    .await;
    assert_eq!(ok.status, Status::Pass);
    let bad = run_check(
        &spec(
            ProbeKind::Exec {
                command: vec!["false".into()],
            },
            5_000,
        ),
        &t,
        o,
    )
    .await;
    assert_eq!(bad.status, Status::Fail);
    let missing = run_check(
        &spec(
            ProbeKind::Exec {
                command: vec!["/nonexistent/cmd".into()],
            },
            5_000,
        ),
        &t,
        o,
    )
    .await;
    assert!(missing.reason.contains("cannot start"), "{missing:?}");
    let started = Instant::now();
    let slow = run_check(
        &spec(
            ProbeKind::Exec {
                command: vec!["sleep".into(), "30".into()],
            },
            200,
        ),
        &t,
        o,
    )
    .await;
    assert_eq!(slow.status, Status::Fail);
    assert!(slow.reason.contains("timed out after 200 ms"), "{slow:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn unix_connect_and_file_against_real_paths() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("svc.sock");
    let _listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let t = target("r");
    let o = ProbeOptions::default();
    let up = run_check(
        &spec(ProbeKind::UnixConnect { path: sock.clone() }, 1_000),
        &t,
        o,
    )
    .await;
    assert_eq!(up.status, Status::Pass, "{up:?}");
    let down = run_check(
        &spec(
            ProbeKind::UnixConnect {
                path: dir.path().join("none.sock"),
            },
            1_000,
        ),
        &t,
        o,
    )
    .await;
    assert_eq!(down.status, Status::Fail);

    let file = dir.path().join("state");
    std::fs::write(&file, "phase=ready\n").unwrap();
    let probe = |contains: Option<&str>, path: &std::path::Path| {
        spec(
            ProbeKind::File {
                path: path.to_owned(),
                contains: contains.map(str::to_owned),
            },
            1_000,
        )
    };
    assert_eq!(
        run_check(&probe(None, &file), &t, o).await.status,
        Status::Pass
    );
    assert_eq!(
        run_check(&probe(Some("phase=ready"), &file), &t, o)
            .await
            .status,
        Status::Pass
    );
    assert_eq!(
        run_check(&probe(Some("phase=down"), &file), &t, o)
            .await
            .status,
        Status::Fail
    );
    assert_eq!(
        run_check(&probe(None, &dir.path().join("gone")), &t, o)
            .await
            .status,
        Status::Fail
    );
}

/// A fake VMM: accepts one connection on `uds_path`, checks the CONNECT line arrived in one
/// read, and answers `answer` (or closes when `None`).
async fn fake_vmm(listener: tokio::net::UnixListener, answer: Option<&'static [u8]>) -> String {
    let (mut s, _) = listener.accept().await.unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).await.unwrap();
    if let Some(a) = answer {
        s.write_all(a).await.unwrap();
    }
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn hybrid_vsock_connect_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vmm.vsock");
    let t = CellTarget {
        cell_id: "c".into(),
        run_id: "r".into(),
        transport: CellTransport::Hybrid {
            uds_path: uds.clone(),
        },
    };
    let o = ProbeOptions::default();
    let p = spec(ProbeKind::VsockConnect { port: 52 }, 2_000);

    let listener = tokio::net::UnixListener::bind(&uds).unwrap();
    let vmm = tokio::spawn(fake_vmm(listener, Some(b"OK 1234\n")));
    let out = run_check(&p, &t, o).await;
    assert_eq!(vmm.await.unwrap(), "CONNECT 52\n");
    assert_eq!(out.status, Status::Pass, "{out:?}");
    assert!(out.reason.contains("1234"));

    std::fs::remove_file(&uds).unwrap();
    let listener = tokio::net::UnixListener::bind(&uds).unwrap();
    let vmm = tokio::spawn(fake_vmm(listener, None));
    let out = run_check(&p, &t, o).await;
    vmm.await.unwrap();
    assert_eq!(out.status, Status::Fail);
    assert!(
        out.reason.contains("nothing listens on guest port 52"),
        "{out:?}"
    );

    std::fs::remove_file(&uds).unwrap();
    let listener = tokio::net::UnixListener::bind(&uds).unwrap();
    let vmm = tokio::spawn(fake_vmm(listener, Some(b"ERR no\n")));
    let out = run_check(&p, &t, o).await;
    vmm.await.unwrap();
    assert_eq!(out.status, Status::Fail);
    assert!(out.reason.contains("unexpected VMM answer"), "{out:?}");

    std::fs::remove_file(&uds).unwrap();
    let out = run_check(&p, &t, o).await;
    assert!(out.reason.contains("VMM socket"), "{out:?}");
}

#[tokio::test]
async fn af_vsock_connect_is_refused_outside_the_test_vm() {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if cmdline_has_vmtest_token(&cmdline) {
        println!("SKIPPED: running inside the test VM, where AF_VSOCK connects are allowed");
        return;
    }
    assert!(cmdline_has_vmtest_token(
        "quiet vigil_vmtest=1 console=ttyS0"
    ));
    assert!(!cmdline_has_vmtest_token(
        "quiet vigil_vmtest=10 novigil_vmtest=1"
    ));
    let t = CellTarget {
        cell_id: "c".into(),
        run_id: "r".into(),
        transport: CellTransport::Vsock { cid: 3 },
    };
    let out = run_check(
        &spec(ProbeKind::VsockConnect { port: 52 }, 1_000),
        &t,
        ProbeOptions {
            allow_vsock_connect: false,
        },
    )
    .await;
    assert_eq!(out.status, Status::Fail);
    assert!(out.reason.starts_with("refused:"), "{out:?}");
}

async fn next(rx: &mut mpsc::Receiver<ProbeEvent>) -> ProbeEvent {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("an event within 10 s")
        .expect("driver alive")
}

#[tokio::test]
async fn driver_orders_events_and_reset_aborts_running_checks() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("marker");
    std::fs::write(&marker, "x").unwrap();
    let slow = format!(
        "[[probe]]\nname = \"slow\"\nkind = \"exec\"\ncommand = [\"sleep\", \"30\"]\ntimeout_ms = 60000\n\
         [[probe]]\nname = \"file\"\nkind = \"file\"\npath = \"{}\"\n",
        marker.display()
    );
    let (tx, mut rx) = mpsc::channel(16);
    let driver = ProbeDriver::spawn(target("r1"), decls(&slow), tx, ProbeOptions::default());
    let first = next(&mut rx).await;
    assert_eq!(first.event_type(), "dev.vigil.probe.v1.topology_declared");
    let e = next(&mut rx).await;
    assert_eq!(e.event_type(), "dev.vigil.probe.v1.observed_first");
    assert_eq!(e.data()["probe"], "file");
    assert_eq!(
        next(&mut rx).await.event_type(),
        "dev.vigil.probe.v1.result"
    );

    // `slow` is still running. A new run: it is aborted (its child killed), and the new
    // topology comes before anything else.
    let fast = format!(
        "[[probe]]\nname = \"file2\"\nkind = \"file\"\npath = \"{}\"\n",
        marker.display()
    );
    driver.reset(target("r2"), decls(&fast)).await.unwrap();
    let topo = next(&mut rx).await;
    assert_eq!(topo.event_type(), "dev.vigil.probe.v1.topology_declared");
    assert_eq!(topo.cell_run().1, "r2");
    let e = next(&mut rx).await;
    assert_eq!(e.event_type(), "dev.vigil.probe.v1.observed_first");
    assert_eq!(e.data()["probe"], "file2");
    assert_eq!(e.data()["runId"], "r2");
    assert_eq!(
        next(&mut rx).await.event_type(),
        "dev.vigil.probe.v1.result"
    );
    // Nothing of run r1 arrives later (the next tick of file2 is 30 s away).
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err(),
        "no stale event after the reset"
    );
    driver.stop().await;
    assert!(
        rx.recv().await.is_none(),
        "driver ended and dropped its sender"
    );
}
