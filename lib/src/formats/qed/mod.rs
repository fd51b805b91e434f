//! QED, QEMU Enhanced Disk: a header, then two levels of tables of 64-bit
//! cluster offsets (L1 in memory, L2 read on demand). An L2 entry of 0 is
//! unallocated (the backing file decides), 1 is a zero cluster.
//!
//! Header fields (little-endian): magic "QED\0", cluster_size, table_size
//! (clusters per table), header_size (clusters), features,
//! compat_features, autoclear_features, l1_table_offset, image_size,
//! backing_filename_offset, backing_filename_size.

use super::mapped::{Layout, Piece};
use super::{le32, le64, read_exact, read_vec, FormatInfo, Opened, MAX_TABLE_BYTES};
use crate::storage::Storage;
use crate::{Error, Result};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Feature bits.
pub const F_BACKING_FILE: u64 = 1;
/// The image was not closed cleanly; QEMU checks it when opening it for
/// writing.
pub const F_NEED_CHECK: u64 = 2;
/// The backing file is raw, not to be probed.
pub const F_BACKING_FORMAT_NO_PROBE: u64 = 4;
const KNOWN_FEATURES: u64 = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE;

/// The parsed and validated QED header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Bytes per cluster (a power of two, 4 KiB to 64 MiB).
    pub cluster_size: u32,
    /// Clusters per table (a power of two, 1 to 16).
    pub table_size: u32,
    /// Header length in clusters.
    pub header_size: u32,
    /// Incompatible features.
    pub features: u64,
    /// L1 table offset.
    pub l1_table_offset: u64,
    /// Virtual size.
    pub image_size: u64,
    /// Where the backing file name is, and its length.
    pub backing_filename: Option<(u32, u32)>,
}

impl Header {
    /// Parses and validates the first 64 bytes of a QED file as QEMU does.
    pub fn parse(b: &[u8]) -> Result<Header> {
        if b.len() < 64 || &b[..4] != b"QED\0" {
            return Err(Error::invalid("not a QED image"));
        }
        let cluster_size = le32(b, 4);
        let table_size = le32(b, 8);
        let header_size = le32(b, 12);
        let features = le64(b, 16);
        let l1_table_offset = le64(b, 40);
        let image_size = le64(b, 48);
        if features & !KNOWN_FEATURES != 0 {
            return Err(Error::unsupported(format!("Unsupported QED features: {:#x}", features & !KNOWN_FEATURES)));
        }
        if !cluster_size.is_power_of_two() || !(4096..=64 << 20).contains(&cluster_size) {
            return Err(Error::invalid("QED cluster size is invalid"));
        }
        if !table_size.is_power_of_two() || !(1..=16).contains(&table_size) {
            return Err(Error::invalid("QED table size is invalid"));
        }
        let cs = u64::from(cluster_size);
        let entries = u64::from(table_size) * cs / 8;
        // Two levels of tables of `entries` clusters bound the disk.
        let max_size = entries.saturating_mul(entries).saturating_mul(cs);
        if !image_size.is_multiple_of(512) || image_size > max_size {
            return Err(Error::invalid(format!("QED image size is invalid: {image_size}")));
        }
        if !l1_table_offset.is_multiple_of(cs) || l1_table_offset == 0 {
            return Err(Error::invalid("QED L1 table offset is invalid"));
        }
        if header_size == 0 || u64::from(header_size).saturating_mul(cs) > u64::from(u32::MAX) {
            return Err(Error::invalid("QED header size is invalid"));
        }
        let backing_filename = if features & F_BACKING_FILE != 0 {
            let off = le32(b, 56);
            let len = le32(b, 60);
            let end = u64::from(off) + u64::from(len);
            if end > u64::from(header_size) * cs || len > 1023 {
                return Err(Error::invalid("QED backing file name is out of bounds"));
            }
            Some((off, len))
        } else {
            None
        };
        Ok(Header { cluster_size, table_size, header_size, features, l1_table_offset, image_size, backing_filename })
    }

    fn entries(&self) -> u64 {
        u64::from(self.table_size) * u64::from(self.cluster_size) / 8
    }
}

