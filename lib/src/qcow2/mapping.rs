//! Guest-to-host mapping: the mapping part of the metadata state (the
//! active L1 table and the L2 cache), and the lookups through it.
//!
//! The L2 cache holds slices of tables, not whole tables (QEMU's
//! `l2-cache-entry-size`, 4 KiB by default when the cache cannot hold
//! every table): a lookup reads only the slice it needs, and the memory
//! a cache of N bytes costs is N bytes whatever the cluster size. A slice
//! is keyed by its own host offset (the table's plus its position in it),
//! so the cache, the write-back and the overlap check see it as a small
//! table. Code that needs a whole table (snapshots, check, amend, discard
//! of whole tables) assembles it with `l2_table` without filling the
//! cache, and changes it entry by entry with `set_l2_raw`.
//!
//! Invariant kept here: every change of an L1 entry widens the L1
//! table's dirty range, so the write-back cannot miss it.

use super::cache::TableCache;
use super::state::Meta;
use super::units::{GuestCluster, HostOffset};
use super::Qcow2;
use crate::format::l1::L1Entry;
use crate::format::l2::{ClusterKind, L2Entry};
use crate::{Error, Result};

/// The active L1 table and the cached L2 tables.
pub(crate) struct Mapping {
    /// The active L1 table.
    l1: Vec<u64>,
    /// Range of L1 indices changed since the table was last written.
    l1_dirty: Option<(usize, usize)>,
    /// Cached L2 slices.
    l2: TableCache,
    /// Bytes per cached slice (a power of two, at most a cluster).
    slice_bytes: usize,
    /// One buffer reused by every L2 slice read: a slice is checked
    /// (`note_free_refs`) before it is cached, and a fresh buffer per read
    /// churned the allocator.
    scratch: Vec<u8>,
}

impl Mapping {
    /// The state of an L1 table just read, with room for `l2_cap` slices
    /// of `slice_bytes` each.
    pub fn new(l1: Vec<u64>, l2_cap: usize, slice_bytes: usize) -> Self {
        Mapping { l1, l1_dirty: None, l2: TableCache::new(l2_cap), slice_bytes, scratch: Vec::new() }
    }
    /// The read buffer, `bytes` long, its content unspecified; give it
    /// back with `put_scratch`.
    pub fn take_scratch(&mut self, bytes: usize) -> Vec<u8> {
        let mut t = std::mem::take(&mut self.scratch);
        t.resize(bytes, 0);
        t
    }
    /// Returns the read buffer for the next read.
    pub fn put_scratch(&mut self, t: Vec<u8>) {
        self.scratch = t;
    }
    /// Bytes per cached slice.
    pub fn slice_bytes(&self) -> usize {
        self.slice_bytes
    }
    /// The raw L1 entries.
    pub fn l1(&self) -> &[u64] {
        &self.l1
    }
    /// Sets L1 entry `i`; it is owed to the disk.
    pub fn set_l1(&mut self, i: usize, raw: u64) {
        self.l1[i] = raw;
        self.l1_dirty = Some(match self.l1_dirty {
            Some((a, b)) => (a.min(i), b.max(i)),
            None => (i, i),
        });
    }
    /// Replaces the whole table, which is on disk already; returns the old.
    pub fn replace_l1(&mut self, l1: Vec<u64>) -> Vec<u64> {
        self.l1_dirty = None;
        std::mem::replace(&mut self.l1, l1)
    }
    /// Grows the table to `len` entries (the new ones unallocated).
    pub fn grow_l1(&mut self, len: usize) {
        self.l1.resize(len, 0);
    }
    /// The range of L1 entries owed to the disk, if any.
    pub fn l1_dirty(&self) -> Option<(usize, usize)> {
        self.l1_dirty
    }
    /// The whole L1 table reached disk.
    pub fn l1_written(&mut self) {
        self.l1_dirty = None;
    }
    /// The cached L2 slices.
    pub fn l2(&self) -> &TableCache {
        &self.l2
    }
    /// The cached L2 slices, for changes.
    pub fn l2_mut(&mut self) -> &mut TableCache {
        &mut self.l2
    }
}

