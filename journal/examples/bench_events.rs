//! End-to-end journal benchmark: events/s and submit→durable-ack latency (p50/p99) for
//! per-event and batch signing with fsync, the same pipeline unsigned without fsync, raw
//! ed25519 signatures/s on one core, and p99 at half the measured batch-mode maximum.
//! Run: `cargo run --release -p vigil-journal --example bench_events` (about 30 s).
//! Writes to a temporary directory under the workspace `target/` (on disk, not tmpfs).

use std::sync::Arc;
use std::time::{Duration, Instant};

use vigil_journal::{AckOut, EventIn, HostKey, JournalConfig, SigningMode};

/// Connections (streams) submitting concurrently, like a handful of busy guests.
const STREAMS: usize = 8;
/// Events per `send`, like one drain loop turn's worth for one connection.
const CHUNK: u64 = 16;
/// Unacked events allowed per stream, like a guest's resend window.
const WINDOW: u64 = 1024;
/// Length of one measured scenario.
const SCENARIO: Duration = Duration::from_secs(4);

struct Outcome {
    events_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn event(stream: usize, seq: u64, cells: &[Arc<str>], streams: &[Arc<str>]) -> EventIn {
    EventIn {
        token: stream as u64,
        cell_id: cells[stream % cells.len()].clone(),
        run_id: Arc::from("run-1"),
        stream_id: Some(streams[stream].clone()),
        guest_seq: Some(seq),
        event_type: "com.example.tool.step".to_owned(),
        op_id: Some("4bf92f3577b34da6a3ce929d0e0e4736:00f067aa0ba902b7".to_owned()),
        content_type: "application/json".to_owned(),
        data: format!(
            r#"{{"tool":"search","step":{seq},"status":"ok","tokens":1234,"detail":"a typical small telemetry payload of about two hundred bytes"}}"#
        )
        .into_bytes(),
        guest_time_unix_nano: Some(1_700_000_000_000_000_000 + seq),
        recv_time_unix_nano: 1_700_000_000_000_000_000 + seq,
        claims: None,
    }
}

fn on_acks(
    acks: Vec<AckOut>,
    submitted: &[Vec<Instant>],
    acked: &mut [u64; STREAMS],
    lat: &mut Vec<Duration>,
) {
    let now = Instant::now();
    for a in acks {
        let s = a.token as usize;
        while acked[s] < a.durable_seq {
            acked[s] += 1;
            lat.push(now - submitted[s][(acked[s] - 1) as usize]);
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

fn scenario(
    base: &std::path::Path,
    name: &str,
    signing: SigningMode,
    fsync: bool,
    rate: Option<f64>,
) -> Outcome {
    let dir = base.join(name);
    let mut config = JournalConfig::new(&dir, "bench-host");
    config.signing = signing;
    config.fsync = fsync;
    let h = vigil_journal::spawn(config, HostKey::from_seed([5; 32])).expect("journal starts");
    let cells: Vec<Arc<str>> = (0..4).map(|i| Arc::from(format!("cell-{i}"))).collect();
    let streams: Vec<Arc<str>> = (0..STREAMS)
        .map(|i| Arc::from(format!("stream-{i}")))
        .collect();
    let mut next = [1u64; STREAMS];
    let mut acked = [0u64; STREAMS];
    let mut submitted: Vec<Vec<Instant>> = vec![Vec::new(); STREAMS];
    let mut lat: Vec<Duration> = Vec::new();
    let start = Instant::now();
    let mut sent_events = 0u64;
    while start.elapsed() < SCENARIO {
        let mut progressed = false;
        for s in 0..STREAMS {
            if next[s] - 1 - acked[s] + CHUNK > WINDOW {
                continue;
            }
            if let Some(r) = rate {
                let due = start + Duration::from_secs_f64(sent_events as f64 / r);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep((due - now).min(Duration::from_micros(200)));
                    break;
                }
            }
            let batch: Vec<EventIn> = (next[s]..next[s] + CHUNK)
                .map(|q| event(s, q, &cells, &streams))
                .collect();
            let now = Instant::now();
            submitted[s].extend(std::iter::repeat_n(now, CHUNK as usize));
            h.input.send(batch).expect("journal alive");
            next[s] += CHUNK;
            sent_events += CHUNK;
            progressed = true;
        }
        let wait = if progressed {
            Duration::ZERO
        } else {
            Duration::from_micros(100)
        };
        if let Ok(acks) = h.acks.recv_timeout(wait) {
            on_acks(acks, &submitted, &mut acked, &mut lat);
        }
        while let Ok(acks) = h.acks.try_recv() {
            on_acks(acks, &submitted, &mut acked, &mut lat);
        }
    }
    let elapsed = start.elapsed();
    let total_acked: u64 = acked.iter().sum();
    h.shutdown().expect("clean shutdown");
    let _ = std::fs::remove_dir_all(&dir);
    lat.sort_unstable();
    Outcome {
        events_per_s: total_acked as f64 / elapsed.as_secs_f64(),
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
    }
}

fn signatures_per_second() -> f64 {
    let key = HostKey::from_seed([3; 32]);
    let msg = vec![0x5au8; 600];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(1) {
        for _ in 0..256 {
            std::hint::black_box(key.sign(std::hint::black_box(&msg)));
        }
        n += 256;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let base_root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    let _ = std::fs::create_dir_all(&base_root);
    let base = tempfile::Builder::new()
        .prefix("vigil-bench-")
        .tempdir_in(&base_root)
        .expect("temp dir on disk");
    println!(
        "journal dir: {} ({STREAMS} streams, chunks of {CHUNK}, window {WINDOW}, {}s each)",
        base.path().display(),
        SCENARIO.as_secs()
    );

    let sigs = signatures_per_second();
    let per_event = scenario(base.path(), "per-event", SigningMode::PerEvent, true, None);
    let batch = scenario(base.path(), "batch", SigningMode::Batch, true, None);
    let none = scenario(base.path(), "none-nofsync", SigningMode::None, false, None);
    let half_rate = batch.events_per_s / 2.0;
    let half = scenario(
        base.path(),
        "batch-half",
        SigningMode::Batch,
        true,
        Some(half_rate),
    );

    println!();
    println!("| pipeline | events/s | p50 ms | p99 ms |");
    println!("|---|---:|---:|---:|");
    for (name, o) in [
        ("per-event signing, fsync", &per_event),
        ("batch signing, fsync", &batch),
        ("no signing, no fsync", &none),
    ] {
        println!(
            "| {name} | {:.0} | {:.2} | {:.2} |",
            o.events_per_s, o.p50_ms, o.p99_ms
        );
    }
    println!(
        "| batch signing, fsync, paced at {half_rate:.0}/s (half of max) | {:.0} | {:.2} | {:.2} |",
        half.events_per_s, half.p50_ms, half.p99_ms
    );
    println!("| ed25519 signatures, one core | {sigs:.0} | | |");
    println!();
    println!("ratios: batch / per-event = {:.2}x; no-sign-no-fsync / batch = {:.2}x; per-event events/s / signatures/s = {:.2}",
        batch.events_per_s / per_event.events_per_s,
        none.events_per_s / batch.events_per_s,
        per_event.events_per_s / sigs);
}
