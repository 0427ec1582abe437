//! `fedtune simulate [CONFIG.toml]` and `fedtune report RUN_DIRS...`: argument parsing and
//! progress bars over `fedtune_simulator`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use fedtune_simulator::config::{DataConfig, SimulationConfig, Transport};
use fedtune_simulator::record::{RoundRecord, RunSummary};
use fedtune_simulator::run::{LoadedModel, Progress, load_examples, simulate};
use indicatif::{ProgressBar, ProgressStyle};

use crate::{ModelArgs, fetch};

/// `fedtune simulate`.
#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// The simulation (TOML; see examples/configs/simulate-*.toml). Without it: FedKSeed
    /// against FlexLoRA on SmolLM2, one device per role of six Shakespeare plays, a fleet of
    /// slow, medium and fast boards.
    config: Option<PathBuf>,
    /// Run every device through the real SDK against the real daemon on loopback QUIC.
    #[arg(long, value_parser = ["in-process", "quic"])]
    transport: Option<String>,
    /// Override the number of rounds.
    #[arg(long)]
    rounds: Option<u64>,
    /// Override the output folder.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where the model runs.
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// Print each round as JSON instead of progress bars.
    #[arg(long)]
    json: bool,
}

/// `fedtune report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Run folders (each holding metrics.jsonl and summary.json).
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Held-out loss whose first simulated time each run reached is reported.
    #[arg(long)]
    target_loss: Option<f32>,
    /// Also write the comparison plots into this folder.
    #[arg(long)]
    plots: Option<PathBuf>,
}

struct Bars {
    bar: ProgressBar,
    json: bool,
}

impl Progress for Bars {
    fn run_started(&self, label: &str, rounds: u64) {
        self.bar.reset();
        self.bar.set_length(rounds);
        self.bar.set_prefix(label.to_string());
        self.bar.set_message("starting");
    }

    fn round(&self, r: &RoundRecord) {
        if self.json {
            if let Ok(line) = serde_json::to_string(r) {
                println!("{line}");
            }
            return;
        }
        self.bar.set_position(r.round);
        self.bar.set_message(format!(
            "{} devices reported, {} dropped, train loss {:.4}{}",
            r.clients,
            r.dropped,
            r.train_loss,
            r.heldout_loss.map_or(String::new(), |l| format!(
                ", held-out {l:.4} (ppl {:.2})",
                l.exp()
            ))
        ));
    }

    fn run_finished(&self, s: &RunSummary) {
        if self.json {
            return;
        }
        self.bar.println(format!(
            "{}: held-out loss {:.4} -> {:.4} (perplexity {:.2} -> {:.2}) in {} rounds, simulated {:.0} s, host {:.0} s",
            s.run,
            s.initial_heldout_loss,
            s.final_heldout_loss,
            s.initial_heldout_loss.exp(),
            s.final_perplexity,
            s.rounds,
            s.sim_time_s,
            s.host_wall_s
        ));
        if let Some(privacy) = &s.privacy {
            let epsilon = s
                .final_epsilon
                .map_or(String::new(), |e| format!("; ε = {e:.3}"));
            self.bar.println(format!("  {privacy}{epsilon}"));
        }
    }
}

/// Runs `fedtune simulate`.
pub fn run(args: SimulateArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => SimulationConfig::load(path)?,
        None => SimulationConfig::default_simulation(),
    };
    if let Some(t) = &args.transport {
        config.transport = if t == "quic" {
            Transport::Quic
        } else {
            Transport::InProcess
        };
    }
    if let Some(rounds) = args.rounds {
        config.rounds = rounds;
    }
    if let Some(out) = &args.out {
        config.output = out.clone();
    }
    config.validate()?;
    let model_args = ModelArgs {
        model: (config.model != "default").then(|| PathBuf::from(&config.model)),
        backend: args.backend.clone(),
    };
    let pretrained = model_args.load(args.json)?;
    let texts = match &config.data {
        DataConfig::Shakespeare { .. } => fetch::ensure_shakespeare(&fetch::data_dir())?,
        _ => PathBuf::new(),
    };
    let examples = load_examples(&config.data, &texts)?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let bar = if args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(config.rounds)
    };
    bar.set_style(
        ProgressStyle::with_template("{prefix:>12} round {pos}/{len} [{bar:25}] ETA {eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let progress = Bars {
        bar,
        json: args.json,
    };
    let output = simulate(
        &config,
        &LoadedModel {
            model: &pretrained.model,
            tokenizer: &pretrained.tokenizer,
            path: &pretrained.path,
        },
        &examples,
        &command,
        &progress,
    )?;
    progress.bar.finish_and_clear();
    if !args.json {
        let report = std::fs::read_to_string(&output.report)
            .with_context(|| format!("reading {}", output.report.display()))?;
        println!("{report}");
        println!("runs, plots and report in {}", output.dir.display());
    }
    Ok(())
}

/// Runs `fedtune report`.
pub fn report(args: ReportArgs) -> anyhow::Result<()> {
    println!(
        "{}",
        fedtune_simulator::report::report(&args.runs, args.target_loss)?
    );
    if let Some(dir) = &args.plots {
        for path in fedtune_simulator::plot::plot_run_dirs(&args.runs, dir)? {
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}
