//! The next-token loss and its gradient, fused over the vocabulary: one pass for the row's
//! maximum, one for its sum of exponentials, and one for the whole gradient.
//!
//! Why by hand: written with tensor operations, the loss of a 128-token step over SmolLM2's
//! 49,152-word vocabulary made about ten passes over a 25 MB logit matrix, each allocating a
//! fresh one, and evaluated every exponential through libm one element at a time on one core.
//! Here rows run in parallel and the exponential is a polynomial the compiler vectorises.

use crate::pool::{Pieces, run_parts};

/// Rows below this many logits in all run on the calling thread.
const SERIAL_BELOW: usize = 1 << 16;

/// `nll[r] = logsumexp(logits[r]) − logits[r][targets[r]]` for each row of `vocab` logits.
///
/// # Panics
/// When `logits` is not `targets.len()` rows of `vocab` values, or a target is not below
/// `vocab`.
pub fn token_nll(logits: &[f32], vocab: usize, targets: &[usize]) -> Vec<f32> {
    check(logits, vocab, targets);
    let mut nll = vec![0.0f32; targets.len()];
    let rows_per_part = rows_per_part(logits.len(), targets.len());
    let pieces = Pieces::new(&mut nll, rows_per_part);
    run_parts(pieces.count(), &|i| {
        // SAFETY: each part takes its own piece; `nll` outlives `run_parts`.
        let out = unsafe { pieces.get(i) };
        for (r, o) in (i * rows_per_part..).zip(out.iter_mut()) {
            let values = &logits[r * vocab..(r + 1) * vocab];
            *o = log_sum_exp(values) - values[targets[r]];
        }
    });
    nll
}

/// Rows per parallel part: all of them when the logits are few, else about four parts per
/// thread.
fn rows_per_part(len: usize, rows: usize) -> usize {
    if len < SERIAL_BELOW {
        return rows.max(1);
    }
    rows.div_ceil(4 * crate::pool::threads()).max(1)
}

/// The gradient of `Σ_r upstream[r] · nll[r]` with respect to the logits:
/// `upstream[r] · (softmax(logits[r])[v] − [v = targets[r]])`.
///
/// # Panics
/// As [`token_nll`], and when `upstream` has not one value per row.
pub fn token_nll_grad(
    logits: &[f32],
    vocab: usize,
    targets: &[usize],
    upstream: &[f32],
) -> Vec<f32> {
    check(logits, vocab, targets);
    assert_eq!(
        upstream.len(),
        targets.len(),
        "one upstream gradient per row"
    );
    let mut grad = vec![0.0f32; logits.len()];
    let rows_per_part = rows_per_part(logits.len(), targets.len());
    let pieces = Pieces::new(&mut grad, rows_per_part * vocab);
    run_parts(pieces.count(), &|i| {
        // SAFETY: each part takes its own piece; `grad` outlives `run_parts`.
        let out = unsafe { pieces.get(i) };
        for (r, out) in (i * rows_per_part..).zip(out.chunks_exact_mut(vocab)) {
            let values = &logits[r * vocab..(r + 1) * vocab];
            let g = upstream[r];
            scaled_softmax(values, log_sum_exp(values), g, out);
            out[targets[r]] -= g;
        }
    });
    grad
}

fn check(logits: &[f32], vocab: usize, targets: &[usize]) {
    assert!(vocab > 0, "an empty vocabulary");
    assert_eq!(
        logits.len(),
        vocab * targets.len(),
        "one row of logits per target"
    );
    assert!(
        targets.iter().all(|&t| t < vocab),
        "a target past the vocabulary"
    );
}

/// Lanes the loops below are written over, so the compiler keeps them in vector registers.
const LANES: usize = 16;

/// `max + ln Σ exp(x − max)`.
fn log_sum_exp(row: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512 (checked on the line above).
        return unsafe { log_sum_exp_avx512(row) };
    }
    log_sum_exp_body(row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn log_sum_exp_avx512(row: &[f32]) -> f32 {
    log_sum_exp_body(row)
}

#[inline(always)]
fn log_sum_exp_body(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            *m = m.max(v);
        }
    }
    let max = tail
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if !max.is_finite() {
        // All −∞ gives −∞; any +∞ or NaN propagates, as the unfused formula would.
        return max;
    }
    let mut sums = [0.0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    for chunk in chunks {
        for (s, &v) in sums.iter_mut().zip(chunk) {
            *s += exp(v - max);
        }
    }
    let sum: f32 = tail.iter().map(|&v| exp(v - max)).sum::<f32>() + sums.iter().sum::<f32>();
    max + sum.ln()
}

