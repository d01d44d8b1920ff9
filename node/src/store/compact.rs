//! Compacting the change log: behind a retention window, only each
//! holder's latest change stays (and each legacy code's current binding),
//! with the number it had, under a statement the issuer signs with its log
//! key (`hufu_federation::snapshot`): how far the compacted part goes, the
//! chain hash there, and a digest of the changes kept. A new member or a
//! node that fell behind installs that part and its statement
//! ([`super::install`]), then follows the feed from just after it: it
//! reaches exactly the issuer's statuses, bindings and feed head.
//!
//! What is dropped is only ever a change that a later change of the same
//! holder (or code) superseded: the latest change of every holder stays,
//! so no answer, and no check of a code still valid, can need what went.
//! The window is at least the longest code lifetime all the same, so that
//! a subscriber a little behind never needs a snapshot.
//!
//! # Format
//!
//! | key | value |
//! |-----|-------|
//! | `K` province | generation (8) ‖ the signed statement (`FeedSnapshot`, protobuf) |
//! | `D` province generation first | a block of kept changes: `(varint(gap) ‖ varint(len) ‖ entry)*` |
//!
//! A kept block's changes are numbered from the key's `first`: each gap is
//! the distance from the change before (from `first - 1` for the first).
//! Entries are those of the change log's blocks ([`codec::entry`]). A
//! compaction writes a new generation of kept blocks, then, in one batch,
//! the statement naming it and the removal of the change-log blocks it
//! covers; the old generation is removed after. A crash at any point
//! leaves one consistent generation in force.

use hufu_certs::Province;
use hufu_federation::audit::LogSigner;
use hufu_federation::snapshot::{KeptDigest, SnapshotStatement};
use hufu_proto::v1::{FeedSnapshot, StatusRecord};
use prost::Message;
use prost::encoding::{decode_varint, encode_varint};

use super::binding::Binding;
use super::codec::{self, BlockReader, CHANGES};
use super::{BLOCK_CHANGES, GENESIS, Store, Tail};
use crate::error::{NodeError, NodeResult};

/// Key kinds of this module.
pub const BASE: u8 = b'K';
pub const KEPT: u8 = b'D';

/// The compacted part of a province's change log, as held here.
#[derive(Debug, Clone, PartialEq)]
pub struct Base {
    pub generation: u64,
    /// The issuer's signed statement about it.
    pub snapshot: FeedSnapshot,
}

impl Base {
    /// The last change it covers.
    pub fn through(&self) -> u64 {
        self.snapshot.through
    }

    /// The chain end it stands for.
    pub fn tail(&self) -> NodeResult<Tail> {
        Ok(Tail {
            sequence: self.snapshot.through,
            hash: self
                .snapshot
                .chain_hash
                .as_slice()
                .try_into()
                .map_err(|_| {
                    NodeError::Internal("stored snapshot statement has a bad chain hash".into())
                })?,
        })
    }
}

/// The statement of `statement`, signed, as sent and stored.
pub fn signed(statement: &SnapshotStatement, signer: &LogSigner) -> FeedSnapshot {
    FeedSnapshot {
        issuer: statement.issuer.to_string(),
        through: statement.through,
        chain_hash: statement.chain_hash.to_vec(),
        kept: statement.kept,
        digest: statement.digest.to_vec(),
        signature: statement.sign(signer),
    }
}

/// The key of a kept block.
pub(super) fn kept_key(p: Province, generation: u64, first: u64) -> Vec<u8> {
    let mut rest = generation.to_be_bytes().to_vec();
    rest.extend_from_slice(&first.to_be_bytes());
    codec::key(KEPT, p, &rest)
}

/// A kept block being written.
pub(super) struct KeptWriter {
    first: u64,
    previous: u64,
    bytes: Vec<u8>,
    count: usize,
}

impl KeptWriter {
    pub(super) fn new() -> KeptWriter {
        KeptWriter {
            first: 0,
            previous: 0,
            bytes: Vec::new(),
            count: 0,
        }
    }

    pub(super) fn push(&mut self, sequence: u64, entry: &[u8]) {
        if self.count == 0 {
            self.first = sequence;
            self.previous = sequence - 1;
        }
        encode_varint(sequence - self.previous, &mut self.bytes);
        encode_varint(entry.len() as u64, &mut self.bytes);
        self.bytes.extend_from_slice(entry);
        self.previous = sequence;
        self.count += 1;
    }

