//! Replica snapshots: how a replica that is behind what the province's
//! write log still keeps catches up from another replica, then the log.
//!
//! A stream with a limit (`replication.max_messages`) drops its oldest
//! writes. A replica whose next position is gone (it starts empty after
//! the first writes were dropped, or was stopped for longer than the
//! stream keeps writes) asks another replica of its province,
//! `GetReplicaSnapshot` over the nodes' mutual TLS, for a snapshot of one
//! moment between two writes ([`WriteLog::capture`]): the feed's changes
//! after those it holds, up to a head signed with the province's log key;
//! the stream position that state is at; and the code-signing keyring,
//! each private key sealed with the province's key seal. Only nodes of the
//! same province may ask (`Access::Replica`).
//!
//! The snapshot's feed part has the format of a feed snapshot for other
//! provinces ([`crate::federation::snapshot`]): when the replica asked is
//! compacted past the caller, it begins with the compacted part, which
//! replaces the caller's state. The changes are applied as they arrive, a
//! bounded message at a time, with the numbers the feed gave them: the
//! replica's feed then numbers and chains exactly as the others'. A change that differs from one held
//! is a fork and stops the install. Only when the changes end at the
//! signed head, chain hash included, are the keyring and the stream
//! position taken: a replica interrupted before then has the same
//! position as before, finds the stream still ahead of it, and asks again
//! (the changes it already holds are accepted as identical).

use anyhow::Context;
use hufu_federation::codes::{CodeAlg, Keyring};
use hufu_proto::v1::federation_service_client::FederationServiceClient;
use hufu_proto::v1::{GetReplicaSnapshotRequest, ReplicaKey};

use super::WriteLog;
use super::consumer::{applied_position, set_applied_position};
use crate::codes::Codes;
use crate::error::{NodeError, NodeResult};
use crate::federation::snapshot::{self, next_message};
use crate::peers::PeerClient;
use crate::store::{Store, Tail};

/// What catching up uses of the node.
pub struct Parts<'a> {
    pub province: hufu_certs::Province,
    pub store: &'a Store,
    pub codes: &'a Codes,
    pub peers: &'a PeerClient,
    /// The province's log key, which signs its feed heads.
    pub log_key: String,
}

/// What a snapshot holds besides the changes: taken in one moment.
#[derive(Debug)]
pub struct Capture {
    /// The stream position applied.
    pub position: u64,
    /// The end of the province's change log.
    pub tail: Tail,
    /// The keyring, private keys sealed.
    pub keys: Vec<ReplicaKey>,
}

impl WriteLog {
    /// The store's change-log end, stream position and keyring of one
    /// moment: between two writes applied from the log.
    pub async fn capture(
        &self,
        store: &Store,
        keyring: &std::sync::RwLock<Keyring>,
    ) -> NodeResult<Capture> {
        let _applying = self.applying.lock().await;
        let position = applied_position(store)?;
        let tail = store.tail(store.own_province()).await?;
        let keyring = keyring.read().expect("keyring lock");
        let mut keys = Vec::with_capacity(keyring.keys().len());
        for record in keyring.keys() {
            let pkcs8 = keyring
                .private_key(&record.kid)
                .map_err(|e| NodeError::Internal(format!("keyring: {e}")))?;
            keys.push(ReplicaKey {
                kid: record.kid.clone(),
                algorithm: record.alg.to_string(),
                created_at: record.created_at,
                retired_at: record.retired_at.unwrap_or(0),
                revoked_at: record.revoked_at.unwrap_or(0),
                sealed_key: self.seal.seal(&pkcs8)?,
            });
        }
        Ok(Capture {
            position,
            tail,
            keys,
        })
    }

    /// Endpoints to ask for a snapshot, in order: those configured, then
    /// the province's in the trust list.
    fn snapshot_sources(&self, state: &Parts<'_>) -> Vec<String> {
        let mut sources = self.snapshot_from.clone();
        if let Some(member) = state.peers.members().member(state.province) {
            for endpoint in &member.endpoints {
                if !sources.contains(endpoint) {
                    sources.push(endpoint.clone());
                }
            }
        }
        sources
    }
}

