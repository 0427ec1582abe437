//! Aggregation of adapters trained on differently pruned models (FedSpine).
//!
//! A client that pruned its model trained its adapters on the smaller projections: on a
//! projection that lost outputs (`q_proj`, `k_proj`, `v_proj`, `gate_proj`, `up_proj`) its `B`
//! (PEFT `[d_out, r]`) has only the kept rows; on one that lost inputs (`o_proj`, `down_proj`)
//! its `A` (`[r, d_in]`) has only the kept columns. The other factor is whole. Each projection
//! loses units along one axis only, so a client's coverage of a layer's update `ΔW`
//! (`[d_out, d_in]`) is a set of whole rows (outputs) or whole columns (inputs).
//!
//! - [`scatter_adapter`] puts a pruned client's factors back into the full model's coordinates
//!   (zero where it pruned), [`restrict_adapter`] takes the kept part of a full adapter: what a
//!   pruned client receives. One undoes the other on the kept part.
//! - [`aggregate_masked`] averages each coordinate of `ΔW` over the clients that kept it,
//!   sample-weighted, combined with FlexLoRA's heterogeneous ranks (see its formula).

use std::collections::BTreeMap;
use std::num::NonZeroUsize;

use thiserror::Error;

use super::{AggregationError, Aggregator, ClientAdapter, FlexLora};
use crate::lora::adapter::{AdaptedLayer, AdapterWeights, LoraFactors, TargetModule};
use crate::prune::kept::{Axis, KeptUnits, gather, scatter};
use crate::prune::units::LayerShape;

/// One pruned client's upload: its adapter in its kept coordinates, and what it kept.
#[derive(Debug, Clone, PartialEq)]
pub struct PrunedClientAdapter {
    /// The adapter it trained, on its pruned projections.
    pub weights: AdapterWeights,
    /// Per layer of the full model, the units it kept (the full model's numbering).
    pub kept: Vec<KeptUnits>,
    /// Training samples it used (`n_k`).
    pub samples: u64,
}

/// The side of a projection that pruning shrinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrunedSide {
    /// Outputs: rows of `ΔW` and of PEFT's `B`.
    Outputs,
    /// Inputs: columns of `ΔW` and of PEFT's `A`.
    Inputs,
}

/// Where `target`'s units sit in a layer of the full shape `shape` that kept `kept`: the pruned
/// side, the kept indices along it, and that side's full length.
pub fn kept_side(
    target: TargetModule,
    kept: &KeptUnits,
    shape: &LayerShape,
) -> (PrunedSide, Vec<usize>, usize) {
    let (g, d) = (shape.group(), shape.head_dim);
    let queries = shape.num_heads * d;
    match target {
        TargetModule::QProj => (PrunedSide::Outputs, kept.query_columns(g, d), queries),
        TargetModule::KProj | TargetModule::VProj => (
            PrunedSide::Outputs,
            kept.kv_columns(d),
            shape.num_kv_heads * d,
        ),
        TargetModule::OProj => (PrunedSide::Inputs, kept.query_columns(g, d), queries),
        TargetModule::GateProj | TargetModule::UpProj => (
            PrunedSide::Outputs,
            kept.ffn_channels.clone(),
            shape.intermediate,
        ),
        TargetModule::DownProj => (
            PrunedSide::Inputs,
            kept.ffn_channels.clone(),
            shape.intermediate,
        ),
    }
}

