//! Copy-on-read and streaming: bringing backing data into the top image.
//!
//! Both rest on one primitive, *materializing* a guest cluster: while the
//! cluster is marked in flight (so no writer touches it), its current
//! guest-visible content is assembled (backing data for the parts that
//! fall through, the top image's own data or zeros for the rest), written
//! to a newly allocated host cluster, and the L2 entry then points there.
//! Guest-visible content never changes; only where it comes from does.
//!
//! Rules:
//! - Only clusters with at least one (sub)cluster that falls through to
//!   the backing file are materialized; a cluster some writer has in
//!   flight is skipped (its writer decides its content).
//! - Clusters that turn out to be all zeros become zero clusters (v3) and
//!   cost no data; v2 images have no zero flag and store the zeros.
//! - The data reaches the disk before an L2 entry pointing at it does
//!   (`cow_unsynced`, honoured by the flush ordering), so a crash can lose
//!   the copy but never expose a cluster with stale content. The L2
//!   updates themselves are not flushed with the read: losing them loses
//!   only the cache.

use super::state::Meta;
use super::units::{GuestCluster, HostOffset};
use super::Qcow2;
use crate::device::{chain_status, check_range, read_backing, BlockDevice};
use crate::format::l2::{ClusterKind, L2Entry, SubclusterBitmap, COPIED, SUBCLUSTERS, ZERO};
use crate::{Error, Result};

/// Largest range handled under one set of claims.
const BATCH: u64 = 8 << 20;

/// A guest cluster claimed (marked in flight) for materializing.
struct Claim {
    gc: GuestCluster,
    old: L2Entry,
    /// With extended L2 entries, the subclusters the request touches:
    /// only those that fall through are copied, as QEMU copies on read
    /// at subcluster granularity. All ones for whole-cluster copies.
    want: u32,
}

/// How one claimed cluster is stored.
struct Store {
    /// The host cluster its data goes to, and whether it was allocated
    /// for this (and is given back should the store fail).
    host: Option<(HostOffset, bool)>,
    /// Subclusters whose content is written (all ones: the whole cluster).
    write: u32,
    /// Its new L2 entry.
    entry: L2Entry,
}

impl Qcow2 {
    /// Whether any (sub)cluster of entry `e` falls through to the backing file.
    fn falls_through(&self, e: L2Entry) -> bool {
        self.falls_through_in(e, u32::MAX)
    }

    /// Whether any of the subclusters `want` of entry `e` (the whole
    /// cluster without extended L2) falls through to the backing file.
    fn falls_through_in(&self, e: L2Entry, want: u32) -> bool {
        if e.is_compressed() {
            return false;
        }
        if self.g.extended {
            !(e.bitmap.alloc() | e.bitmap.zero()) & want != 0
        } else {
            matches!(self.g.l2.classify(e, 0, self.g.v3), ClusterKind::Unallocated)
        }
    }

    /// The subclusters of guest cluster `gc` that `[from, to)` touches
    /// (all ones without extended L2 entries).
    fn touched_subclusters(&self, gc: u64, from: u64, to: u64) -> u32 {
        let base = gc * self.g.cluster_size;
        self.sub_mask(from.max(base) - base, to.min(base + self.g.cluster_size) - base)
    }

    /// Claims the clusters of `[from, to)` with a (sub)cluster in the range
    /// that falls through, and that no writer has in flight.
    fn claim_range(&self, m: &mut Meta, from: u64, to: u64) -> Result<Vec<Claim>> {
        let cs = self.g.cluster_size;
        let (first, last) = (from / cs, (to - 1) / cs);
        let mut claims = Vec::new();
        for gc in (first..=last).map(GuestCluster) {
            if self.is_inflight(m, gc) {
                continue;
            }
            let e = match self.l2_entry(m, gc) {
                Ok(e) => e,
                Err(err) => {
                    self.unclaim(m, &claims);
                    return Err(err);
                }
            };
            let want = self.touched_subclusters(gc.0, from, to);
            if self.falls_through_in(e, want) {
                self.claim_inflight(m, gc);
                claims.push(Claim { gc, old: e, want });
            }
        }
        Ok(claims)
    }

