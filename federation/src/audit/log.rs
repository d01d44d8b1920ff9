//! The node's audit log: an append-only RFC 6962 Merkle log in one sled
//! tree, written by a background thread in batches.
//!
//! Keys in the tree (big-endian numbers, so that sled orders them):
//!
//! | key                       | value                                   |
//! |---------------------------|-----------------------------------------|
//! | `bundle/` u64 index       | a bundle: consecutive entries from that index, each as a u32 length and its canonical encoding; stored compressed (below) |
//! | `tile/` u64 tile          | 128 stored hashes of 32 bytes, in order: those of subtrees of 64 entries and more ([`hashes`](super::hashes)) |
//! | `meta/head`               | u64 size, then the 32-byte root         |
//! | `meta/hashes`             | the lowest level of subtree whose hash is stored (6) |
//! | `meta/origin`             | the origin of the first checkpoint      |
//! | `checkpoint/` u64 size    | a published checkpoint, as a signed note|
//!
//! Each written batch of entries is one bundle (or a few, past
//! [`BUNDLE_BYTES`]): one sled value, not one per entry, so the writer's
//! cost per entry is little more than encoding and hashing it. Bundles are
//! contiguous: each starts where the one before ends, and the last ends at
//! the head's size.
//!
//! A bundle is stored as the byte [`COMPRESSED`] and the bundle in zlib's
//! format: entries of one batch repeat their kind, caller and province, so
//! an import's `status_changed` entries take about 30 bytes each instead of
//! about 250 (issue 17). A short bundle ([`COMPRESS_FROM`]: one write's
//! entry or a few) is stored as it is, as bundles written before were:
//! it starts with the zero byte of its first entry's length and is read
//! as it is. Only storage changes:
//! entries, their hashes and everything served or exported stay the same.
//!
//! Hashes use the stored-hash layout of Go's sumdb `tlog` (Crosby and
//! Wallach): every complete subtree's hash is computed once, when its last
//! leaf arrives, and never changes. A root or proof for any size then reads
//! O(log n) of them. Only those of subtrees of 64 entries and more are
//! stored; the lower ones are recomputed from the entries when a proof
//! needs them ([`hashes`](super::hashes), issue 17).
//!
//! Each batch of entries, their hash tiles and the new head go in one atomic
//! sled batch, so the head never names entries or hashes that are not there.
//! The writer keeps the hashes of the log's maximal complete subtrees and
//! the last, partial hash tile in memory: all an append reads.
//!
//! Appending is a short critical section on the caller's thread: the entry
//! is checked and pushed onto a queue. The writer sleeps while it lingers
//! for a batch, so appenders do not wake it one entry at a time: only the
//! first entry of a batch, a full batch, a full queue or a flush wakes it.
//! (Encoding on the caller's thread instead, into a queue laid out as a
//! bundle, was measured: the same CPU in all, about 100 ns more per append.)

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tlog_tiles::{Hash, HashReader};

use super::checkpoint::{Checkpoint, SignedCheckpoint};
use super::dir::DirWriter;
use super::hashes::{self, Stored};
use super::proof::EMPTY_ROOT;
use super::{AuditEntry, AuditError, LogSigner, TreeHash};
use crate::trust::TrustList;

const BUNDLE_PREFIX: &[u8] = b"bundle/";
const CHECKPOINT_PREFIX: &[u8] = b"checkpoint/";
const HEAD_KEY: &[u8] = b"meta/head";
const ORIGIN_KEY: &[u8] = b"meta/origin";

/// Largest bundle, in bytes (one entry longer than this is a bundle of its
/// own): a batch past it is stored as several bundles, so each stays well
/// inside a sled log segment rather than becoming a file of its own, and
/// reading a few entries reads at most a few bundles.
const BUNDLE_BYTES: usize = 64 * 1024;

