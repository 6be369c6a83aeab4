//! The op-control store: the authoritative kill-switch state, changed only by the reducer (the
//! single mutator). It keeps one run table per cell (see `domain.md`, "Op-control"), applies
//! signals with their exact transitions, answers decisions, and publishes every change it
//! makes, in order, as an [`OpUpdate`] to the drain view through an [`UpdatePublisher`].
//!
//! Transitions, per op (and the same for the run-wide state of a cell-level signal):
//!
//! | signal \ state | running (absent) | paused | terminated |
//! |---|---|---|---|
//! | `Pause` | paused | paused | terminated |
//! | `Resume` | running | running (entry removed) | terminated |
//! | `Terminate` | terminated | terminated | terminated |
//! | `Unspecified` | ignored, counted | ignored, counted | ignored, counted |
//!
//! A cell-level signal applies to every op of the run: the effective state of an op is the
//! most severe of its own and the run's; a cell-level `Resume` also lifts every op-level
//! pause; a cell-level `Terminate` terminates every op, present and future, for good.

use std::sync::Arc;

use crate::audit::AuditEvent;
use crate::table::{Tables, MAX_OPS_PER_RUN};
use crate::view::{PublishError, UpdatePublisher};
use crate::{non_empty, Decision, OpState, OpUpdate, Signal, SignalSource};

pub use crate::table::MAX_OPS_PER_RUN as OPS_PER_RUN_CAPACITY;

/// Most cell runs the store tracks at once. vigil is sized for thousands of cells per host;
/// 16,384 is well above that and bounds the store's memory. When full, [`OpStore::begin_run`]
/// fails and the new run stays unknown, so every query for it is denied (fail-closed).
pub const MAX_RUNS: usize = 16_384;

/// Why the store refused an operation.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    /// The signal value was `SIGNAL_UNSPECIFIED` (or unknown to this build).
    #[error("the control signal for cell {cell} is unspecified; it was ignored and counted")]
    UnspecifiedSignal {
        /// The cell it named.
        cell: String,
    },
    /// The (cell, run) named by the signal is not registered.
    #[error("cell {cell} run {run} is not a registered run; the signal was not applied")]
    UnknownRun {
        /// The cell.
        cell: String,
        /// The run.
        run: String,
    },
    /// The run's op table is full; the op's state is unknown from now on (denied).
    #[error("the op table of cell {cell} run {run} is full ({capacity} ops); op {op} now has an unknown state and is denied")]
    TableFull {
        /// The cell.
        cell: String,
        /// The run.
        run: String,
        /// The op whose signal was refused.
        op: String,
        /// The table's capacity.
        capacity: usize,
    },
    /// The store already tracks [`MAX_RUNS`] runs.
    #[error(
        "the store already tracks {capacity} runs; cell {cell} run {run} stays unknown (denied)"
    )]
    TooManyRuns {
        /// The cell.
        cell: String,
        /// The run.
        run: String,
        /// The capacity.
        capacity: usize,
    },
}

/// What applying one signal did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// The effective state of the op (or of the run, for a cell-level signal) afterwards.
    pub state_after: OpState,
    /// Whether the state changed (false: the signal confirmed the state already there).
    pub changed: bool,
    /// The update published to the drain view, if the state changed.
    pub update: Option<OpUpdate>,
    /// The `signal_applied` audit event to journal.
    pub audit: AuditEvent,
}

/// What [`OpStore::restore`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// Terminates re-applied.
    pub applied: u64,
    /// Terminates for runs that are not registered (the run ended while vigil was away).
    pub skipped_unknown_run: u64,
    /// Terminates refused because the op table was full (those ops are denied as unknown).
    pub refused_table_full: u64,
}

/// Counters of the store (read by health and metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Signals applied (changed or confirmed state).
    pub applied: u64,
    /// Of those, signals that changed state.
    pub changed: u64,
    /// `Unspecified` signals ignored.
    pub unspecified_ignored: u64,
    /// Signals for runs that are not registered.
    pub unknown_run: u64,
    /// Signals refused because a run's op table was full.
    pub table_full_refused: u64,
    /// Runs refused because the store was full.
    pub runs_refused: u64,
    /// Publishes that found the ring full and waited for the drain thread.
    pub publish_waited: u64,
    /// Updates that could not be published because the drain view is gone.
    pub publish_failed: u64,
}

