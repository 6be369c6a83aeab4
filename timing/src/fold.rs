//! The fold rules of one timing slot, as pure logic on a plain value.
//!
//! This module owns *what* an observation does to a slot's numbers: liveness transitions,
//! counters, last/min/max duration, the integer EWMA, the nominal period and the rate derived
//! from it, and the last-activity timestamp. It knows nothing about atomics or threads; the
//! lock-free [`crate::slot`] storage publishes a [`SlotState`] that a single writer folds here.
//! Time is always a parameter (`now_ns`, any monotonic nanosecond clock the caller chooses), so
//! tests drive it deterministically.
//!
//! Rules (from `domain.md`, "Executor timing and liveness"):
//! - `start` → `Running`, `stop` → `Stopped`, `error` → `Error` (latched), `clear` → `Running`.
//!   While an error is latched, `start` and `stop` are counted but leave the liveness at
//!   `Error`: only an explicit `clear` unlatches it. An `execution` moves `Unknown` to
//!   `Running` (the task has demonstrably run) and never changes any other liveness.
//! - Duration EWMA: `new = old - old/8 + sample/8` in integer nanoseconds; the first sample is
//!   taken as is.
//! - Nominal period: each execution's timestamp `now_ns` is compared with the previous
//!   execution's timestamp; when it is strictly later, the interval is one period sample, folded
//!   with the same integer EWMA (first interval taken as is). A timestamp that is not later than
//!   the previous one (same instant, or a clock that went backwards) is not a period sample and
//!   does not move the previous-execution timestamp backwards. The rate in Hz is
//!   `1e9 / period_ns`; both are `None` until a period has been seen.
//! - Last activity: the latest `now_ns` of any observation (start, stop, error, clear,
//!   execution, bulk counts); it never moves backwards.

use serde::Serialize;

/// EWMA weight shift: each new sample contributes 1/8 (`>> 3`). Eight samples make the
/// average follow a step change by about 2/3, which smooths scheduler noise while still
/// tracking a real slow-down within a handful of runs.
pub const EWMA_SHIFT: u32 = 3;

/// Nanoseconds per second, for the rate derived from the period.
const NANOS_PER_SEC: f64 = 1_000_000_000.0;

/// Liveness of a task as its slot last heard it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Liveness {
    /// Registered, nothing observed yet.
    #[default]
    Unknown,
    /// Started (or cleared, or seen executing) and not stopped since.
    Running,
    /// Stopped cleanly.
    Stopped,
    /// An error was reported and has not been cleared; latched until `clear`.
    Error,
}

impl Liveness {
    /// Stable small integer for lock-free storage.
    pub(crate) fn to_code(self) -> u64 {
        match self {
            Liveness::Unknown => 0,
            Liveness::Running => 1,
            Liveness::Stopped => 2,
            Liveness::Error => 3,
        }
    }

    /// Inverse of [`Liveness::to_code`]; an out-of-range code (never written) reads as
    /// `Unknown` rather than panicking.
    pub(crate) fn from_code(code: u64) -> Liveness {
        match code {
            1 => Liveness::Running,
            2 => Liveness::Stopped,
            3 => Liveness::Error,
            _ => Liveness::Unknown,
        }
    }
}

/// One step of the integer EWMA: `old - old/8 + sample/8`, or `sample` for the first one.
#[inline]
pub fn ewma_step(old: Option<u64>, sample: u64) -> u64 {
    match old {
        None => sample,
        Some(old) => (old - (old >> EWMA_SHIFT)).saturating_add(sample >> EWMA_SHIFT),
    }
}

/// The numbers of one slot, folded by a single writer.
///
/// All fields are plain integers so that the lock-free storage can hold each in one atomic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlotState {
    /// Current liveness.
    pub liveness: Liveness,
    /// Number of `start` observations (plus bulk-reported starts).
    pub starts: u64,
    /// Number of `stop` observations (plus bulk-reported stops).
    pub stops: u64,
    /// Number of `error` observations (plus bulk-reported errors).
    pub errors: u64,
    /// Number of executions (duration samples) folded.
    pub executions: u64,
    /// Duration of the most recent execution, ns.
    pub last_ns: Option<u64>,
    /// Shortest execution seen, ns.
    pub min_ns: Option<u64>,
    /// Longest execution seen, ns.
    pub max_ns: Option<u64>,
    /// Integer EWMA of execution durations, ns.
    pub ewma_ns: Option<u64>,
    /// Integer EWMA of the interval between successive executions, ns.
    pub period_ns: Option<u64>,
    /// Timestamp of the latest execution, ns (caller's clock).
    pub last_execution_at_ns: Option<u64>,
    /// Timestamp of the latest observation of any kind, ns (caller's clock).
    pub last_activity_ns: Option<u64>,
}

