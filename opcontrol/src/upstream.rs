//! The upstream control plane: a durable JetStream pull consumer of `ControlSignal`s for this
//! host, and the reconnect back-off schedule ([`Backoff`], a pure type with time passed in).
//!
//! Names (created if absent; an existing stream or consumer is used as it is):
//! - stream [`STREAM_NAME`] (`VIGIL_CONTROL`), subjects `vigil.control.>`, file storage,
//!   limits retention with a maximum age of [`STREAM_MAX_AGE`];
//! - subject `vigil.control.<host>`: one protobuf `vigil.v1.ControlSignal` per message;
//! - durable pull consumer `vigil-<host>`, filtered on that subject, explicit acks,
//!   [`MAX_ACK_PENDING`] = 1 (signals are applied in stream order).
//!
//! Each signal is handed to the caller through a bounded channel together with an
//! [`AckHandle`]; the message is acknowledged only when the caller says it was applied
//! ([`AckHandle::applied`]). A signal sent while vigil was away is delivered when it comes
//! back (the consumer is durable); one that was delivered but not applied (vigil died, the
//! caller called [`AckHandle::not_applied`], or dropped the handle) is delivered again.
//! Delivery is at least once, in stream order: after an unclean server stop the server may have
//! lost the record of recent acknowledgements and deliver those signals again, in their
//! original order — re-applying them in order ends in the same state (the transitions are
//! idempotent per signal and `Terminate` is sticky).
//! Messages that do not decode (or name no cell) are terminated (`+TERM`, never redelivered)
//! and counted; nothing here panics on bad input.
//!
//! On any connection or consumer failure the session is dropped and a new one is made after
//! the [`Backoff`] delay: 1 s, 2 s, 4 s … capped at 32 s, reset after a clean close or after a
//! session that stayed up for [`BackoffPolicy::healthy_after`].

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, AckKind};
use futures_util::StreamExt;
use prost::Message as _;
use tokio::sync::mpsc;
use vigil_wire::pb::ControlSignal;

/// The JetStream stream holding every host's control signals.
pub const STREAM_NAME: &str = "VIGIL_CONTROL";
/// The subjects of [`STREAM_NAME`].
pub const STREAM_SUBJECTS: &str = "vigil.control.>";
/// How long the stream keeps a signal. A host away for longer than a week comes back to cells
/// that have been registered again (new runs), for which older signals are meaningless.
pub const STREAM_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Unacknowledged signals the server lets this consumer have at once. 1: the next signal is
/// delivered only after the previous one was applied, so a redelivered signal can never
/// overtake a later one (a stale `Pause` must not land after its `Resume`). Signals are rare;
/// one round trip each is cheap.
pub const MAX_ACK_PENDING: i64 = 1;
/// Depth of the channel to the caller. With [`MAX_ACK_PENDING`] = 1 at most one signal per
/// session is outstanding (plus a redelivery after a reconnect), so 16 never fills in practice;
/// when full the consumer task waits (the signals stay in JetStream, nothing is dropped).
pub const SIGNAL_CHANNEL_CAPACITY: usize = 16;
/// Depth of the channel carrying connection events from the client's callback to the session.
/// Only disconnect/close matter; when full, further events are dropped (the session reacts to
/// the first one anyway).
const EVENT_CHANNEL_CAPACITY: usize = 16;

