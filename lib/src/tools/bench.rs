//! `bench`: issue a stream of fixed-size requests with a given number in
//! flight (qemu-img bench semantics), for measuring the engine.

use crate::device::BlockDevice;
use crate::storage::AlignedBuf;
use crate::{Error, Result};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What to send.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BenchOptions {
    /// Number of requests.
    pub count: u64,
    /// Requests in flight at once (one worker thread each).
    pub depth: usize,
    /// First offset.
    pub offset: u64,
    /// Bytes per request.
    pub size: u64,
    /// Distance between consecutive requests' offsets.
    pub step: u64,
    /// Writes instead of reads.
    pub write: bool,
    /// Byte written by write requests.
    pub pattern: u8,
    /// Flush after every this many write requests (0 = never).
    pub flush_interval: u64,
    /// Wait for requests in flight before each flush (qemu's default).
    pub drain: bool,
}

setters!(BenchOptions {
    count: u64,
    depth: usize,
    offset: u64,
    size: u64,
    step: u64,
    write: bool,
    pattern: u8,
    flush_interval: u64,
    drain: bool,
});

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            count: 75000,
            depth: 64,
            offset: 0,
            size: 4096,
            step: 4096,
            write: false,
            pattern: 0,
            flush_interval: 0,
            drain: true,
        }
    }
}

/// Runs the benchmark; returns the elapsed time.
pub fn run(dev: &dyn BlockDevice, o: &BenchOptions) -> Result<Duration> {
    if o.size == 0 || o.depth == 0 {
        return Err(Error::invalid("request size and depth must be positive"));
    }
    if o.size > dev.len() {
        return Err(Error::invalid("request size is larger than the image"));
    }
    let next = AtomicU64::new(0);
    let writes_done = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    // Flushes with drain wait for all workers between batches: a worker
    // holds this shared while its request runs; the flusher exclusively.
    let gate = std::sync::RwLock::new(());
    let len = dev.len();
    let offset_of = |i: u64| -> u64 {
        // Like qemu-img bench: wrap around to the start offset when the
        // next request would run past the end.
        let span = len.saturating_sub(o.offset).saturating_sub(o.size) / o.step.max(1) + 1;
        o.offset + (i % span) * o.step
    };
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..o.depth.min(o.count.max(1) as usize) {
            s.spawn(|| {
                // Aligned, so O_DIRECT takes it without a bounce copy.
                let mut buf = AlignedBuf::for_direct_io(o.size as usize);
                buf.fill(o.pattern);
                loop {
                    if failed.load(Ordering::Relaxed) {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= o.count {
                        return;
                    }
                    let off = offset_of(i);
                    let r = {
                        let _g = gate.read().unwrap_or_else(|e| e.into_inner());
                        if o.write {
                            dev.write_at(&buf, off)
                        } else {
                            dev.read_at(&mut buf, off)
                        }
                    };
                    let r = r.and_then(|_| {
                        if o.write && o.flush_interval > 0 {
                            let n = writes_done.fetch_add(1, Ordering::Relaxed) + 1;
                            if n.is_multiple_of(o.flush_interval) {
                                let _g =
                                    if o.drain { Some(gate.write().unwrap_or_else(|e| e.into_inner())) } else { None };
                                return dev.flush();
                            }
                        }
                        Ok(())
                    });
                    if let Err(e) = r {
                        failed.store(true, Ordering::Relaxed);
                        first_error.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e);
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    // Like qemu-img bench, the time excludes the flush at close.
    Ok(start.elapsed())
}
