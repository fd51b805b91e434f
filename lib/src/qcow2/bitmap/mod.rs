//! Persistent dirty bitmaps (the qcow2 bitmaps extension): what a user
//! sees and does with them. `dirty.rs` holds one bitmap's bits,
//! `tracker.rs` the bitmaps of an open image and the guest write hook,
//! `persist.rs` the on-disk side (load, in-use flags, store at close).
//!
//! As in QEMU, an image opened for writing loads its bitmaps, marks them
//! in use on disk, records every guest write, write-zeroes and discard in
//! the enabled ones, and stores them (in use cleared) at a clean close.
//! Changes made through this API (add, remove, clear, enable, disable,
//! merge) reach disk at that close too.

mod dirty;
mod persist;
mod tracker;

pub use dirty::DirtyBitmap;
pub(crate) use tracker::Tracker;

use super::Qcow2;
use crate::format::bitmap::{
    FLAG_AUTO, FLAG_IN_USE, MAX_BITMAP_BYTES, MAX_GRANULARITY_BITS, MAX_TABLE_ENTRIES, MIN_GRANULARITY_BITS,
    TYPE_DIRTY_TRACKING,
};
use crate::format::limits::{MAX_BITMAPS, MAX_BITMAP_NAME};
use crate::{Error, Result};
use tracker::{Bitmap, TrackState};

/// QEMU's words for a bitmap over its size limit.
const TOO_LARGE: &str = "Too much space will be occupied by the bitmap. Use larger granularity";

/// One persistent bitmap of an image, as `qemu-img info` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BitmapInfo {
    /// The bitmap's name.
    pub name: String,
    /// Bytes of guest data per bit.
    pub granularity: u64,
    /// Not saved cleanly: its contents cannot be trusted (`in-use`).
    pub in_use: bool,
    /// Tracks every write while the image is in use (`auto`).
    pub auto: bool,
}

/// The error QEMU gives for using a bitmap found in use at open.
fn inconsistent(name: &str) -> Error {
    Error::invalid(format!(
        "Bitmap '{name}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk"
    ))
}

fn not_found(name: &str) -> Error {
    Error::invalid(format!("Dirty bitmap '{name}' not found"))
}

impl Qcow2 {
    /// The persistent bitmaps, in directory order: for an image open for
    /// writing as they will be stored at close (`in_use` then means
    /// inconsistent: found in use when the image was opened), else as the
    /// directory on disk lists them.
    pub fn bitmaps(&self) -> Result<Vec<BitmapInfo>> {
        {
            let st = self.bitmaps.lock();
            if st.managed {
                return Ok(st
                    .bitmaps
                    .iter()
                    .map(|b| BitmapInfo {
                        name: b.name.clone(),
                        granularity: 1 << b.granularity_bits,
                        in_use: b.inconsistent,
                        auto: b.enabled,
                    })
                    .collect());
            }
        }
        Ok(self
            .bitmap_directory()?
            .into_iter()
            .map(|e| BitmapInfo {
                granularity: e.granularity(),
                in_use: e.flags & FLAG_IN_USE != 0,
                auto: e.flags & FLAG_AUTO != 0,
                name: e.name,
            })
            .collect())
    }

    /// Reads and parses the bitmap directory on disk (its size was
    /// bounded when the header extension was parsed).
    pub(crate) fn bitmap_directory(&self) -> Result<Vec<crate::format::bitmap::BitmapDirEntry>> {
        // Without the autoclear bit QEMU ignores the extension: a program
        // that did not maintain the bitmaps wrote the image since.
        let Some(ext) = Self::bitmaps_ext_valid(&self.lock()) else { return Ok(Vec::new()) };
        self.read_directory(&ext)
    }

