//! Host probes ("Host probes" in `domain.md`): declarative health checks of one cell run.
//!
//! - [`Declarations::parse`]: the per-cell TOML file (`[[probe]]` tables), validated, with
//!   intervals floored at [`MIN_INTERVAL_MS`] and unknown modes turned into `enforce` (with a
//!   warning);
//! - [`ProbeSet`]: the pure scheduling state machine. Time is passed in (`now_ns`); it returns
//!   [`Action`]s and never does I/O, so tests drive it with a manual clock. On
//!   [`ProbeSet::reset`] it first aborts every running check, then emits the declared
//!   topology, then schedules one ticker per non-disabled probe;
//! - [`run_check`]: executes one check (`vsock-connect`, `unix-connect`, `exec`, `file`);
//! - [`ProbeDriver`]: the tokio task that runs a [`ProbeSet`] for one cell and sends
//!   [`ProbeEvent`]s (which the daemon signs as CloudEvents) on a bounded channel.
//!
//! Safety: an AF_VSOCK connect (a `vsock-connect` probe of a cell addressed by CID) reaches
//! the real hypervisor when run on a host that is itself a VM. It is attempted only when
//! `/proc/cmdline` has the token `vigil_vmtest=1` (the test VM) or the operator opted in
//! ([`ProbeOptions::allow_vsock_connect`]); otherwise the probe fails with a clear refusal.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

/// Shortest probe interval: a typo (`interval_ms = 5`) cannot turn a probe into a flood.
pub const MIN_INTERVAL_MS: u64 = 5_000;
/// Interval when a declaration gives none.
pub const DEFAULT_INTERVAL_MS: u64 = 30_000;
/// Check timeout when a declaration gives none.
pub const DEFAULT_TIMEOUT_MS: u64 = 5_000;
/// Longest check timeout accepted; longer values are cut to it (a probe that needs a minute
/// is not a health check).
pub const MAX_TIMEOUT_MS: u64 = 60_000;
/// Most probes per cell; a file with more is refused (each probe costs a task and events).
pub const MAX_PROBES_PER_CELL: usize = 64;
/// Largest declaration file read; a larger file is refused.
pub const MAX_DECLARATION_BYTES: u64 = 64 * 1024;
/// Longest probe name (it lands in every event).
pub const MAX_NAME_LEN: usize = 64;
/// Most bytes of a file read by a `file` probe with `contains`; the text must occur within
/// them (probes check small status files, not logs).
pub const MAX_FILE_PROBE_BYTES: u64 = 1024 * 1024;
/// Longest VMM answer line to `CONNECT <port>` (`OK 4294967295\n` is 14 bytes); a longer
/// answer fails the probe.
pub const MAX_HANDSHAKE_LINE: usize = 32;
/// Kernel command-line token that marks the test VM, the only place AF_VSOCK connects run.
pub const VMTEST_TOKEN: &str = "vigil_vmtest=1";

const NANOS_PER_MS: u64 = 1_000_000;

/// Errors of probe declarations and of the driver.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The file could not be read.
    #[error("cannot read probe declarations {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_DECLARATION_BYTES`].
    #[error(
        "probe declarations {path} are {size} bytes, over the {MAX_DECLARATION_BYTES}-byte limit"
    )]
    TooLarge {
        /// File.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// Not valid TOML or not the expected shape.
    #[error("probe declarations are not valid: {0}")]
    Toml(#[from] toml::de::Error),
    /// More than [`MAX_PROBES_PER_CELL`] probes.
    #[error("{count} probes declared, over the limit of {MAX_PROBES_PER_CELL}")]
    TooMany {
        /// Count found.
        count: usize,
    },
    /// A probe is unusable.
    #[error("probe {name:?} is invalid: {problem}")]
    Invalid {
        /// Probe name (possibly empty).
        name: String,
        /// What is wrong.
        problem: String,
    },
    /// The driver task has ended.
    #[error("the probe driver of this cell has stopped")]
    DriverStopped,
}

/// What a failing probe means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A failure counts against the cell.
    Enforce,
    /// Results are reported only.
    Observe,
    /// Declared (in the topology) but never run.
    Disabled,
}

