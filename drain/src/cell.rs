//! The drain's view of registered cells: what the caller hands in ([`CellSpec`]), the
//! per-cell shared slot the drain thread writes and other threads read ([`CellSlot`]), and
//! the identity stamped on everything the drain emits ([`CellInfo`]).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

/// Per-cell counters written by the drain thread (relaxed stores, one per received chunk) and
/// read by the reducer and health endpoints without any message.
#[derive(Debug, Default)]
pub struct CellSlot {
    /// CLOCK_MONOTONIC ns of the last chunk received from any connection of the cell.
    pub last_frame_mono_ns: AtomicU64,
    /// Complete frames received.
    pub frames: AtomicU64,
    /// Bytes received.
    pub bytes: AtomicU64,
    /// Connections currently open.
    pub connections: AtomicU32,
}

impl CellSlot {
    /// A fresh slot in an `Arc`, ready to be handed to the drain with a [`CellSpec`].
    pub fn shared() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Records one received chunk (called by the drain thread only).
    pub(crate) fn record_chunk(&self, now_mono_ns: u64, frames: u64, bytes: u64) {
        self.last_frame_mono_ns
            .store(now_mono_ns, Ordering::Relaxed);
        if frames > 0 {
            self.frames.fetch_add(frames, Ordering::Relaxed);
        }
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// A cell as registered with the drain.
#[derive(Debug, Clone)]
pub struct CellSpec {
    /// Stable name of the cell, given by whoever registers it.
    pub cell_id: String,
    /// One boot of the cell.
    pub run_id: String,
    /// The guest's vsock CID when it is reached over AF_VSOCK (QEMU/KVM with vhost-vsock).
    pub cid: Option<u32>,
    /// The hybrid-vsock Unix socket path of the VMM (Firecracker, Cloud Hypervisor); guest
    /// connections to port P arrive at `{uds_path}_{P}`.
    pub uds_path: Option<PathBuf>,
    /// Counters the drain writes for this cell.
    pub slot: Arc<CellSlot>,
}

/// Identity of a cell as stamped on the drain's outputs: taken from the registry and the
/// accepting socket, never from what the guest says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellInfo {
    /// Index of the cell in the drain's table (stable while the cell stays registered).
    pub index: u32,
    pub cell_id: Arc<str>,
    pub run_id: Arc<str>,
}
