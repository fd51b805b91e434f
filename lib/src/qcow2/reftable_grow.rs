//! Growing the refcount table, laid out where QEMU lays it out.
//!
//! When a cluster's refcount needs an entry past the end of the refcount
//! table, a new table and the refcount blocks it needs are placed as one
//! self-describing area, so the switch to the new table is a single
//! header write (the old table stays valid until then):
//!
//! ```text
//!   ... [block for entry t] ... | area start (refcount block boundary)
//!                               | new blocks, in entry order | new table |
//! ```
//!
//! - the block for the entry that ran out (`t`) is a free cluster just
//!   past the allocated end when that cluster lies in the range it
//!   describes (it then counts itself, as QEMU's does); otherwise the area
//!   holds it too;
//! - the area starts at the first refcount block boundary past that
//!   block, the cluster being counted and the allocated end;
//! - the table gets entries for the blocks that cover everything up to
//!   the area's end plus half of the table again (the smallest count that
//!   covers itself: [`area_blocks`]), then half as many again for later
//!   growth, rounded up to whole clusters;
//! - the area holds a new block for every entry from its own start up to
//!   that block count, so it describes itself completely.
//!
//! The numbers are QEMU's (iotest 044 prints the file end they give);
//! the gap between the old end and the area start stays free for the
//! next allocations.

use super::state::{Meta, MetaKind};
use super::units::{HostCluster, HostOffset};
use super::Qcow2;
use crate::format::limits::{MAX_HOST_OFFSET, MAX_REFTABLE_BYTES};
use crate::{Error, Result};

/// How many refcount blocks cover `clusters` clusters plus the blocks and
/// the table clusters that count them: the smallest self-covering count,
/// found by iterating from nothing, and then the same again with half of
/// the table's clusters added to `clusters` (room for the next growth).
/// `per_block` refcounts a block, `per_table_cluster` entries a table
/// cluster.
pub(crate) fn area_blocks(mut clusters: u64, per_block: u64, per_table_cluster: u64) -> u64 {
    let (mut blocks, mut table) = (0u64, 0u64);
    let mut generous = true;
    loop {
        let b = (clusters + blocks + table).div_ceil(per_block);
        let t = b.div_ceil(per_table_cluster);
        if b == blocks && t == table {
            if !generous {
                return blocks;
            }
            generous = false;
            clusters += table.div_ceil(2);
            continue;
        }
        (blocks, table) = (b, t);
    }
}

/// Where everything of one growth goes (cluster numbers).
struct AreaPlan {
    /// Table entry each new block serves, and the block's cluster.
    blocks: Vec<(usize, HostCluster)>,
    /// First cluster of the new table.
    table: HostCluster,
    /// Clusters of the new table.
    table_clusters: u64,
    /// Entries of the new table.
    entries: usize,
    /// First cluster after the area.
    end: HostCluster,
}

impl Qcow2 {
    /// Grows the refcount table so cluster `c`'s refcount has an entry.
    /// `own`, a cluster already taken past the allocated end with
    /// refcount 0, becomes the block of `c`'s entry when it lies in the
    /// range that block describes. Space is reserved before any change:
    /// running out of it fails the request only.
    pub(crate) fn grow_reftable(&self, m: &mut Meta, c: HostCluster, own: Option<HostCluster>) -> Result<()> {
        self.file.debug_event(crate::storage::BlkdebugEvent::ReftableGrow);
        let bits = self.g.rc.block_entries_bits();
        let t = (c.0 >> bits) as usize;
        let own = own.filter(|b| (b.0 >> bits) as usize == t);
        let plan = self.plan_area(m, c, own)?;
        self.reserve_to(m, plan.end.offset(&self.g))?;
        // From here on the cached table outgrows the one on disk until the
        // header points at the new one; a failure on the way cannot be
        // rolled back, so it poisons the image (it is rare: one refcount
        // table cluster covers terabytes with the default cluster size).
        let r = self.grow_reftable_reserved(m, t, own, &plan);
        if let Err(e) = &r {
            self.poison(e);
        }
        r
    }

