//! resize and amend by oxcow against qemu-img on copies of the same image.

use crate::support::*;
use oxcow::qcow2::{amend, AmendOptions};
use oxcow::storage::{FileStorage, OpenFlags, Storage};
use oxcow::OpenOptions;
use std::path::Path;
use std::sync::Arc;

fn fill(p: &Path, v3: bool) {
    let mut cmds = vec!["write -P 0x11 0 300k", "write -P 0x22 1M 64k", "write -P 0x33 3000k 200k"];
    if v3 {
        cmds.push("write -z 2M 128k");
        cmds.push("write -z 3M 4k");
    }
    qio(p, &cmds);
}

fn resize_case(maker: Maker, cs: u64, version: u32, rbits: u32, snapshot: bool) {
    let d = Dir::new();
    let (ox, qm) = (d.p("ox.qcow2"), d.p("qm.qcow2"));
    make(maker, &ox, 4 << 20, cs, version, rbits, None);
    fill(&ox, version == 3);
    if snapshot {
        ok("qemu-img", &["snapshot", "-c", "s", s(&ox)]);
    }
    copy(&ox, &qm);
    if snapshot && version == 2 {
        let (code, _, qerr) = run("qemu-img", &["resize", "--shrink", s(&qm), "1M"]);
        assert_ne!(code, 0);
        let img = open_rw(&ox);
        let e = img.qcow2().unwrap().resize_to(1 << 20, true).unwrap_err().to_string();
        assert_eq!(qerr.trim_end(), format!("qemu-img: {e}"));
        return;
    }
    // Without --shrink: refused with qemu's message, nothing changed.
    {
        let img = open_rw(&ox);
        let e = img.qcow2().unwrap().resize_to(1 << 20, false).unwrap_err().to_string();
        assert_eq!(e, "Use the --shrink option to perform a shrink operation.");
        let e = img.qcow2().unwrap().resize_to(1000, true).unwrap_err().to_string();
        assert_eq!(e, "The new size must be a multiple of 512");
        img.close().unwrap();
    }
    for (size, arg) in [(2_500_000u64 / 512 * 512, "2499584"), (6 << 20, "6M"), (1 << 20, "1M"), (3 << 20, "3M")] {
        {
            let img = open_rw(&ox);
            img.qcow2().unwrap().resize_to(size, true).unwrap();
            assert_eq!(img.device().len(), size);
            img.close().unwrap();
        }
        ok("qemu-img", &["resize", "-q", "--shrink", s(&qm), arg]);
        check_clean(&ox);
        assert_eq!(vsize(&ox), vsize(&qm));
        same(&ox, &qm);
    }
    if snapshot {
        // The snapshot still holds the old content.
        ok("qemu-img", &["snapshot", "-a", "s", s(&ox)]);
        ok("qemu-img", &["snapshot", "-a", "s", s(&qm)]);
        check_clean(&ox);
        same(&ox, &qm);
    }
    let (ol, ql) = (std::fs::metadata(&ox).unwrap().len(), std::fs::metadata(&qm).unwrap().len());
    assert!(ol <= ql + 4 * cs.max(65536), "oxcow file {ol} much larger than qemu's {ql}");
}

#[test]
fn resize_matches_qemu() {
    resize_case(Maker::Qemu, 65536, 3, 16, false);
    resize_case(Maker::Oxcow, 4096, 2, 16, false);
    resize_case(Maker::Oxcow, 4096, 3, 64, true);
    resize_case(Maker::Qemu, 65536, 2, 16, true);
}

#[test]
fn raw_resize() {
    let d = Dir::new();
    let (ox, qm) = (d.p("ox.raw"), d.p("qm.raw"));
    ok("qemu-img", &["create", "-q", "-f", "raw", s(&ox), "1M"]);
    qio(&ox, &["write -P 5 0 1M"]);
    copy(&ox, &qm);
    let img = oxcow::open(&ox, &OpenOptions::default().format(oxcow::Format::Raw).write(true)).unwrap();
    img.device().resize(512 << 10).unwrap();
    img.device().resize(3 << 20).unwrap();
    img.close().unwrap();
    drop(img);
    ok("qemu-img", &["resize", "-q", "-f", "raw", "--shrink", s(&qm), "512K"]);
    ok("qemu-img", &["resize", "-q", "-f", "raw", s(&qm), "3M"]);
    same(&ox, &qm);
}