/// A pruned upload or a kept-unit record that does not fit the model.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum MaskedError {
    /// The record does not have one valid entry per layer of the model.
    #[error("kept units: {0}")]
    Kept(String),
    /// A layer's factors do not have the shape its kept units give.
    #[error("layer {}.{}: factors are [{}, {}] at rank {}, the kept units give [{}, {}]", .layer.layer, .layer.target, .found.0, .found.1, .rank, .expected.0, .expected.1)]
    Shape {
        /// The layer.
        layer: AdaptedLayer,
        /// `(d_out, d_in)` the kept units give.
        expected: (usize, usize),
        /// `(d_out, d_in)` of the factors.
        found: (usize, usize),
        /// The factors' rank.
        rank: usize,
    },
    /// The adapter names a layer the model does not have.
    #[error("layer {} is beyond the model's {layers} layers", .layer.layer)]
    NoSuchLayer {
        /// The layer.
        layer: AdaptedLayer,
        /// Layers of the model.
        layers: usize,
    },
    /// The strategy underneath refused the (scattered) uploads.
    #[error(transparent)]
    Aggregation(#[from] AggregationError),
}

/// Checks `kept` against the full model's `shapes`: one valid record per layer.
pub fn check_kept(kept: &[KeptUnits], shapes: &[LayerShape]) -> Result<(), MaskedError> {
    if kept.len() != shapes.len() {
        return Err(MaskedError::Kept(format!(
            "{} records for {} layers",
            kept.len(),
            shapes.len()
        )));
    }
    for (i, (k, shape)) in kept.iter().zip(shapes).enumerate() {
        k.check(i, shape).map_err(MaskedError::Kept)?;
    }
    Ok(())
}

/// The full shape `(d_out, d_in)` of `target` in a layer shaped `shape`.
fn full_dims(target: TargetModule, shape: &LayerShape) -> (usize, usize) {
    let queries = shape.num_heads * shape.head_dim;
    let kv = shape.num_kv_heads * shape.head_dim;
    match target {
        TargetModule::QProj => (queries, shape.hidden),
        TargetModule::KProj | TargetModule::VProj => (kv, shape.hidden),
        TargetModule::OProj => (shape.hidden, queries),
        TargetModule::GateProj | TargetModule::UpProj => (shape.intermediate, shape.hidden),
        TargetModule::DownProj => (shape.hidden, shape.intermediate),
    }
}

/// Applies `map` to every layer's factors with that layer's target geometry, after checking
/// `kept` and that every adapted layer exists.
fn map_layers(
    weights: &AdapterWeights,
    kept: &[KeptUnits],
    shapes: &[LayerShape],
    mut map: impl FnMut(
        AdaptedLayer,
        &LoraFactors,
        PrunedSide,
        &[usize],
        (usize, usize),
    ) -> Result<LoraFactors, MaskedError>,
) -> Result<AdapterWeights, MaskedError> {
    check_kept(kept, shapes)?;
    let mut layers = BTreeMap::new();
    for (&at, f) in &weights.layers {
        let (Some(k), Some(shape)) = (kept.get(at.layer), shapes.get(at.layer)) else {
            return Err(MaskedError::NoSuchLayer {
                layer: at,
                layers: shapes.len(),
            });
        };
        let (side, indices, _) = kept_side(at.target, k, shape);
        layers.insert(at, map(at, f, side, &indices, full_dims(at.target, shape))?);
    }
    Ok(AdapterWeights {
        rank: weights.rank,
        scaling: weights.scaling,
        layers,
    })
}

