//! Refcounts and cluster allocation.
//!
//! Crash-safety rules enforced here:
//! - a cluster's refcount is raised (in the cache) before any L2/L1 entry
//!   points at it, and `flush.rs` writes refcount blocks before L2 tables;
//! - a refcount is lowered only after the entry that pointed at the cluster
//!   is gone from disk: decrements wait in the allocator's pending list until the
//!   next metadata write-out, so a freed cluster cannot be reused while an
//!   on-disk table still points at it.

use super::allocator::{PendingFree, ReservedRun};
use super::state::{Meta, MetaKind};
use super::units::{HostCluster, HostOffset};
use super::Qcow2;
use crate::format::be::encode_u64_table;
use crate::format::compressed::CompressedDescriptor;
use crate::format::limits::MAX_HOST_OFFSET;
use crate::{Error, Result};

/// How many refcount blocks one allocation places before it searches
/// again (QEMU's retry); past that, `set_refcount` makes the missing ones.
const MAX_PLACED_BLOCKS: u32 = 16;

/// Whether a failed reservation means there is not room for that much
/// (so a smaller one may still fit).
fn is_no_space(e: &std::io::Error) -> bool {
    matches!(crate::error::io_errno(e), libc::ENOSPC | libc::EDQUOT | libc::EFBIG)
}

impl Qcow2 {
    /// Makes sure the refcount block at `off` is cached.
    pub(crate) fn load_refblock(&self, m: &mut Meta, off: HostOffset) -> Result<()> {
        if m.refs.blocks().contains(off) {
            return Ok(());
        }
        if !off.is_aligned(&self.g) {
            return Err(Error::corrupt_at("refcount block offset is not cluster aligned", off.0));
        }
        if m.refs.blocks().is_full() {
            if let Some((victim, dirty)) = m.refs.blocks_mut().victim() {
                if dirty {
                    // Writing a refcount block early is always safe: it
                    // only ever holds increments and already-safe frees.
                    let data = m.refs.blocks().peek(victim).map(|d| d.to_vec()).unwrap_or_default();
                    self.write_meta(m, victim, &data, MetaKind::RefcountBlock)?;
                    // Not durable yet: the next stage of a write-back
                    // that relies on it syncs first.
                    m.refs.block_written_early();
                }
                m.refs.blocks_mut().remove(victim);
            }
        }
        self.file.debug_event(crate::storage::BlkdebugEvent::RefblockLoad);
        // Read straight into the cache's memory.
        m.refs.blocks_mut().insert_with(off, self.g.cluster_size as usize, |b| {
            self.file.read_at(b, off.0).map_err(|e| Error::io("reading refcount block", e))
        })
    }

    /// Refcount of host cluster `c`.
    pub(crate) fn refcount(&self, m: &mut Meta, c: HostCluster) -> Result<u64> {
        let bits = self.g.rc.block_entries_bits();
        let t = (c.0 >> bits) as usize;
        let Some(off) = m.refs.block_offset(t) else { return Ok(0) };
        if off.0 == 0 {
            return Ok(0);
        }
        self.load_refblock(m, off)?;
        let b = m.refs.blocks().get(off).ok_or_else(|| Error::corrupt("refcount block vanished from cache"))?;
        Ok(self.g.rc.get(b, (c.0 & ((1 << bits) - 1)) as usize))
    }

    /// [`Self::refcount`] for an allocation about to trust it: a refcount
    /// block at an unaligned offset is corruption, signalled as QEMU
    /// signals it (the image marked corrupt, in QEMU's words).
    pub(crate) fn refcount_for_alloc(&self, m: &mut Meta, c: HostCluster) -> Result<u64> {
        let t = (c.0 >> self.g.rc.block_entries_bits()) as usize;
        if let Some(off) = m.refs.block_offset(t).filter(|o| o.0 != 0 && !o.is_aligned(&self.g)) {
            return Err(
                self.mark_corrupt(m, format!("Refblock offset {:#x} unaligned (reftable index: {t:#x})", off.0))
            );
        }
        self.refcount(m, c)
    }