/// The op-control store. Not `Sync` by design: one mutator owns it.
#[derive(Debug, Default)]
pub struct OpStore {
    tables: Tables,
    publisher: Option<UpdatePublisher>,
    stats: StoreStats,
}

impl OpStore {
    /// A store with no runs, not yet restored (every query is denied until
    /// [`OpStore::mark_restored`]). With a publisher, every change is sent to the drain view.
    pub fn new(publisher: Option<UpdatePublisher>) -> OpStore {
        OpStore {
            tables: Tables::default(),
            publisher,
            stats: StoreStats::default(),
        }
    }

    /// The counters.
    pub fn stats(&self) -> StoreStats {
        self.stats
    }

    /// Whether the persisted terminates have been re-applied.
    pub fn is_restored(&self) -> bool {
        self.tables.restored
    }

    /// Registers `run` as the current run of `cell` (a different current run of the cell is
    /// ended and its table dropped). Returns whether anything changed (false: already current).
    pub fn begin_run(&mut self, cell: &str, run: &str) -> Result<bool, StoreError> {
        if self.tables.run(cell, run).is_some() {
            return Ok(false);
        }
        if !self.tables.cells.contains_key(cell) && self.tables.cells.len() >= MAX_RUNS {
            self.stats.runs_refused += 1;
            return Err(StoreError::TooManyRuns {
                cell: cell.to_owned(),
                run: run.to_owned(),
                capacity: MAX_RUNS,
            });
        }
        self.commit(OpUpdate::RunBegun {
            cell: Arc::from(cell),
            run: Arc::from(run),
        });
        Ok(true)
    }

    /// Ends a run: its op table (sticky terminates included) is dropped and queries for it are
    /// denied as an unknown run. Returns whether the run was registered.
    pub fn end_run(&mut self, cell: &str, run: &str) -> bool {
        if self.tables.run(cell, run).is_none() {
            return false;
        }
        self.commit(OpUpdate::RunEnded {
            cell: Arc::from(cell),
            run: Arc::from(run),
        });
        true
    }

    /// Re-applies persisted terminates (`op` `None` = the whole run) for registered runs.
    /// Call after the registry's runs were begun and before [`OpStore::mark_restored`].
    pub fn restore<I, C, R, O>(&mut self, terminated: I) -> RestoreReport
    where
        I: IntoIterator<Item = (C, R, Option<O>)>,
        C: AsRef<str>,
        R: AsRef<str>,
        O: AsRef<str>,
    {
        let mut report = RestoreReport::default();
        for (cell, run, op) in terminated {
            let op = op.as_ref().map(AsRef::as_ref);
            match self.apply(
                cell.as_ref(),
                run.as_ref(),
                op,
                Signal::Terminate,
                &SignalSource::Restore,
            ) {
                Ok(_) => report.applied += 1,
                Err(StoreError::TableFull { .. }) => report.refused_table_full += 1,
                Err(_) => report.skipped_unknown_run += 1,
            }
        }
        report
    }

    /// Declares the persisted state re-applied: decisions are made from the state from now on.
    pub fn mark_restored(&mut self) {
        if !self.tables.restored {
            self.commit(OpUpdate::Restored);
        }
    }

