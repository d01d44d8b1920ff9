//! Checkpoints (C2SP tlog-checkpoint) signed by their log, and the
//! cosignatures (C2SP tlog-cosignature/v1) witnesses add to them.
//!
//! A checkpoint's text is three lines: the origin, the tree size in decimal
//! and the base64 root hash. Hufu logs write no extension lines and refuse
//! them. The text is a signed note: the log's signature line comes first,
//! witnesses' cosignature lines follow it.

use std::collections::HashSet;

use hufu_certs::Province;

use super::key::{parse_log_key, parse_log_origin, witness_name};
use super::{AuditError, LogSigner, TreeHash};
use crate::note::{KeyType, Note, NoteSignature, VerifierKey};
use crate::trust::TrustList;

/// Length of an Ed25519 cosignature: timestamp, then signature.
const COSIGNATURE_LEN: usize = 8 + 64;

/// A log's tree head: its origin, size and root hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's name, `hufu.audit/<code>/<node>`.
    pub origin: String,
    /// The number of entries.
    pub size: u64,
    /// The RFC 6962 root hash of those entries.
    pub root: TreeHash,
}

impl Checkpoint {
    /// The checkpoint text: origin, size and base64 root, each on its own
    /// line, as `tlog_tiles` writes it (with no extension lines). Refused
    /// when C2SP would not accept it: an empty origin.
    pub fn text(&self) -> Result<String, AuditError> {
        let checkpoint = tlog_tiles::Checkpoint::new(&self.origin, self.size, self.root.into(), "")
            .map_err(|_| {
                AuditError::MalformedCheckpoint(format!(
                    "origin {:?} cannot be a checkpoint's first line",
                    self.origin
                ))
            })?;
        String::from_utf8(checkpoint.to_bytes())
            .map_err(|e| AuditError::MalformedCheckpoint(format!("checkpoint text: {e}")))
    }

    /// Parses a checkpoint text, refusing extension lines.
    pub fn parse_text(text: &str) -> Result<Checkpoint, AuditError> {
        let parsed = tlog_tiles::Checkpoint::from_bytes(text.as_bytes()).map_err(|_| {
            AuditError::MalformedCheckpoint(
                "expected three lines: the origin, the tree size in decimal without leading zeroes, and the base64 root hash".into(),
            )
        })?;
        if !parsed.extension().is_empty() {
            return Err(AuditError::MalformedCheckpoint(
                "it has extension lines, which hufu logs never write".into(),
            ));
        }
        Ok(Checkpoint {
            origin: parsed.origin().to_owned(),
            size: parsed.size(),
            root: (*parsed.hash()).into(),
        })
    }

    /// The province whose log this is, from the origin.
    pub fn province(&self) -> Result<Province, AuditError> {
        parse_log_origin(&self.origin).map(|(province, _)| province)
    }

    /// How errors name this checkpoint when no better label is at hand.
    fn label(&self) -> String {
        format!("checkpoint {} at size {}", self.origin, self.size)
    }
}

/// A checkpoint as a signed note: the log's signature and any witnesses'
/// cosignatures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedCheckpoint {
    checkpoint: Checkpoint,
    note: Note,
}

impl SignedCheckpoint {
    /// `checkpoint` signed by `signer`, whose origin it must carry.
    pub(crate) fn sign(
        checkpoint: Checkpoint,
        signer: &LogSigner,
    ) -> Result<SignedCheckpoint, AuditError> {
        if checkpoint.origin != signer.origin() {
            return Err(AuditError::OriginMismatch {
                log: checkpoint.origin,
                signer: signer.origin().to_owned(),
            });
        }
        let mut note = Note::new(checkpoint.text()?)?;
        note.add_signature(signer.sign_checkpoint(note.text()))?;
        Ok(SignedCheckpoint { checkpoint, note })
    }

    /// Parses a signed checkpoint. Signatures are not checked here: see
    /// [`verify`](Self::verify).
    pub fn parse(note: &str) -> Result<SignedCheckpoint, AuditError> {
        let note = Note::parse(note)?;
        let checkpoint = Checkpoint::parse_text(note.text())?;
        Ok(SignedCheckpoint { checkpoint, note })
    }

