//! The Merkle tree's stored hashes in sled: only those of subtrees of
//! [`KEPT_LEVEL`] levels and more (64 entries and more) are stored; those
//! below are recomputed from the entries when a root or proof needs them.
//!
//! Every complete subtree's hash, stored once (the layout of Go's sumdb
//! `tlog`), is about two hashes, 64 bytes, an entry: more than the entry
//! itself once bundles are compressed (about 30 bytes an import's entry).
//! Keeping only the subtrees of 64 entries and more costs 1 byte an entry;
//! a proof then reads at most the bundles holding the 64 entries around
//! the one it proves (one or two, decompressed and hashed, a fraction of a
//! millisecond) besides the O(log n) hashes it read before. The writer
//! keeps what an append reads in memory, so appends never read any of it.
//!
//! The hashes kept are numbered as the stored hashes of a tree whose leaves
//! are the complete blocks of 64 entries: hash `(level, n)` of the log is
//! number `stored_hash_index(level - KEPT_LEVEL, n)`, so they are appended
//! in order like all of them were. Number `i` is at byte `32 × (i mod
//! 128)` of the value at `tile/` `i / 128`; only the last tile is ever
//! rewritten, to extend it.
//!
//! The earlier format stored every hash under `hash/`. A log in it is
//! converted when it opens ([`upgrade`]): the hashes kept are copied to
//! `tile/`, `meta/hashes` is written, and then the old tiles are removed.
//! A conversion cut short starts again; one that wrote `meta/hashes`
//! only finishes removing the old tiles.

use std::cell::RefCell;

use tlog_tiles::{Hash, HashReader};

use super::AuditError;
use super::TreeHash;

/// Hashes of subtrees this many levels high (of 2^KEPT_LEVEL entries) and
/// higher are stored; lower ones are recomputed.
pub(super) const KEPT_LEVEL: u8 = 6;

/// Hashes per tile: 4 KiB values.
const TILE_HASHES: u64 = 128;

const TILE_PREFIX: &[u8] = b"tile/";
/// Tiles of the earlier format, holding every stored hash.
const FULL_TILE_PREFIX: &[u8] = b"hash/";
/// Present once the log's hashes are in this format: [`KEPT_LEVEL`].
const FORMAT_KEY: &[u8] = b"meta/hashes";

/// Old tiles removed, or new tiles written, in one sled batch.
const TILES_PER_BATCH: usize = 256;

/// How many hashes are kept for a log of `size` entries.
pub(super) fn kept_count(size: u64) -> u64 {
    tlog_tiles::stored_hash_count(size >> KEPT_LEVEL)
}

/// The number of hash `(level, n)` among those kept, if it is kept.
fn kept_index(level: u8, n: u64) -> Option<u64> {
    let above = level.checked_sub(KEPT_LEVEL)?;
    Some(tlog_tiles::stored_hash_index(above, n))
}

/// The hashes of record `n` that are kept, out of all of its stored hashes
/// (by level, as `tlog_tiles::stored_hashes_for_record_hash` gives them).
pub(super) fn kept_of(hashes: &[Hash]) -> &[Hash] {
    hashes.get(usize::from(KEPT_LEVEL)..).unwrap_or(&[])
}

/// Converts a log of the earlier format (see the module doc), or marks a
/// new one. Called when the log opens, before anything reads its hashes.
pub(super) fn upgrade(tree: &sled::Tree, size: u64) -> Result<(), AuditError> {
    if tree.get(FORMAT_KEY)?.is_none() {
        if size > 0 {
            copy_kept(tree, size)?;
        }
        tree.insert(FORMAT_KEY, &[KEPT_LEVEL])?;
        tree.flush()?;
    }
    loop {
        let keys: Vec<_> = tree
            .scan_prefix(FULL_TILE_PREFIX)
            .keys()
            .take(TILES_PER_BATCH)
            .collect::<Result<_, _>>()?;
        if keys.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for k in keys {
            batch.remove(k);
        }
        tree.apply_batch(batch)?;
    }
}

