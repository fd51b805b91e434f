//! LUKS's anti-forensic splitter: a key is stored as `stripes` blocks
//! whose hash-diffused XOR chain gives it back, so wiping any one block
//! destroys it.

use super::Hash;
use zeroize::Zeroizing;

/// Diffuses `block` in place: each digest-sized piece `i` becomes
/// H(be32(i) || piece), the last piece truncated.
pub(super) fn diffuse(hash: Hash, block: &mut [u8]) {
    let n = hash.digest_len();
    for (i, piece) in block.chunks_mut(n).enumerate() {
        let d = Zeroizing::new(hash.digest(&[&(i as u32).to_be_bytes(), piece]));
        piece.copy_from_slice(&d[..piece.len()]);
    }
}

/// Recovers a `key_len`-byte key from its `stripes` stripes in `split`
/// (whose length the caller checked to be `key_len * stripes`).
pub fn merge(hash: Hash, split: &[u8], key_len: usize, stripes: usize) -> Zeroizing<Vec<u8>> {
    let mut d = Zeroizing::new(vec![0u8; key_len]);
    for s in 0..stripes {
        let stripe = &split[s * key_len..(s + 1) * key_len];
        for (a, b) in d.iter_mut().zip(stripe) {
            *a ^= b;
        }
        if s + 1 < stripes {
            diffuse(hash, &mut d);
        }
    }
    d
}
