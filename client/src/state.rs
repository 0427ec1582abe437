//! What a device keeps on disk so that a killed app resumes where it was: its key, its
//! enrollment, the FedKSeed history it has applied (so it rebuilds its model locally instead of
//! downloading anything), and a finished report not yet acknowledged (resent on restart; the
//! server counts it once).
//!
//! Every write goes to a temporary file that is synced and renamed over the old one, so a kill
//! at any moment leaves either the old or the new state, never a torn one.

use std::io::Write;
use std::path::{Path, PathBuf};

use fedtune_shared::protocol::{DeviceId, Digest, Report, SigningKey};
use fedtune_shared::zo::round::{HistoryDelta, ZoRunConfig};
use serde::{Deserialize, Serialize};

/// Why the state could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file is not valid state.
    #[error("{path}: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

/// The device's durable state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceState {
    /// Set once enrolled.
    pub device: Option<DeviceId>,
    /// The run the rest belongs to.
    pub run_id: Option<u64>,
    /// The last round whose global state the device holds.
    pub last_seen_round: u64,
    /// FedKSeed history deltas applied to the base model, oldest first.
    pub history: Vec<HistoryDelta>,
    /// The FedKSeed settings the history was made with.
    pub fedkseed_config: Option<ZoRunConfig>,
    /// A report written but not yet acknowledged.
    pub pending: Option<Report>,
    /// The last round whose report was acknowledged.
    pub last_reported_round: u64,
}

/// The state folder.
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Opens (creating) the folder.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        std::fs::create_dir_all(dir).map_err(|source| StateError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The device key, made on first use.
    pub fn device_key(&self) -> Result<SigningKey, StateError> {
        let path = self.dir.join("device-key.pk8");
        match std::fs::read(&path) {
            Ok(bytes) => SigningKey::from_pkcs8(&bytes).map_err(|e| StateError::Corrupt {
                path,
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = SigningKey::generate().map_err(|e| StateError::Corrupt {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
                write_atomically(&path, key.pkcs8())?;
                Ok(key)
            }
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    /// Installs `key` as the device key before first use (a fleet provisioned by its operator,
    /// or a simulation that needs the same device ids on every run). Refuses to replace a key
    /// the device already has: its id and enrollment hang on it.
    pub fn provision_key(&self, key: &SigningKey) -> Result<(), StateError> {
        let path = self.dir.join("device-key.pk8");
        match std::fs::read(&path) {
            Ok(bytes) if bytes == key.pkcs8() => Ok(()),
            Ok(_) => Err(StateError::Corrupt {
                path,
                message: "the device already has another key".into(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                write_atomically(&path, key.pkcs8())
            }
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    /// Where a download of blob `digest` is kept while incomplete.
    pub fn download_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(format!("download-{digest}.part"))
    }

    /// Stores a blob to upload (durably, before the report that names it is written).
    pub fn put_outbox(&self, digest: &Digest, bytes: &[u8]) -> Result<(), StateError> {
        let dir = self.dir.join("outbox");
        std::fs::create_dir_all(&dir).map_err(|source| StateError::Io {
            path: dir.clone(),
            source,
        })?;
        write_atomically(&dir.join(digest.to_string()), bytes)
    }

    /// A blob waiting to be uploaded.
    pub fn outbox(&self, digest: &Digest) -> Result<Vec<u8>, StateError> {
        let path = self.dir.join("outbox").join(digest.to_string());
        std::fs::read(&path).map_err(|source| StateError::Io { path, source })
    }

    /// Forgets an uploaded blob.
    pub fn remove_outbox(&self, digest: &Digest) {
        let _ = std::fs::remove_file(self.dir.join("outbox").join(digest.to_string()));
    }

    /// The stored state (default when none).
    pub fn load(&self) -> Result<DeviceState, StateError> {
        let path = self.dir.join("state.json");
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
                path,
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(DeviceState::default()),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    /// Stores the state durably.
    pub fn save(&self, state: &DeviceState) -> Result<(), StateError> {
        let path = self.dir.join("state.json");
        let bytes = serde_json::to_vec(state).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        write_atomically(&path, &bytes)
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let io = |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(parent) = path.parent()
        && let Ok(dir) = std::fs::File::open(parent)
    {
        let _ = dir.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_and_key_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::open(dir.path()).unwrap();
        let key = s.device_key().unwrap().public_key();
        let state = DeviceState {
            run_id: Some(3),
            last_seen_round: 4,
            ..DeviceState::default()
        };
        s.save(&state).unwrap();
        let s = StateDir::open(dir.path()).unwrap();
        assert_eq!(s.device_key().unwrap().public_key(), key);
        assert_eq!(s.load().unwrap(), state);
        std::fs::write(dir.path().join("state.json"), b"{garbage").unwrap();
        assert!(matches!(s.load(), Err(StateError::Corrupt { .. })));
    }
}
