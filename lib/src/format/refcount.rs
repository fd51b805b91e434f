//! Refcount table entries and refcount blocks of any width (1..=64 bits).
//!
//! ```text
//!  refcount table entry:  bits 9-63 host offset of a refcount block
//!                         (0 = not allocated, all its refcounts are 0)
//!  refcount block:        cluster_size * 8 / refcount_bits entries;
//!                         widths < 8 pack LSB-first within each byte,
//!                         widths >= 8 are big-endian integers
//! ```

/// Mask of a refcount table entry's offset bits.
pub const REFTABLE_OFFSET_MASK: u64 = !0x1ff;

/// Geometry of refcount blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefcountLayout {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// log2 of the refcount width.
    pub refcount_order: u32,
}

impl RefcountLayout {
    /// Width in bits.
    pub fn bits(self) -> u32 {
        1 << self.refcount_order
    }
    /// Largest refcount representable.
    pub fn max(self) -> u64 {
        if self.bits() == 64 {
            u64::MAX
        } else {
            (1u64 << self.bits()) - 1
        }
    }
    /// log2 of the entries per block.
    pub fn block_entries_bits(self) -> u32 {
        self.cluster_bits + 3 - self.refcount_order
    }
    /// Entries per refcount block.
    pub fn block_entries(self) -> u64 {
        1 << self.block_entries_bits()
    }
    /// Reads entry `i` of a block.
    pub fn get(self, block: &[u8], i: usize) -> u64 {
        let bits = self.bits() as usize;
        if bits >= 8 {
            let bytes = bits / 8;
            let at = i * bytes;
            block[at..at + bytes].iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
        } else {
            let bit = i * bits;
            let byte = block[bit / 8];
            (u64::from(byte) >> (bit % 8)) & ((1 << bits) - 1)
        }
    }
    /// Writes entry `i` of a block; `v` must be at most [`Self::max`].
    pub fn set(self, block: &mut [u8], i: usize, v: u64) {
        let bits = self.bits() as usize;
        if bits >= 8 {
            let bytes = bits / 8;
            let at = i * bytes;
            for (k, b) in block[at..at + bytes].iter_mut().enumerate() {
                *b = (v >> (8 * (bytes - 1 - k))) as u8;
            }
        } else {
            let bit = i * bits;
            let mask = ((1u8 << bits) - 1) << (bit % 8);
            let byte = &mut block[bit / 8];
            *byte = (*byte & !mask) | (((v as u8) << (bit % 8)) & mask);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn every_width_round_trips(order in 0u32..=6, i in 0usize..4096, v: u64, other: u64) {
            let l = RefcountLayout { cluster_bits: 12, refcount_order: order };
            let n = l.block_entries() as usize;
            let i = i % n;
            let j = (i + 1) % n;
            let mut b = vec![0u8; 4096];
            let v = v & l.max();
            let other = other & l.max();
            l.set(&mut b, j, other);
            l.set(&mut b, i, v);
            prop_assert_eq!(l.get(&b, i), v);
            if j != i {
                prop_assert_eq!(l.get(&b, j), other);
            }
        }
    }

    #[test]
    fn sub_byte_is_lsb_first() {
        let l = RefcountLayout { cluster_bits: 9, refcount_order: 1 };
        let mut b = vec![0u8; 512];
        l.set(&mut b, 0, 1);
        l.set(&mut b, 3, 2);
        assert_eq!(b[0], 0b1000_0001);
    }
}