    /// Loads the bitmaps of an image being opened for writing and marks
    /// them in use on disk. In repair mode (`check -r`) a directory that
    /// cannot be loaded is left alone, untracked, for check to report.
    pub(crate) fn open_bitmaps(&self, repair: bool) -> Result<()> {
        if !self.g.v3 {
            return Ok(());
        }
        let mut m = self.lock();
        if m.hc.extensions.bitmaps.is_some() && Self::bitmaps_ext_valid(&m).is_none() {
            // As QEMU does: an extension the autoclear bit no longer vouches
            // for is dropped (its clusters are leaks for `check -r`).
            m.hc.extensions.bitmaps = None;
            self.write_header(&mut m)?;
            self.sync("dropping stale bitmaps extension")?;
            m.overlap = super::metadata_clusters(&self.g, &m);
        }
        let loaded = match self.load_bitmaps(&m) {
            Ok(b) => b,
            Err(_) if repair => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut st = self.bitmaps.lock();
        st.managed = true;
        st.bitmaps = loaded;
        if st.bitmaps.iter().any(|b| !b.inconsistent) {
            self.write_in_use_flags(&mut m, &mut st)?;
        }
        self.bitmaps.refresh(&st);
        Ok(())
    }

    /// The guest write hook: called before a write, write-zeroes or
    /// discard of `[offset, offset + len)` starts, so the bits are set
    /// before anything reaches disk (and the in-use flags are on disk).
    pub(crate) fn note_guest_write(&self, offset: u64, len: u64) -> Result<()> {
        if self.bitmaps.needs_in_use() {
            let mut m = self.lock();
            let mut st = self.bitmaps.lock();
            if !st.in_use_on_disk {
                self.write_in_use_flags(&mut m, &mut st)?;
            }
            self.bitmaps.refresh(&st);
        }
        self.bitmaps.mark(offset, len);
        Ok(())
    }

    /// Runs `f` on the bitmaps of an image open for writing; changes reach
    /// disk at the next clean close.
    fn edit_bitmaps<T>(&self, name: &str, f: impl FnOnce(&mut TrackState) -> Result<T>) -> Result<T> {
        if self.read_only {
            return Err(Error::ReadOnly("image opened read-only".into()));
        }
        let mut st = self.bitmaps.lock();
        if !st.managed {
            return Err(if self.g.v3 {
                Error::unsupported("persistent bitmaps of this image (its bitmap directory could not be loaded)")
            } else {
                not_found(name)
            });
        }
        let r = f(&mut st);
        self.bitmaps.refresh(&st);
        r
    }

    /// The granularity QEMU gives a new bitmap: the cluster size, kept
    /// between 4 KiB and 64 KiB.
    pub fn default_bitmap_granularity(&self) -> u64 {
        self.g.cluster_size.clamp(4096, 65536)
    }

    /// Adds an empty bitmap `name` (granularity in bytes, a power of two
    /// from 512 to 2 GiB; `None` for QEMU's default), recording writes
    /// from now on when `enabled`.
    pub fn bitmap_add(&self, name: &str, granularity: Option<u64>, enabled: bool) -> Result<()> {
        let gran = granularity.unwrap_or_else(|| self.default_bitmap_granularity());
        let bits = gran.trailing_zeros() as u8;
        if !gran.is_power_of_two() || !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&bits) {
            return Err(Error::invalid("Granularity must be power of 2 and at least 512"));
        }
        if name.len() > MAX_BITMAP_NAME as usize {
            return Err(Error::invalid(format!(
                "Can't make bitmap '{name}' persistent: Name length exceeds maximum ({MAX_BITMAP_NAME} characters)"
            )));
        }
        if name.is_empty() {
            return Err(Error::invalid("Bitmap name cannot be empty"));
        }
        if !self.g.v3 {
            return Err(Error::invalid(format!(
                "Can't make bitmap '{name}' persistent: Cannot store dirty bitmaps in qcow2 v2 files"
            )));
        }
        let size = crate::BlockDevice::len(self);
        let cluster_bits = self.g.cluster_bits;
        if !Self::bitmap_fits(size, bits, cluster_bits) {
            return Err(Error::invalid(format!("Can't make bitmap '{name}' persistent: {TOO_LARGE}")));
        }
        self.edit_bitmaps(name, |st| {
            if st.find(name).is_some() {
                return Err(Error::invalid(format!("Bitmap already exists: {name}")));
            }
            if st.bitmaps.len() >= MAX_BITMAPS as usize {
                return Err(Error::invalid(format!(
                    "Can't make bitmap '{name}' persistent: Maximum number of persistent bitmaps is already reached"
                )));
            }
            st.bitmaps.push(Bitmap {
                name: name.to_string(),
                granularity_bits: bits,
                enabled,
                inconsistent: false,
                other_flags: 0,
                kind: TYPE_DIRTY_TRACKING,
                extra: Vec::new(),
                table: None,
                table_entries: Vec::new(),
                bits: Some(DirtyBitmap::new(size, bits, cluster_bits)),
                changed: true,
            });
            st.dir_changed = true;
            Ok(())
        })
    }

    /// Removes bitmap `name` (an inconsistent one too); its clusters are
    /// freed when the change is stored.
    pub fn bitmap_remove(&self, name: &str) -> Result<()> {
        self.edit_bitmaps(name, |st| {
            let i = st.find(name).ok_or_else(|| not_found(name))?;
            let b = st.bitmaps.remove(i);
            if let Some(t) = b.table {
                st.removed.push((t, b.table_entries));
            }
            st.dir_changed = true;
            Ok(())
        })
    }

