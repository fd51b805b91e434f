//! Encrypted images oxcow creates (`create` and `convert` with
//! `-o encrypt.format=luks,...` for qcow2, `-f luks -o key-secret=...`
//! for raw LUKS): the same header layout and qcow2 placement as qemu-img
//! makes for each cipher configuration, clean for `qemu-img check`, and
//! data QEMU reads back; converting into, out of and between encrypted
//! images.

use crate::support::*;
use serde_json::Value;
use std::path::Path;

const SECRET: &str = "secret,id=s0,data=correct horse";
const SECRET2: &str = "secret,id=s1,data=battery staple";

/// (cipher-alg, cipher-mode, ivgen-alg, ivgen-hash-alg, hash-alg): the
/// default, and one of each generator, mode and key size QEMU accepts.
const CONFIGS: &[(&str, &str, &str, &str, &str)] = &[
    ("aes-256", "xts", "plain64", "", "sha256"),
    ("aes-128", "cbc", "essiv", "sha256", "sha1"),
    ("aes-256", "ecb", "plain64", "", "ripemd160"),
    ("aes-192", "xts", "plain", "", "sha512"),
    ("aes-128", "xts", "plain64", "sha256", "sha224"),
];

/// qemu-img spends over a second per LUKS image calibrating PBKDF2,
/// whatever `iter-time`: by default the first three configurations (one
/// per mode), all of them with `OXCOW_LONG=1`.
fn configs() -> &'static [(&'static str, &'static str, &'static str, &'static str, &'static str)] {
    if std::env::var("OXCOW_LONG").is_ok_and(|v| v == "1") {
        CONFIGS
    } else {
        &CONFIGS[..3]
    }
}

/// The `-o` string for a configuration; `prefix` is `encrypt.` for qcow2.
fn options(prefix: &str, c: (&str, &str, &str, &str, &str)) -> String {
    let mut o = if prefix.is_empty() { String::new() } else { format!("{prefix}format=luks,") };
    o += &format!("{prefix}key-secret=s0,{prefix}iter-time=10,{prefix}cipher-alg={},{prefix}cipher-mode={}", c.0, c.1);
    o += &format!(",{prefix}ivgen-alg={},{prefix}hash-alg={}", c.2, c.4);
    if !c.3.is_empty() {
        o += &format!(",{prefix}ivgen-hash-alg={}", c.3);
    }
    o
}