struct Qed {
    files: [Arc<dyn Storage>; 1],
    header: Header,
    l1: RwLock<Vec<u64>>,
    file_len: u64,
    /// L2 tables read, by offset. Loads and entry updates both hold it,
    /// so a table loaded from disk is never older than an update.
    l2_cache: Mutex<HashMap<u64, Arc<Vec<u64>>>>,
    /// The end of the file, where clusters are allocated; held while
    /// allocating.
    alloc: Mutex<u64>,
    /// The need-check bit is set on disk (and must be cleared on close).
    need_check: AtomicBool,
    /// The header's feature bits other than need-check (rebase changes
    /// the backing-file bits).
    features: AtomicU64,
    /// The virtual size (grows on resize).
    size: AtomicU64,
}

/// The most one write call allocates or rewrites at once.
const MAX_RUN_BYTES: u64 = 8 << 20;

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    m.lock().map_err(|_| Error::invalid("QED lock poisoned"))
}

fn wio(r: std::io::Result<()>, what: &str) -> Result<()> {
    r.map_err(|e| Error::io(format!("writing QED {what}"), e))
}

impl Qed {
    fn table_bytes(&self) -> u64 {
        self.header.entries() * 8
    }

    fn check_table_offset(&self, off: u64, file_len: u64) -> Result<()> {
        let cs = u64::from(self.header.cluster_size);
        if !off.is_multiple_of(cs) || off < u64::from(self.header.header_size) * cs || off >= file_len {
            return Err(Error::corrupt_at("QED table offset out of the image", off));
        }
        Ok(())
    }

    fn file_end(&self) -> u64 {
        self.alloc.lock().map(|a| *a).unwrap_or(self.file_len).max(self.file_len)
    }

    fn l2(&self, off: u64) -> Result<Arc<Vec<u64>>> {
        let mut cache = lock(&self.l2_cache)?;
        if let Some(t) = cache.get(&off) {
            return Ok(t.clone());
        }
        self.check_table_offset(off, self.file_end())?;
        let bytes = read_vec(&*self.files[0], off, self.table_bytes(), MAX_TABLE_BYTES, "QED L2 table")?;
        let t = Arc::new(bytes.chunks_exact(8).map(|c| le64(c, 0)).collect::<Vec<_>>());
        if cache.len() >= 64 {
            cache.clear();
        }
        cache.insert(off, t.clone());
        Ok(t)
    }

    fn l1_entry(&self, i: u64) -> Result<u64> {
        let l1 = self.l1.read().map_err(|_| Error::invalid("QED lock poisoned"))?;
        Ok(l1.get(i as usize).copied().unwrap_or(0))
    }

    /// The L2 entry of `cluster` (0 when its table is missing).
    fn l2_entry(&self, cluster: u64) -> Result<u64> {
        let entries = self.header.entries();
        let l1 = self.l1_entry(cluster / entries)?;
        if l1 == 0 {
            return Ok(0);
        }
        Ok(self.l2(l1)?.get((cluster % entries) as usize).copied().unwrap_or(0))
    }

    /// How many clusters from `cluster` one call handles for a write of
    /// `len` bytes at `within` of it: those it reaches, in the same L2
    /// table, at most [`MAX_RUN_BYTES`], at least one.
    fn run_reach(&self, cluster: u64, within: u64, len: u64) -> u64 {
        let cs = u64::from(self.header.cluster_size);
        let entries = self.header.entries();
        (within + len).div_ceil(cs).min(entries - cluster % entries).min(MAX_RUN_BYTES / cs).max(1)
    }

    /// How much of a write of `len` bytes at `within` of allocated
    /// `cluster` (at `host`) lands in this and the following clusters while
    /// they are allocated contiguously in the file: one write for a
    /// rewrite of a sequentially written range.
    fn allocated_span(&self, cluster: u64, host: u64, within: u64, len: u64) -> Result<usize> {
        let cs = u64::from(self.header.cluster_size);
        let reach = self.run_reach(cluster, within, len);
        let mut k = 1;
        while k < reach && self.l2_entry(cluster + k)? == host + k * cs {
            k += 1;
        }
        Ok(len.min(k * cs - within) as usize)
    }

