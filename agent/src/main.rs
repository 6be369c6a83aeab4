//! `vigil`: the host-side agent for microVM fleets. This file owns the command line only;
//! each subcommand lives in its module (see ARCHITECTURE.md for the code map).
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

mod admin;
mod config;
mod health;
mod kernel;
mod killswitch;
mod reducer;
mod registry;
mod runtime;
mod silence;
mod sys;

#[derive(Parser, Debug)]
#[command(
    name = "vigil",
    version,
    about = "Host-side agent for microVM fleets: drains guest telemetry over vsock into a signed, durable journal."
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon (needs CAP_BPF + CAP_PERFMON or root for kernel evidence).
    Run {
        /// Configuration file (TOML); without it the embedded defaults (docs/config.md) apply.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Talk to a running daemon over its admin socket.
    Ctl(CtlArgs),
    /// Reference guest client and load generator: send events to vigil.
    Emit(vigil_wire::client::EmitArgs),
    /// Check a journal offline: CRCs, signatures, hash chains.
    Verify(vigil_journal::VerifyArgs),
    /// Print journaled events as CloudEvent JSON lines.
    Tail(vigil_journal::TailArgs),
    /// Create an ed25519 host key (private key 0600, public key beside it as <path>.pub).
    Keygen(vigil_journal::KeygenArgs),
    /// Live view of a running daemon (cells, silence, vigil's own tasks) from its HTTP endpoint.
    Status {
        /// The daemon's health/metrics address (`http.addr` in its config).
        #[arg(long, default_value = vigil_health::http::DEFAULT_HTTP_ADDR)]
        addr: std::net::SocketAddr,
        /// Print once and exit (for scripts).
        #[arg(long)]
        once: bool,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 2)]
        interval: u64,
    },
    /// Load vigil's eBPF programs without the daemon, to check a host kernel.
    Kernel {
        #[command(subcommand)]
        command: KernelCommand,
    },
}

#[derive(clap::Args, Debug)]
struct CtlArgs {
    /// The daemon's admin socket.
    #[arg(long, default_value = "/run/vigil/admin.sock")]
    socket: PathBuf,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand, Debug)]
