//! A province's code-signing keys, kept in one directory.
//!
//! Layout: `<kid>.pem` per key (PKCS#8, mode 0600) and `keys.json` with each
//! key's kid, algorithm and life-cycle times. One key is active and signs new
//! codes. A rotated-out key stays published until the last code it could
//! have signed has expired, so rotation never invalidates a code in a
//! holder's hand; a revoked key leaves the JWKS at once.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair,
};
use jsonwebtoken::{EncodingKey, Header};
use serde::{Deserialize, Serialize};

use super::{CodeAlg, CodeClaims, CodeError, Jwk, Jwks, unix_now};

/// How long past `retired_at + max_code_lifetime` a rotated-out key stays
/// published: covers clock skew between the issuer and verifiers.
pub const RETIRED_KEY_GRACE: Duration = Duration::from_secs(300);

const METADATA_FILE: &str = "keys.json";
const METADATA_TMP: &str = "keys.json.tmp";
const METADATA_VERSION: u32 = 1;
const PEM_TAG: &str = "PRIVATE KEY";

/// Life-cycle of one key, as stored in `keys.json`. Times are unix seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub kid: String,
    pub alg: CodeAlg,
    pub created_at: i64,
    #[serde(default)]
    pub retired_at: Option<i64>,
    #[serde(default)]
    pub revoked_at: Option<i64>,
}

impl KeyRecord {
    /// Neither retired nor revoked: this key signs new codes.
    pub fn is_active(&self) -> bool {
        self.retired_at.is_none() && self.revoked_at.is_none()
    }

    /// Whether verifiers still need this key at `now`.
    fn is_published(&self, now: i64, max_code_lifetime: i64) -> bool {
        if self.revoked_at.is_some() {
            return false;
        }
        match self.retired_at {
            None => true,
            Some(retired) => {
                let grace = RETIRED_KEY_GRACE.as_secs() as i64;
                now <= retired
                    .saturating_add(max_code_lifetime)
                    .saturating_add(grace)
            }
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Metadata {
    version: u32,
    keys: Vec<KeyRecord>,
}

/// The key that signs new codes.
#[derive(Clone, Debug)]
struct ActiveKey {
    kid: String,
    alg: CodeAlg,
    key: EncodingKey,
    header: Header,
}

/// A province's code-signing keys; see the module docs for the life-cycle.
/// Mutations take `&mut self`: a node wraps its keyring in a lock, since
/// rotation is rare and signing is cheap. A mutation writes key files, so a
/// node makes it on a clone and swaps the clone in: signing never waits on
/// the disk.
#[derive(Clone, Debug)]
pub struct Keyring {
    dir: PathBuf,
    max_code_lifetime: Duration,
    records: Vec<KeyRecord>,
    /// Public keys of every key not revoked, by kid.
    public: HashMap<String, Jwk>,
    active: ActiveKey,
}

impl Keyring {
    /// Opens the keyring in `dir`, or creates it with one `alg` key if `dir`
    /// holds no keyring yet. `alg` only matters for a new keyring: use
    /// [`Keyring::rotate`] to change the algorithm of an existing one.
    /// `max_code_lifetime` is the longest `exp - iat` this province issues; it
    /// decides how long rotated-out keys stay published.
    pub fn open_or_create(
        dir: &Path,
        alg: CodeAlg,
        max_code_lifetime: Duration,
    ) -> Result<Keyring, CodeError> {
        if !dir.exists() {
            // Private keys live here: keep the directory to its owner.
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err("create key directory", dir))?;
        }
        let meta_path = dir.join(METADATA_FILE);
        match fs::read(&meta_path) {
            Ok(bytes) => Self::open(dir, &meta_path, &bytes, max_code_lifetime),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Self::create(dir, alg, max_code_lifetime)
            }
            Err(e) => Err(io_err("read", &meta_path)(e)),
        }
    }

    fn create(dir: &Path, alg: CodeAlg, max_code_lifetime: Duration) -> Result<Keyring, CodeError> {
        let (record, pkcs8, jwk) = new_key(dir, alg, unix_now())?;
        write_metadata(dir, std::slice::from_ref(&record))?;
        tracing::info!(kid = %record.kid, %alg, dir = %dir.display(), "created code-signing keyring");
        let active = active_key(&record, &pkcs8, &dir.join(key_file(&record.kid)))?;
        Ok(Keyring {
            dir: dir.to_owned(),
            max_code_lifetime,
            public: HashMap::from([(jwk.kid.clone(), jwk)]),
            records: vec![record],
            active,
        })
    }

    fn open(
        dir: &Path,
        meta_path: &Path,
        bytes: &[u8],
        max_code_lifetime: Duration,
    ) -> Result<Keyring, CodeError> {
        let corrupt = |reason: String| CodeError::Metadata {
            path: meta_path.to_owned(),
            reason,
        };
        let meta: Metadata =
            serde_json::from_slice(bytes).map_err(|e| corrupt(format!("cannot be parsed: {e}")))?;
        if meta.version != METADATA_VERSION {
            return Err(corrupt(format!(
                "version {} is not supported (expected {METADATA_VERSION})",
                meta.version
            )));
        }
        let mut public = HashMap::new();
        let mut seen = HashSet::new();
        let mut active = None;
        for record in &meta.keys {
            // The kid names a file: refuse anything that is not a thumbprint,
            // so a damaged file cannot point outside the directory.
            if record.kid.len() != 43
                || !record
                    .kid
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(corrupt(format!("{:?} is not a key thumbprint", record.kid)));
            }
            if !seen.insert(record.kid.as_str()) {
                return Err(corrupt(format!("key {} is listed twice", record.kid)));
            }
            if record.revoked_at.is_some() {
                continue;
            }
            let path = dir.join(key_file(&record.kid));
            let pkcs8 = read_private_key(&path)?;
            let jwk = public_jwk(record.alg, &pkcs8).map_err(|reason| CodeError::PrivateKey {
                path: path.clone(),
                reason,
            })?;
            if jwk.kid != record.kid {
                return Err(CodeError::PrivateKey {
                    path,
                    reason: format!("it holds key {}, not {}", jwk.kid, record.kid),
                });
            }
            if record.is_active() {
                if active.is_some() {
                    return Err(corrupt("more than one key is active".into()));
                }
                active = Some(active_key(record, &pkcs8, &path)?);
            }
            public.insert(jwk.kid.clone(), jwk);
        }
        let active = active
            .ok_or_else(|| corrupt("no key is active (neither retired nor revoked)".into()))?;
        Ok(Keyring {
            dir: dir.to_owned(),
            max_code_lifetime,
            records: meta.keys,
            public,
            active,
        })
    }

