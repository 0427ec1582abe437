//! Frames: how one message travels on a QUIC stream, and the checks every received frame
//! passes before a byte of it is decoded.
//!
//! ```text
//! +------+---------+--------+----------------------+
//! | "FT" | version | length | body (bincode, serde) |
//! |  2 B | u16 LE  | u32 LE | `length` bytes        |
//! +------+---------+--------+----------------------+
//! ```
//!
//! The header is fixed so that a peer of any version can read it: a version mismatch is found
//! before the body is touched, and the reply to it (an error frame in the receiver's version)
//! tells the sender which version the receiver speaks. The declared length is checked against
//! the receiver's limit before anything is allocated, and bincode decodes the body with the same
//! limit (a forged length prefix inside the body cannot make it allocate more), rejecting bytes
//! left over after the message.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::PROTOCOL_VERSION;

/// The two bytes every frame starts with.
pub const MAGIC: [u8; 2] = *b"FT";

/// Bytes of a frame header.
pub const HEADER_LEN: usize = 8;

/// Why bytes could not be read as a frame or a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The bytes do not start with the frame magic.
    #[error("not a fedtune frame (bad magic)")]
    BadMagic,
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: we speak {ours}, the peer speaks {theirs}")]
    VersionMismatch {
        /// Our version.
        ours: u16,
        /// The peer's version.
        theirs: u16,
    },
    /// The declared body is longer than this side accepts.
    #[error("frame of {len} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Declared length.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// Fewer bytes than the header declares.
    #[error("frame truncated: expected {expected} bytes, got {got}")]
    Truncated {
        /// Bytes declared.
        expected: usize,
        /// Bytes present.
        got: usize,
    },
    /// The body is not a valid message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The body holds more bytes than the message.
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
    /// A message could not be encoded (a bug, or a message over the limit).
    #[error("cannot encode message: {0}")]
    Encode(String),
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The sender's protocol version.
    pub version: u16,
    /// Body length.
    pub len: u32,
}

impl FrameHeader {
    /// Parses a header, checking magic, version and `len <= limit`. A header of another version
    /// yields [`FrameError::VersionMismatch`] whatever its length.
    pub fn parse(bytes: &[u8; HEADER_LEN], limit: usize) -> Result<Self, FrameError> {
        if bytes[..2] != MAGIC {
            return Err(FrameError::BadMagic);
        }
        let version = u16::from_le_bytes([bytes[2], bytes[3]]);
        if version != PROTOCOL_VERSION {
            return Err(FrameError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: version,
            });
        }
        let len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        if len as u64 > limit as u64 {
            return Err(FrameError::TooLarge {
                len: len as u64,
                limit: limit as u64,
            });
        }
        Ok(Self { version, len })
    }
}

/// The bincode configuration of every body, with the decode limit `LIMIT` in bytes.
fn config<const LIMIT: usize>() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<LIMIT>,
> {
    bincode::config::standard().with_limit::<LIMIT>()
}

/// The largest body any frame may have, whatever the receiver's own limit: bincode's decoder
/// needs its limit at compile time, so this is it; each receiver checks its smaller limit on the
/// header first.
pub const MAX_BODY: usize = 256 << 20;

/// Encodes `message` as one frame (header + body).
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    let body = bincode::serde::encode_to_vec(message, config::<MAX_BODY>())
        .map_err(|e| FrameError::Encode(e.to_string()))?;
    let len = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge {
        len: body.len() as u64,
        limit: u32::MAX as u64,
    })?;
    let mut frame = Vec::with_capacity(HEADER_LEN + body.len());
    frame.extend_from_slice(&MAGIC);
    frame.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Encodes `message` as a bare body (no header): how stored records are kept, decoded again
/// with [`decode_body`].
pub fn encode_body<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    bincode::serde::encode_to_vec(message, config::<MAX_BODY>())
        .map_err(|e| FrameError::Encode(e.to_string()))
}

/// Decodes a body (the bytes after a checked header), rejecting trailing bytes.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    if body.len() > MAX_BODY {
        return Err(FrameError::TooLarge {
            len: body.len() as u64,
            limit: MAX_BODY as u64,
        });
    }
    let (message, used) = bincode::serde::decode_from_slice(body, config::<MAX_BODY>())
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if used != body.len() {
        return Err(FrameError::TrailingBytes(body.len() - used));
    }
    Ok(message)
}

/// Decodes one whole frame held in memory, with the receiver's `limit` on the body.
pub fn decode<T: DeserializeOwned>(frame: &[u8], limit: usize) -> Result<T, FrameError> {
    let Some(header) = frame.first_chunk::<HEADER_LEN>() else {
        return Err(FrameError::Truncated {
            expected: HEADER_LEN,
            got: frame.len(),
        });
    };
    let header = FrameHeader::parse(header, limit)?;
    let body = &frame[HEADER_LEN..];
    if body.len() < header.len as usize {
        return Err(FrameError::Truncated {
            expected: header.len as usize,
            got: body.len(),
        });
    }
    if body.len() > header.len as usize {
        return Err(FrameError::TrailingBytes(body.len() - header.len as usize));
    }
    decode_body(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Sample {
        a: u64,
        b: Vec<u8>,
    }

    #[test]
    fn round_trip() {
        let m = Sample {
            a: 7,
            b: vec![1, 2, 3],
        };
        let frame = encode(&m).unwrap();
        assert_eq!(decode::<Sample>(&frame, 1024).unwrap(), m);
    }

    #[test]
    fn header_checks_come_first() {
        let mut frame = encode(&Sample { a: 1, b: vec![] }).unwrap();
        assert!(matches!(
            decode::<Sample>(&frame, 1),
            Err(FrameError::TooLarge { .. })
        ));
        frame[2] = 99;
        assert!(matches!(
            decode::<Sample>(&frame, 1024),
            Err(FrameError::VersionMismatch { theirs: 99, .. })
        ));
        frame[0] = b'X';
        assert_eq!(decode::<Sample>(&frame, 1024), Err(FrameError::BadMagic));
    }

    #[test]
    fn forged_inner_length_does_not_allocate() {
        // A Vec<u8> claiming 2^40 elements in a 12-byte body: bincode must refuse, not allocate.
        let mut body = vec![7u8]; // a = 7
        body.push(253); // varint u64 marker
        body.extend_from_slice(&(1u64 << 40).to_le_bytes());
        let mut frame = MAGIC.to_vec();
        frame.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
        frame.extend_from_slice(&body);
        assert!(matches!(
            decode::<Sample>(&frame, 1024),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn truncated_and_trailing() {
        let frame = encode(&Sample {
            a: 1,
            b: vec![1, 2],
        })
        .unwrap();
        assert!(matches!(
            decode::<Sample>(&frame[..frame.len() - 1], 1024),
            Err(FrameError::Truncated { .. })
        ));
        let mut long = frame.clone();
        long.push(0);
        assert!(matches!(
            decode::<Sample>(&long, 1024),
            Err(FrameError::TrailingBytes(1))
        ));
        assert!(matches!(
            decode::<Sample>(&frame[..3], 1024),
            Err(FrameError::Truncated { .. })
        ));
    }
}
