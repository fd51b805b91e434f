//! Creating VHDX images with qemu-img's options and rules: block and log
//! sizes rounded up to whole MiB, a block size chosen from the disk size
//! when not given, `block_state_zero` marking every block zero at
//! creation (QEMU's default), fixed images holding the whole disk.
//!
//! Layout: file identifier, two headers, two region tables in the first
//! MiB; then the log, the BAT and the metadata region, each MiB-aligned;
//! payload blocks after them.

use super::{
    crc32c, Guid, BAT_GUID, FILE_PARAMETERS, HEADER_OFFSETS, LOGICAL_SECTOR_SIZE, METADATA_GUID, MIB, PAGE83,
    PAYLOAD_FULLY_PRESENT, PAYLOAD_ZERO, PHYSICAL_SECTOR_SIZE, REGION_TABLE_OFFSET, REGION_TABLE_SIZE,
    VIRTUAL_DISK_SIZE,
};
use crate::formats::vdi::random_uuid;
use crate::storage::Storage;
use crate::{Error, Result};

/// The largest virtual disk VHDX holds.
pub const MAX_SIZE: u64 = 64 << 40;
const METADATA_SIZE: u64 = MIB;

/// qemu-img's VHDX creation options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes (rounded up to a sector).
    pub size: u64,
    /// Payload block size; 0 chooses from the size as QEMU does.
    pub block_size: u64,
    /// Log size.
    pub log_size: u64,
    /// Every block allocated at creation (`subformat=fixed`).
    pub fixed: bool,
    /// Blocks start in the ZERO state (`block_state_zero`).
    pub zero_blocks: bool,
}

impl CreateOptions {
    /// A dynamic image of `size` bytes with qemu-img's defaults.
    pub fn new(size: u64) -> Self {
        CreateOptions { size, block_size: 0, log_size: MIB, fixed: false, zero_blocks: true }
    }
}

