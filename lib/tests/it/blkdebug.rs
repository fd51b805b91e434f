//! The qcow2 engine under a blkdebug layer: the events it emits arm the
//! errors QEMU's iotests expect at those points, and no others.

use oxcow::qcow2::{self, CreateOptions, Qcow2, Qcow2Options};
use oxcow::storage::{parse_blkdebug_config, BlkdebugRules, BlkdebugStorage, MemoryStorage, Storage};
use oxcow::BlockDevice;
use std::sync::Arc;

const CONF_L2_UPDATE: &str = "[inject-error]\nevent = \"l2_update\"\nerrno = \"5\"\nonce = \"off\"\n";

fn image() -> Arc<MemoryStorage> {
    let mem = Arc::new(MemoryStorage::new());
    qcow2::create(mem.clone(), None, &CreateOptions::new(64 << 20)).unwrap();
    mem
}

fn open_under(mem: &Arc<MemoryStorage>, conf: &str) -> Qcow2 {
    let rules = BlkdebugRules(parse_blkdebug_config(conf).unwrap());
    let st: Arc<dyn Storage> = Arc::new(BlkdebugStorage::new(mem.clone(), rules));
    Qcow2::open(st, Qcow2Options::default()).unwrap()
}

fn errno(r: oxcow::Result<()>) -> i32 {
    r.err().map(|e| e.errno()).unwrap_or(0)
}

/// QEMU's iotest 179, "cache optimization": zeroing a cluster that is
/// already a preallocated zero cluster changes no L2 entry, so it must not
/// write the L2 table (an l2_update rule would fail it).
#[test]
fn zero_write_over_preallocated_zero_cluster_writes_no_l2_table() {
    let mem = image();
    let q = Qcow2::open(mem.clone(), Qcow2Options::default()).unwrap();
    q.write_at(&vec![1u8; 4 << 20], 0).unwrap();
    q.write_zeroes(1 << 20, 2 << 20, false).unwrap();
    q.close().unwrap();
    let q = open_under(&mem, CONF_L2_UPDATE);
    q.write_zeroes(1 << 20, 2 << 20, false).unwrap();
    q.close().unwrap();
    // The rule itself works: a change of allocation does update L2.
    let q = open_under(&mem, CONF_L2_UPDATE);
    q.write_zeroes(1 << 20, 2 << 20, true).unwrap();
    assert_eq!(errno(q.flush()), libc::EIO);
}

#[test]
fn read_aio_fails_guest_reads_but_not_metadata_reads() {
    let mem = image();
    let q = Qcow2::open(mem.clone(), Qcow2Options::default()).unwrap();
    q.write_at(&[7u8; 512], 512).unwrap();
    q.close().unwrap();
    let q = open_under(&mem, "[inject-error]\nevent = \"read_aio\"\nonce = \"on\"\n");
    // Unallocated space reads no data: no event, no error.
    q.read_at(&mut [0u8; 512], 1 << 20).unwrap();
    assert_eq!(errno(q.read_at(&mut [0u8; 512], 512)), libc::EIO);
    let mut buf = [0u8; 512];
    q.read_at(&mut buf, 512).unwrap();
    assert_eq!(buf, [7u8; 512], "a once rule fails one request");
    q.close().unwrap();
}

#[test]
fn l2_load_fails_the_first_access_to_an_uncached_table() {
    let mem = image();
    let q = Qcow2::open(mem.clone(), Qcow2Options::default()).unwrap();
    q.write_at(&[7u8; 512], 0).unwrap();
    q.close().unwrap();
    let q = open_under(&mem, "[inject-error]\nevent = \"l2_load\"\nerrno = \"28\"\n");
    assert_eq!(errno(q.read_at(&mut [0u8; 512], 0)), libc::ENOSPC);
}

#[test]
fn blkdebug_names_open_the_file_under_the_rules() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("t.qcow2");
    let conf = dir.path().join("b.conf");
    std::fs::write(&conf, "[inject-error]\nevent = \"write_aio\"\nerrno = \"28\"\n").unwrap();
    let file = oxcow::create_file(&img).unwrap();
    qcow2::create(file, None, &CreateOptions::new(1 << 20)).unwrap();
    let name = format!("blkdebug:{}:{}", conf.display(), img.display());
    let opened = oxcow::open(&name, &oxcow::OpenOptions::read_write()).unwrap();
    assert_eq!(errno(opened.device().write_at(&[1u8; 512], 0)), libc::ENOSPC);
    drop(opened);
    let opened = oxcow::open(format!("blkdebug::{}", img.display()), &oxcow::OpenOptions::read_write()).unwrap();
    opened.device().write_at(&[1u8; 512], 0).unwrap();
    opened.close().unwrap();
    let missing = format!("blkdebug:{}:{}", dir.path().join("none.conf").display(), img.display());
    assert!(oxcow::open(&missing, &oxcow::OpenOptions::read_only()).is_err());
}

/// QEMU's iotest 217: with every request failing from the first
/// cluster_free on, a snapshot deletion reports the old table's free as a
/// warning, then fails dropping the snapshot's references; the image on
/// disk has lost the snapshot and holds leaks only (its L2 table and data
/// cluster still counted twice, its L1 table and the old snapshot table
/// once), which a leak repair makes whole.
#[test]
fn snapshot_delete_failing_at_cluster_free_warns_then_fails_with_leaks_only() {
    let mem = image();
    let q = Qcow2::open(mem.clone(), Qcow2Options::default()).unwrap();
    q.write_at(&[7u8; 65536], 0).unwrap();
    q.snapshot_create("foo").unwrap();
    q.close().unwrap();
    let q = open_under(&mem, "[inject-error]\nevent = \"cluster_free\"\nerrno = \"5\"\n");
    let mut warnings = Vec::new();
    let err = q.snapshot_delete_with_warnings("foo", &mut |w| warnings.push(w)).unwrap_err();
    assert!(matches!(&err, oxcow::Error::Io { context, .. } if context == qcow2::SNAPSHOT_FREE_CONTEXT), "{err}");
    assert_eq!(err.errno(), libc::EIO);
    assert!(
        matches!(warnings.as_slice(), [qcow2::SnapshotWarning::OldTableNotFreed(e)] if e.errno() == libc::EIO),
        "{warnings:?}"
    );
    drop(q);
    let q = Qcow2::open(mem.clone(), Qcow2Options::default()).unwrap();
    assert!(q.snapshot_list().is_empty());
    let report = q.check(qcow2::Repair::None).unwrap();
    assert_eq!((report.leaks, report.corruptions), (4, 0), "{:?}", report.messages);
    let report = q.check(qcow2::Repair::Leaks).unwrap();
    assert_eq!((report.leaks, report.corruptions), (0, 0), "{:?}", report.messages);
    let mut buf = vec![0u8; 65536];
    q.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 7));
    q.close().unwrap();
}

/// Without failures a deletion has nothing to warn about.
#[test]
fn snapshot_delete_without_failures_warns_of_nothing() {
    let mem = image();
    let q = Qcow2::open(mem.clone(), Qcow2Options::default()).unwrap();
    q.write_at(&[7u8; 65536], 0).unwrap();
    q.snapshot_create("foo").unwrap();
    let mut warnings = 0;
    q.snapshot_delete_with_warnings("foo", &mut |_| warnings += 1).unwrap();
    assert_eq!(warnings, 0);
    let report = q.check(qcow2::Repair::None).unwrap();
    assert_eq!((report.leaks, report.corruptions), (0, 0), "{:?}", report.messages);
    q.close().unwrap();
}
