//! The metadata overlap check, as QEMU's default `overlap-check=cached`:
//! a map of the host clusters known, from what is in memory, to hold
//! metadata (header, active L1 and L2 tables, refcount table and blocks,
//! snapshot table, snapshot L1 tables, bitmap directory), with what each
//! holds.
//!
//! Every metadata write (`write_meta`, the header) and every guest data
//! write is checked against the map before it goes out: landing on
//! metadata of another kind marks the image corrupt and is refused. The
//! allocator never hands out a cluster the map knows, whatever its
//! refcount says, so a damaged refcount (a refcount block overlapping the
//! L1 table, a table whose refcount is too low) cannot make a table and
//! guest data share a cluster. A cluster may carry several kinds: on a
//! healthy image none does; on a damaged one that is the overlap to refuse.
//!
//! Single clusters (header, L2 tables, refcount blocks, clusters added one
//! by one) live in a hash map; multi-cluster tables are extents, because a
//! hostile snapshot table can name 65536 L1 tables of 32 MiB each, which
//! must cost 65536 entries, not billions.

use super::state::{Geometry, Meta};
use super::units::{HostCluster, HostOffset};
use super::Qcow2;
use crate::format::l1::OFFSET_MASK as L1_OFFSET_MASK;
use crate::format::l2::{ClusterKind, L2Entry, COMPRESSED as L2_COMPRESSED, OFFSET_MASK as L2_OFFSET_MASK};
use crate::format::refcount::REFTABLE_OFFSET_MASK;
use crate::{Error, Result};
use std::collections::{BTreeSet, HashMap};

/// What a metadata cluster holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MetaKind {
    Header,
    ActiveL1,
    RefcountTable,
    RefcountBlock,
    ActiveL2,
    SnapshotTable,
    SnapshotL1,
    BitmapDirectory,
}

const ALL_KINDS: [MetaKind; 8] = [
    MetaKind::Header,
    MetaKind::ActiveL1,
    MetaKind::ActiveL2,
    MetaKind::RefcountTable,
    MetaKind::RefcountBlock,
    MetaKind::SnapshotTable,
    MetaKind::SnapshotL1,
    MetaKind::BitmapDirectory,
];

impl MetaKind {
    fn bit(self) -> u8 {
        1 << self as u8
    }
    /// QEMU's name for the structure (its overlap messages use them).
    pub fn name(self) -> &'static str {
        match self {
            MetaKind::Header => "qcow2_header",
            MetaKind::ActiveL1 => "active L1 table",
            MetaKind::RefcountTable => "refcount table",
            MetaKind::RefcountBlock => "refcount block",
            MetaKind::ActiveL2 => "active L2 table",
            MetaKind::SnapshotTable => "snapshot table",
            MetaKind::SnapshotL1 => "inactive L1 table",
            MetaKind::BitmapDirectory => "bitmap directory",
        }
    }
    /// The blkdebug event QEMU's qcow2 driver emits before writing
    /// metadata of this kind.
    pub fn debug_event(self) -> Option<crate::storage::BlkdebugEvent> {
        use crate::storage::BlkdebugEvent as E;
        match self {
            MetaKind::ActiveL1 => Some(E::L1Update),
            MetaKind::ActiveL2 => Some(E::L2Update),
            MetaKind::RefcountBlock => Some(E::RefblockUpdatePart),
            MetaKind::RefcountTable => Some(E::ReftableUpdate),
            _ => None,
        }
    }
    /// The context of an I/O error while writing it.
    pub fn writing(self) -> &'static str {
        match self {
            MetaKind::Header => "writing image header",
            MetaKind::ActiveL1 => "writing L1 table",
            MetaKind::RefcountTable => "writing refcount table",
            MetaKind::RefcountBlock => "writing refcount block",
            MetaKind::ActiveL2 => "writing L2 table",
            MetaKind::SnapshotTable => "writing snapshot table",
            MetaKind::SnapshotL1 => "writing snapshot L1 table",
            MetaKind::BitmapDirectory => "writing bitmap directory",
        }
    }
}

/// Names of the kinds in `bits`, for messages.
fn names(bits: u8) -> String {
    ALL_KINDS.iter().filter(|k| bits & k.bit() != 0).map(|k| k.name()).collect::<Vec<_>>().join(", ")
}