    /// Runs `f` on the consistent bitmap `name`.
    fn edit_one<T>(&self, name: &str, f: impl FnOnce(&mut Bitmap) -> T) -> Result<T> {
        self.edit_bitmaps(name, |st| {
            let i = st.find(name).ok_or_else(|| not_found(name))?;
            let b = &mut st.bitmaps[i];
            if b.inconsistent {
                return Err(inconsistent(name));
            }
            st.dir_changed = true;
            Ok(f(&mut st.bitmaps[i]))
        })
    }

    /// Clears every bit of bitmap `name`.
    pub fn bitmap_clear(&self, name: &str) -> Result<()> {
        self.edit_one(name, |b| {
            if let Some(bits) = b.bits.as_mut() {
                bits.clear();
            }
            b.changed = true;
        })
    }

    /// Starts (`true`) or stops recording guest writes in bitmap `name`.
    pub fn bitmap_set_enabled(&self, name: &str, enabled: bool) -> Result<()> {
        self.edit_one(name, |b| b.enabled = enabled)
    }

    /// Sets in bitmap `name` every bit set in `source` (another image's
    /// bitmap, or this one's from `bitmap_data`); granularities may differ.
    pub fn bitmap_merge(&self, name: &str, source: &DirtyBitmap) -> Result<()> {
        self.edit_one(name, |b| {
            if let Some(bits) = b.bits.as_mut() {
                bits.merge(source);
            }
            b.changed = true;
        })
    }

    /// The bits of bitmap `name`, as they are now (an image open for
    /// writing) or as stored (read-only). Query dirty ranges with
    /// `DirtyBitmap::extents` or `dirty_extents`.
    pub fn bitmap_data(&self, name: &str) -> Result<DirtyBitmap> {
        {
            let st = self.bitmaps.lock();
            if st.managed {
                let i = st.find(name).ok_or_else(|| not_found(name))?;
                return st.bitmaps[i].bits.clone().ok_or_else(|| inconsistent(name));
            }
        }
        let m = self.lock();
        let all = self.load_bitmaps(&m)?;
        let b = all.into_iter().find(|b| b.name == name).ok_or_else(|| not_found(name))?;
        b.bits.ok_or_else(|| inconsistent(name))
    }

    /// Copies every bitmap of `src` into this image (`convert --bitmaps`):
    /// same names, granularities, enabled state and bits, in the same
    /// directory order. A bitmap `src` found in use (inconsistent) is an
    /// error, or skipped when `skip_inconsistent`; the names skipped are
    /// returned, last in the directory first (the order QEMU names them
    /// in, and the first it refuses is that one too).
    pub fn copy_bitmaps_from(&self, src: &Qcow2, skip_inconsistent: bool) -> Result<Vec<String>> {
        let all = src.bitmaps()?;
        let broken: Vec<String> = all.iter().rev().filter(|b| b.in_use).map(|b| b.name.clone()).collect();
        if let (Some(first), false) = (broken.first(), skip_inconsistent) {
            return Err(Error::invalid(format!(
                "Cannot copy inconsistent bitmap '{first}'\nTry --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it"
            )));
        }
        for b in all.into_iter().filter(|b| !b.in_use) {
            let bits = src.bitmap_data(&b.name)?;
            self.bitmap_add(&b.name, Some(b.granularity), b.auto)?;
            self.bitmap_merge(&b.name, &bits)?;
        }
        Ok(broken)
    }

    /// The dirty and clean ranges of `[offset, offset + len)` in bitmap
    /// `name`, live for an image open for writing; a read-only image's
    /// bitmap is loaded once and kept.
    pub fn bitmap_extents(&self, name: &str, offset: u64, len: u64) -> Result<Vec<(u64, u64, bool)>> {
        {
            let st = self.bitmaps.lock();
            if st.managed {
                let i = st.find(name).ok_or_else(|| not_found(name))?;
                let bits = st.bitmaps[i].bits.as_ref().ok_or_else(|| inconsistent(name))?;
                return Ok(bits.extents(offset, len));
            }
            if let Some((_, bits)) = st.read_cache.iter().find(|(n, _)| n == name) {
                return Ok(bits.extents(offset, len));
            }
        }
        let bits = self.bitmap_data(name)?;
        let r = bits.extents(offset, len);
        self.bitmaps.lock().read_cache.push((name.to_string(), bits));
        Ok(r)
    }

