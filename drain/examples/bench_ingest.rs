//! Ingest benchmark of the drain loop against two references, in one run on one machine:
//! (a) vigil's io_uring drain (decode + copy into batches + hand-off to a consumer thread),
//! (b) the limit: one epoll thread reading 64 KiB per read() into the same `FrameDecoder`
//!     and only counting frames,
//! (c) tokio (current-thread runtime) with a LengthDelimitedCodec-style varint decoder over
//!     `BytesMut` plus a prost decode per frame, counting frames.
//! Clients: N threads over Unix sockets writing 260-byte Event frames, 16 per write.
//! Also: user-space memory per idle connection of the drain at 1,000 connections.
//!
//! `cargo run --release -p vigil-drain --example bench_ingest -- --conns 16 --frames 200000`
//! (`--frames` is the total over all connections.)

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use vigil_drain::{spawn, CellSlot, CellSpec, DrainConfig, DrainOutput};
use vigil_wire::frame::{encode_guest_frame, FrameDecoder, PROTOCOL_VERSION};
use vigil_wire::pb;

/// Frames per client write (what `vigil emit` does: batching per write is what makes vsock
/// and Unix sockets fast).
const FRAMES_PER_WRITE: usize = 16;
/// Encoded size of each Event frame, length prefix included.
const FRAME_BYTES: usize = 260;
/// Idle connections for the memory measurement.
const IDLE_CONNS: usize = 1000;
/// Rounds per consumer; each row reports its median round.
const DEFAULT_ROUNDS: usize = 15;
/// Read size of the epoll reference.
const EPOLL_READ_BYTES: usize = 64 * 1024;

fn hello(stream: &str) -> Vec<u8> {
    let mut out = Vec::new();
    encode_guest_frame(
        &pb::GuestFrame {
            kind: Some(pb::guest_frame::Kind::Hello(pb::Hello {
                protocol_version: PROTOCOL_VERSION,
                stream_id: stream.to_owned(),
                agent_name: "bench".into(),
                agent_version: "0".into(),
                ..Default::default()
            })),
        },
        &mut out,
    );
    out
}

/// One write's worth of frames, each exactly FRAME_BYTES long.
fn block() -> Vec<u8> {
    let mut out = Vec::new();
    for seq in 1..=FRAMES_PER_WRITE as u64 {
        let mut frame = pb::GuestFrame {
            kind: Some(pb::guest_frame::Kind::Event(pb::Event {
                guest_seq: seq,
                r#type: "dev.vigil.bench".into(),
                op_id: "0af7651916cd43dd8448eb211c80319c:b7ad6b7169203331".into(),
                content_type: "application/json".into(),
                payload: Vec::new(),
                guest_time_unix_nano: 1_700_000_000_000_000_000,
            })),
        };
        let mut one = Vec::new();
        encode_guest_frame(&frame, &mut one);
        let pad = FRAME_BYTES.saturating_sub(one.len());
        if let Some(pb::guest_frame::Kind::Event(e)) = &mut frame.kind {
            e.payload = vec![b'x'; pad];
        }
        one.clear();
        encode_guest_frame(&frame, &mut one);
        // Growing the payload may grow the length prefix by a byte; trim the pad to match.
        while one.len() > FRAME_BYTES {
            if let Some(pb::guest_frame::Kind::Event(e)) = &mut frame.kind {
                e.payload.pop();
            }
            one.clear();
            encode_guest_frame(&frame, &mut one);
        }
        out.extend_from_slice(&one);
    }
    out
}

fn run_clients(
    path: &Path,
    conns: usize,
    frames_per_conn: u64,
) -> Vec<std::thread::JoinHandle<()>> {
    let blk = Arc::new(block());
    (0..conns)
        .map(|i| {
            let path = path.to_owned();
            let blk = Arc::clone(&blk);
            std::thread::spawn(move || {
                let mut s = UnixStream::connect(&path).expect("connect to the bench listener");
                s.write_all(&hello(&format!("bench/{i}"))).unwrap();
                let writes = frames_per_conn / FRAMES_PER_WRITE as u64;
                for _ in 0..writes {
                    s.write_all(&blk).unwrap();
                }
            })
        })
        .collect()
}

