//! This node's part in the federation: the trust list it holds and gossips,
//! the replicas it keeps of every other member's status feed, and direct
//! calls to other provinces when a replica is too old to answer alone.

pub mod holder_match;
pub mod ops;
pub mod peers;
pub mod replicator;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hufu_certs::{Identity, Province};
use hufu_federation::audit::{AnswerSource, EntryKind};
use hufu_federation::trust::{Member, SignedTrustList, TrustList, TrustStore};
use hufu_proto::v1::federation_service_client::FederationServiceClient;
use hufu_proto::v1::status_lookup_service_client::StatusLookupServiceClient;
use hufu_proto::v1::{GetTrustListRequest, LookupRequest, OfferTrustListRequest, StatusRecord};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio_util::sync::CancellationToken;

use crate::error::{NodeError, NodeResult};
use crate::state::NodeState;

/// The trust list in force, as a cheap snapshot for request handlers.
#[derive(Debug, Default)]
pub struct Membership {
    pub list: Option<TrustList>,
}

impl Membership {
    pub fn version(&self) -> u64 {
        self.list.as_ref().map(|l| l.version).unwrap_or(0)
    }

    pub fn member(&self, p: Province) -> Option<&Member> {
        self.list.as_ref().and_then(|l| l.member(p))
    }

    /// Other members, for replication and gossip.
    pub fn others(&self, own: Province) -> Vec<&Member> {
        self.list
            .as_ref()
            .map(|l| l.members.iter().filter(|m| m.province != own).collect())
            .unwrap_or_default()
    }
}

/// Replicator tasks by province, so trust list changes can start and stop them.
#[derive(Default)]
pub struct Replicators {
    running: Mutex<HashMap<Province, CancellationToken>>,
}

/// Loads the trust store if the node has one, checking that this province
/// is a member.
pub fn load_trust(dir: &std::path::Path, own: Province) -> anyhow::Result<Option<TrustStore>> {
    let has_notes = std::fs::read_dir(dir)
        .map(|mut d| d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".note"))))
        .unwrap_or(false);
    if !has_notes {
        return Ok(None);
    }
    let store = TrustStore::open(dir)?;
    let list = &store.current().list;
    anyhow::ensure!(
        list.member(own).is_some(),
        "province {own} is not a member of trust list v{} in {}",
        list.version,
        dir.display()
    );
    Ok(Some(store))
}

/// CA certificates of every member.
pub fn member_cas(list: &TrustList) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    list.members
        .iter()
        .map(|m| {
            CertificateDer::from_pem_slice(m.ca_cert_pem.as_bytes())
                .map_err(|e| anyhow::anyhow!("CA of {} in the trust list: {e}", m.province))
        })
        .collect()
}

impl NodeState {
    /// Puts a (new) trust list into force: CAs, code keys, peers, replicators.
    pub fn enforce(self: &Arc<Self>, list: &TrustList) -> anyhow::Result<()> {
        self.anchors.replace(member_cas(list)?)?;
        for m in &list.members {
            if m.province == self.province {
                continue;
            }
            if let Err(err) = self
                .verifier
                .set_issuer_keys(m.province, &m.jwks, &m.revoked_kids)
            {
                tracing::warn!(province = %m.province, error = %err, "code keys in the trust list refused");
            }
        }
        let gone: Vec<Province> = self
            .membership
            .load()
            .list
            .iter()
            .flat_map(|l| l.members.iter().map(|m| m.province))
            .filter(|p| list.member(*p).is_none())
            .collect();
        for p in &gone {
            self.verifier.remove_issuer(*p);
        }
        self.peers.retain(|p, e| {
            list.member(p)
                .is_some_and(|m| m.endpoints.iter().any(|x| x == e))
        });
        self.membership.store(Arc::new(Membership {
            list: Some(list.clone()),
        }));
        // Callers of provinces that left lose access now, open connections
        // and feed streams included.
        self.standing.set_members(Some((
            list.members.iter().map(|m| m.province).collect(),
            list.version,
        )));
        self.reconcile_replicators();
        Ok(())
    }

    /// Starts a replicator for every other member and stops those of
    /// provinces that left.
    pub fn reconcile_replicators(self: &Arc<Self>) {
        let membership = self.membership.load_full();
        let mut running = self.replicators.running.lock().expect("replicators lock");
        running.retain(|p, token| {
            let keep = membership.member(*p).is_some();
            if !keep {
                token.cancel();
            }
            keep
        });
        for m in membership.others(self.province) {
            running.entry(m.province).or_insert_with(|| {
                let token = self.stop.child_token();
                self.tasks
                    .spawn(replicator::run(self.clone(), m.province, token.clone()));
                token
            });
        }
    }

