//! The host's ed25519 signing key: creating it on first use, loading it with a strict
//! permission check, writing its public half beside it, and naming it by `keyid`.
//!
//! File formats (one line each, ASCII, trailing newline):
//! - secret key `<path>`: `vigil-ed25519-secret-v1 <64 hex chars of the 32-byte seed>`,
//!   mode 0600, owned by the effective user id of the process that reads it;
//! - public key `<path>.pub`: `vigil-ed25519-public-v1 <64 hex chars of the raw 32-byte
//!   public key>`, mode 0644.
//!
//! `keyid` = lowercase hex SHA-256 of the raw 32-byte public key.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256};

const SECRET_TAG: &str = "vigil-ed25519-secret-v1";
const PUBLIC_TAG: &str = "vigil-ed25519-public-v1";

/// Errors of loading, creating or parsing key files.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("could not read key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not create key file {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key file {path} already exists; refusing to overwrite it")]
    AlreadyExists { path: PathBuf },
    #[error(
        "key file {path} has mode {mode:o}, which lets other users read it; run `chmod 600 {path}`"
    )]
    LooseMode { path: PathBuf, mode: u32 },
    #[error("key file {path} is owned by uid {owner}, not by this process's user (uid {euid})")]
    WrongOwner {
        path: PathBuf,
        owner: u32,
        euid: u32,
    },
    #[error("key file {path} is not in the `{expected}` format")]
    Malformed {
        path: PathBuf,
        expected: &'static str,
    },
    #[error("public key file {path} does not hold a valid ed25519 point")]
    BadPoint { path: PathBuf },
}

/// The host's ed25519 key pair.
pub struct HostKey {
    signing: SigningKey,
    key_id: String,
}

impl std::fmt::Debug for HostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// `keyid` of a public key: lowercase hex SHA-256 of its raw 32 bytes.
pub fn key_id_of(key: &VerifyingKey) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

impl HostKey {
    /// A key from a 32-byte seed (tests and benchmarks).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let signing = SigningKey::from_bytes(&seed);
        let key_id = key_id_of(&signing.verifying_key());
        Self { signing, key_id }
    }

    /// A fresh random key, not written anywhere.
    pub fn generate() -> Self {
        let mut seed = [0u8; 32];
        OsRng.fill_bytes(&mut seed);
        Self::from_seed(seed)
    }

    /// Loads the key at `path`, or creates it (0600) with its `.pub` beside it if absent.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        match fs::symlink_metadata(path) {
            Ok(_) => Self::load(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match Self::generate_to(path) {
                // Lost a creation race with another process: load what it wrote.
                Err(KeyError::AlreadyExists { .. }) => Self::load(path),
                other => other,
            },
            Err(source) => Err(KeyError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Creates a new key at `path` (refusing to overwrite) and its public key at `<path>.pub`.
    pub fn generate_to(path: &Path) -> Result<Self, KeyError> {
        let key = Self::generate();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(|source| KeyError::Create {
                path: path.to_owned(),
                source,
            })?;
        }
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| {
                if source.kind() == std::io::ErrorKind::AlreadyExists {
                    KeyError::AlreadyExists {
                        path: path.to_owned(),
                    }
                } else {
                    KeyError::Create {
                        path: path.to_owned(),
                        source,
                    }
                }
            })?;
        let line = format!("{SECRET_TAG} {}\n", hex::encode(key.signing.to_bytes()));
        file.write_all(line.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|source| KeyError::Create {
                path: path.to_owned(),
                source,
            })?;
        key.write_public(&Self::public_key_path(path))?;
        Ok(key)
    }

    /// Loads an existing key file, refusing one readable by others or owned by another user.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let meta = fs::metadata(path).map_err(|source| KeyError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::LooseMode {
                path: path.to_owned(),
                mode,
            });
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        if meta.uid() != euid {
            return Err(KeyError::WrongOwner {
                path: path.to_owned(),
                owner: meta.uid(),
                euid,
            });
        }
        let text = fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.to_owned(),
            source,
        })?;
        let seed = parse_tagged_hex(&text, SECRET_TAG).ok_or(KeyError::Malformed {
            path: path.to_owned(),
            expected: SECRET_TAG,
        })?;
        let key = Self::from_seed(seed);
        let pub_path = Self::public_key_path(path);
        if !pub_path.exists() {
            key.write_public(&pub_path)?;
        }
        Ok(key)
    }

    /// Where the public half of the key at `path` is written: `<path>.pub`.
    pub fn public_key_path(path: &Path) -> PathBuf {
        let mut os = path.as_os_str().to_owned();
        os.push(".pub");
        PathBuf::from(os)
    }

    /// Writes the public key file (mode 0644).
    pub fn write_public(&self, pub_path: &Path) -> Result<(), KeyError> {
        let line = format!(
            "{PUBLIC_TAG} {}\n",
            hex::encode(self.verifying_key().as_bytes())
        );
        let tmp = pub_path.with_extension("pub.tmp");
        let write = || -> std::io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o644)
                .open(&tmp)?;
            f.write_all(line.as_bytes())?;
            f.sync_all()?;
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644))?;
            fs::rename(&tmp, pub_path)
        };
        write().map_err(|source| KeyError::Create {
            path: pub_path.to_owned(),
            source,
        })
    }

    /// `keyid`: lowercase hex SHA-256 of the raw public key.
    pub fn key_id(&self) -> String {
        self.key_id.clone()
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    /// Signs `msg` (already the DSSE PAE bytes).
    pub fn sign(&self, msg: &[u8]) -> Signature {
        self.signing.sign(msg)
    }
}

/// Reads a public key file written by [`HostKey::write_public`].
pub fn read_public_key(path: &Path) -> Result<VerifyingKey, KeyError> {
    let text = fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.to_owned(),
        source,
    })?;
    let raw = parse_tagged_hex(&text, PUBLIC_TAG).ok_or(KeyError::Malformed {
        path: path.to_owned(),
        expected: PUBLIC_TAG,
    })?;
    VerifyingKey::from_bytes(&raw).map_err(|_| KeyError::BadPoint {
        path: path.to_owned(),
    })
}

fn parse_tagged_hex(text: &str, tag: &str) -> Option<[u8; 32]> {
    let mut parts = text.split_whitespace();
    if parts.next()? != tag {
        return None;
    }
    let bytes = hex::decode(parts.next()?).ok()?;
    if parts.next().is_some() {
        return None;
    }
    bytes.try_into().ok()
}
