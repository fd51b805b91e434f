//! Consistency check and repair (`qemu-img check` semantics).
//!
//! The check walks every structure that references clusters (header, L1
//! and L2 tables of the active state and of every snapshot, the snapshot
//! table, refcount table and blocks, bitmaps), counts the references per
//! host cluster, and compares with the stored refcounts: a stored refcount
//! above the count is a leak (wasted space), below it a corruption (a
//! cluster that could be handed out twice). It also checks alignment,
//! compressed descriptors, and COPIED flags.
//!
//! Repair order (crash during repair loses no data): refcounts are raised
//! or rewritten first (durable), COPIED flags fixed after; a refcount
//! structure too damaged to fix in place is rebuilt in free space at the
//! end of the file and switched to with one header write.

use super::state::{Meta, MetaKind};
use super::units::{GuestCluster, HostCluster, HostOffset};
use super::Qcow2;
use crate::format::be::{encode_u64_table, u64_table};
use crate::format::bitmap::{parse_directory, TABLE_OFFSET_MASK};
use crate::format::compressed::CompressedDescriptor;
use crate::format::l1::{L1Entry, COPIED as L1_COPIED};
use crate::format::l2::{L2Entry, SubclusterBitmap, COPIED as L2_COPIED};
use crate::format::refcount::REFTABLE_OFFSET_MASK;
use crate::{BlockDevice, Error, Result};
use std::collections::HashMap;

/// What `check` may repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// Report only.
    None,
    /// Free leaked clusters.
    Leaks,
    /// Fix leaks, wrong refcounts and COPIED flags.
    All,
}

/// The result of a check, with qemu-img's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Internal errors that stopped part of the check.
    pub check_errors: u64,
    /// Corruptions found (after repair: those left).
    pub corruptions: u64,
    /// Leaked clusters found (after repair: those left).
    pub leaks: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// End of the last cluster in use.
    pub image_end_offset: u64,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Guest clusters allocated in the active state.
    pub allocated_clusters: u64,
    /// Allocated guest clusters not contiguous with the previous one.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters.
    pub compressed_clusters: u64,
    /// One line per finding, in qemu-img's words.
    pub messages: Vec<String>,
    /// After a repair: (leaks, corruptions) the first pass found.
    pub found_before_repair: Option<(u64, u64)>,
}

/// References counted per host cluster.
struct Refs {
    below: Vec<u32>,
    beyond: HashMap<u64, u32>,
}

impl Refs {
    fn get(&self, idx: u64) -> u64 {
        match self.below.get(idx as usize) {
            Some(&v) => u64::from(v),
            None => u64::from(self.beyond.get(&idx).copied().unwrap_or(0)),
        }
    }
    fn inc(&mut self, idx: u64) {
        match self.below.get_mut(idx as usize) {
            Some(v) => *v = v.saturating_add(1),
            None => *self.beyond.entry(idx).or_insert(0) += 1,
        }
    }
    fn highest(&self) -> Option<u64> {
        let b = self.beyond.keys().max().copied();
        let a = self.below.iter().rposition(|&v| v > 0).map(|i| i as u64);
        a.max(b)
    }
}

/// A COPIED flag to verify once all references are counted.
enum CopiedSite {
    L1 {
        index: usize,
        l2: u64,
    },
    /// A data cluster's L2 entry, kept from the scan with where it is
    /// (L1 index, index in the table) so that neither the COPIED check nor
    /// its repair need read every table a second time.
    L2 {
        word: u64,
        l1: u32,
        l2i: u32,
    },
}

struct Scan {
    report: CheckReport,
    /// Highest cluster with a stored refcount above zero.
    highest_stored: Option<u64>,
    refs: Refs,
    copied: Vec<CopiedSite>,
    /// Refcount blocks that are misaligned or outside the image.
    bad_refblocks: bool,
    /// Of the corruptions: stored refcounts below the references, and
    /// COPIED flags that disagree with the stored refcount, the two kinds
    /// a repair fixes (the rest it leaves for a second scan to report).
    refcount_corruptions: u64,
    copied_corruptions: u64,
    /// A cluster something references whose stored refcount is 0: QEMU
    /// rebuilds the refcount structures rather than trust the rest of them.
    zero_refcount_referenced: bool,
    /// Where the lines of incomplete snapshot table entries are in the
    /// messages: a repair says "Repairing" there instead.
    incomplete_snapshots: Vec<usize>,
    /// Where the COPIED findings start in the messages: a repair prints
    /// them again after the refcounts are fixed, judged on those.
    copied_messages_at: usize,
    /// Of the corruptions: references past the largest refcount the
    /// width can hold, which no repair fixes (amend widens the refcounts).
    overflows: u64,
}

