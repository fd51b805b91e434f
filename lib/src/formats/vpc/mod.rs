//! VPC (Microsoft's VHD): a 512-byte big-endian footer at the end of the
//! file (and a copy at offset 0 in dynamic images), and for dynamic
//! images a dynamic disk header, a block allocation table of 32-bit sector
//! numbers, and blocks each preceded by a sector bitmap. Like QEMU, reads
//! ignore the bitmaps: a block's sectors are its data once allocated.
//!
//! The virtual size follows QEMU's rule: images written by Virtual PC
//! (creator "vpc ") and by QEMU without `force_size` (creator "qemu") are
//! as large as their CHS geometry says; all others (Hyper-V "win ",
//! QEMU's `force_size` "qem2", disk2vhd, XenServer...) and any image whose
//! geometry is the largest possible use the footer's current size.

use super::mapped::{Layout, Piece};
use super::{be16, be32, be64, read_exact, read_vec, FormatInfo, Opened, MAX_TABLE_BYTES};
use crate::storage::Storage;
use crate::{Error, Result};
use std::sync::Arc;

/// Disk types.
pub const TYPE_FIXED: u32 = 2;
/// A dynamic (sparse) disk.
pub const TYPE_DYNAMIC: u32 = 3;
/// A differencing disk (QEMU does not open these either).
pub const TYPE_DIFFERENCING: u32 = 4;
/// The largest geometry: 65535 cylinders, 16 heads, 255 sectors.
pub const MAX_GEOMETRY_SECTORS: u64 = 65535 * 16 * 255;

/// The footer fields the size and layout depend on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    /// Offset of the dynamic disk header (dynamic images).
    pub data_offset: u64,
    /// The creator application, four bytes.
    pub creator_app: [u8; 4],
    /// The size the footer records.
    pub current_size: u64,
    /// Cylinders, heads, sectors per track.
    pub chs: (u16, u8, u8),
    /// Disk type.
    pub disk_type: u32,
}

/// VHD's checksum: the one's complement of the byte sum, the checksum
/// field (at `at`) counted as zero.
pub fn checksum(b: &[u8], at: usize) -> u32 {
    let sum = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !(at..at + 4).contains(i))
        .fold(0u32, |s, (_, &x)| s.wrapping_add(u32::from(x)));
    !sum
}

impl Footer {
    /// Parses and checks a footer (512 bytes).
    pub fn parse(b: &[u8]) -> Result<Footer> {
        if b.len() < 512 || &b[..8] != b"conectix" {
            return Err(Error::invalid("invalid VPC image"));
        }
        if checksum(&b[..512], 64) != be32(b, 64) {
            return Err(Error::invalid("Incorrect header checksum"));
        }
        let mut creator_app = [0u8; 4];
        creator_app.copy_from_slice(&b[28..32]);
        Ok(Footer {
            data_offset: be64(b, 16),
            creator_app,
            current_size: be64(b, 48),
            chs: (be16(b, 56), b[58], b[59]),
            disk_type: be32(b, 60),
        })
    }

    /// The virtual size in bytes, by QEMU's rule.
    pub fn virtual_size(&self) -> u64 {
        let (c, h, s) = self.chs;
        let chs_sectors = u64::from(c) * u64::from(h) * u64::from(s);
        let use_chs = &self.creator_app == b"vpc " || &self.creator_app == b"qemu";
        if !use_chs || chs_sectors == MAX_GEOMETRY_SECTORS {
            self.current_size / 512 * 512
        } else {
            chs_sectors * 512
        }
    }
}

struct Vpc {
    files: [Arc<dyn Storage>; 1],
    size: u64,
    /// Dynamic images: block size, bitmap size and the table.
    dynamic: Option<(u64, u64, Vec<u32>)>,
}

impl Layout for Vpc {
    fn format_name(&self) -> &'static str {
        "vpc"
    }
    fn len(&self) -> u64 {
        self.size
    }
    fn file_zeroes(&self, _file: usize) -> bool {
        self.dynamic.is_none()
    }
    fn files(&self) -> &[Arc<dyn Storage>] {
        &self.files
    }
    fn piece(&self, offset: u64, max: u64) -> Result<(Piece, u64)> {
        let Some((bs, bitmap, bat)) = &self.dynamic else {
            return Ok((Piece::Data { file: 0, host: offset }, max));
        };
        let within = offset % bs;
        let n = max.min(bs - within);
        Ok(match bat.get((offset / bs) as usize).copied().unwrap_or(u32::MAX) {
            u32::MAX => (Piece::Unallocated, n),
            sector => (Piece::Data { file: 0, host: u64::from(sector) * 512 + bitmap + within }, n),
        })
    }
}

/// Opens a VPC image.
pub fn open(file: Arc<dyn Storage>) -> Result<Opened> {
    let file_len = file.len().map_err(|e| Error::io("reading VPC image size", e))?;
    let mut buf = [0u8; 512];
    read_exact(&*file, &mut buf, 0, "VPC footer")?;
    if &buf[..8] != b"conectix" && file_len >= 512 {
        read_exact(&*file, &mut buf, file_len - 512, "VPC footer")?;
    }
    let footer = Footer::parse(&buf)?;
    let size = footer.virtual_size();
    let dynamic = match footer.disk_type {
        TYPE_FIXED => None,
        TYPE_DYNAMIC => {
            let mut dh = [0u8; 1024];
            read_exact(&*file, &mut dh, footer.data_offset, "VPC dynamic disk header")?;
            if &dh[..8] != b"cxsparse" {
                return Err(Error::invalid("Invalid header magic"));
            }
            let table_offset = be64(&dh, 16);
            let max_entries = be32(&dh, 28);
            let bs = be32(&dh, 32);
            if !bs.is_power_of_two() || bs < 512 {
                return Err(Error::invalid(format!("Invalid block size {bs}")));
            }
            let bs = u64::from(bs);
            if size / bs > u64::from(u32::MAX) {
                return Err(Error::invalid("Too many blocks"));
            }
            if u64::from(max_entries) * 4 > MAX_TABLE_BYTES {
                return Err(Error::invalid(format!("Max Table Entries too large ({max_entries})")));
            }
            if u64::from(max_entries) * bs < size {
                return Err(Error::invalid("Page table too small"));
            }
            let raw = read_vec(&*file, table_offset, u64::from(max_entries) * 4, MAX_TABLE_BYTES, "VPC block table")?;
            let bat: Vec<u32> = raw.chunks_exact(4).map(|c| be32(c, 0)).collect();
            let bitmap = (bs / (8 * 512) + 511) & !511;
            let mut end = (table_offset + u64::from(max_entries) * 4 + 511) & !511;
            for &e in bat.iter().filter(|&&e| e != u32::MAX) {
                end = end.max(u64::from(e) * 512 + bitmap + bs);
            }
            if end > file_len {
                return Err(Error::invalid(
                    "block-vpc: free_data_block_offset points after the end of file. The image has been truncated.",
                ));
            }
            Some((bs, bitmap, bat))
        }
        TYPE_DIFFERENCING => return Err(Error::unsupported("Differencing VHD images are not supported")),
        other => return Err(Error::invalid(format!("invalid VPC disk type {other}"))),
    };
    let info = FormatInfo { cluster_size: dynamic.as_ref().map(|d| d.0), ..FormatInfo::default() };
    Ok(Opened { layout: Arc::new(Vpc { files: [file], size, dynamic }), info })
}
