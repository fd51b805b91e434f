//! The recovery journal: an oxcow extension that lets a dirty image
//! (lazy refcounts, unclean close) be repaired by looking only at the
//! clusters whose refcount went up since the last clean point, instead of
//! counting every reference in the image.
//!
//! It lives in a header extension (magic [`EXT_MAGIC`], unknown to QEMU,
//! which keeps it verbatim) and is vouched for by the autoclear bit
//! [`AUTOCLEAR_JOURNAL`]: a program that does not know the journal and
//! opens the image for writing clears that bit, so oxcow never trusts a
//! journal someone else may have made incomplete; with the bit clear it
//! repairs by the full scan, as before. Keeping it in cluster 0 rather
//! than in clusters of its own means QEMU sees no leaked cluster.
//!
//! ```text
//!  extension data (16 + 16 * capacity bytes, big-endian)
//!   0  u32  version (1)
//!   4  u32  capacity: number of record slots
//!   8  u64  generation: records of another generation are not read
//!  16  records, 16 bytes each:
//!       0  u64  first host cluster
//!       8  u16  number of clusters (1..=65535)
//!      10  u16  floor: after a crash these clusters' refcounts are at
//!               least this (1 for allocations)
//!      12  u32  CRC-32C of the generation (8 bytes, big-endian) and
//!               bytes 0..12 of the record
//! ```
//!
//! The log ends at the first slot whose checksum does not match (a slot of
//! an older generation, a zeroed one, or one torn by a crash).
//!
//! What makes it complete: every raise of a refcount (`set_refcount`) is
//! noted; a raise not covered by a record already written or waiting adds
//! a record, and waiting records are written and synced before any table
//! that may point at the cluster is written (the write-back's refcount
//! stage, `flush.rs`). Recovery only ever raises refcounts: a record for a
//! cluster that was freed again, or never used, costs a leaked cluster,
//! never a corruption. So allocations are noted ahead, a range at a time,
//! which costs one journal write per range instead of one per cluster.
//! Decrements are not logged: like in QEMU's full repair being skipped, a
//! stale refcount left high is a leak, which the crash contract allows.

use super::state::{Geometry, Meta};
use super::units::HostCluster;
use super::Qcow2;
use crate::format::be::{put_u16, put_u32, put_u64, u16_at, u32_at, u64_at};
use crate::format::extensions::{Extension, HeaderCluster};
use crate::formats::vhdx::crc32c;
use crate::{Error, Result};
use std::collections::BTreeMap;

/// Header extension type of the journal.
pub const EXT_MAGIC: u32 = 0x6f78_6a6c;
/// Autoclear bit: the journal covers every refcount raise since the last
/// clean point. Far from the bits QEMU defines (0 and 1).
pub const AUTOCLEAR_JOURNAL: u64 = 1 << 40;

const VERSION_AT: usize = 0;
const CAPACITY_AT: usize = 4;
const GENERATION_AT: usize = 8;
const RECORDS_AT: usize = 16;
const RECORD_LEN: usize = 16;
const REC_START_AT: usize = 0;
const REC_COUNT_AT: usize = 8;
const REC_FLOOR_AT: usize = 10;
const REC_CRC_AT: usize = 12;
const VERSION: u32 = 1;
/// Largest journal: 64 KiB of records.
pub const MAX_CAPACITY: u32 = 4096;
/// Clusters noted ahead per allocation record, at most: bounds the leak a
/// crash can leave per record.
const AHEAD_MAX: u64 = 64;

/// One record: refcounts of `count` clusters from `start` are at least
/// `floor` after a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Record {
    pub start: u64,
    pub count: u16,
    pub floor: u16,
}

impl Record {
    fn encode(&self, generation: u64) -> [u8; RECORD_LEN] {
        let mut r = [0u8; RECORD_LEN];
        put_u64(&mut r, REC_START_AT, self.start);
        put_u16(&mut r, REC_COUNT_AT, self.count);
        put_u16(&mut r, REC_FLOOR_AT, self.floor);
        let crc = record_crc(generation, &r);
        put_u32(&mut r, REC_CRC_AT, crc);
        r
    }
}

