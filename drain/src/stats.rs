//! Drain-wide counters ([`DrainStats`]), one per accept/reject/close reason, readable from any
//! thread, and the reason enums that index them.

use std::sync::atomic::{AtomicU64, Ordering};

/// Why a connection was closed. Each reason has its own counter in [`DrainStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// The peer closed (EOF, or hang-up seen by the poll with nothing left to read).
    PeerClosed,
    /// The connection was reset (`SO_ERROR` set, e.g. a vsock reset behind `-ENOBUFS`).
    Reset,
    /// A receive or send failed with an unexpected error.
    IoError,
    /// A frame arrived before the Hello.
    HelloRequired,
    /// A second Hello on the same connection.
    SecondHello,
    /// The Hello named a protocol version the host does not speak.
    UnsupportedVersion,
    /// The Hello was malformed (e.g. stream id empty or over 128 bytes).
    BadHello,
    /// An Event broke a validation rule (e.g. guest_seq 0, type empty or too long).
    BadEvent,
    /// A PolicyQuery broke a validation rule.
    BadPolicyQuery,
    /// A frame's length exceeded the maximum frame size.
    FrameTooLarge,
    /// A length prefix was not a valid varint.
    BadVarint,
    /// A frame was not a decodable GuestFrame of a known kind (or was empty).
    Undecodable,
    /// No Hello arrived within `hello_timeout`.
    HelloTimeout,
    /// The caller asked for it (`DrainCommand::CloseConn`).
    Command,
    /// The cell was removed or registered again.
    CellRemoved,
    /// The drain is shutting down.
    Shutdown,
}

impl CloseReason {
    /// Number of reasons (size of the counter array).
    pub const COUNT: usize = 16;
    /// Every reason, in counter order.
    pub const ALL: [CloseReason; Self::COUNT] = [
        Self::PeerClosed,
        Self::Reset,
        Self::IoError,
        Self::HelloRequired,
        Self::SecondHello,
        Self::UnsupportedVersion,
        Self::BadHello,
        Self::BadEvent,
        Self::BadPolicyQuery,
        Self::FrameTooLarge,
        Self::BadVarint,
        Self::Undecodable,
        Self::HelloTimeout,
        Self::Command,
        Self::CellRemoved,
        Self::Shutdown,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// A short stable name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::PeerClosed => "peer_closed",
            Self::Reset => "reset",
            Self::IoError => "io_error",
            Self::HelloRequired => "hello_required",
            Self::SecondHello => "second_hello",
            Self::UnsupportedVersion => "unsupported_version",
            Self::BadHello => "bad_hello",
            Self::BadEvent => "bad_event",
            Self::BadPolicyQuery => "bad_policy_query",
            Self::FrameTooLarge => "frame_too_large",
            Self::BadVarint => "bad_varint",
            Self::Undecodable => "undecodable",
            Self::HelloTimeout => "hello_timeout",
            Self::Command => "command",
            Self::CellRemoved => "cell_removed",
            Self::Shutdown => "shutdown",
        }
    }
}

/// Why an incoming connection was refused before it became a connection of a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// The vsock peer's CID is not registered to any cell.
    UnregisteredCid,
    /// The drain already holds `MAX_CONNECTIONS` connections.
    TooManyConnections,
    /// The peer address of an accepted vsock connection could not be read.
    NoPeerAddress,
}

impl RejectReason {
    /// Number of reasons.
    pub const COUNT: usize = 3;
    /// Every reason, in counter order.
    pub const ALL: [RejectReason; Self::COUNT] = [
        Self::UnregisteredCid,
        Self::TooManyConnections,
        Self::NoPeerAddress,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// A short stable name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::UnregisteredCid => "unregistered_cid",
            Self::TooManyConnections => "too_many_connections",
            Self::NoPeerAddress => "no_peer_address",
        }
    }
}

/// Counters of the drain loop. All relaxed atomics: each is written by the drain thread only.
#[derive(Debug, Default)]
pub struct DrainStats {
    closes: [AtomicU64; CloseReason::COUNT],
    rejects: [AtomicU64; RejectReason::COUNT],
    /// CLOCK_MONOTONIC ns of the loop's latest iteration (it wakes at least every
    /// `IDLE_WAKE_NS`), for the silence classifier's "is the receiver stalled?".
    pub last_loop_mono_ns: AtomicU64,
    /// Connections accepted and assigned to a cell.
    pub accepted: AtomicU64,
    /// Complete frames decoded.
    pub frames: AtomicU64,
    /// Bytes received.
    pub bytes: AtomicU64,
    /// Batches handed off.
    pub batches: AtomicU64,
    /// Multishot recvs re-armed after `-ENOBUFS` (buffer ring was empty).
    pub enobufs_rearms: AtomicU64,
    /// Multishot recvs re-armed after ending without an error (F_MORE cleared).
    pub recv_rearms: AtomicU64,
    /// Multishot accepts re-armed (e.g. after `-EINTR` on AF_VSOCK).
    pub accept_rearms: AtomicU64,
    /// Times a connection's receiving was paused by back-pressure (hand-off full or quota).
    pub backpressure_pauses: AtomicU64,
    /// Host frames (acks, decisions, errors) queued for sending.
    pub host_frames_sent: AtomicU64,
    /// Policy queries answered DENY on the drain thread (`deny_policy_queries_inline`).
    pub policy_denied_inline: AtomicU64,
    /// Commands naming a connection that no longer exists.
    pub stale_commands: AtomicU64,
    /// Rejected-connection log lines suppressed by the once-per-minute limit.
    pub reject_logs_suppressed: AtomicU64,
}

impl DrainStats {
    /// CLOCK_MONOTONIC ns of the loop's latest iteration (0 before the first).
    pub fn last_loop_mono_ns(&self) -> u64 {
        self.last_loop_mono_ns.load(Ordering::Relaxed)
    }

    /// Connections closed for `reason`.
    pub fn closes(&self, reason: CloseReason) -> u64 {
        self.closes[reason.index()].load(Ordering::Relaxed)
    }

    /// Connections refused for `reason`.
    pub fn rejects(&self, reason: RejectReason) -> u64 {
        self.rejects[reason.index()].load(Ordering::Relaxed)
    }

    pub(crate) fn count_close(&self, reason: CloseReason) {
        self.closes[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_reject(&self, reason: RejectReason) {
        self.rejects[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a plain counter field.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_tables_are_in_index_order() {
        for (i, r) in CloseReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        for (i, r) in RejectReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        let s = DrainStats::default();
        s.count_close(CloseReason::Shutdown);
        s.count_reject(RejectReason::NoPeerAddress);
        assert_eq!(s.closes(CloseReason::Shutdown), 1);
        assert_eq!(s.closes(CloseReason::PeerClosed), 0);
        assert_eq!(s.rejects(RejectReason::NoPeerAddress), 1);
    }
}
