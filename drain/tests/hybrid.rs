//! Integration tests of the real drain loop (real io_uring, real Unix sockets in a tempdir —
//! the hybrid-vsock path) and of the AF_VSOCK listener's bind (never a connect).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vigil_drain::{
    spawn, CellSlot, CellSpec, CloseReason, ConnId, DrainCommand, DrainConfig, DrainHandle,
    DrainOutput, DrainStats, HANDOFF_CAPACITY,
};
use vigil_wire::frame::{encode_guest_frame, HostFrameDecoder, PROTOCOL_VERSION};
use vigil_wire::pb;

const PORT: u32 = 7411;
const WAIT: Duration = Duration::from_secs(20);

fn cell(dir: &Path, name: &str) -> CellSpec {
    CellSpec {
        cell_id: name.to_owned(),
        run_id: format!("{name}-run1"),
        cid: None,
        uds_path: Some(dir.join(format!("{name}.vsock"))),
        slot: CellSlot::shared(),
    }
}

fn listener_path(spec: &CellSpec) -> PathBuf {
    PathBuf::from(format!(
        "{}_{PORT}",
        spec.uds_path.as_ref().unwrap().display()
    ))
}

fn config() -> DrainConfig {
    let mut c = DrainConfig::new(PORT);
    c.listen_vsock = false;
    c
}

fn hello(stream: &str) -> Vec<u8> {
    let mut claims = HashMap::new();
    claims.insert("cell_id".to_owned(), "i-am-someone-else".to_owned());
    let mut out = Vec::new();
    encode_guest_frame(
        &pb::GuestFrame {
            kind: Some(pb::guest_frame::Kind::Hello(pb::Hello {
                protocol_version: PROTOCOL_VERSION,
                stream_id: stream.to_owned(),
                agent_name: "test".to_owned(),
                agent_version: "0".to_owned(),
                claims,
            })),
        },
        &mut out,
    );
    out
}

fn event(seq: u64, out: &mut Vec<u8>) {
    encode_guest_frame(
        &pb::GuestFrame {
            kind: Some(pb::guest_frame::Kind::Event(pb::Event {
                guest_seq: seq,
                r#type: "dev.vigil.test".to_owned(),
                op_id: String::new(),
                content_type: "application/octet-stream".to_owned(),
                payload: vec![(seq % 251) as u8; 200],
                guest_time_unix_nano: seq,
            })),
        },
        out,
    );
}

/// Connects, says Hello, then writes `frames` events batched 16 per write.
fn send_stream(path: &Path, stream: &str, frames: u64) -> UnixStream {
    let mut s = UnixStream::connect(path).unwrap();
    s.write_all(&hello(stream)).unwrap();
    let mut buf = Vec::new();
    for seq in 1..=frames {
        event(seq, &mut buf);
        if seq % 16 == 0 || seq == frames {
            s.write_all(&buf).unwrap();
            buf.clear();
        }
    }
    s
}

/// Reads outputs until `done` says stop; panics after WAIT. Returns the outputs other than
/// batches: batches are dropped at once, as a real consumer does, which gives their
/// connection's hand-off credit back.
fn collect_until(h: &DrainHandle, mut done: impl FnMut(&DrainOutput) -> bool) -> Vec<DrainOutput> {
    let deadline = Instant::now() + WAIT;
    let mut all = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(out) = h.outputs().recv_timeout(left) else {
            panic!(
                "no drain output within the deadline; stats: {:?}",
                h.stats()
            );
        };
        let stop = done(&out);
        if !matches!(out, DrainOutput::Batch(_)) {
            all.push(out);
        }
        if stop {
            return all;
        }
    }
}

/// Reads host frames from the client side until EOF.
fn read_host_frames(s: &mut UnixStream) -> Vec<pb::HostFrame> {
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut dec = HostFrameDecoder::new(1 << 16);
    let mut frames = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return frames,
            Ok(n) => dec
                .feed(&buf[..n], &mut |f| -> Result<(), ()> {
                    frames.push(f);
                    Ok(())
                })
                .unwrap(),
        }
    }
}

