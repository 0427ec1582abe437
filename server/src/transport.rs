//! The daemon's QUIC side: accept connections, read one request frame per stream (bounded),
//! hand it to the [`Core`] on the blocking pool (the core writes to disk), write the answer.
//! Bad bytes on one stream get an error frame on that stream; the connection and the daemon
//! carry on.
//!
//! Every task [`Listener::serve`] starts (the deadline ticker, one per connection, one per
//! stream, and the blocking work each awaits) is joined before `serve` returns: each holds a
//! clone of the core, so the core (and its store, which admits one opener) is released when
//! `serve` returns, never some time after.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use fedtune_shared::protocol::auth::EXPORTER_LABEL;
use fedtune_shared::protocol::frame::decode_body;
use fedtune_shared::protocol::{
    ErrorCode, FrameError, MAX_REQUEST_FRAME, Request, Response, WireError,
};
use fedtune_shared::transport::TransportError;
use fedtune_shared::transport::stream::{read_frame, receive_to_file, send_file, write_message};
use fedtune_shared::transport::tls::server_config;

use crate::daemon::{Core, DaemonError, Session, TICK};

/// A bound QUIC endpoint serving a core.
pub struct Listener {
    endpoint: quinn::Endpoint,
    core: Arc<Core>,
}

impl Listener {
    /// Binds `addr` with the core's certificate.
    pub fn bind(core: Arc<Core>, addr: SocketAddr) -> Result<Self, DaemonError> {
        let keys = core.keys();
        let config = server_config(&keys.cert_der, &keys.tls_key_der)
            .map_err(|e| DaemonError::Network(e.to_string()))?;
        // Stateless resets and connection ids are keyed by a secret stored with the server's
        // keys. A restarted daemon then recognises the connection ids its previous process
        // issued and answers them with a valid stateless reset instead of dropping the packets,
        // so devices reconnect at once rather than after their request timeout.
        let secret = &keys.reset_secret;
        let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        let cid_key = u64::from_le_bytes([
            secret[0], secret[1], secret[2], secret[3], secret[4], secret[5], secret[6], secret[7],
        ]);
        let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
        // quinn answers at most one unknown packet per interval (20 ms by default), which after a
        // restart leaves all but one device waiting for a retransmission, with back-off. A reset
        // is smaller than the packet that caused it, so answering more often amplifies nothing.
        endpoint_config.min_reset_interval(std::time::Duration::ZERO);
        endpoint_config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        });
        let socket = std::net::UdpSocket::bind(addr)
            .map_err(|e| DaemonError::Network(format!("bind {addr}: {e}")))?;
        // The kernel's default receive buffer (about 200 KiB) overflows when hundreds of devices
        // send at once (a round opening, handshakes after a restart), and every dropped datagram
        // costs a retransmission timeout of a second or more. The kernel caps the request at
        // net.core.rmem_max; what it granted is logged.
        let state = quinn::udp::UdpSocketState::new((&socket).into())
            .map_err(|e| DaemonError::Network(format!("socket {addr}: {e}")))?;
        if let Err(e) = state.set_recv_buffer_size((&socket).into(), RECEIVE_BUFFER_BYTES) {
            tracing::warn!(error = %e, "could not enlarge the UDP receive buffer");
        }
        match state.recv_buffer_size((&socket).into()) {
            Ok(granted) if granted < RECEIVE_BUFFER_BYTES => tracing::warn!(
                granted,
                wanted = RECEIVE_BUFFER_BYTES,
                "UDP receive buffer capped by net.core.rmem_max; raise it for large fleets"
            ),
            Ok(granted) => tracing::debug!(granted, "UDP receive buffer"),
            Err(_) => {}
        }
        let endpoint = quinn::Endpoint::new(
            endpoint_config,
            Some(config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|e| DaemonError::Network(format!("bind {addr}: {e}")))?;
        Ok(Self { endpoint, core })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr, DaemonError> {
        self.endpoint
            .local_addr()
            .map_err(|e| DaemonError::Network(e.to_string()))
    }

    /// Serves until `shutdown` completes, then closes connections gracefully and returns once
    /// every task it started has ended (see the module comment), or after
    /// [`SHUTDOWN_GRACE`] with the stragglers aborted (logged).
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()>) {
        let (stop_ticker, mut ticker_stopped) = tokio::sync::oneshot::channel::<()>();
        let timer_core = self.core.clone();
        let ticker = tokio::spawn(async move {
            let mut interval = tokio::time::interval(TICK);
            loop {
                tokio::select! {
                    _ = interval.tick() => {}
                    _ = &mut ticker_stopped => break,
                }
                let core = timer_core.clone();
                // Awaited to its end even at shutdown: it holds the core.
                let _ = tokio::task::spawn_blocking(move || core.on_timer(Instant::now())).await;
            }
        });
        let mut connections = tokio::task::JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let core = self.core.clone();
                    connections.spawn(async move {
                        if let Err(e) = serve_connection(core, incoming).await {
                            tracing::debug!(error = %e, "connection ended");
                        }
                    });
                }
                // Finished connections are reaped as they end, so the set holds live ones.
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                () = &mut shutdown => {
                    tracing::info!("shutting down");
                    break;
                }
            }
        }
        let _ = stop_ticker.send(());
        self.endpoint.close(0u32.into(), b"server shutting down");
        // Closing the endpoint closes every connection, which ends each connection's accept
        // loop and fails every stream still reading or writing: the tasks end on their own.
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            let _ = ticker.await;
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                connections = connections.len(),
                "connections still busy after {SHUTDOWN_GRACE:?}; aborting them"
            );
            connections.abort_all();
            while connections.join_next().await.is_some() {}
        }
        self.endpoint.wait_idle().await;
    }
}

