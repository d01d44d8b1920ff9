//! One message of the province's write log: what a node taking a write
//! publishes, and every replica applies in the stream's order.
//!
//! Encoded with prost, like everything else the node stores, but not part
//! of the public API: only replicas of one province, running one release
//! (or the next, during a rolling upgrade: fields are only ever added),
//! read it. A new code-signing key travels sealed with a key derived from
//! the province's holder secret, which every replica holds already, so that
//! the stream's storage on the NATS servers never holds a usable private
//! key.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::digest::{SHA256, digest};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use hufu_proto::v1::{CodeBinding, StatusRecord};
use prost::Message;

use crate::error::{NodeError, NodeResult};

/// A write: own status records, own legacy code bindings, or one keyring
/// change.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Write {
    /// Status records, applied in order, each only if it supersedes the
    /// stored one (the same rule as a single node's).
    #[prost(message, repeated, tag = "1")]
    pub statuses: Vec<StatusRecord>,
    /// A new code-signing key becomes the signer.
    #[prost(message, optional, tag = "2")]
    pub rotation: Option<KeyRotation>,
    /// A code-signing key is revoked.
    #[prost(message, optional, tag = "3")]
    pub revocation: Option<KeyRevocation>,
    /// Legacy code bindings, applied in order, each only if it changes the
    /// stored one. A release without this field would skip them: upgrade
    /// every replica before linking codes.
    #[prost(message, repeated, tag = "4")]
    pub bindings: Vec<CodeBinding>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyRotation {
    /// "es256" or "eddsa".
    #[prost(string, tag = "1")]
    pub algorithm: String,
    /// The PKCS#8 private key, sealed by [`KeySeal`]: nonce ‖ ciphertext.
    #[prost(bytes = "vec", tag = "2")]
    pub sealed_key: Vec<u8>,
    /// When the rotation was decided (unix seconds): every replica records
    /// the same life-cycle times, so all publish the same JWKS.
    #[prost(int64, tag = "3")]
    pub at: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyRevocation {
    #[prost(string, tag = "1")]
    pub kid: String,
    #[prost(int64, tag = "2")]
    pub at: i64,
}

impl Write {
    pub fn statuses(records: &[StatusRecord]) -> Write {
        Write {
            statuses: records.to_vec(),
            ..Write::default()
        }
    }

    pub fn decode_from(bytes: &[u8]) -> NodeResult<Write> {
        Write::decode(bytes).map_err(|e| {
            NodeError::Internal(format!(
                "a message of the province's write log cannot be read ({e}): is a newer release writing to it?"
            ))
        })
    }
}

/// Seals code-signing keys for the write log (AES-256-GCM).
pub struct KeySeal {
    key: LessSafeKey,
}

/// Domain separation: this key is used for nothing else.
const SEAL_LABEL: &[u8] = b"hufu.replication.code-keys/v1\n";

impl KeySeal {
    /// The seal of the province whose holder secret is `secret`.
    pub fn from_secret(secret: &[u8]) -> KeySeal {
        let mut input = SEAL_LABEL.to_vec();
        input.extend_from_slice(secret);
        let material = digest(&SHA256, &input);
        let key = UnboundKey::new(&AES_256_GCM, material.as_ref()).expect("32-byte key");
        KeySeal {
            key: LessSafeKey::new(key),
        }
    }

    pub fn seal(&self, plain: &[u8]) -> NodeResult<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| NodeError::Internal("no randomness for a nonce".into()))?;
        let mut sealed = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(SEAL_LABEL),
                &mut sealed,
            )
            .map_err(|_| NodeError::Internal("sealing a code-signing key failed".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    pub fn open(&self, sealed: &[u8]) -> NodeResult<Vec<u8>> {
        let refused = || {
            NodeError::Internal(
                "a code-signing key in the write log cannot be opened: do all replicas of the province hold the same holder secret?".into(),
            )
        };
        if sealed.len() < NONCE_LEN {
            return Err(refused());
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| refused())?;
        let mut body = body.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(SEAL_LABEL), &mut body)
            .map_err(|_| refused())?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_key_opens_only_with_the_same_secret() {
        let seal = KeySeal::from_secret(&[7; 32]);
        let sealed = seal.seal(b"private key").unwrap();
        assert!(!sealed.windows(11).any(|w| w == b"private key"));
        assert_eq!(seal.open(&sealed).unwrap(), b"private key");
        assert!(KeySeal::from_secret(&[8; 32]).open(&sealed).is_err());
    }
}
