//! The drain thread's view of op-control state, and the ring that feeds it.
//!
//! The store (reducer thread) publishes every change as an [`OpUpdate`] into a bounded
//! crossbeam channel ([`update_channel`]); the drain thread owns a [`DrainView`] — plain data,
//! single-threaded, no locks — that applies those updates ([`DrainView::apply_pending`]) and
//! answers policy queries ([`DrainView::query`]) with a hash lookup and no allocation on the
//! allow path.
//!
//! A query for a paused op is parked (held) in the view. **No lost wake-up:** a query is
//! answered from the view's state as of the last `apply_pending`; an update the store has
//! already published may still sit in the ring. If the query is held, it is registered in the
//! held set *before* the view reads any further update, and every `apply_pending` that applies
//! at least one update re-decides every held query afterwards. So a `Resume` or `Terminate`
//! that lands between the query's read and its parking is applied by the next
//! `apply_pending`, which then finds the parked query and releases it. The drain loop must call
//! `apply_pending` whenever the ring is non-empty (the publisher's waker tells it so).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Select, Sender, TrySendError};

use crate::table::Tables;
use crate::{non_empty, Decision, DenyReason, OpUpdate};

/// Depth of the store → drain-view update ring. Signals are rare (operator and control-plane
/// actions); 4,096 absorbs a burst such as a restore of thousands of terminates or a mass
/// pause while the drain thread finishes one loop iteration. When full, the publisher does
/// not drop: it wakes the drain thread and blocks until there is room (back-pressure on the
/// reducer, counted in `StoreStats::publish_waited`).
pub const UPDATE_RING_CAPACITY: usize = 4_096;

/// Most queries one drain view keeps parked at once. Each held query is a guest waiting for
/// an answer; 1,024 covers every op of every connection of a busy host being paused at once,
/// and bounds the memory and the re-check cost of an update (linear in held queries). Over
/// the bound a query for a paused op is denied with [`DenyReason::HoldLimit`] (fail-closed).
pub const MAX_HELD_PER_VIEW: usize = 1_024;

/// Why an update could not be published.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PublishError {
    /// The receiving drain view was dropped (the drain thread has exited).
    #[error("the drain view is gone; the op-control update was not delivered")]
    ViewGone,
}

/// Something that wakes the drain thread (e.g. writes an eventfd its io_uring watches).
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// The store's sending half of the update ring.
pub struct UpdatePublisher {
    tx: Sender<OpUpdate>,
    waker: Option<Waker>,
    published: AtomicU64,
}

impl std::fmt::Debug for UpdatePublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpdatePublisher")
            .field("queued", &self.tx.len())
            .field("published", &self.published.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl UpdatePublisher {
    /// Calls `waker` after every publish, so a drain thread blocked in its event loop notices.
    #[must_use]
    pub fn with_waker(mut self, waker: Waker) -> UpdatePublisher {
        self.waker = Some(waker);
        self
    }

    /// Sends one update; never drops it. Returns whether it had to wait for room.
    pub fn publish(&self, update: OpUpdate) -> Result<bool, PublishError> {
        let waited = match self.tx.try_send(update) {
            Ok(()) => false,
            Err(TrySendError::Disconnected(_)) => return Err(PublishError::ViewGone),
            Err(TrySendError::Full(update)) => {
                if let Some(w) = &self.waker {
                    w();
                }
                self.tx.send(update).map_err(|_| PublishError::ViewGone)?;
                true
            }
        };
        self.published.fetch_add(1, Ordering::Relaxed);
        if let Some(w) = &self.waker {
            w();
        }
        Ok(waited)
    }

    /// Updates published so far.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }
}

/// The drain view's receiving half of the update ring.
#[derive(Debug)]
pub struct UpdateReceiver {
    rx: Receiver<OpUpdate>,
}

/// A new update ring of [`UPDATE_RING_CAPACITY`].
pub fn update_channel() -> (UpdatePublisher, UpdateReceiver) {
    let (tx, rx) = crossbeam_channel::bounded(UPDATE_RING_CAPACITY);
    (
        UpdatePublisher {
            tx,
            waker: None,
            published: AtomicU64::new(0),
        },
        UpdateReceiver { rx },
    )
}

/// The answer to a query, now or later.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Answered now.
    Decided(Decision),
    /// Parked: the answer comes from a later [`DrainView::apply_pending`] as a [`Released`].
    Held,
}

