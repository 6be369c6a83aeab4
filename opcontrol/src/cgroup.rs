//! Enforcement on a cell's cgroup: freeze (pause), thaw (resume) and kill (terminate), on
//! cgroup v2 (`cgroup.freeze`, `cgroup.kill`, completion read from `cgroup.events`) or, where
//! the cell's cgroup is in a v1 freezer hierarchy, through `freezer.state` (kill = freeze,
//! SIGKILL every pid in `cgroup.procs`, thaw). Which one is used follows from the files in the
//! given directory. Every action returns a [`CgroupOutcome`] for the audit event; none panics.

use std::fs;
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long an action waits for the kernel to confirm it (frozen, thawed, emptied) by default.
/// Freezing waits for every task to reach a freezable point; a healthy cgroup does so in
/// milliseconds, a task stuck in uninterruptible I/O may take longer. 5 s bounds how long
/// the applier is blocked; past it the action is reported `failed` (timed out) and audited.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest single wait between two checks of a cgroup's state. v2 `cgroup.events` also wakes
/// a poller on change, but v1 `freezer.state` does not, and re-reading every 5 ms bounds the
/// delay either way.
const POLL_SLICE: Duration = Duration::from_millis(5);

/// Why a cgroup action failed.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum CgroupError {
    /// The directory has neither `cgroup.freeze` (v2) nor `freezer.state` (v1 freezer).
    #[error("{path} is not a cgroup v2 directory nor a v1 freezer cgroup")]
    NotACgroup {
        /// The directory.
        path: PathBuf,
    },
    /// Writing a control file failed.
    #[error("writing {value:?} to {path} failed: {}", std::io::Error::from_raw_os_error(*errno))]
    Write {
        /// The control file.
        path: PathBuf,
        /// What was written.
        value: &'static str,
        /// The OS error number.
        errno: i32,
    },
    /// Reading a control file failed.
    #[error("reading {path} failed: {}", std::io::Error::from_raw_os_error(*errno))]
    Read {
        /// The control file.
        path: PathBuf,
        /// The OS error number.
        errno: i32,
    },
    /// The kernel did not confirm the action in time.
    #[error("{path} did not become {wanted} within {waited_ms} ms")]
    Timeout {
        /// The cgroup.
        path: PathBuf,
        /// The state waited for.
        wanted: &'static str,
        /// How long it waited.
        waited_ms: u64,
    },
    /// Sending SIGKILL to a task of the cgroup failed (other than "no such process").
    #[error("sending SIGKILL to pid {pid} of {path} failed: {}", std::io::Error::from_raw_os_error(*errno))]
    Signal {
        /// The cgroup.
        path: PathBuf,
        /// The task.
        pid: i32,
        /// The OS error number.
        errno: i32,
    },
}

/// An enforcement action.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CgroupAction {
    /// Pause every task of the cgroup.
    Freeze,
    /// Resume them.
    Thaw,
    /// Kill every task.
    Kill,
}

impl CgroupAction {
    /// The `action` value of the audit event.
    pub fn as_str(self) -> &'static str {
        match self {
            CgroupAction::Freeze => "freeze",
            CgroupAction::Thaw => "thaw",
            CgroupAction::Kill => "kill",
        }
    }
}

/// What an action achieved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CgroupOutcome {
    /// Every task is frozen.
    Frozen,
    /// The cgroup is thawed.
    Thawed,
    /// Every task is gone.
    Killed,
    /// The action failed; the error says how.
    Failed(CgroupError),
}

impl CgroupOutcome {
    /// The `result` value of the audit event.
    pub fn result_str(&self) -> &'static str {
        match self {
            CgroupOutcome::Frozen => "frozen",
            CgroupOutcome::Thawed => "thawed",
            CgroupOutcome::Killed => "killed",
            CgroupOutcome::Failed(_) => "failed",
        }
    }

    /// The `error` value of the audit event (`None` on success).
    pub fn error_sentence(&self) -> Option<String> {
        match self {
            CgroupOutcome::Failed(e) => Some(e.to_string()),
            _ => None,
        }
    }

    /// Whether the action succeeded.
    pub fn is_ok(&self) -> bool {
        !matches!(self, CgroupOutcome::Failed(_))
    }
}

