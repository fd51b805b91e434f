//! A local qcow2 overlay on a network base image: reads through it,
//! copy-on-read, stream and background prefetch, with the base served by
//! qemu-nbd and by oxcow's own server behind a counting proxy.

use crate::support;

use crate::support::process::wait_ready;
use crate::support::remote::*;
use oxcow::nbd::client::NbdClient;
use oxcow::qcow2::CreateOptions;
use oxcow::storage::{FileStorage, OpenFlags};
use oxcow::tools::prefetch::{Activity, PrefetchOptions, Prefetcher};
use oxcow::tools::stream::{stream, StreamOptions};
use oxcow::{BlockDevice, OpenOptions, RawImage};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SIZE: u64 = 16 << 20;

/// The base server, whichever kind.
enum Base {
    Qemu(ServerProcess),
    Ox(OxServer),
}

impl Base {
    fn upstream(&self) -> Upstream {
        match self {
            Base::Qemu(q) => q.upstream.clone(),
            Base::Ox(o) => o.upstream.clone(),
        }
    }
}

struct Setup {
    dir: tempfile::TempDir,
    base: PathBuf,
    content: Vec<u8>,
    proxy: Proxy,
    server: Option<Base>,
    overlay: PathBuf,
}

/// A patterned raw base served by qemu-nbd (when `qemu`, and installed)
/// or oxcow, behind a proxy, with an empty qcow2 overlay pointing at the
/// proxy. `None` when the asked-for server is missing.
fn setup(qemu: bool, seed: u64) -> Option<Setup> {
    if qemu && !have("qemu-nbd") {
        eprintln!("note: qemu-nbd not installed; skipping");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let (base, content) = patterned_base(dir.path(), "base.raw", SIZE, seed);
    let server = if qemu {
        Base::Qemu(qemu_nbd(dir.path(), &base))
    } else {
        let st = FileStorage::open(&base, OpenFlags::default()).unwrap();
        Base::Ox(OxServer::start(Arc::new(RawImage::new(Arc::new(st), true, false).unwrap()), true))
    };
    let proxy = Proxy::start(server.upstream(), Duration::ZERO);
    let overlay = dir.path().join("overlay.qcow2");
    create_overlay(&overlay, &proxy.url());
    Some(Setup { dir, base, content, proxy, server: Some(server), overlay })
}

fn create_overlay(path: &Path, backing: &str) {
    let st = oxcow::create_file(path).unwrap();
    let opts = CreateOptions::new(SIZE).backing_file(backing.to_string()).backing_format(Some("raw".into()));
    oxcow::qcow2::create(st, None, &opts).unwrap();
}

fn open_overlay(path: &Path, cor: bool) -> oxcow::Image {
    let opts = OpenOptions::default().write(true).allow_network_backing(true).copy_on_read(cor);
    oxcow::open(path, &opts).unwrap()
}

/// Scattered reads of assorted sizes, some across cluster boundaries.
fn ranges() -> Vec<(u64, usize)> {
    let mut rng = support::Rng(0x1234_5678);
    let mut v: Vec<(u64, usize)> = (0..150)
        .map(|_| {
            let len = [512usize, 4096, 4096, 16384, 65536, 100_000][rng.below(6) as usize];
            (rng.below(SIZE - len as u64), len)
        })
        .collect();
    v.push((0, 1 << 20));
    v.push((SIZE - 1000, 1000));
    v
}

fn read_pass(dev: &dyn BlockDevice, content: &[u8]) {
    for (off, len) in ranges() {
        let mut buf = vec![0xeeu8; len];
        dev.read_at(&mut buf, off).unwrap();
        assert!(buf == content[off as usize..off as usize + len], "read at {off} of {len}");
    }
}

fn copy_on_read(qemu: bool) {
    let Some(s) = setup(qemu, 11) else { return };
    let img = open_overlay(&s.overlay, true);
    assert!(img.qcow2().unwrap().copy_on_read());
    read_pass(img.device(), &s.content);
    let first = s.proxy.reads();
    assert!(first > 0);
    // The same ranges again: everything comes from the overlay now.
    read_pass(img.device(), &s.content);
    assert_eq!(s.proxy.reads(), first, "second pass sent READs to the base");
    img.close().unwrap();
    drop(img);
    support::check_clean(&s.overlay);
    // Reopened, the copies are still there (and still correct).
    let img = open_overlay(&s.overlay, false);
    read_pass(img.device(), &s.content);
    assert_eq!(s.proxy.reads(), first, "reopened overlay read from the base");
}

#[test]
fn copy_on_read_over_qemu_nbd() {
    copy_on_read(true);
}

#[test]
fn copy_on_read_over_oxcow_server() {
    copy_on_read(false);
}

#[test]
fn plain_overlay_reads_through_every_time() {
    let Some(s) = setup(false, 12) else { return };
    let img = open_overlay(&s.overlay, false);
    read_pass(img.device(), &s.content);
    let first = s.proxy.reads();
    read_pass(img.device(), &s.content);
    assert!(s.proxy.reads() >= 2 * first);
    let mut all = vec![0u8; SIZE as usize];
    img.device().read_at(&mut all, 0).unwrap();
    assert!(all == s.content);
}

#[test]
fn network_backing_needs_permission() {
    let Some(s) = setup(false, 13) else { return };
    let e = oxcow::open(&s.overlay, &OpenOptions::read_write()).expect_err("network backing followed");
    assert!(e.to_string().contains("refusing"), "{e}");
    assert_eq!(s.proxy.counts.connections.load(Ordering::Relaxed), 0);
}

#[test]
fn copy_on_read_never_overwrites_racing_writes() {
    let Some(s) = setup(false, 14) else { return };
    let img = Arc::new(open_overlay(&s.overlay, true));
    let cs = 65536u64;
    let stop = Arc::new(AtomicBool::new(false));
    // Writer: every odd cluster of the first 4 MiB gets its own pattern.
    let writer = {
        let img = Arc::clone(&img);
        std::thread::spawn(move || {
            for gc in (1..64u64).step_by(2) {
                img.device().write_at(&vec![gc as u8 | 0x80; cs as usize], gc * cs).unwrap();
            }
        })
    };
    let reader = {
        let (img, stop) = (Arc::clone(&img), Arc::clone(&stop));
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut buf = vec![0u8; 3 * cs as usize / 2];
            while !stop.load(Ordering::Acquire) && start.elapsed() < Duration::from_secs(10) {
                for k in 0..40u64 {
                    img.device().read_at(&mut buf, k * cs + cs / 4).unwrap();
                }
            }
        })
    };
    writer.join().unwrap();
    stop.store(true, Ordering::Release);
    reader.join().unwrap();
    let mut buf = vec![0u8; cs as usize];
    for gc in 0..64u64 {
        img.device().read_at(&mut buf, gc * cs).unwrap();
        if gc % 2 == 1 {
            assert!(buf.iter().all(|&b| b == gc as u8 | 0x80), "cluster {gc} lost its write");
        } else {
            assert!(buf[..] == s.content[(gc * cs) as usize..((gc + 1) * cs) as usize], "cluster {gc}");
        }
    }
    img.close().unwrap();
    drop(img);
    support::check_clean(&s.overlay);
}

