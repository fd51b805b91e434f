//! `stream`: copy everything the backing chain provides into the top
//! image, then make the top image standalone.
//!
//! Resumable: ranges the top image already decides are skipped, so an
//! interrupted stream picks up where it left off (whatever it copied was
//! stored like any write). Ranges the backing chain reads as zeros are not
//! copied either: once the backing file is gone they read as zeros anyway.

use crate::qcow2::Qcow2;
use crate::BlockDevice;
use crate::{Error, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How to stream.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StreamOptions {
    /// Copy at most this many bytes per second (`None`: as fast as possible).
    pub rate: Option<u64>,
    /// Largest range handled per step (bytes).
    pub chunk: u64,
    /// Remove the backing file from the header once everything is copied.
    pub detach: bool,
    /// Set from another thread to stop early (the image stays consistent
    /// and keeps its backing file; streaming again resumes).
    pub cancel: Option<Arc<AtomicBool>>,
}

setters!(StreamOptions { chunk: u64, detach: bool } opt { rate: u64, cancel: Arc<AtomicBool> });

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions { rate: None, chunk: 1 << 20, detach: true, cancel: None }
    }
}

/// Where a stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamProgress {
    /// Guest bytes examined so far.
    pub done: u64,
    /// Virtual size of the image.
    pub total: u64,
    /// Bytes of clusters copied from the backing chain so far.
    pub copied: u64,
}

/// The result of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamReport {
    /// Bytes of clusters copied from the backing chain.
    pub copied: u64,
    /// Whether it ran to the end (false when cancelled).
    pub complete: bool,
    /// Whether the backing file was removed from the header.
    pub detached: bool,
}

/// Paces copying to `rate` bytes per second: after `copied` bytes, sleeps
/// until as much time has passed since `start` as those bytes are allowed.
pub(crate) fn pace(rate: Option<u64>, start: Instant, copied: u64) {
    let Some(rate) = rate.filter(|&r| r > 0) else { return };
    let due = Duration::from_secs_f64(copied as f64 / rate as f64);
    let elapsed = start.elapsed();
    if due > elapsed {
        std::thread::sleep(due - elapsed);
    }
}

/// Streams the backing chain of `image` into it; see the module docs.
/// `progress` is called after every step.
pub fn stream(image: &Qcow2, opts: &StreamOptions, progress: &mut dyn FnMut(StreamProgress)) -> Result<StreamReport> {
    if image.is_read_only() {
        return Err(Error::ReadOnly("streaming needs the image opened read-write".into()));
    }
    let total = image.len();
    let chunk = opts.chunk.max(image.cluster_size());
    let start = Instant::now();
    let mut pos = 0;
    let mut copied = 0;
    let cancelled = || opts.cancel.as_ref().is_some_and(|c| c.load(Ordering::Acquire));
    if image.backing().is_some() {
        while pos < total {
            if cancelled() {
                image.flush()?;
                return Ok(StreamReport { copied, complete: false, detached: false });
            }
            let (next, n) = image.stream_step(pos, chunk)?;
            // Every step advances (stream_step never returns `pos`), so the
            // loop ends after at most total / cluster steps.
            pos = next.max(pos + 1);
            copied += n;
            progress(StreamProgress { done: pos.min(total), total, copied });
            pace(opts.rate, start, copied);
        }
    }
    progress(StreamProgress { done: total, total, copied });
    let detached = opts.detach && image.backing_file().is_some();
    if detached {
        image.detach_backing()?;
    } else {
        image.flush()?;
    }
    Ok(StreamReport { copied, complete: true, detached })
}
