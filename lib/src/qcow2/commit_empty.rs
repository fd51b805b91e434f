//! Commit's emptying of the top image, the way qemu-img commit empties
//! it: where the whole file can be reset, it is reset to a header, a
//! one-cluster refcount table, one refcount block and a zeroed L1 table,
//! step by step with QEMU's blkdebug events in between. So an error
//! injected at any of those events (iotest 098) leaves the file as QEMU
//! leaves it, and the next writable open repairs it with the same words.
//!
//! The steps, each writing straight to the file (the caches were written
//! back first and are not used again):
//!
//! 1. the dirty bit is set (and the recovery journal's autoclear bit
//!    cleared: the journal knows nothing of what follows, so a repair
//!    after a failure must be the full scan, as QEMU's is);
//! 2. `l1_update`: the L1 table's clusters are zeroed;
//! 3. `empty_image_prepare`: clusters 1 up to 3 + L1 clusters are zeroed;
//! 4. `reftable_load`, `reftable_update`: the header points the L1 table
//!    at cluster 3 and the refcount table (one cluster) at cluster 1;
//! 5. `refblock_alloc`: the refcount table's first entry points at
//!    cluster 2;
//! 6. cluster 2 counts clusters 0 up to 3 + L1 clusters once each, the
//!    file is cut after them and the dirty bit cleared.
//!
//! A failure poisons the handle (the caches no longer describe the file);
//! success closes it: nothing is written through it afterwards.

use super::journal::AUTOCLEAR_JOURNAL;
use super::Qcow2;
use crate::format::Incompatible;
use crate::storage::BlkdebugEvent;
use crate::{Error, Result};

/// Offset in the header of `l1_table_offset` (u64), followed by
/// `refcount_table_offset` (u64) and `refcount_table_clusters` (u32).
const HEADER_L1_OFFSET_AT: u64 = 40;

impl Qcow2 {
    /// Empties the image as commit does (see the module docs). Returns
    /// true when the whole file was reset, which closes the handle; false
    /// when the image has what a reset would lose (snapshots, bitmaps, a
    /// LUKS header, an external data file, or an L1 table too big to be
    /// counted by one refcount block, or it is v2), and was emptied
    /// cluster by cluster instead ([`Qcow2::make_empty`]).
    pub fn empty_for_commit(&self) -> Result<bool> {
        let mut m = self.quiesce()?;
        let cs = self.g.cluster_size;
        let h = &m.hc.header;
        let l1_clusters = (u64::from(h.l1_size) * 8).div_ceil(cs);
        let refblock_entries = cs * 8 / u64::from(h.refcount_bits());
        let resettable = self.g.v3
            && m.snapshots.is_empty()
            && m.hc.extensions.bitmaps.as_ref().is_none_or(|b| b.nb_bitmaps == 0)
            && h.crypt_method != 2
            && !self.g.external_data
            && 3 + l1_clusters <= refblock_entries;
        if !resettable {
            drop(m);
            self.make_empty()?;
            return Ok(false);
        }
        let r = (|| {
            m.hc.header.incompatible_features |= Incompatible::DIRTY;
            m.hc.header.autoclear_features &= !AUTOCLEAR_JOURNAL;
            self.write_header_unchecked(&mut m)?;
            self.sync("marking the image dirty")?;

            let write = |buf: &[u8], at: u64, what: &'static str| -> Result<()> {
                self.file.write_at(buf, at).map_err(|e| Error::io(what, e))
            };
            self.file.debug_event(BlkdebugEvent::L1Update);
            write(&vec![0u8; (l1_clusters * cs) as usize], m.hc.header.l1_table_offset, "zeroing the L1 table")?;

            self.file.debug_event(BlkdebugEvent::EmptyImagePrepare);
            write(&vec![0u8; ((2 + l1_clusters) * cs) as usize], cs, "zeroing the metadata clusters")?;

            self.file.debug_event(BlkdebugEvent::ReftableLoad);
            self.file.debug_event(BlkdebugEvent::ReftableUpdate);
            let mut fields = Vec::with_capacity(20);
            fields.extend_from_slice(&(3 * cs).to_be_bytes());
            fields.extend_from_slice(&cs.to_be_bytes());
            fields.extend_from_slice(&1u32.to_be_bytes());
            write(&fields, HEADER_L1_OFFSET_AT, "writing the new table offsets")?;
            self.sync("flushing the new table offsets")?;
            m.hc.header.l1_table_offset = 3 * cs;
            m.hc.header.refcount_table_offset = cs;
            m.hc.header.refcount_table_clusters = 1;

            self.file.debug_event(BlkdebugEvent::RefblockAlloc);
            write(&(2 * cs).to_be_bytes(), cs, "writing the refcount table")?;
            self.sync("flushing the refcount table")?;

            let bits = u64::from(m.hc.header.refcount_bits());
            let mut block = vec![0u8; cs as usize];
            for i in 0..3 + l1_clusters {
                // Entries under a byte are packed from the low bit up;
                // wider ones are big-endian.
                if bits < 8 {
                    block[(i * bits / 8) as usize] |= 1 << ((i * bits) % 8);
                } else {
                    block[((i + 1) * bits / 8 - 1) as usize] = 1;
                }
            }
            write(&block, 2 * cs, "writing the refcount block")?;
            self.file.set_len((3 + l1_clusters) * cs).map_err(|e| Error::io("truncating the image", e))?;
            self.sync("flushing the emptied image")?;

            m.hc.header.incompatible_features &= !Incompatible::DIRTY;
            self.write_header_unchecked(&mut m)?;
            self.sync("clearing the dirty bit")
        })();
        self.fail(&mut m, r)?;
        // The caches describe the image as it was: the handle ends here.
        self.poison(&Error::invalid("the image was emptied by commit; open it again"));
        Ok(true)
    }
}
