//! The HTTP endpoint (HTTP/1.1 only, loopback by default): `GET /healthz`,
//! `GET /api/v1/entities` and `GET /metrics`, answered from a [`HealthSource`].
//!
//! Owns the listener, the accept loop, the per-connection limits and the request routing
//! ([`respond`], a pure function of method, path and source). Request bodies are never read;
//! unknown paths are 404, other methods than GET/HEAD 405; a malformed or oversized request
//! is answered (400/431) or dropped by hyper, never a panic.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use crate::model::HealthSource;

/// Default listen address: loopback only, a port of vigil's own.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:9847";

/// Most connections served at once. Health checks and scrapes are a handful of clients; past
/// this, accepting pauses (new clients wait in the kernel backlog) so a flood cannot exhaust
/// file descriptors or memory.
pub const MAX_CONNECTIONS: usize = 64;

/// hyper's read buffer bound, which bounds the request head (line + headers). 16 KiB is far
/// above any real health-check request and the smallest round size hyper accepts is 8 KiB;
/// a larger head is answered `431` and the connection closed.
pub const MAX_REQUEST_HEAD_BYTES: usize = 16 * 1024;

/// Time a client has to send a complete request head; slower clients are disconnected so a
/// slow-loris cannot hold one of the [`MAX_CONNECTIONS`] slots.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest life of one connection (keep-alive included); it is then closed, freeing its slot.
pub const MAX_CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Pause after a failed `accept` (e.g. EMFILE) before trying again, so the loop cannot spin.
pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Content type of `/metrics` (Prometheus text format 0.0.4).
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The daemon's monotonic clock in nanoseconds, passed to [`HealthSource::entities`].
pub type NowFn = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Errors of the HTTP endpoint.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The address could not be bound.
    #[error("cannot listen for HTTP on {addr}: {source}")]
    Bind {
        /// Requested address.
        addr: SocketAddr,
        /// OS error.
        source: std::io::Error,
    },
    /// A non-loopback address was asked for without the explicit opt-in.
    #[error("refusing to serve HTTP on non-loopback address {addr}: set allow_non_loopback to expose health and metrics beyond this host")]
    NonLoopback {
        /// Requested address.
        addr: SocketAddr,
    },
}

/// Where and how to listen.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Listen address (port 0 picks a free port).
    pub addr: SocketAddr,
    /// Operator opt-in to listen on a non-loopback address.
    pub allow_non_loopback: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            addr: DEFAULT_HTTP_ADDR
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 9847))),
            allow_non_loopback: false,
        }
    }
}

/// A running endpoint. Dropping it stops the accept loop as [`HttpServer::shutdown`] does
/// (without waiting).
#[derive(Debug)]
pub struct HttpServer {
    local_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl HttpServer {
    /// Binds `config.addr` and starts serving on the current tokio runtime.
    pub async fn bind(
        config: &HttpConfig,
        source: Arc<dyn HealthSource>,
        now: NowFn,
    ) -> Result<HttpServer, HttpError> {
        let addr = config.addr;
        if !addr.ip().is_loopback() && !config.allow_non_loopback {
            return Err(HttpError::NonLoopback { addr });
        }
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| HttpError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| HttpError::Bind { addr, source })?;
        let (stop, stop_rx) = oneshot::channel();
        let task = tokio::spawn(accept_loop(listener, source, now, stop_rx));
        tracing::info!(%local_addr, "health endpoint listening");
        Ok(HttpServer {
            local_addr,
            stop: Some(stop),
            task,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, aborts open connections and waits for the loop to end.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            // The loop may already have ended; then there is nobody to tell.
            let _ = stop.send(());
        }
        if let Err(e) = (&mut self.task).await {
            if e.is_panic() {
                tracing::error!("health endpoint accept loop panicked");
            }
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    source: Arc<dyn HealthSource>,
    now: NowFn,
    mut stop: oneshot::Receiver<()>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    loop {
        let permit = tokio::select! {
            _ = &mut stop => break,
            p = Arc::clone(&slots).acquire_owned() => p,
        };
        let Ok(permit) = permit else { break };
        let accepted = tokio::select! {
            _ = &mut stop => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _peer)) => {
                let source = Arc::clone(&source);
                let now = Arc::clone(&now);
                conns.spawn(async move {
                    let _permit = permit;
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let response =
                            respond(source.as_ref(), &now, req.method(), req.uri().path());
                        async move { Ok::<_, Infallible>(response) }
                    });
                    let conn = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_READ_TIMEOUT)
                        .max_buf_size(MAX_REQUEST_HEAD_BYTES)
                        .serve_connection(TokioIo::new(stream), service);
                    match tokio::time::timeout(MAX_CONNECTION_LIFETIME, conn).await {
                        Ok(Ok(())) | Err(_) => {}
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "health connection ended with an error");
                        }
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "health endpoint accept failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
        while conns.try_join_next().is_some() {}
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}

fn body(
    status: StatusCode,
    content_type: &'static str,
    text: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(text.into()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec(value) {
        Ok(bytes) => body(status, "application/json", bytes),
        Err(e) => body(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain; charset=utf-8",
            format!("cannot serialise the response: {e}\n"),
        ),
    }
}

/// Routes one request. Pure apart from the source's own reads: the building block of the
/// server, exposed for tests and for embedding in another server.
pub fn respond(
    source: &dyn HealthSource,
    now: &NowFn,
    method: &Method,
    path: &str,
) -> Response<Full<Bytes>> {
    let known = matches!(path, "/healthz" | "/api/v1/entities" | "/metrics");
    if !known {
        return body(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found\n",
        );
    }
    if method != Method::GET && method != Method::HEAD {
        let mut r = body(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "method not allowed\n",
        );
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match path {
        "/healthz" => {
            let health = source.health();
            let status = if health.is_ready() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json(status, &health)
        }
        "/api/v1/entities" => json(StatusCode::OK, &source.entities(now())),
        _ => body(StatusCode::OK, METRICS_CONTENT_TYPE, source.metrics()),
    }
}
