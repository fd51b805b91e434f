//! Copying one device's contents onto another, leaving zeros as holes
//! (plainly, or compressed into a qcow2 image).

use crate::device::{chain_status, read_backing, BlockDevice};
use crate::qcow2::Qcow2;
use crate::Result;

/// Bytes copied per read.
const CHUNK: u64 = 2 << 20;

/// How to copy.
#[derive(Clone, Copy, Default)]
#[non_exhaustive]
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
    /// Told the length of each data chunk once it is written (from the
    /// copying threads): qemu-img's progress counts data, not positions.
    pub chunk_done: Option<&'a (dyn Fn(u64) + Sync)>,
}

setters!(CopyOptions<'a> {
    zero_granularity: u64,
    existing_target: bool,
    base: Option<&'a dyn BlockDevice>,
    chunk_done: Option<&'a (dyn Fn(u64) + Sync)>,
});

impl std::fmt::Debug for CopyOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyOptions")
            .field("zero_granularity", &self.zero_granularity)
            .field("existing_target", &self.existing_target)
            .field("base", &self.base.map(|b| b.format_name()))
            .finish()
    }
}

/// Threads copying data chunks at once: reads, zero detection and writes
/// of different chunks overlap (qemu-img convert keeps 8 requests in
/// flight for the same reason).
const WORKERS: usize = 4;

/// Data chunks handed to the workers per round (progress is reported
/// between rounds).
const ROUND: usize = 64;

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
    let mut pending: Vec<(u64, u64, bool)> = Vec::new();
    let mut pos = 0;
    while pos < size {
        // Whole remaining ranges are asked for so huge holes go by in one
        // step; data is then copied in bounded chunks by the workers.
        let st = chain_status(src, pos, size - pos)?;
        let n = st.length.max(1).min(size - pos);
        if st.zero && o.base.is_none() {
            if gran == 0 {
                write_zero_chunks(dst, pos, n)?;
            } else if o.existing_target {
                dst.write_zeroes(pos, n, true)?;
            }
        } else {
            let mut at = pos;
            while at < pos + n {
                let c = CHUNK.min(pos + n - at);
                pending.push((at, c, st.zero));
                at += c;
            }
        }
        pos += n;
        if pending.len() >= ROUND || pos >= size {
            copy_chunks(src, dst, o, &pending)?;
            pending.clear();
            progress(pos);
        } else if pending.is_empty() {
            progress(pos);
        }
    }
    Ok(())
}

/// Copies all of `src` onto the qcow2 image `dst` (at least as long, new:
/// nothing is zeroed) compressed, as `qemu-img convert -c` does: every
/// cluster that holds data is written compressed, clusters of zeros stay
/// unallocated. Calls `progress` with the number of bytes done so far.
pub fn copy_compressed(src: &dyn BlockDevice, dst: &Qcow2, progress: &mut dyn FnMut(u64)) -> Result<()> {
    copy_compressed_over(src, dst, None, false, progress)
}

/// [`copy_compressed`] onto a target that does not read as zeros: over
/// its backing file `base` (clusters reading the same through it are
/// left unallocated, zeros that differ from it are written as zero
/// clusters), or with old contents (`existing`: every zero cluster is
/// written as one).
pub fn copy_compressed_over(
    src: &dyn BlockDevice,
    dst: &Qcow2,
    base: Option<&dyn BlockDevice>,
    existing: bool,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    if base.is_some() || existing {
        return copy_compressed_compare(src, dst, base, progress);
    }
    let size = src.len();
    crate::device::check_range(0, size, dst.len())?;
    let cs = dst.cluster_size();
    let mut buf = vec![0u8; cs as usize];
    let mut c = 0;
    while c < size {
        let st = chain_status(src, c, size - c)?;
        if st.zero && st.length >= size - c {
            break;
        }
        if st.zero && st.length >= cs {
            // Whole clusters of zeros: nothing to write.
            c += st.length / cs * cs;
            progress(c);
            continue;
        }
        let n = (size - c).min(cs) as usize;
        buf.fill(0);
        src.read_at(&mut buf[..n], c)?;
        if !is_zero(&buf) {
            dst.write_compressed(c, &buf)?;
        }
        c += cs;
        progress(c.min(size));
    }
    progress(size);
    Ok(())
}

/// Cluster by cluster: left alone where `base` reads the same, zeroed
/// where the source reads zeros, written compressed elsewhere.
fn copy_compressed_compare(
    src: &dyn BlockDevice,
    dst: &Qcow2,
    base: Option<&dyn BlockDevice>,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let size = src.len();
    crate::device::check_range(0, size, dst.len())?;
    let cs = dst.cluster_size();
    let mut buf = vec![0u8; cs as usize];
    let mut old = vec![0u8; cs as usize];
    let mut c = 0;
    while c < size {
        let n = (size - c).min(cs) as usize;
        buf.fill(0);
        src.read_at(&mut buf[..n], c)?;
        let same = match base {
            Some(b) => {
                old.fill(0);
                read_backing(Some(b), &mut old[..n], c)?;
                old[..n] == buf[..n]
            }
            None => false,
        };
        if !same {
            if is_zero(&buf) {
                dst.write_zeroes(c, n as u64, false)?;
            } else {
                dst.write_compressed(c, &buf)?;
            }
        }
        c += cs;
        progress(c.min(size));
    }
    progress(size);
    Ok(())
}

