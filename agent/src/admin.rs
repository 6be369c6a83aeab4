//! The local admin socket and its client (`vigil ctl`). One JSON object per line each way:
//! a request `{"op": "...", ...}` and a reply `{"ok": true, "result": ...}` or
//! `{"ok": false, "error": "<sentence>"}`. The socket is mode 0600 in a 0700 directory and
//! every peer's credentials are checked (SO_PEERCRED): only root or vigil's own user may
//! register cells. Requests become reducer events; the reducer is the only mutator.
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use crate::config::CellConfig;
use crate::reducer::{AdminReply, AdminRequest};

/// Longest request line accepted; a cell registration is a few hundred bytes. A longer line
/// is refused with a sentence and the connection closed.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("creating the admin socket directory {path} failed: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("binding the admin socket {path} failed: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another vigil is already serving the admin socket {0}; stop it first")]
    InUse(PathBuf),
    #[error("connecting to vigil's admin socket {path} failed ({source}); is `vigil run` running with this socket?")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to vigil over {path} failed: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("vigil sent a reply that is not valid JSON: {0}")]
    BadReply(#[source] serde_json::Error),
    #[error("vigil refused the request: {0}")]
    Refused(String),
}

/// Wire form of a request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Ping,
    CellAdd {
        cell: CellConfig,
    },
    CellRemove {
        cell_id: String,
    },
    CellList,
    Peers,
    /// Fault injection for the receiver-stall tests: block the drain thread this long.
    DebugStallDrain {
        ms: u64,
    },
    /// Pause, resume or terminate one op (`op_id`) or the whole cell's run (no `op_id`).
    OpSignal {
        cell_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        op_id: Option<String>,
        /// "pause", "resume" or "terminate".
        signal: String,
    },
    OpList,
}

impl Request {
    /// The reducer's form of the request; `issuer` names the local user who sent it.
    fn into_admin(self, issuer: String) -> Result<AdminRequest, String> {
        Ok(match self {
            Request::OpSignal {
                cell_id,
                op_id,
                signal,
            } => {
                let Some(signal) = crate::killswitch::parse_signal(&signal) else {
                    return Err(format!(
                        "{signal:?} is not a signal; use pause, resume or terminate"
                    ));
                };
                AdminRequest::OpSignal {
                    cell_id,
                    op_id,
                    signal,
                    issuer,
                }
            }
            other => other.into(),
        })
    }
}

impl From<Request> for AdminRequest {
    fn from(r: Request) -> Self {
        match r {
            Request::OpSignal { .. } | Request::OpList => AdminRequest::OpList,
            Request::Ping => AdminRequest::Ping,
            Request::CellAdd { cell } => AdminRequest::CellAdd(cell),
            Request::CellRemove { cell_id } => AdminRequest::CellRemove(cell_id),
            Request::CellList => AdminRequest::CellList,
            Request::Peers => AdminRequest::Peers,
            Request::DebugStallDrain { ms } => AdminRequest::StallDrain(ms),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl From<AdminReply> for Reply {
    fn from(r: AdminReply) -> Self {
        match r {
            AdminReply::Ok(v) => Reply {
                ok: true,
                result: Some(v),
                error: None,
            },
            AdminReply::Err(e) => Reply {
                ok: false,
                result: None,
                error: Some(e),
            },
        }
    }
}

/// Binds the admin socket: creates its directory (0700), refuses to steal a live socket,
/// removes a stale one, and sets mode 0600.
pub fn bind(path: &Path) -> Result<tokio::net::UnixListener, AdminError> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(|source| AdminError::Dir {
                path: dir.to_path_buf(),
                source,
            })?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(
                |source| AdminError::Dir {
                    path: dir.to_path_buf(),
                    source,
                },
            )?;
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(AdminError::InUse(path.to_path_buf()));
        }
        let _ = std::fs::remove_file(path);
    }
    let l = tokio::net::UnixListener::bind(path).map_err(|source| AdminError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        AdminError::Bind {
            path: path.to_path_buf(),
            source,
        }
    })?;
    Ok(l)
}

/// Whether a connected peer may use the socket: root or the same user as vigil.
fn peer_allowed(stream: &tokio::net::UnixStream) -> bool {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    stream
        .peer_cred()
        .is_ok_and(|c| c.uid() == 0 || c.uid() == me)
}

