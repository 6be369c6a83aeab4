//! Host side of the harness: prerequisites, kernels, initramfs and QEMU boots.

pub mod hybrid;
pub mod initramfs;
pub mod kernels;
pub mod qemu;
pub mod tools;
