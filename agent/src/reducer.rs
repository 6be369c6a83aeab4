//! The one mutator of vigil's control state. Workers turn the outside world into [`Event`]s
//! on one bounded channel; [`step`] is a pure function of (state, event, now) that changes
//! the [`State`] and returns [`Effect`]s; the applier (in `runtime`) carries the effects out.
//! `step` cannot fail: bad input becomes an effect (a refusal, a counter, a log line).
use std::collections::BTreeMap;

use serde::Serialize;

use crate::config::CellConfig;
use crate::registry::{Change, Registry};

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
    Admin { id: RequestId, request: AdminRequest },
    /// A guest connected and was identified as `cell_id`.
    Connected { cell_id: String },
    /// A guest connection of `cell_id` closed (`reason` is a metric label).
    Closed { cell_id: String, reason: &'static str },
    /// A connection was refused (unregistered CID, bad input); `peer` names it for the log.
    Rejected { reason: &'static str, peer: String },
}

/// What the applier must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    Reply { id: RequestId, reply: AdminReply },
    /// Read the kernel's per-peer table and answer request `id` with it.
    ReplyWithPeers { id: RequestId },
    /// Start listening for / accepting this cell's guests (also on a new run).
    DrainAddCell(CellConfig),
    /// Stop accepting this cell and close its connections.
    DrainRemoveCell(String),
    /// Persist the registry (after every change).
    Persist(Registry),
    /// A log line at warn level (rate-limited by the reducer where it could flood).
    Warn(String),
    /// A log line at info level.
    Info(String),
}

/// Per-cell counters the reducer keeps (the drain keeps per-frame ones in atomics).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct CellCounters {
    pub connections_open: u64,
    pub connections_total: u64,
}

#[derive(Debug, Default)]
pub struct State {
    pub registry: Registry,
    pub cells: BTreeMap<String, CellCounters>,
    /// Refusals by reason.
    pub rejected: BTreeMap<&'static str, u64>,
    /// Last time a refusal of each peer was logged (monotonic ns).
    reject_logged: BTreeMap<String, u64>,
}

impl State {
    pub fn new(registry: Registry) -> Self {
        let cells = registry.iter().map(|c| (c.cell_id.clone(), CellCounters::default())).collect();
        Self { registry, cells, ..Self::default() }
    }
}

