//! qemu-io's blkdebug breakpoints (`break`, `wait_break`, `resume`,
//! `remove_break`) with aio requests held at an event while later ones
//! queue behind them, oxcow as `qemu-io` against QEMU's own on the same
//! scripts: the same output (completion offsets blanked, their order is
//! the threads'), the same image contents after the reordering.

use crate::support::process::s;
use crate::support::{ok, run_in, tmp, OXCOW};
use std::path::Path;

/// A 1 MiB backing file of pattern 1 under an empty overlay `t.qcow2`
/// (so allocating writes copy from the backing file around them).
fn images(dir: &Path) {
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "b.qcow2", "1M"]);
    ok(dir, "qemu-io", &["-f", "qcow2", "-c", "write -q -P 1 0 1M", "b.qcow2"]);
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "t.qcow2"]);
    ok(dir, "cp", &["t.qcow2", "plain.qcow2"]);
}

/// Blanks timings; requests released together may end in either order
/// (threads here, coroutines in QEMU), so the lines are compared twice:
/// all of them as a set, and in order without the completion reports.
fn filter(out: &str) -> (Vec<String>, Vec<String>) {
    let lines: Vec<String> = out
        .lines()
        .map(|l| match l.find(" ops; ") {
            Some(i) => format!("{} ops; XX", &l[..i]),
            None => l.to_string(),
        })
        .collect();
    let ordered = lines.iter().filter(|l| !l.starts_with("wrote ") && !l.contains(" ops; ")).cloned().collect();
    let mut all = lines;
    all.sort();
    (ordered, all)
}

/// Runs `cmds` on `file` with both qemu-io's and checks they say the same.
fn same(ours: &Path, theirs: &Path, file: &str, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(file);
    let o = run_in(ours, s(&ours.join("bin/qemu-io")), &args);
    let t = run_in(theirs, "qemu-io", &args);
    let ctx = format!(
        "{cmds:?}\n--- qemu ({}):\n{}{}--- oxcow ({}):\n{}{}",
        t.code, t.stdout, t.stderr, o.code, o.stdout, o.stderr
    );
    assert_eq!((o.code, filter(&o.stdout), &o.stderr), (t.code, filter(&t.stdout), &t.stderr), "{ctx}");
}

#[test]
fn qemu_io_break_holds_an_allocating_write_while_overlapping_ones_queue() {
    let (ours, theirs) = (tmp(), tmp());
    ok(ours.path(), OXCOW, &["install-links", s(&ours.path().join("bin"))]);
    for d in [ours.path(), theirs.path()] {
        images(d);
    }
    let (o, t) = (ours.path(), theirs.path());
    // QEMU's iotest 046's first case: the held write allocates the
    // cluster the two later ones write into.
    same(
        o,
        t,
        "blkdebug::t.qcow2",
        &[
            "break write_aio A",
            "aio_write -P 10 0x18000 0x2000",
            "wait_break A",
            "aio_write -P 11 0x12000 0x2000",
            "aio_write -P 12 0x1c000 0x2000",
            "resume A",
            "aio_flush",
            "resume A",
            "remove_break A",
            "break no_such_event B",
            "break write_aio B",
            "aio_write -P 13 0x34000 0x1000",
            "wait_break B",
            "aio_write -P 14 0x30000 0x8000",
            "remove_break B",
            "aio_flush",
        ],
    );
    // Without a blkdebug layer there is nothing to stop.
    same(o, t, "plain.qcow2", &["break write_aio A", "resume A", "remove_break A", "write -P 2 0 4k"]);
    for d in [o, t] {
        ok(d, "qemu-img", &["check", "-q", "t.qcow2"]);
    }
    let a = ours.path().join("t.qcow2");
    let b = theirs.path().join("t.qcow2");
    ok(o, "qemu-img", &["compare", "-q", s(&a), s(&b)]);
    // Each write's own bytes, and the backing file's around them.
    let reads = [
        "read -q -P 1 0x10000 0x2000",
        "read -q -P 11 0x12000 0x2000",
        "read -q -P 1 0x14000 0x4000",
        "read -q -P 10 0x18000 0x2000",
        "read -q -P 1 0x1a000 0x2000",
        "read -q -P 12 0x1c000 0x2000",
        "read -q -P 14 0x30000 0x8000",
        "read -q -P 1 0x38000 0x8000",
    ];
    let mut args = vec!["-f", "qcow2"];
    for r in &reads {
        args.extend(["-c", r]);
    }
    args.push("t.qcow2");
    let r = ok(o, "qemu-io", &args);
    assert_eq!(r.stdout, "", "{}", r.stdout);
}
