//! Reading the internal snapshot table as QEMU reads it, limits included.
//!
//! QEMU refuses to open an image whose table breaks one of its limits
//! (more than 65536 entries, an entry with more than 1 KiB of extra data,
//! a table over 64 MiB), yet `qemu-img check -r all` opens it and repairs
//! it: the entries past the limit are dropped, oversized extra data is cut
//! to 1 KiB. oxcow reads the table the same way: a normal open refuses
//! with QEMU's words, an open for `check` keeps what it found
//! ([`TableFinding`]) for the check to report, or to repair when asked.
//!
//! A table reaching past the end of the file reads as zeros there, as
//! QEMU reads it (all-zero entries are valid ones), rather than refusing
//! an image QEMU opens.

use crate::format::be::{pad8, u16_at, u32_at};
use crate::format::extensions::HeaderCluster;
use crate::format::limits::{MAX_SNAPSHOTS, MAX_SNAPSHOT_EXTRA_DATA, MAX_SNAPSHOT_TABLE_BYTES};
use crate::format::snapshot::FIXED_LEN;
use crate::format::{Header, SnapshotEntry};
use crate::storage::Storage;
use crate::{Error, Result};

/// A limit of QEMU's the snapshot table breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TableFinding {
    /// More entries than QEMU's 65536; `dropped` past that.
    TooMany { dropped: u32 },
    /// Entry `index` has `size` bytes of extra data, over QEMU's 1 KiB.
    ExtraTooLarge { index: usize, size: u32 },
    /// The table grows past QEMU's 64 MiB with the entry `dropped`
    /// entries before the last one.
    TooBig { dropped: u32 },
}

/// QEMU's hint after a refusal to read the table.
fn overhang_hint(n: u32) -> String {
    format!("You can force-remove all {n} overhanging snapshots with qemu-img check -r all")
}

const EXTRA_HINT: &str = "You can force-remove this extra metadata with qemu-img check -r all";

impl TableFinding {
    /// The refusal of a normal open, in QEMU's words (with its hint).
    pub(crate) fn open_error(&self) -> Error {
        match *self {
            TableFinding::TooMany { dropped } => {
                Error::field("nb_snapshots", u64::from(MAX_SNAPSHOTS + dropped), "Snapshot table too large")
            }
            TableFinding::ExtraTooLarge { index, size } => Error::field(
                "extra_data_size",
                size.into(),
                format!("Too much extra metadata in snapshot table entry {index}\n{EXTRA_HINT}"),
            ),
            TableFinding::TooBig { dropped } => Error::field(
                "snapshot table size",
                MAX_SNAPSHOT_TABLE_BYTES,
                format!("Snapshot table is too big\n{}", overhang_hint(dropped)),
            ),
        }
    }

    /// What qemu-img's check without `-r all` says before it gives up
    /// (with "Check failed: File too large").
    pub(crate) fn check_error(&self) -> String {
        let read = "ERROR failed to read the snapshot table";
        match *self {
            TableFinding::TooMany { dropped } => format!("ERROR snapshot table too large\n{}", overhang_hint(dropped)),
            TableFinding::ExtraTooLarge { index, .. } => {
                format!("{read}: Too much extra metadata in snapshot table entry {index}\n{EXTRA_HINT}")
            }
            TableFinding::TooBig { dropped } => {
                format!("{read}: Snapshot table is too big\n{}", overhang_hint(dropped))
            }
        }
    }

    /// The line qemu-img's `check -r all` prints when it repairs this.
    pub(crate) fn repair_line(&self) -> String {
        match *self {
            TableFinding::TooMany { dropped } => format!("Discarding {dropped} overhanging snapshots"),
            TableFinding::ExtraTooLarge { index, size } => format!(
                "Discarding too much extra metadata in snapshot table entry {index} ({size} > {MAX_SNAPSHOT_EXTRA_DATA})"
            ),
            TableFinding::TooBig { dropped } => {
                format!("Discarding {dropped} overhanging snapshots (snapshot table is too big)")
            }
        }
    }

    /// The corruptions qemu-img counts for it: one per dropped entry, one
    /// per entry whose extra data is cut.
    pub(crate) fn corruptions(&self) -> u64 {
        match *self {
            TableFinding::TooMany { dropped } | TableFinding::TooBig { dropped } => dropped.into(),
            TableFinding::ExtraTooLarge { .. } => 1,
        }
    }

    /// Whether repairing it drops entries (the header's count changes).
    pub(crate) fn drops_entries(&self) -> bool {
        !matches!(self, TableFinding::ExtraTooLarge { .. })
    }
}

/// The header cluster of an image opened for `check`: as
/// [`super::read_header_cluster`], except that a snapshot count over
/// QEMU's limit is kept for the check to judge (QEMU's check mode does not
/// refuse it at open). The count is validated as the limit, so the table's
/// offset is still checked.
pub(crate) fn read_header_for_check(file: &dyn Storage) -> Result<HeaderCluster> {
    let mut buf = super::read_header_bytes(file)?;
    let count = if buf.len() >= 64 { u32_at(&buf, 60) } else { 0 };
    if count > MAX_SNAPSHOTS {
        buf[60..64].copy_from_slice(&MAX_SNAPSHOTS.to_be_bytes());
    }
    let mut hc = HeaderCluster::parse(&buf)?;
    hc.header.nb_snapshots = hc.header.nb_snapshots.max(count);
    Ok(hc)
}