    fn unclaim(&self, m: &mut Meta, claims: &[Claim]) {
        for c in claims {
            self.release_inflight(m, c.gc);
        }
    }

    /// The guest-visible content of the claimed clusters, one cluster each
    /// (zeros past the end of the disk). Runs of wholly unallocated
    /// clusters are read from the backing file with one request each.
    fn claimed_content(&self, claims: &[Claim]) -> Result<Vec<u8>> {
        let cs = self.g.cluster_size;
        let size = self.len();
        let mut out = vec![0u8; claims.len() * cs as usize];
        let wholly = |e: L2Entry| e.word == 0 && e.bitmap.0 == 0;
        let mut i = 0;
        while i < claims.len() {
            let c = &claims[i];
            let dst_at = i * cs as usize;
            if wholly(c.old) {
                let mut j = i + 1;
                while j < claims.len() && wholly(claims[j].old) && claims[j].gc.0 == claims[j - 1].gc.0 + 1 {
                    j += 1;
                }
                let start = c.gc.offset(&self.g).0;
                let end = (claims[j - 1].gc.offset(&self.g).0 + cs).min(size);
                if end > start {
                    let n = (end - start) as usize;
                    read_backing(self.backing.as_deref(), &mut out[dst_at..dst_at + n], start)?;
                }
                i = j;
                continue;
            }
            // A cluster with parts of its own: subcluster by subcluster.
            let step = if self.g.extended { self.g.sub_size } else { cs };
            let mut off = 0;
            while off < cs && c.gc.offset(&self.g).0 + off < size {
                let sub = if self.g.extended { (off / self.g.sub_size) as u32 } else { 0 };
                let kind = self.classify(c.old, sub, c.gc)?;
                let n = step.min(size - (c.gc.offset(&self.g).0 + off)) as usize;
                let at = dst_at + off as usize;
                self.read_current(&mut out[at..at + n], c.gc.offset(&self.g).0 + off, kind, off)?;
                off += step;
            }
            i += 1;
        }
        Ok(out)
    }

    /// Points the claimed clusters at their content and releases the
    /// claims. Without extended L2 entries a cluster becomes a zero
    /// cluster when it is all zeros (v3), else newly allocated data. With
    /// them, only the wanted subclusters that fall through change: zero
    /// subclusters for all-zero ones, data for the rest, written into the
    /// cluster's own host cluster when it has one not shared with a
    /// snapshot (else into a new one that takes the whole content).
    fn store_claimed(&self, claims: &[Claim], content: &[u8]) -> Result<()> {
        let cs = self.g.cluster_size as usize;
        let mut plans: Vec<Store> = Vec::with_capacity(claims.len());
        {
            let mut m = self.lock();
            if let Err(e) = self.check_writable(&m) {
                self.unclaim(&mut m, claims);
                return Err(e);
            }
            for (i, c) in claims.iter().enumerate() {
                // The L2 table is made writable before anything is
                // allocated or written: the commit then allocates nothing.
                let planned = self
                    .writable_l2(&mut m, c.gc.split(&self.g).0)
                    .and_then(|_| self.plan_store(&mut m, c, &content[i * cs..(i + 1) * cs]));
                match planned {
                    Ok(p) => plans.push(p),
                    Err(e) => {
                        self.drop_new_hosts(&mut m, &plans);
                        self.unclaim(&mut m, claims);
                        return Err(e);
                    }
                }
            }
        }
        let written = self.write_stores(claims, &plans, content);
        let mut m = self.lock();
        if let Err(e) = written {
            self.drop_new_hosts(&mut m, &plans);
            self.unclaim(&mut m, claims);
            return Err(e);
        }
        // Should an entry fail to change (its table was evicted and cannot
        // be read back), the clusters before it stay stored and the rest
        // are given back: only the caching is lost.
        for (k, (c, p)) in claims.iter().zip(&plans).enumerate() {
            if let Err(e) = self.set_l2_entry(&mut m, c.gc, p.entry) {
                self.drop_new_hosts(&mut m, &plans[k..]);
                self.unclaim(&mut m, &claims[k..]);
                return Err(e);
            }
            if p.write != 0 {
                m.cow_unsynced = true;
            }
            // A cluster that had a host cluster of its own and moved to a
            // new one: the old one loses this reference.
            let old_host = HostOffset(c.old.host_offset());
            if old_host.0 != 0 && !self.g.external_data && p.host.is_some_and(|(_, new)| new) {
                self.free_later(&mut m, old_host, false);
            }
            self.release_inflight(&mut m, c.gc);
        }
        Ok(())
    }

