//! A province's compacted change log, as its issuer signs it.
//!
//! A province may compact the older part of its feed: of the changes up to
//! some number `through`, only each holder's latest (and each legacy
//! code's current binding) stays, each with the number it had. The chain
//! hashes of the dropped changes cannot be recomputed any more, so the
//! issuer states, with its log key, what the compacted part is:
//!
//! ```text
//! hufu.feed-snapshot/v1
//! <issuer>
//! <through>
//! <chain hash after change `through`, base64>
//! <number of changes kept>
//! <digest of the changes kept, base64>
//! ```
//!
//! The digest is SHA-256 over each kept change in order, as its number (8
//! bytes, big-endian), its length (4 bytes, big-endian) and its bytes. A
//! node that installs the kept changes checks them against the statement
//! ([`KeptDigest`]), then follows the feed from `through + 1`, whose
//! changes chain from the stated hash to the issuer's signed heads as
//! before. The statement is the issuer's, so any node holding it can serve
//! the snapshot to a new member or a node that fell behind.

use aws_lc_rs::digest::{Context, SHA256};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hufu_certs::Province;

use crate::audit::LogSigner;
use crate::feed::{FeedError, verify_signed_text};

/// First line of every snapshot statement: domain separation from feed
/// heads, checkpoints and cosignatures made with the same key.
pub const SNAPSHOT_LABEL: &str = "hufu.feed-snapshot/v1\n";

/// What a snapshot statement says: "province `issuer`'s changes up to
/// `through` chain to `chain_hash`; of them, the `kept` changes that
/// hash to `digest` are the ones that still count".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotStatement {
    pub issuer: Province,
    pub through: u64,
    pub chain_hash: [u8; 32],
    pub kept: u64,
    pub digest: [u8; 32],
}

impl SnapshotStatement {
    /// The exact text that is signed.
    pub fn text(&self) -> String {
        format!(
            "{SNAPSHOT_LABEL}{}\n{}\n{}\n{}\n{}\n",
            self.issuer,
            self.through,
            STANDARD.encode(self.chain_hash),
            self.kept,
            STANDARD.encode(self.digest)
        )
    }

    pub fn sign(&self, signer: &LogSigner) -> Vec<u8> {
        signer.sign_feed_snapshot(&self.text())
    }

    /// Checks `signature` against the issuer's log key from the trust list.
    pub fn verify(&self, signature: &[u8], log_key: &str) -> Result<(), FeedError> {
        verify_signed_text(&self.text(), signature, log_key, self.issuer, self.through)
    }
}

/// The digest of kept changes, taken as they stream by, in order.
pub struct KeptDigest {
    context: Context,
    count: u64,
    last: u64,
}

impl Default for KeptDigest {
    fn default() -> Self {
        KeptDigest {
            context: Context::new(&SHA256),
            count: 0,
            last: 0,
        }
    }
}

impl KeptDigest {
    /// Adds change `sequence`: numbers must rise.
    pub fn add(&mut self, sequence: u64, record: &[u8]) -> Result<(), FeedError> {
        if sequence <= self.last {
            return Err(FeedError::OutOfOrder {
                previous: self.last,
                found: sequence,
            });
        }
        let len = u32::try_from(record.len())
            .map_err(|_| FeedError::Malformed(format!("change {sequence} is too large")))?;
        self.context.update(&sequence.to_be_bytes());
        self.context.update(&len.to_be_bytes());
        self.context.update(record);
        self.count += 1;
        self.last = sequence;
        Ok(())
    }

    /// The number of changes added and their digest.
    pub fn finish(self) -> (u64, [u8; 32]) {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.context.finish().as_ref());
        (self.count, out)
    }

    /// Checks that the changes added are those `statement` speaks of.
    pub fn check(self, statement: &SnapshotStatement) -> Result<(), FeedError> {
        let last = self.last;
        let (count, digest) = self.finish();
        if last > statement.through || count != statement.kept || digest != statement.digest {
            return Err(FeedError::ChainMismatch {
                sequence: statement.through,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_statement_verifies_and_its_kept_changes_check() {
        let p = Province::parse("440000").unwrap();
        let signer = LogSigner::generate(p, "node-1").unwrap();
        let kept = [(2u64, b"two".to_vec()), (5, b"five".to_vec())];
        let mut digest = KeptDigest::default();
        for (s, r) in &kept {
            digest.add(*s, r).unwrap();
        }
        let (count, digest) = digest.finish();
        let statement = SnapshotStatement {
            issuer: p,
            through: 6,
            chain_hash: [9; 32],
            kept: count,
            digest,
        };
        let signature = statement.sign(&signer);
        statement
            .verify(&signature, &signer.verifier_key())
            .unwrap();
        let mut forged = statement.clone();
        forged.through = 7;
        assert!(forged.verify(&signature, &signer.verifier_key()).is_err());

        // The same changes check; one dropped, altered or reordered fails.
        let check = |changes: &[(u64, &[u8])]| {
            let mut d = KeptDigest::default();
            for (s, r) in changes {
                d.add(*s, r)?;
            }
            d.check(&statement)
        };
        check(&[(2, b"two"), (5, b"five")]).unwrap();
        assert!(check(&[(5, b"five")]).is_err());
        assert!(check(&[(2, b"two"), (5, b"FIVE")]).is_err());
        assert!(check(&[(5, b"five"), (2, b"two")]).is_err());
    }
}
