//! This province's own writes: each record is compared with what is stored,
//! numbered if it supersedes it, and appended through the change log's seam
//! once what must be durable first (its audit entry) is.

use std::collections::HashMap;
use std::hash::Hash;

use hufu_federation::feed::Change;
use hufu_proto::v1::StatusRecord;
use prost::Message;

use super::bucket::Holder;
use super::log::OwnWrite;
use super::{Store, Tail, codec};
use crate::error::NodeResult;
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

impl Store {
    /// Writes own-province records, each only if it supersedes what is
    /// stored, appends them to the change log, and returns once durable.
    pub async fn put_many(&self, records: &[StatusRecord]) -> NodeResult<Vec<PutOutcome>> {
        self.prepare(records).await?.commit().await
    }

    /// The first half of [`put_many`](Self::put_many): decides each record's
    /// outcome and holds the change log until [`PendingPut::commit`], so
    /// that what must be durable before the change (its audit entry) can be.
    pub async fn prepare(&self, records: &[StatusRecord]) -> NodeResult<PendingPut<'_>> {
        // The statuses read here are those the commit replaces: the writer,
        // held from here to the commit, is the only one of own statuses.
        self.stage_own(
            records,
            |record| record.holder.as_str(),
            |record, earlier| self.own_outcome(record, earlier, |_| None),
            |record| record.encode_to_vec(),
        )
        .await
    }

    /// What storing own `record` leaves as it is (`Unchanged`, `Stale`), or
    /// None when it is a change: compared with `earlier` (the record of the
    /// same holder earlier in the call), else with what `in_flight` says a
    /// write not yet published sets, else with what is stored.
    pub(super) fn own_outcome(
        &self,
        record: &StatusRecord,
        earlier: Option<&StatusRecord>,
        in_flight: impl Fn(&Holder) -> Option<Vec<u8>>,
    ) -> NodeResult<Option<PutOutcome>> {
        let holder = codec::holder_bytes(&record.holder);
        let stored = match (earlier, holder) {
            (Some(r), _) => Some(r.clone()),
            (None, Some(h)) => match in_flight(&h) {
                Some(value) => Some(codec::read_status(self.own, &record.holder, &value)?),
                // A holder never stored needs no read ([`presence`]).
                None if !self.presence.may_hold(&h) => None,
                None => self.get(self.own, &record.holder)?,
            },
            (None, None) => self.get(self.own, &record.holder)?,
        };
        Ok(match stored {
            Some(stored) if stored == *record => Some(PutOutcome::Unchanged),
            Some(stored) if !supersedes(record, &stored) => Some(PutOutcome::Stale {
                stored_as_of: seconds(stored.as_of.as_ref()).unwrap_or(0),
            }),
            _ => None,
        })
    }

    /// Numbers the `items` that change something as this province's next
    /// changes and holds the change log until [`PendingPut::commit`].
    /// `kept` says what an item leaves as it is (`Unchanged`, `Stale`), or
    /// None for a change, given the item of the same `key` earlier in the
    /// call if any: items may repeat within a call, and later ones are
    /// compared with earlier ones, not with the disk.
    pub(super) async fn stage_own<'a, T, K: Eq + Hash>(
        &self,
        items: &'a [T],
        key: impl Fn(&'a T) -> K,
        kept: impl Fn(&'a T, Option<&'a T>) -> NodeResult<Option<PutOutcome>>,
        encode: impl Fn(&'a T) -> Vec<u8>,
    ) -> NodeResult<PendingPut<'_>> {
        if !self.writable() {
            return Err(self.refusal());
        }
        let tail = self.own_writer.lock().await;
        let prepared = self.decide(*tail, items, key, kept, encode)?;
        Ok(PendingPut { tail, prepared })
    }

    /// Decides `items` (see [`stage_own`](Self::stage_own)) as the changes
    /// after `from`, without writing anything.
    pub(super) fn decide<'a, T, K: Eq + Hash>(
        &self,
        from: Tail,
        items: &'a [T],
        key: impl Fn(&'a T) -> K,
        kept: impl Fn(&'a T, Option<&'a T>) -> NodeResult<Option<PutOutcome>>,
        encode: impl Fn(&'a T) -> Vec<u8>,
    ) -> NodeResult<Prepared<'_>> {
        let mut sequence = from.sequence;
        let mut changes = Vec::with_capacity(items.len());
        let mut outcomes = Vec::with_capacity(items.len());
        let mut pending: HashMap<K, &'a T> = HashMap::with_capacity(items.len());
        for item in items {
            let key = key(item);
            if let Some(outcome) = kept(item, pending.get(&key).copied())? {
                outcomes.push(outcome);
                continue;
            }
            sequence += 1;
            changes.push((sequence, encode(item)));
            pending.insert(key, item);
            outcomes.push(PutOutcome::Applied { sequence });
        }
        // Each lookup above may have paged a leaf in and another out.
        super::reclaim(items.len());
        Ok(Prepared {
            store: self,
            from,
            changes,
            outcomes,
            staged: None,
        })
    }
}

/// Own changes decided and numbered after a tail, not written: what a
/// [`PendingPut`] or an [`OwnWriter`](super::OwnWriter) writes.
pub struct Prepared<'a> {
    store: &'a Store,
    /// The tail the changes continue.
    pub(super) from: Tail,
    /// The changes to append: their numbers and encoded records.
    changes: Vec<(u64, Vec<u8>)>,
    outcomes: Vec<PutOutcome>,
    /// The write of the changes, once [`stage`](Self::stage)d.
    staged: Option<OwnWrite>,
}

impl Prepared<'_> {
    /// What each record will be once written.
    pub fn outcomes(&self) -> &[PutOutcome] {
        &self.outcomes
    }

    /// Prepares the write of the changes (their change-log blocks, the
    /// statuses they set) without writing anything, so that a caller can
    /// do it while it waits for what must be durable first (an import, its
    /// audit entries: the audit log's thread encodes them meanwhile).
    pub fn stage(&mut self) -> NodeResult<()> {
        if self.staged.is_none() {
            let changes: Vec<Change<'_>> = self
                .changes
                .iter()
                .map(|(sequence, record)| Change {
                    sequence: *sequence,
                    record,
                })
                .collect();
            self.staged = self.store.stage_write(self.from, &changes)?;
        }
        Ok(())
    }

    /// The staged write (None: nothing changes) and the outcomes.
    pub(super) fn into_write(mut self) -> NodeResult<(Option<OwnWrite>, Vec<PutOutcome>)> {
        self.stage()?;
        Ok((self.staged.take(), self.outcomes))
    }
}

/// Own records whose outcomes are decided, holding the change log: nothing
/// is written until [`commit`](Self::commit), and dropping it writes nothing.
pub struct PendingPut<'a> {
    tail: tokio::sync::MutexGuard<'a, Tail>,
    prepared: Prepared<'a>,
}

impl PendingPut<'_> {
    /// What each record will be once committed.
    pub fn outcomes(&self) -> &[PutOutcome] {
        self.prepared.outcomes()
    }

    /// See [`Prepared::stage`].
    pub fn stage(&mut self) -> NodeResult<()> {
        self.prepared.stage()
    }

    /// Writes the changes and returns once they are durable.
    pub async fn commit(mut self) -> NodeResult<Vec<PutOutcome>> {
        let store = self.prepared.store;
        let (staged, outcomes) = self.prepared.into_write()?;
        if let Some(staged) = staged {
            store.write_own(&mut self.tail, staged).await?;
        }
        Ok(outcomes)
    }
}
