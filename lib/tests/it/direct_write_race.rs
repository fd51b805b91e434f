//! Issue 12: with cache=none, concurrent writes smaller than or not
//! aligned to the O_DIRECT block were lost (two read-modify-write cycles
//! of the same block overwrote each other's bytes), and a padded write at
//! the end of the file could cut off a concurrent extension.
//!
//! Many threads write one pattern over a fresh image through O_DIRECT;
//! afterwards QEMU must read the pattern back everywhere.

use crate::support::{check_clean, ok, run};
use oxcow::qcow2::{Qcow2, Qcow2Options};
use oxcow::storage::{FileStorage, OpenFlags, Storage};
use oxcow::{BlockDevice, CacheMode, Format, OpenOptions, RawImage};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};

const PATTERN: u8 = 0xab;
const THREADS: usize = 16;

/// `count` writes of `size` bytes at `first + i * size` (neighbours share
/// host blocks), issued from `THREADS` threads at once.
fn hammer(dev: &dyn BlockDevice, first: u64, size: u64, count: u64) {
    let next = AtomicU64::new(0);
    let buf = vec![PATTERN; size as usize];
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return;
                }
                dev.write_at(&buf, first + i * size).unwrap();
            });
        }
    });
}

/// The workloads of the issue: 512-byte writes, 4 KiB writes starting at
/// 512, and 4 KiB writes at an offset no block size divides.
const WORKLOADS: [(&str, u64, u64, u64); 3] =
    [("512B", 0, 512, 4096), ("4K@512", 512, 4096, 512), ("4K@100", 100, 4096, 512)];

fn check_pattern(path: &Path, fmt: &str, first: u64, len: u64, what: &str) {
    let p = path.to_str().unwrap();
    let cmd = format!("read -q -P {PATTERN} {first} {len}");
    let (code, out, err) = run("qemu-io", &["-f", fmt, "-r", "-c", &cmd, p]);
    assert!(code == 0 && out.is_empty(), "{what}: acknowledged writes lost: {out}{err}");
}

/// Opens the image with cache=none; with `align`, through a file storage
/// forced to that O_DIRECT alignment instead of the probed one (4 KiB
/// turns the 512-byte workloads into read-modify-write cycles where the
/// host accepts 512).
fn open_direct(path: &Path, fmt: Format, align: Option<usize>) -> Arc<dyn BlockDevice> {
    let Some(align) = align else {
        let opts = OpenOptions::default().format(Some(fmt)).write(true).cache(CacheMode::None);
        return oxcow::open(path, &opts).unwrap().device().clone();
    };
    let flags = OpenFlags::default().write(true).direct(true).direct_align(align);
    let st: Arc<dyn Storage> = Arc::new(FileStorage::open(path, flags).unwrap());
    match fmt {
        Format::Raw => Arc::new(RawImage::new(st, false, false).unwrap()),
        Format::Qcow2 => Arc::new(Qcow2::open(st, Qcow2Options::default()).unwrap()),
        other => panic!("{other} images are not written by this test"),
    }
}

fn run_image(dir: &Path, fmt: Format, create: &[&str], name: &str, align: Option<usize>) {
    for (wname, first, size, count) in WORKLOADS {
        let what = format!("{name} {wname} (alignment {align:?})");
        let path = dir.join(format!("{name}-{wname}.img"));
        let p = path.to_str().unwrap();
        let mut args = vec!["create", "-q", "-f", fmt.name()];
        args.extend_from_slice(create);
        args.extend_from_slice(&[p, "16M"]);
        ok("qemu-img", &args);
        let dev = open_direct(&path, fmt, align);
        hammer(&*dev, first, size, count);
        dev.close().unwrap();
        drop(dev);
        check_pattern(&path, fmt.name(), first, size * count, &what);
        if fmt == Format::Qcow2 {
            check_clean(&path);
        }
    }
}

#[test]
fn concurrent_unaligned_direct_writes_are_not_lost() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for align in [None, Some(4096)] {
        run_image(d, Format::Raw, &[], "raw", align);
        for cs in ["512", "4096", "65536"] {
            let opt = format!("cluster_size={cs}");
            run_image(d, Format::Qcow2, &["-o", &opt], &format!("qcow2-{cs}"), align);
        }
    }
}

/// A write ending inside the last block of the file is padded to the
/// block; the file length must not fall back to the write's end after a
/// concurrent write extended the file further.
#[test]
fn padded_tail_write_does_not_cut_a_concurrent_extension() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("len.raw");
    std::fs::write(&path, b"").unwrap();
    let st = Arc::new(FileStorage::open(&path, OpenFlags::default().write(true).direct(true)).unwrap());
    let rounds = 400u64;
    let barrier = Barrier::new(2);
    let tail = vec![1u8; 512];
    let ext = vec![2u8; 4096];
    let shrunk = AtomicU64::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            for r in 0..rounds {
                barrier.wait();
                st.write_at(&tail, r * 8192).unwrap();
                barrier.wait();
            }
        });
        s.spawn(|| {
            for r in 0..rounds {
                barrier.wait();
                st.write_at(&ext, r * 8192 + 4096).unwrap();
                barrier.wait();
                // No assertion here: a panic would leave the other thread
                // at the barrier; the data check below sees the damage.
                if st.len().unwrap() < (r + 1) * 8192 {
                    shrunk.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    });
    assert_eq!(shrunk.load(Ordering::Relaxed), 0, "the file shrank under a concurrent extension");
    let mut got = vec![0u8; (rounds * 8192) as usize];
    st.read_at(&mut got, 0).unwrap();
    for r in 0..rounds as usize {
        let b = r * 8192;
        assert!(got[b..b + 512].iter().all(|&x| x == 1), "round {r}: tail write lost");
        assert!(got[b + 512..b + 4096].iter().all(|&x| x == 0), "round {r}: padding not zero");
        assert!(got[b + 4096..b + 8192].iter().all(|&x| x == 2), "round {r}: extension lost");
    }
    drop(st);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), rounds * 8192);
}
