//! Internal snapshots: create, apply (goto), delete, list.
//!
//! Refcounts follow QEMU's model: every L1 table (the active one and each
//! snapshot's) adds one reference to each L2 table it points at and one to
//! each data cluster those L2 tables point at (a compressed cluster: one to
//! every host cluster its bytes touch), even when L2 tables are shared.
//!
//! Crash-safety order, enforced below: refcount increases are durable
//! before any on-disk structure (snapshot table, header) relies on them;
//! decreases happen only after the structure that needed them is gone from
//! disk. A crash therefore leaves at most leaked clusters.

use super::snapshot_validate::GotoPlan;
use super::state::{Meta, MetaKind};
use super::units::{HostCluster, HostOffset};
use super::MetaGuard;
use super::{metadata_clusters, Qcow2};
use crate::format::be::{encode_u64_table, u64_table};
use crate::format::l1::{L1Entry, COPIED as L1_COPIED};
use crate::format::l2::{ClusterKind, COPIED};
use crate::format::limits::{MAX_SNAPSHOTS, MAX_SNAPSHOT_TABLE_BYTES};
use crate::format::snapshot::{encode_table, EXTRA_WITH_ICOUNT, FIXED_LEN};
use crate::format::SnapshotEntry;
use crate::{Error, Result};
use std::collections::HashMap;

/// The context of the I/O error a snapshot deletion returns when dropping
/// the deleted snapshot's references failed (after the snapshot left the
/// table): QEMU words it "Failed to free the cluster and L1 table".
pub const SNAPSHOT_FREE_CONTEXT: &str = "freeing the deleted snapshot's clusters and L1 table";

/// A failure a snapshot operation survives, reported to the caller's
/// callback: the image stays consistent, some space leaks.
#[derive(Debug)]
#[non_exhaustive]
pub enum SnapshotWarning {
    /// Freeing the old snapshot table's clusters failed (QEMU:
    /// "qcow2_free_clusters failed"); they stay allocated, unreferenced.
    OldTableNotFreed(Error),
}

/// Bytes one entry occupies on disk (padded to 8).
pub(crate) fn entry_disk_len(e: &SnapshotEntry) -> u64 {
    crate::format::be::pad8(FIXED_LEN + e.extra_data_size as usize + e.id.len() + e.name.len()) as u64
}

