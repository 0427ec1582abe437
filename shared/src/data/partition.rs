//! How a data set's items are shared out among virtual clients, and which items are held out
//! for evaluation. Every function works on item indices (into the loaded examples), and every
//! random choice comes from a ChaCha8 stream seeded by the caller, so a partition is the same
//! on every machine for the same seed.
//!
//! - [`iid`]: a shuffle dealt round-robin; client sizes differ by at most one.
//! - [`dirichlet`]: label skew as in the usual federated benchmarks (NIID-Bench, FedLab): for
//!   each label, the share of its items each client gets is drawn from Dirichlet(alpha) over
//!   the clients. Small alpha concentrates each label on few clients; large alpha approaches
//!   IID.
//! - [`natural`]: one client per key (a Shakespeare role in a play, as LEAF does).
//! - [`heldout_split`]: the held-out set is a fraction of *each* client's items (LEAF's
//!   per-user split), pooled. Drawing from every client makes the held-out set follow the whole
//!   data set's distribution whatever the partition, and represents every client's data
//!   (same voices, unseen lines), which a global split before partitioning would not
//!   guarantee for small natural clients.

use std::collections::BTreeMap;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma};

/// Why a partition could not be made.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PartitionError {
    /// Zero clients were asked for.
    #[error("a partition needs at least one client")]
    NoClients,
    /// The Dirichlet concentration is not a positive finite number.
    #[error("dirichlet alpha must be positive and finite, got {0}")]
    BadAlpha(f64),
    /// There are too few items to give every client its minimum.
    #[error("{items} items cannot give {clients} clients {min_items} each")]
    TooFewItems {
        /// Items available.
        items: usize,
        /// Clients asked for.
        clients: usize,
        /// The minimum per client.
        min_items: usize,
    },
    /// The held-out fraction is outside [0, 1).
    #[error("held-out fraction must be in [0, 1), got {0}")]
    BadFraction(f64),
}

/// IID: items `0..items` shuffled and dealt round-robin to `clients` clients, so sizes differ
/// by at most one. Each client's indices are sorted.
pub fn iid(items: usize, clients: usize, seed: u64) -> Result<Vec<Vec<usize>>, PartitionError> {
    if clients == 0 {
        return Err(PartitionError::NoClients);
    }
    let mut order: Vec<usize> = (0..items).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let mut parts = vec![Vec::with_capacity(items / clients + 1); clients];
    for (i, item) in order.into_iter().enumerate() {
        parts[i % clients].push(item);
    }
    parts.iter_mut().for_each(|p| p.sort_unstable());
    Ok(parts)
}

/// Label skew: item `i` has label `labels[i]`; for each label (in sorted order), its items are
/// shuffled and cut among the clients in proportions drawn from a symmetric Dirichlet(`alpha`)
/// (normalised Gamma(`alpha`, 1) draws, cut points `floor(cumulative share × count)`, as
/// NIID-Bench does).
///
/// A client left with fewer than `min_items` items then takes single random items from the
/// currently largest client until it has them (NIID-Bench instead redraws everything until all
/// clients are large enough, which for small alpha and many clients may never happen). The
/// moves are few when `min_items` is small, so the skew is kept. Each client's indices are
/// sorted.
pub fn dirichlet<L: Ord>(
    labels: &[L],
    clients: usize,
    alpha: f64,
    min_items: usize,
    seed: u64,
) -> Result<Vec<Vec<usize>>, PartitionError> {
    if clients == 0 {
        return Err(PartitionError::NoClients);
    }
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(PartitionError::BadAlpha(alpha));
    }
    if labels.len() < clients * min_items {
        return Err(PartitionError::TooFewItems {
            items: labels.len(),
            clients,
            min_items,
        });
    }
    let gamma = Gamma::new(alpha, 1.0).map_err(|_| PartitionError::BadAlpha(alpha))?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut by_label: BTreeMap<&L, Vec<usize>> = BTreeMap::new();
    for (i, label) in labels.iter().enumerate() {
        by_label.entry(label).or_default().push(i);
    }
    let mut parts: Vec<Vec<usize>> = vec![Vec::new(); clients];
    for items in by_label.values_mut() {
        items.shuffle(&mut rng);
        let shares: Vec<f64> = (0..clients).map(|_| gamma.sample(&mut rng)).collect();
        let total: f64 = shares.iter().sum();
        if !(total.is_finite() && total > 0.0) {
            // Every draw underflowed (possible only for tiny alpha): the limit of the
            // distribution, all of the label on one client.
            let client = rand::Rng::random_range(&mut rng, 0..clients);
            parts[client].extend_from_slice(items);
            continue;
        }
        let mut start = 0;
        let mut cumulative = 0.0;
        for (client, share) in shares.iter().enumerate() {
            cumulative += share;
            let end = if client + 1 == clients {
                items.len()
            } else {
                ((cumulative / total * items.len() as f64) as usize).clamp(start, items.len())
            };
            parts[client].extend_from_slice(&items[start..end]);
            start = end;
        }
    }
    top_up(&mut parts, min_items, &mut rng);
    parts.iter_mut().for_each(|p| p.sort_unstable());
    Ok(parts)
}

