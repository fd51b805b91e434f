//! Fault injection: a workload runs on a storage that fails its Nth I/O,
//! for every N the workload reaches, with EIO or ENOSPC that happens once,
//! stays for good, or (ENOSPC on the operations that can run out of space)
//! clears a few operations later, as when an admin frees space.
//!
//! Required every time: no panic; the error reaches the caller with its
//! own errno (ENOSPC stays ENOSPC, also once the image refuses writes);
//! every successful read returns what the guest wrote; the image, reopened,
//! checks without corruption and holds every write that was flushed
//! before the failure.
//! Required once the fault has cleared (unless it hit an fsync, after
//! which the image refuses everything: what reached the disk is unknown):
//! flush and close succeed, the reopened image checks clean (no leak
//! either) and holds every write that succeeded, failed ones aside.
//!
//! `OXCOW_LONG=1` also runs `qemu-img check` on every image that
//! recovered, not only on a sample.

use crate::support::Rng;
use oxcow::qcow2::{self, CreateOptions, Qcow2, Qcow2Options, Repair};
use oxcow::storage::{AlignedStorage, Fault, FaultOps, FaultStorage, MemoryStorage, Storage};
use oxcow::BlockDevice;
use std::sync::Arc;

const DISK: u64 = 1 << 20;
const OPS: usize = 200;

fn long_mode() -> bool {
    std::env::var("OXCOW_LONG").is_ok_and(|v| v == "1")
}

/// The guest's view: what it wrote (and whether a failed request left a
/// byte unknown), now and as of the last successful flush.
struct Model {
    cur: Vec<u8>,
    cur_known: Vec<bool>,
    flushed: Vec<u8>,
    flushed_known: Vec<bool>,
    /// Touched since the last successful flush (old or new on disk).
    since_flush: Vec<bool>,
    /// The ranges marked in `since_flush`, so a flush copies only those.
    touched: Vec<std::ops::Range<usize>>,
    /// Every range changed since `new`, so a reset clears only those.
    changed: Vec<std::ops::Range<usize>>,
    /// A buffer for reading the whole disk back.
    got: Vec<u8>,
}

impl Model {
    fn new() -> Self {
        let n = DISK as usize;
        Model {
            cur: vec![0; n],
            cur_known: vec![true; n],
            flushed: vec![0; n],
            flushed_known: vec![true; n],
            since_flush: vec![false; n],
            touched: Vec::new(),
            changed: Vec::new(),
            got: vec![0; n],
        }
    }
    /// Back to a zeroed disk, at the cost of what was changed only.
    fn reset(&mut self) {
        self.touched.clear();
        for r in self.changed.drain(..) {
            self.cur[r.clone()].fill(0);
            self.cur_known[r.clone()].fill(true);
            self.flushed[r.clone()].fill(0);
            self.flushed_known[r.clone()].fill(true);
            self.since_flush[r].fill(false);
        }
    }
    fn set(&mut self, off: u64, len: u64, byte: Option<u8>) {
        let r = off as usize..(off + len) as usize;
        if let Some(b) = byte {
            self.cur[r.clone()].fill(b);
        }
        self.cur_known[r.clone()].fill(byte.is_some());
        self.since_flush[r.clone()].fill(true);
        self.touched.push(r.clone());
        self.changed.push(r);
    }
    fn flushed(&mut self) {
        for r in self.touched.drain(..) {
            self.flushed[r.clone()].copy_from_slice(&self.cur[r.clone()]);
            self.flushed_known[r.clone()].copy_from_slice(&self.cur_known[r.clone()]);
            self.since_flush[r].fill(false);
        }
    }
    /// First byte of `[off, off + got.len())` that differs from a known value.
    fn mismatch(&self, got: &[u8], off: u64) -> Option<u64> {
        let o = off as usize;
        first_diff(got, &self.cur[o..o + got.len()], |i| self.cur_known[o + i]).map(|i| off + i as u64)
    }
    /// First byte of the reopened image that lost a write: with a clean
    /// close every successful one counts, otherwise those flushed and not
    /// touched since.
    fn lost(&self, got: &[u8], closed_clean: bool) -> Option<usize> {
        if closed_clean {
            return self.mismatch(got, 0).map(|at| at as usize);
        }
        first_diff(got, &self.flushed, |i| self.flushed_known[i] && !self.since_flush[i])
    }
}

/// First index where `got` and `want` differ and `counts` says it matters;
/// equal blocks are skipped with one comparison.
fn first_diff(got: &[u8], want: &[u8], counts: impl Fn(usize) -> bool) -> Option<usize> {
    const BLOCK: usize = 4096;
    let mut base = 0;
    for (g, w) in got.chunks(BLOCK).zip(want.chunks(BLOCK)) {
        if g != w {
            if let Some(i) = (0..g.len()).find(|&i| g[i] != w[i] && counts(base + i)) {
                return Some(base + i);
            }
        }
        base += g.len();
    }
    None
}

