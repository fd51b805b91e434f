//! Protocol details QEMU's tools do not show directly: reply chunk shapes,
//! metadata contexts over a backing chain, write-zeroes flags, zero
//! detection and read-only enforcement, checked with a raw client.

use crate::support::nbd::*;
use oxcow::nbd::proto::*;
use oxcow::nbd::server::{DetectZeroes, DiscardMode, ExportConfig};
use oxcow::{BlockDevice, BlockStatus, Error, Result};
use std::sync::{Arc, Mutex};

const MIB: u64 = 1 << 20;
const K64: u64 = 65536;

/// An in-memory layer allocating whole 64 KiB clusters, with an optional
/// backing layer: enough of a copy-on-write image to check depths.
struct Layer {
    data: Mutex<Vec<u8>>,
    allocated: Mutex<Vec<bool>>,
    backing: Option<Box<dyn BlockDevice>>,
}

impl Layer {
    fn new(size: u64, backing: Option<Box<dyn BlockDevice>>) -> Layer {
        Layer {
            data: Mutex::new(vec![0; size as usize]),
            allocated: Mutex::new(vec![false; (size / K64) as usize]),
            backing,
        }
    }
    fn fill(self, cluster: usize, byte: u8) -> Layer {
        let o = cluster * K64 as usize;
        self.data.lock().unwrap()[o..o + K64 as usize].fill(byte);
        self.allocated.lock().unwrap()[cluster] = true;
        self
    }
}

impl BlockDevice for Layer {
    fn len(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        oxcow::check_range(offset, buf.len() as u64, self.len())?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let c = (pos / K64) as usize;
            let n = ((K64 - pos % K64) as usize).min(buf.len() - done);
            if self.allocated.lock().unwrap()[c] {
                buf[done..done + n].copy_from_slice(&self.data.lock().unwrap()[pos as usize..pos as usize + n]);
            } else {
                oxcow::read_backing(self.backing(), &mut buf[done..done + n], pos)?;
            }
            done += n;
        }
        Ok(())
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(Error::ReadOnly("test layer".into()))
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _may_unmap: bool) -> Result<()> {
        Err(Error::ReadOnly("test layer".into()))
    }
    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(Error::ReadOnly("test layer".into()))
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let a = self.allocated.lock().unwrap();
        let first = a[(offset / K64) as usize];
        let mut end = (offset / K64 + 1) * K64;
        while end < offset + len && a[(end / K64) as usize] == first {
            end += K64;
        }
        let length = end.min(offset + len) - offset;
        Ok(if first {
            BlockStatus {
                offset,
                length,
                allocated: true,
                zero: false,
                data: true,
                compressed: false,
                host_offset: Some(offset),
                depth: 0,
            }
        } else {
            BlockStatus::unallocated(offset, length)
        })
    }
    fn backing(&self) -> Option<&dyn BlockDevice> {
        self.backing.as_deref()
    }
    fn format_name(&self) -> &'static str {
        "test"
    }
    fn is_read_only(&self) -> bool {
        true
    }
}

/// Top allocates clusters 1 and 2, its backing 0 and 2; cluster 3 is
/// allocated nowhere.
fn chain() -> Arc<dyn BlockDevice> {
    let base = Layer::new(4 * K64, None).fill(0, 0xb0).fill(2, 0xb2);
    Arc::new(Layer::new(4 * K64, Some(Box::new(base))).fill(1, 0x71).fill(2, 0x72))
}

