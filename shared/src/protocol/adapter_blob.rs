//! A LoRA adapter as a blob: a small bincode header naming every factor's shape, then the
//! factors as raw little-endian f32, A then B per layer in the header's order. Tensors never go
//! through bincode: raw bytes are what a device can write straight from its buffers, and the
//! decoder checks every declared shape against the bytes present and a hard limit before it
//! allocates.
//!
//! ```text
//! "FTAD" | header length u32 LE | header (bincode) | f32 LE data …
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::frame::{FrameError, encode};
use crate::lora::adapter::{AdaptedLayer, AdapterWeights, LoraFactors, LoraScaling};

const MAGIC: [u8; 4] = *b"FTAD";

/// The largest header accepted (a model has a few hundred adapted layers).
pub const MAX_HEADER: usize = 1 << 20;

/// The largest adapter accepted, in values (1 GiB of f32).
pub const MAX_VALUES: u64 = 1 << 28;

#[derive(Serialize, Deserialize)]
struct Header {
    rank: usize,
    scaling: LoraScaling,
    layers: Vec<LayerShape>,
}

#[derive(Serialize, Deserialize)]
struct LayerShape {
    layer: AdaptedLayer,
    rank: usize,
    d_in: usize,
    d_out: usize,
}

/// Why bytes are not an adapter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AdapterBlobError {
    /// Not an adapter blob.
    #[error("not an adapter blob (bad magic)")]
    BadMagic,
    /// The header is malformed or over its limit.
    #[error("bad adapter header: {0}")]
    Header(#[from] FrameError),
    /// The declared shapes do not match the bytes present.
    #[error("adapter declares {declared} values, the blob holds {present}")]
    Size {
        /// Values the header declares.
        declared: u64,
        /// Values present.
        present: u64,
    },
    /// A value is NaN or infinite.
    #[error("adapter layer {layer:?} holds a non-finite value")]
    NotFinite {
        /// Where.
        layer: AdaptedLayer,
    },
    /// A layer's rank differs from the adapter's, or a layer is listed twice.
    #[error("inconsistent adapter: {0}")]
    Inconsistent(String),
}

