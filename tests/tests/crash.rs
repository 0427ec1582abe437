//! Crashes: the daemon is killed with SIGKILL in the middle of a round (after some reports were
//! acknowledged) and restarted; a device is killed between writing its report and hearing the
//! acknowledgement and restarted. In both cases every acknowledged report counts exactly once and
//! the run ends with the model of an uninterrupted run.
//!
//! The daemon runs as a real separate process: this test binary re-executes itself to run the
//! ignored `daemon_process` test, which serves the configuration named by an environment variable.
//!
//! A stopped daemon (`fedtune_server::run_until`, the test server) has closed its store by the
//! time it returns, even with devices in the middle of requests, so a restart in the same process
//! opens it at once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fedtune_client::connection::Connection;
use fedtune_client::{Event, Outcome};
use fedtune_server::ServerConfig;
use fedtune_server::algorithm::RoundSummary;
use fedtune_server::registry::Registry;
use fedtune_server::store::Store;
use fedtune_shared::protocol::blob::model_digest;
use fedtune_shared::protocol::frame::decode_body;
use fedtune_shared::protocol::{Capabilities, DeviceId, EnrollRequest, Request, SigningKey};
use fedtune_shared::transport::identity::ServerIdentity;
use fedtune_shared::zo::round::ZoServer;
use fedtune_tests::network::*;

const CONFIG_VAR: &str = "FEDTUNE_DAEMON_CONFIG";

#[test]
#[ignore = "the daemon process of the crash tests; runs only when they start it"]
fn daemon_process() {
    let Ok(path) = std::env::var(CONFIG_VAR) else {
        return;
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    let config: ServerConfig = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(fedtune_server::run(config)).unwrap();
}

/// Starts the daemon process and waits until it serves (its identity file appears).
fn start_daemon(config_path: &Path, state_dir: &Path) -> (Child, ServerIdentity) {
    let identity_path = state_dir.join("server-identity.json");
    let _ = std::fs::remove_file(&identity_path);
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "daemon_process", "--ignored", "--nocapture"])
        .env(CONFIG_VAR, config_path)
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !identity_path.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(50));
    (child, ServerIdentity::load(&identity_path).unwrap())
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits for `event` on `rx`.
async fn wait_for(rx: &mpsc::Receiver<Event>, event: Event) {
    let start = Instant::now();
    loop {
        match rx.try_recv() {
            Ok(e) if e == event => return,
            Ok(_) => {}
            Err(mpsc::TryRecvError::Empty) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(e) => panic!("{e}"),
        }
        assert!(start.elapsed() < Duration::from_secs(120), "no {event:?}");
    }
}

fn client_with_events(
    identity: ServerIdentity,
    dir: &Path,
    model: &Path,
    data: Vec<Vec<u32>>,
) -> (fedtune_client::Client, mpsc::Receiver<Event>) {
    client_with_hold(identity, dir, model, data, None)
}