/// The first byte of a compressed bundle. An uncompressed one starts with
/// its first entry's length, a big-endian u32 of at most 4 KiB (the longest
/// entry decoded): a zero byte.
const COMPRESSED: u8 = 1;

/// How long the writer waits for more entries before writing a batch, unless
/// a full batch, a full queue or a flush cuts it short. This is also how
/// long an appended entry can take to count in [`AuditLog::size`].
const LINGER: Duration = Duration::from_millis(20);

/// How the writer batches appends.
#[derive(Clone, Copy, Debug)]
pub struct BatchConfig {
    /// Entries waiting to be written at most; [`AuditLog::append`] blocks
    /// while the queue is full, so memory stays bounded under any load.
    /// Generous by default: the writer keeps up with far more than a node
    /// serves, and blocking an appender is only back-pressure under extreme
    /// overload.
    pub queue: usize,
    /// Entries written in one sled batch at most.
    pub max_batch: usize,
}

impl Default for BatchConfig {
    fn default() -> BatchConfig {
        BatchConfig {
            queue: 65_536,
            max_batch: 4096,
        }
    }
}

/// What appenders and the writer share.
struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when the writer takes entries or stops, for appenders
    /// waiting for room in a full queue.
    room: Condvar,
    /// The bound of `queue.entries`.
    limit: usize,
    max_batch: usize,
}

/// What a flush is told once everything queued before it is on disk (or
/// why not).
type FlushReply = Box<dyn FnOnce(Result<(), AuditError>) + Send>;

