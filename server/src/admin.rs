//! The operator's control socket: issue enrollment tokens and revoke devices while the daemon
//! runs.
//!
//! The store admits one process, so `fedtune-server token` and `revoke` cannot open it while
//! the daemon serves. Instead the daemon listens on a Unix socket in its state folder
//! (`admin.sock`, mode 0600: whoever may read the state folder's secrets may administer the
//! daemon, and nobody else), and the commands send it one JSON line and read one back. With no
//! daemon listening they open the store themselves, as before.
//!
//! Requests are untrusted bytes like any other: a line longer than [`MAX_LINE`], one that does
//! not parse, or a client that stalls past [`IO_TIMEOUT`] is answered or dropped without
//! touching the store.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fedtune_shared::protocol::DeviceId;
use serde::{Deserialize, Serialize};

use crate::daemon::Core;
use crate::registry::{Registry, RegistryError};

/// The longest request or response line, newline included.
pub const MAX_LINE: usize = 4096;

/// How long one exchange may take before the other side is dropped.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The socket's file name inside the state folder.
pub const SOCKET_FILE: &str = "admin.sock";

/// What the operator asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum AdminRequest {
    /// A new enrollment token good for `uses` devices.
    IssueToken {
        /// Devices it may enroll.
        uses: u32,
    },
    /// Revoke a device: its next request is refused.
    Revoke {
        /// The device id, 32 hex digits.
        device: String,
    },
}

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case", deny_unknown_fields)]
pub enum AdminResponse {
    /// The token issued.
    Token {
        /// The token, to hand to the device's app.
        token: String,
    },
    /// The device is revoked.
    Revoked {
        /// Its id.
        device: String,
    },
    /// Refused, with the reason.
    Refused {
        /// Why.
        reason: String,
    },
}

/// Why the control socket failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// Binding, accepting, reading or writing failed.
    #[error("admin socket {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// Another daemon already answers on the socket.
    #[error("admin socket {0}: another daemon is serving this state folder")]
    InUse(PathBuf),
    /// The other side sent something that is not an admin message.
    #[error("admin socket: malformed message: {0}")]
    Malformed(String),
    /// The daemon refused the request.
    #[error("the daemon refused: {0}")]
    Refused(String),
}

/// The control socket of the state folder `state_dir`.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_FILE)
}

/// Carries out `request` on `registry`: the same effect whether the daemon or a command with
/// the store to itself runs it.
pub fn execute(registry: &Registry<'_>, request: &AdminRequest) -> AdminResponse {
    let refused = |e: RegistryError| AdminResponse::Refused {
        reason: e.to_string(),
    };
    match request {
        AdminRequest::IssueToken { uses } => {
            let token = fedtune_shared::protocol::auth::hex_encode(&rand::random::<[u8; 16]>());
            match registry.add_token(&token, *uses) {
                Ok(()) => AdminResponse::Token { token },
                Err(e) => refused(e),
            }
        }
        AdminRequest::Revoke { device } => match DeviceId::parse(device) {
            None => AdminResponse::Refused {
                reason: format!("`{device}` is not a device id (32 hex digits)"),
            },
            Some(id) => match registry.revoke(id) {
                Ok(()) => {
                    tracing::info!(device = %id, "device revoked");
                    AdminResponse::Revoked {
                        device: id.to_string(),
                    }
                }
                Err(e) => refused(e),
            },
        },
    }
}

#[cfg(unix)]
pub use unix::{AdminSocket, request};

#[cfg(unix)]
mod unix {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::fs::PermissionsExt;

    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    use tokio::net::{UnixListener, UnixStream};
    use tokio::task::JoinSet;

    use super::*;

    /// The daemon's end: a bound socket that answers until shutdown.
    pub struct AdminSocket {
        listener: UnixListener,
        path: PathBuf,
        core: Arc<Core>,
    }

    impl AdminSocket {
        /// Binds `admin.sock` in the core's state folder, replacing a stale file a killed
        /// daemon left behind.
        ///
        /// # Errors
        /// [`AdminError::InUse`] when a live daemon answers there; [`AdminError::Io`] when the
        /// socket cannot be bound or restricted to its owner.
        pub fn bind(core: Arc<Core>) -> Result<Self, AdminError> {
            let path = socket_path(&core.config().state_dir);
            let io = |source| AdminError::Io {
                path: path.clone(),
                source,
            };
            if path.exists() {
                if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                    return Err(AdminError::InUse(path));
                }
                std::fs::remove_file(&path).map_err(io)?;
            }
            let listener = UnixListener::bind(&path).map_err(io)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
            tracing::info!(socket = %path.display(), "admin socket");
            Ok(Self {
                listener,
                path,
                core,
            })
        }

