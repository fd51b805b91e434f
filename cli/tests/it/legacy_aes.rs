//! qcow2's legacy AES encryption (`encrypt.format=aes`, crypt_method 1)
//! against QEMU both ways: qemu-img creates and qemu-io writes, oxcow
//! reads and converts away; oxcow creates and writes, QEMU reads. The IVs
//! count guest sectors, compressed clusters stay in the clear, a wrong
//! key reads noise (there is no key check), all as QEMU.

use crate::support::*;
use std::path::Path;

const SECRET: &str = "secret,id=s0,data=astrochicken";
const PRE: [&str; 3] = ["--object", SECRET, "--image-opts"];

fn opts(file: &str) -> String {
    format!("driver=qcow2,file.filename={file},encrypt.key-secret=s0")
}

fn create(dir: &Path, prog: &str, file: &str, extra: &str) {
    let o = format!("encrypt.format=aes,encrypt.key-secret=s0{extra}");
    ok(dir, prog, &["create", "-q", "-f", "qcow2", "--object", SECRET, "-o", &o, file, "4M"]);
}

/// Guest data QEMU wrote (whole clusters, partial ones, unaligned bytes,
/// a compressed cluster) reads back through oxcow, converts to the same
/// raw bytes, and to a plain qcow2 that qemu-img finds identical.
#[test]
fn qemu_writes_oxcow_reads_and_converts_away() {
    let t = tmp();
    let dir = t.path();
    for (file, extra) in [("q.qcow2", ""), ("v2.qcow2", ",compat=0.10,cluster_size=4096")] {
        create(dir, "qemu-img", file, extra);
        let img = opts(file);
        let pats = [(0xab, 0, 100 << 10), (0x5c, (1 << 20) + 512, 3 << 10), (0x17, (3 << 20) + 3, 5)];
        qemu_write(dir, &img, &pats, &PRE);
        let cmds = ["write -q -c -P 0x33 2M 64k".to_string()];
        ok(dir, "qemu-io", &io_args(&PRE, &cmds, &img));
        let mut all = pats.to_vec();
        all.extend([(0x33, 2 << 20, 64 << 10), (0, 100 << 10, 28 << 10), (0, 1 << 20, 512), (0, (3 << 20) + 8, 504)]);
        assert_patterns(dir, &img, &all, &PRE);
        assert_convert_matches(dir, &img, &PRE);
        ok(dir, OXCOW, &["convert", "--object", SECRET, "--image-opts", &img, "-O", "qcow2", "plain.qcow2"]);
        let r = ok(dir, "qemu-img", &["info", "plain.qcow2"]);
        assert!(!r.stdout.contains("encrypted"), "{}", r.stdout);
        ok(
            dir,
            "qemu-img",
            &["compare", "--object", SECRET, "--image-opts", &img, "driver=qcow2,file.filename=plain.qcow2"],
        );
    }
}

