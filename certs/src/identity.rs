//! SPIFFE-style identities: who a certificate speaks for.
//!
//! Every Hufu certificate carries exactly one URI SAN of the form
//! `spiffe://hufu/province/<code>/<role>/<name>`; authorization is decided on
//! that identity alone, so parsing it is strict.

use std::fmt;
use std::str::FromStr;

use x509_parser::extensions::GeneralName;

use crate::{CertError, Province};

/// Every Hufu URI starts with this; any URI SAN with it must parse.
const HUFU_PREFIX: &str = "spiffe://hufu/";
const PROVINCE_PREFIX: &str = "spiffe://hufu/province/";
const MAX_NAME_LEN: usize = 64;

/// What a certificate holder may do (see DESIGN.md, "Identities").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// A province's node: serves clients and talks to peer nodes.
    Node,
    /// A checkpoint terminal or app backend that verifies codes.
    Terminal,
    /// A provincial operator using the admin API.
    Admin,
    /// A reader of the audit log.
    Auditor,
}

impl Role {
    /// The lowercase name used in URIs and on the command line.
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Node => "node",
            Role::Terminal => "terminal",
            Role::Admin => "admin",
            Role::Auditor => "auditor",
        }
    }
}

impl FromStr for Role {
    type Err = CertError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "node" => Ok(Role::Node),
            "terminal" => Ok(Role::Terminal),
            "admin" => Ok(Role::Admin),
            "auditor" => Ok(Role::Auditor),
            _ => Err(CertError::UnknownRole(s.to_owned())),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A certificate holder: a named node, terminal, admin or auditor of a province.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    pub province: Province,
    pub role: Role,
    pub name: String,
}

impl Identity {
    /// An identity with a checked name: 1 to 64 characters of `[a-z0-9._-]`.
    pub fn new(province: Province, role: Role, name: &str) -> Result<Identity, CertError> {
        check_name(name)?;
        Ok(Identity {
            province,
            role,
            name: name.to_owned(),
        })
    }

    /// The URI SAN, such as `spiffe://hufu/province/440000/node/gd-1`.
    pub fn uri(&self) -> String {
        format!(
            "{PROVINCE_PREFIX}{}/{}/{}",
            self.province, self.role, self.name
        )
    }

    /// Parses a URI made by [`Identity::uri`]; anything else is an error.
    pub fn parse_uri(uri: &str) -> Result<Identity, CertError> {
        let invalid = |reason| CertError::InvalidUri {
            uri: uri.to_owned(),
            reason,
        };
        let rest = uri
            .strip_prefix(PROVINCE_PREFIX)
            .ok_or_else(|| invalid("it does not start with spiffe://hufu/province/"))?;
        let mut parts = rest.split('/');
        let (Some(code), Some(role), Some(name), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid("it needs exactly three segments after /province/"));
        };
        let province = Province::parse(code).map_err(|_| invalid("bad province code"))?;
        let role = role
            .parse()
            .map_err(|_| invalid("role must be node, terminal, admin or auditor"))?;
        check_name(name).map_err(|_| invalid("bad name"))?;
        Ok(Identity {
            province,
            role,
            name: name.to_owned(),
        })
    }

    /// The identity in a DER certificate: its one `spiffe://hufu/` URI SAN.
    ///
    /// This only reads the certificate; it does not say the certificate is
    /// trusted. Call it on chains that TLS has already verified.
    pub fn from_cert_der(der: &[u8]) -> Result<Identity, CertError> {
        let uri = hufu_uri(der)?;
        Identity::parse_uri(&uri)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

/// The URI SAN a province's CA certificate carries, so that a CA names its
/// province itself: `spiffe://hufu/province/<code>/ca`.
pub fn ca_uri(province: Province) -> String {
    format!("{PROVINCE_PREFIX}{province}/ca")
}

/// Parses a URI made by [`ca_uri`].
pub(crate) fn parse_ca_uri(uri: &str) -> Result<Province, CertError> {
    uri.strip_prefix(PROVINCE_PREFIX)
        .and_then(|rest| rest.strip_suffix("/ca"))
        .and_then(|code| Province::parse(code).ok())
        .ok_or_else(|| CertError::InvalidCaUri(uri.to_owned()))
}

/// The single `spiffe://hufu/` URI SAN of a DER certificate. Other URIs are
/// ignored, but two Hufu URIs would make the identity ambiguous.
pub(crate) fn hufu_uri(der: &[u8]) -> Result<String, CertError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| CertError::BadCertificate(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| CertError::BadCertificate(e.to_string()))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) if uri.starts_with(HUFU_PREFIX) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(CertError::NoIdentity),
        [uri] => Ok((*uri).to_owned()),
        several => Err(CertError::SeveralIdentities(several.len())),
    }
}

