//! O_DIRECT's rules over any storage: every request that reaches the
//! storage underneath is aligned (offset, length and buffer address).
//!
//! [`FileStorage`](super::FileStorage) opened for direct I/O is this layer
//! over the host file; crash and fault tests put it over their recording
//! or failing storages, so the engine is tested with the same padding and
//! read-modify-write cycles that O_DIRECT imposes.
//!
//! - Aligned requests with an aligned buffer go straight through: no copy,
//!   and no waiting except for an overlapping read-modify-write.
//! - Unaligned reads read the aligned span into a bounce buffer.
//! - Unaligned writes read the blocks at their edges, patch them and write
//!   the span back: a read-modify-write, serialised against every
//!   overlapping request (see [`super::serialise`]), so no write in flight
//!   is undone by another's write-back.
//!
//! **The length belongs to this layer, not to the host file.** A write
//! ending inside a block past the end of the file is padded to the block,
//! so the host file may end up to one block longer than the bytes written.
//! Trimming it right after the write would race with a concurrent write
//! extending the file further (the trim would cut that write off, after it
//! was acknowledged). So nothing trims after a write: [`Storage::len`]
//! reports the logical length (the end of the furthest write, or what
//! `set_len` last set), the padding beyond it reads as zeros, as past the
//! end, and it is trimmed when the storage is dropped, when no request can
//! be in flight any more. After a crash the file may keep that padding
//! (zeros, less than one block), as QEMU's files do.

use super::buffer::AlignedBuf;
use super::serialise::RequestTracker;
use super::Storage;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A storage whose requests are all aligned to `align` before they reach
/// the storage it wraps.
#[derive(Debug)]
pub struct AlignedStorage<S: Storage> {
    inner: S,
    /// Offsets and lengths reaching `inner` are multiples of this.
    align: u64,
    /// Buffers reaching `inner` start at multiples of this.
    mem_align: usize,
    tracker: RequestTracker,
    /// The logical length (see the module documentation).
    len: AtomicU64,
    /// A padded write may have left `inner` longer than `len`.
    padded: AtomicBool,
    /// A request to `inner` failed: from then on this layer writes
    /// nothing on its own (no trim on drop), like the engine above it.
    failed: AtomicBool,
}

fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl<S: Storage> AlignedStorage<S> {
    /// Wraps `inner`, aligning requests and buffers to `align` (a power of
    /// two).
    pub fn new(inner: S, align: usize) -> io::Result<Self> {
        Self::with_memory_alignment(inner, align, align)
    }

    /// Wraps `inner`, aligning offsets and lengths to `align` and buffer
    /// addresses to `mem_align` (both powers of two).
    pub fn with_memory_alignment(inner: S, align: usize, mem_align: usize) -> io::Result<Self> {
        if !align.is_power_of_two() || !mem_align.is_power_of_two() {
            return Err(invalid("direct I/O alignment must be a power of two"));
        }
        let len = inner.len()?;
        Ok(AlignedStorage {
            inner,
            align: align as u64,
            mem_align,
            tracker: RequestTracker::default(),
            len: AtomicU64::new(len),
            padded: AtomicBool::new(false),
            failed: AtomicBool::new(false),
        })
    }

    /// The storage underneath.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The request alignment.
    pub fn alignment(&self) -> usize {
        self.align as usize
    }

    /// `[offset, end)` widened to whole blocks.
    fn span(&self, offset: u64, end: u64) -> io::Result<(u64, u64)> {
        let a = self.align;
        let start = offset / a * a;
        let end = end.checked_next_multiple_of(a).ok_or_else(|| invalid("offset too large"))?;
        Ok((start, end))
    }

    fn end_of(offset: u64, len: usize) -> io::Result<u64> {
        offset.checked_add(len as u64).ok_or_else(|| invalid("offset too large"))
    }

    fn buf_aligned(&self, buf: &[u8]) -> bool {
        (buf.as_ptr() as usize).is_multiple_of(self.mem_align)
    }

    fn bounce(&self, len: u64) -> AlignedBuf {
        AlignedBuf::new(len as usize, self.mem_align.max(self.align as usize))
    }

    /// Notes a failed request to the storage underneath.
    fn watch<T>(&self, r: io::Result<T>) -> io::Result<T> {
        if r.is_err() {
            self.failed.store(true, Ordering::Relaxed);
        }
        r
    }

    /// Writes `buf` at `offset` within the block span `[start, end)` by
    /// reading the partial blocks at either edge first. The caller holds a
    /// serialising ticket on the span.
    fn read_modify_write(&self, buf: &[u8], offset: u64, start: u64, end: u64) -> io::Result<()> {
        let a = self.align;
        let mut span = self.bounce(end - start);
        let head = offset > start;
        let tail = offset + buf.len() as u64 != end;
        if head && tail && end - start <= 2 * a {
            self.inner.read_at(&mut span, start)?;
        } else {
            if head {
                self.inner.read_at(&mut span[..a as usize], start)?;
            }
            if tail {
                let at = end - a;
                self.inner.read_at(&mut span[(at - start) as usize..], at)?;
            }
        }
        let skip = (offset - start) as usize;
        span[skip..skip + buf.len()].copy_from_slice(buf);
        self.inner.write_at(&span, start)
    }
}

