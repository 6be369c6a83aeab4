//! Framing: each frame is one protobuf message prefixed by its length as a base-128 varint.
//!
//! [`FrameDecoder`] is the host side, one per guest connection: it is fed whatever bytes
//! arrived (typically a borrowed io_uring provided buffer), decodes every complete frame
//! straight from that buffer when the frame lies wholly inside it, reassembles the frames that
//! straddle two receives in a bounded buffer, validates each message (see `docs/protocol.md`,
//! "Validation") and enforces the connection order (Hello first, exactly once).
//!
//! [`HostFrameDecoder`] is the guest side (the reference client): the same framing, with an
//! owned prost decode of each `HostFrame` (a few small frames per second; no need for more).

mod reader;

use std::fmt;

use prost::Message;

use crate::pb;
use reader::{DecodeFail, Prefix};

/// The protocol version this crate speaks. A Hello with any other version is answered with
/// `Error{code: UNSUPPORTED_VERSION}` and the connection is closed.
pub const PROTOCOL_VERSION: u32 = 1;

/// Default largest frame (length prefix not counted) the host accepts.
///
/// Why 64 KiB: an event is telemetry (a few hundred bytes to a few KiB of JSON); anything
/// bigger belongs in a file the event points to. The bound is also the worst-case
/// reassembly memory of one connection, and a host may hold thousands of connections
/// (Firecracker alone allows 1,023 per VM): 64 KiB x 1,000 connections is 64 MiB in the worst
/// case, and only while frames are actually straddling receives (buffers grow as bytes arrive
/// and [`FrameDecoder::shrink`] releases them). Finally, it keeps a frame a small fraction of
/// a vsock connection's default 256 KiB buffer, so a sender is never stuck behind one frame.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 64 * 1024;

/// Hard cap on the configurable maximum frame size: the default vsock connection buffer
/// (`SO_VM_SOCKETS_BUFFER_SIZE`, 256 KiB), so one frame always fits in flight. A
/// configuration may not exceed it; decoders constructed with more are clamped to it.
pub const MAX_FRAME_BYTES_LIMIT: usize = 256 * 1024;

/// Bytes of a length prefix at most (a 64-bit varint).
pub const MAX_PREFIX_BYTES: usize = 10;

/// `Hello.stream_id` is 1..=128 bytes.
pub const MAX_STREAM_ID_BYTES: usize = 128;
/// `Event.type` is 1..=256 bytes.
pub const MAX_EVENT_TYPE_BYTES: usize = 256;
/// `Event.op_id` and `PolicyQuery.op_id` are at most 256 bytes (may be empty).
pub const MAX_OP_ID_BYTES: usize = 256;
/// `Event.content_type` is at most 128 bytes (may be empty).
pub const MAX_CONTENT_TYPE_BYTES: usize = 128;
/// `PolicyQuery.action` is at most 256 bytes.
pub const MAX_ACTION_BYTES: usize = 256;

/// A reassembly buffer larger than this is released by [`FrameDecoder::shrink`]; smaller ones
/// are kept for reuse (a few KiB per connection is cheap, re-allocating per straddle is not).
const KEEP_REASSEMBLY_BYTES: usize = 4096;

/// Why a frame (or the stream of frames) is refused. After any of these the host sends
/// `Error{code: self.code(), message: self.to_string()}` and closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame length {len} exceeds the maximum frame size of {max} bytes")]
    TooLarge { len: u64, max: usize },
    #[error("frame length prefix is not a valid varint (longer than 10 bytes or over 64 bits)")]
    BadVarint,
    #[error("frame has length 0; every frame must carry a message")]
    EmptyFrame,
    #[error("frame is not a valid protobuf encoding of the message: {detail}")]
    Undecodable { detail: String },
    #[error(
        "frame carries no message kind this host knows (kind unset, or from a protocol newer than version {PROTOCOL_VERSION})"
    )]
    UnknownKind,
    #[error("the first frame of a connection must be a Hello, got {got}")]
    HelloRequired { got: &'static str },
    #[error("a second Hello arrived on a connection that already sent one")]
    DuplicateHello,
    #[error("protocol version {got} is not supported; this host speaks version {supported}")]
    UnsupportedVersion { got: u32, supported: u32 },
    #[error("bad Hello: {detail}")]
    BadHello { detail: String },
    #[error("bad Event (guest_seq {guest_seq}): {detail}")]
    BadEvent { guest_seq: u64, detail: String },
    #[error("bad PolicyQuery (query_id {query_id}): {detail}")]
    BadPolicyQuery { query_id: u64, detail: String },
    #[error("the connection ended inside a frame ({buffered} bytes of it were received)")]
    Truncated { buffered: usize },
    #[error("the decoder already stopped at an earlier error; the connection must be closed")]
    Poisoned,
}

