//! A replica's consumer of the province's write log: reads the stream in
//! order from the position after the last one applied, applies each write
//! to the local store and keyring, and tells a waiting writer what it did.
//!
//! The position applied is kept in the store's database, written after the
//! write itself: after a crash between the two, the last write is applied
//! again, which changes nothing (a record identical to the stored one is
//! unchanged, a key already in the keyring is not added twice).
//!
//! A replica whose next position is no longer in the stream (it starts
//! empty after the stream's limit dropped its first writes, or it was
//! stopped longer than the stream keeps writes) first installs a snapshot
//! of another replica ([`super::snapshot`]), then follows the stream from
//! the snapshot's position.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use futures::{FutureExt, StreamExt};
use hufu_certs::Province;
use hufu_federation::codes::CodeAlg;
use tokio_util::sync::CancellationToken;

use super::{Applied, WriteLog};
use crate::error::{NodeError, NodeResult};
use crate::replication::Write;
use crate::store::binding::Binding;
use crate::store::{PutOutcome, Store};

/// What a replica applies the log to: its store and its keyring.
pub trait Replica: Send + Sync + 'static {
    fn province(&self) -> Province;
    fn store(&self) -> &Store;
    /// Makes `pkcs8` the code-signing key as of `at` (may block on disk).
    fn rotate_key_to(&self, alg: CodeAlg, pkcs8: &[u8], at: i64) -> Result<String, String>;
    /// Revokes `kid` as of `at` (may block on disk).
    fn revoke_key_at(&self, kid: &str, at: i64) -> Result<(), String>;
    /// Called with the outcomes of each status write applied.
    fn statuses_applied(&self, outcomes: &[PutOutcome]);
    /// Installs another replica's snapshot taken at a stream position of at
    /// least `first_kept - 1` (this replica is at `position`), and returns
    /// that position.
    fn catch_up(
        &self,
        log: &WriteLog,
        position: u64,
        first_kept: u64,
    ) -> impl std::future::Future<Output = anyhow::Result<u64>> + Send;
}

const POSITION_TREE: &str = "replication";
const POSITION_KEY: &[u8] = b"applied";

/// How long the consumer waits before following the log again after it
/// lost it (NATS down, stream missing).
const RETRY_EVERY: Duration = Duration::from_millis(500);

/// How long the consumer may be quiet before the stream is asked whether it
/// has grown meanwhile.
const STALL_CHECK: Duration = Duration::from_secs(1);

/// Messages applied together at most.
const MAX_BATCH: usize = 256;

/// The stream position `store` has applied up to (0: none).
pub fn applied_position(store: &Store) -> NodeResult<u64> {
    let tree = store.db()?.open_tree(POSITION_TREE)?;
    Ok(match tree.get(POSITION_KEY)? {
        Some(v) => u64::from_be_bytes(v.as_ref().try_into().map_err(|_| {
            NodeError::Internal("the stored write log position is not 8 bytes".into())
        })?),
        None => 0,
    })
}

pub(super) fn set_applied_position(store: &Store, position: u64) -> NodeResult<()> {
    let tree = store.db()?.open_tree(POSITION_TREE)?;
    tree.insert(POSITION_KEY, &position.to_be_bytes())?;
    Ok(())
}

/// Follows the write log into `replica` until `stop`, starting again after
/// any failure.
pub async fn run<R: Replica>(replica: Arc<R>, log: Arc<WriteLog>, stop: CancellationToken) {
    loop {
        match follow(&replica, &log, &stop).await {
            Ok(()) => return,
            Err(err) => {
                tracing::warn!(error = %err, "following the province's write log; trying again")
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RETRY_EVERY) => {}
        }
    }
}

/// Applies the stream from the position after the stored one; returns Ok
/// at `stop`, Err when the stream is lost or a write cannot be applied.
async fn follow<R: Replica>(
    replica: &Arc<R>,
    log: &WriteLog,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let mut position = applied_position(replica.store())?;
    log.applied.send_replace(position);
    let stream = log.stream().await.map_err(anyhow::Error::msg)?;
    let (first_kept, last) = log.kept().await?;
    if first_kept > position + 1 && last >= first_kept {
        tracing::warn!(
            position,
            first_kept,
            "this replica is behind what the province's write log keeps: installing another replica's snapshot"
        );
        // Held so that a snapshot served from here meanwhile waits.
        let _applying = log.applying.lock().await;
        position = replica.catch_up(log, position, first_kept).await?;
        set_applied_position(replica.store(), position)?;
        log.applied.send_replace(position);
        tracing::info!(position, "installed a replica snapshot");
    }
    let deliver_policy = match position {
        0 => DeliverPolicy::All,
        p => DeliverPolicy::ByStartSequence {
            start_sequence: p + 1,
        },
    };
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: log.subject.clone(),
            deliver_policy,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            m = tokio::time::timeout(STALL_CHECK, messages.next()) => match m {
                Ok(Some(m)) => m?,
                Ok(None) => anyhow::bail!("the write log's consumer ended"),
                // Quiet: fine if there is nothing new. A consumer whose
                // NATS server died can stay quiet while the stream grows
                // (seen with nats-server 2.9): then it is made again.
                Err(_) => {
                    let last = log.last_position().await?;
                    anyhow::ensure!(
                        last <= position,
                        "the write log is at position {last} but its consumer stalled at {position}"
                    );
                    continue;
                }
            },
        };
        // Whatever else has arrived is applied with it: status writes in
        // one store write (group commit), in the same order and with the
        // same outcomes as one by one.
        let mut ready = vec![message];
        while ready.len() < MAX_BATCH {
            match messages.next().now_or_never() {
                Some(Some(m)) => ready.push(m?),
                _ => break,
            }
        }
        let mut batch = Vec::with_capacity(ready.len());
        for message in ready {
            let at = message.info().map_err(anyhow::Error::msg)?.stream_sequence;
            if at <= position {
                continue;
            }
            let expected = batch.last().map_or(position, |m: &Logged| m.at) + 1;
            anyhow::ensure!(
                at == expected,
                "the write log continues at position {at} but this replica has applied only up to {}: it fell behind the stream's retention, and catches up from another replica's snapshot",
                expected - 1
            );
            let id = message
                .headers
                .as_ref()
                .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
                .map(|v| v.as_str().to_owned());
            batch.push(Logged {
                at,
                id,
                write: Write::decode_from(&message.payload),
            });
        }
        // A snapshot is never taken halfway through a write.
        let _applying = log.applying.lock().await;
        let mut rest = batch.as_slice();
        while !rest.is_empty() {
            let run = rest
                .iter()
                .take_while(|m| m.is_own_statuses(replica.province()))
                .count();
            if run > 0 {
                let (statuses, after) = rest.split_at(run);
                apply_statuses(replica, log, statuses).await?;
                position = statuses[run - 1].at;
                rest = after;
                continue;
            }
            let logged = &rest[0];
            let outcome = match &logged.write {
                Ok(write) => apply(replica, log, write.clone()).await?,
                // Every replica skips it alike: nothing diverges.
                Err(err) => {
                    tracing::error!(position = logged.at, error = %err, "write log message skipped");
                    Applied::Key(Err(err.to_string()))
                }
            };
            set_applied_position(replica.store(), logged.at)?;
            position = logged.at;
            log.applied(logged.id.as_deref(), logged.at, outcome);
            rest = &rest[1..];
        }
    }
}

