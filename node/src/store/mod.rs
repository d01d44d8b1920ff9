//! Durable storage of statuses in sled: this province's own, and the
//! replicas of every other member province's feed.
//!
//! # Format (version 2)
//!
//! One tree, `store.v2`, keys prefixed by kind and province (4 bytes,
//! big-endian) so that each write is a single atomic sled batch:
//!
//! | key                          | value                                   |
//! |------------------------------|-----------------------------------------|
//! | `U` province low holder (16 bytes) | a bucket: the current statuses of up to 32 holders from `low` on, sorted ([`bucket`]) |
//! | `C` province first-sequence  | a block of the change log (below)       |
//! | `H` province sequence        | signed `FeedHead` ending a batch (replicas, for relaying) |
//! | `L` province                 | newest signed `FeedHead` (replicas)     |
//! | `A` province                 | when the replica was last confirmed (unix ms, this node's clock) |
//! | `R` province                 | the province's revoked certificate serials (JSON), as last published |
//! | `B` province code-hash (32)  | the holder (16 bytes) a legacy code is bound to ([`binding`]) |
//! | `M` province                 | the last change merged into the buckets ([`merge`]) |
//!
//! A holder pseudonym is kept as its 16 bytes, not its 26 characters. A
//! status is `1 ‖ flags ‖ varint(as_of) ‖ varint(last negative test)`
//! (colour, reason and which times are present in `flags`), about 11
//! bytes; a record that this form cannot give back bit for bit is kept as
//! `2 ‖ protobuf bytes` ([`codec`]).
//!
//! ## The change log
//!
//! Each province's feed is a gapless sequence of changes, each hashed into
//! the chain `h(n) = SHA-256(h(n-1) ‖ n ‖ bytes)` that the issuer signs
//! (`hufu_federation::feed`). The log is stored in **blocks**: one sled
//! value per write (an import's transaction of 5,000 rows, a replicated
//! batch, a single change), at most [`BLOCK_CHANGES`] changes each, keyed
//! by the sequence of its first change:
//!
//! `start hash (32) ‖ written at (unix ms, 8) ‖ (varint(len) ‖ entry)*`
//!
//! with the entries zlib-compressed (the written-at time's top bit set)
//! when that makes them smaller, as it does for any block of statuses:
//! a block is written once and read only to serve the feed, and of an
//! entry's 29 bytes only the holder's 16 do not repeat (19 bytes a change
//! compressed). Blocks written before compression still read as they are.
//!
//! An entry is `1 ‖ holder (16) ‖ compact status`, `2 ‖ protobuf bytes`,
//! or `3 ‖ change bytes` for a legacy code binding ([`binding`]: its
//! change is `0 ‖ CodeBinding`, which sets or clears a `B` key).
//! The chain hashes are not stored but recomputed from the block's start
//! hash as it is read (one SHA-256 of about 60 bytes a change).
//!
//! ## Statuses merged in order
//!
//! A write does not rewrite the buckets of the statuses it sets: it makes
//! its change-log block durable and puts the statuses into a sorted table
//! in memory ([`unmerged`]), which a thread of the store merges into the
//! buckets in key order when it fills or writes pause ([`merge`]). Reads
//! look in that table first. When the store opens, the changes after each
//! province's `M` are read back from the change log into the table.
//!
//! ## Where a write enters the change log
//!
//! [`Store::apply_own`] is the seam: it applies changes of this province,
//! numbered from the tail on, in order, with the sequence each was given,
//! as one atomic batch (the blocks and the statuses they set), durable on
//! return. A change already held is accepted again if it is the same (a
//! log consumer that redelivers) and refused as a fork otherwise. An
//! embedded writer calls it through [`Store::prepare`] and
//! [`PendingPut::commit`] (which decide each record's outcome and number
//! it first); a consumer of a shared write log (a JetStream stream whose
//! sequence is the feed sequence) calls it directly. A replica's batches
//! enter through [`Store::apply_batch`], which checks the issuer's
//! signature and chain and then stages the same blocks and statuses.
//!
//! ## Compaction
//!
//! Blocks older than a retention window may be compacted ([`compact`]):
//! only each holder's latest change stays, with its number, under the
//! issuer's signed statement; a node behind the compacted part installs
//! the feed's snapshot ([`install`]) and follows the feed after it.
//!
//! ## Memory
//!
//! sled keeps at most about `[storage] cache_mib` of pages in memory, but
//! frees a replaced or evicted page only through crossbeam's epoch
//! collector, a few bags at a time. Every write of many changes, and every
//! bulk read (a feed's batch, an import's lookups of what is stored), is
//! therefore followed by passes of that collector in proportion to its
//! size ([`reclaim`]); without them a replica catching up grew by about
//! 3 KB a change. Batches are bounded: an import's transactions of 5,000
//! rows, a feed's batches of `[federation] batch_changes`, applied one at a
//! time as they arrive.
//!
//! ## Durability and failures
//!
//! A head's own time is the issuer's clock. The time a replica's freshness
//! is measured from (`A`) is that time, but never later than the moment the
//! head reached this node: an issuer whose clock runs ahead cannot make a
//! replica look fresh after it stops.
//!
//! A write is acknowledged, and a replicated batch counted as received, only
//! after sled has flushed it to disk, so both survive `kill -9`.
//!
//! A failed write (a full or failing disk) poisons a sled database: every
//! later write fails, and the refused write stays readable in its cache. So
//! the store drops the database at once (reads get `UNAVAILABLE` for the
//! moment it takes to reopen), refuses writes without touching sled, and
//! [`Store::keep_writable`] reopens it from disk, where the refused write
//! never was, and probes it until writes succeed again.
//!
//! Statuses that keep failing to merge into their buckets (three merges in
//! a row, a second apart) refuse writes too, saying so, until a merge
//! succeeds: otherwise they would pile up in memory, or writers wait for
//! room in the table without a word ([`unmerged`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};

