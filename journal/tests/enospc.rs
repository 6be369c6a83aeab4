//! ENOSPC: on a tiny tmpfs (needs root to mount; skipped with a printed reason otherwise)
//! the journal stops acking, reports degraded health with a reason, and once space returns
//! writes the held events and acks them; nothing acked is lost.

mod common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, Instant};

use common::*;
use vigil_journal::SigningMode;

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let p = CString::new(self.0.as_os_str().as_bytes()).unwrap();
        // SAFETY: p is a valid NUL-terminated path; umount2 only reads it.
        unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
    }
}

fn mount_tmpfs(dir: &std::path::Path, size: &str) -> Option<Mount> {
    let target = CString::new(dir.as_os_str().as_bytes()).unwrap();
    let fstype = CString::new("tmpfs").unwrap();
    let opts = CString::new(format!("size={size}")).unwrap();
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            opts.as_ptr().cast(),
        )
    };
    (rc == 0).then(|| Mount(dir.to_owned()))
}

#[test]
fn full_disk_holds_acks_and_resumes_when_space_returns() {
    let outer = tempfile::tempdir().unwrap();
    let Some(_mount) = mount_tmpfs(outer.path(), "256k") else {
        println!(
            "skipped: could not mount a tmpfs (needs root and CAP_SYS_ADMIN): {}",
            std::io::Error::last_os_error()
        );
        return;
    };
    let dir = outer.path().join("journal");
    std::fs::create_dir(&dir).unwrap();
    let mut c = config(&dir, SigningMode::PerEvent);
    c.segment_bytes = 1 << 30;
    let h = vigil_journal::spawn(c, key()).unwrap();
    h.input
        .send(vec![guest_event(1, "c1", "r1", "s1", 1)])
        .unwrap();
    wait_ack(&h, "s1", 1);
    // Fill the rest of the disk.
    let filler = outer.path().join("filler");
    let chunk = vec![7u8; 4096];
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
    let big = "x".repeat(8000);
    let mut ev = guest_event(1, "c1", "r1", "s1", 2);
    ev.data = format!(r#"{{"big":"{big}"}}"#).into_bytes();
    h.input.send(vec![ev]).unwrap();
    let start = Instant::now();
    while !h.health.is_degraded() {
        assert!(start.elapsed() < Duration::from_secs(10), "never degraded");
        std::thread::sleep(Duration::from_millis(20));
    }
    let reason = h.health.reason().unwrap();
    assert!(reason.contains("ENOSPC"), "{reason}");
    assert!(
        h.acks.recv_timeout(Duration::from_millis(700)).is_err(),
        "acked while the disk was full"
    );
    std::fs::remove_file(&filler).unwrap();
    let acks = wait_ack(&h, "s1", 2);
    assert_eq!(acks.last().unwrap().durable_seq, 2);
    assert!(!h.health.is_degraded());
    h.shutdown().unwrap();
    let sum = vigil_journal::verify(&dir, &[key().verifying_key()]).unwrap();
    assert_eq!(sum.events, 2);
}
