//! packaging/vigil.service: the hardening it must keep, and `systemd-analyze verify`.

use std::path::PathBuf;
use std::process::Command;

fn unit_text() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../packaging/vigil.service");
    std::fs::read_to_string(path).unwrap()
}

fn values(text: &str, key: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_owned)
        .collect()
}

#[test]
fn unit_keeps_its_hardening() {
    let text = unit_text();
    for (key, value) in [
        ("Type", "notify"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("ReadWritePaths", "/var/lib/vigil /run/vigil"),
        (
            "RestrictAddressFamilies",
            "AF_UNIX AF_VSOCK AF_INET AF_INET6 AF_NETLINK",
        ),
        (
            "CapabilityBoundingSet",
            "CAP_BPF CAP_PERFMON CAP_DAC_READ_SEARCH",
        ),
        (
            "AmbientCapabilities",
            "CAP_BPF CAP_PERFMON CAP_DAC_READ_SEARCH",
        ),
    ] {
        assert_eq!(values(&text, key), vec![value.to_owned()], "{key}");
    }
    assert_eq!(values(&text, "WatchdogSec").len(), 1);
    assert!(
        !text.contains("CAP_SYS_ADMIN\n")
            && !values(&text, "CapabilityBoundingSet")[0].contains("SYS_ADMIN")
    );
}

#[test]
fn systemd_analyze_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("SKIPPED: systemd-analyze is not installed");
        return;
    }
    // verify needs ExecStart to exist: check a copy pointing at a binary that does.
    let dir = tempfile::tempdir().unwrap();
    let copy: String = unit_text()
        .lines()
        .map(|l| {
            if l.starts_with("ExecStart=") {
                "ExecStart=/bin/true".to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let path = dir.path().join("vigil.service");
    std::fs::write(&path, copy + "\n").unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "verify failed: {stderr}");
    // verify exits 0 on unknown keys; it only warns. Any line about our file is a problem.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("vigil.service"))
        .collect();
    assert!(ours.is_empty(), "systemd-analyze complained: {ours:#?}");
}