#[derive(Default)]
struct Queue {
    entries: VecDeque<AuditEntry>,
    /// Reply once everything queued before is written and synced to disk.
    flushes: Vec<FlushReply>,
    /// The log is being dropped: write what is queued, then stop.
    closing: bool,
    /// Why the writer stopped, once it has.
    failure: Option<String>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Why [`AuditLog::try_append`] did not queue an entry.
#[derive(Debug)]
pub enum TryAppendError {
    /// The queue is full: the entry, to append again once there is room.
    Full(AuditEntry),
    /// The entry is invalid, or the writer has stopped.
    Failed(AuditError),
}

/// An append-only Merkle log of [`AuditEntry`]s in a sled tree.
///
/// One `AuditLog` per tree: it is the only writer. Share it with an `Arc`.
/// Appends are queued and written by a background thread; an entry counts in
/// [`size`](Self::size), roots and proofs once written, within 20 ms (the
/// writer's linger for a batch) or one batch, and is on disk after
/// [`flush`](Self::flush) or sled's own periodic flush. Dropping the log
/// writes what is queued first.
pub struct AuditLog {
    tree: sled::Tree,
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
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
        hashes::upgrade(&tree, size)?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            room: Condvar::new(),
            limit: config.queue.max(1),
            // A full queue is a full batch, which the writer writes at once.
            max_batch: config.max_batch.clamp(1, config.queue.max(1)),
        });
        let writer = Writer::open(tree.clone(), size)?;
        let for_writer = Arc::clone(&shared);
        let writer = std::thread::Builder::new()
            .name("hufu-audit".into())
            .spawn(move || writer.run(&for_writer))
            .map_err(|e| AuditError::Storage(format!("cannot start the audit writer: {e}")))?;
        Ok(AuditLog {
            tree,
            shared,
            writer: Some(writer),
        })
    }

    /// Queues `entry` (given by value, or by reference to be cloned). Cheap:
    /// the entry's checks and a push onto the queue under a lock held for
    /// nanoseconds; encoding, hashing and storage happen on the writer
    /// thread. Blocks only while the queue is full. Fails if the entry is
    /// invalid or the writer has stopped.
    pub fn append(&self, entry: impl Into<AuditEntry>) -> Result<(), AuditError> {
        self.queue(entry.into(), true).map_err(|e| match e {
            TryAppendError::Full(_) => unreachable!("a blocking append waits for room"),
            TryAppendError::Failed(e) => e,
        })
    }

    /// [`append`](Self::append) without waiting: a full queue hands the
    /// entry back, so that async callers can wait for room off their
    /// runtime's threads.
    pub fn try_append(&self, entry: impl Into<AuditEntry>) -> Result<(), TryAppendError> {
        self.queue(entry.into(), false)
    }

    fn queue(&self, entry: AuditEntry, wait: bool) -> Result<(), TryAppendError> {
        entry.check().map_err(TryAppendError::Failed)?;
        let shared = &*self.shared;
        let mut queue = shared.lock();
        while queue.failure.is_none() && queue.entries.len() >= shared.limit {
            // Back-pressure: the writer is behind by a whole queue.
            self.wake();
            if !wait {
                return Err(TryAppendError::Full(entry));
            }
            queue = shared
                .room
                .wait(queue)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if let Some(reason) = &queue.failure {
            return Err(TryAppendError::Failed(AuditError::Closed(reason.clone())));
        }
        queue.entries.push_back(entry);
        let queued = queue.entries.len();
        drop(queue);
        // The first entry starts the writer's linger; a full batch ends it.
        // Any other append leaves the writer asleep.
        if queued == 1 || queued == shared.max_batch {
            self.wake();
        }
        Ok(())
    }

    /// Waits until everything appended before is written and synced to
    /// disk. Blocking: from async code, use [`flush_then`](Self::flush_then).
    pub fn flush(&self) -> Result<(), AuditError> {
        let (reply, done) = mpsc::sync_channel(1);
        self.flush_then(move |result| {
            let _ = reply.send(result);
        });
        done.recv().unwrap_or_else(|_| Err(self.closed()))
    }

    /// Calls `done`, on the writer's thread, once everything appended
    /// before is written and synced to disk, or with why not; at once if
    /// the writer has stopped. An async caller awaits it through a channel
    /// without holding a thread meanwhile.
    pub fn flush_then(&self, done: impl FnOnce(Result<(), AuditError>) + Send + 'static) {
        {
            let mut queue = self.shared.lock();
            if let Some(reason) = &queue.failure {
                let reason = reason.clone();
                drop(queue);
                done(Err(AuditError::Closed(reason)));
                return;
            }
            queue.flushes.push(Box::new(done));
        }
        self.wake();
    }

    /// Whether the writer has stopped (after a failed write, or closing):
    /// appends fail until the log is opened again.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().failure.is_some()
    }

    fn wake(&self) {
        if let Some(writer) = &self.writer {
            writer.thread().unpark();
        }
    }

    fn closed(&self) -> AuditError {
        let failure = self.shared.lock().failure.clone();
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
        Ok(tlog_tiles::tree_hash(size, &Stored::new(&self.tree))
            .map_err(storage)?
            .into())
    }

    /// Entries `start..end` (clamped to the size), as index and canonical
    /// encoding.
    pub fn entries(&self, start: u64, end: u64) -> Result<Vec<(u64, Vec<u8>)>, AuditError> {
        read_entries(&self.tree, start, end.min(self.size()?))
    }

    /// The proof that entry `index` is in the tree of `tree_size` entries.
    pub fn inclusion_proof(&self, index: u64, tree_size: u64) -> Result<Vec<TreeHash>, AuditError> {
        self.check_size(tree_size)?;
        if index >= tree_size {
            return Err(AuditError::OutOfRange(format!(
                "entry {index} is not in the tree of size {tree_size}: ask for a larger tree"
            )));
        }
        let proof = tlog_tiles::prove_record(tree_size, index, &Stored::new(&self.tree))
            .map_err(storage)?;
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
        let proof = tlog_tiles::prove_tree(new_size, old_size, &Stored::new(&self.tree))
            .map_err(storage)?;
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
        // The writer writes what is queued, then stops.
        self.shared.lock().closing = true;
        self.wake();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// The background writer: the only code that changes the tree.
struct Writer {
    tree: sled::Tree,
    size: u64,
    /// The hashes of the maximal complete subtrees of the log, by stored
    /// index: all an append reads, kept here so appends never read sled.
    frontier: BTreeMap<u64, Hash>,
    /// The last tile of hashes kept, as stored, while it is partial (else
    /// empty): each batch extends it.
    tile: Vec<u8>,
}

impl Writer {
    fn open(tree: sled::Tree, size: u64) -> Result<Writer, AuditError> {
        let indexes = tlog_tiles::sub_tree_index(0, size, Vec::new());
        let hashes = Stored::new(&tree).read_hashes(&indexes).map_err(storage)?;
        let tile = hashes::last_tile(&tree, size)?;
        Ok(Writer {
            tree,
            size,
            frontier: indexes.into_iter().zip(hashes).collect(),
            tile,
        })
    }

    fn run(mut self, shared: &Shared) {
        // However the writer ends, appenders and flushes waiting on it learn
        // that it has.
        struct Stopped<'a>(&'a Shared);
        impl Drop for Stopped<'_> {
            fn drop(&mut self) {
                let mut queue = self.0.lock();
                let reason = queue
                    .failure
                    .get_or_insert_with(|| {
                        if std::thread::panicking() {
                            "the writer panicked, a bug: report it".into()
                        } else {
                            "the log was closed".into()
                        }
                    })
                    .clone();
                let flushes = std::mem::take(&mut queue.flushes);
                drop(queue);
                self.0.room.notify_all();
                for reply in flushes {
                    reply(Err(AuditError::Closed(reason.clone())));
                }
            }
        }
        let _stopped = Stopped(shared);

        // When the batch being gathered must be written at the latest.
        let mut deadline: Option<Instant> = None;
        loop {
            let mut queue = shared.lock();
            if queue.entries.is_empty() && queue.flushes.is_empty() {
                if queue.closing {
                    return;
                }
                deadline = None;
                // Memory stays bounded by the queue only while it is full.
                if queue.entries.capacity() > 4 * shared.max_batch {
                    queue.entries.shrink_to(shared.max_batch);
                }
                drop(queue);
                // The next append wakes the writer.
                std::thread::park();
                continue;
            }
            // Group commit: linger for more entries, asleep, so that a busy
            // log writes large batches without appenders waking the writer
            // for each entry. A full batch, a full queue (appenders wake the
            // writer), a flush or closing ends the wait.
            let now = Instant::now();
            let until = *deadline.get_or_insert(now + LINGER);
            let ready = now >= until
                || queue.entries.len() >= shared.max_batch
                || !queue.flushes.is_empty()
                || queue.closing;
            if !ready {
                drop(queue);
                std::thread::park_timeout(until - now);
                continue;
            }
            deadline = None;
            let take = queue.entries.len().min(shared.max_batch);
            let entries: Vec<AuditEntry> = queue.entries.drain(..take).collect();
            // A flush is answered once everything queued before it is
            // written: when the queue is empty after this batch.
            let flushes = if queue.entries.is_empty() {
                std::mem::take(&mut queue.flushes)
            } else {
                Vec::new()
            };
            drop(queue);
            shared.room.notify_all();

            let mut result = self.write(&entries);
            if result.is_ok() && !flushes.is_empty() {
                result = self.tree.flush().map(drop).map_err(AuditError::from);
            }
            let reason = result.as_ref().err().map(ToString::to_string);
            for reply in flushes {
                reply(
                    reason
                        .clone()
                        .map_or(Ok(()), |r| Err(AuditError::Storage(r))),
                );
            }
            if let Some(reason) = reason {
                tracing::error!(
                    error = %reason,
                    "audit log write failed: the writer stops, and appends now fail"
                );
                shared.lock().failure = Some(reason);
                return;
            }
        }
    }

    /// Appends `entries` in one atomic batch: bundles, hash tiles, head.
    fn write(&mut self, entries: &[AuditEntry]) -> Result<(), AuditError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut pending = Pending {
            frontier: &self.frontier,
            base: tlog_tiles::stored_hash_count(self.size),
            hashes: Vec::new(),
        };
        let mut batch = sled::Batch::default();
        let mut size = self.size;
        let mut bundle = Vec::with_capacity(BUNDLE_BYTES.min(entries.len() * 512));
        let mut bundle_at = size;
        let mut bytes = Vec::with_capacity(512);
        let mut kept = Vec::new();
        for entry in entries {
            bytes.clear();
            entry.encode_into(&mut bytes)?;
            let leaf = tlog_tiles::record_hash(&bytes);
            let hashes =
                tlog_tiles::stored_hashes_for_record_hash(size, leaf, &pending).map_err(storage)?;
            kept.extend_from_slice(hashes::kept_of(&hashes));
            pending.hashes.extend(hashes);
            if !bundle.is_empty() && bundle.len() + 4 + bytes.len() > BUNDLE_BYTES {
                batch.insert(key(BUNDLE_PREFIX, bundle_at), compress(&bundle)?);
                bundle.clear();
                bundle_at = size;
            }
            let len = u32::try_from(bytes.len())
                .map_err(|_| AuditError::BadEntry("an entry longer than 4 GiB".into()))?;
            bundle.extend_from_slice(&len.to_be_bytes());
            bundle.extend_from_slice(&bytes);
            size += 1;
        }
        batch.insert(key(BUNDLE_PREFIX, bundle_at), compress(&bundle)?);

        // The hashes kept extend the last, partial tile and fill new ones.
        let mut tile = self.tile.clone();
        hashes::stage(&mut batch, &mut tile, hashes::kept_count(self.size), &kept);

        let root = tlog_tiles::tree_hash(size, &pending).map_err(storage)?;
        batch.insert(HEAD_KEY, head_bytes(size, root.into()));
        let indexes = tlog_tiles::sub_tree_index(0, size, Vec::new());
        let frontier = pending.read_hashes(&indexes).map_err(storage)?;
        self.tree.apply_batch(batch)?;
        self.size = size;
        self.frontier = indexes.into_iter().zip(frontier).collect();
        self.tile = tile;
        Ok(())
    }
}

