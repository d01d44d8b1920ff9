//! What one province's node holds while it runs: its identity, storage,
//! holder secret, code-signing keys and verifier, and metrics. Shared by all
//! services.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use hufu_certs::{Identity, Province, Role};
use hufu_federation::codes::{CodeAlg, CodeVerifier, Keyring};
use hufu_federation::holder::{HolderId, HolderSecret, NationalId};

use crate::config::NodeConfig;
use crate::error::{NodeError, NodeResult};
use crate::metrics::Metrics;
use crate::status::now_unix;
use crate::store::Store;

pub struct NodeState {
    pub province: Province,
    pub identity: Identity,
    pub store: Store,
    pub secret: HolderSecret,
    pub keyring: RwLock<Keyring>,
    pub verifier: CodeVerifier,
    pub code_lifetime: Duration,
    pub metrics: Arc<Metrics>,
}

impl NodeState {
    pub fn open(config: &NodeConfig, metrics: Arc<Metrics>) -> anyhow::Result<Arc<NodeState>> {
        let identity = Identity::new(config.province, Role::Node, &config.node_name)?;
        let store = Store::open(&config.path(&config.data_dir))
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
        let state = Arc::new(NodeState {
            province: config.province,
            identity,
            store,
            secret,
            keyring: RwLock::new(keyring),
            verifier,
            code_lifetime: config.code_lifetime(),
            metrics,
        });
        state.publish_own_keys();
        Ok(state)
    }

    /// Hands this province's current public keys to the verifier; called at
    /// start, after rotation or revocation, and periodically so that retired
    /// keys leave once their codes have expired.
    pub fn publish_own_keys(&self) {
        let keyring = self.keyring.read().expect("keyring lock");
        let jwks = keyring.jwks(now_unix());
        if let Err(err) =
            self.verifier
                .set_issuer_keys(self.province, &jwks, &keyring.revoked_kids())
        {
            tracing::error!(error = %err, "own code-signing keys refused by the verifier");
        }
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
                let id = NationalId::parse(id).map_err(|e| NodeError::invalid(e.to_string()))?;
                Ok(self.secret.pseudonym(&id))
            }
            (None, Some(h)) => h
                .parse()
                .map_err(|e: hufu_federation::holder::HolderError| {
                    NodeError::invalid(e.to_string())
                }),
            (None, None) => Err(NodeError::invalid(
                "name the holder: national_id or holder is required",
            )),
        }
    }
}
