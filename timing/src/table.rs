//! The fixed table of timing slots: registration by name, the single writer handle per slot,
//! the counter of dropped observations for unregistered tasks, and reader snapshots.
//!
//! Every slot is allocated when the table is built ([`SlotTable::new`]); registering a task
//! only binds a free slot to a name. The hot path is [`SlotWriter`]: it folds each observation
//! into its own copy of the slot's state and publishes it with relaxed stores under the slot's
//! seqlock (see [`crate::slot`]) — no lock, no allocation, no read-modify-write instruction.
//!
//! Registration, unregistration and snapshots take the table's registry mutex. None of them is
//! on a hot path: tasks register at start-up and when a cell registers; readers (health
//! endpoint, metrics, the silence classifier) snapshot on their own threads. Holding the
//! registry lock while reading keeps a snapshot's name and numbers from the same registration
//! (a slot cannot be freed and reused under a reader).

use std::cell::Cell;
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::Serialize;

use crate::fold::{BulkDelta, Liveness, SlotState};
use crate::slot::Slot;

/// Largest table [`SlotTable::new`] accepts. Each slot is 128 bytes, so this bounds the table
/// at 512 KiB; it covers vigil's own few tasks plus [`crate::cell::MAX_TASKS_PER_CELL`] guest
/// tasks for a few hundred cells. A bigger request is refused with
/// [`TimingError::CapacityInvalid`].
pub const MAX_TABLE_SLOTS: usize = 4096;

/// Capacity vigil uses unless configured: 32 own pipeline tasks (drain, journal, reducer,
/// workers) plus 30 cells × 16 guest tasks. When every slot is bound, `register` fails with
/// [`TimingError::TableFull`] and the caller (cell registration) reports it; nothing already
/// registered is disturbed.
pub const DEFAULT_TABLE_SLOTS: usize = 512;

/// Longest task name, in bytes. Cell task slots are named `cell/{cell_id}/{task}`, so this
/// leaves room for a long cell id and a descriptive task name; longer names are refused with
/// [`TimingError::NameTooLong`] rather than truncated (two truncated names could collide).
pub const MAX_NAME_LEN: usize = 128;

/// Errors of the slot table.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TimingError {
    /// The requested capacity is zero or above the limit.
    #[error("A timing table must hold between 1 and {max} slots; {requested} were requested.")]
    CapacityInvalid {
        /// Requested capacity.
        requested: usize,
        /// [`MAX_TABLE_SLOTS`].
        max: usize,
    },
    /// Every slot is bound to a task.
    #[error("The timing table is full: all {capacity} slots are registered.")]
    TableFull {
        /// Table capacity.
        capacity: usize,
    },
    /// An empty task name.
    #[error("A timing slot name must not be empty.")]
    NameEmpty,
    /// A task name longer than [`MAX_NAME_LEN`].
    #[error("The timing slot name is {len} bytes long; the limit is {max} bytes.")]
    NameTooLong {
        /// Length of the refused name.
        len: usize,
        /// [`MAX_NAME_LEN`].
        max: usize,
    },
    /// A task name with a control character (it would corrupt logs and metric labels).
    #[error("The timing slot name {name:?} contains a control character.")]
    NameControlChar {
        /// The refused name.
        name: String,
    },
    /// The name is already registered.
    #[error("A timing slot named {name:?} is already registered.")]
    DuplicateName {
        /// The duplicate name.
        name: String,
    },
    /// No task of that name is registered.
    #[error("No timing slot named {name:?} is registered.")]
    UnknownName {
        /// The name looked up.
        name: String,
    },
    /// The id is out of range or its slot was unregistered (and perhaps reused) since.
    #[error("Timing slot id {index}#{incarnation} is not registered (out of range or stale).")]
    UnknownSlot {
        /// Slot index.
        index: u32,
        /// Registration incarnation carried by the id.
        incarnation: u32,
    },
    /// The slot's single writer handle is already taken.
    #[error("The timing slot {name:?} already has its writer; a slot has exactly one writer.")]
    WriterClaimed {
        /// Slot name.
        name: String,
    },
    /// A reader found a write in progress on every attempt.
    #[error("The timing slot {name:?} was being written on every read attempt; try again.")]
    SnapshotContended {
        /// Slot name.
        name: String,
    },
}

/// Identifies one registration of one slot. Stale after [`SlotTable::unregister`]: the
/// incarnation no longer matches and every use fails with [`TimingError::UnknownSlot`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct SlotId {
    index: u32,
    incarnation: u32,
}

