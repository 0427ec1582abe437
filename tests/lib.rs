//! Integration tests across fedtune's crates live in `tests/`; this library holds what several of
//! them share.

use burn::tensor::Device;
use fedtune_shared::device::BackendKind;

/// The wgpu device, or `None` (with a `SKIPPED:` line) where no adapter exists. With
/// `FEDTUNE_REQUIRE_WGPU=1` (set by CI, where `scripts/test` installs Mesa's lavapipe) a missing
/// adapter fails instead.
pub fn wgpu_device() -> Option<Device> {
    match BackendKind::Wgpu.device() {
        Ok(device) => Some(device),
        Err(e) if std::env::var("FEDTUNE_REQUIRE_WGPU").is_ok_and(|v| v == "1") => {
            panic!("FEDTUNE_REQUIRE_WGPU=1 but {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED: {e}");
            None
        }
    }
}

pub mod network {
    //! A real daemon and real clients on loopback QUIC, for the network tests.

    use std::net::SocketAddr;
    use std::path::{Path, PathBuf};
    use std::sync::Arc;
    use std::time::Duration;

    use burn::tensor::Device;
    use fedtune_client::trainer::TrainingData;
    use fedtune_client::{Always, Client, ClientConfig, Event};
    use fedtune_server::Core;
    use fedtune_server::config::{AlgorithmConfig, RoundSettings, ServerConfig};
    use fedtune_server::registry::Registry;
    use fedtune_server::transport::Listener;
    use fedtune_shared::checkpoint::export::write_hf_folder;
    use fedtune_shared::checkpoint::{HfFolder, MemorySource};
    use fedtune_shared::model::{Llama, LlamaConfig};
    use fedtune_shared::protocol::blob::model_digest;
    use fedtune_shared::protocol::{Capabilities, Digest};
    use fedtune_shared::transport::identity::ServerIdentity;
    use fedtune_shared::zo::round::ZoRunConfig;

    /// The enrollment token every test server issues.
    pub const TOKEN: &str = "test-token";

    /// Writes a tiny random Llama as a Hugging Face folder under `dir` and returns its path.
    pub fn tiny_model_folder(dir: &Path, seed: u64) -> PathBuf {
        let path = dir.join("model");
        std::fs::create_dir_all(&path).expect("model folder");
        write_hf_folder(&MemorySource::random(LlamaConfig::tiny(), seed), &path)
            .expect("write tiny model");
        path
    }

    /// Loads a model folder on the CPU.
    pub fn load_model(path: &Path) -> Llama {
        Llama::load(
            &HfFolder::open(path).expect("open model"),
            &Device::flex(),
            |_, _| {},
        )
        .expect("load model")
    }

    /// A small FedKSeed run: K = 64, τ = 3.
    pub fn fedkseed_run() -> ZoRunConfig {
        ZoRunConfig {
            k: 64,
            tau: 3,
            lr: 1e-3,
            eps: 1e-2,
            ..ZoRunConfig::default()
        }
    }

