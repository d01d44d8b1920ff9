//! Statuses kept in buckets: many holders of a province in one sled value,
//! sorted by holder, rather than a key each.
//!
//! sled keeps in memory a page-table entry and bookkeeping for every page
//! of a tree, paged out or not, and splits a leaf page past 16 keys: with a
//! key per holder that was about 180 bytes of memory a holder (350 MiB for
//! 2,000,000 holders in a standalone sled program writing the store's keys,
//! so about 1.7 GiB at 10,000,000). With buckets of 16 to 32 holders, a
//! sled key and a page stand for 20 to 30 times more holders (125 MiB for
//! the same 2,000,000 in that program; a replica of 10,000,000 peaked at
//! 425 MiB in `hufu bench scale`).
//!
//! # Format
//!
//! | key | value |
//! |-----|-------|
//! | `U` province low (16 bytes) | `(holder (16) ‖ varint(len) ‖ status)*`, sorted by holder |
//!
//! A bucket holds the holders from its `low` up to the next bucket's; a
//! status is the compact or verbatim value of [`codec::status_value`]. A
//! province's first bucket has the lowest `low` (all zeros) and is never
//! removed, so every holder has exactly one bucket: the one with the
//! greatest `low` not above it. A bucket grown past [`BUCKET_HOLDERS`] is
//! split in halves in the write that grew it; buckets are never merged
//! (statuses are never removed, only replaced).
//!
//! Writes of one sled batch gather their buckets in [`Staged`], so that a
//! bucket touched by many changes of the batch is read and written once.

use std::collections::BTreeMap;

use hufu_certs::Province;
use prost::encoding::{decode_varint, encode_varint};

use super::codec::{self, HOLDER_BYTES};
use crate::error::{NodeError, NodeResult};

/// Key kind of a bucket of statuses.
pub const BUCKET: u8 = b'U';

/// Holders in a bucket at most: one grown past it is split in two.
pub const BUCKET_HOLDERS: usize = 32;

/// A holder pseudonym's bytes.
pub type Holder = [u8; HOLDER_BYTES];

/// The lowest holder: the `low` of every province's first bucket.
pub(super) const FIRST: Holder = [0; HOLDER_BYTES];

/// The key of `p`'s bucket starting at `low`.
pub fn bucket_key(p: Province, low: &Holder) -> Vec<u8> {
    codec::key(BUCKET, p, low)
}

fn corrupt() -> NodeError {
    NodeError::Internal("a stored bucket of statuses is corrupt".into())
}

/// The `low` of the bucket stored under `key`.
fn low_of(key: &[u8]) -> NodeResult<Holder> {
    key.get(5..)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(corrupt)
}

/// The bucket of `p` that holds `holder`, as its `low` and stored bytes
/// (None: `p` has no bucket yet).
pub fn find(
    tree: &sled::Tree,
    p: Province,
    holder: &Holder,
) -> NodeResult<Option<(Holder, sled::IVec)>> {
    match tree
        .range(bucket_key(p, &FIRST)..=bucket_key(p, holder))
        .next_back()
    {
        Some(item) => {
            let (k, v) = item?;
            Ok(Some((low_of(&k)?, v)))
        }
        None => Ok(None),
    }
}

/// The status of `holder` in the stored bucket `bytes`, if it is there.
pub fn status_in<'a>(bytes: &'a [u8], holder: &Holder) -> NodeResult<Option<&'a [u8]>> {
    let mut rest = bytes;
    while !rest.is_empty() {
        let (h, value, after) = next_entry(rest)?;
        match h.cmp(holder) {
            std::cmp::Ordering::Less => rest = after,
            std::cmp::Ordering::Equal => return Ok(Some(value)),
            std::cmp::Ordering::Greater => return Ok(None),
        }
    }
    Ok(None)
}

/// The holders in the stored bucket `bytes`, in order.
pub(super) fn holders_in(bytes: &[u8]) -> NodeResult<Vec<Holder>> {
    let mut holders = Vec::with_capacity(BUCKET_HOLDERS);
    let mut rest = bytes;
    while !rest.is_empty() {
        let (holder, _, after) = next_entry(rest)?;
        holders.push(*holder);
        rest = after;
    }
    Ok(holders)
}

