//! Thin, checked wrappers over the socket system calls the drain needs outside io_uring:
//! creating the AF_VSOCK and per-cell AF_UNIX listeners, reading a vsock peer's CID, the
//! `SO_ERROR` and `FIONREAD` checks behind the close heuristics, the eventfd that wakes the
//! loop, and the CLOCK_MONOTONIC reading that stamps received chunks.
//!
//! Nothing here ever connects an AF_VSOCK socket: on a host that is itself a VM, a vsock
//! `connect()` reaches the real hypervisor.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Backlog of every listener. Guests reconnect in bursts after a host restart (one connection
/// per emitter stream per cell); 1,024 absorbs a thousand reconnecting streams between two
/// loop turns. When full, the kernel refuses further connects until the loop accepts more.
pub const LISTEN_BACKLOG: i32 = 1024;

/// Socket buffer size set on the vsock listener (inherited by accepted sockets). Kernels
/// ≥ 6.12.92 reset vsock connections that queue many small packets in a small buffer (see
/// docs/io_uring-vsock-notes); 2 MiB was the size that prevented it in measurements.
pub const VSOCK_BUFFER_BYTES: u64 = 2 * 1024 * 1024;

/// `SOL_VSOCK` is `AF_VSOCK` (40) as a socket level; libc does not name the options.
const SOL_VSOCK: libc::c_int = 40;
/// `SO_VM_SOCKETS_BUFFER_SIZE` from `<linux/vm_sockets.h>`.
const SO_VM_SOCKETS_BUFFER_SIZE: libc::c_int = 0;
/// `SO_VM_SOCKETS_BUFFER_MAX_SIZE` from `<linux/vm_sockets.h>`.
const SO_VM_SOCKETS_BUFFER_MAX_SIZE: libc::c_int = 2;

/// Errors of the socket helpers.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error(
        "could not create an {family} stream socket (is the transport available on this host?)"
    )]
    CreateSocket {
        family: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("could not set socket option {option} on a listener")]
    SetOption {
        option: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("could not bind the AF_VSOCK listener to port {port} (no vsock transport on this host, or the port is taken)")]
    BindVsock {
        port: u32,
        #[source]
        source: io::Error,
    },
    #[error("could not bind the Unix listener at {path}")]
    BindUnix {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not listen on a bound socket")]
    Listen(#[source] io::Error),
    #[error("the path {path} exists and is not a socket, so it was left alone")]
    NotASocket { path: PathBuf },
    #[error("could not remove the stale socket file {path}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the socket path {path} is longer than a sockaddr_un can hold")]
    PathTooLong { path: PathBuf },
    #[error("could not restrict the permissions of {path} to 0600")]
    Chmod {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not read the peer address of an accepted vsock connection")]
    PeerName(#[source] io::Error),
    #[error("could not read SO_ERROR of a connection")]
    SoError(#[source] io::Error),
    #[error("could not read how many bytes a connection has queued (FIONREAD)")]
    Fionread(#[source] io::Error),
    #[error("could not create the eventfd that wakes the drain loop")]
    EventFd(#[source] io::Error),
}

fn set_opt_u64(fd: RawFd, level: libc::c_int, name: libc::c_int, value: u64) -> io::Result<()> {
    // SAFETY: `value` lives for the duration of the call and its size is passed exactly.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<u64>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn new_stream_socket(domain: libc::c_int, family: &'static str) -> Result<OwnedFd, SysError> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(SysError::CreateSocket {
            family,
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn listen(fd: &OwnedFd) -> Result<(), SysError> {
    // SAFETY: `fd` is a valid bound socket.
    if unsafe { libc::listen(fd.as_raw_fd(), LISTEN_BACKLOG) } != 0 {
        return Err(SysError::Listen(io::Error::last_os_error()));
    }
    Ok(())
}

/// Creates the AF_VSOCK stream listener on `port` for any local CID, with 2 MiB socket
/// buffers. Only binds and listens; it never connects.
pub fn vsock_listener(port: u32) -> Result<OwnedFd, SysError> {
    let fd = new_stream_socket(libc::AF_VSOCK, "AF_VSOCK")?;
    for (option, name) in [
        (
            "SO_VM_SOCKETS_BUFFER_MAX_SIZE",
            SO_VM_SOCKETS_BUFFER_MAX_SIZE,
        ),
        ("SO_VM_SOCKETS_BUFFER_SIZE", SO_VM_SOCKETS_BUFFER_SIZE),
    ] {
        set_opt_u64(fd.as_raw_fd(), SOL_VSOCK, name, VSOCK_BUFFER_BYTES)
            .map_err(|source| SysError::SetOption { option, source })?;
    }
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid starting value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    addr.svm_port = port;
    // SAFETY: `addr` is a fully initialised sockaddr_vm and its exact size is passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::from_ref(&addr).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(SysError::BindVsock {
            port,
            source: io::Error::last_os_error(),
        });
    }
    listen(&fd)?;
    Ok(fd)
}

/// Creates a Unix stream listener at `path`: a stale socket file there is removed first
/// (anything else at the path is an error, never deleted), and the new socket file is
/// restricted to mode 0600.
pub fn unix_listener(path: &Path) -> Result<OwnedFd, SysError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| SysError::RemoveStale {
                path: path.to_owned(),
                source,
            })?;
        }
        Ok(_) => {
            return Err(SysError::NotASocket {
                path: path.to_owned(),
            })
        }
        Err(_) => {}
    }
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid starting value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() || CString::new(bytes).is_err() {
        return Err(SysError::PathTooLong {
            path: path.to_owned(),
        });
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let fd = new_stream_socket(libc::AF_UNIX, "AF_UNIX")?;
    // SAFETY: `addr` is initialised, NUL-terminated (zeroed tail) and its size is passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::from_ref(&addr).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(SysError::BindUnix {
            path: path.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        SysError::Chmod {
            path: path.to_owned(),
            source,
        }
    })?;
    listen(&fd)?;
    Ok(fd)
}

