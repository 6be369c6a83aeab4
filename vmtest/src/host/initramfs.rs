//! Builds the test guest's initramfs (newc cpio, gzip) in Rust: static busybox and its
//! applet links, the vsock modules in dependency order (decompressed), device nodes, the
//! `/init` script and the musl binaries (`vmtest-guest`, `vigil`).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use flate2::write::GzEncoder;
use flate2::Compression;
use vmtest::cpio::{CpioError, CpioWriter};
use vmtest::markers::GUEST_START;
use vmtest::modules::{DepTable, ModulesError};

use super::kernels::Kernel;

/// Modules for the vsock loopback transport (CID 1 inside the guest), and the PCI virtio
/// driver plus the virtio vsock transport for the hybrid guests' vhost-user-vsock device
/// (with no such device, as in the loopback VM, they load and stay idle).
pub const VSOCK_MODULES: &[&str] = &[
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vsock_loopback",
    "virtio_pci",
    "vmw_vsock_virtio_transport",
];
/// Busybox applets linked into /bin (what /init and the scenarios call).
pub const APPLETS: &[&str] = &[
    "sh", "mount", "umount", "insmod", "reboot", "poweroff", "echo", "cat", "ls", "sleep", "mkdir",
    "ip", "dmesg", "kill", "ps", "grep", "uname", "rm",
];
/// Directories of the guest's root.
const DIRS: &[&str] = &[
    "bin",
    "sbin",
    "dev",
    "etc",
    "proc",
    "sys",
    "tmp",
    "run",
    "root",
    "lib",
    "lib/modules",
];

/// Errors of building the initramfs.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("{what} failed at {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Cpio(#[from] CpioError),
    #[error(transparent)]
    Modules(#[from] ModulesError),
    #[error("decompressing {path} with `{tool}` failed: {status}")]
    Decompress {
        path: PathBuf,
        tool: &'static str,
        status: String,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> InitramfsError {
    let path = path.to_path_buf();
    move |source| InitramfsError::Io { what, path, source }
}

/// What goes into the image.
#[derive(Debug)]
pub struct Contents<'a> {
    pub kernel: &'a Kernel,
    pub busybox: &'a Path,
    pub guest: &'a Path,
    pub vigil: Option<&'a Path>,
}

/// Facts about a built image.
#[derive(Debug)]
pub struct Built {
    pub path: PathBuf,
    pub compressed_bytes: u64,
    pub cpio_bytes: u64,
    pub modules: Vec<String>,
}

/// The `/init` script: mounts, modules, the guest program, exit marker, reboot.
pub fn init_script() -> String {
    format!(
        "#!/bin/sh\n\
         export PATH=/bin:/sbin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev\n\
         mount -t tmpfs tmpfs /tmp\n\
         mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null\n\
         mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null\n\
         mount -t bpf bpf /sys/fs/bpf 2>/dev/null\n\
         echo \"{GUEST_START}\"\n\
         echo \"VMTEST-INIT kernel $(uname -r)\"\n\
         for m in /lib/modules/*.ko; do\n\
         \x20 [ -e \"$m\" ] || continue\n\
         \x20 insmod \"$m\" || echo \"VMTEST-INIT insmod $m failed\"\n\
         done\n\
         ip link set lo up 2>/dev/null\n\
         /bin/vmtest-guest\n\
         echo \"VMTEST EXIT $?\"\n\
         reboot -f\n"
    )
}

fn read(path: &Path) -> Result<Vec<u8>, InitramfsError> {
    std::fs::read(path).map_err(io_err("reading", path))
}

/// Reads a module file, decompressing `.ko.xz` (xz tool), `.ko.zst` (zstd tool) or
/// `.ko.gz` (flate2).
fn read_module(path: &Path) -> Result<Vec<u8>, InitramfsError> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else if name.ends_with(".gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(read(path)?.as_slice())
            .read_to_end(&mut out)
            .map_err(io_err("gunzip", path))?;
        return Ok(out);
    } else {
        return read(path);
    };
    let out = Command::new(tool)
        .args(["-d", "-c"])
        .arg(path)
        .output()
        .map_err(io_err("running decompressor", path))?;
    if !out.status.success() {
        return Err(InitramfsError::Decompress {
            path: path.to_path_buf(),
            tool,
            status: out.status.to_string(),
        });
    }
    Ok(out.stdout)
}

/// Writes the initramfs to `out`.
pub fn build(contents: &Contents<'_>, out: &Path) -> Result<Built, InitramfsError> {
    let kdir = &contents.kernel.modules_dir;
    let dep = std::fs::read_to_string(kdir.join("modules.dep"))
        .map_err(io_err("reading modules.dep", kdir))?;
    let builtin = std::fs::read_to_string(kdir.join("modules.builtin")).unwrap_or_default();
    let order = DepTable::parse(&dep, &builtin)?.load_order(VSOCK_MODULES)?;

    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    }
    let file = std::fs::File::create(out).map_err(io_err("creating", out))?;
    let gz = GzEncoder::new(std::io::BufWriter::new(file), Compression::fast());
    let mut w = CpioWriter::new(gz);
    for d in DIRS {
        w.dir(d, 0o755)?;
    }
    w.char_device("dev/console", 0o600, 5, 1)?;
    w.char_device("dev/null", 0o666, 1, 3)?;
    w.file("bin/busybox", 0o755, &read(contents.busybox)?)?;
    for a in APPLETS {
        w.symlink(&format!("bin/{a}"), "busybox")?;
    }
    w.file("init", 0o755, init_script().as_bytes())?;
    w.file("bin/vmtest-guest", 0o755, &read(contents.guest)?)?;
    if let Some(v) = contents.vigil {
        w.file("bin/vigil", 0o755, &read(v)?)?;
    }
    let mut modules = Vec::new();
    for (i, rel) in order.iter().enumerate() {
        let name = vmtest::modules::module_name(rel);
        let body = read_module(&kdir.join(rel))?;
        w.file(&format!("lib/modules/{i:02}-{name}.ko"), 0o644, &body)?;
        modules.push(name);
    }
    let cpio_bytes = w.bytes_written();
    let gz = w.finish()?;
    let mut buf = gz.finish().map_err(io_err("finishing gzip", out))?;
    buf.flush().map_err(io_err("flushing", out))?;
    drop(buf);
    let compressed_bytes = std::fs::metadata(out).map_err(io_err("stat", out))?.len();
    Ok(Built {
        path: out.to_path_buf(),
        compressed_bytes,
        cpio_bytes,
        modules,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_script_prints_the_start_marker_and_reboots() {
        let s = init_script();
        assert!(s.starts_with("#!/bin/sh\n"));
        assert!(s.contains("echo \"VMTEST GUEST START\""));
        assert!(s.contains("/bin/vmtest-guest\n"));
        assert!(s.trim_end().ends_with("reboot -f"));
        // Every command the script uses is a linked applet.
        for cmd in ["mount", "insmod", "ip", "reboot", "uname", "echo"] {
            assert!(APPLETS.contains(&cmd), "{cmd}");
        }
    }
}
