//! VDI, VirtualBox's disk image: a 512-byte header, a block map of 32-bit
//! block numbers, then the blocks. A map entry of 0xffffffff is
//! unallocated, 0xfffffffe a discarded block (reads as zeros), anything
//! else the block's index in the data area. Static images allocate every
//! block at creation; dynamic ones as written.

use super::mapped::{Layout, Piece};
use super::{le32, le64, read_exact, read_vec, FormatInfo, Opened, MAX_TABLE_BYTES};
use crate::storage::Storage;
use crate::{Error, Result};
use std::sync::{Arc, Mutex, RwLock};

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
    /// Blocks in the data area.
    pub blocks_allocated: u32,
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
        let blocks_allocated = le32(b, 388);
        Ok(Header {
            image_type,
            offset_bmap,
            offset_data,
            disk_size: disk_size / 512 * 512,
            blocks_in_image,
            blocks_allocated,
        })
    }
}

struct Vdi {
    files: [Arc<dyn Storage>; 1],
    header: Header,
    bmap: RwLock<Vec<u32>>,
    /// The next free block of the data area; held while allocating.
    next_block: Mutex<u32>,
}

fn allocated(e: u32) -> bool {
    e != UNALLOCATED && e != DISCARDED
}

impl Vdi {
    fn entry(&self, block: u64) -> Result<u32> {
        let bmap = self.bmap.read().map_err(|_| Error::invalid("VDI block map lock poisoned"))?;
        Ok(bmap.get(block as usize).copied().unwrap_or(UNALLOCATED))
    }

    fn host(&self, idx: u32) -> u64 {
        u64::from(self.header.offset_data) + u64::from(idx) * u64::from(BLOCK_SIZE)
    }

    fn io(&self, r: std::io::Result<()>, what: &str) -> Result<()> {
        r.map_err(|e| Error::io(format!("writing VDI {what}"), e))
    }
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
        let within = offset % bs;
        let n = max.min(bs - within);
        Ok(match self.entry(offset / bs)? {
            UNALLOCATED => (Piece::Unallocated, n),
            DISCARDED => (Piece::Zero, n),
            idx if idx >= self.header.blocks_in_image => {
                return Err(Error::Corrupt {
                    what: format!("VDI block map entry {idx} is past the last block"),
                    offset: None,
                })
            }
            idx => (Piece::Data { file: 0, host: self.host(idx) + within }, n),
        })
    }
    fn check(&self) -> Result<crate::qcow2::CheckReport> {
        let mut r = crate::qcow2::CheckReport::default();
        let bmap = self.bmap.read().map_err(|_| Error::invalid("VDI block map lock poisoned"))?;
        // qemu-img's rules and words: every mapped block in range counts,
        // a block used twice is one corruption, named by its index twice.
        let mut seen = vec![false; self.header.blocks_in_image as usize];
        let mut counted = 0u32;
        for (block, &e) in bmap.iter().enumerate() {
            if !allocated(e) {
                continue;
            }
            match seen.get_mut(e as usize) {
                None => {
                    r.messages.push(format!("ERROR: block index {block} too large, is {e}"));
                    r.corruptions += 1;
                }
                Some(s) => {
                    counted += 1;
                    if *s {
                        r.messages.push(format!("ERROR: block index {e} also used by {e}"));
                        r.corruptions += 1;
                    }
                    *s = true;
                }
            }
        }
        let mut h = [0u8; 4];
        self.files[0].read_at(&mut h, 388).map_err(|e| Error::io("reading VDI header", e))?;
        let header_count = u32::from_le_bytes(h);
        if counted != header_count {
            r.messages.push(format!("ERROR: allocated blocks mismatch, is {counted}, should be {header_count}"));
            r.corruptions += 1;
        }
        Ok(r)
    }
    fn write_run(&self, offset: u64, buf: &[u8], _backing: Option<&dyn crate::BlockDevice>) -> Result<usize> {
        let bs = u64::from(BLOCK_SIZE);
        let block = offset / bs;
        let within = offset % bs;
        let n = (buf.len() as u64).min(bs - within) as usize;
        let f = &self.files[0];
        let e = self.entry(block)?;
        if allocated(e) && e >= self.header.blocks_in_image {
            return Err(Error::Corrupt {
                what: format!("VDI block map entry {e} is past the last block"),
                offset: None,
            });
        }
        if allocated(e) {
            self.io(f.write_at(&buf[..n], self.host(e) + within), "data")?;
            return Ok(n);
        }
        let mut next = self.next_block.lock().map_err(|_| Error::invalid("VDI allocation lock poisoned"))?;
        // Somebody may have allocated the block while we waited.
        let e = self.entry(block)?;
        if allocated(e) {
            drop(next);
            self.io(f.write_at(&buf[..n], self.host(e) + within), "data")?;
            return Ok(n);
        }
        let idx = *next;
        if idx >= self.header.blocks_in_image {
            return Err(Error::Corrupt { what: "VDI data area is full".into(), offset: None });
        }
        // The whole block is written, zero-padded: whatever an earlier
        // crash left in this part of the file must not show through.
        if n as u64 == bs {
            self.io(f.write_at(&buf[..n], self.host(idx)), "data")?;
        } else {
            let mut block_buf = vec![0u8; bs as usize];
            block_buf[within as usize..within as usize + n].copy_from_slice(&buf[..n]);
            self.io(f.write_at(&block_buf, self.host(idx)), "data")?;
        }
        // Crash safety: the data is written before the map entry that
        // points to it. The header's count goes first; open takes the
        // larger of it and the highest mapped block, so no order of the
        // two on disk lets one block be handed out twice.
        *next = idx + 1;
        self.io(f.write_at(&(idx + 1).to_le_bytes(), 388), "header")?;
        let at = u64::from(self.header.offset_bmap) + block * 4;
        self.io(f.write_at(&idx.to_le_bytes(), at), "block map")?;
        self.bmap.write().map_err(|_| Error::invalid("VDI block map lock poisoned"))?[block as usize] = idx;
        Ok(n)
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
    let highest = bmap.iter().filter(|&&e| allocated(e)).map(|&e| e + 1).max().unwrap_or(0);
    let next = header.blocks_allocated.min(header.blocks_in_image).max(highest);
    let info = FormatInfo { cluster_size: Some(u64::from(BLOCK_SIZE)), ..FormatInfo::default() };
    let vdi = Vdi { files: [file], header, bmap: RwLock::new(bmap), next_block: Mutex::new(next) };
    Ok(Opened { layout: Arc::new(vdi), info })
}

