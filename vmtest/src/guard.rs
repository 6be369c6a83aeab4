//! The "are we inside the test VM?" check that every vsock connect depends on, and the
//! kernel command line keys the harness uses to talk to the guest (`vigil_vmtest=1`,
//! `vmtest_scenarios=a,b`). This host is itself a VM whose vsock reaches a real
//! hypervisor, so the guard refuses unless the harness-only token is present.

/// Token the harness puts on the test guest's kernel command line, and nowhere else.
pub const VMTEST_TOKEN: &str = "vigil_vmtest=1";
/// Command line key listing the scenarios the guest should run, comma-separated.
pub const SCENARIOS_KEY: &str = "vmtest_scenarios=";
/// Scenarios of the single loopback VM, in the order they run (the default set).
pub const SCENARIOS: &[&str] = &[
    "vsock-smoke",
    "ingest",
    "kernel-stats",
    "identity",
    "silence",
    "killswitch",
];
/// Opt-in scenario with two guests on a virtio-vsock device backed by vhost-device-vsock
/// (hybrid vsock, the Firecracker model); it runs only when named.
pub const HYBRID_SCENARIO: &str = "hybrid-guests";
/// Command line key telling hybrid guests what to send: `vigil` (run `vigil emit` against
/// a `vigil run` on the host) or `raw` (a checked byte pattern to the harness itself).
pub const HYBRID_MODE_KEY: &str = "vmtest_hybrid=";
/// Events each hybrid guest emits in `vigil` mode.
pub const HYBRID_EVENTS: u64 = 2_000;
/// Guest port of the hybrid scenario: the host listens on `<uds_path>_7100`.
pub const HYBRID_PORT: u32 = 7100;
/// Bytes each hybrid guest sends (1 MiB, in writes of at most [`HYBRID_WRITE`]).
pub const HYBRID_BYTES: usize = 1 << 20;
/// Largest single guest write in the hybrid scenario: vhost-device-vsock 0.3.0 drops 6.12
/// guest packets over 32 KiB, so writes stay at 16 KiB.
pub const HYBRID_WRITE: usize = 16 << 10;

/// Byte `i` of the test pattern both ends of the smoke scenarios check: position-dependent
/// so shifted, dropped or duplicated bytes are caught.
pub fn pattern_byte(i: usize) -> u8 {
    ((i * 31) ^ (i >> 11)) as u8
}

/// Errors of the guard.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("reading /proc/cmdline failed: {0}")]
    Read(#[from] std::io::Error),
    #[error(
        "refusing AF_VSOCK: /proc/cmdline lacks {VMTEST_TOKEN}, so this is not the test VM \
         (a vsock connect here would reach the real hypervisor)"
    )]
    NotTestVm,
}

/// True when `cmdline` holds the token as a whole word.
pub fn cmdline_has_token(cmdline: &str) -> bool {
    cmdline.split_ascii_whitespace().any(|w| w == VMTEST_TOKEN)
}

/// Scenario names listed on the command line (`vmtest_scenarios=a,b`), or every scenario.
pub fn scenarios_from_cmdline(cmdline: &str) -> Vec<String> {
    cmdline
        .split_ascii_whitespace()
        .find_map(|w| w.strip_prefix(SCENARIOS_KEY))
        .map_or_else(
            || SCENARIOS.iter().map(|s| (*s).to_string()).collect(),
            |list| {
                list.split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            },
        )
}

/// Value of `key` (written with its `=`) on the command line, if present.
pub fn cmdline_value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_ascii_whitespace()
        .find_map(|w| w.strip_prefix(key))
}

/// Reads `/proc/cmdline`.
pub fn read_cmdline() -> Result<String, GuardError> {
    Ok(std::fs::read_to_string("/proc/cmdline")?)
}

/// Succeeds only inside the test VM (token present on this kernel's command line).
pub fn ensure_test_vm() -> Result<(), GuardError> {
    if cmdline_has_token(&read_cmdline()?) {
        Ok(())
    } else {
        Err(GuardError::NotTestVm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_must_be_a_whole_word() {
        assert!(cmdline_has_token("console=ttyS0 vigil_vmtest=1 quiet\n"));
        assert!(!cmdline_has_token("console=ttyS0 vigil_vmtest=10"));
        assert!(!cmdline_has_token("xvigil_vmtest=1"));
        assert!(!cmdline_has_token("vigil_vmtest=0"));
    }

    #[test]
    fn host_is_not_the_test_vm() {
        // The machine running unit tests never boots with the harness token.
        if let Ok(c) = read_cmdline() {
            assert!(
                !cmdline_has_token(&c),
                "unit tests must not run inside the VM"
            );
            assert!(matches!(ensure_test_vm(), Err(GuardError::NotTestVm)));
        }
    }

    #[test]
    fn scenarios_come_from_the_command_line_or_default_to_all() {
        assert_eq!(
            scenarios_from_cmdline("a vmtest_scenarios=ingest,identity b"),
            vec!["ingest".to_string(), "identity".to_string()]
        );
        assert_eq!(scenarios_from_cmdline("quiet").len(), SCENARIOS.len());
        assert_eq!(
            cmdline_value("a vmtest_hybrid=vigil b", HYBRID_MODE_KEY),
            Some("vigil")
        );
        assert_eq!(cmdline_value("a b", HYBRID_MODE_KEY), None);
    }
}
