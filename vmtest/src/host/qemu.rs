//! Boots one test VM with `qemu-system-x86_64` (TCG unless KVM is asked for), streams its
//! serial console to the terminal with a prefix while feeding it to the marker parser,
//! enforces a host-side timeout, and reboots a guest that died before userspace started
//! (6.12 under TCG sometimes does) a bounded number of times.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vmtest::guard::{SCENARIOS_KEY, VMTEST_TOKEN};
use vmtest::markers::{BootLog, Marker};

/// Boots of one kernel before giving up when the guest never reaches userspace.
pub const MAX_BOOT_TRIES: u32 = 3;
/// Guest memory: vigil, four emitters and their buffers fit with room to spare.
pub const GUEST_MEM_MB: u32 = 1024;
/// Guest vCPUs (the scenarios have concurrent emitters and a daemon).
pub const GUEST_CPUS: u32 = 2;
/// After `VMTEST DONE`, how long the guest gets to print its exit code and reboot.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);
/// Console lines kept per boot for the failure summary; older lines are dropped.
pub const CONSOLE_TAIL_LINES: usize = 40;

/// Errors of running QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("could not start qemu-system-x86_64: {0}")]
    Spawn(std::io::Error),
    #[error("waiting for qemu failed: {0}")]
    Wait(std::io::Error),
}

/// One boot's settings.
#[derive(Debug, Clone)]
pub struct BootConfig {
    /// The emulator to run (`qemu-system-x86_64`; tests substitute a script).
    pub qemu: PathBuf,
    /// Kernel label (6.1, 6.12): picks the CPU model.
    pub label: String,
    /// Console prefix, e.g. `6.12` or `6.12/g1`.
    pub prefix: String,
    /// Extra QEMU arguments (devices of the hybrid guests).
    pub extra_args: Vec<String>,
    /// Extra kernel command line words (`key=value`) for the guest program.
    pub extra_cmdline: Vec<String>,
    pub vmlinuz: PathBuf,
    pub initrd: PathBuf,
    pub scenarios: Vec<String>,
    pub kvm: bool,
    pub timeout: Duration,
}

/// CPU model: 6.12 guests crash in early boot under TCG with cmpxchg16b exposed.
pub fn cpu_model(label: &str) -> &'static str {
    if label == "6.1" {
        "max"
    } else {
        "max,-cx16"
    }
}

/// Kernel command line, carrying the test-VM token and the scenario list.
pub fn kernel_cmdline(scenarios: &[String], extra: &[String]) -> String {
    let mut line = format!(
        "console=ttyS0 rdinit=/init panic=-1 quiet loglevel=4 reboot=t {VMTEST_TOKEN} \
         {SCENARIOS_KEY}{}",
        scenarios.join(",")
    );
    for word in extra {
        line.push(' ');
        line.push_str(word);
    }
    line
}

/// The full QEMU argument list.
pub fn qemu_args(cfg: &BootConfig) -> Vec<String> {
    let accel = if cfg.kvm { "kvm" } else { "tcg" };
    let mut a: Vec<String> = [
        "-accel",
        accel,
        "-M",
        "pc",
        "-cpu",
        cpu_model(&cfg.label),
        "-smp",
    ]
    .iter()
    .map(|s| (*s).to_string())
    .collect();
    a.push(GUEST_CPUS.to_string());
    a.push("-m".into());
    a.push(GUEST_MEM_MB.to_string());
    a.push("-kernel".into());
    a.push(cfg.vmlinuz.display().to_string());
    a.push("-initrd".into());
    a.push(cfg.initrd.display().to_string());
    a.push("-append".into());
    a.push(kernel_cmdline(&cfg.scenarios, &cfg.extra_cmdline));
    a.extend(cfg.extra_args.iter().cloned());
    for s in [
        "-nographic",
        "-no-reboot",
        "-nodefaults",
        "-serial",
        "stdio",
        "-monitor",
        "none",
    ] {
        a.push(s.into());
    }
    a
}

/// How one boot ended.
#[derive(Debug)]
pub struct BootOutcome {
    pub log: BootLog,
    pub status: Option<ExitStatus>,
    pub timed_out: bool,
    pub elapsed: Duration,
    pub tail: Vec<String>,
}

impl BootOutcome {
    /// Why the boot did not complete, for results without END markers.
    pub fn why_incomplete(&self) -> String {
        if self.timed_out {
            format!("host timeout after {} s", self.elapsed.as_secs())
        } else if !self.log.done {
            format!(
                "guest stopped without VMTEST DONE (qemu {})",
                self.status.map_or("killed".into(), |s| s.to_string())
            )
        } else {
            "guest finished".into()
        }
    }
}

