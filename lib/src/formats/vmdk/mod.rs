//! VMDK, VMware's disk: a text descriptor (its own file, or embedded in a
//! sparse file) lists extents, each flat (sectors as they are), sparse
//! (hosted "KDMV" or ESX "COWD" files with a grain directory of grain
//! tables of 32-bit sector numbers) or zero. streamOptimized files are
//! sparse files whose grains are deflate-compressed, each behind a marker,
//! with the grain directory found through a footer at the end.
//!
//! Grain table entries: 0 unallocated (the parent decides), 1 a zeroed
//! grain (when the header's zero-grain flag is set), else the grain's
//! sector.

pub mod descriptor;

use super::mapped::{Layout, Piece};
use super::{le32, le64, read_exact, read_vec, FormatInfo, InfoValue, OpenExtra, Opened, MAX_TABLE_BYTES};
use crate::resolve_backing;
use crate::storage::Storage;
use crate::{Error, Result};
use descriptor::{Descriptor, ExtentKind, CREATE_TYPES};
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex};

const FLAG_RGD: u32 = 1 << 1;
const FLAG_ZERO_GRAIN: u32 = 1 << 2;
const FLAG_COMPRESSED: u32 = 1 << 16;
const FLAG_MARKER: u32 = 1 << 17;
const COMPRESSION_DEFLATE: u16 = 1;
const GD_AT_END: u64 = u64::MAX;
const MARKER_END_OF_STREAM: u32 = 0;
const MARKER_FOOTER: u32 = 3;
/// Descriptors larger than this are refused (QEMU reads under 1 MiB).
const MAX_DESCRIPTOR: u64 = (1 << 20) - 1;

/// A sparse extent's grain directory and geometry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparseHeader {
    /// Extent size in sectors.
    pub capacity: u64,
    /// Grain size in sectors.
    pub grain_sectors: u64,
    /// Entries per grain table.
    pub gt_entries: u64,
    /// Byte offset of the grain directory.
    pub gd_offset: u64,
    /// Whether entry 1 means a zeroed grain.
    pub zero_grain: bool,
    /// Grains are deflate-compressed.
    pub compressed: bool,
    /// Grains sit behind markers.
    pub markers: bool,
    /// The embedded descriptor (byte offset, length), if any.
    pub descriptor: Option<(u64, u64)>,
    /// Byte offset of the redundant grain directory, when kept.
    pub rgd_offset: Option<u64>,
}

impl SparseHeader {
    /// Parses a hosted sparse ("KDMV") header: the first 512 bytes.
    pub fn parse_vmdk4(b: &[u8]) -> Result<SparseHeader> {
        if b.len() < 512 || &b[..4] != b"KDMV" {
            return Err(Error::invalid("not a VMDK sparse extent"));
        }
        let version = le32(b, 4);
        if version > 3 {
            return Err(Error::unsupported(format!("Unsupported VMDK version {version}")));
        }
        let flags = le32(b, 8);
        let capacity = le64(b, 12);
        let grain_sectors = le64(b, 20);
        let desc_offset = le64(b, 28);
        let desc_size = le64(b, 36);
        let gt_entries = u64::from(le32(b, 44));
        let gd_offset = le64(b, 56);
        let compress = u16::from_le_bytes([b[77], b[78]]);
        let h = SparseHeader {
            capacity,
            grain_sectors,
            gt_entries,
            gd_offset: if gd_offset == GD_AT_END {
                GD_AT_END
            } else {
                gd_offset.checked_mul(512).ok_or_else(|| Error::invalid("VMDK grain directory offset overflows"))?
            },
            zero_grain: flags & FLAG_ZERO_GRAIN != 0,
            compressed: compress == COMPRESSION_DEFLATE,
            markers: flags & FLAG_MARKER != 0,
            descriptor: (desc_offset != 0 && desc_size != 0)
                .then(|| (desc_offset.saturating_mul(512), desc_size.saturating_mul(512))),
            rgd_offset: (flags & FLAG_RGD != 0 && le64(b, 48) != 0).then(|| le64(b, 48).saturating_mul(512)),
        };
        h.validate()?;
        Ok(h)
    }

