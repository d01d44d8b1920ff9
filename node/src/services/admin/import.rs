//! `ImportStatuses`: a province's statuses in bulk, streamed by the caller
//! a row at a time and stored in transactions of [`IMPORT_CHUNK`] rows.
//!
//! Three things overlap, so that neither the caller, nor the node's CPU,
//! nor its disk waits on the others:
//!
//! - a task of its own reads the stream and checks each row into the next
//!   chunk, on another thread of the lane than the storing;
//! - the storing decides a chunk (each row new, unchanged or stale),
//!   audits it and stages its write while the chunk before it is being
//!   flushed ([`OwnWriter`]). A chunk's audit entries are on disk before
//!   its changes are written, and its changes are durable before anyone
//!   (a read, the feed) sees them, as for a single write.
//!
//! At most three chunks are held: one being read, one being stored and
//! one being flushed. Done one after the other, the steps left the node's
//! two cores idle two fifths of the time at 10,000,000 holders (issue 17).

use hufu_certs::Identity;
use hufu_proto::v1::{
    ImportRejection, ImportStatusesRequest, ImportStatusesResponse, StatusRecord,
};
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;
use tonic::{Request, Streaming};

use super::AdminService;
use crate::auth::caller;
use crate::error::{NodeError, NodeResult};
use crate::legacy::verify::LegacyCode;
use crate::services::error::{AdminError, ImportCause};
use crate::status::{format_time, now_unix};
use crate::store::{OwnWriter, PutOutcome};

/// Import rows stored per transaction (and per flush). Each transaction
/// waits for two disk syncs, its audit entries' and its changes': with
/// 1,000 rows the import spent most of its time waiting on them (the node
/// below one core of two busy, issue 17). 5,000 is also a replicated
/// batch's size, so the change-log blocks are alike.
const IMPORT_CHUNK: usize = 5000;

/// Chunks stored in a row before the import lets another writer of the
/// province's statuses in (a `PutStatus` waits for at most about these).
const CHUNKS_PER_HOLD: usize = 8;

/// Rejected rows listed in an import's summary at most (the first found);
/// the summary counts all of them. A file of a million bad rows
/// then gets a summary of a few tens of KiB, not one past the message limit.
pub const LISTED_REJECTIONS: usize = 1000;

/// The rejections of one import: the first [`LISTED_REJECTIONS`] found,
/// and the count of all.
#[derive(Default)]
struct Rejections {
    listed: Vec<ImportRejection>,
    count: u64,
}

impl Rejections {
    fn push(&mut self, line: u64, reason: String) {
        self.count += 1;
        if self.listed.len() < LISTED_REJECTIONS {
            self.listed.push(ImportRejection { line, reason });
        }
    }

    fn extend(&mut self, other: Rejections) {
        self.count += other.count;
        let room = LISTED_REJECTIONS.saturating_sub(self.listed.len());
        self.listed.extend(other.listed.into_iter().take(room));
    }
}

/// Rows read and checked, to store in one transaction: each row's line,
/// record and legacy code to bind.
#[derive(Default)]
struct Chunk {
    lines: Vec<u64>,
    records: Vec<StatusRecord>,
    codes: Vec<Option<LegacyCode>>,
}

impl Chunk {
    fn with_capacity(n: usize) -> Chunk {
        Chunk {
            lines: Vec::with_capacity(n),
            records: Vec::with_capacity(n),
            codes: Vec::with_capacity(n),
        }
    }

    fn len(&self) -> usize {
        self.lines.len()
    }
}

/// What the storing half has done so far.
#[derive(Default)]
struct Stored {
    accepted: u64,
    stale: Rejections,
}

impl AdminService {
    pub(super) async fn import(
        &self,
        request: Request<Streaming<ImportStatusesRequest>>,
    ) -> Result<ImportStatusesResponse, AdminError> {
        let caller = caller(&request)?;
        let rows = request.into_inner();
        let (chunks, mut to_store) = mpsc::channel::<Chunk>(1);
        let reading =
            AbortOnDropHandle::new(tokio::spawn(self.clone().read(rows, now_unix(), chunks)));
        let mut stored = Stored::default();
        // Whatever ends the import early, the rows stored so far stay
        // stored and durable; the error says how many, so the operator
        // knows that running the same file again is safe.
        if let Err(e) = self.store_all(&caller, &mut to_store, &mut stored).await {
            return Err(AdminError::ImportStopped {
                accepted: stored.accepted,
                cause: ImportCause::Store(e),
            });
        }
        let (mut rejections, read) = reading
            .await
            .map_err(|e| NodeError::Internal(format!("import reading task: {e}")))?;
        if let Err(cause) = read {
            return Err(AdminError::ImportStopped {
                accepted: stored.accepted,
                cause,
            });
        }
        rejections.extend(stored.stale);
        let mut rejected = rejections.listed;
        rejected.sort_by_key(|r| r.line);
        tracing::info!(
            accepted = stored.accepted,
            rejected = rejections.count,
            "import finished"
        );
        Ok(ImportStatusesResponse {
            accepted: stored.accepted,
            rejected,
            rejected_count: rejections.count,
        })
    }

