//! Crash safety of the whole-image operations, proven by replay: each
//! operation runs on a recording storage; then, at every flush boundary,
//! the disk is rebuilt as a power cut could leave it (the durable prefix,
//! plus subsets of the writes since, plus a torn write) and each state
//! must open, check without corruption (leaks allowed) and show either
//! the state before or the state after the operation.

use crate::support::Rng;
use oxcow::qcow2::{self, AmendOptions, CreateOptions, Qcow2, Qcow2Options, Repair};
use oxcow::storage::{CrashStorage, MemoryStorage, Storage};
use oxcow::BlockDevice;
use std::sync::Arc;

const DISK: u64 = 1 << 20;
const CS: u64 = 4096;

fn open(bytes: Vec<u8>) -> Qcow2 {
    let st: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(bytes));
    Qcow2::open(st, Qcow2Options::default()).unwrap()
}

fn content(q: &Qcow2) -> Vec<u8> {
    let mut b = vec![0u8; q.len() as usize];
    q.read_at(&mut b, 0).unwrap();
    b
}

/// An image with data, zeros, compressed clusters and (optionally) a
/// snapshot "old" taken before the last writes.
fn base_image(version: u32, with_snapshot: bool) -> Vec<u8> {
    let st = Arc::new(MemoryStorage::new());
    let opts = CreateOptions::new(DISK).cluster_size(CS).version(version);
    qcow2::create(st.clone(), None, &opts).unwrap();
    {
        let q = Qcow2::open(st.clone(), Qcow2Options::default()).unwrap();
        q.write_at(&vec![0x11; 300 << 10], 0).unwrap();
        for gc in 100..110 {
            q.write_compressed(gc * CS, &vec![gc as u8; CS as usize]).unwrap();
        }
        if with_snapshot {
            q.snapshot_create("old").unwrap();
        }
        q.write_at(&vec![0x22; 64 << 10], 128 << 10).unwrap();
        q.write_zeroes(512 << 10, 64 << 10, true).unwrap();
        q.write_compressed(104 * CS, &vec![0x99; CS as usize]).unwrap();
        q.close().unwrap();
    }
    st.to_bytes()
}

/// Every crash state of `log` worth checking.
fn crash_states(crash: &CrashStorage, rng: &mut Rng) -> Vec<Vec<u8>> {
    let log = crash.log();
    let flushes = log.flushes();
    let mut bounds: Vec<usize> = vec![0];
    bounds.extend(flushes.iter().map(|&f| f + 1));
    let mut out = Vec::new();
    for (k, &durable) in bounds.iter().enumerate() {
        let next = bounds.get(k + 1).copied().unwrap_or(log.events.len());
        let pending: Vec<usize> = (durable..next).collect();
        out.push(log.state(durable, &[], None));
        out.push(log.state(durable, &pending, None));
        for _ in 0..3 {
            let subset: Vec<usize> = pending.iter().copied().filter(|_| rng.below(2) == 0).collect();
            let torn = pending.last().map(|&i| (i, rng.below(8) as usize));
            out.push(log.state(durable, &subset, torn));
        }
    }
    out
}

/// The state must check without corruption, except for COPIED flags that
/// disagree with a refcount changed in the same step (a flag and a
/// refcount live in different clusters, so no order makes both land at
/// once; QEMU has the same window). Such a state is safe: a clear flag only
/// costs a needless copy-on-write, and a set one only survives where no
/// on-disk snapshot shares the cluster. `check -r all` must then leave it
/// clean.
fn assert_consistent(bytes: Vec<u8>, what: &str) -> Qcow2 {
    let q = open(bytes);
    let r = q.check(Repair::None).unwrap();
    assert_eq!(r.check_errors, 0, "{what}: {:?}", r.messages);
    let bad: Vec<&String> =
        r.messages.iter().filter(|m| !m.starts_with("Leaked") && !m.contains("OFLAG_COPIED")).collect();
    assert!(bad.is_empty(), "{what}: {bad:?}");
    if r.corruptions > 0 {
        q.check(Repair::All).unwrap();
        let again = q.check(Repair::None).unwrap();
        assert_eq!((again.corruptions, again.leaks), (0, 0), "{what} after repair: {:?}", again.messages);
    }
    q
}

