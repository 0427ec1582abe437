//! What a device must know to trust a server: its address, its TLS certificate (pinned) and the
//! public key that signs its plans. The server writes this file; the operator gives it to
//! devices together with an enrollment token.

use std::net::SocketAddr;
use std::path::Path;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};

use super::TransportError;
use crate::protocol::PublicKey;

/// A server's public identity, as stored in `server-identity.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerIdentity {
    /// Where the server listens.
    pub address: SocketAddr,
    /// Its TLS certificate, PEM.
    pub certificate_pem: String,
    /// Its plan-signing Ed25519 public key, hex.
    pub signing_key: String,
}

impl ServerIdentity {
    /// The certificate's DER bytes.
    pub fn certificate_der(&self) -> Result<Vec<u8>, TransportError> {
        CertificateDer::from_pem_slice(self.certificate_pem.as_bytes())
            .map(|c| c.as_ref().to_vec())
            .map_err(|e| TransportError::Credentials(format!("server certificate: {e}")))
    }

    /// The plan-signing key.
    pub fn signing_key(&self) -> Result<PublicKey, TransportError> {
        PublicKey::parse(&self.signing_key).ok_or_else(|| {
            TransportError::Credentials("server signing key is not 64 hex digits".into())
        })
    }

    /// Reads an identity file, checking that certificate and key parse.
    pub fn load(path: &Path) -> Result<Self, TransportError> {
        let text = std::fs::read_to_string(path)?;
        let identity: Self = serde_json::from_str(&text)
            .map_err(|e| TransportError::Credentials(format!("{}: {e}", path.display())))?;
        identity.certificate_der()?;
        identity.signing_key()?;
        Ok(identity)
    }

    /// Writes the identity file.
    pub fn save(&self, path: &Path) -> Result<(), TransportError> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| TransportError::Credentials(e.to_string()))?;
        std::fs::write(path, text)?;
        Ok(())
    }
}
