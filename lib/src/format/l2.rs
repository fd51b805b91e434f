//! L2 table entries, standard (64-bit) and extended (128-bit).
//!
//! ```text
//!  standard entry (and first word of an extended one):
//!   bit 63     COPIED: refcount exactly one (standard clusters only)
//!   bit 62     compressed
//!   bits 0-61  cluster descriptor:
//!     standard:   bit 0 reads-as-zero (v3, not with extended L2),
//!                 bits 9-55 host cluster offset, others reserved
//!     compressed: see `compressed`
//!  extended entry, second word (subcluster bitmap, standard clusters only):
//!   bits 0-31  subcluster x allocated
//!   bits 32-63 subcluster x-32 reads as zero
//! ```

use super::be::{put_u64, u64_at};
use super::compressed::CompressedDescriptor;

/// Bit 63 of the first word.
pub const COPIED: u64 = 1 << 63;
/// Bit 62 of the first word.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard descriptor.
pub const ZERO: u64 = 1;
/// Host offset bits of a standard descriptor.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of a standard descriptor (bits 1-8 and 56-61).
pub const STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;

/// The subcluster bitmap of an extended L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SubclusterBitmap(pub u64);

impl SubclusterBitmap {
    /// Bitmap of subclusters that are allocated.
    pub fn alloc(self) -> u32 {
        self.0 as u32
    }
    /// Bitmap of subclusters that read as zero.
    pub fn zero(self) -> u32 {
        (self.0 >> 32) as u32
    }
    /// Builds from the two halves.
    pub fn from_parts(alloc: u32, zero: u32) -> Self {
        SubclusterBitmap(u64::from(alloc) | (u64::from(zero) << 32))
    }
}

/// How one guest cluster (or subcluster) is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterKind {
    /// Not allocated here: reads from the backing file, or zeros.
    Unallocated,
    /// Reads as zeros; `Some(host)` when a preallocated cluster is kept.
    Zero(Option<u64>),
    /// Data at this host offset.
    Normal(u64),
    /// Compressed data.
    Compressed(CompressedDescriptor),
}

/// One L2 entry; `bitmap` is zero for standard (64-bit) entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L2Entry {
    /// The first (or only) word.
    pub word: u64,
    /// The subcluster bitmap (extended entries only).
    pub bitmap: SubclusterBitmap,
}

impl L2Entry {
    /// Whether bit 62 is set.
    pub fn is_compressed(self) -> bool {
        self.word & COMPRESSED != 0
    }
    /// Whether the COPIED flag is set.
    pub fn copied(self) -> bool {
        self.word & COPIED != 0
    }
    /// Host cluster offset of a standard entry (0 if none).
    pub fn host_offset(self) -> u64 {
        if self.is_compressed() {
            0
        } else {
            self.word & OFFSET_MASK
        }
    }
    /// Reserved bits set in a standard descriptor.
    pub fn reserved_bits(self) -> u64 {
        if self.is_compressed() {
            0
        } else {
            self.word & STD_RESERVED_MASK
        }
    }
    /// A standard entry for data at `host`.
    pub fn normal(host: u64, copied: bool) -> Self {
        L2Entry { word: (host & OFFSET_MASK) | if copied { COPIED } else { 0 }, bitmap: SubclusterBitmap(0) }
    }
    /// A compressed entry.
    pub fn compressed(d: CompressedDescriptor, cluster_bits: u32) -> Self {
        L2Entry { word: COMPRESSED | d.encode(cluster_bits), bitmap: SubclusterBitmap(0) }
    }
}

/// Geometry of L2 tables for one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L2Layout {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Whether entries are 128-bit.
    pub extended: bool,
}