    /// Sets the need-check bit on disk, durably, before the first
    /// allocation changes any table: an image left with it set is
    /// checked and repaired when next opened for writing.
    fn mark_need_check(&self) -> Result<()> {
        if self.need_check.load(Ordering::Acquire) {
            return Ok(());
        }
        let f = &self.files[0];
        let features = self.features.load(Ordering::Acquire) | F_NEED_CHECK;
        wio(f.write_at(&features.to_le_bytes(), 16), "header")?;
        wio(f.flush(), "header")?;
        self.need_check.store(true, Ordering::Release);
        Ok(())
    }
}

impl Layout for Qed {
    fn format_name(&self) -> &'static str {
        "qed"
    }
    fn len(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    fn supports_backing(&self) -> bool {
        true
    }
    fn file_zeroes(&self, _file: usize) -> bool {
        false
    }
    fn files(&self) -> &[Arc<dyn Storage>] {
        &self.files
    }
    fn piece(&self, offset: u64, max: u64) -> Result<(Piece, u64)> {
        let cs = u64::from(self.header.cluster_size);
        let entries = self.header.entries();
        let cluster = offset / cs;
        let within = offset % cs;
        let n = max.min(cs - within);
        if self.l1_entry(cluster / entries)? == 0 {
            // A whole L2 table's worth is unallocated.
            let span = entries * cs - (offset % (entries * cs));
            return Ok((Piece::Unallocated, max.min(span)));
        }
        Ok(match self.l2_entry(cluster)? {
            0 => (Piece::Unallocated, n),
            1 => (Piece::Zero, n),
            host => {
                if !host.is_multiple_of(cs) || host >= self.file_end() {
                    return Err(Error::corrupt_at("QED data cluster offset out of the image", host));
                }
                (Piece::Data { file: 0, host: host + within }, n)
            }
        })
    }
    fn write_run(&self, offset: u64, buf: &[u8], backing: Option<&dyn crate::BlockDevice>) -> Result<usize> {
        let cs = u64::from(self.header.cluster_size);
        let entries = self.header.entries();
        let cluster = offset / cs;
        let within = offset % cs;
        let f = &self.files[0];
        let rewrite = |host: u64| -> Result<usize> {
            let n = self.allocated_span(cluster, host, within, buf.len() as u64)?;
            wio(f.write_at(&buf[..n], host + within), "data")?;
            Ok(n)
        };
        let e = self.l2_entry(cluster)?;
        if e > 1 {
            return rewrite(e);
        }
        let mut end = lock(&self.alloc)?;
        let e = self.l2_entry(cluster)?;
        if e > 1 {
            drop(end);
            return rewrite(e);
        }
        self.mark_need_check()?;
        // The run: this cluster and the following unallocated ones the
        // write reaches in the same L2 table, allocated together at the
        // end of the file so the data goes in one write and the table
        // entries in another (a sequential copy would otherwise pay two
        // writes per cluster).
        let (l1i, l2i) = (cluster / entries, cluster % entries);
        let reach = self.run_reach(cluster, within, buf.len() as u64);
        let mut states = vec![e];
        while (states.len() as u64) < reach {
            match self.l2_entry(cluster + states.len() as u64)? {
                s @ (0 | 1) => states.push(s),
                _ => break,
            }
        }
        let k = states.len() as u64;
        let n = (buf.len() as u64).min(k * cs - within) as usize;
        let host = *end;
        if within == 0 && n as u64 == k * cs {
            wio(f.write_at(&buf[..n], host), "data")?;
        } else {
            // The new clusters hold what the old ones read as around the
            // write: the backing file's data (copy-on-write), or zeros.
            let mut data = vec![0u8; (k * cs) as usize];
            for (i, &state) in states.iter().enumerate() {
                let start = (cluster + i as u64) * cs;
                let covered = start >= offset && start + cs <= offset + n as u64;
                if state == 0 && !covered && start < self.len() {
                    let upto = (start + cs).min(self.len());
                    let at = i * cs as usize;
                    crate::device::read_backing(backing, &mut data[at..at + (upto - start) as usize], start)?;
                }
            }
            data[within as usize..within as usize + n].copy_from_slice(&buf[..n]);
            wio(f.write_at(&data, host), "data")?;
        }
        *end += k * cs;
        // Crash safety: the clusters' data is written before the entries
        // that point to them, and a new L2 table before the L1 entry.
        let hosts: Vec<u64> = (0..k).map(|i| host + i * cs).collect();
        let l2off = self.l1_entry(l1i)?;
        if l2off == 0 {
            let mut table = vec![0u64; entries as usize];
            table[l2i as usize..(l2i + k) as usize].copy_from_slice(&hosts);
            let bytes: Vec<u8> = table.iter().flat_map(|v| v.to_le_bytes()).collect();
            let toff = *end;
            wio(f.write_at(&bytes, toff), "L2 table")?;
            *end += self.table_bytes();
            lock(&self.l2_cache)?.insert(toff, Arc::new(table));
            wio(f.write_at(&toff.to_le_bytes(), self.header.l1_table_offset + l1i * 8), "L1 table")?;
            self.l1.write().map_err(|_| Error::invalid("QED lock poisoned"))?[l1i as usize] = toff;
        } else {
            // Loaded (and checked) before the cache lock is taken again.
            drop(self.l2(l2off)?);
            let mut cache = lock(&self.l2_cache)?;
            let bytes: Vec<u8> = hosts.iter().flat_map(|v| v.to_le_bytes()).collect();
            wio(f.write_at(&bytes, l2off + l2i * 8), "L2 table")?;
            // Evicted meanwhile: the next use reads the entries just written.
            if let Some(t) = cache.get_mut(&l2off) {
                Arc::make_mut(t)[l2i as usize..(l2i + k) as usize].copy_from_slice(&hosts);
            }
        }
        Ok(n)
    }
    fn check(&self) -> Result<crate::qcow2::CheckReport> {
        let mut r = crate::qcow2::CheckReport::default();
        let cs = u64::from(self.header.cluster_size);
        let file_len = self.file_end();
        let nclusters = file_len.div_ceil(cs);
        // Which host clusters something refers to: header, L1, tables, data.
        let mut used = vec![false; nclusters as usize];
        let mut mark = |off: u64, n: u64| {
            for c in off / cs..(off / cs + n).min(nclusters) {
                used[c as usize] = true;
            }
        };
        mark(0, u64::from(self.header.header_size));
        let tcl = self.table_bytes() / cs;
        mark(self.header.l1_table_offset, tcl);
        r.total_clusters = self.len().div_ceil(cs);
        let bad = |e: u64| !e.is_multiple_of(cs) || e >= file_len;
        let l1: Vec<u64> = self.l1.read().map_err(|_| Error::invalid("QED lock poisoned"))?.clone();
        let mut last = 0u64;
        for &t in &l1 {
            if t == 0 {
                continue;
            }
            if self.check_table_offset(t, file_len).is_err() {
                r.corruptions += 1;
                continue;
            }
            mark(t, tcl);
            for &e in self.l2(t)?.iter() {
                if e <= 1 {
                    continue;
                }
                // As qemu-img, a bad entry still counts in the statistics.
                r.allocated_clusters += 1;
                if last != 0 && last.checked_add(cs) != Some(e) {
                    r.fragmented_clusters += 1;
                }
                last = e;
                if bad(e) {
                    r.corruptions += 1;
                    continue;
                }
                mark(e, 1);
            }
        }
        r.leaks = used.iter().filter(|&&u| !u).count() as u64;
        Ok(r)
    }
    fn repair(&self) -> Result<(u64, u64)> {
        // Entries cleared are corruptions fixed; leaked clusters stay, as
        // QED has nothing that could give them back.
        self.mark_need_check()?;
        Ok((0, repair(self)?))
    }
    fn resize(&self, new_len: u64) -> Result<()> {
        let cs = u64::from(self.header.cluster_size);
        let entries = self.header.entries();
        let max = entries.saturating_mul(entries).saturating_mul(cs);
        if !new_len.is_multiple_of(512) || new_len > max {
            return Err(Error::invalid("Invalid image size specified"));
        }
        if new_len < self.len() {
            return Err(Error::invalid("Shrinking images is currently not supported"));
        }
        // One field: the tables already cover the largest size.
        let f = &self.files[0];
        wio(f.write_at(&new_len.to_le_bytes(), 48), "header")?;
        wio(f.flush(), "header")?;
        self.size.store(new_len, Ordering::Release);
        Ok(())
    }
    fn can_set_backing(&self) -> bool {
        true
    }
    fn set_backing(&self, name: Option<&str>, format: Option<&str>) -> Result<()> {
        // No allocation (which sets need-check) while the header changes.
        let _alloc = lock(&self.alloc)?;
        let f = &self.files[0];
        let name = name.unwrap_or("");
        let room = u64::from(self.header.header_size) * u64::from(self.header.cluster_size);
        if name.len() > 1023 || 64 + name.len() as u64 > room {
            return Err(Error::invalid("Backing file name too long"));
        }
        // The header as it is on disk (size after a resize, need-check),
        // with the backing bits and the name (right after the fields, as
        // QEMU places it) replaced.
        let mut head = vec![0u8; 64];
        read_exact(&**f, &mut head, 0, "QED header")?;
        let mut features = le64(&head, 16) & !(F_BACKING_FILE | F_BACKING_FORMAT_NO_PROBE);
        if !name.is_empty() {
            features |= F_BACKING_FILE;
            if format == Some("raw") {
                features |= F_BACKING_FORMAT_NO_PROBE;
            }
        }
        head[16..24].copy_from_slice(&features.to_le_bytes());
        head[56..60].copy_from_slice(&64u32.to_le_bytes());
        head[60..64].copy_from_slice(&(name.len() as u32).to_le_bytes());
        head.extend_from_slice(name.as_bytes());
        wio(f.write_at(&head, 0), "header")?;
        wio(f.flush(), "header")?;
        self.features.store(features & !F_NEED_CHECK, Ordering::Release);
        Ok(())
    }
    fn close(&self) -> Result<()> {
        if self.need_check.swap(false, Ordering::AcqRel) {
            // Everything the tables point to is flushed (the caller
            // flushed): the image is consistent again.
            let f = &self.files[0];
            wio(f.write_at(&self.features.load(Ordering::Acquire).to_le_bytes(), 16), "header")?;
            wio(f.flush(), "header")?;
        }
        Ok(())
    }
}

