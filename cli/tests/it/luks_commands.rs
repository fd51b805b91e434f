//! Secrets reach every command that opens an encrypted image or chain:
//! `create -b` on an encrypted backing file, `commit`, `rebase`, `bitmap`,
//! `map`, `compare` and `check -r`, each against qemu-img doing the same
//! on a copy.

use crate::support::*;
use std::path::Path;

const S0: &str = "secret,id=s0,data=base password";
const S1: &str = "secret,id=s1,data=overlay password";
const ENC0: &str = "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10";
const ENC1: &str = "encrypt.format=luks,encrypt.key-secret=s1,encrypt.iter-time=10";

fn overlay(file: &str) -> String {
    format!("driver=qcow2,file.filename={file},encrypt.key-secret=s1,backing.encrypt.key-secret=s0")
}

/// base.qcow2 (key s0) with 0x11 over its first 192 KiB, and ov.qcow2
/// (key s1) on it with 0x22 over 64 KiB..128 KiB; both made by qemu-img.
fn chain(dir: &Path) {
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "--object", S0, "-o", ENC0, "base.qcow2", "1M"]);
    let base = "driver=qcow2,file.filename=base.qcow2,encrypt.key-secret=s0";
    qemu_write(dir, base, &[(0x11, 0, 192 << 10)], &["--object", S0, "--image-opts"]);
    let a = ["create", "-q", "-f", "qcow2", "--object", S1, "-o", ENC1, "-b", "base.qcow2", "-F", "qcow2", "ov.qcow2"];
    ok(dir, "qemu-img", &a);
    qemu_write(
        dir,
        &overlay("ov.qcow2"),
        &[(0x22, 64 << 10, 64 << 10)],
        &["--object", S0, "--object", S1, "--image-opts"],
    );
}

fn copy(dir: &Path, from: &str, to: &str) {
    std::fs::copy(dir.join(from), dir.join(to)).expect("copy");
}

/// Runs `args` (with both secrets) under oxcow in `ours` and qemu-img in
/// `theirs`, two copies of the chain: same status and output, names aside.
fn both(dir: &Path, args: &[&str]) -> (Run, Run) {
    let mut a = vec![args[0], "--object", S0, "--object", S1];
    a.extend_from_slice(&args[1..]);
    let r = (run_in(dir, OXCOW, &a), run_in(dir, "qemu-img", &a));
    assert_eq!(
        r.0.code, r.1.code,
        "{args:?}: oxcow {}{} / qemu-img {}{}",
        r.0.stdout, r.0.stderr, r.1.stdout, r.1.stderr
    );
    r
}

#[test]
fn create_with_an_encrypted_backing_file_needs_no_secret_for_it() {
    let t = tmp();
    let dir = t.path();
    chain(dir);
    for (prog, f) in [(OXCOW, "o.qcow2"), ("qemu-img", "q.qcow2")] {
        // Plain overlay: the backing file's size comes from its header.
        ok(dir, prog, &["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", f]);
        let e = format!("e{f}");
        ok(
            dir,
            prog,
            &["create", "-q", "-f", "qcow2", "--object", S1, "-o", ENC1, "-b", "base.qcow2", "-F", "qcow2", &e],
        );
    }
    let info = |f: &str| json(&ok(dir, "qemu-img", &["info", "--output=json", f]).stdout);
    for (o, q) in [("o.qcow2", "q.qcow2"), ("eo.qcow2", "eq.qcow2")] {
        let (a, b) = (info(o), info(q));
        for k in ["virtual-size", "backing-filename", "backing-filename-format"] {
            assert_eq!(a[k], b[k], "{o}: {k}");
        }
    }
    let pre = ["--object", S0, "--object", S1, "--image-opts"];
    assert_patterns(dir, &overlay("eo.qcow2"), &[(0x11, 0, 192 << 10)], &pre);
}

