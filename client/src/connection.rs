//! The device's connection to the server: QUIC with the pinned certificate, the per-connection
//! proof of the device key, and request/response exchanges.

use std::net::SocketAddr;

use fedtune_shared::protocol::auth::{
    CONNECTION_LABEL, EXPORTER_LABEL, EXPORTER_LEN, connection_proof_message,
};
use fedtune_shared::protocol::{
    AuthenticateRequest, DeviceId, MAX_RESPONSE_FRAME, Request, Response, SigningKey,
};
use fedtune_shared::transport::TransportError;
use fedtune_shared::transport::stream::{read_message, write_message};
use fedtune_shared::transport::tls::{SERVER_NAME, client_config};

/// How long a device waits for the answer to one request (the server answers control
/// requests in milliseconds; aggregation holds a poll at most for the time of one aggregation).
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long a device waits for the server to let it open a stream.
pub const OPEN_STREAM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// An open connection.
pub struct Connection {
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
}

impl Connection {
    /// Connects to `address`, trusting only `pinned_cert_der`.
    pub async fn open(address: SocketAddr, pinned_cert_der: &[u8]) -> Result<Self, TransportError> {
        let config = client_config(pinned_cert_der)?;
        let bind: SocketAddr = if address.is_ipv6() {
            "[::]:0"
                .parse()
                .map_err(|_| TransportError::Connect("bind address".into()))?
        } else {
            "0.0.0.0:0"
                .parse()
                .map_err(|_| TransportError::Connect("bind address".into()))?
        };
        let endpoint =
            quinn::Endpoint::client(bind).map_err(|e| TransportError::Connect(e.to_string()))?;
        Self::open_on(&endpoint, address, config).await
    }

    /// Connects through an existing client endpoint (one UDP socket for many connections: how
    /// a host of many virtual devices connects), with a configuration from
    /// [`fedtune_shared::transport::tls::client_config`].
    pub async fn open_on(
        endpoint: &quinn::Endpoint,
        address: SocketAddr,
        config: quinn::ClientConfig,
    ) -> Result<Self, TransportError> {
        let endpoint = endpoint.clone();
        let connection = endpoint
            .connect_with(config, address, SERVER_NAME)
            .map_err(|e| match e {
                quinn::ConnectError::EndpointStopping | quinn::ConnectError::CidsExhausted => {
                    TransportError::Connect(e.to_string())
                }
                e => TransportError::BadAddress(format!("{address}: {e}")),
            })?
            .await?;
        Ok(Self {
            endpoint,
            connection,
        })
    }

    /// One exchange. A [`Response::Error`] becomes [`TransportError::Refused`]; no answer
    /// within [`REQUEST_TIMEOUT`] is a (transient) read error.
    pub async fn request(&self, request: &Request) -> Result<Response, TransportError> {
        let exchange = async {
            let (mut send, mut recv) = self.open_stream().await?;
            write_message(&mut send, request).await?;
            let _ = send.finish();
            read_message::<Response>(&mut recv, MAX_RESPONSE_FRAME).await
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Err(_) => Err(TransportError::Read("no answer in time".into())),
            Ok(Err(e)) => Err(e),
            Ok(Ok(Response::Error(e))) => Err(TransportError::Refused(e)),
            Ok(Ok(response)) => Ok(response),
        }
    }

    /// Opens a stream for one exchange. A device runs one exchange at a time, so stream credit is
    /// always there on a live connection; waiting longer than [`OPEN_STREAM_TIMEOUT`] means the
    /// server is gone (for example killed before it granted more streams), and the device
    /// reconnects instead of waiting for a keep-alive to find out.
    async fn open_stream(&self) -> Result<(quinn::SendStream, quinn::RecvStream), TransportError> {
        tokio::time::timeout(OPEN_STREAM_TIMEOUT, self.connection.open_bi())
            .await
            .map_err(|_| TransportError::Write("no stream credit from the server".into()))?
            .map_err(TransportError::from)
    }

    /// Proves the device key on this connection.
    pub async fn authenticate(
        &self,
        device: DeviceId,
        key: &SigningKey,
    ) -> Result<(), TransportError> {
        let mut exporter = [0u8; EXPORTER_LEN];
        self.connection
            .export_keying_material(&mut exporter, EXPORTER_LABEL, b"")
            .map_err(|_| TransportError::Connect("TLS exporter unavailable".into()))?;
        let signature = key.sign(CONNECTION_LABEL, &connection_proof_message(&exporter));
        match self
            .request(&Request::Authenticate(AuthenticateRequest {
                device,
                signature,
            }))
            .await?
        {
            Response::Authenticated => Ok(()),
            other => Err(TransportError::Unexpected(format!("{other:?}"))),
        }
    }

    /// The underlying QUIC connection (to open raw streams, e.g. in tests of hostile input).
    pub fn quic(&self) -> &quinn::Connection {
        &self.connection
    }

    /// Closes the connection and waits until the server knows.
    pub async fn close(self) {
        self.connection.close(0u32.into(), b"bye");
        self.endpoint.wait_idle().await;
    }
}

impl Connection {
    /// Downloads `len - offset` bytes of blob `digest` from `offset`, appending them to `path`.
    /// Returns the bytes the file then holds past `offset`.
    pub async fn download(
        &self,
        digest: fedtune_shared::protocol::Digest,
        offset: u64,
        len: u64,
        path: &std::path::Path,
    ) -> Result<u64, TransportError> {
        let (mut send, mut recv) = self.open_stream().await?;
        write_message(&mut send, &Request::Download { digest, offset }).await?;
        let _ = send.finish();
        let header = tokio::time::timeout(
            REQUEST_TIMEOUT,
            read_message::<Response>(&mut recv, MAX_RESPONSE_FRAME),
        )
        .await
        .map_err(|_| TransportError::Read("no answer in time".into()))??;
        match header {
            Response::Blob {
                total,
                offset: from,
            } if total == len && from == offset => {
                fedtune_shared::transport::stream::receive_to_file(&mut recv, path, len - offset)
                    .await
            }
            Response::Error(e) => Err(TransportError::Refused(e)),
            other => Err(TransportError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Uploads `bytes` (blob `digest`) from `offset`; returns the server's answer
    /// (`Uploaded`, or `UploadOffset` with what it holds).
    pub async fn upload(
        &self,
        digest: fedtune_shared::protocol::Digest,
        bytes: &[u8],
        offset: u64,
    ) -> Result<Response, TransportError> {
        let (mut send, mut recv) = self.open_stream().await?;
        let total = bytes.len() as u64;
        write_message(
            &mut send,
            &Request::Upload {
                digest,
                total,
                offset,
            },
        )
        .await?;
        let start = (offset as usize).min(bytes.len());
        // The server may refuse before reading the bytes (too large, not authenticated) and
        // stop the stream: its answer still explains why, so read it whatever the write did.
        let sent = fedtune_shared::transport::stream::send_bytes(&mut send, &bytes[start..]).await;
        let _ = send.finish();
        let answer = tokio::time::timeout(
            REQUEST_TIMEOUT,
            read_message::<Response>(&mut recv, MAX_RESPONSE_FRAME),
        )
        .await
        .map_err(|_| TransportError::Read("no answer in time".into()));
        match (answer, sent) {
            (Ok(Ok(Response::Error(e))), _) => Err(TransportError::Refused(e)),
            // A server that holds a different offset answers and stops reading: its answer
            // stands even though the rest of the write was refused.
            (Ok(Ok(other)), _) => Ok(other),
            (_, Err(e)) => Err(e),
            (Ok(Err(e)), Ok(())) | (Err(e), Ok(())) => Err(e),
        }
    }
}