/// Reads `buf.len()` bytes at `off`; what lies past `file_len` reads as
/// zeros.
fn read_zero_filled(file: &dyn Storage, buf: &mut [u8], off: u64, file_len: u64) -> Result<()> {
    buf.fill(0);
    let inside = file_len.saturating_sub(off).min(buf.len() as u64) as usize;
    if inside > 0 {
        file.read_at(&mut buf[..inside], off).map_err(|e| Error::io("reading snapshot table", e))?;
    }
    Ok(())
}

/// Reads the snapshot table entry by entry (a lying `nb_snapshots` costs
/// reads, not a huge allocation). With `lenient` (an open for `check`),
/// what breaks QEMU's limits is returned as findings and the entries are
/// those a repair keeps, each with its extra data cut to 1 KiB but its
/// `extra_data_size` as on disk (the table's extent stays what the file
/// holds); otherwise the first finding refuses the open.
pub(crate) fn read_snapshot_table(
    file: &dyn Storage,
    h: &Header,
    lenient: bool,
) -> Result<(Vec<SnapshotEntry>, Vec<TableFinding>)> {
    let mut findings = Vec::new();
    let mut count = h.nb_snapshots;
    if count > MAX_SNAPSHOTS {
        let f = TableFinding::TooMany { dropped: count - MAX_SNAPSHOTS };
        if !lenient {
            return Err(f.open_error());
        }
        findings.push(f);
        count = MAX_SNAPSHOTS;
    }
    let file_len = file.len().map_err(|e| Error::io("reading image size", e))?;
    let mut out = Vec::new();
    let mut pos = h.snapshots_offset;
    // The table's length as a repair would write it (QEMU's measure for
    // its 64 MiB limit): cut extra data counts as cut.
    let mut length = 0u64;
    for i in 0..count {
        let mut fixed = [0u8; FIXED_LEN];
        read_zero_filled(file, &mut fixed, pos, file_len)?;
        let extra = u32_at(&fixed, 36);
        let kept = extra.min(MAX_SNAPSHOT_EXTRA_DATA);
        if extra > kept {
            let f = TableFinding::ExtraTooLarge { index: i as usize, size: extra };
            if !lenient {
                return Err(f.open_error());
            }
            findings.push(f);
        }
        let names = usize::from(u16_at(&fixed, 12)) + usize::from(u16_at(&fixed, 14));
        length = pad8(length as usize) as u64 + (FIXED_LEN + kept as usize + names) as u64;
        if length > MAX_SNAPSHOT_TABLE_BYTES {
            let f = TableFinding::TooBig { dropped: count - i };
            if !lenient {
                return Err(f.open_error());
            }
            findings.push(f);
            break;
        }
        // The entry as if its extra data were `kept` bytes long.
        let mut entry = vec![0u8; FIXED_LEN + kept as usize + names];
        entry[..FIXED_LEN].copy_from_slice(&fixed);
        entry[36..40].copy_from_slice(&kept.to_be_bytes());
        let at = pos + FIXED_LEN as u64;
        read_zero_filled(file, &mut entry[FIXED_LEN..FIXED_LEN + kept as usize], at, file_len)?;
        read_zero_filled(file, &mut entry[FIXED_LEN + kept as usize..], at + u64::from(extra), file_len)?;
        let (mut e, _) = SnapshotEntry::parse(&entry, pos)?;
        e.extra_data_size = extra;
        pos += (FIXED_LEN as u64 + u64::from(extra) + names as u64).next_multiple_of(8);
        out.push(e);
    }
    Ok((out, findings))
}

/// What `check -r all` did about the findings before its scan.
pub(crate) struct TableRepair {
    /// qemu-img's lines, one per finding.
    pub lines: Vec<String>,
    /// The corruptions they count as (all repaired).
    pub corruptions: u64,
    /// Extra data was cut: the table must be written again (after the
    /// refcounts are repaired).
    pub rewrite: bool,
}

impl super::Qcow2 {
    /// What qemu-img's check prints (then "Check failed: File too large")
    /// when the snapshot table breaks one of QEMU's limits and no
    /// `-r all` asks for it to be repaired.
    pub fn snapshot_table_refusal(&self) -> Option<String> {
        self.lock().snapshot_findings.first().map(TableFinding::check_error)
    }

    /// Starts the repair of the findings: the entries past QEMU's limits
    /// are dropped by writing the smaller count into the header, the table
    /// staying where it is (as QEMU); before the scan, so that the clusters
    /// only they used are found leaked and freed after the header no
    /// longer names them.
    pub(crate) fn repair_table_findings(&self, m: &mut super::state::Meta) -> Result<TableRepair> {
        let findings = std::mem::take(&mut m.snapshot_findings);
        if findings.iter().any(TableFinding::drops_entries) {
            m.hc.header.nb_snapshots = m.snapshots.len() as u32;
            self.write_header(m)?;
            self.sync("flushing header")?;
            m.overlap = super::metadata_clusters(&self.g, m);
        }
        Ok(TableRepair {
            lines: findings.iter().map(TableFinding::repair_line).collect(),
            corruptions: findings.iter().map(TableFinding::corruptions).sum(),
            rewrite: findings.iter().any(|f| !f.drops_entries()),
        })
    }
}
