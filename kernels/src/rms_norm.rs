//! RMS normalisation `y = x / √(mean(x²) + ε) · γ` over each row, and its input gradient, rows
//! in parallel.
//!
//! Why by hand: as tensor operations a norm is six passes forward and about ten backward, each
//! on one core; a LoRA step has 61 of them.

use crate::pool::{Pieces, run_parts};

/// Rows per parallel part: small norms stay on the calling thread.
fn rows_per_part(rows: usize, width: usize) -> usize {
    if rows * width < 1 << 15 {
        rows.max(1)
    } else {
        rows.div_ceil(2 * crate::pool::threads()).max(1)
    }
}

/// `(y, rms)`: the normalised rows and each row's `√(mean(x²) + ε)`.
///
/// # Panics
/// When `x` is not whole rows of `gamma.len()` values.
pub fn rms_norm(x: &[f32], gamma: &[f32], epsilon: f32) -> (Vec<f32>, Vec<f32>) {
    let width = gamma.len();
    assert!(
        width > 0 && x.len() % width == 0,
        "rows of the norm's width"
    );
    let rows = x.len() / width;
    let mut y = vec![0.0f32; x.len()];
    let mut rms = vec![0.0f32; rows];
    let per = rows_per_part(rows, width);
    let (y_pieces, rms_pieces) = (Pieces::new(&mut y, per * width), Pieces::new(&mut rms, per));
    run_parts(rms_pieces.count(), &|i| {
        // SAFETY: each part takes its own pieces; the buffers outlive `run_parts`.
        let (y, rms) = unsafe { (y_pieces.get(i), rms_pieces.get(i)) };
        let x = &x[i * per * width..][..y.len()];
        for ((y, x), rms) in y
            .chunks_exact_mut(width)
            .zip(x.chunks_exact(width))
            .zip(rms)
        {
            let mean_square = x.iter().map(|v| v * v).sum::<f32>() / width as f32;
            *rms = (mean_square + epsilon).sqrt();
            for ((y, &x), &g) in y.iter_mut().zip(x).zip(gamma) {
                *y = x / *rms * g;
            }
        }
    });
    (y, rms)
}

/// The gradient for `x` of `Σ dy · y`:
/// `dx = γ dy / r − x · Σ(γ dy x) / (n r³)` with `r` the row's rms.
///
/// # Panics
/// When the shapes disagree.
pub fn rms_norm_grad(x: &[f32], gamma: &[f32], rms: &[f32], dy: &[f32]) -> Vec<f32> {
    let width = gamma.len();
    assert!(
        width > 0 && x.len() == rms.len() * width && dy.len() == x.len(),
        "shapes"
    );
    let rows = rms.len();
    let mut dx = vec![0.0f32; x.len()];
    let per = rows_per_part(rows, width);
    let pieces = Pieces::new(&mut dx, per * width);
    run_parts(pieces.count(), &|i| {
        // SAFETY: each part takes its own piece; `dx` outlives `run_parts`.
        let dx = unsafe { pieces.get(i) };
        let start = i * per * width;
        let (x, dy) = (&x[start..][..dx.len()], &dy[start..][..dx.len()]);
        for (((dx, x), dy), &r) in dx
            .chunks_exact_mut(width)
            .zip(x.chunks_exact(width))
            .zip(dy.chunks_exact(width))
            .zip(&rms[i * per..])
        {
            let dot: f32 = x
                .iter()
                .zip(dy)
                .zip(gamma)
                .map(|((x, d), g)| g * d * x)
                .sum();
            let k = dot / (width as f32 * r * r * r);
            for (((dx, &x), &d), &g) in dx.iter_mut().zip(x).zip(dy).zip(gamma) {
                *dx = g * d / r - x * k;
            }
        }
    });
    dx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_and_gradient_match_f64_finite_differences() {
        let width = 9;
        let rows = 4000; // enough to be split between threads
        let x: Vec<f32> = (0..rows * width)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
            .collect();
        let gamma: Vec<f32> = (0..width).map(|j| 0.5 + j as f32 * 0.1).collect();
        let w: Vec<f32> = (0..rows * width)
            .map(|i| ((i * 13 % 7) as f32 - 3.0) / 5.0)
            .collect();
        let eps = 1e-5f32;
        let (y, rms) = rms_norm(&x, &gamma, eps);
        let dx = rms_norm_grad(&x, &gamma, &rms, &w);
        let objective = |row: &[f64], r: usize| -> f64 {
            let ms = row.iter().map(|v| v * v).sum::<f64>() / width as f64;
            let rms = (ms + f64::from(eps)).sqrt();
            row.iter()
                .enumerate()
                .map(|(j, v)| v / rms * f64::from(gamma[j]) * f64::from(w[r * width + j]))
                .sum()
        };
        for r in [0usize, 1, 1777, rows - 1] {
            let row: Vec<f64> = x[r * width..(r + 1) * width]
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            let ms = row.iter().map(|v| v * v).sum::<f64>() / width as f64;
            let want_rms = (ms + f64::from(eps)).sqrt();
            assert!((f64::from(rms[r]) - want_rms).abs() < 1e-5 * want_rms);
            for j in 0..width {
                let want = row[j] / want_rms * f64::from(gamma[j]);
                assert!((f64::from(y[r * width + j]) - want).abs() < 1e-5 * (1.0 + want.abs()));
                let h = 1e-4;
                let (mut up, mut down) = (row.clone(), row.clone());
                up[j] += h;
                down[j] -= h;
                let numeric = (objective(&up, r) - objective(&down, r)) / (2.0 * h);
                let got = f64::from(dx[r * width + j]);
                assert!(
                    (got - numeric).abs() < 1e-4 * (1.0 + numeric.abs()),
                    "{got} vs {numeric}"
                );
            }
        }
    }
}
