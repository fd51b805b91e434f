//! Raw images: the file is the disk.

use crate::device::{check_range, BlockDevice, BlockStatus};
use crate::storage::Storage;
use crate::{Error, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A raw disk image over any storage.
pub struct RawImage {
    storage: Arc<dyn Storage>,
    len: AtomicU64,
    read_only: bool,
    /// The format was guessed, not given: refuse writes that would put a
    /// format magic into sector 0 (a guest could otherwise turn its disk
    /// into a qcow2 image pointing at host files).
    probed: bool,
    /// Every write is durable before it completes (cache=writethrough,
    /// directsync).
    writethrough: bool,
}

impl RawImage {
    /// Wraps `storage` as a raw image.
    pub fn new(storage: Arc<dyn Storage>, read_only: bool, probed: bool) -> Result<Self> {
        let len = storage.len().map_err(|e| Error::io("reading raw image size", e))?;
        Ok(RawImage { storage, len: AtomicU64::new(len), read_only, probed, writethrough: false })
    }

    /// Makes every write, write-zeroes and discard durable before it
    /// completes (cache=writethrough and directsync).
    pub fn writethrough(mut self, on: bool) -> Self {
        self.writethrough = on;
        self
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly("image opened read-only".into()));
        }
        Ok(())
    }

    /// Completes a modifying request: in writethrough mode it is durable
    /// before the caller hears of it.
    fn complete(&self, r: std::io::Result<()>, what: &'static str) -> Result<()> {
        r.map_err(|e| Error::io(what, e))?;
        if self.writethrough {
            self.storage.flush().map_err(|e| Error::io("flushing raw image", e))?;
        }
        Ok(())
    }
}

impl BlockDevice for RawImage {
    fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.len())?;
        self.storage.read_at(buf, offset).map_err(|e| Error::io("reading raw image", e))
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writable()?;
        check_range(offset, buf.len() as u64, self.len())?;
        if self.probed && offset < 512 && !buf.is_empty() {
            let head = &buf[..buf.len().min((512 - offset) as usize)];
            let mut sector = [0u8; 512];
            self.storage.read_at(&mut sector, 0).map_err(|e| Error::io("reading raw image", e))?;
            sector[offset as usize..offset as usize + head.len()].copy_from_slice(head);
            if crate::format::has_magic(&sector) {
                return Err(Error::invalid(
                    "refusing to write a qcow2 magic into sector 0 of an image whose format was probed as raw; give -f raw",
                ));
            }
        }
        self.complete(self.storage.write_at(buf, offset), "writing raw image")
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.writable()?;
        check_range(offset, len, self.len())?;
        if may_unmap {
            self.complete(self.storage.punch_hole(offset, len), "punching hole in raw image")
        } else {
            self.complete(
                crate::storage::write_zeros_chunked(&*self.storage, offset, len),
                "writing zeroes to raw image",
            )
        }
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.writable()?;
        check_range(offset, len, self.len())?;
        self.complete(self.storage.punch_hole(offset, len), "discarding in raw image")
    }
    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.storage.flush().map_err(|e| Error::io("flushing raw image", e))
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let size = self.len();
        if offset >= size || len == 0 {
            return Err(Error::invalid("block status past the end of the image"));
        }
        let len = len.min(size - offset);
        let (zero, n) = match self.storage.extent_at(offset) {
            Some((is_data, end)) => (!is_data, end.min(offset + len) - offset),
            None => (false, len),
        };
        Ok(BlockStatus {
            offset,
            length: n,
            allocated: true,
            zero,
            data: !zero,
            compressed: false,
            host_offset: Some(offset),
            depth: 0,
        })
    }
    fn format_name(&self) -> &'static str {
        "raw"
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
    fn resize(&self, new_len: u64) -> Result<()> {
        self.writable()?;
        self.storage.set_len(new_len).map_err(|e| Error::io("resizing raw image", e))?;
        self.len.store(new_len, Ordering::Release);
        Ok(())
    }
}

impl std::fmt::Debug for RawImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawImage")
            .field("len", &self.len.load(Ordering::Relaxed))
            .field("read_only", &self.read_only)
            .field("probed", &self.probed)
            .finish_non_exhaustive()
    }
}