impl SlotState {
    /// A fresh slot: `Unknown`, all counts zero, nothing measured.
    pub const fn new() -> SlotState {
        SlotState {
            liveness: Liveness::Unknown,
            starts: 0,
            stops: 0,
            errors: 0,
            executions: 0,
            last_ns: None,
            min_ns: None,
            max_ns: None,
            ewma_ns: None,
            period_ns: None,
            last_execution_at_ns: None,
            last_activity_ns: None,
        }
    }

    #[inline]
    fn touch(&mut self, now_ns: u64) {
        self.last_activity_ns = Some(self.last_activity_ns.map_or(now_ns, |t| t.max(now_ns)));
    }

    /// The task started.
    #[inline]
    pub fn start(&mut self, now_ns: u64) {
        self.starts = self.starts.wrapping_add(1);
        if self.liveness != Liveness::Error {
            self.liveness = Liveness::Running;
        }
        self.touch(now_ns);
    }

    /// The task stopped cleanly. Never clears a latched error.
    #[inline]
    pub fn stop(&mut self, now_ns: u64) {
        self.stops = self.stops.wrapping_add(1);
        if self.liveness != Liveness::Error {
            self.liveness = Liveness::Stopped;
        }
        self.touch(now_ns);
    }

    /// The task reported an error; latched until [`SlotState::clear`].
    #[inline]
    pub fn error(&mut self, now_ns: u64) {
        self.errors = self.errors.wrapping_add(1);
        self.liveness = Liveness::Error;
        self.touch(now_ns);
    }

    /// Explicit clear: whatever the liveness was (a latched error included), it is `Running`.
    #[inline]
    pub fn clear(&mut self, now_ns: u64) {
        self.liveness = Liveness::Running;
        self.touch(now_ns);
    }

    /// One execution of `duration_ns` that finished at `now_ns`.
    #[inline]
    pub fn execution(&mut self, duration_ns: u64, now_ns: u64) {
        self.executions = self.executions.wrapping_add(1);
        self.last_ns = Some(duration_ns);
        self.min_ns = Some(self.min_ns.map_or(duration_ns, |m| m.min(duration_ns)));
        self.max_ns = Some(self.max_ns.map_or(duration_ns, |m| m.max(duration_ns)));
        self.ewma_ns = Some(ewma_step(self.ewma_ns, duration_ns));
        match self.last_execution_at_ns {
            None => self.last_execution_at_ns = Some(now_ns),
            Some(prev) if now_ns > prev => {
                self.period_ns = Some(ewma_step(self.period_ns, now_ns - prev));
                self.last_execution_at_ns = Some(now_ns);
            }
            Some(_) => {}
        }
        if self.liveness == Liveness::Unknown {
            self.liveness = Liveness::Running;
        }
        self.touch(now_ns);
    }

    /// Bulk counts from a reporter that only sends totals (a guest's `TaskSample`): adds the
    /// given increments. Liveness: any new error latches `Error`; otherwise, unless an error is
    /// latched, `Running` when the reporter's cumulative starts exceed its stops, `Stopped`
    /// when they are equal and something changed. `started_total`/`stopped_total` are the
    /// reporter's own cumulative counts (its run may have restarted, so they are not ours).
    #[inline]
    pub fn bulk_counts(&mut self, delta: BulkDelta, now_ns: u64) {
        self.starts = self.starts.wrapping_add(delta.starts);
        self.stops = self.stops.wrapping_add(delta.stops);
        self.errors = self.errors.wrapping_add(delta.errors);
        if delta.errors > 0 {
            self.liveness = Liveness::Error;
        } else if self.liveness != Liveness::Error {
            if delta.started_total > delta.stopped_total {
                self.liveness = Liveness::Running;
            } else if delta.starts > 0 || delta.stops > 0 {
                self.liveness = Liveness::Stopped;
            }
        }
        self.touch(now_ns);
    }

