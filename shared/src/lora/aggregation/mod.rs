//! Server-side aggregation of LoRA adapters whose ranks differ between clients.
//!
//! Every round each client uploads the adapter it trained, at the rank the server gave it, and
//! the number of samples it trained on ([`ClientAdapter`]). The server merges the uploads into one
//! [`GlobalAdapter`] with [`aggregate`] and then hands each client the adapter at the rank it picks
//! for that client's next round with [`GlobalAdapter::for_rank`]; that rank may differ from the
//! one the client uploaded.
//!
//! Three strategies ([`AggregationStrategy`]):
//!
//! - [`FedAvg`]: the sample-weighted mean of `A` and of `B` separately (FedIT). Every client must
//!   use the same rank. Note that the mean of the factors is not the mean of the products `B A`.
//! - [`HetLora`] (Cho et al. 2024): zero-pads every client to the largest rank, weights clients
//!   by the Frobenius norm of their update and truncates the result for smaller ranks.
//! - [`FlexLora`] (Bai et al. 2024, the default): averages the full updates `s B A` and hands
//!   each client the best approximation of that average at its rank (truncated SVD).
//!
//! Clients that trained on differently pruned models (FedSpine) go through [`masked`]: their
//! adapters are scattered to full coordinates and each coordinate is averaged over the clients
//! that kept it, on top of FlexLoRA.
//!
//! All of them first check every upload ([`AggregationError`]): the same layers, shapes and
//! scaling everywhere, factor lengths that match the declared shapes, finite numbers. An upload is
//! outside input, so a malformed or poisoned one is an error, never a panic. Arithmetic is `f64`
//! inside and `f32` at the boundary, as in [`AdapterWeights`].

mod fedavg;
mod flexlora;
mod hetlora;
pub mod masked;

use std::collections::BTreeMap;
use std::ops::RangeInclusive;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::lora::adapter::{AdaptedLayer, AdapterWeights, LoraFactors, LoraScaling};

pub use fedavg::FedAvg;
pub use flexlora::FlexLora;
pub use hetlora::HetLora;
pub use masked::{
    PrunedClientAdapter, aggregate_masked, overlay_adapter, restrict_adapter, scatter_adapter,
};

/// One client's upload for a round.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientAdapter {
    /// The adapter the client trained, at the rank it was given.
    pub weights: AdapterWeights,
    /// How many training samples the client used (`n_k`); sample weights are `n_k / Σ n`.
    pub samples: u64,
}

/// Which aggregation the server runs, as written in its configuration (`"fed_avg"`,
/// `"het_lora"`, `"flex_lora"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AggregationStrategy {
    /// [`FedAvg`]: equal ranks only.
    FedAvg,
    /// [`HetLora`]: zero-padding and norm-weighted averaging.
    HetLora,
    /// [`FlexLora`]: SVD of the averaged update. The default because it is the only one of the
    /// three that keeps the averaged update's meaning for every rank.
    #[default]
    FlexLora,
}

/// A strategy that merges one round's uploads.
pub trait Aggregator {
    /// Merges `clients` into the global adapter of this round.
    ///
    /// # Errors
    ///
    /// Any [`AggregationError`] other than [`AggregationError::RankUnavailable`] when an upload
    /// is empty, malformed, non-finite or disagrees with the others.
    fn aggregate(&self, clients: &[ClientAdapter]) -> Result<GlobalAdapter, AggregationError>;
}

/// Merges `clients` with `strategy` in its default configuration. For a configured strategy
/// (e.g. [`FlexLora::with_max_rank`]) call [`Aggregator::aggregate`] on it instead.
///
/// # Errors
///
/// See [`Aggregator::aggregate`].
pub fn aggregate(
    strategy: AggregationStrategy,
    clients: &[ClientAdapter],
) -> Result<GlobalAdapter, AggregationError> {
    match strategy {
        AggregationStrategy::FedAvg => FedAvg.aggregate(clients),
        AggregationStrategy::HetLora => HetLora.aggregate(clients),
        AggregationStrategy::FlexLora => FlexLora::new().aggregate(clients),
    }
}

