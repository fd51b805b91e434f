//! One virtio-blk request: its descriptor chain read, checked and carried
//! out on the device, its status written back.
//!
//! A request is a chain of device-readable buffers (the 16-byte header,
//! then the data of OUT, or the discard/write-zeroes segment) followed by
//! device-writable ones (the data of IN or GET_ID, then one status byte,
//! the last byte of the chain). The answers follow qemu-storage-daemon's:
//! a write, discard or write-zeroes on a read-only export is
//! `VIRTIO_BLK_S_IOERR`, a range that is unaligned or past the end is
//! `IOERR`, an unknown type or flag is `UNSUPP`, more than one discard
//! segment is `UNSUPP`.
//!
//! Data moves through one buffer per worker, in pieces of at most
//! [`CHUNK`] bytes: the guest decides the chain's length, and no
//! allocation follows it. With the node's `detect-zeroes`, a piece of
//! OUT data that is all zeros is written as write-zeroes (deallocating
//! with `unmap` where discards do), as QEMU's block layer does.

use super::VhostUserBlkOptions;
use crate::nbd::server::DetectZeroes;
use crate::storage::AlignedBuf;
use crate::tools::convert::is_zero;
use crate::BlockDevice;
use std::io::{Read, Write};
use std::ops::Deref;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_BARRIER,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;

/// Bytes of data moved per device call.
pub const CHUNK: usize = 1 << 20;

/// What GET_ID answers (qemu-storage-daemon's serial for this export).
pub const SERIAL: &[u8] = b"vhost_user_blk";

const SECTOR: u64 = 512;
const HEADER_LEN: usize = 16;
/// A discard or write-zeroes segment: le64 sector, le32 sectors, le32 flags.
const SEGMENT_LEN: usize = 16;

/// A request header, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    In { sector: u64 },
    Out { sector: u64 },
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Unsupported(u32),
}

impl Request {
    /// Decodes the header (le32 type, le32 reserved, le64 sector); the
    /// legacy barrier bit is ignored.
    pub fn parse(h: &[u8; HEADER_LEN]) -> Request {
        let mut t = [0u8; 4];
        t.copy_from_slice(&h[0..4]);
        let mut s = [0u8; 8];
        s.copy_from_slice(&h[8..16]);
        let sector = u64::from_le_bytes(s);
        match u32::from_le_bytes(t) & !VIRTIO_BLK_T_BARRIER {
            VIRTIO_BLK_T_IN => Request::In { sector },
            VIRTIO_BLK_T_OUT => Request::Out { sector },
            VIRTIO_BLK_T_FLUSH => Request::Flush,
            VIRTIO_BLK_T_GET_ID => Request::GetId,
            VIRTIO_BLK_T_DISCARD => Request::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => Request::WriteZeroes,
            other => Request::Unsupported(other),
        }
    }
}

/// Carries requests out on one device; one per worker thread.
pub struct RequestHandler {
    dev: std::sync::Arc<dyn BlockDevice>,
    opts: VhostUserBlkOptions,
    buf: AlignedBuf,
}

impl RequestHandler {
    pub fn new(dev: std::sync::Arc<dyn BlockDevice>, opts: VhostUserBlkOptions) -> Self {
        RequestHandler { dev, opts, buf: AlignedBuf::for_direct_io(0) }
    }

    /// Serves the request `chain` holds and writes its status; returns
    /// the bytes written into the chain (the used length). A chain too
    /// short for a header and a status byte, or outside guest memory, is
    /// returned unanswered (length 0) rather than stalling the queue.
    pub fn process_chain<T>(&mut self, mem: &GuestMemoryMmap, chain: DescriptorChain<T>) -> u32
    where
        T: Clone + Deref<Target = GuestMemoryMmap>,
    {
        let (Ok(mut reader), Ok(mut writer)) = (chain.clone().reader(mem), chain.writer(mem)) else {
            return 0;
        };
        let mut header = [0u8; HEADER_LEN];
        let in_len = writer.available_bytes();
        if in_len == 0 || reader.read_exact(&mut header).is_err() {
            return 0;
        }
        let Ok(mut status_writer) = writer.split_at(in_len - 1) else { return 0 };
        let out_len = reader.available_bytes();
        let (status, written) = self.execute(Request::parse(&header), &mut reader, out_len, &mut writer, in_len - 1);
        if status_writer.write_all(&[status]).is_err() {
            return 0;
        }
        // Both are at most the chain's length, which fits a u32.
        u32::try_from(written + 1).unwrap_or(u32::MAX)
    }

