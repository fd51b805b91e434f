//! Writing metadata back, in the order the crash-safety contract needs.
//!
//! ```text
//!  1. refcount blocks (then, if the refcount table changed: fsync, table)
//!     -- fsync --   a cluster's refcount is on disk before anything points at
//!                   it, and so is data copied around a write into a newly
//!                   mapped cluster (else a crash could show the cluster's
//!                   stale content where flushed data was)
//!  2. L2 tables  (the data they point to was written before they changed)
//!     -- fsync --   an L2 table is on disk before the L1 entry pointing at it
//!  3. L1 table, header
//!     -- fsync --
//!  4. pending refcount decrements applied (no on-disk entry points at
//!     those clusters any more); they reach disk with the next write-back
//! ```
//! With lazy refcounts, step 1 is replaced by setting the dirty bit (once,
//! durably) and refcount blocks wait for a clean close. A stage with
//! nothing to write costs no fsync.

use super::state::{Meta, MetaKind};
use super::units::HostOffset;
use super::Qcow2;
use crate::format::be::encode_u64_table;
use crate::format::{Compatible, Incompatible};
use crate::Result;

impl Qcow2 {
    pub(crate) fn lazy_configured(&self, m: &Meta) -> bool {
        let bit = m.hc.header.compatible_features & Compatible::LAZY_REFCOUNTS != 0;
        self.g.v3 && self.lazy_refcounts.unwrap_or(bit)
    }

    /// Sets the dirty bit durably before the first write that relies on
    /// it (refcount updates skipped).
    fn ensure_dirty_bit(&self, m: &mut Meta) -> Result<()> {
        if m.refs.lazy_active() {
            return Ok(());
        }
        m.hc.header.incompatible_features |= Incompatible::DIRTY;
        self.journal_dirty_epoch(m);
        if let Err(e) = self.write_header(m) {
            // Not in effect: a later header write must not carry the bit
            // without lazy_active (a clean close would leave it set).
            m.hc.header.incompatible_features &= !Incompatible::DIRTY;
            return Err(e);
        }
        self.sync("flushing dirty bit")?;
        m.refs.set_lazy_active(true);
        Ok(())
    }

    /// Writes dirty refcount blocks and the changed part of the refcount
    /// table. Returns whether anything was written.
    pub(crate) fn write_refcounts(&self, m: &mut Meta) -> Result<bool> {
        let mut wrote = false;
        for (off, a, b) in m.refs.blocks().dirty_ranges() {
            let data = m.refs.blocks().peek(off).map(|d| d[a..b].to_vec()).unwrap_or_default();
            self.write_meta(m, off.add(a as u64), &data, MetaKind::RefcountBlock)?;
            m.refs.blocks_mut().mark_clean(off);
            wrote = true;
        }
        if let Some((a, b)) = m.refs.table_dirty() {
            // The blocks must be durable before the table points at them,
            // those an eviction wrote earlier too.
            if wrote || m.refs.blocks_unsynced() {
                self.sync_stage(m, "flushing refcount blocks")?;
            }
            let bytes = encode_u64_table(&m.refs.table()[a..=b]);
            let off = HostOffset(m.hc.header.refcount_table_offset + a as u64 * 8);
            self.write_meta(m, off, &bytes, MetaKind::RefcountTable)?;
            m.refs.table_written();
            wrote = true;
        }
        Ok(wrote)
    }

    /// An fsync between stages; it also covers refcount blocks written
    /// early by an eviction.
    fn sync_stage(&self, m: &mut Meta, what: &'static str) -> Result<()> {
        self.sync(what)?;
        m.refs.synced();
        Ok(())
    }

    /// Writes all dirty metadata in contract order (no final fsync when
    /// the last stage wrote nothing; callers that need durability sync).
    /// Returns whether anything was written since the last sync.
    pub(crate) fn write_back(&self, m: &mut Meta) -> Result<bool> {
        self.write_back_inner(m, false)
    }

