//! Guest-to-host mapping: the mapping part of the metadata state (the
//! active L1 table and the L2 table cache), and the lookups through it.
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
    /// Cached L2 tables.
    l2: TableCache,
}

impl Mapping {
    /// The state of an L1 table just read, with room for `l2_cap` tables.
    pub fn new(l1: Vec<u64>, l2_cap: usize) -> Self {
        Mapping { l1, l1_dirty: None, l2: TableCache::new(l2_cap) }
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
    /// The cached L2 tables.
    pub fn l2(&self) -> &TableCache {
        &self.l2
    }
    /// The cached L2 tables, for changes.
    pub fn l2_mut(&mut self) -> &mut TableCache {
        &mut self.l2
    }
}

impl Qcow2 {
    /// Makes sure the L2 table at `off` is cached, evicting if needed.
    pub(crate) fn load_l2(&self, m: &mut Meta, off: HostOffset) -> Result<()> {
        if m.map.l2().contains(off) {
            return Ok(());
        }
        if !off.is_aligned(&self.g) {
            return Err(Error::corrupt_at("L2 table offset is not cluster aligned", off.0));
        }
        if off.0 == 0 || off.0 >= crate::format::limits::MAX_HOST_OFFSET {
            return Err(Error::corrupt_at("L2 table offset is invalid", off.0));
        }
        // Reuse the evicted table's buffer: no allocator churn, so memory
        // stays at the cache size however many tables pass through.
        let mut t = self.make_room_l2(m)?.unwrap_or_default();
        t.resize(self.g.cluster_size as usize, 0);
        self.file.debug_event(crate::storage::BlkdebugEvent::L2Load);
        self.file.read_at(&mut t, off.0).map_err(|e| Error::io("reading L2 table", e))?;
        self.note_free_refs(m, &t)?;
        m.map.l2_mut().insert(off, t, false);
        Ok(())
    }

    /// Evicts an L2 table not used lately when the cache is full,
    /// returning its buffer. A dirty one is written with the full flush
    /// ordering first (refcounts before the L2 entries that need them).
    pub(crate) fn make_room_l2(&self, m: &mut Meta) -> Result<Option<Vec<u8>>> {
        if !m.map.l2().is_full() {
            return Ok(None);
        }
        if let Some((off, dirty)) = m.map.l2_mut().victim() {
            if dirty {
                self.write_back(m)?;
            }
            return Ok(m.map.l2_mut().remove(off));
        }
        Ok(None)
    }

    /// The L2 entry of guest cluster `gc` if the lookup needs no table
    /// read (its table is cached, or it has none): a lookup that runs
    /// under the shared metadata lock. `None`: the table must be loaded.
    pub(crate) fn cached_l2_entry(&self, m: &Meta, gc: GuestCluster) -> Option<L2Entry> {
        let (l1i, l2i) = gc.split(&self.g);
        let Some(&raw) = m.map.l1().get(l1i) else {
            return Some(L2Entry::default());
        };
        let off = L1Entry(raw).l2_offset();
        if off == 0 {
            return Some(L2Entry::default());
        }
        m.map.l2().get(HostOffset(off)).map(|t| self.g.l2.get(t, l2i))
    }

    /// The L2 entry of guest cluster `gc` (all-zero when unallocated).
    pub(crate) fn l2_entry(&self, m: &mut Meta, gc: GuestCluster) -> Result<L2Entry> {
        // One lookup on the hot path (a cached table); load only on a miss.
        if let Some(e) = self.cached_l2_entry(m, gc) {
            return Ok(e);
        }
        let (l1i, l2i) = gc.split(&self.g);
        let off = HostOffset(m.map.l1().get(l1i).map_or(0, |&raw| L1Entry(raw).l2_offset()));
        self.load_l2(m, off)?;
        let t = m.map.l2().get(off).ok_or_else(|| Error::corrupt("L2 table vanished from cache"))?;
        Ok(self.g.l2.get(t, l2i))
    }

    /// How subcluster `sub` of an entry reads, validating host offsets.
    pub(crate) fn classify(&self, e: L2Entry, sub: u32, gc: GuestCluster) -> Result<ClusterKind> {
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
