//! Many threads writing at once: disjoint bytes within shared clusters
//! (so two writers race to allocate the same cluster) and disjoint
//! clusters. The result must equal the same writes done one by one, and
//! QEMU must find the image clean.

use crate::support::*;
use oxcow::image::{self, Format, OpenOptions};
use oxcow::qcow2::{self, CreateOptions};

fn run(opts: CreateOptions, backing: bool, name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = opts.size;
    let cs = opts.cluster_size;
    let mut opts = opts;
    let mut model = vec![0u8; size as usize];
    if backing {
        let b: Vec<u8> = (0..size).map(|i| (i / 1000 % 250) as u8 + 1).collect();
        std::fs::write(d.join("base.raw"), &b).unwrap();
        model.copy_from_slice(&b);
        opts.backing_file = Some("base.raw".into());
        opts.backing_format = Some("raw".into());
    }
    let p = d.join("img.qcow2");
    qcow2::create(image::create_file(&p).unwrap(), None, &opts).unwrap();
    let img = image::open(&p, &OpenOptions { format: Some(Format::Qcow2), write: true, ..Default::default() }).unwrap();
    let dev = img.device_arc();
    // Each thread owns every 8th slice of 1/8 cluster; slices of the same
    // cluster belong to different threads.
    let threads = 8u64;
    let slice = (cs / threads).max(512);
    let slices = size / slice;
    std::thread::scope(|s| {
        for t in 0..threads {
            let dev = dev.clone();
            s.spawn(move || {
                let mut rng = Rng(t + 1);
                for k in (t..slices).step_by(threads as usize) {
                    if rng.below(3) == 0 {
                        continue;
                    }
                    let pat = (t * 31 + k % 7) as u8 | 1;
                    dev.write_at(&vec![pat; slice as usize], k * slice).unwrap();
                    if rng.below(16) == 0 {
                        dev.flush().unwrap();
                    }
                }
            });
        }
    });
    // The same writes, serialized, on the model.
    for t in 0..threads {
        let mut rng = Rng(t + 1);
        for k in (t..slices).step_by(threads as usize) {
            if rng.below(3) == 0 {
                continue;
            }
            let pat = (t * 31 + k % 7) as u8 | 1;
            model[(k * slice) as usize..((k + 1) * slice) as usize].fill(pat);
            let _ = rng.below(16);
        }
    }
    let mut got = vec![0u8; size as usize];
    dev.read_at(&mut got, 0).unwrap();
    assert!(got == model, "{name}: concurrent result differs from the serialized one");
    img.close().unwrap();
    drop(dev);
    drop(img);
    assert_checks_clean(&p);
    let m = d.join("model.raw");
    std::fs::write(&m, &model).unwrap();
    assert_same(&p, "qcow2", &m, "raw");
}

#[test]
fn concurrent_writers_equal_serialized() {
    run(CreateOptions { size: 8 << 20, cluster_size: 4096, ..Default::default() }, false, "4k");
    run(CreateOptions { size: 8 << 20, cluster_size: 65536, ..Default::default() }, true, "64k-backing");
    run(CreateOptions { size: 8 << 20, cluster_size: 65536, extended_l2: true, ..Default::default() }, true, "ext");
    run(CreateOptions { size: 8 << 20, cluster_size: 512, refcount_bits: 1, ..Default::default() }, false, "512-rb1");
    run(CreateOptions { size: 8 << 20, lazy_refcounts: true, ..Default::default() }, false, "lazy");
}