/// `info`'s JSON without what is random or timed (uuid, iterations) or
/// depends on the file system (disk size, names).
fn layout(dir: &Path, file: &str) -> Value {
    let mut v = json(&ok(dir, "qemu-img", &["info", "--output=json", file]).stdout);
    fn strip(v: &mut Value) {
        match v {
            Value::Object(m) => {
                for k in ["uuid", "iters", "master-key-iters", "actual-size", "filename", "dirty-flag"] {
                    m.remove(k);
                }
                m.values_mut().for_each(strip);
            }
            Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    strip(&mut v);
    v
}

/// `qemu-img check --output=json` without the file name.
fn check(dir: &Path, img: &str) -> Value {
    let r = ok(dir, "qemu-img", &["check", "--output=json", "--object", SECRET, "--image-opts", img]);
    let mut v = json(&r.stdout);
    if let Value::Object(m) = &mut v {
        m.remove("filename");
    }
    v
}

fn qcow2_opts(file: &str) -> String {
    format!("driver=qcow2,file.filename={file},encrypt.key-secret=s0")
}

fn luks_opts(file: &str) -> String {
    format!("driver=luks,file.filename={file},key-secret=s0")
}

/// oxcow writes, QEMU reads; QEMU writes, oxcow reads.
fn both_ways(dir: &Path, img: &str) {
    let pre = ["--object", SECRET, "--image-opts"];
    let ours = [(0x61u8, 0u64, 70u64 << 10), (0x62, (1 << 20) + 100, 1000)];
    let cmds: Vec<String> = ours.iter().map(|(p, o, l)| format!("write -q -P {p} {o} {l}")).collect();
    ok(dir, OXCOW, &io_args(&["io", "--object", SECRET, "--image-opts"], &cmds, img));
    let mut reads: Vec<String> = ours.iter().map(|(p, o, l)| format!("read -q -P {p} {o} {l}")).collect();
    if img.starts_with("driver=qcow2") {
        // Never-written clusters read as zeros; a raw LUKS payload's
        // never-written sectors decrypt to noise, in QEMU too.
        reads.push(format!("read -q -P 0 {} 100", 1 << 20));
    }
    let r = run_in(dir, "qemu-io", &io_args(&pre, &reads, img));
    assert_eq!(r.code, 0, "{img}: {}{}", r.stdout, r.stderr);
    assert!(!r.stdout.contains("verification failed"), "{img}: {}", r.stdout);
    let theirs = [(0x71u8, 2u64 << 20, 3u64 << 10)];
    qemu_write(dir, img, &theirs, &pre);
    assert_patterns(dir, img, &theirs, &pre);
    assert_patterns(dir, img, &ours, &pre);
}

#[test]
fn created_qcow2_matches_qemu_img_layout_and_qemu_reads_it_for_each_cipher() {
    let t = tmp();
    let dir = t.path();
    for (i, c) in configs().iter().enumerate() {
        let (ours, theirs) = (format!("o{i}.qcow2"), format!("q{i}.qcow2"));
        let o = options("encrypt.", *c);
        let args = |f: &str| ["create", "-q", "-f", "qcow2", "--object", SECRET, "-o", &o, f, "4M"].map(String::from);
        let a = args(&ours);
        ok(dir, OXCOW, &a.iter().map(String::as_str).collect::<Vec<_>>());
        let a = args(&theirs);
        ok(dir, "qemu-img", &a.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(layout(dir, &ours), layout(dir, &theirs), "{c:?}");
        assert_eq!(check(dir, &qcow2_opts(&ours)), check(dir, &qcow2_opts(&theirs)), "{c:?}");
        both_ways(dir, &qcow2_opts(&ours));
        ok(dir, "qemu-img", &["check", "--object", SECRET, "--image-opts", &qcow2_opts(&ours)]);
        ok(dir, OXCOW, &["check", "--object", SECRET, "--image-opts", &qcow2_opts(&ours)]);
    }
}

#[test]
fn created_raw_luks_matches_qemu_img_layout_and_qemu_reads_it() {
    let t = tmp();
    let dir = t.path();
    // The qcow2 test covers the modes; two configurations suffice here.
    let n = if configs().len() == CONFIGS.len() { CONFIGS.len() } else { 2 };
    for (i, c) in configs().iter().enumerate().take(n) {
        let (ours, theirs) = (format!("o{i}.luks"), format!("q{i}.luks"));
        let o = options("", *c);
        for (prog, f) in [(OXCOW, &ours), ("qemu-img", &theirs)] {
            ok(dir, prog, &["create", "-q", "-f", "luks", "--object", SECRET, "-o", &o, f, "3M"]);
        }
        assert_eq!(layout(dir, &ours), layout(dir, &theirs), "{c:?}");
        let len = |f: &str| std::fs::metadata(dir.join(f)).expect("stat").len();
        assert_eq!(len(&ours), len(&theirs), "{c:?}: payload offset");
        both_ways(dir, &luks_opts(&ours));
    }
}

#[test]
fn create_formatting_line_and_refusals_match_qemu_img() {
    let t = tmp();
    let dir = t.path();
    let all = "encrypt.iter-time=1,encrypt.hash-alg=sha1,encrypt.ivgen-hash-alg=sha256,encrypt.ivgen-alg=essiv,\
               encrypt.cipher-mode=cbc,encrypt.cipher-alg=aes-128,encrypt.key-secret=s0,encrypt.format=luks";
    let raw = "iter-time=1,hash-alg=sha1,cipher-alg=aes-128,key-secret=s0,preallocation=off";
    let cases: &[(&str, &str)] = &[
        ("qcow2", all),
        ("luks", raw),
        ("qcow2", "encrypt.format=luks"),
        ("qcow2", "encrypt.key-secret=s0"),
        ("qcow2", "encrypt.format=foo,encrypt.key-secret=s0"),
        ("qcow2", "encrypt.format=luks,encrypt.key-secret=nope"),
        ("qcow2", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.cipher-alg=foo"),
        ("qcow2", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha1"),
        ("luks", "iter-time=1"),
        ("luks", "key-secret=s0,iter-time=abc"),
        ("luks", "key-secret=s0,hash-alg=xx"),
    ];
    for (fmt, o) in cases {
        let name = format!("t.{fmt}");
        let run = |prog: &str| {
            let _ = std::fs::remove_file(dir.join(&name));
            let r = run_in(dir, prog, &["create", "-f", fmt, "--object", SECRET, "-o", o, &name, "1M"]);
            let exists = dir.join(&name).exists();
            (r.code, r.stdout, r.stderr.replace("qemu-img: ", "").replace("oxcow: ", ""), exists)
        };
        let (ours, theirs) = (run(OXCOW), run("qemu-img"));
        assert_eq!((ours.0, &ours.1, &ours.2), (theirs.0, &theirs.1, &theirs.2), "{fmt} -o {o}");
    }
}

#[test]
fn convert_encrypts_decrypts_and_reencrypts() {
    let t = tmp();
    let dir = t.path();
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "plain.qcow2", "3M"]);
    let pats = [(0x11u8, 0u64, 64u64 << 10), (0x22, (2 << 20) + 512, 4096)];
    qemu_write(dir, "plain.qcow2", &pats, &[]);
    let o = "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10";
    // Encrypting: a plain image into an encrypted qcow2.
    ok(dir, OXCOW, &["convert", "-O", "qcow2", "--object", SECRET, "-o", o, "plain.qcow2", "enc.qcow2"]);
    let enc = qcow2_opts("enc.qcow2");
    let pre = ["--object", SECRET, "--image-opts"];
    assert_patterns(dir, &enc, &pats, &pre);
    let r = run_in(
        dir,
        "qemu-img",
        &["compare", "--object", SECRET, "--image-opts", "driver=qcow2,file.filename=plain.qcow2", &enc],
    );
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    ok(dir, "qemu-img", &["check", "--object", SECRET, "--image-opts", &enc]);
    // Re-encrypting: into a raw LUKS image under another secret.
    let a = [
        "convert",
        "--object",
        SECRET,
        "--object",
        SECRET2,
        "--image-opts",
        &enc,
        "-O",
        "luks",
        "-o",
        "key-secret=s1,iter-time=10,cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv",
        "re.luks",
    ];
    ok(dir, OXCOW, &a);
    let re = "driver=luks,file.filename=re.luks,key-secret=s1";
    assert_patterns(dir, re, &pats, &["--object", SECRET2, "--image-opts"]);
    // Decrypting: back to a plain raw image, byte for byte the source.
    ok(dir, OXCOW, &["convert", "--object", SECRET2, "--image-opts", re, "-O", "raw", "out.raw"]);
    ok(dir, "qemu-img", &["convert", "-O", "raw", "plain.qcow2", "ref.raw"]);
    assert!(std::fs::read(dir.join("out.raw")).expect("read") == std::fs::read(dir.join("ref.raw")).expect("read"));
}

#[test]
fn measure_for_encrypted_targets_matches_qemu_img() {
    let t = tmp();
    let dir = t.path();
    ok(dir, OXCOW, &["create", "-q", "-f", "qcow2", "in.qcow2", "5M"]);
    qemu_write(dir, "in.qcow2", &[(0x11, 0, 200 << 10)], &[]);
    // qemu-img measure calibrates PBKDF2 for an encrypted target: a short
    // iter-time keeps that to a second or so.
    let e = "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=1";
    let e128 = format!("{e},encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,cluster_size=4k");
    let cases: &[&[&str]] = &[
        &["-O", "qcow2", "-o", e, "--size", "1G"],
        &["-O", "qcow2", "-o", &e128, "in.qcow2"],
        &["-O", "luks", "-o", "key-secret=s0,iter-time=1", "in.qcow2"],
        &["-O", "qcow2", "-o", "encrypt.format=luks", "--size", "1G"],
    ];
    for c in cases {
        let mut a = vec!["measure", "--output=json", "--object", SECRET];
        a.extend_from_slice(c);
        let (ours, theirs) = (run_in(dir, OXCOW, &a), run_in(dir, "qemu-img", &a));
        assert_eq!((ours.code, &ours.stdout), (theirs.code, &theirs.stdout), "{c:?}: {}", ours.stderr);
    }
}

#[test]
fn resize_snapshots_and_check_on_encrypted_images() {
    let t = tmp();
    let dir = t.path();
    let o = "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10";
    ok(dir, OXCOW, &["create", "-q", "-f", "qcow2", "--object", SECRET, "-o", o, "s.qcow2", "1M"]);
    let img = qcow2_opts("s.qcow2");
    let pre = ["--object", SECRET, "--image-opts"];
    qemu_write(dir, &img, &[(0x31, 0, 64 << 10)], &pre);
    ok(dir, OXCOW, &["snapshot", "--object", SECRET, "--image-opts", "-c", "snap", &img]);
    ok(dir, OXCOW, &["resize", "--object", SECRET, "--image-opts", &img, "3M"]);
    let cmds = ["write -q -P 0x32 0 4k".to_string(), "write -q -P 0x33 2M 64k".to_string()];
    ok(dir, OXCOW, &io_args(&["io", "--object", SECRET, "--image-opts"], &cmds, &img));
    assert_patterns(dir, &img, &[(0x32, 0, 4096), (0x31, 4096, 60 << 10), (0x33, 2 << 20, 64 << 10)], &pre);
    let list = ok(dir, "qemu-img", &["snapshot", "--object", SECRET, "--image-opts", "-l", &img]).stdout;
    assert!(list.contains("snap"), "{list}");
    ok(dir, "qemu-img", &["check", "--object", SECRET, "--image-opts", &img]);
    ok(dir, OXCOW, &["snapshot", "--object", SECRET, "--image-opts", "-a", "snap", &img]);
    assert_patterns(dir, &img, &[(0x31, 0, 64 << 10)], &pre);
    ok(dir, "qemu-img", &["check", "--object", SECRET, "--image-opts", &img]);
    ok(dir, OXCOW, &["check", "--object", SECRET, "--image-opts", &img]);

    ok(
        dir,
        OXCOW,
        &["create", "-q", "-f", "luks", "--object", SECRET, "-o", "key-secret=s0,iter-time=10", "r.luks", "1M"],
    );
    let raw = luks_opts("r.luks");
    qemu_write(dir, &raw, &[(0x41, 0, 1 << 20)], &pre);
    ok(dir, OXCOW, &["resize", "--object", SECRET, "--image-opts", &raw, "2M"]);
    let info = json(&ok(dir, "qemu-img", &["info", "--output=json", "r.luks"]).stdout);
    assert_eq!(info["virtual-size"], 2 << 20);
    qemu_write(dir, &raw, &[(0x42, 1 << 20, 1 << 20)], &pre);
    assert_patterns(dir, &raw, &[(0x41, 0, 1 << 20), (0x42, 1 << 20, 1 << 20)], &pre);
}
