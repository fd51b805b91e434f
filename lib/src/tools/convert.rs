//! Copying one device's contents onto another, leaving zeros as holes.

use crate::device::{chain_status, read_backing, BlockDevice};
use crate::Result;

/// Bytes copied per read.
const CHUNK: u64 = 2 << 20;

/// How to copy.
#[derive(Clone, Copy, Default)]
pub struct CopyOptions<'a> {
    /// Blocks of this many bytes that read as zeros are not written
    /// (qemu-img's `-S`); 0 writes everything, zeros included.
    pub zero_granularity: u64,
    /// The target already has contents: zero ranges must be zeroed
    /// explicitly instead of skipped.
    pub existing_target: bool,
    /// The target's backing device: only blocks that differ from it are
    /// written.
    pub base: Option<&'a dyn BlockDevice>,
}

/// Copies all of `src` onto `dst` (at least as long), calling `progress`
/// with the number of bytes done so far.
pub fn copy(
    src: &dyn BlockDevice,
    dst: &dyn BlockDevice,
    o: &CopyOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let size = src.len();
    crate::device::check_range(0, size, dst.len())?;
    let gran = o.zero_granularity;
    let mut buf = Vec::new();
    let mut bbuf = Vec::new();
    let mut pos = 0;
    while pos < size {
        // Whole remaining ranges are asked for so huge holes go by in one
        // step; data is then copied in bounded chunks.
        let st = chain_status(src, pos, size - pos)?;
        let mut n = st.length.max(1).min(size - pos);
        if st.zero && o.base.is_none() {
            if gran == 0 {
                write_zero_chunks(dst, pos, n)?;
            } else if o.existing_target {
                dst.write_zeroes(pos, n, true)?;
            }
            pos += n;
            progress(pos);
            continue;
        }
        n = n.min(CHUNK);
        buf.resize(n as usize, 0);
        if st.zero {
            buf.fill(0);
        } else {
            src.read_at(&mut buf, pos)?;
        }
        if let Some(base) = o.base {
            bbuf.resize(n as usize, 0);
            read_backing(Some(base), &mut bbuf, pos)?;
            let step = gran.max(512) as usize;
            for (i, (x, y)) in buf.chunks(step).zip(bbuf.chunks(step)).enumerate() {
                if x != y {
                    let at = pos + (i * step) as u64;
                    if x.iter().all(|&v| v == 0) {
                        dst.write_zeroes(at, x.len() as u64, false)?;
                    } else {
                        dst.write_at(x, at)?;
                    }
                }
            }
        } else if gran == 0 {
            dst.write_at(&buf, pos)?;
        } else {
            write_sparse(dst, &buf, pos, gran, o.existing_target)?;
        }
        pos += n;
        progress(pos);
    }
    Ok(())
}

/// Zero ranges written out as real zeros, in bounded chunks.
fn write_zero_chunks(dev: &dyn BlockDevice, mut pos: u64, len: u64) -> Result<()> {
    let end = pos + len;
    let zeros = vec![0u8; CHUNK.min(len) as usize];
    while pos < end {
        let n = (end - pos).min(CHUNK) as usize;
        dev.write_at(&zeros[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

/// Writes `data` at `pos`, skipping device-aligned blocks of zeros (a new
/// target already reads them as zeros); runs of non-zero blocks go out as
/// one write.
fn write_sparse(dev: &dyn BlockDevice, data: &[u8], pos: u64, gran: u64, existing: bool) -> Result<()> {
    let mut i = 0usize;
    let mut run_start: Option<usize> = None;
    while i < data.len() {
        let abs = pos + i as u64;
        let end = ((abs / gran + 1) * gran - pos).min(data.len() as u64) as usize;
        let blk = &data[i..end];
        if blk.iter().all(|&v| v == 0) {
            if let Some(s) = run_start.take() {
                dev.write_at(&data[s..i], pos + s as u64)?;
            }
            if existing {
                dev.write_zeroes(abs, blk.len() as u64, true)?;
            }
        } else if run_start.is_none() {
            run_start = Some(i);
        }
        i = end;
    }
    if let Some(s) = run_start {
        dev.write_at(&data[s..], pos + s as u64)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raw::RawImage;
    use crate::storage::{MemoryStorage, Storage};
    use std::sync::Arc;

    fn dev(len: u64) -> RawImage {
        let s = Arc::new(MemoryStorage::new());
        s.set_len(len).unwrap();
        RawImage::new(s, false, false).unwrap()
    }

    #[test]
    fn copies_data_and_zeroes_existing_targets() {
        let src = dev(8 << 20);
        src.write_at(&vec![5u8; 70_000], 1_000_000).unwrap();
        src.write_at(&[9u8; 3], (8 << 20) - 3).unwrap();
        let dst = dev(8 << 20);
        dst.write_at(&vec![1u8; 8 << 20], 0).unwrap();
        let mut last = 0;
        let o = CopyOptions { zero_granularity: 4096, existing_target: true, base: None };
        copy(&src, &dst, &o, &mut |p| last = p).unwrap();
        assert_eq!(last, 8 << 20);
        assert_eq!(crate::tools::compare::first_difference(&src, &dst, 8 << 20, false).unwrap(), None);
    }
}
