//! The coordinate-wise trimmed mean (Yin et al. 2018): per coordinate, drop the `⌊trim · n⌋`
//! largest and smallest client values and average the rest.

use super::RobustError;

/// The coordinate-wise trimmed mean of equal-length, finite `updates`.
///
/// # Errors
///
/// [`RobustError::Unsupported`] for `trim` outside `[0, 0.5)`.
pub fn trimmed_mean(updates: &[&[f32]], trim: f64) -> Result<Vec<f32>, RobustError> {
    if !(0.0..0.5).contains(&trim) {
        return Err(RobustError::Unsupported {
            rule: "trimmed_mean",
            reason: format!("trim {trim} is not in [0, 0.5)"),
        });
    }
    let n = updates.len();
    let cut = (trim * n as f64).floor() as usize;
    let kept = n - 2 * cut;
    let len = updates.first().map_or(0, |u| u.len());
    let mut column = vec![0.0f32; n];
    Ok((0..len)
        .map(|i| {
            column.iter_mut().zip(updates).for_each(|(c, u)| *c = u[i]);
            column.sort_unstable_by(f32::total_cmp);
            let sum: f64 = column[cut..n - cut].iter().map(|&v| f64::from(v)).sum();
            (sum / kept as f64) as f32
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_both_ends() {
        let rows: Vec<[f32; 1]> = [-100.0, 1.0, 2.0, 3.0, 100.0].map(|v| [v]).to_vec();
        let refs: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
        assert_eq!(trimmed_mean(&refs, 0.2).expect("trim"), vec![2.0]);
        assert_eq!(trimmed_mean(&refs, 0.0).expect("no trim"), vec![1.2]);
        assert!(trimmed_mean(&refs, 0.5).is_err());
    }
}