/// References past the end of the file further than this are corrupt
/// rather than data that was not written before a crash (a repair would
/// otherwise grow the file to wherever a damaged entry points).
const MAX_BEYOND_EOF_BYTES: u64 = 64 << 20;

/// qemu-img's words for a reference too far past the end of the file.
fn beyond_eof_message(off: u64, bytes: u64) -> String {
    format!(
        "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {off:#x} size {bytes:#x}"
    )
}

impl Qcow2 {
    /// Checks the image; with `repair`, fixes what it may and checks again.
    pub fn check(&self, repair: Repair) -> Result<CheckReport> {
        let mut m = self.wait_idle(self.lock());
        if let Some(f) = m.snapshot_findings.first() {
            // As qemu-img: without `-r all` the table is not read at all.
            if repair != Repair::All || self.read_only {
                return Err(Error::io(f.check_error(), std::io::Error::from_raw_os_error(libc::EFBIG)));
            }
        }
        if !self.read_only && !self.poison.is_set() {
            // The check reads the file: everything cached must be there,
            // refcount blocks too (lazy refcounts keep them back).
            self.write_back(&mut m)?;
            self.write_back_inner(&mut m, true)?;
            self.sync("flushing before check")?;
        }
        let table = if m.snapshot_findings.is_empty() { None } else { Some(self.repair_table_findings(&mut m)?) };
        let first = self.scan(&mut m)?;
        // Overflowing references alone leave a repair nothing to do.
        let r = &first.report;
        let nothing_found = r.leaks == 0 && r.corruptions == first.overflows;
        if repair == Repair::None || self.read_only || (nothing_found && table.is_none()) {
            return Ok(first.report);
        }
        let (mut said, mut fixed_all, copied_found) = self.repair(&mut m, &first, repair)?;
        if table.as_ref().is_some_and(|t| t.rewrite) {
            // Extra data cut to 1 KiB: the table is written again, after
            // the refcounts are right (as qemu-img, last).
            let list = m.snapshots.clone();
            self.rewrite_snapshot_table(&mut m, list)?;
            self.write_back_durable(&mut m)?;
            m.overlap = super::metadata_clusters(&self.g, &m);
            fixed_all = false;
        }
        m.overlap.forget_taken();
        // When the repair fixed everything the scan found, what a second
        // scan would report is known: the same image with no finding. The
        // metadata is then read once (the crash recovery of lazy refcounts,
        // whose findings are all refcounts too low and their COPIED flags).
        let mut after = if fixed_all { self.clean_after(&first) } else { self.scan(&mut m)?.report };
        // The COPIED flags count as qemu-img counts them: judged once, on
        // the repaired refcounts.
        let table_corruptions = table.as_ref().map_or(0, |t| t.corruptions);
        let found = first.report.corruptions - first.copied_corruptions + copied_found + table_corruptions;
        after.leaks_fixed = first.report.leaks.saturating_sub(after.leaks);
        after.corruptions_fixed = found.saturating_sub(after.corruptions);
        after.found_before_repair = Some((first.report.leaks, found));
        let mut messages = table.map(|t| t.lines).unwrap_or_default();
        let mut first_messages = first.report.messages;
        first_messages.truncate(first.copied_messages_at);
        let shift = messages.len();
        messages.append(&mut first_messages);
        if repair == Repair::All {
            for &i in &first.incomplete_snapshots {
                if let Some(line) = messages.get_mut(shift + i) {
                    *line = line.replacen("ERROR", "Repairing", 1);
                }
            }
        }
        messages.append(&mut said);
        messages.append(&mut after.messages);
        after.messages = messages;
        Ok(after)
    }

    /// Rebuilds refcounts of an image whose dirty bit is set (lazy
    /// refcounts, unclean close) and clears the bit, before any write.
    /// With `use_journal`, a recovery journal oxcow trusts replaces the
    /// scan (`journal.rs`).
    pub(crate) fn repair_dirty(&self, use_journal: bool) -> Result<CheckReport> {
        if use_journal {
            if let Some(report) = self.journal_recover() {
                return Ok(report);
            }
        }
        let report = self.check(Repair::All)?;
        let mut m = self.lock();
        if report.corruptions > 0 {
            return Err(Error::corrupt(format!(
                "dirty image still has {} corruptions after refcount repair; run 'oxcow check -r all'",
                report.corruptions
            )));
        }
        m.hc.header.incompatible_features &= !crate::format::Incompatible::DIRTY;
        self.write_header(&mut m)?;
        self.sync("clearing dirty bit")?;
        Ok(report)
    }

    fn read_table(&self, off: u64, bytes: u64) -> Result<Vec<u8>> {
        let mut b = vec![0u8; bytes as usize];
        self.file.read_at(&mut b, off).map_err(|e| Error::io("reading metadata during check", e))?;
        Ok(b)
    }

