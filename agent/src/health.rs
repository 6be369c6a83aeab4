//! The daemon's side of `/healthz`, `/api/v1/entities` and `/metrics` (served by
//! vigil-health): a [`Source`] that reads shared atomics and small shared views — never the
//! hot path's locks — when a request comes, plus the systemd readiness/watchdog pings.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use vigil_health::model::{CellEntity, Entities, Health, HostInfo, VigilEntity};

/// What the applier keeps per registered cell for the views.
#[derive(Debug, Clone)]
pub struct CellView {
    pub run_id: String,
    pub slot: Arc<vigil_drain::CellSlot>,
    /// "active", "silent" (silenced, no frame since), "stalled" (receiver_stalled).
    pub state: &'static str,
    pub silence_class: Option<&'static str>,
    /// Frames seen at the previous metrics render (for counter increments and rates).
    pub frames_seen: u64,
    pub bytes_seen: u64,
    pub rate_at: (u64, u64),
}

pub struct Source {
    pub host: String,
    pub started_ns: u64,
    pub ready: AtomicBool,
    pub timing: vigil_timing::SlotTable,
    pub cells: Mutex<BTreeMap<String, CellView>>,
    pub journal: Arc<vigil_journal::JournalHealth>,
    pub metrics: vigil_health::metrics::Metrics,
    cell_metrics: Mutex<BTreeMap<String, vigil_health::metrics::CellMetrics>>,
    journal_seen: Mutex<u64>,
}

impl Source {
    pub fn new(
        host: String,
        started_ns: u64,
        timing: vigil_timing::SlotTable,
        journal: Arc<vigil_journal::JournalHealth>,
    ) -> Self {
        Self {
            host,
            started_ns,
            ready: AtomicBool::new(false),
            timing,
            cells: Mutex::new(BTreeMap::new()),
            journal,
            metrics: vigil_health::metrics::Metrics::new(),
            cell_metrics: Mutex::new(BTreeMap::new()),
            journal_seen: Mutex::new(0),
        }
    }

    pub fn set_cell(&self, cell_id: &str, run_id: &str, slot: Arc<vigil_drain::CellSlot>) {
        let view = CellView {
            run_id: run_id.to_string(),
            slot,
            state: "active",
            silence_class: None,
            frames_seen: 0,
            bytes_seen: 0,
            rate_at: (0, 0),
        };
        self.cells
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(cell_id.to_string(), view);
        if let Ok(m) = self.metrics.register_cell(cell_id) {
            self.cell_metrics
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(cell_id.to_string(), m);
        }
    }

    pub fn remove_cell(&self, cell_id: &str) {
        self.cells
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(cell_id);
        self.cell_metrics
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(cell_id);
        self.metrics.remove_cell(cell_id);
    }

    /// Records a silence-type event (`Some(class)`) or a resume (`None`) for the views and
    /// metrics.
    pub fn silence(&self, cell_id: &str, class: Option<&'static str>) {
        let mut cells = self.cells.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(v) = cells.get_mut(cell_id) else {
            return;
        };
        if let Some(c) = class {
            v.state = if c == "host_stalled" {
                "stalled"
            } else {
                "silent"
            };
            v.silence_class = Some(c);
            self.metrics.silence_event(c);
        } else {
            v.state = "active";
            self.metrics.silence_event("resumed");
        }
    }
}

impl vigil_health::model::HealthSource for Source {
    fn health(&self) -> Health {
        if !self.ready.load(Ordering::Acquire) {
            return Health::Starting;
        }
        let mut reasons = Vec::new();
        if let Some(r) = self.journal.reason() {
            reasons.push(format!("journal: {r}"));
        }
        if reasons.is_empty() {
            Health::Ready
        } else {
            Health::Degraded { reasons }
        }
    }

    fn entities(&self, now_ns: u64) -> Entities {
        let table = self.timing.snapshot_all();
        let cells = self.cells.lock().unwrap_or_else(PoisonError::into_inner);
        let cells = cells
            .iter()
            .map(|(id, v)| {
                let last = v.slot.last_frame_mono_ns.load(Ordering::Relaxed);
                let frames = v.slot.frames.load(Ordering::Relaxed);
                let (t0, f0) = v.rate_at;
                let secs = now_ns.saturating_sub(t0) as f64 / 1e9;
                CellEntity {
                    cell_id: id.clone(),
                    run_id: v.run_id.clone(),
                    state: v.state.to_string(),
                    last_frame_age_ms: (last != 0).then(|| now_ns.saturating_sub(last) / 1_000_000),
                    frames,
                    frames_per_sec: if t0 != 0 && secs > 0.0 {
                        frames.saturating_sub(f0) as f64 / secs
                    } else {
                        0.0
                    },
                    silence_class: v.silence_class.map(str::to_string),
                    holds: 0,
                    // The guest's own executor tasks (slots named "cell/<id>/<task>").
                    tasks: table
                        .slots
                        .iter()
                        .filter(|s| {
                            s.name
                                .strip_prefix("cell/")
                                .and_then(|r| r.strip_prefix(id.as_str()))
                                .is_some_and(|r| r.starts_with('/'))
                        })
                        .map(vigil_health::model::TaskView::from)
                        .collect(),
                }
            })
            .collect();
        Entities {
            host: HostInfo {
                hostname: self.host.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                uptime_ms: now_ns.saturating_sub(self.started_ns) / 1_000_000,
            },
            vigil: VigilEntity::from_table(&table),
            cells,
        }
    }

    fn metrics(&self) -> String {
        // Turn the atomics into counter increments since the previous render.
        let now = crate::sys::monotonic_ns();
        {
            let mut cells = self.cells.lock().unwrap_or_else(PoisonError::into_inner);
            let cm = self
                .cell_metrics
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for (id, v) in cells.iter_mut() {
                let frames = v.slot.frames.load(Ordering::Relaxed);
                let bytes = v.slot.bytes.load(Ordering::Relaxed);
                if let Some(m) = cm.get(id) {
                    m.received(
                        frames.saturating_sub(v.frames_seen),
                        bytes.saturating_sub(v.bytes_seen),
                    );
                }
                v.frames_seen = frames;
                v.bytes_seen = bytes;
                v.rate_at = (now, frames);
            }
        }
        let written = self.journal.events_written.load(Ordering::Relaxed);
        {
            let mut seen = self
                .journal_seen
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            self.metrics.events_journaled(written.saturating_sub(*seen));
            *seen = written;
        }
        let mut fsyncs = Vec::new();
        self.journal.take_fsync_samples(&mut fsyncs);
        for took in fsyncs {
            self.metrics.observe_fsync(took);
        }
        self.metrics.set_degraded(self.journal.is_degraded());
        self.metrics.render()
    }
}