impl Qcow2 {
    /// Refuses an L2 table offset no table can have.
    fn check_l2_offset(&self, off: HostOffset) -> Result<()> {
        if !off.is_aligned(&self.g) {
            return Err(Error::corrupt_at("L2 table offset is not cluster aligned", off.0));
        }
        if off.0 == 0 || off.0 >= crate::format::limits::MAX_HOST_OFFSET {
            return Err(Error::corrupt_at("L2 table offset is invalid", off.0));
        }
        Ok(())
    }

    /// The slice of the table at `table` holding entry `l2i`, and the
    /// entry's index within that slice.
    pub(crate) fn l2_slice_of(&self, m: &Meta, table: HostOffset, l2i: usize) -> (HostOffset, usize) {
        let per = m.map.slice_bytes() / self.g.l2.entry_size();
        (table.add(((l2i / per) * m.map.slice_bytes()) as u64), l2i % per)
    }

    /// Makes sure the slice at `slice` (of the table at `table`) is
    /// cached, evicting if needed.
    fn load_l2_slice(&self, m: &mut Meta, table: HostOffset, slice: HostOffset) -> Result<()> {
        if m.map.l2().contains(slice) {
            return Ok(());
        }
        self.check_l2_offset(table)?;
        self.make_room_l2(m)?;
        // Read through one reused buffer and copied into the cache's own
        // memory: no allocation per slice (see `cache.rs`).
        let mut t = m.map.take_scratch(m.map.slice_bytes());
        self.file.debug_event(crate::storage::BlkdebugEvent::L2Load);
        self.file.read_at(&mut t, slice.0).map_err(|e| Error::io("reading L2 table", e))?;
        self.note_free_refs(m, &t)?;
        m.map.l2_mut().insert(slice, &t, false);
        m.map.put_scratch(t);
        Ok(())
    }

    /// The whole L2 table at `off`: cached slices as they are in memory
    /// (possibly newer than the disk), the rest read from disk. The cache
    /// is left as it was, so a walk over every table does not flush it.
    pub(crate) fn l2_table(&self, m: &mut Meta, off: HostOffset) -> Result<Vec<u8>> {
        self.check_l2_offset(off)?;
        let sb = m.map.slice_bytes();
        let mut t = vec![0u8; self.g.cluster_size as usize];
        for (k, chunk) in t.chunks_exact_mut(sb).enumerate() {
            if let Some(s) = m.map.l2().peek(off.add((k * sb) as u64)) {
                chunk.copy_from_slice(s);
            }
        }
        // Uncached runs are read one request each.
        let mut k = 0;
        let n = t.len() / sb;
        while k < n {
            if m.map.l2().contains(off.add((k * sb) as u64)) {
                k += 1;
                continue;
            }
            let mut e = k;
            while e < n && !m.map.l2().contains(off.add((e * sb) as u64)) {
                e += 1;
            }
            let part = &mut t[k * sb..e * sb];
            self.file.read_at(part, off.0 + (k * sb) as u64).map_err(|e| Error::io("reading L2 table", e))?;
            self.note_free_refs(m, part)?;
            k = e;
        }
        Ok(t)
    }

    /// Sets raw entry `i` of the L2 table at `off`, in place (callers
    /// decide that the table may be changed in place).
    pub(crate) fn set_l2_raw(&self, m: &mut Meta, off: HostOffset, i: usize, e: L2Entry) -> Result<()> {
        let (slice, j) = self.l2_slice_of(m, off, i);
        self.load_l2_slice(m, off, slice)?;
        let es = self.g.l2.entry_size();
        let t = m
            .map
            .l2_mut()
            .get_mut_range(slice, j * es, (j + 1) * es)
            .ok_or_else(|| Error::corrupt("L2 table vanished from cache"))?;
        self.g.l2.set(t, j, e);
        Ok(())
    }

    /// Puts a whole new table's content into the cache at `off`, all of
    /// it owed to the disk (a table just allocated: nothing points at it
    /// yet, so an eviction may write any part of it early).
    pub(crate) fn insert_l2_table(&self, m: &mut Meta, off: HostOffset, content: &[u8]) -> Result<()> {
        let sb = m.map.slice_bytes();
        for (k, chunk) in content.chunks_exact(sb).enumerate() {
            self.make_room_l2(m)?;
            m.map.l2_mut().insert(off.add((k * sb) as u64), chunk, true);
        }
        Ok(())
    }

