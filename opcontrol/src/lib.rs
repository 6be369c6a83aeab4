//! vigil's kill switch: everything that decides whether an operation of a cell's workload may
//! proceed, and everything that enforces a decision outside the process.
//!
//! - [`store`]: the op-control store, mutated only by the reducer (one mutator). It holds, per
//!   cell run, the op table (`op_id` → `Paused` | `Terminated`) and the run-wide state, applies
//!   signals with the transitions of `domain.md` ("Op-control"), and publishes every change.
//! - [`view`]: the drain thread's own read-mostly copy of that state, fed by a bounded ring of
//!   [`OpUpdate`]s; it answers policy queries (allow / deny / hold) and releases held ones.
//! - [`upstream`]: the durable JetStream pull consumer that brings control signals from the
//!   control plane, with the reconnect back-off schedule as a pure type.
//! - [`cgroup`]: freeze / thaw / kill of a cell's cgroup (v2, or the v1 freezer).
//! - [`audit`]: the audit events (CloudEvents type + JSON data) the daemon journals.
//!
//! The vocabulary shared by those modules (signals, op states, decisions, updates) lives here.

pub mod audit;
pub mod cgroup;
pub mod store;
pub mod upstream;
pub mod view;

mod table;

use std::sync::Arc;

use vigil_wire::pb::control_signal::Signal as WireSignal;

/// A control signal, as carried by `vigil.v1.ControlSignal.signal` or given by a local
/// operator command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Signal {
    /// Malformed (the protobuf default, or a value this build does not know): ignored and
    /// counted, never applied.
    Unspecified,
    /// Hold every action of the op (or of the whole run) until `Resume` or `Terminate`.
    Pause,
    /// Lift a pause; has no effect on a terminated op.
    Resume,
    /// Deny every further action, for good (sticky until the run ends).
    Terminate,
}

impl Signal {
    /// The signal carried by a wire value; values this build does not know are
    /// [`Signal::Unspecified`] (fail-safe: they are ignored and counted, not guessed at).
    pub fn from_wire(value: i32) -> Signal {
        match WireSignal::try_from(value) {
            Ok(WireSignal::Pause) => Signal::Pause,
            Ok(WireSignal::Resume) => Signal::Resume,
            Ok(WireSignal::Terminate) => Signal::Terminate,
            Ok(WireSignal::Unspecified) | Err(_) => Signal::Unspecified,
        }
    }

    /// The protobuf enum name, as written in audit events.
    pub fn as_str(self) -> &'static str {
        match self {
            Signal::Unspecified => "SIGNAL_UNSPECIFIED",
            Signal::Pause => "PAUSE",
            Signal::Resume => "RESUME",
            Signal::Terminate => "TERMINATE",
        }
    }
}

impl From<WireSignal> for Signal {
    fn from(value: WireSignal) -> Self {
        Signal::from_wire(value as i32)
    }
}

/// The state of one op (or of a whole run). Ordered by severity: the effective state of an op
/// is the most severe of its own state and its run's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OpState {
    /// No entry: the op runs normally.
    Running,
    /// Actions are held until `Resume` or `Terminate`.
    Paused,
    /// Actions are denied; sticky until the run ends.
    Terminated,
}

impl OpState {
    /// The name written in audit events (`stateAfter`).
    pub fn as_str(self) -> &'static str {
        match self {
            OpState::Running => "running",
            OpState::Paused => "paused",
            OpState::Terminated => "terminated",
        }
    }
}

/// Why the state of an op cannot be known (every one of them denies: fail-closed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnknownCause {
    /// vigil has started but has not yet re-applied its persisted terminates.
    NotRestored,
    /// The (cell, run) is not registered with the store (never begun, or already ended).
    UnknownRun,
    /// The run's op table is full (or a signal was refused because it was): an op without an
    /// entry may have a state that could not be recorded.
    TableFull,
}

/// Why a query is denied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// The op, or its whole run, was terminated.
    Terminated,
    /// The state cannot be known; see the cause.
    StateUnknown(UnknownCause),
    /// The op is paused but the drain view already holds its maximum of parked queries.
    HoldLimit,
}