    /// Reads and checks the rows of `rows` into chunks for `chunks`, until
    /// the stream ends or the storing half stops taking them.
    async fn read(
        self,
        mut rows: Streaming<ImportStatusesRequest>,
        now: i64,
        chunks: mpsc::Sender<Chunk>,
    ) -> (Rejections, Result<(), ImportCause>) {
        let mut rejections = Rejections::default();
        let mut chunk = Chunk::with_capacity(IMPORT_CHUNK);
        loop {
            let row = match rows.message().await {
                Ok(Some(row)) => row,
                Ok(None) => break,
                Err(s) => return (rejections, Err(ImportCause::Stream(s))),
            };
            let Some(input) = row.status else {
                rejections.push(row.line, "empty row".into());
                continue;
            };
            let code = match row.legacy_code.trim() {
                "" => Ok(None),
                text => self.legacy.own_code(text, "legacy_code").map(Some),
            };
            match self.record_from(&input, now).and_then(|r| Ok((r, code?))) {
                Ok((record, code)) => {
                    chunk.lines.push(row.line);
                    chunk.records.push(record);
                    chunk.codes.push(code);
                }
                Err(e) => rejections.push(row.line, e.to_string()),
            }
            if chunk.len() >= IMPORT_CHUNK {
                let full = std::mem::replace(&mut chunk, Chunk::with_capacity(IMPORT_CHUNK));
                if chunks.send(full).await.is_err() {
                    // Storing stopped; it says why.
                    return (rejections, Ok(()));
                }
            }
        }
        if chunk.len() > 0 {
            let _ = chunks.send(chunk).await;
        }
        (rejections, Ok(()))
    }

    /// Stores every chunk of `to_store`, a chunk being decided and audited
    /// while the one before it is flushed (see the module docs).
    async fn store_all(
        &self,
        caller: &Identity,
        to_store: &mut mpsc::Receiver<Chunk>,
        stored: &mut Stored,
    ) -> NodeResult<()> {
        let mut writer: Option<OwnWriter<'_>> = None;
        let mut held = 0;
        while let Some(chunk) = to_store.recv().await {
            // Legacy codes bind through a write of their own, and with
            // replicas the province's write log numbers the changes: one
            // chunk at a time, as a single write would.
            if self.write_log.is_some() || chunk.codes.iter().any(Option::is_some) {
                if let Some(writer) = writer.take() {
                    writer.finish().await?;
                }
                self.store_linked(caller, &chunk, stored).await?;
                continue;
            }
            if writer.is_none() {
                writer = Some(self.store.own_writer().await?);
            }
            let w = writer.as_mut().expect("just taken");
            let mut prepared = w.prepare(&chunk.records)?;
            let changed = super::applied(prepared.outcomes(), &chunk.records);
            self.audit_changes(caller, changed, || prepared.stage())
                .await?;
            let outcomes = w.write(prepared).await?;
            self.count(&chunk, outcomes, stored);
            held += 1;
            if held >= CHUNKS_PER_HOLD {
                // Another writer waiting gets its turn now.
                if let Some(writer) = writer.take() {
                    writer.finish().await?;
                }
                held = 0;
            } else if to_store.is_empty() {
                // The caller is behind: once the last chunk is durable,
                // nothing holds the province's writer while it waits.
                w.settle().await?;
                if to_store.is_empty()
                    && let Some(writer) = writer.take()
                {
                    writer.finish().await?;
                    held = 0;
                }
            }
        }
        if let Some(writer) = writer.take() {
            writer.finish().await?;
        }
        Ok(())
    }

    /// Stores `chunk` on its own, then binds its legacy codes to the
    /// holders whose statuses were stored (a row whose status was refused
    /// binds nothing).
    async fn store_linked(
        &self,
        caller: &Identity,
        chunk: &Chunk,
        stored: &mut Stored,
    ) -> NodeResult<()> {
        let outcomes = self.store(caller, &chunk.records).await?;
        let links: Vec<_> = chunk
            .records
            .iter()
            .zip(&chunk.codes)
            .zip(&outcomes)
            .filter(|(_, o)| !matches!(o, PutOutcome::Stale { .. }))
            .filter_map(|((record, code), _)| {
                let holder = record.holder.parse().ok()?;
                Some((code.clone()?, Some(holder)))
            })
            .collect();
        self.legacy.link_codes(caller, &links).await?;
        self.count(chunk, outcomes, stored);
        Ok(())
    }

    /// Counts the rows of `chunk` by their `outcomes`.
    fn count(&self, chunk: &Chunk, outcomes: Vec<PutOutcome>, stored: &mut Stored) {
        for (line, outcome) in chunk.lines.iter().zip(outcomes) {
            match outcome {
                PutOutcome::Applied { sequence } => {
                    stored.accepted += 1;
                    self.metrics.status_writes.inc();
                    self.metrics.last_sequence.set(sequence as i64);
                }
                PutOutcome::Unchanged => stored.accepted += 1,
                PutOutcome::Stale { stored_as_of } => stored.stale.push(
                    *line,
                    format!(
                        "stored status is newer (as_of {})",
                        format_time(stored_as_of)
                    ),
                ),
            }
        }
    }
}
