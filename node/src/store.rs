//! Durable storage of statuses in sled: this province's own, and the
//! replicas of every other member province's feed.
//!
//! One tree, keys prefixed by kind and province so that each write is a
//! single atomic sled batch:
//!
//! | key                          | value                                   |
//! |------------------------------|-----------------------------------------|
//! | `S` province holder          | current `StatusRecord`                  |
//! | `C` province sequence        | chain hash (32 bytes) ‖ encoded record  |
//! | `H` province sequence        | signed `FeedHead` ending a batch (replicas, for relaying) |
//! | `L` province                 | newest signed `FeedHead` (replicas)     |
//! | `A` province                 | when the replica was last confirmed (unix ms, this node's clock) |
//! | `R` province                 | the province's revoked certificate serials (JSON), as last published |
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

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use hufu_certs::Province;
use hufu_federation::feed::{self, Change, FeedError, GENESIS_HASH, Head};
use hufu_proto::v1::{FeedHead, StatusRecord, SubscribeChangesResponse};
use prost::Message;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::error::{NodeError, NodeResult};
use crate::status::{seconds, supersedes};

/// What happened to one record handed to [`Store::put_many`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutOutcome {
    /// Stored as change number `sequence`.
    Applied { sequence: u64 },
    /// Identical to the stored record: nothing to do.
    Unchanged,
    /// The stored record is newer; the input was dropped.
    Stale { stored_as_of: i64 },
}

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

/// An open sled database and its tree.
struct Open {
    db: sled::Db,
    tree: sled::Tree,
}

impl Open {
    fn at(path: &Path) -> sled::Result<Open> {
        let db = sled::Config::new()
            .path(path)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        let tree = db.open_tree("provinces")?;
        Ok(Open { db, tree })
    }
}

/// How often a store that cannot write tries again.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Bytes a probe writes: room for a few batches of writes.
const PROBE_BYTES: usize = 256 * 1024;

pub struct Store {
    path: PathBuf,
    /// None while the database is being reopened after a failed write.
    open: RwLock<Option<Open>>,
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

fn key(kind: u8, p: Province, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(5 + rest.len());
    k.push(kind);
    k.extend_from_slice(&p.code().to_be_bytes());
    k.extend_from_slice(rest);
    k
}

fn decode_entry(bytes: &[u8]) -> NodeResult<([u8; 32], &[u8])> {
    if bytes.len() < 32 {
        return Err(NodeError::Internal(
            "change log entry shorter than its hash".into(),
        ));
    }
    let mut hash = [0u8; 32];
    hash.copy_from_slice(&bytes[..32]);
    Ok((hash, &bytes[32..]))
}

fn to_hash(bytes: &[u8]) -> Result<[u8; 32], FeedError> {
    bytes
        .try_into()
        .map_err(|_| FeedError::Malformed(format!("hash of {} bytes, expected 32", bytes.len())))
}

/// The feed crate's view of a protobuf head.
pub fn head_of(h: &FeedHead) -> Result<Head, FeedError> {
    Ok(Head {
        issuer: Province::parse(&h.issuer).map_err(|e| FeedError::Malformed(e.to_string()))?,
        sequence: h.sequence,
        chain_hash: to_hash(&h.chain_hash)?,
        time_ms: h.time_ms,
        keys_digest: to_hash(&h.keys_digest)?,
    })
}

impl Store {
    pub fn open(path: &Path, own: Province) -> NodeResult<Store> {
        let store = Store {
            path: path.to_owned(),
            open: RwLock::new(Some(Open::at(path)?)),
            writable: watch::channel(true).0,
            failed: Notify::new(),
            poisoned: AtomicBool::new(false),
            own,
            own_writer: tokio::sync::Mutex::new(GENESIS),
            replica_writers: Mutex::new(HashMap::new()),
            watches: Mutex::new(HashMap::new()),
        };
        let tail = store.own_tail_from_disk()?;
        *store.own_writer.try_lock().expect("no other user yet") = tail;
        store.notify(own, tail.sequence);
        Ok(store)
    }

    /// The tree, unless the database is being reopened.
    fn tree(&self) -> NodeResult<sled::Tree> {
        match &*self.open.read().expect("store lock") {
            Some(open) => Ok(open.tree.clone()),
            None => Err(NodeError::Unavailable(
                "storage is being reopened after a failed write: retry in a moment".into(),
            )),
        }
    }