#[test]
fn commit_and_rebase_unlock_the_whole_chain_as_qemu_img_does() {
    let t = tmp();
    let dir = t.path();
    chain(dir);
    let pre = ["--object", S0, "--object", S1, "--image-opts"];
    let base_opts = |f: &str| format!("driver=qcow2,file.filename={f},encrypt.key-secret=s0");
    let cmp = |a: &str, b: &str| {
        let r = run_in(dir, "qemu-img", &["compare", "--object", S0, "--object", S1, "--image-opts", a, b]);
        assert_eq!(r.code, 0, "{a} vs {b}: {}{}", r.stdout, r.stderr);
    };

    // rebase -b "": the overlay takes in what it read from the backing file.
    copy(dir, "ov.qcow2", "ro.qcow2");
    copy(dir, "ov.qcow2", "rq.qcow2");
    let plain = |f: &str| format!("driver=qcow2,file.filename={f},encrypt.key-secret=s1");
    for (prog, f) in [(OXCOW, "ro.qcow2"), ("qemu-img", "rq.qcow2")] {
        ok(dir, prog, &["rebase", "--object", S0, "--object", S1, "--image-opts", "-b", "", &overlay(f)]);
    }
    assert_patterns(
        dir,
        &plain("ro.qcow2"),
        &[(0x11, 0, 64 << 10), (0x22, 64 << 10, 64 << 10), (0x11, 128 << 10, 64 << 10)],
        &["--object", S1, "--image-opts"],
    );
    cmp(&plain("ro.qcow2"), &plain("rq.qcow2"));
    ok(dir, "qemu-img", &["check", "--object", S1, "--image-opts", &plain("ro.qcow2")]);

    // commit: the overlay's data goes down into the base, re-encrypted
    // under the base's key; qemu-img then does the same on a fresh copy.
    copy(dir, "base.qcow2", "base0.qcow2");
    copy(dir, "ov.qcow2", "ov0.qcow2");
    ok(dir, OXCOW, &["commit", "-q", "--object", S0, "--object", S1, "--image-opts", &overlay("ov.qcow2")]);
    std::fs::rename(dir.join("base.qcow2"), dir.join("ours.qcow2")).expect("rename");
    copy(dir, "base0.qcow2", "base.qcow2");
    copy(dir, "ov0.qcow2", "ov.qcow2");
    ok(dir, "qemu-img", &["commit", "-q", "--object", S0, "--object", S1, "--image-opts", &overlay("ov.qcow2")]);
    let pats = [(0x11, 0, 64 << 10), (0x22, 64 << 10, 64 << 10), (0x11, 128 << 10, 64 << 10)];
    assert_patterns(dir, &base_opts("ours.qcow2"), &pats, &pre);
    cmp(&base_opts("ours.qcow2"), &base_opts("base.qcow2"));
    ok(dir, "qemu-img", &["check", "--object", S0, "--image-opts", &base_opts("ours.qcow2")]);
}

#[test]
fn map_compare_check_and_bitmap_take_the_secrets() {
    let t = tmp();
    let dir = t.path();
    chain(dir);
    let ov = overlay("ov.qcow2");
    let (o, q) = both(dir, &["map", "--output=json", "--image-opts", &ov]);
    assert_eq!(o.code, 0);
    let strip = |s: &str| {
        let mut v = json(s);
        for e in v.as_array_mut().into_iter().flatten() {
            e.as_object_mut().map(|m| m.remove("offset"));
        }
        v
    };
    assert_eq!(strip(&o.stdout), strip(&q.stdout));
    let base = "driver=qcow2,file.filename=base.qcow2,encrypt.key-secret=s0";
    let (o, q) = both(dir, &["compare", "--image-opts", &ov, base]);
    assert_eq!((o.code, &o.stdout), (q.code, &q.stdout));
    assert_eq!(o.code, 1, "the overlay differs: {}", o.stdout);
    let (o, q) = both(dir, &["check", "-r", "all", "--output=json", "--image-opts", base]);
    let no_name = |s: &str| {
        let mut v = json(s);
        v.as_object_mut().map(|m| m.remove("filename"));
        v
    };
    assert_eq!(no_name(&o.stdout), no_name(&q.stdout));
    let r = run_in(dir, OXCOW, &["bitmap", "--object", S0, "--image-opts", "--add", base, "b0"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    ok(dir, "qemu-img", &["bitmap", "--object", S0, "--image-opts", "--add", base, "b1"]);
    let info = json(&ok(dir, "qemu-img", &["info", "--output=json", "base.qcow2"]).stdout);
    let bitmaps = info["format-specific"]["data"]["bitmaps"].as_array().cloned().unwrap_or_default();
    let names: Vec<_> = bitmaps.iter().map(|b| b["name"].as_str().unwrap_or("").to_string()).collect();
    assert_eq!(names, ["b0", "b1"]);
    ok(dir, "qemu-img", &["check", "--object", S0, "--image-opts", base]);
}

/// iotest 188: a preallocated encrypted qcow2 has no zero init (its
/// clusters decrypt to noise), so convert must write the zeros.
#[test]
fn convert_into_a_preallocated_encrypted_qcow2_writes_the_zeros() {
    let t = tmp();
    let dir = t.path();
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "src.qcow2", "1M"]);
    qemu_write(dir, "src.qcow2", &[(0x11, 64 << 10, 4096)], &[]);
    let o = format!("{ENC0},preallocation=metadata");
    ok(dir, OXCOW, &["convert", "--object", S0, "-O", "qcow2", "-o", &o, "src.qcow2", "dst.qcow2"]);
    let dst = "driver=qcow2,file.filename=dst.qcow2,encrypt.key-secret=s0";
    let r = run_in(
        dir,
        "qemu-img",
        &["compare", "--object", S0, "--image-opts", "driver=qcow2,file.filename=src.qcow2", dst],
    );
    assert_eq!((r.code, r.stdout.trim()), (0, "Images are identical."), "{}", r.stderr);
}