/// Moves single random items from the largest client (lowest index among equals) to each
/// client below `min_items`. The caller has checked there are enough items in all.
fn top_up(parts: &mut [Vec<usize>], min_items: usize, rng: &mut ChaCha8Rng) {
    for needy in 0..parts.len() {
        while parts[needy].len() < min_items {
            let donor = (0..parts.len())
                .max_by_key(|&c| (parts[c].len(), std::cmp::Reverse(c)))
                .unwrap_or(needy);
            if donor == needy || parts[donor].len() <= min_items {
                // Unreachable when items ≥ clients × min_items; stop rather than loop.
                return;
            }
            let pick = rand::Rng::random_range(&mut *rng, 0..parts[donor].len());
            let item = parts[donor].swap_remove(pick);
            parts[needy].push(item);
        }
    }
}

/// A partition with one client per key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NaturalPartition {
    /// Each client's key (`romeo_and_juliet/Romeo`).
    pub names: Vec<String>,
    /// Each client's item indices, in item order.
    pub clients: Vec<Vec<usize>>,
}

impl NaturalPartition {
    /// Keeps the `n` clients with the most items (ties broken by name), largest first.
    pub fn keep_largest(self, n: usize) -> Self {
        let mut pairs: Vec<(String, Vec<usize>)> =
            self.names.into_iter().zip(self.clients).collect();
        pairs.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then_with(|| a.0.cmp(&b.0)));
        pairs.truncate(n);
        let (names, clients) = pairs.into_iter().unzip();
        Self { names, clients }
    }
}

/// The natural partition: item `i` belongs to the client named by its key; items without a key
/// are left out, and so are keys with fewer than `min_items` items. Clients come in key order.
pub fn natural<'a>(
    keys: impl IntoIterator<Item = Option<&'a str>>,
    min_items: usize,
) -> NaturalPartition {
    let mut by_key: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, key) in keys.into_iter().enumerate() {
        if let Some(key) = key {
            by_key.entry(key).or_default().push(i);
        }
    }
    by_key.retain(|_, items| items.len() >= min_items.max(1));
    let (names, clients) = by_key
        .into_iter()
        .map(|(k, items)| (k.to_string(), items))
        .unzip();
    NaturalPartition { names, clients }
}

/// Clients' training items and the pooled held-out items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldOutSplit {
    /// Each client's training items, sorted.
    pub train: Vec<Vec<usize>>,
    /// Held-out items of all clients, shuffled, so that its first `k` entries are a uniform
    /// sample when evaluation uses only part of it.
    pub heldout: Vec<usize>,
}

