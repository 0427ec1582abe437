//! Updates as flat `f32` vectors, so that one implementation of every robust rule, of clipping
//! and of secure aggregation serves both algorithms:
//!
//! - LoRA: the difference between a client's adapter and the global adapter it started from,
//!   every layer's `A` then `B` in the adapter's (sorted) layer order;
//! - FedKSeed: the dense K-vector of accumulated scalar gradients (zero for seeds a client did
//!   not draw).

use crate::lora::adapter::AdapterWeights;
use crate::zo::round::ClientReport;

/// Why an adapter cannot be flattened against another.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FlatError {
    /// The adapters differ in rank, layers or shapes.
    #[error("adapter does not have the global adapter's rank, layers and shapes")]
    ShapeMismatch,
    /// A vector of the wrong length.
    #[error("vector has {got} values, the adapter has {expected}")]
    Length {
        /// The adapter's parameter count.
        expected: usize,
        /// The vector's.
        got: usize,
    },
}

/// Parameters of an adapter (every `A` and `B`).
pub fn adapter_len(adapter: &AdapterWeights) -> usize {
    adapter.layers.values().map(|f| f.a.len() + f.b.len()).sum()
}

/// `client − global`, flattened.
///
/// # Errors
///
/// [`FlatError::ShapeMismatch`] unless both have the same rank, layers and shapes.
pub fn adapter_delta(
    global: &AdapterWeights,
    client: &AdapterWeights,
) -> Result<Vec<f32>, FlatError> {
    let same = global.rank == client.rank
        && global.layers.len() == client.layers.len()
        && global
            .layers
            .iter()
            .zip(&client.layers)
            .all(|((ga, g), (ca, c))| ga == ca && g.a.len() == c.a.len() && g.b.len() == c.b.len());
    if !same {
        return Err(FlatError::ShapeMismatch);
    }
    let mut out = Vec::with_capacity(adapter_len(global));
    for (g, c) in global.layers.values().zip(client.layers.values()) {
        out.extend(c.a.iter().zip(&g.a).map(|(c, g)| c - g));
        out.extend(c.b.iter().zip(&g.b).map(|(c, g)| c - g));
    }
    Ok(out)
}

/// `global + delta`.
///
/// # Errors
///
/// [`FlatError::Length`] when `delta` does not have [`adapter_len`] values.
pub fn apply_adapter_delta(
    global: &AdapterWeights,
    delta: &[f32],
) -> Result<AdapterWeights, FlatError> {
    let expected = adapter_len(global);
    if delta.len() != expected {
        return Err(FlatError::Length {
            expected,
            got: delta.len(),
        });
    }
    let mut out = global.clone();
    let mut rest = delta;
    for f in out.layers.values_mut() {
        let (da, tail) = rest.split_at(f.a.len());
        f.a.iter_mut().zip(da).for_each(|(v, d)| *v += d);
        let (db, tail) = tail.split_at(f.b.len());
        f.b.iter_mut().zip(db).for_each(|(v, d)| *v += d);
        rest = tail;
    }
    Ok(out)
}

/// A FedKSeed report's accumulated scalar gradients as a dense K-vector. Indices outside
/// `0..k` are dropped (reports are validated before this).
pub fn dense_seed_grads(report: &ClientReport, k: u32) -> Vec<f32> {
    let mut dense = vec![0.0f32; k as usize];
    for &(s, g) in &report.seed_grads {
        if let Some(v) = dense.get_mut(s as usize) {
            *v += g;
        }
    }
    dense
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::adapter::{AdaptedLayer, LoraFactors, LoraScaling, TargetModule};

    fn adapter(offset: f32) -> AdapterWeights {
        let mut layers = std::collections::BTreeMap::new();
        for (layer, target) in [(0, TargetModule::QProj), (1, TargetModule::VProj)] {
            layers.insert(
                AdaptedLayer { layer, target },
                LoraFactors {
                    rank: 2,
                    d_in: 3,
                    d_out: 2,
                    a: (0..6).map(|i| i as f32 + offset).collect(),
                    b: (0..4).map(|i| -(i as f32) + offset).collect(),
                },
            );
        }
        AdapterWeights {
            rank: 2,
            scaling: LoraScaling {
                alpha: 4.0,
                rslora: false,
            },
            layers,
        }
    }

    #[test]
    fn delta_round_trips() {
        let (g, c) = (adapter(0.0), adapter(0.5));
        let d = adapter_delta(&g, &c).expect("same shapes");
        assert_eq!(d.len(), 20);
        assert!(d.iter().all(|&v| v == 0.5));
        assert_eq!(apply_adapter_delta(&g, &d).expect("length"), c);
        assert!(apply_adapter_delta(&g, &d[1..]).is_err());
        let report = ClientReport {
            round: 1,
            seed_grads: vec![(1, 2.0), (3, -1.0)],
            step_grads: Vec::new(),
            samples: 1,
        };
        assert_eq!(dense_seed_grads(&report, 4), vec![0.0, 2.0, 0.0, -1.0]);
    }
}
