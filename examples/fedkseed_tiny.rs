//! FedKSeed with the library directly, on a tiny model this program builds itself: six clients
//! learn to count, three train each round, and the held-out loss falls while each report stays
//! a few hundred bytes. Runs in seconds, no downloads.
//!
//! `cargo run -p fedtune-examples --example fedkseed_tiny`

use burn::tensor::Device;
use fedtune_shared::checkpoint::MemorySource;
use fedtune_shared::model::{Llama, LlamaConfig};
use fedtune_shared::zo::federation::{FederationConfig, heldout_loss, run_federation};
use fedtune_shared::zo::round::ZoRunConfig;

/// Sequences `s, s+1, s+2, …` (mod 64).
fn counting(starts: impl Iterator<Item = u32>) -> Vec<Vec<u32>> {
    starts
        .map(|s| (0..12).map(|i| (s + i) % 64).collect())
        .collect()
}

fn main() -> anyhow::Result<()> {
    let model = Llama::load(
        &MemorySource::random(LlamaConfig::tiny(), 21),
        &Device::flex(),
        |_, _| {},
    )?;
    let clients: Vec<Vec<Vec<u32>>> = (0..6).map(|c| counting(c * 10..c * 10 + 8)).collect();
    let heldout = counting((0..64).filter(|s| s % 10 >= 8 || *s >= 60));
    println!(
        "held-out loss before: {:.4}",
        heldout_loss(&model, &heldout, 0)
    );

    let config = FederationConfig {
        run: ZoRunConfig {
            k: 256,
            tau: 60,
            lr: 1e-3,
            eps: 1e-3,
            ..ZoRunConfig::default()
        },
        rounds: 20,
        clients_per_round: 3,
        batch_size: 4,
        pad_id: 0,
        seed: 3,
    };
    println!("| round | train loss | held-out loss | plan bytes | report bytes |");
    println!("|---|---|---|---|---|");
    run_federation(model, &clients, &heldout, &config, |s| {
        println!(
            "| {} | {:.4} | {:.4} | {} | {} |",
            s.round, s.train_loss, s.heldout_loss, s.plan_bytes, s.report_bytes
        );
    });
    Ok(())
}