/// Whether a failed request reported the injected errno.
fn errno_ok(e: &oxcow::Error, fault: Fault) -> bool {
    let want = match fault {
        Fault::Eio => libc::EIO,
        Fault::Enospc => libc::ENOSPC,
    };
    // A damaged or refused request has its own errno; host errors keep theirs.
    e.errno() == want || !(e.is_io() || matches!(e, oxcow::Error::Poisoned(_)))
}

/// Runs the workload; returns the number of failed requests.
fn workload(q: &Qcow2, seed: u64, cs: u64, model: &mut Model, fault: Fault, what: &str) -> usize {
    let mut rng = Rng(seed);
    let mut errors = 0;
    let mut check = |r: oxcow::Result<()>| match r {
        Ok(()) => true,
        Err(e) => {
            assert!(errno_ok(&e, fault), "{what}: {fault:?} reported as errno {}: {e}", e.errno());
            errors += 1;
            false
        }
    };
    for _ in 0..OPS {
        let off = rng.below(DISK);
        let len = (1 + rng.below(2 * cs)).min(DISK - off);
        match rng.below(8) {
            0..=3 => {
                let b = rng.below(255) as u8 + 1;
                let ok = check(q.write_at(&vec![b; len as usize], off));
                model.set(off, len, ok.then_some(b));
            }
            4 => {
                let ok = check(q.write_zeroes(off, len, rng.below(2) == 0));
                model.set(off, len, ok.then_some(0));
            }
            5 => {
                // Whole clusters only (the disk ends on a cluster boundary).
                let first = off.div_ceil(cs) * cs;
                let last = (off + len) / cs * cs;
                let ok = check(q.discard(off, len));
                if last > first {
                    model.set(first, last - first, ok.then_some(0));
                }
            }
            6 => {
                let mut b = vec![0u8; len as usize];
                if check(q.read_at(&mut b, off)) {
                    if let Some(at) = model.mismatch(&b, off) {
                        panic!("{what}: read at {at:#x} returned data the guest never wrote there");
                    }
                }
            }
            _ => {
                if check(q.flush()) {
                    model.flushed();
                }
            }
        }
    }
    if check(q.flush()) {
        model.flushed();
    }
    errors
}

#[derive(Debug, Clone, Copy)]
enum Lasting {
    Once,
    Forever,
    /// ENOSPC on the space-consuming operations, clearing after this many more.
    Clearing(u64),
}

fn storage(image: &[u8], n: u64, fault: Fault, lasting: Lasting) -> FaultStorage {
    match lasting {
        Lasting::Once => FaultStorage::new(image.to_vec(), n, fault, false),
        Lasting::Forever => FaultStorage::new(image.to_vec(), n, fault, true),
        Lasting::Clearing(more) => {
            FaultStorage::new(image.to_vec(), n, fault, true).clearing_after(more).only(FaultOps::Space)
        }
    }
}

/// What every fault point of one image configuration shares.
struct Sweep<'a> {
    name: &'a str,
    /// O_DIRECT's rules (4 KiB blocks, read-modify-write) between the
    /// engine and the failing storage, so a failure can hit either half
    /// of such a cycle.
    direct: bool,
    image: Vec<u8>,
    cs: u64,
    model: Model,
}

/// Runs the workload with the fault at I/O `n` and checks everything the
/// module documentation promises. Returns whether the image closed
/// cleanly, and whether after a failure.
fn point(sw: &mut Sweep, n: u64, fault: Fault, lasting: Lasting, qemu_check: bool) -> (bool, bool) {
    let Sweep { name, direct, image, cs, model } = sw;
    let (name, cs, direct) = (*name, *cs, *direct);
    let what = format!("{name}: {fault:?} {lasting:?} at I/O {n}");
    let st = Arc::new(storage(image, n, fault, lasting));
    model.reset();
    let mut closed_clean = false;
    let mut recovered = false;
    if let Ok(q) =
        Qcow2::open(engine_storage(&st, direct), Qcow2Options::default().cache(crate::support::small_slices()))
    {
        let errors = workload(&q, 7, cs, model, fault, &what);
        if let Lasting::Clearing(_) = lasting {
            // The admin frees space, if it did not come back by itself.
            st.heal();
        }
        let poisoned = st.failed_on_flush();
        if st.cleared() && !poisoned {
            // Space came back (or the one failure passed): what failed
            // before is retried and succeeds.
            q.flush().unwrap_or_else(|e| panic!("{what}: flush fails after the fault cleared: {e}"));
            model.flushed();
        }
        let mut closed = q.close();
        let reported = errors > 0 || closed.is_err();
        if let Err(e) = &closed {
            assert!(errno_ok(e, fault), "{what}: close reported errno {}: {e}", e.errno());
            if st.cleared() && !st.failed_on_flush() {
                // The fault hit the close itself and has passed: closing
                // again writes what the first attempt could not.
                closed = q.close();
                if let Err(e) = &closed {
                    panic!("{what}: close fails again after the fault cleared: {e}");
                }
            }
        }
        // A failed hole punch is advisory (the data stays), and a failed
        // reservation ahead is answered by reserving less.
        if st.failed() && !st.failed_on_punch() && !st.failed_on_reserve() {
            assert!(reported, "{what}: the fault was not reported");
        }
        closed_clean = closed.is_ok();
        recovered = closed_clean && st.failed();
        drop(q);
        if poisoned {
            assert_eq!(st.writes_after_failure(), 0, "{what}: wrote after a failed fsync");
        }
    }
    // Reopen what is on the disk now and check it.
    let after = Arc::new(MemoryStorage::from_bytes(st.to_bytes()));
    drop(st);
    let q = Qcow2::open(after.clone() as Arc<dyn Storage>, Qcow2Options::default())
        .unwrap_or_else(|e| panic!("{what}: image does not reopen: {e}"));
    let r = q.check(Repair::None).unwrap();
    assert_eq!(r.corruptions, 0, "{what}: {:?}", r.messages);
    if closed_clean {
        assert_eq!(r.leaks, 0, "{what}: leaks after a clean close: {:?}", r.messages);
    }
    let got = &mut model.got;
    q.read_at(got, 0).unwrap_or_else(|e| panic!("{what}: reading the reopened image: {e}"));
    drop(q);
    if let Some(i) = model.lost(&model.got, closed_clean) {
        panic!("{what}: byte {i:#x} lost (closed clean: {closed_clean})");
    }
    if qemu_check && recovered {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img.qcow2");
        std::fs::write(&p, after.to_bytes()).unwrap();
        crate::support::check_clean(&p);
    }
    (closed_clean, recovered)
}

