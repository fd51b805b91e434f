//! The bitmaps of an image open for writing, and the one hook guest
//! writes call.
//!
//! Lock order: the metadata mutex, then this one (a leaf: nothing is
//! taken while holding it). A guest write never holds it across I/O: it
//! sets bits in memory, as QEMU does; the bitmaps reach disk at a clean
//! close. Until then every bitmap on disk carries the in-use flag, set
//! durably before the first guest write could reach disk, so a crash
//! leaves them marked inconsistent, never silently stale.

use super::dirty::DirtyBitmap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

/// One bitmap as the engine keeps it while the image is open.
#[derive(Debug, Clone)]
pub(crate) struct Bitmap {
    pub name: String,
    pub granularity_bits: u8,
    /// Tracks guest writes (the `auto` flag).
    pub enabled: bool,
    /// Found in use at open (not saved cleanly): left on disk as it is,
    /// never read, changed or used, as QEMU treats it.
    pub inconsistent: bool,
    /// Flags other than in_use and auto, kept.
    pub other_flags: u32,
    pub kind: u8,
    pub extra: Vec<u8>,
    /// The bitmap table on disk now (offset, entries), if stored.
    pub table: Option<(u64, u32)>,
    /// That table's entries, whose data clusters a rewrite frees.
    pub table_entries: Vec<u64>,
    /// The bits (none for an inconsistent bitmap).
    pub bits: Option<DirtyBitmap>,
    /// Differs from what `table` holds.
    pub changed: bool,
}

/// What the tracker lock protects.
#[derive(Debug, Default)]
pub(crate) struct TrackState {
    /// The bitmaps are kept in memory and stored at close (a writable
    /// image whose bitmaps extension was loaded, or that had none).
    pub managed: bool,
    pub bitmaps: Vec<Bitmap>,
    /// The directory on disk marks every consistent bitmap in use.
    pub in_use_on_disk: bool,
    /// The directory (names, flags, set of bitmaps) must be rewritten.
    pub dir_changed: bool,
    /// Tables (offset, entries) and their entries of removed bitmaps,
    /// freed once a directory without them is on disk.
    pub removed: Vec<((u64, u32), Vec<u64>)>,
    /// Bitmaps of a read-only image loaded for queries, by name.
    pub read_cache: Vec<(String, DirtyBitmap)>,
}

impl TrackState {
    /// Whether anything must be written at close.
    pub fn needs_store(&self) -> bool {
        self.managed && (self.in_use_on_disk || self.dir_changed || self.bitmaps.iter().any(|b| b.changed))
    }

    pub fn find(&self, name: &str) -> Option<usize> {
        self.bitmaps.iter().position(|b| b.name == name)
    }
}

/// The bitmaps and a flag that lets writes skip the lock when no bitmap
/// is enabled.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    /// Some enabled, consistent bitmap exists.
    active: AtomicBool,
    /// An active bitmap is not yet marked in use on disk.
    needs_in_use: AtomicBool,
    state: Mutex<TrackState>,
}

impl Tracker {
    pub fn lock(&self) -> MutexGuard<'_, TrackState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Recomputes the fast-path flags after `st` changed.
    pub fn refresh(&self, st: &TrackState) {
        let active = st.managed && st.bitmaps.iter().any(|b| b.enabled && !b.inconsistent);
        self.active.store(active, Ordering::Release);
        self.needs_in_use.store(active && !st.in_use_on_disk, Ordering::Release);
    }

    /// Whether the in-use flags must be written before the next guest
    /// write may reach disk.
    pub fn needs_in_use(&self) -> bool {
        self.needs_in_use.load(Ordering::Acquire)
    }

    /// Records a guest write, write-zeroes or discard of
    /// `[offset, offset + len)` in every enabled bitmap.
    pub fn mark(&self, offset: u64, len: u64) {
        if !self.active.load(Ordering::Acquire) {
            return;
        }
        let mut st = self.lock();
        for b in st.bitmaps.iter_mut().filter(|b| b.enabled && !b.inconsistent) {
            if let Some(bits) = b.bits.as_mut() {
                bits.set(offset, len);
                b.changed = true;
            }
        }
    }
}