#[derive(Debug, Clone, Copy)]
struct Extent {
    /// First cluster index.
    start: u64,
    /// One past the last cluster index.
    end: u64,
    kind: MetaKind,
    /// Largest `end` of this extent and every one sorted before it: a
    /// lookup walks back only while an earlier extent may still reach.
    reach: u64,
}

/// The clusters holding metadata, with their kinds.
#[derive(Default)]
pub(crate) struct OverlapMap {
    clusters: HashMap<u64, u8, foldhash::fast::RandomState>,
    extents: Vec<Extent>,
    /// One past the highest cluster ever mapped (never lowered: the
    /// truncation at close must not cut off anything that was metadata).
    end: u64,
    /// Clusters a loaded L2 table points at although the allocator
    /// considers them free (refcount 0, or at or past the allocation end:
    /// a damaged or truncated image). Not metadata, but the allocator must
    /// not hand them out, or the guest cluster mapped there and a newly
    /// allocated one would share them.
    taken: BTreeSet<u64>,
}

/// Most such clusters tolerated before the image is declared corrupt
/// (bounds the memory they cost).
const MAX_TAKEN: usize = 1 << 16;

impl OverlapMap {
    /// Marks cluster `c` as holding `kind`.
    pub fn insert(&mut self, c: HostCluster, kind: MetaKind) {
        self.insert_raw(c.0, kind);
    }

    fn insert_raw(&mut self, idx: u64, kind: MetaKind) {
        *self.clusters.entry(idx).or_insert(0) |= kind.bit();
        self.end = self.end.max(idx.saturating_add(1));
    }

    /// Marks `count` clusters from `first` as holding `kind`.
    pub fn insert_range(&mut self, first: HostCluster, count: u64, kind: MetaKind) {
        if count == 0 {
            return;
        }
        if count == 1 && kind != MetaKind::SnapshotL1 {
            self.insert(first, kind);
        } else {
            self.push_extent(first.0, count, kind);
            self.reindex();
        }
    }

    fn push_extent(&mut self, first: u64, count: u64, kind: MetaKind) {
        let end = first.saturating_add(count);
        self.extents.push(Extent { start: first, end, kind, reach: 0 });
        self.end = self.end.max(end);
    }

    fn reindex(&mut self) {
        self.extents.sort_unstable_by_key(|e| e.start);
        let mut reach = 0;
        for e in &mut self.extents {
            reach = reach.max(e.end);
            e.reach = reach;
        }
    }

    /// Forgets what cluster `c` held (its refcount dropped to zero).
    pub fn remove(&mut self, c: HostCluster) {
        let idx = c.0;
        self.clusters.remove(&idx);
        if self.extent_bits(idx) == 0 {
            return;
        }
        let old = std::mem::take(&mut self.extents);
        for e in old {
            if e.start <= idx && idx < e.end {
                if e.start < idx {
                    self.extents.push(Extent { end: idx, ..e });
                }
                if idx + 1 < e.end {
                    self.extents.push(Extent { start: idx + 1, ..e });
                }
            } else {
                self.extents.push(e);
            }
        }
        self.reindex();
    }

    fn extent_bits(&self, idx: u64) -> u8 {
        let mut bits = 0;
        let mut i = self.extents.partition_point(|e| e.start <= idx);
        while i > 0 {
            let e = &self.extents[i - 1];
            if e.reach <= idx {
                break;
            }
            if e.end > idx {
                bits |= e.kind.bit();
            }
            i -= 1;
        }
        bits
    }

    /// The kinds cluster `idx` holds, as bits.
    fn kinds(&self, idx: u64) -> u8 {
        self.clusters.get(&idx).copied().unwrap_or(0) | self.extent_bits(idx)
    }

    /// Whether the allocator must leave cluster `c` alone: it holds
    /// metadata, or a table points at it from past the allocation end.
    pub fn contains(&self, c: HostCluster) -> bool {
        self.kinds(c.0) != 0 || self.taken.contains(&c.0)
    }

    /// Forgets the clusters noted by `note_free_refs`: refcounts were
    /// repaired, what they said is stale.
    pub fn forget_taken(&mut self) {
        self.taken.clear();
    }