    /// The sled database, unless it is being reopened (for tools and tests
    /// that look at the stored bytes).
    pub fn db(&self) -> NodeResult<sled::Db> {
        match &*self.open.read().expect("store lock") {
            Some(open) => Ok(open.db.clone()),
            None => Err(NodeError::Unavailable(
                "storage is being reopened after a failed write: retry in a moment".into(),
            )),
        }
    }

    /// Whether writes are accepted now.
    pub fn writable(&self) -> bool {
        *self.writable.borrow()
    }

    /// Follows [`writable`](Self::writable).
    pub fn watch_writable(&self) -> watch::Receiver<bool> {
        self.writable.subscribe()
    }

    /// The error for a write while the store cannot write.
    fn refused() -> NodeError {
        NodeError::Unavailable(
            "the node cannot write to its disk (full or failing): writes are refused until it can; it retries every second by itself, so free disk space and send the write again".into(),
        )
    }

    /// Refuses writes until a probe finds room on the disk again: for
    /// another component whose write failed on the same disk (the audit
    /// log). The store's own database is untouched and keeps serving reads.
    pub fn refuse_writes(&self, error: &dyn std::fmt::Display) {
        if self.writable.send_replace(false) {
            tracing::error!(%error, "a write failed: writes are refused until the disk can be written again");
        }
        self.failed.notify_one();
    }

    /// Refuses writes until a probe succeeds, and forgets what the failed
    /// write left in sled's cache by dropping the database (reopened by
    /// [`keep_writable`](Self::keep_writable); reads answer `UNAVAILABLE`
    /// until it is).
    fn write_failed(&self, error: &dyn std::fmt::Display) {
        if self.writable.send_replace(false) {
            tracing::error!(%error, "storage write failed: writes are refused until the disk can be written again");
        }
        self.poisoned.store(true, Ordering::SeqCst);
        let old = self.open.write().expect("store lock").take();
        // Dropping a database flushes: on the blocking pool, when there is one.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(move || drop(old))),
            Err(_) => drop(old),
        }
        self.failed.notify_one();
    }

