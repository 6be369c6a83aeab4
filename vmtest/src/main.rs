//! `vmtest`: boots Debian kernels in QEMU (TCG by default) with an initramfs built here and
//! runs vigil's kernel integration scenarios inside, with real vsock traffic over the
//! guest's loopback transport. Called by `cargo xtask vmtest`; see
//! `/work/shared/design/vmtest.md` for the recipe and why vsock stays inside the guest.
//!
//! Exit codes: 0 all passed, 1 a scenario failed (or was skipped under `--strict`), 2 bad
//! arguments, 3 the VM tests could not run on this host at all (skipped).

mod host;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use host::hybrid;
use host::initramfs::{self, Contents};
use host::kernels;
use host::qemu::{self, BootConfig};
use host::tools;
use vmtest::guard::{HYBRID_SCENARIO, SCENARIOS};
use vmtest::markers::{Outcome, ScenarioResult};

/// Exit code when QEMU cannot run here, so xtask can tell "skipped" from "failed".
const EXIT_SKIPPED: u8 = 3;
/// Exit code for unusable arguments.
const EXIT_USAGE: u8 = 2;
/// Default host-side timeout of one boot (all scenarios of one kernel under TCG).
const DEFAULT_TIMEOUT_SECS: u64 = 900;

#[derive(Debug, Parser)]
#[command(
    name = "vmtest",
    about = "Run vigil's kernel integration tests in QEMU guests"
)]
struct Args {
    /// Kernel to boot: 6.1, 6.12 or all.
    #[arg(long, default_value = "all")]
    kernel: String,
    /// Treat any SKIP (including "QEMU cannot run here") as a failure.
    #[arg(long)]
    strict: bool,
    /// Use KVM instead of TCG (opt-in: KVM fails on paravirtualized hosts like this one).
    #[arg(long)]
    kvm: bool,
    /// Host-side timeout of one boot, in seconds.
    #[arg(long, default_value_t = DEFAULT_TIMEOUT_SECS)]
    timeout_secs: u64,
    /// Scenarios to run (default: all but the opt-in hybrid-guests): vsock-smoke, ingest,
    /// kernel-stats, identity, hybrid-guests.
    scenarios: Vec<String>,
}

