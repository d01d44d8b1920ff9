//! A province's audit log key, and the names it signs under.
//!
//! One Ed25519 key does two jobs, under two names:
//!
//! - as the **log**, it signs the node's checkpoints with plain Ed25519
//!   signatures (signed-note type 0x01) under the log's origin,
//!   `hufu.audit/<code>/<node>`. Its verifier key is the member's `log_key`
//!   in the trust list.
//! - as the province's **witness**, it cosigns other provinces' checkpoints
//!   with cosignature/v1 (type 0x04) under `hufu.witness/<code>`. That
//!   verifier key is not in the trust list: anyone derives it from the
//!   `log_key` with [`witness_verifier_key`].
//!
//! Sharing the key is safe because the two signed messages cannot be
//! confused: a log signature is over a checkpoint text, whose first line is
//! an origin starting `hufu.audit/`, and a cosignature is over a message
//! whose first line is `cosignature/v1`. The key ids differ too (they hash
//! the type byte), so neither line is even tried with the other's key.
//!
//! On disk the key is a PKCS#8 PEM (mode 0600) preceded by the origin on a
//! line of its own, as governance keys are stored.

use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use hufu_certs::Province;

use super::AuditError;
use crate::note::{KeyType, NoteSignature, VerifierKey, cosignature_message};

const ORIGIN_PREFIX: &str = "hufu.audit/";
const WITNESS_PREFIX: &str = "hufu.witness/";
const PEM_TAG: &str = "PRIVATE KEY";
const MAX_NODE_NAME: usize = 64;

/// The origin (and log key name) of `node`'s audit log in `province`:
/// `hufu.audit/<code>/<node>`. The node name is 1 to 64 characters of
/// `[a-z0-9._-]`, as in certificate identities.
pub fn log_origin(province: Province, node: &str) -> Result<String, AuditError> {
    let origin = format!("{ORIGIN_PREFIX}{province}/{node}");
    check_node_name(node).map_err(|reason| AuditError::BadOrigin {
        origin: origin.clone(),
        reason: reason.into(),
    })?;
    Ok(origin)
}

/// The province and node name of a log origin made by [`log_origin`].
pub fn parse_log_origin(origin: &str) -> Result<(Province, String), AuditError> {
    let bad = |reason: &str| AuditError::BadOrigin {
        origin: origin.to_owned(),
        reason: reason.to_owned(),
    };
    let rest = origin
        .strip_prefix(ORIGIN_PREFIX)
        .ok_or_else(|| bad("it does not start with hufu.audit/"))?;
    let (code, node) = rest
        .split_once('/')
        .ok_or_else(|| bad("it has no node name after the province code"))?;
    let province = Province::parse(code).map_err(|_| bad("unknown province code"))?;
    check_node_name(node).map_err(bad)?;
    Ok((province, node.to_owned()))
}

/// The cosigner name of `province`'s witness: `hufu.witness/<code>`.
pub fn witness_name(province: Province) -> String {
    format!("{WITNESS_PREFIX}{province}")
}

/// The cosignature/v1 verifier key of the witness of the province whose
/// log key is `log_verifier_key` (a member's `log_key`): same public key,
/// named `hufu.witness/<code>`, type 0x04.
pub fn witness_verifier_key(log_verifier_key: &str) -> Result<String, AuditError> {
    let (province, key) = parse_log_key(log_verifier_key)?;
    Ok(VerifierKey::cosignature_v1(&witness_name(province), key.public_key())?.to_string())
}

/// A log verifier key, checked to be a plain Ed25519 key named after a log
/// origin, with the province that origin names.
pub(crate) fn parse_log_key(log_verifier_key: &str) -> Result<(Province, VerifierKey), AuditError> {
    let key = VerifierKey::parse(log_verifier_key)?;
    if key.key_type() != KeyType::Ed25519 {
        return Err(AuditError::BadKey(format!(
            "{log_verifier_key} is a cosignature key: a log key is a plain ed25519 verifier key (type 0x01)"
        )));
    }
    let (province, _) = parse_log_origin(key.name())?;
    Ok((province, key))
}

fn check_node_name(node: &str) -> Result<(), &'static str> {
    let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-');
    if node.is_empty() || node.len() > MAX_NODE_NAME || !node.chars().all(ok) {
        return Err("the node name must be 1 to 64 characters of a-z, 0-9, '.', '_' or '-'");
    }
    Ok(())
}

/// The Ed25519 key of one node's audit log, which is also its province's
/// witness key (see the module documentation).
pub struct LogSigner {
    province: Province,
    pair: Ed25519KeyPair,
    /// The PKCS#8 v1 document, kept to write the key back unchanged.
    pkcs8: Vec<u8>,
    log_key: VerifierKey,
    witness_key: VerifierKey,
}

impl fmt::Debug for LogSigner {
    // The private key stays out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogSigner")
            .field("verifier_key", &self.log_key.to_string())
            .finish_non_exhaustive()
    }
}

impl LogSigner {
    /// A fresh key for the log of `node` in `province`.
    pub fn generate(province: Province, node: &str) -> Result<LogSigner, AuditError> {
        let origin = log_origin(province, node)?;
        // v1 rather than v2: what OpenSSL and most tools expect.
        let pkcs8 = Ed25519KeyPair::generate_pkcs8v1(&SystemRandom::new()).map_err(|_| {
            AuditError::BadKey(
                "aws-lc could not generate an ed25519 key: check the system's randomness source"
                    .into(),
            )
        })?;
        LogSigner::from_pkcs8_der(&origin, pkcs8.as_ref())
    }

