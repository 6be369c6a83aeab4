//! `cargo xtask`: the project's task runner. Each step is idempotent (skipped when already
//! done) and each failure is a sentence saying what to do.
//!
//! - `setup`: nightly `rust-src`, `bpf-linker` built against the nightly's own libLLVM, and
//!   (for `test`/`vmtest`) the Debian packages the tests need;
//! - `build`: the eBPF object, then the agent embedding it;
//! - `run [-- ARGS]`: setup + build + `vigil run` with embedded defaults (README command 1);
//! - `test`: setup + build + every test, root and VM tests included when possible (README
//!   command 2, what `.ci/run` calls);
//! - `load [--unpin]`: attach and pin the eBPF programs under /sys/fs/bpf/vigil;
//! - `vmtest [ARGS]`: the QEMU kernel tests;
//! - `bench [NAME…]`: the benchmarks, results appended to BENCHMARKS.md.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod silence_bench;

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the toolchain pieces (and with --packages, the Debian packages tests need).
    Setup {
        #[arg(long)]
        packages: bool,
    },
    /// Build the eBPF object and the agent embedding it.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Set up, build and run `vigil run` (root) with embedded defaults; ARGS go to `vigil run`.
    Run {
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, build and run every test (root tests when root, VM tests when QEMU can run).
    Test {
        /// Skip the QEMU VM tests.
        #[arg(long)]
        no_vm: bool,
    },
    /// Load, attach and pin the eBPF programs (or --unpin them); prints the per-peer tables.
    Load {
        #[arg(long)]
        unpin: bool,
    },
    /// Kernel integration tests in QEMU; ARGS go to the harness (e.g. --kernel all ingest).
    Vmtest {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmarks (ingest, events, silence, killswitch, timing; default all); results go to BENCHMARKS.md.
    Bench { names: Vec<String> },
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn is_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Runs a command, failing with a sentence that names it.
fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start the command to {what}: {cmd:?}"))?;
    if !status.success() {
        bail!("{what} failed ({status}); the command was {cmd:?}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    cmd.output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// `rustup component add rust-src --toolchain nightly` unless present.
fn setup_rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    let t = Instant::now();
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]), "install nightly rust-src (needs the nightly toolchain: `rustup toolchain install nightly`)")?;
    println!(
        "xtask: nightly rust-src installed in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The nightly's LLVM major version, from `rustc +nightly -vV`.
fn nightly_llvm_major() -> Result<u32> {
    let v = output(Command::new("rustc").args(["+nightly", "-vV"])).context("`rustc +nightly -vV` failed: install the nightly toolchain with `rustup toolchain install nightly`")?;
    let line = v
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("`rustc +nightly -vV` printed no LLVM version")?;
    line.split('.')
        .next()
        .and_then(|m| m.trim().parse().ok())
        .context("could not read the LLVM major version")
}

/// bpf-linker built against the nightly's own libLLVM (no system LLVM needed).
fn setup_bpf_linker() -> Result<()> {
    let major = nightly_llvm_major()?;
    let cache = home().join(".cache/vigil");
    let stamp = cache.join(format!("bpf-linker.llvm-{major}"));
    if stamp.exists() && output(Command::new("bpf-linker").arg("--version")).is_some() {
        return Ok(());
    }
    let t = Instant::now();
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("`rustc +nightly --print sysroot` failed")?;
    let libdir = Path::new(sysroot.trim()).join("lib");
    let lib = std::fs::read_dir(&libdir)
        .with_context(|| format!("reading {}", libdir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so") || n.starts_with("libLLVM-"))
        .with_context(|| format!("the nightly toolchain has no libLLVM in {}; reinstall it with `rustup toolchain install nightly --force`", libdir.display()))?;
    let prefix = cache.join("llvm");
    let plib = prefix.join("lib");
    std::fs::create_dir_all(&plib)?;
    for name in ["libLLVM.so", lib.as_str()] {
        let link = plib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(libdir.join(&lib), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    run(
        cargo()
            .args([
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
            ])
            .env("LLVM_PREFIX", &prefix),
        "build bpf-linker against the nightly's LLVM",
    )?;
    std::fs::write(&stamp, b"")?;
    println!(
        "xtask: bpf-linker (llvm-{major}) installed in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from)
}

/// Debian packages the tests need, installed when missing (root only).
fn setup_packages() -> Result<()> {
    let wanted: [(&str, &[&str]); 4] = [
        ("qemu-system-x86", &["/usr/bin/qemu-system-x86_64"]),
        ("busybox-static", &["/bin/busybox", "/usr/bin/busybox"]),
        ("musl-tools", &["/usr/bin/musl-gcc"]),
        (
            "nats-server",
            &["/usr/bin/nats-server", "/usr/sbin/nats-server"],
        ),
    ];
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(_, files)| !files.iter().any(|f| Path::new(f).exists()))
        .map(|(p, _)| *p)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        println!("xtask: not root, so not installing {missing:?}; tests that need them will say they skip");
        return Ok(());
    }
    let t = Instant::now();
    run(
        Command::new("apt-get").args(["update", "-qq"]),
        "update Debian's package lists",
    )?;
    run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        "install Debian packages",
    )?;
    println!(
        "xtask: installed {missing:?} in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn setup(packages: bool) -> Result<()> {
    let t = Instant::now();
    setup_rust_src()?;
    setup_bpf_linker()?;
    if packages {
        setup_packages()?;
    }
    println!("xtask: setup done in {:.1} s", t.elapsed().as_secs_f64());
    Ok(())
}

/// The eBPF object path (what agent/build.rs embeds).
fn ebpf_object() -> PathBuf {
    root().join("target/bpfel-unknown-none/release/vigil-ebpf")
}

fn build_ebpf() -> Result<()> {
    let t = Instant::now();
    run(
        Command::new("cargo")
            .current_dir(root().join("ebpf"))
            .args([
                "+nightly",
                "build",
                "-p",
                "vigil-ebpf",
                "-Z",
                "build-std=core",
                "--target",
                "bpfel-unknown-none",
                "--release",
            ])
            .env_remove("RUSTC")
            .env_remove("RUSTC_WRAPPER")
            .env_remove("CARGO")
            .env_remove("RUSTUP_TOOLCHAIN"),
        "build the eBPF object (run `cargo xtask setup` if bpf-linker or rust-src is missing)",
    )?;
    println!(
        "xtask: eBPF object {} built in {:.1} s",
        ebpf_object().display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn build(release: bool) -> Result<()> {
    build_ebpf()?;
    let mut c = cargo();
    c.current_dir(root())
        .args(["build", "-p", "vigil"])
        .env("VIGIL_EBPF_OBJECT", ebpf_object());
    if release {
        c.arg("--release");
    }
    run(&mut c, "build vigil")
}

fn vigil_bin(release: bool) -> PathBuf {
    root().join(if release {
        "target/release/vigil"
    } else {
        "target/debug/vigil"
    })
}

fn test(no_vm: bool) -> Result<()> {
    setup(true)?;
    build_ebpf()?;
    if !is_root() {
        println!("xtask: NOTE not running as root: root tests (eBPF load, cgroups) will print SKIPPED; run `sudo cargo xtask test` to include them");
    }
    lint()?;
    let t = Instant::now();
    let mut c = cargo();
    c.current_dir(root())
        .args([
            "test",
            "--workspace",
            "--exclude",
            "vigil-ebpf",
            "--exclude",
            "vmtest",
        ])
        .env("VIGIL_EBPF_OBJECT", ebpf_object());
    if is_root() {
        c.env("VIGIL_REQUIRE_EBPF", "1");
    }
    run(&mut c, "run the host tests")?;
    println!(
        "xtask: host tests passed in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    run(
        cargo().current_dir(root()).args(["test", "-p", "vmtest"]),
        "run the vmtest harness's own unit tests",
    )?;
    miri()?;
    if no_vm {
        println!("xtask: VM tests SKIPPED (--no-vm)");
        return Ok(());
    }
    // CI: both kernels, every scenario including the two hybrid-vsock guests, and a skip is a
    // failure. Elsewhere: the default kernel and the loopback scenarios (quicker).
    let args: Vec<String> = if is_ci() {
        [
            "--kernel",
            "all",
            "--strict",
            "vsock-smoke",
            "ingest",
            "kernel-stats",
            "identity",
            "silence",
            "killswitch",
            "hybrid-guests",
        ]
        .map(String::from)
        .to_vec()
    } else {
        ["--kernel", "6.1"].map(String::from).to_vec()
    };
    vmtest(&args)
}

/// rustfmt and clippy (pedantic, `-D warnings`) over every host crate: fails fast, before
/// the long test run.
fn lint() -> Result<()> {
    let t = Instant::now();
    run(
        cargo()
            .current_dir(root())
            .args(["fmt", "--all", "--", "--check"]),
        "check formatting (run `cargo fmt --all`)",
    )?;
    run(
        cargo()
            .current_dir(root())
            .args([
                "clippy",
                "--workspace",
                "--exclude",
                "vigil-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])
            .env("VIGIL_EBPF_OBJECT", ebpf_object()),
        "lint with clippy",
    )?;
    println!(
        "xtask: fmt and clippy clean in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The timing slots' lock-free code under Miri (undefined-behaviour check), when the nightly
/// miri component can be installed; says plainly when it cannot.
fn miri() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if !installed.lines().any(|l| l.starts_with("miri")) {
        let ok = Command::new("rustup")
            .args(["component", "add", "miri", "--toolchain", "nightly"])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            if is_ci() {
                bail!("the nightly miri component could not be installed, so the timing slots cannot be checked under Miri");
            }
            println!("xtask: Miri SKIPPED: the nightly miri component could not be installed");
            return Ok(());
        }
    }
    let t = Instant::now();
    run(
        Command::new("cargo")
            .current_dir(root())
            .args(["+nightly", "miri", "test", "-p", "vigil-timing"])
            .env_remove("RUSTC")
            .env_remove("RUSTC_WRAPPER")
            .env_remove("CARGO")
            .env_remove("RUSTUP_TOOLCHAIN"),
        "run the timing slots under Miri",
    )?;
    println!(
        "xtask: timing slots clean under Miri in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Exit code the harness uses for "QEMU cannot run here" (skipped, not failed).
const VMTEST_SKIPPED: i32 = 3;

fn vmtest(args: &[String]) -> Result<()> {
    build_ebpf()?;
    let status = cargo()
        .current_dir(root())
        .args(["run", "--release", "-p", "vmtest", "--bin", "vmtest", "--"])
        .args(args)
        .env("VIGIL_EBPF_OBJECT", ebpf_object())
        .status()
        .context("could not start the vmtest harness")?;
    match status.code() {
        Some(0) => Ok(()),
        Some(VMTEST_SKIPPED) if !is_ci() => {
            println!("xtask: VM tests SKIPPED (the harness said why above)");
            Ok(())
        }
        _ => bail!("the VM tests failed ({status}); see the table above"),
    }
}

fn bench(names: &[String]) -> Result<()> {
    setup(false)?;
    let all = ["ingest", "events", "silence", "killswitch", "timing"];
    let chosen: Vec<&str> = if names.is_empty() {
        all.to_vec()
    } else {
        names.iter().map(String::as_str).collect()
    };
    let mut out = String::new();
    for name in chosen {
        if name == "silence" {
            build(true)?;
            let text = silence_bench::run(&vigil_bin(true))?;
            print!("{text}");
            out.push_str(&format!("\n## silence\n\nCommand: `cargo xtask bench silence` (drives `target/release/vigil run`)\n\n{text}\n"));
            continue;
        }
        let (pkg, example, args): (&str, &str, &[&str]) = match name {
            "ingest" => (
                "vigil-drain",
                "bench_ingest",
                &["--conns", "16", "--frames", "200000"],
            ),
            "events" => ("vigil-journal", "bench_events", &[]),
            "timing" => ("vigil-timing", "bench_slots", &[]),
            "killswitch" => ("vigil-opcontrol", "bench_killswitch", &[]),
            other => bail!("unknown benchmark {other:?}; choose from {all:?}"),
        };
        let cmdline = format!(
            "cargo run --release -p {pkg} --example {example} -- {}",
            args.join(" ")
        );
        println!("xtask: {cmdline}");
        let o = cargo()
            .current_dir(root())
            .args([
                "run",
                "--quiet",
                "--release",
                "-p",
                pkg,
                "--example",
                example,
                "--",
            ])
            .args(args)
            .output()?;
        if !o.status.success() {
            bail!(
                "benchmark {name} failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let text = String::from_utf8_lossy(&o.stdout);
        print!("{text}");
        out.push_str(&format!(
            "\n## {name}\n\nCommand: `cargo xtask bench {name}` (runs `{cmdline}`)\n\n{text}\n"
        ));
    }
    let path = root().join("target/bench-latest.md");
    std::fs::write(&path, out)?;
    println!(
        "xtask: results written to {} (copy the sections into BENCHMARKS.md)",
        path.display()
    );
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Setup { packages } => setup(packages),
        Cmd::Build { release } => {
            setup(false)?;
            build(release)
        }
        Cmd::Run { args } => {
            setup(false)?;
            build(true)?;
            if !is_root() {
                bail!("`vigil run` loads eBPF programs and binds /run/vigil: run `sudo cargo xtask run` (or as root)");
            }
            let err = std::os::unix::process::CommandExt::exec(
                Command::new(vigil_bin(true)).arg("run").args(&args),
            );
            bail!("could not start {}: {err}", vigil_bin(true).display())
        }
        Cmd::Test { no_vm } => test(no_vm),
        Cmd::Load { unpin } => {
            setup(false)?;
            build(true)?;
            let mut c = Command::new(vigil_bin(true));
            c.args(["kernel", "load"]);
            if unpin {
                c.arg("--unpin");
            }
            run(&mut c, "load the eBPF programs")
        }
        Cmd::Vmtest { args } => {
            setup(true)?;
            vmtest(&args)
        }
        Cmd::Bench { names } => bench(&names),
    }
}
