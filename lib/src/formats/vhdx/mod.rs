//! VHDX, Hyper-V's disk (MS-VHDX): a file identifier, two headers (the
//! valid one with the higher sequence number is current), a region table
//! locating the block allocation table (BAT) and the metadata region, and
//! payload blocks. BAT entries hold a state (3 bits) and the block's
//! offset in MiB; a sector bitmap entry follows every `chunk_ratio`
//! payload entries.
//!
//! Every structure is protected by a CRC-32C, checked before use. An image
//! whose header names a log with entries (it was not closed cleanly) needs
//! the log replayed before its metadata can be trusted: as QEMU, oxcow
//! replays it when it opens the image for writing and refuses it read-only
//! with QEMU's message. Differencing images are refused, as QEMU refuses
//! them.
//!
//! Writes (crash safety): a block is allocated at the end of the file,
//! MiB-aligned; its data is written and flushed, then the BAT sector that
//! points to it goes through the log (entry written and flushed, then the
//! sector in place and flushed), so a crash leaves either the old entry or
//! a log whose replay gives the new one. The first allocation of a session
//! writes a header with fresh write GUIDs and a new log GUID; a clean
//! close writes one with the log GUID cleared, as QEMU does.

mod create;
mod log;

pub use create::{create, CreateOptions, MAX_SIZE};
pub use log::{active_sequence, build_entry, parse_entry, Change, Entry};

use super::mapped::{Layout, Piece};
use super::{le16, le32, le64, read_exact, read_vec, FormatInfo, Opened, MAX_TABLE_BYTES};
use crate::storage::Storage;
use crate::{Error, Result};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

const MIB: u64 = 1 << 20;
const HEADER_OFFSETS: [u64; 2] = [64 << 10, 128 << 10];
const REGION_TABLE_OFFSET: u64 = 192 << 10;
const REGION_TABLE_SIZE: usize = 64 << 10;

/// A GUID in the byte order VHDX stores it (the first three fields
/// little-endian).
pub type Guid = [u8; 16];

const fn guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Guid {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    [a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5], d4[6], d4[7]]
}

/// The BAT region.
pub const BAT_GUID: Guid = guid(0x2dc2_7766, 0xf623, 0x4200, [0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08]);
/// The metadata region.
pub const METADATA_GUID: Guid = guid(0x8b7c_a206, 0x4790, 0x4b9a, [0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e]);
const FILE_PARAMETERS: Guid = guid(0xcaa1_6737, 0xfa36, 0x4d43, [0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b]);
const VIRTUAL_DISK_SIZE: Guid = guid(0x2fa5_4224, 0xcd1b, 0x4876, [0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8]);
const PAGE83: Guid = guid(0xbeca_12ab, 0xb2e6, 0x4523, [0x93, 0xef, 0xc3, 0x09, 0xe0, 0x00, 0xc7, 0x46]);
const LOGICAL_SECTOR_SIZE: Guid = guid(0x8141_bf1d, 0xa96f, 0x4709, [0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa, 0xab, 0x5f]);
const PHYSICAL_SECTOR_SIZE: Guid = guid(0xcda3_48c7, 0x445d, 0x4471, [0x9c, 0xc9, 0xe9, 0x88, 0x52, 0x51, 0xc5, 0x56]);
const PARENT_LOCATOR: Guid = guid(0xa8d3_5f2d, 0xb30b, 0x454d, [0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c]);

/// BAT entry states.
const PAYLOAD_ZERO: u64 = 2;
const PAYLOAD_FULLY_PRESENT: u64 = 6;
const PAYLOAD_PARTIALLY_PRESENT: u64 = 7;

const CRC_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0x82f6_3b78 } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// CRC-32C (Castagnoli), as VHDX checksums use.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc = (crc >> 8) ^ CRC_TABLE[((crc ^ u32::from(b)) & 0xff) as usize];
    }
    !crc
}