/// The CID of the peer of an accepted AF_VSOCK connection (its kernel identity).
pub fn vsock_peer_cid(fd: RawFd) -> Result<u32, SysError> {
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid starting value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: `addr` and `len` are valid for writes and `len` holds the buffer size.
    let rc = unsafe {
        libc::getpeername(
            fd,
            std::ptr::from_mut(&mut addr).cast(),
            std::ptr::from_mut(&mut len),
        )
    };
    if rc != 0 {
        return Err(SysError::PeerName(io::Error::last_os_error()));
    }
    Ok(addr.svm_cid)
}

/// The pending error of a socket (`SO_ERROR`), 0 when none. Reading it clears it.
pub fn socket_error(fd: RawFd) -> Result<i32, SysError> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes and `len` holds the buffer size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            std::ptr::from_mut(&mut value).cast(),
            std::ptr::from_mut(&mut len),
        )
    };
    if rc != 0 {
        return Err(SysError::SoError(io::Error::last_os_error()));
    }
    Ok(value)
}

/// How many bytes are queued on a socket and not yet read (`FIONREAD`).
pub fn readable_bytes(fd: RawFd) -> Result<usize, SysError> {
    let mut value: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int to the pointer, which is valid for writes.
    let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, std::ptr::from_mut(&mut value)) };
    if rc != 0 {
        return Err(SysError::Fionread(io::Error::last_os_error()));
    }
    Ok(usize::try_from(value).unwrap_or(0))
}

/// Shuts both directions of a connection so every io_uring op on it completes. Errors are
/// ignored: the only one possible on a valid fd is ENOTCONN (already shut down).
pub fn shutdown_both(fd: RawFd) {
    // SAFETY: shutdown(2) on an fd we own; no memory is passed.
    unsafe {
        libc::shutdown(fd, libc::SHUT_RDWR);
    }
}

/// CLOCK_MONOTONIC in nanoseconds (the clock eBPF's `bpf_ktime_get_ns` reads). Called only
/// at the loop boundary; the logic below it takes `now` as a parameter.
pub fn monotonic_ns() -> u64 {
    // SAFETY: timespec is plain old data; clock_gettime writes it fully.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is valid for writes; CLOCK_MONOTONIC always exists on Linux.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, std::ptr::from_mut(&mut ts));
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The eventfd that wakes the drain loop when a command is queued.
#[derive(Debug)]
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    /// Creates a non-blocking, close-on-exec eventfd.
    pub fn new() -> Result<Self, SysError> {
        // SAFETY: plain eventfd(2) call; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(SysError::EventFd(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by eventfd(2) and is owned by nobody else.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Adds one to the counter, waking a pending read. A full counter (EAGAIN) already means
    /// a wake is pending, so errors are ignored.
    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to an eventfd we own.
        unsafe {
            libc::write(self.fd.as_raw_fd(), std::ptr::from_ref(&one).cast(), 8);
        }
    }

    /// The raw fd, for the io_uring read op.
    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_listener_replaces_stale_socket_and_sets_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cell.sock_1024");
        let first = unix_listener(&path).unwrap();
        drop(first);
        // The file is still there (stale); a second bind must replace it.
        assert!(path.exists());
        let _second = unix_listener(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn unix_listener_refuses_to_delete_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("not-a-socket");
        std::fs::write(&path, b"keep me").unwrap();
        let err = unix_listener(&path).unwrap_err();
        assert!(matches!(err, SysError::NotASocket { .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
    }

    #[test]
    fn unix_listener_rejects_overlong_path() {
        let path = PathBuf::from(format!("/tmp/{}", "x".repeat(200)));
        assert!(matches!(
            unix_listener(&path),
            Err(SysError::PathTooLong { .. })
        ));
    }

    #[test]
    fn monotonic_clock_advances() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(b >= a && a > 0);
    }
}
