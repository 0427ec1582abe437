//! HetLoRA (Cho et al. 2024, "Heterogeneous LoRA for Federated Fine-tuning of On-Device
//! Foundation Models"): zero-pad every client to the largest rank, average with weights that
//! follow the size of each client's update, and truncate for clients of smaller rank.

use nalgebra::DMatrix;

use crate::lora::adapter::{AdapterWeights, LoraFactors};

use super::{AggregationError, AggregationStrategy, Aggregator, ClientAdapter, GlobalAdapter};
use super::{GlobalKind, LayerGroup, check, to_adapter_weights};

/// HetLoRA's aggregation with sparsity-weighted averaging.
///
/// For every layer, with `r_max` the largest client rank and `s_r` the scale at rank `r`
/// ([`crate::lora::adapter::LoraScaling::scale`]):
///
/// 1. Weights `w_k = ‖s_k B_k A_k‖_F / Σ_j ‖s_j B_j A_j‖_F`. Sample counts do not enter, as in
///    the paper and our issue ("weights proportional to ‖B_k A_k‖_F"): a client that moved its
///    adapter further counts more. Only when every update of a layer is zero (e.g. all `B = 0`
///    before training) are the weights undefined; the sample weights `n_k / Σ n` stand in then,
///    so `A` is still averaged sensibly.
/// 2. Zero-padding: `A_k` gains zero rows and `B_k` zero columns up to `r_max`.
/// 3. Scale folding: the scale depends on the rank (`alpha / r`, or `alpha / √r` with rsLoRA),
///    so a padded rank-`r_k` adapter read at rank `r_max` would change its `ΔW`. Each `B_k` is
///    therefore multiplied by `s_k / s_max` before averaging: `s_max · (s_k / s_max) B_k A_k =
///    s_k B_k A_k`. The global adapter is `A = Σ w_k pad(A_k)`, `B = Σ w_k (s_k / s_max)
///    pad(B_k)` at rank `r_max`.
/// 4. A client of rank `r` receives the first `r` rows of `A` and the first `r` columns of `B`,
///    the latter multiplied by `s_max / s_r`, so that `s_r B_r A_r = s_max B[:, :r] A[:r, :]`.
///
/// The paper's rank self-pruning on the clients is not part of server-side aggregation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HetLora;

impl Aggregator for HetLora {
    fn aggregate(&self, clients: &[ClientAdapter]) -> Result<GlobalAdapter, AggregationError> {
        let checked = check(clients)?;
        let r_max = checked.max_rank;
        let s_max = f64::from(checked.scaling.scale(r_max));
        let layers = checked.layers.iter().map(|group| {
            let (d_out, d_in) = (group.d_out, group.d_in);
            let weights = norm_weights(group, &checked.scales, &checked.sample_weights);
            let mut a = vec![0.0f64; r_max * d_in];
            let mut b = vec![0.0f64; d_out * r_max];
            for ((f, &w), &s) in group.factors.iter().zip(&weights).zip(&checked.scales) {
                let r = f.rank;
                // Padded A: A_k's rows are the leading `r` rows, the rest add zero.
                a.iter_mut()
                    .zip(&f.a)
                    .for_each(|(sum, &x)| *sum += w * f64::from(x));
                // Padded B: B_k's columns are the leading `r` of each row of width `r_max`.
                let fold = w * s / s_max;
                for (sum_row, row) in b.chunks_exact_mut(r_max).zip(f.b.chunks_exact(r)) {
                    sum_row
                        .iter_mut()
                        .zip(row)
                        .for_each(|(sum, &x)| *sum += fold * f64::from(x));
                }
            }
            (group.layer, d_out, d_in, a, b)
        });
        let weights = to_adapter_weights(r_max, checked.scaling, layers);
        Ok(GlobalAdapter {
            strategy: AggregationStrategy::HetLora,
            scaling: checked.scaling,
            kind: GlobalKind::Truncated(weights),
        })
    }
}

/// The per-layer weights `‖s_k B_k A_k‖_F / Σ_j ‖s_j B_j A_j‖_F`, or `sample_weights` when every
/// update is zero.
fn norm_weights(group: &LayerGroup<'_>, scales: &[f64], sample_weights: &[f64]) -> Vec<f64> {
    let norms: Vec<f64> = group
        .factors
        .iter()
        .zip(scales)
        .map(|(f, s)| s.abs() * product_norm(f))
        .collect();
    let total: f64 = norms.iter().sum();
    if total > 0.0 && total.is_finite() {
        norms.iter().map(|n| n / total).collect()
    } else {
        sample_weights.to_vec()
    }
}

