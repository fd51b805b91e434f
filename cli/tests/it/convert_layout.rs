//! What `convert` allocates and where, against qemu-img on the same
//! inputs: writes in guest order (host offsets as qemu-img's, the same on
//! every run), `-S 0` allocating everything, `-c -S 0` compressing zero
//! clusters, and `-B` copying what the source's own layer holds (iotest
//! 122's cases). Maps are read with QEMU's own qemu-img on both sides.

use crate::dropin::{bare_sides, run, same_on, Cmp, Side};
use crate::support::{ok, qemu_img};

/// Prepares one side with its own tools (which must succeed).
fn setup(side: &Side, tool: &str, args: &[&str]) {
    let o = run(side, tool, args, None);
    assert_eq!(o.code, 0, "{tool} {args:?} failed: {}{}", o.stdout, o.stderr);
}

/// Runs `args` on both sides (the same status and messages), then
/// compares QEMU's map of `out` on both sides, host offsets included.
fn convert_both(ours: &Side, theirs: &Side, args: &[&str], out: &str) {
    same_on(ours, theirs, "qemu-img", args, None, Cmp::All);
    let map = |side: &Side| ok(side.dir.path(), "qemu-img", &["map", "--output=json", out]).stdout;
    assert_eq!(map(ours), map(theirs), "map of {out} after {args:?}");
}

/// Runs the same qemu-io commands on `file` on both sides.
fn io_both(ours: &Side, theirs: &Side, cmds: &[&str], file: &str) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(file);
    for side in [ours, theirs] {
        setup(side, "qemu-io", &args);
    }
}

/// A 64 MiB qcow2 image with data runs several chunks long, holes
/// between them and a run written as zeros.
fn scattered(ours: &Side, theirs: &Side) {
    for side in [ours, theirs] {
        setup(side, "qemu-img", &["create", "-q", "-f", "qcow2", "s.qcow2", "64M"]);
    }
    let cmds = [
        "write -P 1 0 5M",
        "write -P 2 7M 3M",
        "write -P 3 20M 9M",
        "write -P 0 30M 1M",
        "write -P 4 40M 64k",
        "write -P 5 63M 1M",
    ];
    io_both(ours, theirs, &cmds, "s.qcow2");
}

#[test]
fn convert_writes_in_guest_order_at_qemu_img_host_offsets() {
    let (ours, theirs) = bare_sides();
    scattered(&ours, &theirs);
    convert_both(&ours, &theirs, &["convert", "-O", "qcow2", "s.qcow2", "t.qcow2"], "t.qcow2");
    for side in [&ours, &theirs] {
        setup(side, "qemu-img", &["convert", "-O", "raw", "s.qcow2", "s.raw"]);
    }
    convert_both(&ours, &theirs, &["convert", "-f", "raw", "-O", "qcow2", "s.raw", "r.qcow2"], "r.qcow2");
}

#[test]
fn convert_twice_gives_byte_identical_images_and_w_the_same_contents() {
    let (ours, theirs) = bare_sides();
    scattered(&ours, &theirs);
    for t in ["a.qcow2", "b.qcow2"] {
        setup(&ours, "qemu-img", &["convert", "-O", "qcow2", "s.qcow2", t]);
    }
    let read = |t: &str| std::fs::read(ours.dir.path().join(t)).expect("read the output");
    assert!(read("a.qcow2") == read("b.qcow2"), "two converts of one image differ");
    // Out of order (-W): where the clusters land may differ, what they
    // hold may not.
    setup(&ours, "qemu-img", &["convert", "-W", "-O", "qcow2", "s.qcow2", "w.qcow2"]);
    let cmp = qemu_img(ours.dir.path(), &["compare", "s.qcow2", "w.qcow2"]);
    assert_eq!(cmp.code, 0, "{}{}", cmp.stdout, cmp.stderr);
    let check = qemu_img(ours.dir.path(), &["check", "w.qcow2"]);
    assert_eq!(check.code, 0, "{}{}", check.stdout, check.stderr);
}

