//! qemu-io's `write -b` / `read -b`: the VM state area past the end of a
//! qcow2 disk, compared with QEMU's qemu-io on the same commands, and
//! read across tools (what one writes, the other reads back).

use crate::dropin::{bare_sides, run, same_on, Cmp, Side};
use crate::support::ok;

fn both(f: impl Fn(&Side)) -> (Side, Side) {
    let (ours, theirs) = bare_sides();
    f(&ours);
    f(&theirs);
    (ours, theirs)
}

/// QEMU's iotest 029: a snapshot taken before the state was written
/// (a smaller L1 table), then the state far past the disk (1 TiB in),
/// kept through a snapshot and read back after reverting to it.
#[test]
fn vm_state_through_snapshots_as_in_qemus_iotest_029() {
    let (ours, theirs) = both(|s| {
        ok(s.dir.path(), "qemu-img", &["create", "-q", "-f", "qcow2", "t.qcow2", "64M"]);
    });
    for (tool, args) in [
        ("qemu-img", vec!["snapshot", "-c", "foo", "t.qcow2"]),
        ("qemu-io", vec!["-f", "qcow2", "-c", "write -b 0 4k", "t.qcow2"]),
        ("qemu-img", vec!["snapshot", "-a", "foo", "t.qcow2"]),
        ("qemu-img", vec!["check", "t.qcow2"]),
        ("qemu-io", vec!["-f", "qcow2", "-c", "write -b -P 0x11 1T 4k", "t.qcow2"]),
        ("qemu-img", vec!["snapshot", "-c", "bar", "t.qcow2"]),
        ("qemu-io", vec!["-f", "qcow2", "-c", "write -b -P 0x22 1T 4k", "t.qcow2"]),
        ("qemu-io", vec!["-f", "qcow2", "-c", "read -b -P 0x22 1T 4k", "t.qcow2"]),
        ("qemu-img", vec!["snapshot", "-a", "bar", "t.qcow2"]),
        ("qemu-io", vec!["-f", "qcow2", "-c", "read -b -P 0x11 1T 4k", "-c", "read -b -P 0 0 4k", "t.qcow2"]),
        ("qemu-img", vec!["check", "t.qcow2"]),
        ("qemu-io", vec!["-f", "qcow2", "-c", "write -b -z 0 4k", "t.qcow2"]),
    ] {
        // check's "Image end offset" follows each tool's own allocation
        // choices (QEMU reverts into the old L1 table, oxcow writes a new
        // one): only its verdict must agree.
        let cmp = if args[0] == "check" { Cmp::NoStdout } else { Cmp::All };
        same_on(&ours, &theirs, tool, &args, None, cmp);
        if args[0] == "check" {
            let r = run(&ours, tool, &args, None);
            assert!(r.stdout.starts_with("No errors were found on the image."), "{}", r.stdout);
        }
    }
}

/// The area written by each tool reads back in the other, across an L2
/// table boundary, and leaves the disk itself untouched.
#[test]
fn vm_state_written_by_either_tool_reads_back_in_the_other() {
    let (ours, theirs) = both(|s| {
        ok(s.dir.path(), "qemu-img", &["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "t.qcow2", "6G"]);
    });
    let write = ["-f", "qcow2", "-c", "write -b -P 0x5a 2093056 8k", "-c", "write -P 0x33 0 4k", "t.qcow2"];
    let read = ["-f", "qcow2", "-c", "read -b -P 0x5a 2093056 8k", "-c", "read -P 0x33 0 4k", "t.qcow2"];
    let w = run(&ours, "qemu-io", &write, None);
    assert_eq!(w.code, 0, "{}{}", w.stdout, w.stderr);
    let w = run(&theirs, "qemu-io", &write, None);
    assert_eq!(w.code, 0, "{}{}", w.stdout, w.stderr);
    // Swap the images: each tool reads what the other wrote.
    let (a, b) = (ours.dir.path().join("t.qcow2"), theirs.dir.path().join("t.qcow2"));
    let tmp = ours.dir.path().join("swap");
    std::fs::rename(&a, &tmp).unwrap();
    std::fs::rename(&b, &a).unwrap();
    std::fs::rename(&tmp, &b).unwrap();
    for side in [&ours, &theirs] {
        let r = run(side, "qemu-io", &read, None);
        assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
        assert!(!r.stdout.contains("verification failed"), "{}", r.stdout);
        let c = run(side, "qemu-img", &["check", "t.qcow2"], None);
        assert_eq!(c.code, 0, "{}{}", c.stdout, c.stderr);
    }
    same_on(&ours, &theirs, "qemu-img", &["map", "--output=json", "t.qcow2"], None, Cmp::All);
}

/// Formats without a VM state area refuse `-b` in QEMU's words.
#[test]
fn vm_state_on_raw_is_refused_as_qemu_does() {
    let (ours, theirs) = both(|s| {
        ok(s.dir.path(), "qemu-img", &["create", "-q", "-f", "raw", "r.img", "1M"]);
    });
    for cmd in ["write -b 0 512", "read -b 0 512", "write -b -c 0 512"] {
        same_on(&ours, &theirs, "qemu-io", &["-f", "raw", "-c", cmd, "r.img"], None, Cmp::All);
    }
}
