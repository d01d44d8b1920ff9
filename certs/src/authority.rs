//! A province's certificate authority: made once at `hufu init`, then used to
//! issue node, terminal, admin and auditor certificates of that province.
//!
//! Keys are ECDSA P-256 (aws-lc-rs through rcgen), which every TLS stack and
//! gRPC client accepts.

use std::fmt;
use std::fs::Permissions;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, DnsName};
use time::{Duration, OffsetDateTime};

use crate::identity::{ca_uri, hufu_uri, parse_ca_uri};
use crate::{CertError, Identity, Province, Role};

/// Ten years: a province CA outlives many leaf rotations, and replacing it
/// means a new trust list version signed by the other members.
const CA_VALIDITY: Duration = Duration::days(3653);
/// Backdating absorbs clock skew between provinces' machines.
const BACKDATE: Duration = Duration::hours(1);
const LEAF_VALIDITY: Duration = Duration::days(365);
/// Terminals are many, sit in public places and get lost or stolen: their
/// certificates are short-lived by default and renewed with
/// `hufu certs renew`.
const TERMINAL_VALIDITY: Duration = Duration::days(30);

/// One province's CA: its self-signed certificate and private key.
pub struct CertificateAuthority {
    province: Province,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for CertificateAuthority {
    // The private key stays out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("province", &self.province)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// A new self-signed CA for `province`, valid for ten years, whose
    /// certificate names its province in the URI SAN
    /// `spiffe://hufu/province/<code>/ca`.
    pub fn generate(province: Province) -> Result<Self, CertError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("Hufu {} CA", province.name()));
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Hufu");
        // Leaves are signed directly by the province CA: no intermediates.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.subject_alt_names = vec![SanType::URI(ca_uri(province).try_into()?)];
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_VALIDITY;
        let cert = params.self_signed(&key)?;
        Ok(CertificateAuthority {
            province,
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA saved with [`cert_pem`](Self::cert_pem) and
    /// [`key_pem`](Self::key_pem). The certificate must be a Hufu CA and the
    /// key must be its key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let cert_der = single_cert_from_pem(cert_pem)?;
        let province = ca_province(&cert_der)?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| CertError::BadKey(e.to_string()))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| CertError::BadCertificate(e.to_string()))?;
        if parsed.tbs_certificate.subject_pki.raw != key.subject_public_key_info().as_slice() {
            return Err(CertError::KeyMismatch);
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        Ok(CertificateAuthority {
            province,
            cert_der,
            cert_pem: cert_pem.to_owned(),
            issuer,
        })
    }

    /// The province this CA speaks for.
    pub fn province(&self) -> Province {
        self.province
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The CA private key, PKCS#8 PEM. Store it with [`write_private_file`].
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The CA certificate, DER: what goes into [`TrustAnchors`](crate::TrustAnchors).
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    /// Issues a leaf certificate with a fresh key for `identity`, which must
    /// belong to this CA's province.
    pub fn issue(&self, identity: &Identity, opts: &LeafOptions) -> Result<IssuedCert, CertError> {
        if identity.province != self.province {
            return Err(CertError::ForeignIdentity {
                ca: self.province,
                identity: Box::new(identity.clone()),
            });
        }
        self.issue_unchecked(identity, opts)
    }

    /// Test/adversarial helper: signs a leaf for any identity, without the
    /// province check, to show that peers refuse what a CA must not mint.
    pub fn issue_unchecked(
        &self,
        identity: &Identity,
        opts: &LeafOptions,
    ) -> Result<IssuedCert, CertError> {
        if opts.not_after <= opts.not_before {
            return Err(CertError::InvalidValidity {
                not_before: opts.not_before,
                not_after: opts.not_after,
            });
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, identity.name.as_str());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match identity.role {
            Role::Node => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            Role::Terminal | Role::Admin | Role::Auditor => {
                vec![ExtendedKeyUsagePurpose::ClientAuth]
            }
        };
        params.subject_alt_names = vec![SanType::URI(identity.uri().try_into()?)];
        for name in &opts.dns_names {
            // Checked here because webpki refuses a whole certificate with a
            // malformed DNS SAN, far from where the name was typed.
            DnsName::try_from(name.as_str())
                .map_err(|_| CertError::InvalidDnsName(name.clone()))?;
            params
                .subject_alt_names
                .push(SanType::DnsName(name.clone().try_into()?));
        }
        params
            .subject_alt_names
            .extend(opts.ip_addresses.iter().copied().map(SanType::IpAddress));
        params.use_authority_key_identifier_extension = true;
        params.not_before = opts.not_before;
        params.not_after = opts.not_after;

        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// The province a CA certificate speaks for, read from its
/// `spiffe://hufu/province/<code>/ca` URI SAN. Also checks that it is a CA.
pub fn ca_province(cert_der: &[u8]) -> Result<Province, CertError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| CertError::BadCertificate(e.to_string()))?;
    if !cert.is_ca() {
        return Err(CertError::NotACa);
    }
    parse_ca_uri(&hufu_uri(cert_der)?)
}

/// What renewing `cert_der` issues: the same identity and, for a node, the
/// same DNS names and IP addresses, with a fresh default validity for its
/// role.
pub fn renewal_of(cert_der: &[u8]) -> Result<(Identity, LeafOptions), CertError> {
    let identity = Identity::from_cert_der(cert_der)?;
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| CertError::BadCertificate(e.to_string()))?;
    let mut opts = LeafOptions::for_role(identity.role);
    if identity.role == Role::Node {
        let san = cert
            .subject_alternative_name()
            .map_err(|e| CertError::BadCertificate(e.to_string()))?;
        for name in san.iter().flat_map(|ext| ext.value.general_names.iter()) {
            match name {
                x509_parser::extensions::GeneralName::DNSName(dns) => {
                    opts.dns_names.push((*dns).to_owned())
                }
                x509_parser::extensions::GeneralName::IPAddress(ip) => {
                    if let Ok(v4) = <[u8; 4]>::try_from(*ip) {
                        opts.ip_addresses.push(IpAddr::from(v4));
                    } else if let Ok(v6) = <[u8; 16]>::try_from(*ip) {
                        opts.ip_addresses.push(IpAddr::from(v6));
                    }
                }
                _ => {}
            }
        }
    }
    Ok((identity, opts))
}

