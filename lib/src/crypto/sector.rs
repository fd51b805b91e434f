//! The per-sector cipher of LUKS1: a block cipher in a mode, with the IV
//! of each 512-byte sector made from its number.
//!
//! The ciphers (AES, Twofish, Serpent, CAST5) and modes (ECB, CBC, CTR,
//! XTS) are RustCrypto's; this file picks one by name and feeds it the
//! sector IVs. IVs are one cipher block long, as QEMU makes them, so
//! CAST5's are 8 bytes; CTR counts over the whole block, big-endian.

use super::{Hash, Secret};
use crate::{Error, Result};
use aes::cipher::consts::{U16, U8};
use aes::cipher::generic_array::GenericArray;
use aes::cipher::{
    BlockCipher, BlockDecrypt, BlockDecryptMut, BlockEncrypt, BlockEncryptMut, BlockSizeUser, InnerIvInit, KeyInit,
    StreamCipher, StreamCipherCoreWrapper,
};
use aes::{Aes128, Aes192, Aes256};
use cast5::Cast5;
use serpent::Serpent;
use twofish::Twofish;
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
    /// Twofish with a 128-bit key.
    Twofish128,
    /// Twofish with a 192-bit key.
    Twofish192,
    /// Twofish with a 256-bit key.
    Twofish256,
    /// Serpent with a 128-bit key.
    Serpent128,
    /// Serpent with a 192-bit key.
    Serpent192,
    /// Serpent with a 256-bit key.
    Serpent256,
    /// CAST-128 (an 8-byte block).
    Cast5_128,
}

/// Every algorithm: qemu-img's name, the LUKS header's name, the key length.
const ALGS: &[(CipherAlg, &str, &str, usize)] = &[
    (CipherAlg::Aes128, "aes-128", "aes", 16),
    (CipherAlg::Aes192, "aes-192", "aes", 24),
    (CipherAlg::Aes256, "aes-256", "aes", 32),
    (CipherAlg::Twofish128, "twofish-128", "twofish", 16),
    (CipherAlg::Twofish192, "twofish-192", "twofish", 24),
    (CipherAlg::Twofish256, "twofish-256", "twofish", 32),
    (CipherAlg::Serpent128, "serpent-128", "serpent", 16),
    (CipherAlg::Serpent192, "serpent-192", "serpent", 24),
    (CipherAlg::Serpent256, "serpent-256", "serpent", 32),
    (CipherAlg::Cast5_128, "cast5-128", "cast5", 16),
];

impl CipherAlg {
    fn entry(self) -> &'static (CipherAlg, &'static str, &'static str, usize) {
        // Every variant has its row: the fallback is never taken.
        ALGS.iter().find(|e| e.0 == self).unwrap_or(&ALGS[0])
    }
    /// Every algorithm, in qemu-img's order.
    pub fn all() -> impl Iterator<Item = CipherAlg> {
        ALGS.iter().map(|e| e.0)
    }
    /// qemu-img's name (`aes-256`).
    pub fn name(self) -> &'static str {
        self.entry().1
    }
    /// Parses qemu-img's name.
    pub fn from_name(s: &str) -> Result<CipherAlg> {
        ALGS.iter().find(|e| e.1 == s).map(|e| e.0).ok_or_else(|| Error::unsupported(format!("cipher algorithm '{s}'")))
    }
    /// The cipher for a LUKS header's name and key size (`aes`, 32).
    pub fn from_luks(name: &str, key_bytes: usize) -> Result<CipherAlg> {
        ALGS.iter()
            .find(|e| e.2 == name && e.3 == key_bytes)
            .map(|e| e.0)
            .ok_or_else(|| Error::unsupported(format!("cipher '{name}' with a {}-bit key", key_bytes * 8)))
    }
    /// The name a LUKS header gives the cipher (the key size is the
    /// header's master key length).
    pub fn luks_name(self) -> &'static str {
        self.entry().2
    }
    /// Key size in bytes (of one key: XTS takes two).
    pub fn key_len(self) -> usize {
        self.entry().3
    }
    /// Block size in bytes, which is also the IV's.
    pub fn block_len(self) -> usize {
        match self {
            CipherAlg::Cast5_128 => 8,
            _ => 16,
        }
    }
    /// Whether `mode` works with this cipher (XTS needs 16-byte blocks).
    pub fn supports(self, mode: CipherMode) -> bool {
        mode != CipherMode::Xts || self.block_len() == 16
    }
    /// The cipher ESSIV keys with a `hash` digest: this one when the
    /// digest fits its key, else the same family's cipher of that key size
    /// (QEMU's rule, with its messages).
    pub fn essiv(self, hash: Hash) -> Result<CipherAlg> {
        let n = hash.digest_len();
        if n == self.key_len() {
            return Ok(self);
        }
        let family = match self.luks_name() {
            "aes" => "AES",
            "twofish" => "Twofish",
            "serpent" => "Serpent",
            _ => return Err(Error::invalid(format!("Cipher {} not supported with essiv", self.name()))),
        };
        CipherAlg::from_luks(self.luks_name(), n)
            .map_err(|_| Error::invalid(format!("No {family} cipher with key size {n} available")))
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
    /// Counter mode.
    Ctr,
}