impl<S: Storage> Storage for AlignedStorage<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let end = Self::end_of(offset, buf.len())?;
        let (start, span_end) = self.span(offset, end)?;
        if start == offset && span_end == end && self.buf_aligned(buf) {
            return self.inner.read_at(buf, offset);
        }
        // Reads need no ticket: a read-modify-write in flight writes the
        // bytes around its own range back unchanged.
        let mut span = self.bounce(span_end - start);
        self.inner.read_at(&mut span, start)?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&span[skip..skip + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let end = Self::end_of(offset, buf.len())?;
        let (start, span_end) = self.span(offset, end)?;
        let aligned = start == offset && span_end == end;
        let _ticket = self.tracker.begin(start, span_end, !aligned);
        let r = if !aligned {
            if span_end > end {
                self.padded.store(true, Ordering::Relaxed);
            }
            self.read_modify_write(buf, offset, start, span_end)
        } else if self.buf_aligned(buf) {
            self.inner.write_at(buf, offset)
        } else {
            let mut copy = self.bounce(buf.len() as u64);
            copy.copy_from_slice(buf);
            self.inner.write_at(&copy, offset)
        };
        self.watch(r)?;
        // Raised while the ticket is held, so a concurrent `set_len` sees
        // either this write or its new length.
        self.len.fetch_max(end, Ordering::AcqRel);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.watch(self.inner.flush())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.len.load(Ordering::Acquire))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        // Serialised with every request at or past the lower of the two
        // ends, so none lands between the truncation and the new length.
        let from = self.len.load(Ordering::Acquire).min(len) / self.align * self.align;
        let _ticket = self.tracker.begin(from, u64::MAX, true);
        self.watch(self.inner.set_len(len))?;
        self.len.store(len, Ordering::Release);
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = offset.saturating_add(len);
        let start = offset / self.align * self.align;
        let span_end = end.checked_next_multiple_of(self.align).unwrap_or(u64::MAX);
        // Not serialising, but a read-modify-write of an edge block must
        // not put punched bytes back.
        let _ticket = self.tracker.begin(start, span_end, false);
        self.watch(self.inner.punch_hole(offset, len))
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.watch(self.inner.allocate(offset, len))?;
        let end = offset.saturating_add(len);
        // Only as far as the storage underneath really grew (reserving
        // space is optional there).
        if self.inner.len()? >= end {
            self.len.fetch_max(end, Ordering::AcqRel);
        }
        Ok(())
    }

    fn allocated_size(&self) -> io::Result<u64> {
        self.inner.allocated_size()
    }

    fn extent_at(&self, offset: u64) -> Option<(bool, u64)> {
        let len = self.len.load(Ordering::Acquire);
        if offset >= len {
            return None;
        }
        self.inner.extent_at(offset).map(|(data, end)| (data, end.min(len)))
    }
}