fn error_code(frames: &[pb::HostFrame]) -> Vec<(i32, String)> {
    frames
        .iter()
        .filter_map(|f| match &f.kind {
            Some(pb::host_frame::Kind::Error(e)) => Some((e.code, e.message.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn three_cells_thousands_of_frames_in_order_with_listener_identity() {
    const CELLS: usize = 3;
    const CONNS_PER_CELL: usize = 2;
    const FRAMES: u64 = 5000;
    let dir = tempfile::tempdir().unwrap();
    let specs: Vec<CellSpec> = (0..CELLS)
        .map(|i| cell(dir.path(), &format!("cell{i}")))
        .collect();
    let h = spawn(config(), specs.clone()).unwrap();
    let writers: Vec<_> = specs
        .iter()
        .flat_map(|spec| (0..CONNS_PER_CELL).map(move |k| (spec.clone(), k)))
        .map(|(spec, k)| {
            std::thread::spawn(move || {
                let s = send_stream(
                    &listener_path(&spec),
                    &format!("{}/{k}", spec.cell_id),
                    FRAMES,
                );
                drop(s);
            })
        })
        .collect();
    let total = (CELLS * CONNS_PER_CELL) as u64 * FRAMES;
    let mut got = 0u64;
    let mut last: HashMap<ConnId, u64> = HashMap::new();
    let mut closed = 0;
    collect_until(&h, |out| {
        match out {
            DrainOutput::Batch(b) => {
                // Identity comes from the accepting listener: the stream named "cellN/k" must
                // have arrived on cellN's socket, whatever the Hello claims said.
                let expect = b.stream_id.split('/').next().unwrap();
                assert_eq!(&*b.cell.cell_id, expect);
                assert_eq!(&*b.cell.run_id, format!("{expect}-run1"));
                for e in &b.events {
                    let prev = last.entry(b.conn).or_insert(0);
                    assert_eq!(e.guest_seq, *prev + 1, "in order per connection");
                    *prev = e.guest_seq;
                    assert_eq!(e.payload(), vec![(e.guest_seq % 251) as u8; 200]);
                    assert_eq!(e.event_type(), "dev.vigil.test");
                }
                got += b.events.len() as u64;
            }
            DrainOutput::Hello { claims, .. } => {
                assert_eq!(
                    claims.get("cell_id").map(String::as_str),
                    Some("i-am-someone-else")
                );
            }
            DrainOutput::Closed { reason, .. } => {
                assert_eq!(*reason, CloseReason::PeerClosed);
                closed += 1;
            }
            _ => {}
        }
        got == total && closed == CELLS * CONNS_PER_CELL
    });
    for w in writers {
        w.join().unwrap();
    }
    assert_eq!(last.len(), CELLS * CONNS_PER_CELL);
    assert!(last.values().all(|&v| v == FRAMES));
    for spec in &specs {
        assert_eq!(
            spec.slot.frames.load(std::sync::atomic::Ordering::Relaxed),
            CONNS_PER_CELL as u64 * (FRAMES + 1),
            "hello + events counted per cell"
        );
        assert!(
            spec.slot
                .last_frame_mono_ns
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
        );
        assert_eq!(
            spec.slot
                .connections
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
    }
    assert_eq!(
        DrainStats::get(&h.stats().frames),
        (CELLS * CONNS_PER_CELL) as u64 * (FRAMES + 1)
    );
    assert_eq!(
        h.stats().closes(CloseReason::PeerClosed),
        (CELLS * CONNS_PER_CELL) as u64
    );
    h.shutdown().unwrap();
}

#[test]
fn removed_cell_closes_its_connections_and_its_path_refuses_connects() {
    let dir = tempfile::tempdir().unwrap();
    let h = spawn(config(), Vec::new()).unwrap();
    let spec = cell(dir.path(), "late");
    let path = listener_path(&spec);
    h.send(DrainCommand::AddCell(spec.clone())).unwrap();
    let deadline = Instant::now() + WAIT;
    while !path.exists() {
        assert!(Instant::now() < deadline, "listener appears after AddCell");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let mut s = send_stream(&path, "s", 3);
    collect_until(
        &h,
        |o| matches!(o, DrainOutput::Batch(b) if b.events.last().is_some_and(|e| e.guest_seq == 3)),
    );
    h.send(DrainCommand::RemoveCell {
        cell: "late".into(),
    })
    .unwrap();
    collect_until(&h, |o| {
        matches!(
            o,
            DrainOutput::Closed {
                reason: CloseReason::CellRemoved,
                ..
            }
        )
    });
    let codes = error_code(&read_host_frames(&mut s));
    assert_eq!(codes.len(), 1);
    assert_eq!(codes[0].0, pb::error::Code::Unregistered as i32);
    assert!(!path.exists(), "socket file removed");
    assert!(UnixStream::connect(&path).is_err());
    assert_eq!(h.stats().closes(CloseReason::CellRemoved), 1);
    h.shutdown().unwrap();
}

#[test]
fn flood_with_stalled_consumer_does_not_starve_another_connection_and_loses_nothing() {
    const FLOOD: u64 = 60_000;
    let dir = tempfile::tempdir().unwrap();
    let a = cell(dir.path(), "flood");
    let b = cell(dir.path(), "quiet");
    let h = spawn(config(), vec![a.clone(), b.clone()]).unwrap();
    // The consumer is stalled (nothing reads the outputs) while A floods.
    let pa = listener_path(&a);
    let flood = std::thread::spawn(move || drop(send_stream(&pa, "flood/0", FLOOD)));
    // Wait until A is paused by its quota (it cannot fill the channel).
    let deadline = Instant::now() + WAIT;
    while DrainStats::get(&h.stats().backpressure_pauses) == 0 {
        assert!(Instant::now() < deadline, "flood connection gets paused");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        h.outputs().len() < HANDOFF_CAPACITY,
        "one connection cannot fill the channel"
    );
    // B now sends a few events; they must get into the channel although nobody reads yet.
    let quiet = send_stream(&listener_path(&b), "quiet/0", 10);
    let deadline = Instant::now() + WAIT;
    let mut seen_b = 0;
    let mut outputs_before_b = 0;
    let mut flood_last = 0u64;
    let mut flood_seen = 0u64;
    // Resume: drain everything, checking B's events come before A's backlog is through.
    while seen_b < 10 || flood_seen < FLOOD {
        let out = h
            .outputs()
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap();
        if seen_b < 10 {
            outputs_before_b += 1;
        }
        if let DrainOutput::Batch(batch) = out {
            if &*batch.cell.cell_id == "quiet" {
                seen_b += batch.events.len();
            } else {
                for e in &batch.events {
                    assert_eq!(e.guest_seq, flood_last + 1);
                    flood_last = e.guest_seq;
                    flood_seen += 1;
                }
            }
        }
    }
    assert!(
        outputs_before_b <= HANDOFF_CAPACITY / 2,
        "B's events arrived after {outputs_before_b} outputs, not behind A's whole backlog"
    );
    assert_eq!(flood_last, FLOOD, "nothing of the flood was lost");
    flood.join().unwrap();
    drop(quiet);
    h.shutdown().unwrap();
}

#[test]
fn paused_consumer_then_resumed_loses_nothing() {
    const FRAMES: u64 = 20_000;
    let dir = tempfile::tempdir().unwrap();
    let specs: Vec<CellSpec> = (0..3)
        .map(|i| cell(dir.path(), &format!("bp{i}")))
        .collect();
    let h = spawn(config(), specs.clone()).unwrap();
    let writers: Vec<_> = specs
        .iter()
        .map(|s| {
            let p = listener_path(s);
            let name = s.cell_id.clone();
            std::thread::spawn(move || drop(send_stream(&p, &name, FRAMES)))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(400));
    let mut per_cell: HashMap<String, u64> = HashMap::new();
    let mut done = 0;
    collect_until(&h, |o| {
        if let DrainOutput::Batch(b) = o {
            let n = per_cell.entry(b.cell.cell_id.to_string()).or_default();
            for e in &b.events {
                assert_eq!(e.guest_seq, *n + 1);
                *n += 1;
            }
            if *n == FRAMES {
                done += 1;
            }
        }
        done == 3
    });
    for w in writers {
        w.join().unwrap();
    }
    assert!(
        DrainStats::get(&h.stats().backpressure_pauses) > 0,
        "the pause was felt"
    );
    h.shutdown().unwrap();
}

fn raw_frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::encode_varint(body.len() as u64, &mut out);
    out.extend_from_slice(body);
    out
}

#[test]
fn every_bad_input_gets_its_error_frame_and_counter() {
    let dir = tempfile::tempdir().unwrap();
    let spec = cell(dir.path(), "bad");
    let path = listener_path(&spec);
    let mut cfg = config();
    cfg.hello_timeout = Duration::from_millis(300);
    let h = spawn(cfg, vec![spec]).unwrap();

    // A healthy connection that must stay undisturbed throughout.
    let mut healthy = send_stream(&path, "healthy", 5);

    let mut event_first = Vec::new();
    event(1, &mut event_first);
    let mut second_hello = hello("x");
    second_hello.extend(hello("y"));
    let mut bad_version = Vec::new();
    encode_guest_frame(
        &pb::GuestFrame {
            kind: Some(pb::guest_frame::Kind::Hello(pb::Hello {
                protocol_version: 99,
                stream_id: "v".into(),
                ..Default::default()
            })),
        },
        &mut bad_version,
    );
    let mut oversize = Vec::new();
    prost::encoding::encode_varint(10 * 1024 * 1024, &mut oversize);
    let bad_varint = vec![0xFFu8; 11];
    let mut undecodable = hello("u");
    undecodable.extend(raw_frame(&[0xFF, 0xFF, 0xFF, 0x07]));
    let cases: Vec<(&str, Vec<u8>, pb::error::Code, CloseReason)> = vec![
        (
            "event before hello",
            event_first,
            pb::error::Code::HelloRequired,
            CloseReason::HelloRequired,
        ),
        (
            "second hello",
            second_hello,
            pb::error::Code::BadHello,
            CloseReason::SecondHello,
        ),
        (
            "unknown version",
            bad_version,
            pb::error::Code::UnsupportedVersion,
            CloseReason::UnsupportedVersion,
        ),
        (
            "oversize frame",
            oversize,
            pb::error::Code::FrameTooLarge,
            CloseReason::FrameTooLarge,
        ),
        (
            "bad varint",
            bad_varint,
            pb::error::Code::BadVarint,
            CloseReason::BadVarint,
        ),
        (
            "undecodable",
            undecodable,
            pb::error::Code::Undecodable,
            CloseReason::Undecodable,
        ),
        (
            "silent peer",
            Vec::new(),
            pb::error::Code::IdleTimeout,
            CloseReason::HelloTimeout,
        ),
    ];
    for (what, bytes, code, reason) in cases {
        let before = h.stats().closes(reason);
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(&bytes).unwrap();
        let errors = error_code(&read_host_frames(&mut s));
        assert_eq!(
            errors.len(),
            1,
            "{what}: exactly one Error frame, got {errors:?}"
        );
        assert_eq!(errors[0].0, code as i32, "{what}: code");
        assert!(
            errors[0].1.len() > 10,
            "{what}: a sentence, got {:?}",
            errors[0].1
        );
        collect_until(
            &h,
            |o| matches!(o, DrainOutput::Closed { reason: r, .. } if *r == reason),
        );
        assert_eq!(h.stats().closes(reason), before + 1, "{what}: counted");
    }
    // The healthy connection still works: more events arrive and an ack reaches it.
    let mut more = Vec::new();
    event(6, &mut more);
    healthy.write_all(&more).unwrap();
    let mut conn = None;
    collect_until(&h, |o| match o {
        DrainOutput::Batch(b) if b.events.iter().any(|e| e.guest_seq == 6) => {
            conn = Some(b.conn);
            true
        }
        _ => false,
    });
    let conn = conn.unwrap();
    h.send(DrainCommand::Ack {
        conn,
        durable_seq: 6,
    })
    .unwrap();
    let mut dec = HostFrameDecoder::new(1 << 16);
    let mut buf = [0u8; 256];
    healthy.set_read_timeout(Some(WAIT)).unwrap();
    let n = healthy.read(&mut buf).unwrap();
    let mut acks = Vec::new();
    dec.feed(&buf[..n], &mut |f| -> Result<(), ()> {
        acks.push(f);
        Ok(())
    })
    .unwrap();
    assert_eq!(
        acks,
        vec![pb::HostFrame {
            kind: Some(pb::host_frame::Kind::Ack(pb::Ack { durable_seq: 6 }))
        }]
    );
    h.shutdown().unwrap();
}

#[test]
fn peer_close_is_detected_and_acks_and_decisions_arrive_as_host_frames() {
    let dir = tempfile::tempdir().unwrap();
    let spec = cell(dir.path(), "acks");
    let slot = Arc::clone(&spec.slot);
    let path = listener_path(&spec);
    let h = spawn(config(), vec![spec]).unwrap();
    let mut s = send_stream(&path, "acks/0", 32);
    let mut q = Vec::new();
    encode_guest_frame(
        &pb::GuestFrame {
            kind: Some(pb::guest_frame::Kind::PolicyQuery(pb::PolicyQuery {
                query_id: 77,
                op_id: "t:s".into(),
                action: "net.connect".into(),
            })),
        },
        &mut q,
    );
    s.write_all(&q).unwrap();
    let outs = collect_until(&h, |o| matches!(o, DrainOutput::PolicyQuery { .. }));
    let conn = outs
        .iter()
        .find_map(|o| match o {
            DrainOutput::Connected { conn, .. } => Some(*conn),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        slot.connections.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    h.send(DrainCommand::Ack {
        conn,
        durable_seq: 16,
    })
    .unwrap();
    h.send(DrainCommand::Ack {
        conn,
        durable_seq: 32,
    })
    .unwrap();
    h.send(DrainCommand::PolicyDecision {
        conn,
        query_id: 77,
        decision: pb::policy_decision::Decision::Allow,
        reason: "allowed by test".into(),
    })
    .unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut dec = HostFrameDecoder::new(1 << 16);
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while got.len() < 3 {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0);
        dec.feed(&buf[..n], &mut |f| -> Result<(), ()> {
            got.push(f);
            Ok(())
        })
        .unwrap();
    }
    assert_eq!(
        got[0].kind,
        Some(pb::host_frame::Kind::Ack(pb::Ack { durable_seq: 16 }))
    );
    assert_eq!(
        got[1].kind,
        Some(pb::host_frame::Kind::Ack(pb::Ack { durable_seq: 32 }))
    );
    match &got[2].kind {
        Some(pb::host_frame::Kind::PolicyDecision(d)) => {
            assert_eq!(d.query_id, 77);
            assert_eq!(d.decision, pb::policy_decision::Decision::Allow as i32);
        }
        other => panic!("expected a decision, got {other:?}"),
    }
    drop(s);
    collect_until(
        &h,
        |o| matches!(o, DrainOutput::Closed { conn: c, reason: CloseReason::PeerClosed, .. } if *c == conn),
    );
    assert_eq!(
        slot.connections.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    // A command for the closed connection is counted as stale, not sent anywhere.
    h.send(DrainCommand::Ack {
        conn,
        durable_seq: 33,
    })
    .unwrap();
    let deadline = Instant::now() + WAIT;
    while DrainStats::get(&h.stats().stale_commands) == 0 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    h.shutdown().unwrap();
}

#[test]
fn inline_policy_denial_answers_on_the_drain_thread() {
    let dir = tempfile::tempdir().unwrap();
    let spec = cell(dir.path(), "deny");
    let path = listener_path(&spec);
    let mut cfg = config();
    cfg.deny_policy_queries_inline = true;
    let h = spawn(cfg, vec![spec]).unwrap();
    let mut s = UnixStream::connect(&path).unwrap();
    let mut bytes = hello("d");
    encode_guest_frame(
        &pb::GuestFrame {
            kind: Some(pb::guest_frame::Kind::PolicyQuery(pb::PolicyQuery {
                query_id: 5,
                op_id: "t:s".into(),
                action: "exec".into(),
            })),
        },
        &mut bytes,
    );
    s.write_all(&bytes).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap();
    let mut dec = HostFrameDecoder::new(1 << 16);
    let mut got = Vec::new();
    dec.feed(&buf[..n], &mut |f| -> Result<(), ()> {
        got.push(f);
        Ok(())
    })
    .unwrap();
    match &got[0].kind {
        Some(pb::host_frame::Kind::PolicyDecision(d)) => {
            assert_eq!(d.query_id, 5);
            assert_eq!(d.decision, pb::policy_decision::Decision::Deny as i32);
            assert_eq!(d.reason, "op-control not available: fail-closed");
        }
        other => panic!("expected a DENY, got {other:?}"),
    }
    assert_eq!(DrainStats::get(&h.stats().policy_denied_inline), 1);
    h.shutdown().unwrap();
}

#[test]
fn shutdown_sends_shutting_down_and_closes() {
    let dir = tempfile::tempdir().unwrap();
    let spec = cell(dir.path(), "bye");
    let path = listener_path(&spec);
    let h = spawn(config(), vec![spec]).unwrap();
    let mut s = send_stream(&path, "bye/0", 4);
    collect_until(&h, |o| matches!(o, DrainOutput::Batch(_)));
    let rest = h.shutdown().unwrap();
    assert!(rest.iter().any(|o| matches!(
        o,
        DrainOutput::Closed {
            reason: CloseReason::Shutdown,
            ..
        }
    )));
    let codes = error_code(&read_host_frames(&mut s));
    assert_eq!(codes.len(), 1);
    assert_eq!(codes[0].0, pb::error::Code::ShuttingDown as i32);
    assert!(!path.exists(), "listener socket file removed at shutdown");
}

#[test]
fn vsock_listener_binds_or_explains_why_not() {
    // Binds only; never connects (a vsock connect here would reach the real hypervisor).
    let mut cfg = DrainConfig::new(0x7A11_0000 + std::process::id() % 1000);
    cfg.listen_vsock = true;
    let h = spawn(cfg, Vec::new()).unwrap();
    match h.vsock_error() {
        None => eprintln!("AF_VSOCK listener bound on this host"),
        Some(e) => {
            let msg = e.to_string();
            eprintln!("AF_VSOCK listener not available: {msg}");
            assert!(
                matches!(
                    e,
                    vigil_drain::SysError::CreateSocket { .. }
                        | vigil_drain::SysError::BindVsock { .. }
                        | vigil_drain::SysError::SetOption { .. }
                ),
                "a typed error: {e:?}"
            );
            assert!(msg.contains("vsock") || msg.contains("VSOCK") || msg.contains("SO_VM"));
        }
    }
    h.shutdown().unwrap();
}

#[test]
fn more_connections_than_ring_buffers_all_deliver_everything() {
    const CONNS: usize = 400;
    const FRAMES: u64 = 64;
    let dir = tempfile::tempdir().unwrap();
    let specs: Vec<CellSpec> = (0..4)
        .map(|i| cell(dir.path(), &format!("many{i}")))
        .collect();
    let h = spawn(config(), specs.clone()).unwrap();
    let mut streams = Vec::new();
    for i in 0..CONNS {
        let spec = &specs[i % specs.len()];
        let mut bytes = hello(&format!("{}/{i}", spec.cell_id));
        for seq in 1..=FRAMES {
            event(seq, &mut bytes);
        }
        let mut s = UnixStream::connect(listener_path(spec)).unwrap();
        s.write_all(&bytes).unwrap();
        streams.push(s);
    }
    drop(streams);
    let mut last: HashMap<ConnId, u64> = HashMap::new();
    let mut closed = 0;
    collect_until(&h, |o| {
        match o {
            DrainOutput::Batch(b) => {
                assert_eq!(b.stream_id.split('/').next().unwrap(), &*b.cell.cell_id);
                for e in &b.events {
                    let prev = last.entry(b.conn).or_default();
                    assert_eq!(e.guest_seq, *prev + 1);
                    *prev += 1;
                }
            }
            DrainOutput::Closed { conn, reason, .. } => {
                assert_eq!(*reason, CloseReason::PeerClosed);
                assert_eq!(last.get(conn), Some(&FRAMES), "all events before Closed");
                closed += 1;
            }
            _ => {}
        }
        closed == CONNS
    });
    assert_eq!(h.stats().closes(CloseReason::PeerClosed), CONNS as u64);
    h.shutdown().unwrap();
}

#[test]
fn close_conn_command_sends_the_given_error_and_closes() {
    let dir = tempfile::tempdir().unwrap();
    let spec = cell(dir.path(), "kick");
    let path = listener_path(&spec);
    let h = spawn(config(), vec![spec]).unwrap();
    let mut s = send_stream(&path, "kick/0", 2);
    let outs = collect_until(&h, |o| matches!(o, DrainOutput::Hello { .. }));
    let conn = outs
        .iter()
        .find_map(|o| match o {
            DrainOutput::Connected { conn, .. } => Some(*conn),
            _ => None,
        })
        .unwrap();
    h.send(DrainCommand::CloseConn {
        conn,
        code: pb::error::Code::ShuttingDown,
        message: "the operator closed this connection".into(),
    })
    .unwrap();
    let errors = error_code(&read_host_frames(&mut s));
    assert_eq!(
        errors,
        vec![(
            pb::error::Code::ShuttingDown as i32,
            "the operator closed this connection".to_owned()
        )]
    );
    collect_until(
        &h,
        |o| matches!(o, DrainOutput::Closed { conn: c, reason: CloseReason::Command, .. } if *c == conn),
    );
    h.shutdown().unwrap();
}
