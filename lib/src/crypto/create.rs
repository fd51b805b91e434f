//! Making a new LUKS1 volume: a random master key, its digest, one key
//! slot holding it under a password, and the layout QEMU gives the key
//! material (4 KiB-aligned slots after a 4 KiB header area, the payload
//! right after the eighth slot).

use super::luks::{KeySlot, LuksHeader, DIGEST_LEN, SLOTS};
use super::{af, CipherAlg, CipherMode, Hash, IvGen, Secret, SectorCipher, SECTOR};
use crate::{Error, Result};
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

/// Stripes of the anti-forensic split, as QEMU and cryptsetup write.
pub const STRIPES: u32 = 4000;
/// Key material areas start on 4 KiB boundaries (in sectors).
const ALIGN_SECTORS: u32 = 8;
/// Fewest PBKDF2 iterations QEMU accepts for a slot or the digest.
const MIN_ITERATIONS: u64 = 1000;
/// The master key digest gets an eighth of the slots' time budget.
const DIGEST_SHARE: u64 = 8;

/// What `-o encrypt.*` chooses (qemu-img's defaults from `Default`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LuksParams {
    /// `cipher-alg` (aes-256).
    pub alg: CipherAlg,
    /// `cipher-mode` (xts).
    pub mode: CipherMode,
    /// `ivgen-alg` (plain64), with `ivgen-hash-alg` folded in for essiv.
    pub ivgen: IvGen,
    /// `ivgen-hash-alg`, recorded in the header even where the generator
    /// ignores it, as QEMU does.
    pub ivgen_hash: Option<Hash>,
    /// `hash-alg` (sha256): PBKDF2 and the AF splitter.
    pub hash: Hash,
    /// `iter-time` in milliseconds (2000): PBKDF2 time per key slot.
    pub iter_time_ms: u64,
}

impl Default for LuksParams {
    fn default() -> Self {
        LuksParams {
            alg: CipherAlg::Aes256,
            mode: CipherMode::Xts,
            ivgen: IvGen::Plain64,
            ivgen_hash: None,
            hash: Hash::Sha256,
            iter_time_ms: 2000,
        }
    }
}

impl LuksParams {
    /// Master key length: XTS takes two keys.
    pub fn key_bytes(&self) -> usize {
        self.alg.key_len() * if self.mode == CipherMode::Xts { 2 } else { 1 }
    }

    /// Bytes of header and key material before the payload (what a
    /// qcow2 image gives the encryption header, what `measure` adds).
    pub fn volume_len(&self) -> u64 {
        u64::from(ALIGN_SECTORS + SLOTS as u32 * slot_sectors(self.key_bytes())) * SECTOR
    }

    /// Checks the combination before any work, with qemu-img's messages.
    pub fn validate(&self) -> Result<()> {
        if !self.alg.supports(self.mode) {
            return Err(Error::invalid(format!("Unsupported cipher mode {}", self.mode.name())));
        }
        if let IvGen::Essiv(h) = self.ivgen {
            self.alg.essiv(h)?;
        }
        // QEMU encrypts key material in whole sectors without padding it:
        // with a 24-byte key and 4000 stripes it aborts, and could not
        // open such a volume either.
        if !(self.key_bytes() * STRIPES as usize).is_multiple_of(SECTOR as usize) {
            return Err(Error::invalid(format!(
                "cipher {} in mode {}: QEMU cannot use a LUKS volume whose key material is not whole sectors",
                self.alg.name(),
                self.mode.name()
            )));
        }
        Ok(())
    }
}

impl std::fmt::Debug for NewVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewVolume").field("header", &self.header).finish_non_exhaustive()
    }
}

/// A formatted volume: the header and key material (`payload_offset`
/// sectors of bytes), and the master key's cipher.
pub struct NewVolume {
    /// The parsed header.
    pub header: LuksHeader,
    /// Header plus key material, to write at the volume's start.
    pub bytes: Vec<u8>,
    /// The payload cipher.
    pub cipher: SectorCipher,
}

fn random(buf: &mut [u8]) -> Result<()> {
    getrandom::getrandom(buf).map_err(|e| Error::invalid(format!("no random numbers: {e}")))
}

/// Sectors one slot's key material takes, aligned.
fn slot_sectors(key_bytes: usize) -> u32 {
    let sectors = (key_bytes * STRIPES as usize).div_ceil(SECTOR as usize) as u32;
    sectors.div_ceil(ALIGN_SECTORS) * ALIGN_SECTORS
}

/// PBKDF2 iterations of `hash` that take `ms` milliseconds on this
/// machine when deriving `out_len` bytes (each output block costs a full
/// run, so longer keys get fewer iterations), at least [`MIN_ITERATIONS`].
pub fn iterations_for(hash: Hash, out_len: usize, ms: u64) -> u32 {
    let mut out = Zeroizing::new(vec![0u8; out_len]);
    let mut n: u32 = 256;
    // Long enough a sample that the clock's resolution does not matter,
    // short enough that `iter-time=1` stays fast.
    let sample = Duration::from_millis(ms.clamp(5, 250));
    let elapsed = loop {
        let t = Instant::now();
        hash.pbkdf2(b"benchmark", &[0u8; 32], n, &mut out);
        let e = t.elapsed();
        if e >= sample || n >= 1 << 30 {
            break e;
        }
        n = n.saturating_mul(2);
    };
    let per_ms = u64::from(n) as f64 / (elapsed.as_secs_f64() * 1000.0).max(1e-3);
    let iters = (per_ms * ms as f64) as u64;
    iters.clamp(MIN_ITERATIONS, u64::from(u32::MAX)) as u32
}

