//! Secure aggregation (SecAgg+) on the real daemon over loopback QUIC.
//!
//! - A FedKSeed round of six devices (five device SDKs and one scripted device that vanishes
//!   after sending its masked input) ends with the seed history of the same round aggregated in
//!   the clear, within the quantizer's bound; the round's summary records what SecAgg+ cost.
//! - The same for LoRA with FedAvg at a single rank: the global adapters agree within the bound.
//! - Malformed, out-of-phase, repeated, foreign-id and unknown-session SecAgg messages are
//!   answered with errors, and the daemon goes on to finish the round.
//! - Distributed DP (`[privacy.dp] mode = "distributed"`): five SDK devices and one scripted
//!   device with an oversized update clip and noise their updates; the daemon's mean differs
//!   from the mean of the clipped updates (recomputed here in the clear) by noise of the
//!   calibrated standard deviation, the oversized update counts clipped, and the round's
//!   summary carries ε and the noise.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedtune_client::Outcome;
use fedtune_client::connection::Connection;
use fedtune_client::state::StateDir;
use fedtune_server::algorithm::RoundSummary;
use fedtune_server::config::{AlgorithmConfig, SecAggSettings, ServerConfig};
use fedtune_shared::lora::adapter::{AdapterWeights, LoraScaling, TargetModule};
use fedtune_shared::lora::aggregation::AggregationStrategy;
use fedtune_shared::lora::config::LoraConfig;
use fedtune_shared::lora::train::TrainConfig;
use fedtune_shared::privacy::clipping::{ClipNorm, clip_l2, l2_norm};
use fedtune_shared::privacy::dp::{DpConfig, DpMechanism};
use fedtune_shared::privacy::gaussian::NoiseMode;
use fedtune_shared::privacy::secagg::{
    MaskedInput, SecAggClient, SecAggConfig, ShareBundle, UnmaskResponse,
};
use fedtune_shared::protocol::adapter_blob::{decode_adapter, encode_adapter};
use fedtune_shared::protocol::auth::PLAN_LABEL;
use fedtune_shared::protocol::blob::model_digest;
use fedtune_shared::protocol::frame::decode_body;
use fedtune_shared::protocol::secure::{
    SecAggDownload, SecAggUpload, secure_input, weighted_input,
};
use fedtune_shared::protocol::{BlobRef, Digest, Task};
use fedtune_shared::protocol::{
    Capabilities, DeviceId, EnrollRequest, ErrorCode, LocalStats, Plan, PollRequest, Report,
    ReportPayload, Request, Response, SigningKey,
};
use fedtune_shared::robust::flat::adapter_delta;
use fedtune_shared::robust::flat::dense_seed_grads;
use fedtune_shared::transport::TransportError;
use fedtune_shared::zo::federation::local_round;
use fedtune_shared::zo::round::{ClientReport, ZoRunConfig, ZoServer};
use fedtune_shared::zo::seed_pool::SeedPool;
use fedtune_tests::network::*;
use rand::SeedableRng;

/// Devices per round: five SDKs and one scripted device.
const DEVICES: usize = 6;
/// The clipping range of the tests' secure sums.
const CLIP: f32 = 50.0;

/// A device driven message by message by the test (to drop out at a chosen point, or to send
/// what no SDK would).
struct Scripted {
    connection: Connection,
    device: DeviceId,
    server_key: fedtune_shared::protocol::PublicKey,
}

impl Scripted {
    /// Enrolls a device with `seed`'s key and authenticates a connection for it.
    async fn enroll(server: &TestServer, model: &Path, seed: u8) -> Self {
        let identity = server.identity();
        let cert = identity.certificate_der().expect("certificate");
        let connection = Connection::open(identity.address, &cert)
            .await
            .expect("connect");
        let key = SigningKey::from_seed(&[seed; 32]).expect("key");
        let digest = model_digest(model).expect("digest");
        let response = connection
            .request(&Request::Enroll(EnrollRequest {
                token: TOKEN.into(),
                public_key: key.public_key(),
                capabilities: Capabilities {
                    base_model: digest,
                    ..Capabilities::default()
                },
            }))
            .await
            .expect("enroll");
        let Response::Enrolled { device } = response else {
            panic!("{response:?}");
        };
        connection.authenticate(device, &key).await.expect("auth");
        Self {
            connection,
            device,
            server_key: identity.signing_key().expect("plan key"),
        }
    }

