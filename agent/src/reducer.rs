//! The one mutator of vigil's control state. Workers turn the outside world into [`Event`]s
//! on one bounded channel; [`step`] is a pure function of (state, event, now) that changes
//! the [`State`] and returns [`Effect`]s; the applier (in `runtime`) carries the effects out.
//! `step` cannot fail: bad input becomes an effect (a refusal, a counter, a log line).
use std::collections::BTreeMap;

use serde::Serialize;

use crate::config::CellConfig;
use crate::registry::{Change, Registry};
use crate::silence::{self, Deadlines, KeepAlive, KernelEvidence, Verdict};
use vigil_opcontrol::store::OpStore;
use vigil_opcontrol::{Signal, SignalSource};

/// Capacity of the reducer's event channel. Events are small and the reducer handles each in
/// microseconds; 4,096 absorbs a burst of connections and admin calls. When full, senders
/// wait (back-pressure) — the drain thread never sends here per frame.
pub const EVENT_CHANNEL_CAPACITY: usize = 4_096;

/// How often one CID's refusals may be logged: once per minute per CID, not per packet.
pub const REJECT_LOG_INTERVAL_NS: u64 = 60_000_000_000;

/// Id of a pending admin request (the applier keeps the reply channel).
pub type RequestId = u64;

#[derive(Debug, Clone, PartialEq)]
pub enum AdminRequest {
    Ping,
    CellAdd(CellConfig),
    CellRemove(String),
    CellList,
    Peers,
    StallDrain(u64),
    /// A local operator's signal for one op (`op_id` Some) or the whole cell's run.
    OpSignal {
        cell_id: String,
        op_id: Option<String>,
        signal: Signal,
        issuer: String,
    },
    /// The ops with a state (paused or terminated), per cell run.
    OpList,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum AdminReply {
    Ok(serde_json::Value),
    Err(String),
}

/// Everything that can happen to vigil's control state.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// An admin socket request.
    Admin {
        id: RequestId,
        request: AdminRequest,
    },
    /// A guest connected and was identified as `cell_id`.
    Connected { cell_id: String },
    /// A guest connection of `cell_id` closed (`reason` is a metric label).
    Closed {
        cell_id: String,
        reason: &'static str,
    },
    /// A connection was refused (unregistered CID, bad input); `peer` names it for the log.
    Rejected { reason: &'static str, peer: String },
    /// The nearest silence deadline has come (the control loop's timer fired).
    Tick,
    /// What the applier observed for a cell whose deadline came (answer to `GatherFacts`).
    Observed { cell_id: String, observed: Observed },
    /// A frame arrived from a cell that was silenced (the forwarder saw its batch).
    Activity { cell_id: String },
    /// A control signal from the upstream control plane.
    Signal {
        cell_id: String,
        /// Empty: the cell's current run.
        run_id: String,
        /// None: every op of the run (cell-level).
        op_id: Option<String>,
        signal: Signal,
        source: SignalSource,
        /// The upstream message to acknowledge once applied.
        upstream_ack: Option<u64>,
    },
}

/// Facts only the applier can read (atomics, the kernel table, the drain's timing slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    pub last_frame_ns: u64,
    pub kernel: KernelEvidence,
    pub drain_last_run_ns: u64,
}

/// One event vigil itself emits (signed and journaled like every event).
#[derive(Debug, Clone, PartialEq)]
pub struct OwnEvent {
    pub cell_id: String,
    pub run_id: String,
    pub event_type: &'static str,
    pub data: serde_json::Value,
}

/// What the applier must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    Reply {
        id: RequestId,
        reply: AdminReply,
    },
    /// Read the kernel's per-peer table and answer request `id` with it.
    ReplyWithPeers {
        id: RequestId,
    },
    /// Start listening for / accepting this cell's guests (also on a new run).
    DrainAddCell(CellConfig),
    /// Stop accepting this cell and close its connections.
    DrainRemoveCell(String),
    /// Block the drain thread for this many milliseconds (fault injection for tests).
    DrainStall(u64),
    /// Persist the registry (after every change).
    Persist(Registry),
    /// A log line at warn level (rate-limited by the reducer where it could flood).
    Warn(String),
    /// A log line at info level.
    Info(String),
    /// Read the facts of these cells (their deadline came; with their CID when they are
    /// AF_VSOCK cells) and answer with `Event::Observed`.
    GatherFacts(Vec<(String, Option<u32>)>),
    /// Journal one of vigil's own events.
    Emit(OwnEvent),
    /// Tell the forwarder to report the next frame of this cell (`Event::Activity`), or stop.
    WatchResume {
        cell_id: String,
        watch: bool,
    },
    /// Freeze (pause), thaw (resume) or kill (terminate) a cell's cgroup, off the control loop.
    Cgroup {
        cell_id: String,
        path: std::path::PathBuf,
        signal: Signal,
    },
    /// Acknowledge (or refuse, for redelivery) an upstream signal.
    AckUpstream {
        id: u64,
        applied: bool,
    },
}

