//! QEMU's qcow2 runtime cache options (`l2-cache-size`,
//! `l2-cache-entry-size`, `refcount-cache-size`, `cache-size`,
//! `cache-clean-interval`) and how they turn into cache sizes, with
//! QEMU's rules and error messages so a command line that works with
//! qemu-img or qemu-nbd works (or fails) the same here.
//!
//! The rules, as QEMU documents them (docs/qcow2-cache.txt): the L2 cache
//! defaults to what covers the whole disk, at most 32 MiB; the refcount
//! cache defaults to (and is at least) 4 clusters; `cache-size` alone gives
//! the L2 cache as much as it can use and the rest to refcounts; at most
//! two of the three sizes may be given. When the L2 cache cannot cover the
//! disk, slices default to 4 KiB (or a cluster if smaller), otherwise to a
//! cluster.

use super::Qcow2;
use crate::{Error, Result};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// The L2 cache's default ceiling on Linux.
const DEFAULT_L2_MAX: u64 = 32 << 20;
/// Fewest slices the L2 cache holds, whatever it was given.
const MIN_L2_SLICES: u64 = 2;
/// Fewest (and default number of) refcount blocks cached.
const MIN_REFCOUNT_BLOCKS: u64 = 4;
/// Seconds between cache cleanings by default (QEMU's, on Linux).
const DEFAULT_CLEAN_INTERVAL: u64 = 600;

/// The cache options as given on the command line; `None` is "not set"
/// (which QEMU tells apart from any value).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheOptions {
    /// `cache-size`: both caches together, in bytes.
    pub cache_size: Option<u64>,
    /// `l2-cache-size`: the L2 cache's ceiling, in bytes.
    pub l2_cache_size: Option<u64>,
    /// `refcount-cache-size`, in bytes.
    pub refcount_cache_size: Option<u64>,
    /// `l2-cache-entry-size`: bytes per cached L2 slice.
    pub l2_cache_entry_size: Option<u64>,
    /// `cache-clean-interval`: seconds after which cached tables not used
    /// since are dropped (0: never).
    pub cache_clean_interval: Option<u64>,
}

setters!(CacheOptions {} opt {
    cache_size: u64,
    l2_cache_size: u64,
    refcount_cache_size: u64,
    l2_cache_entry_size: u64,
    cache_clean_interval: u64,
});

impl CacheOptions {
    /// Sets the option QEMU calls `key` from its value as given, parsed as
    /// QEMU parses sizes (suffixes k, M, G, T, P, E) or, for
    /// `cache-clean-interval`, a plain number. `Ok(false)`: not a cache
    /// option.
    pub fn set(&mut self, key: &str, value: &str) -> Result<bool> {
        let slot = match key {
            "cache-size" => &mut self.cache_size,
            "l2-cache-size" => &mut self.l2_cache_size,
            "refcount-cache-size" => &mut self.refcount_cache_size,
            "l2-cache-entry-size" => &mut self.l2_cache_entry_size,
            "cache-clean-interval" => {
                // A negative number wraps, as in QEMU, into one too big.
                let v = value.trim();
                let n = v
                    .parse::<u64>()
                    .ok()
                    .or_else(|| v.parse::<i64>().ok().map(|n| n as u64))
                    .ok_or_else(|| Error::invalid(format!("Parameter '{key}' expects a number")))?;
                self.cache_clean_interval = Some(n);
                return Ok(true);
            }
            _ => return Ok(false),
        };
        if value.trim().starts_with('-') {
            return Err(Error::invalid(format!("Value '{value}' is out of range for parameter '{key}'")));
        }
        *slot = Some(parse_size(value).ok_or_else(|| {
            Error::invalid(format!(
                "Parameter '{key}' expects a non-negative number below 2^64\n\
                 Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
                 and exabytes, respectively."
            ))
        })?);
        Ok(true)
    }

    /// Whether any option is set.
    pub fn is_set(&self) -> bool {
        *self != CacheOptions::default()
    }

    /// Checks the options against an image of `disk_size` bytes with
    /// clusters of `cluster_size` (and extended L2 entries or not), with
    /// the errors opening it so would give (qemu-io's `reopen` checks
    /// before it lets go of the image).
    pub fn check(&self, disk_size: u64, cluster_size: u64, extended_l2: bool) -> Result<()> {
        self.resolve(disk_size, cluster_size, if extended_l2 { 16 } else { 8 }).map(|_| ())
    }

