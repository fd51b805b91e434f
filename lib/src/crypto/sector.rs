//! The per-sector cipher of LUKS1: a block cipher in a mode, with the IV
//! of each 512-byte sector made from its number.

use super::{Hash, Secret};
use crate::{Error, Result};
use aes::cipher::consts::U16;
use aes::cipher::crypto_common::InnerInit;
use aes::cipher::generic_array::GenericArray;
use aes::cipher::{
    BlockCipher, BlockDecrypt, BlockDecryptMut, BlockEncrypt, BlockEncryptMut, BlockSizeUser, InnerIvInit, KeyInit,
};
use aes::{Aes128, Aes192, Aes256};
use xts_mode::Xts128;

/// LUKS1 sectors are 512 bytes, whatever the host's.
pub const SECTOR: u64 = 512;

/// The block cipher and its key size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherAlg {
    /// AES with a 128-bit key.
    Aes128,
    /// AES with a 192-bit key.
    Aes192,
    /// AES with a 256-bit key.
    Aes256,
}

impl CipherAlg {
    /// qemu-img's name (`aes-256`).
    pub fn name(self) -> &'static str {
        match self {
            CipherAlg::Aes128 => "aes-128",
            CipherAlg::Aes192 => "aes-192",
            CipherAlg::Aes256 => "aes-256",
        }
    }
    /// Parses qemu-img's name.
    pub fn from_name(s: &str) -> Result<CipherAlg> {
        Ok(match s {
            "aes-128" => CipherAlg::Aes128,
            "aes-192" => CipherAlg::Aes192,
            "aes-256" => CipherAlg::Aes256,
            other => return Err(Error::unsupported(format!("cipher algorithm '{other}'"))),
        })
    }
    /// The cipher for a LUKS header's name and key size (`aes`, 32).
    pub fn from_luks(name: &str, key_bytes: usize) -> Result<CipherAlg> {
        match (name, key_bytes) {
            ("aes", 16) => Ok(CipherAlg::Aes128),
            ("aes", 24) => Ok(CipherAlg::Aes192),
            ("aes", 32) => Ok(CipherAlg::Aes256),
            _ => Err(Error::unsupported(format!("cipher '{name}' with a {}-bit key", key_bytes * 8))),
        }
    }
    /// The name a LUKS header gives the cipher (the key size is the
    /// header's master key length).
    pub fn luks_name(self) -> &'static str {
        "aes"
    }
    /// Key size in bytes (of one key: XTS takes two).
    pub fn key_len(self) -> usize {
        match self {
            CipherAlg::Aes128 => 16,
            CipherAlg::Aes192 => 24,
            CipherAlg::Aes256 => 32,
        }
    }
}

/// The block cipher mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherMode {
    /// Electronic codebook.
    Ecb,
    /// Cipher block chaining.
    Cbc,
    /// XEX with ciphertext stealing.
    Xts,
}

impl CipherMode {
    /// The name.
    pub fn name(self) -> &'static str {
        match self {
            CipherMode::Ecb => "ecb",
            CipherMode::Cbc => "cbc",
            CipherMode::Xts => "xts",
        }
    }
    /// Parses the name.
    pub fn from_name(s: &str) -> Result<CipherMode> {
        Ok(match s {
            "ecb" => CipherMode::Ecb,
            "cbc" => CipherMode::Cbc,
            "xts" => CipherMode::Xts,
            other => return Err(Error::unsupported(format!("cipher mode '{other}'"))),
        })
    }
}

/// How a sector's IV is made from its number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IvGen {
    /// The low 32 bits, little-endian.
    Plain,
    /// The 64 bits, little-endian.
    Plain64,
    /// `plain64` encrypted under the hash of the master key.
    Essiv(Hash),
}

impl IvGen {
    /// The generator's name (`plain64`, `essiv`).
    pub fn name(self) -> &'static str {
        match self {
            IvGen::Plain => "plain",
            IvGen::Plain64 => "plain64",
            IvGen::Essiv(_) => "essiv",
        }
    }
}

/// What the modes need of a block cipher.
trait Block: BlockCipher + BlockEncrypt + BlockDecrypt + BlockSizeUser<BlockSize = U16> + KeyInit + Clone {}
impl<T: BlockCipher + BlockEncrypt + BlockDecrypt + BlockSizeUser<BlockSize = U16> + KeyInit + Clone> Block for T {}

enum Mode<C: Block> {
    Ecb(C),
    Cbc(C),
    Xts(Box<Xts128<C>>),
}

impl<C: Block> Mode<C> {
    fn new(mode: CipherMode, key: &[u8]) -> Result<Mode<C>> {
        let bad = || Error::invalid("wrong key length for the cipher");
        Ok(match mode {
            CipherMode::Ecb => Mode::Ecb(C::new_from_slice(key).map_err(|_| bad())?),
            CipherMode::Cbc => Mode::Cbc(C::new_from_slice(key).map_err(|_| bad())?),
            CipherMode::Xts => {
                if !key.len().is_multiple_of(2) {
                    return Err(bad());
                }
                let (k1, k2) = key.split_at(key.len() / 2);
                let c1 = C::new_from_slice(k1).map_err(|_| bad())?;
                let c2 = C::new_from_slice(k2).map_err(|_| bad())?;
                Mode::Xts(Box::new(Xts128::new(c1, c2)))
            }
        })
    }

