//! A whole simulation from its configuration: the data set read and split, the population and
//! fleet built once, each run driven (in process or over QUIC) and written to its folder, then
//! the comparison plots and the report.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fedtune_server::algorithm::combine::UpdateCombiner;
use fedtune_server::config::{AlgorithmConfig, PrivacySettings};
use fedtune_shared::data::example::{Example, tokenize, tokenize_all};
use fedtune_shared::data::instructions::load_jsonl;
use fedtune_shared::data::partition::{dirichlet, heldout_split, iid, natural};
use fedtune_shared::data::plain_text::load_text;
use fedtune_shared::data::shakespeare::load_corpus;
use fedtune_shared::lora::aggregation::AggregationStrategy;
use fedtune_shared::model::Llama;
use fedtune_shared::privacy::dp::{DpConfig, Selection};
use fedtune_shared::robust::RobustRule;
use fedtune_shared::tokenizer::Tokenizer;

use crate::attack::behaviours;
use crate::config::{DataConfig, PartitionKind, RunConfig, SimulationConfig, Transport};
use crate::engine::{Driver, RoundPolicy, blob_store, run_in_process};
use crate::evaluation::{Evaluator, RougeSet};
use crate::fleet::{DeviceProfile, assign};
use crate::plot::{PlotRun, write_plots};
use crate::population::Population;
use crate::quic::{QuicRun, run_quic};
use crate::record::{RoundRecord, RunSummary};
use crate::report::{RunWriter, read_run, report};

/// Why a simulation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimulationError {
    /// The data set could not be read.
    #[error("data: {0}")]
    Data(String),
    /// The configuration cannot work.
    #[error("{0}")]
    Invalid(String),
    /// A run failed.
    #[error("run {label}: {message}")]
    Run {
        /// The run.
        label: String,
        /// What failed.
        message: String,
    },
    /// Output could not be written.
    #[error("output: {0}")]
    Output(String),
}

/// The model the simulation tunes, loaded once.
pub struct LoadedModel<'a> {
    /// The base weights every virtual device shares.
    pub model: &'a Llama,
    /// Its tokenizer.
    pub tokenizer: &'a Tokenizer,
    /// Where it was loaded from (the QUIC daemon and devices load it again).
    pub path: &'a Path,
}

/// Progress callbacks for the command line.
pub trait Progress {
    /// A run starts.
    fn run_started(&self, label: &str, rounds: u64);
    /// A round of the current run ended.
    fn round(&self, record: &RoundRecord);
    /// The current run ended.
    fn run_finished(&self, summary: &RunSummary);
}

/// No progress output.
pub struct Quiet;

impl Progress for Quiet {
    fn run_started(&self, _: &str, _: u64) {}
    fn round(&self, _: &RoundRecord) {}
    fn run_finished(&self, _: &RunSummary) {}
}

/// What a simulation wrote.
#[derive(Debug, Clone)]
pub struct SimulationOutput {
    /// The simulation's folder.
    pub dir: PathBuf,
    /// One folder per run.
    pub runs: Vec<PathBuf>,
    /// Plot files.
    pub plots: Vec<PathBuf>,
    /// The markdown report.
    pub report: PathBuf,
}

/// Reads the configured data set.
pub fn load_examples(data: &DataConfig, texts: &Path) -> Result<Vec<Example>, SimulationError> {
    let wrap = |e: &dyn std::fmt::Display| SimulationError::Data(e.to_string());
    match data {
        DataConfig::Shakespeare { plays } => {
            load_corpus(texts, plays.as_deref()).map_err(|e| wrap(&e))
        }
        DataConfig::Text { path, max_chars } => load_text(path, *max_chars).map_err(|e| wrap(&e)),
        DataConfig::Jsonl { path, fields } => load_jsonl(path, fields).map_err(|e| wrap(&e)),
    }
}

