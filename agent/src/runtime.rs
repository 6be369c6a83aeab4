//! `vigil run`: assembles the daemon. It owns start-up (limits, capabilities, kernel
//! programs, registry, journal, drain), the threads and channels between them, the control
//! loop (reducer + applier + admin socket + signals on a small tokio runtime), and an
//! orderly shutdown in which nothing acknowledged is lost.
//!
//! Threads: `vigil-drain` (io_uring, owned by vigil-drain), `vigil-journal` (owned by
//! vigil-journal), `vigil-forward` (turns drain batches into journal input and journal acks
//! into drain commands), and the control thread (this one).
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use crossbeam_channel::{select, Receiver};
use tokio::sync::{mpsc, oneshot};

use crate::config::{CellConfig, Config};
use crate::kernel::Probes;
use crate::reducer::{self, AdminReply, AdminRequest, Effect, Event, State};
use crate::registry::Registry;
use crate::sys;

/// Capacity of the journal's input queue, in batches (one batch per received chunk, up to a
/// few dozen events each). 1,024 batches are a few hundred milliseconds of peak ingest: enough
/// to ride out one slow fsync; beyond that the forwarder blocks, the drain's hand-off fills,
/// and back-pressure reaches the guests — nothing is dropped.
pub const JOURNAL_INPUT_CAPACITY: usize = 1_024;

/// Names of vigil's own tasks in the timing table.
pub const TASKS: [&str; 4] = ["drain", "journal", "forward", "reducer"];

/// Everything the applier needs to carry out effects.
struct Applier {
    probes: Option<Probes>,
    drain: vigil_drain::DrainCommander,
    state_dir: PathBuf,
    pending: HashMap<reducer::RequestId, oneshot::Sender<AdminReply>>,
    slots: HashMap<String, Arc<vigil_drain::CellSlot>>,
}

impl Applier {
    fn apply(&mut self, effect: Effect) {
        match effect {
            Effect::Reply { id, reply } => {
                if let Some(tx) = self.pending.remove(&id) {
                    let _ = tx.send(reply);
                }
            }
            Effect::ReplyWithPeers { id } => {
                let reply = match &self.probes {
                    None => AdminReply::Err("kernel evidence is off on this host (see vigil's start-up log for why)".into()),
                    Some(p) => match p.peers() {
                        Ok(rows) => AdminReply::Ok(serde_json::to_value(rows).unwrap_or_default()),
                        Err(e) => AdminReply::Err(e.to_string()),
                    },
                };
                if let Some(tx) = self.pending.remove(&id) {
                    let _ = tx.send(reply);
                }
            }
            Effect::DrainAddCell(cell) => {
                let spec = self.spec(&cell);
                if let Err(e) = self.drain.send(vigil_drain::DrainCommand::AddCell(spec)) {
                    tracing::error!("could not register cell {} with the drain: {e}", cell.cell_id);
                }
            }
            Effect::DrainRemoveCell(cell) => {
                self.slots.remove(&cell);
                if let Err(e) = self.drain.send(vigil_drain::DrainCommand::RemoveCell { cell: cell.clone() }) {
                    tracing::error!("could not remove cell {cell} from the drain: {e}");
                }
            }
            Effect::Persist(registry) => {
                if let Err(e) = registry.persist(&self.state_dir) {
                    tracing::error!("{e}");
                }
            }
            Effect::Warn(m) => tracing::warn!("{m}"),
            Effect::Info(m) => tracing::info!("{m}"),
        }
    }

    fn spec(&mut self, cell: &CellConfig) -> vigil_drain::CellSpec {
        let slot = vigil_drain::CellSlot::shared();
        self.slots.insert(cell.cell_id.clone(), Arc::clone(&slot));
        vigil_drain::CellSpec { cell_id: cell.cell_id.clone(), run_id: cell.run_id.clone(), cid: cell.cid, uds_path: cell.uds_path.clone(), slot }
    }
}

/// Loads the kernel programs, or says once and clearly why vigil runs without them.
fn load_probes() -> Option<Probes> {
    if let Err(e) = sys::check_bpf_capabilities() {
        tracing::warn!("kernel evidence is off: {e}");
        return None;
    }
    match Probes::load_and_attach() {
        Ok(p) => {
            tracing::info!("eBPF programs attached to vsock:{} and vsock:{}", vigil_common::TP_RECV, vigil_common::TP_ALLOC);
            Some(p)
        }
        Err(e) => {
            tracing::warn!("kernel evidence is off: {e}");
            None
        }
    }
}

