//! Where new clusters land, against QEMU's own tools: the same writes,
//! discards and rebases on both sides must give the same host offsets
//! (`qemu-img map --output=json`) and the same `check` result. QEMU
//! places the clusters one write needs as one contiguous run, skipping
//! free holes too small for it (iotest 303's bitmap offsets depend on it).

use crate::dropin::{bare_sides, run, same_on, Cmp, Side};

/// Prepares one side with its own tools (which must succeed).
fn setup(side: &Side, tool: &str, args: &[&str]) {
    let o = run(side, tool, args, None);
    assert_eq!(o.code, 0, "{tool} {args:?} failed: {}{}", o.stdout, o.stderr);
}

/// Runs each qemu-io command line (one process each) on both sides, then
/// compares the maps and the check reports.
fn same_layout(ours: &Side, theirs: &Side, img: &str, runs: &[Vec<String>]) {
    for cmds in runs {
        let mut args = vec!["-f", "qcow2"];
        for c in cmds {
            args.extend(["-c", c.as_str()]);
        }
        args.push(img);
        same_on(ours, theirs, "qemu-io", &args, None, Cmp::All);
    }
    same_on(ours, theirs, "qemu-img", &["map", "--output=json", img], None, Cmp::All);
    same_on(ours, theirs, "qemu-img", &["check", img], None, Cmp::All);
}

/// Multi-cluster writes around holes a discard left (one of one cluster,
/// one of three), then a write crossing L2 tables (64 entries a table
/// with 512-byte clusters).
fn writes_around_holes(cluster_size: u64) {
    let (ours, theirs) = bare_sides();
    let cs = cluster_size;
    let size = (256 * cs).to_string();
    let opt = format!("cluster_size={cs}");
    for side in [&ours, &theirs] {
        setup(side, "qemu-img", &["create", "-q", "-f", "qcow2", "-o", &opt, "x.qcow2", &size]);
    }
    let w = |at: u64, n: u64| format!("write -P 0x5a {} {}", at * cs, n * cs);
    let d = |at: u64, n: u64| format!("discard {} {}", at * cs, n * cs);
    let runs =
        vec![vec![w(0, 8)], vec![d(1, 1), d(3, 3)], vec![w(20, 2), w(30, 1), w(40, 4)], vec![w(50, 1), w(60, 70)]];
    same_layout(&ours, &theirs, "x.qcow2", &runs);
}

#[test]
fn host_offsets_as_qemu_io_with_512_byte_clusters() {
    writes_around_holes(512);
}

#[test]
fn host_offsets_as_qemu_io_with_64k_clusters() {
    writes_around_holes(64 << 10);
}

#[test]
fn host_offsets_as_qemu_io_with_2m_clusters() {
    writes_around_holes(2 << 20);
}

