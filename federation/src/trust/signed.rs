//! A trust list with its signatures, as one C2SP signed note, and the rules
//! that decide whether it may be trusted: a genesis signed by all its
//! founders, or the direct successor of the current version signed by at
//! least the current threshold of current members.

use std::collections::HashSet;

use hufu_certs::Province;

use super::TrustError;
use super::key::GovernanceKey;
use super::list::TrustList;
use crate::note::{MAX_NOTE_BYTES, Note};

/// A trust list and the signed note that carries it.
///
/// `list` is public for reading; editing it after a signature was added makes
/// every verification fail with [`TrustError::EditedAfterSigning`], since the
/// signatures cover the text, not the struct.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedTrustList {
    pub list: TrustList,
    note: Note,
    /// `note` encoded, kept so [`note`](Self::note) can lend it.
    encoded: String,
}

/// What the signature lines of a note say about a set of signers.
struct SignatureCheck {
    /// Members with a valid signature, in province order.
    valid: Vec<Province>,
    /// Key names of members' lines that do not verify.
    invalid: Vec<String>,
}

impl SignedTrustList {
    /// `list` with no signatures yet.
    pub fn unsigned(list: TrustList) -> SignedTrustList {
        let note = list_note(&list);
        SignedTrustList {
            encoded: note.encode(),
            list,
            note,
        }
    }

    /// Adds `key`'s signature, replacing an earlier one by the same key. Any
    /// key may sign: verification decides whose signatures count. While no
    /// signature is present, edits made to `list` are taken into the text.
    pub fn sign(&mut self, key: &GovernanceKey) -> Result<(), TrustError> {
        if self.note.signatures().is_empty() {
            self.note = list_note(&self.list);
        } else {
            self.check_unedited()?;
        }
        let size = self.note.text().len();
        if size > MAX_NOTE_BYTES {
            return Err(TrustError::NoteTooLarge {
                size,
                max: MAX_NOTE_BYTES,
            });
        }
        let signature = key.sign_text(self.note.text());
        self.note.add_signature(signature)?;
        self.encoded = self.note.encode();
        Ok(())
    }

    /// The signed note: text, blank line, one line per signature.
    pub fn note(&self) -> &str {
        &self.encoded
    }

    /// The signed text.
    pub(crate) fn text(&self) -> &str {
        self.note.text()
    }

    /// The signature lines' key names, in note order.
    pub fn signer_names(&self) -> Vec<&str> {
        self.note
            .signatures()
            .iter()
            .map(|s| s.name.as_str())
            .collect()
    }

    /// Parses a signed note (at most [`MAX_NOTE_BYTES`](super::MAX_NOTE_BYTES),
    /// checked first) whose text must be a trust list in canonical form.
    /// Signatures are not checked here: see [`verify_genesis`](Self::verify_genesis)
    /// and [`verify_successor`](Self::verify_successor).
    pub fn parse(note: &str) -> Result<SignedTrustList, TrustError> {
        let note = Note::parse(note)?;
        let list = TrustList::from_note_text(note.text())?;
        Ok(SignedTrustList {
            encoded: note.encode(),
            list,
            note,
        })
    }

    /// Adds the signatures of `other`, a copy of the same text signed by
    /// other provinces: how a proposer collects signatures.
    pub fn merge_signatures(&mut self, other: &SignedTrustList) -> Result<(), TrustError> {
        if self.note.text() != other.note.text() {
            return Err(TrustError::DifferentText {
                ours: self.list.version,
                theirs: other.list.version,
            });
        }
        let mut merged = self.note.clone();
        for signature in other.note.signatures() {
            let existing = merged
                .signatures()
                .iter()
                .find(|s| s.name == signature.name && s.key_id == signature.key_id);
            match existing {
                Some(s) if s == signature => {}
                // Ed25519 is deterministic: one key gives one signature per
                // text, so two different lines mean one of them is forged.
                Some(_) => {
                    return Err(TrustError::ConflictingSignatures {
                        key: signature.name.clone(),
                    });
                }
                None => merged.add_signature(signature.clone())?,
            }
        }
        self.encoded = merged.encode();
        self.note = merged;
        Ok(())
    }

