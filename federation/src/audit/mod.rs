//! The audit log: every cross-province event a node takes part in, in an
//! append-only Merkle log that the other provinces witness, so that no
//! province can rewrite its history alone.
//!
//! - [`AuditEntry`]: one event, in a canonical, versioned encoding that can
//!   name a holder only by pseudonym.
//! - [`AuditLog`]: the node's log in a sled tree, RFC 6962 hashing. Appends
//!   go through a bounded queue to a writer thread that commits them in
//!   batches; inclusion and consistency proofs for any sizes.
//! - [`LogSigner`]: the province's Ed25519 log key. It signs checkpoints
//!   ([`SignedCheckpoint`], C2SP tlog-checkpoint as a signed note) and, as
//!   the province's witness, cosignatures ([`Cosignature`], C2SP
//!   tlog-cosignature/v1).
//! - [`Witness`]: what a province runs for the others' logs: it checks each
//!   new checkpoint is consistent with the last one it cosigned, cosigns it,
//!   and keeps two signed checkpoints that cannot both be true as
//!   [`Evidence`].
//! - [`verify_dir`], [`query`], [`export`]: the auditor's offline tools over
//!   a fetched directory ([`DirWriter`] writes one).
//!
//! The Merkle tree arithmetic (stored-hash layout, proofs, their checks) is
//! the `tlog_tiles` crate, a port of Go's `golang.org/x/mod/sumdb/tlog`:
//! written for logs kept in a database, it reads a proof's O(log n) hashes
//! through a trait this module implements over sled.

mod checkpoint;
mod dir;
mod entry;
mod hashes;
mod key;
mod log;
mod proof;
mod query;
mod witness;

use std::fmt;
use std::path::PathBuf;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hufu_certs::CertError;

use crate::note::NoteError;

pub use checkpoint::{Checkpoint, Cosignature, SignedCheckpoint, verify_cosignature};
pub use dir::{DirWriter, Report, TRUST_ADOPTION_GRACE_SECS, verify_dir, verify_dir_history};
pub use entry::{AnswerSource, AuditEntry, EntryKind, MAX_DETAIL_CHARS};
pub use key::{LogSigner, log_origin, parse_log_origin, witness_name, witness_verifier_key};
pub use log::{AuditLog, BatchConfig, TryAppendError};
pub use proof::{EMPTY_ROOT, leaf_hash, verify_consistency, verify_inclusion};
pub use query::{ExportFormat, Filter, Record, export, query};
pub use witness::{Evidence, Witness, WitnessError};

/// A SHA-256 hash in the log's Merkle tree: a leaf, an inner node or a root.
/// Written in base64, as checkpoints write roots.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TreeHash(pub [u8; 32]);

impl TreeHash {
    /// The hash in `bytes`, which must be 32 long.
    pub fn from_slice(bytes: &[u8]) -> Option<TreeHash> {
        bytes.try_into().ok().map(TreeHash)
    }

    /// Parses standard base64 of 32 bytes.
    pub fn from_base64(s: &str) -> Result<TreeHash, AuditError> {
        STANDARD
            .decode(s)
            .ok()
            .and_then(|bytes| TreeHash::from_slice(&bytes))
            .ok_or_else(|| {
                AuditError::InvalidProof(format!("{s:?} is not the base64 of a 32-byte hash"))
            })
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for TreeHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for TreeHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TreeHash({self})")
    }
}

/// Everything that can go wrong with the audit log, its keys, checkpoints
/// and offline verification (the witness has its own [`WitnessError`]).
/// Messages are lowercase and say what to do next; offline verification
/// failures name the first entry or checkpoint that fails.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("audit log storage failed: {0}; check the disk and the node's data directory")]
    Storage(String),

    #[error(
        "the audit log writer has stopped ({0}): nothing more is recorded; fix the cause and restart the node"
    )]
    Closed(String),

    #[error(transparent)]
    Cert(#[from] CertError),

    #[error(transparent)]
    Note(#[from] NoteError),

    #[error("audit entry refused: {0}")]
    BadEntry(String),

    #[error("cannot use log key: {0}")]
    BadKey(String),

    #[error(
        "invalid log origin {origin:?}: {reason}; expected hufu.audit/<province code>/<node name>"
    )]
    BadOrigin { origin: String, reason: String },

    #[error(
        "this audit log signs as {log}, not {signer}: sign its checkpoints with the log key made for it"
    )]
    OriginMismatch { log: String, signer: String },

    #[error("{0}")]
    OutOfRange(String),

    #[error("invalid proof: {0}")]
    InvalidProof(String),

    #[error("malformed checkpoint: {0}")]
    MalformedCheckpoint(String),

    #[error("{checkpoint}: log signature invalid: {reason}")]
    LogSignature { checkpoint: String, reason: String },

    #[error(
        "{checkpoint}: cosignature by {witness} does not verify: the checkpoint was altered or the line is corrupt"
    )]
    BadCosignature { checkpoint: String, witness: String },

    #[error(
        "{checkpoint}: {valid} valid cosignature{}, quorum is {quorum}: collect cosignatures from more member provinces' witnesses",
        if *valid == 1 { "" } else { "s" }
    )]
    Quorum {
        checkpoint: String,
        valid: usize,
        quorum: usize,
    },

    #[error("{checkpoint} is not consistent with {previous}: {reason}")]
    Inconsistent {
        checkpoint: String,
        previous: String,
        reason: String,
    },

    #[error("{}", entry_mismatch(*first, *last, *checkpoint, *size))]
    EntryMismatch {
        first: u64,
        last: u64,
        checkpoint: u64,
        size: u64,
    },

    #[error(
        "entries.jsonl line {line} holds entry {found} where entry {expected} belongs: an entry was dropped, added or reordered there"
    )]
    EntrySequence {
        line: u64,
        expected: u64,
        found: u64,
    },

    #[error("entry {index}: {reason}")]
    BadStoredEntry { index: u64, reason: String },

    #[error("{0}")]
    Coverage(String),

    #[error("{}: {reason}", path.display())]
    Dir { path: PathBuf, reason: String },
}

/// Which entries a checkpoint's root does not match. The checkpoint before
/// it matched, so the fault lies between the two sizes; with one entry
/// between them it is that entry.
fn entry_mismatch(first: u64, last: u64, checkpoint: u64, size: u64) -> String {
    if first == last {
        format!(
            "entry {first}: leaf hash does not match checkpoint {checkpoint} (size {size}): the entry was altered, or one was dropped or reordered"
        )
    } else {
        format!(
            "entries {first} to {last}: leaf hashes do not match checkpoint {checkpoint} (size {size}): one of them was altered, dropped or reordered (the entries before {first} match the checkpoints before)"
        )
    }
}

impl From<sled::Error> for AuditError {
    fn from(e: sled::Error) -> AuditError {
        AuditError::Storage(e.to_string())
    }
}
