//! How much metadata the fast paths write, counted (not timed): with lazy
//! refcounts in writethrough mode, an allocating write costs exactly one
//! metadata write (its L2 table); overwrites cost none.

use oxcow::qcow2::{self, CreateOptions, Qcow2, Qcow2Options};
use oxcow::storage::{CountingStorage, MemoryStorage};
use oxcow::BlockDevice;
use std::sync::Arc;

/// The image and its counting storage, with the setup's writes taken.
fn setup(lazy: bool) -> (Arc<CountingStorage>, Qcow2) {
    let mem = Arc::new(MemoryStorage::new());
    qcow2::create(mem.clone(), None, &CreateOptions::new(1 << 30).lazy_refcounts(lazy)).unwrap();
    let counting = Arc::new(CountingStorage::new(mem));
    let q = Qcow2::open(counting.clone(), Qcow2Options::default().writethrough(true)).unwrap();
    // Allocate the first L2 table and set the dirty bit once.
    q.write_at(&[1u8; 4096], 0).unwrap();
    counting.take_writes();
    (counting, q)
}

/// Writes outside the data clusters the workload allocated.
fn metadata_writes(writes: &[(u64, u64)], data: &[u64]) -> usize {
    writes.iter().filter(|(off, _)| !data.iter().any(|&d| *off >= d && *off < d + 65536)).count()
}

/// (offset, length) pairs.
type Ranges = Vec<(u64, u64)>;

/// Splits off the zero fill written ahead of the allocation end (writes
/// larger than the workload's 4 KiB requests and L2 pages), merged into
/// ranges.
fn split_ahead(writes: Ranges) -> (Ranges, Ranges) {
    let (big, small): (Vec<_>, Vec<_>) = writes.into_iter().partition(|&(_, l)| l > 4096);
    let mut ahead: Ranges = Vec::new();
    for (o, l) in big {
        match ahead.last_mut() {
            Some((s, n)) if *s + *n == o => *n += l,
            _ => ahead.push((o, l)),
        }
    }
    (ahead, small)
}

fn data_cluster_offsets(q: &Qcow2, guest: &[u64]) -> Vec<u64> {
    guest.iter().map(|&g| q.block_status(g, 4096).unwrap().host_offset.unwrap() & !0xffff).collect()
}

#[test]
fn lazy_writethrough_allocation_is_one_metadata_write_per_cluster() {
    let (counting, q) = setup(true);
    let guest: Vec<u64> = (1..=100u64).map(|i| i * 65536 * 3).collect();
    let flushes_before = counting.flushes();
    for &g in &guest {
        q.write_at(&[7u8; 4096], g).unwrap();
    }
    let (ahead, writes) = split_ahead(counting.take_writes());
    let data = data_cluster_offsets(&q, &guest);
    // In writethrough mode the file is extended ahead of the allocation
    // end, sparse: neither zeros written ahead nor reserved (unwritten)
    // blocks, whose conversion at each sync costs more than allocating a
    // block in a hole.
    assert_eq!(ahead, Vec::new(), "zeros written ahead in writethrough mode");
    assert_eq!(counting.take_reservations(), Vec::new(), "space reserved ahead in writethrough mode");
    // Each request writes the first 4 KiB of its cluster: only a file
    // extended ahead covers the last cluster's whole 64 KiB.
    let last = data.iter().max().unwrap() + 65536;
    let len = oxcow::storage::Storage::len(&*counting).unwrap();
    assert!(len >= last, "the file was not extended ahead of the allocation end: {len} < {last}");
    assert_eq!(metadata_writes(&writes, &data), guest.len(), "one L2 write per allocated cluster");
    for (off, len) in &writes {
        if !data.iter().any(|&d| *off >= d && *off < d + 65536) {
            assert_eq!(*len, 4096, "an L2 update writes one page of the table, not the whole cluster");
        }
    }
    assert_eq!(writes.len(), 2 * guest.len());
    assert_eq!(counting.flushes() - flushes_before, guest.len() as u64, "one flush per write request");
    // Overwrites of allocated clusters write no metadata at all.
    for &g in &guest {
        q.write_at(&[8u8; 4096], g + 4096).unwrap();
    }
    let writes = counting.take_writes();
    assert_eq!(metadata_writes(&writes, &data), 0);
    q.close().unwrap();
}

#[test]
fn writethrough_without_lazy_refcounts_also_writes_the_refcount_block() {
    let (counting, q) = setup(false);
    let guest: Vec<u64> = (1..=50u64).map(|i| i * 65536 * 3).collect();
    for &g in &guest {
        q.write_at(&[7u8; 4096], g).unwrap();
    }
    let (_, writes) = split_ahead(counting.take_writes());
    let data = data_cluster_offsets(&q, &guest);
    assert_eq!(metadata_writes(&writes, &data), 2 * guest.len(), "refcount block + L2 table per allocation");
    q.close().unwrap();
}

/// Extending the file ahead in writethrough mode starts at the file's
/// end: bytes already there (written past the reserved end by another
/// path, as a refcount rebuild writes its new structures) stay.
#[test]
fn writethrough_extending_ahead_keeps_bytes_past_the_reserved_end() {
    use oxcow::storage::Storage;
    let mem = Arc::new(MemoryStorage::new());
    qcow2::create(mem.clone(), None, &CreateOptions::new(1 << 30).lazy_refcounts(true)).unwrap();
    let q = Qcow2::open(mem.clone(), Qcow2Options::default().writethrough(true)).unwrap();
    let past = mem.len().unwrap() + 8192;
    mem.write_at(&[0xab; 512], past).unwrap();
    q.write_at(&[1u8; 4096], 0).unwrap();
    let mut back = [0u8; 512];
    mem.read_at(&mut back, past).unwrap();
    assert_eq!(back, [0xab; 512], "extending ahead overwrote bytes the file already had");
}
