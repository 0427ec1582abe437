//! Moving protocol messages over QUIC: TLS set-up with a pinned server certificate, one
//! request/response exchange per bidirectional stream, and blob streaming. Both the device SDK
//! and the server daemon use this one implementation of the framing (enabled by the `net`
//! feature, so the model and algorithms build without an async runtime).

pub mod identity;
pub mod stream;
pub mod tls;

use crate::protocol::{FrameError, WireError};

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The connection could not be set up for now (no socket, endpoint stopping).
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The server's address or name cannot be used (retrying will not help).
    #[error("bad server address: {0}")]
    BadAddress(String),
    /// The connection failed or was closed (includes a refused server certificate).
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// A stream failed while reading.
    #[error("stream read failed: {0}")]
    Read(String),
    /// A stream failed while writing.
    #[error("stream write failed: {0}")]
    Write(String),
    /// The peer's bytes were not a valid frame or message.
    #[error("bad frame from peer: {0}")]
    Frame(#[from] FrameError),
    /// The peer refused the request.
    #[error("refused by server: {0}")]
    Refused(WireError),
    /// The peer answered with a message that makes no sense here.
    #[error("unexpected answer: {0}")]
    Unexpected(String),
    /// A local file could not be read or written.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A TLS or key file is invalid.
    #[error("bad credentials: {0}")]
    Credentials(String),
}

impl TransportError {
    /// True when retrying on a new connection may succeed (the network failed, not the request).
    pub fn is_transient(&self) -> bool {
        match self {
            // A TLS failure (for example a certificate that is not the pinned one) or a protocol
            // violation will fail the same way next time.
            Self::Connection(quinn::ConnectionError::TransportError(_))
            | Self::Connection(quinn::ConnectionError::VersionMismatch) => false,
            Self::Connection(_) | Self::Read(_) | Self::Write(_) | Self::Connect(_) => true,
            _ => false,
        }
    }
}