/// The storage the engine sees: the failing one, or O_DIRECT's rules over it.
fn engine_storage(st: &Arc<FaultStorage>, direct: bool) -> Arc<dyn Storage> {
    if direct {
        Arc::new(AlignedStorage::new(st.clone(), 4096).unwrap())
    } else {
        st.clone()
    }
}

fn sweep(name: &str, opts: CreateOptions) -> usize {
    sweep_io(name, opts, false)
}

fn sweep_io(name: &str, opts: CreateOptions, direct: bool) -> usize {
    let cs = opts.cluster_size;
    let base = Arc::new(MemoryStorage::new());
    qcow2::create(base.clone(), None, &opts.size(DISK)).unwrap();
    let image = base.to_bytes();
    // Count the I/Os of a clean run, all of them and those that can run out of space.
    let count = |ops: FaultOps| {
        let st = Arc::new(FaultStorage::new(image.clone(), 0, Fault::Eio, false).only(ops));
        let q = Qcow2::open(engine_storage(&st, direct), Qcow2Options::default().cache(crate::support::small_slices()))
            .unwrap();
        assert_eq!(workload(&q, 7, cs, &mut Model::new(), Fault::Eio, name), 0);
        q.close().unwrap();
        st.ops()
    };
    let (total, space) = (count(FaultOps::All), count(FaultOps::Space));
    let mut points = 0;
    let mut recovered = 0;
    let sw = &mut Sweep { name, direct, image, cs, model: Model::new() };
    for n in 1..=total {
        for fault in [Fault::Eio, Fault::Enospc] {
            for lasting in [Lasting::Once, Lasting::Forever] {
                recovered += usize::from(point(sw, n, fault, lasting, long_mode()).1);
                points += 1;
            }
        }
    }
    for n in 1..=space {
        // Space back soon (the failed requests' retries may hit it still)
        // or late (many requests fail, the admin frees space at the end);
        // both for every point in the long mode.
        let lengths: &[u64] = if long_mode() { &[2, 40] } else { [&[2], &[40]][n as usize % 2] };
        for &more in lengths {
            // QEMU's tools are slow to start: a sample in the short mode.
            let qemu = long_mode() || n % 16 == 0;
            let (clean, after_failure) = point(sw, n, Fault::Enospc, Lasting::Clearing(more), qemu);
            assert!(clean, "{name}: ENOSPC at I/O {n} clearing after {more} did not recover");
            recovered += usize::from(after_failure);
            points += 1;
        }
    }
    eprintln!(
        "fault sweep {name}: {total} I/Os ({space} can run out of space), {points} fault points, {recovered} recovered"
    );
    points
}

#[test]
fn fault_sweep() {
    let base = CreateOptions::default().cluster_size(512);
    let mut points = 0;
    points += sweep("v3", base.clone());
    points += sweep("v3-lazy", (base.clone()).lazy_refcounts(true));
    points += sweep("v3-lazy-journal", (base.clone()).lazy_refcounts(true).journal(true));
    points += sweep("v2", (base.clone()).version(2));
    points += sweep("v3-extended-l2", CreateOptions::default().cluster_size(16384).extended_l2(true));
    eprintln!("fault sweep: {points} fault points in all");
}

#[test]
fn fault_sweep_direct_io() {
    let mut points = 0;
    points += sweep_io("v3 direct", CreateOptions::default().cluster_size(512), true);
    points += sweep_io("v3-extended-l2 direct", CreateOptions::default().cluster_size(16384).extended_l2(true), true);
    eprintln!("fault sweep with direct I/O: {points} fault points in all");
}