    /// One past the highest cluster that ever held metadata.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// The first cluster of `[first, end)` holding a kind other than
    /// `allowed` (guest data allows none), with the kinds it holds.
    fn conflict(&self, first: u64, end: u64, allowed: Option<MetaKind>) -> Option<(u64, u8)> {
        let allowed = allowed.map_or(0, MetaKind::bit);
        (first..end).map(|c| (c, self.kinds(c) & !allowed)).find(|&(_, bits)| bits != 0)
    }

    /// `conflict`, with the kinds named.
    pub fn conflict_names(&self, first: u64, end: u64, allowed: Option<MetaKind>) -> Option<(u64, String)> {
        self.conflict(first, end, allowed).map(|(c, bits)| (c, names(bits)))
    }

    /// Whether another snapshot L1 table shares a cluster with `[first,
    /// end)`, which is itself one: kinds alone cannot tell two apart, so
    /// snapshot L1 tables are always extents, and they are counted.
    fn other_snapshot_l1(&self, first: u64, end: u64) -> bool {
        let sharing = self
            .extents
            .iter()
            .filter(|e| e.kind == MetaKind::SnapshotL1 && e.start < end && first < e.end)
            .take(2)
            .count();
        sharing > 1
    }

    /// The map of an image as `m` describes it.
    pub fn build(g: &Geometry, m: &Meta) -> OverlapMap {
        let cs = g.cluster_size;
        let mut map = OverlapMap::default();
        let add = |map: &mut OverlapMap, off: u64, bytes: u64, kind: MetaKind| {
            if bytes == 0 {
                return;
            }
            let first = off / cs;
            let end = off.saturating_add(bytes).div_ceil(cs);
            if end - first == 1 && kind != MetaKind::SnapshotL1 {
                map.insert_raw(first, kind);
            } else {
                map.push_extent(first, end - first, kind);
            }
        };
        map.insert_raw(0, MetaKind::Header);
        let h = &m.hc.header;
        add(&mut map, h.l1_table_offset, u64::from(h.l1_size) * 8, MetaKind::ActiveL1);
        add(&mut map, h.refcount_table_offset, u64::from(h.refcount_table_clusters) * cs, MetaKind::RefcountTable);
        if h.nb_snapshots > 0 {
            add(&mut map, h.snapshots_offset, snapshot_table_bytes(g, m), MetaKind::SnapshotTable);
            for s in &m.snapshots {
                add(&mut map, s.l1_table_offset, u64::from(s.l1_size) * 8, MetaKind::SnapshotL1);
            }
        }
        if let Some(b) = m.hc.extensions.bitmaps {
            if b.nb_bitmaps > 0 {
                add(&mut map, b.directory_offset, b.directory_size, MetaKind::BitmapDirectory);
            }
        }
        for &e in m.refs.table() {
            let off = e & REFTABLE_OFFSET_MASK;
            if off != 0 {
                map.insert_raw(off / cs, MetaKind::RefcountBlock);
            }
        }
        for &e in m.map.l1() {
            let off = e & L1_OFFSET_MASK;
            if off != 0 {
                map.insert_raw(off / cs, MetaKind::ActiveL2);
            }
        }
        // What loaded tables were found to point at stays true when the
        // map is rebuilt after a whole-image operation.
        map.taken = m.overlap.taken.clone();
        map.reindex();
        map
    }
}

/// Bytes the snapshot table occupies on disk: per entry, what it encodes
/// to or, when read from the file, what it took there if more (extra data
/// a repair cuts to 1 KiB still lies on disk until the table is written).
pub(crate) fn snapshot_table_bytes(g: &Geometry, m: &Meta) -> u64 {
    m.snapshots.iter().map(|s| (s.encode(g.v3).len() as u64).max(super::snapshot::entry_disk_len(s))).sum()
}

impl Qcow2 {
    /// Refuses to write guest data (`kind == None`) or metadata of `kind`
    /// into the cluster at `host` when it holds other metadata, and marks
    /// the image corrupt when that happens.
    pub(crate) fn check_overlap(&self, m: &mut Meta, host: HostOffset, kind: Option<MetaKind>) -> Result<()> {
        self.check_overlap_range(m, host, 1, kind)
    }