impl FrameError {
    /// The `Error.code` the host sends for this error before closing.
    pub fn code(&self) -> pb::error::Code {
        use pb::error::Code;
        match self {
            FrameError::TooLarge { .. } => Code::FrameTooLarge,
            FrameError::BadVarint => Code::BadVarint,
            FrameError::EmptyFrame
            | FrameError::Undecodable { .. }
            | FrameError::UnknownKind
            | FrameError::Truncated { .. }
            | FrameError::Poisoned => Code::Undecodable,
            FrameError::HelloRequired { .. } => Code::HelloRequired,
            FrameError::UnsupportedVersion { .. } => Code::UnsupportedVersion,
            FrameError::DuplicateHello | FrameError::BadHello { .. } => Code::BadHello,
            FrameError::BadEvent { .. } => Code::BadEvent,
            FrameError::BadPolicyQuery { .. } => Code::BadPolicyQuery,
        }
    }

    /// A snake_case label for metrics (`reason="..."`), one per variant.
    pub fn reason(&self) -> &'static str {
        match self {
            FrameError::TooLarge { .. } => "frame_too_large",
            FrameError::BadVarint => "bad_varint",
            FrameError::EmptyFrame => "empty_frame",
            FrameError::Undecodable { .. } => "undecodable",
            FrameError::UnknownKind => "unknown_kind",
            FrameError::HelloRequired { .. } => "hello_required",
            FrameError::DuplicateHello => "duplicate_hello",
            FrameError::UnsupportedVersion { .. } => "unsupported_version",
            FrameError::BadHello { .. } => "bad_hello",
            FrameError::BadEvent { .. } => "bad_event",
            FrameError::BadPolicyQuery { .. } => "bad_policy_query",
            FrameError::Truncated { .. } => "truncated",
            FrameError::Poisoned => "decoder_poisoned",
        }
    }

    /// The `HostFrame` the host sends before closing the connection for this error.
    pub fn to_host_frame(&self) -> pb::HostFrame {
        pb::HostFrame {
            kind: Some(pb::host_frame::Kind::Error(pb::Error {
                code: self.code() as i32,
                message: self.to_string(),
            })),
        }
    }
}

impl From<DecodeFail> for FrameError {
    fn from(fail: DecodeFail) -> Self {
        FrameError::Undecodable {
            detail: fail.0.to_owned(),
        }
    }
}

impl From<prost::DecodeError> for FrameError {
    fn from(err: prost::DecodeError) -> Self {
        FrameError::Undecodable {
            detail: err.to_string(),
        }
    }
}

/// What [`FrameDecoder::feed`] stops at: a bad frame, or the caller's sink refusing one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedError<E> {
    Frame(FrameError),
    Sink(E),
}

impl<E: fmt::Display> fmt::Display for FeedError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FeedError::Frame(err) => err.fmt(f),
            FeedError::Sink(err) => write!(f, "the frame sink refused a frame: {err}"),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> std::error::Error for FeedError<E> {}

impl<E> From<FrameError> for FeedError<E> {
    fn from(err: FrameError) -> Self {
        FeedError::Frame(err)
    }
}

