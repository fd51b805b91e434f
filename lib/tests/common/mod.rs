//! Helpers shared by the library's integration tests.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// Runs a QEMU tool, returning (status code, stdout, stderr).
pub fn run(cmd: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a QEMU tool and requires success.
pub fn ok(cmd: &str, args: &[&str]) -> String {
    let (code, out, err) = run(cmd, args);
    assert_eq!(code, 0, "{cmd} {args:?} failed: {out}{err}");
    out
}

/// `qemu-img check` must find the image clean (exit 0).
pub fn assert_checks_clean(path: &Path) {
    let p = path.to_str().unwrap();
    let (code, out, err) = run("qemu-img", &["check", "-f", "qcow2", p]);
    assert_eq!(code, 0, "qemu-img check {p} exit {code}: {out}{err}");
}

/// `qemu-img compare` must find the two images identical.
pub fn assert_same(a: &Path, fa: &str, b: &Path, fb: &str) {
    let (code, out, err) = run("qemu-img", &["compare", "-f", fa, "-F", fb, a.to_str().unwrap(), b.to_str().unwrap()]);
    assert_eq!(code, 0, "qemu-img compare {a:?} {b:?}: {out}{err}");
}

/// A small deterministic PRNG (xorshift64*), so tests need no extra crate.
pub struct Rng(pub u64);
impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}
