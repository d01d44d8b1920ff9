//! A province's witness for the other provinces' audit logs.
//!
//! Per log origin it keeps the last checkpoint it cosigned. A new checkpoint
//! is cosigned only if the log signed it and proves it consistent with that
//! one; the new one then replaces it, atomically, so two concurrent requests
//! cannot both advance from the same state. The protocol follows C2SP
//! tlog-witness: the log says which size its proof starts from, and a log
//! that guessed wrong is told the witness's size and tries again.
//!
//! Two checkpoints the log signed that cannot both be true (two roots for
//! one size, or a new one not proven to extend the old) are kept as
//! [`Evidence`], logged as an error, and counted: that is how a province
//! rewriting its history is caught.
//!
//! Keys in the witness's sled tree: `latest/<origin>` holds the last
//! cosigned checkpoint (the log's signed note), `evidence/<origin>/<u64 id>`
//! one piece of evidence as JSON, `meta/evidence_seq` the counter that
//! numbers them.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::checkpoint::{Cosignature, SignedCheckpoint};
use super::key::parse_log_key;
use super::proof::{EMPTY_ROOT, MAX_PROOF_HASHES};
use super::{AuditError, LogSigner, TreeHash, verify_consistency};
use crate::note::NoteError;

const LATEST_PREFIX: &str = "latest/";
const EVIDENCE_PREFIX: &str = "evidence/";
const EVIDENCE_SEQ_KEY: &str = "meta/evidence_seq";

/// Why a witness refused to cosign. [`is_conflict`](Self::is_conflict)
/// tells the alarms apart from ordinary refusals.
#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    #[error("malformed checkpoint: {0}")]
    Malformed(String),

    #[error("cannot use the log key: {0}")]
    LogKey(String),

    #[error(
        "{origin} is a log of this witness's own province: a province is witnessed by the others"
    )]
    OwnLog { origin: String },

    #[error("the checkpoint of {origin} is not validly signed by its log key: {reason}")]
    BadLogSignature { origin: String, reason: String },

    #[error(
        "the proof starts from size {claimed}, but this witness last cosigned {origin} at size {have}: send a consistency proof from size {have}"
    )]
    OldSize {
        origin: String,
        claimed: u64,
        have: u64,
    },

    #[error(
        "the checkpoint of {origin} has size {offered}, older than the size {have} this witness cosigned: send the latest checkpoint"
    )]
    Rollback {
        origin: String,
        offered: u64,
        have: u64,
    },

    #[error(
        "the checkpoint of {origin} at size {new_size} is not consistent with the one this witness cosigned at size {old_size}: {reason}; both signed checkpoints are kept as evidence"
    )]
    Inconsistent {
        origin: String,
        old_size: u64,
        new_size: u64,
        reason: String,
    },

    #[error("witness storage failed: {0}; check the disk and the node's data directory")]
    Storage(String),
}

impl WitnessError {
    /// Whether this is a conflict between two signed checkpoints: the alarm.
    pub fn is_conflict(&self) -> bool {
        matches!(self, WitnessError::Inconsistent { .. })
    }
}

impl From<sled::Error> for WitnessError {
    fn from(e: sled::Error) -> WitnessError {
        WitnessError::Storage(e.to_string())
    }
}

impl From<NoteError> for WitnessError {
    fn from(e: NoteError) -> WitnessError {
        WitnessError::Malformed(e.to_string())
    }
}

/// Two checkpoints signed by one log that cannot both be true, with what
/// was offered to reconcile them. Anyone holding the log's key can check
/// both signatures.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    pub origin: String,
    /// When the witness found the conflict (unix seconds).
    pub found_at: u64,
    pub reason: String,
    /// The checkpoint the witness had cosigned, as the log signed it.
    pub known: String,
    /// The checkpoint offered after it, as the log signed it.
    pub offered: String,
    /// The size the offered proof started from.
    pub proof_from: u64,
    /// The offered consistency proof, base64 hashes.
    pub proof: Vec<String>,
}

/// One province's witness: state and evidence in a sled tree, and the
/// province's [`LogSigner`] to cosign with.
#[derive(Debug)]
pub struct Witness {
    tree: sled::Tree,
    signer: Arc<LogSigner>,
}

impl Witness {
    /// The witness kept in `tree`, cosigning with `signer` as
    /// `hufu.witness/<code>`.
    pub fn open(tree: sled::Tree, signer: Arc<LogSigner>) -> Witness {
        Witness { tree, signer }
    }

    /// This witness's cosigner name, `hufu.witness/<code>`.
    pub fn name(&self) -> &str {
        self.signer.witness_name()
    }

