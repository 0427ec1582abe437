//! FedAvg of LoRA factors (FedIT): the sample-weighted mean of `A` and of `B`, for clients that
//! all share one rank and one scaling.

use super::{AggregationError, AggregationStrategy, Aggregator, ClientAdapter, GlobalAdapter};
use super::{GlobalKind, check, to_adapter_weights};

/// Sample-weighted FedAvg: `A = Σ p_k A_k`, `B = Σ p_k B_k` with `p_k = n_k / Σ n`.
///
/// The factors are averaged separately, so `B A` is not the mean of the clients' `B_k A_k`;
/// that is the classic behaviour, kept as the baseline. Different ranks are an error
/// ([`AggregationError::RankMismatch`]); use [`super::HetLora`] or [`super::FlexLora`] for them.
/// The result is served at that one rank only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FedAvg;

impl Aggregator for FedAvg {
    fn aggregate(&self, clients: &[ClientAdapter]) -> Result<GlobalAdapter, AggregationError> {
        let checked = check(clients)?;
        let rank = checked.ranks[0];
        if let Some((client, &other)) = checked.ranks.iter().enumerate().find(|(_, r)| **r != rank)
        {
            return Err(AggregationError::RankMismatch {
                client,
                rank: other,
                expected: rank,
            });
        }
        let layers = checked.layers.iter().map(|group| {
            let mut a = vec![0.0f64; rank * group.d_in];
            let mut b = vec![0.0f64; group.d_out * rank];
            for (f, &p) in group.factors.iter().zip(&checked.sample_weights) {
                accumulate(&mut a, &f.a, p);
                accumulate(&mut b, &f.b, p);
            }
            (group.layer, group.d_out, group.d_in, a, b)
        });
        let weights = to_adapter_weights(rank, checked.scaling, layers);
        Ok(GlobalAdapter {
            strategy: AggregationStrategy::FedAvg,
            scaling: checked.scaling,
            kind: GlobalKind::Exact(weights),
        })
    }
}

/// `sum += weight · x`, elementwise.
fn accumulate(sum: &mut [f64], x: &[f32], weight: f64) {
    sum.iter_mut()
        .zip(x)
        .for_each(|(s, &x)| *s += weight * f64::from(x));
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;

    #[test]
    fn fedavg_is_the_sample_weighted_mean() {
        let samples = [1u64, 3, 6];
        let clients: Vec<_> = samples
            .iter()
            .enumerate()
            .map(|(i, &n)| client(4, n, &[TALL, SMALL], 40 + i as u64))
            .collect();
        let global = FedAvg.aggregate(&clients).expect("fedavg");
        assert_eq!(global.strategy(), AggregationStrategy::FedAvg);
        let w = global.for_rank(4).expect("rank 4");
        assert_eq!((w.rank, w.scaling), (4, SCALING));
        for (layer, d_out, d_in) in [TALL, SMALL] {
            let f = &w.layers[&layer];
            assert_eq!((f.rank, f.d_out, f.d_in), (4, d_out, d_in));
            // By hand: Σ n_k x_k / Σ n_k, entry by entry.
            let mean = |pick: fn(&crate::lora::adapter::LoraFactors) -> &Vec<f32>, i: usize| {
                let weighted: f64 = clients
                    .iter()
                    .zip(samples)
                    .map(|(c, n)| n as f64 * f64::from(pick(&c.weights.layers[&layer])[i]))
                    .sum();
                weighted / 10.0
            };
            for (i, &a) in f.a.iter().enumerate() {
                assert!((f64::from(a) - mean(|f| &f.a, i)).abs() < 1e-6);
            }
            for (i, &b) in f.b.iter().enumerate() {
                assert!((f64::from(b) - mean(|f| &f.b, i)).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn fedavg_of_one_client_is_that_client() {
        let clients = [client(2, 7, &[TALL], 3)];
        let w = FedAvg
            .aggregate(&clients)
            .expect("fedavg")
            .for_rank(2)
            .expect("rank");
        assert_eq!(w, clients[0].weights);
    }

    #[test]
    fn fedavg_rejects_mixed_ranks() {
        let clients = mixed_clients();
        assert_eq!(
            FedAvg.aggregate(&clients).map(|_| ()),
            Err(AggregationError::RankMismatch {
                client: 1,
                rank: 4,
                expected: 2
            })
        );
    }
}
