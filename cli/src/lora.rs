//! `fedtune lora`: an in-process federated LoRA run on a real model and real text, one client
//! per speaking role of a Shakespeare play, each device training at the rank its bandit picks.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use burn::module::Module;
use fedtune_shared::bandit::BanditPolicy;
use fedtune_shared::lora::aggregation::AggregationStrategy;
use fedtune_shared::lora::attach::attach_weights;
use fedtune_shared::lora::federation::{
    LoraClient, LoraFederationConfig, heldout_loss, rank_histogram, run_lora_federation,
};
use fedtune_shared::lora::peft::{PeftExportOptions, write_peft_adapter};
use fedtune_shared::lora::train::{TrainConfig, TrainExample};
use fedtune_shared::lora::{LoraConfig, LoraScaling, TargetModule};
use fedtune_shared::pretrained::Pretrained;
use serde_json::json;

use crate::role_clients::{RoleClients, role_clients};

/// Simulated device speeds, cycled over the clients: how many times slower than this machine
/// each one is. The bandit sees measured round times multiplied by these.
const SLOWDOWNS: [f64; 4] = [1.0, 2.0, 4.0, 8.0];

/// Settings from the command line.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Play file stem.
    pub play: String,
    /// Clients: the roles with the most speeches.
    pub clients: usize,
    /// Clients per round.
    pub per_round: usize,
    /// Rounds.
    pub rounds: u64,
    /// Optimiser steps per client per round.
    pub steps: usize,
    /// Ranks the bandits choose from.
    pub ranks: Vec<usize>,
    /// Projections with adapters.
    pub targets: Vec<TargetModule>,
    /// Aggregation strategy.
    pub strategy: AggregationStrategy,
    /// Peak learning rate.
    pub lr: f64,
    /// Tokens per training sequence.
    pub seq_len: usize,
    /// Seed of the run.
    pub seed: u64,
    /// Most held-out speeches.
    pub heldout: usize,
    /// Where to write the final global adapter as a PEFT folder.
    pub save_adapter: Option<PathBuf>,
    /// Print JSON lines.
    pub json: bool,
}

/// Runs the federation and prints a line per round.
pub fn run(pretrained: Pretrained, texts: &Path, settings: &Settings) -> anyhow::Result<()> {
    if settings.clients < settings.per_round || settings.per_round == 0 {
        bail!(
            "asked for {} clients, {} per round",
            settings.clients,
            settings.per_round
        );
    }
    let max_rank = settings.ranks.iter().copied().max().unwrap_or(0);
    if max_rank == 0 {
        bail!("--ranks needs at least one positive rank");
    }
    let tokenizer = &pretrained.tokenizer;
    let RoleClients {
        names,
        train,
        heldout,
    } = role_clients(
        texts,
        &settings.play,
        settings.clients,
        settings.seq_len,
        settings.heldout,
        tokenizer,
    )?;
    let clients: Vec<LoraClient> = train
        .into_iter()
        .enumerate()
        .map(|(i, data)| LoraClient {
            data: data.into_iter().map(TrainExample::text).collect(),
            slowdown: SLOWDOWNS[i % SLOWDOWNS.len()],
        })
        .collect();
    let heldout: Vec<TrainExample> = heldout.into_iter().map(TrainExample::text).collect();
    let pad = tokenizer.pad_id().unwrap_or(0);
    let before = heldout_loss(&pretrained.model.valid(), &heldout, pad);
    if settings.json {
        println!(
            "{}",
            json!({ "round": 0, "heldout_loss": before, "heldout_perplexity": before.exp(), "clients": names })
        );
    } else {
        println!("clients (roles, simulated slowdown): {}", {
            let list: Vec<String> = names
                .iter()
                .zip(&clients)
                .map(|(n, c)| format!("{n} ×{}", c.slowdown))
                .collect();
            list.join(", ")
        });
        println!(
            "held-out: {} speeches; before training: loss {before:.5}, perplexity {:.4}",
            heldout.len(),
            before.exp()
        );
        println!(
            "| round | ranks (client:rank) | train loss | held-out loss | held-out perplexity | down bytes | up bytes | local round (s) | peak RSS (MiB) |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
    }
    let lora = LoraConfig {
        rank: max_rank,
        scaling: LoraScaling {
            alpha: 2.0 * max_rank as f32,
            rslora: false,
        },
        dropout: 0.05,
        targets: settings.targets.clone(),
    };
    let config = LoraFederationConfig {
        rounds: settings.rounds,
        clients_per_round: settings.per_round,
        local_steps: settings.steps,
        lora: lora.clone(),
        ranks: settings.ranks.clone(),
        bandit: BanditPolicy::default(),
        train: TrainConfig {
            lr: settings.lr,
            warmup_steps: 2,
            decay_steps: settings.steps * settings.rounds as usize,
            pad_id: pad,
            ..TrainConfig::default()
        },
        strategy: settings.strategy,
        seed: settings.seed,
    };
    let mut history = Vec::new();
    let global = run_lora_federation(pretrained.model.clone(), &clients, &heldout, &config, |s| {
        if settings.json {
            println!(
                "{}",
                json!({
                    "round": s.round, "ranks": s.ranks, "train_loss": s.train_loss,
                    "heldout_loss": s.heldout_loss, "heldout_perplexity": s.heldout_loss.exp(),
                    "download_bytes": s.download_bytes, "upload_bytes": s.upload_bytes,
                    "local_round_s": s.local_round_s, "peak_rss_bytes": s.peak_rss_bytes,
                })
            );
        } else {
            let ranks: Vec<String> = s.ranks.iter().map(|(c, r)| format!("{c}:{r}")).collect();
            println!(
                "| {} | {} | {:.5} | {:.5} | {:.4} | {} | {} | {:.2} | {} |",
                s.round,
                ranks.join(" "),
                s.train_loss,
                s.heldout_loss,
                s.heldout_loss.exp(),
                s.download_bytes,
                s.upload_bytes,
                s.local_round_s,
                s.peak_rss_bytes
                    .map_or("n/a".into(), |b| format!("{:.0}", b as f64 / 1048576.0))
            );
        }
        history.push(s.clone());
    })?;
    if !settings.json {
        println!(
            "ranks trained (rank: client rounds): {:?}",
            rank_histogram(&history)
        );
    }
    if let Some(dir) = &settings.save_adapter {
        let options = PeftExportOptions {
            base_model_name_or_path: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
            lora_dropout: lora.dropout as f32,
        };
        write_peft_adapter(dir, &global, &options)
            .with_context(|| format!("writing the adapter to {}", dir.display()))?;
        // Loading it back must give the same model: fail loudly here rather than in an app.
        attach_weights(pretrained.model.valid(), &global, 0.0)?;
        if !settings.json {
            println!(
                "global adapter (rank {}) written to {}",
                global.rank,
                dir.display()
            );
        }
    }
    Ok(())
}
