//! The node's audit log: an append-only RFC 6962 Merkle log in one sled
//! tree, written by a background thread in batches.
//!
//! Keys in the tree (big-endian numbers, so that sled orders them):
//!
//! | key                       | value                                   |
//! |---------------------------|-----------------------------------------|
//! | `entry/` u64 index        | the entry's canonical encoding          |
//! | `hash/` u64 tile          | 128 stored hashes of 32 bytes, in order |
//! | `meta/head`               | u64 size, then the 32-byte root         |
//! | `meta/origin`             | the origin of the first checkpoint      |
//! | `checkpoint/` u64 size    | a published checkpoint, as a signed note|
//!
//! Hashes use the stored-hash layout of Go's sumdb `tlog` (Crosby and
//! Wallach): every complete subtree's hash is stored once, when its last
//! leaf arrives, and never changes. A root or proof for any size then reads
//! O(log n) of them. Stored hash `i` is at byte `32 × (i mod 128)` of tile
//! `i / 128`; only the last tile is ever rewritten, to extend it.
//!
//! Each batch of entries, their hash tiles and the new head go in one atomic
//! sled batch, so the head never names entries or hashes that are not there.
//! The writer keeps the hashes of the log's maximal complete subtrees in
//! memory (O(log n) of them): they are all an append reads.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use tlog_tiles::{Hash, HashReader};

use super::checkpoint::{Checkpoint, SignedCheckpoint};
use super::dir::DirWriter;
use super::proof::EMPTY_ROOT;
use super::{AuditEntry, AuditError, LogSigner, TreeHash};
use crate::trust::TrustList;

const ENTRY_PREFIX: &[u8] = b"entry/";
const HASH_PREFIX: &[u8] = b"hash/";
const CHECKPOINT_PREFIX: &[u8] = b"checkpoint/";
const HEAD_KEY: &[u8] = b"meta/head";
const ORIGIN_KEY: &[u8] = b"meta/origin";

/// Hashes per hash tile: 4 KiB values, so a batch writes a few tiles rather
/// than one key per hash.
const TILE_HASHES: u64 = 128;

/// How the writer batches appends.
#[derive(Clone, Copy, Debug)]
pub struct BatchConfig {
    /// Entries waiting to be written at most; [`AuditLog::append`] blocks
    /// while the queue is full, so memory stays bounded under any load.
    pub queue: usize,
    /// Entries written in one sled batch at most.
    pub max_batch: usize,
}

impl Default for BatchConfig {
    fn default() -> BatchConfig {
        BatchConfig {
            queue: 65_536,
            max_batch: 1024,
        }
    }
}

enum Message {
    Entry(Vec<u8>),
    /// Reply once everything queued before is written and synced to disk.
    Flush(SyncSender<Result<(), String>>),
}

/// An append-only Merkle log of [`AuditEntry`]s in a sled tree.
///
/// One `AuditLog` per tree: it is the only writer. Share it with an `Arc`.
/// Appends are queued and written by a background thread; an entry counts in
/// [`size`](Self::size), roots and proofs once written, which under load is
/// within one batch, and is on disk after [`flush`](Self::flush) or sled's
/// own periodic flush. Dropping the log writes what is queued first.
pub struct AuditLog {
    tree: sled::Tree,
    sender: Option<SyncSender<Message>>,
    writer: Option<JoinHandle<()>>,
    /// Why the writer stopped, once it has.
    failure: Arc<Mutex<Option<String>>>,
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLog")
            .field("tree", &String::from_utf8_lossy(&self.tree.name()))
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens the log kept in `tree` (empty for a new log), with the default
    /// batching.
    pub fn open(tree: sled::Tree) -> Result<AuditLog, AuditError> {
        AuditLog::open_with(tree, BatchConfig::default())
    }

    /// Opens the log kept in `tree` with `config`.
    pub fn open_with(tree: sled::Tree, config: BatchConfig) -> Result<AuditLog, AuditError> {
        let size = read_head(&tree)?.0;
        let (sender, receiver) = mpsc::sync_channel(config.queue.max(1));
        let failure = Arc::new(Mutex::new(None));
        let writer = Writer::open(tree.clone(), size, config.max_batch.max(1))?;
        let failed = Arc::clone(&failure);
        let writer = std::thread::Builder::new()
            .name("hufu-audit".into())
            .spawn(move || writer.run(receiver, failed))
            .map_err(|e| AuditError::Storage(format!("cannot start the audit writer: {e}")))?;
        Ok(AuditLog {
            tree,
            sender: Some(sender),
            writer: Some(writer),
            failure,
        })
    }

