//! What crosses the drain thread's boundary: the items it hands off ([`DrainOutput`], with
//! one [`GuestBatch`] per received chunk) and the commands it accepts ([`DrainCommand`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use vigil_wire::pb;

use crate::cell::{CellInfo, CellSpec};
use crate::stats::{CloseReason, RejectReason};

/// Identity of one connection inside the drain: slot index and a generation, so a command for
/// a connection that has closed (and whose slot was reused) is recognised as stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    pub slot: u32,
    pub generation: u32,
}

impl ConnId {
    /// The connection as one opaque `u64` (journal tokens, policy gates).
    pub fn token(self) -> u64 {
        (u64::from(self.generation) << 32) | u64::from(self.slot)
    }

    /// The inverse of [`ConnId::token`].
    pub fn from_token(token: u64) -> Self {
        Self {
            slot: token as u32,
            generation: (token >> 32) as u32,
        }
    }
}

/// One guest event. Its strings and payload were copied once out of the receive buffer into
/// the batch's shared arena (every event of a received chunk back to back in one allocation,
/// shared through an `Arc`), so a chunk of 30 events costs one allocation and one free, not
/// thirty — the free happening on the consumer's thread.
#[derive(Clone)]
pub struct GuestEvent {
    pub guest_seq: u64,
    pub guest_time_unix_nano: u64,
    arena: Arc<Vec<u8>>,
    start: u32,
    type_end: u32,
    op_end: u32,
    content_type_end: u32,
    end: u32,
}

/// Where one event's fields lie in the arena being built.
#[derive(Clone, Copy)]
struct EventMeta {
    guest_seq: u64,
    guest_time_unix_nano: u64,
    start: u32,
    type_end: u32,
    op_end: u32,
    content_type_end: u32,
    end: u32,
}

/// Gathers the events of one received chunk into one arena; [`EventBuilder::take`] turns them
/// into [`GuestEvent`]s sharing it.
#[derive(Default)]
pub(crate) struct EventBuilder {
    bytes: Vec<u8>,
    metas: Vec<EventMeta>,
}

impl EventBuilder {
    /// Reserves room for a chunk of `bytes` (an upper bound of the events' bytes).
    pub(crate) fn reserve(&mut self, bytes: usize, events: usize) {
        if self.bytes.capacity() == 0 {
            self.bytes.reserve(bytes);
            self.metas.reserve(events);
        }
    }

    /// Copies one decoded event's fields into the arena.
    pub(crate) fn push(
        &mut self,
        guest_seq: u64,
        event_type: &str,
        op_id: &str,
        content_type: &str,
        payload: &[u8],
        guest_time_unix_nano: u64,
    ) {
        let start = self.bytes.len() as u32;
        self.bytes.extend_from_slice(event_type.as_bytes());
        let type_end = self.bytes.len() as u32;
        self.bytes.extend_from_slice(op_id.as_bytes());
        let op_end = self.bytes.len() as u32;
        self.bytes.extend_from_slice(content_type.as_bytes());
        let content_type_end = self.bytes.len() as u32;
        self.bytes.extend_from_slice(payload);
        let end = self.bytes.len() as u32;
        self.metas.push(EventMeta {
            guest_seq,
            guest_time_unix_nano,
            start,
            type_end,
            op_end,
            content_type_end,
            end,
        });
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.metas.is_empty()
    }

    /// The gathered events, sharing one arena; the builder is empty afterwards.
    pub(crate) fn take(&mut self) -> Vec<GuestEvent> {
        let arena = Arc::new(std::mem::take(&mut self.bytes));
        let events = self
            .metas
            .drain(..)
            .map(|m| GuestEvent {
                guest_seq: m.guest_seq,
                guest_time_unix_nano: m.guest_time_unix_nano,
                arena: Arc::clone(&arena),
                start: m.start,
                type_end: m.type_end,
                op_end: m.op_end,
                content_type_end: m.content_type_end,
                end: m.end,
            })
            .collect();
        self.metas = Vec::new();
        events
    }
}

