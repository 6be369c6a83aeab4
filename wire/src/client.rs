//! The reference guest client and load generator behind `vigil emit` (and the tests'
//! guest): connects over a Unix stream socket or AF_VSOCK, sends a Hello, then events in
//! batched writes, reads the host's frames (acks, policy decisions, errors) on a reader
//! thread, and reports what happened as one JSON line.
//!
//! Safety rule (see the design notes, "Safety first"): a vsock `connect()` from a machine
//! that is itself a VM guest reaches its real hypervisor. So this client never defaults to
//! vsock (the user names `--vsock CID:PORT`), and even then connects only when the kernel
//! command line carries `vigil_vmtest=1` (the test VM) or `VIGIL_EMIT_ALLOW_VSOCK=1` is set
//! (an operator inside a real guest). The check sits in the one function that creates the
//! AF_VSOCK socket, before the socket exists.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prost::Message;

use crate::frame::{
    encode_guest_frame, HostFrameDecoder, DEFAULT_MAX_FRAME_BYTES, MAX_EVENT_TYPE_BYTES,
    MAX_OP_ID_BYTES, MAX_STREAM_ID_BYTES, PROTOCOL_VERSION,
};
use crate::pb;

/// Environment variable that allows a vsock connect outside the test VM. Set it only inside
/// a real guest, where CID 2 is the host running vigil.
pub const ALLOW_VSOCK_ENV: &str = "VIGIL_EMIT_ALLOW_VSOCK";

/// Kernel command-line token the vmtest harness puts on its guests.
pub const VMTEST_CMDLINE_TOKEN: &str = "vigil_vmtest=1";

/// Largest single write. vhost-device-vsock with 6.12 guests drops packets over 32 KiB, and
/// 16 frames of a few hundred bytes fit easily; the io_uring notes measured 16 frames per
/// write as the sweet spot.
pub const MAX_WRITE_BYTES: usize = 16 * 1024;

/// Most frames per write (`--batch`).
pub const MAX_BATCH: usize = 1024;

/// Read buffer of the reader thread (host frames are small).
const READ_BUF_BYTES: usize = 16 * 1024;

/// How long, after a failed write, to wait for the reader to pick up the Error frame the host
/// most likely sent before closing, so the report names the cause instead of "broken pipe".
const ERROR_FRAME_GRACE: Duration = Duration::from_secs(1);

/// AF_VSOCK connect attempts made by this process (only ever incremented right before the
/// `connect` call, after the permission check). Tests assert it stays 0 on a host.
static VSOCK_CONNECT_ATTEMPTS: AtomicUsize = AtomicUsize::new(0);

/// How many AF_VSOCK `connect` calls this process has made.
pub fn vsock_connect_attempts() -> usize {
    VSOCK_CONNECT_ATTEMPTS.load(Ordering::SeqCst)
}

/// A vsock address, `CID:PORT` on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VsockAddr {
    pub cid: u32,
    pub port: u32,
}

impl FromStr for VsockAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (cid, port) = s
            .split_once(':')
            .ok_or_else(|| format!("expected CID:PORT, got {s:?}"))?;
        let cid = cid
            .parse()
            .map_err(|_| format!("CID {cid:?} is not a 32-bit number"))?;
        let port = port
            .parse()
            .map_err(|_| format!("port {port:?} is not a 32-bit number"))?;
        Ok(VsockAddr { cid, port })
    }
}

impl fmt::Display for VsockAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vsock {}:{}", self.cid, self.port)
    }
}

/// `--ask OP_ID:ACTION`. An op id is `{trace_id}:{span_id}`, so the action is what follows
/// the *last* colon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyAsk {
    pub op_id: String,
    pub action: String,
}

impl FromStr for PolicyAsk {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (op_id, action) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("expected OP_ID:ACTION, got {s:?}"))?;
        Ok(PolicyAsk {
            op_id: op_id.to_owned(),
            action: action.to_owned(),
        })
    }
}

/// `--claim KEY=VALUE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub key: String,
    pub value: String,
}

impl FromStr for Claim {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (key, value) = s
            .split_once('=')
            .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))?;
        if key.is_empty() {
            return Err(format!("claim {s:?} has an empty key"));
        }
        Ok(Claim {
            key: key.to_owned(),
            value: value.to_owned(),
        })
    }
}

/// Where to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Unix(PathBuf),
    Vsock(VsockAddr),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Unix(path) => write!(f, "unix {}", path.display()),
            Target::Vsock(addr) => addr.fmt(f),
        }
    }
}