/// Opens a QED image; `write` when it will be written. An image whose
/// need-check bit is set (not closed cleanly) gets its tables checked
/// first when opened for writing, as QEMU does: entries pointing outside
/// the file or off cluster boundaries are cleared.
pub fn open(file: Arc<dyn Storage>, write: bool) -> Result<Opened> {
    let mut head = [0u8; 64];
    read_exact(&*file, &mut head, 0, "QED header")?;
    let header = Header::parse(&head)?;
    let file_len = file.len().map_err(|e| Error::io("reading QED image size", e))?;
    let mut backing_name = None;
    if let Some((off, len)) = header.backing_filename {
        let raw = read_vec(&*file, u64::from(off), u64::from(len), 1023, "QED backing file name")?;
        backing_name = Some(String::from_utf8_lossy(&raw).into_owned());
    }
    let cs = u64::from(header.cluster_size);
    let end = file_len.div_ceil(cs) * cs;
    let dirty = header.features & F_NEED_CHECK != 0;
    let q = Qed {
        files: [file],
        header: header.clone(),
        l1: RwLock::new(Vec::new()),
        file_len,
        l2_cache: Mutex::new(HashMap::new()),
        alloc: Mutex::new(end),
        need_check: AtomicBool::new(dirty && write),
        features: AtomicU64::new(header.features & !F_NEED_CHECK),
        size: AtomicU64::new(header.image_size),
    };
    q.check_table_offset(q.header.l1_table_offset, file_len)?;
    let l1 = read_vec(&*q.files[0], q.header.l1_table_offset, q.table_bytes(), MAX_TABLE_BYTES, "QED L1 table")?;
    *q.l1.write().map_err(|_| Error::invalid("QED lock poisoned"))? = l1.chunks_exact(8).map(|c| le64(c, 0)).collect();
    if dirty && write {
        repair(&q)?;
    }
    let info = FormatInfo {
        cluster_size: Some(cs),
        backing_format: backing_name
            .as_ref()
            .and_then(|_| (q.header.features & F_BACKING_FORMAT_NO_PROBE != 0).then(|| "raw".to_string())),
        backing_name,
        specific: Vec::new(),
        // qemu-img info does not show the need-check bit as a dirty flag.
        dirty: false,
        extent_files: Vec::new(),
    };
    Ok(Opened { layout: Arc::new(q), info })
}

