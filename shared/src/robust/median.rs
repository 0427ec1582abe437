//! The coordinate-wise median of updates (Yin et al. 2018): each coordinate of the result is
//! the median of that coordinate over the clients (the mean of the two middle values for an
//! even count), robust to fewer than half of the clients lying.

/// The coordinate-wise median of equal-length, finite `updates` (at least one).
pub fn coordinate_median(updates: &[&[f32]]) -> Vec<f32> {
    let n = updates.len();
    let len = updates.first().map_or(0, |u| u.len());
    let mut column = vec![0.0f32; n];
    (0..len)
        .map(|i| {
            column.iter_mut().zip(updates).for_each(|(c, u)| *c = u[i]);
            let mid = n / 2;
            let (lower, &mut upper, _) = column.select_nth_unstable_by(mid, f32::total_cmp);
            if n % 2 == 1 {
                upper
            } else {
                // The largest of the lower half is the other middle value.
                let below = lower.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                0.5 * (below + upper)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        let a = [1.0f32, 10.0];
        let b = [3.0f32, -10.0];
        let c = [2.0f32, 0.0];
        let d = [100.0f32, 1.0];
        assert_eq!(coordinate_median(&[&a, &b, &c]), vec![2.0, 0.0]);
        assert_eq!(coordinate_median(&[&a, &b, &c, &d]), vec![2.5, 0.5]);
    }
}