    /// The kid of the key that signs new codes.
    pub fn active_kid(&self) -> &str {
        &self.active.kid
    }

    /// The algorithm of the key that signs new codes.
    pub fn active_alg(&self) -> CodeAlg {
        self.active.alg
    }

    /// Every key this keyring has had, oldest first.
    pub fn keys(&self) -> &[KeyRecord] {
        &self.records
    }

    /// The PKCS#8 private key of `kid`, retired and revoked keys included:
    /// what another replica of the province needs to hold this keyring.
    pub fn private_key(&self, kid: &str) -> Result<Vec<u8>, CodeError> {
        if !self.records.iter().any(|r| r.kid == kid) {
            return Err(CodeError::UnknownKid {
                kid: kid.to_owned(),
            });
        }
        read_private_key(&self.dir.join(key_file(kid)))
    }

    /// The directory holding the keys.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The longest code lifetime this keyring was opened with.
    pub fn max_code_lifetime(&self) -> Duration {
        self.max_code_lifetime
    }

    /// Makes a new `alg` key the signer and retires the old one, which stays
    /// published until every code it signed has expired. Returns the new kid.
    pub fn rotate(&mut self, alg: CodeAlg) -> Result<String, CodeError> {
        let pkcs8 = generate_key(alg)?;
        self.rotate_to(alg, &pkcs8, unix_now())
    }

    /// Makes `pkcs8` (an `alg` key made by [`generate_key`]) the signer as of
    /// `at`, retiring the old one: a rotation decided elsewhere, replayed
    /// here, so that replicas of one province hold identical keyrings.
    /// Adopting a key this keyring already has is a no-op (a replay).
    pub fn rotate_to(&mut self, alg: CodeAlg, pkcs8: &[u8], at: i64) -> Result<String, CodeError> {
        let jwk = public_jwk(alg, pkcs8).map_err(|_| CodeError::KeyGeneration { alg })?;
        if self.records.iter().any(|r| r.kid == jwk.kid) {
            return Ok(jwk.kid);
        }
        let path = self.dir.join(key_file(&jwk.kid));
        // A key file left by a crash before its metadata was written is the
        // same key (the file is named by its thumbprint): write it afresh.
        if path.exists() {
            fs::remove_file(&path).map_err(io_err("replace private key", &path))?;
        }
        write_private_key(&path, pkcs8)?;
        let record = KeyRecord {
            kid: jwk.kid.clone(),
            alg,
            created_at: at,
            retired_at: None,
            revoked_at: None,
        };
        let active = active_key(&record, pkcs8, &path)?;
        let mut records = self.records.clone();
        for r in records.iter_mut().filter(|r| r.is_active()) {
            r.retired_at = Some(at);
        }
        records.push(record);
        // Only once the metadata is durable does the new key sign anything:
        // a crash before leaves at worst an unused key file.
        write_metadata(&self.dir, &records)?;
        let old = std::mem::replace(&mut self.active, active);
        tracing::info!(old = %old.kid, new = %self.active.kid, %alg, "rotated code-signing key");
        self.records = records;
        self.public.insert(jwk.kid.clone(), jwk);
        Ok(self.active.kid.clone())
    }