#[test]
fn stream_resumes_and_makes_the_image_standalone() {
    let Some(mut s) = setup(true, 15) else { return };
    // First run, cancelled part way.
    {
        let img = open_overlay(&s.overlay, false);
        let cancel = Arc::new(AtomicBool::new(false));
        let opts = StreamOptions::default().cancel(Arc::clone(&cancel));
        let r = stream(img.qcow2().unwrap(), &opts, &mut |p| {
            if p.done >= SIZE / 2 {
                cancel.store(true, Ordering::Release);
            }
        })
        .unwrap();
        assert!(!r.complete && !r.detached && r.copied > 0);
        img.close().unwrap();
    }
    let after_first = s.proxy.read_bytes();
    support::check_clean(&s.overlay);
    // Second run: resumes, copies the rest, detaches.
    let img = open_overlay(&s.overlay, false);
    let mut last = None;
    let r = stream(img.qcow2().unwrap(), &StreamOptions::default(), &mut |p| last = Some(p)).unwrap();
    assert!(r.complete && r.detached);
    assert_eq!(last.map(|p| p.done), Some(SIZE));
    // Only the data blocks (three in four) were copied, once each.
    assert!(s.proxy.read_bytes() - after_first < SIZE / 2 + (1 << 20), "resume re-copied");
    assert!(s.proxy.read_bytes() <= SIZE * 3 / 4 + (1 << 20), "holes were copied");
    assert_eq!(img.qcow2().unwrap().backing_file(), None);
    img.close().unwrap();
    drop(img);
    // The base is gone; the overlay stands alone.
    s.server.take();
    drop(s.proxy);
    support::check_clean(&s.overlay);
    support::assert_same(&s.overlay, "qcow2", &s.base, "raw");
    let info = support::ok("qemu-img", &["info", s.overlay.to_str().unwrap()]);
    assert!(!info.contains("backing file"), "{info}");
    drop(s.dir);
}

