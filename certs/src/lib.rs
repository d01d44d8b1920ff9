//! Identity for Hufu: province CAs, SPIFFE-style certificate identities, and
//! the rustls configurations that enforce "a certificate is accepted only
//! when it chains to the CA of the province its SAN names".
//!
//! Crypto is aws-lc-rs throughout (rcgen for issuing, rustls for TLS).

mod anchors;
mod authority;
mod error;
mod identity;
mod province;
mod tls;

pub use anchors::TrustAnchors;
pub use authority::{
    CertificateAuthority, IssuedCert, LeafOptions, ca_province, certificate_serial, not_after,
    parse_serial, renewal_of, write_private_file,
};
pub use error::CertError;
pub use identity::{Identity, Role, ca_uri};
pub use province::Province;
pub use tls::{client_config, crypto_provider, peer_identity, server_config};