/// A pruned client's adapter in the full model's coordinates: rows of `B` (outputs) or columns
/// of `A` (inputs) go to the indices their units had in the full model; pruned positions are
/// zero, so the scattered `ΔW` is the client's update there and zero elsewhere.
///
/// # Errors
/// [`MaskedError`] when `kept` does not fit `shapes` or a layer's factors do not have the shape
/// the kept units give (outside input: checked, never a panic).
pub fn scatter_adapter(
    weights: &AdapterWeights,
    kept: &[KeptUnits],
    shapes: &[LayerShape],
) -> Result<AdapterWeights, MaskedError> {
    map_layers(
        weights,
        kept,
        shapes,
        |at, f, side, indices, (d_out, d_in)| {
            let r = f.rank;
            let expected = match side {
                PrunedSide::Outputs => (indices.len(), d_in),
                PrunedSide::Inputs => (d_out, indices.len()),
            };
            let consistent = r.checked_mul(f.d_in) == Some(f.a.len())
                && f.d_out.checked_mul(r) == Some(f.b.len());
            if (f.d_out, f.d_in) != expected || !consistent || r == 0 {
                return Err(MaskedError::Shape {
                    layer: at,
                    expected,
                    found: (f.d_out, f.d_in),
                    rank: r,
                });
            }
            let (a, b) = match side {
                PrunedSide::Outputs => (
                    f.a.clone(),
                    scatter(&f.b, [f.d_out, r], Axis::Rows, indices, d_out),
                ),
                PrunedSide::Inputs => (
                    scatter(&f.a, [r, f.d_in], Axis::Columns, indices, d_in),
                    f.b.clone(),
                ),
            };
            Ok(LoraFactors {
                rank: r,
                d_in,
                d_out,
                a,
                b,
            })
        },
    )
}

/// The part of a full-coordinate adapter that a client which kept `kept` uses: the kept rows
/// of `B` (outputs) or columns of `A` (inputs).
///
/// # Errors
/// [`MaskedError`] when `kept` does not fit `shapes` or `full` is not in full coordinates.
pub fn restrict_adapter(
    full: &AdapterWeights,
    kept: &[KeptUnits],
    shapes: &[LayerShape],
) -> Result<AdapterWeights, MaskedError> {
    map_layers(full, kept, shapes, |at, f, side, indices, (d_out, d_in)| {
        let r = f.rank;
        if (f.d_out, f.d_in) != (d_out, d_in) || !f.is_consistent() {
            return Err(MaskedError::Shape {
                layer: at,
                expected: (d_out, d_in),
                found: (f.d_out, f.d_in),
                rank: r,
            });
        }
        Ok(match side {
            PrunedSide::Outputs => LoraFactors {
                rank: r,
                d_in,
                d_out: indices.len(),
                a: f.a.clone(),
                b: gather(&f.b, [d_out, r], Axis::Rows, indices),
            },
            PrunedSide::Inputs => LoraFactors {
                rank: r,
                d_in: indices.len(),
                d_out,
                a: gather(&f.a, [r, d_in], Axis::Columns, indices),
                b: f.b.clone(),
            },
        })
    })
}