/// Errors of the upstream consumer.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The host name cannot be a NATS subject token.
    #[error("host name {host:?} cannot be used in a NATS subject (it must be non-empty, without '.', '*', '>' or whitespace)")]
    InvalidHost {
        /// The host name.
        host: String,
    },
    /// Connecting to the server failed.
    #[error("connecting to the control plane at {url} failed")]
    Connect {
        /// The server URL.
        url: String,
        /// The client's error.
        #[source]
        source: async_nats::ConnectError,
    },
    /// The stream could not be looked up or created.
    #[error("looking up or creating the JetStream stream {stream} failed")]
    Stream {
        /// The stream.
        stream: String,
        /// The client's error.
        #[source]
        source: async_nats::jetstream::context::CreateStreamError,
    },
    /// The durable consumer could not be looked up or created.
    #[error("looking up or creating the durable consumer {durable} failed")]
    Consumer {
        /// The consumer.
        durable: String,
        /// The client's error.
        #[source]
        source: async_nats::jetstream::stream::ConsumerError,
    },
    /// Starting to pull messages failed.
    #[error("starting to pull from consumer {durable} failed")]
    Pull {
        /// The consumer.
        durable: String,
        /// The client's error.
        #[source]
        source: async_nats::jetstream::consumer::StreamError,
    },
    /// Receiving a message failed (missed heartbeats, consumer deleted, …).
    #[error("receiving from consumer {durable} failed")]
    Receive {
        /// The consumer.
        durable: String,
        /// The client's error.
        #[source]
        source: async_nats::jetstream::consumer::pull::MessagesError,
    },
    /// The connection to the server was lost.
    #[error("the connection to the control plane was lost")]
    Disconnected,
    /// Acknowledging (or negatively acknowledging) a message failed; it will be redelivered.
    #[error("acknowledging control signal at stream sequence {stream_seq} failed; it will be redelivered")]
    Ack {
        /// The message's stream sequence.
        stream_seq: u64,
        /// The client's error.
        #[source]
        source: async_nats::Error,
    },
    /// Publishing a signal failed.
    #[error("publishing a control signal on {subject} failed")]
    Publish {
        /// The subject.
        subject: String,
        /// The client's error.
        #[source]
        source: async_nats::jetstream::context::PublishError,
    },
}

/// The reconnect schedule's parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// First delay (1 s).
    pub initial: Duration,
    /// Cap (32 s).
    pub max: Duration,
    /// A session that stayed up this long proved healthy: the schedule starts over (10 s).
    pub healthy_after: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(32),
            healthy_after: Duration::from_secs(10),
        }
    }
}

/// Exponential reconnect back-off: `initial`, doubled after every failure, capped at `max`;
/// reset by a clean close or by a session that lasted `healthy_after`. Pure: the caller
/// passes monotonic time in nanoseconds.
#[derive(Clone, Debug)]
pub struct Backoff {
    policy: BackoffPolicy,
    next: Duration,
    connected_at_ns: Option<u64>,
}

impl Backoff {
    /// A fresh schedule (next delay = `initial`).
    pub fn new(policy: BackoffPolicy) -> Backoff {
        Backoff {
            policy,
            next: policy.initial,
            connected_at_ns: None,
        }
    }

    /// The delay to wait before the next attempt after a failed one; advances the schedule.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next.min(self.policy.max);
        self.next = (d * 2).min(self.policy.max);
        d
    }

    /// A session came up at `now_ns`.
    pub fn on_connected(&mut self, now_ns: u64) {
        self.connected_at_ns = Some(now_ns);
    }

    /// The session ended with a failure at `now_ns`: resets first if it had been up for
    /// `healthy_after`, then returns the delay before the next attempt.
    pub fn on_disconnected(&mut self, now_ns: u64) -> Duration {
        if let Some(at) = self.connected_at_ns.take() {
            let up = Duration::from_nanos(now_ns.saturating_sub(at));
            if up >= self.policy.healthy_after {
                self.reset();
            }
        }
        self.next_delay()
    }

    /// The session ended cleanly: the schedule starts over.
    pub fn on_clean_close(&mut self) {
        self.connected_at_ns = None;
        self.reset();
    }

    /// Starts the schedule over.
    pub fn reset(&mut self) {
        self.next = self.policy.initial;
    }
}

