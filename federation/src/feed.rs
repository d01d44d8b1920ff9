//! The status-change feed between provinces: each province's changes form a
//! hash chain, and batches carry the issuer's Ed25519 signature over the
//! chain head, so a batch can be relayed by any peer and still be checked
//! against the issuer's key in the trust list. A forged, reordered or
//! replayed batch fails the chain or the signature.

use aws_lc_rs::digest::{Context, SHA256, digest};
use aws_lc_rs::signature::{ED25519, UnparsedPublicKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hufu_certs::Province;

use crate::audit::LogSigner;
use crate::note::VerifierKey;

/// First line of every signed head: domain separation from checkpoints and
/// cosignatures made with the same key.
pub const HEAD_LABEL: &str = "hufu.feed/v1\n";

/// The chain value before the first change.
pub const GENESIS_HASH: [u8; 32] = [0; 32];

/// h(n) = SHA-256(h(n-1) || n as 8 bytes big-endian || record bytes).
pub fn chain_next(previous: &[u8; 32], sequence: u64, record: &[u8]) -> [u8; 32] {
    // Hashed in parts rather than copied into one buffer: this runs for
    // every change written, served and replicated.
    let mut context = Context::new(&SHA256);
    context.update(previous);
    context.update(&sequence.to_be_bytes());
    context.update(record);
    let mut out = [0u8; 32];
    out.copy_from_slice(context.finish().as_ref());
    out
}

/// What a head says: "as of `time_ms`, province `issuer` has published
/// changes 1..=`sequence`, chaining to `chain_hash`, and its code-signing
/// keys hash to `keys_digest`".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    pub issuer: Province,
    pub sequence: u64,
    pub chain_hash: [u8; 32],
    pub time_ms: i64,
    pub keys_digest: [u8; 32],
}

impl Head {
    /// The exact text that is signed.
    pub fn text(&self) -> String {
        format!(
            "{HEAD_LABEL}{}\n{}\n{}\n{}\n{}\n",
            self.issuer,
            self.sequence,
            STANDARD.encode(self.chain_hash),
            self.time_ms,
            STANDARD.encode(self.keys_digest)
        )
    }

    pub fn sign(&self, signer: &LogSigner) -> Vec<u8> {
        signer.sign_feed_head(&self.text())
    }

    /// Checks `signature` against the issuer's log key from the trust list.
    pub fn verify(&self, signature: &[u8], log_key: &str) -> Result<(), FeedError> {
        verify_signed_text(&self.text(), signature, log_key, self.issuer, self.sequence)
    }
}

/// Checks `signature` over `text` (a head or another statement of
/// `issuer`'s feed, about change `sequence`) with the issuer's log key from
/// the trust list.
pub(crate) fn verify_signed_text(
    text: &str,
    signature: &[u8],
    log_key: &str,
    issuer: Province,
    sequence: u64,
) -> Result<(), FeedError> {
    let key = VerifierKey::parse(log_key).map_err(|e| FeedError::Key(e.to_string()))?;
    UnparsedPublicKey::new(&ED25519, key.public_key())
        .verify(text.as_bytes(), signature)
        .map_err(|_| FeedError::BadSignature { issuer, sequence })
}

/// Digest of what a province publishes with its keys (JWKS JSON, revoked
/// kids, revoked certificate serials), so a head tells subscribers when to
/// fetch them again, and lets them check what they fetched against the
/// province's signature.
pub fn keys_digest(
    jwks_json: &str,
    revoked_kids: &[String],
    revoked_serials: &[String],
) -> [u8; 32] {
    let mut input = jwks_json.as_bytes().to_vec();
    for kid in revoked_kids {
        input.push(0);
        input.extend_from_slice(kid.as_bytes());
    }
    // A separator no kid contains keeps the two lists apart.
    input.push(1);
    for serial in revoked_serials {
        input.push(0);
        input.extend_from_slice(serial.as_bytes());
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, &input).as_ref());
    out
}

/// Why a batch was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FeedError {
    #[error(
        "feed head of {issuer} at {sequence} has a bad signature: forged, or signed by a key not in the trust list"
    )]
    BadSignature { issuer: Province, sequence: u64 },
    #[error("log key in the trust list is unusable: {0}")]
    Key(String),
    #[error("batch is for province {got}, but {want} was asked for")]
    WrongIssuer { want: Province, got: Province },
    #[error("batch starts at change {first}, but {expected} is next: changes are missing")]
    Gap { expected: u64, first: u64 },
    #[error("changes are out of order: {found} follows {previous}")]
    OutOfOrder { previous: u64, found: u64 },
    #[error(
        "batch does not chain to the signed head at {sequence}: changes were altered, dropped or reordered"
    )]
    ChainMismatch { sequence: u64 },
    #[error("replayed batch: head at {got} is older than the {have} already held")]
    Replayed { have: u64, got: u64 },
    #[error("change {sequence} differs from the one already held: the feed forked")]
    Fork { sequence: u64 },
    #[error("malformed batch: {0}")]
    Malformed(String),
}

/// A change as carried in a batch: its number and the encoded record.
#[derive(Clone, Debug)]
pub struct Change<'a> {
    pub sequence: u64,
    pub record: &'a [u8],
}

