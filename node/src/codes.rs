//! This province's health codes: the holder-pseudonym secret, the
//! code-signing keyring, the verifier that checks every member's codes, and
//! the keys as published under the digest this province's feed heads sign.

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context;
use hufu_certs::Province;
use hufu_federation::codes::{CodeAlg, CodeError, CodeVerifier, Keyring};
use hufu_federation::holder::{HolderId, HolderSecret, NationalId};

use crate::config::NodeConfig;
use crate::error::{NodeError, NodeResult};
use crate::standing::Standing;
use crate::status::now_unix;

/// What a province publishes with its keys; `digest` is signed in its feed
/// heads.
#[derive(Debug, Default)]
pub struct PublishedKeys {
    pub jwks_json: String,
    pub revoked_kids: Vec<String>,
    pub revoked_serials: Vec<String>,
    pub digest: [u8; 32],
}

/// The code-signing keyring `config` names, made with its algorithm if it
/// does not exist yet.
pub fn open_keyring(config: &NodeConfig) -> anyhow::Result<Keyring> {
    let alg: CodeAlg = config
        .codes
        .algorithm
        .parse()
        .map_err(|e| anyhow::anyhow!("codes.algorithm: {e}"))?;
    Ok(Keyring::open_or_create(
        &config.path(&config.codes.keys_dir),
        alg,
        config.code_lifetime(),
    )?)
}

pub struct Codes {
    province: Province,
    pub secret: HolderSecret,
    /// Read by every code issued; changed only through
    /// [`Codes::change_keyring`].
    pub keyring: RwLock<Keyring>,
    /// Held while the keyring is changed: one change at a time.
    changing: Mutex<()>,
    pub verifier: CodeVerifier,
    pub lifetime: Duration,
    /// Whose certificates are revoked: published with the keys.
    standing: Arc<Standing>,
    /// This province's keys as last published, with the digest its feed
    /// heads carry: GetJwks answers with exactly what the digest covers.
    published: Mutex<Arc<PublishedKeys>>,
}

impl Codes {
    /// Opens the holder secret and the keyring `config` names.
    pub fn open(config: &NodeConfig, standing: Arc<Standing>) -> anyhow::Result<Codes> {
        let secret_path = config.path(&config.holder_secret);
        let secret_bytes = std::fs::read(&secret_path)
            .with_context(|| format!("cannot read holder secret {}", secret_path.display()))?;
        let secret = HolderSecret::new(&secret_bytes)?;
        let keyring = open_keyring(config)?;
        let verifier = CodeVerifier::new(
            Duration::from_secs(config.codes.leeway_secs),
            config.codes.cache_entries,
        );
        Ok(Codes {
            province: config.province,
            secret,
            keyring: RwLock::new(keyring),
            changing: Mutex::new(()),
            verifier,
            lifetime: config.code_lifetime(),
            standing,
            published: Mutex::new(Arc::new(PublishedKeys::default())),
        })
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
        *self.published.lock().expect("published lock") = Arc::new(PublishedKeys {
            jwks_json,
            revoked_kids,
            revoked_serials,
            digest,
        });
    }

    /// Changes the keyring with `change` (a rotation, a revocation), then
    /// publishes the keys. The change is made on a copy and swapped in:
    /// generating a key and writing and syncing its files happen without
    /// the lock that issuing a code takes, so a slow disk delays the change,
    /// never the codes issued meanwhile. Blocking: call it on the blocking
    /// pool.
    pub fn change_keyring<T>(
        &self,
        change: impl FnOnce(&mut Keyring) -> Result<T, CodeError>,
    ) -> Result<T, CodeError> {
        let _one_at_a_time = self.changing.lock().expect("keyring change lock");
        let mut copy = self.keyring.read().expect("keyring lock").clone();
        let out = change(&mut copy)?;
        *self.keyring.write().expect("keyring lock") = copy;
        self.publish_own_keys();
        Ok(out)
    }

    pub fn own_keys_digest(&self) -> [u8; 32] {
        self.published.lock().expect("published lock").digest
    }

    /// This province's keys as its feed heads announce them.
    pub fn own_published_keys(&self) -> Arc<PublishedKeys> {
        self.published.lock().expect("published lock").clone()
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
                let id = NationalId::parse(id).map_err(|source| NodeError::BadHolder {
                    field: "national_id",
                    source,
                })?;
                Ok(self.secret.pseudonym(&id))
            }
            (None, Some(h)) => h.parse().map_err(|source| NodeError::BadHolder {
                field: "holder",
                source,
            }),
            (None, None) => Err(NodeError::invalid_field(
                "national_id",
                "name the holder: national_id or holder is required",
            )),
        }
    }

    /// Whether `id` pseudonymises to `holder` under this province's secret.
    /// Compared in constant time: the answer is all a caller learns.
    pub fn is_own_holder(&self, id: &NationalId, holder: &str) -> bool {
        aws_lc_rs::constant_time::verify_slices_are_equal(
            self.secret.pseudonym(id).as_str().as_bytes(),
            holder.as_bytes(),
        )
        .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    fn codes(dir: &std::path::Path) -> Arc<Codes> {
        let province = Province::parse("440000").unwrap();
        let keyring =
            Keyring::open_or_create(&dir.join("keys"), CodeAlg::Es256, Duration::from_secs(600))
                .unwrap();
        Arc::new(Codes {
            province,
            secret: HolderSecret::new(&[7; 32]).unwrap(),
            keyring: RwLock::new(keyring),
            changing: Mutex::new(()),
            verifier: CodeVerifier::new(Duration::from_secs(60), 16),
            lifetime: Duration::from_secs(600),
            standing: Standing::new(province),
            published: Mutex::new(Arc::new(PublishedKeys::default())),
        })
    }

    /// A keyring change held up on its way (a slow disk writing the key
    /// files) does not hold up the reads that sign codes; they see the old
    /// key until the change is complete, then the new one.
    #[test]
    fn codes_are_signed_while_the_keyring_changes() {
        let dir = tempfile::tempdir().unwrap();
        let codes = codes(dir.path());
        let old = codes.keyring.read().unwrap().active_kid().to_owned();
        let (entered, under_way) = mpsc::channel();
        let (release, released) = mpsc::channel::<()>();
        let changer = std::thread::spawn({
            let codes = codes.clone();
            move || {
                codes.change_keyring(|keyring| {
                    entered.send(()).unwrap();
                    released.recv().unwrap();
                    keyring.rotate(CodeAlg::Es256)
                })
            }
        });
        under_way.recv().unwrap();
        let (signed, signing) = mpsc::channel();
        std::thread::spawn({
            let codes = codes.clone();
            move || {
                let keyring = codes.keyring.read().unwrap();
                signed.send(keyring.active_kid().to_owned()).unwrap();
            }
        });
        let seen = signing
            .recv_timeout(Duration::from_secs(5))
            .expect("signing waited for the keyring change to finish");
        assert_eq!(seen, old);
        release.send(()).unwrap();
        let new = changer.join().unwrap().unwrap();
        assert_ne!(new, old);
        assert_eq!(codes.keyring.read().unwrap().active_kid(), new);
        assert!(codes.own_published_keys().jwks_json.contains(&new));
    }
}