/// Installs a snapshot of another replica of `state`'s province, taken at
/// a stream position of at least `first_kept - 1` (this replica is at
/// `position`), and returns that position. Replicas are asked in turn.
pub async fn catch_up(
    state: &Parts<'_>,
    log: &WriteLog,
    position: u64,
    first_kept: u64,
) -> anyhow::Result<u64> {
    let sources = log.snapshot_sources(state);
    anyhow::ensure!(
        !sources.is_empty(),
        "this replica is at write log position {position}, but the log keeps only positions from {first_kept} on, and no other replica is known to take a snapshot from: list them in replication.snapshot_from or in the trust list's endpoints of {}",
        state.province
    );
    let mut failures = Vec::new();
    for endpoint in &sources {
        match install_from(state, log, endpoint, first_kept).await {
            Ok(at) => return Ok(at),
            Err(err) => {
                tracing::warn!(%endpoint, error = %format!("{err:#}"), "no replica snapshot from this endpoint");
                failures.push(format!("{endpoint}: {err:#}"));
            }
        }
    }
    anyhow::bail!(
        "this replica is at write log position {position}, but the log keeps only positions from {first_kept} on, and no other replica gave a snapshot to continue from ({}): start a replica that is up to date, or raise the stream's limit",
        failures.join("; ")
    )
}

/// Asks the replica at `endpoint` for a snapshot and installs it.
async fn install_from(
    state: &Parts<'_>,
    log: &WriteLog,
    endpoint: &str,
    first_kept: u64,
) -> anyhow::Result<u64> {
    let own = state.province;
    let tail = state.store.tail(own).await?;
    let mut messages = state
        .peers
        .call_at(
            own,
            endpoint,
            state.peers.deadline(),
            "replica snapshot from",
            |call| async move {
                // No deadline on the stream itself: it lasts as long as the
                // snapshot is large, each message within MESSAGE_WITHIN.
                FederationServiceClient::new(call.channel)
                    .get_replica_snapshot(GetReplicaSnapshotRequest {
                        issuer: own.to_string(),
                        after_sequence: tail.sequence,
                    })
                    .await
                    .map(|r| r.into_inner())
            },
        )
        .await?;
    let first = next_message(&mut messages)
        .await?
        .context("the snapshot stream ended before it began")?;
    let replica = first.replica.context("the snapshot has no replica state")?;
    anyhow::ensure!(
        replica.stream_position + 1 >= first_kept,
        "that replica is at write log position {}, behind the log too",
        replica.stream_position
    );
    let part = first.part.unwrap_or_default();
    if part.base.is_some() {
        // This replica's state of the province is replaced: until the
        // install ends, it holds no position in the log.
        set_applied_position(state.store, 0)?;
    }
    snapshot::install(state.store, own, &state.log_key, part, &mut messages, |m| {
        m.part.unwrap_or_default()
    })
    .await?;
    install_keys(state, log, &replica.keys)?;
    Ok(replica.stream_position)
}

/// Makes this replica's keyring the one of the snapshot: its keys are
/// rotated to and revoked in the snapshot's order, with its times, so that
/// both keyrings hold the same records (this one's are a prefix of them).
fn install_keys(state: &Parts<'_>, log: &WriteLog, keys: &[ReplicaKey]) -> anyhow::Result<()> {
    let held: Vec<String> = {
        let keyring = state.codes.keyring.read().expect("keyring lock");
        keyring.keys().iter().map(|r| r.kid.clone()).collect()
    };
    let mut missing = Vec::new();
    for key in keys.iter().filter(|k| !held.contains(&k.kid)) {
        let alg: CodeAlg = key
            .algorithm
            .parse()
            .map_err(|e| anyhow::anyhow!("snapshot key {}: {e}", key.kid))?;
        missing.push((alg, log.seal.open(&key.sealed_key)?, key.created_at));
    }
    let keyring = state.codes.change_keyring(|keyring| {
        for (alg, pkcs8, at) in &missing {
            keyring.rotate_to(*alg, pkcs8, *at)?;
        }
        for key in keys.iter().filter(|k| k.revoked_at != 0) {
            keyring.revoke_at(&key.kid, key.revoked_at)?;
        }
        Ok(keyring.keys().to_vec())
    })?;
    let held: Vec<_> = keyring
        .iter()
        .map(|r| {
            (
                r.kid.as_str(),
                r.created_at,
                r.retired_at.unwrap_or(0),
                r.revoked_at.unwrap_or(0),
            )
        })
        .collect();
    let given: Vec<_> = keys
        .iter()
        .map(|k| (k.kid.as_str(), k.created_at, k.retired_at, k.revoked_at))
        .collect();
    anyhow::ensure!(
        held == given,
        "this replica's code-signing keyring is not a part of the snapshot's: it holds {held:?}, the snapshot {given:?}; make the replica again with `hufu init --replica-of`"
    );
    Ok(())
}