fn process_cpu_s() -> f64 {
    // SAFETY: rusage is plain old data; getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is valid for writes.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, std::ptr::from_mut(&mut ru)) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn thread_cpu_s() -> f64 {
    // SAFETY: timespec is plain old data; clock_gettime fills it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is valid for writes.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, std::ptr::from_mut(&mut ts)) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// CPU seconds of the process's threads named `name` (from /proc/self/task/*/stat).
fn named_threads_cpu_s(name: &str) -> f64 {
    // SAFETY: sysconf has no memory arguments.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut total = 0.0;
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        if let Some(rest) = stat.rsplit(')').next() {
            let f: Vec<&str> = rest.split_whitespace().collect();
            // Fields after the comm: state is [0]; utime is field 14 overall → [11], stime [12].
            if f.len() > 12 {
                total += (f[11].parse::<f64>().unwrap_or(0.0)
                    + f[12].parse::<f64>().unwrap_or(0.0))
                    / ticks;
            }
        }
    }
    total
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no memory arguments.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64
}

struct Run {
    name: &'static str,
    frames: u64,
    secs: f64,
    process_cpu: f64,
    server_cpu: f64,
}

fn bench_drain(dir: &Path, conns: usize, per_conn: u64) -> Run {
    let spec = CellSpec {
        cell_id: "bench".into(),
        run_id: "r1".into(),
        cid: None,
        uds_path: Some(dir.join("drain.vsock")),
        slot: CellSlot::shared(),
    };
    let mut cfg = DrainConfig::new(7411);
    cfg.listen_vsock = false;
    let h = spawn(cfg, vec![spec]).expect("start the drain");
    let path = dir.join("drain.vsock_7411");
    let total = conns as u64 * per_conn;
    let cpu0 = process_cpu_s();
    let drain_cpu0 = named_threads_cpu_s("vigil-drain");
    let t0 = Instant::now();
    let clients = run_clients(&path, conns, per_conn);
    let consumer_cpu;
    let mut got = 0u64;
    {
        let c0 = thread_cpu_s();
        while got < total {
            if let Ok(DrainOutput::Batch(b)) = h.outputs().recv_timeout(Duration::from_secs(30)) {
                got += b.events.len() as u64;
            }
        }
        consumer_cpu = thread_cpu_s() - c0;
    }
    let secs = t0.elapsed().as_secs_f64();
    let drain_cpu = named_threads_cpu_s("vigil-drain") - drain_cpu0;
    let process_cpu = process_cpu_s() - cpu0;
    for c in clients {
        c.join().unwrap();
    }
    drop(h);
    Run {
        name: "vigil drain (io_uring)",
        frames: got,
        secs,
        process_cpu,
        server_cpu: drain_cpu + consumer_cpu,
    }
}

fn bench_epoll(dir: &Path, conns: usize, per_conn: u64) -> Run {
    let path = dir.join("epoll.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let total = conns as u64 * per_conn;
    let cpu0 = process_cpu_s();
    let t0 = Instant::now();
    let clients = run_clients(&path, conns, per_conn);
    let counted = Arc::new(AtomicU64::new(0));
    let server = {
        let counted = Arc::clone(&counted);
        std::thread::spawn(move || {
            let c0 = thread_cpu_s();
            // SAFETY: plain epoll_create1 call; checked below.
            let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
            assert!(ep >= 0);
            let mut streams = Vec::new();
            let mut decoders = Vec::new();
            for i in 0..conns {
                let (s, _) = listener.accept().unwrap();
                s.set_nonblocking(true).unwrap();
                let mut ev = libc::epoll_event {
                    events: libc::EPOLLIN as u32,
                    u64: i as u64,
                };
                // SAFETY: `ev` is a valid epoll_event; the fd is open.
                unsafe {
                    libc::epoll_ctl(
                        ep,
                        libc::EPOLL_CTL_ADD,
                        s.as_raw_fd(),
                        std::ptr::from_mut(&mut ev),
                    )
                };
                streams.push(s);
                decoders.push(FrameDecoder::new(
                    vigil_wire::frame::DEFAULT_MAX_FRAME_BYTES,
                ));
            }
            let mut buf = vec![0u8; EPOLL_READ_BYTES];
            let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 64];
            let mut frames = 0u64;
            while frames < total + conns as u64 {
                // SAFETY: `events` has room for 64 entries.
                let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), 64, 1000) };
                for ev in events.iter().take(n.max(0) as usize) {
                    let i = ev.u64 as usize;
                    loop {
                        // SAFETY: `buf` is valid for EPOLL_READ_BYTES bytes of writes.
                        let r = unsafe {
                            libc::read(streams[i].as_raw_fd(), buf.as_mut_ptr().cast(), buf.len())
                        };
                        if r <= 0 {
                            break;
                        }
                        decoders[i]
                            .feed(&buf[..r as usize], &mut |_v| -> Result<(), ()> {
                                frames += 1;
                                Ok(())
                            })
                            .expect("valid frames");
                    }
                }
            }
            // SAFETY: closing the epoll fd we created.
            unsafe { libc::close(ep) };
            counted.store(frames - conns as u64, Ordering::Relaxed);
            thread_cpu_s() - c0
        })
    };
    let server_cpu = server.join().unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let process_cpu = process_cpu_s() - cpu0;
    for c in clients {
        c.join().unwrap();
    }
    Run {
        name: "epoll + FrameDecoder (limit)",
        frames: counted.load(Ordering::Relaxed),
        secs,
        process_cpu,
        server_cpu,
    }
}