impl Qcow2 {
    /// Takes the metadata lock for a whole-image operation: waits for
    /// allocating writes in flight, then writes every cached change back
    /// (refcounts included, even with lazy refcounts) and syncs, so the
    /// operation starts from a consistent on-disk state.
    pub(crate) fn quiesce(&self) -> Result<MetaGuard<'_>> {
        let m = self.lock();
        self.check_writable(&m)?;
        let mut m = self.wait_idle(m);
        self.check_writable(&m)?;
        self.write_back_durable(&mut m)?;
        // A barrier: fast-path I/O that looked up a mapping before this
        // operation (in-place writes into clusters about to become shared
        // or freed) finishes before anything changes. Not held, because
        // write_back takes it again to apply deferred frees.
        drop(self.io_gate.write().unwrap_or_else(|e| e.into_inner()));
        Ok(m)
    }

    /// Writes all metadata back in contract order, refcount blocks
    /// included whatever the lazy-refcounts setting, applies the deferred
    /// frees and makes the result durable.
    pub(crate) fn write_back_durable(&self, m: &mut Meta) -> Result<()> {
        self.write_back_inner(m, true)?;
        // Frees applied by the first pass reach disk with the second.
        self.write_back_inner(m, true)?;
        self.sync("flushing metadata")
    }

    /// Records a failure of a multi-step operation: I/O and corruption
    /// errors poison the image (its on-disk state is no longer known to
    /// match the caches); refused requests do not. Takes the metadata
    /// guard to show it runs before the failed operation lets go of it.
    pub(crate) fn fail<T>(&self, _m: &mut Meta, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            if !matches!(e, Error::InvalidArgument(_) | Error::Unsupported(_)) {
                self.poison(e);
            }
        }
        r
    }

    /// Forgets every cached L2 table (all clean after a write-back): tables
    /// freed by a whole-image operation may be reused as anything.
    pub(crate) fn drop_l2_cache(m: &mut Meta) {
        debug_assert!(!m.map.l2().any_dirty(), "dropping a dirty L2 table");
        for off in m.map.l2().offsets() {
            m.map.l2_mut().remove(off);
        }
    }

    /// Reads a snapshot's L1 table.
    pub(crate) fn read_snapshot_l1(&self, sn: &SnapshotEntry) -> Result<Vec<u64>> {
        if u64::from(sn.l1_size) * 8 > crate::format::limits::MAX_L1_BYTES {
            return Err(Error::field("snapshot l1_size", sn.l1_size.into(), "Snapshot L1 table too large"));
        }
        let mut raw = vec![0u8; sn.l1_size as usize * 8];
        if sn.l1_size > 0 {
            if sn.l1_table_offset & (self.g.cluster_size - 1) != 0 {
                return Err(Error::field(
                    "snapshot l1_table_offset",
                    sn.l1_table_offset,
                    "Snapshot L1 table offset invalid",
                ));
            }
            self.file.read_at(&mut raw, sn.l1_table_offset).map_err(|e| Error::io("reading snapshot L1 table", e))?;
        }
        Ok(u64_table(&raw))
    }

    /// Host cluster indices one L1 table references, once per reference:
    /// its L2 tables, their data clusters and every host cluster that
    /// compressed data touches.
    pub(crate) fn tree_refs(&self, m: &mut Meta, l1: &[u64]) -> Result<Vec<HostCluster>> {
        let cs = self.g.cluster_size;
        let mut out = Vec::new();
        for &raw in l1 {
            let off = L1Entry(raw).l2_offset();
            if off == 0 {
                continue;
            }
            out.push(HostOffset(off).cluster(&self.g));
            let t = self.l2_table(m, HostOffset(off))?;
            for i in 0..self.g.l2_entries as usize {
                let e = self.g.l2.get(&t, i);
                if e.word == 0 {
                    continue;
                }
                if let ClusterKind::Compressed(d) = self.g.l2.classify(e, 0, self.g.v3) {
                    let last = (d.offset + d.byte_len() - 1) / cs;
                    out.extend((d.offset / cs..=last).map(HostCluster));
                    continue;
                }
                let host = e.host_offset();
                if host != 0 && !self.g.external_data {
                    if host & (cs - 1) != 0 {
                        return Err(Error::corrupt_at("data cluster offset is not cluster aligned", host));
                    }
                    out.push(HostOffset(host).cluster(&self.g));
                }
            }
        }
        Ok(out)
    }

    /// Refuses, before anything changes, increments that would overflow
    /// a refcount (refcount_bits = 1 allows no sharing at all).
    pub(crate) fn check_increments(&self, m: &mut Meta, refs: &[HostCluster]) -> Result<()> {
        let mut counts: HashMap<HostCluster, u64> = HashMap::new();
        for &i in refs {
            *counts.entry(i).or_default() += 1;
        }
        let max = self.g.rc.max();
        let mut idxs: Vec<_> = counts.into_iter().collect();
        idxs.sort_unstable();
        for (idx, n) in idxs {
            let cur = self.refcount(m, idx)?;
            if cur.checked_add(n).is_none_or(|v| v > max) {
                return Err(Error::invalid(format!(
                    "refcount of cluster at offset {:#x} would exceed {max}, the maximum for refcount_bits={} \
                     (sharing clusters with a snapshot needs wider refcounts; change them with amend -o refcount_bits=16)",
                    idx.offset(&self.g).0,
                    self.g.rc.bits()
                )));
            }
        }
        Ok(())
    }

    /// Refuses references past the end of the file that no refcount block
    /// covers (a damaged L2 entry): sharing them would create refcount
    /// structures out there. QEMU fails there too, with EFBIG when the
    /// refcount table would outgrow its limit and EAGAIN otherwise; its
    /// errnos are kept for qemu-img's words.
    fn check_refs_have_refblocks(&self, m: &Meta, refs: &[HostCluster]) -> Result<()> {
        let file_len = self.file.len().map_err(|e| Error::io("reading image size", e))?;
        let end = file_len.div_ceil(self.g.cluster_size);
        let max_blocks = crate::format::limits::MAX_REFTABLE_BYTES / 8;
        for c in refs.iter().filter(|c| c.0 >= end) {
            let block = c.0 >> self.g.rc.block_entries_bits();
            let covered = m.refs.table().get(block as usize).is_some_and(|&e| e != 0);
            if covered {
                continue;
            }
            let errno = if block >= max_blocks { libc::EFBIG } else { libc::EAGAIN };
            return Err(Error::io(
                format!("data cluster at offset {:#x} lies past the end of the file", c.offset(&self.g).0),
                std::io::Error::from_raw_os_error(errno),
            ));
        }
        Ok(())
    }

    fn adjust_all(&self, m: &mut Meta, refs: &[HostCluster], delta: i64) -> Result<()> {
        for &c in refs {
            self.adjust_refcount(m, c, delta)?;
        }
        Ok(())
    }

    /// Sets the COPIED flags of the active L1 and L2 entries to exactly
    /// "refcount is one", as QEMU's check requires.
    pub(crate) fn fix_copied_flags(&self, m: &mut Meta) -> Result<()> {
        if self.g.external_data {
            return Ok(());
        }
        for l1i in 0..m.map.l1().len() {
            let off = L1Entry(m.map.l1()[l1i]).l2_offset();
            if off == 0 {
                continue;
            }
            let want = if self.refcount(m, HostOffset(off).cluster(&self.g))? == 1 { off | L1_COPIED } else { off };
            if m.map.l1()[l1i] != want {
                m.map.set_l1(l1i, want);
            }
            self.fix_l2_flags(m, off, false)?;
        }
        Ok(())
    }

    /// Sets or clears the COPIED flags of one L2 table's entries from the
    /// refcounts (`clear_only`: only clears, for tables outside the
    /// active tree).
    fn fix_l2_flags(&self, m: &mut Meta, off: u64, clear_only: bool) -> Result<()> {
        let t = self.l2_table(m, HostOffset(off))?;
        let mut changes = Vec::new();
        for i in 0..self.g.l2_entries as usize {
            let e = self.g.l2.get(&t, i);
            let host = e.host_offset();
            if e.is_compressed() || host == 0 {
                continue;
            }
            let owned = !clear_only && self.refcount(m, HostOffset(host).cluster(&self.g))? == 1;
            let word = if owned { e.word | COPIED } else { e.word & !COPIED };
            if word != e.word {
                changes.push((i, crate::format::L2Entry { word, bitmap: e.bitmap }));
            }
        }
        for (i, e) in changes {
            self.set_l2_raw(m, HostOffset(off), i, e)?;
        }
        Ok(())
    }

    /// Writes a new snapshot table to newly allocated clusters, switches
    /// the header to it and frees the old one. The new table is durable
    /// before the header points at it; the old one is freed only after.
    pub(crate) fn rewrite_snapshot_table(&self, m: &mut Meta, list: Vec<SnapshotEntry>) -> Result<()> {
        let old = self.switch_snapshot_table(m, list)?;
        for c in (old.start.0..old.end.0).map(HostCluster) {
            m.overlap.remove(c);
            self.adjust_refcount(m, c, -1)?;
        }
        Ok(())
    }

    /// Writes a new snapshot table and switches the header to it, as
    /// [`Self::rewrite_snapshot_table`], leaving the old table's clusters
    /// (returned) referenced for the caller to free.
    fn switch_snapshot_table(
        &self,
        m: &mut Meta,
        mut list: Vec<SnapshotEntry>,
    ) -> Result<std::ops::Range<HostCluster>> {
        let cs = self.g.cluster_size;
        if list.len() > MAX_SNAPSHOTS as usize {
            return Err(Error::invalid("too many snapshots"));
        }
        // As QEMU, an entry that recorded no disk size gets the current
        // one (what QEMU assumes for it when reading the table).
        for e in &mut list {
            e.disk_size = e.disk_size.or(Some(m.hc.header.size));
        }
        let bytes = encode_table(&list, self.g.v3);
        if bytes.len() as u64 > MAX_SNAPSHOT_TABLE_BYTES {
            return Err(Error::invalid("snapshot table would be too large"));
        }
        for e in &mut list {
            e.extra_data_size = self.extra_len(e) as u32;
        }
        let old_off = m.hc.header.snapshots_offset;
        let old_bytes: u64 =
            if m.hc.header.nb_snapshots > 0 { m.snapshots.iter().map(entry_disk_len).sum() } else { 0 };
        let new_off = if bytes.is_empty() {
            HostOffset(0)
        } else {
            let clusters = (bytes.len() as u64).div_ceil(cs);
            let off = self.alloc_contiguous(m, clusters)?;
            m.overlap.insert_range(off.cluster(&self.g), clusters, MetaKind::SnapshotTable);
            let mut padded = bytes.clone();
            padded.resize((clusters * cs) as usize, 0);
            self.write_meta(m, off, &padded, MetaKind::SnapshotTable)?;
            off
        };
        // The table and its refcount must be on disk before the header
        // points at it.
        self.write_back_durable(m)?;
        m.hc.header.nb_snapshots = list.len() as u32;
        m.hc.header.snapshots_offset = new_off.0;
        self.write_header(m)?;
        self.sync("flushing header")?;
        m.snapshots = list;
        let first = HostOffset(old_off).cluster(&self.g);
        let n = if old_bytes > 0 && old_off != 0 { old_bytes.div_ceil(cs) } else { 0 };
        Ok(first..first.add(n))
    }

    /// Extra data bytes `SnapshotEntry::encode` writes for `e`.
    fn extra_len(&self, e: &SnapshotEntry) -> usize {
        EXTRA_WITH_ICOUNT + e.extra_unknown.len()
    }

    /// Finds a snapshot by ID first, then by name, as QEMU does.
    fn find_snapshot(&self, m: &Meta, name_or_id: &str) -> Option<usize> {
        m.snapshots
            .iter()
            .position(|s| s.id == name_or_id)
            .or_else(|| m.snapshots.iter().position(|s| s.name == name_or_id))
    }

    /// The internal snapshots, in table order.
    pub fn snapshot_list(&self) -> Vec<SnapshotEntry> {
        self.lock().snapshots.clone()
    }

    /// Creates an internal snapshot of the current disk state named
    /// `name`, with the next free numeric ID. Returns the new entry.
    pub fn snapshot_create(&self, name: &str) -> Result<SnapshotEntry> {
        if name.len() > u16::MAX as usize {
            return Err(Error::invalid("snapshot name too long"));
        }
        let mut m = self.quiesce()?;
        if self.g.external_data {
            return Err(Error::unsupported("internal snapshots of an image with an external data file"));
        }
        if m.snapshots.len() >= MAX_SNAPSHOTS as usize {
            // QEMU's errno for it (qemu-img: "File too large").
            return Err(Error::io("too many snapshots", std::io::Error::from_raw_os_error(libc::EFBIG)));
        }
        // A refusal here has changed nothing: no poisoning.
        self.validate_snapshot_table(&mut m)?;
        let l1 = m.map.l1().to_vec();
        let refs = match self.tree_refs(&mut m, &l1) {
            Ok(refs) => refs,
            Err(e) => return self.fail(&mut m, Err(e)),
        };
        self.check_refs_have_refblocks(&m, &refs)?;
        let r = self.snapshot_create_locked(&mut m, name, l1, refs);
        self.fail(&mut m, r)
    }

    fn snapshot_create_locked(
        &self,
        m: &mut Meta,
        name: &str,
        l1: Vec<u64>,
        refs: Vec<HostCluster>,
    ) -> Result<SnapshotEntry> {
        let cs = self.g.cluster_size;
        if let Err(e) = self.check_increments(m, &refs) {
            // QEMU has already allocated the snapshot's L1 table when it
            // finds that a refcount would overflow, and leaves it leaked
            // (iotest 112 shows the leak): the same image results, and a
            // leak is all `check -r leaks` has to repair.
            if matches!(e, Error::InvalidArgument(_)) && !l1.is_empty() {
                let clusters = (l1.len() as u64 * 8).div_ceil(cs);
                let off = self.alloc_contiguous(m, clusters)?;
                let mut bytes = encode_u64_table(&l1);
                bytes.resize((clusters * cs) as usize, 0);
                self.write_meta(m, off, &bytes, MetaKind::SnapshotL1)?;
                self.write_back_durable(m)?;
            }
            return Err(e);
        }
        m.alloc.reset_compress_cursor();
        // 1. Share the tree: raise refcounts, clear COPIED flags.
        self.adjust_all(m, &refs, 1)?;
        self.fix_copied_flags(m)?;
        // 2. The snapshot's copy of the L1 table.
        let l1_off = if l1.is_empty() {
            HostOffset(0)
        } else {
            let clusters = (l1.len() as u64 * 8).div_ceil(cs);
            let off = self.alloc_contiguous(m, clusters)?;
            m.overlap.insert_range(off.cluster(&self.g), clusters, MetaKind::SnapshotL1);
            let copy: Vec<u64> = m.map.l1().iter().map(|&e| e & !L1_COPIED).collect();
            let mut bytes = encode_u64_table(&copy);
            bytes.resize((clusters * cs) as usize, 0);
            self.write_meta(m, off, &bytes, MetaKind::SnapshotL1)?;
            off
        };
        // 3. Refcounts (then flags) durable before the table names the copy.
        self.write_back_durable(m)?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let next_id = m.snapshots.iter().map(|s| s.id.parse::<u64>().unwrap_or(0)).max().unwrap_or(0) + 1;
        let entry = SnapshotEntry {
            l1_table_offset: l1_off.0,
            l1_size: l1.len() as u32,
            id: next_id.to_string(),
            name: name.to_string(),
            date_sec: now.as_secs() as u32,
            // qemu-img records microseconds.
            date_nsec: now.subsec_micros() * 1000,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(m.hc.header.size),
            // qemu-img 10 records 0 here when record/replay is off.
            icount: Some(0),
            extra_unknown: Vec::new(),
            extra_data_size: EXTRA_WITH_ICOUNT as u32,
        };
        let mut list = m.snapshots.clone();
        list.push(entry.clone());
        // 4. Table, then header.
        self.rewrite_snapshot_table(m, list)?;
        self.write_back_durable(m)?;
        m.overlap = metadata_clusters(&self.g, m);
        Ok(entry)
    }

    /// Reverts the disk to snapshot `name_or_id` (ID first, then name).
    /// The current state is lost unless another snapshot holds it.
    pub fn snapshot_apply(&self, name_or_id: &str) -> Result<()> {
        let mut m = self.quiesce()?;
        let Some(i) = self.find_snapshot(&m, name_or_id) else {
            return Err(Error::invalid(format!("Failed to load snapshot: snapshot '{name_or_id}' not found")));
        };
        let sn = m.snapshots[i].clone();
        // QEMU's rule: bitmaps cannot follow a revert of the whole disk.
        if self.bitmaps_loaded() {
            return Err(Error::invalid("Device has active dirty bitmaps"));
        }
        // Everything the revert installs or drops is checked before a byte
        // changes; a refusal leaves the image as it was (no poisoning).
        let plan = self.plan_goto(&mut m, &sn)?;
        let r = self.snapshot_apply_locked(&mut m, plan);
        self.fail(&mut m, r)
    }

    fn snapshot_apply_locked(&self, m: &mut Meta, plan: GotoPlan) -> Result<()> {
        let cs = self.g.cluster_size;
        let GotoPlan { sn_l1, refs, old_refs, header } = plan;
        m.alloc.reset_compress_cursor();
        let size = header.size;
        let need = header.l1_size as usize;
        // 1. The new active tree's references, before anything uses them.
        self.adjust_all(m, &refs, 1)?;
        // Everything in the new active tree is now shared with the
        // snapshot, so no COPIED flag may stay set in its L2 tables.
        for &raw in &sn_l1 {
            let off = L1Entry(raw).l2_offset();
            if off != 0 {
                self.fix_l2_flags(m, off, true)?;
            }
        }
        let mut new_l1: Vec<u64> = sn_l1.iter().map(|&e| e & !L1_COPIED).collect();
        if new_l1.len() < need {
            new_l1.resize(need, 0);
        }
        // An empty L1 table (zero-sized disk) occupies no cluster: QEMU's
        // check would count an allocated one as leaked.
        let clusters = (new_l1.len() as u64 * 8).div_ceil(cs);
        let new_off = if clusters == 0 { HostOffset(0) } else { self.alloc_contiguous(m, clusters)? };
        if clusters > 0 {
            let mut bytes = encode_u64_table(&new_l1);
            bytes.resize((clusters * cs) as usize, 0);
            self.write_meta(m, new_off, &bytes, MetaKind::ActiveL1)?;
        }
        // 2. Refcounts, flags and the new L1 durable before the switch.
        self.write_back_durable(m)?;
        let old_l1 = m.map.replace_l1(new_l1);
        let old = HostOffset(m.hc.header.l1_table_offset).cluster(&self.g);
        let old_clusters = (old_l1.len() as u64 * 8).div_ceil(cs);
        m.hc.header.l1_table_offset = new_off.0;
        m.hc.header.l1_size = m.map.l1().len() as u32;
        m.hc.header.size = size;
        self.write_header(m)?;
        self.sync("flushing header")?;
        self.size.store(size, std::sync::atomic::Ordering::Release);
        // 3. Nothing on disk references the old tree any more.
        self.adjust_all(m, &old_refs, -1)?;
        if !old_l1.is_empty() {
            for k in 0..old_clusters {
                self.adjust_refcount(m, old.add(k), -1)?;
            }
        }
        self.fix_copied_flags(m)?;
        self.write_back_durable(m)?;
        // Tables freed above may be reused for anything.
        Self::drop_l2_cache(m);
        m.overlap = metadata_clusters(&self.g, m);
        Ok(())
    }

    /// Deletes snapshot `name_or_id` (ID first, then name) and frees the
    /// clusters only it used.
    /// Warnings (see [`Self::snapshot_delete_with_warnings`]) are dropped.
    pub fn snapshot_delete(&self, name_or_id: &str) -> Result<()> {
        self.snapshot_delete_with_warnings(name_or_id, &mut |_| {})
    }

    /// Deletes snapshot `name_or_id` as [`Self::snapshot_delete`], telling
    /// `warn` of failures that leave the image consistent, only leaking
    /// space (`check -r leaks` reclaims it), and do not stop the deletion:
    /// freeing the old snapshot table (QEMU prints "qcow2_free_clusters
    /// failed" for it and goes on). An I/O failure once the snapshot is
    /// gone from the table comes back as an [`Error::Io`] whose context is
    /// [`SNAPSHOT_FREE_CONTEXT`]: the image then holds leaked clusters.
    pub fn snapshot_delete_with_warnings(&self, name_or_id: &str, warn: &mut dyn FnMut(SnapshotWarning)) -> Result<()> {
        let mut m = self.quiesce()?;
        let Some(i) = self.find_snapshot(&m, name_or_id) else {
            return Err(Error::invalid("snapshot not found"));
        };
        // Checked before a byte changes; a refusal does not poison.
        let refs = self.plan_delete(&mut m, i)?;
        let r = self.snapshot_delete_locked(&mut m, i, refs, warn);
        self.fail(&mut m, r)
    }

    /// Frees the old snapshot table's clusters and puts the refcounts on
    /// disk at once, so that a failure is known here: the clusters are
    /// then given their reference back in the cache (a leak, as on disk)
    /// and the failure becomes a warning.
    fn free_old_table(
        &self,
        m: &mut Meta,
        old: std::ops::Range<HostCluster>,
        warn: &mut dyn FnMut(SnapshotWarning),
    ) -> Result<()> {
        if old.is_empty() {
            return Ok(());
        }
        self.file.debug_event(crate::storage::BlkdebugEvent::ClusterFree);
        for c in old.start.0..old.end.0 {
            m.overlap.remove(HostCluster(c));
            self.adjust_refcount(m, HostCluster(c), -1)?;
        }
        if let Err(e) = self.write_back_durable(m) {
            for c in old.start.0..old.end.0 {
                self.adjust_refcount(m, HostCluster(c), 1)?;
            }
            warn(SnapshotWarning::OldTableNotFreed(e));
        }
        Ok(())
    }

    fn snapshot_delete_locked(
        &self,
        m: &mut Meta,
        i: usize,
        refs: Vec<HostCluster>,
        warn: &mut dyn FnMut(SnapshotWarning),
    ) -> Result<()> {
        let sn = m.snapshots[i].clone();
        m.alloc.reset_compress_cursor();
        let mut list = m.snapshots.clone();
        list.remove(i);
        // 1. The table without the entry, durable (header switched).
        let old = self.switch_snapshot_table(m, list)?;
        self.free_old_table(m, old, warn)?;
        // 2. Only now drop the references it held.
        self.drop_snapshot_refs(m, &sn, &refs).map_err(|e| match e {
            Error::Io { source, .. } => Error::io(SNAPSHOT_FREE_CONTEXT, source),
            Error::Poisoned(cause) if cause.is_io() => {
                Error::io(SNAPSHOT_FREE_CONTEXT, std::io::Error::from_raw_os_error(cause.errno()))
            }
            other => other,
        })
    }

    /// Drops the references of a snapshot gone from the table (its tree's
    /// and its L1 table's) and puts the result on disk.
    fn drop_snapshot_refs(&self, m: &mut Meta, sn: &SnapshotEntry, refs: &[HostCluster]) -> Result<()> {
        let cs = self.g.cluster_size;
        self.adjust_all(m, refs, -1)?;
        if sn.l1_size > 0 {
            for k in 0..(u64::from(sn.l1_size) * 8).div_ceil(cs) {
                let c = HostOffset(sn.l1_table_offset).cluster(&self.g).add(k);
                m.overlap.remove(c);
                self.adjust_refcount(m, c, -1)?;
            }
        }
        // 3. Clusters back to a single owner get COPIED again; write_back
        // puts the refcounts on disk before these flags.
        self.fix_copied_flags(m)?;
        self.write_back_durable(m)?;
        Self::drop_l2_cache(m);
        m.overlap = metadata_clusters(&self.g, m);
        Ok(())
    }
}