/// Applies one event. `now_ns` is monotonic time, passed in so tests need no clock.
pub fn step(state: &mut State, event: Event, now_ns: u64) -> Vec<Effect> {
    match event {
        Event::Admin { id, request } => admin(state, id, request),
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
        Event::Rejected { reason, peer } => {
            *state.rejected.entry(reason).or_default() += 1;
            // Bound the log-limiter's memory: forget entries older than the interval when it
            // grows (a flood from many CIDs cannot grow it without bound).
            if state.reject_logged.len() > crate::registry::MAX_CELLS {
                state.reject_logged.retain(|_, t| now_ns.saturating_sub(*t) < REJECT_LOG_INTERVAL_NS);
            }
            let due = state.reject_logged.get(&peer).is_none_or(|t| now_ns.saturating_sub(*t) >= REJECT_LOG_INTERVAL_NS);
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

fn admin(state: &mut State, id: RequestId, request: AdminRequest) -> Vec<Effect> {
    match request {
        AdminRequest::Ping => vec![Effect::Reply { id, reply: AdminReply::Ok(serde_json::json!("ok")) }],
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
            vec![Effect::Reply { id, reply: AdminReply::Ok(serde_json::Value::Array(cells)) }]
        }
        AdminRequest::Peers => vec![Effect::ReplyWithPeers { id }],
        AdminRequest::CellAdd(cell) => match state.registry.upsert(cell) {
            Err(e) => vec![Effect::Reply { id, reply: AdminReply::Err(e.to_string()) }],
            Ok(change) => {
                let (new, what, old) = match change {
                    Change::Unchanged => {
                        return vec![Effect::Reply { id, reply: AdminReply::Ok(serde_json::json!("unchanged")) }];
                    }
                    Change::Added(new) => (new, "added", None),
                    Change::NewRun { old, new } => (new, "new run", Some(old)),
                    Change::Updated { old, new } => (new, "updated", Some(old)),
                };
                let mut fx = Vec::new();
                if let Some(old) = old {
                    fx.push(Effect::DrainRemoveCell(old.cell_id));
                }
                state.cells.insert(new.cell_id.clone(), CellCounters::default());
                fx.push(Effect::Info(format!("cell {} run {}: {what}", new.cell_id, new.run_id)));
                fx.push(Effect::DrainAddCell(new));
                fx.push(Effect::Persist(state.registry.clone()));
                fx.push(Effect::Reply { id, reply: AdminReply::Ok(serde_json::json!(what)) });
                fx
            }
        },
        AdminRequest::CellRemove(cell_id) => match state.registry.remove(&cell_id) {
            Err(e) => vec![Effect::Reply { id, reply: AdminReply::Err(e.to_string()) }],
            Ok(old) => {
                state.cells.remove(&cell_id);
                vec![
                    Effect::Info(format!("cell {} run {}: removed", old.cell_id, old.run_id)),
                    Effect::DrainRemoveCell(cell_id),
                    Effect::Persist(state.registry.clone()),
                    Effect::Reply { id, reply: AdminReply::Ok(serde_json::json!("removed")) },
                ]
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(id: &str, run: &str, cid: u32) -> CellConfig {
        CellConfig { cell_id: id.into(), run_id: run.into(), cid: Some(cid), uds_path: None, keepalive_ms: 10_000, cgroup: None }
    }

    #[test]
    fn add_registers_in_drain_and_persists() {
        let mut s = State::default();
        let fx = step(&mut s, Event::Admin { id: 1, request: AdminRequest::CellAdd(cell("a", "r1", 3)) }, 0);
        assert!(fx.contains(&Effect::DrainAddCell(cell("a", "r1", 3))));
        assert!(fx.iter().any(|e| matches!(e, Effect::Persist(r) if r.len() == 1)));
        assert!(fx.contains(&Effect::Reply { id: 1, reply: AdminReply::Ok(serde_json::json!("added")) }));
        // A new run replaces the old one in the drain.
        let fx = step(&mut s, Event::Admin { id: 2, request: AdminRequest::CellAdd(cell("a", "r2", 3)) }, 0);
        assert_eq!(fx[0], Effect::DrainRemoveCell("a".into()));
        assert!(fx.contains(&Effect::DrainAddCell(cell("a", "r2", 3))));
        // The same registration again changes nothing.
        let fx = step(&mut s, Event::Admin { id: 3, request: AdminRequest::CellAdd(cell("a", "r2", 3)) }, 0);
        assert_eq!(fx, vec![Effect::Reply { id: 3, reply: AdminReply::Ok(serde_json::json!("unchanged")) }]);
    }

    #[test]
    fn bad_requests_become_error_replies() {
        let mut s = State::default();
        step(&mut s, Event::Admin { id: 1, request: AdminRequest::CellAdd(cell("a", "r1", 3)) }, 0);
        let fx = step(&mut s, Event::Admin { id: 2, request: AdminRequest::CellAdd(cell("b", "r1", 3)) }, 0);
        assert!(matches!(&fx[..], [Effect::Reply { id: 2, reply: AdminReply::Err(m) }] if m.contains("already registered")));
        let fx = step(&mut s, Event::Admin { id: 3, request: AdminRequest::CellRemove("zz".into()) }, 0);
        assert!(matches!(&fx[..], [Effect::Reply { id: 3, reply: AdminReply::Err(m) }] if m.contains("no cell")));
    }

    #[test]
    fn refusals_are_counted_every_time_and_logged_once_a_minute_per_peer() {
        let mut s = State::default();
        let ev = |p: &str| Event::Rejected { reason: "unregistered_cid", peer: p.into() };
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
        step(&mut s, Event::Connected { cell_id: "a".into() }, 0);
        step(&mut s, Event::Connected { cell_id: "a".into() }, 0);
        step(&mut s, Event::Closed { cell_id: "a".into(), reason: "eof" }, 0);
        assert_eq!(s.cells["a"], CellCounters { connections_open: 1, connections_total: 2 });
    }
}