impl Mode {
    /// Parses a mode; an unknown word is `Enforce` (fail-closed) and the second value is a
    /// warning to log loudly.
    pub fn parse(word: &str) -> (Mode, Option<String>) {
        match word {
            "enforce" => (Mode::Enforce, None),
            "observe" => (Mode::Observe, None),
            "disabled" => (Mode::Disabled, None),
            other => (
                Mode::Enforce,
                Some(format!(
                    "unknown probe mode {other:?}: treated as \"enforce\" (fail-closed); use enforce, observe or disabled"
                )),
            ),
        }
    }
}

/// What a probe checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeKind {
    /// Connect to the cell's guest vsock `port` (hybrid: `CONNECT <port>\n` handshake).
    VsockConnect {
        /// Guest port.
        port: u32,
    },
    /// Connect to a Unix stream socket.
    UnixConnect {
        /// Socket path.
        path: PathBuf,
    },
    /// Run a command; pass = exit status 0 within the timeout.
    Exec {
        /// Program and arguments (no shell).
        command: Vec<String>,
    },
    /// A file exists (and, optionally, contains a text).
    File {
        /// File path.
        path: PathBuf,
        /// Text that must occur in the first [`MAX_FILE_PROBE_BYTES`] bytes.
        contains: Option<String>,
    },
}

impl ProbeKind {
    /// The declaration keyword.
    pub fn word(&self) -> &'static str {
        match self {
            ProbeKind::VsockConnect { .. } => "vsock-connect",
            ProbeKind::UnixConnect { .. } => "unix-connect",
            ProbeKind::Exec { .. } => "exec",
            ProbeKind::File { .. } => "file",
        }
    }
}

/// One validated probe declaration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSpec {
    /// Unique name within the cell.
    pub name: String,
    /// What it checks.
    pub kind: ProbeKind,
    /// Interval, ms (at least [`MIN_INTERVAL_MS`]).
    pub interval_ms: u64,
    /// Run once, then stop.
    pub run_once: bool,
    /// Mode.
    pub mode: Mode,
    /// Check timeout, ms (at most [`MAX_TIMEOUT_MS`]).
    pub timeout_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    probe: Vec<RawProbe>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    name: String,
    kind: String,
    interval_ms: Option<u64>,
    #[serde(default)]
    run_once: bool,
    mode: Option<String>,
    timeout_ms: Option<u64>,
    port: Option<u32>,
    path: Option<PathBuf>,
    command: Option<Vec<String>>,
    contains: Option<String>,
}

/// A cell's validated probe declarations.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Declarations {
    /// Probes in file order.
    pub probes: Vec<ProbeSpec>,
    /// Warnings raised while reading (already logged): floors applied, unknown modes.
    pub warnings: Vec<String>,
}

impl Declarations {
    /// Reads and parses a declaration file (bounded by [`MAX_DECLARATION_BYTES`]).
    pub fn load(path: &Path) -> Result<Declarations, ProbeError> {
        let read_err = |source| ProbeError::Read {
            path: path.to_owned(),
            source,
        };
        let size = std::fs::metadata(path).map_err(read_err)?.len();
        if size > MAX_DECLARATION_BYTES {
            return Err(ProbeError::TooLarge {
                path: path.to_owned(),
                size,
            });
        }
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        Self::parse(&text)
    }