/// Splits `examples` among devices as configured, holds part out, tokenises, and assigns
/// fleet profiles: the population every run of the simulation shares.
pub fn build_population(
    config: &SimulationConfig,
    examples: &[Example],
    tokenizer: &Tokenizer,
    fleet: &[DeviceProfile],
) -> Result<Population, SimulationError> {
    let p = &config.partition;
    let invalid = |e: &dyn std::fmt::Display| SimulationError::Invalid(e.to_string());
    let (names, parts): (Vec<String>, Vec<Vec<usize>>) = match p.kind {
        PartitionKind::Iid => {
            let parts = iid(examples.len(), p.clients, config.seed).map_err(|e| invalid(&e))?;
            (
                (0..parts.len()).map(|i| format!("client-{i}")).collect(),
                parts,
            )
        }
        PartitionKind::Dirichlet => {
            let labels: Vec<&str> = examples
                .iter()
                .map(|e| e.label.as_deref().unwrap_or(""))
                .collect();
            let parts = dirichlet(&labels, p.clients, p.alpha, p.min_items, config.seed)
                .map_err(|e| invalid(&e))?;
            (
                (0..parts.len()).map(|i| format!("client-{i}")).collect(),
                parts,
            )
        }
        PartitionKind::Natural => {
            let split = natural(examples.iter().map(|e| e.key.as_deref()), p.min_items)
                .keep_largest(p.clients);
            (split.names, split.clients)
        }
    };
    if parts.is_empty() {
        return Err(SimulationError::Invalid(
            "the partition gave no client (too few examples, or no keys for a natural partition)"
                .into(),
        ));
    }
    let split = heldout_split(&parts, p.heldout_fraction, config.seed).map_err(|e| invalid(&e))?;
    // Only the examples some device holds are tokenised, once; devices hold indices.
    let mut used: Vec<usize> = split.train.iter().flatten().copied().collect();
    used.sort_unstable();
    used.dedup();
    let position = |item: usize| used.binary_search(&item).map(|i| i as u32).unwrap_or(0);
    let selected: Vec<Example> = used.iter().map(|&i| examples[i].clone()).collect();
    let train = tokenize_all(&selected, tokenizer, config.seq_len).map_err(|e| invalid(&e))?;
    let items: Vec<Vec<u32>> = split
        .train
        .iter()
        .map(|client| client.iter().map(|&i| position(i)).collect())
        .collect();
    let heldout_items: Vec<&Example> = split
        .heldout
        .iter()
        .take(config.evaluation.max_examples)
        .map(|&i| &examples[i])
        .collect();
    let heldout = heldout_items
        .iter()
        .map(|e| tokenize(e, tokenizer, config.seq_len))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(&e))?;
    let profiles = assign(fleet, names.len());
    let pad = tokenizer.pad_id().unwrap_or(0);
    let mut population = Population::new(train, names, items, &profiles, heldout, pad, config.seed)
        .map_err(|e| invalid(&e))?;
    population.set_behaviours(&behaviours(
        fleet,
        &profiles,
        config.fleet.attackers.as_ref(),
        config.seed,
    ));
    population.heldout_answers = split
        .heldout
        .iter()
        .map(|&i| &examples[i])
        .filter(|e| e.is_instruction())
        .take(config.evaluation.rouge_examples)
        .cloned()
        .collect();
    Ok(population)
}

/// The algorithm's name in records (`fedkseed-pro`, `flexlora`, …).
pub fn algorithm_name(algorithm: &AlgorithmConfig) -> &'static str {
    match algorithm {
        AlgorithmConfig::Fedkseed { run, .. } if run.pro => "fedkseed-pro",
        AlgorithmConfig::Fedkseed { .. } => "fedkseed",
        AlgorithmConfig::Lora { strategy, .. } => match strategy {
            AggregationStrategy::FedAvg => "lora-fedavg",
            AggregationStrategy::HetLora => "hetlora",
            AggregationStrategy::FlexLora => "flexlora",
        },
        AlgorithmConfig::FedSpine { .. } => "fedspine",
    }
}

