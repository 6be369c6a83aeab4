//! The systemd notification protocol (`sd_notify`), implemented here: one datagram per
//! state change to the socket named by `$NOTIFY_SOCKET` (a path, or an abstract-namespace
//! socket when the value starts with `@`), and the watchdog interval from `$WATCHDOG_USEC`.
//!
//! When `$NOTIFY_SOCKET` is unset (not started by systemd, or `Type=` is not `notify`) every
//! call is a no-op that succeeds.

use std::ffi::OsStr;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::time::Duration;

/// Longest `STATUS=` text sent. systemd shows it in `systemctl status` on one line; longer
/// texts are cut at a character boundary below this size.
pub const MAX_STATUS_BYTES: usize = 512;

/// Errors of the notification protocol.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `$NOTIFY_SOCKET` has a form the protocol does not know.
    #[error("NOTIFY_SOCKET {value:?} is neither an absolute path nor an abstract socket name starting with '@'")]
    BadSocket {
        /// The value found.
        value: String,
    },
    /// The datagram socket could not be created.
    #[error("cannot create the notification socket: {0}")]
    Socket(#[source] std::io::Error),
    /// Sending failed.
    #[error("cannot send {state:?} to the service manager: {source}")]
    Send {
        /// What was being sent.
        state: String,
        /// OS error.
        source: std::io::Error,
    },
    /// A state assignment contained a newline, which would forge another assignment.
    #[error("notification state {0:?} contains a newline")]
    Newline(String),
}

/// A connection to the service manager, or nothing when not run under one.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(SocketAddr, UnixDatagram)>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET`.
    pub fn from_env() -> Result<Notifier, NotifyError> {
        Self::from_socket_value(std::env::var_os("NOTIFY_SOCKET").as_deref())
    }

    /// Builds a notifier for a given `$NOTIFY_SOCKET` value (`None` or empty: disabled).
    pub fn from_socket_value(value: Option<&OsStr>) -> Result<Notifier, NotifyError> {
        let Some(value) = value.filter(|v| !v.is_empty()) else {
            return Ok(Notifier::disabled());
        };
        let bytes = value.as_bytes();
        let addr = if let Some(name) = bytes.strip_prefix(b"@") {
            SocketAddr::from_abstract_name(name)
        } else if bytes.first() == Some(&b'/') {
            SocketAddr::from_pathname(Path::new(value))
        } else {
            return Err(NotifyError::BadSocket {
                value: value.to_string_lossy().into_owned(),
            });
        }
        .map_err(|_| NotifyError::BadSocket {
            value: value.to_string_lossy().into_owned(),
        })?;
        let socket = UnixDatagram::unbound().map_err(NotifyError::Socket)?;
        Ok(Notifier {
            target: Some((addr, socket)),
        })
    }

    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier { target: None }
    }

    /// Whether a service manager is listening.
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends raw newline-separated assignments (`KEY=VALUE`), as one datagram.
    pub fn notify(&self, assignments: &[&str]) -> Result<(), NotifyError> {
        let Some((addr, socket)) = &self.target else {
            return Ok(());
        };
        if let Some(bad) = assignments.iter().find(|a| a.contains('\n')) {
            return Err(NotifyError::Newline((*bad).to_owned()));
        }
        let message = assignments.join("\n");
        socket
            .send_to_addr(message.as_bytes(), addr)
            .map(|_| ())
            .map_err(|source| NotifyError::Send {
                state: message,
                source,
            })
    }

    /// `READY=1`: start-up finished.
    pub fn ready(&self) -> Result<(), NotifyError> {
        self.notify(&["READY=1"])
    }

    /// `STATUS=...`: a one-line status text (newlines become spaces; cut to
    /// [`MAX_STATUS_BYTES`]).
    pub fn status(&self, text: &str) -> Result<(), NotifyError> {
        let mut line: String = text.replace(['\n', '\r'], " ");
        if line.len() > MAX_STATUS_BYTES {
            let mut cut = MAX_STATUS_BYTES;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
        }
        self.notify(&[&format!("STATUS={line}")])
    }

    /// `WATCHDOG=1`: the keep-alive ping.
    pub fn watchdog(&self) -> Result<(), NotifyError> {
        self.notify(&["WATCHDOG=1"])
    }

    /// `STOPPING=1`: shutdown began.
    pub fn stopping(&self) -> Result<(), NotifyError> {
        self.notify(&["STOPPING=1"])
    }
}

