//! Merkle trees of signed batches (`docs/security.md`, "Batch
//! signatures"): SHA-256, RFC 6962 / RFC 9162 §2.1 — a leaf hashes as
//! `SHA-256(0x00 ‖ data)`, a node as `SHA-256(0x01 ‖ left ‖ right)`, and a
//! tree of `n > 1` leaves splits at the largest power of two below `n`.
//! Inclusion proofs are the RFC's audit paths, verified with RFC 9162
//! §2.1.3.2.
//!
//! Written here rather than taken from a crate: `ct-merkle` (the RFC 6962
//! crate) needs `digest`/`sha2` 0.11 while the workspace has 0.10, and
//! building every proof of a batch at once is a few lines.

use base64::Engine as _;
use sha2::{Digest, Sha256};

/// A SHA-256 hash.
pub type Hash = [u8; 32];

/// `SHA-256(0x00 ‖ data)`: the hash of a leaf whose data is `data`.
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(data);
    h.finalize().into()
}

/// `SHA-256(0x01 ‖ left ‖ right)`: the hash of an inner node.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The largest power of two smaller than `n` (`n > 1`).
fn split(n: usize) -> usize {
    let mut k = 1;
    while k * 2 < n {
        k *= 2;
    }
    k
}

/// The root over `leaves` (leaf hashes) and every leaf's audit path, built
/// together: `n - 1` node hashes in all.
fn build(leaves: &[Hash], paths: &mut [Vec<Hash>]) -> Hash {
    if leaves.len() == 1 {
        return leaves[0];
    }
    let k = split(leaves.len());
    let (left_paths, right_paths) = paths.split_at_mut(k);
    let left = build(&leaves[..k], left_paths);
    let right = build(&leaves[k..], right_paths);
    for path in left_paths {
        path.push(right);
    }
    for path in right_paths {
        path.push(left);
    }
    node_hash(&left, &right)
}

/// A tree over a batch's leaves: its root and each leaf's inclusion proof.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    /// The root hash (`MTH` of RFC 6962).
    pub root: Hash,
    /// The inclusion proof of each leaf, in leaf order.
    pub proofs: Vec<Proof>,
}

impl Tree {
    /// The tree over the leaves whose data are `leaves` (each hashed with
    /// [`leaf_hash`]); `None` for no leaves.
    pub fn new<T: AsRef<[u8]>>(leaves: &[T]) -> Option<Self> {
        if leaves.is_empty() {
            return None;
        }
        let hashes: Vec<Hash> = leaves.iter().map(|l| leaf_hash(l.as_ref())).collect();
        let mut paths = vec![Vec::new(); hashes.len()];
        let root = build(&hashes, &mut paths);
        let size = hashes.len() as u64;
        let proofs = paths
            .into_iter()
            .enumerate()
            .map(|(index, path)| Proof {
                index: index as u64,
                size,
                path,
            })
            .collect();
        Some(Self { root, proofs })
    }
}

/// An inclusion proof: a leaf's index, the tree's size and the audit path
/// (sibling hashes from the leaf up).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proof {
    /// The leaf's index, from 0.
    pub index: u64,
    /// How many leaves the tree has.
    pub size: u64,
    /// The audit path, leaf to root.
    pub path: Vec<Hash>,
}

