//! Replays every input the fuzzers ever crashed on (kept under
//! `fuzz/regressions/<target>/`), plus a few hand-made hostile images.

use oxcow::fuzz_targets;
use std::path::Path;

fn replay(target: &str, f: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions").join(target);
    let mut n = 0;
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let data = std::fs::read(e.path()).unwrap();
            f(&data);
            n += 1;
        }
    }
    n
}

#[test]
fn fuzz_regressions_replay() {
    let mut n = 0;
    n += replay("header", fuzz_targets::header);
    n += replay("open_read", fuzz_targets::open_read);
    n += replay("check", fuzz_targets::check);
    n += replay("ops", fuzz_targets::ops);
    n += replay("formats", fuzz_targets::formats);
    n += replay("bitmaps", fuzz_targets::bitmaps);
    eprintln!("replayed {n} fuzz regression inputs");
}

/// The damaged images of issue 21 (made by `fuzz/make_damaged_regressions.sh`)
/// through every target that takes an image: no acknowledged write lost,
/// no snapshot operation half done, no panic or hang.
#[test]
fn damaged_image_regressions_replay() {
    let mut n = 0;
    for f in [fuzz_targets::damaged, fuzz_targets::open_read, fuzz_targets::check] {
        n += replay("damaged", f);
    }
    assert!(n >= 3 * 24, "damaged regression images missing: replayed {n}");
}

#[test]
fn every_target_survives_trivial_inputs() {
    for data in [&b""[..], b"QFI\xfb", &[0xffu8; 4096][..], &[0u8; 200][..]] {
        fuzz_targets::header(data);
        fuzz_targets::open_read(data);
        fuzz_targets::check(data);
        fuzz_targets::ops(data);
        fuzz_targets::damaged(data);
        fuzz_targets::bitmaps(data);
    }
}

/// The seed corpus of the other formats' parsers (images qemu-img made,
/// a few KiB each) opens and reads without panicking.
#[test]
fn formats_seed_corpus_replays() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/formats");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        fuzz_targets::formats(&std::fs::read(e.path()).unwrap());
        n += 1;
    }
    assert!(n >= 5, "formats corpus missing: {n} inputs");
}

/// The seeds of the `bitmaps` target (QEMU-made images with bitmaps, one
/// of them left in use) through it: they must load and survive.
#[test]
fn bitmaps_seed_corpus_replay() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/bitmaps");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        fuzz_targets::bitmaps(&std::fs::read(e.path()).unwrap());
        n += 1;
    }
    assert!(n >= 2, "bitmaps seed corpus missing: {n}");
}