/// A client whose event listener, on `hold`, stays in the callback for a while: the client
/// task cannot move on, so the test can kill it at exactly that point.
fn client_with_hold(
    identity: ServerIdentity,
    dir: &Path,
    model: &Path,
    data: Vec<Vec<u32>>,
    hold: Option<Event>,
) -> (fedtune_client::Client, mpsc::Receiver<Event>) {
    let (tx, rx) = mpsc::channel();
    let digest = model_digest(model).unwrap();
    let mut config = client_config(identity, dir, digest, None);
    let tx = std::sync::Mutex::new(tx);
    config.listener = std::sync::Arc::new(move |e: Event| {
        let held = hold.as_ref() == Some(&e);
        let _ = tx.lock().unwrap().send(e);
        if held {
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    let (client, _) = fedtune_client::Client::new(
        config,
        load_model(model),
        fedtune_client::trainer::TrainingData {
            sequences: data,
            ..Default::default()
        },
    )
    .unwrap();
    (client, rx)
}

/// The uninterrupted run's seed history, in process, for devices `data` (in id order).
fn reference_history(
    model: &Path,
    data: &BTreeMap<DeviceId, Vec<Vec<u32>>>,
    rounds: u64,
) -> Vec<u32> {
    let (server, _) = fedkseed_reference(model, data, rounds);
    server.history().iter().map(|v| v.to_bits()).collect()
}

fn stored_outcome(state_dir: &Path) -> (Vec<u32>, Vec<RoundSummary>) {
    let store = Store::open(&state_dir.join("store")).unwrap();
    let served: ZoServer = decode_body(&store.state().unwrap().unwrap()).unwrap();
    let summaries = store
        .round_summaries()
        .unwrap()
        .into_iter()
        .map(|(_, bytes)| decode_body(&bytes).unwrap())
        .collect();
    (
        served.history().iter().map(|v| v.to_bits()).collect(),
        summaries,
    )
}

fn sigterm(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the daemon ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_killed_mid_round_resumes_and_counts_every_acknowledged_report_once() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_folder(dir.path(), 5);
    let state_dir = dir.path().join("server");
    let (clients, rounds) = (3usize, 3u64);
    let mut config = server_config(&state_dir, &model, clients, rounds);
    config.listen.set_port(free_udp_port());
    let config_path: PathBuf = dir.path().join("server.json");
    std::fs::write(&config_path, serde_json::to_vec(&config).unwrap()).unwrap();
    // The operator issues a token while the daemon is stopped.
    {
        std::fs::create_dir_all(&state_dir).unwrap();
        let store = Store::open(&state_dir.join("store")).unwrap();
        Registry::new(&store).add_token(TOKEN, 10).unwrap();
    }

    let (mut daemon, identity) = start_daemon(&config_path, &state_dir);
    let mut data = BTreeMap::new();
    let mut tasks = Vec::new();
    let mut receivers = Vec::new();
    for c in 0..2 {
        let sequences = counting((c * 7)..(c * 7 + 8), 10);
        let (mut client, rx) = client_with_events(
            identity.clone(),
            &dir.path().join(format!("c{c}")),
            &model,
            sequences.clone(),
        );
        data.insert(client.enroll(TOKEN).await.unwrap(), sequences);
        tasks.push(tokio::spawn(async move { client.run().await }));
        receivers.push(rx);
    }
    // Two of three reports of round 1 are acknowledged: kill the daemon.
    for rx in &receivers {
        wait_for(
            rx,
            Event::Reported {
                round: 1,
                duplicate: false,
            },
        )
        .await;
    }
    daemon.kill().unwrap();
    daemon.wait().unwrap();

    let (mut daemon, identity) = start_daemon(&config_path, &state_dir);
    let sequences = counting(14..22, 10);
    let (mut late, _rx) =
        client_with_events(identity, &dir.path().join("c2"), &model, sequences.clone());
    data.insert(late.enroll(TOKEN).await.unwrap(), sequences);
    tasks.push(tokio::spawn(async move { late.run().await }));
    for task in tasks {
        assert_eq!(
            task.await.unwrap().unwrap(),
            Outcome::Finished { last_round: rounds }
        );
    }
    sigterm(&mut daemon);

    let (history, summaries) = stored_outcome(&state_dir);
    assert_eq!(summaries.len(), rounds as usize);
    for s in &summaries {
        assert_eq!(
            s.reports, clients,
            "round {} counted {} reports",
            s.round, s.reports
        );
    }
    assert_eq!(
        history,
        reference_history(&model, &data, rounds),
        "the restarted run ended elsewhere"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_killed_before_its_acknowledgement_resends_and_counts_once() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_folder(dir.path(), 5);
    let state_dir = dir.path().join("server");
    let (clients, rounds) = (2usize, 2u64);
    let server = TestServer::start(server_config(&state_dir, &model, clients, rounds));
    let identity = server.identity();

    let mut data = BTreeMap::new();
    let steady_data = counting(0..8, 10);
    let (mut steady, _rx) = client_with_events(
        identity.clone(),
        &dir.path().join("steady"),
        &model,
        steady_data.clone(),
    );
    data.insert(steady.enroll(TOKEN).await.unwrap(), steady_data);
    let steady = tokio::spawn(async move { steady.run().await });

    let victim_dir = dir.path().join("victim");
    let victim_data = counting(20..28, 10);
    let (mut victim, rx) = client_with_hold(
        identity.clone(),
        &victim_dir,
        &model,
        victim_data.clone(),
        Some(Event::ReportReady { round: 1 }),
    );
    let victim_id = victim.enroll(TOKEN).await.unwrap();
    data.insert(victim_id, victim_data.clone());
    let task = tokio::spawn(async move { victim.run().await });
    // Killed right after its report is on disk, while it is being sent.
    wait_for(&rx, Event::ReportReady { round: 1 }).await;
    task.abort();
    let _ = task.await;

    let (mut restarted, rx) = client_with_events(identity, &victim_dir, &model, victim_data);
    assert_eq!(
        restarted.state().pending.as_ref().map(|r| r.round),
        Some(1),
        "the report was not kept"
    );
    let outcome = restarted.run().await.unwrap();
    assert_eq!(outcome, Outcome::Finished { last_round: rounds });
    let resent: Vec<Event> = rx
        .try_iter()
        .filter(|e| matches!(e, Event::Reported { round: 1, .. }))
        .collect();
    assert_eq!(resent.len(), 1, "{resent:?}");
    assert_eq!(
        steady.await.unwrap().unwrap(),
        Outcome::Finished { last_round: rounds }
    );
    server.stop().await;

    let (history, summaries) = stored_outcome(&state_dir);
    assert!(
        summaries.iter().all(|s| s.reports == clients),
        "{summaries:?}"
    );
    assert_eq!(history, reference_history(&model, &data, rounds));
}

/// A client that enrolls a fresh key after another as fast as the server answers, until the
/// server is gone: each enrollment is a store commit on the daemon's blocking pool, so commits
/// are in flight whenever the server stops. Returns how many were answered.
fn busy_enroller(
    identity: ServerIdentity,
    model: &Path,
    stream: u8,
) -> tokio::task::JoinHandle<u32> {
    let digest = model_digest(model).unwrap();
    tokio::spawn(async move {
        let cert = identity.certificate_der().unwrap();
        let Ok(connection) = Connection::open(identity.address, &cert).await else {
            return 0;
        };
        let mut answered = 0u32;
        loop {
            let mut seed = [stream; 32];
            seed[..4].copy_from_slice(&answered.to_le_bytes());
            let key = SigningKey::from_seed(&seed).unwrap();
            let enroll = Request::Enroll(EnrollRequest {
                token: TOKEN.into(),
                public_key: key.public_key(),
                capabilities: Capabilities {
                    base_model: digest,
                    ..Capabilities::default()
                },
            });
            match connection.request(&enroll).await {
                Ok(_) | Err(fedtune_shared::transport::TransportError::Refused(_)) => answered += 1,
                Err(_) => return answered,
            }
        }
    })
}

/// Enrollments the busy clients may make.
const ENROLLMENTS: u32 = 1_000_000;

/// A daemon serving in this process, started one of two ways.
enum Serving {
    /// `fedtune_server::run_until`, what `fedtune server` runs.
    Run(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<Result<(), fedtune_server::DaemonError>>,
    ),
    /// The other tests' server.
    Test(TestServer),
}

impl Serving {
    async fn start(config: ServerConfig, through_run: bool) -> (Self, ServerIdentity) {
        if !through_run {
            let server = TestServer::start(config);
            Registry::new(server.core.store())
                .add_token(TOKEN, ENROLLMENTS)
                .unwrap();
            let identity = server.identity();
            return (Self::Test(server), identity);
        }
        let state_dir = config.state_dir.clone();
        {
            std::fs::create_dir_all(&state_dir).unwrap();
            let store = Store::open(&state_dir.join("store")).unwrap();
            Registry::new(&store).add_token(TOKEN, ENROLLMENTS).unwrap();
        }
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let daemon = tokio::spawn(fedtune_server::run_until(config, async move {
            let _ = rx.await;
        }));
        let identity_path = state_dir.join("server-identity.json");
        let start = Instant::now();
        while !identity_path.exists() {
            assert!(start.elapsed() < Duration::from_secs(60), "no identity");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (
            Self::Run(tx, daemon),
            ServerIdentity::load(&identity_path).unwrap(),
        )
    }

    async fn stop(self) {
        match self {
            Self::Run(tx, daemon) => {
                let _ = tx.send(());
                daemon.await.unwrap().unwrap();
            }
            Self::Test(server) => server.stop().await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_daemon_has_closed_its_store() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_folder(dir.path(), 5);
    let mut slowest = 0.0f64;
    for attempt in 0..30u8 {
        let state_dir = dir.path().join(format!("server{attempt}"));
        let through_run = attempt % 2 == 0;
        let (serving, identity) =
            Serving::start(server_config(&state_dir, &model, 2, 1), through_run).await;
        // The first attempts stop with requests in flight, the others with no connection at
        // all (then nothing slows the shutdown down: only the deadline ticker is running).
        let busy = attempt < 6;
        let clients: Vec<_> = (0..if busy { 8 } else { 0 })
            .map(|c| busy_enroller(identity.clone(), &model, 10 * attempt + c + 1))
            .collect();
        tokio::time::sleep(Duration::from_millis(if busy { 200 } else { 20 })).await;
        let stopping = Instant::now();
        serving.stop().await;
        let stop_s = stopping.elapsed().as_secs_f64();
        // Right away: no task of the stopped daemon may still hold the store.
        let reopened = Store::open(&state_dir.join("store"));
        assert!(
            reopened.is_ok(),
            "attempt {attempt} ({}): the store is still open after the daemon returned: {:?}",
            if through_run {
                "run_until"
            } else {
                "test server"
            },
            reopened.err()
        );
        assert!(stop_s < 5.0, "stopping took {stop_s:.2} s");
        slowest = slowest.max(stop_s);
        let mut answered = 0;
        for client in clients {
            answered += client.await.unwrap();
        }
        assert!(
            answered > 0 || !busy,
            "attempt {attempt}: no request was answered"
        );
    }
    eprintln!("30 stops, the slowest in {slowest:.3} s");
}

/// A state folder whose records another protocol version wrote is refused at start with what
/// to do, instead of failing on the first record it cannot decode.
#[test]
fn a_run_recorded_by_another_protocol_version_is_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_folder(dir.path(), 5);
    let config = server_config(&dir.path().join("server"), &model, 1, 3);
    drop(fedtune_server::Core::open(config.clone()).expect("a new run"));
    drop(fedtune_server::Core::open(config.clone()).expect("the same run again"));
    {
        let store = Store::open(&config.state_dir.join("store")).unwrap();
        store
            .put_meta(
                fedtune_server::daemon::RECORDS_FORMAT_KEY,
                &2u16.to_le_bytes(),
            )
            .unwrap();
    }
    let err = fedtune_server::Core::open(config.clone())
        .err()
        .expect("an older run is refused");
    let message = err.to_string();
    assert!(
        message.contains("protocol version 2") && message.contains("empty state folder"),
        "{message}"
    );
    // A version that is not two bytes is refused as corrupt.
    {
        let store = Store::open(&config.state_dir.join("store")).unwrap();
        store
            .put_meta(fedtune_server::daemon::RECORDS_FORMAT_KEY, &[1, 0, 0])
            .unwrap();
    }
    let err = fedtune_server::Core::open(config).err().expect("refused");
    assert!(err.to_string().contains("corrupt"), "{err}");
}
