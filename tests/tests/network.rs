//! The real daemon and real clients on loopback QUIC: a federated FedKSeed run reaches the
//! in-process reference bit for bit, and every refusal the issue lists happens.

use std::collections::BTreeMap;

use fedtune_client::{ClientError, Outcome};
use fedtune_server::daemon::local_seed;
use fedtune_server::registry::Registry;
use fedtune_shared::progress::Silent;
use fedtune_shared::protocol::frame::decode_body;
use fedtune_shared::protocol::{DeviceId, ErrorCode};
use fedtune_shared::zo::round::{ZoServer, replay};
use fedtune_shared::zo::seed_pool::SeedPool;
use fedtune_tests::network::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn param_bits(model: &fedtune_shared::model::Llama) -> Vec<u32> {
    use burn::module::{Module, ModuleVisitor, Param};
    use burn::tensor::Tensor;
    struct Bits(Vec<u32>);
    impl ModuleVisitor for Bits {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let values: Vec<f32> = param
                .val()
                .into_data()
                .try_to_vec::<f32>()
                .unwrap_or_default();
            self.0.extend(values.iter().map(|v| v.to_bits()));
        }
    }
    let mut bits = Bits(Vec::new());
    model.visit(&mut bits);
    bits.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fedkseed_over_quic_equals_the_in_process_loop() {
    let dir = tempfile::tempdir().unwrap();
    let model_path = tiny_model_folder(dir.path(), 5);
    let (clients, rounds) = (3usize, 3u64);
    let server = TestServer::start(server_config(
        &dir.path().join("server"),
        &model_path,
        clients,
        rounds,
    ));
    let identity = server.identity();

    let mut data = BTreeMap::new();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let sequences = counting((c as u32 * 7)..(c as u32 * 7 + 8), 10);
        let (mut client, _handle) = client(
            identity.clone(),
            &dir.path().join(format!("client{c}")),
            &model_path,
            sequences.clone(),
        );
        let id = client.enroll(TOKEN).await.unwrap();
        data.insert(id, sequences);
        tasks.push(tokio::spawn(async move {
            let outcome = client.run().await;
            (client, outcome)
        }));
    }
    let mut finished = Vec::new();
    for task in tasks {
        let (client, outcome) = task.await.unwrap();
        assert_eq!(outcome.unwrap(), Outcome::Finished { last_round: rounds });
        finished.push(client);
    }
    let served: ZoServer = decode_body(&server.core.algorithm_state()).unwrap();
    server.stop().await;

    // The in-process reference: same run, same devices in id order, same local seeds.
    let (reference, global) = fedkseed_reference(&model_path, &data, rounds);
    let run = fedkseed_run();
    let pool = SeedPool::new(run.run_seed, run.k as usize);
    assert_eq!(served.round(), rounds + 1);
    assert_eq!(
        served
            .history()
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>(),
        reference
            .history()
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>(),
        "the daemon's seed history differs from the in-process loop's"
    );
    assert!(
        reference.history().iter().any(|&v| v != 0.0),
        "the run changed nothing"
    );
    // Each device holds the model up to the round before its last plan; replaying the last
    // delta on it gives the reference's final model bit for bit.
    let last = served.plan(rounds - 1).catch_up;
    for client in finished {
        assert_eq!(client.state().last_seen_round, rounds - 1);
        let caught_up = replay(client.model().clone(), &run, &pool, &last[0]);
        assert_eq!(param_bits(&caught_up), param_bits(&global));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unenrolled_bad_token_and_revoked_devices_get_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let model_path = tiny_model_folder(dir.path(), 5);
    let server = TestServer::start(server_config(&dir.path().join("server"), &model_path, 1, 1));
    let identity = server.identity();

    // A key the server never enrolled: its proof is refused.
    let (stranger, _) = client(
        identity.clone(),
        &dir.path().join("stranger"),
        &model_path,
        counting(0..2, 8),
    );
    let key = fedtune_client::state::StateDir::open(&dir.path().join("stranger"))
        .unwrap()
        .device_key()
        .unwrap();
    let connection = fedtune_client::connection::Connection::open(
        identity.address,
        &identity.certificate_der().unwrap(),
    )
    .await
    .unwrap();
    let err = connection
        .authenticate(key.public_key().device_id(), &key)
        .await
        .unwrap_err();
    assert!(
        matches!(err, fedtune_shared::transport::TransportError::Refused(ref e) if e.code == ErrorCode::Unauthenticated),
        "{err}"
    );
    // … and a request without authentication is refused too.
    let err = connection
        .request(&fedtune_shared::protocol::Request::Poll(
            fedtune_shared::protocol::PollRequest { last_seen_round: 0 },
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(err, fedtune_shared::transport::TransportError::Refused(ref e) if e.code == ErrorCode::Unauthenticated),
        "{err}"
    );
    drop(stranger);

    // A wrong token.
    let (mut wrong, _) = client(
        identity.clone(),
        &dir.path().join("wrong"),
        &model_path,
        counting(0..2, 8),
    );
    let err = wrong.enroll("not-the-token").await.unwrap_err();
    assert!(
        matches!(err, ClientError::Refused(ref e) if e.code == ErrorCode::BadToken),
        "{err}"
    );
    assert!(matches!(wrong.run().await, Err(ClientError::NotEnrolled)));

    // A revoked device.
    let (mut revoked, _) = client(
        identity.clone(),
        &dir.path().join("revoked"),
        &model_path,
        counting(0..2, 8),
    );
    let id: DeviceId = revoked.enroll(TOKEN).await.unwrap();
    Registry::new(server.core.store()).revoke(id).unwrap();
    let err = revoked.run().await.unwrap_err();
    assert!(
        matches!(err, ClientError::Refused(ref e) if e.code == ErrorCode::Revoked),
        "{err}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_certificate_and_forged_plans_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model_path = tiny_model_folder(dir.path(), 5);
    let server = TestServer::start(server_config(&dir.path().join("server"), &model_path, 1, 1));
    let impostor =
        fedtune_server::identity::ServerKeys::load_or_create(&dir.path().join("impostor")).unwrap();

    // Pinning another certificate: the TLS handshake fails.
    let mut pinned_wrong = server.identity();
    pinned_wrong.certificate_pem = impostor.identity(server.addr).certificate_pem;
    let result = fedtune_client::connection::Connection::open(
        server.addr,
        &pinned_wrong.certificate_der().unwrap(),
    )
    .await;
    assert!(
        result.is_err(),
        "a server with an unpinned certificate was trusted"
    );

    // Trusting another plan-signing key: every plan fails verification and is not acted on.
    let mut forged = server.identity();
    forged.signing_key = impostor.signing.public_key().to_string();
    let (mut client, _) = client(
        forged,
        &dir.path().join("c"),
        &model_path,
        counting(0..2, 8),
    );
    client.enroll(TOKEN).await.unwrap();
    let err = client.run().await.unwrap_err();
    assert!(matches!(err, ClientError::PlanRejected(_)), "{err}");
    assert!(
        client.state().pending.is_none(),
        "a client trained on an unverified plan"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_over_quic_equals_the_in_process_loop() {
    use fedtune_server::config::AlgorithmConfig;
    use fedtune_shared::lora::adapter::TargetModule;
    use fedtune_shared::lora::aggregation::{AggregationStrategy, ClientAdapter};
    use fedtune_shared::lora::attach::{adapter_weights, attach_fresh, attach_weights};
    use fedtune_shared::lora::config::LoraConfig;
    use fedtune_shared::lora::federation::{adapter_for_rank, aggregate_to_rank};
    use fedtune_shared::lora::train::{LoraTrainer, TrainConfig, TrainExample};
    use fedtune_shared::protocol::adapter_blob::decode_adapter;
    use fedtune_shared::protocol::{Report, ReportPayload};

    let dir = tempfile::tempdir().unwrap();
    let model_path = tiny_model_folder(dir.path(), 5);
    let (clients, rounds) = (3usize, 3u64);
    let lora = LoraConfig {
        rank: 4,
        dropout: 0.0,
        targets: vec![TargetModule::QProj, TargetModule::VProj],
        ..LoraConfig::default()
    };
    let train = TrainConfig {
        lr: 5e-3,
        warmup_steps: 1,
        ..TrainConfig::default()
    };
    let (ranks, local_steps, strategy) = (vec![2, 4], 3, AggregationStrategy::FlexLora);
    let mut config = server_config(&dir.path().join("server"), &model_path, clients, rounds);
    config.rounds.keep_report_rounds = rounds + 1;
    config.algorithm = AlgorithmConfig::Lora {
        lora: lora.clone(),
        ranks: ranks.clone(),
        train: train.clone(),
        local_steps,
        strategy,
    };
    let server = TestServer::start(config);
    let identity = server.identity();

    let mut data = BTreeMap::new();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let sequences = counting((c as u32 * 5)..(c as u32 * 5 + 6), 12);
        let (mut client, _handle) = client(
            identity.clone(),
            &dir.path().join(format!("client{c}")),
            &model_path,
            sequences.clone(),
        );
        let id = client.enroll(TOKEN).await.unwrap();
        data.insert(id, sequences);
        tasks.push(tokio::spawn(async move { client.run().await }));
    }
    for task in tasks {
        assert_eq!(
            task.await.unwrap().unwrap(),
            Outcome::Finished { last_round: rounds }
        );
    }
    let store = server.core.store();
    let (_, checkpoint) = store.latest_checkpoint().unwrap().unwrap();
    let served = decode_adapter(&std::fs::read(checkpoint).unwrap()).unwrap();
    let mut stored: Vec<Vec<(DeviceId, Report)>> = Vec::new();
    for round in 1..=rounds {
        stored.push(
            store
                .reports(round)
                .unwrap()
                .into_iter()
                .map(|(id, bytes)| (DeviceId(id), decode_body(&bytes).unwrap()))
                .collect(),
        );
    }
    server.stop().await;

    // The in-process reference, with the ranks the devices' bandits chose (read from the stored
    // reports: the bandits' choices depend on measured round times).
    let device = burn::tensor::Device::flex().autodiff();
    let base = fedtune_shared::model::Llama::load(
        &fedtune_shared::checkpoint::HfFolder::open(&model_path).unwrap(),
        &device,
        |_, _| {},
    )
    .unwrap();
    let seed = fedtune_server::config::RoundSettings::default().seed;
    let max_rank = *ranks.iter().max().unwrap();
    let mut fresh = lora.clone();
    fresh.rank = max_rank;
    let mut global =
        adapter_weights(&attach_fresh(base.clone(), &fresh, seed), fresh.scaling).unwrap();
    let mut steps: BTreeMap<DeviceId, usize> = BTreeMap::new();
    let mut used_ranks = std::collections::BTreeSet::new();
    for (r, reports) in stored.iter().enumerate() {
        let round = r as u64 + 1;
        assert_eq!(reports.len(), clients);
        let mut uploads = Vec::new();
        for (id, report) in reports {
            let ReportPayload::Lora { rank, .. } = report.payload else {
                panic!("not a LoRA report")
            };
            used_ranks.insert(rank);
            let sent = adapter_for_rank(&global, rank, strategy).unwrap();
            let model = attach_weights(base.clone(), &sent, 0.0).unwrap();
            let examples: Vec<TrainExample> =
                data[id].iter().cloned().map(TrainExample::text).collect();
            let mut trainer = LoraTrainer::new(train.clone(), steps.get(id).copied().unwrap_or(0));
            let mut rng = ChaCha8Rng::seed_from_u64(local_seed(seed, round, *id));
            let (trained, outcome) =
                trainer.train_round(model, &examples, local_steps, &mut rng, &mut Silent);
            *steps.entry(*id).or_default() += local_steps;
            assert_eq!(
                outcome.mean_loss.to_bits(),
                report.stats.mean_loss.to_bits(),
                "round {round}: training losses differ"
            );
            uploads.push(ClientAdapter {
                weights: adapter_weights(&trained, lora.scaling).unwrap(),
                samples: outcome.samples.max(1),
            });
        }
        global = aggregate_to_rank(strategy, &uploads, max_rank, &global).unwrap();
    }
    assert_eq!(
        used_ranks.len(),
        2,
        "the bandits never tried both ranks: {used_ranks:?}"
    );
    assert_eq!(
        served, global,
        "the daemon's adapter differs from the in-process loop's"
    );
    assert!(
        global
            .layers
            .values()
            .any(|f| f.b.iter().any(|&v| v != 0.0)),
        "training changed nothing"
    );
}

/// The operator's control socket while the daemon serves: a token issued through it enrolls a
/// device, a revocation through it refuses that device's next request, bad requests are refused
/// without stopping the socket, and once the daemon stops the commands use the store.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_issues_tokens_and_revokes_devices_while_the_daemon_serves() {
    use std::io::{BufRead, BufReader, Write};

    use fedtune_server::admin::{AdminSocket, socket_path};

    let dir = tempfile::tempdir().unwrap();
    let model_path = tiny_model_folder(dir.path(), 5);
    let config = server_config(&dir.path().join("server"), &model_path, 1, 1);
    let server = TestServer::start(config.clone());
    let admin = AdminSocket::bind(server.core.clone()).expect("bind the control socket");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let operator = tokio::spawn(admin.serve(async move {
        let _ = stopped.await;
    }));
    let path = socket_path(&config.state_dir);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "only the owner may administer");
    // A second daemon on the same state folder is refused the socket.
    assert!(matches!(
        AdminSocket::bind(server.core.clone()),
        Err(fedtune_server::admin::AdminError::InUse(_))
    ));

    // The commands are blocking (they run in the operator's shell, not in the runtime).
    let cmd = |f: Box<dyn FnOnce() -> Result<String, fedtune_server::DaemonError> + Send>| {
        tokio::task::spawn_blocking(f)
    };
    let c = config.clone();
    let token = cmd(Box::new(move || fedtune_server::issue_token(&c, 1)))
        .await
        .unwrap()
        .expect("token through the socket");
    let (mut device, _) = client(
        server.identity(),
        &dir.path().join("device"),
        &model_path,
        counting(0..2, 8),
    );
    let id: DeviceId = device.enroll(&token).await.expect("the new token enrolls");

    // Malformed, unknown and oversized requests are answered with a refusal, one line each.
    let raw = |bytes: Vec<u8>| {
        let path = path.clone();
        tokio::task::spawn_blocking(move || {
            let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
            s.write_all(&bytes).unwrap();
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line).unwrap();
            line
        })
    };
    for bad in [
        b"not json\n".to_vec(),
        b"{\"op\":\"drop_tables\"}\n".to_vec(),
        b"{\"op\":\"revoke\",\"device\":\"xyz\"}\n".to_vec(),
        vec![b'{'; 10_000],
    ] {
        let answer = raw(bad).await.unwrap();
        assert!(answer.starts_with("{\"result\":\"refused\""), "{answer}");
    }
    let c = config.clone();
    let unknown = DeviceId([9; 16]);
    let err = cmd(Box::new(move || {
        fedtune_server::revoke(&c, unknown).map(|()| String::new())
    }))
    .await
    .unwrap()
    .unwrap_err();
    assert!(err.to_string().contains("refused"), "{err}");

    // Revoked while the daemon serves: the device's next request is refused.
    let c = config.clone();
    cmd(Box::new(move || {
        fedtune_server::revoke(&c, id).map(|()| String::new())
    }))
    .await
    .unwrap()
    .expect("revoke through the socket");
    let err = device.run().await.unwrap_err();
    assert!(
        matches!(err, ClientError::Refused(ref e) if e.code == ErrorCode::Revoked),
        "{err}"
    );

    let _ = stop.send(());
    operator.await.unwrap();
    assert!(!path.exists(), "the socket file goes with the daemon");
    server.stop().await;
    // No daemon: the command opens the store itself.
    let c = config.clone();
    let offline = cmd(Box::new(move || fedtune_server::issue_token(&c, 1)))
        .await
        .unwrap()
        .expect("token from the store");
    assert_ne!(offline, token);
}