    pub fn checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }

    /// The checkpoint text that every signature covers.
    pub fn text(&self) -> &str {
        self.note.text()
    }

    /// The signed note: text, blank line, the log's signature line, then
    /// cosignature lines.
    pub fn note(&self) -> String {
        self.note.encode()
    }

    /// The cosignature lines, in note order: every line not by the log.
    pub fn cosignatures(&self) -> Vec<Cosignature> {
        self.note
            .signatures()
            .iter()
            .filter(|s| s.name != self.checkpoint.origin)
            .filter_map(|s| Cosignature::from_signature(s.clone()).ok())
            .collect()
    }

    /// This checkpoint with the log's signature lines only.
    pub(crate) fn log_signed_only(&self) -> SignedCheckpoint {
        let mut note = Note::from_trusted_text(self.note.text().to_owned());
        for line in self
            .note
            .signatures()
            .iter()
            .filter(|s| s.name == self.checkpoint.origin)
        {
            // A parsed note has fewer lines than the limit, and valid names.
            let _ = note.add_signature(line.clone());
        }
        SignedCheckpoint {
            checkpoint: self.checkpoint.clone(),
            note,
        }
    }

    /// Checks the log's signature with `log_verifier_key`, which must be the
    /// key named after this checkpoint's origin.
    pub fn verify_log_signature(&self, log_verifier_key: &str) -> Result<(), AuditError> {
        let (_, key) = parse_log_key(log_verifier_key)?;
        self.check_log_signature(&key, &self.checkpoint.label())
    }

    fn check_log_signature(&self, key: &VerifierKey, label: &str) -> Result<(), AuditError> {
        let invalid = |reason: String| AuditError::LogSignature {
            checkpoint: label.to_owned(),
            reason,
        };
        let renamed;
        let key = if key.name() == self.checkpoint.origin {
            key
        } else {
            // A province's log key signs the audit log of each of its
            // nodes (replicas of one province), each under its own origin:
            // the key named after this origin, if it is the same province's.
            let same_province = match (
                parse_log_origin(key.name()),
                parse_log_origin(&self.checkpoint.origin),
            ) {
                (Ok((keyed, _)), Ok((signed, _))) => keyed == signed,
                _ => false,
            };
            if !same_province {
                return Err(invalid(format!(
                    "the log key is named {}, not after the origin {} nor another node of its province",
                    key.name(),
                    self.checkpoint.origin
                )));
            }
            renamed = VerifierKey::ed25519(&self.checkpoint.origin, key.public_key())
                .map_err(|e| invalid(e.to_string()))?;
            &renamed
        };
        let mut lines = self
            .note
            .signatures()
            .iter()
            .filter(|s| s.is_by(key))
            .peekable();
        if lines.peek().is_none() {
            return Err(invalid(format!("no signature line by {key}")));
        }
        if lines.all(|line| key.verifies(self.note.text(), line)) {
            Ok(())
        } else {
            Err(invalid(format!(
                "the signature by {} does not verify: the checkpoint was altered or the line is corrupt",
                key.name()
            )))
        }
    }

    /// Adds a witness's cosignature, replacing an earlier one by the same
    /// key. It is not checked here: [`verify`](Self::verify) decides which
    /// cosignatures count.
    pub fn add_cosignature(&mut self, cosignature: &Cosignature) -> Result<(), AuditError> {
        self.note.add_signature(cosignature.line.clone())?;
        Ok(())
    }

    /// Adds the signature lines of `other`, a copy of the same checkpoint
    /// cosigned by other witnesses.
    pub fn merge(&mut self, other: &SignedCheckpoint) -> Result<(), AuditError> {
        if self.text() != other.text() {
            return Err(AuditError::MalformedCheckpoint(format!(
                "cannot merge signatures of two different checkpoints ({} and {})",
                self.checkpoint.label(),
                other.checkpoint.label()
            )));
        }
        for line in other.note.signatures() {
            if !self.note.signatures().contains(line) {
                self.note.add_signature(line.clone())?;
            }
        }
        Ok(())
    }

    /// Checks this checkpoint against `trust`: signed by the log key the
    /// trust list gives its province, and cosigned by the witnesses of at
    /// least `witness_quorum` other members. Returns those members.
    pub fn verify(&self, trust: &TrustList) -> Result<Vec<Province>, AuditError> {
        self.verify_labelled(trust, &self.checkpoint.label())
    }

    /// [`verify`](Self::verify), naming the checkpoint `label` in errors.
    pub(crate) fn verify_labelled(
        &self,
        trust: &TrustList,
        label: &str,
    ) -> Result<Vec<Province>, AuditError> {
        let untrusted = |reason: String| AuditError::LogSignature {
            checkpoint: label.to_owned(),
            reason,
        };
        let province = self
            .checkpoint
            .province()
            .map_err(|e| untrusted(e.to_string()))?;
        let member = trust.member(province).ok_or_else(|| {
            untrusted(format!(
                "province {province} is not a member of trust list v{}",
                trust.version
            ))
        })?;
        if member.log_key.is_empty() {
            return Err(untrusted(format!(
                "province {province} has no log key in trust list v{}",
                trust.version
            )));
        }
        let (_, log_key) = parse_log_key(&member.log_key)
            .map_err(|e| untrusted(format!("the trust list's log key for {province}: {e}")))?;
        self.check_log_signature(&log_key, label)?;

        let text = self.note.text();
        let mut counted: HashSet<[u8; 32]> = HashSet::from([*log_key.public_key()]);
        let mut cosigners = Vec::new();
        for witness in trust.members.iter().filter(|m| m.province != province) {
            // A member without a usable log key runs no witness.
            let Ok((_, key)) = parse_log_key(&witness.log_key) else {
                continue;
            };
            let key =
                VerifierKey::cosignature_v1(&witness_name(witness.province), key.public_key())?;
            let (mut good, mut bad) = (false, false);
            for line in self.note.signatures().iter().filter(|s| s.is_by(&key)) {
                if key.verifies(text, line) {
                    good = true;
                } else {
                    bad = true;
                }
            }
            if bad {
                return Err(AuditError::BadCosignature {
                    checkpoint: label.to_owned(),
                    witness: key.name().to_owned(),
                });
            }
            // One key counts once, however many members list it.
            if good && counted.insert(*key.public_key()) {
                cosigners.push(witness.province);
            }
        }
        if cosigners.len() < trust.witness_quorum {
            return Err(AuditError::Quorum {
                checkpoint: label.to_owned(),
                valid: cosigners.len(),
                quorum: trust.witness_quorum,
            });
        }
        Ok(cosigners)
    }
}

