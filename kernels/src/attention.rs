//! Grouped-query attention's core, `softmax(scale · Q Kᵀ + bias) V`, and its gradients, one
//! query head per parallel task.
//!
//! Why by hand: composed from tensor operations, a layer's attention was about thirty small
//! operations forward and backward (batched products, scaling, masking, the softmax and its
//! backward), each on one core and each allocating its result. Here a query head's scores,
//! probabilities and products stay in one task, and the heads run on every core.

use crate::cross_entropy::exp;
use crate::pool::{Pieces, run_parts};
use crate::sgemm::{Matrix, Output, multiply_serial};

/// The shapes of one call.
///
/// - queries: `[batch, kv_heads, group · seq, head_dim]` (query head `h·group + g` of key/value
///   head `h` is rows `g·seq .. (g+1)·seq`)
/// - keys, values: `[batch, kv_heads, total, head_dim]`
/// - bias: `[bias_batch, seq, total]`, added to the scaled scores (`bias_batch` is 1 or `batch`)
/// - probabilities: `[batch, kv_heads, group · seq, total]`
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    /// Sequences.
    pub batch: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Query heads per key/value head.
    pub group: usize,
    /// Query positions.
    pub seq: usize,
    /// Key positions (cached ones included).
    pub total: usize,
    /// Width of a head.
    pub head_dim: usize,
    /// Rows of the bias: 1 (shared) or `batch`.
    pub bias_batch: usize,
}

impl Dims {
    fn heads(&self) -> usize {
        self.batch * self.kv_heads * self.group
    }

    /// Offset of key/value head `(b, h)` of query head task `unit`.
    fn kv_offset(&self, unit: usize) -> usize {
        (unit / self.group) * self.total * self.head_dim
    }

    fn bias_offset(&self, unit: usize) -> usize {
        let b = unit / (self.kv_heads * self.group);
        let b = if self.bias_batch == 1 { 0 } else { b };
        b * self.seq * self.total
    }

    fn check(&self, q: &[f32], k: &[f32], v: &[f32], bias: &[f32]) {
        assert!(
            self.bias_batch == 1 || self.bias_batch == self.batch,
            "bias rows"
        );
        assert_eq!(q.len(), self.heads() * self.seq * self.head_dim, "queries");
        let kv = self.batch * self.kv_heads * self.total * self.head_dim;
        assert!(k.len() == kv && v.len() == kv, "keys and values");
        assert_eq!(bias.len(), self.bias_batch * self.seq * self.total, "bias");
    }
}

/// The attention output `[batch, kv_heads, group · seq, head_dim]` and the probabilities the
/// backward pass needs.
///
/// # Panics
/// When a slice does not match `dims`, or the CPU cannot run [`crate::sgemm`].
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bias: &[f32],
    dims: Dims,
    scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    dims.check(q, k, v, bias);
    assert!(
        crate::sgemm::available(),
        "attention runs on the AVX-512 matrix kernel"
    );
    let Dims {
        seq,
        total,
        head_dim,
        ..
    } = dims;
    let mut out = vec![0.0f32; dims.heads() * seq * head_dim];
    let mut probs = vec![0.0f32; dims.heads() * seq * total];
    let out_pieces = Pieces::new(&mut out, seq * head_dim);
    let prob_pieces = Pieces::new(&mut probs, seq * total);
    run_parts(dims.heads(), &|unit| {
        // SAFETY: each part takes its own head's pieces; the buffers outlive `run_parts`; the
        // shapes were checked and the CPU has AVX-512 (asserted above).
        unsafe {
            let (out, probs) = (out_pieces.get(unit), prob_pieces.get(unit));
            forward_head(q, k, v, bias, dims, scale, unit, out, probs);
        }
    });
    (out, probs)
}

