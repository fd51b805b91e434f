//! The engine's writes, checked by QEMU: images oxcow writes must pass
//! `qemu-img check` and read back (through QEMU) exactly like a model.

use crate::support::*;
use oxcow::qcow2::{self, CreateOptions};
use oxcow::{BlockDevice, Format, OpenOptions};
use std::path::Path;
use std::sync::Arc;

fn random_ops(rng: &mut Rng, size: u64, cs: u64, n: usize) -> Vec<Op> {
    (0..n)
        .map(|_| {
            let aligned = rng.below(2) == 0;
            let mut off = rng.below(size);
            let mut len = 1 + rng.below(3 * cs);
            if aligned {
                off = off / cs * cs;
                len = (len / cs).max(1) * cs;
            }
            let len = len.min(size - off).max(1);
            match rng.below(10) {
                0..=4 => Op::Write(off, len, 1 + rng.below(250) as u8),
                5 | 6 => Op::Zero(off, len, rng.below(2) == 0),
                7 | 8 => Op::Discard(off, len),
                _ => Op::Flush,
            }
        })
        .collect()
}

fn apply_dev(dev: &dyn BlockDevice, ops: &[Op]) {
    for &op in ops {
        match op {
            Op::Write(off, len, p) => dev.write_at(&vec![p; len as usize], off).unwrap(),
            Op::Zero(off, len, unmap) => dev.write_zeroes(off, len, unmap).unwrap(),
            Op::Discard(off, len) => dev.discard(off, len).unwrap(),
            Op::Flush => dev.flush().unwrap(),
        }
    }
}

fn run_case(dir: &Path, name: &str, opts: CreateOptions, with_backing: bool, seed: u64) {
    let size = opts.size;
    let cs = opts.cluster_size;
    let img = dir.join(format!("{name}.qcow2"));
    let mut backing = vec![0u8; 0];
    let mut opts = opts;
    if with_backing {
        let b = dir.join(format!("{name}.base.raw"));
        // A shorter backing file: the overlay's tail must read zeros.
        backing = (0..size * 3 / 4).map(|i| (i / 4096 % 200) as u8 + 20).collect();
        std::fs::write(&b, &backing).unwrap();
        opts.backing_file = Some(b.file_name().unwrap().to_str().unwrap().into());
        opts.backing_format = Some("raw".into());
    }
    // QEMU resolves data file names against the working directory.
    if let Some(d) = &opts.data_file {
        opts.data_file = Some(dir.join(d).to_str().unwrap().to_string());
    }
    let data_file = opts.data_file.clone().map(std::path::PathBuf::from);
    let data = data_file.as_ref().map(|p| oxcow::create_file(p).unwrap() as Arc<dyn oxcow::storage::Storage>);
    qcow2::create(oxcow::create_file(&img).unwrap(), data, &opts).unwrap();
    let mut rng = Rng(seed);
    let ops = random_ops(&mut rng, size, cs, 60);
    let mut model = vec![0u8; size as usize];
    model[..backing.len()].copy_from_slice(&backing);
    for &op in &ops {
        apply_model(&mut model, &backing, op, cs, opts.version == 3);
    }
    {
        let im = oxcow::open(&img, &OpenOptions::default().format(Format::Qcow2).write(true)).unwrap();
        apply_dev(im.device(), &ops);
        // Read back through oxcow too.
        let mut back = vec![0u8; size as usize];
        im.device().read_at(&mut back, 0).unwrap();
        assert!(back == model, "{name}: oxcow reads back something else than the model");
        im.close().unwrap();
    }
    check_clean(&img);
    let model_path = dir.join(format!("{name}.model.raw"));
    std::fs::write(&model_path, &model).unwrap();
    assert_same(&img, "qcow2", &model_path, "raw");
}

#[test]
fn random_ops_over_create_matrix() {
    let dir = tempfile::tempdir().unwrap();
    let mut seed = 1;
    let mut case = |name: &str, opts: CreateOptions, backing: bool| {
        seed += 1;
        run_case(dir.path(), name, opts, backing, seed);
    };
    let size = 8 << 20;
    for cs in [512u64, 4096, 65536, 2 << 20] {
        let size = if cs == 2 << 20 { 32 << 20 } else { size };
        for bits in [1u32, 16, 64] {
            case(&format!("cs{cs}-rb{bits}"), CreateOptions::new(size).cluster_size(cs).refcount_bits(bits), false);
        }
        case(&format!("cs{cs}-backing"), CreateOptions::new(size).cluster_size(cs), true);
        case(&format!("cs{cs}-v2"), CreateOptions::new(size).cluster_size(cs).version(2), false);
        case(&format!("cs{cs}-v2-backing"), CreateOptions::new(size).cluster_size(cs).version(2), true);
    }
    for bits in [2u32, 4, 8, 32] {
        case(&format!("rb{bits}"), CreateOptions::new(size).refcount_bits(bits), false);
    }
    case("lazy", CreateOptions::new(size).lazy_refcounts(true), false);
    case("lazy-backing", CreateOptions::new(size).lazy_refcounts(true), true);
    for cs in [16384u64, 65536, 2 << 20] {
        let size = if cs == 2 << 20 { 32 << 20 } else { size };
        case(&format!("ext{cs}"), CreateOptions::new(size).cluster_size(cs).extended_l2(true), false);
        case(&format!("ext{cs}-backing"), CreateOptions::new(size).cluster_size(cs).extended_l2(true), true);
    }
    case("datafile", CreateOptions::new(size).data_file(Some("df.raw".into())), false);
    case("datafile-raw", CreateOptions::new(size).data_file(Some("dfr.raw".into())).data_file_raw(true), false);
}