    /// Parses declaration text.
    pub fn parse(text: &str) -> Result<Declarations, ProbeError> {
        let raw: RawFile = toml::from_str(text)?;
        if raw.probe.len() > MAX_PROBES_PER_CELL {
            return Err(ProbeError::TooMany {
                count: raw.probe.len(),
            });
        }
        let mut out = Declarations::default();
        let mut names = HashSet::new();
        for p in raw.probe {
            let invalid = |problem: &str| ProbeError::Invalid {
                name: p.name.clone(),
                problem: problem.to_owned(),
            };
            if p.name.is_empty() || p.name.len() > MAX_NAME_LEN {
                return Err(invalid("names must be 1 to 64 bytes"));
            }
            if !names.insert(p.name.clone()) {
                return Err(invalid("the name is declared twice"));
            }
            let kind = match p.kind.as_str() {
                "vsock-connect" => ProbeKind::VsockConnect {
                    port: p
                        .port
                        .ok_or_else(|| invalid("vsock-connect needs `port`"))?,
                },
                "unix-connect" => ProbeKind::UnixConnect {
                    path: p
                        .path
                        .clone()
                        .ok_or_else(|| invalid("unix-connect needs `path`"))?,
                },
                "exec" => {
                    let command = p.command.clone().unwrap_or_default();
                    if command.first().is_none_or(String::is_empty) {
                        return Err(invalid("exec needs a non-empty `command` array"));
                    }
                    ProbeKind::Exec { command }
                }
                "file" => ProbeKind::File {
                    path: p.path.clone().ok_or_else(|| invalid("file needs `path`"))?,
                    contains: p.contains.clone(),
                },
                _ => {
                    return Err(invalid(
                        "unknown kind: use vsock-connect, unix-connect, exec or file",
                    ))
                }
            };
            let mut interval_ms = p.interval_ms.unwrap_or(DEFAULT_INTERVAL_MS);
            if interval_ms < MIN_INTERVAL_MS {
                out.warnings.push(format!(
                    "probe {:?}: interval {interval_ms} ms raised to the {MIN_INTERVAL_MS} ms floor",
                    p.name
                ));
                interval_ms = MIN_INTERVAL_MS;
            }
            let (mode, warning) = Mode::parse(p.mode.as_deref().unwrap_or("enforce"));
            if let Some(w) = warning {
                out.warnings.push(format!("probe {:?}: {w}", p.name));
            }
            let timeout_ms = p
                .timeout_ms
                .unwrap_or(DEFAULT_TIMEOUT_MS)
                .clamp(1, MAX_TIMEOUT_MS);
            out.probes.push(ProbeSpec {
                name: p.name,
                kind,
                interval_ms,
                run_once: p.run_once,
                mode,
                timeout_ms,
            });
        }
        for w in &out.warnings {
            tracing::warn!("{w}");
        }
        Ok(out)
    }
}

/// How the host reaches a cell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CellTransport {
    /// Firecracker-style hybrid vsock: the VMM's Unix socket.
    Hybrid {
        /// The VMM's vsock Unix socket (`uds_path`).
        uds_path: PathBuf,
    },
    /// AF_VSOCK with this guest CID.
    Vsock {
        /// Guest CID.
        cid: u32,
    },
}

/// The cell run probes belong to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellTarget {
    /// Cell id.
    pub cell_id: String,
    /// Run id.
    pub run_id: String,
    /// Transport.
    pub transport: CellTransport,
}

/// Outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Healthy.
    Pass,
    /// Unhealthy (or could not be checked).
    Fail,
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeOutcome {
    /// Pass or fail.
    pub status: Status,
    /// Why (empty on a plain pass).
    pub reason: String,
}

impl ProbeOutcome {
    /// A pass with a note.
    pub fn pass(reason: impl Into<String>) -> Self {
        ProbeOutcome {
            status: Status::Pass,
            reason: reason.into(),
        }
    }
    /// A failure with its reason.
    pub fn fail(reason: impl Into<String>) -> Self {
        ProbeOutcome {
            status: Status::Fail,
            reason: reason.into(),
        }
    }
}

/// One probe in a topology event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeclaredProbe {
    /// Name.
    pub probe: String,
    /// Kind keyword.
    pub kind: &'static str,
    /// Mode.
    pub mode: Mode,
    /// Interval after the floor, ms.
    pub interval_ms: u64,
    /// Run once.
    pub run_once: bool,
}

/// One probe observation (data of `observed_first`, `failure_first`, `result`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProbeObservation {
    /// Cell id.
    pub cell_id: String,
    /// Run id.
    pub run_id: String,
    /// Probe name.
    pub probe: String,
    /// Kind keyword.
    pub kind: &'static str,
    /// Mode.
    pub mode: Mode,
    /// Pass or fail.
    pub status: Status,
    /// Why.
    pub reason: String,
}

/// An event for the daemon to sign and journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeEvent {
    /// The declared probes of a run (sent on every reset, before any result).
    TopologyDeclared {
        /// Cell id.
        cell_id: String,
        /// Run id.
        run_id: String,
        /// Every declared probe, disabled ones included.
        probes: Vec<DeclaredProbe>,
    },
    /// A probe's first result in this run.
    ObservedFirst(ProbeObservation),
    /// A probe went from pass to fail.
    FailureFirst(ProbeObservation),
    /// Every result.
    Result(ProbeObservation),
}

