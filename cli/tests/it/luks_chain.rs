//! Backing chains of encrypted images where each layer has its own
//! secret, named as qemu-img and qemu-io take them
//! (`backing.encrypt.key-secret=ID` in `--image-opts`).

use crate::support::*;

const SECRETS: [&str; 2] = ["secret,id=top,data=top secret", "secret,id=base,data=base secret"];

#[test]
fn backing_file_with_its_own_secret_reads_and_converts_as_qemu() {
    let t = tmp();
    let dir = t.path();
    let o = |id: &str| format!("encrypt.format=luks,encrypt.key-secret={id},encrypt.iter-time=10");
    let obj = ["--object", SECRETS[0], "--object", SECRETS[1]];
    let mut a = vec!["create", "-q", "-f", "qcow2"];
    a.extend_from_slice(&obj);
    let ob = o("base");
    let ot = o("top");
    let mut base = a.clone();
    base.extend_from_slice(&["-o", &ob, "base.qcow2", "2M"]);
    ok(dir, "qemu-img", &base);
    let mut top = a.clone();
    top.extend_from_slice(&["-o", &ot, "-b", "base.qcow2", "-F", "qcow2", "-u", "top.qcow2", "2M"]);
    ok(dir, OXCOW, &top);
    let base_img = "driver=qcow2,file.filename=base.qcow2,encrypt.key-secret=base";
    let img = "driver=qcow2,file.filename=top.qcow2,encrypt.key-secret=top,backing.encrypt.key-secret=base";
    let mut pre = obj.to_vec();
    pre.push("--image-opts");
    qemu_write(dir, base_img, &[(0x71, 0, 2 << 20)], &pre);
    let cmds = ["write -q -P 0x72 64k 4k".to_string()];
    let mut io = vec!["io"];
    io.extend_from_slice(&pre);
    ok(dir, OXCOW, &io_args(&io, &cmds, img));
    let pats = [(0x71, 0, 64 << 10), (0x72, 64 << 10, 4096), (0x71, (64 << 10) + 4096, (2 << 20) - (68 << 10))];
    assert_patterns(dir, img, &pats, &pre);
    let reads: Vec<String> = pats.iter().map(|(p, o, l)| format!("read -q -P {p} {o} {l}")).collect();
    let r = run_in(dir, "qemu-io", &io_args(&pre, &reads, img));
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(!r.stdout.contains("verification failed"), "{}", r.stdout);
    let mut conv = vec!["convert"];
    conv.extend_from_slice(&pre);
    conv.extend_from_slice(&[img, "-O", "raw", "flat.raw"]);
    ok(dir, OXCOW, &conv);
    let mut cmp = vec!["compare"];
    cmp.extend_from_slice(&pre);
    cmp.extend_from_slice(&[img, "driver=raw,file.filename=flat.raw"]);
    ok(dir, "qemu-img", &cmp);
    // The base's secret is the base's: the top's does not open it.
    let wrong = "driver=qcow2,file.filename=top.qcow2,encrypt.key-secret=top,backing.encrypt.key-secret=top";
    let r = run_in(dir, OXCOW, &io_args(&io, &["read 0 4k".to_string()], wrong));
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(r.stderr.contains("Invalid password"), "{}", r.stderr);
}
