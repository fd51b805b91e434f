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

/// A guest operation of the randomized workloads.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    /// Write a pattern byte: (offset, length, byte).
    Write(u64, u64, u8),
    /// Write zeroes: (offset, length, may unmap).
    Zero(u64, u64, bool),
    /// Discard: (offset, length).
    Discard(u64, u64),
    /// Flush.
    Flush,
}

/// Applies `op` to `model`, the guest's view, with QEMU's semantics:
/// discard acts on whole clusters only (the partial cluster at the very end
/// of the disk included) and reads zeros afterwards, except on v2 images
/// with a backing file, where QEMU leaves the data.
pub fn apply_model(model: &mut [u8], backing: &[u8], op: Op, cs: u64, v3: bool) {
    let size = model.len() as u64;
    match op {
        Op::Write(off, len, p) => model[off as usize..(off + len) as usize].fill(p),
        Op::Zero(off, len, _) => model[off as usize..(off + len) as usize].fill(0),
        Op::Discard(off, len) => {
            let first = off.div_ceil(cs) * cs;
            let end = off + len;
            let last = if end == size { size } else { end / cs * cs };
            if (v3 || backing.is_empty()) && last > first {
                model[first as usize..last as usize].fill(0);
            }
        }
        Op::Flush => {}
    }
}