    /// Applies a signed trust list offered by `from`, a peer or an admin
    /// (this node itself when it fetched the list by gossip). Returns whether
    /// it was new; a new version is audited.
    pub async fn offer_trust_list(
        self: &Arc<Self>,
        note: &str,
        from: &Identity,
    ) -> NodeResult<bool> {
        let signed = SignedTrustList::parse(note)
            .map_err(|e| NodeError::invalid_field("note", e.to_string()))?;
        let mut trust = self.trust.lock().await;
        let Some(store) = trust.as_mut() else {
            return Err(NodeError::FailedPrecondition(
                "this node has no trust list yet: install a genesis with `hufu federation install`"
                    .into(),
            ));
        };
        if signed.list.member(self.province).is_none() && signed.list.version > store.version() {
            return Err(NodeError::FailedPrecondition(format!(
                "trust list v{} does not include this province ({}); refusing to leave the federation by gossip",
                signed.list.version, self.province
            )));
        }
        // Checking signatures and writing the list's file: on the blocking
        // pool, with the store lent to it while this task holds the lock.
        let mut lent = trust.take().expect("checked above");
        let offered = signed.clone();
        let (lent, applied) = tokio::task::spawn_blocking(move || {
            let applied = lent.apply(offered);
            (lent, applied)
        })
        .await
        .map_err(|e| NodeError::Internal(format!("trust list task: {e}")))?;
        *trust = Some(lent);
        let applied = applied.map_err(|e| {
            self.metrics.trust_refused.inc();
            NodeError::FailedPrecondition(e.to_string())
        })?;
        if applied {
            self.enforce(&signed.list)
                .map_err(|e| NodeError::Internal(e.to_string()))?;
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
            let state = self.clone();
            let note = note.to_owned();
            self.tasks.spawn(async move {
                let stop = state.stop.clone();
                stop.run_until_cancelled(state.push_trust_list(&note)).await
            });
        }
        Ok(applied)
    }

    /// Tells every other member about a trust list version (best effort).
    async fn push_trust_list(self: &Arc<Self>, note: &str) {
        let membership = self.membership.load_full();
        for m in membership.others(self.province) {
            for endpoint in &m.endpoints {
                let Ok(channel) = self.peers.channel(m.province, endpoint) else {
                    continue;
                };
                let mut client = FederationServiceClient::new(channel);
                let mut request = tonic::Request::new(OfferTrustListRequest {
                    note: note.to_owned(),
                });
                request.set_timeout(self.peers.deadline);
                if let Err(status) = client.offer_trust_list(request).await {
                    tracing::debug!(province = %m.province, %endpoint, error = %status.message(), "trust list push failed");
                }
            }
        }
    }

    /// Asks peers for newer trust lists, now and then, forever.
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
        let membership = self.membership.load_full();
        for m in membership.others(self.province) {
            if !self.peers.allows(m.province) {
                continue;
            }
            let Some(endpoint) = m.endpoints.first() else {
                continue;
            };
            let Ok(channel) = self.peers.channel(m.province, endpoint) else {
                continue;
            };
            let mut request = tonic::Request::new(GetTrustListRequest {
                after_version: membership.version(),
            });
            request.set_timeout(self.peers.deadline);
            let Ok(reply) = FederationServiceClient::new(channel)
                .get_trust_list(request)
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

    /// Asks province `p` itself for a holder's status, within the peer
    /// deadline, trying its endpoints in turn while the retry budget allows.
    /// The call is audited as made on behalf of `caller`.
    pub async fn lookup_authoritative(
        &self,
        p: Province,
        holder: &str,
        caller: &Identity,
    ) -> Result<Option<StatusRecord>, String> {
        let membership = self.membership.load_full();
        let member = membership
            .member(p)
            .ok_or_else(|| format!("province {p} is not a member"))?;
        if !self.peers.allows(p) {
            return Err(format!("province {p} is failing: circuit open"));
        }
        let result = self.ask_endpoints(p, &member.endpoints, holder).await;
        self.audit
            .record(|| {
                let made = crate::audit::about(
                    crate::audit::entry(EntryKind::LookupMade, caller, p),
                    holder,
                );
                match &result {
                    Ok(record) => made
                        .with_answer(crate::audit::answer(record.as_ref()))
                        .with_source(AnswerSource::Authoritative),
                    Err(_) => made.with_answer(crate::audit::UNREACHABLE),
                }
            })
            .await;
        result
    }

    async fn ask_endpoints(
        &self,
        p: Province,
        endpoints: &[String],
        holder: &str,
    ) -> Result<Option<StatusRecord>, String> {
        let mut last_error = format!("province {p} lists no endpoints");
        for (attempt, endpoint) in endpoints.iter().enumerate() {
            if attempt > 0 && !self.peers.may_retry(p) {
                break;
            }
            let channel = self.peers.channel(p, endpoint).map_err(|e| e.to_string())?;
            let mut request = tonic::Request::new(LookupRequest {
                issuer: p.to_string(),
                holder: holder.to_owned(),
            });
            request.set_timeout(self.peers.deadline);
            let mut client = StatusLookupServiceClient::new(channel);
            match tokio::time::timeout(self.peers.deadline, client.lookup(request)).await {
                Ok(Ok(reply)) => {
                    self.peers.success(p);
                    return Ok(reply.into_inner().record);
                }
                Ok(Err(status)) if status.code() == tonic::Code::NotFound => {
                    self.peers.success(p);
                    return Ok(None);
                }
                Ok(Err(status)) => last_error = format!("{endpoint}: {}", status.message()),
                Err(_) => {
                    last_error = format!("{endpoint}: no answer within {:?}", self.peers.deadline)
                }
            }
            self.peers.failure(p);
            self.peers.note_error(p, &format!("lookup at {last_error}"));
        }
        Err(last_error)
    }
}
