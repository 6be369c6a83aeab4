//! Minimal AF_VSOCK stream sockets for the guest program: a listener (bind/listen/accept)
//! and a connect that first proves it runs inside the test VM (see [`crate::guard`]).
//! Connected sockets are returned as `std::fs::File` so plain `Read`/`Write` apply.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};

use crate::guard::{ensure_test_vm, GuardError};

/// Listen backlog: the scenarios open at most a handful of connections at once.
pub const LISTEN_BACKLOG: i32 = 16;

/// Errors of vsock socket calls.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("{call} on AF_VSOCK failed: {source}")]
    Sys {
        call: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Guard(#[from] GuardError),
}

fn sys(call: &'static str) -> VsockError {
    VsockError::Sys {
        call,
        source: std::io::Error::last_os_error(),
    }
}

fn socket() -> Result<OwnedFd, VsockError> {
    // SAFETY: plain socket(2) call with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(sys("socket"));
    }
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value before filling it.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

/// A bound, listening AF_VSOCK socket.
pub struct VsockListener {
    fd: OwnedFd,
}

impl VsockListener {
    /// Binds `cid:port` and listens.
    pub fn bind(cid: u32, port: u32) -> Result<Self, VsockError> {
        use std::os::fd::AsRawFd;
        let fd = socket()?;
        let a = addr(cid, port);
        // SAFETY: `a` is a valid sockaddr_vm and the length passed is its size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::addr_of!(a).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(sys("bind"));
        }
        // SAFETY: listen(2) on a descriptor we own.
        if unsafe { libc::listen(fd.as_raw_fd(), LISTEN_BACKLOG) } != 0 {
            return Err(sys("listen"));
        }
        Ok(Self { fd })
    }

    /// Accepts one connection.
    pub fn accept(&self) -> Result<File, VsockError> {
        use std::os::fd::AsRawFd;
        // SAFETY: accept4 with null address pointers is allowed; the result is checked.
        let fd = unsafe {
            libc::accept4(
                self.fd.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(sys("accept"));
        }
        // SAFETY: `fd` is a new descriptor returned by accept4 that nothing else owns.
        Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
    }
}

/// Connects to `cid:port`, only inside the test VM.
pub fn connect(cid: u32, port: u32) -> Result<File, VsockError> {
    use std::os::fd::AsRawFd;
    ensure_test_vm()?;
    let fd = socket()?;
    let a = addr(cid, port);
    // SAFETY: `a` is a valid sockaddr_vm and the length passed is its size.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            std::ptr::addr_of!(a).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(sys("connect"));
    }
    Ok(File::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_is_refused_outside_the_test_vm() {
        // On the host the guard must stop us before any socket is created.
        let r = connect(libc::VMADDR_CID_LOCAL, 9);
        assert!(
            matches!(r, Err(VsockError::Guard(GuardError::NotTestVm))),
            "{r:?}"
        );
    }
}
