//! FlexLoRA (Bai et al. 2024, "Federated Fine-tuning of Large Language Models under
//! Heterogeneous Tasks and Client Resources"): average the clients' full updates `s_k B_k A_k`,
//! then give every client the best approximation of that average at its own rank.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;

use nalgebra::{DMatrix, DVector, QR, SVD};

use crate::lora::adapter::{AdaptedLayer, AdapterWeights, LoraFactors, LoraScaling};

use super::{AggregationError, AggregationStrategy, Aggregator, ClientAdapter, GlobalAdapter};
use super::{Checked, GlobalKind, LayerGroup, check};

/// The SVD of an `n`-wide matrix may run `6 · n²` QR sweeps before it is declared
/// non-convergent: LAPACK's `dbdsqr` limit (`MAXITR = 6`). Converging problems need a few sweeps
/// per singular value; the bound only stops a pathological input from looping for ever.
const SVD_SWEEPS_PER_VALUE: usize = 6;

/// A completion direction is dropped when less than this is left of it after projecting out the
/// basis. Mathematically at least `1 / √d_in` is left while the basis is short of `d_in`, so this
/// only guards rounding.
const COMPLETION_TOLERANCE: f64 = 1e-8;

/// FlexLoRA's aggregation by truncated SVD of the averaged update.
///
/// For every layer:
///
/// 1. `ΔW = Σ_k p_k s_k B_k A_k`, with sample weights `p_k = n_k / Σ n` and each client's own
///    scale `s_k`.
/// 2. Without forming `ΔW`: `ΔW = B_cat A_cat` with `B_cat = [p_1 s_1 B_1 | … ]` (`[d_out, R]`)
///    and `A_cat = [A_1; …]` (`[R, d_in]`), `R = Σ r_k`. Thin QR `B_cat = Q_b R_b` and
///    `A_catᵀ = Q_a R_a` leave the `R×R` core `R_b R_aᵀ = U_c Σ V_cᵀ`, so that `ΔW = (Q_b U_c) Σ
///    (Q_a V_c)ᵀ` costs `O((d_out + d_in) R²)` instead of `O(d_out d_in R)` plus a large SVD. When
///    `R ≥ min(d_out, d_in)` that saves nothing and the dense `ΔW` is decomposed instead.
/// 3. Only the leading `max_rank` triplets are kept ([`Self::with_max_rank`]; by default the
///    largest client rank of the round).
/// 4. A client of rank `r` receives `B = U_r Σ_r / s_r` and `A = V_rᵀ`, so `s_r B A` is the best
///    rank-`r` approximation of `ΔW` (Eckart–Young). `A`'s rows are orthonormal and the
///    magnitude lives in `B`.
///
/// Determinism: singular values are in descending order, and each pair of singular vectors is
/// signed so that the entry of largest magnitude of its right vector (the row of `A`; the first
/// such entry on ties) is positive. The QR and the dense path therefore agree, up to rounding,
/// whenever singular values are distinct.
///
/// A rank above the number of triplets (a `max_rank` beyond `R` or `min(d_out, d_in)`) gets zero
/// columns in `B` and, for `A`, further orthonormal rows completed deterministically from the
/// standard basis: with a zero row in `A` as well, the extra rank would never receive a
/// gradient. Rows beyond `d_in` stay zero.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlexLora {
    max_rank: Option<NonZeroUsize>,
}

impl FlexLora {
    /// FlexLoRA keeping as many triplets as the round's largest client rank.
    pub const fn new() -> Self {
        Self { max_rank: None }
    }

    /// Keeps `max_rank` triplets per layer: the largest rank any client may be given next round.
    pub const fn with_max_rank(mut self, max_rank: NonZeroUsize) -> Self {
        self.max_rank = Some(max_rank);
        self
    }

    /// The configured maximum rank; `None` means the round's largest client rank.
    pub const fn max_rank(&self) -> Option<NonZeroUsize> {
        self.max_rank
    }
}

impl Aggregator for FlexLora {
    fn aggregate(&self, clients: &[ClientAdapter]) -> Result<GlobalAdapter, AggregationError> {
        let checked = check(clients)?;
        let max_rank = self.max_rank.map_or(checked.max_rank, NonZeroUsize::get);
        let mut layers = BTreeMap::new();
        for group in &checked.layers {
            let (b_cat, a_cat) = concatenate(group, &checked);
            let spectrum = if b_cat.ncols() >= group.d_out.min(group.d_in) {
                dense(b_cat, a_cat, max_rank)
            } else {
                factored(b_cat, a_cat, max_rank)
            };
            let spectrum = spectrum.ok_or(AggregationError::SvdFailed { layer: group.layer })?;
            layers.insert(group.layer, spectrum);
        }
        Ok(GlobalAdapter {
            strategy: AggregationStrategy::FlexLora,
            scaling: checked.scaling,
            kind: GlobalKind::Spectral(Spectra { max_rank, layers }),
        })
    }
}