/// Holds out `round(fraction × n)` of each client's `n` items, chosen at random, but never a
/// client's last item (a client with one item keeps it).
pub fn heldout_split(
    clients: &[Vec<usize>],
    fraction: f64,
    seed: u64,
) -> Result<HeldOutSplit, PartitionError> {
    if !(0.0..1.0).contains(&fraction) {
        return Err(PartitionError::BadFraction(fraction));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut train = Vec::with_capacity(clients.len());
    let mut heldout = Vec::new();
    for items in clients {
        let mut items = items.clone();
        items.shuffle(&mut rng);
        let held =
            ((items.len() as f64 * fraction).round() as usize).min(items.len().saturating_sub(1));
        heldout.extend(items.drain(..held));
        items.sort_unstable();
        train.push(items);
    }
    heldout.shuffle(&mut rng);
    Ok(HeldOutSplit { train, heldout })
}

/// Mean over non-empty clients of the entropy (nats) of the client's label distribution: the
/// number of labels `L` gives `ln L` for a client holding all labels equally, 0 for a client
/// holding one. Lower means more skew.
pub fn mean_label_entropy<L: Ord>(parts: &[Vec<usize>], labels: &[L]) -> f64 {
    let mut total = 0.0;
    let mut counted = 0;
    for items in parts.iter().filter(|p| !p.is_empty()) {
        let mut counts: BTreeMap<&L, usize> = BTreeMap::new();
        for &i in items {
            *counts.entry(&labels[i]).or_default() += 1;
        }
        let n = items.len() as f64;
        total -= counts
            .values()
            .map(|&c| {
                let p = c as f64 / n;
                p * p.ln()
            })
            .sum::<f64>();
        counted += 1;
    }
    if counted == 0 {
        0.0
    } else {
        total / counted as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every index in `0..items` appears exactly once across the clients.
    fn assert_covers(parts: &[Vec<usize>], items: usize) {
        let mut all: Vec<usize> = parts.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..items).collect::<Vec<_>>());
    }

    #[test]
    fn iid_sizes_differ_by_at_most_one() {
        for (items, clients) in [(100, 7), (10, 10), (3, 5), (1000, 64)] {
            let parts = iid(items, clients, 1).unwrap();
            assert_eq!(parts.len(), clients);
            assert_covers(&parts, items);
            let sizes: Vec<usize> = parts.iter().map(Vec::len).collect();
            let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            assert!(max - min <= 1, "{sizes:?}");
        }
        assert_eq!(iid(5, 0, 1), Err(PartitionError::NoClients));
    }

    #[test]
    fn iid_is_deterministic_from_the_seed() {
        assert_eq!(iid(200, 9, 42).unwrap(), iid(200, 9, 42).unwrap());
        assert_ne!(iid(200, 9, 42).unwrap(), iid(200, 9, 43).unwrap());
    }

    /// 10 labels × 100 items, 20 clients.
    fn ten_labels() -> Vec<u32> {
        (0..1000).map(|i| i % 10).collect()
    }

    #[test]
    fn dirichlet_skew_grows_as_alpha_falls() {
        let labels = ten_labels();
        let mut entropies = Vec::new();
        for alpha in [100.0, 1.0, 0.1] {
            // Averaged over seeds so that one lucky draw cannot flip the order.
            let mean = (0..5)
                .map(|seed| {
                    let parts = dirichlet(&labels, 20, alpha, 1, seed).unwrap();
                    assert_covers(&parts, labels.len());
                    assert!(parts.iter().all(|p| !p.is_empty()));
                    mean_label_entropy(&parts, &labels)
                })
                .sum::<f64>()
                / 5.0;
            entropies.push(mean);
        }
        eprintln!("mean label entropy (nats) at alpha 100, 1, 0.1: {entropies:?}");
        // ln 10 = 2.303 is no skew at all.
        assert!(entropies[0] > 2.1, "{entropies:?}");
        assert!(
            entropies[0] > entropies[1] && entropies[1] > entropies[2],
            "{entropies:?}"
        );
        assert!(entropies[2] < 1.0, "{entropies:?}");
    }

    #[test]
    fn dirichlet_is_deterministic_and_checks_its_arguments() {
        let labels = ten_labels();
        let a = dirichlet(&labels, 20, 0.5, 2, 7).unwrap();
        assert_eq!(a, dirichlet(&labels, 20, 0.5, 2, 7).unwrap());
        assert_ne!(a, dirichlet(&labels, 20, 0.5, 2, 8).unwrap());
        assert!(a.iter().all(|p| p.len() >= 2));
        assert_eq!(
            dirichlet(&labels, 20, 0.0, 1, 7),
            Err(PartitionError::BadAlpha(0.0))
        );
        assert!(matches!(
            dirichlet(&labels, 600, 1.0, 2, 7),
            Err(PartitionError::TooFewItems { .. })
        ));
    }

    #[test]
    fn natural_groups_by_key() {
        let keys = [
            Some("b"),
            Some("a"),
            None,
            Some("b"),
            Some("c"),
            Some("b"),
            Some("a"),
        ];
        let p = natural(keys, 2);
        assert_eq!(p.names, vec!["a", "b"]);
        assert_eq!(p.clients, vec![vec![1, 6], vec![0, 3, 5]]);
        let largest = natural(keys, 1).keep_largest(2);
        assert_eq!(largest.names, vec!["b", "a"]);
    }

    #[test]
    fn heldout_takes_a_fraction_of_each_client() {
        let clients = vec![(0..10).collect::<Vec<_>>(), (10..30).collect(), vec![30]];
        let split = heldout_split(&clients, 0.2, 3).unwrap();
        let sizes: Vec<usize> = split.train.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![8, 16, 1]);
        assert_eq!(split.heldout.len(), 6);
        let mut all: Vec<usize> = split.train.concat();
        all.extend(&split.heldout);
        all.sort_unstable();
        assert_eq!(all, (0..31).collect::<Vec<_>>());
        // Each client's held-out items come from that client.
        assert_eq!(split.heldout.iter().filter(|&&i| i < 10).count(), 2);
        assert_eq!(split, heldout_split(&clients, 0.2, 3).unwrap());
        assert_ne!(split, heldout_split(&clients, 0.2, 4).unwrap());
        assert_eq!(
            heldout_split(&clients, 1.0, 3),
            Err(PartitionError::BadFraction(1.0))
        );
    }
}
