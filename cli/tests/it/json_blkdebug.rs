//! blkdebug and quorum nodes inside `json:` names, and commit's failure
//! words, under the drop-in names against QEMU's own tools on the same
//! inputs (iotests 110, 020 and 098).

use crate::dropin::{bare_sides, run, same_on, Cmp, Side};

/// Runs `tool args` on both sides; status, stdout and stderr must match.
fn same(ours: &Side, theirs: &Side, tool: &str, args: &[&str]) -> (String, String) {
    let o = same_on(ours, theirs, tool, args, None, Cmp::All);
    (o.stdout, o.stderr)
}

/// `info`'s lines, without the image's own name (QEMU shows its own
/// rewriting of the `json:` tree there) and the host's allocation.
fn info_lines(side: &Side, name: &str) -> (i32, String, String) {
    let o = run(side, "qemu-img", &["info", name], None);
    let keep = |l: &&str| !l.starts_with("image:") && !l.starts_with("disk size:");
    // The child nodes are left out too: QEMU lists the blkdebug and
    // quorum nodes there, which oxcow does not build.
    let lines: Vec<&str> = o.stdout.lines().take_while(|l| !l.starts_with("Child node")).filter(keep).collect();
    let dir = format!("{}/", side.dir.path().display());
    (o.code, lines.join("\n").replace(&dir, "DIR/"), o.stderr)
}

/// iotest 110: a blkdebug node between the format and the file keeps the
/// image's directory (relative backing names resolve); a quorum node has
/// none ("cannot determine actual path").
#[test]
fn info_through_blkdebug_and_quorum_json_names_as_qemu_img() {
    let (ours, theirs) = bare_sides();
    for side in [&ours, &theirs] {
        let d = side.dir.path();
        crate::support::ok(d, "qemu-img", &["create", "-q", "-f", "qcow2", "t.qcow2.base", "64M"]);
        crate::support::ok(
            d,
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-b", "t.qcow2.base", "-F", "qcow2", "t.qcow2"],
        );
        std::fs::copy(d.join("t.qcow2"), d.join("t.qcow2.copy")).unwrap();
    }
    let names = |side: &Side| {
        let top = side.dir.path().join("t.qcow2").display().to_string();
        [
            format!(
                "json:{{'driver': 'qcow2', 'file': {{'driver': 'blkdebug', 'image': {{'driver': 'file', \
                 'filename': '{top}'}}, 'set-state': [{{'event': 'read_aio', 'new_state': 42}}]}}}}"
            ),
            format!(
                "json:{{'driver': 'qcow2', 'file': {{'driver': 'quorum', 'vote-threshold': 1, 'children': \
                 [{{'driver': 'file', 'filename': '{top}'}}, {{'driver': 'file', 'filename': '{top}.copy'}}]}}}}"
            ),
        ]
    };
    for (o, t) in names(&ours).iter().zip(names(&theirs).iter()) {
        let (ol, tl) = (info_lines(&ours, o), info_lines(&theirs, t));
        assert_eq!(ol, tl, "{o}");
        assert_eq!(ol.0, 0);
    }
    let (_, quorum, _) = info_lines(&ours, &names(&ours)[1]);
    assert!(quorum.contains("backing file: t.qcow2.base (cannot determine actual path)"), "{quorum}");
}

/// iotest 020: a backing file named by a `json:` tree with a blkdebug
/// node that fails the first data write with ENOSPC: commit fails with
/// QEMU's "Block job failed" words.
#[test]
fn commit_into_blkdebug_json_backing_fails_as_qemu_img() {
    let (ours, theirs) = bare_sides();
    let backing = "json:{'driver': 'qcow2', 'file': { 'driver': 'blkdebug', 'inject-error': [{ 'event': \
                   'write_aio', 'errno': 28, 'once': true }], 'image': { 'driver': 'file', 'filename': 'b.qcow2' }}}";
    for side in [&ours, &theirs] {
        let d = side.dir.path();
        crate::support::ok(d, "qemu-img", &["create", "-q", "-f", "qcow2", "b.qcow2", "1M"]);
        crate::support::ok(d, "qemu-img", &["create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", "t.qcow2"]);
        crate::support::ok(d, "qemu-io", &["-f", "qcow2", "-c", "write -P 0x5 0 64k", "t.qcow2"]);
    }
    same(&ours, &theirs, "qemu-img", &["info", "--output=json", "b.qcow2"]);
    let o = run(&ours, "qemu-img", &["commit", "t.qcow2"], None);
    let t = run(&theirs, "qemu-img", &["commit", "t.qcow2"], None);
    assert_eq!((o.code, &o.stderr), (t.code, &t.stderr));
    assert_eq!(o.stderr, "qemu-img: Block job failed: No space left on device");
}