/// Every layer's leading singular triplets: FlexLoRA's [`GlobalAdapter`].
#[derive(Debug, Clone)]
pub(super) struct Spectra {
    max_rank: usize,
    layers: BTreeMap<AdaptedLayer, Spectrum>,
}

impl Spectra {
    /// The largest rank a client may ask for.
    pub(super) fn max_rank(&self) -> usize {
        self.max_rank
    }

    /// The kept singular values of `layer`, descending.
    pub(super) fn singular_values(&self, layer: &AdaptedLayer) -> Option<&[f64]> {
        self.layers.get(layer).map(|s| s.sigma.as_slice())
    }

    /// The adapter at `rank` (`1 ..= max_rank`, checked by the caller): `B = U_r Σ_r / s_r`,
    /// `A = V_rᵀ`.
    pub(super) fn factors(
        &self,
        scaling: LoraScaling,
        rank: usize,
    ) -> Result<AdapterWeights, AggregationError> {
        let s_r = f64::from(scaling.scale(rank));
        let mut layers = BTreeMap::new();
        for (&layer, spectrum) in &self.layers {
            let (d_out, d_in) = (spectrum.u.nrows(), spectrum.v.nrows());
            let basis = spectrum.right_basis(rank);
            let mut a = vec![0.0f32; rank * d_in];
            for (i, row) in a.chunks_exact_mut(d_in).take(basis.ncols()).enumerate() {
                row.iter_mut()
                    .zip(basis.column(i).iter())
                    .for_each(|(x, &v)| *x = v as f32);
            }
            let kept = rank.min(spectrum.sigma.len());
            let mut b = vec![0.0f32; d_out * rank];
            for (o, row) in b.chunks_exact_mut(rank).enumerate() {
                for (i, x) in row.iter_mut().take(kept).enumerate() {
                    *x = (spectrum.u[(o, i)] * spectrum.sigma[i] / s_r) as f32;
                }
            }
            if !b.iter().all(|x| x.is_finite()) {
                return Err(AggregationError::Overflow { layer });
            }
            let factors = LoraFactors {
                rank,
                d_in,
                d_out,
                a,
                b,
            };
            layers.insert(layer, factors);
        }
        Ok(AdapterWeights {
            rank,
            scaling,
            layers,
        })
    }
}

/// The leading singular triplets of one layer's `ΔW`.
#[derive(Debug, Clone)]
struct Spectrum {
    /// `σ_1 ≥ σ_2 ≥ …`, `k` of them.
    sigma: Vec<f64>,
    /// Left singular vectors, `[d_out, k]`.
    u: DMatrix<f64>,
    /// Right singular vectors, `[d_in, k]`.
    v: DMatrix<f64>,
}

impl Spectrum {
    /// Keeps the first `keep` of a descending decomposition and fixes the signs (see
    /// [`FlexLora`]).
    fn new(sigma: &[f64], u: DMatrix<f64>, v: DMatrix<f64>, keep: usize) -> Self {
        let k = keep.min(sigma.len());
        let mut u = u.columns(0, k).into_owned();
        let mut v = v.columns(0, k).into_owned();
        for i in 0..k {
            let largest = v.column(i).iamax();
            if v[(largest, i)] < 0.0 {
                u.column_mut(i).neg_mut();
                v.column_mut(i).neg_mut();
            }
        }
        Self {
            sigma: sigma[..k].to_vec(),
            u,
            v,
        }
    }

    /// `min(rank, d_in)` orthonormal columns: the right singular vectors, then completion
    /// directions when `rank` exceeds the kept triplets.
    fn right_basis(&self, rank: usize) -> DMatrix<f64> {
        let d_in = self.v.nrows();
        let take = rank.min(self.v.ncols());
        let width = rank.min(d_in);
        let mut basis = DMatrix::zeros(d_in, width);
        basis
            .columns_mut(0, take)
            .copy_from(&self.v.columns(0, take));
        for c in take..width {
            let direction = {
                let done = basis.columns(0, c);
                // The unit vector with the smallest projection onto the basis is the farthest
                // from it; the first one on ties, for determinism.
                let j = (0..d_in)
                    .min_by(|&x, &y| {
                        let (nx, ny) = (done.row(x).norm_squared(), done.row(y).norm_squared());
                        nx.total_cmp(&ny)
                    })
                    .unwrap_or(0);
                let mut x = DVector::zeros(d_in);
                x[j] = 1.0;
                // Gram–Schmidt twice: once is not enough to stay orthogonal in floating point.
                for _ in 0..2 {
                    x -= done * done.tr_mul(&x);
                }
                x
            };
            let norm = direction.norm();
            if norm < COMPLETION_TOLERANCE {
                break;
            }
            basis.set_column(c, &(direction / norm));
        }
        basis
    }
}

