//! The ledger's Merkle tree, as Certificate Transparency logs build theirs (RFC 6962 §2.1;
//! verification as in RFC 9162 §2.1.3–2.1.4): leaf hash SHA-256(0x00 ‖ entry), node hash
//! SHA-256(0x01 ‖ left ‖ right). Every complete subtree's hash is kept, so roots and proofs
//! for any tree size cost O(log² n) hashes.

use ring::digest::{Context, SHA256};

pub type Hash = [u8; 32];

fn finish(ctx: Context) -> Hash {
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

pub fn leaf_hash(entry: &[u8]) -> Hash {
    let mut ctx = Context::new(&SHA256);
    ctx.update(&[0]);
    ctx.update(entry);
    finish(ctx)
}

pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut ctx = Context::new(&SHA256);
    ctx.update(&[1]);
    ctx.update(left);
    ctx.update(right);
    finish(ctx)
}

/// A hash from its hex form, if it is exactly 32 bytes of hex.
pub fn parse_hash(hex_text: &str) -> Option<Hash> {
    let mut h = [0u8; 32];
    hex::decode_to_slice(hex_text, &mut h).ok().map(|_| h)
}

/// The root of the empty tree: SHA-256 of nothing.
pub fn empty_root() -> Hash {
    finish(Context::new(&SHA256))
}

/// The largest power of two strictly below `n` (n ≥ 2).
fn split(n: u64) -> u64 {
    1 << (63 - (n - 1).leading_zeros())
}

/// `levels[h][i]` is the hash of the complete subtree over leaves `i·2^h .. (i+1)·2^h`.
#[derive(Debug, Clone, Default)]
pub struct Tree {
    levels: Vec<Vec<Hash>>,
}

