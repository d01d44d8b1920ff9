//! Merging unmerged statuses ([`super::unmerged`]) into their buckets, in
//! key order, and replaying the change log into the table when the store
//! opens.
//!
//! # Format
//!
//! | key | value |
//! |-----|-------|
//! | `M` province | the last change of the province merged into its buckets (8 bytes, big-endian) |
//! | `O` | present: the `M` keys say what is merged (absent in a store written before, whose buckets hold every change) |
//!
//! A merge walks the frozen table in key order: for each bucket that a
//! status falls in, it reads the bucket once, puts in every status of the
//! table up to the next bucket, and writes it back, split in parts when it
//! grew past [`BUCKET_HOLDERS`](super::bucket::BUCKET_HOLDERS), a few
//! thousand buckets to a sled batch. The parts of one bucket are written
//! from the last to the first, the bucket's own key last: until that key
//! is rewritten, the holders below the parts already written are still
//! found in the old bucket, and those above in the new parts, so that a
//! merge cut short at any batch leaves every status readable. When all
//! buckets are written and flushed, one batch records, per province, the
//! change the table went through (`M`). When the store opens, every
//! province's changes after its `M` are read back from the change log
//! into the table: statuses are absolute and applied in order, so a merge
//! cut short (by `kill -9`) is simply done again.

use hufu_certs::Province;
use hufu_proto::v1::StatusRecord;
use prost::Message;

use super::binding::Binding;
use super::bucket::{self, FIRST, Holder};
use super::codec::{self, LATEST_HEAD};
use super::unmerged::{Table, Unmerged};
use super::{BLOCK_CHANGES, Open, Store};
use crate::error::{NodeError, NodeResult};

/// Key kind of a province's merged-through mark.
pub const MERGED: u8 = b'M';

/// Key of the mark that the `M` keys are authoritative.
const ORDERED: [u8; 1] = [b'O'];

/// Buckets (parts) written to one sled batch of a merge.
const BATCH_PARTS: usize = 2048;

fn merged_key(p: Province) -> Vec<u8> {
    codec::key(MERGED, p, &[])
}

/// The last change of `p` merged into its buckets.
pub(super) fn merged_through(tree: &sled::Tree, p: Province) -> NodeResult<u64> {
    Ok(tree
        .get(merged_key(p))?
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map_or(0, u64::from_be_bytes))
}

/// Stages `p`'s merged-through mark at `sequence` into `batch`.
pub(super) fn stage_mark(batch: &mut sled::Batch, p: Province, sequence: u64) {
    batch.insert(merged_key(p), &sequence.to_be_bytes()[..]);
}