fn record_crc(generation: u64, rec: &[u8]) -> u32 {
    let mut b = [0u8; 8 + REC_CRC_AT];
    put_u64(&mut b, 0, generation);
    b[8..].copy_from_slice(&rec[..REC_CRC_AT]);
    crc32c(&b)
}

/// Extension data for a new, empty journal of `capacity` records.
pub fn new_extension_data(capacity: u32) -> Vec<u8> {
    let mut d = vec![0u8; RECORDS_AT + capacity as usize * RECORD_LEN];
    put_u32(&mut d, VERSION_AT, VERSION);
    put_u32(&mut d, CAPACITY_AT, capacity);
    d
}

/// The capacity the extension data declares, if its layout is sound.
fn layout(data: &[u8]) -> Option<(u32, u64)> {
    if data.len() < RECORDS_AT || u32_at(data, VERSION_AT) != VERSION {
        return None;
    }
    let cap = u32_at(data, CAPACITY_AT);
    if cap == 0 || cap > MAX_CAPACITY || data.len() != RECORDS_AT + cap as usize * RECORD_LEN {
        return None;
    }
    Some((cap, u64_at(data, GENERATION_AT)))
}

/// The records of the current generation, in order; `None` when the
/// journal cannot be trusted (bad layout, or a record out of range:
/// cluster 0, an empty range, a floor of 0 or above `max_refcount`, or
/// clusters at or past `cluster_limit`).
pub(crate) fn parse_records(data: &[u8], max_refcount: u64, cluster_limit: u64) -> Option<Vec<Record>> {
    let (cap, generation) = layout(data)?;
    let mut out = Vec::new();
    let mut ended = false;
    for i in 0..cap as usize {
        let r = &data[RECORDS_AT + i * RECORD_LEN..RECORDS_AT + (i + 1) * RECORD_LEN];
        let valid = record_crc(generation, r) == u32_at(r, REC_CRC_AT);
        if ended && valid {
            // A record of this generation after the end: a damaged slot,
            // or a batch torn by a crash before anything relied on it.
            // The full scan is right in both cases.
            return None;
        }
        if !valid {
            ended = true;
        }
        if ended {
            continue;
        }
        let rec =
            Record { start: u64_at(r, REC_START_AT), count: u16_at(r, REC_COUNT_AT), floor: u16_at(r, REC_FLOOR_AT) };
        let end = rec.start.checked_add(u64::from(rec.count))?;
        if rec.start == 0
            || rec.count == 0
            || rec.floor == 0
            || u64::from(rec.floor) > max_refcount
            || end > cluster_limit
        {
            return None;
        }
        out.push(rec);
    }
    Some(out)
}

/// Where the data of the journal extension starts in an encoded cluster 0
/// (header, extensions), if it is there.
fn data_offset(cluster0: &[u8], header_length: usize) -> Option<usize> {
    let mut pos = header_length;
    while pos + 8 <= cluster0.len() {
        let ty = u32_at(cluster0, pos);
        let len = u32_at(cluster0, pos + 4) as usize;
        if ty == 0 {
            return None;
        }
        if ty == EXT_MAGIC {
            return Some(pos + 8);
        }
        pos = crate::format::be::pad8(pos + 8 + len);
    }
    None
}

/// The journal's state in memory (part of `Meta`).
#[derive(Default)]
pub(crate) struct Journal {
    /// Raises are being logged: the extension is sound, lazy refcounts
    /// are configured and the autoclear bit is set on disk.
    armed: bool,
    capacity: usize,
    generation: u64,
    /// Records of this generation written (or being written) to disk.
    used: usize,
    /// Records noted but not written yet.
    pending: Vec<Record>,
    /// Clusters covered with floor 1 by written or pending records of the
    /// current clean-point epoch: start -> end, not overlapping.
    covered: BTreeMap<u64, u64>,
    /// Clusters covered with a floor above 1, and that floor.
    high: BTreeMap<u64, u16>,
    /// A raise that no record can hold (refcount above u16): the next
    /// write-back must make a clean point instead of logging.
    overflow: bool,
    /// Offset in the file of the extension data as last written.
    disk_offset: Option<u64>,
}

