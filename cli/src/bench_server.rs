//! Load benchmark of the daemon: N devices (default 1,000) on N concurrent QUIC connections,
//! one FedKSeed round (K = 4096, τ = 200, so a report carries 200 seeds: 1.4 KB).
//!
//! Runs the real daemon in this process ([`Core::open`], [`Listener::bind`] on 127.0.0.1:0,
//! `serve` on its own multi-thread tokio runtime) and N devices on a second runtime, each with
//! its own Ed25519 key and its own [`Connection`] (the device SDK's: one quinn endpoint, i.e.
//! one UDP socket, per connection). All N connections stay open from the first phase to the
//! last, and every phase sends all N requests at once:
//!
//! 1. connect: N QUIC + TLS 1.3 handshakes;
//! 2. enroll: N enrollments (each consumes a token use and stores a device record: two durable
//!    redb commits);
//! 3. authenticate: N proofs of key over the TLS exporter;
//! 4. poll: N polls, each answered with a signed plan (verified afterwards, outside the timing);
//! 5. report: N valid FedKSeed reports (200 distinct seeds in `0..K`, random finite values,
//!    `samples = τ · batch_size`); each is acknowledged only after it is stored durably (the
//!    report and then the device's record: two durable commits, under the core's lock), and the
//!    N-th closes the round, which the daemon aggregates before answering it.
//!
//! It prints, per phase, the wall time, requests per second, latency percentiles, the process's
//! CPU time and the UDP datagrams the kernel dropped for full receive buffers (machine-wide
//! `RcvbufErrors`); the connections the daemon held (its `fedtune_connections` gauge at the peak
//! and the highest value sampled); the round's aggregation time (`RoundSummary.aggregation_s`
//! from the store and the `fedtune_aggregation_seconds` gauge) and the wall time of closing the
//! round (from the N-th report counted to the next round open: its device-record commit, reading
//! and decoding the reports, aggregating, committing, writing the checkpoint); bytes per report
//! and per plan frame; the cost of one durable commit on this disk and of reading a round's
//! reports; resident memory (before the devices, with all N connections open, after the
//! reports, and the peak, all of one process that holds the daemon and the N devices); threads;
//! and open file descriptors against their limit (the benchmark raises no limit). A failed
//! request is counted and shown, never retried.
//!
//! ```text
//! fedtune bench server                          # 1,000 devices, a table
//! fedtune bench server --devices 100 --json     # one JSON object
//! ```
//!
//! The state folder is a temporary folder (under `TMPDIR`; the fsync cost of that file system
//! shows in the enroll and report phases). The command fails when a request failed, the
//! daemon held fewer than N connections, the round was not aggregated, or the aggregation took
//! 1 s or more.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fedtune_client::connection::Connection;
use fedtune_server::Core;
use fedtune_server::algorithm::RoundSummary;
use fedtune_server::config::{AlgorithmConfig, RoundSettings, ServerConfig};
use fedtune_server::registry::Registry;
use fedtune_server::store::Store;
use fedtune_server::transport::Listener;
use fedtune_shared::peak_memory::{current_rss_bytes, peak_rss_bytes};
use fedtune_shared::protocol::auth::PLAN_LABEL;
use fedtune_shared::protocol::frame::{decode_body, encode};
use fedtune_shared::protocol::{
    Capabilities, DeviceId, Digest, EnrollRequest, LocalStats, Plan, PollRequest, Report,
    ReportPayload, Request, Response, SignedPlan, SigningKey, Task,
};
use fedtune_shared::zo::round::{ClientReport, ZoRunConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

/// The enrollment token issued for the benchmark's devices.
const TOKEN: &str = "load-benchmark";
/// Sequences per local step (a report's samples are τ times this).
const BATCH_SIZE: usize = 1;
/// Durable commits timed on a scratch store to calibrate the disk.
const CALIBRATION_COMMITS: usize = 100;
/// The size of the records committed in the calibration: a 200-seed report's body.
const CALIBRATION_RECORD_BYTES: usize = 1416;
/// How long the benchmark waits for the round to be aggregated after the last report.
/// Client endpoints (UDP sockets) the devices share.
const DEVICE_ENDPOINTS: usize = 8;
/// How long the benchmark waits for the round to close.
const ROUND_WAIT: Duration = Duration::from_secs(120);
/// The acceptance bound on one round's aggregation.
const AGGREGATION_BOUND_S: f64 = 1.0;

/// The FedKSeed run: the paper's defaults (K = 4096, τ = 200).
fn run_config() -> ZoRunConfig {
    ZoRunConfig {
        k: 4096,
        tau: 200,
        ..ZoRunConfig::default()
    }
}

/// The process's user + system CPU time in seconds (`/proc/self/stat`, in clock ticks of
/// 1/100 s, Linux's `USER_HZ`); 0 elsewhere.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which is in parentheses and may hold spaces).
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// Open file descriptors of this process and its soft limit, where Linux tells.
fn file_descriptors() -> (Option<usize>, Option<u64>) {
    let open = std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count());
    let limit = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("Max open files"))?;
            line.split_whitespace().nth(3)?.parse().ok()
        });
    (open, limit)
}

