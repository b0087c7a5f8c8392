//! The Merkle tree of a batch signature (RFC 6962 shape, RFC 9162 section 2.1).
//!
//! Leaves are `SHA-256(0x00 || domain prefix || payload)`, interior nodes
//! `SHA-256(0x01 || left || right)`; a tree of `n` leaves splits at the largest power of
//! two below `n`. The signer signs the root once; each item carries its audit path.
//!
//! Invariant: every count and index here is checked; a proof that claims more levels
//! than its tree can have, or a leaf outside the tree, is refused before any hashing.

use ring::digest::{Context, SHA256};

/// The largest batch a signer makes and a verifier accepts (2^20 items).
pub const MAX_TREE_SIZE: u64 = 1 << 20;

/// A 32-byte SHA-256 value.
pub type Hash = [u8; 32];

fn finish(context: Context) -> Hash {
    let mut out = [0u8; 32];
    out.copy_from_slice(context.finish().as_ref());
    out
}

/// The hash of one leaf: its domain prefix and payload.
pub fn leaf_hash(domain_prefix: &[u8], payload: &[u8]) -> Hash {
    let mut context = Context::new(&SHA256);
    context.update(&[0x00]);
    context.update(domain_prefix);
    context.update(payload);
    finish(context)
}

/// The hash of an interior node.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut context = Context::new(&SHA256);
    context.update(&[0x01]);
    context.update(left);
    context.update(right);
    finish(context)
}

/// The largest power of two strictly below `n` (n ≥ 2).
fn split_point(n: usize) -> usize {
    debug_assert!(n >= 2);
    let mut k = 1;
    while k * 2 < n {
        k *= 2;
    }
    k
}

/// The root of the tree over `leaves` and, for each leaf, its audit path (leaf to
/// root). `leaves` must not be empty.
pub fn root_and_paths(leaves: &[Hash]) -> (Hash, Vec<Vec<Hash>>) {
    let mut paths = vec![Vec::new(); leaves.len()];
    let root = build(leaves, &mut paths);
    (root, paths)
}

/// Computes the subtree root over `leaves` and appends, to the path of each leaf in
/// it, the sibling hashes from this level down (callers add their levels afterwards,
/// so paths end up leaf first).
fn build(leaves: &[Hash], paths: &mut [Vec<Hash>]) -> Hash {
    match leaves.len() {
        0 => [0u8; 32],
        1 => leaves[0],
        n => {
            let k = split_point(n);
            let (left_leaves, right_leaves) = leaves.split_at(k);
            let (left_paths, right_paths) = paths.split_at_mut(k);
            let left = build(left_leaves, left_paths);
            let right = build(right_leaves, right_paths);
            for path in left_paths.iter_mut() {
                path.push(right);
            }
            for path in right_paths.iter_mut() {
                path.push(left);
            }
            node_hash(&left, &right)
        }
    }
}

/// Why an inclusion proof does not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("the batch's tree size must be 2 to {MAX_TREE_SIZE}")]
    TreeSize,
    #[error("the leaf index is outside the batch")]
    LeafIndex,
    #[error("an audit path entry is not 32 bytes")]
    PathEntry,
    #[error("the audit path does not fit the tree size")]
    PathLength,
}

/// The root an inclusion proof leads to (RFC 9162 section 2.1.3.2), for the caller to
/// check against the signed root.
pub fn root_from_path(
    leaf: Hash,
    leaf_index: u64,
    tree_size: u64,
    path: &[Vec<u8>],
) -> Result<Hash, ProofError> {
    if !(2..=MAX_TREE_SIZE).contains(&tree_size) {
        return Err(ProofError::TreeSize);
    }
    if leaf_index >= tree_size {
        return Err(ProofError::LeafIndex);
    }
    // A tree of at most 2^20 leaves has at most 20 levels.
    if path.len() > 64 {
        return Err(ProofError::PathLength);
    }
    let mut index = leaf_index;
    let mut last = tree_size - 1;
    let mut hash = leaf;
    for entry in path {
        let sibling: Hash = entry
            .as_slice()
            .try_into()
            .map_err(|_| ProofError::PathEntry)?;
        if last == 0 {
            return Err(ProofError::PathLength);
        }
        if index & 1 == 1 || index == last {
            hash = node_hash(&sibling, &hash);
            if index & 1 == 0 {
                while index & 1 == 0 && index != 0 {
                    index >>= 1;
                    last >>= 1;
                }
            }
        } else {
            hash = node_hash(&hash, &sibling);
        }
        index >>= 1;
        last >>= 1;
    }
    if last != 0 {
        return Err(ProofError::PathLength);
    }
    Ok(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n)
            .map(|i| leaf_hash(b"p\0", &(i as u64).to_be_bytes()))
            .collect()
    }

    /// RFC 6962's MTH written directly from its definition.
    fn reference_root(leaves: &[Hash]) -> Hash {
        if leaves.len() == 1 {
            return leaves[0];
        }
        let k = split_point(leaves.len());
        node_hash(&reference_root(&leaves[..k]), &reference_root(&leaves[k..]))
    }

    #[test]
    fn every_leaf_of_every_size_proves_the_root() {
        for n in 1..=70 {
            let leaves = leaves(n);
            let (root, paths) = root_and_paths(&leaves);
            assert_eq!(root, reference_root(&leaves), "size {n}");
            if n == 1 {
                assert!(paths[0].is_empty());
                continue;
            }
            for (i, path) in paths.iter().enumerate() {
                let path: Vec<Vec<u8>> = path.iter().map(|h| h.to_vec()).collect();
                let got = root_from_path(leaves[i], i as u64, n as u64, &path).unwrap();
                assert_eq!(got, root, "size {n} leaf {i}");
            }
        }
    }

    #[test]
    fn a_proof_for_another_place_or_size_fails() {
        let leaves = leaves(13);
        let (root, paths) = root_and_paths(&leaves);
        let path: Vec<Vec<u8>> = paths[5].iter().map(|h| h.to_vec()).collect();
        // Another leaf's hash or another index: another root or an error.
        assert_ne!(root_from_path(leaves[6], 5, 13, &path).unwrap(), root);
        assert_ne!(root_from_path(leaves[5], 4, 13, &path).ok(), Some(root));
        // A size with another number of levels does not fit the path; the signed
        // message binds the size too (signing::batch_root_message).
        assert_eq!(
            root_from_path(leaves[5], 5, 17, &path),
            Err(ProofError::PathLength)
        );
        assert_eq!(
            root_from_path(leaves[5], 13, 13, &path),
            Err(ProofError::LeafIndex)
        );
        assert_eq!(
            root_from_path(leaves[5], 0, 1, &[]),
            Err(ProofError::TreeSize)
        );
        let mut short = path.clone();
        short.pop();
        assert_eq!(
            root_from_path(leaves[5], 5, 13, &short),
            Err(ProofError::PathLength)
        );
        let mut long = path.clone();
        long.push(vec![0u8; 32]);
        assert_eq!(
            root_from_path(leaves[5], 5, 13, &long),
            Err(ProofError::PathLength)
        );
        let mut bad = path;
        bad[0] = vec![0u8; 31];
        assert_eq!(
            root_from_path(leaves[5], 5, 13, &bad),
            Err(ProofError::PathEntry)
        );
    }
}
