//! Background prefetch: stream backing data into the top image while the
//! clients of a server leave it idle.
//!
//! The rule (kept deliberately simple so it is easy to reason about):
//!
//! - Client I/O is tracked by an [`Activity`] handle: every request the
//!   server carries out runs inside [`Activity::begin`] (the
//!   [`ActivityDevice`] wrapper does this for any device), which counts
//!   requests in flight and records when the last one ended.
//! - The prefetcher copies one chunk (at most [`PrefetchOptions::chunk`]
//!   bytes, via [`Qcow2::stream_step`]) only when no request is in flight
//!   and the last one ended at least [`PrefetchOptions::idle`] ago
//!   (50 ms by default); otherwise it sleeps [`PrefetchOptions::poll`] and
//!   looks again. A client that comes back therefore waits for at most
//!   one chunk of prefetch work.
//! - With a rate, after copying `n` bytes the next chunk starts no sooner
//!   than `n / rate` seconds after this one started (no credit is saved
//!   up while the client is busy, so there are no bursts).
//! - Its own reads go to the engine directly, not through the
//!   [`ActivityDevice`], so prefetching never counts as client activity.
//!
//! Copying uses the same materializing primitive as copy-on-read, which
//! marks clusters in flight, so client writes racing with the prefetcher
//! are never overwritten by backing data.

use crate::device::{BlockDevice, BlockStatus};
use crate::qcow2::Qcow2;
use crate::Result;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Debug)]
struct ActivityInner {
    epoch: Instant,
    in_flight: AtomicUsize,
    /// When the last request ended, in nanoseconds since `epoch`.
    last_end: AtomicU64,
}

/// Client I/O activity, shared between whoever serves clients and the
/// prefetcher. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Activity(Arc<ActivityInner>);

impl Default for Activity {
    fn default() -> Self {
        Activity::new()
    }
}

impl Activity {
    /// No activity yet (counts as idle since now).
    pub fn new() -> Activity {
        Activity(Arc::new(ActivityInner {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_end: AtomicU64::new(0),
        }))
    }

    /// Marks a client request in flight until the guard is dropped.
    pub fn begin(&self) -> ActivityGuard {
        self.0.in_flight.fetch_add(1, Ordering::AcqRel);
        ActivityGuard(self.clone())
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.0.in_flight.load(Ordering::Acquire)
    }

    /// How long no request has been in flight; `None` while one is.
    pub fn idle_for(&self) -> Option<Duration> {
        if self.in_flight() > 0 {
            return None;
        }
        let now = self.0.epoch.elapsed();
        let last = Duration::from_nanos(self.0.last_end.load(Ordering::Acquire));
        Some(now.saturating_sub(last))
    }
}

/// A request in flight; see [`Activity::begin`].
#[derive(Debug)]
pub struct ActivityGuard(Activity);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        let inner = &(self.0).0;
        let now = inner.epoch.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        inner.last_end.fetch_max(now, Ordering::AcqRel);
        inner.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A device whose every call counts as client activity: wrap the device a
/// server exports in it.
pub struct ActivityDevice {
    inner: Arc<dyn BlockDevice>,
    activity: Activity,
}

impl std::fmt::Debug for ActivityDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActivityDevice")
            .field("inner", &self.inner.format_name())
            .field("activity", &self.activity)
            .finish()
    }
}

impl ActivityDevice {
    /// Wraps `inner`, reporting to `activity`.
    pub fn new(inner: Arc<dyn BlockDevice>, activity: Activity) -> ActivityDevice {
        ActivityDevice { inner, activity }
    }
}

impl BlockDevice for ActivityDevice {
    crate::forward_block_device!(inner: len, backing, format_name, is_read_only, close, dirty_bitmap_extents);

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let _g = self.activity.begin();
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let _g = self.activity.begin();
        self.inner.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        let _g = self.activity.begin();
        self.inner.write_zeroes(offset, len, may_unmap)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let _g = self.activity.begin();
        self.inner.discard(offset, len)
    }
    fn flush(&self) -> Result<()> {
        let _g = self.activity.begin();
        self.inner.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let _g = self.activity.begin();
        self.inner.block_status(offset, len)
    }
    fn resize(&self, new_len: u64) -> Result<()> {
        let _g = self.activity.begin();
        self.inner.resize(new_len)
    }
}

/// Tuning of a [`Prefetcher`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PrefetchOptions {
    /// Copy at most this many bytes per second (`None`: no limit).
    pub rate: Option<u64>,
    /// Quiet time required before each chunk.
    pub idle: Duration,
    /// How long to sleep while the client is busy.
    pub poll: Duration,
    /// Largest range handled per chunk (bytes).
    pub chunk: u64,
}

setters!(PrefetchOptions { idle: Duration, poll: Duration, chunk: u64 } opt { rate: u64 });

impl Default for PrefetchOptions {
    fn default() -> Self {
        PrefetchOptions { rate: None, idle: Duration::from_millis(50), poll: Duration::from_millis(10), chunk: 1 << 20 }
    }
}

