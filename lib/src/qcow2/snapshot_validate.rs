//! Validation of snapshot table entries before an operation trusts them.
//!
//! `snapshot -a/-c/-d` and the read-only views (`io -l`, `convert -l`,
//! `serve -l`) install or follow what a snapshot entry says: its L1 table,
//! the L2 tables and clusters that table reaches, its disk size. A lying
//! entry must be refused before a single byte changes, not half way
//! through (a refcount dropping below zero after the table was rewritten,
//! an L1 table too large for anyone to open again, a 26 GiB allocation).
//! Nothing here writes, so a refusal leaves the image as it was and does
//! not poison it.

use super::overlap::snapshot_table_bytes;
use super::state::{Meta, MetaKind};
use super::units::{HostCluster, HostOffset};
use super::Qcow2;
use crate::format::l1::L1Entry;
use crate::format::{Header, SnapshotEntry};
use crate::{Error, Result};
use std::collections::{HashMap, HashSet};

/// What a revert to a snapshot needs, read and checked up front.
pub(crate) struct GotoPlan {
    /// The snapshot's L1 table.
    pub sn_l1: Vec<u64>,
    /// References the snapshot's tree adds (`Qcow2::tree_refs`).
    pub refs: Vec<HostCluster>,
    /// References the active tree drops.
    pub old_refs: Vec<HostCluster>,
    /// The header once the snapshot is installed (before the new L1
    /// table's offset is known).
    pub header: Header,
}

fn per_cluster(refs: &[HostCluster]) -> HashMap<HostCluster, u64> {
    let mut counts: HashMap<HostCluster, u64> = HashMap::new();
    for &i in refs {
        *counts.entry(i).or_default() += 1;
    }
    counts
}

impl Qcow2 {
    /// Checks the snapshot table an operation is about to rewrite (and
    /// free): the table and every entry's L1 table lie where they can
    /// (aligned, inside the file, on no other metadata), and the old
    /// table's clusters are counted, so freeing them cannot underflow.
    pub(crate) fn validate_snapshot_table(&self, m: &mut Meta) -> Result<()> {
        let cs = self.g.cluster_size;
        if m.hc.header.nb_snapshots > 0 {
            let off = m.hc.header.snapshots_offset;
            let bytes = snapshot_table_bytes(&self.g, m);
            if let Some((c, what)) = self.meta_conflict(m, off, bytes, Some(MetaKind::SnapshotTable)) {
                return Err(Error::corrupt_at(format!("snapshot table overlaps with {what}"), c));
            }
            for idx in off / cs..(off + bytes).div_ceil(cs) {
                if self.refcount(m, HostCluster(idx))? == 0 {
                    return Err(Error::corrupt_at("snapshot table cluster has refcount 0", idx * cs));
                }
            }
        }
        for sn in m.snapshots.clone() {
            self.check_snapshot_l1_place(m, &sn)?;
        }
        Ok(())
    }

    /// The first cluster of `[off, off + bytes)` holding metadata other
    /// than `allowed`, by offset and name, without marking anything.
    fn meta_conflict(&self, m: &Meta, off: u64, bytes: u64, allowed: Option<MetaKind>) -> Option<(u64, String)> {
        let cs = self.g.cluster_size;
        m.overlap.conflict_names(off / cs, (off + bytes.max(1)).div_ceil(cs), allowed).map(|(c, n)| (c * cs, n))
    }