/// One decoded, validated guest frame. `Event` and `PolicyQuery` borrow from the bytes fed
/// to the decoder (valid only during the callback); the rare kinds are owned.
#[derive(Debug, Clone, PartialEq)]
pub enum GuestFrameView<'a> {
    Hello(pb::Hello),
    Event(EventView<'a>),
    Heartbeat(pb::Heartbeat),
    PolicyQuery(PolicyQueryView<'a>),
    ExecutorStats(pb::ExecutorStats),
}

impl GuestFrameView<'_> {
    /// The message name, for logs and errors.
    pub fn kind_name(&self) -> &'static str {
        match self {
            GuestFrameView::Hello(_) => "Hello",
            GuestFrameView::Event(_) => "Event",
            GuestFrameView::Heartbeat(_) => "Heartbeat",
            GuestFrameView::PolicyQuery(_) => "PolicyQuery",
            GuestFrameView::ExecutorStats(_) => "ExecutorStats",
        }
    }

    /// An owned copy, as prost would decode it.
    pub fn to_owned_frame(&self) -> pb::GuestFrame {
        use pb::guest_frame::Kind;
        let kind = match self {
            GuestFrameView::Hello(h) => Kind::Hello(h.clone()),
            GuestFrameView::Event(e) => Kind::Event(e.to_owned_event()),
            GuestFrameView::Heartbeat(h) => Kind::Heartbeat(*h),
            GuestFrameView::PolicyQuery(q) => Kind::PolicyQuery(q.to_owned_query()),
            GuestFrameView::ExecutorStats(s) => Kind::ExecutorStats(s.clone()),
        };
        pb::GuestFrame { kind: Some(kind) }
    }
}

/// An `Event` read in place: the strings and the payload point into the received bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventView<'a> {
    pub guest_seq: u64,
    pub event_type: &'a str,
    pub op_id: &'a str,
    pub content_type: &'a str,
    pub payload: &'a [u8],
    pub guest_time_unix_nano: u64,
}

impl EventView<'_> {
    pub fn to_owned_event(&self) -> pb::Event {
        pb::Event {
            guest_seq: self.guest_seq,
            r#type: self.event_type.to_owned(),
            op_id: self.op_id.to_owned(),
            content_type: self.content_type.to_owned(),
            payload: self.payload.to_vec(),
            guest_time_unix_nano: self.guest_time_unix_nano,
        }
    }
}

/// A `PolicyQuery` read in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyQueryView<'a> {
    pub query_id: u64,
    pub op_id: &'a str,
    pub action: &'a str,
}

impl PolicyQueryView<'_> {
    pub fn to_owned_query(&self) -> pb::PolicyQuery {
        pb::PolicyQuery {
            query_id: self.query_id,
            op_id: self.op_id.to_owned(),
            action: self.action.to_owned(),
        }
    }
}

/// Decodes one GuestFrame message (the bytes after the length prefix) without validating
/// it: exactly what prost would decode, with `Event` and `PolicyQuery` read zero-copy.
/// `Ok(None)` when the frame carries no kind this version knows.
pub fn decode_guest_frame_unchecked(
    bytes: &[u8],
) -> Result<Option<GuestFrameView<'_>>, FrameError> {
    let scan = reader::scan_guest_frame(bytes)?;
    match scan.kind {
        reader::TAG_EVENT | reader::TAG_POLICY_QUERY => {
            if scan.mixed {
                // Another oneof field came earlier and was overridden. prost would still
                // decode (and so reject) its contents; let prost check the whole frame. Rare:
                // no correct sender puts two kinds in one frame.
                pb::GuestFrame::decode(bytes)?;
            }
            if scan.kind == reader::TAG_EVENT {
                Ok(Some(GuestFrameView::Event(reader::read_event(
                    bytes, scan,
                )?)))
            } else {
                Ok(Some(GuestFrameView::PolicyQuery(
                    reader::read_policy_query(bytes, scan)?,
                )))
            }
        }
        reader::TAG_HELLO | reader::TAG_HEARTBEAT | reader::TAG_EXECUTOR_STATS => {
            use pb::guest_frame::Kind;
            let frame = pb::GuestFrame::decode(bytes)?;
            Ok(match frame.kind {
                Some(Kind::Hello(h)) => Some(GuestFrameView::Hello(h)),
                Some(Kind::Heartbeat(h)) => Some(GuestFrameView::Heartbeat(h)),
                Some(Kind::ExecutorStats(s)) => Some(GuestFrameView::ExecutorStats(s)),
                // The scan said Hello, Heartbeat or ExecutorStats wins; prost agrees (both
                // take the last oneof field). Defensive all the same: never panic on input.
                Some(Kind::Event(_) | Kind::PolicyQuery(_)) | None => None,
            })
        }
        _ => Ok(None),
    }
}