    /// Refcount of host cluster `c` if its refcount block is cached (or it
    /// has none): a lookup under the shared metadata lock.
    pub(crate) fn cached_refcount(&self, m: &Meta, c: HostCluster) -> Option<u64> {
        let bits = self.g.rc.block_entries_bits();
        let t = (c.0 >> bits) as usize;
        let Some(off) = m.refs.block_offset(t) else { return Some(0) };
        if off.0 == 0 {
            return Some(0);
        }
        let b = m.refs.blocks().get(off)?;
        Some(self.g.rc.get(b, (c.0 & ((1 << bits) - 1)) as usize))
    }

    /// Sets the refcount of host cluster `c`, allocating refcount blocks
    /// and growing the refcount table as needed.
    pub(crate) fn set_refcount(&self, m: &mut Meta, c: HostCluster, value: u64) -> Result<()> {
        let bits = self.g.rc.block_entries_bits();
        let t = (c.0 >> bits) as usize;
        let counted = m.refs.block_offset(t).is_some_and(|o| o.0 != 0);
        if value == 0 && !counted {
            // Already 0: no block (nor table growth) needed to say so.
            m.alloc.note_free(c);
            return Ok(());
        }
        if t >= m.refs.table_len() {
            // As QEMU: a block for the entry is taken first (the next
            // free cluster, past the end), then the table grows around it.
            let own = self.take_end_cluster(m)?;
            self.grow_reftable(m, c, Some(own))?;
        }
        if m.refs.block_offset(t).unwrap_or_default().0 == 0 {
            self.new_refblock(m, t)?;
        }
        let off = m.refs.block_offset(t).unwrap_or_default();
        // A refcount block that is also other metadata, or past the end of
        // the file (a damaged refcount table), is refused before any
        // allocation trusts it.
        self.check_refblock(m, off)?;
        self.load_refblock(m, off)?;
        let i = (c.0 & ((1 << bits) - 1)) as usize;
        let byte = i * self.g.rc.bits() as usize / 8;
        let b = m
            .refs
            .blocks_mut()
            .get_mut_range(off, byte, byte + (self.g.rc.bits() as usize).div_ceil(8))
            .ok_or_else(|| Error::corrupt("refcount block vanished from cache"))?;
        let old = self.g.rc.get(b, i);
        self.g.rc.set(b, i, value);
        if value > old {
            self.journal_note_raise(m, c, value);
        }
        if value == 0 {
            m.alloc.note_free(c);
        }
        Ok(())
    }

    /// Changes a refcount by `delta`, refusing overflow and underflow.
    pub(crate) fn adjust_refcount(&self, m: &mut Meta, c: HostCluster, delta: i64) -> Result<u64> {
        let cur = self.refcount(m, c)?;
        let new = if delta >= 0 {
            cur.checked_add(delta as u64).filter(|&v| v <= self.g.rc.max()).ok_or_else(|| {
                Error::invalid(format!(
                    "refcount of cluster {c} would exceed the maximum of {} for refcount_bits={}",
                    self.g.rc.max(),
                    self.g.rc.bits()
                ))
            })?
        } else {
            cur.checked_sub(delta.unsigned_abs())
                .ok_or_else(|| Error::corrupt(format!("refcount of cluster {c} would drop below zero")))?
        };
        self.set_refcount(m, c, new)?;
        Ok(new)
    }

    /// Takes the next cluster at the end of the allocated area whose
    /// refcount is zero (without raising it). The space is reserved before
    /// the allocation end moves, so running out of it changes nothing.
    pub(crate) fn take_end_cluster(&self, m: &mut Meta) -> Result<HostCluster> {
        loop {
            let c = m.alloc.file_end().cluster(&self.g);
            let next = m.alloc.file_end().add(self.g.cluster_size);
            if next.0 > MAX_HOST_OFFSET {
                return Err(Error::io("allocating a cluster", std::io::Error::from_raw_os_error(libc::EFBIG)));
            }
            self.reserve_to(m, next)?;
            m.alloc.extend_end(next);
            if self.refcount_for_alloc(m, c)? == 0 && !m.overlap.contains(c) {
                return Ok(c);
            }
        }
    }

