//! Fixed-point quantization of f32 updates into integers modulo 2^32, the group secure
//! aggregation sums in.
//!
//! Every value is first clipped to the documented range `[-clip, clip]`, then mapped linearly
//! onto `0..=levels` and rounded to the nearest integer. `levels` is `⌊(2^32 - 1) / max_clients⌋`,
//! so the plain sum of up to `max_clients` quantized vectors never wraps around: the masked sum
//! modulo 2^32 equals the true integer sum and dequantizes exactly. The error of one value is at
//! most half a step, `clip / levels`; of a sum of `n` clients at most `n · clip / levels`.

use serde::{Deserialize, Serialize};

/// Why a quantizer cannot be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum QuantizeError {
    /// The clipping range is zero, negative or not finite.
    #[error("clipping range {0} must be positive and finite")]
    InvalidClip(f32),
    /// No clients, or so many that a client gets fewer than two levels.
    #[error("{0} clients cannot share 2^32 levels")]
    InvalidClients(usize),
}

/// Clipping range and level count of a secure sum.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Quantizer {
    clip: f32,
    levels: u32,
    max_clients: usize,
}

impl Quantizer {
    /// A quantizer for sums of at most `max_clients` vectors whose values are clipped to
    /// `[-clip, clip]`.
    ///
    /// # Errors
    ///
    /// [`QuantizeError`] for a non-positive clip or a client count outside `1..=2^31`.
    pub fn for_sum(clip: f32, max_clients: usize) -> Result<Self, QuantizeError> {
        if !(clip.is_finite() && clip > 0.0) {
            return Err(QuantizeError::InvalidClip(clip));
        }
        if max_clients == 0 || max_clients > (1 << 31) {
            return Err(QuantizeError::InvalidClients(max_clients));
        }
        let levels = (u64::from(u32::MAX) / max_clients as u64) as u32;
        Ok(Self {
            clip,
            levels,
            max_clients,
        })
    }

    /// The clipping range `clip` of `[-clip, clip]`.
    pub fn clip(&self) -> f32 {
        self.clip
    }

    /// The largest quantized value.
    pub fn levels(&self) -> u32 {
        self.levels
    }

    /// The most clients whose sum fits.
    pub fn max_clients(&self) -> usize {
        self.max_clients
    }

    /// The largest error of one dequantized value inside the range: half a step.
    pub fn max_error(&self) -> f64 {
        f64::from(self.clip) / f64::from(self.levels)
    }

    /// `x` clipped to the range and quantized, value by value. NaN quantizes to the middle (0).
    pub fn quantize(&self, x: &[f32]) -> Vec<u32> {
        let c = f64::from(self.clip);
        let scale = f64::from(self.levels) / (2.0 * c);
        x.iter()
            .map(|&v| {
                let v = if v.is_nan() {
                    0.0
                } else {
                    f64::from(v).clamp(-c, c)
                };
                ((v + c) * scale).round().min(f64::from(self.levels)) as u32
            })
            .collect()
    }

    /// The real-valued sum of `clients` vectors from their quantized sum (modulo 2^32).
    pub fn dequantize_sum(&self, sum: &[u32], clients: usize) -> Vec<f32> {
        let c = f64::from(self.clip);
        let step = 2.0 * c / f64::from(self.levels);
        let offset = clients as f64 * c;
        sum.iter()
            .map(|&q| (f64::from(q) * step - offset) as f32)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_of_quantized_values_dequantizes_within_the_bound() {
        let q = Quantizer::for_sum(2.0, 10).expect("quantizer");
        let inputs: Vec<Vec<f32>> = (0..10)
            .map(|c| {
                (0..50)
                    .map(|i| ((c * 50 + i) as f32 * 0.37).sin() * 1.9)
                    .collect()
            })
            .collect();
        let mut sum = vec![0u32; 50];
        for x in &inputs {
            for (s, v) in sum.iter_mut().zip(q.quantize(x)) {
                *s = s.wrapping_add(v);
            }
        }
        let back = q.dequantize_sum(&sum, 10);
        for (i, b) in back.iter().enumerate() {
            let exact: f64 = inputs.iter().map(|x| f64::from(x[i])).sum();
            assert!((f64::from(*b) - exact).abs() <= 10.0 * q.max_error() + 1e-5);
        }
    }

    #[test]
    fn values_are_clipped_to_the_range() {
        let q = Quantizer::for_sum(1.0, 4).expect("quantizer");
        let x = q.quantize(&[-5.0, 5.0, f32::NAN, 0.0]);
        assert_eq!(x[0], 0);
        assert_eq!(x[1], q.levels());
        assert_eq!(x[2], x[3]);
        let back = q.dequantize_sum(&x[..2], 1);
        assert_eq!(back, vec![-1.0, 1.0]);
        assert!(Quantizer::for_sum(0.0, 4).is_err());
        assert!(Quantizer::for_sum(1.0, 0).is_err());
    }
}