/// `global` (full coordinates) with a pruned client's tuned adapter written over the
/// coordinates it kept: on an output-pruned projection the tuned `A` and the tuned rows of `B`,
/// the global rows of `B` where it pruned; on an input-pruned one the tuned `B` and the tuned
/// columns of `A`, the global columns elsewhere. What the client's round did to the full model:
/// how a FedSpine device measures its progress without charging the pruning itself (the units
/// it removed are still in the global model).
///
/// # Errors
/// [`MaskedError`] when `tuned` does not fit `kept` or the ranks differ.
pub fn overlay_adapter(
    global: &AdapterWeights,
    tuned: &AdapterWeights,
    kept: &[KeptUnits],
    shapes: &[LayerShape],
) -> Result<AdapterWeights, MaskedError> {
    let scattered = scatter_adapter(tuned, kept, shapes)?;
    let mut out = scattered.clone();
    for (at, f) in out.layers.iter_mut() {
        let Some(g) = global.layers.get(at) else {
            return Err(AggregationError::LayerMismatch {
                client: 0,
                layer: *at,
            }
            .into());
        };
        if (g.rank, g.d_out, g.d_in) != (f.rank, f.d_out, f.d_in) || !g.is_consistent() {
            return Err(MaskedError::Shape {
                layer: *at,
                expected: (f.d_out, f.d_in),
                found: (g.d_out, g.d_in),
                rank: g.rank,
            });
        }
        let (side, indices, len) = kept_side(at.target, &kept[at.layer], &shapes[at.layer]);
        let mut mask = vec![false; len];
        indices.iter().for_each(|&j| mask[j] = true);
        let r = f.rank;
        match side {
            PrunedSide::Outputs => {
                for ((row, grow), &m) in f.b.chunks_exact_mut(r).zip(g.b.chunks_exact(r)).zip(&mask)
                {
                    if !m {
                        row.copy_from_slice(grow);
                    }
                }
            }
            PrunedSide::Inputs => {
                for (row, grow) in f.a.chunks_exact_mut(f.d_in).zip(g.a.chunks_exact(f.d_in)) {
                    for ((x, &y), &m) in row.iter_mut().zip(grow).zip(&mask) {
                        if !m {
                            *x = y;
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Per-coordinate sample-weighted averaging of pruned clients' updates, at heterogeneous ranks
/// (FlexLoRA), into a global adapter of rank `max_rank` in full coordinates.
///
/// For every adapted layer, with `m_k[j] ∈ {0, 1}` whether client `k` kept unit coordinate `j`
/// (a row of `ΔW` for an output-pruned projection, a column for an input-pruned one), `n_k` its
/// samples, `s_k` its scale and `ΔW_k = s_k B_k A_k` its update scattered to full coordinates:
///
/// ```text
/// w_k[j] = n_k m_k[j] / Σ_i n_i m_i[j]              (0 where nobody kept j)
/// ΔW[j]  = Σ_k w_k[j] ΔW_k[j]  + u[j] ΔW_prev[j]     u[j] = 1 where nobody kept j, else 0
/// ```
///
/// so a coordinate is the sample-weighted mean over the clients that trained it, and one that no
/// client of the round kept keeps the previous global update `ΔW_prev` (rather than dropping to
/// zero because every device happened to prune it). With every client keeping everything this is
/// exactly FlexLoRA's `Σ p_k ΔW_k`.
///
/// Composition with rank: the weights depend on one axis only, so they fold into the factor on
/// that axis (`B_k`'s rows, or `A_k`'s columns) and the weighted sum stays a sum of low-rank
/// products. The folded factors (and the previous adapter as one more "client") go through
/// [`FlexLora`] with equal sample weights `1/K'` (`K'` uploads), the fold carrying `K'·w_k[j]`,
/// which gives the sum above; FlexLoRA then serves every rank by truncated SVD of it. HetLoRA
/// and FedAvg average `A` and `B` separately, and a mean of factors masked along different
/// coordinates is not the mean of their products, so they are not offered here.
///
/// # Errors
/// [`MaskedError`] for an upload that does not fit its kept units or the model, or when
/// FlexLoRA refuses the uploads ([`AggregationError`]: scalings, non-finite values, …).
pub fn aggregate_masked(
    clients: &[PrunedClientAdapter],
    shapes: &[LayerShape],
    max_rank: NonZeroUsize,
    previous: &AdapterWeights,
) -> Result<AdapterWeights, MaskedError> {
    if clients.is_empty() {
        return Err(AggregationError::NoClients.into());
    }
    let total: u128 = clients.iter().map(|c| u128::from(c.samples)).sum();
    if total == 0 {
        return Err(AggregationError::ZeroSamples.into());
    }
    let scattered = clients
        .iter()
        .map(|c| scatter_adapter(&c.weights, &c.kept, shapes))
        .collect::<Result<Vec<_>, _>>()?;
    let uploads = scattered.len() + 1;
    let fold_total = uploads as f64;

    let mut folded: Vec<AdapterWeights> = scattered.clone();
    let mut prev = previous.clone();
    for (&at, reference) in &previous.layers {
        let Some(shape) = shapes.get(at.layer) else {
            return Err(MaskedError::NoSuchLayer {
                layer: at,
                layers: shapes.len(),
            });
        };
        let (d_out, d_in) = full_dims(at.target, shape);
        if (reference.d_out, reference.d_in) != (d_out, d_in) || !reference.is_consistent() {
            return Err(MaskedError::Shape {
                layer: at,
                expected: (d_out, d_in),
                found: (reference.d_out, reference.d_in),
                rank: reference.rank,
            });
        }
        // Per coordinate along the pruned side: Σ_i n_i m_i[j].
        let (side, _, len) = kept_side(at.target, &clients[0].kept[at.layer], shape);
        let mut covered = vec![0.0f64; len];
        let masks: Vec<Vec<bool>> = clients
            .iter()
            .map(|c| {
                let (_, indices, _) = kept_side(at.target, &c.kept[at.layer], shape);
                let mut mask = vec![false; len];
                indices.iter().for_each(|&j| mask[j] = true);
                mask
            })
            .collect();
        for (mask, c) in masks.iter().zip(clients) {
            for (sum, &m) in covered.iter_mut().zip(mask) {
                if m {
                    *sum += c.samples as f64;
                }
            }
        }
        for ((w, mask), c) in folded.iter_mut().zip(&masks).zip(clients) {
            let Some(f) = w.layers.get_mut(&at) else {
                return Err(AggregationError::LayerMismatch {
                    client: 0,
                    layer: at,
                }
                .into());
            };
            let fold: Vec<f64> = mask
                .iter()
                .zip(&covered)
                .map(|(&m, &n)| {
                    if m && n > 0.0 {
                        fold_total * c.samples as f64 / n
                    } else {
                        0.0
                    }
                })
                .collect();
            fold_side(f, side, &fold);
        }
        let keep_previous: Vec<f64> = covered
            .iter()
            .map(|&n| if n > 0.0 { 0.0 } else { fold_total })
            .collect();
        if let Some(f) = prev.layers.get_mut(&at) {
            fold_side(f, side, &keep_previous);
        }
    }
    folded.push(prev);
    let uploads: Vec<ClientAdapter> = folded
        .into_iter()
        .map(|weights| ClientAdapter {
            weights,
            samples: 1,
        })
        .collect();
    let global = FlexLora::new()
        .with_max_rank(max_rank)
        .aggregate(&uploads)?;
    let top = *global.ranks().end();
    Ok(global.for_rank(top.min(max_rank.get()))?)
}

/// Multiplies row `j` of `B` (outputs) or column `j` of `A` (inputs) by `fold[j]`.
fn fold_side(f: &mut LoraFactors, side: PrunedSide, fold: &[f64]) {
    let r = f.rank;
    match side {
        PrunedSide::Outputs => {
            for (row, &w) in f.b.chunks_exact_mut(r.max(1)).zip(fold) {
                row.iter_mut().for_each(|x| *x = (f64::from(*x) * w) as f32);
            }
        }
        PrunedSide::Inputs => {
            for row in f.a.chunks_exact_mut(f.d_in.max(1)) {
                row.iter_mut()
                    .zip(fold)
                    .for_each(|(x, &w)| *x = (f64::from(*x) * w) as f32);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{SCALING, matrix, values};
    use super::*;
    use nalgebra::{DMatrix, DVector};

    /// Two key/value heads of two query heads each (head_dim 2), 3 FFN channels, hidden 4.
    const SHAPE: LayerShape = LayerShape {
        hidden: 4,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 2,
        intermediate: 3,
    };

    fn at(target: TargetModule) -> AdaptedLayer {
        AdaptedLayer { layer: 0, target }
    }

    /// A rank-`rank` adapter on q_proj and down_proj of a model shaped [`SHAPE`] that kept
    /// `kept`, with random factors from `seed`.
    fn pruned(rank: usize, kept: &KeptUnits, seed: u64) -> AdapterWeights {
        let mut next = values(seed);
        let mut layers = BTreeMap::new();
        for target in [TargetModule::QProj, TargetModule::DownProj] {
            let (side, indices, _) = kept_side(target, kept, &SHAPE);
            let (mut d_out, mut d_in) = full_dims(target, &SHAPE);
            match side {
                PrunedSide::Outputs => d_out = indices.len(),
                PrunedSide::Inputs => d_in = indices.len(),
            }
            let a = (0..rank * d_in).map(|_| next()).collect();
            let b = (0..d_out * rank).map(|_| next()).collect();
            layers.insert(
                at(target),
                LoraFactors {
                    rank,
                    d_in,
                    d_out,
                    a,
                    b,
                },
            );
        }
        AdapterWeights {
            rank,
            scaling: SCALING,
            layers,
        }
    }

    fn kept(kv_heads: Vec<usize>, ffn_channels: Vec<usize>) -> KeptUnits {
        KeptUnits {
            layer: 0,
            kv_heads,
            ffn_channels,
        }
    }

    fn delta(w: &AdapterWeights, target: TargetModule) -> DMatrix<f64> {
        let f = &w.layers[&at(target)];
        matrix(f.d_out, f.d_in, &f.product()) * f64::from(w.scale())
    }

    #[test]
    fn restrict_undoes_scatter() {
        let k = vec![kept(vec![1], vec![0, 2])];
        let w = pruned(3, &k[0], 5);
        let full = scatter_adapter(&w, &k, &[SHAPE]).expect("scatter");
        let q = &full.layers[&at(TargetModule::QProj)];
        assert_eq!((q.d_out, q.d_in), (8, 4));
        // Query heads 0 and 1 (rows 0..4 of B) were pruned: zero there.
        assert!(q.b[..4 * 3].iter().all(|&x| x == 0.0));
        let down = &full.layers[&at(TargetModule::DownProj)];
        assert_eq!((down.d_out, down.d_in), (4, 3));
        assert!(down.a.chunks_exact(3).all(|row| row[1] == 0.0));
        assert_eq!(restrict_adapter(&full, &k, &[SHAPE]).expect("restrict"), w);

        // Overlaid on a global adapter: the kept part is the client's, the rest the global's.
        let global = pruned(3, &kept(vec![0, 1], vec![0, 1, 2]), 8);
        let over = overlay_adapter(&global, &w, &k, &[SHAPE]).expect("overlay");
        assert_eq!(restrict_adapter(&over, &k, &[SHAPE]).expect("restrict"), w);
        let q = &over.layers[&at(TargetModule::QProj)];
        assert_eq!(q.b[..12], global.layers[&at(TargetModule::QProj)].b[..12]);
        let (down, gdown) = (
            &over.layers[&at(TargetModule::DownProj)],
            &global.layers[&at(TargetModule::DownProj)],
        );
        assert!(
            down.a
                .chunks_exact(3)
                .zip(gdown.a.chunks_exact(3))
                .all(|(x, y)| x[1] == y[1])
        );
    }

    #[test]
    fn scatter_refuses_factors_that_do_not_fit_the_kept_units() {
        let k = vec![kept(vec![1], vec![0, 2])];
        let w = pruned(2, &kept(vec![0, 1], vec![0, 2]), 5);
        assert!(matches!(
            scatter_adapter(&w, &k, &[SHAPE]),
            Err(MaskedError::Shape { .. })
        ));
        let bad = vec![kept(vec![2], vec![0])];
        assert!(matches!(
            scatter_adapter(&w, &bad, &[SHAPE]),
            Err(MaskedError::Kept(_))
        ));
    }

    /// Per-coordinate averaging against its formula, computed densely by hand: client 0 (10
    /// samples) kept head 0 and channels {0, 1}, client 1 (30) head 1 and channels {1}, client 2
    /// (20) both heads and channel {1}. Channel 2 of down_proj was kept by nobody: the previous
    /// global update stays there.
    #[test]
    fn per_coordinate_average_matches_its_formula() {
        let records = [
            (kept(vec![0], vec![0, 1]), 10u64, 2usize),
            (kept(vec![1], vec![1]), 30, 4),
            (kept(vec![0, 1], vec![1]), 20, 2),
        ];
        let clients: Vec<PrunedClientAdapter> = records
            .iter()
            .enumerate()
            .map(|(i, (k, n, r))| PrunedClientAdapter {
                weights: pruned(*r, k, 11 + i as u64),
                kept: vec![k.clone()],
                samples: *n,
            })
            .collect();
        let previous = pruned(4, &kept(vec![0, 1], vec![0, 1, 2]), 99);
        let global = aggregate_masked(
            &clients,
            &[SHAPE],
            NonZeroUsize::new(8).expect("non-zero"),
            &previous,
        )
        .expect("aggregate");
        assert_eq!(global.rank, 8);

        for target in [TargetModule::QProj, TargetModule::DownProj] {
            let full: Vec<DMatrix<f64>> = clients
                .iter()
                .map(|c| {
                    delta(
                        &scatter_adapter(&c.weights, &c.kept, &[SHAPE]).expect("s"),
                        target,
                    )
                })
                .collect();
            let prev = delta(&previous, target);
            let (side, _, len) = kept_side(target, &clients[0].kept[0], &SHAPE);
            let mut expected = DMatrix::zeros(prev.nrows(), prev.ncols());
            for j in 0..len {
                let keepers: Vec<usize> = (0..clients.len())
                    .filter(|&k| {
                        kept_side(target, &clients[k].kept[0], &SHAPE)
                            .1
                            .contains(&j)
                    })
                    .collect();
                let n: f64 = keepers.iter().map(|&k| clients[k].samples as f64).sum();
                let pick = |m: &DMatrix<f64>| match side {
                    PrunedSide::Outputs => m.row(j).transpose().into_owned(),
                    PrunedSide::Inputs => m.column(j).into_owned(),
                };
                let value = if keepers.is_empty() {
                    pick(&prev)
                } else {
                    keepers
                        .iter()
                        .map(|&k| pick(&full[k]) * (clients[k].samples as f64 / n))
                        .fold(DVector::zeros(pick(&prev).nrows()), |a, b| a + b)
                };
                match side {
                    PrunedSide::Outputs => expected.set_row(j, &value.transpose()),
                    PrunedSide::Inputs => expected.set_column(j, &value),
                }
            }
            let got = delta(&global, target);
            // Rank 8 covers every summed product here (2 + 4 + 2 + 4 ≥ min(d_out, d_in)), so
            // FlexLoRA's truncation is exact up to rounding.
            let err = (&got - &expected).norm() / expected.norm();
            assert!(err < 1e-5, "{target}: relative error {err}");
        }
    }

    #[test]
    fn unpruned_clients_give_flexlora() {
        let all = kept(vec![0, 1], vec![0, 1, 2]);
        let clients: Vec<PrunedClientAdapter> = [(4usize, 5u64), (2, 15)]
            .iter()
            .enumerate()
            .map(|(i, &(r, n))| PrunedClientAdapter {
                weights: pruned(r, &all, i as u64),
                kept: vec![all.clone()],
                samples: n,
            })
            .collect();
        let max = NonZeroUsize::new(4).expect("non-zero");
        let previous = pruned(4, &all, 7);
        let masked = aggregate_masked(&clients, &[SHAPE], max, &previous).expect("masked");
        let plain: Vec<ClientAdapter> = clients
            .iter()
            .map(|c| ClientAdapter {
                weights: c.weights.clone(),
                samples: c.samples,
            })
            .collect();
        let flex = FlexLora::new()
            .with_max_rank(max)
            .aggregate(&plain)
            .expect("flex")
            .for_rank(4)
            .expect("rank");
        for target in [TargetModule::QProj, TargetModule::DownProj] {
            let (x, y) = (delta(&masked, target), delta(&flex, target));
            assert!((&x - &y).norm() / y.norm() < 1e-5, "{target}");
        }
    }
}
