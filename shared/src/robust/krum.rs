//! Krum and Multi-Krum (Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine
//! Tolerant Gradient Descent"): score each update by the sum of squared distances to its
//! `n − f − 2` nearest other updates and keep the best-scored one (Krum) or the mean of the
//! `m` best (Multi-Krum). Needs `n > 2f + 2`; costs `O(n² d)`.

use super::RobustError;

/// (Multi-)Krum of equal-length, finite `updates` tolerating `byzantine` attackers, averaging
/// the `multi` best-scored updates.
///
/// # Errors
///
/// [`RobustError::Unsupported`] when `n ≤ 2f + 2` or `multi` is not in `1..=n − f`.
pub fn krum(updates: &[&[f32]], byzantine: usize, multi: usize) -> Result<Vec<f32>, RobustError> {
    let n = updates.len();
    if n <= 2 * byzantine + 2 || multi == 0 || multi > n - byzantine {
        return Err(RobustError::Unsupported {
            rule: "krum",
            reason: format!(
                "{n} updates, f = {byzantine}, m = {multi}: needs n > 2f + 2, 1 ≤ m ≤ n − f"
            ),
        });
    }
    let mut distance = vec![0.0f64; n * n];
    for i in 0..n {
        for j in i + 1..n {
            let d: f64 = updates[i]
                .iter()
                .zip(updates[j])
                .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
                .sum();
            distance[i * n + j] = d;
            distance[j * n + i] = d;
        }
    }
    let closest = n - byzantine - 2;
    let mut scores: Vec<(f64, usize)> = (0..n)
        .map(|i| {
            let mut row: Vec<f64> = (0..n)
                .filter(|&j| j != i)
                .map(|j| distance[i * n + j])
                .collect();
            row.sort_unstable_by(f64::total_cmp);
            (row[..closest].iter().sum(), i)
        })
        .collect();
    scores.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let chosen: Vec<&[f32]> = scores[..multi].iter().map(|&(_, i)| updates[i]).collect();
    Ok(super::weighted_mean(&chosen, &vec![1.0; multi]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn krum_picks_an_update_of_the_honest_cluster() {
        let rows = [
            [0.0f32, 0.0],
            [0.1, 0.0],
            [0.0, 0.1],
            [0.1, 0.1],
            [9.0, 9.0],
            [9.5, 9.0],
        ];
        let refs: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
        let out = krum(&refs, 1, 1).expect("krum");
        assert!(out.iter().all(|v| *v <= 0.1));
        assert!(krum(&refs, 2, 1).is_err());
    }
}