/// The gradients `(dQ, dK, dV)` of `Σ d_out · attention(q, k, v)`, from the probabilities
/// [`attention`] returned.
///
/// # Panics
/// As [`attention`], and when `probs` or `d_out` do not match `dims`.
pub fn attention_grad(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    d_out: &[f32],
    dims: Dims,
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Dims {
        seq,
        total,
        head_dim,
        group,
        ..
    } = dims;
    assert_eq!(probs.len(), dims.heads() * seq * total, "probabilities");
    assert_eq!(d_out.len(), q.len(), "output gradient");
    assert!(
        crate::sgemm::available(),
        "attention runs on the AVX-512 matrix kernel"
    );
    let slots: Vec<std::sync::Mutex<Option<(Vec<f32>, Vec<f32>, Vec<f32>)>>> = (0..dims.heads())
        .map(|_| std::sync::Mutex::new(None))
        .collect();
    run_parts(dims.heads(), &|unit| {
        // SAFETY: the shapes were asserted above; the CPU has AVX-512 (asserted above).
        let part = unsafe { backward_head(q, k, v, probs, d_out, dims, scale, unit) };
        *slots[unit].lock().expect("a slot is never poisoned") = Some(part);
    });
    let parts = slots.into_iter().map(|slot| {
        slot.into_inner()
            .expect("a slot is never poisoned")
            .expect("every head ran")
    });

    let mut d_q = Vec::with_capacity(q.len());
    let mut d_k = vec![0.0f32; k.len()];
    let mut d_v = vec![0.0f32; v.len()];
    for (unit, (dq, dk, dv)) in parts.enumerate() {
        d_q.extend_from_slice(&dq);
        // The group's query heads share a key/value head: their gradients add up there.
        let at = (unit / group) * total * head_dim;
        for (acc, x) in d_k[at..at + total * head_dim].iter_mut().zip(&dk) {
            *acc += x;
        }
        for (acc, x) in d_v[at..at + total * head_dim].iter_mut().zip(&dv) {
            *acc += x;
        }
    }
    (d_q, d_k, d_v)
}

/// Query head `unit`'s output and probabilities.
///
/// # Safety
/// The CPU has AVX-512; the slices match `dims`.
#[allow(clippy::too_many_arguments)]
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f"))]
unsafe fn forward_head(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bias: &[f32],
    dims: Dims,
    scale: f32,
    unit: usize,
    out: &mut [f32],
    probs: &mut [f32],
) {
    let Dims {
        seq,
        total,
        head_dim,
        ..
    } = dims;
    let qh = &q[unit * seq * head_dim..][..seq * head_dim];
    let kh = &k[dims.kv_offset(unit)..][..total * head_dim];
    let vh = &v[dims.kv_offset(unit)..][..total * head_dim];
    let bias = &bias[dims.bias_offset(unit)..][..seq * total];
    let scores = multiply_serial(
        Matrix::row_major(qh, seq, head_dim),
        Matrix::column_major(kh, head_dim, total),
        Output::RowMajor,
    );
    for ((p, s), b) in probs
        .chunks_exact_mut(total)
        .zip(scores.chunks_exact(total))
        .zip(bias.chunks_exact(total))
    {
        softmax_row(s, b, scale, p);
    }
    let o = multiply_serial(
        Matrix::row_major(probs, seq, total),
        Matrix::row_major(vh, total, head_dim),
        Output::RowMajor,
    );
    out.copy_from_slice(&o);
}

/// Query head `unit`'s `(dQ, dK part, dV part)`.
///
/// # Safety
/// The CPU has AVX-512; the slices match `dims`.
#[allow(clippy::too_many_arguments)]
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f"))]
unsafe fn backward_head(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    d_out: &[f32],
    dims: Dims,
    scale: f32,
    unit: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Dims {
        seq,
        total,
        head_dim,
        ..
    } = dims;
    let qh = &q[unit * seq * head_dim..][..seq * head_dim];
    let kh = &k[dims.kv_offset(unit)..][..total * head_dim];
    let vh = &v[dims.kv_offset(unit)..][..total * head_dim];
    let p = &probs[unit * seq * total..][..seq * total];
    let d_o = &d_out[unit * seq * head_dim..][..seq * head_dim];
    // dP = dO Vᵀ, then the softmax's backward: dS = P ⊙ (dP − Σ_t P dP), times scale.
    let mut d_s = multiply_serial(
        Matrix::row_major(d_o, seq, head_dim),
        Matrix::column_major(vh, head_dim, total),
        Output::RowMajor,
    );
    for (ds, p) in d_s.chunks_exact_mut(total).zip(p.chunks_exact(total)) {
        let dot: f32 = ds.iter().zip(p).map(|(d, p)| d * p).sum();
        for (d, &p) in ds.iter_mut().zip(p) {
            *d = scale * p * (*d - dot);
        }
    }
    let d_q = multiply_serial(
        Matrix::row_major(&d_s, seq, total),
        Matrix::row_major(kh, total, head_dim),
        Output::RowMajor,
    );
    let d_k = multiply_serial(
        Matrix::row_major(&transpose(&d_s, seq, total), total, seq),
        Matrix::row_major(qh, seq, head_dim),
        Output::RowMajor,
    );
    let d_v = multiply_serial(
        Matrix::row_major(&transpose(p, seq, total), total, seq),
        Matrix::row_major(d_o, seq, head_dim),
        Output::RowMajor,
    );
    (d_q, d_k, d_v)
}

