//! Keep-alive and silence ("silence is observable", domain.md "Keep-alive and
//! `agent_silenced`"): per cell run, the keep-alive window, the nearest deadline, the
//! fire-once record, and the kernel-assisted classification made at a deadline. Pure logic:
//! every time and every kernel fact is passed in, so tests need neither clock nor kernel.
use std::collections::{BTreeSet, HashMap};

use serde::Serialize;

use crate::kernel::PeerRow;

/// Extra time granted to the kernel's data stamp over the drain's frame stamp before the
/// kernel's evidence says "the host did not read what arrived": the tracepoint fires when the
/// packet is queued, the drain stamps the chunk when io_uring completes it, microseconds
/// later. 5 ms is far above that and far below any keep-alive window.
pub const KERNEL_SLACK_NS: u64 = 5_000_000;

/// The drain counts as stalled at a deadline when its loop has not run for this long: it
/// wakes every `IDLE_WAKE_NS` even when idle, so three missed wakes cannot be mere idleness.
/// (Comparing with the keep-alive window instead could never fire: the deadline comes one
/// window after the last frame, and the drain ran when it received that frame.)
pub const DRAIN_STALL_MIN_NS: u64 = 3 * vigil_drain::IDLE_WAKE_NS;

/// Event type of a silenced run (domain.md "Event types").
pub const TYPE_SILENCED: &str = "dev.vigil.cell.observability.v1.guest.agent_silenced";
/// Event type of the first frame after a silence.
pub const TYPE_RESUMED: &str = "dev.vigil.cell.observability.v1.guest.agent_resumed";
/// Event type of a window passed while the host, not the guest, was at fault.
pub const TYPE_STALLED: &str = "dev.vigil.host.observability.v1.receiver_stalled";

/// The class decided at a deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    GuestSilent,
    HostStalled,
    Disconnected,
}

impl Class {
    pub fn name(self) -> &'static str {
        match self {
            Class::GuestSilent => "guest_silent",
            Class::HostStalled => "host_stalled",
            Class::Disconnected => "disconnected",
        }
    }
}

/// What the kernel said about a cell at the deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelEvidence {
    /// No kernel facts: a hybrid-vsock cell (Unix-socket traffic), or no tracepoint here.
    None,
    /// The per-peer table was read for the cell's CID and vigil's port.
    Vsock { last_data_ns: u64, resets: u64 },
}

/// User-space and kernel facts read at a deadline (by the applier, off the hot path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    /// CLOCK_MONOTONIC ns of the last chunk the drain received for the cell (0 = never).
    pub last_frame_ns: u64,
    /// Open connections of the cell.
    pub connections_open: u32,
    /// Whether the cell has had a connection that closed (since its run began).
    pub had_connection: bool,
    /// Kernel evidence for the cell.
    pub kernel: KernelEvidence,
    /// Last time the drain thread ran its loop (monotonic ns), from its timing slot.
    pub drain_last_run_ns: u64,
}

/// The run's keep-alive state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeepAlive {
    pub cell_id: String,
    pub run_id: String,
    pub window_ns: u64,
    /// When the run was registered (the window starts then: a fresh run is not silent).
    pub registered_ns: u64,
    /// Fire-once: an `agent_silenced` (or `receiver_stalled`) was emitted for this run.
    pub fired: bool,
    /// Silenced and no frame since: the next frame emits `agent_resumed`.
    pub awaiting_resume: Option<u64>,
    /// The deadline currently scheduled (monotonic ns), if any.
    pub deadline: Option<u64>,
}

/// What a deadline check decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Not silent yet: check again at this deadline.
    Reschedule(u64),
    /// Emit an event (type and JSON data) and stop watching until a frame arrives.
    Fire {
        event_type: &'static str,
        class: Class,
        data: serde_json::Value,
    },
    /// Already fired for this run: nothing to do until the run ends.
    Done,
}

/// Decides at a deadline. `elapsed` is computed from the same `last_frame_ns` read that the
/// decision uses, so `elapsedMs >= keepaliveWindowMs` holds whenever it fires.
pub fn check(run: &KeepAlive, facts: &Facts, now_ns: u64) -> Verdict {
    if run.fired {
        return Verdict::Done;
    }
    let last = facts.last_frame_ns.max(run.registered_ns);
    let elapsed = now_ns.saturating_sub(last);
    if elapsed < run.window_ns {
        return Verdict::Reschedule(last + run.window_ns);
    }
    let class = classify(run, facts, now_ns);
    let window_ms = run.window_ns / 1_000_000;
    let elapsed_ms = elapsed / 1_000_000;
    let evidence = match facts.kernel {
        KernelEvidence::None => serde_json::json!("none"),
        KernelEvidence::Vsock {
            last_data_ns,
            resets,
        } => serde_json::json!({"lastDataNs": last_data_ns, "resets": resets}),
    };
    if class == Class::HostStalled {
        let kernel_last = match facts.kernel {
            KernelEvidence::Vsock { last_data_ns, .. } => last_data_ns,
            KernelEvidence::None => 0,
        };
        return Verdict::Fire {
            event_type: TYPE_STALLED,
            class,
            data: serde_json::json!({
                "cellId": run.cell_id, "runId": run.run_id, "elapsedMs": elapsed_ms,
                "keepaliveWindowMs": window_ms, "kernelLastDataNs": kernel_last,
                "drainLastRunNs": facts.drain_last_run_ns, "kernelEvidence": evidence,
            }),
        };
    }
    Verdict::Fire {
        event_type: TYPE_SILENCED,
        class,
        data: serde_json::json!({
            "cellId": run.cell_id, "runId": run.run_id, "keepaliveWindowMs": window_ms,
            "elapsedMs": elapsed_ms, "class": class.name(), "kernelEvidence": evidence,
            "epistemicStatus": "DECLARED", "ruleClass": "GUEST_AGENT_DECLARATION",
        }),
    }
}