    /// Parses an ESX sparse ("COWD") header: 4096-entry grain tables.
    pub fn parse_vmdk3(b: &[u8]) -> Result<SparseHeader> {
        if b.len() < 44 || &b[..4] != b"COWD" {
            return Err(Error::invalid("not a VMDK3 sparse extent"));
        }
        let h = SparseHeader {
            capacity: u64::from(le32(b, 12)),
            grain_sectors: u64::from(le32(b, 16)),
            gt_entries: 4096,
            gd_offset: u64::from(le32(b, 20)) * 512,
            zero_grain: false,
            compressed: false,
            markers: false,
            descriptor: None,
            rgd_offset: None,
        };
        h.validate()?;
        Ok(h)
    }

    fn validate(&self) -> Result<()> {
        if self.grain_sectors == 0 || self.grain_sectors > 0x20_0000 {
            return Err(Error::invalid("Invalid granularity, image may be corrupt"));
        }
        if self.gt_entries == 0 || self.gt_entries > 4096 {
            return Err(Error::invalid("L2 table size too big"));
        }
        if self.capacity > (1 << 41) {
            return Err(Error::invalid(format!("VMDK capacity too large: {} sectors", self.capacity)));
        }
        if self.gd_entries() > 32 << 20 {
            return Err(Error::invalid("L1 size too big"));
        }
        Ok(())
    }

    /// Sectors one grain table covers.
    fn gt_span(&self) -> u64 {
        self.gt_entries * self.grain_sectors
    }

    /// Entries of the grain directory.
    pub fn gd_entries(&self) -> u64 {
        self.capacity.div_ceil(self.gt_span())
    }
}

enum ExtentData {
    Flat {
        file: usize,
        start: u64,
    },
    Zero,
    Sparse {
        file: usize,
        header: SparseHeader,
        gd: Vec<u32>,
        /// The redundant directory, kept in step on writes.
        rgd: Vec<u32>,
        /// Where the next grain goes; held while allocating.
        next: Mutex<u64>,
    },
}

struct Extent {
    /// First guest byte.
    start: u64,
    /// Bytes.
    len: u64,
    data: ExtentData,
}

/// Grain tables read, by extent and sector.
type GrainTables = HashMap<(usize, u32), Arc<Vec<u32>>>;

struct Vmdk {
    files: Vec<Arc<dyn Storage>>,
    extents: Vec<Extent>,
    len: u64,
    gt_cache: Mutex<GrainTables>,
    /// A compressed grain was appended: the stream needs its
    /// end-of-stream marker again on close.
    appended: std::sync::atomic::AtomicBool,
}

impl Vmdk {
    fn grain_table(&self, ext: usize, file: usize, header: &SparseHeader, sector: u32) -> Result<Arc<Vec<u32>>> {
        // Loads and entry updates hold the cache, so a table loaded from
        // disk is never older than an update.
        let mut cache = self.gt_cache.lock().map_err(|_| Error::invalid("VMDK cache poisoned"))?;
        if let Some(t) = cache.get(&(ext, sector)) {
            return Ok(t.clone());
        }
        let f = &self.files[file];
        let raw = read_vec(&**f, u64::from(sector) * 512, header.gt_entries * 4, MAX_TABLE_BYTES, "VMDK grain table")?;
        let t = Arc::new(raw.chunks_exact(4).map(|c| le32(c, 0)).collect::<Vec<_>>());
        if cache.len() >= 256 {
            cache.clear();
        }
        cache.insert((ext, sector), t.clone());
        Ok(t)
    }
}

