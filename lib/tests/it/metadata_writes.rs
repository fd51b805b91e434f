//! How much metadata the fast paths write, counted (not timed): with lazy
//! refcounts in writethrough mode, an allocating write costs exactly one
//! metadata write (its L2 table); overwrites cost none.

use oxcow::qcow2::{self, CreateOptions, Qcow2, Qcow2Options};
use oxcow::storage::{CountingStorage, MemoryStorage};
use oxcow::BlockDevice;
use std::sync::Arc;

/// The image, its counting storage, and what the setup wrote.
fn setup(lazy: bool) -> (Arc<CountingStorage>, Qcow2, Vec<(u64, u64)>) {
    let mem = Arc::new(MemoryStorage::new());
    qcow2::create(mem.clone(), None, &CreateOptions::new(1 << 30).lazy_refcounts(lazy)).unwrap();
    let counting = Arc::new(CountingStorage::new(mem));
    let q = Qcow2::open(counting.clone(), Qcow2Options::default().writethrough(true)).unwrap();
    // Allocate the first L2 table and set the dirty bit once.
    q.write_at(&[1u8; 4096], 0).unwrap();
    let setup_writes = counting.take_writes();
    (counting, q, setup_writes)
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
    let (counting, q, setup_writes) = setup(true);
    let guest: Vec<u64> = (1..=100u64).map(|i| i * 65536 * 3).collect();
    let flushes_before = counting.flushes();
    for &g in &guest {
        q.write_at(&[7u8; 4096], g).unwrap();
    }
    let (mut ahead, writes) = split_ahead(counting.take_writes());
    ahead.extend(split_ahead(setup_writes).0);
    let data = data_cluster_offsets(&q, &guest);
    // In writethrough mode the space ahead of the allocation end is
    // written with zeros, not reserved, so the syncs after the data
    // writes into it need no file system journal commit.
    for &d in &data {
        assert!(ahead.iter().any(|&(o, l)| d >= o && d + 65536 <= o + l), "cluster {d:#x} not zero-filled ahead");
    }
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
    let (counting, q, _) = setup(false);
    let guest: Vec<u64> = (1..=50u64).map(|i| i * 65536 * 3).collect();
    for &g in &guest {
        q.write_at(&[7u8; 4096], g).unwrap();
    }
    let (_, writes) = split_ahead(counting.take_writes());
    let data = data_cluster_offsets(&q, &guest);
    assert_eq!(metadata_writes(&writes, &data), 2 * guest.len(), "refcount block + L2 table per allocation");
    q.close().unwrap();
}

/// The zeros written ahead in writethrough mode go only past the file's
/// end: bytes already there (written past the reserved end by another
/// path, as a refcount rebuild writes its new structures) stay.
#[test]
fn writethrough_zero_fill_ahead_keeps_bytes_past_the_reserved_end() {
    use oxcow::storage::Storage;
    let mem = Arc::new(MemoryStorage::new());
    qcow2::create(mem.clone(), None, &CreateOptions::new(1 << 30).lazy_refcounts(true)).unwrap();
    let q = Qcow2::open(mem.clone(), Qcow2Options::default().writethrough(true)).unwrap();
    let past = mem.len().unwrap() + 8192;
    mem.write_at(&[0xab; 512], past).unwrap();
    q.write_at(&[1u8; 4096], 0).unwrap();
    let mut back = [0u8; 512];
    mem.read_at(&mut back, past).unwrap();
    assert_eq!(back, [0xab; 512], "the zero fill ahead overwrote bytes the file already had");
}
