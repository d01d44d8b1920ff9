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

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwapOption;
use hufu_certs::{Identity, Province};
use hufu_federation::audit::{
    AnswerSource, AuditEntry, AuditError, AuditLog, Cosignature, EntryKind, LogSigner,
    SignedCheckpoint, TryAppendError, Witness, verify_cosignature, witness_verifier_key,
};
use hufu_federation::holder::HolderId;
use hufu_federation::trust::{Member, TrustList};
use hufu_proto::v1::witness_service_client::WitnessServiceClient;
use hufu_proto::v1::{AddCheckpointRequest, Colour, Source, StatusRecord, add_checkpoint_response};
use tokio_util::sync::CancellationToken;

use crate::config::AuditConfig;
use crate::state::NodeState;
use crate::status::{colour_name, now_millis};

/// The sled tree of this node's audit log.
pub const LOG_TREE: &str = "audit";
/// The sled tree of this node's witness state and evidence.
pub const WITNESS_TREE: &str = "witness";

/// Times a witness is asked again, after telling which size to prove from.
const WITNESS_ATTEMPTS: usize = 3;
/// Checkpoint rounds without quorum in a row before it is logged as a warning.
const UNPUBLISHED_WARN_AFTER: u32 = 3;

/// The log and the witness of one open audit database.
struct Parts {
    log: Arc<AuditLog>,
    witness: Arc<Witness>,
}

