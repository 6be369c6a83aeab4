//! The upstream consumer against a real `nats-server -js` started by each test on a free
//! loopback port with a temporary store. Without a nats-server binary each test prints
//! `SKIPPED <test>: nats-server not installed` and returns (`cargo xtask test` installs it).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use vigil_opcontrol::upstream::{
    self, BackoffPolicy, UpstreamConfig, UpstreamSignal, UpstreamStats,
};
use vigil_wire::pb::{control_signal::Signal as WireSignal, ControlSignal};

const WAIT: Duration = Duration::from_secs(20);

fn nats_server(test: &str) -> Option<PathBuf> {
    let found = [
        "/usr/sbin/nats-server",
        "/usr/bin/nats-server",
        "/usr/local/bin/nats-server",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.is_file());
    if found.is_none() {
        println!("SKIPPED {test}: nats-server not installed");
    }
    found
}

struct Server {
    child: Child,
}

impl Server {
    fn start(bin: &Path, port: u16, store: &Path) -> Server {
        let child = Command::new(bin)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nats-server");
        let deadline = std::time::Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Server { child }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn signal(cell: &str, op: &str, s: WireSignal) -> ControlSignal {
    ControlSignal {
        cell_id: cell.into(),
        run_id: "r1".into(),
        op_id: op.into(),
        signal: s as i32,
        issuer: "test".into(),
    }
}

fn test_config(port: u16) -> UpstreamConfig {
    let mut cfg = UpstreamConfig::new(format!("nats://127.0.0.1:{port}"), "h1");
    cfg.backoff = BackoffPolicy {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(400),
        healthy_after: Duration::from_secs(1),
    };
    cfg.heartbeat = Duration::from_secs(1);
    cfg.connect_timeout = Duration::from_secs(1);
    cfg.ack_wait = Duration::from_secs(2);
    cfg
}

async fn connect(port: u16) -> async_nats::Client {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match async_nats::connect(format!("nats://127.0.0.1:{port}")).await {
            Ok(c) => return c,
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "connect: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Publishes and waits for JetStream to store it, retrying while the server is still bringing
/// the stream up (a publish right after start-up can find no responder yet).
async fn publish(client: &async_nats::Client, host: &str, s: &ControlSignal) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match upstream::publish_signal(client, host, s).await {
            Ok(_) => return,
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "publish: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn recv(rx: &mut mpsc::Receiver<UpstreamSignal>) -> UpstreamSignal {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("a signal in time")
        .expect("consumer running")
}

/// The consumer's receiver, counters, stop switch and task.
type Consumer = (
    mpsc::Receiver<UpstreamSignal>,
    Arc<UpstreamStats>,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), upstream::UpstreamError>>,
);

fn start_consumer(cfg: UpstreamConfig) -> Consumer {
    let (tx, rx) = upstream::signal_channel();
    let stats = Arc::new(UpstreamStats::default());
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(upstream::run(cfg, tx, Arc::clone(&stats), async move {
        let _ = stop_rx.await;
    }));
    (rx, stats, stop_tx, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_sent_while_away_are_delivered_in_order_and_bad_ones_terminated() {
    let Some(bin) =
        nats_server("signals_sent_while_away_are_delivered_in_order_and_bad_ones_terminated")
    else {
        return;
    };
    let store = tempfile::tempdir().unwrap();
    let port = free_port();
    let _server = Server::start(&bin, port, store.path());

    // The control plane publishes before vigil's consumer exists.
    let client = connect(port).await;
    upstream::ensure_stream(&client).await.unwrap();
    publish(&client, "h1", &signal("c1", "a", WireSignal::Pause)).await;
    async_nats::jetstream::new(client.clone())
        .publish("vigil.control.h1", b"\xff\xff not protobuf".as_ref().into())
        .await
        .unwrap()
        .await
        .unwrap();
    publish(&client, "h2", &signal("c9", "x", WireSignal::Terminate)).await;
    publish(&client, "h1", &signal("c1", "a", WireSignal::Resume)).await;
    publish(&client, "h1", &signal("c1", "b", WireSignal::Terminate)).await;
    client.flush().await.unwrap();

    let (mut rx, stats, stop, task) = start_consumer(test_config(port));
    let first = recv(&mut rx).await;
    assert_eq!(first.signal, signal("c1", "a", WireSignal::Pause));
    assert_eq!(first.delivered, 1);
    // Not applied: delivered again, before anything later (in order).
    first.ack.not_applied().await.unwrap();
    let again = recv(&mut rx).await;
    assert_eq!(again.signal, signal("c1", "a", WireSignal::Pause));
    assert_eq!(again.delivered, 2);
    assert_eq!(again.stream_seq, first.stream_seq);
    again.ack.applied().await.unwrap();
    let second = recv(&mut rx).await;
    assert_eq!(second.signal, signal("c1", "a", WireSignal::Resume));
    second.ack.applied().await.unwrap();
    let third = recv(&mut rx).await;
    assert_eq!(third.signal, signal("c1", "b", WireSignal::Terminate));
    third.ack.applied().await.unwrap();
    // Nothing else for this host (h2's signal is not ours; the garbage was terminated).
    assert!(tokio::time::timeout(Duration::from_millis(500), rx.recv())
        .await
        .is_err());
    assert_eq!(stats.undecodable.load(Ordering::Relaxed), 1);
    assert_eq!(stats.delivered.load(Ordering::Relaxed), 4);
    stop.send(()).unwrap();
    tokio::time::timeout(WAIT, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_flow_again_after_the_server_restarts() {
    let Some(bin) = nats_server("signals_flow_again_after_the_server_restarts") else {
        return;
    };
    let store = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut server = Server::start(&bin, port, store.path());
    let (mut rx, stats, stop, task) = start_consumer(test_config(port));

    let client = connect(port).await;
    upstream::ensure_stream(&client).await.unwrap();
    publish(&client, "h1", &signal("c1", "a", WireSignal::Pause)).await;
    let a = recv(&mut rx).await;
    a.ack.applied().await.unwrap();
    publish(&client, "h1", &signal("c1", "b", WireSignal::Pause)).await;
    // Delivered but never applied before the server goes away.
    let b = recv(&mut rx).await;
    assert_eq!(b.signal.op_id, "b");
    drop(b);
    drop(client);

    server.stop();
    // Let the consumer notice and go through a few failed reconnects.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(stats.failures.load(Ordering::Relaxed) >= 1);
    let _server = Server::start(&bin, port, store.path());

    // The unapplied signal comes back; then a new one flows. The server was killed (no clean
    // shutdown), so it may also have lost the record of `a`'s ack: at-least-once allows `a`
    // again first, but never out of order.
    let mut b = recv(&mut rx).await;
    while b.signal.op_id == "a" {
        b.ack.applied().await.unwrap();
        b = recv(&mut rx).await;
    }
    assert_eq!(b.signal.op_id, "b");
    // (`b.delivered` may read 1: a killed server can lose its delivery count too.)
    b.ack.applied().await.unwrap();
    let client = connect(port).await;
    publish(&client, "h1", &signal("c1", "c", WireSignal::Terminate)).await;
    let c = recv(&mut rx).await;
    assert_eq!(c.signal, signal("c1", "c", WireSignal::Terminate));
    c.ack.applied().await.unwrap();
    assert!(stats.sessions.load(Ordering::Relaxed) >= 2);
    stop.send(()).unwrap();
    tokio::time::timeout(WAIT, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
