//! The write path: in-place overwrites, allocation and copy-on-write,
//! zero writes and discards.
//!
//! Ordering rule enforced here: a guest cluster's L2 entry is changed only
//! after the data write into its (new) host cluster has completed; the
//! cluster is marked in flight meanwhile so no other writer allocates it.

use super::state::{Meta, MetaKind};
use super::units::{GuestCluster, GuestOffset, HostOffset};
use super::{MetaGuard, Qcow2};
use crate::device::{check_range, BlockDevice};
use crate::format::l1::{L1Entry, COPIED as L1_COPIED};
use crate::format::l2::{ClusterKind, L2Entry, SubclusterBitmap, COPIED, ZERO};
use crate::{Error, Result};

/// A cluster whose L2 entry this writer will change after its data I/O.
struct Alloc {
    /// The guest cluster.
    gc: GuestCluster,
    /// Host cluster receiving the data.
    host: HostOffset,
    /// The host cluster was never used (reads as zeros).
    fresh: bool,
    /// Refcount was raised for `host` by this writer.
    new_cluster: bool,
    /// The entry before the write.
    old: L2Entry,
}

/// What one guest cluster of a write needs.
enum Step {
    /// Overwrite at this host offset (cluster start); no metadata change.
    InPlace(HostOffset),
    /// Allocation or copy-on-write.
    Alloc(Alloc),
}

const ALL_SUBS: u32 = u32::MAX;

/// Pieces of a write that are contiguous both in the guest and on the
/// host, gathered so they go out as one write.
#[derive(Default)]
struct DataRun {
    /// (host offset, guest offset, length) of the run so far.
    run: Option<(HostOffset, u64, u64)>,
}

impl DataRun {
    /// Adds `len` bytes of guest offset `guest` (`buf` starts at `base`)
    /// going to `host`, writing out the run so far if this does not
    /// continue it.
    fn add(&mut self, q: &Qcow2, buf: &[u8], base: u64, host: HostOffset, guest: u64, len: u64) -> Result<()> {
        match &mut self.run {
            Some((rh, rg, rl)) if rh.add(*rl) == host && *rg + *rl == guest => *rl += len,
            _ => {
                self.finish(q, buf, base)?;
                self.run = Some((host, guest, len));
            }
        }
        Ok(())
    }

    /// Writes out the run gathered so far.
    fn finish(&mut self, q: &Qcow2, buf: &[u8], base: u64) -> Result<()> {
        if let Some((h, g, l)) = self.run.take() {
            q.write_data(&buf[(g - base) as usize..(g - base + l) as usize], h, g)?;
        }
        Ok(())
    }
}

impl Qcow2 {
    /// Bitmap of subclusters that `[from, to)` (offsets within a cluster)
    /// touches.
    pub(super) fn sub_mask(&self, from: u64, to: u64) -> u32 {
        if !self.g.extended {
            return ALL_SUBS;
        }
        let first = (from / self.g.sub_size) as u32;
        let last = ((to - 1) / self.g.sub_size) as u32;
        let n = last - first + 1;
        if n >= 32 {
            ALL_SUBS
        } else {
            ((1u32 << n) - 1) << first
        }
    }

    /// Returns an L2 table for L1 index `l1i` that may be modified in place
    /// (allocating it, or copying a shared one), with the L1 entry updated.
    pub(crate) fn writable_l2(&self, m: &mut Meta, l1i: usize) -> Result<HostOffset> {
        let raw = *m.map.l1().get(l1i).ok_or_else(|| Error::corrupt("guest offset beyond the L1 table"))?;
        let l1e = L1Entry(raw);
        let old = l1e.l2_offset();
        if old != 0 && l1e.copied() {
            return Ok(HostOffset(old));
        }
        let content =
            if old != 0 { self.l2_table(m, HostOffset(old))? } else { vec![0u8; self.g.cluster_size as usize] };
        // Room in the cache before the allocation, so that a failure of
        // either leaves nothing allocated and nothing changed.
        self.make_room_l2(m)?;
        if self.search_meets_header(m)? {
            return Err(self.mark_corrupt(m, "Preventing invalid allocation of L2 table at offset 0".into()));
        }
        let new = self.alloc_cluster(m)?;
        if self.lazy_configured(m) {
            // As QEMU, lazy refcounts or not, a new table's refcount is
            // written before the table is used: a crash then leaves only
            // data clusters' refcounts behind, the leaks QEMU's repair
            // expects to find (iotest 039). On failure the cluster, which
            // nothing references yet, is given back: nothing allocated.
            if let Err(e) = self.write_refcounts(m) {
                let _ = self.set_refcount(m, new.cluster(&self.g), 0);
                return Err(e);
            }
        }
        self.check_overlap(m, new, None)?;
        m.overlap.insert(new.cluster(&self.g), MetaKind::ActiveL2);
        self.insert_l2_table(m, new, &content)?;
        m.map.set_l1(l1i, new.0 | L1_COPIED);
        if old != 0 {
            // The shared table stays referenced by a snapshot (or is freed
            // once the new L1 entry is on disk).
            self.free_later(m, HostOffset(old), false);
        }
        Ok(new)
    }

