//! fedtune's aggregation daemon: round orchestration over QUIC, device enrollment and
//! authentication, validation of every report, durable state, metrics.
//!
//! - [`config`] — `server.toml`; [`admin`] — the operator's control socket;
//! - [`rounds`] — the orchestrator, a state machine without I/O;
//! - [`secure`] — one round's SecAgg+ session (phases, deadlines, cost), without I/O;
//! - [`algorithm`] — what each algorithm does on the server (plans, validation, aggregation);
//! - [`registry`] — devices, enrollment tokens, keys, revocation;
//! - [`store`] — durable records (redb) and checkpoints;
//! - [`identity`] — the server's TLS certificate and plan-signing key;
//! - [`blobs`] — adapter files served and uploaded; [`command`] — the command line;
//! - [`daemon`] — the core that answers requests; [`transport`] — QUIC; [`metrics`] — Prometheus.

#![warn(missing_docs)]

pub mod admin;
pub mod algorithm;
pub mod blobs;
pub mod command;
pub mod config;
pub mod daemon;
pub mod identity;
pub mod metrics;
pub mod registry;
pub mod rounds;
pub mod secure;
pub mod store;
pub mod transport;

use std::sync::Arc;

pub use config::ServerConfig;
pub use daemon::{Core, DaemonError};

/// Opens the state for `config`, writes `server-identity.json` into the state folder, binds the
/// QUIC and metrics ports, and serves until SIGTERM or Ctrl-C.
pub async fn run(config: ServerConfig) -> Result<(), DaemonError> {
    run_until(config, shutdown_signal()).await
}

/// [`run`], serving until `shutdown` completes. Returns once every task it started is over
/// (see [`transport::Listener::serve`]) and the state is closed, so the store can be opened
/// again at once (by a restarted daemon in the same process, or `fedtune server token`).
pub async fn run_until(
    config: ServerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DaemonError> {
    let listen = config.listen;
    let metrics_addr = config.metrics;
    let core = Arc::new(tokio::task::block_in_place(|| Core::open(config))?);
    let listener = transport::Listener::bind(core.clone(), listen)?;
    let bound = listener.local_addr()?;
    let mut address = core.config().public_address();
    if address.port() == 0 {
        address.set_port(bound.port());
    }
    let identity_path = core.config().state_dir.join("server-identity.json");
    core.keys()
        .identity(address)
        .save(&identity_path)
        .map_err(|e| DaemonError::Network(e.to_string()))?;
    let metrics_endpoint = match metrics_addr {
        Some(addr) => {
            let endpoint = metrics::serve(addr, core.metrics().clone())
                .await
                .map_err(|e| DaemonError::Network(format!("metrics {addr}: {e}")))?;
            tracing::info!(bound = %endpoint.local_addr(), "metrics endpoint");
            Some(endpoint)
        }
        None => None,
    };
    tracing::info!(%bound, identity = %identity_path.display(), "serving");
    let served = serve_with_admin(listener, core.clone(), shutdown).await;
    if let Some(endpoint) = metrics_endpoint {
        endpoint.stop().await;
    }
    served?;
    // The listener's and the control socket's tasks are joined: this is the last handle on the
    // core, and dropping it closes the store.
    if Arc::strong_count(&core) > 1 {
        tracing::warn!("the daemon's state is still in use after shutdown");
    }
    drop(core);
    tracing::info!("stopped");
    Ok(())
}

/// Serves devices and the operator's control socket until `shutdown`, then waits for both.
async fn serve_with_admin(
    listener: transport::Listener,
    core: Arc<Core>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DaemonError> {
    #[cfg(unix)]
    {
        let admin = admin::AdminSocket::bind(core)?;
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let devices = listener.serve(async move {
            shutdown.await;
            let _ = stop.send(true);
        });
        let operator = admin.serve(async move {
            let _ = stopped.wait_for(|&s| s).await;
        });
        tokio::join!(devices, operator);
    }
    #[cfg(not(unix))]
    {
        drop(core);
        listener.serve(shutdown).await;
    }
    Ok(())
}

/// Threads for the core's blocking work (request handling with durable writes). The core is
/// one lock and the store one writer, so threads beyond a few dozen only wait; tokio's default
/// of 512 let a burst of 1,000 devices start 500 threads.
pub const BLOCKING_THREADS: usize = 32;

/// The tokio runtime the daemon runs on.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(BLOCKING_THREADS)
        .thread_name("fedtune-server")
        .build()
}

/// Issues an enrollment token good for `uses` devices and returns it: through the running
/// daemon's control socket, or in the store directly when no daemon serves `config`'s state.
pub fn issue_token(config: &ServerConfig, uses: u32) -> Result<String, DaemonError> {
    match administer(config, &admin::AdminRequest::IssueToken { uses })? {
        admin::AdminResponse::Token { token } => Ok(token),
        other => Err(unexpected(other)),
    }
}

/// Revokes a device, at once for a running daemon (its next request is refused); see
/// [`issue_token`] for how the daemon is reached.
pub fn revoke(
    config: &ServerConfig,
    device: fedtune_shared::protocol::DeviceId,
) -> Result<(), DaemonError> {
    let request = admin::AdminRequest::Revoke {
        device: device.to_string(),
    };
    match administer(config, &request)? {
        admin::AdminResponse::Revoked { .. } => Ok(()),
        other => Err(unexpected(other)),
    }
}

/// Sends `request` to the daemon serving `config`'s state, or carries it out on the store when
/// none does.
fn administer(
    config: &ServerConfig,
    request: &admin::AdminRequest,
) -> Result<admin::AdminResponse, DaemonError> {
    let response = match admin::request(&config.state_dir, request)? {
        Some(response) => response,
        None => {
            let store = store::Store::open(&config.state_dir.join("store"))?;
            admin::execute(&registry::Registry::new(&store), request)
        }
    };
    match response {
        admin::AdminResponse::Refused { reason } => Err(admin::AdminError::Refused(reason).into()),
        other => Ok(other),
    }
}

fn unexpected(response: admin::AdminResponse) -> DaemonError {
    admin::AdminError::Malformed(format!("unexpected answer {response:?}")).into()
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
