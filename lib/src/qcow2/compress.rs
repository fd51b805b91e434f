//! Compressed cluster writes (convert -c).
//!
//! Compressed data is packed densely: each cluster's compressed bytes
//! follow the previous ones in the same host cluster when they fit, and
//! every compressed cluster adds one reference to each host cluster its
//! bytes touch (QEMU's refcount rule for compressed clusters).

use super::Qcow2;
use crate::device::{check_range, BlockDevice};
use crate::format::compressed::{compress, CompressedDescriptor};
use crate::format::L2Entry;
use crate::{Error, Result};

impl Qcow2 {
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
        let mut cursor = m.compress_cursor;
        if cursor & (cs - 1) != 0 {
            // A freed cluster may be reused for anything; a full refcount
            // (refcount_bits=1 holds only one user) cannot take one more.
            let rc = self.refcount(&mut m, cursor / cs)?;
            if rc == 0 || rc >= self.g.rc.max() {
                cursor = 0;
            }
        }
        let r = (|| {
            // The refcount is raised (in the cache) here, before the L2
            // entry points at the bytes; flush writes refcounts first.
            let at = self.alloc_bytes(&mut m, &mut cursor, len)?;
            m.compress_cursor = cursor;
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
