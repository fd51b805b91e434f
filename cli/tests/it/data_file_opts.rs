//! QEMU's `data-file` option trees in qemu-io names: the external data
//! file replaced by a `null-co` node, or put under a blkdebug node whose
//! rules fail its requests; oxcow as `qemu-io` against QEMU's own, then
//! `qemu-img check` on what each left.

use crate::dropin::{bare_sides, same_on, Cmp};
use crate::support::ok;
use crate::support::process::s;

#[test]
fn qemu_io_data_file_option_trees() {
    let (our_side, their_side) = bare_sides();
    let (ours, theirs) = (&our_side.dir, &their_side.dir);
    let conf = "[inject-error]\nevent = \"write_aio\"\nerrno = \"5\"\nonce = \"on\"\n";
    for d in [ours.path(), theirs.path()] {
        ok(d, "qemu-img", &["create", "-q", "-f", "qcow2", "-o", "data_file=t.data", "t.qcow2", "1M"]);
        ok(d, "qemu-img", &["create", "-q", "-f", "qcow2", "plain.qcow2", "1M"]);
        std::fs::write(d.join("blkdebug.conf"), conf).expect("write config");
    }
    let failing = "json:{'driver': 'qcow2', 'file': {'driver': 'file', 'filename': 't.qcow2'}, \
        'data-file': {'driver': 'raw', 'file': {'driver': 'blkdebug', 'config': 'blkdebug.conf', \
        'image': {'driver': 'file', 'filename': 't.data'}}}}";
    let null = |img: &str| {
        format!("json:{{'driver': 'qcow2', 'file': {{'filename': '{img}'}}, 'data-file': {{'driver': 'null-co', 'size': '1048576'}}}}")
    };
    let runs: Vec<Vec<String>> = vec![
        // The data write fails once (QEMU's iotest 289), the next goes through.
        vec!["-c".into(), "write 0 64k".into(), "-c".into(), "write -P 7 64k 64k".into(), failing.into()],
        // Guest writes into a null data file (iotest 270).
        vec!["-c".into(), "write 128k 64k".into(), null("t.qcow2")],
        // Only an image with an external data file takes one.
        vec!["-c".into(), "write 0 64k".into(), null("plain.qcow2")],
    ];
    for args in &runs {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        same_on(&our_side, &their_side, "qemu-io", &args, None, Cmp::All);
    }
    for d in [ours.path(), theirs.path()] {
        ok(d, "qemu-img", &["check", "-q", "t.qcow2"]);
    }
    // The failed write left its cluster unused, the second one's bytes
    // are in the data file, the null file's write mapped its cluster.
    let o = ours.path().join("t.qcow2");
    let t = theirs.path().join("t.qcow2");
    ok(ours.path(), "qemu-img", &["compare", "-q", s(&o), s(&t)]);
    let m = |d: &std::path::Path| ok(d, "qemu-img", &["map", "--output=json", "t.qcow2"]).stdout;
    assert_eq!(m(ours.path()), m(theirs.path()));
}
