//! VDI, VirtualBox's disk image: a 512-byte header, a block map of 32-bit
//! block numbers, then the blocks. A map entry of 0xffffffff is
//! unallocated, 0xfffffffe a discarded block (reads as zeros), anything
//! else the block's index in the data area. Static images allocate every
//! block at creation; dynamic ones as written.

use super::mapped::{Layout, Piece};
use super::{le32, le64, read_exact, read_vec, FormatInfo, Opened, MAX_TABLE_BYTES};
use crate::storage::Storage;
use crate::{Error, Result};
use std::sync::Arc;

/// The header's signature, at offset 64.
pub const SIGNATURE: u32 = 0xbeda_107f;
const UNALLOCATED: u32 = 0xffff_ffff;
const DISCARDED: u32 = 0xffff_fffe;
/// The only block size QEMU accepts.
pub const BLOCK_SIZE: u32 = 1 << 20;
/// QEMU's bound on the number of blocks.
const MAX_BLOCKS: u32 = 0x3fff_ffff / 4;

/// The parsed and validated VDI header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 1 dynamic, 2 static.
    pub image_type: u32,
    /// Offset of the block map.
    pub offset_bmap: u32,
    /// Offset of the data area.
    pub offset_data: u32,
    /// Virtual size.
    pub disk_size: u64,
    /// Entries in the block map.
    pub blocks_in_image: u32,
}

impl Header {
    /// Parses and validates a VDI header (512 bytes) as QEMU does.
    pub fn parse(b: &[u8]) -> Result<Header> {
        if b.len() < 512 || le32(b, 64) != SIGNATURE {
            return Err(Error::invalid("not a VDI image"));
        }
        let version = le32(b, 68);
        if version != 0x0001_0001 {
            return Err(Error::unsupported(format!(
                "unsupported VDI image (version {}.{})",
                version >> 16,
                version & 0xffff
            )));
        }
        let image_type = le32(b, 76);
        let offset_bmap = le32(b, 340);
        let offset_data = le32(b, 344);
        let sector_size = le32(b, 360);
        let disk_size = le64(b, 368);
        let block_size = le32(b, 376);
        let block_extra = le32(b, 380);
        let blocks_in_image = le32(b, 384);
        if !(1..=2).contains(&image_type) {
            return Err(Error::unsupported(format!("unsupported VDI image (image type {image_type})")));
        }
        if !offset_bmap.is_multiple_of(512) {
            return Err(Error::unsupported(format!(
                "unsupported VDI image (unaligned block map offset {offset_bmap:#x})"
            )));
        }
        if !offset_data.is_multiple_of(512) {
            return Err(Error::unsupported(format!("unsupported VDI image (unaligned data offset {offset_data:#x})")));
        }
        if sector_size != 512 {
            return Err(Error::unsupported(format!("unsupported VDI image (sector size {sector_size} is not 512)")));
        }
        if block_size != BLOCK_SIZE {
            return Err(Error::unsupported(format!("unsupported VDI image (block size {block_size} is not 1048576)")));
        }
        if block_extra != 0 {
            return Err(Error::unsupported(format!("unsupported VDI image (block extra {block_extra} is not 0)")));
        }
        if blocks_in_image > MAX_BLOCKS {
            return Err(Error::unsupported(format!("unsupported VDI image (too many blocks {blocks_in_image})")));
        }
        if disk_size > u64::from(blocks_in_image) * u64::from(BLOCK_SIZE) {
            return Err(Error::unsupported(format!(
                "unsupported VDI image (disk size {disk_size}, image bitmap has room for {})",
                u64::from(blocks_in_image) * u64::from(BLOCK_SIZE)
            )));
        }
        // A link or parent UUID means a differencing image.
        if b[424..456].iter().any(|&x| x != 0) {
            return Err(Error::unsupported("unsupported VDI image (differencing images are not supported)"));
        }
        let bmap_end = u64::from(offset_bmap) + u64::from(blocks_in_image) * 4;
        if bmap_end > u64::from(offset_data) && blocks_in_image > 0 {
            return Err(Error::invalid("VDI block map overlaps the data area"));
        }
        Ok(Header { image_type, offset_bmap, offset_data, disk_size: disk_size / 512 * 512, blocks_in_image })
    }
}

struct Vdi {
    files: [Arc<dyn Storage>; 1],
    header: Header,
    bmap: Vec<u32>,
}

impl Layout for Vdi {
    fn format_name(&self) -> &'static str {
        "vdi"
    }
    fn len(&self) -> u64 {
        self.header.disk_size
    }
    fn files(&self) -> &[Arc<dyn Storage>] {
        &self.files
    }
    fn piece(&self, offset: u64, max: u64) -> Result<(Piece, u64)> {
        let bs = u64::from(BLOCK_SIZE);
        let block = offset / bs;
        let within = offset % bs;
        let n = max.min(bs - within);
        let e = self.bmap.get(block as usize).copied().unwrap_or(UNALLOCATED);
        Ok(match e {
            UNALLOCATED => (Piece::Unallocated, n),
            DISCARDED => (Piece::Zero, n),
            idx => {
                (Piece::Data { file: 0, host: u64::from(self.header.offset_data) + u64::from(idx) * bs + within }, n)
            }
        })
    }
}

/// Opens a VDI image.
pub fn open(file: Arc<dyn Storage>) -> Result<Opened> {
    let mut head = [0u8; 512];
    read_exact(&*file, &mut head, 0, "VDI header")?;
    let header = Header::parse(&head)?;
    let raw = read_vec(
        &*file,
        u64::from(header.offset_bmap),
        u64::from(header.blocks_in_image) * 4,
        MAX_TABLE_BYTES,
        "VDI block map",
    )?;
    let bmap: Vec<u32> = raw.chunks_exact(4).map(|c| le32(c, 0)).collect();
    if let Some(bad) = bmap.iter().find(|&&e| e != UNALLOCATED && e != DISCARDED && e >= header.blocks_in_image) {
        return Err(Error::Corrupt { what: format!("VDI block map entry {bad} is past the last block"), offset: None });
    }
    let info = FormatInfo { cluster_size: Some(u64::from(BLOCK_SIZE)), ..FormatInfo::default() };
    Ok(Opened { layout: Arc::new(Vdi { files: [file], header, bmap }), info })
}