    fn scan(&self, m: &mut Meta) -> Result<Scan> {
        self.scan_inner(m, true)
    }

    fn scan_inner(&self, m: &mut Meta, compare: bool) -> Result<Scan> {
        let cs = self.g.cluster_size;
        let file_len = self.file.len().map_err(|e| Error::io("reading image size", e))?;
        let nb = file_len.div_ceil(cs);
        let mut s = Scan {
            report: CheckReport { total_clusters: self.len().div_ceil(cs), ..Default::default() },
            refs: Refs { below: vec![0; nb as usize], beyond: HashMap::new() },
            copied: Vec::new(),
            bad_refblocks: false,
            highest_stored: None,
            refcount_corruptions: 0,
            copied_corruptions: 0,
            zero_refcount_referenced: false,
            incomplete_snapshots: Vec::new(),
            copied_messages_at: 0,
            overflows: 0,
        };
        let h = m.hc.header.clone();
        self.add_range(&mut s, nb, 0, cs);
        self.add_range(&mut s, nb, h.l1_table_offset, u64::from(h.l1_size) * 8);
        let l1 = m.map.l1().to_vec();
        self.scan_l1(&mut s, nb, &l1, true)?;
        if h.nb_snapshots > 0 {
            let bytes: u64 = m.snapshots.iter().map(super::snapshot::entry_disk_len).sum();
            // A v3 entry must record the disk size (16 bytes of extra
            // data); a repair writes the table again, complete.
            if self.g.v3 {
                for (i, sn) in m.snapshots.iter().enumerate() {
                    if (sn.extra_data_size as usize) < crate::format::snapshot::V3_MIN_EXTRA {
                        s.report.corruptions += 1;
                        s.incomplete_snapshots.push(s.report.messages.len());
                        s.report.messages.push(format!("ERROR snapshot table entry {i} is incomplete"));
                    }
                }
            }
            self.add_range(&mut s, nb, h.snapshots_offset, bytes);
            for sn in m.snapshots.clone() {
                if sn.l1_table_offset % cs != 0 {
                    s.report.corruptions += 1;
                    s.report.messages.push(format!(
                        "ERROR snapshot {} ({}) l1_offset={:#x}: L1 table is not cluster aligned; snapshot table entry corrupted",
                        sn.id, sn.name, sn.l1_table_offset
                    ));
                    continue;
                }
                if u64::from(sn.l1_size) * 8 > crate::format::limits::MAX_L1_BYTES {
                    s.report.corruptions += 1;
                    s.report.messages.push(format!(
                        "ERROR snapshot {} ({}) l1_size={:#x}: L1 table is too large; snapshot table entry corrupted",
                        sn.id, sn.name, sn.l1_size
                    ));
                    continue;
                }
                let bytes = u64::from(sn.l1_size) * 8;
                self.add_range(&mut s, nb, sn.l1_table_offset, bytes);
                let table = u64_table(&self.read_table(sn.l1_table_offset, bytes)?);
                self.scan_l1(&mut s, nb, &table, false)?;
            }
        }
        let before = s.report.corruptions;
        self.add_range(&mut s, nb, h.refcount_table_offset, u64::from(h.refcount_table_clusters) * cs);
        if s.report.corruptions > before {
            // A refcount table out of reach cannot be fixed in place.
            s.bad_refblocks = true;
        }
        for (i, &e) in m.refs.table().iter().enumerate() {
            let off = e & REFTABLE_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if !off.is_multiple_of(cs) {
                s.report.corruptions += 1;
                s.bad_refblocks = true;
                s.report
                    .messages
                    .push(format!("ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"));
            } else if off / cs >= nb {
                s.report.corruptions += 1;
                s.bad_refblocks = true;
                s.report.messages.push(format!("ERROR refcount block {i} is outside image"));
            } else {
                self.add_range(&mut s, nb, off, cs);
            }
        }
        if let Some(f) = m.hc.extensions.fde {
            self.add_range(&mut s, nb, f.offset, f.length);
        }
        // As QEMU: without the autoclear bit the extension is ignored and
        // what it points at is leaked.
        if let Some(b) = Self::bitmaps_ext_valid(m) {
            self.scan_bitmaps(&mut s, nb, b.directory_offset, b.directory_size, b.nb_bitmaps)?;
        }
        // A refcount block anything else also uses (the L1 table, another
        // entry's block) cannot be repaired in place: every refcount
        // written into it would overwrite the other structure. As QEMU
        // does, rebuild the refcount structures instead.
        for (i, &e) in m.refs.table().iter().enumerate() {
            let off = e & REFTABLE_OFFSET_MASK;
            if off == 0 || !off.is_multiple_of(cs) || off / cs >= nb {
                continue;
            }
            let counted = s.refs.get(off / cs);
            if counted != 1 {
                s.report.corruptions += 1;
                s.bad_refblocks = true;
                s.report.messages.push(format!("ERROR refcount block {i} refcount={counted}"));
            }
        }
        if compare {
            self.compare_refcounts(m, &mut s, nb)?;
            s.copied_messages_at = s.report.messages.len();
            self.check_copied(m, &mut s)?;
        }
        let highest = s.refs.highest().max(s.highest_stored);
        s.report.image_end_offset = highest.map_or(cs, |h| (h + 1) * cs);
        Ok(s)
    }

