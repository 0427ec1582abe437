//! Devices the server knows: enrollment with operator-issued tokens, the key each device
//! proves on every connection, revocation, and what the server learned about each device.
//! Records live in the durable store; tokens are kept only as SHA-256 hashes.

use fedtune_shared::protocol::auth::{CONNECTION_LABEL, EXPORTER_LEN, connection_proof_message};
use fedtune_shared::protocol::{Capabilities, DeviceId, Digest, PublicKey};
use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError};

/// What the server keeps about a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// Its key.
    pub public_key: PublicKey,
    /// What it said about itself at enrollment.
    pub capabilities: Capabilities,
    /// Revoked devices get nothing.
    pub revoked: bool,
    /// The last round it reported in (0: none).
    pub last_round: u64,
    /// Wall time of its last local round, seconds (its measured speed).
    pub last_round_s: Option<f64>,
}

/// Why a device was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The token is unknown or used up.
    #[error("enrollment token is unknown or used up")]
    BadToken,
    /// The device is not enrolled.
    #[error("device {0} is not enrolled")]
    Unknown(DeviceId),
    /// The device was revoked.
    #[error("device {0} is revoked")]
    Revoked(DeviceId),
    /// The proof of key did not verify.
    #[error("device {0} failed to prove its key")]
    BadProof(DeviceId),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored record does not decode.
    #[error("device record of {0} is corrupt")]
    Corrupt(DeviceId),
}

/// The hash under which a token is stored.
pub fn token_hash(token: &str) -> [u8; 32] {
    Digest::of(token.as_bytes()).0
}

/// The device registry over the store.
pub struct Registry<'a> {
    store: &'a Store,
}

impl<'a> Registry<'a> {
    /// The registry kept in `store`.
    pub fn new(store: &'a Store) -> Self {
        Self { store }
    }

    /// Issues a token good for `uses` enrollments.
    pub fn add_token(&self, token: &str, uses: u32) -> Result<(), RegistryError> {
        Ok(self.store.add_token(token_hash(token), uses)?)
    }

    /// Enrolls a device: consumes one use of `token` and stores the key. Enrolling a key that
    /// is already enrolled (and not revoked) succeeds again without using the token, so a device
    /// that lost the answer can retry.
    pub fn enroll(
        &self,
        token: &str,
        key: PublicKey,
        capabilities: Capabilities,
    ) -> Result<DeviceId, RegistryError> {
        let id = key.device_id();
        if let Some(record) = self.record(id)? {
            if record.revoked {
                return Err(RegistryError::Revoked(id));
            }
            return Ok(id);
        }
        let record = DeviceRecord {
            public_key: key,
            capabilities,
            revoked: false,
            last_round: 0,
            last_round_s: None,
        };
        let bytes = serde_json::to_vec(&record).map_err(|_| RegistryError::Corrupt(id))?;
        if !self.store.enroll(token_hash(token), id.0, &bytes)? {
            return Err(RegistryError::BadToken);
        }
        Ok(id)
    }

    /// Checks a device's proof of key for a connection whose exporter output is `exporter`.
    pub fn authenticate(
        &self,
        device: DeviceId,
        exporter: &[u8; EXPORTER_LEN],
        signature: &[u8],
    ) -> Result<DeviceRecord, RegistryError> {
        let record = self.record(device)?.ok_or(RegistryError::Unknown(device))?;
        if record.revoked {
            return Err(RegistryError::Revoked(device));
        }
        record
            .public_key
            .verify(
                CONNECTION_LABEL,
                &connection_proof_message(exporter),
                signature,
            )
            .map_err(|_| RegistryError::BadProof(device))?;
        Ok(record)
    }

    /// Revokes a device; it is refused from its next request on.
    pub fn revoke(&self, device: DeviceId) -> Result<(), RegistryError> {
        let mut record = self.record(device)?.ok_or(RegistryError::Unknown(device))?;
        record.revoked = true;
        self.put(device, &record)
    }

    /// A device's record.
    pub fn record(&self, device: DeviceId) -> Result<Option<DeviceRecord>, RegistryError> {
        match self.store.device(device.0)? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|_| RegistryError::Corrupt(device)),
        }
    }

    /// Stores a device's record.
    pub fn put(&self, device: DeviceId, record: &DeviceRecord) -> Result<(), RegistryError> {
        let bytes = serde_json::to_vec(record).map_err(|_| RegistryError::Corrupt(device))?;
        Ok(self.store.put_device(device.0, &bytes)?)
    }

    /// Every enrolled device.
    pub fn devices(&self) -> Result<Vec<(DeviceId, DeviceRecord)>, RegistryError> {
        self.store
            .devices()?
            .into_iter()
            .map(|(id, bytes)| {
                let id = DeviceId(id);
                serde_json::from_slice(&bytes)
                    .map(|r| (id, r))
                    .map_err(|_| RegistryError::Corrupt(id))
            })
            .collect()
    }
}
