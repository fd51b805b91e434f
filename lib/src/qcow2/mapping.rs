//! Guest-to-host mapping: L1 lookups and the L2 table cache.

use super::state::Meta;
use super::Qcow2;
use crate::format::l1::L1Entry;
use crate::format::l2::{ClusterKind, L2Entry};
use crate::{Error, Result};

impl Qcow2 {
    /// Makes sure the L2 table at `off` is cached, evicting if needed.
    pub(crate) fn load_l2(&self, m: &mut Meta, off: u64) -> Result<()> {
        if m.l2.contains(off) {
            return Ok(());
        }
        if !off.is_multiple_of(self.g.cluster_size) {
            return Err(Error::corrupt_at("L2 table offset is not cluster aligned", off));
        }
        if off == 0 || off >= crate::format::limits::MAX_HOST_OFFSET {
            return Err(Error::corrupt_at("L2 table offset is invalid", off));
        }
        // Reuse the evicted table's buffer: no allocator churn, so memory
        // stays at the cache size however many tables pass through.
        let mut t = self.make_room_l2(m)?.unwrap_or_default();
        t.resize(self.g.cluster_size as usize, 0);
        self.file.read_at(&mut t, off).map_err(|e| Error::io("reading L2 table", e))?;
        self.note_free_refs(m, &t)?;
        m.l2.insert(off, t, false);
        Ok(())
    }

    /// Evicts the least recently used L2 table when the cache is full,
    /// returning its buffer. A dirty one is written with the full flush
    /// ordering first (refcounts before the L2 entries that need them).
    pub(crate) fn make_room_l2(&self, m: &mut Meta) -> Result<Option<Vec<u8>>> {
        if !m.l2.is_full() {
            return Ok(None);
        }
        if let Some((off, dirty)) = m.l2.lru() {
            if dirty {
                self.write_back(m)?;
            }
            return Ok(m.l2.remove(off));
        }
        Ok(None)
    }

    /// L1 index and L2 index of guest cluster `gc`.
    pub(crate) fn split(&self, gc: u64) -> (usize, usize) {
        ((gc / self.g.l2_entries) as usize, (gc % self.g.l2_entries) as usize)
    }

    /// The L2 entry of guest cluster `gc` (all-zero when unallocated).
    pub(crate) fn l2_entry(&self, m: &mut Meta, gc: u64) -> Result<L2Entry> {
        let (l1i, l2i) = self.split(gc);
        let Some(&raw) = m.l1.get(l1i) else {
            return Ok(L2Entry::default());
        };
        let off = L1Entry(raw).l2_offset();
        if off == 0 {
            return Ok(L2Entry::default());
        }
        // One lookup on the hot path (a cached table); load only on a miss.
        if let Some(t) = m.l2.get(off) {
            return Ok(self.g.l2.get(t, l2i));
        }
        self.load_l2(m, off)?;
        let t = m.l2.get(off).ok_or_else(|| Error::corrupt("L2 table vanished from cache"))?;
        Ok(self.g.l2.get(t, l2i))
    }

    /// How subcluster `sub` of an entry reads, validating host offsets.
    pub(crate) fn classify(&self, e: L2Entry, sub: u32, gc: u64) -> Result<ClusterKind> {
        let k = self.g.l2.classify(e, sub, self.g.v3);
        match k {
            ClusterKind::Normal(host) | ClusterKind::Zero(Some(host)) => {
                if host % self.g.cluster_size != 0 {
                    return Err(Error::corrupt(format!(
                        "cluster allocation offset {host:#x} unaligned (guest cluster {gc})"
                    )));
                }
                if self.g.external_data {
                    if host != gc * self.g.cluster_size {
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