impl GuestEvent {
    /// One event with an arena of its own (tests and callers outside the drain).
    pub fn new(
        guest_seq: u64,
        event_type: &str,
        op_id: &str,
        content_type: &str,
        payload: &[u8],
        guest_time_unix_nano: u64,
    ) -> Self {
        let mut b = EventBuilder::default();
        b.push(
            guest_seq,
            event_type,
            op_id,
            content_type,
            payload,
            guest_time_unix_nano,
        );
        let m = b.metas[0];
        GuestEvent {
            guest_seq,
            guest_time_unix_nano,
            arena: Arc::new(b.bytes),
            start: m.start,
            type_end: m.type_end,
            op_end: m.op_end,
            content_type_end: m.content_type_end,
            end: m.end,
        }
    }

    fn str_at(&self, start: u32, end: u32) -> &str {
        let bytes = &self.arena[start as usize..end as usize];
        // SAFETY: the range holds exactly the bytes of a `&str` copied in `EventBuilder::push`,
        // so it is valid UTF-8 and starts and ends on character boundaries.
        unsafe { std::str::from_utf8_unchecked(bytes) }
    }

    /// CloudEvents `type` of the event.
    pub fn event_type(&self) -> &str {
        self.str_at(self.start, self.type_end)
    }

    /// "{trace_id}:{span_id}" of the event's operation, or empty.
    pub fn op_id(&self) -> &str {
        self.str_at(self.type_end, self.op_end)
    }

    /// MIME type of the payload.
    pub fn content_type(&self) -> &str {
        self.str_at(self.op_end, self.content_type_end)
    }

    /// The payload bytes.
    pub fn payload(&self) -> &[u8] {
        &self.arena[self.content_type_end as usize..self.end as usize]
    }
}

impl PartialEq for GuestEvent {
    fn eq(&self, other: &Self) -> bool {
        self.guest_seq == other.guest_seq
            && self.guest_time_unix_nano == other.guest_time_unix_nano
            && self.event_type() == other.event_type()
            && self.op_id() == other.op_id()
            && self.content_type() == other.content_type()
            && self.payload() == other.payload()
    }
}

impl Eq for GuestEvent {}

impl std::fmt::Debug for GuestEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestEvent")
            .field("guest_seq", &self.guest_seq)
            .field("event_type", &self.event_type())
            .field("op_id", &self.op_id())
            .field("content_type", &self.content_type())
            .field("payload_len", &self.payload().len())
            .field("guest_time_unix_nano", &self.guest_time_unix_nano)
            .finish_non_exhaustive()
    }
}

/// Counts a connection's batches that are in the hand-off channel or held by the consumer;
/// dropping the batch gives the credit back. The drain stops receiving from a connection
/// whose count reaches its quota, so one flooding guest cannot fill the whole channel.
#[derive(Debug)]
pub struct HandoffCredit(Arc<AtomicU32>);

impl HandoffCredit {
    pub(crate) fn take(counter: &Arc<AtomicU32>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(counter))
    }
}

impl Drop for HandoffCredit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Release);
    }
}

/// The events decoded from one received chunk of one connection.
#[derive(Debug)]
pub struct GuestBatch {
    pub conn: ConnId,
    pub cell: Arc<CellInfo>,
    /// The stream id from the connection's Hello.
    pub stream_id: Arc<str>,
    /// CLOCK_MONOTONIC ns when the chunk was taken from the completion queue.
    pub received_mono_ns: u64,
    /// Heartbeats in the chunk (they carry nothing but liveness).
    pub heartbeats: u32,
    pub events: Vec<GuestEvent>,
    pub(crate) credit: Option<HandoffCredit>,
}