/// Serves one admin connection: each request line is handed to `submit`, whose answer is
/// written back as one line.
pub async fn serve_conn<F, Fut>(stream: tokio::net::UnixStream, submit: F)
where
    F: Fn(AdminRequest) -> Fut,
    Fut: std::future::Future<Output = AdminReply>,
{
    if !peer_allowed(&stream) {
        tracing::warn!("refused an admin connection from a user other than root or vigil's own");
        return;
    }
    let issuer = stream
        .peer_cred()
        .map_or_else(|_| "local".to_string(), |c| format!("uid:{}", c.uid()));
    let (rd, mut wr) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(rd);
    let mut line = String::new();
    loop {
        line.clear();
        let Ok(n) = (&mut lines)
            .take(MAX_REQUEST_BYTES as u64 + 1)
            .read_line(&mut line)
            .await
        else {
            return;
        };
        if n == 0 {
            return;
        }
        let reply: Reply = if line.len() > MAX_REQUEST_BYTES {
            Reply {
                ok: false,
                result: None,
                error: Some(format!(
                    "the request is longer than {MAX_REQUEST_BYTES} bytes"
                )),
            }
        } else {
            match serde_json::from_str::<Request>(line.trim_end()) {
                Ok(req) => match req.into_admin(issuer.clone()) {
                    Ok(req) => submit(req).await.into(),
                    Err(e) => Reply {
                        ok: false,
                        result: None,
                        error: Some(e),
                    },
                },
                Err(e) => Reply {
                    ok: false,
                    result: None,
                    error: Some(format!("the request is not one vigil understands: {e}")),
                },
            }
        };
        let mut out = serde_json::to_vec(&reply).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
        out.push(b'\n');
        if wr.write_all(&out).await.is_err() || line.len() > MAX_REQUEST_BYTES {
            return;
        }
    }
}

/// Sends one request and waits for its reply (the `vigil ctl` side).
pub fn call(path: &Path, req: &Request) -> Result<serde_json::Value, AdminError> {
    let io = |source| AdminError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut s =
        std::os::unix::net::UnixStream::connect(path).map_err(|source| AdminError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .map_err(io)?;
    let mut line = serde_json::to_vec(req).map_err(|e| io(std::io::Error::other(e)))?;
    line.push(b'\n');
    s.write_all(&line).map_err(io)?;
    let mut reply = String::new();
    BufReader::new(&s).read_line(&mut reply).map_err(io)?;
    let reply: Reply = serde_json::from_str(&reply).map_err(AdminError::BadReply)?;
    if reply.ok {
        Ok(reply.result.unwrap_or(serde_json::Value::Null))
    } else {
        Err(AdminError::Refused(
            reply.error.unwrap_or_else(|| "no reason given".into()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_json_lines() {
        let r = Request::CellAdd {
            cell: CellConfig {
                cell_id: "a".into(),
                run_id: "r".into(),
                cid: Some(3),
                uds_path: None,
                keepalive_ms: 5,
                cgroup: None,
                probes: None,
            },
        };
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.contains("\"op\":\"cell_add\""), "{s}");
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        assert!(serde_json::from_str::<Request>("{\"op\":\"explode\"}").is_err());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn server_answers_refuses_garbage_and_a_second_server_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/admin.sock");
        let listener = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(bind(&path), Err(AdminError::InUse(_))));
        let server = tokio::spawn(async move {
            // The probe of the refused second bind, then the two calls below.
            for _ in 0..3 {
                let (s, _) = listener.accept().await.unwrap();
                serve_conn(s, |req| async move {
                    match req {
                        AdminRequest::Ping => AdminReply::Ok(serde_json::json!("ok")),
                        _ => AdminReply::Err("nope".into()),
                    }
                })
                .await;
            }
        });
        let p = path.clone();
        let res = tokio::task::spawn_blocking(move || {
            let ok = call(&p, &Request::Ping).unwrap();
            let err = call(&p, &Request::CellList).unwrap_err();
            (ok, err.to_string())
        })
        .await
        .unwrap();
        assert_eq!(res.0, serde_json::json!("ok"));
        assert!(res.1.contains("nope"));
        server.abort();
    }
}
