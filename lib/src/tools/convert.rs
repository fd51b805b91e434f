//! Copying one device's contents onto another, leaving zeros as holes
//! (plainly, or compressed into a qcow2 image): what is copied, by the
//! source's allocation status. The copying threads are in `workers`, the
//! compressed copy in `compressed`.

mod compressed;
mod workers;

pub use compressed::{copy_compressed, copy_compressed_over};

use crate::device::{chain_status, BlockDevice};
use crate::Result;

/// Bytes copied per read.
const CHUNK: u64 = 2 << 20;

/// How to copy.
#[derive(Clone, Copy, Default)]
#[non_exhaustive]
pub struct CopyOptions<'a> {
    /// Blocks of this many bytes that read as zeros are not written
    /// (qemu-img's `-S`); 0 writes everything, zeros included (and a
    /// compressed copy compresses clusters of zeros too).
    pub zero_granularity: u64,
    /// The target already has contents: zero ranges must be zeroed
    /// explicitly instead of skipped.
    pub existing_target: bool,
    /// The target's backing device (qemu-img's `-B`). As qemu-img does,
    /// what the source's own top layer holds is copied and its zeros are
    /// written as zeros; what it leaves to its backing chain is left to
    /// the target's backing file, except where the two read differently
    /// (qemu-img trusts them to be the same; the differences are
    /// written, so the copy always reads as the source).
    pub base: Option<&'a dyn BlockDevice>,
    /// Told the length of each data chunk once it is written (from the
    /// copying threads): qemu-img's progress counts data, not positions.
    pub chunk_done: Option<&'a (dyn Fn(u64) + Sync)>,
    /// Chunks are written as soon as they are read, in whatever order
    /// the threads finish them (qemu-img's `-W`). By default they are
    /// read in parallel but written in guest order, so a new target's
    /// host layout follows the guest's and is the same on every run.
    pub unordered: bool,
}

setters!(CopyOptions<'a> {
    zero_granularity: u64,
    existing_target: bool,
    base: Option<&'a dyn BlockDevice>,
    chunk_done: Option<&'a (dyn Fn(u64) + Sync)>,
    unordered: bool,
});

impl std::fmt::Debug for CopyOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyOptions")
            .field("zero_granularity", &self.zero_granularity)
            .field("existing_target", &self.existing_target)
            .field("base", &self.base.map(|b| b.format_name()))
            .field("unordered", &self.unordered)
            .finish()
    }
}

/// Chunks handed to the workers per round (progress is reported between
/// rounds).
const ROUND: usize = 64;

/// One piece of the copy, at most [`CHUNK`] long unless it needs no
/// buffer.
#[derive(Clone, Copy, Debug)]
struct Chunk {
    pos: u64,
    len: u64,
    kind: Kind,
}

/// How a range of the source is copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Data: read and written (blocks of zeros in it left out or zeroed
    /// by [`CopyOptions::zero_granularity`]).
    Data,
    /// Reads as zeros, written out as data all the same (`-S 0`).
    Zeros,
    /// Reads as zeros, on a target that would not read as zeros there
    /// (old contents, a backing file): zeroed in one request.
    ZeroFill,
    /// Held by the source's backing chain under `-B`: compared with the
    /// target's backing file, only differences written.
    Diff,
}

