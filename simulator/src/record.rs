//! What a simulated run writes: one record per round (`metrics.jsonl`, `metrics.csv`) and a
//! summary (`summary.json`) in the run's folder. Plots and reports read only these files, so a
//! report can compare runs made at different times.

use serde::{Deserialize, Serialize};

/// File names inside a run folder.
pub mod files {
    /// One [`super::RoundRecord`] per line.
    pub const METRICS_JSONL: &str = "metrics.jsonl";
    /// The same records as CSV with a header row.
    pub const METRICS_CSV: &str = "metrics.csv";
    /// The [`super::RunSummary`].
    pub const SUMMARY_JSON: &str = "summary.json";
}

/// One round of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    /// The run's label (for example `flexlora` or `fedkseed-pro`), the legend of plots.
    pub run: String,
    /// The algorithm (`fedkseed`, `fedkseed-pro`, `lora-fedavg`, `hetlora`, `flexlora`,
    /// `fedspine`).
    pub algorithm: String,
    /// The round, 1-based.
    pub round: u64,
    /// Reports aggregated this round.
    pub clients: usize,
    /// Of those, reports from attackers (devices that tampered with their update).
    #[serde(default)]
    pub attackers: usize,
    /// Devices that were given a task but dropped out or missed the deadline.
    pub dropped: usize,
    /// Sample-weighted mean local training loss.
    pub train_loss: f32,
    /// Held-out loss (mean next-token cross-entropy, nats) when evaluated this round.
    pub heldout_loss: Option<f32>,
    /// `exp(heldout_loss)` when evaluated.
    pub perplexity: Option<f32>,
    /// Rouge-L F of greedy generations on held-out instructions, when evaluated (instruction
    /// data only).
    pub rouge_l: Option<f32>,
    /// Simulated wall-clock time of the round: its slowest aggregated device's compute time
    /// scaled by its profile plus its transfer time.
    pub round_time_s: f64,
    /// Simulated wall-clock time since the run started, this round included.
    pub sim_time_s: f64,
    /// Bytes devices sent this round (encoded messages), all devices together.
    pub bytes_up: u64,
    /// Bytes devices received this round.
    pub bytes_down: u64,
    /// Bytes up and down since the run started, this round included.
    pub total_bytes: u64,
    /// Real seconds the harness spent on the round on this machine.
    pub host_wall_s: f64,
    /// Of those, seconds of device training measured on this machine, summed over devices
    /// (more than `host_wall_s` when devices train concurrently).
    #[serde(default)]
    pub compute_s: f64,
    /// Of those, seconds spent evaluating the global model.
    #[serde(default)]
    pub eval_s: f64,
    /// Peak resident memory of the harness process so far, where the OS reports it.
    pub peak_rss_bytes: Option<u64>,
    /// With DP (central, or distributed under secure aggregation): the privacy spent so far
    /// (ε at the configured δ).
    #[serde(default)]
    pub epsilon: Option<f64>,
    /// With DP: the seconds the server spent on it this round (central: clipping, noise and
    /// the accountant; distributed: the accountant alone). DP adds no bytes.
    #[serde(default)]
    pub dp_server_s: Option<f64>,
    /// With secure aggregation: the mean SecAgg+ bytes a device in the sum sent this round (its
    /// four phases' messages, the masked update included), on top of the plain protocol's.
    #[serde(default)]
    pub secagg_up_bytes_per_client: Option<f64>,
    /// With secure aggregation: the mean SecAgg+ bytes such a device received.
    #[serde(default)]
    pub secagg_down_bytes_per_client: Option<f64>,
    /// With secure aggregation: the seconds the server spent in SecAgg+ this round.
    #[serde(default)]
    pub secagg_server_s: Option<f64>,
}

/// The whole run, written when it ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// The run's label.
    pub run: String,
    /// The algorithm.
    pub algorithm: String,
    /// The model it tuned (path or name).
    pub model: String,
    /// Virtual clients in the run.
    pub clients: usize,
    /// Of those, attackers.
    #[serde(default)]
    pub attackers: usize,
    /// What the attackers do (`sign_flip`, `scaled ×-4`, …; several separated by `, `), when
    /// there are any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attack: Option<String>,
    /// The robust rule that combined updates (`median`, `trimmed_mean`, `krum`, …), when not
    /// the algorithm's own averaging.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub robust: Option<String>,
    /// Secure aggregation and differential privacy settings (`SecAgg+ (clip 50, degree 16)`,
    /// `distributed DP (z = 1, C = 1, δ = 1e-5, …)`), when either is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<String>,
    /// ε at the end of the run (for the summary's δ), with DP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_epsilon: Option<f64>,
    /// Rounds run.
    pub rounds: u64,
    /// Held-out loss before the first round.
    pub initial_heldout_loss: f32,
    /// Last evaluated held-out loss.
    pub final_heldout_loss: f32,
    /// `exp(final_heldout_loss)`.
    pub final_perplexity: f32,
    /// Last evaluated Rouge-L F, instruction data only.
    pub final_rouge_l: Option<f32>,
    /// Simulated wall-clock time of the whole run.
    pub sim_time_s: f64,
    /// Mean bytes a participating device sent per round.
    pub bytes_up_per_client_round: f64,
    /// Mean bytes a participating device received per round.
    pub bytes_down_per_client_round: f64,
    /// Real seconds the run took on this machine.
    pub host_wall_s: f64,
    /// Peak resident memory of the harness process, where the OS reports it.
    pub peak_rss_bytes: Option<u64>,
    /// The exact command line that made the run.
    pub command: String,
}