/// Where a refused connection came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// An AF_VSOCK peer, by CID (None when its address could not be read).
    Vsock { cid: Option<u32> },
    /// A hybrid-vsock listener path.
    Unix { path: PathBuf },
}

/// Everything the drain hands to the rest of vigil, in order per connection.
#[derive(Debug)]
pub enum DrainOutput {
    /// A connection was accepted and assigned to `cell`.
    Connected { conn: ConnId, cell: Arc<CellInfo> },
    /// The connection's Hello (claims are recorded, never used as identity).
    Hello {
        conn: ConnId,
        cell: Arc<CellInfo>,
        stream_id: Arc<str>,
        protocol_version: u32,
        agent_name: String,
        agent_version: String,
        claims: BTreeMap<String, String>,
    },
    /// Events of one received chunk.
    Batch(GuestBatch),
    /// A policy query to answer with `DrainCommand::PolicyDecision`.
    PolicyQuery {
        conn: ConnId,
        cell: Arc<CellInfo>,
        stream_id: Arc<str>,
        query_id: u64,
        op_id: String,
        action: String,
    },
    /// The guest's executor timing report.
    ExecutorStats {
        conn: ConnId,
        cell: Arc<CellInfo>,
        stats: pb::ExecutorStats,
    },
    /// The connection is closed; nothing more comes from it.
    Closed {
        conn: ConnId,
        cell: Arc<CellInfo>,
        reason: CloseReason,
    },
    /// A connection was refused before being assigned to a cell.
    Rejected { reason: RejectReason, peer: Peer },
    /// A policy query was denied or held, or a hold ended (for the audit trail).
    PolicyAudit {
        conn: ConnId,
        cell: Arc<CellInfo>,
        op_id: String,
        action: String,
        /// `deny_*`, `hold`, or the final decision of an ended hold.
        decision: &'static str,
        /// How long it was held (0 unless a hold ended).
        held_ns: u64,
    },
    /// An `AddCell` command could not be carried out (the cell is not registered).
    CellError {
        cell_id: String,
        error: crate::event_loop::DrainError,
    },
}

/// Commands into the drain loop (sent through [`crate::DrainCommander`]).
#[derive(Debug)]
pub enum DrainCommand {
    /// Registers a cell (a cell with the same `cell_id` is replaced: its connections close).
    AddCell(CellSpec),
    /// Removes a cell: closes its listener (removing the socket file) and its connections.
    RemoveCell { cell: String },
    /// Tells the guest that every event of the connection's stream up to `durable_seq` is
    /// durable.
    Ack { conn: ConnId, durable_seq: u64 },
    /// Answers a policy query.
    PolicyDecision {
        conn: ConnId,
        query_id: u64,
        decision: pb::policy_decision::Decision,
        reason: String,
    },
    /// Sends one Error frame and closes the connection.
    CloseConn {
        conn: ConnId,
        code: pb::error::Code,
        message: String,
    },
    /// Closes every connection (sending SHUTTING_DOWN), delivers what is pending and stops.
    Shutdown,
    /// Blocks the drain thread for this long (a fault-injection hook for the receiver-stall
    /// tests: the kernel keeps queueing guest data while user space reads nothing).
    Stall(std::time::Duration),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_event_round_trips_its_fields_including_empty_and_multibyte() {
        let e = GuestEvent::new(7, "dev.vigil.é", "", "text/plain", b"\x00\xffpayload", 99);
        assert_eq!(e.guest_seq, 7);
        assert_eq!(e.event_type(), "dev.vigil.é");
        assert_eq!(e.op_id(), "");
        assert_eq!(e.content_type(), "text/plain");
        assert_eq!(e.payload(), b"\x00\xffpayload");
        assert_eq!(e.guest_time_unix_nano, 99);
        let empty = GuestEvent::new(1, "t", "a:b", "", &[], 0);
        assert_eq!(empty.op_id(), "a:b");
        assert_eq!(empty.content_type(), "");
        assert!(empty.payload().is_empty());
    }
}
