//! Host prerequisites: Debian packages the harness needs (QEMU, static busybox, kmod's
//! depmod, musl-tools when a C dependency asks for it), the Rust musl target, the workspace
//! layout from `cargo metadata`, and the musl builds of `vigil` and `vmtest-guest`.
//! Everything is checked first and only installed or built when missing; each step says
//! what it does.

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Rust target of the guest binaries: static musl needs no libraries inside the initramfs.
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
/// Packages installed when missing (package, why).
pub const HOST_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "boots the test VMs"),
    ("busybox-static", "the shell and tools inside the initramfs"),
    ("kmod", "depmod for the downloaded kernels' modules"),
];

/// Errors of preparing the host.
#[derive(Debug, thiserror::Error)]
pub enum ToolsError {
    #[error("could not run `{cmd}`: {source}")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("`{cmd}` failed with {status}")]
    Failed { cmd: String, status: String },
    #[error("`cargo metadata` printed unusable output: {0}")]
    Metadata(String),
    #[error("static busybox not found at /bin/busybox or /usr/bin/busybox after installing busybox-static")]
    NoBusybox,
    #[error("the guest binary was not built at {0}")]
    NoGuestBinary(PathBuf),
}

/// Runs a command with inherited output, failing on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<(), ToolsError> {
    let text = format!("{cmd:?}");
    let status = cmd.status().map_err(|source| ToolsError::Spawn {
        cmd: text.clone(),
        source,
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(ToolsError::Failed {
            cmd: text,
            status: status.to_string(),
        })
    }
}

/// Runs a command and returns its stdout (stderr inherited), failing on a non-zero exit.
pub fn capture(cmd: &mut Command) -> Result<String, ToolsError> {
    let text = format!("{cmd:?}");
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .map_err(|source| ToolsError::Spawn {
            cmd: text.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(ToolsError::Failed {
            cmd: text,
            status: out.status.to_string(),
        })
    }
}

/// True when dpkg reports the package installed.
pub fn package_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Installs the packages (no recommends); on failure refreshes the lists once and retries.
pub fn apt_install(pkgs: &[&str]) -> Result<(), ToolsError> {
    let install = || {
        run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(pkgs))
    };
    if install().is_ok() {
        return Ok(());
    }
    println!("vmtest: apt-get install failed; running apt-get update and retrying once");
    run(Command::new("apt-get").args(["update", "-q"]))?;
    install()
}

/// Installs whichever of [`HOST_PACKAGES`] are missing.
pub fn ensure_host_packages() -> Result<(), ToolsError> {
    let missing: Vec<&str> = HOST_PACKAGES
        .iter()
        .filter(|(p, _)| !package_installed(p))
        .map(|(p, why)| {
            println!("vmtest: installing {p} ({why})");
            *p
        })
        .collect();
    if missing.is_empty() {
        println!("vmtest: host packages present: {}", names(HOST_PACKAGES));
        return Ok(());
    }
    apt_install(&missing)
}

fn names(list: &[(&str, &str)]) -> String {
    list.iter().map(|(p, _)| *p).collect::<Vec<_>>().join(", ")
}

/// Path of the static busybox from busybox-static.
pub fn busybox_path() -> Result<PathBuf, ToolsError> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or(ToolsError::NoBusybox)
}

/// Whether QEMU can run at all here: `Err(reason)` when it cannot.
pub fn qemu_usable() -> Result<String, String> {
    let out = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map_err(|e| format!("qemu-system-x86_64 cannot be started: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "qemu-system-x86_64 --version failed with {}",
            out.status
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .to_string())
}

/// Workspace root and target directory.
#[derive(Debug, Clone)]
pub struct Workspace {
    pub root: PathBuf,
    pub target_dir: PathBuf,
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Reads the workspace layout from `cargo metadata`.
pub fn workspace() -> Result<Workspace, ToolsError> {
    let out = capture(
        cargo()
            .args(["metadata", "--format-version", "1", "--no-deps"])
            .current_dir(env!("CARGO_MANIFEST_DIR")),
    )?;
    let v: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| ToolsError::Metadata(e.to_string()))?;
    let get = |k: &str| {
        v[k].as_str()
            .map(PathBuf::from)
            .ok_or_else(|| ToolsError::Metadata(format!("no {k}")))
    };
    Ok(Workspace {
        root: get("workspace_root")?,
        target_dir: get("target_directory")?,
    })
}

/// Adds the musl target with rustup when it is not installed yet.
pub fn ensure_musl_target() -> Result<(), ToolsError> {
    let installed = capture(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if installed.lines().any(|l| l.trim() == MUSL_TARGET) {
        return Ok(());
    }
    println!("vmtest: adding Rust target {MUSL_TARGET} (rustup)");
    run(Command::new("rustup").args(["target", "add", MUSL_TARGET]))
}

/// The musl binaries for the initramfs; `vigil` is `None` when it did not build.
#[derive(Debug, Clone)]
pub struct GuestBinaries {
    pub guest: PathBuf,
    pub vigil: Option<PathBuf>,
}

fn musl_build(ws: &Workspace, args: &[&str]) -> Result<(), ToolsError> {
    let attempt = || {
        run(cargo()
            .args(["build", "--release", "--target", MUSL_TARGET])
            .args(args)
            .current_dir(&ws.root))
    };
    match attempt() {
        Ok(()) => Ok(()),
        Err(e) if !package_installed("musl-tools") => {
            println!("vmtest: musl build failed ({e}); installing musl-tools for C dependencies and retrying");
            apt_install(&["musl-tools"])?;
            attempt()
        }
        Err(e) => Err(e),
    }
}

/// Builds `vigil` and `vmtest-guest` for musl. When the pair does not build, builds the
/// guest alone so kernel-only scenarios still run (the vigil ones then report SKIP).
pub fn build_guest_binaries(ws: &Workspace) -> Result<GuestBinaries, ToolsError> {
    let out_dir = ws.target_dir.join(MUSL_TARGET).join("release");
    let guest = out_dir.join("vmtest-guest");
    let vigil = out_dir.join("vigil");
    println!("vmtest: building vigil and vmtest-guest for {MUSL_TARGET}");
    let both = musl_build(
        ws,
        &[
            "-p",
            "vigil",
            "-p",
            "vmtest",
            "--bin",
            "vigil",
            "--bin",
            "vmtest-guest",
        ],
    );
    let vigil = match both {
        Ok(()) => Some(vigil),
        Err(e) => {
            println!(
                "vmtest: WARNING: building vigil for musl failed ({e}); building only \
                 vmtest-guest — scenarios that need vigil will be skipped"
            );
            musl_build(ws, &["-p", "vmtest", "--bin", "vmtest-guest"])?;
            None
        }
    };
    if !guest.is_file() {
        return Err(ToolsError::NoGuestBinary(guest));
    }
    Ok(GuestBinaries { guest, vigil })
}
