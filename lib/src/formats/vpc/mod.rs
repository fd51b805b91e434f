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
use std::sync::{Arc, Mutex, RwLock};

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

/// A dynamic image's allocation table and where the next block goes.
struct Dynamic {
    block_size: u64,
    bitmap: u64,
    bat_offset: u64,
    bat: RwLock<Vec<u32>>,
    /// The next block's offset (where the trailing footer sits); held
    /// while allocating.
    free: Mutex<u64>,
    /// The footer, copied to the new end of the file on allocation.
    footer: [u8; 512],
}

struct Vpc {
    files: [Arc<dyn Storage>; 1],
    size: u64,
    dynamic: Option<Dynamic>,
}

impl Vpc {
    fn entry(d: &Dynamic, block: u64) -> Result<u32> {
        let bat = d.bat.read().map_err(|_| Error::invalid("VPC table lock poisoned"))?;
        Ok(bat.get(block as usize).copied().unwrap_or(u32::MAX))
    }
}

fn wio(r: std::io::Result<()>, what: &str) -> Result<()> {
    r.map_err(|e| Error::io(format!("writing VPC {what}"), e))
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
        let Some(d) = &self.dynamic else {
            return Ok((Piece::Data { file: 0, host: offset }, max));
        };
        let within = offset % d.block_size;
        let n = max.min(d.block_size - within);
        Ok(match Self::entry(d, offset / d.block_size)? {
            u32::MAX => (Piece::Unallocated, n),
            sector => (Piece::Data { file: 0, host: u64::from(sector) * 512 + d.bitmap + within }, n),
        })
    }
    fn write_run(&self, offset: u64, buf: &[u8], _backing: Option<&dyn crate::BlockDevice>) -> Result<usize> {
        let f = &self.files[0];
        let Some(d) = &self.dynamic else {
            wio(f.write_at(buf, offset), "data")?;
            return Ok(buf.len());
        };
        let block = offset / d.block_size;
        let within = offset % d.block_size;
        let n = (buf.len() as u64).min(d.block_size - within) as usize;
        let data_at = |sector: u32| u64::from(sector) * 512 + d.bitmap + within;
        let e = Self::entry(d, block)?;
        if e != u32::MAX {
            wio(f.write_at(&buf[..n], data_at(e)), "data")?;
            return Ok(n);
        }
        let mut free = d.free.lock().map_err(|_| Error::invalid("VPC allocation lock poisoned"))?;
        let e = Self::entry(d, block)?;
        if e != u32::MAX {
            drop(free);
            wio(f.write_at(&buf[..n], data_at(e)), "data")?;
            return Ok(n);
        }
        let start = *free;
        let sector = u32::try_from(start / 512).map_err(|_| Error::invalid("VPC image file too large"))?;
        // The sector bitmap says every sector is present (as QEMU writes
        // it), and the block is written whole, zero-padded, so nothing an
        // earlier crash left in the file shows through.
        let mut whole = vec![0u8; (d.bitmap + d.block_size) as usize];
        whole[..d.bitmap as usize].fill(0xff);
        let at = (d.bitmap + within) as usize;
        whole[at..at + n].copy_from_slice(&buf[..n]);
        wio(f.write_at(&whole, start), "block")?;
        let end = start + d.bitmap + d.block_size;
        wio(f.write_at(&d.footer, end), "footer")?;
        // Crash safety: the block's data is in place before the table
        // entry points at it; until then it is beyond the table's reach
        // and the next allocation overwrites it whole.
        wio(f.write_at(&sector.to_be_bytes(), d.bat_offset + block * 4), "block table")?;
        d.bat.write().map_err(|_| Error::invalid("VPC table lock poisoned"))?[block as usize] = sector;
        *free = end;
        Ok(n)
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
            let bitmap = (bs / (8 * 512)).div_ceil(512) * 512;
            let mut end = (table_offset + u64::from(max_entries) * 4).div_ceil(512) * 512;
            for &e in bat.iter().filter(|&&e| e != u32::MAX) {
                end = end.max(u64::from(e) * 512 + bitmap + bs);
            }
            if end > file_len {
                return Err(Error::invalid(
                    "block-vpc: free_data_block_offset points after the end of file. The image has been truncated.",
                ));
            }
            let mut foot = [0u8; 512];
            foot.copy_from_slice(&buf);
            Some(Dynamic {
                block_size: bs,
                bitmap,
                bat_offset: table_offset,
                bat: RwLock::new(bat),
                free: Mutex::new(end),
                footer: foot,
            })
        }
        TYPE_DIFFERENCING => return Err(Error::unsupported("Differencing VHD images are not supported")),
        other => return Err(Error::invalid(format!("invalid VPC disk type {other}"))),
    };
    let info = FormatInfo { cluster_size: dynamic.as_ref().map(|d| d.block_size), ..FormatInfo::default() };
    Ok(Opened { layout: Arc::new(Vpc { files: [file], size, dynamic }), info })
}

/// VHD's largest geometry, and the most sectors a VHD holds (2040 GiB).
const CHS_MAX: (u16, u8, u8) = (65535, 16, 255);
const MAX_SECTORS: u64 = 0xff00_0000;
/// Seconds from the Unix epoch to VHD's (2000-01-01).
const VHD_EPOCH: u64 = 946_684_800;