    /// Watches the store until `stop`: after a failed write, reopens the
    /// database from disk and probes it every second until a write succeeds,
    /// then accepts writes again. The change log's tail is read back from
    /// disk, where the refused write never was.
    pub async fn keep_writable(&self, stop: CancellationToken) {
        loop {
            if self.writable() {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = self.failed.notified() => {}
                }
            }
            let mut tail = self.own_writer.lock().await;
            match self.probe().await {
                Ok(()) => match self.own_tail_from_disk() {
                    Ok(read) => {
                        *tail = read;
                        drop(tail);
                        self.notify(self.own, read.sequence);
                        self.writable.send_replace(true);
                        tracing::info!("storage writable again: writes are accepted");
                        continue;
                    }
                    Err(err) => tracing::warn!(error = %err, "storage reopened but unreadable"),
                },
                Err(err) => tracing::debug!(error = %err, "storage still cannot write"),
            }
            drop(tail);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(PROBE_EVERY) => {}
            }
        }
    }

    /// Writes and syncs a probe file beside the database (not in sled: a
    /// failed sled write would poison a database that still serves reads),
    /// then reopens the database if a write failed on it.
    async fn probe(&self) -> NodeResult<()> {
        let probe = self.path.join("hufu-probe");
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            let mut file = std::fs::File::create(&probe)?;
            let written = file
                .write_all(&[0; PROBE_BYTES])
                .and_then(|()| file.sync_all());
            drop(file);
            std::fs::remove_file(&probe)?;
            written
        })
        .await
        .map_err(|e| NodeError::Internal(format!("probe task: {e}")))?
        .map_err(|e| NodeError::Unavailable(format!("probe write: {e}")))?;
        if self.poisoned.load(Ordering::SeqCst) || self.open.read().expect("store lock").is_none() {
            let old = self.open.write().expect("store lock").take();
            let path = self.path.clone();
            let reopened = tokio::task::spawn_blocking(move || {
                drop(old);
                Open::at(&path)
            })
            .await
            .map_err(|e| NodeError::Internal(format!("reopen task: {e}")))??;
            *self.open.write().expect("store lock") = Some(reopened);
            self.poisoned.store(false, Ordering::SeqCst);
        }
        Ok(())
    }

    fn own_tail_from_disk(&self) -> NodeResult<Tail> {
        let prefix = key(b'C', self.own, &[]);
        match self.tree()?.scan_prefix(&prefix).next_back() {
            Some(item) => {
                let (k, v) = item?;
                let seq = u64::from_be_bytes(k[5..13].try_into().map_err(|_| {
                    NodeError::Internal("change log key is not a 64-bit sequence".into())
                })?);
                Ok(Tail {
                    sequence: seq,
                    hash: decode_entry(&v)?.0,
                })
            }
            None => Ok(GENESIS),
        }
    }

    pub fn own_province(&self) -> Province {
        self.own
    }

    /// A holder's current record in province `p` (own or replica).
    pub fn get(&self, p: Province, holder: &str) -> NodeResult<Option<StatusRecord>> {
        match self.tree()?.get(key(b'S', p, holder.as_bytes()))? {
            Some(bytes) => Ok(Some(StatusRecord::decode(bytes.as_ref())?)),
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
        Ok(match self.latest_head(p)? {
            Some(h) => Tail {
                sequence: h.sequence,
                hash: to_hash(&h.chain_hash).map_err(|e| NodeError::Internal(e.to_string()))?,
            },
            None => GENESIS,
        })
    }

    /// The newest signed head held for a replicated province.
    pub fn latest_head(&self, p: Province) -> NodeResult<Option<FeedHead>> {
        match self.tree()?.get(key(b'L', p, &[]))? {
            Some(bytes) => Ok(Some(FeedHead::decode(bytes.as_ref())?)),
            None => Ok(None),
        }
    }

    /// The first stored head of `p` after `after`: where a relayed batch
    /// starting after `after` may end.
    pub fn head_after(&self, p: Province, after: u64) -> NodeResult<Option<FeedHead>> {
        let start = key(b'H', p, &(after + 1).to_be_bytes());
        let end = key(b'H', p, &u64::MAX.to_be_bytes());
        match self.tree()?.range(start..=end).next() {
            Some(item) => Ok(Some(FeedHead::decode(item?.1.as_ref())?)),
            None => Ok(None),
        }
    }

    /// Changes of `p` numbered `after+1 ..= until`, at most `max`.
    pub fn changes(
        &self,
        p: Province,
        after: u64,
        until: u64,
        max: usize,
    ) -> NodeResult<Vec<StoredChange>> {
        let start = key(b'C', p, &(after + 1).to_be_bytes());
        let end = key(b'C', p, &until.to_be_bytes());
        let mut out = Vec::new();
        if after >= until {
            return Ok(out);
        }
        for item in self.tree()?.range(start..=end).take(max) {
            let (k, v) = item?;
            let seq = u64::from_be_bytes(k[5..13].try_into().expect("8 bytes"));
            let (hash, record) = decode_entry(&v)?;
            out.push((seq, hash, record.to_vec()));
        }
        Ok(out)
    }

    fn held_hash(&self, p: Province, seq: u64) -> Option<[u8; 32]> {
        if seq == 0 {
            return Some(GENESIS_HASH);
        }
        let v = self
            .tree()
            .ok()?
            .get(key(b'C', p, &seq.to_be_bytes()))
            .ok()??;
        decode_entry(&v).ok().map(|(h, _)| h)
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

    /// Writes own-province records, each only if it supersedes what is
    /// stored, appends them to the change log, and returns once durable.
    pub async fn put_many(&self, records: &[StatusRecord]) -> NodeResult<Vec<PutOutcome>> {
        self.prepare(records).await?.commit().await
    }

    /// The first half of [`put_many`](Self::put_many): decides each record's
    /// outcome and holds the change log until [`PendingPut::commit`], so
    /// that what must be durable before the change (its audit entry) can be.
    pub async fn prepare(&self, records: &[StatusRecord]) -> NodeResult<PendingPut<'_>> {
        if !self.writable() {
            return Err(Self::refused());
        }
        let tail = self.own_writer.lock().await;
        let mut next = *tail;
        let mut batch = sled::Batch::default();
        let mut outcomes = Vec::with_capacity(records.len());
        // Records of one holder may repeat within a call: later ones must be
        // compared with earlier ones, not with the disk.
        let mut pending: HashMap<&str, &StatusRecord> = HashMap::new();
        for record in records {
            let stored = match pending.get(record.holder.as_str()) {
                Some(r) => Some((*r).clone()),
                None => self.get(self.own, &record.holder)?,
            };
            if let Some(stored) = stored {
                if stored == *record {
                    outcomes.push(PutOutcome::Unchanged);
                    continue;
                }
                if !supersedes(record, &stored) {
                    outcomes.push(PutOutcome::Stale {
                        stored_as_of: seconds(stored.as_of.as_ref()).unwrap_or(0),
                    });
                    continue;
                }
            }
            let bytes = record.encode_to_vec();
            next.sequence += 1;
            next.hash = feed::chain_next(&next.hash, next.sequence, &bytes);
            let mut entry = next.hash.to_vec();
            entry.extend_from_slice(&bytes);
            batch.insert(key(b'S', self.own, record.holder.as_bytes()), bytes);
            batch.insert(key(b'C', self.own, &next.sequence.to_be_bytes()), entry);
            pending.insert(&record.holder, record);
            outcomes.push(PutOutcome::Applied {
                sequence: next.sequence,
            });
        }
        Ok(PendingPut {
            store: self,
            tail,
            next,
            batch,
            outcomes,
        })
    }

    /// Applies `batch` without waiting for the disk; on failure, forgets
    /// it (see [`write_failed`](Self::write_failed)).
    fn apply(&self, batch: sled::Batch) -> NodeResult<()> {
        if !self.writable() {
            return Err(Self::refused());
        }
        if let Err(err) = self.tree()?.apply_batch(batch) {
            self.write_failed(&err);
            return Err(Self::refused());
        }
        Ok(())
    }

    /// Applies `batch` and flushes it; on failure, forgets it (see
    /// [`write_failed`](Self::write_failed)).
    async fn write(&self, batch: sled::Batch) -> NodeResult<()> {
        if !self.writable() {
            return Err(Self::refused());
        }
        let result = match self.tree()?.apply_batch(batch) {
            Ok(()) => self.flush().await,
            Err(e) => Err(e.into()),
        };
        if let Err(err) = result {
            self.write_failed(&err);
            return Err(Self::refused());
        }
        Ok(())
    }

    /// Keeps `p`'s revoked certificate serials, so a restart does not
    /// forget them while `p` cannot be reached.
    pub fn put_revoked(&self, p: Province, serials: &[String]) -> NodeResult<()> {
        let json = serde_json::to_vec(serials).map_err(|e| NodeError::Internal(e.to_string()))?;
        self.tree()?.insert(key(b'R', p, &[]), json)?;
        Ok(())
    }

    /// Every province's revoked certificate serials kept by [`put_revoked`](Self::put_revoked).
    pub fn revoked(&self) -> NodeResult<Vec<(Province, Vec<String>)>> {
        let mut out = Vec::new();
        for item in self.tree()?.scan_prefix([b'R']) {
            let (k, v) = item?;
            let code = <[u8; 4]>::try_from(&k[1..5])
                .map_err(|_| NodeError::Internal("revocation key without a province".into()))?;
            let p = Province::from_code(u32::from_be_bytes(code))
                .map_err(|e| NodeError::Internal(e.to_string()))?;
            let serials: Vec<String> =
                serde_json::from_slice(&v).map_err(|e| NodeError::Internal(e.to_string()))?;
            out.push((p, serials));
        }
        Ok(out)
    }

    /// When the replica of `p` was last confirmed by a signed head, in unix
    /// ms by this node's clock (None: never, or held by an older version).
    /// A replica's age is measured from here, not from the head's own time.
    pub fn replica_confirmed(&self, p: Province) -> NodeResult<Option<i64>> {
        Ok(self
            .tree()?
            .get(key(b'A', p, &[]))?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(i64::from_be_bytes))
    }

    /// The new confirmation time a head dated `head_ms` and received at
    /// `received_ms` gives `p`'s replica, if later than the one held: the
    /// head's time, capped at its arrival.
    fn confirmation(&self, p: Province, head_ms: i64, received_ms: i64) -> NodeResult<Option<i64>> {
        let at = head_ms.min(received_ms);
        let held = self.replica_confirmed(p)?;
        Ok(held.is_none_or(|h| h < at).then_some(at))
    }

    /// Verifies and stores a batch of province `p`'s feed, received (now)
    /// from `p` itself or relayed by a peer. `log_key` is `p`'s log key from
    /// the trust list. New changes are durable when this returns.
    pub async fn apply_batch(
        &self,
        p: Province,
        batch: &SubscribeChangesResponse,
        log_key: &str,
    ) -> Result<Applied, ApplyError> {
        let received_ms = crate::status::now_millis();
        if p == self.own {
            return Err(FeedError::Malformed(format!(
                "{p} is this node's own province: it is not replicated"
            ))
            .into());
        }
        let proto_head = batch
            .head
            .as_ref()
            .ok_or_else(|| FeedError::Malformed("batch without a head".into()))?;
        let head = head_of(proto_head)?;
        if head.issuer != p {
            return Err(FeedError::WrongIssuer {
                want: p,
                got: head.issuer,
            }
            .into());
        }
        head.verify(&proto_head.signature, log_key)?;

        let writer = {
            let mut writers = self.replica_writers.lock().expect("writer lock");
            writers.entry(p).or_default().clone()
        };
        let _guard = writer.lock().await;
        let held = self.latest_head(p)?;
        let tail = match &held {
            Some(h) => Tail {
                sequence: h.sequence,
                hash: to_hash(&h.chain_hash)?,
            },
            None => GENESIS,
        };
        let changes: Vec<Change<'_>> = batch
            .changes
            .iter()
            .map(|c| Change {
                sequence: c.sequence,
                record: &c.record,
            })
            .collect();
        let new = feed::check_batch(tail.sequence, &tail.hash, &changes, &head, |s| {
            self.held_hash(p, s)
        })?;

        let head_bytes = proto_head.encode_to_vec();
        let confirmed = self.confirmation(p, proto_head.time_ms, received_ms)?;
        if new.is_empty() {
            // A heartbeat: only a newer statement about the same head counts.
            let newer = held.as_ref().is_none_or(|h| h.time_ms < proto_head.time_ms);
            let mut b = sled::Batch::default();
            if newer {
                b.insert(key(b'L', p, &[]), head_bytes.clone());
                b.insert(key(b'H', p, &head.sequence.to_be_bytes()), head_bytes);
            }
            if let Some(at) = confirmed {
                b.insert(key(b'A', p, &[]), &at.to_be_bytes()[..]);
            }
            // Not flushed: a heartbeat acknowledges nothing.
            self.apply(b)?;
            return Ok(Applied {
                new_changes: 0,
                sequence: tail.sequence,
            });
        }
        let mut b = sled::Batch::default();
        let first_new = new[0].0;
        for change in batch.changes.iter().filter(|c| c.sequence >= first_new) {
            let record = StatusRecord::decode(change.record.as_slice())
                .map_err(|e| FeedError::Malformed(format!("change {}: {e}", change.sequence)))?;
            if record.issuer != p.to_string() {
                return Err(FeedError::Malformed(format!(
                    "change {} is a record of {}, in the feed of {p}",
                    change.sequence, record.issuer
                ))
                .into());
            }
            if record
                .holder
                .parse::<hufu_federation::holder::HolderId>()
                .is_err()
            {
                return Err(FeedError::Malformed(format!(
                    "change {}: bad holder id",
                    change.sequence
                ))
                .into());
            }
            let hash = new[(change.sequence - first_new) as usize].1;
            let mut entry = hash.to_vec();
            entry.extend_from_slice(&change.record);
            b.insert(
                key(b'S', p, record.holder.as_bytes()),
                change.record.as_slice(),
            );
            b.insert(key(b'C', p, &change.sequence.to_be_bytes()), entry);
        }
        b.insert(key(b'L', p, &[]), head_bytes.clone());
        b.insert(key(b'H', p, &head.sequence.to_be_bytes()), head_bytes);
        if let Some(at) = confirmed {
            b.insert(key(b'A', p, &[]), &at.to_be_bytes()[..]);
        }
        self.write(b).await?;
        self.notify(p, head.sequence);
        Ok(Applied {
            new_changes: new.len(),
            sequence: head.sequence,
        })
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

/// Own records whose outcomes are decided, holding the change log: nothing
/// is written until [`commit`](Self::commit), and dropping it writes nothing.
pub struct PendingPut<'a> {
    store: &'a Store,
    tail: tokio::sync::MutexGuard<'a, Tail>,
    next: Tail,
    batch: sled::Batch,
    outcomes: Vec<PutOutcome>,
}

impl PendingPut<'_> {
    /// What each record will be once committed.
    pub fn outcomes(&self) -> &[PutOutcome] {
        &self.outcomes
    }

    /// Writes the changes and returns once they are durable.
    pub async fn commit(mut self) -> NodeResult<Vec<PutOutcome>> {
        if self.next != *self.tail {
            self.store.write(std::mem::take(&mut self.batch)).await?;
            *self.tail = self.next;
            self.store.notify(self.store.own, self.next.sequence);
        }
        Ok(self.outcomes)
    }
}
