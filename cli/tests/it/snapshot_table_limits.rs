//! Snapshot tables breaking QEMU's limits (more than 65536 entries, more
//! than 1 KiB of extra data in an entry), under the drop-in names against
//! QEMU's tools on the same images: refused on open, refused by `check`
//! without `-r all` with its hint, dropped or cut by `check -r all` with
//! its lines and counts, and a clean image afterwards.

use crate::dropin::{bare_sides, same_on, Cmp, Side};
use crate::support::ok;
use std::os::unix::fs::FileExt;

fn read_be(side: &Side, off: u64, len: usize) -> u64 {
    let f = std::fs::File::open(side.dir.path().join("t.qcow2")).expect("open image");
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b[8 - len..], off).expect("read image");
    u64::from_be_bytes(b)
}

fn poke(side: &Side, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(side.dir.path().join("t.qcow2")).expect("open image");
    f.write_all_at(bytes, off).expect("poke image");
}

/// `info`, `check`, `check -r all`, then `check` and `snapshot -l` again.
fn same_refusals_and_repair(ours: &Side, theirs: &Side) {
    same_on(ours, theirs, "qemu-img", &["info", "t.qcow2"], None, Cmp::NoStdout);
    same_on(ours, theirs, "qemu-img", &["check", "t.qcow2"], None, Cmp::All);
    same_on(ours, theirs, "qemu-img", &["check", "-r", "leaks", "t.qcow2"], None, Cmp::All);
    same_on(ours, theirs, "qemu-img", &["check", "-r", "all", "t.qcow2"], None, Cmp::All);
    same_on(ours, theirs, "qemu-img", &["check", "t.qcow2"], None, Cmp::All);
}

#[test]
fn snapshot_extra_data_over_1k_is_refused_then_cut_by_check_repair_as_qemu_img() {
    let (ours, theirs) = bare_sides();
    for side in [&ours, &theirs] {
        let d = side.dir.path();
        ok(d, "qemu-img", &["create", "-q", "-f", "qcow2", "t.qcow2", "1M"]);
        ok(d, "qemu-io", &["-c", "write -P 7 0 64k", "t.qcow2"]);
        ok(d, "qemu-img", &["snapshot", "-c", "one", "t.qcow2"]);
        ok(d, "qemu-img", &["snapshot", "-c", "two", "t.qcow2"]);
        // The second entry claims 4 KiB of extra data (its ID and name are
        // then read from the zeros after the table, in the same cluster).
        let table = read_be(side, 64, 8);
        let first_len =
            (40 + read_be(side, table + 36, 4) + read_be(side, table + 12, 2) + read_be(side, table + 14, 2))
                .next_multiple_of(8);
        poke(side, table + first_len + 36, &4096u32.to_be_bytes());
    }
    same_refusals_and_repair(&ours, &theirs);
    // The list's dates differ by when each side made its snapshots.
    same_on(&ours, &theirs, "qemu-img", &["snapshot", "-l", "t.qcow2"], None, Cmp::NoStdout);
    same_on(&ours, &theirs, "qemu-io", &["-c", "read -q -P 7 0 64k", "t.qcow2"], None, Cmp::All);
}

#[test]
fn snapshot_count_over_65536_is_refused_then_dropped_by_check_repair_as_qemu_img() {
    let (ours, theirs) = bare_sides();
    let count: u32 = 65536 + 3;
    let table: u64 = 1 << 20;
    let end = table + 40 * u64::from(count);
    for side in [&ours, &theirs] {
        let d = side.dir.path();
        // v2: all-zero 40-byte entries are valid ones there.
        ok(d, "qemu-img", &["create", "-q", "-f", "qcow2", "-o", "compat=0.10", "t.qcow2", "64M"]);
        poke(side, 60, &count.to_be_bytes());
        poke(side, 64, &table.to_be_bytes());
        let f = std::fs::OpenOptions::new().write(true).open(side.dir.path().join("t.qcow2")).expect("open image");
        f.set_len(end).expect("grow image");
        // The table's clusters are in use (refcount 1 in refcount block 0).
        let reftable = read_be(side, 48, 8);
        let refblock = read_be(side, reftable, 8);
        for c in table >> 16..end.div_ceil(1 << 16) {
            poke(side, refblock + 2 * c, &[0, 1]);
        }
    }
    same_refusals_and_repair(&ours, &theirs);
    for side in [&ours, &theirs] {
        assert_eq!(read_be(side, 60, 4), 65536, "the header's count after the repair");
    }
}

