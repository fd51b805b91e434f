//! QEMU's `copy-on-read` filter driver in qemu-io option trees
//! (`driver=copy-on-read,file.driver=qcow2`), oxcow as `qemu-io` against
//! QEMU's own: what a read brings into the overlay, and the refusals of
//! copy-on-read over a read-only image, in QEMU's words.

use crate::dropin::{bare_sides, same_on, Cmp};
use crate::support::ok;
use std::path::Path;

/// `b.qcow2` with pattern 5 in its second cluster, under `t.qcow2`.
fn images(dir: &Path) {
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "b.qcow2", "1M"]);
    ok(dir, "qemu-io", &["-f", "qcow2", "-c", "write -q -P 5 64k 64k", "b.qcow2"]);
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "t.qcow2"]);
}

#[test]
fn qemu_io_copy_on_read_filter_option_trees() {
    let (ours, theirs) = bare_sides();
    for d in [ours.dir.path(), theirs.dir.path()] {
        images(d);
    }
    let runs: &[&[&str]] = &[
        &["-c", "open -r -o driver=copy-on-read,file.driver=qcow2 t.qcow2"],
        &["-f", "qcow2", "-C", "-r", "-c", "read 0 4k", "t.qcow2"],
        &["-c", "open -o driver=copy-on-read,file.driver=qcow2 t.qcow2", "-c", "read -P 5 64k 64k"],
        &["-f", "qcow2", "-c", "map", "t.qcow2"],
    ];
    for args in runs {
        same_on(&ours, &theirs, "qemu-io", args, None, Cmp::All);
    }
    // The read brought the backing cluster in: the overlay alone has it.
    let m = ok(ours.dir.path(), "qemu-io", &["-f", "qcow2", "-c", "map", "t.qcow2"]);
    assert!(m.stdout.contains("64 KiB (0x10000) bytes     allocated at offset 64 KiB"), "{}", m.stdout);
}
