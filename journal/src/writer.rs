//! The journal thread: takes batches of [`EventIn`] from a bounded channel, dedupes, builds
//! and signs CloudEvent records, chains them per run, appends them to the current segment
//! with one write and one fdatasync per commit batch, then publishes acks and the
//! `durable.mark`. Also recovery on start, segment rolling, retention and ENOSPC handling.

use std::collections::{BTreeSet, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use serde_json::value::RawValue;

use crate::dsse::sign_material;
use crate::event::{
    batch_head_id, build_record, journal_source, record_hash, rfc3339, AckOut, BatchHeadData,
    EventIn, Record, BATCH_HEAD_TYPE, SIGNED_EXT_ATTRS,
};
use crate::key::HostKey;
use crate::segment::{
    create_segment, encode_record, list_segments, scan_segment, sync_dir, SegmentError, HEADER_LEN,
    MAX_RECORD_BYTES,
};
use crate::state::ChainState;

/// (cell, run, stream, guest_seq) of one guest event.
type StreamSeq = (Arc<str>, Arc<str>, Arc<str>, u64);
/// (token, cell, run, stream) owed an ack after the batch.
type AckTarget = (u64, Arc<str>, Arc<str>, Arc<str>);

/// Input channel capacity, in batches (`Vec<EventIn>`) (256). Enough for the drain to hand
/// over one batch per loop turn through a whole fsync; when full the drain's `send` blocks
/// (back-pressure reaches the guests through their sockets), nothing is dropped.
pub const INPUT_CAPACITY: usize = 256;
/// Ack channel capacity, in ack vectors (1,024): one per commit batch, read by the drain each
/// loop turn. When full the journal thread waits for the drain; acks are never dropped.
pub const ACK_CAPACITY: usize = 1024;
/// Most events in one commit batch (4,096): bounds one write (a few MiB) and the ack latency
/// of the first event in the batch; more pending events go into the next batch.
pub const MAX_BATCH_EVENTS: usize = 4096;
/// Longest wait for more events after the first of a batch (500 µs): below one fdatasync on
/// a disk (about 1–5 ms), so it adds little latency while letting concurrent producers join.
pub const MAX_BATCH_WAIT: Duration = Duration::from_micros(500);
/// How often a failed write (ENOSPC, EIO) is retried (250 ms): often enough that acking
/// resumes quickly once space returns, rarely enough not to spin on a full disk.
pub const WRITE_RETRY_INTERVAL: Duration = Duration::from_millis(250);
/// How often the idle journal thread checks for shutdown (50 ms).
const IDLE_TICK: Duration = Duration::from_millis(50);
/// Default segment size (64 MiB): whole segments are the unit of retention and of one read
/// by `verify`; a record never spans two segments.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;
/// Name of the advisory durable watermark file in the journal directory.
pub const DURABLE_MARK: &str = "durable.mark";

/// How events are signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SigningMode {
    /// A DSSE signature on every event.
    PerEvent,
    /// One signed batch head per commit batch covering the events' chain hashes.
    #[default]
    Batch,
    /// No signatures (benchmarks only; `verify` rejects such journals).
    None,
}

/// Where records go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sink {
    /// Segment files in `JournalConfig::dir`.
    #[default]
    Segments,
    /// JSON lines on standard output; acked after write + flush.
    Stdout,
}

/// Wall clock in Unix nanoseconds (a parameter so tests control time).
pub type WallClock = fn() -> u64;

/// The system wall clock.
pub fn system_clock() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Journal configuration.
#[derive(Debug, Clone)]
pub struct JournalConfig {
    pub dir: PathBuf,
    pub host_name: String,
    pub signing: SigningMode,
    /// fdatasync each batch before acking (false only for benchmarks).
    pub fsync: bool,
    pub segment_bytes: u64,
    pub retention_bytes: Option<u64>,
    pub retention_age: Option<Duration>,
    pub sink: Sink,
    pub clock: WallClock,
}

