//! The opt-in `hybrid-guests` scenario: two QEMU guests at once, each with a real
//! virtio-vsock device whose host side is `vhost-device-vsock` in Unix-socket mode (the
//! Firecracker "hybrid vsock" model). Each guest connects to CID 2 port [`HYBRID_PORT`],
//! which arrives on the host at `<uds_path>_7100`.
//!
//! With a vigil binary, a `vigil run` on the host (AF_VSOCK off, one hybrid cell per guest)
//! owns those listeners, the guests run `vigil emit`, and the journal is then verified and
//! tailed per cell. Without one, this module listens itself, checks a byte pattern and
//! acks the count. Either way no AF_VSOCK socket is opened on the host.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmtest::guard::{pattern_byte, HYBRID_BYTES, HYBRID_EVENTS, HYBRID_PORT, HYBRID_SCENARIO};
use vmtest::markers::{Outcome, ScenarioResult};

use super::qemu::{self, BootConfig, GUEST_MEM_MB};
use super::tools::{run, ToolsError};

/// Guests booted at once (the design's "two guests at once").
pub const HYBRID_GUESTS: usize = 2;
/// First guest CID handed to vhost-device-vsock (CIDs 0–2 are reserved).
const FIRST_GUEST_CID: u32 = 3;
/// The vhost-user backend version the design notes measured (and whose caveats apply).
const VHOST_DEVICE_VSOCK_VERSION: &str = "0.3.0";
/// How long vhost-device-vsock may take to create its vhost-user sockets.
const BACKEND_START_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll interval while waiting for sockets and connections.
const POLL: Duration = Duration::from_millis(50);
/// How long the host `vigil run` may take to answer `ctl ping` with `ok`.
const VIGIL_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a SIGTERMed host `vigil run` may take to exit.
const VIGIL_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of the hybrid scenario's host side.
#[derive(Debug, thiserror::Error)]
pub enum HybridError {
    #[error(transparent)]
    Tool(#[from] ToolsError),
    #[error("{what} failed at {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("vhost-device-vsock did not create {0} within 10 s")]
    BackendNotReady(PathBuf),
    #[error(transparent)]
    Qemu(#[from] qemu::QemuError),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> HybridError {
    let path = path.to_path_buf();
    move |source| HybridError::Io { what, path, source }
}

/// Installs vhost-device-vsock into `<cache>/tools` (once) and returns its path.
pub fn ensure_backend(cache: &Path) -> Result<PathBuf, HybridError> {
    let root = cache.join("tools");
    let bin = root.join("bin/vhost-device-vsock");
    if bin.is_file() {
        return Ok(bin);
    }
    println!(
        "vmtest: installing vhost-device-vsock {VHOST_DEVICE_VSOCK_VERSION} into {} \
         (cargo install, about a minute)",
        root.display()
    );
    run(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args(["install", "--root"])
            .arg(&root)
            .args([
                "--version",
                VHOST_DEVICE_VSOCK_VERSION,
                "vhost-device-vsock",
            ]),
    )?;
    Ok(bin)
}

/// Kills the child when dropped (the backend must not outlive the scenario).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Settings of one hybrid run.
#[derive(Debug)]
pub struct HybridRun<'a> {
    pub label: &'a str,
    pub vmlinuz: &'a Path,
    pub initrd: &'a Path,
    pub backend: &'a Path,
    /// The vigil binary (the static musl build runs on the host too); `None` = raw mode.
    pub vigil: Option<&'a Path>,
    pub workdir: PathBuf,
    pub kvm: bool,
    pub timeout: Duration,
}

/// Accepts one connection on `listener` before `deadline`, checks [`HYBRID_BYTES`] of the
/// pattern and acks the count. Returns a one-line verdict.
fn serve_one(listener: &UnixListener, deadline: Instant) -> Result<String, String> {
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("nonblocking listener: {e}"))?;
    let mut conn: UnixStream = loop {
        match listener.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err("no guest connection arrived".into());
                }
                std::thread::sleep(POLL);
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    };
    conn.set_nonblocking(false)
        .and_then(|()| {
            conn.set_read_timeout(Some(
                deadline.saturating_duration_since(Instant::now()).max(POLL),
            ))
        })
        .map_err(|e| format!("socket options: {e}"))?;
    let mut got = vec![0u8; HYBRID_BYTES];
    conn.read_exact(&mut got)
        .map_err(|e| format!("reading {HYBRID_BYTES} bytes: {e}"))?;
    if let Some(bad) = (0..HYBRID_BYTES).find(|&i| got[i] != pattern_byte(i)) {
        return Err(format!("byte {bad} differs"));
    }
    conn.write_all(&(HYBRID_BYTES as u64).to_le_bytes())
        .map_err(|e| format!("ack: {e}"))?;
    Ok(format!("{HYBRID_BYTES} bytes checked"))
}

/// A `vigil run` on the host owning the hybrid listeners of the guests' cells.
struct HostVigil {
    bin: PathBuf,
    root: PathBuf,
    child: Option<KillOnDrop>,
}

fn cell_id(i: usize) -> String {
    format!("hybrid-{i}")
}

