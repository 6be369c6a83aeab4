//! Prometheus metrics of the daemon: the [`Metrics`] registry of every family the daemon
//! updates, and its text rendering ([`Metrics::render`], Prometheus text format 0.0.4).
//!
//! Label sets are bounded by construction:
//! - `cell` labels exist only for cells registered with [`Metrics::register_cell`] (at most
//!   [`MAX_CELL_LABELS`]); [`Metrics::remove_cell`] drops both series of a cell when the daemon
//!   removes the cell, so removed cells stop being exported and cannot accumulate;
//! - every other label (`reason`, `class`, `decision`, `signal`) takes a `&'static str`, i.e. a
//!   name compiled into the daemon (its reason enums' `name()`), never a string a guest sent.
//!
//! The hot path holds a [`CellMetrics`] handle (shared atomics): recording takes no lock.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Most cells with a `cell` label at once. Matches the order of magnitude of cells one host
/// runs (thousands of microVMs) while bounding the series count to `2 * MAX_CELL_LABELS`;
/// when full, [`Metrics::register_cell`] refuses with [`MetricsError::TooManyCells`] and the
/// cell runs unlabelled (its frames still count in the daemon's own totals).
pub const MAX_CELL_LABELS: usize = 8192;

/// Journal fsync latency buckets, seconds: 100 µs (a fast NVMe flush) to 1 s (a device in
/// trouble); slower flushes land in `+Inf`.
pub const FSYNC_BUCKETS_SECONDS: [f64; 13] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Journal commit batch sizes, events: powers of two from 1 to 4096 (the journal's batch
/// bound is of that order); larger batches land in `+Inf`.
pub const BATCH_BUCKETS_EVENTS: [f64; 13] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];

/// eBPF per-peer map read latency buckets, seconds: 10 µs (a few rows) to 100 ms (a full map
/// walk on a loaded host); slower reads land in `+Inf`.
pub const EBPF_READ_BUCKETS_SECONDS: [f64; 9] = [
    0.00001, 0.000_05, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1,
];

/// Errors of the metrics registry.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MetricsError {
    /// The cell label table is full.
    #[error(
        "cannot label metrics for cell {cell_id:?}: {MAX_CELL_LABELS} cells already have labels"
    )]
    TooManyCells {
        /// The refused cell.
        cell_id: String,
    },
    /// The cell id is unusable as a label.
    #[error("cannot label metrics for cell {cell_id:?}: cell ids must be 1 to 128 bytes")]
    BadCellId {
        /// The refused cell.
        cell_id: String,
    },
}

