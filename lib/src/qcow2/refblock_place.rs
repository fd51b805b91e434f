//! Where a new refcount block goes when an allocation lands in a range
//! that has none, placed as QEMU places it (so `qemu-img map` gives the
//! same host offsets on both sides).
//!
//! QEMU finds free clusters first, then counts them; when counting meets
//! a cluster without a refcount block it makes the block, takes back
//! the counts it made before that cluster and searches again from the
//! clusters it had found (which usually fit now, the block being after
//! them; when freeing an old refcount table moved the search start
//! further back, from there):
//!
//! - the block is the next free cluster after the clusters found;
//! - in the range it describes, it counts itself;
//! - in another range that has a block, it is counted there;
//! - in another range without a block, that range's block is made the
//!   same way first (and the first range gets none yet: nothing in it
//!   was allocated after all);
//! - past the refcount table, the table grows (`reftable_grow.rs`).

use super::state::{Meta, MetaKind};
use super::units::{HostCluster, HostOffset};
use super::Qcow2;
use crate::format::limits::MAX_HOST_OFFSET;
use crate::{Error, Result};

impl Qcow2 {
    /// Whether refcount table entry `t` points at a block.
    fn has_refblock(&self, m: &Meta, t: u64) -> bool {
        m.refs.block_offset(t as usize).is_some_and(|o| o.0 != 0)
    }

    /// Before clusters `[start, start + n)`, just found free, are
    /// counted: when one has no refcount block, makes one where QEMU
    /// does and returns true (the caller searches again, from the moved
    /// search start); false when every cluster has its block.
    pub(crate) fn place_missing_refblock(&self, m: &mut Meta, start: HostCluster, n: u64) -> Result<bool> {
        let bits = self.g.rc.block_entries_bits();
        let Some(t) = ((start.0 >> bits)..=((start.0 + n - 1) >> bits)).find(|&t| !self.has_refblock(m, t)) else {
            return Ok(false);
        };
        // The first cluster of the run that needs the block.
        let c = HostCluster(start.0.max(t << bits));
        self.block_for(m, c, start.add(n))?;
        // QEMU searches again from the run's start ("the same ones
        // first"): with the block in place, they usually fit now.
        m.alloc.note_free(start);
        Ok(true)
    }

    /// Makes the refcount block cluster `c` needs, searching for its
    /// place from `from` (see the module).
    fn block_for(&self, m: &mut Meta, c: HostCluster, from: HostCluster) -> Result<()> {
        let bits = self.g.rc.block_entries_bits();
        let t = c.0 >> bits;
        if t as usize >= m.refs.table_len() {
            // The block goes right after the clusters found, when that is
            // past the allocated end (it always is, past the table).
            let own = (from >= m.alloc.file_end().cluster(&self.g)).then_some(from);
            if let Some(b) = own {
                self.take_cluster(m, b)?;
            }
            m.alloc.set_free_hint(from.add(1));
            return self.grow_reftable(m, c, own);
        }
        let b = self.next_free(m, from)?;
        self.take_cluster(m, b)?;
        m.alloc.set_free_hint(b.add(1));
        let tb = b.0 >> bits;
        if tb != t {
            if !self.has_refblock(m, tb) {
                // Its own range needs a block first; `c`'s range gets
                // one when something is allocated there again.
                return self.block_for(m, b, b.add(1));
            }
            self.set_refcount(m, b, 1)?;
        }
        self.file.debug_event(crate::storage::BlkdebugEvent::RefblockAlloc);
        let off = b.offset(&self.g);
        m.refs.blocks_mut().insert_zeroed(off, self.g.cluster_size as usize, true);
        m.refs.set_block_offset(t as usize, off);
        m.overlap.insert(b, MetaKind::RefcountBlock);
        if tb == t {
            // Cannot allocate: the block is cached and its entry set.
            self.set_refcount(m, b, 1)?;
        }
        Ok(())
    }

    /// The first cluster from `from` on that is free (refcount 0, no
    /// metadata).
    fn next_free(&self, m: &mut Meta, from: HostCluster) -> Result<HostCluster> {
        let mut c = from.max(HostCluster(1));
        loop {
            if c.add(1).offset(&self.g).0 > MAX_HOST_OFFSET {
                return Err(Error::io("allocating a cluster", std::io::Error::from_raw_os_error(libc::EFBIG)));
            }
            if self.refcount_for_alloc(m, c)? == 0 && !m.overlap.contains(c) {
                return Ok(c);
            }
            c = c.add(1);
        }
    }

    /// Hands out the space up to and including cluster `c` (reserved in
    /// the file first: running out of room changes nothing).
    fn take_cluster(&self, m: &mut Meta, c: HostCluster) -> Result<()> {
        let end = c.add(1).offset(&self.g);
        self.reserve_to(m, end)?;
        m.alloc.extend_end(end);
        Ok(())
    }

    /// After a shrink, drops the refcount blocks that count nothing any
    /// more (but maybe themselves) from the table and frees them, as
    /// QEMU's shrink does: a block placed outside the range it describes
    /// would otherwise stay behind, all zeros (iotest 163 refuses that).
    /// The table entries reach disk before the blocks are freed.
    pub(crate) fn drop_empty_refblocks(&self, m: &mut Meta) -> Result<()> {
        let bits = self.g.rc.block_entries_bits();
        let mut dropped = Vec::new();
        for i in 0..m.refs.table_len() {
            let Some(off) = m.refs.block_offset(i).filter(|o| o.0 != 0) else { continue };
            self.load_refblock(m, off)?;
            let b = m.refs.blocks().get(off).ok_or_else(|| Error::corrupt("refcount block vanished from cache"))?;
            let own = off.cluster(&self.g).0;
            let own_entry = ((own >> bits) as usize == i).then_some((own & ((1 << bits) - 1)) as usize);
            let empty = (0..1usize << bits).all(|k| Some(k) == own_entry || self.g.rc.get(b, k) == 0);
            if empty {
                dropped.push((i, off));
            }
        }
        if dropped.is_empty() {
            return Ok(());
        }
        for &(i, _) in &dropped {
            m.refs.set_block_offset(i, HostOffset(0));
        }
        self.write_back_durable(m)?;
        for &(_, off) in &dropped {
            m.refs.blocks_mut().remove(off);
            m.overlap.remove(off.cluster(&self.g));
            // Counted in another block, or (its own entry gone) nowhere.
            self.set_refcount(m, off.cluster(&self.g), 0)?;
        }
        self.write_back_durable(m)
    }
}
