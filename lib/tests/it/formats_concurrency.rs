//! Threads writing one QED, VDI, VPC, VMDK or VHDX image at once, racing to
//! allocate the same blocks: every write lands (read back against a model
//! of the disk), no block is handed out twice, and qemu-img finds the
//! image clean and equal to the model.

use crate::support::{ok, run, s, Dir, Rng};
use oxcow::{BlockDevice, CacheMode, OpenOptions};
use std::path::Path;
use std::sync::Arc;

/// Four threads, each owning every fourth 3 KiB slot, write their slots
/// in random order: neighbouring slots share blocks, grains and clusters,
/// so allocations race, and no two writes overlap (the model is exact).
fn race(path: &Path, fmt: &str, size: u64) -> Vec<u8> {
    race_with(path, fmt, size, 3 << 10, CacheMode::default())
}

/// [`race`] with slots of `slot` bytes, opened in cache mode `cache`.
fn race_with(path: &Path, fmt: &str, size: u64, slot: u64, cache: CacheMode) -> Vec<u8> {
    let opts = OpenOptions::read_write().format(fmt.parse::<oxcow::Format>().unwrap()).cache(cache);
    let img = oxcow::open(path, &opts).unwrap();
    let dev: Arc<dyn BlockDevice> = img.device().clone();
    let slots = size / slot;
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let dev = dev.clone();
            std::thread::spawn(move || {
                let mut rng = Rng::new(t + 1);
                let mut mine: Vec<u64> = (0..slots).filter(|i| i % 4 == t).collect();
                for i in (1..mine.len()).rev() {
                    mine.swap(i, rng.below(i as u64 + 1) as usize);
                }
                for &i in mine.iter().take(300) {
                    let byte = (i % 251) as u8 + 1;
                    dev.write_at(&vec![byte; slot as usize], i * slot).unwrap();
                }
                mine.truncate(300);
                mine
            })
        })
        .collect();
    let mut model = vec![0u8; size as usize];
    for t in threads {
        for i in t.join().unwrap() {
            let o = (i * slot) as usize;
            model[o..o + slot as usize].fill((i % 251) as u8 + 1);
        }
    }
    let mut back = vec![0u8; size as usize];
    dev.read_at(&mut back, 0).unwrap();
    assert!(back == model, "{fmt}: oxcow reads back other data than was written");
    img.close().unwrap();
    model
}

#[test]
fn concurrent_allocating_writes_into_other_formats_all_land() {
    let d = Dir::new();
    let size: u64 = 24 << 20;
    let cases = [
        ("qed", vec!["-o", "cluster_size=4096"]),
        ("qed", vec![]),
        ("vdi", vec![]),
        ("vpc", vec!["-o", "force_size=on"]),
        ("vmdk", vec![]),
        ("vmdk", vec!["-o", "subformat=streamOptimized"]),
        ("vhdx", vec!["-o", "block_size=1M"]),
        ("vhdx", vec!["-o", "subformat=fixed"]),
    ];
    for (i, (fmt, opts)) in cases.iter().enumerate() {
        let p = d.p(&format!("c{i}.{fmt}"));
        let mut args = vec!["create", "-q", "-f", fmt];
        args.extend_from_slice(opts);
        let sz = size.to_string();
        args.extend_from_slice(&[s(&p), &sz]);
        ok("qemu-img", &args);
        let model = race(&p, fmt, size);
        let raw = d.p(&format!("c{i}.raw"));
        std::fs::write(&raw, &model).unwrap();
        if *fmt != "vpc" {
            let (code, out, err) = run("qemu-img", &["check", "-f", fmt, s(&p)]);
            assert_eq!(code, 0, "qemu-img check of {fmt} {opts:?}: {out}{err}");
        }
        let (code, out, err) = run("qemu-img", &["compare", "-f", fmt, "-F", "raw", s(&p), s(&raw)]);
        assert_eq!(code, 0, "{fmt} {opts:?} differs from the model in qemu: {out}{err}");
    }
}

/// QED allocates the run of clusters a write reaches at once: 9 KiB slots
/// over 4 KiB clusters make runs of three racing their neighbours' runs,
/// in every cache mode (O_DIRECT included).
#[test]
fn concurrent_multi_cluster_qed_writes_land_in_every_cache_mode() {
    let d = Dir::new();
    let size: u64 = 8 << 20;
    for (i, cache) in
        [CacheMode::None, CacheMode::Directsync, CacheMode::Writethrough, CacheMode::Writeback, CacheMode::Unsafe]
            .into_iter()
            .enumerate()
    {
        let p = d.p(&format!("m{i}.qed"));
        ok("qemu-img", &["create", "-q", "-f", "qed", "-o", "cluster_size=4096", s(&p), &size.to_string()]);
        let model = race_with(&p, "qed", size, 9 << 10, cache);
        let raw = d.p(&format!("m{i}.raw"));
        std::fs::write(&raw, &model).unwrap();
        let (code, out, err) = run("qemu-img", &["check", "-f", "qed", s(&p)]);
        assert_eq!(code, 0, "qemu-img check, cache {cache:?}: {out}{err}");
        let (code, out, err) = run("qemu-img", &["compare", "-f", "qed", "-F", "raw", s(&p), s(&raw)]);
        assert_eq!(code, 0, "cache {cache:?}: differs from the model in qemu: {out}{err}");
    }
}