use hufu_certs::Province;
use hufu_federation::feed::{FeedError, GENESIS_HASH};
use hufu_proto::v1::StatusRecord;
use tokio::sync::{Notify, watch};

use crate::error::{NodeError, NodeResult};

pub mod binding;
pub mod bucket;
pub mod codec;
pub mod compact;
mod health;
pub mod install;
mod log;
mod merge;
mod migrate;
mod opening;
mod own;
mod presence;
mod replica;
mod unmerged;
mod writer;

pub use health::full_disk;
pub use opening::open_db;
pub use own::{PendingPut, Prepared, PutOutcome};
pub use replica::head_of;
pub use unmerged::DEFAULT_UNMERGED_STATUSES;
pub use writer::OwnWriter;

/// The tree holding everything of this format.
pub const TREE: &str = "store.v2";

/// Changes in one change-log block at most: a batch larger than this is
/// stored as several blocks.
///
/// Large enough that a replicated batch of 5,000 changes (about 150 KB) is
/// one block: sled keeps a value over 128 KiB in a file of its own,
/// written once, while smaller ones sit in pages of up to 16 values that
/// are rewritten whole at every consolidation and split, garbage that its
/// log keeps until segments are cleaned. In a standalone sled program
/// writing a replica's keys for 1,000,000 holders, blocks of 1,024 changes
/// took 260 bytes a holder on disk and one block a batch 210 (issue 17).
pub const BLOCK_CHANGES: usize = 8192;

/// Changes written per pass of the memory reclaimer after a write (see
/// [`reclaim`]): each pass frees up to 512 replaced pages, and a change
/// replaces a few.
const CHANGES_PER_RECLAIM_PASS: usize = 16;

/// sled's page cache when the configuration does not say.
pub const DEFAULT_CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// The end of a province's chain as held here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tail {
    pub sequence: u64,
    pub hash: [u8; 32],
}

const GENESIS: Tail = Tail {
    sequence: 0,
    hash: GENESIS_HASH,
};

/// A stored change: its number, chain hash and encoded record.
pub type StoredChange = (u64, [u8; 32], Vec<u8>);

/// Result of applying a replicated batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Changes new to this node.
    pub new_changes: usize,
    /// The head now held.
    pub sequence: u64,
}

/// Why a replicated batch was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Feed(#[from] FeedError),
    #[error(transparent)]
    Node(#[from] NodeError),
}

impl From<sled::Error> for ApplyError {
    fn from(e: sled::Error) -> Self {
        ApplyError::Node(e.into())
    }
}

impl From<prost::DecodeError> for ApplyError {
    fn from(e: prost::DecodeError) -> Self {
        ApplyError::Node(e.into())
    }
}

/// An open sled database and its tree.
struct Open {
    db: sled::Db,
    tree: sled::Tree,
}

impl Open {
    fn at(path: &Path, cache_bytes: u64) -> sled::Result<Open> {
        let db = open_db(path, cache_bytes)?;
        let tree = db.open_tree(TREE)?;
        Ok(Open { db, tree })
    }
}