/// The `low` of `p`'s bucket after the one starting at `low`, if any: where
/// the bucket at `low` ends.
pub fn next_low(tree: &sled::Tree, p: Province, low: &Holder) -> NodeResult<Option<Holder>> {
    use std::ops::Bound::{Excluded, Included};
    let range = (
        Excluded(bucket_key(p, low)),
        Included(bucket_key(p, &[0xff; HOLDER_BYTES])),
    );
    match tree.range::<Vec<u8>, _>(range).keys().next() {
        Some(k) => Ok(Some(low_of(&k?)?)),
        None => Ok(None),
    }
}

/// The bucket `stored` (the holders from its `low` up to `upper`) with
/// `changes` put in (sorted by holder, all in that range), as the parts
/// to store, each with its first holder, in order: one part when it holds
/// at most [`BUCKET_HOLDERS`], else parts three quarters full, room to
/// grow before they split again. Entries of `stored` from `upper` on are
/// left out: they are what a merge cut short left behind when it had
/// already written the bucket split off at `upper` (see [`super::merge`]).
pub fn merged(
    stored: &[u8],
    upper: Option<&Holder>,
    changes: &[(Holder, &[u8])],
) -> NodeResult<Vec<(Holder, Vec<u8>)>> {
    let mut entries: Vec<(&Holder, &[u8])> = Vec::with_capacity(BUCKET_HOLDERS + changes.len());
    let mut rest = stored;
    let mut changes = changes.iter().peekable();
    while !rest.is_empty() {
        let (holder, value, after) = next_entry(rest)?;
        if upper.is_some_and(|u| holder >= u) {
            break;
        }
        while let Some((h, v)) = changes.next_if(|(h, _)| h < holder) {
            entries.push((h, v));
        }
        match changes.next_if(|(h, _)| h == holder) {
            Some((h, v)) => entries.push((h, v)),
            None => entries.push((holder, value)),
        }
        rest = after;
    }
    entries.extend(changes.map(|(h, v)| (h, *v)));
    let per = if entries.len() <= BUCKET_HOLDERS {
        BUCKET_HOLDERS
    } else {
        let parts = entries.len().div_ceil(BUCKET_HOLDERS * 3 / 4);
        entries.len().div_ceil(parts)
    };
    Ok(entries
        .chunks(per)
        .map(|part| (*part[0].0, encode(part.iter().copied())))
        .collect())
}

/// The first entry of `bytes` and what follows it.
fn next_entry(bytes: &[u8]) -> NodeResult<(&Holder, &[u8], &[u8])> {
    let (holder, mut rest) = bytes
        .split_first_chunk::<HOLDER_BYTES>()
        .ok_or_else(corrupt)?;
    let len = decode_varint(&mut rest).map_err(|_| corrupt())? as usize;
    if len > rest.len() {
        return Err(corrupt());
    }
    let (value, after) = rest.split_at(len);
    Ok((holder, value, after))
}

/// A bucket's entries, sorted by holder, kept encoded as stored: a change
/// splices its entry in place rather than decoding the bucket into an
/// allocation per holder (import and replication stage a bucket per change).
#[derive(Debug, Default, Clone, PartialEq)]
struct Bucket {
    bytes: Vec<u8>,
    /// Where each entry starts in `bytes`, in order.
    starts: Vec<usize>,
}

impl Bucket {
    /// The stored `bytes`, every entry checked.
    fn decode(bytes: &[u8]) -> NodeResult<Bucket> {
        let mut starts = Vec::with_capacity(BUCKET_HOLDERS + 1);
        let mut rest = bytes;
        while !rest.is_empty() {
            starts.push(bytes.len() - rest.len());
            rest = next_entry(rest)?.2;
        }
        Ok(Bucket {
            bytes: bytes.to_vec(),
            starts,
        })
    }

    fn len(&self) -> usize {
        self.starts.len()
    }

    fn holder(&self, i: usize) -> Holder {
        self.bytes[self.starts[i]..][..HOLDER_BYTES]
            .try_into()
            .expect("checked when decoded")
    }

    /// Where entry `i` ends.
    fn end(&self, i: usize) -> usize {
        self.starts.get(i + 1).copied().unwrap_or(self.bytes.len())
    }

