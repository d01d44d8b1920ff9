//! The node assembled from its components, each owning its part of the
//! node and the tasks that keep it:
//!
//! - [`Store`]: statuses, replicas and feeds on disk;
//! - [`Codes`]: holder secret, code-signing keys, the code verifier;
//! - [`NodeAudit`]: the audit log, the witness, checkpoints and witness calls;
//! - [`PeerClient`]: the trust list in force and every call to another
//!   province;
//! - [`Federation`]: membership and replication: trust store, key digests,
//!   gossip, replicators;
//! - [`Standing`]: who may still be served.
//!
//! [`NodeState::open`] builds them in order (each from those below it);
//! services and tasks are handed the components they use.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hufu_certs::{Identity, Province, Role, TrustAnchors};
use hufu_federation::audit::LogSigner;
use hufu_federation::codes::CodeAlg;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::NodeAudit;
use crate::client::ClientCert;
use crate::codes::Codes;
use crate::config::NodeConfig;
use crate::federation::Federation;
use crate::metrics::Metrics;
use crate::peers::PeerClient;
use crate::replication::{Replica, WriteLog};
use crate::standing::Standing;
use crate::store::{PutOutcome, Store};

pub struct NodeState {
    pub province: Province,
    pub identity: Identity,
    pub store: Arc<Store>,
    pub codes: Arc<Codes>,
    pub metrics: Arc<Metrics>,
    /// Signs this province's feed heads and audit checkpoints.
    pub log_signer: Arc<LogSigner>,
    /// This node's audit log, and its witness for the other members' logs.
    pub audit: Arc<NodeAudit>,
    /// CAs whose certificates are accepted (all members').
    pub anchors: Arc<TrustAnchors>,
    pub peers: Arc<PeerClient>,
    pub federation: Arc<Federation>,
    /// Who may still be served: members of the trust list, certificates
    /// not revoked; checked on every call and enforced on open connections.
    pub standing: Arc<Standing>,
    /// The province's write log shared with its other replicas (None: this
    /// node writes its own store, the embedded default).
    pub write_log: Option<Arc<WriteLog>>,
    pub max_replica_age: Duration,
    pub batch_changes: usize,
    /// Added to the time in this province's signed feed heads (testing only).
    pub clock_offset_ms: i64,
    /// Cancelled when the node shuts down; background tasks watch it.
    pub stop: CancellationToken,
    /// Every task the node starts, so that shutdown can wait for all of
    /// them (and for the state and storage locks they hold) to end.
    pub tasks: TaskTracker,
}