impl Layout for Vmdk {
    fn format_name(&self) -> &'static str {
        "vmdk"
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn supports_backing(&self) -> bool {
        true
    }
    fn file_zeroes(&self, file: usize) -> bool {
        self.extents.iter().any(|e| matches!(e.data, ExtentData::Flat { file: f, .. } if f == file))
    }
    fn files(&self) -> &[Arc<dyn Storage>] {
        &self.files
    }
    fn piece(&self, offset: u64, max: u64) -> Result<(Piece, u64)> {
        let i = self.extents.partition_point(|e| e.start + e.len <= offset);
        let e = self.extents.get(i).ok_or_else(|| Error::invalid("offset past the last VMDK extent"))?;
        let rel = offset - e.start;
        let max = max.min(e.len - rel);
        match &e.data {
            ExtentData::Flat { file, start } => Ok((Piece::Data { file: *file, host: start + rel }, max)),
            ExtentData::Zero => Ok((Piece::Zero, max)),
            ExtentData::Sparse { file, header, gd, .. } => {
                let grain = header.grain_sectors * 512;
                let within = rel % grain;
                let n = max.min(grain - within);
                let sector = rel / 512;
                let gt_sector = gd.get((sector / header.gt_span()) as usize).copied().unwrap_or(0);
                if gt_sector == 0 {
                    let span = header.gt_span() * 512;
                    return Ok((Piece::Unallocated, max.min(span - rel % span)));
                }
                let gt = self.grain_table(i, *file, header, gt_sector)?;
                let entry =
                    gt.get(((sector / header.grain_sectors) % header.gt_entries) as usize).copied().unwrap_or(0);
                Ok(match entry {
                    0 => (Piece::Unallocated, n),
                    1 if header.zero_grain => (Piece::Zero, n),
                    s if header.compressed => {
                        (Piece::Compressed { key: (i as u64) << 48 | u64::from(s), skip: within }, n)
                    }
                    s => (Piece::Data { file: *file, host: u64::from(s) * 512 + within }, n),
                })
            }
        }
    }
    fn write_run(&self, offset: u64, buf: &[u8], backing: Option<&dyn crate::BlockDevice>) -> Result<usize> {
        let i = self.extents.partition_point(|e| e.start + e.len <= offset);
        let e = self.extents.get(i).ok_or_else(|| Error::invalid("offset past the last VMDK extent"))?;
        let rel = offset - e.start;
        let max = (buf.len() as u64).min(e.len - rel) as usize;
        let (file, header, gd, rgd, next) = match &e.data {
            ExtentData::Flat { file, start } => {
                wio(self.files[*file].write_at(&buf[..max], start + rel), "flat extent")?;
                return Ok(max);
            }
            ExtentData::Zero => return Err(Error::ReadOnly("VMDK zero extents are not writable".into())),
            ExtentData::Sparse { file, header, gd, rgd, next } => (*file, header, gd, rgd, next),
        };
        let f = &self.files[file];
        let grain = header.grain_sectors * 512;
        let within = rel % grain;
        let n = max.min((grain - within) as usize);
        let sector = rel / 512;
        let gdi = (sector / header.gt_span()) as usize;
        let gti = (sector / header.grain_sectors) % header.gt_entries;
        let gt_sector = gd.get(gdi).copied().unwrap_or(0);
        if gt_sector == 0 {
            return Err(Error::unsupported("writing where a VMDK grain table is missing"));
        }
        let entry = |me: &Self| -> Result<u32> {
            Ok(me.grain_table(i, file, header, gt_sector)?.get(gti as usize).copied().unwrap_or(0))
        };
        let ent = entry(self)?;
        let in_place = |ent: u32| !header.compressed && (ent > 1 || (ent == 1 && !header.zero_grain));
        if in_place(ent) {
            wio(f.write_at(&buf[..n], u64::from(ent) * 512 + within), "grain")?;
            return Ok(n);
        }
        // A whole grain's record does not depend on the old grain: it is
        // compressed before taking the allocation lock, so writers
        // compress in parallel.
        let whole = (header.compressed && within == 0 && n as u64 == grain).then(|| grain_record(&buf[..n], rel / 512));
        let mut end = next.lock().map_err(|_| Error::invalid("VMDK allocation lock poisoned"))?;
        let ent = entry(self)?;
        if in_place(ent) {
            drop(end);
            wio(f.write_at(&buf[..n], u64::from(ent) * 512 + within), "grain")?;
            return Ok(n);
        }
        // The new grain holds what the old one read as around the write:
        // the parent's data (copy-on-write), zeros, or (compressed grains
        // are never rewritten in place) the old grain's data.
        let mut data = vec![0u8; grain as usize];
        let start = e.start + rel - within;
        match ent {
            0 => {
                let upto = (start + grain).min(self.len);
                crate::device::read_backing(backing, &mut data[..(upto - start) as usize], start)?;
            }
            1 if header.zero_grain => {}
            s => self.read_compressed((i as u64) << 48 | u64::from(s), 0, &mut data)?,
        }
        data[within as usize..within as usize + n].copy_from_slice(&buf[..n]);
        let host = *end;
        let host_sector = u32::try_from(host / 512).map_err(|_| Error::invalid("VMDK extent file too large"))?;
        if header.compressed {
            let rec = match whole {
                Some(r) => r?,
                None => grain_record(&data, (rel - within) / 512)?,
            };
            wio(f.write_at(&rec, host), "grain")?;
            *end += rec.len() as u64;
            self.appended.store(true, std::sync::atomic::Ordering::Release);
        } else {
            wio(f.write_at(&data, host), "grain")?;
            *end += grain;
        }
        // Crash safety: the grain is written before the table entries
        // that point to it (the redundant table's too).
        let table = self.grain_table(i, file, header, gt_sector)?;
        let mut cache = self.gt_cache.lock().map_err(|_| Error::invalid("VMDK cache poisoned"))?;
        wio(f.write_at(&host_sector.to_le_bytes(), u64::from(gt_sector) * 512 + gti * 4), "grain table")?;
        if let Some(&r) = rgd.get(gdi).filter(|&&r| r != 0) {
            wio(f.write_at(&host_sector.to_le_bytes(), u64::from(r) * 512 + gti * 4), "grain table")?;
        }
        let mut t = (*table).clone();
        t[gti as usize] = host_sector;
        cache.insert((i, gt_sector), Arc::new(t));
        Ok(n)
    }
    fn check(&self) -> Result<crate::qcow2::CheckReport> {
        let mut r = crate::qcow2::CheckReport::default();
        for (i, e) in self.extents.iter().enumerate() {
            let ExtentData::Sparse { file, header, gd, .. } = &e.data else { continue };
            let len = self.files[*file].len().map_err(|e| Error::io("reading VMDK size", e))?;
            for (gdi, &gt) in gd.iter().enumerate() {
                if gt == 0 {
                    continue;
                }
                if u64::from(gt) * 512 >= len {
                    r.messages.push(format!("ERROR: grain table {gdi} points after EOF"));
                    r.corruptions += 1;
                    continue;
                }
                for (j, &g) in self.grain_table(i, *file, header, gt)?.iter().enumerate() {
                    if g > 1 && u64::from(g) * 512 >= len {
                        let sector = (gdi as u64 * header.gt_entries + j as u64) * header.grain_sectors;
                        r.messages.push(format!("ERROR: cluster offset for sector {sector} points after EOF"));
                        r.corruptions += 1;
                    }
                }
            }
        }
        Ok(r)
    }
    fn close(&self) -> Result<()> {
        if !self.appended.swap(false, std::sync::atomic::Ordering::AcqRel) {
            return Ok(());
        }
        // The stream ends with an end-of-stream marker (a zero sector)
        // after the last grain; later grains go after it.
        for e in &self.extents {
            if let ExtentData::Sparse { file, header, next, .. } = &e.data {
                if header.compressed {
                    let end = *next.lock().map_err(|_| Error::invalid("VMDK allocation lock poisoned"))?;
                    wio(self.files[*file].write_at(&[0u8; 512], end), "end-of-stream marker")?;
                    wio(self.files[*file].flush(), "end-of-stream marker")?;
                }
            }
        }
        Ok(())
    }
    fn read_compressed(&self, key: u64, skip: u64, buf: &mut [u8]) -> Result<()> {
        let ext = (key >> 48) as usize;
        let sector = key & 0xffff_ffff;
        let Some(Extent { data: ExtentData::Sparse { file, header, .. }, .. }) = self.extents.get(ext) else {
            return Err(Error::invalid("bad VMDK compressed grain"));
        };
        let grain = header.grain_sectors * 512;
        let f = &self.files[*file];
        let (data_off, clen) = if header.markers {
            let mut m = [0u8; 12];
            read_exact(&**f, &mut m, sector * 512, "VMDK grain marker")?;
            (sector * 512 + 12, u64::from(le32(&m, 8)))
        } else {
            (sector * 512, grain * 2)
        };
        let comp = read_vec(&**f, data_off, clen, grain * 2 + 4096, "VMDK compressed grain")?;
        let mut out = Vec::with_capacity(grain as usize);
        flate2::read::ZlibDecoder::new(&comp[..])
            .take(grain)
            .read_to_end(&mut out)
            .map_err(|_| Error::corrupt_at("VMDK compressed grain does not inflate", sector * 512))?;
        if out.len() as u64 != grain {
            return Err(Error::corrupt_at("VMDK compressed grain has the wrong size", sector * 512));
        }
        let s = skip as usize;
        let src = out.get(s..s + buf.len()).ok_or_else(|| Error::invalid("read past a VMDK grain"))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// Reads a sparse extent's header (following a streamOptimized footer)
/// and grain directory.
fn open_sparse(f: &dyn Storage, head: &[u8]) -> Result<(SparseHeader, Vec<u32>, Vec<u32>)> {
    let mut h = if &head[..4] == b"COWD" { SparseHeader::parse_vmdk3(head)? } else { SparseHeader::parse_vmdk4(head)? };
    if h.gd_offset == GD_AT_END {
        let len = f.len().map_err(|e| Error::io("reading VMDK size", e))?;
        if len < 1536 {
            return Err(Error::invalid("Invalid footer"));
        }
        let mut foot = vec![0u8; 1536];
        read_exact(f, &mut foot, len - 1536, "VMDK footer")?;
        let ok = le32(&foot, 8) == 0
            && le32(&foot, 12) == MARKER_FOOTER
            && le64(&foot, 1024) == 0
            && le32(&foot, 1032) == 0
            && le32(&foot, 1036) == MARKER_END_OF_STREAM;
        let fh = SparseHeader::parse_vmdk4(&foot[512..1024]).ok().filter(|_| ok);
        let fh = fh.filter(|x| x.gd_offset != GD_AT_END).ok_or_else(|| Error::invalid("Invalid footer"))?;
        h = fh;
    }
    let raw = read_vec(f, h.gd_offset, h.gd_entries() * 4, MAX_TABLE_BYTES, "VMDK grain directory")?;
    let gd = raw.chunks_exact(4).map(|c| le32(c, 0)).collect();
    let rgd = match h.rgd_offset {
        Some(off) => {
            let raw = read_vec(f, off, h.gd_entries() * 4, MAX_TABLE_BYTES, "VMDK redundant grain directory")?;
            raw.chunks_exact(4).map(|c| le32(c, 0)).collect()
        }
        None => Vec::new(),
    };
    Ok((h, gd, rgd))
}

/// A compressed grain as streamOptimized stores it: a marker (the
/// grain's first sector, the compressed length), the deflate stream,
/// padding to a sector.
fn grain_record(data: &[u8], lba: u64) -> Result<Vec<u8>> {
    let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut enc, data).map_err(|e| Error::io("compressing a VMDK grain", e))?;
    let z = enc.finish().map_err(|e| Error::io("compressing a VMDK grain", e))?;
    let mut rec = Vec::with_capacity(12 + z.len() + 512);
    rec.extend_from_slice(&lba.to_le_bytes());
    rec.extend_from_slice(&(z.len() as u32).to_le_bytes());
    rec.extend_from_slice(&z);
    rec.resize(rec.len().div_ceil(512) * 512, 0);
    Ok(rec)
}

/// Where a sparse extent's next grain goes: the end of its file, on a
/// grain boundary.
fn sparse_end(f: &dyn Storage, h: &SparseHeader) -> Result<Mutex<u64>> {
    let len = f.len().map_err(|e| Error::io("reading VMDK size", e))?;
    // Compressed grains are packed sector by sector.
    let unit = if h.compressed { 512 } else { h.grain_sectors * 512 };
    Ok(Mutex::new(len.div_ceil(unit) * unit))
}

fn wio(r: std::io::Result<()>, what: &str) -> Result<()> {
    r.map_err(|e| Error::io(format!("writing VMDK {what}"), e))
}

fn extent_info(
    len: u64,
    filename: &str,
    type_name: &str,
    sparse: Option<&SparseHeader>,
) -> Vec<(&'static str, InfoValue)> {
    let mut v = Vec::new();
    if sparse.is_some_and(|s| s.compressed) {
        v.push(("compressed", InfoValue::Bool(true)));
    }
    v.push(("virtual-size", InfoValue::U64(len)));
    v.push(("filename", InfoValue::Str(filename.to_string())));
    if let Some(s) = sparse {
        v.push(("cluster-size", InfoValue::U64(s.grain_sectors * 512)));
    }
    v.push(("format", InfoValue::Str(type_name.to_string())));
    v
}

/// Opens a VMDK image: `file` is the descriptor or a sparse file, found at
/// `path`; `extra` opens the extent files a descriptor names.
pub fn open(file: Arc<dyn Storage>, path: &Path, extra: &OpenExtra) -> Result<Opened> {
    let mut head = vec![0u8; 512];
    read_exact(&*file, &mut head, 0, "VMDK header")?;
    let mut files = vec![file.clone()];
    let mut extents = Vec::new();
    let mut info_extents = Vec::new();
    let desc;
    let mut cluster_size = None;
    if &head[..4] == b"KDMV" || &head[..4] == b"COWD" {
        let (h, gd, rgd) = open_sparse(&*file, &head)?;
        let next = sparse_end(&*file, &h)?;
        desc = match h.descriptor {
            Some((off, len)) => Descriptor::parse(&read_vec(&*file, off, len, MAX_DESCRIPTOR, "VMDK descriptor")?)?,
            None => Descriptor { create_type: "vmfsSparse".into(), parent_cid: u32::MAX, ..Descriptor::default() },
        };
        let create_type = if h.compressed { "streamOptimized".to_string() } else { desc.create_type.clone() };
        let desc = Descriptor { create_type, ..desc };
        cluster_size = Some(h.grain_sectors * 512);
        let len = h.capacity * 512;
        info_extents.push(extent_info(len, &path.display().to_string(), "", Some(&h)));
        extents.push(Extent { start: 0, len, data: ExtentData::Sparse { file: 0, header: h, gd, rgd, next } });
        return finish(files, extents, desc, cluster_size, info_extents);
    }
    let len = file.len().map_err(|e| Error::io("reading VMDK size", e))?;
    let text = read_vec(&*file, 0, len.min(MAX_DESCRIPTOR), MAX_DESCRIPTOR, "VMDK descriptor")?;
    desc = Descriptor::parse(&text)?;
    if !CREATE_TYPES.contains(&desc.create_type.as_str()) {
        return Err(Error::unsupported(format!("Unsupported image type '{}'", desc.create_type)));
    }
    if desc.extents.is_empty() {
        return Err(Error::invalid("Not enough extents in the descriptor"));
    }
    let mut start = 0u64;
    let mut extent_paths = Vec::new();
    for line in &desc.extents {
        let (ext_len, data, sparse) = match line.kind {
            ExtentKind::Zero => (line.sectors * 512, ExtentData::Zero, None),
            kind => {
                let epath = resolve_backing(path, &line.file);
                let ef = extra(&epath).map_err(|e| match e {
                    Error::Io { context, source } => {
                        Error::Io { context: format!("Could not open '{}': {context}", epath.display()), source }
                    }
                    other => other,
                })?;
                files.push(ef.clone());
                extent_paths.push(epath.clone());
                let idx = files.len() - 1;
                if kind == ExtentKind::Flat {
                    let off =
                        line.offset.checked_mul(512).ok_or_else(|| Error::invalid("VMDK extent offset overflows"))?;
                    (line.sectors * 512, ExtentData::Flat { file: idx, start: off }, None)
                } else {
                    let mut eh = vec![0u8; 512];
                    read_exact(&*ef, &mut eh, 0, "VMDK extent header")?;
                    let (h, gd, rgd) = open_sparse(&*ef, &eh)?;
                    cluster_size.get_or_insert(h.grain_sectors * 512);
                    let next = sparse_end(&*ef, &h)?;
                    (h.capacity * 512, ExtentData::Sparse { file: idx, header: h.clone(), gd, rgd, next }, Some(h))
                }
            }
        };
        let fname = resolve_backing(path, &line.file).display().to_string();
        info_extents.push(extent_info(ext_len, &fname, &line.type_name, sparse.as_ref()));
        extents.push(Extent { start, len: ext_len, data });
        start = start.checked_add(ext_len).filter(|&s| s <= 1 << 50).ok_or_else(|| Error::invalid("VMDK too large"))?;
    }
    let mut opened = finish(files, extents, desc, cluster_size, info_extents)?;
    opened.info.extent_files = extent_paths;
    Ok(opened)
}

fn finish(
    files: Vec<Arc<dyn Storage>>,
    extents: Vec<Extent>,
    desc: Descriptor,
    cluster_size: Option<u64>,
    info_extents: Vec<Vec<(&'static str, InfoValue)>>,
) -> Result<Opened> {
    let len = extents.last().map_or(0, |e| e.start + e.len);
    let info = FormatInfo {
        cluster_size,
        backing_format: desc.parent.as_ref().map(|_| "vmdk".to_string()),
        backing_name: desc.parent.clone(),
        specific: vec![
            ("cid", InfoValue::U64(u64::from(desc.cid))),
            ("parent-cid", InfoValue::U64(u64::from(desc.parent_cid))),
            ("create-type", InfoValue::Str(desc.create_type.clone())),
            ("extents", InfoValue::List(info_extents)),
        ],
        dirty: false,
        extent_files: Vec::new(),
    };
    let layout = Vmdk { files, extents, len, gt_cache: Mutex::new(HashMap::new()), appended: Default::default() };
    Ok(Opened { layout: Arc::new(layout), info })
}

/// Creates a monolithicSparse VMDK of `size` bytes in the empty `file`
/// named `name`, laid out as qemu-img lays it out: header, embedded
/// descriptor, redundant and primary grain directories with every grain
/// table preallocated, grains from the first 64 KiB boundary on.
pub fn create_monolithic_sparse(file: &dyn Storage, name: &str, size: u64) -> Result<()> {
    create_sparse(file, name, size, false)
}

/// The descriptor text qemu-img writes (`cid` aside) for `create_type`
/// with `extents` lines, for a disk of `sectors`.
fn descriptor_text(create_type: &str, extents: &str, sectors: u64) -> String {
    let cid = u32::from_le_bytes(super::vdi::random_uuid()[..4].try_into().unwrap_or([0; 4]));
    let cylinders = (sectors / (16 * 63)).min(16383);
    format!(
        "# Disk DescriptorFile\nversion=1\nCID={cid:08x}\nparentCID=ffffffff\ncreateType=\"{create_type}\"\n\n\
         # Extent description\n{extents}\n# The Disk Data Base\n#DDB\n\n\
         ddb.virtualHWVersion = \"4\"\nddb.geometry.cylinders = \"{cylinders}\"\nddb.geometry.heads = \"16\"\n\
         ddb.geometry.sectors = \"63\"\nddb.adapterType = \"ide\"\nddb.toolsVersion = \"2147483647\"\n"
    )
}

/// The extent files of a new descriptor-based VMDK of `size` bytes
/// whose descriptor is named `base` + ".vmdk": name and sectors of each,
/// as qemu-img names and sizes them (2 GiB extents for twoGbMaxExtent*).
pub fn extent_plan(create_type: &str, base: &str, size: u64) -> Result<Vec<(String, u64)>> {
    let sectors = size.div_ceil(512);
    let (suffix, max) = match create_type {
        "monolithicFlat" => ("flat", u64::MAX),
        "twoGbMaxExtentFlat" => ("f", 4_194_304),
        "twoGbMaxExtentSparse" => ("s", 4_194_304),
        other => return Err(Error::unsupported(format!("creating {other} VMDK images"))),
    };
    let n = sectors.div_ceil(max).max(1);
    Ok((0..n)
        .map(|i| {
            let name =
                if max == u64::MAX { format!("{base}-flat.vmdk") } else { format!("{base}-{suffix}{:03}.vmdk", i + 1) };
            (name, (sectors - i * max.min(sectors)).min(max))
        })
        .collect())
}

/// Creates a descriptor-based VMDK (monolithicFlat, twoGbMaxExtentFlat,
/// twoGbMaxExtentSparse): the descriptor in `desc`, each extent of
/// `extent_plan` in the storage `extents` returns for its name.
pub fn create_with_extents(
    desc: &dyn Storage,
    create_type: &str,
    base: &str,
    size: u64,
    extents: &dyn Fn(&str) -> Result<Arc<dyn Storage>>,
) -> Result<()> {
    let plan = extent_plan(create_type, base, size)?;
    let sparse = create_type == "twoGbMaxExtentSparse";
    let mut lines = String::new();
    for (name, sectors) in &plan {
        let f = extents(name)?;
        if sparse {
            create_extent(&*f, *sectors * 512)?;
            lines += &format!("RW {sectors} SPARSE \"{name}\"\n");
        } else {
            f.set_len(sectors * 512).map_err(|e| Error::io("creating VMDK extent", e))?;
            f.flush().map_err(|e| Error::io("creating VMDK extent", e))?;
            lines += &format!("RW {sectors} FLAT \"{name}\" 0\n");
        }
    }
    let text = descriptor_text(create_type, &lines, size.div_ceil(512));
    let io = |r: std::io::Result<()>| r.map_err(|e| Error::io("creating VMDK descriptor", e));
    io(desc.write_at(text.as_bytes(), 0))?;
    io(desc.flush())
}

/// A hosted sparse extent of a descriptor: monolithicSparse's layout
/// with room for, but no, embedded descriptor.
fn create_extent(file: &dyn Storage, size: u64) -> Result<()> {
    create_sparse_inner(file, "", size, false, false)
}

/// Creates a streamOptimized VMDK as qemu-img does: the monolithicSparse
/// layout, version 3, with deflate-compressed grains behind markers.
pub fn create_stream_optimized(file: &dyn Storage, name: &str, size: u64) -> Result<()> {
    create_sparse(file, name, size, true)
}

fn create_sparse(file: &dyn Storage, name: &str, size: u64, stream: bool) -> Result<()> {
    create_sparse_inner(file, name, size, stream, true)
}

fn create_sparse_inner(file: &dyn Storage, name: &str, size: u64, stream: bool, with_desc: bool) -> Result<()> {
    let capacity = size.div_ceil(512);
    let (grain, gt_entries) = (128u64, 512u64);
    let gd_entries = capacity.div_ceil(grain * gt_entries);
    if gd_entries > 32 << 20 {
        return Err(Error::invalid("VMDK image too large"));
    }
    let gd_sectors = (gd_entries * 4).div_ceil(512);
    let gt_sectors = gt_entries * 4 / 512;
    let rgd = 21u64;
    let gd = rgd + gd_sectors + gd_entries * gt_sectors;
    let overhead = (gd + gd_sectors + gd_entries * gt_sectors).div_ceil(grain) * grain;
    let mut h = vec![0u8; 512];
    h[..4].copy_from_slice(b"KDMV");
    let (version, flags) =
        if stream { (3u32, 1 | FLAG_RGD | FLAG_COMPRESSED | FLAG_MARKER) } else { (1, 1 | FLAG_RGD) };
    h[4..8].copy_from_slice(&version.to_le_bytes());
    h[8..12].copy_from_slice(&flags.to_le_bytes());
    h[12..20].copy_from_slice(&capacity.to_le_bytes());
    h[20..28].copy_from_slice(&grain.to_le_bytes());
    h[28..36].copy_from_slice(&1u64.to_le_bytes());
    h[36..44].copy_from_slice(&20u64.to_le_bytes());
    h[44..48].copy_from_slice(&(gt_entries as u32).to_le_bytes());
    h[48..56].copy_from_slice(&rgd.to_le_bytes());
    h[56..64].copy_from_slice(&gd.to_le_bytes());
    h[64..72].copy_from_slice(&overhead.to_le_bytes());
    h[73..77].copy_from_slice(b"\n \r\n");
    if stream {
        h[77..79].copy_from_slice(&COMPRESSION_DEFLATE.to_le_bytes());
    }
    let create_type = if stream { "streamOptimized" } else { "monolithicSparse" };
    let cid = u32::from_le_bytes(super::vdi::random_uuid()[..4].try_into().unwrap_or([0; 4]));
    let cylinders = (capacity / (16 * 63)).min(16383);
    let desc = format!(
        "# Disk DescriptorFile\nversion=1\nCID={cid:08x}\nparentCID=ffffffff\ncreateType=\"{create_type}\"\n\n\
         # Extent description\nRW {capacity} SPARSE \"{name}\"\n\n# The Disk Data Base\n#DDB\n\n\
         ddb.virtualHWVersion = \"4\"\nddb.geometry.cylinders = \"{cylinders}\"\nddb.geometry.heads = \"16\"\n\
         ddb.geometry.sectors = \"63\"\nddb.adapterType = \"ide\"\nddb.toolsVersion = \"2147483647\"\n"
    );
    if desc.len() > 20 * 512 {
        return Err(Error::invalid("VMDK file name too long"));
    }
    let io = |r: std::io::Result<()>| r.map_err(|e| Error::io("creating VMDK image", e));
    io(file.write_at(&h, 0))?;
    if with_desc {
        io(file.write_at(desc.as_bytes(), 512))?;
    }
    for dir in [rgd, gd] {
        let tables = dir + gd_sectors;
        let entries: Vec<u8> = (0..gd_entries).flat_map(|i| ((tables + i * gt_sectors) as u32).to_le_bytes()).collect();
        io(file.write_at(&entries, dir * 512))?;
    }
    io(file.set_len(overhead * 512))?;
    io(file.flush())
}