/// `vigil emit`: the reference guest client and load generator.
#[derive(Debug, Clone, clap::Args)]
pub struct EmitArgs {
    /// Connect to this Unix stream socket (e.g. a hybrid-vsock listener `<uds_path>_<port>`).
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present = "vsock",
        conflicts_with = "vsock"
    )]
    pub unix: Option<PathBuf>,
    /// Connect over AF_VSOCK. Only inside the test VM (`vigil_vmtest=1` on the kernel command
    /// line) or with VIGIL_EMIT_ALLOW_VSOCK=1 (inside a real guest); never from a host.
    #[arg(long, value_name = "CID:PORT")]
    pub vsock: Option<VsockAddr>,
    /// Stream id sent in the Hello (default: `emit-<pid>`).
    #[arg(long = "stream", value_name = "ID")]
    pub stream: Option<String>,
    /// Generate N events.
    #[arg(long, value_name = "N", conflicts_with = "stdin")]
    pub count: Option<u64>,
    /// Send one event per line of standard input (payload = the line; content type
    /// application/json when the line parses as JSON, else text/plain).
    #[arg(long)]
    pub stdin: bool,
    /// Event type.
    #[arg(
        long = "type",
        value_name = "T",
        default_value = "dev.vigil.emit.v1.sample"
    )]
    pub event_type: String,
    /// Operation id the events belong to (`{trace_id}:{span_id}`), empty by default.
    #[arg(long, value_name = "OP_ID", default_value = "")]
    pub op_id: String,
    /// Payload size of generated events, bytes (JSON when at least ~20 bytes).
    #[arg(long, value_name = "B", default_value_t = 64)]
    pub payload_bytes: usize,
    /// Events per second; 0 sends as fast as possible.
    #[arg(long, value_name = "R", default_value_t = 0.0)]
    pub rate: f64,
    /// Frames per write (each write stays <= 16 KiB).
    #[arg(long, value_name = "K", default_value_t = 16)]
    pub batch: usize,
    /// guest_seq of the first event (resend tests reuse earlier numbers).
    #[arg(long, value_name = "S", default_value_t = 1)]
    pub start_seq: u64,
    /// How long to wait at the end for acks (and policy decisions); 0 = don't wait.
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    pub ack_timeout_ms: u64,
    /// Send one PolicyQuery (query_id 1) and print each decision as a JSON line.
    #[arg(long, value_name = "OP_ID:ACTION")]
    pub ask: Option<PolicyAsk>,
    /// A claim for the Hello (repeatable). Recorded by the host, never used as identity.
    #[arg(long = "claim", value_name = "KEY=VALUE")]
    pub claims: Vec<Claim>,
    /// Hello.agent_name (default: vigil-emit).
    #[arg(long, value_name = "NAME")]
    pub agent_name: Option<String>,
}

impl EmitArgs {
    /// Arguments for `count` generated events to a Unix socket, everything else default
    /// (for tests and other crates' harnesses).
    pub fn unix(path: impl Into<PathBuf>, count: u64) -> Self {
        EmitArgs {
            unix: Some(path.into()),
            vsock: None,
            stream: None,
            count: Some(count),
            stdin: false,
            event_type: "dev.vigil.emit.v1.sample".to_owned(),
            op_id: String::new(),
            payload_bytes: 64,
            rate: 0.0,
            batch: 16,
            start_seq: 1,
            ack_timeout_ms: 5000,
            ask: None,
            claims: Vec::new(),
            agent_name: None,
        }
    }

    pub fn target(&self) -> Result<Target, ClientError> {
        match (&self.unix, self.vsock) {
            (Some(path), None) => Ok(Target::Unix(path.clone())),
            (None, Some(addr)) => Ok(Target::Vsock(addr)),
            (None, None) => Err(ClientError::NoTarget),
            (Some(_), Some(_)) => Err(ClientError::TwoTargets),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no target: name one with --unix PATH or --vsock CID:PORT")]
    NoTarget,
    #[error("two targets: give --unix or --vsock, not both")]
    TwoTargets,
    #[error(
        "refusing to connect to vsock {cid}:{port}: a vsock connect is allowed only inside the vigil test VM \
         (`{VMTEST_CMDLINE_TOKEN}` on the kernel command line) or with {ALLOW_VSOCK_ENV}=1 set by an operator \
         inside a real guest; from anywhere else it would reach the real hypervisor"
    )]
    VsockNotAllowed { cid: u32, port: u32 },
    #[error("could not connect to {target}: {source}")]
    Connect { target: Target, source: io::Error },
    #[error("--batch must be 1..={MAX_BATCH}, got {0}")]
    BadBatch(usize),
    #[error("--rate must be a finite number >= 0, got {0}")]
    BadRate(f64),
    #[error("{what} must be {min}..={max} bytes, got {len}")]
    BadField {
        what: &'static str,
        len: usize,
        min: usize,
        max: usize,
    },
    #[error("a {payload} byte payload does not fit in one frame: at most {max} bytes fit with this type and op id (frames are limited to {DEFAULT_MAX_FRAME_BYTES} bytes)")]
    PayloadTooLarge { payload: usize, max: usize },
    #[error("--start-seq must be at least 1")]
    BadStartSeq,
    #[error("could not start the reader thread: {0}")]
    Thread(io::Error),
}