/// iotest 024's case: zeros the old backing file holds are copied as
/// data, zeros past its end are written as a zero range.
#[test]
fn rebase_copies_old_backing_zeros_as_data_as_qemu_img() {
    let (ours, theirs) = bare_sides();
    for side in [&ours, &theirs] {
        let run = |tool: &str, args: &[&str]| setup(side, tool, args);
        run("qemu-img", &["create", "-q", "-f", "qcow2", "old.qcow2", "256k"]);
        run("qemu-img", &["create", "-q", "-f", "qcow2", "new.qcow2", "320k"]);
        run("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "old.qcow2", "-F", "qcow2", "x.qcow2", "320k"]);
        run("qemu-io", &["-f", "qcow2", "-c", "write -P 0x11 0 128k", "-c", "write -z 192k 64k", "old.qcow2"]);
        run("qemu-io", &["-f", "qcow2", "-c", "write -P 0x22 64k 256k", "new.qcow2"]);
    }
    rebase_as_qemu_img(&ours, &theirs, &["-f", "qcow2", "-b", "new.qcow2", "-F", "qcow2", "x.qcow2"]);
    same_on(&ours, &theirs, "qemu-img", &["check", "x.qcow2"], None, Cmp::All);
}

/// iotest 024's rebase within one chain: past the old backing file's end
/// the zeros go in as a zero range when the new backing file is further
/// down the old chain.
#[test]
fn rebase_within_the_chain_writes_zeros_past_the_old_end_as_qemu_img() {
    let (ours, theirs) = bare_sides();
    for side in [&ours, &theirs] {
        let run = |tool: &str, args: &[&str]| setup(side, tool, args);
        run("qemu-img", &["create", "-q", "-f", "qcow2", "new.qcow2", "320k"]);
        run("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "new.qcow2", "-F", "qcow2", "old.qcow2", "256k"]);
        run("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "old.qcow2", "-F", "qcow2", "x.qcow2", "320k"]);
        run("qemu-io", &["-f", "qcow2", "-c", "write -P 0x11 0 320k", "new.qcow2"]);
        run("qemu-io", &["-f", "qcow2", "-c", "write -P 0x22 0 256k", "old.qcow2"]);
    }
    rebase_as_qemu_img(&ours, &theirs, &["-f", "qcow2", "-b", "new.qcow2", "-F", "qcow2", "x.qcow2"]);
    same_on(&ours, &theirs, "qemu-img", &["check", "x.qcow2"], None, Cmp::All);
}

/// iotest 252's case: an image without a backing file rebased onto one
/// gets its zeros over the new backing file's data as a zero range.
#[test]
fn rebase_without_an_old_backing_file_writes_zeros_as_qemu_img() {
    let (ours, theirs) = bare_sides();
    for side in [&ours, &theirs] {
        let run = |tool: &str, args: &[&str]| setup(side, tool, args);
        run("qemu-img", &["create", "-q", "-f", "qcow2", "x.qcow2", "384k"]);
        run("qemu-img", &["create", "-q", "-f", "qcow2", "new.qcow2", "384k"]);
        run("qemu-io", &["-f", "qcow2", "-c", "write -P 0x22 0 128k", "x.qcow2"]);
        run("qemu-io", &["-f", "qcow2", "-c", "write -P 0x11 0 64k", "-c", "write -P 0x11 256k 64k", "new.qcow2"]);
    }
    rebase_as_qemu_img(&ours, &theirs, &["-b", "new.qcow2", "-F", "qcow2", "x.qcow2"]);
}

/// Rebases `x.qcow2` with `args` on both sides; what qemu-img prints and
/// the map afterwards must match.
fn rebase_as_qemu_img(ours: &Side, theirs: &Side, args: &[&str]) {
    let rebase: Vec<&str> = std::iter::once("rebase").chain(args.iter().copied()).collect();
    same_on(ours, theirs, "qemu-img", &rebase, None, Cmp::All);
    same_on(ours, theirs, "qemu-img", &["map", "--output=json", "x.qcow2"], None, Cmp::All);
}

/// Creates `x.qcow2` with `opts` on both sides and runs the qemu-io
/// command lines (one process each), then compares maps and checks (the
/// check's last line is the file's end offset).
fn same_layout_after(opts: &str, size: &str, runs: &[&[&str]]) -> (Side, Side) {
    let (ours, theirs) = bare_sides();
    for side in [&ours, &theirs] {
        setup(side, "qemu-img", &["create", "-q", "-f", "qcow2", "-o", opts, "x.qcow2", size]);
    }
    let runs: Vec<Vec<String>> = runs.iter().map(|r| r.iter().map(|c| c.to_string()).collect()).collect();
    same_layout(&ours, &theirs, "x.qcow2", &runs);
    (ours, theirs)
}

/// A 512-byte-cluster image's one-cluster refcount table covers 8 MiB:
/// writing 9 MiB grows it, the new table and its blocks placed as QEMU
/// places them (iotest 044), and the next writes land as QEMU's.
#[test]
fn refcount_table_growth_as_qemu_io() {
    same_layout_after("cluster_size=512", "64M", &[&["write -P 1 0 9M"], &["write -P 3 20M 2M", "write 30M 512"]]);
}

/// 64-bit refcounts on 512-byte clusters: a refcount block covers 64
/// clusters, so nearly every write needs a new one; QEMU places each
/// after the clusters found and searches again from them.
#[test]
fn new_refcount_blocks_as_qemu_io_with_64_bit_refcounts() {
    same_layout_after(
        "cluster_size=512,refcount_bits=64",
        "64M",
        &[&["write -P 1 0 3M", "write -P 2 5M 1M", "discard 1M 1M"], &["write -P 3 8M 2M", "write 1M 3M"]],
    );
}

/// A shrink drops refcount blocks left counting nothing (iotest 163:
/// blocks placed outside the range they describe), and the file ends
/// where QEMU's does.
#[test]
fn shrink_drops_emptied_refcount_blocks_as_qemu_img() {
    let write = |at: u64| format!("write -P 1 {} 256k", at << 10);
    let writes: Vec<String> = [0, 1024, 2048, 512, 1536].into_iter().map(write).collect();
    let runs: Vec<&[&str]> = vec![];
    let (ours, theirs) = same_layout_after("cluster_size=512,refcount_bits=64", "3M", &runs);
    for w in &writes {
        for side in [&ours, &theirs] {
            setup(side, "qemu-io", &["-f", "qcow2", "-c", w, "x.qcow2"]);
        }
    }
    same_on(&ours, &theirs, "qemu-img", &["resize", "--shrink", "x.qcow2", "1M"], None, Cmp::All);
    same_on(&ours, &theirs, "qemu-img", &["map", "--output=json", "x.qcow2"], None, Cmp::All);
    same_on(&ours, &theirs, "qemu-img", &["check", "x.qcow2"], None, Cmp::All);
}

/// iotest 137's case: a zeroed refcount block says cluster 0 is free, so
/// QEMU's search would put a new L2 table on the header; both refuse the
/// write and mark the image corrupt, in the same words, and the header
/// stays intact (`info` reads it, corrupt flag set).
#[test]
fn l2_allocation_meeting_the_header_marks_corrupt_as_qemu_io() {
    use std::os::unix::fs::FileExt;
    let (ours, theirs) = bare_sides();
    for side in [&ours, &theirs] {
        setup(side, "qemu-img", &["create", "-q", "-f", "qcow2", "x.qcow2", "64M"]);
        let f = std::fs::OpenOptions::new().write(true).open(side.dir.path().join("x.qcow2")).expect("open image");
        f.write_all_at(&[0; 8], 0x20000).expect("zero the first refcounts");
    }
    same_on(&ours, &theirs, "qemu-io", &["-f", "qcow2", "-c", "write 64k 64k", "x.qcow2"], None, Cmp::All);
    same_on(&ours, &theirs, "qemu-img", &["info", "--output=json", "x.qcow2"], None, Cmp::All);
}