/// Where a prefetcher is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefetchProgress {
    /// Guest bytes examined so far.
    pub done: u64,
    /// Virtual size of the image.
    pub total: u64,
    /// Bytes of clusters copied from the backing chain.
    pub copied: u64,
    /// The whole image has been examined.
    pub finished: bool,
}

#[derive(Debug, Default)]
struct State {
    done: AtomicU64,
    copied: AtomicU64,
    finished: AtomicBool,
    error: Mutex<Option<String>>,
}

/// A background thread streaming backing data into an image while its
/// clients are idle; see the module docs for the rule.
#[derive(Debug)]
pub struct Prefetcher {
    stop: Arc<AtomicBool>,
    state: Arc<State>,
    total: u64,
    handle: Option<JoinHandle<()>>,
}

impl Prefetcher {
    /// Starts prefetching into `image` (which must be writable), watching
    /// `activity` for client I/O.
    pub fn start(image: Arc<Qcow2>, activity: Activity, opts: PrefetchOptions) -> Result<Prefetcher> {
        if image.is_read_only() {
            return Err(crate::Error::ReadOnly("prefetching needs the image opened read-write".into()));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(State::default());
        let total = image.len();
        let (st, sp) = (Arc::clone(&state), Arc::clone(&stop));
        let handle = std::thread::Builder::new()
            .name("oxcow-prefetch".into())
            .spawn(move || {
                if let Err(e) = run(&image, &activity, &opts, &st, &sp) {
                    *st.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
                }
                // Make what was copied durable (best effort: a failure
                // only loses the cache, which the next run refetches).
                let _ = image.flush();
            })
            .map_err(|e| crate::Error::io("starting the prefetch thread", e))?;
        Ok(Prefetcher { stop, state, total, handle: Some(handle) })
    }

    /// Progress so far.
    pub fn progress(&self) -> PrefetchProgress {
        PrefetchProgress {
            done: self.state.done.load(Ordering::Acquire),
            total: self.total,
            copied: self.state.copied.load(Ordering::Acquire),
            finished: self.state.finished.load(Ordering::Acquire),
        }
    }

    /// Whether the thread has ended (finished, failed or stopped).
    pub fn is_done(&self) -> bool {
        self.handle.as_ref().is_none_or(|h| h.is_finished())
    }

    /// The error that ended prefetching, if one did.
    pub fn error(&self) -> Option<String> {
        self.state.error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops the thread (after its current chunk) and waits for it.
    pub fn stop(mut self) -> PrefetchProgress {
        self.halt();
        self.progress()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Sets up prefetching for an image about to be exported: returns the
/// device to hand to the server (the image's device, reporting client
/// activity) and the running prefetcher, to keep until serving ends.
///
/// ```no_run
/// # use oxcow::{nbd, tools::prefetch, OpenOptions};
/// let opts = OpenOptions::read_write().allow_network_backing(true);
/// let img = oxcow::open("disk.qcow2", &opts).unwrap();
/// let (dev, prefetcher) = prefetch::for_export(&img, prefetch::PrefetchOptions::default()).unwrap();
/// let server = nbd::server::Server::new(dev, nbd::server::ExportConfig::default());
/// // ... serve ...
/// prefetcher.stop();
/// ```
pub fn for_export(img: &crate::image::Image, opts: PrefetchOptions) -> Result<(Arc<dyn BlockDevice>, Prefetcher)> {
    let q = img.qcow2().cloned().ok_or_else(|| {
        crate::Error::invalid("prefetching needs a qcow2 image (with a backing file to prefetch from)")
    })?;
    let activity = Activity::new();
    let dev: Arc<dyn BlockDevice> = Arc::new(ActivityDevice::new(img.device().clone(), activity.clone()));
    let pf = Prefetcher::start(q, activity, opts)?;
    Ok((dev, pf))
}

fn run(image: &Qcow2, activity: &Activity, opts: &PrefetchOptions, st: &State, stop: &AtomicBool) -> Result<()> {
    let total = image.len();
    let chunk = opts.chunk.max(image.cluster_size());
    let mut pos = 0u64;
    let mut not_before = Instant::now();
    while pos < total && !stop.load(Ordering::Acquire) {
        let idle = activity.idle_for().is_some_and(|d| d >= opts.idle);
        let now = Instant::now();
        if !idle || now < not_before {
            let wait = if idle { (not_before - now).min(opts.poll) } else { opts.poll };
            std::thread::sleep(wait);
            continue;
        }
        let (next, n) = image.stream_step(pos, chunk)?;
        pos = next.max(pos + 1).min(total);
        st.done.store(pos, Ordering::Release);
        st.copied.fetch_add(n, Ordering::AcqRel);
        if let Some(rate) = opts.rate.filter(|&r| r > 0) {
            not_before = now + Duration::from_secs_f64(n as f64 / rate as f64);
        }
    }
    if pos >= total {
        st.finished.store(true, Ordering::Release);
    }
    Ok(())
}
