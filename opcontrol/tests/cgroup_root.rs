//! Root tests of cgroup enforcement on a real cgroup with a real `sleep 1000` child: freeze,
//! thaw, kill, for cgroup v2 and for the v1 freezer. Run as root (`sudo cargo test -p
//! vigil-opcontrol --test cgroup_root`); without root or a writable hierarchy each test prints
//! `SKIPPED <test>: <reason>` and returns.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use vigil_opcontrol::cgroup::{self, CgroupKind, CgroupOutcome};

const TIMEOUT: Duration = Duration::from_secs(5);

/// A cgroup directory removed (after killing what is left in it) when dropped.
struct TempCgroup(PathBuf);

impl Drop for TempCgroup {
    fn drop(&mut self) {
        let _ = cgroup::kill(&self.0, TIMEOUT);
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn make(root: Option<PathBuf>, test: &str) -> Option<TempCgroup> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIPPED {test}: not root");
        return None;
    }
    let Some(root) = root else {
        println!("SKIPPED {test}: no such cgroup hierarchy mounted");
        return None;
    };
    let dir = root.join(format!("vigil-opc-test-{}-{test}", std::process::id()));
    if let Err(e) = std::fs::create_dir(&dir) {
        println!("SKIPPED {test}: cannot create {}: {e}", dir.display());
        return None;
    }
    Some(TempCgroup(dir))
}

fn task_state(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("State:").map(|s| s.trim().to_owned()))
        .unwrap_or_default()
}

fn sleeper(cg: &Path) -> Child {
    let child = Command::new("sleep").arg("1000").spawn().unwrap();
    cgroup::attach(cg, child.id()).unwrap();
    assert_eq!(cgroup::procs(cg).unwrap(), vec![child.id() as i32]);
    child
}

fn freeze_thaw_kill(cg: &TempCgroup, kind: CgroupKind) {
    let path = &cg.0;
    assert_eq!(cgroup::detect(path).unwrap(), kind);
    let mut child = sleeper(path);
    assert!(!cgroup::is_frozen(path).unwrap());
    assert_eq!(cgroup::freeze(path, TIMEOUT), CgroupOutcome::Frozen);
    assert!(cgroup::is_frozen(path).unwrap());
    if kind == CgroupKind::V1Freezer {
        // The v1 freezer parks tasks in uninterruptible sleep.
        assert!(
            task_state(child.id()).starts_with('D'),
            "{}",
            task_state(child.id())
        );
    } else {
        let events = std::fs::read_to_string(path.join("cgroup.events")).unwrap();
        assert!(events.contains("frozen 1"), "{events}");
    }
    assert_eq!(cgroup::thaw(path, TIMEOUT), CgroupOutcome::Thawed);
    assert!(!cgroup::is_frozen(path).unwrap());
    assert!(
        child.try_wait().unwrap().is_none(),
        "still alive after thaw"
    );
    assert_eq!(cgroup::kill(path, TIMEOUT), CgroupOutcome::Killed);
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    assert!(cgroup::procs(path).unwrap().is_empty());
}

#[test]
fn v2_freeze_thaw_kill_a_real_process() {
    let (v2, _) = cgroup::mounts();
    let Some(cg) = make(v2, "v2") else { return };
    freeze_thaw_kill(&cg, CgroupKind::V2);
}

#[test]
fn v1_freezer_freeze_thaw_kill_a_real_process() {
    let (_, v1) = cgroup::mounts();
    let Some(cg) = make(v1, "v1") else { return };
    freeze_thaw_kill(&cg, CgroupKind::V1Freezer);
}

#[test]
fn a_missing_cgroup_fails_with_a_sentence() {
    let path = Path::new("/nonexistent/vigil-opc");
    for outcome in [
        cgroup::freeze(path, TIMEOUT),
        cgroup::thaw(path, TIMEOUT),
        cgroup::kill(path, TIMEOUT),
    ] {
        assert_eq!(outcome.result_str(), "failed");
        assert_eq!(
            outcome.error_sentence().unwrap(),
            "/nonexistent/vigil-opc is not a cgroup v2 directory nor a v1 freezer cgroup"
        );
    }
}
