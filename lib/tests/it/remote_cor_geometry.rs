//! Copy-on-read and stream across image geometries, with a local backing
//! device that counts its reads (no network needed): cluster sizes, v2/v3,
//! extended L2, sizes that are not cluster multiples, backing files shorter
//! than the overlay, and clusters partly written by the guest. The content
//! is checked against a model after every operation, and `qemu-img check`
//! must find the image clean.

use crate::support;

use oxcow::qcow2::{CreateOptions, Qcow2, Qcow2Options};
use oxcow::storage::{FileStorage, MemoryStorage, OpenFlags, Storage};
use oxcow::tools::stream::{stream, StreamOptions};
use oxcow::{BlockDevice, BlockStatus, RawImage, Result};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A backing device that counts reads.
struct Counting {
    inner: RawImage,
    reads: AtomicU64,
}

impl BlockDevice for Counting {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.inner.write_zeroes(offset, len, may_unmap)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.discard(offset, len)
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        // Report zero runs as holes so stream can skip them.
        let n = len.min(self.len() - offset).min(4096 - offset % 4096);
        let mut b = vec![0u8; n as usize];
        self.inner.read_at(&mut b, offset)?;
        let zero = b.iter().all(|&x| x == 0);
        Ok(BlockStatus {
            offset,
            length: n,
            allocated: true,
            zero,
            data: !zero,
            compressed: false,
            host_offset: None,
            depth: 0,
        })
    }
    fn format_name(&self) -> &'static str {
        "raw"
    }
    fn is_read_only(&self) -> bool {
        true
    }
}

struct Case {
    cluster: u64,
    version: u32,
    extended: bool,
    size: u64,
    backing_len: u64,
}

fn backing_content(len: u64, seed: u64) -> Vec<u8> {
    let mut rng = support::Rng(seed);
    let mut v = vec![0u8; len as usize];
    // Data in 4 KiB blocks, two in three; zeros elsewhere.
    for (i, b) in v.chunks_mut(4096).enumerate() {
        if i % 3 != 2 {
            for x in b.iter_mut() {
                *x = rng.next_u64() as u8 | 1;
            }
        }
    }
    v
}

fn open(path: &Path, backing: Arc<Counting>, cor: bool) -> Qcow2 {
    let st = FileStorage::open(path, OpenFlags::default().write(true)).unwrap();
    let opts = Qcow2Options::default().backing(Some(backing)).copy_on_read(cor);
    Qcow2::open(Arc::new(st), opts).unwrap()
}

fn run_case(c: &Case, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("top.qcow2");
    let base_path = dir.path().join("base.raw");
    let bcontent = backing_content(c.backing_len, seed);
    std::fs::write(&base_path, &bcontent).unwrap();
    let st = oxcow::create_file(&path).unwrap();
    let copts = CreateOptions::new(c.size)
        .cluster_size(c.cluster)
        .version(c.version)
        .extended_l2(c.extended)
        .backing_file(Some("base.raw".into()))
        .backing_format(Some("raw".into()));
    oxcow::qcow2::create(st, None, &copts).unwrap();
    let mem: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(bcontent.clone()));
    let backing = Arc::new(Counting { inner: RawImage::new(mem, true, false).unwrap(), reads: AtomicU64::new(0) });
    let mut model = vec![0u8; c.size as usize];
    let n = c.backing_len.min(c.size) as usize;
    model[..n].copy_from_slice(&bcontent[..n]);

    let q = open(&path, Arc::clone(&backing), true);
    let mut rng = support::Rng(seed ^ 0x55);
    let mut ranges = Vec::new();
    for i in 0..60 {
        let len = 1 + rng.below(3 * c.cluster) as usize;
        let off = rng.below(c.size - len as u64);
        if i % 4 == 0 {
            // Guest writes, some covering only part of a cluster.
            let data: Vec<u8> = (0..len).map(|k| (k as u64 ^ off) as u8 | 0x80).collect();
            q.write_at(&data, off).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&data);
        } else if i % 7 == 0 {
            q.write_zeroes(off, len as u64, i % 2 == 0).unwrap();
            model[off as usize..off as usize + len].fill(0);
        } else {
            let mut buf = vec![0u8; len];
            q.read_at(&mut buf, off).unwrap();
            assert!(buf[..] == model[off as usize..off as usize + len], "read at {off} of {len}");
            ranges.push((off, len));
        }
    }
    // Re-reading what was read sends nothing to the backing file.
    let before = backing.reads.load(Ordering::Relaxed);
    for &(off, len) in &ranges {
        let mut buf = vec![0u8; len];
        q.read_at(&mut buf, off).unwrap();
        assert!(buf[..] == model[off as usize..off as usize + len], "re-read at {off} of {len}");
    }
    assert_eq!(backing.reads.load(Ordering::Relaxed), before, "re-reads reached the backing file");
    q.close().unwrap();
    drop(q);
    support::check_clean(&path);

    // Stream the rest and drop the backing file.
    let q = open(&path, Arc::clone(&backing), false);
    let r = stream(&q, &StreamOptions::default().chunk(3 * c.cluster), &mut |_| {}).unwrap();
    assert!(r.complete && r.detached);
    q.close().unwrap();
    drop(q);
    std::fs::remove_file(&base_path).unwrap();
    support::check_clean(&path);
    let st = FileStorage::open(&path, OpenFlags::default()).unwrap();
    let q = Qcow2::open(Arc::new(st), Qcow2Options::default().read_only(true)).unwrap();
    assert_eq!(q.backing_file(), None);
    let mut all = vec![0u8; c.size as usize];
    q.read_at(&mut all, 0).unwrap();
    let first = all.iter().zip(&model).position(|(a, b)| a != b);
    assert!(
        first.is_none(),
        "cluster {} version {} ext {}: streamed image differs from the model at {first:?}",
        c.cluster,
        c.version,
        c.extended
    );
}

#[test]
fn copy_on_read_and_stream_across_geometries() {
    let cases = [
        Case { cluster: 65536, version: 3, extended: false, size: 4 << 20, backing_len: 4 << 20 },
        Case { cluster: 512, version: 3, extended: false, size: 300_032, backing_len: 300_000 },
        Case { cluster: 4096, version: 2, extended: false, size: 1 << 20, backing_len: 1 << 20 },
        Case { cluster: 65536, version: 3, extended: true, size: 4 << 20, backing_len: 4 << 20 },
        Case { cluster: 16384, version: 3, extended: true, size: 999_936, backing_len: 700_001 },
        Case { cluster: 65536, version: 3, extended: false, size: 2_999_808, backing_len: 1_234_567 },
        Case { cluster: 65536, version: 2, extended: false, size: 2 << 20, backing_len: 3 << 20 },
    ];
    for (i, c) in cases.iter().enumerate() {
        run_case(c, 1000 + i as u64);
    }
}
