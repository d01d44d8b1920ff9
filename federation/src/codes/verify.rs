//! Offline verification of codes from any member province.
//!
//! A [`CodeVerifier`] holds each issuing province's published keys and
//! revoked kids, replaced at runtime as the trust list changes, and a bounded
//! cache of tokens already verified so that a code scanned again skips the
//! signature check. Revocation, publication and time are checked on every
//! call, cached or not.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use aws_lc_rs::digest;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hufu_certs::Province;
use jsonwebtoken::DecodingKey;
use quick_cache::sync::Cache;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::{CodeAlg, CodeClaims, CodeError, ISSUER_PREFIX, Jwks};

/// Longest token accepted. A real code is about 400 bytes; the limit is
/// checked before any decoding so oversized input costs nothing.
pub const MAX_TOKEN_BYTES: usize = 4096;

/// Why a code was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Verdict {
    #[error("malformed code: {0}")]
    Malformed(String),

    #[error("bad signature: {0}")]
    BadSignature(String),

    #[error(
        "unknown signing key {kid}: the issuing province does not publish it; refresh the trust list if that province rotated keys recently"
    )]
    UnknownKey { kid: String },

    #[error("signing key {kid} was revoked by its province: the holder needs a newly issued code")]
    RevokedKey { kid: String },

    #[error("code expired at {exp} (unix seconds): the holder should refresh it")]
    Expired { exp: i64 },

    #[error("code is not valid before {nbf} (unix seconds): check this verifier's clock")]
    NotYetValid { nbf: i64 },
}

impl Verdict {
    /// A short stable name, for metrics labels and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Verdict::Malformed(_) => "malformed",
            Verdict::BadSignature(_) => "bad_signature",
            Verdict::UnknownKey { .. } => "unknown_key",
            Verdict::RevokedKey { .. } => "revoked_key",
            Verdict::Expired { .. } => "expired",
            Verdict::NotYetValid { .. } => "not_yet_valid",
        }
    }
}

/// A code that passed every check. `kid` and `claims` are shared with the
/// cache, so a cache hit allocates nothing.
#[derive(Debug, Clone)]
pub struct VerifiedCode {
    pub issuer: Province,
    pub kid: Arc<str>,
    pub claims: Arc<CodeClaims>,
    /// The signature check was skipped because this exact token was verified
    /// before.
    pub cached: bool,
}

/// One province's published keys and revoked kids.
struct IssuerKeys {
    keys: HashMap<String, VerifyKey>,
    revoked: HashSet<String>,
    /// The keys and revoked kids as handed in, so that what the node
    /// publishes about a province is exactly what it verifies with.
    jwks: Jwks,
    revoked_kids: Vec<String>,
}

struct VerifyKey {
    alg: CodeAlg,
    key: DecodingKey,
}

impl IssuerKeys {
    /// Revocation first, so a revoked kid is reported as such even though it
    /// has also left the JWKS.
    fn usable(&self, kid: &str) -> Result<&VerifyKey, Verdict> {
        if self.revoked.contains(kid) {
            return Err(Verdict::RevokedKey {
                kid: kid.to_owned(),
            });
        }
        self.keys.get(kid).ok_or_else(|| Verdict::UnknownKey {
            kid: kid.to_owned(),
        })
    }
}

#[derive(Clone)]
struct CacheEntry {
    issuer: Province,
    kid: Arc<str>,
    claims: Arc<CodeClaims>,
}

/// Verifies codes offline against the keys of the issuing provinces. Shared
/// by many tasks: `verify` and `set_issuer_keys` both take `&self`.
pub struct CodeVerifier {
    leeway: i64,
    /// Swapped whole on every key change, so `verify` reads without locking.
    issuers: ArcSwap<HashMap<Province, Arc<IssuerKeys>>>,
    /// Keyed by SHA-256 of the token; `None` when built with capacity 0.
    cache: Option<Cache<[u8; 32], CacheEntry>>,
}

impl fmt::Debug for CodeVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CodeVerifier")
            .field("leeway", &self.leeway)
            .field("issuers", &self.issuers.load().len())
            .field("cached", &self.cache_len())
            .finish()
    }
}

