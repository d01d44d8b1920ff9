//! Converting a store of an earlier format to the current one, when a node
//! opens it:
//!
//! - the first format (tree `provinces`: one key per change holding its
//!   chain hash and record, holders as text) to format 2. The old tree is
//!   dropped only once everything is converted and flushed; a conversion
//!   cut short by a crash starts over at the next start and writes the
//!   same keys again;
//! - statuses under a key each (`S` province holder) to buckets
//!   ([`super::bucket`]). Each sled batch buckets the next statuses in
//!   order and removes their keys, so a conversion cut short goes on
//!   from where it stopped.

use hufu_certs::Province;
use hufu_federation::feed::{self, GENESIS_HASH};
use hufu_proto::v1::StatusRecord;
use prost::Message;

use super::BLOCK_CHANGES;
use super::bucket::{self, Holder};
use super::codec::{self, BlockWriter, CHANGES, STATUS};
use crate::error::{NodeError, NodeResult};

/// The tree of the first format.
const V1_TREE: &str = "provinces";

/// Keys written per sled batch while converting.
const BATCH_KEYS: usize = 20_000;

fn province_of(key: &[u8]) -> NodeResult<Province> {
    let code = key
        .get(1..5)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .ok_or_else(|| NodeError::Internal("old store key without a province".into()))?;
    Province::from_code(u32::from_be_bytes(code)).map_err(|e| NodeError::Internal(e.to_string()))
}

/// Converts the first format's tree into `tree`, if there is one.
pub(super) fn from_v1(db: &sled::Db, tree: &sled::Tree) -> NodeResult<()> {
    if !db
        .tree_names()
        .iter()
        .any(|n| n.as_ref() == V1_TREE.as_bytes())
    {
        return Ok(());
    }
    let old = db.open_tree(V1_TREE)?;
    if !old.is_empty() {
        tracing::info!(keys = old.len(), "converting the store to format 2");
        convert(&old, tree)?;
        db.flush()?;
        tracing::info!("store converted to format 2");
    }
    drop(old);
    db.drop_tree(V1_TREE)?;
    db.flush()?;
    Ok(())
}

/// Moves the statuses kept under a key each into buckets, if there are any.
pub(super) fn to_buckets(tree: &sled::Tree) -> NodeResult<()> {
    let mut converted = 0;
    loop {
        let keys: Vec<(sled::IVec, sled::IVec)> = tree
            .scan_prefix([STATUS])
            .take(BATCH_KEYS)
            .collect::<Result<_, _>>()?;
        if keys.is_empty() {
            break;
        }
        if converted == 0 {
            tracing::info!("converting the store's statuses to buckets");
        }
        let mut batch = sled::Batch::default();
        let mut rest = keys.as_slice();
        while let Some((k, _)) = rest.first() {
            let p = province_of(k)?;
            let ends = rest
                .iter()
                .position(|(k, _)| province_of(k).ok() != Some(p))
                .unwrap_or(rest.len());
            let (of_p, after) = rest.split_at(ends);
            let statuses = of_p
                .iter()
                .map(|(k, v)| {
                    let holder: Holder =
                        k.get(5..).and_then(|h| h.try_into().ok()).ok_or_else(|| {
                            NodeError::Internal("a status key without a holder".into())
                        })?;
                    batch.remove(k);
                    Ok((holder, v.to_vec()))
                })
                .collect::<NodeResult<Vec<_>>>()?;
            bucket::bucket_sorted(&mut batch, p, &statuses, !bucket::any(tree, p)?);
            rest = after;
        }
        tree.apply_batch(batch)?;
        super::reclaim(keys.len());
        converted += keys.len();
    }
    if converted > 0 {
        tree.flush()?;
        tracing::info!(statuses = converted, "the store's statuses are in buckets");
    }
    Ok(())
}

