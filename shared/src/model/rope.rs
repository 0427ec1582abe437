//! Rotary position embeddings in the Hugging Face "rotate-half" layout.
//!
//! A head vector `x = [x1 | x2]` (two halves) at position `p` becomes
//! `x * cos(p θ) + [-x2 | x1] * sin(p θ)` with `θ_i = base^(-2i / head_dim)`, the two halves sharing
//! frequencies. (burn's `RotaryEncoding` rotates adjacent pairs instead, the layout llama.cpp's
//! converter produces; the GGUF loader undoes that permutation so one code path serves both.)

use burn::tensor::{Device, Tensor, TensorData};

/// Cosine and sine tables for a run of positions, ready to broadcast over `[batch, heads, seq,
/// head_dim]`.
#[derive(Debug, Clone)]
pub struct RopeTables {
    cos: Tensor<4>,
    sin: Tensor<4>,
}

impl RopeTables {
    /// Tables for positions `start..start + len`.
    pub fn new(head_dim: usize, theta: f64, start: usize, len: usize, device: &Device) -> Self {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(len * head_dim);
        let mut sin = Vec::with_capacity(len * head_dim);
        for p in start..start + len {
            // Angles in f64, then rounded: long contexts keep their precision, and the values
            // match transformers' float32 tables to the last bit or two.
            let row: Vec<f64> = (0..half)
                .map(|i| p as f64 * (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)))
                .collect();
            for _ in 0..2 {
                cos.extend(row.iter().map(|a| a.cos() as f32));
                sin.extend(row.iter().map(|a| a.sin() as f32));
            }
        }
        let shape = [1, 1, len, head_dim];
        Self {
            cos: Tensor::from_data(TensorData::new(cos, shape), device),
            sin: Tensor::from_data(TensorData::new(sin, shape), device),
        }
    }

    /// Rotates `x`.
    ///
    /// # Shapes
    /// - x: `[batch, heads, seq, head_dim]` with `seq` the tables' length
    /// - output: same as `x`
    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let [_, _, _, head_dim] = x.dims();
        let half = head_dim / 2;
        let x1 = x.clone().narrow(3, 0, half);
        let x2 = x.clone().narrow(3, half, half);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * self.cos.clone() + rotated * self.sin.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_zero_is_identity_and_norm_is_kept() {
        let device = Device::flex();
        let x = Tensor::<4>::from_data(
            TensorData::new(
                vec![1.0f32, 2.0, 3.0, 4.0, -1.0, 0.5, 2.0, 1.0],
                [1, 1, 2, 4],
            ),
            &device,
        );
        let y = RopeTables::new(4, 10_000.0, 0, 2, &device).apply(x.clone());
        let (xv, yv): (Vec<f32>, Vec<f32>) = (
            x.into_data().try_into_vec_as().unwrap(),
            y.into_data().try_into_vec_as().unwrap(),
        );
        assert_eq!(&xv[..4], &yv[..4], "position 0 is not rotated");
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!(
            (norm(&xv[4..]) - norm(&yv[4..])).abs() < 1e-5,
            "rotation keeps the norm"
        );
        // Position 1, pair (x[0], x[2]) rotates by angle 1 rad: x0' = x0 cos1 - x2 sin1.
        let expected = -1f32.cos() - 2.0 * 1f32.sin();
        assert!((yv[4] - expected).abs() < 1e-6);
    }
}
