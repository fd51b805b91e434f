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

use super::be::{pad8, put_u16, put_u32, put_u64, u16_at, u32_at, u64_at};
use crate::{Error, Result};

/// Flag: the bitmap was not saved cleanly.
pub const FLAG_IN_USE: u32 = 1 << 0;
/// Flag: the bitmap tracks every write.
pub const FLAG_AUTO: u32 = 1 << 1;
/// Flag: extra data unknown to the reader does not forbid using the bitmap.
pub const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
/// Flags the spec defines (the others are reserved, must be zero).
pub const FLAGS_KNOWN: u32 = 0x7;
/// The only bitmap type defined: dirty tracking.
pub const TYPE_DIRTY_TRACKING: u8 = 1;
/// A table entry with no offset and this bit reads as all ones.
pub const TABLE_ALL_ONES: u64 = 1;
/// Reserved bits of a table entry (1-8, 56-63).
pub const TABLE_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// Smallest granularity QEMU accepts (bits).
pub const MIN_GRANULARITY_BITS: u8 = 9;
/// Largest granularity QEMU accepts (bits).
pub const MAX_GRANULARITY_BITS: u8 = 31;
/// Most entries QEMU accepts in one bitmap table.
pub const MAX_TABLE_ENTRIES: u32 = 0x0800_0000;
/// Largest bitmap QEMU accepts, in bytes of bitmap data.
pub const MAX_BITMAP_BYTES: u64 = 0x2000_0000;
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
    /// Extra data, kept verbatim.
    pub extra: Vec<u8>,
}

impl BitmapDirEntry {
    /// Granularity in bytes.
    pub fn granularity(&self) -> u64 {
        1u64 << self.granularity_bits.min(63)
    }

    /// Bytes this entry takes in the directory (padding included).
    pub fn disk_len(&self) -> usize {
        pad8(DIR_ENTRY_FIXED + self.extra.len() + self.name.len())
    }
}

/// Encodes a directory (the inverse of `parse_directory`). Names longer
/// than the spec allows are the caller's error, refused before this.
pub fn encode_directory(entries: &[BitmapDirEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let at = out.len();
        out.resize(at + e.disk_len(), 0);
        let b = &mut out[at..];
        put_u64(b, 0, e.table_offset);
        put_u32(b, 8, e.table_size);
        put_u32(b, 12, e.flags);
        b[16] = e.kind;
        b[17] = e.granularity_bits;
        put_u16(b, 18, e.name.len() as u16);
        put_u32(b, 20, e.extra.len() as u32);
        b[DIR_ENTRY_FIXED..DIR_ENTRY_FIXED + e.extra.len()].copy_from_slice(&e.extra);
        let n = DIR_ENTRY_FIXED + e.extra.len();
        b[n..n + e.name.len()].copy_from_slice(e.name.as_bytes());
    }
    out
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
        let extra_data = e[DIR_ENTRY_FIXED..DIR_ENTRY_FIXED + extra].to_vec();
        out.push(BitmapDirEntry {
            table_offset: u64_at(e, 0),
            table_size: u32_at(e, 8),
            flags: u32_at(e, 12),
            kind: e[16],
            granularity_bits: e[17],
            name,
            extra: extra_data,
        });
        pos += pad8(total);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_round_trips_with_extra_data_and_padding() {
        let entries = vec![
            BitmapDirEntry {
                table_offset: 0x30000,
                table_size: 1,
                flags: FLAG_AUTO,
                kind: TYPE_DIRTY_TRACKING,
                granularity_bits: 16,
                name: "b0".into(),
                extra: Vec::new(),
            },
            BitmapDirEntry {
                table_offset: 0x40000,
                table_size: 3,
                flags: FLAG_IN_USE | FLAG_EXTRA_DATA_COMPATIBLE,
                kind: TYPE_DIRTY_TRACKING,
                granularity_bits: 9,
                name: "a longer name".into(),
                extra: vec![1, 2, 3],
            },
        ];
        let bytes = encode_directory(&entries);
        assert_eq!(bytes.len(), 32 + 40);
        assert_eq!(parse_directory(&bytes, 2).unwrap(), entries);
    }
}