/// Decodes and validates one GuestFrame message (the bytes after the length prefix). Does not
/// check the connection order (that needs the connection's state: [`FrameDecoder`] does).
pub fn decode_guest_frame(bytes: &[u8]) -> Result<GuestFrameView<'_>, FrameError> {
    if bytes.is_empty() {
        return Err(FrameError::EmptyFrame);
    }
    let view = decode_guest_frame_unchecked(bytes)?.ok_or(FrameError::UnknownKind)?;
    validate(&view)?;
    Ok(view)
}

fn len_in(what: &str, s: &str, min: usize, max: usize) -> Result<(), String> {
    if (min..=max).contains(&s.len()) {
        Ok(())
    } else if min == 0 {
        Err(format!(
            "{what} must be at most {max} bytes, got {}",
            s.len()
        ))
    } else {
        Err(format!(
            "{what} must be {min}..={max} bytes, got {}",
            s.len()
        ))
    }
}

/// The validation rules of `docs/protocol.md`, "Validation".
pub fn validate(view: &GuestFrameView<'_>) -> Result<(), FrameError> {
    match view {
        GuestFrameView::Hello(h) => {
            if h.protocol_version != PROTOCOL_VERSION {
                return Err(FrameError::UnsupportedVersion {
                    got: h.protocol_version,
                    supported: PROTOCOL_VERSION,
                });
            }
            len_in("stream_id", &h.stream_id, 1, MAX_STREAM_ID_BYTES)
                .map_err(|detail| FrameError::BadHello { detail })
        }
        GuestFrameView::Event(e) => {
            let bad = |detail| FrameError::BadEvent {
                guest_seq: e.guest_seq,
                detail,
            };
            if e.guest_seq == 0 {
                return Err(bad("guest_seq must be at least 1".to_owned()));
            }
            len_in("type", e.event_type, 1, MAX_EVENT_TYPE_BYTES).map_err(bad)?;
            len_in("op_id", e.op_id, 0, MAX_OP_ID_BYTES).map_err(bad)?;
            len_in("content_type", e.content_type, 0, MAX_CONTENT_TYPE_BYTES).map_err(bad)
        }
        GuestFrameView::PolicyQuery(q) => {
            let bad = |detail| FrameError::BadPolicyQuery {
                query_id: q.query_id,
                detail,
            };
            len_in("op_id", q.op_id, 0, MAX_OP_ID_BYTES).map_err(bad)?;
            len_in("action", q.action, 0, MAX_ACTION_BYTES).map_err(bad)
        }
        GuestFrameView::Heartbeat(_) | GuestFrameView::ExecutorStats(_) => Ok(()),
    }
}

/// Length-prefix framing with bounded reassembly, shared by both decoders.
#[derive(Debug)]
struct Framer {
    max: usize,
    /// Bytes of a length prefix that straddles two feeds (`prefix_len` of them).
    prefix: [u8; MAX_PREFIX_BYTES],
    prefix_len: usize,
    /// Length of the frame being reassembled in `buf`; 0 when none is.
    body_len: usize,
    buf: Vec<u8>,
    poisoned: bool,
}

impl Framer {
    fn new(max_frame_bytes: usize) -> Self {
        Framer {
            max: max_frame_bytes.min(MAX_FRAME_BYTES_LIMIT),
            prefix: [0; MAX_PREFIX_BYTES],
            prefix_len: 0,
            body_len: 0,
            buf: Vec::new(),
            poisoned: false,
        }
    }

    fn check_len(&self, len: u64) -> Result<usize, FrameError> {
        if len == 0 {
            Err(FrameError::EmptyFrame)
        } else if len > self.max as u64 {
            Err(FrameError::TooLarge { len, max: self.max })
        } else {
            Ok(len as usize)
        }
    }

    /// Appends received bytes of the frame being reassembled. Capacity grows with the bytes
    /// that arrived (doubling, for amortised cost) but never past the frame's own length, so
    /// a length prefix that lies costs only what was actually sent.
    fn append(&mut self, bytes: &[u8]) {
        let needed = self.buf.len() + bytes.len();
        if needed > self.buf.capacity() {
            let target = needed
                .max(self.buf.capacity() * 2)
                .min(self.body_len)
                .max(needed);
            self.buf.reserve_exact(target - self.buf.len());
        }
        self.buf.extend_from_slice(bytes);
    }