    /// Makes sure the image file has room up to `need`, reserving ahead
    /// in chunks (file_end/16, 1-128 MiB) so data writes into new clusters
    /// overwrite reserved blocks instead of extending the file (file
    /// systems serialize extending writes); a clean close trims what was
    /// not used. Reserving ahead is only an optimisation: when a chunk
    /// does not fit, smaller ones are tried down to exactly `need`, and
    /// only when that does not fit either does the allocation fail (with
    /// the host's ENOSPC, nothing changed).
    ///
    /// In writethrough mode the file is only extended (sparse) instead:
    /// every write there is followed by a sync, and a sync after a write
    /// into reserved (unwritten) blocks commits the file system's journal
    /// to convert them, splitting the reserved extent, which costs more
    /// than a write into a hole (a plain block allocation, what the same
    /// write into a sparse raw file costs); zeros written ahead instead
    /// avoid the commit but pay sixteen times the data's bandwidth at
    /// 4 KiB requests into 64 KiB clusters.
    pub(crate) fn reserve_to(&self, m: &mut Meta, need: HostOffset) -> Result<()> {
        let have = m.alloc.prealloc_end();
        if need <= have {
            return Ok(());
        }
        let cs = self.g.cluster_size;
        let mut chunk = ((need.0 / 16).clamp(1 << 20, 128 << 20).div_ceil(cs) * cs).min(m.alloc.reserve_cap());
        loop {
            let end = need.add(chunk);
            let reserved = if self.writethrough {
                // Only past the file's current end: whatever lies before
                // it was written by someone (a refcount structure rebuilt
                // past the reserved end, say) and must stay.
                self.file.len().and_then(|len| {
                    let from = have.0.max(len);
                    if from >= end.0 {
                        return Ok(());
                    }
                    // Storage that cannot change its length gets zeros,
                    // so new clusters still read as zeros.
                    self.file
                        .set_len(end.0)
                        .or_else(|_| crate::storage::write_zeros_chunked(&*self.file, from, end.0 - from))
                })
            } else {
                self.file.allocate(have.0, end.0 - have.0)
            };
            match reserved {
                Ok(()) => {
                    m.alloc.set_prealloc_end(end);
                    m.alloc.set_reserve_cap(m.alloc.reserve_cap().saturating_mul(2).max(cs));
                    return Ok(());
                }
                Err(e) if chunk > 0 && is_no_space(&e) => {
                    chunk = if chunk > cs { chunk / 2 / cs * cs } else { 0 };
                    m.alloc.set_reserve_cap(chunk);
                }
                Err(e) => return Err(Error::io("reserving space in the image file", e)),
            }
        }
    }

    /// Allocates a refcount block for refcount table entry `t`, placed at
    /// the end of the file so it cannot collide with a range the caller is
    /// about to take; when it falls in its own range it counts itself.
    /// Nothing is published before every fallible step has succeeded: a
    /// failure leaves at most an unused cluster past the old end, with
    /// refcount zero.
    fn new_refblock(&self, m: &mut Meta, t: usize) -> Result<()> {
        self.file.debug_event(crate::storage::BlkdebugEvent::RefblockAlloc);
        let c = self.take_end_cluster(m)?;
        let off = c.offset(&self.g);
        let own_range = (c.0 >> self.g.rc.block_entries_bits()) as usize == t;
        if !own_range {
            // Its own refcount lives in another block, which may have to
            // be created (and may fail) first.
            self.set_refcount(m, c, 1)?;
            if m.refs.block_offset(t).is_some_and(|o| o.0 != 0) {
                // Creating that block filled entry `t` on the way.
                return self.set_refcount(m, c, 0);
            }
        }
        m.refs.blocks_mut().insert_zeroed(off, self.g.cluster_size as usize, true);
        m.refs.set_block_offset(t, off);
        m.overlap.insert(c, MetaKind::RefcountBlock);
        if own_range {
            // Cannot fail: the block is cached and its table entry set.
            self.set_refcount(m, c, 1)?;
        }
        Ok(())
    }

    /// Writes every dirty refcount block whole; returns whether any was.
    pub(crate) fn write_dirty_refblocks(&self, m: &mut Meta) -> Result<bool> {
        let dirty = m.refs.blocks().dirty();
        for &off in &dirty {
            let data = m.refs.blocks().peek(off).map(|d| d.to_vec()).unwrap_or_default();
            self.write_meta(m, off, &data, MetaKind::RefcountBlock)?;
            m.refs.blocks_mut().mark_clean(off);
        }
        Ok(!dirty.is_empty())
    }

