//! vigil's configuration: the TOML file given with `--config`, every key with a default so
//! that `vigil run` works with no file at all. `docs/config.md` documents each key; a test
//! checks that the embedded defaults and that page agree.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The documented default configuration, embedded so `vigil run` needs no file.
pub const DEFAULT_TOML: &str = include_str!("../../docs/config.default.toml");

/// Default AF_VSOCK port guests connect to (and the hybrid guest port P).
pub const DEFAULT_PORT: u32 = 7000;
/// Default keep-alive window of a cell run.
pub const DEFAULT_KEEPALIVE_MS: u64 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path} failed: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("config file {path}: {problem}")]
    Invalid {
        path: PathBuf,
        problem: ConfigProblem,
    },
}

/// A semantic problem in an otherwise well-formed config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigProblem {
    #[error("listen.max_frame_bytes is {0}, but must be between 64 and {max}", max = vigil_wire::frame::MAX_FRAME_BYTES_LIMIT)]
    MaxFrame(usize),
    #[error("cell {0:?} names neither `cid` nor `uds_path` (exactly one is needed)")]
    CellNoAddress(String),
    #[error("cell {0:?} names both `cid` and `uds_path` (exactly one is needed)")]
    CellTwoAddresses(String),
    #[error("cell {0:?} is declared twice")]
    DuplicateCell(String),
    #[error("cell id or run id {0:?} is empty, longer than 128 bytes, or has characters other than letters, digits, '-', '_', '.', ':'")]
    BadId(String),
    #[error("cell {0:?} has a keep-alive window of 0 ms")]
    ZeroKeepalive(String),
    #[error("journal.signing must be \"batch\" or \"per-event\", not {0:?}")]
    Signing(String),
    #[error("journal.sink must be \"journal\" or \"stdout\", not {0:?}")]
    Sink(String),
    #[error("http.addr {0:?} is not an address like 127.0.0.1:9847 (empty disables the endpoint)")]
    HttpAddr(String),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Name used in event `source` (`vigil://<host>/cells/<cell>`); empty = the system hostname.
    pub host_name: String,
    /// Directory for the cell registry and the host key.
    pub state_dir: PathBuf,
    pub listen: Listen,
    pub admin: Admin,
    pub journal: Journal,
    pub http: Http,
    pub control: Control,
    /// Cells registered at start (more come from `vigil ctl cell add`).
    #[serde(rename = "cell")]
    pub cells: Vec<CellConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// The vsock port guests connect to: the AF_VSOCK listener's port, and the P of hybrid
    /// cells' `<uds_path>_P` listeners.
    pub port: u32,
    /// Whether to listen on AF_VSOCK (QEMU/vhost-vsock cells).
    pub vsock: bool,
    /// Largest frame accepted from a guest.
    pub max_frame_bytes: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    /// Local admin socket (root-only, mode 0600) for `vigil ctl`.
    pub socket: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Journal {
    /// Journal directory (segment files).
    pub dir: PathBuf,
    /// "batch" (one signed head per commit batch) or "per-event".
    pub signing: String,
    /// "journal" (durable segment files, the default) or "stdout" (JSON lines).
    pub sink: String,
    /// Roll a segment file at this size.
    pub segment_bytes: u64,
    /// Delete the oldest whole segments beyond this total (0 = keep everything).
    pub retention_bytes: u64,
    /// Delete whole segments older than this many hours (0 = keep everything).
    pub retention_hours: u64,
    /// Host key path (ed25519, created on first start; public key at `<path>.pub`). Empty =
    /// `<state_dir>/host.key`.
    pub key_path: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Http {
    /// Address of the health/metrics endpoint; empty disables it.
    pub addr: String,
    /// Allow a non-loopback address (the endpoint has no authentication).
    pub allow_non_loopback: bool,
}

impl Default for Http {
    fn default() -> Self {
        Self {
            addr: vigil_health::http::DEFAULT_HTTP_ADDR.to_string(),
            allow_non_loopback: false,
        }
    }
}

impl Http {
    /// The parsed address, or None when disabled.
    pub fn socket_addr(&self) -> Result<Option<std::net::SocketAddr>, ConfigProblem> {
        if self.addr.is_empty() {
            return Ok(None);
        }
        self.addr
            .parse()
            .map(Some)
            .map_err(|_| ConfigProblem::HttpAddr(self.addr.clone()))
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Control {
    /// NATS server of the upstream control plane (JetStream); empty = no upstream, local
    /// `vigil ctl` signals only.
    pub nats_url: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CellConfig {
    pub cell_id: String,
    pub run_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uds_path: Option<PathBuf>,
    #[serde(default = "default_keepalive")]
    pub keepalive_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    /// Host probe declarations for the cell (TOML; see docs/health.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probes: Option<PathBuf>,
}

fn default_keepalive() -> u64 {
    DEFAULT_KEEPALIVE_MS
}

impl Default for Config {
    fn default() -> Self {
        Self {
            host_name: String::new(),
            state_dir: PathBuf::from("/var/lib/vigil"),
            listen: Listen::default(),
            admin: Admin::default(),
            journal: Journal::default(),
            http: Http::default(),
            control: Control::default(),
            cells: Vec::new(),
        }
    }
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            port: DEFAULT_PORT,
            vsock: true,
            max_frame_bytes: vigil_wire::frame::DEFAULT_MAX_FRAME_BYTES,
        }
    }
}

impl Default for Admin {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/run/vigil/admin.sock"),
        }
    }
}

