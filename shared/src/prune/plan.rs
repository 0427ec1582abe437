//! Choosing what to prune: one global ranking of every unit of every layer, cut at a target
//! count of removed parameters: a fraction of the prunable parameters (fedtune's default) or of
//! the whole model (the literature's "pruning ratio"; [`RatioBasis`]).

use serde::{Deserialize, Serialize};

use super::calibration::{CalibrationStats, InputMeans};
use super::flap::flap_scores;
use super::kept::KeptUnits;
use super::magnitude::magnitude_rms;
use super::units::{LayerScores, LayerShape, Unit, UnitKind, model_params, prunable_params};
use crate::model::Llama;

/// What a pruning ratio is a fraction of.
///
/// The two differ by the weights structured pruning cannot touch: embeddings, output head,
/// norms. In SmolLM2-135M the tied 49152×576 embedding alone is 21% of the model, so 30% of the
/// prunable weights is 23.7% of the model, and 30% of the model is 38% of the prunable weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RatioBasis {
    /// The seven projections of every layer ([`prunable_params`]): fedtune's default, and what
    /// FedSpine's schedule and a device's assigned ratio count.
    #[default]
    Prunable,
    /// Every weight of the model ([`model_params`]), as LLM-Pruner's and FLAP's "pruning ratio
    /// 20%" (LLaMA-7B 6.7B → 5.4B parameters).
    Total,
}

impl RatioBasis {
    /// The parameter count a ratio on this basis is a fraction of.
    pub fn params(self, model: &Llama) -> usize {
        match self {
            Self::Prunable => prunable_params(model),
            Self::Total => model_params(model),
        }
    }

    /// The parameters to remove from `model` for `ratio` on this basis: `round(ratio · params)`.
    pub fn target(self, model: &Llama, ratio: f64) -> usize {
        (ratio * self.params(model) as f64).round() as usize
    }

    /// The basis's name (`prunable`, `total`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Prunable => "prunable",
            Self::Total => "total",
        }
    }
}

impl std::fmt::Display for RatioBasis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Constraints on a pruning plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneOptions {
    /// Layers at the start never pruned. Default 0, as FLAP; LLM-Pruner keeps the first few,
    /// whose units every later layer builds on.
    pub protect_first: usize,
    /// Never prune the last layer, which feeds the output head directly. Default `false`.
    pub protect_last: bool,
    /// Key/value groups every layer keeps. Default (and least) 1: a layer without attention
    /// heads is not a shape the model can run.
    pub min_kv_heads: usize,
    /// Intermediate channels every layer keeps. Default (and least) 1, for the same reason.
    pub min_ffn_channels: usize,
    /// Fold the mean of removed inputs into the `o_proj`/`down_proj` biases (FLAP's bias
    /// compensation; [`plan_flap`] only, since it needs calibration means). Default `true`.
    pub bias_compensation: bool,
    /// What the ratio is a fraction of. Default [`RatioBasis::Prunable`].
    #[serde(default)]
    pub ratio_of: RatioBasis,
}

impl Default for PruneOptions {
    fn default() -> Self {
        Self {
            protect_first: 0,
            protect_last: false,
            min_kv_heads: 1,
            min_ffn_channels: 1,
            bias_compensation: true,
            ratio_of: RatioBasis::Prunable,
        }
    }
}

/// What to prune: the units each layer keeps, and optionally the mean inputs that bias
/// compensation folds in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrunePlan {
    /// One record per layer, in order, in the coordinates of the model the plan was made for.
    pub keep: Vec<KeptUnits>,
    /// Per-layer mean inputs of `o_proj` and `down_proj`; `None` prunes without compensation.
    pub compensation: Option<Vec<InputMeans>>,
}

/// A plan that cannot be made or does not fit the model.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// The ratio is not in `[0, 1)`.
    #[error("pruning ratio {0} is not in [0, 1)")]
    Ratio(f64),
    /// The scores (or statistics) do not have one entry per unit of the model.
    #[error("scores do not fit the model: {0}")]
    Mismatch(String),
    /// Every unit the options allow was removed and the target is still out of reach.
    #[error(
        "at most {reachable:.4} of the {basis} parameters can go under these options, not {ratio}"
    )]
    Unreachable {
        /// The requested ratio.
        ratio: f64,
        /// The largest ratio the options allow, on the same basis.
        reachable: f64,
        /// What both ratios are fractions of.
        basis: RatioBasis,
    },
    /// A kept-unit record is invalid for its layer.
    #[error("invalid plan: {0}")]
    Invalid(String),
}

