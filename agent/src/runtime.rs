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
use crate::reducer::{
    self, AdminReply, AdminRequest, Effect, Event, Observed, SilenceRecord, State,
};
use crate::registry::Registry;
use crate::silence;
use crate::sys;

/// Cells whose next frame the forwarder must report (silenced runs awaiting `agent_resumed`).
/// The forwarder checks `count` first, so with no silenced cell it never takes the lock.
#[derive(Default)]
pub struct ResumeWatch {
    count: std::sync::atomic::AtomicUsize,
    cells: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl ResumeWatch {
    fn set(&self, cell: &str, watch: bool) {
        let mut cells = self
            .cells
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if watch {
            cells.insert(cell.to_string());
        } else {
            cells.remove(cell);
        }
        self.count
            .store(cells.len(), std::sync::atomic::Ordering::Release);
    }

    /// Whether `cell` is watched; if so, stops watching it (the reducer is told once).
    fn take(&self, cell: &str) -> bool {
        if self.count.load(std::sync::atomic::Ordering::Acquire) == 0 {
            return false;
        }
        let mut cells = self
            .cells
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let hit = cells.remove(cell);
        self.count
            .store(cells.len(), std::sync::atomic::Ordering::Release);
        hit
    }
}

/// Everything the applier needs to carry out effects.
struct Applier {
    probes: Option<Probes>,
    drain: vigil_drain::DrainCommander,
    journal: crossbeam_channel::Sender<Vec<vigil_journal::EventIn>>,
    resume: Arc<ResumeWatch>,
    port: u32,
    state_dir: PathBuf,
    pending: HashMap<reducer::RequestId, oneshot::Sender<AdminReply>>,
    slots: HashMap<String, Arc<vigil_drain::CellSlot>>,
    drain_stats: Arc<vigil_drain::DrainStats>,
    health: Arc<crate::health::Source>,
    upstream_acks: Arc<std::sync::Mutex<HashMap<u64, vigil_opcontrol::upstream::AckHandle>>>,
    /// One host-probe driver per cell that declares probes.
    probes_running: HashMap<String, Arc<vigil_health::probes::ProbeDriver>>,
    probe_events: mpsc::Sender<vigil_health::probes::ProbeEvent>,
}

impl Applier {
    /// Starts (or resets, on a new run or new declarations) the cell's host probes. A reset
    /// aborts every running ticker before the new topology is emitted (the driver's order).
    fn start_probes(&mut self, cell: &CellConfig) {
        use vigil_health::probes::{
            CellTarget, CellTransport, Declarations, ProbeDriver, ProbeOptions,
        };
        let Some(path) = &cell.probes else {
            self.stop_probes(&cell.cell_id);
            return;
        };
        let decls = match Declarations::load(path) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!("cell {}: probe declarations not loaded: {e}", cell.cell_id);
                return;
            }
        };
        let transport = match (&cell.uds_path, cell.cid) {
            (Some(p), _) => CellTransport::Hybrid {
                uds_path: p.clone(),
            },
            (None, Some(cid)) => CellTransport::Vsock { cid },
            (None, None) => return,
        };
        let target = CellTarget {
            cell_id: cell.cell_id.clone(),
            run_id: cell.run_id.clone(),
            transport,
        };
        if let Some(driver) = self.probes_running.get(&cell.cell_id) {
            let driver = Arc::clone(driver);
            tokio::spawn(async move {
                if let Err(e) = driver.reset(target, decls).await {
                    tracing::warn!("resetting host probes failed: {e}");
                }
            });
        } else {
            let driver = ProbeDriver::spawn(
                target,
                decls,
                self.probe_events.clone(),
                ProbeOptions::default(),
            );
            self.probes_running
                .insert(cell.cell_id.clone(), Arc::new(driver));
        }
    }

    fn stop_probes(&mut self, cell_id: &str) {
        if let Some(driver) = self.probes_running.remove(cell_id) {
            tokio::spawn(async move {
                if let Ok(d) = Arc::try_unwrap(driver) {
                    d.stop().await;
                }
            });
        }
    }

    /// Carries out one effect; some produce events the reducer must see next.
    fn apply(&mut self, effect: Effect, follow_up: &mut Vec<Event>) {
        match effect {
            Effect::GatherFacts(cells) => self.gather(cells, follow_up),
            Effect::Emit(ev) => {
                match ev.event_type {
                    silence::TYPE_SILENCED | silence::TYPE_STALLED => {
                        let class = match ev.data["class"].as_str() {
                            Some("disconnected") => "disconnected",
                            Some("guest_silent") => "guest_silent",
                            _ => "host_stalled",
                        };
                        self.health.silence(&ev.cell_id, Some(class));
                    }
                    silence::TYPE_RESUMED => self.health.silence(&ev.cell_id, None),
                    _ => {}
                }
                let input = own_event(
                    &ev.cell_id,
                    &ev.run_id,
                    ev.event_type,
                    serde_json::to_vec(&ev.data).unwrap_or_default(),
                );
                if self.journal.send(vec![input]).is_err() {
                    tracing::error!("the journal stopped: could not record {}", ev.event_type);
                }
            }
            Effect::WatchResume { cell_id, watch } => self.resume.set(&cell_id, watch),
            Effect::Reply { id, reply } => {
                if let Some(tx) = self.pending.remove(&id) {
                    let _ = tx.send(reply);
                }
            }
            Effect::ReplyWithPeers { id } => {
                let reply = match &self.probes {
                    None => AdminReply::Err(
                        "kernel evidence is off on this host (see vigil's start-up log for why)"
                            .into(),
                    ),
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
                self.start_probes(&cell);
                let spec = self.spec(&cell);
                if let Err(e) = self.drain.send(vigil_drain::DrainCommand::AddCell(spec)) {
                    tracing::error!(
                        "could not register cell {} with the drain: {e}",
                        cell.cell_id
                    );
                }
            }
            Effect::DrainRemoveCell(cell) => {
                self.stop_probes(&cell);
                self.slots.remove(&cell);
                self.health.remove_cell(&cell);
                if let Err(e) = self
                    .drain
                    .send(vigil_drain::DrainCommand::RemoveCell { cell: cell.clone() })
                {
                    tracing::error!("could not remove cell {cell} from the drain: {e}");
                }
            }
            Effect::Cgroup {
                cell_id,
                path,
                signal,
            } => {
                let journal = self.journal.clone();
                tokio::task::spawn_blocking(move || {
                    let Some(audit) = crate::killswitch::enforce_cgroup(&cell_id, &path, signal)
                    else {
                        return;
                    };
                    tracing::info!(
                        "cell {cell_id}: cgroup {} {}",
                        path.display(),
                        String::from_utf8_lossy(&audit.data_json())
                    );
                    let ev = own_event(&cell_id, "", audit.event_type(), audit.data_json());
                    let _ = journal.send(vec![ev]);
                });
            }
            Effect::AckUpstream { id, applied } => {
                let handle = self
                    .upstream_acks
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&id);
                if let Some(h) = handle {
                    tokio::spawn(async move {
                        let r = if applied {
                            h.applied().await
                        } else {
                            h.not_applied().await
                        };
                        if let Err(e) = r {
                            tracing::warn!("acknowledging an upstream signal failed ({e}); it will be redelivered");
                        }
                    });
                }
            }
            Effect::DrainStall(ms) => {
                let _ = self.drain.send(vigil_drain::DrainCommand::Stall(
                    std::time::Duration::from_millis(ms),
                ));
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

    /// Reads, for cells whose deadline came, the last-frame stamp (atomics the drain writes),
    /// the kernel's per-peer table (once for all of them), and the drain's last loop run.
    fn gather(&self, cells: Vec<(String, Option<u32>)>, follow_up: &mut Vec<Event>) {
        let started = std::time::Instant::now();
        let rows = self.probes.as_ref().and_then(|p| match p.peers() {
            Ok(rows) => {
                self.health
                    .metrics
                    .observe_ebpf_read(rows.len() as u64, started.elapsed());
                Some(rows)
            }
            Err(e) => {
                tracing::warn!("reading the kernel's per-peer table failed: {e}");
                None
            }
        });
        let drain_last_run_ns = self.drain_stats.last_loop_mono_ns();
        for (cell_id, cid) in cells {
            let last_frame_ns = self.slots.get(&cell_id).map_or(0, |s| {
                s.last_frame_mono_ns
                    .load(std::sync::atomic::Ordering::Relaxed)
            });
            let kernel = match (cid, &rows) {
                (Some(cid), Some(rows)) => silence::kernel_evidence(rows, cid, self.port),
                _ => silence::KernelEvidence::None,
            };
            follow_up.push(Event::Observed {
                cell_id,
                observed: Observed {
                    last_frame_ns,
                    kernel,
                    drain_last_run_ns,
                },
            });
        }
    }

    fn spec(&mut self, cell: &CellConfig) -> vigil_drain::CellSpec {
        let slot = vigil_drain::CellSlot::shared();
        self.slots.insert(cell.cell_id.clone(), Arc::clone(&slot));
        self.health
            .set_cell(&cell.cell_id, &cell.run_id, Arc::clone(&slot));
        vigil_drain::CellSpec {
            cell_id: cell.cell_id.clone(),
            run_id: cell.run_id.clone(),
            cid: cell.cid,
            uds_path: cell.uds_path.clone(),
            slot,
        }
    }
}

/// Probe events waiting to be journaled. Probes tick at most every 5 s each; 1,024 absorbs a
/// reset of many cells at once. When full, the probe drivers wait (no event is dropped).
const PROBE_EVENT_CAPACITY: usize = 1_024;

/// Starts the upstream control-plane consumer when `control.nats_url` is set: each signal
/// becomes a reducer event; its ack handle waits in `acks` until the reducer applied it.
fn start_upstream(
    rt: &tokio::runtime::Runtime,
    cfg: &Config,
    events: mpsc::Sender<Event>,
    acks: &Arc<std::sync::Mutex<HashMap<u64, vigil_opcontrol::upstream::AckHandle>>>,
) -> Option<oneshot::Sender<()>> {
    use vigil_opcontrol::upstream;
    if cfg.control.nats_url.is_empty() {
        return None;
    }
    let (tx, mut rx) = upstream::signal_channel();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let ucfg = upstream::UpstreamConfig::new(cfg.control.nats_url.clone(), cfg.host_name());
    tracing::info!(
        "control signals from {} subject {}",
        cfg.control.nats_url,
        ucfg.subject()
    );
    rt.spawn(async move {
        let stats = Arc::new(upstream::UpstreamStats::default());
        if let Err(e) = upstream::run(ucfg, tx, stats, async move {
            let _ = stop_rx.await;
        })
        .await
        {
            tracing::error!("the upstream control-plane consumer stopped: {e}");
        }
    });
    let acks = Arc::clone(acks);
    rt.spawn(async move {
        let mut next_id = 0u64;
        while let Some(sig) = rx.recv().await {
            next_id += 1;
            acks.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(next_id, sig.ack);
            let s = sig.signal;
            let event = Event::Signal {
                cell_id: s.cell_id,
                run_id: s.run_id,
                op_id: (!s.op_id.is_empty()).then_some(s.op_id),
                signal: vigil_opcontrol::Signal::from_wire(s.signal),
                source: vigil_opcontrol::SignalSource::Upstream { issuer: s.issuer },
                upstream_ack: Some(next_id),
            };
            if events.send(event).await.is_err() {
                break;
            }
        }
    });
    Some(stop_tx)
}

/// One of vigil's own events (no stream, no guest sequence), for the journal.
fn own_event(
    cell_id: &str,
    run_id: &str,
    event_type: &str,
    data: Vec<u8>,
) -> vigil_journal::EventIn {
    vigil_journal::EventIn {
        token: 0,
        cell_id: cell_id.into(),
        run_id: run_id.into(),
        stream_id: None,
        guest_seq: None,
        event_type: event_type.to_string(),
        op_id: None,
        content_type: "application/json".into(),
        data,
        guest_time_unix_nano: None,
        recv_time_unix_nano: unix_nanos(),
        claims: None,
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
            tracing::info!(
                "eBPF programs attached to vsock:{} and vsock:{}",
                vigil_common::TP_RECV,
                vigil_common::TP_ALLOC
            );
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
        reg.upsert(c.clone())
            .with_context(|| format!("cell {} from the config file", c.cell_id))?;
    }
    reg.persist(&cfg.state_dir)?;
    Ok(reg)
}

pub fn run(cfg: &Config) -> anyhow::Result<()> {
    let started_ns = sys::monotonic_ns();
    let nofile = sys::raise_nofile()?;
    tracing::info!("open-file limit {nofile}");
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating state directory {}", cfg.state_dir.display()))?;
    let registry = initial_registry(cfg)?;
    if registry.is_empty() {
        tracing::info!("no cells registered yet; register them in the config file or with `vigil ctl cell add`");
    } else {
        tracing::info!("{} cell(s) registered", registry.len());
    }
    let probes = load_probes();

    let timing = vigil_timing::SlotTable::new(vigil_timing::DEFAULT_TABLE_SLOTS)?;
    // Silence facts already on record (fire-once across restarts), read before the journal
    // starts writing again.
    let record = silence_record(&cfg.journal.dir);
    let terminates = crate::killswitch::persisted_terminates(&cfg.journal.dir);
    if !record.fired.is_empty() {
        tracing::info!(
            "{} run(s) already silenced on record; they will not be reported again",
            record.fired.len()
        );
    }
    // Journal first: nothing is accepted before events can be made durable.
    let key = vigil_journal::HostKey::load_or_create(&cfg.key_path())?;
    tracing::info!(
        "host key {} (public key {})",
        key.key_id(),
        vigil_journal::HostKey::public_key_path(&cfg.key_path()).display()
    );
    let journal = vigil_journal::spawn(journal_config(cfg), key)?;

    let drain_cfg = vigil_drain::DrainConfig {
        listen_vsock: cfg.listen.vsock,
        max_frame_bytes: cfg.listen.max_frame_bytes,
        deny_policy_queries_inline: false,
        ..vigil_drain::DrainConfig::new(cfg.listen.port)
    };
    let mut applier_slots = HashMap::new();
    let specs: Vec<vigil_drain::CellSpec> = registry
        .iter()
        .map(|c| {
            let slot = vigil_drain::CellSlot::shared();
            applier_slots.insert(c.cell_id.clone(), Arc::clone(&slot));
            vigil_drain::CellSpec {
                cell_id: c.cell_id.clone(),
                run_id: c.run_id.clone(),
                cid: c.cid,
                uds_path: c.uds_path.clone(),
                slot,
            }
        })
        .collect();
    // The enforcement path: the drain thread answers policy queries from its own view of the
    // op-control state; until the persisted terminates are re-applied below, every query is
    // denied (state unknown: fail-closed).
    let (publisher, updates) = vigil_opcontrol::view::update_channel();
    let gate = crate::killswitch::Gate::new(vigil_opcontrol::view::DrainView::new(updates));
    let drain = vigil_drain::spawn_with_gate(drain_cfg, specs, Some(Box::new(gate)))
        .context("starting the drain loop")?;
    let waker = drain.commander();
    let ops = vigil_opcontrol::store::OpStore::new(Some(
        publisher.with_waker(Arc::new(move || waker.wake())),
    ));
    if let Some(e) = drain.vsock_error() {
        tracing::warn!("no AF_VSOCK listener: {e}; hybrid-vsock cells are still served");
    }

    let health = Arc::new(crate::health::Source::new(
        cfg.host_name(),
        started_ns,
        timing.clone(),
        Arc::clone(&journal.health),
    ));
    let (ev_tx, ev_rx) = mpsc::channel::<Event>(reducer::EVENT_CHANNEL_CAPACITY);
    let resume = Arc::new(ResumeWatch::default());
    let forward = {
        let f = Forward {
            outputs: drain.outputs().clone(),
            acks: journal.acks.clone(),
            input: journal.input.clone(),
            drain: drain.commander(),
            ev_tx: ev_tx.clone(),
            resume: Arc::clone(&resume),
            health: Arc::clone(&health),
            slot: timing.register_writer("forward")?,
            timing: timing.clone(),
        };
        std::thread::Builder::new()
            .name("vigil-forward".into())
            .spawn(move || forward(f))?
    };

    let upstream_acks: Arc<std::sync::Mutex<HashMap<u64, vigil_opcontrol::upstream::AckHandle>>> =
        Arc::default();
    let upstream_tx = ev_tx.clone();
    drop(ev_tx);
    for c in registry.iter() {
        if let Some(slot) = applier_slots.get(&c.cell_id) {
            health.set_cell(&c.cell_id, &c.run_id, Arc::clone(slot));
        }
    }
    let (probe_events, mut probe_rx) =
        mpsc::channel::<vigil_health::probes::ProbeEvent>(PROBE_EVENT_CAPACITY);
    let applier = Applier {
        probes,
        drain: drain.commander(),
        journal: journal.input.clone(),
        resume,
        port: cfg.listen.port,
        state_dir: cfg.state_dir.clone(),
        pending: HashMap::new(),
        slots: applier_slots,
        drain_stats: Arc::clone(drain.stats()),
        health: Arc::clone(&health),
        upstream_acks: Arc::clone(&upstream_acks),
        probes_running: HashMap::new(),
        probe_events,
    };
    let (mut state, start_effects) = State::new(registry, &record, ops, sys::monotonic_ns());
    let report = state.ops.restore(terminates);
    state.ops.mark_restored();
    if report.applied + report.skipped_unknown_run + report.refused_table_full > 0 {
        tracing::info!(
            "re-applied {} persisted terminate(s) ({} for runs no longer registered, {} refused: table full)",
            report.applied,
            report.skipped_unknown_run,
            report.refused_table_full
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let upstream_stop = start_upstream(&rt, cfg, upstream_tx, &upstream_acks);
    {
        let journal = journal.input.clone();
        rt.spawn(async move {
            while let Some(ev) = probe_rx.recv().await {
                let (cell, run) = ev.cell_run();
                let data = serde_json::to_vec(&ev.data()).unwrap_or_default();
                if journal
                    .send(vec![own_event(cell, run, ev.event_type(), data)])
                    .is_err()
                {
                    break;
                }
            }
        });
    }
    let admin_listener = rt.block_on(async { crate::admin::bind(&cfg.admin.socket) })?;
    tracing::info!("admin socket {}", cfg.admin.socket.display());
    let http = match cfg.http.socket_addr()? {
        None => None,
        Some(addr) => {
            let source: Arc<dyn vigil_health::model::HealthSource> = health.clone();
            let conf = vigil_health::http::HttpConfig {
                addr,
                allow_non_loopback: cfg.http.allow_non_loopback,
            };
            let server = rt.block_on(vigil_health::http::HttpServer::bind(
                &conf,
                source,
                Arc::new(sys::monotonic_ns),
            ))?;
            tracing::info!("health and metrics on http://{}", server.local_addr());
            Some(server)
        }
    };
    health
        .ready
        .store(true, std::sync::atomic::Ordering::Release);
    let notifier = Arc::new(
        vigil_health::notify::Notifier::from_env().unwrap_or_else(|e| {
            tracing::warn!("systemd notification is off: {e}");
            vigil_health::notify::Notifier::disabled()
        }),
    );
    let _ = notifier.ready();
    if let Some(every) = vigil_health::notify::watchdog_interval() {
        let n = Arc::clone(&notifier);
        let h = Arc::clone(&health);
        rt.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                // The watchdog is fed only while the control loop and the journal are sound.
                if !h.journal.is_degraded() {
                    let _ = n.watchdog();
                }
            }
        });
    }
    let reducer_slot = timing.register_writer("reducer")?;
    rt.block_on(control(
        state,
        applier,
        start_effects,
        ev_rx,
        admin_listener,
        reducer_slot,
    ))?;
    let _ = notifier.stopping();
    if let Some(stop) = upstream_stop {
        let _ = stop.send(());
    }
    if let Some(server) = http {
        rt.block_on(server.shutdown());
    }

    // Orderly shutdown: the drain stops accepting and hands off what it holds; the forwarder
    // passes it to the journal; the journal makes it durable and stops.
    tracing::info!("stopping");
    let leftovers = drain.shutdown().context("stopping the drain loop")?;
    let _ = forward.join();
    // Batches the drain could not hand off before it stopped still become durable (they were
    // never acked, but nothing received is thrown away).
    for out in leftovers {
        if let vigil_drain::DrainOutput::Batch(batch) = out {
            let events = to_events(&batch, None);
            if !events.is_empty() {
                let _ = journal.input.send(events);
            }
        }
    }
    journal.shutdown().context("stopping the journal")?;
    let _ = std::fs::remove_file(&cfg.admin.socket);
    tracing::info!("stopped cleanly");
    Ok(())
}

fn journal_config(cfg: &Config) -> vigil_journal::JournalConfig {
    vigil_journal::JournalConfig {
        signing: if cfg.journal.signing == "per-event" {
            vigil_journal::SigningMode::PerEvent
        } else {
            vigil_journal::SigningMode::Batch
        },
        sink: if cfg.journal.sink == "stdout" {
            vigil_journal::Sink::Stdout
        } else {
            vigil_journal::Sink::Segments
        },
        segment_bytes: cfg.journal.segment_bytes,
        retention_bytes: (cfg.journal.retention_bytes > 0).then_some(cfg.journal.retention_bytes),
        retention_age: (cfg.journal.retention_hours > 0).then(|| {
            std::time::Duration::from_secs(cfg.journal.retention_hours.saturating_mul(3_600))
        }),
        ..vigil_journal::JournalConfig::new(cfg.journal.dir.clone(), cfg.host_name())
    }
}

/// Wall-clock ns since the Unix epoch (host receive time stamped on events).
fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The forwarder: drain outputs → journal input (and control events → reducer); journal
/// acks → drain. Ends when the drain's output channel closes.
struct Forward {
    outputs: Receiver<vigil_drain::DrainOutput>,
    acks: Receiver<Vec<vigil_journal::AckOut>>,
    input: crossbeam_channel::Sender<Vec<vigil_journal::EventIn>>,
    drain: vigil_drain::DrainCommander,
    ev_tx: mpsc::Sender<Event>,
    resume: Arc<ResumeWatch>,
    health: Arc<crate::health::Source>,
    slot: vigil_timing::SlotWriter,
    timing: vigil_timing::SlotTable,
}

fn forward(f: Forward) {
    use vigil_drain::DrainOutput as O;
    let Forward {
        outputs,
        acks,
        input,
        drain,
        ev_tx,
        resume,
        health,
        mut slot,
        timing,
    } = f;
    // Guest-reported executor tasks, per cell run, in the timing table ("cell/<id>/<task>").
    let mut groups: HashMap<String, (Arc<str>, vigil_timing::CellGroup)> = HashMap::new();
    slot.start(sys::monotonic_ns());
    let mut claims: HashMap<vigil_drain::ConnId, Claims> = HashMap::new();
    let to_reducer = |e: Event| {
        let _ = ev_tx.blocking_send(e);
    };
    loop {
        select! {
            recv(outputs) -> out => {
                let Ok(out) = out else { break };
                match out {
                    O::Batch(batch) => {
                        let t0 = sys::monotonic_ns();
                        if resume.take(&batch.cell.cell_id) {
                            to_reducer(Event::Activity { cell_id: batch.cell.cell_id.to_string() });
                        }
                        let events = to_events(&batch, claims.get(&batch.conn));
                        drop(batch);
                        if !events.is_empty() && input.send(events).is_err() {
                            tracing::error!("the journal stopped; no more events can be made durable");
                            slot.error(sys::monotonic_ns());
                            break;
                        }
                        slot.time(t0, sys::monotonic_ns());
                    }
                    O::Hello { conn, claims: cl, .. } => {
                        claims.insert(conn, Arc::new(cl));
                    }
                    O::Connected { cell, .. } => to_reducer(Event::Connected { cell_id: cell.cell_id.to_string() }),
                    O::Closed { conn, cell, reason } => {
                        claims.remove(&conn);
                        health.metrics.connection_closed(reason.name());
                        to_reducer(Event::Closed { cell_id: cell.cell_id.to_string(), reason: reason.name() });
                    }
                    O::Rejected { reason, peer } => {
                        health.metrics.reject(reason.name());
                        to_reducer(Event::Rejected { reason: reason.name(), peer: format!("{peer:?}") });
                    }
                    O::PolicyAudit { cell, op_id, action, decision, held_ns, .. } => {
                        health.metrics.opcontrol_decision(decision);
                        let data = serde_json::json!({
                            "cellId": &*cell.cell_id, "runId": &*cell.run_id,
                            "opId": (!op_id.is_empty()).then_some(op_id), "action": action,
                            "decision": decision, "heldMs": held_ns / 1_000_000,
                        });
                        let ev = own_event(&cell.cell_id, &cell.run_id, crate::killswitch::TYPE_DECISION, serde_json::to_vec(&data).unwrap_or_default());
                        if input.send(vec![ev]).is_err() {
                            break;
                        }
                    }
                    O::CellError { cell_id, error } => tracing::error!("the drain could not register cell {cell_id}: {error}"),
                    O::ExecutorStats { cell, stats, .. } => guest_tasks(&timing, &mut groups, &cell, &stats),
                    O::PolicyQuery { .. } => {}
                }
            }
            recv(acks) -> a => {
                let Ok(a) = a else { break };
                health.metrics.acks_sent(a.len() as u64);
                for ack in a {
                    let _ = drain.send(vigil_drain::DrainCommand::Ack { conn: vigil_drain::ConnId::from_token(ack.token), durable_seq: ack.durable_seq });
                }
            }
        }
    }
    slot.stop(sys::monotonic_ns());
}

type Claims = Arc<std::collections::BTreeMap<String, String>>;

/// Folds a guest's executor stats frame into its cell's task slots, registering the group on
/// the first frame of a run (at most `MAX_TASKS_PER_CELL` tasks; more are refused and logged).
fn guest_tasks(
    timing: &vigil_timing::SlotTable,
    groups: &mut HashMap<String, (Arc<str>, vigil_timing::CellGroup)>,
    cell: &vigil_drain::CellInfo,
    stats: &vigil_wire::pb::ExecutorStats,
) {
    let now = sys::monotonic_ns();
    let stale = groups
        .get(&*cell.cell_id)
        .is_some_and(|(run, _)| *run != cell.run_id);
    if stale {
        groups.remove(&*cell.cell_id);
    }
    if !groups.contains_key(&*cell.cell_id) {
        let names: Vec<&str> = stats.tasks.iter().map(|t| t.task.as_str()).collect();
        match vigil_timing::CellGroup::register(timing, &cell.cell_id, &names) {
            Ok(g) => {
                groups.insert(cell.cell_id.to_string(), (Arc::clone(&cell.run_id), g));
            }
            Err(e) => {
                tracing::warn!("cell {}: guest task timing not recorded: {e}", cell.cell_id);
                return;
            }
        }
    }
    let Some((_, group)) = groups.get_mut(&*cell.cell_id) else {
        return;
    };
    for t in &stats.tasks {
        let sample = vigil_timing::GuestTaskSample {
            started: t.started,
            stopped: t.stopped,
            errors: t.errors,
            last_duration_ns: t.last_duration_ns,
        };
        if let Err(e) = group.apply_sample(&t.task, sample, now) {
            tracing::debug!("cell {}: {e}", cell.cell_id);
        }
    }
}

/// The journal's input for one received chunk: host stamps (cell and run from the accepting
/// socket, receive time) beside the guest's fields and claims.
fn to_events(
    batch: &vigil_drain::GuestBatch,
    claims: Option<&Claims>,
) -> Vec<vigil_journal::EventIn> {
    let recv_time = unix_nanos();
    batch
        .events
        .iter()
        .map(|e| vigil_journal::EventIn {
            token: batch.conn.token(),
            cell_id: Arc::clone(&batch.cell.cell_id),
            run_id: Arc::clone(&batch.cell.run_id),
            stream_id: Some(Arc::clone(&batch.stream_id)),
            guest_seq: Some(e.guest_seq),
            event_type: e.event_type().to_string(),
            op_id: (!e.op_id().is_empty()).then(|| e.op_id().to_string()),
            content_type: e.content_type().to_string(),
            data: e.payload().to_vec(),
            guest_time_unix_nano: (e.guest_time_unix_nano != 0).then_some(e.guest_time_unix_nano),
            recv_time_unix_nano: recv_time,
            claims: claims.cloned(),
        })
        .collect()
}

/// Applies effects, feeding the events some of them produce back into the reducer.
fn settle(state: &mut State, applier: &mut Applier, effects: Vec<Effect>) {
    let mut effects = std::collections::VecDeque::from(effects);
    let mut follow_up = Vec::new();
    while let Some(effect) = effects.pop_front() {
        applier.apply(effect, &mut follow_up);
        for ev in follow_up.drain(..) {
            effects.extend(reducer::step(state, ev, sys::monotonic_ns()));
        }
    }
}

/// The control loop: reducer + applier + admin socket, until SIGINT or SIGTERM. A single
/// timer sleeps until the nearest silence deadline (no per-cell polling).
async fn control(
    mut state: State,
    mut applier: Applier,
    start_effects: Vec<Effect>,
    mut ev_rx: mpsc::Receiver<Event>,
    admin: tokio::net::UnixListener,
    mut reducer_slot: vigil_timing::SlotWriter,
) -> anyhow::Result<()> {
    let (admin_tx, mut admin_rx) = mpsc::channel::<(AdminRequest, oneshot::Sender<AdminReply>)>(64);
    tokio::spawn(async move {
        loop {
            let stream = match admin.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("accepting on the admin socket failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let tx = admin_tx.clone();
            tokio::spawn(crate::admin::serve_conn(stream, move |req| {
                let tx = tx.clone();
                async move {
                    let (rtx, rrx) = oneshot::channel();
                    if tx.send((req, rtx)).await.is_err() {
                        return AdminReply::Err("vigil is shutting down".into());
                    }
                    rrx.await
                        .unwrap_or_else(|_| AdminReply::Err("vigil is shutting down".into()))
                }
            }));
        }
    });
    settle(&mut state, &mut applier, start_effects);
    let initial: Vec<CellConfig> = state.registry.iter().cloned().collect();
    for c in &initial {
        applier.start_probes(c);
    }
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut next_id: reducer::RequestId = 0;
    reducer_slot.start(sys::monotonic_ns());
    loop {
        let sleep = match state.deadlines.next() {
            Some(at) => std::time::Duration::from_nanos(at.saturating_sub(sys::monotonic_ns())),
            None => std::time::Duration::from_hours(1),
        };
        let event = tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
            () = tokio::time::sleep(sleep) => Event::Tick,
            Some((request, reply)) = admin_rx.recv() => {
                next_id += 1;
                applier.pending.insert(next_id, reply);
                Event::Admin { id: next_id, request }
            }
            Some(ev) = ev_rx.recv() => ev,
        };
        let t0 = sys::monotonic_ns();
        let effects = reducer::step(&mut state, event, t0);
        settle(&mut state, &mut applier, effects);
        reducer_slot.time(t0, sys::monotonic_ns());
    }
    reducer_slot.stop(sys::monotonic_ns());
    Ok(())
}

/// What the journal says about silence: runs already silenced, and of those the ones with no
/// `agent_resumed` yet. Read once at start (a full scan of the journal's silence events).
fn silence_record(dir: &std::path::Path) -> SilenceRecord {
    let mut record = SilenceRecord::default();
    if !dir.exists() {
        return record;
    }
    let mut resumed = std::collections::BTreeSet::new();
    for ty in [
        silence::TYPE_SILENCED,
        silence::TYPE_STALLED,
        silence::TYPE_RESUMED,
    ] {
        let filter = vigil_journal::TailFilter {
            ty: Some(ty.to_string()),
            ..vigil_journal::TailFilter::default()
        };
        let mut cursor = None;
        let mut out = Vec::new();
        if let Err(e) = vigil_journal::tail_once(dir, &filter, &mut cursor, &mut out) {
            tracing::warn!("reading silence events from the journal failed ({e}); runs silenced before this start may be reported again");
            continue;
        }
        for line in out.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
                continue;
            };
            let (Some(c), Some(r)) = (v["cellid"].as_str(), v["runid"].as_str()) else {
                continue;
            };
            let key = (c.to_string(), r.to_string());
            if ty == silence::TYPE_RESUMED {
                resumed.insert(key);
            } else {
                record.fired.insert(key);
            }
        }
    }
    record.awaiting_resume = record.fired.difference(&resumed).cloned().collect();
    record
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_executor_stats_land_in_the_cells_task_slots_and_a_new_run_re_registers() {
        let table = vigil_timing::SlotTable::new(64).unwrap();
        let mut groups = HashMap::new();
        let cell = |run: &str| vigil_drain::CellInfo {
            index: 0,
            cell_id: "c".into(),
            run_id: run.into(),
        };
        let stats = |started| vigil_wire::pb::ExecutorStats {
            tasks: vec![vigil_wire::pb::TaskSample {
                task: "worker".into(),
                started,
                stopped: started,
                errors: 0,
                last_duration_ns: 2_000,
            }],
        };
        guest_tasks(&table, &mut groups, &cell("r1"), &stats(3));
        guest_tasks(&table, &mut groups, &cell("r1"), &stats(5));
        let snap = table.snapshot_by_name("cell/c/worker").unwrap();
        assert_eq!(snap.starts, 5, "{snap:?}");
        // A new run starts its own group (the old one's slots are freed).
        guest_tasks(&table, &mut groups, &cell("r2"), &stats(1));
        assert_eq!(table.snapshot_by_name("cell/c/worker").unwrap().starts, 1);
        assert_eq!(groups.len(), 1);
    }
}
