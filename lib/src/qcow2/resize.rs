//! Shrinking the virtual size and emptying an image (after commit).
//! Growing lives in `create.rs`.

use super::state::Meta;
use super::units::{GuestCluster, HostCluster, HostOffset};
use super::{metadata_clusters, Preallocation, Qcow2};
use crate::format::l1::L1Entry;
use crate::format::L2Entry;
use crate::{BlockDevice, Error, Result};

impl Qcow2 {
    /// Changes the virtual size: grows, or (only with `allow_shrink`)
    /// shrinks, dropping every cluster past the new end. Sizes must be
    /// multiples of 512, as in QEMU.
    pub fn resize_to(&self, new_size: u64, allow_shrink: bool) -> Result<()> {
        if new_size & 511 != 0 {
            return Err(Error::invalid("The new size must be a multiple of 512"));
        }
        {
            let m = self.lock();
            // v2 snapshot entries cannot record their own disk size.
            if m.hc.header.version < 3 && !m.snapshots.is_empty() {
                return Err(Error::invalid("Can't resize a v2 image which has snapshots"));
            }
        }
        self.resize_bitmaps_check(new_size)?;
        let old = self.len();
        if new_size > old && self.backing.as_ref().is_some_and(|b| b.len() > old) {
            self.grow_over_backing(old, new_size)?;
        } else if new_size >= old {
            self.grow(new_size)?;
        } else if !allow_shrink {
            return Err(Error::invalid("Use the --shrink option to perform a shrink operation."));
        } else {
            self.shrink(new_size)?;
        }
        self.resize_bitmaps(new_size);
        if self.g.external_data {
            // The data file mirrors the guest disk: QEMU resizes it too
            // (after the header, so a crash leaves at most a longer file).
            self.data.set_len(new_size).map_err(|e| Error::io("resizing the data file", e))?;
            self.data.flush().map_err(|e| Error::io("flushing the data file", e))?;
        }
        Ok(())
    }

    /// Grows the virtual size to `new_size` and preallocates the new area
    /// as `qemu-img resize --preallocation=MODE` does: every guest cluster
    /// from the one holding the old end on gets a host cluster (metadata:
    /// left a hole; falloc: its blocks reserved; full: written with
    /// zeros), so writes there later allocate nothing. A partial cluster
    /// at the old end keeps what the guest read there (the backing file's
    /// data, say): it is copied into its new cluster.
    pub fn grow_preallocated(&self, new_size: u64, mode: Preallocation) -> Result<()> {
        let old = self.len();
        if new_size <= old {
            return Err(Error::invalid("Preallocation can only be used for growing images"));
        }
        self.resize_to(new_size, false)?;
        if mode == Preallocation::Off {
            return Ok(());
        }
        let cs = self.g.cluster_size;
        let mut first = old / cs;
        let mut tail = None;
        if !old.is_multiple_of(cs) {
            self.copy_up_cluster(GuestCluster(first))?;
            tail = self.cluster_tail(GuestCluster(first), old % cs)?;
            first += 1;
        }
        // The old end's tail goes into the same reservation as the new
        // clusters when it ends where they start: two reservations may
        // land apart on the host disk, and then converting them on later
        // writes grows the file system's extent tree (iotest 125 sees
        // the file grow).
        self.preallocate_clusters(mode, first, new_size.div_ceil(cs), false, tail)?;
        if let Some((at, len)) = tail {
            self.preallocate_host_range(at, len, mode)?;
        }
        Ok(())
    }

    /// Gives guest cluster `gc` a host cluster holding what the guest
    /// reads there now, unless it has one.
    fn copy_up_cluster(&self, gc: GuestCluster) -> Result<()> {
        let e = {
            let mut m = self.lock();
            self.l2_entry(&mut m, gc)?
        };
        if self.has_host_cluster(e) {
            return Ok(());
        }
        let start = gc.offset(&self.g).0;
        let end = (start + self.g.cluster_size).min(self.len());
        let mut buf = vec![0u8; (end - start) as usize];
        self.read(&mut buf, start)?;
        self.write(&buf, start)
    }

    /// Where the part of guest cluster `gc` from `from` on (past the old
    /// end of the disk) lies in the file, as (offset, length); `None`
    /// when the cluster has no host cluster of its own to preallocate.
    fn cluster_tail(&self, gc: GuestCluster, from: u64) -> Result<Option<(u64, u64)>> {
        let e = {
            let mut m = self.lock();
            self.l2_entry(&mut m, gc)?
        };
        if e.is_compressed() || !self.has_host_cluster(e) {
            return Ok(None);
        }
        Ok(Some((e.host_offset() + from, self.g.cluster_size - from)))
    }

    /// Reserves (falloc) or writes with zeros (full) the host bytes of a
    /// cluster's tail, as the clusters after it: a metadata-preallocated
    /// cluster may be a hole in the file there.
    fn preallocate_host_range(&self, at: u64, len: u64, mode: Preallocation) -> Result<()> {
        let err = |e| Error::io("preallocating", e);
        match mode {
            Preallocation::Falloc => self.data.allocate(at, len).map_err(err)?,
            Preallocation::Full => crate::storage::write_zeros_chunked(&*self.data, at, len).map_err(err)?,
            _ => return Ok(()),
        }
        self.sync("flushing preallocated data")
    }

    /// Whether an L2 entry points at a host cluster (or is compressed
    /// data): preallocation leaves those as they are. With an external
    /// data file, guest cluster 0 lives at host offset 0.
    pub(super) fn has_host_cluster(&self, e: L2Entry) -> bool {
        e.is_compressed() || e.host_offset() != 0 || (self.g.external_data && e.copied())
    }

