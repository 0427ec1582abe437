//! The daemon's metrics in Prometheus text format, served on a separate local port so that the
//! device-facing QUIC port exposes nothing else.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Labels of refusal counters.
type Reason = Vec<(&'static str, String)>;

/// Every metric the daemon exports.
#[derive(Clone, Default)]
pub struct Metrics {
    /// Rounds aggregated.
    pub rounds_completed: Counter,
    /// The round being trained.
    pub current_round: Gauge,
    /// Open device connections.
    pub connections: Gauge,
    /// Reports stored.
    pub reports_accepted: Counter,
    /// Requests refused, by the error code sent back.
    pub refused: Family<Reason, Counter>,
    /// Reports whose content failed validation, by what failed (each also counts once under
    /// `refused{reason="Invalid"}`).
    pub invalid_reports: Family<Reason, Counter>,
    /// Bytes received from devices (frames and blobs).
    pub bytes_in: Counter,
    /// Bytes sent to devices.
    pub bytes_out: Counter,
    /// Seconds the last aggregation took.
    pub aggregation_seconds: Gauge<f64, AtomicU64>,
    /// Devices enrolled since start.
    pub enrollments: Counter,
}

impl Metrics {
    /// Counts a refusal.
    pub fn refuse(&self, reason: &str) {
        self.refused
            .get_or_create(&vec![("reason", reason.to_string())])
            .inc();
    }

    /// Counts a report that failed validation.
    pub fn invalid_report(&self, kind: &str) {
        self.invalid_reports
            .get_or_create(&vec![("kind", kind.to_string())])
            .inc();
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut registry = Registry::with_prefix("fedtune");
        registry.register(
            "rounds_completed",
            "Rounds aggregated",
            self.rounds_completed.clone(),
        );
        registry.register(
            "current_round",
            "The round being trained",
            self.current_round.clone(),
        );
        registry.register(
            "connections",
            "Open device connections",
            self.connections.clone(),
        );
        registry.register(
            "reports_accepted",
            "Reports stored durably",
            self.reports_accepted.clone(),
        );
        registry.register(
            "refused",
            "Requests and reports refused, by reason",
            self.refused.clone(),
        );
        registry.register(
            "invalid_reports",
            "Reports whose content failed validation, by what failed",
            self.invalid_reports.clone(),
        );
        registry.register(
            "bytes_in",
            "Bytes received from devices",
            self.bytes_in.clone(),
        );
        registry.register("bytes_out", "Bytes sent to devices", self.bytes_out.clone());
        registry.register(
            "aggregation_seconds",
            "Duration of the last aggregation",
            self.aggregation_seconds.clone(),
        );
        registry.register(
            "enrollments",
            "Devices enrolled since start",
            self.enrollments.clone(),
        );
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &registry);
        out
    }
}

/// The metrics endpoint while it serves; [`MetricsEndpoint::stop`] closes its port.
#[derive(Debug)]
pub struct MetricsEndpoint {
    bound: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsEndpoint {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.bound
    }

    /// Stops serving (a scrape under way is cut off) and waits until the port is released.
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// Serves `metrics` on `addr` until [`MetricsEndpoint::stop`]. Any request gets the exposition:
/// the endpoint is one fixed page on a local port, so a minimal HTTP/1.1 answer is written here
/// rather than pulling in an HTTP server stack.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<MetricsEndpoint> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        // Scrapes live in the set so that aborting the endpoint aborts them too.
        let mut scrapes = tokio::task::JoinSet::new();
        loop {
            let (mut socket, _) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of descriptors, typically: back off instead of spinning.
                        tracing::warn!(error = %e, "metrics endpoint accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                },
                Some(_) = scrapes.join_next(), if !scrapes.is_empty() => continue,
            };
            let metrics = metrics.clone();
            scrapes.spawn(async move {
                // Read (and ignore) the request head; 4 KiB is plenty for a scraper's GET.
                let mut buf = [0u8; 4096];
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(5), socket.read(&mut buf))
                        .await;
                let body = metrics.render();
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = socket.write_all(head.as_bytes()).await;
                let _ = socket.write_all(body.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    Ok(MetricsEndpoint { bound, task })
}