/// Per-cell counters the reducer keeps (the drain keeps per-frame ones in atomics).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct CellCounters {
    pub connections_open: u64,
    pub connections_total: u64,
}

/// What the journal says about silence, read at start so a restart never fires twice.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SilenceRecord {
    /// Runs (cell, run) that already had their `agent_silenced` / `receiver_stalled`.
    pub fired: std::collections::BTreeSet<(String, String)>,
    /// Of those, the runs still silent (no `agent_resumed` yet) and since when (unix ns, for
    /// the log only: the silent duration after a restart counts from vigil's start).
    pub awaiting_resume: std::collections::BTreeSet<(String, String)>,
}

#[derive(Debug, Default)]
pub struct State {
    pub registry: Registry,
    pub cells: BTreeMap<String, CellCounters>,
    /// Keep-alive state per registered cell's current run.
    pub runs: BTreeMap<String, KeepAlive>,
    pub deadlines: Deadlines,
    /// Silence events emitted, by class name.
    pub silence_events: BTreeMap<&'static str, u64>,
    /// The op-control store (this reducer is its only mutator).
    pub ops: OpStore,
    /// Ops (or whole runs: op None) not running normally, for `vigil ctl op list`.
    pub op_states: BTreeMap<(String, String, Option<String>), &'static str>,
    /// Refusals by reason.
    pub rejected: BTreeMap<&'static str, u64>,
    /// Last time a refusal of each peer was logged (monotonic ns).
    reject_logged: BTreeMap<String, u64>,
}

impl State {
    /// The state at start: every registered run's window starts now (a restart is not
    /// silence), and runs the journal shows as already silenced do not fire again.
    pub fn new(
        registry: Registry,
        record: &SilenceRecord,
        ops: OpStore,
        now_ns: u64,
    ) -> (Self, Vec<Effect>) {
        let cells = registry
            .iter()
            .map(|c| (c.cell_id.clone(), CellCounters::default()))
            .collect();
        let mut state = Self {
            registry,
            cells,
            ops,
            ..Self::default()
        };
        let mut fx = Vec::new();
        let configs: Vec<CellConfig> = state.registry.iter().cloned().collect();
        for c in configs {
            let key = (c.cell_id.clone(), c.run_id.clone());
            let fired = record.fired.contains(&key);
            let awaiting = record.awaiting_resume.contains(&key);
            state.begin_run(&c, now_ns, fired);
            if awaiting {
                if let Some(r) = state.runs.get_mut(&c.cell_id) {
                    r.awaiting_resume = Some(now_ns);
                }
                fx.push(Effect::WatchResume {
                    cell_id: c.cell_id.clone(),
                    watch: true,
                });
            }
        }
        (state, fx)
    }

    fn begin_run(&mut self, c: &CellConfig, now_ns: u64, fired: bool) {
        let run = KeepAlive {
            cell_id: c.cell_id.clone(),
            run_id: c.run_id.clone(),
            window_ns: c.keepalive_ms.saturating_mul(1_000_000),
            registered_ns: now_ns,
            fired,
            awaiting_resume: None,
            deadline: None,
        };
        if fired {
            self.deadlines.clear(&c.cell_id);
        } else {
            self.deadlines.set(&c.cell_id, now_ns + run.window_ns);
        }
        self.runs.insert(c.cell_id.clone(), run);
        if let Err(e) = self.ops.begin_run(&c.cell_id, &c.run_id) {
            tracing::warn!(
                "op-control for cell {} run {}: {e} (its queries are denied: fail-closed)",
                c.cell_id,
                c.run_id
            );
        }
    }