impl JournalConfig {
    /// Defaults: batch signing, fsync on, 64 MiB segments, no retention, segment sink.
    pub fn new(dir: impl Into<PathBuf>, host_name: impl Into<String>) -> Self {
        Self {
            dir: dir.into(),
            host_name: host_name.into(),
            signing: SigningMode::default(),
            fsync: true,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            retention_bytes: None,
            retention_age: None,
            sink: Sink::default(),
            clock: system_clock,
        }
    }
}

/// Errors of the journal (start, recovery, the thread).
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("could not create journal directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not open the journal: {0}")]
    Segment(#[from] SegmentError),
    #[error(
        "segment {path} is corrupt at offset {offset} before its end ({what}); refusing to start"
    )]
    Corrupt {
        path: PathBuf,
        offset: u64,
        what: String,
    },
    #[error("could not truncate the torn tail of {path}: {source}")]
    Truncate {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not open the durable mark {path}: {source}")]
    Mark {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not start the journal thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("the journal thread panicked")]
    Panicked,
    #[error("shut down with {events} events not written because writing kept failing: {reason}")]
    Unwritten { events: usize, reason: String },
}

/// fsync durations waiting for the metrics reader. A reader renders every few seconds and the
/// journal fsyncs at most a few thousand times a second; 4,096 samples cover a slow scrape.
/// When full, new samples are dropped and counted (a histogram may lose samples; the journal
/// never waits for a reader).
pub const FSYNC_SAMPLES_CAPACITY: usize = 4_096;

/// The journal's fsync latencies (microseconds), lock-free from writer to reader.
pub struct FsyncSamples {
    queue: crossbeam_queue::ArrayQueue<u32>,
    /// Samples dropped because the reader was behind.
    pub dropped: AtomicU64,
}

impl Default for FsyncSamples {
    fn default() -> Self {
        Self {
            queue: crossbeam_queue::ArrayQueue::new(FSYNC_SAMPLES_CAPACITY),
            dropped: AtomicU64::new(0),
        }
    }
}

impl std::fmt::Debug for FsyncSamples {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsyncSamples")
            .field("queued", &self.queue.len())
            .finish_non_exhaustive()
    }
}

/// Health and counters, shared with readers (status, metrics).
#[derive(Debug, Default)]
pub struct JournalHealth {
    /// fsync durations for the metrics reader (see [`JournalHealth::take_fsync_samples`]).
    pub fsync_samples: FsyncSamples,
    degraded: AtomicBool,
    reason: Mutex<String>,
    pub events_written: AtomicU64,
    pub events_deduped: AtomicU64,
    /// Events refused because their record exceeded `MAX_RECORD_BYTES` (never acked).
    pub events_rejected: AtomicU64,
    pub batches: AtomicU64,
    pub bytes_written: AtomicU64,
    pub write_failures: AtomicU64,
    pub segments_deleted: AtomicU64,
    /// Bytes cut from a torn tail at start.
    pub recovered_truncated_bytes: AtomicU64,
}