/// Copies the hashes kept from the earlier format's tiles to new tiles.
fn copy_kept(tree: &sled::Tree, size: u64) -> Result<(), AuditError> {
    let count = kept_count(size);
    let mut old: Option<(u64, sled::IVec)> = None;
    let mut batch = sled::Batch::default();
    let mut in_batch = 0;
    let mut tile = Vec::with_capacity(TILE_HASHES as usize * 32);
    for i in 0..count {
        let (above, n) = tlog_tiles::split_stored_hash_index(i);
        let full = tlog_tiles::stored_hash_index(above + KEPT_LEVEL, n);
        let t = full / TILE_HASHES;
        if old.as_ref().is_none_or(|(at, _)| *at != t) {
            let bytes = tree.get(key(FULL_TILE_PREFIX, t))?.ok_or_else(|| {
                damaged(format!("hash tile {t} of the earlier format is missing"))
            })?;
            old = Some((t, bytes));
        }
        let at = (full % TILE_HASHES) as usize * 32;
        let hash = old
            .as_ref()
            .and_then(|(_, bytes)| bytes.get(at..at + 32))
            .ok_or_else(|| damaged(format!("stored hash {full} is missing")))?;
        tile.extend_from_slice(hash);
        if tile.len() == TILE_HASHES as usize * 32 || i + 1 == count {
            batch.insert(key(TILE_PREFIX, i / TILE_HASHES), tile.as_slice());
            tile.clear();
            in_batch += 1;
            if in_batch == TILES_PER_BATCH {
                tree.apply_batch(std::mem::take(&mut batch))?;
                in_batch = 0;
            }
        }
    }
    tree.apply_batch(batch)?;
    Ok(())
}

/// The last tile of a log of `size` entries while it is partial (else
/// empty): what the writer extends.
pub(super) fn last_tile(tree: &sled::Tree, size: u64) -> Result<Vec<u8>, AuditError> {
    let count = kept_count(size);
    let filled = (count % TILE_HASHES) as usize * 32;
    if filled == 0 {
        return Ok(Vec::new());
    }
    let mut tile = tree
        .get(key(TILE_PREFIX, count / TILE_HASHES))?
        .map(|v| v.to_vec())
        .unwrap_or_default();
    if tile.len() < filled {
        return Err(damaged(format!(
            "hash tile {} is shorter than the log's size says",
            count / TILE_HASHES
        )));
    }
    tile.truncate(filled);
    Ok(tile)
}

/// Stages `kept`, the hashes kept of a batch of entries (numbered from
/// `base`), into `batch`, extending `tile`, the last partial tile.
pub(super) fn stage(batch: &mut sled::Batch, tile: &mut Vec<u8>, base: u64, kept: &[Hash]) {
    let mut tile_index = base / TILE_HASHES;
    for hash in kept {
        tile.extend_from_slice(&hash.0);
        if tile.len() == TILE_HASHES as usize * 32 {
            batch.insert(key(TILE_PREFIX, tile_index), tile.as_slice());
            tile.clear();
            tile_index += 1;
        }
    }
    if !tile.is_empty() && !kept.is_empty() {
        batch.insert(key(TILE_PREFIX, tile_index), tile.as_slice());
    }
}

/// Reads any stored hash of the log in `tree`: a kept one from its tile,
/// a lower one recomputed from the entries of its block of 64.
pub(super) struct Stored<'a> {
    tree: &'a sled::Tree,
    /// The last tile read: proofs ask for neighbouring hashes.
    tile: RefCell<Option<(u64, sled::IVec)>>,
    /// The leaf hashes of the last block of entries read.
    leaves: RefCell<Option<(u64, Vec<Hash>)>>,
}