    fn feed<E>(
        &mut self,
        chunk: &[u8],
        sink: &mut impl FnMut(&[u8]) -> Result<(), FeedError<E>>,
    ) -> Result<(), FeedError<E>> {
        if self.poisoned {
            return Err(FeedError::Frame(FrameError::Poisoned));
        }
        let result = self.feed_inner(chunk, sink);
        if result.is_err() {
            self.poisoned = true;
        }
        result
    }

    fn feed_inner<E>(
        &mut self,
        chunk: &[u8],
        sink: &mut impl FnMut(&[u8]) -> Result<(), FeedError<E>>,
    ) -> Result<(), FeedError<E>> {
        let mut rest = chunk;

        // 1. Finish a length prefix that straddled the previous feed.
        if self.prefix_len > 0 {
            let mut done = false;
            while let Some((&b, tail)) = rest.split_first() {
                rest = tail;
                self.prefix[self.prefix_len] = b;
                self.prefix_len += 1;
                if b < 0x80 {
                    done = true;
                    break;
                }
                if self.prefix_len == MAX_PREFIX_BYTES {
                    return Err(FrameError::BadVarint.into());
                }
            }
            if !done {
                return Ok(());
            }
            let len = match reader::read_prefix(&self.prefix[..self.prefix_len]) {
                Prefix::Complete(len, _) => len,
                Prefix::Incomplete | Prefix::Invalid => return Err(FrameError::BadVarint.into()),
            };
            self.prefix_len = 0;
            self.body_len = self.check_len(len)?;
        }

        // 2. Finish a frame body that straddled the previous feed.
        if self.body_len > 0 {
            let take = (self.body_len - self.buf.len()).min(rest.len());
            let (part, tail) = rest.split_at(take);
            self.append(part);
            rest = tail;
            if self.buf.len() < self.body_len {
                return Ok(());
            }
            self.body_len = 0;
            let result = sink(&self.buf);
            self.buf.clear();
            result?;
        }

        // 3. Frames wholly inside the chunk: decoded in place, no copy.
        while !rest.is_empty() {
            match reader::read_prefix(rest) {
                Prefix::Complete(len, n) => {
                    let len = self.check_len(len)?;
                    let body = &rest[n..];
                    if body.len() >= len {
                        let (frame, tail) = body.split_at(len);
                        rest = tail;
                        sink(frame)?;
                    } else {
                        self.body_len = len;
                        self.append(body);
                        return Ok(());
                    }
                }
                Prefix::Incomplete => {
                    // Fewer than 10 bytes, so they fit.
                    self.prefix[..rest.len()].copy_from_slice(rest);
                    self.prefix_len = rest.len();
                    return Ok(());
                }
                Prefix::Invalid => return Err(FrameError::BadVarint.into()),
            }
        }
        Ok(())
    }

    fn buffered_bytes(&self) -> usize {
        self.prefix_len + self.buf.len()
    }

    fn is_idle(&self) -> bool {
        self.prefix_len == 0 && self.body_len == 0
    }

    fn shrink(&mut self) {
        if self.is_idle() && self.buf.capacity() > KEEP_REASSEMBLY_BYTES {
            self.buf = Vec::new();
        }
    }

    fn finish(&self) -> Result<(), FrameError> {
        if self.is_idle() {
            Ok(())
        } else {
            Err(FrameError::Truncated {
                buffered: self.buffered_bytes(),
            })
        }
    }
}

/// Host-side decoder of one guest connection's byte stream. See the module docs.
#[derive(Debug)]
pub struct FrameDecoder {
    framer: Framer,
    hello_seen: bool,
}

impl FrameDecoder {
    /// `max_frame_bytes` is the largest frame accepted (length prefix not counted); values
    /// above [`MAX_FRAME_BYTES_LIMIT`] are clamped to it. Allocates nothing.
    pub fn new(max_frame_bytes: usize) -> Self {
        FrameDecoder {
            framer: Framer::new(max_frame_bytes),
            hello_seen: false,
        }
    }