    /// `check_overlap` for every cluster `[off, off + len)` touches.
    pub(crate) fn check_overlap_range(
        &self,
        m: &mut Meta,
        off: HostOffset,
        len: u64,
        kind: Option<MetaKind>,
    ) -> Result<()> {
        let off = off.0;
        if self.g.external_data && kind.is_none() {
            return Ok(());
        }
        let cs = self.g.cluster_size;
        let first = off / cs;
        let end = off.saturating_add(len.max(1)).div_ceil(cs);
        match m.overlap.conflict(first, end, kind) {
            None => Ok(()),
            Some((c, bits)) => Err(self.mark_corrupt(
                m,
                format!(
                    "Preventing invalid write on metadata (overlaps with {}) at host offset {:#x}",
                    names(bits),
                    (c * cs).max(off)
                ),
            )),
        }
    }

    /// Notes the clusters the L2 table just read points at although the
    /// allocator considers them free (refcount 0, or at or past the
    /// allocation end), so the allocator steps over them: otherwise the
    /// next allocation hands such a cluster to a second guest cluster (QEMU
    /// does), and a write through the old entry overwrites the new data. A
    /// write through such an entry is refused (`check_mapped_cluster`).
    /// Writable images only. The table is in memory and refcounts are read
    /// one refcount block per run of entries, so this costs a fraction of
    /// reading the table.
    pub(crate) fn note_free_refs(&self, m: &mut Meta, table: &[u8]) -> Result<()> {
        if self.read_only || self.g.external_data {
            return Ok(());
        }
        let cs = self.g.cluster_size;
        let bits = self.g.rc.block_entries_bits();
        let mut inside = Vec::new();
        // Below the allocator's free-space hint, a cluster with refcount 0
        // was freed in this session, after every entry pointing at it was
        // gone from disk: only clusters from the hint up can be handed out
        // by mistake. Past the first allocation, on a full image, that
        // leaves a comparison per entry.
        let floor = m.alloc.free_hint().0.max(1).saturating_mul(cs);
        let file_end = m.alloc.file_end().0;
        // The first word of each entry: `L2Entry::host_offset` on the raw
        // words, without building entries.
        let mut note = |m: &mut Meta, host: u64| {
            if host >= file_end {
                m.overlap.taken.insert(host / cs);
            } else if host >= floor {
                inside.push(host / cs);
            }
        };
        for e in table.chunks_exact(self.g.l2.entry_size()) {
            let word = u64::from_be_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
            if word & L2_COMPRESSED == 0 {
                note(m, word & L2_OFFSET_MASK);
            } else if let ClusterKind::Compressed(d) =
                self.g.l2.classify(L2Entry { word, bitmap: Default::default() }, 0, self.g.v3)
            {
                // Every cluster the compressed bytes touch (one or two).
                let last = (d.offset + d.byte_len().max(1) - 1) / cs;
                for c in (d.offset / cs..=last).take(4) {
                    note(m, c * cs);
                }
            }
        }
        let mut i = 0;
        while i < inside.len() {
            let t = inside[i] >> bits;
            let run = inside[i..].iter().take_while(|&&c| c >> bits == t).count();
            let block = m.refs.block_offset(t as usize).unwrap_or_default().0;
            // Loads the block; one that cannot be read (a damaged refcount
            // table) is left for the allocator and check to report.
            let readable = block != 0 && self.refcount(m, HostCluster(inside[i])).is_ok();
            let mask = (1u64 << bits) - 1;
            let taken = &mut m.overlap.taken;
            match m.refs.blocks().peek(HostOffset(block)) {
                Some(b) if readable && self.g.rc.bits() == 16 => {
                    // The default width, read directly.
                    let zero = |c: u64| {
                        let at = (c & mask) as usize * 2;
                        b.get(at..at + 2).is_some_and(|r| r == [0, 0])
                    };
                    taken.extend(inside[i..i + run].iter().copied().filter(|&c| zero(c)));
                }
                Some(b) if readable => {
                    let rc = self.g.rc;
                    taken.extend(inside[i..i + run].iter().copied().filter(|&c| rc.get(b, (c & mask) as usize) == 0));
                }
                _ if block == 0 => taken.extend(inside[i..i + run].iter().copied()),
                _ => {}
            }
            i += run;
        }
        if m.overlap.taken.len() > MAX_TAKEN {
            return Err(self.mark_corrupt(
                m,
                format!("more than {MAX_TAKEN} guest clusters are mapped to clusters whose refcount is 0"),
            ));
        }
        Ok(())
    }

