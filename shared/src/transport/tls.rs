//! TLS 1.3 for QUIC with ring as the only crypto provider. The device trusts exactly one
//! certificate, the server's, pinned in its configuration: no system roots, no CA can
//! impersonate the server.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::TransportError;

/// The ALPN protocol id; a peer that does not offer it is refused during the handshake.
pub const ALPN: &[u8] = b"fedtune/1";

/// The name the server's certificate carries and the device asks for.
pub const SERVER_NAME: &str = "fedtune";

/// A connection with no traffic for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Keep-alives well inside the idle timeout keep NAT bindings of polling devices open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Requests a device may have in flight on one connection (poll, download, upload, report).
const MAX_STREAMS_PER_CONNECTION: u32 = 16;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    // Both values are far inside QUIC's limits, so the conversions cannot fail.
    transport.max_idle_timeout(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    transport.max_concurrent_bidi_streams(MAX_STREAMS_PER_CONNECTION.into());
    transport.max_concurrent_uni_streams(0u32.into());
    Arc::new(transport)
}

/// The server's QUIC configuration from its certificate and PKCS#8 private key (DER).
pub fn server_config(
    cert_der: &[u8],
    key_pkcs8_der: &[u8],
) -> Result<quinn::ServerConfig, TransportError> {
    let cert = CertificateDer::from(cert_der.to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8_der.to_vec()));
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Credentials(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .map_err(|e| TransportError::Credentials(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto =
        QuicServerConfig::try_from(tls).map_err(|e| TransportError::Credentials(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport_config());
    Ok(config)
}

/// A device's QUIC configuration trusting only `pinned_cert_der`.
pub fn client_config(pinned_cert_der: &[u8]) -> Result<quinn::ClientConfig, TransportError> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(pinned_cert_der.to_vec()))
        .map_err(|e| TransportError::Credentials(format!("pinned certificate: {e}")))?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Credentials(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto =
        QuicClientConfig::try_from(tls).map_err(|e| TransportError::Credentials(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport_config());
    Ok(config)
}
