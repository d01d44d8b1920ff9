//! A replica's consumer of the province's write log: reads the stream in
//! order from the position after the last one applied, applies each write
//! to the local store and keyring, and tells a waiting writer what it did.
//!
//! The position applied is kept in the store's database, written after the
//! write itself: after a crash between the two, the last write is applied
//! again, which changes nothing (a record identical to the stored one is
//! unchanged, a key already in the keyring is not added twice).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use futures::StreamExt;
use hufu_certs::Province;
use hufu_federation::codes::CodeAlg;
use tokio_util::sync::CancellationToken;

use super::{Applied, WriteLog};
use crate::error::{NodeError, NodeResult};
use crate::replication::Write;
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
}

const POSITION_TREE: &str = "replication";
const POSITION_KEY: &[u8] = b"applied";

/// How long the consumer waits before following the log again after it
/// lost it (NATS down, stream missing).
const RETRY_EVERY: Duration = Duration::from_millis(500);

/// How long the consumer may be quiet before the stream is asked whether it
/// has grown meanwhile.
const STALL_CHECK: Duration = Duration::from_secs(1);

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

fn set_applied_position(store: &Store, position: u64) -> NodeResult<()> {
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
        let at = message.info().map_err(anyhow::Error::msg)?.stream_sequence;
        if at <= position {
            continue;
        }
        anyhow::ensure!(
            at == position + 1,
            "the write log starts at position {at} but this replica has applied only up to {position}: it fell behind the stream's retention; restore its data directory from a copy of another replica's"
        );
        let id = message
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
            .map(|v| v.as_str().to_owned());
        let outcome = match Write::decode_from(&message.payload) {
            Ok(write) => apply(replica, log, write).await?,
            // Every replica skips it alike: nothing diverges.
            Err(err) => {
                tracing::error!(position = at, error = %err, "write log message skipped");
                Applied::Key(Err(err.to_string()))
            }
        };
        set_applied_position(replica.store(), at)?;
        position = at;
        log.applied(id.as_deref(), at, outcome);
    }
}

/// Applies one write. Errors are the store's (a disk that cannot be
/// written): the write is applied again once it can. A write the rules
/// refuse (a record of another province, an unknown kid) is an outcome.
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
    let own = replica.province().to_string();
    if let Some(foreign) = write.statuses.iter().find(|r| r.issuer != own) {
        tracing::error!(issuer = %foreign.issuer, "write log message with another province's record skipped");
        return Ok(Applied::Key(Err(format!(
            "a record of {} in the write log of {own}",
            foreign.issuer
        ))));
    }
    let outcomes = replica.store().put_many(&write.statuses).await?;
    replica.statuses_applied(&outcomes);
    Ok(Applied::Statuses(outcomes))
}

/// Keyring changes write key files: on the blocking pool.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> NodeResult<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| NodeError::Internal(format!("keyring task: {e}")))
}
