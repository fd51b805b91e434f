//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the test
//! that replays their corpus of past crashes (`tests/it/fuzz_corpus.rs`).
//!
//! Each takes arbitrary bytes and must return without panicking, hanging,
//! or allocating memory sized by an unchecked field.

use crate::device::BlockDevice;
use crate::format::extensions::HeaderCluster;
use crate::qcow2::{Qcow2, Qcow2Options, Repair};
use crate::storage::{MemoryStorage, Storage};
use std::sync::Arc;

/// Fuzzed images live in memory that cannot grow past this (a damaged
/// image may point writes anywhere; a real disk would just fill up).
const FUZZ_STORAGE_LIMIT: u64 = 256 << 20;

fn storage(data: &[u8]) -> Arc<dyn Storage> {
    Arc::new(MemoryStorage::with_limit(data.to_vec(), FUZZ_STORAGE_LIMIT))
}

/// Parses a header cluster (header, extensions, backing name).
pub fn header(data: &[u8]) {
    if let Ok(hc) = HeaderCluster::parse(data) {
        // Whatever parses must encode and parse back to the same value.
        if let Ok(bytes) = hc.encode() {
            let mut padded = bytes.clone();
            padded.resize(hc.header.cluster_size() as usize, 0);
            if let Ok(again) = HeaderCluster::parse(&padded) {
                assert_eq!(again.header.size, hc.header.size);
            }
        }
    }
}

/// Opens arbitrary bytes as a qcow2 image and reads all of it in pieces.
pub fn open_read(data: &[u8]) {
    let Ok(q) = Qcow2::open(storage(data), Qcow2Options { read_only: true, ..Default::default() }) else { return };
    let len = q.len().min(8 << 20);
    let mut buf = vec![0u8; 64 << 10];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        let _ = q.read_at(&mut buf[..n], off);
        let _ = q.block_status(off, n as u64);
        off += n as u64;
    }
}

/// Opens arbitrary bytes and runs check, then repair, then check again.
pub fn check(data: &[u8]) {
    let st = storage(data);
    if let Ok(q) = Qcow2::open(st.clone(), Qcow2Options { read_only: true, ..Default::default() }) {
        let _ = q.check(Repair::None);
    }
    if let Ok(q) = Qcow2::open(st, Qcow2Options { repair: true, ..Default::default() }) {
        let _ = q.check(Repair::All);
        let _ = q.close();
    }
}

/// Runs an operation sequence decoded from `data` on a fresh image and an
/// in-memory model; every read must match the model and the image must
/// check clean at the end.
pub fn ops(data: &[u8]) {
    const SIZE: u64 = 4 << 20;
    let st: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let create = crate::qcow2::CreateOptions {
        size: SIZE,
        cluster_size: 512 << (data.first().copied().unwrap_or(0) % 5),
        version: if data.get(1).copied().unwrap_or(0) % 4 == 0 { 2 } else { 3 },
        lazy_refcounts: data.get(2).copied().unwrap_or(0) % 2 == 1,
        ..Default::default()
    };
    let cs = create.cluster_size;
    let v3 = create.version == 3;
    if crate::qcow2::create(st.clone(), None, &create).is_err() {
        return;
    }
    let Ok(q) = Qcow2::open(st.clone(), Qcow2Options::default()) else { return };
    let mut model = vec![0u8; SIZE as usize];
    for chunk in data.get(3..).unwrap_or(&[]).chunks_exact(7) {
        let op = chunk[0] % 6;
        let off = u64::from(u32::from_le_bytes([chunk[1], chunk[2], chunk[3], 0])) * 4 % SIZE;
        let len = (u64::from(u16::from_le_bytes([chunk[4], chunk[5]])) + 1).min(SIZE - off);
        let pat = chunk[6];
        match op {
            0 | 1 => {
                if q.write_at(&vec![pat; len as usize], off).is_ok() {
                    model[off as usize..(off + len) as usize].fill(pat);
                }
            }
            2 => {
                if q.write_zeroes(off, len, pat % 2 == 0).is_ok() {
                    model[off as usize..(off + len) as usize].fill(0);
                }
            }
            3 => {
                if q.discard(off, len).is_ok() {
                    let first = off.div_ceil(cs) * cs;
                    let end = off + len;
                    let last = if end == SIZE { SIZE } else { end / cs * cs };
                    if last > first {
                        // Without a backing file discarded clusters read as
                        // zeros in v2 and v3 alike.
                        let _ = v3;
                        model[first as usize..last as usize].fill(0);
                    }
                }
            }
            4 => {
                let _ = q.flush();
            }
            _ => {
                let mut b = vec![0u8; len as usize];
                q.read_at(&mut b, off).expect("read of a valid range");
                assert!(b == model[off as usize..(off + len) as usize], "read differs from the model");
            }
        }
    }
    let r = q.check(Repair::None).expect("check runs");
    assert_eq!(r.corruptions, 0, "{:?}", r.messages);
    q.close().expect("clean close");
}