#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    kid: Option<String>,
    /// Whether the header names `crit` at all: `"crit": null` is a crit
    /// header too (RFC 7515 4.1.11 allows no null), so presence is what
    /// counts, not the value an `Option` would make of it.
    #[serde(default, deserialize_with = "present")]
    crit: bool,
}

/// True for any value, null included; the field's absence gives the default.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    serde::de::IgnoredAny::deserialize(d)?;
    Ok(true)
}

impl CodeVerifier {
    /// `leeway` is the clock skew tolerated on `exp` and `nbf`;
    /// `cache_capacity` the number of verified tokens remembered (0: none).
    pub fn new(leeway: Duration, cache_capacity: usize) -> CodeVerifier {
        CodeVerifier {
            leeway: i64::try_from(leeway.as_secs()).unwrap_or(i64::MAX),
            issuers: ArcSwap::from_pointee(HashMap::new()),
            cache: (cache_capacity > 0).then(|| Cache::new(cache_capacity)),
        }
    }

    /// Replaces `province`'s keys with `jwks` and its revoked kids with
    /// `revoked`. Every key must be an ES256 or EdDSA key whose kid is its
    /// RFC 7638 thumbprint; otherwise nothing changes and the error says which
    /// key is wrong.
    pub fn set_issuer_keys(
        &self,
        province: Province,
        jwks: &Jwks,
        revoked: &[String],
    ) -> Result<(), CodeError> {
        let keys = jwks
            .keys
            .iter()
            .map(|jwk| {
                let (alg, key) = jwk.decoding_key()?;
                Ok((jwk.kid.clone(), VerifyKey { alg, key }))
            })
            .collect::<Result<HashMap<_, _>, CodeError>>()?;
        let mut revoked_kids = revoked.to_vec();
        revoked_kids.sort();
        revoked_kids.dedup();
        let entry = Arc::new(IssuerKeys {
            keys,
            revoked: revoked.iter().cloned().collect(),
            jwks: jwks.clone(),
            revoked_kids,
        });
        self.issuers.rcu(|map| {
            let mut map = HashMap::clone(map);
            map.insert(province, Arc::clone(&entry));
            map
        });
        Ok(())
    }

    /// The keys and revoked kids this verifier holds for `province`: what
    /// it checks that province's codes with.
    pub fn keys_of(&self, province: Province) -> Option<(Jwks, Vec<String>)> {
        self.issuer_keys(province)
            .map(|k| (k.jwks.clone(), k.revoked_kids.clone()))
    }

    /// Forgets `province`'s keys: its codes become [`Verdict::UnknownKey`].
    pub fn remove_issuer(&self, province: Province) {
        self.issuers.rcu(|map| {
            let mut map = HashMap::clone(map);
            map.remove(&province);
            map
        });
    }

    /// Number of tokens in the verified-token cache.
    pub fn cache_len(&self) -> usize {
        self.cache.as_ref().map_or(0, Cache::len)
    }

