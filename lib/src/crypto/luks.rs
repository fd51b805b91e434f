//! The LUKS1 header (592 bytes, big-endian) and unlocking a key slot.
//!
//! | off | len | field |
//! |----:|----:|-------|
//! | 0   | 6   | magic `LUKS\xba\xbe` |
//! | 6   | 2   | version (1) |
//! | 8   | 32  | cipher name (`aes`) |
//! | 40  | 32  | cipher mode (`xts-plain64`, `cbc-essiv:sha256`) |
//! | 72  | 32  | hash spec (`sha256`) |
//! | 104 | 4   | payload offset, sectors |
//! | 108 | 4   | master key bytes |
//! | 112 | 20  | master key digest (PBKDF2 of the key) |
//! | 132 | 32  | its salt |
//! | 164 | 4   | its iterations |
//! | 168 | 40  | uuid |
//! | 208 | 8×48| key slots: active (0x00AC71F3), iterations, salt[32], key material offset (sectors), stripes |

use super::{af, CipherAlg, CipherMode, Hash, IvGen, Secret, SectorCipher, SECTOR};
use crate::{Error, Result};
use zeroize::Zeroizing;

/// The magic.
pub const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
/// Header length.
pub const HEADER_LEN: usize = 592;
const SLOT_ACTIVE: u32 = 0x00AC_71F3;
/// What QEMU and cryptsetup write into an unused slot's state.
const SLOT_INACTIVE: u32 = 0x0000_DEAD;
/// Key slots in a header.
pub const SLOTS: usize = 8;
/// Length of the master key digest.
pub const DIGEST_LEN: usize = 20;
/// Most key material bytes one slot may hold (512-byte keys × 4000 stripes
/// fit twice over).
const MAX_KEY_MATERIAL: usize = 4 << 20;

/// One key slot.
#[derive(Debug, Clone)]
pub struct KeySlot {
    /// Holds a copy of the master key.
    pub active: bool,
    /// PBKDF2 iterations.
    pub iterations: u32,
    /// PBKDF2 salt.
    pub salt: [u8; 32],
    /// Key material offset in sectors from the header.
    pub key_offset: u32,
    /// AF stripes.
    pub stripes: u32,
}

/// A parsed LUKS1 header.
#[derive(Debug, Clone)]
pub struct LuksHeader {
    /// The cipher.
    pub alg: CipherAlg,
    /// Its mode.
    pub mode: CipherMode,
    /// The IV generator.
    pub ivgen: IvGen,
    /// The hash named with the IV generator, if any.
    pub ivgen_hash: Option<Hash>,
    /// The hash of PBKDF2 and the AF splitter.
    pub hash: Hash,
    /// Payload offset in sectors (raw LUKS images).
    pub payload_offset: u32,
    /// Master key length.
    pub key_bytes: u32,
    /// The master key's digest.
    pub mk_digest: [u8; DIGEST_LEN],
    /// Its salt.
    pub mk_salt: [u8; 32],
    /// Its iterations.
    pub mk_iterations: u32,
    /// The uuid.
    pub uuid: String,
    /// The key slots.
    pub slots: Vec<KeySlot>,
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Whether `buf` starts with the LUKS magic.
pub fn has_magic(buf: &[u8]) -> bool {
    buf.len() >= 6 && &buf[..6] == MAGIC
}

impl LuksHeader {
    /// Parses and checks a header.
    pub fn parse(b: &[u8]) -> Result<LuksHeader> {
        if b.len() < HEADER_LEN || !has_magic(b) {
            return Err(Error::corrupt("Volume is not in LUKS format"));
        }
        let version = u16::from_be_bytes([b[6], b[7]]);
        if version != 1 {
            return Err(Error::unsupported(format!("LUKS version {version} is not supported")));
        }
        let cipher_name = cstr(&b[8..40]);
        let cipher_mode = cstr(&b[40..72]);
        let hash = Hash::from_name(&cstr(&b[72..104]))?;
        let payload_offset = be32(b, 104);
        let key_bytes = be32(b, 108);
        let (mode_name, iv_spec) = match cipher_mode.split_once('-') {
            Some((m, iv)) => (m, Some(iv)),
            None => (cipher_mode.as_str(), None),
        };
        let mode = CipherMode::from_name(mode_name)?;
        let one_key = if mode == CipherMode::Xts { key_bytes / 2 } else { key_bytes };
        let alg = CipherAlg::from_luks(&cipher_name, one_key as usize)?;
        if mode == CipherMode::Xts && !key_bytes.is_multiple_of(2) {
            return Err(Error::corrupt("LUKS header: odd XTS key length"));
        }
        // `plain64:sha256` is what QEMU writes when given a hash for a
        // generator that needs none: the hash is kept for `info` only.
        let (iv_name, iv_hash) = match iv_spec {
            Some(s) => match s.split_once(':') {
                Some((n, h)) => (n, Some(Hash::from_name(h)?)),
                None => (s, None),
            },
            None => ("plain64", None),
        };
        let ivgen = match (iv_name, iv_hash) {
            ("plain64", _) => IvGen::Plain64,
            ("plain", _) => IvGen::Plain,
            ("essiv", Some(h)) => IvGen::Essiv(h),
            (s, _) => return Err(Error::unsupported(format!("IV generator '{s}'"))),
        };
        let mut mk_digest = [0u8; DIGEST_LEN];
        mk_digest.copy_from_slice(&b[112..132]);
        let mut mk_salt = [0u8; 32];
        mk_salt.copy_from_slice(&b[132..164]);
        let mk_iterations = be32(b, 164);
        let uuid = cstr(&b[168..208]);
        let slots = (0..SLOTS)
            .map(|i| {
                let o = 208 + i * 48;
                let mut salt = [0u8; 32];
                salt.copy_from_slice(&b[o + 8..o + 40]);
                KeySlot {
                    active: be32(b, o) == SLOT_ACTIVE,
                    iterations: be32(b, o + 4),
                    salt,
                    key_offset: be32(b, o + 40),
                    stripes: be32(b, o + 44),
                }
            })
            .collect();
        Ok(LuksHeader {
            alg,
            mode,
            ivgen,
            ivgen_hash: iv_hash,
            hash,
            payload_offset,
            key_bytes,
            mk_digest,
            mk_salt,
            mk_iterations,
            uuid,
            slots,
        })
    }