    fn from_pkcs8_der(origin: &str, pkcs8: &[u8]) -> Result<LogSigner, AuditError> {
        let (province, _) = parse_log_origin(origin)?;
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8)
            .map_err(|e| AuditError::BadKey(format!("not a pkcs#8 ed25519 private key: {e}")))?;
        let public = pair.public_key().as_ref();
        Ok(LogSigner {
            province,
            log_key: VerifierKey::ed25519(origin, public)?,
            witness_key: VerifierKey::cosignature_v1(&witness_name(province), public)?,
            pair,
            pkcs8: pkcs8.to_vec(),
        })
    }

    /// The same key signing the log of another `node` of the province, under
    /// that node's origin: each replica of a province keeps its own audit
    /// log, signed with the province's one log key.
    pub fn for_node(&self, node: &str) -> Result<LogSigner, AuditError> {
        LogSigner::from_pkcs8_der(&log_origin(self.province, node)?, &self.pkcs8)
    }

    /// Reads what [`to_pkcs8_pem`](Self::to_pkcs8_pem) wrote: the origin
    /// line, then a PKCS#8 `PRIVATE KEY` block.
    pub fn from_pkcs8_pem(pem: &str) -> Result<LogSigner, AuditError> {
        let origin = pem
            .split("-----BEGIN")
            .next()
            .unwrap_or_default()
            .lines()
            .map(str::trim)
            .find(|line| !line.is_empty())
            .ok_or_else(|| {
                AuditError::BadKey(
                    "the file does not say whose log key it is: put the line hufu.audit/<province code>/<node> before the pem block".into(),
                )
            })?;
        let block = pem::parse(pem).map_err(|e| AuditError::BadKey(format!("not pem: {e}")))?;
        if block.tag() != PEM_TAG {
            return Err(AuditError::BadKey(format!(
                "pem label is {:?}, expected {PEM_TAG:?}",
                block.tag()
            )));
        }
        LogSigner::from_pkcs8_der(origin, block.contents())
    }

    /// The origin line, then the PKCS#8 PEM block.
    pub fn to_pkcs8_pem(&self) -> String {
        let block = pem::encode_config(
            &pem::Pem::new(PEM_TAG, self.pkcs8.clone()),
            pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
        );
        format!("{}\n{block}", self.origin())
    }

    /// Writes the key with mode 0600, atomically.
    pub fn save(&self, path: &Path) -> Result<(), AuditError> {
        hufu_certs::write_private_file(path, self.to_pkcs8_pem().as_bytes())?;
        Ok(())
    }

    /// Reads a key written by [`save`](Self::save).
    pub fn load(path: &Path) -> Result<LogSigner, AuditError> {
        let text = fs::read_to_string(path).map_err(|source| AuditError::Io {
            action: "read log key",
            path: path.to_owned(),
            source,
        })?;
        if let Ok(meta) = fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                path = %path.display(),
                "log key is readable by group or others: run chmod 600 on it"
            );
        }
        LogSigner::from_pkcs8_pem(&text).map_err(|e| match e {
            AuditError::BadKey(reason) => {
                AuditError::BadKey(format!("{}: {reason}", path.display()))
            }
            other => other,
        })
    }

    /// The log's origin, `hufu.audit/<code>/<node>`, also its key name.
    pub fn origin(&self) -> &str {
        self.log_key.name()
    }

    /// The province this key signs for.
    pub fn province(&self) -> Province {
        self.province
    }

    /// The log's signed-note verifier key: what goes into the member's
    /// `log_key` in the trust list.
    pub fn verifier_key(&self) -> String {
        self.log_key.to_string()
    }

    /// The witness's cosigner name, `hufu.witness/<code>`.
    pub fn witness_name(&self) -> &str {
        self.witness_key.name()
    }

    /// The witness's cosignature/v1 verifier key; the same as
    /// [`witness_verifier_key`] of [`verifier_key`](Self::verifier_key).
    pub fn witness_verifier_key(&self) -> String {
        self.witness_key.to_string()
    }

    /// Signs a status-feed head (see [`crate::feed`]). Feed heads start with
    /// their own label, so a feed signature can never pass for a checkpoint
    /// or a cosignature made with the same key.
    pub fn sign_feed_head(&self, text: &str) -> Vec<u8> {
        assert!(
            text.starts_with(crate::feed::HEAD_LABEL),
            "feed head text must start with its label"
        );
        self.pair.sign(text.as_bytes()).as_ref().to_vec()
    }

    /// Signs a compacted feed's snapshot statement (see
    /// [`crate::snapshot`]), which starts with its own label too.
    pub fn sign_feed_snapshot(&self, text: &str) -> Vec<u8> {
        assert!(
            text.starts_with(crate::snapshot::SNAPSHOT_LABEL),
            "snapshot statement text must start with its label"
        );
        self.pair.sign(text.as_bytes()).as_ref().to_vec()
    }

    /// The log's signature line over a checkpoint text.
    pub(crate) fn sign_checkpoint(&self, text: &str) -> NoteSignature {
        NoteSignature {
            name: self.log_key.name().to_owned(),
            key_id: self.log_key.key_id(),
            signature: self.pair.sign(text.as_bytes()).as_ref().to_vec(),
        }
    }

    /// The witness's cosignature/v1 line over a checkpoint text at `time`
    /// (unix seconds).
    pub(crate) fn cosign(&self, text: &str, time: u64) -> NoteSignature {
        let mut signature = time.to_be_bytes().to_vec();
        signature.extend_from_slice(
            self.pair
                .sign(cosignature_message(time, text).as_bytes())
                .as_ref(),
        );
        NoteSignature {
            name: self.witness_key.name().to_owned(),
            key_id: self.witness_key.key_id(),
            signature,
        }
    }
}