/// One message of the log, read.
struct Logged {
    at: u64,
    id: Option<String>,
    write: NodeResult<Write>,
}

impl Logged {
    /// Only status records, all of `own` province (no keyring change, no
    /// code binding).
    fn is_own_statuses(&self, own: Province) -> bool {
        let own = own.to_string();
        matches!(&self.write, Ok(w) if w.rotation.is_none()
            && w.revocation.is_none()
            && w.bindings.is_empty()
            && w.statuses.iter().all(|r| r.issuer == own))
    }
}

/// Applies consecutive status writes in one store write, then tells each
/// writer waiting here its records' outcomes.
async fn apply_statuses<R: Replica>(
    replica: &Arc<R>,
    log: &WriteLog,
    run: &[Logged],
) -> NodeResult<()> {
    let records: Vec<_> = run
        .iter()
        .filter_map(|m| m.write.as_ref().ok())
        .flat_map(|w| w.statuses.iter().cloned())
        .collect();
    let mut outcomes = replica.store().put_many(&records).await?.into_iter();
    let last = run.last().map_or(0, |m| m.at);
    set_applied_position(replica.store(), last)?;
    let mut all = Vec::with_capacity(records.len());
    for m in run {
        let count = m.write.as_ref().map_or(0, |w| w.statuses.len());
        let mine: Vec<PutOutcome> = outcomes.by_ref().take(count).collect();
        all.extend(mine.iter().cloned());
        log.applied(m.id.as_deref(), m.at, Applied::Statuses(mine));
    }
    replica.statuses_applied(&all);
    Ok(())
}

/// Applies one write other than own status records (see
/// [`apply_statuses`]). Errors are the disk's: the write is applied again
/// once it can be. A write the rules refuse (a record of another province,
/// an unknown kid) is an outcome.
async fn apply<R: Replica>(replica: &Arc<R>, log: &WriteLog, write: Write) -> NodeResult<Applied> {
    if let Some(rotation) = write.rotation {
        let outcome = match (
            rotation.algorithm.parse::<CodeAlg>(),
            log.seal.open(&rotation.sealed_key),
        ) {
            (Ok(alg), Ok(pkcs8)) => {
                let replica = replica.clone();
                blocking(move || replica.rotate_key_to(alg, &pkcs8, rotation.at)).await?
            }
            (Err(e), _) => Err(format!("unknown key algorithm: {e}")),
            (_, Err(e)) => Err(e.to_string()),
        };
        return Ok(Applied::Key(outcome));
    }
    if let Some(revocation) = write.revocation {
        let replica = replica.clone();
        let outcome = blocking(move || {
            replica
                .revoke_key_at(&revocation.kid, revocation.at)
                .map(|()| revocation.kid)
        })
        .await?;
        return Ok(Applied::Key(outcome));
    }
    if !write.bindings.is_empty() {
        let bindings: Result<Vec<Binding>, String> =
            write.bindings.iter().map(Binding::from_message).collect();
        return Ok(match bindings {
            Ok(bindings) => {
                let pending = replica.store().prepare_bindings(&bindings).await?;
                Applied::Statuses(pending.commit().await?)
            }
            // Every replica refuses it alike: nothing diverges.
            Err(why) => {
                tracing::error!(error = %why, "write log message with a bad code binding skipped");
                Applied::Key(Err(why))
            }
        });
    }
    // Status writes of this province are applied in runs; what is left is
    // a record of another province, which no replica stores.
    let own = replica.province().to_string();
    let foreign = write
        .statuses
        .iter()
        .find(|r| r.issuer != own)
        .map_or_else(String::new, |r| r.issuer.clone());
    tracing::error!(issuer = %foreign, "write log message with another province's record skipped");
    Ok(Applied::Key(Err(format!(
        "a record of {foreign} in the write log of {own}"
    ))))
}

/// Keyring changes write key files: on the blocking pool.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> NodeResult<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| NodeError::Internal(format!("keyring task: {e}")))
}