    /// How many clusters past the end of the file may still be referenced.
    pub(crate) fn beyond_eof_slack(&self) -> u64 {
        (MAX_BEYOND_EOF_BYTES / self.g.cluster_size).max(16)
    }

    fn add_range(&self, s: &mut Scan, nb: u64, off: u64, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let cs = self.g.cluster_size;
        let first = off / cs;
        let last = (off + bytes - 1) / cs;
        for idx in first..=last {
            if idx >= nb + self.beyond_eof_slack() {
                s.report.corruptions += 1;
                s.report.messages.push(beyond_eof_message(off, bytes));
                return;
            }
            // As QEMU counts: at most as many references as the refcount
            // width holds, each one past that an overflow.
            if s.refs.get(idx) >= self.g.rc.max() {
                s.report.corruptions += 1;
                s.overflows += 1;
                s.report.messages.push(format!("ERROR: overflow cluster offset={:#x}", idx * cs));
                s.report.messages.push(
                    "Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a \
                     clean copy if the image cannot be opened for writing"
                        .to_string(),
                );
                continue;
            }
            s.refs.inc(idx);
        }
    }

    fn scan_l1(&self, s: &mut Scan, nb: u64, l1: &[u64], active: bool) -> Result<()> {
        let cs = self.g.cluster_size;
        let mut next_contiguous;
        for (i, &raw) in l1.iter().enumerate() {
            let e = L1Entry(raw);
            let l2 = e.l2_offset();
            if l2 == 0 {
                continue;
            }
            if !l2.is_multiple_of(cs) {
                s.report.corruptions += 1;
                s.report
                    .messages
                    .push(format!("ERROR l2_offset={l2:#x}: Table is not cluster aligned; L1 entry corrupted"));
                continue;
            }
            if l2 / cs >= nb + self.beyond_eof_slack() {
                s.report.corruptions += 1;
                s.report.messages.push(beyond_eof_message(l2, cs));
                continue;
            }
            self.add_range(s, nb, l2, cs);
            if active {
                s.copied.push(CopiedSite::L1 { index: i, l2 });
            }
            // Like qemu-img, contiguity is judged within one L2 table.
            next_contiguous = 0;
            let table = self.read_table(l2, cs)?;
            let entries = table.chunks_exact(self.g.l2.entry_size()).take(self.g.l2_entries as usize);
            for (j, raw) in entries.enumerate() {
                // Most entries of a sparse image's tables are empty (no
                // host cluster, nothing compressed): skip them undecoded.
                if raw[..8] == [0u8; 8] {
                    continue;
                }
                let le = self.g.l2.get(&table, j);
                if le.is_compressed() {
                    let d = CompressedDescriptor::decode(
                        le.word & !(L2_COPIED | crate::format::l2::COMPRESSED),
                        self.g.cluster_bits,
                    );
                    if self.g.external_data {
                        s.report.corruptions += 1;
                        s.report
                            .messages
                            .push("ERROR compressed cluster in an image with an external data file".into());
                        continue;
                    }
                    if le.copied() {
                        s.report.corruptions += 1;
                        s.report
                            .messages
                            .push(format!("ERROR compressed cluster entry {:#x} has the COPIED flag", le.word));
                    }
                    self.add_range(s, nb, d.offset, d.byte_len());
                    if active {
                        // Compressed clusters count as fragmented by
                        // nature (qemu-img reports them so).
                        s.report.allocated_clusters += 1;
                        s.report.compressed_clusters += 1;
                        s.report.fragmented_clusters += 1;
                    }
                    continue;
                }
                let host = le.host_offset();
                // Offset 0 is a cluster of an external data file when the
                // COPIED flag says so (every such cluster has it), unless
                // the entry reads as zeros, as QEMU classifies it.
                let zero_plain = le.word & crate::format::l2::ZERO != 0 && !self.g.extended;
                if host == 0 && !(self.g.external_data && le.copied() && !zero_plain) {
                    continue;
                }
                if !host.is_multiple_of(cs) {
                    s.report.corruptions += 1;
                    s.report
                        .messages
                        .push(format!("ERROR offset={host:#x}: Cluster is not properly aligned; L2 entry corrupted."));
                    continue;
                }
                if !self.g.external_data {
                    self.add_range(s, nb, host, cs);
                }
                if active {
                    s.report.allocated_clusters += 1;
                    if next_contiguous != 0 && host != next_contiguous {
                        s.report.fragmented_clusters += 1;
                    }
                    next_contiguous = host + cs;
                    if !self.g.external_data {
                        s.copied.push(CopiedSite::L2 { word: le.word, l1: i as u32, l2i: j as u32 });
                    }
                }
            }
        }
        Ok(())
    }