/// Persistent bitmaps of a damaged image: opened for writing (refused, or
/// written, changed and closed), then read-only (listed and read), then
/// checked: errors, never panics or allocations sized by bad fields.
pub fn bitmaps(data: &[u8]) {
    let st = storage(data);
    if let Ok(q) = Qcow2::open(st.clone(), Qcow2Options::default()) {
        let _ = q.write_at(&[0x5a; 4096], 0);
        let names: Vec<String> = q.bitmaps().map(|l| l.into_iter().map(|b| b.name).collect()).unwrap_or_default();
        let _ = q.bitmap_add("fuzz", Some(512), true);
        for n in &names {
            if let Ok(bits) = q.bitmap_data(n) {
                let _ = q.bitmap_merge("fuzz", &bits);
            }
            let _ = q.bitmap_set_enabled(n, false);
        }
        if let Some(n) = names.first() {
            let _ = q.bitmap_remove(n);
        }
        let _ = q.write_zeroes(0, 65536, true);
        let _ = q.close();
    }
    if let Ok(q) = Qcow2::open(st.clone(), Qcow2Options { read_only: true, ..Default::default() }) {
        for b in q.bitmaps().unwrap_or_default() {
            let _ = q.bitmap_extents(&b.name, 0, q.len());
        }
        let _ = q.check(Repair::None);
    }
}

/// Opens arbitrary bytes as a writable image and writes to it: a damaged
/// image may refuse writes, never swallow one. Every write acknowledged
/// and flushed must read back after a clean close and a reopen (unless
/// the image already made two of the planned writes share a cluster,
/// which no engine can see without a full check). Then each snapshot is
/// applied, deleted, and a new one created, each on a fresh copy: a
/// refusal that did not mark the image corrupt has changed nothing, and
/// what succeeded opens again.
pub fn damaged(data: &[u8]) {
    damaged_writes(data);
    damaged_snapshots(data);
}

fn damaged_writes(data: &[u8]) {
    let st = storage(data);
    let Ok(q) = Qcow2::open(st.clone(), Qcow2Options::default()) else { return };
    let len = q.len();
    let step = len / 8 / 512 * 512;
    if step == 0 {
        return;
    }
    let n = step.min(4096);
    let plan: Vec<(u64, u64, u8)> = (0..8u64).map(|i| (i * step, n, i as u8 + 1)).collect();
    let aliased = aliased_writes(&q, &plan);
    let mut acked = Vec::new();
    for (i, &(off, n, pat)) in plan.iter().enumerate() {
        if q.write_at(&vec![pat; n as usize], off).and_then(|()| q.flush()).is_ok() && !aliased[i] {
            acked.push((off, n, pat));
        }
    }
    let _ = q.close();
    drop(q);
    if acked.is_empty() {
        return;
    }
    let r = Qcow2::open(st, Qcow2Options { read_only: true, ..Default::default() })
        .expect("an image that took writes opens again");
    for (off, n, pat) in acked {
        let mut b = vec![0u8; n as usize];
        r.read_at(&mut b, off).expect("acknowledged data reads back");
        assert!(b.iter().all(|&x| x == pat), "acknowledged write at {off:#x} lost");
    }
}

/// Which planned writes the damaged image already maps onto the same host
/// cluster as another (two L1 entries sharing an L2 table, two L2 entries
/// sharing a data cluster): the later write rightly overwrites the earlier.
fn aliased_writes(q: &Qcow2, plan: &[(u64, u64, u8)]) -> Vec<bool> {
    let cs = q.cluster_size();
    let host = |off: u64| q.block_status(off, 1).ok().and_then(|s| s.host_offset).map(|h| h / cs);
    let hosts: Vec<_> = plan.iter().map(|&(off, _, _)| host(off)).collect();
    plan.iter()
        .enumerate()
        .map(|(i, &(off, _, _))| {
            q.l2_table_shared(off)
                || hosts[i].is_some_and(|h| {
                    hosts.iter().enumerate().any(|(j, &o)| j != i && o == Some(h) && plan[j].0 / cs != off / cs)
                })
        })
        .collect()
}

