//! A cache mode's request-level promises for a device that does not keep
//! them itself.
//!
//! Raw and qcow2 images keep writethrough themselves, and the files under
//! them drop flushes for cache=unsafe (see [`crate::image::CacheMode`]). A
//! raw network export has neither: its device is the NBD client. This
//! wrapper gives it the same behaviour: in writethrough mode every write,
//! write-zeroes and discard is flushed before it completes; in unsafe mode
//! flushes are not sent.

use crate::device::BlockDevice;
use crate::Result;
use std::sync::Arc;

/// `inner` with writethrough and/or ignored flushes.
pub struct CacheModeDevice {
    inner: Arc<dyn BlockDevice>,
    writethrough: bool,
    ignore_flushes: bool,
}

impl CacheModeDevice {
    /// Wraps `inner`: `writethrough` flushes after every modifying request,
    /// `ignore_flushes` drops flushes (the two exclude each other; with
    /// both, flushes are dropped).
    pub fn new(inner: Arc<dyn BlockDevice>, writethrough: bool, ignore_flushes: bool) -> Self {
        CacheModeDevice { inner, writethrough, ignore_flushes }
    }

    fn complete(&self, r: Result<()>) -> Result<()> {
        r?;
        if self.writethrough {
            self.flush()?;
        }
        Ok(())
    }
}

impl BlockDevice for CacheModeDevice {
    crate::forward_block_device!(inner: len, read_at, block_status, backing, format_name, is_read_only, resize, dirty_bitmap_extents);

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.complete(self.inner.write_at(buf, offset))
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.complete(self.inner.write_zeroes(offset, len, may_unmap))
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.complete(self.inner.discard(offset, len))
    }
    fn flush(&self) -> Result<()> {
        if self.ignore_flushes {
            return Ok(());
        }
        self.inner.flush()
    }
    fn close(&self) -> Result<()> {
        if self.ignore_flushes {
            return Ok(());
        }
        self.inner.close()
    }
}
