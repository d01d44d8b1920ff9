//! The trust list: who the member provinces are, and how that changes with
//! no central authority.
//!
//! A [`TrustList`] names each member's CA certificate, code-signing JWKS,
//! audit-log key, governance key and endpoints, plus the threshold of
//! signatures a change needs. It travels as a C2SP signed note
//! ([`SignedTrustList`]) signed by members' [`GovernanceKey`]s. The genesis
//! (version 1) must be signed by every founder; version n+1 by at least the
//! threshold of version n's members. A node keeps the chain in a
//! [`TrustStore`], gossips the newest version, and refuses invalid,
//! rolled-back or skipped-ahead versions.

mod key;
mod list;
mod signed;
mod store;

use std::path::PathBuf;

use hufu_certs::{CertError, Province};

use crate::note::NoteError;

pub use crate::note::MAX_NOTE_BYTES;
pub use key::{GovernanceKey, governance_key_name};
pub use list::{Member, TrustList};
pub use signed::SignedTrustList;
pub use store::TrustStore;

/// Everything that can go wrong with governance keys, trust lists and the
/// trust store. Messages are lowercase and say what to do next.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(transparent)]
    Cert(#[from] CertError),

    #[error("cannot use governance key: {0}")]
    BadGovernanceKey(String),

    #[error(
        "invalid verifier key {key:?}: {reason}; expected <name>+<8 hex digits>+<base64 of 0x01 and a 32-byte ed25519 key>"
    )]
    InvalidVerifierKey { key: String, reason: String },

    #[error(
        "signed note is {size} bytes, more than the {max} accepted: refused unread (a trust list of every province is far smaller)"
    )]
    NoteTooLarge { size: usize, max: usize },

    #[error("malformed signed note: {0}")]
    MalformedNote(String),

    #[error("malformed trust list: {0}")]
    MalformedList(String),

    #[error("cannot read member file: {0}; make it with 'hufu federation member-file'")]
    MemberFile(String),

    #[error("member {province} is invalid: {reason}")]
    InvalidMember { province: Province, reason: String },

    #[error(
        "member {member} gives the ca certificate of province {ca}: give {member}'s own ca certificate"
    )]
    ForeignCa { member: Province, ca: Province },

    #[error("a trust list needs at least one member")]
    NoMembers,

    #[error("province {0} is listed twice: keep one entry per province")]
    DuplicateMember(Province),

    #[error("province {0} is already a member: edit its entry instead of adding it again")]
    AlreadyMember(Province),

    #[error("province {province} is not a member of trust list v{version}")]
    NotAMember { province: Province, version: u64 },

    #[error("cannot remove {province}: {reason}")]
    CannotRemove { province: Province, reason: String },

    #[error(
        "code format {a} can match the same text as {b} (for example {example:?}): a scan must name one issuer; give the formats distinct prefixes or patterns"
    )]
    FormatOverlap {
        a: String,
        b: String,
        example: String,
    },

    #[error(
        "members {a} and {b} have the same governance key: each province signs with its own key"
    )]
    SharedGovernanceKey { a: Province, b: Province },

    #[error(
        "threshold {threshold} is out of range: a trust list of {members} members needs a threshold from 1 to {members}"
    )]
    ThresholdOutOfRange { threshold: usize, members: usize },

    #[error(
        "witness quorum {quorum} is out of range: with {members} members at most {} other provinces can cosign",
        members.saturating_sub(1)
    )]
    WitnessQuorumOutOfRange { quorum: usize, members: usize },

    #[error(
        "trust list v{version} was edited after it was signed: the signatures cover the old text; edit a fresh successor and collect signatures on it"
    )]
    EditedAfterSigning { version: u64 },

    #[error(
        "cannot merge signatures: the notes sign different texts (v{ours} and v{theirs}); every signer must sign the same proposal"
    )]
    DifferentText { ours: u64, theirs: u64 },

    #[error(
        "two different signatures by {key} on one text: one of them is forged; keep the copy whose signature verifies"
    )]
    ConflictingSignatures { key: String },

    #[error("trust list v{version} is not a genesis: the genesis is v1")]
    NotGenesis { version: u64 },

    #[error(
        "genesis trust list lacks the signature of founder(s) {}: every founder must sign the genesis",
        provinces(missing)
    )]
    MissingFounderSignatures { missing: Vec<Province> },

    #[error(
        "trust list v{version} has {valid} valid signature{} of members of v{previous}; {required} {} required",
        if *valid == 1 { "" } else { "s" },
        if *required == 1 { "is" } else { "are" }
    )]
    TooFewSignatures {
        version: u64,
        valid: usize,
        previous: u64,
        required: usize,
    },

    #[error(
        "the signature by {key} on trust list v{version} does not verify: the text was altered or the line is corrupt; refusing the note"
    )]
    BadSignature { version: u64, key: String },

    #[error("trust list v{offered} is not newer than the current v{current}: refusing a rollback")]
    Rollback { offered: u64, current: u64 },

    #[error(
        "trust list v{offered} cannot follow v{current} directly: fetch and apply {} first",
        missing_versions(*current, *offered)
    )]
    Gap { offered: u64, current: u64 },

    #[error(
        "a trust list v{version} differs from the v{version} this node holds: two versions were signed with one number; keep both as evidence and alert the members"
    )]
    Conflict { version: u64 },

    #[error(
        "no trust list in {}: initialise the store with a genesis signed by every founder",
        dir.display()
    )]
    StoreEmpty { dir: PathBuf },

    #[error(
        "{} already holds another trust list chain (up to v{version}): open it, or use an empty directory",
        dir.display()
    )]
    StoreExists { dir: PathBuf, version: u64 },

    #[error(
        "trust store {} lacks v{version:06}.note while later versions are present: restore it from a backup or a peer",
        dir.display()
    )]
    MissingVersion { dir: PathBuf, version: u64 },

    #[error("{} is not a valid link of the trust list chain: {source}; restore it from a backup or a peer", path.display())]
    BrokenChain {
        path: PathBuf,
        #[source]
        source: Box<TrustError>,
    },

    #[error(
        "{} appeared while this node was writing it: another process writes the same trust store; run one node per store",
        path.display()
    )]
    StoreRace { path: PathBuf },
}

impl From<NoteError> for TrustError {
    // Kept as distinct trust-list variants, so that callers matching on
    // them did not change when the note code moved to its own module.
    fn from(e: NoteError) -> TrustError {
        match e {
            NoteError::InvalidVerifierKey { key, reason } => {
                TrustError::InvalidVerifierKey { key, reason }
            }
            NoteError::TooLarge { size, max } => TrustError::NoteTooLarge { size, max },
            NoteError::Malformed(reason) => TrustError::MalformedNote(reason),
        }
    }
}

fn provinces(list: &[Province]) -> String {
    list.iter()
        .map(Province::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `v6` or `v6 to v8`: the versions between `current` and `offered`.
fn missing_versions(current: u64, offered: u64) -> String {
    let (first, last) = (current.saturating_add(1), offered.saturating_sub(1));
    if first == last {
        format!("v{first}")
    } else {
        format!("v{first} to v{last}")
    }
}