    /// The header's bytes (the inverse of [`LuksHeader::parse`]).
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut b = vec![0u8; HEADER_LEN];
        let mut put_str = |off: usize, len: usize, s: &str| -> Result<()> {
            if s.len() >= len {
                return Err(Error::invalid(format!("LUKS header: '{s}' is too long")));
            }
            b[off..off + s.len()].copy_from_slice(s.as_bytes());
            Ok(())
        };
        put_str(8, 32, self.alg.luks_name())?;
        put_str(40, 32, &self.mode_spec())?;
        put_str(72, 32, self.hash.name())?;
        put_str(168, 40, &self.uuid)?;
        b[..6].copy_from_slice(MAGIC);
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        b[104..108].copy_from_slice(&self.payload_offset.to_be_bytes());
        b[108..112].copy_from_slice(&self.key_bytes.to_be_bytes());
        b[112..132].copy_from_slice(&self.mk_digest);
        b[132..164].copy_from_slice(&self.mk_salt);
        b[164..168].copy_from_slice(&self.mk_iterations.to_be_bytes());
        for (i, slot) in self.slots.iter().take(SLOTS).enumerate() {
            let o = 208 + i * 48;
            let state = if slot.active { SLOT_ACTIVE } else { SLOT_INACTIVE };
            b[o..o + 4].copy_from_slice(&state.to_be_bytes());
            b[o + 4..o + 8].copy_from_slice(&slot.iterations.to_be_bytes());
            b[o + 8..o + 40].copy_from_slice(&slot.salt);
            b[o + 40..o + 44].copy_from_slice(&slot.key_offset.to_be_bytes());
            b[o + 44..o + 48].copy_from_slice(&slot.stripes.to_be_bytes());
        }
        Ok(b)
    }

    /// The cipher mode field (`xts-plain64`, `cbc-essiv:sha256`).
    pub fn mode_spec(&self) -> String {
        let mut s = format!("{}-{}", self.mode.name(), self.ivgen.name());
        if let Some(h) = self.ivgen_hash {
            s.push(':');
            s.push_str(h.name());
        }
        s
    }

    /// Tries each active key slot with `password`; `read` reads key
    /// material at a byte offset from the header. Returns the payload
    /// cipher.
    pub fn unlock(&self, password: &Secret, read: &dyn Fn(&mut [u8], u64) -> Result<()>) -> Result<SectorCipher> {
        let key = self.unlock_key(password, read)?;
        SectorCipher::new(self.alg, self.mode, self.ivgen, &key)
    }

    /// The master key, from the first active slot `password` opens.
    pub fn unlock_key(&self, password: &Secret, read: &dyn Fn(&mut [u8], u64) -> Result<()>) -> Result<Secret> {
        for i in 0..self.slots.len() {
            if let Some(k) = self.try_slot(i, password, read)? {
                return Ok(k);
            }
        }
        Err(Error::invalid("Invalid password, cannot unlock any keyslot"))
    }

    /// The master key if slot `i` is active and `password` opens it.
    pub fn try_slot(
        &self,
        i: usize,
        password: &Secret,
        read: &dyn Fn(&mut [u8], u64) -> Result<()>,
    ) -> Result<Option<Secret>> {
        let kb = self.key_bytes as usize;
        if kb == 0 || kb > 512 {
            return Err(Error::corrupt("LUKS header: bad master key length"));
        }
        let Some(slot) = self.slots.get(i).filter(|s| s.active) else {
            return Ok(None);
        };
        // QEMU and cryptsetup write 4000 stripes; the bound keeps a
        // hostile header from sizing a huge buffer.
        if slot.stripes == 0 || kb * slot.stripes as usize > MAX_KEY_MATERIAL {
            return Err(Error::corrupt("LUKS header: bad key slot stripes"));
        }
        let mut slot_key = Secret::new(vec![0u8; kb]);
        self.hash.pbkdf2(password.expose(), &slot.salt, slot.iterations, &mut slot_key.0[..]);
        let len = kb * slot.stripes as usize;
        let mut split = Zeroizing::new(vec![0u8; len.div_ceil(SECTOR as usize) * SECTOR as usize]);
        read(&mut split, u64::from(slot.key_offset) * SECTOR)?;
        SectorCipher::new(self.alg, self.mode, self.ivgen, &slot_key)?.apply(0, &mut split, false);
        let mk = af::merge(self.hash, &split[..len], kb, slot.stripes as usize);
        let mut digest = [0u8; DIGEST_LEN];
        self.hash.pbkdf2(&mk, &self.mk_salt, self.mk_iterations, &mut digest);
        Ok((digest == self.mk_digest).then(|| Secret::new(mk.to_vec())))
    }
}