impl<S: Storage> Drop for AlignedStorage<S> {
    fn drop(&mut self) {
        // No request can be in flight: the padding past the logical end
        // goes now (best effort; it reads as zeros anyway), unless the
        // storage failed, after which nothing more is written.
        if self.padded.load(Ordering::Relaxed) && !self.failed.load(Ordering::Relaxed) {
            let len = self.len.load(Ordering::Acquire);
            if self.inner.len().is_ok_and(|n| n > len) {
                let _ = self.inner.set_len(len);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{CrashStorage, Event, MemoryStorage};
    use std::sync::Arc;

    fn writes(st: &CrashStorage) -> Vec<(u64, usize)> {
        st.log()
            .events
            .iter()
            .filter_map(|e| if let Event::Write(o, d) = e { Some((*o, d.len())) } else { None })
            .collect()
    }

    #[test]
    fn unaligned_write_is_a_read_modify_write_of_whole_blocks() {
        let crash = Arc::new(CrashStorage::new(vec![7u8; 8192]));
        let st = AlignedStorage::new(crash.clone(), 4096).unwrap();
        st.write_at(&[1u8; 100], 4000).unwrap();
        assert_eq!(writes(&crash), vec![(0, 8192)]);
        let mut got = vec![0u8; 8192];
        st.read_at(&mut got, 0).unwrap();
        assert!(got[..4000].iter().all(|&b| b == 7));
        assert!(got[4000..4100].iter().all(|&b| b == 1));
        assert!(got[4100..].iter().all(|&b| b == 7));
    }

    #[test]
    fn aligned_write_goes_straight_through() {
        let crash = Arc::new(CrashStorage::new(Vec::new()));
        let st = AlignedStorage::new(crash.clone(), 512).unwrap();
        let buf = AlignedBuf::new(1024, 512);
        st.write_at(&buf, 512).unwrap();
        assert_eq!(writes(&crash), vec![(512, 1024)]);
        assert_eq!(st.len().unwrap(), 1536);
    }

    #[test]
    fn padded_tail_is_hidden_and_trimmed_on_drop() {
        let mem = Arc::new(MemoryStorage::new());
        let st = AlignedStorage::new(mem.clone(), 4096).unwrap();
        st.write_at(&[3u8; 10], 4096).unwrap();
        assert_eq!(st.len().unwrap(), 4106);
        assert_eq!(mem.len().unwrap(), 8192);
        let mut past = [9u8; 100];
        st.read_at(&mut past, 4106).unwrap();
        assert!(past.iter().all(|&b| b == 0));
        // A write further on extends; nothing shrinks it back.
        st.write_at(&[4u8; 4096], 16384).unwrap();
        assert_eq!(st.len().unwrap(), 20480);
        st.write_at(&[5u8; 1], 8192).unwrap();
        assert_eq!(st.len().unwrap(), 20480);
        st.set_len(5000).unwrap();
        st.write_at(&[6u8; 1], 4999).unwrap();
        drop(st);
        assert_eq!(mem.len().unwrap(), 5000);
    }

    #[test]
    fn nothing_is_trimmed_after_a_failure() {
        use crate::storage::{Fault, FaultStorage};
        // Operation 1 reads the block around the write, 2 writes it, 3
        // (a flush) fails, and so does everything after it.
        let fault = Arc::new(FaultStorage::new(Vec::new(), 3, Fault::Eio, true));
        let st = AlignedStorage::new(fault.clone(), 4096).unwrap();
        st.write_at(&[1u8; 10], 0).unwrap();
        assert!(st.flush().is_err());
        drop(st);
        assert_eq!(fault.to_bytes().len(), 4096);
        assert_eq!(fault.writes_after_failure(), 0);
    }

    #[test]
    fn bad_alignment_is_refused() {
        assert!(AlignedStorage::new(MemoryStorage::new(), 3000).is_err());
    }
}
