//! GGML tensor element types and their dequantisation to `f32`.
//!
//! Block layouts follow ggml's `ggml-common.h` (`block_q4_0`, `block_q4_1`, `block_q8_0`, …): each
//! block of 32 weights stores one or two `f16` scales followed by packed integers. Quantisers
//! (`quantize_*`) follow ggml's reference `quantize_row_*_ref`, so files fedtune writes load in
//! llama.cpp and vice versa.

use half::{bf16, f16};

/// Weights per block in ggml's legacy quantisations.
pub const QK: usize = 32;

/// An element type of a GGUF tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// 4-bit, one scale per block: `x = (q - 8) * d`.
    Q4_0,
    /// 4-bit, scale and minimum per block: `x = q * d + m`.
    Q4_1,
    /// 5-bit, one scale per block: `x = (q - 16) * d`.
    Q5_0,
    /// 5-bit, scale and minimum per block: `x = q * d + m`.
    Q5_1,
    /// 8-bit, one scale per block: `x = q * d`.
    Q8_0,
}

/// Why dequantisation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DequantError {
    /// The element count is not a whole number of blocks.
    #[error("{ty:?} needs a multiple of {block} elements, got {elements}")]
    PartialBlock {
        /// The type.
        ty: GgmlType,
        /// Elements per block.
        block: usize,
        /// Elements asked for.
        elements: usize,
    },
    /// The byte buffer does not hold exactly the elements asked for.
    #[error("{ty:?} data for {elements} elements must be {expected} bytes, got {actual}")]
    WrongLength {
        /// The type.
        ty: GgmlType,
        /// Elements asked for.
        elements: usize,
        /// Bytes required.
        expected: usize,
        /// Bytes given.
        actual: usize,
    },
}