    /// The cache sizes for an image of `disk_size` bytes with clusters of
    /// `cluster_size` and L2 entries of `entry_size` bytes.
    pub(crate) fn resolve(&self, disk_size: u64, cluster_size: u64, entry_size: u64) -> Result<CacheSizes> {
        let tables = disk_size.div_ceil(cluster_size).div_ceil(cluster_size / entry_size).max(1);
        // What holds every L2 table of the disk: more is never used.
        let whole = tables.saturating_mul(cluster_size);
        let min_refcount = MIN_REFCOUNT_BLOCKS * cluster_size;
        let l2_max = self.l2_cache_size.unwrap_or(DEFAULT_L2_MAX);
        let mut l2 = whole.min(l2_max);
        let mut refcount = self.refcount_cache_size.unwrap_or(0);
        if let Some(total) = self.cache_size {
            if self.l2_cache_size.is_some() && self.refcount_cache_size.is_some() {
                return Err(Error::invalid(
                    "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time",
                ));
            }
            if self.l2_cache_size.is_some() && l2_max > total {
                return Err(Error::invalid("l2-cache-size may not exceed cache-size"));
            }
            if refcount > total {
                return Err(Error::invalid("refcount-cache-size may not exceed cache-size"));
            }
            if self.l2_cache_size.is_some() {
                refcount = total - l2;
            } else if self.refcount_cache_size.is_some() {
                l2 = total - refcount;
            } else if total >= whole.saturating_add(min_refcount) {
                l2 = whole;
                refcount = total - l2;
            } else {
                refcount = total.min(min_refcount);
                l2 = total - refcount;
            }
        }
        let slice = match self.l2_cache_entry_size {
            Some(s) => s,
            None if l2 < whole => cluster_size.min(4096),
            None => cluster_size,
        };
        if !slice.is_power_of_two() || slice < 512 || slice > cluster_size {
            return Err(Error::invalid(format!(
                "L2 cache entry size must be a power of two between 512 and the cluster size ({cluster_size})"
            )));
        }
        let l2_slices = (l2 / slice).max(MIN_L2_SLICES);
        if l2_slices > i32::MAX as u64 {
            return Err(Error::invalid("L2 cache size too big"));
        }
        let refcount_blocks = (refcount / cluster_size).max(MIN_REFCOUNT_BLOCKS);
        if refcount_blocks > i32::MAX as u64 {
            return Err(Error::invalid("Refcount cache size too big"));
        }
        let clean = self.cache_clean_interval.unwrap_or(DEFAULT_CLEAN_INTERVAL);
        if clean > u64::from(u32::MAX) {
            return Err(Error::invalid("Cache clean interval too big"));
        }
        Ok(CacheSizes {
            l2_slices: l2_slices as usize,
            slice_bytes: slice as usize,
            refcount_blocks: refcount_blocks as usize,
            clean_interval: clean,
        })
    }
}

/// What an image's caches hold, from [`CacheOptions::resolve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CacheSizes {
    /// L2 slices cached at most.
    pub l2_slices: usize,
    /// Bytes per L2 slice.
    pub slice_bytes: usize,
    /// Refcount blocks cached at most.
    pub refcount_blocks: usize,
    /// Seconds between cleanings (0: never).
    pub clean_interval: u64,
}

impl Qcow2 {
    /// Drops the cached L2 slices and refcount blocks not used since the
    /// last call (clean ones only); returns how many went.
    pub fn drop_idle_cache(&self) -> usize {
        let mut m = self.lock();
        m.map.l2_mut().drop_idle() + m.refs.blocks_mut().drop_idle()
    }

    /// Starts the `cache-clean-interval` cleaner of an image shared as
    /// `q`: a thread that wakes every interval and drops what was not used
    /// during it. It holds the image only while cleaning, and ends when
    /// the image is dropped (which wakes it).
    pub fn start_cache_cleaner(q: &Arc<Qcow2>) {
        let secs = q.clean_interval;
        if secs == 0 {
            return;
        }
        let weak: Weak<Qcow2> = Arc::downgrade(q);
        let spawned = std::thread::Builder::new().name("qcow2-cache-clean".into()).spawn(move || loop {
            std::thread::park_timeout(Duration::from_secs(secs));
            let Some(q) = weak.upgrade() else { return };
            if q.cleaner_stop.load(std::sync::atomic::Ordering::Acquire) {
                return;
            }
            q.drop_idle_cache();
        });
        // Without the thread the caches only stay fuller: not an error.
        if let Ok(h) = spawned {
            *q.cleaner.lock().unwrap_or_else(|e| e.into_inner()) = Some(h.thread().clone());
        }
    }