fn check_name(name: &str) -> Result<(), CertError> {
    let invalid = |reason| CertError::InvalidName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("it is empty"));
    }
    if !name
        .bytes()
        .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'))
    {
        return Err(invalid("it contains a character outside [a-z0-9._-]"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(invalid("it is longer than 64 characters"));
    }
    // The SPIFFE ID spec forbids these path segments: URI normalisation
    // would silently change the identity.
    if name == "." || name == ".." {
        return Err(invalid("'.' and '..' are not names"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gd() -> Province {
        Province::parse("440000").unwrap()
    }

    #[test]
    fn uri_round_trips() {
        for role in [Role::Node, Role::Terminal, Role::Admin, Role::Auditor] {
            let id = Identity::new(gd(), role, "gd-1.a_b").unwrap();
            let uri = id.uri();
            assert_eq!(Identity::parse_uri(&uri).unwrap(), id);
            assert_eq!(id.to_string(), uri);
        }
        let id = Identity::new(gd(), Role::Node, "gd-1").unwrap();
        assert_eq!(id.uri(), "spiffe://hufu/province/440000/node/gd-1");
    }

    #[test]
    fn roles_parse_and_print_lowercase() {
        for role in [Role::Node, Role::Terminal, Role::Admin, Role::Auditor] {
            assert_eq!(role.to_string().parse::<Role>().unwrap(), role);
        }
        assert!("Node".parse::<Role>().is_err());
    }

    #[test]
    fn names_are_checked() {
        let longest = "a".repeat(64);
        assert!(Identity::new(gd(), Role::Node, &longest).is_ok());
        for bad in [
            "",
            "GD-1",
            "gd 1",
            "gd/1",
            "gd:1",
            "é",
            ".",
            "..",
            &"a".repeat(65),
        ] {
            let err = Identity::new(gd(), Role::Node, bad).unwrap_err();
            assert!(matches!(err, CertError::InvalidName { .. }), "{bad:?}");
            assert!(err.to_string().contains("1 to 64 characters"), "{err}");
        }
    }

    #[test]
    fn bad_uris_are_refused() {
        for bad in [
            "spiffe://hufu/province/440000/node",
            "spiffe://hufu/province/440000/node/gd-1/x",
            "spiffe://hufu/province/440000/node/",
            "spiffe://hufu/province/999999/node/gd-1",
            "spiffe://hufu/province/440000/king/gd-1",
            "spiffe://hufu/province/440000/ca",
            "spiffe://other/province/440000/node/gd-1",
            "https://hufu/province/440000/node/gd-1",
        ] {
            let err = Identity::parse_uri(bad).unwrap_err();
            assert!(matches!(err, CertError::InvalidUri { .. }), "{bad:?}");
        }
    }

    #[test]
    fn ca_uri_round_trips() {
        assert_eq!(ca_uri(gd()), "spiffe://hufu/province/440000/ca");
        assert_eq!(parse_ca_uri(&ca_uri(gd())).unwrap(), gd());
        assert!(parse_ca_uri("spiffe://hufu/province/440000/node/ca").is_err());
    }
}
