//! Copy-on-read is invisible to the guest even across power cuts: a
//! workload of copy-on-read reads (and flushes) runs on a recording
//! storage; every crash state rebuilt from its log (durable prefix, random
//! subsets and orders of the writes since, torn last write) must open,
//! check without corruption, and read exactly the backing content, since
//! the guest never wrote anything. A small L2 cache forces tables out
//! in the middle of reads, so write-back ordering is exercised too.

use crate::support::Rng;
use oxcow::qcow2::{self, CreateOptions, Qcow2, Qcow2Options, Repair};
use oxcow::storage::{apply_event, CrashStorage, Event, MemoryStorage, Storage};
use oxcow::{BlockDevice, RawImage};
use std::sync::Arc;

const DISK: u64 = 1 << 20;

fn backing_bytes() -> Vec<u8> {
    // Data with zero runs (which become zero clusters on v3).
    (0..DISK).map(|i| if (i / 8192) % 5 == 4 { 0 } else { (i / 512 % 251) as u8 + 1 }).collect()
}

fn backing_dev(b: &[u8]) -> Arc<dyn BlockDevice> {
    let st: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(b.to_vec()));
    Arc::new(RawImage::new(st, true, false).unwrap())
}

fn run(name: &str, create: CreateOptions, seed: u64) -> usize {
    let backing = backing_bytes();
    let create = create.size(DISK).backing_file(Some("base.raw".into())).backing_format(Some("raw".into()));
    let fresh = Arc::new(MemoryStorage::new());
    qcow2::create(fresh.clone(), None, &create).unwrap();
    let crash = Arc::new(CrashStorage::new(fresh.to_bytes()));
    let cs = create.cluster_size;
    let opts = |cor: bool| {
        Qcow2Options::default().backing(Some(backing_dev(&backing))).copy_on_read(cor).l2_cache_bytes(4 * cs)
    };
    let mut rng = Rng(seed);
    {
        let q = Qcow2::open(crash.clone(), opts(true)).unwrap();
        for _ in 0..60 {
            if rng.below(6) == 0 {
                q.flush().unwrap();
                continue;
            }
            let len = 1 + rng.below(4 * cs) as usize;
            let off = rng.below(DISK - len as u64);
            let mut buf = vec![0u8; len];
            q.read_at(&mut buf, off).unwrap();
            assert!(buf[..] == backing[off as usize..off as usize + len], "{name}: live read at {off}");
        }
        q.close().unwrap();
        std::mem::forget(q);
    }
    let log = crash.log();
    let flushes = log.flushes();
    let mut states = 0;
    let mut durable = log.base.clone();
    let mut applied = 0;
    let mut cuts = vec![0usize];
    cuts.extend(flushes.iter().map(|&f| f + 1));
    for (ci, &cut) in cuts.iter().enumerate() {
        while applied < cut {
            apply_event(&mut durable, &log.events[applied]);
            applied += 1;
        }
        let window_end = cuts.get(ci + 1).copied().unwrap_or(log.events.len());
        let mut variants = log.crash_variants(cut, window_end, 6, &mut |n| rng.below(n));
        // Every write of the window landed, too.
        let all: Vec<usize> = (cut..window_end).filter(|&i| matches!(log.events[i], Event::Write(..))).collect();
        variants.push((all, None));
        for variant in variants {
            let mut bytes = durable.clone();
            log.apply_variant(&mut bytes, &variant);
            let st: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(bytes));
            let q = Qcow2::open(st, opts(false))
                .unwrap_or_else(|e| panic!("{name}: state {states} (cut {cut}) does not open: {e}"));
            let report = q.check(Repair::None).unwrap();
            assert_eq!(report.corruptions, 0, "{name}: state {states} (cut {cut}): {:?}", report.messages);
            let mut got = vec![0u8; DISK as usize];
            q.read_at(&mut got, 0).unwrap();
            if got != backing {
                let i = got.iter().zip(&backing).position(|(a, b)| a != b).unwrap_or(0);
                panic!("{name}: state {states} (cut {cut}): byte {i} reads {} instead of {}", got[i], backing[i]);
            }
            drop(q);
            states += 1;
        }
    }
    states
}

#[test]
fn copy_on_read_crash_states_read_the_backing_content() {
    let small = CreateOptions::default().cluster_size(512);
    let mut total = 0;
    total += run("v3-512", small.clone(), 1);
    total += run("v3-512-lazy", small.clone().lazy_refcounts(true), 2);
    total += run("v2-512", small.clone().version(2), 3);
    total += run("v3-16k-extended", small.clone().cluster_size(16384).extended_l2(true), 4);
    total += run("v3-64k", small.cluster_size(65536), 5);
    assert!(total > 50, "only {total} states");
    eprintln!("{total} crash states checked");
}
