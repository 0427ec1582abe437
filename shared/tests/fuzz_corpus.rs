//! The fuzz corpus and every fuzz regression, replayed by plain `cargo test` (STYLE.md item 11):
//! each file of `fuzz/corpus/<target>/` and each `fuzz/regressions/<target>-*.bin` goes through
//! the same check as the `cargo fuzz` target of that name
//! (`fedtune_shared::protocol::fuzzing`).
//!
//! The seeds the corpus started from are written by the ignored test `write_seeds`:
//! `cargo test -p fedtune-shared --test fuzz_corpus -- --ignored write_seeds`.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use fedtune_shared::lora::train::TrainConfig;
use fedtune_shared::lora::{AdaptedLayer, AdapterWeights, LoraConfig, LoraFactors};
use fedtune_shared::lora::{LoraScaling, TargetModule};
use fedtune_shared::privacy::dp::DistributedNoise;
use fedtune_shared::privacy::secagg::{
    KeyAdvertisement, MaskedInput, NeighbourKeys, SecAggClient, SecAggConfig,
};
use fedtune_shared::protocol::adapter_blob::encode_adapter;
use fedtune_shared::protocol::auth::PLAN_LABEL;
use fedtune_shared::protocol::frame::{self, HEADER_LEN};
use fedtune_shared::protocol::fuzzing;
use fedtune_shared::protocol::secure::{SecAggDownload, SecAggUpload, SecureRound};
use fedtune_shared::protocol::*;
use fedtune_shared::zo::round::{ClientReport, DeltaEntries, HistoryDelta, RoundPlan, ZoRunConfig};
use fedtune_shared::zo::seed_pool::SeedSampling;

/// A fuzz target's check: returns on any input, panics on a bug.
type Check = fn(&[u8]);

