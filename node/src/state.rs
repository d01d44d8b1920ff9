//! What one province's node holds while it runs: its identity, storage,
//! secrets and keys, code verifier, trust list and peers, and metrics.
//! Shared by all services.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use hufu_certs::{Identity, Province, Role, TrustAnchors};
use hufu_federation::audit::LogSigner;
use hufu_federation::codes::{CodeAlg, CodeVerifier, Keyring};
use hufu_federation::holder::{HolderId, HolderSecret, NationalId};
use hufu_federation::trust::TrustStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::NodeAudit;
use crate::client::ClientCert;
use crate::config::NodeConfig;
use crate::error::{NodeError, NodeResult};
use crate::federation::peers::Peers;
use crate::federation::{Membership, Replicators};
use crate::metrics::Metrics;
use crate::replication::{Replica, WriteLog};
use crate::status::now_unix;
use crate::store::{PutOutcome, Store};

pub struct NodeState {
    pub province: Province,
    pub identity: Identity,
    pub store: Store,
    pub secret: HolderSecret,
    pub keyring: RwLock<Keyring>,
    pub verifier: CodeVerifier,
    pub code_lifetime: Duration,
    pub metrics: Arc<Metrics>,
    /// Signs this province's feed heads and audit checkpoints.
    pub log_signer: Arc<LogSigner>,
    /// This node's audit log, and its witness for the other members' logs.
    pub audit: NodeAudit,
    /// CAs whose certificates are accepted (all members').
    pub anchors: Arc<TrustAnchors>,
    /// The accepted trust lists (None: this node runs alone).
    pub trust: tokio::sync::Mutex<Option<TrustStore>>,
    pub membership: ArcSwap<Membership>,
    pub peers: Peers,
    pub replicators: Replicators,
    /// Last keys digest seen per province, to know when to fetch keys.
    pub key_digests: Mutex<HashMap<Province, Vec<u8>>>,
    /// This province's keys as last published, with the digest its feed
    /// heads carry: GetJwks answers with exactly what the digest covers.
    own_published: Mutex<Arc<PublishedKeys>>,
    /// Who may still be served: members of the trust list, certificates
    /// not revoked; checked on every call and enforced on open connections.
    pub standing: Arc<crate::standing::Standing>,
    pub max_replica_age: Duration,
    pub heartbeat: Duration,
    pub batch_changes: usize,
    /// Added to the time in this province's signed feed heads (testing only).
    pub clock_offset_ms: i64,
    /// The province's write log shared with its other replicas (None: this
    /// node writes its own store, the embedded default).
    pub write_log: Option<Arc<WriteLog>>,
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
        let store = Store::open_with_cache(
            &config.path(&config.data_dir),
            config.province,
            config.storage.cache_bytes(),
        )
        .with_context(|| format!("cannot open storage {}", config.data_dir.display()))?;
        let secret_path = config.path(&config.holder_secret);
        let secret_bytes = std::fs::read(&secret_path)
            .with_context(|| format!("cannot read holder secret {}", secret_path.display()))?;
        let secret = HolderSecret::new(&secret_bytes)?;
        let alg: CodeAlg = config
            .codes
            .algorithm
            .parse()
            .map_err(|e| anyhow::anyhow!("codes.algorithm: {e}"))?;
        let keyring = Keyring::open_or_create(
            &config.path(&config.codes.keys_dir),
            alg,
            config.code_lifetime(),
        )?;
        let verifier = CodeVerifier::new(
            Duration::from_secs(config.codes.leeway_secs),
            config.codes.cache_entries,
        );
        let mut log_signer = LogSigner::load(&config.path(&config.log_key))?;
        // Replicas share the province's log key; each signs its own audit
        // log under an origin naming itself, so that witnesses and auditors
        // hold one log per replica, not two histories of one log.
        if config.replication.is_some() {
            log_signer = log_signer.for_node(&config.node_name)?;
        }
        let log_signer = Arc::new(log_signer);
        // The audit log has its own database: its batched writes then never
        // contend with status reads and writes on the hot path.
        let audit = NodeAudit::open(&config.audit_dir(), log_signer.clone(), &config.audit)
            .context("cannot open the audit log")?;
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
        let peers = Peers::new(
            node_cert,
            anchors.clone(),
            Duration::from_millis(fed.peer_deadline_ms),
        );
        let list = trust.as_ref().map(|t| t.current().list.clone());