impl<'a> Stored<'a> {
    pub(super) fn new(tree: &'a sled::Tree) -> Stored<'a> {
        Stored {
            tree,
            tile: RefCell::new(None),
            leaves: RefCell::new(None),
        }
    }

    fn kept(&self, i: u64) -> Result<Hash, AuditError> {
        let t = i / TILE_HASHES;
        let mut cached = self.tile.borrow_mut();
        if cached.as_ref().is_none_or(|(at, _)| *at != t) {
            let tile = self.tree.get(key(TILE_PREFIX, t))?.unwrap_or_default();
            *cached = Some((t, tile));
        }
        let at = (i % TILE_HASHES) as usize * 32;
        cached
            .as_ref()
            .and_then(|(_, tile)| tile.get(at..at + 32))
            .and_then(TreeHash::from_slice)
            .map(Hash::from)
            .ok_or_else(|| damaged(format!("kept hash {i} is missing")))
    }

    /// The hash of the `n`th subtree of `level` (below [`KEPT_LEVEL`]),
    /// from the entries under it.
    fn recomputed(&self, level: u8, n: u64) -> Result<Hash, AuditError> {
        let first = n << level;
        let block = first >> KEPT_LEVEL;
        let mut cached = self.leaves.borrow_mut();
        if cached.as_ref().is_none_or(|(at, _)| *at != block) {
            let start = block << KEPT_LEVEL;
            // The last block may be partial: its lower subtrees are needed.
            let size = super::log::read_head(self.tree)?.0;
            let end = (start + (1 << KEPT_LEVEL)).min(size);
            let leaves = super::log::read_entries(self.tree, start, end)?
                .iter()
                .map(|(_, bytes)| tlog_tiles::record_hash(bytes))
                .collect();
            *cached = Some((block, leaves));
        }
        let (_, leaves) = cached.as_ref().expect("just filled");
        let from = (first - (block << KEPT_LEVEL)) as usize;
        let under = leaves
            .get(from..from + (1 << level))
            .ok_or_else(|| damaged(format!("entries from {first} are missing")))?;
        Ok(subtree_hash(under))
    }
}

/// The Merkle hash of a power-of-two number of leaf hashes.
fn subtree_hash(leaves: &[Hash]) -> Hash {
    match leaves {
        [one] => *one,
        _ => {
            let (left, right) = leaves.split_at(leaves.len() / 2);
            tlog_tiles::node_hash(subtree_hash(left), subtree_hash(right))
        }
    }
}

impl HashReader for Stored<'_> {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
        indexes
            .iter()
            .map(|&i| {
                let (level, n) = tlog_tiles::split_stored_hash_index(i);
                match kept_index(level, n) {
                    Some(k) => self.kept(k),
                    None => self.recomputed(level, n),
                }
                .map_err(|e| tlog_tiles::Error::InvalidInput(e.to_string()))
            })
            .collect()
    }
}

fn key(prefix: &[u8], n: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + 8);
    k.extend_from_slice(prefix);
    k.extend_from_slice(&n.to_be_bytes());
    k
}

fn damaged(what: String) -> AuditError {
    AuditError::Storage(format!("the audit log in sled is damaged: {what}"))
}

#[cfg(test)]
mod tests {
    use hufu_certs::{Identity, Province, Role};

    use super::*;
    use crate::audit::{AuditEntry, AuditLog, EntryKind};

    fn entry(i: u64) -> AuditEntry {
        let p = Province::parse("440000").unwrap();
        let caller = Identity::new(p, Role::Admin, "ops").unwrap();
        AuditEntry::new(1_700_000_000_000 + i, EntryKind::StatusChanged, caller, p)
            .with_detail(format!("row {i}"))
    }

    /// Every stored hash of the first `n` entries, as the earlier format
    /// kept them: the reference the recomputed ones must equal.
    struct Full(Vec<Hash>);