/// Entries `start..end` of the log in `tree`, all of which must be there.
pub(super) fn read_entries(
    tree: &sled::Tree,
    start: u64,
    end: u64,
) -> Result<Vec<(u64, Vec<u8>)>, AuditError> {
    if start >= end {
        return Ok(Vec::new());
    }
    // The bundle holding `start` is the last one keyed at or before it.
    let first = match tree
        .range(key(BUNDLE_PREFIX, 0)..=key(BUNDLE_PREFIX, start))
        .next_back()
    {
        Some(item) => index_of(&item?.0)?,
        None => return Err(damaged(format!("no bundle holds entry {start}"))),
    };
    let mut out = Vec::with_capacity((end - start) as usize);
    let mut next = first;
    for item in tree.range(key(BUNDLE_PREFIX, first)..key(BUNDLE_PREFIX, end)) {
        let (k, bundle) = item?;
        let at = index_of(&k)?;
        if at != next {
            return Err(damaged(format!(
                "the bundle at entry {at} follows one that ends at entry {next}"
            )));
        }
        for bytes in unbundle(at, &open_bundle(at, &bundle)?)? {
            if (start..end).contains(&next) {
                out.push((next, bytes.to_vec()));
            }
            next += 1;
        }
    }
    if next < end {
        return Err(damaged(format!(
            "entries {next} to {} are missing",
            end - 1
        )));
    }
    Ok(out)
}

