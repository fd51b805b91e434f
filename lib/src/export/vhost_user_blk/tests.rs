//! Requests as a guest driver lays them out in its memory, served without
//! a guest: descriptor chains built by virtio-queue's mock queue, carried
//! out on a memory-backed raw device, statuses and data read back from
//! the "guest" memory.

use super::request::RequestHandler;
use super::VhostUserBlkOptions;
use crate::nbd::server::DetectZeroes;
use crate::storage::{MemoryStorage, Storage};
use crate::{BlockDevice, RawImage};
use std::sync::Arc;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const DISK: u64 = 4 << 20;
/// Where request buffers live in guest memory (the mock's rings are below).
const BUFS: u64 = 0x10_0000;

struct Guest {
    mem: GuestMemoryMmap,
    dev: Arc<dyn BlockDevice>,
    handler: RequestHandler,
}

/// A buffer of the chain: guest address, length, device-writable.
type Buf = (u64, u32, bool);

fn raw_disk() -> Arc<dyn BlockDevice> {
    let st = Arc::new(MemoryStorage::new());
    st.set_len(DISK).unwrap();
    Arc::new(RawImage::new(st, false, false).unwrap())
}

impl Guest {
    fn new(opts: VhostUserBlkOptions) -> Guest {
        Guest::on(raw_disk(), opts)
    }

    fn on(dev: Arc<dyn BlockDevice>, opts: VhostUserBlkOptions) -> Guest {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let handler = RequestHandler::new(Arc::clone(&dev), opts);
        Guest { mem, dev, handler }
    }

    fn header(&self, at: u64, ty: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    /// Serves the chain of `bufs`; returns the used length.
    fn serve(&mut self, bufs: &[Buf]) -> u32 {
        let q = MockSplitQueue::new(&self.mem, 16);
        let descs: Vec<RawDescriptor> = bufs
            .iter()
            .map(|&(addr, len, w)| Descriptor::new(addr, len, if w { VRING_DESC_F_WRITE as u16 } else { 0 }, 0).into())
            .collect();
        let chain = q.build_desc_chain(&descs).unwrap();
        self.handler.process_chain(&self.mem, chain)
    }

    fn byte(&self, at: u64) -> u8 {
        self.mem.read_obj::<u8>(GuestAddress(at)).unwrap()
    }

    /// A request with a header at BUFS, the given data buffers and a
    /// status byte at BUFS + 0x1000; returns (status, used length).
    fn request(&mut self, ty: u32, sector: u64, data: &[Buf]) -> (u32, u32) {
        self.header(BUFS, ty, sector);
        self.mem.write_obj(0xffu8, GuestAddress(BUFS + 0x1000)).unwrap();
        let mut bufs = vec![(BUFS, 16, false)];
        bufs.extend_from_slice(data);
        bufs.push((BUFS + 0x1000, 1, true));
        let used = self.serve(&bufs);
        (u32::from(self.byte(BUFS + 0x1000)), used)
    }

    fn segment(&self, at: u64, sector: u64, sectors: u32, flags: u32) {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&sectors.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        self.mem.write_slice(&s, GuestAddress(at)).unwrap();
    }
}

fn rw() -> VhostUserBlkOptions {
    VhostUserBlkOptions::default().writable(true).discard(true)
}

#[test]
fn write_then_read_across_split_buffers_round_trips() {
    let mut g = Guest::new(rw());
    let data: Vec<u8> = (0..3072u32).map(|i| (i * 7 % 251) as u8).collect();
    g.mem.write_slice(&data[..1024], GuestAddress(0x20_0000)).unwrap();
    g.mem.write_slice(&data[1024..], GuestAddress(0x30_0000)).unwrap();
    let (status, used) = g.request(VIRTIO_BLK_T_OUT, 8, &[(0x20_0000, 1024, false), (0x30_0000, 2048, false)]);
    assert_eq!((status, used), (VIRTIO_BLK_S_OK, 1));
    let mut on_disk = vec![0u8; 3072];
    g.dev.read_at(&mut on_disk, 8 * 512).unwrap();
    assert_eq!(on_disk, data);

    let (status, used) = g.request(VIRTIO_BLK_T_IN, 8, &[(0x28_0000, 512, true), (0x38_0000, 2560, true)]);
    assert_eq!((status, used), (VIRTIO_BLK_S_OK, 3073));
    let mut back = vec![0u8; 3072];
    g.mem.read_slice(&mut back[..512], GuestAddress(0x28_0000)).unwrap();
    g.mem.read_slice(&mut back[512..], GuestAddress(0x38_0000)).unwrap();
    assert_eq!(back, data);
}

#[test]
fn status_byte_may_share_the_last_writable_buffer() {
    let mut g = Guest::new(rw());
    g.dev.write_at(&[0x5a; 512], 0).unwrap();
    g.header(BUFS, VIRTIO_BLK_T_IN, 0);
    let used = g.serve(&[(BUFS, 16, false), (0x20_0000, 513, true)]);
    assert_eq!(used, 513);
    assert_eq!(g.byte(0x20_0000 + 512), VIRTIO_BLK_S_OK as u8);
    assert_eq!(g.byte(0x20_0000 + 511), 0x5a);
}

#[test]
fn read_only_export_refuses_writes_discards_and_write_zeroes_with_ioerr() {
    let mut g = Guest::new(VhostUserBlkOptions::default());
    g.dev.write_at(&[0x11; 512], 0).unwrap();
    assert_eq!(g.request(VIRTIO_BLK_T_OUT, 0, &[(0x20_0000, 512, false)]).0, VIRTIO_BLK_S_IOERR);
    g.segment(0x20_0000, 0, 1, 0);
    assert_eq!(g.request(VIRTIO_BLK_T_DISCARD, 0, &[(0x20_0000, 16, false)]).0, VIRTIO_BLK_S_IOERR);
    assert_eq!(g.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(0x20_0000, 16, false)]).0, VIRTIO_BLK_S_IOERR);
    assert_eq!(g.request(VIRTIO_BLK_T_IN, 0, &[(0x30_0000, 512, true)]).0, VIRTIO_BLK_S_OK);
    assert_eq!(g.byte(0x30_0000), 0x11);
    let mut b = [0u8; 512];
    g.dev.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [0x11; 512]);
}