    fn scan_bitmaps(&self, s: &mut Scan, nb: u64, dir_off: u64, dir_size: u64, count: u32) -> Result<()> {
        let cs = self.g.cluster_size;
        if !dir_off.is_multiple_of(cs) {
            s.report.corruptions += 1;
            s.report.messages.push("ERROR bitmap directory is not cluster aligned".into());
            return Ok(());
        }
        self.add_range(s, nb, dir_off, dir_size);
        let dir = match parse_directory(&self.read_table(dir_off, dir_size)?, count) {
            Ok(d) => d,
            Err(e) => {
                s.report.corruptions += 1;
                s.report.messages.push(format!("ERROR bitmap directory: {e}"));
                return Ok(());
            }
        };
        for b in dir {
            if b.table_offset % cs != 0 || u64::from(b.table_size) * 8 > 64 << 20 {
                s.report.corruptions += 1;
                s.report.messages.push(format!("ERROR bitmap '{}' has an invalid table", b.name));
                continue;
            }
            let bytes = u64::from(b.table_size) * 8;
            self.add_range(s, nb, b.table_offset, bytes);
            for e in u64_table(&self.read_table(b.table_offset, bytes)?) {
                let off = e & TABLE_OFFSET_MASK;
                if off != 0 {
                    self.add_range(s, nb, off, cs);
                }
            }
        }
        Ok(())
    }

    fn compare_refcounts(&self, m: &mut Meta, s: &mut Scan, nb: u64) -> Result<()> {
        let highest = s.refs.highest().map_or(0, |h| h + 1);
        let covered = (m.refs.table_len() as u64) << self.g.rc.block_entries_bits();
        let limit = nb.max(highest).min(covered.max(highest));
        for idx in 0..limit {
            let c = HostCluster(idx);
            let stored = if s.bad_refblocks { self.refcount(m, c).unwrap_or(0) } else { self.refcount(m, c)? };
            let counted = s.refs.get(idx);
            if stored > 0 {
                s.highest_stored = Some(idx);
            }
            if stored == counted {
                continue;
            }
            if stored < counted {
                s.report.corruptions += 1;
                s.refcount_corruptions += 1;
                s.zero_refcount_referenced |= stored == 0;
                s.report.messages.push(format!("ERROR cluster {idx} refcount={stored} reference={counted}"));
            } else {
                s.report.leaks += 1;
                s.report.messages.push(format!("Leaked cluster {idx} refcount={stored} reference={counted}"));
            }
        }
        Ok(())
    }

    fn check_copied(&self, m: &mut Meta, s: &mut Scan) -> Result<()> {
        let lines = self.copied_findings(m, &s.copied, "ERROR")?;
        s.report.corruptions += lines.len() as u64;
        s.copied_corruptions += lines.len() as u64;
        s.report.messages.extend(lines);
        Ok(())
    }

    /// One line per COPIED flag that disagrees with the stored refcount
    /// (like qemu-img, the stored one: after a repair, the repaired one),
    /// in qemu-img's words, opening with `verb`.
    fn copied_findings(&self, m: &mut Meta, sites: &[CopiedSite], verb: &str) -> Result<Vec<String>> {
        let mut lines = Vec::new();
        for site in sites {
            match *site {
                CopiedSite::L1 { index, l2 } => {
                    let refs = self.refcount(m, HostOffset(l2).cluster(&self.g)).unwrap_or(0);
                    let raw = m.map.l1().get(index).copied().unwrap_or(0);
                    if L1Entry(raw).copied() != (refs == 1) {
                        lines.push(format!(
                            "{verb} OFLAG_COPIED L2 cluster: l1_index={index} l1_entry={raw:x} refcount={refs}"
                        ));
                    }
                }
                CopiedSite::L2 { word, .. } => {
                    let e = L2Entry { word, bitmap: SubclusterBitmap(0) };
                    let refs = self.refcount(m, HostOffset(e.host_offset()).cluster(&self.g)).unwrap_or(0);
                    if e.copied() != (refs == 1) {
                        lines.push(format!("{verb} OFLAG_COPIED data cluster: l2_entry={:x} refcount={refs}", e.word));
                    }
                }
            }
        }
        Ok(lines)
    }

