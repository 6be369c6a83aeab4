//! vigil's drain: the io_uring loop that accepts guest connections (AF_VSOCK, identified by
//! peer CID, and hybrid-vsock Unix sockets, identified by the accepting per-cell listener),
//! decodes their frames in place from a provided-buffer ring and hands batches of events to
//! the journal stage through a bounded channel with per-connection back-pressure.
//!
//! Start it with [`spawn`]; talk to it with [`DrainCommand`]s; read [`DrainOutput`]s.

pub mod bufring;
pub mod cell;
pub mod event_loop;
pub mod output;
pub mod policy;
pub mod protocol;
pub mod reject_log;
pub mod stats;
pub mod sys;

pub use cell::{CellInfo, CellSlot, CellSpec};
pub use event_loop::{
    spawn, spawn_with_gate, DrainCommander, DrainConfig, DrainError, DrainHandle, COMMAND_CAPACITY,
    CONN_HANDOFF_QUOTA, HANDOFF_CAPACITY, IDLE_WAKE_NS, MAX_CELLS, MAX_CONNECTIONS,
};
pub use output::{ConnId, DrainCommand, DrainOutput, GuestBatch, GuestEvent, Peer};
pub use policy::{GateAnswer, GateRelease, PolicyGate};
pub use stats::{CloseReason, DrainStats, RejectReason};
pub use sys::SysError;
