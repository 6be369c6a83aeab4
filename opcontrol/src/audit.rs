//! The kill switch's audit events: every signal applied, every decision that denies or holds
//! (and the end of a hold), every cgroup action attempted. Each knows its exact CloudEvents
//! `type` and its JSON `data` (the fields of `domain.md`, "Event types"), so the daemon only
//! has to stamp, sign and journal them.

use serde_json::{json, Value};

use crate::cgroup::{CgroupAction, CgroupOutcome};
use crate::{Decision, OpState, Signal};

/// CloudEvents type of [`AuditEvent::SignalApplied`].
pub const TYPE_SIGNAL_APPLIED: &str = "dev.vigil.opcontrol.v1.signal_applied";
/// CloudEvents type of [`AuditEvent::Decision`].
pub const TYPE_DECISION: &str = "dev.vigil.opcontrol.v1.decision";
/// CloudEvents type of [`AuditEvent::Cgroup`].
pub const TYPE_CGROUP: &str = "dev.vigil.cell.enforcement.v1.cgroup";

/// One audit event of the kill switch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuditEvent {
    /// A signal changed or confirmed op state.
    SignalApplied {
        /// The cell.
        cell_id: String,
        /// The run.
        run_id: String,
        /// The op (`None`: the whole cell; the field is then absent from `data`).
        op_id: Option<String>,
        /// The signal.
        signal: Signal,
        /// The effective state afterwards.
        state_after: OpState,
        /// Who sent it ([`crate::SignalSource::audit_label`]).
        source: String,
    },
    /// A policy query was denied or held, or a hold ended (`held_ms` then says how long).
    Decision {
        /// The cell.
        cell_id: String,
        /// The run.
        run_id: String,
        /// The op (`None`: a cell-level query).
        op_id: Option<String>,
        /// The action asked for.
        action: String,
        /// The decision (for a hold that ended: the final one).
        decision: Decision,
        /// Milliseconds held (0 for an immediate deny or a new hold).
        held_ms: u64,
    },
    /// A freeze, thaw or kill of a cell's cgroup was attempted.
    Cgroup {
        /// The cell.
        cell_id: String,
        /// The cgroup directory.
        cgroup: String,
        /// What was attempted.
        action: CgroupAction,
        /// What happened.
        outcome: CgroupOutcome,
    },
}

impl AuditEvent {
    /// The CloudEvents `type`.
    pub fn event_type(&self) -> &'static str {
        match self {
            AuditEvent::SignalApplied { .. } => TYPE_SIGNAL_APPLIED,
            AuditEvent::Decision { .. } => TYPE_DECISION,
            AuditEvent::Cgroup { .. } => TYPE_CGROUP,
        }
    }

    /// The event's `data` as JSON (UTF-8 bytes; keys in sorted order, so deterministic).
    pub fn data_json(&self) -> Vec<u8> {
        let value = match self {
            AuditEvent::SignalApplied {
                cell_id,
                run_id,
                op_id,
                signal,
                state_after,
                source,
            } => {
                let mut v = json!({
                    "cellId": cell_id,
                    "runId": run_id,
                    "signal": signal.as_str(),
                    "stateAfter": state_after.as_str(),
                    "source": source,
                });
                if let (Some(op), Value::Object(map)) = (op_id, &mut v) {
                    map.insert("opId".to_owned(), Value::String(op.clone()));
                }
                v
            }
            AuditEvent::Decision {
                cell_id,
                run_id,
                op_id,
                action,
                decision,
                held_ms,
            } => json!({
                "cellId": cell_id,
                "runId": run_id,
                "opId": op_id,
                "action": action,
                "decision": decision.audit_str(),
                "heldMs": held_ms,
            }),
            AuditEvent::Cgroup {
                cell_id,
                cgroup,
                action,
                outcome,
            } => json!({
                "cellId": cell_id,
                "cgroup": cgroup,
                "action": action.as_str(),
                "result": outcome.result_str(),
                "error": outcome.error_sentence(),
            }),
        };
        // Serializing a `Value` built from strings and integers cannot fail.
        serde_json::to_vec(&value).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::CgroupError;
    use crate::{DenyReason, UnknownCause};

    fn parse(e: &AuditEvent) -> serde_json::Map<String, Value> {
        match serde_json::from_slice(&e.data_json()).unwrap() {
            Value::Object(m) => m,
            other => panic!("not an object: {other}"),
        }
    }

    #[test]
    fn signal_applied_has_the_exact_fields() {
        let mut e = AuditEvent::SignalApplied {
            cell_id: "c".into(),
            run_id: "r".into(),
            op_id: Some("t:s".into()),
            signal: Signal::Terminate,
            state_after: OpState::Terminated,
            source: "upstream:ops".into(),
        };
        assert_eq!(e.event_type(), "dev.vigil.opcontrol.v1.signal_applied");
        let m = parse(&e);
        let keys: Vec<_> = m.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            ["cellId", "opId", "runId", "signal", "source", "stateAfter"]
        );
        assert_eq!(m["signal"], "TERMINATE");
        assert_eq!(m["stateAfter"], "terminated");
        if let AuditEvent::SignalApplied { op_id, .. } = &mut e {
            *op_id = None;
        }
        assert!(!parse(&e).contains_key("opId"), "absent = whole cell");
    }

    #[test]
    fn decision_and_cgroup_have_the_exact_fields() {
        let e = AuditEvent::Decision {
            cell_id: "c".into(),
            run_id: "r".into(),
            op_id: Some("o".into()),
            action: "tool.call".into(),
            decision: Decision::Deny(DenyReason::StateUnknown(UnknownCause::TableFull)),
            held_ms: 0,
        };
        assert_eq!(e.event_type(), "dev.vigil.opcontrol.v1.decision");
        let m = parse(&e);
        let keys: Vec<_> = m.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            ["action", "cellId", "decision", "heldMs", "opId", "runId"]
        );
        assert_eq!(m["decision"], "deny_state_unknown_table_full");
        let e = AuditEvent::Cgroup {
            cell_id: "c".into(),
            cgroup: "/sys/fs/cgroup/x".into(),
            action: CgroupAction::Kill,
            outcome: CgroupOutcome::Failed(CgroupError::Timeout {
                path: "/sys/fs/cgroup/x".into(),
                wanted: "unpopulated",
                waited_ms: 5_000,
            }),
        };
        assert_eq!(e.event_type(), "dev.vigil.cell.enforcement.v1.cgroup");
        let m = parse(&e);
        let keys: Vec<_> = m.keys().map(String::as_str).collect();
        assert_eq!(keys, ["action", "cellId", "cgroup", "error", "result"]);
        assert_eq!(m["result"], "failed");
        assert_eq!(m["action"], "kill");
        assert_eq!(
            m["error"],
            "/sys/fs/cgroup/x did not become unpopulated within 5000 ms"
        );
    }
}
