//! The daemon's side of the kill switch: the [`Gate`] that lets vigil-opcontrol's drain-side
//! view answer policy queries on the drain thread, the control-signal vocabulary the reducer
//! and admin socket share, reading persisted terminates back from the journal at start, and
//! carrying out cgroup enforcement off the control loop.
use std::path::Path;

use vigil_drain::{GateAnswer, GateRelease, PolicyGate};
use vigil_opcontrol::view::{Answer, DrainView};
use vigil_opcontrol::{Decision, Signal};

/// Event type of an applied signal (the journal is also its persistence).
pub const TYPE_SIGNAL_APPLIED: &str = "dev.vigil.opcontrol.v1.signal_applied";
/// Event type of a denied or held query.
pub const TYPE_DECISION: &str = "dev.vigil.opcontrol.v1.decision";

/// The drain thread's gate: the op-control view, answered without locks.
pub struct Gate {
    pub view: DrainView,
    released: Vec<vigil_opcontrol::view::Released>,
}

impl Gate {
    pub fn new(view: DrainView) -> Self {
        Self {
            view,
            released: Vec::new(),
        }
    }
}

fn sentence(d: Decision) -> String {
    match d {
        Decision::Allow => String::new(),
        Decision::Hold => "operation paused: held until resumed or terminated".into(),
        Decision::Deny(vigil_opcontrol::DenyReason::Terminated) => "operation terminated".into(),
        Decision::Deny(vigil_opcontrol::DenyReason::HoldLimit) => {
            "too many held queries on this host: denied (fail-closed)".into()
        }
        Decision::Deny(vigil_opcontrol::DenyReason::StateUnknown(_)) => {
            "operation state unknown: denied (fail-closed)".into()
        }
    }
}

impl PolicyGate for Gate {
    fn query(
        &mut self,
        conn_token: u64,
        query_id: u64,
        cell: &str,
        run: &str,
        op_id: &str,
        action: &str,
        now_ns: u64,
    ) -> GateAnswer {
        match self
            .view
            .query(conn_token, query_id, cell, run, op_id, action, now_ns)
        {
            Answer::Held | Answer::Decided(Decision::Hold) => GateAnswer::Hold,
            Answer::Decided(Decision::Allow) => GateAnswer::Allow,
            Answer::Decided(d @ Decision::Deny(_)) => GateAnswer::Deny {
                reason: sentence(d),
                label: d.audit_str(),
            },
        }
    }

    fn poll(&mut self, now_ns: u64, out: &mut Vec<GateRelease>) {
        self.view.apply_pending_into(now_ns, &mut self.released);
        for r in self.released.drain(..) {
            out.push(GateRelease {
                conn_token: r.conn_token,
                query_id: r.query_id,
                allow: matches!(r.decision, Decision::Allow),
                reason: sentence(r.decision),
                label: r.decision.audit_str(),
                held_ns: r.held_ns,
                op_id: r.op.as_deref().unwrap_or("").to_string(),
                action: r.action.to_string(),
            });
        }
    }

    fn cancel_conn(&mut self, conn_token: u64) {
        self.view.cancel_conn(conn_token);
    }
}

/// Parses a signal name given on the command line.
pub fn parse_signal(name: &str) -> Option<Signal> {
    match name {
        "pause" => Some(Signal::Pause),
        "resume" => Some(Signal::Resume),
        "terminate" => Some(Signal::Terminate),
        _ => None,
    }
}

/// The terminates on record: `signal_applied` events whose state after is `terminated`, as
/// (cell, run, op) — re-applied at start so a terminated op stays terminated.
pub fn persisted_terminates(dir: &Path) -> Vec<(String, String, Option<String>)> {
    let mut out = Vec::new();
    if !dir.exists() {
        return out;
    }
    let filter = vigil_journal::TailFilter {
        ty: Some(TYPE_SIGNAL_APPLIED.to_string()),
        ..vigil_journal::TailFilter::default()
    };
    let mut cursor = None;
    let mut bytes = Vec::new();
    if let Err(e) = vigil_journal::tail_once(dir, &filter, &mut cursor, &mut bytes) {
        tracing::warn!("reading applied signals from the journal failed ({e}); terminated ops of runs still registered will be denied as unknown until signalled again");
        return out;
    }
    for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
            continue;
        };
        let d = &v["data"];
        if d["stateAfter"] != "terminated" {
            continue;
        }
        let (Some(c), Some(r)) = (d["cellId"].as_str(), d["runId"].as_str()) else {
            continue;
        };
        out.push((
            c.to_string(),
            r.to_string(),
            d["opId"].as_str().map(str::to_string),
        ));
    }
    out
}

/// Carries out a cell-level freeze / thaw / kill and returns its audit event data.
pub fn enforce_cgroup(
    cell_id: &str,
    path: &Path,
    signal: Signal,
) -> Option<vigil_opcontrol::audit::AuditEvent> {
    use vigil_opcontrol::cgroup;
    let timeout = cgroup::DEFAULT_TIMEOUT;
    let (action, outcome) = match signal {
        Signal::Pause => (
            vigil_opcontrol::cgroup::CgroupAction::Freeze,
            cgroup::freeze(path, timeout),
        ),
        Signal::Resume => (
            vigil_opcontrol::cgroup::CgroupAction::Thaw,
            cgroup::thaw(path, timeout),
        ),
        Signal::Terminate => (
            vigil_opcontrol::cgroup::CgroupAction::Kill,
            cgroup::kill(path, timeout),
        ),
        Signal::Unspecified => return None,
    };
    Some(vigil_opcontrol::audit::AuditEvent::Cgroup {
        cell_id: cell_id.to_string(),
        cgroup: path.display().to_string(),
        action,
        outcome,
    })
}