    /// Polls until the server gives a plan; verifies it.
    async fn plan(&self) -> Plan {
        loop {
            let response = self
                .connection
                .request(&Request::Poll(PollRequest { last_seen_round: 0 }))
                .await
                .expect("poll");
            match response {
                Response::Plan(signed) => {
                    let plan: Plan = signed.verify(&self.server_key, PLAN_LABEL).expect("sig");
                    assert_eq!(plan.device, self.device);
                    return plan;
                }
                Response::Wait { retry_after_ms, .. } => {
                    tokio::time::sleep(Duration::from_millis(retry_after_ms)).await;
                }
                other => panic!("{other:?}"),
            }
        }
    }

    async fn send(&self, round: u64, message: SecAggUpload) -> Result<Response, TransportError> {
        self.connection
            .request(&Request::SecAgg { round, message })
            .await
    }

    /// Polls the session until the current phase closes.
    async fn next(&self, round: u64) -> SecAggDownload {
        loop {
            match self
                .connection
                .request(&Request::SecAggPoll { round })
                .await
                .expect("secagg poll")
            {
                Response::SecAgg(m) => return m,
                Response::Wait { retry_after_ms, .. } => {
                    tokio::time::sleep(Duration::from_millis(retry_after_ms)).await;
                }
                other => panic!("{other:?}"),
            }
        }
    }
}