/// iotest 122's images for -S 0: a standalone one with data and zeros
/// written, and an overlay over a half-written backing file.
fn s0_sources(ours: &Side, theirs: &Side) {
    for side in [ours, theirs] {
        setup(side, "qemu-img", &["create", "-q", "-f", "qcow2", "a.qcow2", "64M"]);
        setup(side, "qemu-img", &["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]);
        setup(side, "qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "o.qcow2"]);
    }
    io_both(ours, theirs, &["write -P 0x22 0 3M", "write -P 0 3M 3M"], "a.qcow2");
    io_both(ours, theirs, &["write -P 0x11 0 32M"], "base.qcow2");
    io_both(ours, theirs, &["write -P 0x22 0 3M"], "o.qcow2");
}

#[test]
fn convert_s0_allocates_the_whole_disk_in_one_run_as_qemu_img() {
    let (ours, theirs) = bare_sides();
    s0_sources(&ours, &theirs);
    for src in ["a.qcow2", "o.qcow2"] {
        convert_both(&ours, &theirs, &["convert", "-O", "qcow2", "-S", "0", src, "t.qcow2"], "t.qcow2");
    }
}

#[test]
fn convert_c_s0_compresses_zero_clusters_as_qemu_img() {
    let (ours, theirs) = bare_sides();
    s0_sources(&ours, &theirs);
    for src in ["a.qcow2", "o.qcow2"] {
        convert_both(&ours, &theirs, &["convert", "-O", "qcow2", "-c", "-S", "0", src, "t.qcow2"], "t.qcow2");
        let check = qemu_img(ours.dir.path(), &["compare", src, "t.qcow2"]);
        assert_eq!(check.code, 0, "{}{}", check.stdout, check.stderr);
    }
}

/// With -B, what the source's own layer holds is copied (even where it
/// reads as the backing file does), its zeros are kept as zeros, and
/// what it leaves to its backing file is left to the target's; a source
/// without a backing file has everything copied. Plain, -c, -S 0.
#[test]
fn convert_b_copies_what_the_sources_own_layer_holds_as_qemu_img() {
    let (ours, theirs) = bare_sides();
    for side in [&ours, &theirs] {
        setup(side, "qemu-img", &["create", "-q", "-f", "qcow2", "b.qcow2", "4M"]);
        setup(side, "qemu-img", &["create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "o.qcow2"]);
        setup(side, "qemu-img", &["create", "-q", "-f", "qcow2", "flat.qcow2", "4M"]);
    }
    io_both(&ours, &theirs, &["write -P 1 0 2M"], "b.qcow2");
    let top = ["write -P 0 0 128k", "write -P 2 256k 64k", "write -z 512k 64k", "write -P 1 1M 64k"];
    io_both(&ours, &theirs, &top, "o.qcow2");
    io_both(&ours, &theirs, &["write -P 2 0 64k", "write -P 1 1M 64k"], "flat.qcow2");
    for src in ["o.qcow2", "flat.qcow2"] {
        for extra in [&[][..], &["-c"], &["-S", "0"], &["-c", "-S", "0"]] {
            let mut args = vec!["convert", "-O", "qcow2", "-B", "b.qcow2", "-F", "qcow2"];
            args.extend(extra);
            args.extend([src, "t.qcow2"]);
            convert_both(&ours, &theirs, &args, "t.qcow2");
            let cmp = qemu_img(ours.dir.path(), &["compare", src, "t.qcow2"]);
            assert_eq!(cmp.code, 0, "{args:?}: {}{}", cmp.stdout, cmp.stderr);
        }
    }
}

/// The 122 regression: a 768 MiB overlay over a 256 MiB backing file;
/// nothing past the backing file's end is zeroed in the copy.
#[test]
fn convert_b_past_the_end_of_the_backing_file_writes_nothing_as_qemu_img() {
    let (ours, theirs) = bare_sides();
    for side in [&ours, &theirs] {
        setup(side, "qemu-img", &["create", "-q", "-f", "qcow2", "b.qcow2", "256M"]);
        setup(side, "qemu-img", &["create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "o.qcow2", "768M"]);
    }
    io_both(&ours, &theirs, &["write -P 0x11 255M 1M"], "b.qcow2");
    io_both(&ours, &theirs, &["write -P 0x22 600M 1M"], "o.qcow2");
    let args = ["convert", "-O", "qcow2", "-B", "b.qcow2", "-o", "compat=0.10,backing_fmt=qcow2", "o.qcow2", "t.qcow2"];
    convert_both(&ours, &theirs, &args, "t.qcow2");
}

/// -B names the backing file of a target convert creates: with -n there
/// is none to create, and qemu-img goes on without it.
#[test]
fn convert_n_ignores_b_as_qemu_img() {
    let (ours, theirs) = bare_sides();
    for side in [&ours, &theirs] {
        setup(side, "qemu-img", &["create", "-q", "-f", "qcow2", "b.qcow2", "4M"]);
        setup(side, "qemu-img", &["create", "-q", "-f", "qcow2", "s.qcow2", "4M"]);
        setup(side, "qemu-img", &["create", "-q", "-f", "qcow2", "t.qcow2", "4M"]);
    }
    io_both(&ours, &theirs, &["write -P 1 0 1M"], "b.qcow2");
    io_both(&ours, &theirs, &["write -P 1 0 1M"], "s.qcow2");
    convert_both(&ours, &theirs, &["convert", "-O", "qcow2", "-B", "b.qcow2", "-n", "s.qcow2", "t.qcow2"], "t.qcow2");
}
