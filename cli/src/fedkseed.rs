//! `fedtune fedkseed`: an in-process FedKSeed run on a real model and real text, one client per
//! speaking role of a Shakespeare play (LEAF's natural partition).

use std::path::Path;

use anyhow::{Context, bail};
use fedtune_shared::data::shakespeare::by_role;
use fedtune_shared::pretrained::Pretrained;
use fedtune_shared::zo::federation::{FederationConfig, heldout_loss, run_federation};
use fedtune_shared::zo::round::ZoRunConfig;
use serde_json::json;

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
    let path = texts.join(format!("{}_gut.txt", settings.play));
    let play =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut roles: Vec<(String, Vec<String>)> = by_role(&play, 10).into_iter().collect();
    roles.sort_by_key(|(name, speeches)| (std::cmp::Reverse(speeches.len()), name.clone()));
    if roles.len() < settings.clients
        || settings.clients < settings.per_round
        || settings.per_round == 0
    {
        bail!(
            "{} has {} roles with 10 or more speeches; asked for {} clients, {} per round",
            path.display(),
            roles.len(),
            settings.clients,
            settings.per_round
        );
    }
    let tokenizer = &pretrained.tokenizer;
    let encode = |text: &str| -> anyhow::Result<Vec<u32>> {
        let mut ids = tokenizer.encode(text)?;
        ids.truncate(settings.seq_len);
        Ok(ids)
    };
    // Every fifth speech of a client's role is held out: same voices, unseen lines.
    let mut clients = Vec::new();
    let mut heldout = Vec::new();
    for (_, speeches) in roles.iter().take(settings.clients) {
        let mut train = Vec::new();
        for (i, speech) in speeches.iter().enumerate() {
            let ids = encode(speech)?;
            if ids.len() < 2 {
                continue;
            }
            if i % 5 == 4 {
                heldout.push(ids)
            } else {
                train.push(ids)
            }
        }
        clients.push(train);
    }
    heldout.truncate(settings.heldout);
    let names: Vec<&str> = roles
        .iter()
        .take(settings.clients)
        .map(|(n, _)| n.as_str())
        .collect();
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