    /// The report of a second scan after a repair that fixed every
    /// finding of `first`: its counters, no finding, and the image ending
    /// at its last referenced cluster (every stored refcount now equals the
    /// references).
    fn clean_after(&self, first: &Scan) -> CheckReport {
        let r = &first.report;
        CheckReport {
            image_end_offset: first.refs.highest().map_or(self.g.cluster_size, |h| (h + 1) * self.g.cluster_size),
            total_clusters: r.total_clusters,
            allocated_clusters: r.allocated_clusters,
            fragmented_clusters: r.fragmented_clusters,
            compressed_clusters: r.compressed_clusters,
            ..Default::default()
        }
    }

    /// Repairs what `scan` found, in qemu-img's order and words: the
    /// refcounts first (or a rebuild of the refcount structures), then the
    /// COPIED flags, judged on the repaired refcounts. Returns the lines to
    /// print, whether every finding is now fixed (nothing a second scan
    /// could report: no finding of a kind a repair leaves, no refcount
    /// capped at its width, no COPIED flag left, and no refcount structure
    /// allocated on the way), and how many COPIED flags disagreed with the
    /// repaired refcounts (qemu-img counts those as the corruptions found).
    fn repair(&self, m: &mut Meta, scan: &Scan, repair: Repair) -> Result<(Vec<String>, bool, u64)> {
        let mut said = Vec::new();
        let r = &scan.report;
        let mut fixed_all = !scan.bad_refblocks
            && r.check_errors == 0
            && r.corruptions
                == scan.refcount_corruptions + scan.copied_corruptions + scan.incomplete_snapshots.len() as u64
            && (repair == Repair::All || r.corruptions == 0);
        let table_before = m.refs.table().to_vec();
        // The allocator must not hand out a cluster that something
        // references, even past the current end of the file.
        if let Some(h) = scan.refs.highest() {
            m.alloc.extend_end(HostCluster(h + 1).offset(&self.g));
        }
        m.alloc.rescan();
        if scan.bad_refblocks && repair != Repair::All {
            return Err(Error::corrupt("ERROR need to rebuild refcount structures; use -r all"));
        }
        // As QEMU: a referenced cluster whose stored refcount is 0 (a
        // crash with lazy refcounts, a lost refcount block) makes the
        // whole refcount structure suspect, and it is rebuilt.
        let mut rebuilt = false;
        if repair == Repair::All && (scan.bad_refblocks || scan.zero_refcount_referenced) {
            match self.rebuild_refcounts(m, scan.refs.highest().map_or(1, |h| h + 1)) {
                Ok(now) => {
                    said.push("Rebuilding refcount structure".to_string());
                    said.extend(self.old_structures_freed(scan, &now));
                    rebuilt = true;
                }
                // Too large to rebuild: raised in place below instead.
                Err(Error::Unsupported(_)) if !scan.bad_refblocks => {}
                Err(e) => return Err(e),
            }
        }
        if !rebuilt {
            let covered = (m.refs.table_len() as u64) << self.g.rc.block_entries_bits();
            let file_clusters = scan.refs.below.len() as u64;
            let highest = scan.refs.highest().map_or(0, |h| h + 1);
            let limit = file_clusters.max(highest).min(covered.max(highest));
            let mut raise = Vec::new();
            let mut lower = Vec::new();
            for idx in 0..limit {
                let stored = self.refcount(m, HostCluster(idx))?;
                let counted = scan.refs.get(idx);
                if stored < counted && repair == Repair::All {
                    raise.push((idx, counted));
                } else if stored > counted {
                    lower.push((idx, counted));
                } else if stored < counted {
                    // Left for `-r all`; qemu-img says so again.
                    said.push(format!("ERROR cluster {idx} refcount={stored} reference={counted}"));
                    continue;
                } else {
                    continue;
                }
                said.push(format!("Repairing cluster {idx} refcount={stored} reference={counted}"));
            }
            // Raise before lowering: a crash in between leaves leaks only.
            for list in [raise, lower] {
                // A pass with nothing to change costs no sync.
                if list.is_empty() {
                    continue;
                }
                for (idx, counted) in list {
                    fixed_all &= counted <= self.g.rc.max();
                    self.set_refcount(m, HostCluster(idx), counted.min(self.g.rc.max()))?;
                }
                self.write_refcounts_now(m)?;
            }
        }
        if repair == Repair::All && !scan.incomplete_snapshots.is_empty() {
            // Written again whole, every entry with its 24 bytes.
            let list = m.snapshots.clone();
            self.rewrite_snapshot_table(m, list)?;
            self.write_back_durable(m)?;
            m.overlap = super::metadata_clusters(&self.g, m);
            fixed_all = false;
        }
        // `-r leaks` sets COPIED flags only when nothing but leaks was
        // found (then the refcounts they follow are right), as qemu-img.
        let others_left = r.check_errors != 0 || r.corruptions != scan.copied_corruptions;
        let fix_flags = repair == Repair::All || !others_left;
        let lines = self.copied_findings(m, &scan.copied, if fix_flags { "Repairing" } else { "ERROR" })?;
        let copied_found = lines.len() as u64;
        said.extend(lines);
        if fix_flags && (repair == Repair::All || copied_found > 0) {
            if fixed_all {
                fixed_all = self.fix_copied_sites(m, &scan.copied)?;
            } else {
                self.fix_copied(m)?;
            }
        }
        fixed_all &= m.refs.table() == &table_before[..];
        Ok((said, fixed_all, copied_found))
    }

