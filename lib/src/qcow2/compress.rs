//! Compressed cluster writes (convert -c).
//!
//! Compressed data is packed densely: each cluster's compressed bytes
//! follow the previous ones in the same host cluster when they fit, and
//! every compressed cluster adds one reference to each host cluster its
//! bytes touch (QEMU's refcount rule for compressed clusters).

use super::state::Meta;
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
    /// bytes, and flush writes refcounts first.
    fn alloc_compressed(&self, m: &mut Meta, len: u64) -> Result<u64> {
        let cs = self.g.cluster_size;
        let cur = m.compress_cursor;
        if cur & (cs - 1) != 0 {
            let first = cur / cs;
            let rc = self.refcount(m, first)?;
            // A freed cluster may be reused for anything; a full refcount
            // (refcount_bits=1 holds one user) takes no more.
            if rc > 0 && rc < self.g.rc.max() {
                let last = (cur + len - 1) / cs;
                let mut free = true;
                for c in first + 1..=last {
                    if self.refcount(m, c)? != 0 || m.meta_clusters.contains_key(&c) {
                        free = false;
                        break;
                    }
                }
                if free {
                    // Claim the clusters past the allocator's end first, so
                    // a refcount block allocated below lands after them.
                    m.file_end = m.file_end.max((last + 1) * cs);
                    self.adjust_refcount(m, first, 1)?;
                    for c in first + 1..=last {
                        self.set_refcount(m, c, 1)?;
                    }
                    m.compress_cursor = cur + len;
                    return Ok(cur);
                }
            }
        }
        let start = self.alloc_contiguous(m, len.div_ceil(cs))?;
        m.compress_cursor = start + len;
        Ok(start)
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
        let gc = guest_offset / cs;
        let mut m = self.lock();
        self.check_writable(&m)?;
        while m.inflight.contains(&gc) {
            m = self.inflight_done.wait(m).unwrap_or_else(|e| e.into_inner());
            self.check_writable(&m)?;
        }
        let len = packed.len() as u64;
        let r = (|| {
            let at = self.alloc_compressed(&mut m, len)?;
            let d = CompressedDescriptor::for_data(at, len);
            for c in d.offset / cs..=(d.offset + d.byte_len() - 1) / cs {
                self.check_overlap(&mut m, c * cs, None)?;
            }
            // Data before the entry that makes it visible.
            self.file.write_at(&packed, at).map_err(|e| Error::io("writing compressed cluster", e))?;
            let old = self.l2_entry(&mut m, gc)?;
            self.set_l2_entry(&mut m, gc, L2Entry::compressed(d, self.g.cluster_bits))?;
            self.release_entry(&mut m, old, None, false);
            Ok(())
        })();
        if let Err(e) = &r {
            self.poison(&mut m, e);
            return r;
        }
        drop(m);
        if self.writethrough {
            self.flush_all()?;
        }
        Ok(())
    }
}