/// Runs `op` on a recording copy of `base`, then checks every crash state
/// with `verify(state) ` (the image already checked).
fn sweep(name: &str, base: Vec<u8>, op: impl FnOnce(&Qcow2), verify: impl Fn(&Qcow2)) {
    let crash = Arc::new(CrashStorage::new(base));
    {
        let q = Qcow2::open(crash.clone(), Qcow2Options::default()).unwrap();
        op(&q);
        q.close().unwrap();
    }
    let mut rng = Rng(0x5eed);
    let states = crash_states(&crash, &mut rng);
    assert!(states.len() > 5, "{name}: too few flushes to test");
    for (i, s) in states.into_iter().enumerate() {
        let q = assert_consistent(s, &format!("{name} state {i}"));
        verify(&q);
    }
}

#[test]
fn snapshot_operations_survive_crashes() {
    for version in [2, 3] {
        let base = base_image(version, true);
        let before = content(&open(base.clone()));
        let old = {
            let q = open(base.clone());
            q.snapshot_apply("old").unwrap();
            content(&q)
        };
        assert_ne!(before, old);

        sweep(
            "create",
            base.clone(),
            |q| {
                q.snapshot_create("new").unwrap();
            },
            |q| {
                assert_eq!(content(q), before);
                if q.snapshot_list().iter().any(|s| s.name == "new") {
                    q.snapshot_apply("new").unwrap();
                    assert_eq!(content(q), before);
                }
            },
        );
        sweep(
            "apply",
            base.clone(),
            |q| q.snapshot_apply("old").unwrap(),
            |q| {
                let c = content(q);
                assert!(c == before || c == old, "apply: neither state");
                q.snapshot_apply("old").unwrap();
                assert_eq!(content(q), old);
            },
        );
        sweep(
            "delete",
            base.clone(),
            |q| q.snapshot_delete("old").unwrap(),
            |q| {
                assert_eq!(content(q), before);
                if !q.snapshot_list().is_empty() {
                    q.snapshot_apply("old").unwrap();
                    assert_eq!(content(q), old);
                }
            },
        );
    }
}

#[test]
fn shrink_empty_and_amend_survive_crashes() {
    let base = base_image(3, true);
    let before = content(&open(base.clone()));
    let half = (DISK / 2) as usize;
    sweep(
        "shrink",
        base.clone(),
        |q| q.resize_to(DISK / 2 - 512, true).unwrap(),
        |q| {
            let c = content(q);
            let n = half - 512;
            assert_eq!(c[..n], before[..n]);
            assert!(c.len() == n || c.len() == before.len(), "shrink: size {}", c.len());
            // Before the header shrinks, each dropped cluster reads either
            // as before or as unallocated (zeros).
            let first = n.div_ceil(CS as usize) * CS as usize;
            for (k, chunk) in c[first.min(c.len())..].chunks(CS as usize).enumerate() {
                let at = first + k * CS as usize;
                let old = &before[at..at + chunk.len()];
                assert!(chunk == old || chunk.iter().all(|&b| b == 0), "shrink: cluster at {at}");
            }
        },
    );
    sweep(
        "make_empty",
        base.clone(),
        |q| q.make_empty().unwrap(),
        |q| {
            q.snapshot_apply("old").unwrap();
        },
    );
    // Refcount width changes and downgrade go through the file-level amend.
    for o in ["refcount_bits=8", "compat=0.10", "refcount_bits=64,lazy_refcounts=on"] {
        let crash = Arc::new(CrashStorage::new(base.clone()));
        qcow2::amend(crash.clone(), None, &AmendOptions::parse(o).unwrap()).unwrap();
        let mut rng = Rng(7);
        for (i, s) in crash_states(&crash, &mut rng).into_iter().enumerate() {
            let q = assert_consistent(s, &format!("amend {o} state {i}"));
            assert_eq!(content(&q), before, "amend {o} state {i}");
        }
    }
}