/// How the range of `src` at `pos` (at most `len` long) is copied, and
/// how long the range that is copied so is; `None`: nothing to write.
fn classify(src: &dyn BlockDevice, o: &CopyOptions, pos: u64, len: u64) -> Result<(u64, Option<Kind>)> {
    let zero = if o.base.is_some() {
        // Only the source's own layer (qemu-img: status above the
        // source's backing file); a source without one decides all.
        let st = src.block_status(pos, len)?;
        let n = st.length.max(1).min(len);
        if !st.allocated && src.backing().is_some() {
            return Ok((n, Some(Kind::Diff)));
        }
        (n, st.zero)
    } else {
        let st = chain_status(src, pos, len)?;
        (st.length.max(1).min(len), st.zero)
    };
    let kind = match zero {
        (_, false) => Some(Kind::Data),
        _ if o.zero_granularity == 0 => Some(Kind::Zeros),
        _ if o.existing_target || o.base.is_some() => Some(Kind::ZeroFill),
        // A new target without a backing file reads as zeros already.
        _ => None,
    };
    Ok((zero.0, kind))
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
    let mut pending: Vec<Chunk> = Vec::new();
    let mut pos = 0;
    while pos < size {
        // Whole remaining ranges are asked for so huge holes go by in one
        // step; data is then copied in bounded chunks by the workers.
        let (n, kind) = classify(src, o, pos, size - pos)?;
        let mut at = pos;
        while let Some(kind) = kind.filter(|_| at < pos + n) {
            // A format that reports its mapping cluster by cluster (QED,
            // VDI) gives many short ranges of one kind in a row: they
            // join the chunk before, so reads and writes stay CHUNK-sized
            // (one 64 KiB chunk per cluster cost a read, a write and an
            // ordering wait each: convert qed -> qcow2 at 1.5x qemu-img's
            // time, issue 19).
            if let Some(last) = pending.last_mut().filter(|l| l.kind == kind && l.pos + l.len == at) {
                let room = if kind == Kind::ZeroFill { u64::MAX } else { CHUNK.saturating_sub(last.len) };
                if room > 0 {
                    let add = room.min(pos + n - at);
                    last.len += add;
                    at += add;
                    continue;
                }
            }
            // Bounded rounds even over a huge range; a full round goes
            // only when a new chunk is needed, so its last one could grow.
            if pending.len() >= ROUND {
                workers::copy_chunks(src, dst, o, &pending)?;
                pending.clear();
                progress(at);
            }
            let len = if kind == Kind::ZeroFill { pos + n - at } else { CHUNK.min(pos + n - at) };
            pending.push(Chunk { pos: at, len, kind });
            at += len;
        }
        pos += n;
        if pos >= size && !pending.is_empty() {
            workers::copy_chunks(src, dst, o, &pending)?;
            pending.clear();
        }
        if pending.is_empty() {
            progress(pos);
        }
    }
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

/// Whether a buffer is all zeros. Blocks of 64 bytes are OR-folded
/// without early exit (which the compiler turns into vector code), and
/// the scan stops at the first non-zero block.
pub fn is_zero(b: &[u8]) -> bool {
    let mut blocks = b.chunks_exact(64);
    let blocks_zero = blocks.by_ref().all(|c| c.iter().fold(0u8, |a, &v| a | v) == 0);
    blocks_zero && blocks.remainder().iter().all(|&v| v == 0)
}

/// Writes `data` at `pos`, leaving out blocks of `gran` bytes (aligned on
/// the device) that are all zeros, or, with `zero_fill` (the target would
/// not read zeros there), zeroing them (`Some(may_unmap)`); runs of
/// non-zero blocks go out as one write.
fn write_sparse(dev: &dyn BlockDevice, data: &[u8], pos: u64, gran: u64, zero_fill: Option<bool>) -> Result<()> {
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
            if let Some(may_unmap) = zero_fill {
                dev.write_zeroes(abs, blk.len() as u64, may_unmap)?;
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
        let o = CopyOptions {
            zero_granularity: 4096,
            existing_target: true,
            base: None,
            chunk_done: Some(&count),
            unordered: false,
        };
        copy(&src, &dst, &o, &mut |p| last = p).unwrap();
        assert_eq!(last, 8 << 20);
        // Every data chunk is told once: the counts add up to the data.
        assert_eq!(counted.into_inner(), data_len(&src).unwrap());
        assert_eq!(crate::tools::compare::first_difference(&src, &dst, 8 << 20, false).unwrap(), None);
    }

    /// Reports its mapping one 64 KiB cluster at a time, as the QED and
    /// VDI drivers do.
    struct ClusterByCluster(RawImage);
    impl BlockDevice for ClusterByCluster {
        crate::forward_block_device!(0: len, read_at, write_at, write_zeroes, discard, flush,
            backing, format_name, is_read_only, resize, close, dirty_bitmap_extents);
        fn block_status(&self, offset: u64, len: u64) -> Result<crate::BlockStatus> {
            self.0.block_status(offset, len.min(65536 - offset % 65536))
        }
    }

    /// Records the length of every write.
    struct WriteSizes(RawImage, std::sync::Mutex<Vec<usize>>);
    impl BlockDevice for WriteSizes {
        crate::forward_block_device!(0: len, read_at, write_zeroes, discard, flush, block_status,
            backing, format_name, is_read_only, resize, close, dirty_bitmap_extents);
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
            self.1.lock().unwrap().push(buf.len());
            self.0.write_at(buf, offset)
        }
    }

    #[test]
    fn cluster_by_cluster_mapping_is_copied_in_whole_chunks() {
        // Issue 19: a chunk per reported cluster made convert qed -> qcow2
        // 1.5x slower than qemu-img.
        let size = 16u64 << 20;
        let raw = dev(size);
        raw.write_at(&vec![7u8; 12 << 20], 1 << 20).unwrap();
        let src = ClusterByCluster(raw);
        let dst = WriteSizes(dev(size), Default::default());
        let o = CopyOptions {
            zero_granularity: 4096,
            existing_target: false,
            base: None,
            chunk_done: None,
            unordered: false,
        };
        copy(&src, &dst, &o, &mut |_| {}).unwrap();
        assert_eq!(crate::tools::compare::first_difference(&src, &dst, size, false).unwrap(), None);
        let sizes = dst.1.into_inner().unwrap();
        // Chunks of CHUNK bytes; the storage reports data in blocks that
        // start before the data, whose zeros are left out at both ends.
        assert!(sizes.len() as u64 <= (12 << 20) / CHUNK + 1, "writes of whole chunks: {sizes:?}");
        assert!(sizes.iter().all(|&n| n >= 1 << 20), "writes of whole chunks: {sizes:?}");
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

    /// A source whose first chunk is read only once the second one has
    /// been: the second chunk is ready first.
    struct SecondChunkFirst {
        dev: RawImage,
        second_read: std::sync::Mutex<bool>,
        cv: std::sync::Condvar,
    }

    impl BlockDevice for SecondChunkFirst {
        crate::forward_block_device!(dev: len, write_at, write_zeroes, discard, flush, block_status, backing,
            format_name, is_read_only, resize, close, dirty_bitmap_extents);
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            if offset == 0 {
                let mut g = self.second_read.lock().unwrap();
                while !*g {
                    g = self.cv.wait(g).unwrap();
                }
            }
            self.dev.read_at(buf, offset)?;
            if offset == CHUNK {
                *self.second_read.lock().unwrap() = true;
                self.cv.notify_all();
            }
            Ok(())
        }
    }

    /// Records the offsets of the data writes it is given.
    struct Recorder {
        dev: RawImage,
        writes: std::sync::Mutex<Vec<u64>>,
    }

    impl BlockDevice for Recorder {
        crate::forward_block_device!(dev: len, read_at, write_zeroes, discard, flush, block_status, backing,
            format_name, is_read_only, resize, close, dirty_bitmap_extents);
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
            self.writes.lock().unwrap().push(offset);
            self.dev.write_at(buf, offset)
        }
    }

    #[test]
    fn chunks_read_out_of_order_are_written_in_guest_order() {
        let src = SecondChunkFirst { dev: dev(4 * CHUNK), second_read: Default::default(), cv: Default::default() };
        src.dev.write_at(&vec![7u8; 4 * CHUNK as usize], 0).unwrap();
        let dst = Recorder { dev: dev(4 * CHUNK), writes: Default::default() };
        let o = CopyOptions::default().zero_granularity(4096);
        copy(&src, &dst, &o, &mut |_| {}).unwrap();
        assert_eq!(*dst.writes.lock().unwrap(), [0, CHUNK, 2 * CHUNK, 3 * CHUNK]);
        assert_eq!(crate::tools::compare::first_difference(&src, &dst, 4 * CHUNK, false).unwrap(), None);
    }
}