/// The registry at start: the persisted one, with the config file's cells registered over it.
fn initial_registry(cfg: &Config) -> anyhow::Result<Registry> {
    let mut reg = Registry::restore(&cfg.state_dir)?;
    for c in &cfg.cells {
        reg.upsert(c.clone()).with_context(|| format!("cell {} from the config file", c.cell_id))?;
    }
    reg.persist(&cfg.state_dir)?;
    Ok(reg)
}

pub fn run(cfg: Config) -> anyhow::Result<()> {
    let nofile = sys::raise_nofile()?;
    tracing::info!("open-file limit {nofile}");
    std::fs::create_dir_all(&cfg.state_dir).with_context(|| format!("creating state directory {}", cfg.state_dir.display()))?;
    let registry = initial_registry(&cfg)?;
    let probes = load_probes();

    // Journal first: nothing is accepted before events can be made durable.
    let key = vigil_journal::HostKey::load_or_create(&cfg.key_path())?;
    tracing::info!("host key {} (public key {})", key.key_id(), vigil_journal::HostKey::public_key_path(&cfg.key_path()).display());
    let journal = vigil_journal::spawn(journal_config(&cfg), key)?;

    let drain_cfg = vigil_drain::DrainConfig {
        listen_vsock: cfg.listen.vsock,
        max_frame_bytes: cfg.listen.max_frame_bytes,
        deny_policy_queries_inline: true,
        ..vigil_drain::DrainConfig::new(cfg.listen.port)
    };
    let mut applier_slots = HashMap::new();
    let specs: Vec<vigil_drain::CellSpec> = registry
        .iter()
        .map(|c| {
            let slot = vigil_drain::CellSlot::shared();
            applier_slots.insert(c.cell_id.clone(), Arc::clone(&slot));
            vigil_drain::CellSpec { cell_id: c.cell_id.clone(), run_id: c.run_id.clone(), cid: c.cid, uds_path: c.uds_path.clone(), slot }
        })
        .collect();
    let drain = vigil_drain::spawn(drain_cfg, specs).context("starting the drain loop")?;
    if let Some(e) = drain.vsock_error() {
        tracing::warn!("no AF_VSOCK listener: {e}; hybrid-vsock cells are still served");
    }

    let (ev_tx, ev_rx) = mpsc::channel::<Event>(reducer::EVENT_CHANNEL_CAPACITY);
    let forward = {
        let outputs = drain.outputs().clone();
        let commander = drain.commander();
        let input = journal.input.clone();
        let acks = journal.acks.clone();
        let ev_tx = ev_tx.clone();
        std::thread::Builder::new().name("vigil-forward".into()).spawn(move || forward(&outputs, &acks, &input, &commander, &ev_tx))?
    };

    let applier = Applier { probes, drain: drain.commander(), state_dir: cfg.state_dir.clone(), pending: HashMap::new(), slots: applier_slots };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let admin_listener = rt.block_on(async { crate::admin::bind(&cfg.admin.socket) })?;
    tracing::info!("admin socket {}", cfg.admin.socket.display());
    rt.block_on(control(State::new(registry), applier, ev_tx, ev_rx, admin_listener))?;

    // Orderly shutdown: the drain stops accepting and hands off what it holds; the forwarder
    // passes it to the journal; the journal makes it durable and stops.
    tracing::info!("stopping");
    drain.shutdown().context("stopping the drain loop")?;
    let _ = forward.join();
    journal.shutdown().context("stopping the journal")?;
    let _ = std::fs::remove_file(&cfg.admin.socket);
    tracing::info!("stopped cleanly");
    Ok(())
}

fn journal_config(cfg: &Config) -> vigil_journal::JournalConfig {
    vigil_journal::JournalConfig {
        signing: if cfg.journal.signing == "per-event" { vigil_journal::SigningMode::PerEvent } else { vigil_journal::SigningMode::Batch },
        sink: if cfg.journal.sink == "stdout" { vigil_journal::Sink::Stdout } else { vigil_journal::Sink::Segments },
        segment_bytes: cfg.journal.segment_bytes,
        retention_bytes: (cfg.journal.retention_bytes > 0).then_some(cfg.journal.retention_bytes),
        ..vigil_journal::JournalConfig::new(cfg.journal.dir.clone(), cfg.host_name())
    }
}

fn token(conn: vigil_drain::ConnId) -> u64 {
    (u64::from(conn.generation) << 32) | u64::from(conn.slot)
}

fn conn_of(token: u64) -> vigil_drain::ConnId {
    vigil_drain::ConnId { slot: token as u32, generation: (token >> 32) as u32 }
}