/// `out[v] = g · exp(row[v] − lse)`.
fn scaled_softmax(row: &[f32], lse: f32, g: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512 (checked on the line above).
        return unsafe { scaled_softmax_avx512(row, lse, g, out) };
    }
    scaled_softmax_body(row, lse, g, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn scaled_softmax_avx512(row: &[f32], lse: f32, g: f32, out: &mut [f32]) {
    scaled_softmax_body(row, lse, g, out);
}

#[inline(always)]
fn scaled_softmax_body(row: &[f32], lse: f32, g: f32, out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(row) {
        *o = g * exp(v - lse);
    }
}

/// `e^x` to within 3 ulp over float32's normal range, branch-free so that loops over it
/// vectorise (Cephes' `expf`: `x = n ln 2 + r`, a degree-6 polynomial for `e^r`, `2^n` from
/// the exponent bits). Below `−87.3` the result is exactly 0 rather than a subnormal: a masked
/// attention score or a hopeless word then contributes an exact zero, and no subnormal reaches
/// the matrix products downstream, where each one costs a microcode assist (a subnormal floor
/// of 1.2e−38 instead made a LoRA step seven times slower). Above `88.3` it saturates at 2.1e38.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n · LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let underflow = x < -87.3;
    let x = x.clamp(-87.3, 88.3);
    // Rounded to the nearest integer by adding and removing 1.5 · 2^23 (which leaves no
    // fraction bits), branch-free and with no call to libm's `floorf` outside SSE4.1.
    const ROUND: f32 = 12_582_912.0;
    let n = (x * LOG2_E + ROUND) - ROUND;
    // Plain products and sums rather than `mul_add`: without the FMA target feature (every
    // caller's fallback path) `mul_add` is a call to libm's correctly rounded `fmaf`. `n · LN2_HI`
    // is exact, so the reduction loses nothing.
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let y = p * r * r + r + 1.0;
    let e = y * f32::from_bits(((n as i32 + 127) as u32) << 23);
    if underflow { 0.0 } else { e }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exponential_is_within_three_ulp_of_libm() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.3 {
            let (got, want) = (f64::from(exp(x)), f64::from(x).exp());
            worst = worst.max((got - want).abs() / want);
            x += 0.0137;
        }
        assert!(worst < 3.6e-7, "relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-87.4), 0.0);
        assert_eq!(exp(-1000.0), 0.0);
        assert!(exp(1000.0).is_finite() && exp(1000.0) > 2e38);
    }

    /// The f64 loss and gradient of one row.
    fn reference(row: &[f32], target: usize, g: f64) -> (f64, Vec<f64>) {
        let max = row
            .iter()
            .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
        let sum: f64 = row.iter().map(|&v| (f64::from(v) - max).exp()).sum();
        let lse = max + sum.ln();
        let grad = row
            .iter()
            .enumerate()
            .map(|(v, &x)| g * ((f64::from(x) - lse).exp() - f64::from(u8::from(v == target))))
            .collect();
        (lse - f64::from(row[target]), grad)
    }

    #[test]
    fn loss_and_gradient_match_the_f64_formula_serial_and_parallel() {
        let mut state = 7u64;
        let mut next = || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 40) as f32 / (1u64 << 24) as f32
        };
        // 3 × 37: serial, a vocabulary off the 16 lanes; 9 × 20011: rows split across threads.
        for &(rows, vocab) in &[(3usize, 37usize), (9, 20_011)] {
            let logits: Vec<f32> = (0..rows * vocab).map(|_| 20.0 * next() - 10.0).collect();
            let targets: Vec<usize> = (0..rows).map(|r| (r * 7919) % vocab).collect();
            let upstream: Vec<f32> = (0..rows).map(|r| 0.5 + r as f32).collect();
            let nll = token_nll(&logits, vocab, &targets);
            let grad = token_nll_grad(&logits, vocab, &targets, &upstream);
            for r in 0..rows {
                let row = &logits[r * vocab..(r + 1) * vocab];
                let (want, want_grad) = reference(row, targets[r], f64::from(upstream[r]));
                assert!((f64::from(nll[r]) - want).abs() < 1e-5 * want.abs().max(1.0));
                for (v, w) in want_grad.iter().enumerate() {
                    let got = f64::from(grad[r * vocab + v]);
                    assert!((got - w).abs() < 1e-6 * (1.0 + w.abs()), "row {r} word {v}");
                }
            }
        }
    }

    #[test]
    fn infinities_propagate_like_the_unfused_formula() {
        let nll = token_nll(&[f32::NEG_INFINITY, 0.0, f32::NAN, 1.0], 2, &[1, 1]);
        assert_eq!(nll[0], 0.0);
        assert!(nll[1].is_nan());
    }
}