/// `B_cat = [p_1 s_1 B_1 | …]` and `A_cat = [A_1; …]`, so that `ΔW = B_cat A_cat`.
fn concatenate(group: &LayerGroup<'_>, checked: &Checked<'_>) -> (DMatrix<f64>, DMatrix<f64>) {
    let total: usize = group.factors.iter().map(|f| f.rank).sum();
    let mut b_cat = DMatrix::zeros(group.d_out, total);
    let mut a_cat = DMatrix::zeros(total, group.d_in);
    let mut offset = 0;
    let weights = checked.sample_weights.iter().zip(&checked.scales);
    for (f, (p, s)) in group.factors.iter().zip(weights) {
        let (r, d_in) = (f.rank, group.d_in);
        let w = p * s;
        a_cat
            .rows_mut(offset, r)
            .copy_from(&DMatrix::from_fn(r, d_in, |i, j| {
                f64::from(f.a[i * d_in + j])
            }));
        b_cat
            .columns_mut(offset, r)
            .copy_from(&DMatrix::from_fn(group.d_out, r, |i, j| {
                w * f64::from(f.b[i * r + j])
            }));
        offset += r;
    }
    (b_cat, a_cat)
}

/// Dense path: the SVD of `ΔW = B_cat A_cat` itself.
fn dense(b_cat: DMatrix<f64>, a_cat: DMatrix<f64>, keep: usize) -> Option<Spectrum> {
    let (sigma, u, v_t) = svd(b_cat * a_cat)?;
    Some(Spectrum::new(&sigma, u, v_t.transpose(), keep))
}

/// QR path: `ΔW = Q_b (R_b R_aᵀ) Q_aᵀ` and the SVD of the `R×R` core only.
fn factored(b_cat: DMatrix<f64>, a_cat: DMatrix<f64>, keep: usize) -> Option<Spectrum> {
    let (q_b, r_b) = QR::new(b_cat).unpack();
    let (q_a, r_a) = QR::new(a_cat.transpose()).unpack();
    let (sigma, u_core, v_t_core) = svd(r_b * r_a.transpose())?;
    Some(Spectrum::new(
        &sigma,
        q_b * u_core,
        q_a * v_t_core.transpose(),
        keep,
    ))
}

