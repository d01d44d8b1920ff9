//! Durable storage of one province's statuses in sled.
//!
//! Trees: `statuses` (holder → current record) and `changes` (sequence →
//! record), the province's append-only status-change log that peers replicate.
//! Both are updated in one transaction, and a write is acknowledged only after
//! sled has flushed it to disk, so an acknowledged status survives `kill -9`.

use std::path::Path;

use hufu_proto::v1::StatusRecord;
use prost::Message;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

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

pub struct Store {
    db: sled::Db,
    statuses: sled::Tree,
    changes: sled::Tree,
    /// Serialises writers so change numbers are assigned without gaps; holds
    /// the last assigned sequence.
    writer: tokio::sync::Mutex<u64>,
}

impl Store {
    pub fn open(path: &Path) -> NodeResult<Store> {
        let db = sled::Config::new()
            .path(path)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        let statuses = db.open_tree("statuses")?;
        let changes = db.open_tree("changes")?;
        let last = match changes.last()? {
            Some((key, _)) => u64::from_be_bytes(key.as_ref().try_into().map_err(|_| {
                NodeError::Internal("change log key is not a 64-bit sequence".into())
            })?),
            None => 0,
        };
        Ok(Store {
            db,
            statuses,
            changes,
            writer: tokio::sync::Mutex::new(last),
        })
    }

    pub fn get(&self, holder: &str) -> NodeResult<Option<StatusRecord>> {
        match self.statuses.get(holder.as_bytes())? {
            Some(bytes) => Ok(Some(StatusRecord::decode(bytes.as_ref())?)),
            None => Ok(None),
        }
    }

    /// Number of holders with a status.
    pub fn holder_count(&self) -> usize {
        self.statuses.len()
    }

    /// Sequence number of the newest change.
    pub async fn last_sequence(&self) -> u64 {
        *self.writer.lock().await
    }

    /// Writes records in one transaction, each only if it supersedes what is
    /// stored, and returns once the batch is durable.
    pub async fn put_many(&self, records: &[StatusRecord]) -> NodeResult<Vec<PutOutcome>> {
        let mut last = self.writer.lock().await;
        let start = *last;
        let result = (&self.statuses, &self.changes).transaction(|(statuses, changes)| {
            let mut seq = start;
            let mut outcomes = Vec::with_capacity(records.len());
            for record in records {
                let key = record.holder.as_bytes();
                if let Some(bytes) = statuses.get(key)? {
                    let stored = StatusRecord::decode(bytes.as_ref())
                        .map_err(ConflictableTransactionError::Abort)?;
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
                seq += 1;
                statuses.insert(key, bytes.as_slice())?;
                changes.insert(&seq.to_be_bytes(), bytes)?;
                outcomes.push(PutOutcome::Applied { sequence: seq });
            }
            Ok((seq, outcomes))
        });
        let (seq, outcomes) = result.map_err(|e| match e {
            TransactionError::Abort(decode) => NodeError::Corrupt(decode),
            TransactionError::Storage(err) => NodeError::Storage(err),
        })?;
        *last = seq;
        drop(last);
        self.flush().await?;
        Ok(outcomes)
    }

    /// Makes everything written so far durable. sled serialises flushes
    /// internally, so writers that arrive while one runs share the next
    /// (group commit). A blocking flush on the blocking pool: sled's
    /// `flush_async` can stall when many callers wait on it at once.
    pub async fn flush(&self) -> NodeResult<()> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| NodeError::Internal(format!("flush task: {e}")))??;
        Ok(())
    }
}