fn damaged_snapshots(data: &[u8]) {
    let Ok(q) = Qcow2::open(storage(data), Qcow2Options { read_only: true, ..Default::default() }) else { return };
    let ids: Vec<String> = q.snapshot_list().into_iter().take(3).map(|s| s.id).collect();
    drop(q);
    for id in &ids {
        for op in 0..3 {
            let mem = Arc::new(MemoryStorage::with_limit(data.to_vec(), FUZZ_STORAGE_LIMIT));
            let st: Arc<dyn Storage> = mem.clone();
            let Ok(q) = Qcow2::open(st.clone(), Qcow2Options::default()) else { return };
            let _ = q.flush();
            let before = mem.to_bytes();
            let r = match op {
                0 => q.snapshot_apply(id),
                1 => q.snapshot_delete(id),
                _ => q.snapshot_create("fuzz").map(|_| ()),
            };
            let corrupt = q.is_corrupt();
            match r {
                Ok(()) => {
                    q.close().expect("clean close after a snapshot operation");
                    drop(q);
                    Qcow2::open(st, Qcow2Options { read_only: true, ..Default::default() })
                        .expect("an image opens again after a snapshot operation succeeded");
                }
                Err(e) => {
                    if !corrupt && !e.is_io() {
                        assert!(
                            mem.to_bytes() == before,
                            "snapshot operation {op} refused ({e}) after changing the image"
                        );
                    }
                }
            }
        }
    }
}

/// Opens arbitrary bytes as each of the other formats (QED, VDI, VPC,
/// VMDK, VHDX) and reads what opens, in pieces.
pub fn formats(data: &[u8]) {
    use crate::formats::mapped::{read_all, MappedImage};
    let no_extents = |_: &std::path::Path| -> crate::Result<Arc<dyn Storage>> {
        Err(crate::Error::unsupported("no extent files while fuzzing"))
    };
    let path = std::path::Path::new("fuzz.img");
    let opened = [
        crate::formats::qed::open(storage(data), false),
        crate::formats::vdi::open(storage(data)),
        crate::formats::vpc::open(storage(data)),
        crate::formats::vmdk::open(storage(data), path, &no_extents),
        crate::formats::vhdx::open(storage(data), path, false, false),
    ];
    for o in opened.into_iter().flatten() {
        read_all(&MappedImage::new(o.layout, None), 8 << 20);
    }
    // The same bytes opened writable, a few writes driven by the input
    // (allocation over hostile tables must fail cleanly), then read
    // back and checked.
    let writable = [
        crate::formats::qed::open(storage(data), true),
        crate::formats::vdi::open(storage(data)),
        crate::formats::vpc::open(storage(data)),
        crate::formats::vmdk::open(storage(data), path, &no_extents),
    ];
    for o in writable.into_iter().flatten() {
        let layout = o.layout.clone();
        let dev = MappedImage::new(o.layout, None).writable(false);
        let len = dev.len();
        if len == 0 {
            continue;
        }
        for (i, chunk) in data.chunks(97).take(8).enumerate() {
            let seed = chunk.iter().fold(i as u64, |h, &b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
            let off = seed % len;
            let n = (chunk.len() as u64 * 41).min(len - off) as usize;
            let _ = dev.write_at(&vec![chunk[0]; n], off);
        }
        read_all(&dev, 8 << 20);
        let _ = layout.check();
        let _ = dev.close();
    }
    // VHDX opened writable replays its log (no writes: a hostile block
    // size would have the fuzzer allocate hundreds of MiB); the log parser
    // also sees the raw bytes, under the GUID they start with.
    if let Ok(o) = crate::formats::vhdx::open(storage(data), path, true, false) {
        read_all(&MappedImage::new(o.layout, None), 8 << 20);
    }
    let mut guid = [0u8; 16];
    for (g, b) in guid.iter_mut().zip(data) {
        *g = *b;
    }
    let _ = crate::formats::vhdx::active_sequence(data, &guid);
}

/// Parses a LUKS1 header and, when its PBKDF2 work is small, tries to
/// unlock it with the rest of the input as key material.
pub fn luks_header(data: &[u8]) {
    use crate::crypto::{LuksHeader, Secret};
    let Ok(h) = LuksHeader::parse(data) else { return };
    if h.mk_iterations > 64 || h.slots.iter().any(|s| s.active && s.iterations > 64) {
        return;
    }
    let read = |buf: &mut [u8], off: u64| -> crate::Result<()> {
        storage(data).read_at(buf, off).map_err(|e| crate::Error::io("reading key material", e))
    };
    let _ = h.unlock(&Secret::new(b"fuzz".to_vec()), &read);
}