    /// The lines QEMU's rebuild prints for the old refcount structures:
    /// its new refcounts count them, then it frees them as leaks. Ours are
    /// left out of the new refcounts from the start; the lines are the
    /// same.
    fn old_structures_freed(&self, scan: &Scan, now: &Refs) -> Vec<String> {
        let end = scan.refs.highest().map_or(0, |h| h + 1);
        (0..end)
            .filter_map(|idx| {
                let (before, after) = (scan.refs.get(idx), now.get(idx));
                (before > after).then(|| {
                    format!("Repairing cluster {idx} refcount={} reference={after}", before.min(self.g.rc.max()))
                })
            })
            .collect()
    }

    /// Sets COPIED flags from the repaired refcounts, visiting only the
    /// entries the scan kept: no table is read again. Returns false when
    /// one is left (in a table the active L1 does not own, or changed
    /// since the scan), for a second scan to report.
    fn fix_copied_sites(&self, m: &mut Meta, sites: &[CopiedSite]) -> Result<bool> {
        let mut all = true;
        let mut changed = false;
        for site in sites {
            match *site {
                CopiedSite::L1 { index, l2 } => {
                    let want = self.refcount(m, HostOffset(l2).cluster(&self.g))? == 1;
                    let raw = m.map.l1().get(index).copied().unwrap_or(0);
                    if L1Entry(raw).l2_offset() != l2 {
                        all = false;
                    } else if L1Entry(raw).copied() != want {
                        m.map.set_l1(index, if want { raw | L1_COPIED } else { raw & !L1_COPIED });
                        changed = true;
                    }
                }
                CopiedSite::L2 { word, l1, l2i } => {
                    let e = L2Entry { word, bitmap: SubclusterBitmap(0) };
                    let want = self.refcount(m, HostOffset(e.host_offset()).cluster(&self.g))? == 1;
                    if e.copied() == want {
                        continue;
                    }
                    // Only tables the active L1 owns may be changed in place.
                    let raw = m.map.l1().get(l1 as usize).copied().unwrap_or(0);
                    if !L1Entry(raw).copied() {
                        all = false;
                        continue;
                    }
                    let gc = GuestCluster(u64::from(l1) * self.g.l2_entries + u64::from(l2i));
                    let cur = self.l2_entry(m, gc)?;
                    if cur.word != word {
                        all = false;
                        continue;
                    }
                    let word = if want { word | L2_COPIED } else { word & !L2_COPIED };
                    let table = HostOffset(L1Entry(raw).l2_offset());
                    self.set_l2_raw(m, table, l2i as usize, L2Entry { word, bitmap: cur.bitmap })?;
                    changed = true;
                }
            }
        }
        if changed {
            self.write_back(m)?;
            self.sync("flushing repaired tables")?;
        }
        Ok(all)
    }

    /// Writes dirty refcount blocks and table entries and syncs, whatever
    /// the lazy-refcount setting.
    fn write_refcounts_now(&self, m: &mut Meta) -> Result<()> {
        self.write_dirty_refblocks(m)?;
        self.sync("flushing refcount blocks")?;
        if let Some((a, b)) = m.refs.take_table_dirty() {
            let bytes = encode_u64_table(&m.refs.table()[a..=b]);
            let off = HostOffset(m.hc.header.refcount_table_offset + a as u64 * 8);
            self.write_meta(m, off, &bytes, MetaKind::RefcountTable)?;
            self.sync("flushing refcount table")?;
        }
        Ok(())
    }

