//! `fedtune fedkseed`: an in-process FedKSeed run on a real model and real text, one client per
//! speaking role of a Shakespeare play (LEAF's natural partition).

use std::path::Path;

use anyhow::bail;
use fedtune_shared::pretrained::Pretrained;
use fedtune_shared::zo::federation::{FederationConfig, heldout_loss, run_federation};
use fedtune_shared::zo::round::ZoRunConfig;
use serde_json::json;

use crate::role_clients::{RoleClients, role_clients};

/// Settings from the command line.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Play file stem (`romeo_and_juliet` reads `romeo_and_juliet_gut.txt`).
    pub play: String,
    /// Clients: the roles with the most speeches.
    pub clients: usize,
    /// Clients per round.
    pub per_round: usize,
    /// The FedKSeed run and the number of rounds.
    pub run: ZoRunConfig,
    /// Rounds.
    pub rounds: u64,
    /// Tokens per training sequence (longer speeches are cut).
    pub seq_len: usize,
    /// Seed of sampling.
    pub seed: u64,
    /// Most held-out speeches (evaluation costs a forward pass over each, every round).
    pub heldout: usize,
    /// Print one JSON object per round.
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
    let tokenizer = &pretrained.tokenizer;
    let RoleClients {
        names,
        train: clients,
        heldout,
    } = role_clients(
        texts,
        &settings.play,
        settings.clients,
        settings.seq_len,
        settings.heldout,
        tokenizer,
    )?;
    let pad = tokenizer.pad_id().unwrap_or(0);
    let before = heldout_loss(&pretrained.model, &heldout, pad);
    if settings.json {
        println!(
            "{}",
            json!({ "round": 0, "heldout_loss": before, "heldout_perplexity": before.exp(), "clients": names })
        );
    } else {
        println!("clients (roles): {}", names.join(", "));
        println!(
            "held-out: {} speeches; before training: loss {before:.5}, perplexity {:.4}",
            heldout.len(),
            before.exp()
        );
        println!(
            "| round | train loss | held-out loss | held-out perplexity | plan bytes | report bytes | seeds touched |"
        );
        println!("|---|---|---|---|---|---|---|");
    }
    let config = FederationConfig {
        run: settings.run.clone(),
        rounds: settings.rounds,
        clients_per_round: settings.per_round,
        batch_size: 1,
        pad_id: pad,
        seed: settings.seed,
    };
    run_federation(pretrained.model, &clients, &heldout, &config, |s| {
        if settings.json {
            println!(
                "{}",
                json!({
                    "round": s.round, "train_loss": s.train_loss, "heldout_loss": s.heldout_loss,
                    "heldout_perplexity": s.heldout_loss.exp(), "plan_bytes": s.plan_bytes,
                    "report_bytes": s.report_bytes, "seeds_touched": s.seeds_touched,
                })
            );
        } else {
            println!(
                "| {} | {:.5} | {:.5} | {:.4} | {} | {} | {} |",
                s.round,
                s.train_loss,
                s.heldout_loss,
                s.heldout_loss.exp(),
                s.plan_bytes,
                s.report_bytes,
                s.seeds_touched
            );
        }
    });
    Ok(())
}