impl GgmlType {
    /// Maps ggml's numeric type id (`enum ggml_type`) to a supported type.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            30 => Self::BF16,
            _ => return None,
        })
    }

    /// ggml's numeric type id.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::BF16 => 30,
        }
    }

    /// Elements per block (1 for plain float types).
    pub fn block_elements(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            _ => QK,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 2 + QK / 2,
            Self::Q4_1 => 4 + QK / 2,
            Self::Q5_0 => 2 + 4 + QK / 2,
            Self::Q5_1 => 4 + 4 + QK / 2,
            Self::Q8_0 => 2 + QK,
        }
    }

    /// Bytes needed for `elements` values, or `None` when that is not a whole number of blocks
    /// or overflows.
    pub fn bytes_for(self, elements: usize) -> Option<usize> {
        if !elements.is_multiple_of(self.block_elements()) {
            return None;
        }
        (elements / self.block_elements()).checked_mul(self.block_bytes())
    }

    /// Dequantises `bytes` holding `out.len()` elements of this type into `out`.
    pub fn dequantize(self, bytes: &[u8], out: &mut [f32]) -> Result<(), DequantError> {
        let elements = out.len();
        if !elements.is_multiple_of(self.block_elements()) {
            return Err(DequantError::PartialBlock {
                ty: self,
                block: self.block_elements(),
                elements,
            });
        }
        let expected = (elements / self.block_elements()) * self.block_bytes();
        if bytes.len() != expected {
            return Err(DequantError::WrongLength {
                ty: self,
                elements,
                expected,
                actual: bytes.len(),
            });
        }
        let blocks = bytes.chunks_exact(self.block_bytes());
        let outs = out.chunks_exact_mut(self.block_elements());
        match self {
            Self::F32 => blocks.zip(outs).for_each(|(b, o)| {
                o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }),
            Self::F16 => blocks
                .zip(outs)
                .for_each(|(b, o)| o[0] = f16::from_le_bytes([b[0], b[1]]).to_f32()),
            Self::BF16 => blocks
                .zip(outs)
                .for_each(|(b, o)| o[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            Self::Q4_0 => blocks.zip(outs).for_each(|(b, o)| {
                let d = scale(b, 0);
                let qs = &b[2..];
                for j in 0..QK / 2 {
                    o[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
                    o[j + QK / 2] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
                }
            }),
            Self::Q4_1 => blocks.zip(outs).for_each(|(b, o)| {
                let (d, m) = (scale(b, 0), scale(b, 2));
                let qs = &b[4..];
                for j in 0..QK / 2 {
                    o[j] = (qs[j] & 0x0F) as f32 * d + m;
                    o[j + QK / 2] = (qs[j] >> 4) as f32 * d + m;
                }
            }),
            Self::Q5_0 => blocks.zip(outs).for_each(|(b, o)| {
                let d = scale(b, 0);
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                let qs = &b[6..];
                for j in 0..QK / 2 {
                    let lo = (qs[j] & 0x0F) | ((((qh >> j) << 4) & 0x10) as u8);
                    let hi = (qs[j] >> 4) | (((qh >> (j + 12)) & 0x10) as u8);
                    o[j] = (lo as i32 - 16) as f32 * d;
                    o[j + QK / 2] = (hi as i32 - 16) as f32 * d;
                }
            }),
            Self::Q5_1 => blocks.zip(outs).for_each(|(b, o)| {
                let (d, m) = (scale(b, 0), scale(b, 2));
                let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
                let qs = &b[8..];
                for j in 0..QK / 2 {
                    let lo = (qs[j] & 0x0F) | ((((qh >> j) << 4) & 0x10) as u8);
                    let hi = (qs[j] >> 4) | (((qh >> (j + 12)) & 0x10) as u8);
                    o[j] = lo as f32 * d + m;
                    o[j + QK / 2] = hi as f32 * d + m;
                }
            }),
            Self::Q8_0 => blocks.zip(outs).for_each(|(b, o)| {
                let d = scale(b, 0);
                for j in 0..QK {
                    o[j] = (b[2 + j] as i8) as f32 * d;
                }
            }),
        }
        Ok(())
    }

    /// Quantises `values` (a whole number of blocks) into this type's bytes, following ggml's
    /// reference quantisers. Supported for F32, F16, BF16, Q4_0, Q4_1 and Q8_0.
    ///
    /// Returns `None` for a type without a quantiser here or a partial block.
    pub fn quantize(self, values: &[f32]) -> Option<Vec<u8>> {
        if !values.len().is_multiple_of(self.block_elements()) {
            return None;
        }
        let mut out = Vec::with_capacity(self.bytes_for(values.len())?);
        match self {
            Self::F32 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            Self::F16 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
            Self::BF16 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
            Self::Q4_0 => values.chunks_exact(QK).for_each(|x| {
                // ggml: d = max / -8 where max is the value of largest magnitude, sign kept.
                let max = x
                    .iter()
                    .copied()
                    .fold(0.0f32, |m, v| if v.abs() > m.abs() { v } else { m });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                for j in 0..QK / 2 {
                    let q0 = ((x[j] * id + 8.5) as i32).min(15) as u8;
                    let q1 = ((x[j + QK / 2] * id + 8.5) as i32).min(15) as u8;
                    out.push(q0 | (q1 << 4));
                }
            }),
            Self::Q4_1 => values.chunks_exact(QK).for_each(|x| {
                let min = x.iter().copied().fold(f32::INFINITY, f32::min);
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
                for j in 0..QK / 2 {
                    let q0 = (((x[j] - min) * id + 0.5) as i32).min(15) as u8;
                    let q1 = (((x[j + QK / 2] - min) * id + 0.5) as i32).min(15) as u8;
                    out.push(q0 | (q1 << 4));
                }
            }),
            Self::Q8_0 => values.chunks_exact(QK).for_each(|x| {
                let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
            }),
            Self::Q5_0 | Self::Q5_1 => return None,
        }
        Some(out)
    }
}

fn scale(block: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([block[at], block[at + 1]]).to_f32()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip() {
        for ty in [
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::BF16,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
        ] {
            assert_eq!(GgmlType::from_id(ty.id()), Some(ty));
        }
        assert_eq!(GgmlType::from_id(12), None, "Q4_K is not supported");
    }

    #[test]
    fn wrong_lengths_are_errors() {
        let mut out = vec![0.0; 32];
        assert!(matches!(
            GgmlType::Q4_1.dequantize(&[0u8; 19], &mut out),
            Err(DequantError::WrongLength {
                expected: 20,
                actual: 19,
                ..
            })
        ));
        let mut out = vec![0.0; 31];
        assert!(matches!(
            GgmlType::Q8_0.dequantize(&[0u8; 34], &mut out),
            Err(DequantError::PartialBlock { .. })
        ));
    }

    #[test]
    fn quantisers_round_trip_within_one_step() {
        let values: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 64) as f32 - 31.5) / 10.0)
            .collect();
        for (ty, step) in [
            (GgmlType::Q8_0, 3.2 / 127.0),
            (GgmlType::Q4_0, 3.2 / 8.0),
            (GgmlType::Q4_1, 6.4 / 15.0),
            (GgmlType::F16, 1e-3),
            (GgmlType::BF16, 2e-2),
        ] {
            let bytes = ty.quantize(&values).unwrap();
            let mut back = vec![0.0; values.len()];
            ty.dequantize(&bytes, &mut back).unwrap();
            for (a, b) in values.iter().zip(&back) {
                assert!((a - b).abs() <= step, "{ty:?}: {a} vs {b}");
            }
        }
    }
}
