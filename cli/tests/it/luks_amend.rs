//! `amend` key management on LUKS-encrypted images against qemu-img:
//! adding slots (`state=active,new-secret=`), erasing them by index or
//! by password (`state=inactive,keyslot=` / `old-secret=`), refusing to
//! erase the last one, with qemu-img's messages; a refused amend leaves
//! the file as it was.

use crate::support::*;
use std::path::Path;

const OBJ: [&str; 6] =
    ["--object", "secret,id=s0,data=abc", "--object", "secret,id=s1,data=xyz", "--object", "secret,id=s2,data=qqq"];

/// Each step: the `-o` options (prefix stands for `encrypt.` or nothing).
const STEPS: &[&str] = &[
    "{p}new-secret=s1,{p}state=active,{p}iter-time=10",
    "{p}new-secret=s1,{p}state=active,{p}keyslot=1,{p}iter-time=10",
    "{p}new-secret=s2,{p}state=active,{p}keyslot=5,{p}iter-time=10",
    "{p}state=inactive,{p}keyslot=9",
    "{p}state=inactive,{p}old-secret=s1",
    "{p}state=inactive,{p}keyslot=5",
    "{p}state=inactive,{p}keyslot=0",
    "{p}state=inactive,{p}old-secret=s0",
    "{p}state=inactive,{p}keyslot=3",
    "{p}state=active",
    "{p}state=inactive",
    "{p}new-secret=s1,{p}state=active,{p}keyslot=0",
    "{p}state=inactive,{p}old-secret=s2",
    "{p}new-secret=s1,{p}state=inactive",
    "{p}new-secret=s1,{p}iter-time=10",
    "{p}state=foo",
    "{p}keyslot=x,{p}state=inactive",
    "{p}new-secret=s2,{p}state=active,{p}keyslot=7,{p}iter-time=10",
];

/// The active flags of the slots, as qemu-img shows them.
fn slots(dir: &Path, file: &str) -> Vec<bool> {
    let v = json(&ok(dir, "qemu-img", &["info", "--output=json", file]).stdout);
    let fs = &v["format-specific"]["data"];
    let e = if fs["encrypt"].is_object() { &fs["encrypt"] } else { fs };
    e["slots"].as_array().expect("slots").iter().map(|s| s["active"] == true).collect()
}

/// Runs the steps with `prog` on a fresh image qemu-img made; returns
/// each step's exit code and message, and the final slots.
fn run_steps(dir: &Path, prog: &str, fmt: &str) -> (Vec<(i32, String)>, Vec<bool>) {
    let (file, prefix, create_o, img) = if fmt == "qcow2" {
        (
            "a.qcow2",
            "encrypt.",
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
            "driver=qcow2,file.filename=a.qcow2,encrypt.key-secret=s0",
        )
    } else {
        ("a.luks", "", "key-secret=s0,iter-time=10", "driver=luks,file.filename=a.luks,key-secret=s0")
    };
    let _ = std::fs::remove_file(dir.join(file));
    let mut c = vec!["create", "-q", "-f", fmt];
    c.extend_from_slice(&OBJ);
    c.extend_from_slice(&["-o", create_o, file, "1M"]);
    ok(dir, "qemu-img", &c);
    qemu_write(dir, img, &[(0x5a, 0, 64 << 10)], &[&OBJ[..], &["--image-opts"]].concat());
    let mut out = Vec::new();
    for step in STEPS {
        let o = step.replace("{p}", prefix);
        let before = std::fs::read(dir.join(file)).expect("read");
        let mut a = vec!["amend"];
        a.extend_from_slice(&OBJ);
        a.extend_from_slice(&["-o", &o, "--image-opts", img]);
        let r = run_in(dir, prog, &a);
        let msg = r.stderr.split_once(": ").map(|(_, m)| m.to_string()).unwrap_or_default();
        if r.code != 0 {
            assert!(std::fs::read(dir.join(file)).expect("read") == before, "{prog} {o}: refused but changed the file");
        }
        out.push((r.code, msg));
    }
    // The data is still there under the remaining key (s0 in slot 0, s2
    // in slot 7).
    let pre = [&OBJ[..], &["--image-opts"]].concat();
    assert_patterns(dir, img, &[(0x5a, 0, 64 << 10)], &pre);
    let with_s2 = img.replace("key-secret=s0", "key-secret=s2");
    assert_patterns(dir, &with_s2, &[(0x5a, 0, 64 << 10)], &pre);
    (out, slots(dir, file))
}

#[test]
fn keyslot_management_matches_qemu_img_on_qcow2_and_raw_luks() {
    let t = tmp();
    let dir = t.path();
    for fmt in ["qcow2", "luks"] {
        let theirs = run_steps(dir, "qemu-img", fmt);
        let ours = run_steps(dir, OXCOW, fmt);
        assert_eq!(ours.1, theirs.1, "{fmt}: final key slots");
        for (i, (o, t)) in ours.0.iter().zip(&theirs.0).enumerate() {
            assert_eq!(o, t, "{fmt}: step {}", STEPS[i]);
        }
        assert_eq!(ours.1, [true, false, false, false, false, false, false, true]);
    }
}

#[test]
fn erasing_the_last_slot_with_force_is_allowed_as_in_qemu_img() {
    let t = tmp();
    let dir = t.path();
    let mut c = vec!["create", "-q", "-f", "luks"];
    c.extend_from_slice(&OBJ);
    c.extend_from_slice(&["-o", "key-secret=s0,iter-time=10", "f.luks", "1M"]);
    ok(dir, OXCOW, &c);
    let mut a = vec!["amend"];
    a.extend_from_slice(&OBJ);
    a.extend_from_slice(&["--force", "-o", "state=inactive,keyslot=0", "--image-opts"]);
    a.push("driver=luks,file.filename=f.luks,key-secret=s0");
    ok(dir, OXCOW, &a);
    assert_eq!(slots(dir, "f.luks"), [false; 8]);
    let r = run_in(
        dir,
        "qemu-io",
        &[&OBJ[..], &["--image-opts", "driver=luks,file.filename=f.luks,key-secret=s0", "-c", "read 0 512"]].concat(),
    );
    assert_ne!(r.code, 0, "no slot opens the image any more");
}