    pub(super) fn is_full(&self) -> bool {
        self.count >= BLOCK_CHANGES
    }

    /// Stages the block into `batch` (if it holds anything) and starts
    /// afresh.
    pub(super) fn stage(&mut self, p: Province, generation: u64, batch: &mut sled::Batch) {
        if self.count > 0 {
            let bytes = std::mem::take(&mut self.bytes);
            batch.insert(kept_key(p, generation, self.first), bytes);
        }
        *self = KeptWriter::new();
    }
}

/// The changes of a kept block: number and bytes.
fn read_kept(p: Province, first: u64, block: &[u8]) -> NodeResult<Vec<(u64, Vec<u8>)>> {
    let corrupt = || NodeError::Internal("stored kept block is corrupt".into());
    let mut rest = block;
    let mut previous = first - 1;
    let mut out = Vec::new();
    while !rest.is_empty() {
        let gap = decode_varint(&mut rest).map_err(|_| corrupt())?;
        let len = decode_varint(&mut rest).map_err(|_| corrupt())? as usize;
        if len > rest.len() || gap == 0 {
            return Err(corrupt());
        }
        let (entry, after) = rest.split_at(len);
        rest = after;
        previous += gap;
        out.push((previous, codec::entry_bytes(p, entry)?));
    }
    Ok(out)
}

/// The change-log entry for a change's bytes of province `p`.
fn entry_of(p: Province, bytes: &[u8]) -> NodeResult<Vec<u8>> {
    if Binding::from_change_bytes(bytes).is_some() {
        return Ok(codec::binding_entry(bytes));
    }
    let record = StatusRecord::decode(bytes)?;
    Ok(codec::entry(p, &record, bytes))
}

impl Store {
    /// The compacted part of `p`'s change log, if any.
    pub fn base(&self, p: Province) -> NodeResult<Option<Base>> {
        match self.tree()?.get(codec::key(BASE, p, &[]))? {
            Some(v) if v.len() > 8 => Ok(Some(Base {
                generation: u64::from_be_bytes(v[..8].try_into().expect("8 bytes")),
                snapshot: FeedSnapshot::decode(&v[8..])?,
            })),
            Some(_) => Err(NodeError::Internal(
                "stored snapshot statement is corrupt".into(),
            )),
            None => Ok(None),
        }
    }

    /// The error for changes of `p` asked for from `after`, which `base`
    /// compacted.
    pub fn compacted(p: Province, after: u64, base: &Base) -> NodeError {
        NodeError::OutOfRange(format!(
            "changes of {p} up to {} are compacted, and change {} was asked for: take the snapshot of {p}'s feed (GetSnapshot), then follow it after change {}",
            base.through(),
            after + 1,
            base.through()
        ))
    }

