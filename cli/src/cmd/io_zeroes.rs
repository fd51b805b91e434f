//! The `detect-zeroes` open option of qemu-io: a write whose buffer is all
//! zeros becomes a zero write, which may deallocate the range with
//! `detect-zeroes=unmap` when `discard=unmap` is set too (qemu-io does
//! not refuse `unmap` alone, it just never deallocates then).

use oxcow::{BlockDevice, Result};

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
    oxcow::forward_block_device!(dev: len, read_at, write_zeroes, discard, flush, block_status, backing, format_name, is_read_only, resize, close, dirty_bitmap_extents);

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.mode != DetectZeroes::Off && !buf.is_empty() && buf.iter().all(|&b| b == 0) {
            let unmap = self.mode == DetectZeroes::Unmap && self.discard_unmap;
            return self.dev.write_zeroes(offset, buf.len() as u64, unmap);
        }
        self.dev.write_at(buf, offset)
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
