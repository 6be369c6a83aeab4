//! The data the health endpoint serves: [`Health`], the entity tree ([`Entities`]) and the
//! [`HealthSource`] trait the daemon implements to provide them.
//!
//! These types are serialised by the HTTP endpoint and deserialised again by `vigil status`
//! ([`crate::status::fetch`]), so every type here is both `Serialize` and `Deserialize`, with
//! camelCase JSON field names. Timing slots of `vigil-timing` are mirrored as [`TaskView`]
//! (that crate's snapshots are serialise-only).

use serde::{Deserialize, Serialize};
use vigil_timing::{Liveness, SlotSnapshot, TableSnapshot};

/// Readiness of the daemon as `GET /healthz` reports it.
///
/// JSON: `{"status":"ready"}`, `{"status":"starting"}` or
/// `{"status":"degraded","reasons":["journal: disk full", ...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Health {
    /// Everything is up; answered with HTTP 200.
    Ready,
    /// Still starting (e.g. persisted terminates not yet re-applied); HTTP 503.
    Starting,
    /// Running but impaired; HTTP 503 with the reasons.
    Degraded {
        /// Human-readable reasons, one per impaired part.
        reasons: Vec<String>,
    },
}

impl Health {
    /// Whether this state is served as HTTP 200.
    pub fn is_ready(&self) -> bool {
        matches!(self, Health::Ready)
    }

    /// Short word for tables: `ready`, `starting`, `degraded`.
    pub fn word(&self) -> &'static str {
        match self {
            Health::Ready => "ready",
            Health::Starting => "starting",
            Health::Degraded { .. } => "degraded",
        }
    }
}

/// Liveness of a task, mirrored from [`vigil_timing::Liveness`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TaskLiveness {
    /// Registered, nothing observed yet.
    #[default]
    Unknown,
    /// Started and not stopped since.
    Running,
    /// Stopped cleanly.
    Stopped,
    /// An error is latched.
    Error,
}

impl From<Liveness> for TaskLiveness {
    fn from(value: Liveness) -> Self {
        match value {
            Liveness::Unknown => TaskLiveness::Unknown,
            Liveness::Running => TaskLiveness::Running,
            Liveness::Stopped => TaskLiveness::Stopped,
            Liveness::Error => TaskLiveness::Error,
        }
    }
}

impl TaskLiveness {
    /// Lower-case word for tables.
    pub fn word(self) -> &'static str {
        match self {
            TaskLiveness::Unknown => "unknown",
            TaskLiveness::Running => "running",
            TaskLiveness::Stopped => "stopped",
            TaskLiveness::Error => "error",
        }
    }
}

/// One task's timing slot as served in the entity tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct TaskView {
    /// Task name.
    pub name: String,
    /// Liveness.
    pub liveness: TaskLiveness,
    /// Starts counted.
    pub starts: u64,
    /// Clean stops counted.
    pub stops: u64,
    /// Errors counted.
    pub errors: u64,
    /// Executions counted.
    pub executions: u64,
    /// Latest execution's duration, ns.
    pub last_duration_ns: Option<u64>,
    /// Shortest execution, ns.
    pub min_duration_ns: Option<u64>,
    /// Longest execution, ns.
    pub max_duration_ns: Option<u64>,
    /// Integer EWMA of durations, ns.
    pub ewma_duration_ns: Option<u64>,
    /// Nominal period, ns.
    pub period_ns: Option<u64>,
    /// Rate derived from the period, Hz.
    pub rate_hz: Option<f64>,
    /// Timestamp of the latest observation, ns (the daemon's monotonic clock).
    pub last_activity_ns: Option<u64>,
}

impl From<&SlotSnapshot> for TaskView {
    fn from(s: &SlotSnapshot) -> Self {
        TaskView {
            name: s.name.clone(),
            liveness: s.liveness.into(),
            starts: s.starts,
            stops: s.stops,
            errors: s.errors,
            executions: s.executions,
            last_duration_ns: s.last_duration_ns,
            min_duration_ns: s.min_duration_ns,
            max_duration_ns: s.max_duration_ns,
            ewma_duration_ns: s.ewma_duration_ns,
            period_ns: s.period_ns,
            rate_hz: s.rate_hz,
            last_activity_ns: s.last_activity_ns,
        }
    }
}

/// Facts about the host vigil runs on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct HostInfo {
    /// Host name.
    pub hostname: String,
    /// vigil's version.
    pub version: String,
    /// Time since the daemon started, ms.
    pub uptime_ms: u64,
}

/// vigil's own pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct VigilEntity {
    /// Timing slots of vigil's own tasks.
    pub tasks: Vec<TaskView>,
    /// Observations dropped because their task was not registered.
    #[serde(default)]
    pub unregistered_observations: u64,
}

impl VigilEntity {
    /// Builds the entity from a timing-table snapshot.
    pub fn from_table(table: &TableSnapshot) -> Self {
        VigilEntity {
            tasks: table.slots.iter().map(TaskView::from).collect(),
            unregistered_observations: table.unregistered_observations,
        }
    }
}

/// One registered cell run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct CellEntity {
    /// Stable cell name.
    pub cell_id: String,
    /// This boot of the cell.
    pub run_id: String,
    /// The reducer's word for the cell's state (e.g. `fresh`, `active`, `silent`, `paused`,
    /// `terminated`); the vocabulary belongs to the daemon, shown as is.
    pub state: String,
    /// Time since the last frame, ms; `None` when no frame has arrived in this run.
    pub last_frame_age_ms: Option<u64>,
    /// Frames received in this run.
    pub frames: u64,
    /// Recent frame rate.
    pub frames_per_sec: f64,
    /// Silence class when silent (`guest_silent`, `host_stalled`, `disconnected`).
    pub silence_class: Option<String>,
    /// Op-control holds currently waiting.
    pub holds: u64,
    /// The guest-reported task slots of this cell.
    pub tasks: Vec<TaskView>,
}

/// The entity tree served at `GET /api/v1/entities`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Entities {
    /// The host.
    pub host: HostInfo,
    /// vigil itself.
    pub vigil: VigilEntity,
    /// Registered cells.
    pub cells: Vec<CellEntity>,
}

/// What the daemon provides to the HTTP endpoint. Called on the endpoint's tasks (off the hot
/// path), once per request; implementations build snapshots and must not block for long.
pub trait HealthSource: Send + Sync + 'static {
    /// Current readiness.
    fn health(&self) -> Health;
    /// Entity tree as of `now_ns` (the daemon's monotonic clock, used for ages).
    fn entities(&self, now_ns: u64) -> Entities;
    /// Prometheus text exposition (usually [`crate::metrics::Metrics::render`]).
    fn metrics(&self) -> String;
}