/// Errors that stop the harness before or between boots.
#[derive(Debug, thiserror::Error)]
enum HarnessError {
    #[error(
        "unknown scenario {0:?}; known: vsock-smoke, ingest, kernel-stats, identity, hybrid-guests"
    )]
    UnknownScenario(String),
    #[error("the VM tests cannot run here: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Tools(#[from] tools::ToolsError),
    #[error(transparent)]
    Kernel(#[from] kernels::KernelError),
    #[error(transparent)]
    Initramfs(#[from] initramfs::InitramfsError),
    #[error(transparent)]
    Qemu(#[from] qemu::QemuError),
    #[error(transparent)]
    Hybrid(#[from] hybrid::HybridError),
}

/// Results of one kernel.
struct KernelRun {
    label: String,
    release: String,
    wall: Duration,
    /// Boots of the loopback VM (more than one after early-boot deaths).
    tries: u32,
    /// Whether the hybrid guest pair was booted too.
    hybrid_boots: bool,
    results: Vec<ScenarioResult>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(runs) => report(&runs, args.strict),
        Err(HarnessError::UnknownScenario(s)) => {
            eprintln!("vmtest: {}", HarnessError::UnknownScenario(s));
            ExitCode::from(EXIT_USAGE)
        }
        Err(HarnessError::Kernel(kernels::KernelError::UnknownLabel(l))) => {
            eprintln!("vmtest: {}", kernels::KernelError::UnknownLabel(l));
            ExitCode::from(EXIT_USAGE)
        }
        Err(e @ HarnessError::Unavailable(_)) => {
            println!("vmtest: VM tests SKIPPED: {e}");
            if args.strict {
                println!("vmtest: --strict: a skipped VM test run is a failure");
                ExitCode::FAILURE
            } else {
                ExitCode::from(EXIT_SKIPPED)
            }
        }
        Err(e) => {
            eprintln!("vmtest: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<Vec<KernelRun>, HarnessError> {
    let scenarios: Vec<String> = if args.scenarios.is_empty() {
        SCENARIOS.iter().map(|s| (*s).to_string()).collect()
    } else {
        args.scenarios.clone()
    };
    if let Some(bad) = scenarios
        .iter()
        .find(|s| !SCENARIOS.contains(&s.as_str()) && s.as_str() != HYBRID_SCENARIO)
    {
        return Err(HarnessError::UnknownScenario(bad.clone()));
    }
    let want_hybrid = scenarios.iter().any(|s| s == HYBRID_SCENARIO);
    let scenarios: Vec<String> = scenarios
        .into_iter()
        .filter(|s| s != HYBRID_SCENARIO)
        .collect();
    let labels = kernels::labels(&args.kernel)?;

    if let Err(e) = tools::ensure_host_packages() {
        return Err(HarnessError::Unavailable(format!(
            "installing QEMU/busybox/kmod failed: {e}"
        )));
    }
    let qemu_version = tools::qemu_usable().map_err(HarnessError::Unavailable)?;
    println!("vmtest: {qemu_version}");
    if args.kvm && !std::path::Path::new("/dev/kvm").exists() {
        return Err(HarnessError::Unavailable(
            "--kvm given but /dev/kvm is missing".into(),
        ));
    }
    let busybox = tools::busybox_path()?;
    let ws = tools::workspace()?;
    let cache = ws.target_dir.join("vmtest");
    let project_list: PathBuf = ws.root.join("vmtest/apt/bookworm-backports.list");
    tools::ensure_musl_target()?;
    let bins = tools::build_guest_binaries(&ws)?;
    let backend = if want_hybrid {
        Some(hybrid::ensure_backend(&cache).map_err(|e| e.to_string()))
    } else {
        None
    };

    let mut runs = Vec::new();
    for label in &labels {
        let kernel = match kernels::obtain(label, &cache, &project_list) {
            Ok(k) => k,
            Err(e @ kernels::KernelError::Tool(_)) => {
                return Err(HarnessError::Unavailable(format!("kernel {label}: {e}")));
            }
            Err(e) => return Err(e.into()),
        };
        let initrd = cache.join("initramfs").join(format!("{label}.cpio.gz"));
        let built = initramfs::build(
            &Contents {
                kernel: &kernel,
                busybox: &busybox,
                guest: &bins.guest,
                vigil: bins.vigil.as_deref(),
            },
            &initrd,
        )?;
        println!(
            "vmtest: kernel {label}: initramfs {} ({} KiB gzip, {} KiB cpio; modules {})",
            built.path.display(),
            built.compressed_bytes / 1024,
            built.cpio_bytes / 1024,
            built.modules.join(" ")
        );
        let t0 = Instant::now();
        let mut tries = 0;
        let mut hybrid_boots = false;
        let mut results = Vec::new();
        if !scenarios.is_empty() {
            let (r, t) = boot_main(args, label, &kernel, &initrd, &scenarios)?;
            results = r;
            tries = t;
        }
        match &backend {
            None => {}
            Some(Err(e)) => results.push(ScenarioResult {
                name: HYBRID_SCENARIO.into(),
                outcome: Outcome::Skip,
                reason: format!("vhost-device-vsock unavailable: {e}"),
            }),
            Some(Ok(bin)) => {
                println!(
                    "vmtest: kernel {label}: {HYBRID_SCENARIO}: two guests with vhost-device-vsock"
                );
                results.push(hybrid::run_hybrid(&hybrid::HybridRun {
                    label,
                    vmlinuz: &kernel.vmlinuz,
                    initrd: &initrd,
                    backend: bin,
                    vigil: bins.vigil.as_deref(),
                    workdir: cache.join("hybrid").join(label),
                    kvm: args.kvm,
                    timeout: Duration::from_secs(args.timeout_secs),
                })?);
                hybrid_boots = true;
            }
        }
        let wall = t0.elapsed();
        runs.push(KernelRun {
            label: label.clone(),
            release: kernel.release.clone(),
            wall,
            tries,
            hybrid_boots,
            results,
        });
    }
    Ok(runs)
}

/// Boots the loopback VM of one kernel with the chosen scenarios.
fn boot_main(
    args: &Args,
    label: &str,
    kernel: &kernels::Kernel,
    initrd: &std::path::Path,
    scenarios: &[String],
) -> Result<(Vec<ScenarioResult>, u32), HarnessError> {
    let cfg = BootConfig {
        qemu: PathBuf::from("qemu-system-x86_64"),
        label: label.to_string(),
        prefix: label.to_string(),
        extra_args: Vec::new(),
        extra_cmdline: Vec::new(),
        vmlinuz: kernel.vmlinuz.clone(),
        initrd: initrd.to_path_buf(),
        scenarios: scenarios.to_vec(),
        kvm: args.kvm,
        timeout: Duration::from_secs(args.timeout_secs),
    };
    println!(
        "vmtest: kernel {label}: booting {} ({}, cpu {}, timeout {} s)",
        kernel.release,
        if args.kvm { "KVM" } else { "TCG" },
        qemu::cpu_model(label),
        args.timeout_secs
    );
    let (outcome, tries) = qemu::boot(&cfg)?;
    let mut results = outcome.log.results(scenarios, &outcome.why_incomplete());
    if !outcome.log.done {
        println!(
            "vmtest: kernel {label}: no VMTEST DONE marker ({}); last console lines:",
            outcome.why_incomplete()
        );
        for l in &outcome.tail {
            println!("    {l}");
        }
        // A missing end marker fails the boot even if every scenario reported.
        if results.iter().all(|r| r.outcome != Outcome::Fail) {
            results.push(ScenarioResult {
                name: "(boot)".into(),
                outcome: Outcome::Fail,
                reason: format!("missing VMTEST DONE: {}", outcome.why_incomplete()),
            });
        }
    }
    Ok((results, tries))
}

fn report(runs: &[KernelRun], strict: bool) -> ExitCode {
    let mut bad = false;
    for run in runs {
        println!();
        println!(
            "== vmtest kernel {} ({}): {:.1} s wall, {} loopback-VM boot{}{} ==",
            run.label,
            run.release,
            run.wall.as_secs_f64(),
            run.tries,
            if run.tries == 1 { "" } else { "s" },
            if run.hybrid_boots {
                " + hybrid pair"
            } else {
                ""
            }
        );
        for r in &run.results {
            println!("  {:<4}  {:<14} {}", r.outcome, r.name, r.reason);
            bad |= r.outcome == Outcome::Fail || (strict && r.outcome == Outcome::Skip);
        }
    }
    let count = |o: Outcome| {
        runs.iter()
            .flat_map(|r| &r.results)
            .filter(|r| r.outcome == o)
            .count()
    };
    println!(
        "\nvmtest: {} passed, {} failed, {} skipped{}",
        count(Outcome::Pass),
        count(Outcome::Fail),
        count(Outcome::Skip),
        if strict { " (strict: skips fail)" } else { "" }
    );
    if bad {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
