//! Every LUKS cipher configuration qemu-img accepts (AES, Twofish,
//! Serpent, CAST5; ECB, CBC, CTR, XTS; the plain, plain64 and essiv IV
//! generators; MD5 to SM3 hashes), both ways: oxcow creates and writes,
//! qemu-io reads and writes, oxcow reads; and volumes qemu-img creates
//! open in oxcow with the same layout as oxcow's.

use crate::support::*;
use serde_json::Value;
use std::path::Path;

const SECRET: &str = "secret,id=s0,data=correct horse";
const PRE: [&str; 3] = ["--object", SECRET, "--image-opts"];

/// A configuration: cipher-alg, cipher-mode, ivgen-alg, ivgen-hash-alg
/// (empty when none) and hash-alg.
type Config = (&'static str, &'static str, &'static str, &'static str, &'static str);

const ALGS: &[&str] = &[
    "aes-128",
    "aes-192",
    "aes-256",
    "twofish-128",
    "twofish-192",
    "twofish-256",
    "serpent-128",
    "serpent-192",
    "serpent-256",
    "cast5-128",
];
const MODES: &[&str] = &["ecb", "cbc", "ctr", "xts"];
const HASHES: &[&str] = &["md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160", "sm3"];

/// Every (cipher, mode) pair QEMU can use, each with an IV generator and
/// hashes taken in turn so that every generator and hash appears. QEMU
/// refuses CAST5 in XTS (8-byte blocks) and aborts on 192-bit keys outside
/// XTS (their key material is not whole sectors).
fn matrix() -> Vec<Config> {
    let mut v = Vec::new();
    for alg in ALGS {
        for mode in MODES {
            if (*alg == "cast5-128" && *mode == "xts") || (alg.ends_with("-192") && *mode != "xts") {
                continue;
            }
            let i = v.len();
            let ivgen = ["plain64", "plain", "essiv"][i % 3];
            // ESSIV keys a cipher of the family with the digest: 16 or 32
            // bytes fit every family but CAST5, which takes only 16.
            let ivhash = match ivgen {
                "essiv" if *alg == "cast5-128" => "md5",
                "essiv" => ["sha256", "md5", "sm3"][(i / 3) % 3],
                _ => "",
            };
            v.push((*alg, *mode, ivgen, ivhash, HASHES[i % HASHES.len()]));
        }
    }
    v
}

fn long() -> bool {
    std::env::var("OXCOW_LONG").is_ok_and(|v| v == "1")
}

/// The `-o` string; `prefix` is `encrypt.` for qcow2.
fn options(prefix: &str, c: Config) -> String {
    let mut o = if prefix.is_empty() { String::new() } else { format!("{prefix}format=luks,") };
    o += &format!("{prefix}key-secret=s0,{prefix}iter-time=10,{prefix}cipher-alg={},{prefix}cipher-mode={}", c.0, c.1);
    o += &format!(",{prefix}ivgen-alg={},{prefix}hash-alg={}", c.2, c.4);
    if !c.3.is_empty() {
        o += &format!(",{prefix}ivgen-hash-alg={}", c.3);
    }
    o
}

fn image_opts(fmt: &str, file: &str) -> String {
    match fmt {
        "qcow2" => format!("driver=qcow2,file.filename={file},encrypt.key-secret=s0"),
        _ => format!("driver=luks,file.filename={file},key-secret=s0"),
    }
}

/// qemu-io reads what oxcow wrote (sector-unaligned ends included), then
/// oxcow reads what qemu-io wrote; one process per step keeps the
/// 30-configuration matrix to a few seconds.
fn both_ways(dir: &Path, img: &str, c: Config) {
    let ours = [(0x61u8, 512u64, 70u64 << 10), (0x62, (1 << 20) + 100, 1000)];
    let theirs = [(0x71u8, (1 << 20) + 4096, 3u64 << 10)];
    let cmds = |verb: &str, pats: &[(u8, u64, u64)]| -> Vec<String> {
        pats.iter().map(|(p, o, l)| format!("{verb} -q -P {p} {o} {l}")).collect()
    };
    let verified = |prog: &str, pre: &[&str], cmds: &[String], what: &str| {
        let r = run_in(dir, prog, &io_args(pre, cmds, img));
        assert_eq!(r.code, 0, "{c:?} {what}: {}{}", r.stdout, r.stderr);
        assert!(!r.stdout.contains("verification failed"), "{c:?} {what}: {}", r.stdout);
    };
    let ox_pre = ["io", "--object", SECRET, "--image-opts"];
    verified(OXCOW, &ox_pre, &cmds("write", &ours), "oxcow writes");
    verified("qemu-io", &PRE, &cmds("read", &ours), "QEMU reads oxcow's data");
    verified("qemu-io", &PRE, &cmds("write", &theirs), "QEMU writes");
    let mut reads = cmds("read", &theirs);
    reads.extend(cmds("read", &ours[1..]));
    verified(OXCOW, &ox_pre, &reads, "oxcow reads QEMU's data");
}

/// `info`'s JSON without what is random, timed or file-system dependent.
fn layout(dir: &Path, file: &str) -> Value {
    info(dir, "qemu-img", file)
}

fn info(dir: &Path, prog: &str, file: &str) -> Value {
    let mut v = json(&ok(dir, prog, &["info", "--output=json", file]).stdout);
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

#[test]
fn every_cipher_configuration_oxcow_creates_round_trips_with_qemu_io() {
    let t = tmp();
    let dir = t.path();
    let m = matrix();
    assert_eq!(m.len(), 30, "every (cipher, mode) pair QEMU can use");
    for (i, c) in m.iter().enumerate() {
        let f = format!("o{i}.luks");
        ok(dir, OXCOW, &["create", "-q", "-f", "luks", "--object", SECRET, "-o", &options("", *c), &f, "2M"]);
        both_ways(dir, &image_opts("luks", &f), *c);
        // oxcow's info names the configuration as qemu-img's does.
        assert_eq!(info(dir, OXCOW, &f)["format-specific"], layout(dir, &f)["format-specific"], "{c:?}");
        std::fs::remove_file(dir.join(&f)).ok();
    }
}

/// qemu-img calibrates PBKDF2 for a second or more per volume whatever
/// `iter-time`: by default one qcow2 and a few raw volumes covering each
/// new cipher, CTR and the new hashes; the whole matrix with OXCOW_LONG=1.
#[test]
fn volumes_qemu_img_creates_open_in_oxcow_with_oxcow_s_layout() {
    let t = tmp();
    let dir = t.path();
    let m = matrix();
    let picked: Vec<(&str, Config)> = if long() {
        m.iter().flat_map(|c| [("luks", *c), ("qcow2", *c)]).collect()
    } else {
        vec![
            ("qcow2", ("twofish-192", "xts", "essiv", "md5", "sm3")),
            ("luks", ("serpent-256", "cbc", "plain", "", "md5")),
            ("luks", ("cast5-128", "ctr", "essiv", "md5", "sha384")),
        ]
    };
    for (i, (fmt, c)) in picked.iter().enumerate() {
        let prefix = if *fmt == "qcow2" { "encrypt." } else { "" };
        let o = options(prefix, *c);
        let (ours, theirs) = (format!("o{i}.{fmt}"), format!("q{i}.{fmt}"));
        for (prog, f) in [(OXCOW, &ours), ("qemu-img", &theirs)] {
            ok(dir, prog, &["create", "-q", "-f", fmt, "--object", SECRET, "-o", &o, f, "2M"]);
        }
        assert_eq!(layout(dir, &ours), layout(dir, &theirs), "{fmt} {c:?}");
        let len = |f: &str| std::fs::metadata(dir.join(f)).expect("stat").len();
        assert_eq!(len(&ours), len(&theirs), "{fmt} {c:?}: file length");
        both_ways(dir, &image_opts(fmt, &theirs), *c);
        if *fmt == "qcow2" {
            ok(dir, "qemu-img", &["check", "--object", SECRET, "--image-opts", &image_opts(fmt, &theirs)]);
        }
        for f in [&ours, &theirs] {
            std::fs::remove_file(dir.join(f)).ok();
        }
    }
}

#[test]
fn cipher_refusals_match_qemu_img() {
    let t = tmp();
    let dir = t.path();
    let cases = [
        "cipher-alg=cast5-128,cipher-mode=xts",
        "cipher-alg=sm4",
        "cipher-alg=des",
        "cipher-alg=cast5-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256",
        "cipher-alg=twofish-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha1",
        "cipher-alg=serpent-256,ivgen-alg=essiv,ivgen-hash-alg=sha512",
        "cipher-mode=ofb",
        "hash-alg=sha3",
    ];
    for o in cases {
        let o = format!("key-secret=s0,iter-time=10,{o}");
        let run = |prog: &str| {
            let r = run_in(dir, prog, &["create", "-f", "luks", "--object", SECRET, "-o", &o, "t.luks", "1M"]);
            (r.code, r.stderr.replace("qemu-img: ", "").replace("oxcow: ", ""))
        };
        assert_eq!(run(OXCOW), run("qemu-img"), "-o {o}");
    }
    // QEMU aborts on these (key material not whole sectors); oxcow refuses.
    for alg in ["aes-192", "twofish-192", "serpent-192"] {
        let o = format!("key-secret=s0,iter-time=10,cipher-alg={alg},cipher-mode=cbc");
        let r = run_in(dir, OXCOW, &["create", "-f", "luks", "--object", SECRET, "-o", &o, "n.luks", "1M"]);
        assert_eq!(r.code, 1, "{alg}-cbc: {}", r.stderr);
        assert!(r.stderr.contains("not whole sectors"), "{}", r.stderr);
        assert!(!dir.join("n.luks").exists(), "{alg}-cbc: nothing created");
    }
}