    /// Writes the cached refcount table as a new refcount table of `clusters` clusters at
    /// `off`, durably, then points the header at it, durably: a crash
    /// leaves either the old table in use or the complete new one. The
    /// blocks it points to must already be on disk.
    pub(crate) fn install_reftable(&self, m: &mut Meta, off: HostOffset, clusters: u64) -> Result<()> {
        let mut table = encode_u64_table(m.refs.table());
        table.resize((clusters * self.g.cluster_size) as usize, 0);
        self.write_meta(m, off, &table, MetaKind::RefcountTable)?;
        self.sync("flushing new refcount table")?;
        m.hc.header.refcount_table_offset = off.0;
        m.hc.header.refcount_table_clusters = clusters as u32;
        // Should the write fail, the header is still owed to the disk.
        m.header_dirty = true;
        self.write_header(m)?;
        self.sync("flushing header")?;
        m.refs.table_written();
        Ok(())
    }

    /// Whether QEMU's search for a free cluster would hand out cluster 0
    /// (the header) now: its search starts there and cluster 0's
    /// refcount says free (a zeroed refcount block). oxcow's never
    /// does; a caller that QEMU refuses then (an L2 table allocation)
    /// refuses too, marking the image corrupt as QEMU does (iotest 137),
    /// instead of placing the table elsewhere.
    pub(crate) fn search_meets_header(&self, m: &mut Meta) -> Result<bool> {
        Ok(m.alloc.free_hint().0 == 0 && self.refcount(m, HostCluster(0))? == 0)
    }

    /// Allocates one cluster with refcount 1, reusing freed space first.
    pub(crate) fn alloc_cluster(&self, m: &mut Meta) -> Result<HostOffset> {
        Ok(self.alloc_cluster_fresh(m)?.0)
    }

    /// Allocates one cluster; the flag tells whether it was never used
    /// before (past the old end of the file, so it reads as zeros).
    pub(crate) fn alloc_cluster_fresh(&self, m: &mut Meta) -> Result<(HostOffset, bool)> {
        self.file.debug_event(crate::storage::BlkdebugEvent::ClusterAlloc);
        let mut placed = 0;
        loop {
            let end = m.alloc.file_end().cluster(&self.g);
            let mut c = m.alloc.free_hint().max(HostCluster(1));
            while c < end && (self.refcount_for_alloc(m, c)? != 0 || m.overlap.contains(c)) {
                c = c.add(1);
            }
            let fresh = c >= end;
            if fresh {
                m.alloc.set_free_hint(end);
                c = self.take_end_cluster(m)?;
            }
            // A cluster without a refcount block: the block goes where
            // QEMU puts it, and the search starts again after it (a
            // bounded number of times, then `set_refcount` makes it).
            if placed < MAX_PLACED_BLOCKS && self.place_missing_refblock(m, c, 1)? {
                placed += 1;
                continue;
            }
            m.alloc.set_free_hint(m.alloc.free_hint().max(c.add(1)));
            self.set_refcount(m, c, 1)?;
            return Ok((c.offset(&self.g), fresh));
        }
    }