/// A held query whose answer is now known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Released {
    /// The connection that asked.
    pub conn_token: u64,
    /// The guest's query id.
    pub query_id: u64,
    /// The final decision (allow, or deny with the reason).
    pub decision: Decision,
    /// How long the query was held.
    pub held_ns: u64,
    /// The cell.
    pub cell: Arc<str>,
    /// The run.
    pub run: Arc<str>,
    /// The op (`None`: a cell-level query).
    pub op: Option<Arc<str>>,
    /// The action that was asked for.
    pub action: Arc<str>,
}

#[derive(Debug)]
struct HeldQuery {
    conn_token: u64,
    query_id: u64,
    cell: Arc<str>,
    run: Arc<str>,
    op: Option<Arc<str>>,
    action: Arc<str>,
    since_ns: u64,
}

/// Counters of one view.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ViewStats {
    /// Queries answered (now or held).
    pub queries: u64,
    /// Queries allowed at once.
    pub allowed: u64,
    /// Queries denied at once.
    pub denied: u64,
    /// Queries parked.
    pub held: u64,
    /// Queries denied because [`MAX_HELD_PER_VIEW`] were already parked.
    pub hold_limit_denied: u64,
    /// Held queries released.
    pub released: u64,
    /// Held queries dropped because their connection closed.
    pub cancelled: u64,
    /// Updates applied.
    pub updates: u64,
}

/// The drain thread's op-control view. Owned by one thread; no locks.
#[derive(Debug)]
pub struct DrainView {
    rx: Receiver<OpUpdate>,
    tables: Tables,
    held: Vec<HeldQuery>,
    stats: ViewStats,
}

impl DrainView {
    /// A view with no state (every query denied as not restored) fed by `updates`.
    pub fn new(updates: UpdateReceiver) -> DrainView {
        DrainView {
            rx: updates.rx,
            tables: Tables::default(),
            held: Vec::with_capacity(MAX_HELD_PER_VIEW),
            stats: ViewStats::default(),
        }
    }

    /// The counters.
    pub fn stats(&self) -> ViewStats {
        self.stats
    }

    /// Queries parked now.
    pub fn held_count(&self) -> usize {
        self.held.len()
    }

    /// Updates waiting in the ring.
    pub fn pending(&self) -> usize {
        self.rx.len()
    }