/// Encodes an adapter.
pub fn encode_adapter(adapter: &AdapterWeights) -> Vec<u8> {
    let header = Header {
        rank: adapter.rank,
        scaling: adapter.scaling,
        layers: adapter
            .layers
            .iter()
            .map(|(&layer, f)| LayerShape {
                layer,
                rank: f.rank,
                d_in: f.d_in,
                d_out: f.d_out,
            })
            .collect(),
    };
    // The header is a frame of its own, so it carries the protocol version too. A header of
    // plain numbers always encodes.
    let header = encode(&header).unwrap_or_default();
    let values: usize = adapter.layers.values().map(|f| f.a.len() + f.b.len()).sum();
    let mut out = Vec::with_capacity(8 + header.len() + 4 * values);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    for f in adapter.layers.values() {
        for v in f.a.iter().chain(&f.b) {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

/// Decodes an adapter, checking sizes, consistency and finiteness.
pub fn decode_adapter(bytes: &[u8]) -> Result<AdapterWeights, AdapterBlobError> {
    if bytes.len() < 8 || bytes[..4] != MAGIC {
        return Err(AdapterBlobError::BadMagic);
    }
    let header_len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
    if header_len > MAX_HEADER {
        return Err(FrameError::TooLarge {
            len: header_len as u64,
            limit: MAX_HEADER as u64,
        }
        .into());
    }
    let rest = &bytes[8..];
    let Some(header_frame) = rest.get(..header_len) else {
        return Err(FrameError::Truncated {
            expected: header_len,
            got: rest.len(),
        }
        .into());
    };
    let header: Header = super::frame::decode(header_frame, MAX_HEADER)?;
    let data = &rest[header_len..];
    if !data.len().is_multiple_of(4) {
        return Err(AdapterBlobError::Size {
            declared: 0,
            present: data.len() as u64 / 4,
        });
    }
    let present = data.len() as u64 / 4;
    let mut declared = 0u64;
    if header.rank == 0 || !header.scaling.alpha.is_finite() {
        return Err(AdapterBlobError::Inconsistent(
            "rank must be positive and alpha finite".into(),
        ));
    }
    for shape in &header.layers {
        if shape.d_in == 0 || shape.d_out == 0 {
            return Err(AdapterBlobError::Inconsistent(format!(
                "layer {:?} has an empty dimension",
                shape.layer
            )));
        }
        if shape.rank != header.rank {
            return Err(AdapterBlobError::Inconsistent(format!(
                "layer {:?} has rank {}, the adapter {}",
                shape.layer, shape.rank, header.rank
            )));
        }
        let n = (shape.rank as u64)
            .checked_mul((shape.d_in as u64).saturating_add(shape.d_out as u64))
            .filter(|&n| n <= MAX_VALUES)
            .ok_or(AdapterBlobError::Size {
                declared: u64::MAX,
                present,
            })?;
        declared = declared.saturating_add(n);
    }
    if declared != present || declared > MAX_VALUES {
        return Err(AdapterBlobError::Size { declared, present });
    }
    let mut values = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
    let mut layers = BTreeMap::new();
    for shape in header.layers {
        let a: Vec<f32> = values.by_ref().take(shape.rank * shape.d_in).collect();
        let b: Vec<f32> = values.by_ref().take(shape.d_out * shape.rank).collect();
        if a.iter().chain(&b).any(|v| !v.is_finite()) {
            return Err(AdapterBlobError::NotFinite { layer: shape.layer });
        }
        let factors = LoraFactors {
            rank: shape.rank,
            d_in: shape.d_in,
            d_out: shape.d_out,
            a,
            b,
        };
        if layers.insert(shape.layer, factors).is_some() {
            return Err(AdapterBlobError::Inconsistent(format!(
                "layer {:?} listed twice",
                shape.layer
            )));
        }
    }
    Ok(AdapterWeights {
        rank: header.rank,
        scaling: header.scaling,
        layers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::adapter::TargetModule;

    fn adapter() -> AdapterWeights {
        let mut layers = BTreeMap::new();
        for layer in 0..2 {
            layers.insert(
                AdaptedLayer {
                    layer,
                    target: TargetModule::QProj,
                },
                LoraFactors {
                    rank: 2,
                    d_in: 3,
                    d_out: 4,
                    a: (0..6).map(|i| i as f32 * 0.5 - layer as f32).collect(),
                    b: (0..8).map(|i| -(i as f32) * 0.25).collect(),
                },
            );
        }
        AdapterWeights {
            rank: 2,
            scaling: LoraScaling {
                alpha: 16.0,
                rslora: false,
            },
            layers,
        }
    }

    #[test]
    fn round_trip_is_bit_exact() {
        let a = adapter();
        assert_eq!(decode_adapter(&encode_adapter(&a)).unwrap(), a);
    }

    #[test]
    fn refuses_bad_sizes_and_values() {
        let bytes = encode_adapter(&adapter());
        assert!(matches!(
            decode_adapter(&bytes[..bytes.len() - 4]),
            Err(AdapterBlobError::Size { .. })
        ));
        assert!(matches!(
            decode_adapter(&bytes[..bytes.len() - 1]),
            Err(AdapterBlobError::Size { .. })
        ));
        assert_eq!(decode_adapter(&bytes[..3]), Err(AdapterBlobError::BadMagic));
        let mut nan = bytes.clone();
        let n = nan.len();
        nan[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(matches!(
            decode_adapter(&nan),
            Err(AdapterBlobError::NotFinite { .. })
        ));
        let mut huge = bytes.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_adapter(&huge),
            Err(AdapterBlobError::Header(FrameError::TooLarge { .. }))
        ));
    }
}