    /// A server configuration on an ephemeral loopback port: every client in every round.
    pub fn server_config(
        state_dir: &Path,
        model: &Path,
        clients: usize,
        rounds: u64,
    ) -> ServerConfig {
        let algorithm = AlgorithmConfig::Fedkseed {
            run: fedkseed_run(),
            batch_size: 1,
        };
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            rounds: RoundSettings::everyone(clients, rounds, 120.0),
            ..ServerConfig::new(state_dir, model, algorithm)
        }
    }

    /// A daemon serving on loopback in this runtime.
    pub struct TestServer {
        /// The core (to inspect state).
        pub core: Arc<Core>,
        /// Its address.
        pub addr: SocketAddr,
        shutdown: Option<tokio::sync::oneshot::Sender<()>>,
        task: Option<tokio::task::JoinHandle<()>>,
    }

    impl TestServer {
        /// Opens the state, issues [`TOKEN`] for 100 devices, and serves.
        pub fn start(config: ServerConfig) -> Self {
            let core = Arc::new(Core::open(config).expect("open daemon"));
            Registry::new(core.store())
                .add_token(TOKEN, 100)
                .expect("token");
            let listener =
                Listener::bind(core.clone(), SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind");
            let addr = listener.local_addr().expect("addr");
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(listener.serve(async move {
                let _ = rx.await;
            }));
            Self {
                core,
                addr,
                shutdown: Some(tx),
                task: Some(task),
            }
        }

        /// What devices need to trust this server.
        pub fn identity(&self) -> ServerIdentity {
            self.core.keys().identity(self.addr)
        }

        /// Stops serving and waits until the endpoint is closed.
        pub async fn stop(mut self) {
            if let Some(tx) = self.shutdown.take() {
                let _ = tx.send(());
            }
            if let Some(task) = self.task.take() {
                let _ = task.await;
            }
        }
    }

    /// A client's configuration for `identity`, with its state in `state_dir`.
    pub fn client_config(
        identity: ServerIdentity,
        state_dir: &Path,
        base_model: Digest,
        events: Option<std::sync::mpsc::Sender<Event>>,
    ) -> ClientConfig {
        let events = std::sync::Mutex::new(events);
        ClientConfig {
            server: identity,
            state_dir: state_dir.to_path_buf(),
            base_model,
            capabilities: Capabilities {
                platform: "test".into(),
                backend: "cpu".into(),
                memory_bytes: 0,
                base_model,
            },
            policy: Arc::new(Always),
            listener: Arc::new(move |e: Event| {
                if let Some(tx) = events.lock().ok().and_then(|g| g.clone()) {
                    let _ = tx.send(e);
                }
            }),
            max_backoff: Duration::from_millis(500),
        }
    }

    /// Counting sequences `s, s+1, …` (mod 64): a pattern a tiny model can learn.
    pub fn counting(starts: impl Iterator<Item = u32>, len: u32) -> Vec<Vec<u32>> {
        starts
            .map(|s| (0..len).map(|i| (s + i) % 64).collect())
            .collect()
    }

    /// A client over the model folder with its own data.
    pub fn client(
        identity: ServerIdentity,
        state_dir: &Path,
        model: &Path,
        data: Vec<Vec<u32>>,
    ) -> (Client, fedtune_client::ClientHandle) {
        let digest = model_digest(model).expect("digest");
        Client::new(
            client_config(identity, state_dir, digest, None),
            load_model(model),
            TrainingData {
                sequences: data,
                ..Default::default()
            },
        )
        .expect("client")
    }

    /// The in-process FedKSeed loop the daemon must equal: every device in every round, in
    /// device-id order (the daemon's aggregation order), each with its data and the local seed
    /// its plan carries. Returns the server state and the global model after `rounds`.
    pub fn fedkseed_reference(
        model: &Path,
        data: &std::collections::BTreeMap<fedtune_shared::protocol::DeviceId, Vec<Vec<u32>>>,
        rounds: u64,
    ) -> (fedtune_shared::zo::round::ZoServer, Llama) {
        use fedtune_shared::progress::Silent;
        use fedtune_shared::zo::federation::local_round;
        use fedtune_shared::zo::round::{ZoServer, replay};
        use fedtune_shared::zo::seed_pool::SeedPool;
        use rand::SeedableRng;

        let run = fedkseed_run();
        let pool = SeedPool::new(run.run_seed, run.k as usize);
        let mut global = load_model(model);
        let mut server = ZoServer::new(run.clone());
        let seed = RoundSettings::default().seed;
        for round in 1..=rounds {
            let plan = server.plan(round - 1);
            let reports: Vec<_> = data
                .iter()
                .map(|(id, sequences)| {
                    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
                        fedtune_server::daemon::local_seed(seed, round, *id),
                    );
                    local_round(
                        &global,
                        &plan,
                        &pool,
                        sequences,
                        1,
                        0,
                        &mut rng,
                        &mut Silent,
                    )
                    .0
                })
                .collect();
            let (delta, rejected) = server.aggregate(&reports);
            assert!(rejected.is_empty(), "{rejected:?}");
            global = replay(global, &run, &pool, &delta);
        }
        (server, global)
    }
}
