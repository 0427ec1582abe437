//! Which projections get adapters, of what rank and scale.

use serde::{Deserialize, Serialize};

use super::adapter::{LoraScaling, TargetModule};

/// LoRA settings of one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoraConfig {
    /// Rank `r`.
    pub rank: usize,
    /// `alpha` and the scaling rule.
    pub scaling: LoraScaling,
    /// Dropout on each adapter's input while training.
    pub dropout: f64,
    /// The projections of every decoder layer that get an adapter.
    pub targets: Vec<TargetModule>,
}

impl Default for LoraConfig {
    /// PEFT's common recipe: rank 8, alpha 16, dropout 0.05, on `q_proj` and `v_proj`.
    fn default() -> Self {
        Self {
            rank: 8,
            scaling: LoraScaling {
                alpha: 16.0,
                rslora: false,
            },
            dropout: 0.05,
            targets: vec![TargetModule::QProj, TargetModule::VProj],
        }
    }
}

impl LoraConfig {
    /// `s` for this rank.
    pub fn scale(&self) -> f32 {
        self.scaling.scale(self.rank)
    }
}