    /// Kept changes of `base` (of `p`) after `after`, at most `max`.
    pub fn kept_changes(
        &self,
        p: Province,
        base: &Base,
        after: u64,
        max: usize,
    ) -> NodeResult<Vec<(u64, Vec<u8>)>> {
        let start = kept_key(p, base.generation, 0);
        let end = kept_key(p, base.generation, u64::MAX);
        let mut out = Vec::new();
        for item in self.tree()?.range(start..=end) {
            let (k, v) = item?;
            let first = k
                .get(13..21)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| NodeError::Internal("kept block key is corrupt".into()))?;
            for (sequence, bytes) in read_kept(p, first, &v)? {
                if sequence <= after {
                    continue;
                }
                out.push((sequence, bytes));
                if out.len() >= max {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }

    /// Whether change `bytes` of `p` still counts: it is its holder's
    /// current status, or its code's current binding. A change that cannot
    /// be judged is kept.
    fn still_current(&self, p: Province, bytes: &[u8]) -> NodeResult<bool> {
        match Binding::from_change_bytes(bytes) {
            Some(Ok(binding)) => Ok(match &binding.holder {
                Some(holder) => self.binding(p, &binding.hash)?.as_deref() == Some(holder.as_str()),
                // An unbinding: a code never bound reads the same.
                None => false,
            }),
            Some(Err(_)) => Ok(true),
            None => {
                let record = StatusRecord::decode(bytes)?;
                Ok(self.get(p, &record.holder)?.as_ref() == Some(&record))
            }
        }
    }

    /// Compacts this province's change log: the blocks written before
    /// `cutoff_ms` (unix ms), from the oldest on, are replaced by each
    /// holder's latest change among them, under a statement signed by
    /// `signer`. Returns the last change compacted, or None when nothing
    /// was old enough.
    pub async fn compact_own(&self, cutoff_ms: i64, signer: &LogSigner) -> NodeResult<Option<u64>> {
        let p = self.own;
        // A change dropped here is never replayed into unmerged statuses
        // again (`super::merge`): only what is merged may be compacted.
        self.merge().await?;
        let tree = self.tree()?;
        let merged = super::merge::merged_through(&tree, p)?;
        let old = self.base(p)?;
        let mut end = match &old {
            Some(base) => base.tail()?,
            None => GENESIS,
        };
        let covered_from = end.sequence;
        // The blocks to compact: the oldest ones, written before the cutoff.
        let mut blocks = Vec::new();
        for item in tree.scan_prefix(codec::key(CHANGES, p, &[])) {
            let (k, v) = item?;
            let mut reader = BlockReader::new(p, codec::block_first(&k)?, &v)?;
            if reader.written_ms() >= cutoff_ms {
                break;
            }
            reader.skip_through(u64::MAX)?;
            if reader.next_sequence() - 1 > merged {
                break;
            }
            end = Tail {
                sequence: reader.next_sequence() - 1,
                hash: reader.hash(),
            };
            blocks.push(k);
        }
        if end.sequence <= covered_from {
            return Ok(None);
        }

        // The kept changes, old kept ones first, in a new generation.
        let generation = old.as_ref().map_or(1, |b| b.generation + 1);
        let mut digest = KeptDigest::default();
        let mut writer = KeptWriter::new();
        let mut keep = |sequence: u64, bytes: &[u8], writer: &mut KeptWriter| -> NodeResult<()> {
            if !self.still_current(p, bytes)? {
                return Ok(());
            }
            digest
                .add(sequence, bytes)
                .map_err(|e| NodeError::Internal(e.to_string()))?;
            writer.push(sequence, &entry_of(p, bytes)?);
            if writer.is_full() {
                let mut batch = sled::Batch::default();
                writer.stage(p, generation, &mut batch);
                self.apply(batch)?;
            }
            Ok(())
        };
        if let Some(base) = &old {
            let mut after = 0;
            loop {
                let chunk = self.kept_changes(p, base, after, BLOCK_CHANGES)?;
                let Some((last, _)) = chunk.last() else { break };
                after = *last;
                for (sequence, bytes) in &chunk {
                    keep(*sequence, bytes, &mut writer)?;
                }
            }
        }
        for k in &blocks {
            let Some(v) = tree.get(k)? else { continue };
            let mut reader = BlockReader::new(p, codec::block_first(k)?, &v)?;
            while let Some(change) = reader.next_change()? {
                keep(change.sequence, &change.bytes, &mut writer)?;
            }
        }
        let mut batch = sled::Batch::default();
        writer.stage(p, generation, &mut batch);
        let (kept, digest) = digest.finish();
        let statement = SnapshotStatement {
            issuer: p,
            through: end.sequence,
            chain_hash: end.hash,
            kept,
            digest,
        };
        let mut value = generation.to_be_bytes().to_vec();
        value.extend_from_slice(&signed(&statement, signer).encode_to_vec());
        batch.insert(codec::key(BASE, p, &[]), value);
        let removed = blocks.len();
        for k in blocks {
            batch.remove(k);
        }
        self.write(batch, removed * BLOCK_CHANGES).await?;
        if let Some(base) = old {
            self.remove_generation(p, base.generation).await?;
        }
        Ok(Some(end.sequence))
    }

    /// Removes the kept blocks of an old generation.
    pub(super) async fn remove_generation(&self, p: Province, generation: u64) -> NodeResult<()> {
        let start = kept_key(p, generation, 0);
        let end = kept_key(p, generation, u64::MAX);
        let keys: Vec<_> = self
            .tree()?
            .range(start..=end)
            .keys()
            .collect::<Result<_, _>>()?;
        for chunk in keys.chunks(BLOCK_CHANGES) {
            let mut batch = sled::Batch::default();
            for k in chunk {
                batch.remove(k.clone());
            }
            self.apply(batch)?;
        }
        self.flush().await
    }
}