/// What went wrong while aggregating. `client` is an index into the slice given to
/// [`aggregate`].
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum AggregationError {
    /// No uploads to aggregate.
    #[error("no client adapters to aggregate")]
    NoClients,
    /// Every client reported zero samples, so sample weights are undefined.
    #[error("the clients' sample counts add up to zero")]
    ZeroSamples,
    /// An adapter of rank zero.
    #[error("client {client}: adapter rank is zero")]
    ZeroRank {
        /// The offending client.
        client: usize,
    },
    /// `alpha` is not finite or gives a zero or non-finite scale for the client's rank.
    #[error("client {client}: lora scaling is zero or not finite")]
    InvalidScaling {
        /// The offending client.
        client: usize,
    },
    /// A client's scaling (`alpha`, rsLoRA) differs from client 0's.
    #[error("client {client}: lora scaling differs from client 0's")]
    ScalingMismatch {
        /// The offending client.
        client: usize,
    },
    /// A client's rank differs from client 0's where the strategy needs equal ranks.
    #[error("client {client}: rank {rank} differs from client 0's rank {expected}")]
    RankMismatch {
        /// The offending client.
        client: usize,
        /// Its rank.
        rank: usize,
        /// Client 0's rank.
        expected: usize,
    },
    /// A layer that client 0 has and the client lacks, or the other way round.
    #[error("client {client}: layer {}.{} is not adapted by both it and client 0", .layer.layer, .layer.target)]
    LayerMismatch {
        /// The offending client.
        client: usize,
        /// The layer present on one side only.
        layer: AdaptedLayer,
    },
    /// A layer whose `[d_out, d_in]` differs from client 0's.
    #[error(
        "client {client}: layer {}.{} is [{}, {}], client 0's is [{}, {}]",
        .layer.layer, .layer.target, .found.0, .found.1, .expected.0, .expected.1
    )]
    ShapeMismatch {
        /// The offending client.
        client: usize,
        /// The layer.
        layer: AdaptedLayer,
        /// Client 0's `(d_out, d_in)`.
        expected: (usize, usize),
        /// The client's `(d_out, d_in)`.
        found: (usize, usize),
    },
    /// Factor lengths that disagree with the declared rank and shape, a factor rank that differs
    /// from the adapter's, or a zero dimension.
    #[error("client {client}: layer {}.{} has factors inconsistent with its rank and shape", .layer.layer, .layer.target)]
    InconsistentFactors {
        /// The offending client.
        client: usize,
        /// The layer.
        layer: AdaptedLayer,
    },
    /// A NaN or infinity in a factor.
    #[error("client {client}: layer {}.{} has a non-finite value", .layer.layer, .layer.target)]
    NonFinite {
        /// The offending client.
        client: usize,
        /// The layer.
        layer: AdaptedLayer,
    },
    /// The SVD of a layer did not converge (FlexLoRA).
    #[error("layer {}.{}: svd did not converge", .layer.layer, .layer.target)]
    SvdFailed {
        /// The layer.
        layer: AdaptedLayer,
    },
    /// A redistributed factor does not fit in `f32` (FlexLoRA: huge updates with a tiny scale).
    #[error("layer {}.{}: redistributed factor overflows f32", .layer.layer, .layer.target)]
    Overflow {
        /// The layer.
        layer: AdaptedLayer,
    },
    /// [`GlobalAdapter::for_rank`] was asked for a rank it cannot serve.
    #[error("rank {requested} is outside the servable ranks {min}..={max}")]
    RankUnavailable {
        /// The rank asked for.
        requested: usize,
        /// Smallest servable rank.
        min: usize,
        /// Largest servable rank.
        max: usize,
    },
}

/// The result of one round's aggregation, from which each client gets its adapter.
#[derive(Debug, Clone)]
pub struct GlobalAdapter {
    strategy: AggregationStrategy,
    scaling: LoraScaling,
    kind: GlobalKind,
}

/// How each strategy stores its result; the representation decides how ranks are served.
#[derive(Debug, Clone)]
enum GlobalKind {
    /// FedAvg: the averaged factors, served at their own rank only.
    Exact(AdapterWeights),
    /// HetLoRA: factors at the largest client rank, truncated for smaller ranks.
    Truncated(AdapterWeights),
    /// FlexLoRA: the leading singular triplets of every layer's averaged update.
    Spectral(flexlora::Spectra),
}

impl GlobalAdapter {
    /// The strategy that produced this adapter.
    pub fn strategy(&self) -> AggregationStrategy {
        self.strategy
    }

    /// The scaling shared by every client and by every adapter [`Self::for_rank`] returns.
    pub fn scaling(&self) -> LoraScaling {
        self.scaling
    }