#[test]
fn snapshot_table_past_the_end_of_the_file_reads_as_zeros_as_qemu() {
    let (ours, theirs) = bare_sides();
    for side in [&ours, &theirs] {
        ok(side.dir.path(), "qemu-img", &["create", "-q", "-f", "qcow2", "t.qcow2", "64M"]);
        // 65536 entries at 16 MiB, all past the end of the file: 65536
        // all-zero entries, the most there may be.
        poke(side, 64, &(16u64 << 20).to_be_bytes());
        poke(side, 60, &65536u32.to_be_bytes());
    }
    same_on(&ours, &theirs, "qemu-img", &["snapshot", "-c", "test", "t.qcow2"], None, Cmp::All);
    same_on(&ours, &theirs, "qemu-io", &["-c", "read -q 0 512", "t.qcow2"], None, Cmp::All);
}

#[test]
fn snapshot_create_refuses_an_l2_entry_far_past_the_end_of_the_file_with_qemu_errno() {
    let (ours, theirs) = bare_sides();
    for side in [&ours, &theirs] {
        ok(side.dir.path(), "qemu-img", &["create", "-q", "-f", "qcow2", "t.qcow2", "64M"]);
        ok(side.dir.path(), "qemu-io", &["-c", "write -q 0 512", "t.qcow2"]);
    }
    // Past what any refcount table may cover (EFBIG), then 1 TiB in, where
    // no refcount block is (EAGAIN).
    for entry in [0xbfff_ffff_ffff_0000u64, 0x8000_00ff_ffff_0000] {
        for side in [&ours, &theirs] {
            poke(side, 0x40000, &entry.to_be_bytes());
        }
        same_on(&ours, &theirs, "qemu-img", &["snapshot", "-c", "test", "t.qcow2"], None, Cmp::All);
    }
}

#[test]
fn snapshot_l1_table_misplaced_or_too_large_is_refused_when_used_with_qemu_words() {
    // The entry's L1 offset unaligned, then its size past QEMU's 32 MiB.
    for (field, value) in [(0u64, 0x40_0200u64.to_be_bytes().to_vec()), (8, 0x1000_0000u32.to_be_bytes().to_vec())] {
        let (ours, theirs) = bare_sides();
        for side in [&ours, &theirs] {
            let d = side.dir.path();
            ok(d, "qemu-img", &["create", "-q", "-f", "qcow2", "t.qcow2", "64M"]);
            ok(d, "qemu-io", &["-c", "write -q 0 512", "t.qcow2"]);
            ok(d, "qemu-img", &["snapshot", "-c", "test", "t.qcow2"]);
            let table = read_be(side, 64, 8);
            poke(side, table + field, &value);
        }
        same_on(&ours, &theirs, "qemu-img", &["snapshot", "-l", "t.qcow2"], None, Cmp::NoStdout);
        same_on(&ours, &theirs, "qemu-img", &["convert", "-l", "test", "t.qcow2", "t.snap"], None, Cmp::All);
        same_on(&ours, &theirs, "qemu-img", &["snapshot", "-a", "test", "t.qcow2"], None, Cmp::All);
        same_on(&ours, &theirs, "qemu-img", &["snapshot", "-d", "test", "t.qcow2"], None, Cmp::All);
        same_on(&ours, &theirs, "qemu-img", &["check", "t.qcow2"], None, Cmp::All);
    }
}
