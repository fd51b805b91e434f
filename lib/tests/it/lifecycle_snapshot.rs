//! Internal snapshots by oxcow, checked against QEMU: same content as
//! qemu-img's own snapshot operations, clean `qemu-img check`, and QEMU
//! lists, applies and deletes oxcow's snapshots (and oxcow QEMU's).

use crate::support::*;

/// Writes that make the image interesting: data, zeros, a partial
/// cluster, and (v3) a zero cluster.
fn fill(p: &std::path::Path, v3: bool, cs: u64) {
    let mut cmds = vec![
        "write -P 0x11 0 200k".to_string(),
        format!("write -P 0x22 {} 3k", 5 * cs + 512),
        "write -P 0x33 1M 64k".to_string(),
    ];
    if v3 {
        cmds.push("write -z 1M 4k".to_string());
        cmds.push(format!("write -z {} {}", 2 * cs, cs));
    }
    let c: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
    qio(p, &c);
}

fn scenario(maker: Maker, cs: u64, version: u32, rbits: u32, compressed: bool) {
    let d = Dir::new();
    let base = d.p("base.qcow2");
    make(maker, &base, 4 << 20, cs, version, rbits, None);
    fill(&base, version == 3, cs);
    let base = if compressed {
        // Compressed clusters made by QEMU, shared by the snapshot too.
        let c = d.p("c.qcow2");
        let o = format!("cluster_size={cs},compat={},refcount_bits={rbits}", if version == 2 { "0.10" } else { "1.1" });
        ok("qemu-img", &["convert", "-c", "-O", "qcow2", "-o", &o, s(&base), s(&c)]);
        qio(&c, &["write -P 0x44 2M 8k"]);
        c
    } else {
        base
    };
    let state_a = d.p("state_a.qcow2");
    copy(&base, &state_a);
    let (ox, qm) = (d.p("ox.qcow2"), d.p("qm.qcow2"));
    copy(&base, &ox);
    copy(&base, &qm);

    // Create, then diverge.
    {
        let img = open_rw(&ox);
        let q = img.qcow2().unwrap();
        let e = q.snapshot_create("s1").unwrap();
        assert_eq!(e.id, "1");
        let buf = vec![0x55u8; 3 * cs as usize + 100];
        img.device().write_at(&buf, cs / 2).unwrap();
        img.device().write_zeroes(1 << 20, 64 << 10, true).unwrap();
        img.close().unwrap();
    }
    ok("qemu-img", &["snapshot", "-c", "s1", s(&qm)]);
    qio(&qm, &[&format!("write -P 0x55 {} {}", cs / 2, 3 * cs + 100), "write -z -u 1M 64k"]);
    check_clean(&ox);
    same(&ox, &qm);
    let list = ok("qemu-img", &["snapshot", "-l", s(&ox)]);
    assert!(list.contains("s1"), "{list}");

    // QEMU applies oxcow's snapshot.
    let ox_by_qemu = d.p("ox_by_qemu.qcow2");
    copy(&ox, &ox_by_qemu);
    ok("qemu-img", &["snapshot", "-a", "s1", s(&ox_by_qemu)]);
    check_clean(&ox_by_qemu);
    same(&ox_by_qemu, &state_a);

    // oxcow applies its own snapshot and QEMU's.
    let qm_by_ox = d.p("qm_by_ox.qcow2");
    copy(&qm, &qm_by_ox);
    for p in [&ox, &qm_by_ox] {
        let img = open_rw(p);
        img.qcow2().unwrap().snapshot_apply("s1").unwrap();
        img.close().unwrap();
        drop(img);
        check_clean(p);
        same(p, &state_a);
    }

    // A second snapshot, write, delete the first (by ID), both sides.
    {
        let img = open_rw(&ox);
        let q = img.qcow2().unwrap();
        let e = q.snapshot_create("s2").unwrap();
        assert_eq!(e.id, "2");
        img.device().write_at(&vec![0x66u8; cs as usize], 3 * cs).unwrap();
        q.snapshot_delete("1").unwrap();
        assert_eq!(q.snapshot_list().len(), 1);
        img.close().unwrap();
    }
    ok("qemu-img", &["snapshot", "-a", "s1", s(&qm)]);
    ok("qemu-img", &["snapshot", "-c", "s2", s(&qm)]);
    qio(&qm, &[&format!("write -P 0x66 {} {}", 3 * cs, cs)]);
    ok("qemu-img", &["snapshot", "-d", "s1", s(&qm)]);
    check_clean(&ox);
    same(&ox, &qm);
    // QEMU deletes oxcow's remaining snapshot; oxcow deletes QEMU's.
    let ox2 = d.p("ox2.qcow2");
    copy(&ox, &ox2);
    ok("qemu-img", &["snapshot", "-d", "s2", s(&ox2)]);
    check_clean(&ox2);
    {
        let img = open_rw(&qm);
        img.qcow2().unwrap().snapshot_delete("s2").unwrap();
        img.close().unwrap();
    }
    check_clean(&qm);
    same(&qm, &ox2);
    assert_eq!(vsize(&qm), 4 << 20);
}

