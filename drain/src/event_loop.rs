//! The drain loop: one thread (`vigil-drain`) owning one io_uring instance with multishot
//! accept on every listener, multishot recv per connection into the provided-buffer ring, a
//! hang-up poll per connection, io_uring sends for host frames, and an eventfd read that wakes
//! it for commands. It owns the connection table, the drain's copy of the cell registry and
//! the per-connection back-pressure; [`spawn`] starts it and [`DrainHandle`] talks to it.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use vigil_wire::frame::FrameDecoder;
use vigil_wire::pb;

use crate::bufring::{BufRing, BufRingError, BUF_GROUP};
use crate::cell::{CellInfo, CellSlot, CellSpec};
use crate::output::{ConnId, DrainCommand, DrainOutput, HandoffCredit, Peer};
use crate::protocol::{self, Session};
use crate::reject_log::RejectLog;
use crate::stats::{CloseReason, DrainStats, RejectReason};
use crate::sys::{self, EventFd, SysError};

/// Capacity of the hand-off channel, in outputs (mostly one batch per received chunk, ≤ 8 KiB
/// of frames each). 1,024 chunks cover a journal fsync stall of several milliseconds at a
/// million frames per second. When full, connections with something to hand off stop being
/// read (their guests feel it as socket/vsock back-pressure); nothing is dropped.
pub const HANDOFF_CAPACITY: usize = 1024;

/// Batches one connection may have in the hand-off channel or held by the consumer at once.
/// A quarter of the channel: a flooding guest can never take more, so the other three
/// quarters stay open to every other connection. At the quota, that connection alone is
/// paused until the consumer drops some of its batches.
pub const CONN_HANDOFF_QUOTA: u32 = (HANDOFF_CAPACITY / 4) as u32;

/// Capacity of the command channel. Commands are mostly acks (one per journal commit per
/// connection); 4,096 absorbs a commit of every stream of a thousand guests. When full, the
/// sender blocks until the drain thread has taken some (it wakes on the eventfd each time).
pub const COMMAND_CAPACITY: usize = 4096;

/// Cells the drain can hold at once (a host runs at most a few thousand guests; the registry
/// allows the same number, so a registered cell is never refused here). Beyond it, `AddCell`
/// is refused with [`DrainOutput::CellError`].
pub const MAX_CELLS: usize = 16_384;

/// Longest the loop sleeps with nothing to do. Each wake stamps
/// [`DrainStats::last_loop_mono_ns`], so "the drain has not run for several of these" means
/// stalled, never merely idle. Ten empty wakes a second cost a few microseconds each.
pub const IDLE_WAKE_NS: u64 = 100_000_000;

/// Connections the drain holds at once: 1,000 guests × 16 streams. Beyond it, new connections
/// are accepted and closed at once (counted as `TooManyConnections`).
pub const MAX_CONNECTIONS: usize = 16_384;

/// Submission queue entries. Each loop turn pushes at most a few SQEs per active connection;
/// when the queue fills mid-turn it is submitted and reused, so this bounds syscalls, not
/// connections. The completion queue is four times larger (multishot ops post many CQEs).
pub const RING_ENTRIES: u32 = 1024;

/// Wait while something is pending (a held batch, a hang-up being confirmed): the loop
/// retries hand-offs this often. Short enough to follow a consumer that catches up, long
/// enough not to spin.
pub const RETRY_INTERVAL_NS: u64 = 1_000_000;

/// After a hang-up poll fires with nothing left to read, how long to wait for the recv's own
/// EOF before closing anyway (AF_UNIX multishot recv sometimes never posts EOF).
pub const HUP_GRACE_NS: u64 = 20_000_000;

/// How long a shutdown waits for error frames to be sent and held outputs to be taken before
/// the loop exits regardless.
pub const SHUTDOWN_GRACE_NS: u64 = 2_000_000_000;

/// How long a closing connection may take to send its last frames (the Error frame, queued
/// acks) before it is shut down anyway; a guest that stops reading cannot hold it open.
pub const CLOSE_SEND_GRACE_NS: u64 = 5_000_000_000;

/// How long the exiting loop waits for the consumer to take each output still held.
const FINAL_SEND_TIMEOUT: Duration = Duration::from_millis(200);

/// Refused-connection outputs held while the hand-off channel is full; beyond it they are
/// dropped (each refusal is still counted in [`DrainStats`]).
pub const REJECT_BACKLOG_CAPACITY: usize = 1024;

/// Pause before re-arming an accept that ended with an error other than `EINTR` (e.g.
/// `EMFILE`), so a persistent error does not spin the loop.
const ACCEPT_RETRY_NS: u64 = 10_000_000;

// user_data layout: tag in bits 56..64, generation (low 24 bits) in 32..56, slot in 0..32.
const TAG_ACCEPT: u64 = 1;
const TAG_RECV: u64 = 2;
const TAG_POLL: u64 = 3;
const TAG_SEND: u64 = 4;
const TAG_WAKE: u64 = 5;
const TAG_CANCEL: u64 = 6;
const GEN_MASK: u32 = 0x00FF_FFFF;

fn user_data(tag: u64, generation: u32, slot: u32) -> u64 {
    (tag << 56) | (u64::from(generation & GEN_MASK) << 32) | u64::from(slot)
}

fn split_user_data(ud: u64) -> (u64, u32, u32) {
    (ud >> 56, ((ud >> 32) as u32) & GEN_MASK, ud as u32)
}