/// Clears table entries an interrupted run may have left pointing
/// outside the file; the need-check bit stays set until a clean close.
fn repair(q: &Qed) -> Result<u64> {
    let cs = u64::from(q.header.cluster_size);
    let f = &q.files[0];
    let bad = |e: u64| e > 1 && (!e.is_multiple_of(cs) || e >= q.file_len);
    let l1: Vec<u64> = q.l1.read().map_err(|_| Error::invalid("QED lock poisoned"))?.clone();
    let mut fixed = 0;
    for (i, &t) in l1.iter().enumerate() {
        if t == 0 {
            continue;
        }
        if t == 1 || bad(t) || q.check_table_offset(t, q.file_len).is_err() {
            wio(f.write_at(&0u64.to_le_bytes(), q.header.l1_table_offset + i as u64 * 8), "L1 table")?;
            q.l1.write().map_err(|_| Error::invalid("QED lock poisoned"))?[i] = 0;
            fixed += 1;
            continue;
        }
        let table = q.l2(t)?;
        for (j, &e) in table.iter().enumerate() {
            if bad(e) {
                wio(f.write_at(&0u64.to_le_bytes(), t + j as u64 * 8), "L2 table")?;
                fixed += 1;
            }
        }
    }
    lock(&q.l2_cache)?.clear();
    wio(f.flush(), "repair")?;
    Ok(fixed)
}