/// Which freezer interface a cgroup directory offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupKind {
    /// cgroup v2: `cgroup.freeze`, `cgroup.events`, and `cgroup.kill` on kernels ≥ 5.14.
    V2,
    /// cgroup v1 freezer controller: `freezer.state`.
    V1Freezer,
}

/// The freezer interface of `path`.
pub fn detect(path: &Path) -> Result<CgroupKind, CgroupError> {
    if path.join("cgroup.freeze").is_file() {
        Ok(CgroupKind::V2)
    } else if path.join("freezer.state").is_file() {
        Ok(CgroupKind::V1Freezer)
    } else {
        Err(CgroupError::NotACgroup {
            path: path.to_owned(),
        })
    }
}

/// The first cgroup2 mount point in `/proc/mounts` (e.g. `/sys/fs/cgroup` on a pure v2 host,
/// `/sys/fs/cgroup/unified` on a hybrid one), and the first v1 freezer mount.
pub fn mounts() -> (Option<PathBuf>, Option<PathBuf>) {
    let text = fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut v2 = None;
    let mut freezer = None;
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let (_, Some(dir), Some(fstype), Some(opts)) = (f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        if fstype == "cgroup2" && v2.is_none() {
            v2 = Some(PathBuf::from(dir));
        } else if fstype == "cgroup" && opts.split(',').any(|o| o == "freezer") && freezer.is_none()
        {
            freezer = Some(PathBuf::from(dir));
        }
    }
    (v2, freezer)
}

fn io_errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn write_file(dir: &Path, file: &str, value: &'static str) -> Result<(), CgroupError> {
    let path = dir.join(file);
    fs::write(&path, value).map_err(|e| CgroupError::Write {
        errno: io_errno(&e),
        path,
        value,
    })
}

fn read_file(dir: &Path, file: &str) -> Result<String, CgroupError> {
    let path = dir.join(file);
    fs::read_to_string(&path).map_err(|e| CgroupError::Read {
        errno: io_errno(&e),
        path,
    })
}

/// The value of `key` in a flat-keyed file such as `cgroup.events` (`populated 1\nfrozen 0`).
fn keyed_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        (f.next() == Some(key)).then(|| f.next()).flatten()
    })
}

/// Waits up to one [`POLL_SLICE`] for `file` of `dir` to change (cgroup v2 files signal a
/// change as POLLPRI); a plain sleep when it cannot be polled.
fn wait_change(dir: &Path, file: &str) {
    let Ok(f) = fs::File::open(dir.join(file)) else {
        std::thread::sleep(POLL_SLICE);
        return;
    };
    let mut pfd = libc::pollfd {
        fd: f.as_raw_fd(),
        events: libc::POLLPRI,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd for an fd kept open by `f` for the whole call; nfds is 1.
    let rc = unsafe { libc::poll(&raw mut pfd, 1, POLL_SLICE.as_millis() as i32) };
    if rc < 0 {
        std::thread::sleep(POLL_SLICE);
    }
}

/// Re-reads `file` of `dir` until `done(contents)` or the timeout.
fn wait_until(
    dir: &Path,
    file: &str,
    wanted: &'static str,
    timeout: Duration,
    done: impl Fn(&str) -> bool,
) -> Result<(), CgroupError> {
    let start = Instant::now();
    loop {
        // A control file that cannot be read (the cgroup was removed under us) is a failure
        // to report, not to retry.
        let text = read_file(dir, file)?;
        if done(&text) {
            return Ok(());
        }
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            return Err(CgroupError::Timeout {
                path: dir.to_owned(),
                wanted,
                waited_ms: elapsed.as_millis() as u64,
            });
        }
        if file == "freezer.state" || file == "cgroup.procs" {
            // These files do not signal changes; re-read them every millisecond.
            std::thread::sleep(Duration::from_millis(1));
        } else {
            wait_change(dir, file);
        }
    }
}

fn freeze_inner(path: &Path, timeout: Duration) -> Result<(), CgroupError> {
    match detect(path)? {
        CgroupKind::V2 => {
            write_file(path, "cgroup.freeze", "1")?;
            wait_until(path, "cgroup.events", "frozen", timeout, |t| {
                keyed_value(t, "frozen") == Some("1")
            })
        }
        CgroupKind::V1Freezer => {
            write_file(path, "freezer.state", "FROZEN")?;
            wait_until(path, "freezer.state", "FROZEN", timeout, |t| {
                t.trim() == "FROZEN"
            })
        }
    }
}

