//! `convert` with several sources (concatenated into one target), with
//! `-c` over a `-B` backing file, and its refusals, against qemu-img on
//! the same inputs (iotest 122's cases).

use crate::dropin::{bare_sides, run, same_on, Cmp, Side};

/// Prepares one side with its own tools (which must succeed).
fn setup(side: &Side, tool: &str, args: &[&str]) {
    let o = run(side, tool, args, None);
    assert_eq!(o.code, 0, "{tool} {args:?} failed: {}{}", o.stdout, o.stderr);
}

/// Three 4 MiB sources with one written cluster each (and one 1023 KiB
/// pair with 1 KiB clusters, whose concatenation straddles clusters).
fn sources() -> (Side, Side) {
    let (ours, theirs) = bare_sides();
    for side in [&ours, &theirs] {
        for (name, pat) in [("s1.qcow2", "0x11"), ("s2.qcow2", "0x22"), ("s3.qcow2", "0x33")] {
            setup(side, "qemu-img", &["create", "-q", "-f", "qcow2", name, "4M"]);
            setup(side, "qemu-io", &["-f", "qcow2", "-c", &format!("write -P {pat} 0 64k"), name]);
        }
        for name in ["m1.qcow2", "m2.qcow2"] {
            setup(side, "qemu-img", &["create", "-q", "-f", "qcow2", "-o", "cluster_size=1024", name, "1023k"]);
        }
        setup(
            side,
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 0x11 16k 16k", "-c", "write -P 0x33 1022k 1k", "m1.qcow2"],
        );
        setup(side, "qemu-io", &["-f", "qcow2", "-c", "write -P 0x44 0 1k", "m2.qcow2"]);
        setup(side, "qemu-img", &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    }
    (ours, theirs)
}

fn both(ours: &Side, theirs: &Side, tool: &str, args: &[&str]) {
    same_on(ours, theirs, tool, args, None, Cmp::All);
}

#[test]
fn convert_concatenates_several_sources_as_qemu_img() {
    let (ours, theirs) = sources();
    both(&ours, &theirs, "qemu-img", &["convert", "-O", "qcow2", "s1.qcow2", "s2.qcow2", "s3.qcow2", "t.qcow2"]);
    // Written in guest order: the host offsets are qemu-img's.
    both(&ours, &theirs, "qemu-img", &["map", "--output=json", "t.qcow2"]);
    both(
        &ours,
        &theirs,
        "qemu-io",
        &["-f", "qcow2", "-c", "read -P 0x22 4M 64k", "-c", "read -P 0x33 8M 64k", "t.qcow2"],
    );
}

#[test]
fn convert_c_concatenates_misaligned_sources_as_qemu_img() {
    let (ours, theirs) = sources();
    both(&ours, &theirs, "qemu-img", &["convert", "-c", "-O", "qcow2", "m1.qcow2", "m2.qcow2", "t.qcow2"]);
    both(&ours, &theirs, "qemu-img", &["map", "--output=json", "t.qcow2"]);
    both(
        &ours,
        &theirs,
        "qemu-io",
        &["-f", "qcow2", "-c", "read -P 0x33 1022k 1k", "-c", "read -P 0x44 1023k 1k", "t.qcow2"],
    );
}

#[test]
fn convert_refuses_b_with_several_sources_and_o_with_n_in_qemu_img_words() {
    let (ours, theirs) = sources();
    both(
        &ours,
        &theirs,
        "qemu-img",
        &["convert", "-O", "qcow2", "-B", "base.qcow2", "s1.qcow2", "s2.qcow2", "t.qcow2"],
    );
    both(
        &ours,
        &theirs,
        "qemu-img",
        &["convert", "-O", "qcow2", "-n", "-o", "cluster_size=4k", "s1.qcow2", "s2.qcow2"],
    );
    both(&ours, &theirs, "qemu-img", &["convert", "-O", "qcow2", "--bitmaps", "s1.qcow2", "s2.qcow2", "t.qcow2"]);
}

/// Zeros over a backing file that holds data stay zeros in a compressed
/// copy with -B.
#[test]
fn convert_c_with_b_keeps_zeros_over_the_backing_file_as_qemu_img() {
    let (ours, theirs) = sources();
    for side in [&ours, &theirs] {
        setup(side, "qemu-io", &["-f", "qcow2", "-c", "write -P 0x11 0 1M", "base.qcow2"]);
        setup(side, "qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "o.qcow2"]);
        setup(side, "qemu-io", &["-f", "qcow2", "-c", "write -P 0 0 128k", "-c", "write -P 0x22 256k 64k", "o.qcow2"]);
    }
    let args = ["convert", "-O", "qcow2", "-c", "-B", "base.qcow2", "-o", "backing_fmt=qcow2", "o.qcow2", "t.qcow2"];
    both(&ours, &theirs, "qemu-img", &args);
    both(
        &ours,
        &theirs,
        "qemu-io",
        &["-f", "qcow2", "-c", "read -P 0 0 128k", "-c", "read -P 0x22 256k 64k", "t.qcow2"],
    );
    both(&ours, &theirs, "qemu-img", &["check", "t.qcow2"]);
}