/// iotest qcow2-encryption: an option string without `driver` over a
/// `file.` child probes the format; an image whose LUKS header extension
/// is gone is refused with QEMU's words.
#[test]
fn image_opts_without_driver_and_missing_crypto_header_as_qemu() {
    let t = tmp();
    let dir = t.path();
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "--object", S0, "-o", ENC0, "e.qcow2", "1M"]);
    let spec = "file.filename=e.qcow2,encrypt.key-secret=s0";
    let r = ok(dir, OXCOW, &["check", "--object", S0, "--image-opts", spec]);
    assert!(r.stdout.contains("No errors were found on the image."), "{}", r.stdout);
    // The extension's magic changed into an unknown one: the header is
    // still there, but nothing points at it.
    let mut b = std::fs::read(dir.join("e.qcow2")).expect("read");
    let at = b.windows(4).position(|w| w == [0x05, 0x37, 0xbe, 0x77]).expect("crypto header extension");
    b[at..at + 4].copy_from_slice(&[0x12, 0x34, 0x56, 0x78]);
    std::fs::write(dir.join("e.qcow2"), b).expect("write");
    for prog in [OXCOW, "qemu-img"] {
        let r = run_in(dir, prog, &["info", "e.qcow2"]);
        assert_eq!(r.code, 1, "{prog}");
        assert!(r.stderr.contains("Missing CRYPTO header for crypt method 2"), "{prog}: {}", r.stderr);
    }
}

/// iotests 189 and 198: `backing.driver` and `backing.file.filename`
/// beside the keys in qemu-io's option string; a backing file other than
/// the one the image names is refused rather than silently ignored.
#[test]
fn option_string_names_the_backing_driver_and_file_beside_the_keys() {
    let t = tmp();
    let dir = t.path();
    chain(dir);
    let spec = |b: &str| {
        format!(
            "driver=qcow2,file.filename=ov.qcow2,backing.driver=qcow2,backing.file.filename={b},\
             backing.encrypt.key-secret=s0,encrypt.key-secret=s1"
        )
    };
    let cmds = ["read -q -P 0x11 0 64k".to_string(), "read -q -P 0x22 64k 64k".to_string()];
    let pre = ["io", "--object", S0, "--object", S1, "--image-opts"];
    let good = spec("base.qcow2");
    let r = ok(dir, OXCOW, &io_args(&pre, &cmds, &good));
    assert!(!r.stdout.contains("verification failed"), "{}", r.stdout);
    std::fs::copy(dir.join("base.qcow2"), dir.join("other.qcow2")).expect("copy");
    let bad = spec("other.qcow2");
    let r = oxcow(dir, &io_args(&pre, &cmds, &bad));
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("is not the backing file"), "{}", r.stderr);
}