#[test]
fn snapshots_match_qemu() {
    scenario(Maker::Qemu, 65536, 3, 16, false);
    scenario(Maker::Qemu, 4096, 2, 16, false);
    scenario(Maker::Oxcow, 4096, 3, 64, false);
    scenario(Maker::Oxcow, 65536, 2, 16, false);
    scenario(Maker::Qemu, 4096, 3, 2, false);
    scenario(Maker::Qemu, 65536, 3, 16, true);
    scenario(Maker::Qemu, 4096, 2, 16, true);
}

/// QEMU's iotest 112: a refcount that would overflow refuses the
/// snapshot after its L1 table was allocated, which stays leaked; the
/// guest data and every other structure stay as they were, and `check`
/// finds the same leak in oxcow's image as in QEMU's.
#[test]
fn narrow_refcounts_refuse_the_snapshot_leaking_its_l1_table_as_qemu() {
    let d = Dir::new();
    let p = d.p("r1.qcow2");
    make(Maker::Qemu, &p, 1 << 20, 65536, 3, 1, None);
    qio(&p, &["write -P 1 0 64k"]);
    let theirs = d.p("q.qcow2");
    std::fs::copy(&p, &theirs).unwrap();
    let (code, _, _) = run("qemu-img", &["snapshot", "-c", "s", s(&theirs)]);
    assert_ne!(code, 0, "QEMU refuses too");
    {
        let img = open_rw(&p);
        let err = img.qcow2().unwrap().snapshot_create("s").unwrap_err().to_string();
        assert!(err.contains("refcount_bits=1"), "{err}");
        img.close().unwrap();
    }
    let check = |q: &std::path::Path| run("qemu-img", &["check", "-f", "qcow2", s(q)]);
    let (ours, theirs_check) = (check(&p), check(&theirs));
    assert_eq!(ours.0, 3, "a leak only: {}{}", ours.1, ours.2);
    assert_eq!(ours.1.replace("r1.qcow2", "q.qcow2"), theirs_check.1);
    let (code, out, err) = run("qemu-io", &["-c", "read -P 1 0 64k", s(&p)]);
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn snapshot_restores_size() {
    let d = Dir::new();
    let p = d.p("g.qcow2");
    make(Maker::Oxcow, &p, 1 << 20, 65536, 3, 16, None);
    qio(&p, &["write -P 7 0 64k"]);
    {
        let img = open_rw(&p);
        let q = img.qcow2().unwrap();
        q.snapshot_create("small").unwrap();
        q.grow(8 << 20).unwrap();
        img.device().write_at(&[9u8; 4096], 7 << 20).unwrap();
        assert_eq!(img.device().len(), 8 << 20);
        q.snapshot_apply("small").unwrap();
        assert_eq!(img.device().len(), 1 << 20);
        img.close().unwrap();
    }
    check_clean(&p);
    assert_eq!(vsize(&p), 1 << 20);
    let (code, out, _) = run("qemu-io", &["-c", "read -P 7 0 64k", s(&p)]);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

#[test]
fn extended_l2_and_empty_images() {
    let d = Dir::new();
    let (ox, qm, a) = (d.p("x.qcow2"), d.p("q.qcow2"), d.p("a.qcow2"));
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k", s(&ox), "4M"]);
    qio(&ox, &["write -P 1 0 100k", "write -P 2 1M 3k", "write -z 2M 64k", "write -z 3M 6k"]);
    copy(&ox, &qm);
    copy(&ox, &a);
    {
        let img = open_rw(&ox);
        let q = img.qcow2().unwrap();
        q.snapshot_create("s").unwrap();
        img.device().write_at(&[9u8; 5000], 70000).unwrap();
        img.device().write_zeroes(0, 65536, true).unwrap();
        img.close().unwrap();
    }
    ok("qemu-img", &["snapshot", "-c", "s", s(&qm)]);
    qio(&qm, &["write -P 9 70000 5000", "write -z -u 0 64k"]);
    check_clean(&ox);
    same(&ox, &qm);
    {
        let img = open_rw(&ox);
        img.qcow2().unwrap().snapshot_apply("s").unwrap();
        img.close().unwrap();
    }
    check_clean(&ox);
    same(&ox, &a);

    // A zero-sized image: no L1 table to copy.
    let z = d.p("z.qcow2");
    make(Maker::Oxcow, &z, 0, 65536, 3, 16, None);
    {
        let img = open_rw(&z);
        let q = img.qcow2().unwrap();
        q.snapshot_create("empty").unwrap();
        q.grow(1 << 20).unwrap();
        img.device().write_at(&[1u8; 512], 0).unwrap();
        q.snapshot_apply("empty").unwrap();
        assert_eq!(img.device().len(), 0);
        q.snapshot_delete("empty").unwrap();
        img.close().unwrap();
    }
    check_clean(&z);
}
