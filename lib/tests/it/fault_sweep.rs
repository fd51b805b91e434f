//! Fault injection: a workload runs on a storage that fails its Nth I/O
//! (EIO or ENOSPC, once or from then on), for every N the workload
//! reaches. Required every time: no panic, the error reaches the caller,
//! nothing is written after a failed write or flush, and the image,
//! reopened, checks without corruption.

use crate::support::Rng;
use oxcow::device::BlockDevice;
use oxcow::qcow2::{self, CreateOptions, Qcow2, Qcow2Options, Repair};
use oxcow::storage::{Fault, FaultStorage, MemoryStorage, Storage};
use std::sync::Arc;

const DISK: u64 = 1 << 20;

fn workload(q: &Qcow2, seed: u64, n: usize, cs: u64) -> usize {
    let mut rng = Rng(seed);
    let mut errors = 0;
    for _ in 0..n {
        let off = rng.below(DISK);
        let len = (1 + rng.below(2 * cs)).min(DISK - off);
        let r = match rng.below(8) {
            0..=3 => q.write_at(&vec![rng.below(255) as u8 + 1; len as usize], off),
            4 => q.write_zeroes(off, len, rng.below(2) == 0),
            5 => q.discard(off, len),
            6 => {
                let mut b = vec![0u8; len as usize];
                q.read_at(&mut b, off)
            }
            _ => q.flush(),
        };
        if r.is_err() {
            errors += 1;
        }
    }
    if q.flush().is_err() {
        errors += 1;
    }
    errors
}

fn sweep(name: &str, opts: CreateOptions) -> usize {
    let cs = opts.cluster_size;
    let base = Arc::new(MemoryStorage::new());
    qcow2::create(base.clone(), None, &CreateOptions { size: DISK, ..opts }).unwrap();
    let image = base.to_bytes();
    let ops = 200;
    // Count the I/Os of a clean run.
    let total = {
        let st = Arc::new(FaultStorage::new(image.clone(), 0, Fault::Eio, false));
        let q = Qcow2::open(st.clone(), Qcow2Options::default()).unwrap();
        assert_eq!(workload(&q, 7, ops, cs), 0);
        q.close().unwrap();
        st.ops()
    };
    let mut points = 0;
    for n in 1..=total {
        for fault in [Fault::Eio, Fault::Enospc] {
            for persistent in [false, true] {
                let st = Arc::new(FaultStorage::new(image.clone(), n, fault, persistent));
                if let Ok(q) = Qcow2::open(st.clone(), Qcow2Options::default()) {
                    let errors = workload(&q, 7, ops, cs);
                    let closed = q.close();
                    drop(q);
                    // A failed hole punch is advisory: the data stays.
                    if st.failed() && !st.failed_on_punch() {
                        assert!(errors > 0 || closed.is_err(), "{name}: fault at I/O {n} was not reported");
                    }
                }
                if st.failed_on_write() && !st.failed_on_punch() {
                    assert_eq!(st.writes_after_failure(), 0, "{name}: wrote after a failed write (I/O {n})");
                }
                // Reopen what is on the disk now and check it.
                let after: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(st.to_bytes()));
                let q = Qcow2::open(after, Qcow2Options::default())
                    .unwrap_or_else(|e| panic!("{name}: image does not reopen after fault at I/O {n}: {e}"));
                let r = q.check(Repair::None).unwrap();
                assert_eq!(
                    r.corruptions, 0,
                    "{name}: fault at I/O {n} ({fault:?}, persistent {persistent}): {:?}",
                    r.messages
                );
                drop(q);
                points += 1;
            }
        }
    }
    eprintln!("fault sweep {name}: {total} I/Os, {points} fault points");
    points
}

#[test]
fn fault_sweep() {
    let base = CreateOptions { cluster_size: 512, ..Default::default() };
    let mut points = 0;
    points += sweep("v3", base.clone());
    points += sweep("v3-lazy", CreateOptions { lazy_refcounts: true, ..base.clone() });
    points += sweep("v2", CreateOptions { version: 2, ..base.clone() });
    points += sweep("v3-extended-l2", CreateOptions { cluster_size: 16384, extended_l2: true, ..Default::default() });
    eprintln!("fault sweep: {points} fault points in all");
}
