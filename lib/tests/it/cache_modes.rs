//! Every cache mode keeps its durability promise, on every format and for
//! every kind of request (issue 12: raw images skipped the per-write sync
//! of writethrough and directsync).
//!
//! Images are opened by name, as the tools open them, with a counting
//! storage slid under the cache mode's own layers of every file (image,
//! backing, external data file). After each request:
//!
//! - writethrough, directsync: the request synced, and nothing any file
//!   was given is left unsynced (durable before it completed);
//! - writeback, none: a request other than flush syncs nothing; a flush
//!   leaves nothing unsynced;
//! - unsafe: nothing ever syncs, not even flush or close.

use crate::support::ok;
use oxcow::storage::{CountingStorage, Storage};
use oxcow::{CacheMode, Format, OpenOptions, StorageHook};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const MODES: [CacheMode; 5] =
    [CacheMode::Writeback, CacheMode::None, CacheMode::Writethrough, CacheMode::Directsync, CacheMode::Unsafe];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Layout {
    Raw,
    Qcow2,
    /// qcow2 with an external data file.
    Qcow2DataFile,
    /// qcow2 over a backing file, opened with copy-on-read.
    Qcow2Backing,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    /// A write into unallocated space.
    Write,
    /// The same range again (in place for qcow2).
    Overwrite,
    /// Write zeroes, may unmap or not.
    Zeroes(bool),
    Discard,
    /// A compressed cluster (qcow2 without data file).
    Compressed,
    /// A read that copies backing data into the image.
    CopyOnRead,
    Flush,
    Close,
}

const CLUSTER: u64 = 65536;

fn ops(layout: Layout) -> Vec<Op> {
    use Op::*;
    match layout {
        Layout::Raw | Layout::Qcow2DataFile => {
            vec![Write, Overwrite, Zeroes(false), Zeroes(true), Discard, Write, Flush, Write, Close]
        }
        Layout::Qcow2 => vec![Write, Overwrite, Zeroes(false), Zeroes(true), Discard, Compressed, Flush, Write, Close],
        Layout::Qcow2Backing => vec![CopyOnRead, Write, Overwrite, Zeroes(false), Discard, Flush, Write, Close],
    }
}

/// The counting storages of the files opened so far, by path.
type Files = Arc<Mutex<Vec<(PathBuf, Arc<CountingStorage>)>>>;

#[derive(Debug, Clone, PartialEq)]
struct Counts {
    flushes: u64,
    unsynced: Vec<(PathBuf, u64)>,
}

fn counts(files: &Files) -> Counts {
    let f = files.lock().unwrap();
    Counts {
        flushes: f.iter().map(|(_, c)| c.flushes()).sum(),
        unsynced: f.iter().map(|(p, c)| (p.clone(), c.unsynced())).filter(|(_, n)| *n > 0).collect(),
    }
}

/// Creates the image files of `layout` in `dir`; returns the image path.
fn create(dir: &Path, layout: Layout) -> PathBuf {
    let img = dir.join("img");
    let p = img.to_str().unwrap();
    match layout {
        Layout::Raw => {
            ok("qemu-img", &["create", "-q", "-f", "raw", p, "1M"]);
        }
        Layout::Qcow2 => {
            ok("qemu-img", &["create", "-q", "-f", "qcow2", p, "1M"]);
        }
        Layout::Qcow2DataFile => {
            // Data files are opened by the name recorded, relative to the
            // working directory: record an absolute one.
            let opt = format!("data_file={}", dir.join("img.data").display());
            ok("qemu-img", &["create", "-q", "-f", "qcow2", "-o", &opt, p, "1M"]);
        }
        Layout::Qcow2Backing => {
            let base = dir.join("base");
            let b = base.to_str().unwrap();
            ok("qemu-img", &["create", "-q", "-f", "raw", b, "1M"]);
            ok("qemu-io", &["-f", "raw", "-c", "write -q -P 7 0 1M", b]);
            ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", b, "-F", "raw", p]);
        }
    }
    img
}