/// The three classes of domain.md, from the facts at the deadline.
pub fn classify(run: &KeepAlive, facts: &Facts, now_ns: u64) -> Class {
    let last = facts.last_frame_ns.max(run.registered_ns);
    // The drain thread itself is not running: the host is stalled, whatever the guest did.
    if facts.drain_last_run_ns != 0
        && now_ns.saturating_sub(facts.drain_last_run_ns) > DRAIN_STALL_MIN_NS
    {
        return Class::HostStalled;
    }
    if let KernelEvidence::Vsock {
        last_data_ns,
        resets,
    } = facts.kernel
    {
        if last_data_ns > last + KERNEL_SLACK_NS && facts.connections_open > 0 {
            return Class::HostStalled;
        }
        if resets > 0 && facts.connections_open == 0 {
            return Class::Disconnected;
        }
    }
    if facts.connections_open == 0 && facts.had_connection {
        return Class::Disconnected;
    }
    Class::GuestSilent
}

/// Folds the kernel rows of one cell (its CID, vigil's port) into evidence.
pub fn kernel_evidence(rows: &[PeerRow], cid: u32, local_port: u32) -> KernelEvidence {
    let mut last_data_ns = 0;
    let mut resets = 0;
    for r in rows
        .iter()
        .filter(|r| r.cid == cid && r.local_port == local_port)
    {
        last_data_ns = last_data_ns.max(r.last_data_ns);
        resets += r.rst + r.shutdown;
    }
    KernelEvidence::Vsock {
        last_data_ns,
        resets,
    }
}

/// The data of an `agent_resumed` event.
pub fn resumed_data(run: &KeepAlive, silent_since_ns: u64, now_ns: u64) -> serde_json::Value {
    serde_json::json!({"cellId": run.cell_id, "runId": run.run_id, "silentMs": now_ns.saturating_sub(silent_since_ns) / 1_000_000})
}

/// The deadline queue: the nearest deadline over all runs, without scanning them.
#[derive(Debug, Default)]
pub struct Deadlines {
    queue: BTreeSet<(u64, String)>,
    by_cell: HashMap<String, u64>,
}

impl Deadlines {
    /// Schedules (or moves) the deadline of `cell`.
    pub fn set(&mut self, cell: &str, at_ns: u64) {
        if let Some(old) = self.by_cell.insert(cell.to_string(), at_ns) {
            self.queue.remove(&(old, cell.to_string()));
        }
        self.queue.insert((at_ns, cell.to_string()));
    }

    pub fn clear(&mut self, cell: &str) {
        if let Some(old) = self.by_cell.remove(cell) {
            self.queue.remove(&(old, cell.to_string()));
        }
    }

    /// The nearest deadline.
    pub fn next(&self) -> Option<u64> {
        self.queue.first().map(|(t, _)| *t)
    }

