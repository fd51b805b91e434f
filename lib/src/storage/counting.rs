//! A pass-through storage that counts writes and flushes (for tests that
//! prove how much metadata a workload writes, or that a cache mode syncs
//! what it promises, without timing anything).

use super::Storage;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Counts operations on the storage it wraps.
pub struct CountingStorage {
    inner: Arc<dyn Storage>,
    writes: AtomicU64,
    flushes: AtomicU64,
    /// Modifications (writes, hole punches, length changes) since the
    /// last flush.
    unsynced: AtomicU64,
    /// Writes that did not land in `data_ranges` (metadata writes).
    log: std::sync::Mutex<Vec<(u64, u64)>>,
    /// Every reservation (`allocate`) so far, as (offset, length).
    reservations: std::sync::Mutex<Vec<(u64, u64)>>,
}

impl std::fmt::Debug for CountingStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CountingStorage")
            .field("writes", &self.writes())
            .field("flushes", &self.flushes())
            .finish_non_exhaustive()
    }
}

impl CountingStorage {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Storage>) -> Self {
        CountingStorage {
            inner,
            writes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            unsynced: AtomicU64::new(0),
            log: Default::default(),
            reservations: Default::default(),
        }
    }
    /// Writes so far.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }
    /// Flushes so far.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }
    /// Modifications (writes, hole punches, length changes) not followed
    /// by a flush yet.
    pub fn unsynced(&self) -> u64 {
        self.unsynced.load(Ordering::SeqCst)
    }
    /// (offset, length) of every write so far, and clears the list.
    pub fn take_writes(&self) -> Vec<(u64, u64)> {
        std::mem::take(&mut *self.log.lock().unwrap_or_else(|e| e.into_inner()))
    }
    /// (offset, length) of every reservation (`allocate`) so far, and
    /// clears the list.
    pub fn take_reservations(&self) -> Vec<(u64, u64)> {
        std::mem::take(&mut *self.reservations.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Storage for CountingStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.unsynced.fetch_add(1, Ordering::SeqCst);
        self.log.lock().unwrap_or_else(|e| e.into_inner()).push((offset, buf.len() as u64));
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        // Counted as synced only once the flush succeeded; what it covers
        // is what was written before it started.
        let before = self.unsynced.load(Ordering::SeqCst);
        self.inner.flush()?;
        let _ = self.unsynced.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| Some(n.saturating_sub(before)));
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.unsynced.fetch_add(1, Ordering::SeqCst);
        self.inner.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.unsynced.fetch_add(1, Ordering::SeqCst);
        self.inner.punch_hole(offset, len)
    }
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.reservations.lock().unwrap_or_else(|e| e.into_inner()).push((offset, len));
        self.inner.allocate(offset, len)
    }
    fn allocated_size(&self) -> io::Result<u64> {
        self.inner.allocated_size()
    }
    fn extent_at(&self, offset: u64) -> Option<(bool, u64)> {
        self.inner.extent_at(offset)
    }
}
