//! qcow2 images encrypted with LUKS (`encrypt.format=luks`), against
//! QEMU both ways for each cipher configuration qemu-img makes: QEMU
//! writes and oxcow reads, oxcow writes and QEMU reads; `info` as
//! qemu-img's; wrong and missing secrets refused with the image untouched;
//! no plaintext in the file.

use crate::support::*;
use std::path::Path;

/// (cipher-alg, cipher-mode, ivgen-alg, ivgen-hash-alg, hash-alg).
const CONFIGS: &[(&str, &str, &str, &str, &str)] = &[
    ("aes-256", "xts", "plain64", "sha256", "sha256"),
    ("aes-128", "cbc", "essiv", "sha256", "sha1"),
    ("aes-256", "cbc", "plain", "sha256", "ripemd160"),
    ("aes-128", "xts", "plain64", "sha256", "sha224"),
    ("aes-256", "ecb", "plain64", "sha256", "sha512"),
];

const SECRET: &str = "secret,id=s0,data=correct horse";

fn opts(file: &str) -> String {
    format!("driver=qcow2,file.filename={file},encrypt.key-secret=s0")
}

fn create(dir: &Path, file: &str, c: (&str, &str, &str, &str, &str)) {
    let o = format!(
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,encrypt.cipher-alg={},\
         encrypt.cipher-mode={},encrypt.ivgen-alg={},encrypt.ivgen-hash-alg={},encrypt.hash-alg={}",
        c.0, c.1, c.2, c.3, c.4
    );
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "--object", SECRET, "-o", &o, file, "8M"]);
}

#[test]
fn qemu_writes_oxcow_reads_and_back_for_each_cipher() {
    let t = tmp();
    let dir = t.path();
    for (i, c) in CONFIGS.iter().enumerate() {
        let file = format!("c{i}.qcow2");
        create(dir, &file, *c);
        let img = opts(&file);
        let pre = ["--object", SECRET, "--image-opts"];
        let qemu_pats = [(0xab, 0, 100 << 10), (0x5c, 1 << 20, 3 << 10), (0x17, 3 << 20, 512)];
        qemu_write(dir, &img, &qemu_pats, &pre);
        assert_patterns(dir, &img, &qemu_pats, &pre);
        // Unaligned and partial-cluster writes into clusters never used
        // before: the zeros around them must read back as zeros.
        let ours = [(0x61u8, 5u64 << 20, 7u64), (0x62, (6 << 20) + 100, 1000), (0x63, 1 << 20, 512)];
        let cmds: Vec<String> = ours.iter().map(|(p, o, l)| format!("write -q -P {p} {o} {l}")).collect();
        ok(dir, OXCOW, &io_args(&["io", "--object", SECRET, "--image-opts"], &cmds, &img));
        let check: Vec<String> = ours
            .iter()
            .map(|(p, o, l)| format!("read -q -P {p} {o} {l}"))
            .chain([
                format!("read -q -P 0 {} {}", (5 << 20) + 7, (64 << 10) - 7),
                format!("read -q -P 0 {} 100", 6 << 20),
                format!("read -q -P 0x5c {} {}", (1 << 20) + 512, (2 << 10) + 512),
                "read -q -P 0xab 0 102400".to_string(),
            ])
            .collect();
        let r = run_in(dir, "qemu-io", &io_args(&pre, &check, &img));
        assert_eq!(r.code, 0, "{c:?}: {}{}", r.stdout, r.stderr);
        assert!(!r.stdout.contains("verification failed"), "{c:?}: {}", r.stdout);
        ok(dir, "qemu-img", &["check", "--object", SECRET, "--image-opts", &img]);
        ok(dir, OXCOW, &["check", "--object", SECRET, "--image-opts", &img]);
        assert_convert_matches(dir, &img, &pre);
        ok(dir, "qemu-img", &["compare", "--object", SECRET, "--image-opts", &img, &img]);
    }
}

#[test]
fn info_encrypt_block_matches_qemu_img() {
    let t = tmp();
    let dir = t.path();
    create(dir, "i.qcow2", CONFIGS[1]);
    for extra in [&["--output=json"][..], &[]] {
        let mut a = vec!["info"];
        a.extend_from_slice(extra);
        a.push("i.qcow2");
        let ours = ok(dir, OXCOW, &a).stdout;
        let theirs = ok(dir, "qemu-img", &a).stdout;
        assert_eq!(ours, theirs);
    }
    assert!(ok(dir, OXCOW, &["info", "i.qcow2"]).stdout.contains("encrypted: yes"));
}