#[test]
fn stream_with_a_rate_limit_is_paced() {
    let Some(s) = setup(false, 16) else { return };
    let img = open_overlay(&s.overlay, false);
    // 12 MiB of data at 48 MiB/s: about a quarter of a second.
    let start = Instant::now();
    let opts = StreamOptions::default().rate(48 << 20);
    let r = stream(img.qcow2().unwrap(), &opts, &mut |_| {}).unwrap();
    assert!(r.complete);
    assert!(start.elapsed() >= Duration::from_millis(200), "not paced: {:?}", start.elapsed());
    img.close().unwrap();
}

#[test]
fn prefetch_fills_the_overlay_while_a_client_works() {
    let Some(s) = setup(false, 17) else { return };
    let img = open_overlay(&s.overlay, false);
    let opts = PrefetchOptions::default().chunk(256 << 10);
    let (served, pf) = oxcow::tools::prefetch::for_export(&img, opts).unwrap();
    let srv = OxServer::start(served, false);

    // A client writing and reading in bursts, checking against a model.
    let client = NbdClient::connect(&srv.upstream.url()).unwrap();
    let mut model = s.content.clone();
    let mut rng = support::Rng(99);
    let mut bursts = 0;
    while !pf.is_done() {
        for _ in 0..20 {
            let len = 1 + rng.below(100_000) as usize;
            let off = rng.below(SIZE - len as u64);
            if rng.below(3) == 0 {
                let data: Vec<u8> = (0..len).map(|i| (i as u64 ^ off ^ bursts) as u8).collect();
                client.write_at(&data, off).unwrap();
                model[off as usize..off as usize + len].copy_from_slice(&data);
            } else {
                let mut buf = vec![0u8; len];
                client.read_at(&mut buf, off).unwrap();
                assert!(buf == model[off as usize..off as usize + len], "client read at {off} of {len}");
            }
        }
        bursts += 1;
        // Idle now and then until the prefetcher has used the pause.
        if bursts % 2 == 0 {
            let before = pf.progress().done;
            wait_ready("prefetch progress", None, || pf.is_done() || pf.progress().done > before);
        } else {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    assert!(pf.is_done(), "prefetch did not finish in time: {:?}", pf.progress());
    assert_eq!(pf.error(), None);
    let p = pf.stop();
    assert!(p.finished && p.copied > 0, "{p:?}");
    // Everything is local now: a full read sends nothing to the base.
    let before = s.proxy.reads();
    let mut all = vec![0u8; SIZE as usize];
    client.read_at(&mut all, 0).unwrap();
    assert!(all == model);
    assert_eq!(s.proxy.reads(), before);
    client.close().unwrap();
    drop(srv);
    img.close().unwrap();
    drop(img);
    support::check_clean(&s.overlay);
}

#[test]
fn prefetch_waits_while_the_client_is_busy() {
    let Some(s) = setup(false, 18) else { return };
    let img = open_overlay(&s.overlay, false);
    let activity = Activity::new();
    let busy = activity.begin();
    let pf = Prefetcher::start(img.qcow2().cloned().unwrap(), activity.clone(), PrefetchOptions::default()).unwrap();
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(pf.progress().done, 0, "prefetched while a request was in flight");
    assert_eq!(s.proxy.reads(), 0);
    drop(busy);
    wait_ready("prefetch to finish", None, || pf.is_done());
    let p = pf.stop();
    assert!(p.finished, "{p:?}");
    img.close().unwrap();
}

#[test]
fn stream_pulls_a_whole_chain_local_and_remote() {
    let Some(s) = setup(false, 19) else { return };
    // overlay.qcow2 (from setup) becomes the middle layer, with its own
    // data over part of the network base; top.qcow2 sits on it.
    let mut expected = s.content.clone();
    {
        let mid = open_overlay(&s.overlay, false);
        let data = vec![0x42u8; 300_000];
        mid.device().write_at(&data, 5_000_000).unwrap();
        expected[5_000_000..5_300_000].copy_from_slice(&data);
        mid.device().write_zeroes(8 << 20, 1 << 20, false).unwrap();
        expected[8 << 20..9 << 20].fill(0);
        mid.close().unwrap();
    }
    let top = s.dir.path().join("top.qcow2");
    let st = oxcow::create_file(&top).unwrap();
    let opts = CreateOptions::new(SIZE).backing_file(Some("overlay.qcow2".into())).backing_format(Some("qcow2".into()));
    oxcow::qcow2::create(st, None, &opts).unwrap();
    let img = open_overlay(&top, false);
    let r = stream(img.qcow2().unwrap(), &StreamOptions::default(), &mut |_| {}).unwrap();
    assert!(r.complete && r.detached);
    img.close().unwrap();
    drop(img);
    support::check_clean(&top);
    let img = oxcow::open(&top, &OpenOptions::read_only()).unwrap();
    assert!(img.backing().is_none());
    let mut all = vec![0u8; SIZE as usize];
    img.device().read_at(&mut all, 0).unwrap();
    assert!(all == expected);
}

#[test]
fn stream_of_a_huge_sparse_disk_skips_holes_quickly() {
    const HUGE: u64 = 64 << 30;
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("huge.raw");
    let f = std::fs::File::create(&base).unwrap();
    f.set_len(HUGE).unwrap();
    use std::os::unix::fs::FileExt;
    for k in [0u64, 7, 1000, 1023] {
        f.write_all_at(&[(k % 200) as u8 + 1; 65536], k * (HUGE / 1024)).unwrap();
    }
    drop(f);
    let st = FileStorage::open(&base, OpenFlags::default()).unwrap();
    let srv = OxServer::start(Arc::new(RawImage::new(Arc::new(st), true, false).unwrap()), true);
    let proxy = Proxy::start(srv.upstream.clone(), Duration::ZERO);
    let overlay = dir.path().join("huge.qcow2");
    let st = oxcow::create_file(&overlay).unwrap();
    let opts = CreateOptions::new(HUGE).backing_file(proxy.url()).backing_format(Some("raw".into()));
    oxcow::qcow2::create(st, None, &opts).unwrap();
    let img = open_overlay(&overlay, false);
    let start = Instant::now();
    let r = stream(img.qcow2().unwrap(), &StreamOptions::default(), &mut |_| {}).unwrap();
    let took = start.elapsed();
    assert!(r.complete && r.detached);
    assert_eq!(r.copied, 4 * 65536);
    assert_eq!(proxy.read_bytes(), 4 * 65536);
    assert!(took < Duration::from_secs(20), "stream of a sparse disk took {took:?}");
    let mut buf = vec![0u8; 65536];
    img.device().read_at(&mut buf, 1000 * (HUGE / 1024)).unwrap();
    assert!(buf.iter().all(|&b| b == (1000 % 200) as u8 + 1));
    img.close().unwrap();
}

#[test]
fn copy_on_read_with_many_readers_at_once() {
    let Some(s) = setup(false, 20) else { return };
    let img = Arc::new(open_overlay(&s.overlay, true));
    let content = Arc::new(s.content.clone());
    let pass = |seed: u64| {
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let (img, content) = (Arc::clone(&img), Arc::clone(&content));
                std::thread::spawn(move || {
                    // Overlapping ranges across threads, same per seed.
                    let mut rng = support::Rng(seed + t % 4);
                    for _ in 0..40 {
                        let len = 1 + rng.below(200_000) as usize;
                        let off = rng.below(SIZE - len as u64);
                        let mut buf = vec![0u8; len];
                        img.device().read_at(&mut buf, off).unwrap();
                        assert!(buf[..] == content[off as usize..off as usize + len], "read at {off} of {len}");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    };
    pass(500);
    let first = s.proxy.reads();
    pass(500);
    assert_eq!(s.proxy.reads(), first, "second pass reached the base");
    Arc::try_unwrap(img).expect("image still shared").close().unwrap();
    support::check_clean(&s.overlay);
}
