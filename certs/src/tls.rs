//! rustls configurations for mutual TLS between Hufu nodes and their callers.
//!
//! The rule from DESIGN.md, "Identities": a certificate is accepted only when
//! it chains to the CA of the province its URI SAN names. Plain webpki with
//! all CAs as roots would let one province's CA mint identities of another,
//! so both verifiers here read the identity first, then run webpki against
//! that one province's CA alone.

use std::fmt;
use std::sync::{Arc, OnceLock};

use rustls::client::Resumption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::NoServerSessionStorage;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    ServerConfig, SignatureScheme,
};

use crate::{CertError, Identity, Province, Role, TrustAnchors};

/// gRPC runs over HTTP/2 only.
const ALPN_H2: &[u8] = b"h2";

/// The aws-lc-rs provider, passed explicitly so that no process-wide default
/// has to be installed and ring is never used.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}

/// Server config for a node: requires a client certificate, accepted only
/// if it names a province P in its Hufu URI SAN and its chain verifies
/// (validity, EKU clientAuth) against P's CA alone. The anchors are read at
/// each handshake, so [`TrustAnchors::replace`] takes effect for new
/// connections. ALPN: `h2`.
///
/// `cert_chain_pem` must start with this node's own certificate.
pub fn server_config(
    anchors: Arc<TrustAnchors>,
    cert_chain_pem: &str,
    key_pem: &str,
) -> Result<Arc<ServerConfig>, CertError> {
    let (chain, key) = load_cert_and_key(cert_chain_pem, key_pem)?;
    let own = Identity::from_cert_der(&chain[0])?;
    if own.role != Role::Node {
        return Err(CertError::NotANode(own.role));
    }
    let provider = anchors.provider().clone();
    let verifier = Arc::new(ProvinceClientVerifier { anchors });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // A resumed session skips certificate verification, so it would outlive
    // a TrustAnchors::replace that removed the peer's province. gRPC
    // connections are long-lived, so full handshakes cost little.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Client config for talking to a node of `expected` province: the server
/// must present a certificate for `spiffe://hufu/province/<expected>/node/…`
/// that chains to `expected`'s CA alone and is valid for the server name
/// dialled (the usual webpki host name or IP check). The client presents
/// `cert_chain_pem`. ALPN: `h2`.
pub fn client_config(
    anchors: Arc<TrustAnchors>,
    expected: Province,
    cert_chain_pem: &str,
    key_pem: &str,
) -> Result<Arc<ClientConfig>, CertError> {
    let (chain, key) = load_cert_and_key(cert_chain_pem, key_pem)?;
    // Fail now rather than at every handshake if this is not a Hufu cert.
    Identity::from_cert_der(&chain[0])?;
    let provider = anchors.provider().clone();
    let verifier = Arc::new(ProvinceServerVerifier { anchors, expected });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // As on the server: every connection verifies against the current anchors.
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// The identity of a peer from the leaf of the chain it presented. Use it on
/// chains the handshake has verified, e.g. `ServerConnection::peer_certificates`.
pub fn peer_identity(certs: &[CertificateDer<'_>]) -> Result<Identity, CertError> {
    let leaf = certs.first().ok_or(CertError::NoPeerCertificate)?;
    Identity::from_cert_der(leaf)
}

/// Verifies client certificates against the CA of the province they name.
#[derive(Debug)]
struct ProvinceClientVerifier {
    anchors: Arc<TrustAnchors>,
}

impl ClientCertVerifier for ProvinceClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.anchors.snapshot().hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let identity = Identity::from_cert_der(end_entity).map_err(refuse)?;
        let anchors = self.anchors.snapshot();
        let anchor = anchors
            .get(identity.province)
            .ok_or_else(|| refuse(CertError::NoAnchor(identity.province)))?;
        let verified = anchor
            .client
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(
                |e| tracing::debug!(%identity, error = %e, "client certificate refused"),
            )?;
        anchor
            .check_path_len(
                end_entity,
                intermediates,
                now,
                webpki::KeyUsage::client_auth(),
                &self.algorithms(),
            )
            .map_err(refuse)
            .inspect_err(
                |e| tracing::debug!(%identity, error = %e, "client certificate refused"),
            )?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms().supported_schemes()
    }
}

impl ProvinceClientVerifier {
    fn algorithms(&self) -> rustls::crypto::WebPkiSupportedAlgorithms {
        self.anchors.provider().signature_verification_algorithms
    }
}

/// Verifies that the server is a node of the expected province, certified
/// by that province's CA.
#[derive(Debug)]
struct ProvinceServerVerifier {
    anchors: Arc<TrustAnchors>,
    expected: Province,
}

impl ServerCertVerifier for ProvinceServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let identity = Identity::from_cert_der(end_entity).map_err(refuse)?;
        if identity.province != self.expected || identity.role != Role::Node {
            return Err(refuse(CertError::UnexpectedPeer {
                expected: self.expected,
                found: identity.to_string(),
            }));
        }
        let anchors = self.anchors.snapshot();
        let anchor = anchors
            .get(self.expected)
            .ok_or_else(|| refuse(CertError::NoAnchor(self.expected)))?;
        let verified = anchor.server.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        anchor
            .check_path_len(
                end_entity,
                intermediates,
                now,
                webpki::KeyUsage::server_auth(),
                &self.algorithms(),
            )
            .map_err(refuse)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms().supported_schemes()
    }
}

impl ProvinceServerVerifier {
    fn algorithms(&self) -> rustls::crypto::WebPkiSupportedAlgorithms {
        self.anchors.provider().signature_verification_algorithms
    }
}

/// A certificate refusal that carries our message into the TLS error.
fn refuse(error: CertError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Refusal(
        error,
    )))))
}

/// rustls prints `CertificateError::Other` with `{:?}`, so this wrapper's
/// `Debug` is the readable message rather than the enum's structure.
struct Refusal(CertError);

impl fmt::Debug for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for Refusal {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

fn load_cert_and_key(
    cert_chain_pem: &str,
    key_pem: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CertError> {
    let chain = CertificateDer::pem_slice_iter(cert_chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CertError::Pem {
            what: "certificate chain",
            source,
        })?;
    if chain.is_empty() {
        return Err(CertError::MissingPem {
            what: "CERTIFICATE",
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| match e {
        pem::Error::NoItemsFound => CertError::MissingPem {
            what: "PRIVATE KEY",
        },
        source => CertError::Pem {
            what: "private key",
            source,
        },
    })?;
    Ok((chain, key))
}
