//! Statuses written but not yet merged into their buckets: the change log
//! is the write-ahead log of the buckets.
//!
//! A write makes its change-log block durable, then puts the statuses it
//! sets into the **active** table here, sorted by province and holder,
//! instead of rewriting a bucket at a random place in sled's tree for each
//! change. When the active table holds half of `[storage]
//! unmerged_statuses`, or once writes pause, it is **frozen** and a thread
//! of the store merges it into the buckets in key order ([`super::merge`]),
//! while writers fill a new active table. A read looks in the active
//! table, then the frozen one, then the buckets. A writer that fills the
//! active table while the frozen one is still being merged waits for that
//! merge: the two tables never hold more than the bound.
//!
//! sled rewrote a bucket's page for every change, at random: old versions
//! of pages that its segment cleaning kept (133 bytes a holder of a
//! replica's 183 at 10,000,000 holders), and, once the tree outgrew the
//! cache, a page read from disk for each change (issue 17).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use hufu_certs::Province;
use tokio::sync::watch;

use super::bucket::Holder;
use crate::error::{NodeError, NodeResult};

/// Statuses held unmerged at most (both tables) when the configuration does
/// not say: about 128 MiB of memory. A merge reads and rewrites every bucket
/// that a status of its table falls in, which at 10,000,000 holders is
/// nearly all of them whatever the table's size, and writers wait for it
/// when the next table fills: tables of 1,000,000 halve the merges of
/// tables of 500,000 (issue 17).
pub const DEFAULT_UNMERGED_STATUSES: usize = 2_000_000;

/// Writes pause this long before the active table is merged at rest.
const QUIET_MS: u64 = 1000;

/// A status waits at most this long to be merged while writes go on.
const OLDEST: Duration = Duration::from_secs(30);

/// How often the merging thread looks whether a table is due.
const TICK: Duration = Duration::from_millis(250);

/// Merges failed in a row before the store refuses writes: statuses
/// that cannot be merged would otherwise pile up here, or writers wait for
/// room forever without a word (a merge is retried every second).
const FAILURES_TO_REFUSE: u32 = 3;

/// Bytes of a status kept in the table itself; longer ones are allocated.
/// A compact status is about 11 bytes.
const INLINE: usize = 22;

/// A status value as held here.
#[derive(Debug, Clone)]
enum Value {
    Inline(u8, [u8; INLINE]),
    Heap(Box<[u8]>),
}

impl Value {
    fn new(bytes: &[u8]) -> Value {
        if bytes.len() <= INLINE {
            let mut inline = [0; INLINE];
            inline[..bytes.len()].copy_from_slice(bytes);
            Value::Inline(bytes.len() as u8, inline)
        } else {
            Value::Heap(bytes.into())
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Value::Inline(len, bytes) => &bytes[..*len as usize],
            Value::Heap(bytes) => bytes,
        }
    }
}

/// Statuses by province and holder, and how far each province's change
/// log they go.
#[derive(Debug, Default, Clone)]
pub(super) struct Table {
    statuses: BTreeMap<(Province, Holder), Value>,
    /// Per province, the last change whose effect is here.
    through: HashMap<Province, u64>,
}

impl Table {
    /// The statuses in key order, as a merge writes them.
    pub(super) fn statuses(&self) -> impl Iterator<Item = (Province, &Holder, &[u8])> {
        self.statuses.iter().map(|((p, h), v)| (*p, h, v.bytes()))
    }

    /// Per province, the change the table's statuses go through.
    pub(super) fn through(&self) -> &HashMap<Province, u64> {
        &self.through
    }

    fn len(&self) -> usize {
        self.statuses.len()
    }
}

#[derive(Default)]
struct Tables {
    active: Table,
    frozen: Option<Arc<Table>>,
    /// When the active table got its first status, and its latest.
    first_write: Option<Instant>,
    last_write: Option<Instant>,
    /// Why the latest merge failed, until one succeeds.
    failed: Option<String>,
    /// Merges failed in a row.
    failures: u32,
}

/// The tables of one store, shared with its merging thread.
pub(super) struct Unmerged {
    tables: RwLock<Tables>,
    /// Statuses held at most, both tables together.
    bound: usize,
    /// Writes pause this long (ms) before the active table is merged.
    quiet_ms: std::sync::atomic::AtomicU64,
    /// Whether the store is closing; the merging thread waits on `wake`.
    closing: Mutex<bool>,
    wake: Condvar,
    /// Held by the merging thread through a merge.
    pub(super) merging: Mutex<()>,
    /// Counts merges ended (done or failed), for writers waiting for room.
    ended: watch::Sender<u64>,
    /// Why merges keep failing, once [`FAILURES_TO_REFUSE`] in a row have;
    /// None again once one succeeds.
    failing: watch::Sender<Option<String>>,
}

