//! Crash recovery: a child process (this test binary re-executed) writes events and prints
//! every ack; it is SIGKILLed at a random point; the journal reopened must verify clean,
//! hold every acked event exactly once, and continue its chains.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::*;
use vigil_journal::segment::{list_segments, scan_segment};
use vigil_journal::{Record, SigningMode};

const CHILD_ENV: &str = "VIGIL_JOURNAL_CRASH_CHILD_DIR";
const MODE_ENV: &str = "VIGIL_JOURNAL_CRASH_CHILD_MODE";

/// In the child: write events of 3 streams as fast as acks come back, printing each ack.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mode = if std::env::var(MODE_ENV).as_deref() == Ok("per-event") {
        SigningMode::PerEvent
    } else {
        SigningMode::Batch
    };
    let h = vigil_journal::spawn(config(dir.as_ref(), mode), key()).unwrap();
    let acks = h.acks.clone();
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let acked2 = acked.clone();
    std::thread::spawn(move || {
        while let Ok(batch) = acks.recv() {
            for a in batch {
                println!("ACK {} {}", a.stream_id, a.durable_seq);
                if &*a.stream_id == "s0" {
                    acked2.fetch_max(a.durable_seq, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    });
    for seq in 1.. {
        // At most 8 seqs in flight, so the journal stays small enough to verify quickly.
        while seq > acked.load(std::sync::atomic::Ordering::Relaxed) + 8 {
            std::thread::yield_now();
        }
        let batch = (0..3)
            .map(|s| guest_event(s, "c1", "r1", &format!("s{s}"), seq))
            .collect();
        h.input.send(batch).unwrap();
        if seq % 8 == 0 {
            h.input.send(vec![own_event("c1", "r1")]).unwrap();
        }
    }
}

fn random_below(n: u64) -> u64 {
    let mut b = [0u8; 8];
    rand_fill(&mut b);
    u64::from_le_bytes(b) % n
}

fn rand_fill(b: &mut [u8]) {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(b)
        .unwrap();
}

fn crash_and_check(mode: &str, signing: SigningMode) {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir.path())
        .env(MODE_ENV, mode)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let kill_after = 10 + random_below(150);
    let mut acked: HashMap<String, u64> = HashMap::new();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut n = 0;
    while n < kill_after {
        let Some(Ok(line)) = lines.next() else { break };
        if let Some(rest) = line.strip_prefix("ACK ") {
            let (s, q) = rest.split_once(' ').unwrap();
            let q: u64 = q.parse().unwrap();
            let e = acked.entry(s.to_owned()).or_default();
            *e = (*e).max(q);
            n += 1;
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(n >= kill_after, "the child stopped early after {n} acks");
    println!("{mode}: killed after {n} acks: {acked:?}");

    // Reopen: recovery truncates any torn tail; the chain continues.
    let h = vigil_journal::spawn(config(dir.path(), signing), key()).unwrap();
    h.input.send(vec![own_event("c1", "r1")]).unwrap();
    h.input
        .send(vec![guest_event(0, "c1", "r1", "s0", 1)])
        .unwrap();
    wait_ack(&h, "s0", 1);
    h.shutdown().unwrap();
    let sum = vigil_journal::verify(dir.path(), &[key().verifying_key()])
        .unwrap_or_else(|e| panic!("verify after crash: {e}"));
    assert!(sum.events > 0);

    let mut seen: HashMap<(String, u64), u32> = HashMap::new();
    for (i, p) in list_segments(dir.path()).unwrap() {
        let s = scan_segment(i, &p).unwrap();
        assert!(s.fault.is_none());
        for k in 0..s.records.len() {
            let r = Record::parse(s.payload(k)).unwrap();
            if let (Some(st), Some(q)) = (r.streamid, r.guestseq) {
                *seen.entry((st, q.parse().unwrap())).or_default() += 1;
            }
        }
    }
    assert!(seen.values().all(|c| *c == 1), "an event was written twice");
    for (stream, max) in &acked {
        for q in 1..=*max {
            assert_eq!(
                seen.get(&(stream.clone(), q)),
                Some(&1),
                "acked {stream}/{q} is missing"
            );
        }
    }
}

#[test]
fn sigkill_at_random_point_loses_no_acked_event_batch_mode() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    crash_and_check("batch", SigningMode::Batch);
}

#[test]
fn sigkill_at_random_point_loses_no_acked_event_per_event_mode() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    crash_and_check("per-event", SigningMode::PerEvent);
}