impl Journal {
    /// Whether records wait to be written.
    pub fn has_pending(&self) -> bool {
        self.armed && (!self.pending.is_empty() || self.overflow)
    }

    /// A refcount rose to `value` (`set_refcount`): makes sure a record
    /// covers it. `ahead` is how many clusters an allocation record covers
    /// (the allocator usually takes the next ones soon).
    pub fn note_raise(&mut self, c: HostCluster, value: u64, ahead: u64) {
        if !self.armed {
            return;
        }
        let c = c.0;
        if value > 1 {
            if self.high.get(&c).is_some_and(|&f| u64::from(f) >= value) {
                return;
            }
            let Ok(floor) = u16::try_from(value) else {
                self.overflow = true;
                return;
            };
            self.high.insert(c, floor);
            self.pending.push(Record { start: c, count: 1, floor });
            return;
        }
        if let Some((_, &end)) = self.covered.range(..=c).next_back() {
            if c < end {
                return;
            }
        }
        // Allocations at the end of the file come in runs: one record
        // grows with them until it is written.
        if let Some(last) = self.pending.last_mut() {
            if last.floor == 1 && last.start + u64::from(last.count) == c && last.count < u16::MAX {
                last.count += 1;
                self.covered.insert(last.start, c + 1);
                return;
            }
        }
        let next = self.covered.range(c + 1..).next().map_or(u64::MAX, |(&s, _)| s);
        let count = ahead.clamp(1, AHEAD_MAX).min(next - c);
        self.covered.insert(c, c + count);
        self.pending.push(Record { start: c, count: count as u16, floor: 1 });
    }

    /// Refcounts on disk are complete again: nothing noted so far is needed.
    pub fn clean_point(&mut self) {
        self.pending.clear();
        self.covered.clear();
        self.high.clear();
        self.overflow = false;
    }

    /// Starts a new generation in the extension data `data` (in memory):
    /// older records stop counting. What is pending stays pending.
    fn new_generation(&mut self, data: &mut [u8]) {
        self.generation = self.generation.wrapping_add(1);
        self.used = 0;
        data[RECORDS_AT..].fill(0);
        put_u64(data, GENERATION_AT, self.generation);
        // Coverage by records of the old generation is gone.
        self.covered.clear();
        self.high.clear();
        for r in &self.pending {
            if r.floor == 1 {
                self.covered.insert(r.start, r.start + u64::from(r.count));
            } else {
                self.high.insert(r.start, r.floor);
            }
        }
    }
}

/// Clusters noted ahead per allocation record: about 1 MiB of them.
fn ahead(g: &Geometry) -> u64 {
    ((1u64 << 20) >> g.cluster_bits).clamp(1, AHEAD_MAX)
}

fn ext_data(m: &mut Meta) -> Option<&mut Vec<u8>> {
    m.hc.extensions.unknown.iter_mut().find(|e| e.kind == EXT_MAGIC).map(|e| &mut e.data)
}