    /// Grows an image whose backing file reaches past its end: the new
    /// tail must read as zeros, not as the backing file's data there (nor
    /// as what a shrink left in the last cluster), so it is zeroed, as
    /// QEMU does: explicit zeros up to the next (sub)cluster boundary,
    /// zero clusters after. v2 has no zero clusters; QEMU refuses then.
    /// The size switches last, so a crash leaves the old size.
    fn grow_over_backing(&self, old: u64, new_size: u64) -> Result<()> {
        if !self.g.v3 {
            return Err(Error::invalid("Failed to zero out new clusters: Operation not supported"));
        }
        self.grow_l1_and_size(new_size, old)?;
        // The in-memory size reaches the tail so the writes below may;
        // the header keeps the old one until they are durable.
        self.size.store(new_size, std::sync::atomic::Ordering::Release);
        let r = (|| {
            let gran = self.g.sub_size;
            let head_end = old.div_ceil(gran) * gran;
            if head_end > old {
                self.write_explicit_zeros(old, head_end.min(new_size) - old)?;
            }
            if new_size > head_end {
                // The last (sub)cluster may be partial: it ends the disk.
                self.zero_aligned(head_end, new_size.div_ceil(gran) * gran, false)?;
            }
            self.flush_all()
        })();
        if let Err(e) = r {
            self.size.store(old, std::sync::atomic::Ordering::Release);
            return Err(e);
        }
        self.grow(new_size)
    }

    /// Shrinks the virtual size to `new_size`: clusters wholly past the new
    /// end are dropped (L2 tables past it too), the header switched, and
    /// the file truncated after its last used cluster. The L1 table keeps
    /// its size (entries past the end are zero), as QEMU does.
    pub fn shrink(&self, new_size: u64) -> Result<()> {
        let mut m = self.quiesce()?;
        if new_size > m.hc.header.size {
            return Err(Error::invalid("shrink cannot make an image larger"));
        }
        let r = self.shrink_locked(&mut m, new_size);
        self.fail(&mut m, r)
    }

    fn shrink_locked(&self, m: &mut Meta, new_size: u64) -> Result<()> {
        let cs = self.g.cluster_size;
        let first = new_size.div_ceil(cs);
        let end = m.map.l1().len() as u64 * self.g.l2_entries;
        // Dropped entries are on disk before their clusters are freed
        // (write_back defers the frees); the header shrinks after that, so
        // a crash in between leaves a disk whose tail reads as unallocated.
        self.drop_clusters(m, first, end)?;
        self.write_back_durable(m)?;
        self.drop_empty_refblocks(m)?;
        m.hc.header.size = new_size;
        self.write_header(m)?;
        self.sync("flushing header")?;
        self.size.store(new_size, std::sync::atomic::Ordering::Release);
        Self::drop_l2_cache(m);
        m.overlap = metadata_clusters(&self.g, m);
        self.truncate_tail(m)
    }

    /// Cuts the file after its last cluster with a nonzero refcount.
    fn truncate_tail(&self, m: &mut Meta) -> Result<()> {
        let cs = self.g.cluster_size;
        let mut last = m.alloc.file_end().cluster(&self.g).0;
        while last > 1 && self.refcount(m, HostCluster(last - 1))? == 0 && !m.overlap.contains(HostCluster(last - 1)) {
            last -= 1;
        }
        let len = last * cs;
        let cur = self.file.len().map_err(|e| Error::io("reading image size", e))?;
        if len < cur {
            self.file.set_len(len).map_err(|e| Error::io("truncating image", e))?;
            self.sync("flushing truncation")?;
        }
        m.alloc.truncate_end(HostOffset(len));
        m.alloc.note_free(HostCluster(last));
        Ok(())
    }

    /// Makes every cluster of the image unallocated (reads fall through to
    /// the backing file), freeing data clusters and L2 tables: what commit
    /// does to the overlay it committed. Snapshots keep their data.
    pub fn make_empty(&self) -> Result<()> {
        let mut m = self.quiesce()?;
        let r = (|| {
            let end = m.map.l1().len() as u64 * self.g.l2_entries;
            self.drop_clusters(&mut m, 0, end)?;
            self.write_back_durable(&mut m)?;
            Self::drop_l2_cache(&mut m);
            m.overlap = metadata_clusters(&self.g, &m);
            Ok(())
        })();
        self.fail(&mut m, r)
    }

    /// Sets guest clusters `[first, end)` unallocated, dropping whole L2
    /// tables when their whole range goes. Frees are deferred (see
    /// `alloc.rs`): each dropped reference is released only once the
    /// entry is gone from disk.
    pub(crate) fn drop_clusters(&self, m: &mut Meta, first: u64, end: u64) -> Result<()> {
        let n = self.g.l2_entries;
        m.alloc.reset_compress_cursor();
        for l1i in (first / n) as usize..(end.div_ceil(n) as usize).min(m.map.l1().len()) {
            let off = L1Entry(m.map.l1()[l1i]).l2_offset();
            if off == 0 {
                continue;
            }
            let t_first = l1i as u64 * n;
            if first <= t_first && end >= t_first + n {
                let t = self.l2_table(m, HostOffset(off))?;
                // Every reference this L1 entry carried goes: the table's
                // and, through it, each cluster's.
                m.map.set_l1(l1i, 0);
                for i in 0..n as usize {
                    let e = self.g.l2.get(&t, i);
                    self.release_entry(m, e, None, false);
                }
                self.free_later(m, HostOffset(off), false);
                continue;
            }
            for gc in first.max(t_first)..end.min(t_first + n) {
                let e = self.l2_entry(m, GuestCluster(gc))?;
                if e == L2Entry::default() {
                    continue;
                }
                self.set_l2_entry(m, GuestCluster(gc), L2Entry::default())?;
                self.release_entry(m, e, None, false);
            }
        }
        Ok(())
    }
}