/// How a run ended, which decides `vigil emit`'s exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmitOutcome {
    /// Every event was written (acked or not).
    Complete,
    /// The connection failed (or the input could not be read) before every event was written.
    Incomplete,
    /// The host sent an Error frame.
    HostError,
    /// No connection (refused, missing socket, vsock not allowed).
    ConnectFailed,
    /// The arguments were unusable; nothing was attempted.
    InvalidArguments,
}

/// One PolicyDecision received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecisionReport {
    pub query_id: u64,
    pub decision: String,
    pub reason: String,
}

impl DecisionReport {
    fn from_pb(d: &pb::PolicyDecision) -> Self {
        let decision = pb::policy_decision::Decision::try_from(d.decision).map_or_else(
            |_| format!("UNKNOWN_{}", d.decision),
            |v| v.as_str_name().to_owned(),
        );
        DecisionReport {
            query_id: d.query_id,
            decision,
            reason: d.reason.clone(),
        }
    }

    /// Final answer (anything but HOLD).
    pub fn is_final(&self) -> bool {
        self.decision != "HOLD"
    }
}

/// `{"query_id":N,"decision":"ALLOW|DENY|HOLD","reason":"..."}`
impl fmt::Display for DecisionReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{{\"query_id\":{},\"decision\":{},\"reason\":{}}}",
            self.query_id,
            json_string(&self.decision),
            json_string(&self.reason)
        )
    }
}

/// What a run did. `Display` is the one JSON line `vigil emit` prints:
/// `{"sent":N,"acked_through":N,"elapsed_ms":N,"events_per_sec":F,"error":null}`.
#[derive(Debug, Clone, PartialEq)]
pub struct EmitReport {
    /// Events whose frames were completely written to the socket.
    pub sent: u64,
    /// Highest `Ack.durable_seq` received (0 when none).
    pub acked_through: u64,
    /// From the connection being established until the last event was acked (when every
    /// event was), else until the last event was written.
    pub elapsed: Duration,
    /// `sent / elapsed`.
    pub events_per_sec: f64,
    /// Why the run fell short: a host Error frame (`host error CODE: message`), a failed
    /// connection, or events left unacknowledged when the host closed.
    pub error: Option<String>,
    pub outcome: EmitOutcome,
    /// Every PolicyDecision received, in order.
    pub decisions: Vec<DecisionReport>,
}

impl EmitReport {
    /// The report of a run that never connected.
    pub fn from_failure(err: &ClientError) -> Self {
        let outcome = match err {
            ClientError::VsockNotAllowed { .. }
            | ClientError::Connect { .. }
            | ClientError::Thread(_) => EmitOutcome::ConnectFailed,
            _ => EmitOutcome::InvalidArguments,
        };
        EmitReport {
            sent: 0,
            acked_through: 0,
            elapsed: Duration::ZERO,
            events_per_sec: 0.0,
            error: Some(err.to_string()),
            outcome,
            decisions: Vec::new(),
        }
    }

    /// `vigil emit`'s exit status: 0 when every event was written (acked or not), 1 on a
    /// failure to connect, a host Error frame, or a connection lost before every event was
    /// written, 2 for unusable arguments. Non-zero exactly when `error` is set.
    pub fn exit_code(&self) -> i32 {
        match self.outcome {
            EmitOutcome::Complete => 0,
            EmitOutcome::Incomplete | EmitOutcome::HostError | EmitOutcome::ConnectFailed => 1,
            EmitOutcome::InvalidArguments => 2,
        }
    }
}

impl fmt::Display for EmitReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rate = if self.events_per_sec.is_finite() {
            self.events_per_sec
        } else {
            0.0
        };
        let rate = serde_json::Number::from_f64((rate * 10.0).round() / 10.0)
            .map_or_else(|| "0.0".to_owned(), |n| n.to_string());
        let error = self
            .error
            .as_deref()
            .map_or_else(|| "null".to_owned(), json_string);
        write!(
            f,
            "{{\"sent\":{},\"acked_through\":{},\"elapsed_ms\":{},\"events_per_sec\":{},\"error\":{}}}",
            self.sent,
            self.acked_through,
            self.elapsed.as_millis(),
            rate,
            error
        )
    }
}

fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// Whether this process may connect over AF_VSOCK: the kernel command line carries
/// `vigil_vmtest=1` or `VIGIL_EMIT_ALLOW_VSOCK=1` is set.
pub fn vsock_connect_allowed() -> bool {
    let cmdline = std::fs::read_to_string("/proc/cmdline").ok();
    vsock_allowed_by(
        cmdline.as_deref(),
        std::env::var_os(ALLOW_VSOCK_ENV).as_deref(),
    )
}

