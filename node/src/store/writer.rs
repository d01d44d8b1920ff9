//! This province's writer held across the writes of a bulk import, so that
//! each write is decided, audited and staged while the one before it is
//! being flushed.
//!
//! A write through [`OwnWriter::write`] is applied to sled at once and
//! flushed on the blocking pool; it is published (its statuses put where
//! reads find them, the tail moved, feed subscribers woken) only once the
//! flush has succeeded, at the next write or at [`OwnWriter::settle`]. So
//! nothing reads a change before it is durable, as with
//! [`PendingPut::commit`](super::PendingPut::commit). The next write is
//! decided meanwhile against the statuses of the one being flushed, then
//! those stored. One write at most is unpublished.
//!
//! A writer dropped with a write unpublished (its import's caller went
//! away) leaves it as a crash before its flush would: the tail stays
//! before it, and the next write takes its numbers and its place in the
//! change log.

use std::collections::HashMap;

use hufu_proto::v1::StatusRecord;
use prost::Message;

use super::bucket::Holder;
use super::own::{Prepared, PutOutcome};
use super::{Store, Tail};
use crate::error::{NodeError, NodeResult};

/// Holds this province's change log across several writes; see the
/// module docs.
pub struct OwnWriter<'a> {
    store: &'a Store,
    /// The tail as published: the end of the durable changes.
    tail: tokio::sync::MutexGuard<'a, Tail>,
    /// The write applied and being flushed, not published yet.
    flushing: Option<Flushing>,
}

/// A write applied to sled whose flush is under way.
struct Flushing {
    flush: tokio::task::JoinHandle<sled::Result<usize>>,
    statuses: Vec<(Holder, Vec<u8>)>,
    /// Each holder's place in `statuses` (its last, if it repeats).
    places: HashMap<Holder, usize>,
    next: Tail,
}

impl Store {
    /// Takes this province's writer until the [`OwnWriter`] is finished or
    /// dropped: other own writes wait meanwhile.
    pub async fn own_writer(&self) -> NodeResult<OwnWriter<'_>> {
        if !self.writable() {
            return Err(self.refusal());
        }
        Ok(OwnWriter {
            store: self,
            tail: self.own_writer.lock().await,
            flushing: None,
        })
    }
}

impl<'a> OwnWriter<'a> {
    /// The tail the next write continues: after the one being flushed.
    fn end(&self) -> Tail {
        self.flushing.as_ref().map_or(*self.tail, |f| f.next)
    }

