//! The audit directory an auditor fetches, and its offline verification.
//!
//! ```text
//! DIR/
//!   entries.jsonl              one line per entry from index 0, in order:
//!                              {"index":0,"entry":"<base64 of the canonical encoding>"}
//!   checkpoints/000001.note    the first checkpoint: a signed note with the
//!                              log's signature and witnesses' cosignatures
//!   checkpoints/000001.proof   the consistency proof from the checkpoint
//!                              before (the empty tree for the first):
//!                              base64 hashes, one per line
//!   checkpoints/000002.note    …, numbered from 1 without gaps, sizes
//!   checkpoints/000002.proof      never decreasing
//! ```
//!
//! The entries run exactly up to the last checkpoint's size. Verification
//! needs nothing else but the trust list the auditor already trusts, and
//! keeps O(log n) hashes in memory whatever the log's size.

use std::fmt;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hufu_certs::Province;
use serde::{Deserialize, Serialize};

use super::checkpoint::SignedCheckpoint;
use super::proof::{EMPTY_ROOT, Frontier, MAX_PROOF_HASHES};
use super::{AuditEntry, AuditError, TreeHash, leaf_hash, verify_consistency};
use crate::note::MAX_NOTE_BYTES;
use crate::trust::TrustList;

const ENTRIES_FILE: &str = "entries.jsonl";
const CHECKPOINTS_DIR: &str = "checkpoints";

/// Longest line read from `entries.jsonl`: an entry of at most 4 KiB in
/// base64, with room to spare.
const MAX_LINE_BYTES: u64 = 16 * 1024;

/// One line of `entries.jsonl`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryLine {
    index: u64,
    entry: String,
}

/// Writes an audit directory: entries in index order from 0, checkpoints in
/// size order, each with the consistency proof from the one before.
#[derive(Debug)]
pub struct DirWriter {
    dir: PathBuf,
    entries: BufWriter<File>,
    next_entry: u64,
    checkpoints: u64,
    last_size: u64,
}

impl DirWriter {
    /// Starts a directory at `dir`, which must not exist or be empty.
    pub fn create(dir: &Path) -> Result<DirWriter, AuditError> {
        if fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some()) {
            return Err(AuditError::Dir {
                path: dir.to_owned(),
                reason: "the directory is not empty: fetch into a new directory".into(),
            });
        }
        let checkpoints = dir.join(CHECKPOINTS_DIR);
        fs::create_dir_all(&checkpoints).map_err(io("create", &checkpoints))?;
        let path = dir.join(ENTRIES_FILE);
        let file = File::create(&path).map_err(io("create", &path))?;
        Ok(DirWriter {
            dir: dir.to_owned(),
            entries: BufWriter::new(file),
            next_entry: 0,
            checkpoints: 0,
            last_size: 0,
        })
    }

    /// Adds entry `index`, which must be the next one.
    pub fn entry(&mut self, index: u64, bytes: &[u8]) -> Result<(), AuditError> {
        if index != self.next_entry {
            return Err(AuditError::OutOfRange(format!(
                "entry {index} given where entry {} comes next: write entries in order from 0",
                self.next_entry
            )));
        }
        let line = EntryLine {
            index,
            entry: STANDARD.encode(bytes),
        };
        let path = self.dir.join(ENTRIES_FILE);
        serde_json::to_writer(&mut self.entries, &line).map_err(|e| AuditError::Dir {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        self.entries.write_all(b"\n").map_err(io("write", &path))?;
        self.next_entry += 1;
        Ok(())
    }

    /// Adds the next checkpoint and `proof`, its consistency proof from the
    /// checkpoint added before (from size 0, an empty proof, for the
    /// first).
    pub fn checkpoint(
        &mut self,
        checkpoint: &SignedCheckpoint,
        proof: &[TreeHash],
    ) -> Result<(), AuditError> {
        let size = checkpoint.checkpoint().size;
        if size < self.last_size {
            return Err(AuditError::OutOfRange(format!(
                "checkpoint of size {size} after one of size {}: add checkpoints in size order",
                self.last_size
            )));
        }
        self.checkpoints += 1;
        let base = self
            .dir
            .join(CHECKPOINTS_DIR)
            .join(format!("{:06}", self.checkpoints));
        let note = base.with_extension("note");
        fs::write(&note, checkpoint.note()).map_err(io("write", &note))?;
        let proof_path = base.with_extension("proof");
        let proof: String = proof.iter().map(|h| format!("{h}\n")).collect();
        fs::write(&proof_path, proof).map_err(io("write", &proof_path))?;
        self.last_size = size;
        Ok(())
    }

    /// Finishes the directory: the entries must reach the last checkpoint's
    /// size exactly.
    pub fn finish(mut self) -> Result<(), AuditError> {
        if self.next_entry != self.last_size {
            return Err(AuditError::Coverage(format!(
                "{} entries written, but the last checkpoint covers {}: write exactly the entries the checkpoints cover",
                self.next_entry, self.last_size
            )));
        }
        let path = self.dir.join(ENTRIES_FILE);
        self.entries.flush().map_err(io("write", &path))?;
        self.entries
            .get_ref()
            .sync_all()
            .map_err(io("sync", &path))?;
        Ok(())
    }
}

/// What [`verify_dir`] checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// The log's origin.
    pub origin: String,
    pub province: Province,
    /// Entries checked, all covered by the last checkpoint.
    pub entries: u64,
    /// Checkpoints checked.
    pub checkpoints: usize,
    /// The root of the last checkpoint.
    pub root: TreeHash,
    /// The fewest valid cosignatures any checkpoint carries.
    pub min_cosignatures: usize,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} entries and {} checkpoints verified; root {}; every checkpoint cosigned by at least {} other province{}",
            self.origin,
            self.entries,
            self.checkpoints,
            self.root,
            self.min_cosignatures,
            if self.min_cosignatures == 1 { "" } else { "s" }
        )
    }
}