/// Wall-clock ns since the Unix epoch (host receive time stamped on events).
fn unix_nanos() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// The forwarder: drain outputs → journal input (and control events → reducer); journal
/// acks → drain. Ends when the drain's output channel closes.
fn forward(
    outputs: &Receiver<vigil_drain::DrainOutput>,
    acks: &Receiver<Vec<vigil_journal::AckOut>>,
    input: &crossbeam_channel::Sender<Vec<vigil_journal::EventIn>>,
    drain: &vigil_drain::DrainCommander,
    ev_tx: &mpsc::Sender<Event>,
) {
    use vigil_drain::DrainOutput as O;
    let mut claims: HashMap<vigil_drain::ConnId, Arc<std::collections::BTreeMap<String, String>>> = HashMap::new();
    let to_reducer = |e: Event| {
        let _ = ev_tx.blocking_send(e);
    };
    loop {
        select! {
            recv(outputs) -> out => {
                let Ok(out) = out else { break };
                match out {
                    O::Batch(batch) => {
                        let recv_time = unix_nanos();
                        let c = claims.get(&batch.conn).cloned();
                        let events: Vec<vigil_journal::EventIn> = batch
                            .events
                            .iter()
                            .map(|e| vigil_journal::EventIn {
                                token: token(batch.conn),
                                cell_id: Arc::clone(&batch.cell.cell_id),
                                run_id: Arc::clone(&batch.cell.run_id),
                                stream_id: Some(Arc::clone(&batch.stream_id)),
                                guest_seq: Some(e.guest_seq),
                                event_type: e.event_type.clone(),
                                op_id: (!e.op_id.is_empty()).then(|| e.op_id.clone()),
                                content_type: e.content_type.clone(),
                                data: e.payload.clone(),
                                guest_time_unix_nano: (e.guest_time_unix_nano != 0).then_some(e.guest_time_unix_nano),
                                recv_time_unix_nano: recv_time,
                                claims: c.clone(),
                            })
                            .collect();
                        drop(batch);
                        if !events.is_empty() && input.send(events).is_err() {
                            tracing::error!("the journal stopped; no more events can be made durable");
                            break;
                        }
                    }
                    O::Hello { conn, claims: cl, .. } => {
                        claims.insert(conn, Arc::new(cl));
                    }
                    O::Connected { cell, .. } => to_reducer(Event::Connected { cell_id: cell.cell_id.to_string() }),
                    O::Closed { conn, cell, reason } => {
                        claims.remove(&conn);
                        to_reducer(Event::Closed { cell_id: cell.cell_id.to_string(), reason: reason.name() });
                    }
                    O::Rejected { reason, peer } => to_reducer(Event::Rejected { reason: reason.name(), peer: format!("{peer:?}") }),
                    O::PolicyQuery { .. } | O::ExecutorStats { .. } => {}
                }
            }
            recv(acks) -> a => {
                let Ok(a) = a else { break };
                for ack in a {
                    let _ = drain.send(vigil_drain::DrainCommand::Ack { conn: conn_of(ack.token), durable_seq: ack.durable_seq });
                }
            }
        }
    }
}

/// The control loop: reducer + applier + admin socket, until SIGINT or SIGTERM.
async fn control(
    mut state: State,
    mut applier: Applier,
    ev_tx: mpsc::Sender<Event>,
    mut ev_rx: mpsc::Receiver<Event>,
    admin: tokio::net::UnixListener,
) -> anyhow::Result<()> {
    let (admin_tx, mut admin_rx) = mpsc::channel::<(AdminRequest, oneshot::Sender<AdminReply>)>(64);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = admin.accept().await else { continue };
            let tx = admin_tx.clone();
            tokio::spawn(crate::admin::serve_conn(stream, move |req| {
                let tx = tx.clone();
                async move {
                    let (rtx, rrx) = oneshot::channel();
                    if tx.send((req, rtx)).await.is_err() {
                        return AdminReply::Err("vigil is shutting down".into());
                    }
                    rrx.await.unwrap_or_else(|_| AdminReply::Err("vigil is shutting down".into()))
                }
            }));
        }
    });
    drop(ev_tx);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut next_id: reducer::RequestId = 0;
    loop {
        let event = tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
            Some((request, reply)) = admin_rx.recv() => {
                next_id += 1;
                applier.pending.insert(next_id, reply);
                Event::Admin { id: next_id, request }
            }
            Some(ev) = ev_rx.recv() => ev,
        };
        for effect in reducer::step(&mut state, event, sys::monotonic_ns()) {
            applier.apply(effect);
        }
    }
    Ok(())
}