fn do_amend(p: &Path, o: &str) -> oxcow::Result<()> {
    let f = FileStorage::open(p, OpenFlags::default().write(true)).unwrap();
    let st: Arc<dyn Storage> = Arc::new(f);
    amend(st, None, &AmendOptions::parse(o)?)
}

fn compat(p: &Path) -> String {
    let info = ok("qemu-img", &["info", s(p)]);
    info.lines().find(|l| l.trim_start().starts_with("compat:")).unwrap().trim().to_string()
}

fn amend_case(maker: Maker, cs: u64, backing: bool, snapshot: bool, steps: &[&str]) {
    let d = Dir::new();
    let (ox, qm, view) = (d.p("ox.qcow2"), d.p("qm.qcow2"), d.p("view.raw"));
    if backing {
        make(maker, &d.p("b.qcow2"), 4 << 20, cs, 3, 16, None);
        qio(&d.p("b.qcow2"), &["write -P 0x77 0 4M"]);
    }
    make(maker, &ox, 4 << 20, cs, 3, 16, if backing { Some(Path::new("b.qcow2")) } else { None });
    fill(&ox, true);
    if snapshot {
        ok("qemu-img", &["snapshot", "-c", "s", s(&ox)]);
        qio(&ox, &["write -z 100k 200k", "write -P 0x44 3M 64k"]);
    }
    copy(&ox, &qm);
    ok("qemu-img", &["convert", "-O", "raw", s(&ox), s(&view)]);
    for step in steps {
        do_amend(&ox, step).unwrap_or_else(|e| panic!("amend {step}: {e}"));
        ok("qemu-img", &["amend", "-o", step, s(&qm)]);
        check_clean(&ox);
        assert_eq!(compat(&ox), compat(&qm), "{step}");
        same(&ox, &view);
        same(&ox, &qm);
        if snapshot {
            let t = d.p("t.qcow2");
            copy(&ox, &t);
            ok("qemu-img", &["snapshot", "-a", "s", s(&t)]);
            let u = d.p("u.qcow2");
            copy(&qm, &u);
            ok("qemu-img", &["snapshot", "-a", "s", s(&u)]);
            same(&t, &u);
        }
    }
}

#[test]
fn amend_matches_qemu() {
    // qemu-img takes seconds to change refcount widths with 64 KiB
    // clusters; those steps run on 4 KiB clusters.
    amend_case(
        Maker::Qemu,
        65536,
        false,
        false,
        &["compat=0.10", "compat=1.1", "lazy_refcounts=on", "lazy_refcounts=off"],
    );
    let steps = [
        "compat=0.10",
        "compat=1.1",
        "lazy_refcounts=on",
        "refcount_bits=64",
        "refcount_bits=4",
        "lazy_refcounts=off,refcount_bits=16",
        "compat=0.10",
        "compat=1.1,refcount_bits=2",
        "refcount_bits=16,compat=0.10",
    ];
    amend_case(Maker::Oxcow, 4096, true, false, &steps);
    amend_case(Maker::Qemu, 4096, true, true, &steps);
}

