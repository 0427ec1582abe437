//! The record of what pruning kept, per layer, and the maps between a pruned tensor and the full
//! model's coordinates.
//!
//! A pruned model is the full model with some rows and columns removed; [`KeptUnits`] lists the
//! survivors in the full model's numbering, so that anything computed on the pruned model (an
//! adapter, a gradient, a weight) can be put back where it belongs: [`scatter`] places a pruned
//! matrix into the full shape (zeros where units were removed), [`gather`] takes the kept part of
//! a full matrix. These work on plain row-major `f32` values, like the rest of what the server
//! handles (`lora::adapter`), not on tensors.

use serde::{Deserialize, Serialize};

use super::units::{LayerShape, complement, head_columns, query_heads};

/// Which units of one layer survived pruning, in the full (unpruned) model's numbering, each
/// list ascending.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptUnits {
    /// Decoder layer.
    pub layer: usize,
    /// Kept key/value heads; each keeps its whole group of query heads.
    pub kv_heads: Vec<usize>,
    /// Kept intermediate channels of the MLP.
    pub ffn_channels: Vec<usize>,
}

impl KeptUnits {
    /// Every unit of a layer shaped `shape`: nothing pruned.
    pub fn all(layer: usize, shape: &LayerShape) -> Self {
        Self {
            layer,
            kv_heads: (0..shape.num_kv_heads).collect(),
            ffn_channels: (0..shape.intermediate).collect(),
        }
    }

    /// Kept query heads (`group` per key/value head).
    pub fn query_heads(&self, group: usize) -> Vec<usize> {
        query_heads(&self.kv_heads, group)
    }

    /// Kept columns of `q_proj`'s stored weight, which are also the kept rows of `o_proj`'s.
    pub fn query_columns(&self, group: usize, head_dim: usize) -> Vec<usize> {
        head_columns(&self.query_heads(group), head_dim)
    }

    /// Kept columns of `k_proj`'s and `v_proj`'s stored weights.
    pub fn kv_columns(&self, head_dim: usize) -> Vec<usize> {
        head_columns(&self.kv_heads, head_dim)
    }

    /// Removed key/value heads of a layer that had `num_kv_heads`.
    pub fn pruned_kv_heads(&self, num_kv_heads: usize) -> Vec<usize> {
        complement(&self.kv_heads, num_kv_heads)
    }

    /// Removed intermediate channels of a layer that had `intermediate`.
    pub fn pruned_ffn_channels(&self, intermediate: usize) -> Vec<usize> {
        complement(&self.ffn_channels, intermediate)
    }

    /// Checks the record against the layer it applies to: the right layer number, lists strictly
    /// ascending, in range, and at least one key/value head and one channel kept.
    pub fn check(&self, layer: usize, shape: &LayerShape) -> Result<(), String> {
        if self.layer != layer {
            return Err(format!(
                "record for layer {} is in place {layer}",
                self.layer
            ));
        }
        let valid = |kept: &[usize], len: usize, what: &str| -> Result<(), String> {
            if kept.is_empty() {
                return Err(format!("layer {layer}: no {what} kept"));
            }
            if !kept.windows(2).all(|w| w[0] < w[1]) {
                return Err(format!(
                    "layer {layer}: kept {what} are not strictly ascending"
                ));
            }
            match kept.last() {
                Some(&last) if last >= len => Err(format!(
                    "layer {layer}: kept {what} {last} is out of range (the layer has {len})"
                )),
                _ => Ok(()),
            }
        };
        valid(&self.kv_heads, shape.num_kv_heads, "key/value heads")?;
        valid(&self.ffn_channels, shape.intermediate, "ffn channels")
    }
}

/// An axis of a row-major matrix stored `[in, out]`: rows are inputs, columns outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Axis {
    /// Rows (the input axis of a stored projection; a bias vector is one column).
    Rows,
    /// Columns (the output axis of a stored projection).
    Columns,
}

/// The kept part of a row-major `[rows, cols]` matrix: the rows (or columns) listed in `kept`,
/// in that order.
///
/// # Panics
/// When `values.len() != rows * cols` or an index in `kept` is out of range.
pub fn gather(values: &[f32], [rows, cols]: [usize; 2], axis: Axis, kept: &[usize]) -> Vec<f32> {
    assert_eq!(values.len(), rows * cols, "values and shape disagree");
    match axis {
        Axis::Rows => kept
            .iter()
            .flat_map(|&r| &values[r * cols..(r + 1) * cols])
            .copied()
            .collect(),
        Axis::Columns => values
            .chunks_exact(cols.max(1))
            .flat_map(|row| kept.iter().map(|&c| row[c]))
            .collect(),
    }
}

/// A pruned row-major `[rows, cols]` matrix put back into the full shape: row (or column) `i`
/// of `values` goes to `kept[i]` of an axis `full` long; removed positions are zero.
///
/// # Panics
/// When `values.len() != rows * cols`, `kept` does not have one entry per row (column), or an
/// index in `kept` is not below `full`.
pub fn scatter(
    values: &[f32],
    [rows, cols]: [usize; 2],
    axis: Axis,
    kept: &[usize],
    full: usize,
) -> Vec<f32> {
    assert_eq!(values.len(), rows * cols, "values and shape disagree");
    match axis {
        Axis::Rows => {
            assert_eq!(kept.len(), rows, "one kept index per row");
            let mut out = vec![0.0; full * cols];
            for (row, &r) in values.chunks_exact(cols.max(1)).zip(kept) {
                out[r * cols..(r + 1) * cols].copy_from_slice(row);
            }
            out
        }
        Axis::Columns => {
            assert_eq!(kept.len(), cols, "one kept index per column");
            let mut out = vec![0.0; rows * full];
            for (i, row) in values.chunks_exact(cols.max(1)).enumerate() {
                for (&v, &c) in row.iter().zip(kept) {
                    out[i * full + c] = v;
                }
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_undoes_scatter_on_both_axes() {
        // [2, 3] pruned from [2, 5] (columns) and from [4, 3] (rows).
        let values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let full = scatter(&values, [2, 3], Axis::Columns, &[0, 2, 4], 5);
        assert_eq!(full, vec![1., 0., 2., 0., 3., 4., 0., 5., 0., 6.]);
        assert_eq!(gather(&full, [2, 5], Axis::Columns, &[0, 2, 4]), values);
        let full = scatter(&values, [2, 3], Axis::Rows, &[1, 3], 4);
        assert_eq!(full, vec![0., 0., 0., 1., 2., 3., 0., 0., 0., 4., 5., 6.]);
        assert_eq!(gather(&full, [4, 3], Axis::Rows, &[1, 3]), values);
    }

    #[test]
    fn columns_of_grouped_heads() {
        let kept = KeptUnits {
            layer: 0,
            kv_heads: vec![1],
            ffn_channels: vec![0],
        };
        // Group 2, head_dim 2: key/value head 1 owns query heads 2 and 3.
        assert_eq!(kept.query_heads(2), vec![2, 3]);
        assert_eq!(kept.query_columns(2, 2), vec![4, 5, 6, 7]);
        assert_eq!(kept.kv_columns(2), vec![2, 3]);
        assert_eq!(kept.pruned_kv_heads(3), vec![0, 2]);
    }
}