/// Random bytes for UUIDs: std's per-process random hash keys, mixed
/// with the time (no dependency for sixteen bytes).
pub(crate) fn random_uuid() -> [u8; 16] {
    use std::hash::{BuildHasher, Hasher};
    let mut out = [0u8; 16];
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(i);
        h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
        chunk.copy_from_slice(&h.finish().to_le_bytes());
    }
    out[6] = (out[6] & 0x0f) | 0x40;
    out[8] = (out[8] & 0x3f) | 0x80;
    out
}

/// Creates a VDI image of `size` bytes (rounded up to a sector) in the
/// empty `file`, as qemu-img does: dynamic, or `static` with every block
/// allocated.
pub fn create(file: &dyn Storage, size: u64, r#static: bool) -> Result<()> {
    let bytes = size.div_ceil(512) * 512;
    let bs = u64::from(BLOCK_SIZE);
    let blocks = bytes.div_ceil(bs);
    if blocks > u64::from(MAX_BLOCKS) {
        return Err(Error::invalid(format!(
            "Unsupported VDI image size (size is {bytes:#x}, max supported is {:#x})",
            u64::from(MAX_BLOCKS) * bs
        )));
    }
    let bmap_bytes = (blocks * 4).div_ceil(512) * 512;
    let offset_data = 512 + bmap_bytes;
    let mut h = vec![0u8; 512];
    let text = b"<<< QEMU VM Virtual Disk Image >>>\n";
    h[..text.len()].copy_from_slice(text);
    let put32 = |h: &mut [u8], o: usize, v: u32| h[o..o + 4].copy_from_slice(&v.to_le_bytes());
    put32(&mut h, 64, SIGNATURE);
    put32(&mut h, 68, 0x0001_0001);
    put32(&mut h, 72, 0x180);
    put32(&mut h, 76, if r#static { 2 } else { 1 });
    put32(&mut h, 340, 512);
    put32(&mut h, 344, offset_data as u32);
    put32(&mut h, 360, 512);
    h[368..376].copy_from_slice(&bytes.to_le_bytes());
    put32(&mut h, 376, BLOCK_SIZE);
    put32(&mut h, 384, blocks as u32);
    put32(&mut h, 388, if r#static { blocks as u32 } else { 0 });
    h[392..408].copy_from_slice(&random_uuid());
    h[408..424].copy_from_slice(&random_uuid());
    let mut bmap = vec![0u8; bmap_bytes as usize];
    for (i, e) in bmap.chunks_exact_mut(4).take(blocks as usize).enumerate() {
        e.copy_from_slice(&(if r#static { i as u32 } else { UNALLOCATED }).to_le_bytes());
    }
    let io = |r: std::io::Result<()>| r.map_err(|e| Error::io("creating VDI image", e));
    io(file.write_at(&h, 0))?;
    io(file.write_at(&bmap, 512))?;
    if r#static {
        io(file.set_len(offset_data + blocks * bs))?;
    }
    io(file.flush())
}