/// `m` (`rows × cols`, row-major) transposed.
#[inline(always)]
fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; rows * cols];
    for (i, row) in m.chunks_exact(cols).enumerate() {
        for (j, &x) in row.iter().enumerate() {
            out[j * rows + i] = x;
        }
    }
    out
}

/// `p = softmax(scale · s + bias)`.
#[inline(always)]
fn softmax_row(s: &[f32], bias: &[f32], scale: f32, p: &mut [f32]) {
    let mut max = f32::NEG_INFINITY;
    for ((p, &s), &b) in p.iter_mut().zip(s).zip(bias) {
        *p = scale * s + b;
        max = max.max(*p);
    }
    let mut sum = 0.0f32;
    for p in p.iter_mut() {
        *p = exp(*p - max);
        sum += *p;
    }
    let inv = 1.0 / sum;
    for p in p.iter_mut() {
        *p *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values::values;

    /// `Σ w · attention(q, k, v)` in f64, straight from the definition.
    fn objective(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        bias: &[f32],
        w: &[f32],
        d: Dims,
        scale: f64,
    ) -> f64 {
        let mut total_sum = 0.0;
        for unit in 0..d.heads() {
            for i in 0..d.seq {
                let row: Vec<f64> = (0..d.total)
                    .map(|t| {
                        let dot: f64 = (0..d.head_dim)
                            .map(|c| {
                                f64::from(q[(unit * d.seq + i) * d.head_dim + c])
                                    * f64::from(k[d.kv_offset(unit) + t * d.head_dim + c])
                            })
                            .sum();
                        scale * dot + f64::from(bias[d.bias_offset(unit) + i * d.total + t])
                    })
                    .collect();
                let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = row.iter().map(|x| (x - max).exp()).sum();
                for c in 0..d.head_dim {
                    let o: f64 = (0..d.total)
                        .map(|t| {
                            (row[t] - max).exp() / z
                                * f64::from(v[d.kv_offset(unit) + t * d.head_dim + c])
                        })
                        .sum();
                    total_sum += o * f64::from(w[(unit * d.seq + i) * d.head_dim + c]);
                }
            }
        }
        total_sum
    }

    #[test]
    fn output_and_gradients_match_f64_finite_differences() {
        if !crate::sgemm::available() {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        // Two sequences, two key/value heads of three query heads each, a causal mask with the
        // second sequence padded, and shapes off every tile of the matrix kernel.
        let d = Dims {
            batch: 2,
            kv_heads: 2,
            group: 3,
            seq: 5,
            total: 5,
            head_dim: 7,
            bias_batch: 2,
        };
        let scale = 0.4f32;
        let q = values(d.heads() * d.seq * d.head_dim, 1);
        let k = values(d.batch * d.kv_heads * d.total * d.head_dim, 2);
        let v = values(k.len(), 3);
        let w = values(q.len(), 4);
        let mut bias = vec![0.0f32; 2 * d.seq * d.total];
        for b in 0..2 {
            for i in 0..d.seq {
                for t in 0..d.total {
                    if t > i || (b == 1 && t >= 3) {
                        bias[(b * d.seq + i) * d.total + t] = -1e9;
                    }
                }
            }
        }
        let (out, probs) = attention(&q, &k, &v, &bias, d, scale);
        let got: f64 = out
            .iter()
            .zip(&w)
            .map(|(o, w)| f64::from(*o) * f64::from(*w))
            .sum();
        let want = objective(&q, &k, &v, &bias, &w, d, f64::from(scale));
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");

        let (dq, dk, dv) = attention_grad(&q, &k, &v, &probs, &w, d, scale);
        let h = 1e-3f32;
        let numeric = |which: usize, i: usize| {
            let mut inputs = [q.clone(), k.clone(), v.clone()];
            inputs[which][i] += h;
            let up = objective(
                &inputs[0],
                &inputs[1],
                &inputs[2],
                &bias,
                &w,
                d,
                f64::from(scale),
            );
            inputs[which][i] -= 2.0 * h;
            let down = objective(
                &inputs[0],
                &inputs[1],
                &inputs[2],
                &bias,
                &w,
                d,
                f64::from(scale),
            );
            (up - down) / (2.0 * f64::from(h))
        };
        for (which, grad) in [&dq, &dk, &dv].into_iter().enumerate() {
            for (i, &g) in grad.iter().enumerate() {
                let n = numeric(which, i);
                assert!(
                    (f64::from(g) - n).abs() < 2e-3 * (1.0 + n.abs()),
                    "input {which}[{i}]: {g} vs {n}"
                );
            }
        }
    }
}