/// A witness's cosignature/v1 line on a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cosignature {
    line: NoteSignature,
}

impl Cosignature {
    pub(crate) fn from_signature(line: NoteSignature) -> Result<Cosignature, AuditError> {
        if line.signature.len() != COSIGNATURE_LEN {
            return Err(AuditError::MalformedCheckpoint(format!(
                "the line by {} is not a cosignature: it holds {} bytes, not a timestamp and an ed25519 signature ({COSIGNATURE_LEN})",
                line.name,
                line.signature.len()
            )));
        }
        Ok(Cosignature { line })
    }

    /// Parses a signature line `— <name> <base64>`, with or without its
    /// newline.
    pub fn parse_line(line: &str) -> Result<Cosignature, AuditError> {
        let line = line.strip_suffix('\n').unwrap_or(line);
        Cosignature::from_signature(NoteSignature::parse_line(line)?)
    }

    /// The signature line, without its newline.
    pub fn line(&self) -> String {
        self.line.to_line().trim_end_matches('\n').to_owned()
    }

    /// The cosigner's name, such as `hufu.witness/610000`.
    pub fn witness(&self) -> &str {
        &self.line.name
    }

    /// The province of a Hufu witness, from its name.
    pub fn province(&self) -> Option<Province> {
        self.line
            .name
            .strip_prefix("hufu.witness/")
            .and_then(|code| Province::parse(code).ok())
    }

    /// When the witness cosigned (unix seconds).
    pub fn time(&self) -> u64 {
        self.line.cosignature_time().unwrap_or_default()
    }

    pub(crate) fn signature(&self) -> &NoteSignature {
        &self.line
    }
}

/// Checks `cosignature_line` is a valid cosignature of `checkpoint` by the
/// witness whose cosignature/v1 verifier key is `witness_verifier_key` (see
/// [`witness_verifier_key`](super::witness_verifier_key)).
pub fn verify_cosignature(
    checkpoint: &SignedCheckpoint,
    cosignature_line: &str,
    witness_verifier_key: &str,
) -> Result<Cosignature, AuditError> {
    let key = VerifierKey::parse(witness_verifier_key)?;
    if key.key_type() != KeyType::CosignatureV1 {
        return Err(AuditError::BadKey(format!(
            "{witness_verifier_key} is not a cosignature/v1 key (type 0x04): derive it from the log key with witness_verifier_key"
        )));
    }
    let cosignature = Cosignature::parse_line(cosignature_line)?;
    if !key.verifies(checkpoint.text(), cosignature.signature()) {
        return Err(AuditError::BadCosignature {
            checkpoint: checkpoint.checkpoint.label(),
            witness: key.name().to_owned(),
        });
    }
    Ok(cosignature)
}