/// Poisson selection under differential privacy on the real daemon: round 1 goes only to the
/// devices the run's stored key samples, however often the others ask, and ε is accounted at
/// plans per round / population rather than at rate 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poisson_selection_plans_only_sampled_devices_and_accounts_at_its_rate() {
    use fedtune_server::algorithm::RoundSummary;
    use fedtune_server::daemon::SAMPLING_KEY;
    use fedtune_server::rounds::PoissonSampling;
    use fedtune_shared::privacy::clipping::ClipNorm;
    use fedtune_shared::privacy::dp::{DpConfig, DpMechanism, Selection};
    use fedtune_shared::privacy::gaussian::NoiseMode;

    let dir = tempfile::tempdir().unwrap();
    let model_path = tiny_model_folder(dir.path(), 5);
    // Four devices whose ids are known before the daemon starts.
    let folders: Vec<_> = (0..4)
        .map(|i| dir.path().join(format!("device-{i}")))
        .collect();
    let ids: Vec<DeviceId> = folders
        .iter()
        .map(|f| {
            let key = fedtune_client::state::StateDir::open(f)
                .unwrap()
                .device_key()
                .unwrap();
            key.public_key().device_id()
        })
        .collect();
    // Two plans per round from a population of four: q = 1/2.
    let mut config = server_config(&dir.path().join("server"), &model_path, 2, 1);
    let dp = DpConfig {
        clip: ClipNorm::fixed(1.0),
        noise_multiplier: 1.0,
        mode: NoiseMode::Central,
        selection: Selection::Poisson,
        delta: 1e-5,
        population: 4,
    };
    config.privacy.dp = Some(dp);
    // A run key that samples exactly two of the four into round 1, written before serving.
    let key = (0u8..=255)
        .map(|b| [b; 32])
        .find(|k| {
            let s = PoissonSampling::new(0.5, k);
            ids.iter().filter(|&&d| s.takes(1, d)).count() == 2
        })
        .expect("some key samples two of four");
    drop(fedtune_server::Core::open(config.clone()).expect("a new run"));
    fedtune_server::store::Store::open(&config.state_dir.join("store"))
        .unwrap()
        .put_meta(SAMPLING_KEY, &key)
        .unwrap();
    let sampled: std::collections::BTreeSet<DeviceId> = ids
        .iter()
        .copied()
        .filter(|&d| PoissonSampling::new(0.5, &key).takes(1, d))
        .collect();

    let server = TestServer::start(config.clone());
    let mut runs = Vec::new();
    for (i, folder) in folders.iter().enumerate() {
        let (mut device, _) = client(
            server.identity(),
            folder,
            &model_path,
            counting((0..2).map(|s| s + i as u32), 8),
        );
        assert_eq!(device.enroll(TOKEN).await.unwrap(), ids[i]);
        runs.push(tokio::spawn(async move { device.run().await }));
    }
    for run in runs {
        assert_eq!(
            run.await.unwrap().unwrap(),
            Outcome::Finished { last_round: 1 }
        );
    }
    let reported: std::collections::BTreeSet<DeviceId> = server
        .core
        .store()
        .reports(1)
        .unwrap()
        .into_iter()
        .map(|(id, _)| DeviceId(id))
        .collect();
    assert_eq!(reported, sampled, "only the sampled devices trained");
    let summaries = server.core.store().round_summaries().unwrap();
    let summary: RoundSummary = decode_body(&summaries[0].1).unwrap();
    let epsilon = summary.privacy.expect("DP recorded").epsilon;
    let at_rate = DpMechanism::new(dp)
        .unwrap()
        .with_cohort(2)
        .record_round(2, 1.0)
        .epsilon;
    let first_come = DpMechanism::new(DpConfig {
        selection: Selection::FirstCome,
        ..dp
    })
    .unwrap()
    .record_round(2, 1.0)
    .epsilon;
    assert!((epsilon - at_rate).abs() < 1e-12, "{epsilon} vs {at_rate}");
    assert!(
        epsilon < first_come,
        "{epsilon} vs {first_come} without amplification"
    );
    server.stop().await;
}