#[test]
fn ranges_unaligned_partial_or_past_the_end_are_ioerr() {
    let mut g = Guest::new(rw().logical_block_size(4096));
    // Not on a logical block.
    assert_eq!(g.request(VIRTIO_BLK_T_IN, 1, &[(0x20_0000, 4096, true)]).0, VIRTIO_BLK_S_IOERR);
    // Not whole sectors.
    assert_eq!(g.request(VIRTIO_BLK_T_IN, 0, &[(0x20_0000, 100, true)]).0, VIRTIO_BLK_S_IOERR);
    // Past the end, and a sector number whose byte offset overflows.
    assert_eq!(g.request(VIRTIO_BLK_T_IN, DISK / 512 - 8, &[(0x20_0000, 8192, true)]).0, VIRTIO_BLK_S_IOERR);
    assert_eq!(g.request(VIRTIO_BLK_T_OUT, u64::MAX / 8, &[(0x20_0000, 4096, false)]).0, VIRTIO_BLK_S_IOERR);
    // The last block is fine.
    assert_eq!(g.request(VIRTIO_BLK_T_IN, DISK / 512 - 8, &[(0x20_0000, 4096, true)]).0, VIRTIO_BLK_S_OK);
}

#[test]
fn get_id_answers_the_serial_nul_terminated_and_unknown_types_are_unsupp() {
    let mut g = Guest::new(rw());
    let (status, used) = g.request(VIRTIO_BLK_T_GET_ID, 0, &[(0x20_0000, VIRTIO_BLK_ID_BYTES, true)]);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(used as usize, b"vhost_user_blk".len() + 2);
    let mut id = [0u8; 15];
    g.mem.read_slice(&mut id, GuestAddress(0x20_0000)).unwrap();
    assert_eq!(&id, b"vhost_user_blk\0");
    assert_eq!(g.request(VIRTIO_BLK_T_SCSI_CMD, 0, &[]).0, VIRTIO_BLK_S_UNSUPP);
    assert_eq!(g.request(VIRTIO_BLK_T_FLUSH, 0, &[]).0, VIRTIO_BLK_S_OK);
    // The legacy barrier bit does not change the type.
    assert_eq!(g.request(VIRTIO_BLK_T_FLUSH | VIRTIO_BLK_T_BARRIER, 0, &[]).0, VIRTIO_BLK_S_OK);
}