impl L2Layout {
    /// Bytes per entry.
    pub fn entry_size(self) -> usize {
        if self.extended {
            16
        } else {
            8
        }
    }
    /// Entries per table.
    pub fn entries(self) -> u64 {
        (1u64 << self.cluster_bits) / self.entry_size() as u64
    }
    /// Bytes per subcluster (a whole cluster without extended L2).
    pub fn subcluster_size(self) -> u64 {
        if self.extended {
            (1u64 << self.cluster_bits) / u64::from(SUBCLUSTERS)
        } else {
            1u64 << self.cluster_bits
        }
    }
    /// Reads entry `index` of a table.
    pub fn get(self, table: &[u8], index: usize) -> L2Entry {
        let at = index * self.entry_size();
        let word = u64_at(table, at);
        let bitmap = if self.extended { SubclusterBitmap(u64_at(table, at + 8)) } else { SubclusterBitmap(0) };
        L2Entry { word, bitmap }
    }
    /// Writes entry `index` of a table.
    pub fn set(self, table: &mut [u8], index: usize, e: L2Entry) {
        let at = index * self.entry_size();
        put_u64(table, at, e.word);
        if self.extended {
            put_u64(table, at + 8, e.bitmap.0);
        }
    }
    /// How subcluster `sub` (0 without extended L2) of a cluster reads,
    /// `v3` telling whether the zero flag is meaningful.
    pub fn classify(self, e: L2Entry, sub: u32, v3: bool) -> ClusterKind {
        if e.is_compressed() {
            return ClusterKind::Compressed(CompressedDescriptor::decode(
                e.word & !(COPIED | COMPRESSED),
                self.cluster_bits,
            ));
        }
        let host = e.word & OFFSET_MASK;
        if self.extended {
            let bit = 1u32 << sub;
            if e.bitmap.alloc() & bit != 0 {
                ClusterKind::Normal(host)
            } else if e.bitmap.zero() & bit != 0 {
                ClusterKind::Zero(if host != 0 { Some(host) } else { None })
            } else {
                ClusterKind::Unallocated
            }
        } else if v3 && e.word & ZERO != 0 {
            ClusterKind::Zero(if host != 0 { Some(host) } else { None })
        } else if host != 0 || e.word & COPIED != 0 {
            // Offset 0 with COPIED set is legal with external data files.
            ClusterKind::Normal(host)
        } else {
            ClusterKind::Unallocated
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn classify_standard() {
        let l = L2Layout { cluster_bits: 16, extended: false };
        assert_eq!(l.classify(L2Entry::default(), 0, true), ClusterKind::Unallocated);
        assert_eq!(l.classify(L2Entry { word: 1, ..Default::default() }, 0, true), ClusterKind::Zero(None));
        assert_eq!(l.classify(L2Entry { word: 1, ..Default::default() }, 0, false), ClusterKind::Unallocated);
        let e = L2Entry::normal(0x50000, true);
        assert_eq!(l.classify(e, 0, true), ClusterKind::Normal(0x50000));
        assert_eq!(
            l.classify(L2Entry { word: 0x50001, ..Default::default() }, 0, true),
            ClusterKind::Zero(Some(0x50000))
        );
    }

    #[test]
    fn classify_extended() {
        let l = L2Layout { cluster_bits: 16, extended: true };
        let e = L2Entry { word: 0x70000 | COPIED, bitmap: SubclusterBitmap::from_parts(0b01, 0b10) };
        assert_eq!(l.classify(e, 0, true), ClusterKind::Normal(0x70000));
        assert_eq!(l.classify(e, 1, true), ClusterKind::Zero(Some(0x70000)));
        assert_eq!(l.classify(e, 2, true), ClusterKind::Unallocated);
        assert_eq!(l.subcluster_size(), 2048);
        assert_eq!(l.entries(), 4096);
    }

    proptest! {
        #[test]
        fn table_round_trip(ext: bool, word: u64, bm: u64, idx in 0usize..512) {
            let l = L2Layout { cluster_bits: 13, extended: ext };
            let mut t = vec![0u8; 8192];
            let e = L2Entry { word, bitmap: SubclusterBitmap(if ext { bm } else { 0 }) };
            let idx = idx % l.entries() as usize;
            l.set(&mut t, idx, e);
            prop_assert_eq!(l.get(&t, idx), e);
        }
    }
}
