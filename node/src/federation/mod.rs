//! This node's part in the federation (DESIGN.md, "Federation"): the trust
//! list it holds, puts in force and gossips ([`gossip`]), the replicas it
//! keeps of every other member's status feed ([`replicator`]), and the
//! questions only an issuer can answer when a replica cannot
//! ([`holder_match`], [`Federation::lookup_authoritative`]). Every call to
//! another province goes through the node's [`PeerClient`].
//!
//! [`ops`] is the operator's side: member files, genesis, signatures,
//! proposals and installing, for the `hufu federation` commands.

mod gossip;

pub use gossip::TrustOfferError;
pub mod holder_match;
pub mod ops;
pub mod replicator;
pub mod snapshot;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hufu_certs::{Identity, Province, TrustAnchors};
use hufu_federation::audit::{AnswerSource, EntryKind};
use hufu_federation::trust::{TrustList, TrustStore};
use hufu_proto::v1::status_lookup_service_client::StatusLookupServiceClient;
use hufu_proto::v1::{LookupRequest, StatusRecord};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::NodeAudit;
use crate::codes::Codes;
use crate::metrics::Metrics;
use crate::peers::{PeerClient, PeerError};
use crate::standing::Standing;
use crate::store::Store;

/// Membership and peers: the trust store, the CAs and code keys it puts in
/// force, the replicator task of every other member and the key digests
/// their feeds announced. Holds the parts of the node it acts on.
pub struct Federation {
    pub province: Province,
    /// This node, as the author of what it fetched by gossip.
    identity: Identity,
    /// The accepted trust lists (None: this node runs alone).
    pub trust: tokio::sync::Mutex<Option<TrustStore>>,
    /// CAs whose certificates are accepted (all members').
    anchors: Arc<TrustAnchors>,
    pub peers: Arc<PeerClient>,
    codes: Arc<Codes>,
    standing: Arc<Standing>,
    store: Arc<Store>,
    audit: Arc<NodeAudit>,
    metrics: Arc<Metrics>,
    /// Replicator tasks by province, so trust list changes can start and
    /// stop them.
    replicators: Mutex<HashMap<Province, CancellationToken>>,
    /// Last keys digest seen per province, to know when to fetch keys.
    pub key_digests: Mutex<HashMap<Province, Vec<u8>>>,
    /// How often feeds send a head when nothing changes.
    pub heartbeat: Duration,
    stop: CancellationToken,
    tasks: TaskTracker,
}

/// What [`Federation::new`] is made of.
pub struct Parts {
    pub identity: Identity,
    pub trust: Option<TrustStore>,
    pub anchors: Arc<TrustAnchors>,
    pub peers: Arc<PeerClient>,
    pub codes: Arc<Codes>,
    pub standing: Arc<Standing>,
    pub store: Arc<Store>,
    pub audit: Arc<NodeAudit>,
    pub metrics: Arc<Metrics>,
    pub heartbeat: Duration,
    pub stop: CancellationToken,
    pub tasks: TaskTracker,
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

impl Federation {
    pub fn new(parts: Parts) -> Arc<Federation> {
        Arc::new(Federation {
            province: parts.identity.province,
            identity: parts.identity,
            trust: tokio::sync::Mutex::new(parts.trust),
            anchors: parts.anchors,
            peers: parts.peers,
            codes: parts.codes,
            standing: parts.standing,
            store: parts.store,
            audit: parts.audit,
            metrics: parts.metrics,
            replicators: Mutex::new(HashMap::new()),
            key_digests: Mutex::new(HashMap::new()),
            heartbeat: parts.heartbeat,
            stop: parts.stop,
            tasks: parts.tasks,
        })
    }

    /// Puts a (new) trust list into force: CAs, code keys, peers, replicators.
    pub fn enforce(self: &Arc<Self>, list: &TrustList) -> anyhow::Result<()> {
        self.anchors.replace(member_cas(list)?)?;
        let verifier = &self.codes.verifier;
        for m in &list.members {
            if m.province == self.province {
                continue;
            }
            if let Err(err) = verifier.set_issuer_keys(m.province, &m.jwks, &m.revoked_kids) {
                tracing::warn!(province = %m.province, error = %err, "code keys in the trust list refused");
            }
        }
        let gone: Vec<Province> = self
            .peers
            .members()
            .list
            .iter()
            .flat_map(|l| l.members.iter().map(|m| m.province))
            .filter(|p| list.member(*p).is_none())
            .collect();
        for p in &gone {
            verifier.remove_issuer(*p);
        }
        self.peers.set_members(list);
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
        let membership = self.peers.members();
        let mut running = self.replicators.lock().expect("replicators lock");
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

    /// Asks province `p` itself for a holder's status, through the peer
    /// client. The call is audited as made on behalf of `caller`.
    pub async fn lookup_authoritative(
        &self,
        p: Province,
        holder: &str,
        caller: &Identity,
    ) -> Result<Option<StatusRecord>, PeerError> {
        let request = LookupRequest {
            issuer: p.to_string(),
            holder: holder.to_owned(),
        };
        let result = self
            .peers
            .call(p, "lookup at", |call| {
                let request = call.request(request.clone());
                async move {
                    match StatusLookupServiceClient::new(call.channel)
                        .lookup(request)
                        .await
                    {
                        Ok(reply) => Ok(reply.into_inner().record),
                        Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
                        Err(status) => Err(status),
                    }
                }
            })
            .await;
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
}
