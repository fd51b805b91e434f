//! The threads of a plain copy: each reads (and compares) the chunk it
//! takes as soon as it takes it, then writes it, by default only once the
//! chunks before it are written, so the target sees guest order (as
//! qemu-img convert without `-W`: a new image's host layout then follows
//! the guest's and is the same on every run).

use super::{is_zero, write_sparse, Chunk, CopyOptions, Kind};
use crate::device::{read_backing, BlockDevice};
use crate::Result;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

/// Threads copying chunks at once: reads, zero detection and writes of
/// different chunks overlap (qemu-img convert keeps 8 requests in flight
/// for the same reason).
const WORKERS: usize = 4;

/// Copies `chunks` (in guest order) with [`WORKERS`] threads.
pub(super) fn copy_chunks(
    src: &dyn BlockDevice,
    dst: &dyn BlockDevice,
    o: &CopyOptions,
    chunks: &[Chunk],
) -> Result<()> {
    let next = AtomicUsize::new(0);
    let turn = Turn::new();
    let first_error = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..WORKERS.min(chunks.len()) {
            s.spawn(|| {
                let mut buf = Vec::new();
                let mut bbuf = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&c) = chunks.get(i) else { return };
                    let r = read_chunk(src, o, c, &mut buf, &mut bbuf).and_then(|()| {
                        if !o.unordered && !turn.wait_for(i) {
                            // A chunk before this one failed: the copy
                            // stops there.
                            return Ok(false);
                        }
                        write_chunk(dst, o, c, &buf, &bbuf).map(|()| true)
                    });
                    match r {
                        Ok(true) => {}
                        Ok(false) => return,
                        Err(e) => {
                            first_error.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e);
                            next.store(chunks.len(), Ordering::Relaxed);
                            turn.abort();
                            return;
                        }
                    }
                    turn.done(i);
                    if let (Kind::Data, Some(done)) = (c.kind, o.chunk_done) {
                        done(c.len);
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

/// Whose turn it is to write: the index of the next chunk in guest
/// order, or `None` once a chunk failed (nobody writes any more).
struct Turn {
    next: Mutex<Option<usize>>,
    changed: Condvar,
}

impl Turn {
    fn new() -> Self {
        Turn { next: Mutex::new(Some(0)), changed: Condvar::new() }
    }

    /// Waits until chunk `i` may be written; false if the copy failed.
    fn wait_for(&self, i: usize) -> bool {
        let mut g = self.next.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match *g {
                Some(n) if n >= i => return true,
                Some(_) => g = self.changed.wait(g).unwrap_or_else(|e| e.into_inner()),
                None => return false,
            }
        }
    }

    /// Chunk `i` is written: the next one may go.
    fn done(&self, i: usize) {
        let mut g = self.next.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = g.as_mut() {
            *n = (*n).max(i + 1);
        }
        self.changed.notify_all();
    }

    /// A chunk failed: waiting writers give up.
    fn abort(&self) {
        *self.next.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.changed.notify_all();
    }
}

/// Fills `buf` with the chunk's source bytes, and `bbuf` with the
/// target's backing file's where only differences are written.
fn read_chunk(src: &dyn BlockDevice, o: &CopyOptions, c: Chunk, buf: &mut Vec<u8>, bbuf: &mut Vec<u8>) -> Result<()> {
    match c.kind {
        Kind::ZeroFill => return Ok(()),
        Kind::Zeros => {
            buf.resize(c.len as usize, 0);
            buf.fill(0);
        }
        Kind::Data | Kind::Diff => {
            buf.resize(c.len as usize, 0);
            src.read_at(buf, c.pos)?;
        }
    }
    if c.kind == Kind::Diff {
        bbuf.resize(c.len as usize, 0);
        read_backing(o.base, bbuf, c.pos)?;
    }
    Ok(())
}

/// Writes a chunk read by [`read_chunk`].
fn write_chunk(dst: &dyn BlockDevice, o: &CopyOptions, c: Chunk, buf: &[u8], bbuf: &[u8]) -> Result<()> {
    let gran = o.zero_granularity;
    // A target with a backing file must keep its zeros as zero clusters
    // (qemu-img unmaps only where nothing shows through).
    let may_unmap = o.base.is_none();
    match c.kind {
        Kind::ZeroFill => dst.write_zeroes(c.pos, c.len, may_unmap),
        Kind::Diff => {
            let step = gran.max(512) as usize;
            for (i, (x, y)) in buf.chunks(step).zip(bbuf.chunks(step)).enumerate() {
                if x != y {
                    let at = c.pos + (i * step) as u64;
                    if is_zero(x) {
                        dst.write_zeroes(at, x.len() as u64, false)?;
                    } else {
                        dst.write_at(x, at)?;
                    }
                }
            }
            Ok(())
        }
        Kind::Data | Kind::Zeros if gran == 0 => dst.write_at(buf, c.pos),
        Kind::Data | Kind::Zeros => {
            let zero_fill = (o.existing_target || o.base.is_some()).then_some(may_unmap);
            write_sparse(dst, buf, c.pos, gran, zero_fill)
        }
    }
}
