//! Loading bitmaps at a writable open, marking them in use, and storing
//! them at a clean close.
//!
//! Crash-safety order of a store (QEMU's: everything new is written out
//! of place, the header switches to it, then the old is freed):
//!
//! ```text
//!  1. data clusters and tables of every consistent bitmap, the new
//!     directory (in use flags cleared), their refcounts
//!     -- fsync --    (write_back_durable)
//!  2. header: bitmaps extension names the new directory
//!     -- fsync --
//!  3. old directory, tables and data clusters freed (deferred frees,
//!     applied by the close's write-back)
//! ```
//! Removed bitmaps go first, in a store of their own (QEMU removes one at
//! once): a directory without them, the header switch, their clusters
//! and the old directory freed, as above; the frees are applied before
//! the main store allocates.
//! A crash before 2 leaves the old directory, whose bitmaps are in use
//! (inconsistent) plus leaked clusters; after 2, the new consistent one.
//! The in-use flags are set in place (only flags change, the entries keep
//! their size) and synced before the first guest write can reach disk.
//!
//! Where things land follows QEMU's store, so images (and `qcow2.py
//! dump-header` of them, iotest 303) come out the same: every consistent
//! bitmap is written anew at each store, in directory order (data
//! clusters, then its table), then the directory; tables and the
//! directory are written only as long as they are, not padded to their
//! clusters, so a directory in the last cluster ends the file as QEMU's
//! does (iotest 190 measures that file as raw).

use super::dirty::DirtyBitmap;
use super::tracker::{Bitmap, TrackState};
use crate::format::be::{encode_u64_table, u64_table};
use crate::format::bitmap::{
    encode_directory, parse_directory, BitmapDirEntry, FLAGS_KNOWN, FLAG_AUTO, FLAG_EXTRA_DATA_COMPATIBLE, FLAG_IN_USE,
    MAX_BITMAP_BYTES, MAX_GRANULARITY_BITS, MAX_TABLE_ENTRIES, MIN_GRANULARITY_BITS, TABLE_ALL_ONES, TABLE_OFFSET_MASK,
    TABLE_RESERVED_MASK, TYPE_DIRTY_TRACKING,
};
use crate::format::extensions::BitmapsExt;
use crate::format::limits::{MAX_BITMAPS, MAX_BITMAP_DIRECTORY_BYTES};
use crate::format::Autoclear;
use crate::qcow2::state::{Meta, MetaKind};
use crate::qcow2::units::HostOffset;
use crate::qcow2::Qcow2;
use crate::{Error, Result};

fn bad(name: &str, what: &str) -> Error {
    Error::corrupt(format!("bitmap '{name}': {what}"))
}

impl Qcow2 {
    /// Whether the image's bitmaps extension is one QEMU would load (the
    /// autoclear bit vouches for it).
    pub(crate) fn bitmaps_ext_valid(m: &Meta) -> Option<BitmapsExt> {
        let ext = m.hc.extensions.bitmaps?;
        (m.hc.header.autoclear_features & Autoclear::BITMAPS != 0).then_some(ext)
    }

    /// Reads and parses the directory `ext` names.
    pub(crate) fn read_directory(&self, ext: &BitmapsExt) -> Result<Vec<BitmapDirEntry>> {
        let len = usize::try_from(ext.directory_size)
            .map_err(|_| Error::field("bitmap_directory_size", ext.directory_size, "too large"))?;
        let file_len = self.file.len().map_err(|e| Error::io("reading image size", e))?;
        if ext.directory_offset.saturating_add(ext.directory_size) > file_len {
            return Err(Error::corrupt_at("bitmap directory runs past the end of the file", ext.directory_offset));
        }
        let mut dir = vec![0u8; len];
        self.file.read_at(&mut dir, ext.directory_offset).map_err(|e| Error::io("reading bitmap directory", e))?;
        parse_directory(&dir, ext.nb_bitmaps)
    }

