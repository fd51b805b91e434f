//! Raw LUKS images (`-f luks`): a LUKS1 header, its key material, then
//! the encrypted payload, whose sector numbers (the IVs) count from the
//! payload's start.

use super::{luks, CryptStorage, LuksHeader, Secret, SECTOR};
use crate::device::{BlockDevice, BlockStatus};
use crate::raw::RawImage;
use crate::storage::Storage;
use crate::{Error, Result};
use std::sync::Arc;

/// An open raw LUKS image.
pub struct LuksImage {
    header: LuksHeader,
    payload: RawImage,
}

impl LuksImage {
    /// Opens `file`, unlocking a key slot with `password`; without one,
    /// only with `no_io` (metadata only: data I/O fails).
    pub fn open(file: Arc<dyn Storage>, password: Option<&Secret>, read_only: bool, no_io: bool) -> Result<LuksImage> {
        let mut b = vec![0u8; luks::HEADER_LEN];
        file.read_at(&mut b, 0).map_err(|e| Error::io("reading the LUKS header", e))?;
        let header = LuksHeader::parse(&b)?;
        let base = u64::from(header.payload_offset) * SECTOR;
        let data: Arc<dyn Storage> = match password {
            _ if no_io => Arc::new(super::NoKey),
            Some(pw) => {
                let read = |buf: &mut [u8], off: u64| -> Result<()> {
                    if off + buf.len() as u64 > base {
                        return Err(Error::corrupt("LUKS key material overlaps the payload"));
                    }
                    file.read_at(buf, off).map_err(|e| Error::io("reading LUKS key material", e))
                };
                let cipher = header.unlock(pw, &read)?;
                Arc::new(CryptStorage::new(file.clone(), base, Arc::new(cipher)))
            }
            None => return Err(Error::invalid("Parameter 'key-secret' is required for cipher")),
        };
        let payload = if no_io {
            let len = file.len().map_err(|e| Error::io("reading image size", e))?.saturating_sub(base);
            RawImage::new(Arc::new(super::storage::PayloadLen(data, len)), true, false)?
        } else {
            RawImage::new(data, read_only, false)?
        };
        Ok(LuksImage { header, payload })
    }

    /// Formats `file` as a raw LUKS volume of `size` guest bytes whose
    /// key slot 0 opens with `password`. With `zero_fill` the payload is
    /// written with encrypted zeros (preallocation=full); otherwise it is
    /// left sparse, reading as noise until written, as QEMU leaves it.
    pub fn create(
        file: &Arc<dyn Storage>,
        size: u64,
        params: &super::LuksParams,
        password: &Secret,
        zero_fill: bool,
    ) -> Result<()> {
        let vol = super::format_luks(params, password)?;
        let err = |e| Error::io("writing the LUKS header", e);
        file.set_len(0).map_err(err)?;
        file.write_at(&vol.bytes, 0).map_err(err)?;
        let base = vol.bytes.len() as u64;
        file.set_len(base + size).map_err(err)?;
        if zero_fill {
            let c = CryptStorage::new(file.clone(), base, Arc::new(vol.cipher));
            crate::storage::write_zeros_chunked(&c, 0, size).map_err(err)?;
        }
        file.flush().map_err(err)
    }

    /// The header.
    pub fn header(&self) -> &LuksHeader {
        &self.header
    }

    /// Makes writes durable before they complete.
    pub fn writethrough(mut self, on: bool) -> Self {
        self.payload = self.payload.writethrough(on);
        self
    }
}

impl BlockDevice for LuksImage {
    fn len(&self) -> u64 {
        self.payload.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.payload.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.payload.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.payload.write_zeroes(offset, len, may_unmap)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // A discarded range would decrypt to noise; keep the data as QEMU's
        // luks driver does for its payload.
        let _ = (offset, len);
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        self.payload.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let mut s = self.payload.block_status(offset, len)?;
        // Holes in the host file are not zeros once decrypted.
        s.zero = false;
        s.data = true;
        Ok(s)
    }
    fn format_name(&self) -> &'static str {
        "luks"
    }
    fn is_read_only(&self) -> bool {
        self.payload.is_read_only()
    }
    fn resize(&self, new_len: u64) -> Result<()> {
        self.payload.resize(new_len)
    }
}

impl std::fmt::Debug for LuksImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LuksImage").field("payload", &self.payload).finish_non_exhaustive()
    }
}