/// The bytes of `src` that hold data (not zeros, not holes): what
/// [`CopyOptions::chunk_done`] adds up to over a whole copy.
pub fn data_len(src: &dyn BlockDevice) -> Result<u64> {
    let size = src.len();
    let (mut pos, mut data) = (0, 0);
    while pos < size {
        let st = chain_status(src, pos, size - pos)?;
        let n = st.length.max(1).min(size - pos);
        if !st.zero {
            data += n;
        }
        pos += n;
    }
    Ok(data)
}

/// Copies data chunks with [`WORKERS`] threads.
fn copy_chunks(
    src: &dyn BlockDevice,
    dst: &dyn BlockDevice,
    o: &CopyOptions,
    chunks: &[(u64, u64, bool)],
) -> Result<()> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let first_error = std::sync::Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..WORKERS.min(chunks.len()) {
            s.spawn(|| {
                let mut buf = Vec::new();
                let mut bbuf = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(pos, n, zero)) = chunks.get(i) else { return };
                    if let Err(e) = copy_chunk(src, dst, o, pos, n, zero, &mut buf, &mut bbuf) {
                        first_error.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e);
                        next.store(chunks.len(), Ordering::Relaxed);
                        return;
                    }
                    if let (false, Some(done)) = (zero, o.chunk_done) {
                        done(n);
                    }
                }
            });
        }
    });
    match first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[allow(clippy::too_many_arguments)]
fn copy_chunk(
    src: &dyn BlockDevice,
    dst: &dyn BlockDevice,
    o: &CopyOptions,
    pos: u64,
    n: u64,
    zero: bool,
    buf: &mut Vec<u8>,
    bbuf: &mut Vec<u8>,
) -> Result<()> {
    let gran = o.zero_granularity;
    buf.resize(n as usize, 0);
    if zero {
        buf.fill(0);
    } else {
        src.read_at(buf, pos)?;
    }
    if let Some(base) = o.base {
        bbuf.resize(n as usize, 0);
        read_backing(Some(base), bbuf, pos)?;
        let step = gran.max(512) as usize;
        for (i, (x, y)) in buf.chunks(step).zip(bbuf.chunks(step)).enumerate() {
            if x != y {
                let at = pos + (i * step) as u64;
                if is_zero(x) {
                    dst.write_zeroes(at, x.len() as u64, false)?;
                } else {
                    dst.write_at(x, at)?;
                }
            }
        }
    } else if gran == 0 {
        dst.write_at(buf, pos)?;
    } else {
        write_sparse(dst, buf, pos, gran, o.existing_target)?;
    }
    Ok(())
}

/// Whether a buffer is all zeros. Blocks of 64 bytes are OR-folded
/// without early exit (which the compiler turns into vector code), and
/// the scan stops at the first non-zero block.
pub fn is_zero(b: &[u8]) -> bool {
    let mut blocks = b.chunks_exact(64);
    let blocks_zero = blocks.by_ref().all(|c| c.iter().fold(0u8, |a, &v| a | v) == 0);
    blocks_zero && blocks.remainder().iter().all(|&v| v == 0)
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
        if is_zero(blk) {
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
        let counted = std::sync::atomic::AtomicU64::new(0);
        let count = |n| {
            counted.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        };
        let o = CopyOptions { zero_granularity: 4096, existing_target: true, base: None, chunk_done: Some(&count) };
        copy(&src, &dst, &o, &mut |p| last = p).unwrap();
        assert_eq!(last, 8 << 20);
        // Every data chunk is told once: the counts add up to the data.
        assert_eq!(counted.into_inner(), data_len(&src).unwrap());
        assert_eq!(crate::tools::compare::first_difference(&src, &dst, 8 << 20, false).unwrap(), None);
    }

    #[test]
    fn compressed_copy_packs_data_clusters_and_skips_zeros() {
        use crate::qcow2::{self, CreateOptions, Qcow2, Qcow2Options, Repair};
        // Not a whole number of clusters: the last one is partial.
        let size = (1 << 20) + 1024;
        let src = dev(size);
        src.write_at(&vec![b'a'; 100_000], 70_000).unwrap();
        src.write_at(&[b'z'; 10], size - 10).unwrap();
        let file: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
        let opts = CreateOptions { size, cluster_size: 65536, ..Default::default() };
        qcow2::create(file.clone(), None, &opts).unwrap();
        let dst = Qcow2::open(file.clone(), Qcow2Options::default()).unwrap();
        let mut last = 0;
        copy_compressed(&src, &dst, &mut |p| last = p).unwrap();
        assert_eq!(last, size);
        assert_eq!(crate::tools::compare::first_difference(&src, &dst, size, false).unwrap(), None);
        let st = dst.block_status(0, 65536).unwrap();
        assert!(st.zero && !st.allocated, "a cluster of zeros stays unallocated: {st:?}");
        let st = dst.block_status(65536, 65536).unwrap();
        assert!(st.compressed, "data is written compressed: {st:?}");
        let report = dst.check(Repair::None).unwrap();
        assert_eq!((report.corruptions, report.leaks), (0, 0));
        // Three data clusters, each compressing 64 KiB of one byte to a
        // few hundred bytes: they share one host cluster after the metadata.
        dst.close().unwrap();
        assert!(file.len().unwrap() <= 6 * 65536, "{}", file.len().unwrap());
    }
}