#[test]
fn wrong_or_missing_secret_is_refused_and_the_image_untouched() {
    let t = tmp();
    let dir = t.path();
    create(dir, "w.qcow2", CONFIGS[0]);
    let before = std::fs::read(dir.join("w.qcow2")).expect("read");
    let img = opts("w.qcow2");
    let r = oxcow(dir, &["io", "--object", "secret,id=s0,data=wrong", "--image-opts", &img, "-c", "write 0 512"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("Invalid password, cannot unlock any keyslot"), "{}", r.stderr);
    assert!(!r.stderr.contains("wrong"), "the secret must not be echoed: {}", r.stderr);
    let r = oxcow(dir, &["io", "-c", "write 0 512", "w.qcow2"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("Parameter 'encrypt.key-secret' is required for cipher"), "{}", r.stderr);
    let r = oxcow(dir, &["io", "--object", "secret,id=s1,data=x", "--image-opts", &img, "-c", "read 0 1"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("No secret with id 's0'"), "{}", r.stderr);
    assert_eq!(std::fs::read(dir.join("w.qcow2")).expect("read"), before);
}

#[test]
fn data_at_rest_holds_no_plaintext_sector() {
    let t = tmp();
    let dir = t.path();
    create(dir, "p.qcow2", CONFIGS[0]);
    let img = opts("p.qcow2");
    let cmds = ["write -q -P 0x41 0 256k".to_string()];
    ok(dir, OXCOW, &io_args(&["io", "--object", SECRET, "--image-opts"], &cmds, &img));
    let bytes = std::fs::read(dir.join("p.qcow2")).expect("read");
    let plain = [0x41u8; 512];
    assert!(bytes.len() > 256 << 10);
    assert!(!bytes.windows(512).step_by(512).any(|w| w == plain), "a plaintext sector is in the file");
    assert_patterns(dir, &img, &[(0x41, 0, 256 << 10)], &["--object", SECRET, "--image-opts"]);
}

#[test]
fn secret_objects_from_a_file_and_base64() {
    let t = tmp();
    let dir = t.path();
    create(dir, "f.qcow2", CONFIGS[0]);
    std::fs::write(dir.join("pw"), "correct horse").expect("write");
    let img = opts("f.qcow2");
    ok(dir, OXCOW, &["io", "--object", "secret,id=s0,file=pw", "--image-opts", &img, "-c", "read 0 512"]);
    // "correct horse" in base64.
    let b64 = "secret,id=s0,data=Y29ycmVjdCBob3JzZQ==,format=base64";
    ok(dir, OXCOW, &["io", "--object", b64, "--image-opts", &img, "-c", "read 0 512"]);
}

#[test]
fn raw_luks_images_both_ways_and_info() {
    let t = tmp();
    let dir = t.path();
    let o = "key-secret=s0,iter-time=10";
    ok(dir, "qemu-img", &["create", "-q", "-f", "luks", "--object", SECRET, "-o", o, "r.luks", "4M"]);
    for extra in [&["--output=json"][..], &[]] {
        let mut a = vec!["info"];
        a.extend_from_slice(extra);
        a.push("r.luks");
        assert_eq!(ok(dir, OXCOW, &a).stdout, ok(dir, "qemu-img", &a).stdout);
    }
    let img = "driver=luks,file.filename=r.luks,key-secret=s0";
    let pre = ["--object", SECRET, "--image-opts"];
    let pats = [(0x12, 0, 70 << 10), (0x13, 3 << 20, 1 << 10)];
    qemu_write(dir, img, &pats, &pre);
    assert_patterns(dir, img, &pats, &pre);
    let cmds = ["write -q -P 0x44 1048579 3".to_string(), "write -q -P 0x45 2M 64k".to_string()];
    ok(dir, OXCOW, &io_args(&["io", "--object", SECRET, "--image-opts"], &cmds, img));
    let check = [
        "read -q -P 0x44 1048579 3".to_string(),
        "read -q -P 0x45 2M 64k".to_string(),
        "read -q -P 0x12 0 70k".to_string(),
    ];
    let r = run_in(dir, "qemu-io", &io_args(&pre, &check, img));
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(!r.stdout.contains("verification failed"), "{}", r.stdout);
    assert_convert_matches(dir, img, &pre);
    let r = oxcow(dir, &["io", "--object", "secret,id=s0,data=nope", "--image-opts", img, "-c", "read 0 1"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("Invalid password, cannot unlock any keyslot"), "{}", r.stderr);
}
