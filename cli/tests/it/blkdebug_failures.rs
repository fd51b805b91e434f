//! Requests failed by a blkdebug layer, under the drop-in names against
//! QEMU's own tools on the same inputs: what a failing snapshot deletion
//! prints and leaves behind (iotest 217), and how many data writes an
//! overwrite issues (iotest 066, whose rules fail any second write).

use crate::dropin::{bare_sides, same_on, Cmp, Side};
use crate::support::ok;

/// Runs `tool args` on both sides; status, stdout and stderr must match.
fn same(ours: &Side, theirs: &Side, tool: &str, args: &[&str]) -> (i32, String, String) {
    let o = same_on(ours, theirs, tool, args, None, Cmp::All);
    (o.code, o.stdout, o.stderr)
}

/// iotest 217: every request fails once the old snapshot table is freed.
/// The free's failure is a warning; dropping the snapshot's references
/// fails the deletion, with the snapshot already gone from the table;
/// the image is left with leaks only, which `check -r leaks` repairs.
#[test]
fn snapshot_delete_failing_at_cluster_free_warns_and_leaks_as_qemu_img() {
    let (ours, theirs) = bare_sides();
    for side in [&ours, &theirs] {
        let d = side.dir.path();
        ok(d, "qemu-img", &["create", "-q", "-f", "qcow2", "t.qcow2", "64M"]);
        ok(d, "qemu-io", &["-f", "qcow2", "-c", "write 0 64k", "t.qcow2"]);
        ok(d, "qemu-img", &["snapshot", "-c", "foo", "t.qcow2"]);
        std::fs::write(d.join("blkdebug.conf"), "[inject-error]\nevent = \"cluster_free\"\nerrno = \"5\"\n").unwrap();
    }
    let (code, _, err) = same(&ours, &theirs, "qemu-img", &["snapshot", "-d", "foo", "blkdebug:blkdebug.conf:t.qcow2"]);
    assert_eq!(code, 1);
    assert_eq!(
        err,
        "qcow2_free_clusters failed: Input/output error\n\
         qemu-img: Could not delete snapshot 'foo': Failed to free the cluster and L1 table: Input/output error"
    );
    same(&ours, &theirs, "qemu-img", &["snapshot", "-l", "t.qcow2"]);
    let (_, out, _) = same(&ours, &theirs, "qemu-img", &["check", "t.qcow2"]);
    assert!(out.contains("4 leaked clusters were found on the image."), "{out}");
    same(&ours, &theirs, "qemu-img", &["check", "-r", "leaks", "t.qcow2"]);
    same(&ours, &theirs, "qemu-img", &["check", "t.qcow2"]);
}

/// iotest 066: overwriting two data clusters around a preallocated zero
/// cluster, all three host-contiguous, is one data write: a rule failing
/// every write after the first lets it through, and the clusters are
/// reused where they were.
#[test]
fn overwrite_around_a_preallocated_zero_cluster_is_one_write_as_qemu_io() {
    let (ours, theirs) = bare_sides();
    for side in [&ours, &theirs] {
        let d = side.dir.path();
        ok(d, "qemu-img", &["create", "-q", "-f", "qcow2", "t.qcow2", "192k"]);
        ok(d, "qemu-io", &["-f", "qcow2", "-c", "write -P 42 0 192k", "t.qcow2"]);
    }
    let before = same(&ours, &theirs, "qemu-img", &["map", "--output=json", "t.qcow2"]).1;
    for side in [&ours, &theirs] {
        ok(side.dir.path(), "qemu-io", &["-f", "qcow2", "-c", "write -z 64k 64k", "t.qcow2"]);
    }
    let name = "json:{'driver': 'qcow2', 'file': {'driver': 'blkdebug', 'image.filename': 't.qcow2', \
                'set-state': [{'event': 'write_aio', 'new_state': 2}], \
                'inject-error': [{'event': 'write_aio', 'state': 2}]}}";
    let (code, out, _) = same(&ours, &theirs, "qemu-io", &["-c", "write -P 42 0 192k", name]);
    assert_eq!(code, 0);
    assert!(out.starts_with("wrote 196608/196608 bytes at offset 0"), "{out}");
    same(&ours, &theirs, "qemu-img", &["check", "t.qcow2"]);
    let after = same(&ours, &theirs, "qemu-img", &["map", "--output=json", "t.qcow2"]).1;
    assert_eq!(after, before, "the clusters are reused in place");
    same(&ours, &theirs, "qemu-io", &["-f", "qcow2", "-c", "read -P 42 0 192k", "t.qcow2"]);
}