    /// The dirty and clean ranges of `[offset, offset + len)` in bitmap
    /// `name` of this image or, when it has none of that name, of the
    /// nearest backing file that has one: the bitmap a qemu-nbd `-B NAME`
    /// export finds. Past the end of that backing file all is clean.
    pub(crate) fn chain_bitmap_extents(&self, name: &str, offset: u64, len: u64) -> Result<Vec<(u64, u64, bool)>> {
        if self.bitmaps()?.iter().any(|b| b.name == name) {
            return self.bitmap_extents(name, offset, len);
        }
        let Some(b) = self.backing.as_deref() else { return Err(not_found(name)) };
        let inner = len.min(b.len().saturating_sub(offset));
        let mut v = match inner {
            0 => Vec::new(),
            _ => b.dirty_bitmap_extents(name, offset, inner).ok_or_else(|| not_found(name))??,
        };
        if inner < len {
            v.push((offset + inner, len - inner, false));
        }
        Ok(v)
    }

    /// Whether the image has bitmaps QEMU would load (an operation that
    /// rewrites the whole disk, like reverting to a snapshot, is refused).
    pub fn has_bitmaps(&self) -> bool {
        let st = self.bitmaps.lock();
        if st.managed {
            return !st.bitmaps.is_empty();
        }
        drop(st);
        Self::bitmaps_ext_valid(&self.lock()).is_some()
    }

    /// Whether an image open for writing has bitmaps (without taking the
    /// metadata lock).
    pub(crate) fn bitmaps_loaded(&self) -> bool {
        let st = self.bitmaps.lock();
        st.managed && !st.bitmaps.is_empty()
    }

    /// Removes every bitmap durably and stops managing them (a downgrade
    /// to compat 0.10, which has no bitmaps extension).
    pub(crate) fn drop_bitmaps_for_v2(&self, m: &mut super::state::Meta) -> Result<()> {
        let mut st = self.bitmaps.lock();
        if st.managed {
            for b in std::mem::take(&mut st.bitmaps) {
                if let Some(t) = b.table {
                    st.removed.push((t, b.table_entries));
                }
            }
            st.dir_changed = true;
            self.store_bitmaps(m, &mut st)?;
            st.managed = false;
        }
        self.bitmaps.refresh(&st);
        Ok(())
    }

    /// Stores the bitmaps at a clean close (called with the metadata lock
    /// held, before the final write-back that applies the frees).
    pub(crate) fn close_bitmaps(&self, m: &mut super::state::Meta) -> Result<()> {
        let mut st = self.bitmaps.lock();
        let r = self.store_bitmaps(m, &mut st);
        self.bitmaps.refresh(&st);
        r
    }

    /// Follows a change of the virtual size: refused while a bitmap is
    /// inconsistent (QEMU's rule), else every bitmap is resized.
    pub(crate) fn resize_bitmaps_check(&self, new_size: u64) -> Result<()> {
        let st = self.bitmaps.lock();
        if !st.managed {
            return Ok(());
        }
        if let Some(b) = st.bitmaps.iter().find(|b| b.inconsistent) {
            return Err(inconsistent(&b.name));
        }
        // QEMU resizes anyway and then cannot store the bitmap (it stays
        // marked in use, lost for incremental backup); refusing before a
        // byte changes keeps the bitmap and tells the user why.
        match st.bitmaps.iter().find(|b| !Self::bitmap_fits(new_size, b.granularity_bits, self.g.cluster_bits)) {
            Some(b) => Err(Error::invalid(format!(
                "Cannot resize to {new_size} bytes: bitmap '{}' would not fit: {TOO_LARGE}",
                b.name
            ))),
            None => Ok(()),
        }
    }

    /// Whether a bitmap of `granularity_bits` over `size` guest bytes is
    /// within the limits QEMU checks when it opens or stores one.
    fn bitmap_fits(size: u64, granularity_bits: u8, cluster_bits: u32) -> bool {
        let (chunks, bytes) = DirtyBitmap::geometry(size, granularity_bits, cluster_bits);
        bytes <= MAX_BITMAP_BYTES && chunks <= u64::from(MAX_TABLE_ENTRIES)
    }

    /// Resizes every consistent bitmap to `size` guest bytes.
    pub(crate) fn resize_bitmaps(&self, size: u64) {
        let mut st = self.bitmaps.lock();
        for b in st.bitmaps.iter_mut() {
            if let Some(bits) = b.bits.as_mut() {
                bits.resize(size);
                b.changed = true;
            }
        }
    }
}