    /// Decides whether `op` of (cell, run) may perform `action` (`op` empty: a cell-level
    /// action). A paused op's query is parked and answered later by
    /// [`DrainView::apply_pending`]. The allow and deny paths allocate nothing.
    #[allow(
        clippy::too_many_arguments,
        reason = "one query's fields, passed flat on the hot path"
    )]
    pub fn query(
        &mut self,
        conn_token: u64,
        query_id: u64,
        cell: &str,
        run: &str,
        op: &str,
        action: &str,
        now_ns: u64,
    ) -> Answer {
        self.stats.queries += 1;
        let op = non_empty(Some(op));
        match self.tables.decide(cell, run, op) {
            Decision::Hold => {
                if self.held.len() >= MAX_HELD_PER_VIEW {
                    self.stats.hold_limit_denied += 1;
                    self.stats.denied += 1;
                    return Answer::Decided(Decision::Deny(DenyReason::HoldLimit));
                }
                // Register interest now; any update not yet applied is applied by the next
                // `apply_pending`, which re-decides this entry (see the module doc).
                let Some(t) = self.tables.run(cell, run) else {
                    // `decide` returned Hold, so the run is known; unreachable in practice,
                    // and denying is the fail-closed answer if it were not.
                    self.stats.denied += 1;
                    return Answer::Decided(Decision::Deny(DenyReason::StateUnknown(
                        crate::UnknownCause::UnknownRun,
                    )));
                };
                let cell_key = self
                    .tables
                    .cells
                    .get_key_value(cell)
                    .map_or_else(|| Arc::from(cell), |(k, _)| Arc::clone(k));
                let op_key = op.map(|o| {
                    t.ops
                        .get_key_value(o)
                        .map_or_else(|| Arc::from(o), |(k, _)| Arc::clone(k))
                });
                self.held.push(HeldQuery {
                    conn_token,
                    query_id,
                    cell: cell_key,
                    run: Arc::clone(&t.run),
                    op: op_key,
                    action: Arc::from(action),
                    since_ns: now_ns,
                });
                self.stats.held += 1;
                Answer::Held
            }
            Decision::Allow => {
                self.stats.allowed += 1;
                Answer::Decided(Decision::Allow)
            }
            d @ Decision::Deny(_) => {
                self.stats.denied += 1;
                Answer::Decided(d)
            }
        }
    }

    /// Applies every update waiting in the ring, then releases the held queries whose answer
    /// is now known. Returns the released queries.
    pub fn apply_pending(&mut self, now_ns: u64) -> Vec<Released> {
        let mut out = Vec::new();
        self.apply_pending_into(now_ns, &mut out);
        out
    }

    /// [`DrainView::apply_pending`] into a caller-owned buffer (no allocation when it has
    /// room). Returns the number of updates applied.
    pub fn apply_pending_into(&mut self, now_ns: u64, out: &mut Vec<Released>) -> usize {
        let mut applied = 0;
        while let Ok(update) = self.rx.try_recv() {
            self.tables.apply_update(&update);
            applied += 1;
        }
        self.stats.updates += applied as u64;
        if applied > 0 && !self.held.is_empty() {
            let tables = &self.tables;
            let mut released = 0u64;
            self.held.retain(|h| {
                let decision = tables.decide(&h.cell, &h.run, h.op.as_deref());
                if decision == Decision::Hold {
                    return true;
                }
                released += 1;
                out.push(Released {
                    conn_token: h.conn_token,
                    query_id: h.query_id,
                    decision,
                    held_ns: now_ns.saturating_sub(h.since_ns),
                    cell: Arc::clone(&h.cell),
                    run: Arc::clone(&h.run),
                    op: h.op.clone(),
                    action: Arc::clone(&h.action),
                });
                false
            });
            self.stats.released += released;
        }
        applied
    }

    /// Blocks the calling thread until an update is waiting in the ring or `timeout` passes;
    /// returns whether one is waiting (it is not consumed: call `apply_pending`). For a thread
    /// without an event loop; the io_uring drain loop uses the publisher's waker instead.
    pub fn wait_for_update(&self, timeout: Duration) -> bool {
        if !self.rx.is_empty() {
            return true;
        }
        let mut sel = Select::new();
        sel.recv(&self.rx);
        sel.ready_timeout(timeout).is_ok()
    }

    /// Drops the held queries of a closed connection. Returns how many.
    pub fn cancel_conn(&mut self, conn_token: u64) -> usize {
        let before = self.held.len();
        self.held.retain(|h| h.conn_token != conn_token);
        let n = before - self.held.len();
        self.stats.cancelled += n as u64;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::OpStore;
    use crate::{Signal, SignalSource, UnknownCause};

    const SRC: SignalSource = SignalSource::Restore;

    fn pair() -> (OpStore, DrainView) {
        let (p, r) = update_channel();
        let mut s = OpStore::new(Some(p));
        let mut v = DrainView::new(r);
        s.begin_run("c", "r").unwrap();
        s.mark_restored();
        assert!(v.apply_pending(0).is_empty());
        (s, v)
    }

    fn q(v: &mut DrainView, id: u64, op: &str, now: u64) -> Answer {
        v.query(7, id, "c", "r", op, "tool.call", now)
    }

    #[test]
    fn allows_and_denies_after_terminate() {
        let (mut s, mut v) = pair();
        assert_eq!(q(&mut v, 1, "a", 0), Answer::Decided(Decision::Allow));
        s.apply("c", "r", Some("a"), Signal::Terminate, &SRC)
            .unwrap();
        // Not yet applied by the view.
        assert_eq!(v.pending(), 1);
        v.apply_pending(1);
        assert_eq!(
            q(&mut v, 2, "a", 2),
            Answer::Decided(Decision::Deny(DenyReason::Terminated))
        );
        assert_eq!(q(&mut v, 3, "b", 2), Answer::Decided(Decision::Allow));
        // Unknown run and the not-restored view are denied.
        assert_eq!(
            v.query(7, 4, "zz", "r", "a", "x", 3),
            Answer::Decided(Decision::Deny(DenyReason::StateUnknown(
                UnknownCause::UnknownRun
            )))
        );
        let (_p, r) = update_channel();
        let mut fresh = DrainView::new(r);
        assert_eq!(
            fresh.query(1, 1, "c", "r", "a", "x", 0),
            Answer::Decided(Decision::Deny(DenyReason::StateUnknown(
                UnknownCause::UnknownRun
            )))
        );
        let st = v.stats();
        assert_eq!((st.allowed, st.denied), (2, 2));
    }

    #[test]
    fn hold_is_released_by_resume() {
        let (mut s, mut v) = pair();
        s.apply("c", "r", Some("a"), Signal::Pause, &SRC).unwrap();
        v.apply_pending(0);
        assert_eq!(q(&mut v, 1, "a", 100), Answer::Held);
        assert_eq!(q(&mut v, 2, "b", 100), Answer::Decided(Decision::Allow));
        assert_eq!(v.held_count(), 1);
        // An unrelated update re-checks but does not release.
        s.apply("c", "r", Some("b"), Signal::Pause, &SRC).unwrap();
        assert!(v.apply_pending(150).is_empty());
        s.apply("c", "r", Some("a"), Signal::Resume, &SRC).unwrap();
        let rel = v.apply_pending(1_100);
        assert_eq!(rel.len(), 1);
        assert_eq!(rel[0].conn_token, 7);
        assert_eq!(rel[0].query_id, 1);
        assert_eq!(rel[0].decision, Decision::Allow);
        assert_eq!(rel[0].held_ns, 1_000);
        assert_eq!(rel[0].op.as_deref(), Some("a"));
        assert_eq!(&*rel[0].action, "tool.call");
        assert_eq!(v.held_count(), 0);
    }

    #[test]
    fn hold_is_released_by_terminate() {
        let (mut s, mut v) = pair();
        s.apply("c", "r", Some("a"), Signal::Pause, &SRC).unwrap();
        v.apply_pending(0);
        assert_eq!(q(&mut v, 1, "a", 0), Answer::Held);
        assert_eq!(q(&mut v, 2, "a", 5), Answer::Held);
        s.apply("c", "r", Some("a"), Signal::Terminate, &SRC)
            .unwrap();
        let rel = v.apply_pending(10);
        assert_eq!(rel.len(), 2);
        assert!(rel
            .iter()
            .all(|r| r.decision == Decision::Deny(DenyReason::Terminated)));
        assert_eq!(v.stats().released, 2);
    }

    #[test]
    fn cell_level_signals_hold_and_release_every_op() {
        let (mut s, mut v) = pair();
        s.apply("c", "r", None, Signal::Pause, &SRC).unwrap();
        v.apply_pending(0);
        assert_eq!(q(&mut v, 1, "a", 0), Answer::Held);
        assert_eq!(q(&mut v, 2, "b", 0), Answer::Held);
        assert_eq!(q(&mut v, 3, "", 0), Answer::Held);
        s.apply("c", "r", None, Signal::Resume, &SRC).unwrap();
        let rel = v.apply_pending(1);
        assert_eq!(rel.len(), 3);
        assert!(rel.iter().all(|r| r.decision == Decision::Allow));
        s.apply("c", "r", None, Signal::Pause, &SRC).unwrap();
        v.apply_pending(2);
        assert_eq!(q(&mut v, 4, "a", 2), Answer::Held);
        s.apply("c", "r", None, Signal::Terminate, &SRC).unwrap();
        let rel = v.apply_pending(3);
        assert_eq!(rel[0].decision, Decision::Deny(DenyReason::Terminated));
        assert_eq!(
            q(&mut v, 5, "never-seen", 3),
            Answer::Decided(Decision::Deny(DenyReason::Terminated))
        );
    }

    #[test]
    fn run_end_releases_holds_with_a_deny() {
        let (mut s, mut v) = pair();
        s.apply("c", "r", Some("a"), Signal::Pause, &SRC).unwrap();
        v.apply_pending(0);
        assert_eq!(q(&mut v, 1, "a", 0), Answer::Held);
        s.end_run("c", "r");
        let rel = v.apply_pending(1);
        assert_eq!(
            rel[0].decision,
            Decision::Deny(DenyReason::StateUnknown(UnknownCause::UnknownRun))
        );
    }

    /// The store's resume is published while the view still holds the old (paused) state:
    /// the query is parked on stale state, and the next `apply_pending` must release it.
    #[test]
    fn no_lost_wakeup_when_resume_lands_between_read_and_park() {
        let (mut s, mut v) = pair();
        s.apply("c", "r", Some("a"), Signal::Pause, &SRC).unwrap();
        v.apply_pending(0);
        s.apply("c", "r", Some("a"), Signal::Resume, &SRC).unwrap();
        assert_eq!(v.pending(), 1);
        assert_eq!(q(&mut v, 1, "a", 10), Answer::Held);
        let rel = v.apply_pending(20);
        assert_eq!(rel.len(), 1);
        assert_eq!(rel[0].decision, Decision::Allow);
        assert_eq!(v.held_count(), 0);
    }

    /// The same across threads: the store thread flips an op between paused and running while
    /// the drain thread queries it; after the final resume every held query was released.
    #[test]
    fn no_lost_wakeup_across_threads() {
        let (p, r) = update_channel();
        let mut s = OpStore::new(Some(p));
        s.begin_run("c", "r").unwrap();
        s.mark_restored();
        let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(1);
        let store_thread = std::thread::spawn(move || {
            for i in 0..20_000u32 {
                let sig = if i % 2 == 0 {
                    Signal::Pause
                } else {
                    Signal::Resume
                };
                s.apply("c", "r", Some("a"), sig, &SRC).unwrap();
                if i % 64 == 0 {
                    std::thread::yield_now();
                }
            }
            done_tx.send(()).unwrap();
            s
        });
        let mut v = DrainView::new(r);
        let (mut held, mut released, mut id) = (0u64, 0u64, 0u64);
        let mut finished = false;
        loop {
            id += 1;
            if v.query(1, id, "c", "r", "a", "x", id) == Answer::Held {
                held += 1;
            }
            for rel in v.apply_pending(id) {
                assert_eq!(rel.decision, Decision::Allow);
                released += 1;
            }
            if finished {
                break;
            }
            finished = done_rx.try_recv().is_ok();
        }
        let s = store_thread.join().unwrap();
        // Drain the tail after the store's last (resume) update.
        released += v.apply_pending(id + 1).len() as u64;
        assert_eq!(s.decide("c", "r", Some("a")), Decision::Allow);
        assert_eq!(v.held_count(), 0, "held {held} released {released}");
        assert_eq!(held, released);
    }

    #[test]
    fn holds_over_the_bound_are_denied() {
        let (mut s, mut v) = pair();
        s.apply("c", "r", Some("a"), Signal::Pause, &SRC).unwrap();
        v.apply_pending(0);
        for i in 0..MAX_HELD_PER_VIEW as u64 {
            assert_eq!(q(&mut v, i, "a", 0), Answer::Held);
        }
        assert_eq!(
            q(&mut v, 9_999, "a", 0),
            Answer::Decided(Decision::Deny(DenyReason::HoldLimit))
        );
        assert_eq!(v.stats().hold_limit_denied, 1);
        // A closed connection frees its slots.
        assert_eq!(v.cancel_conn(7), MAX_HELD_PER_VIEW);
        assert_eq!(q(&mut v, 10_000, "a", 0), Answer::Held);
    }

    #[test]
    fn a_full_ring_blocks_the_publisher_and_loses_nothing() {
        let (p, r) = update_channel();
        // The publisher calls the waker after each publish and once more, before blocking,
        // when it finds the ring full: counting calls tells when it has hit the full ring.
        let woken = Arc::new(AtomicU64::new(0));
        let calls = Arc::clone(&woken);
        let p = p.with_waker(Arc::new(move || {
            calls.fetch_add(1, Ordering::SeqCst);
        }));
        let mut v = DrainView::new(r);
        let total = UPDATE_RING_CAPACITY + 500;
        let publisher = std::thread::spawn(move || {
            let mut s = OpStore::new(Some(p));
            s.begin_run("c", "r").unwrap();
            s.mark_restored();
            for i in 0..total {
                let op = format!("op{}", (i / 2) % 1_000);
                let sig = if i % 2 == 0 {
                    Signal::Pause
                } else {
                    Signal::Resume
                };
                s.apply("c", "r", Some(&op), sig, &SRC).unwrap();
            }
            s.stats()
        });
        // Let the publisher fill the ring and find it full before draining.
        while woken.load(Ordering::SeqCst) <= UPDATE_RING_CAPACITY as u64 {
            std::thread::yield_now();
        }
        assert_eq!(v.pending(), UPDATE_RING_CAPACITY);
        let mut applied = 0;
        let mut out = Vec::new();
        while applied < total + 2 {
            if v.wait_for_update(Duration::from_secs(5)) {
                applied += v.apply_pending_into(0, &mut out);
            }
        }
        let stats = publisher.join().unwrap();
        assert!(stats.publish_waited > 0);
        assert_eq!(stats.publish_failed, 0);
        assert_eq!(v.stats().updates, (total + 2) as u64);
    }

    #[test]
    fn the_waker_is_called_and_a_gone_view_is_reported() {
        let (p, r) = update_channel();
        let woken = Arc::new(AtomicU64::new(0));
        let w = Arc::clone(&woken);
        let p = p.with_waker(Arc::new(move || {
            w.fetch_add(1, Ordering::Relaxed);
        }));
        p.publish(OpUpdate::Restored).unwrap();
        assert_eq!(woken.load(Ordering::Relaxed), 1);
        assert_eq!(p.published(), 1);
        drop(r);
        assert_eq!(p.publish(OpUpdate::Restored), Err(PublishError::ViewGone));
    }
}