impl ProbeEvent {
    /// CloudEvents `type`.
    pub fn event_type(&self) -> &'static str {
        match self {
            ProbeEvent::TopologyDeclared { .. } => "dev.vigil.probe.v1.topology_declared",
            ProbeEvent::ObservedFirst(_) => "dev.vigil.probe.v1.observed_first",
            ProbeEvent::FailureFirst(_) => "dev.vigil.probe.v1.failure_first",
            ProbeEvent::Result(_) => "dev.vigil.probe.v1.result",
        }
    }

    /// Cell id and run id.
    pub fn cell_run(&self) -> (&str, &str) {
        match self {
            ProbeEvent::TopologyDeclared {
                cell_id, run_id, ..
            } => (cell_id, run_id),
            ProbeEvent::ObservedFirst(o) | ProbeEvent::FailureFirst(o) | ProbeEvent::Result(o) => {
                (&o.cell_id, &o.run_id)
            }
        }
    }

    /// CloudEvents `data` (JSON object, camelCase fields).
    pub fn data(&self) -> serde_json::Value {
        match self {
            ProbeEvent::TopologyDeclared {
                cell_id,
                run_id,
                probes,
            } => serde_json::json!({ "cellId": cell_id, "runId": run_id, "probes": probes }),
            ProbeEvent::ObservedFirst(o) | ProbeEvent::FailureFirst(o) | ProbeEvent::Result(o) => {
                serde_json::to_value(o).unwrap_or(serde_json::Value::Null)
            }
        }
    }
}

/// What the state machine asks its driver to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Abort every running check (of any earlier generation) and wait until they are gone.
    AbortAll,
    /// Send this event.
    Emit(ProbeEvent),
    /// Start one check. Its completion is reported with [`ProbeSet::complete`] and the same
    /// generation and index.
    Run {
        /// Generation of the reset that scheduled it.
        generation: u64,
        /// Index into the declarations.
        index: usize,
        /// The probe.
        spec: ProbeSpec,
    },
}

#[derive(Debug)]
struct Ticker {
    spec: ProbeSpec,
    /// Next start, ns; `None` when not scheduled (disabled, or run_once done).
    next_due_ns: Option<u64>,
    in_flight: bool,
    last: Option<Status>,
}

/// The pure scheduler of one cell run's probes.
#[derive(Debug)]
pub struct ProbeSet {
    target: CellTarget,
    generation: u64,
    tickers: Vec<Ticker>,
}

impl ProbeSet {
    /// An empty set for a cell (no probes until [`ProbeSet::reset`]).
    pub fn new(target: CellTarget) -> ProbeSet {
        ProbeSet {
            target,
            generation: 0,
            tickers: Vec::new(),
        }
    }

    /// The cell.
    pub fn target(&self) -> &CellTarget {
        &self.target
    }

    /// Current generation (bumped by every reset).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// New declarations or a new run: abort every running check, emit the topology, schedule
    /// every non-disabled probe due at `now_ns`.
    pub fn reset(&mut self, target: CellTarget, decls: &Declarations, now_ns: u64) -> Vec<Action> {
        self.generation += 1;
        self.target = target;
        self.tickers = decls
            .probes
            .iter()
            .map(|spec| Ticker {
                spec: spec.clone(),
                next_due_ns: (spec.mode != Mode::Disabled).then_some(now_ns),
                in_flight: false,
                last: None,
            })
            .collect();
        let probes = decls
            .probes
            .iter()
            .map(|s| DeclaredProbe {
                probe: s.name.clone(),
                kind: s.kind.word(),
                mode: s.mode,
                interval_ms: s.interval_ms,
                run_once: s.run_once,
            })
            .collect();
        vec![
            Action::AbortAll,
            Action::Emit(ProbeEvent::TopologyDeclared {
                cell_id: self.target.cell_id.clone(),
                run_id: self.target.run_id.clone(),
                probes,
            }),
        ]
    }

    /// Starts every probe that is due and not already running.
    pub fn step(&mut self, now_ns: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        for (index, t) in self.tickers.iter_mut().enumerate() {
            let due = t.next_due_ns.is_some_and(|d| d <= now_ns);
            if due && !t.in_flight {
                t.in_flight = true;
                t.next_due_ns = if t.spec.run_once {
                    None
                } else {
                    Some(now_ns.saturating_add(t.spec.interval_ms.saturating_mul(NANOS_PER_MS)))
                };
                actions.push(Action::Run {
                    generation: self.generation,
                    index,
                    spec: t.spec.clone(),
                });
            }
        }
        actions
    }

