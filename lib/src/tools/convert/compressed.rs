//! The compressed copy (`qemu-img convert -c`): cluster by cluster, in
//! guest order, each cluster that is copied written compressed.

use super::{classify, is_zero, CopyOptions, Kind};
use crate::device::{read_backing, BlockDevice};
use crate::qcow2::Qcow2;
use crate::Result;

/// Copies all of `src` onto the qcow2 image `dst` (at least as long, new:
/// nothing is zeroed) compressed, as `qemu-img convert -c` does: every
/// cluster that holds data is written compressed, clusters of zeros stay
/// unallocated. Calls `progress` with the number of bytes done so far.
pub fn copy_compressed(src: &dyn BlockDevice, dst: &Qcow2, progress: &mut dyn FnMut(u64)) -> Result<()> {
    let o = CopyOptions::default().zero_granularity(dst.cluster_size());
    copy_compressed_over(src, dst, &o, progress)
}

/// [`copy_compressed`] with options: over a backing file
/// ([`CopyOptions::base`]: what the source leaves to its backing chain is
/// left to it, zeros the source holds are written as zero clusters), onto
/// old contents ([`CopyOptions::existing_target`]: clusters of zeros are
/// zeroed), or with clusters of zeros compressed too
/// ([`CopyOptions::zero_granularity`] 0, qemu-img's `-S 0`; other values
/// only mean "not 0": zeros are found by whole clusters). Chunk callbacks
/// and `unordered` do not apply: clusters go out one by one in order.
pub fn copy_compressed_over(
    src: &dyn BlockDevice,
    dst: &Qcow2,
    o: &CopyOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let size = src.len();
    crate::device::check_range(0, size, dst.len())?;
    let cs = dst.cluster_size();
    let mut buf = vec![0u8; cs as usize];
    let mut old = vec![0u8; cs as usize];
    let may_unmap = o.base.is_none();
    let mut c = 0;
    while c < size {
        let (n, kind) = classify(src, o, c, size - c)?;
        // The whole clusters the status covers (the last one may be
        // partial at the end of the disk); a cluster with parts of
        // different status is copied as data, whatever its parts are.
        let whole = if c + n >= size { size - c } else { n / cs * cs };
        let (whole, kind) = if whole == 0 { (cs.min(size - c), Some(Kind::Data)) } else { (whole, kind) };
        match kind {
            // A new target without a backing file reads zeros already.
            None => {}
            Some(Kind::ZeroFill) => dst.write_zeroes(c, whole, may_unmap)?,
            Some(kind) => {
                let end = c + whole;
                let mut at = c;
                while at < end {
                    let len = (end - at).min(cs) as usize;
                    buf.fill(0);
                    if kind != Kind::Zeros {
                        src.read_at(&mut buf[..len], at)?;
                    }
                    let same_as_base = kind == Kind::Diff && {
                        old.fill(0);
                        read_backing(o.base, &mut old[..len], at)?;
                        old == buf
                    };
                    if same_as_base {
                        // Left to the target's backing file.
                    } else if o.zero_granularity == 0 || !is_zero(&buf) {
                        dst.write_compressed(at, &buf)?;
                    } else if o.existing_target || o.base.is_some() {
                        dst.write_zeroes(at, len as u64, may_unmap)?;
                    }
                    at += cs;
                    progress(at.min(size));
                }
            }
        }
        c += whole;
        progress(c);
    }
    progress(size);
    Ok(())
}
