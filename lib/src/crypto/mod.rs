//! Disk encryption: LUKS1 headers (raw `-f luks` images and the header a
//! qcow2 image points at with its full-disk-encryption extension), key
//! slot unlocking and the per-sector cipher; and qcow2's legacy AES
//! (crypt_method 1), which is that cipher keyed by the passphrase.
//!
//! Every primitive comes from RustCrypto crates; this module only lays
//! out the bytes (header fields, anti-forensic stripes, IVs). Key
//! material lives in [`Secret`]s and cipher states that are wiped on drop.

mod af;
mod create;
mod hash;
mod image;
mod keyslots;
mod legacy;
pub mod luks;
mod sector;
mod storage;

pub use create::{format as format_luks, iterations_for, LuksParams, NewVolume};
pub use hash::Hash;
pub use image::LuksImage;
pub use keyslots::{amend_keyslots, KeyslotChange};
pub use legacy::legacy_aes_cipher;
pub use luks::LuksHeader;
pub use sector::{CipherAlg, CipherMode, IvGen, SectorCipher, SECTOR};
pub use storage::{CryptStorage, NoKey};

use zeroize::Zeroizing;

/// Secret bytes (a password or a key): wiped when dropped, never printed.
#[derive(Clone)]
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    /// Takes ownership of `bytes`.
    pub fn new(bytes: Vec<u8>) -> Secret {
        Secret(Zeroizing::new(bytes))
    }
    /// The bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}