impl CipherMode {
    /// The name.
    pub fn name(self) -> &'static str {
        match self {
            CipherMode::Ecb => "ecb",
            CipherMode::Cbc => "cbc",
            CipherMode::Xts => "xts",
            CipherMode::Ctr => "ctr",
        }
    }
    /// Parses the name.
    pub fn from_name(s: &str) -> Result<CipherMode> {
        Ok(match s {
            "ecb" => CipherMode::Ecb,
            "cbc" => CipherMode::Cbc,
            "xts" => CipherMode::Xts,
            "ctr" => CipherMode::Ctr,
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

/// A keyed cipher in a mode: one sector at a time, in place.
trait Engine: Send + Sync {
    fn run(&self, iv: &[u8], buf: &mut [u8], encrypt: bool);
}

/// What the modes need of a block cipher.
trait Block: BlockCipher + BlockEncrypt + BlockDecrypt + KeyInit + Clone + Send + Sync + 'static {}
impl<T: BlockCipher + BlockEncrypt + BlockDecrypt + KeyInit + Clone + Send + Sync + 'static> Block for T {}
trait Block16: Block + BlockSizeUser<BlockSize = U16> {}
impl<T: Block + BlockSizeUser<BlockSize = U16>> Block16 for T {}
trait Block8: Block + BlockSizeUser<BlockSize = U8> {}
impl<T: Block + BlockSizeUser<BlockSize = U8>> Block8 for T {}

struct Ecb<C>(C);

impl<C: Block> Engine for Ecb<C> {
    fn run(&self, _iv: &[u8], buf: &mut [u8], encrypt: bool) {
        for b in buf.chunks_exact_mut(C::block_size()) {
            let b = GenericArray::from_mut_slice(b);
            if encrypt {
                self.0.encrypt_block(b)
            } else {
                self.0.decrypt_block(b)
            }
        }
    }
}

struct Cbc<C>(C);

impl<C: Block> Engine for Cbc<C> {
    fn run(&self, iv: &[u8], buf: &mut [u8], encrypt: bool) {
        let n = C::block_size();
        let iv = GenericArray::from_slice(iv);
        if encrypt {
            let mut e = cbc::Encryptor::<C>::inner_iv_init(self.0.clone(), iv);
            for b in buf.chunks_exact_mut(n) {
                e.encrypt_block_mut(GenericArray::from_mut_slice(b));
            }
        } else {
            let mut d = cbc::Decryptor::<C>::inner_iv_init(self.0.clone(), iv);
            for b in buf.chunks_exact_mut(n) {
                d.decrypt_block_mut(GenericArray::from_mut_slice(b));
            }
        }
    }
}

/// CTR over a 16-byte block: the 128-bit counter is the whole block.
struct Ctr16<C>(C);

impl<C: Block16> Engine for Ctr16<C> {
    fn run(&self, iv: &[u8], buf: &mut [u8], _encrypt: bool) {
        let core =
            ctr::CtrCore::<C, ctr::flavors::Ctr128BE>::inner_iv_init(self.0.clone(), GenericArray::from_slice(iv));
        StreamCipherCoreWrapper::from_core(core).apply_keystream(buf);
    }
}

/// CTR over an 8-byte block: the 64-bit counter is the whole block.
struct Ctr8<C>(C);

impl<C: Block8> Engine for Ctr8<C> {
    fn run(&self, iv: &[u8], buf: &mut [u8], _encrypt: bool) {
        let core =
            ctr::CtrCore::<C, ctr::flavors::Ctr64BE>::inner_iv_init(self.0.clone(), GenericArray::from_slice(iv));
        StreamCipherCoreWrapper::from_core(core).apply_keystream(buf);
    }
}

struct Xts<C: Block>(Xts128<C>);

impl<C: Block> Engine for Xts<C> {
    fn run(&self, iv: &[u8], buf: &mut [u8], encrypt: bool) {
        let mut tweak = [0u8; 16];
        tweak.copy_from_slice(iv);
        if encrypt {
            self.0.encrypt_sector(buf, tweak)
        } else {
            self.0.decrypt_sector(buf, tweak)
        }
    }
}

fn bad_key() -> Error {
    Error::invalid("wrong key length for the cipher")
}

fn key<C: Block>(k: &[u8]) -> Result<C> {
    C::new_from_slice(k).map_err(|_| bad_key())
}

/// `mode` over the 16-byte block cipher `C`.
fn engine16<C: Block16>(mode: CipherMode, k: &[u8]) -> Result<Box<dyn Engine>> {
    Ok(match mode {
        CipherMode::Ecb => Box::new(Ecb(key::<C>(k)?)),
        CipherMode::Cbc => Box::new(Cbc(key::<C>(k)?)),
        CipherMode::Ctr => Box::new(Ctr16(key::<C>(k)?)),
        CipherMode::Xts => {
            if !k.len().is_multiple_of(2) {
                return Err(bad_key());
            }
            let (k1, k2) = k.split_at(k.len() / 2);
            Box::new(Xts(Xts128::new(key::<C>(k1)?, key::<C>(k2)?)))
        }
    })
}

/// `mode` over the 8-byte block cipher `C` (no XTS).
fn engine8<C: Block8>(mode: CipherMode, k: &[u8]) -> Result<Box<dyn Engine>> {
    Ok(match mode {
        CipherMode::Ecb => Box::new(Ecb(key::<C>(k)?)),
        CipherMode::Cbc => Box::new(Cbc(key::<C>(k)?)),
        CipherMode::Ctr => Box::new(Ctr8(key::<C>(k)?)),
        CipherMode::Xts => return Err(Error::invalid(format!("Unsupported cipher mode {}", mode.name()))),
    })
}

fn engine(alg: CipherAlg, mode: CipherMode, k: &[u8]) -> Result<Box<dyn Engine>> {
    match alg {
        CipherAlg::Aes128 => engine16::<Aes128>(mode, k),
        CipherAlg::Aes192 => engine16::<Aes192>(mode, k),
        CipherAlg::Aes256 => engine16::<Aes256>(mode, k),
        CipherAlg::Twofish128 | CipherAlg::Twofish192 | CipherAlg::Twofish256 => engine16::<Twofish>(mode, k),
        CipherAlg::Serpent128 | CipherAlg::Serpent192 | CipherAlg::Serpent256 => engine16::<Serpent>(mode, k),
        CipherAlg::Cast5_128 => engine8::<Cast5>(mode, k),
    }
}

/// A keyed sector cipher: encrypts and decrypts whole 512-byte sectors.
pub struct SectorCipher {
    engine: Box<dyn Engine>,
    ivgen: IvGen,
    iv_len: usize,
    essiv: Option<Box<dyn Engine>>,
}

impl SectorCipher {
    /// Keys a cipher. `key` holds both halves for XTS.
    pub fn new(alg: CipherAlg, mode: CipherMode, ivgen: IvGen, key: &Secret) -> Result<SectorCipher> {
        let k = key.expose();
        // Twofish and Serpent take several key sizes: the length must be
        // the one the algorithm names.
        let want = alg.key_len() * if mode == CipherMode::Xts { 2 } else { 1 };
        if k.len() != want {
            return Err(bad_key());
        }
        let m = engine(alg, mode, k)?;
        let essiv = match ivgen {
            IvGen::Essiv(h) => {
                let salt = zeroize::Zeroizing::new(h.digest(&[k]));
                Some(engine(alg.essiv(h)?, CipherMode::Ecb, &salt)?)
            }
            _ => None,
        };
        Ok(SectorCipher { engine: m, ivgen, iv_len: alg.block_len(), essiv })
    }

    fn iv(&self, sector: u64, iv: &mut [u8; 16]) {
        *iv = [0u8; 16];
        match self.ivgen {
            IvGen::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            IvGen::Plain64 | IvGen::Essiv(_) => iv[..8].copy_from_slice(&sector.to_le_bytes()),
        }
        if let Some(e) = &self.essiv {
            e.run(&[], &mut iv[..self.iv_len], true);
        }
    }

    /// Encrypts (or decrypts) `buf`, whole sectors numbered from
    /// `first_sector`, in place.
    pub fn apply(&self, first_sector: u64, buf: &mut [u8], encrypt: bool) {
        let mut iv = [0u8; 16];
        for (i, s) in buf.chunks_exact_mut(SECTOR as usize).enumerate() {
            self.iv(first_sector + i as u64, &mut iv);
            self.engine.run(&iv[..self.iv_len], s, encrypt);
        }
    }
}

impl std::fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SectorCipher").field("ivgen", &self.ivgen).finish_non_exhaustive()
    }
}