#[test]
fn amend_refusals_use_qemu_messages() {
    let d = Dir::new();
    let p = d.p("a.qcow2");
    let cases: &[(&str, &str, &str)] = &[
        ("refcount_bits=64", "compat=0.10", "compat=0.10 requires refcount_bits=16"),
        ("extended_l2=on", "compat=0.10", "Cannot downgrade an image with incompatible features 0x10 set"),
        (
            "compat=1.1",
            "compat=0.10,lazy_refcounts=on",
            "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
        ),
        (
            "compat=0.10",
            "lazy_refcounts=on",
            "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
        ),
        (
            "compat=0.10",
            "refcount_bits=8",
            "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
        ),
        // QEMU's iotest 112: a width asked for beside compat=0.10.
        (
            "compat=1.1",
            "refcount_bits=32,compat=0.10",
            "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
        ),
        (
            "compat=1.1",
            "cluster_size=4k",
            "Invalid parameter 'cluster_size'\nThis option is only supported for image creation",
        ),
        ("compat=1.1", "foo=1", "Invalid parameter 'foo'"),
    ];
    for (create, o, msg) in cases {
        ok("qemu-img", &["create", "-q", "-f", "qcow2", "-o", create, s(&p), "1M"]);
        let (code, _, qerr) = run("qemu-img", &["amend", "-o", o, s(&p)]);
        assert_ne!(code, 0);
        assert_eq!(qerr.trim_end(), format!("qemu-img: {msg}"));
        let e = do_amend(&p, o).unwrap_err().to_string();
        assert_eq!(&e, msg);
    }
    // A refcount that does not fit the new width.
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&p), "1M"]);
    qio(&p, &["write 0 64k"]);
    ok("qemu-img", &["snapshot", "-c", "s", s(&p)]);
    let (_, _, qerr) = run("qemu-img", &["amend", "-o", "refcount_bits=1", s(&p)]);
    let e = do_amend(&p, "refcount_bits=1").unwrap_err().to_string();
    assert_eq!(qerr.trim_end(), format!("qemu-img: {e}"));
    check_clean(&p);
}

#[test]
fn amend_size_and_refused_backing() {
    let d = Dir::new();
    make(Maker::Qemu, &d.p("b1.qcow2"), 2 << 20, 65536, 3, 16, None);
    ok("qemu-img", &["create", "-q", "-f", "raw", s(&d.p("b2.raw")), "2M"]);
    let (ox, qm) = (d.p("ox.qcow2"), d.p("qm.qcow2"));
    make(Maker::Qemu, &ox, 2 << 20, 65536, 3, 16, Some(Path::new("b1.qcow2")));
    qio(&ox, &["write -P 3 0 100k"]);
    copy(&ox, &qm);
    for o in ["backing_file=b2.raw,backing_fmt=raw", "backing_fmt=raw", "backing_file=b1.qcow2"] {
        let (code, _, qerr) = run("qemu-img", &["amend", "-o", o, s(&qm)]);
        assert_ne!(code, 0);
        let e = do_amend(&ox, o).unwrap_err().to_string();
        assert_eq!(qerr.trim_end().replace("qemu-img", "oxcow"), format!("oxcow: {e}"), "{o}");
    }
    for o in ["size=5M", "size=1M", "size=3M"] {
        do_amend(&ox, o).unwrap_or_else(|e| panic!("amend {o}: {e}"));
        ok("qemu-img", &["amend", "-o", o, s(&qm)]);
        check_clean(&ox);
        assert_eq!(vsize(&ox), vsize(&qm), "{o}");
        same(&ox, &qm);
    }
}

#[test]
fn resize_with_data_file_resizes_it() {
    let d = Dir::new();
    for (name, tool) in [("ox", true), ("qm", false)] {
        let (img, data) = (d.p(&format!("{name}.qcow2")), d.p(&format!("{name}.raw")));
        let o = format!("data_file={}", s(&data));
        ok("qemu-img", &["create", "-q", "-f", "qcow2", "-o", &o, s(&img), "1M"]);
        qio(&img, &["write -P 4 0 1M"]);
        for (size, arg) in [(2u64 << 20, "2M"), (512 << 10, "512K")] {
            if tool {
                let i = open_rw(&img);
                i.qcow2().unwrap().resize_to(size, true).unwrap();
                i.close().unwrap();
            } else {
                ok("qemu-img", &["resize", "-q", "--shrink", s(&img), arg]);
            }
            check_clean(&img);
            assert_eq!(std::fs::metadata(&data).unwrap().len(), size, "{name}");
        }
    }
    same(&d.p("ox.qcow2"), &d.p("qm.qcow2"));
}

/// `qemu-img map --output=json` without host offsets: what reads as data,
/// zeros or falls through, comparable between two writers' layouts.
fn map_shape(p: &Path) -> Vec<String> {
    let out = ok("qemu-img", &["map", "--output=json", s(p)]);
    out.lines()
        .map(|l| l.split(", \"offset\"").next().unwrap_or(l).trim_end_matches(['}', ',', ']']).to_string())
        .collect()
}

