//! What an app gives the SDK when it creates a client: which server to trust, the enrollment
//! token, where to keep state and examples, which model, which compute backend, which policy.

use std::net::SocketAddr;
use std::path::PathBuf;

use fedtune_shared::transport::identity::ServerIdentity as SharedIdentity;

use crate::conditions::TrainingPolicy;
use crate::error::FedtuneError;

/// What a device must know to trust a server: the operator hands it out (the daemon writes it
/// as `server-identity.json`; `parse_server_identity` reads that file's text).
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct ServerIdentity {
    /// Where the server listens, `IP:port` (for example `203.0.113.7:4433` or `[::1]:4433`).
    pub address: String,
    /// The server's TLS certificate, PEM. The SDK pins it: no other certificate is accepted.
    pub certificate_pem: String,
    /// The server's plan-signing Ed25519 public key, 64 hex digits.
    pub signing_key: String,
}

/// Which hardware trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum BackendPreference {
    /// The CPU (every core). Always available.
    Cpu,
    /// The GPU through wgpu: Vulkan on Android, Metal on iOS (chosen explicitly, see
    /// `mobile/README.md`). Creating the client's model fails with
    /// `FedtuneError::Model` where no GPU adapter exists.
    Gpu,
    /// The GPU when one starts, otherwise the CPU.
    Automatic,
}

/// A client's settings.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct ClientSettings {
    /// The server to trust.
    pub server: ServerIdentity,
    /// The operator's enrollment token (used once; an enrolled device ignores it).
    pub enrollment_token: String,
    /// A folder the app owns (Android: `context.filesDir`; iOS: Application Support). The SDK
    /// keeps its key, enrollment, training history and unsent reports in `state/` and the
    /// app's training examples in `examples.jsonl`; none of the examples ever leaves it.
    pub data_dir: String,
    /// The base model: a `.gguf` file or a Hugging Face folder (`config.json`,
    /// `*.safetensors`, `tokenizer.json`), the same weights the server runs.
    pub model_path: String,
    /// Which hardware trains.
    pub backend: BackendPreference,
    /// When training may run.
    pub policy: TrainingPolicy,
    /// Tokens per training sequence cut from text examples (64 suits phones).
    pub sequence_length: u32,
}

/// Reads the text of a `server-identity.json` file, checking the certificate and the key.
#[uniffi::export]
pub fn parse_server_identity(json: String) -> Result<ServerIdentity, FedtuneError> {
    let identity: SharedIdentity =
        serde_json::from_str(&json).map_err(|e| FedtuneError::InvalidConfig {
            reason: format!("server identity: {e}"),
        })?;
    let identity = ServerIdentity {
        address: identity.address.to_string(),
        certificate_pem: identity.certificate_pem,
        signing_key: identity.signing_key,
    };
    identity.check()?;
    Ok(identity)
}

impl ServerIdentity {
    /// The client SDK's form, with every field checked.
    pub(crate) fn check(&self) -> Result<SharedIdentity, FedtuneError> {
        let invalid = |reason: String| FedtuneError::InvalidConfig { reason };
        let address: SocketAddr = self.address.parse().map_err(|e| {
            invalid(format!(
                "server address `{}` is not IP:port: {e}",
                self.address
            ))
        })?;
        let identity = SharedIdentity {
            address,
            certificate_pem: self.certificate_pem.clone(),
            signing_key: self.signing_key.clone(),
        };
        identity
            .certificate_der()
            .map_err(|e| invalid(e.to_string()))?;
        identity.signing_key().map_err(|e| invalid(e.to_string()))?;
        Ok(identity)
    }
}

/// Settings checked once, at client creation, so later failures are about the world, not typos.
#[derive(Debug, Clone)]
pub(crate) struct CheckedSettings {
    pub(crate) server: SharedIdentity,
    pub(crate) token: String,
    pub(crate) data_dir: PathBuf,
    pub(crate) model_path: PathBuf,
    pub(crate) backend: BackendPreference,
    pub(crate) policy: TrainingPolicy,
    pub(crate) sequence_length: usize,
}

impl ClientSettings {
    /// Checks every field that can be checked without loading the model or touching the
    /// network, and creates the data folder.
    pub(crate) fn check(&self) -> Result<CheckedSettings, FedtuneError> {
        let server = self.server.check()?;
        if self.sequence_length < 2 {
            return Err(FedtuneError::InvalidConfig {
                reason: "sequence_length must be at least 2".into(),
            });
        }
        if let TrainingPolicy::WhenChargingOnUnmeteredIdle { min_battery } = self.policy
            && !(0.0..=1.0).contains(&min_battery)
        {
            return Err(FedtuneError::InvalidConfig {
                reason: format!("min_battery {min_battery} is outside 0.0 to 1.0"),
            });
        }
        let model_path = PathBuf::from(&self.model_path);
        if !model_path.exists() {
            return Err(FedtuneError::Model {
                reason: format!("{} does not exist", model_path.display()),
            });
        }
        let data_dir = PathBuf::from(&self.data_dir);
        std::fs::create_dir_all(&data_dir).map_err(|e| FedtuneError::Storage {
            reason: format!("{}: {e}", data_dir.display()),
        })?;
        Ok(CheckedSettings {
            server,
            token: self.enrollment_token.clone(),
            data_dir,
            model_path,
            backend: self.backend,
            policy: self.policy,
            sequence_length: self.sequence_length as usize,
        })
    }
}