    /// Evicts an L2 slice not used lately when the cache is full. A dirty
    /// one is written with the full flush ordering first (refcounts
    /// before the L2 entries that need them).
    pub(crate) fn make_room_l2(&self, m: &mut Meta) -> Result<()> {
        if !m.map.l2().is_full() {
            return Ok(());
        }
        if let Some((off, dirty)) = m.map.l2_mut().victim() {
            if dirty {
                self.write_back(m)?;
            }
            m.map.l2_mut().remove(off);
        }
        Ok(())
    }

    /// The L2 entry of guest cluster `gc` if the lookup needs no table
    /// read (its slice is cached, or it has no table): a lookup that runs
    /// under the shared metadata lock. `None`: the slice must be loaded.
    pub(crate) fn cached_l2_entry(&self, m: &Meta, gc: GuestCluster) -> Option<L2Entry> {
        let (l1i, l2i) = gc.split(&self.g);
        let Some(&raw) = m.map.l1().get(l1i) else {
            return Some(L2Entry::default());
        };
        let off = L1Entry(raw).l2_offset();
        if off == 0 {
            return Some(L2Entry::default());
        }
        let (slice, j) = self.l2_slice_of(m, HostOffset(off), l2i);
        m.map.l2().get(slice).map(|t| self.g.l2.get(t, j))
    }

    /// The L2 entry of guest cluster `gc` (all-zero when unallocated).
    pub(crate) fn l2_entry(&self, m: &mut Meta, gc: GuestCluster) -> Result<L2Entry> {
        // One lookup on the hot path (a cached slice); load only on a miss.
        if let Some(e) = self.cached_l2_entry(m, gc) {
            return Ok(e);
        }
        let (l1i, l2i) = gc.split(&self.g);
        let off = HostOffset(m.map.l1().get(l1i).map_or(0, |&raw| L1Entry(raw).l2_offset()));
        let (slice, j) = self.l2_slice_of(m, off, l2i);
        self.load_l2_slice(m, off, slice)?;
        let t = m.map.l2().get(slice).ok_or_else(|| Error::corrupt("L2 table vanished from cache"))?;
        Ok(self.g.l2.get(t, j))
    }

    /// Whether an extended entry's subcluster bitmap can mean anything, by
    /// the spec's rules (QEMU refuses the same entries): a compressed
    /// cluster has no bitmap, a subcluster is never both allocated and
    /// zero, and without a host cluster nothing is allocated.
    pub(crate) fn subcluster_bits_valid(&self, e: L2Entry) -> bool {
        let (alloc, zero) = (e.bitmap.alloc(), e.bitmap.zero());
        if e.is_compressed() {
            return e.bitmap.0 == 0;
        }
        let has_host = e.host_offset() != 0 || (self.g.external_data && e.word & crate::format::l2::COPIED != 0);
        if has_host {
            alloc & zero == 0
        } else {
            alloc == 0
        }
    }

    /// How subcluster `sub` of an entry reads, validating host offsets.
    pub(crate) fn classify(&self, e: L2Entry, sub: u32, gc: GuestCluster) -> Result<ClusterKind> {
        if self.g.extended && !self.subcluster_bits_valid(e) {
            return Err(Error::corrupt(format!(
                "invalid cluster entry for guest cluster {gc} (subcluster bitmap {:#018x})",
                e.bitmap.0
            )));
        }
        let k = self.g.l2.classify(e, sub, self.g.v3);
        match k {
            ClusterKind::Normal(host) | ClusterKind::Zero(Some(host)) => {
                if host % self.g.cluster_size != 0 {
                    return Err(Error::corrupt(format!(
                        "cluster allocation offset {host:#x} unaligned (guest cluster {gc})"
                    )));
                }
                if self.g.external_data {
                    if host != gc.offset(&self.g).0 {
                        return Err(Error::corrupt(format!(
                            "external data file offset {host:#x} does not match guest offset of cluster {gc}"
                        )));
                    }
                } else if host == 0 {
                    return Err(Error::corrupt(format!("guest cluster {gc} points at the image header")));
                }
            }
            ClusterKind::Compressed(_) if self.g.external_data => {
                return Err(Error::corrupt("compressed cluster in an image with an external data file"));
            }
            _ => {}
        }
        Ok(k)
    }
}
