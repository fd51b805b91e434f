//! A storage that encrypts what is written through it and decrypts what
//! is read, sector by sector: under a qcow2 image's data clusters (the IV
//! numbers host sectors, as QEMU's LUKS-in-qcow2 does) and under a raw
//! LUKS image's payload (the IV numbers guest sectors). Legacy qcow2 AES
//! numbers guest sectors under host clusters: its reads and writes name
//! both offsets (`read_iv`, `write_iv`).

use super::{SectorCipher, SECTOR};
use crate::storage::Storage;
use std::io;
use std::sync::{Arc, RwLock};

/// Encrypting view of `inner` from byte `base` on; offsets through the
/// view are relative to `base` and give the IV's sector number.
pub struct CryptStorage {
    inner: Arc<dyn Storage>,
    base: u64,
    cipher: Arc<SectorCipher>,
    /// Read-modify-write of partial sectors holds it exclusively, whole
    /// sector writes shared: a whole-sector write landing between an
    /// RMW's read and its write back would otherwise be undone for the
    /// bytes the partial write does not cover.
    rmw: RwLock<()>,
}

impl CryptStorage {
    /// A view of `inner` from `base`, keyed by `cipher`.
    pub fn new(inner: Arc<dyn Storage>, base: u64, cipher: Arc<SectorCipher>) -> CryptStorage {
        CryptStorage { inner, base, cipher, rmw: RwLock::new(()) }
    }

    fn span(offset: u64, len: usize) -> (u64, u64) {
        let start = offset / SECTOR * SECTOR;
        let end = (offset + len as u64).div_ceil(SECTOR) * SECTOR;
        (start, end)
    }

    fn read_sectors(&self, start: u64, end: u64, iv_start: u64) -> io::Result<Vec<u8>> {
        let mut b = vec![0u8; (end - start) as usize];
        self.inner.read_at(&mut b, self.base + start)?;
        self.cipher.apply(iv_start / SECTOR, &mut b, false);
        Ok(b)
    }

    /// Reads `buf` at `offset`, the IVs numbering sectors from `iv_offset`
    /// instead (legacy qcow2 AES counts guest sectors, not host ones).
    /// Both offsets must sit at the same place within a sector.
    pub fn read_iv(&self, buf: &mut [u8], offset: u64, iv_offset: u64) -> io::Result<()> {
        same_phase(offset, iv_offset)?;
        if offset.is_multiple_of(SECTOR) && (buf.len() as u64).is_multiple_of(SECTOR) {
            self.inner.read_at(buf, self.base + offset)?;
            self.cipher.apply(iv_offset / SECTOR, buf, false);
            return Ok(());
        }
        let (start, end) = Self::span(offset, buf.len());
        let skip = offset - start;
        let b = self.read_sectors(start, end, iv_offset - skip)?;
        buf.copy_from_slice(&b[skip as usize..skip as usize + buf.len()]);
        Ok(())
    }

    /// Writes `buf` at `offset`, the IVs numbering sectors from
    /// `iv_offset` (see [`CryptStorage::read_iv`]).
    pub fn write_iv(&self, buf: &[u8], offset: u64, iv_offset: u64) -> io::Result<()> {
        same_phase(offset, iv_offset)?;
        if offset.is_multiple_of(SECTOR) && (buf.len() as u64).is_multiple_of(SECTOR) {
            let mut b = buf.to_vec();
            self.cipher.apply(iv_offset / SECTOR, &mut b, true);
            let _g = self.rmw.read().unwrap_or_else(|p| p.into_inner());
            return self.inner.write_at(&b, self.base + offset);
        }
        let _g = self.rmw.write().unwrap_or_else(|p| p.into_inner());
        let (start, end) = Self::span(offset, buf.len());
        let skip = offset - start;
        let mut b = self.read_sectors(start, end, iv_offset - skip)?;
        b[skip as usize..skip as usize + buf.len()].copy_from_slice(buf);
        self.cipher.apply((iv_offset - skip) / SECTOR, &mut b, true);
        self.inner.write_at(&b, self.base + start)
    }
}

fn same_phase(offset: u64, iv_offset: u64) -> io::Result<()> {
    if offset % SECTOR == iv_offset % SECTOR {
        Ok(())
    } else {
        Err(io::Error::new(io::ErrorKind::InvalidInput, "encrypted I/O not aligned like its sector numbers"))
    }
}

impl Storage for CryptStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_iv(buf, offset, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_iv(buf, offset, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.inner.len()?.saturating_sub(self.base))
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(self.base + len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        // A hole would decrypt to noise: zeros are written encrypted.
        crate::storage::write_zeros_chunked(self, offset, len)
    }
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.allocate(self.base + offset, len)
    }
    fn allocated_size(&self) -> io::Result<u64> {
        self.inner.allocated_size()
    }
}

/// The data storage of an encrypted image opened without its key: every
/// data access fails.
#[derive(Debug)]
pub struct NoKey;

fn no_key() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, "the image is encrypted and no key was given")
}

impl Storage for NoKey {
    fn read_at(&self, _buf: &mut [u8], _offset: u64) -> io::Result<()> {
        Err(no_key())
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(no_key())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(0)
    }
    fn set_len(&self, _len: u64) -> io::Result<()> {
        Err(no_key())
    }
    fn punch_hole(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(no_key())
    }
}

impl std::fmt::Debug for CryptStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CryptStorage").field("base", &self.base).finish_non_exhaustive()
    }
}

/// A storage that only reports a length (the payload of a raw LUKS image
/// opened without its key, for `info`).
pub(super) struct PayloadLen(pub Arc<dyn Storage>, pub u64);

impl Storage for PayloadLen {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.0.flush()
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.1)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.punch_hole(offset, len)
    }
}