/// A tokio-util `Decoder`-style varint length-delimited decoder over `BytesMut`.
struct VarintCodec {
    max: usize,
}

impl VarintCodec {
    fn decode(
        &mut self,
        src: &mut bytes::BytesMut,
    ) -> Result<Option<bytes::BytesMut>, &'static str> {
        let mut len: u64 = 0;
        for (i, b) in src.iter().enumerate().take(10) {
            len |= u64::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                let len = len as usize;
                if len > self.max {
                    return Err("frame too large");
                }
                if src.len() < i + 1 + len {
                    src.reserve(i + 1 + len - src.len());
                    return Ok(None);
                }
                let _prefix = src.split_to(i + 1);
                return Ok(Some(src.split_to(len)));
            }
        }
        if src.len() >= 10 {
            return Err("bad varint");
        }
        Ok(None)
    }
}

fn bench_tokio(dir: &Path, conns: usize, per_conn: u64) -> Run {
    use tokio::io::AsyncReadExt;
    let path = dir.join("tokio.sock");
    let total = conns as u64 * per_conn;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    let listener = {
        let _g = rt.enter();
        tokio::net::UnixListener::bind(&path).unwrap()
    };
    let cpu0 = process_cpu_s();
    let t0 = Instant::now();
    let clients = run_clients(&path, conns, per_conn);
    let counted = Arc::new(AtomicU64::new(0));
    let c0 = thread_cpu_s();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..conns {
            let (mut s, _) = listener.accept().await.unwrap();
            let counted = Arc::clone(&counted);
            tasks.push(tokio::spawn(async move {
                let mut codec = VarintCodec {
                    max: vigil_wire::frame::DEFAULT_MAX_FRAME_BYTES,
                };
                let mut buf = bytes::BytesMut::with_capacity(64 * 1024);
                let mut frames = 0u64;
                loop {
                    while let Some(frame) = codec.decode(&mut buf).expect("valid frames") {
                        let msg = pb::GuestFrame::decode(frame.freeze()).expect("decodable");
                        if matches!(msg.kind, Some(pb::guest_frame::Kind::Event(_))) {
                            frames += 1;
                        }
                    }
                    if buf.capacity() - buf.len() < 16 * 1024 {
                        buf.reserve(64 * 1024);
                    }
                    if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                        break;
                    }
                }
                counted.fetch_add(frames, Ordering::Relaxed);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let server_cpu = thread_cpu_s() - c0;
    let secs = t0.elapsed().as_secs_f64();
    let process_cpu = process_cpu_s() - cpu0;
    for c in clients {
        c.join().unwrap();
    }
    let frames = counted.load(Ordering::Relaxed);
    assert_eq!(frames, total);
    Run {
        name: "tokio + varint codec",
        frames,
        secs,
        process_cpu,
        server_cpu,
    }
}

fn raise_fd_limit() {
    // SAFETY: rlimit is plain old data; get/setrlimit read and write it.
    unsafe {
        let mut rl: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, std::ptr::from_mut(&mut rl)) == 0 {
            rl.rlim_cur = rl.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, std::ptr::from_ref(&rl));
        }
    }
}

fn idle_memory(dir: &Path) -> (f64, usize) {
    let slot = CellSlot::shared();
    let spec = CellSpec {
        cell_id: "idle".into(),
        run_id: "r1".into(),
        cid: None,
        uds_path: Some(dir.join("idle.vsock")),
        slot: Arc::clone(&slot),
    };
    let mut cfg = DrainConfig::new(7411);
    cfg.listen_vsock = false;
    cfg.hello_timeout = Duration::from_mins(10);
    let h = spawn(cfg, vec![spec]).expect("start the drain");
    let path: PathBuf = dir.join("idle.vsock_7411");
    let consumer = {
        let rx = h.outputs().clone();
        std::thread::spawn(move || while rx.recv().is_ok() {})
    };
    // Warm up (first connections allocate the tables' first chunks).
    let warm: Vec<UnixStream> = (0..16)
        .map(|i| {
            let mut s = UnixStream::connect(&path).unwrap();
            s.write_all(&hello(&format!("warm/{i}"))).unwrap();
            s
        })
        .collect();
    while slot.connections.load(Ordering::Relaxed) < 16 {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(100));
    let rss0 = rss_bytes();
    let mut clients = Vec::with_capacity(IDLE_CONNS);
    for i in 0..IDLE_CONNS {
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(&hello(&format!("idle/{i}"))).unwrap();
        clients.push(s);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while (slot.connections.load(Ordering::Relaxed) as usize) < IDLE_CONNS + 16
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(200));
    let rss1 = rss_bytes();
    let n = slot.connections.load(Ordering::Relaxed) as usize - 16;
    drop(clients);
    drop(warm);
    drop(h);
    let _ = consumer.join();
    (rss1.saturating_sub(rss0) as f64 / n.max(1) as f64, n)
}

fn main() {
    let mut conns = 16usize;
    let mut frames = 200_000u64;
    let mut rounds = DEFAULT_ROUNDS;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--conns" => conns = args.next().and_then(|v| v.parse().ok()).unwrap_or(conns),
            "--frames" => frames = args.next().and_then(|v| v.parse().ok()).unwrap_or(frames),
            "--rounds" => rounds = args.next().and_then(|v| v.parse().ok()).unwrap_or(rounds),
            other => {
                eprintln!("unknown argument {other}; usage: bench_ingest [--conns N] [--frames TOTAL] [--rounds R]");
                std::process::exit(2);
            }
        }
    }
    raise_fd_limit();
    let per_conn =
        (frames / conns as u64 / FRAMES_PER_WRITE as u64).max(1) * FRAMES_PER_WRITE as u64;
    let dir = tempfile::tempdir().unwrap();
    // Interleave the three consumers round by round and keep each one's median round, so a
    // noisy moment on the shared 2-core machine does not decide the comparison.
    let mut all: [Vec<Run>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    for round in 0..rounds.max(1) {
        let sub = dir.path().join(format!("round{round}"));
        std::fs::create_dir(&sub).unwrap();
        all[0].push(bench_drain(&sub, conns, per_conn));
        all[1].push(bench_epoll(&sub, conns, per_conn));
        all[2].push(bench_tokio(&sub, conns, per_conn));
    }
    let runs = all.map(|mut v| {
        v.sort_by(|a, b| (a.frames as f64 / a.secs).total_cmp(&(b.frames as f64 / b.secs)));
        let mid = v.len() / 2;
        v.swap_remove(mid)
    });
    let (mem_per_conn, idle) = idle_memory(dir.path());
    let rate = |r: &Run| r.frames as f64 / r.secs;
    let limit = rate(&runs[1]);
    let tokio_rate = rate(&runs[2]);
    println!(
        "\n{conns} connections × {per_conn} frames of {FRAME_BYTES} B, {FRAMES_PER_WRITE} per write, over Unix sockets; {} cores; median of {rounds} rounds\n",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    );
    println!("| consumer | frames | seconds | frames/s | vs epoll limit | vs tokio | process CPU-s / M frames | server CPU-s / M frames |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in &runs {
        let m = r.frames as f64 / 1e6;
        println!(
            "| {} | {} | {:.3} | {:.0} | {:.2} | {:.2} | {:.3} | {:.3} |",
            r.name,
            r.frames,
            r.secs,
            rate(r),
            rate(r) / limit,
            rate(r) / tokio_rate,
            r.process_cpu / m,
            r.server_cpu / m
        );
    }
    println!(
        "\nDrain user-space memory per idle connection (RSS delta over {idle} connections with Hello): {mem_per_conn:.0} B\n"
    );
    println!("process CPU includes the client threads (same work in every row); server CPU is the receiving threads only (drain: vigil-drain + consumer).");
}
