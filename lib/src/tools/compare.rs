//! Content comparison of two devices, skipping ranges both report as zeros.

use crate::device::{chain_status, BlockDevice};
use crate::Result;

/// Bytes compared per read.
const CHUNK: u64 = 2 << 20;

/// The first way two devices differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Difference {
    /// The byte at this offset differs.
    Content(u64),
    /// One device allocates the extent at this offset (anywhere in its
    /// chain) and the other does not; only reported when asked for.
    Allocation(u64),
    /// A read failed: qemu-img compare reports where and stops there
    /// with its own status, unlike other errors.
    Unreadable {
        /// The second device given failed (always false for [`first_nonzero`]).
        second: bool,
        /// Where the failed read started.
        offset: u64,
        /// The failure's errno.
        errno: i32,
    },
}

fn unreadable(second: bool, offset: u64) -> impl FnOnce(crate::Error) -> Difference {
    move |e| Difference::Unreadable { second, offset, errno: e.errno() }
}

/// Compares the first `len` bytes of `a` and `b` (both must be at least that
/// long). With `strict`, allocation differences count too.
pub fn first_difference(
    a: &dyn BlockDevice,
    b: &dyn BlockDevice,
    len: u64,
    strict: bool,
) -> Result<Option<Difference>> {
    let mut pos = 0;
    let mut ba = Vec::new();
    let mut bb = Vec::new();
    while pos < len {
        // Whole remaining ranges are asked for, so shared holes of any size
        // pass in one step.
        let sa = chain_status(a, pos, len - pos)?;
        let sb = chain_status(b, pos, len - pos)?;
        let mut n = sa.length.min(sb.length).max(1).min(len - pos);
        if strict && sa.allocated != sb.allocated {
            return Ok(Some(Difference::Allocation(pos)));
        }
        if !(sa.zero && sb.zero) {
            n = n.min(CHUNK);
            ba.resize(n as usize, 0);
            bb.resize(n as usize, 0);
            if sa.zero {
                ba.fill(0);
            } else if let Err(e) = a.read_at(&mut ba, pos) {
                return Ok(Some(unreadable(false, pos)(e)));
            }
            if sb.zero {
                bb.fill(0);
            } else if let Err(e) = b.read_at(&mut bb, pos) {
                return Ok(Some(unreadable(true, pos)(e)));
            }
            if let Some(i) = ba.iter().zip(bb.iter()).position(|(x, y)| x != y) {
                return Ok(Some(Difference::Content(pos + i as u64)));
            }
        }
        pos += n;
    }
    Ok(None)
}

/// The first non-zero byte of `dev` at or after `from`
/// ([`Difference::Content`]), or the read that failed first.
pub fn first_nonzero(dev: &dyn BlockDevice, from: u64) -> Result<Option<Difference>> {
    let len = dev.len();
    let mut pos = from;
    let mut buf = Vec::new();
    while pos < len {
        let st = chain_status(dev, pos, len - pos)?;
        let mut n = st.length.max(1).min(len - pos);
        if !st.zero {
            n = n.min(CHUNK);
            buf.resize(n as usize, 0);
            if let Err(e) = dev.read_at(&mut buf, pos) {
                return Ok(Some(unreadable(false, pos)(e)));
            }
            if let Some(i) = buf.iter().position(|&v| v != 0) {
                return Ok(Some(Difference::Content(pos + i as u64)));
            }
        }
        pos += n;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raw::RawImage;
    use crate::storage::MemoryStorage;
    use std::sync::Arc;

    fn dev(len: u64) -> RawImage {
        let s = Arc::new(MemoryStorage::new());
        crate::storage::Storage::set_len(&*s, len).unwrap();
        RawImage::new(s, false, false).unwrap()
    }

    #[test]
    fn finds_first_differing_byte() {
        let (a, b) = (dev(1 << 20), dev(1 << 20));
        assert_eq!(first_difference(&a, &b, 1 << 20, false).unwrap(), None);
        b.write_at(&[7], 300_007).unwrap();
        a.write_at(&[7], 500_000).unwrap();
        assert_eq!(first_difference(&a, &b, 1 << 20, false).unwrap(), Some(Difference::Content(300_007)));
        assert_eq!(first_nonzero(&a, 0).unwrap(), Some(Difference::Content(500_000)));
        assert_eq!(first_nonzero(&a, 500_001).unwrap(), None);
    }
}