fn thaw_inner(path: &Path, timeout: Duration) -> Result<(), CgroupError> {
    match detect(path)? {
        CgroupKind::V2 => {
            write_file(path, "cgroup.freeze", "0")?;
            wait_until(path, "cgroup.events", "thawed", timeout, |t| {
                keyed_value(t, "frozen") == Some("0")
            })
        }
        CgroupKind::V1Freezer => {
            write_file(path, "freezer.state", "THAWED")?;
            wait_until(path, "freezer.state", "THAWED", timeout, |t| {
                t.trim() == "THAWED"
            })
        }
    }
}

/// The pids in `cgroup.procs`.
pub fn procs(path: &Path) -> Result<Vec<i32>, CgroupError> {
    Ok(read_file(path, "cgroup.procs")?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect())
}

/// Freeze, SIGKILL every task, thaw (the tasks cannot fork while frozen, and a frozen task's
/// pid cannot be reused, so no task escapes and no stranger is signalled).
fn kill_by_pids(path: &Path, timeout: Duration) -> Result<(), CgroupError> {
    freeze_inner(path, timeout)?;
    let mut first_err = None;
    for pid in procs(path)? {
        // SAFETY: kill(2) has no memory-safety preconditions; `pid` is a positive pid read
        // from cgroup.procs (never 0 or -1, which would signal a group).
        let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
        if rc != 0 {
            let errno = io_errno(&std::io::Error::last_os_error());
            if errno != libc::ESRCH && first_err.is_none() {
                first_err = Some(CgroupError::Signal {
                    path: path.to_owned(),
                    pid,
                    errno,
                });
            }
        }
    }
    thaw_inner(path, timeout)?;
    if let Some(e) = first_err {
        return Err(e);
    }
    wait_until(path, "cgroup.procs", "empty", timeout, |t| {
        t.trim().is_empty()
    })
}

fn kill_inner(path: &Path, timeout: Duration) -> Result<(), CgroupError> {
    match detect(path)? {
        CgroupKind::V2 if path.join("cgroup.kill").is_file() => {
            write_file(path, "cgroup.kill", "1")?;
            wait_until(path, "cgroup.events", "unpopulated", timeout, |t| {
                keyed_value(t, "populated") == Some("0")
            })
        }
        CgroupKind::V2 | CgroupKind::V1Freezer => kill_by_pids(path, timeout),
    }
}

fn outcome(r: Result<(), CgroupError>, ok: CgroupOutcome) -> CgroupOutcome {
    match r {
        Ok(()) => ok,
        Err(e) => CgroupOutcome::Failed(e),
    }
}

/// Freezes every task of the cgroup at `path` and waits (up to `timeout`) until the kernel
/// says all are frozen.
pub fn freeze(path: &Path, timeout: Duration) -> CgroupOutcome {
    outcome(freeze_inner(path, timeout), CgroupOutcome::Frozen)
}

/// Thaws the cgroup at `path` and waits until the kernel says it is thawed.
pub fn thaw(path: &Path, timeout: Duration) -> CgroupOutcome {
    outcome(thaw_inner(path, timeout), CgroupOutcome::Thawed)
}

/// Kills every task of the cgroup at `path` and waits until it has none left.
pub fn kill(path: &Path, timeout: Duration) -> CgroupOutcome {
    outcome(kill_inner(path, timeout), CgroupOutcome::Killed)
}

/// Whether the cgroup at `path` is (entirely) frozen.
pub fn is_frozen(path: &Path) -> Result<bool, CgroupError> {
    match detect(path)? {
        CgroupKind::V2 => {
            Ok(keyed_value(&read_file(path, "cgroup.events")?, "frozen") == Some("1"))
        }
        CgroupKind::V1Freezer => Ok(read_file(path, "freezer.state")?.trim() == "FROZEN"),
    }
}

/// Moves process `pid` into the cgroup at `path`.
pub fn attach(path: &Path, pid: u32) -> Result<(), CgroupError> {
    let file = path.join("cgroup.procs");
    fs::write(&file, pid.to_string()).map_err(|e| match e.kind() {
        ErrorKind::NotFound => CgroupError::NotACgroup {
            path: path.to_owned(),
        },
        _ => CgroupError::Write {
            errno: io_errno(&e),
            path: file,
            value: "<pid>",
        },
    })
}
