//! A storage that ignores flushes: QEMU's cache=unsafe.

use super::Storage;
use std::io;
use std::sync::Arc;

/// Passes everything to the storage it wraps except flushes, which it
/// drops: faster, and a crash may lose anything written (QEMU's
/// `cache=unsafe`). A layer of its own, so what lies beneath sees exactly
/// the syncs that reach the host.
pub struct NoFlushStorage(pub Arc<dyn Storage>);

impl std::fmt::Debug for NoFlushStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoFlushStorage").finish_non_exhaustive()
    }
}

impl Storage for NoFlushStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.punch_hole(offset, len)
    }
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.allocate(offset, len)
    }
    fn allocated_size(&self) -> io::Result<u64> {
        self.0.allocated_size()
    }
    fn extent_at(&self, offset: u64) -> Option<(bool, u64)> {
        self.0.extent_at(offset)
    }
    fn debug_event(&self, event: super::BlkdebugEvent) {
        self.0.debug_event(event)
    }
}
