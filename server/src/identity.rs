//! The server's own keys, made once on first start and kept in the state folder: a self-signed
//! TLS certificate (devices pin it) and an Ed25519 key that signs plans. The public half of
//! both goes to `server-identity.json`, the file an operator hands to devices.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use fedtune_shared::protocol::SigningKey;
use fedtune_shared::transport::identity::ServerIdentity;
use fedtune_shared::transport::tls::SERVER_NAME;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Why the keys could not be loaded or made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// A key file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A key file is not a valid key.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

/// The server's keys.
pub struct ServerKeys {
    /// TLS certificate, DER.
    pub cert_der: Vec<u8>,
    /// TLS certificate, PEM.
    pub cert_pem: String,
    /// TLS private key, PKCS#8 DER.
    pub tls_key_der: Vec<u8>,
    /// The plan-signing key.
    pub signing: SigningKey,
    /// Secret of QUIC stateless resets. Kept across restarts so that a restarted daemon can
    /// reset the connections its previous process held: devices then reconnect at once instead
    /// of waiting for their idle timeout.
    pub reset_secret: Vec<u8>,
}

fn read(path: &Path) -> Result<Option<Vec<u8>>, IdentityError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(IdentityError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), IdentityError> {
    let io = |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    };
    std::fs::write(path, bytes).map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    Ok(())
}

impl ServerKeys {
    /// Loads the keys from `dir`, making any that are missing.
    pub fn load_or_create(dir: &Path) -> Result<Self, IdentityError> {
        std::fs::create_dir_all(dir).map_err(|source| IdentityError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let cert_path = dir.join("tls-cert.pem");
        let key_path = dir.join("tls-key.der");
        let sign_path = dir.join("signing-key.pk8");
        let invalid = |path: &Path, message: String| IdentityError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let (cert_pem, tls_key_der) = match (read(&cert_path)?, read(&key_path)?) {
            (Some(c), Some(k)) => (
                String::from_utf8(c).map_err(|_| invalid(&cert_path, "not PEM text".into()))?,
                k,
            ),
            _ => {
                let certified = rcgen::generate_simple_self_signed(vec![
                    SERVER_NAME.to_string(),
                    "localhost".to_string(),
                ])
                .map_err(|e| invalid(&cert_path, e.to_string()))?;
                let cert = certified.cert.pem();
                let key = certified.signing_key.serialize_der();
                write_private(&key_path, &key)?;
                write_private(&cert_path, cert.as_bytes())?;
                (cert, key)
            }
        };
        let signing = match read(&sign_path)? {
            Some(pk8) => {
                SigningKey::from_pkcs8(&pk8).map_err(|e| invalid(&sign_path, e.to_string()))?
            }
            None => {
                let key = SigningKey::generate().map_err(|e| invalid(&sign_path, e.to_string()))?;
                write_private(&sign_path, key.pkcs8())?;
                key
            }
        };
        let reset_path = dir.join("reset-secret.bin");
        let reset_secret = match read(&reset_path)? {
            Some(secret) if secret.len() == 32 => secret,
            Some(_) => return Err(invalid(&reset_path, "expected 32 bytes".into())),
            None => {
                let secret = rand::random::<[u8; 32]>().to_vec();
                write_private(&reset_path, &secret)?;
                secret
            }
        };
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| invalid(&cert_path, e.to_string()))?
            .to_vec();
        Ok(Self {
            cert_der,
            cert_pem,
            tls_key_der,
            signing,
            reset_secret,
        })
    }

    /// The identity devices need, for a server reachable at `address`.
    pub fn identity(&self, address: SocketAddr) -> ServerIdentity {
        ServerIdentity {
            address,
            certificate_pem: self.cert_pem.clone(),
            signing_key: self.signing.public_key().to_string(),
        }
    }
}
