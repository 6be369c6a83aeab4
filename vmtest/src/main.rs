//! QEMU harness placeholder.
fn main() {}