/// What oxcow creates and writes (unaligned writes into new clusters,
/// rewrites in place, a compressed cluster) QEMU reads as written, checks
/// clean, and no plaintext sector is in the file.
#[test]
fn oxcow_writes_qemu_reads() {
    let t = tmp();
    let dir = t.path();
    create(dir, OXCOW, "o.qcow2", "");
    let img = opts("o.qcow2");
    let cmds: Vec<String> = [
        "write -q -P 0x41 0 256k",
        "write -q -P 0x42 1000 7",
        "write -q -P 0x43 1048577 1000",
        "write -q -c -P 0x44 2M 64k",
        "write -q -P 0x45 3M 512",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    ok(dir, OXCOW, &io_args(&["io", "--object", SECRET, "--image-opts"], &cmds, &img));
    let check: Vec<String> = [
        "read -q -P 0x41 0 1000",
        "read -q -P 0x42 1000 7",
        "read -q -P 0x41 1007 261137",
        "read -q -P 0 1M 1",
        "read -q -P 0x43 1048577 1000",
        "read -q -P 0 1049577 64535",
        "read -q -P 0x44 2M 64k",
        "read -q -P 0x45 3M 512",
        "read -q -P 0 3146240 65024",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let r = run_in(dir, "qemu-io", &io_args(&PRE, &check, &img));
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(!r.stdout.contains("verification failed"), "{}", r.stdout);
    ok(dir, "qemu-img", &["check", "--object", SECRET, "--image-opts", &img]);
    let bytes = std::fs::read(dir.join("o.qcow2")).expect("read");
    let plain = [0x41u8; 512];
    assert!(!bytes.windows(512).step_by(512).any(|w| w == plain), "a plaintext sector is in the file");
}

/// `info` needs no key and shows `encrypted: yes` and `format: aes`, in
/// both output formats, as qemu-img does.
#[test]
fn info_matches_qemu_img() {
    let t = tmp();
    let dir = t.path();
    create(dir, "qemu-img", "i.qcow2", "");
    for extra in [&["--output=json"][..], &[]] {
        let mut a = vec!["info"];
        a.extend_from_slice(extra);
        a.push("i.qcow2");
        assert_eq!(ok(dir, OXCOW, &a).stdout, ok(dir, "qemu-img", &a).stdout);
    }
    let r = ok(dir, OXCOW, &["info", "i.qcow2"]);
    assert!(r.stdout.contains("encrypted: yes") && r.stdout.contains("format: aes"), "{}", r.stdout);
}

/// There is no key check in legacy AES: a wrong key opens and reads the
/// same noise qemu-io reads; no key at all is refused before any I/O.
#[test]
fn wrong_key_reads_the_noise_qemu_reads_and_no_key_is_refused() {
    let t = tmp();
    let dir = t.path();
    create(dir, "qemu-img", "w.qcow2", "");
    qemu_write(dir, &opts("w.qcow2"), &[(0x61, 0, 4096)], &PRE);
    let before = std::fs::read(dir.join("w.qcow2")).expect("read");
    let wrong = ["--object", "secret,id=s0,data=astrochickem", "--image-opts"];
    let cmds = ["read -v 0 64".to_string()];
    let ours = ok(dir, OXCOW, &io_args(&[&["io"][..], &wrong].concat(), &cmds, &opts("w.qcow2")));
    let theirs = ok(dir, "qemu-io", &io_args(&wrong, &cmds, &opts("w.qcow2")));
    // The hex columns only: qemu-io's text column shows letters and digits.
    let dump = |s: &str| s.lines().take(4).map(|l| l.get(..58).unwrap_or(l).to_string()).collect::<Vec<_>>();
    assert_eq!(dump(&ours.stdout), dump(&theirs.stdout));
    assert!(!ours.stdout.contains("61 61 61 61"), "{}", ours.stdout);
    for args in
        [&["io", "-c", "read 0 512", "w.qcow2"][..], &["check", "w.qcow2"], &["convert", "-O", "raw", "w.qcow2", "x"]]
    {
        let r = oxcow(dir, args);
        assert_eq!(r.code, 1, "{args:?}");
        assert!(r.stderr.contains("Parameter 'encrypt.key-secret' is required for cipher"), "{}", r.stderr);
    }
    assert_eq!(std::fs::read(dir.join("w.qcow2")).expect("read"), before);
}

/// Creation takes the legacy `encryption=on` spelling, and refuses LUKS's
/// options and a missing secret with qemu-img's words.
#[test]
fn create_options_as_qemu_img() {
    let t = tmp();
    let dir = t.path();
    for prog in [OXCOW, "qemu-img"] {
        let o = "encryption=on,encrypt.key-secret=s0";
        ok(dir, prog, &["create", "-q", "-f", "qcow2", "--object", SECRET, "-o", o, "on.qcow2", "1M"]);
        let r = ok(dir, "qemu-img", &["info", "--output=json", "on.qcow2"]);
        assert_eq!(json(&r.stdout)["format-specific"]["data"]["encrypt"]["format"], "aes");
        for (o, msg) in [
            (
                "encrypt.format=aes,encrypt.key-secret=s0,encrypt.cipher-alg=aes-256",
                "Parameter 'encrypt.cipher-alg' is unexpected",
            ),
            ("encrypt.format=aes", "Parameter 'encrypt.key-secret' is required for cipher"),
        ] {
            let r = run_in(dir, prog, &["create", "-q", "-f", "qcow2", "--object", SECRET, "-o", o, "bad.qcow2", "1M"]);
            assert_eq!(r.code, 1, "{prog} {o}");
            assert!(r.stderr.contains(msg), "{prog} {o}: {}", r.stderr);
        }
    }
}

/// Copy-on-read into an AES overlay: the clusters copied up from the
/// backing file are encrypted by their guest sectors, as QEMU reads them.
#[test]
fn copy_on_read_from_a_backing_file_encrypts_by_guest_sector() {
    let t = tmp();
    let dir = t.path();
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    qemu_write(dir, "base.qcow2", &[(0x71, 0, 192 << 10), (0x72, 3 << 20, 64 << 10)], &["-f", "qcow2"]);
    let o = "encrypt.format=aes,encrypt.key-secret=s0";
    let args =
        ["create", "-q", "-f", "qcow2", "--object", SECRET, "-o", o, "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"];
    ok(dir, "qemu-img", &args);
    let img = opts("top.qcow2");
    let cmds = ["read -q 0 192k".to_string(), "read -q 3M 64k".to_string()];
    ok(dir, OXCOW, &io_args(&["io", "-C", "--object", SECRET, "--image-opts"], &cmds, &img));
    let r = ok(dir, "qemu-img", &["map", "--output=json", "--object", SECRET, "--image-opts", &img]);
    assert!(r.stdout.contains("\"start\": 0, \"length\": 196608, \"depth\": 0"), "{}", r.stdout);
    let r = run_in(
        dir,
        "qemu-io",
        &io_args(&PRE, &["read -q -P 0x71 0 192k".to_string(), "read -q -P 0x72 3M 64k".to_string()], &img),
    );
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(!r.stdout.contains("verification failed"), "{}", r.stdout);
}

/// `map` gives no host offsets for encrypted data (legacy AES and LUKS),
/// as qemu-img, whose human map then refuses the image.
#[test]
fn map_shows_no_host_offset_for_encrypted_data() {
    let t = tmp();
    let dir = t.path();
    create(dir, "qemu-img", "m.qcow2", "");
    let luks = "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10";
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "--object", SECRET, "-o", luks, "l.qcow2", "4M"]);
    for file in ["m.qcow2", "l.qcow2"] {
        let img = opts(file);
        qemu_write(dir, &img, &[(0x61, 0, 128 << 10), (0x62, 1 << 20, 4096)], &PRE);
        assert_map_matches(dir, &img, &PRE);
        let r = ok(dir, OXCOW, &["map", "--output=json", "--object", SECRET, "--image-opts", &img]);
        assert!(!r.stdout.contains("offset"), "{file}: {}", r.stdout);
    }
}