    /// Verifies `token` at `now_unix` (seconds): size, header, algorithm,
    /// issuer and key, revocation, signature, then `exp`/`nbf`/`iat` with
    /// leeway.
    pub fn verify(&self, token: &str, now_unix: i64) -> Result<VerifiedCode, Verdict> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Verdict::Malformed(format!(
                "token is {} bytes, longer than the {MAX_TOKEN_BYTES} bytes a code may have",
                token.len()
            )));
        }
        let cache_key = self.cache.as_ref().map(|cache| {
            let mut key = [0u8; 32];
            key.copy_from_slice(digest::digest(&digest::SHA256, token.as_bytes()).as_ref());
            (cache, key)
        });
        if let Some((cache, key)) = &cache_key
            && let Some(hit) = cache.get(key)
        {
            // The signature was checked when the entry was made; what may
            // have changed since is the issuer's keys and the time.
            self.issuer_keys(hit.issuer)
                .ok_or_else(|| Verdict::UnknownKey {
                    kid: hit.kid.to_string(),
                })?
                .usable(&hit.kid)?;
            self.check_time(&hit.claims, now_unix)?;
            return Ok(VerifiedCode {
                issuer: hit.issuer,
                kid: hit.kid,
                claims: hit.claims,
                cached: true,
            });
        }

        let (message, signature) = token
            .rsplit_once('.')
            .ok_or_else(|| malformed("a code has three dot-separated parts, this has one"))?;
        let (header_b64, payload_b64) = message
            .split_once('.')
            .ok_or_else(|| malformed("a code has three dot-separated parts, this has two"))?;
        if payload_b64.contains('.') {
            return Err(malformed(
                "a code has three dot-separated parts, this has more",
            ));
        }

        let header: RawHeader = decode_part(header_b64, "header")?;
        let alg = match header.alg.as_str() {
            "ES256" => CodeAlg::Es256,
            "EdDSA" => CodeAlg::EdDsa,
            "none" => {
                return Err(malformed(
                    "alg \"none\" is refused: an unsigned code proves nothing; codes are signed with ES256 or EdDSA",
                ));
            }
            other => {
                return Err(Verdict::Malformed(format!(
                    "alg {other:?} is refused: codes are signed with ES256 or EdDSA"
                )));
            }
        };
        if header.crit {
            return Err(malformed(
                "header lists critical extensions (crit), which hufu codes never use",
            ));
        }
        let kid = header
            .kid
            .ok_or_else(|| malformed("header has no kid, so no key can be chosen"))?;

        let claims: CodeClaims = decode_part(payload_b64, "claims")?;
        let issuer = claims
            .iss
            .strip_prefix(ISSUER_PREFIX)
            .ok_or_else(|| {
                Verdict::Malformed(format!(
                    "issuer {:?} is not of the form {ISSUER_PREFIX}<province code>",
                    claims.iss
                ))
            })
            .and_then(|code| {
                Province::parse(code)
                    .map_err(|e| Verdict::Malformed(format!("issuer {:?}: {e}", claims.iss)))
            })?;

        // The key must come from the province the code names: a key of
        // province A cannot vouch for a code claiming issuer B.
        let issuer_keys = self
            .issuer_keys(issuer)
            .ok_or_else(|| Verdict::UnknownKey { kid: kid.clone() })?;
        let key = issuer_keys.usable(&kid)?;
        if key.alg != alg {
            return Err(Verdict::BadSignature(format!(
                "header says {alg} but key {kid} is an {} key",
                key.alg
            )));
        }
        match jsonwebtoken::crypto::verify(signature, message.as_bytes(), &key.key, alg.algorithm())
        {
            Ok(true) => {}
            Ok(false) => {
                return Err(Verdict::BadSignature(format!(
                    "signature does not match the header and claims under key {kid}"
                )));
            }
            Err(e) => {
                return Err(Verdict::BadSignature(format!(
                    "signature cannot be checked: {e}"
                )));
            }
        }
        self.check_time(&claims, now_unix)?;

        let entry = CacheEntry {
            issuer,
            kid: Arc::from(kid),
            claims: Arc::new(claims),
        };
        if let Some((cache, key)) = cache_key {
            cache.insert(key, entry.clone());
        }
        Ok(VerifiedCode {
            issuer: entry.issuer,
            kid: entry.kid,
            claims: entry.claims,
            cached: false,
        })
    }

    fn issuer_keys(&self, province: Province) -> Option<Arc<IssuerKeys>> {
        self.issuers.load().get(&province).cloned()
    }

    fn check_time(&self, claims: &CodeClaims, now: i64) -> Result<(), Verdict> {
        if now > claims.exp.saturating_add(self.leeway) {
            return Err(Verdict::Expired { exp: claims.exp });
        }
        if now.saturating_add(self.leeway) < claims.nbf {
            return Err(Verdict::NotYetValid { nbf: claims.nbf });
        }
        // A code issued in the future comes from an issuer whose clock is
        // ahead (or from a forger): it is not valid yet either.
        if now.saturating_add(self.leeway) < claims.iat {
            return Err(Verdict::NotYetValid { nbf: claims.iat });
        }
        Ok(())
    }
}

fn malformed(reason: &str) -> Verdict {
    Verdict::Malformed(reason.to_owned())
}

/// Decodes one base64url JSON part of the token.
fn decode_part<T: DeserializeOwned>(part: &str, what: &str) -> Result<T, Verdict> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|e| Verdict::Malformed(format!("{what} is not base64url: {e}")))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Verdict::Malformed(format!("{what} is not the json a hufu code carries: {e}")))
}
