//! `check` and the repair on open, under the drop-in names, against QEMU's
//! tools on the same damaged images: the findings, the repair's lines and
//! their order, and the counts of what was found and repaired.

use crate::dropin::{bare_sides, same_on, Cmp, Side};
use crate::support::ok;
use std::os::unix::fs::FileExt;

/// Both sides run the same commands to make the same image.
fn both(ours: &Side, theirs: &Side, tool: &str, args: &[&str]) {
    for side in [ours, theirs] {
        ok(side.dir.path(), tool, args);
    }
}

fn read_be(side: &Side, file: &str, off: u64, len: usize) -> u64 {
    let f = std::fs::File::open(side.dir.path().join(file)).expect("open image");
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b[8 - len..], off).expect("read image");
    u64::from_be_bytes(b)
}

fn poke(side: &Side, file: &str, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(side.dir.path().join(file)).expect("open image");
    f.write_all_at(bytes, off).expect("poke image");
}

#[test]
fn check_words_a_reference_far_past_the_end_of_the_file_as_qemu_img() {
    let (ours, theirs) = bare_sides();
    both(&ours, &theirs, "qemu-img", &["create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "t.qcow2", "512"]);
    both(&ours, &theirs, "qemu-io", &["-c", "write 0 512", "t.qcow2"]);
    for side in [&ours, &theirs] {
        // The L2 table's first entry, pointing 2^55 bytes in.
        poke(side, "t.qcow2", 2048 + 8, &[0, 0x80, 0, 0, 0, 0, 0, 0]);
    }
    same_on(&ours, &theirs, "qemu-img", &["check", "t.qcow2"], None, Cmp::All);
}

#[test]
fn check_repair_fixes_a_leak_then_the_copied_flag_it_judges_afterwards() {
    let (ours, theirs) = bare_sides();
    both(&ours, &theirs, "qemu-img", &["create", "-q", "-f", "qcow2", "t.qcow2", "64k"]);
    both(&ours, &theirs, "qemu-io", &["-c", "write 0 64k", "t.qcow2"]);
    for side in [&ours, &theirs] {
        // The header's refcount 2 (a leak), the L1 entry without COPIED.
        let reftable = read_be(side, "t.qcow2", 48, 8);
        let refblock = read_be(side, "t.qcow2", reftable, 8);
        poke(side, "t.qcow2", refblock, &[0, 2]);
        let l1 = read_be(side, "t.qcow2", 40, 8);
        let entry = read_be(side, "t.qcow2", l1, 8) & !(1 << 63);
        poke(side, "t.qcow2", l1, &entry.to_be_bytes());
    }
    same_on(&ours, &theirs, "qemu-img", &["check", "-r", "all", "--output=json", "t.qcow2"], None, Cmp::All);
    same_on(&ours, &theirs, "qemu-img", &["check", "t.qcow2"], None, Cmp::All);
}

#[test]
fn check_repair_leaks_only_repeats_what_it_leaves() {
    let (ours, theirs) = bare_sides();
    both(&ours, &theirs, "qemu-img", &["create", "-q", "-f", "qcow2", "t.qcow2", "1M"]);
    both(&ours, &theirs, "qemu-io", &["-c", "write 0 64k", "-c", "write 128k 64k", "t.qcow2"]);
    for side in [&ours, &theirs] {
        // Guest cluster 2 mapped to guest cluster 0's host cluster: that
        // one is referenced twice (a corruption `-r leaks` leaves), guest
        // cluster 2's own is leaked.
        let l1 = read_be(side, "t.qcow2", 40, 8);
        let l2 = read_be(side, "t.qcow2", l1, 8) & 0x00ff_ffff_ffff_fe00;
        let first = read_be(side, "t.qcow2", l2, 8);
        poke(side, "t.qcow2", l2 + 16, &first.to_be_bytes());
    }
    same_on(&ours, &theirs, "qemu-img", &["check", "-r", "leaks", "t.qcow2"], None, Cmp::All);
}

/// qemu-io killed by `sigraise 9` with lazy refcounts (QEMU's iotest 039):
/// the data cluster's refcount never reached the disk, the new L2 table's
/// did.
fn crash_with_lazy_refcounts(ours: &Side, theirs: &Side) {
    both(
        ours,
        theirs,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", "compat=1.1,lazy_refcounts=on", "t.qcow2", "128M"],
    );
    for side in [ours, theirs] {
        let out =
            crate::dropin::run(side, "qemu-io", &["-c", "write -P 0x5a 0 512", "-c", "sigraise 9", "t.qcow2"], None);
        assert_ne!(out.code, 0, "qemu-io survived sigraise 9");
    }
}

#[test]
fn lazy_refcount_crash_is_found_and_rebuilt_as_qemu_img_does() {
    let (ours, theirs) = bare_sides();
    crash_with_lazy_refcounts(&ours, &theirs);
    same_on(&ours, &theirs, "qemu-img", &["check", "t.qcow2"], None, Cmp::All);
    same_on(&ours, &theirs, "qemu-img", &["check", "-r", "all", "t.qcow2"], None, Cmp::All);
    same_on(&ours, &theirs, "qemu-img", &["check", "t.qcow2"], None, Cmp::All);
}

#[test]
fn lazy_refcount_crash_is_repaired_on_open_with_qemu_io_saying_so() {
    let (ours, theirs) = bare_sides();
    crash_with_lazy_refcounts(&ours, &theirs);
    same_on(&ours, &theirs, "qemu-io", &["-c", "write -P 0x5a 0 512", "t.qcow2"], None, Cmp::All);
    same_on(&ours, &theirs, "qemu-img", &["check", "t.qcow2"], None, Cmp::All);
}

/// The same image on both sides, made by QEMU's tools.
fn qemu_made(ours: &Side, theirs: &Side, name: &str, make: &[&[&str]]) {
    for args in make {
        ok(theirs.dir.path(), args[0], &args[1..]);
    }
    std::fs::copy(theirs.dir.path().join(name), ours.dir.path().join(name)).expect("copy image");
}

#[test]
fn check_repair_completes_a_v3_snapshot_entry_without_extra_data() {
    let (ours, theirs) = bare_sides();
    qemu_made(
        &ours,
        &theirs,
        "t.qcow2",
        &[
            &["qemu-img", "create", "-q", "-f", "qcow2", "t.qcow2", "64M"],
            &["qemu-img", "snapshot", "-c", "sn0", "t.qcow2"],
        ],
    );
    for side in [&ours, &theirs] {
        // The entry again without its extra data (what a v2 writer left).
        let table = read_be(side, "t.qcow2", 64, 8);
        let extra = read_be(side, "t.qcow2", table + 36, 4);
        let names = read_be(side, "t.qcow2", table + 12, 2) + read_be(side, "t.qcow2", table + 14, 2);
        let f = std::fs::File::open(side.dir.path().join("t.qcow2")).expect("open image");
        let mut fixed = vec![0u8; 40];
        f.read_exact_at(&mut fixed, table).expect("read entry");
        let mut tail = vec![0u8; names as usize];
        f.read_exact_at(&mut tail, table + 40 + extra).expect("read names");
        fixed[36..40].copy_from_slice(&0u32.to_be_bytes());
        fixed.extend_from_slice(&tail);
        fixed.resize(fixed.len().div_ceil(8) * 8, 0);
        poke(side, "t.qcow2", table, &fixed);
    }
    same_on(&ours, &theirs, "qemu-img", &["check", "t.qcow2"], None, Cmp::All);
    same_on(&ours, &theirs, "qemu-img", &["check", "-r", "all", "t.qcow2"], None, Cmp::All);
    same_on(&ours, &theirs, "qemu-img", &["check", "t.qcow2"], None, Cmp::All);
    // Written again with QEMU's 24 bytes of extra data.
    for side in [&ours, &theirs] {
        let table = read_be(side, "t.qcow2", 64, 8);
        assert_eq!(read_be(side, "t.qcow2", table + 36, 4), 24);
    }
}

#[test]
fn snapshot_entries_carry_qemus_24_bytes_of_extra_data_on_v2_too() {
    let (ours, theirs) = bare_sides();
    both(&ours, &theirs, "qemu-img", &["create", "-q", "-f", "qcow2", "-o", "compat=0.10", "t.qcow2", "64M"]);
    both(&ours, &theirs, "qemu-img", &["snapshot", "-c", "sn0", "t.qcow2"]);
    let extra = |side: &Side| {
        let table = read_be(side, "t.qcow2", 64, 8);
        let f = std::fs::File::open(side.dir.path().join("t.qcow2")).expect("open image");
        let n = read_be(side, "t.qcow2", table + 36, 4);
        let mut b = vec![0u8; n as usize];
        f.read_exact_at(&mut b, table + 40).expect("read extra data");
        b
    };
    assert_eq!(extra(&ours), extra(&theirs));
}

#[test]
fn unaligned_refcount_block_met_by_an_allocation_is_qemus_corruption_event() {
    let (ours, theirs) = bare_sides();
    both(
        &ours,
        &theirs,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", "refcount_bits=64,cluster_size=1k", "t.qcow2", "1M"],
    );
    both(&ours, &theirs, "qemu-io", &["-c", "write 0 124k", "t.qcow2"]);
    both(&ours, &theirs, "qemu-io", &["-c", "discard 121k 1k", "t.qcow2"]);
    both(&ours, &theirs, "qemu-io", &["-c", "discard 123k 1k", "t.qcow2"]);
    for side in [&ours, &theirs] {
        // The second refcount block's offset, moved off its cluster.
        let reftable = read_be(side, "t.qcow2", 48, 8);
        poke(side, "t.qcow2", reftable + 14, &[6]);
    }
    same_on(&ours, &theirs, "qemu-io", &["-c", "write 121k 3k", "t.qcow2"], None, Cmp::All);
}