/// Thin SVD with singular values in descending order: `(σ, U, Vᵀ)`; `None` if it does not
/// converge.
fn svd(m: DMatrix<f64>) -> Option<(Vec<f64>, DMatrix<f64>, DMatrix<f64>)> {
    let n = m.nrows().min(m.ncols());
    let max_sweeps = SVD_SWEEPS_PER_VALUE.saturating_mul(n).saturating_mul(n);
    // `try_new` (unlike `try_new_unordered`) sorts the triplets by descending singular value.
    let svd = SVD::try_new(m, true, true, f64::EPSILON, max_sweeps)?;
    Some((svd.singular_values.as_slice().to_vec(), svd.u?, svd.v_t?))
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;

    /// `ΔW = Σ p_k s_k B_k A_k` straight from the clients' dense products.
    fn reference_delta(clients: &[ClientAdapter], layer: &AdaptedLayer) -> DMatrix<f64> {
        let total: u64 = clients.iter().map(|c| c.samples).sum();
        clients
            .iter()
            .map(|c| delta(&c.weights, layer) * (c.samples as f64 / total as f64))
            .reduce(|x, y| x + y)
            .expect("clients")
    }

    /// `(σ descending, rank-r truncation for every r)` from nalgebra's dense SVD, sorted here.
    fn reference_svd(delta: DMatrix<f64>) -> (Vec<f64>, impl Fn(usize) -> DMatrix<f64>) {
        let svd = delta.svd_unordered(true, true);
        let (u, v_t) = (svd.u.expect("u"), svd.v_t.expect("v_t"));
        let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
        order.sort_by(|&i, &j| svd.singular_values[j].total_cmp(&svd.singular_values[i]));
        let sigma: Vec<f64> = order.iter().map(|&i| svd.singular_values[i]).collect();
        let s = sigma.clone();
        let truncation = move |r: usize| {
            order[..r]
                .iter()
                .zip(&s)
                .map(|(&i, &sigma)| u.column(i) * v_t.row(i) * sigma)
                .fold(DMatrix::zeros(u.nrows(), v_t.ncols()), |acc, t| acc + t)
        };
        (sigma, truncation)
    }

    #[test]
    fn flexlora_matches_truncated_dense_svd() {
        let clients = mixed_clients();
        let global = FlexLora::new().aggregate(&clients).expect("flexlora");
        assert_eq!(global.strategy(), AggregationStrategy::FlexLora);
        assert_eq!(global.ranks(), 1..=8);
        for (layer, d_out, d_in) in [TALL, SMALL] {
            let (_, truncation) = reference_svd(reference_delta(&clients, &layer));
            for rank in 1..=8 {
                let w = global.for_rank(rank).expect("rank");
                let f = &w.layers[&layer];
                assert_eq!((f.rank, f.d_out, f.d_in), (rank, d_out, d_in));
                let err = relative_error(&delta(&w, &layer), &truncation(rank));
                assert!(err <= 1e-4, "layer {layer:?} rank {rank}: {err}");
            }
        }
    }

    #[test]
    fn flexlora_singular_values_descend_and_a_is_orthonormal() {
        let clients = mixed_clients();
        let global = FlexLora::new().aggregate(&clients).expect("flexlora");
        for (layer, _, d_in) in [TALL, SMALL] {
            let sigma = global.singular_values(&layer).expect("spectral");
            let (expected, _) = reference_svd(reference_delta(&clients, &layer));
            assert_eq!(sigma.len(), 8);
            assert!(sigma.windows(2).all(|w| w[0] >= w[1]));
            for (s, e) in sigma.iter().zip(&expected) {
                // The reference goes through `product()`, which accumulates in f32.
                assert!((s - e).abs() <= 1e-6 * expected[0]);
            }
            let f = &global.for_rank(8).expect("rank 8").layers[&layer];
            let a = matrix(8, d_in, &f.a);
            assert!((&a * a.transpose() - DMatrix::identity(8, 8)).norm() < 1e-5);
            // Sign convention: each row's largest-magnitude entry is positive.
            for row in a.row_iter() {
                assert!(row[row.transpose().iamax()] > 0.0);
            }
        }
        // Only FlexLoRA keeps a spectrum.
        let het = super::super::HetLora.aggregate(&clients).expect("hetlora");
        assert!(het.singular_values(&TALL.0).is_none());
    }

    #[test]
    fn flexlora_qr_path_equals_dense_path() {
        let clients = mixed_clients();
        let checked = check(&clients).expect("valid");
        let group = checked
            .layers
            .iter()
            .find(|g| g.layer == TALL.0)
            .expect("tall layer");
        let (b_cat, a_cat) = concatenate(group, &checked);
        assert!(
            b_cat.ncols() < group.d_out.min(group.d_in),
            "QR path applies"
        );
        let fast = factored(b_cat.clone(), a_cat.clone(), 8).expect("qr path");
        let slow = dense(b_cat, a_cat, 8).expect("dense path");
        let scale = slow.sigma[0];
        for (x, y) in fast.sigma.iter().zip(&slow.sigma) {
            assert!((x - y).abs() <= 1e-10 * scale);
        }
        assert!((&fast.u - &slow.u).norm() < 1e-8);
        assert!((&fast.v - &slow.v).norm() < 1e-8);
    }

    #[test]
    fn flexlora_single_client_round_trips() {
        let clients = [client(4, 3, &[TALL, SMALL], 11)];
        let w = FlexLora::new()
            .aggregate(&clients)
            .expect("flexlora")
            .for_rank(4)
            .expect("rank 4");
        for (layer, _, _) in [TALL, SMALL] {
            let expected = delta(&clients[0].weights, &layer);
            assert!(relative_error(&delta(&w, &layer), &expected) < 1e-5);
        }
    }

    #[test]
    fn flexlora_completes_ranks_beyond_the_update() {
        let clients = mixed_clients();
        let max = NonZeroUsize::new(20).expect("non-zero");
        let flex = FlexLora::new().with_max_rank(max);
        assert_eq!(flex.max_rank(), Some(max));
        let global = flex.aggregate(&clients).expect("flexlora");
        let w = global.for_rank(20).expect("rank 20");
        // TALL keeps all R = 14 triplets, SMALL all min(10, 12) = 10.
        for ((layer, d_out, d_in), kept) in [(TALL, 14), (SMALL, 10)] {
            assert_eq!(global.singular_values(&layer).map(<[f64]>::len), Some(kept));
            let f = &w.layers[&layer];
            // The whole update survives: its rank is at most `kept`.
            let expected = reference_delta(&clients, &layer);
            assert!(relative_error(&delta(&w, &layer), &expected) < 1e-5);
            // B's extra columns are zero; A's rows are orthonormal up to d_in, then zero.
            let b = matrix(d_out, 20, &f.b);
            assert_eq!(b.columns(kept, 20 - kept).norm(), 0.0);
            let a = matrix(20, d_in, &f.a);
            let live = a.rows(0, d_in.min(20));
            let gram = live * live.transpose();
            assert!((gram - DMatrix::identity(live.nrows(), live.nrows())).norm() < 1e-5);
            if d_in < 20 {
                assert_eq!(a.rows(d_in, 20 - d_in).norm(), 0.0);
            }
        }
    }
}