    /// Checks the refcount block at `off` before a refcount in it changes
    /// (so before an allocation trusts what it says): it must be no other
    /// metadata, and lie inside the allocated area. A block past the end
    /// of the file reads as zeros, calling every cluster it covers free.
    pub(crate) fn check_refblock(&self, m: &mut Meta, off: HostOffset) -> Result<()> {
        self.check_overlap(m, off, Some(MetaKind::RefcountBlock))?;
        let off = off.0;
        if off >= m.alloc.file_end().0 {
            return Err(
                self.mark_corrupt(m, format!("refcount block at host offset {off:#x} lies past the end of the file"))
            );
        }
        Ok(())
    }

    /// Checks the host clusters a guest cluster maps to before a request
    /// uses them (a write in place, or copy-on-write, zeroing or discard,
    /// which release them). They must hold no metadata: releasing one would
    /// free a table's cluster for reuse. And their refcount must not be 0:
    /// such a cluster is free as far as the allocator knows, the next
    /// allocation could hand it out, and a write into it (past the end of
    /// the file, say) would be lost at the next truncation. Either is
    /// corruption, refused with the corrupt bit set. A referenced cluster
    /// past the allocator's end is kept by the truncation at close.
    pub(crate) fn check_mapped_entry(&self, m: &mut Meta, e: L2Entry) -> Result<()> {
        if self.g.extended && !self.subcluster_bits_valid(e) {
            let bits = e.bitmap.0;
            return Err(self.mark_corrupt(m, format!("invalid cluster entry (subcluster bitmap {bits:#018x})")));
        }
        if self.g.external_data {
            return Ok(());
        }
        if let ClusterKind::Compressed(d) = self.g.l2.classify(e, 0, self.g.v3) {
            // Copy-on-write releases the clusters the old data touches: one
            // whose refcount is already 0 may be the cluster just allocated
            // for the new data (a descriptor pointing into free space).
            let cs = self.g.cluster_size;
            let first = d.offset / cs;
            let last = (d.offset + d.byte_len().max(1) - 1) / cs;
            for c in first..=last {
                self.check_overlap(m, HostCluster(c).offset(&self.g), None)?;
                if self.refcount(m, HostCluster(c))? == 0 {
                    return Err(self.mark_corrupt(
                        m,
                        format!("compressed guest data at host offset {:#x} has refcount 0", d.offset),
                    ));
                }
            }
            return Ok(());
        }
        self.check_mapped_cluster(m, e.host_offset())
    }

    /// Whether `check_mapped_cluster` would pass for the data cluster at
    /// `host` without changing anything, as far as the shared lock lets
    /// it see: false sends the caller to the exclusive path, which does
    /// the full check (and reports what is wrong).
    pub(crate) fn mapped_cluster_ok(&self, m: &Meta, host: u64) -> bool {
        if self.g.external_data || host == 0 {
            return true;
        }
        let first = host / self.g.cluster_size;
        m.overlap.conflict(first, first + 1, None).is_none()
            && self.cached_refcount(m, HostOffset(host).cluster(&self.g)).is_some_and(|rc| rc != 0)
            && m.alloc.keep_end().0 >= host + self.g.cluster_size
    }

    fn check_mapped_cluster(&self, m: &mut Meta, host: u64) -> Result<()> {
        if host == 0 {
            return Ok(());
        }
        // Guest data on metadata: writing it in place would overwrite the
        // table, and copy-on-write would free the table's cluster.
        self.check_overlap(m, HostOffset(host), None)?;
        let cs = self.g.cluster_size;
        if self.refcount(m, HostOffset(host).cluster(&self.g))? == 0 {
            return Err(self.mark_corrupt(
                m,
                format!("guest data at host offset {host:#x} has refcount 0 (refcount too low, or past the end of the file)"),
            ));
        }
        m.alloc.keep(HostOffset(host + cs));
        Ok(())
    }

