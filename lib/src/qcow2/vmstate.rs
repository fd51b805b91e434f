//! The VM state area: where a hypervisor saves a running guest's memory
//! and device state next to the disk, for internal snapshots taken live.
//!
//! qcow2 has no separate structure for it. The area is addressed as guest
//! offsets past the end of the virtual disk, starting at the first L1
//! entry the disk does not use (so it never shares an L2 table with disk
//! data), and goes through the same L1/L2 mapping, allocation and
//! copy-on-write as the disk: the L1 table simply grows past the size the
//! disk needs. A snapshot copies the whole L1 table, area included, which
//! is how the state travels with it. QEMU lays it out the same way
//! (`qemu-io`'s `write -b` / `read -b`), so either tool reads what the
//! other wrote.

use super::Qcow2;
use crate::{BlockDevice, Error, Result};

impl Qcow2 {
    /// Guest bytes one L1 entry maps.
    fn l1_span(&self) -> u64 {
        self.g.cluster_size * self.g.l2_entries
    }

    /// Guest offset where the VM state area starts: the first L1 entry
    /// past those the virtual disk needs.
    pub fn vm_state_offset(&self) -> u64 {
        let span = self.l1_span();
        self.len().div_ceil(span) * span
    }

    /// The guest range `[start, end)` of `len` bytes at `pos` in the area.
    fn vm_state_range(&self, pos: u64, len: u64) -> Result<(u64, u64)> {
        let start = self.vm_state_offset().checked_add(pos);
        match start.and_then(|s| s.checked_add(len).map(|e| (s, e))) {
            Some(r) => Ok(r),
            None => Err(Error::invalid("VM state offset out of range")),
        }
    }

    /// Writes `buf` at offset `pos` of the VM state area, growing the L1
    /// table to cover it first when needed.
    pub fn write_vm_state(&self, buf: &[u8], pos: u64) -> Result<()> {
        let (start, end) = self.vm_state_range(pos, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let covered = self.lock_shared().map.l1().len() as u64 * self.l1_span();
        if end > covered {
            // The size stays; only the table grows (its size checks are
            // those of a disk reaching `end`).
            self.grow_l1_and_size(end, self.len())?;
        }
        self.write_unchecked(buf, start)
    }

    /// Reads `buf.len()` bytes at offset `pos` of the VM state area; what
    /// was never written reads as zeros (or as the backing file there).
    pub fn read_vm_state(&self, buf: &mut [u8], pos: u64) -> Result<()> {
        let (start, _) = self.vm_state_range(pos, buf.len() as u64)?;
        self.read_unchecked(buf, start)
    }
}