fn run(dir: &Path, layout: Layout, mode: CacheMode) {
    let path = create(dir, layout);
    let files: Files = Default::default();
    let hook = {
        let files = files.clone();
        StorageHook(Arc::new(move |p: &Path, st: Arc<dyn Storage>| -> Arc<dyn Storage> {
            let c = Arc::new(CountingStorage::new(st));
            files.lock().unwrap().push((p.to_path_buf(), c.clone()));
            c
        }))
    };
    let format = if layout == Layout::Raw { Format::Raw } else { Format::Qcow2 };
    let opts = OpenOptions::default()
        .format(Some(format))
        .write(true)
        .cache(mode)
        .copy_on_read(layout == Layout::Qcow2Backing)
        .storage_hook(Some(hook));
    let img = oxcow::open(&path, &opts).unwrap();
    let expected_files = if matches!(layout, Layout::Raw | Layout::Qcow2) { 1 } else { 2 };
    assert_eq!(files.lock().unwrap().len(), expected_files, "{layout:?}: every file goes through the hook");
    let dev = img.device();
    let data = vec![0x5a; 4096];
    for (i, op) in ops(layout).into_iter().enumerate() {
        let what = format!("{layout:?} cache={mode:?} op {i} {op:?}");
        let before = counts(&files);
        match op {
            Op::Write => dev.write_at(&data, 3 * CLUSTER + i as u64 * 4096).unwrap(),
            Op::Overwrite => dev.write_at(&data, 3 * CLUSTER + (i as u64 - 1) * 4096).unwrap(),
            Op::Zeroes(unmap) => dev.write_zeroes(3 * CLUSTER, CLUSTER, unmap).unwrap(),
            Op::Discard => dev.discard(3 * CLUSTER, CLUSTER).unwrap(),
            Op::Compressed => {
                let cluster = vec![0x33; CLUSTER as usize];
                img.qcow2().unwrap().write_compressed(6 * CLUSTER, &cluster).unwrap();
            }
            Op::CopyOnRead => {
                let mut buf = vec![0u8; 4096];
                dev.read_at(&mut buf, 8 * CLUSTER).unwrap();
                assert!(buf.iter().all(|&b| b == 7));
            }
            Op::Flush => dev.flush().unwrap(),
            Op::Close => img.close().unwrap(),
        }
        let after = counts(&files);
        let synced = after.flushes - before.flushes;
        let durable_op = !matches!(op, Op::CopyOnRead);
        match mode {
            CacheMode::Unsafe => assert_eq!(synced, 0, "{what}: cache=unsafe synced"),
            CacheMode::Writethrough | CacheMode::Directsync if durable_op => {
                assert!(synced > 0, "{what}: completed without a sync");
                assert!(after.unsynced.is_empty(), "{what}: completed with unsynced changes {:?}", after.unsynced);
            }
            _ if matches!(op, Op::Flush | Op::Close) => {
                assert!(after.unsynced.is_empty(), "{what}: left unsynced changes {:?}", after.unsynced);
                if !before.unsynced.is_empty() {
                    assert!(synced > 0, "{what}: did not sync");
                }
            }
            CacheMode::Writeback | CacheMode::None => {
                assert_eq!(synced, 0, "{what}: synced outside a flush");
            }
            _ => {}
        }
    }
    drop(img);
}

#[test]
fn every_cache_mode_keeps_its_durability_promise() {
    for layout in [Layout::Raw, Layout::Qcow2, Layout::Qcow2DataFile, Layout::Qcow2Backing] {
        for mode in MODES {
            let dir = tempfile::tempdir().unwrap();
            run(dir.path(), layout, mode);
        }
    }
}