/// The rule of [`vsock_connect_allowed`] as a pure function of its two inputs.
pub fn vsock_allowed_by(cmdline: Option<&str>, env: Option<&OsStr>) -> bool {
    let token = cmdline.is_some_and(|c| c.split_whitespace().any(|t| t == VMTEST_CMDLINE_TOKEN));
    token || env == Some(OsStr::new("1"))
}

/// A connected stream socket (Unix or vsock).
#[derive(Debug)]
pub struct Connection {
    fd: OwnedFd,
}

impl Connection {
    /// Writes all of `bytes` with `send(MSG_NOSIGNAL)` (a closed peer is an `EPIPE` error,
    /// never a SIGPIPE), in pieces of at most [`MAX_WRITE_BYTES`].
    pub fn send_all(&self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let n = bytes.len().min(MAX_WRITE_BYTES);
            // SAFETY: the pointer and length describe `n` initialised bytes of `bytes`, which
            // outlives the call; the fd is owned by `self` and open.
            let rc = unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    bytes.as_ptr().cast(),
                    n,
                    libc::MSG_NOSIGNAL,
                )
            };
            if rc < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if rc == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "send wrote 0 bytes",
                ));
            }
            bytes = &bytes[rc as usize..];
        }
        Ok(())
    }

    /// A second handle on the same socket (for a reader thread).
    pub fn try_clone(&self) -> io::Result<Connection> {
        Ok(Connection {
            fd: self.fd.try_clone()?,
        })
    }

    /// Shuts both directions down: a reader blocked on this socket (any handle) wakes up
    /// with end-of-file.
    pub fn shutdown(&self) {
        // SAFETY: plain syscall on an fd owned by `self`; failure (e.g. ENOTCONN after the
        // peer went away) is harmless here.
        unsafe {
            libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR);
        }
    }

    fn into_file(self) -> File {
        File::from(self.fd)
    }
}

/// Connects to `target`. A vsock target is refused unless [`vsock_connect_allowed`].
pub fn connect(target: &Target) -> Result<Connection, ClientError> {
    match target {
        Target::Unix(path) => UnixStream::connect(path)
            .map(|s| Connection {
                fd: OwnedFd::from(s),
            })
            .map_err(|source| ClientError::Connect {
                target: target.clone(),
                source,
            }),
        Target::Vsock(addr) => connect_vsock(*addr),
    }
}

fn connect_vsock(addr: VsockAddr) -> Result<Connection, ClientError> {
    // The safety check comes first, before any AF_VSOCK socket exists.
    if !vsock_connect_allowed() {
        return Err(ClientError::VsockNotAllowed {
            cid: addr.cid,
            port: addr.port,
        });
    }
    let err = |source| ClientError::Connect {
        target: Target::Vsock(addr),
        source,
    };
    // SAFETY: plain syscall; the result is checked before use.
    let raw = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh, valid fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value to fill in.
    let mut sa: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    sa.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    sa.svm_cid = addr.cid;
    sa.svm_port = addr.port;
    VSOCK_CONNECT_ATTEMPTS.fetch_add(1, Ordering::SeqCst);
    // SAFETY: `sa` is a valid sockaddr_vm and the length passed is its size.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            std::ptr::from_ref(&sa).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(Connection { fd })
}

/// What the reader thread tells the sender.
#[derive(Debug)]
enum FromHost {
    Ack(u64),
    Decision(DecisionReport),
    Error(pb::Error),
    /// The host closed (None) or reading failed (Some). Last message.
    Closed(Option<String>),
}

fn reader_loop(conn: Connection, tx: &mpsc::Sender<FromHost>, mut out: impl Write) {
    let mut file = conn.into_file();
    let mut decoder = HostFrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
    let mut buf = vec![0_u8; READ_BUF_BYTES];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => {
                let _ = tx.send(FromHost::Closed(None));
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = tx.send(FromHost::Closed(Some(e.to_string())));
                return;
            }
        };
        let mut stop = false;
        let result = decoder.feed(&buf[..n], &mut |frame: pb::HostFrame| -> Result<(), ()> {
            match frame.kind {
                Some(pb::host_frame::Kind::Ack(ack)) => {
                    let _ = tx.send(FromHost::Ack(ack.durable_seq));
                }
                Some(pb::host_frame::Kind::PolicyDecision(d)) => {
                    let d = DecisionReport::from_pb(&d);
                    // One line per decision, as it arrives (a HOLD's final answer comes later).
                    let _ = writeln!(out, "{d}").and_then(|()| out.flush());
                    let _ = tx.send(FromHost::Decision(d));
                }
                Some(pb::host_frame::Kind::Error(e)) => {
                    let _ = tx.send(FromHost::Error(e));
                    stop = true;
                    return Err(());
                }
                None => {} // a kind from a newer host: ignore
            }
            Ok(())
        });
        if stop {
            return;
        }
        if let Err(e) = result {
            let _ = tx.send(FromHost::Closed(Some(format!(
                "undecodable frame from the host: {e:?}"
            ))));
            return;
        }
    }
}