impl PrunePlan {
    /// A plan that keeps everything.
    pub fn keep_all(model: &Llama) -> Self {
        Self {
            keep: model
                .layers
                .iter()
                .enumerate()
                .map(|(i, layer)| KeptUnits::all(i, &LayerShape::of(layer)))
                .collect(),
            compensation: None,
        }
    }

    /// Checks the plan against the model it is to prune: one valid record per layer
    /// ([`KeptUnits::check`]) and compensation means of the projections' widths.
    pub fn check(&self, model: &Llama) -> Result<(), PlanError> {
        if self.keep.len() != model.layers.len() {
            return Err(PlanError::Invalid(format!(
                "{} records for {} layers",
                self.keep.len(),
                model.layers.len()
            )));
        }
        for (i, (kept, layer)) in self.keep.iter().zip(&model.layers).enumerate() {
            kept.check(i, &LayerShape::of(layer))
                .map_err(PlanError::Invalid)?;
        }
        if let Some(means) = &self.compensation {
            let fits = means.len() == model.layers.len()
                && means.iter().zip(&model.layers).all(|(m, l)| {
                    m.o_proj.len() == l.attention.o_proj.dims().0
                        && m.down_proj.len() == l.mlp.down_proj.dims().0
                });
            if !fits {
                return Err(PlanError::Invalid(
                    "compensation means do not fit the model".into(),
                ));
            }
        }
        Ok(())
    }

    /// Parameters of the seven projections the plan removes from `model`.
    pub fn removed_params(&self, model: &Llama) -> usize {
        self.keep
            .iter()
            .zip(&model.layers)
            .map(|(kept, layer)| {
                let shape = LayerShape::of(layer);
                (shape.num_kv_heads - kept.kv_heads.len()) * shape.attention_unit_params()
                    + (shape.intermediate - kept.ffn_channels.len()) * shape.ffn_channel_params()
            })
            .sum()
    }
}

/// Chooses the units to remove so that about `ratio` of the model's parameters go, counted on
/// `options.ratio_of` ([`RatioBasis`]: the prunable ones, [`prunable_params`], counted over every
/// layer, protected ones included; or all of them, [`model_params`]).
///
/// `scores` must be comparable across layers and kinds (FLAP's standardised scores,
/// [`magnitude_rms`]); higher is more important. The rule:
///
/// 1. units of protected layers are never candidates;
/// 2. candidates are visited from the lowest score up (ties by layer, kind, index);
/// 3. a unit is removed when its layer keeps more than the minimum of its kind afterwards and
///    its parameter cost ([`LayerShape::unit_params`]: a head of SmolLM2 costs as much as
///    `2(g+1)·head_dim/3 ≈ 171` channels) still fits under the target
///    `round(ratio · basis)` ([`RatioBasis::target`]); otherwise it is passed over and the walk
///    goes on.
///
/// This is FLAP's cost-weighted threshold (`compression_weight` in their code) taken from below:
/// the removed count never exceeds the target and falls short of it by less than the cheapest
/// unit still available. Only projection weights count as removed; the compensation biases a
/// plan may add (one `hidden`-wide vector per pruned projection) are not subtracted.
///
/// # Errors
/// [`PlanError::Ratio`] outside `[0, 1)`, [`PlanError::Mismatch`] when the scores do not fit the
/// model, [`PlanError::Unreachable`] when every candidate is gone and the target is still more
/// than one FFN channel away.
pub fn select(
    model: &Llama,
    scores: &[LayerScores],
    ratio: f64,
    options: &PruneOptions,
) -> Result<Vec<KeptUnits>, PlanError> {
    if !(0.0..1.0).contains(&ratio) {
        return Err(PlanError::Ratio(ratio));
    }
    let shapes: Vec<LayerShape> = model.layers.iter().map(LayerShape::of).collect();
    check_scores(&shapes, scores)?;
    let layers = shapes.len();
    let protected = |layer: usize| {
        layer < options.protect_first || (options.protect_last && layer + 1 == layers)
    };

    let mut candidates: Vec<(f64, Unit)> = Vec::new();
    for (layer, s) in scores.iter().enumerate().filter(|(l, _)| !protected(*l)) {
        let unit = |kind, index| Unit { layer, kind, index };
        candidates.extend(
            s.kv_heads
                .iter()
                .enumerate()
                .map(|(i, &v)| (v, unit(UnitKind::Attention, i))),
        );
        candidates.extend(
            s.ffn_channels
                .iter()
                .enumerate()
                .map(|(i, &v)| (v, unit(UnitKind::Ffn, i))),
        );
    }
    candidates.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));

    let target = options.ratio_of.target(model, ratio);
    let mut kept_heads: Vec<usize> = shapes.iter().map(|s| s.num_kv_heads).collect();
    let mut kept_channels: Vec<usize> = shapes.iter().map(|s| s.intermediate).collect();
    let mut removed_units = vec![Vec::new(); layers];
    let mut removed = 0usize;
    let mut exhausted = true;
    for &(_, unit) in &candidates {
        let shape = &shapes[unit.layer];
        let (kept, minimum) = match unit.kind {
            UnitKind::Attention => (&mut kept_heads[unit.layer], options.min_kv_heads.max(1)),
            UnitKind::Ffn => (
                &mut kept_channels[unit.layer],
                options.min_ffn_channels.max(1),
            ),
        };
        if *kept <= minimum {
            continue;
        }
        let cost = shape.unit_params(unit.kind);
        if removed + cost > target {
            exhausted = false;
            continue;
        }
        *kept -= 1;
        removed += cost;
        removed_units[unit.layer].push(unit);
    }
    let cheapest = shapes.iter().map(LayerShape::ffn_channel_params).min();
    if exhausted && target.saturating_sub(removed) >= cheapest.unwrap_or(1) {
        return Err(PlanError::Unreachable {
            ratio,
            reachable: removed as f64 / options.ratio_of.params(model).max(1) as f64,
            basis: options.ratio_of,
        });
    }

    Ok(shapes
        .iter()
        .zip(removed_units)
        .enumerate()
        .map(|(layer, (shape, removed))| {
            let gone = |kind| -> Vec<usize> {
                let mut v: Vec<usize> = removed
                    .iter()
                    .filter(|u| u.kind == kind)
                    .map(|u| u.index)
                    .collect();
                v.sort_unstable();
                v
            };
            let (heads, channels) = (gone(UnitKind::Attention), gone(UnitKind::Ffn));
            KeptUnits {
                layer,
                kv_heads: (0..shape.num_kv_heads)
                    .filter(|h| heads.binary_search(h).is_err())
                    .collect(),
                ffn_channels: (0..shape.intermediate)
                    .filter(|c| channels.binary_search(c).is_err())
                    .collect(),
            }
        })
        .collect())
}

