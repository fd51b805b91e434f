//! commit and rebase by oxcow against qemu-img on copies of the same
//! backing chains.

mod lifecycle_util;

use lifecycle_util::*;
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
    let o = CommitOptions { keep_overlay: true, ..Default::default() };
    commit(&a.p("top.qcow2"), &o, &mut |_, _| {}).unwrap();
    ok("qemu-img", &["commit", "-q", "-d", s(&b.p("top.qcow2"))]);
    for f in ["mid.qcow2", "top.qcow2"] {
        check_clean(&a.p(f));
        same(&a.p(f), &b.p(f));
    }
    same(&a.p("mid.qcow2"), &view.p("top.raw"));

    let (a, b, view) = twin_chains(maker, cs, version, rbits);
    let o = CommitOptions { base: Some(a.p("base.qcow2")), ..Default::default() };
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
    let o = CommitOptions { base: Some(a.p("nope.qcow2")), ..Default::default() };
    let e = commit(&a.p("top.qcow2"), &o, &mut |_, _| {}).unwrap_err().to_string();
    assert!(e.starts_with("Did not find"), "{e}");
}

fn rebase_case(maker: Maker, cs: u64, version: u32, rbits: u32) {
    // Safe rebase of top from mid onto base: content unchanged.
    let (a, b, view) = twin_chains(maker, cs, version, rbits);
    let o = RebaseOptions {
        backing: Some("base.qcow2".into()),
        backing_format: Some("qcow2".into()),
        ..Default::default()
    };
    rebase(&a.p("top.qcow2"), &o, &mut |_, _| {}).unwrap();
    ok("qemu-img", &["rebase", "-q", "-b", "base.qcow2", "-F", "qcow2", s(&b.p("top.qcow2"))]);
    check_clean(&a.p("top.qcow2"));
    same(&a.p("top.qcow2"), &view.p("top.raw"));
    same(&a.p("top.qcow2"), &b.p("top.qcow2"));
    let info = ok("qemu-img", &["info", s(&a.p("top.qcow2"))]);
    assert!(info.contains("backing file: base.qcow2"), "{info}");
    assert!(info.contains("backing file format: qcow2"), "{info}");

    // Standalone (-b "").
    let o = RebaseOptions { backing: Some(String::new()), ..Default::default() };
    rebase(&a.p("mid.qcow2"), &o, &mut |_, _| {}).unwrap();
    check_clean(&a.p("mid.qcow2"));
    same(&a.p("mid.qcow2"), &view.p("mid.raw"));
    let info = ok("qemu-img", &["info", s(&a.p("mid.qcow2"))]);
    assert!(!info.contains("backing file"), "{info}");

    // Unsafe: header only.
    let (a, _b, _view) = twin_chains(maker, cs, version, rbits);
    let before = ok("qemu-img", &["map", "--output=json", "-f", "qcow2", s(&a.p("top.qcow2"))]);
    let o = RebaseOptions {
        backing: Some("base.qcow2".into()),
        backing_format: Some("qcow2".into()),
        unsafe_mode: true,
        ..Default::default()
    };
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
    let o = RebaseOptions { backing: Some("base.qcow2".into()), ..Default::default() };
    let e = rebase(&a.p("top.qcow2"), &o, &mut |_, _| {}).unwrap_err().to_string();
    assert_eq!(e, "Could not change the backing file to 'base.qcow2': backing format must be specified");
}
