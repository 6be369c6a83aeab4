//! vigil-journal: turns events into signed, hash-chained CloudEvents and makes them durable
//! in an append-only segmented journal (group commit, recovery, retention, ENOSPC), acks
//! them, and verifies and tails journals offline. See docs/journal.md for the formats.

pub mod cli;
pub mod dsse;
pub mod event;
pub mod key;
pub mod segment;
pub mod state;
pub mod tail;
pub mod verify;
pub mod writer;

pub use cli::{run_keygen, run_tail, run_verify, CliError, KeygenArgs, TailArgs, VerifyArgs};
pub use ed25519_dalek::VerifyingKey;
pub use event::{AckOut, EventIn, Record};
pub use key::{read_public_key, HostKey, KeyError};
pub use state::ChainState;
pub use tail::{tail, tail_once, TailFilter};
pub use verify::{verify, FaultKind, VerifyFault, VerifySummary};
pub use writer::{
    recover, recovered_state, spawn, JournalConfig, JournalError, JournalHandle, JournalHealth,
    SigningMode, Sink,
};
