//! The checkpoint task: while the log grows, a checkpoint every
//! `[audit] checkpoint_secs`, sent with a consistency proof to every other
//! member's witness (through the peer client), published once the trust
//! list's witness quorum has cosigned it.

use std::sync::Arc;

use hufu_federation::audit::{
    AuditError, Cosignature, SignedCheckpoint, verify_cosignature, witness_verifier_key,
};
use hufu_federation::trust::{Member, TrustList};
use hufu_proto::v1::witness_service_client::WitnessServiceClient;
use hufu_proto::v1::{AddCheckpointRequest, add_checkpoint_response};
use tokio_util::sync::CancellationToken;

use super::NodeAudit;
use crate::peers::PeerError;

/// Times a witness is asked again, after telling which size to prove from.
const WITNESS_ATTEMPTS: usize = 3;
/// Checkpoint rounds without quorum in a row before it is logged as a warning.
const UNPUBLISHED_WARN_AFTER: u32 = 3;

impl NodeAudit {
    /// Checkpoints the log every `[audit] checkpoint_secs` while it grows,
    /// until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.every);
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
            let Some(list) = self.peers.members().list.clone() else {
                if !alone_noted {
                    tracing::info!(
                        "no trust list: audit entries are recorded, but no checkpoint is published until this node joins a federation (publishing needs the witness quorum of a trust list)"
                    );
                    alone_noted = true;
                }
                continue;
            };
            // Witnesses are other provinces: shutdown must not wait for them.
            let Some(round) = stop.run_until_cancelled(self.checkpoint(&list)).await else {
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
    pub async fn checkpoint(&self, list: &TrustList) -> anyhow::Result<()> {
        let log = self.log()?;
        let size = log.size()?;
        self.metrics.audit_log_size.set(size as i64);
        let published = log.latest_published()?.map_or(0, |cp| cp.checkpoint().size);
        if size == 0 || size <= published {
            return Ok(());
        }
        let mut cp = log.checkpoint(&self.signer)?;
        let size = cp.checkpoint().size;
        // The witnesses remember what they cosign durably: so must the log,
        // or after a crash it could sign another tree at a size they cosigned.
        // The checkpoint's entries are written; this syncs them.
        let flushed = log.clone();
        tokio::task::spawn_blocking(move || flushed.flush()).await??;

        let witnesses: Vec<&Member> = list
            .members
            .iter()
            .filter(|m| m.province != self.province)
            .collect();
        let cosignatures =
            futures::future::join_all(witnesses.iter().map(|m| self.ask_witness(m, &cp))).await;
        let mut cosigned = 0;
        for (m, c) in witnesses.iter().zip(cosignatures) {
            match c {
                Some(c) => {
                    cp.add_cosignature(&c)?;
                    cosigned += 1;
                }
                None => {
                    self.witness_failed(m.province, size);
                    self.metrics
                        .witness_failures
                        .get_or_create(&vec![("province", m.province.to_string())])
                        .inc();
                }
            }
        }
        match log.publish(&cp, list) {
            Ok(()) => {
                self.metrics.audit_published_size.set(size as i64);
                tracing::debug!(size, cosigned, "audit checkpoint published");
                Ok(())
            }
            Err(AuditError::Quorum { valid, quorum, .. }) => anyhow::bail!(
                "checkpoint at size {size} has {valid} valid cosignatures, the trust list's witness quorum is {quorum}: the other members' nodes must be reachable"
            ),
            Err(e) => Err(e.into()),
        }
    }

    /// Asks `member`'s nodes to cosign `cp`, proving consistency from the
    /// size its witness last cosigned. None (logged) when it does not.
    async fn ask_witness(&self, member: &Member, cp: &SignedCheckpoint) -> Option<Cosignature> {
        let p = member.province;
        let size = cp.checkpoint().size;
        let Ok(witness_key) = witness_verifier_key(&member.log_key) else {
            tracing::debug!(province = %p, "member has no usable log key: it runs no witness");
            return None;
        };
        let known = self
            .witnessed
            .lock()
            .expect("witnessed lock")
            .get(&p)
            .copied();
        let mut old = match known {
            Some(old) => old,
            None => self
                .log()
                .and_then(|log| log.latest_published())
                .ok()
                .flatten()
                .map_or(0, |cp| cp.checkpoint().size),
        };
        for _ in 0..WITNESS_ATTEMPTS {
            if old > size {
                tracing::error!(
                    province = %p, witnessed = old, size,
                    "the witness cosigned a larger tree than this audit log holds: the log lost entries; investigate before it is taken for a fork"
                );
                return None;
            }
            let proof = match self.log().and_then(|log| log.consistency_proof(old, size)) {
                Ok(proof) => proof,
                Err(err) => {
                    tracing::warn!(province = %p, error = %err, "no consistency proof for the witness");
                    return None;
                }
            };
            let request = AddCheckpointRequest {
                checkpoint: cp.note(),
                old_size: old,
                proof: proof.iter().map(|h| h.as_bytes().to_vec()).collect(),
            };
            let reply = self
                .peers
                .call(p, "witness at", |call| {
                    let request = call.request(request.clone());
                    async move {
                        WitnessServiceClient::new(call.channel)
                            .add_checkpoint(request)
                            .await
                    }
                })
                .await;
            let outcome = match reply {
                Ok(reply) => reply.into_inner().outcome,
                Err(PeerError::Refused { endpoint, status }) => {
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
                Err(err) => {
                    tracing::info!(province = %p, error = %err, "witness not reached; it is asked again at the next checkpoint");
                    return None;
                }
            };
            match outcome {
                Some(add_checkpoint_response::Outcome::Cosignature(line)) => {
                    return match verify_cosignature(cp, &line, &witness_key) {
                        Ok(c) => {
                            self.witnessed
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
                    self.witnessed
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
        None
    }
}