    /// Queues `entry`. Cheap: encoding and a channel send. Blocks only while
    /// the queue is full. Fails if the entry is invalid or the writer has
    /// stopped.
    pub fn append(&self, entry: &AuditEntry) -> Result<(), AuditError> {
        let bytes = entry.encode()?;
        self.send(Message::Entry(bytes))
    }

    /// Waits until everything appended before is written and synced to
    /// disk. Blocking: from async code, call it in `spawn_blocking`.
    pub fn flush(&self) -> Result<(), AuditError> {
        let (reply, done) = mpsc::sync_channel(1);
        self.send(Message::Flush(reply))?;
        match done.recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(AuditError::Storage(reason)),
            Err(_) => Err(self.closed()),
        }
    }

    fn send(&self, message: Message) -> Result<(), AuditError> {
        match &self.sender {
            Some(sender) => sender.send(message).map_err(|_| self.closed()),
            None => Err(self.closed()),
        }
    }

    fn closed(&self) -> AuditError {
        let failure = self
            .failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        AuditError::Closed(failure.unwrap_or_else(|| "the log was closed".into()))
    }

    /// The number of entries written.
    pub fn size(&self) -> Result<u64, AuditError> {
        Ok(read_head(&self.tree)?.0)
    }

    /// The root hash of the entries written.
    pub fn root(&self) -> Result<TreeHash, AuditError> {
        Ok(read_head(&self.tree)?.1)
    }

    /// The root hash of the first `size` entries.
    pub fn root_at(&self, size: u64) -> Result<TreeHash, AuditError> {
        self.check_size(size)?;
        Ok(tlog_tiles::tree_hash(size, &Stored(&self.tree))
            .map_err(storage)?
            .into())
    }

    /// Entries `start..end` (clamped to the size), as index and canonical
    /// encoding.
    pub fn entries(&self, start: u64, end: u64) -> Result<Vec<(u64, Vec<u8>)>, AuditError> {
        let end = end.min(self.size()?);
        if start >= end {
            return Ok(Vec::new());
        }
        self.tree
            .range(key(ENTRY_PREFIX, start)..key(ENTRY_PREFIX, end))
            .map(|item| {
                let (k, v) = item?;
                Ok((index_of(&k)?, v.to_vec()))
            })
            .collect()
    }

    /// The proof that entry `index` is in the tree of `tree_size` entries.
    pub fn inclusion_proof(&self, index: u64, tree_size: u64) -> Result<Vec<TreeHash>, AuditError> {
        self.check_size(tree_size)?;
        if index >= tree_size {
            return Err(AuditError::OutOfRange(format!(
                "entry {index} is not in the tree of size {tree_size}: ask for a larger tree"
            )));
        }
        let proof =
            tlog_tiles::prove_record(tree_size, index, &Stored(&self.tree)).map_err(storage)?;
        Ok(proof.into_iter().map(TreeHash::from).collect())
    }

    /// The proof that the tree of `old_size` entries is a prefix of the tree
    /// of `new_size`. Empty from size 0 and between equal sizes.
    pub fn consistency_proof(
        &self,
        old_size: u64,
        new_size: u64,
    ) -> Result<Vec<TreeHash>, AuditError> {
        self.check_size(new_size)?;
        if old_size > new_size {
            return Err(AuditError::OutOfRange(format!(
                "no consistency proof from size {old_size} down to {new_size}: the old size must not be larger"
            )));
        }
        if old_size == 0 {
            return Ok(Vec::new());
        }
        let proof =
            tlog_tiles::prove_tree(new_size, old_size, &Stored(&self.tree)).map_err(storage)?;
        Ok(proof.into_iter().map(TreeHash::from).collect())
    }

    fn check_size(&self, size: u64) -> Result<(), AuditError> {
        let have = self.size()?;
        if size > have {
            return Err(AuditError::OutOfRange(format!(
                "the log holds {have} entries, fewer than {size}: flush, or ask for a smaller size"
            )));
        }
        Ok(())
    }

    /// A checkpoint of the entries written, signed by `signer`. The first
    /// checkpoint binds the log to `signer`'s origin; a later one with
    /// another origin is refused, since one log must never speak under two
    /// names.
    pub fn checkpoint(&self, signer: &LogSigner) -> Result<SignedCheckpoint, AuditError> {
        let origin = signer.origin();
        match self.tree.compare_and_swap(
            ORIGIN_KEY,
            None as Option<&[u8]>,
            Some(origin.as_bytes()),
        )? {
            Ok(()) => {}
            Err(current) => {
                let bound = current
                    .current
                    .map(|v| String::from_utf8_lossy(&v).into_owned());
                if bound.as_deref() != Some(origin) {
                    return Err(AuditError::OriginMismatch {
                        log: bound.unwrap_or_default(),
                        signer: origin.to_owned(),
                    });
                }
            }
        }
        let (size, root) = read_head(&self.tree)?;
        SignedCheckpoint::sign(
            Checkpoint {
                origin: origin.to_owned(),
                size,
                root,
            },
            signer,
        )
    }

    /// Keeps `checkpoint` as published: a checkpoint of this log, valid
    /// under `trust` (the log's signature and the witness quorum). One
    /// already kept for the same size gains the new one's cosignatures.
    pub fn publish(
        &self,
        checkpoint: &SignedCheckpoint,
        trust: &TrustList,
    ) -> Result<(), AuditError> {
        let cp = checkpoint.checkpoint();
        let root = self.root_at(cp.size)?;
        if root != cp.root {
            return Err(AuditError::MalformedCheckpoint(format!(
                "{} has root {}, but this log's root at that size is {root}: it is not a checkpoint of this log",
                cp.origin, cp.root
            )));
        }
        if let Some(bound) = self.tree.get(ORIGIN_KEY)?
            && bound != cp.origin.as_bytes()
        {
            return Err(AuditError::OriginMismatch {
                log: String::from_utf8_lossy(&bound).into_owned(),
                signer: cp.origin.clone(),
            });
        }
        checkpoint.verify(trust)?;
        // Merged in one atomic update, so that cosignatures published at
        // the same time are all kept.
        self.tree
            .update_and_fetch(key(CHECKPOINT_PREFIX, cp.size), |existing| {
                let mut merged = checkpoint.clone();
                if let Some(existing) =
                    existing.and_then(|v| SignedCheckpoint::parse(&String::from_utf8_lossy(v)).ok())
                {
                    // Same size and root, so the same text: merging only
                    // fails past the signature limit, when the lines
                    // already kept suffice.
                    let _ = merged.merge(&existing);
                }
                Some(merged.note().into_bytes())
            })?;
        Ok(())
    }

    /// The published checkpoints, by size.
    pub fn published(&self) -> Result<Vec<SignedCheckpoint>, AuditError> {
        self.tree
            .scan_prefix(CHECKPOINT_PREFIX)
            .map(|item| {
                let (_, v) = item?;
                SignedCheckpoint::parse(&String::from_utf8_lossy(&v))
            })
            .collect()
    }

    /// The largest published checkpoint.
    pub fn latest_published(&self) -> Result<Option<SignedCheckpoint>, AuditError> {
        match self.tree.scan_prefix(CHECKPOINT_PREFIX).next_back() {
            Some(item) => Ok(Some(SignedCheckpoint::parse(&String::from_utf8_lossy(
                &item?.1,
            ))?)),
            None => Ok(None),
        }
    }

    /// Writes an audit directory (see [`DirWriter`]) into `dir`, which must
    /// not exist or be empty: every published checkpoint, the consistency
    /// proofs between them, and every entry up to the largest. Returns the
    /// number of checkpoints written.
    pub fn export(&self, dir: &Path) -> Result<usize, AuditError> {
        let checkpoints = self.published()?;
        let mut out = DirWriter::create(dir)?;
        let mut previous = 0;
        for cp in &checkpoints {
            let size = cp.checkpoint().size;
            out.checkpoint(cp, &self.consistency_proof(previous, size)?)?;
            previous = size;
        }
        // Page through the entries so memory stays bounded for any log.
        let mut start = 0;
        while start < previous {
            let page = self.entries(start, previous.min(start + 4096))?;
            for (index, bytes) in &page {
                out.entry(*index, bytes)?;
            }
            start += page.len().max(1) as u64;
        }
        out.finish()?;
        Ok(checkpoints.len())
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        // Closing the channel lets the writer drain the queue and stop.
        self.sender.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// The background writer: the only code that changes the tree.
struct Writer {
    tree: sled::Tree,
    size: u64,
    max_batch: usize,
    /// The hashes of the maximal complete subtrees of the log, by stored
    /// index: all an append reads, kept here so appends never read sled.
    frontier: BTreeMap<u64, Hash>,
}

impl Writer {
    fn open(tree: sled::Tree, size: u64, max_batch: usize) -> Result<Writer, AuditError> {
        let indexes = tlog_tiles::sub_tree_index(0, size, Vec::new());
        let hashes = Stored(&tree).read_hashes(&indexes).map_err(storage)?;
        Ok(Writer {
            tree,
            size,
            max_batch,
            frontier: indexes.into_iter().zip(hashes).collect(),
        })
    }

    fn run(mut self, receiver: Receiver<Message>, failure: Arc<Mutex<Option<String>>>) {
        while let Ok(first) = receiver.recv() {
            // Group commit: take whatever else is already queued, so a busy
            // log writes large batches and an idle one writes at once.
            // Then linger briefly for more: each write rewrites the last
            // partial hash tile, so a log fed one entry at a time would
            // write kilobytes per entry. A flush request ends the wait.
            let mut entries = Vec::new();
            let mut flushes = Vec::new();
            let mut next = Some(first);
            let linger_until = std::time::Instant::now() + LINGER;
            while let Some(message) = next.take() {
                match message {
                    Message::Entry(bytes) => entries.push(bytes),
                    Message::Flush(reply) => flushes.push(reply),
                }
                if entries.len() < self.max_batch {
                    match receiver.try_recv() {
                        Ok(message) => next = Some(message),
                        Err(TryRecvError::Disconnected) => {}
                        Err(TryRecvError::Empty) if flushes.is_empty() => {
                            let left =
                                linger_until.saturating_duration_since(std::time::Instant::now());
                            if !left.is_zero() {
                                next = receiver.recv_timeout(left).ok();
                            }
                        }
                        Err(TryRecvError::Empty) => {}
                    }
                }
            }
            let mut result = self.write(&entries);
            if result.is_ok() && !flushes.is_empty() {
                result = self.tree.flush().map(drop).map_err(AuditError::from);
            }
            let reason = result.as_ref().err().map(ToString::to_string);
            for reply in flushes {
                let _ = reply.send(reason.clone().map_or(Ok(()), Err));
            }
            if let Some(reason) = reason {
                tracing::error!(
                    error = %reason,
                    "audit log write failed: the writer stops, and appends now fail"
                );
                *failure.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason);
                return;
            }
        }
    }

    /// Appends `entries` in one atomic batch: entries, hash tiles, head.
    fn write(&mut self, entries: &[Vec<u8>]) -> Result<(), AuditError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut pending = Pending {
            frontier: &self.frontier,
            base: tlog_tiles::stored_hash_index(0, self.size),
            hashes: Vec::new(),
        };
        let mut batch = sled::Batch::default();
        let mut size = self.size;
        for bytes in entries {
            let leaf = tlog_tiles::record_hash(bytes);
            let hashes =
                tlog_tiles::stored_hashes_for_record_hash(size, leaf, &pending).map_err(storage)?;
            pending.hashes.extend(hashes);
            batch.insert(key(ENTRY_PREFIX, size), bytes.as_slice());
            size += 1;
        }

        // The new hashes extend the last, partial tile and fill new ones.
        let (base, hashes) = (pending.base, &pending.hashes);
        let first_tile = base / TILE_HASHES;
        let mut tile = match base % TILE_HASHES {
            0 => Vec::new(),
            filled => {
                let mut old = self
                    .tree
                    .get(key(HASH_PREFIX, first_tile))?
                    .map(|v| v.to_vec())
                    .unwrap_or_default();
                if old.len() < filled as usize * 32 {
                    return Err(AuditError::Storage(format!(
                        "hash tile {first_tile} is shorter than the log's size says"
                    )));
                }
                old.truncate(filled as usize * 32);
                old
            }
        };
        let mut tile_index = first_tile;
        for hash in hashes {
            tile.extend_from_slice(&hash.0);
            if tile.len() == TILE_HASHES as usize * 32 {
                batch.insert(key(HASH_PREFIX, tile_index), std::mem::take(&mut tile));
                tile_index += 1;
            }
        }
        if !tile.is_empty() {
            batch.insert(key(HASH_PREFIX, tile_index), tile);
        }

        let root = tlog_tiles::tree_hash(size, &pending).map_err(storage)?;
        batch.insert(HEAD_KEY, head_bytes(size, root.into()));
        let indexes = tlog_tiles::sub_tree_index(0, size, Vec::new());
        let frontier = pending.read_hashes(&indexes).map_err(storage)?;
        self.tree.apply_batch(batch)?;
        self.size = size;
        self.frontier = indexes.into_iter().zip(frontier).collect();
        Ok(())
    }
}