impl JournalHealth {
    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Acquire)
    }

    /// The sentence saying why health is degraded, if it is.
    pub fn reason(&self) -> Option<String> {
        self.is_degraded()
            .then(|| self.reason.lock().map(|r| r.clone()).unwrap_or_default())
    }

    fn degrade(&self, reason: String) {
        if let Ok(mut r) = self.reason.lock() {
            *r = reason;
        }
        self.degraded.store(true, Ordering::Release);
    }

    fn recover(&self) {
        self.degraded.store(false, Ordering::Release);
    }

    fn record_fsync(&self, took: Duration) {
        let micros = u32::try_from(took.as_micros()).unwrap_or(u32::MAX);
        if self.fsync_samples.queue.push(micros).is_err() {
            self.fsync_samples.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Moves the fsync durations recorded since the last call into `out`.
    pub fn take_fsync_samples(&self, out: &mut Vec<Duration>) {
        while let Some(us) = self.fsync_samples.queue.pop() {
            out.push(Duration::from_micros(u64::from(us)));
        }
    }
}

/// The running journal.
pub struct JournalHandle {
    pub input: Sender<Vec<EventIn>>,
    pub acks: Receiver<Vec<AckOut>>,
    pub health: Arc<JournalHealth>,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<(), JournalError>>,
}

impl JournalHandle {
    /// Stops taking input once what was sent is written, does the final fsync, joins.
    pub fn shutdown(self) -> Result<(), JournalError> {
        let Self {
            input,
            stop,
            thread,
            ..
        } = self;
        drop(input);
        stop.store(true, Ordering::Release);
        thread.join().map_err(|_| JournalError::Panicked)?
    }
}

/// What start-up recovery found and rebuilt.
#[derive(Debug, Clone)]
pub struct Recovered {
    pub state: ChainState,
    pub segments: usize,
    pub records: u64,
    pub truncated_bytes: u64,
    /// `(segment index, end offset)` to append at, if any segment exists.
    pub append_at: Option<(u64, u64)>,
}

/// Scans the journal in `dir`, truncating a torn tail (and in batch mode a batch whose head
/// never made it to disk) of the last segment, and rebuilds chain and dedupe state.
pub fn recover(dir: &Path) -> Result<Recovered, JournalError> {
    fs::create_dir_all(dir).map_err(|source| JournalError::CreateDir {
        path: dir.to_owned(),
        source,
    })?;
    let mut segments = list_segments(dir)?;
    // A crash while creating a segment can leave it without a full header: drop it.
    if let Some((_, path)) = segments.last() {
        if fs::metadata(path).is_ok_and(|m| m.len() < HEADER_LEN) {
            let _ = fs::remove_file(path);
            segments.pop();
        }
    }
    let mut out = Recovered {
        state: ChainState::new(),
        segments: segments.len(),
        records: 0,
        truncated_bytes: 0,
        append_at: None,
    };
    let count = segments.len();
    for (i, (index, path)) in segments.into_iter().enumerate() {
        let last = i + 1 == count;
        let scan = scan_segment(index, &path)?;
        let mut cut = match scan.fault {
            Some((offset, what)) if !last => {
                return Err(JournalError::Corrupt {
                    path,
                    offset,
                    what: what.to_string(),
                })
            }
            Some((offset, _)) => Some(offset),
            None => None,
        };
        let mut parsed = Vec::with_capacity(scan.records.len());
        let mut open_batch: Option<u64> = None;
        for (k, (offset, _)) in scan.records.iter().enumerate() {
            let bytes = scan.payload(k);
            match Record::parse(bytes) {
                Ok(rec) => {
                    if rec.ty == BATCH_HEAD_TYPE && rec.cellid.is_none() {
                        open_batch = None;
                    } else if rec.batchhead.is_some() && open_batch.is_none() {
                        open_batch = Some(*offset);
                    }
                    parsed.push((*offset, rec, record_hash(bytes)));
                }
                Err(e) if !last => {
                    return Err(JournalError::Corrupt {
                        path,
                        offset: *offset,
                        what: e.to_string(),
                    })
                }
                Err(_) => {
                    cut = Some(*offset);
                    break;
                }
            }
        }
        if last {
            if let Some(start) = open_batch {
                cut = Some(cut.map_or(start, |c| c.min(start)));
            }
        }
        for (offset, rec, hash) in &parsed {
            if cut.is_some_and(|c| *offset >= c) {
                break;
            }
            out.state.apply_record(rec, hash);
            out.records += 1;
        }
        let mut end = scan.good_end;
        if let Some(c) = cut {
            let len = scan.bytes.len() as u64;
            let truncate = || -> std::io::Result<()> {
                let f = OpenOptions::new().write(true).open(&path)?;
                f.set_len(c)?;
                f.sync_all()
            };
            truncate().map_err(|source| JournalError::Truncate {
                path: path.clone(),
                source,
            })?;
            out.truncated_bytes += len - c;
            end = c;
        }
        if last {
            out.append_at = Some((index, end));
        }
    }
    Ok(out)
}

/// The chain and dedupe state a journal in `dir` would continue from (read-only: a torn
/// tail is skipped, not truncated).
pub fn recovered_state(dir: &Path) -> Result<ChainState, JournalError> {
    let mut state = ChainState::new();
    for (index, path) in list_segments(dir)? {
        let scan = scan_segment(index, &path)?;
        for k in 0..scan.records.len() {
            let bytes = scan.payload(k);
            if let Ok(rec) = Record::parse(bytes) {
                state.apply_record(&rec, &record_hash(bytes));
            }
        }
    }
    Ok(state)
}

/// Starts the journal thread ("vigil-journal") after recovery.
pub fn spawn(config: JournalConfig, key: HostKey) -> Result<JournalHandle, JournalError> {
    let health = Arc::new(JournalHealth::default());
    let (state, out) = match config.sink {
        Sink::Segments => {
            let rec = recover(&config.dir)?;
            health
                .recovered_truncated_bytes
                .store(rec.truncated_bytes, Ordering::Relaxed);
            let out = SegmentOut::open(&config, rec.append_at)?;
            (rec.state, Output::Segments(out))
        }
        Sink::Stdout => (ChainState::new(), Output::Stdout),
    };
    let (in_tx, in_rx) = bounded(INPUT_CAPACITY);
    let (ack_tx, ack_rx) = bounded(ACK_CAPACITY);
    let stop = Arc::new(AtomicBool::new(false));
    let mut worker = Stage {
        config,
        key,
        state,
        out,
        health: health.clone(),
        stop: stop.clone(),
        acks: ack_tx,
    };
    let thread = std::thread::Builder::new()
        .name("vigil-journal".to_owned())
        .spawn(move || worker.run(&in_rx))
        .map_err(JournalError::Spawn)?;
    Ok(JournalHandle {
        input: in_tx,
        acks: ack_rx,
        health,
        stop,
        thread,
    })
}

enum Output {
    Segments(SegmentOut),
    Stdout,
}

struct SegmentOut {
    dir: PathBuf,
    file: File,
    index: u64,
    len: u64,
    fsync: bool,
    segment_bytes: u64,
    retention_bytes: Option<u64>,
    retention_age: Option<Duration>,
    mark: File,
}

impl SegmentOut {
    fn open(config: &JournalConfig, append_at: Option<(u64, u64)>) -> Result<Self, JournalError> {
        let (file, index, len) = match append_at {
            Some((index, len)) => {
                let path = config.dir.join(crate::segment::segment_name(index));
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(|source| SegmentError::Create { path, source })?;
                (f, index, len)
            }
            None => (create_segment(&config.dir, 0)?.0, 0, HEADER_LEN),
        };
        let mark_path = config.dir.join(DURABLE_MARK);
        let mark = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&mark_path)
            .map_err(|source| JournalError::Mark {
                path: mark_path,
                source,
            })?;
        let out = Self {
            dir: config.dir.clone(),
            file,
            index,
            len,
            fsync: config.fsync,
            segment_bytes: config.segment_bytes.max(HEADER_LEN + 1),
            retention_bytes: config.retention_bytes,
            retention_age: config.retention_age,
            mark,
        };
        out.write_mark();
        Ok(out)
    }

    /// Writes `buf` at the end of the current segment (rolling first if it would overflow)
    /// and fdatasyncs. On failure the segment is cut back to where it was.
    fn write_batch(&mut self, buf: &[u8], now: u64, health: &JournalHealth) -> std::io::Result<()> {
        if self.len > HEADER_LEN && self.len + buf.len() as u64 > self.segment_bytes {
            let (file, _) = create_segment(&self.dir, self.index + 1).map_err(|e| match e {
                SegmentError::Create { source, .. } => source,
                other => std::io::Error::other(other.to_string()),
            })?;
            self.file = file;
            self.index += 1;
            self.len = HEADER_LEN;
            self.apply_retention(now, health);
        }
        let start = self.len;
        let res = self.file.write_all_at(buf, start).and_then(|()| {
            if self.fsync {
                let started = std::time::Instant::now();
                let r = self.file.sync_data();
                health.record_fsync(started.elapsed());
                r
            } else {
                Ok(())
            }
        });
        match res {
            Ok(()) => {
                self.len += buf.len() as u64;
                self.write_mark();
                Ok(())
            }
            Err(e) => {
                let _ = self.file.set_len(start);
                Err(e)
            }
        }
    }

    /// Advisory, not fsynced: always behind or at what is durable (it is written after the
    /// fdatasync), rebuilt on start. Fixed width, with a CRC so a torn read is detected.
    fn write_mark(&self) {
        let _ = self
            .mark
            .write_all_at(format_mark(self.index, self.len).as_bytes(), 0);
    }

    fn apply_retention(&self, now: u64, health: &JournalHealth) {
        if self.retention_bytes.is_none() && self.retention_age.is_none() {
            return;
        }
        let Ok(segments) = list_segments(&self.dir) else {
            return;
        };
        let mut sizes: Vec<(PathBuf, u64, u64)> = segments
            .into_iter()
            .filter(|(i, _)| *i < self.index)
            .filter_map(|(_, p)| {
                let m = fs::metadata(&p).ok()?;
                let mtime = m
                    .modified()
                    .ok()?
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                Some((p, m.len(), mtime))
            })
            .collect();
        let mut total: u64 = sizes.iter().map(|s| s.1).sum::<u64>() + self.len;
        let mut removed = false;
        for (path, size, mtime) in sizes.drain(..) {
            let too_big = self.retention_bytes.is_some_and(|b| total > b);
            let too_old = self
                .retention_age
                .is_some_and(|age| now.saturating_sub(mtime) > age.as_nanos() as u64);
            if !(too_big || too_old) {
                break;
            }
            if fs::remove_file(&path).is_ok() {
                total -= size;
                removed = true;
                health.segments_deleted.fetch_add(1, Ordering::Relaxed);
            }
        }
        if removed {
            let _ = sync_dir(&self.dir);
        }
    }
}

