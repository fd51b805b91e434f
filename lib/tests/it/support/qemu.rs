//! Images made by qemu-img or oxcow, filled with qemu-io, checked and
//! compared with qemu-img.

pub use super::process::s;
use super::process::{ok, run};
use oxcow::qcow2::{self, CreateOptions};
use oxcow::OpenOptions;
use std::path::{Path, PathBuf};

/// `qemu-img check` exits 0.
pub fn check_clean(p: &Path) {
    let (code, out, err) = run("qemu-img", &["check", "-f", "qcow2", s(p)]);
    assert_eq!(code, 0, "qemu-img check {p:?} exit {code}: {out}{err}");
}

/// `qemu-img compare` finds equal content, formats given.
pub fn assert_same(a: &Path, fa: &str, b: &Path, fb: &str) {
    let (code, out, err) = run("qemu-img", &["compare", "-f", fa, "-F", fb, s(a), s(b)]);
    assert_eq!(code, 0, "qemu-img compare {a:?} {b:?}: {out}{err}");
}

/// `qemu-img compare` finds equal content (formats probed).
pub fn same(a: &Path, b: &Path) {
    let (code, out, err) = run("qemu-img", &["compare", s(a), s(b)]);
    assert_eq!(code, 0, "qemu-img compare {a:?} {b:?}: {out}{err}");
}

/// Virtual size per qemu-img info.
pub fn vsize(p: &Path) -> u64 {
    let out = ok("qemu-img", &["info", s(p)]);
    let line = out.lines().find(|l| l.starts_with("virtual size:")).unwrap();
    let i = line.find('(').unwrap();
    line[i + 1..].split(' ').next().unwrap().parse().unwrap()
}

/// qemu-io commands on an image (format probed).
pub fn qio(p: &Path, cmds: &[&str]) {
    let mut args = vec![];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(s(p));
    ok("qemu-io", &args);
}

/// Copies a file.
pub fn copy(a: &Path, b: &Path) {
    std::fs::copy(a, b).unwrap();
}

/// How an image is made.
#[derive(Debug, Clone, Copy)]
pub enum Maker {
    /// `qemu-img create -f qcow2 -o ...`.
    Qemu,
    /// `oxcow::qcow2::create`.
    Oxcow,
}

/// Creates a qcow2 image of `size` with the given options.
pub fn make(maker: Maker, p: &Path, size: u64, cs: u64, version: u32, rbits: u32, backing: Option<&Path>) {
    match maker {
        Maker::Qemu => {
            let mut o =
                format!("cluster_size={cs},compat={},refcount_bits={rbits}", if version == 2 { "0.10" } else { "1.1" });
            if let Some(b) = backing {
                o.push_str(&format!(",backing_file={},backing_fmt=qcow2", s(b)));
            }
            ok("qemu-img", &["create", "-q", "-f", "qcow2", "-o", &o, s(p), &size.to_string()]);
        }
        Maker::Oxcow => {
            let st = oxcow::create_file(p).unwrap();
            let opts = CreateOptions::new(size)
                .cluster_size(cs)
                .version(version)
                .refcount_bits(rbits)
                .backing_file(backing.map(|b| s(b).to_string()))
                .backing_format(backing.map(|_| "qcow2".to_string()));
            qcow2::create(st, None, &opts).unwrap();
        }
    }
}

/// Opens for writing with oxcow.
pub fn open_rw(p: &Path) -> oxcow::Image {
    oxcow::open(p, &OpenOptions::read_write()).unwrap()
}

/// A temp dir and a path maker.
pub struct Dir(pub tempfile::TempDir);
impl Dir {
    /// New temp dir.
    pub fn new() -> Self {
        Dir(tempfile::tempdir().unwrap())
    }
    /// Path of `name` inside it.
    pub fn p(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }
}