/// The error code of a refusal (panics on any other outcome).
fn refused(result: Result<Response, TransportError>) -> ErrorCode {
    match result {
        Err(TransportError::Refused(e)) => e.code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn stats(samples: u64) -> LocalStats {
    LocalStats {
        samples,
        mean_loss: 3.0,
        first_loss: 3.0,
        loss_after: 3.0,
        wall_s: 0.1,
        peak_rss_bytes: None,
    }
}

/// An SDK device's task.
type DeviceTask = tokio::task::JoinHandle<Result<Outcome, fedtune_client::ClientError>>;

/// Starts the five SDK devices (keys from fixed seeds, so both runs have the same device ids
/// and local seeds) and returns their tasks and their training data by device id.
async fn start_sdk_devices(
    server: &TestServer,
    dir: &Path,
    model: &Path,
) -> (Vec<DeviceTask>, BTreeMap<DeviceId, Vec<Vec<u32>>>) {
    let mut tasks = Vec::new();
    let mut data_of = BTreeMap::new();
    for c in 0..DEVICES - 1 {
        let state = dir.join(format!("device{c}"));
        StateDir::open(&state)
            .and_then(|d| d.provision_key(&SigningKey::from_seed(&[c as u8 + 1; 32]).unwrap()))
            .expect("provision key");
        let data = counting((c as u32 * 7)..(c as u32 * 7 + 6), 10);
        let (mut sdk, _handle) = client(server.identity(), &state, model, data.clone());
        data_of.insert(sdk.enroll(TOKEN).await.expect("enroll"), data);
        tasks.push(tokio::spawn(async move { sdk.run().await }));
    }
    (tasks, data_of)
}

/// The daemon's configuration for one of the runs.
fn config(dir: &Path, model: &Path, algorithm: AlgorithmConfig, secure: bool) -> ServerConfig {
    let mut config = server_config(dir, model, DEVICES, 1);
    config.algorithm = algorithm;
    config.privacy.secure_aggregation = secure;
    config.privacy.secagg = SecAggSettings {
        clip: CLIP,
        // The scripted device that vanishes before unmasking holds phase 4 this long.
        phase_timeout_s: 2.0,
        ..SecAggSettings::default()
    };
    config
}

/// What a run ended with.
struct Ran {
    state: Vec<u8>,
    checkpoint: PathBuf,
    summary: RoundSummary,
}

/// One round of `algorithm`, secure or in the clear: the SDK devices train, and the scripted
/// device contributes `update(plan)` (its flat update and, for a clear round, its report); in a
/// secure round it vanishes right after sending its masked input.
async fn one_round<F, Fut>(
    dir: &Path,
    model: &Path,
    algorithm: AlgorithmConfig,
    secure: bool,
    update: F,
) -> Ran
where
    F: FnOnce(Plan, Connection) -> Fut,
    Fut: std::future::Future<Output = (Vec<f32>, Report, Connection)>,
{
    let server = TestServer::start(config(&dir.join("server"), model, algorithm, secure));
    let (tasks, _) = start_sdk_devices(&server, dir, model).await;
    let scripted = Scripted::enroll(&server, model, 99).await;
    let plan = scripted.plan().await;
    let round = plan.round;
    let secure_round = plan.secure;
    assert_eq!(secure_round.is_some(), secure);
    let Scripted {
        connection,
        device,
        server_key,
    } = scripted;
    let (flat, report, connection) = update(plan, connection).await;
    let scripted = Scripted {
        connection,
        device,
        server_key,
    };
    match secure_round {
        None => {
            let response = scripted
                .connection
                .request(&Request::Report(report))
                .await
                .expect("report");
            assert!(
                matches!(response, Response::Accepted { .. }),
                "{response:?}"
            );
        }
        Some(secure) => {
            let (mut machine, advert) = SecAggClient::new(secure.config, secure.id, [7; 32]);
            scripted
                .send(round, SecAggUpload::Advertise(advert))
                .await
                .expect("advertise");
            let SecAggDownload::NeighbourKeys(keys) = scripted.next(round).await else {
                panic!("expected neighbour keys");
            };
            let bundle = machine.handle_neighbour_keys(keys).expect("share");
            scripted
                .send(round, SecAggUpload::Shares(bundle))
                .await
                .expect("shares");
            let SecAggDownload::ForwardedShares(shares) = scripted.next(round).await else {
                panic!("expected shares");
            };
            let samples = report.stats.samples;
            let input = weighted_input(&flat, samples, secure.max_samples);
            let masked = machine
                .handle_forwarded_shares(shares, &input)
                .expect("mask");
            scripted
                .send(
                    round,
                    SecAggUpload::Masked {
                        input: masked,
                        stats: report.stats,
                    },
                )
                .await
                .expect("masked input");
            // Gone before the unmask phase: its update is in the sum all the same.
            scripted.connection.close().await;
        }
    }
    for task in tasks {
        let outcome = task.await.expect("device task").expect("device run");
        assert_eq!(outcome, Outcome::Finished { last_round: 1 });
    }
    let summaries = server.core.store().round_summaries().expect("summaries");
    let summary: RoundSummary = decode_body(&summaries[0].1).expect("summary");
    let state = server.core.algorithm_state();
    let (_, checkpoint) = server
        .core
        .store()
        .latest_checkpoint()
        .expect("checkpoint")
        .expect("a checkpoint");
    server.stop().await;
    Ran {
        state,
        checkpoint,
        summary,
    }
}

fn fedkseed() -> AlgorithmConfig {
    AlgorithmConfig::Fedkseed {
        run: fedkseed_run(),
        batch_size: 1,
    }
}

/// The scripted device's FedKSeed update: fixed gradients on three seeds, all τ samples.
async fn fedkseed_update(plan: Plan, connection: Connection) -> (Vec<f32>, Report, Connection) {
    let (flat, report) = fedkseed_report(&plan);
    (flat, report, connection)
}

/// [`fedkseed_update`]'s flat update and report.
fn fedkseed_report(plan: &Plan) -> (Vec<f32>, Report) {
    let run = fedkseed_run();
    let samples = u64::from(run.tau);
    let inner = ClientReport {
        round: plan.round,
        seed_grads: vec![(1, 2.5), (17, -4.0), (40, 0.75)],
        step_grads: Vec::new(),
        samples,
    };
    let report = Report {
        run_id: plan.run_id,
        round: plan.round,
        stats: stats(samples),
        payload: ReportPayload::FedKSeed(inner.clone()),
    };
    (dense_seed_grads(&inner, run.k), report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fedkseed_secure_round_with_a_dropout_equals_the_clear_round() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_folder(dir.path(), 5);
    let plain = one_round(
        &dir.path().join("plain"),
        &model,
        fedkseed(),
        false,
        fedkseed_update,
    )
    .await;
    let secure = one_round(
        &dir.path().join("secure"),
        &model,
        fedkseed(),
        true,
        fedkseed_update,
    )
    .await;
    let plain_state: ZoServer = decode_body(&plain.state).unwrap();
    let secure_state: ZoServer = decode_body(&secure.state).unwrap();
    assert_eq!(secure_state.round(), 2);
    // Every device trained on τ samples (weight 1): the mean of 6 has the error of the sum / 6.
    let quantizer =
        fedtune_shared::privacy::quantize::Quantizer::for_sum(CLIP, DEVICES).expect("quantizer");
    let bound = quantizer.max_error() + 1e-6;
    let mut largest = 0.0f64;
    for (a, b) in plain_state.history().iter().zip(secure_state.history()) {
        assert!(a.abs() < CLIP, "{a} is outside the clipping range");
        largest = largest.max((f64::from(*a) - f64::from(*b)).abs());
    }
    assert!(
        largest <= bound,
        "histories differ by {largest}, bound {bound}"
    );
    assert!(
        plain_state.history().iter().filter(|v| **v != 0.0).count() > 3,
        "the SDK devices changed nothing"
    );
    assert_eq!(plain.summary.reports, DEVICES);
    assert_eq!(secure.summary.reports, DEVICES);
    assert_eq!(plain.summary.samples, secure.summary.samples);
    assert!(plain.summary.secure.is_none());
    let cost = secure.summary.secure.expect("secure cost recorded");
    assert_eq!((cost.clients, cost.dropped), (DEVICES, 0));
    // Keys, shares for five neighbours and a masked K-vector at the least.
    let k = fedkseed_run().k as f64;
    assert!(cost.upload_bytes_per_client > 4.0 * k, "{cost:?}");
    assert!(
        cost.download_bytes_per_client > 0.0 && cost.server_s > 0.0,
        "{cost:?}"
    );
    eprintln!("fedkseed secure round cost: {cost:?}; histories differ by at most {largest:e}");
}

fn lora() -> AlgorithmConfig {
    AlgorithmConfig::Lora {
        lora: LoraConfig {
            rank: 4,
            scaling: LoraScaling {
                alpha: 8.0,
                rslora: false,
            },
            dropout: 0.0,
            targets: vec![TargetModule::QProj, TargetModule::VProj],
        },
        ranks: vec![4],
        train: TrainConfig {
            lr: 1e-2,
            warmup_steps: 0,
            batch_size: 2,
            ..TrainConfig::default()
        },
        local_steps: 2,
        strategy: AggregationStrategy::FedAvg,
    }
}

/// The scripted device's LoRA update: the global adapter it downloads, moved by a fixed
/// pattern; uploaded as a blob (what a clear round's report names).
async fn lora_update(plan: Plan, connection: Connection) -> (Vec<f32>, Report, Connection) {
    let Task::Lora(task) = &plan.task else {
        panic!("not a LoRA plan");
    };
    let blob = task.adapter.expect("global adapter");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("global");
    connection
        .download(blob.digest, 0, blob.len, &path)
        .await
        .expect("download");
    let global: AdapterWeights = decode_adapter(&std::fs::read(&path).unwrap()).unwrap();
    let mut trained = global.clone();
    for (l, f) in trained.layers.values_mut().enumerate() {
        for (i, v) in f.a.iter_mut().chain(f.b.iter_mut()).enumerate() {
            *v += 1e-2 * ((i * 7 + l * 3) % 11) as f32 / 11.0 - 5e-3;
        }
    }
    let bytes = encode_adapter(&trained);
    let adapter = BlobRef {
        digest: Digest::of(&bytes),
        len: bytes.len() as u64,
    };
    let uploaded = connection
        .upload(adapter.digest, &bytes, 0)
        .await
        .expect("upload");
    assert!(
        matches!(uploaded, Response::Uploaded { .. }),
        "{uploaded:?}"
    );
    let report = Report {
        run_id: plan.run_id,
        round: plan.round,
        stats: stats(3),
        payload: ReportPayload::Lora {
            adapter,
            rank: task.lora.rank,
        },
    };
    let flat = adapter_delta(&global, &trained).expect("delta");
    (flat, report, connection)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_fedavg_secure_round_with_a_dropout_equals_the_clear_round() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_folder(dir.path(), 5);
    let plain = one_round(
        &dir.path().join("plain"),
        &model,
        lora(),
        false,
        lora_update,
    )
    .await;
    let secure = one_round(
        &dir.path().join("secure"),
        &model,
        lora(),
        true,
        lora_update,
    )
    .await;
    let read = |ran: &Ran| decode_adapter(&std::fs::read(&ran.checkpoint).unwrap()).unwrap();
    let (plain_adapter, secure_adapter) = (read(&plain), read(&secure));
    // Weights are samples / (steps × batch) ≥ 1/4 each: the mean's error is at most the sum's
    // (6 values' half-steps) divided by their total, itself at least 6/4.
    let quantizer =
        fedtune_shared::privacy::quantize::Quantizer::for_sum(CLIP, DEVICES).expect("quantizer");
    let bound = DEVICES as f64 * quantizer.max_error() / 1.5 + 1e-6;
    let (mut largest, mut moved) = (0.0f64, 0.0f32);
    for (p, s) in plain_adapter
        .layers
        .values()
        .zip(secure_adapter.layers.values())
    {
        for (a, b) in p.a.iter().chain(&p.b).zip(s.a.iter().chain(&s.b)) {
            largest = largest.max((f64::from(*a) - f64::from(*b)).abs());
        }
        moved = p.b.iter().fold(moved, |m, v| m.max(v.abs()));
    }
    assert!(
        largest <= bound,
        "adapters differ by {largest}, bound {bound}"
    );
    assert!(moved > 1e-3, "the round moved B by {moved} only");
    assert_eq!(plain.summary.reports, DEVICES);
    assert_eq!(secure.summary.reports, DEVICES);
    let cost = secure.summary.secure.expect("secure cost recorded");
    assert_eq!(cost.clients, DEVICES);
    eprintln!("lora secure round cost: {cost:?}; adapters differ by at most {largest:e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_secagg_messages_are_refused_and_the_round_still_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_folder(dir.path(), 5);
    let mut config = server_config(&dir.path().join("server"), &model, 3, 1);
    config.privacy.secure_aggregation = true;
    config.privacy.secagg.clip = CLIP;
    let server = TestServer::start(config);
    let stranger = Scripted::enroll(&server, &model, 40).await;
    let mut devices = Vec::new();
    for seed in [41, 42, 43] {
        devices.push(Scripted::enroll(&server, &model, seed).await);
    }
    let other = SecAggConfig::new(1, 3, 64, 1.0, 2, 0.3).expect("config");
    let fake_advert = |id| SecAggClient::new(other, id, [1; 32]).1;
    // No plan yet: no session, nothing to say in it.
    let code = refused(
        stranger
            .send(1, SecAggUpload::Advertise(fake_advert(0)))
            .await,
    );
    assert_eq!(code, ErrorCode::SecAgg);
    let poll = stranger
        .connection
        .request(&Request::SecAggPoll { round: 1 })
        .await;
    assert_eq!(refused(poll), ErrorCode::SecAgg);

    let mut plans = Vec::new();
    for d in &devices {
        plans.push(d.plan().await.secure.expect("secure plan"));
    }
    let (a, b) = (&devices[0], &devices[1]);
    let mut machines = Vec::new();
    let mut adverts = Vec::new();
    for (i, secure) in plans.iter().enumerate() {
        let (m, advert) = SecAggClient::new(secure.config, secure.id, [i as u8 + 9; 32]);
        machines.push(m);
        adverts.push(advert);
    }
    // A device that got no plan is not in the session, and cannot advertise.
    let poll = stranger
        .connection
        .request(&Request::SecAggPoll { round: 1 })
        .await;
    assert_eq!(refused(poll), ErrorCode::SecAgg);
    let code = refused(
        stranger
            .send(1, SecAggUpload::Advertise(adverts[2].clone()))
            .await,
    );
    assert_eq!(code, ErrorCode::SecAgg);
    // Speaking for another device's id.
    let code = refused(a.send(1, SecAggUpload::Advertise(adverts[1].clone())).await);
    assert_eq!(code, ErrorCode::SecAgg);
    // Out of phase: shares before the keys phase closed.
    let early = ShareBundle {
        from: plans[0].id,
        shares: Vec::new(),
    };
    assert_eq!(
        refused(a.send(1, SecAggUpload::Shares(early)).await),
        ErrorCode::SecAgg
    );
    // An unknown session, and a plain report in a secure run.
    assert_eq!(
        refused(a.send(9, SecAggUpload::Advertise(adverts[0].clone())).await),
        ErrorCode::SecAgg
    );
    let (_, report) = fedkseed_report(&a.plan().await);
    let plain = a.connection.request(&Request::Report(report)).await;
    assert_eq!(refused(plain), ErrorCode::Invalid);
    // Phase 1, with a repeat.
    a.send(1, SecAggUpload::Advertise(adverts[0].clone()))
        .await
        .expect("advertise");
    let again = a.send(1, SecAggUpload::Advertise(adverts[0].clone())).await;
    assert_eq!(refused(again), ErrorCode::SecAgg);
    assert!(matches!(
        a.connection
            .request(&Request::SecAggPoll { round: 1 })
            .await,
        Ok(Response::Wait { .. })
    ));
    for (d, advert) in devices.iter().zip(&adverts).skip(1) {
        d.send(1, SecAggUpload::Advertise(advert.clone()))
            .await
            .expect("advertise");
    }
    // Phase 2, with a bundle that shares with nobody.
    let mut bundles = Vec::new();
    for (d, m) in devices.iter().zip(&mut machines) {
        let SecAggDownload::NeighbourKeys(keys) = d.next(1).await else {
            panic!("keys");
        };
        bundles.push(m.handle_neighbour_keys(keys).expect("share"));
    }
    let empty = ShareBundle {
        from: plans[0].id,
        shares: Vec::new(),
    };
    assert_eq!(
        refused(a.send(1, SecAggUpload::Shares(empty)).await),
        ErrorCode::SecAgg
    );
    for (d, bundle) in devices.iter().zip(bundles) {
        d.send(1, SecAggUpload::Shares(bundle))
            .await
            .expect("shares");
    }
    // Phase 3, with a truncated input and impossible sample counts.
    let k = fedkseed_run().k as usize;
    let inputs: Vec<Vec<f32>> = (0..3)
        .map(|i| (0..k).map(|s| ((s * (i + 2)) % 9) as f32 - 4.0).collect())
        .collect();
    let max_samples = plans[0].max_samples;
    let mut masked = Vec::new();
    for (d, (m, x)) in devices.iter().zip(machines.iter_mut().zip(&inputs)) {
        let SecAggDownload::ForwardedShares(shares) = d.next(1).await else {
            panic!("shares");
        };
        masked.push(m.handle_forwarded_shares(shares, x).expect("mask"));
    }
    let short = MaskedInput {
        from: plans[0].id,
        masked: vec![0; 8],
    };
    let code = refused(
        a.send(
            1,
            SecAggUpload::Masked {
                input: short,
                stats: stats(max_samples),
            },
        )
        .await,
    );
    assert_eq!(code, ErrorCode::SecAgg);
    let code = refused(
        a.send(
            1,
            SecAggUpload::Masked {
                input: masked[0].clone(),
                stats: stats(max_samples + 1),
            },
        )
        .await,
    );
    assert_eq!(code, ErrorCode::Invalid);
    for (d, input) in devices.iter().zip(masked) {
        d.send(
            1,
            SecAggUpload::Masked {
                input,
                stats: stats(max_samples),
            },
        )
        .await
        .expect("masked");
    }
    // Phase 4, with a response in another device's name.
    let mut responses = Vec::new();
    for (d, m) in devices.iter().zip(&mut machines) {
        let SecAggDownload::UnmaskRequest(request) = d.next(1).await else {
            panic!("unmask request");
        };
        responses.push(m.handle_unmask_request(request).expect("reveal"));
    }
    let foreign: UnmaskResponse = responses[1].clone();
    assert_eq!(
        refused(a.send(1, SecAggUpload::Unmask(foreign)).await),
        ErrorCode::SecAgg
    );
    for (d, response) in devices.iter().zip(responses) {
        d.send(1, SecAggUpload::Unmask(response))
            .await
            .expect("unmask");
    }
    // The daemon kept serving, finished the round, and its history is the inputs' mean.
    assert_eq!(server.core.round().0, 2);
    let state: ZoServer = decode_body(&server.core.algorithm_state()).unwrap();
    let quantizer =
        fedtune_shared::privacy::quantize::Quantizer::for_sum(CLIP, 3).expect("quantizer");
    for (s, h) in state.history().iter().enumerate() {
        let mean = inputs.iter().map(|x| f64::from(x[s])).sum::<f64>() / 3.0;
        assert!(
            (f64::from(*h) - mean).abs() <= quantizer.max_error() + 1e-6,
            "{h} vs {mean}"
        );
    }
    let done = b
        .connection
        .request(&Request::SecAggPoll { round: 1 })
        .await;
    assert!(
        matches!(done, Ok(Response::SecAgg(SecAggDownload::Done))),
        "{done:?}"
    );
    server.stop().await;
}

#[test]
fn a_restart_mid_session_runs_the_round_again() {
    use fedtune_server::Core;
    use fedtune_server::daemon::Session;
    use fedtune_server::registry::Registry;
    use std::time::Instant;

    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_folder(dir.path(), 5);
    let mut config = server_config(&dir.path().join("server"), &model, 3, 1);
    config.privacy.secure_aggregation = true;
    let core = Core::open(config.clone()).expect("open");
    Registry::new(core.store())
        .add_token(TOKEN, 10)
        .expect("token");
    let mut sessions = Vec::new();
    for seed in [51u8, 52, 53] {
        let key = SigningKey::from_seed(&[seed; 32]).unwrap();
        let mut session = Session::default();
        let enrolled = core.handle(
            &mut session,
            Request::Enroll(EnrollRequest {
                token: TOKEN.into(),
                public_key: key.public_key(),
                capabilities: Capabilities::default(),
            }),
            Instant::now(),
        );
        let Response::Enrolled { device } = enrolled else {
            panic!("{enrolled:?}");
        };
        // The test plays the transport: this session has proved its key.
        session.device = Some(device);
        sessions.push(session);
    }
    let poll = Request::Poll(PollRequest { last_seen_round: 0 });
    let plan_of = |core: &Core, session: &mut Session| match core.handle(
        session,
        poll.clone(),
        Instant::now(),
    ) {
        Response::Plan(signed) => {
            let key = core.keys().signing.public_key();
            let plan: Plan = signed.verify(&key, PLAN_LABEL).expect("plan");
            plan.secure.expect("secure plan")
        }
        other => panic!("{other:?}"),
    };
    for session in &mut sessions {
        let secure = plan_of(&core, session);
        let (_, advert) = SecAggClient::new(secure.config, secure.id, [1; 32]);
        let message = SecAggUpload::Advertise(advert);
        let answer = core.handle(
            session,
            Request::SecAgg { round: 1, message },
            Instant::now(),
        );
        assert!(
            matches!(answer, Response::SecAggAccepted { round: 1 }),
            "{answer:?}"
        );
    }
    // Phase 2 is open; the daemon stops and starts again.
    drop(core);
    let core = Core::open(config).expect("reopen");
    assert_eq!(core.round().0, 1);
    for session in &mut sessions {
        let lost = core.handle(session, Request::SecAggPoll { round: 1 }, Instant::now());
        assert!(
            matches!(&lost, Response::Error(e) if e.code == ErrorCode::SecAgg),
            "{lost:?}"
        );
        // Devices that poll for work get the same round's plan again, in a new session.
        let secure = plan_of(&core, session);
        assert_eq!(secure.config.session, 1);
    }
}

/// K of the DP round: enough values for a tight estimate of the noise's standard deviation.
const DP_K: u32 = 1024;

/// Distributed DP at z = 1, C = 1, 1000 devices, first-come selection (accounted at rate 1).
fn distributed_dp() -> DpConfig {
    DpConfig {
        clip: ClipNorm::fixed(1.0),
        noise_multiplier: 1.0,
        mode: NoiseMode::Distributed,
        delta: 1e-5,
        selection: fedtune_shared::privacy::dp::Selection::FirstCome,
        population: 1000,
    }
}

/// Mean and standard deviation.
fn moments(x: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_dp_round_clips_noises_and_accounts() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_folder(dir.path(), 5);
    let run = ZoRunConfig {
        k: DP_K,
        ..fedkseed_run()
    };
    let k = DP_K as usize;
    let algorithm = AlgorithmConfig::Fedkseed {
        run: run.clone(),
        batch_size: 1,
    };
    let mut config = config(&dir.path().join("server"), &model, algorithm, true);
    config.privacy.dp = Some(distributed_dp());
    config.check().expect("a valid configuration");
    let server = TestServer::start(config.clone());
    let (tasks, data) = start_sdk_devices(&server, dir.path(), &model).await;
    let scripted = Scripted::enroll(&server, &model, 99).await;
    let plan = scripted.plan().await;
    let round = plan.round;
    let secure = plan.secure.expect("a secure plan");
    let noise = secure.dp.expect("the plan carries the devices' DP");
    // Every device closes phase 1 (min_reports = 6) and the graph is full: with δ = 0.3 any
    // sum the daemon can unmask holds at least 6 − ⌊1.8⌋ = 5 devices.
    assert_eq!(noise.min_clients, 5);
    assert_eq!(noise, distributed_dp().distributed_noise(5));

    // The scripted device: an update of norm 506 on three seeds, through the SDK's function.
    let raw = [(1u32, 300.0f32), (17, -400.0), (40, 75.0)];
    let inner = ClientReport {
        round,
        seed_grads: raw.to_vec(),
        step_grads: Vec::new(),
        samples: u64::from(run.tau),
    };
    let flat = dense_seed_grads(&inner, run.k);
    let mut noise_rng = rand_chacha::ChaCha20Rng::from_seed(rand::random());
    let (input, norm) = secure_input(
        &flat,
        &[],
        inner.samples,
        secure.max_samples,
        Some(&noise),
        &mut noise_rng,
    );
    assert!(norm.is_some_and(|n| n > 500.0), "{norm:?}");
    let (mut machine, advert) = SecAggClient::new(secure.config, secure.id, rand::random());
    scripted
        .send(round, SecAggUpload::Advertise(advert))
        .await
        .expect("advertise");
    let SecAggDownload::NeighbourKeys(keys) = scripted.next(round).await else {
        panic!("expected neighbour keys");
    };
    let bundle = machine.handle_neighbour_keys(keys).expect("share");
    scripted
        .send(round, SecAggUpload::Shares(bundle))
        .await
        .expect("shares");
    let SecAggDownload::ForwardedShares(shares) = scripted.next(round).await else {
        panic!("expected shares");
    };
    let masked = machine
        .handle_forwarded_shares(shares, &input)
        .expect("mask");
    scripted
        .send(
            round,
            SecAggUpload::Masked {
                input: masked,
                stats: stats(inner.samples),
            },
        )
        .await
        .expect("masked input");
    let SecAggDownload::UnmaskRequest(request) = scripted.next(round).await else {
        panic!("expected the unmask request");
    };
    let response = machine.handle_unmask_request(request).expect("reveal");
    scripted
        .send(round, SecAggUpload::Unmask(response))
        .await
        .expect("unmask");
    for task in tasks {
        let outcome = task.await.expect("device task").expect("device run");
        assert_eq!(outcome, Outcome::Finished { last_round: 1 });
    }
    let summaries = server.core.store().round_summaries().expect("summaries");
    let summary: RoundSummary = decode_body(&summaries[0].1).expect("summary");
    // With DP the state is the history and the accountant (so ε survives a restart).
    let (state, _): (ZoServer, DpMechanism) =
        decode_body(&server.core.algorithm_state()).expect("history and DP state");
    server.stop().await;

    // The round's summary: ε of one first-come round (rate 1), the noise, the cost.
    let privacy = summary.privacy.expect("DP recorded");
    let mut accountant = DpMechanism::new(distributed_dp()).expect("dp");
    let expected_epsilon = accountant.record_round(DEVICES, 1.0).epsilon;
    assert!(privacy.epsilon > 0.0);
    assert!(
        (privacy.epsilon - expected_epsilon).abs() < 1e-12,
        "{privacy:?}"
    );
    assert_eq!(privacy.noise_std, 1.0);
    assert_eq!(privacy.device_noise_std, Some(noise.noise_std));
    assert_eq!((privacy.clip_norm, privacy.delta), (1.0, 1e-5));
    let cost = summary.secure.expect("secure cost");
    assert_eq!(
        (cost.clients, cost.dropped, summary.reports),
        (DEVICES, 0, DEVICES)
    );

    // The mean in the clear: every device's update clipped to C (the SDK devices' recomputed
    // from their data and local seeds, as the daemon's plans made them train).
    let pool = SeedPool::new(run.run_seed, k);
    let global = load_model(&model);
    let zo_plan = ZoServer::new(run.clone()).plan(0);
    let mut clear = vec![0.0f64; k];
    let mut updates = Vec::new();
    for (id, sequences) in &data {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(fedtune_server::daemon::local_seed(
            config.rounds.seed,
            round,
            *id,
        ));
        let (report, _) = local_round(
            &global,
            &zo_plan,
            &pool,
            sequences,
            1,
            0,
            &mut rng,
            &mut fedtune_shared::progress::Silent,
        );
        updates.push(dense_seed_grads(&report, run.k));
    }
    updates.push(flat.clone());
    let mut norms = Vec::new();
    for mut u in updates {
        norms.push(clip_l2(&mut u, 1.0));
        clear
            .iter_mut()
            .zip(&u)
            .for_each(|(c, &v)| *c += f64::from(v) / DEVICES as f64);
    }
    // The daemon's mean minus the clear mean is the noise: N(0, σ²) with σ the devices' shares
    // summed over 6 and divided by 6, z · C · √(6 / 5) / 6 ≈ 0.183 (quantization: ~1e-7).
    let residual: Vec<f64> = state
        .history()
        .iter()
        .zip(&clear)
        .map(|(&h, &c)| f64::from(h) - c)
        .collect();
    let (mean, std) = moments(&residual);
    let expected = noise.sum_std(DEVICES) / DEVICES as f64;
    eprintln!(
        "distributed DP: noise std {std:.4} measured over {k} values, {expected:.4} expected; \
         mean {mean:.4}; update norms before clipping {norms:.3?}; ε {:.4}",
        privacy.epsilon
    );
    // The standard error of a standard deviation over 1024 values is 2.2%: ±15% is ~7 of them.
    assert!(
        (std / expected - 1.0).abs() < 0.15,
        "noise std {std}, {expected} expected"
    );
    assert!(
        mean.abs() < 5.0 * expected / (k as f64).sqrt(),
        "noise mean {mean}"
    );
    // The oversized update counts clipped: its seeds sit within noise of the clipped mean,
    // nowhere near its raw values / 6.
    for (s, g) in raw {
        let h = f64::from(state.history()[s as usize]);
        assert!(
            (h - clear[s as usize]).abs() < 6.0 * expected,
            "seed {s}: {h}"
        );
        assert!(
            (h - f64::from(g) / DEVICES as f64).abs() > 10.0,
            "seed {s}: {h}"
        );
    }
    // The mean's norm: at most C from the clipped updates, plus the noise's.
    let history_norm = l2_norm(state.history());
    assert!(
        history_norm <= 1.0 + 1.2 * expected * (k as f64).sqrt(),
        "{history_norm}"
    );
}