/// Runs every run of `config` over one population and writes `output/name/`: a folder per
/// run, the plots and `report.md`.
pub fn simulate(
    config: &SimulationConfig,
    model: &LoadedModel<'_>,
    examples: &[Example],
    command: &str,
    progress: &dyn Progress,
) -> Result<SimulationOutput, SimulationError> {
    let fleet = config
        .fleet
        .profiles()
        .map_err(|e| SimulationError::Invalid(e.to_string()))?;
    let population = build_population(config, examples, model.tokenizer, &fleet)?;
    tracing::info!(
        clients = population.clients.len(),
        examples = population.examples.len(),
        heldout = population.heldout.len(),
        "population built"
    );
    let dir = config.output.join(&config.name);
    let output = |e: &dyn std::fmt::Display| SimulationError::Output(e.to_string());
    std::fs::create_dir_all(&dir).map_err(|e| output(&e))?;
    let evaluator = Evaluator {
        heldout: population.heldout.clone(),
        pad_id: population.pad_id,
        rouge: (!population.heldout_answers.is_empty()).then(|| RougeSet {
            tokenizer: model.tokenizer.clone(),
            examples: population.heldout_answers.clone(),
            max_prompt_tokens: config.seq_len,
            max_new_tokens: config.evaluation.max_new_tokens,
        }),
    };
    let mut run_dirs = Vec::new();
    for run in &config.runs {
        let run_dir = dir.join(&run.label);
        run_one(
            config,
            run,
            model,
            &population,
            &fleet,
            &evaluator,
            &run_dir,
            command,
            progress,
        )?;
        run_dirs.push(run_dir);
    }
    let runs: Vec<PlotRun> = run_dirs
        .iter()
        .map(|d| {
            read_run(d)
                .map(|r| PlotRun::from(&r))
                .map_err(|e| output(&e))
        })
        .collect::<Result<_, _>>()?;
    let plots = write_plots(&runs, &dir).map_err(|e| output(&e))?;
    let table = report(&run_dirs, None).map_err(|e| output(&e))?;
    let report_path = dir.join("report.md");
    std::fs::write(
        &report_path,
        format!("# {}\n\nCommand: `{command}`\n\n{table}", config.name),
    )
    .map_err(|e| output(&e))?;
    Ok(SimulationOutput {
        dir,
        runs: run_dirs,
        plots,
        report: report_path,
    })
}

