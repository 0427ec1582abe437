//! A LoRA adapter as plain numbers: what crosses the wire, what the server aggregates and what
//! is written to disk. The trainable burn module (see `lora.rs`) converts to and from it, so the
//! server and the file formats never touch burn tensors.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A projection of a Llama decoder layer that LoRA can wrap, named as PEFT and Hugging Face name
/// it (`target_modules` in `adapter_config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetModule {
    /// `self_attn.q_proj`
    QProj,
    /// `self_attn.k_proj`
    KProj,
    /// `self_attn.v_proj`
    VProj,
    /// `self_attn.o_proj`
    OProj,
    /// `mlp.gate_proj`
    GateProj,
    /// `mlp.up_proj`
    UpProj,
    /// `mlp.down_proj`
    DownProj,
}

impl TargetModule {
    /// Every target, in the order of a decoder layer.
    pub const ALL: [Self; 7] = [
        Self::QProj,
        Self::KProj,
        Self::VProj,
        Self::OProj,
        Self::GateProj,
        Self::UpProj,
        Self::DownProj,
    ];

    /// The short name: `q_proj`, …
    pub const fn name(self) -> &'static str {
        match self {
            Self::QProj => "q_proj",
            Self::KProj => "k_proj",
            Self::VProj => "v_proj",
            Self::OProj => "o_proj",
            Self::GateProj => "gate_proj",
            Self::UpProj => "up_proj",
            Self::DownProj => "down_proj",
        }
    }

    /// The Hugging Face path inside a decoder layer: `self_attn.q_proj`, `mlp.up_proj`, …
    pub const fn hf_path(self) -> &'static str {
        match self {
            Self::QProj => "self_attn.q_proj",
            Self::KProj => "self_attn.k_proj",
            Self::VProj => "self_attn.v_proj",
            Self::OProj => "self_attn.o_proj",
            Self::GateProj => "mlp.gate_proj",
            Self::UpProj => "mlp.up_proj",
            Self::DownProj => "mlp.down_proj",
        }
    }
}

impl fmt::Display for TargetModule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TargetModule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| format!("unknown LoRA target module `{s}`"))
    }
}

/// Where an adapter sits: decoder layer `layer`, projection `target`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AdaptedLayer {
    /// Decoder layer index, from 0.
    pub layer: usize,
    /// The wrapped projection.
    pub target: TargetModule,
}

/// How the adapter's product is scaled.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LoraScaling {
    /// `alpha` (PEFT's `lora_alpha`).
    pub alpha: f32,
    /// rsLoRA: scale `alpha / sqrt(r)` instead of `alpha / r` (PEFT's `use_rslora`).
    pub rslora: bool,
}

impl LoraScaling {
    /// The factor `s` in `ΔW = s · B A` for rank `rank`.
    pub fn scale(&self, rank: usize) -> f32 {
        if self.rslora {
            self.alpha / (rank as f32).sqrt()
        } else {
            self.alpha / rank as f32
        }
    }
}

/// One adapted projection's factors in PEFT's orientation: the projection computes
/// `y = x Wᵀ + s · x Aᵀ Bᵀ`, i.e. `ΔW = s · B A` for a `[d_out, d_in]` weight `W`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraFactors {
    /// Rank `r`.
    pub rank: usize,
    /// Input features of the wrapped projection.
    pub d_in: usize,
    /// Output features of the wrapped projection.
    pub d_out: usize,
    /// `A`, row-major `[rank, d_in]` (PEFT's `lora_A.weight`).
    pub a: Vec<f32>,
    /// `B`, row-major `[d_out, rank]` (PEFT's `lora_B.weight`).
    pub b: Vec<f32>,
}

impl LoraFactors {
    /// Checks that the factor lengths agree with the shape.
    pub fn is_consistent(&self) -> bool {
        self.a.len() == self.rank * self.d_in && self.b.len() == self.d_out * self.rank
    }

    /// `B A`, row-major `[d_out, d_in]`, without the scale.
    pub fn product(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.d_out * self.d_in];
        for (o, row) in out.chunks_exact_mut(self.d_in).enumerate() {
            for k in 0..self.rank {
                let b = self.b[o * self.rank + k];
                if b == 0.0 {
                    continue;
                }
                let a_row = &self.a[k * self.d_in..(k + 1) * self.d_in];
                row.iter_mut().zip(a_row).for_each(|(r, &a)| *r += b * a);
            }
        }
        out
    }
}

/// A whole adapter: the factors of every adapted projection, all of one rank.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterWeights {
    /// Rank of every factor pair.
    pub rank: usize,
    /// Scaling shared by every layer.
    pub scaling: LoraScaling,
    /// The factors, by position in the model.
    pub layers: BTreeMap<AdaptedLayer, LoraFactors>,
}

impl AdapterWeights {
    /// `s` for this adapter's rank.
    pub fn scale(&self) -> f32 {
        self.scaling.scale(self.rank)
    }

    /// The adapted projections' kinds, deduplicated, in layer order.
    pub fn targets(&self) -> Vec<TargetModule> {
        let mut targets: Vec<_> = self.layers.keys().map(|l| l.target).collect();
        targets.sort();
        targets.dedup();
        targets
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn product_is_b_times_a() {
        let f = LoraFactors {
            rank: 2,
            d_in: 3,
            d_out: 2,
            a: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            b: vec![1.0, 0.0, 0.5, 2.0],
        };
        assert!(f.is_consistent());
        assert_eq!(f.product(), vec![1.0, 2.0, 3.0, 8.5, 11.0, 13.5]);
    }

    #[test]
    fn scales_and_names() {
        let s = LoraScaling {
            alpha: 16.0,
            rslora: false,
        };
        assert_eq!(s.scale(8), 2.0);
        let rs = LoraScaling {
            alpha: 16.0,
            rslora: true,
        };
        assert_eq!(rs.scale(4), 8.0);
        assert_eq!(
            "down_proj".parse::<TargetModule>(),
            Ok(TargetModule::DownProj)
        );
        assert!("lm_head".parse::<TargetModule>().is_err());
    }
}