/// The fuzz targets, by the name of their `fuzz/fuzz_targets/<name>.rs`.
const TARGETS: [(&str, Check); 4] = [
    ("request", fuzzing::request),
    ("response", fuzzing::response),
    ("adapter_blob", fuzzing::adapter_blob),
    ("signed_plan", fuzzing::signed_plan),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn corpus_and_regressions_replay() {
    let regressions = files_in(&fuzz_dir().join("regressions"));
    for file in &regressions {
        let name = file.file_name().unwrap().to_string_lossy();
        assert!(
            TARGETS
                .iter()
                .any(|(target, _)| name.starts_with(&format!("{target}-"))),
            "{name}: a regression is named <target>-<what>.bin, for one of the fuzz targets"
        );
    }
    let mut failures = Vec::new();
    for (target, check) in TARGETS {
        let mut files = files_in(&fuzz_dir().join("corpus").join(target));
        let corpus = files.len();
        files.extend(
            regressions
                .iter()
                .filter(|f| {
                    let name = f.file_name().unwrap().to_string_lossy();
                    name.starts_with(&format!("{target}-"))
                })
                .cloned(),
        );
        assert!(
            corpus > 0,
            "fuzz/corpus/{target}/ is empty: nothing of this target was replayed"
        );
        for file in files {
            let data = std::fs::read(&file).expect("readable corpus file");
            if catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
                failures.push(format!("{target}: {}", file.display()));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "fuzz inputs that fail:\n{}",
        failures.join("\n")
    );
}

/// Writes the valid messages the corpus started from (`fuzz/corpus/<target>/seed-*.bin`).
#[test]
#[ignore = "writes the seed corpus into fuzz/corpus"]
fn write_seeds() {
    let mut seeds: Vec<(&str, &str, Vec<u8>)> = Vec::new();
    for (name, request) in requests() {
        seeds.push(("request", name, frame::encode(&request).unwrap()));
    }
    for (name, response) in responses() {
        seeds.push(("response", name, frame::encode(&response).unwrap()));
    }
    for (name, adapter) in adapters() {
        seeds.push(("adapter_blob", name, encode_adapter(&adapter)));
    }
    let key = fuzzing::fuzz_key();
    for (name, plan) in plans() {
        let signed = key.sign_value(PLAN_LABEL, &plan).unwrap();
        // `signed_plan` reads a body, without the frame header.
        seeds.push((
            "signed_plan",
            name,
            frame::encode(&signed).unwrap()[HEADER_LEN..].to_vec(),
        ));
    }
    for (target, name, bytes) in seeds {
        let (_, check) = TARGETS.iter().find(|(t, _)| *t == target).unwrap();
        check(&bytes);
        let dir = fuzz_dir().join("corpus").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{name}.bin")), bytes).unwrap();
    }
}

fn secagg_config() -> SecAggConfig {
    SecAggConfig::new(5, 10, 8, 4.0, 4, 0.3).unwrap()
}

fn secagg_client() -> (SecAggClient, KeyAdvertisement) {
    SecAggClient::new(secagg_config(), 2, [3; 32])
}

fn digest(tag: &str) -> Digest {
    Digest::of(tag.as_bytes())
}

fn stats() -> LocalStats {
    LocalStats {
        samples: 64,
        mean_loss: 2.5,
        first_loss: 3.25,
        loss_after: 2.0,
        wall_s: 12.5,
        peak_rss_bytes: Some(1 << 30),
    }
}

fn requests() -> Vec<(&'static str, Request)> {
    let key = fuzzing::fuzz_key();
    vec![
        (
            "enroll",
            Request::Enroll(EnrollRequest {
                token: "token-123".into(),
                public_key: key.public_key(),
                capabilities: Capabilities {
                    platform: "linux-x86_64".into(),
                    backend: "cpu".into(),
                    memory_bytes: 8 << 30,
                    base_model: digest("model"),
                },
            }),
        ),
        (
            "authenticate",
            Request::Authenticate(AuthenticateRequest {
                device: key.public_key().device_id(),
                signature: vec![0xab; 64],
            }),
        ),
        ("poll", Request::Poll(PollRequest { last_seen_round: 3 })),
        (
            "secagg-advertise",
            Request::SecAgg {
                round: 5,
                message: SecAggUpload::Advertise(secagg_client().1),
            },
        ),
        (
            "secagg-masked",
            Request::SecAgg {
                round: 5,
                message: SecAggUpload::Masked {
                    input: MaskedInput {
                        from: 2,
                        masked: vec![7; 32],
                    },
                    stats: stats(),
                },
            },
        ),
        ("secagg-poll", Request::SecAggPoll { round: 5 }),
        (
            "report-fedkseed",
            Request::Report(Report {
                run_id: 1,
                round: 4,
                stats: stats(),
                payload: ReportPayload::FedKSeed(ClientReport {
                    round: 4,
                    seed_grads: vec![(0, 0.5), (17, -1.25), (4095, 3.0)],
                    step_grads: vec![(17, -1.25)],
                    samples: 64,
                }),
            }),
        ),
        (
            "report-lora",
            Request::Report(Report {
                run_id: 2,
                round: 1,
                stats: LocalStats {
                    peak_rss_bytes: None,
                    ..stats()
                },
                payload: ReportPayload::Lora {
                    adapter: BlobRef {
                        digest: digest("adapter"),
                        len: 4096,
                    },
                    rank: 8,
                },
            }),
        ),
        (
            "download",
            Request::Download {
                digest: digest("global"),
                offset: 1000,
            },
        ),
        (
            "upload-status",
            Request::UploadStatus {
                digest: digest("adapter"),
            },
        ),
        (
            "upload",
            Request::Upload {
                digest: digest("adapter"),
                total: 1 << 20,
                offset: 4096,
            },
        ),
    ]
}

fn fedkseed_plan() -> Plan {
    let key = fuzzing::fuzz_key();
    Plan {
        run_id: 1,
        round: 5,
        device: key.public_key().device_id(),
        base_model: digest("model"),
        local_seed: 99,
        deadline_ms: 60_000,
        task: Task::FedKSeed {
            plan: RoundPlan {
                round: 5,
                config: ZoRunConfig {
                    k: 8,
                    pro: true,
                    ..ZoRunConfig::default()
                },
                sampling: SeedSampling::Probabilities(vec![0.125; 8]),
                catch_up: vec![
                    HistoryDelta {
                        round: 3,
                        entries: DeltaEntries::Sparse(vec![(1, 0.5), (6, -0.25)]),
                    },
                    HistoryDelta {
                        round: 4,
                        entries: DeltaEntries::Dense(vec![0.0, 1.0, -1.0, 0.5, 0.0, 0.0, 2.0, 0.0]),
                    },
                ],
            },
            batch_size: 4,
        },
        secure: None,
    }
}

fn lora_plan(adapter: Option<BlobRef>) -> Plan {
    Plan {
        task: Task::Lora(LoraTask {
            lora: LoraConfig::default(),
            train: TrainConfig::default(),
            local_steps: 10,
            adapter,
            adapter_seed: 7,
            first_step: 20,
        }),
        ..fedkseed_plan()
    }
}

fn plans() -> Vec<(&'static str, Plan)> {
    vec![
        ("fedkseed", fedkseed_plan()),
        (
            "fedkseed-uniform",
            Plan {
                task: Task::FedKSeed {
                    plan: RoundPlan {
                        round: 1,
                        config: ZoRunConfig::default(),
                        sampling: SeedSampling::Uniform,
                        catch_up: Vec::new(),
                    },
                    batch_size: 1,
                },
                ..fedkseed_plan()
            },
        ),
        ("lora-fresh", lora_plan(None)),
        (
            "fedkseed-secure",
            Plan {
                secure: Some(SecureRound {
                    config: secagg_config(),
                    id: 2,
                    max_samples: 4,
                    dp: None,
                }),
                ..fedkseed_plan()
            },
        ),
        (
            "fedkseed-secure-dp",
            Plan {
                secure: Some(SecureRound {
                    config: secagg_config(),
                    id: 2,
                    max_samples: 4,
                    dp: Some(DistributedNoise::new(1.0, 1.1, 4)),
                }),
                ..fedkseed_plan()
            },
        ),
        (
            "lora-adapter",
            lora_plan(Some(BlobRef {
                digest: digest("global"),
                len: 1 << 16,
            })),
        ),
    ]
}

fn responses() -> Vec<(&'static str, Response)> {
    let key = fuzzing::fuzz_key();
    let signed = |plan: &Plan| key.sign_value(PLAN_LABEL, plan).unwrap();
    vec![
        (
            "enrolled",
            Response::Enrolled {
                device: key.public_key().device_id(),
            },
        ),
        ("authenticated", Response::Authenticated),
        (
            "secagg-neighbour-keys",
            Response::SecAgg(SecAggDownload::NeighbourKeys(NeighbourKeys {
                threshold: 2,
                neighbours: vec![secagg_client().1],
            })),
        ),
        ("secagg-accepted", Response::SecAggAccepted { round: 5 }),
        ("plan-fedkseed", Response::Plan(signed(&fedkseed_plan()))),
        ("plan-lora", Response::Plan(signed(&lora_plan(None)))),
        (
            "wait",
            Response::Wait {
                retry_after_ms: 5000,
                reason: "round full".into(),
            },
        ),
        ("finished", Response::Finished { last_round: 20 }),
        (
            "accepted",
            Response::Accepted {
                round: 4,
                duplicate: true,
            },
        ),
        (
            "blob",
            Response::Blob {
                total: 1 << 20,
                offset: 512,
            },
        ),
        ("upload-offset", Response::UploadOffset { offset: 8192 }),
        (
            "uploaded",
            Response::Uploaded {
                digest: digest("adapter"),
            },
        ),
        (
            "error",
            Response::Error(WireError::new(ErrorCode::WrongRound, "round 3 is over")),
        ),
    ]
}

fn adapters() -> Vec<(&'static str, AdapterWeights)> {
    let factors = |rank: usize, d_in: usize, d_out: usize, shift: f32| LoraFactors {
        rank,
        d_in,
        d_out,
        a: (0..rank * d_in).map(|i| i as f32 * 0.5 - shift).collect(),
        b: (0..d_out * rank)
            .map(|i| -(i as f32) * 0.25 + shift)
            .collect(),
    };
    let two_layers = (0..2)
        .flat_map(|layer| {
            [TargetModule::QProj, TargetModule::VProj]
                .into_iter()
                .map(move |target| AdaptedLayer { layer, target })
        })
        .enumerate()
        .map(|(i, l)| (l, factors(2, 3, 4, i as f32)))
        .collect();
    vec![
        (
            "two-layers",
            AdapterWeights {
                rank: 2,
                scaling: LoraScaling {
                    alpha: 16.0,
                    rslora: false,
                },
                layers: two_layers,
            },
        ),
        (
            "rank1-rslora",
            AdapterWeights {
                rank: 1,
                scaling: LoraScaling {
                    alpha: 8.0,
                    rslora: true,
                },
                layers: BTreeMap::from([(
                    AdaptedLayer {
                        layer: 11,
                        target: TargetModule::DownProj,
                    },
                    factors(1, 5, 2, 1.0),
                )]),
            },
        ),
        (
            "empty",
            AdapterWeights {
                rank: 4,
                scaling: LoraScaling {
                    alpha: 1.0,
                    rslora: false,
                },
                layers: BTreeMap::new(),
            },
        ),
    ]
}