/// iotest 292: shrinking an overlay and growing it again must make the
/// new tail read as zeros, not as the backing file's data nor as what
/// the shrink left in the last cluster. v3 as QEMU (explicit zeros to the
/// cluster boundary, zero clusters after); v2 refused in QEMU's words.
#[test]
fn shrink_then_grow_overlay_reads_zeros_iotest_292() {
    for (version, cs, shrink, grow) in [(3, 65536, "520k", "567k"), (3, 65536, "100k", "1000k"), (3, 4096, "6k", "3M")]
    {
        let d = Dir::new();
        let (base, ox, qm) = (d.p("b.qcow2"), d.p("ox.qcow2"), d.p("qm.qcow2"));
        make(Maker::Qemu, &base, 4 << 20, cs, version, 16, None);
        qio(&base, &["write -P 0x11 0 4M"]);
        make(Maker::Qemu, &ox, 1 << 20, cs, version, 16, Some(Path::new("b.qcow2")));
        qio(&ox, &["write -P 0x22 0 1M"]);
        copy(&ox, &qm);
        let bytes = |a: &str| ok("numfmt", &["--from=iec", &a.to_uppercase()]).trim().parse::<u64>().unwrap();
        {
            let img = open_rw(&ox);
            img.qcow2().unwrap().resize_to(bytes(shrink), true).unwrap();
            img.qcow2().unwrap().resize_to(bytes(grow), false).unwrap();
            img.close().unwrap();
        }
        ok("qemu-img", &["resize", "-q", "--shrink", s(&qm), shrink]);
        ok("qemu-img", &["resize", "-q", s(&qm), grow]);
        check_clean(&ox);
        let tail = format!("read -P 0 {shrink} {}", bytes(grow) - bytes(shrink));
        qio(&ox, &[&format!("read -P 0x22 0 {shrink}"), &tail]);
        same(&ox, &qm);
        assert_eq!(map_shape(&ox), map_shape(&qm), "{cs} {shrink} {grow}");
    }
    // v2 has no zero clusters: QEMU refuses, the image keeps its size.
    let d = Dir::new();
    let (base, ox, qm) = (d.p("b.qcow2"), d.p("ox.qcow2"), d.p("qm.qcow2"));
    make(Maker::Qemu, &base, 1 << 20, 65536, 2, 16, None);
    make(Maker::Qemu, &ox, 256 << 10, 65536, 2, 16, Some(Path::new("b.qcow2")));
    copy(&ox, &qm);
    let (code, _, qerr) = run("qemu-img", &["resize", s(&qm), "1M"]);
    assert_ne!(code, 0);
    let img = open_rw(&ox);
    let e = img.qcow2().unwrap().resize_to(1 << 20, false).unwrap_err().to_string();
    assert_eq!(qerr.trim_end(), format!("qemu-img: {e}"));
    img.close().unwrap();
    drop(img);
    assert_eq!(vsize(&ox), 256 << 10);
}

/// After a shrink cuts the file, clusters allocated past the new end are
/// reserved again (the allocator forgot its old reservation with it).
#[test]
fn allocation_after_shrink_reserves_space() {
    let d = Dir::new();
    let p = d.p("a.qcow2");
    make(Maker::Oxcow, &p, 64 << 20, 65536, 3, 16, None);
    let img = open_rw(&p);
    let q = img.qcow2().unwrap();
    img.device().write_at(&vec![0x5a; 16 << 20], 0).unwrap();
    q.resize_to(1 << 20, true).unwrap();
    let cut = std::fs::metadata(&p).unwrap().len();
    assert!(cut < 4 << 20, "shrink left {cut} bytes");
    q.resize_to(64 << 20, false).unwrap();
    img.device().write_at(&[0x6b; 65536], 32 << 20).unwrap();
    // One data cluster and at most an L2 table past the cut: a reserving
    // allocator has taken a chunk (at least 1 MiB) ahead of them.
    let len = std::fs::metadata(&p).unwrap().len();
    assert!(len >= cut + (1 << 20), "no space reserved past the cut: {len} bytes after a cut at {cut}");
    img.close().unwrap();
    drop(img);
    check_clean(&p);
}