    /// Checks and cosigns `checkpoint_note`, the signed checkpoint of the log
    /// whose key is `log_verifier_key` (the member's `log_key`, which the
    /// caller took from the trust list), given `proof`, a consistency proof
    /// from size `old_size`, which must be the size this witness last
    /// cosigned for that log (0 the first time, with an empty proof).
    ///
    /// On success the checkpoint becomes the witness's state for the log and
    /// the cosignature is returned. On a conflict the evidence is kept, an
    /// error is logged, and [`WitnessError::Inconsistent`] is returned.
    pub fn witness(
        &self,
        checkpoint_note: &str,
        log_verifier_key: &str,
        old_size: u64,
        proof: &[TreeHash],
    ) -> Result<Cosignature, WitnessError> {
        let offered = SignedCheckpoint::parse(checkpoint_note)
            .map_err(|e| WitnessError::Malformed(e.to_string()))?;
        let cp = offered.checkpoint().clone();
        let origin = cp.origin.clone();
        let (province, _) =
            parse_log_key(log_verifier_key).map_err(|e| WitnessError::LogKey(e.to_string()))?;
        if province == self.signer.province() {
            return Err(WitnessError::OwnLog { origin });
        }
        offered
            .verify_log_signature(log_verifier_key)
            .map_err(|e| WitnessError::BadLogSignature {
                origin: origin.clone(),
                reason: match e {
                    AuditError::LogSignature { reason, .. } => reason,
                    other => other.to_string(),
                },
            })?;
        if proof.len() > MAX_PROOF_HASHES {
            return Err(WitnessError::Malformed(format!(
                "the proof has {} hashes, more than any proof needs ({MAX_PROOF_HASHES})",
                proof.len()
            )));
        }

        let state_key = format!("{LATEST_PREFIX}{origin}");
        let stored = self.tree.get(&state_key)?;
        let known = stored
            .as_ref()
            .map(|bytes| {
                SignedCheckpoint::parse(&String::from_utf8_lossy(bytes))
                    .map_err(|e| WitnessError::Storage(format!("state for {origin}: {e}")))
            })
            .transpose()?;
        let (have, have_root) = known.as_ref().map_or((0, EMPTY_ROOT), |k| {
            (k.checkpoint().size, k.checkpoint().root)
        });

        if cp.size < have {
            return Err(WitnessError::Rollback {
                origin,
                offered: cp.size,
                have,
            });
        }
        // Two roots for one size need no proof to be a conflict.
        let same_size_fork = cp.size == have && cp.root != have_root && known.is_some();
        if old_size != have && !same_size_fork {
            return Err(WitnessError::OldSize {
                origin,
                claimed: old_size,
                have,
            });
        }
        if let Err(e) = verify_consistency(proof, have, have_root, cp.size, cp.root) {
            let reason = match e {
                AuditError::InvalidProof(reason) => reason,
                other => other.to_string(),
            };
            // With nothing cosigned yet there is nothing to conflict with:
            // only a request that is wrong.
            let Some(known) = known else {
                return Err(WitnessError::Malformed(format!(
                    "this witness has cosigned nothing of {origin} yet: send the proof from size 0, which is empty"
                )));
            };
            self.keep_evidence(Evidence {
                origin: origin.clone(),
                found_at: now(),
                reason: reason.clone(),
                known: known.note(),
                offered: offered.note(),
                proof_from: old_size,
                proof: proof.iter().map(TreeHash::to_base64).collect(),
            })?;
            return Err(WitnessError::Inconsistent {
                origin,
                old_size: have,
                new_size: cp.size,
                reason,
            });
        }

        // Keep only the log's own signature: other witnesses' lines are not
        // this witness's business, and the state stays small.
        let state = offered.log_signed_only();
        let swapped = self.tree.compare_and_swap(
            state_key.as_bytes(),
            stored.as_ref().map(|v| v.as_ref()),
            Some(state.note().as_bytes()),
        )?;
        if let Err(race) = swapped {
            // Another request advanced the state first: the log retries from
            // what is stored now.
            let have = race
                .current
                .and_then(|v| SignedCheckpoint::parse(&String::from_utf8_lossy(&v)).ok())
                .map_or(0, |k| k.checkpoint().size);
            return Err(WitnessError::OldSize {
                origin,
                claimed: old_size,
                have,
            });
        }
        self.tree.flush()?;

        let line = self.signer.cosign(offered.text(), now());
        Cosignature::from_signature(line).map_err(|e| WitnessError::Malformed(e.to_string()))
    }

    fn keep_evidence(&self, evidence: Evidence) -> Result<(), WitnessError> {
        tracing::error!(
            origin = %evidence.origin,
            reason = %evidence.reason,
            "audit log conflict: two checkpoints signed by one log cannot both be true; evidence kept, alert the federation"
        );
        // A counter orders the evidence of one origin oldest first.
        let id = self
            .tree
            .update_and_fetch(EVIDENCE_SEQ_KEY, |old| {
                let n = old
                    .and_then(|v| <[u8; 8]>::try_from(v).ok())
                    .map_or(0, u64::from_be_bytes);
                Some((n + 1).to_be_bytes().to_vec())
            })?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map_or(0, u64::from_be_bytes);
        let mut key = format!("{EVIDENCE_PREFIX}{}/", evidence.origin).into_bytes();
        key.extend_from_slice(&id.to_be_bytes());
        let json =
            serde_json::to_vec(&evidence).map_err(|e| WitnessError::Storage(e.to_string()))?;
        self.tree.insert(key, json)?;
        self.tree.flush()?;
        Ok(())
    }

    /// The last checkpoint this witness cosigned for `origin`.
    pub fn latest(&self, origin: &str) -> Result<Option<SignedCheckpoint>, WitnessError> {
        self.tree
            .get(format!("{LATEST_PREFIX}{origin}"))?
            .map(|bytes| {
                SignedCheckpoint::parse(&String::from_utf8_lossy(&bytes))
                    .map_err(|e| WitnessError::Storage(format!("state for {origin}: {e}")))
            })
            .transpose()
    }

    /// Every piece of evidence kept, oldest first per origin.
    pub fn evidence(&self) -> Result<Vec<Evidence>, WitnessError> {
        self.tree
            .scan_prefix(EVIDENCE_PREFIX)
            .map(|item| {
                let (_, v) = item?;
                serde_json::from_slice(&v)
                    .map_err(|e| WitnessError::Storage(format!("unreadable evidence: {e}")))
            })
            .collect()
    }

    /// How many conflicts have been found, ever: a gauge for the node's
    /// metrics.
    pub fn conflicts(&self) -> Result<u64, WitnessError> {
        let mut count = 0;
        for item in self.tree.scan_prefix(EVIDENCE_PREFIX).keys() {
            item?;
            count += 1;
        }
        Ok(count)
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