fn convert(old: &sled::Tree, tree: &sled::Tree) -> NodeResult<()> {
    let mut batch = sled::Batch::default();
    let mut pending = 0;
    let flush = |batch: &mut sled::Batch, pending: &mut usize, force: bool| {
        if *pending >= BATCH_KEYS || (force && *pending > 0) {
            tree.apply_batch(std::mem::take(batch))?;
            super::reclaim(*pending);
            *pending = 0;
        }
        NodeResult::Ok(())
    };
    // The change log, province by province, in blocks.
    let mut block: Option<(Province, u64, BlockWriter)> = None;
    let mut last: Option<(Province, u64, [u8; 32])> = None;
    for item in old.scan_prefix([CHANGES]) {
        let (k, v) = item?;
        let p = province_of(&k)?;
        let seq = codec::block_first(&k)?;
        if v.len() < 32 {
            return Err(NodeError::Internal("old change log entry too short".into()));
        }
        let (hash, bytes) = v.split_at(32);
        let previous = match last {
            Some((lp, ls, lh)) if lp == p && ls + 1 == seq => lh,
            _ if seq == 1 => GENESIS_HASH,
            _ => {
                return Err(NodeError::Internal(format!(
                    "old change log of {p} has a gap before change {seq}: convert from a backup"
                )));
            }
        };
        if feed::chain_next(&previous, seq, bytes).as_slice() != hash {
            return Err(NodeError::Internal(format!(
                "old change {seq} of {p} does not chain: convert from a backup"
            )));
        }
        let record = StatusRecord::decode(bytes)?;
        if block
            .as_ref()
            .is_some_and(|(bp, _, w)| *bp != p || w.count() >= BLOCK_CHANGES)
        {
            let (bp, first, w) = block.take().expect("checked");
            batch.insert(codec::block_key(bp, first), w.into_bytes());
            pending += 1;
            flush(&mut batch, &mut pending, false)?;
        }
        let (_, _, w) = block.get_or_insert_with(|| (p, seq, BlockWriter::new(&previous, 0)));
        w.push(&codec::entry(p, &record, bytes));
        last = Some((p, seq, hash.try_into().expect("32 bytes")));
    }
    if let Some((p, first, w)) = block {
        batch.insert(codec::block_key(p, first), w.into_bytes());
        pending += 1;
    }
    // Statuses, keyed by the pseudonym's bytes; the rest as it was.
    for item in old.iter() {
        let (k, v) = item?;
        match k.first() {
            Some(&CHANGES) => continue,
            Some(&STATUS) => {
                let p = province_of(&k)?;
                let holder = std::str::from_utf8(&k[5..])
                    .map_err(|_| NodeError::Internal("old status key is not text".into()))?;
                let key = codec::status_key(p, holder).ok_or_else(|| {
                    NodeError::Internal(format!("old status of a bad holder id {holder:?}"))
                })?;
                let record = StatusRecord::decode(v.as_ref())?;
                batch.insert(key, codec::status_value(p, &record, &v));
            }
            _ => batch.insert(k, v),
        }
        pending += 1;
        flush(&mut batch, &mut pending, false)?;
    }
    flush(&mut batch, &mut pending, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    /// A database written as an earlier format left it, with no flusher
    /// thread of its own.
    fn raw_db(path: &std::path::Path) -> sled::Db {
        sled::Config::new()
            .path(path)
            .flush_every_ms(None)
            .open()
            .unwrap()
    }

    #[tokio::test]
    async fn statuses_kept_under_a_key_each_are_moved_into_buckets_when_the_store_opens() {
        let dir = tempfile::tempdir().unwrap();
        let (gd, bj) = (
            Province::parse("440000").unwrap(),
            Province::parse("110000").unwrap(),
        );
        let secret = hufu_federation::holder::HolderSecret::new(&[7; 32]).unwrap();
        let mut written = vec![];
        {
            let db = raw_db(dir.path());
            let tree = db.open_tree(super::super::TREE).unwrap();
            for (p, n) in [(gd, 500u64), (bj, 3)] {
                for i in 0..n {
                    let holder = secret.pseudonym(&crate::sample::national_id(p, i));
                    let record = StatusRecord {
                        issuer: p.to_string(),
                        holder: holder.to_string(),
                        colour: 1 + (i % 3) as i32,
                        as_of: Some(crate::status::timestamp(1_600_000_000 + i as i64)),
                        last_negative_test: None,
                        reason: (i % 2) as i32,
                    };
                    let bytes = record.encode_to_vec();
                    let key = codec::status_key(p, &record.holder).unwrap();
                    tree.insert(key, codec::status_value(p, &record, &bytes))
                        .unwrap();
                    written.push((p, record));
                }
            }
            db.flush().unwrap();
        }
        let store = Store::open(dir.path(), gd).unwrap();
        for (p, record) in &written {
            assert_eq!(
                store.get(*p, &record.holder).unwrap().as_ref(),
                Some(record)
            );
        }
        let tree = store.tree().unwrap();
        assert_eq!(tree.scan_prefix([STATUS]).count(), 0);
        let buckets = tree.scan_prefix([bucket::BUCKET]).count();
        assert!(
            (500 / 32..=500 / 16 + 2).contains(&buckets),
            "{buckets} buckets"
        );
        // Written on, the buckets split and keep every status.
        let mut tail = store.own_writer.lock().await;
        let records: Vec<Vec<u8>> = (500..900)
            .map(|i| {
                let holder = secret.pseudonym(&crate::sample::national_id(gd, i));
                StatusRecord {
                    issuer: gd.to_string(),
                    holder: holder.to_string(),
                    colour: 1,
                    as_of: Some(crate::status::timestamp(1_600_000_000)),
                    last_negative_test: None,
                    reason: 0,
                }
                .encode_to_vec()
            })
            .collect();
        let changes: Vec<_> = records
            .iter()
            .enumerate()
            .map(|(i, record)| hufu_federation::feed::Change {
                sequence: i as u64 + 1,
                record,
            })
            .collect();
        store.append_own(&mut tail, &changes).await.unwrap();
        drop(tail);
        for (p, record) in &written {
            assert_eq!(
                store.get(*p, &record.holder).unwrap().as_ref(),
                Some(record)
            );
        }
        for bytes in &records {
            let record = StatusRecord::decode(bytes.as_slice()).unwrap();
            assert_eq!(store.get(gd, &record.holder).unwrap(), Some(record));
        }
    }

    #[tokio::test]
    async fn a_store_of_the_first_format_opens_with_the_same_state_and_chain() {
        let dir = tempfile::tempdir().unwrap();
        let gd = Province::parse("440000").unwrap();
        let holders = ["MFRGGZDFMZTWQ2LKNNWG23TPOA", "MFRGGZDFMZTWQ2LKNNWG23TPOE"];
        let mut hash = GENESIS_HASH;
        let mut written = vec![];
        {
            let db = raw_db(dir.path());
            let old = db.open_tree(V1_TREE).unwrap();
            for seq in 1..=2500u64 {
                let record = StatusRecord {
                    issuer: "440000".into(),
                    holder: holders[seq as usize % 2].into(),
                    colour: 1 + (seq % 3) as i32,
                    as_of: Some(crate::status::timestamp(1_600_000_000 + seq as i64)),
                    last_negative_test: None,
                    reason: 1,
                };
                let bytes = record.encode_to_vec();
                hash = feed::chain_next(&hash, seq, &bytes);
                let mut v = hash.to_vec();
                v.extend_from_slice(&bytes);
                old.insert(codec::key(CHANGES, gd, &seq.to_be_bytes()), v)
                    .unwrap();
                let mut k = codec::key(STATUS, gd, &[]);
                k.extend_from_slice(record.holder.as_bytes());
                old.insert(k, bytes.clone()).unwrap();
                written.push((seq, hash, bytes));
            }
            old.insert(codec::key(b'R', gd, &[]), &b"[\"01\"]"[..])
                .unwrap();
            db.flush().unwrap();
        }
        let store = Store::open(dir.path(), gd).unwrap();
        let tail = store.tail(gd).await.unwrap();
        assert_eq!((tail.sequence, tail.hash), (2500, hash));
        assert_eq!(store.changes(gd, 0, 2500, usize::MAX).unwrap(), written);
        let last = StatusRecord::decode(written[2499].2.as_slice()).unwrap();
        assert_eq!(store.get(gd, &last.holder).unwrap(), Some(last));
        assert_eq!(store.revoked().unwrap(), vec![(gd, vec!["01".to_owned()])]);
        assert!(
            !store
                .db()
                .unwrap()
                .tree_names()
                .iter()
                .any(|n| n.as_ref() == V1_TREE.as_bytes())
        );
    }
}