/// State the sender keeps about the host's side.
#[derive(Debug, Default)]
struct HostState {
    acked_through: u64,
    last_ack_at: Option<Instant>,
    decisions: Vec<DecisionReport>,
    host_error: Option<pb::Error>,
    /// The reader saw end-of-stream or a read error.
    closed: bool,
    /// The read error, when reading failed.
    close_reason: Option<String>,
}

impl HostState {
    fn apply(&mut self, msg: FromHost) {
        match msg {
            FromHost::Ack(seq) => {
                if seq > self.acked_through {
                    self.acked_through = seq;
                    self.last_ack_at = Some(Instant::now());
                }
            }
            FromHost::Decision(d) => self.decisions.push(d),
            FromHost::Error(e) => {
                let code = pb::error::Code::try_from(e.code).map_or_else(
                    |_| format!("CODE_{}", e.code),
                    |c| c.as_str_name().to_owned(),
                );
                eprintln!("vigil emit: host error {code}: {}", e.message);
                self.host_error = Some(e);
            }
            FromHost::Closed(reason) => {
                self.closed = true;
                self.close_reason = reason;
            }
        }
    }

    fn drain(&mut self, rx: &mpsc::Receiver<FromHost>) {
        while let Ok(msg) = rx.try_recv() {
            self.apply(msg);
        }
    }

    fn stopped(&self) -> bool {
        self.host_error.is_some() || self.closed
    }
}

fn host_error_string(e: &pb::Error) -> String {
    let code = pb::error::Code::try_from(e.code).map_or_else(
        |_| format!("CODE_{}", e.code),
        |c| c.as_str_name().to_owned(),
    );
    format!("host error {code}: {}", e.message)
}

/// Where the events come from.
enum Source {
    Generate {
        remaining: u64,
    },
    /// One event per line (`--stdin`, or a test's reader).
    Lines(io::BufReader<Box<dyn Read + Send>>),
}

/// Input buffer for `--stdin`: many lines per read when input is piped from a file.
const STDIN_BUF_BYTES: usize = 64 * 1024;

fn now_unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Fills `payload` with a generated payload of exactly `size` bytes for event `seq`: JSON
/// `{"n":SEQ,"pad":"xx…"}` when that fits, else `size` bytes of text.
fn generate_payload(seq: u64, size: usize, payload: &mut Vec<u8>) -> &'static str {
    payload.clear();
    let _ = write!(payload, "{{\"n\":{seq},\"pad\":\"");
    let overhead = payload.len() + 2;
    if size >= overhead {
        payload.resize(size - 2, b'x');
        payload.extend_from_slice(b"\"}");
        "application/json"
    } else {
        payload.clear();
        payload.resize(size, b'x');
        "text/plain"
    }
}

fn content_type_of_line(line: &[u8]) -> &'static str {
    if serde_json::from_slice::<serde_json::Value>(line).is_ok() {
        "application/json"
    } else {
        "text/plain"
    }
}

/// Largest payload that still fits a frame, given the other fields.
fn max_payload(args: &EmitArgs) -> usize {
    // Prefix (<= 10) + GuestFrame.event key+len (<= 6) + guest_seq (<= 11) + type, op_id,
    // content_type (key + len <= 3 each, content_type <= 16) + payload key+len (<= 4) +
    // guest_time (<= 11).
    let fixed =
        10 + 6 + 11 + (3 + args.event_type.len()) + (3 + args.op_id.len()) + (3 + 16) + 4 + 11;
    DEFAULT_MAX_FRAME_BYTES.saturating_sub(fixed)
}

fn check_args(args: &EmitArgs) -> Result<(), ClientError> {
    args.target()?;
    if args.batch == 0 || args.batch > MAX_BATCH {
        return Err(ClientError::BadBatch(args.batch));
    }
    if !args.rate.is_finite() || args.rate < 0.0 {
        return Err(ClientError::BadRate(args.rate));
    }
    if args.start_seq == 0 {
        return Err(ClientError::BadStartSeq);
    }
    let field = |what, len, min, max| {
        if (min..=max).contains(&len) {
            Ok(())
        } else {
            Err(ClientError::BadField {
                what,
                len,
                min,
                max,
            })
        }
    };
    field(
        "--stream",
        args.stream.as_ref().map_or(1, String::len),
        1,
        MAX_STREAM_ID_BYTES,
    )?;
    field("--type", args.event_type.len(), 1, MAX_EVENT_TYPE_BYTES)?;
    field("--op-id", args.op_id.len(), 0, MAX_OP_ID_BYTES)?;
    if let Some(ask) = &args.ask {
        field("--ask op id", ask.op_id.len(), 0, MAX_OP_ID_BYTES)?;
        field(
            "--ask action",
            ask.action.len(),
            0,
            crate::frame::MAX_ACTION_BYTES,
        )?;
    }
    if args.count.is_some() && args.payload_bytes > max_payload(args) {
        return Err(ClientError::PayloadTooLarge {
            payload: args.payload_bytes,
            max: max_payload(args),
        });
    }
    Ok(())
}