    /// Decides own `records` as [`Store::prepare`] does, as the changes
    /// after the write being flushed, and against its statuses.
    pub fn prepare(&self, records: &[StatusRecord]) -> NodeResult<Prepared<'a>> {
        if !self.store.writable() {
            return Err(self.store.refusal());
        }
        let in_flight = |holder: &Holder| {
            let flushing = self.flushing.as_ref()?;
            let place = *flushing.places.get(holder)?;
            Some(flushing.statuses[place].1.clone())
        };
        self.store.decide(
            self.end(),
            records,
            |record| record.holder.as_str(),
            |record, earlier| self.store.own_outcome(record, earlier, in_flight),
            |record| record.encode_to_vec(),
        )
    }

    /// Writes `prepared` (from [`prepare`](Self::prepare) on this writer,
    /// with what must be durable before it, its audit entries, durable):
    /// publishes the write before it once that is flushed, then applies
    /// this one and starts flushing it. Returns each record's outcome.
    pub async fn write(&mut self, prepared: Prepared<'_>) -> NodeResult<Vec<PutOutcome>> {
        if prepared.from != self.end() {
            return Err(NodeError::Internal(
                "a write prepared on another tail of the change log".into(),
            ));
        }
        let (staged, outcomes) = prepared.into_write()?;
        self.settle().await?;
        let Some(write) = staged else {
            return Ok(outcomes);
        };
        self.store.apply(write.batch)?;
        super::reclaim(write.changes);
        let db = self.store.db()?;
        let places = write
            .statuses
            .iter()
            .enumerate()
            .map(|(place, (holder, _))| (*holder, place))
            .collect();
        self.flushing = Some(Flushing {
            flush: tokio::task::spawn_blocking(move || db.flush()),
            statuses: write.statuses,
            places,
            next: write.next,
        });
        Ok(outcomes)
    }

    /// Waits until the write being flushed is durable, and publishes it.
    pub async fn settle(&mut self) -> NodeResult<()> {
        let Some(flushing) = self.flushing.take() else {
            return Ok(());
        };
        let flushed = flushing
            .flush
            .await
            .map_err(|e| NodeError::Internal(format!("flush task: {e}")))?;
        if let Err(err) = flushed {
            self.store.write_failed(&err);
            return Err(Store::refused());
        }
        self.store
            .publish_own(&mut self.tail, flushing.statuses, flushing.next)
            .await;
        Ok(())
    }

    /// Publishes the last write once it is durable, and lets other writers
    /// in.
    pub async fn finish(mut self) -> NodeResult<()> {
        self.settle().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::merge::tests::{gd, holders, record, reopen};

    const T: i64 = 1_600_000_000;

    /// A write decided while the one before it is still being flushed sees
    /// that one's statuses (not yet where reads find them): the same status
    /// again is unchanged, an older one stale, a newer one a change; and
    /// nothing of it is read before it is published.
    #[tokio::test]
    async fn a_write_decided_while_the_one_before_is_flushed_is_decided_against_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), gd()).unwrap();
        let holders = holders(3_000);
        let first: Vec<_> = holders[..2_000].iter().map(|h| record(h, T)).collect();
        let second: Vec<_> = [(0..500, T), (500..1_000, T - 1), (1_000..1_500, T + 1)]
            .into_iter()
            .flat_map(|(range, secs)| holders[range].iter().map(move |h| record(h, secs)))
            .chain(holders[2_000..2_500].iter().map(|h| record(h, T)))
            .collect();

        let mut writer = store.own_writer().await.unwrap();
        let prepared = writer.prepare(&first).unwrap();
        let outcomes = writer.write(prepared).await.unwrap();
        assert_eq!(
            outcomes.last(),
            Some(&PutOutcome::Applied { sequence: 2_000 })
        );
        // Applied, being flushed, not published: reads do not see it yet.
        assert!(writer.flushing.is_some());
        assert_eq!(*writer.tail, crate::store::GENESIS);
        assert_eq!(store.get(gd(), &holders[0]).unwrap(), None);

        let prepared = writer.prepare(&second).unwrap();
        let mut want = vec![PutOutcome::Unchanged; 500];
        want.extend(vec![PutOutcome::Stale { stored_as_of: T }; 500]);
        want.extend((2_001..=3_000).map(|sequence| PutOutcome::Applied { sequence }));
        // Compared as a count of each outcome: a list of 2,000 says little.
        let counts = |outcomes: &[PutOutcome]| {
            let applied = outcomes
                .iter()
                .filter(|o| matches!(o, PutOutcome::Applied { .. }))
                .count();
            let unchanged = outcomes
                .iter()
                .filter(|o| **o == PutOutcome::Unchanged)
                .count();
            (unchanged, outcomes.len() - applied - unchanged, applied)
        };
        assert_eq!(counts(prepared.outcomes()), (500, 500, 1_000));
        assert!(prepared.outcomes() == want);
        let outcomes = writer.write(prepared).await.unwrap();
        assert!(outcomes == want);
        writer.finish().await.unwrap();

        assert_eq!(store.tail(gd()).await.unwrap().sequence, 3_000);
        for (n, secs) in [(0, T), (700, T), (1_200, T + 1), (1_700, T), (2_200, T)] {
            assert_eq!(
                store.get(gd(), &holders[n]).unwrap(),
                Some(record(&holders[n], secs)),
                "holder {n}"
            );
        }
        assert_eq!(store.get(gd(), &holders[2_700]).unwrap(), None);
        // Durable: read back from the change log after a restart.
        let tail = store.tail(gd()).await.unwrap();
        drop(store);
        let store = reopen(dir.path()).await;
        assert_eq!(store.tail(gd()).await.unwrap(), tail);
        assert_eq!(
            store.get(gd(), &holders[1_200]).unwrap(),
            Some(record(&holders[1_200], T + 1))
        );
    }
}