/// How long [`Listener::serve`] waits at shutdown for its tasks to end before aborting them
/// (a blocking request already running still finishes: it cannot be interrupted).
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// The UDP receive buffer the daemon asks for: 1,000 devices sending at once fit.
const RECEIVE_BUFFER_BYTES: usize = 4 << 20;

/// How long a device may take to send one request frame; a stream that stalls longer is
/// answered as truncated and its task ends.
const FRAME_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

async fn serve_connection(
    core: Arc<Core>,
    incoming: quinn::Incoming,
) -> Result<(), TransportError> {
    let connection = incoming.await?;
    let metrics = core.metrics().clone();
    metrics.connections.inc();
    let _guard = ConnectionGuard(metrics.clone());
    let mut session = Session::default();
    connection
        .export_keying_material(&mut session.exporter, EXPORTER_LABEL, b"")
        .map_err(|_| TransportError::Connect("TLS exporter unavailable".into()))?;
    let session = Arc::new(Mutex::new(session));
    let mut streams = tokio::task::JoinSet::new();
    let ended = loop {
        tokio::select! {
            accepted = connection.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    let core = core.clone();
                    let session = session.clone();
                    streams.spawn(async move {
                        if let Err(e) = serve_stream(core, session, send, recv).await {
                            tracing::debug!(error = %e, "stream failed");
                        }
                    });
                }
                Err(e) => break e,
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
        }
    };
    // The connection is closed: its streams fail or finish at once. Waiting for them (and for
    // the blocking request each may be in) keeps every clone of the core inside this task.
    while streams.join_next().await.is_some() {}
    Err(ended.into())
}

struct ConnectionGuard(Arc<crate::metrics::Metrics>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.dec();
    }
}

async fn serve_stream(
    core: Arc<Core>,
    session: Arc<Mutex<Session>>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<(), TransportError> {
    let metrics = core.metrics().clone();
    let frame = tokio::time::timeout(FRAME_TIMEOUT, read_frame(&mut recv, MAX_REQUEST_FRAME))
        .await
        .unwrap_or_else(|_| {
            Err(TransportError::Frame(FrameError::Truncated {
                expected: 0,
                got: 0,
            }))
        });
    let response = match frame {
        Ok(body) => {
            metrics.bytes_in.inc_by(body.len() as u64 + 8);
            match decode_body::<Request>(&body) {
                Ok(Request::Download { digest, offset }) => {
                    let snapshot = session.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    match core.download(&snapshot, &digest, offset) {
                        Ok((path, total)) => {
                            let header = Response::Blob { total, offset };
                            write_message(&mut send, &header).await?;
                            send_file(&mut send, &path, offset, total - offset).await?;
                            metrics.bytes_out.inc_by(total - offset);
                            let _ = send.finish();
                            let _ = send.stopped().await;
                            return Ok(());
                        }
                        Err(refusal) => refusal,
                    }
                }
                Ok(Request::Upload {
                    digest,
                    total,
                    offset,
                }) => {
                    let snapshot = session.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    match core.upload_target(&snapshot, &digest, total, offset) {
                        Ok((device, path, max)) => {
                            // Bytes that arrived stay on disk even if the stream breaks: the
                            // device resumes from what the server holds.
                            let received = receive_to_file(&mut recv, &path, max).await;
                            if let Ok(n) = &received {
                                metrics.bytes_in.inc_by(*n);
                            }
                            let core = core.clone();
                            match received {
                                Ok(_) | Err(TransportError::Read(_)) => {
                                    tokio::task::spawn_blocking(move || {
                                        core.finish_upload(device, &digest, total)
                                    })
                                    .await
                                    .unwrap_or_else(|_| internal())
                                }
                                Err(TransportError::Frame(e)) => {
                                    let _ = std::fs::remove_file(&path);
                                    refuse(&core, ErrorCode::TooLarge, e.to_string())
                                }
                                Err(e) => return Err(e),
                            }
                        }
                        Err(refusal) => refusal,
                    }
                }
                Ok(request) => {
                    let core = core.clone();
                    tokio::task::spawn_blocking(move || {
                        let mut session = session.lock().unwrap_or_else(|p| p.into_inner());
                        core.handle(&mut session, request, Instant::now())
                    })
                    .await
                    .unwrap_or_else(|_| internal())
                }
                Err(e) => refuse(&core, ErrorCode::Malformed, e.to_string()),
            }
        }
        Err(TransportError::Frame(e)) => {
            let code = match e {
                FrameError::VersionMismatch { .. } => ErrorCode::VersionMismatch,
                FrameError::TooLarge { .. } => ErrorCode::TooLarge,
                _ => ErrorCode::Malformed,
            };
            tracing::warn!(error = %e, "bad frame");
            refuse(&core, code, e.to_string())
        }
        Err(e) => return Err(e),
    };
    let bytes = fedtune_shared::protocol::frame::encode(&response)?;
    metrics.bytes_out.inc_by(bytes.len() as u64);
    send.write_all(&bytes)
        .await
        .map_err(|e| TransportError::Write(e.to_string()))?;
    let _ = send.finish();
    // Wait until the device has the answer (or is gone) before dropping the stream.
    let _ = send.stopped().await;
    Ok(())
}

fn internal() -> Response {
    Response::Error(WireError::new(ErrorCode::Internal, "internal server error"))
}

fn refuse(core: &Core, code: ErrorCode, message: String) -> Response {
    core.metrics().refuse(&format!("{code:?}"));
    Response::Error(WireError::new(code, message))
}