/// `durable.mark` contents: `vigil-durable-v1 <segment index> <end offset> <crc32c hex>\n`,
/// fixed width; the CRC covers the text before it.
pub fn format_mark(index: u64, offset: u64) -> String {
    let body = format!("vigil-durable-v1 {index:016} {offset:016}");
    format!("{body} {:08x}\n", crc32c::crc32c(body.as_bytes()))
}

/// Parses `durable.mark` contents into `(segment index, end offset)`.
pub fn parse_mark(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().next()?;
    let (body, crc) = line.rsplit_once(' ')?;
    if u32::from_str_radix(crc, 16).ok()? != crc32c::crc32c(body.as_bytes()) {
        return None;
    }
    let mut parts = body.split(' ');
    if parts.next()? != "vigil-durable-v1" {
        return None;
    }
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Reads `<dir>/durable.mark`, if present and intact.
pub fn read_mark(dir: &Path) -> Option<(u64, u64)> {
    parse_mark(&fs::read_to_string(dir.join(DURABLE_MARK)).ok()?)
}

struct Stage {
    config: JournalConfig,
    key: HostKey,
    state: ChainState,
    out: Output,
    health: Arc<JournalHealth>,
    stop: Arc<AtomicBool>,
    acks: Sender<Vec<AckOut>>,
}

/// One built commit batch, ready to write.
struct Built {
    buf: Vec<u8>,
    lines: Vec<u8>,
    written: usize,
    staged: Vec<StreamSeq>,
    ack_to: BTreeSet<AckTarget>,
}

impl Stage {
    fn run(&mut self, input: &Receiver<Vec<EventIn>>) -> Result<(), JournalError> {
        loop {
            let mut batch = match input.recv_timeout(IDLE_TICK) {
                Ok(v) => v,
                Err(RecvTimeoutError::Timeout) => {
                    if self.stop.load(Ordering::Acquire) {
                        // Take whatever was sent before the stop, then finish.
                        let mut rest = Vec::new();
                        while let Ok(mut v) = input.try_recv() {
                            rest.append(&mut v);
                        }
                        if rest.is_empty() {
                            return Ok(());
                        }
                        rest
                    } else {
                        continue;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            };
            let deadline = Instant::now() + MAX_BATCH_WAIT;
            while batch.len() < MAX_BATCH_EVENTS {
                match input.recv_deadline(deadline) {
                    Ok(mut v) => batch.append(&mut v),
                    Err(_) => break,
                }
            }
            while batch.len() > MAX_BATCH_EVENTS {
                let rest = batch.split_off(MAX_BATCH_EVENTS);
                self.commit(&batch)?;
                batch = rest;
            }
            self.commit(&batch)?;
        }
    }

    fn commit(&mut self, events: &[EventIn]) -> Result<(), JournalError> {
        let now = (self.config.clock)();
        let built = self.build(events, now);
        self.write_until_durable(&built, now)?;
        for (c, r, s, q) in &built.staged {
            self.state.mark_durable(c, r, s, *q);
        }
        let h = &self.health;
        h.events_written
            .fetch_add(built.written as u64, Ordering::Relaxed);
        h.batches.fetch_add(1, Ordering::Relaxed);
        h.bytes_written.fetch_add(
            built.buf.len().max(built.lines.len()) as u64,
            Ordering::Relaxed,
        );
        let acks: Vec<AckOut> = built
            .ack_to
            .iter()
            .filter_map(|(token, c, r, s)| {
                let durable_seq = self.state.watermark(c, r, s);
                (durable_seq > 0).then(|| AckOut {
                    token: *token,
                    run_id: r.clone(),
                    stream_id: s.clone(),
                    durable_seq,
                })
            })
            .collect();
        if !acks.is_empty() {
            // The drain may be gone at shutdown; acks then have no reader.
            let _ = self.acks.send(acks);
        }
        Ok(())
    }

    fn build(&mut self, events: &[EventIn], now: u64) -> Built {
        let mode = self.config.signing;
        let host = self.config.host_name.as_str();
        let head_id = batch_head_id(host, self.state.last_batch + 1);
        let mut b = Built {
            buf: Vec::new(),
            lines: Vec::new(),
            written: 0,
            staged: Vec::new(),
            ack_to: BTreeSet::new(),
        };
        let mut staged_set: HashSet<StreamSeq> = HashSet::new();
        let mut covered = Vec::new();
        for ev in events {
            if let Some((stream, seq)) = ev.guest_key() {
                b.ack_to.insert((
                    ev.token,
                    ev.cell_id.clone(),
                    ev.run_id.clone(),
                    stream.clone(),
                ));
                let k = (ev.cell_id.clone(), ev.run_id.clone(), stream.clone(), seq);
                if self.state.is_durable(&k.0, &k.1, &k.2, seq) || staged_set.contains(&k) {
                    self.health.events_deduped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
            let (sequence, prev) = self.state.next_link(&ev.cell_id, &ev.run_id);
            let mut rec = build_record(ev, host, sequence, &prev, now);
            match mode {
                SigningMode::Batch => rec.batchhead = Some(head_id.clone()),
                SigningMode::PerEvent => {
                    rec.signedextattrs = Some(SIGNED_EXT_ATTRS.to_owned());
                    if let Ok(payload) = rec.signed_payload() {
                        rec.dssematerial = Some(sign_material(&self.key, &payload));
                    }
                }
                SigningMode::None => {}
            }
            let Ok(bytes) = rec.to_bytes() else {
                self.health.events_rejected.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            if bytes.len() > MAX_RECORD_BYTES {
                self.health.events_rejected.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let hash = record_hash(&bytes);
            self.state
                .advance_run(&ev.cell_id, &ev.run_id, sequence, hash.clone());
            if let Some((stream, seq)) = ev.guest_key() {
                let k = (ev.cell_id.clone(), ev.run_id.clone(), stream.clone(), seq);
                staged_set.insert(k.clone());
                b.staged.push(k);
            }
            if mode == SigningMode::Batch {
                covered.push((rec.id.clone(), hash));
            }
            self.emit(&mut b, &bytes);
            b.written += 1;
        }
        if mode == SigningMode::Batch && !covered.is_empty() {
            let n = self.state.last_batch + 1;
            let data = BatchHeadData {
                host: host.to_owned(),
                batch: n.to_string(),
                prevhash: self.state.last_batch_hash.clone(),
                events: covered,
            };
            let data_bytes = serde_json::to_string(&data).unwrap_or_default();
            let material = sign_material(&self.key, data_bytes.as_bytes());
            let head = Record {
                specversion: "1.0".to_owned(),
                id: head_id,
                source: journal_source(host),
                ty: BATCH_HEAD_TYPE.to_owned(),
                time: rfc3339(now),
                datacontenttype: Some("application/json".to_owned()),
                cellid: None,
                runid: None,
                streamid: None,
                guestseq: None,
                sequence: n.to_string(),
                recordedtime: rfc3339(now),
                prevhash: data.prevhash,
                opid: None,
                guesttime: None,
                guestclaims: None,
                batchhead: None,
                datasha256: None,
                signedextattrs: None,
                dssematerial: Some(material),
                data: RawValue::from_string(data_bytes).ok(),
                data_base64: None,
            };
            if let Ok(bytes) = head.to_bytes() {
                self.state.last_batch = n;
                self.state.last_batch_hash = record_hash(&bytes);
                self.emit(&mut b, &bytes);
            }
        }
        b
    }

    fn emit(&self, b: &mut Built, bytes: &[u8]) {
        match self.out {
            Output::Segments(_) => encode_record(bytes, &mut b.buf),
            Output::Stdout => {
                b.lines.extend_from_slice(bytes);
                b.lines.push(b'\n');
            }
        }
    }

    /// Writes a built batch, retrying while the write fails (ENOSPC): health is degraded
    /// and no ack is sent meanwhile; no new input is taken, so the backlog stays bounded by
    /// the input channel. Gives up only when asked to shut down.
    fn write_until_durable(&mut self, built: &Built, now: u64) -> Result<(), JournalError> {
        if built.buf.is_empty() && built.lines.is_empty() {
            return Ok(());
        }
        loop {
            let res = match &mut self.out {
                Output::Segments(seg) => seg.write_batch(&built.buf, now, &self.health),
                Output::Stdout => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&built.lines).and_then(|()| out.flush())
                }
            };
            match res {
                Ok(()) => {
                    self.health.recover();
                    return Ok(());
                }
                Err(e) => {
                    let reason = if e.raw_os_error() == Some(libc::ENOSPC) {
                        format!(
                            "journal disk is full (ENOSPC); acks are held until space returns: {e}"
                        )
                    } else {
                        format!("journal write failed; acks are held and the write is retried: {e}")
                    };
                    self.health.write_failures.fetch_add(1, Ordering::Relaxed);
                    self.health.degrade(reason.clone());
                    if self.stop.load(Ordering::Acquire) {
                        return Err(JournalError::Unwritten {
                            events: built.written,
                            reason,
                        });
                    }
                    std::thread::sleep(WRITE_RETRY_INTERVAL);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_round_trips_and_rejects_damage() {
        let m = format_mark(3, 4096);
        assert_eq!(parse_mark(&m), Some((3, 4096)));
        assert_eq!(parse_mark(&m.replace("4096", "4097")), None);
        assert_eq!(
            format_mark(0, 0).len(),
            format_mark(9_999_999, 1 << 40).len()
        );
    }
}