/// Where and how to consume control signals.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    /// Server URL, e.g. `nats://127.0.0.1:4222`.
    pub url: String,
    /// This host's name: the last token of the subject.
    pub host: String,
    /// Redelivery delay of a signal delivered but not acknowledged (default 30 s).
    pub ack_wait: Duration,
    /// Reconnect schedule.
    pub backoff: BackoffPolicy,
    /// Connect timeout (default 5 s).
    pub connect_timeout: Duration,
    /// Idle heartbeat asked of the server on pull requests; two missed ones end the session
    /// (default 5 s), so a silently dead server is noticed.
    pub heartbeat: Duration,
}

impl UpstreamConfig {
    /// The defaults for `url` and `host`.
    pub fn new(url: impl Into<String>, host: impl Into<String>) -> UpstreamConfig {
        UpstreamConfig {
            url: url.into(),
            host: host.into(),
            ack_wait: Duration::from_secs(30),
            backoff: BackoffPolicy::default(),
            connect_timeout: Duration::from_secs(5),
            heartbeat: Duration::from_secs(5),
        }
    }

    /// `vigil.control.<host>`.
    pub fn subject(&self) -> String {
        subject_for(&self.host)
    }

    /// `vigil-<host>`.
    pub fn durable(&self) -> String {
        format!("vigil-{}", self.host)
    }
}

fn subject_for(host: &str) -> String {
    format!("vigil.control.{host}")
}

fn check_host(host: &str) -> Result<(), UpstreamError> {
    let bad = host.is_empty()
        || host
            .chars()
            .any(|c| c == '.' || c == '*' || c == '>' || c.is_whitespace());
    if bad {
        return Err(UpstreamError::InvalidHost {
            host: host.to_owned(),
        });
    }
    Ok(())
}

/// One control signal from upstream, with the handle that acknowledges it.
pub struct UpstreamSignal {
    /// The decoded signal (its `cell_id` is non-empty; its `signal` may be unspecified, which
    /// the store ignores and counts).
    pub signal: ControlSignal,
    /// Stream sequence of the message.
    pub stream_seq: u64,
    /// How many times it has been delivered (more than 1: a redelivery).
    pub delivered: i64,
    /// Acknowledge after applying.
    pub ack: AckHandle,
}

impl std::fmt::Debug for UpstreamSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamSignal")
            .field("signal", &self.signal)
            .field("stream_seq", &self.stream_seq)
            .field("delivered", &self.delivered)
            .finish_non_exhaustive()
    }
}

/// Acknowledges one delivered signal. Dropping it without calling either method leaves the
/// message unacknowledged: the server redelivers it after `ack_wait`.
pub struct AckHandle {
    msg: jetstream::Message,
    stream_seq: u64,
}

impl AckHandle {
    /// The signal was applied: the server will not deliver it again. Waits for the server to
    /// confirm the acknowledgement (an error means it may be delivered again).
    pub async fn applied(self) -> Result<(), UpstreamError> {
        self.msg
            .double_ack()
            .await
            .map_err(|source| UpstreamError::Ack {
                stream_seq: self.stream_seq,
                source,
            })
    }

    /// The signal could not be applied now: the server delivers it again at once.
    pub async fn not_applied(self) -> Result<(), UpstreamError> {
        self.msg
            .ack_with(AckKind::Nak(None))
            .await
            .map_err(|source| UpstreamError::Ack {
                stream_seq: self.stream_seq,
                source,
            })
    }
}

/// Counters of the upstream consumer.
#[derive(Debug, Default)]
pub struct UpstreamStats {
    /// Sessions that came up (connected, stream and consumer ready).
    pub sessions: AtomicU64,
    /// Session attempts or sessions that failed.
    pub failures: AtomicU64,
    /// Signals handed to the caller.
    pub delivered: AtomicU64,
    /// Messages that did not decode (or named no cell), terminated.
    pub undecodable: AtomicU64,
    /// Terminations of undecodable messages that failed (they will come back and be
    /// terminated again).
    pub term_failed: AtomicU64,
}

/// A channel for [`run`] of [`SIGNAL_CHANNEL_CAPACITY`].
pub fn signal_channel() -> (mpsc::Sender<UpstreamSignal>, mpsc::Receiver<UpstreamSignal>) {
    mpsc::channel(SIGNAL_CHANNEL_CAPACITY)
}

