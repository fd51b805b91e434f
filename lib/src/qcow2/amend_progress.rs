//! The progress of a refcount width change, counted as qemu-img counts
//! it. QEMU changes the width by walks over the old refcount table: walks
//! that allocate the new refcount blocks and table in the old structures
//! (again until a walk allocates nothing new), then one that writes them.
//! Its progress is `walk / walks` with the number of walks guessed as
//! `max(walk + 2, 3)`, so an extra walk shows as progress going back
//! (iotest 112: 66.67% then 50.00%). oxcow lays out the new structures
//! in one pass; to report the same progress it replays QEMU's allocation
//! on the old refcounts to learn how many walks QEMU would take.

/// Most allocating walks replayed; past this, three walks are reported.
const MAX_WALKS: u64 = 16;

/// The old refcount structures, as the replay needs them.
pub(crate) struct OldLayout {
    /// Every cluster's refcount in the old structures (theirs included).
    pub refcounts: Vec<u64>,
    /// Entries of the old refcount table (its clusters times entries per
    /// cluster, as QEMU counts its size).
    pub table_entries: u64,
    /// Entries of one old refcount block.
    pub block_entries: u64,
}

/// How many walks QEMU's width change allocates in (at least 2, for a
/// table and blocks that fit at once), `new_block_entries` being the
/// entries of a new refcount block, or `None` when the replay gives up
/// (allocations past what the old structures cover).
pub(crate) fn allocating_walks(old: &OldLayout, new_block_entries: u64, cluster_size: u64) -> Option<u64> {
    // Only the clusters in use and those allocated on the way are held:
    // every cluster past them has refcount 0.
    let covered = usize::try_from(old.table_entries.checked_mul(old.block_entries)?).ok()?;
    let mut rc = old.refcounts.clone();
    // QEMU's allocator: the first free run from a hint that only moves
    // back when a cluster below it is freed.
    let mut hint = 0usize;
    let alloc = |rc: &mut Vec<u64>, hint: &mut usize, n: usize| -> Option<usize> {
        let mut start = *hint;
        loop {
            if start + n > covered {
                return None;
            }
            if start + n > rc.len() {
                rc.resize(start + n, 0);
            }
            match (start..start + n).find(|&i| rc[i] != 0) {
                Some(used) => start = used + 1,
                None => break,
            }
        }
        rc[start..start + n].iter_mut().for_each(|c| *c = 1);
        *hint = start + n;
        Some(start)
    };
    let table_per_cluster = cluster_size / 8;
    let mut blocks: Vec<bool> = Vec::new();
    let mut table: Option<(usize, usize)> = None;
    for walk in 0..MAX_WALKS {
        let mut allocated = false;
        let mut table_entries = blocks.len() as u64;
        // Blocks past the clusters held are empty (`rc` grows as
        // allocations in this walk reach further).
        let mut b = 0u64;
        loop {
            let first = (b * new_block_entries) as usize;
            if first >= rc.len() {
                break;
            }
            let last = (first + new_block_entries as usize).min(rc.len());
            if rc[first..last].iter().any(|&c| c != 0) {
                if b >= table_entries {
                    table_entries = (b + 1).div_ceil(table_per_cluster) * table_per_cluster;
                    blocks.resize(table_entries as usize, false);
                }
                if !blocks[b as usize] {
                    alloc(&mut rc, &mut hint, 1)?;
                    blocks[b as usize] = true;
                    allocated = true;
                }
            }
            b += 1;
        }
        if !allocated {
            return Some(walk + 1);
        }
        if let Some((at, n)) = table.take() {
            rc[at..at + n].iter_mut().for_each(|c| *c = 0);
            hint = hint.min(at);
        }
        let n = (table_entries * 8).div_ceil(cluster_size) as usize;
        table = Some((alloc(&mut rc, &mut hint, n)?, n));
    }
    None
}

/// Reports walk `w` of a width change that QEMU would do in `walks`
/// allocating walks and one writing walk (`w == walks`), over an old
/// refcount table of `table_entries`, as QEMU reports it: `(done,
/// total)` before each table entry and once at the end.
pub(crate) fn report_walk(w: u64, walks: u64, table_entries: u64, progress: &mut dyn FnMut(u64, u64)) {
    let rt = table_entries;
    // The writing walk knows it is the last.
    let total = if w == walks { w + 1 } else { (w + 2).max(3) };
    for i in 0..rt {
        progress(w * rt + i, total * rt);
    }
    progress((w + 1) * rt, total * rt);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// iotest 112's image: 512-byte clusters, 1-bit refcounts, 63 clusters
    /// in use, going to 64-bit refcounts (64 entries a block): the first
    /// new block is full with its own, so the table needs a second one,
    /// and QEMU walks once more.
    #[test]
    fn a_block_filled_by_itself_costs_qemu_one_more_walk() {
        let old = OldLayout { refcounts: vec![1; 63], table_entries: 64, block_entries: 4096 };
        assert_eq!(allocating_walks(&old, 64, 512), Some(3));
        let old = OldLayout { refcounts: vec![1; 40], table_entries: 64, block_entries: 4096 };
        assert_eq!(allocating_walks(&old, 64, 512), Some(2));
    }

    #[test]
    fn progress_goes_back_when_a_walk_is_added() {
        let mut r = Vec::new();
        for w in 0..=3 {
            report_walk(w, 3, 64, &mut |d, t| r.push((d, t)));
        }
        let pct: Vec<f64> = r.iter().map(|&(d, t)| d as f64 * 100.0 / t as f64).collect();
        let at = pct.iter().position(|&p| (p - 200.0 / 3.0).abs() < 1e-9).expect("2/3 reached");
        assert_eq!(pct[at + 1], 50.0);
        assert_eq!(*pct.last().expect("reports"), 100.0);
    }
}