/// Adds an empty journal to cluster 0 as large as it has room for, the
/// autoclear bit set (an empty journal of a clean image is complete),
/// leaving room for a 1023-byte backing file name when clusters are 8 KiB
/// or more.
pub(crate) fn add_extension(hc: &mut HeaderCluster, cluster_size: u64) -> Result<()> {
    hc.extensions.unknown.retain(|e| e.kind != EXT_MAGIC);
    hc.extensions.unknown.push(Extension { kind: EXT_MAGIC, data: Vec::new() });
    let used = hc.encode()?.len() as u64;
    let spare = if cluster_size >= 8192 { 1024 + 64 } else { 0 };
    let room = cluster_size.saturating_sub(used + spare + RECORDS_AT as u64);
    let cap = (room / RECORD_LEN as u64).min(u64::from(MAX_CAPACITY)) as u32;
    if cap == 0 {
        hc.extensions.unknown.retain(|e| e.kind != EXT_MAGIC);
        return Err(Error::invalid("The first cluster has no room for the recovery journal"));
    }
    if let Some(e) = hc.extensions.unknown.iter_mut().find(|e| e.kind == EXT_MAGIC) {
        e.data = new_extension_data(cap);
    }
    hc.header.autoclear_features |= AUTOCLEAR_JOURNAL;
    Ok(())
}

impl Qcow2 {
    /// Adds a recovery journal to the image, or removes it (`amend -o
    /// journal=on|off`). Adding needs lazy refcounts; the refcounts are
    /// written first, so the empty journal is complete.
    pub fn set_journal(&self, on: bool) -> Result<()> {
        let mut m = self.quiesce()?;
        let r = (|| {
            self.write_back_inner(&mut m, true)?;
            self.sync("flushing refcounts")?;
            let mut hc = m.hc.clone();
            if on {
                let lazy = m.hc.header.compatible_features & crate::format::Compatible::LAZY_REFCOUNTS != 0;
                if !self.g.v3 || !lazy {
                    return Err(Error::invalid("The recovery journal requires lazy_refcounts=on"));
                }
                if ext_data(&mut m).is_some_and(|d| layout(d).is_some()) {
                    return Ok(());
                }
                add_extension(&mut hc, self.g.cluster_size)?;
            } else {
                hc.extensions.unknown.retain(|e| e.kind != EXT_MAGIC);
                hc.header.autoclear_features &= !AUTOCLEAR_JOURNAL;
            }
            hc.encode()?;
            m.journal = Journal::default();
            m.hc = hc;
            self.write_header(&mut m)?;
            self.sync("flushing header")?;
            if on {
                self.journal_open(&mut m, true)?;
            }
            Ok(())
        })();
        self.fail(&mut m, r)
    }

    /// `set_refcount` raised the refcount of `c` to `value`. Records are
    /// noted ahead only in writethrough mode, where each request writes
    /// its records (and syncs) by itself; otherwise a flush writes them
    /// all at once, and exact ranges leave no leak behind a crash.
    pub(crate) fn journal_note_raise(&self, m: &mut Meta, c: HostCluster, value: u64) {
        let ahead = if self.writethrough { ahead(&self.g) } else { 1 };
        m.journal.note_raise(c, value, ahead);
    }

    /// The header was written as `bytes`: remembers where the journal's
    /// data lies on disk, for appending records in place.
    pub(crate) fn journal_header_written(&self, m: &mut Meta, bytes: &[u8]) {
        if m.journal.armed {
            m.journal.disk_offset = data_offset(bytes, m.hc.header.header_length as usize).map(|o| o as u64);
        }
    }

    /// The dirty bit is about to be set (a new lazy epoch): a new
    /// generation, carried to disk by the same header write.
    pub(crate) fn journal_dirty_epoch(&self, m: &mut Meta) {
        if !m.journal.armed {
            return;
        }
        let mut j = std::mem::take(&mut m.journal);
        if let Some(d) = ext_data(m) {
            j.new_generation(d);
        }
        m.journal = j;
    }