/// A certificate's serial number as revocation lists name it: lowercase
/// hex, without separators or leading zero bytes.
pub fn certificate_serial(cert_der: &[u8]) -> Result<String, CertError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| CertError::BadCertificate(e.to_string()))?;
    Ok(serial_hex(cert.raw_serial()))
}

/// A serial typed by an operator (`0A:1b:…`, `0a1b…`) in the form of
/// [`certificate_serial`].
pub fn parse_serial(text: &str) -> Result<String, CertError> {
    let digits: String = text
        .trim()
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let bad = || CertError::BadSerial(text.to_owned());
    if digits.is_empty() || digits.len() > 66 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let padded = if digits.len() % 2 == 1 {
        format!("0{digits}")
    } else {
        digits
    };
    let bytes = (0..padded.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&padded[i..i + 2], 16).map_err(|_| bad()))
        .collect::<Result<Vec<u8>, _>>()?;
    Ok(serial_hex(&bytes))
}

fn serial_hex(bytes: &[u8]) -> String {
    let start = bytes
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(bytes.len().saturating_sub(1));
    bytes[start..].iter().map(|b| format!("{b:02x}")).collect()
}

/// When a certificate stops being valid, as unix seconds: for expiry
/// metrics and alerts.
pub fn not_after(cert_der: &[u8]) -> Result<i64, CertError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| CertError::BadCertificate(e.to_string()))?;
    Ok(cert.validity().not_after.timestamp())
}

/// Names and validity of a leaf certificate.
#[derive(Clone, Debug)]
pub struct LeafOptions {
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<IpAddr>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Default for LeafOptions {
    /// No DNS or IP names, valid from an hour ago for a year.
    fn default() -> Self {
        let now = OffsetDateTime::now_utc();
        LeafOptions {
            dns_names: Vec::new(),
            ip_addresses: Vec::new(),
            not_before: now - BACKDATE,
            not_after: now + LEAF_VALIDITY,
        }
    }
}

impl LeafOptions {
    /// The default validity for `role`: 30 days for terminals, a year for
    /// the rest.
    pub fn for_role(role: Role) -> Self {
        let mut opts = LeafOptions::default();
        if role == Role::Terminal {
            opts.not_after = opts.not_before + BACKDATE + TERMINAL_VALIDITY;
        }
        opts
    }