        /// Answers requests until `shutdown` completes, then waits for the exchanges under way
        /// and removes the socket file. Returns only when it no longer holds the core.
        pub async fn serve(self, shutdown: impl std::future::Future<Output = ()>) {
            let mut exchanges = JoinSet::new();
            tokio::pin!(shutdown);
            loop {
                tokio::select! {
                    () = &mut shutdown => break,
                    accepted = self.listener.accept() => match accepted {
                        Ok((stream, _)) => {
                            let core = self.core.clone();
                            exchanges.spawn(async move {
                                if let Err(e) = answer(stream, core).await {
                                    tracing::warn!(error = %e, "admin request dropped");
                                }
                            });
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "admin socket accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    },
                    Some(_) = exchanges.join_next(), if !exchanges.is_empty() => {}
                }
            }
            while exchanges.join_next().await.is_some() {}
            let _ = std::fs::remove_file(&self.path);
        }
    }

    async fn answer(stream: UnixStream, core: Arc<Core>) -> Result<(), AdminError> {
        let malformed = |e: &dyn std::fmt::Display| AdminError::Malformed(e.to_string());
        let (read, mut write) = stream.into_split();
        let mut line = Vec::new();
        let mut limited = tokio::io::BufReader::new(read.take(MAX_LINE as u64));
        tokio::time::timeout(IO_TIMEOUT, limited.read_until(b'\n', &mut line))
            .await
            .map_err(|_| AdminError::Malformed("no request line in time".into()))?
            .map_err(|e| malformed(&e))?;
        let response = if line.last() != Some(&b'\n') {
            AdminResponse::Refused {
                reason: format!("a request is one line of at most {MAX_LINE} bytes"),
            }
        } else {
            match serde_json::from_slice::<AdminRequest>(&line) {
                Err(e) => AdminResponse::Refused {
                    reason: format!("not an admin request: {e}"),
                },
                Ok(request) => {
                    // Store writes block: off the async threads, like every request's.
                    tokio::task::spawn_blocking(move || {
                        execute(&Registry::new(core.store()), &request)
                    })
                    .await
                    .map_err(|e| malformed(&e))?
                }
            }
        };
        let mut reply = serde_json::to_vec(&response).map_err(|e| malformed(&e))?;
        reply.push(b'\n');
        tokio::time::timeout(IO_TIMEOUT, write.write_all(&reply))
            .await
            .map_err(|_| AdminError::Malformed("the client stopped reading".into()))?
            .map_err(|e| malformed(&e))?;
        Ok(())
    }

    /// The command's end: sends `request` to the daemon serving `state_dir` and returns its
    /// answer, or `None` when no daemon listens there (the caller may open the store itself).
    ///
    /// # Errors
    /// [`AdminError::Io`] when the exchange fails part way; [`AdminError::Malformed`] for an
    /// answer that is not one.
    pub fn request(
        state_dir: &Path,
        request: &AdminRequest,
    ) -> Result<Option<AdminResponse>, AdminError> {
        let path = socket_path(state_dir);
        let io = |source| AdminError::Io {
            path: path.clone(),
            source,
        };
        let mut stream = match std::os::unix::net::UnixStream::connect(&path) {
            Ok(s) => s,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(io(e)),
        };
        stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(io)?;
        stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(io)?;
        let mut line =
            serde_json::to_vec(request).map_err(|e| AdminError::Malformed(e.to_string()))?;
        line.push(b'\n');
        stream.write_all(&line).map_err(io)?;
        let mut answer = Vec::new();
        BufReader::new(stream.take(MAX_LINE as u64))
            .read_until(b'\n', &mut answer)
            .map_err(io)?;
        serde_json::from_slice(&answer)
            .map(Some)
            .map_err(|e| AdminError::Malformed(format!("the daemon's answer: {e}")))
    }
}

/// Without Unix sockets there is no control socket: the commands open the store themselves.
#[cfg(not(unix))]
pub fn request(_: &Path, _: &AdminRequest) -> Result<Option<AdminResponse>, AdminError> {
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_are_tagged_json() {
        let line = serde_json::to_string(&AdminRequest::IssueToken { uses: 3 }).unwrap();
        assert_eq!(line, r#"{"op":"issue_token","uses":3}"#);
        let back: AdminRequest = serde_json::from_str(r#"{"op":"revoke","device":"ab"}"#).unwrap();
        assert_eq!(
            back,
            AdminRequest::Revoke {
                device: "ab".into()
            }
        );
        assert!(serde_json::from_str::<AdminRequest>(r#"{"op":"drop_tables"}"#).is_err());
        assert!(
            serde_json::from_str::<AdminRequest>(r#"{"op":"issue_token","uses":1,"x":2}"#).is_err()
        );
    }
}
