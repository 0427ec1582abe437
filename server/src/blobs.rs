//! Blobs on the server's disk: content-addressed files (`blobs/<sha256>`) the daemon serves to
//! devices, and partial uploads (`uploads/<device>-<sha256>.part`) that grow across connections
//! until their digest checks, then move into the blob folder. Every file is written and synced
//! before it is referenced, so an acknowledged upload survives a crash.

use std::io::Write;
use std::path::{Path, PathBuf};

use fedtune_shared::protocol::blob::digest_file;
use fedtune_shared::protocol::{BlobRef, DeviceId, Digest};

/// Why a blob operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlobError {
    /// A file could not be read or written.
    #[error("blob store: {0}")]
    Io(#[from] std::io::Error),
    /// An upload's bytes do not hash to its digest (it is discarded).
    #[error("upload does not match its digest {0}")]
    DigestMismatch(Digest),
    /// An upload is larger than declared or allowed.
    #[error("upload of {len} bytes exceeds {limit}")]
    TooLarge {
        /// Bytes.
        len: u64,
        /// Limit.
        limit: u64,
    },
}

/// The blob folders.
#[derive(Debug, Clone)]
pub struct Blobs {
    blobs: PathBuf,
    uploads: PathBuf,
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

impl Blobs {
    /// Opens (creating) the folders under `dir`.
    pub fn open(dir: &Path) -> Result<Self, BlobError> {
        let blobs = dir.join("blobs");
        let uploads = dir.join("uploads");
        std::fs::create_dir_all(&blobs)?;
        std::fs::create_dir_all(&uploads)?;
        Ok(Self { blobs, uploads })
    }

    /// Where the blob `digest` lives (whether or not it exists).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(digest.to_string())
    }

    /// The blob's length, if the server holds it.
    pub fn len(&self, digest: &Digest) -> Option<u64> {
        std::fs::metadata(self.path(digest)).ok().map(|m| m.len())
    }

    /// Stores bytes (durably) and returns their reference; storing existing bytes is free.
    pub fn put(&self, bytes: &[u8]) -> Result<BlobRef, BlobError> {
        let digest = Digest::of(bytes);
        let path = self.path(&digest);
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == bytes.len() as u64) {
            return Ok(BlobRef {
                digest,
                len: bytes.len() as u64,
            });
        }
        let tmp = path.with_extension("tmp");
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        sync_dir(&self.blobs);
        Ok(BlobRef {
            digest,
            len: bytes.len() as u64,
        })
    }

    /// Reads a blob.
    pub fn read(&self, digest: &Digest) -> Result<Vec<u8>, BlobError> {
        Ok(std::fs::read(self.path(digest))?)
    }

    /// Deletes a blob (missing is fine).
    pub fn remove(&self, digest: &Digest) {
        let _ = std::fs::remove_file(self.path(digest));
    }

    /// The partial file of `device`'s upload of `digest`.
    pub fn upload_path(&self, device: DeviceId, digest: &Digest) -> PathBuf {
        self.uploads.join(format!("{device}-{digest}.part"))
    }

    /// Bytes of an upload the server holds: all of it once complete.
    pub fn upload_offset(&self, device: DeviceId, digest: &Digest) -> u64 {
        if let Some(len) = self.len(digest) {
            return len;
        }
        std::fs::metadata(self.upload_path(device, digest))
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// Checks a finished upload of `total` bytes and moves it into the blob folder. A file of
    /// the wrong digest is deleted (the device starts over).
    pub fn complete_upload(
        &self,
        device: DeviceId,
        digest: &Digest,
        total: u64,
    ) -> Result<Option<BlobRef>, BlobError> {
        let part = self.upload_path(device, digest);
        let len = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
        if len < total {
            return Ok(None);
        }
        if len > total {
            let _ = std::fs::remove_file(&part);
            return Err(BlobError::TooLarge { len, limit: total });
        }
        if digest_file(&part)? != *digest {
            let _ = std::fs::remove_file(&part);
            return Err(BlobError::DigestMismatch(*digest));
        }
        std::fs::rename(&part, self.path(digest))?;
        sync_dir(&self.blobs);
        Ok(Some(BlobRef {
            digest: *digest,
            len,
        }))
    }
}
