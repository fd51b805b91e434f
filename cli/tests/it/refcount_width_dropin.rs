//! Refcount widths under the drop-in names against QEMU's own tools on the
//! same images (QEMU's iotest 112): `refcount_bits` read as QEMU reads
//! numbers, a snapshot refused for a refcount that would overflow (its L1
//! table left leaked, as QEMU leaves it), and `check` counting references
//! past what the width holds as overflows.

use crate::dropin::{bare_sides, same_on, Cmp, Side};
use crate::support::ok;

fn same(ours: &Side, theirs: &Side, tool: &str, args: &[&str]) {
    same_on(ours, theirs, tool, args, None, Cmp::All);
}

fn both(ours: &Side, theirs: &Side, tool: &str, args: &[&str]) {
    for side in [ours, theirs] {
        ok(side.dir.path(), tool, args);
    }
}

#[test]
fn create_refcount_bits_minus_one_wraps_as_qemu() {
    let (ours, theirs) = bare_sides();
    same(&ours, &theirs, "qemu-img", &["create", "-q", "-f", "qcow2", "-o", "refcount_bits=-1", "t.qcow2", "1M"]);
}

#[test]
fn snapshot_over_a_full_refcount_fails_leaking_its_l1_table_as_qemu() {
    for (bits, snapshots) in [("1", 0), ("2", 2)] {
        let (ours, theirs) = bare_sides();
        let o = format!("refcount_bits={bits}");
        both(&ours, &theirs, "qemu-img", &["create", "-q", "-f", "qcow2", "-o", &o, "t.qcow2", "64M"]);
        both(&ours, &theirs, "qemu-io", &["-c", "write 0 512", "t.qcow2"]);
        for i in 0..snapshots {
            both(&ours, &theirs, "qemu-img", &["snapshot", "-c", &format!("s{i}"), "t.qcow2"]);
        }
        same(&ours, &theirs, "qemu-img", &["snapshot", "-c", "foo", "t.qcow2"]);
        same(&ours, &theirs, "qemu-img", &["check", "t.qcow2"]);
    }
}

#[test]
fn check_reports_a_reference_past_the_refcount_width_as_an_overflow() {
    let (ours, theirs) = bare_sides();
    both(&ours, &theirs, "qemu-img", &["create", "-q", "-f", "qcow2", "-o", "refcount_bits=1", "t.qcow2", "64M"]);
    both(&ours, &theirs, "qemu-io", &["-c", "write 0 64k", "t.qcow2"]);
    // The second L2 entry points at the first one's cluster too.
    for side in [&ours, &theirs] {
        let p = side.dir.path().join("t.qcow2");
        let mut img = std::fs::read(&p).expect("read image");
        img[0x40008..0x40010].copy_from_slice(&0x8000_0000_0005_0000u64.to_be_bytes());
        std::fs::write(&p, img).expect("write image");
    }
    same(&ours, &theirs, "qemu-img", &["check", "t.qcow2"]);
    same(&ours, &theirs, "qemu-img", &["check", "-r", "all", "t.qcow2"]);
}

/// The progress lines from the one at 2/3 on, as the iotest greps them.
fn from_two_thirds(side: &Side, args: &[&str]) -> Vec<String> {
    let out = crate::dropin::run(side, "qemu-img", args, None);
    assert_eq!(out.code, 0, "amend failed: {}", out.stderr);
    let lines: Vec<String> = out.stdout.split(['\r', '\n']).map(str::to_string).collect();
    let at = lines.iter().position(|l| l.contains("66.67")).unwrap_or(lines.len());
    lines.into_iter().skip(at).take(2).collect()
}

/// QEMU's iotest 112: a width change whose first new refcount block is
/// filled by its own refcount needs another walk, and the progress goes
/// back from 66.67% to 50.00% as qemu-img's.
#[test]
fn amend_refcount_width_progress_goes_back_for_another_walk_as_qemu() {
    let (ours, theirs) = bare_sides();
    let o = "refcount_bits=1,cluster_size=512";
    both(&ours, &theirs, "qemu-img", &["create", "-q", "-f", "qcow2", "-o", o, "t.qcow2", "64k"]);
    both(&ours, &theirs, "qemu-io", &["-c", &format!("write 0 {}", 58 * 512), "t.qcow2"]);
    let args = ["amend", "-o", "refcount_bits=64", "-p", "t.qcow2"];
    let (o, t) = (from_two_thirds(&ours, &args), from_two_thirds(&theirs, &args));
    assert_eq!(o, t);
    assert_eq!(t.len(), 2, "QEMU's progress passes 2/3: {t:?}");
    same(&ours, &theirs, "qemu-img", &["check", "t.qcow2"]);
}