    /// Revokes `kid`: it leaves the JWKS at once and is listed as revoked, so
    /// verifiers refuse its codes. Revoking an already revoked key is a no-op.
    /// The active key cannot be revoked: rotate first.
    pub fn revoke(&mut self, kid: &str) -> Result<(), CodeError> {
        self.revoke_at(kid, unix_now())
    }

    /// [`revoke`](Self::revoke) as of `at`: a revocation replayed from
    /// elsewhere.
    pub fn revoke_at(&mut self, kid: &str, at: i64) -> Result<(), CodeError> {
        self.check_revocable(kid)?;
        let index = self
            .records
            .iter()
            .position(|r| r.kid == kid)
            .expect("checked above");
        if self.records[index].revoked_at.is_some() {
            return Ok(());
        }
        let mut records = self.records.clone();
        records[index].revoked_at = Some(at);
        write_metadata(&self.dir, &records)?;
        tracing::warn!(kid, "revoked code-signing key");
        self.records = records;
        self.public.remove(kid);
        Ok(())
    }

    /// Whether [`revoke`](Self::revoke) would accept `kid`, without revoking it.
    pub fn check_revocable(&self, kid: &str) -> Result<(), CodeError> {
        let Some(record) = self.records.iter().find(|r| r.kid == kid) else {
            return Err(CodeError::UnknownKid {
                kid: kid.to_owned(),
            });
        };
        if record.is_active() {
            return Err(CodeError::RevokeActive {
                kid: kid.to_owned(),
            });
        }
        Ok(())
    }

    /// The keys verifiers need at `now` (unix seconds): the active key first,
    /// then retired keys whose codes may still be live, newest first.
    pub fn jwks(&self, now: i64) -> Jwks {
        let lifetime = i64::try_from(self.max_code_lifetime.as_secs()).unwrap_or(i64::MAX);
        let keys = self
            .records
            .iter()
            .rev()
            .filter(|r| r.is_published(now, lifetime))
            .filter_map(|r| self.public.get(&r.kid).cloned())
            .collect();
        Jwks { keys }
    }

    /// Kids of every revoked key, oldest first.
    pub fn revoked_kids(&self) -> Vec<String> {
        self.records
            .iter()
            .filter(|r| r.revoked_at.is_some())
            .map(|r| r.kid.clone())
            .collect()
    }

    /// Signs `claims` with the active key: a compact JWS with header
    /// `{alg, kid}` (no `typ`: it is optional, and leaving it out keeps the
    /// QR symbol a version smaller).
    pub fn sign(&self, claims: &CodeClaims) -> Result<String, CodeError> {
        jsonwebtoken::encode(&self.active.header, claims, &self.active.key)
            .map_err(|e| CodeError::Sign(e.to_string()))
    }
}

fn key_file(kid: &str) -> String {
    format!("{kid}.pem")
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CodeError + 'a {
    move |source| CodeError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// Generates an `alg` key, writes it to `dir`, and returns its record, its
/// PKCS#8 document and its public JWK.
fn new_key(dir: &Path, alg: CodeAlg, now: i64) -> Result<(KeyRecord, Vec<u8>, Jwk), CodeError> {
    let pkcs8 = generate_key(alg)?;
    let jwk = public_jwk(alg, &pkcs8).map_err(|_| CodeError::KeyGeneration { alg })?;
    write_private_key(&dir.join(key_file(&jwk.kid)), &pkcs8)?;
    let record = KeyRecord {
        kid: jwk.kid.clone(),
        alg,
        created_at: now,
        retired_at: None,
        revoked_at: None,
    };
    Ok((record, pkcs8, jwk))
}

/// A fresh `alg` private key as a PKCS#8 document, for
/// [`Keyring::rotate_to`].
pub fn generate_key(alg: CodeAlg) -> Result<Vec<u8>, CodeError> {
    let rng = SystemRandom::new();
    let pkcs8 = match alg {
        CodeAlg::Es256 => EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng),
        // v1 rather than v2: what OpenSSL and most tools expect.
        CodeAlg::EdDsa => Ed25519KeyPair::generate_pkcs8v1(&rng),
    }
    .map_err(|_| CodeError::KeyGeneration { alg })?;
    Ok(pkcs8.as_ref().to_vec())
}