/// Splits `key` into `stripes` stripes (the inverse of [`af::merge`]),
/// zero-padded to whole sectors.
fn split(hash: Hash, key: &[u8], stripes: usize) -> Result<Zeroizing<Vec<u8>>> {
    let n = key.len();
    // Sized once: growing a Zeroizing Vec would leave an unwiped copy.
    let mut out = Zeroizing::new(vec![0u8; (n * stripes).div_ceil(SECTOR as usize) * SECTOR as usize]);
    random(&mut out[..n * (stripes - 1)])?;
    let d = af::merge(hash, &out[..n * (stripes - 1)], n, stripes - 1);
    let mut d = d.to_vec();
    af::diffuse(hash, &mut d);
    for ((o, a), b) in out[n * (stripes - 1)..n * stripes].iter_mut().zip(&d).zip(key) {
        *o = a ^ b;
    }
    zeroize::Zeroize::zeroize(&mut d);
    Ok(out)
}

/// Key material of one slot for `master` under `password`: the slot's
/// header entry (active) and its encrypted stripes, padded to sectors.
pub(super) fn make_slot(
    h: &LuksHeader,
    master: &Secret,
    password: &Secret,
    iterations: u32,
    key_offset: u32,
) -> Result<(KeySlot, Zeroizing<Vec<u8>>)> {
    let kb = h.key_bytes as usize;
    let mut salt = [0u8; 32];
    random(&mut salt)?;
    let mut slot_key = Secret::new(vec![0u8; kb]);
    h.hash.pbkdf2(password.expose(), &salt, iterations, &mut slot_key.0[..]);
    let mut material = split(h.hash, master.expose(), STRIPES as usize)?;
    SectorCipher::new(h.alg, h.mode, h.ivgen, &slot_key)?.apply(0, &mut material, true);
    let slot = KeySlot { active: true, iterations, salt, key_offset, stripes: STRIPES };
    Ok((slot, material))
}

fn uuid() -> Result<String> {
    let mut u = [0u8; 16];
    random(&mut u)?;
    // Version 4 (random), RFC 4122 variant.
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    let hex: String = u.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..]))
}

/// Formats a volume whose slot 0 opens with `password`.
pub fn format(p: &LuksParams, password: &Secret) -> Result<NewVolume> {
    p.validate()?;
    let kb = p.key_bytes();
    let mut master = Secret::new(vec![0u8; kb]);
    random(&mut master.0[..])?;
    let mut mk_salt = [0u8; 32];
    random(&mut mk_salt)?;
    let mk_iterations =
        (u64::from(iterations_for(p.hash, DIGEST_LEN, p.iter_time_ms)) / DIGEST_SHARE).max(MIN_ITERATIONS) as u32;
    let mut mk_digest = [0u8; DIGEST_LEN];
    p.hash.pbkdf2(master.expose(), &mk_salt, mk_iterations, &mut mk_digest);
    let per_slot = slot_sectors(kb);
    let first = ALIGN_SECTORS;
    let slots: Vec<KeySlot> = (0..SLOTS as u32)
        .map(|i| KeySlot {
            active: false,
            iterations: 0,
            salt: [0u8; 32],
            key_offset: first + i * per_slot,
            stripes: STRIPES,
        })
        .collect();
    let payload_offset = first + SLOTS as u32 * per_slot;
    debug_assert_eq!(u64::from(payload_offset) * SECTOR, p.volume_len());
    let ivgen_hash = match p.ivgen {
        IvGen::Essiv(h) => Some(h),
        _ => p.ivgen_hash,
    };
    let mut header = LuksHeader {
        alg: p.alg,
        mode: p.mode,
        ivgen: p.ivgen,
        ivgen_hash,
        hash: p.hash,
        payload_offset,
        key_bytes: kb as u32,
        mk_digest,
        mk_salt,
        mk_iterations,
        uuid: uuid()?,
        slots,
    };
    let iters = iterations_for(p.hash, kb, p.iter_time_ms);
    let (slot, material) = make_slot(&header, &master, password, iters, first)?;
    header.slots[0] = slot;
    let mut bytes = vec![0u8; payload_offset as usize * SECTOR as usize];
    bytes[..super::luks::HEADER_LEN].copy_from_slice(&header.encode()?);
    let at = first as usize * SECTOR as usize;
    bytes[at..at + material.len()].copy_from_slice(&material);
    let cipher = SectorCipher::new(p.alg, p.mode, p.ivgen, &master)?;
    Ok(NewVolume { header, bytes, cipher })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatted_volume_unlocks_with_its_password_only() {
        let p = LuksParams { iter_time_ms: 1, ..Default::default() };
        let pw = Secret::new(b"pw".to_vec());
        let v = format(&p, &pw).unwrap();
        assert_eq!(v.header.payload_offset, 4040, "QEMU's layout for aes-256-xts");
        let parsed = LuksHeader::parse(&v.bytes).unwrap();
        let read = |buf: &mut [u8], off: u64| -> Result<()> {
            buf.copy_from_slice(&v.bytes[off as usize..off as usize + buf.len()]);
            Ok(())
        };
        let c = parsed.unlock(&pw, &read).unwrap();
        let mut a = vec![7u8; 1024];
        let mut b = a.clone();
        c.apply(3, &mut a, true);
        v.cipher.apply(3, &mut b, true);
        assert_eq!(a, b, "the unlocked key is the master key");
        assert!(parsed.unlock(&Secret::new(b"other".to_vec()), &read).is_err());
    }
}