#[test]
fn write_zeroes_and_discard_follow_the_segment_and_refuse_bad_flags() {
    let mut g = Guest::new(rw());
    g.dev.write_at(&[0x77; 8192], 0).unwrap();
    g.segment(0x20_0000, 2, 4, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    assert_eq!(g.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(0x20_0000, 16, false)]).0, VIRTIO_BLK_S_OK);
    let mut b = [0u8; 8192];
    g.dev.read_at(&mut b, 0).unwrap();
    assert!(b[..1024].iter().all(|&x| x == 0x77));
    assert!(b[1024..3072].iter().all(|&x| x == 0));
    assert!(b[3072..].iter().all(|&x| x == 0x77));
    // A discard must not carry the unmap flag; unknown flags are refused.
    assert_eq!(g.request(VIRTIO_BLK_T_DISCARD, 0, &[(0x20_0000, 16, false)]).0, VIRTIO_BLK_S_UNSUPP);
    g.segment(0x20_0000, 0, 1, 2);
    assert_eq!(g.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(0x20_0000, 16, false)]).0, VIRTIO_BLK_S_UNSUPP);
    // One segment only; a short one is an I/O error; too many sectors too.
    g.segment(0x20_0000, 0, 1, 0);
    g.segment(0x20_0010, 4, 1, 0);
    assert_eq!(g.request(VIRTIO_BLK_T_DISCARD, 0, &[(0x20_0000, 32, false)]).0, VIRTIO_BLK_S_UNSUPP);
    assert_eq!(g.request(VIRTIO_BLK_T_DISCARD, 0, &[(0x20_0000, 8, false)]).0, VIRTIO_BLK_S_IOERR);
    g.segment(0x20_0000, 0, 32769, 0);
    assert_eq!(g.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(0x20_0000, 16, false)]).0, VIRTIO_BLK_S_IOERR);
    g.segment(0x20_0000, 0, 16, 0);
    assert_eq!(g.request(VIRTIO_BLK_T_DISCARD, 0, &[(0x20_0000, 16, false)]).0, VIRTIO_BLK_S_OK);
}

#[test]
fn chains_without_header_or_status_room_are_returned_unanswered() {
    let mut g = Guest::new(rw());
    // No device-writable buffer: nowhere to put a status.
    g.header(BUFS, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(g.serve(&[(BUFS, 16, false)]), 0);
    // A header shorter than 16 bytes.
    g.mem.write_obj(0xffu8, GuestAddress(BUFS + 0x1000)).unwrap();
    assert_eq!(g.serve(&[(BUFS, 8, false), (BUFS + 0x1000, 1, true)]), 0);
    assert_eq!(g.byte(BUFS + 0x1000), 0xff);
    // A buffer outside guest memory.
    assert_eq!(g.serve(&[(BUFS, 16, false), (0x1_0000_0000, 1, true)]), 0);
}

#[test]
fn large_requests_move_in_chunks() {
    let mut g = Guest::new(rw());
    let len = super::request::CHUNK + 4096;
    let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
    let mut big = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x80_0000)]).unwrap();
    std::mem::swap(&mut g.mem, &mut big);
    g.mem.write_slice(&data, GuestAddress(0x20_0000)).unwrap();
    let (status, _) = g.request(VIRTIO_BLK_T_OUT, 0, &[(0x20_0000, len as u32, false)]);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    let (status, used) = g.request(VIRTIO_BLK_T_IN, 0, &[(0x40_0000, len as u32, true)]);
    assert_eq!((status, used as usize), (VIRTIO_BLK_S_OK, len + 1));
    let mut back = vec![0u8; len];
    g.mem.read_slice(&mut back, GuestAddress(0x40_0000)).unwrap();
    assert!(back == data);
}