impl Default for Journal {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("/var/lib/vigil/journal"),
            signing: "batch".into(),
            sink: "journal".into(),
            segment_bytes: 64 * 1024 * 1024,
            retention_bytes: 0,
            retention_hours: 0,
            key_path: PathBuf::new(),
        }
    }
}

/// Whether a cell or run id is acceptable (it appears in paths, URIs and log lines).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

impl CellConfig {
    pub fn validate(&self) -> Result<(), ConfigProblem> {
        for id in [&self.cell_id, &self.run_id] {
            if !valid_id(id) {
                return Err(ConfigProblem::BadId(id.clone()));
            }
        }
        match (self.cid, &self.uds_path) {
            (None, None) => return Err(ConfigProblem::CellNoAddress(self.cell_id.clone())),
            (Some(_), Some(_)) => {
                return Err(ConfigProblem::CellTwoAddresses(self.cell_id.clone()))
            }
            _ => {}
        }
        if self.keepalive_ms == 0 {
            return Err(ConfigProblem::ZeroKeepalive(self.cell_id.clone()));
        }
        Ok(())
    }
}

impl Config {
    /// Loads `path`, or the embedded defaults when `path` is None.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let (text, shown) = match path {
            Some(p) => (
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?,
                p.to_path_buf(),
            ),
            None => (
                DEFAULT_TOML.to_string(),
                PathBuf::from("<embedded defaults>"),
            ),
        };
        Self::parse(&text, &shown)
    }

    pub fn parse(text: &str, shown: &Path) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: shown.to_path_buf(),
            source: Box::new(e),
        })?;
        cfg.validate().map_err(|problem| ConfigError::Invalid {
            path: shown.to_path_buf(),
            problem,
        })?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigProblem> {
        let mf = self.listen.max_frame_bytes;
        if !(64..=vigil_wire::frame::MAX_FRAME_BYTES_LIMIT).contains(&mf) {
            return Err(ConfigProblem::MaxFrame(mf));
        }
        if !matches!(self.journal.signing.as_str(), "batch" | "per-event") {
            return Err(ConfigProblem::Signing(self.journal.signing.clone()));
        }
        if !matches!(self.journal.sink.as_str(), "journal" | "stdout") {
            return Err(ConfigProblem::Sink(self.journal.sink.clone()));
        }
        self.http.socket_addr()?;
        let mut seen = std::collections::HashSet::new();
        for c in &self.cells {
            c.validate()?;
            if !seen.insert(c.cell_id.as_str()) {
                return Err(ConfigProblem::DuplicateCell(c.cell_id.clone()));
            }
        }
        Ok(())
    }

    pub fn host_name(&self) -> String {
        if self.host_name.is_empty() {
            crate::sys::hostname()
        } else {
            self.host_name.clone()
        }
    }

    pub fn key_path(&self) -> PathBuf {
        if self.journal.key_path.as_os_str().is_empty() {
            self.state_dir.join("host.key")
        } else {
            self.journal.key_path.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_equal_the_code_defaults() {
        let parsed = Config::load(None).unwrap();
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn every_key_is_documented() {
        let doc = include_str!("../../docs/config.md");
        let value: toml::Value = toml::Value::try_from(Config::default()).unwrap();
        let mut keys = Vec::new();
        collect_keys("", &value, &mut keys);
        for k in [
            "cell.cell_id",
            "cell.run_id",
            "cell.cid",
            "cell.uds_path",
            "cell.keepalive_ms",
            "cell.cgroup",
        ] {
            keys.push(k.to_string());
        }
        for k in keys {
            assert!(
                doc.contains(&format!("`{k}`")),
                "docs/config.md does not document `{k}`"
            );
        }
    }

    fn collect_keys(prefix: &str, v: &toml::Value, out: &mut Vec<String>) {
        if let toml::Value::Table(t) = v {
            for (k, v) in t {
                let name = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                if v.is_table() {
                    collect_keys(&name, v, out);
                } else {
                    out.push(name);
                }
            }
        }
    }

    #[test]
    fn bad_configs_get_sentences() {
        let p = Path::new("t.toml");
        let e = Config::parse("[listen]\nmax_frame_bytes = 1\n", p).unwrap_err();
        assert!(e.to_string().contains("max_frame_bytes"), "{e}");
        let e = Config::parse("[[cell]]\ncell_id = \"a\"\nrun_id = \"r\"\n", p).unwrap_err();
        assert!(e.to_string().contains("neither"), "{e}");
        let e = Config::parse(
            "[[cell]]\ncell_id = \"a\"\nrun_id = \"r\"\ncid = 3\nuds_path = \"/x\"\n",
            p,
        )
        .unwrap_err();
        assert!(e.to_string().contains("both"), "{e}");
        let e = Config::parse("bogus = 1\n", p).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = Config::parse("[journal]\nsigning = \"none\"\n", p).unwrap_err();
        assert!(e.to_string().contains("signing"), "{e}");
        let e =
            Config::parse("[[cell]]\ncell_id = \"a/b\"\nrun_id = \"r\"\ncid = 3\n", p).unwrap_err();
        assert!(e.to_string().contains("a/b"), "{e}");
        let ok = Config::parse("[[cell]]\ncell_id = \"a\"\nrun_id = \"r\"\ncid = 3\n", p).unwrap();
        assert_eq!(ok.cells[0].keepalive_ms, DEFAULT_KEEPALIVE_MS);
    }
}