/// Verifies the audit directory `dir` offline against `trust`, the trust
/// list the auditor trusts, and stops at the first failure, which the
/// error names:
///
/// 1. each checkpoint, in order: signed by the log key `trust` gives the
///    origin's province, cosigned by at least `witness_quorum` other
///    members' witnesses, and consistent with the one before by its proof;
/// 2. each entry, in order: numbered in sequence and canonically encoded,
///    and the root of the entries up to each checkpoint's size equal to
///    that checkpoint's root;
/// 3. the entries end exactly at the last checkpoint.
pub fn verify_dir(dir: &Path, trust: &TrustList) -> Result<Report, AuditError> {
    verify_dir_history(dir, std::slice::from_ref(trust))
}

/// How long after a trust list version was issued a checkpoint may still
/// have been published under the version before it: members adopt a new
/// version as it spreads by gossip, not at the instant it is issued.
pub const TRUST_ADOPTION_GRACE_SECS: u64 = 3600;

/// [`verify_dir`] against a chain of trust list versions (`history`, in
/// version order, as a trust directory holds them): each checkpoint is
/// judged against the version in force when it was cosigned, so a member
/// removed later still counts for the checkpoints it cosigned before.
///
/// The version in force is the newest issued at or before the newest
/// cosignature's timestamp; within [`TRUST_ADOPTION_GRACE_SECS`] of its
/// issue the version before it is accepted too. Versions never go back:
/// a checkpoint is never judged against an older version than the one
/// before it, so a removed member's backdated cosignature cannot make a
/// checkpoint after the change count.
pub fn verify_dir_history(dir: &Path, history: &[TrustList]) -> Result<Report, AuditError> {
    if history.is_empty() {
        return Err(AuditError::Dir {
            path: dir.to_owned(),
            reason: "no trust list to verify against: give the trust list the auditor trusts"
                .into(),
        });
    }
    let numbers = checkpoint_numbers(dir)?;
    let Some(&last) = numbers.last() else {
        return Err(AuditError::Dir {
            path: dir.join(CHECKPOINTS_DIR),
            reason: "no checkpoints: nothing to check the entries against; fetch again".into(),
        });
    };

    // Checkpoints first: they are what the entries are checked against.
    let mut heads: Vec<(u64, TreeHash)> = Vec::with_capacity(numbers.len());
    let mut origin: Option<String> = None;
    let mut min_cosignatures = usize::MAX;
    // The index in `history` of the version the checkpoint before was
    // judged against.
    let mut in_force = 0;
    for &n in &numbers {
        let label = format!("checkpoint {n}");
        let path = checkpoint_path(dir, n, "note");
        let signed = SignedCheckpoint::parse(&read_note(&path)?).map_err(|e| AuditError::Dir {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let cp = signed.checkpoint();
        match &origin {
            None => origin = Some(cp.origin.clone()),
            Some(first) if *first != cp.origin => {
                return Err(AuditError::Dir {
                    path,
                    reason: format!(
                        "{label} is of log {}, checkpoint 1 of {first}: a directory holds one log",
                        cp.origin
                    ),
                });
            }
            Some(_) => {}
        }
        let cosigners;
        (in_force, cosigners) = judge(&signed, history, in_force, &label)?;
        min_cosignatures = min_cosignatures.min(cosigners.len());

        let proof = read_proof(&checkpoint_path(dir, n, "proof"))?;
        let (previous, (old_size, old_root)) = match heads.last() {
            Some(&head) => (format!("checkpoint {}", n - 1), head),
            None => ("the empty tree".to_owned(), (0, EMPTY_ROOT)),
        };
        verify_consistency(&proof, old_size, old_root, cp.size, cp.root).map_err(|e| {
            AuditError::Inconsistent {
                checkpoint: label.clone(),
                previous,
                reason: match e {
                    AuditError::InvalidProof(reason) => reason,
                    other => other.to_string(),
                },
            }
        })?;
        heads.push((cp.size, cp.root));
    }
    let origin = origin.expect("at least one checkpoint was read");
    let (last_size, last_root) = *heads.last().expect("at least one checkpoint was read");

    // Then the entries, streamed through a frontier of the tree.
    let mut frontier = Frontier::default();
    let mut next_head = 0;
    let mut matched = 0;
    let mut check_heads = |frontier: &Frontier, next_head: &mut usize| -> Result<(), AuditError> {
        while let Some(&(size, root)) = heads.get(*next_head) {
            if size != frontier.size() {
                break;
            }
            if frontier.root() != root {
                return Err(AuditError::EntryMismatch {
                    first: matched,
                    last: size.saturating_sub(1),
                    checkpoint: numbers[*next_head],
                    size,
                });
            }
            matched = size;
            *next_head += 1;
        }
        Ok(())
    };
    check_heads(&frontier, &mut next_head)?;
    for item in entry_lines(dir)? {
        let StoredLine { line, index, bytes } = item?;
        if index != frontier.size() {
            return Err(AuditError::EntrySequence {
                line,
                expected: frontier.size(),
                found: index,
            });
        }
        if index >= last_size {
            return Err(AuditError::Coverage(format!(
                "entries from {index} on are not covered by checkpoint {last} (size {last_size}): fetch again with a newer checkpoint, or drop them"
            )));
        }
        AuditEntry::decode(&bytes).map_err(|e| AuditError::BadStoredEntry {
            index,
            reason: e.to_string(),
        })?;
        frontier.push(leaf_hash(&bytes));
        check_heads(&frontier, &mut next_head)?;
    }
    if frontier.size() < last_size {
        return Err(AuditError::Coverage(format!(
            "{ENTRIES_FILE} ends after {} entries, but checkpoint {last} covers {last_size}: entries {} to {} are missing; fetch again",
            frontier.size(),
            frontier.size(),
            last_size - 1
        )));
    }

    let (province, _) = super::parse_log_origin(&origin)?;
    Ok(Report {
        origin,
        province,
        entries: frontier.size(),
        checkpoints: numbers.len(),
        root: last_root,
        min_cosignatures,
    })
}

/// Judges `signed` against the trust list version in force when it was
/// cosigned (see [`verify_dir_history`]), never one older than `after`
/// (an index in `history`). Returns the index used and the cosigners.
fn judge(
    signed: &SignedCheckpoint,
    history: &[TrustList],
    after: usize,
    label: &str,
) -> Result<(usize, Vec<Province>), AuditError> {
    let cosigned = signed
        .cosignatures()
        .iter()
        .map(|c| c.time())
        .max()
        .unwrap_or(0);
    let issued = |i: usize| u64::try_from(history[i].issued_at).unwrap_or(0);
    let newest_in_force = (0..history.len())
        .rev()
        .find(|&i| issued(i) <= cosigned)
        .unwrap_or(0)
        .max(after);
    let mut candidates = vec![newest_in_force];
    if newest_in_force > after && cosigned < issued(newest_in_force) + TRUST_ADOPTION_GRACE_SECS {
        candidates.push(newest_in_force - 1);
    }
    let mut first_error = None;
    for i in candidates {
        match signed.verify_labelled(&history[i], label) {
            Ok(cosigners) => return Ok((i, cosigners)),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error.expect("at least one candidate"))
}

/// One entry as read from `entries.jsonl`.
pub(crate) struct StoredLine {
    /// The line number, from 1.
    pub(crate) line: u64,
    /// The index the line claims.
    pub(crate) index: u64,
    /// The encoded entry.
    pub(crate) bytes: Vec<u8>,
}

/// The entries of `dir`, streamed.
pub(crate) fn entry_lines(
    dir: &Path,
) -> Result<impl Iterator<Item = Result<StoredLine, AuditError>>, AuditError> {
    let path = dir.join(ENTRIES_FILE);
    let file = File::open(&path).map_err(io("open", &path))?;
    let mut reader = BufReader::new(file);
    let mut line_no = 0u64;
    Ok(std::iter::from_fn(move || {
        let mut buf = Vec::new();
        line_no += 1;
        let bad = |reason: String| AuditError::Dir {
            path: path.clone(),
            reason: format!("line {line_no}: {reason}"),
        };
        match (&mut reader)
            .take(MAX_LINE_BYTES)
            .read_until(b'\n', &mut buf)
        {
            Ok(0) => None,
            Err(e) => Some(Err(bad(e.to_string()))),
            Ok(_) if !buf.ends_with(b"\n") => Some(Err(bad(format!(
                "longer than {MAX_LINE_BYTES} bytes or not ended by a newline"
            )))),
            Ok(_) => Some(
                serde_json::from_slice::<EntryLine>(&buf)
                    .map_err(|e| {
                        bad(format!(
                            "expected {{\"index\":N,\"entry\":\"<base64>\"}}: {e}"
                        ))
                    })
                    .and_then(|l| {
                        let bytes =
                            STANDARD
                                .decode(&l.entry)
                                .map_err(|e| AuditError::BadStoredEntry {
                                    index: l.index,
                                    reason: format!("not base64: {e}"),
                                })?;
                        Ok(StoredLine {
                            line: line_no,
                            index: l.index,
                            bytes,
                        })
                    }),
            ),
        }
    }))
}

/// The checkpoint numbers in `dir`, checked to run from 1 without gaps.
fn checkpoint_numbers(dir: &Path) -> Result<Vec<u64>, AuditError> {
    let path = dir.join(CHECKPOINTS_DIR);
    let mut numbers = Vec::new();
    for item in fs::read_dir(&path).map_err(io("read", &path))? {
        let name = item.map_err(io("read", &path))?.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".note")) else {
            continue;
        };
        match stem.parse::<u64>() {
            Ok(n) if stem.len() >= 6 && n > 0 => numbers.push(n),
            _ => {
                return Err(AuditError::Dir {
                    path: path.join(&name),
                    reason: "not a checkpoint name: expected NNNNNN.note numbered from 000001"
                        .into(),
                });
            }
        }
    }
    numbers.sort_unstable();
    for (i, &n) in numbers.iter().enumerate() {
        let expected = i as u64 + 1;
        if n != expected {
            return Err(AuditError::Dir {
                path: checkpoint_path(dir, expected, "note"),
                reason: "missing, while later checkpoints are present: fetch again".into(),
            });
        }
    }
    Ok(numbers)
}

fn checkpoint_path(dir: &Path, n: u64, extension: &str) -> PathBuf {
    dir.join(CHECKPOINTS_DIR)
        .join(format!("{n:06}.{extension}"))
}

fn read_note(path: &Path) -> Result<String, AuditError> {
    let mut text = String::new();
    File::open(path)
        .and_then(|f| f.take(MAX_NOTE_BYTES as u64 + 1).read_to_string(&mut text))
        .map_err(io("read", path))?;
    if text.len() > MAX_NOTE_BYTES {
        return Err(AuditError::Dir {
            path: path.to_owned(),
            reason: format!("larger than the {MAX_NOTE_BYTES} bytes a checkpoint may have"),
        });
    }
    Ok(text)
}

fn read_proof(path: &Path) -> Result<Vec<TreeHash>, AuditError> {
    let text = read_note(path)?;
    let bad = |reason: String| AuditError::Dir {
        path: path.to_owned(),
        reason,
    };
    let proof = text
        .lines()
        .map(|line| TreeHash::from_base64(line).map_err(|e| bad(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    if proof.len() > MAX_PROOF_HASHES {
        return Err(bad(format!(
            "{} hashes, more than any proof needs ({MAX_PROOF_HASHES})",
            proof.len()
        )));
    }
    Ok(proof)
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> AuditError + 'a {
    move |source| AuditError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}