    /// Encrypts or decrypts one sector (a multiple of 16 bytes) in place.
    fn run(&self, iv: &[u8; 16], buf: &mut [u8], encrypt: bool) {
        match self {
            Mode::Ecb(c) => {
                for b in buf.chunks_exact_mut(16) {
                    let b = GenericArray::from_mut_slice(b);
                    if encrypt {
                        ecb::Encryptor::<C>::inner_init(c.clone()).encrypt_block_mut(b)
                    } else {
                        ecb::Decryptor::<C>::inner_init(c.clone()).decrypt_block_mut(b)
                    }
                }
            }
            Mode::Cbc(c) => {
                let iv = GenericArray::from_slice(iv);
                if encrypt {
                    let mut e = cbc::Encryptor::<C>::inner_iv_init(c.clone(), iv);
                    for b in buf.chunks_exact_mut(16) {
                        e.encrypt_block_mut(GenericArray::from_mut_slice(b));
                    }
                } else {
                    let mut d = cbc::Decryptor::<C>::inner_iv_init(c.clone(), iv);
                    for b in buf.chunks_exact_mut(16) {
                        d.decrypt_block_mut(GenericArray::from_mut_slice(b));
                    }
                }
            }
            Mode::Xts(x) => {
                if encrypt {
                    x.encrypt_sector(buf, *iv)
                } else {
                    x.decrypt_sector(buf, *iv)
                }
            }
        }
    }
}

enum AnyMode {
    A128(Mode<Aes128>),
    A192(Mode<Aes192>),
    A256(Mode<Aes256>),
}

enum AnyBlock {
    A128(Aes128),
    A192(Aes192),
    A256(Aes256),
}

/// A keyed sector cipher: encrypts and decrypts whole 512-byte sectors.
pub struct SectorCipher {
    mode: AnyMode,
    ivgen: IvGen,
    essiv: Option<AnyBlock>,
}

impl SectorCipher {
    /// Keys a cipher. `key` holds both halves for XTS.
    pub fn new(alg: CipherAlg, mode: CipherMode, ivgen: IvGen, key: &Secret) -> Result<SectorCipher> {
        let k = key.expose();
        let m = match alg {
            CipherAlg::Aes128 => AnyMode::A128(Mode::new(mode, k)?),
            CipherAlg::Aes192 => AnyMode::A192(Mode::new(mode, k)?),
            CipherAlg::Aes256 => AnyMode::A256(Mode::new(mode, k)?),
        };
        let essiv = match ivgen {
            IvGen::Essiv(h) => {
                let salt = zeroize::Zeroizing::new(h.digest(&[k]));
                let bad = || Error::unsupported(format!("essiv with hash {}", h.name()));
                Some(match salt.len() {
                    16 => AnyBlock::A128(Aes128::new_from_slice(&salt).map_err(|_| bad())?),
                    24 => AnyBlock::A192(Aes192::new_from_slice(&salt).map_err(|_| bad())?),
                    32 => AnyBlock::A256(Aes256::new_from_slice(&salt).map_err(|_| bad())?),
                    _ => return Err(bad()),
                })
            }
            _ => None,
        };
        Ok(SectorCipher { mode: m, ivgen, essiv })
    }

    fn iv(&self, sector: u64) -> [u8; 16] {
        let mut iv = [0u8; 16];
        match self.ivgen {
            IvGen::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            IvGen::Plain64 | IvGen::Essiv(_) => iv[..8].copy_from_slice(&sector.to_le_bytes()),
        }
        if let Some(e) = &self.essiv {
            let b = GenericArray::from_mut_slice(&mut iv);
            match e {
                AnyBlock::A128(c) => c.encrypt_block(b),
                AnyBlock::A192(c) => c.encrypt_block(b),
                AnyBlock::A256(c) => c.encrypt_block(b),
            }
        }
        iv
    }

    /// Encrypts (or decrypts) `buf`, whole sectors numbered from
    /// `first_sector`, in place.
    pub fn apply(&self, first_sector: u64, buf: &mut [u8], encrypt: bool) {
        for (i, s) in buf.chunks_exact_mut(SECTOR as usize).enumerate() {
            let iv = self.iv(first_sector + i as u64);
            match &self.mode {
                AnyMode::A128(m) => m.run(&iv, s, encrypt),
                AnyMode::A192(m) => m.run(&iv, s, encrypt),
                AnyMode::A256(m) => m.run(&iv, s, encrypt),
            }
        }
    }
}

impl std::fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SectorCipher").field("ivgen", &self.ivgen).finish_non_exhaustive()
    }
}
