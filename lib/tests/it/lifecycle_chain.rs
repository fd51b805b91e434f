//! commit and rebase by oxcow against qemu-img on copies of the same
//! backing chains.

use crate::support::*;
use oxcow::tools::commit::{commit, CommitOptions};
use oxcow::tools::rebase::{rebase, RebaseOptions};
use std::path::Path;

/// base <- mid <- top, all in `dir`, relative backing names.
fn chain(d: &Dir, maker: Maker, cs: u64, version: u32, rbits: u32) {
    let (base, mid, top) = (d.p("base.qcow2"), d.p("mid.qcow2"), d.p("top.qcow2"));
    make(maker, &base, 4 << 20, cs, version, rbits, None);
    qio(&base, &["write -P 0x11 0 1M", "write -P 0x12 3M 512k"]);
    make(maker, &mid, 4 << 20, cs, version, rbits, Some(Path::new("base.qcow2")));
    qio(&mid, &["write -P 0x21 512k 700k", "write -P 0x22 2M 4k"]);
    make(maker, &top, 6 << 20, cs, version, rbits, Some(Path::new("mid.qcow2")));
    let mut cmds = vec!["write -P 0x31 100k 300k", "write -P 0x32 5M 64k", "write -P 0x33 3200k 1k"];
    if version == 3 {
        cmds.push("write -z 0 64k");
    }
    qio(&top, &cmds);
}

fn twin_chains(maker: Maker, cs: u64, version: u32, rbits: u32) -> (Dir, Dir, Dir) {
    let (a, b, view) = (Dir::new(), Dir::new(), Dir::new());
    chain(&a, maker, cs, version, rbits);
    for f in ["base.qcow2", "mid.qcow2", "top.qcow2"] {
        copy(&a.p(f), &b.p(f));
    }
    // What the guest saw before, flattened.
    ok("qemu-img", &["convert", "-O", "raw", s(&a.p("top.qcow2")), s(&view.p("top.raw"))]);
    ok("qemu-img", &["convert", "-O", "raw", s(&a.p("mid.qcow2")), s(&view.p("mid.raw"))]);
    (a, b, view)
}

fn commit_case(maker: Maker, cs: u64, version: u32, rbits: u32) {
    // Plain commit into the immediate backing file, then empty the top.
    let (a, b, view) = twin_chains(maker, cs, version, rbits);
    let mut calls = 0;
    commit(&a.p("top.qcow2"), &CommitOptions::default(), &mut |_, _| calls += 1).unwrap();
    assert!(calls >= 2);
    ok("qemu-img", &["commit", "-q", s(&b.p("top.qcow2"))]);
    for f in ["base.qcow2", "mid.qcow2", "top.qcow2"] {
        check_clean(&a.p(f));
        same(&a.p(f), &b.p(f));
        assert_eq!(vsize(&a.p(f)), vsize(&b.p(f)), "{f}");
    }
    same(&a.p("top.qcow2"), &view.p("top.raw"));
    let map = ok("qemu-img", &["map", "--output=json", s(&a.p("top.qcow2"))]);
    assert!(!map.contains("\"depth\": 0"), "top not emptied: {map}");

    // -d keeps the overlay; -b commits down to the base.
    let (a, b, view) = twin_chains(maker, cs, version, rbits);
    let o = CommitOptions::default().keep_overlay(true);
    commit(&a.p("top.qcow2"), &o, &mut |_, _| {}).unwrap();
    ok("qemu-img", &["commit", "-q", "-d", s(&b.p("top.qcow2"))]);
    for f in ["mid.qcow2", "top.qcow2"] {
        check_clean(&a.p(f));
        same(&a.p(f), &b.p(f));
    }
    same(&a.p("mid.qcow2"), &view.p("top.raw"));

    let (a, b, view) = twin_chains(maker, cs, version, rbits);
    let o = CommitOptions::default().base(a.p("base.qcow2"));
    commit(&a.p("top.qcow2"), &o, &mut |_, _| {}).unwrap();
    ok("qemu-img", &["commit", "-q", "-b", s(&b.p("base.qcow2")), s(&b.p("top.qcow2"))]);
    for f in ["base.qcow2", "top.qcow2"] {
        check_clean(&a.p(f));
        same(&a.p(f), &b.p(f));
    }
    same(&a.p("base.qcow2"), &view.p("top.raw"));
    same(&a.p("top.qcow2"), &view.p("top.raw"));
}

