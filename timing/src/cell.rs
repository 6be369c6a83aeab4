//! Per-cell groups of guest-reported task slots.
//!
//! When a cell registers, vigil registers a bounded set of slots for the tasks its guest agent
//! reports (the wire protocol's `ExecutorStats.tasks[].task` names), named
//! `cell/{cell_id}/{task}`, and keeps their writers in a [`CellGroup`] owned by the one mutator
//! that applies guest frames. Observations for a task the group does not hold are counted in
//! the table's unregistered counter and dropped (with an error for the caller to log).
//! Dropping the group frees its slots for later cells.
//!
//! Guests report cumulative totals (`TaskSample{started, stopped, errors, last_duration_ns}`),
//! not events; [`CellGroup::apply_sample`] turns two successive totals into increments:
//! - an increment is `new - previous`; a total that went *down* means the guest's emitter
//!   restarted, and the new total is taken as the increment;
//! - a sample in which no total changed is ignored entirely, so a stuck task whose agent keeps
//!   re-sending the same numbers does not look active (last activity stays put);
//! - a sample in which at least one run completed (stops or errors advanced) and
//!   `last_duration_ns > 0` folds one execution of `last_duration_ns` at the sample's receive
//!   time: the sample carries only the latest duration, so `executions` counts samples with
//!   completions, while completed runs are counted in `stops`/`errors`.

use crate::fold::BulkDelta;
use crate::table::{Observation, SlotId, SlotTable, SlotWriter, TimingError};

/// Most guest tasks one cell may register. A guest agent typically runs a few emitter tasks;
/// 16 leaves headroom while bounding what one cell can take from the shared table
/// ([`crate::table::DEFAULT_TABLE_SLOTS`] is sized for 30 full cells). Registering more is
/// refused with [`CellGroupError::TooManyTasks`]; samples for tasks beyond the registered set
/// are counted and dropped.
pub const MAX_TASKS_PER_CELL: usize = 16;

/// Errors of a cell's task group.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CellGroupError {
    /// More tasks than [`MAX_TASKS_PER_CELL`] were declared.
    #[error("Cell {cell_id:?} declares {requested} guest tasks; at most {max} are allowed.")]
    TooManyTasks {
        /// Cell id.
        cell_id: String,
        /// Number declared.
        requested: usize,
        /// [`MAX_TASKS_PER_CELL`].
        max: usize,
    },
    /// The same task was declared twice.
    #[error("Cell {cell_id:?} declares the guest task {task:?} twice.")]
    DuplicateTask {
        /// Cell id.
        cell_id: String,
        /// Task name.
        task: String,
    },
    /// An observation for a task the cell did not register (counted and dropped).
    #[error("Cell {cell_id:?} has no registered guest task {task:?}; the observation was dropped and counted.")]
    UnknownTask {
        /// Cell id.
        cell_id: String,
        /// Task name.
        task: String,
    },
    /// The slot table refused a registration (full, bad name, ...).
    #[error("The timing table refused a slot for cell {cell_id:?}: {source}")]
    Table {
        /// Cell id.
        cell_id: String,
        /// What the table said.
        source: TimingError,
    },
}

/// One guest `TaskSample`, cumulative since the guest emitter started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuestTaskSample {
    /// Runs started.
    pub started: u64,
    /// Runs stopped cleanly.
    pub stopped: u64,
    /// Runs that failed.
    pub errors: u64,
    /// Duration of the latest run, ns (0 = not measured).
    pub last_duration_ns: u64,
}

#[derive(Debug)]
struct GuestTask {
    task: String,
    writer: SlotWriter,
    previous: GuestTaskSample,
}

/// The guest task slots of one cell, with their writers. `Send`, not `Sync` (it holds
/// writers); owned by the single mutator that applies guest frames.
#[derive(Debug)]
pub struct CellGroup {
    table: SlotTable,
    cell_id: String,
    tasks: Vec<GuestTask>,
}

fn increment(new: u64, previous: u64) -> u64 {
    if new >= previous {
        new - previous
    } else {
        new
    }
}

impl CellGroup {
    /// The slot name of `task` in `cell_id`.
    pub fn slot_name(cell_id: &str, task: &str) -> String {
        format!("cell/{cell_id}/{task}")
    }