/// The example: three writes to a raw image in writethrough mode
/// are three syncs (QEMU: three, and one more at close).
#[test]
fn raw_writethrough_syncs_every_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = create(dir.path(), Layout::Raw);
    let files: Files = Default::default();
    let f = files.clone();
    let hook = StorageHook(Arc::new(move |p: &Path, st: Arc<dyn Storage>| -> Arc<dyn Storage> {
        let c = Arc::new(CountingStorage::new(st));
        f.lock().unwrap().push((p.to_path_buf(), c.clone()));
        c
    }));
    for (mode, want) in [(CacheMode::Writethrough, 3), (CacheMode::Directsync, 3), (CacheMode::Writeback, 0)] {
        let opts =
            OpenOptions::default().format(Some(Format::Raw)).write(true).cache(mode).storage_hook(Some(hook.clone()));
        let img = oxcow::open(&path, &opts).unwrap();
        let before = counts(&files).flushes;
        for off in [0, 256 << 10, 512 << 10] {
            img.device().write_at(&[1u8; 4096], off).unwrap();
        }
        assert_eq!(counts(&files).flushes - before, want, "cache={mode:?}");
        drop(img);
        // The counting storage holds the file (and its locks) open.
        files.lock().unwrap().clear();
    }
}

/// A raw network export, whose device is the NBD client itself: the mode
/// is kept by the client (flushes after each modifying request in
/// writethrough, none sent in unsafe), seen as flushes reaching the
/// served device.
#[test]
fn nbd_export_keeps_the_cache_mode_promise() {
    use oxcow::nbd::server::{ExportConfig, ServeOptions, Server};
    use oxcow::storage::MemoryStorage;
    use oxcow::RawImage;
    use std::sync::atomic::AtomicBool;
    for mode in MODES {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let served = Arc::new(CountingStorage::new(Arc::new(MemoryStorage::from_bytes(vec![0; 1 << 20]))));
        let dev = Arc::new(RawImage::new(served.clone(), false, false).unwrap());
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let shutdown = Arc::new(AtomicBool::new(false));
        let stop = shutdown.clone();
        let server = std::thread::spawn(move || {
            Server::new(dev, ExportConfig::default()).serve(listener, stop, &ServeOptions::default())
        });
        let url = format!("nbd+unix:///?socket={}", sock.display());
        let opts = OpenOptions::default().format(Some(Format::Raw)).write(true).cache(mode);
        let img = oxcow::open(&url, &opts).unwrap();
        let dev = img.device();
        let ops: [(&str, &dyn Fn()); 5] = [
            ("write", &|| dev.write_at(&[1u8; 4096], 0).unwrap()),
            ("unaligned write", &|| dev.write_at(&[2u8; 100], 5000).unwrap()),
            ("write zeroes", &|| dev.write_zeroes(65536, 65536, false).unwrap()),
            ("discard", &|| dev.discard(131072, 65536).unwrap()),
            ("flush", &|| dev.flush().unwrap()),
        ];
        for (what, op) in ops {
            let before = served.flushes();
            op();
            let synced = served.flushes() - before;
            match mode {
                CacheMode::Unsafe => assert_eq!(synced, 0, "nbd cache={mode:?} {what}: flushed"),
                CacheMode::Writethrough | CacheMode::Directsync => {
                    assert!(synced > 0, "nbd cache={mode:?} {what}: completed without a flush")
                }
                _ if what == "flush" => assert!(synced > 0, "nbd cache={mode:?}: flush not sent"),
                _ => assert_eq!(synced, 0, "nbd cache={mode:?} {what}: flushed outside a flush"),
            }
        }
        let before = served.flushes();
        img.close().unwrap();
        drop(img);
        if mode == CacheMode::Unsafe {
            assert_eq!(served.flushes(), before, "nbd cache=unsafe: close flushed");
        }
        shutdown.store(true, std::sync::atomic::Ordering::SeqCst);
        server.join().unwrap().unwrap();
    }
}