impl Unmerged {
    pub(super) fn new(bound: usize) -> Unmerged {
        Unmerged {
            tables: RwLock::new(Tables::default()),
            bound: bound.max(2),
            quiet_ms: QUIET_MS.into(),
            closing: Mutex::new(false),
            wake: Condvar::new(),
            merging: Mutex::new(()),
            ended: watch::channel(0).0,
            failing: watch::channel(None).0,
        }
    }

    /// `holder`'s status in `p` if it is not merged yet.
    pub(super) fn get(&self, p: Province, holder: &Holder) -> Option<Vec<u8>> {
        let tables = self.tables.read().expect("unmerged lock");
        let key = (p, *holder);
        tables
            .active
            .statuses
            .get(&key)
            .or_else(|| tables.frozen.as_ref()?.statuses.get(&key))
            .map(|v| v.bytes().to_vec())
    }

    /// The holders of `p` not merged yet, both tables.
    pub(super) fn holders(&self, p: Province) -> Vec<Holder> {
        let tables = self.tables.read().expect("unmerged lock");
        let frozen = tables.frozen.as_deref().into_iter();
        std::iter::once(&tables.active)
            .chain(frozen)
            .flat_map(|t| t.statuses.keys())
            .filter(|(q, _)| *q == p)
            .map(|(_, h)| *h)
            .collect()
    }

    /// Statuses not merged yet, both tables.
    pub(super) fn len(&self) -> usize {
        let tables = self.tables.read().expect("unmerged lock");
        tables.active.len() + tables.frozen.as_ref().map_or(0, |t| t.len())
    }

    /// Takes the statuses `p`'s changes through `through` set, once those
    /// changes are durable in the change log.
    pub(super) fn put(&self, p: Province, through: u64, mut statuses: Vec<(Holder, Vec<u8>)>) {
        // In key order, each insert finds the tree's path where the one
        // before left it, in the cache: at random, an insert into a table
        // of a million missed it at every level (issue 17). A stable sort,
        // so that of a holder changed twice the later status stays.
        statuses.sort_by_key(|(holder, _)| *holder);
        let mut tables = self.tables.write().expect("unmerged lock");
        for (holder, value) in statuses {
            tables
                .active
                .statuses
                .insert((p, holder), Value::new(&value));
        }
        tables.active.through.insert(p, through);
        let now = Instant::now();
        tables.first_write.get_or_insert(now);
        tables.last_write = Some(now);
        if tables.active.len() >= self.bound / 2 && tables.frozen.is_none() {
            self.freeze(&mut tables);
        }
    }

    /// Waits until the active table has room: while it is full and the
    /// frozen one is still being merged. Writers call it after
    /// [`put`](Self::put), so that memory stays bounded however fast they
    /// write.
    pub(super) async fn make_room(&self) {
        let mut ended = self.ended.subscribe();
        loop {
            {
                let mut tables = self.tables.write().expect("unmerged lock");
                // Writes are refused while merges keep failing: nothing
                // more comes in to wait for.
                if tables.active.len() < self.bound / 2 || self.is_failing() {
                    return;
                }
                if tables.frozen.is_none() {
                    self.freeze(&mut tables);
                    return;
                }
            }
            if ended.changed().await.is_err() {
                return;
            }
        }
    }

    /// Waits until everything written before the call is merged.
    pub(super) async fn merge_all(&self) -> NodeResult<()> {
        let mut ended = self.ended.subscribe();
        let mut asked = false;
        loop {
            {
                let mut tables = self.tables.write().expect("unmerged lock");
                if asked && let Some(error) = &tables.failed {
                    return Err(NodeError::Unavailable(format!(
                        "statuses could not be merged into storage ({error}): retry in a moment"
                    )));
                }
                if tables.frozen.is_none() {
                    if tables.active.len() == 0 {
                        return Ok(());
                    }
                    self.freeze(&mut tables);
                    asked = true;
                }
            }
            if ended.changed().await.is_err() {
                return Ok(());
            }
        }
    }

    fn freeze(&self, tables: &mut Tables) {
        let active = std::mem::take(&mut tables.active);
        tables.frozen = Some(Arc::new(active));
        tables.first_write = None;
        self.wake.notify_one();
    }