/// The kernel's count of UDP datagrams dropped because a socket's receive buffer was full
/// (`RcvbufErrors` in `/proc/net/snmp`, for the whole machine); 0 where Linux does not tell.
fn udp_receive_drops() -> u64 {
    let Ok(snmp) = std::fs::read_to_string("/proc/net/snmp") else {
        return 0;
    };
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// Threads of this process, where Linux tells.
fn threads() -> Option<usize> {
    std::fs::read_dir("/proc/self/task").ok().map(|d| d.count())
}

/// The value of the sample `name` (no labels) in a Prometheus text exposition.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .find_map(|value| value.trim().parse().ok())
}

/// What one phase measured.
struct PhaseStats {
    name: &'static str,
    ok: usize,
    failed: usize,
    wall_s: f64,
    cpu_s: f64,
    /// UDP datagrams the kernel dropped for full receive buffers during the phase.
    udp_drops: u64,
    /// Latencies of the successful requests, sorted, seconds.
    latencies: Vec<f64>,
    /// The first few distinct errors.
    errors: Vec<String>,
}

impl PhaseStats {
    fn percentile(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[i]
    }

    fn per_second(&self) -> f64 {
        self.ok as f64 / self.wall_s.max(1e-9)
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "ok": self.ok,
            "failed": self.failed,
            "wall_s": self.wall_s,
            "per_second": self.per_second(),
            "p50_ms": self.percentile(0.5) * 1e3,
            "p99_ms": self.percentile(0.99) * 1e3,
            "max_ms": self.percentile(1.0) * 1e3,
            "cpu_s": self.cpu_s,
            "udp_receive_drops": self.udp_drops,
            "errors": self.errors,
        })
    }
}

/// Runs `work` on every item at once (one task each) and waits for all of them. Items whose
/// work failed, or that are `None` because an earlier phase failed for them, give `None`.
async fn phase<I, T, F, Fut>(
    name: &'static str,
    items: Vec<Option<I>>,
    work: F,
) -> (PhaseStats, Vec<Option<T>>)
where
    I: Send + 'static,
    T: Send + 'static,
    F: Fn(I) -> Fut,
    Fut: std::future::Future<Output = Result<T, String>> + Send + 'static,
{
    let cpu = cpu_seconds();
    let drops = udp_receive_drops();
    let start = Instant::now();
    let handles: Vec<_> = items
        .into_iter()
        .map(|item| {
            item.map(|item| {
                let fut = work(item);
                tokio::spawn(async move {
                    let t = Instant::now();
                    let result = fut.await;
                    (t.elapsed(), result)
                })
            })
        })
        .collect();
    let mut out = Vec::with_capacity(handles.len());
    let mut stats = PhaseStats {
        name,
        ok: 0,
        failed: 0,
        wall_s: 0.0,
        cpu_s: 0.0,
        udp_drops: 0,
        latencies: Vec::new(),
        errors: Vec::new(),
    };
    for handle in handles {
        let result = match handle {
            None => Err("skipped: an earlier phase failed for this device".to_string()),
            Some(handle) => match handle.await {
                Ok((latency, Ok(value))) => {
                    stats.latencies.push(latency.as_secs_f64());
                    Ok(value)
                }
                Ok((_, Err(e))) => Err(e),
                Err(e) => Err(format!("task failed: {e}")),
            },
        };
        match result {
            Ok(value) => {
                stats.ok += 1;
                out.push(Some(value));
            }
            Err(e) => {
                stats.failed += 1;
                if stats.errors.len() < 5 && !stats.errors.contains(&e) {
                    stats.errors.push(e);
                }
                out.push(None);
            }
        }
    }
    stats.wall_s = start.elapsed().as_secs_f64();
    stats.cpu_s = cpu_seconds() - cpu;
    stats.udp_drops = udp_receive_drops().saturating_sub(drops);
    stats.latencies.sort_by(f64::total_cmp);
    (stats, out)
}