/// The merging thread of a store: merges each frozen table, until the
/// store closes.
pub(super) fn run(open: std::sync::Arc<std::sync::RwLock<Option<Open>>>, unmerged: &Unmerged) {
    while unmerged.wait() {
        let _merging = unmerged.merging.lock().expect("merging lock");
        if unmerged.closing() {
            return;
        }
        let Some(table) = unmerged.due() else {
            continue;
        };
        let Some((db, tree)) = open
            .read()
            .expect("store lock")
            .as_ref()
            .map(|o| (o.db.clone(), o.tree.clone()))
        else {
            // Being reopened after a failed write: the next tick retries.
            continue;
        };
        let started = std::time::Instant::now();
        match merge(&db, &tree, &table, BATCH_PARTS, || unmerged.closing()) {
            Ok(true) => {
                tracing::debug!(
                    statuses = table.statuses().count(),
                    ms = started.elapsed().as_millis() as u64,
                    "unmerged statuses merged into their buckets"
                );
                unmerged.ended(Ok(()));
            }
            Ok(false) => return,
            Err(err) => {
                tracing::warn!(error = %err, "merging statuses into their buckets failed: retrying");
                unmerged.ended(Err(err.to_string()));
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
    }
}

/// Writes `table` into the buckets of `tree`, `batch_parts` buckets to a
/// sled batch, and marks it merged. False when `closing` said to stop
/// first (nothing is marked).
fn merge(
    db: &sled::Db,
    tree: &sled::Tree,
    table: &Table,
    batch_parts: usize,
    closing: impl Fn() -> bool,
) -> NodeResult<bool> {
    let mut batch = sled::Batch::default();
    let mut parts_staged = 0;
    let mut statuses = table.statuses().peekable();
    while let Some((p, holder, _)) = statuses.peek().copied() {
        let (low, stored) = match bucket::find(tree, p, holder)? {
            Some((low, bytes)) => (low, Some(bytes)),
            None => (FIRST, None),
        };
        let upper = bucket::next_low(tree, p, &low)?;
        let mut changes: Vec<(Holder, &[u8])> = Vec::new();
        while let Some((_, h, v)) =
            statuses.next_if(|(q, h, _)| *q == p && upper.as_ref().is_none_or(|u| *h < u))
        {
            changes.push((*h, v));
        }
        let parts = bucket::merged(stored.as_deref().unwrap_or(&[]), upper.as_ref(), &changes)?;
        for (i, (first, part)) in parts.into_iter().enumerate().rev() {
            let part_low = if i == 0 { low } else { first };
            batch.insert(bucket::bucket_key(p, &part_low), part);
            parts_staged += 1;
            if parts_staged >= batch_parts {
                tree.apply_batch(std::mem::take(&mut batch))?;
                super::reclaim(parts_staged * 4);
                parts_staged = 0;
                if closing() {
                    return Ok(false);
                }
            }
        }
    }
    tree.apply_batch(batch)?;
    super::reclaim(parts_staged * 4);
    // The buckets are durable before the mark that says so.
    db.flush()?;
    let mut marks = sled::Batch::default();
    for (p, through) in table.through() {
        stage_mark(&mut marks, *p, *through);
    }
    tree.apply_batch(marks)?;
    db.flush()?;
    Ok(true)
}

impl Store {
    /// Merges every status written so far into its bucket, and returns
    /// once that is durable. What reads buckets wholesale (compaction,
    /// tools, tests that alter stored bytes) calls it first.
    pub async fn merge(&self) -> NodeResult<()> {
        self.unmerged.merge_all().await
    }

    /// Statuses written but not merged into their buckets yet.
    pub fn unmerged(&self) -> usize {
        self.unmerged.len()
    }

    /// Puts back into the table what the change log holds past each
    /// province's merged-through mark (when the store opens). A store of
    /// the format before gets its marks first: its buckets hold every
    /// change.
    pub(super) fn replay(&self) -> NodeResult<()> {
        let tree = self.tree()?;
        let mut provinces = vec![self.own];
        for kind in [LATEST_HEAD, MERGED] {
            for item in tree.scan_prefix([kind]).keys() {
                if let Some(p) = province_of(&item?) {
                    provinces.push(p);
                }
            }
        }
        provinces.sort();
        provinces.dedup();
        if tree.get(ORDERED)?.is_none() {
            let mut batch = sled::Batch::default();
            for p in &provinces {
                stage_mark(&mut batch, *p, self.tail_from_disk(*p)?.sequence);
            }
            batch.insert(&ORDERED[..], &[][..]);
            tree.apply_batch(batch)?;
            tree.flush()?;
        }
        for p in provinces {
            let mut after = merged_through(&tree, p)?;
            if let Some(base) = self.base(p)?
                && base.through() > after
            {
                // Compaction keeps to what is merged; a mark behind the
                // compacted part can only be older than it.
                after = base.through();
            }
            loop {
                let changes = self.changes(p, after, u64::MAX, BLOCK_CHANGES)?;
                let Some((last, _, _)) = changes.last() else {
                    break;
                };
                after = *last;
                let mut statuses = Vec::with_capacity(changes.len());
                for (sequence, _, bytes) in &changes {
                    if Binding::from_change_bytes(bytes).is_some() {
                        continue;
                    }
                    let record = StatusRecord::decode(&bytes[..])?;
                    let holder = codec::holder_bytes(&record.holder).ok_or_else(|| {
                        NodeError::Internal(format!(
                            "change {sequence} of {p} in the change log has a bad holder"
                        ))
                    })?;
                    statuses.push((holder, codec::status_value(p, &record, bytes)));
                }
                self.unmerged.put(p, after, statuses);
            }
        }
        Ok(())
    }
}

/// The province of a key `kind ‖ province ‖ …`.
fn province_of(key: &[u8]) -> Option<Province> {
    let code = <[u8; 4]>::try_from(key.get(1..5)?).ok()?;
    Province::from_code(u32::from_be_bytes(code)).ok()
}

#[cfg(test)]
pub(super) mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::store::bucket::{BUCKET, BUCKET_HOLDERS};

    pub(in crate::store) fn gd() -> Province {
        Province::parse("440000").unwrap()
    }

    pub(in crate::store) fn holders(n: u64) -> Vec<String> {
        let secret = hufu_federation::holder::HolderSecret::new(&[7; 32]).unwrap();
        (0..n)
            .map(|i| {
                secret
                    .pseudonym(&crate::sample::national_id(gd(), i))
                    .to_string()
            })
            .collect()
    }

    pub(in crate::store) fn record(holder: &str, secs: i64) -> StatusRecord {
        StatusRecord {
            issuer: "440000".into(),
            holder: holder.into(),
            colour: (secs % 3) as i32 + 1,
            as_of: Some(crate::status::timestamp(secs)),
            last_negative_test: None,
            reason: 3,
        }
    }

    /// Writes rounds `rounds` over `holders`, in batches of `batch`, each
    /// round newer than the one before; returns each holder's last record.
    async fn write_rounds(
        store: &Store,
        holders: &[String],
        rounds: std::ops::Range<i64>,
        batch: usize,
    ) -> BTreeMap<String, StatusRecord> {
        let mut last = BTreeMap::new();
        for round in rounds {
            let records: Vec<_> = holders
                .iter()
                .map(|h| record(h, 1_600_000_000 + round))
                .collect();
            for chunk in records.chunks(batch) {
                store.put_many(chunk).await.unwrap();
            }
            last.extend(records.into_iter().map(|r| (r.holder.clone(), r)));
        }
        last
    }

    /// Every status held in `p`'s buckets, checking that each bucket is
    /// sorted, within its bounds and no larger than allowed.
    fn in_buckets(tree: &sled::Tree, p: Province) -> BTreeMap<Holder, Vec<u8>> {
        let mut out = BTreeMap::new();
        let buckets: Vec<_> = tree
            .scan_prefix(codec::key(BUCKET, p, &[]))
            .map(|item| item.unwrap())
            .collect();
        for (n, (k, v)) in buckets.iter().enumerate() {
            let low: Holder = k[5..].try_into().unwrap();
            let upper: Option<Holder> = buckets.get(n + 1).map(|(k, _)| k[5..].try_into().unwrap());
            let parts = bucket::merged(v, None, &[]).unwrap();
            assert_eq!(parts.len(), 1, "a bucket holds at most {BUCKET_HOLDERS}");
            let mut rest = &v[..];
            while !rest.is_empty() {
                let holder: Holder = rest[..16].try_into().unwrap();
                let value = bucket::status_in(v, &holder).unwrap().unwrap().to_vec();
                assert!(holder >= low && upper.is_none_or(|u| holder < u));
                assert!(
                    out.insert(holder, value.clone()).is_none(),
                    "a holder twice"
                );
                rest = &rest[16 + 1 + value.len()..];
            }
        }
        out
    }

    fn statuses_of(last: &BTreeMap<String, StatusRecord>) -> BTreeMap<Holder, Vec<u8>> {
        last.values()
            .map(|r| {
                let bytes = r.encode_to_vec();
                let holder = codec::holder_bytes(&r.holder).unwrap();
                (holder, codec::status_value(gd(), r, &bytes))
            })
            .collect()
    }

    /// Opens the store at `dir` once sled's flusher has let go of it.
    pub(in crate::store) async fn reopen(dir: &std::path::Path) -> Store {
        for _ in 0..100 {
            if let Ok(store) = Store::open(dir, gd()) {
                return store;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        Store::open(dir, gd()).unwrap()
    }

    #[tokio::test]
    async fn reads_see_unmerged_writes_and_a_merge_writes_each_holder_once_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), gd()).unwrap();
        store.unmerged.hold();
        let holders = holders(3_000);
        // Merged once, then rewritten three times without a merge.
        write_rounds(&store, &holders, 0..1, 700).await;
        store.merge().await.unwrap();
        let before = in_buckets(&store.tree().unwrap(), gd());
        let last = write_rounds(&store, &holders[..2_000], 1..4, 700).await;
        assert_eq!(
            store.unmerged(),
            2_000,
            "each holder once, however often changed"
        );
        assert_eq!(in_buckets(&store.tree().unwrap(), gd()), before);
        for (holder, record) in &last {
            assert_eq!(store.get(gd(), holder).unwrap().as_ref(), Some(record));
        }
        store.merge().await.unwrap();
        assert_eq!(store.unmerged(), 0);
        let tree = store.tree().unwrap();
        let mut want = before;
        want.extend(statuses_of(&last));
        assert_eq!(in_buckets(&tree, gd()), want);
        assert_eq!(merged_through(&tree, gd()).unwrap(), 3_000 + 3 * 2_000);
        for (holder, record) in &last {
            assert_eq!(store.get(gd(), holder).unwrap().as_ref(), Some(record));
        }
    }

    #[tokio::test]
    async fn writes_never_merged_are_replayed_from_the_change_log_when_the_store_opens() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), gd()).unwrap();
        store.unmerged.hold();
        let holders = holders(2_000);
        write_rounds(&store, &holders, 0..1, 500).await;
        store.merge().await.unwrap();
        let last = write_rounds(&store, &holders[500..], 1..3, 500).await;
        let tail = store.tail(gd()).await.unwrap();
        drop(store);
        let store = reopen(dir.path()).await;
        store.unmerged.hold();
        assert_eq!(store.tail(gd()).await.unwrap(), tail);
        assert_eq!(store.unmerged(), 1_500);
        for (holder, record) in &last {
            assert_eq!(store.get(gd(), holder).unwrap().as_ref(), Some(record));
        }
        // Writes go on from there.
        let more = write_rounds(&store, &holders[..10], 1..6, 10).await;
        assert_eq!(store.tail(gd()).await.unwrap().sequence, tail.sequence + 50);
        store.merge().await.unwrap();
        for (holder, record) in last.iter().chain(&more) {
            let want = more.get(holder).unwrap_or(record);
            assert_eq!(store.get(gd(), holder).unwrap().as_ref(), Some(want));
        }
    }

    #[tokio::test]
    async fn a_merge_cut_short_at_any_batch_leaves_every_status_readable_and_is_redone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), gd()).unwrap();
        store.unmerged.hold();
        let holders = holders(4_000);
        let first = write_rounds(&store, &holders[..1_000], 0..1, 1_000).await;
        store.merge().await.unwrap();
        // Many new holders into few buckets: they split into many parts,
        // written three to a batch; the merge stops after each batch.
        let last = write_rounds(&store, &holders, 1..2, 1_000).await;
        // Held first, so that the store's own merging thread waits.
        let merging = store.unmerged.merging.lock().unwrap();
        let table = store.unmerged.freeze_now().unwrap();
        let (db, tree) = (store.db().unwrap(), store.tree().unwrap());
        let want = statuses_of(&last);
        let before = statuses_of(&first);
        let mut batches: usize = 0;
        loop {
            let stop_after = std::cell::Cell::new(batches + 1);
            let done = merge(&db, &tree, &table, 3, || {
                stop_after.set(stop_after.get().saturating_sub(1));
                stop_after.get() == 0
            })
            .unwrap();
            // Whatever the merge wrote, each holder's bucket gives its
            // status from before the merge, or the merged one.
            for (holder, value) in &want {
                let held = bucket::find(&tree, gd(), holder)
                    .unwrap()
                    .and_then(|(_, b)| Some(bucket::status_in(&b, holder).unwrap()?.to_vec()));
                assert!(
                    held.as_ref() == Some(value) || held == before.get(holder).cloned(),
                    "holder {holder:?} has a status it never had"
                );
            }
            if done {
                break;
            }
            assert_eq!(merged_through(&tree, gd()).unwrap(), 1_000);
            batches += 1;
        }
        assert!(batches > 10, "{batches} batches");
        assert_eq!(in_buckets(&tree, gd()), want);
        // Never marked merged: reopened, the table is replayed and merged
        // again, to the same statuses.
        store.unmerged.close();
        drop(merging);
        drop((db, tree, table));
        drop(store);
        let store = reopen(dir.path()).await;
        for (holder, record) in first.iter().chain(&last) {
            let want = last.get(holder).unwrap_or(record);
            assert_eq!(store.get(gd(), holder).unwrap().as_ref(), Some(want));
        }
        store.merge().await.unwrap();
        assert_eq!(in_buckets(&store.tree().unwrap(), gd()), want);
    }

    #[tokio::test]
    async fn unmerged_statuses_stay_within_their_bound_however_fast_they_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_with(dir.path(), gd(), 1 << 20, 1_000).unwrap();
        store.unmerged.hold();
        let holders = holders(6_000);
        let mut most = 0;
        for chunk in holders.chunks(100) {
            let records: Vec<_> = chunk.iter().map(|h| record(h, 1_600_000_000)).collect();
            store.put_many(&records).await.unwrap();
            most = most.max(store.unmerged());
        }
        // Half the bound in each table, give or take the batch that filled it.
        assert!(most <= 1_000 + 2 * 100, "{most} statuses held unmerged");
        assert!(most >= 500, "{most}");
        store.merge().await.unwrap();
        let tree = store.tree().unwrap();
        assert_eq!(in_buckets(&tree, gd()).len(), 6_000);
        assert_eq!(merged_through(&tree, gd()).unwrap(), 6_000);
    }
}