    fn end_run(&mut self, cell_id: &str) {
        if let Some(run) = self.runs.remove(cell_id) {
            self.ops.end_run(cell_id, &run.run_id);
            self.op_states
                .retain(|(c, r, _), _| !(c == cell_id && *r == run.run_id));
        }
        self.deadlines.clear(cell_id);
    }
}

/// Applies one event. `now_ns` is monotonic time, passed in so tests need no clock.
pub fn step(state: &mut State, event: Event, now_ns: u64) -> Vec<Effect> {
    match event {
        Event::Admin { id, request } => admin(state, id, request, now_ns),
        Event::Connected { cell_id } => {
            let c = state.cells.entry(cell_id).or_default();
            c.connections_open += 1;
            c.connections_total += 1;
            Vec::new()
        }
        Event::Closed { cell_id, reason: _ } => {
            if let Some(c) = state.cells.get_mut(&cell_id) {
                c.connections_open = c.connections_open.saturating_sub(1);
            }
            Vec::new()
        }
        Event::Tick => {
            let due: Vec<(String, Option<u32>)> = state
                .deadlines
                .due(now_ns)
                .into_iter()
                .map(|c| {
                    let cid = state.registry.get(&c).and_then(|r| r.cid);
                    (c, cid)
                })
                .collect();
            if due.is_empty() {
                Vec::new()
            } else {
                vec![Effect::GatherFacts(due)]
            }
        }
        Event::Observed { cell_id, observed } => deadline(state, &cell_id, observed, now_ns),
        Event::Activity { cell_id } => {
            let Some(run) = state.runs.get_mut(&cell_id) else {
                return vec![Effect::WatchResume {
                    cell_id,
                    watch: false,
                }];
            };
            let Some(since) = run.awaiting_resume.take() else {
                return vec![Effect::WatchResume {
                    cell_id,
                    watch: false,
                }];
            };
            let data = silence::resumed_data(run, since, now_ns);
            vec![
                Effect::WatchResume {
                    cell_id: cell_id.clone(),
                    watch: false,
                },
                Effect::Emit(OwnEvent {
                    cell_id,
                    run_id: run.run_id.clone(),
                    event_type: silence::TYPE_RESUMED,
                    data,
                }),
            ]
        }
        Event::Signal {
            cell_id,
            run_id,
            op_id,
            signal,
            source,
            upstream_ack,
        } => {
            let (mut fx, _) =
                apply_signal(state, &cell_id, &run_id, op_id.as_deref(), signal, &source);
            if let Some(id) = upstream_ack {
                fx.push(Effect::AckUpstream { id, applied: true });
            }
            fx
        }
        Event::Rejected { reason, peer } => {
            *state.rejected.entry(reason).or_default() += 1;
            // Bound the log-limiter's memory: forget entries older than the interval when it
            // grows (a flood from many CIDs cannot grow it without bound).
            if state.reject_logged.len() > crate::registry::MAX_CELLS {
                state
                    .reject_logged
                    .retain(|_, t| now_ns.saturating_sub(*t) < REJECT_LOG_INTERVAL_NS);
            }
            let due = state
                .reject_logged
                .get(&peer)
                .is_none_or(|t| now_ns.saturating_sub(*t) >= REJECT_LOG_INTERVAL_NS);
            if due {
                let total = state.rejected[reason];
                state.reject_logged.insert(peer.clone(), now_ns);
                vec![Effect::Warn(format!("refused a connection from {peer}: {reason} ({total} refusals for this reason so far; logged at most once a minute per peer)"))]
            } else {
                Vec::new()
            }
        }
    }
}