/// The block size QEMU picks for a disk of `size` bytes.
fn auto_block_size(size: u64) -> u64 {
    match size {
        s if s > 32 << 40 => 64 * MIB,
        s if s > 100 << 30 => 32 * MIB,
        s if s > 1 << 30 => 16 * MIB,
        _ => 8 * MIB,
    }
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// A 4 KiB header with its checksum, as [`super::parse_header`] reads it.
pub(crate) fn build_header(
    sequence: u64,
    file_write: &Guid,
    data_write: &Guid,
    log: &Guid,
    log_at: (u64, u32),
) -> Vec<u8> {
    let mut h = vec![0u8; 4096];
    h[..4].copy_from_slice(b"head");
    put64(&mut h, 8, sequence);
    h[16..32].copy_from_slice(file_write);
    h[32..48].copy_from_slice(data_write);
    h[48..64].copy_from_slice(log);
    h[66..68].copy_from_slice(&1u16.to_le_bytes());
    put32(&mut h, 68, log_at.1);
    put64(&mut h, 72, log_at.0);
    let crc = crc32c(&h);
    put32(&mut h, 4, crc);
    h
}

/// Creates a VHDX image in the empty `file`.
pub fn create(file: &dyn Storage, o: &CreateOptions) -> Result<()> {
    let size = o.size.div_ceil(512) * 512;
    if size > MAX_SIZE {
        return Err(Error::invalid("Image size too large; max of 64TB"));
    }
    let log_size = o.log_size.div_ceil(MIB) * MIB;
    if log_size == 0 || log_size > u64::from(u32::MAX) {
        return Err(Error::invalid("Log size must be a multiple of 1 MB"));
    }
    let block_size = match o.block_size {
        0 => auto_block_size(size),
        b => (b.div_ceil(MIB) * MIB).clamp(MIB, 256 * MIB),
    };
    if !block_size.is_power_of_two() {
        return Err(Error::invalid("Block size must be a power of two"));
    }
    let chunk_ratio = (1u64 << 23) * 512 / block_size;
    let blocks = size.div_ceil(block_size);
    let entries = if blocks == 0 { 0 } else { blocks + (blocks - 1) / chunk_ratio };
    let log_offset = MIB;
    let bat_offset = log_offset + log_size;
    let bat_len = (entries * 8).div_ceil(MIB).max(1) * MIB;
    let meta_offset = bat_offset + bat_len;
    let data_offset = meta_offset + METADATA_SIZE;

    let mut ident = vec![0u8; 64 << 10];
    ident[..8].copy_from_slice(b"vhdxfile");
    for (i, u) in "oxcow".encode_utf16().enumerate() {
        ident[8 + 2 * i..10 + 2 * i].copy_from_slice(&u.to_le_bytes());
    }

    let (fw, dw) = (random_uuid(), random_uuid());
    let log_at = (log_offset, log_size as u32);
    let headers = [build_header(0, &fw, &dw, &[0; 16], log_at), build_header(1, &fw, &dw, &[0; 16], log_at)];

    let mut rt = vec![0u8; REGION_TABLE_SIZE];
    rt[..4].copy_from_slice(b"regi");
    put32(&mut rt, 8, 2);
    for (i, (g, off, len)) in
        [(BAT_GUID, bat_offset, bat_len), (METADATA_GUID, meta_offset, METADATA_SIZE)].into_iter().enumerate()
    {
        let e = 16 + i * 32;
        rt[e..e + 16].copy_from_slice(&g);
        put64(&mut rt, e + 16, off);
        put32(&mut rt, e + 24, len as u32);
        put32(&mut rt, e + 28, 1);
    }
    let crc = crc32c(&rt);
    put32(&mut rt, 4, crc);

    let mut meta = vec![0u8; 64 << 10];
    meta[..8].copy_from_slice(b"metadata");
    const REQUIRED: u32 = 4;
    const VIRTUAL: u32 = 2;
    let items: [(Guid, u32, u32); 5] = [
        (FILE_PARAMETERS, 8, REQUIRED),
        (VIRTUAL_DISK_SIZE, 8, REQUIRED | VIRTUAL),
        (PAGE83, 16, REQUIRED | VIRTUAL),
        (LOGICAL_SECTOR_SIZE, 4, REQUIRED | VIRTUAL),
        (PHYSICAL_SECTOR_SIZE, 4, REQUIRED | VIRTUAL),
    ];
    meta[10..12].copy_from_slice(&(items.len() as u16).to_le_bytes());
    let mut data = Vec::new();
    for (i, (g, len, flags)) in items.iter().enumerate() {
        let e = 32 + i * 32;
        meta[e..e + 16].copy_from_slice(g);
        put32(&mut meta, e + 16, (64 << 10) + data.len() as u32);
        put32(&mut meta, e + 20, *len);
        put32(&mut meta, e + 24, *flags);
        match i {
            0 => {
                data.extend_from_slice(&(block_size as u32).to_le_bytes());
                // Leave blocks allocated: a fixed image keeps its blocks.
                data.extend_from_slice(&u32::from(o.fixed).to_le_bytes());
            }
            1 => data.extend_from_slice(&size.to_le_bytes()),
            2 => data.extend_from_slice(&random_uuid()),
            _ => data.extend_from_slice(&512u32.to_le_bytes()),
        }
    }
    meta.extend_from_slice(&data);

    let mut bat = vec![0u8; (entries * 8) as usize];
    for b in 0..blocks {
        let idx = (b + b / chunk_ratio) as usize;
        let v = if o.zero_blocks {
            PAYLOAD_ZERO
        } else if o.fixed {
            (data_offset + b * block_size) | PAYLOAD_FULLY_PRESENT
        } else {
            continue;
        };
        bat[idx * 8..idx * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }

    let io = |r: std::io::Result<()>| r.map_err(|e| Error::io("creating VHDX image", e));
    io(file.write_at(&ident, 0))?;
    io(file.write_at(&rt, REGION_TABLE_OFFSET))?;
    io(file.write_at(&rt, REGION_TABLE_OFFSET + REGION_TABLE_SIZE as u64))?;
    io(file.write_at(&meta, meta_offset))?;
    io(file.write_at(&bat, bat_offset))?;
    io(file.set_len(data_offset + if o.fixed { size } else { 0 }))?;
    // The headers last: until they are on disk no valid header makes the
    // file openable half made.
    io(file.flush())?;
    for (h, at) in headers.iter().zip(HEADER_OFFSETS) {
        io(file.write_at(h, at))?;
    }
    io(file.flush())
}