/// A FLAP plan: [`flap_scores`] from `stats`, [`select`]ed at `ratio`, with the calibration
/// means for bias compensation when `options.bias_compensation` is set.
///
/// # Errors
/// As [`select`]; [`PlanError::Mismatch`] when `stats` was not collected on this model.
pub fn plan_flap(
    stats: &CalibrationStats,
    model: &Llama,
    ratio: f64,
    options: &PruneOptions,
) -> Result<PrunePlan, PlanError> {
    if !stats.fits(model) {
        return Err(PlanError::Mismatch(
            "calibration statistics have other widths than the model".into(),
        ));
    }
    let keep = select(model, &flap_scores(model, stats), ratio, options)?;
    Ok(PrunePlan {
        keep,
        compensation: options.bias_compensation.then(|| stats.means()),
    })
}

/// A weight-magnitude plan: [`magnitude_rms`] [`select`]ed at `ratio`. No compensation (there
/// are no calibration means; set [`PrunePlan::compensation`] from [`calibrate`](super::calibrate)
/// to add it).
///
/// # Errors
/// As [`select`].
pub fn plan_magnitude(
    model: &Llama,
    ratio: f64,
    options: &PruneOptions,
) -> Result<PrunePlan, PlanError> {
    Ok(PrunePlan {
        keep: select(model, &magnitude_rms(model), ratio, options)?,
        compensation: None,
    })
}

fn check_scores(shapes: &[LayerShape], scores: &[LayerScores]) -> Result<(), PlanError> {
    if scores.len() != shapes.len() {
        return Err(PlanError::Mismatch(format!(
            "{} layers of scores for {} layers",
            scores.len(),
            shapes.len()
        )));
    }
    for (i, (shape, s)) in shapes.iter().zip(scores).enumerate() {
        if s.kv_heads.len() != shape.num_kv_heads || s.ffn_channels.len() != shape.intermediate {
            return Err(PlanError::Mismatch(format!(
                "layer {i}: {} head and {} channel scores for {} heads and {} channels",
                s.kv_heads.len(),
                s.ffn_channels.len(),
                shape.num_kv_heads,
                shape.intermediate
            )));
        }
    }
    Ok(())
}
