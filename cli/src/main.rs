//! `fedtune`: the command line. Argument parsing and printing only; the work is done by the
//! libraries.

mod bench;
mod bench_privacy;
mod bench_server;
mod bench_simulate;
mod fedkseed;
mod fetch;
mod lora;
mod network;
mod prune;
mod role_clients;
mod simulate;

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use fedtune_shared::checkpoint::WeightSource;
use fedtune_shared::checkpoint::export::write_hf_folder;
use fedtune_shared::device::BackendKind;
use fedtune_shared::eval::mean_next_token_nll;
use fedtune_shared::generate::{GenerationConfig, generate};
use fedtune_shared::lora::TargetModule;
use fedtune_shared::lora::aggregation::AggregationStrategy;
use fedtune_shared::lora::attach::{attach_weights, merge};
use fedtune_shared::lora::peft::read_peft_adapter;
use fedtune_shared::pretrained::Pretrained;
use fedtune_shared::tokenizer::ChatMessage;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

/// Tensors of tens to hundreds of megabytes are allocated and freed on every forward and noise
/// pass; the system allocator hands them back to the OS each time, and the kernel then zeroes
/// fresh pages for the next one (a tenth of a zeroth-order step's time). mimalloc keeps them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc's `mi_option_e` (v2 and v3 headers alike); the Rust
/// bindings declare no constant for it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// By default mimalloc still returns freed pages to the OS 10 ms after a free, and a training
/// step frees and reallocates its logits-sized buffers slower than that: the kernel zeroing
/// fresh pages was 9% of a LoRA step. Never purging costs about 16 MB of resident memory and
/// made the step 10% faster (SmolLM2, seq 128: 0.93 s -> 0.84 s).
fn keep_freed_pages() {
    // SAFETY: a documented mimalloc option, set before any worker thread exists.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// Federated fine-tuning of language models.
#[derive(Debug, Parser)]
#[command(name = "fedtune", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the token ids of TEXT (no special tokens added).
    Tokenize {
        #[command(flatten)]
        model: ModelArgs,
        /// Print JSON: {"ids": [...]}.
        #[arg(long)]
        json: bool,
        /// The text.
        text: String,
    },
    /// Mean next-token negative log-likelihood of TEXT (natural log, no BOS added).
    Score {
        #[command(flatten)]
        model: ModelArgs,
        /// Print JSON: {"ids": [...], "mean_next_token_nll": X}.
        #[arg(long)]
        json: bool,
        /// The text.
        text: String,
    },
    /// Continue PROMPT (greedy unless --temperature is set).
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        /// Print JSON: {"new_ids": [...], "text": "..."}.
        #[arg(long)]
        json: bool,
        /// Wrap PROMPT as one user message in the model's chat template.
        #[arg(long)]
        chat: bool,
        /// Most tokens to generate.
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// Sampling temperature (0 = greedy).
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Nucleus sampling threshold.
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// Sampler seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The prompt.
        prompt: String,
    },
    /// Benchmarks; each prints a table, or JSON with --json.
    Bench {
        #[command(subcommand)]
        which: BenchCommand,
    },
    /// FedKSeed in process: one client per speaking role of a Shakespeare play (fetched on
    /// first use), printing held-out loss and traffic per round.
    Fedkseed {
        #[command(flatten)]
        model: ModelArgs,
        /// The play (file stem in the corpus).
        #[arg(long, default_value = "romeo_and_juliet")]
        play: String,
        /// Clients (the roles with the most speeches).
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// Clients sampled per round.
        #[arg(long, default_value_t = 2)]
        per_round: usize,
        /// Rounds.
        #[arg(long, default_value_t = 3)]
        rounds: u64,
        /// Local steps per round (τ).
        #[arg(long, default_value_t = 10)]
        tau: u32,
        /// Candidate seeds (K).
        #[arg(long, default_value_t = 4096)]
        k: u32,
        /// Learning rate.
        #[arg(long, default_value_t = 3e-7)]
        lr: f32,
        /// Perturbation scale.
        #[arg(long, default_value_t = 5e-4)]
        eps: f32,
        /// Sample seeds by FedKSeed-Pro importance.
        #[arg(long)]
        pro: bool,
        /// Tokens per training sequence.
        #[arg(long, default_value_t = 64)]
        seq_len: usize,
        /// Seed of the run (seed pool, sampling).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Most held-out speeches evaluated each round.
        #[arg(long, default_value_t = 24)]
        heldout: usize,
        /// One JSON object per round.
        #[arg(long)]
        json: bool,
    },
    /// Federated LoRA in process: one client per speaking role of a Shakespeare play, each at
    /// the rank its bandit picks (devices of simulated speeds), aggregated across ranks.
    Lora {
        #[command(flatten)]
        model: ModelArgs,
        /// The play (file stem in the corpus).
        #[arg(long, default_value = "romeo_and_juliet")]
        play: String,
        /// Clients (the roles with the most speeches).
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// Clients sampled per round.
        #[arg(long, default_value_t = 4)]
        per_round: usize,
        /// Rounds.
        #[arg(long, default_value_t = 3)]
        rounds: u64,
        /// Optimiser steps per client per round.
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Ranks the bandits choose from (comma-separated).
        #[arg(long, default_value = "2,4,8", value_delimiter = ',')]
        ranks: Vec<usize>,
        /// Projections with adapters (comma-separated).
        #[arg(long, default_value = "q_proj,v_proj", value_delimiter = ',')]
        targets: Vec<String>,
        /// Aggregation: flex-lora, het-lora or fed-avg (equal ranks only).
        #[arg(long, default_value = "flex-lora")]
        strategy: String,
        /// Peak learning rate.
        #[arg(long, default_value_t = 5e-4)]
        lr: f64,
        /// Tokens per training sequence.
        #[arg(long, default_value_t = 64)]
        seq_len: usize,
        /// Seed of the run.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Most held-out speeches evaluated each round.
        #[arg(long, default_value_t = 24)]
        heldout: usize,
        /// Write the final global adapter here as a Hugging Face PEFT folder.
        #[arg(long)]
        save_adapter: Option<PathBuf>,
        /// One JSON object per round.
        #[arg(long)]
        json: bool,
    },
    /// The aggregation daemon (QUIC), or with a subcommand: issue a token, revoke a device.
    Server(fedtune_server::command::ServerArgs),
    /// A device: enroll with a token once, then train on local text whenever the server asks.
    Client(network::ClientArgs),
    /// Fold a PEFT LoRA adapter into its base model and write a Hugging Face safetensors model
    /// (with the base model's tokenizer).
    Merge {
        #[command(flatten)]
        model: ModelArgs,
        /// The adapter folder (adapter_config.json + adapter_model.safetensors).
        #[arg(long)]
        adapter: PathBuf,
        /// Output folder (config.json + model.safetensors).
        #[arg(long)]
        out: PathBuf,
    },
    /// Structured pruning (whole attention groups and MLP channels), one shot: calibrate on a
    /// text, remove a fraction of the projection weights, write a Hugging Face folder (per-layer
    /// sizes, compensation biases, tokenizer, pruning.json) and print held-out perplexity
    /// before and after.
    Prune(prune::PruneArgs),
    /// A federated simulation on one machine: virtual devices of a modelled fleet, a real data
    /// partition, one or more algorithms compared; writes metrics, plots and a report.
    Simulate(simulate::SimulateArgs),
    /// Compares finished simulation runs in a markdown table (and plots).
    Report(simulate::ReportArgs),
    /// Download the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) into the models folder.
    FetchModel {
        /// Target folder (default: $FEDTUNE_MODELS_DIR or ./models).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Download the data sets the examples and tests use (the Shakespeare corpus) into the data
    /// folder ($FEDTUNE_DATA_DIR or ./data).
    FetchData,
    /// Show a model's configuration and tensors.
    Inspect {
        #[command(flatten)]
        model: ModelArgs,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// The simulation harness at scale: N virtual devices (1,000 by default) on a tiny model
    /// or SmolLM2; memory per idle device, peak memory and the harness's overhead per round.
    Simulate(bench_simulate::BenchSimulateArgs),
    /// One round of N clients with secure aggregation, central DP and robust rules: bytes per
    /// client and server time for LoRA r8 (SmolLM2-135M shapes) and FedKSeed K = 4096.
    Privacy {
        /// Clients in the round.
        #[arg(long, default_value_t = 100)]
        clients: usize,
        /// SecAgg+ neighbours per client.
        #[arg(long, default_value_t = 20)]
        degree: usize,
    },
    /// The daemon under load: N devices on N concurrent QUIC connections exchanging one
    /// FedKSeed round (K = 4096, τ = 200), in one process; a table per phase.
    Server {
        /// Devices (one connection each).
        #[arg(long, default_value_t = 1000)]
        devices: usize,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// One forward pass (batch 1) at a given sequence length; with --compare, two models timed
    /// alternately (a pruned model against its original): medians, speedup, weight memory.
    Forward {
        #[command(flatten)]
        model: ModelArgs,
        /// Another model (.gguf or folder, e.g. `fedtune prune`'s output) timed alternately
        /// with --model in the same process; the table gives its speedup and weight-memory
        /// reduction relative to --model. Repeat to compare several.
        #[arg(long)]
        compare: Vec<PathBuf>,
        /// Tokens in the sequence.
        #[arg(long, default_value_t = 128)]
        seq_len: usize,
        /// Measured runs.
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Unmeasured warm-up runs.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Print JSON: {"median_s": X, "tokens_per_s": Y, "weight_bytes": Z, ...}; with
        /// --compare, {"models": [...], "speedup": S, "weight_reduction": R, ...}.
        #[arg(long)]
        json: bool,
    },
    /// One zeroth-order (MeZO/FedKSeed) step, batch 1, split into noise and forward passes.
    Zo {
        #[command(flatten)]
        model: ModelArgs,
        /// Tokens in the sequence.
        #[arg(long, default_value_t = 128)]
        seq_len: usize,
        /// Measured runs.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Unmeasured warm-up runs.
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// Print JSON: {"median_s": X, "noise_s": Y, "forward_s": Z, "noise_values_per_s": W}.
        #[arg(long)]
        json: bool,
    },
    /// One LoRA training step (forward, backward, AdamW), batch 1, and the peak memory.
    Lora {
        #[command(flatten)]
        model: ModelArgs,
        /// Tokens in the sequence.
        #[arg(long, default_value_t = 128)]
        seq_len: usize,
        /// Adapter rank.
        #[arg(long, default_value_t = 8)]
        rank: usize,
        /// Projections with adapters (comma-separated).
        #[arg(long, default_value = "q_proj,v_proj", value_delimiter = ',')]
        targets: Vec<String>,
        /// Measured runs.
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Unmeasured warm-up runs.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Print JSON: {"median_s": X, "peak_rss_bytes": Y}.
        #[arg(long)]
        json: bool,
    },
}

/// The values `--backend` accepts.
#[cfg(not(feature = "ndarray-comparison"))]
const BACKENDS: [&str; 2] = ["cpu", "wgpu"];
#[cfg(feature = "ndarray-comparison")]
const BACKENDS: [&str; 3] = ["cpu", "wgpu", "ndarray"];

#[derive(Debug, Args)]
struct ModelArgs {
    /// A .gguf file or a Hugging Face folder (default: the SmolLM2 model, fetched on first use).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Where the model runs.
    #[arg(long, default_value = "cpu", value_parser = clap::builder::PossibleValuesParser::new(BACKENDS))]
    backend: String,
}

impl ModelArgs {
    fn path(&self) -> anyhow::Result<PathBuf> {
        match &self.model {
            Some(path) => Ok(path.clone()),
            None => fetch::ensure_default_model(&fetch::models_dir()),
        }
    }

    fn load(&self, quiet: bool) -> anyhow::Result<Pretrained> {
        self.load_on(quiet, false)
    }

    /// Loads onto the backend's device, with autodiff when `training` (backprop through LoRA).
    fn load_on(&self, quiet: bool, training: bool) -> anyhow::Result<Pretrained> {
        let path = self.path()?;
        let backend: BackendKind = self.backend.parse().map_err(anyhow::Error::msg)?;
        let device = backend.device()?;
        let device = if training { device.autodiff() } else { device };
        let bar = if quiet {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(0)
        };
        bar.set_style(
            ProgressStyle::with_template("loading {msg} [{bar:30}] {pos}/{len} tensors")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(path.display().to_string());
        let pretrained = Pretrained::open(&path, &device, |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        })
        .with_context(|| format!("loading {}", path.display()))?;
        bar.finish_and_clear();
        Ok(pretrained)
    }
}

/// `fedtune bench forward --compare`: `base` and `others` timed alternately
/// ([`bench::forward_alternating`]), printed as a table or JSON, each relative to `base`.
fn compare_forward(
    base: &ModelArgs,
    others: &[ModelArgs],
    seq_len: usize,
    warmup: usize,
    runs: usize,
    json: bool,
) -> anyhow::Result<()> {
    let args: Vec<&ModelArgs> = std::iter::once(base).chain(others).collect();
    let models = args
        .iter()
        .map(|a| a.load(json))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let names = args
        .iter()
        .map(|a| a.path())
        .collect::<anyhow::Result<Vec<_>>>()?;
    let refs: Vec<&fedtune_shared::model::Llama> = models.iter().map(|m| &m.model).collect();
    let (timings, paired) = bench::forward_alternating(&refs, seq_len, warmup, runs);
    let bytes: Vec<usize> = refs.iter().map(|&m| bench::weight_bytes(m)).collect();
    let speedup = |i: usize| timings[0].median_s / timings[i].median_s;
    let reduction = |i: usize| 1.0 - bytes[i] as f64 / bytes[0].max(1) as f64;
    if json {
        let rows: Vec<serde_json::Value> = (0..refs.len())
            .map(|i| {
                json!({
                    "model": names[i].display().to_string(),
                    "median_s": timings[i].median_s,
                    "min_s": timings[i].min_s,
                    "runs": timings[i].runs,
                    "weight_bytes": bytes[i],
                    "params": fedtune_shared::prune::model_params(refs[i]),
                    "speedup": speedup(i),
                    "paired_speedup": paired[i],
                    "weight_reduction": reduction(i),
                })
            })
            .collect();
        // The first comparison's figures at the top level, for the common two-model case.
        println!(
            "{}",
            json!({
                "seq_len": seq_len,
                "backend": base.backend,
                "models": rows,
                "speedup": speedup(1),
                "paired_speedup": paired[1],
                "weight_reduction": reduction(1),
            })
        );
    } else {
        println!(
            "forward, batch 1 x {seq_len} tokens, {} runs each, alternating ({} backend)",
            timings[0].runs, base.backend
        );
        println!(
            "| model | median (s) | min (s) | speedup | paired speedup | weights (MiB) | weight reduction |"
        );
        println!("|---|---|---|---|---|---|---|");
        for i in 0..refs.len() {
            println!(
                "| {} | {:.4} | {:.4} | {:.3}x | {:.3}x | {:.1} | {:.1}% |",
                names[i].display(),
                timings[i].median_s,
                timings[i].min_s,
                speedup(i),
                paired[i],
                bytes[i] as f64 / 1048576.0,
                100.0 * reduction(i)
            );
        }
    }
    Ok(())
}

/// `--targets q_proj,v_proj` as target modules.
fn parse_targets(names: &[String]) -> anyhow::Result<Vec<TargetModule>> {
    names
        .iter()
        .map(|t| t.parse::<TargetModule>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)
}

fn main() -> anyhow::Result<()> {
    keep_freed_pages();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Tokenize { model, json, text } => {
            let tokenizer = Pretrained::open_tokenizer(model.path()?)?;
            let ids = tokenizer.encode(&text)?;
            if json {
                println!("{}", json!({ "ids": ids }));
            } else {
                for id in &ids {
                    let token = tokenizer.id_to_token(*id).unwrap_or_default();
                    println!("{id:>6}  {token:?}");
                }
            }
        }
        Command::Score { model, json, text } => {
            let pretrained = model.load(json)?;
            let ids = pretrained.tokenizer.encode(&text)?;
            let Some(nll) = mean_next_token_nll(&pretrained.model, &ids) else {
                bail!(
                    "scoring needs at least two tokens, `{text}` has {}",
                    ids.len()
                );
            };
            if json {
                println!("{}", json!({ "ids": ids, "mean_next_token_nll": nll }));
            } else {
                println!("tokens: {}", ids.len());
                println!(
                    "mean next-token NLL: {nll:.6} (perplexity {:.3})",
                    nll.exp()
                );
            }
        }
        Command::Generate {
            model,
            json,
            chat,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            prompt,
        } => {
            let pretrained = model.load(json)?;
            let tokenizer = &pretrained.tokenizer;
            let text = if chat {
                let message = ChatMessage {
                    role: "user".into(),
                    content: prompt,
                };
                tokenizer.apply_chat_template(&[message], true)?
            } else {
                prompt
            };
            let ids = tokenizer.encode(&text)?;
            if ids.is_empty() {
                bail!("the prompt is empty");
            }
            let config = GenerationConfig {
                max_new_tokens,
                temperature,
                top_p,
                seed,
                stop_ids: tokenizer.end_of_turn_ids(),
            };
            let mut stdout = std::io::stdout();
            let mut printed = 0usize;
            let mut so_far = Vec::new();
            let generation = generate(&pretrained.model, &ids, &config, |id| {
                if json {
                    return;
                }
                // Stream whole characters: decode everything so far and print the new suffix.
                so_far.push(id);
                if let Ok(text) = tokenizer.decode(&so_far)
                    && text.len() > printed
                    && text.is_char_boundary(printed)
                    && !text.ends_with('\u{FFFD}')
                {
                    let _ = write!(stdout, "{}", &text[printed..]);
                    let _ = stdout.flush();
                    printed = text.len();
                }
            });
            let text = tokenizer.decode(&generation.new_ids)?;
            if json {
                println!("{}", json!({ "new_ids": generation.new_ids, "text": text }));
            } else {
                if text.len() > printed {
                    print!("{}", &text[printed..]);
                }
                println!();
            }
        }
        Command::Bench { which } => match which {
            BenchCommand::Server { devices, json } => bench_server::run(devices, json)?,
            BenchCommand::Simulate(args) => bench_simulate::run(args)?,
            BenchCommand::Privacy { clients, degree } => bench_privacy::run(clients, degree)?,
            BenchCommand::Forward {
                model,
                compare,
                seq_len,
                runs,
                warmup,
                json,
            } if !compare.is_empty() => {
                if seq_len == 0 {
                    bail!("--seq-len must be positive");
                }
                let others: Vec<ModelArgs> = compare
                    .into_iter()
                    .map(|path| ModelArgs {
                        model: Some(path),
                        backend: model.backend.clone(),
                    })
                    .collect();
                compare_forward(&model, &others, seq_len, warmup, runs, json)?;
            }
            BenchCommand::Forward {
                model,
                compare: _,
                seq_len,
                runs,
                warmup,
                json,
            } => {
                if seq_len == 0 {
                    bail!("--seq-len must be positive");
                }
                let pretrained = model.load(json)?;
                let t = bench::forward(&pretrained.model, seq_len, warmup, runs);
                let tokens_per_s = seq_len as f64 / t.median_s;
                // Two FLOPs per weight per token in the projections and the output head.
                let matmul_params = pretrained.config.num_params()
                    - pretrained.config.vocab_size
                        * pretrained.config.hidden_size
                        * usize::from(!pretrained.config.tie_word_embeddings);
                let gflops = 2.0 * matmul_params as f64 * seq_len as f64 / t.median_s / 1e9;
                let weight_bytes = bench::weight_bytes(&pretrained.model);
                if json {
                    println!(
                        "{}",
                        json!({
                            "median_s": t.median_s,
                            "tokens_per_s": tokens_per_s,
                            "min_s": t.min_s,
                            "runs": t.runs,
                            "seq_len": seq_len,
                            "backend": model.backend,
                            "gflop_per_s": gflops,
                            "weight_bytes": weight_bytes,
                        })
                    );
                } else {
                    println!(
                        "| benchmark | backend | seq_len | runs | median (s) | min (s) | tokens/s | GFLOP/s | weights (MiB) |"
                    );
                    println!("|---|---|---|---|---|---|---|---|---|");
                    println!(
                        "| forward | {} | {seq_len} | {} | {:.4} | {:.4} | {tokens_per_s:.1} | {gflops:.1} | {:.1} |",
                        model.backend,
                        t.runs,
                        t.median_s,
                        t.min_s,
                        weight_bytes as f64 / 1048576.0
                    );
                    println!("weight_bytes: {weight_bytes}");
                }
            }
            BenchCommand::Zo {
                model,
                seq_len,
                runs,
                warmup,
                json,
            } => {
                if seq_len < 2 {
                    bail!("--seq-len must be at least 2");
                }
                let pretrained = model.load(json)?;
                let t = bench::zo(pretrained.model, seq_len, warmup, runs);
                if json {
                    println!("{}", serde_json::to_string(&t)?);
                } else {
                    println!(
                        "| benchmark | backend | seq_len | runs | step median (s) | noise (s) | forwards (s) | noise values/s |"
                    );
                    println!("|---|---|---|---|---|---|---|---|");
                    println!(
                        "| zo step | {} | {seq_len} | {runs} | {:.4} | {:.4} | {:.4} | {:.3e} |",
                        model.backend, t.median_s, t.noise_s, t.forward_s, t.noise_values_per_s
                    );
                }
            }
            BenchCommand::Lora {
                model,
                seq_len,
                rank,
                targets,
                runs,
                warmup,
                json,
            } => {
                if seq_len < 2 || rank == 0 {
                    bail!("--seq-len must be at least 2 and --rank positive");
                }
                let targets = parse_targets(&targets)?;
                let pretrained = model.load_on(json, true)?;
                let t = bench::lora(pretrained.model, seq_len, rank, targets, warmup, runs);
                if json {
                    println!("{}", serde_json::to_string(&t)?);
                } else {
                    println!(
                        "| benchmark | backend | seq_len | rank | runs | step median (s) | min (s) | peak RSS (MiB) |"
                    );
                    println!("|---|---|---|---|---|---|---|---|");
                    println!(
                        "| lora step | {} | {seq_len} | {rank} | {} | {:.4} | {:.4} | {} |",
                        model.backend,
                        t.runs,
                        t.median_s,
                        t.min_s,
                        t.peak_rss_bytes.map_or("n/a".to_string(), |b| format!(
                            "{:.0}",
                            b as f64 / 1048576.0
                        ))
                    );
                }
            }
        },
        Command::Lora {
            model,
            play,
            clients,
            per_round,
            rounds,
            steps,
            ranks,
            targets,
            strategy,
            lr,
            seq_len,
            seed,
            heldout,
            save_adapter,
            json,
        } => {
            let strategy = match strategy.as_str() {
                "flex-lora" => AggregationStrategy::FlexLora,
                "het-lora" => AggregationStrategy::HetLora,
                "fed-avg" => AggregationStrategy::FedAvg,
                other => bail!("unknown --strategy `{other}` (flex-lora, het-lora or fed-avg)"),
            };
            let targets = parse_targets(&targets)?;
            let texts = fetch::ensure_shakespeare(&fetch::data_dir())?;
            let pretrained = model.load_on(json, true)?;
            let settings = lora::Settings {
                play,
                clients,
                per_round,
                rounds,
                steps,
                ranks,
                targets,
                strategy,
                lr,
                seq_len,
                seed,
                heldout,
                save_adapter,
                json,
            };
            lora::run(pretrained, &texts, &settings)?;
        }
        Command::Server(args) => network::server(args)?,
        Command::Client(args) => network::client(args)?,
        Command::Merge {
            model,
            adapter,
            out,
        } => {
            let (weights, _) = read_peft_adapter(&adapter)
                .with_context(|| format!("reading the adapter {}", adapter.display()))?;
            let pretrained = model.load(false)?;
            let adapted = attach_weights(pretrained.model, &weights, 0.0)
                .context("the adapter does not fit this model")?;
            let merged = merge(adapted);
            write_hf_folder(&merged.to_source(&pretrained.config), &out)
                .with_context(|| format!("writing {}", out.display()))?;
            pretrained
                .tokenizer
                .save_to_folder(&out)
                .with_context(|| format!("writing the tokenizer into {}", out.display()))?;
            println!(
                "merged a rank-{} adapter on {} projections into {}",
                weights.rank,
                weights.layers.len(),
                out.display()
            );
        }
        Command::Fedkseed {
            model,
            play,
            clients,
            per_round,
            rounds,
            tau,
            k,
            lr,
            eps,
            pro,
            seq_len,
            seed,
            heldout,
            json,
        } => {
            let texts = fetch::ensure_shakespeare(&fetch::data_dir())?;
            let pretrained = model.load(json)?;
            let settings = fedkseed::Settings {
                play,
                clients,
                per_round,
                run: fedtune_shared::zo::round::ZoRunConfig {
                    run_seed: seed,
                    k,
                    eps,
                    lr,
                    tau,
                    pro,
                    ..Default::default()
                },
                rounds,
                seq_len,
                seed,
                heldout,
                json,
            };
            fedkseed::run(pretrained, &texts, &settings)?;
        }
        Command::Prune(args) => prune::run(args)?,
        Command::Simulate(args) => simulate::run(args)?,
        Command::Report(args) => simulate::report(args)?,
        Command::FetchModel { dir } => {
            let path = fetch::ensure_default_model(&dir.unwrap_or_else(fetch::models_dir))?;
            println!("{}", path.display());
        }
        Command::FetchData => {
            println!(
                "{}",
                fetch::ensure_shakespeare(&fetch::data_dir())?.display()
            );
        }
        Command::Inspect { model } => {
            let path = model.path()?;
            if path.is_dir() {
                let folder = fedtune_shared::checkpoint::HfFolder::open(&path)?;
                println!("{}", serde_json::to_string_pretty(folder.config())?);
            } else {
                let source = fedtune_shared::checkpoint::GgufSource::open(&path)?;
                println!("{}", serde_json::to_string_pretty(source.config())?);
                println!("parameters: {}", source.config().num_params());
                for t in source.file().tensors() {
                    println!("{:<32} {:?} {:?}", t.name, t.shape(), t.ty);
                }
            }
        }
    }
    Ok(())
}
