//! Concurrency: writers hammer slots while readers snapshot them; every snapshot must be
//! exactly one of the states the writer published (no torn or mixed fields).
//!
//! The writer's sequence of observations is a pure function of its step number, so the reader
//! precomputes the exact expected [`SlotState`] after every step and checks each snapshot
//! against the one its `generation` names — stronger than range checks such as
//! `min <= last <= max`, which are asserted as well.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use vigil_timing::{Liveness, SlotSnapshot, SlotState, SlotTable, SlotWriter};

/// Writes per writer thread; the interpreter is ~1000× slower, so Miri gets a short run.
const STEPS: u64 = if cfg!(miri) { 150 } else { 200_000 };

/// Generations published before the first write: one when the table is built, one reset when
/// the slot is registered.
const GENERATION_BEFORE_WRITES: u64 = 2;

/// The observation of step `i` (1-based), applied by both the writer and the model.
fn step_writer(w: &mut SlotWriter, i: u64) {
    let now = i * 1_000;
    match i % 16 {
        3 => w.start(now),
        7 => w.error(now),
        9 => w.stop(now),
        13 => w.clear(now),
        _ => w.execution(i.wrapping_mul(7_919) % 10_000 + 1, now),
    }
}

fn step_model(s: &mut SlotState, i: u64) {
    let now = i * 1_000;
    match i % 16 {
        3 => s.start(now),
        7 => s.error(now),
        9 => s.stop(now),
        13 => s.clear(now),
        _ => s.execution(i.wrapping_mul(7_919) % 10_000 + 1, now),
    }
}

fn expected_states() -> Vec<SlotState> {
    let mut states = Vec::with_capacity(STEPS as usize + 1);
    let mut s = SlotState::new();
    states.push(s);
    for i in 1..=STEPS {
        step_model(&mut s, i);
        states.push(s);
    }
    states
}

fn assert_matches(snap: &SlotSnapshot, want: &SlotState) {
    assert_eq!(snap.liveness, want.liveness, "liveness of {snap:?}");
    assert_eq!(
        (snap.starts, snap.stops, snap.errors, snap.executions),
        (want.starts, want.stops, want.errors, want.executions),
        "counts of {snap:?}"
    );
    assert_eq!(snap.last_duration_ns, want.last_ns);
    assert_eq!(snap.min_duration_ns, want.min_ns);
    assert_eq!(snap.max_duration_ns, want.max_ns);
    assert_eq!(snap.ewma_duration_ns, want.ewma_ns);
    assert_eq!(snap.period_ns, want.period_ns);
    assert_eq!(snap.last_execution_at_ns, want.last_execution_at_ns);
    assert_eq!(snap.last_activity_ns, want.last_activity_ns);
}

fn assert_invariants(snap: &SlotSnapshot) {
    if let (Some(min), Some(last), Some(max), Some(ewma)) = (
        snap.min_duration_ns,
        snap.last_duration_ns,
        snap.max_duration_ns,
        snap.ewma_duration_ns,
    ) {
        assert!(min <= last && last <= max, "min/last/max torn: {snap:?}");
        assert!(
            min <= ewma && ewma <= max,
            "ewma outside [min, max]: {snap:?}"
        );
    }
    // Step i writes timestamp i * 1000, so activity and generation must agree.
    if let Some(t) = snap.last_activity_ns {
        assert_eq!(t, (snap.generation - GENERATION_BEFORE_WRITES) * 1_000);
    }
    if snap.liveness == Liveness::Error {
        assert!(snap.errors > 0);
    }
}

#[test]
fn hammering_writer_never_yields_inconsistent_snapshot() {
    let table = SlotTable::new(4).unwrap();
    let mut writer = table.register_writer("drain").unwrap();
    let id = writer.id();
    let expected = expected_states();
    let done = Arc::new(AtomicBool::new(false));
    // Set by the reader once it has seen a snapshot from the middle of the run. The writer
    // pauses halfway until then, so overlap is guaranteed even when the scheduler would let
    // the writer finish before the reader starts (2 shared cores).
    let seen_mid = Arc::new(AtomicBool::new(false));

    let writer_done = Arc::clone(&done);
    let writer_seen_mid = Arc::clone(&seen_mid);
    let writer_thread = thread::spawn(move || {
        for i in 1..=STEPS {
            step_writer(&mut writer, i);
            if i == STEPS / 2 {
                while !writer_seen_mid.load(Ordering::Acquire) {
                    thread::yield_now();
                }
            }
        }
        writer_done.store(true, Ordering::Release);
        writer.state()
    });

    let mut reads = 0u64;
    let mut last_generation = 0;
    let mut last_executions = 0;
    let mut mid_run_reads = 0u64;
    loop {
        let finished = done.load(Ordering::Acquire);
        let snap = table.snapshot(id).unwrap();
        assert!(
            snap.generation >= last_generation,
            "generation went backwards"
        );
        assert!(
            snap.executions >= last_executions,
            "executions went backwards"
        );
        last_generation = snap.generation;
        last_executions = snap.executions;
        let step = snap.generation - GENERATION_BEFORE_WRITES;
        assert!(step <= STEPS);
        assert_matches(&snap, &expected[step as usize]);
        assert_invariants(&snap);
        reads += 1;
        if step > 0 && step < STEPS {
            mid_run_reads += 1;
            seen_mid.store(true, Ordering::Release);
        }
        if finished {
            break;
        }
        if cfg!(miri) {
            thread::yield_now();
        }
    }
    let final_state = writer_thread.join().unwrap();
    assert_eq!(final_state, expected[STEPS as usize]);
    assert_eq!(last_generation, STEPS + GENERATION_BEFORE_WRITES);
    assert!(mid_run_reads > 0, "the reader never overlapped the writer");
    eprintln!("{reads} snapshots, {mid_run_reads} taken mid-run");
}

#[test]
fn independent_writers_and_table_wide_snapshots() {
    let table = SlotTable::new(8).unwrap();
    let writers: Vec<SlotWriter> = ["drain", "journal", "reducer"]
        .iter()
        .map(|n| table.register_writer(n).unwrap())
        .collect();
    let expected = expected_states();
    let final_expected = expected[(STEPS / 4) as usize];
    let done = Arc::new(AtomicBool::new(false));

    let handles: Vec<_> = writers
        .into_iter()
        .map(|mut w| {
            thread::spawn(move || {
                for i in 1..=STEPS / 4 {
                    step_writer(&mut w, i);
                }
            })
        })
        .collect();

    let reader_table = table.clone();
    let reader_done = Arc::clone(&done);
    let reader = thread::spawn(move || {
        let mut rounds = 0u64;
        loop {
            let finished = reader_done.load(Ordering::Acquire);
            let all = reader_table.snapshot_all();
            assert!(all.contended.is_empty() || !cfg!(miri));
            for snap in &all.slots {
                let step = snap.generation - GENERATION_BEFORE_WRITES;
                assert_matches(snap, &expected[step as usize]);
                assert_invariants(snap);
            }
            rounds += 1;
            if finished {
                return (rounds, all);
            }
            if cfg!(miri) {
                thread::yield_now();
            }
        }
    });

    for h in handles {
        h.join().unwrap();
    }
    done.store(true, Ordering::Release);
    let (rounds, last) = reader.join().unwrap();
    assert!(rounds >= 1);
    assert_eq!(last.slots.len(), 3);
    for snap in &last.slots {
        assert_eq!(snap.generation, STEPS / 4 + GENERATION_BEFORE_WRITES);
        assert_matches(snap, &final_expected);
    }
}