    /// Register one slot per task for `cell_id`, all or nothing: on any failure, the slots
    /// already registered for this call are freed again.
    pub fn register(
        table: &SlotTable,
        cell_id: &str,
        tasks: &[&str],
    ) -> Result<CellGroup, CellGroupError> {
        if tasks.len() > MAX_TASKS_PER_CELL {
            return Err(CellGroupError::TooManyTasks {
                cell_id: cell_id.to_owned(),
                requested: tasks.len(),
                max: MAX_TASKS_PER_CELL,
            });
        }
        for (i, task) in tasks.iter().enumerate() {
            if tasks[..i].contains(task) {
                return Err(CellGroupError::DuplicateTask {
                    cell_id: cell_id.to_owned(),
                    task: (*task).to_owned(),
                });
            }
        }
        // Built incrementally; if a registration fails, dropping `group` frees what it holds.
        let mut group = CellGroup {
            table: table.clone(),
            cell_id: cell_id.to_owned(),
            tasks: Vec::with_capacity(tasks.len()),
        };
        for task in tasks {
            let writer = table
                .register_writer(&Self::slot_name(cell_id, task))
                .map_err(|source| CellGroupError::Table {
                    cell_id: cell_id.to_owned(),
                    source,
                })?;
            group.tasks.push(GuestTask {
                task: (*task).to_owned(),
                writer,
                previous: GuestTaskSample::default(),
            });
        }
        Ok(group)
    }

    /// The cell this group belongs to.
    pub fn cell_id(&self) -> &str {
        &self.cell_id
    }

    /// Registered task names and their slot ids.
    pub fn tasks(&self) -> impl Iterator<Item = (&str, SlotId)> {
        self.tasks.iter().map(|t| (t.task.as_str(), t.writer.id()))
    }

    fn find(&self, task: &str) -> Result<usize, CellGroupError> {
        if let Some(i) = self.tasks.iter().position(|t| t.task == task) {
            Ok(i)
        } else {
            self.table.note_unregistered();
            Err(CellGroupError::UnknownTask {
                cell_id: self.cell_id.clone(),
                task: task.to_owned(),
            })
        }
    }

    /// The writer of `task`, if registered (no counting: a plain lookup).
    pub fn writer(&self, task: &str) -> Option<&SlotWriter> {
        self.tasks
            .iter()
            .find(|t| t.task == task)
            .map(|t| &t.writer)
    }

    /// Apply one observation to `task`; an unknown task is counted and dropped.
    pub fn observe(
        &mut self,
        task: &str,
        observation: Observation,
        now_ns: u64,
    ) -> Result<(), CellGroupError> {
        let i = self.find(task)?;
        self.tasks[i].writer.observe(observation, now_ns);
        Ok(())
    }

    /// Fold a guest's cumulative sample for `task` received at `now_ns` (rules in the module
    /// doc); an unknown task is counted and dropped.
    pub fn apply_sample(
        &mut self,
        task: &str,
        sample: GuestTaskSample,
        now_ns: u64,
    ) -> Result<(), CellGroupError> {
        let i = self.find(task)?;
        let entry = &mut self.tasks[i];
        let prev = entry.previous;
        entry.previous = sample;
        let delta = BulkDelta {
            starts: increment(sample.started, prev.started),
            stops: increment(sample.stopped, prev.stopped),
            errors: increment(sample.errors, prev.errors),
            started_total: sample.started,
            stopped_total: sample.stopped,
        };
        if delta.starts == 0 && delta.stops == 0 && delta.errors == 0 {
            return Ok(());
        }
        entry.writer.bulk_counts(delta, now_ns);
        if (delta.stops > 0 || delta.errors > 0) && sample.last_duration_ns > 0 {
            entry.writer.execution(sample.last_duration_ns, now_ns);
        }
        Ok(())
    }
}