    /// Applies one signal to `op` of (cell, run), or to the whole run when `op` is `None` or
    /// empty, with the transitions in the module table.
    pub fn apply(
        &mut self,
        cell: &str,
        run: &str,
        op: Option<&str>,
        signal: Signal,
        source: &SignalSource,
    ) -> Result<Applied, StoreError> {
        let op = non_empty(op);
        if signal == Signal::Unspecified {
            self.stats.unspecified_ignored += 1;
            return Err(StoreError::UnspecifiedSignal {
                cell: cell.to_owned(),
            });
        }
        let Some(table) = self.tables.run(cell, run) else {
            self.stats.unknown_run += 1;
            return Err(StoreError::UnknownRun {
                cell: cell.to_owned(),
                run: run.to_owned(),
            });
        };
        let cell_state = table.cell_state;
        let update = match op {
            None => {
                let any_op_paused = table.ops.values().any(|s| *s == OpState::Paused);
                let next = match (cell_state, signal) {
                    (OpState::Terminated, _) | (OpState::Paused, Signal::Pause) => None,
                    (_, Signal::Terminate) => Some(OpState::Terminated),
                    (OpState::Running, Signal::Pause) => Some(OpState::Paused),
                    (_, Signal::Resume) if cell_state == OpState::Paused || any_op_paused => {
                        Some(OpState::Running)
                    }
                    _ => None,
                };
                next.map(|state| OpUpdate::Cell {
                    cell: Arc::from(cell),
                    run: Arc::clone(&table.run),
                    state,
                })
            }
            Some(op_id) => {
                let present = table.ops.get(op_id).copied();
                let own = present.unwrap_or(OpState::Running);
                let next = match (cell_state, own, signal) {
                    // A terminated run or op stays terminated, whatever comes later.
                    (OpState::Terminated, _, _) | (_, OpState::Terminated, _) => None,
                    (_, _, Signal::Terminate) => Some(OpState::Terminated),
                    (_, OpState::Running, Signal::Pause) => Some(OpState::Paused),
                    (_, OpState::Paused, Signal::Resume) => Some(OpState::Running),
                    _ => None,
                };
                if next.is_some_and(|s| s != OpState::Running)
                    && present.is_none()
                    && table.absent_unknown()
                {
                    let first = !table.overflowed;
                    let run_arc = Arc::clone(&table.run);
                    self.stats.table_full_refused += 1;
                    if first {
                        self.commit(OpUpdate::TableFull {
                            cell: Arc::from(cell),
                            run: run_arc,
                        });
                    }
                    return Err(StoreError::TableFull {
                        cell: cell.to_owned(),
                        run: run.to_owned(),
                        op: op_id.to_owned(),
                        capacity: MAX_OPS_PER_RUN,
                    });
                }
                next.map(|state| OpUpdate::Op {
                    cell: Arc::from(cell),
                    run: Arc::clone(&table.run),
                    op: Arc::from(op_id),
                    state,
                })
            }
        };
        let changed = update.is_some();
        if let Some(u) = &update {
            self.commit(u.clone());
        }
        let state_after = self
            .tables
            .effective(cell, run, op)
            .unwrap_or(OpState::Terminated);
        self.stats.applied += 1;
        if changed {
            self.stats.changed += 1;
        }
        Ok(Applied {
            state_after,
            changed,
            update,
            audit: AuditEvent::SignalApplied {
                cell_id: cell.to_owned(),
                run_id: run.to_owned(),
                op_id: op.map(str::to_owned),
                signal,
                state_after,
                source: source.audit_label(),
            },
        })
    }

    /// The decision for an action of `op` (or a cell-level action when `op` is `None` or
    /// empty), from the store's own state.
    pub fn decide(&self, cell: &str, run: &str, op: Option<&str>) -> Decision {
        self.tables.decide(cell, run, non_empty(op))
    }

    /// The effective state of `op` (or of the run), `None` when the run is unknown.
    pub fn state(&self, cell: &str, run: &str, op: Option<&str>) -> Option<OpState> {
        self.tables.effective(cell, run, non_empty(op))
    }

    /// Number of op entries in the run's table, `None` when the run is unknown.
    pub fn op_count(&self, cell: &str, run: &str) -> Option<usize> {
        self.tables.run(cell, run).map(|t| t.ops.len())
    }

    /// Every terminate in force, as (cell, run, op; `None` = the whole run): what the daemon
    /// persists so that [`OpStore::restore`] can re-apply it after a restart.
    pub fn terminated(&self) -> Vec<(String, String, Option<String>)> {
        let mut out = Vec::new();
        for (cell, t) in &self.tables.cells {
            if t.cell_state == OpState::Terminated {
                out.push((cell.to_string(), t.run.to_string(), None));
                continue;
            }
            for (op, s) in &t.ops {
                if *s == OpState::Terminated {
                    out.push((cell.to_string(), t.run.to_string(), Some(op.to_string())));
                }
            }
        }
        out.sort();
        out
    }

