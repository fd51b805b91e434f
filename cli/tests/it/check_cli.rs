//! `oxcow check` against `qemu-img check`: same JSON counters and exit
//! codes on clean, leaking, corrupt and raw images; repairs that leave
//! an image qemu-img finds clean.

use crate::support::json;
use crate::support::process::{run, s};
use std::path::Path;

fn oxcow(args: &[&str]) -> (i32, String, String) {
    run(env!("CARGO_BIN_EXE_oxcow"), args)
}

fn same_check(p: &Path) {
    let (qc, qo, _) = run("qemu-img", &["check", "--output=json", s(p)]);
    let (oc, oo, oe) = oxcow(&["check", "--output=json", s(p)]);
    assert_eq!(oc, qc, "exit code for {p:?}: {oo}{oe}");
    let (q, o) = (json(&qo), json(&oo));
    for k in [
        "check-errors",
        "corruptions",
        "leaks",
        "image-end-offset",
        "total-clusters",
        "allocated-clusters",
        "fragmented-clusters",
        "compressed-clusters",
    ] {
        assert_eq!(o.get(k), q.get(k), "{k} for {p:?}: {o} vs {q}");
    }
}

fn patch(p: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new().write(true).open(p).unwrap().write_all_at(bytes, off).unwrap();
}

fn refblock0(p: &Path) -> u64 {
    let b = std::fs::read(p).unwrap();
    let rt = u64::from_be_bytes(b[48..56].try_into().unwrap());
    u64::from_be_bytes(b[rt as usize..rt as usize + 8].try_into().unwrap())
}

#[test]
fn check_matches_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let clean = d.join("clean.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", s(&clean), "16M"]);
    run("qemu-io", &["-c", "write -P 1 0 300k", "-c", "write -P 2 5M 64k", s(&clean)]);
    same_check(&clean);
    let (code, out, _) = oxcow(&["check", s(&clean)]);
    assert_eq!(code, 0);
    assert!(out.starts_with("No errors were found on the image."), "{out}");

    let leak = d.join("leak.qcow2");
    std::fs::copy(&clean, &leak).unwrap();
    patch(&leak, refblock0(&leak) + 2 * 40, &[0, 1]);
    std::fs::OpenOptions::new().write(true).open(&leak).unwrap().set_len(41 * 65536).unwrap();
    same_check(&leak);
    let (code, out, err) = oxcow(&["check", "-r", "leaks", s(&leak)]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("The following inconsistencies were found and repaired"), "{out}");
    assert!(err.contains("Repairing cluster 40"), "{err}");
    assert_eq!(run("qemu-img", &["check", s(&leak)]).0, 0);

    let bad = d.join("bad.qcow2");
    std::fs::copy(&clean, &bad).unwrap();
    patch(&bad, refblock0(&bad) + 2 * 4, &[0, 0]);
    same_check(&bad);
    assert_eq!(oxcow(&["check", "-r", "leaks", s(&bad)]).0, 2, "-r leaks leaves corruptions");
    assert_eq!(oxcow(&["check", "-r", "all", s(&bad)]).0, 0);
    assert_eq!(run("qemu-img", &["check", s(&bad)]).0, 0);
    assert_eq!(run("qemu-io", &["-c", "read -P 1 0 300k", "-c", "read -P 2 5M 64k", s(&bad)]).0, 0);

    let raw = d.join("disk.raw");
    std::fs::write(&raw, vec![0u8; 65536]).unwrap();
    let (qc, _, _) = run("qemu-img", &["check", "-f", "raw", s(&raw)]);
    let (oc, _, oe) = oxcow(&["check", "-f", "raw", s(&raw)]);
    assert_eq!((oc, qc), (63, 63), "{oe}");
}

#[test]
fn dirty_image_is_repaired_and_said_so() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("dirty.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", s(&p), "16M"]);
    run("qemu-io", &["-c", "write -P 3 0 256k", "-c", "abort", s(&p)]);
    assert_ne!(run("qemu-img", &["check", s(&p)]).0, 0);
    let (code, out, err) = oxcow(&["io", "-c", "write -P 4 1M 4k", s(&p)]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("not closed cleanly"), "{err}");
    assert_eq!(run("qemu-img", &["check", s(&p)]).0, 0);
    assert_eq!(run("qemu-io", &["-c", "read -P 3 0 256k", "-c", "read -P 4 1M 4k", s(&p)]).0, 0);
}

#[test]
fn preallocated_images_check_clean_and_read_zeros() {
    let dir = tempfile::tempdir().unwrap();
    for mode in ["metadata", "falloc", "full"] {
        let p = dir.path().join(format!("{mode}.qcow2"));
        let (code, _, err) =
            oxcow(&["create", "-q", "-f", "qcow2", "-o", &format!("preallocation={mode}"), s(&p), "16M"]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(run("qemu-img", &["check", s(&p)]).0, 0, "{mode}");
        let (code, out, _) = run("qemu-io", &["-c", "read -P 0 0 16M", s(&p)]);
        assert!(code == 0 && !out.contains("failed"), "{mode}: {out}");
        let (_, map, _) = run("qemu-img", &["map", "--output=json", s(&p)]);
        assert!(map.contains("\"data\": true"), "{mode} allocates: {map}");
    }
}