/// Runs `vigil emit`: connects, sends, waits for acks, and reports. Policy decisions are
/// printed to stdout as they arrive. Every outcome, unusable arguments and a refused
/// connection included, is in the report (so the report line always prints; its `error` is
/// set exactly when [`EmitReport::exit_code`] is non-zero); the `Result` is kept for callers
/// that match on it and is never `Err` today.
pub fn run_emit(args: &EmitArgs) -> Result<EmitReport, ClientError> {
    run_emit_with(args, io::stdout(), None)
}

/// [`run_emit`] writing decision lines to `out`, and (when `input` is given) reading the
/// `--stdin` lines from it instead of standard input.
pub fn run_emit_with(
    args: &EmitArgs,
    out: impl Write + Send + 'static,
    input: Option<Box<dyn Read + Send>>,
) -> Result<EmitReport, ClientError> {
    Ok(try_run(args, out, input).unwrap_or_else(|err| EmitReport::from_failure(&err)))
}

fn try_run(
    args: &EmitArgs,
    out: impl Write + Send + 'static,
    input: Option<Box<dyn Read + Send>>,
) -> Result<EmitReport, ClientError> {
    check_args(args)?;
    let conn = connect(&args.target()?)?;
    let source = if args.stdin {
        let input = input.unwrap_or_else(|| Box::new(io::stdin()));
        Source::Lines(io::BufReader::with_capacity(STDIN_BUF_BYTES, input))
    } else {
        Source::Generate {
            remaining: args.count.unwrap_or(0),
        }
    };
    let (tx, rx) = mpsc::channel();
    let reader_conn = conn.try_clone().map_err(ClientError::Thread)?;
    let reader = thread::Builder::new()
        .name("emit-reader".to_owned())
        .spawn(move || reader_loop(reader_conn, &tx, out))
        .map_err(ClientError::Thread)?;

    let mut sender = Sender::new(args, conn, rx);
    let report = sender.run(source);
    sender.conn.shutdown();
    let _ = reader.join();
    Ok(report)
}

struct Sender<'a> {
    args: &'a EmitArgs,
    conn: Connection,
    rx: mpsc::Receiver<FromHost>,
    host: HostState,
    batch: Vec<u8>,
    frames_in_batch: usize,
    events_in_batch: u64,
    sent: u64,
    write_error: Option<io::Error>,
}

impl<'a> Sender<'a> {
    fn new(args: &'a EmitArgs, conn: Connection, rx: mpsc::Receiver<FromHost>) -> Self {
        Sender {
            args,
            conn,
            rx,
            host: HostState::default(),
            batch: Vec::with_capacity(MAX_WRITE_BYTES + DEFAULT_MAX_FRAME_BYTES),
            frames_in_batch: 0,
            events_in_batch: 0,
            sent: 0,
            write_error: None,
        }
    }

    /// Writes the batch. False when the connection is unusable (write failed, host error).
    fn flush(&mut self) -> bool {
        if !self.batch.is_empty() {
            if let Err(e) = self.conn.send_all(&self.batch) {
                self.write_error = Some(e);
                return false;
            }
            self.sent += self.events_in_batch;
        }
        self.batch.clear();
        self.frames_in_batch = 0;
        self.events_in_batch = 0;
        self.host.drain(&self.rx);
        self.host.host_error.is_none()
    }

    /// Adds one frame; flushes first if it would make the write exceed 16 KiB, and after if
    /// the batch is full.
    fn push(&mut self, frame: &pb::GuestFrame, is_event: bool) -> bool {
        let len = frame.encoded_len();
        let framed = len + prost::length_delimiter_len(len);
        if !self.batch.is_empty() && self.batch.len() + framed > MAX_WRITE_BYTES && !self.flush() {
            return false;
        }
        encode_guest_frame(frame, &mut self.batch);
        self.frames_in_batch += 1;
        if is_event {
            self.events_in_batch += 1;
        }
        if self.frames_in_batch >= self.args.batch {
            return self.flush();
        }
        true
    }

    fn hello(&self) -> pb::GuestFrame {
        let args = self.args;
        let claims: HashMap<String, String> = args
            .claims
            .iter()
            .map(|c| (c.key.clone(), c.value.clone()))
            .collect();
        pb::GuestFrame {
            kind: Some(pb::guest_frame::Kind::Hello(pb::Hello {
                protocol_version: PROTOCOL_VERSION,
                stream_id: args
                    .stream
                    .clone()
                    .unwrap_or_else(|| format!("emit-{}", std::process::id())),
                agent_name: args
                    .agent_name
                    .clone()
                    .unwrap_or_else(|| "vigil-emit".to_owned()),
                agent_version: env!("CARGO_PKG_VERSION").to_owned(),
                claims,
            })),
        }
    }

