//! The node's part of the audit log (DESIGN.md, "Audit log"): its own log
//! of cross-province events, the witness it runs for the other members'
//! logs, and the task that checkpoints its log, has the other members
//! witness it and publishes it once the trust list's quorum is met.
//!
//! The log and the witness live in two trees (`audit` and `witness`) of a
//! sled database of their own, beside the node's data directory. Handlers
//! record events with [`NodeAudit::record`]: a push onto the queue of the
//! library's batching writer; nothing on the hot path waits for the disk.
//! When that queue is full (a disk slower than the load), the handler waits
//! for room on the blocking pool, never on the runtime's threads.
//!
//! A status change is acknowledged only once its entry is on disk too
//! ([`NodeAudit::sync`]): the change and its entry live in two databases, so
//! no single batch covers both, and both are flushed before the reply.
//!
//! The checkpoint task and its calls to the other members' witnesses are in
//! [`checkpoint`]; they go through the node's peer client.

mod checkpoint;

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwapOption;
use hufu_certs::{Identity, Province};
use hufu_federation::audit::{
    AnswerSource, AuditEntry, AuditError, AuditLog, EntryKind, LogSigner, TryAppendError, Witness,
};
use hufu_federation::holder::HolderId;
use hufu_proto::v1::{Colour, Source, StatusRecord};

use crate::config::AuditConfig;
use crate::metrics::Metrics;
use crate::peers::PeerClient;
use crate::status::{colour_name, now_millis};

/// The sled tree of this node's audit log.
pub const LOG_TREE: &str = "audit";
/// The sled tree of this node's witness state and evidence.
pub const WITNESS_TREE: &str = "witness";

/// The log and the witness of one open audit database.
struct Parts {
    log: Arc<AuditLog>,
    witness: Arc<Witness>,
}

impl Parts {
    fn open(path: &Path, signer: Arc<LogSigner>, cache_bytes: u64) -> anyhow::Result<Parts> {
        let db = crate::store::open_db(path, cache_bytes)
            .with_context(|| format!("cannot open audit storage {}", path.display()))
            .map_err(|e| crate::store::full_disk(e, path))?;
        Ok(Parts {
            log: Arc::new(AuditLog::open(db.open_tree(LOG_TREE)?)?),
            witness: Arc::new(Witness::open(db.open_tree(WITNESS_TREE)?, signer)),
        })
    }
}

/// The audit log, the witness, and what the checkpoint task remembers.
pub struct NodeAudit {
    /// None while the database is reopened after a failed write (sled
    /// refuses every write after one fails, until it is opened again).
    parts: ArcSwapOption<Parts>,
    path: PathBuf,
    /// sled's page cache for the log's database (`[audit] cache_mib`).
    cache_bytes: u64,
    signer: Arc<LogSigner>,
    enabled: bool,
    every: Duration,
    /// Per witnessing province, the size it last cosigned as far as this
    /// node knows: where the next consistency proof starts.
    witnessed: Mutex<HashMap<Province, u64>>,
    /// The latest witnessing failures, newest last, for operators.
    failures: Mutex<VecDeque<WitnessFailure>>,
    /// This node's province: the witnesses are the other members.
    province: Province,
    /// How checkpoints reach the witnesses.
    peers: Arc<PeerClient>,
    metrics: Arc<Metrics>,
}

/// Failures kept for the console: enough to see a pattern, bounded.
const FAILURES_KEPT: usize = 50;

/// A member's witness that did not cosign a checkpoint of this node's log.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WitnessFailure {
    pub province: Province,
    /// Size of the checkpoint it did not cosign.
    pub size: u64,
    /// When, unix ms.
    pub time_ms: i64,
}