    /// Records a finished check and returns its events (`observed_first` on the first result,
    /// `failure_first` on a pass→fail edge, then `result`). Completions of an earlier
    /// generation or an unknown index are ignored.
    pub fn complete(
        &mut self,
        generation: u64,
        index: usize,
        outcome: ProbeOutcome,
    ) -> Vec<Action> {
        if generation != self.generation {
            return Vec::new();
        }
        let Some(t) = self.tickers.get_mut(index) else {
            return Vec::new();
        };
        if !t.in_flight {
            return Vec::new();
        }
        t.in_flight = false;
        let observation = ProbeObservation {
            cell_id: self.target.cell_id.clone(),
            run_id: self.target.run_id.clone(),
            probe: t.spec.name.clone(),
            kind: t.spec.kind.word(),
            mode: t.spec.mode,
            status: outcome.status,
            reason: outcome.reason,
        };
        let mut actions = Vec::new();
        match t.last {
            None => actions.push(Action::Emit(ProbeEvent::ObservedFirst(observation.clone()))),
            Some(Status::Pass) if outcome.status == Status::Fail => {
                actions.push(Action::Emit(ProbeEvent::FailureFirst(observation.clone())));
            }
            Some(_) => {}
        }
        t.last = Some(outcome.status);
        actions.push(Action::Emit(ProbeEvent::Result(observation)));
        actions
    }

    /// Earliest time a probe not already running is due, ns.
    pub fn next_deadline(&self) -> Option<u64> {
        self.tickers
            .iter()
            .filter(|t| !t.in_flight)
            .filter_map(|t| t.next_due_ns)
            .min()
    }

    /// Probes currently running.
    pub fn in_flight(&self) -> usize {
        self.tickers.iter().filter(|t| t.in_flight).count()
    }
}

/// Whether a kernel command line carries [`VMTEST_TOKEN`] as a whole word.
pub fn cmdline_has_vmtest_token(cmdline: &str) -> bool {
    cmdline.split_ascii_whitespace().any(|w| w == VMTEST_TOKEN)
}

/// Whether an AF_VSOCK connect is allowed here: operator opt-in, or the test VM's token in
/// `/proc/cmdline`.
pub fn vsock_connect_permitted(operator_opt_in: bool) -> bool {
    operator_opt_in
        || std::fs::read_to_string("/proc/cmdline").is_ok_and(|c| cmdline_has_vmtest_token(&c))
}

/// Driver options.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProbeOptions {
    /// Operator opt-in to AF_VSOCK connects outside the test VM (see the module docs).
    pub allow_vsock_connect: bool,
}

/// Runs one check, bounded by the probe's timeout. Never panics; every problem is a failure
/// with its reason.
pub async fn run_check(
    spec: &ProbeSpec,
    target: &CellTarget,
    options: ProbeOptions,
) -> ProbeOutcome {
    let timeout = Duration::from_millis(spec.timeout_ms);
    match tokio::time::timeout(timeout, check_inner(spec, target, options)).await {
        Ok(outcome) => outcome,
        Err(_) => ProbeOutcome::fail(format!("timed out after {} ms", spec.timeout_ms)),
    }
}

async fn check_inner(spec: &ProbeSpec, target: &CellTarget, options: ProbeOptions) -> ProbeOutcome {
    match &spec.kind {
        ProbeKind::VsockConnect { port } => match &target.transport {
            CellTransport::Hybrid { uds_path } => hybrid_connect(uds_path, *port).await,
            CellTransport::Vsock { cid } => {
                if !vsock_connect_permitted(options.allow_vsock_connect) {
                    return ProbeOutcome::fail(format!(
                        "refused: AF_VSOCK connect to cid {cid} is only allowed inside the test VM ({VMTEST_TOKEN} on the kernel command line) or with the operator opt-in"
                    ));
                }
                let (cid, port) = (*cid, *port);
                match tokio::task::spawn_blocking(move || vsock_connect(cid, port)).await {
                    Ok(Ok(())) => ProbeOutcome::pass(format!("connected to cid {cid} port {port}")),
                    Ok(Err(e)) => {
                        ProbeOutcome::fail(format!("connect to cid {cid} port {port} failed: {e}"))
                    }
                    Err(e) => ProbeOutcome::fail(format!("connect task failed: {e}")),
                }
            }
        },
        ProbeKind::UnixConnect { path } => match tokio::net::UnixStream::connect(path).await {
            Ok(_) => ProbeOutcome::pass(format!("connected to {}", path.display())),
            Err(e) => ProbeOutcome::fail(format!("connect to {} failed: {e}", path.display())),
        },
        ProbeKind::Exec { command } => exec(command).await,
        ProbeKind::File { path, contains } => file(path, contains.as_deref()).await,
    }
}