    /// Refuses to use snapshot `sn`'s L1 table when it lies where no L1
    /// table can be: unaligned, past the end of the file, or on other
    /// metadata (another snapshot's L1 table included).
    pub(crate) fn check_snapshot_l1_place(&self, m: &Meta, sn: &crate::format::SnapshotEntry) -> Result<()> {
        let cs = self.g.cluster_size;
        let off = sn.l1_table_offset;
        // QEMU's checks and words (its errno: EFBIG, then EINVAL).
        if u64::from(sn.l1_size) * 8 > crate::format::limits::MAX_L1_BYTES {
            return Err(Error::field("snapshot l1_size", sn.l1_size.into(), "Snapshot L1 table too large"));
        }
        if sn.l1_size == 0 {
            return Ok(());
        }
        let bad = |why: String| {
            Error::corrupt(format!("snapshot '{}' (ID {}): L1 table at offset {off:#x} {why}", sn.name, sn.id))
        };
        if !off.is_multiple_of(cs) {
            return Err(Error::field("snapshot l1_table_offset", off, "Snapshot L1 table offset invalid"));
        }
        let bytes = u64::from(sn.l1_size) * 8;
        let file_len = self.file.len().map_err(|e| Error::io("reading image size", e))?;
        if off.checked_add(bytes).is_none_or(|end| end > file_len) {
            return Err(bad("lies past the end of the file".into()));
        }
        let (first, end) = (off / cs, (off + bytes).div_ceil(cs));
        if let Some((c, bits)) = m.overlap.conflict(first, end, Some(MetaKind::SnapshotL1)) {
            return Err(bad(format!("overlaps with {} at offset {:#x}", names(bits), c * cs)));
        }
        if m.overlap.other_snapshot_l1(first, end) {
            return Err(bad("overlaps with another snapshot's L1 table".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_union_over_clusters_and_extents() {
        let mut m = OverlapMap::default();
        m.insert(HostCluster(0), MetaKind::Header);
        m.insert_range(HostCluster(3), 4, MetaKind::ActiveL1);
        m.insert_range(HostCluster(100), 2, MetaKind::SnapshotL1);
        m.insert(HostCluster(4), MetaKind::RefcountBlock);
        assert_eq!(m.kinds(2), 0);
        assert_eq!(m.kinds(3), MetaKind::ActiveL1.bit());
        assert_eq!(m.kinds(4), MetaKind::ActiveL1.bit() | MetaKind::RefcountBlock.bit());
        assert_eq!(m.kinds(7), 0);
        assert_eq!(m.kinds(101), MetaKind::SnapshotL1.bit());
        assert_eq!(m.conflict(3, 7, Some(MetaKind::ActiveL1)), Some((4, MetaKind::RefcountBlock.bit())));
        assert_eq!(m.conflict(5, 7, Some(MetaKind::ActiveL1)), None);
        assert!(m.conflict(5, 6, None).is_some());
        assert_eq!(m.end(), 102);
    }

    #[test]
    fn overlapping_extents_are_all_found() {
        let mut m = OverlapMap::default();
        // A long extent, then short ones inside it: the lookup must walk
        // back past the short ones to the long one.
        m.insert_range(HostCluster(10), 100, MetaKind::SnapshotL1);
        m.insert_range(HostCluster(20), 2, MetaKind::ActiveL1);
        m.insert_range(HostCluster(30), 2, MetaKind::RefcountTable);
        assert_eq!(m.kinds(50), MetaKind::SnapshotL1.bit());
        assert_eq!(m.kinds(31), MetaKind::SnapshotL1.bit() | MetaKind::RefcountTable.bit());
        assert_eq!(m.kinds(110), 0);
        assert!(!m.other_snapshot_l1(10, 110), "only itself");
        m.insert_range(HostCluster(40), 1, MetaKind::SnapshotL1);
        assert!(m.other_snapshot_l1(40, 41));
        assert!(m.other_snapshot_l1(10, 110));
    }

    #[test]
    fn remove_splits_extents() {
        let mut m = OverlapMap::default();
        m.insert_range(HostCluster(10), 5, MetaKind::RefcountTable);
        m.insert(HostCluster(12), MetaKind::ActiveL2);
        m.remove(HostCluster(12));
        assert_eq!(m.kinds(12), 0);
        assert_eq!(m.kinds(11), MetaKind::RefcountTable.bit());
        assert_eq!(m.kinds(13), MetaKind::RefcountTable.bit());
        m.remove(HostCluster(10));
        m.remove(HostCluster(14));
        assert_eq!(m.kinds(10), 0);
        assert_eq!(m.kinds(14), 0);
        assert_eq!(m.kinds(13), MetaKind::RefcountTable.bit());
        assert_eq!(m.end(), 15, "the end never goes down");
    }
}
