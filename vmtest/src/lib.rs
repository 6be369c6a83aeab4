//! Library side of the `vmtest` harness: pieces shared by the host runner (`vmtest`) and the
//! guest program (`vmtest-guest`), kept pure where they can be so they are unit-tested.

pub mod cpio;
pub mod guard;
pub mod markers;
pub mod modules;
pub mod vsock;