impl SlotId {
    /// Position of the slot in the table.
    pub fn index(self) -> u32 {
        self.index
    }
}

/// One observation, for callers that route observations as values (e.g. from a channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    /// The task started.
    Start,
    /// The task stopped cleanly.
    Stop,
    /// The task failed.
    Error,
    /// An operator or supervisor cleared the task's error.
    Clear,
    /// One execution of this many nanoseconds ended.
    Execution {
        /// Duration, ns.
        duration_ns: u64,
    },
}

#[derive(Debug)]
struct Entry {
    name: Option<String>,
    incarnation: u32,
    writer_claimed: bool,
}

#[derive(Debug)]
struct Registry {
    entries: Vec<Entry>,
    by_name: HashMap<String, u32>,
}

impl Registry {
    fn entry(&self, id: SlotId) -> Result<&Entry, TimingError> {
        match self.entries.get(id.index as usize) {
            Some(e) if e.name.is_some() && e.incarnation == id.incarnation => Ok(e),
            _ => Err(TimingError::UnknownSlot {
                index: id.index,
                incarnation: id.incarnation,
            }),
        }
    }

    fn entry_mut(&mut self, id: SlotId) -> Result<&mut Entry, TimingError> {
        match self.entries.get_mut(id.index as usize) {
            Some(e) if e.name.is_some() && e.incarnation == id.incarnation => Ok(e),
            _ => Err(TimingError::UnknownSlot {
                index: id.index,
                incarnation: id.incarnation,
            }),
        }
    }
}

#[derive(Debug)]
struct Inner {
    slots: Box<[Slot]>,
    registry: Mutex<Registry>,
    unregistered: AtomicU64,
}

impl Inner {
    /// The registry lock. Nothing panics while holding it, but if a caller's thread ever did,
    /// the registry is still consistent (every update is completed before the guard drops),
    /// so poisoning is ignored rather than turned into a panic here.
    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The table of timing slots. Cheap to clone (a shared handle); `Send + Sync`.
#[derive(Debug, Clone)]
pub struct SlotTable {
    inner: Arc<Inner>,
}

/// A consistent, serialisable copy of one slot, built by a reader.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SlotSnapshot {
    /// Which registration this is.
    pub id: SlotId,
    /// Task name.
    pub name: String,
    /// Liveness.
    pub liveness: Liveness,
    /// Starts counted.
    pub starts: u64,
    /// Clean stops counted.
    pub stops: u64,
    /// Errors counted.
    pub errors: u64,
    /// Executions (duration samples) counted.
    pub executions: u64,
    /// Latest execution's duration, ns.
    pub last_duration_ns: Option<u64>,
    /// Shortest execution, ns.
    pub min_duration_ns: Option<u64>,
    /// Longest execution, ns.
    pub max_duration_ns: Option<u64>,
    /// Integer EWMA of durations, ns.
    pub ewma_duration_ns: Option<u64>,
    /// Nominal period between executions (EWMA of intervals), ns.
    pub period_ns: Option<u64>,
    /// Rate derived from the period, Hz.
    pub rate_hz: Option<f64>,
    /// Timestamp of the latest execution, ns.
    pub last_execution_at_ns: Option<u64>,
    /// Timestamp of the latest observation of any kind, ns.
    pub last_activity_ns: Option<u64>,
    /// Number of times the slot was published (monotonic within one registration).
    pub generation: u64,
}

impl SlotSnapshot {
    fn from_state(id: SlotId, name: String, state: &SlotState, generation: u64) -> SlotSnapshot {
        SlotSnapshot {
            id,
            name,
            liveness: state.liveness,
            starts: state.starts,
            stops: state.stops,
            errors: state.errors,
            executions: state.executions,
            last_duration_ns: state.last_ns,
            min_duration_ns: state.min_ns,
            max_duration_ns: state.max_ns,
            ewma_duration_ns: state.ewma_ns,
            period_ns: state.period_ns,
            rate_hz: state.rate_hz(),
            last_execution_at_ns: state.last_execution_at_ns,
            last_activity_ns: state.last_activity_ns,
            generation,
        }
    }

    /// Whether the task did anything within `window_ns` before `now_ns` (inclusive) — "has the
    /// drain task run within the window?". `false` if it never did anything.
    pub fn active_within(&self, now_ns: u64, window_ns: u64) -> bool {
        self.last_activity_ns
            .is_some_and(|t| t >= now_ns.saturating_sub(window_ns))
    }
}

