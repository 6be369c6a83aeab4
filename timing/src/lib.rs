//! vigil-timing: executor timing and liveness slots ("Executor timing and liveness" in
//! `domain.md`).
//!
//! This crate owns the per-task timing slots of vigil's own pipeline (drain, journal,
//! reducer, workers) and of guest-reported tasks (a bounded group per cell):
//! - [`fold`]: the pure fold rules (liveness, counters, min/max/last, integer EWMA, period and
//!   rate, last activity);
//! - [`slot`] (private): lock-free storage of one slot and its seqlock publish/read protocol;
//! - [`table`]: the fixed, pre-allocated [`SlotTable`], registration by name, the single
//!   [`SlotWriter`] per slot (hot path: relaxed stores, no lock, no allocation), the counter of
//!   dropped observations for unregistered tasks, and serialisable [`SlotSnapshot`]s;
//! - [`cell`]: [`CellGroup`], the guest task slots of one cell and the folding of guest
//!   `TaskSample` totals.
//!
//! Time is always passed in (`now_ns` from the caller's monotonic clock); nothing here reads a
//! clock.

pub mod cell;
pub mod fold;
mod slot;
pub mod table;

pub use cell::{CellGroup, CellGroupError, GuestTaskSample, MAX_TASKS_PER_CELL};
pub use fold::{ewma_step, BulkDelta, Liveness, SlotState, EWMA_SHIFT};
pub use slot::READ_ATTEMPTS;
pub use table::{
    Observation, SlotId, SlotSnapshot, SlotTable, SlotWriter, TableSnapshot, TimingError,
    DEFAULT_TABLE_SLOTS, MAX_NAME_LEN, MAX_TABLE_SLOTS,
};