    fn run(&mut self, mut source: Source) -> EmitReport {
        let args = self.args;
        let start = Instant::now();
        let mut input_error: Option<String> = None;
        let mut ok = self.push(&self.hello(), false);
        let mut queries_open = 0_usize;
        if ok {
            if let Some(ask) = &args.ask {
                let query = pb::GuestFrame {
                    kind: Some(pb::guest_frame::Kind::PolicyQuery(pb::PolicyQuery {
                        query_id: 1,
                        op_id: ask.op_id.clone(),
                        action: ask.action.clone(),
                    })),
                };
                ok = self.push(&query, false);
                queries_open = 1;
            }
        }

        let mut frame = pb::GuestFrame {
            kind: Some(pb::guest_frame::Kind::Event(pb::Event {
                r#type: args.event_type.clone(),
                op_id: args.op_id.clone(),
                ..pb::Event::default()
            })),
        };
        let max_payload = max_payload(args);
        let mut index: u64 = 0;
        let mut line = Vec::new();
        while ok {
            let seq = args.start_seq.saturating_add(index);
            // Next payload, or the end of the input.
            match &mut source {
                Source::Generate { remaining } => {
                    if *remaining == 0 {
                        break;
                    }
                    *remaining -= 1;
                    let Some(pb::guest_frame::Kind::Event(event)) = frame.kind.as_mut() else {
                        break;
                    };
                    generate_payload(seq, args.payload_bytes, &mut event.payload)
                        .clone_into(&mut event.content_type);
                }
                Source::Lines(input) => {
                    // The next read may block (a slow or interactive producer): write what
                    // is batched first, so events are not held back waiting for more input.
                    if !input.buffer().contains(&b'\n') && !self.flush() {
                        ok = false;
                        break;
                    }
                    line.clear();
                    match input.read_until(b'\n', &mut line) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) => {
                            input_error = Some(format!("reading stdin failed: {e}"));
                            break;
                        }
                    }
                    if line.last() == Some(&b'\n') {
                        line.pop();
                    }
                    let Some(pb::guest_frame::Kind::Event(event)) = frame.kind.as_mut() else {
                        break;
                    };
                    event.payload.clear();
                    event.payload.extend_from_slice(&line);
                    content_type_of_line(&line).clone_into(&mut event.content_type);
                }
            }
            let Some(pb::guest_frame::Kind::Event(event)) = frame.kind.as_mut() else {
                break;
            };
            if event.payload.len() > max_payload {
                input_error = Some(format!(
                    "input line {} is {} bytes; an event payload may be at most {max_payload}",
                    index + 1,
                    event.payload.len()
                ));
                break;
            }
            event.guest_seq = seq;

