//! Command-line arguments and entry points of `vigil verify`, `vigil tail` and
//! `vigil keygen`, so the `vigil` binary only parses and dispatches.

use std::path::PathBuf;

use crate::key::{read_public_key, HostKey, KeyError};
use crate::tail::{tail, TailError, TailFilter};
use crate::verify::{verify, VerifyFault, VerifySummary};

/// `vigil verify DIR --pubkey FILE...`
#[derive(Debug, Clone, clap::Args)]
pub struct VerifyArgs {
    /// Journal directory.
    pub dir: PathBuf,
    /// Trusted public key file (`<key>.pub`); repeat for rotated keys.
    #[arg(long = "pubkey", required = true)]
    pub pubkeys: Vec<PathBuf>,
}

/// `vigil tail DIR [--cell C] [--run R] [--type T] [--follow]`
#[derive(Debug, Clone, clap::Args)]
pub struct TailArgs {
    /// Journal directory.
    pub dir: PathBuf,
    #[arg(long)]
    pub cell: Option<String>,
    #[arg(long)]
    pub run: Option<String>,
    #[arg(long = "type")]
    pub ty: Option<String>,
    /// Keep printing new durable records.
    #[arg(long)]
    pub follow: bool,
}

/// `vigil keygen PATH`
#[derive(Debug, Clone, clap::Args)]
pub struct KeygenArgs {
    /// Secret key file to create (0600); the public key goes to `PATH.pub`.
    pub path: PathBuf,
}

/// Errors of the journal commands.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Key(#[from] KeyError),
    #[error("verification failed: {0}")]
    Verify(#[from] VerifyFault),
    #[error("{0}")]
    Tail(#[from] TailError),
}

/// Loads the public keys and verifies; the summary on success.
pub fn run_verify(args: &VerifyArgs) -> Result<VerifySummary, CliError> {
    let keys = args
        .pubkeys
        .iter()
        .map(|p| read_public_key(p))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(verify(&args.dir, &keys)?)
}

/// Prints matching records to stdout.
pub fn run_tail(args: &TailArgs) -> Result<(), CliError> {
    let filter = TailFilter {
        cell: args.cell.clone(),
        run: args.run.clone(),
        ty: args.ty.clone(),
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    Ok(tail(&args.dir, &filter, args.follow, &mut out)?)
}

/// Creates a key; returns its keyid.
pub fn run_keygen(args: &KeygenArgs) -> Result<String, CliError> {
    Ok(HostKey::generate_to(&args.path)?.key_id())
}