enum CtlCommand {
    /// Check that the daemon is up and serving (prints "ok").
    Ping,
    /// Manage the cell registry.
    Cell {
        #[command(subcommand)]
        command: CellCommand,
    },
    /// Op-control (the kill switch) for single operations.
    Op {
        #[command(subcommand)]
        command: OpCommand,
    },
    /// The kernel's per-peer table of guest → host vsock packets.
    Peers {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Fault injection for tests (not for production use).
    #[command(hide = true)]
    Debug {
        #[command(subcommand)]
        command: DebugCommand,
    },
}

#[derive(Subcommand, Debug)]
enum OpCommand {
    /// Hold the op's actions until resumed or terminated.
    Pause { cell: String, op_id: String },
    /// Lift a pause (a terminated op stays terminated).
    Resume { cell: String, op_id: String },
    /// Deny the op's actions for good (sticky for the run).
    Terminate { cell: String, op_id: String },
    /// Ops (and cells) that are paused or terminated.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum DebugCommand {
    /// Block the drain thread for MS milliseconds (the receiver-stall scenario).
    StallDrain {
        #[arg(long)]
        ms: u64,
    },
}

#[derive(Subcommand, Debug)]
enum CellCommand {
    /// Register a cell (or a new run of it).
    Add {
        #[arg(long)]
        cell: String,
        #[arg(long)]
        run: String,
        /// The guest's vsock CID (QEMU/vhost-vsock).
        #[arg(long, conflicts_with = "uds", required_unless_present = "uds")]
        cid: Option<u32>,
        /// The VMM's hybrid vsock Unix socket path (Firecracker, Cloud Hypervisor).
        #[arg(long)]
        uds: Option<PathBuf>,
        /// Keep-alive window in milliseconds.
        #[arg(long, default_value_t = config::DEFAULT_KEEPALIVE_MS)]
        keepalive_ms: u64,
        /// The cell's cgroup (for pause/terminate enforcement).
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// Host probe declarations for the cell (TOML, see docs/health.md).
        #[arg(long)]
        probes: Option<PathBuf>,
    },
    /// Remove a cell (ends its run).
    Remove { cell: String },
    /// Hold every operation of the cell's run (and freeze its cgroup, if it has one).
    Pause { cell: String },
    /// Lift a cell-level pause (and thaw its cgroup).
    Resume { cell: String },
    /// Deny every operation of the cell's run for good (and kill its cgroup).
    Terminate { cell: String },
    /// List registered cells.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum KernelCommand {
    /// Load and attach the programs, pin maps and links under /sys/fs/bpf/vigil, print the
    /// per-peer table (they stay attached until `vigil kernel load --unpin`).
    Load {
        /// Remove what a previous load pinned (detaching the programs) instead.
        #[arg(long)]
        unpin: bool,
    },
    /// Print the per-peer tables pinned by `vigil kernel load`.
    Peers,
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VIGIL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            // Each cause once, outermost first.
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !msg.contains(&c) {
                    msg.push_str(": ");
                    msg.push_str(&c);
                }
            }
            eprintln!("vigil: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run { config } => {
            let cfg = config::Config::load(config.as_deref())?;
            runtime::run(&cfg)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ctl(args) => ctl(args),
        Command::Emit(args) => {
            let report = vigil_wire::client::run_emit(&args)?;
            println!("{report}");
            Ok(if report.error.is_some() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Verify(args) => {
            vigil_journal::run_verify(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Tail(args) => {
            vigil_journal::run_tail(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Keygen(args) => {
            vigil_journal::run_keygen(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Kernel { command } => kernel_cmd(&command),
        Command::Status {
            addr,
            once,
            interval,
        } => {
            loop {
                let (health, entities) = vigil_health::status::fetch(addr)?;
                let view = vigil_health::status::render(&entities, &health);
                if once {
                    print!("{view}");
                    return Ok(ExitCode::SUCCESS);
                }
                // Clear the screen and redraw.
                print!("\x1b[2J\x1b[H{view}");
                std::io::Write::flush(&mut std::io::stdout())?;
                std::thread::sleep(std::time::Duration::from_secs(interval.max(1)));
            }
        }
    }
}

fn ctl(args: CtlArgs) -> anyhow::Result<ExitCode> {
    use admin::Request;
    let (req, json_out) = match args.command {
        CtlCommand::Ping => (Request::Ping, true),
        CtlCommand::Peers { json } => (Request::Peers, json),
        CtlCommand::Op { command } => match command {
            OpCommand::Pause { cell, op_id } => (
                Request::OpSignal {
                    cell_id: cell,
                    op_id: Some(op_id),
                    signal: "pause".into(),
                },
                true,
            ),
            OpCommand::Resume { cell, op_id } => (
                Request::OpSignal {
                    cell_id: cell,
                    op_id: Some(op_id),
                    signal: "resume".into(),
                },
                true,
            ),
            OpCommand::Terminate { cell, op_id } => (
                Request::OpSignal {
                    cell_id: cell,
                    op_id: Some(op_id),
                    signal: "terminate".into(),
                },
                true,
            ),
            OpCommand::List { json } => (Request::OpList, json),
        },
        CtlCommand::Debug {
            command: DebugCommand::StallDrain { ms },
        } => (Request::DebugStallDrain { ms }, true),
        CtlCommand::Cell { command } => match command {
            CellCommand::Add {
                cell,
                run,
                cid,
                uds,
                keepalive_ms,
                cgroup,
                probes,
            } => (
                Request::CellAdd {
                    cell: config::CellConfig {
                        cell_id: cell,
                        run_id: run,
                        cid,
                        uds_path: uds,
                        keepalive_ms,
                        cgroup,
                        probes,
                    },
                },
                true,
            ),
            CellCommand::Remove { cell } => (Request::CellRemove { cell_id: cell }, true),
            CellCommand::Pause { cell } => (
                Request::OpSignal {
                    cell_id: cell,
                    op_id: None,
                    signal: "pause".into(),
                },
                true,
            ),
            CellCommand::Resume { cell } => (
                Request::OpSignal {
                    cell_id: cell,
                    op_id: None,
                    signal: "resume".into(),
                },
                true,
            ),
            CellCommand::Terminate { cell } => (
                Request::OpSignal {
                    cell_id: cell,
                    op_id: None,
                    signal: "terminate".into(),
                },
                true,
            ),
            CellCommand::List { json } => (Request::CellList, json),
        },
    };
    let peers = matches!(req, Request::Peers);
    let list = matches!(req, Request::CellList);
    let op_list = matches!(req, Request::OpList);
    let result = admin::call(&args.socket, &req)?;
    if json_out {
        match result {
            serde_json::Value::String(s) => println!("{s}"),
            other => println!("{other}"),
        }
    } else if peers {
        let rows: Vec<kernel::PeerRow> = serde_json::from_value(result)?;
        kernel::print_table("guest → host", &rows);
    } else if op_list {
        let rows: Vec<serde_json::Value> = serde_json::from_value(result)?;
        println!("{:<24} {:<24} {:<40} {:<10}", "cell", "run", "op", "state");
        for r in rows {
            println!(
                "{:<24} {:<24} {:<40} {:<10}",
                r["cellId"].as_str().unwrap_or(""),
                r["runId"].as_str().unwrap_or(""),
                r["opId"].as_str().unwrap_or("(whole cell)"),
                r["state"].as_str().unwrap_or("")
            );
        }
    } else if list {
        let cells: Vec<serde_json::Value> = serde_json::from_value(result)?;
        println!(
            "{:<24} {:<24} {:<28} {:>8}",
            "cell", "run", "address", "conns"
        );
        for c in cells {
            let addr = c.get("cid").map_or_else(
                || {
                    c.get("uds_path")
                        .map_or(String::new(), |p| p.as_str().unwrap_or("").to_string())
                },
                |cid| format!("cid {cid}"),
            );
            println!(
                "{:<24} {:<24} {:<28} {:>8}",
                c["cell_id"].as_str().unwrap_or(""),
                c["run_id"].as_str().unwrap_or(""),
                addr,
                c.get("connections_open")
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn kernel_cmd(command: &KernelCommand) -> anyhow::Result<ExitCode> {
    let dir = std::path::Path::new(kernel::PIN_DIR);
    match command {
        KernelCommand::Load { unpin: true } => {
            kernel::unpin(dir)?;
            println!(
                "removed vigil's pinned programs and maps from {}",
                dir.display()
            );
        }
        KernelCommand::Load { unpin: false } => {
            sys::check_bpf_capabilities()?;
            let probes = kernel::Probes::load_and_attach()?;
            kernel::print_table("guest → host", &probes.peers()?);
            kernel::print_table("host → guest", &probes.peers_tx()?);
            probes.pin(dir)?;
            println!(
                "attached and pinned under {} (remove with `vigil kernel load --unpin`)",
                dir.display()
            );
        }
        KernelCommand::Peers => {
            kernel::print_table(
                "guest → host",
                &kernel::read_pinned(dir, vigil_common::PEER_MAP)?,
            );
            kernel::print_table(
                "host → guest",
                &kernel::read_pinned(dir, vigil_common::PEER_TX_MAP)?,
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