    /// Rate in Hz derived from the nominal period; `None` until a period has been seen.
    pub fn rate_hz(&self) -> Option<f64> {
        match self.period_ns {
            Some(p) if p > 0 => Some(NANOS_PER_SEC / p as f64),
            _ => None,
        }
    }

    /// Whether any observation landed within `window_ns` before `now_ns` (inclusive).
    /// `false` when nothing was ever observed.
    pub fn active_within(&self, now_ns: u64, window_ns: u64) -> bool {
        self.last_activity_ns
            .is_some_and(|t| t >= now_ns.saturating_sub(window_ns))
    }
}

/// Increments for [`SlotState::bulk_counts`], computed by the caller from two cumulative
/// reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BulkDelta {
    /// New starts since the previous report.
    pub starts: u64,
    /// New stops since the previous report.
    pub stops: u64,
    /// New errors since the previous report.
    pub errors: u64,
    /// The reporter's cumulative start count now.
    pub started_total: u64,
    /// The reporter's cumulative stop count now.
    pub stopped_total: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ewma_first_sample_taken_as_is() {
        let mut s = SlotState::new();
        s.execution(1000, 10);
        assert_eq!(s.ewma_ns, Some(1000));
        assert_eq!(s.last_ns, Some(1000));
        assert_eq!(s.executions, 1);
    }

    #[test]
    fn ewma_steps_follow_integer_formula() {
        let mut s = SlotState::new();
        s.execution(800, 1);
        // 800 - 100 + 1600/8 = 900
        s.execution(1600, 2);
        assert_eq!(s.ewma_ns, Some(900));
        // 900 - 112 + 0 = 788 (integer division: 900/8 = 112)
        s.execution(0, 3);
        assert_eq!(s.ewma_ns, Some(788));
        // 788 - 98 + 7/8 (= 0) = 690
        s.execution(7, 4);
        assert_eq!(s.ewma_ns, Some(690));
        assert_eq!(ewma_step(None, 42), 42);
        assert_eq!(ewma_step(Some(u64::MAX), u64::MAX), u64::MAX);
    }

    #[test]
    fn ewma_converges_to_constant_input() {
        let mut s = SlotState::new();
        s.execution(0, 0);
        for i in 1..200 {
            s.execution(8000, i);
        }
        let e = s.ewma_ns.unwrap();
        // Integer truncation leaves it at most 7 ns short of the input.
        assert!((7993..=8000).contains(&e), "ewma {e}");
    }

    #[test]
    fn min_max_last_track_samples() {
        let mut s = SlotState::new();
        assert_eq!((s.min_ns, s.max_ns, s.last_ns), (None, None, None));
        for (i, d) in [50u64, 10, 90, 30].into_iter().enumerate() {
            s.execution(d, i as u64);
        }
        assert_eq!(s.min_ns, Some(10));
        assert_eq!(s.max_ns, Some(90));
        assert_eq!(s.last_ns, Some(30));
        assert_eq!(s.executions, 4);
    }

    #[test]
    fn period_and_rate_none_then_some() {
        let mut s = SlotState::new();
        assert_eq!(s.period_ns, None);
        assert_eq!(s.rate_hz(), None);
        s.execution(5, 1_000_000);
        assert_eq!(s.period_ns, None, "one execution is not a period");
        assert_eq!(s.rate_hz(), None);
        s.execution(5, 11_000_000);
        assert_eq!(s.period_ns, Some(10_000_000));
        let hz = s.rate_hz().unwrap();
        assert!((hz - 100.0).abs() < 1e-9, "rate {hz}");
        // Second interval 18 ms: 10ms - 1.25ms + 2.25ms = 11 ms.
        s.execution(5, 29_000_000);
        assert_eq!(s.period_ns, Some(11_000_000));
    }

    #[test]
    fn non_increasing_timestamp_is_not_a_period_sample() {
        let mut s = SlotState::new();
        s.execution(1, 100);
        s.execution(1, 100);
        assert_eq!(s.period_ns, None);
        s.execution(1, 50);
        assert_eq!(s.period_ns, None);
        assert_eq!(s.last_execution_at_ns, Some(100), "never moves backwards");
        s.execution(1, 300);
        assert_eq!(s.period_ns, Some(200));
        assert_eq!(s.last_activity_ns, Some(300));
    }

    #[test]
    fn liveness_transitions() {
        let mut s = SlotState::new();
        assert_eq!(s.liveness, Liveness::Unknown);
        s.start(1);
        assert_eq!(s.liveness, Liveness::Running);
        s.stop(2);
        assert_eq!(s.liveness, Liveness::Stopped);
        s.execution(3, 3);
        assert_eq!(
            s.liveness,
            Liveness::Stopped,
            "execution only lifts Unknown"
        );
        assert_eq!((s.starts, s.stops, s.errors), (1, 1, 0));

        let mut fresh = SlotState::new();
        fresh.execution(1, 1);
        assert_eq!(fresh.liveness, Liveness::Running);
    }

    #[test]
    fn stop_never_clears_latched_error() {
        let mut s = SlotState::new();
        s.start(1);
        s.error(2);
        assert_eq!(s.liveness, Liveness::Error);
        s.stop(3);
        assert_eq!(s.liveness, Liveness::Error);
        s.start(4);
        assert_eq!(
            s.liveness,
            Liveness::Error,
            "a restart does not unlatch either"
        );
        s.execution(10, 5);
        assert_eq!(s.liveness, Liveness::Error);
        assert_eq!((s.starts, s.stops, s.errors), (2, 1, 1));
    }

    #[test]
    fn clear_returns_to_running() {
        for setup in [SlotState::error as fn(&mut SlotState, u64), SlotState::stop] {
            let mut s = SlotState::new();
            setup(&mut s, 1);
            s.clear(2);
            assert_eq!(s.liveness, Liveness::Running);
            s.stop(3);
            assert_eq!(
                s.liveness,
                Liveness::Stopped,
                "after clear, stops work again"
            );
        }
    }

    #[test]
    fn last_activity_is_latest_and_window_check() {
        let mut s = SlotState::new();
        assert!(!s.active_within(1_000, 1_000_000));
        s.start(500);
        s.clear(400);
        assert_eq!(s.last_activity_ns, Some(500));
        assert!(s.active_within(1_000, 500));
        assert!(!s.active_within(1_000, 499));
        assert!(s.active_within(10, 0), "saturating window start");
    }

    #[test]
    fn bulk_counts_rules() {
        let mut s = SlotState::new();
        s.bulk_counts(
            BulkDelta {
                starts: 3,
                stops: 2,
                errors: 0,
                started_total: 3,
                stopped_total: 2,
            },
            10,
        );
        assert_eq!(s.liveness, Liveness::Running);
        s.bulk_counts(
            BulkDelta {
                starts: 0,
                stops: 1,
                errors: 0,
                started_total: 3,
                stopped_total: 3,
            },
            20,
        );
        assert_eq!(s.liveness, Liveness::Stopped);
        s.bulk_counts(
            BulkDelta {
                starts: 0,
                stops: 0,
                errors: 1,
                started_total: 3,
                stopped_total: 3,
            },
            30,
        );
        assert_eq!(s.liveness, Liveness::Error);
        s.bulk_counts(
            BulkDelta {
                starts: 1,
                stops: 1,
                errors: 0,
                started_total: 4,
                stopped_total: 4,
            },
            40,
        );
        assert_eq!(
            s.liveness,
            Liveness::Error,
            "bulk stop never clears latched error"
        );
        assert_eq!((s.starts, s.stops, s.errors), (4, 4, 1));
        assert_eq!(s.last_activity_ns, Some(40));
    }

    #[test]
    fn liveness_code_roundtrip() {
        for l in [
            Liveness::Unknown,
            Liveness::Running,
            Liveness::Stopped,
            Liveness::Error,
        ] {
            assert_eq!(Liveness::from_code(l.to_code()), l);
        }
        assert_eq!(Liveness::from_code(99), Liveness::Unknown);
    }
}