impl DenyReason {
    /// A short snake_case name for logs, metrics and audit events.
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::Terminated => "terminated",
            DenyReason::StateUnknown(UnknownCause::NotRestored) => "state_unknown_not_restored",
            DenyReason::StateUnknown(UnknownCause::UnknownRun) => "state_unknown_unknown_run",
            DenyReason::StateUnknown(UnknownCause::TableFull) => "state_unknown_table_full",
            DenyReason::HoldLimit => "hold_limit",
        }
    }
}

/// The answer of the enforcement path for one action of one op.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Proceed.
    Allow,
    /// Do not proceed.
    Deny(DenyReason),
    /// Wait: the op is paused; the answer comes when `Resume` or `Terminate` arrives.
    Hold,
}

impl Decision {
    /// The `decision` value of a `dev.vigil.opcontrol.v1.decision` audit event: `allow`,
    /// `hold`, or `deny_<reason>` (e.g. `deny_terminated`, `deny_state_unknown_table_full`).
    pub fn audit_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Hold => "hold",
            Decision::Deny(DenyReason::Terminated) => "deny_terminated",
            Decision::Deny(DenyReason::StateUnknown(UnknownCause::NotRestored)) => {
                "deny_state_unknown_not_restored"
            }
            Decision::Deny(DenyReason::StateUnknown(UnknownCause::UnknownRun)) => {
                "deny_state_unknown_unknown_run"
            }
            Decision::Deny(DenyReason::StateUnknown(UnknownCause::TableFull)) => {
                "deny_state_unknown_table_full"
            }
            Decision::Deny(DenyReason::HoldLimit) => "deny_hold_limit",
        }
    }
}

/// Who sent a signal; recorded as the `source` of the `signal_applied` audit event.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SignalSource {
    /// The upstream control plane (JetStream); `issuer` is `ControlSignal.issuer`.
    Upstream {
        /// Who sent it, as the control plane says.
        issuer: String,
    },
    /// A local operator command (`vigil ctl cell ...`); `issuer` is the local user.
    Operator {
        /// The local user, as the admin socket saw it.
        issuer: String,
    },
    /// Re-applied at start from vigil's own persisted terminates.
    Restore,
}

impl SignalSource {
    /// `upstream:<issuer>`, `operator:<issuer>` or `restore`.
    pub fn audit_label(&self) -> String {
        match self {
            SignalSource::Upstream { issuer } => format!("upstream:{issuer}"),
            SignalSource::Operator { issuer } => format!("operator:{issuer}"),
            SignalSource::Restore => "restore".to_owned(),
        }
    }
}

/// One change of op-control state, published by the store (in the order it made them) to the
/// drain view, which applies it to its own copy. Applying the same sequence of updates to an
/// empty state always yields the store's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpUpdate {
    /// A run was registered; a different run of the same cell it replaces is dropped.
    RunBegun {
        /// The cell.
        cell: Arc<str>,
        /// Its new run.
        run: Arc<str>,
    },
    /// The run ended: its op table is dropped and queries for it are denied (unknown run).
    RunEnded {
        /// The cell.
        cell: Arc<str>,
        /// The run that ended.
        run: Arc<str>,
    },
    /// The persisted terminates were re-applied: state is known from now on.
    Restored,
    /// One op's state changed (`Running` = the entry was removed).
    Op {
        /// The cell.
        cell: Arc<str>,
        /// The run.
        run: Arc<str>,
        /// The op.
        op: Arc<str>,
        /// Its new state.
        state: OpState,
    },
    /// The run-wide state changed. `Running` (a cell-level resume) also removes every
    /// op-level `Paused` entry; `Terminated` drops the op entries (all are terminated now).
    Cell {
        /// The cell.
        cell: Arc<str>,
        /// The run.
        run: Arc<str>,
        /// The new run-wide state.
        state: OpState,
    },
    /// A signal for a new op was refused because the run's op table was full: from now on,
    /// until the run ends, an op without an entry has an unknown state (denied).
    TableFull {
        /// The cell.
        cell: Arc<str>,
        /// The run.
        run: Arc<str>,
    },
}

/// An op id of `""` means "no op" (the protobuf default: a cell-level signal or query).
pub(crate) fn non_empty(op: Option<&str>) -> Option<&str> {
    op.filter(|s| !s.is_empty())
}