#[test]
fn commit_matches_qemu() {
    commit_case(Maker::Qemu, 65536, 3, 16);
    commit_case(Maker::Oxcow, 4096, 2, 16);
    commit_case(Maker::Oxcow, 4096, 3, 64);
}

#[test]
fn commit_errors() {
    let d = Dir::new();
    make(Maker::Qemu, &d.p("x.qcow2"), 1 << 20, 65536, 3, 16, None);
    let e = commit(&d.p("x.qcow2"), &CommitOptions::default(), &mut |_, _| {}).unwrap_err();
    assert_eq!(e.to_string(), "Image does not have a backing file");
    let (a, _b, _v) = twin_chains(Maker::Qemu, 65536, 3, 16);
    let o = CommitOptions::default().base(a.p("nope.qcow2"));
    let e = commit(&a.p("top.qcow2"), &o, &mut |_, _| {}).unwrap_err().to_string();
    assert!(e.starts_with("Did not find"), "{e}");
}

fn rebase_case(maker: Maker, cs: u64, version: u32, rbits: u32) {
    // Safe rebase of top from mid onto base: content unchanged.
    let (a, b, view) = twin_chains(maker, cs, version, rbits);
    let o = RebaseOptions::default().backing(Some("base.qcow2".into())).backing_format(Some("qcow2".into()));
    rebase(&a.p("top.qcow2"), &o, &mut |_, _| {}).unwrap();
    ok("qemu-img", &["rebase", "-q", "-b", "base.qcow2", "-F", "qcow2", s(&b.p("top.qcow2"))]);
    check_clean(&a.p("top.qcow2"));
    same(&a.p("top.qcow2"), &view.p("top.raw"));
    same(&a.p("top.qcow2"), &b.p("top.qcow2"));
    let info = ok("qemu-img", &["info", s(&a.p("top.qcow2"))]);
    assert!(info.contains("backing file: base.qcow2"), "{info}");
    assert!(info.contains("backing file format: qcow2"), "{info}");

    // Standalone (-b "").
    let o = RebaseOptions::default().backing(String::new());
    rebase(&a.p("mid.qcow2"), &o, &mut |_, _| {}).unwrap();
    check_clean(&a.p("mid.qcow2"));
    same(&a.p("mid.qcow2"), &view.p("mid.raw"));
    let info = ok("qemu-img", &["info", s(&a.p("mid.qcow2"))]);
    assert!(!info.contains("backing file"), "{info}");

    // Unsafe: header only.
    let (a, _b, _view) = twin_chains(maker, cs, version, rbits);
    let before = ok("qemu-img", &["map", "--output=json", "-f", "qcow2", s(&a.p("top.qcow2"))]);
    let o = RebaseOptions::default()
        .backing(Some("base.qcow2".into()))
        .backing_format(Some("qcow2".into()))
        .unsafe_mode(true);
    rebase(&a.p("top.qcow2"), &o, &mut |_, _| {}).unwrap();
    check_clean(&a.p("top.qcow2"));
    let info = ok("qemu-img", &["info", s(&a.p("top.qcow2"))]);
    assert!(info.contains("backing file: base.qcow2"), "{info}");
    let after = ok("qemu-img", &["map", "--output=json", "-f", "qcow2", s(&a.p("top.qcow2"))]);
    // Same allocation in the top layer (depth 0 entries unchanged).
    let top_only = |m: &str| m.lines().filter(|l| l.contains("\"depth\": 0")).map(str::to_string).collect::<Vec<_>>();
    assert_eq!(top_only(&before), top_only(&after));
}

