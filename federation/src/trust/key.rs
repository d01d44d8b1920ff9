//! A province's governance key: the Ed25519 key that signs trust lists on
//! the province's behalf.
//!
//! The key is named `hufu-governance-<code>`, so a signature line says which
//! province made it. On disk it is a PKCS#8 PEM (mode 0600) preceded by that
//! name on a line of its own: PKCS#8 carries no name, and RFC 7468 lets text
//! stand before the PEM block, which OpenSSL and the `pem` crate skip.

use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use hufu_certs::Province;

use super::TrustError;
use crate::note::{NoteSignature, VerifierKey};

const KEY_NAME_PREFIX: &str = "hufu-governance-";
const PEM_TAG: &str = "PRIVATE KEY";

/// The signed-note key name of `province`'s governance key:
/// `hufu-governance-<code>`.
pub fn governance_key_name(province: Province) -> String {
    format!("{KEY_NAME_PREFIX}{province}")
}

/// The province a governance key name speaks for, if it is one.
pub(crate) fn governance_key_province(name: &str) -> Option<Province> {
    name.strip_prefix(KEY_NAME_PREFIX)
        .and_then(|code| Province::parse(code).ok())
}

/// An Ed25519 signing key of one province's governance.
pub struct GovernanceKey {
    province: Province,
    pair: Ed25519KeyPair,
    /// The PKCS#8 v1 document, kept to write the key back unchanged.
    pkcs8: Vec<u8>,
    verifier: VerifierKey,
}

impl fmt::Debug for GovernanceKey {
    // The private key stays out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GovernanceKey")
            .field("verifier_key", &self.verifier.to_string())
            .finish_non_exhaustive()
    }
}

impl GovernanceKey {
    /// A fresh key for `province`.
    pub fn generate(province: Province) -> Result<GovernanceKey, TrustError> {
        // v1 rather than v2: what OpenSSL and most tools expect.
        let pkcs8 = Ed25519KeyPair::generate_pkcs8v1(&SystemRandom::new()).map_err(|_| {
            TrustError::BadGovernanceKey(
                "aws-lc could not generate an ed25519 key: check the system's randomness source"
                    .into(),
            )
        })?;
        Self::from_pkcs8_der(province, pkcs8.as_ref())
    }

    fn from_pkcs8_der(province: Province, pkcs8: &[u8]) -> Result<GovernanceKey, TrustError> {
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|e| {
            TrustError::BadGovernanceKey(format!("not a pkcs#8 ed25519 private key: {e}"))
        })?;
        let verifier =
            VerifierKey::ed25519(&governance_key_name(province), pair.public_key().as_ref())?;
        Ok(GovernanceKey {
            province,
            pair,
            pkcs8: pkcs8.to_vec(),
            verifier,
        })
    }

    /// Reads what [`to_pkcs8_pem`](Self::to_pkcs8_pem) wrote: the key name
    /// line, then a PKCS#8 `PRIVATE KEY` block.
    pub fn from_pkcs8_pem(pem: &str) -> Result<GovernanceKey, TrustError> {
        let label = pem
            .split("-----BEGIN")
            .next()
            .unwrap_or_default()
            .lines()
            .map(str::trim)
            .find(|line| !line.is_empty());
        let province = label
            .and_then(governance_key_province)
            .ok_or_else(|| {
                TrustError::BadGovernanceKey(format!(
                    "the file does not say whose key it is: put a line '{KEY_NAME_PREFIX}<province code>' before the pem block"
                ))
            })?;
        let block =
            pem::parse(pem).map_err(|e| TrustError::BadGovernanceKey(format!("not pem: {e}")))?;
        if block.tag() != PEM_TAG {
            return Err(TrustError::BadGovernanceKey(format!(
                "pem label is {:?}, expected {PEM_TAG:?}",
                block.tag()
            )));
        }
        Self::from_pkcs8_der(province, block.contents())
    }

    /// The key name line, then the PKCS#8 PEM block.
    pub fn to_pkcs8_pem(&self) -> String {
        let block = pem::encode_config(
            &pem::Pem::new(PEM_TAG, self.pkcs8.clone()),
            pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
        );
        format!("{}\n{block}", self.verifier.name())
    }

    /// Writes the key with mode 0600, atomically.
    pub fn save(&self, path: &Path) -> Result<(), TrustError> {
        hufu_certs::write_private_file(path, self.to_pkcs8_pem().as_bytes())?;
        Ok(())
    }

    /// Reads a key written by [`save`](Self::save).
    pub fn load(path: &Path) -> Result<GovernanceKey, TrustError> {
        let text = fs::read_to_string(path).map_err(|source| TrustError::Io {
            action: "read governance key",
            path: path.to_owned(),
            source,
        })?;
        if let Ok(meta) = fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                path = %path.display(),
                "governance key is readable by group or others: run chmod 600 on it"
            );
        }
        Self::from_pkcs8_pem(&text).map_err(|e| match e {
            TrustError::BadGovernanceKey(reason) => {
                TrustError::BadGovernanceKey(format!("{}: {reason}", path.display()))
            }
            other => other,
        })
    }

    /// The signed-note verifier key, `hufu-governance-<code>+<id>+<base64>`:
    /// what goes into the member's `governance_key`.
    pub fn verifier_key(&self) -> String {
        self.verifier.to_string()
    }

    /// The province this key signs for.
    pub fn province(&self) -> Province {
        self.province
    }

    /// The signature line of this key over `text`.
    pub(crate) fn sign_text(&self, text: &str) -> NoteSignature {
        NoteSignature {
            name: self.verifier.name().to_owned(),
            key_id: self.verifier.key_id(),
            signature: self.pair.sign(text.as_bytes()).as_ref().to_vec(),
        }
    }
}