/// The kid (RFC 7638 thumbprint) of an `alg` PKCS#8 private key.
pub fn key_id(alg: CodeAlg, pkcs8: &[u8]) -> Result<String, CodeError> {
    public_jwk(alg, pkcs8)
        .map(|jwk| jwk.kid)
        .map_err(|_| CodeError::KeyGeneration { alg })
}

/// The public JWK of a PKCS#8 private key.
fn public_jwk(alg: CodeAlg, pkcs8: &[u8]) -> Result<Jwk, String> {
    let public = match alg {
        CodeAlg::Es256 => EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8)
            .map(|k| k.public_key().as_ref().to_vec()),
        CodeAlg::EdDsa => {
            Ed25519KeyPair::from_pkcs8(pkcs8).map(|k| k.public_key().as_ref().to_vec())
        }
    }
    .map_err(|e| format!("not a pkcs#8 {alg} private key: {e}"))?;
    Jwk::from_public_key(alg, &public).map_err(|e| e.to_string())
}

fn active_key(record: &KeyRecord, pkcs8: &[u8], path: &Path) -> Result<ActiveKey, CodeError> {
    let key = match record.alg {
        CodeAlg::Es256 => EncodingKey::from_ec_der(pkcs8),
        CodeAlg::EdDsa => EncodingKey::from_ed_der(pkcs8),
    };
    let mut header = Header::new(record.alg.algorithm());
    header.typ = None;
    header.kid = Some(record.kid.clone());
    let active = ActiveKey {
        kid: record.kid.clone(),
        alg: record.alg,
        key,
        header,
    };
    // jsonwebtoken only parses the key when signing: try it once now so a bad
    // key fails at startup, not on the first code issued.
    jsonwebtoken::crypto::sign(b"probe", &active.key, record.alg.algorithm()).map_err(|e| {
        CodeError::PrivateKey {
            path: path.to_owned(),
            reason: e.to_string(),
        }
    })?;
    Ok(active)
}

fn write_private_key(path: &Path, pkcs8: &[u8]) -> Result<(), CodeError> {
    let pem = pem::encode_config(
        &pem::Pem::new(PEM_TAG, pkcs8),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    );
    // create_new + 0600 at open: the key is never readable by others, not
    // even between creation and a later chmod.
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err("create private key", path))?;
    file.write_all(pem.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io_err("write private key", path))
}

fn read_private_key(path: &Path) -> Result<Vec<u8>, CodeError> {
    let text = fs::read(path).map_err(io_err("read private key", path))?;
    if let Ok(meta) = fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            path = %path.display(),
            "private key is readable by group or others: run chmod 600 on it"
        );
    }
    let pem = pem::parse(&text).map_err(|e| CodeError::PrivateKey {
        path: path.to_owned(),
        reason: format!("not pem: {e}"),
    })?;
    if pem.tag() != PEM_TAG {
        return Err(CodeError::PrivateKey {
            path: path.to_owned(),
            reason: format!("pem label is {:?}, expected {PEM_TAG:?}", pem.tag()),
        });
    }
    Ok(pem.into_contents())
}

/// Replaces `keys.json` atomically: write a temporary file, fsync it, rename
/// it over the old one, fsync the directory. A crash leaves the old or the new
/// metadata, never a torn one.
fn write_metadata(dir: &Path, records: &[KeyRecord]) -> Result<(), CodeError> {
    let meta = Metadata {
        version: METADATA_VERSION,
        keys: records.to_vec(),
    };
    let mut json = serde_json::to_vec_pretty(&meta).expect("key metadata always serialises");
    json.push(b'\n');
    let tmp = dir.join(METADATA_TMP);
    let path = dir.join(METADATA_FILE);
    let mut file = File::create(&tmp).map_err(io_err("create", &tmp))?;
    file.write_all(&json)
        .and_then(|()| file.sync_all())
        .map_err(io_err("write", &tmp))?;
    fs::rename(&tmp, &path).map_err(io_err("replace", &path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync key directory", dir))
}
