//! L1 table entries.
//!
//! ```text
//!  bit 63     COPIED: the L2 table's refcount is exactly one
//!  bits 56-62 reserved (0)
//!  bits 9-55  host offset of the L2 table (cluster aligned; 0 = none)
//!  bits 0-8   reserved (0)
//! ```

/// Bit 63: refcount of the L2 table is exactly one.
pub const COPIED: u64 = 1 << 63;
/// Bits 9..=55: the L2 table's host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits that must be zero.
pub const RESERVED_MASK: u64 = !(COPIED | OFFSET_MASK);

/// One L1 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L1Entry(pub u64);

impl L1Entry {
    /// An entry pointing at an L2 table.
    pub fn new(l2_offset: u64, copied: bool) -> Self {
        L1Entry((l2_offset & OFFSET_MASK) | if copied { COPIED } else { 0 })
    }
    /// Host offset of the L2 table, 0 when unallocated.
    pub fn l2_offset(self) -> u64 {
        self.0 & OFFSET_MASK
    }
    /// Whether the COPIED flag is set.
    pub fn copied(self) -> bool {
        self.0 & COPIED != 0
    }
    /// Reserved bits that are set (should be 0).
    pub fn reserved_bits(self) -> u64 {
        self.0 & RESERVED_MASK
    }
    /// Whether the L2 offset is misaligned for this cluster size.
    pub fn misaligned(self, cluster_size: u64) -> bool {
        !self.l2_offset().is_multiple_of(cluster_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(off in 0u64..(1 << 47), copied: bool) {
            let off = off << 9;
            let e = L1Entry::new(off, copied);
            prop_assert_eq!(e.l2_offset(), off);
            prop_assert_eq!(e.copied(), copied);
            prop_assert_eq!(e.reserved_bits(), 0);
        }
    }
}