    fn put(&mut self, holder: Holder, value: &[u8]) {
        let mut entry = Vec::with_capacity(HOLDER_BYTES + 1 + value.len());
        entry.extend_from_slice(&holder);
        encode_varint(value.len() as u64, &mut entry);
        entry.extend_from_slice(value);
        let bytes = &self.bytes;
        match self
            .starts
            .binary_search_by(|&s| bytes[s..s + HOLDER_BYTES].cmp(&holder[..]))
        {
            Ok(i) => {
                let (start, end) = (self.starts[i], self.end(i));
                self.bytes.splice(start..end, entry.iter().copied());
                let grown = entry.len() as isize - (end - start) as isize;
                for s in &mut self.starts[i + 1..] {
                    *s = (*s as isize + grown) as usize;
                }
            }
            Err(i) => {
                let at = self.starts.get(i).copied().unwrap_or(self.bytes.len());
                self.bytes.splice(at..at, entry.iter().copied());
                for s in &mut self.starts[i..] {
                    *s += entry.len();
                }
                self.starts.insert(i, at);
            }
        }
    }

    /// The bucket in parts of at most [`BUCKET_HOLDERS`], as even as can
    /// be: each part's first holder and bytes.
    fn parts(&self) -> Vec<(Option<Holder>, &[u8])> {
        if self.len() <= BUCKET_HOLDERS {
            return vec![(self.starts.first().map(|_| self.holder(0)), &self.bytes[..])];
        }
        let per = self.len().div_ceil(self.len().div_ceil(BUCKET_HOLDERS));
        (0..self.len())
            .step_by(per)
            .map(|first| {
                let last = (first + per).min(self.len()) - 1;
                (
                    Some(self.holder(first)),
                    &self.bytes[self.starts[first]..self.end(last)],
                )
            })
            .collect()
    }
}

/// The writes of one sled batch that change buckets in place: the batch,
/// and the buckets it changes, gathered until [`finish`](Staged::finish).
/// Only a snapshot install writes statuses this way (it holds its
/// province's writer and nothing of the province is unmerged); every
/// other write goes through the change log and is merged ([`super::merge`]).
#[derive(Default)]
pub struct Staged {
    pub batch: sled::Batch,
    buckets: BTreeMap<(Province, Holder), Bucket>,
}

impl Staged {
    /// Staging that goes on from `batch`.
    pub fn on(batch: sled::Batch) -> Staged {
        Staged {
            batch,
            buckets: BTreeMap::new(),
        }
    }

    /// Sets `holder`'s status in `p` to `value` (a [`codec::status_value`]).
    pub fn put_status(
        &mut self,
        tree: &sled::Tree,
        p: Province,
        holder: Holder,
        value: Vec<u8>,
    ) -> NodeResult<()> {
        // Buckets split only in `finish`, so the lows stored are all there
        // are until then.
        let (low, stored) = match find(tree, p, &holder)? {
            Some((low, bytes)) => (low, Some(bytes)),
            None => (FIRST, None),
        };
        let bucket = match self.buckets.entry((p, low)) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => e.insert(match stored {
                Some(bytes) => Bucket::decode(&bytes)?,
                None => Bucket::default(),
            }),
        };
        bucket.put(holder, &value);
        Ok(())
    }

    /// The batch with every bucket changed, those grown too large split.
    pub fn finish(self) -> sled::Batch {
        let Staged {
            mut batch, buckets, ..
        } = self;
        for ((p, low), bucket) in buckets {
            for (i, (first, part)) in bucket.parts().into_iter().enumerate() {
                let part_low = match first {
                    Some(first) if i > 0 => first,
                    _ => low,
                };
                batch.insert(bucket_key(p, &part_low), part);
            }
        }
        batch
    }
}

/// `entries`, sorted by holder, as a stored bucket.
fn encode<'a>(entries: impl ExactSizeIterator<Item = (&'a Holder, &'a [u8])>) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * (HOLDER_BYTES + 14));
    for (h, value) in entries {
        out.extend_from_slice(h);
        encode_varint(value.len() as u64, &mut out);
        out.extend_from_slice(value);
    }
    out
}

/// The bucket `bytes` with `holder`'s status replaced by `value`, as
/// stored (for tools and tests that alter stored bytes).
pub fn with_status(bytes: &[u8], holder: &Holder, value: Vec<u8>) -> NodeResult<Vec<u8>> {
    let mut bucket = Bucket::decode(bytes)?;
    bucket.put(*holder, &value);
    Ok(bucket.bytes)
}

