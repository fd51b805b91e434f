//! Snapshots taken and deleted while other threads write: every
//! snapshot holds, per cluster, one whole write (never a torn or foreign
//! one), the active disk ends with each thread's last writes, and the
//! image checks clean.

use oxcow::qcow2::{self, CreateOptions, Qcow2, Qcow2Options, Repair};
use oxcow::storage::{MemoryStorage, Storage};
use oxcow::BlockDevice;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const CS: u64 = 4096;
const CLUSTERS: u64 = 256;
const THREADS: u64 = 4;

/// Cluster content for (cluster, version): every byte says who wrote it.
fn pattern(gc: u64, version: u64) -> Vec<u8> {
    let mut v = vec![(gc % 251) as u8; CS as usize];
    for b in v.iter_mut().step_by(2) {
        *b = (version % 256) as u8;
    }
    v
}

fn decode(gc: u64, data: &[u8]) -> Option<u64> {
    if data.iter().all(|&b| b == 0) {
        return Some(0);
    }
    let v = u64::from(data[0]);
    (data == pattern(gc, v).as_slice()).then_some(v)
}

#[test]
fn snapshots_under_concurrent_writes() {
    let st: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    qcow2::create(st.clone(), None, &CreateOptions::new(CS * CLUSTERS).cluster_size(CS)).unwrap();
    let q = Arc::new(Qcow2::open(st.clone(), Qcow2Options::default()).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for t in 0..THREADS {
        let (q, stop) = (q.clone(), stop.clone());
        handles.push(std::thread::spawn(move || {
            let per = CLUSTERS / THREADS;
            let mut last = vec![0u64; per as usize];
            let mut x = 0x9e37_79b9u64 + t;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) || n < 200 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let k = x % per;
                let gc = t * per + k;
                let v = (last[k as usize] % 255) + 1;
                if x.is_multiple_of(7) {
                    q.write_compressed(gc * CS, &pattern(gc, v)).unwrap();
                } else {
                    q.write_at(&pattern(gc, v), gc * CS).unwrap();
                }
                last[k as usize] = v;
                n += 1;
            }
            last
        }));
    }
    for i in 0..6 {
        std::thread::sleep(std::time::Duration::from_millis(15));
        q.snapshot_create(&format!("s{i}")).unwrap();
        if i % 2 == 1 {
            q.snapshot_delete(&format!("s{}", i - 1)).unwrap();
        }
    }
    stop.store(true, Ordering::Relaxed);
    let lasts: Vec<Vec<u64>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let mut buf = vec![0u8; CS as usize];
    for gc in 0..CLUSTERS {
        let (t, k) = (gc / (CLUSTERS / THREADS), gc % (CLUSTERS / THREADS));
        q.read_at(&mut buf, gc * CS).unwrap();
        assert_eq!(decode(gc, &buf), Some(lasts[t as usize][k as usize]), "active cluster {gc}");
    }
    q.close().unwrap();
    drop(q);
    let q = Qcow2::open(st.clone(), Qcow2Options::default()).unwrap();
    let r = q.check(Repair::None).unwrap();
    assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0), "{:?}", r.messages);
    let names: Vec<String> = q.snapshot_list().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["s1", "s3", "s5"]);
    for name in names {
        q.snapshot_apply(&name).unwrap();
        for gc in 0..CLUSTERS {
            q.read_at(&mut buf, gc * CS).unwrap();
            assert!(decode(gc, &buf).is_some(), "snapshot {name} cluster {gc} holds no whole write");
        }
    }
    let r = q.check(Repair::None).unwrap();
    assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0), "{:?}", r.messages);
}