async fn hybrid_connect(uds_path: &Path, port: u32) -> ProbeOutcome {
    let mut stream = match tokio::net::UnixStream::connect(uds_path).await {
        Ok(s) => s,
        Err(e) => {
            return ProbeOutcome::fail(format!(
                "connect to the VMM socket {} failed: {e}",
                uds_path.display()
            ))
        }
    };
    // One write, upper case: Cloud Hypervisor only knows CONNECT/connect.
    let request = format!("CONNECT {port}\n");
    match stream.write(request.as_bytes()).await {
        Ok(n) if n == request.len() => {}
        Ok(n) => return ProbeOutcome::fail(format!("short write of the CONNECT line ({n} bytes)")),
        Err(e) => return ProbeOutcome::fail(format!("writing CONNECT failed: {e}")),
    }
    let mut line = Vec::with_capacity(MAX_HANDSHAKE_LINE);
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte).await {
            Ok(0) => {
                return ProbeOutcome::fail(format!(
                    "the VMM closed the connection: nothing listens on guest port {port}"
                ))
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => {
                if line.len() >= MAX_HANDSHAKE_LINE {
                    return ProbeOutcome::fail("the VMM answer line is too long");
                }
                line.push(byte[0]);
            }
            Err(e) => return ProbeOutcome::fail(format!("reading the VMM answer failed: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&line);
    match text.strip_prefix("OK ").map(|n| n.trim().parse::<u32>()) {
        Some(Ok(host_port)) => ProbeOutcome::pass(format!(
            "guest port {port} answered (host port {host_port})"
        )),
        _ => ProbeOutcome::fail(format!("unexpected VMM answer {:?}", text.as_ref())),
    }
}

fn vsock_connect(cid: u32, port: u32) -> std::io::Result<()> {
    // SAFETY: plain socket(2) call with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor we own; OwnedFd closes it exactly once.
    let owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value before we fill it.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    // SAFETY: `addr` is a valid sockaddr_vm for the given length and outlives the call; the fd
    // is open (held by `owned`).
    let rc = unsafe {
        libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&owned),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

async fn exec(command: &[String]) -> ProbeOutcome {
    let Some((program, args)) = command.split_first() else {
        return ProbeOutcome::fail("empty command");
    };
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        // The timeout drops this future; the child must not outlive it.
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return ProbeOutcome::fail(format!("cannot start {program:?}: {e}")),
    };
    match child.wait().await {
        Ok(status) if status.success() => ProbeOutcome::pass("exit status 0"),
        Ok(status) => ProbeOutcome::fail(format!("{program:?} ended with {status}")),
        Err(e) => ProbeOutcome::fail(format!("waiting for {program:?} failed: {e}")),
    }
}

async fn file(path: &Path, contains: Option<&str>) -> ProbeOutcome {
    let Some(needle) = contains else {
        return match tokio::fs::metadata(path).await {
            Ok(_) => ProbeOutcome::pass(format!("{} exists", path.display())),
            Err(e) => ProbeOutcome::fail(format!("{}: {e}", path.display())),
        };
    };
    let f = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) => return ProbeOutcome::fail(format!("{}: {e}", path.display())),
    };
    let mut bytes = Vec::new();
    if let Err(e) = f.take(MAX_FILE_PROBE_BYTES).read_to_end(&mut bytes).await {
        return ProbeOutcome::fail(format!("reading {} failed: {e}", path.display()));
    }
    let found = !needle.is_empty() && bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
    if found || needle.is_empty() {
        ProbeOutcome::pass(format!("{} contains the text", path.display()))
    } else {
        ProbeOutcome::fail(format!("{} does not contain {needle:?}", path.display()))
    }
}

enum Command {
    Reset(CellTarget, Declarations),
}

/// Capacity of a driver's command channel: resets are rare (new declarations or a new run);
/// when full, [`ProbeDriver::reset`] waits.
pub const DRIVER_COMMANDS: usize = 4;

/// The tokio task running one cell's probes. Dropping it stops the task (running checks are
/// aborted).
#[derive(Debug)]
pub struct ProbeDriver {
    commands: Option<mpsc::Sender<Command>>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command::Reset")
    }
}