    impl HashReader for Full {
        fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
            Ok(indexes.iter().map(|&i| self.0[i as usize]).collect())
        }
    }

    fn full(n: u64) -> Full {
        let mut all = Full(Vec::new());
        for i in 0..n {
            let bytes = entry(i).encode().unwrap();
            let new = tlog_tiles::stored_hashes(i, &bytes, &all).unwrap();
            all.0.extend(new);
        }
        all
    }

    /// Roots and proofs of `log` at several sizes, against `reference`.
    fn assert_same_tree(log: &AuditLog, reference: &Full, n: u64) {
        for size in [1, 63, 64, 65, 127, 128, 4095, 4096, 4097, 8191, n - 1, n] {
            let root: Hash = log.root_at(size).unwrap().into();
            assert_eq!(
                root,
                tlog_tiles::tree_hash(size, reference).unwrap(),
                "{size}"
            );
            let hashes =
                |proof: Vec<TreeHash>| proof.into_iter().map(Hash::from).collect::<Vec<_>>();
            for index in [0, size / 2, size - 1] {
                assert_eq!(
                    hashes(log.inclusion_proof(index, size).unwrap()),
                    tlog_tiles::prove_record(size, index, reference).unwrap()
                );
            }
            let old = size / 3 + 1;
            assert_eq!(
                hashes(log.consistency_proof(old, size).unwrap()),
                tlog_tiles::prove_tree(size, old, reference).unwrap()
            );
        }
    }

    /// A fresh tree for a log, in a sled directory of its own.
    fn audit_tree() -> (tempfile::TempDir, sled::Tree) {
        let dir = tempfile::tempdir().unwrap();
        let tree = sled::open(dir.path()).unwrap().open_tree("audit").unwrap();
        (dir, tree)
    }

    fn tiles(tree: &sled::Tree, prefix: &[u8]) -> (usize, usize) {
        tree.scan_prefix(prefix)
            .map(|item| item.unwrap().1.len())
            .fold((0, 0), |(n, bytes), len| (n + 1, bytes + len))
    }

    #[test]
    fn kept_hashes_and_recomputed_ones_give_the_roots_and_proofs_of_all_hashes_stored() {
        let n = 9_000;
        let reference = full(n);
        let (_dir, tree) = audit_tree();
        // Written in batches of uneven sizes, closed and reopened between
        // them, so that tiles are extended across reopenings.
        let mut i = 0;
        for batch in [1, 62, 2, 700, 3000, 129, 5106] {
            let log = AuditLog::open(tree.clone()).unwrap();
            for _ in 0..batch {
                log.append(entry(i)).unwrap();
                i += 1;
            }
            log.flush().unwrap();
        }
        assert_eq!(i, n);
        let log = AuditLog::open(tree.clone()).unwrap();
        assert_same_tree(&log, &reference, n);
        // About one hash kept per 32 entries: 1 byte an entry, not 64.
        let (_, bytes) = tiles(&tree, TILE_PREFIX);
        assert!(bytes as u64 <= 2 * n, "{bytes} bytes of hashes");
        assert_eq!(tiles(&tree, FULL_TILE_PREFIX), (0, 0));
    }

    #[test]
    fn a_log_of_the_earlier_format_is_converted_when_it_opens() {
        let n = 9_000;
        let reference = full(n);
        let (_dir, tree) = audit_tree();
        let log = AuditLog::open(tree.clone()).unwrap();
        for i in 0..n {
            log.append(entry(i)).unwrap();
        }
        log.flush().unwrap();
        drop(log);
        // As the earlier format stored it: every hash under `hash/`.
        for item in tree.scan_prefix(TILE_PREFIX).keys() {
            tree.remove(item.unwrap()).unwrap();
        }
        tree.remove(FORMAT_KEY).unwrap();
        for (t, chunk) in reference.0.chunks(TILE_HASHES as usize).enumerate() {
            let tile: Vec<u8> = chunk.iter().flat_map(|h| h.0).collect();
            tree.insert(key(FULL_TILE_PREFIX, t as u64), tile).unwrap();
        }

        let log = AuditLog::open(tree.clone()).unwrap();
        assert_same_tree(&log, &reference, n);
        assert_eq!(tiles(&tree, FULL_TILE_PREFIX), (0, 0));
        assert_eq!(
            tree.get(FORMAT_KEY).unwrap().as_deref(),
            Some(&[KEPT_LEVEL][..])
        );
        // It goes on growing as if it had always been in this format.
        let reference = full(n + 100);
        for i in n..n + 100 {
            log.append(entry(i)).unwrap();
        }
        log.flush().unwrap();
        let root: Hash = log.root().unwrap().into();
        assert_eq!(root, tlog_tiles::tree_hash(n + 100, &reference).unwrap());
    }
}
