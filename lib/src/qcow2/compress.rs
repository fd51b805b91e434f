//! Compressed cluster writes (convert -c).
//!
//! Compressed data is packed densely: each cluster's compressed bytes
//! follow the previous ones in the same host cluster when they fit, and
//! every compressed cluster adds one reference to each host cluster its
//! bytes touch (QEMU's refcount rule for compressed clusters).

use super::state::Meta;
use super::units::{GuestOffset, HostCluster, HostOffset};
use super::Qcow2;
use crate::device::{check_range, BlockDevice};
use crate::format::compressed::{compress, CompressedDescriptor};
use crate::format::L2Entry;
use crate::{Error, Result};

impl Qcow2 {
    /// Finds room for `len` bytes of compressed data, right after the
    /// previous compressed cluster when possible, straddling into the next
    /// host cluster when that one is free (as QEMU packs). Every host
    /// cluster the bytes touch gets one more reference; the refcounts are
    /// raised (in the cache) here, before any L2 entry points at the
    /// bytes, and flush writes refcounts first. Returns the offset and
    /// whether the first host cluster was already in use (shared with the
    /// previous compressed cluster).
    fn alloc_compressed(&self, m: &mut Meta, len: u64) -> Result<(HostOffset, bool)> {
        let cur = m.alloc.compress_cursor();
        if !cur.is_aligned(&self.g) {
            let first = cur.cluster(&self.g);
            let rc = self.refcount(m, first)?;
            // A freed cluster may be reused for anything; a full refcount
            // (refcount_bits=1 holds one user) takes no more.
            if rc > 0 && rc < self.g.rc.max() {
                let last = cur.add(len - 1).cluster(&self.g);
                let mut free = true;
                for c in first.0 + 1..=last.0 {
                    let c = HostCluster(c);
                    if self.refcount(m, c)? != 0 || m.overlap.contains(c) {
                        free = false;
                        break;
                    }
                }
                if free {
                    // Claim the clusters past the allocator's end first, so
                    // a refcount block allocated below lands after them.
                    let end = last.add(1).offset(&self.g);
                    self.reserve_to(m, end)?;
                    m.alloc.extend_end(end);
                    self.claim_packed(m, first, last)?;
                    m.alloc.set_compress_cursor(cur.add(len));
                    return Ok((cur, true));
                }
            }
        }
        let start = self.alloc_contiguous(m, len.div_ceil(self.g.cluster_size))?;
        m.alloc.set_compress_cursor(start.add(len));
        Ok((start, false))
    }

    /// Takes one more reference to `first` and the free clusters up to
    /// `last`; all or nothing.
    fn claim_packed(&self, m: &mut Meta, first: HostCluster, last: HostCluster) -> Result<()> {
        self.adjust_refcount(m, first, 1)?;
        for c in first.0 + 1..=last.0 {
            if let Err(e) = self.set_refcount(m, HostCluster(c), 1) {
                for d in first.0 + 1..c {
                    let _ = self.set_refcount(m, HostCluster(d), 0);
                }
                let _ = self.adjust_refcount(m, first, -1);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Gives back what `alloc_compressed` took for `len` bytes at `at`
    /// (nothing points there yet), and starts the next compressed cluster
    /// in a new host cluster rather than after bytes never written. A
    /// refcount that cannot be lowered again stays a leak, never damage.
    fn undo_compressed_alloc(&self, m: &mut Meta, at: HostOffset, len: u64, shared_first: bool) {
        let first = at.cluster(&self.g);
        for c in first.0..=at.add(len - 1).cluster(&self.g).0 {
            let c = HostCluster(c);
            if c == first && shared_first {
                if self.refcount(m, c).is_ok_and(|rc| rc > 1) {
                    let _ = self.adjust_refcount(m, c, -1);
                }
            } else if self.refcount(m, c).is_ok_and(|rc| rc == 1) {
                let _ = self.set_refcount(m, c, 0);
            }
        }
        m.alloc.reset_compress_cursor();
    }

    /// Writes one whole guest cluster compressed.
    ///
    /// `guest_offset` must be cluster aligned and `data` exactly one
    /// cluster long (for the last, partial cluster of a disk, pad with
    /// zeros: bytes past the end of the disk are dropped). Data that does
    /// not shrink when compressed is written as a normal cluster. The
    /// image's compression type (deflate with QEMU's 4 KiB window, or
    /// zstd) is used. Not available with an external data file.
    pub fn write_compressed(&self, guest_offset: u64, data: &[u8]) -> Result<()> {
        let cs = self.g.cluster_size;
        if guest_offset & (cs - 1) != 0 || data.len() as u64 != cs {
            return Err(Error::invalid("compressed writes must cover exactly one aligned cluster"));
        }
        let size = self.len();
        check_range(guest_offset, 1, size)?;
        if self.g.external_data {
            return Err(Error::unsupported("compressed writes to an image with an external data file"));
        }
        let Some(packed) = compress(self.g.compression, data)? else {
            let n = (size - guest_offset).min(cs) as usize;
            return self.write_at(&data[..n], guest_offset);
        };
        let gc = GuestOffset(guest_offset).cluster(&self.g);
        let mut m = self.lock();
        self.check_writable(&m)?;
        while self.is_inflight(&m, gc) {
            m = self.wait_for_cluster(m, gc);
            self.check_writable(&m)?;
        }
        let len = packed.len() as u64;
        // The L2 table first: once the space is taken, only the data write
        // and the entry change are left, and a failure of either gives the
        // space back, so a failed compressed write changes nothing.
        let (l1i, _) = gc.split(&self.g);
        self.writable_l2(&mut m, l1i)?;
        let (at, shared_first) = self.alloc_compressed(&mut m, len)?;
        let r = (|| {
            let d = CompressedDescriptor::for_data(at.0, len);
            for c in d.offset / cs..=(d.offset + d.byte_len() - 1) / cs {
                self.check_overlap(&mut m, HostCluster(c).offset(&self.g), None)?;
            }
            // Data before the entry that makes it visible.
            self.file.write_at(&packed, at.0).map_err(|e| Error::io("writing compressed cluster", e))?;
            let old = self.l2_entry(&mut m, gc)?;
            self.set_l2_entry(&mut m, gc, L2Entry::compressed(d, self.g.cluster_bits))?;
            self.release_entry(&mut m, old, None, false);
            Ok(())
        })();
        if let Err(e) = r {
            self.undo_compressed_alloc(&mut m, at, len, shared_first);
            return Err(e);
        }
        drop(m);
        if self.writethrough {
            self.flush_all()?;
        }
        Ok(())
    }
}