    /// Carries out `req` with `out_len` readable data bytes after the
    /// header and room for `in_len` bytes of reply data; returns the
    /// status and the reply bytes written.
    pub fn execute(
        &mut self,
        req: Request,
        data: &mut impl Read,
        out_len: usize,
        reply: &mut impl Write,
        in_len: usize,
    ) -> (u8, usize) {
        let writable = self.opts.writable;
        let (status, written) = match req {
            Request::In { sector } => match self.range(sector, in_len as u64) {
                Some(offset) => self.read(offset, in_len, reply),
                None => (VIRTIO_BLK_S_IOERR, 0),
            },
            Request::Out { .. } | Request::Discard | Request::WriteZeroes if !writable => (VIRTIO_BLK_S_IOERR, 0),
            Request::Out { sector } => match self.range(sector, out_len as u64) {
                Some(offset) => (self.write(offset, out_len, data), 0),
                None => (VIRTIO_BLK_S_IOERR, 0),
            },
            Request::Flush => (status_of(self.dev.flush()), 0),
            Request::GetId => {
                let n = (SERIAL.len() + 1).min(in_len).min(VIRTIO_BLK_ID_BYTES as usize);
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
                id[..SERIAL.len()].copy_from_slice(SERIAL);
                match reply.write_all(&id[..n]) {
                    Ok(()) => (VIRTIO_BLK_S_OK, n),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            Request::Discard | Request::WriteZeroes => (self.discard_or_zero(req, data, out_len), 0),
            Request::Unsupported(_) => (VIRTIO_BLK_S_UNSUPP, 0),
        };
        (status as u8, written)
    }

    /// The byte offset of `len` bytes at `sector`, if they are whole
    /// sectors, start on a logical block and end inside the device.
    fn range(&self, sector: u64, len: u64) -> Option<u64> {
        if !len.is_multiple_of(SECTOR) {
            return None;
        }
        let offset = sector.checked_mul(SECTOR)?;
        if !offset.is_multiple_of(u64::from(self.opts.logical_block_size)) {
            return None;
        }
        let end = offset.checked_add(len)?;
        (end <= self.dev.len() / SECTOR * SECTOR).then_some(offset)
    }

    fn chunk(&mut self, len: usize) -> &mut [u8] {
        let want = len.min(CHUNK);
        if self.buf.len() < want {
            self.buf = AlignedBuf::for_direct_io(want.next_power_of_two().min(CHUNK));
        }
        &mut self.buf[..want]
    }

    fn read(&mut self, offset: u64, len: usize, reply: &mut impl Write) -> (u32, usize) {
        let mut done = 0;
        while done < len {
            let dev = std::sync::Arc::clone(&self.dev);
            let piece = self.chunk(len - done);
            if dev.read_at(piece, offset + done as u64).is_err() {
                return (VIRTIO_BLK_S_IOERR, done);
            }
            if reply.write_all(piece).is_err() {
                return (VIRTIO_BLK_S_IOERR, done);
            }
            done += piece.len();
        }
        (VIRTIO_BLK_S_OK, done)
    }

    fn write(&mut self, offset: u64, len: usize, data: &mut impl Read) -> u32 {
        let detect = self.opts.detect_zeroes;
        // As QEMU: deallocating needs both detect-zeroes=unmap and
        // discard=unmap on the node.
        let unmap = detect == DetectZeroes::Unmap && self.opts.discard;
        let mut done = 0;
        while done < len {
            let dev = std::sync::Arc::clone(&self.dev);
            let piece = self.chunk(len - done);
            if data.read_exact(piece).is_err() {
                return VIRTIO_BLK_S_IOERR;
            }
            let at = offset + done as u64;
            // Judged per piece: a request longer than one piece may have
            // zero pieces among data, and those become write-zeroes too.
            let written = if detect != DetectZeroes::Off && is_zero(piece) {
                dev.write_zeroes(at, piece.len() as u64, unmap)
            } else {
                dev.write_at(piece, at)
            };
            if written.is_err() {
                return VIRTIO_BLK_S_IOERR;
            }
            done += piece.len();
        }
        VIRTIO_BLK_S_OK
    }

    fn discard_or_zero(&mut self, req: Request, data: &mut impl Read, out_len: usize) -> u32 {
        // One segment per request (max_discard_seg and
        // max_write_zeroes_seg are 1).
        if out_len > SEGMENT_LEN {
            return VIRTIO_BLK_S_UNSUPP;
        }
        let mut seg = [0u8; SEGMENT_LEN];
        if out_len < SEGMENT_LEN || data.read_exact(&mut seg).is_err() {
            return VIRTIO_BLK_S_IOERR;
        }
        let mut s = [0u8; 8];
        s.copy_from_slice(&seg[0..8]);
        let mut n = [0u8; 4];
        n.copy_from_slice(&seg[8..12]);
        let mut f = [0u8; 4];
        f.copy_from_slice(&seg[12..16]);
        let (sector, sectors, flags) = (u64::from_le_bytes(s), u32::from_le_bytes(n), u32::from_le_bytes(f));
        if sectors > super::config::MAX_DISCARD_SECTORS {
            return VIRTIO_BLK_S_IOERR;
        }
        let len = u64::from(sectors) * SECTOR;
        let Some(offset) = self.range(sector, len) else { return VIRTIO_BLK_S_IOERR };
        let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        // Unknown flags, and the unmap flag on a discard, are refused as
        // the specification says.
        if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (req == Request::Discard && unmap) {
            return VIRTIO_BLK_S_UNSUPP;
        }
        if len == 0 {
            return VIRTIO_BLK_S_OK;
        }
        let result = if req == Request::Discard {
            // discard=ignore on the node: the guest's discard is a hint
            // that changes nothing, as in QEMU.
            if !self.opts.discard {
                return VIRTIO_BLK_S_OK;
            }
            self.dev.discard(offset, len)
        } else {
            self.dev.write_zeroes(offset, len, unmap && self.opts.discard)
        };
        status_of(result)
    }
}

fn status_of(r: crate::Result<()>) -> u32 {
    match r {
        Ok(()) => VIRTIO_BLK_S_OK,
        Err(_) => VIRTIO_BLK_S_IOERR,
    }
}