/// Every registered slot plus the table-wide counters.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TableSnapshot {
    /// Table capacity.
    pub capacity: usize,
    /// Observations dropped because their task was not registered.
    pub unregistered_observations: u64,
    /// Registered slots, in table order.
    pub slots: Vec<SlotSnapshot>,
    /// Names of slots skipped because a write overlapped every read attempt.
    pub contended: Vec<String>,
}

fn validate_name(name: &str) -> Result<(), TimingError> {
    if name.is_empty() {
        return Err(TimingError::NameEmpty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(TimingError::NameTooLong {
            len: name.len(),
            max: MAX_NAME_LEN,
        });
    }
    if name.chars().any(char::is_control) {
        return Err(TimingError::NameControlChar {
            name: name.to_owned(),
        });
    }
    Ok(())
}

impl SlotTable {
    /// A table of `capacity` pre-allocated slots, all free.
    pub fn new(capacity: usize) -> Result<SlotTable, TimingError> {
        if capacity == 0 || capacity > MAX_TABLE_SLOTS {
            return Err(TimingError::CapacityInvalid {
                requested: capacity,
                max: MAX_TABLE_SLOTS,
            });
        }
        let slots: Box<[Slot]> = (0..capacity).map(|_| Slot::new()).collect();
        let entries = (0..capacity)
            .map(|_| Entry {
                name: None,
                incarnation: 0,
                writer_claimed: false,
            })
            .collect();
        Ok(SlotTable {
            inner: Arc::new(Inner {
                slots,
                registry: Mutex::new(Registry {
                    entries,
                    by_name: HashMap::with_capacity(capacity),
                }),
                unregistered: AtomicU64::new(0),
            }),
        })
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.inner.slots.len()
    }

    /// Number of registered slots.
    pub fn len(&self) -> usize {
        self.inner.registry().by_name.len()
    }

    /// Whether no slot is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bind a free slot to `name`. The slot starts fresh (`Unknown`, zero counts). Fails when
    /// the name is invalid or taken, or when the table is full.
    pub fn register(&self, name: &str) -> Result<SlotId, TimingError> {
        validate_name(name)?;
        let mut reg = self.inner.registry();
        if reg.by_name.contains_key(name) {
            return Err(TimingError::DuplicateName {
                name: name.to_owned(),
            });
        }
        let Some(index) = reg.entries.iter().position(|e| e.name.is_none()) else {
            return Err(TimingError::TableFull {
                capacity: self.capacity(),
            });
        };
        // The slot is free, so no writer handle exists: this reset is the only write, and
        // readers are excluded by the registry lock we hold.
        self.inner.slots[index].publish(&SlotState::new());
        let entry = &mut reg.entries[index];
        entry.name = Some(name.to_owned());
        entry.writer_claimed = false;
        let id = SlotId {
            index: index as u32,
            incarnation: entry.incarnation,
        };
        reg.by_name.insert(name.to_owned(), index as u32);
        Ok(id)
    }

    /// The id registered under `name`, if any.
    pub fn lookup(&self, name: &str) -> Option<SlotId> {
        let reg = self.inner.registry();
        let index = *reg.by_name.get(name)?;
        Some(SlotId {
            index,
            incarnation: reg.entries[index as usize].incarnation,
        })
    }

    /// Take the single writer handle of a slot. Fails if the id is stale or the writer is
    /// already out; dropping the writer returns it.
    pub fn writer(&self, id: SlotId) -> Result<SlotWriter, TimingError> {
        let mut reg = self.inner.registry();
        let entry = reg.entry_mut(id)?;
        if entry.writer_claimed {
            return Err(TimingError::WriterClaimed {
                name: entry.name.clone().unwrap_or_default(),
            });
        }
        let reading = self.inner.slots[id.index as usize].read().ok_or_else(|| {
            TimingError::SnapshotContended {
                name: entry.name.clone().unwrap_or_default(),
            }
        })?;
        entry.writer_claimed = true;
        Ok(SlotWriter {
            table: Arc::clone(&self.inner),
            id,
            state: reading.state,
            _not_sync: PhantomData,
        })
    }

    /// [`SlotTable::register`] then [`SlotTable::writer`].
    pub fn register_writer(&self, name: &str) -> Result<SlotWriter, TimingError> {
        let id = self.register(name)?;
        self.writer(id)
    }

    /// Free a slot so it can be registered again (e.g. when a cell is removed). Its writer
    /// must have been dropped first. The id, and any copy of it, becomes stale.
    pub fn unregister(&self, id: SlotId) -> Result<(), TimingError> {
        let mut reg = self.inner.registry();
        let entry = reg.entry_mut(id)?;
        if entry.writer_claimed {
            return Err(TimingError::WriterClaimed {
                name: entry.name.clone().unwrap_or_default(),
            });
        }
        let name = entry.name.take();
        entry.incarnation = entry.incarnation.wrapping_add(1);
        if let Some(name) = name {
            reg.by_name.remove(&name);
        }
        Ok(())
    }

    /// Count one observation that was dropped because its task has no slot. Lock-free
    /// (one relaxed `fetch_add`), safe on a hot path.
    pub fn note_unregistered(&self) {
        self.inner.unregistered.fetch_add(1, Ordering::Relaxed);
    }

    /// Observations dropped so far because their task had no slot.
    pub fn unregistered_observations(&self) -> u64 {
        self.inner.unregistered.load(Ordering::Relaxed)
    }

    /// A consistent snapshot of one slot.
    pub fn snapshot(&self, id: SlotId) -> Result<SlotSnapshot, TimingError> {
        let reg = self.inner.registry();
        let name = reg.entry(id)?.name.clone().unwrap_or_default();
        match self.inner.slots[id.index as usize].read() {
            Some(r) => Ok(SlotSnapshot::from_state(id, name, &r.state, r.generation)),
            None => Err(TimingError::SnapshotContended { name }),
        }
    }

    /// A consistent snapshot of the slot registered under `name`.
    pub fn snapshot_by_name(&self, name: &str) -> Result<SlotSnapshot, TimingError> {
        let id = self.lookup(name).ok_or_else(|| TimingError::UnknownName {
            name: name.to_owned(),
        })?;
        self.snapshot(id)
    }

    /// Snapshots of every registered slot (each consistent on its own; slots are read one
    /// after another, not at one instant).
    pub fn snapshot_all(&self) -> TableSnapshot {
        let reg = self.inner.registry();
        let mut slots = Vec::with_capacity(reg.by_name.len());
        let mut contended = Vec::new();
        for (index, entry) in reg.entries.iter().enumerate() {
            let Some(name) = &entry.name else { continue };
            let id = SlotId {
                index: index as u32,
                incarnation: entry.incarnation,
            };
            match self.inner.slots[index].read() {
                Some(r) => slots.push(SlotSnapshot::from_state(
                    id,
                    name.clone(),
                    &r.state,
                    r.generation,
                )),
                None => contended.push(name.clone()),
            }
        }
        TableSnapshot {
            capacity: self.capacity(),
            unregistered_observations: self.unregistered_observations(),
            slots,
            contended,
        }
    }
}

/// The one writer of one slot. `Send` (hand it to the thread that runs the task) but not
/// `Sync` (a marker field), and its methods take `&mut self`: together with the table handing
/// out one writer per slot, that makes it the single writer the seqlock needs. It keeps its
/// own copy of the slot's state, so a write never loads the shared atomics.
///
/// Every method folds one observation into that state ([`crate::fold`] rules) and publishes
/// it: relaxed atomic stores, no lock, no allocation, no atomic read-modify-write.
#[derive(Debug)]
pub struct SlotWriter {
    table: Arc<Inner>,
    id: SlotId,
    state: SlotState,
    _not_sync: PhantomData<Cell<()>>,
}

impl SlotWriter {
    /// The slot this writer owns.
    pub fn id(&self) -> SlotId {
        self.id
    }

    /// The writer's view of the slot (identical to what readers see after the last write).
    pub fn state(&self) -> SlotState {
        self.state
    }

    #[inline]
    fn apply(&mut self, f: impl FnOnce(&mut SlotState)) {
        f(&mut self.state);
        self.table.slots[self.id.index as usize].publish(&self.state);
    }

    /// The task started.
    #[inline]
    pub fn start(&mut self, now_ns: u64) {
        self.apply(|s| s.start(now_ns));
    }

    /// The task stopped cleanly (never clears a latched error).
    #[inline]
    pub fn stop(&mut self, now_ns: u64) {
        self.apply(|s| s.stop(now_ns));
    }

    /// The task failed; the error stays latched until [`SlotWriter::clear`].
    #[inline]
    pub fn error(&mut self, now_ns: u64) {
        self.apply(|s| s.error(now_ns));
    }

    /// Clear a latched error (or any state): back to `Running`.
    #[inline]
    pub fn clear(&mut self, now_ns: u64) {
        self.apply(|s| s.clear(now_ns));
    }

    /// One execution of `duration_ns` ended at `now_ns`.
    #[inline]
    pub fn execution(&mut self, duration_ns: u64, now_ns: u64) {
        self.apply(|s| s.execution(duration_ns, now_ns));
    }

    /// One execution from `now_start` to `now_end`: `execution(now_end - now_start, now_end)`
    /// (saturating at zero if the clock went backwards).
    #[inline]
    pub fn time(&mut self, now_start: u64, now_end: u64) {
        self.execution(now_end.saturating_sub(now_start), now_end);
    }

    /// Apply an [`Observation`] value.
    #[inline]
    pub fn observe(&mut self, observation: Observation, now_ns: u64) {
        match observation {
            Observation::Start => self.start(now_ns),
            Observation::Stop => self.stop(now_ns),
            Observation::Error => self.error(now_ns),
            Observation::Clear => self.clear(now_ns),
            Observation::Execution { duration_ns } => self.execution(duration_ns, now_ns),
        }
    }

    /// Add bulk counts from a reporter that sends totals ([`SlotState::bulk_counts`]).
    #[inline]
    pub fn bulk_counts(&mut self, delta: BulkDelta, now_ns: u64) {
        self.apply(|s| s.bulk_counts(delta, now_ns));
    }
}

impl Drop for SlotWriter {
    fn drop(&mut self) {
        let mut reg = self.table.registry();
        if let Ok(entry) = reg.entry_mut(self.id) {
            entry.writer_claimed = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_and_snapshot_fresh_slot() {
        let t = SlotTable::new(4).unwrap();
        let id = t.register("drain").unwrap();
        let s = t.snapshot(id).unwrap();
        assert_eq!(s.name, "drain");
        assert_eq!(s.liveness, Liveness::Unknown);
        assert_eq!(s.executions, 0);
        assert_eq!(s.rate_hz, None);
        assert_eq!(t.lookup("drain"), Some(id));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn table_full_is_an_error() {
        let t = SlotTable::new(2).unwrap();
        t.register("a").unwrap();
        t.register("b").unwrap();
        assert_eq!(t.register("c"), Err(TimingError::TableFull { capacity: 2 }));
        // Existing slots are untouched.
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn capacity_limits() {
        assert!(matches!(
            SlotTable::new(0),
            Err(TimingError::CapacityInvalid { .. })
        ));
        assert!(matches!(
            SlotTable::new(MAX_TABLE_SLOTS + 1),
            Err(TimingError::CapacityInvalid { .. })
        ));
        if !cfg!(miri) {
            assert_eq!(
                SlotTable::new(MAX_TABLE_SLOTS).unwrap().capacity(),
                MAX_TABLE_SLOTS
            );
        }
    }

    #[test]
    fn bad_names_refused() {
        let t = SlotTable::new(4).unwrap();
        assert_eq!(t.register(""), Err(TimingError::NameEmpty));
        let long = "x".repeat(MAX_NAME_LEN + 1);
        assert!(matches!(
            t.register(&long),
            Err(TimingError::NameTooLong { len, .. }) if len == MAX_NAME_LEN + 1
        ));
        assert!(matches!(
            t.register("a\nb"),
            Err(TimingError::NameControlChar { .. })
        ));
        t.register("drain").unwrap();
        assert!(matches!(
            t.register("drain"),
            Err(TimingError::DuplicateName { .. })
        ));
        assert!(t.register(&"y".repeat(MAX_NAME_LEN)).is_ok());
    }

    #[test]
    fn single_writer_per_slot() {
        let t = SlotTable::new(2).unwrap();
        let mut w = t.register_writer("journal").unwrap();
        assert!(matches!(
            t.writer(w.id()),
            Err(TimingError::WriterClaimed { .. })
        ));
        let id = w.id();
        w.execution(10, 1);
        drop(w);
        // Re-claiming continues from the published state.
        let mut w2 = t.writer(id).unwrap();
        assert_eq!(w2.state().executions, 1);
        w2.execution(20, 2);
        assert_eq!(t.snapshot(id).unwrap().executions, 2);
    }

    #[test]
    fn writer_fold_is_visible_to_readers() {
        let t = SlotTable::new(2).unwrap();
        let mut w = t.register_writer("reducer").unwrap();
        w.start(100);
        w.time(1_000, 1_250);
        w.time(2_000, 2_100);
        w.error(2_200);
        w.stop(2_300);
        let s = t.snapshot(w.id()).unwrap();
        assert_eq!(
            s.liveness,
            Liveness::Error,
            "stop never clears latched error"
        );
        assert_eq!((s.starts, s.stops, s.errors, s.executions), (1, 1, 1, 2));
        assert_eq!(s.last_duration_ns, Some(100));
        assert_eq!(s.min_duration_ns, Some(100));
        assert_eq!(s.max_duration_ns, Some(250));
        // 250 - 31 + 12 = 231
        assert_eq!(s.ewma_duration_ns, Some(231));
        assert_eq!(s.period_ns, Some(850));
        assert_eq!(s.last_activity_ns, Some(2_300));
        assert!(s.active_within(3_000, 700));
        assert!(!s.active_within(3_000, 699));
        w.observe(Observation::Clear, 2_400);
        assert_eq!(t.snapshot(w.id()).unwrap().liveness, Liveness::Running);
        // 1 publish when the table was built + 1 reset at registration + 6 writes.
        assert_eq!(t.snapshot(w.id()).unwrap().generation, 8);
    }

    #[test]
    fn unregistered_observations_counted() {
        let t = SlotTable::new(2).unwrap();
        assert_eq!(t.unregistered_observations(), 0);
        t.note_unregistered();
        t.note_unregistered();
        assert_eq!(t.unregistered_observations(), 2);
        assert_eq!(t.snapshot_all().unregistered_observations, 2);
        assert!(matches!(
            t.snapshot_by_name("nope"),
            Err(TimingError::UnknownName { .. })
        ));
    }

    #[test]
    fn unregister_frees_slot_and_staleness_is_detected() {
        let t = SlotTable::new(1).unwrap();
        let mut w = t.register_writer("cell/a/x").unwrap();
        let id = w.id();
        w.execution(5, 5);
        assert!(matches!(
            t.unregister(id),
            Err(TimingError::WriterClaimed { .. })
        ));
        drop(w);
        t.unregister(id).unwrap();
        assert!(t.is_empty());
        assert!(matches!(
            t.snapshot(id),
            Err(TimingError::UnknownSlot { .. })
        ));
        assert!(matches!(t.writer(id), Err(TimingError::UnknownSlot { .. })));
        let id2 = t.register("cell/b/x").unwrap();
        assert_eq!(id2.index(), id.index());
        assert_ne!(id2, id);
        let s = t.snapshot(id2).unwrap();
        assert_eq!(s.executions, 0, "a reused slot starts fresh");
        assert_eq!(s.liveness, Liveness::Unknown);
        assert!(matches!(
            t.unregister(id),
            Err(TimingError::UnknownSlot { .. })
        ));
    }

    #[test]
    fn snapshot_serializes() {
        let t = SlotTable::new(2).unwrap();
        let mut w = t.register_writer("drain").unwrap();
        w.execution(10, 100);
        w.execution(10, 200);
        let json = serde_json::to_value(t.snapshot_all()).unwrap();
        let slot = &json["slots"][0];
        assert_eq!(slot["name"], "drain");
        assert_eq!(slot["liveness"], "running");
        assert_eq!(slot["period_ns"], 100);
        assert_eq!(slot["rate_hz"], 10_000_000.0);
        assert_eq!(json["capacity"], 2);
    }

    #[test]
    fn writer_is_send_not_sync() {
        fn is_send<T: Send>() {}
        fn is_send_sync<T: Send + Sync>() {}
        is_send::<SlotWriter>();
        is_send_sync::<SlotTable>();
    }

    /// Compile-time proof that `SlotWriter` is not `Sync`: if it were, both impls below would
    /// apply and the `_` in `AmbiguousIfSync<_>` could not be inferred, so this would not
    /// compile.
    #[test]
    fn writer_is_not_sync() {
        trait AmbiguousIfSync<A> {
            fn some_item() {}
        }
        impl<T: ?Sized> AmbiguousIfSync<()> for T {}
        impl<T: ?Sized + Sync> AmbiguousIfSync<u8> for T {}
        <SlotWriter as AmbiguousIfSync<_>>::some_item();
    }
}
