//! Kill-switch latency and per-query cost.
//!
//! (a) From a `Terminate` applied by the store on one thread to the next query of that op
//!     denied by a `DrainView` on another thread that was parked (blocked on the update ring)
//!     and woken: p50/p99 over 10,000 trials.
//! (b) ns per `DrainView::query` on the allow path vs a bare `HashMap` lookup of the same key.
//!
//! Run: `cargo run --release -p vigil-opcontrol --example bench_killswitch`.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vigil_opcontrol::store::OpStore;
use vigil_opcontrol::view::{update_channel, Answer, DrainView};
use vigil_opcontrol::{Decision, DenyReason, OpState, Signal, SignalSource};

const TRIALS: usize = 10_000;
/// Trials per run, below the op table's capacity (terminates are sticky until the run ends).
const TRIALS_PER_RUN: usize = 4_000;
const QUERIES: usize = 5_000_000;

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let runs: Vec<String> = (0..=TRIALS / TRIALS_PER_RUN)
        .map(|k| format!("r{k}"))
        .collect();
    let ops: Vec<String> = (0..TRIALS)
        .map(|i| format!("trace{i:08x}:span01"))
        .collect();

    // (a) terminate → deny across threads.
    let (publisher, receiver) = update_channel();
    let (done_tx, done_rx) = crossbeam_channel::bounded::<Instant>(1);
    let view_runs = runs.clone();
    let view_ops = ops.clone();
    let view_thread = std::thread::spawn(move || {
        let mut view = DrainView::new(receiver);
        for (i, op) in view_ops.iter().enumerate() {
            let run = &view_runs[i / TRIALS_PER_RUN];
            loop {
                assert!(
                    view.wait_for_update(Duration::from_secs(5)),
                    "no update for trial {i}"
                );
                view.apply_pending(0);
                let a = view.query(1, i as u64, "cell", run, op, "tool.call", 0);
                if a == Answer::Decided(Decision::Deny(DenyReason::Terminated)) {
                    done_tx.send(Instant::now()).unwrap();
                    break;
                }
            }
        }
    });
    let mut store = OpStore::new(Some(publisher));
    store.mark_restored();
    let src = SignalSource::Operator {
        issuer: "bench".into(),
    };
    let mut lat = Vec::with_capacity(TRIALS);
    for (i, op) in ops.iter().enumerate() {
        let run = &runs[i / TRIALS_PER_RUN];
        if i % TRIALS_PER_RUN == 0 {
            store.begin_run("cell", run).unwrap();
            // Let the view apply the new run before the clock starts.
            std::thread::sleep(Duration::from_millis(2));
        }
        let t0 = Instant::now();
        store
            .apply("cell", run, Some(op), Signal::Terminate, &src)
            .unwrap();
        let t1 = done_rx.recv().unwrap();
        lat.push(t1.duration_since(t0).as_nanos() as u64);
    }
    view_thread.join().unwrap();
    lat.sort_unstable();

    // (b) allow-path cost vs a bare HashMap lookup of the same key.
    let (publisher, receiver) = update_channel();
    let mut store = OpStore::new(Some(publisher));
    store.begin_run("cell", "r").unwrap();
    store.mark_restored();
    let mut baseline: HashMap<Arc<str>, OpState> = HashMap::new();
    for op in ops.iter().take(100) {
        store
            .apply("cell", "r", Some(op), Signal::Pause, &src)
            .unwrap();
        baseline.insert(Arc::from(op.as_str()), OpState::Paused);
    }
    let mut view = DrainView::new(receiver);
    view.apply_pending(0);
    let keys: Vec<&str> = ops[100..1_124].iter().map(String::as_str).collect();
    let t = Instant::now();
    let mut allowed = 0u64;
    for i in 0..QUERIES {
        let k = keys[i & 1023];
        if let Answer::Decided(Decision::Allow) = view.query(
            1,
            i as u64,
            black_box("cell"),
            black_box("r"),
            black_box(k),
            "x",
            0,
        ) {
            allowed += 1;
        }
    }
    let query_ns = t.elapsed().as_nanos() as f64 / QUERIES as f64;
    assert_eq!(allowed, QUERIES as u64);
    let t = Instant::now();
    let mut hits = 0u64;
    for i in 0..QUERIES {
        let k = keys[i & 1023];
        if !baseline.contains_key(black_box(k)) {
            hits += 1;
        }
    }
    let base_ns = t.elapsed().as_nanos() as f64 / QUERIES as f64;
    assert_eq!(hits, QUERIES as u64);

    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| (a) terminate → next query denied on a woken drain view, p50 ({TRIALS} trials) | {:.1} µs |",
        percentile(&lat, 0.50) as f64 / 1e3
    );
    println!(
        "| (a) same, p99 (goal ≤ 100 µs) | {:.1} µs |",
        percentile(&lat, 0.99) as f64 / 1e3
    );
    println!(
        "| (a) same, max | {:.1} µs |",
        lat[lat.len() - 1] as f64 / 1e3
    );
    println!("| (b) `DrainView::query`, allow path | {query_ns:.1} ns |");
    println!("| (b) baseline: bare `HashMap::get` of the same key | {base_ns:.1} ns |");
}
