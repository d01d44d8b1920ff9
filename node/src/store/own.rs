//! This province's own writes: each record is compared with what is stored,
//! numbered if it supersedes it, and appended through the change log's seam
//! once what must be durable first (its audit entry) is.

use std::collections::HashMap;

use hufu_federation::feed::Change;
use hufu_proto::v1::StatusRecord;
use prost::Message;

use super::{Store, Tail};
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
        if !self.writable() {
            return Err(Self::refused());
        }
        let tail = self.own_writer.lock().await;
        let mut sequence = tail.sequence;
        let mut changes = Vec::new();
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
            sequence += 1;
            changes.push((sequence, record.encode_to_vec()));
            pending.insert(&record.holder, record);
            outcomes.push(PutOutcome::Applied { sequence });
        }
        Ok(PendingPut {
            store: self,
            tail,
            changes,
            outcomes,
        })
    }
}

/// Own records whose outcomes are decided, holding the change log: nothing
/// is written until [`commit`](Self::commit), and dropping it writes nothing.
pub struct PendingPut<'a> {
    pub(super) store: &'a Store,
    pub(super) tail: tokio::sync::MutexGuard<'a, Tail>,
    /// The changes to append: their numbers and encoded records.
    pub(super) changes: Vec<(u64, Vec<u8>)>,
    pub(super) outcomes: Vec<PutOutcome>,
}

impl PendingPut<'_> {
    /// What each record will be once committed.
    pub fn outcomes(&self) -> &[PutOutcome] {
        &self.outcomes
    }

    /// Writes the changes and returns once they are durable.
    pub async fn commit(mut self) -> NodeResult<Vec<PutOutcome>> {
        let changes: Vec<Change<'_>> = self
            .changes
            .iter()
            .map(|(sequence, record)| Change {
                sequence: *sequence,
                record,
            })
            .collect();
        self.store.append_own(&mut self.tail, &changes).await?;
        Ok(self.outcomes)
    }
}