    /// Removes and returns every cell due at `now_ns`.
    pub fn due(&mut self, now_ns: u64) -> Vec<String> {
        let mut out = Vec::new();
        while let Some((t, _)) = self.queue.first() {
            if *t > now_ns {
                break;
            }
            if let Some((_, cell)) = self.queue.pop_first() {
                self.by_cell.remove(&cell);
                out.push(cell);
            }
        }
        out
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn run() -> KeepAlive {
        KeepAlive {
            cell_id: "c".into(),
            run_id: "r".into(),
            window_ns: 10 * S,
            registered_ns: 100 * S,
            fired: false,
            awaiting_resume: None,
            deadline: None,
        }
    }

    fn facts(last_frame_ns: u64) -> Facts {
        Facts {
            last_frame_ns,
            connections_open: 1,
            had_connection: true,
            kernel: KernelEvidence::None,
            drain_last_run_ns: 0,
        }
    }

    #[test]
    fn a_fresh_run_is_not_silent_until_its_window_passes() {
        assert_eq!(
            check(&run(), &facts(0), 105 * S),
            Verdict::Reschedule(110 * S)
        );
        assert!(matches!(
            check(&run(), &facts(0), 110 * S),
            Verdict::Fire {
                event_type: TYPE_SILENCED,
                ..
            }
        ));
    }

    #[test]
    fn a_frame_at_exactly_the_boundary_never_yields_elapsed_below_the_window() {
        // Frame at 120 s: at 130 s - 1 ns not silent; at 130 s silent with elapsed == window.
        assert_eq!(
            check(&run(), &facts(120 * S), 130 * S - 1),
            Verdict::Reschedule(130 * S)
        );
        let Verdict::Fire { data, .. } = check(&run(), &facts(120 * S), 130 * S) else {
            panic!("should fire")
        };
        assert!(data["elapsedMs"].as_u64().unwrap() >= data["keepaliveWindowMs"].as_u64().unwrap());
        assert_eq!(data["elapsedMs"], 10_000);
        assert_eq!(data["epistemicStatus"], "DECLARED");
        assert_eq!(data["ruleClass"], "GUEST_AGENT_DECLARATION");
        assert_eq!(data["kernelEvidence"], "none");
    }

    #[test]
    fn fire_once() {
        let mut r = run();
        r.fired = true;
        assert_eq!(check(&r, &facts(0), 1_000 * S), Verdict::Done);
    }

    #[test]
    fn classes_from_a_fake_kernel_table() {
        let r = run();
        let now = 200 * S;
        let rows = |last_data: u64, rst: u64| {
            vec![
                PeerRow {
                    cid: 3,
                    port: 5000,
                    local_port: 7000,
                    packets: 9,
                    bytes: 900,
                    rst,
                    shutdown: 0,
                    last_data_ns: last_data,
                    last_any_ns: last_data,
                    last_op: 5,
                },
                PeerRow {
                    cid: 3,
                    port: 5001,
                    local_port: 22,
                    packets: 9,
                    bytes: 900,
                    rst: 0,
                    shutdown: 0,
                    last_data_ns: now,
                    last_any_ns: now,
                    last_op: 5,
                },
            ]
        };
        // Kernel saw nothing after the last frame: the guest is silent (traffic to another
        // local port does not count).
        let mut f = facts(150 * S);
        f.kernel = kernel_evidence(&rows(150 * S, 0), 3, 7000);
        assert_eq!(classify(&r, &f, now), Class::GuestSilent);
        // Kernel saw data after the last frame user space got: the host is stalled.
        f.kernel = kernel_evidence(&rows(180 * S, 0), 3, 7000);
        assert_eq!(classify(&r, &f, now), Class::HostStalled);
        let Verdict::Fire {
            event_type, data, ..
        } = check(&r, &f, now)
        else {
            panic!()
        };
        assert_eq!(event_type, TYPE_STALLED);
        assert_eq!(data["kernelLastDataNs"], 180 * S);
        // Reset seen and no connection left: disconnected.
        f.kernel = kernel_evidence(&rows(150 * S, 1), 3, 7000);
        f.connections_open = 0;
        assert_eq!(classify(&r, &f, now), Class::Disconnected);
    }

    #[test]
    fn a_stalled_drain_thread_blames_the_host() {
        let mut f = facts(150 * S);
        f.drain_last_run_ns = 150 * S;
        assert_eq!(classify(&run(), &f, 200 * S), Class::HostStalled);
        f.drain_last_run_ns = 200 * S - DRAIN_STALL_MIN_NS;
        assert_eq!(classify(&run(), &f, 200 * S), Class::GuestSilent);
        // A window shorter than the drain's idle wake-up: an idle drain is not a stalled one.
        let mut short = run();
        short.window_ns = 200_000_000;
        f.drain_last_run_ns = 200 * S - 250_000_000;
        assert_eq!(classify(&short, &f, 200 * S), Class::GuestSilent);
        f.drain_last_run_ns = 200 * S - DRAIN_STALL_MIN_NS - 1;
        assert_eq!(classify(&short, &f, 200 * S), Class::HostStalled);
    }

    #[test]
    fn hybrid_cells_classify_from_user_space_facts() {
        let mut f = facts(150 * S);
        f.connections_open = 0;
        assert_eq!(classify(&run(), &f, 200 * S), Class::Disconnected);
        f.had_connection = false;
        assert_eq!(classify(&run(), &f, 200 * S), Class::GuestSilent);
    }

    #[test]
    fn deadlines_give_the_nearest_and_pop_what_is_due() {
        let mut d = Deadlines::default();
        d.set("a", 30);
        d.set("b", 10);
        d.set("c", 20);
        d.set("b", 40); // moved
        assert_eq!(d.next(), Some(20));
        assert_eq!(d.due(30), vec!["c".to_string(), "a".to_string()]);
        assert_eq!(d.next(), Some(40));
        d.clear("b");
        assert_eq!(d.next(), None);
        assert_eq!(d.len(), 0);
    }
}
