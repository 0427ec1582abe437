//! A bounds-checked cursor over untrusted little-endian bytes.
//!
//! Every read checks the declared length against what is left *before* allocating, so a forged
//! length prefix yields an error instead of an out-of-memory abort (the habit of rustls'
//! `msgs/codec.rs`).

/// Why a read from a byte buffer failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// Fewer bytes remain than the field needs.
    #[error("unexpected end of data at byte {offset}: needed {needed} more bytes, {left} left")]
    Truncated {
        /// Where the read started.
        offset: usize,
        /// How many bytes the field needed.
        needed: usize,
        /// How many bytes were left.
        left: usize,
    },
    /// A declared length exceeds the hard maximum for that field.
    #[error("{what} at byte {offset} declares {declared}, more than the limit of {limit}")]
    TooLarge {
        /// The kind of field.
        what: &'static str,
        /// Where the field starts.
        offset: usize,
        /// The declared count or length.
        declared: u64,
        /// The hard maximum.
        limit: u64,
    },
    /// A string is not valid UTF-8.
    #[error("string at byte {offset} is not valid UTF-8")]
    BadUtf8 {
        /// Where the string starts.
        offset: usize,
    },
}

/// A cursor over a byte slice.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Starts reading at the beginning of `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    /// The current offset from the start of the buffer.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    /// Takes the next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], ReadError> {
        if n > self.remaining() {
            return Err(ReadError::Truncated {
                offset: self.pos,
                needed: n,
                left: self.remaining(),
            });
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ReadError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// Reads a `u8`.
    pub fn u8(&mut self) -> Result<u8, ReadError> {
        Ok(self.array::<1>()?[0])
    }
    /// Reads a little-endian `u16`.
    pub fn u16(&mut self) -> Result<u16, ReadError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    /// Reads a little-endian `u32`.
    pub fn u32(&mut self) -> Result<u32, ReadError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    /// Reads a little-endian `u64`.
    pub fn u64(&mut self) -> Result<u64, ReadError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    /// Reads a little-endian `f32`.
    pub fn f32(&mut self) -> Result<f32, ReadError> {
        Ok(f32::from_le_bytes(self.array()?))
    }
    /// Reads a little-endian `f64`.
    pub fn f64(&mut self) -> Result<f64, ReadError> {
        Ok(f64::from_le_bytes(self.array()?))
    }

    /// Reads a count and checks it against `limit` and against the bytes left, given that each
    /// element occupies at least `min_element_bytes`.
    pub fn count(
        &mut self,
        what: &'static str,
        limit: u64,
        min_element_bytes: usize,
    ) -> Result<usize, ReadError> {
        let offset = self.pos;
        let declared = self.u64()?;
        let fits = (declared as u128) * (min_element_bytes as u128) <= self.remaining() as u128;
        if declared > limit || !fits {
            if declared > limit {
                return Err(ReadError::TooLarge {
                    what,
                    offset,
                    declared,
                    limit,
                });
            }
            return Err(ReadError::Truncated {
                offset: self.pos,
                needed: (declared as usize).saturating_mul(min_element_bytes),
                left: self.remaining(),
            });
        }
        Ok(declared as usize)
    }

    /// Reads a `u64`-length-prefixed UTF-8 string of at most `limit` bytes.
    pub fn string(&mut self, limit: u64) -> Result<String, ReadError> {
        let len = self.count("string length", limit, 1)?;
        let offset = self.pos;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| ReadError::BadUtf8 { offset })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forged_length_is_rejected_before_allocating() {
        let mut bytes = u64::MAX.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"abc");
        let err = Reader::new(&bytes).string(1 << 20).unwrap_err();
        assert!(matches!(
            err,
            ReadError::TooLarge {
                declared: u64::MAX,
                ..
            }
        ));

        let mut bytes = 100u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"abc");
        let err = Reader::new(&bytes).string(1 << 20).unwrap_err();
        assert!(matches!(err, ReadError::Truncated { left: 3, .. }));
    }

    #[test]
    fn reads_little_endian_fields_in_order() {
        let mut bytes = vec![7u8];
        bytes.extend_from_slice(&0x0102u16.to_le_bytes());
        bytes.extend_from_slice(&1.5f32.to_le_bytes());
        bytes.extend_from_slice(&2u64.to_le_bytes());
        bytes.extend_from_slice(b"hi");
        let mut r = Reader::new(&bytes);
        assert_eq!(r.u8().unwrap(), 7);
        assert_eq!(r.u16().unwrap(), 0x0102);
        assert_eq!(r.f32().unwrap(), 1.5);
        assert_eq!(r.string(16).unwrap(), "hi");
        assert_eq!(r.remaining(), 0);
        assert!(matches!(r.u8(), Err(ReadError::Truncated { .. })));
    }
}