/// Whether the checksum at `at` matches the structure `b` it protects.
fn checksum_ok(b: &[u8], at: usize) -> bool {
    let stored = le32(b, at);
    let mut copy = b.to_vec();
    copy[at..at + 4].fill(0);
    crc32c(&copy) == stored
}

/// The current header's fields oxcow uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Sequence number.
    pub sequence: u64,
    /// Changed when the file is first written in a session.
    pub file_write_guid: Guid,
    /// Changed when the disk's data is first written in a session.
    pub data_write_guid: Guid,
    /// Non-zero when the log may hold entries to replay.
    pub log_guid: Guid,
    /// The log region: offset and length.
    pub log: (u64, u32),
}

/// Parses one 4 KiB header; `None` when it is not valid.
pub fn parse_header(b: &[u8]) -> Option<Header> {
    if b.len() < 4096 || &b[..4] != b"head" || !checksum_ok(&b[..4096], 4) || le16(b, 66) != 1 {
        return None;
    }
    let guid_at = |at: usize| {
        let mut g = [0u8; 16];
        g.copy_from_slice(&b[at..at + 16]);
        g
    };
    Some(Header {
        sequence: le64(b, 8),
        file_write_guid: guid_at(16),
        data_write_guid: guid_at(32),
        log_guid: guid_at(48),
        log: (le64(b, 72), le32(b, 68)),
    })
}

/// Whether the log region `log` holds entries of the log `guid` to
/// replay. QEMU replays such an image when it opens it for writing and
/// refuses it read-only; a log GUID with no valid entry behind it needs
/// nothing.
pub fn log_has_entries(log: &[u8], guid: &Guid) -> bool {
    active_sequence(log, guid).map_or(true, |s| !s.is_empty())
}

/// The image's geometry, from the metadata region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    /// Payload block size.
    pub block_size: u64,
    /// Virtual size.
    pub virtual_size: u64,
    /// Logical sector size (512 or 4096).
    pub logical_sector_size: u64,
    /// A differencing image.
    pub has_parent: bool,
}

/// Parses the metadata region (its table and the items oxcow needs).
pub fn parse_metadata(m: &[u8]) -> Result<Params> {
    if m.len() < 64 << 10 || &m[..8] != b"metadata" {
        return Err(Error::invalid("Invalid VHDX metadata table"));
    }
    let count = usize::from(le16(m, 10));
    if count > 2047 {
        return Err(Error::invalid("Invalid VHDX metadata table entry count"));
    }
    let mut items: Vec<(Guid, &[u8])> = Vec::new();
    for i in 0..count {
        let e = &m[32 + i * 32..64 + i * 32];
        let mut id = [0u8; 16];
        id.copy_from_slice(&e[..16]);
        let off = le32(e, 16) as usize;
        let len = le32(e, 20) as usize;
        let required = le32(e, 24) & 4 != 0;
        let known =
            [FILE_PARAMETERS, VIRTUAL_DISK_SIZE, PAGE83, LOGICAL_SECTOR_SIZE, PHYSICAL_SECTOR_SIZE, PARENT_LOCATOR]
                .contains(&id);
        if !known && required {
            return Err(Error::unsupported("VHDX metadata names an unknown required item"));
        }
        if len == 0 {
            continue;
        }
        let data = m
            .get(off..off.checked_add(len).ok_or_else(|| Error::invalid("VHDX metadata entry overflows"))?)
            .filter(|_| off >= 64 << 10)
            .ok_or_else(|| Error::invalid("VHDX metadata entry out of its region"))?;
        items.push((id, data));
    }
    let get = |id: Guid, min: usize| {
        items
            .iter()
            .find(|(g, _)| *g == id)
            .map(|(_, d)| *d)
            .filter(|d| d.len() >= min)
            .ok_or_else(|| Error::invalid("VHDX metadata is missing a required item"))
    };
    let fp = get(FILE_PARAMETERS, 8)?;
    let block_size = u64::from(le32(fp, 0));
    let has_parent = le32(fp, 4) & 2 != 0;
    let virtual_size = le64(get(VIRTUAL_DISK_SIZE, 8)?, 0);
    let logical_sector_size = u64::from(le32(get(LOGICAL_SECTOR_SIZE, 4)?, 0));
    if !block_size.is_power_of_two() || !(MIB..=256 * MIB).contains(&block_size) {
        return Err(Error::invalid(format!("VHDX block size {block_size} is invalid")));
    }
    if logical_sector_size != 512 && logical_sector_size != 4096 {
        return Err(Error::invalid(format!("VHDX logical sector size {logical_sector_size} is invalid")));
    }
    if virtual_size > 64 << 40 || !virtual_size.is_multiple_of(logical_sector_size) {
        return Err(Error::invalid(format!("VHDX virtual disk size {virtual_size} is invalid")));
    }
    Ok(Params { block_size, virtual_size, logical_sector_size, has_parent })
}

