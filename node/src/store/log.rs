//! The change log: reading blocks back as numbered, chained changes, and
//! the seam where every write enters it ([`Store::apply_own`], and the
//! staging it shares with replicated batches).

use hufu_certs::Province;
use hufu_federation::feed::{Change, FeedError};
use hufu_proto::v1::StatusRecord;
use prost::Message;

use super::binding::Binding;
use super::bucket::{self, Holder};
use super::codec::{self, BlockReader, BlockWriter, CHANGES};
use super::{ApplyError, BLOCK_CHANGES, GENESIS, Store, StoredChange, Tail};
use crate::error::{NodeError, NodeResult};

impl Store {
    /// The block holding change `sequence` of `p` (or the last block before
    /// it), as its first sequence and bytes.
    fn block_at(&self, p: Province, sequence: u64) -> NodeResult<Option<(u64, sled::IVec)>> {
        let start = codec::block_key(p, 0);
        let end = codec::block_key(p, sequence);
        match self.tree()?.range(start..=end).next_back() {
            Some(item) => {
                let (k, v) = item?;
                Ok(Some((codec::block_first(&k)?, v)))
            }
            None => Ok(None),
        }
    }

    /// The end of `p`'s change log as stored.
    pub(super) fn tail_from_disk(&self, p: Province) -> NodeResult<Tail> {
        match self
            .tree()?
            .scan_prefix(codec::key(CHANGES, p, &[]))
            .next_back()
        {
            Some(item) => {
                let (k, v) = item?;
                let mut reader = BlockReader::new(p, codec::block_first(&k)?, &v)?;
                reader.skip_through(u64::MAX)?;
                Ok(Tail {
                    sequence: reader.next_sequence() - 1,
                    hash: reader.hash(),
                })
            }
            None => match self.base(p)? {
                Some(base) => base.tail(),
                None => Ok(GENESIS),
            },
        }
    }

    /// Changes of `p` numbered `after+1 ..= until`, at most `max`, with the
    /// chain hash after each.
    pub fn changes(
        &self,
        p: Province,
        after: u64,
        until: u64,
        max: usize,
    ) -> NodeResult<Vec<StoredChange>> {
        let read = self.read_changes(p, after, until, max);
        // Reading pages blocks in and out of sled's cache, which frees them
        // through the same collector as writes: a feed served to a replica
        // catching up reads the whole log.
        if let Ok(changes) = &read {
            super::reclaim(changes.len());
        }
        read
    }