#[test]
fn block_status_reports_allocation_and_depth_through_a_chain() {
    let srv = start_tcp(chain(), named("chain"), opts(true, 1));
    let mut c = client(&srv, "chain", true, &["base:allocation", "qemu:allocation-depth"]);
    assert_eq!(c.flags & FLAG_READ_ONLY, FLAG_READ_ONLY, "a read-only device is exported read-only");
    let base = c.contexts["base:allocation"];
    let depth = c.contexts["qemu:allocation-depth"];
    assert_ne!(base, depth);

    let r = c.call(0, CMD_BLOCK_STATUS, 0, 4 * K64 as u32, &[]);
    assert_eq!(r.error, 0);
    assert_eq!(r.chunks.len(), 2);
    assert_eq!(r.chunks.last().unwrap().flags & REPLY_FLAG_DONE, REPLY_FLAG_DONE);
    let k = K64 as u32;
    assert_eq!(r.extents(base), [(3 * k, 0), (k, STATE_HOLE | STATE_ZERO)]);
    assert_eq!(r.extents(depth), [(k, 2), (2 * k, 1), (k, 0)]);

    // One extent per context with REQ_ONE, never longer than asked.
    let r = c.call(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 0, 4 * k, &[]);
    assert_eq!(r.extents(base), [(3 * k, 0)]);
    assert_eq!(r.extents(depth), [(k, 2)]);
    let r = c.call(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 100, 1000, &[]);
    assert_eq!(r.extents(base), [(1000, 0)]);
    assert_eq!(r.extents(depth), [(1000, 2)]);

    // Unaligned query in the middle, clipped to the request.
    let r = c.call(0, CMD_BLOCK_STATUS, k as u64 + 10, 2 * k, &[]);
    assert_eq!(r.extents(depth), [(2 * k - 10, 1), (10, 0)]);
    assert_eq!(r.extents(base), [(2 * k - 10, 0), (10, STATE_HOLE | STATE_ZERO)]);

    // Out of range, or empty.
    assert_eq!(c.call(0, CMD_BLOCK_STATUS, 3 * K64, k + 1, &[]).error, EINVAL);
    assert_eq!(c.call(0, CMD_BLOCK_STATUS, 0, 0, &[]).error, EINVAL);

    // Reads see through the chain; the unallocated cluster is a hole chunk.
    let r = c.call(0, CMD_READ, 0, 4 * k, &[]);
    assert_eq!(r.error, 0);
    assert_eq!(r.kinds(), [REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE]);
    let d = r.read_data(0, 4 * K64 as usize);
    let cl = |i: usize| &d[i * K64 as usize..(i + 1) * K64 as usize];
    assert!(cl(0).iter().all(|&b| b == 0xb0));
    assert!(cl(1).iter().all(|&b| b == 0x71));
    assert!(cl(2).iter().all(|&b| b == 0x72));
    assert!(cl(3).iter().all(|&b| b == 0));
    // Don't-fragment gives the same bytes in one data chunk.
    let r = c.call(CMD_FLAG_DF, CMD_READ, 0, 4 * k, &[]);
    assert_eq!(r.kinds(), [REPLY_TYPE_OFFSET_DATA]);
    assert_eq!(r.read_data(0, 4 * K64 as usize), d);
    c.disconnect();

    // Only the selected context is reported.
    let mut c = client(&srv, "chain", true, &["qemu:allocation-depth", "base:", "x-nope:thing"]);
    assert_eq!(c.contexts.len(), 1);
    let r = c.call(0, CMD_BLOCK_STATUS, 0, 4 * k, &[]);
    assert_eq!(r.chunks.len(), 1);
    assert_eq!(r.extents(c.contexts["qemu:allocation-depth"]), [(k, 2), (2 * k, 1), (k, 0)]);
    c.disconnect();
}

#[test]
fn qemu_img_map_over_a_chain() {
    let srv = start_tcp(chain(), named("chain"), opts(true, 1));
    let out = qemu_img_ok(&["map", "--output=json", "-f", "raw", &srv.uri("chain")]);
    // Three data clusters, then zeros.
    assert!(out.contains("\"start\": 0, \"length\": 196608"), "{out}");
    assert!(out.contains("\"start\": 196608, \"length\": 65536"), "{out}");
    qemu_io_ok(&srv.uri("chain"), &["-r", "read -P 0xb0 0 64k", "read -P 0x71 64k 64k", "read -P 0 192k 64k"]);
}