impl ProbeDriver {
    /// Starts the driver with an initial reset. Events go to `events` (bounded: the driver
    /// waits when it is full; it stops when the receiver is gone).
    pub fn spawn(
        target: CellTarget,
        decls: Declarations,
        events: mpsc::Sender<ProbeEvent>,
        options: ProbeOptions,
    ) -> ProbeDriver {
        let (commands, rx) = mpsc::channel(DRIVER_COMMANDS);
        let task = tokio::spawn(drive(target, decls, events, options, rx));
        ProbeDriver {
            commands: Some(commands),
            task: Some(task),
        }
    }

    /// New declarations or a new run.
    pub async fn reset(&self, target: CellTarget, decls: Declarations) -> Result<(), ProbeError> {
        let commands = self.commands.as_ref().ok_or(ProbeError::DriverStopped)?;
        commands
            .send(Command::Reset(target, decls))
            .await
            .map_err(|_| ProbeError::DriverStopped)
    }

    /// Stops the driver and waits for it (running checks are aborted).
    pub async fn stop(mut self) {
        // Closing the command channel makes the driver end its loop and abort its checks.
        self.commands = None;
        let Some(task) = self.task.take() else { return };
        if let Err(e) = task.await {
            if e.is_panic() {
                tracing::error!("probe driver panicked");
            }
        }
    }
}

impl Drop for ProbeDriver {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

type CheckResult = (u64, usize, ProbeOutcome);

/// Executes actions; returns false when the event receiver is gone.
async fn apply(
    actions: Vec<Action>,
    set: &ProbeSet,
    running: &mut JoinSet<CheckResult>,
    events: &mpsc::Sender<ProbeEvent>,
    options: ProbeOptions,
) -> bool {
    for action in actions {
        match action {
            Action::AbortAll => {
                running.abort_all();
                while running.join_next().await.is_some() {}
            }
            Action::Emit(event) => {
                if events.send(event).await.is_err() {
                    return false;
                }
            }
            Action::Run {
                generation,
                index,
                spec,
            } => {
                let target = set.target().clone();
                running.spawn(async move {
                    let outcome = run_check(&spec, &target, options).await;
                    (generation, index, outcome)
                });
            }
        }
    }
    true
}

async fn drive(
    target: CellTarget,
    decls: Declarations,
    events: mpsc::Sender<ProbeEvent>,
    options: ProbeOptions,
    mut commands: mpsc::Receiver<Command>,
) {
    let base = tokio::time::Instant::now();
    let now_ns = || base.elapsed().as_nanos() as u64;
    let mut set = ProbeSet::new(target.clone());
    let mut running: JoinSet<CheckResult> = JoinSet::new();
    let actions = set.reset(target, &decls, now_ns());
    if !apply(actions, &set, &mut running, &events, options).await {
        return;
    }
    loop {
        let actions = set.step(now_ns());
        if !apply(actions, &set, &mut running, &events, options).await {
            break;
        }
        let deadline = set
            .next_deadline()
            .map(|ns| base + Duration::from_nanos(ns));
        tokio::select! {
            command = commands.recv() => match command {
                Some(Command::Reset(target, decls)) => {
                    let actions = set.reset(target, &decls, now_ns());
                    if !apply(actions, &set, &mut running, &events, options).await {
                        break;
                    }
                }
                None => break,
            },
            Some(joined) = running.join_next(), if !running.is_empty() => {
                if let Ok((generation, index, outcome)) = joined {
                    let actions = set.complete(generation, index, outcome);
                    if !apply(actions, &set, &mut running, &events, options).await {
                        break;
                    }
                }
            }
            () = sleep_until_opt(deadline) => {}
        }
    }
    running.abort_all();
    while running.join_next().await.is_some() {}
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
