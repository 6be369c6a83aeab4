//! The op-control state itself (per cell: its current run, the run-wide state and the op
//! table) and the two things done with it: answer a query ([`Tables::decide`]) and apply one
//! [`OpUpdate`] ([`Tables::apply_update`]). The store and the drain view each own one
//! `Tables` and change it only through `apply_update`, so the view converges to the store by
//! construction.

use std::collections::HashMap;
use std::sync::Arc;

use crate::{Decision, DenyReason, OpState, OpUpdate, UnknownCause};

/// Most ops with an entry (paused or terminated) in one run's table. A workload has tens to
/// hundreds of ops in flight; 4,096 leaves an order of magnitude of room while bounding the
/// memory a misbehaving control plane can make vigil spend per cell (~4,096 × ~100 B). When
/// full, a signal for a new op is refused and from then on an op without an entry has an
/// unknown state, so it is denied (fail-closed) until the run ends.
pub const MAX_OPS_PER_RUN: usize = 4_096;

/// The state of one cell's current run.
#[derive(Debug)]
pub(crate) struct RunTable {
    pub(crate) run: Arc<str>,
    pub(crate) cell_state: OpState,
    /// Ops with a state other than `Running` (absent = running).
    pub(crate) ops: HashMap<Arc<str>, OpState>,
    /// A signal was refused because the table was full (sticky until the run ends).
    pub(crate) overflowed: bool,
}

impl RunTable {
    fn new(run: Arc<str>) -> RunTable {
        RunTable {
            run,
            cell_state: OpState::Running,
            ops: HashMap::new(),
            overflowed: false,
        }
    }

    /// Whether an op without an entry has an unknown state.
    pub(crate) fn absent_unknown(&self) -> bool {
        self.overflowed || self.ops.len() >= MAX_OPS_PER_RUN
    }

    /// The op's own state (absent = running); `None` for a cell-level query.
    pub(crate) fn op_state(&self, op: Option<&str>) -> OpState {
        op.and_then(|op| self.ops.get(op).copied())
            .unwrap_or(OpState::Running)
    }
}

/// All cells' op-control state. Keyed by cell: a cell has one current run at a time (a new
/// run replaces the old one, as registering a cell again with a new `run_id` ends the old run).
/// The maps use the standard SipHash hasher on purpose: op ids come from guests, and a keyed
/// hash keeps a guest from forcing collisions.
#[derive(Debug, Default)]
pub(crate) struct Tables {
    pub(crate) cells: HashMap<Arc<str>, RunTable>,
    pub(crate) restored: bool,
}

impl Tables {
    /// The run table of (cell, run), if that run is the cell's current one.
    pub(crate) fn run(&self, cell: &str, run: &str) -> Option<&RunTable> {
        self.cells.get(cell).filter(|t| &*t.run == run)
    }

    fn run_mut(&mut self, cell: &str, run: &str) -> Option<&mut RunTable> {
        self.cells.get_mut(cell).filter(|t| &*t.run == run)
    }

    /// The effective state of `op` (or of the run when `op` is `None`): the most severe of the
    /// run-wide and the op's own state; `None` when the run is unknown.
    pub(crate) fn effective(&self, cell: &str, run: &str, op: Option<&str>) -> Option<OpState> {
        let t = self.run(cell, run)?;
        Some(t.cell_state.max(t.op_state(op)))
    }

    /// The decision for one action of `op` (or a cell-level action when `op` is `None`).
    /// A hash lookup or two; allocates nothing.
    pub(crate) fn decide(&self, cell: &str, run: &str, op: Option<&str>) -> Decision {
        let Some(t) = self.run(cell, run) else {
            return Decision::Deny(DenyReason::StateUnknown(UnknownCause::UnknownRun));
        };
        // One lookup of the op: `Some(None)` = an op without an entry.
        let entry = op.map(|o| t.ops.get(o).copied());
        let own = entry.flatten().unwrap_or(OpState::Running);
        let effective = t.cell_state.max(own);
        if effective == OpState::Terminated {
            return Decision::Deny(DenyReason::Terminated);
        }
        if !self.restored {
            return Decision::Deny(DenyReason::StateUnknown(UnknownCause::NotRestored));
        }
        if entry == Some(None) && t.absent_unknown() {
            return Decision::Deny(DenyReason::StateUnknown(UnknownCause::TableFull));
        }
        if effective == OpState::Paused {
            Decision::Hold
        } else {
            Decision::Allow
        }
    }

    /// Applies one update. Updates for a run that is not the cell's current one are ignored
    /// (they can only be late for a run already replaced).
    pub(crate) fn apply_update(&mut self, update: &OpUpdate) {
        match update {
            OpUpdate::RunBegun { cell, run } => {
                let same = self.cells.get(&**cell).is_some_and(|t| t.run == *run);
                if !same {
                    self.cells
                        .insert(Arc::clone(cell), RunTable::new(Arc::clone(run)));
                }
            }
            OpUpdate::RunEnded { cell, run } => {
                if self.run(cell, run).is_some() {
                    self.cells.remove(&**cell);
                }
            }
            OpUpdate::Restored => self.restored = true,
            OpUpdate::Op {
                cell,
                run,
                op,
                state,
            } => {
                if let Some(t) = self.run_mut(cell, run) {
                    if *state == OpState::Running {
                        t.ops.remove(&**op);
                    } else if t.ops.contains_key(&**op) || t.ops.len() < MAX_OPS_PER_RUN {
                        t.ops.insert(Arc::clone(op), *state);
                    } else {
                        // Only reachable if updates were not produced by the store (which
                        // never exceeds the capacity): stay bounded and fail closed.
                        t.overflowed = true;
                    }
                }
            }
            OpUpdate::Cell { cell, run, state } => {
                if let Some(t) = self.run_mut(cell, run) {
                    t.cell_state = *state;
                    match state {
                        OpState::Running => t.ops.retain(|_, s| *s == OpState::Terminated),
                        OpState::Terminated => t.ops.clear(),
                        OpState::Paused => {}
                    }
                }
            }
            OpUpdate::TableFull { cell, run } => {
                if let Some(t) = self.run_mut(cell, run) {
                    t.overflowed = true;
                }
            }
        }
    }
}