    /// Sets COPIED flags from the (now correct) refcounts.
    fn fix_copied(&self, m: &mut Meta) -> Result<()> {
        let cs = self.g.cluster_size;
        for i in 0..m.map.l1().len() {
            let raw = m.map.l1()[i];
            let e = L1Entry(raw);
            let l2 = e.l2_offset();
            if l2 == 0 || !l2.is_multiple_of(cs) {
                continue;
            }
            let want = self.refcount(m, HostOffset(l2).cluster(&self.g))? == 1;
            if e.copied() != want {
                m.map.set_l1(i, if want { raw | L1_COPIED } else { raw & !L1_COPIED });
            }
            if self.g.external_data {
                continue;
            }
            let t = self.l2_table(m, HostOffset(l2))?;
            for j in 0..self.g.l2_entries as usize {
                let le = self.g.l2.get(&t, j);
                let host = le.host_offset();
                if le.is_compressed() || host == 0 || !host.is_multiple_of(cs) {
                    continue;
                }
                let want = self.refcount(m, HostOffset(host).cluster(&self.g))? == 1;
                if le.copied() != want {
                    let word = if want { le.word | L2_COPIED } else { le.word & !L2_COPIED };
                    // Only tables the active L1 owns may be changed in place.
                    if !L1Entry(m.map.l1()[i]).copied() {
                        continue;
                    }
                    self.set_l2_raw(m, HostOffset(l2), j, L2Entry { word, bitmap: le.bitmap })?;
                }
            }
        }
        self.write_back(m)?;
        self.sync("flushing repaired tables")
    }

    /// Builds a new refcount table and blocks from the references, in free
    /// space past everything in use, and switches the header to them.
    /// Returns the references counted without the old structures.
    fn rebuild_refcounts(&self, m: &mut Meta, in_use_end: u64) -> Result<Refs> {
        let cs = self.g.cluster_size;
        // Count references without the old refcount structures: they are
        // replaced and become free space.
        let mut scan = self.scan_without_refcounts(m)?;
        let per_block = self.g.rc.block_entries();
        // As QEMU, right after the last cluster in use, old structures
        // included (free space past it may be the file's reserved tail).
        let start = scan.refs.highest().map_or(1, |h| h + 1).max(in_use_end);
        // Fixed point: blocks and table must also describe themselves.
        let mut blocks;
        let mut table_clusters;
        let mut total = start;
        loop {
            blocks = total.div_ceil(per_block);
            table_clusters = (blocks * 8).div_ceil(cs).max(1);
            let need = start + blocks + table_clusters;
            if need.div_ceil(per_block) <= blocks && need <= total {
                break;
            }
            total = need;
        }
        for k in 0..blocks + table_clusters {
            scan.refs.inc(start + k);
        }
        if table_clusters * cs > crate::format::limits::MAX_REFTABLE_BYTES {
            return Err(Error::unsupported("rebuilding a refcount table larger than 8 MiB"));
        }
        let mut table = vec![0u64; (table_clusters * cs / 8) as usize];
        for b in 0..blocks {
            let mut block = vec![0u8; cs as usize];
            for i in 0..per_block {
                let v = scan.refs.get(b * per_block + i).min(self.g.rc.max());
                if v != 0 {
                    self.g.rc.set(&mut block, i as usize, v);
                }
            }
            let c = HostCluster(start + b);
            m.overlap.insert(c, MetaKind::RefcountBlock);
            self.write_meta(m, c.offset(&self.g), &block, MetaKind::RefcountBlock)?;
            table[b as usize] = c.offset(&self.g).0;
        }
        let table_at = HostCluster(start + blocks);
        m.overlap.insert_range(table_at, table_clusters, MetaKind::RefcountTable);
        m.refs.swap_table(table);
        self.install_reftable(m, table_at.offset(&self.g), table_clusters)?;
        m.refs.reset_blocks(((8u64 << 20) / cs).max(4) as usize);
        m.alloc.extend_end(table_at.add(table_clusters).offset(&self.g));
        m.alloc.rescan();
        m.overlap = super::metadata_clusters(&self.g, m);
        Ok(scan.refs)
    }

    fn scan_without_refcounts(&self, m: &mut Meta) -> Result<Scan> {
        let saved_table = m.refs.swap_table(Vec::new());
        let saved_clusters = m.hc.header.refcount_table_clusters;
        m.hc.header.refcount_table_clusters = 0;
        let r = self.scan_inner(m, false);
        m.refs.swap_table(saved_table);
        m.hc.header.refcount_table_clusters = saved_clusters;
        r
    }
}

impl std::str::FromStr for Repair {
    type Err = Error;
    /// Parses qemu-img's `check -r` values, `leaks` and `all` (no repair
    /// has no name there: it is the absence of `-r`).
    fn from_str(s: &str) -> Result<Repair> {
        match s {
            "leaks" => Ok(Repair::Leaks),
            "all" => Ok(Repair::All),
            other => Err(Error::invalid(format!("Invalid option for -r: '{other}'"))),
        }
    }
}