impl NodeAudit {
    /// Opens the log and the witness in the sled database at `path`; its
    /// checkpoints are signed by `signer` and sent to the other members of
    /// `province`'s federation through `peers`.
    pub fn open(
        path: &Path,
        signer: Arc<LogSigner>,
        config: &AuditConfig,
        province: Province,
        peers: Arc<PeerClient>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<NodeAudit> {
        Ok(NodeAudit {
            province,
            peers,
            metrics,
            parts: ArcSwapOption::from_pointee(Parts::open(
                path,
                signer.clone(),
                config.cache_bytes(),
            )?),
            path: path.to_owned(),
            cache_bytes: config.cache_bytes(),
            signer,
            enabled: config.enabled,
            every: config.checkpoint_every(),
            witnessed: Mutex::new(HashMap::new()),
            failures: Mutex::new(VecDeque::new()),
        })
    }

    /// The log, unless it is being reopened.
    pub fn log(&self) -> Result<Arc<AuditLog>, AuditError> {
        self.parts
            .load()
            .as_ref()
            .map(|p| p.log.clone())
            .ok_or_else(reopening)
    }

    /// The witness, unless it is being reopened.
    pub fn witness(&self) -> Result<Arc<Witness>, AuditError> {
        self.parts
            .load()
            .as_ref()
            .map(|p| p.witness.clone())
            .ok_or_else(reopening)
    }

    /// Opens the database again if a write failed on it (the disk was
    /// full): the log resumes from what is on disk. Called before a status
    /// change is audited, so the first change once there is room again
    /// reopens it.
    pub async fn reopen_if_failed(&self) -> anyhow::Result<()> {
        let failed = match &*self.parts.load() {
            Some(parts) => parts.log.is_closed(),
            None => true,
        };
        if !failed {
            return Ok(());
        }
        let mut old = self.parts.swap(None);
        // Users of the old parts finish their call; the database's lock is
        // released once the last of them lets go.
        for _ in 0..100 {
            match old.map(Arc::try_unwrap) {
                None | Some(Ok(_)) => {
                    old = None;
                    break;
                }
                Some(Err(parts)) => old = Some(parts),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if old.is_some() {
            self.parts.store(old);
            anyhow::bail!("the audit log is still in use; it is reopened on the next write");
        }
        let (path, signer) = (self.path.clone(), self.signer.clone());
        let cache = self.cache_bytes;
        let parts =
            tokio::task::spawn_blocking(move || Parts::open(&path, signer, cache)).await??;
        self.parts.store(Some(Arc::new(parts)));
        tracing::info!("audit log reopened after a failed write");
        Ok(())
    }

    /// Whether events are recorded (`[audit] enabled`).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The latest witnessing failures, oldest first.
    pub fn recent_failures(&self) -> Vec<WitnessFailure> {
        self.failures
            .lock()
            .expect("failures lock")
            .iter()
            .cloned()
            .collect()
    }

    fn witness_failed(&self, province: Province, size: u64) {
        let mut failures = self.failures.lock().expect("failures lock");
        if failures.len() == FAILURES_KEPT {
            failures.pop_front();
        }
        failures.push_back(WitnessFailure {
            province,
            size,
            time_ms: now_millis(),
        });
    }

    /// Appends the entry `build` makes, when auditing is on. Never fails the
    /// caller: a refused entry or a stopped writer is logged.
    pub async fn record(&self, build: impl FnOnce() -> AuditEntry) {
        if self.enabled {
            self.append(build()).await;
        }
    }

    /// Appends `entries` (not even made when auditing is off).
    pub async fn record_all(&self, entries: impl IntoIterator<Item = AuditEntry>) {
        if self.enabled {
            for e in entries {
                self.append(e).await;
            }
        }
    }

    async fn append(&self, mut entry: AuditEntry) {
        if entry.detail.is_some()
            && let Err(AuditError::BadEntry(reason)) = entry.check()
        {
            // Only the free text can be refused; the event itself is kept.
            tracing::warn!(kind = entry.kind.as_str(), %reason, "audit detail dropped");
            entry.detail = None;
        }
        let kind = entry.kind;
        let log = match self.log() {
            Ok(log) => log,
            Err(err) => {
                tracing::error!(kind = kind.as_str(), error = %err, "audit entry not recorded");
                return;
            }
        };
        let result = match log.try_append(entry) {
            Ok(()) => Ok(()),
            Err(TryAppendError::Failed(err)) => Err(err),
            // The writer is a whole queue behind: wait for room on the
            // blocking pool. The caller waits; the runtime does not.
            Err(TryAppendError::Full(entry)) => {
                tokio::task::spawn_blocking(move || log.append(entry))
                    .await
                    .unwrap_or_else(|e| Err(AuditError::Closed(format!("append task: {e}"))))
            }
        };
        if let Err(err) = result {
            tracing::error!(kind = kind.as_str(), error = %err, "audit entry not recorded");
        }
    }

    /// Waits until every entry recorded before is on disk (when auditing is
    /// on): what an acknowledged status change needs of its entry.
    pub async fn sync(&self) -> Result<(), AuditError> {
        if !self.enabled {
            return Ok(());
        }
        let log = self.log()?;
        // Awaited, not waited for on a blocking thread: a status write
        // crosses one thread fewer each way.
        let (done, synced) = tokio::sync::oneshot::channel();
        log.flush_then(move |result| {
            let _ = done.send(result);
        });
        synced
            .await
            .unwrap_or_else(|_| Err(AuditError::Closed("the audit log's writer stopped".into())))
    }
}

fn reopening() -> AuditError {
    AuditError::Closed("the audit log is being reopened after a failed write".into())
}

/// The answer of a lookup made to a province that did not answer.
pub const UNREACHABLE: &str = "unreachable";

/// An entry of `kind` by `caller` about `province`, now.
pub fn entry(kind: EntryKind, caller: &Identity, province: Province) -> AuditEntry {
    AuditEntry::new(now_millis().max(0) as u64, kind, caller.clone(), province)
}

/// `entry` about `holder`, if it is a pseudonym (anything else is left out:
/// an entry names holders by pseudonym only).
pub fn about(entry: AuditEntry, holder: &str) -> AuditEntry {
    match holder.parse::<HolderId>() {
        Ok(h) => entry.with_holder(h),
        Err(_) => entry,
    }
}

/// The answer word for a record: its colour, or `not_found`.
pub fn answer(record: Option<&StatusRecord>) -> &'static str {
    match record {
        Some(r) => colour_name(Colour::try_from(r.colour).unwrap_or(Colour::Unspecified)),
        None => "not_found",
    }
}

/// The audit log's name for a provenance source.
pub fn source(source: i32) -> Option<AnswerSource> {
    match Source::try_from(source).ok()? {
        Source::Authoritative => Some(AnswerSource::Authoritative),
        Source::Replica => Some(AnswerSource::Replica),
        Source::ReplicaStale => Some(AnswerSource::ReplicaStale),
        Source::Token => Some(AnswerSource::Token),
        Source::Unspecified => None,
    }
}

/// An entry of `kind` by `caller` about `holder` of `province`, answered
/// `answer` from `source` (a provenance source).
pub fn answered(
    kind: EntryKind,
    caller: &Identity,
    province: Province,
    holder: &str,
    answer: &str,
    source: Option<i32>,
) -> AuditEntry {
    let mut e = about(entry(kind, caller, province), holder).with_answer(answer);
    e.source = source.and_then(self::source);
    e
}
