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

/// Copy-on-read copies what the read touches, rounded to subclusters
/// with extended L2 entries (into the cluster's own host cluster when it
/// has one), and without a backing file stores the zeros it read (zero
/// clusters on v3, data on v2): each step's `map` as QEMU's.
#[test]
fn copy_on_read_is_per_subcluster_and_stores_zeros_without_a_backing_file() {
    let (ours, theirs) = bare_sides();
    for d in [ours.dir.path(), theirs.dir.path()] {
        ok(d, "qemu-img", &["create", "-q", "-f", "qcow2", "b.qcow2", "256k"]);
        ok(d, "qemu-io", &["-f", "qcow2", "-c", "write -q -P 0xaa 0 256k", "b.qcow2"]);
        ok(d, "qemu-io", &["-f", "qcow2", "-c", "write -q -z 128k 8k", "b.qcow2"]);
        let ext = ["create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-b", "b.qcow2", "-F", "qcow2", "e.qcow2"];
        ok(d, "qemu-img", &ext);
        ok(d, "qemu-io", &["-f", "qcow2", "-c", "write -q -P 0xbb 28k 2k", "-c", "write -q -P 0xcc 34k 2k", "e.qcow2"]);
        for (name, compat) in [("v2.qcow2", "0.10"), ("v3.qcow2", "1.1")] {
            ok(d, "qemu-img", &["create", "-q", "-f", "qcow2", "-o", &format!("compat={compat}"), name, "130k"]);
        }
    }
    let runs: &[&[&str]] = &[
        // Into a cluster with data of its own, then into one with none,
        // across a cluster boundary, and over backing zeros.
        &["-f", "qcow2", "-C", "-c", "read -P 0xaa 30k 4k", "e.qcow2"],
        &["-f", "qcow2", "-c", "map", "e.qcow2"],
        &["-f", "qcow2", "-C", "-c", "read -P 0xaa 65k 1k", "-c", "read -P 0xaa 127k 2k", "e.qcow2"],
        &["-f", "qcow2", "-C", "-c", "read -P 0 129k 6k", "e.qcow2"],
        &["-f", "qcow2", "-c", "map", "e.qcow2"],
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 0xbb 28k 2k",
            "-c",
            "read -P 0xaa 30k 4k",
            "-c",
            "read -P 0xcc 34k 2k",
            "e.qcow2",
        ],
        &["-f", "qcow2", "-C", "-c", "read -P 0 0 1k", "-c", "read -P 0 127k 3k", "v2.qcow2"],
        &["-f", "qcow2", "-c", "map", "v2.qcow2"],
        &["-f", "qcow2", "-C", "-c", "read -P 0 0 1k", "-c", "read -P 0 127k 3k", "v3.qcow2"],
        &["-f", "qcow2", "-c", "map", "v3.qcow2"],
    ];
    for args in runs {
        same_on(&ours, &theirs, "qemu-io", args, None, Cmp::All);
    }
    // QEMU's own check finds oxcow's images clean (host offsets differ).
    for img in ["e.qcow2", "v2.qcow2", "v3.qcow2"] {
        let out = std::process::Command::new("/usr/bin/qemu-img")
            .args(["check", "-q"])
            .arg(ours.dir.path().join(img))
            .output()
            .unwrap();
        assert!(out.status.success(), "{img}: {}", String::from_utf8_lossy(&out.stdout));
    }
}
