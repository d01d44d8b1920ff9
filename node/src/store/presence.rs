//! Which holders this province's store may hold: a Bloom filter of every
//! holder of the own province ever written, so that an own write of a
//! holder the filter has never seen is known new without a read.
//!
//! An own write reads each row's stored status to decide it (unchanged,
//! stale or applied, [`super::own`]). Once the buckets outgrow sled's
//! cache, that read pages a bucket in from disk at random: at 10,000,000
//! holders it was three quarters of the importing task's time (`perf`,
//! issue 17), for rows whose holders were almost all new.
//!
//! The filter never says "absent" of a holder that is stored:
//!
//! - every own change adds its holder when it is staged, before the write
//!   that stores it ([`Store::stage`](super::Store), and a snapshot's
//!   kept changes in [`super::install`]), whether it comes from this
//!   node's writer or a shared write log;
//! - after the store opens, a thread adds the holders already stored: those
//!   of the unmerged table, then every own bucket's, holding the merging
//!   lock so that no status moves between the two meanwhile. Until it has
//!   finished, the filter answers "maybe" for every holder;
//! - nothing removes a holder from the store but a snapshot install, which
//!   adds back what it installs; a holder that is no longer stored only
//!   costs a read.
//!
//! The filter grows in parts: when the newest part holds its capacity, a
//! part of twice that capacity takes the next holders, and a lookup checks
//! every part. Each part is sized for a 1% false-positive rate (about 1.2
//! bytes a holder of its capacity): 18 MB for 10,000,000 holders, in
//! parts of 1, 2, 4 and 8 million.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use fastbloom::AtomicBloomFilter;
use hufu_certs::Province;

use super::Open;
use super::bucket::{self, BUCKET, Holder};
use super::codec;
use super::unmerged::Unmerged;
use crate::error::NodeResult;

/// Buckets read between two looks at whether the store is closing.
const BUCKETS_PER_LOOK: usize = 4096;

/// Holders the first part of the filter is sized for.
const FIRST_CAPACITY: usize = 1 << 20;

/// False-positive rate of each part when it holds its capacity.
const FALSE_POSITIVES: f64 = 0.01;

/// Seed of every part's hasher, the same for all so that a holder is
/// hashed once for all parts. Not a secret: holders are pseudonyms.
const SEED: u128 = 0x6875_6675_2070_7265_7365_6e63_6521;

/// One part of the filter and how many holders it holds.
struct Part {
    bloom: AtomicBloomFilter,
    capacity: usize,
    /// Holders added that the part did not already seem to hold.
    held: AtomicUsize,
}

impl Part {
    fn new(capacity: usize) -> Part {
        Part {
            bloom: AtomicBloomFilter::with_false_pos(FALSE_POSITIVES)
                .seed(&SEED)
                .expected_items(capacity),
            capacity,
            held: AtomicUsize::new(0),
        }
    }
}

/// The holders of one province that a store may hold.
pub(super) struct Presence {
    /// Oldest first; the last takes the holders added.
    parts: RwLock<Vec<Part>>,
    /// Whether every holder stored when the store opened has been added.
    complete: AtomicBool,
}

impl Presence {
    /// An empty filter that answers "maybe" until [`complete`](Self::complete).
    pub(super) fn new() -> Presence {
        Presence {
            parts: RwLock::new(vec![Part::new(FIRST_CAPACITY)]),
            complete: AtomicBool::new(false),
        }
    }

    /// Adds `holders`.
    pub(super) fn add<'a>(&self, holders: impl IntoIterator<Item = &'a Holder>) {
        let mut full = false;
        {
            let parts = self.parts.read().expect("presence lock");
            let last = parts.last().expect("never empty");
            let hash = |h: &Holder| last.bloom.source_hash(h);
            for holder in holders {
                let hash = hash(holder);
                if parts.iter().any(|p| p.bloom.contains_hash(hash)) {
                    continue;
                }
                last.bloom.insert_hash(hash);
                full |= last.held.fetch_add(1, Ordering::Relaxed) + 1 >= last.capacity;
            }
        }
        if full {
            let mut parts = self.parts.write().expect("presence lock");
            let last = parts.last().expect("never empty");
            if last.held.load(Ordering::Relaxed) >= last.capacity {
                let capacity = last.capacity * 2;
                parts.push(Part::new(capacity));
            }
        }
    }

    /// False only if `holder` is surely not held.
    pub(super) fn may_hold(&self, holder: &Holder) -> bool {
        if !self.complete.load(Ordering::Acquire) {
            return true;
        }
        let parts = self.parts.read().expect("presence lock");
        let hash = parts[0].bloom.source_hash(holder);
        parts.iter().any(|p| p.bloom.contains_hash(hash))
    }

    /// Every holder stored when the store opened has been added.
    pub(super) fn complete(&self) {
        self.complete.store(true, Ordering::Release);
    }

    /// Holders added (each counted once, give or take false positives).
    pub(super) fn len(&self) -> usize {
        let parts = self.parts.read().expect("presence lock");
        parts.iter().map(|p| p.held.load(Ordering::Relaxed)).sum()
    }

    /// Bytes of the filter's bits.
    pub(super) fn bytes(&self) -> usize {
        let parts = self.parts.read().expect("presence lock");
        parts.iter().map(|p| p.bloom.num_bits() / 8).sum()
    }
}