/// The CHS geometry the VHD specification gives a disk of `sectors`
/// (rounding down), clamped to the largest geometry.
pub fn geometry(sectors: u64) -> (u16, u8, u8) {
    let total = sectors.min(MAX_GEOMETRY_SECTORS);
    let (secs, heads, cth) = if total >= 65535 * 16 * 63 {
        (255u64, 16u64, total / 255)
    } else {
        let mut secs = 17u64;
        let mut cth = total / secs;
        let mut heads = cth.div_ceil(1024).max(4);
        if cth >= heads * 1024 || heads > 16 {
            secs = 31;
            heads = 16;
            cth = total / secs;
        }
        if cth >= heads * 1024 {
            secs = 63;
            heads = 16;
            cth = total / secs;
        }
        (secs, heads, cth)
    };
    ((cth / heads) as u16, heads as u8, secs as u8)
}

/// How qemu-img sizes a new image of `size` bytes: its geometry and
/// virtual size. Without `force_size` the disk grows to the first
/// geometry that holds it (the size Virtual PC will see), or keeps its
/// size past the largest geometry; with it, the size is kept and the
/// geometry is the largest, which makes every reader use the size.
pub fn create_geometry(size: u64, force_size: bool) -> Result<((u16, u8, u8), u64)> {
    let sectors = size.div_ceil(512);
    if force_size {
        return Ok((CHS_MAX, sectors * 512));
    }
    let mut chs = (0u16, 0u8, 0u8);
    let product = |c: (u16, u8, u8)| u64::from(c.0) * u64::from(c.1) * u64::from(c.2);
    let mut i = 0;
    while sectors > product(chs) && product(chs) != MAX_GEOMETRY_SECTORS {
        chs = geometry(sectors + i);
        i += 1;
    }
    if product(chs) == MAX_GEOMETRY_SECTORS {
        if sectors > MAX_SECTORS {
            return Err(Error::invalid("Disk size is too large, max size is 2040 GiB"));
        }
        return Ok((chs, sectors * 512));
    }
    Ok((chs, product(chs) * 512))
}

/// Creates a VPC image of `size` bytes in the empty `file` as qemu-img
/// does: `fixed` (data then footer) or dynamic (footer copy, dynamic
/// header, an empty block table of 2 MiB blocks, footer).
pub fn create(file: &dyn Storage, size: u64, fixed: bool, force_size: bool) -> Result<u64> {
    let (chs, total) = create_geometry(size, force_size)?;
    let mut ft = [0u8; 512];
    ft[..8].copy_from_slice(b"conectix");
    ft[8..12].copy_from_slice(&2u32.to_be_bytes());
    ft[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    let data_offset = if fixed { u64::MAX } else { 512 };
    ft[16..24].copy_from_slice(&data_offset.to_be_bytes());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    ft[24..28].copy_from_slice(&(now.saturating_sub(VHD_EPOCH) as u32).to_be_bytes());
    ft[28..32].copy_from_slice(if force_size { b"qem2" } else { b"qemu" });
    ft[32..36].copy_from_slice(&0x0005_0003u32.to_be_bytes());
    ft[36..40].copy_from_slice(b"Wi2k");
    ft[40..48].copy_from_slice(&total.to_be_bytes());
    ft[48..56].copy_from_slice(&total.to_be_bytes());
    ft[56..58].copy_from_slice(&chs.0.to_be_bytes());
    ft[58] = chs.1;
    ft[59] = chs.2;
    ft[60..64].copy_from_slice(&(if fixed { TYPE_FIXED } else { TYPE_DYNAMIC }).to_be_bytes());
    ft[68..84].copy_from_slice(&super::vdi::random_uuid());
    let c = checksum(&ft, 64);
    ft[64..68].copy_from_slice(&c.to_be_bytes());
    let io = |r: std::io::Result<()>| r.map_err(|e| Error::io("creating VPC image", e));
    if fixed {
        io(file.set_len(total))?;
        io(file.write_at(&ft, total))?;
        io(file.flush())?;
        return Ok(total);
    }
    let block: u64 = 2 << 20;
    let entries = total.div_ceil(block);
    let bat_bytes = (entries * 4).div_ceil(512) * 512;
    let mut dh = [0u8; 1024];
    dh[..8].copy_from_slice(b"cxsparse");
    dh[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
    dh[16..24].copy_from_slice(&1536u64.to_be_bytes());
    dh[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    dh[28..32].copy_from_slice(&(entries as u32).to_be_bytes());
    dh[32..36].copy_from_slice(&(block as u32).to_be_bytes());
    let c = checksum(&dh, 36);
    dh[36..40].copy_from_slice(&c.to_be_bytes());
    io(file.write_at(&ft, 0))?;
    io(file.write_at(&dh, 512))?;
    io(file.write_at(&vec![0xff; bat_bytes as usize], 1536))?;
    io(file.write_at(&ft, 1536 + bat_bytes))?;
    io(file.flush())?;
    Ok(total)
}
