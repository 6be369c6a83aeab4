//! Types shared by the kernel side (the `vigil-ebpf` programs) and user space (the `vigil`
//! agent): map keys and values with explicit padding and size assertions, the tracepoint
//! record layout the programs read, and the map names and capacities both sides agree on.
#![no_std]

/// Name of the per-peer LRU map written by the receive-path program.
pub const PEER_MAP: &str = "VIGIL_PEERS";
/// Name of the per-peer LRU map written by the send-path (`alloc_pkt`) program.
pub const PEER_TX_MAP: &str = "VIGIL_PEERS_TX";
/// Name of the program on `vsock:virtio_transport_recv_pkt` (guest → host packets).
pub const PROG_RECV: &str = "vigil_recv_pkt";
/// Name of the program on `vsock:virtio_transport_alloc_pkt` (host → guest packets).
pub const PROG_ALLOC: &str = "vigil_alloc_pkt";
/// Tracepoint category and names the programs attach to.
pub const TP_CATEGORY: &str = "vsock";
pub const TP_RECV: &str = "virtio_transport_recv_pkt";
pub const TP_ALLOC: &str = "virtio_transport_alloc_pkt";

/// Capacity of each per-peer map. A host runs at most a few thousand guests, each with a
/// handful of connections to vigil's port (one per emitter stream) plus short-lived probe
/// connections; 16,384 peers covers 1,000 guests × 16 connections. The maps are LRU, so when
/// full the least recently active peer is evicted (an idle peer that long gone is no
/// evidence either way), never a fresh one refused.
pub const PEER_MAP_CAPACITY: u32 = 16_384;

/// virtio-vsock operations (`enum virtio_vsock_op` in the kernel's uapi).
pub mod op {
    pub const INVALID: u16 = 0;
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

/// Byte offsets of the fields the programs read in the tracepoint record (the same in the
/// `recv_pkt` and `alloc_pkt` events, stable since the event was added in 4.12). User space
/// checks them against `/sys/kernel/tracing/events/vsock/*/format` before attaching.
pub mod tp_offset {
    pub const SRC_CID: usize = 8;
    pub const SRC_PORT: usize = 12;
    pub const DST_CID: usize = 16;
    pub const DST_PORT: usize = 20;
    pub const LEN: usize = 24;
    pub const OP: usize = 30;
}

/// Key of the per-peer maps: the remote end of a vsock connection as seen by this host, and
/// the local port, so traffic to vigil's own port can be told from other vsock users.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerKey {
    /// The guest's CID (source of a received packet, destination of a sent one).
    pub cid: u32,
    /// The guest's port.
    pub port: u32,
    /// The host's port (vigil's listening port for connections to vigil).
    pub local_port: u32,
    /// Explicit padding so the layout has no implicit holes; always zero.
    pub pad: u32,
}

/// Value of the per-peer maps (per CPU: user space sums counters and takes the largest
/// times across CPUs). Times are `bpf_ktime_get_ns`, i.e. CLOCK_MONOTONIC, the clock user
/// space reads with `clock_gettime(CLOCK_MONOTONIC)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Last packet carrying data (op RW with len > 0); credit updates do not move it.
    pub last_data_ns: u64,
    /// Last packet of any op.
    pub last_any_ns: u64,
    /// Packets of any op.
    pub packets: u64,
    /// Payload bytes of RW packets.
    pub bytes: u64,
    /// RST packets.
    pub rst: u64,
    /// SHUTDOWN packets.
    pub shutdown: u64,
    /// Op of the last packet (see [`op`]).
    pub last_op: u16,
    /// Explicit padding; always zero.
    pub pad: [u8; 6],
}

/// Size the eBPF object was built with; checked in tests against the BTF of the object.
pub const PEER_KEY_SIZE: usize = 16;
/// Size of [`PeerStats`].
pub const PEER_STATS_SIZE: usize = 56;

const _: () = assert!(core::mem::size_of::<PeerKey>() == PEER_KEY_SIZE);
const _: () = assert!(core::mem::size_of::<PeerStats>() == PEER_STATS_SIZE);
const _: () = assert!(core::mem::align_of::<PeerStats>() == 8);
// The fields read stay inside the common part of both records (recv_pkt's is 44 bytes,
// alloc_pkt's 37).
const _: () = assert!(tp_offset::OP + 2 <= 37);

impl PeerStats {
    /// Folds another CPU's value into this one: counters add, times and the last op follow
    /// the latest packet.
    pub fn merge(&mut self, other: &PeerStats) {
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.rst += other.rst;
        self.shutdown += other.shutdown;
        if other.last_any_ns > self.last_any_ns {
            self.last_any_ns = other.last_any_ns;
            self.last_op = other.last_op;
        }
        if other.last_data_ns > self.last_data_ns {
            self.last_data_ns = other.last_data_ns;
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: `PeerKey` is `repr(C)`, `Copy`, made only of integers with explicit padding,
    // so every bit pattern is valid and it has no implicit padding bytes.
    unsafe impl aya::Pod for super::PeerKey {}
    // SAFETY: as above for `PeerStats`: integers only, explicit padding, no holes.
    unsafe impl aya::Pod for super::PeerStats {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn merge_sums_counters_and_keeps_latest_times() {
        let mut a = PeerStats {
            last_data_ns: 10,
            last_any_ns: 20,
            packets: 2,
            bytes: 100,
            rst: 0,
            shutdown: 1,
            last_op: op::RW,
            pad: [0; 6],
        };
        let b = PeerStats {
            last_data_ns: 5,
            last_any_ns: 30,
            packets: 3,
            bytes: 7,
            rst: 1,
            shutdown: 0,
            last_op: op::RST,
            pad: [0; 6],
        };
        a.merge(&b);
        assert_eq!((a.packets, a.bytes, a.rst, a.shutdown), (5, 107, 1, 1));
        assert_eq!(
            (a.last_data_ns, a.last_any_ns, a.last_op),
            (10, 30, op::RST)
        );
    }

    #[test]
    fn last_op_sits_after_the_six_counters() {
        assert_eq!(core::mem::offset_of!(PeerStats, last_op), 48);
    }
}