    /// The frozen table to merge, freezing the active one first if writes
    /// paused (or its oldest status waited long enough).
    pub(super) fn due(&self) -> Option<Arc<Table>> {
        let mut tables = self.tables.write().expect("unmerged lock");
        if tables.frozen.is_none() && tables.active.len() > 0 {
            let quiet_ms = self.quiet_ms.load(std::sync::atomic::Ordering::Relaxed);
            let quiet = tables
                .last_write
                .is_none_or(|t| t.elapsed() >= Duration::from_millis(quiet_ms));
            let old = tables.first_write.is_some_and(|t| t.elapsed() >= OLDEST);
            if quiet || old {
                self.freeze(&mut tables);
            }
        }
        tables.frozen.clone()
    }

    /// The frozen table is in the buckets now (or the merge failed).
    pub(super) fn ended(&self, result: Result<(), String>) {
        let mut tables = self.tables.write().expect("unmerged lock");
        let failing = match result {
            Ok(()) => {
                tables.frozen = None;
                tables.failed = None;
                tables.failures = 0;
                None
            }
            Err(error) => {
                tables.failures += 1;
                tables.failed = Some(error.clone());
                (tables.failures >= FAILURES_TO_REFUSE).then_some(error)
            }
        };
        drop(tables);
        self.failing.send_if_modified(|now| {
            let changed = now.is_some() != failing.is_some();
            match (&now, &failing) {
                (None, Some(error)) => tracing::error!(%error, "statuses keep failing to merge into storage: writes are refused until a merge succeeds"),
                (Some(_), None) => tracing::info!("statuses merge into storage again: writes are accepted"),
                _ => {}
            }
            *now = failing;
            changed
        });
        self.ended.send_modify(|n| *n += 1);
    }

    /// Why merges keep failing, if they do (see [`FAILURES_TO_REFUSE`]).
    pub(super) fn failing(&self) -> Option<String> {
        self.failing.borrow().clone()
    }

    /// Whether merges keep failing, without copying why.
    pub(super) fn is_failing(&self) -> bool {
        self.failing.borrow().is_some()
    }

    /// Follows [`failing`](Self::failing).
    pub(super) fn watch_failing(&self) -> watch::Receiver<Option<String>> {
        self.failing.subscribe()
    }

    /// Forgets `p`'s unmerged statuses: its state here is being replaced
    /// (a snapshot install, which holds `p`'s writer). Waits for a merge
    /// under way to end first.
    pub(super) fn forget(&self, p: Province) {
        let _merging = self.merging.lock().expect("merging lock");
        let mut tables = self.tables.write().expect("unmerged lock");
        let Tables { active, frozen, .. } = &mut *tables;
        for table in std::iter::once(active).chain(frozen.as_mut().map(Arc::make_mut)) {
            table.statuses.retain(|(q, _), _| *q != p);
            table.through.remove(&p);
        }
    }

    /// Sleeps until woken or [`TICK`] passes; false once the store closes.
    pub(super) fn wait(&self) -> bool {
        let closing = self.closing.lock().expect("closing lock");
        if *closing {
            return false;
        }
        let (closing, _) = self.wake.wait_timeout(closing, TICK).expect("closing lock");
        !*closing
    }

    /// Whether the store is closing: a merge under way stops between
    /// batches (what it did not write is replayed when the store opens).
    pub(super) fn closing(&self) -> bool {
        *self.closing.lock().expect("closing lock")
    }

    /// Merges only when a table fills or is asked for, never at rest (for
    /// tests that look at what is not merged yet).
    #[cfg(test)]
    pub(super) fn hold(&self) {
        self.quiet_ms
            .store(u64::MAX / 2, std::sync::atomic::Ordering::Relaxed);
    }

    /// Freezes the active table and returns the frozen one (for tests
    /// that merge it themselves, holding [`merging`](Self::merging)).
    #[cfg(test)]
    pub(super) fn freeze_now(&self) -> Option<Arc<Table>> {
        let mut tables = self.tables.write().expect("unmerged lock");
        if tables.frozen.is_none() {
            self.freeze(&mut tables);
        }
        tables.frozen.clone()
    }

    pub(super) fn close(&self) {
        *self.closing.lock().expect("closing lock") = true;
        self.wake.notify_all();
    }
}

impl std::fmt::Debug for Unmerged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unmerged")
            .field("len", &self.len())
            .finish()
    }
}