impl Tree {
    pub fn len(&self) -> u64 {
        self.levels.first().map_or(0, |l| l.len() as u64)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The leaf hash at `index`.
    pub fn leaf(&self, index: u64) -> Hash {
        self.levels[0][index as usize]
    }

    pub fn push(&mut self, leaf: Hash) {
        if self.levels.is_empty() {
            self.levels.push(Vec::new());
        }
        self.levels[0].push(leaf);
        let mut h = 0;
        while self.levels[h].len() % 2 == 0 {
            let n = self.levels[h].len();
            let parent = node_hash(&self.levels[h][n - 2], &self.levels[h][n - 1]);
            if self.levels.len() == h + 1 {
                self.levels.push(Vec::new());
            }
            self.levels[h + 1].push(parent);
            h += 1;
        }
    }

    /// MTH(D[start..end]), for the ranges RFC 6962's recursions visit.
    fn subtree(&self, start: u64, end: u64) -> Hash {
        let n = end - start;
        if n.is_power_of_two() && start % n == 0 {
            return self.levels[n.trailing_zeros() as usize][(start / n) as usize];
        }
        let k = split(n);
        node_hash(
            &self.subtree(start, start + k),
            &self.subtree(start + k, end),
        )
    }

    /// The root of the tree's first `size` leaves.
    pub fn root(&self, size: u64) -> Hash {
        assert!(
            size <= self.len(),
            "tree size {size} beyond {} leaves",
            self.len()
        );
        if size == 0 {
            empty_root()
        } else {
            self.subtree(0, size)
        }
    }

    /// PATH(index, D[0..size]): the audit path for one leaf.
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Vec<Hash> {
        assert!(index < size && size <= self.len());
        let mut out = Vec::new();
        self.path(index, 0, size, &mut out);
        out
    }

    fn path(&self, m: u64, start: u64, end: u64, out: &mut Vec<Hash>) {
        let n = end - start;
        if n == 1 {
            return;
        }
        let k = split(n);
        if m < k {
            self.path(m, start, start + k, out);
            out.push(self.subtree(start + k, end));
        } else {
            self.path(m - k, start + k, end, out);
            out.push(self.subtree(start, start + k));
        }
    }

    /// PROOF(old, D[0..new]): shows the tree of size `new` extends the tree of size `old`.
    pub fn consistency_proof(&self, old: u64, new: u64) -> Vec<Hash> {
        assert!(old <= new && new <= self.len());
        let mut out = Vec::new();
        if old > 0 && old < new {
            self.subproof(old, 0, new, true, &mut out);
        }
        out
    }

    fn subproof(&self, m: u64, start: u64, end: u64, whole: bool, out: &mut Vec<Hash>) {
        let n = end - start;
        if m == n {
            if !whole {
                out.push(self.subtree(start, end));
            }
            return;
        }
        let k = split(n);
        if m <= k {
            self.subproof(m, start, start + k, whole, out);
            out.push(self.subtree(start + k, end));
        } else {
            self.subproof(m - k, start + k, end, false, out);
            out.push(self.subtree(start, start + k));
        }
    }
}

/// RFC 9162 §2.1.3.2.
pub fn verify_inclusion(index: u64, size: u64, leaf: &Hash, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut f, mut s) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if s == 0 {
            return false;
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
    s == 0 && r == *root
}

/// RFC 9162 §2.1.4.2.
pub fn verify_consistency(
    old: u64,
    new: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> bool {
    if old > new {
        return false;
    }
    if old == new {
        return proof.is_empty() && old_root == new_root;
    }
    if old == 0 {
        return proof.is_empty();
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if old.is_power_of_two() {
        path.push(*old_root);
    }
    path.extend_from_slice(proof);
    let Some((first, rest)) = path.split_first() else {
        return false;
    };
    let (mut f, mut s) = (old - 1, new - 1);
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let (mut fr, mut sr) = (*first, *first);
    for c in rest {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        f >>= 1;
        s >>= 1;
    }
    fr == *old_root && sr == *new_root && s == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6962's MTH written as the definition reads, as the reference.
    fn naive(leaves: &[Hash]) -> Hash {
        match leaves.len() {
            0 => empty_root(),
            1 => leaves[0],
            n => {
                let k = split(n as u64) as usize;
                node_hash(&naive(&leaves[..k]), &naive(&leaves[k..]))
            }
        }
    }

    fn tree(n: u64) -> (Tree, Vec<Hash>) {
        let mut t = Tree::default();
        let leaves: Vec<Hash> = (0..n).map(|i| leaf_hash(&i.to_le_bytes())).collect();
        for l in &leaves {
            t.push(*l);
        }
        (t, leaves)
    }

    #[test]
    fn roots_match_the_definition_at_every_size() {
        let (t, leaves) = tree(70);
        for size in 0..=70 {
            assert_eq!(t.root(size), naive(&leaves[..size as usize]), "size {size}");
        }
    }

    #[test]
    fn every_inclusion_proof_verifies_and_a_wrong_one_does_not() {
        let (t, leaves) = tree(40);
        for size in 1..=40 {
            let root = t.root(size);
            for i in 0..size {
                let proof = t.inclusion_proof(i, size);
                assert!(
                    verify_inclusion(i, size, &leaves[i as usize], &proof, &root),
                    "{i}/{size}"
                );
                let other = leaves[((i + 1) % size) as usize];
                if size > 1 {
                    assert!(!verify_inclusion(i, size, &other, &proof, &root));
                }
                if let Some(first) = proof.first() {
                    let mut bad = proof.clone();
                    bad[0] = node_hash(first, first);
                    assert!(!verify_inclusion(i, size, &leaves[i as usize], &bad, &root));
                }
            }
        }
    }

    #[test]
    fn every_consistency_proof_verifies_and_a_forked_tree_does_not() {
        let (t, _) = tree(40);
        for new in 1..=40 {
            for old in 1..=new {
                let proof = t.consistency_proof(old, new);
                assert!(
                    verify_consistency(old, new, &t.root(old), &t.root(new), &proof),
                    "{old}->{new}"
                );
            }
        }
        // A history rewritten at leaf 3 is not an extension of the original.
        let (mut forked, mut leaves) = tree(3);
        leaves.push(leaf_hash(b"rewritten"));
        forked.push(leaves[3]);
        for i in 4..20u64 {
            forked.push(leaf_hash(&i.to_le_bytes()));
        }
        let proof = forked.consistency_proof(5, 20);
        assert!(!verify_consistency(
            5,
            20,
            &t.root(5),
            &forked.root(20),
            &proof
        ));
    }
}