    /// The ranks [`Self::for_rank`] serves: FedAvg its one rank, HetLoRA `1..=r_max`, FlexLoRA
    /// `1..=max_rank`.
    pub fn ranks(&self) -> RangeInclusive<usize> {
        match &self.kind {
            GlobalKind::Exact(w) => w.rank..=w.rank,
            GlobalKind::Truncated(w) => 1..=w.rank,
            GlobalKind::Spectral(s) => 1..=s.max_rank(),
        }
    }

    /// FlexLoRA's kept singular values of `layer`'s averaged update `ΔW`, descending; `None` for
    /// the other strategies or an unknown layer. Useful to pick ranks by captured energy.
    pub fn singular_values(&self, layer: &AdaptedLayer) -> Option<&[f64]> {
        match &self.kind {
            GlobalKind::Spectral(s) => s.singular_values(layer),
            GlobalKind::Exact(_) | GlobalKind::Truncated(_) => None,
        }
    }

    /// The adapter for a client that trains at `rank` next round, with [`Self::scaling`].
    ///
    /// # Errors
    ///
    /// [`AggregationError::RankUnavailable`] when `rank` is outside [`Self::ranks`];
    /// [`AggregationError::Overflow`] when a FlexLoRA factor does not fit in `f32`.
    pub fn for_rank(&self, rank: usize) -> Result<AdapterWeights, AggregationError> {
        let ranks = self.ranks();
        if !ranks.contains(&rank) {
            return Err(AggregationError::RankUnavailable {
                requested: rank,
                min: *ranks.start(),
                max: *ranks.end(),
            });
        }
        match &self.kind {
            GlobalKind::Exact(w) => Ok(w.clone()),
            GlobalKind::Truncated(w) => Ok(hetlora::truncate(w, rank)),
            GlobalKind::Spectral(s) => s.factors(self.scaling, rank),
        }
    }
}

/// One adapted layer across all clients, in client order, after [`check`].
struct LayerGroup<'a> {
    layer: AdaptedLayer,
    d_out: usize,
    d_in: usize,
    factors: Vec<&'a LoraFactors>,
}

/// Uploads that passed [`check`], with what every strategy needs precomputed.
struct Checked<'a> {
    /// The scaling every client shares.
    scaling: LoraScaling,
    /// Each client's rank.
    ranks: Vec<usize>,
    /// `s_k`: each client's scale at its own rank, exactly as the client applied it (`f32`).
    scales: Vec<f64>,
    /// `p_k = n_k / Σ n`.
    sample_weights: Vec<f64>,
    /// The largest client rank.
    max_rank: usize,
    /// Every layer, in client 0's (sorted) order.
    layers: Vec<LayerGroup<'a>>,
}

/// Validates every upload against client 0's and groups the factors by layer.
fn check(clients: &[ClientAdapter]) -> Result<Checked<'_>, AggregationError> {
    let first = clients.first().ok_or(AggregationError::NoClients)?;
    // u128 cannot overflow for any number of u64 counts a slice can hold.
    let total: u128 = clients.iter().map(|c| u128::from(c.samples)).sum();
    if total == 0 {
        return Err(AggregationError::ZeroSamples);
    }
    let scaling = first.weights.scaling;
    let mut ranks = Vec::with_capacity(clients.len());
    let mut scales = Vec::with_capacity(clients.len());
    for (client, c) in clients.iter().enumerate() {
        let w = &c.weights;
        if w.rank == 0 {
            return Err(AggregationError::ZeroRank { client });
        }
        let scale = w.scaling.scale(w.rank);
        if !w.scaling.alpha.is_finite() || !scale.is_finite() || scale == 0.0 {
            return Err(AggregationError::InvalidScaling { client });
        }
        if w.scaling != scaling {
            return Err(AggregationError::ScalingMismatch { client });
        }
        ranks.push(w.rank);
        scales.push(f64::from(scale));
    }

    let mut layers = Vec::with_capacity(first.weights.layers.len());
    for (&layer, reference) in &first.weights.layers {
        let mut factors = Vec::with_capacity(clients.len());
        for (client, c) in clients.iter().enumerate() {
            let f = c
                .weights
                .layers
                .get(&layer)
                .ok_or(AggregationError::LayerMismatch { client, layer })?;
            if f.rank != c.weights.rank || !is_consistent(f) {
                return Err(AggregationError::InconsistentFactors { client, layer });
            }
            if (f.d_out, f.d_in) != (reference.d_out, reference.d_in) {
                return Err(AggregationError::ShapeMismatch {
                    client,
                    layer,
                    expected: (reference.d_out, reference.d_in),
                    found: (f.d_out, f.d_in),
                });
            }
            if !f.a.iter().chain(&f.b).all(|x| x.is_finite()) {
                return Err(AggregationError::NonFinite { client, layer });
            }
            factors.push(f);
        }
        layers.push(LayerGroup {
            layer,
            d_out: reference.d_out,
            d_in: reference.d_in,
            factors,
        });
    }
    // Every client has client 0's layers; one with more has a layer client 0 lacks.
    for (client, c) in clients.iter().enumerate() {
        if let Some(&layer) = c
            .weights
            .layers
            .keys()
            .find(|l| !first.weights.layers.contains_key(l))
        {
            return Err(AggregationError::LayerMismatch { client, layer });
        }
    }

    let total = total as f64;
    Ok(Checked {
        scaling,
        max_rank: ranks.iter().copied().max().unwrap_or(1),
        ranks,
        scales,
        sample_weights: clients.iter().map(|c| c.samples as f64 / total).collect(),
        layers,
    })
}

