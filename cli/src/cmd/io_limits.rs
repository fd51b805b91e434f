//! Zero-write limits of a top blkdebug node (`opt-write-zero`,
//! `max-write-zero`, `align`), as QEMU's block layer applies them: a zero
//! write is cut at multiples of the alignment, and the pieces shorter
//! than it, which blkdebug refuses to zero, become writes of zero data.
//! The other limits only split requests, which changes nothing oxcow's
//! callers can see.

use oxcow::{BlockDevice, Result};

/// The limits, parsed from a qemu-io option tree.
#[derive(Clone, Copy, Debug, Default)]
pub struct ZeroLimits {
    /// QEMU's max(request alignment, zero-write alignment).
    pub align: u64,
    /// The largest zero request (0: none).
    pub max: u64,
}

impl ZeroLimits {
    /// Takes `key=value` if it is one of the limits; false otherwise.
    pub fn take(&mut self, key: &str, value: &str) -> bool {
        let n = || crate::util::parse_num(value).unwrap_or(0);
        match key {
            "align" | "opt-write-zero" => self.align = self.align.max(n()),
            "max-write-zero" => self.max = n(),
            _ => return false,
        }
        true
    }

    /// Whether the limits change what a zero write does.
    pub fn active(&self) -> bool {
        self.align > 1
    }
}

/// A device whose zero writes follow [`ZeroLimits`].
pub struct Limited<'a> {
    pub dev: &'a dyn BlockDevice,
    pub limits: ZeroLimits,
}

impl BlockDevice for Limited<'_> {
    oxcow::forward_block_device!(dev: len, read_at, write_at, discard, flush, block_status, backing, format_name, is_read_only, resize, close, dirty_bitmap_extents);

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        for (at, n, zero) in pieces(self.limits, offset, len) {
            if zero {
                self.dev.write_zeroes(at, n, may_unmap)?;
            } else {
                let buf = vec![0u8; usize::try_from(n).unwrap_or(usize::MAX)];
                self.dev.write_at(&buf, at)?;
            }
        }
        Ok(())
    }
}

/// The pieces a zero write of `len` bytes at `offset` becomes, as
/// (offset, length, zeroed rather than written): the unaligned head up to
/// the first boundary, the aligned middle (at most `max` per piece), the
/// unaligned tail.
fn pieces(l: ZeroLimits, mut offset: u64, mut len: u64) -> Vec<(u64, u64, bool)> {
    let a = l.align.max(1);
    let max = if l.max == 0 { u64::MAX } else { (l.max / a * a).max(a) };
    let mut head = offset % a;
    let tail = (offset + len) % a;
    let mut out = Vec::new();
    while len > 0 {
        let mut n = len;
        if head != 0 {
            n = n.min(a - head);
            head = 0;
        } else if tail != 0 && n > a {
            n -= tail;
        }
        n = n.min(max);
        out.push((offset, n, n >= a));
        offset += n;
        len -= n;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unaligned_ends_become_data_as_in_qemus_iotest_204() {
        const M: u64 = 1 << 20;
        let l = ZeroLimits { align: 15 * M, max: 15 * M };
        assert_eq!(
            pieces(l, 32 * M, 32 * M),
            [(32 * M, 13 * M, false), (45 * M, 15 * M, true), (60 * M, 4 * M, false)]
        );
        let l = ZeroLimits { align: M, max: 0 };
        assert_eq!(pieces(l, 8003584, 2093056), [(8003584, 385024, false), (8 * M, M, true), (9 * M, 659456, false)]);
        assert_eq!(pieces(l, 0, 3 * M), [(0, 3 * M, true)]);
    }
}