    fn read_changes(
        &self,
        p: Province,
        after: u64,
        until: u64,
        max: usize,
    ) -> NodeResult<Vec<StoredChange>> {
        let mut out = Vec::new();
        if after >= until || max == 0 {
            return Ok(out);
        }
        if let Some(base) = self.base(p)?
            && after < base.through()
        {
            return Err(Store::compacted(p, after, &base));
        }
        let first = match self.block_at(p, after + 1)? {
            Some((first, _)) => first,
            None => 0,
        };
        let tree = self.tree()?;
        for item in tree.range(codec::block_key(p, first)..=codec::block_key(p, until)) {
            let (k, v) = item?;
            let mut reader = BlockReader::new(p, codec::block_first(&k)?, &v)?;
            reader.skip_through(after)?;
            while let Some(change) = reader.next_change()? {
                if change.sequence > until {
                    return Ok(out);
                }
                out.push((change.sequence, change.hash, change.bytes));
                if out.len() >= max {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }

    /// The chain hash after change `seq` of `p`, if held.
    pub fn held_hash(&self, p: Province, seq: u64) -> Option<[u8; 32]> {
        if seq == 0 {
            return Some(GENESIS.hash);
        }
        let Some((first, block)) = self.block_at(p, seq).ok()? else {
            // The end of the compacted part, if that is where `seq` is.
            let base = self.base(p).ok()??;
            return (base.through() == seq).then(|| base.tail().ok().map(|t| t.hash))?;
        };
        let mut reader = BlockReader::new(p, first, &block).ok()?;
        reader.skip_through(seq - 1).ok()?;
        let change = reader.next_change().ok()??;
        (change.sequence == seq).then_some(change.hash)
    }

    /// Stages `changes` of `p`, which must continue `tail` without a gap,
    /// into `batch`: their blocks of the change log and the bindings they
    /// set; the statuses they set go to `statuses`, for the unmerged table
    /// once the batch is durable. Returns the tail after them. The one
    /// place a change's bytes become stored state, for own writes and
    /// replicated batches alike.
    pub(super) fn stage(
        &self,
        p: Province,
        tail: Tail,
        changes: &[Change<'_>],
        batch: &mut sled::Batch,
        statuses: &mut Vec<(Holder, Vec<u8>)>,
    ) -> Result<Tail, ApplyError> {
        let written_ms = crate::status::now_millis();
        let staged_before = statuses.len();
        let mut next = tail;
        let mut block: Option<(u64, BlockWriter)> = None;
        for change in changes {
            if change.sequence != next.sequence + 1 {
                return Err(FeedError::Gap {
                    expected: next.sequence + 1,
                    first: change.sequence,
                }
                .into());
            }
            let (_, writer) = block
                .get_or_insert_with(|| (change.sequence, BlockWriter::new(&next.hash, written_ms)));
            let entry = stage_effect(p, change, batch, statuses)?;
            writer.push(&entry);
            next = Tail {
                sequence: change.sequence,
                hash: hufu_federation::feed::chain_next(&next.hash, change.sequence, change.record),
            };
            if writer.count() >= BLOCK_CHANGES {
                let (first, full) = block.take().expect("just used");
                batch.insert(codec::block_key(p, first), full.into_bytes());
            }
        }
        if let Some((first, writer)) = block {
            batch.insert(codec::block_key(p, first), writer.into_bytes());
        }
        if p == self.own {
            // Before the write: the filter never misses a stored holder.
            self.presence
                .add(statuses[staged_before..].iter().map(|(h, _)| h));
        }
        Ok(next)
    }

    /// **The seam where a change of this province enters the change log.**
    ///
    /// Applies `changes`, numbered in order from the tail on with the
    /// sequence each was given (by this node's writer, or by a shared write
    /// log whose sequence is the feed's), as one atomic write that is
    /// durable when this returns, and wakes feed subscribers. Changes
    /// already held are skipped when identical (a redelivery) and refused
    /// as a fork when not. Returns the tail after them.
    pub async fn apply_own(&self, changes: &[Change<'_>]) -> Result<Tail, ApplyError> {
        let mut tail = self.own_writer.lock().await;
        let mut fresh = changes;
        while let Some((first, rest)) = fresh.split_first() {
            if first.sequence > tail.sequence {
                break;
            }
            let bytes_hash = self.held_record(self.own, first.sequence)?;
            if bytes_hash.as_deref() != Some(first.record) {
                return Err(FeedError::Fork {
                    sequence: first.sequence,
                }
                .into());
            }
            fresh = rest;
        }
        let new = self.append_own(&mut tail, fresh).await?;
        Ok(new)
    }

    /// Appends changes continuing `tail` (whose lock the caller holds),
    /// durably, then moves the tail and wakes subscribers.
    pub(super) async fn append_own(
        &self,
        tail: &mut Tail,
        changes: &[Change<'_>],
    ) -> Result<Tail, ApplyError> {
        match self.stage_write(*tail, changes)? {
            Some(staged) => self.write_own(tail, staged).await,
            None => Ok(*tail),
        }
    }

    /// The first half of [`append_own`](Self::append_own): the write of
    /// `changes` continuing `tail`, staged but not applied (None: nothing
    /// to write). The tail's lock is held until it is written.
    pub(super) fn stage_write(
        &self,
        tail: Tail,
        changes: &[Change<'_>],
    ) -> Result<Option<OwnWrite>, ApplyError> {
        if changes.is_empty() {
            return Ok(None);
        }
        if !self.writable() {
            return Err(self.refusal().into());
        }
        let mut batch = sled::Batch::default();
        let mut statuses = Vec::with_capacity(changes.len());
        let next = self.stage(self.own, tail, changes, &mut batch, &mut statuses)?;
        Ok(Some(OwnWrite {
            batch,
            statuses,
            next,
            changes: changes.len(),
        }))
    }

    /// The second half: applies `staged` durably, then moves `tail` (still
    /// the one it was staged from) and wakes subscribers.
    pub(super) async fn write_own(
        &self,
        tail: &mut Tail,
        staged: OwnWrite,
    ) -> Result<Tail, ApplyError> {
        self.write(staged.batch, staged.changes).await?;
        Ok(self.publish_own(tail, staged.statuses, staged.next).await)
    }

    /// Once the write ending at `next` is durable: its `statuses` go to the
    /// unmerged table, `tail` moves to `next` and subscribers wake.
    pub(super) async fn publish_own(
        &self,
        tail: &mut Tail,
        statuses: Vec<(Holder, Vec<u8>)>,
        next: Tail,
    ) -> Tail {
        self.unmerged.put(self.own, next.sequence, statuses);
        *tail = next;
        self.notify(self.own, next.sequence);
        self.unmerged.make_room().await;
        next
    }

    /// The bytes of change `seq` of `p`, if held.
    fn held_record(&self, p: Province, seq: u64) -> NodeResult<Option<Vec<u8>>> {
        Ok(self
            .changes(p, seq.saturating_sub(1), seq, 1)?
            .pop()
            .filter(|(s, _, _)| *s == seq)
            .map(|(_, _, bytes)| bytes))
    }
}

/// An own write staged: its sled batch, the statuses it sets and the tail
/// after it.
pub(super) struct OwnWrite {
    pub(super) batch: sled::Batch,
    pub(super) statuses: Vec<(Holder, Vec<u8>)>,
    pub(super) next: Tail,
    pub(super) changes: usize,
}

/// Stages the effect of `change` of `p`: a binding into `batch`, a status
/// into `statuses`. Returns its change-log entry.
pub(super) fn stage_effect(
    p: Province,
    change: &Change<'_>,
    batch: &mut sled::Batch,
    statuses: &mut Vec<(Holder, Vec<u8>)>,
) -> Result<Vec<u8>, ApplyError> {
    if let Some(binding) = Binding::from_change_bytes(change.record) {
        let binding = binding
            .map_err(|e| FeedError::Malformed(format!("change {}: {e}", change.sequence)))?;
        binding.stage(p, batch);
        return Ok(codec::binding_entry(change.record));
    }
    let (record, holder) = decode_status(p, change)?;
    let value = codec::status_value(p, &record, change.record);
    let entry = codec::entry_of_value(&holder, &value);
    statuses.push((holder, value));
    Ok(entry)
}

/// A change's status record, checked to belong to `p`'s feed, and its
/// holder's bytes.
fn decode_status(
    p: Province,
    change: &Change<'_>,
) -> Result<(StatusRecord, bucket::Holder), ApplyError> {
    let record = StatusRecord::decode(change.record)
        .map_err(|e| FeedError::Malformed(format!("change {}: {e}", change.sequence)))?;
    if !codec::names(p, &record.issuer) {
        return Err(FeedError::Malformed(format!(
            "change {} is a record of {}, in the feed of {p}",
            change.sequence, record.issuer
        ))
        .into());
    }
    // 26 base32 characters of 16 bytes: what a `HolderId` parses.
    match codec::holder_bytes(&record.holder) {
        Some(holder) => Ok((record, holder)),
        None => {
            Err(FeedError::Malformed(format!("change {}: bad holder id", change.sequence)).into())
        }
    }
}

impl From<ApplyError> for NodeError {
    fn from(e: ApplyError) -> Self {
        match e {
            ApplyError::Node(e) => e,
            ApplyError::Feed(e) => NodeError::Internal(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hufu_proto::v1::StatusRecord;

    fn bytes(holder: &str, secs: i64) -> Vec<u8> {
        StatusRecord {
            issuer: "440000".into(),
            holder: holder.into(),
            colour: 3,
            as_of: Some(crate::status::timestamp(secs)),
            last_negative_test: None,
            reason: 3,
        }
        .encode_to_vec()
    }

    #[tokio::test]
    async fn a_log_consumer_applies_ordered_changes_once_and_refuses_forks_and_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let gd = Province::parse("440000").unwrap();
        let store = Store::open(dir.path(), gd).unwrap();
        let h = "MFRGGZDFMZTWQ2LKNNWG23TPOA";
        let records: Vec<_> = (1..=3).map(|i| bytes(h, 1_600_000_000 + i)).collect();
        let changes: Vec<_> = (0..3)
            .map(|i| Change {
                sequence: i as u64 + 1,
                record: &records[i],
            })
            .collect();
        let tail = store.apply_own(&changes[..2]).await.unwrap();
        assert_eq!(tail.sequence, 2);
        // Redelivered with one more: the held ones are skipped.
        let tail = store.apply_own(&changes).await.unwrap();
        assert_eq!(tail.sequence, 3);
        assert_eq!(
            store.get(gd, h).unwrap().unwrap().encode_to_vec(),
            records[2]
        );
        assert_eq!(store.changes(gd, 0, 3, 10).unwrap().len(), 3);
        // A different change 2 is a fork; change 5 after 3 is a gap.
        let other = bytes(h, 1);
        let fork = store
            .apply_own(&[Change {
                sequence: 2,
                record: &other,
            }])
            .await;
        assert!(matches!(
            fork,
            Err(ApplyError::Feed(FeedError::Fork { sequence: 2 }))
        ));
        let gap = store
            .apply_own(&[Change {
                sequence: 5,
                record: &other,
            }])
            .await;
        assert!(matches!(
            gap,
            Err(ApplyError::Feed(FeedError::Gap {
                expected: 4,
                first: 5
            }))
        ));
        // The chain survives a restart.
        drop(store);
        let store = Store::open(dir.path(), gd).unwrap();
        assert_eq!(store.tail(gd).await.unwrap(), tail);
    }

    /// Allocated and apparent bytes of sled's log file under `dir`.
    fn log_file_bytes(dir: &std::path::Path) -> (u64, u64) {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(dir.join("db")).unwrap();
        (meta.blocks() * 512, meta.len())
    }

    #[tokio::test]
    async fn statuses_rewritten_at_random_give_freed_space_back_and_reopen_intact() {
        let dir = tempfile::tempdir().unwrap();
        let gd = Province::parse("440000").unwrap();
        let store = Store::open_with_cache(dir.path(), gd, 1 << 20).unwrap();
        let secret = hufu_federation::holder::HolderSecret::new(&[7; 32]).unwrap();
        let holders: Vec<String> = (0..20_000)
            .map(|i| {
                secret
                    .pseudonym(&crate::sample::national_id(gd, i))
                    .to_string()
            })
            .collect();
        // Every holder rewritten many times, in batches, as imports do:
        // each write replaces bucket pages all over the file.
        let mut last = Vec::new();
        for round in 0..6 {
            last = holders
                .iter()
                .map(|h| StatusRecord::decode(&bytes(h, 1_600_000_000 + round)[..]).unwrap())
                .collect();
            for chunk in last.chunks(1_000) {
                store.put_many(chunk).await.unwrap();
            }
        }
        let tail = store.tail(gd).await.unwrap();
        assert_eq!(tail.sequence, 6 * 20_000);
        // Segments freed below the file's end no longer take disk space
        // (without that, the file stays allocated to its full length). sled
        // goes on cleaning in the background once writes stop.
        let mut sizes = (0, 0);
        for _ in 0..100 {
            store.flush().await.unwrap();
            sizes = log_file_bytes(dir.path());
            if sizes.0 < sizes.1 * 9 / 10 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let (allocated, apparent) = sizes;
        assert!(
            allocated < apparent * 9 / 10,
            "{allocated} bytes allocated of {apparent}"
        );
        drop(store);
        // sled's flusher lets go of the files a moment after the drop.
        let mut reopened = Store::open(dir.path(), gd);
        for _ in 0..100 {
            if reopened.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            reopened = Store::open(dir.path(), gd);
        }
        let store = reopened.unwrap();
        assert_eq!(store.tail(gd).await.unwrap(), tail);
        for record in &last {
            assert_eq!(
                store.get(gd, &record.holder).unwrap().as_ref(),
                Some(record)
            );
        }
        assert_eq!(store.changes(gd, 119_990, 120_000, 100).unwrap().len(), 10);
    }
}