/// [`LoraFactors::is_consistent`] without its unchecked multiplications (a hostile declared
/// shape could overflow them) and with non-zero dimensions, which the SVD needs.
fn is_consistent(f: &LoraFactors) -> bool {
    f.d_in > 0
        && f.d_out > 0
        && f.rank.checked_mul(f.d_in) == Some(f.a.len())
        && f.d_out.checked_mul(f.rank) == Some(f.b.len())
}

/// Builds the output adapter from `f64` factors, one `(layer, d_out, d_in, a, b)` per layer.
fn to_adapter_weights(
    rank: usize,
    scaling: LoraScaling,
    layers: impl IntoIterator<Item = (AdaptedLayer, usize, usize, Vec<f64>, Vec<f64>)>,
) -> AdapterWeights {
    let layers: BTreeMap<_, _> = layers
        .into_iter()
        .map(|(layer, d_out, d_in, a, b)| {
            let factors = LoraFactors {
                rank,
                d_in,
                d_out,
                a: a.into_iter().map(|x| x as f32).collect(),
                b: b.into_iter().map(|x| x as f32).collect(),
            };
            (layer, factors)
        })
        .collect();
    AdapterWeights {
        rank,
        scaling,
        layers,
    }
}

/// Hand-built adapters shared by the strategies' tests.
#[cfg(test)]
mod fixtures {
    use super::*;
    use crate::lora::adapter::TargetModule;
    use nalgebra::DMatrix;

    /// `alpha = 16`, plain `alpha / r`: scales 8, 4 and 2 for ranks 2, 4 and 8.
    pub(super) const SCALING: LoraScaling = LoraScaling {
        alpha: 16.0,
        rslora: false,
    };

    /// A layer whose `R = 14` (ranks 2 + 4 + 8) is below both dimensions: FlexLoRA's QR path.
    pub(super) const TALL: (AdaptedLayer, usize, usize) = (
        AdaptedLayer {
            layer: 0,
            target: TargetModule::QProj,
        },
        24,
        20,
    );
    /// A layer whose dimensions are below `R = 14`: FlexLoRA's dense path.
    pub(super) const SMALL: (AdaptedLayer, usize, usize) = (
        AdaptedLayer {
            layer: 1,
            target: TargetModule::DownProj,
        },
        10,
        12,
    );