impl NodeState {
    pub fn open(
        config: &NodeConfig,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
        tasks: TaskTracker,
        write_log: Option<Arc<WriteLog>>,
    ) -> anyhow::Result<Arc<NodeState>> {
        let identity = Identity::new(config.province, Role::Node, &config.node_name)?;
        let store = Arc::new(
            Store::open_with(
                &config.path(&config.data_dir),
                config.province,
                config.storage.cache_bytes(),
                config.storage.unmerged_statuses,
            )
            .with_context(|| format!("cannot open storage {}", config.data_dir.display()))
            .map_err(|e| crate::store::full_disk(e, &config.path(&config.data_dir)))?,
        );
        let standing = Standing::new(config.province);
        let codes = Arc::new(Codes::open(config, standing.clone())?);
        let mut log_signer = LogSigner::load(&config.path(&config.log_key))?;
        // Replicas share the province's log key; each signs its own audit
        // log under an origin naming itself, so that witnesses and auditors
        // hold one log per replica, not two histories of one log.
        if config.replication.is_some() {
            log_signer = log_signer.for_node(&config.node_name)?;
        }
        let log_signer = Arc::new(log_signer);

        // Trust: the trust list's member CAs, or (alone) the province's own
        // CA plus any configured member CAs.
        let trust =
            crate::federation::load_trust(&config.path(&config.trust_dir), config.province)?;
        let cas = match &trust {
            Some(store) => crate::federation::member_cas(&store.current().list)?,
            None => {
                let mut cas = vec![pem_cert(&config.read(&config.ca_cert)?, "province CA")?];
                for path in &config.member_cas {
                    cas.push(pem_cert(
                        &config.read(path)?,
                        &format!("member CA {}", path.display()),
                    )?);
                }
                cas
            }
        };
        let anchors = TrustAnchors::new(cas)?;
        let node_cert = ClientCert::load(
            &config.path(&config.node_cert),
            &config.path(&config.node_key),
        )?;
        let fed = &config.federation;
        let peers = Arc::new(PeerClient::new(
            node_cert,
            anchors.clone(),
            Duration::from_millis(fed.peer_deadline_ms),
            stop.clone(),
        ));

        // The audit log has its own database: its batched writes then never
        // contend with status reads and writes on the hot path.
        let audit = Arc::new(
            NodeAudit::open(
                &config.audit_dir(),
                log_signer.clone(),
                &config.audit,
                config.province,
                peers.clone(),
                metrics.clone(),
            )
            .context("cannot open the audit log")?,
        );
        metrics
            .audit_conflicts
            .set(audit.witness()?.conflicts().unwrap_or_default() as i64);
        metrics.audit_log_size.set(audit.log()?.size()? as i64);
        // Gauges say what is on disk from the start, not 0 until the next write.
        metrics
            .last_sequence
            .set(*store.watch(config.province).borrow() as i64);
        if let Some(cp) = audit.log()?.latest_published()? {
            metrics
                .audit_published_size
                .set(cp.checkpoint().size as i64);
        }

        let list = trust.as_ref().map(|t| t.current().list.clone());
        let federation = Federation::new(crate::federation::Parts {
            identity: identity.clone(),
            trust,
            anchors: anchors.clone(),
            peers: peers.clone(),
            codes: codes.clone(),
            standing: standing.clone(),
            store: store.clone(),
            audit: audit.clone(),
            metrics: metrics.clone(),
            heartbeat: Duration::from_millis(fed.heartbeat_ms.max(10)),
            stop: stop.clone(),
            tasks: tasks.clone(),
        });

        let revoked = crate::revocation::RevocationList::load(&config.path(&config.revoked_certs))?;
        standing.set_revoked(config.province, revoked.serials());
        // Other members' revocations as last fetched: in force before they
        // can be fetched again.
        for (p, serials) in store.revoked()? {
            if p != config.province {
                standing.set_revoked(p, serials);
            }
        }
        codes.publish_own_keys();
        if let Some(list) = list {
            metrics.trust_version.set(list.version as i64);
            for m in list
                .members
                .iter()
                .filter(|m| m.province != config.province)
            {
                if let Some(head) = store.latest_head(m.province)? {
                    metrics.replica_head_time(m.province, head.time_ms);
                }
            }
            federation.enforce(&list)?;
        }
        Ok(Arc::new(NodeState {
            province: config.province,
            identity,
            store,
            codes,
            metrics,
            log_signer,
            audit,
            anchors,
            peers,
            federation,
            standing,
            write_log,
            max_replica_age: Duration::from_secs(fed.max_replica_age_secs),
            batch_changes: fed.batch_changes.max(1),
            clock_offset_ms: fed.clock_offset_secs.saturating_mul(1000),
            stop,
            tasks,
        }))
    }
}

/// A replica applies the province's write log to its store and keyring.
impl Replica for NodeState {
    fn province(&self) -> Province {
        self.province
    }

    fn store(&self) -> &Store {
        &self.store
    }

    fn rotate_key_to(&self, alg: CodeAlg, pkcs8: &[u8], at: i64) -> Result<String, String> {
        self.codes
            .change_keyring(|keyring| keyring.rotate_to(alg, pkcs8, at))
            .map_err(|e| e.to_string())
    }

    fn revoke_key_at(&self, kid: &str, at: i64) -> Result<(), String> {
        self.codes
            .change_keyring(|keyring| keyring.revoke_at(kid, at))
            .map_err(|e| e.to_string())
    }

    async fn catch_up(
        &self,
        log: &WriteLog,
        position: u64,
        first_kept: u64,
    ) -> anyhow::Result<u64> {
        let parts = crate::replication::snapshot::Parts {
            province: self.province,
            store: &self.store,
            codes: &self.codes,
            peers: &self.peers,
            log_key: self.log_signer.verifier_key(),
        };
        crate::replication::snapshot::catch_up(&parts, log, position, first_kept).await
    }

    fn statuses_applied(&self, outcomes: &[PutOutcome]) {
        if let Some(sequence) = outcomes.iter().rev().find_map(|o| match o {
            PutOutcome::Applied { sequence } => Some(*sequence),
            _ => None,
        }) {
            self.metrics.last_sequence.set(sequence as i64);
        }
    }
}

fn pem_cert(pem: &str, what: &str) -> anyhow::Result<CertificateDer<'static>> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| anyhow::anyhow!("{what}: {e}"))
}
