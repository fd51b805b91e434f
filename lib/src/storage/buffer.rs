//! Heap buffers with an aligned start, for O_DIRECT.

use std::ops::{Deref, DerefMut};

/// A zeroed byte buffer whose first byte sits at a multiple of `align`.
///
/// Built from safe code only: the vector is over-allocated and the
/// buffer starts at its first aligned byte. Requests whose buffer, offset
/// and length are aligned go to an O_DIRECT file without a bounce copy;
/// callers that issue many requests (bench, the NBD server) allocate
/// their buffers this way. (Not `Clone`: a copy of the vector would
/// start elsewhere.)
#[derive(Debug)]
pub struct AlignedBuf {
    raw: Vec<u8>,
    skip: usize,
    len: usize,
}

/// Alignment that satisfies O_DIRECT on every device and file system met
/// so far (and the page size of common hosts).
pub const MAX_DIRECT_ALIGN: usize = 4096;

impl AlignedBuf {
    /// `len` zero bytes aligned to `align` (a power of two).
    pub fn new(len: usize, align: usize) -> Self {
        let align = align.max(1);
        let raw = vec![0u8; len + align - 1];
        let addr = raw.as_ptr() as usize;
        let skip = (align - addr % align) % align;
        AlignedBuf { raw, skip, len }
    }

    /// `len` zero bytes aligned for O_DIRECT anywhere.
    pub fn for_direct_io(len: usize) -> Self {
        Self::new(len, MAX_DIRECT_ALIGN)
    }

    /// `len` zero bytes aligned for O_DIRECT, in `spare`'s memory when it
    /// holds that many: a server thread reusing one buffer per request
    /// allocates nothing per request, so its allocator arena does not
    /// fill with freed buffers.
    pub fn reuse_for_direct_io(spare: Option<AlignedBuf>, len: usize) -> Self {
        match spare {
            Some(mut b)
                if (b.raw.as_ptr() as usize + b.skip).is_multiple_of(MAX_DIRECT_ALIGN) && b.capacity() >= len =>
            {
                b.len = len;
                b.fill(0);
                b
            }
            _ => Self::for_direct_io(len),
        }
    }

    /// Bytes the buffer can hold when reused.
    pub fn capacity(&self) -> usize {
        self.raw.len() - self.skip
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.raw[self.skip..self.skip + self.len]
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.skip..self.skip + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_is_aligned_and_length_exact() {
        for align in [1, 512, 4096] {
            for len in [0, 1, 4096, 10000] {
                let b = AlignedBuf::new(len, align);
                assert_eq!(b.len(), len);
                assert_eq!(b.as_ptr() as usize % align, 0);
                assert!(b.iter().all(|&x| x == 0));
            }
        }
    }

    #[test]
    fn a_reused_buffer_is_aligned_zeroed_and_the_same_memory() {
        let mut b = AlignedBuf::for_direct_io(8192);
        b.fill(0xaa);
        let at = b.as_ptr();
        let r = AlignedBuf::reuse_for_direct_io(Some(b), 4096);
        assert_eq!((r.len(), r.as_ptr()), (4096, at));
        assert!(r.iter().all(|&x| x == 0));
        // Too small: a new one.
        let n = AlignedBuf::reuse_for_direct_io(Some(r), 16384);
        assert_eq!(n.len(), 16384);
        assert_eq!(n.as_ptr() as usize % MAX_DIRECT_ALIGN, 0);
        assert_eq!(AlignedBuf::reuse_for_direct_io(None, 512).len(), 512);
    }
}
