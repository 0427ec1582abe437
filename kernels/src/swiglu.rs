//! The SwiGLU activation `silu(g) · u` and its gradient, element-wise over chunks in parallel.
//!
//! Why by hand: as tensor operations, the activation and its backward are about ten passes over
//! the `[tokens, intermediate]` matrices per layer, each on one core with a libm `exp` per
//! element; here each direction is one pass, on every core, with a vectorised exponential.

use crate::cross_entropy::exp;
use crate::pool::{Pieces, run_parts};

/// Elements per parallel task: big enough to amortise scheduling, small enough to share out a
/// 128 × 1536 activation.
const CHUNK: usize = 1 << 14;

/// `out[i] = silu(gate[i]) · up[i]`, `silu(x) = x · σ(x)`.
///
/// # Panics
/// When the slices differ in length.
pub fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    assert_eq!(gate.len(), up.len(), "gate and up differ in length");
    let mut out = vec![0.0f32; gate.len()];
    let pieces = Pieces::new(&mut out, CHUNK);
    run_parts(pieces.count(), &|i| {
        // SAFETY: each part takes its own piece; `out` outlives `run_parts`.
        let out = unsafe { pieces.get(i) };
        let at = i * CHUNK;
        forward_chunk(&gate[at..at + out.len()], &up[at..at + out.len()], out);
    });
    out
}

/// The gradients of `Σ grad · silu(gate) · up`:
/// `d_gate = grad · up · σ(g) · (1 + g · (1 − σ(g)))` and `d_up = grad · silu(g)`.
///
/// # Panics
/// When the slices differ in length.
pub fn swiglu_grad(gate: &[f32], up: &[f32], grad: &[f32]) -> (Vec<f32>, Vec<f32>) {
    assert!(
        gate.len() == up.len() && up.len() == grad.len(),
        "gate, up and grad differ in length"
    );
    let mut d_gate = vec![0.0f32; gate.len()];
    let mut d_up = vec![0.0f32; gate.len()];
    let gate_pieces = Pieces::new(&mut d_gate, CHUNK);
    let up_pieces = Pieces::new(&mut d_up, CHUNK);
    run_parts(gate_pieces.count(), &|i| {
        // SAFETY: each part takes its own pieces; the buffers outlive `run_parts`.
        let (d_gate, d_up) = unsafe { (gate_pieces.get(i), up_pieces.get(i)) };
        let range = i * CHUNK..i * CHUNK + d_gate.len();
        backward_chunk(
            &gate[range.clone()],
            &up[range.clone()],
            &grad[range],
            d_gate,
            d_up,
        );
    });
    (d_gate, d_up)
}

fn forward_chunk(gate: &[f32], up: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512 (checked on the line above).
        return unsafe { forward_avx512(gate, up, out) };
    }
    forward_body(gate, up, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn forward_avx512(gate: &[f32], up: &[f32], out: &mut [f32]) {
    forward_body(gate, up, out);
}

#[inline(always)]
fn forward_body(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g * sigmoid(g) * u;
    }
}

fn backward_chunk(gate: &[f32], up: &[f32], grad: &[f32], d_gate: &mut [f32], d_up: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512 (checked on the line above).
        return unsafe { backward_avx512(gate, up, grad, d_gate, d_up) };
    }
    backward_body(gate, up, grad, d_gate, d_up);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn backward_avx512(gate: &[f32], up: &[f32], grad: &[f32], d_gate: &mut [f32], d_up: &mut [f32]) {
    backward_body(gate, up, grad, d_gate, d_up);
}

#[inline(always)]
fn backward_body(gate: &[f32], up: &[f32], grad: &[f32], d_gate: &mut [f32], d_up: &mut [f32]) {
    let n = gate.len();
    let (up, grad, d_gate, d_up) = (&up[..n], &grad[..n], &mut d_gate[..n], &mut d_up[..n]);
    for i in 0..n {
        let (g, u, dy) = (gate[i], up[i], grad[i]);
        let s = sigmoid(g);
        d_up[i] = dy * g * s;
        d_gate[i] = dy * u * s * (1.0 + g * (1.0 - s));
    }
}

/// `1 / (1 + e^−x)`; saturates to 0 and 1 without overflow (the exponential is clamped).
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_and_gradients_match_f64_formulas() {
        // Past one chunk, so the parallel split is covered; values across the sigmoid's range.
        let n = CHUNK + 37;
        let gate: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 12.0).collect();
        let up: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos() * 3.0).collect();
        let grad: Vec<f32> = (0..n).map(|i| 0.5 + (i % 7) as f32 * 0.25).collect();
        let out = swiglu(&gate, &up);
        let (d_gate, d_up) = swiglu_grad(&gate, &up, &grad);
        for i in 0..n {
            let (g, u, dy) = (f64::from(gate[i]), f64::from(up[i]), f64::from(grad[i]));
            let s = 1.0 / (1.0 + (-g).exp());
            let close =
                |got: f32, want: f64| (f64::from(got) - want).abs() <= 1e-5 * (1.0 + want.abs());
            assert!(close(out[i], g * s * u), "value {i}");
            assert!(close(d_up[i], dy * g * s), "d_up {i}");
            assert!(
                close(d_gate[i], dy * u * s * (1.0 + g * (1.0 - s))),
                "d_gate {i}"
            );
        }
        let extreme = swiglu(&[-200.0, 200.0], &[1.0, 1.0]);
        assert!(
            extreme[0].abs() < 1e-30 && extreme[1] == 200.0,
            "{extreme:?}"
        );
    }
}