    /// Members of `signers_of` with a valid signature on this note, in
    /// province order. Lines by unknown keys, and lines that do not verify,
    /// do not count.
    pub fn valid_signers(&self, signers_of: &TrustList) -> Vec<Province> {
        self.check_signatures(signers_of).valid
    }

    /// Checks this is a trustworthy genesis: version 1, well-formed, and
    /// signed by every founder.
    pub fn verify_genesis(&self) -> Result<(), TrustError> {
        self.check_unedited()?;
        if self.list.version != 1 {
            return Err(TrustError::NotGenesis {
                version: self.list.version,
            });
        }
        self.list.validate()?;
        let check = self.check_signatures(&self.list);
        self.refuse_invalid(&check)?;
        let missing: Vec<Province> = self
            .list
            .provinces()
            .into_iter()
            .filter(|p| !check.valid.contains(p))
            .collect();
        if !missing.is_empty() {
            return Err(TrustError::MissingFounderSignatures { missing });
        }
        Ok(())
    }

    /// Checks this may replace `current`: exactly the next version, signed by
    /// at least `current.threshold` distinct members of `current`, and
    /// well-formed itself.
    pub fn verify_successor(&self, current: &TrustList) -> Result<(), TrustError> {
        self.check_unedited()?;
        let (offered, version) = (self.list.version, current.version);
        if offered <= version {
            return Err(TrustError::Rollback {
                offered,
                current: version,
            });
        }
        if offered - version > 1 {
            return Err(TrustError::Gap {
                offered,
                current: version,
            });
        }
        let check = self.check_signatures(current);
        self.refuse_invalid(&check)?;
        if check.valid.len() < current.threshold {
            return Err(TrustError::TooFewSignatures {
                version: offered,
                valid: check.valid.len(),
                previous: version,
                required: current.threshold,
            });
        }
        self.list.validate()
    }

    /// Signatures in the note are over its text; `list` must still be what
    /// the text says.
    fn check_unedited(&self) -> Result<(), TrustError> {
        if self.list.note_text() != self.note.text() {
            return Err(TrustError::EditedAfterSigning {
                version: self.list.version,
            });
        }
        Ok(())
    }

    /// A line by a known key that fails to verify means the note was altered
    /// or corrupted; the spec asks to reject such a note whole.
    fn refuse_invalid(&self, check: &SignatureCheck) -> Result<(), TrustError> {
        match check.invalid.first() {
            Some(key) => Err(TrustError::BadSignature {
                version: self.list.version,
                key: key.clone(),
            }),
            None => Ok(()),
        }
    }

    fn check_signatures(&self, signers_of: &TrustList) -> SignatureCheck {
        let text = self.note.text();
        let mut valid = Vec::new();
        let mut invalid = Vec::new();
        // A key listed for two provinces (a malformed list) counts once.
        let mut counted = HashSet::new();
        for member in &signers_of.members {
            // A key not named for its province never counts, even in a
            // list that skipped validation.
            let Ok(key) = member.governance_verifier() else {
                continue;
            };
            let (mut good, mut bad) = (false, false);
            for line in self.note.signatures().iter().filter(|s| s.is_by(&key)) {
                if key.verifies(text, line) {
                    good = true;
                } else {
                    bad = true;
                }
            }
            if bad {
                invalid.push(key.name().to_owned());
            }
            if good && counted.insert(*key.public_key()) {
                valid.push(member.province);
            }
        }
        valid.sort();
        valid.dedup();
        SignatureCheck { valid, invalid }
    }
}

/// The unsigned note of `list`.
fn list_note(list: &TrustList) -> Note {
    // A trust list text always ends in a newline and holds no control
    // character (JSON escapes them) and no blank line. Its size is checked
    // when it is signed or parsed.
    Note::from_trusted_text(list.note_text())
}