pub struct Store {
    path: PathBuf,
    cache_bytes: u64,
    /// None while the database is being reopened after a failed write.
    /// Shared with the merging thread.
    open: Arc<RwLock<Option<Open>>>,
    /// Statuses written but not yet merged into their buckets.
    unmerged: Arc<unmerged::Unmerged>,
    /// The thread merging them, joined when the store closes.
    merger: Option<std::thread::JoinHandle<()>>,
    /// The holders of the own province that may be stored ([`presence`]),
    /// and the thread adding those stored when the store opened.
    presence: Arc<presence::Presence>,
    presence_builder: Option<std::thread::JoinHandle<()>>,
    /// Whether writes are accepted; false from a failed write until a probe
    /// succeeds. Watched by health reporting.
    writable: watch::Sender<bool>,
    /// Woken when a write fails, so that recovery starts at once.
    failed: Notify,
    /// Set when the database must be reopened before the next probe.
    poisoned: AtomicBool,
    own: Province,
    /// Serialises own writes so change numbers are gapless; holds the tail.
    own_writer: tokio::sync::Mutex<Tail>,
    /// One writer at a time per replicated province.
    replica_writers: Mutex<HashMap<Province, Arc<tokio::sync::Mutex<()>>>>,
    /// Newest sequence per province, for feed subscribers to wait on.
    watches: Mutex<HashMap<Province, watch::Sender<u64>>>,
}

impl Store {
    /// Opens the store at `path` with sled's default cache for a node.
    pub fn open(path: &Path, own: Province) -> NodeResult<Store> {
        Store::open_with_cache(path, own, DEFAULT_CACHE_BYTES)
    }

    /// Opens the store at `path`, sled keeping at most about `cache_bytes`
    /// of pages in memory. A store of the earlier format is converted first.
    pub fn open_with_cache(path: &Path, own: Province, cache_bytes: u64) -> NodeResult<Store> {
        Store::open_with(path, own, cache_bytes, DEFAULT_UNMERGED_STATUSES)
    }

    /// [`open_with_cache`](Self::open_with_cache), holding at most
    /// `unmerged_statuses` statuses in memory before they are merged into
    /// their buckets ([`unmerged`]).
    pub fn open_with(
        path: &Path,
        own: Province,
        cache_bytes: u64,
        unmerged_statuses: usize,
    ) -> NodeResult<Store> {
        let open = Open::at(path, cache_bytes)?;
        migrate::from_v1(&open.db, &open.tree)?;
        migrate::to_buckets(&open.tree)?;
        install::recover(&open.tree)?;
        let mut store = Store {
            path: path.to_owned(),
            cache_bytes,
            open: Arc::new(RwLock::new(Some(open))),
            unmerged: Arc::new(unmerged::Unmerged::new(unmerged_statuses)),
            merger: None,
            presence: Arc::new(presence::Presence::new()),
            presence_builder: None,
            writable: watch::channel(true).0,
            failed: Notify::new(),
            poisoned: AtomicBool::new(false),
            own,
            own_writer: tokio::sync::Mutex::new(GENESIS),
            replica_writers: Mutex::new(HashMap::new()),
            watches: Mutex::new(HashMap::new()),
        };
        let tail = store.tail_from_disk(own)?;
        *store.own_writer.try_lock().expect("no other user yet") = tail;
        store.notify(own, tail.sequence);
        store.replay()?;
        let (open, unmerged) = (store.open.clone(), store.unmerged.clone());
        store.merger = Some(
            std::thread::Builder::new()
                .name("hufu-merge".into())
                .spawn(move || merge::run(open, &unmerged))
                .map_err(|e| {
                    NodeError::Internal(format!("cannot start the merging thread: {e}"))
                })?,
        );
        store.presence_builder = Some(
            presence::spawn_build(
                store.open.clone(),
                store.unmerged.clone(),
                store.presence.clone(),
                own,
            )
            .map_err(|e| NodeError::Internal(format!("cannot start the filter thread: {e}")))?,
        );
        Ok(store)
    }

    /// The tree, unless the database is being reopened.
    fn tree(&self) -> NodeResult<sled::Tree> {
        match &*self.open.read().expect("store lock") {
            Some(open) => Ok(open.tree.clone()),
            None => Err(health::reopening()),
        }
    }

    /// The sled database, unless it is being reopened (for tools and tests
    /// that look at the stored bytes).
    pub fn db(&self) -> NodeResult<sled::Db> {
        match &*self.open.read().expect("store lock") {
            Some(open) => Ok(open.db.clone()),
            None => Err(health::reopening()),
        }
    }