/// How often to send `WATCHDOG=1`, from the environment: half of `$WATCHDOG_USEC`, if set and
/// meant for this process (`$WATCHDOG_PID` unset or equal to our pid); `None` otherwise.
pub fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    watchdog_interval_from(usec.as_deref(), pid.as_deref(), std::process::id())
}

/// [`watchdog_interval`] on given values (pure, for tests).
pub fn watchdog_interval_from(
    usec: Option<&str>,
    pid: Option<&str>,
    my_pid: u32,
) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok()? != my_pid {
            return None;
        }
    }
    let usec: u64 = usec?.trim().parse().ok()?;
    if usec == 0 {
        return None;
    }
    Some(Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn recv(socket: &UnixDatagram) -> String {
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn path_socket_receives_every_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::from_socket_value(Some(path.as_os_str())).unwrap();
        assert!(n.is_enabled());
        n.ready().unwrap();
        assert_eq!(recv(&server), "READY=1");
        n.watchdog().unwrap();
        assert_eq!(recv(&server), "WATCHDOG=1");
        n.status("draining 3 cells\nsecond line").unwrap();
        assert_eq!(recv(&server), "STATUS=draining 3 cells second line");
        n.stopping().unwrap();
        assert_eq!(recv(&server), "STOPPING=1");
        let long = "é".repeat(MAX_STATUS_BYTES);
        n.status(&long).unwrap();
        let got = recv(&server);
        assert!(got.len() <= "STATUS=".len() + MAX_STATUS_BYTES);
        assert!(got.starts_with("STATUS=é"));
    }

    #[test]
    fn abstract_socket_receives_ready() {
        let name = format!("vigil-health-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        let value = OsString::from(format!("@{name}"));
        let n = Notifier::from_socket_value(Some(&value)).unwrap();
        n.ready().unwrap();
        assert_eq!(recv(&server), "READY=1");
        n.watchdog().unwrap();
        assert_eq!(recv(&server), "WATCHDOG=1");
    }

    #[test]
    fn unset_socket_is_a_noop() {
        let n = Notifier::from_socket_value(None).unwrap();
        assert!(!n.is_enabled());
        n.ready().unwrap();
        n.watchdog().unwrap();
        let empty = OsString::new();
        assert!(!Notifier::from_socket_value(Some(&empty))
            .unwrap()
            .is_enabled());
    }

    #[test]
    fn relative_socket_value_is_refused() {
        let value = OsString::from("relative/notify.sock");
        assert!(matches!(
            Notifier::from_socket_value(Some(&value)),
            Err(NotifyError::BadSocket { .. })
        ));
    }

    #[test]
    fn missing_listener_is_a_send_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nobody.sock");
        let n = Notifier::from_socket_value(Some(path.as_os_str())).unwrap();
        assert!(matches!(n.ready(), Err(NotifyError::Send { .. })));
        assert!(matches!(
            n.notify(&["A=1\nB=2"]),
            Err(NotifyError::Newline(_))
        ));
    }

    #[test]
    fn watchdog_interval_is_half_and_pid_checked() {
        assert_eq!(
            watchdog_interval_from(Some("30000000"), None, 42),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            watchdog_interval_from(Some("30000000"), Some("42"), 42),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            watchdog_interval_from(Some("30000000"), Some("41"), 42),
            None
        );
        assert_eq!(watchdog_interval_from(Some("0"), None, 42), None);
        assert_eq!(watchdog_interval_from(Some("soon"), None, 42), None);
        assert_eq!(watchdog_interval_from(None, None, 42), None);
    }
}