enum SessionEnd {
    /// Shutdown asked, or the caller dropped its receiver.
    Stop,
    /// The server ended the pull stream without an error.
    Clean,
}

/// Consumes control signals until `shutdown` completes or `tx`'s receiver is dropped,
/// reconnecting with back-off. Fails only on a configuration error.
pub async fn run(
    cfg: UpstreamConfig,
    tx: mpsc::Sender<UpstreamSignal>,
    stats: Arc<UpstreamStats>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), UpstreamError> {
    check_host(&cfg.host)?;
    let origin = tokio::time::Instant::now();
    let now_ns = || origin.elapsed().as_nanos() as u64;
    let mut backoff = Backoff::new(cfg.backoff);
    tokio::pin!(shutdown);
    loop {
        let result = tokio::select! {
            () = &mut shutdown => return Ok(()),
            r = session(&cfg, &tx, &stats, &mut backoff, now_ns) => r,
        };
        let delay = match result {
            Ok(SessionEnd::Stop) => return Ok(()),
            Ok(SessionEnd::Clean) => {
                backoff.on_clean_close();
                backoff.next_delay()
            }
            Err(_e) => {
                stats.failures.fetch_add(1, Ordering::Relaxed);
                backoff.on_disconnected(now_ns())
            }
        };
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            () = tx.closed() => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

async fn session(
    cfg: &UpstreamConfig,
    tx: &mpsc::Sender<UpstreamSignal>,
    stats: &UpstreamStats,
    backoff: &mut Backoff,
    now_ns: impl Fn() -> u64,
) -> Result<SessionEnd, UpstreamError> {
    let (ev_tx, mut ev_rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(cfg.connect_timeout)
        // This loop owns reconnection (with its back-off); the client must not retry on its own.
        .max_reconnects(1)
        .event_callback(move |event| {
            let ev_tx = ev_tx.clone();
            async move {
                let _ = ev_tx.try_send(event);
            }
        })
        .connect(cfg.url.as_str())
        .await
        .map_err(|source| UpstreamError::Connect {
            url: cfg.url.clone(),
            source,
        })?;
    let stream = ensure_stream(&client).await?;
    let durable = cfg.durable();
    let consumer: jetstream::consumer::PullConsumer = stream
        .get_or_create_consumer(
            &durable,
            pull::Config {
                durable_name: Some(durable.clone()),
                filter_subject: cfg.subject(),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                deliver_policy: jetstream::consumer::DeliverPolicy::All,
                ack_wait: cfg.ack_wait,
                max_ack_pending: MAX_ACK_PENDING,
                ..Default::default()
            },
        )
        .await
        .map_err(|source| UpstreamError::Consumer {
            durable: durable.clone(),
            source,
        })?;
    let mut messages = consumer
        .stream()
        .heartbeat(cfg.heartbeat)
        .max_messages_per_batch(MAX_ACK_PENDING as usize)
        .messages()
        .await
        .map_err(|source| UpstreamError::Pull {
            durable: durable.clone(),
            source,
        })?;
    stats.sessions.fetch_add(1, Ordering::Relaxed);
    backoff.on_connected(now_ns());
    loop {
        let next = tokio::select! {
            () = tx.closed() => return Ok(SessionEnd::Stop),
            ev = ev_rx.recv() => {
                match ev {
                    Some(async_nats::Event::Disconnected | async_nats::Event::Closed) | None => {
                        return Err(UpstreamError::Disconnected)
                    }
                    Some(_) => continue,
                }
            }
            m = messages.next() => m,
        };
        let msg = match next {
            None => return Ok(SessionEnd::Clean),
            Some(Err(source)) => {
                return Err(UpstreamError::Receive {
                    durable: durable.clone(),
                    source,
                })
            }
            Some(Ok(msg)) => msg,
        };
        let (stream_seq, delivered) = msg
            .info()
            .map_or((0, 0), |i| (i.stream_sequence, i.delivered));
        match ControlSignal::decode(msg.payload.as_ref()) {
            Ok(signal) if !signal.cell_id.is_empty() => {
                let item = UpstreamSignal {
                    signal,
                    stream_seq,
                    delivered,
                    ack: AckHandle { msg, stream_seq },
                };
                if tx.send(item).await.is_err() {
                    return Ok(SessionEnd::Stop);
                }
                stats.delivered.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                stats.undecodable.fetch_add(1, Ordering::Relaxed);
                if msg.ack_with(AckKind::Term).await.is_err() {
                    stats.term_failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Looks up the stream [`STREAM_NAME`], creating it if absent.
pub async fn ensure_stream(
    client: &async_nats::Client,
) -> Result<jetstream::stream::Stream, UpstreamError> {
    jetstream::new(client.clone())
        .get_or_create_stream(jetstream::stream::Config {
            name: STREAM_NAME.to_owned(),
            subjects: vec![STREAM_SUBJECTS.to_owned()],
            storage: jetstream::stream::StorageType::File,
            retention: jetstream::stream::RetentionPolicy::Limits,
            max_age: STREAM_MAX_AGE,
            ..Default::default()
        })
        .await
        .map_err(|source| UpstreamError::Stream {
            stream: STREAM_NAME.to_owned(),
            source,
        })
}

/// Publishes one signal to `host`'s subject and waits for JetStream to store it (what a
/// control plane, or a test, does).
pub async fn publish_signal(
    client: &async_nats::Client,
    host: &str,
    signal: &ControlSignal,
) -> Result<u64, UpstreamError> {
    check_host(host)?;
    let subject = subject_for(host);
    let js = jetstream::new(client.clone());
    let publish = |source| UpstreamError::Publish {
        subject: subject.clone(),
        source,
    };
    let ack = js
        .publish(subject.clone(), signal.encode_to_vec().into())
        .await
        .map_err(publish)?
        .await
        .map_err(publish)?;
    Ok(ack.sequence)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn secs(d: &[Duration]) -> Vec<u64> {
        d.iter().map(Duration::as_secs).collect()
    }

    #[test]
    fn backoff_doubles_to_the_cap() {
        let mut b = Backoff::new(BackoffPolicy::default());
        let d: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        assert_eq!(secs(&d), [1, 2, 4, 8, 16, 32, 32, 32]);
    }

    #[test]
    fn backoff_resets_after_a_healthy_session_only() {
        // A manual clock: monotonic nanoseconds passed in.
        let mut now = 0u64;
        let mut b = Backoff::new(BackoffPolicy::default());
        assert_eq!(b.next_delay().as_secs(), 1);
        assert_eq!(b.next_delay().as_secs(), 2);
        // Up for 3 s, then lost: not healthy, the schedule continues.
        now += 10 * S;
        b.on_connected(now);
        now += 3 * S;
        assert_eq!(b.on_disconnected(now).as_secs(), 4);
        // Up for 10 s: healthy, starts over.
        b.on_connected(now);
        now += 10 * S;
        assert_eq!(b.on_disconnected(now).as_secs(), 1);
        assert_eq!(b.next_delay().as_secs(), 2);
        // A failure without a session in between does not reset.
        assert_eq!(b.on_disconnected(now).as_secs(), 4);
        // A clean close starts over.
        b.on_clean_close();
        assert_eq!(b.next_delay().as_secs(), 1);
    }

    #[test]
    fn host_names_must_be_subject_tokens() {
        for bad in ["", "a.b", "a*", ">", "a b"] {
            assert!(matches!(
                check_host(bad),
                Err(UpstreamError::InvalidHost { .. })
            ));
        }
        assert!(check_host("host-1_x").is_ok());
        let cfg = UpstreamConfig::new("nats://127.0.0.1:1", "h1");
        assert_eq!(cfg.subject(), "vigil.control.h1");
        assert_eq!(cfg.durable(), "vigil-h1");
    }
}