    /// Computes the area for entry `t = c >> bits` (see the module).
    fn plan_area(&self, m: &Meta, c: HostCluster, own: Option<HostCluster>) -> Result<AreaPlan> {
        let cs = self.g.cluster_size;
        let bits = self.g.rc.block_entries_bits();
        let per_block = 1u64 << bits;
        let per_table_cluster = cs / 8;
        let t = (c.0 >> bits) as usize;
        let after = (c.0 + 1).max(own.map_or(0, |b| b.0 + 1)).max(m.alloc.file_end().cluster(&self.g).0);
        let start = after.div_ceil(per_block) * per_block;
        let too_big = || {
            Error::io(
                "growing the refcount table",
                std::io::Error::new(std::io::ErrorKind::StorageFull, "refcount table would exceed 8 MiB"),
            )
        };
        let total = area_blocks(start, per_block, per_table_cluster);
        let wanted = total + total.div_ceil(2);
        let table_clusters = wanted.div_ceil(per_table_cluster);
        if table_clusters * cs > MAX_REFTABLE_BYTES {
            return Err(too_big());
        }
        let entries = ((table_clusters * per_table_cluster) as usize).max(m.refs.table_len());
        // Entries from the area's start on are past the old table (it
        // ended at or before `t`): none has a block yet.
        let first = (start >> bits) as usize;
        // Without a block of its own, entry `t` takes the area's first.
        let needs = own.is_none().then_some(t).into_iter().chain(first..total as usize);
        let mut blocks = Vec::new();
        let mut next = HostCluster(start);
        for i in needs {
            blocks.push((i, next));
            next = next.add(1);
        }
        let end = next.add(table_clusters);
        if end.offset(&self.g).0 > MAX_HOST_OFFSET {
            return Err(Error::io("growing the refcount table", std::io::Error::from_raw_os_error(libc::EFBIG)));
        }
        Ok(AreaPlan { blocks, table: next, table_clusters, entries, end })
    }

    fn grow_reftable_reserved(&self, m: &mut Meta, t: usize, own: Option<HostCluster>, plan: &AreaPlan) -> Result<()> {
        let cs = self.g.cluster_size as usize;
        let old = HostOffset(m.hc.header.refcount_table_offset).cluster(&self.g);
        let old_clusters = u64::from(m.hc.header.refcount_table_clusters);
        m.alloc.extend_end(plan.end.offset(&self.g));
        m.refs.grow_table(plan.entries);
        let own_block = own.map(|b| (t, b));
        for &(i, b) in own_block.iter().chain(&plan.blocks) {
            m.refs.blocks_mut().insert_zeroed(b.offset(&self.g), cs, true);
            m.refs.set_block_offset(i, b.offset(&self.g));
            m.overlap.insert(b, MetaKind::RefcountBlock);
        }
        for k in 0..plan.table_clusters {
            m.overlap.insert(plan.table.add(k), MetaKind::RefcountTable);
        }
        // Every block the counts below land in is cached and in the table
        // now: none of these calls allocates.
        for &(_, b) in own_block.iter().chain(&plan.blocks) {
            self.set_refcount(m, b, 1)?;
        }
        for k in 0..plan.table_clusters {
            self.set_refcount(m, plan.table.add(k), 1)?;
        }
        // Blocks first, then the table that points to them, then the header.
        self.write_dirty_refblocks(m)?;
        self.install_reftable(m, plan.table.offset(&self.g), plan.table_clusters)?;
        for k in 0..old_clusters {
            m.overlap.remove(old.add(k));
            self.set_refcount(m, old.add(k), 0)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::area_blocks;

    /// iotest 044's growth: 512-byte clusters, 16-bit refcounts, the area
    /// at cluster 8 Mi + 256: 32901 blocks, so a table of 772 clusters.
    #[test]
    fn area_blocks_of_iotest_044() {
        let blocks = area_blocks((8 << 20) + 256, 256, 64);
        assert_eq!(blocks, 32901);
        assert_eq!((blocks + blocks.div_ceil(2)).div_ceil(64), 772);
    }

    /// A small area: the count covers the clusters, itself and the table,
    /// plus half the table's clusters.
    #[test]
    fn area_blocks_cover_themselves() {
        // 1000 clusters, 100 refcounts a block, 10 entries a table cluster:
        // 11 blocks and 2 table clusters cover 1013, 1 more cluster of
        // room makes 1014: still 11 blocks.
        assert_eq!(area_blocks(1000, 100, 10), 11);
        // 989 clusters, 10 blocks and a table cluster fit in 10 blocks;
        // the room for half a table cluster spills into an 11th.
        assert_eq!(area_blocks(988, 100, 10), 10);
        assert_eq!(area_blocks(989, 100, 10), 11);
    }
}