    /// Options for a node reached at `hosts` (IP addresses or DNS names),
    /// so that ordinary gRPC clients can verify it. With no hosts, the node
    /// is reachable as `localhost`, `127.0.0.1` and `::1`.
    pub fn for_node(hosts: &[String]) -> Self {
        let mut opts = LeafOptions::default();
        if hosts.is_empty() {
            opts.dns_names.push("localhost".to_owned());
            opts.ip_addresses = vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()];
            return opts;
        }
        for host in hosts {
            let host = host.trim();
            // Accept the bracketed IPv6 form people copy from URLs.
            let bare = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host);
            match bare.parse::<IpAddr>() {
                Ok(ip) => opts.ip_addresses.push(ip),
                Err(_) => opts.dns_names.push(host.to_owned()),
            }
        }
        opts
    }
}

/// A freshly issued leaf: its certificate (the leaf alone) and its PKCS#8
/// private key, both PEM.
#[derive(Clone)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for IssuedCert {
    // The private key stays out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

impl IssuedCert {
    /// Writes the certificate (mode 0644) and the key (mode 0600), creating
    /// parent directories.
    pub fn write(&self, cert_path: &Path, key_path: &Path) -> Result<(), CertError> {
        write_file(cert_path, self.cert_pem.as_bytes(), 0o644)?;
        write_private_file(key_path, self.key_pem.as_bytes())
    }
}

/// Writes a secret with mode 0600, creating parent directories.
///
/// The file is created under a temporary name with mode 0600 from the start
/// and then renamed into place, so the secret is never readable by others,
/// even briefly, and a crash never leaves half a key behind. An existing
/// file is replaced, whatever its mode was.
pub fn write_private_file(path: &Path, contents: &[u8]) -> Result<(), CertError> {
    write_file(path, contents, 0o600)
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    let io_err = |source| CertError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(io_err)?;
    // tempfile opens with O_CREAT|O_EXCL and this mode (OpenOptionsExt::mode).
    let mut file = tempfile::Builder::new()
        .prefix(".hufu-")
        .suffix(".tmp")
        .permissions(Permissions::from_mode(mode))
        .tempfile_in(dir)
        .map_err(io_err)?;
    file.write_all(contents).map_err(io_err)?;
    file.as_file().sync_all().map_err(io_err)?;
    file.persist(path).map_err(|e| io_err(e.error))?;
    Ok(())
}