#[test]
fn rebase_matches_qemu() {
    rebase_case(Maker::Qemu, 65536, 3, 16);
    rebase_case(Maker::Oxcow, 4096, 2, 16);
}

#[test]
fn rebase_needs_format() {
    let (a, _b, _v) = twin_chains(Maker::Qemu, 65536, 3, 16);
    let o = RebaseOptions::default().backing(Some("base.qcow2".into()));
    let e = rebase(&a.p("top.qcow2"), &o, &mut |_, _| {}).unwrap_err().to_string();
    assert_eq!(e, "Could not change the backing file to 'base.qcow2': backing format must be specified");
}

#[test]
fn commit_into_raw_and_rebase_onto_raw() {
    let (a, b) = (Dir::new(), Dir::new());
    for d in [&a, &b] {
        ok("qemu-img", &["create", "-q", "-f", "raw", s(&d.p("base.raw")), "2M"]);
        qio(&d.p("base.raw"), &["write -P 1 0 1M"]);
        ok("qemu-img", &["create", "-q", "-f", "raw", s(&d.p("other.raw")), "1M"]);
        qio(&d.p("other.raw"), &["write -P 1 0 512k"]);
    }
    let top = |d: &Dir| d.p("top.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", s(&top(&a)), "3M"]);
    qio(&top(&a), &["write -P 2 100k 50k", "write -P 3 2500k 100k", "write -z 700k 64k"]);
    copy(&top(&a), &top(&b));
    let view = a.p("view.raw");
    ok("qemu-img", &["convert", "-O", "raw", s(&top(&a)), s(&view)]);

    // Rebase onto a shorter raw image with partly equal content.
    let o = RebaseOptions::default().backing(Some("other.raw".into())).backing_format(Some("raw".into()));
    rebase(&top(&a), &o, &mut |_, _| {}).unwrap();
    ok("qemu-img", &["rebase", "-q", "-b", "other.raw", "-F", "raw", s(&top(&b))]);
    check_clean(&top(&a));
    same(&top(&a), &view);
    same(&top(&a), &top(&b));

    // Commit into the raw backing file (grown to the top's size).
    commit(&top(&a), &CommitOptions::default(), &mut |_, _| {}).unwrap();
    ok("qemu-img", &["commit", "-q", s(&top(&b))]);
    same(&a.p("other.raw"), &b.p("other.raw"));
    same(&a.p("other.raw"), &view);
    assert_eq!(std::fs::metadata(a.p("other.raw")).unwrap().len(), 3 << 20);
    check_clean(&top(&a));
    same(&top(&a), &top(&b));
}

#[test]
fn rebase_of_a_huge_sparse_disk_is_fast() {
    let d = Dir::new();
    let (base, other, top) = (d.p("base.qcow2"), d.p("other.qcow2"), d.p("top.qcow2"));
    make(Maker::Qemu, &base, 64 << 30, 65536, 3, 16, None);
    qio(&base, &["write -P 1 1G 1M", "write -P 2 40G 64k"]);
    make(Maker::Qemu, &other, 64 << 30, 65536, 3, 16, None);
    qio(&other, &["write -P 1 1G 512k", "write -P 3 50G 64k"]);
    make(Maker::Qemu, &top, 64 << 30, 65536, 3, 16, Some(Path::new("base.qcow2")));
    qio(&top, &["write -P 9 1G 4k"]);
    let view = d.p("view.qcow2");
    ok("qemu-img", &["convert", "-O", "qcow2", s(&top), s(&view)]);
    let t0 = std::time::Instant::now();
    let o = RebaseOptions::default().backing(Some("other.qcow2".into())).backing_format(Some("qcow2".into()));
    rebase(&top, &o, &mut |_, _| {}).unwrap();
    let o = RebaseOptions::default().backing(String::new());
    rebase(&top, &o, &mut |_, _| {}).unwrap();
    assert!(t0.elapsed().as_secs() < 20, "rebase took {:?}", t0.elapsed());
    check_clean(&top);
    same(&top, &view);
}
