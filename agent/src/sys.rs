//! Operating-system facts and set-up vigil needs before it starts: effective capabilities
//! (checked as capabilities, not as uid 0), the open-file limit for thousands of guest
//! connections, and the tracefs / bpffs mounts the eBPF programs need.
use std::path::{Path, PathBuf};

/// Open files vigil wants: each guest connection is one fd, each hybrid cell one listener,
/// plus journal segments and the io_uring itself. 65,536 covers 16,384 cells × a few
/// connections with room; the hard limit caps what we ask for.
pub const WANTED_NOFILE: u64 = 65_536;

const TRACEFS: &str = "/sys/kernel/tracing";
const TRACEFS_OLD: &str = "/sys/kernel/debug/tracing";
const BPFFS: &str = "/sys/fs/bpf";

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("vigil needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN) to load its eBPF programs; run it as root or grant them (e.g. AmbientCapabilities=CAP_BPF CAP_PERFMON in its unit)")]
    MissingCapabilities,
    #[error("reading this process's capabilities failed: {0}")]
    Capget(#[source] std::io::Error),
    #[error("tracefs is not mounted and mounting it at {path} failed ({source}); mount it with `mount -t tracefs tracefs {path}`")]
    Tracefs {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("bpffs is not mounted and mounting it at {path} failed ({source}); mount it with `mount -t bpf bpf {path}`")]
    Bpffs {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("raising the open-file limit failed: {0}")]
    Rlimit(#[source] std::io::Error),
}

/// Whether the effective uid is 0 (used only to decide whether root tests can run).
#[cfg(test)]
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The effective capability set of this process (bits 0..64).
fn effective_caps() -> Result<u64, SysError> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget with a v3 header reads two `Data` structs into the array we pass, which
    // has exactly that length; both pointers are valid for the call.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(SysError::Capget(std::io::Error::last_os_error()));
    }
    Ok(u64::from(data[0].effective) | (u64::from(data[1].effective) << 32))
}

/// Checks for the capabilities eBPF loading needs.
pub fn check_bpf_capabilities() -> Result<(), SysError> {
    let caps = effective_caps()?;
    let has = |c: u32| caps & (1u64 << c) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        Ok(())
    } else {
        Err(SysError::MissingCapabilities)
    }
}

/// Raises RLIMIT_NOFILE's soft limit towards [`WANTED_NOFILE`] (never above the hard limit).
/// Returns the limit in force afterwards.
pub fn raise_nofile() -> Result<u64, SysError> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } != 0 {
        return Err(SysError::Rlimit(std::io::Error::last_os_error()));
    }
    let want = WANTED_NOFILE.min(lim.rlim_max);
    if lim.rlim_cur < want {
        lim.rlim_cur = want;
        // SAFETY: setrlimit reads the struct we own; raising the soft limit up to the hard
        // limit needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) } != 0 {
            return Err(SysError::Rlimit(std::io::Error::last_os_error()));
        }
    }
    Ok(lim.rlim_cur)
}

fn is_mounted(path: &str, fstype: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|m| {
        m.lines().any(|l| {
            let mut f = l.split(' ');
            let _dev = f.next();
            f.next() == Some(path) && f.next() == Some(fstype)
        })
    })
}

fn mount(fstype: &str, target: &str) -> std::io::Result<()> {
    let src = std::ffi::CString::new(fstype).unwrap_or_default();
    let tgt = std::ffi::CString::new(target).unwrap_or_default();
    // SAFETY: all three strings are valid NUL-terminated C strings that outlive the call; no
    // mount data is passed.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            src.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Returns the tracefs root, mounting it at /sys/kernel/tracing if nothing is mounted.
pub fn ensure_tracefs() -> Result<PathBuf, SysError> {
    for p in [TRACEFS, TRACEFS_OLD] {
        if Path::new(p).join("events").is_dir() {
            return Ok(PathBuf::from(p));
        }
    }
    if !is_mounted(TRACEFS, "tracefs") {
        mount("tracefs", TRACEFS).map_err(|source| SysError::Tracefs {
            path: TRACEFS,
            source,
        })?;
        tracing::info!("mounted tracefs at {TRACEFS}");
    }
    Ok(PathBuf::from(TRACEFS))
}

/// Mounts bpffs at /sys/fs/bpf if it is not mounted.
pub fn ensure_bpffs() -> Result<(), SysError> {
    if is_mounted(BPFFS, "bpf") {
        return Ok(());
    }
    mount("bpf", BPFFS).map_err(|source| SysError::Bpffs {
        path: BPFFS,
        source,
    })?;
    tracing::info!("mounted bpffs at {BPFFS}");
    Ok(())
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns` uses, so user-space times
/// compare with the kernel's per-peer stamps.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// This host's name (for `source` attributes when the config names none).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "localhost".to_string(), |s| s.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nofile_is_raised_within_the_hard_limit() {
        let got = raise_nofile().unwrap();
        assert!(got >= 1024);
    }

    #[test]
    fn capabilities_match_root() {
        // As root the capability check passes; as a plain user it fails with the sentence.
        match check_bpf_capabilities() {
            Ok(()) => assert!(effective_caps().unwrap() != 0),
            Err(e) => assert!(e.to_string().contains("CAP_BPF")),
        }
    }

    #[test]
    fn monotonic_advances() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(b >= a && a > 0);
    }
}