/// Checks that `changes` continue a replica at (`have_seq`, `have_hash`) and
/// end at `head`. Changes at or below `have_seq` must match what is held
/// (`held_hash` returns the stored chain hash for a number). Returns the
/// chain hash after each new change, in order, for storage.
pub fn check_batch(
    have_seq: u64,
    have_hash: &[u8; 32],
    changes: &[Change<'_>],
    head: &Head,
    held_hash: impl Fn(u64) -> Option<[u8; 32]>,
) -> Result<Vec<(u64, [u8; 32])>, FeedError> {
    if head.sequence < have_seq {
        return Err(FeedError::Replayed {
            have: have_seq,
            got: head.sequence,
        });
    }
    let mut previous_seq = None;
    let mut hash = *have_hash;
    let mut started = false;
    let mut out = Vec::new();
    for change in changes {
        if let Some(p) = previous_seq
            && change.sequence != p + 1
        {
            return Err(FeedError::OutOfOrder {
                previous: p,
                found: change.sequence,
            });
        }
        previous_seq = Some(change.sequence);
        if change.sequence <= have_seq {
            // Overlap with what we hold: it must be the same history.
            let prev = if change.sequence == 1 {
                GENESIS_HASH
            } else {
                held_hash(change.sequence - 1).ok_or(FeedError::Fork {
                    sequence: change.sequence,
                })?
            };
            let h = chain_next(&prev, change.sequence, change.record);
            if Some(h) != held_hash(change.sequence) {
                return Err(FeedError::Fork {
                    sequence: change.sequence,
                });
            }
            continue;
        }
        if !started {
            if change.sequence != have_seq + 1 {
                return Err(FeedError::Gap {
                    expected: have_seq + 1,
                    first: change.sequence,
                });
            }
            started = true;
        }
        hash = chain_next(&hash, change.sequence, change.record);
        out.push((change.sequence, hash));
    }
    let end = out.last().map(|(s, _)| *s).unwrap_or(have_seq);
    if end != head.sequence || hash != head.chain_hash {
        return Err(FeedError::ChainMismatch {
            sequence: head.sequence,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(signer: &LogSigner, sequence: u64, chain_hash: [u8; 32]) -> Head {
        Head {
            issuer: signer.province(),
            sequence,
            chain_hash,
            time_ms: 1,
            keys_digest: [7; 32],
        }
    }

    #[test]
    fn chains_verify_and_forgeries_fail() {
        let p = Province::parse("440000").unwrap();
        let signer = LogSigner::generate(p, "node-1").unwrap();
        let records: Vec<Vec<u8>> = (1..=5u8).map(|i| vec![i; 10]).collect();
        let mut hashes = vec![GENESIS_HASH];
        for (i, r) in records.iter().enumerate() {
            let next = chain_next(hashes.last().unwrap(), i as u64 + 1, r);
            hashes.push(next);
        }
        let changes: Vec<Change<'_>> = records
            .iter()
            .enumerate()
            .map(|(i, r)| Change {
                sequence: i as u64 + 1,
                record: r,
            })
            .collect();
        let h = head(&signer, 5, hashes[5]);
        let sig = h.sign(&signer);
        h.verify(&sig, &signer.verifier_key()).unwrap();
        let none = |_| None;
        assert_eq!(
            check_batch(0, &GENESIS_HASH, &changes, &h, none)
                .unwrap()
                .len(),
            5
        );
        // Continue from 2, with an overlap of change 2 that matches.
        let held = |s: u64| hashes.get(s as usize).copied();
        assert_eq!(
            check_batch(2, &hashes[2], &changes[1..], &h, held)
                .unwrap()
                .len(),
            3
        );

        // Another key; a tampered head.
        let other = LogSigner::generate(p, "node-2").unwrap();
        assert!(h.verify(&sig, &other.verifier_key()).is_err());
        let mut forged = h.clone();
        forged.sequence = 6;
        assert!(forged.verify(&sig, &signer.verifier_key()).is_err());

        // Altered record, reordered, gap, replay.
        let altered = [vec![9u8; 10]];
        let mut bad = changes.clone();
        bad[2] = Change {
            sequence: 3,
            record: &altered[0],
        };
        assert!(matches!(
            check_batch(0, &GENESIS_HASH, &bad, &h, none),
            Err(FeedError::ChainMismatch { .. })
        ));
        let mut swapped = changes.clone();
        swapped.swap(1, 2);
        assert!(matches!(
            check_batch(0, &GENESIS_HASH, &swapped, &h, none),
            Err(FeedError::OutOfOrder { .. })
        ));
        assert!(matches!(
            check_batch(1, &hashes[1], &changes[3..], &h, held),
            Err(FeedError::Gap {
                expected: 2,
                first: 4
            })
        ));
        let old = head(&signer, 3, hashes[3]);
        assert!(matches!(
            check_batch(5, &hashes[5], &changes[..3], &old, held),
            Err(FeedError::Replayed { .. })
        ));
        // A heartbeat: no changes, head equal to what is held.
        assert!(
            check_batch(5, &hashes[5], &[], &h, held)
                .unwrap()
                .is_empty()
        );
    }
}
