//! Feature bits of the v3 header.

/// Incompatible feature bits (header bytes 72..80).
#[derive(Debug)]
pub struct Incompatible;
impl Incompatible {
    /// Refcounts may be inconsistent (lazy refcounts, unclean close).
    pub const DIRTY: u64 = 1 << 0;
    /// Metadata may be corrupt; no writes.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in an external data file.
    pub const DATA_FILE: u64 = 1 << 2;
    /// `compression_type` is non-zero.
    pub const COMPRESSION: u64 = 1 << 3;
    /// L2 entries are 128-bit with subcluster bitmaps.
    pub const EXTENDED_L2: u64 = 1 << 4;
    /// Every bit oxcow understands.
    pub const KNOWN: u64 = 0x1f;
    /// Names of the known bits, for error messages.
    pub fn name(bit: u32) -> Option<&'static str> {
        Some(match bit {
            0 => "dirty bit",
            1 => "corrupt bit",
            2 => "external data file",
            3 => "compression type",
            4 => "extended L2 entries",
            _ => return None,
        })
    }
}

/// Compatible feature bits (header bytes 80..88).
#[derive(Debug)]
pub struct Compatible;
impl Compatible {
    /// Refcount updates may be postponed while the dirty bit is set.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Autoclear feature bits (header bytes 88..96).
#[derive(Debug)]
pub struct Autoclear;
impl Autoclear {
    /// The bitmaps extension is consistent.
    pub const BITMAPS: u64 = 1 << 0;
    /// The external data file reads as a standalone raw image.
    pub const DATA_FILE_RAW: u64 = 1 << 1;
    /// Every bit oxcow maintains (others are cleared on a writable open).
    pub const KNOWN: u64 = 0x3;
}
