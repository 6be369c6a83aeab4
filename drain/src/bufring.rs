//! The provided-buffer ring every multishot recv draws from: the ring of buffer descriptors
//! shared with the kernel, the buffer memory behind it, and returning a buffer to the kernel
//! as soon as its bytes have been decoded.

use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;

/// Number of buffers in the ring. Must be a power of two (the kernel indexes with a mask).
/// 256 buffers let 256 connections each have a chunk in flight in one loop turn; when the ring
/// is empty a multishot recv ends with `-ENOBUFS` and is re-armed after the turn returns the
/// buffers (measured: 64 × 4 KiB already kept re-arms rare, this is 8× that memory).
pub const BUF_RING_ENTRIES: u16 = 256;

/// Size of each buffer. A guest batching 16 frames of ~260 B per write produces ~4 KB chunks;
/// 8 KiB holds two such writes, so a busy connection fills a buffer per completion. A frame
/// larger than a buffer is reassembled by the connection's decoder (it copies the partial
/// frame), so the size bounds per-completion work, not frame size.
pub const BUF_SIZE: u32 = 8 * 1024;

/// Buffer group id of the ring (the drain registers exactly one group).
pub const BUF_GROUP: u16 = 0;

/// Errors of the buffer ring.
#[derive(Debug, thiserror::Error)]
pub enum BufRingError {
    #[error("could not map {bytes} bytes of memory for the provided-buffer ring")]
    Map {
        bytes: usize,
        #[source]
        source: io::Error,
    },
    #[error("the kernel refused to register the provided-buffer ring (needs Linux 5.19 or later)")]
    Register(#[source] io::Error),
    #[error("a completion named buffer {bid}, which is outside the ring of {entries} buffers")]
    BadBufferId { bid: u16, entries: u16 },
}

/// An anonymous, page-aligned mapping released on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> Result<Self, BufRingError> {
        // SAFETY: anonymous private mapping with no address hint; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(BufRingError::Map {
                bytes: len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` came from a successful mmap and are unmapped exactly once.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

/// The registered ring. It must outlive the io_uring instance it is registered with (the
/// drain loop declares the ring before this field, so the ring is dropped first).
pub struct BufRing {
    entries: Mapping,
    buffers: Mapping,
    /// Local copy of the tail; published to the kernel with a release store.
    tail: u16,
    /// Buffers returned since the last publish.
    unpublished: u16,
}

impl BufRing {
    /// Maps the ring and its buffers, registers them as group [`BUF_GROUP`] and hands every
    /// buffer to the kernel.
    pub fn register(submitter: &io_uring::Submitter<'_>) -> Result<Self, BufRingError> {
        let entries =
            Mapping::new(usize::from(BUF_RING_ENTRIES) * std::mem::size_of::<BufRingEntry>())?;
        let buffers = Mapping::new(usize::from(BUF_RING_ENTRIES) * BUF_SIZE as usize)?;
        let mut ring = Self {
            entries,
            buffers,
            tail: 0,
            unpublished: 0,
        };
        // SAFETY: the entry mapping is page aligned, sized for BUF_RING_ENTRIES entries and
        // lives in `ring`, which the caller keeps alive longer than the io_uring instance.
        unsafe {
            submitter
                .register_buf_ring_with_flags(
                    ring.entries.ptr as u64,
                    BUF_RING_ENTRIES,
                    BUF_GROUP,
                    0,
                )
                .map_err(BufRingError::Register)?;
        }
        for bid in 0..BUF_RING_ENTRIES {
            ring.push(bid);
        }
        ring.publish();
        Ok(ring)
    }

    fn base(&self) -> *mut BufRingEntry {
        self.entries.ptr.cast()
    }

    fn push(&mut self, bid: u16) {
        let index = usize::from(self.tail & (BUF_RING_ENTRIES - 1));
        // SAFETY: `index` < BUF_RING_ENTRIES, so the entry is inside the mapping; the kernel
        // reads entries only up to the published tail, which does not cover this one yet.
        let entry = unsafe { &mut *self.base().add(index) };
        // SAFETY: `bid` < BUF_RING_ENTRIES (checked by callers), so the buffer is in bounds.
        let addr = unsafe { self.buffers.ptr.add(usize::from(bid) * BUF_SIZE as usize) };
        entry.set_addr(addr as u64);
        entry.set_len(BUF_SIZE);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        self.unpublished += 1;
    }

    /// Makes every returned buffer visible to the kernel (one release store).
    pub fn publish(&mut self) {
        if self.unpublished == 0 {
            return;
        }
        // SAFETY: the tail field overlays the first entry's reserved u16 inside the mapping,
        // is 2-byte aligned, and the kernel reads it atomically; AtomicU16 has the same layout.
        let tail = unsafe { &*BufRingEntry::tail(self.base()).cast::<AtomicU16>() };
        tail.store(self.tail, Ordering::Release);
        self.unpublished = 0;
    }

    /// The first `len` bytes of buffer `bid`, as filled by the kernel.
    pub fn data(&self, bid: u16, len: usize) -> Result<&[u8], BufRingError> {
        if bid >= BUF_RING_ENTRIES {
            return Err(BufRingError::BadBufferId {
                bid,
                entries: BUF_RING_ENTRIES,
            });
        }
        let len = len.min(BUF_SIZE as usize);
        // SAFETY: the buffer is in bounds; the kernel handed it to us in a completion and
        // does not touch it again until we return it with `recycle`.
        Ok(unsafe {
            std::slice::from_raw_parts(
                self.buffers.ptr.add(usize::from(bid) * BUF_SIZE as usize),
                len,
            )
        })
    }

    /// Returns buffer `bid` to the ring (visible to the kernel after the next `publish`).
    pub fn recycle(&mut self, bid: u16) {
        if bid < BUF_RING_ENTRIES {
            self.push(bid);
        }
    }
}