impl HostVigil {
    fn start(bin: &Path, root: &Path, uds: &[PathBuf]) -> Result<Self, String> {
        let mut cfg = format!(
            "host_name = \"vmtest-host\"\nstate_dir = \"{r}/state\"\n\n[listen]\nport = \
             {HYBRID_PORT}\nvsock = false\n\n[admin]\nsocket = \"{r}/admin.sock\"\n\n\
             [journal]\ndir = \"{r}/journal\"\n\n[http]\naddr = \"\"\n",
            r = root.display()
        );
        for (i, u) in uds.iter().enumerate() {
            cfg.push_str(&format!(
                "\n[[cell]]\ncell_id = \"{}\"\nrun_id = \"run-1\"\nuds_path = \"{}\"\n",
                cell_id(i),
                u.display()
            ));
        }
        std::fs::create_dir_all(root.join("state")).map_err(|e| format!("state dir: {e}"))?;
        let cfg_path = root.join("vigil.toml");
        std::fs::write(&cfg_path, cfg).map_err(|e| format!("writing config: {e}"))?;
        let log = std::fs::File::create(root.join("vigil.log")).map_err(|e| format!("log: {e}"))?;
        let log2 = log.try_clone().map_err(|e| format!("log: {e}"))?;
        let child = Command::new(bin)
            .arg("run")
            .arg("--config")
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("starting host vigil: {e}"))?;
        let mut v = Self {
            bin: bin.to_path_buf(),
            root: root.to_path_buf(),
            child: Some(KillOnDrop(child)),
        };
        let deadline = Instant::now() + VIGIL_READY_TIMEOUT;
        loop {
            if let Some(c) = v.child.as_mut() {
                if let Ok(Some(st)) = c.0.try_wait() {
                    v.child = None;
                    return Err(format!("host vigil run exited with {st}: {}", v.log_tail()));
                }
            }
            if v.cmd(&["ctl", "--socket", &v.socket(), "ping"])
                .is_ok_and(|o| o.trim() == "ok")
            {
                return Ok(v);
            }
            if Instant::now() > deadline {
                return Err(format!("host vigil never answered ping: {}", v.log_tail()));
            }
            std::thread::sleep(POLL * 4);
        }
    }

    fn socket(&self) -> String {
        self.root.join("admin.sock").display().to_string()
    }

    fn log_tail(&self) -> String {
        std::fs::read_to_string(self.root.join("vigil.log"))
            .unwrap_or_default()
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .chars()
            .take(200)
            .collect()
    }

    /// Runs `vigil ARGS`; stdout on success, a sentence on failure.
    fn cmd(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(&self.bin)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("vigil {}: {e}", args.join(" ")))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "vigil {} exited with {}: {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
                    .trim()
                    .chars()
                    .take(200)
                    .collect::<String>()
            ))
        }
    }

    /// SIGTERM, clean exit, `vigil verify`, then per-cell event counts from `vigil tail`.
    fn finish(mut self, guests: usize) -> Result<String, String> {
        let Some(mut child) = self.child.take() else {
            return Err("host vigil already exited".into());
        };
        // SAFETY: kill(2) on the pid of our own child, not yet reaped.
        unsafe {
            libc::kill(child.0.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + VIGIL_STOP_TIMEOUT;
        loop {
            match child.0.try_wait() {
                Ok(Some(st)) if st.success() => break,
                Ok(Some(st)) => {
                    return Err(format!(
                        "host vigil exited with {st} after SIGTERM: {}",
                        self.log_tail()
                    ))
                }
                Ok(None) if Instant::now() > deadline => {
                    return Err("host vigil ignored SIGTERM for 30 s".into())
                }
                Ok(None) => std::thread::sleep(POLL),
                Err(e) => return Err(format!("waiting for host vigil: {e}")),
            }
        }
        let journal = self.root.join("journal").display().to_string();
        let pubkey = self.root.join("state/host.key.pub").display().to_string();
        self.cmd(&["verify", &journal, "--pubkey", &pubkey])?;
        let tail = self.cmd(&["tail", &journal])?;
        let mut counts = vec![0u64; guests];
        for line in tail.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| format!("tail line is not JSON: {e}"))?;
            if v["streamid"] != "hybrid" {
                continue;
            }
            match (0..guests).find(|&i| v["cellid"] == cell_id(i).as_str()) {
                Some(i) => counts[i] += 1,
                None => return Err(format!("event with unexpected cellid {}", v["cellid"])),
            }
        }
        if let Some(i) = (0..guests).find(|&i| counts[i] != HYBRID_EVENTS) {
            return Err(format!(
                "cell {} has {} events in the journal, expected {HYBRID_EVENTS}",
                cell_id(i),
                counts[i]
            ));
        }
        Ok(format!("journal verified; {HYBRID_EVENTS} events per cell"))
    }
}