/// Stores statuses kept under a key each (the format before buckets) as
/// buckets, `(p, holder, status)` in order of province and holder, into
/// `batch`. `first` says whether these are the first of `p`'s statuses to
/// be bucketed: then the first bucket starts at the lowest holder.
pub(super) fn bucket_sorted(
    batch: &mut sled::Batch,
    p: Province,
    statuses: &[(Holder, Vec<u8>)],
    first: bool,
) {
    // Three quarters full: room to grow before the first splits.
    for (i, part) in statuses.chunks(BUCKET_HOLDERS * 3 / 4).enumerate() {
        let low = if i == 0 && first { FIRST } else { part[0].0 };
        batch.insert(
            bucket_key(p, &low),
            encode(part.iter().map(|(h, v)| (h, v.as_slice()))),
        );
    }
}

/// Whether `p` has any bucket.
pub(super) fn any(tree: &sled::Tree, p: Province) -> NodeResult<bool> {
    Ok(tree
        .scan_prefix(codec::key(BUCKET, p, &[]))
        .next()
        .transpose()?
        .is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(i: u32) -> Holder {
        // Spread over the whole range, as HMAC pseudonyms are.
        let mut h = [0; HOLDER_BYTES];
        h[..4].copy_from_slice(&i.wrapping_mul(2_654_435_761).to_be_bytes());
        h[4..8].copy_from_slice(&i.to_be_bytes());
        h
    }

    #[test]
    fn buckets_split_as_they_grow_and_every_holder_is_found_in_one() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let tree = db.open_tree("t").unwrap();
        let gd = Province::parse("440000").unwrap();
        let bj = Province::parse("110000").unwrap();
        // Written in batches of uneven sizes, some replacing statuses.
        let mut written = BTreeMap::new();
        let mut i = 0u32;
        for batch in [1, 5, 40, 300, 1000, 17] {
            let mut staged = Staged::default();
            for _ in 0..batch {
                let h = holder(i % 900);
                let value = vec![1, (i % 251) as u8, (i / 251) as u8];
                staged.put_status(&tree, gd, h, value.clone()).unwrap();
                written.insert(h, value);
                i += 1;
            }
            staged.put_status(&tree, bj, holder(i), vec![2]).unwrap();
            tree.apply_batch(staged.finish()).unwrap();
        }
        for (h, value) in &written {
            let (_, bytes) = find(&tree, gd, h).unwrap().unwrap();
            assert_eq!(status_in(&bytes, h).unwrap(), Some(value.as_slice()));
        }
        assert_eq!(find(&tree, bj, &holder(1)).unwrap().unwrap().0, FIRST);
        let (_, bytes) = find(&tree, gd, &holder(5000)).unwrap().unwrap();
        assert_eq!(status_in(&bytes, &holder(5000)).unwrap(), None);
        // Each bucket is sorted, within its bounds, and no larger than allowed.
        let buckets: Vec<_> = tree
            .scan_prefix(codec::key(BUCKET, gd, &[]))
            .map(|item| {
                let (k, v) = item.unwrap();
                (low_of(&k).unwrap(), Bucket::decode(&v).unwrap())
            })
            .collect();
        assert_eq!(buckets[0].0, FIRST);
        assert!(buckets.len() >= written.len() / BUCKET_HOLDERS);
        let mut held = 0;
        for (n, (low, bucket)) in buckets.iter().enumerate() {
            let holders: Vec<Holder> = (0..bucket.len()).map(|i| bucket.holder(i)).collect();
            assert!(holders.len() <= BUCKET_HOLDERS);
            assert!(holders.windows(2).all(|w| w[0] < w[1]));
            assert!(holders.iter().all(|h| h >= low));
            if let Some((next, _)) = buckets.get(n + 1) {
                assert!(holders.iter().all(|h| h < next));
            }
            held += holders.len();
        }
        assert_eq!(held, written.len());
    }

    #[test]
    fn a_damaged_bucket_is_an_error_not_a_missing_status() {
        let mut bytes = encode([(&holder(1), &[1, 2, 3][..])].into_iter());
        bytes.truncate(bytes.len() - 1);
        assert!(status_in(&bytes, &holder(2)).is_err());
        assert!(Bucket::decode(&bytes).is_err());
    }
}