    pub(crate) fn write_back_inner(&self, m: &mut Meta, force_refcounts: bool) -> Result<bool> {
        let need_l2 = m.map.l2().any_dirty();
        let need_l1 = m.map.l1_dirty().is_some() || m.header_dirty;
        let mut unsynced = false;
        if m.refs.blocks().any_dirty() || m.refs.table_dirty().is_some() || m.journal.has_pending() {
            if self.lazy_configured(m) && !force_refcounts {
                self.ensure_dirty_bit(m)?;
                // The journal's records, synced before the tables below.
                unsynced = self.journal_commit(m)?;
            } else {
                unsynced = self.write_refcounts(m)?;
                m.journal.clean_point();
            }
        }
        if need_l2 {
            if unsynced || m.cow_unsynced || m.refs.blocks_unsynced() {
                self.sync_stage(m, "flushing refcounts and copied data")?;
                m.cow_unsynced = false;
            }
            for (off, a, b) in m.map.l2().dirty_ranges() {
                let data = m.map.l2().peek(off).map(|d| d[a..b].to_vec()).unwrap_or_default();
                self.write_meta(m, off.add(a as u64), &data, MetaKind::ActiveL2)?;
                m.map.l2_mut().mark_clean(off);
            }
            unsynced = true;
        }
        if need_l1 {
            if unsynced || m.refs.blocks_unsynced() {
                self.sync_stage(m, "flushing L2 tables")?;
            }
            if let Some((a, b)) = m.map.l1_dirty() {
                let bytes = encode_u64_table(&m.map.l1()[a..=b]);
                let off = HostOffset(m.hc.header.l1_table_offset + a as u64 * 8);
                self.write_meta(m, off, &bytes, MetaKind::ActiveL1)?;
                m.map.l1_written();
            }
            if m.header_dirty {
                self.write_header(m)?;
            }
            unsynced = true;
        }
        if m.alloc.has_pending() {
            if unsynced {
                self.sync_stage(m, "flushing L1 table")?;
                unsynced = false;
            }
            // Wait for fast-path I/O that looked up a mapping before the
            // frees, so none of it lands in a cluster reused from now on.
            let _gate = self.io_gate.write().unwrap_or_else(|e| e.into_inner());
            self.apply_pending_frees(m)?;
        }
        Ok(unsynced || m.refs.blocks_unsynced())
    }

    /// `BlockDevice::flush`: all metadata in order, then fsync.
    ///
    /// A metadata write that fails leaves its table dirty in the cache and
    /// the flush fails; the next flush writes it again (see "Failures:
    /// what poisons and why" in docs/DESIGN.md for why that keeps the
    /// crash contract). A failed fsync poisons the image (`sync`).
    pub(crate) fn flush_all(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.poison.check()?;
        self.write_back(&mut self.lock())?;
        // The final fsync runs without the metadata lock: in writethrough
        // mode every request flushes, and holding the lock here would
        // serialize all other requests behind the disk.
        self.sync("flushing image")
    }

    /// A clean close: everything written, refcounts included, and the
    /// dirty bit cleared.
    pub(crate) fn close_clean(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut m = self.lock();
        self.poison.check()?;
        // A failure leaves the dirty tables dirty: closing again (or the
        // drop that follows) retries, as a flush would.
        (|| {
            self.close_bitmaps(&mut m)?;
            self.write_back(&mut m)?;
            // Decrements applied by the first pass.
            self.write_back_inner(&mut m, true)?;
            self.trim_reserved(&mut m)?;
            self.sync("flushing image")?;
            if m.refs.lazy_active() {
                m.hc.header.incompatible_features &= !Incompatible::DIRTY;
                self.write_header(&mut m)?;
                self.sync("clearing dirty bit")?;
                m.refs.set_lazy_active(false);
            }
            Ok(())
        })()
    }
}