    /// The references one snapshot's tree holds, refusing a tree that
    /// points where no table or data can be: past the end of the file
    /// (beyond the slack `check` allows for), or an L2 table or data
    /// cluster on other metadata.
    pub(crate) fn checked_tree_refs(&self, m: &mut Meta, sn: &SnapshotEntry, l1: &[u64]) -> Result<Vec<HostCluster>> {
        let cs = self.g.cluster_size;
        let file_len = self.file.len().map_err(|e| Error::io("reading image size", e))?;
        let limit = file_len.div_ceil(cs) + self.beyond_eof_slack();
        let bad =
            |what: String, at: u64| Error::corrupt_at(format!("snapshot '{}' (ID {}): {what}", sn.name, sn.id), at);
        let mut tables = HashSet::new();
        for &raw in l1 {
            let off = L1Entry(raw).l2_offset();
            if off == 0 {
                continue;
            }
            if !off.is_multiple_of(cs) {
                return Err(bad("L2 table is not cluster aligned".into(), off));
            }
            if off / cs >= limit {
                return Err(bad("L2 table lies past the end of the file".into(), off));
            }
            if let Some((c, what)) = self.meta_conflict(m, off, cs, Some(MetaKind::ActiveL2)) {
                return Err(bad(format!("L2 table overlaps with {what}"), c));
            }
            tables.insert(HostOffset(off).cluster(&self.g));
        }
        let refs = self.tree_refs(m, l1)?;
        for &c in &refs {
            let at = c.offset(&self.g).0;
            if c.0 >= limit {
                return Err(bad("data cluster lies past the end of the file".into(), at));
            }
            if !tables.contains(&c) {
                if let Some((c, what)) = self.meta_conflict(m, at, cs, None) {
                    return Err(bad(format!("data cluster overlaps with {what}"), c));
                }
            }
        }
        Ok(refs)
    }

    /// Refuses references to drop (`dec`, after `inc` were added) below
    /// zero: a tree whose refcounts are too low would otherwise fail half
    /// way through the operation, after the header changed.
    fn check_decrements(&self, m: &mut Meta, dec: &[HostCluster], inc: &[HostCluster]) -> Result<()> {
        let inc = per_cluster(inc);
        let mut dec: Vec<_> = per_cluster(dec).into_iter().collect();
        dec.sort_unstable();
        for (idx, n) in dec {
            let have = self.refcount(m, idx)? + inc.get(&idx).copied().unwrap_or(0);
            if have < n {
                return Err(Error::corrupt_at(
                    format!("cluster has refcount {have} but {n} references would be dropped (refcount too low; run 'oxcow check -r all')"),
                    idx.offset(&self.g).0,
                ));
            }
        }
        Ok(())
    }

    /// Clusters of a table of `bytes` at `off`.
    fn table_clusters(&self, off: u64, bytes: u64) -> Vec<HostCluster> {
        let cs = self.g.cluster_size;
        if bytes == 0 {
            return Vec::new();
        }
        (off / cs..(off + bytes).div_ceil(cs)).map(HostCluster).collect()
    }

    /// Reads and checks everything reverting to `sn` installs or drops.
    pub(crate) fn plan_goto(&self, m: &mut Meta, sn: &SnapshotEntry) -> Result<GotoPlan> {
        self.check_snapshot_l1_place(m, sn)?;
        let header = sn.installed_header(&m.hc.header)?;
        let sn_l1 = self.read_snapshot_l1(sn)?;
        let refs = self.checked_tree_refs(m, sn, &sn_l1)?;
        self.check_increments(m, &refs)?;
        let active = m.map.l1().to_vec();
        let old_refs = self.tree_refs(m, &active)?;
        let mut dropped = old_refs.clone();
        let h = &m.hc.header;
        dropped.extend(self.table_clusters(h.l1_table_offset, u64::from(h.l1_size) * 8));
        self.check_decrements(m, &dropped, &refs)?;
        Ok(GotoPlan { sn_l1, refs, old_refs, header })
    }

    /// Reads and checks everything deleting snapshot `i` drops.
    pub(crate) fn plan_delete(&self, m: &mut Meta, i: usize) -> Result<Vec<HostCluster>> {
        let sn = m.snapshots[i].clone();
        // The entry's own L1 table first, as QEMU (its words, not those
        // of the overlaps a lying table size makes).
        self.check_snapshot_l1_place(m, &sn)?;
        self.validate_snapshot_table(m)?;
        let sn_l1 = self.read_snapshot_l1(&sn)?;
        let refs = self.checked_tree_refs(m, &sn, &sn_l1)?;
        let mut all = refs.clone();
        all.extend(self.table_clusters(sn.l1_table_offset, u64::from(sn.l1_size) * 8));
        self.check_decrements(m, &all, &[])?;
        Ok(refs)
    }
}
