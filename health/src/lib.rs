//! vigil-health: how vigil shows its health to the outside.
//!
//! - [`model`]: the served data ([`Health`], [`Entities`]) and the [`HealthSource`] trait the
//!   daemon implements;
//! - [`metrics`]: the Prometheus registry of every family the daemon updates;
//! - [`http`]: the loopback HTTP/1.1 endpoint (`/healthz`, `/api/v1/entities`, `/metrics`);
//! - [`notify`]: the systemd `sd_notify` protocol and watchdog interval;
//! - [`probes`]: declarative host probes of cells, a pure scheduler and its tokio driver;
//! - [`status`]: `vigil status` (fetch over HTTP and render as a table).
//!
//! The crate stands alone: the daemon wires it up by implementing [`HealthSource`], sharing a
//! [`metrics::Metrics`], and forwarding [`probes::ProbeEvent`]s into its event pipeline.

pub mod http;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod probes;
pub mod status;

pub use http::{HttpConfig, HttpError, HttpServer, NowFn, DEFAULT_HTTP_ADDR};
pub use metrics::{CellMetrics, Metrics, MetricsError};
pub use model::{
    CellEntity, Entities, Health, HealthSource, HostInfo, TaskLiveness, TaskView, VigilEntity,
};
pub use notify::{watchdog_interval, Notifier, NotifyError};
pub use probes::{
    CellTarget, CellTransport, Declarations, Mode, ProbeDriver, ProbeEvent, ProbeOptions, ProbeSet,
    ProbeSpec,
};
pub use status::{fetch, render, StatusError};