    /// Feeds bytes just received (e.g. a borrowed io_uring ring buffer). Calls `on_frame`
    /// once per complete frame, in order. Frames wholly inside `chunk` are decoded straight
    /// from it (no copy); a frame split across chunks is reassembled in an internal buffer
    /// bounded by max_frame_bytes, grown only as bytes actually arrive (a lying length prefix
    /// does not allocate max bytes). Stops at the first error (frames before it were
    /// delivered); the connection must then be closed, and later calls return
    /// [`FrameError::Poisoned`].
    ///
    /// Besides each message's own rules, the first frame must be a Hello and no other Hello
    /// may follow ([`FrameError::HelloRequired`], [`FrameError::DuplicateHello`]).
    pub fn feed<E>(
        &mut self,
        chunk: &[u8],
        on_frame: &mut impl FnMut(GuestFrameView<'_>) -> Result<(), E>,
    ) -> Result<(), FeedError<E>> {
        let FrameDecoder { framer, hello_seen } = self;
        framer.feed(chunk, &mut |bytes: &[u8]| {
            let view = decode_guest_frame(bytes)?;
            let is_hello = matches!(view, GuestFrameView::Hello(_));
            if !*hello_seen && !is_hello {
                return Err(FrameError::HelloRequired {
                    got: view.kind_name(),
                }
                .into());
            }
            if *hello_seen && is_hello {
                return Err(FrameError::DuplicateHello.into());
            }
            *hello_seen = true;
            on_frame(view).map_err(FeedError::Sink)
        })
    }

    /// Bytes of an incomplete frame held (length prefix included).
    pub fn buffered_bytes(&self) -> usize {
        self.framer.buffered_bytes()
    }

    /// No partial frame held: the connection may end here without losing anything.
    pub fn is_idle(&self) -> bool {
        self.framer.is_idle()
    }

    /// Releases a large reassembly buffer when idle (e.g. after a quiet period).
    pub fn shrink(&mut self) {
        self.framer.shrink();
    }

    /// Capacity of the reassembly buffer (for memory accounting and tests).
    pub fn reassembly_capacity(&self) -> usize {
        self.framer.buf.capacity()
    }

    /// The connection's Hello has been accepted.
    pub fn hello_seen(&self) -> bool {
        self.hello_seen
    }

    /// The largest frame accepted, after clamping.
    pub fn max_frame_bytes(&self) -> usize {
        self.framer.max
    }

    /// Call at end of stream: an error if the stream ended inside a frame.
    pub fn finish(&self) -> Result<(), FrameError> {
        self.framer.finish()
    }
}

/// Guest-side decoder of the host's frames (same framing; owned prost decode).
#[derive(Debug)]
pub struct HostFrameDecoder {
    framer: Framer,
}

impl HostFrameDecoder {
    pub fn new(max_frame_bytes: usize) -> Self {
        HostFrameDecoder {
            framer: Framer::new(max_frame_bytes),
        }
    }

    /// Like [`FrameDecoder::feed`], for HostFrames. A HostFrame whose kind this version does
    /// not know is delivered with `kind: None` (a client may ignore it).
    pub fn feed<E>(
        &mut self,
        chunk: &[u8],
        on_frame: &mut impl FnMut(pb::HostFrame) -> Result<(), E>,
    ) -> Result<(), FeedError<E>> {
        self.framer.feed(chunk, &mut |bytes: &[u8]| {
            let frame = pb::HostFrame::decode(bytes).map_err(FrameError::from)?;
            on_frame(frame).map_err(FeedError::Sink)
        })
    }

    pub fn buffered_bytes(&self) -> usize {
        self.framer.buffered_bytes()
    }

    pub fn is_idle(&self) -> bool {
        self.framer.is_idle()
    }

    pub fn finish(&self) -> Result<(), FrameError> {
        self.framer.finish()
    }
}

fn encode_framed(msg: &impl Message, out: &mut Vec<u8>) {
    let len = msg.encoded_len();
    out.reserve(len + MAX_PREFIX_BYTES);
    prost::encoding::encode_varint(len as u64, out);
    msg.encode_raw(out);
}

/// Appends `frame` to `out` as one frame: varint length, then the message.
pub fn encode_guest_frame(frame: &pb::GuestFrame, out: &mut Vec<u8>) {
    encode_framed(frame, out);
}

/// Appends `frame` to `out` as one frame: varint length, then the message.
pub fn encode_host_frame(frame: &pb::HostFrame, out: &mut Vec<u8>) {
    encode_framed(frame, out);
}