/// What the watcher thread saw of the daemon's metrics (lock-free atomics, sampled every
/// 200 µs, so the core's lock is never touched) and of the process's memory.
#[derive(Default)]
struct Watch {
    max_connections: i64,
    /// The highest resident memory sampled (every 20 ms).
    max_rss: Option<u64>,
    /// When the N-th report was counted as stored.
    all_stored: Option<Instant>,
    /// When the round was counted as completed.
    round_done: Option<Instant>,
}

fn spawn_watcher(
    core: Arc<Core>,
    devices: u64,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Watch> {
    std::thread::spawn(move || {
        let metrics = core.metrics();
        let mut watch = Watch::default();
        let mut last_rss = Instant::now() - Duration::from_secs(1);
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now.duration_since(last_rss) >= Duration::from_millis(20) {
                last_rss = now;
                watch.max_rss = watch.max_rss.max(current_rss_bytes());
            }
            watch.max_connections = watch.max_connections.max(metrics.connections.get());
            if watch.all_stored.is_none() && metrics.reports_accepted.get() >= devices {
                watch.all_stored = Some(now);
            }
            if watch.round_done.is_none() && metrics.rounds_completed.get() >= 1 {
                watch.round_done = Some(now);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        watch
    })
}

/// A valid FedKSeed report for `plan`: τ distinct seeds in `0..K`, ascending, with random finite
/// accumulated gradients, and `samples = τ · batch_size` in both the payload and the stats.
fn fedkseed_report(plan: &Plan, run: &ZoRunConfig, rng: &mut ChaCha8Rng) -> Report {
    let seeds = run.tau.min(run.k) as usize;
    let mut indices: Vec<u32> = rand::seq::index::sample(rng, run.k as usize, seeds)
        .into_iter()
        .map(|i| i as u32)
        .collect();
    indices.sort_unstable();
    let seed_grads = indices
        .into_iter()
        .map(|s| (s, rng.random_range(-1.0f32..1.0)))
        .collect();
    let samples = run.tau as u64 * BATCH_SIZE as u64;
    Report {
        run_id: plan.run_id,
        round: plan.round,
        stats: LocalStats {
            samples,
            mean_loss: rng.random_range(2.0f32..4.0),
            first_loss: 4.0,
            loss_after: 3.0,
            wall_s: 1.0,
            peak_rss_bytes: None,
        },
        payload: ReportPayload::FedKSeed(ClientReport {
            round: plan.round,
            seed_grads,
            step_grads: Vec::new(),
            samples,
        }),
    }
}

/// The daemon's configuration: one round of `devices` reports, every device selected.
fn server_config(
    state_dir: &std::path::Path,
    model: &std::path::Path,
    devices: usize,
) -> ServerConfig {
    let algorithm = AlgorithmConfig::Fedkseed {
        run: run_config(),
        batch_size: BATCH_SIZE,
    };
    ServerConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        rounds: RoundSettings::everyone(devices, 1, 3600.0),
        ..ServerConfig::new(state_dir, model, algorithm)
    }
}

/// Mean seconds of one durable redb commit on the benchmark's file system: a scratch store
/// gets records the size of a report under distinct keys, one commit each.
fn commit_seconds(dir: &std::path::Path, record_bytes: usize) -> Result<f64, String> {
    let store = Store::open(dir).map_err(|e| e.to_string())?;
    let record = vec![0x5a; record_bytes];
    let start = Instant::now();
    for i in 0..CALIBRATION_COMMITS {
        let mut key = [0u8; 16];
        key[..8].copy_from_slice(&(i as u64).to_le_bytes());
        store.put_device(key, &record).map_err(|e| e.to_string())?;
    }
    Ok(start.elapsed().as_secs_f64() / CALIBRATION_COMMITS as f64)
}

/// Runs the benchmark with `n` devices; prints a table, or one JSON object with `as_json`.
pub fn run(n: usize, as_json: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        n > 0 && n <= u32::MAX as usize,
        "--devices must be in 1..=2^32-1"
    );
    let run = run_config();
    let dir = tempfile::tempdir().expect("temporary folder");
    // The daemon only digests the model; any small file will do.
    let model = dir.path().join("model.bin");
    let mut model_bytes = vec![0u8; 1 << 20];
    ChaCha8Rng::seed_from_u64(1).fill(&mut model_bytes[..]);
    std::fs::write(&model, &model_bytes).expect("write the model file");
    let commit_s = commit_seconds(&dir.path().join("calibration"), CALIBRATION_RECORD_BYTES)
        .expect("calibration store");

    let server_rt = fedtune_server::runtime().expect("daemon runtime");
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("devices")
        .build()
        .expect("device runtime");

    let config = server_config(&dir.path().join("server"), &model, n);
    let core = Arc::new(Core::open(config).expect("open the daemon"));
    Registry::new(core.store())
        .add_token(TOKEN, n as u32)
        .expect("issue the token");
    let listener = {
        let _guard = server_rt.enter();
        Listener::bind(core.clone(), SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind")
    };
    let addr = listener.local_addr().expect("bound address");
    let identity = core.keys().identity(addr);
    let cert = Arc::new(identity.certificate_der().expect("certificate"));
    let plan_key = identity.signing_key().expect("plan key");
    let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    let server_task = server_rt.spawn(listener.serve(async move {
        let _ = shutdown_rx.await;
    }));

    let stop = Arc::new(AtomicBool::new(false));
    let watcher = spawn_watcher(core.clone(), n as u64, stop.clone());
    let rss_before = current_rss_bytes();

    let keygen_start = Instant::now();
    let keys: Vec<Arc<SigningKey>> = (0..n)
        .map(|_| Arc::new(SigningKey::generate().expect("device key")))
        .collect();
    let keygen_s = keygen_start.elapsed().as_secs_f64();

    let outcome = client_rt.block_on(async {
        let mut phases = Vec::new();

        // The devices share a few client endpoints (UDP sockets), as a host of many virtual
        // devices does: an endpoint per device would measure quinn's per-endpoint receive
        // buffers (about 2 MiB each) instead of the daemon.
        let config =
            fedtune_shared::transport::tls::client_config(&cert).expect("client TLS configuration");
        let endpoints: Vec<quinn::Endpoint> = (0..DEVICE_ENDPOINTS)
            .map(|_| {
                quinn::Endpoint::client("127.0.0.1:0".parse().expect("loopback"))
                    .expect("client endpoint")
            })
            .collect();
        let (stats, connections) = phase("connect", (0..n).map(Some).collect(), |i| {
            let endpoint = endpoints[i % endpoints.len()].clone();
            let config = config.clone();
            async move {
                Connection::open_on(&endpoint, addr, config)
                    .await
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            }
        })
        .await;
        phases.push(stats);

        let items = connections
            .iter()
            .zip(&keys)
            .map(|(c, k)| c.clone().map(|c| (c, k.clone())))
            .collect();
        let (stats, enrolled) = phase("enroll", items, |(connection, key)| async move {
            let request = Request::Enroll(EnrollRequest {
                token: TOKEN.into(),
                public_key: key.public_key(),
                capabilities: Capabilities {
                    platform: "load-bench".into(),
                    backend: "none".into(),
                    memory_bytes: 0,
                    base_model: Digest([0; 32]),
                },
            });
            match connection.request(&request).await {
                Ok(Response::Enrolled { device }) if device == key.public_key().device_id() => {
                    Ok((connection, key, device))
                }
                Ok(other) => Err(format!("unexpected answer {other:?}")),
                Err(e) => Err(e.to_string()),
            }
        })
        .await;
        phases.push(stats);

        let (stats, authenticated) = phase(
            "authenticate",
            enrolled,
            |(connection, key, device)| async move {
                connection
                    .authenticate(device, &key)
                    .await
                    .map(|()| (connection, device))
                    .map_err(|e| e.to_string())
            },
        )
        .await;
        phases.push(stats);
        // Every handshake has completed on the daemon's side once its device is authenticated.
        let connections_after_auth =
            sample(&core.metrics().render(), "fedtune_connections").unwrap_or(0.0);
        let rss_connected = current_rss_bytes();

        let (stats, polled) = phase("poll", authenticated, |(connection, device)| async move {
            match connection
                .request(&Request::Poll(PollRequest { last_seen_round: 0 }))
                .await
            {
                Ok(Response::Plan(signed)) => Ok((connection, device, signed)),
                Ok(other) => Err(format!("expected a plan, got {other:?}")),
                Err(e) => Err(e.to_string()),
            }
        })
        .await;
        phases.push(stats);

        // What a device does with its plan, outside the timing: check the signature, then
        // "train" (here: draw the report).
        let mut plan_bytes = None;
        let mut report_bytes = None;
        let mut plan_errors = 0usize;
        let reports: Vec<Option<(Arc<Connection>, Report)>> = polled
            .into_iter()
            .enumerate()
            .map(|(i, entry)| {
                let (connection, device, signed): (Arc<Connection>, DeviceId, SignedPlan) = entry?;
                plan_bytes.get_or_insert_with(|| {
                    encode(&Response::Plan(signed.clone())).map_or(0, |f| f.len())
                });
                let plan = match signed.verify(&plan_key, PLAN_LABEL) {
                    Ok(plan) if plan.device == device => plan,
                    _ => {
                        plan_errors += 1;
                        return None;
                    }
                };
                let Task::FedKSeed { plan: inner, .. } = &plan.task else {
                    plan_errors += 1;
                    return None;
                };
                let mut rng = ChaCha8Rng::seed_from_u64(i as u64);
                let report = fedkseed_report(&plan, &inner.config, &mut rng);
                report_bytes.get_or_insert_with(|| {
                    encode(&Request::Report(report.clone())).map_or(0, |f| f.len())
                });
                Some((connection, report))
            })
            .collect();

        let (stats, _) = phase("report", reports, |(connection, report)| async move {
            match connection.request(&Request::Report(report)).await {
                Ok(Response::Accepted {
                    duplicate: false, ..
                }) => Ok(()),
                Ok(other) => Err(format!("expected a fresh acceptance, got {other:?}")),
                Err(e) => Err(e.to_string()),
            }
        })
        .await;
        phases.push(stats);

        // The peak: every connection is still open here.
        let rendered = core.metrics().render();
        let (fds_open, fds_limit) = file_descriptors();
        let threads_at_peak = threads();
        let rss_peak_now = current_rss_bytes();
        let waited = Instant::now();
        while core.metrics().rounds_completed.get() < 1 && waited.elapsed() < ROUND_WAIT {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let rendered_after = core.metrics().render();

        let open: Vec<Arc<Connection>> = connections.into_iter().flatten().collect();
        let close = async {
            let handles: Vec<_> = open
                .into_iter()
                .filter_map(Arc::into_inner)
                .map(|c| tokio::spawn(c.close()))
                .collect();
            for h in handles {
                let _ = h.await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(20), close).await;

        Outcome {
            phases,
            connections_after_auth,
            connections_at_peak: sample(&rendered, "fedtune_connections").unwrap_or(0.0),
            aggregation_gauge: sample(&rendered_after, "fedtune_aggregation_seconds"),
            bytes_in: sample(&rendered_after, "fedtune_bytes_in_total"),
            bytes_out: sample(&rendered_after, "fedtune_bytes_out_total"),
            plan_bytes,
            report_bytes,
            plan_errors,
            rss_connected,
            rss_peak_now,
            fds_open,
            fds_limit,
            threads_at_peak,
        }
    });

    stop.store(true, Ordering::Relaxed);
    let watch = watcher.join().expect("watcher");
    let _ = shutdown_tx.send(());
    server_rt.block_on(async {
        let _ = tokio::time::timeout(Duration::from_secs(20), server_task).await;
    });

    let summary: Option<RoundSummary> = core
        .store()
        .round_summaries()
        .ok()
        .and_then(|s| s.into_iter().find(|(round, _)| *round == 1))
        .and_then(|(_, bytes)| decode_body(&bytes).ok());
    // What `Core::report` reads, under the core's lock, on every report before storing it.
    let mut stored = 0;
    let mut read_reports_s = f64::INFINITY;
    for _ in 0..5 {
        let read_start = Instant::now();
        stored = core.store().reports(1).map(|r| r.len()).unwrap_or(0);
        read_reports_s = read_reports_s.min(read_start.elapsed().as_secs_f64());
    }
    let round_close_s = match (watch.all_stored, watch.round_done) {
        (Some(a), Some(b)) => Some(b.saturating_duration_since(a).as_secs_f64()),
        _ => None,
    };
    // VmHWM is updated lazily (per-thread counters), so the sampled maximum can exceed it.
    let peak_rss = peak_rss_bytes()
        .max(watch.max_rss)
        .max(outcome.rss_peak_now);

    let failed: usize =
        outcome.phases.iter().map(|p| p.failed).sum::<usize>() + outcome.plan_errors;
    let held = outcome.connections_at_peak as usize;
    let aggregation_s = summary.as_ref().map(|s| s.aggregation_s);
    let pass_connections = held >= n && watch.max_connections as usize >= n;
    let pass_aggregation = aggregation_s.is_some_and(|s| s < AGGREGATION_BOUND_S);
    let pass = failed == 0 && pass_connections && pass_aggregation;

    if as_json {
        let phases: serde_json::Map<String, serde_json::Value> = outcome
            .phases
            .iter()
            .map(|p| (p.name.to_string(), p.json()))
            .collect();
        let value = json!({
            "devices": n,
            "cpus": std::thread::available_parallelism().map_or(0, |p| p.get()),
            "k": run.k,
            "tau": run.tau,
            "keygen_s": keygen_s,
            "phases": phases,
            "plan_errors": outcome.plan_errors,
            "connections_after_auth": outcome.connections_after_auth,
            "connections_at_peak": outcome.connections_at_peak,
            "connections_max_sampled": watch.max_connections,
            "reports_stored": stored,
            "round_summary": summary.as_ref().map(|s| json!({
                "round": s.round,
                "reports": s.reports,
                "samples": s.samples,
                "mean_loss": s.mean_loss,
                "aggregation_s": s.aggregation_s,
            })),
            "aggregation_seconds_gauge": outcome.aggregation_gauge,
            "round_close_wall_s": round_close_s,
            "report_frame_bytes": outcome.report_bytes,
            "plan_frame_bytes": outcome.plan_bytes,
            "bytes_in_total": outcome.bytes_in,
            "bytes_out_total": outcome.bytes_out,
            "durable_commit_ms": commit_s * 1e3,
            "read_round_reports_ms": read_reports_s * 1e3,
            "rss_before_devices_bytes": rss_before,
            "rss_connected_bytes": outcome.rss_connected,
            "rss_after_reports_bytes": outcome.rss_peak_now,
            "peak_rss_bytes": peak_rss,
            "fds_open_at_peak": outcome.fds_open,
            "fds_limit": outcome.fds_limit,
            "threads_at_peak": outcome.threads_at_peak,
            "pass": pass,
        });
        println!("{value}");
    } else {
        let mib = |bytes: Option<u64>| {
            bytes.map_or("n/a".into(), |b| {
                format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
            })
        };
        let or_na = |v: Option<String>| v.unwrap_or_else(|| "n/a".into());
        println!(
            "fedtune-server load: {n} devices, FedKSeed K={} tau={}, {} CPUs, state in {}",
            run.k,
            run.tau,
            std::thread::available_parallelism().map_or(0, |p| p.get()),
            dir.path().display()
        );
        println!(
            "{:<13} {:>10} {:>8} {:>8} {:>9} {:>9} {:>9} {:>6} {:>9}",
            "phase",
            "ok/failed",
            "wall s",
            "req/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "cpu s",
            "udp drops"
        );
        for p in &outcome.phases {
            println!(
                "{:<13} {:>10} {:>8.3} {:>8.1} {:>9.2} {:>9.2} {:>9.2} {:>6.2} {:>9}",
                p.name,
                format!("{}/{}", p.ok, p.failed),
                p.wall_s,
                p.per_second(),
                p.percentile(0.5) * 1e3,
                p.percentile(0.99) * 1e3,
                p.percentile(1.0) * 1e3,
                p.cpu_s,
                p.udp_drops
            );
            for e in &p.errors {
                println!("    error: {e}");
            }
        }
        let wall = |name: &str| {
            outcome
                .phases
                .iter()
                .find(|p| p.name == name)
                .map_or(0.0, |p| p.wall_s)
        };
        let rows: Vec<(&str, String)> = vec![
            (
                "key generation (setup, untimed)",
                format!("{keygen_s:.3} s"),
            ),
            (
                "connect + authenticate",
                format!("{:.3} s", wall("connect") + wall("authenticate")),
            ),
            (
                "plans failing verification",
                outcome.plan_errors.to_string(),
            ),
            (
                "connections held (gauge)",
                format!(
                    "{} after authenticate, {} at the peak, {} highest sampled",
                    outcome.connections_after_auth,
                    outcome.connections_at_peak,
                    watch.max_connections
                ),
            ),
            ("reports stored for round 1", stored.to_string()),
            (
                "aggregation_s (RoundSummary)",
                or_na(summary.as_ref().map(|s| {
                    format!(
                        "{:.6} s for {} reports, {} samples, mean loss {:.3}",
                        s.aggregation_s, s.reports, s.samples, s.mean_loss
                    )
                })),
            ),
            (
                "fedtune_aggregation_seconds",
                or_na(outcome.aggregation_gauge.map(|v| format!("{v:.6} s"))),
            ),
            (
                "round close (N-th report stored -> next round open)",
                or_na(round_close_s.map(|v| format!("{v:.3} s"))),
            ),
            (
                "bytes per report / plan frame",
                format!(
                    "{} / {}",
                    or_na(outcome.report_bytes.map(|b| b.to_string())),
                    or_na(outcome.plan_bytes.map(|b| b.to_string()))
                ),
            ),
            (
                "bytes in / out (daemon counters)",
                format!(
                    "{} / {}",
                    outcome.bytes_in.unwrap_or(0.0),
                    outcome.bytes_out.unwrap_or(0.0)
                ),
            ),
            (
                "one durable redb commit of 1.4 KB (scratch store)",
                format!("{:.2} ms", commit_s * 1e3),
            ),
            (
                "Store::reports(1) with all reports stored",
                format!("{:.2} ms", read_reports_s * 1e3),
            ),
            ("RSS before the devices", mib(rss_before)),
            (
                "RSS with all connections authenticated",
                mib(outcome.rss_connected),
            ),
            ("RSS after the reports", mib(outcome.rss_peak_now)),
            ("peak RSS (daemon + devices, one process)", mib(peak_rss)),
            (
                "threads at the peak",
                or_na(outcome.threads_at_peak.map(|t| t.to_string())),
            ),
            (
                "file descriptors at the peak / limit",
                format!(
                    "{} / {}",
                    or_na(outcome.fds_open.map(|v| v.to_string())),
                    or_na(outcome.fds_limit.map(|v| v.to_string()))
                ),
            ),
        ];
        for (name, value) in rows {
            println!("{name:<52} {value}");
        }
        println!(
            "acceptance: {} ({n} connections held: {}; aggregation < {AGGREGATION_BOUND_S} s: {}; failed requests: {failed})",
            if pass { "PASS" } else { "FAIL" },
            if pass_connections { "yes" } else { "no" },
            if pass_aggregation { "yes" } else { "no" },
        );
    }
    drop(core);
    client_rt.shutdown_timeout(Duration::from_secs(5));
    server_rt.shutdown_timeout(Duration::from_secs(5));
    // `exit` runs no destructors: the temporary folder goes first.
    drop(dir);
    anyhow::ensure!(
        pass,
        "the load benchmark failed its acceptance (see the table)"
    );
    Ok(())
}

/// What the device side measured.
struct Outcome {
    phases: Vec<PhaseStats>,
    connections_after_auth: f64,
    connections_at_peak: f64,
    aggregation_gauge: Option<f64>,
    bytes_in: Option<f64>,
    bytes_out: Option<f64>,
    plan_bytes: Option<usize>,
    report_bytes: Option<usize>,
    plan_errors: usize,
    rss_connected: Option<u64>,
    rss_peak_now: Option<u64>,
    fds_open: Option<usize>,
    fds_limit: Option<u64>,
    threads_at_peak: Option<usize>,
}