    /// Allocates `n` contiguous clusters (tables, compressed data). On
    /// failure nothing stays allocated.
    pub(crate) fn alloc_contiguous(&self, m: &mut Meta, n: u64) -> Result<HostOffset> {
        if n == 1 {
            return self.alloc_cluster(m);
        }
        self.file.debug_event(crate::storage::BlkdebugEvent::ClusterAlloc);
        if let Some((start, _)) = self.alloc_run(m, n)? {
            return Ok(start.offset(&self.g));
        }
        // At the end, where the new refcount blocks go after the run.
        'retry: loop {
            let start = m.alloc.file_end().cluster(&self.g);
            for k in 0..n {
                if self.refcount_for_alloc(m, start.add(k))? != 0 || m.overlap.contains(start.add(k)) {
                    m.alloc.extend_end(start.add(k + 1).offset(&self.g));
                    continue 'retry;
                }
            }
            self.claim_run(m, start, n)?;
            return Ok(start.offset(&self.g));
        }
    }

    /// Takes the `n` free clusters from `start`: reserves the file up to
    /// their end, moves the allocation end there and gives each refcount
    /// 1. On failure the refcounts set so far go back to 0.
    fn claim_run(&self, m: &mut Meta, start: HostCluster, n: u64) -> Result<()> {
        let end = start.add(n).offset(&self.g);
        self.reserve_to(m, end)?;
        m.alloc.extend_end(end);
        for k in 0..n {
            if let Err(e) = self.set_refcount(m, start.add(k), 1) {
                for j in 0..k {
                    let _ = self.set_refcount(m, start.add(j), 0);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Allocates `n` contiguous clusters with refcount 1 where QEMU puts
    /// them: the first run of `n` free clusters from the search start,
    /// holes too small for the run skipped (and passed by the search
    /// start, as QEMU's free-cluster index passes them until something
    /// is freed). Returns the run's start and the first cluster that was
    /// past the allocation end (never used: reads as zeros); `None`, with
    /// nothing allocated, when the run keeps needing new refcount blocks.
    /// On failure nothing stays allocated but the blocks placed.
    fn alloc_run(&self, m: &mut Meta, n: u64) -> Result<Option<(HostCluster, HostCluster)>> {
        let mut placed = 0;
        loop {
            let old_end = m.alloc.file_end().cluster(&self.g);
            let mut start = m.alloc.free_hint().max(HostCluster(1));
            let mut c = start;
            while c.0 - start.0 < n {
                if c.add(1).offset(&self.g).0 > MAX_HOST_OFFSET {
                    return Err(Error::io("allocating clusters", std::io::Error::from_raw_os_error(libc::EFBIG)));
                }
                if self.refcount_for_alloc(m, c)? != 0 || m.overlap.contains(c) {
                    start = c.add(1);
                }
                c = c.add(1);
            }
            // A cluster of the run without a refcount block: the block
            // goes where QEMU puts it (after the run, or past the
            // refcount table, which then grows), and the search starts
            // again from after it, as QEMU's does; the run may land where
            // the old refcount table was (iotest 044's file end depends
            // on it). Bounded: then one cluster at a time.
            if self.place_missing_refblock(m, start, n)? {
                placed += 1;
                if placed >= MAX_PLACED_BLOCKS {
                    return Ok(None);
                }
                continue;
            }
            self.claim_run(m, start, n)?;
            m.alloc.set_free_hint(m.alloc.free_hint().max(start.add(n)));
            return Ok(Some((start, old_end)));
        }
    }

    /// Allocates a data cluster for a write whose next `want` clusters
    /// (this one included) all need one: the first call of a write takes
    /// them as one contiguous run, as QEMU does, and the following calls
    /// hand out the rest of that run in order. Returns the cluster and
    /// whether it was never used (reads as zeros). The write's planning
    /// ends with [`Self::end_data_run`].
    pub(crate) fn alloc_data_cluster(&self, m: &mut Meta, want: u64) -> Result<(HostOffset, bool)> {
        if let Some((c, fresh)) = m.alloc.take_from_run() {
            return Ok((c.offset(&self.g), fresh));
        }
        if let Some(r) = self.continue_run(m, want)? {
            return Ok(r);
        }
        let run = if want <= 1 { None } else { self.alloc_run(m, want)? };
        let Some((start, fresh_from)) = run else {
            let (off, fresh) = self.alloc_cluster_fresh(m)?;
            m.alloc.set_cont(off.cluster(&self.g).add(1));
            return Ok((off, fresh));
        };
        self.file.debug_event(crate::storage::BlkdebugEvent::ClusterAlloc);
        m.alloc.set_run(ReservedRun { next: start.add(1), end: start.add(want), fresh_from });
        m.alloc.set_cont(start.add(want));
        Ok((start.offset(&self.g), start >= fresh_from))
    }

    /// QEMU extends a write's allocation in place before it searches:
    /// as many of the next `want` clusters from where the write's last
    /// allocation ended as are free (none past a missing refcount block),
    /// taken as the write's run without moving the search start. `None`
    /// when not even one is.
    fn continue_run(&self, m: &mut Meta, want: u64) -> Result<Option<(HostOffset, bool)>> {
        let Some(at) = m.alloc.cont() else { return Ok(None) };
        let bits = self.g.rc.block_entries_bits();
        let mut k = 0;
        while k < want {
            let c = at.add(k);
            let counted = m.refs.block_offset((c.0 >> bits) as usize).is_some_and(|o| o.0 != 0);
            if c.add(1).offset(&self.g).0 > MAX_HOST_OFFSET
                || !counted
                || self.refcount_for_alloc(m, c)? != 0
                || m.overlap.contains(c)
            {
                break;
            }
            k += 1;
        }
        if k == 0 {
            return Ok(None);
        }
        let fresh_from = m.alloc.file_end().cluster(&self.g);
        self.file.debug_event(crate::storage::BlkdebugEvent::ClusterAlloc);
        self.claim_run(m, at, k)?;
        m.alloc.set_run(ReservedRun { next: at.add(1), end: at.add(k), fresh_from });
        m.alloc.set_cont(at.add(k));
        Ok(Some((at.offset(&self.g), at >= fresh_from)))
    }

    /// Gives back the clusters of the write's run that its plan did not
    /// use (the plan stopped early): no table points at them, so they are
    /// free again at once, and the write's next plan continues there.
    pub(crate) fn end_data_run(&self, m: &mut Meta) {
        if let Some((from, to)) = m.alloc.take_run_rest() {
            for c in from.0..to.0 {
                let _ = self.set_refcount(m, HostCluster(c), 0);
            }
            m.alloc.set_cont(from);
        }
    }

    /// Schedules the release of one reference to the host cluster at `off`.
    pub(crate) fn free_later(&self, m: &mut Meta, off: HostOffset, punch: bool) {
        self.file.debug_event(crate::storage::BlkdebugEvent::ClusterFree);
        m.alloc.free_later(PendingFree { offset: off, punch });
    }

    /// Schedules the release of the clusters a compressed cluster uses.
    pub(crate) fn free_compressed_later(&self, m: &mut Meta, d: CompressedDescriptor) {
        let first = HostOffset(d.offset).cluster(&self.g);
        let last = HostOffset(d.offset + d.byte_len() - 1).cluster(&self.g);
        for c in first.0..=last.0 {
            self.free_later(m, HostCluster(c).offset(&self.g), false);
        }
    }

    /// Applies scheduled releases; called once no on-disk table references
    /// them any more. Those a failure leaves unapplied stay scheduled.
    pub(crate) fn apply_pending_frees(&self, m: &mut Meta) -> Result<()> {
        let pending = m.alloc.take_pending();
        for (i, p) in pending.iter().enumerate() {
            let c = p.offset.cluster(&self.g);
            let left = match self.adjust_refcount(m, c, -1) {
                Ok(left) => left,
                Err(e) => {
                    // A host failure is retried with the next write-back;
                    // a refcount found wrong is not retried forever.
                    let rest = if e.is_io() { i } else { i + 1 };
                    m.alloc.requeue(&pending[rest..]);
                    return Err(e);
                }
            };
            if left == 0 {
                m.overlap.remove(c);
                m.alloc.cluster_freed(c, self.g.cluster_bits);
                if p.punch {
                    // Returning space to the host is advisory (as QEMU
                    // treats discards): a failure leaves data, not damage.
                    let _ = self.file.punch_hole(p.offset.0, self.g.cluster_size);
                }
            }
        }
        Ok(())
    }

    /// Writes metadata of `kind` at `off` after checking it does not
    /// overlap other metadata (`overlap.rs`): every metadata write but the
    /// header's goes through here.
    pub(crate) fn write_meta(&self, m: &mut Meta, off: HostOffset, data: &[u8], kind: MetaKind) -> Result<()> {
        self.check_overlap_range(m, off, data.len() as u64, Some(kind))?;
        if let Some(event) = kind.debug_event() {
            self.file.debug_event(event);
        }
        self.file.write_at(data, off.0).map_err(|e| Error::io(kind.writing(), e))
    }

    /// fsync of the image file (and the data file, when separate).
    ///
    /// A failed fsync poisons the image, whatever its errno: the kernel may
    /// have dropped the dirty pages it could not write and will report
    /// success for the next fsync, so what reached the disk since the last
    /// good one is unknown, and writing metadata on top of it could make
    /// an on-disk table point at a cluster whose refcount was lost.
    /// Recorded here, where every fsync of the engine passes, so no caller
    /// can forget it; and refused again by every later sync, so a flush
    /// never succeeds after one failed.
    pub(crate) fn sync(&self, what: &'static str) -> Result<()> {
        self.poison.check()?;
        let r = (|| {
            if self.g.external_data {
                self.data.flush().map_err(|e| Error::io(what, e))?;
            }
            self.file.flush().map_err(|e| Error::io(what, e))
        })();
        if let Err(e) = &r {
            self.poison(e);
        }
        r
    }
}
