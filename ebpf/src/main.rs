//! vigil's kernel programs. Two tracepoint programs on the virtio-vsock transport keep, per
//! vsock peer (guest cid, guest port, host port), the time of the last data packet apart from
//! the last packet of any op, packet and byte counts, and RST/SHUTDOWN counts:
//! - `vigil_recv_pkt` on `vsock:virtio_transport_recv_pkt`: packets the host receives (guest →
//!   host), the evidence the silence classifier reads at a deadline;
//! - `vigil_alloc_pkt` on `vsock:virtio_transport_alloc_pkt`: packets the host sends (host →
//!   guest), so a reader can tell "the host answered" (acks, credit updates) from guest data.
//!
//! Both write per-CPU LRU maps: no atomics or locks on the packet path, and user space folds
//! the CPUs when it reads (on demand, never by polling).
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{map, tracepoint},
    maps::LruPerCpuHashMap,
    programs::TracePointContext,
};
use vigil_common::{op, tp_offset, PeerKey, PeerStats, PEER_MAP_CAPACITY};

#[map(name = "VIGIL_PEERS")]
static VIGIL_PEERS: LruPerCpuHashMap<PeerKey, PeerStats> =
    LruPerCpuHashMap::with_max_entries(PEER_MAP_CAPACITY, 0);

#[map(name = "VIGIL_PEERS_TX")]
static VIGIL_PEERS_TX: LruPerCpuHashMap<PeerKey, PeerStats> =
    LruPerCpuHashMap::with_max_entries(PEER_MAP_CAPACITY, 0);

/// The fields of one tracepoint record that the programs use.
struct Packet {
    src_cid: u32,
    src_port: u32,
    dst_cid: u32,
    dst_port: u32,
    len: u32,
    op: u16,
}

fn read_packet(ctx: &TracePointContext) -> Result<Packet, i64> {
    // SAFETY: the offsets are those of the vsock tracepoint records (checked by user space
    // against the kernel's format file before attaching); `read_at` copies with
    // bpf_probe_read, which fails cleanly rather than faulting.
    unsafe {
        Ok(Packet {
            src_cid: ctx.read_at::<u32>(tp_offset::SRC_CID)?,
            src_port: ctx.read_at::<u32>(tp_offset::SRC_PORT)?,
            dst_cid: ctx.read_at::<u32>(tp_offset::DST_CID)?,
            dst_port: ctx.read_at::<u32>(tp_offset::DST_PORT)?,
            len: ctx.read_at::<u32>(tp_offset::LEN)?,
            op: ctx.read_at::<u16>(tp_offset::OP)?,
        })
    }
}

fn record(
    map: &LruPerCpuHashMap<PeerKey, PeerStats>,
    key: &PeerKey,
    pkt: &Packet,
) -> Result<(), i64> {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let is_data = pkt.op == op::RW && pkt.len > 0;
    if let Some(ptr) = map.get_ptr_mut(key) {
        // SAFETY: the pointer is this CPU's value slot of a live map entry; per-CPU values
        // are only touched by this CPU, and tracepoint programs do not nest on one CPU.
        let s = unsafe { &mut *ptr };
        apply(s, now, is_data, pkt);
        return Ok(());
    }
    let mut s = PeerStats::default();
    apply(&mut s, now, is_data, pkt);
    map.insert(key, &s, 0)
}

fn apply(s: &mut PeerStats, now: u64, is_data: bool, pkt: &Packet) {
    s.packets += 1;
    s.last_any_ns = now;
    s.last_op = pkt.op;
    if is_data {
        s.last_data_ns = now;
        s.bytes += u64::from(pkt.len);
    }
    if pkt.op == op::RST {
        s.rst += 1;
    } else if pkt.op == op::SHUTDOWN {
        s.shutdown += 1;
    }
}

/// Guest → host: the peer is the source; the local port is the destination port.
#[tracepoint]
pub fn vigil_recv_pkt(ctx: TracePointContext) -> u32 {
    if let Ok(pkt) = read_packet(&ctx) {
        let key = PeerKey {
            cid: pkt.src_cid,
            port: pkt.src_port,
            local_port: pkt.dst_port,
            pad: 0,
        };
        let _ = record(&VIGIL_PEERS, &key, &pkt);
    }
    0
}

/// Host → guest: the peer is the destination; the local port is the source port.
#[tracepoint]
pub fn vigil_alloc_pkt(ctx: TracePointContext) -> u32 {
    if let Ok(pkt) = read_packet(&ctx) {
        let key = PeerKey {
            cid: pkt.dst_cid,
            port: pkt.dst_port,
            local_port: pkt.src_port,
            pad: 0,
        };
        let _ = record(&VIGIL_PEERS_TX, &key, &pkt);
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path, so this is never entered at run time.
    loop {}
}

/// GPL-compatible licence string: required to load programs that use GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