impl Drop for CellGroup {
    fn drop(&mut self) {
        for task in self.tasks.drain(..) {
            let id = task.writer.id();
            drop(task.writer);
            // Cannot fail: the id is ours and its writer was just returned. Ignoring the
            // result keeps drop panic-free even so.
            let _ = self.table.unregister(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fold::Liveness;

    #[test]
    fn register_names_slots_and_drop_frees_them() {
        let t = SlotTable::new(8).unwrap();
        let g = CellGroup::register(&t, "web-1", &["emit", "flush"]).unwrap();
        assert_eq!(g.cell_id(), "web-1");
        assert_eq!(t.len(), 2);
        assert!(t.lookup("cell/web-1/emit").is_some());
        let names: Vec<&str> = g.tasks().map(|(n, _)| n).collect();
        assert_eq!(names, ["emit", "flush"]);
        drop(g);
        assert!(t.is_empty());
    }

    #[test]
    fn too_many_or_duplicate_tasks_refused() {
        let t = SlotTable::new(64).unwrap();
        let many: Vec<String> = (0..=MAX_TASKS_PER_CELL).map(|i| format!("t{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(matches!(
            CellGroup::register(&t, "c", &many),
            Err(CellGroupError::TooManyTasks { requested: 17, .. })
        ));
        assert!(matches!(
            CellGroup::register(&t, "c", &["a", "b", "a"]),
            Err(CellGroupError::DuplicateTask { .. })
        ));
        assert!(t.is_empty());
    }

    #[test]
    fn table_full_rolls_back_partial_group() {
        let t = SlotTable::new(3).unwrap();
        let _own = t.register("drain").unwrap();
        let err = CellGroup::register(&t, "c", &["a", "b", "c"]).unwrap_err();
        assert!(matches!(
            err,
            CellGroupError::Table {
                source: TimingError::TableFull { capacity: 3 },
                ..
            }
        ));
        assert_eq!(t.len(), 1, "partial registrations were freed");
        // And the freed room is usable.
        let g = CellGroup::register(&t, "c", &["a", "b"]).unwrap();
        assert_eq!(g.tasks().count(), 2);
    }

    #[test]
    fn unknown_task_counted_and_dropped() {
        let t = SlotTable::new(4).unwrap();
        let mut g = CellGroup::register(&t, "c", &["a"]).unwrap();
        assert!(matches!(
            g.observe("zzz", Observation::Start, 1),
            Err(CellGroupError::UnknownTask { .. })
        ));
        assert!(matches!(
            g.apply_sample("zzz", GuestTaskSample::default(), 1),
            Err(CellGroupError::UnknownTask { .. })
        ));
        assert_eq!(t.unregistered_observations(), 2);
        g.observe("a", Observation::Start, 1).unwrap();
        assert_eq!(t.unregistered_observations(), 2);
        let s = t.snapshot_by_name("cell/c/a").unwrap();
        assert_eq!(s.starts, 1);
    }

    #[test]
    fn guest_samples_fold_as_increments() {
        let t = SlotTable::new(4).unwrap();
        let mut g = CellGroup::register(&t, "c", &["emit"]).unwrap();
        let id = g.writer("emit").unwrap().id();
        let sample = |started, stopped, errors, d| GuestTaskSample {
            started,
            stopped,
            errors,
            last_duration_ns: d,
        };
        g.apply_sample("emit", sample(1, 0, 0, 0), 1_000).unwrap();
        let s = t.snapshot(id).unwrap();
        assert_eq!(
            (s.starts, s.liveness, s.executions),
            (1, Liveness::Running, 0)
        );

        g.apply_sample("emit", sample(3, 2, 0, 400), 2_000).unwrap();
        let s = t.snapshot(id).unwrap();
        assert_eq!((s.starts, s.stops, s.executions), (3, 2, 1));
        assert_eq!(s.last_duration_ns, Some(400));
        assert_eq!(s.liveness, Liveness::Running);

        // Same totals again: a stuck task does not look active.
        g.apply_sample("emit", sample(3, 2, 0, 400), 9_000).unwrap();
        assert_eq!(t.snapshot(id).unwrap().last_activity_ns, Some(2_000));

        g.apply_sample("emit", sample(3, 2, 1, 700), 10_000)
            .unwrap();
        let s = t.snapshot(id).unwrap();
        assert_eq!(
            (s.errors, s.liveness, s.executions),
            (1, Liveness::Error, 2)
        );
        assert_eq!(s.period_ns, Some(8_000));

        // Guest restarted: totals went down, taken as increments; error stays latched.
        g.apply_sample("emit", sample(1, 1, 0, 50), 11_000).unwrap();
        let s = t.snapshot(id).unwrap();
        assert_eq!((s.starts, s.stops, s.errors), (4, 3, 1));
        assert_eq!(s.liveness, Liveness::Error);
        g.observe("emit", Observation::Clear, 12_000).unwrap();
        assert_eq!(t.snapshot(id).unwrap().liveness, Liveness::Running);
    }
}
