//! The trust list between members: a version offered by a peer or an
//! admin is checked and put in force, pushed to every other member, and
//! fetched from them now and then in case a push was missed.

use std::sync::Arc;
use std::time::Duration;

use hufu_certs::{Identity, Province};
use hufu_federation::audit::EntryKind;
use hufu_federation::trust::{SignedTrustList, TrustError};
use hufu_proto::v1::federation_service_client::FederationServiceClient;
use hufu_proto::v1::{GetTrustListRequest, OfferTrustListRequest};
use tokio_util::sync::CancellationToken;

use super::Federation;

/// Why an offered trust list was not put in force.
#[derive(Debug, thiserror::Error)]
pub enum TrustOfferError {
    /// The offered note is not a signed trust list.
    #[error("{0}")]
    Note(#[source] TrustError),
    #[error("this node has no trust list yet: install a genesis with `hufu federation install`")]
    NoTrustList,
    /// A newer version without this province: leaving the federation is
    /// an admin's decision, not gossip's.
    #[error(
        "trust list v{version} does not include this province ({own}); refusing to leave the federation by gossip"
    )]
    LeavesFederation { version: u64, own: Province },
    /// The list does not follow from the one in force (signatures,
    /// threshold, version).
    #[error("{0}")]
    Refused(#[source] TrustError),
    #[error("trust list task: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The list is in force but this node could not apply it everywhere.
    #[error("{0:#}")]
    Enforce(anyhow::Error),
}

impl Federation {
    /// Applies a signed trust list offered by `from`, a peer or an admin
    /// (this node itself when it fetched the list by gossip). Returns whether
    /// it was new; a new version is audited.
    pub async fn offer_trust_list(
        self: &Arc<Self>,
        note: &str,
        from: &Identity,
    ) -> Result<bool, TrustOfferError> {
        let signed = SignedTrustList::parse(note).map_err(TrustOfferError::Note)?;
        let mut trust = self.trust.lock().await;
        let Some(store) = trust.as_mut() else {
            return Err(TrustOfferError::NoTrustList);
        };
        if signed.list.member(self.province).is_none() && signed.list.version > store.version() {
            return Err(TrustOfferError::LeavesFederation {
                version: signed.list.version,
                own: self.province,
            });
        }
        // Checking signatures and writing the list's file: on the blocking
        // pool, with the store lent to it while this task holds the lock.
        let mut lent = trust.take().expect("checked above");
        let offered = signed.clone();
        let (lent, applied) = tokio::task::spawn_blocking(move || {
            let applied = lent.apply(offered);
            (lent, applied)
        })
        .await?;
        *trust = Some(lent);
        let applied = applied.map_err(|e| {
            self.metrics.trust_refused.inc();
            TrustOfferError::Refused(e)
        })?;
        if applied {
            self.enforce(&signed.list)
                .map_err(TrustOfferError::Enforce)?;
            self.metrics.trust_version.set(signed.list.version as i64);
            tracing::info!(version = signed.list.version, "trust list applied");
            let list = &signed.list;
            self.audit
                .record(|| {
                    crate::audit::entry(EntryKind::TrustListChanged, from, self.province)
                        .with_detail(format!(
                            "trust list v{} applied: {} members, threshold {}, witness quorum {}",
                            list.version,
                            list.members.len(),
                            list.threshold,
                            list.witness_quorum
                        ))
                })
                .await;
            let federation = self.clone();
            let note = note.to_owned();
            self.tasks.spawn(async move {
                let stop = federation.stop.clone();
                stop.run_until_cancelled(federation.push_trust_list(&note))
                    .await
            });
        }
        Ok(applied)
    }

    /// Tells every other member about a trust list version (best effort).
    async fn push_trust_list(self: &Arc<Self>, note: &str) {
        let membership = self.peers.members();
        for m in membership.others(self.province) {
            let request = OfferTrustListRequest {
                note: note.to_owned(),
            };
            let pushed = self
                .peers
                .call(m.province, "trust list push to", |call| {
                    let request = call.request(request.clone());
                    async move {
                        FederationServiceClient::new(call.channel)
                            .offer_trust_list(request)
                            .await
                    }
                })
                .await;
            if let Err(err) = pushed {
                tracing::debug!(province = %m.province, error = %err, "trust list push failed");
            }
        }
    }

    /// Asks peers for newer trust lists, now and then, until `stop`.
    pub async fn gossip(self: Arc<Self>, every: Duration, stop: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            // A round waits on peers: shutdown must not wait for it.
            if stop
                .run_until_cancelled(self.gossip_round())
                .await
                .is_none()
            {
                return;
            }
        }
    }

    /// Asks every reachable member for trust lists newer than ours.
    async fn gossip_round(self: &Arc<Self>) {
        let membership = self.peers.members();
        for m in membership.others(self.province) {
            let request = GetTrustListRequest {
                after_version: membership.version(),
            };
            let Ok(reply) = self
                .peers
                .call(m.province, "trust list gossip with", |call| {
                    let request = call.request(request);
                    async move {
                        FederationServiceClient::new(call.channel)
                            .get_trust_list(request)
                            .await
                    }
                })
                .await
            else {
                continue;
            };
            for note in reply.into_inner().notes {
                if let Err(err) = self.offer_trust_list(&note, &self.identity).await {
                    tracing::warn!(from = %m.province, error = %err, "gossiped trust list refused");
                    break;
                }
            }
        }
    }
}