/// What writing changes, held while allocating.
struct WriteState {
    /// The current header and the slot it is in.
    header: Header,
    slot: usize,
    /// Where the next block goes (before MiB alignment).
    file_end: u64,
    /// Where the next log entry goes, and its sequence number.
    log_pos: u64,
    log_seq: u64,
}

struct Vhdx {
    files: [Arc<dyn Storage>; 1],
    params: Params,
    chunk_ratio: u64,
    bat: RwLock<Vec<u64>>,
    bat_offset: u64,
    file_len: AtomicU64,
    state: Mutex<WriteState>,
    /// The log was replayed at open: what `check -r` reports as fixed.
    replayed: bool,
}

fn poisoned() -> Error {
    Error::invalid("VHDX lock poisoned")
}

impl Vhdx {
    /// The host offset of block table entry `idx` when its block is
    /// present; `None` when it reads as zeros.
    fn present(&self, idx: usize) -> Result<Option<u64>> {
        let entry = self.bat.read().map_err(|_| poisoned())?.get(idx).copied().unwrap_or(0);
        let host = entry & !(MIB - 1);
        match entry & 7 {
            PAYLOAD_FULLY_PRESENT => {
                // Payload blocks live after the headers and region tables.
                if host < MIB || host >= self.file_len.load(Ordering::Acquire) {
                    return Err(Error::corrupt_at("VHDX payload block offset out of the image", host));
                }
                Ok(Some(host))
            }
            PAYLOAD_PARTIALLY_PRESENT => Err(Error::Corrupt {
                what: "partially present VHDX block in an image without parent".into(),
                offset: None,
            }),
            _ => Ok(None),
        }
    }

    fn io(r: std::io::Result<()>, what: &str) -> Result<()> {
        r.map_err(|e| Error::io(format!("writing VHDX {what}"), e))
    }

    /// Writes a new header over the older one, with fresh write GUIDs
    /// and `log_guid`.
    fn update_header(&self, st: &mut WriteState, log_guid: Guid) -> Result<()> {
        let f = &self.files[0];
        let mut h = st.header.clone();
        h.sequence += 1;
        h.file_write_guid = crate::formats::vdi::random_uuid();
        h.data_write_guid = crate::formats::vdi::random_uuid();
        h.log_guid = log_guid;
        let bytes = create::build_header(h.sequence, &h.file_write_guid, &h.data_write_guid, &h.log_guid, h.log);
        let slot = 1 - st.slot;
        Self::io(f.write_at(&bytes, HEADER_OFFSETS[slot]), "header")?;
        Self::io(f.flush(), "header")?;
        st.header = h;
        st.slot = slot;
        Ok(())
    }

