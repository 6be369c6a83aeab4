//! Benchmark: nanoseconds per `SlotWriter::execution()` (lock-free seqlock publish) against
//! the same fold ([`SlotState::execution`]) behind a `std::sync::Mutex`, in one run, single
//! thread. Two settings: uncontended (the best case for the mutex), and with a second thread
//! reading the slot in a loop the whole time (the health endpoint / silence classifier case:
//! a mutex reader makes the hot path wait; a seqlock reader never does). Also times a reader
//! snapshot.
//!
//! Usage: `cargo run -p vigil-timing --release --example bench_slots [WRITES_PER_ROUND]`.
//! Each variant runs [`ROUNDS`] rounds; the fastest round is reported (least disturbed by the
//! other work on a shared host). Prints a markdown table.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use vigil_timing::{SlotState, SlotTable};

/// Default writes per round: enough for ~tens of milliseconds per round, so timer resolution
/// and loop overhead are negligible.
const DEFAULT_WRITES: u64 = 5_000_000;

/// Rounds per variant; the minimum is reported.
const ROUNDS: u32 = 5;

/// Snapshot reads per round (each allocates the name `String`, so far slower than a write).
const SNAPSHOTS: u64 = 200_000;

/// Duration sample of write `i`: varies so the fold's min/max/EWMA branches are exercised.
fn duration(i: u64) -> u64 {
    (i.wrapping_mul(7_919) & 0xFFFF) + 1
}

fn best_of(mut round: impl FnMut() -> Duration) -> Duration {
    (0..ROUNDS).map(|_| round()).min().unwrap_or_default()
}

fn ns_per(d: Duration, n: u64) -> f64 {
    d.as_nanos() as f64 / n as f64
}

fn main() {
    let n_writes = std::env::args()
        .nth(1)
        .and_then(|a| a.parse::<u64>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(DEFAULT_WRITES);

    let table = match SlotTable::new(4) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("bench_slots: {e}");
            std::process::exit(1);
        }
    };
    let mut writer = match table.register_writer("bench") {
        Ok(w) => w,
        Err(e) => {
            eprintln!("bench_slots: {e}");
            std::process::exit(1);
        }
    };

    let mut now_lf = 0u64;
    let lock_free = best_of(|| {
        let t0 = Instant::now();
        for i in 0..n_writes {
            now_lf += 1_000;
            writer.execution(black_box(duration(i)), black_box(now_lf));
        }
        t0.elapsed()
    });

    let locked = Mutex::new(SlotState::new());
    let mut now_mx = 0u64;
    let mutex = best_of(|| {
        let t0 = Instant::now();
        for i in 0..n_writes {
            now_mx += 1_000;
            let mut s = locked
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            s.execution(black_box(duration(i)), black_box(now_mx));
        }
        t0.elapsed()
    });

    let id = writer.id();
    // Same two folds, each while another thread reads the slot in a tight loop.
    let stop = AtomicBool::new(false);

    let (lock_free_read, lf_reads) = thread::scope(|scope| {
        let reader = scope.spawn(|| {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let _ = black_box(table.snapshot(black_box(id)));
                n += 1;
            }
            n
        });
        let d = best_of(|| {
            let t0 = Instant::now();
            for i in 0..n_writes {
                now_lf += 1_000;
                writer.execution(black_box(duration(i)), black_box(now_lf));
            }
            t0.elapsed()
        });
        stop.store(true, Ordering::Relaxed);
        (d, reader.join().unwrap_or(0))
    });
    stop.store(false, Ordering::Relaxed);

    let (mutex_read, mx_reads) = thread::scope(|scope| {
        let reader = scope.spawn(|| {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let copy = *locked
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                black_box(copy);
                n += 1;
            }
            n
        });
        let d = best_of(|| {
            let t0 = Instant::now();
            for i in 0..n_writes {
                now_mx += 1_000;
                let mut s = locked
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                s.execution(black_box(duration(i)), black_box(now_mx));
            }
            t0.elapsed()
        });
        stop.store(true, Ordering::Relaxed);
        (d, reader.join().unwrap_or(0))
    });

    let snapshot = best_of(|| {
        let t0 = Instant::now();
        for _ in 0..SNAPSHOTS {
            let _ = black_box(table.snapshot(black_box(id)));
        }
        t0.elapsed()
    });

    // Both variants folded the same samples the same number of times.
    let a = writer.state();
    let b = *locked
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if a != b {
        eprintln!("bench_slots: lock-free and mutex folds disagree: {a:?} vs {b:?}");
        std::process::exit(1);
    }

    let lf = ns_per(lock_free, n_writes);
    let mx = ns_per(mutex, n_writes);
    let sn = ns_per(snapshot, SNAPSHOTS);
    let lfr = ns_per(lock_free_read, n_writes);
    let mxr = ns_per(mutex_read, n_writes);
    println!("| variant | ops/round | best round (ms) | ns/op | vs lock-free |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| `SlotWriter::execution` (seqlock, relaxed stores) | {n_writes} | {:.1} | {lf:.2} | 1.00× |",
        lock_free.as_secs_f64() * 1e3
    );
    println!(
        "| same fold behind `Mutex<SlotState>` (uncontended) | {n_writes} | {:.1} | {mx:.2} | {:.2}× |",
        mutex.as_secs_f64() * 1e3,
        mx / lf
    );
    println!(
        "| `SlotWriter::execution`, reader thread looping ({lf_reads} reads) | {n_writes} | {:.1} | {lfr:.2} | {:.2}× |",
        lock_free_read.as_secs_f64() * 1e3,
        lfr / lf
    );
    println!(
        "| `Mutex` fold, reader thread looping ({mx_reads} reads) | {n_writes} | {:.1} | {mxr:.2} | {:.2}× |",
        mutex_read.as_secs_f64() * 1e3,
        mxr / lf
    );
    println!(
        "| `SlotTable::snapshot` (reader, allocates name) | {SNAPSHOTS} | {:.1} | {sn:.2} | {:.2}× |",
        snapshot.as_secs_f64() * 1e3,
        sn / lf
    );
    println!();
    println!("mutex / lock-free write ratio, uncontended: {:.2}", mx / lf);
    println!(
        "mutex / lock-free write ratio, with a reader: {:.2}",
        mxr / lfr
    );
}