/// How long the writer waits for more entries before writing a batch.
const LINGER: std::time::Duration = std::time::Duration::from_millis(20);

/// Reads stored hashes from the tree's hash tiles.
struct Stored<'a>(&'a sled::Tree);

impl HashReader for Stored<'_> {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
        // Proofs ask for neighbouring hashes: keep the last tile read.
        let mut cached: Option<(u64, sled::IVec)> = None;
        indexes
            .iter()
            .map(|&i| {
                let tile_index = i / TILE_HASHES;
                let tile = match &cached {
                    Some((t, tile)) if *t == tile_index => tile.clone(),
                    _ => {
                        let tile = self
                            .0
                            .get(key(HASH_PREFIX, tile_index))
                            .map_err(|e| tlog_tiles::Error::InvalidInput(e.to_string()))?
                            .unwrap_or_default();
                        cached = Some((tile_index, tile.clone()));
                        tile
                    }
                };
                let at = (i % TILE_HASHES) as usize * 32;
                tile.get(at..at + 32)
                    .and_then(TreeHash::from_slice)
                    .map(Hash::from)
                    .ok_or_else(|| {
                        tlog_tiles::Error::InvalidInput(format!("stored hash {i} is missing"))
                    })
            })
            .collect()
    }
}

/// The frontier plus the hashes of the batch being written.
struct Pending<'a> {
    frontier: &'a BTreeMap<u64, Hash>,
    /// Stored index of `hashes[0]`.
    base: u64,
    hashes: Vec<Hash>,
}

