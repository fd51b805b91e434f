//! [`OffsetDevice`]: a device seen from an offset on (qemu-nbd's `-o`),
//! e.g. a disk image stored inside a tar archive.

use crate::device::check_range;
use crate::{BlockDevice, BlockStatus, Error, Result};
use std::sync::Arc;

/// The bytes of `inner` from `offset` to its end, as a device of their own.
pub struct OffsetDevice {
    inner: Arc<dyn BlockDevice>,
    offset: u64,
}

impl std::fmt::Debug for OffsetDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OffsetDevice").field("offset", &self.offset).field("len", &self.len()).finish()
    }
}

impl OffsetDevice {
    /// The part of `inner` past `offset`, which must not lie past its end
    /// (refused in qemu-nbd's words otherwise; at the very end, the device
    /// is empty, as qemu-nbd's export is).
    pub fn new(inner: Arc<dyn BlockDevice>, offset: u64) -> Result<OffsetDevice> {
        if offset > inner.len() {
            return Err(Error::invalid(format!(
                "Offset ({offset}) cannot be greater than size of the containing file ({})",
                inner.len()
            )));
        }
        Ok(OffsetDevice { inner, offset })
    }
}

impl BlockDevice for OffsetDevice {
    fn len(&self) -> u64 {
        self.inner.len() - self.offset
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.len())?;
        self.inner.read_at(buf, offset + self.offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.len())?;
        self.inner.write_at(buf, offset + self.offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        check_range(offset, len, self.len())?;
        self.inner.write_zeroes(offset + self.offset, len, may_unmap)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.len())?;
        self.inner.discard(offset + self.offset, len)
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let mut s = self.inner.block_status(offset + self.offset, len)?;
        s.offset -= self.offset;
        Ok(s)
    }
    // No backing device: the layers below would be addressed from their
    // own start, and allocation depth is reported for this layer only.
    fn format_name(&self) -> &'static str {
        self.inner.format_name()
    }
    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }
    fn close(&self) -> Result<()> {
        self.inner.close()
    }
    fn dirty_bitmap_extents(&self, name: &str, offset: u64, len: u64) -> Option<Result<Vec<(u64, u64, bool)>>> {
        let r = self.inner.dirty_bitmap_extents(name, offset + self.offset, len)?;
        Some(r.map(|v| v.into_iter().map(|(at, n, dirty)| (at - self.offset, n, dirty)).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Mem(std::sync::Mutex<Vec<u8>>);
    impl BlockDevice for Mem {
        fn len(&self) -> u64 {
            self.0.lock().map(|v| v.len() as u64).unwrap_or(0)
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            let v = self.0.lock().map_err(|_| Error::invalid("poisoned"))?;
            buf.copy_from_slice(&v[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
            let mut v = self.0.lock().map_err(|_| Error::invalid("poisoned"))?;
            v[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn write_zeroes(&self, offset: u64, len: u64, _: bool) -> Result<()> {
            self.write_at(&vec![0; len as usize], offset)
        }
        fn discard(&self, _: u64, _: u64) -> Result<()> {
            Ok(())
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
        fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
            let mut s = BlockStatus::unallocated(offset, len);
            s.allocated = true;
            s.data = true;
            s.zero = false;
            Ok(s)
        }
        fn format_name(&self) -> &'static str {
            "raw"
        }
        fn is_read_only(&self) -> bool {
            false
        }
    }

    #[test]
    fn offset_window_maps_requests_and_status_past_the_offset() {
        let mem = Arc::new(Mem(std::sync::Mutex::new((0..=255u8).collect())));
        let d = OffsetDevice::new(mem.clone(), 200).unwrap();
        assert_eq!(d.len(), 56);
        let mut b = [0u8; 4];
        d.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [200, 201, 202, 203]);
        d.write_at(&[9, 9], 54).unwrap();
        let mut all = [0u8; 2];
        mem.read_at(&mut all, 254).unwrap();
        assert_eq!(all, [9, 9]);
        assert!(d.write_at(&[1, 2, 3], 54).is_err());
        assert_eq!(d.block_status(10, 5).unwrap().offset, 10);
        assert_eq!(OffsetDevice::new(mem.clone(), 256).unwrap().len(), 0);
        let e = OffsetDevice::new(mem, 257).err().unwrap();
        assert_eq!(e.to_string(), "Offset (257) cannot be greater than size of the containing file (256)");
    }
}