    /// Writes the waiting records (lazy refcounts in effect), or, when
    /// they do not fit, writes the refcounts themselves and starts a new
    /// generation: a clean point. Returns whether anything was written
    /// that must be synced before a table relying on it is written.
    pub(crate) fn journal_commit(&self, m: &mut Meta) -> Result<bool> {
        if !m.journal.has_pending() {
            return Ok(false);
        }
        let j = &m.journal;
        let fits = !j.overflow && j.used + j.pending.len() <= j.capacity && j.disk_offset.is_some();
        if !fits {
            // Tables on disk may rely on records of this generation: the
            // refcounts must be durable before the generation changes.
            self.write_refcounts(m)?;
            self.sync("flushing refcounts for a clean point")?;
            m.refs.synced();
            let mut j = std::mem::take(&mut m.journal);
            j.clean_point();
            let generation = ext_data(m).map(|d| {
                j.new_generation(d);
                d[GENERATION_AT..RECORDS_AT].to_vec()
            });
            let at = j.disk_offset;
            m.journal = j;
            // The new generation reaches disk with the next sync; until
            // then the old records only ever raise refcounts further.
            if let (Some(g), Some(at)) = (generation, at) {
                self.file
                    .write_at(&g, at + GENERATION_AT as u64)
                    .map_err(|e| Error::io("writing the recovery journal", e))?;
            }
            return Ok(at.is_some());
        }
        let generation = j.generation;
        let used = j.used;
        let at = j.disk_offset.unwrap_or_default();
        let mut bytes = Vec::with_capacity(j.pending.len() * RECORD_LEN);
        for r in &j.pending {
            bytes.extend_from_slice(&r.encode(generation));
        }
        let slot = RECORDS_AT + used * RECORD_LEN;
        self.file.write_at(&bytes, at + slot as u64).map_err(|e| Error::io("writing the recovery journal", e))?;
        if let Some(d) = ext_data(m) {
            d[slot..slot + bytes.len()].copy_from_slice(&bytes);
        }
        m.journal.used += m.journal.pending.len();
        m.journal.pending.clear();
        Ok(true)
    }