    /// Loads every bitmap of the image (bits of the consistent ones), as
    /// a writable open needs them. Damage is an error, not a guess.
    pub(crate) fn load_bitmaps(&self, m: &Meta) -> Result<Vec<Bitmap>> {
        let Some(ext) = Self::bitmaps_ext_valid(m) else { return Ok(Vec::new()) };
        let cs = self.g.cluster_size;
        if !ext.directory_offset.is_multiple_of(cs) {
            return Err(Error::corrupt_at("bitmap directory is not cluster aligned", ext.directory_offset));
        }
        let file_len = self.file.len().map_err(|e| Error::io("reading image size", e))?;
        let mut out: Vec<Bitmap> = Vec::new();
        for e in self.read_directory(&ext)? {
            let name = e.name.clone();
            if name.contains('\u{fffd}') {
                return Err(bad(&name, "name is not UTF-8"));
            }
            if out.iter().any(|b| b.name == name) {
                return Err(bad(&name, "duplicate name"));
            }
            if e.flags & !FLAGS_KNOWN != 0 {
                return Err(bad(&name, "reserved flags set"));
            }
            if e.kind != TYPE_DIRTY_TRACKING {
                return Err(bad(&name, "unknown type"));
            }
            if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&e.granularity_bits) {
                return Err(bad(&name, "granularity out of range"));
            }
            let (chunks, bytes) = DirtyBitmap::geometry(m.hc.header.size, e.granularity_bits, self.g.cluster_bits);
            if bytes > MAX_BITMAP_BYTES {
                return Err(bad(&name, "bitmap too large"));
            }
            if e.table_size > MAX_TABLE_ENTRIES || u64::from(e.table_size) != chunks {
                return Err(bad(&name, "bitmap table size does not match the disk size"));
            }
            let table_bytes = u64::from(e.table_size) * 8;
            if !e.table_offset.is_multiple_of(cs)
                || e.table_offset == 0
                || e.table_offset.saturating_add(table_bytes) > file_len
            {
                return Err(bad(&name, "invalid bitmap table offset"));
            }
            // Sizes are bounded by the file now: allocating is safe.
            let mut bits = DirtyBitmap::new(m.hc.header.size, e.granularity_bits, self.g.cluster_bits);
            let mut raw = vec![0u8; table_bytes as usize];
            self.file.read_at(&mut raw, e.table_offset).map_err(|e| Error::io("reading bitmap table", e))?;
            let entries = u64_table(&raw);
            // Extra data we do not know, without the flag that allows it,
            // forbids using the bitmap: kept as it is, like one in use.
            let foreign = !e.extra.is_empty() && e.flags & FLAG_EXTRA_DATA_COMPATIBLE == 0;
            let inconsistent = e.flags & FLAG_IN_USE != 0 || foreign;
            // Clusters a store frees later must hold nothing else the
            // engine knows (a hostile table pointing at the L1 table, say).
            let overlaps =
                |off: u64, len: u64| m.overlap.conflict_names(off / cs, (off + len).div_ceil(cs), None).is_some();
            if overlaps(e.table_offset, table_bytes) {
                return Err(bad(&name, "bitmap table overlaps other metadata"));
            }
            for &t in &entries {
                let off = t & TABLE_OFFSET_MASK;
                if t & TABLE_RESERVED_MASK != 0
                    || (off != 0 && (t & TABLE_ALL_ONES != 0 || off.saturating_add(cs) > file_len || overlaps(off, cs)))
                {
                    return Err(bad(&name, "invalid bitmap table entry"));
                }
            }
            if !inconsistent {
                let mut cluster = vec![0u8; cs as usize];
                for (i, &t) in entries.iter().enumerate() {
                    let off = t & TABLE_OFFSET_MASK;
                    if off != 0 {
                        self.file.read_at(&mut cluster, off).map_err(|e| Error::io("reading bitmap data", e))?;
                        bits.load_chunk(i, Some(&cluster));
                    } else if t & TABLE_ALL_ONES != 0 {
                        bits.load_chunk(i, None);
                    }
                }
            }
            out.push(Bitmap {
                name,
                granularity_bits: e.granularity_bits,
                enabled: e.flags & FLAG_AUTO != 0,
                inconsistent,
                other_flags: e.flags & !(FLAG_IN_USE | FLAG_AUTO),
                kind: e.kind,
                extra: e.extra,
                table: Some((e.table_offset, e.table_size)),
                table_entries: entries,
                bits: (!inconsistent).then_some(bits),
                changed: false,
            });
        }
        Ok(out)
    }

    /// Sets the in-use flag of every consistent bitmap in the directory
    /// on disk, in place, and syncs, before a guest write may change the
    /// disk under bitmaps that would otherwise claim to be up to date.
    pub(crate) fn write_in_use_flags(&self, m: &mut Meta, st: &mut TrackState) -> Result<()> {
        if let Some(ext) = Self::bitmaps_ext_valid(m) {
            let mut dir = self.read_directory(&ext)?;
            let mut any = false;
            for e in dir.iter_mut() {
                let consistent = st.find(&e.name).is_some_and(|i| !st.bitmaps[i].inconsistent);
                if consistent && e.flags & FLAG_IN_USE == 0 {
                    e.flags |= FLAG_IN_USE;
                    any = true;
                }
            }
            if any {
                let bytes = encode_directory(&dir);
                self.write_meta(m, HostOffset(ext.directory_offset), &bytes, MetaKind::BitmapDirectory)?;
                self.sync("flushing bitmap in-use flags")?;
            }
        }
        st.in_use_on_disk = true;
        Ok(())
    }

    /// Writes `bits` into new clusters: a table and a data cluster for
    /// each chunk with a bit set. Returns the table's offset and entries.
    fn write_bitmap_data(&self, m: &mut Meta, bits: &DirtyBitmap) -> Result<(u64, Vec<u64>)> {
        let cs = self.g.cluster_size;
        let n = bits.chunk_count() as usize;
        let mut entries = vec![0u64; n];
        for (i, entry) in entries.iter_mut().enumerate() {
            if let Some(mut data) = bits.chunk_bytes(i) {
                data.resize(cs as usize, 0);
                let off = self.alloc_cluster(m)?;
                self.write_meta(m, off, &data, MetaKind::BitmapDirectory)?;
                *entry = off.0;
            }
        }
        let clusters = (n as u64 * 8).div_ceil(cs).max(1);
        let off = self.alloc_contiguous(m, clusters)?;
        // Only the entries: what follows them in the cluster is never read.
        self.write_meta(m, off, &encode_u64_table(&entries), MetaKind::BitmapDirectory)?;
        Ok((off.0, entries))
    }

    /// Schedules the release of a stored table and its data clusters.
    /// The data clusters' space goes back to the host (QEMU always
    /// discards them, so a cluster reused later reads as zeros past what
    /// is written into it, in its images as in ours).
    fn free_table_later(&self, m: &mut Meta, table: (u64, u32), entries: &[u64]) {
        let cs = self.g.cluster_size;
        for &t in entries {
            let off = t & TABLE_OFFSET_MASK;
            if off != 0 {
                self.free_later(m, HostOffset(off), true);
            }
        }
        let clusters = (u64::from(table.1) * 8).div_ceil(cs).max(1);
        for k in 0..clusters {
            self.free_later(m, HostOffset(table.0 + k * cs), false);
        }
    }

    /// Stores the bitmaps (see the module comment for the order) and
    /// clears their in-use flags; nothing to do when nothing changed.
    pub(crate) fn store_bitmaps(&self, m: &mut Meta, st: &mut TrackState) -> Result<()> {
        if !st.needs_store() {
            return Ok(());
        }
        if st.bitmaps.len() > MAX_BITMAPS as usize {
            return Err(Error::invalid("too many bitmaps"));
        }
        self.store_removals(m, st)?;
        if !st.bitmaps.iter().any(|b| !b.inconsistent) {
            // With no consistent bitmap left QEMU writes nothing more: the
            // directory on disk (inconsistent ones, if any) is final.
            st.dir_changed = false;
            st.in_use_on_disk = false;
            return Ok(());
        }
        // 1. New tables for every consistent bitmap, changed or not (as
        // QEMU, see the module comment); the old ones are freed after the
        // header switch.
        let mut old_tables = Vec::new();
        for b in st.bitmaps.iter_mut().filter(|b| !b.inconsistent) {
            let Some(bits) = b.bits.as_ref() else { continue };
            let (off, entries) = self.write_bitmap_data(m, bits)?;
            if let Some(t) = b.table.replace((off, entries.len() as u32)) {
                old_tables.push((t, std::mem::replace(&mut b.table_entries, entries)));
            } else {
                b.table_entries = entries;
            }
            b.changed = false;
        }
        let dir: Vec<BitmapDirEntry> = st
            .bitmaps
            .iter()
            .filter_map(|b| {
                let (table_offset, table_size) = b.table?;
                let in_use = if b.inconsistent { FLAG_IN_USE } else { 0 };
                Some(BitmapDirEntry {
                    table_offset,
                    table_size,
                    flags: b.other_flags | in_use | if b.enabled { FLAG_AUTO } else { 0 },
                    kind: b.kind,
                    granularity_bits: b.granularity_bits,
                    name: b.name.clone(),
                    extra: b.extra.clone(),
                })
            })
            .collect();
        let new_ext = self.write_directory(m, &dir)?;
        self.write_back_durable(m)?;
        // 2. The switch, and what the old directory alone referenced.
        self.switch_directory(m, new_ext)?;
        for (t, entries) in &old_tables {
            self.free_table_later(m, *t, entries);
        }
        st.dir_changed = false;
        st.in_use_on_disk = false;
        Ok(())
    }

    /// Takes removed bitmaps off the disk first, as QEMU does at the
    /// moment of removal: the directory on disk without them, the header
    /// switched to it, their clusters and the old directory freed, and
    /// the frees applied so that the store that follows reuses the space
    /// as QEMU's does.
    fn store_removals(&self, m: &mut Meta, st: &mut TrackState) -> Result<()> {
        if st.removed.is_empty() {
            return Ok(());
        }
        let gone: Vec<u64> = st.removed.iter().map(|((off, _), _)| *off).collect();
        let dir: Vec<BitmapDirEntry> = match Self::bitmaps_ext_valid(m) {
            Some(ext) => self.read_directory(&ext)?.into_iter().filter(|e| !gone.contains(&e.table_offset)).collect(),
            None => Vec::new(),
        };
        let new_ext = self.write_directory(m, &dir)?;
        self.write_back_durable(m)?;
        self.switch_directory(m, new_ext)?;
        for (t, entries) in std::mem::take(&mut st.removed) {
            self.free_table_later(m, t, &entries);
        }
        // Nothing on disk points at them any more (the header switch is
        // durable): the write-back applies the frees now.
        self.write_back_inner(m, true)?;
        Ok(())
    }

    /// Writes `dir` into new clusters (none for an empty directory) and
    /// returns the extension that names it.
    fn write_directory(&self, m: &mut Meta, dir: &[BitmapDirEntry]) -> Result<Option<BitmapsExt>> {
        if dir.is_empty() {
            return Ok(None);
        }
        let bytes = encode_directory(dir);
        if bytes.len() as u64 > MAX_BITMAP_DIRECTORY_BYTES {
            return Err(Error::invalid("bitmap directory would be too large"));
        }
        let clusters = (bytes.len() as u64).div_ceil(self.g.cluster_size);
        let off = self.alloc_contiguous(m, clusters)?;
        m.overlap.insert_range(off.cluster(&self.g), clusters, MetaKind::BitmapDirectory);
        self.write_meta(m, off, &bytes, MetaKind::BitmapDirectory)?;
        m.alloc.note_short_tail(off.add(bytes.len() as u64));
        Ok(Some(BitmapsExt {
            nb_bitmaps: dir.len() as u32,
            directory_size: bytes.len() as u64,
            directory_offset: off.0,
        }))
    }

    /// Points the header at `new_ext` durably and schedules the release
    /// of the directory it named before.
    fn switch_directory(&self, m: &mut Meta, new_ext: Option<BitmapsExt>) -> Result<()> {
        let cs = self.g.cluster_size;
        let old_ext = Self::bitmaps_ext_valid(m);
        m.hc.extensions.bitmaps = new_ext;
        if new_ext.is_some() {
            m.hc.header.autoclear_features |= Autoclear::BITMAPS;
        } else {
            m.hc.header.autoclear_features &= !Autoclear::BITMAPS;
        }
        self.write_header(m)?;
        self.sync("flushing header")?;
        if let Some(old) = old_ext {
            for k in 0..old.directory_size.div_ceil(cs) {
                self.free_later(m, HostOffset(old.directory_offset + k * cs), false);
            }
        }
        Ok(())
    }
}