    /// Applies an update to the store's own state, then publishes it (in that order, so the
    /// store is never behind what the view was told).
    fn commit(&mut self, update: OpUpdate) {
        self.tables.apply_update(&update);
        if let Some(p) = &self.publisher {
            match p.publish(update) {
                Ok(waited) => {
                    if waited {
                        self.stats.publish_waited += 1;
                    }
                }
                Err(PublishError::ViewGone) => self.stats.publish_failed += 1,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::{update_channel, DrainView};
    use crate::{DenyReason, UnknownCause};

    const SRC: SignalSource = SignalSource::Restore;

    fn ready() -> OpStore {
        let mut s = OpStore::new(None);
        assert!(s.begin_run("c", "r").unwrap());
        s.mark_restored();
        s
    }

    /// Tiny deterministic PRNG (xorshift64*) so the race tests are seeded and reproducible.
    pub(crate) struct Rng(pub u64);
    impl Rng {
        pub(crate) fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        pub(crate) fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn set_op(s: &mut OpStore, op: Option<&str>, st: OpState) {
        match st {
            OpState::Running => {}
            OpState::Paused => {
                s.apply("c", "r", op, Signal::Pause, &SRC).unwrap();
            }
            OpState::Terminated => {
                s.apply("c", "r", op, Signal::Terminate, &SRC).unwrap();
            }
        }
    }

    #[test]
    fn every_transition_op_and_cell_level() {
        use OpState::{Paused, Running, Terminated};
        use Signal::{Pause, Resume, Terminate};
        // (state before, signal, state after, changed)
        let table = [
            (Running, Pause, Paused, true),
            (Running, Resume, Running, false),
            (Running, Terminate, Terminated, true),
            (Paused, Pause, Paused, false),
            (Paused, Resume, Running, true),
            (Paused, Terminate, Terminated, true),
            (Terminated, Pause, Terminated, false),
            (Terminated, Resume, Terminated, false),
            (Terminated, Terminate, Terminated, false),
        ];
        for op in [Some("t:s"), None] {
            for (before, signal, after, changed) in table {
                let mut s = ready();
                set_op(&mut s, op, before);
                assert_eq!(s.state("c", "r", op), Some(before));
                let a = s.apply("c", "r", op, signal, &SRC).unwrap();
                let what = format!("{op:?} {before:?} + {signal:?}");
                assert_eq!(a.state_after, after, "{what}");
                assert_eq!(a.changed, changed, "{what}");
                assert_eq!(a.update.is_some(), changed, "{what}");
                assert_eq!(s.state("c", "r", op), Some(after), "{what}");
                let expect = match after {
                    Running => Decision::Allow,
                    Paused => Decision::Hold,
                    Terminated => Decision::Deny(DenyReason::Terminated),
                };
                assert_eq!(s.decide("c", "r", op), expect, "{what}");
                // A cell-level state reaches every op, including ones never named.
                if op.is_none() {
                    assert_eq!(s.decide("c", "r", Some("other:op")), expect, "{what}");
                }
            }
        }
    }

    #[test]
    fn unspecified_is_ignored_and_counted() {
        let mut s = ready();
        s.apply("c", "r", Some("a"), Signal::Pause, &SRC).unwrap();
        let e = s.apply("c", "r", Some("a"), Signal::Unspecified, &SRC);
        assert!(matches!(e, Err(StoreError::UnspecifiedSignal { .. })));
        assert_eq!(Signal::from_wire(0), Signal::Unspecified);
        assert_eq!(Signal::from_wire(99), Signal::Unspecified);
        assert_eq!(s.state("c", "r", Some("a")), Some(OpState::Paused));
        assert_eq!(s.stats().unspecified_ignored, 1);
        assert_eq!(s.stats().applied, 1);
    }

    #[test]
    fn ops_are_independent() {
        let mut s = ready();
        s.apply("c", "r", Some("a"), Signal::Pause, &SRC).unwrap();
        s.apply("c", "r", Some("b"), Signal::Terminate, &SRC)
            .unwrap();
        assert_eq!(s.decide("c", "r", Some("a")), Decision::Hold);
        assert_eq!(
            s.decide("c", "r", Some("b")),
            Decision::Deny(DenyReason::Terminated)
        );
        assert_eq!(s.decide("c", "r", Some("c")), Decision::Allow);
        assert_eq!(s.decide("c", "r", None), Decision::Allow);
        s.apply("c", "r", Some("a"), Signal::Resume, &SRC).unwrap();
        assert_eq!(s.decide("c", "r", Some("a")), Decision::Allow);
        assert_eq!(
            s.decide("c", "r", Some("b")),
            Decision::Deny(DenyReason::Terminated)
        );
        // Another cell is untouched by this one's signals.
        s.begin_run("d", "r").unwrap();
        assert_eq!(s.decide("d", "r", Some("b")), Decision::Allow);
    }

    #[test]
    fn cell_resume_lifts_op_pauses_but_not_terminates() {
        let mut s = ready();
        s.apply("c", "r", Some("a"), Signal::Pause, &SRC).unwrap();
        s.apply("c", "r", Some("b"), Signal::Terminate, &SRC)
            .unwrap();
        s.apply("c", "r", None, Signal::Pause, &SRC).unwrap();
        assert_eq!(s.decide("c", "r", Some("z")), Decision::Hold);
        let a = s.apply("c", "r", None, Signal::Resume, &SRC).unwrap();
        assert!(a.changed);
        assert_eq!(s.decide("c", "r", Some("a")), Decision::Allow);
        assert_eq!(s.decide("c", "r", Some("z")), Decision::Allow);
        assert_eq!(
            s.decide("c", "r", Some("b")),
            Decision::Deny(DenyReason::Terminated)
        );
        // An op-level resume does not lift a cell-level pause.
        s.apply("c", "r", None, Signal::Pause, &SRC).unwrap();
        let a = s.apply("c", "r", Some("a"), Signal::Resume, &SRC).unwrap();
        assert_eq!(a.state_after, OpState::Paused);
        // A cell terminate is sticky and reaches ops never named.
        s.apply("c", "r", None, Signal::Terminate, &SRC).unwrap();
        s.apply("c", "r", None, Signal::Resume, &SRC).unwrap();
        s.apply("c", "r", Some("n"), Signal::Resume, &SRC).unwrap();
        assert_eq!(
            s.decide("c", "r", Some("n")),
            Decision::Deny(DenyReason::Terminated)
        );
        assert_eq!(s.terminated(), vec![("c".into(), "r".into(), None)]);
    }

    /// Several threads send random signals for a few ops (each op is terminated by exactly one
    /// of them at a random point); the single mutator applies them in arrival order. Over many
    /// seeds: once a terminate is applied, the op is denied for good, and the final state of
    /// every op equals a replay of the arrival order through the reference model.
    #[test]
    fn terminate_wins_against_racing_signals() {
        const THREADS: u64 = 4;
        const OPS: u64 = 6;
        const PER_THREAD: u64 = 60;
        for seed in 1..=150u64 {
            let (tx, rx) = crossbeam_channel::bounded::<(u64, Signal)>(64);
            let mut handles = Vec::new();
            for t in 0..THREADS {
                let tx = tx.clone();
                handles.push(std::thread::spawn(move || {
                    let mut rng = Rng(seed * 7919 + t * 104_729 + 1);
                    for i in 0..PER_THREAD {
                        let op = rng.below(OPS);
                        // Thread `op % THREADS` terminates its ops once, at a random index.
                        let sig = if op % THREADS == t && i == (seed + op) % PER_THREAD {
                            Signal::Terminate
                        } else if rng.below(2) == 0 {
                            Signal::Pause
                        } else {
                            Signal::Resume
                        };
                        tx.send((op, sig)).unwrap();
                        if rng.below(4) == 0 {
                            std::thread::yield_now();
                        }
                    }
                    for op in (0..OPS).filter(|o| o % THREADS == t) {
                        tx.send((op, Signal::Terminate)).unwrap();
                        tx.send((op, Signal::Resume)).unwrap();
                    }
                }));
            }
            drop(tx);
            let mut s = ready();
            let mut model = [OpState::Running; OPS as usize];
            for (op, sig) in rx {
                let name = format!("op{op}");
                let a = s.apply("c", "r", Some(&name), sig, &SRC).unwrap();
                let m = &mut model[op as usize];
                *m = match (*m, sig) {
                    (OpState::Terminated, _) | (_, Signal::Terminate) => OpState::Terminated,
                    (_, Signal::Pause) => OpState::Paused,
                    _ => OpState::Running,
                };
                assert_eq!(a.state_after, *m, "seed {seed}");
            }
            for h in handles {
                h.join().unwrap();
            }
            for op in 0..OPS {
                assert_eq!(model[op as usize], OpState::Terminated, "seed {seed}");
                assert_eq!(
                    s.decide("c", "r", Some(&format!("op{op}"))),
                    Decision::Deny(DenyReason::Terminated),
                    "seed {seed} op {op}"
                );
            }
        }
    }

    #[test]
    fn end_run_drops_the_table_and_a_new_run_starts_clean() {
        let mut s = ready();
        s.apply("c", "r", Some("a"), Signal::Terminate, &SRC)
            .unwrap();
        assert_eq!(s.op_count("c", "r"), Some(1));
        assert!(s.end_run("c", "r"));
        assert!(!s.end_run("c", "r"));
        assert_eq!(s.op_count("c", "r"), None);
        assert_eq!(
            s.decide("c", "r", Some("a")),
            Decision::Deny(DenyReason::StateUnknown(UnknownCause::UnknownRun))
        );
        assert!(matches!(
            s.apply("c", "r", Some("a"), Signal::Pause, &SRC),
            Err(StoreError::UnknownRun { .. })
        ));
        assert_eq!(s.stats().unknown_run, 1);
        s.begin_run("c", "r2").unwrap();
        assert_eq!(s.decide("c", "r2", Some("a")), Decision::Allow);
        // Registering a new run replaces the old one.
        s.apply("c", "r2", Some("a"), Signal::Terminate, &SRC)
            .unwrap();
        s.begin_run("c", "r3").unwrap();
        assert_eq!(s.decide("c", "r3", Some("a")), Decision::Allow);
        assert_eq!(
            s.decide("c", "r2", Some("a")),
            Decision::Deny(DenyReason::StateUnknown(UnknownCause::UnknownRun))
        );
        assert!(!s.begin_run("c", "r3").unwrap());
    }

    #[test]
    fn state_is_unknown_until_restored() {
        let mut s = OpStore::new(None);
        s.begin_run("c", "r").unwrap();
        let unknown = Decision::Deny(DenyReason::StateUnknown(UnknownCause::NotRestored));
        assert_eq!(s.decide("c", "r", Some("a")), unknown);
        assert_eq!(s.decide("c", "r", None), unknown);
        let report = s.restore([
            ("c", "r", Some("a")),
            ("gone", "r", None),
            ("c", "old", Some("b")),
        ]);
        assert_eq!(
            report,
            RestoreReport {
                applied: 1,
                skipped_unknown_run: 2,
                refused_table_full: 0
            }
        );
        assert_eq!(
            s.decide("c", "r", Some("a")),
            Decision::Deny(DenyReason::Terminated)
        );
        assert_eq!(s.decide("c", "r", Some("b")), unknown);
        assert!(!s.is_restored());
        s.mark_restored();
        assert_eq!(s.decide("c", "r", Some("b")), Decision::Allow);
        assert_eq!(
            s.decide("c", "r", Some("a")),
            Decision::Deny(DenyReason::Terminated)
        );
    }

    #[test]
    fn persisted_terminates_round_trip_through_restore() {
        let mut s = ready();
        s.begin_run("d", "r9").unwrap();
        s.apply("c", "r", Some("x"), Signal::Terminate, &SRC)
            .unwrap();
        s.apply("c", "r", Some("p"), Signal::Pause, &SRC).unwrap();
        s.apply("d", "r9", None, Signal::Terminate, &SRC).unwrap();
        let saved = s.terminated();
        let mut t = OpStore::new(None);
        t.begin_run("c", "r").unwrap();
        t.begin_run("d", "r9").unwrap();
        assert_eq!(t.restore(saved.clone()).applied, 2);
        t.mark_restored();
        assert_eq!(t.terminated(), saved);
        assert_eq!(t.decide("c", "r", Some("p")), Decision::Allow);
    }

    #[test]
    fn full_table_denies_new_ops_until_the_run_ends() {
        let mut s = ready();
        for i in 0..MAX_OPS_PER_RUN {
            s.apply("c", "r", Some(&format!("op{i}")), Signal::Pause, &SRC)
                .unwrap();
        }
        assert_eq!(s.op_count("c", "r"), Some(MAX_OPS_PER_RUN));
        let full = Decision::Deny(DenyReason::StateUnknown(UnknownCause::TableFull));
        assert_eq!(s.decide("c", "r", Some("new")), full);
        let e = s.apply("c", "r", Some("new"), Signal::Terminate, &SRC);
        assert!(
            matches!(e, Err(StoreError::TableFull { capacity, .. }) if capacity == MAX_OPS_PER_RUN)
        );
        assert_eq!(s.stats().table_full_refused, 1);
        // Ops with an entry keep their known state.
        assert_eq!(s.decide("c", "r", Some("op0")), Decision::Hold);
        s.apply("c", "r", Some("op0"), Signal::Terminate, &SRC)
            .unwrap();
        // Room again, but the refused terminate was lost: still unknown (fail-closed).
        s.apply("c", "r", Some("op1"), Signal::Resume, &SRC)
            .unwrap();
        assert_eq!(s.op_count("c", "r"), Some(MAX_OPS_PER_RUN - 1));
        assert_eq!(s.decide("c", "r", Some("new")), full);
        assert_eq!(s.decide("c", "r", Some("op1")), full);
        // A cell-level decision does not depend on the op table.
        assert_eq!(s.decide("c", "r", None), Decision::Allow);
        assert!(s.end_run("c", "r"));
        s.begin_run("c", "r").unwrap();
        assert_eq!(s.decide("c", "r", Some("new")), Decision::Allow);
    }

    #[test]
    fn the_view_converges_to_the_store() {
        let (publisher, receiver) = update_channel();
        let mut s = OpStore::new(Some(publisher));
        let mut v = DrainView::new(receiver);
        let cells = ["c0", "c1", "c2"];
        let mut rng = Rng(42);
        for c in cells {
            s.begin_run(c, "r").unwrap();
        }
        s.mark_restored();
        for step in 0..3_000u64 {
            let cell = cells[rng.below(3) as usize];
            let op = format!("op{}", rng.below(8));
            let op = if rng.below(10) == 0 {
                None
            } else {
                Some(op.as_str())
            };
            let sig = match rng.below(7) {
                0 => Signal::Terminate,
                1..=3 => Signal::Pause,
                _ => Signal::Resume,
            };
            if rng.below(200) == 0 {
                s.end_run(cell, "r");
                s.begin_run(cell, "r").unwrap();
            }
            let _ = s.apply(cell, "r", op, sig, &SRC);
            if step % 97 == 0 {
                v.apply_pending(step);
                for c in cells {
                    for o in 0..8 {
                        let o = format!("op{o}");
                        let want = s.decide(c, "r", Some(&o));
                        let got = match v.query(1, step, c, "r", &o, "act", step) {
                            crate::view::Answer::Decided(d) => d,
                            crate::view::Answer::Held => Decision::Hold,
                        };
                        assert_eq!(got, want, "step {step} {c} {o}");
                    }
                }
                v.cancel_conn(1);
            }
        }
        assert_eq!(s.stats().publish_failed, 0);
    }
}