#[test]
fn sparse_raw_reads_come_back_as_holes() {
    let dir = tempfile::tempdir().unwrap();
    let path = sparse_file(dir.path(), "s.raw", 4 * MIB);
    write_file_at(&path, MIB, &[0x44; 65536]);
    let srv = start_tcp(raw_device(&path, false), named("s"), opts(true, 2));
    let mut c = client(&srv, "s", true, &["base:allocation"]);
    let r = c.call(0, CMD_READ, 0, 2 * MIB as u32, &[]);
    assert_eq!(r.error, 0);
    assert!(r.kinds().contains(&REPLY_TYPE_OFFSET_HOLE), "{:?}", r.kinds());
    assert!(r.kinds().contains(&REPLY_TYPE_OFFSET_DATA), "{:?}", r.kinds());
    let d = r.read_data(0, 2 * MIB as usize);
    assert!(d[..MIB as usize].iter().all(|&b| b == 0));
    assert!(d[MIB as usize..MIB as usize + 65536].iter().all(|&b| b == 0x44));
    assert!(d[MIB as usize + 65536..].iter().all(|&b| b == 0));
    // Simple replies carry the same bytes.
    let mut s = client(&srv, "s", false, &[]);
    assert_eq!(s.read(0, 2 * MIB as u32), d);
    s.disconnect();
    c.disconnect();
}

#[test]
fn write_zeroes_flags_and_discard_modes() {
    let dir = tempfile::tempdir().unwrap();
    for discard in [DiscardMode::Ignore, DiscardMode::Unmap] {
        let path = sparse_file(dir.path(), &format!("z{discard:?}.raw"), 4 * MIB);
        write_file_at(&path, 0, &vec![0x66; 4 * MIB as usize]);
        let cfg = ExportConfig::new("z").discard(discard);
        let srv = start_tcp(raw_device(&path, false), cfg, opts(true, 1));
        let mut c = client(&srv, "z", true, &["base:allocation"]);
        let base = c.contexts["base:allocation"];
        let k = K64 as u32;
        // Fast zero is honest: only a deallocating zero is fast.
        let fast = c.call(CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 0, k, &[]);
        let fast_no_hole = c.call(CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, K64, k, &[]);
        assert_eq!(fast_no_hole.error, ENOTSUP);
        assert!(c.read(K64, k).iter().all(|&b| b == 0x66), "a refused fast zero changed data");
        if discard == DiscardMode::Unmap {
            assert_eq!(fast.error, 0);
            assert!(c.read(0, k).iter().all(|&b| b == 0));
        } else {
            assert_eq!(fast.error, ENOTSUP);
            assert!(c.read(0, k).iter().all(|&b| b == 0x66));
        }
        // Plain write zeroes always works, with or without NO_HOLE and FUA.
        assert_eq!(c.call(CMD_FLAG_NO_HOLE | CMD_FLAG_FUA, CMD_WRITE_ZEROES, 2 * K64, k, &[]).error, 0);
        assert_eq!(c.call(0, CMD_WRITE_ZEROES, 3 * K64, k, &[]).error, 0);
        assert!(c.read(2 * K64, 2 * k).iter().all(|&b| b == 0));
        // NO_HOLE keeps the range allocated.
        let r = c.call(0, CMD_BLOCK_STATUS, 2 * K64, k, &[]);
        assert_eq!(r.extents(base)[0].1 & STATE_HOLE, 0, "NO_HOLE zeroing left a hole");
        // Trim: ignored, or punched.
        assert_eq!(c.call(CMD_FLAG_FUA, CMD_TRIM, MIB, 2 * MIB as u32, &[]).error, 0);
        let after = c.read(MIB, 4096);
        let expect = if discard == DiscardMode::Unmap { 0 } else { 0x66 };
        assert!(after.iter().all(|&b| b == expect), "{discard:?}");
        if discard == DiscardMode::Unmap {
            let r = c.call(0, CMD_BLOCK_STATUS, MIB, 2 * MIB as u32, &[]);
            assert_eq!(r.extents(base), [(2 * MIB as u32, STATE_HOLE | STATE_ZERO)]);
        }
        assert_eq!(c.call(0, CMD_FLUSH, 0, 0, &[]).error, 0);
        c.disconnect();
    }
}

