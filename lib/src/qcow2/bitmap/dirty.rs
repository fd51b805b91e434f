//! One dirty bitmap in memory, stored the way it lies on disk: one chunk
//! per bitmap data cluster, so loading and storing are chunk copies and an
//! all-clean chunk (the common case) costs no memory.
//!
//! Bit `n` covers guest bytes `[n * granularity, (n + 1) * granularity)`;
//! within a chunk, bit `k` is bit `k % 8` of byte `k / 8` (the spec's
//! order), kept here as little-endian 64-bit words.

/// One bitmap data cluster's worth of bits.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Chunk {
    Clean,
    Bits(Box<[u64]>),
}

/// A dirty bitmap over a guest disk: which granularity-sized ranges were
/// written while it was enabled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    size: u64,
    granularity_bits: u8,
    /// log2 of the bits one chunk (one bitmap data cluster) holds.
    chunk_bits: u32,
    chunks: Vec<Chunk>,
}

impl DirtyBitmap {
    /// An all-clean bitmap over `size` guest bytes, one bit per
    /// `1 << granularity_bits` bytes, chunked by `cluster_bits` clusters.
    pub(crate) fn new(size: u64, granularity_bits: u8, cluster_bits: u32) -> DirtyBitmap {
        let mut b = DirtyBitmap { size, granularity_bits, chunk_bits: cluster_bits + 3, chunks: Vec::new() };
        b.chunks = vec![Chunk::Clean; b.chunk_count() as usize];
        b
    }

    /// Chunks (bitmap table entries) a bitmap of `size` bytes at
    /// `granularity_bits` needs with `cluster_bits` clusters, and its data
    /// in bytes: to check limits before allocating anything.
    pub(crate) fn geometry(size: u64, granularity_bits: u8, cluster_bits: u32) -> (u64, u64) {
        let bits = size.div_ceil(1 << granularity_bits);
        (bits.div_ceil(1 << (cluster_bits + 3)), bits.div_ceil(8))
    }

    /// Guest bytes covered.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Guest bytes per bit.
    pub fn granularity(&self) -> u64 {
        1 << self.granularity_bits
    }

    /// Number of bits.
    pub(crate) fn bit_count(&self) -> u64 {
        self.size.div_ceil(self.granularity())
    }

    /// Number of chunks (bitmap table entries) the size needs.
    pub(crate) fn chunk_count(&self) -> u64 {
        self.bit_count().div_ceil(1 << self.chunk_bits)
    }

    fn words_per_chunk(&self) -> usize {
        1usize << (self.chunk_bits - 6)
    }

    /// Marks the bits covering guest bytes `[offset, offset + len)`.
    pub(crate) fn set(&mut self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let end = offset.saturating_add(len).min(self.size);
        let first = offset >> self.granularity_bits;
        let last = (end - 1) >> self.granularity_bits;
        self.set_bits(first, last + 1);
    }

