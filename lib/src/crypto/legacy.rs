//! qcow2's legacy AES encryption (crypt_method 1): AES-128-CBC over
//! 512-byte sectors, the IV the sector's number (plain64). There is no
//! header and no key check: the key is the passphrase's first 16 bytes,
//! zero-padded when shorter, as QEMU takes it, so a wrong passphrase
//! opens the image and reads noise.

use super::{CipherAlg, CipherMode, IvGen, Secret, SectorCipher};
use crate::Result;

/// The key length: AES-128.
const KEY_LEN: usize = 16;

/// The sector cipher a legacy AES image uses with `passphrase`.
pub fn legacy_aes_cipher(passphrase: &Secret) -> Result<SectorCipher> {
    let p = passphrase.expose();
    let n = p.len().min(KEY_LEN);
    let mut key = vec![0u8; KEY_LEN];
    key[..n].copy_from_slice(&p[..n]);
    SectorCipher::new(CipherAlg::Aes128, CipherMode::Cbc, IvGen::Plain64, &Secret::new(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first 16 bytes are the key: a longer passphrase that shares
    /// them decrypts alike, a different one does not.
    #[test]
    fn passphrase_truncated_to_sixteen_bytes() {
        let enc = |pw: &[u8]| {
            let c = legacy_aes_cipher(&Secret::new(pw.to_vec())).expect("cipher");
            let mut b = vec![0x5au8; 1024];
            c.apply(7, &mut b, true);
            b
        };
        assert_eq!(enc(b"0123456789abcdefXYZ"), enc(b"0123456789abcdefQQQ"));
        assert_ne!(enc(b"0123456789abcdef"), enc(b"0123456789abcdeg"));
        assert_ne!(enc(b"abc"), enc(b"abc\0\0x"));
        assert_eq!(enc(b"abc"), enc(b"abc\0"));
    }
}
