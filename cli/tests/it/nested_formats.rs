//! A format over a format (QEMU's `file.driver=qcow2`): an image whose
//! "file" is another image's virtual disk, opened by option strings and
//! `json:` names; and `backing: null`. oxcow as `qemu-io` against QEMU's
//! own on the same images, then QEMU's tools on what oxcow wrote.

use crate::dropin::{bare_sides, same_on, Cmp};
use crate::support::ok;
use std::path::Path;
use std::process::Command;

/// `outer.qcow2`, 8 MiB, whose virtual disk holds the bytes of a qcow2
/// image (`inner`, 4 MiB, patterns 42 at 0 and 23 at 64k); `base.qcow2`
/// (pattern 5) under `over.qcow2`.
fn images(d: &Path) {
    ok(d, "qemu-img", &["create", "-q", "-f", "qcow2", "inner.qcow2", "4M"]);
    ok(d, "qemu-io", &["-f", "qcow2", "-c", "write -q -P 42 0 512", "-c", "write -q -P 23 64k 4k", "inner.qcow2"]);
    ok(d, "qemu-img", &["create", "-q", "-f", "qcow2", "outer.qcow2", "8M"]);
    ok(d, "qemu-img", &["convert", "-n", "-f", "raw", "-O", "qcow2", "inner.qcow2", "outer.qcow2"]);
    ok(d, "qemu-img", &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
    ok(d, "qemu-io", &["-f", "qcow2", "-c", "write -q -P 5 0 64k", "base.qcow2"]);
    ok(d, "qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "over.qcow2"]);
}

const NESTED: &str = "open -o driver=qcow2,file.driver=qcow2,file.file.filename=outer.qcow2";

#[test]
fn qemu_io_reads_and_writes_a_qcow2_image_inside_a_qcow2_image() {
    let (ours, theirs) = bare_sides();
    for d in [ours.dir.path(), theirs.dir.path()] {
        images(d);
    }
    let json = r#"json:{"driver": "qcow2", "file": {"driver": "qcow2", "file": {"filename": "outer.qcow2"}}}"#;
    let runs: &[&[&str]] = &[
        &["-c", NESTED, "-c", "read -P 42 0 512", "-c", "read -P 23 64k 4k", "-c", "read -P 0 1M 4k"],
        &["-c", "read -P 42 0 512", "-c", "read -P 23 64k 4k", json],
        // Writes that allocate in the inner image, which grows inside the
        // outer image's disk.
        &["-c", NESTED, "-c", "write -P 7 1M 128k", "-c", "write -z 64k 4k", "-c", "read -P 7 1M 128k"],
        &["-c", NESTED, "-c", "read -P 0 64k 4k", "-c", "read -P 7 1M 128k", "-c", "read -P 42 0 512"],
        // The outer format is probed when not named.
        &["-c", "open -o file.driver=qcow2,file.file.filename=outer.qcow2", "-c", "read -P 42 0 512"],
        // `backing: null` leaves the backing file closed.
        &["-c", "read -P 5 0 4k", "over.qcow2"],
        &[
            "-c",
            "read -P 0 0 4k",
            r#"json:{"driver": "qcow2", "file": {"driver": "file", "filename": "over.qcow2"}, "backing": null}"#,
        ],
    ];
    for args in runs {
        same_on(&ours, &theirs, "qemu-io", args, None, Cmp::All);
    }
    // What oxcow wrote, QEMU reads, and both layers are clean to QEMU.
    let d = ours.dir.path();
    let qemu = |prog: &str, args: &[&str]| {
        let out = Command::new(format!("/usr/bin/{prog}")).current_dir(d).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{prog} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    qemu(
        "qemu-io",
        &["-c", NESTED, "-c", "read -q -P 7 1M 128k", "-c", "read -q -P 0 64k 4k", "-c", "read -q -P 42 0 512"],
    );
    qemu("qemu-img", &["check", "-q", "outer.qcow2"]);
    qemu("qemu-img", &["convert", "-O", "raw", "outer.qcow2", "extracted.qcow2"]);
    qemu("qemu-img", &["check", "-q", "extracted.qcow2"]);
}

/// A protocol driver named as the top node takes the file as it is (a
/// qcow2 file's bytes, not its disk) and checks its type as QEMU's does:
/// `file` regular files only, `host_device`/`host_cdrom` devices only;
/// `locking=off` is taken; flushing /dev/null is no error. (A CD-ROM's
/// medium checks are not modelled.)
#[test]
fn qemu_io_protocol_drivers_check_the_file_type() {
    let (ours, theirs) = bare_sides();
    for d in [ours.dir.path(), theirs.dir.path()] {
        images(d);
        std::fs::create_dir(d.join("dir")).unwrap();
    }
    for driver in ["file", "host_device", "host_cdrom"] {
        for (ro, name) in
            [(true, "dir"), (false, "dir"), (true, "/dev/null"), (false, "/dev/null"), (true, "inner.qcow2")]
        {
            // QEMU asks a CD-ROM for its medium, which /dev/null has not.
            if driver == "host_cdrom" && name == "/dev/null" {
                continue;
            }
            let open = format!("open {}-o driver={driver},filename={name},locking=off", if ro { "-r " } else { "" });
            same_on(&ours, &theirs, "qemu-io", &["-c", &open, "-c", "length"], None, Cmp::All);
        }
    }
    // QFI\xfb: the raw bytes of a qcow2 file.
    let open = "open -r -o driver=file,filename=inner.qcow2";
    same_on(
        &ours,
        &theirs,
        "qemu-io",
        &["-c", open, "-c", "read -P 0x51 0 1", "-c", "read -P 0xfb 3 1"],
        None,
        Cmp::All,
    );
}
