//! The one error type of `hufu-certs`.
//!
//! Messages are lowercase and say what went wrong and what to do, because they
//! end up in operators' terminals and in TLS handshake failures.

use std::path::PathBuf;

use crate::{Province, Role};

/// Everything that can go wrong with provinces, identities, certificates and
/// TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("malformed province code {0:?}: expected six digits, such as 440000")]
    MalformedProvince(String),

    #[error("unknown province {0}: not a GB/T 2260 provincial code")]
    UnknownProvince(String),

    #[error("unknown role {0:?}: expected node, terminal, admin or auditor")]
    UnknownRole(String),

    #[error(
        "invalid identity name {name:?}: {reason}; use 1 to 64 characters of a-z, 0-9, '.', '_' and '-'"
    )]
    InvalidName { name: String, reason: &'static str },

    #[error(
        "invalid identity uri {uri:?}: {reason}; expected spiffe://hufu/province/<code>/<role>/<name>"
    )]
    InvalidUri { uri: String, reason: &'static str },

    #[error("invalid ca uri {0:?}: expected spiffe://hufu/province/<code>/ca")]
    InvalidCaUri(String),

    #[error("cannot parse certificate: {0}")]
    BadCertificate(String),

    #[error("certificate carries no spiffe://hufu/ uri san: it is not a hufu certificate")]
    NoIdentity,

    #[error("certificate carries {0} spiffe://hufu/ uri sans: exactly one is allowed")]
    SeveralIdentities(usize),

    #[error("certificate is not a ca (basic constraints): use a province ca certificate")]
    NotACa,

    #[error("cannot read private key: {0}; expected a pem 'PRIVATE KEY' (pkcs#8) block")]
    BadKey(String),

    #[error("ca pem holds {0} certificates: give only the ca certificate")]
    SeveralCaCertificates(usize),

    #[error(
        "the ca certificate and private key do not match: check that both files belong to one ca"
    )]
    KeyMismatch,

    #[error(
        "ca of province {ca} cannot issue a certificate for {identity}: use the ca of province {}",
        identity.province
    )]
    ForeignIdentity {
        ca: Province,
        identity: Box<crate::Identity>,
    },

    #[error("invalid dns name {0:?} for a certificate: use a hostname such as node1.example.org")]
    InvalidDnsName(String),

    #[error(
        "invalid validity period: not_after ({not_after}) must be later than not_before ({not_before})"
    )]
    InvalidValidity {
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    },

    #[error("two trust anchors for province {0}: keep one ca certificate per province")]
    DuplicateAnchor(Province),

    #[error("no trust anchor for province {0}: the province is not (or no longer) trusted")]
    NoAnchor(Province),

    #[error(
        "peer is {found}, but a node of province {expected} was expected: check the endpoint address"
    )]
    UnexpectedPeer { expected: Province, found: String },

    #[error("a node certificate is required here, got a {0} certificate: issue one with role node")]
    NotANode(Role),

    #[error(
        "certificate chain goes through a sub-ca, but the province ca allows {max} below it (pathlen:{max}): issue the certificate from the province ca itself ({detail})"
    )]
    PathLen { max: u32, detail: String },

    #[error(
        "invalid certificate serial {0:?}: give it in hex, as `hufu certs show` prints it (colons allowed)"
    )]
    BadSerial(String),

    #[error("peer presented no certificate")]
    NoPeerCertificate,

    #[error("no {what} found in pem input: check the file holds a pem '{what}' block")]
    MissingPem { what: &'static str },

    #[error("cannot read pem {what}: {source}")]
    Pem {
        what: &'static str,
        #[source]
        source: rustls::pki_types::pem::Error,
    },

    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),

    #[error("cannot build tls configuration: {0}")]
    Tls(#[from] rustls::Error),

    #[error("cannot build certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),

    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