/// A `Mesh-Batch-Proof` that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an inclusion proof: {0}")]
pub struct InvalidProof(&'static str);

impl Proof {
    /// The header form: `<index>.<size>.<path>`, the path the sibling
    /// hashes' 32 bytes each, concatenated, in unpadded base64url
    /// (RFC 4648 §5). Only `[0-9A-Za-z._-]`: safe in any header.
    pub fn encode(&self) -> String {
        let mut bytes = Vec::with_capacity(self.path.len() * 32);
        for hash in &self.path {
            bytes.extend_from_slice(hash);
        }
        format!(
            "{}.{}.{}",
            self.index,
            self.size,
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        )
    }

    /// Parses [`Proof::encode`]'s form.
    pub fn decode(text: &str) -> Result<Self, InvalidProof> {
        let mut parts = text.trim().splitn(3, '.');
        let (Some(index), Some(size), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(InvalidProof("want `<index>.<size>.<path>`"));
        };
        let number = |s: &str| {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(InvalidProof("index and size are decimal"));
            }
            s.parse::<u64>()
                .map_err(|_| InvalidProof("index or size too large"))
        };
        let (index, size) = (number(index)?, number(size)?);
        if index >= size {
            return Err(InvalidProof("index not below size"));
        }
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(path)
            .map_err(|_| InvalidProof("path is not unpadded base64url"))?;
        if bytes.len() % 32 != 0 || bytes.len() / 32 > 64 {
            return Err(InvalidProof("path is not whole SHA-256 hashes"));
        }
        let path = bytes
            .chunks_exact(32)
            .map(|c| {
                let mut hash = [0u8; 32];
                hash.copy_from_slice(c);
                hash
            })
            .collect();
        Ok(Self { index, size, path })
    }

    /// The root this proof leads to from the leaf whose data is `leaf`
    /// (RFC 9162 §2.1.3.2); `None` when the path does not fit the index
    /// and size.
    pub fn root(&self, leaf: &[u8]) -> Option<Hash> {
        if self.index >= self.size {
            return None;
        }
        let (mut f, mut s) = (self.index, self.size - 1);
        let mut r = leaf_hash(leaf);
        for p in &self.path {
            if s == 0 {
                return None;
            }
            if f & 1 == 1 || f == s {
                r = node_hash(p, &r);
                while f & 1 == 0 && f != 0 {
                    f >>= 1;
                    s >>= 1;
                }
            } else {
                r = node_hash(&r, p);
            }
            f >>= 1;
            s >>= 1;
        }
        (s == 0).then_some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(hash: &Hash) -> String {
        hash.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The leaves and roots of the RFC 6962 reference implementation's
    /// tests (certificate-transparency `merkle_tree_test.cc`).
    const LEAVES: [&str; 8] = [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ];
    const ROOTS: [&str; 8] = [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn roots_match_the_rfc_6962_test_vectors() {
        let leaves: Vec<Vec<u8>> = LEAVES.iter().map(|l| unhex(l)).collect();
        for n in 1..=8 {
            let tree = Tree::new(&leaves[..n]).unwrap();
            assert_eq!(hex(&tree.root), ROOTS[n - 1], "{n} leaves");
            for (i, proof) in tree.proofs.iter().enumerate() {
                assert_eq!(
                    proof.root(&leaves[i]),
                    Some(tree.root),
                    "{n} leaves, leaf {i}"
                );
            }
        }
        assert!(Tree::new::<&[u8]>(&[]).is_none());
    }

    #[test]
    fn every_proof_of_odd_and_even_trees_verifies_and_round_trips() {
        for n in [1usize, 2, 3, 5, 7, 16, 17, 63, 100, 256] {
            let leaves: Vec<Vec<u8>> = (0..n).map(|i| format!("leaf {i}").into_bytes()).collect();
            let tree = Tree::new(&leaves).unwrap();
            for (i, proof) in tree.proofs.iter().enumerate() {
                let text = proof.encode();
                assert!(
                    text.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
                    "{text}"
                );
                let again = Proof::decode(&text).unwrap();
                assert_eq!(&again, proof);
                assert_eq!(again.root(&leaves[i]), Some(tree.root));
                // Another leaf does not lead to the root.
                assert_ne!(
                    again.root(&leaves[(i + 1) % n]),
                    Some(tree.root).filter(|_| n > 1)
                );
            }
        }
    }

    #[test]
    fn a_single_leaf_is_its_own_root_with_an_empty_path() {
        let tree = Tree::new(&[b"only"]).unwrap();
        assert_eq!(tree.root, leaf_hash(b"only"));
        assert_eq!(tree.proofs[0].encode(), "0.1.");
        assert_eq!(
            Proof::decode("0.1.").unwrap().root(b"only"),
            Some(tree.root)
        );
    }

    #[test]
    fn tampered_proofs_do_not_lead_to_the_root() {
        let leaves: Vec<Vec<u8>> = (0..11).map(|i| vec![i as u8; 3]).collect();
        let tree = Tree::new(&leaves).unwrap();
        let proof = &tree.proofs[6];
        // A flipped bit in a sibling hash.
        let mut bad = proof.clone();
        bad.path[1][0] ^= 1;
        assert_ne!(bad.root(&leaves[6]), Some(tree.root));
        // Another index: a different root.
        for index in [5, 7] {
            let moved = Proof {
                index,
                ..proof.clone()
            };
            assert_ne!(moved.root(&leaves[6]), Some(tree.root), "{index}");
        }
        // Another size may fold the same path to the same root (leaf 6 sits
        // alike in trees of 10, 11 and 12 leaves): the size is bound by the
        // batch signature (`signing::batch_bytes`), not by the path.
        for size in [10, 12] {
            let resized = Proof {
                size,
                ..proof.clone()
            };
            assert_eq!(resized.root(&leaves[6]), Some(tree.root), "{size}");
        }
        let resized = Proof {
            size: 7,
            ..proof.clone()
        };
        assert_eq!(resized.root(&leaves[6]), None);
        // A path one hash short or long.
        let mut short = proof.clone();
        short.path.pop();
        assert_eq!(short.root(&leaves[6]), None);
        let mut long = proof.clone();
        long.path.push([0; 32]);
        assert_eq!(long.root(&leaves[6]), None);
        // Malformed text.
        for text in [
            "", "1", "1.2", "2.2.", "a.2.", "0.2.!!", "0.2.AAAA", "-1.2.",
        ] {
            assert!(Proof::decode(text).is_err(), "{text}");
        }
    }
}