/// iotest 098: emptying the top fails at each of QEMU's steps; the words
/// name the image as given, and the next writable open repairs what the
/// failure left (leaks, or a refcount structure to rebuild) as QEMU's.
#[test]
fn commit_failing_to_empty_the_top_as_qemu_img() {
    for event in ["l1_update", "empty_image_prepare", "reftable_update", "refblock_alloc"] {
        let (ours, theirs) = bare_sides();
        for side in [&ours, &theirs] {
            let d = side.dir.path();
            crate::support::ok(d, "qemu-img", &["create", "-q", "-f", "qcow2", "b.qcow2", "64M"]);
            crate::support::ok(
                d,
                "qemu-img",
                &["create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "t.qcow2"],
            );
            crate::support::ok(d, "qemu-io", &["-f", "qcow2", "-c", "write 0 64k", "t.qcow2"]);
            std::fs::write(d.join("blkdebug.conf"), format!("[inject-error]\nevent = \"{event}\"\n")).unwrap();
        }
        let (out, err) = same(&ours, &theirs, "qemu-img", &["commit", "blkdebug:blkdebug.conf:t.qcow2"]);
        assert_eq!(
            (out.as_str(), err.as_str()),
            ("", "qemu-img: Failed to empty blkdebug:blkdebug.conf:t.qcow2: Input/output error"),
            "{event}"
        );
        same(&ours, &theirs, "qemu-io", &["-c", "close", "t.qcow2"]);
        // Where a refcount rebuild puts the new table is the repair's
        // choice (one cluster further than QEMU's): the end offset is
        // left out, as iotest 098 leaves it out.
        let check = |side: &Side| {
            let o = run(side, "qemu-img", &["check", "t.qcow2"], None);
            (o.code, o.stdout.lines().filter(|l| !l.starts_with("Image end offset")).collect::<Vec<_>>().join("\n"))
        };
        assert_eq!(check(&ours), check(&theirs), "{event}");
    }
}

/// A successful commit resets the top as QEMU's does (header, refcount
/// table, one refcount block, L1 table; the file cut after them), for
/// refcount entries narrower than a byte, of a byte and wider.
#[test]
fn commit_resets_the_top_file_as_qemu_img() {
    for bits in ["1", "4", "16", "64"] {
        let (ours, theirs) = bare_sides();
        let opts = format!("refcount_bits={bits},cluster_size=4096");
        for side in [&ours, &theirs] {
            let d = side.dir.path();
            crate::support::ok(d, "qemu-img", &["create", "-q", "-f", "qcow2", "-o", &opts, "b.qcow2", "8M"]);
            let backing = ["-b", "b.qcow2", "-F", "qcow2"];
            let args = [&["create", "-q", "-f", "qcow2", "-o", &opts][..], &backing, &["t.qcow2"]].concat();
            crate::support::ok(d, "qemu-img", &args);
            crate::support::ok(
                d,
                "qemu-io",
                &["-f", "qcow2", "-c", "write -P 7 4k 1M", "-c", "write 5M 8k", "t.qcow2"],
            );
        }
        same(&ours, &theirs, "qemu-img", &["commit", "t.qcow2"]);
        let len = |s: &Side| std::fs::metadata(s.dir.path().join("t.qcow2")).unwrap().len();
        assert_eq!(len(&ours), len(&theirs), "refcount_bits={bits}");
        // (The base's layout is the allocator's business, not compared.)
        let args = ["check", "--output=json", "t.qcow2"];
        let o = crate::support::ok(ours.dir.path(), "qemu-img", &args).stdout;
        let t = crate::support::ok(theirs.dir.path(), "qemu-img", &args).stdout;
        assert_eq!(o, t, "refcount_bits={bits}");
        let read = ["-f", "qcow2", "-c", "read -P 7 4k 1M", "t.qcow2"];
        let r = crate::support::ok(ours.dir.path(), "qemu-io", &read);
        assert!(!r.stdout.contains("fail"), "{}", r.stdout);
    }
}