impl HashReader for Pending<'_> {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
        indexes
            .iter()
            .map(|&i| {
                match i.checked_sub(self.base) {
                    Some(offset) => self.hashes.get(offset as usize),
                    None => self.frontier.get(&i),
                }
                .copied()
                .ok_or(tlog_tiles::Error::IndexesNotInTree)
            })
            .collect()
    }
}

fn storage(e: tlog_tiles::Error) -> AuditError {
    AuditError::Storage(format!("the merkle tree in sled is damaged: {e}"))
}

fn key(prefix: &[u8], n: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + 8);
    k.extend_from_slice(prefix);
    k.extend_from_slice(&n.to_be_bytes());
    k
}

fn index_of(k: &[u8]) -> Result<u64, AuditError> {
    k.get(k.len().saturating_sub(8)..)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| AuditError::Storage("an entry key is too short".into()))
}

fn head_bytes(size: u64, root: TreeHash) -> Vec<u8> {
    let mut v = size.to_be_bytes().to_vec();
    v.extend_from_slice(&root.0);
    v
}

fn read_head(tree: &sled::Tree) -> Result<(u64, TreeHash), AuditError> {
    match tree.get(HEAD_KEY)? {
        None => Ok((0, EMPTY_ROOT)),
        Some(v) if v.len() == 40 => {
            let size = u64::from_be_bytes(v[..8].try_into().expect("8 bytes"));
            let root = TreeHash::from_slice(&v[8..]).expect("32 bytes");
            Ok((size, root))
        }
        Some(_) => Err(AuditError::Storage(
            "the audit log head is not 40 bytes: this tree is not an audit log, or it is damaged"
                .into(),
        )),
    }
}