#[allow(clippy::too_many_arguments)]
fn run_one(
    config: &SimulationConfig,
    run: &RunConfig,
    model: &LoadedModel<'_>,
    population: &Population,
    fleet: &[DeviceProfile],
    evaluator: &Evaluator,
    run_dir: &Path,
    command: &str,
    progress: &dyn Progress,
) -> Result<(), SimulationError> {
    let failed = |e: &dyn std::fmt::Display| SimulationError::Run {
        label: run.label.clone(),
        message: e.to_string(),
    };
    let name = algorithm_name(&run.algorithm);
    let algorithm = with_pad(run.algorithm.clone(), population.pad_id);
    let started = Instant::now();
    progress.run_started(&run.label, config.rounds);
    let mut writer = RunWriter::create(run_dir).map_err(|e| failed(&e))?;
    let mut records = Vec::new();
    let mut write_error = None;
    let work = scratch_dir(run_dir).map_err(|e| failed(&e))?;
    let (initial, final_eval) = match config.transport {
        Transport::InProcess => {
            let blobs = blob_store(&work).map_err(|e| failed(&e))?;
            // In process the harness draws each round's devices uniformly at random from the
            // available ones, so a round is accounted at its count over the population, as
            // Poisson sampling at that rate would be (the usual approximation for a fixed-size
            // random sample), whatever selection the daemon's setting names.
            let dp = run.privacy.dp.map(|dp| DpConfig {
                selection: Selection::Poisson,
                ..dp
            });
            let combiner = UpdateCombiner::new(run.robust, dp).map_err(|e| failed(&e))?;
            let mut driver = Driver::with_combiner(
                &algorithm,
                model.model,
                blobs.clone(),
                config.seed,
                None,
                combiner,
            )
            .map_err(|e| failed(&e))?;
            let policy = RoundPolicy {
                rounds: config.rounds,
                clients_per_round: config.clients_per_round,
                deadline_s: config.deadline_s,
                seed: config.seed,
                eval_every: config.evaluation.every,
                concurrency: config
                    .concurrency
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
                secure: run.privacy.secure_aggregation.then_some(run.privacy.secagg),
            };
            let initial = run_in_process(
                &run.label,
                name,
                model.model,
                &mut driver,
                &blobs,
                population,
                fleet,
                &policy,
                evaluator,
                |record| {
                    progress.round(record);
                    if let Err(e) = writer.record(record) {
                        write_error.get_or_insert(e);
                    }
                    records.push(record.clone());
                },
            )
            .map_err(|e| failed(&e))?;
            (initial, None)
        }
        Transport::Quic => {
            let initial = evaluator.evaluate(model.model);
            let outcome = run_quic(
                &QuicRun {
                    label: run.label.clone(),
                    algorithm_name: name.into(),
                    model: model.path.to_path_buf(),
                    algorithm: algorithm.clone(),
                    robust: run.robust,
                    privacy: run.privacy.clone(),
                    rounds: config.rounds,
                    seed: config.seed,
                    work_dir: work.clone(),
                    timeout: Duration::from_secs(24 * 3600),
                },
                model.model,
                population,
            )
            .map_err(|e| failed(&e))?;
            let blobs = blob_store(&work.join("evaluation")).map_err(|e| failed(&e))?;
            let mut driver = Driver::new(&algorithm, model.model, blobs, config.seed, None)
                .map_err(|e| failed(&e))?;
            let checkpoint = outcome
                .checkpoint
                .as_ref()
                .map(std::fs::read)
                .transpose()
                .map_err(|e| failed(&e))?;
            let global = driver
                .model_from_checkpoint(model.model, checkpoint.as_deref())
                .map_err(|e| failed(&e))?;
            let evaluation = evaluator.evaluate(&global);
            records = outcome.records;
            if let Some(last) = records.last_mut() {
                last.heldout_loss = Some(evaluation.loss);
                last.perplexity = Some(evaluation.loss.exp());
                last.rouge_l = evaluation.rouge_l;
            }
            for record in &records {
                progress.round(record);
                if let Err(e) = writer.record(record) {
                    write_error.get_or_insert(e);
                }
            }
            (initial, Some(evaluation))
        }
    };
    let _ = std::fs::remove_dir_all(&work);
    if let Some(e) = write_error {
        return Err(failed(&e));
    }
    let last_eval = records
        .iter()
        .rev()
        .find_map(|r| r.heldout_loss.map(|l| (l, r.rouge_l)));
    let (final_loss, final_rouge) = last_eval
        .or(final_eval.map(|e| (e.loss, e.rouge_l)))
        .unwrap_or((initial.loss, initial.rouge_l));
    let participations: usize = records.iter().map(|r| r.clients + r.dropped).sum();
    let reporters: usize = records.iter().map(|r| r.clients).sum();
    // The fewest devices a round closes with: what distributed DP's noise is calibrated to.
    let min_reports = match config.transport {
        Transport::InProcess => config.clients_per_round,
        Transport::Quic => population.clients.len(),
    };
    let summary = RunSummary {
        run: run.label.clone(),
        algorithm: name.into(),
        model: model.path.display().to_string(),
        clients: population.clients.len(),
        attackers: population.attackers(),
        attack: attack_description(population),
        robust: (run.robust != RobustRule::Mean).then(|| robust_description(&run.robust)),
        privacy: privacy_description(&run.privacy, min_reports),
        final_epsilon: records.iter().rev().find_map(|r| r.epsilon),
        rounds: config.rounds,
        initial_heldout_loss: initial.loss,
        final_heldout_loss: final_loss,
        final_perplexity: final_loss.exp(),
        final_rouge_l: final_rouge,
        sim_time_s: records.last().map_or(0.0, |r| r.sim_time_s),
        bytes_up_per_client_round: records.iter().map(|r| r.bytes_up as f64).sum::<f64>()
            / reporters.max(1) as f64,
        bytes_down_per_client_round: records.iter().map(|r| r.bytes_down as f64).sum::<f64>()
            / participations.max(1) as f64,
        host_wall_s: started.elapsed().as_secs_f64(),
        peak_rss_bytes: fedtune_shared::peak_memory::peak_rss_bytes(),
        command: command.into(),
    };
    writer.finish(&summary).map_err(|e| failed(&e))?;
    progress.run_finished(&summary);
    Ok(())
}