    /// Sets BAT entry `idx` through the log.
    fn set_bat(&self, st: &mut WriteState, idx: usize, entry: u64) -> Result<()> {
        let f = &self.files[0];
        if st.header.log_guid == [0u8; 16] {
            self.update_header(st, crate::formats::vdi::random_uuid())?;
            st.log_pos = 0;
            st.log_seq = 1;
        }
        let byte = idx as u64 * 8;
        let sector_at = self.bat_offset + byte / log::SECTOR * log::SECTOR;
        let mut sector = vec![0u8; log::SECTOR as usize];
        read_exact(&**f, &mut sector, sector_at, "VHDX BAT")?;
        let within = (byte % log::SECTOR) as usize;
        sector[within..within + 8].copy_from_slice(&entry.to_le_bytes());
        let e = build_entry(&st.header.log_guid, st.log_seq, st.log_pos, st.file_end, &[(sector_at, &sector)])?;
        let (log_off, log_len) = (st.header.log.0, u64::from(st.header.log.1));
        if e.len() as u64 > log_len {
            return Err(Error::invalid("VHDX log is too small for an entry"));
        }
        for (i, s) in e.chunks(log::SECTOR as usize).enumerate() {
            let at = (st.log_pos + i as u64 * log::SECTOR) % log_len;
            Self::io(f.write_at(s, log_off + at), "log")?;
        }
        Self::io(f.flush(), "log")?;
        Self::io(f.write_at(&sector, sector_at), "BAT")?;
        Self::io(f.flush(), "BAT")?;
        st.log_pos = (st.log_pos + e.len() as u64) % log_len;
        st.log_seq += 1;
        if let Some(slot) = self.bat.write().map_err(|_| poisoned())?.get_mut(idx) {
            *slot = entry;
        }
        Ok(())
    }
}

impl Layout for Vhdx {
    fn format_name(&self) -> &'static str {
        "vhdx"
    }
    fn len(&self) -> u64 {
        self.params.virtual_size
    }
    fn check(&self) -> Result<crate::qcow2::CheckReport> {
        let mut r = crate::qcow2::CheckReport::default();
        let file_len = self.file_len.load(Ordering::Acquire);
        r.messages = bat_problems(&self.bat.read().map_err(|_| poisoned())?, &self.params, file_len);
        r.corruptions = r.messages.len() as u64;
        Ok(r)
    }
    fn has_block_status(&self) -> bool {
        false
    }
    fn files(&self) -> &[Arc<dyn Storage>] {
        &self.files
    }
    fn piece(&self, offset: u64, max: u64) -> Result<(Piece, u64)> {
        let bs = self.params.block_size;
        let block = offset / bs;
        let within = offset % bs;
        let n = max.min(bs - within);
        let idx = (block + block / self.chunk_ratio) as usize;
        if let Some(host) = self.present(idx)? {
            return Ok((Piece::Data { file: 0, host: host + within }, n));
        }
        let entry = self.bat.read().map_err(|_| poisoned())?.get(idx).copied().unwrap_or(0);
        // Not present, undefined, unmapped: zeros without a parent.
        Ok((if entry & 7 == PAYLOAD_ZERO { Piece::Zero } else { Piece::Unallocated }, n))
    }
    fn write_run(&self, offset: u64, buf: &[u8], _backing: Option<&dyn crate::BlockDevice>) -> Result<usize> {
        let bs = self.params.block_size;
        let block = offset / bs;
        let within = offset % bs;
        let n = (buf.len() as u64).min(bs - within) as usize;
        let idx = (block + block / self.chunk_ratio) as usize;
        let f = &self.files[0];
        if let Some(host) = self.present(idx)? {
            Self::io(f.write_at(&buf[..n], host + within), "data")?;
            return Ok(n);
        }
        let mut st = self.state.lock().map_err(|_| poisoned())?;
        // Somebody may have allocated the block while we waited.
        if let Some(host) = self.present(idx)? {
            drop(st);
            Self::io(f.write_at(&buf[..n], host + within), "data")?;
            return Ok(n);
        }
        // A fresh block past the end of the file reads as zeros where this
        // write does not cover it, whatever its state said before.
        let host = st.file_end.div_ceil(MIB) * MIB;
        let end = host + bs;
        Self::io(f.set_len(end), "data")?;
        st.file_end = end;
        self.file_len.fetch_max(end, Ordering::AcqRel);
        Self::io(f.write_at(&buf[..n], host + within), "data")?;
        Self::io(f.flush(), "data")?;
        self.set_bat(&mut st, idx, host | PAYLOAD_FULLY_PRESENT)?;
        Ok(n)
    }
    fn repair(&self) -> Result<(u64, u64)> {
        Ok((0, u64::from(self.replayed)))
    }
    fn close(&self) -> Result<()> {
        let mut st = self.state.lock().map_err(|_| poisoned())?;
        if st.header.log_guid != [0u8; 16] {
            self.update_header(&mut st, [0u8; 16])?;
        }
        Ok(())
    }
}

