//! Blobs: payloads too large for a frame (adapters, model weights), named by their SHA-256 and
//! streamed as raw bytes after a header frame. A receiver that lost its connection asks again
//! from the offset it holds; the digest checks the whole once it is complete.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::auth::{hex_decode, hex_encode};

/// SHA-256 of a blob.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        let mut out = [0u8; 32];
        out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
        Self(out)
    }

    /// Parses 64 hex digits.
    pub fn parse(text: &str) -> Option<Self> {
        Some(Self(hex_decode(text)?.try_into().ok()?))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex_encode(&self.0))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", &self.to_string()[..16])
    }
}

/// An incremental SHA-256, for digests of files and streams.
pub struct DigestWriter(ring::digest::Context);

impl Default for DigestWriter {
    fn default() -> Self {
        Self(ring::digest::Context::new(&ring::digest::SHA256))
    }
}

impl DigestWriter {
    /// Feeds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The digest of everything fed.
    pub fn finish(self) -> Digest {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.0.finish().as_ref());
        Digest(out)
    }
}

/// The digest of a file, read in 1 MiB pieces.
pub fn digest_file(path: &std::path::Path) -> std::io::Result<Digest> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut writer = DigestWriter::default();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        writer.update(&buf[..n]);
    }
    Ok(writer.finish())
}

/// Bytes of one chunk when a blob is streamed.
pub const CHUNK_BYTES: usize = 256 << 10;

/// The digest that names a base model: of the file for GGUF, and for a Hugging Face folder of
/// its `config.json` and `*.safetensors` files (names and digests, in name order), so a device
/// and the server agree they hold the same weights without sending them.
pub fn model_digest(path: &std::path::Path) -> std::io::Result<Digest> {
    if !path.is_dir() {
        return digest_file(path);
    }
    let mut files: Vec<_> = std::fs::read_dir(path)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().is_some_and(|n| n == "config.json")
                || p.extension().is_some_and(|e| e == "safetensors")
        })
        .collect();
    files.sort();
    let mut writer = DigestWriter::default();
    for file in files {
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        writer.update(name.as_bytes());
        writer.update(&digest_file(&file)?.0);
    }
    Ok(writer.finish())
}