    /// Sets bits `[first, end)`, word by word.
    fn set_bits(&mut self, first: u64, end: u64) {
        let wpc = self.words_per_chunk();
        let mut bit = first;
        while bit < end {
            let chunk = (bit >> self.chunk_bits) as usize;
            let in_chunk = bit & ((1 << self.chunk_bits) - 1);
            let word = (in_chunk / 64) as usize;
            let lo = in_chunk % 64;
            let n = (64 - lo).min(end - bit);
            let mask = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << lo };
            let Some(c) = self.chunks.get_mut(chunk) else { return };
            if let Chunk::Clean = c {
                *c = Chunk::Bits(vec![0u64; wpc].into_boxed_slice());
            }
            if let Chunk::Bits(w) = c {
                w[word] |= mask;
            }
            bit += n;
        }
    }

    /// Whether bit `n` is set.
    fn bit(&self, n: u64) -> bool {
        match self.chunks.get((n >> self.chunk_bits) as usize) {
            Some(Chunk::Bits(w)) => {
                let k = n & ((1 << self.chunk_bits) - 1);
                w[(k / 64) as usize] >> (k % 64) & 1 != 0
            }
            _ => false,
        }
    }

    /// The first bit at or after `n` (below `end`) whose value is `dirty`,
    /// skipping clean chunks and uniform words whole.
    fn next(&self, mut n: u64, end: u64, dirty: bool) -> u64 {
        while n < end {
            let chunk = (n >> self.chunk_bits) as usize;
            let chunk_end = ((chunk as u64 + 1) << self.chunk_bits).min(end);
            match self.chunks.get(chunk) {
                None => return end,
                Some(Chunk::Clean) if !dirty => return n,
                Some(Chunk::Clean) => n = chunk_end,
                Some(Chunk::Bits(w)) => {
                    let k = n & ((1 << self.chunk_bits) - 1);
                    let word = w[(k / 64) as usize];
                    let v = if dirty { word } else { !word } >> (k % 64);
                    if v != 0 {
                        return (n + u64::from(v.trailing_zeros())).min(end);
                    }
                    n += 64 - k % 64;
                }
            }
        }
        end
    }

    /// The dirty and clean ranges of guest bytes `[offset, offset + len)`,
    /// in order, as `(start, length, dirty)`, clamped to the range and the
    /// disk. Adjacent ranges differ in `dirty`.
    pub fn extents(&self, offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
        let mut out = Vec::new();
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return out;
        }
        let g = self.granularity_bits;
        let end_bit = ((end - 1) >> g) + 1;
        let mut bit = offset >> g;
        let mut pos = offset;
        while pos < end {
            let dirty = self.bit(bit);
            let next = self.next(bit, end_bit, !dirty);
            let stop = (next << g).min(end);
            out.push((pos, stop - pos, dirty));
            pos = stop;
            bit = next;
        }
        out
    }

    /// The dirty ranges of the whole disk, as `(start, length)`.
    pub fn dirty_extents(&self) -> Vec<(u64, u64)> {
        self.extents(0, self.size).into_iter().filter(|e| e.2).map(|e| (e.0, e.1)).collect()
    }

    /// Number of guest bytes marked dirty (whole granules, clamped to the
    /// disk), as QEMU's `count` of a bitmap.
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_extents().iter().map(|e| e.1).sum()
    }

    /// Clears every bit.
    pub(crate) fn clear(&mut self) {
        self.chunks.iter_mut().for_each(|c| *c = Chunk::Clean);
    }

    /// Sets every bit `other` has set (granularities may differ: a bit is
    /// set wherever a dirty byte of `other` falls).
    pub(crate) fn merge(&mut self, other: &DirtyBitmap) {
        for (start, len) in other.dirty_extents() {
            self.set(start, len);
        }
    }

    /// Follows the disk to `size`: new bits are clean, bits past a shrunk
    /// end are dropped (the spec wants the unused tail bits zero).
    pub(crate) fn resize(&mut self, size: u64) {
        self.size = size;
        let n = self.chunk_count() as usize;
        self.chunks.resize(n, Chunk::Clean);
        self.mask_tail();
    }

    /// Zeroes the bits past the last one of the disk in the last chunk.
    fn mask_tail(&mut self) {
        let bits = self.bit_count();
        let per = 1u64 << self.chunk_bits;
        let used = bits % per;
        if used == 0 {
            return;
        }
        if let Some(Chunk::Bits(w)) = self.chunks.last_mut() {
            let full = (used / 64) as usize;
            if !used.is_multiple_of(64) {
                w[full] &= (1u64 << (used % 64)) - 1;
            }
            let tail = if !used.is_multiple_of(64) { full + 1 } else { full };
            w[tail..].iter_mut().for_each(|x| *x = 0);
        }
    }

    /// Chunk `i` as bytes in the on-disk bit order, or `None` when it is
    /// all clean.
    pub(crate) fn chunk_bytes(&self, i: usize) -> Option<Vec<u8>> {
        match self.chunks.get(i)? {
            Chunk::Clean => None,
            Chunk::Bits(w) if w.iter().all(|&x| x == 0) => None,
            Chunk::Bits(w) => Some(w.iter().flat_map(|x| x.to_le_bytes()).collect()),
        }
    }

    /// Installs chunk `i` from on-disk bytes (a cluster), or all set.
    /// Bits past the disk's end are dropped, as the spec wants them zero.
    pub(crate) fn load_chunk(&mut self, i: usize, bytes: Option<&[u8]>) {
        let wpc = self.words_per_chunk();
        let words: Box<[u64]> = match bytes {
            Some(b) => (0..wpc)
                .map(|k| b.get(k * 8..k * 8 + 8).map_or(0, |s| u64::from_le_bytes(s.try_into().unwrap_or([0; 8]))))
                .collect(),
            None => vec![u64::MAX; wpc].into_boxed_slice(),
        };
        if let Some(c) = self.chunks.get_mut(i) {
            *c = if words.iter().all(|&x| x == 0) { Chunk::Clean } else { Chunk::Bits(words) };
        }
        if i + 1 == self.chunks.len() {
            self.mask_tail();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_and_extents_at_granularity() {
        // 64 MiB at 64 KiB granularity: 1024 bits, one chunk of 4096
        // (512-byte clusters).
        let mut b = DirtyBitmap::new(64 << 20, 16, 9);
        assert_eq!(b.chunk_count(), 1);
        b.set(1 << 20, 65536);
        b.set((8 << 20) + 1, 1);
        assert_eq!(b.dirty_extents(), vec![(1 << 20, 65536), (8 << 20, 65536)]);
        assert_eq!(b.extents(0, 2 << 20)[0], (0, 1 << 20, false));
        assert_eq!(b.dirty_bytes(), 2 * 65536);
        let bytes = b.chunk_bytes(0).unwrap();
        assert_eq!(bytes[2], 1, "bit 16 is bit 0 of byte 2");
    }

    #[test]
    fn extents_cross_chunks_and_clamp_to_the_disk() {
        // 512-byte clusters: 4096 bits per chunk; 512-byte granularity.
        let size = 3 * 4096 * 512 + 1000;
        let mut b = DirtyBitmap::new(size, 9, 9);
        assert_eq!(b.chunk_count(), 4);
        b.set(4095 * 512, 3 * 512);
        b.set(size - 10, 100);
        assert_eq!(b.dirty_extents(), vec![(4095 * 512, 3 * 512), (size - 488, 488)]);
        let mut c = DirtyBitmap::new(size, 12, 9);
        c.merge(&b);
        assert_eq!(c.dirty_extents()[0], (4088 * 512, 4096 * 2));
    }

    #[test]
    fn shrink_drops_tail_bits_and_load_masks_them() {
        let mut b = DirtyBitmap::new(1 << 20, 9, 9);
        b.set(0, 1 << 20);
        b.resize(1000 * 512);
        assert_eq!(b.dirty_extents(), vec![(0, 1000 * 512)]);
        b.resize(1 << 20);
        assert_eq!(b.dirty_extents(), vec![(0, 1000 * 512)]);
        let mut l = DirtyBitmap::new(100 * 512, 9, 9);
        l.load_chunk(0, None);
        assert_eq!(l.dirty_extents(), vec![(0, 100 * 512)]);
        let bytes = l.chunk_bytes(0).unwrap();
        assert!(bytes[13..].iter().all(|&x| x == 0));
        l.clear();
        assert!(l.chunk_bytes(0).is_none());
    }
}