    /// Updates the L2 entry of guest cluster `gc` (its table must already
    /// be writable).
    pub(crate) fn set_l2_entry(&self, m: &mut Meta, gc: GuestCluster, e: L2Entry) -> Result<()> {
        let (l1i, l2i) = gc.split(&self.g);
        let off = self.writable_l2(m, l1i)?;
        self.set_l2_raw(m, off, l2i, e)
    }

    /// Schedules the release of whatever host clusters entry `old`
    /// references, except `keep`.
    pub(crate) fn release_entry(&self, m: &mut Meta, old: L2Entry, keep: Option<u64>, punch: bool) {
        if self.g.external_data {
            return;
        }
        if old.is_compressed() {
            let k = self.g.l2.classify(old, 0, self.g.v3);
            if let ClusterKind::Compressed(d) = k {
                self.free_compressed_later(m, d);
            }
            return;
        }
        let h = old.host_offset();
        if h != 0 && Some(h) != keep {
            self.free_later(m, HostOffset(h), punch);
        }
    }

    /// Whether entry `e` maps a cluster this image alone owns.
    fn owned(&self, e: L2Entry) -> bool {
        !e.is_compressed() && e.copied() && (e.host_offset() != 0 || self.g.external_data)
    }

    /// Whether a write of `[from, to)` into the owned cluster of `e` can
    /// go in place (every touched subcluster allocated, no zero flag).
    fn fits_in_place(&self, e: L2Entry, from: u64, to: u64) -> bool {
        if self.g.extended {
            let mask = self.sub_mask(from, to);
            e.bitmap.alloc() & mask == mask
        } else {
            !self.g.v3 || e.word & ZERO == 0
        }
    }

    /// The host cluster a write of `[from, to)` into guest cluster `gc`
    /// overwrites in place, found under the shared lock; `None` when the
    /// write needs the exclusive path (a table or refcount block not
    /// cached, allocation, copy-on-write, another writer owning the
    /// cluster, or a check that must report).
    fn in_place_target(&self, m: &Meta, gc: GuestCluster, from: u64, to: u64) -> Option<HostOffset> {
        if self.is_inflight(m, gc) {
            return None;
        }
        let e = self.cached_l2_entry(m, gc)?;
        let l1_copied = m.map.l1().get(gc.split(&self.g).0).is_some_and(|&r| L1Entry(r).copied());
        // An entry that breaks the subcluster rules goes to the planned
        // path, whose check reports it.
        let valid = !self.g.extended || self.subcluster_bits_valid(e);
        let ok = valid
            && self.owned(e)
            && l1_copied
            && self.fits_in_place(e, from, to)
            && self.mapped_cluster_ok(m, e.host_offset());
        ok.then_some(HostOffset(e.host_offset()))
    }

    /// An overwrite inside one cluster this image owns, looked up under
    /// the shared lock: the common rewrite, which then never waits for
    /// the exclusive lock. Returns false, having done nothing, when the
    /// write needs the planned path.
    fn write_in_place(&self, buf: &[u8], offset: u64) -> Result<bool> {
        let at = GuestOffset(offset);
        let (gc, from) = (at.cluster(&self.g), at.in_cluster(&self.g));
        let to = from + buf.len() as u64;
        if buf.is_empty() || to > self.g.cluster_size {
            return Ok(false);
        }
        let (host, _gate) = {
            let m = self.lock_shared();
            self.check_writable(&m)?;
            let Some(host) = self.in_place_target(&m, gc, from, to) else {
                return Ok(false);
            };
            // As on the planned path: the gate before the lock goes, so
            // no free can hand the cluster out before the write lands.
            (host, self.io_gate.read().unwrap_or_else(|e| e.into_inner()))
        };
        self.write_data(buf, host.add(from), offset)?;
        Ok(true)
    }