    /// Deterministic values in `[-1, 1)` (xorshift64*), so tests need no `rand`.
    pub(super) fn values(seed: u64) -> impl FnMut() -> f32 {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        move || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let bits = state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
            (bits as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    /// A client of `rank` with random factors on `layers`.
    pub(super) fn client(
        rank: usize,
        samples: u64,
        layers: &[(AdaptedLayer, usize, usize)],
        seed: u64,
    ) -> ClientAdapter {
        let mut next = values(seed);
        let layers = layers
            .iter()
            .map(|&(layer, d_out, d_in)| {
                let a = (0..rank * d_in).map(|_| next()).collect();
                let b = (0..d_out * rank).map(|_| next()).collect();
                let f = LoraFactors {
                    rank,
                    d_in,
                    d_out,
                    a,
                    b,
                };
                (layer, f)
            })
            .collect();
        ClientAdapter {
            weights: AdapterWeights {
                rank,
                scaling: SCALING,
                layers,
            },
            samples,
        }
    }

    /// Clients of ranks 2, 4 and 8 on [`TALL`] and [`SMALL`], with unequal sample counts.
    pub(super) fn mixed_clients() -> Vec<ClientAdapter> {
        [(2, 10), (4, 30), (8, 60)]
            .into_iter()
            .enumerate()
            .map(|(i, (rank, samples))| client(rank, samples, &[TALL, SMALL], 7 + i as u64))
            .collect()
    }

    /// A row-major `f32` buffer as an `f64` matrix.
    pub(super) fn matrix(rows: usize, cols: usize, data: &[f32]) -> DMatrix<f64> {
        DMatrix::from_fn(rows, cols, |i, j| f64::from(data[i * cols + j]))
    }

    /// `s · B A` of one layer of `w`, dense, straight from [`LoraFactors::product`].
    pub(super) fn delta(w: &AdapterWeights, layer: &AdaptedLayer) -> DMatrix<f64> {
        let f = &w.layers[layer];
        matrix(f.d_out, f.d_in, &f.product()) * f64::from(w.scale())
    }

    /// `‖x - y‖_F / ‖y‖_F`.
    pub(super) fn relative_error(x: &DMatrix<f64>, y: &DMatrix<f64>) -> f64 {
        (x - y).norm() / y.norm()
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;
    use std::num::NonZeroUsize;

    const ALL: [AggregationStrategy; 3] = [
        AggregationStrategy::FedAvg,
        AggregationStrategy::HetLora,
        AggregationStrategy::FlexLora,
    ];

    /// Three rank-4 clients, valid for every strategy, to be broken by each error test.
    fn equal_rank_clients() -> Vec<ClientAdapter> {
        (0..3).map(|i| client(4, 5, &[TALL, SMALL], i)).collect()
    }

    fn for_all(clients: &[ClientAdapter]) -> Vec<AggregationError> {
        ALL.iter()
            .map(|&s| aggregate(s, clients).expect_err("aggregation must fail"))
            .collect()
    }

    #[test]
    fn strategy_config_round_trips() {
        assert_eq!(
            AggregationStrategy::default(),
            AggregationStrategy::FlexLora
        );
        for s in ALL {
            let json = serde_json::to_string(&s).expect("serialize");
            assert_eq!(
                serde_json::from_str::<AggregationStrategy>(&json).ok(),
                Some(s)
            );
        }
        assert_eq!(
            serde_json::from_str::<AggregationStrategy>("\"het_lora\"").ok(),
            Some(AggregationStrategy::HetLora)
        );
    }

    #[test]
    fn rejects_empty_input() {
        assert!(
            for_all(&[])
                .iter()
                .all(|e| *e == AggregationError::NoClients)
        );
    }

    #[test]
    fn rejects_zero_samples() {
        let mut clients = equal_rank_clients();
        clients.iter_mut().for_each(|c| c.samples = 0);
        assert!(
            for_all(&clients)
                .iter()
                .all(|e| *e == AggregationError::ZeroSamples)
        );
    }

    #[test]
    fn rejects_missing_and_extra_layers() {
        let mut clients = equal_rank_clients();
        clients[1].weights.layers.remove(&SMALL.0);
        let expected = AggregationError::LayerMismatch {
            client: 1,
            layer: SMALL.0,
        };
        assert!(for_all(&clients).iter().all(|e| *e == expected));

        let mut clients = equal_rank_clients();
        clients[0].weights.layers.remove(&SMALL.0);
        let expected = AggregationError::LayerMismatch {
            client: 1,
            layer: SMALL.0,
        };
        assert!(for_all(&clients).iter().all(|e| *e == expected));
    }

    #[test]
    fn rejects_mismatched_shapes() {
        let mut clients = equal_rank_clients();
        let (layer, d_out, _) = TALL;
        clients[2].weights.layers.insert(
            layer,
            client(4, 1, &[(layer, d_out, 7)], 99).weights.layers[&layer].clone(),
        );
        let expected = AggregationError::ShapeMismatch {
            client: 2,
            layer,
            expected: (TALL.1, TALL.2),
            found: (d_out, 7),
        };
        assert!(for_all(&clients).iter().all(|e| *e == expected));
    }

    #[test]
    fn rejects_inconsistent_factors() {
        let layer = TALL.0;
        let broken: [fn(&mut LoraFactors); 4] = [
            |f| {
                f.a.pop();
            },
            |f| f.b.push(0.0),
            |f| f.rank = 3,
            // A hostile shape whose `rank * d_in` overflows must not panic.
            |f| f.d_in = usize::MAX,
        ];
        for breaker in broken {
            let mut clients = equal_rank_clients();
            let f = clients[1].weights.layers.get_mut(&layer).expect("layer");
            breaker(f);
            let expected = AggregationError::InconsistentFactors { client: 1, layer };
            assert!(for_all(&clients).iter().all(|e| *e == expected));
        }
    }

    #[test]
    fn rejects_non_finite_factors() {
        for bad in [f32::NAN, f32::INFINITY] {
            let mut clients = equal_rank_clients();
            clients[2]
                .weights
                .layers
                .get_mut(&SMALL.0)
                .expect("layer")
                .b[3] = bad;
            let expected = AggregationError::NonFinite {
                client: 2,
                layer: SMALL.0,
            };
            assert!(for_all(&clients).iter().all(|e| *e == expected));
        }
        let mut clients = equal_rank_clients();
        clients[0].weights.layers.get_mut(&TALL.0).expect("layer").a[0] = f32::NAN;
        let e = aggregate(AggregationStrategy::FlexLora, &clients).expect_err("nan");
        assert_eq!(
            e.to_string(),
            "client 0: layer 0.q_proj has a non-finite value"
        );
    }

    #[test]
    fn rejects_bad_scalings_and_ranks() {
        let mut clients = equal_rank_clients();
        clients[1].weights.scaling.alpha = 8.0;
        let expected = AggregationError::ScalingMismatch { client: 1 };
        assert!(for_all(&clients).iter().all(|e| *e == expected));

        for alpha in [0.0, f32::NAN, f32::INFINITY] {
            let mut clients = equal_rank_clients();
            clients
                .iter_mut()
                .for_each(|c| c.weights.scaling.alpha = alpha);
            let expected = AggregationError::InvalidScaling { client: 0 };
            assert!(for_all(&clients).iter().all(|e| *e == expected));
        }

        let mut clients = equal_rank_clients();
        clients[2].weights.rank = 0;
        let expected = AggregationError::ZeroRank { client: 2 };
        assert!(for_all(&clients).iter().all(|e| *e == expected));
    }

    #[test]
    fn for_rank_rejects_unservable_ranks() {
        let clients = mixed_clients();
        let het = aggregate(AggregationStrategy::HetLora, &clients).expect("hetlora");
        assert_eq!(het.ranks(), 1..=8);
        for rank in [0, 9] {
            assert_eq!(
                het.for_rank(rank),
                Err(AggregationError::RankUnavailable {
                    requested: rank,
                    min: 1,
                    max: 8
                })
            );
        }
        let flex = FlexLora::new()
            .with_max_rank(NonZeroUsize::new(3).expect("non-zero"))
            .aggregate(&clients)
            .expect("flexlora");
        assert!(flex.for_rank(3).is_ok());
        assert!(flex.for_rank(4).is_err());
        let avg = aggregate(AggregationStrategy::FedAvg, &equal_rank_clients()).expect("fedavg");
        assert_eq!(avg.ranks(), 4..=4);
        assert!(avg.for_rank(2).is_err());
    }

    /// A 576×576 projection (SmolLM-135M's hidden size) with ranks 2, 4 and 8: runs, keeps its
    /// shapes and stays finite. No timing assertion; it only has to finish in a test.
    #[test]
    fn full_size_layer_aggregates() {
        let layer = (TALL.0, 576, 576);
        let clients: Vec<_> = [2, 4, 8]
            .into_iter()
            .enumerate()
            .map(|(i, r)| client(r, 100 + i as u64, &[layer], i as u64))
            .collect();
        for strategy in [AggregationStrategy::HetLora, AggregationStrategy::FlexLora] {
            let global = aggregate(strategy, &clients).expect("aggregate");
            for rank in [2, 4, 8] {
                let w = global.for_rank(rank).expect("rank");
                let f = &w.layers[&layer.0];
                assert_eq!((f.rank, f.d_out, f.d_in), (rank, 576, 576));
                assert!(f.is_consistent());
                assert!(f.a.iter().chain(&f.b).all(|x| x.is_finite()));
            }
        }
        let same: Vec<_> = (0..3).map(|i| client(8, 10, &[layer], i)).collect();
        let avg = aggregate(AggregationStrategy::FedAvg, &same).expect("fedavg");
        assert_eq!(
            avg.for_rank(8).expect("rank").layers[&layer.0].a.len(),
            8 * 576
        );
    }
}