/// Longest cell id accepted as a label value (the registry's own limit on cell names).
pub const MAX_CELL_ID_LEN: usize = 128;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CellLabel {
    cell: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabel {
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabel {
    decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SignalLabel {
    signal: &'static str,
}

/// Lock-free handle to one registered cell's counters, held by the hot path.
#[derive(Clone, Debug)]
pub struct CellMetrics {
    frames: Counter,
    bytes: Counter,
}

impl CellMetrics {
    /// Counts `frames` frames totalling `bytes` bytes received from this cell.
    pub fn received(&self, frames: u64, bytes: u64) {
        self.frames.inc_by(frames);
        self.bytes.inc_by(bytes);
    }
}

/// Every metric family the daemon updates. `Send + Sync`; share it in an `Arc`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    frames: Family<CellLabel, Counter>,
    bytes: Family<CellLabel, Counter>,
    cells: Mutex<HashMap<String, CellMetrics>>,
    events_journaled: Counter,
    acks_sent: Counter,
    rejects: Family<ReasonLabel, Counter>,
    closes: Family<ReasonLabel, Counter>,
    silence: Family<ClassLabel, Counter>,
    decisions: Family<DecisionLabel, Counter>,
    signals: Family<SignalLabel, Counter>,
    fsync: Histogram,
    batch: Histogram,
    ebpf_rows: Gauge,
    ebpf_read: Histogram,
    degraded: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates the registry with every family registered (and exported, at zero).
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let frames = Family::<CellLabel, Counter>::default();
        let bytes = Family::<CellLabel, Counter>::default();
        let events_journaled = Counter::default();
        let acks_sent = Counter::default();
        let rejects = Family::<ReasonLabel, Counter>::default();
        let closes = Family::<ReasonLabel, Counter>::default();
        let silence = Family::<ClassLabel, Counter>::default();
        let decisions = Family::<DecisionLabel, Counter>::default();
        let signals = Family::<SignalLabel, Counter>::default();
        let fsync = Histogram::new(FSYNC_BUCKETS_SECONDS);
        let batch = Histogram::new(BATCH_BUCKETS_EVENTS);
        let ebpf_rows = Gauge::default();
        let ebpf_read = Histogram::new(EBPF_READ_BUCKETS_SECONDS);
        let degraded = Gauge::default();

        registry.register(
            "vigil_frames_received",
            "Frames received from a registered cell",
            frames.clone(),
        );
        registry.register(
            "vigil_bytes_received",
            "Frame bytes received from a registered cell",
            bytes.clone(),
        );
        registry.register(
            "vigil_events_journaled",
            "Events made durable in the journal",
            events_journaled.clone(),
        );
        registry.register(
            "vigil_acks_sent",
            "Acknowledgements sent to guests",
            acks_sent.clone(),
        );
        registry.register(
            "vigil_rejects",
            "Incoming connections refused, by reason",
            rejects.clone(),
        );
        registry.register(
            "vigil_connection_closes",
            "Connections closed, by reason",
            closes.clone(),
        );
        registry.register(
            "vigil_silence_events",
            "Silence events emitted, by class",
            silence.clone(),
        );
        registry.register(
            "vigil_opcontrol_decisions",
            "Op-control decisions that denied or held an action, by decision",
            decisions.clone(),
        );
        registry.register(
            "vigil_signals_applied",
            "Op-control signals applied, by signal",
            signals.clone(),
        );
        registry.register(
            "vigil_journal_fsync_seconds",
            "Journal fsync latency in seconds",
            fsync.clone(),
        );
        registry.register(
            "vigil_journal_batch_events",
            "Events per journal commit batch",
            batch.clone(),
        );
        registry.register(
            "vigil_ebpf_map_rows",
            "Rows in the eBPF per-peer map at the latest read",
            ebpf_rows.clone(),
        );
        registry.register(
            "vigil_ebpf_map_read_seconds",
            "Time to read the eBPF per-peer map in seconds",
            ebpf_read.clone(),
        );
        registry.register(
            "vigil_degraded",
            "1 while health is degraded, else 0",
            degraded.clone(),
        );

        Metrics {
            registry,
            frames,
            bytes,
            cells: Mutex::new(HashMap::new()),
            events_journaled,
            acks_sent,
            rejects,
            closes,
            silence,
            decisions,
            signals,
            fsync,
            batch,
            ebpf_rows,
            ebpf_read,
            degraded,
        }
    }

    /// Gives a cell its `cell`-labelled series (idempotent: a second call returns the same
    /// counters) and the handle the hot path records through.
    pub fn register_cell(&self, cell_id: &str) -> Result<CellMetrics, MetricsError> {
        if cell_id.is_empty() || cell_id.len() > MAX_CELL_ID_LEN {
            return Err(MetricsError::BadCellId {
                cell_id: cell_id.chars().take(MAX_CELL_ID_LEN).collect(),
            });
        }
        let mut cells = self.cells.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(existing) = cells.get(cell_id) {
            return Ok(existing.clone());
        }
        if cells.len() >= MAX_CELL_LABELS {
            return Err(MetricsError::TooManyCells {
                cell_id: cell_id.to_owned(),
            });
        }
        let label = CellLabel {
            cell: cell_id.to_owned(),
        };
        let handle = CellMetrics {
            frames: self.frames.get_or_create_owned(&label),
            bytes: self.bytes.get_or_create_owned(&label),
        };
        cells.insert(cell_id.to_owned(), handle.clone());
        Ok(handle)
    }

    /// Drops a cell's labelled series (call when the cell is removed). Handles still held keep
    /// counting into detached counters that are no longer exported. Returns whether the cell
    /// had labels.
    pub fn remove_cell(&self, cell_id: &str) -> bool {
        let mut cells = self.cells.lock().unwrap_or_else(PoisonError::into_inner);
        let label = CellLabel {
            cell: cell_id.to_owned(),
        };
        self.frames.remove(&label);
        self.bytes.remove(&label);
        cells.remove(cell_id).is_some()
    }

    /// Number of cells with labels.
    pub fn labelled_cells(&self) -> usize {
        self.cells
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Counts events made durable.
    pub fn events_journaled(&self, n: u64) {
        self.events_journaled.inc_by(n);
    }

    /// Counts acknowledgements sent.
    pub fn acks_sent(&self, n: u64) {
        self.acks_sent.inc_by(n);
    }

    /// Counts a refused connection.
    pub fn reject(&self, reason: &'static str) {
        self.rejects.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Counts a closed connection.
    pub fn connection_closed(&self, reason: &'static str) {
        self.closes.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Counts a silence event (`guest_silent`, `host_stalled`, `disconnected`).
    pub fn silence_event(&self, class: &'static str) {
        self.silence.get_or_create(&ClassLabel { class }).inc();
    }

    /// Counts an op-control decision (`deny`, `hold`, `release`, ...).
    pub fn opcontrol_decision(&self, decision: &'static str) {
        self.decisions
            .get_or_create(&DecisionLabel { decision })
            .inc();
    }

    /// Counts an applied signal (`pause`, `resume`, `terminate`).
    pub fn signal_applied(&self, signal: &'static str) {
        self.signals.get_or_create(&SignalLabel { signal }).inc();
    }

    /// Records one journal fsync's latency.
    pub fn observe_fsync(&self, latency: Duration) {
        self.fsync.observe(latency.as_secs_f64());
    }

    /// Records one journal commit batch's size.
    pub fn observe_batch(&self, events: u64) {
        self.batch.observe(events as f64);
    }

    /// Records the eBPF map's row count and how long reading it took.
    pub fn observe_ebpf_read(&self, rows: u64, latency: Duration) {
        self.ebpf_rows.set(i64::try_from(rows).unwrap_or(i64::MAX));
        self.ebpf_read.observe(latency.as_secs_f64());
    }

    /// Sets the degraded flag.
    pub fn set_degraded(&self, degraded: bool) {
        self.degraded.set(i64::from(degraded));
    }

    /// Renders every family in the Prometheus text format 0.0.4 (serve it as
    /// `text/plain; version=0.0.4`).
    pub fn render(&self) -> String {
        let mut open_metrics = String::new();
        // Writing to a String cannot fail; an encoder error would only come from a label
        // encoder, and all of ours write plain strings.
        if encode(&mut open_metrics, &self.registry).is_err() {
            tracing::error!("metrics encoding failed; serving what was encoded");
        }
        openmetrics_to_prometheus(&open_metrics)
    }
}

/// Converts the OpenMetrics text the encoder writes into Prometheus text 0.0.4: counter
/// families are named with their `_total` suffix in `# HELP`/`# TYPE` (as their samples are),
/// and the OpenMetrics-only `# UNIT` and `# EOF` lines are dropped.
fn openmetrics_to_prometheus(text: &str) -> String {
    let counters: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(text.len() + counters.len() * 16);
    for line in text.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match rewritten {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_get_total_in_help_and_type() {
        let m = Metrics::new();
        m.events_journaled(3);
        let text = m.render();
        assert!(text.contains("# TYPE vigil_events_journaled_total counter\n"));
        assert!(text.contains("# HELP vigil_events_journaled_total "));
        assert!(text.contains("\nvigil_events_journaled_total 3\n"));
        assert!(!text.contains("# EOF"));
    }

    #[test]
    fn cell_labels_are_registered_and_removed() {
        let m = Metrics::new();
        let cell = m.register_cell("cell-a").unwrap();
        cell.received(2, 100);
        // Idempotent: the second handle shares the counters.
        m.register_cell("cell-a").unwrap().received(1, 10);
        let text = m.render();
        assert!(
            text.contains("vigil_frames_received_total{cell=\"cell-a\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("vigil_bytes_received_total{cell=\"cell-a\"} 110\n"));
        assert_eq!(m.labelled_cells(), 1);
        assert!(m.remove_cell("cell-a"));
        assert!(!m.remove_cell("cell-a"));
        cell.received(5, 5);
        let text = m.render();
        assert!(!text.contains("cell-a"), "{text}");
        assert_eq!(m.labelled_cells(), 0);
    }

    #[test]
    fn bad_cell_ids_are_refused() {
        let m = Metrics::new();
        assert!(matches!(
            m.register_cell(""),
            Err(MetricsError::BadCellId { .. })
        ));
        let long = "x".repeat(MAX_CELL_ID_LEN + 1);
        assert!(matches!(
            m.register_cell(&long),
            Err(MetricsError::BadCellId { .. })
        ));
    }

    #[test]
    fn histograms_bucket_fsync_latency() {
        let m = Metrics::new();
        m.observe_fsync(Duration::from_micros(50));
        m.observe_fsync(Duration::from_millis(3));
        m.observe_fsync(Duration::from_secs(2));
        let text = m.render();
        assert!(
            text.contains("vigil_journal_fsync_seconds_bucket{le=\"0.0001\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("vigil_journal_fsync_seconds_bucket{le=\"0.005\"} 2\n"));
        assert!(text.contains("vigil_journal_fsync_seconds_bucket{le=\"1.0\"} 2\n"));
        assert!(text.contains("vigil_journal_fsync_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("vigil_journal_fsync_seconds_count 3\n"));
    }

    #[test]
    fn labelled_reasons_and_flags() {
        let m = Metrics::new();
        m.reject("unregistered_cid");
        m.reject("unregistered_cid");
        m.connection_closed("reset");
        m.silence_event("guest_silent");
        m.opcontrol_decision("deny");
        m.signal_applied("terminate");
        m.set_degraded(true);
        m.observe_ebpf_read(7, Duration::from_micros(20));
        m.observe_batch(33);
        m.acks_sent(4);
        let text = m.render();
        for needle in [
            "vigil_rejects_total{reason=\"unregistered_cid\"} 2\n",
            "vigil_connection_closes_total{reason=\"reset\"} 1\n",
            "vigil_silence_events_total{class=\"guest_silent\"} 1\n",
            "vigil_opcontrol_decisions_total{decision=\"deny\"} 1\n",
            "vigil_signals_applied_total{signal=\"terminate\"} 1\n",
            "vigil_degraded 1\n",
            "vigil_ebpf_map_rows 7\n",
            "vigil_journal_batch_events_bucket{le=\"64.0\"} 1\n",
            "vigil_acks_sent_total 4\n",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        m.set_degraded(false);
        assert!(m.render().contains("vigil_degraded 0\n"));
    }
}