/// Boots once, streaming the console; kills QEMU at the timeout.
pub fn boot_once(cfg: &BootConfig) -> Result<BootOutcome, QemuError> {
    let started = Instant::now();
    // A just-written executable can be busy (ETXTBSY) for a moment while another thread's
    // fork still holds a descriptor to it; retry briefly rather than fail the boot.
    let mut attempts = 0;
    let mut child = loop {
        let spawned = Command::new(&cfg.qemu)
            .args(qemu_args(cfg))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        match spawned {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempts < 20 => {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(25));
            }
            other => break other.map_err(QemuError::Spawn)?,
        }
    };
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let tx2 = tx.clone();
    let readers = [
        std::thread::spawn(move || {
            if let Some(out) = stdout {
                pump(out, "", &tx);
            }
        }),
        std::thread::spawn(move || {
            if let Some(err) = stderr {
                pump(err, "qemu: ", &tx2);
            }
        }),
    ];
    let prefix = format!("[{}]", cfg.prefix);
    let mut log = BootLog::default();
    let mut tail: Vec<String> = Vec::new();
    let deadline = started + cfg.timeout;
    let mut done_at: Option<Instant> = None;
    let mut timed_out = false;
    loop {
        let now = Instant::now();
        let limit = done_at.map_or(deadline, |d| (d + SHUTDOWN_GRACE).min(deadline));
        if now >= limit {
            timed_out = done_at.is_none();
            break;
        }
        match rx.recv_timeout(limit - now) {
            Ok(line) => {
                let line = printable(&line);
                println!("{prefix} {line}");
                if matches!(log.feed(&line), Some(Marker::Done)) {
                    done_at = Some(Instant::now());
                }
                tail.push(line);
                if tail.len() > CONSOLE_TAIL_LINES {
                    tail.remove(0);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let grace = if timed_out {
        Duration::ZERO
    } else {
        EXIT_GRACE
    };
    let status = finish(&mut child, timed_out || done_at.is_some(), grace)?;
    for r in readers {
        let _ = r.join();
    }
    Ok(BootOutcome {
        log,
        status,
        timed_out,
        elapsed: started.elapsed(),
        tail,
    })
}

/// How long a QEMU that printed its last line gets to exit on its own before it is killed
/// (its console closing comes a moment before the process is reapable).
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// Reaps QEMU, killing it first when it may still run.
fn finish(
    child: &mut Child,
    may_run: bool,
    grace: Duration,
) -> Result<Option<ExitStatus>, QemuError> {
    if may_run {
        let until = Instant::now() + grace;
        loop {
            if let Some(st) = child.try_wait().map_err(QemuError::Wait)? {
                return Ok(Some(st));
            }
            if Instant::now() >= until {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        child.wait().map_err(QemuError::Wait)?;
        return Ok(None);
    }
    child.wait().map(Some).map_err(QemuError::Wait)
}

/// The line without terminal control sequences (SeaBIOS clears the screen) or other
/// control characters, so the prefixed console stays readable.
pub fn printable(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ params final-byte(0x40..=0x7e); other escapes: drop ESC + 1 char.
            if chars.next_if_eq(&'[').is_some() {
                for n in chars.by_ref() {
                    if ('\u{40}'..='\u{7e}').contains(&n) {
                        break;
                    }
                }
            } else {
                chars.next();
            }
        } else if c == '\t' || !c.is_control() {
            out.push(c);
        }
    }
    out
}

/// Sends each line of `src` (lossy UTF-8, with `tag` in front) until EOF or the receiver
/// is gone.
fn pump<R: Read>(src: R, tag: &'static str, tx: &mpsc::Sender<String>) {
    for raw in BufReader::new(src).split(b'\n').map_while(Result::ok) {
        if tx
            .send(format!("{tag}{}", String::from_utf8_lossy(&raw)))
            .is_err()
        {
            return;
        }
    }
}

/// Boots until the guest reaches userspace, at most [`MAX_BOOT_TRIES`] times.
pub fn boot(cfg: &BootConfig) -> Result<(BootOutcome, u32), QemuError> {
    let mut tries = 1;
    loop {
        let outcome = boot_once(cfg)?;
        if outcome.log.guest_started || outcome.timed_out || tries >= MAX_BOOT_TRIES {
            return Ok((outcome, tries));
        }
        println!(
            "vmtest: {}: guest died in early boot (no {} marker, qemu {}); rebooting, try {} of {}",
            cfg.prefix,
            vmtest::markers::GUEST_START,
            outcome.status.map_or("killed".into(), |s| s.to_string()),
            tries + 1,
            MAX_BOOT_TRIES
        );
        tries += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmtest::markers::Outcome;

    fn cfg(label: &str, kvm: bool) -> BootConfig {
        BootConfig {
            qemu: "qemu-system-x86_64".into(),
            label: label.into(),
            prefix: label.into(),
            extra_args: Vec::new(),
            extra_cmdline: vec!["vmtest_hybrid=raw".into()],
            vmlinuz: "/k/vmlinuz".into(),
            initrd: "/k/initrd.gz".into(),
            scenarios: vec!["vsock-smoke".into(), "ingest".into()],
            kvm,
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn qemu_args_follow_the_recipe() {
        let a = qemu_args(&cfg("6.12", false)).join(" ");
        assert!(
            a.starts_with("-accel tcg -M pc -cpu max,-cx16 -smp 2 -m 1024 "),
            "{a}"
        );
        assert!(a.contains("-no-reboot -nodefaults -serial stdio -monitor none"));
        assert!(a.contains("vigil_vmtest=1 vmtest_scenarios=vsock-smoke,ingest vmtest_hybrid=raw"));
        let b = qemu_args(&cfg("6.1", true)).join(" ");
        assert!(b.starts_with("-accel kvm -M pc -cpu max -smp"), "{b}");
    }

    #[test]
    fn printable_strips_escape_sequences_and_controls() {
        assert_eq!(
            printable("\u{1b}c\u{1b}[?7l\u{1b}[2J\u{1b}[0mSeaBIOS (1.16)\r"),
            "SeaBIOS (1.16)"
        );
        assert_eq!(printable("a\tb\u{7}c"), "a\tbc");
    }

    /// A stand-in for QEMU: a shell script with the given body, in a fresh directory.
    fn fake_qemu(name: &str, body: &str) -> (PathBuf, PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("vmtest-fake-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("qemu");
        std::fs::write(&script, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        (script, dir)
    }

    fn fake_cfg(qemu: PathBuf, timeout: Duration) -> BootConfig {
        BootConfig {
            qemu,
            timeout,
            ..cfg("6.12", false)
        }
    }

    #[test]
    fn a_complete_boot_yields_every_result() {
        let (q, dir) = fake_qemu(
            "ok",
            "printf 'SeaBIOS\\r\\nVMTEST GUEST START\\r\\nVMTEST BEGIN vsock-smoke\\n'\n\
             echo 'VMTEST END vsock-smoke PASS fine'\n\
             echo 'VMTEST BEGIN ingest'; echo 'VMTEST END ingest SKIP no vigil'\n\
             echo 'VMTEST DONE'; echo 'VMTEST EXIT 0'; echo 'oops' >&2; exit 0",
        );
        let (out, tries) = boot(&fake_cfg(q, Duration::from_secs(20))).unwrap();
        assert_eq!(tries, 1);
        assert!(out.log.guest_started && out.log.done && !out.timed_out);
        assert_eq!(out.log.exit_code, Some(0));
        assert!(out.status.is_some_and(|s| s.success()));
        assert!(out.tail.iter().any(|l| l == "qemu: oops"));
        let r = out
            .log
            .results(&["vsock-smoke".into(), "ingest".into()], "-");
        assert_eq!((r[0].outcome, r[1].outcome), (Outcome::Pass, Outcome::Skip));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_hung_guest_is_killed_at_the_host_timeout() {
        let (q, dir) = fake_qemu(
            "hang",
            "echo 'VMTEST GUEST START'\necho 'VMTEST BEGIN ingest'\nexec sleep 600",
        );
        let t0 = std::time::Instant::now();
        let out = boot_once(&fake_cfg(q, Duration::from_millis(700))).unwrap();
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
        assert!(out.timed_out);
        assert!(!out.log.done);
        assert!(out.why_incomplete().starts_with("host timeout"));
        let r = out.log.results(&["ingest".into()], &out.why_incomplete());
        assert_eq!(r[0].outcome, Outcome::Fail);
        assert!(
            r[0].reason.contains("began but never ended"),
            "{}",
            r[0].reason
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn early_boot_death_is_retried_at_most_three_times() {
        let (q, dir) = fake_qemu(
            "die",
            "echo boot >> \"$(dirname \"$0\")/count\"\necho 'Kernel panic'\nexit 1",
        );
        let (out, tries) = boot(&fake_cfg(q, Duration::from_secs(20))).unwrap();
        assert_eq!(tries, MAX_BOOT_TRIES);
        assert!(!out.log.guest_started && !out.timed_out);
        let boots = std::fs::read_to_string(dir.join("count")).unwrap();
        assert_eq!(boots.lines().count(), MAX_BOOT_TRIES as usize);
        assert!(out.why_incomplete().contains("without VMTEST DONE"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
