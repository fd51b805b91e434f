//! Persistent dirty bitmaps: the bitmap directory and bitmap tables.
//!
//! ```text
//!  directory entry:                      bitmap table entry (u64):
//!   0  8  bitmap_table_offset             bit 0      all ones (when offset 0)
//!   8  4  bitmap_table_size (entries)     bits 9-55  host offset of a data cluster
//!  12  4  flags (0 in_use, 1 auto,                   (0 = not allocated)
//!             2 extra_data_compatible)
//!  16  1  type (1 = dirty tracking)
//!  17  1  granularity_bits
//!  18  2  name_size
//!  20  4  extra_data_size
//!  24  n  extra data, then name, then zero padding to a multiple of 8
//! ```

use super::be::{pad8, u16_at, u32_at, u64_at};
use crate::{Error, Result};

/// Flag: the bitmap was not saved cleanly.
pub const FLAG_IN_USE: u32 = 1 << 0;
/// Flag: the bitmap tracks every write.
pub const FLAG_AUTO: u32 = 1 << 1;
/// Mask of a bitmap table entry's offset bits.
pub const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Fixed part of a directory entry.
pub const DIR_ENTRY_FIXED: usize = 24;

/// One bitmap directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapDirEntry {
    /// Host offset of the bitmap table.
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
    /// Flags (in_use, auto, extra_data_compatible).
    pub flags: u32,
    /// Bitmap type (1 = dirty tracking).
    pub kind: u8,
    /// log2 of bytes per bit.
    pub granularity_bits: u8,
    /// The bitmap's name.
    pub name: String,
}

impl BitmapDirEntry {
    /// Granularity in bytes.
    pub fn granularity(&self) -> u64 {
        1u64 << self.granularity_bits.min(63)
    }
}

/// Parses `count` directory entries from `buf`.
pub fn parse_directory(buf: &[u8], count: u32) -> Result<Vec<BitmapDirEntry>> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    for _ in 0..count {
        if buf.len() < pos + DIR_ENTRY_FIXED {
            return Err(Error::corrupt("bitmap directory truncated"));
        }
        let e = &buf[pos..];
        let name_size = u16_at(e, 18) as usize;
        let extra = u32_at(e, 20) as usize;
        if name_size == 0 || name_size > super::limits::MAX_BITMAP_NAME as usize {
            return Err(Error::field("bitmap name_size", name_size as u64, "must be 1..=1023"));
        }
        if extra > 1 << 20 {
            return Err(Error::field("bitmap extra_data_size", extra as u64, "too large"));
        }
        let total = DIR_ENTRY_FIXED + extra + name_size;
        if e.len() < total {
            return Err(Error::corrupt("bitmap directory truncated"));
        }
        let name = String::from_utf8_lossy(&e[DIR_ENTRY_FIXED + extra..total]).into_owned();
        out.push(BitmapDirEntry {
            table_offset: u64_at(e, 0),
            table_size: u32_at(e, 8),
            flags: u32_at(e, 12),
            kind: e[16],
            granularity_bits: e[17],
            name,
        });
        pos += pad8(total);
    }
    Ok(out)
}