/// Applies one control signal to the store: the audit event, the cgroup action of a
/// cell-level signal, and the reply text. A signal for an unknown cell or a stale run is
/// refused (and still answered, so an upstream message is not redelivered forever).
fn apply_signal(
    state: &mut State,
    cell_id: &str,
    run_id: &str,
    op_id: Option<&str>,
    signal: Signal,
    source: &SignalSource,
) -> (Vec<Effect>, Result<&'static str, String>) {
    let Some(cell) = state.registry.get(cell_id).cloned() else {
        return (
            vec![Effect::Warn(format!(
                "control signal {} for unknown cell {cell_id:?} ignored",
                signal.as_str()
            ))],
            Err(format!("no cell {cell_id:?} is registered")),
        );
    };
    if !run_id.is_empty() && run_id != cell.run_id {
        return (
            vec![Effect::Warn(format!(
                "control signal {} for cell {cell_id} run {run_id} ignored: the current run is {}",
                signal.as_str(),
                cell.run_id
            ))],
            Err(format!(
                "run {run_id:?} of cell {cell_id:?} is not the current run ({})",
                cell.run_id
            )),
        );
    }
    match state
        .ops
        .apply(cell_id, &cell.run_id, op_id, signal, source)
    {
        Err(e) => (
            vec![Effect::Warn(format!(
                "control signal for cell {cell_id}: {e}"
            ))],
            Err(e.to_string()),
        ),
        Ok(applied) => {
            let key = (
                cell_id.to_string(),
                cell.run_id.clone(),
                op_id.map(str::to_string),
            );
            if applied.state_after == vigil_opcontrol::OpState::Running {
                state.op_states.remove(&key);
            } else {
                state.op_states.insert(key, applied.state_after.as_str());
            }
            let data = serde_json::from_slice(&applied.audit.data_json()).unwrap_or_default();
            let mut fx = vec![Effect::Emit(OwnEvent {
                cell_id: cell_id.to_string(),
                run_id: cell.run_id.clone(),
                event_type: applied.audit.event_type(),
                data,
            })];
            if op_id.is_none() && signal != Signal::Unspecified {
                if let Some(path) = cell.cgroup.clone() {
                    fx.push(Effect::Cgroup {
                        cell_id: cell_id.to_string(),
                        path,
                        signal,
                    });
                }
            }
            (fx, Ok(applied.state_after.as_str()))
        }
    }
}

/// A cell's deadline came: decide with the facts read now (fire once, or reschedule).
fn deadline(state: &mut State, cell_id: &str, observed: Observed, now_ns: u64) -> Vec<Effect> {
    let counters = state.cells.get(cell_id).cloned().unwrap_or_default();
    let Some(run) = state.runs.get_mut(cell_id) else {
        return Vec::new();
    };
    let facts = silence::Facts {
        last_frame_ns: observed.last_frame_ns,
        connections_open: counters.connections_open as u32,
        had_connection: counters.connections_total > 0,
        kernel: observed.kernel,
        drain_last_run_ns: observed.drain_last_run_ns,
    };
    match silence::check(run, &facts, now_ns) {
        Verdict::Done => Vec::new(),
        Verdict::Reschedule(at) => {
            state.deadlines.set(cell_id, at);
            Vec::new()
        }
        Verdict::Fire {
            event_type,
            class,
            data,
        } => {
            run.fired = true;
            // `agent_resumed` follows a silenced guest; a stalled receiver was the host's
            // fault, so no resume is reported for it.
            let guest_side = class != silence::Class::HostStalled;
            run.awaiting_resume = guest_side.then_some(now_ns);
            *state.silence_events.entry(class.name()).or_default() += 1;
            let ev = OwnEvent {
                cell_id: cell_id.to_string(),
                run_id: run.run_id.clone(),
                event_type,
                data,
            };
            vec![
                Effect::Info(format!(
                    "cell {cell_id} run {}: {} ({})",
                    run.run_id,
                    event_type.rsplit('.').next().unwrap_or(event_type),
                    class.name()
                )),
                Effect::Emit(ev),
                Effect::WatchResume {
                    cell_id: cell_id.to_string(),
                    watch: guest_side,
                },
            ]
        }
    }
}