/// A device that records how it was written: (offset, length, what).
struct Recorder {
    inner: Arc<dyn BlockDevice>,
    calls: std::sync::Mutex<Vec<(u64, u64, &'static str)>>,
}

impl Recorder {
    fn calls(&self) -> Vec<(u64, u64, &'static str)> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
}

impl BlockDevice for Recorder {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> crate::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> crate::Result<()> {
        self.calls.lock().unwrap().push((offset, buf.len() as u64, "data"));
        self.inner.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> crate::Result<()> {
        self.calls.lock().unwrap().push((offset, len, if may_unmap { "zeroes-unmap" } else { "zeroes" }));
        self.inner.write_zeroes(offset, len, may_unmap)
    }
    fn discard(&self, offset: u64, len: u64) -> crate::Result<()> {
        self.inner.discard(offset, len)
    }
    fn flush(&self) -> crate::Result<()> {
        self.inner.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> crate::Result<crate::BlockStatus> {
        self.inner.block_status(offset, len)
    }
    fn format_name(&self) -> &'static str {
        "raw"
    }
    fn is_read_only(&self) -> bool {
        false
    }
}

/// Writes 4 KiB of zeros then 4 KiB of data at sector 8 with the given
/// detect-zeroes and discard settings; returns the device calls.
fn zero_then_data_writes(detect: DetectZeroes, discard: bool) -> Vec<(u64, u64, &'static str)> {
    let rec = Arc::new(Recorder { inner: raw_disk(), calls: Default::default() });
    let opts = VhostUserBlkOptions::default().writable(true).discard(discard).detect_zeroes(detect);
    let mut g = Guest::on(Arc::clone(&rec) as Arc<dyn BlockDevice>, opts);
    g.dev.write_at(&[0x33; 8192], 4096).unwrap();
    rec.calls();
    g.mem.write_slice(&[0u8; 4096], GuestAddress(0x20_0000)).unwrap();
    assert_eq!(g.request(VIRTIO_BLK_T_OUT, 8, &[(0x20_0000, 4096, false)]).0, VIRTIO_BLK_S_OK);
    let mut data = [0u8; 4096];
    data[4095] = 1;
    g.mem.write_slice(&data, GuestAddress(0x30_0000)).unwrap();
    assert_eq!(g.request(VIRTIO_BLK_T_OUT, 16, &[(0x30_0000, 4096, false)]).0, VIRTIO_BLK_S_OK);
    let mut back = vec![0xffu8; 8192];
    g.dev.read_at(&mut back, 4096).unwrap();
    assert!(back[..4096].iter().all(|&b| b == 0));
    assert_eq!(&back[4096..], &data[..]);
    rec.calls()
}

#[test]
fn detect_zeroes_turns_all_zero_writes_into_write_zeroes_unmapping_only_with_discard_unmap() {
    let data = (8192, 4096, "data");
    assert_eq!(zero_then_data_writes(DetectZeroes::Off, true), vec![(4096, 4096, "data"), data]);
    assert_eq!(zero_then_data_writes(DetectZeroes::On, true), vec![(4096, 4096, "zeroes"), data]);
    assert_eq!(zero_then_data_writes(DetectZeroes::Unmap, true), vec![(4096, 4096, "zeroes-unmap"), data]);
    assert_eq!(zero_then_data_writes(DetectZeroes::Unmap, false), vec![(4096, 4096, "zeroes"), data]);
}