impl Parts {
    fn open(path: &Path, signer: Arc<LogSigner>) -> anyhow::Result<Parts> {
        let db = sled::Config::new()
            .path(path)
            .mode(sled::Mode::HighThroughput)
            .open()
            .with_context(|| format!("cannot open audit storage {}", path.display()))?;
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
    signer: Arc<LogSigner>,
    enabled: bool,
    every: Duration,
    /// Per witnessing province, the size it last cosigned as far as this
    /// node knows: where the next consistency proof starts.
    witnessed: Mutex<HashMap<Province, u64>>,
    /// The latest witnessing failures, newest last, for operators.
    failures: Mutex<VecDeque<WitnessFailure>>,
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
    /// Opens the log and the witness in the sled database at `path`.
    pub fn open(
        path: &Path,
        signer: Arc<LogSigner>,
        config: &AuditConfig,
    ) -> anyhow::Result<NodeAudit> {
        Ok(NodeAudit {
            parts: ArcSwapOption::from_pointee(Parts::open(path, signer.clone())?),
            path: path.to_owned(),
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
        let parts = tokio::task::spawn_blocking(move || Parts::open(&path, signer)).await??;
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
        tokio::task::spawn_blocking(move || log.flush())
            .await
            .unwrap_or_else(|e| Err(AuditError::Closed(format!("flush task: {e}"))))
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

/// Checkpoints the log every `[audit] checkpoint_secs` while it grows, until
/// `stop`.
pub async fn run(state: Arc<NodeState>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(state.audit.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut alone_noted = false;
    // One round without quorum is ordinary (a witness restarting, a busy
    // moment); rounds failing in a row are what an operator must see.
    let mut unpublished = 0u32;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(list) = state.membership.load().list.clone() else {
            if !alone_noted {
                tracing::info!(
                    "no trust list: audit entries are recorded, but no checkpoint is published until this node joins a federation (publishing needs the witness quorum of a trust list)"
                );
                alone_noted = true;
            }
            continue;
        };
        // Witnesses are other provinces: shutdown must not wait for them.
        let Some(round) = stop.run_until_cancelled(checkpoint(&state, &list)).await else {
            return;
        };
        match round {
            Ok(()) => unpublished = 0,
            Err(err) => {
                unpublished += 1;
                if unpublished >= UNPUBLISHED_WARN_AFTER {
                    tracing::warn!(error = %err, rounds = unpublished, "audit checkpoints not published for several intervals; retrying at the next one");
                } else {
                    tracing::info!(error = %err, "audit checkpoint not published; retrying at the next interval");
                }
            }
        }
    }
}

/// One round: if the log grew past its last published checkpoint, a new
/// checkpoint, witnessed by the other members, published on quorum.
pub async fn checkpoint(state: &Arc<NodeState>, list: &TrustList) -> anyhow::Result<()> {
    let audit = &state.audit;
    let log = audit.log()?;
    let size = log.size()?;
    state.metrics.audit_log_size.set(size as i64);
    let published = log.latest_published()?.map_or(0, |cp| cp.checkpoint().size);
    if size == 0 || size <= published {
        return Ok(());
    }
    let mut cp = log.checkpoint(&state.log_signer)?;
    let size = cp.checkpoint().size;
    // The witnesses remember what they cosign durably: so must the log,
    // or after a crash it could sign another tree at a size they cosigned.
    // The checkpoint's entries are written; this syncs them.
    let flushed = log.clone();
    tokio::task::spawn_blocking(move || flushed.flush()).await??;

    let witnesses: Vec<&Member> = list
        .members
        .iter()
        .filter(|m| m.province != state.province)
        .collect();
    let cosignatures =
        futures::future::join_all(witnesses.iter().map(|m| ask_witness(state, m, &cp))).await;
    let mut cosigned = 0;
    for (m, c) in witnesses.iter().zip(cosignatures) {
        match c {
            Some(c) => {
                cp.add_cosignature(&c)?;
                cosigned += 1;
            }
            None => {
                audit.witness_failed(m.province, size);
                state
                    .metrics
                    .witness_failures
                    .get_or_create(&vec![("province", m.province.to_string())])
                    .inc();
            }
        }
    }
    match log.publish(&cp, list) {
        Ok(()) => {
            state.metrics.audit_published_size.set(size as i64);
            tracing::debug!(size, cosigned, "audit checkpoint published");
            Ok(())
        }
        Err(AuditError::Quorum { valid, quorum, .. }) => anyhow::bail!(
            "checkpoint at size {size} has {valid} valid cosignatures, the trust list's witness quorum is {quorum}: the other members' nodes must be reachable"
        ),
        Err(e) => Err(e.into()),
    }
}

/// Asks `member`'s nodes to cosign `cp`, proving consistency from the size
/// its witness last cosigned. None (logged) when it does not.
async fn ask_witness(
    state: &Arc<NodeState>,
    member: &Member,
    cp: &SignedCheckpoint,
) -> Option<Cosignature> {
    let p = member.province;
    let size = cp.checkpoint().size;
    let Ok(witness_key) = witness_verifier_key(&member.log_key) else {
        tracing::debug!(province = %p, "member has no usable log key: it runs no witness");
        return None;
    };
    if !state.peers.allows(p) {
        return None;
    }
    let known = state
        .audit
        .witnessed
        .lock()
        .expect("witnessed lock")
        .get(&p)
        .copied();
    let mut old = match known {
        Some(old) => old,
        None => state
            .audit
            .log()
            .and_then(|log| log.latest_published())
            .ok()
            .flatten()
            .map_or(0, |cp| cp.checkpoint().size),
    };
    for endpoint in &member.endpoints {
        let Ok(channel) = state.peers.channel(p, endpoint) else {
            continue;
        };
        let mut client = WitnessServiceClient::new(channel);
        for _ in 0..WITNESS_ATTEMPTS {
            if old > size {
                tracing::error!(
                    province = %p, witnessed = old, size,
                    "the witness cosigned a larger tree than this audit log holds: the log lost entries; investigate before it is taken for a fork"
                );
                return None;
            }
            let proof = match state
                .audit
                .log()
                .and_then(|log| log.consistency_proof(old, size))
            {
                Ok(proof) => proof,
                Err(err) => {
                    tracing::warn!(province = %p, error = %err, "no consistency proof for the witness");
                    return None;
                }
            };
            let mut request = tonic::Request::new(AddCheckpointRequest {
                checkpoint: cp.note(),
                old_size: old,
                proof: proof.iter().map(|h| h.as_bytes().to_vec()).collect(),
            });
            request.set_timeout(state.peers.deadline);
            let reply =
                tokio::time::timeout(state.peers.deadline, client.add_checkpoint(request)).await;
            let outcome = match reply {
                Ok(Ok(reply)) => reply.into_inner().outcome,
                Ok(Err(status)) => {
                    // A server that ran out of the call's grpc-timeout
                    // answers CANCELLED: that is a timeout, not a refusal;
                    // a status with a transport error behind it is a broken
                    // connection, whatever its code.
                    let broken = std::error::Error::source(&status).is_some()
                        || matches!(
                            status.code(),
                            tonic::Code::Unavailable | tonic::Code::Unknown
                        );
                    let timed_out = matches!(
                        status.code(),
                        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
                    );
                    if broken || timed_out {
                        state.peers.failure(p);
                        let what = if broken {
                            "witness unreachable".to_owned()
                        } else {
                            format!("witness timed out after {:?}", state.peers.deadline)
                        };
                        tracing::info!(
                            province = %p, %endpoint, code = ?status.code(), error = %status.message(),
                            "{what}; it is asked again at the next checkpoint"
                        );
                        break; // next endpoint
                    }
                    if status.code() == tonic::Code::FailedPrecondition {
                        // The witness holds a checkpoint of this log that this
                        // one does not extend: this log's history changed.
                        tracing::error!(
                            province = %p, %endpoint, error = %status.message(),
                            "a witness refused this node's audit checkpoint as conflicting with one it cosigned: investigate this node's audit log"
                        );
                    } else {
                        tracing::warn!(
                            province = %p, %endpoint, code = ?status.code(), error = %status.message(),
                            "witness refused this node's audit checkpoint"
                        );
                    }
                    return None;
                }
                Err(_) => {
                    state.peers.failure(p);
                    tracing::info!(
                        province = %p, %endpoint,
                        "witness timed out after {:?}; it is asked again at the next checkpoint",
                        state.peers.deadline
                    );
                    break;
                }
            };
            state.peers.success(p);
            match outcome {
                Some(add_checkpoint_response::Outcome::Cosignature(line)) => {
                    return match verify_cosignature(cp, &line, &witness_key) {
                        Ok(c) => {
                            state
                                .audit
                                .witnessed
                                .lock()
                                .expect("witnessed lock")
                                .insert(p, size);
                            Some(c)
                        }
                        Err(err) => {
                            tracing::warn!(province = %p, error = %err, "witness returned a cosignature that does not verify");
                            None
                        }
                    };
                }
                Some(add_checkpoint_response::Outcome::WitnessSize(have)) => {
                    old = have;
                    state
                        .audit
                        .witnessed
                        .lock()
                        .expect("witnessed lock")
                        .insert(p, have);
                }
                None => {
                    tracing::warn!(province = %p, "empty answer from witness");
                    return None;
                }
            }
        }
    }
    None
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
