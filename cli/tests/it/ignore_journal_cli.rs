//! `x-ignore-journal=on` (`--image-opts`, and qemu-io's `open -o` style
//! option strings of `oxcow io`): the switch that makes oxcow distrust a
//! dirty image's recovery journal and repair it by the full scan, as it
//! does after QEMU wrote the image.

use crate::support::{ok, oxcow, qemu_img, tmp};
use std::path::Path;

/// An image with lazy refcounts and the journal, left dirty by a crash
/// after two allocating writes and a flush.
fn crashed(dir: &Path, name: &str) {
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", name, "1G"]);
    ok(dir, crate::support::OXCOW, &["amend", "-o", "journal=on", name]);
    let r = oxcow(
        dir,
        &["io", "-t", "writeback", "-c", "write 0 4k", "-c", "write 1M 4k", "-c", "flush", "-c", "abort", name],
    );
    assert_ne!(r.code, 0, "abort did not end the process: {}", r.stderr);
}

fn autoclear(dir: &Path, name: &str) -> u64 {
    let h = std::fs::read(dir.join(name)).expect("image");
    u64::from_be_bytes(h[88..96].try_into().expect("8 bytes"))
}

/// The journal's autoclear bit (`journal.rs`).
const JOURNAL_BIT: u64 = 1 << 40;

#[test]
fn ignore_journal_repairs_by_the_full_scan_and_drops_the_journal() {
    let d = tmp();
    crashed(d.path(), "a.qcow2");
    std::fs::copy(d.path().join("a.qcow2"), d.path().join("b.qcow2")).expect("copy");
    assert_ne!(autoclear(d.path(), "a.qcow2") & JOURNAL_BIT, 0);

    // Trusted: the journal raises the two data clusters it logged (the
    // new L2 table's refcount was written when it was allocated).
    let j = oxcow(d.path(), &["io", "-c", "quit", "a.qcow2"]);
    assert!(j.stderr.contains("2 corruptions fixed"), "{}", j.stderr);
    assert_ne!(autoclear(d.path(), "a.qcow2") & JOURNAL_BIT, 0, "the journal is kept");

    // Ignored: the full scan finds the same two (it judges the COPIED
    // flags on the repaired refcounts, as QEMU), and the bit goes.
    let s = oxcow(
        d.path(),
        &["io", "--image-opts", "-c", "quit", "driver=qcow2,file.filename=b.qcow2,x-ignore-journal=on"],
    );
    assert_eq!(s.code, 0, "{}", s.stderr);
    assert!(s.stderr.contains("2 corruptions fixed"), "{}", s.stderr);
    assert_eq!(autoclear(d.path(), "b.qcow2") & JOURNAL_BIT, 0, "the journal's bit is dropped");
    for f in ["a.qcow2", "b.qcow2"] {
        let c = qemu_img(d.path(), &["check", f]);
        assert_eq!(c.code, 0, "{f}: {}{}", c.stdout, c.stderr);
    }

    // The other commands take it in their option strings too, and only
    // on or off.
    crashed(d.path(), "c.qcow2");
    let spec = "driver=qcow2,file.filename=c.qcow2,x-ignore-journal=on";
    let c = oxcow(d.path(), &["check", "-r", "all", "--image-opts", spec]);
    assert_eq!(c.code, 0, "{}{}", c.stdout, c.stderr);
    assert_eq!(autoclear(d.path(), "c.qcow2") & JOURNAL_BIT, 0);
    let bad = oxcow(d.path(), &["info", "--image-opts", "driver=qcow2,file.filename=c.qcow2,x-ignore-journal=maybe"]);
    assert!(bad.stderr.contains("Parameter 'x-ignore-journal' expects 'on' or 'off'"), "{}", bad.stderr);
}