    /// How many clusters from `gc` on (up to `bound`, within its L2
    /// table) need a new host cluster in a row: QEMU allocates them as
    /// one contiguous run (`alloc.rs`).
    fn alloc_run_len(&self, m: &mut Meta, gc: GuestCluster, bound: u64) -> Result<u64> {
        let per_table = self.g.cluster_size / 8;
        let end = bound.min((gc.0 / per_table + 1) * per_table);
        let mut n = 1;
        while gc.0 + n < end {
            let next = GuestCluster(gc.0 + n);
            if self.is_inflight(m, next) || self.owned(self.l2_entry(m, next)?) {
                break;
            }
            n += 1;
        }
        Ok(n)
    }

    /// Decides what guest cluster `gc` needs for a write of `[from, to)`
    /// within it; `bound` ends the clusters this plan may still reach.
    /// Returns `None` when another writer owns the cluster.
    fn plan_write(&self, m: &mut Meta, gc: GuestCluster, from: u64, to: u64, bound: u64) -> Result<Option<Step>> {
        if self.is_inflight(m, gc) {
            return Ok(None);
        }
        let (l1i, _) = gc.split(&self.g);
        let e = self.l2_entry(m, gc)?;
        let l1_copied = m.map.l1().get(l1i).is_some_and(|&r| L1Entry(r).copied());
        let host = e.host_offset();
        self.check_mapped_entry(m, e)?;
        let owned = self.owned(e);
        if owned && l1_copied && self.fits_in_place(e, from, to) {
            // `check_mapped_entry` above did the overlap check.
            return Ok(Some(Step::InPlace(HostOffset(host))));
        }
        // The L2 table the commit will change is made writable now: an
        // allocation that fails must fail before the data is written, and
        // the commit, after the data, then has nothing left to allocate.
        self.writable_l2(m, l1i)?;
        let (host, fresh, new_cluster) = if owned {
            (HostOffset(host), false, false)
        } else if self.g.external_data {
            (HostOffset(gc.offset(&self.g).0), false, false)
        } else {
            let want = if m.alloc.has_run() { 1 } else { self.alloc_run_len(m, gc, bound)? };
            let (h, fresh) = self.alloc_data_cluster(m, want)?;
            // A never-used cluster of an encrypted image does not read as
            // zeros: the zeros around the write must go out encrypted.
            (h, fresh && !self.encrypted(), true)
        };
        if let Err(err) = self.check_overlap(m, host, None) {
            if new_cluster {
                let _ = self.set_refcount(m, host.cluster(&self.g), 0);
            }
            return Err(err);
        }
        self.claim_inflight(m, gc);
        Ok(Some(Step::Alloc(Alloc { gc, host, fresh, new_cluster, old: e })))
    }

