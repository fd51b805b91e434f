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
use std::sync::{Arc, Mutex};

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
    l1: Vec<u64>,
    file_len: u64,
    l2_cache: Mutex<HashMap<u64, Arc<Vec<u64>>>>,
}

impl Qed {
    fn table_bytes(&self) -> u64 {
        self.header.entries() * 8
    }

    fn check_table_offset(&self, off: u64) -> Result<()> {
        let cs = u64::from(self.header.cluster_size);
        if !off.is_multiple_of(cs) || off < u64::from(self.header.header_size) * cs || off >= self.file_len {
            return Err(Error::corrupt_at("QED table offset out of the image", off));
        }
        Ok(())
    }

    fn l2(&self, off: u64) -> Result<Arc<Vec<u64>>> {
        if let Some(t) = self.l2_cache.lock().map_err(|_| Error::invalid("QED cache poisoned"))?.get(&off) {
            return Ok(t.clone());
        }
        self.check_table_offset(off)?;
        let bytes = read_vec(&*self.files[0], off, self.table_bytes(), MAX_TABLE_BYTES, "QED L2 table")?;
        let t = Arc::new(bytes.chunks_exact(8).map(|c| le64(c, 0)).collect::<Vec<_>>());
        let mut cache = self.l2_cache.lock().map_err(|_| Error::invalid("QED cache poisoned"))?;
        if cache.len() >= 64 {
            cache.clear();
        }
        cache.insert(off, t.clone());
        Ok(t)
    }
}

impl Layout for Qed {
    fn format_name(&self) -> &'static str {
        "qed"
    }
    fn len(&self) -> u64 {
        self.header.image_size
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
        let l1 = self.l1.get((cluster / entries) as usize).copied().unwrap_or(0);
        if l1 == 0 {
            // A whole L2 table's worth is unallocated.
            let span = entries * cs - (offset % (entries * cs));
            return Ok((Piece::Unallocated, max.min(span)));
        }
        let l2 = self.l2(l1)?;
        let e = l2.get((cluster % entries) as usize).copied().unwrap_or(0);
        Ok(match e {
            0 => (Piece::Unallocated, n),
            1 => (Piece::Zero, n),
            host => {
                if host % cs != 0 || host >= self.file_len {
                    return Err(Error::corrupt_at("QED data cluster offset out of the image", host));
                }
                (Piece::Data { file: 0, host: host + within }, n)
            }
        })
    }
}

/// Opens a QED image.
pub fn open(file: Arc<dyn Storage>) -> Result<Opened> {
    let mut head = [0u8; 64];
    read_exact(&*file, &mut head, 0, "QED header")?;
    let header = Header::parse(&head)?;
    let file_len = file.len().map_err(|e| Error::io("reading QED image size", e))?;
    let mut backing_name = None;
    if let Some((off, len)) = header.backing_filename {
        let raw = read_vec(&*file, u64::from(off), u64::from(len), 1023, "QED backing file name")?;
        backing_name = Some(String::from_utf8_lossy(&raw).into_owned());
    }
    let mut q = Qed { files: [file], header, l1: Vec::new(), file_len, l2_cache: Mutex::new(HashMap::new()) };
    q.check_table_offset(q.header.l1_table_offset)?;
    let l1 = read_vec(&*q.files[0], q.header.l1_table_offset, q.table_bytes(), MAX_TABLE_BYTES, "QED L1 table")?;
    q.l1 = l1.chunks_exact(8).map(|c| le64(c, 0)).collect();
    let info = FormatInfo {
        cluster_size: Some(u64::from(q.header.cluster_size)),
        backing_format: backing_name
            .as_ref()
            .and_then(|_| (q.header.features & F_BACKING_FORMAT_NO_PROBE != 0).then(|| "raw".to_string())),
        backing_name,
        specific: Vec::new(),
        dirty: q.header.features & F_NEED_CHECK != 0,
        extent_files: Vec::new(),
    };
    Ok(Opened { layout: Arc::new(q), info })
}
