//! Crash safety of persistent bitmaps, by replay as in `crash_sweep`: an
//! image with an enabled and a disabled bitmap is opened, written
//! (writes, write-zeroes, discards, flushes) and closed cleanly on a
//! recording storage. In every state a power cut could leave (each flush
//! boundary, random subsets of the writes since, torn writes), each bitmap
//! is either marked in use (inconsistent) or up to date: the enabled one
//! covers every request that may have reached disk and nothing else, the
//! disabled one is unchanged. A bitmap that calls a written range clean
//! is the bug this rules out. The image must open and check without
//! corruption in every state.
//!
//! Each run is repeated with O_DIRECT's rules in between (4 KiB blocks).
//! `OXCOW_LONG=1` runs more operations and states.

use crate::support::Rng;
use oxcow::qcow2::{self, CreateOptions, DirtyBitmap, Qcow2, Qcow2Options, Repair};
use oxcow::storage::{apply_event, AlignedStorage, CrashStorage, MemoryStorage, Storage};
use oxcow::BlockDevice;
use std::sync::Arc;

const DISK: u64 = 4 << 20;

fn long_mode() -> bool {
    std::env::var("OXCOW_LONG").is_ok_and(|v| v == "1")
}

/// Marks `ranges` in a fresh bitmap of `granularity`, the reference a
/// stored bitmap is compared with.
fn expected(granularity: u64, ranges: &[(u64, u64)], like: &DirtyBitmap) -> Vec<(u64, u64)> {
    // The same granularity and size as the stored bitmap: compare the
    // extents a bitmap set from `ranges` would have.
    let g = granularity.trailing_zeros() as u64;
    let mut marks: Vec<(u64, u64)> = Vec::new();
    for &(o, l) in ranges {
        let a = (o >> g) << g;
        let b = (((o + l - 1) >> g) + 1) << g;
        marks.push((a, b.min(like.size())));
    }
    marks.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (a, b) in marks {
        match merged.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    merged.into_iter().map(|(a, b)| (a, b - a)).collect()
}

fn run(seed: u64, ops_count: usize, subsets: usize, direct: bool) -> usize {
    let cs = 512u64;
    let fresh = Arc::new(MemoryStorage::new());
    qcow2::create(fresh.clone(), None, &CreateOptions::new(DISK).cluster_size(cs)).unwrap();
    // Set-up, closed cleanly: b0 enabled at 512 bytes (a two-cluster
    // table), b1 disabled with some bits set.
    let setup = [(0u64, 4096u64), (DISK - 512, 512)];
    {
        let q = Qcow2::open(fresh.clone(), Qcow2Options::default()).unwrap();
        q.bitmap_add("b0", Some(512), true).unwrap();
        q.bitmap_add("b1", Some(65536), true).unwrap();
        for &(o, l) in &setup {
            q.write_at(&vec![7; l as usize], o).unwrap();
        }
        q.bitmap_set_enabled("b1", false).unwrap();
        q.close().unwrap();
    }
    let b1_before = {
        let q = Qcow2::open(fresh.clone(), Qcow2Options::default().read_only(true)).unwrap();
        q.bitmap_data("b1").unwrap()
    };
    let crash = Arc::new(CrashStorage::new(fresh.to_bytes()));
    let mut rng = Rng(seed);
    // (range, index of the storage event at which the request started)
    let mut ops: Vec<((u64, u64), usize)> = Vec::new();
    {
        let st: Arc<dyn Storage> =
            if direct { Arc::new(AlignedStorage::new(crash.clone(), 4096).unwrap()) } else { crash.clone() };
        let q = Qcow2::open(st, Qcow2Options::default()).unwrap();
        for _ in 0..ops_count {
            let off = rng.below(DISK);
            let len = (1 + rng.below(8 * cs)).min(DISK - off);
            let start = crash.event_count();
            match rng.below(8) {
                0..=3 => q.write_at(&vec![1 + rng.below(250) as u8; len as usize], off).unwrap(),
                4 => q.write_zeroes(off, len, rng.below(2) == 0).unwrap(),
                5 => q.discard(off, len).unwrap(),
                _ => {
                    q.flush().unwrap();
                    continue;
                }
            }
            ops.push(((off, len), start));
        }
        // The clean close stores the bitmaps: its crash points count most.
        q.close().unwrap();
    }
    let log = crash.log();
    let flushes = log.flushes();
    let mut durable = log.base.clone();
    let mut applied = 0usize;
    let mut states = 0usize;
    let mut rng = Rng(seed ^ 0xb17);
    let mut boundaries = flushes.clone();
    boundaries.push(log.events.len().saturating_sub(1));
    for (fi, &f) in boundaries.iter().enumerate() {
        while applied <= f && applied < log.events.len() {
            apply_event(&mut durable, &log.events[applied]);
            applied += 1;
        }
        let window_end = boundaries.get(fi + 1).copied().unwrap_or(log.events.len());
        // Requests that may have reached disk in this window's states.
        let mut touched: Vec<(u64, u64)> = setup.to_vec();
        touched.extend(ops.iter().filter(|(_, s)| *s < window_end).map(|(r, _)| *r));
        for variant in log.crash_variants(f + 1, window_end, subsets, &mut |n| rng.below(n)) {
            let mut bytes = durable.clone();
            log.apply_variant(&mut bytes, &variant);
            verify(bytes, &touched, &b1_before, states, direct);
            states += 1;
        }
    }
    states
}

/// One crash state: opens, checks clean, and each bitmap is in use or
/// exact (the enabled one marks the requests that may have reached disk,
/// the disabled one is unchanged).
fn verify(bytes: Vec<u8>, touched: &[(u64, u64)], b1: &DirtyBitmap, n: usize, direct: bool) {
    let st: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(bytes));
    let what = format!("state {n}{}", if direct { " (direct I/O)" } else { "" });
    let q = Qcow2::open(st, Qcow2Options::default().read_only(true))
        .unwrap_or_else(|e| panic!("{what} does not open: {e}"));
    let report = q.check(Repair::None).unwrap();
    assert_eq!(report.corruptions, 0, "{what}: {:?}", report.messages);
    let list = q.bitmaps().unwrap_or_else(|e| panic!("{what}: bitmap directory: {e}"));
    assert_eq!(list.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(), ["b0", "b1"], "{what}");
    for b in list.iter().filter(|b| !b.in_use) {
        let bits = q.bitmap_data(&b.name).unwrap_or_else(|e| panic!("{what}: {}: {e}", b.name));
        if b.name == "b1" {
            assert_eq!(&bits, b1, "{what}: the disabled bitmap changed");
            continue;
        }
        // Exactly the ranges that may have reached disk: none missed
        // (the bug to rule out), none invented.
        assert_eq!(bits.dirty_extents(), expected(512, touched, &bits), "{what}: b0 is stale but not in use");
    }
}

#[test]
fn crash_sweep_bitmaps() {
    let (ops, subsets) = if long_mode() { (3000, 8) } else { (300, 2) };
    for direct in [false, true] {
        let n = run(7, ops, subsets, direct);
        eprintln!("crash sweep bitmaps{}: {n} crash states", if direct { " (direct I/O)" } else { "" });
    }
}
