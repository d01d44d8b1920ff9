//! RFC 6962 hashing and proofs, on top of `tlog_tiles`.
//!
//! Leaves are `SHA-256(0x00 || entry)`, inner nodes `SHA-256(0x01 || left ||
//! right)`. Proofs are RFC 6962 audit paths and consistency proofs, lists of
//! hashes; checking one needs only the sizes and roots it joins.

use std::collections::BTreeMap;

use tlog_tiles::{Hash, HashReader};

use super::{AuditError, TreeHash};

/// The root of the empty tree: SHA-256 of nothing.
pub const EMPTY_ROOT: TreeHash = TreeHash(tlog_tiles::EMPTY_HASH.0);

/// Most hashes a proof may hold. A proof in a tree of 2^63 leaves has fewer
/// than 2 × 64; a longer one is refused before any work is done on it.
pub(crate) const MAX_PROOF_HASHES: usize = 130;

impl From<Hash> for TreeHash {
    fn from(h: Hash) -> TreeHash {
        TreeHash(h.0)
    }
}

impl From<TreeHash> for Hash {
    fn from(h: TreeHash) -> Hash {
        Hash(h.0)
    }
}

/// The leaf hash of an encoded entry.
pub fn leaf_hash(entry: &[u8]) -> TreeHash {
    tlog_tiles::record_hash(entry).into()
}

/// Checks that `proof` shows the leaf `leaf` at `index` in the tree of
/// `tree_size` leaves with root `root`.
pub fn verify_inclusion(
    proof: &[TreeHash],
    index: u64,
    leaf: TreeHash,
    tree_size: u64,
    root: TreeHash,
) -> Result<(), AuditError> {
    if index >= tree_size {
        return Err(AuditError::InvalidProof(format!(
            "entry {index} cannot be in a tree of size {tree_size}"
        )));
    }
    let proof = to_tlog(proof)?;
    tlog_tiles::check_record(&proof, tree_size, root.into(), index, leaf.into()).map_err(|_| {
        AuditError::InvalidProof(format!(
            "the proof does not show this entry at index {index} in the tree of size {tree_size} with root {root}"
        ))
    })
}

/// Checks that `proof` shows the tree of `old_size` leaves with root
/// `old_root` to be a prefix of the tree of `new_size` with `new_root`.
/// From the empty tree the proof is empty; between equal sizes it is empty
/// and the roots are equal.
pub fn verify_consistency(
    proof: &[TreeHash],
    old_size: u64,
    old_root: TreeHash,
    new_size: u64,
    new_root: TreeHash,
) -> Result<(), AuditError> {
    let invalid = |reason: String| Err(AuditError::InvalidProof(reason));
    if old_size > new_size {
        return invalid(format!(
            "the tree shrank from size {old_size} to {new_size}"
        ));
    }
    if old_size == 0 {
        if old_root != EMPTY_ROOT {
            return invalid(format!(
                "the root of the empty tree is {EMPTY_ROOT}, not {old_root}"
            ));
        }
        if !proof.is_empty() {
            return invalid("a proof from the empty tree is empty".into());
        }
        return Ok(());
    }
    let proof = to_tlog(proof)?;
    tlog_tiles::check_tree(&proof, new_size, new_root.into(), old_size, old_root.into()).map_err(
        |_| {
            AuditError::InvalidProof(if old_size == new_size {
                format!("two different roots for size {new_size}: {old_root} and {new_root}")
            } else {
                format!(
                    "the proof does not show the tree of size {old_size} (root {old_root}) to be a prefix of the tree of size {new_size} (root {new_root})"
                )
            })
        },
    )
}

fn to_tlog(proof: &[TreeHash]) -> Result<Vec<Hash>, AuditError> {
    if proof.len() > MAX_PROOF_HASHES {
        return Err(AuditError::InvalidProof(format!(
            "{} hashes, more than any proof needs ({MAX_PROOF_HASHES})",
            proof.len()
        )));
    }
    Ok(proof.iter().map(|&h| h.into()).collect())
}

/// The root of a tree grown one leaf at a time, in O(log n) memory: only the
/// hashes of its maximal complete subtrees are kept, which is all that
/// appending and the root need. The offline verifier streams entries
/// through it.
#[derive(Debug, Default)]
pub(crate) struct Frontier {
    size: u64,
    /// Stored-hash index (tlog layout) to hash.
    hashes: BTreeMap<u64, Hash>,
}

/// Records what `tlog_tiles` reads, so that hashes nobody will read again
/// can be dropped.
struct Recorder<'a> {
    frontier: &'a Frontier,
    read: std::cell::RefCell<Vec<u64>>,
}

impl HashReader for Recorder<'_> {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
        self.read.borrow_mut().extend_from_slice(indexes);
        self.frontier.read_hashes(indexes)
    }
}

impl HashReader for Frontier {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
        indexes
            .iter()
            .map(|i| {
                self.hashes
                    .get(i)
                    .copied()
                    .ok_or(tlog_tiles::Error::IndexesNotInTree)
            })
            .collect()
    }
}

impl Frontier {
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    pub(crate) fn push(&mut self, leaf: TreeHash) {
        let n = self.size;
        let recorder = Recorder {
            frontier: self,
            read: Default::default(),
        };
        // Appending reads only the complete subtrees left of the new leaf,
        // which the frontier holds by construction.
        let new = tlog_tiles::stored_hashes_for_record_hash(n, leaf.into(), &recorder)
            .expect("the frontier holds every subtree an append reads");
        let read = recorder.read.into_inner();
        for index in read {
            self.hashes.remove(&index);
        }
        // Of the new hashes (the leaf, then each subtree it completes) only
        // the last is a maximal subtree; the others are inside it.
        let top = tlog_tiles::stored_hash_index(0, n) + new.len() as u64 - 1;
        let top_hash = *new.last().expect("an append stores at least the leaf");
        self.hashes.insert(top, top_hash);
        self.size += 1;
        debug_assert_eq!(self.hashes.len() as u32, self.size.count_ones());
    }

    pub(crate) fn root(&self) -> TreeHash {
        tlog_tiles::tree_hash(self.size, self)
            .expect("the frontier holds the maximal subtrees the root is made of")
            .into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontier_roots_match_rfc6962_test_vectors() {
        // The roots of the 8-leaf test tree of RFC 6962's reference code
        // (certificate-transparency-go merkletree tests), leaves as given.
        let leaves: [&[u8]; 8] = [
            b"",
            b"\x00",
            b"\x10",
            b"\x20\x21",
            b"\x30\x31",
            b"\x40\x41\x42\x43",
            b"\x50\x51\x52\x53\x54\x55\x56\x57",
            b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
        ];
        let roots = [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
        ];
        assert_eq!(Frontier::default().root(), EMPTY_ROOT);
        let mut frontier = Frontier::default();
        for (leaf, root) in leaves.iter().zip(roots) {
            frontier.push(leaf_hash(leaf));
            let hex: String = frontier
                .root()
                .0
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(hex, root, "size {}", frontier.size());
        }
    }
}