fn single_cert_from_pem(pem: &str) -> Result<CertificateDer<'static>, CertError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CertError::Pem {
            what: "certificate",
            source,
        })?;
    match <[_; 1]>::try_from(certs) {
        Ok([cert]) => Ok(cert),
        Err(certs) if certs.is_empty() => Err(CertError::MissingPem {
            what: "CERTIFICATE",
        }),
        Err(certs) => Err(CertError::SeveralCaCertificates(certs.len())),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use x509_parser::extensions::GeneralName;

    use super::*;

    fn gd() -> Province {
        Province::parse("440000").unwrap()
    }

    #[test]
    fn ca_names_its_province() {
        let ca = CertificateAuthority::generate(gd()).unwrap();
        assert_eq!(ca.province(), gd());
        assert_eq!(ca_province(&ca.cert_der()).unwrap(), gd());
        let der = ca.cert_der();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(
            cert.subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            "Hufu Guangdong CA"
        );
        assert!(cert.is_ca());
    }

    #[test]
    fn ca_round_trips_through_pem() {
        let ca = CertificateAuthority::generate(gd()).unwrap();
        let loaded = CertificateAuthority::from_pem(&ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(loaded.province(), gd());
        assert_eq!(loaded.cert_der(), ca.cert_der());
        assert!(ca.key_pem().starts_with("-----BEGIN PRIVATE KEY-----"));

        let other = CertificateAuthority::generate(gd()).unwrap();
        let err = CertificateAuthority::from_pem(&ca.cert_pem(), &other.key_pem()).unwrap_err();
        assert!(matches!(err, CertError::KeyMismatch), "{err}");
    }

    #[test]
    fn a_leaf_is_not_a_ca() {
        let ca = CertificateAuthority::generate(gd()).unwrap();
        let id = Identity::new(gd(), Role::Node, "gd-1").unwrap();
        let leaf = ca.issue(&id, &LeafOptions::default()).unwrap();
        let err = CertificateAuthority::from_pem(&leaf.cert_pem, &leaf.key_pem).unwrap_err();
        assert!(matches!(err, CertError::NotACa), "{err}");
    }

    #[test]
    fn leaves_carry_identity_names_and_usages() {
        let ca = CertificateAuthority::generate(gd()).unwrap();
        let id = Identity::new(gd(), Role::Node, "gd-1").unwrap();
        let opts = LeafOptions::for_node(&["node1.gd.example".into(), "10.0.0.1".into()]);
        let leaf = ca.issue(&id, &opts).unwrap();
        let der = CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).unwrap();
        assert_eq!(Identity::from_cert_der(&der).unwrap(), id);

        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(
            cert.subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            "gd-1"
        );
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let sans = &cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names;
        assert!(sans.contains(&GeneralName::DNSName("node1.gd.example")));
        assert!(sans.contains(&GeneralName::IPAddress(&[10, 0, 0, 1])));

        let terminal = Identity::new(gd(), Role::Terminal, "t1").unwrap();
        let leaf = ca.issue(&terminal, &LeafOptions::default()).unwrap();
        let der = CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
    }

    #[test]
    fn refuses_foreign_identities_and_bad_options() {
        let ca = CertificateAuthority::generate(gd()).unwrap();
        let sn = Identity::new(Province::parse("610000").unwrap(), Role::Node, "sn-1").unwrap();
        let err = ca.issue(&sn, &LeafOptions::default()).unwrap_err();
        assert!(matches!(err, CertError::ForeignIdentity { .. }), "{err}");
        assert!(err.to_string().contains("610000"), "{err}");

        let id = Identity::new(gd(), Role::Node, "gd-1").unwrap();
        let bad_dns = LeafOptions::for_node(&["not a host".into()]);
        assert!(matches!(
            ca.issue(&id, &bad_dns).unwrap_err(),
            CertError::InvalidDnsName(_)
        ));
        let mut backwards = LeafOptions::default();
        backwards.not_after = backwards.not_before;
        assert!(matches!(
            ca.issue(&id, &backwards).unwrap_err(),
            CertError::InvalidValidity { .. }
        ));
    }

    #[test]
    fn for_node_sorts_hosts_and_has_defaults() {
        let opts = LeafOptions::for_node(&[]);
        assert_eq!(opts.dns_names, ["localhost"]);
        assert_eq!(
            opts.ip_addresses,
            [
                "127.0.0.1".parse::<IpAddr>().unwrap(),
                "::1".parse().unwrap()
            ]
        );
        let opts = LeafOptions::for_node(&["gd.example".into(), "[::1]".into(), "10.1.2.3".into()]);
        assert_eq!(opts.dns_names, ["gd.example"]);
        assert_eq!(opts.ip_addresses.len(), 2);
    }

    #[test]
    fn key_files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate(gd()).unwrap();
        let id = Identity::new(gd(), Role::Admin, "ops").unwrap();
        let leaf = ca.issue(&id, &LeafOptions::default()).unwrap();
        let cert_path = dir.path().join("a/b/admin.pem");
        let key_path = dir.path().join("a/b/admin.key");
        // A pre-existing world-readable file is replaced, not reused.
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(&key_path, "old").unwrap();
        std::fs::set_permissions(&key_path, Permissions::from_mode(0o644)).unwrap();

        leaf.write(&cert_path, &key_path).unwrap();
        assert_eq!(std::fs::metadata(&key_path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(&key_path).unwrap(), leaf.key_pem);
        assert_eq!(std::fs::read_to_string(&cert_path).unwrap(), leaf.cert_pem);

        let secret = dir.path().join("secret");
        write_private_file(&secret, b"s3cret").unwrap();
        assert_eq!(std::fs::metadata(&secret).unwrap().mode() & 0o777, 0o600);
    }

    #[test]
    fn serials_read_and_typed_agree() {
        let ca = CertificateAuthority::generate(gd()).unwrap();
        let id = Identity::new(gd(), Role::Terminal, "gate").unwrap();
        let leaf = ca
            .issue(&id, &LeafOptions::for_role(Role::Terminal))
            .unwrap();
        let der = CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).unwrap();
        let serial = certificate_serial(&der).unwrap();
        assert!(!serial.is_empty() && !serial.starts_with("00"), "{serial}");
        let typed: Vec<String> = serial
            .as_bytes()
            .chunks(2)
            .map(|c| String::from_utf8(c.to_vec()).unwrap().to_uppercase())
            .collect();
        assert_eq!(parse_serial(&typed.join(":")).unwrap(), serial);
        assert_eq!(parse_serial(&format!("00{serial}")).unwrap(), serial);
        assert_eq!(parse_serial("abc").unwrap(), "0abc");
        assert!(parse_serial("xyz").is_err());
        assert!(parse_serial("").is_err());

        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let days = (cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp())
            / 86_400;
        assert_eq!(days, 30, "a terminal certificate lives 30 days by default");
    }
}