    /// Decides where claimed cluster `c`, whose whole guest-visible
    /// content is `content`, is stored; allocates a host cluster if needed.
    fn plan_store(&self, m: &mut Meta, c: &Claim, content: &[u8]) -> Result<Store> {
        let all_zero = |b: &[u8]| b.iter().all(|&x| x == 0);
        let old_host = HostOffset(c.old.host_offset());
        let (write, entry, in_place) = if self.g.extended {
            let sub = self.g.sub_size as usize;
            let take = !(c.old.bitmap.alloc() | c.old.bitmap.zero()) & c.want;
            let zeros = (0..SUBCLUSTERS)
                .filter(|&k| take & (1 << k) != 0 && all_zero(&content[k as usize * sub..(k as usize + 1) * sub]))
                .fold(0u32, |acc, k| acc | (1 << k));
            let data = take & !zeros;
            let alloc = c.old.bitmap.alloc() | data;
            let zero = c.old.bitmap.zero() | zeros;
            // A host cluster shared with a snapshot is not written in
            // place: a new one takes the whole content.
            let in_place = old_host.0 != 0 && (c.old.copied() || self.g.external_data);
            let write = match () {
                _ if data == 0 => 0,
                _ if old_host.0 != 0 && !in_place => alloc,
                _ => data,
            };
            let word = if data == 0 || in_place { c.old.word } else { COPIED };
            (write, L2Entry { word, bitmap: SubclusterBitmap::from_parts(alloc, zero) }, in_place)
        } else if self.g.v3 && all_zero(content) {
            (0, L2Entry { word: ZERO, bitmap: SubclusterBitmap(0) }, false)
        } else {
            (u32::MAX, L2Entry::normal(0, true), false)
        };
        if write == 0 {
            return Ok(Store { host: None, write, entry });
        }
        let host = if in_place {
            (old_host, false)
        } else if self.g.external_data {
            (HostOffset(c.gc.offset(&self.g).0), false)
        } else {
            let h = self.alloc_cluster(m)?;
            if let Err(e) = self.check_overlap(m, h, None) {
                let _ = self.set_refcount(m, h.cluster(&self.g), 0);
                return Err(e);
            }
            (h, true)
        };
        let entry = L2Entry { word: entry.word | host.0 .0, ..entry };
        Ok(Store { host: Some(host), write, entry })
    }

    /// Writes the planned data, outside the metadata lock: whole clusters
    /// in host-contiguous runs, partial ones subcluster run by run.
    fn write_stores(&self, claims: &[Claim], plans: &[Store], content: &[u8]) -> Result<()> {
        let cs = self.g.cluster_size as usize;
        let _gate = self.io_gate.read().unwrap_or_else(|e| e.into_inner());
        let write = |from: usize, to: usize, host: u64, guest: u64| {
            self.data.debug_event(crate::storage::BlkdebugEvent::CorWrite);
            self.write_guest_data(&content[from..to], host, guest)
                .map_err(|e| Error::io("writing copied backing data", e))
        };
        let mut i = 0;
        while i < claims.len() {
            let (Some((h, _)), w) = (plans[i].host, plans[i].write) else {
                i += 1;
                continue;
            };
            let guest = claims[i].gc.offset(&self.g).0;
            if w != u32::MAX {
                let sub = self.g.sub_size as usize;
                let mut k = 0;
                while k < SUBCLUSTERS {
                    if w & (1 << k) == 0 {
                        k += 1;
                        continue;
                    }
                    let start = k;
                    while k < SUBCLUSTERS && w & (1 << k) != 0 {
                        k += 1;
                    }
                    let (a, b) = (start as usize * sub, k as usize * sub);
                    write(i * cs + a, i * cs + b, h.0 + a as u64, guest + a as u64)?;
                }
                i += 1;
                continue;
            }
            let mut j = i + 1;
            // Guest-contiguous too: legacy AES numbers its IVs by guest sector.
            while j < claims.len()
                && plans[j].write == u32::MAX
                && plans[j].host.is_some_and(|(hj, _)| hj == h.add(((j - i) * cs) as u64))
                && claims[j].gc.0 == claims[j - 1].gc.0 + 1
            {
                j += 1;
            }
            write(i * cs, j * cs, h.0, guest)?;
            i = j;
        }
        Ok(())
    }