    /// At a writable open (after any repair): arms the journal when the
    /// image has one and `enable` says to use it, setting its autoclear
    /// bit; otherwise clears the bit, since nobody keeps the journal.
    pub(crate) fn journal_open(&self, m: &mut Meta, enable: bool) -> Result<()> {
        let lazy = self.g.v3 && m.hc.header.compatible_features & crate::format::Compatible::LAZY_REFCOUNTS != 0;
        let sound = ext_data(m).and_then(|d| layout(d));
        let bit = m.hc.header.autoclear_features & AUTOCLEAR_JOURNAL != 0;
        match sound {
            Some((cap, generation)) if enable && lazy => {
                m.journal = Journal { armed: true, capacity: cap as usize, generation, ..Journal::default() };
                if !bit {
                    // Whatever the journal holds was not kept by us: a new
                    // generation before the bit vouches for it.
                    self.journal_dirty_epoch(m);
                    m.hc.header.autoclear_features |= AUTOCLEAR_JOURNAL;
                }
                if bit {
                    // Where the journal lies on disk, for appending in
                    // place (QEMU may have ordered the extensions).
                    let mut c0 = vec![0u8; self.g.cluster_size as usize];
                    self.file.read_at(&mut c0, 0).map_err(|e| Error::io("reading image header", e))?;
                    m.journal.disk_offset = data_offset(&c0, m.hc.header.header_length as usize).map(|o| o as u64);
                } else {
                    self.write_header(m)?;
                    self.sync("arming the recovery journal")?;
                }
            }
            _ if bit => {
                m.hc.header.autoclear_features &= !AUTOCLEAR_JOURNAL;
                self.write_header(m)?;
                self.sync("disarming the recovery journal")?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Repairs a dirty image from its journal, if it has one oxcow can
    /// trust: raises the refcount of every logged cluster to its floor,
    /// writes the refcounts and clears the dirty bit. `None` when the
    /// full scan must run instead (no journal, autoclear bit clear, a
    /// record out of range, or a failure on the way: the full scan then
    /// starts from whatever was raised, which is never wrong).
    pub(crate) fn journal_recover(&self) -> Option<super::CheckReport> {
        let mut m = self.lock();
        if !self.g.v3 || m.hc.header.autoclear_features & AUTOCLEAR_JOURNAL == 0 {
            return None;
        }
        let cs = self.g.cluster_size;
        let file_len = self.file.len().ok()?;
        // Allocations run ahead of the end of the file by at most the
        // reservation chunk (128 MiB), and records ahead of allocations.
        let limit = file_len.div_ceil(cs) + (256 << 20) / cs + AHEAD_MAX;
        let data = ext_data(&mut m)?.clone();
        let records = parse_records(&data, self.g.rc.max(), limit)?;
        let r = (|| -> Result<super::CheckReport> {
            // New refcount blocks must not land on a logged cluster.
            let end = records.iter().map(|r| r.start + u64::from(r.count)).max().unwrap_or(0);
            m.alloc.extend_end(HostCluster(end).offset(&self.g));
            let mut raised = 0u64;
            for r in &records {
                for c in r.start..r.start + u64::from(r.count) {
                    let c = HostCluster(c);
                    if self.refcount(&mut m, c)? < u64::from(r.floor) {
                        self.set_refcount(&mut m, c, u64::from(r.floor))?;
                        raised += 1;
                    }
                }
            }
            self.write_back_inner(&mut m, true)?;
            self.sync("flushing refcounts recovered from the journal")?;
            m.hc.header.incompatible_features &= !crate::format::Incompatible::DIRTY;
            self.write_header(&mut m)?;
            self.sync("clearing dirty bit")?;
            Ok(super::CheckReport {
                corruptions_fixed: raised,
                messages: vec![format!(
                    "Refcounts recovered from the journal: {} records, {raised} clusters raised",
                    records.len()
                )],
                ..Default::default()
            })
        })();
        r.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_stop_at_another_generation() {
        let mut d = new_extension_data(4);
        put_u64(&mut d, GENERATION_AT, 7);
        let a = Record { start: 5, count: 3, floor: 1 };
        let b = Record { start: 100, count: 1, floor: 2 };
        d[RECORDS_AT..RECORDS_AT + 16].copy_from_slice(&a.encode(7));
        d[RECORDS_AT + 16..RECORDS_AT + 32].copy_from_slice(&b.encode(7));
        d[RECORDS_AT + 32..RECORDS_AT + 48].copy_from_slice(&a.encode(6));
        assert_eq!(parse_records(&d, 65535, 1000), Some(vec![a, b]));
        // A record of this generation past the end: damage, distrusted.
        d[RECORDS_AT + 48..RECORDS_AT + 64].copy_from_slice(&a.encode(7));
        assert_eq!(parse_records(&d, 65535, 1000), None);
        d[RECORDS_AT + 48..RECORDS_AT + 64].fill(0);
        // Out of range: distrusted as a whole.
        assert_eq!(parse_records(&d, 65535, 100), None);
        assert_eq!(parse_records(&d, 1, 1000), None);
        put_u32(&mut d, VERSION_AT, 2);
        assert_eq!(parse_records(&d, 65535, 1000), None);
    }

    #[test]
    fn coverage_notes_ranges_ahead_without_overlap() {
        let mut j = Journal { armed: true, capacity: 8, ..Journal::default() };
        j.note_raise(HostCluster(10), 1, 4);
        j.note_raise(HostCluster(12), 1, 4);
        j.note_raise(HostCluster(8), 1, 4);
        assert_eq!(j.pending, vec![Record { start: 10, count: 4, floor: 1 }, Record { start: 8, count: 2, floor: 1 }]);
        j.note_raise(HostCluster(11), 2, 4);
        j.note_raise(HostCluster(11), 2, 4);
        assert_eq!(j.pending.len(), 3);
        // A run grows the last record.
        j.note_raise(HostCluster(20), 1, 1);
        j.note_raise(HostCluster(21), 1, 1);
        j.note_raise(HostCluster(22), 1, 1);
        assert_eq!(j.pending[3], Record { start: 20, count: 3, floor: 1 });
        assert_eq!(j.pending.len(), 4);
        j.note_raise(HostCluster(11), 70000, 4);
        assert!(j.overflow);
        j.clean_point();
        assert!(!j.has_pending());
    }
}