/// Adds the holders of `p` that the store holds (its unmerged table, then
/// its buckets) to `presence` and marks it complete. Holds the merging
/// lock throughout, so that no status moves from the table into a bucket
/// behind the scan. False when the store closed first.
pub(super) fn build(
    open: &RwLock<Option<Open>>,
    unmerged: &Unmerged,
    presence: &Presence,
    p: Province,
) -> NodeResult<bool> {
    let started = std::time::Instant::now();
    let _merging = unmerged.merging.lock().expect("merging lock");
    let Some(tree) = open
        .read()
        .expect("store lock")
        .as_ref()
        .map(|o| o.tree.clone())
    else {
        return Ok(false);
    };
    presence.add(&unmerged.holders(p));
    for (n, item) in tree
        .scan_prefix(codec::key(BUCKET, p, &[]))
        .values()
        .enumerate()
    {
        presence.add(&bucket::holders_in(&item?)?);
        if n % BUCKETS_PER_LOOK == 0 && unmerged.closing() {
            return Ok(false);
        }
    }
    presence.complete();
    tracing::info!(
        holders = presence.len(),
        bytes = presence.bytes(),
        ms = started.elapsed().as_millis() as u64,
        "the filter of the holders held is built"
    );
    Ok(true)
}

/// Starts building `presence` on a thread of its own.
pub(super) fn spawn_build(
    open: Arc<RwLock<Option<Open>>>,
    unmerged: Arc<Unmerged>,
    presence: Arc<Presence>,
    p: Province,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("hufu-presence".into())
        .spawn(move || {
            if let Err(err) = build(&open, &unmerged, &presence, p) {
                // Left incomplete: every holder is read, as before.
                tracing::warn!(error = %err, "the filter of the holders held could not be built: every write reads what is stored");
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(i: u64) -> Holder {
        // Spread like pseudonyms, not counted up.
        let mut h = [0; 16];
        h[..8].copy_from_slice(&i.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_be_bytes());
        h[8..].copy_from_slice(&i.to_le_bytes());
        h
    }

    #[test]
    fn answers_maybe_until_complete_then_never_forgets_a_holder_added() {
        let presence = Presence::new();
        assert!(presence.may_hold(&holder(1)), "incomplete: maybe");
        presence.add(&[holder(1), holder(2)]);
        presence.complete();
        assert!(presence.may_hold(&holder(1)));
        assert!(presence.may_hold(&holder(2)));
        let absent = (100..10_100).filter(|i| !presence.may_hold(&holder(*i)));
        assert!(absent.count() > 9_900, "holders never added are absent");
    }

    #[test]
    fn grows_in_parts_and_keeps_its_false_positives_near_the_rate() {
        let presence = Presence::new();
        presence.complete();
        let n = 7 * FIRST_CAPACITY as u64 / 2;
        let holders: Vec<Holder> = (0..n).map(holder).collect();
        for chunk in holders.chunks(1000) {
            presence.add(chunk);
        }
        // Parts of 1 and 2 million full, the third of 4 taking the rest.
        assert_eq!(presence.parts.read().unwrap().len(), 3);
        assert!(
            holders.iter().all(|h| presence.may_hold(h)),
            "no false negative"
        );
        let len = presence.len() as u64;
        assert!(len > n * 97 / 100 && len <= n, "{len} of {n} counted");
        let tried = 100_000;
        let positives = (n..n + tried)
            .filter(|i| presence.may_hold(&holder(*i)))
            .count() as u64;
        // At most about the rate of each part, summed.
        assert!(positives < tried * 3 / 100, "{positives} false positives");
        assert!(presence.bytes() < 10 * 1024 * 1024, "{}", presence.bytes());
    }
}

#[cfg(test)]
mod with_a_store {
    use hufu_proto::v1::StatusRecord;

    use super::*;
    use crate::store::merge::tests::{gd, holders, record, reopen};
    use crate::store::{PutOutcome, Store};

    const T: i64 = 1_600_000_000;

    fn bytes(holder: &str) -> Holder {
        codec::holder_bytes(holder).unwrap()
    }

    /// A store holding `holders[..2000]` in buckets and
    /// `holders[2000..2500]` unmerged, all as of `T`.
    async fn stored(dir: &std::path::Path, holders: &[String]) -> Store {
        let store = Store::open(dir, gd()).unwrap();
        store.unmerged.hold();
        let records: Vec<_> = holders[..2_500].iter().map(|h| record(h, T)).collect();
        for chunk in records[..2_000].chunks(500) {
            store.put_many(chunk).await.unwrap();
        }
        store.merge().await.unwrap();
        store.put_many(&records[2_000..]).await.unwrap();
        assert_eq!(store.unmerged(), 500);
        store
    }

    async fn built(store: &Store) {
        for _ in 0..400 {
            if store.presence.complete.load(Ordering::Acquire) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        panic!("the filter was not built in 10 s");
    }

    #[tokio::test]
    async fn a_build_adds_the_holders_of_the_buckets_and_of_the_unmerged_table() {
        let dir = tempfile::tempdir().unwrap();
        let holders = holders(3_500);
        let store = stored(dir.path(), &holders).await;
        let presence = Presence::new();
        assert!(build(&store.open, &store.unmerged, &presence, gd()).unwrap());
        for holder in &holders[..2_500] {
            assert!(
                presence.may_hold(&bytes(holder)),
                "a stored holder is missed"
            );
        }
        let absent = holders[2_500..]
            .iter()
            .filter(|h| !presence.may_hold(&bytes(h)))
            .count();
        assert!(absent > 950, "{absent} of 1,000 holders never stored");
        // Another province's holders are not its own.
        let other = Presence::new();
        build(
            &store.open,
            &store.unmerged,
            &other,
            Province::parse("610000").unwrap(),
        )
        .unwrap();
        assert_eq!(other.len(), 0);
    }

    #[tokio::test]
    async fn writes_of_stored_holders_are_decided_as_before_while_the_filter_builds_and_after() {
        let dir = tempfile::tempdir().unwrap();
        let holders = holders(3_010);
        let store = stored(dir.path(), &holders).await;
        let tail = store.tail(gd()).await.unwrap().sequence;
        drop(store);
        let mut store = reopen(dir.path()).await;
        // Holders in buckets (0..), unmerged ones (2000..), new ones (3000..).
        let batch: Vec<StatusRecord> = [
            (0..5, T),
            (5..10, T - 1),
            (2_000..2_005, T),
            (2_005..2_010, T - 1),
            (10..15, T + 1),
            (3_000..3_005, T),
            (3_005..3_010, T),
        ]
        .into_iter()
        .flat_map(|(range, secs)| holders[range].iter().map(move |h| record(h, secs)))
        .collect();
        let stale = PutOutcome::Stale { stored_as_of: T };
        let mut want = vec![PutOutcome::Unchanged; 5];
        want.extend(vec![stale.clone(); 5]);
        want.extend(vec![PutOutcome::Unchanged; 5]);
        want.extend(vec![stale; 5]);
        want.extend((1..=15).map(|n| PutOutcome::Applied { sequence: tail + n }));

        // Still building: every holder is read.
        store.presence = Arc::new(Presence::new());
        let pending = store.prepare(&batch).await.unwrap();
        assert_eq!(pending.outcomes(), want);
        drop(pending);

        // Rebuilt after a restart.
        drop(store);
        let store = reopen(dir.path()).await;
        built(&store).await;
        for holder in &holders[..2_500] {
            assert!(store.presence.may_hold(&bytes(holder)));
        }
        assert_eq!(store.put_many(&batch).await.unwrap(), want);
        // What the write stored is in the filter, and read back.
        for record in &batch[20..] {
            assert!(store.presence.may_hold(&bytes(&record.holder)));
            assert_eq!(
                store.get(gd(), &record.holder).unwrap().as_ref(),
                Some(record)
            );
        }
        let again = store.put_many(&batch[20..]).await.unwrap();
        assert_eq!(again, vec![PutOutcome::Unchanged; 15]);
    }
}