/// A robust rule with its setting (`trimmed_mean (trim 0.2)`, `krum (f = 2, multi 6)`).
pub fn robust_description(rule: &RobustRule) -> String {
    match *rule {
        RobustRule::TrimmedMean { trim } => format!("trimmed_mean (trim {trim})"),
        RobustRule::NormBound { max_norm } => format!("norm_bound (max norm {max_norm})"),
        RobustRule::Krum { byzantine, multi } => {
            format!("krum (f = {byzantine}, multi {multi})")
        }
        other => other.name().to_string(),
    }
}

/// A run's secure aggregation and DP settings, for the report (`None` when both are off):
/// `SecAgg+ (clip 10, degree 16, max drop-out 0.3)`, `central DP (z = 1, C = 1, δ = 1e-5,
/// population 30)`, or with `distributed DP (… each device adds N(0, σ²), σ = …, at least m
/// devices in a sum)`; `min_reports` is the fewest devices a round closes with.
pub fn privacy_description(privacy: &PrivacySettings, min_reports: usize) -> Option<String> {
    let mut parts = Vec::new();
    if privacy.secure_aggregation {
        let s = &privacy.secagg;
        parts.push(format!(
            "SecAgg+ (clip {}, degree {}, max drop-out {})",
            s.clip, s.degree, s.max_dropout
        ));
    }
    if let Some(dp) = &privacy.dp {
        let clip = match dp.clip.adaptive {
            Some(a) => format!(
                "C = {} adaptive (quantile {}, lr {})",
                dp.clip.norm, a.target_quantile, a.lr
            ),
            None => format!("C = {}", dp.clip.norm),
        };
        let common = format!(
            "z = {}, {clip}, δ = {}, population {}",
            dp.noise_multiplier, dp.delta, dp.population
        );
        parts.push(match privacy.distributed_noise(min_reports) {
            Some(noise) => format!(
                "distributed DP ({common}; each device clips and adds N(0, σ²), σ = {:.4}, at \
                 least {} devices in a sum; equal weights)",
                noise.noise_std, noise.min_clients
            ),
            None => format!("central DP ({common})"),
        });
    }
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// What the population's attackers do (`sign_flip`, `scaled ×-4`, …), `None` without any.
pub fn attack_description(population: &Population) -> Option<String> {
    let mut kinds: Vec<String> = Vec::new();
    for client in &population.clients {
        let kind = client.behaviour.to_string();
        if client.behaviour.is_attack() && !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    (!kinds.is_empty()).then(|| kinds.join(", "))
}

/// `algorithm` with the tokenizer's padding token in its training settings (batches pad
/// with it; a configuration file cannot know it).
fn with_pad(mut algorithm: AlgorithmConfig, pad_id: u32) -> AlgorithmConfig {
    match &mut algorithm {
        AlgorithmConfig::Lora { train, .. } | AlgorithmConfig::FedSpine { train, .. } => {
            train.pad_id = pad_id
        }
        AlgorithmConfig::Fedkseed { .. } => {}
    }
    algorithm
}

/// A scratch folder for a run's blobs and QUIC state, next to its output.
fn scratch_dir(run_dir: &Path) -> std::io::Result<PathBuf> {
    let dir = run_dir.join(".work");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