            if args.rate > 0.0 {
                let due = start + Duration::from_secs_f64(index as f64 / args.rate);
                let now = Instant::now();
                if due > now {
                    // Don't hold batched events back while waiting.
                    if !self.flush() {
                        ok = false;
                        break;
                    }
                    thread::sleep(due - now);
                }
            }
            if let Some(pb::guest_frame::Kind::Event(event)) = frame.kind.as_mut() {
                event.guest_time_unix_nano = now_unix_nanos();
            }
            ok = self.push(&frame, true);
            index += 1;
        }
        if ok {
            ok = self.flush();
        }
        let sent_all = ok && input_error.is_none();
        let send_done = Instant::now();

        if !ok && self.write_error.is_some() {
            // The host most likely sent an Error frame and closed; give the reader a moment
            // to deliver it so the report names the cause.
            let deadline = Instant::now() + ERROR_FRAME_GRACE;
            while !self.host.stopped() {
                let left = deadline.saturating_duration_since(Instant::now());
                match self.rx.recv_timeout(left) {
                    Ok(msg) => self.host.apply(msg),
                    Err(_) => break,
                }
            }
        }

        // Wait for acks (and final decisions) up to the timeout.
        let last_seq = args.start_seq.saturating_add(self.sent).saturating_sub(1);
        let settled = |host: &HostState| {
            let acked = self.sent == 0 || host.acked_through >= last_seq;
            let decided = host.decisions.iter().filter(|d| d.is_final()).count() >= queries_open;
            acked && decided
        };
        if ok && args.ack_timeout_ms > 0 {
            let deadline = send_done + Duration::from_millis(args.ack_timeout_ms);
            self.host.drain(&self.rx);
            while !settled(&self.host) && !self.host.stopped() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match self.rx.recv_timeout(left) {
                    Ok(msg) => self.host.apply(msg),
                    Err(_) => break,
                }
            }
        }
        self.host.drain(&self.rx);

        let all_acked = self.sent > 0 && self.host.acked_through >= last_seq;
        let end = if all_acked {
            self.host.last_ack_at.unwrap_or(send_done).max(send_done)
        } else {
            send_done
        };
        let elapsed = end.duration_since(start);
        let events_per_sec = if elapsed.is_zero() {
            0.0
        } else {
            self.sent as f64 / elapsed.as_secs_f64()
        };

        let (outcome, error) = if let Some(e) = &self.host.host_error {
            (EmitOutcome::HostError, Some(host_error_string(e)))
        } else if let Some(e) = &self.write_error {
            let detail = self
                .host
                .close_reason
                .as_ref()
                .map_or_else(String::new, |r| format!("; reading: {r}"));
            (
                EmitOutcome::Incomplete,
                Some(format!(
                    "connection lost after {} events were sent: {e}{detail}",
                    self.sent
                )),
            )
        } else if let Some(e) = input_error {
            (EmitOutcome::Incomplete, Some(e))
        } else if !sent_all {
            (
                EmitOutcome::Incomplete,
                Some("sending stopped early".to_owned()),
            )
        } else if self.host.closed && self.sent > 0 && !all_acked {
            // Everything was written, so this is not a failure of the run (exit 0, no
            // `error`); acked_through in the report shows how far the host got.
            let reason = self.host.close_reason.as_deref().unwrap_or("end of stream");
            eprintln!(
                "vigil emit: the host closed the connection ({reason}) with events acked only through {}",
                self.host.acked_through
            );
            (EmitOutcome::Complete, None)
        } else {
            (EmitOutcome::Complete, None)
        };

        EmitReport {
            sent: self.sent,
            acked_through: self.host.acked_through,
            elapsed,
            events_per_sec,
            error,
            outcome,
            decisions: self.host.decisions.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_arguments() {
        assert_eq!(
            "3:7411".parse::<VsockAddr>(),
            Ok(VsockAddr { cid: 3, port: 7411 })
        );
        assert!("3".parse::<VsockAddr>().is_err());
        assert!("x:1".parse::<VsockAddr>().is_err());
        let ask: PolicyAsk = "4bf92f3577b34da6a3ce929d0e0e4736:00f067aa0ba902b7:exec"
            .parse()
            .unwrap();
        assert_eq!(
            ask.op_id,
            "4bf92f3577b34da6a3ce929d0e0e4736:00f067aa0ba902b7"
        );
        assert_eq!(ask.action, "exec");
        let claim: Claim = "image=alpine=3".parse().unwrap();
        assert_eq!(
            (claim.key.as_str(), claim.value.as_str()),
            ("image", "alpine=3")
        );
        assert!("=v".parse::<Claim>().is_err());
    }

    #[test]
    fn generated_payloads_have_the_asked_size() {
        let mut p = Vec::new();
        for size in [0, 1, 5, 19, 20, 21, 64, 1000] {
            let ct = generate_payload(123, size, &mut p);
            assert_eq!(p.len(), size, "size {size}");
            if ct == "application/json" {
                serde_json::from_slice::<serde_json::Value>(&p).unwrap();
            }
        }
        assert_eq!(generate_payload(1, 64, &mut p), "application/json");
    }

    #[test]
    fn vsock_gate_rule() {
        assert!(!vsock_allowed_by(None, None));
        assert!(!vsock_allowed_by(Some("console=ttyS0 quiet"), None));
        assert!(!vsock_allowed_by(Some("vigil_vmtest=10"), None));
        assert!(!vsock_allowed_by(Some("xvigil_vmtest=1"), None));
        assert!(vsock_allowed_by(
            Some("console=ttyS0 vigil_vmtest=1 quiet"),
            None
        ));
        assert!(vsock_allowed_by(None, Some(OsStr::new("1"))));
        assert!(!vsock_allowed_by(None, Some(OsStr::new("0"))));
        assert!(!vsock_allowed_by(None, Some(OsStr::new("yes"))));
    }

    #[test]
    fn report_json_shape() {
        let r = EmitReport {
            sent: 10,
            acked_through: 9,
            elapsed: Duration::from_millis(1500),
            events_per_sec: 6.666_666,
            error: None,
            outcome: EmitOutcome::Complete,
            decisions: Vec::new(),
        };
        assert_eq!(
            r.to_string(),
            r#"{"sent":10,"acked_through":9,"elapsed_ms":1500,"events_per_sec":6.7,"error":null}"#
        );
        let r = EmitReport {
            error: Some("host error UNREGISTERED: who \"are\" you".into()),
            ..r
        };
        let v: serde_json::Value = serde_json::from_str(&r.to_string()).unwrap();
        assert_eq!(v["error"], "host error UNREGISTERED: who \"are\" you");
        let d = DecisionReport {
            query_id: 1,
            decision: "DENY".into(),
            reason: "fail-closed".into(),
        };
        assert_eq!(
            d.to_string(),
            r#"{"query_id":1,"decision":"DENY","reason":"fail-closed"}"#
        );
    }
}