    /// Wakes the cleaner so that it sees the image gone and ends.
    pub(crate) fn stop_cache_cleaner(&self) {
        self.cleaner_stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(t) = self.cleaner.lock().unwrap_or_else(|e| e.into_inner()).take() {
            t.unpark();
        }
    }
}

/// A size as QEMU's option parser reads it: a number (possibly with a
/// fraction) and an optional binary suffix; bytes without one.
fn parse_size(v: &str) -> Option<u64> {
    let v = v.trim();
    let split = v.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(v.len());
    let (num, suffix) = v.split_at(split);
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return None,
    };
    if num.is_empty() {
        return None;
    }
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(1u64 << shift);
    }
    // A fraction only with a suffix, as QEMU takes it ("1.5M").
    let f = num.parse::<f64>().ok().filter(|_| shift > 0)?;
    let bytes = f * (1u64 << shift) as f64;
    (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIB: u64 = 1 << 40;

    #[test]
    fn defaults_cover_the_disk_up_to_32_mib_in_4k_slices() {
        let s = CacheOptions::default().resolve(TIB, 65536, 8).expect("valid");
        assert_eq!(s.slice_bytes, 4096);
        assert_eq!(s.l2_slices, (32 << 20) / 4096);
        assert_eq!(s.refcount_blocks, 4);
        assert_eq!(s.clean_interval, 600);
        // A small disk: every table fits, so slices are whole tables.
        let s = CacheOptions::default().resolve(1 << 30, 65536, 8).expect("valid");
        assert_eq!((s.slice_bytes, s.l2_slices), (65536, 2));
        // Extended entries: twice the tables for the same disk.
        let s = CacheOptions::default().resolve(64 << 30, 65536, 16).expect("valid");
        assert_eq!((s.slice_bytes, s.l2_slices), (65536, 256));
    }

    #[test]
    fn cache_size_alone_goes_to_l2_first() {
        let o = CacheOptions::default().cache_size(1u64 << 20);
        let s = o.resolve(TIB, 65536, 8).expect("valid");
        // Less than the whole L2 plus the refcount minimum: refcounts
        // keep their 4 clusters, L2 the rest.
        assert_eq!(s.refcount_blocks, 4);
        assert_eq!(s.l2_slices, ((1 << 20) - 4 * 65536) / 4096);
        let s = o.resolve(1 << 30, 65536, 8).expect("valid");
        assert_eq!(s.slice_bytes, 65536);
        assert_eq!(s.refcount_blocks, ((1 << 20) - 2 * 65536) / 65536);
    }

    #[test]
    fn qemus_refusals() {
        let err = |o: CacheOptions| o.resolve(TIB, 65536, 8).expect_err("refused").to_string();
        let all = CacheOptions::default().cache_size(1 << 20).l2_cache_size(1 << 19).refcount_cache_size(1 << 16);
        assert!(err(all).contains("may not be set at the same time"));
        assert!(err(CacheOptions::default().cache_size(1 << 20).l2_cache_size(2 << 20))
            .contains("l2-cache-size may not exceed cache-size"));
        assert!(err(CacheOptions::default().cache_size(1 << 20).refcount_cache_size(2 << 20))
            .contains("refcount-cache-size may not exceed cache-size"));
        for bad in [256, 3000, 131072] {
            assert!(err(CacheOptions::default().l2_cache_entry_size(bad))
                .contains("L2 cache entry size must be a power of two between 512 and the cluster size (65536)"));
        }
        assert!(err(CacheOptions::default().cache_clean_interval(1 << 32)).contains("Cache clean interval too big"));
    }

    #[test]
    fn sizes_parse_as_qemu_reads_them() {
        let mut o = CacheOptions::default();
        assert!(o.set("l2-cache-size", "2M").expect("valid"));
        assert!(o.set("cache-size", "1.5M").expect("valid"));
        assert!(o.set("l2-cache-entry-size", "4096").expect("valid"));
        assert!(!o.set("lazy-refcounts", "on").expect("not ours"));
        assert_eq!(o.l2_cache_size, Some(2 << 20));
        assert_eq!(o.cache_size, Some(3 << 19));
        assert_eq!(o.l2_cache_entry_size, Some(4096));
        assert!(o.set("l2-cache-size", "lots").is_err());
        assert!(o.set("l2-cache-size", "-1").expect_err("negative").to_string().contains("out of range"));
        assert!(o
            .set("cache-clean-interval", "1.5")
            .expect_err("not a number")
            .to_string()
            .contains("expects a number"));
        // -1 wraps to a number too big, which the open refuses.
        assert!(o.set("cache-clean-interval", "-1").expect("a number"));
        assert_eq!(o.cache_clean_interval, Some(u64::MAX));
    }
}