/// QEMU's block table checks: a fully present block must start and end
/// inside the file (the last block may be partial, as QEMU once wrote
/// them). Each problem in QEMU's words; `check` counts them, an open
/// outside `check` refuses the image on the first.
fn bat_problems(bat: &[u64], params: &Params, file_len: u64) -> Vec<String> {
    let bs = params.block_size;
    let mut problems = Vec::new();
    for (i, &e) in bat.iter().enumerate() {
        if e & 7 != PAYLOAD_FULLY_PRESENT {
            continue;
        }
        let off = e & !(MIB - 1);
        // QEMU sizes by the entry index, sector-bitmap entries included.
        let block_len = match params.virtual_size.checked_sub(i as u64 * bs) {
            Some(rest) => rest.min(bs),
            None => bs,
        };
        if off > i64::MAX as u64 - bs {
            problems.push(format!("VHDX BAT entry {i} offset overflow."));
        }
        if off >= file_len {
            problems.push(format!(
                "VHDX BAT entry {i} start offset {off} points after end of file ({file_len}). Image has probably been truncated."
            ));
        } else if off + block_len > file_len {
            problems.push(format!(
                "VHDX BAT entry {i} end offset {} points after end of file ({file_len}). Image has probably been truncated.",
                off + block_len - 1
            ));
        }
    }
    problems
}

/// The current header and its slot.
fn current_header(file: &dyn Storage) -> Result<(Header, usize)> {
    let mut best: Option<(Header, usize)> = None;
    for (slot, off) in HEADER_OFFSETS.into_iter().enumerate() {
        let mut b = vec![0u8; 4096];
        read_exact(file, &mut b, off, "VHDX header")?;
        if let Some(h) = parse_header(&b) {
            if best.as_ref().is_none_or(|(x, _)| h.sequence > x.sequence) {
                best = Some((h, slot));
            }
        }
    }
    best.ok_or_else(|| Error::invalid("No valid VHDX header found"))
}

