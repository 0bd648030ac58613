//! TLS for the rendezvous (1.3 only, ring as the provider): the server's self-signed certificate,
//! made per job, and the client's verifier that accepts it. The certificate cannot be checked
//! against anything, so the token proofs (see [`super::net`]) authenticate the server; the
//! handshake signatures are still verified, so the keying material the proofs bind to belongs to
//! the key that signed the handshake.

use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};

use super::proto::ALPN;
use super::RdzvError;

/// The TLS server name clients ask for (the certificate carries it; nothing resolves it).
pub(super) const SERVER_NAME: &str = "ddetr-rdzv";

fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server's QUIC crypto: a fresh self-signed certificate for [`SERVER_NAME`], offering
/// [`ALPN`].
pub(super) fn server_crypto() -> Result<QuicServerConfig, RdzvError> {
    let certified = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])
        .map_err(|e| RdzvError::Tls(e.to_string()))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    let mut tls = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| RdzvError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)
        .map_err(|e| RdzvError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    QuicServerConfig::try_from(tls).map_err(|e| RdzvError::Tls(e.to_string()))
}

/// The client's QUIC crypto, asking for `alpn` ([`ALPN`]; tests ask for others) and accepting
/// the server's certificate through [`TokenAuthenticated`].
pub(super) fn client_crypto(alpn: &[u8]) -> Result<QuicClientConfig, RdzvError> {
    let provider = crypto_provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| RdzvError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(TokenAuthenticated(provider)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    QuicClientConfig::try_from(tls).map_err(|e| RdzvError::Tls(e.to_string()))
}

/// Accepts the per-job self-signed certificate; the token proofs authenticate the server.
/// Handshake signatures are still verified, so the keying material is bound to the key that
/// signed it.
#[derive(Debug)]
struct TokenAuthenticated(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for TokenAuthenticated {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