/// The entries of the bundle stored at entry `at`, in order.
/// Bundles shorter than this are stored as they are (an entry or a few):
/// a new compressor zeroes about 160 KB of tables, 1.8% of a node's CPU in
/// a profile of 100 single-status writes a second, for a few bytes saved.
const COMPRESS_FROM: usize = 1024;

/// A bundle as stored: [`COMPRESSED`], then the bundle in zlib's format;
/// a short one as it is.
fn compress(bundle: &[u8]) -> Result<Vec<u8>, AuditError> {
    use std::io::Write;
    if bundle.len() < COMPRESS_FROM {
        return Ok(bundle.to_vec());
    }
    let mut out = vec![COMPRESSED];
    // The fastest level: about 30 bytes an entry either way, and the
    // writer keeps up with imports of 100,000 rows a second.
    let mut z = flate2::write::ZlibEncoder::new(&mut out, flate2::Compression::fast());
    z.write_all(bundle)
        .and_then(|()| z.finish().map(drop))
        .map_err(|e| AuditError::Storage(format!("compressing a bundle: {e}")))?;
    Ok(out)
}

/// The bundle at entry `at` as stored, uncompressed.
fn open_bundle(at: u64, stored: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, AuditError> {
    use std::io::Read;
    let Some((&COMPRESSED, z)) = stored.split_first() else {
        return Ok(std::borrow::Cow::Borrowed(stored));
    };
    let mut bundle = Vec::with_capacity(BUNDLE_BYTES);
    flate2::read::ZlibDecoder::new(z)
        .read_to_end(&mut bundle)
        .map_err(|e| {
            damaged(format!(
                "the bundle at entry {at} is cut short or altered ({e})"
            ))
        })?;
    Ok(std::borrow::Cow::Owned(bundle))
}

fn unbundle(at: u64, mut bundle: &[u8]) -> Result<Vec<&[u8]>, AuditError> {
    let mut out = Vec::new();
    while !bundle.is_empty() {
        let entry = bundle
            .split_first_chunk::<4>()
            .map(|(len, rest)| (u32::from_be_bytes(*len) as usize, rest))
            .filter(|(len, rest)| *len <= rest.len())
            .map(|(len, rest)| rest.split_at(len));
        let Some((bytes, rest)) = entry else {
            return Err(damaged(format!(
                "the bundle at entry {at} is cut short after {} entries",
                out.len()
            )));
        };
        out.push(bytes);
        bundle = rest;
    }
    Ok(out)
}

fn damaged(what: String) -> AuditError {
    AuditError::Storage(format!("the audit log in sled is damaged: {what}"))
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
        .ok_or_else(|| damaged("a key is too short".into()))
}

fn head_bytes(size: u64, root: TreeHash) -> Vec<u8> {
    let mut v = size.to_be_bytes().to_vec();
    v.extend_from_slice(&root.0);
    v
}

pub(super) fn read_head(tree: &sled::Tree) -> Result<(u64, TreeHash), AuditError> {
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

#[cfg(test)]
mod tests {
    use hufu_certs::{Identity, Province, Role};

    use super::*;
    use crate::audit::{AnswerSource, EntryKind};

    fn entry(i: u64) -> AuditEntry {
        let p = Province::parse("440000").unwrap();
        let caller = Identity::new(Province::parse("610000").unwrap(), Role::Node, "sn-1").unwrap();
        AuditEntry::new(1_700_000_000_000 + i, EntryKind::VerifyServed, caller, p)
            .with_answer("green")
            .with_source(AnswerSource::Replica)
            .with_detail(format!("entry {i}"))
    }

    /// A new log in a fresh sled tree, with the tree and its directory
    /// (which must outlive both).
    fn new_log() -> (tempfile::TempDir, sled::Tree, AuditLog) {
        let dir = tempfile::tempdir().unwrap();
        let tree = sled::open(dir.path()).unwrap().open_tree("audit").unwrap();
        let log = AuditLog::open(tree.clone()).unwrap();
        (dir, tree, log)
    }

    fn bundles(tree: &sled::Tree) -> Vec<(u64, usize)> {
        tree.scan_prefix(BUNDLE_PREFIX)
            .map(|item| {
                let (k, v) = item.unwrap();
                (index_of(&k).unwrap(), v.len())
            })
            .collect()
    }

    #[test]
    fn large_batches_are_split_into_bundles_read_back_across_their_edges() {
        let (_dir, tree, log) = new_log();
        let n = 2000;
        for i in 0..n {
            log.append(entry(i)).unwrap();
        }
        log.flush().unwrap();
        assert_eq!(log.size().unwrap(), n);

        // A batch past BUNDLE_BYTES is stored as several bundles, each
        // starting where the one before ends.
        let stored = bundles(&tree);
        assert!(stored.len() > 2, "{stored:?}");
        assert!(stored.iter().all(|&(_, len)| len <= BUNDLE_BYTES));
        assert_eq!(stored[0].0, 0);

        let all = log.entries(0, n).unwrap();
        let expected: Vec<_> = (0..n).map(|i| (i, entry(i).encode().unwrap())).collect();
        assert_eq!(all, expected);
        // Ranges starting and ending inside and at the edges of bundles.
        for &(at, _) in &stored {
            for (start, end) in [
                (at, at + 1),
                (at.saturating_sub(1), at + 1),
                (at.saturating_sub(3), at + 300),
            ] {
                let end = end.min(n);
                assert_eq!(
                    log.entries(start, end).unwrap(),
                    expected[start as usize..end as usize],
                    "{start}..{end}"
                );
            }
        }
        assert_eq!(log.entries(n - 1, n + 10).unwrap().len(), 1);
        assert!(log.entries(n, n + 10).unwrap().is_empty());

        // A bundle cut short is reported, not read as fewer entries.
        let (at, _) = stored[1];
        let bundle = tree.get(key(BUNDLE_PREFIX, at)).unwrap().unwrap();
        tree.insert(key(BUNDLE_PREFIX, at), &bundle[..bundle.len() - 1])
            .unwrap();
        let err = log.entries(at, at + 1).unwrap_err();
        assert!(err.to_string().contains("cut short"), "{err}");
    }

    /// One write's entry is stored as it is: a compressor would cost more
    /// than the few bytes it saves.
    #[test]
    fn a_short_bundle_is_stored_as_it_is_and_reads_back() {
        let (_dir, tree, log) = new_log();
        log.append(entry(0)).unwrap();
        log.flush().unwrap();
        let stored = bundles(&tree);
        assert_eq!(stored.len(), 1);
        let bundle = tree.get(key(BUNDLE_PREFIX, 0)).unwrap().unwrap();
        assert_eq!(bundle[0], 0);
        assert!(bundle.len() < COMPRESS_FROM);
        let expected = vec![(0, entry(0).encode().unwrap())];
        assert_eq!(log.entries(0, 1).unwrap(), expected);
        drop(log);
        assert_eq!(
            AuditLog::open(tree).unwrap().entries(0, 1).unwrap(),
            expected
        );
    }

    #[test]
    fn bundles_are_stored_compressed_and_those_written_uncompressed_before_still_read() {
        let (_dir, tree, log) = new_log();
        let n = 500;
        for i in 0..n {
            log.append(entry(i)).unwrap();
        }
        log.flush().unwrap();
        let expected: Vec<_> = (0..n).map(|i| (i, entry(i).encode().unwrap())).collect();
        let raw: usize = expected.iter().map(|(_, e)| 4 + e.len()).sum();
        let stored: usize = bundles(&tree).iter().map(|&(_, len)| len).sum();
        assert!(stored * 4 < raw, "{stored} bytes stored for {raw}");

        // Bundles as the previous version wrote them: uncompressed.
        for (at, _) in bundles(&tree) {
            let bundle = tree.get(key(BUNDLE_PREFIX, at)).unwrap().unwrap();
            if bundle[0] != COMPRESSED {
                // Short: stored as it is already.
                assert!(bundle.len() < COMPRESS_FROM);
                continue;
            }
            let plain = open_bundle(at, &bundle).unwrap().into_owned();
            assert_eq!(plain[0], 0);
            tree.insert(key(BUNDLE_PREFIX, at), plain).unwrap();
        }
        assert_eq!(log.entries(0, n).unwrap(), expected);
        drop(log);
        let reopened = AuditLog::open(tree).unwrap();
        assert_eq!(reopened.entries(0, n).unwrap(), expected);
    }

    #[test]
    fn a_reopened_log_extends_its_partial_hash_tile_as_if_never_closed() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let whole = AuditLog::open(db.open_tree("whole").unwrap()).unwrap();
        for i in 0..700 {
            whole.append(entry(i)).unwrap();
        }
        whole.flush().unwrap();

        // Closed and reopened at sizes that leave the last tile partial.
        let tree = db.open_tree("reopened").unwrap();
        for range in [0..1, 1..150, 150..151, 151..700] {
            let log = AuditLog::open(tree.clone()).unwrap();
            for i in range {
                log.append(entry(i)).unwrap();
            }
        }
        let reopened = AuditLog::open(tree).unwrap();
        assert_eq!(reopened.size().unwrap(), 700);
        assert_eq!(reopened.root().unwrap(), whole.root().unwrap());
        for size in [1, 150, 151, 256, 699, 700] {
            assert_eq!(
                reopened.root_at(size).unwrap(),
                whole.root_at(size).unwrap()
            );
            assert_eq!(
                reopened.inclusion_proof(size / 2, size).unwrap(),
                whole.inclusion_proof(size / 2, size).unwrap()
            );
            assert_eq!(
                reopened.consistency_proof(size / 3, size).unwrap(),
                whole.consistency_proof(size / 3, size).unwrap()
            );
        }
        assert_eq!(
            reopened.entries(0, 700).unwrap(),
            whole.entries(0, 700).unwrap()
        );
    }

    /// What an async caller waits on: called once the entries appended
    /// before are on disk, on the writer's thread; at once, with why, when
    /// the writer has stopped.
    #[test]
    fn a_flush_callback_is_called_once_the_entries_before_it_are_written() {
        let (_dir, _tree, log) = new_log();
        for i in 0..10 {
            log.append(entry(i)).unwrap();
        }
        let (tx, rx) = mpsc::channel();
        let caller = std::thread::current().id();
        log.flush_then(move |result| {
            let _ = tx.send((result, std::thread::current().id()));
        });
        let (result, on) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        result.unwrap();
        assert_ne!(on, caller, "called on the writer's thread");
        assert_eq!(log.size().unwrap(), 10);

        log.shared.lock().failure = Some("no space left on device".into());
        let (tx, rx) = mpsc::channel();
        log.flush_then(move |result| {
            let _ = tx.send(result);
        });
        let err = rx.try_recv().expect("answered at once").unwrap_err();
        assert!(
            matches!(&err, AuditError::Closed(why) if why.contains("no space")),
            "{err}"
        );
    }

    #[test]
    fn a_full_queue_holds_appenders_back_until_the_writer_catches_up() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let log = Arc::new(
            AuditLog::open_with(
                db.open_tree("audit").unwrap(),
                BatchConfig {
                    queue: 3,
                    max_batch: 100,
                },
            )
            .unwrap(),
        );
        let started = Instant::now();
        let threads: Vec<_> = (0..3)
            .map(|t| {
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    for i in 0..100 {
                        log.append(entry(t * 100 + i)).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        log.flush().unwrap();
        assert_eq!(log.size().unwrap(), 300);
        // A full queue is a full batch, written at once, not after lingering.
        assert!(
            started.elapsed() < LINGER * 50,
            "took {:?}",
            started.elapsed()
        );
    }
}
