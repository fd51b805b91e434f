//! qemu-io's `reopen -o lazy-refcounts=on|off` and `open -o` with qcow2's
//! runtime flags, under the drop-in name against QEMU's own qemu-io on the
//! same images (QEMU's iotests 039 and 080): turning lazy refcounts on at
//! runtime leaves the dirty bit and unwritten refcounts after a kill,
//! turning them off leaves a clean image.

use crate::dropin::{bare_sides, run, same_on, Cmp, Side};
use crate::support::ok;

/// The incompatible-feature bits of `x.qcow2`'s header.
fn incompatible(side: &Side) -> u64 {
    let h = std::fs::read(side.dir.path().join("x.qcow2")).expect("read image");
    h[72..80].iter().fold(0u64, |v, &b| v << 8 | u64::from(b))
}

/// Creates `x.qcow2` with `opts`, runs `reopen -o reopen`, a write and a
/// SIGKILL on both sides, and compares the dirty bit and `check`.
fn killed_after_reopen(create_opts: &str, reopen: &str) -> u64 {
    let (ours, theirs) = bare_sides();
    for side in [&ours, &theirs] {
        ok(side.dir.path(), "qemu-img", &["create", "-q", "-f", "qcow2", "-o", create_opts, "x.qcow2", "1M"]);
        let cmds = ["-c", reopen, "-c", "write -P 0x5a 0 512", "-c", "sigraise 9"];
        let mut args = vec!["-f", "qcow2"];
        args.extend(cmds);
        args.push("x.qcow2");
        // Killed on purpose: its status is the signal's.
        run(side, "qemu-io", &args, None);
    }
    assert_eq!(incompatible(&ours), incompatible(&theirs), "dirty bit");
    same_on(&ours, &theirs, "qemu-img", &["check", "x.qcow2"], None, Cmp::All);
    incompatible(&ours)
}

#[test]
fn reopen_lazy_refcounts_on_leaves_the_dirty_bit_after_a_kill() {
    let bits = killed_after_reopen("compat=1.1,lazy_refcounts=off", "reopen -o lazy-refcounts=on");
    assert_eq!(bits & 1, 1, "QEMU sets the dirty bit");
}

#[test]
fn reopen_lazy_refcounts_off_leaves_a_clean_image_after_a_kill() {
    let bits = killed_after_reopen("compat=1.1,lazy_refcounts=on", "reopen -o lazy-refcounts=off");
    assert_eq!(bits & 1, 0, "QEMU leaves the dirty bit clear");
}

#[test]
fn reopen_lazy_refcounts_on_a_version_2_image_is_refused_in_qemus_words() {
    let (ours, theirs) = bare_sides();
    for side in [&ours, &theirs] {
        ok(side.dir.path(), "qemu-img", &["create", "-q", "-f", "qcow2", "-o", "compat=0.10", "x.qcow2", "1M"]);
    }
    let args = ["-f", "qcow2", "-c", "reopen -o lazy-refcounts=on", "-c", "read 0 512", "x.qcow2"];
    same_on(&ours, &theirs, "qemu-io", &args, None, Cmp::All);
}

#[test]
fn open_takes_qcow2_runtime_flags_and_checks_their_values() {
    let (ours, theirs) = bare_sides();
    for side in [&ours, &theirs] {
        ok(side.dir.path(), "qemu-img", &["create", "-q", "-f", "qcow2", "x.qcow2", "1M"]);
    }
    for opts in [
        "overlap-check.inactive-l2=on,lazy-refcounts=on,pass-discard-request=off",
        "overlap-check=all",
        "overlap-check.template=blubb",
        "overlap-check.active-l1=maybe",
    ] {
        let open = format!("open -o {opts} x.qcow2");
        same_on(&ours, &theirs, "qemu-io", &["-c", &open, "-c", "write 0 4k"], None, Cmp::All);
    }
}