    pub fn own_province(&self) -> Province {
        self.own
    }

    /// A holder's current record in province `p` (own or replica): the
    /// unmerged one if there is one, else its bucket's.
    pub fn get(&self, p: Province, holder: &str) -> NodeResult<Option<StatusRecord>> {
        let Some(h) = codec::holder_bytes(holder) else {
            return Ok(None);
        };
        if let Some(value) = self.unmerged.get(p, &h) {
            return Ok(Some(codec::read_status(p, holder, &value)?));
        }
        let Some((_, bucket)) = bucket::find(&self.tree()?, p, &h)? else {
            return Ok(None);
        };
        match bucket::status_in(&bucket, &h)? {
            Some(value) => Ok(Some(codec::read_status(p, holder, value)?)),
            None => Ok(None),
        }
    }

    /// Sequence number of the newest change of this province.
    pub async fn last_sequence(&self) -> u64 {
        self.own_writer.lock().await.sequence
    }

    /// The chain end held for province `p`.
    pub async fn tail(&self, p: Province) -> NodeResult<Tail> {
        if p == self.own {
            return Ok(*self.own_writer.lock().await);
        }
        self.replica_tail(p)
    }

    /// Waits for changes: the receiver sees the newest sequence of `p`.
    pub fn watch(&self, p: Province) -> watch::Receiver<u64> {
        let mut watches = self.watches.lock().expect("watch lock");
        watches
            .entry(p)
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    fn notify(&self, p: Province, seq: u64) {
        let mut watches = self.watches.lock().expect("watch lock");
        let sender = watches.entry(p).or_insert_with(|| watch::channel(0).0);
        sender.send_replace(seq);
    }

    /// Applies `batch` without waiting for the disk; on failure, forgets
    /// it (see [`write_failed`](Self::write_failed)).
    fn apply(&self, batch: sled::Batch) -> NodeResult<()> {
        if !self.writable() {
            return Err(self.refusal());
        }
        if let Err(err) = self.tree()?.apply_batch(batch) {
            self.write_failed(&err);
            return Err(Self::refused());
        }
        Ok(())
    }

    /// Applies `batch` of about `changes` changes and flushes it; on
    /// failure, forgets it (see [`write_failed`](Self::write_failed)).
    async fn write(&self, batch: sled::Batch, changes: usize) -> NodeResult<()> {
        if !self.writable() {
            return Err(self.refusal());
        }
        let applied = self.tree()?.apply_batch(batch);
        reclaim(changes);
        let result = match applied {
            Ok(()) => self.flush().await,
            Err(e) => Err(e.into()),
        };
        if let Err(err) = result {
            self.write_failed(&err);
            return Err(Self::refused());
        }
        Ok(())
    }

    /// Makes everything written so far durable. sled serialises flushes
    /// internally, so writers that arrive while one runs share the next
    /// (group commit). A blocking flush on the blocking pool: sled's
    /// `flush_async` can stall when many callers wait on it at once.
    pub async fn flush(&self) -> NodeResult<()> {
        let db = self.db()?;
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| NodeError::Internal(format!("flush task: {e}")))??;
        Ok(())
    }
}

impl Drop for Store {
    /// Stops the merging thread (a merge under way stops between batches;
    /// what it did not write is replayed when the store opens again) and
    /// the filter's (left incomplete).
    fn drop(&mut self) {
        self.unmerged.close();
        for thread in [self.merger.take(), self.presence_builder.take()]
            .into_iter()
            .flatten()
        {
            let _ = thread.join();
        }
    }
}

/// Frees the memory of the pages a write of `changes` changes replaced.
///
/// sled replaces a page on every insert and frees the old one through
/// crossbeam's epoch collector, which frees only a few bags of garbage
/// each time some thread pins. A batch of thousands of inserts under one
/// pin (a replicated batch, an import's transaction) leaves more garbage
/// than the pins that follow collect, so the backlog, and the node's
/// memory, grew with the volume written: about 3 KB a change, 2.9 GB for a
/// replica catching up on a million (issue 17). Pinning and flushing in
/// proportion to the write drains it; when another thread holds the epoch
/// back, the next write's passes catch up.
fn reclaim(changes: usize) {
    for _ in 0..changes.div_ceil(CHANGES_PER_RECLAIM_PASS).max(1) {
        crossbeam_epoch::pin().flush();
    }
}
