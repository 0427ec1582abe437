//! Sequences of token ids packed into one right-padded batch, and the additive attention mask
//! that keeps queries away from future positions and from padding.

use burn::tensor::{Device, Int, Tensor, TensorData};

/// Score given to forbidden query-key pairs. Finite, unlike `-inf`, so a row with every key
/// masked softmaxes to a uniform distribution instead of NaN.
const MASKED: f32 = -1.0e9;

/// Right-padded token ids with each row's true length.
#[derive(Debug, Clone)]
pub struct TokenBatch {
    /// `[batch, seq]` token ids, padding after each row's last token.
    pub ids: Tensor<2, Int>,
    /// Tokens in each row before padding.
    pub lengths: Vec<usize>,
}

impl TokenBatch {
    /// Packs `rows`, padding each to the longest with `pad_id`.
    ///
    /// # Panics
    /// When `rows` is empty or every row is empty.
    pub fn right_padded(rows: &[Vec<u32>], pad_id: u32, device: &Device) -> Self {
        let seq = rows.iter().map(Vec::len).max().unwrap_or(0);
        assert!(seq > 0, "a batch needs at least one token");
        let mut ids = Vec::with_capacity(rows.len() * seq);
        for row in rows {
            ids.extend(row.iter().map(|&t| t as i64));
            ids.extend(std::iter::repeat_n(pad_id as i64, seq - row.len()));
        }
        Self {
            ids: Tensor::from_data(TensorData::new(ids, [rows.len(), seq]), device),
            lengths: rows.iter().map(Vec::len).collect(),
        }
    }

    /// `[batch, seq]`.
    pub fn dims(&self) -> [usize; 2] {
        self.ids.dims()
    }

    /// Whether any row is padded.
    pub fn is_padded(&self) -> bool {
        let [_, seq] = self.dims();
        self.lengths.iter().any(|&l| l < seq)
    }
}

/// The additive attention bias for `seq` new queries after `past` cached positions.
///
/// Query `i` (absolute position `past + i`) may see key `j` when `j <= past + i` and, for row
/// `b`, `j < lengths[b]`. Without `lengths` every key is real and one mask serves the batch.
///
/// # Shapes
/// - output: `[lengths.len() or 1, 1, seq, past + seq]`
pub fn attention_bias(
    seq: usize,
    past: usize,
    lengths: Option<&[usize]>,
    device: &Device,
) -> Tensor<4> {
    let total = past + seq;
    let rows: Vec<usize> = match lengths {
        Some(lengths) => lengths.to_vec(),
        None => vec![total],
    };
    let mut bias = Vec::with_capacity(rows.len() * seq * total);
    for &len in &rows {
        for i in 0..seq {
            bias.extend((0..total).map(|j| {
                if j <= past + i && j < len {
                    0.0
                } else {
                    MASKED
                }
            }));
        }
    }
    Tensor::from_data(TensorData::new(bias, [rows.len(), 1, seq, total]), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_and_padding_mask() {
        let device = Device::flex();
        let bias: Vec<f32> = attention_bias(3, 0, Some(&[2]), &device)
            .into_data()
            .try_into_vec_as()
            .unwrap();
        let allowed: Vec<bool> = bias.iter().map(|&b| b == 0.0).collect();
        #[rustfmt::skip]
        assert_eq!(allowed, vec![
            true, false, false,
            true, true, false,
            true, true, false, // the padded key 2 stays hidden even from the padded query
        ]);
        let with_past: Vec<f32> = attention_bias(1, 4, None, &device)
            .into_data()
            .try_into_vec_as()
            .unwrap();
        assert!(
            with_past.iter().all(|&b| b == 0.0),
            "one new token sees every cached one"
        );
    }

    #[test]
    fn pads_rows_to_the_longest() {
        let device = Device::flex();
        let batch = TokenBatch::right_padded(&[vec![5, 6, 7], vec![8]], 0, &device);
        assert_eq!(batch.dims(), [2, 3]);
        assert_eq!(batch.lengths, vec![3, 1]);
        let ids: Vec<i64> = batch.ids.into_data().try_into_vec_as().unwrap();
        assert_eq!(ids, vec![5, 6, 7, 8, 0, 0]);
    }
}