#[test]
fn detect_zeroes_unmap_punches_zero_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = sparse_file(dir.path(), "dz.raw", 2 * MIB);
    write_file_at(&path, 0, &vec![0x12; 2 * MIB as usize]);
    let cfg = ExportConfig::new("dz").discard(DiscardMode::Unmap).detect_zeroes(DetectZeroes::Unmap);
    let srv = start_tcp(raw_device(&path, false), cfg, opts(true, 1));
    let mut c = client(&srv, "dz", true, &["base:allocation"]);
    c.write(MIB, &vec![0; MIB as usize]);
    let r = c.call(0, CMD_BLOCK_STATUS, MIB, MIB as u32, &[]);
    assert_eq!(r.extents(c.contexts["base:allocation"]), [(MIB as u32, STATE_HOLE | STATE_ZERO)]);
    assert!(c.read(MIB - 4096, 8192)[..4096].iter().all(|&b| b == 0x12));
    c.disconnect();
    srv.stop().unwrap();
    assert!(read_file_at(&path, MIB, MIB as usize).iter().all(|&b| b == 0));
}

#[test]
fn read_only_export_answers_eperm() {
    let dir = tempfile::tempdir().unwrap();
    let path = sparse_file(dir.path(), "ro.raw", MIB);
    write_file_at(&path, 0, &[0x21; 4096]);
    let cfg = ExportConfig::new("ro").read_only(true).multi_conn_ok(true);
    let srv = start_tcp(raw_device(&path, false), cfg, opts(true, 1));
    for structured in [false, true] {
        let mut c = client(&srv, "ro", structured, &[]);
        let want = FLAG_HAS_FLAGS
            | FLAG_READ_ONLY
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_CACHE
            | FLAG_CAN_MULTI_CONN
            | if structured { FLAG_SEND_DF } else { 0 };
        assert_eq!(c.flags, want);
        assert_eq!(c.call(0, CMD_WRITE, 0, 4096, &[0; 4096]).error, EPERM);
        assert_eq!(c.call(0, CMD_TRIM, 0, 4096, &[]).error, EPERM);
        assert_eq!(c.call(0, CMD_WRITE_ZEROES, 0, 4096, &[]).error, EPERM);
        assert_eq!(c.call(0, CMD_FLUSH, 0, 0, &[]).error, 0);
        assert!(c.read(0, 4096).iter().all(|&b| b == 0x21));
        c.disconnect();
    }
    srv.stop().unwrap();
    assert!(read_file_at(&path, 0, 4096).iter().all(|&b| b == 0x21));
}

#[test]
fn unix_socket_raw_client() {
    let dir = tempfile::tempdir().unwrap();
    let path = sparse_file(dir.path(), "u.raw", MIB);
    let sock = dir.path().join("s.sock");
    let srv = start_unix(raw_device(&path, false), named("u"), opts(true, 1), &sock);
    let mut c = client(&srv, "u", true, &[]);
    c.write(4096, b"hello over a unix socket");
    assert_eq!(c.read(4096, 24), b"hello over a unix socket");
    c.disconnect();
}

/// A device whose reads past 1 MiB panic, standing for an engine bug.
struct Buggy(oxcow::RawImage);

impl BlockDevice for Buggy {
    fn len(&self) -> u64 {
        self.0.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        assert!(offset < MIB, "simulated engine bug");
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.0.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.0.write_zeroes(offset, len, may_unmap)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.0.discard(offset, len)
    }
    fn flush(&self) -> Result<()> {
        self.0.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.0.block_status(offset, len)
    }
    fn format_name(&self) -> &'static str {
        "test"
    }
    fn is_read_only(&self) -> bool {
        false
    }
}

#[test]
fn a_panicking_device_costs_one_request_not_the_connection() {
    let storage = Arc::new(oxcow::storage::MemoryStorage::new());
    oxcow::storage::Storage::set_len(&*storage, 2 * MIB).unwrap();
    let dev = Buggy(oxcow::RawImage::new(storage, false, false).unwrap());
    let srv = start_tcp(Arc::new(dev), named("bug"), opts(true, 1));
    let mut c = client(&srv, "bug", true, &[]);
    c.write(0, &[9; 512]);
    assert_eq!(c.call(0, CMD_READ, MIB, 512, &[]).error, EIO);
    assert_eq!(c.read(0, 512), [9; 512]);
    c.disconnect();
}