/// `‖B A‖_F` through the `r×r` Gram matrices, `‖B A‖²_F = tr(Aᵀ Bᵀ B A) = Σ_ij (BᵀB)_ij
/// (A Aᵀ)_ij`, instead of the `d_out×d_in` product.
fn product_norm(f: &LoraFactors) -> f64 {
    let a = DMatrix::from_fn(f.rank, f.d_in, |i, j| f64::from(f.a[i * f.d_in + j]));
    let b = DMatrix::from_fn(f.d_out, f.rank, |i, j| f64::from(f.b[i * f.rank + j]));
    let gram_b = b.tr_mul(&b);
    let gram_a = &a * a.transpose();
    // Rounding can leave a tiny negative where the true value is zero.
    gram_b.dot(&gram_a).max(0.0).sqrt()
}

/// The global rank-`r_max` adapter `w` cut to `rank ≤ r_max`: leading rows of `A`, leading
/// columns of `B` rescaled by `s_max / s_rank` (see [`HetLora`]).
pub(super) fn truncate(w: &AdapterWeights, rank: usize) -> AdapterWeights {
    let fold = f64::from(w.scaling.scale(w.rank)) / f64::from(w.scaling.scale(rank));
    let layers = w
        .layers
        .iter()
        .map(|(&layer, f)| {
            let a = f.a[..rank * f.d_in].to_vec();
            let b =
                f.b.chunks_exact(f.rank)
                    .flat_map(|row| &row[..rank])
                    .map(|&x| (fold * f64::from(x)) as f32)
                    .collect();
            let factors = LoraFactors {
                rank,
                d_in: f.d_in,
                d_out: f.d_out,
                a,
                b,
            };
            (layer, factors)
        })
        .collect();
    AdapterWeights {
        rank,
        scaling: w.scaling,
        layers,
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;
    use crate::lora::adapter::LoraScaling;

    /// The weights, straight from the definition: `‖s_k · product()‖_F`, normalised.
    fn reference_weights(
        clients: &[ClientAdapter],
        layer: &crate::lora::adapter::AdaptedLayer,
    ) -> Vec<f64> {
        let norms: Vec<f64> = clients
            .iter()
            .map(|c| delta(&c.weights, layer).norm())
            .collect();
        let total: f64 = norms.iter().sum();
        norms.iter().map(|n| n / total).collect()
    }

    #[test]
    fn hetlora_weights_follow_frobenius_norms() {
        let clients = mixed_clients();
        let checked = check(&clients).expect("valid");
        for group in &checked.layers {
            let weights = norm_weights(group, &checked.scales, &checked.sample_weights);
            let expected = reference_weights(&clients, &group.layer);
            assert!((weights.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            for (w, e) in weights.iter().zip(&expected) {
                // The reference goes through `product()`, which accumulates in f32.
                assert!((w - e).abs() < 1e-6 * e, "{w} vs {e}");
            }
            // Not the sample weights 0.1, 0.3, 0.6: sample counts do not enter.
            assert!((weights[0] - 0.1).abs() > 1e-3);
        }
    }

    #[test]
    fn hetlora_pads_weights_and_folds_scales() {
        let clients = mixed_clients();
        let global = HetLora.aggregate(&clients).expect("hetlora");
        assert_eq!(global.ranks(), 1..=8);
        let w = global.for_rank(8).expect("rank 8");
        let s_max = f64::from(SCALING.scale(8));
        for (layer, d_out, d_in) in [TALL, SMALL] {
            // Independent: explicit zero-padded matrices, weights from dense products.
            let weights = reference_weights(&clients, &layer);
            let mut a = DMatrix::<f64>::zeros(8, d_in);
            let mut b = DMatrix::<f64>::zeros(d_out, 8);
            for (c, weight) in clients.iter().zip(weights) {
                let f = &c.weights.layers[&layer];
                let s_k = f64::from(c.weights.scale());
                let mut a_pad = DMatrix::<f64>::zeros(8, d_in);
                let mut b_pad = DMatrix::<f64>::zeros(d_out, 8);
                a_pad
                    .view_mut((0, 0), (f.rank, d_in))
                    .copy_from(&matrix(f.rank, d_in, &f.a));
                b_pad
                    .view_mut((0, 0), (d_out, f.rank))
                    .copy_from(&matrix(d_out, f.rank, &f.b));
                a += a_pad * weight;
                b += b_pad * (weight * s_k / s_max);
            }
            let f = &w.layers[&layer];
            assert!(relative_error(&matrix(8, d_in, &f.a), &a) < 1e-6);
            assert!(relative_error(&matrix(d_out, 8, &f.b), &b) < 1e-6);
        }

        // Sample counts do not change the result.
        let mut reweighted = clients.clone();
        reweighted.iter_mut().for_each(|c| c.samples = 1);
        let other = HetLora.aggregate(&reweighted).expect("hetlora");
        assert_eq!(other.for_rank(8), Ok(w));
    }

    #[test]
    fn hetlora_truncation_rescales_leading_columns() {
        let global = HetLora.aggregate(&mixed_clients()).expect("hetlora");
        let full = global.for_rank(8).expect("rank 8");
        for rank in [2, 4] {
            let w = global.for_rank(rank).expect("rank");
            assert_eq!(w.rank, rank);
            let fold = f64::from(SCALING.scale(8) / SCALING.scale(rank));
            for (layer, d_out, d_in) in [TALL, SMALL] {
                let (f, g) = (&w.layers[&layer], &full.layers[&layer]);
                assert_eq!((f.rank, f.d_out, f.d_in), (rank, d_out, d_in));
                assert_eq!(f.a, g.a[..rank * d_in]);
                for o in 0..d_out {
                    for i in 0..rank {
                        let expected = f64::from(g.b[o * 8 + i]) * fold;
                        assert!((f64::from(f.b[o * rank + i]) - expected).abs() < 1e-6);
                    }
                }
                // ΔW of the truncated adapter is the leading-rank part of the global one.
                let leading = matrix(d_out, 8, &g.b).columns(0, rank)
                    * matrix(8, d_in, &g.a).rows(0, rank)
                    * f64::from(SCALING.scale(8));
                assert!(relative_error(&delta(&w, &layer), &leading) < 1e-6);
            }
        }
    }

    #[test]
    fn hetlora_scale_folding_preserves_delta() {
        for scaling in [
            SCALING,
            LoraScaling {
                alpha: 16.0,
                rslora: true,
            },
        ] {
            // The rank-8 client did not move (B = 0), so the rank-2 client gets all the weight.
            let mut trained = client(2, 5, &[TALL], 1);
            let mut idle = client(8, 50, &[TALL], 2);
            idle.weights
                .layers
                .get_mut(&TALL.0)
                .expect("layer")
                .b
                .fill(0.0);
            trained.weights.scaling = scaling;
            idle.weights.scaling = scaling;
            let global = HetLora
                .aggregate(&[trained.clone(), idle])
                .expect("hetlora");

            let full = global.for_rank(8).expect("rank 8");
            let expected = delta(&trained.weights, &TALL.0);
            assert!(relative_error(&delta(&full, &TALL.0), &expected) < 1e-6);

            // And back at rank 2 the client gets its own factors.
            let back = global.for_rank(2).expect("rank 2");
            let (f, t) = (&back.layers[&TALL.0], &trained.weights.layers[&TALL.0]);
            assert_eq!(f.a, t.a);
            assert!(f.b.iter().zip(&t.b).all(|(x, y)| (x - y).abs() < 1e-6));
        }
    }

    #[test]
    fn hetlora_zero_updates_fall_back_to_sample_weights() {
        let mut clients = mixed_clients();
        for c in &mut clients {
            c.weights.layers.values_mut().for_each(|f| f.b.fill(0.0));
        }
        let w = HetLora
            .aggregate(&clients)
            .expect("hetlora")
            .for_rank(8)
            .expect("rank");
        let (layer, _, d_in) = SMALL;
        let mut expected = DMatrix::<f64>::zeros(8, d_in);
        for (c, p) in clients.iter().zip([0.1, 0.3, 0.6]) {
            let f = &c.weights.layers[&layer];
            let mut padded = expected.view_mut((0, 0), (f.rank, d_in));
            padded += matrix(f.rank, d_in, &f.a) * p;
        }
        let f = &w.layers[&layer];
        assert!(relative_error(&matrix(8, d_in, &f.a), &expected) < 1e-6);
        assert!(f.b.iter().all(|&x| x == 0.0));
    }
}