/// Errors of the drain loop.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error("could not create the io_uring instance")]
    Ring(#[source] std::io::Error),
    #[error("could not set up the provided-buffer ring")]
    BufRing(#[source] BufRingError),
    #[error("could not create the wake eventfd")]
    Wake(#[source] SysError),
    #[error("could not open the hybrid-vsock listener of cell {cell_id}")]
    Listener {
        cell_id: String,
        #[source]
        source: SysError,
    },
    #[error("cell {cell_id} claims CID {cid}, which is already registered to cell {other}")]
    CidTaken {
        cell_id: String,
        cid: u32,
        other: String,
    },
    #[error("the drain already holds {max} cells, so cell {cell_id} was not added")]
    TooManyCells { cell_id: String, max: usize },
    #[error("could not start the drain thread")]
    Thread(#[source] std::io::Error),
    #[error("the drain thread stopped before it finished starting")]
    StartupLost,
    #[error("the drain thread is no longer running, so the command was not delivered")]
    Stopped,
    #[error("the drain thread panicked")]
    Panicked,
    #[error("io_uring submit failed in the drain loop")]
    Submit(#[source] std::io::Error),
}

/// Configuration of the drain loop.
#[derive(Debug, Clone)]
pub struct DrainConfig {
    /// The vsock port guests connect to (also the `_P` suffix of hybrid listeners).
    pub port: u32,
    /// Whether to listen on AF_VSOCK (QEMU/KVM cells). When the host has no vsock transport
    /// the bind error is kept in [`DrainHandle::vsock_error`] and the Unix listeners run on.
    pub listen_vsock: bool,
    /// Largest frame accepted (bigger ones close the connection with FRAME_TOO_LARGE).
    pub max_frame_bytes: usize,
    /// How long a new connection may stay without a Hello before it is closed.
    pub hello_timeout: Duration,
    /// Answer every policy query DENY on the drain thread (until op-control exists).
    pub deny_policy_queries_inline: bool,
}

impl DrainConfig {
    /// Defaults for `port`: vsock on, wire's default frame limit, 10 s Hello timeout,
    /// policy queries handed to the caller.
    pub fn new(port: u32) -> Self {
        Self {
            port,
            listen_vsock: true,
            max_frame_bytes: vigil_wire::frame::DEFAULT_MAX_FRAME_BYTES,
            hello_timeout: Duration::from_secs(10),
            deny_policy_queries_inline: false,
        }
    }
}

/// Sends commands to the drain loop and wakes it. Cheap to clone.
#[derive(Clone)]
pub struct DrainCommander {
    tx: Sender<DrainCommand>,
    wake: Arc<EventFd>,
}

impl DrainCommander {
    /// Queues `cmd` (blocking while the command channel is full) and wakes the loop.
    pub fn send(&self, cmd: DrainCommand) -> Result<(), DrainError> {
        self.tx.send(cmd).map_err(|_| DrainError::Stopped)?;
        self.wake.wake();
        Ok(())
    }

    /// Wakes the loop without a command (an op-control gate has updates to apply).
    pub fn wake(&self) {
        self.wake.wake();
    }
}

/// The running drain: its command sender, output receiver, counters and thread.
pub struct DrainHandle {
    commander: DrainCommander,
    outputs: Receiver<DrainOutput>,
    stats: Arc<DrainStats>,
    vsock_error: Option<SysError>,
    thread: Option<JoinHandle<Result<(), DrainError>>>,
}

impl DrainHandle {
    /// A sender of commands into the loop.
    pub fn commander(&self) -> DrainCommander {
        self.commander.clone()
    }

    /// Shortcut for `commander().send(cmd)`.
    pub fn send(&self, cmd: DrainCommand) -> Result<(), DrainError> {
        self.commander.send(cmd)
    }

    /// The hand-off channel (batches and connection events, in order per connection).
    pub fn outputs(&self) -> &Receiver<DrainOutput> {
        &self.outputs
    }

    /// The drain's counters.
    pub fn stats(&self) -> &Arc<DrainStats> {
        &self.stats
    }

    /// Why the AF_VSOCK listener could not be opened, if it could not (log it once).
    pub fn vsock_error(&self) -> Option<&SysError> {
        self.vsock_error.as_ref()
    }

    /// Asks the loop to shut down, collects every output it still hands off (so nothing held
    /// is lost) and joins the thread.
    pub fn shutdown(mut self) -> Result<Vec<DrainOutput>, DrainError> {
        let mut rest = Vec::new();
        // A stopped loop has already dropped its receiver; that is fine here.
        let _ = self.commander.send(DrainCommand::Shutdown);
        while let Ok(out) = self.outputs.recv() {
            rest.push(out);
        }
        let thread = self.thread.take();
        match thread.map(JoinHandle::join) {
            Some(Ok(result)) => result.map(|()| rest),
            Some(Err(_)) => Err(DrainError::Panicked),
            None => Ok(rest),
        }
    }
}

impl Drop for DrainHandle {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.commander.send(DrainCommand::Shutdown);
            while self.outputs.recv().is_ok() {}
            let _ = thread.join();
        }
    }
}

/// Starts the drain thread `vigil-drain` with `cells` registered. Returns once the ring, the
/// buffer ring and every listener are set up (errors are returned here, except the vsock
/// listener's, which is kept in [`DrainHandle::vsock_error`]).
pub fn spawn(config: DrainConfig, cells: Vec<CellSpec>) -> Result<DrainHandle, DrainError> {
    spawn_with_gate(config, cells, None)
}

/// [`spawn`], with an op-control gate that answers policy queries on the drain thread.
pub fn spawn_with_gate(
    config: DrainConfig,
    cells: Vec<CellSpec>,
    gate: Option<Box<dyn crate::policy::PolicyGate>>,
) -> Result<DrainHandle, DrainError> {
    let (out_tx, out_rx) = crossbeam_channel::bounded(HANDOFF_CAPACITY);
    let (cmd_tx, cmd_rx) = crossbeam_channel::bounded(COMMAND_CAPACITY);
    let wake = Arc::new(EventFd::new().map_err(DrainError::Wake)?);
    let stats = Arc::new(DrainStats::default());
    let (init_tx, init_rx) = crossbeam_channel::bounded(1);
    let thread = {
        let wake = Arc::clone(&wake);
        let stats = Arc::clone(&stats);
        std::thread::Builder::new()
            .name("vigil-drain".into())
            .spawn(move || {
                let drain = Drain::new(config, cells, out_tx, cmd_rx, wake, stats);
                match drain {
                    Ok((mut drain, vsock_error)) => {
                        drain.gate = gate;
                        let _ = init_tx.send(Ok(vsock_error));
                        drain.run()
                    }
                    Err(e) => {
                        let _ = init_tx.send(Err(e));
                        Ok(())
                    }
                }
            })
            .map_err(DrainError::Thread)?
    };
    match init_rx.recv() {
        Ok(Ok(vsock_error)) => Ok(DrainHandle {
            commander: DrainCommander { tx: cmd_tx, wake },
            outputs: out_rx,
            stats,
            vsock_error,
            thread: Some(thread),
        }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => {
            let _ = thread.join();
            Err(DrainError::StartupLost)
        }
    }
}

enum ListenerKind {
    Vsock,
    Unix { cell: u32, path: PathBuf },
}

struct Listener {
    fd: OwnedFd,
    generation: u32,
    kind: ListenerKind,
    armed: bool,
    closing: bool,
    rearm_at: Option<u64>,
}

struct Cell {
    info: Arc<CellInfo>,
    spec: CellSpec,
    listener: Option<u32>,
}

struct Conn {
    id: ConnId,
    fd: OwnedFd,
    session: Session,
    recv_armed: bool,
    recv_cancelled: bool,
    poll_armed: bool,
    send_inflight: bool,
    /// Bytes being sent by the in-flight Send (stable while it is in flight).
    send_buf: Vec<u8>,
    send_off: usize,
    /// Bytes queued behind the in-flight Send.
    send_queue: Vec<u8>,
    /// Outputs not yet taken by the hand-off channel, in order.
    pending: VecDeque<DrainOutput>,
    credits: Arc<AtomicU32>,
    closing: Option<CloseReason>,
    shut: bool,
    closed_queued: bool,
    hup_seen_ns: Option<u64>,
    /// When the drain first worked on closing this connection.
    close_started_ns: Option<u64>,
    in_service: bool,
}

impl Conn {
    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn queue_host_frame(&mut self, frame: &pb::HostFrame, stats: &DrainStats) {
        vigil_wire::frame::encode_host_frame(frame, &mut self.send_queue);
        DrainStats::add(&stats.host_frames_sent, 1);
    }

    fn wants_recv(&self) -> bool {
        self.closing.is_none()
            && self.pending.is_empty()
            && self.credits.load(Ordering::Acquire) < CONN_HANDOFF_QUOTA
    }
}

struct Drain {
    // Field order matters: the ring is dropped before the buffer ring it uses.
    ring: IoUring,
    bufs: BufRing,
    config: DrainConfig,
    stats: Arc<DrainStats>,
    out: Sender<DrainOutput>,
    cmds: Receiver<DrainCommand>,
    wake: Arc<EventFd>,
    wake_buf: Box<u64>,
    cells: Vec<Option<Cell>>,
    cid_map: HashMap<u32, u32>,
    listeners: Vec<Option<Listener>>,
    listener_gens: Vec<u32>,
    conns: Vec<Option<Box<Conn>>>,
    conn_gens: Vec<u32>,
    free_conns: Vec<u32>,
    live_conns: usize,
    service: Vec<u32>,
    awaiting_hello: VecDeque<(ConnId, u64)>,
    reject_log: RejectLog,
    reject_backlog: VecDeque<DrainOutput>,
    cqes: Vec<(u64, i32, u32)>,
    /// Submission entries that did not fit in the submission queue (unbounded in principle,
    /// bounded in practice by the ops per connection: at most one recv, poll, send and two
    /// cancels each).
    sq_backlog: VecDeque<squeue::Entry>,
    shutdown_deadline: Option<u64>,
    consumer_gone: bool,
    /// The op-control gate answering policy queries on this thread, if the daemon has one.
    gate: Option<Box<dyn crate::policy::PolicyGate>>,
    released: Vec<crate::policy::GateRelease>,
}

/// Tells a refused guest why in one `Error` frame before its connection is closed. The
/// socket is new and its send buffer empty, so a non-blocking send of a few dozen bytes goes
/// through; if it does not, the guest only sees the close (nothing else depends on it).
fn send_refusal(fd: &OwnedFd, reason: RejectReason) {
    let (code, message) = match reason {
        RejectReason::UnregisteredCid => (
            pb::error::Code::Unregistered,
            "this guest's CID is not registered with vigil on this host",
        ),
        RejectReason::TooManyConnections => (
            pb::error::Code::ShuttingDown,
            "vigil has too many open guest connections; try again later",
        ),
        RejectReason::NoPeerAddress => (
            pb::error::Code::Unregistered,
            "vigil could not read this connection's peer address",
        ),
    };
    let frame = pb::HostFrame {
        kind: Some(pb::host_frame::Kind::Error(pb::Error {
            code: code as i32,
            message: message.to_owned(),
        })),
    };
    let mut buf = Vec::new();
    vigil_wire::frame::encode_host_frame(&frame, &mut buf);
    // SAFETY: `fd` is an open socket we own; `buf` is valid for `buf.len()` bytes for the call.
    let _ = unsafe {
        libc::send(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
}

fn build_ring() -> Result<IoUring, DrainError> {
    let mut builder = IoUring::builder();
    builder
        .setup_cqsize(RING_ENTRIES * 4)
        .setup_single_issuer()
        .setup_defer_taskrun();
    match builder.build(RING_ENTRIES) {
        Ok(ring) => Ok(ring),
        // Kernels before 6.1 lack DEFER_TASKRUN; the plain ring works the same, a bit slower.
        Err(_) => IoUring::builder()
            .setup_cqsize(RING_ENTRIES * 4)
            .build(RING_ENTRIES)
            .map_err(DrainError::Ring),
    }
}

fn error_frame(code: pb::error::Code, message: &str) -> pb::HostFrame {
    pb::HostFrame {
        kind: Some(pb::host_frame::Kind::Error(pb::Error {
            code: code as i32,
            message: message.to_owned(),
        })),
    }
}

impl Drain {
    fn new(
        config: DrainConfig,
        cells: Vec<CellSpec>,
        out: Sender<DrainOutput>,
        cmds: Receiver<DrainCommand>,
        wake: Arc<EventFd>,
        stats: Arc<DrainStats>,
    ) -> Result<(Self, Option<SysError>), DrainError> {
        let ring = build_ring()?;
        let bufs = BufRing::register(&ring.submitter()).map_err(DrainError::BufRing)?;
        let mut drain = Self {
            ring,
            bufs,
            config,
            stats,
            out,
            cmds,
            wake,
            wake_buf: Box::new(0),
            cells: Vec::new(),
            cid_map: HashMap::new(),
            listeners: Vec::new(),
            listener_gens: Vec::new(),
            conns: Vec::new(),
            conn_gens: Vec::new(),
            free_conns: Vec::new(),
            live_conns: 0,
            service: Vec::new(),
            awaiting_hello: VecDeque::new(),
            reject_log: RejectLog::default(),
            reject_backlog: VecDeque::new(),
            cqes: Vec::with_capacity(RING_ENTRIES as usize * 4),
            sq_backlog: VecDeque::new(),
            shutdown_deadline: None,
            consumer_gone: false,
            gate: None,
            released: Vec::new(),
        };
        let mut vsock_error = None;
        if drain.config.listen_vsock {
            match sys::vsock_listener(drain.config.port) {
                Ok(fd) => {
                    drain.add_listener(fd, ListenerKind::Vsock);
                }
                Err(e) => vsock_error = Some(e),
            }
        }
        for spec in cells {
            drain.add_cell(spec)?;
        }
        drain.arm_wake();
        Ok((drain, vsock_error))
    }

    fn try_push(&mut self, entry: &squeue::Entry) -> bool {
        // SAFETY: every buffer an entry points to (send buffers, the wake buffer, the buffer
        // ring) lives in `self` and stays put until its completion arrives: a connection with
        // an op in flight (or queued in `sq_backlog`) is never freed.
        if unsafe { self.ring.submission().push(entry) }.is_ok() {
            return true;
        }
        // Queue full: hand what is queued to the kernel and retry once. If the kernel cannot
        // take it now (e.g. EBUSY while completions overflow), the entry waits in the backlog.
        let _ = self.ring.submit();
        // SAFETY: as above.
        unsafe { self.ring.submission().push(entry) }.is_ok()
    }

    fn push(&mut self, entry: &squeue::Entry) {
        if self.sq_backlog.is_empty() && self.try_push(entry) {
            return;
        }
        self.sq_backlog.push_back(entry.clone());
    }

    /// Moves entries that did not fit into the submission queue, in order.
    fn flush_sq_backlog(&mut self) {
        while let Some(entry) = self.sq_backlog.pop_front() {
            if !self.try_push(&entry) {
                self.sq_backlog.push_front(entry);
                return;
            }
        }
    }

    fn arm_wake(&mut self) {
        let ptr = std::ptr::from_mut(&mut *self.wake_buf).cast::<u8>();
        let entry = opcode::Read::new(types::Fd(self.wake.raw()), ptr, 8)
            .build()
            .user_data(user_data(TAG_WAKE, 0, 0));
        self.push(&entry);
    }

    // ---- listeners and cells --------------------------------------------------------------

    fn add_listener(&mut self, fd: OwnedFd, kind: ListenerKind) -> u32 {
        let slot = if let Some(i) = self.listeners.iter().position(Option::is_none) {
            i
        } else {
            self.listeners.push(None);
            self.listener_gens.push(0);
            self.listeners.len() - 1
        };
        let generation = self.listener_gens[slot];
        self.listeners[slot] = Some(Listener {
            fd,
            generation,
            kind,
            armed: false,
            closing: false,
            rearm_at: None,
        });
        self.arm_accept(slot as u32);
        slot as u32
    }

    fn arm_accept(&mut self, slot: u32) {
        let Some(l) = self.listeners[slot as usize].as_mut() else {
            return;
        };
        if l.armed || l.closing {
            return;
        }
        l.armed = true;
        l.rearm_at = None;
        let entry = opcode::AcceptMulti::new(types::Fd(l.fd.as_raw_fd()))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(user_data(TAG_ACCEPT, l.generation, slot));
        self.push(&entry);
    }

    fn close_listener(&mut self, slot: u32) {
        let Some(l) = self.listeners[slot as usize].as_mut() else {
            return;
        };
        if let ListenerKind::Unix { path, .. } = &l.kind {
            // Removing the file first makes new connects fail at once.
            let _ = std::fs::remove_file(path);
        }
        l.closing = true;
        if l.armed {
            let target = user_data(TAG_ACCEPT, l.generation, slot);
            let entry = opcode::AsyncCancel::new(target)
                .build()
                .user_data(user_data(TAG_CANCEL, 0, 0));
            self.push(&entry);
        } else {
            self.free_listener(slot);
        }
    }

    fn free_listener(&mut self, slot: u32) {
        self.listeners[slot as usize] = None;
        self.listener_gens[slot as usize] = (self.listener_gens[slot as usize] + 1) & GEN_MASK;
    }

    fn add_cell(&mut self, spec: CellSpec) -> Result<(), DrainError> {
        if let Some(index) = self.find_cell(&spec.cell_id) {
            self.remove_cell(index);
        }
        if let Some(cid) = spec.cid {
            if let Some(&other) = self.cid_map.get(&cid) {
                let other = self.cells[other as usize]
                    .as_ref()
                    .map(|c| c.spec.cell_id.clone())
                    .unwrap_or_default();
                return Err(DrainError::CidTaken {
                    cell_id: spec.cell_id,
                    cid,
                    other,
                });
            }
        }
        let index = match self.cells.iter().position(Option::is_none) {
            Some(i) => i,
            None if self.cells.len() < MAX_CELLS => {
                self.cells.push(None);
                self.cells.len() - 1
            }
            None => {
                return Err(DrainError::TooManyCells {
                    cell_id: spec.cell_id,
                    max: MAX_CELLS,
                })
            }
        } as u32;
        let listener_fd = match &spec.uds_path {
            Some(base) => {
                let path = vigil_wire::hybrid_listener_path(base, self.config.port);
                let fd = sys::unix_listener(&path).map_err(|source| DrainError::Listener {
                    cell_id: spec.cell_id.clone(),
                    source,
                })?;
                Some((fd, path))
            }
            None => None,
        };
        let info = Arc::new(CellInfo {
            index,
            cell_id: Arc::from(spec.cell_id.as_str()),
            run_id: Arc::from(spec.run_id.as_str()),
        });
        if let Some(cid) = spec.cid {
            self.cid_map.insert(cid, index);
        }
        let listener = listener_fd
            .map(|(fd, path)| self.add_listener(fd, ListenerKind::Unix { cell: index, path }));
        self.cells[index as usize] = Some(Cell {
            info,
            spec,
            listener,
        });
        Ok(())
    }

    fn find_cell(&self, cell_id: &str) -> Option<u32> {
        self.cells
            .iter()
            .position(|c| c.as_ref().is_some_and(|c| c.spec.cell_id == cell_id))
            .map(|i| i as u32)
    }

    fn remove_cell(&mut self, index: u32) {
        let Some(cell) = self.cells[index as usize].take() else {
            return;
        };
        if let Some(cid) = cell.spec.cid {
            self.cid_map.remove(&cid);
        }
        if let Some(l) = cell.listener {
            self.close_listener(l);
        }
        let slots: Vec<u32> = self
            .conns
            .iter()
            .filter_map(|c| c.as_ref())
            .filter(|c| Arc::ptr_eq(&c.session.cell, &cell.info))
            .map(|c| c.id.slot)
            .collect();
        for slot in slots {
            self.close_with_error(
                slot,
                CloseReason::CellRemoved,
                pb::error::Code::Unregistered,
                "the cell was removed from this host",
            );
        }
    }

    // ---- connections ----------------------------------------------------------------------

    fn conn_mut(&mut self, slot: u32, generation: u32) -> Option<&mut Conn> {
        match self.conns.get_mut(slot as usize) {
            Some(Some(c)) if c.id.generation & GEN_MASK == generation => Some(c),
            _ => None,
        }
    }

    fn conn_by_id(&mut self, id: ConnId) -> Option<&mut Conn> {
        self.conn_mut(id.slot, id.generation & GEN_MASK)
    }

    fn mark_service(&mut self, slot: u32) {
        if let Some(Some(c)) = self.conns.get_mut(slot as usize) {
            if !c.in_service {
                c.in_service = true;
                self.service.push(slot);
            }
        }
    }

    fn reject(&mut self, reason: RejectReason, peer: Peer, now: u64) {
        self.stats.count_reject(reason);
        let log = match (&peer, reason) {
            (Peer::Vsock { cid: Some(cid) }, RejectReason::UnregisteredCid) => {
                self.reject_log.should_log(*cid, now)
            }
            _ => true,
        };
        if log {
            tracing::warn!(?reason, ?peer, "refused a guest connection");
        } else {
            DrainStats::add(&self.stats.reject_logs_suppressed, 1);
        }
        self.emit_unowned(DrainOutput::Rejected { reason, peer });
    }

    /// Hands off an output that belongs to no connection (refusals, cell errors), keeping it
    /// in a bounded backlog while the channel is full.
    fn emit_unowned(&mut self, out: DrainOutput) {
        if self.reject_backlog.is_empty() {
            match self.out.try_send(out) {
                Ok(()) => {}
                Err(TrySendError::Full(out)) => self.reject_backlog.push_back(out),
                Err(TrySendError::Disconnected(_)) => self.consumer_gone = true,
            }
        } else if self.reject_backlog.len() < REJECT_BACKLOG_CAPACITY {
            self.reject_backlog.push_back(out);
        }
    }

    fn on_accept(&mut self, slot: u32, generation: u32, res: i32, flags: u32, now: u64) {
        let more = cqueue::more(flags);
        let Some(l) = self
            .listeners
            .get_mut(slot as usize)
            .and_then(Option::as_mut)
        else {
            if res >= 0 {
                // SAFETY: `res` is a new fd from accept that nobody else owns.
                drop(unsafe { OwnedFd::from_raw_fd(res) });
            }
            return;
        };
        if l.generation != generation {
            if res >= 0 {
                // SAFETY: as above.
                drop(unsafe { OwnedFd::from_raw_fd(res) });
            }
            return;
        }
        if !more {
            l.armed = false;
        }
        if res < 0 {
            if l.closing {
                if !l.armed {
                    self.free_listener(slot);
                }
                return;
            }
            if res == -libc::EINTR || res == -libc::ECANCELED {
                DrainStats::add(&self.stats.accept_rearms, 1);
                self.arm_accept(slot);
            } else if !l.armed {
                tracing::warn!(
                    errno = -res,
                    "multishot accept ended with an error; retrying"
                );
                l.rearm_at = Some(now + ACCEPT_RETRY_NS);
            }
            return;
        }
        // SAFETY: `res` is a new fd from accept that nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(res) };
        let closing = l.closing;
        let identity = match &l.kind {
            ListenerKind::Vsock => match sys::vsock_peer_cid(fd.as_raw_fd()) {
                Ok(cid) => self.cid_map.get(&cid).copied().ok_or((
                    RejectReason::UnregisteredCid,
                    Peer::Vsock { cid: Some(cid) },
                )),
                Err(_) => Err((RejectReason::NoPeerAddress, Peer::Vsock { cid: None })),
            },
            ListenerKind::Unix { cell, path } => {
                if self.live_conns >= MAX_CONNECTIONS {
                    Err((
                        RejectReason::TooManyConnections,
                        Peer::Unix { path: path.clone() },
                    ))
                } else {
                    Ok(*cell)
                }
            }
        };
        if !more && !closing {
            DrainStats::add(&self.stats.accept_rearms, 1);
            self.arm_accept(slot);
        }
        if closing {
            return;
        }
        let cell = match identity {
            Ok(_) if self.live_conns >= MAX_CONNECTIONS => {
                let cid = sys::vsock_peer_cid(fd.as_raw_fd()).ok();
                self.reject(RejectReason::TooManyConnections, Peer::Vsock { cid }, now);
                return;
            }
            Ok(cell) => cell,
            Err((reason, peer)) => {
                send_refusal(&fd, reason);
                self.reject(reason, peer, now);
                return;
            }
        };
        let Some(cell) = self.cells[cell as usize].as_ref() else {
            return;
        };
        let info = Arc::clone(&cell.info);
        let cell_slot = Arc::clone(&cell.spec.slot);
        self.open_conn(fd, info, cell_slot, now);
    }

    fn open_conn(&mut self, fd: OwnedFd, cell: Arc<CellInfo>, slot: Arc<CellSlot>, now: u64) {
        let index = if let Some(i) = self.free_conns.pop() {
            i
        } else {
            self.conns.push(None);
            self.conn_gens.push(0);
            (self.conns.len() - 1) as u32
        };
        let id = ConnId {
            slot: index,
            generation: self.conn_gens[index as usize],
        };
        slot.connections.fetch_add(1, Ordering::Relaxed);
        DrainStats::add(&self.stats.accepted, 1);
        let mut conn = Box::new(Conn {
            id,
            fd,
            session: Session {
                conn: id,
                cell: Arc::clone(&cell),
                slot,
                decoder: FrameDecoder::new(self.config.max_frame_bytes),
                stream_id: None,
            },
            recv_armed: false,
            recv_cancelled: false,
            poll_armed: false,
            send_inflight: false,
            send_buf: Vec::new(),
            send_off: 0,
            send_queue: Vec::new(),
            pending: VecDeque::new(),
            credits: Arc::new(AtomicU32::new(0)),
            closing: None,
            shut: false,
            closed_queued: false,
            hup_seen_ns: None,
            close_started_ns: None,
            in_service: false,
        });
        conn.pending
            .push_back(DrainOutput::Connected { conn: id, cell });
        self.conns[index as usize] = Some(conn);
        self.live_conns += 1;
        let hello_deadline = now + self.config.hello_timeout.as_nanos() as u64;
        self.awaiting_hello.push_back((id, hello_deadline));
        self.arm_poll(index);
        self.mark_service(index);
    }

    fn arm_recv(&mut self, slot: u32) {
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else {
            return;
        };
        if c.recv_armed || !c.wants_recv() {
            return;
        }
        c.recv_armed = true;
        c.recv_cancelled = false;
        let entry = opcode::RecvMulti::new(types::Fd(c.raw()), BUF_GROUP)
            .build()
            .user_data(user_data(TAG_RECV, c.id.generation, slot));
        self.push(&entry);
    }

    fn cancel_recv(&mut self, slot: u32) {
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else {
            return;
        };
        if !c.recv_armed || c.recv_cancelled {
            return;
        }
        c.recv_cancelled = true;
        let target = user_data(TAG_RECV, c.id.generation, slot);
        let entry = opcode::AsyncCancel::new(target)
            .build()
            .user_data(user_data(TAG_CANCEL, 0, 0));
        self.push(&entry);
    }

    fn arm_poll(&mut self, slot: u32) {
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else {
            return;
        };
        if c.poll_armed || c.closing.is_some() {
            return;
        }
        c.poll_armed = true;
        let mask = (libc::POLLRDHUP | libc::POLLHUP) as u32;
        let entry = opcode::PollAdd::new(types::Fd(c.raw()), mask)
            .build()
            .user_data(user_data(TAG_POLL, c.id.generation, slot));
        self.push(&entry);
    }

    fn arm_send(&mut self, slot: u32) {
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else {
            return;
        };
        if c.send_inflight {
            return;
        }
        if c.send_off >= c.send_buf.len() {
            if c.send_queue.is_empty() {
                return;
            }
            c.send_buf.clear();
            std::mem::swap(&mut c.send_buf, &mut c.send_queue);
            c.send_off = 0;
        }
        c.send_inflight = true;
        let rest = &c.send_buf[c.send_off..];
        let entry = opcode::Send::new(types::Fd(c.raw()), rest.as_ptr(), rest.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(user_data(TAG_SEND, c.id.generation, slot));
        self.push(&entry);
    }

    /// Queues one Error frame and starts closing the connection with `reason`.
    fn close_with_error(
        &mut self,
        slot: u32,
        reason: CloseReason,
        code: pb::error::Code,
        message: &str,
    ) {
        let stats = Arc::clone(&self.stats);
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else {
            return;
        };
        if c.closing.is_some() {
            return;
        }
        c.queue_host_frame(&error_frame(code, message), &stats);
        self.begin_close(slot, reason);
    }

    fn begin_close(&mut self, slot: u32, reason: CloseReason) {
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else {
            return;
        };
        if c.closing.is_some() {
            return;
        }
        c.closing = Some(reason);
        self.stats.count_close(reason);
        self.arm_send(slot);
        self.mark_service(slot);
    }

    /// Moves a closing connection on: once its sends are done, shut it down and cancel its
    /// ops; once every op has completed and every output is handed off, free it.
    fn advance_close(&mut self, slot: u32, now: u64) -> bool {
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else {
            return true;
        };
        let Some(reason) = c.closing else {
            return false;
        };
        let sends_done = !c.send_inflight && c.send_queue.is_empty();
        let started = *c.close_started_ns.get_or_insert(now);
        // A peer that never reads must not keep its connection open: after the grace the
        // connection is shut down with its last frames unsent.
        let deadline_passed = now.saturating_sub(started) >= CLOSE_SEND_GRACE_NS
            || self.shutdown_deadline.is_some_and(|d| now >= d);
        if (sends_done || deadline_passed) && !c.shut {
            c.shut = true;
            sys::shutdown_both(c.raw());
            let generation = c.id.generation;
            let (recv, poll) = (c.recv_armed && !c.recv_cancelled, c.poll_armed);
            c.recv_cancelled |= recv;
            for (armed, tag) in [(recv, TAG_RECV), (poll, TAG_POLL)] {
                if armed {
                    let entry = opcode::AsyncCancel::new(user_data(tag, generation, slot))
                        .build()
                        .user_data(user_data(TAG_CANCEL, 0, 0));
                    self.push(&entry);
                }
            }
        }
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else {
            return true;
        };
        if c.shut && !c.recv_armed && !c.poll_armed && !c.send_inflight && !c.closed_queued {
            c.closed_queued = true;
            if let Some(gate) = self.gate.as_deref_mut() {
                gate.cancel_conn(c.id.token());
            }
            c.pending.push_back(DrainOutput::Closed {
                conn: c.id,
                cell: Arc::clone(&c.session.cell),
                reason,
            });
        }
        if c.closed_queued && c.pending.is_empty() {
            c.session.slot.connections.fetch_sub(1, Ordering::Relaxed);
            self.conns[slot as usize] = None;
            self.conn_gens[slot as usize] = (self.conn_gens[slot as usize] + 1) & GEN_MASK;
            self.free_conns.push(slot);
            self.live_conns -= 1;
            return true;
        }
        false
    }

    /// Hands the connection's held outputs to the channel, in order, while it has room and
    /// the connection is under its quota. Returns whether everything was handed off.
    fn flush(&mut self, slot: u32) -> bool {
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else {
            return true;
        };
        while let Some(front) = c.pending.pop_front() {
            let mut item = front;
            if let DrainOutput::Batch(batch) = &mut item {
                if c.credits.load(Ordering::Acquire) >= CONN_HANDOFF_QUOTA {
                    c.pending.push_front(item);
                    return false;
                }
                batch.credit = Some(HandoffCredit::take(&c.credits));
            }
            let is_batch = matches!(item, DrainOutput::Batch(_));
            match self.out.try_send(item) {
                Ok(()) => {
                    if is_batch {
                        DrainStats::add(&self.stats.batches, 1);
                    }
                }
                Err(TrySendError::Full(mut item)) => {
                    if let DrainOutput::Batch(batch) = &mut item {
                        batch.credit = None;
                    }
                    c.pending.push_front(item);
                    return false;
                }
                Err(TrySendError::Disconnected(_)) => {
                    self.consumer_gone = true;
                    c.pending.clear();
                    return true;
                }
            }
        }
        true
    }

    /// Serves one connection after a turn: hand off, re-arm or pause recv, move a close on,
    /// confirm a hang-up. Returns whether it still needs service next turn.
    fn serve(&mut self, slot: u32, now: u64) -> bool {
        self.flush(slot);
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else {
            return false;
        };
        if c.closing.is_some() {
            return !self.advance_close(slot, now);
        }
        if !c.wants_recv() {
            // Back-pressure: stop receiving from this connection only, until its held
            // outputs are handed off and its quota has room again.
            if c.recv_armed && !c.recv_cancelled {
                DrainStats::add(&self.stats.backpressure_pauses, 1);
            }
            self.cancel_recv(slot);
            return true;
        }
        if let Some(seen) = c.hup_seen_ns {
            // The peer hung up. Close once nothing is left to read and the recv's own EOF
            // has had its grace period to arrive (AF_UNIX sometimes never posts it).
            if sys::readable_bytes(c.raw()).unwrap_or(0) == 0
                && now.saturating_sub(seen) >= HUP_GRACE_NS
            {
                self.begin_close(slot, CloseReason::PeerClosed);
                return !self.advance_close(slot, now);
            }
            self.arm_recv(slot);
            return true;
        }
        self.arm_recv(slot);
        false
    }

    fn on_recv(&mut self, slot: u32, generation: u32, res: i32, flags: u32, now: u64) {
        let bid = cqueue::buffer_select(flags);
        let more = cqueue::more(flags);
        let deny_inline = self.config.deny_policy_queries_inline;
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else {
            if let Some(bid) = bid {
                self.bufs.recycle(bid);
            }
            return;
        };
        if c.id.generation & GEN_MASK != generation {
            if let Some(bid) = bid {
                self.bufs.recycle(bid);
            }
            return;
        }
        if !more {
            c.recv_armed = false;
            if res > 0 {
                DrainStats::add(&self.stats.recv_rearms, 1);
            }
        }
        if res > 0 {
            if let Some(bid) = bid {
                if c.closing.is_none() {
                    if let Ok(data) = self.bufs.data(bid, res as usize) {
                        DrainStats::add(&self.stats.bytes, data.len() as u64);
                        let violation = protocol::process_chunk(
                            &mut c.session,
                            data,
                            now,
                            match self.gate.as_deref_mut() {
                                Some(gate) => protocol::Policy::Gate(gate),
                                None if deny_inline => protocol::Policy::DenyInline,
                                None => protocol::Policy::Caller,
                            },
                            &self.stats,
                            &mut c.pending,
                            &mut c.send_queue,
                        );
                        self.bufs.recycle(bid);
                        if let Some(v) = violation {
                            let (reason, frame) = v.to_close();
                            tracing::debug!(conn = ?c.id, error = %v, "closing a connection for bad input");
                            c.queue_host_frame(&frame, &self.stats);
                            self.begin_close(slot, reason);
                        } else if !c.send_queue.is_empty() {
                            self.arm_send(slot);
                        }
                        self.mark_service(slot);
                        return;
                    }
                }
                self.bufs.recycle(bid);
            }
            self.mark_service(slot);
            return;
        }
        match res {
            0 => self.begin_close(slot, CloseReason::PeerClosed),
            r if r == -libc::ENOBUFS => {
                // Ambiguous: an empty buffer ring, or a reset vsock connection that will
                // report ENOBUFS forever. SO_ERROR tells them apart.
                match sys::socket_error(c.raw()) {
                    Ok(0) => {
                        DrainStats::add(&self.stats.enobufs_rearms, 1);
                    }
                    _ => self.begin_close(slot, CloseReason::Reset),
                }
            }
            r if r == -libc::ECANCELED => {}
            r if r == -libc::ECONNRESET || r == -libc::EPIPE => {
                self.begin_close(slot, CloseReason::Reset);
            }
            r if r >= 0 => {}
            _ => self.begin_close(slot, CloseReason::IoError),
        }
        if let Some(Some(c)) = self.conns.get(slot as usize) {
            if !c.recv_armed
                && c.closing.is_none()
                && res != -libc::ENOBUFS
                && res != -libc::ECANCELED
            {
                DrainStats::add(&self.stats.recv_rearms, 1);
            }
        }
        self.mark_service(slot);
    }

    fn on_poll(&mut self, slot: u32, generation: u32, res: i32, now: u64) {
        let Some(c) = self.conn_mut(slot, generation) else {
            return;
        };
        c.poll_armed = false;
        if res > 0 && c.closing.is_none() {
            c.hup_seen_ns = Some(now);
        }
        self.mark_service(slot);
    }

    fn on_send(&mut self, slot: u32, generation: u32, res: i32) {
        let Some(c) = self.conn_mut(slot, generation) else {
            return;
        };
        c.send_inflight = false;
        if res < 0 {
            c.send_queue.clear();
            c.send_buf.clear();
            c.send_off = 0;
            if c.closing.is_none() {
                let reason = if res == -libc::EPIPE || res == -libc::ECONNRESET {
                    CloseReason::Reset
                } else {
                    CloseReason::IoError
                };
                self.begin_close(slot, reason);
            }
            self.mark_service(slot);
            return;
        }
        c.send_off += res as usize;
        self.arm_send(slot);
        self.mark_service(slot);
    }

    // ---- commands -------------------------------------------------------------------------

    fn on_command(&mut self, cmd: DrainCommand, now: u64) {
        let stats = Arc::clone(&self.stats);
        match cmd {
            DrainCommand::AddCell(spec) => {
                let cell_id = spec.cell_id.clone();
                if let Err(error) = self.add_cell(spec) {
                    tracing::warn!(%cell_id, %error, "could not add a cell to the drain");
                    self.emit_unowned(DrainOutput::CellError { cell_id, error });
                }
            }
            DrainCommand::RemoveCell { cell } => {
                if let Some(index) = self.find_cell(&cell) {
                    self.remove_cell(index);
                }
            }
            DrainCommand::Ack { conn, durable_seq } => {
                let frame = pb::HostFrame {
                    kind: Some(pb::host_frame::Kind::Ack(pb::Ack { durable_seq })),
                };
                self.send_frame(conn, &frame, &stats);
            }
            DrainCommand::PolicyDecision {
                conn,
                query_id,
                decision,
                reason,
            } => {
                let frame = pb::HostFrame {
                    kind: Some(pb::host_frame::Kind::PolicyDecision(pb::PolicyDecision {
                        query_id,
                        decision: decision as i32,
                        reason,
                    })),
                };
                self.send_frame(conn, &frame, &stats);
            }
            DrainCommand::CloseConn {
                conn,
                code,
                message,
            } => {
                if self.conn_by_id(conn).is_some_and(|c| c.closing.is_none()) {
                    self.close_with_error(conn.slot, CloseReason::Command, code, &message);
                } else {
                    DrainStats::add(&stats.stale_commands, 1);
                }
            }
            DrainCommand::Shutdown => self.start_shutdown(now),
            DrainCommand::Stall(how_long) => std::thread::sleep(how_long),
        }
    }

    /// Answers the held policy queries the gate released (a resume or terminate arrived) and
    /// audits the end of each hold.
    fn release_held(&mut self, now: u64) {
        let Some(gate) = self.gate.as_deref_mut() else {
            return;
        };
        gate.poll(now, &mut self.released);
        if self.released.is_empty() {
            return;
        }
        let stats = Arc::clone(&self.stats);
        for r in std::mem::take(&mut self.released) {
            let conn = ConnId::from_token(r.conn_token);
            let decision = if r.allow {
                pb::policy_decision::Decision::Allow
            } else {
                pb::policy_decision::Decision::Deny
            };
            let frame = pb::HostFrame {
                kind: Some(pb::host_frame::Kind::PolicyDecision(pb::PolicyDecision {
                    query_id: r.query_id,
                    decision: decision as i32,
                    reason: r.reason,
                })),
            };
            self.send_frame(conn, &frame, &stats);
            if let Some(c) = self.conn_by_id(conn) {
                let cell = Arc::clone(&c.session.cell);
                c.pending.push_back(DrainOutput::PolicyAudit {
                    conn,
                    cell,
                    op_id: r.op_id,
                    action: r.action,
                    decision: r.label,
                    held_ns: r.held_ns,
                });
                self.mark_service(conn.slot);
            }
        }
    }

    fn send_frame(&mut self, conn: ConnId, frame: &pb::HostFrame, stats: &DrainStats) {
        match self.conn_by_id(conn) {
            Some(c) if c.closing.is_none() => {
                c.queue_host_frame(frame, stats);
                self.arm_send(conn.slot);
            }
            _ => DrainStats::add(&stats.stale_commands, 1),
        }
    }

    fn start_shutdown(&mut self, now: u64) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        self.shutdown_deadline = Some(now + SHUTDOWN_GRACE_NS);
        for slot in 0..self.listeners.len() as u32 {
            self.close_listener(slot);
        }
        for slot in 0..self.conns.len() as u32 {
            self.close_with_error(
                slot,
                CloseReason::Shutdown,
                pb::error::Code::ShuttingDown,
                "the host is shutting down; reconnect later",
            );
        }
    }

    // ---- the loop -------------------------------------------------------------------------

    fn check_hello_timeouts(&mut self, now: u64) {
        while let Some(&(id, deadline)) = self.awaiting_hello.front() {
            if deadline > now {
                break;
            }
            self.awaiting_hello.pop_front();
            if let Some(c) = self.conn_by_id(id) {
                if c.session.stream_id.is_none() && c.closing.is_none() {
                    self.close_with_error(
                        id.slot,
                        CloseReason::HelloTimeout,
                        pb::error::Code::IdleTimeout,
                        "no Hello arrived within the hello timeout, so the connection was closed",
                    );
                }
            }
        }
    }

    fn next_wait_ns(&self, now: u64) -> Option<u64> {
        let mut wait: Option<u64> = None;
        let mut consider = |ns: u64| wait = Some(wait.map_or(ns, |w| w.min(ns)));
        if !self.service.is_empty()
            || !self.reject_backlog.is_empty()
            || !self.sq_backlog.is_empty()
        {
            consider(RETRY_INTERVAL_NS);
        }
        if let Some(&(_, deadline)) = self.awaiting_hello.front() {
            consider(deadline.saturating_sub(now).max(1));
        }
        for l in self.listeners.iter().flatten() {
            if let Some(at) = l.rearm_at {
                consider(at.saturating_sub(now).max(1));
            }
        }
        if let Some(d) = self.shutdown_deadline {
            consider(d.saturating_sub(now).max(1));
        }
        consider(IDLE_WAKE_NS);
        wait
    }

    fn wait(&mut self, now: u64) -> Result<(), DrainError> {
        self.flush_sq_backlog();
        let result = match self.next_wait_ns(now) {
            None => self.ring.submit_and_wait(1),
            Some(ns) => {
                let ts = types::Timespec::new()
                    .sec(ns / 1_000_000_000)
                    .nsec((ns % 1_000_000_000) as u32);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
        };
        match result {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(DrainError::Submit(e)),
        }
    }

    fn run(mut self) -> Result<(), DrainError> {
        let mut now = sys::monotonic_ns();
        let mut rotate = 0usize;
        loop {
            self.wait(now)?;
            now = sys::monotonic_ns();
            self.stats
                .last_loop_mono_ns
                .store(now, std::sync::atomic::Ordering::Relaxed);
            self.cqes.clear();
            self.cqes.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            let mut woken = false;
            for i in 0..self.cqes.len() {
                let (ud, res, flags) = self.cqes[i];
                let (tag, generation, slot) = split_user_data(ud);
                match tag {
                    TAG_ACCEPT => self.on_accept(slot, generation, res, flags, now),
                    TAG_RECV => self.on_recv(slot, generation, res, flags, now),
                    TAG_POLL => self.on_poll(slot, generation, res, now),
                    TAG_SEND => self.on_send(slot, generation, res),
                    TAG_WAKE => woken = true,
                    _ => {}
                }
            }
            self.bufs.publish();
            if woken {
                self.arm_wake();
            }
            loop {
                match self.cmds.try_recv() {
                    Ok(cmd) => self.on_command(cmd, now),
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => {
                        self.start_shutdown(now);
                        break;
                    }
                }
            }
            self.check_hello_timeouts(now);
            self.release_held(now);
            for l in 0..self.listeners.len() as u32 {
                if self.listeners[l as usize]
                    .as_ref()
                    .is_some_and(|l| l.rearm_at.is_some_and(|at| at <= now))
                {
                    self.arm_accept(l);
                }
            }
            while let Some(out) = self.reject_backlog.pop_front() {
                match self.out.try_send(out) {
                    Ok(()) => {}
                    Err(TrySendError::Full(out)) => {
                        self.reject_backlog.push_front(out);
                        break;
                    }
                    Err(TrySendError::Disconnected(_)) => {
                        self.consumer_gone = true;
                        break;
                    }
                }
            }
            // Serve connections round-robin from a rotating start, so when the channel has
            // little room the same connection does not always get it first.
            let list = std::mem::take(&mut self.service);
            let n = list.len();
            let mut keep = Vec::with_capacity(n);
            if n > 0 {
                rotate = (rotate + 1) % n;
            }
            for k in 0..n {
                let slot = list[(rotate + k) % n];
                if let Some(Some(c)) = self.conns.get_mut(slot as usize) {
                    c.in_service = false;
                }
                if self.serve(slot, now) {
                    if let Some(Some(c)) = self.conns.get_mut(slot as usize) {
                        if !c.in_service {
                            c.in_service = true;
                            keep.push(slot);
                        }
                    }
                }
            }
            keep.append(&mut self.service);
            self.service = keep;
            self.bufs.publish();
            if self.consumer_gone {
                tracing::info!("the drain's consumer is gone; stopping");
                return Ok(());
            }
            if let Some(deadline) = self.shutdown_deadline {
                let listeners_done = self.listeners.iter().all(Option::is_none);
                if (self.live_conns == 0 && listeners_done) || now >= deadline {
                    for slot in 0..self.conns.len() {
                        if let Some(c) = self.conns[slot].take() {
                            let mut c = c;
                            // Last chance for held outputs: the caller's `shutdown()` is
                            // draining the channel; a consumer that stopped reading loses them.
                            while let Some(out) = c.pending.pop_front() {
                                if self.out.send_timeout(out, FINAL_SEND_TIMEOUT).is_err() {
                                    tracing::warn!(conn = ?c.id, "outputs of a connection were not taken before the drain stopped");
                                    break;
                                }
                            }
                            c.session.slot.connections.fetch_sub(1, Ordering::Relaxed);
                        }
                    }
                    return Ok(());
                }
            }
        }
    }
}