    /// Gives back clusters allocated for claims that will not be committed.
    fn drop_new_hosts(&self, m: &mut Meta, plans: &[Store]) {
        for (h, new) in plans.iter().filter_map(|p| p.host) {
            if new {
                let _ = self.set_refcount(m, h.cluster(&self.g), 0);
            }
        }
    }

    /// `read_at` with copy-on-read: the parts that fall through to the
    /// backing file are read as whole clusters and also stored in this
    /// image, so the next read of them stays local. A failure to store
    /// them costs only the caching: the read still succeeds.
    pub(crate) fn read_cor(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.len())?;
        // Without a backing file, what reads as unallocated zeros is
        // stored too as zero clusters on v3, as QEMU's copy-on-read does;
        // v2 has no zero clusters, and QEMU leaves such clusters alone.
        if self.read_only || buf.is_empty() || (self.backing.is_none() && !self.g.v3) {
            return self.read(buf, offset);
        }
        let cs = self.g.cluster_size;
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let batch_end = ((pos / cs) * cs + BATCH).min(end);
            let claims = {
                let mut m = self.lock();
                self.claim_range(&mut m, pos, batch_end)?
            };
            let result = self.read_claimed_batch(buf, offset, pos, batch_end, &claims);
            match result {
                Ok(Some(content)) => {
                    // Ignored on purpose: see above.
                    let _ = self.store_claimed(&claims, &content);
                }
                Ok(None) => {}
                Err(e) => {
                    let mut m = self.lock();
                    self.unclaim(&mut m, &claims);
                    return Err(e);
                }
            }
            pos = batch_end;
        }
        Ok(())
    }

    /// Fills `buf` (which starts at guest offset `base`) for `[from, to)`:
    /// unclaimed clusters through the normal read path, claimed ones from
    /// their assembled content, which is returned for storing.
    fn read_claimed_batch(
        &self,
        buf: &mut [u8],
        base: u64,
        from: u64,
        to: u64,
        claims: &[Claim],
    ) -> Result<Option<Vec<u8>>> {
        let cs = self.g.cluster_size;
        if claims.is_empty() {
            self.read(&mut buf[(from - base) as usize..(to - base) as usize], from)?;
            return Ok(None);
        }
        let content = self.claimed_content(claims)?;
        let mut pos = from;
        let mut ci = 0;
        while pos < to {
            let gc = pos / cs;
            while ci < claims.len() && claims[ci].gc.0 < gc {
                ci += 1;
            }
            if ci < claims.len() && claims[ci].gc.0 == gc {
                let n = ((gc + 1) * cs).min(to) - pos;
                let src = ci * cs as usize + (pos % cs) as usize;
                let dst = (pos - base) as usize;
                buf[dst..dst + n as usize].copy_from_slice(&content[src..src + n as usize]);
                pos += n;
            } else {
                // Up to the next claimed cluster (or the end).
                let next = claims.get(ci).map_or(to, |c| (c.gc.offset(&self.g).0).max(pos)).min(to);
                self.read(&mut buf[(pos - base) as usize..(next - base) as usize], pos)?;
                pos = next;
            }
        }
        Ok(Some(content))
    }

    /// Stores into this image the backing data of every cluster touching
    /// `[offset, offset + len)` that still falls through to the backing
    /// file. Returns the bytes of clusters materialized.
    pub fn populate(&self, offset: u64, len: u64) -> Result<u64> {
        check_range(offset, len, self.len())?;
        self.check_writable(&self.lock())?;
        if len == 0 || self.backing.is_none() {
            return Ok(0);
        }
        let cs = self.g.cluster_size;
        let end = offset + len;
        let mut pos = offset;
        let mut stored = 0;
        while pos < end {
            let batch_end = ((pos / cs) * cs + BATCH).min(end);
            let claims = {
                let mut m = self.lock();
                // Whole clusters, whatever part of them the range covers.
                self.claim_range(&mut m, pos / cs * cs, batch_end.div_ceil(cs) * cs)?
            };
            if !claims.is_empty() {
                let content = match self.claimed_content(&claims) {
                    Ok(c) => c,
                    Err(e) => {
                        let mut m = self.lock();
                        self.unclaim(&mut m, &claims);
                        return Err(e);
                    }
                };
                self.store_claimed(&claims, &content)?;
                stored += claims.len() as u64 * cs;
            }
            pos = batch_end;
        }
        Ok(stored)
    }

    /// The first run of clusters in `[pos, end)` with something that falls
    /// through to the backing file, as a guest byte range clipped to
    /// `[pos, end)`. Block status cannot answer this: with extended L2
    /// entries a cluster reports as allocated data even when some of its
    /// subclusters read the backing file.
    fn fall_through_run(&self, pos: u64, end: u64) -> Result<Option<(u64, u64)>> {
        let cs = self.g.cluster_size;
        let mut m = self.lock();
        let mut run: Option<u64> = None;
        let mut gc = pos / cs;
        let end_gc = end.div_ceil(cs);
        while gc < end_gc {
            let (l1i, _) = GuestCluster(gc).split(&self.g);
            let no_table = m.map.l1().get(l1i).is_none_or(|&e| e & crate::format::l1::OFFSET_MASK == 0);
            // A missing L2 table: its whole range falls through at once.
            let (falls, next) = if no_table {
                (true, ((l1i as u64) + 1) * self.g.l2_entries)
            } else {
                (self.falls_through(self.l2_entry(&mut m, GuestCluster(gc))?), gc + 1)
            };
            match (falls, run) {
                (true, None) => run = Some(gc),
                (false, Some(start)) => return Ok(Some(((start * cs).max(pos), (gc * cs).min(end)))),
                _ => {}
            }
            gc = next;
        }
        Ok(run.map(|start| ((start * cs).max(pos), end)))
    }

    /// One step of streaming from guest offset `pos`: skips what this
    /// image already decides and what the backing chain reads as zeros
    /// (both read the same once the backing file is gone), and
    /// materializes backing data otherwise, at most `max` bytes of it.
    /// Skipping may cover more than `max` (up to 64 times as much is
    /// scanned per step) so sparse disks do not cost one step per `max`
    /// bytes. Returns the offset to continue from (always past `pos`) and
    /// the bytes materialized.
    pub fn stream_step(&self, pos: u64, max: u64) -> Result<(u64, u64)> {
        const SCAN_FACTOR: u64 = 64;
        let size = self.len();
        if pos >= size || max == 0 {
            return Ok((size.max(pos + 1), 0));
        }
        let end = pos + max.saturating_mul(SCAN_FACTOR).min(size - pos);
        let Some(backing) = self.backing.as_deref() else {
            return Ok((end, 0));
        };
        let Some((a, b)) = self.fall_through_run(pos, end)? else {
            return Ok((end, 0));
        };
        if a >= backing.len() {
            // Past the end of the backing file everything reads as zeros.
            return Ok((b, 0));
        }
        let n = (b - a).min(backing.len() - a);
        let below = chain_status(backing, a, n)?;
        let n = below.length.clamp(1, n);
        if below.zero && !below.data {
            return Ok((a + n, 0));
        }
        let n = n.min(max);
        let stored = self.populate(a, n)?;
        Ok((a + n, stored))
    }

    /// Makes the image standalone: removes the backing file name (and
    /// format) from the header. Everything is flushed first so no
    /// streamed cluster is still only in memory when the header stops
    /// pointing at the backing file, and the header is flushed after.
    /// The open image keeps its backing device for reads of unallocated
    /// clusters (which, after a complete stream, read zeros there too).
    pub fn detach_backing(&self) -> Result<()> {
        self.flush_all()?;
        self.set_backing(None, None)
    }

    /// Whether reads copy backing data into this image.
    pub fn copy_on_read(&self) -> bool {
        self.copy_on_read
    }
}
