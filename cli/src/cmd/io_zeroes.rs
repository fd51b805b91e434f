//! The `detect-zeroes` open option of qemu-io: a write whose buffer is all
//! zeros becomes a zero write, which may deallocate the range with
//! `detect-zeroes=unmap` when `discard=unmap` is set too (qemu-io does
//! not refuse `unmap` alone, it just never deallocates then).

use oxcow::{BlockDevice, BlockStatus, Result};

/// The option's value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DetectZeroes {
    /// Writes go out as given.
    #[default]
    Off,
    /// Zero buffers become zero writes that keep the range allocated.
    On,
    /// Zero buffers become zero writes that may deallocate.
    Unmap,
}

impl DetectZeroes {
    /// Parses `detect-zeroes=VALUE`; `None` for a value QEMU refuses (at
    /// open time, so the caller words the refusal as an open failure).
    pub fn parse(v: &str) -> Option<DetectZeroes> {
        match v {
            "off" => Some(DetectZeroes::Off),
            "on" => Some(DetectZeroes::On),
            "unmap" => Some(DetectZeroes::Unmap),
            _ => None,
        }
    }

    /// QEMU's words for a value [`parse`](Self::parse) refused.
    pub fn refusal(v: &str) -> String {
        format!("invalid parameter value: {v}")
    }
}

/// A device whose all-zero writes become zero writes.
pub struct Detecting<'a> {
    pub dev: &'a dyn BlockDevice,
    pub mode: DetectZeroes,
    /// `discard=unmap`: whether deallocation is allowed at all.
    pub discard_unmap: bool,
}

impl BlockDevice for Detecting<'_> {
    fn len(&self) -> u64 {
        self.dev.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.dev.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.mode != DetectZeroes::Off && !buf.is_empty() && buf.iter().all(|&b| b == 0) {
            let unmap = self.mode == DetectZeroes::Unmap && self.discard_unmap;
            return self.dev.write_zeroes(offset, buf.len() as u64, unmap);
        }
        self.dev.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.dev.write_zeroes(offset, len, may_unmap)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.dev.discard(offset, len)
    }
    fn flush(&self) -> Result<()> {
        self.dev.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.dev.block_status(offset, len)
    }
    fn backing(&self) -> Option<&dyn BlockDevice> {
        self.dev.backing()
    }
    fn format_name(&self) -> &'static str {
        self.dev.format_name()
    }
    fn is_read_only(&self) -> bool {
        self.dev.is_read_only()
    }
    fn resize(&self, new_len: u64) -> Result<()> {
        self.dev.resize(new_len)
    }
    fn close(&self) -> Result<()> {
        self.dev.close()
    }
    fn dirty_bitmap_extents(&self, name: &str, offset: u64, len: u64) -> Option<Result<Vec<(u64, u64, bool)>>> {
        self.dev.dirty_bitmap_extents(name, offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_as_qemu_reads_them() {
        assert_eq!(DetectZeroes::parse("unmap"), Some(DetectZeroes::Unmap));
        assert_eq!(DetectZeroes::parse("off"), Some(DetectZeroes::Off));
        assert_eq!(DetectZeroes::parse("yes"), None);
        assert_eq!(DetectZeroes::refusal("yes"), "invalid parameter value: yes");
    }
}