/// `amend` of qcow2 options (lazy refcounts, refcount width, compat) on
/// encrypted images opens them with the key, as qemu-img amend; the data
/// reads back the same.
#[test]
fn amend_of_qcow2_options_on_encrypted_images_uses_the_key() {
    let t = tmp();
    let dir = t.path();
    create(dir, "qemu-img", "a.qcow2", "");
    let luks = "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10";
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "--object", SECRET, "-o", luks, "l.qcow2", "4M"]);
    for file in ["a.qcow2", "l.qcow2"] {
        let img = opts(file);
        let pats = [(0x61, 0, 128 << 10), (0x62, (1 << 20) + 512, 4096)];
        qemu_write(dir, &img, &pats, &PRE);
        for o in ["lazy_refcounts=on,refcount_bits=64", "compat=0.10,refcount_bits=16"] {
            ok(dir, OXCOW, &["amend", "--object", SECRET, "-o", o, "--image-opts", &img]);
            ok(dir, "qemu-img", &["check", "--object", SECRET, "--image-opts", &img]);
            assert_patterns(dir, &img, &pats, &PRE);
        }
        let r = ok(dir, "qemu-img", &["info", "--output=json", file]);
        assert_eq!(json(&r.stdout)["format-specific"]["data"]["compat"], "0.10", "{file}");
    }
}