/// Opens a VHDX image; `write` replays a log left by an unclean close, as
/// QEMU does (read-only, such an image is refused). Outside `checking`, a
/// block table pointing past the end of the file refuses the open.
pub fn open(file: Arc<dyn Storage>, path: &Path, write: bool, checking: bool) -> Result<Opened> {
    let mut id = [0u8; 8];
    read_exact(&*file, &mut id, 0, "VHDX file identifier")?;
    if &id != b"vhdxfile" {
        return Err(Error::invalid("not a VHDX image"));
    }
    let (mut header, mut slot) = current_header(&*file)?;
    let mut replayed = false;
    if header.log_guid != [0u8; 16] {
        let (off, len) = header.log;
        if off % MIB != 0 || len % (MIB as u32) != 0 || off < MIB {
            return Err(Error::invalid("VHDX log region is misaligned"));
        }
        let log = read_vec(&*file, off, u64::from(len), MAX_TABLE_BYTES, "VHDX log")?;
        if log_has_entries(&log, &header.log_guid) {
            if !write {
                return Err(Error::invalid(format!(
                    "VHDX image file '{}' opened read-only, but contains a log that needs to be replayed",
                    path.display()
                )));
            }
            log::replay(&*file, &active_sequence(&log, &header.log_guid)?)?;
            replayed = true;
        }
        if write {
            // The log is spent: a header without its GUID says so, as
            // QEMU's does after a replay.
            let mut h = header.clone();
            h.sequence += 1;
            h.log_guid = [0u8; 16];
            let bytes = create::build_header(h.sequence, &h.file_write_guid, &h.data_write_guid, &h.log_guid, h.log);
            slot = 1 - slot;
            file.write_at(&bytes, HEADER_OFFSETS[slot]).map_err(|e| Error::io("writing VHDX header", e))?;
            file.flush().map_err(|e| Error::io("writing VHDX header", e))?;
            header = h;
        }
    }
    let file_len = file.len().map_err(|e| Error::io("reading VHDX size", e))?;
    let mut rt = vec![0u8; REGION_TABLE_SIZE];
    read_exact(&*file, &mut rt, REGION_TABLE_OFFSET, "VHDX region table")?;
    if &rt[..4] != b"regi" || !checksum_ok(&rt, 4) {
        return Err(Error::invalid("Invalid VHDX region table"));
    }
    let count = le32(&rt, 8) as usize;
    if count > 2047 {
        return Err(Error::invalid("Invalid VHDX region table entry count"));
    }
    let (mut bat_region, mut meta_region) = (None, None);
    for i in 0..count {
        let e = &rt[16 + i * 32..48 + i * 32];
        let off = le64(e, 16);
        let len = u64::from(le32(e, 24));
        let required = le32(e, 28) & 1 != 0;
        if !off.is_multiple_of(MIB) || len % MIB != 0 || off < MIB {
            return Err(Error::invalid("VHDX region is misaligned"));
        }
        match &e[..16] {
            g if g == BAT_GUID => bat_region = Some((off, len)),
            g if g == METADATA_GUID => meta_region = Some((off, len)),
            _ if required => return Err(Error::unsupported("VHDX region table names an unknown required region")),
            _ => {}
        }
    }
    let (Some((bat_off, bat_len)), Some((meta_off, meta_len))) = (bat_region, meta_region) else {
        return Err(Error::invalid("VHDX region table lacks the BAT or the metadata region"));
    };
    let meta = read_vec(&*file, meta_off, meta_len, MAX_TABLE_BYTES, "VHDX metadata region")?;
    let params = parse_metadata(&meta)?;
    if params.has_parent {
        return Err(Error::unsupported("VHDX differencing files are not supported"));
    }
    let chunk_ratio = (1u64 << 23) * params.logical_sector_size / params.block_size;
    let data_blocks = params.virtual_size.div_ceil(params.block_size);
    let entries = if data_blocks == 0 { 0 } else { data_blocks + (data_blocks - 1) / chunk_ratio };
    if entries * 8 > bat_len {
        return Err(Error::invalid("VHDX BAT region is too small for the disk"));
    }
    let raw = read_vec(&*file, bat_off, entries * 8, MAX_TABLE_BYTES, "VHDX BAT")?;
    let bat: Vec<u64> = raw.chunks_exact(8).map(|c| le64(c, 0)).collect();
    if !checking {
        if let Some(first) = bat_problems(&bat, &params, file_len).into_iter().next() {
            return Err(Error::invalid(first));
        }
    }
    let info = FormatInfo { cluster_size: Some(params.block_size), ..FormatInfo::default() };
    let state = WriteState { header, slot, file_end: file_len, log_pos: 0, log_seq: 1 };
    let vhdx = Vhdx {
        files: [file],
        params,
        chunk_ratio,
        bat: RwLock::new(bat),
        bat_offset: bat_off,
        file_len: AtomicU64::new(file_len),
        state: Mutex::new(state),
        replayed,
    };
    Ok(Opened { layout: Arc::new(vhdx), info })
}

#[cfg(test)]
mod tests {
    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(super::crc32c(b"123456789"), 0xe306_9283);
    }
}