/// Creates a QED image in the empty `file` as qemu-img does: one header
/// cluster (with the backing file name after the header), then the L1
/// table. A raw backing file is marked so it is never probed.
pub fn create(
    file: &dyn Storage,
    size: u64,
    cluster_size: u32,
    table_size: u32,
    backing: Option<(&str, bool)>,
) -> Result<()> {
    let size = size.div_ceil(512) * 512;
    let mut h = vec![0u8; 64];
    h[..4].copy_from_slice(b"QED\0");
    h[4..8].copy_from_slice(&cluster_size.to_le_bytes());
    h[8..12].copy_from_slice(&table_size.to_le_bytes());
    h[12..16].copy_from_slice(&1u32.to_le_bytes());
    let cs = u64::from(cluster_size);
    h[40..48].copy_from_slice(&cs.to_le_bytes());
    h[48..56].copy_from_slice(&size.to_le_bytes());
    let mut features = 0;
    if let Some((name, raw)) = backing {
        if name.len() > 1023 || 64 + name.len() as u64 > cs {
            return Err(Error::invalid("Backing file name too long"));
        }
        features |= F_BACKING_FILE;
        if raw {
            features |= F_BACKING_FORMAT_NO_PROBE;
        }
        h[56..60].copy_from_slice(&64u32.to_le_bytes());
        h[60..64].copy_from_slice(&(name.len() as u32).to_le_bytes());
        h.extend_from_slice(name.as_bytes());
    }
    h[16..24].copy_from_slice(&features.to_le_bytes());
    // Validated as any opened image is, before a byte is written.
    Header::parse(&h)?;
    let io = |r: std::io::Result<()>| r.map_err(|e| Error::io("creating QED image", e));
    io(file.write_at(&h, 0))?;
    io(file.set_len(cs * (1 + u64::from(table_size))))?;
    io(file.flush())
}