        let state = Arc::new(NodeState {
            province: config.province,
            identity,
            store,
            secret,
            keyring: RwLock::new(keyring),
            verifier,
            code_lifetime: config.code_lifetime(),
            metrics,
            log_signer,
            audit,
            anchors,
            trust: tokio::sync::Mutex::new(trust),
            membership: ArcSwap::from_pointee(Membership::default()),
            peers,
            replicators: Replicators::default(),
            key_digests: Mutex::new(HashMap::new()),
            own_published: Mutex::new(Arc::new(PublishedKeys::default())),
            standing: crate::standing::Standing::new(config.province),
            max_replica_age: Duration::from_secs(fed.max_replica_age_secs),
            heartbeat: Duration::from_millis(fed.heartbeat_ms.max(10)),
            batch_changes: fed.batch_changes.max(1),
            clock_offset_ms: fed.clock_offset_secs.saturating_mul(1000),
            write_log,
            stop,
            tasks,
        });
        let revoked = crate::revocation::RevocationList::load(&config.path(&config.revoked_certs))?;
        state
            .standing
            .set_revoked(config.province, revoked.serials());
        // Other members' revocations as last fetched: in force before they
        // can be fetched again.
        for (p, serials) in state.store.revoked()? {
            if p != config.province {
                state.standing.set_revoked(p, serials);
            }
        }
        state.publish_own_keys();
        if let Some(list) = list {
            state.metrics.trust_version.set(list.version as i64);
            for m in list
                .members
                .iter()
                .filter(|m| m.province != config.province)
            {
                if let Some(head) = state.store.latest_head(m.province)? {
                    state.metrics.replica_head_time(m.province, head.time_ms);
                }
            }
            state.enforce(&list)?;
        }
        Ok(state)
    }

    /// Hands this province's current public keys to the verifier and
    /// publishes them, with its revoked kids and certificate serials, under
    /// the digest its feed heads announce; called at start, after rotation
    /// or revocation, and periodically so that retired keys leave once
    /// their codes have expired.
    pub fn publish_own_keys(&self) {
        let keyring = self.keyring.read().expect("keyring lock");
        let jwks = keyring.jwks(now_unix());
        let revoked_kids = keyring.revoked_kids();
        if let Err(err) = self
            .verifier
            .set_issuer_keys(self.province, &jwks, &revoked_kids)
        {
            tracing::error!(error = %err, "own code-signing keys refused by the verifier");
        }
        let jwks_json = serde_json::to_string(&jwks).unwrap_or_default();
        let revoked_serials = self.standing.revoked(self.province);
        let digest =
            hufu_federation::feed::keys_digest(&jwks_json, &revoked_kids, &revoked_serials);
        *self.own_published.lock().expect("published lock") = Arc::new(PublishedKeys {
            jwks_json,
            revoked_kids,
            revoked_serials,
            digest,
        });
    }

    pub fn own_keys_digest(&self) -> [u8; 32] {
        self.own_published.lock().expect("published lock").digest
    }

    /// This province's keys as its feed heads announce them.
    pub fn own_published_keys(&self) -> Arc<PublishedKeys> {
        self.own_published.lock().expect("published lock").clone()
    }

    /// A holder named either by national id (pseudonymised here, never kept)
    /// or by pseudonym.
    pub fn holder_from(
        &self,
        national_id: Option<&str>,
        holder: Option<&str>,
    ) -> NodeResult<HolderId> {
        match (national_id, holder) {
            (Some(id), _) => {
                let id = NationalId::parse(id)
                    .map_err(|e| NodeError::invalid_field("national_id", e.to_string()))?;
                Ok(self.secret.pseudonym(&id))
            }
            (None, Some(h)) => h
                .parse()
                .map_err(|e: hufu_federation::holder::HolderError| {
                    NodeError::invalid_field("holder", e.to_string())
                }),
            (None, None) => Err(NodeError::invalid_field(
                "national_id",
                "name the holder: national_id or holder is required",
            )),
        }
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
        let kid = self
            .keyring
            .write()
            .expect("keyring lock")
            .rotate_to(alg, pkcs8, at)
            .map_err(|e| e.to_string())?;
        self.publish_own_keys();
        Ok(kid)
    }

    fn revoke_key_at(&self, kid: &str, at: i64) -> Result<(), String> {
        self.keyring
            .write()
            .expect("keyring lock")
            .revoke_at(kid, at)
            .map_err(|e| e.to_string())?;
        self.publish_own_keys();
        Ok(())
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

/// What a province publishes with its keys; `digest` is signed in its feed
/// heads.
#[derive(Debug, Default)]
pub struct PublishedKeys {
    pub jwks_json: String,
    pub revoked_kids: Vec<String>,
    pub revoked_serials: Vec<String>,
    pub digest: [u8; 32],
}

fn pem_cert(pem: &str, what: &str) -> anyhow::Result<CertificateDer<'static>> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| anyhow::anyhow!("{what}: {e}"))
}