    pub(crate) fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.len())?;
        self.write_unchecked(buf, offset)
    }

    /// A write at any guest offset the L1 table covers, past the disk's
    /// end too (the VM state area, `vmstate.rs`).
    pub(crate) fn write_unchecked(&self, buf: &[u8], offset: u64) -> Result<()> {
        if !self.write_in_place(buf, offset)? {
            self.write_planned(buf, offset)?;
        }
        if self.writethrough {
            self.flush_all()?;
        }
        Ok(())
    }

    /// A write through the plan: lookups, allocation and copy-on-write
    /// under the exclusive lock, data outside it, then the commit.
    fn write_planned(&self, buf: &[u8], offset: u64) -> Result<()> {
        {
            let mut m = self.lock();
            self.check_writable(&m)?;
            // A request's first allocation searches, as QEMU's does.
            m.alloc.clear_cont();
        }
        let cs = self.g.cluster_size;
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let mut m = self.lock();
            self.check_writable(&m)?;
            let mut steps: Vec<(u64, u64, Step)> = Vec::new();
            let mut at = pos;
            while at < end && steps.len() < 512 {
                let gc = GuestOffset(at).cluster(&self.g);
                let chunk_end = ((gc.0 + 1) * cs).min(end);
                let bound = end.div_ceil(cs).min(gc.0 + (512 - steps.len()) as u64);
                let planned = match self.plan_write(&mut m, gc, at % cs, chunk_end - gc.0 * cs, bound) {
                    Ok(p) => p,
                    Err(e) => {
                        self.end_data_run(&mut m);
                        self.abandon(&mut m, steps);
                        return Err(e);
                    }
                };
                match planned {
                    Some(step) => steps.push((at, chunk_end - at, step)),
                    None if steps.is_empty() => {
                        m = self.wait_for_cluster(m, gc);
                        self.check_writable(&m)?;
                        continue;
                    }
                    None => break,
                }
                at = chunk_end;
            }
            self.end_data_run(&mut m);
            // The gate is taken before the metadata lock is released: a
            // free (discard, flush) cannot slip in between the lookup and
            // the overwrite and hand the cluster to someone else.
            let gate = self.io_gate.read().unwrap_or_else(|e| e.into_inner());
            drop(m);
            let result = self.execute_writes(buf, offset, &steps, gate);
            let mut m = self.lock();
            // A failed data write fails this request only: no metadata
            // points at the new clusters yet, so giving them back leaves
            // the cache as it was (the guest sees old or new data in the
            // range, as with any failed write).
            if let Err(e) = result {
                self.abandon(&mut m, steps);
                return Err(e);
            }
            self.commit_allocs(&mut m, steps)?;
            pos = at;
        }
        Ok(())
    }

    /// Gives back clusters planned but not committed: their new host
    /// clusters were never referenced, so they are freed at once (their
    /// refcount was raised in the cache only, and a refcount block written
    /// early meanwhile at worst shows a leak after a crash). Such a cluster
    /// is below the allocation end from now on, so it is never taken for
    /// fresh again: whatever the failed write left in it gets copied over.
    fn abandon(&self, m: &mut Meta, steps: impl IntoIterator<Item = (u64, u64, Step)>) {
        for (_, _, s) in steps {
            if let Step::Alloc(a) = s {
                self.abandon_alloc(m, &a);
            }
        }
    }

    fn abandon_alloc(&self, m: &mut Meta, a: &Alloc) {
        if a.new_cluster {
            let _ = self.set_refcount(m, a.host.cluster(&self.g), 0);
        }
        self.release_inflight(m, a.gc);
    }

    /// Whether the write leaves parts of the new mapping that must come
    /// from the old content (and so must be durable before the L2 entry).
    fn needs_cow_sync(&self, a: &Alloc, from: u64, to: u64) -> bool {
        if a.fresh && self.old_is_zero(a.old) {
            return false;
        }
        let (span_from, span_to) = self.alloc_span(a, from, to);
        span_from < from || span_to > to
    }

    /// Data I/O of a planned batch, without the metadata lock.
    /// `gate` is held for the in-place overwrites and released before the
    /// allocating writes (whose clusters nobody else can free).
    fn execute_writes(
        &self,
        buf: &[u8],
        base: u64,
        steps: &[(u64, u64, Step)],
        gate: std::sync::RwLockReadGuard<'_, ()>,
    ) -> Result<()> {
        let cs = self.g.cluster_size;
        // In-place overwrites and allocations the write fills completely
        // go out from the caller's buffer in guest order, host-contiguous
        // runs as one write whatever their kind (a preallocated zero
        // cluster between two in-place ones, sequential writes allocating
        // contiguous clusters): QEMU issues one request there too, which
        // its iotest 066 counts. The gate is held while in-place overwrites
        // are among them (only: a request stopped at a blkdebug breakpoint
        // must not hold up flushes); allocations needing copy-on-write go
        // after, without it.
        let mut partial = Vec::new();
        {
            let _gate = steps.iter().any(|(_, _, s)| matches!(s, Step::InPlace(_))).then_some(gate);
            let mut run = DataRun::default();
            for (pos, len, s) in steps {
                let from = pos % cs;
                match s {
                    Step::InPlace(host) => run.add(self, buf, base, host.add(from), *pos, *len)?,
                    Step::Alloc(a) if self.alloc_span(a, from, from + len) == (from, from + len) => {
                        run.add(self, buf, base, a.host.add(from), *pos, *len)?;
                    }
                    Step::Alloc(a) => partial.push((a, from, *pos, *len)),
                }
            }
            run.finish(self, buf, base)?;
        }
        for (a, from, pos, len) in partial {
            self.write_allocated(a, from, &buf[(pos - base) as usize..(pos - base + len) as usize])?;
        }
        Ok(())
    }

    fn write_data(&self, data: &[u8], host: HostOffset, guest: u64) -> Result<()> {
        self.data.debug_event(crate::storage::BlkdebugEvent::WriteAio);
        self.write_guest_data(data, host.0, guest).map_err(|e| Error::io("writing guest data", e))
    }

    /// Writes `data` at `from` within a cluster being allocated, copying
    /// the old content of the touched (sub)clusters around it.
    fn write_allocated(&self, a: &Alloc, from: u64, data: &[u8]) -> Result<()> {
        if a.fresh && self.old_is_zero(a.old) {
            // Around the write the old content is zeros, which a cluster
            // never used before already reads as: only the data goes out.
            return self.write_data(data, a.host.add(from), a.gc.offset(&self.g).0 + from);
        }
        let to = from + data.len() as u64;
        let (span_from, span_to) = self.alloc_span(a, from, to);
        debug_assert!(span_to <= self.g.cluster_size);
        let mut buf = vec![0u8; (span_to - span_from) as usize];
        if from > span_from {
            self.fill_old(&mut buf[..(from - span_from) as usize], a, span_from)?;
        }
        if span_to > to {
            self.fill_old(&mut buf[(to - span_from) as usize..], a, to)?;
        }
        buf[(from - span_from) as usize..(to - span_from) as usize].copy_from_slice(data);
        self.write_data(&buf, a.host.add(span_from), a.gc.offset(&self.g).0 + span_from)
    }

    /// The byte range within the cluster that the write must produce: the
    /// whole cluster without subclusters; with them, the touched
    /// subclusters plus, when moving to a new host cluster, every
    /// subcluster that held data in the old one.
    fn alloc_span(&self, a: &Alloc, from: u64, to: u64) -> (u64, u64) {
        let cs = self.g.cluster_size;
        if !self.g.extended {
            return (0, cs);
        }
        let carried = self.carried_subs(a);
        let mask = self.sub_mask(from, to) | carried;
        let first = mask.trailing_zeros();
        let last = 31 - mask.leading_zeros();
        let mut span = (u64::from(first) * self.g.sub_size, u64::from(last + 1) * self.g.sub_size);
        if carried == 0 {
            // An edge subcluster already allocated in this host cluster
            // holds its bytes there: copying them around the write would
            // put back old bytes over an in-place write into them, which
            // does not wait for this cluster (found by the torture test).
            let alloc = a.old.bitmap.alloc();
            if alloc & (1 << first) != 0 {
                span.0 = from;
            }
            if alloc & (1 << last) != 0 {
                span.1 = to;
            }
        }
        span
    }

    /// Subclusters whose old data must move to the new host cluster.
    fn carried_subs(&self, a: &Alloc) -> u32 {
        if a.old.is_compressed() {
            ALL_SUBS
        } else if a.old.host_offset() != a.host.0 && a.old.host_offset() != 0 {
            a.old.bitmap.alloc()
        } else {
            0
        }
    }

    /// Whether the old content reads as zeros everywhere (so a fresh
    /// cluster needs no copy).
    fn old_is_zero(&self, old: L2Entry) -> bool {
        if old.is_compressed() {
            return false;
        }
        if self.g.extended {
            // Allocated subclusters hold data; unallocated ones read the
            // backing file.
            old.bitmap.alloc() == 0 && (self.backing.is_none() || old.bitmap.zero() == u32::MAX)
        } else {
            match self.g.l2.classify(old, 0, self.g.v3) {
                ClusterKind::Zero(_) => true,
                ClusterKind::Unallocated => self.backing.is_none(),
                _ => false,
            }
        }
    }

    /// Fills `dst` with the old content of the cluster from offset `at`.
    fn fill_old(&self, dst: &mut [u8], a: &Alloc, at: u64) -> Result<()> {
        let guest = a.gc.offset(&self.g).0;
        if !self.g.extended || a.old.is_compressed() {
            let kind = self.g.l2.classify(a.old, 0, self.g.v3);
            return self.read_current(dst, guest + at, kind, at);
        }
        let mut done = 0usize;
        while done < dst.len() {
            let off = at + done as u64;
            let sub = (off / self.g.sub_size) as u32;
            let n = ((u64::from(sub) + 1) * self.g.sub_size - off).min((dst.len() - done) as u64) as usize;
            let kind = self.g.l2.classify(a.old, sub, self.g.v3);
            self.read_current(&mut dst[done..done + n], guest + off, kind, off)?;
            done += n;
        }
        Ok(())
    }

    /// Points the L2 entries of a batch's allocated clusters at their new
    /// data, which has been written. Should one fail (its L2 table was
    /// evicted meanwhile and cannot be read back), the clusters before it
    /// stay committed and the rest are given back: the request fails,
    /// the image stays consistent.
    fn commit_allocs(&self, m: &mut Meta, steps: Vec<(u64, u64, Step)>) -> Result<()> {
        let mut steps = steps.into_iter();
        while let Some((pos, len, s)) = steps.next() {
            let Step::Alloc(a) = s else { continue };
            if let Err(e) = self.commit_alloc(m, pos, len, &a) {
                self.abandon_alloc(m, &a);
                self.abandon(m, steps);
                return Err(e);
            }
        }
        Ok(())
    }

    fn commit_alloc(&self, m: &mut Meta, pos: u64, len: u64, a: &Alloc) -> Result<()> {
        let from = pos % self.g.cluster_size;
        let entry = if self.g.extended {
            let written = self.sub_mask(from, from + len) | self.carried_subs(a);
            let (alloc, zero) = if a.old.is_compressed() {
                (ALL_SUBS, 0)
            } else {
                (a.old.bitmap.alloc() | written, a.old.bitmap.zero() & !written)
            };
            L2Entry { word: a.host.0 | COPIED, bitmap: SubclusterBitmap::from_parts(alloc, zero) }
        } else {
            L2Entry::normal(a.host.0, true)
        };
        self.set_l2_entry(m, a.gc, entry)?;
        if self.needs_cow_sync(a, from, from + len) {
            m.cow_unsynced = true;
        }
        self.release_entry(m, a.old, Some(a.host.0), false);
        self.release_inflight(m, a.gc);
        Ok(())
    }

    /// Waits until guest cluster `gc` is not in flight; returns the guard.
    fn wait_cluster<'a>(&'a self, mut m: MetaGuard<'a>, gc: GuestCluster) -> Result<MetaGuard<'a>> {
        while self.is_inflight(&m, gc) {
            m = self.wait_for_cluster(m, gc);
        }
        self.check_writable(&m)?;
        Ok(m)
    }

    /// Makes `[offset, offset + len)` read as zeros.
    pub(crate) fn zero_range(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        check_range(offset, len, self.len())?;
        self.check_writable(&self.lock())?;
        if len == 0 {
            return Ok(());
        }
        let gran = self.g.sub_size;
        let end = offset + len;
        let a = offset.div_ceil(gran) * gran;
        // The last (sub)cluster ends the disk even when the disk is not a
        // multiple of it, so a range ending there ends aligned where zero
        // (sub)clusters exist to mark it (v3 in the image itself). Below,
        // whatever falls back to zero data stops at the disk's end.
        let to_end = end == self.len() && self.g.v3 && !self.g.external_data;
        let b = if to_end { end.div_ceil(gran) * gran } else { end / gran * gran };
        if a > b {
            self.zero_partial(b, offset, end)?;
        } else {
            if offset < a {
                self.zero_partial(a - gran, offset, a.min(end))?;
            }
            if a < b && self.partly_compressed(a, b)? {
                // QEMU cannot zero part of a compressed cluster and then
                // writes the whole aligned request as zero data.
                self.write_explicit_zeros(a, b.min(end) - a)?;
            } else if a < b {
                self.zero_aligned(a, b, may_unmap)?;
            }
            if b < end {
                self.zero_partial(b, b, end)?;
            }
        }
        if self.writethrough {
            self.flush_all()?;
        }
        Ok(())
    }

    /// Zeroes `[from, to)`, part of the (sub)cluster at `start`. As QEMU
    /// does, the whole (sub)cluster becomes a zero one, instead of taking
    /// zero data, when the rest of it reads as zeros through the backing
    /// chain (by block status, not content) and this layer leaves it
    /// unallocated or zero, which is checked again under the lock: a
    /// write landing in the meantime keeps its data.
    fn zero_partial(&self, start: u64, from: u64, to: u64) -> Result<()> {
        let cs = self.g.cluster_size;
        let stop = (start + self.g.sub_size).min(self.len());
        if self.g.v3 && !self.g.external_data && self.reads_zero(start, from)? && self.reads_zero(to, stop)? {
            let gc = GuestOffset(start).cluster(&self.g);
            let base = gc.offset(&self.g).0;
            let explicit = {
                let mut m = self.wait_cluster(self.lock(), gc)?;
                let e = self.l2_entry(&mut m, gc)?;
                let sub = ((start - base) / self.g.sub_size) as u32;
                match self.classify(e, sub, gc)? {
                    ClusterKind::Unallocated | ClusterKind::Zero(_) => {
                        let to_in = (start - base + self.g.sub_size).min(cs);
                        self.zero_cluster(&mut m, gc, start - base, to_in, false)?
                    }
                    _ => true,
                }
            };
            if !explicit {
                return Ok(());
            }
        }
        self.write_explicit_zeros(from, to - from)
    }

    /// Whether the first or last cluster of `[a, b)` is compressed here
    /// and only partly covered.
    fn partly_compressed(&self, a: u64, b: u64) -> Result<bool> {
        let cs = self.g.cluster_size;
        let partial_head = !a.is_multiple_of(cs) || b - a < cs;
        if partial_head && self.status(a, 1)?.compressed {
            return Ok(true);
        }
        Ok(!b.is_multiple_of(cs) && b - 1 < self.len() && self.status(b - 1, 1)?.compressed)
    }

    /// Whether `[from, to)` reads as zeros by block status through the
    /// backing chain.
    fn reads_zero(&self, mut from: u64, to: u64) -> Result<bool> {
        while from < to {
            let st = crate::device::chain_status(self, from, to - from)?;
            if st.allocated && !st.zero {
                return Ok(false);
            }
            from += st.length.max(1);
        }
        Ok(true)
    }

    pub(super) fn write_explicit_zeros(&self, mut offset: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let end = offset + len;
        while offset < end {
            let n = CHUNK.min(end - offset);
            self.write(&zeros[..n as usize], offset)?;
            offset += n;
        }
        Ok(())
    }

    /// Zeroes granularity-aligned `[a, b)` through metadata where the
    /// format allows, cluster by cluster.
    pub(super) fn zero_aligned(&self, a: u64, b: u64, may_unmap: bool) -> Result<()> {
        let cs = self.g.cluster_size;
        let mut pos = a;
        while pos < b {
            let gc = GuestOffset(pos).cluster(&self.g);
            let start = gc.offset(&self.g).0;
            let from = pos - start;
            let to = (b - start).min(cs);
            // A failure changes nothing (zero_cluster changes the entry
            // last, and making its table writable is all or nothing).
            let explicit = {
                let mut m = self.wait_cluster(self.lock(), gc)?;
                self.zero_cluster(&mut m, gc, from, to, may_unmap)?
            };
            // `b` may be rounded up past an unaligned end of disk.
            let stop = (start + to).min(self.len());
            if explicit && start + from < stop {
                self.write_explicit_zeros(start + from, stop - start - from)?;
            }
            pos = start + to;
        }
        if self.g.data_raw {
            // The raw data file must read as the guest sees the disk.
            let stop = b.min(self.len());
            self.data.punch_hole(a, stop - a).map_err(|e| Error::io("zeroing the raw data file", e))?;
        }
        Ok(())
    }

    /// Zeroes `[from, to)` of one cluster through its L2 entry. Returns
    /// true when this needs explicit zero data instead.
    fn zero_cluster(&self, m: &mut Meta, gc: GuestCluster, from: u64, to: u64, may_unmap: bool) -> Result<bool> {
        let cs = self.g.cluster_size;
        let e = self.l2_entry(m, gc)?;
        self.check_mapped_entry(m, e)?;
        let whole = from == 0 && to == cs;
        if !self.g.v3 {
            // No zero flag in v2: deallocate when nothing shows through,
            // otherwise write zeros.
            let kind = self.classify(e, 0, gc)?;
            if self.backing.is_some() {
                return Ok(true);
            }
            return match kind {
                ClusterKind::Unallocated => Ok(false),
                _ if may_unmap && whole && !self.g.external_data => {
                    self.set_l2_entry(m, gc, L2Entry::default())?;
                    self.release_entry(m, e, None, true);
                    Ok(false)
                }
                _ => Ok(true),
            };
        }
        if self.g.extended {
            let mask = self.sub_mask(from, to);
            if e.is_compressed() {
                return Ok(!whole).and_then(|explicit| {
                    if !explicit {
                        self.set_l2_entry(
                            m,
                            gc,
                            L2Entry { word: 0, bitmap: SubclusterBitmap::from_parts(0, ALL_SUBS) },
                        )?;
                        self.release_entry(m, e, None, may_unmap);
                    }
                    Ok(explicit)
                });
            }
            let host = e.host_offset();
            let shared = host != 0 && !e.copied();
            if whole && (may_unmap || shared || host == 0) {
                self.set_l2_entry(m, gc, L2Entry { word: 0, bitmap: SubclusterBitmap::from_parts(0, ALL_SUBS) })?;
                self.release_entry(m, e, None, may_unmap);
                return Ok(false);
            }
            if shared {
                return Ok(true);
            }
            let bm = SubclusterBitmap::from_parts(e.bitmap.alloc() & !mask, e.bitmap.zero() | mask);
            self.set_l2_entry(m, gc, L2Entry { word: e.word, bitmap: bm })?;
            return Ok(false);
        }
        if !whole {
            return Ok(true);
        }
        let kind = self.classify(e, 0, gc)?;
        let keep = !may_unmap && e.copied() && !e.is_compressed() && e.host_offset() != 0;
        let new = match kind {
            ClusterKind::Zero(None) => return Ok(false),
            _ if keep => L2Entry { word: e.word | ZERO, bitmap: SubclusterBitmap(0) },
            _ => L2Entry { word: ZERO, bitmap: SubclusterBitmap(0) },
        };
        if new.word == e.word && !e.is_compressed() {
            // Already a preallocated zero cluster: QEMU leaves the table
            // untouched (no L2 update), and so must a blkdebug rule see it.
            return Ok(false);
        }
        self.set_l2_entry(m, gc, new)?;
        if !keep {
            self.release_entry(m, e, None, may_unmap);
        }
        Ok(false)
    }

    /// Discards whole clusters in `[offset, offset + len)`; partial
    /// clusters are left alone, as QEMU does.
    pub(crate) fn discard_range(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.len())?;
        self.check_writable(&self.lock())?;
        let cs = self.g.cluster_size;
        let first = offset.div_ceil(cs);
        let end = offset + len;
        // The last cluster may be partial only at the end of the disk.
        let last = if end == self.len() { end.div_ceil(cs) } else { end / cs };
        for gc in (first..last).map(GuestCluster) {
            // As for zeroing, a failure changes nothing.
            let mut m = self.wait_cluster(self.lock(), gc)?;
            self.discard_cluster(&mut m, gc)?;
        }
        if self.writethrough {
            self.flush_all()?;
        }
        Ok(())
    }

    fn discard_cluster(&self, m: &mut Meta, gc: GuestCluster) -> Result<()> {
        if !self.g.v3 && self.backing.is_some() {
            // v2 cannot mark a cluster as zero, and deallocating it would
            // make backing data reappear: QEMU leaves the data, so do we.
            return Ok(());
        }
        let e = self.l2_entry(m, gc)?;
        self.check_mapped_entry(m, e)?;
        let allocated = e.is_compressed() || e.host_offset() != 0;
        let plain_zero = !self.g.extended && self.g.v3 && e.word & ZERO != 0 && !allocated;
        let unallocated = e.word == 0 && e.bitmap.0 == 0;
        if !allocated && (unallocated || plain_zero) && self.backing.is_none() {
            return Ok(());
        }
        if !allocated && plain_zero {
            return Ok(());
        }
        let new = if self.backing.is_some() || allocated {
            if self.g.extended {
                L2Entry { word: 0, bitmap: SubclusterBitmap::from_parts(0, ALL_SUBS) }
            } else if self.g.v3 {
                L2Entry { word: ZERO, bitmap: SubclusterBitmap(0) }
            } else {
                L2Entry::default()
            }
        } else {
            L2Entry::default()
        };
        if new == e {
            return Ok(());
        }
        self.set_l2_entry(m, gc, new)?;
        if self.g.external_data {
            let cs = self.g.cluster_size;
            self.data
                .punch_hole(gc.offset(&self.g).0, cs)
                .map_err(|err| Error::io("discarding in the data file", err))?;
        } else {
            self.release_entry(m, e, None, true);
        }
        Ok(())
    }
}