fn admin(state: &mut State, id: RequestId, request: AdminRequest, now_ns: u64) -> Vec<Effect> {
    match request {
        AdminRequest::Ping => vec![Effect::Reply {
            id,
            reply: AdminReply::Ok(serde_json::json!("ok")),
        }],
        AdminRequest::CellList => {
            let cells: Vec<serde_json::Value> = state
                .registry
                .iter()
                .map(|c| {
                    let mut v = serde_json::to_value(c).unwrap_or_default();
                    if let (Some(obj), Some(k)) = (v.as_object_mut(), state.cells.get(&c.cell_id)) {
                        obj.insert("connections_open".into(), k.connections_open.into());
                        obj.insert("connections_total".into(), k.connections_total.into());
                    }
                    v
                })
                .collect();
            vec![Effect::Reply {
                id,
                reply: AdminReply::Ok(serde_json::Value::Array(cells)),
            }]
        }
        AdminRequest::Peers => vec![Effect::ReplyWithPeers { id }],
        AdminRequest::OpSignal {
            cell_id,
            op_id,
            signal,
            issuer,
        } => {
            let (mut fx, result) = apply_signal(
                state,
                &cell_id,
                "",
                op_id.as_deref(),
                signal,
                &SignalSource::Operator { issuer },
            );
            fx.push(Effect::Reply {
                id,
                reply: match result {
                    Ok(after) => AdminReply::Ok(serde_json::json!(after)),
                    Err(e) => AdminReply::Err(e),
                },
            });
            fx
        }
        AdminRequest::OpList => {
            let rows: Vec<serde_json::Value> = state
                .op_states
                .iter()
                .map(|((c, r, o), s)| serde_json::json!({"cellId": c, "runId": r, "opId": o, "state": s}))
                .collect();
            vec![Effect::Reply {
                id,
                reply: AdminReply::Ok(serde_json::Value::Array(rows)),
            }]
        }
        AdminRequest::StallDrain(ms) => vec![
            Effect::Warn(format!(
                "stalling the drain thread for {ms} ms on request (fault injection)"
            )),
            Effect::DrainStall(ms),
            Effect::Reply {
                id,
                reply: AdminReply::Ok(serde_json::json!("stalled")),
            },
        ],
        AdminRequest::CellAdd(cell) => match state.registry.upsert(cell) {
            Err(e) => vec![Effect::Reply {
                id,
                reply: AdminReply::Err(e.to_string()),
            }],
            Ok(change) => {
                let (new, what, old) = match change {
                    Change::Unchanged => {
                        return vec![Effect::Reply {
                            id,
                            reply: AdminReply::Ok(serde_json::json!("unchanged")),
                        }];
                    }
                    Change::Added(new) => (new, "added", None),
                    Change::NewRun { old, new } => (new, "new run", Some(old)),
                    Change::Updated { old, new } => (new, "updated", Some(old)),
                };
                let mut fx = Vec::new();
                let new_run = old.as_ref().is_none_or(|o| o.run_id != new.run_id);
                if let Some(old) = old {
                    fx.push(Effect::DrainRemoveCell(old.cell_id));
                }
                state
                    .cells
                    .insert(new.cell_id.clone(), CellCounters::default());
                if new_run {
                    // A new run starts a fresh window and a fresh fire-once.
                    state.end_run(&new.cell_id);
                    state.begin_run(&new, now_ns, false);
                    fx.push(Effect::WatchResume {
                        cell_id: new.cell_id.clone(),
                        watch: false,
                    });
                } else if let Some(run) = state.runs.get_mut(&new.cell_id) {
                    run.window_ns = new.keepalive_ms.saturating_mul(1_000_000);
                    if !run.fired {
                        state.deadlines.set(&new.cell_id, now_ns + run.window_ns);
                    }
                }
                fx.push(Effect::Info(format!(
                    "cell {} run {}: {what}",
                    new.cell_id, new.run_id
                )));
                fx.push(Effect::DrainAddCell(new));
                fx.push(Effect::Persist(state.registry.clone()));
                fx.push(Effect::Reply {
                    id,
                    reply: AdminReply::Ok(serde_json::json!(what)),
                });
                fx
            }
        },
        AdminRequest::CellRemove(cell_id) => match state.registry.remove(&cell_id) {
            Err(e) => vec![Effect::Reply {
                id,
                reply: AdminReply::Err(e.to_string()),
            }],
            Ok(old) => {
                state.cells.remove(&cell_id);
                state.end_run(&cell_id);
                vec![
                    Effect::WatchResume {
                        cell_id: cell_id.clone(),
                        watch: false,
                    },
                    Effect::Info(format!("cell {} run {}: removed", old.cell_id, old.run_id)),
                    Effect::DrainRemoveCell(cell_id),
                    Effect::Persist(state.registry.clone()),
                    Effect::Reply {
                        id,
                        reply: AdminReply::Ok(serde_json::json!("removed")),
                    },
                ]
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(id: &str, run: &str, cid: u32) -> CellConfig {
        CellConfig {
            cell_id: id.into(),
            run_id: run.into(),
            cid: Some(cid),
            uds_path: None,
            keepalive_ms: 10_000,
            cgroup: None,
            probes: None,
        }
    }

    #[test]
    fn add_registers_in_drain_and_persists() {
        let mut s = State::default();
        let fx = step(
            &mut s,
            Event::Admin {
                id: 1,
                request: AdminRequest::CellAdd(cell("a", "r1", 3)),
            },
            0,
        );
        assert!(fx.contains(&Effect::DrainAddCell(cell("a", "r1", 3))));
        assert!(fx
            .iter()
            .any(|e| matches!(e, Effect::Persist(r) if r.len() == 1)));
        assert!(fx.contains(&Effect::Reply {
            id: 1,
            reply: AdminReply::Ok(serde_json::json!("added"))
        }));
        // A new run replaces the old one in the drain.
        let fx = step(
            &mut s,
            Event::Admin {
                id: 2,
                request: AdminRequest::CellAdd(cell("a", "r2", 3)),
            },
            0,
        );
        assert_eq!(fx[0], Effect::DrainRemoveCell("a".into()));
        assert!(fx.contains(&Effect::DrainAddCell(cell("a", "r2", 3))));
        // The same registration again changes nothing.
        let fx = step(
            &mut s,
            Event::Admin {
                id: 3,
                request: AdminRequest::CellAdd(cell("a", "r2", 3)),
            },
            0,
        );
        assert_eq!(
            fx,
            vec![Effect::Reply {
                id: 3,
                reply: AdminReply::Ok(serde_json::json!("unchanged"))
            }]
        );
    }

    #[test]
    fn bad_requests_become_error_replies() {
        let mut s = State::default();
        step(
            &mut s,
            Event::Admin {
                id: 1,
                request: AdminRequest::CellAdd(cell("a", "r1", 3)),
            },
            0,
        );
        let fx = step(
            &mut s,
            Event::Admin {
                id: 2,
                request: AdminRequest::CellAdd(cell("b", "r1", 3)),
            },
            0,
        );
        assert!(
            matches!(&fx[..], [Effect::Reply { id: 2, reply: AdminReply::Err(m) }] if m.contains("already registered"))
        );
        let fx = step(
            &mut s,
            Event::Admin {
                id: 3,
                request: AdminRequest::CellRemove("zz".into()),
            },
            0,
        );
        assert!(
            matches!(&fx[..], [Effect::Reply { id: 3, reply: AdminReply::Err(m) }] if m.contains("no cell"))
        );
    }

    #[test]
    fn refusals_are_counted_every_time_and_logged_once_a_minute_per_peer() {
        let mut s = State::default();
        let ev = |p: &str| Event::Rejected {
            reason: "unregistered_cid",
            peer: p.into(),
        };
        assert_eq!(step(&mut s, ev("cid 9"), 0).len(), 1);
        assert!(step(&mut s, ev("cid 9"), 1_000).is_empty());
        assert_eq!(step(&mut s, ev("cid 8"), 2_000).len(), 1);
        assert!(step(&mut s, ev("cid 9"), REJECT_LOG_INTERVAL_NS - 1).is_empty());
        assert_eq!(step(&mut s, ev("cid 9"), REJECT_LOG_INTERVAL_NS).len(), 1);
        assert_eq!(s.rejected["unregistered_cid"], 5);
    }

    #[test]
    fn connections_are_counted_per_cell() {
        let mut s = State::default();
        step(
            &mut s,
            Event::Connected {
                cell_id: "a".into(),
            },
            0,
        );
        step(
            &mut s,
            Event::Connected {
                cell_id: "a".into(),
            },
            0,
        );
        step(
            &mut s,
            Event::Closed {
                cell_id: "a".into(),
                reason: "eof",
            },
            0,
        );
        assert_eq!(
            s.cells["a"],
            CellCounters {
                connections_open: 1,
                connections_total: 2
            }
        );
    }

    const S: u64 = 1_000_000_000;

    fn observed(last_frame_ns: u64) -> Observed {
        Observed {
            last_frame_ns,
            kernel: KernelEvidence::None,
            drain_last_run_ns: 0,
        }
    }

    /// Runs Tick at `now` and answers every GatherFacts with `last_frame_ns`.
    fn tick(s: &mut State, now: u64, last_frame_ns: u64) -> Vec<Effect> {
        let mut out = Vec::new();
        for fx in step(s, Event::Tick, now) {
            if let Effect::GatherFacts(cells) = fx {
                for (c, _) in cells {
                    out.extend(step(
                        s,
                        Event::Observed {
                            cell_id: c,
                            observed: observed(last_frame_ns),
                        },
                        now,
                    ));
                }
            } else {
                out.push(fx);
            }
        }
        out
    }

    fn emitted(fx: &[Effect]) -> Vec<&'static str> {
        fx.iter()
            .filter_map(|e| {
                if let Effect::Emit(ev) = e {
                    Some(ev.event_type)
                } else {
                    None
                }
            })
            .collect()
    }

    fn registered(now: u64) -> State {
        let mut s = State::default();
        step(
            &mut s,
            Event::Admin {
                id: 1,
                request: AdminRequest::CellAdd(cell("a", "r1", 3)),
            },
            now,
        );
        s
    }

    #[test]
    fn a_fresh_cell_is_not_silent_and_goes_silent_after_its_window() {
        let mut s = registered(100 * S);
        assert_eq!(s.deadlines.next(), Some(110 * S));
        assert!(emitted(&tick(&mut s, 105 * S, 0)).is_empty());
        let fx = tick(&mut s, 110 * S, 0);
        assert_eq!(emitted(&fx), vec![silence::TYPE_SILENCED]);
        assert!(fx.contains(&Effect::WatchResume {
            cell_id: "a".into(),
            watch: true
        }));
    }

    #[test]
    fn a_frame_moves_the_deadline_and_the_boundary_fires_with_elapsed_equal_to_the_window() {
        let mut s = registered(100 * S);
        // A frame at 108 s: the deadline at 110 s reschedules to 118 s.
        assert!(emitted(&tick(&mut s, 110 * S, 108 * S)).is_empty());
        assert_eq!(s.deadlines.next(), Some(118 * S));
        let fx = tick(&mut s, 118 * S, 108 * S);
        let Some(Effect::Emit(ev)) = fx.iter().find(|e| matches!(e, Effect::Emit(_))) else {
            panic!("no event")
        };
        assert_eq!(ev.data["elapsedMs"], 10_000);
        assert_eq!(ev.data["keepaliveWindowMs"], 10_000);
    }

    #[test]
    fn fire_once_under_repeated_deadlines() {
        let mut s = registered(100 * S);
        assert_eq!(emitted(&tick(&mut s, 110 * S, 0)).len(), 1);
        // Spurious wake-ups and a forced re-check: nothing more.
        for t in [110, 111, 500, 10_000] {
            assert!(emitted(&tick(&mut s, t * S, 0)).is_empty());
            let fx = step(
                &mut s,
                Event::Observed {
                    cell_id: "a".into(),
                    observed: observed(0),
                },
                t * S,
            );
            assert!(emitted(&fx).is_empty());
        }
        assert_eq!(s.silence_events["guest_silent"], 1);
    }

    #[test]
    fn resumed_after_silence_once() {
        let mut s = registered(100 * S);
        tick(&mut s, 110 * S, 0);
        let fx = step(
            &mut s,
            Event::Activity {
                cell_id: "a".into(),
            },
            125 * S,
        );
        assert_eq!(emitted(&fx), vec![silence::TYPE_RESUMED]);
        let Some(Effect::Emit(ev)) = fx.iter().find(|e| matches!(e, Effect::Emit(_))) else {
            panic!()
        };
        assert_eq!(ev.data["silentMs"], 15_000);
        assert!(emitted(&step(
            &mut s,
            Event::Activity {
                cell_id: "a".into()
            },
            126 * S
        ))
        .is_empty());
        // Still fire-once for the run after resuming.
        assert!(emitted(&tick(&mut s, 1_000 * S, 126 * S)).is_empty());
    }

    #[test]
    fn a_new_run_re_arms_with_a_fresh_window() {
        let mut s = registered(100 * S);
        tick(&mut s, 110 * S, 0);
        step(
            &mut s,
            Event::Admin {
                id: 2,
                request: AdminRequest::CellAdd(cell("a", "r2", 3)),
            },
            200 * S,
        );
        assert_eq!(s.deadlines.next(), Some(210 * S));
        assert!(emitted(&tick(&mut s, 205 * S, 0)).is_empty());
        let fx = tick(&mut s, 210 * S, 0);
        assert!(
            matches!(fx.iter().find(|e| matches!(e, Effect::Emit(_))), Some(Effect::Emit(ev)) if ev.run_id == "r2")
        );
    }

    #[test]
    fn a_restart_does_not_fire_again_for_a_run_the_journal_shows_silenced() {
        let mut reg = Registry::default();
        reg.upsert(cell("a", "r1", 3)).unwrap();
        reg.upsert(cell("b", "r1", 4)).unwrap();
        let mut record = SilenceRecord::default();
        record.fired.insert(("a".into(), "r1".into()));
        record.awaiting_resume.insert(("a".into(), "r1".into()));
        let (mut s, fx) = State::new(reg, &record, OpStore::new(None), 500 * S);
        assert_eq!(
            fx,
            vec![Effect::WatchResume {
                cell_id: "a".into(),
                watch: true
            }]
        );
        let fx = tick(&mut s, 510 * S, 0);
        // Only b fires; a was silenced before the restart.
        let cells: Vec<String> = fx
            .iter()
            .filter_map(|e| {
                if let Effect::Emit(ev) = e {
                    Some(ev.cell_id.clone())
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(cells, vec!["b".to_string()]);
        // a's next frame still emits agent_resumed.
        assert_eq!(
            emitted(&step(
                &mut s,
                Event::Activity {
                    cell_id: "a".into()
                },
                520 * S
            )),
            vec![silence::TYPE_RESUMED]
        );
    }

    #[test]
    fn removing_a_cell_stops_watching_it() {
        let mut s = registered(100 * S);
        step(
            &mut s,
            Event::Admin {
                id: 2,
                request: AdminRequest::CellRemove("a".into()),
            },
            101 * S,
        );
        assert_eq!(s.deadlines.next(), None);
        assert!(tick(&mut s, 1_000 * S, 0).is_empty());
    }

    #[test]
    fn signals_are_applied_audited_and_enforced_on_the_cell_cgroup() {
        let mut s = State::default();
        s.ops.mark_restored();
        let mut c = cell("a", "r1", 3);
        c.cgroup = Some("/sys/fs/cgroup/cells/a".into());
        step(
            &mut s,
            Event::Admin {
                id: 1,
                request: AdminRequest::CellAdd(c),
            },
            0,
        );
        let sig = |cell: &str, op: Option<&str>, signal| AdminRequest::OpSignal {
            cell_id: cell.into(),
            op_id: op.map(str::to_string),
            signal,
            issuer: "uid:0".into(),
        };
        let fx = step(
            &mut s,
            Event::Admin {
                id: 2,
                request: sig("a", Some("t:s"), Signal::Terminate),
            },
            0,
        );
        assert!(fx.iter().any(|e| matches!(e, Effect::Emit(ev) if ev.event_type == "dev.vigil.opcontrol.v1.signal_applied" && ev.data["stateAfter"] == "terminated")));
        assert!(fx.contains(&Effect::Reply {
            id: 2,
            reply: AdminReply::Ok(serde_json::json!("terminated"))
        }));
        assert!(
            !fx.iter().any(|e| matches!(e, Effect::Cgroup { .. })),
            "op-level signals leave the cgroup alone"
        );
        let fx = step(
            &mut s,
            Event::Admin {
                id: 3,
                request: sig("a", None, Signal::Pause),
            },
            0,
        );
        assert!(fx.iter().any(|e| matches!(
            e,
            Effect::Cgroup {
                signal: Signal::Pause,
                ..
            }
        )));
        let fx = step(
            &mut s,
            Event::Admin {
                id: 4,
                request: sig("zz", None, Signal::Pause),
            },
            0,
        );
        assert!(
            matches!(fx.last(), Some(Effect::Reply { reply: AdminReply::Err(m), .. }) if m.contains("no cell"))
        );
        // An upstream signal for a stale run is refused but still acknowledged (not redelivered forever).
        let fx = step(
            &mut s,
            Event::Signal {
                cell_id: "a".into(),
                run_id: "old".into(),
                op_id: None,
                signal: Signal::Terminate,
                source: SignalSource::Upstream {
                    issuer: "cp".into(),
                },
                upstream_ack: Some(7),
            },
            0,
        );
        assert!(fx.contains(&Effect::AckUpstream {
            id: 7,
            applied: true
        }));
        assert!(!fx.iter().any(|e| matches!(e, Effect::Emit(_))));
        // A new run drops the old run's op table.
        step(
            &mut s,
            Event::Admin {
                id: 5,
                request: AdminRequest::CellAdd(cell("a", "r2", 3)),
            },
            0,
        );
        assert!(s.op_states.is_empty());
    }
}