/// Boots the guests and returns one `hybrid-guests` result.
pub fn run_hybrid(cfg: &HybridRun<'_>) -> Result<ScenarioResult, HybridError> {
    let _ = std::fs::remove_dir_all(&cfg.workdir);
    std::fs::create_dir_all(&cfg.workdir).map_err(io_err("creating", &cfg.workdir))?;
    let mut listeners = Vec::new();
    let mut backend = Command::new(cfg.backend);
    let mut vus = Vec::new();
    let mut udss = Vec::new();
    for i in 0..HYBRID_GUESTS {
        let vu = cfg.workdir.join(format!("g{i}.vhost"));
        let uds = cfg.workdir.join(format!("g{i}.vsock"));
        if cfg.vigil.is_none() {
            let port_path = PathBuf::from(format!("{}_{HYBRID_PORT}", uds.display()));
            listeners.push(UnixListener::bind(&port_path).map_err(io_err("binding", &port_path))?);
        }
        udss.push(uds.clone());
        backend.arg("--vm").arg(format!(
            "guest-cid={},socket={},uds-path={}",
            FIRST_GUEST_CID + i as u32,
            vu.display(),
            uds.display()
        ));
        vus.push(vu);
    }
    let log = cfg.workdir.join("vhost-device-vsock.log");
    let log_file = std::fs::File::create(&log).map_err(io_err("creating", &log))?;
    let log_err = log_file.try_clone().map_err(io_err("cloning", &log))?;
    let _backend = KillOnDrop(
        backend
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .spawn()
            .map_err(io_err("starting", cfg.backend))?,
    );
    let ready_by = Instant::now() + BACKEND_START_TIMEOUT;
    for vu in &vus {
        while !vu.exists() {
            if Instant::now() > ready_by {
                return Err(HybridError::BackendNotReady(vu.clone()));
            }
            std::thread::sleep(POLL);
        }
    }
    let host_vigil = match cfg.vigil {
        None => None,
        Some(bin) => match HostVigil::start(bin, &cfg.workdir.join("vigil"), &udss) {
            Ok(v) => Some(v),
            Err(e) => {
                return Ok(ScenarioResult {
                    name: HYBRID_SCENARIO.into(),
                    outcome: Outcome::Fail,
                    reason: e,
                })
            }
        },
    };
    let mode = if host_vigil.is_some() { "vigil" } else { "raw" };
    let deadline = Instant::now() + cfg.timeout;
    let servers: Vec<_> = listeners
        .into_iter()
        .map(|l| std::thread::spawn(move || serve_one(&l, deadline)))
        .collect();
    let boots: Vec<_> = vus
        .iter()
        .enumerate()
        .map(|(i, vu)| {
            let boot = BootConfig {
                qemu: PathBuf::from("qemu-system-x86_64"),
                label: cfg.label.to_string(),
                prefix: format!("{}/g{i}", cfg.label),
                extra_args: vec![
                    "-object".into(),
                    format!("memory-backend-memfd,id=mem,size={GUEST_MEM_MB}M,share=on"),
                    "-numa".into(),
                    "node,memdev=mem".into(),
                    "-chardev".into(),
                    format!("socket,id=vv,path={}", vu.display()),
                    "-device".into(),
                    "vhost-user-vsock-pci,chardev=vv".into(),
                ],
                vmlinuz: cfg.vmlinuz.to_path_buf(),
                initrd: cfg.initrd.to_path_buf(),
                scenarios: vec![HYBRID_SCENARIO.to_string()],
                extra_cmdline: vec![format!("{}{mode}", vmtest::guard::HYBRID_MODE_KEY)],
                kvm: cfg.kvm,
                timeout: cfg.timeout,
            };
            std::thread::spawn(move || qemu::boot(&boot))
        })
        .collect();
    let mut problems = Vec::new();
    for (i, b) in boots.into_iter().enumerate() {
        let Ok(joined) = b.join() else {
            problems.push(format!("g{i}: boot thread panicked"));
            continue;
        };
        let (outcome, _tries) = joined?;
        let r = outcome
            .log
            .results(&[HYBRID_SCENARIO.to_string()], &outcome.why_incomplete());
        if r[0].outcome != Outcome::Pass {
            problems.push(format!("g{i} guest: {} {}", r[0].outcome, r[0].reason));
        }
    }
    for (i, s) in servers.into_iter().enumerate() {
        match s.join() {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => problems.push(format!("g{i} host side: {e}")),
            Err(_) => problems.push(format!("g{i} host side: thread panicked")),
        }
    }
    let mut detail = format!(
        "{HYBRID_GUESTS} guests × {HYBRID_BYTES} bytes via vhost-device-vsock to \
         <uds>_{HYBRID_PORT}, checked and acked"
    );
    if let Some(v) = host_vigil {
        match v.finish(HYBRID_GUESTS) {
            Ok(d) => {
                detail = format!(
                    "{HYBRID_GUESTS} guests × `vigil emit` via vhost-device-vsock into a host \
                     vigil (hybrid cells); {d}"
                );
            }
            Err(e) => problems.push(format!("host vigil: {e}")),
        }
    }
    Ok(if problems.is_empty() {
        ScenarioResult {
            name: HYBRID_SCENARIO.into(),
            outcome: Outcome::Pass,
            reason: detail,
        }
    } else {
        ScenarioResult {
            name: HYBRID_SCENARIO.into(),
            outcome: Outcome::Fail,
            reason: problems.join("; "),
        }
    })
}
