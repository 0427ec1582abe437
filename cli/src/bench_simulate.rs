//! `fedtune bench simulate`: the harness itself at scale. N virtual devices over one shared
//! model (a tiny random Llama by default, or SmolLM2), a few in-process rounds, and a table of
//! what the harness costs: memory per idle device, peak memory, and per round the host time
//! left after device training and evaluation (the harness's own overhead).

use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use fedtune_server::config::AlgorithmConfig;
use fedtune_shared::checkpoint::MemorySource;
use fedtune_shared::lora::aggregation::AggregationStrategy;
use fedtune_shared::lora::config::LoraConfig;
use fedtune_shared::lora::train::{TrainConfig, TrainExample};
use fedtune_shared::model::{Llama, LlamaConfig};
use fedtune_shared::peak_memory::{current_rss_bytes, peak_rss_bytes};
use fedtune_shared::zo::round::ZoRunConfig;
use fedtune_simulator::engine::{Driver, RoundPolicy, blob_store, run_in_process};
use fedtune_simulator::evaluation::Evaluator;
use fedtune_simulator::fleet::{FleetSpec, assign};
use fedtune_simulator::population::Population;
use fedtune_simulator::record::RoundRecord;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::ModelArgs;

/// `fedtune bench simulate`.
#[derive(Debug, Args)]
pub struct BenchSimulateArgs {
    /// Virtual devices.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Devices trained per round.
    #[arg(long, default_value_t = 50)]
    per_round: usize,
    /// Rounds.
    #[arg(long, default_value_t = 3)]
    rounds: u64,
    /// `fedkseed` or `lora`.
    #[arg(long, default_value = "fedkseed", value_parser = ["fedkseed", "lora"])]
    algorithm: String,
    /// Use SmolLM2 (or `--model PATH`) instead of a tiny random model.
    #[arg(long)]
    real_model: bool,
    #[command(flatten)]
    model: ModelArgs,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 32)]
    seq_len: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// Sequences each virtual device holds.
const SEQUENCES_PER_CLIENT: usize = 8;

/// Runs the benchmark.
pub fn run(args: BenchSimulateArgs) -> anyhow::Result<()> {
    if args.clients == 0 || args.per_round == 0 || args.rounds == 0 || args.seq_len < 2 {
        bail!("--clients, --per-round and --rounds must be positive and --seq-len at least 2");
    }
    let rss_start = current_rss_bytes();
    let (model, vocab, label) = if args.real_model {
        let pretrained = args.model.load(args.json)?;
        let vocab = pretrained.config.vocab_size;
        (
            pretrained.model,
            vocab,
            pretrained.path.display().to_string(),
        )
    } else {
        let config = LlamaConfig::tiny();
        let vocab = config.vocab_size;
        let model = Llama::load(
            &MemorySource::random(config, 7),
            &burn::tensor::Device::flex(),
            |_, _| {},
        )
        .context("building the tiny model")?;
        (model, vocab, "tiny random Llama".to_string())
    };
    let rss_model = current_rss_bytes();

    // Random token sequences: the benchmark measures the harness, not learning.
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut sequence = || -> TrainExample {
        TrainExample::text(
            (0..args.seq_len)
                .map(|_| rng.random_range(0..vocab as u32))
                .collect(),
        )
    };
    let examples: Vec<TrainExample> = (0..args.clients * SEQUENCES_PER_CLIENT)
        .map(|_| sequence())
        .collect();
    let heldout: Vec<TrainExample> = (0..16).map(|_| sequence()).collect();
    let items = (0..args.clients)
        .map(|c| {
            let start = (c * SEQUENCES_PER_CLIENT) as u32;
            (start..start + SEQUENCES_PER_CLIENT as u32).collect()
        })
        .collect();
    let fleet = FleetSpec::default().profiles()?;
    let names = (0..args.clients).map(|c| format!("client-{c}")).collect();
    let before_population = current_rss_bytes();
    let population = Population::new(
        examples,
        names,
        items,
        &assign(&fleet, args.clients),
        heldout,
        0,
        5,
    )?;
    let after_population = current_rss_bytes();
    let per_client = match (before_population, after_population) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / args.clients as f64),
        _ => None,
    };

    let algorithm = match args.algorithm.as_str() {
        "lora" => AlgorithmConfig::Lora {
            lora: LoraConfig::default(),
            ranks: vec![2, 4, 8],
            train: TrainConfig::default(),
            local_steps: 2,
            strategy: AggregationStrategy::FlexLora,
        },
        _ => AlgorithmConfig::Fedkseed {
            run: ZoRunConfig {
                k: 4096,
                tau: 4,
                ..ZoRunConfig::default()
            },
            batch_size: 1,
        },
    };
    let work = tempfile::tempdir()?;
    let blobs = blob_store(work.path())?;
    let mut driver = Driver::new(&algorithm, &model, blobs.clone(), 5, None)?;
    let policy = RoundPolicy {
        rounds: args.rounds,
        clients_per_round: args.per_round,
        deadline_s: None,
        seed: 5,
        eval_every: args.rounds,
        // One device at a time, so that host time minus training time is the harness's own.
        concurrency: 1,
        secure: None,
    };
    let evaluator = Evaluator {
        heldout: population.heldout.clone(),
        pad_id: 0,
        rouge: None,
    };
    let mut records: Vec<RoundRecord> = Vec::new();
    let started = Instant::now();
    run_in_process(
        "bench",
        &args.algorithm,
        &model,
        &mut driver,
        &blobs,
        &population,
        &fleet,
        &policy,
        &evaluator,
        |r| records.push(r.clone()),
    )?;
    let total_s = started.elapsed().as_secs_f64();
    let overhead: Vec<f64> = records
        .iter()
        .map(|r| (r.host_wall_s - r.compute_s - r.eval_s).max(0.0))
        .collect();
    let peak = peak_rss_bytes();
    let mib = |b: Option<u64>| b.map_or("n/a".into(), |b| format!("{:.1}", b as f64 / 1048576.0));
    if args.json {
        println!(
            "{}",
            json!({
                "model": label, "clients": args.clients, "per_round": args.per_round,
                "algorithm": args.algorithm, "rounds": records.len(),
                "peak_rss_bytes": peak, "rss_after_model_bytes": rss_model,
                "rss_start_bytes": rss_start,
                "bytes_per_idle_client": per_client,
                "round_host_s": records.iter().map(|r| r.host_wall_s).collect::<Vec<_>>(),
                "round_compute_s": records.iter().map(|r| r.compute_s).collect::<Vec<_>>(),
                "round_overhead_s": overhead,
                "total_s": total_s,
            })
        );
        return Ok(());
    }
    println!(
        "{} virtual devices on {label}, {} per round, {} ({} rounds, devices one at a time)",
        args.clients,
        args.per_round,
        args.algorithm,
        records.len()
    );
    println!(
        "| round | host (s) | device training (s) | evaluation (s) | harness overhead (s) | overhead per device (ms) |"
    );
    println!("|---|---|---|---|---|---|");
    for (r, o) in records.iter().zip(&overhead) {
        println!(
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2} |",
            r.round,
            r.host_wall_s,
            r.compute_s,
            r.eval_s,
            o,
            o * 1000.0 / (r.clients + r.dropped).max(1) as f64
        );
    }
    println!(
        "memory: {} MiB at start, {} MiB with the model, {} bytes per idle virtual device, peak {} MiB",
        mib(rss_start),
        mib(rss_model),
        per_client.map_or("n/a".into(), |b| format!("{b:.0}")),
        mib(peak)
    );
    Ok(())
}
