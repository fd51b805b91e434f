//! QED, VDI, VPC, VMDK and VHDX images made and filled by QEMU, read by
//! oxcow: the same probe result, info, map, data (convert), compare and
//! measure as qemu-img, on every subformat; and every command that would
//! write one refused with the files left byte-identical.

use crate::support::{json, ok, oxcow, qemu_img, run_in, tmp, Rng, OXCOW};
use std::collections::BTreeMap;
use std::path::Path;

/// One test image: file name, format, qemu-img create options, size.
struct Spec {
    file: &'static str,
    fmt: &'static str,
    opts: &'static str,
    size: &'static str,
}

const SPECS: &[Spec] = &[
    Spec { file: "d.qed", fmt: "qed", opts: "", size: "64M" },
    Spec { file: "c.qed", fmt: "qed", opts: "cluster_size=16384,table_size=2", size: "40M" },
    Spec { file: "d.vdi", fmt: "vdi", opts: "static=off", size: "64M" },
    Spec { file: "s.vdi", fmt: "vdi", opts: "static=on", size: "24M" },
    Spec { file: "d.vpc", fmt: "vpc", opts: "subformat=dynamic", size: "64M" },
    Spec { file: "f.vpc", fmt: "vpc", opts: "subformat=fixed", size: "64M" },
    Spec { file: "ds.vpc", fmt: "vpc", opts: "subformat=dynamic,force_size=on", size: "64M" },
    Spec { file: "fs.vpc", fmt: "vpc", opts: "subformat=fixed,force_size=on", size: "48M" },
    Spec { file: "odd.vpc", fmt: "vpc", opts: "subformat=dynamic", size: "100000256" },
    Spec { file: "ms.vmdk", fmt: "vmdk", opts: "subformat=monolithicSparse", size: "64M" },
    Spec { file: "mz.vmdk", fmt: "vmdk", opts: "subformat=monolithicSparse,zeroed_grain=on", size: "64M" },
    Spec { file: "mf.vmdk", fmt: "vmdk", opts: "subformat=monolithicFlat", size: "64M" },
    Spec { file: "ts.vmdk", fmt: "vmdk", opts: "subformat=twoGbMaxExtentSparse", size: "64M" },
    Spec { file: "tf.vmdk", fmt: "vmdk", opts: "subformat=twoGbMaxExtentFlat", size: "64M" },
    Spec { file: "d.vhdx", fmt: "vhdx", opts: "", size: "64M" },
    Spec { file: "f.vhdx", fmt: "vhdx", opts: "subformat=fixed", size: "40M" },
    Spec { file: "b.vhdx", fmt: "vhdx", opts: "block_size=1M,log_size=1M,block_state_zero=off", size: "64M" },
];

fn create(dir: &Path, s: &Spec) {
    let mut args = vec!["create", "-q", "-f", s.fmt];
    if !s.opts.is_empty() {
        args.extend_from_slice(&["-o", s.opts]);
    }
    args.extend_from_slice(&[s.file, s.size]);
    ok(dir, "qemu-img", &args);
}

/// Random patterns, zero writes and a write at the very end, by qemu-io.
fn fill(dir: &Path, file: &str, fmt: &str, size: u64, rng: &mut Rng) {
    let mut cmds = Vec::new();
    for _ in 0..6 {
        let len = (1 + rng.below(256)) * 512;
        let off = rng.below((size - len) / 512) * 512;
        cmds.push(format!("write -q -P {} {off} {len}", 1 + rng.below(250)));
    }
    let zoff = rng.below((size - (1 << 20)) / 512) * 512;
    cmds.push(format!("write -q -z {zoff} 65536"));
    cmds.push(format!("write -q -P 7 {} 512", size - 512));
    let mut args = vec!["-f", fmt];
    for c in &cmds {
        args.extend_from_slice(&["-c", c]);
    }
    args.push(file);
    ok(dir, "qemu-io", &args);
}

fn virtual_size(dir: &Path, file: &str, fmt: &str) -> u64 {
    let v = json(&ok(dir, "qemu-img", &["info", "-f", fmt, "--output=json", file]).stdout);
    v["virtual-size"].as_u64().expect("virtual size")
}

/// Everything qemu-img says about an image, oxcow says the same way.
fn assert_reads_as_qemu(dir: &Path, file: &str, fmt: &str) {
    for out in ["--output=json", "--output=human"] {
        let args = ["info", "-f", fmt, out, file];
        assert_eq!(ok(dir, OXCOW, &args).stdout, ok(dir, "qemu-img", &args).stdout, "info {out} of {file}");
        let args = ["map", "-f", fmt, out, file];
        let (a, b) = (oxcow(dir, &args), qemu_img(dir, &args));
        assert_eq!((a.code, a.stdout), (b.code, b.stdout), "map {out} of {file}");
    }
    let args = ["measure", "-f", fmt, "-O", "qcow2", file];
    assert_eq!(ok(dir, OXCOW, &args).stdout, ok(dir, "qemu-img", &args).stdout, "measure of {file}");
    let (ours, theirs) = (format!("{file}.ox.raw"), format!("{file}.q.raw"));
    ok(dir, OXCOW, &["convert", "-f", fmt, "-O", "raw", file, &ours]);
    ok(dir, "qemu-img", &["convert", "-f", fmt, "-O", "raw", file, &theirs]);
    let (a, b) = (std::fs::read(dir.join(&ours)).unwrap(), std::fs::read(dir.join(&theirs)).unwrap());
    assert_eq!(a.len(), b.len(), "converted size of {file}");
    assert!(a == b, "converted data of {file} differs from qemu-img's");
    let r = ok(dir, OXCOW, &["compare", "-f", fmt, "-F", "raw", file, &theirs]);
    assert_eq!(r.stdout, "Images are identical.\n", "compare of {file}");
    std::fs::remove_file(dir.join(ours)).ok();
    std::fs::remove_file(dir.join(theirs)).ok();
}

#[test]
fn every_subformat_qemu_makes_reads_as_qemu_reads_it() {
    let d = tmp();
    let dir = d.path();
    let mut rng = Rng::new(0x000f_0e14);
    for s in SPECS {
        create(dir, s);
        let size = virtual_size(dir, s.file, s.fmt);
        fill(dir, s.file, s.fmt, size, &mut rng);
        assert_reads_as_qemu(dir, s.file, s.fmt);
    }
}

#[test]
fn stream_optimized_vmdk_reads_as_qemu_reads_it() {
    let d = tmp();
    let dir = d.path();
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "src.qcow2", "32M"]);
    fill(dir, "src.qcow2", "qcow2", 32 << 20, &mut Rng::new(7));
    ok(dir, "qemu-img", &["convert", "-O", "vmdk", "-o", "subformat=streamOptimized", "src.qcow2", "so.vmdk"]);
    assert_reads_as_qemu(dir, "so.vmdk", "vmdk");
}

#[test]
fn descriptor_with_several_extents_reads_as_qemu_reads_it() {
    let d = tmp();
    let dir = d.path();
    // Three 2 GiB-bounded extents, flat and sparse, as qemu-img makes them.
    for (f, sub) in [("tf.vmdk", "twoGbMaxExtentFlat"), ("ts.vmdk", "twoGbMaxExtentSparse")] {
        ok(dir, "qemu-img", &["create", "-q", "-f", "vmdk", "-o", &format!("subformat={sub}"), f, "5G"]);
        let cmds = ["write -q -P 1 0 4096", "write -q -P 2 2147479552 8192", "write -q -P 3 5368705024 4096"];
        let mut args = vec!["-f", "vmdk"];
        for c in &cmds {
            args.extend_from_slice(&["-c", c]);
        }
        args.push(f);
        ok(dir, "qemu-io", &args);
        for out in ["--output=json", "--output=human"] {
            let args = ["info", out, f];
            assert_eq!(ok(dir, OXCOW, &args).stdout, ok(dir, "qemu-img", &args).stdout, "info {out} of {f}");
        }
        let args = ["map", "--output=json", f];
        assert_eq!(ok(dir, OXCOW, &args).stdout, ok(dir, "qemu-img", &args).stdout, "map of {f}");
        let r = run_in(dir, "qemu-io", &["-r", "-f", "vmdk", "-c", "read -P 2 2147479552 8192", f]);
        assert_eq!(r.code, 0);
        let r = oxcow(dir, &["io", "-r", "-c", "read -P 2 2147479552 8192", "-c", "read -P 3 5368705024 4096", f]);
        assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
        assert!(!r.stdout.contains("failed"), "{}", r.stdout);
    }
}

#[test]
fn backing_chains_of_qed_and_vmdk_read_as_qemu_reads_them() {
    let d = tmp();
    let dir = d.path();
    ok(dir, "qemu-img", &["create", "-q", "-f", "raw", "base.raw", "32M"]);
    fill(dir, "base.raw", "raw", 32 << 20, &mut Rng::new(1));
    ok(dir, "qemu-img", &["create", "-q", "-f", "qed", "-b", "base.raw", "-F", "raw", "top.qed"]);
    fill(dir, "top.qed", "qed", 32 << 20, &mut Rng::new(2));
    assert_reads_as_qemu(dir, "top.qed", "qed");
    ok(dir, "qemu-img", &["create", "-q", "-f", "vmdk", "base.vmdk", "32M"]);
    fill(dir, "base.vmdk", "vmdk", 32 << 20, &mut Rng::new(3));
    ok(dir, "qemu-img", &["create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", "child.vmdk"]);
    fill(dir, "child.vmdk", "vmdk", 32 << 20, &mut Rng::new(4));
    assert_reads_as_qemu(dir, "child.vmdk", "vmdk");
    let args = ["info", "--backing-chain", "--output=json", "child.vmdk"];
    assert_eq!(ok(dir, OXCOW, &args).stdout, ok(dir, "qemu-img", &args).stdout);
}

#[test]
fn vpc_virtual_size_follows_qemus_geometry_and_force_size_rules() {
    let d = tmp();
    let dir = d.path();
    let sizes = ["1M", "10000000", "1G", "127G", "1000G", "2040G"];
    for (i, size) in sizes.iter().enumerate() {
        for force in ["off", "on"] {
            let f = format!("v{i}-{force}.vpc");
            let o = format!("subformat=dynamic,force_size={force}");
            ok(dir, "qemu-img", &["create", "-q", "-f", "vpc", "-o", &o, &f, size]);
            let args = ["info", "--output=json", &f];
            assert_eq!(ok(dir, OXCOW, &args).stdout, ok(dir, "qemu-img", &args).stdout, "{f} of {size}");
        }
    }
}

#[test]
fn every_format_probes_as_qemu_probes_it() {
    let d = tmp();
    let dir = d.path();
    for s in SPECS {
        create(dir, s);
        let theirs = json(&ok(dir, "qemu-img", &["info", "--output=json", s.file]).stdout);
        let ours = json(&ok(dir, OXCOW, &["info", "--output=json", s.file]).stdout);
        // A fixed VHD has its footer only at the end: QEMU probes it as raw.
        assert_eq!(ours["format"], theirs["format"], "probed format of {}", s.file);
    }
    // A LUKS header is recognised, as QEMU recognises it: a broken one is
    // an error, never a raw image.
    let mut luks = b"LUKS\xba\xbe\x00\x01".to_vec();
    luks.resize(4096, 0);
    std::fs::write(dir.join("l.img"), &luks).unwrap();
    let r = oxcow(dir, &["info", "l.img"]);
    assert_eq!(r.code, 1);
    assert!(!r.stdout.contains("raw") && !r.stderr.is_empty(), "{} {}", r.stdout, r.stderr);
    // qemu's warning on writable probed raw images, where qemu prints it.
    std::fs::write(dir.join("p.raw"), vec![0u8; 65536]).unwrap();
    let q = run_in(dir, "qemu-io", &["-c", "write -q 4096 512", "p.raw"]);
    let o = oxcow(dir, &["io", "-c", "write -q 4096 512", "p.raw"]);
    assert!(q.stderr.contains("probing guessed raw"), "{}", q.stderr);
    assert_eq!(o.stderr, q.stderr);
    let o = oxcow(dir, &["io", "-r", "-c", "read -q 0 512", "p.raw"]);
    assert_eq!(o.stderr, "");
}

fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect()
}

#[test]
fn what_the_other_formats_cannot_do_is_refused_as_qemu_img_refuses_it_and_changes_no_byte() {
    let d = tmp();
    let dir = d.path();
    for s in SPECS {
        create(dir, s);
    }
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "src.qcow2", "1M"]);
    let before = snapshot(dir);
    let strip = |s: &str| s.lines().map(|l| l.splitn(2, ": ").last().unwrap_or("").to_string()).collect::<Vec<_>>();
    for s in SPECS {
        let (f, fmt) = (s.file, s.fmt);
        let mut cmds: Vec<Vec<&str>> = vec![
            vec!["commit", "-f", fmt, f],
            vec!["snapshot", "-c", "s1", f],
            vec!["snapshot", "-l", f],
            vec!["amend", "-f", fmt, "-o", "size=1G", f],
        ];
        if fmt != "qed" {
            cmds.push(vec!["resize", "-f", fmt, f, "128M"]);
        }
        if fmt == "vpc" || fmt == "vdi" || fmt == "vmdk" {
            cmds.push(vec!["check", "-r", "all", "-f", fmt, f]);
        }
        for c in &cmds {
            let (o, q) = (oxcow(dir, c), qemu_img(dir, c));
            assert_eq!((o.code, &o.stdout), (q.code, &q.stdout), "{c:?}: {}", o.stderr);
            assert_eq!(strip(&o.stderr), strip(&q.stderr), "{c:?}");
        }
    }
    let after = snapshot(dir);
    assert_eq!(before.keys().collect::<Vec<_>>(), after.keys().collect::<Vec<_>>());
    for (name, bytes) in &before {
        assert!(after[name] == *bytes, "{name} changed");
    }
}

#[test]
fn hostile_headers_of_every_format_are_refused_with_an_error() {
    let d = tmp();
    let dir = d.path();
    let mut rng = Rng::new(99);
    for s in SPECS {
        create(dir, s);
        let good = std::fs::read(dir.join(s.file)).unwrap();
        // Flip bytes in the first 256 KiB (headers, tables, descriptors):
        // any outcome but a panic or a hang is fine.
        for _ in 0..20 {
            let mut bad = good.clone();
            let span = bad.len().min(256 << 10) as u64;
            for _ in 0..8 {
                let i = rng.below(span) as usize;
                bad[i] = rng.next_u64() as u8;
            }
            std::fs::write(dir.join("h.img"), &bad).unwrap();
            for c in [vec!["info", "-f", s.fmt, "h.img"], vec!["io", "-r", "-f", s.fmt, "-c", "read -q 0 1M", "h.img"]]
            {
                let r = oxcow(dir, &c);
                assert!(r.code == 0 || r.code == 1, "oxcow {c:?} on damaged {}: {}{}", s.file, r.code, r.stderr);
                assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
            }
        }
    }
}

/// Points both VHDX headers at log GUID `guid` (checksums redone) and,
/// when `entry`, writes one valid, empty log entry of that log.
fn vhdx_with_log(path: &Path, guid: [u8; 16], entry: bool) {
    use oxcow::formats::vhdx::crc32c;
    let mut b = std::fs::read(path).unwrap();
    let le32 = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    for off in [64 << 10, 128 << 10] {
        let h = &mut b[off..off + 4096];
        h[48..64].copy_from_slice(&guid);
        h[4..8].fill(0);
        let c = crc32c(h);
        h[4..8].copy_from_slice(&c.to_le_bytes());
    }
    if entry {
        let log_off = u64::from_le_bytes(b[(64 << 10) + 72..(64 << 10) + 80].try_into().unwrap()) as usize;
        let len = b.len() as u64;
        let e = &mut b[log_off..log_off + 4096];
        e.fill(0);
        e[..4].copy_from_slice(b"loge");
        e[8..12].copy_from_slice(&4096u32.to_le_bytes());
        e[16..24].copy_from_slice(&1u64.to_le_bytes());
        e[32..48].copy_from_slice(&guid);
        e[48..56].copy_from_slice(&len.to_le_bytes());
        e[56..64].copy_from_slice(&len.to_le_bytes());
        let c = crc32c(e);
        e[4..8].copy_from_slice(&c.to_le_bytes());
        assert_eq!(le32(e, 4), c);
    }
    std::fs::write(path, b).unwrap();
}

#[test]
fn vhdx_with_a_log_to_replay_is_refused_read_only_as_qemu_refuses_it() {
    let d = tmp();
    let dir = d.path();
    ok(dir, "qemu-img", &["create", "-q", "-f", "vhdx", "l.vhdx", "16M"]);
    fill(dir, "l.vhdx", "vhdx", 16 << 20, &mut Rng::new(5));
    let guid: [u8; 16] = std::array::from_fn(|i| i as u8 + 1);
    // A log GUID with no entry of that log behind it: nothing to replay.
    vhdx_with_log(&dir.join("l.vhdx"), guid, false);
    assert_reads_as_qemu(dir, "l.vhdx", "vhdx");
    vhdx_with_log(&dir.join("l.vhdx"), guid, true);
    let q = qemu_img(dir, &["info", "l.vhdx"]);
    assert_eq!(q.code, 1);
    let o = oxcow(dir, &["info", "l.vhdx"]);
    assert_eq!(o.code, 1);
    let want = "VHDX image file 'l.vhdx' opened read-only, but contains a log that needs to be replayed";
    assert!(q.stderr.contains(want), "{}", q.stderr);
    assert!(o.stderr.contains(want), "{}", o.stderr);
}

/// The same writes through oxcow into an image of `fmt` and through
/// qemu-io into a raw file: the images compare equal, and qemu-img check
/// finds nothing.
fn assert_writes_as_qemu(dir: &Path, file: &str, fmt: &str, size: u64, seed: u64) {
    assert_writes_as_qemu_unchecked(dir, file, fmt, size, seed);
    let r = ok(dir, "qemu-img", &["check", "-f", fmt, file]);
    assert!(r.stdout.contains("No errors were found"), "{}", r.stdout);
}

/// [`assert_writes_as_qemu`] for formats qemu-img does not check (VPC).
fn assert_writes_as_qemu_unchecked(dir: &Path, file: &str, fmt: &str, size: u64, seed: u64) {
    let raw = format!("{file}.raw");
    ok(dir, "qemu-img", &["create", "-q", "-f", "raw", &raw, &size.to_string()]);
    let mut rng = Rng::new(seed);
    let mut cmds = Vec::new();
    for i in 0..24 {
        let len = 1 + rng.below(3 << 20);
        let off = rng.below(size - len);
        cmds.push(match i % 4 {
            3 => format!("write -q -z {off} {len}"),
            _ => format!("write -q -P {} {off} {len}", 1 + rng.below(250)),
        });
    }
    let run = |prog: &str, f: &str, fmt: &str| {
        let mut args = vec!["-f", fmt];
        for c in &cmds {
            args.extend_from_slice(&["-c", c]);
        }
        args.push(f);
        match prog {
            "oxcow" => ok(dir, OXCOW, &[&["io"], &args[..]].concat()),
            _ => ok(dir, "qemu-io", &args),
        };
    };
    run("oxcow", file, fmt);
    run("qemu-io", &raw, "raw");
    ok(dir, "qemu-img", &["compare", "-f", fmt, "-F", "raw", file, &raw]);
}

#[test]
fn vdi_images_oxcow_creates_and_writes_check_clean_and_read_back_in_qemu() {
    let d = tmp();
    let dir = d.path();
    for (f, opts, size) in [("d.vdi", "static=off", 24u64 << 20), ("s.vdi", "static=on", (16 << 20) + 4096 + 7)] {
        let o = ok(dir, OXCOW, &["create", "-f", "vdi", "-o", opts, f, &size.to_string()]);
        let q = ok(dir, "qemu-img", &["create", "-f", "vdi", "-o", opts, "q.vdi", &size.to_string()]);
        assert_eq!(o.stdout.replace(f, "q.vdi"), q.stdout);
        // The same header and block map as qemu-img's, UUIDs aside.
        let (a, b) = (std::fs::read(dir.join(f)).unwrap(), std::fs::read(dir.join("q.vdi")).unwrap());
        assert_eq!((a.len(), &a[..392], &a[424..]), (b.len(), &b[..392], &b[424..]), "{f} as created");
        assert_writes_as_qemu(dir, f, "vdi", size.div_ceil(512) * 512, size);
        assert_reads_as_qemu(dir, f, "vdi");
    }
    // convert -O vdi from a qcow2 with data: what qemu-img convert makes.
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "src.qcow2", "20M"]);
    fill(dir, "src.qcow2", "qcow2", 20 << 20, &mut Rng::new(11));
    ok(dir, OXCOW, &["convert", "-O", "vdi", "src.qcow2", "c.vdi"]);
    ok(dir, "qemu-img", &["convert", "-O", "vdi", "src.qcow2", "cq.vdi"]);
    ok(dir, "qemu-img", &["compare", "src.qcow2", "c.vdi"]);
    let r = ok(dir, "qemu-img", &["check", "c.vdi"]);
    assert!(r.stdout.contains("No errors were found"), "{}", r.stdout);
    let len = |f: &str| std::fs::metadata(dir.join(f)).unwrap().len();
    assert_eq!(len("c.vdi"), len("cq.vdi"), "converted VDI allocates what qemu-img's does");
    // Resizing: refused as qemu-img refuses it, the image untouched.
    let before = std::fs::read(dir.join("c.vdi")).unwrap();
    let (o, q) = (oxcow(dir, &["resize", "c.vdi", "64M"]), qemu_img(dir, &["resize", "c.vdi", "64M"]));
    assert_eq!((o.code, q.code), (1, 1));
    assert!(o.stderr.contains("Image format driver does not support resize"), "{}", o.stderr);
    assert!(std::fs::read(dir.join("c.vdi")).unwrap() == before);
}

#[test]
fn vpc_images_oxcow_creates_and_writes_check_clean_and_read_back_in_qemu() {
    let d = tmp();
    let dir = d.path();
    // Footers equal qemu-img's but for the time stamp, checksum and UUID.
    let masked = |b: &[u8]| {
        let mut b = b.to_vec();
        let n = b.len();
        for at in [0, n - 512] {
            if &b[at..at + 8] == b"conectix" {
                b[at + 24..at + 28].fill(0);
                b[at + 64..at + 84].fill(0);
            }
        }
        b
    };
    let cases = [
        ("d.vpc", "subformat=dynamic", 24u64 << 20),
        ("df.vpc", "subformat=dynamic,force_size=on", 20 << 20),
        ("odd.vpc", "subformat=dynamic", 10_000_001),
        ("f.vpc", "subformat=fixed", 12 << 20),
        ("ff.vpc", "subformat=fixed,force_size=on", 9 << 20),
    ];
    for (f, opts, size) in cases {
        let o = ok(dir, OXCOW, &["create", "-f", "vpc", "-o", opts, f, &size.to_string()]);
        let q = ok(dir, "qemu-img", &["create", "-f", "vpc", "-o", opts, "q.vpc", &size.to_string()]);
        assert_eq!(o.stdout.replace(f, "q.vpc"), q.stdout);
        let (a, b) = (std::fs::read(dir.join(f)).unwrap(), std::fs::read(dir.join("q.vpc")).unwrap());
        assert!(masked(&a) == masked(&b), "{f} as created differs from qemu-img's");
        let vsize = virtual_size(dir, f, "vpc");
        assert_writes_as_qemu_unchecked(dir, f, "vpc", vsize, size);
        assert_reads_as_qemu(dir, f, "vpc");
    }
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "src.qcow2", "20M"]);
    fill(dir, "src.qcow2", "qcow2", 20 << 20, &mut Rng::new(12));
    for sub in ["dynamic", "fixed"] {
        let o = format!("subformat={sub}");
        ok(dir, OXCOW, &["convert", "-O", "vpc", "-o", &o, "src.qcow2", "c.vpc"]);
        ok(dir, "qemu-img", &["convert", "-O", "vpc", "-o", &o, "src.qcow2", "cq.vpc"]);
        ok(dir, "qemu-img", &["compare", "-f", "vpc", "-F", "vpc", "c.vpc", "cq.vpc"]);
        let len = |f: &str| std::fs::metadata(dir.join(f)).unwrap().len();
        assert_eq!(len("c.vpc"), len("cq.vpc"), "converted {sub} VPC is the size of qemu-img's");
    }
}

#[test]
fn qed_images_oxcow_creates_and_writes_check_clean_and_read_back_in_qemu() {
    let d = tmp();
    let dir = d.path();
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "base.qcow2", "40M"]);
    fill(dir, "base.qcow2", "qcow2", 40 << 20, &mut Rng::new(21));
    let cases: [(&str, &[&str], u64); 4] = [
        ("p.qed", &[], 24 << 20),
        ("c.qed", &["-o", "cluster_size=16k,table_size=2"], 10_000_001),
        // 4 MiB per L2 table: multi-cluster writes cross tables.
        ("t.qed", &["-o", "cluster_size=4k,table_size=2"], 9 << 20),
        ("b.qed", &["-b", "base.qcow2", "-F", "qcow2"], 40 << 20),
    ];
    for (f, extra, size) in cases {
        let sz = size.to_string();
        let mut a = vec!["create", "-f", "qed"];
        a.extend_from_slice(extra);
        let (mut o, mut q) = (a.clone(), a);
        o.extend_from_slice(&[f, &sz]);
        q.extend_from_slice(&["q.qed", &sz]);
        let (ro, rq) = (ok(dir, OXCOW, &o), ok(dir, "qemu-img", &q));
        assert_eq!(ro.stdout.replace(f, "q.qed"), rq.stdout);
        assert!(std::fs::read(dir.join(f)).unwrap() == std::fs::read(dir.join("q.qed")).unwrap(), "{f} as created");
        if extra.contains(&"-b") {
            // Copy-on-write from the backing file: the same writes through
            // qemu-io into qemu-img's twin give the same disk.
            let cmds = [
                "write -q -P 3 1000 70000",
                "write -q -z 3000000 5000",
                "write -q -P 4 41942528 512",
                // Many clusters at once, copy-on-write at both ends.
                "write -q -P 5 262000 900000",
            ];
            let run = |prog: &str, file: &str| {
                let mut args: Vec<&str> = if prog == OXCOW { vec!["io"] } else { vec![] };
                for c in &cmds {
                    args.extend_from_slice(&["-c", c]);
                }
                args.push(file);
                ok(dir, prog, &args);
            };
            run(OXCOW, f);
            run("qemu-io", "q.qed");
            ok(dir, "qemu-img", &["compare", f, "q.qed"]);
            let r = ok(dir, "qemu-img", &["check", f]);
            assert!(r.stdout.contains("No errors were found"), "{}", r.stdout);
        } else {
            assert_writes_as_qemu(dir, f, "qed", size.div_ceil(512) * 512, size);
        }
        assert_reads_as_qemu(dir, f, "qed");
    }
    ok(dir, OXCOW, &["convert", "-O", "qed", "base.qcow2", "cv.qed"]);
    ok(dir, "qemu-img", &["convert", "-O", "qed", "base.qcow2", "cvq.qed"]);
    ok(dir, "qemu-img", &["compare", "base.qcow2", "cv.qed"]);
    let len = |f: &str| std::fs::metadata(dir.join(f)).unwrap().len();
    assert_eq!(len("cv.qed"), len("cvq.qed"));
}

#[test]
fn qed_left_with_need_check_is_repaired_when_opened_for_writing() {
    let d = tmp();
    let dir = d.path();
    ok(dir, OXCOW, &["create", "-q", "-f", "qed", "n.qed", "8M"]);
    ok(dir, OXCOW, &["io", "-c", "write -q -P 1 0 64k", "-c", "write -q -P 2 4M 64k", "n.qed"]);
    let mut b = std::fs::read(dir.join("n.qed")).unwrap();
    assert_eq!(b[16] & 2, 0, "a clean close clears the need-check bit");
    // An interrupted run: need-check set, and an L2 entry pointing past
    // the end of the file (a cluster that never reached the disk).
    b[16] |= 2;
    let l1 = u64::from_le_bytes(b[40..48].try_into().unwrap()) as usize;
    let l2 = u64::from_le_bytes(b[l1..l1 + 8].try_into().unwrap()) as usize;
    let past = (b.len() as u64 + (1 << 20)).to_le_bytes();
    b[l2 + 8 * 100..l2 + 8 * 100 + 8].copy_from_slice(&past);
    std::fs::write(dir.join("n.qed"), &b).unwrap();
    for out in ["--output=json", "--output=human"] {
        let args = ["info", out, "n.qed"];
        assert_eq!(ok(dir, OXCOW, &args).stdout, ok(dir, "qemu-img", &args).stdout, "info {out} of a dirty QED");
    }
    ok(dir, OXCOW, &["io", "-c", "write -q -P 3 1M 4k", "n.qed"]);
    let r = ok(dir, "qemu-img", &["check", "n.qed"]);
    assert!(r.stdout.contains("No errors were found"), "{}", r.stdout);
    let reads = ["read -P 1 0 64k", "read -P 2 4M 64k", "read -P 3 1M 4k", "read -P 0 6553600 64k"];
    let mut args = vec!["-r"];
    for c in &reads {
        args.extend_from_slice(&["-c", c]);
    }
    args.push("n.qed");
    let r = run_in(dir, "qemu-io", &args);
    assert!(!r.stdout.contains("failed"), "{}", r.stdout);
    assert_eq!(std::fs::read(dir.join("n.qed")).unwrap()[16] & 2, 0);
}

#[test]
fn vmdk_images_oxcow_creates_and_writes_check_clean_and_read_back_in_qemu() {
    let d = tmp();
    let dir = d.path();
    for (f, size) in [("m.vmdk", 24u64 << 20), ("odd.vmdk", 70_000_001)] {
        let o = ok(dir, OXCOW, &["create", "-f", "vmdk", f, &size.to_string()]);
        let q = ok(dir, "qemu-img", &["create", "-f", "vmdk", "q.vmdk", &size.to_string()]);
        assert_eq!(o.stdout.replace(f, "q.vmdk"), q.stdout);
        // Header and tables as qemu-img's; the descriptor differs only in
        // its random CID and the file's own name.
        let (a, b) = (std::fs::read(dir.join(f)).unwrap(), std::fs::read(dir.join("q.vmdk")).unwrap());
        assert_eq!((a.len(), &a[..512], &a[21 * 512..]), (b.len(), &b[..512], &b[21 * 512..]), "{f} as created");
        let desc = |x: &[u8]| {
            String::from_utf8_lossy(&x[512..21 * 512])
                .trim_end_matches('\0')
                .lines()
                .filter(|l| !l.starts_with("CID="))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(desc(&a).replace(f, "q.vmdk"), desc(&b));
        assert_writes_as_qemu(dir, f, "vmdk", size.div_ceil(512) * 512, size);
        assert_reads_as_qemu(dir, f, "vmdk");
    }
    // Writes into images qemu-img made, with a parent: copy-on-write.
    ok(dir, "qemu-img", &["create", "-q", "-f", "vmdk", "base.vmdk", "16M"]);
    fill(dir, "base.vmdk", "vmdk", 16 << 20, &mut Rng::new(31));
    for f in ["c1.vmdk", "c2.vmdk"] {
        ok(dir, "qemu-img", &["create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", f]);
    }
    let cmds = ["write -q -P 3 1000 70000", "write -q -z 3000000 5000", "write -q -P 4 16776704 512"];
    for (prog, f) in [(OXCOW, "c1.vmdk"), ("qemu-io", "c2.vmdk")] {
        let mut args: Vec<&str> = if prog == OXCOW { vec!["io"] } else { vec![] };
        for c in &cmds {
            args.extend_from_slice(&["-c", c]);
        }
        args.push(f);
        ok(dir, prog, &args);
    }
    ok(dir, "qemu-img", &["compare", "c1.vmdk", "c2.vmdk"]);
    let r = ok(dir, "qemu-img", &["check", "c1.vmdk"]);
    assert!(r.stdout.contains("No errors were found"), "{}", r.stdout);
    // Flat extents are written in place.
    ok(dir, "qemu-img", &["create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentFlat", "tf.vmdk", "8M"]);
    assert_writes_as_qemu_unchecked(dir, "tf.vmdk", "vmdk", 8 << 20, 5);
    // convert -O vmdk: what qemu-img convert makes.
    ok(dir, OXCOW, &["convert", "-O", "vmdk", "base.vmdk", "cv.vmdk"]);
    ok(dir, "qemu-img", &["convert", "-O", "vmdk", "base.vmdk", "cvq.vmdk"]);
    ok(dir, "qemu-img", &["compare", "base.vmdk", "cv.vmdk"]);
    let len = |f: &str| std::fs::metadata(dir.join(f)).unwrap().len();
    assert_eq!(len("cv.vmdk"), len("cvq.vmdk"));
}

#[test]
fn stream_optimized_vmdk_oxcow_writes_checks_clean_and_reads_back_in_qemu() {
    let d = tmp();
    let dir = d.path();
    let o = ok(dir, OXCOW, &["create", "-f", "vmdk", "-o", "subformat=streamOptimized", "s.vmdk", "24M"]);
    let q = ok(dir, "qemu-img", &["create", "-f", "vmdk", "-o", "subformat=streamOptimized", "q.vmdk", "24M"]);
    assert_eq!(o.stdout.replace("s.vmdk", "q.vmdk"), q.stdout);
    let (a, b) = (std::fs::read(dir.join("s.vmdk")).unwrap(), std::fs::read(dir.join("q.vmdk")).unwrap());
    assert_eq!((a.len(), &a[..512], &a[21 * 512..]), (b.len(), &b[..512], &b[21 * 512..]), "as created");
    // Random writes, partial grains rewritten: each rewrite appends a new
    // compressed grain and repoints the table.
    assert_writes_as_qemu(dir, "s.vmdk", "vmdk", 24 << 20, 41);
    assert_reads_as_qemu(dir, "s.vmdk", "vmdk");
    // The OVA export path: convert -O vmdk -o subformat=streamOptimized.
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "src.qcow2", "32M"]);
    fill(dir, "src.qcow2", "qcow2", 32 << 20, &mut Rng::new(42));
    ok(dir, OXCOW, &["convert", "-O", "vmdk", "-o", "subformat=streamOptimized", "src.qcow2", "out.vmdk"]);
    ok(dir, "qemu-img", &["compare", "src.qcow2", "out.vmdk"]);
    let r = ok(dir, "qemu-img", &["check", "out.vmdk"]);
    assert!(r.stdout.contains("No errors were found"), "{}", r.stdout);
    let info = json(&ok(dir, "qemu-img", &["info", "--output=json", "out.vmdk"]).stdout);
    assert_eq!(info["format-specific"]["data"]["create-type"], "streamOptimized");
    // The stream ends with an end-of-stream marker.
    let out = std::fs::read(dir.join("out.vmdk")).unwrap();
    assert!(out[out.len() - 512..].iter().all(|&x| x == 0));
}

fn assert_check_as_qemu(dir: &Path, file: &str, fmt: &str) {
    for out in ["--output=human", "--output=json"] {
        let args = ["check", "-f", fmt, out, file];
        let (o, q) = (oxcow(dir, &args), qemu_img(dir, &args));
        assert_eq!((o.code, &o.stdout), (q.code, &q.stdout), "check {out} of {file}: {}", o.stderr);
        let strip = |s: &str| s.lines().map(|l| l.splitn(2, ": ").last().unwrap_or("").to_string()).collect::<Vec<_>>();
        assert_eq!(strip(&o.stderr), strip(&q.stderr), "check {out} of {file}: messages");
    }
}

/// `check -r MODE` by oxcow and by qemu-img on two copies of `file`: the
/// same output, exit code and messages, and images that read the same
/// afterwards (QED's repairs are deterministic: the same bytes).
fn assert_repair_as_qemu(dir: &Path, file: &str, fmt: &str, mode: &str) {
    for out in ["--output=human", "--output=json"] {
        let (o, q) = (format!("o_{file}"), format!("q_{file}"));
        std::fs::copy(dir.join(file), dir.join(&o)).unwrap();
        std::fs::copy(dir.join(file), dir.join(&q)).unwrap();
        let ro = oxcow(dir, &["check", "-r", mode, "-f", fmt, out, &o]);
        let rq = qemu_img(dir, &["check", "-r", mode, "-f", fmt, out, &q]);
        let what = format!("check -r {mode} {out} of {file}");
        assert_eq!(
            (ro.code, ro.stdout.replace(&o, file)),
            (rq.code, rq.stdout.replace(&q, file)),
            "{what}: {}",
            ro.stderr
        );
        let strip = |s: &str| s.lines().map(|l| l.splitn(2, ": ").last().unwrap_or("").to_string()).collect::<Vec<_>>();
        assert_eq!(strip(&ro.stderr), strip(&rq.stderr), "{what}: messages");
        if fmt == "qed" {
            assert!(std::fs::read(dir.join(&o)).unwrap() == std::fs::read(dir.join(&q)).unwrap(), "{what}: bytes");
        } else if rq.code == 0 {
            ok(dir, "qemu-img", &["compare", "-f", fmt, "-F", fmt, &o, &q]);
        }
    }
}

#[test]
fn check_repair_of_the_other_formats_does_what_qemu_img_does() {
    let d = tmp();
    let dir = d.path();
    let mut rng = Rng::new(78);
    for s in SPECS {
        create(dir, s);
        let size = virtual_size(dir, s.file, s.fmt);
        fill(dir, s.file, s.fmt, size, &mut rng);
        assert_repair_as_qemu(dir, s.file, s.fmt, "all");
    }
    // QED tables pointing out of the file or off a cluster boundary are
    // cleared by any -r mode; the clusters they pointed to stay leaked.
    let b = std::fs::read(dir.join("d.qed")).unwrap();
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap()) as usize;
    let l1 = u64_at(&b, 40);
    let l1e = (0..64).map(|i| l1 + 8 * i).find(|&e| u64_at(&b, e) != 0).unwrap();
    let l2 = u64_at(&b, l1e);
    let l2e = (0..8192).map(|i| l2 + 8 * i).find(|&e| u64_at(&b, e) > 1).unwrap();
    for (name, at, v) in
        [("l1.qed", l1e, 1u64 << 40), ("l2.qed", l2e, 1 << 40), ("odd.qed", l2e, u64_at(&b, l2e) as u64 + 1)]
    {
        let mut bad = b.clone();
        bad[at..at + 8].copy_from_slice(&v.to_le_bytes());
        std::fs::write(dir.join(name), &bad).unwrap();
        assert_check_as_qemu(dir, name, "qed");
        assert_repair_as_qemu(dir, name, "qed", "all");
        assert_repair_as_qemu(dir, name, "qed", "leaks");
    }
    // A VHDX file cut short: its blocks past the end are reported, not
    // repaired.
    let b = std::fs::read(dir.join("b.vhdx")).unwrap();
    std::fs::write(dir.join("cut.vhdx"), &b[..b.len() - (2 << 20)]).unwrap();
    assert_check_as_qemu(dir, "cut.vhdx", "vhdx");
    assert_repair_as_qemu(dir, "cut.vhdx", "vhdx", "all");
}

#[test]
fn check_of_the_other_formats_says_what_qemu_img_says() {
    let d = tmp();
    let dir = d.path();
    let mut rng = Rng::new(77);
    for s in SPECS {
        create(dir, s);
        let size = virtual_size(dir, s.file, s.fmt);
        fill(dir, s.file, s.fmt, size, &mut rng);
        assert_check_as_qemu(dir, s.file, s.fmt);
    }
    // A VDI block mapped twice.
    let mut b = std::fs::read(dir.join("d.vdi")).unwrap();
    let bmap = u32::from_le_bytes(b[340..344].try_into().unwrap()) as usize;
    let entries: Vec<u32> =
        (0..64).map(|i| u32::from_le_bytes(b[bmap + 4 * i..bmap + 4 * i + 4].try_into().unwrap())).collect();
    let used: Vec<usize> = (0..64).filter(|&i| entries[i] < 0xffff_fffe).collect();
    b[bmap + 4 * used[1]..bmap + 4 * used[1] + 4].copy_from_slice(&entries[used[0]].to_le_bytes());
    std::fs::write(dir.join("dup.vdi"), &b).unwrap();
    assert_check_as_qemu(dir, "dup.vdi", "vdi");
    // A QED file with a cluster nobody points to.
    let mut b = std::fs::read(dir.join("d.qed")).unwrap();
    b.extend_from_slice(&[1u8; 65536]);
    std::fs::write(dir.join("leak.qed"), &b).unwrap();
    assert_check_as_qemu(dir, "leak.qed", "qed");
}

#[test]
fn resize_grows_qed_and_is_refused_elsewhere_as_qemu_img_does() {
    let d = tmp();
    let dir = d.path();
    ok(dir, "qemu-img", &["create", "-q", "-f", "qed", "o.qed", "16M"]);
    fill(dir, "o.qed", "qed", 16 << 20, &mut Rng::new(9));
    std::fs::copy(dir.join("o.qed"), dir.join("q.qed")).unwrap();
    for args in [
        &["resize", "-f", "qed", "F", "+1M"][..],
        &["resize", "-f", "qed", "--shrink", "F", "1M"],
        &["resize", "-f", "qed", "F", "100000001"],
        &["resize", "-f", "qed", "F", "1T"],
    ] {
        let a: Vec<&str> = args.iter().map(|x| if *x == "F" { "o.qed" } else { x }).collect();
        let b: Vec<&str> = args.iter().map(|x| if *x == "F" { "q.qed" } else { x }).collect();
        let (o, q) = (oxcow(dir, &a), qemu_img(dir, &b));
        assert_eq!((o.code, &o.stdout), (q.code, &q.stdout), "{args:?}");
        let msg = |s: &str| s.lines().map(|l| l.splitn(2, ": ").last().unwrap_or("").to_string()).collect::<Vec<_>>();
        assert_eq!(msg(&o.stderr), msg(&q.stderr), "{args:?}");
        assert!(std::fs::read(dir.join("o.qed")).unwrap() == std::fs::read(dir.join("q.qed")).unwrap(), "{args:?}");
    }
    let r = ok(dir, "qemu-img", &["check", "o.qed"]);
    assert!(r.stdout.contains("No errors were found"), "{}", r.stdout);
    for (f, fmt) in [("v.vdi", "vdi"), ("v.vpc", "vpc"), ("v.vmdk", "vmdk"), ("v.vhdx", "vhdx")] {
        ok(dir, "qemu-img", &["create", "-q", "-f", fmt, f, "8M"]);
        let before = std::fs::read(dir.join(f)).unwrap();
        let (o, q) = (oxcow(dir, &["resize", "-f", fmt, f, "+1M"]), qemu_img(dir, &["resize", "-f", fmt, f, "+1M"]));
        assert_eq!((o.code, q.code), (1, 1), "{f}");
        assert!(q.stderr.contains("Image format driver does not support resize"), "{}", q.stderr);
        assert!(o.stderr.contains("Image format driver does not support resize"), "{f}: {}", o.stderr);
        assert!(std::fs::read(dir.join(f)).unwrap() == before, "{f} changed");
    }
}

#[test]
fn vmdk_descriptor_subformats_oxcow_creates_are_qemu_imgs_and_take_writes_across_extents() {
    let d = tmp();
    let dir = d.path();
    for sub in ["monolithicFlat", "twoGbMaxExtentFlat", "twoGbMaxExtentSparse"] {
        let o = format!("subformat={sub}");
        ok(dir, OXCOW, &["create", "-q", "-f", "vmdk", "-o", &o, "e1.vmdk", "5G"]);
        ok(dir, "qemu-img", &["create", "-q", "-f", "vmdk", "-o", &o, "e2.vmdk", "5G"]);
        let desc = |f: &str| {
            let t = std::fs::read_to_string(dir.join(f)).unwrap();
            t.lines()
                .filter(|l| !l.starts_with("CID="))
                .collect::<Vec<_>>()
                .join("\n")
                .replace(f.trim_end_matches(".vmdk"), "E")
        };
        assert_eq!(desc("e1.vmdk"), desc("e2.vmdk"), "{sub} descriptor");
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("e1-"))
            .collect();
        names.sort();
        assert!(!names.is_empty());
        for n in &names {
            let twin = n.replacen("e1", "e2", 1);
            let len = |f: &str| std::fs::metadata(dir.join(f)).unwrap().len();
            assert_eq!(len(n), len(&twin), "{sub}: {n}");
            // Flat extents are holes; sparse ones are small: compare those.
            if sub.ends_with("Sparse") {
                assert!(std::fs::read(dir.join(n)).unwrap() == std::fs::read(dir.join(&twin)).unwrap(), "{sub}: {n}");
            }
        }
        // A write across the first 2 GiB extent boundary.
        let w = "write -q -P 3 2147483000 10000";
        ok(dir, OXCOW, &["io", "-c", w, "e1.vmdk"]);
        ok(dir, "qemu-io", &["-c", w, "e2.vmdk"]);
        ok(dir, "qemu-img", &["compare", "e1.vmdk", "e2.vmdk"]);
        let r = ok(dir, "qemu-img", &["check", "e1.vmdk"]);
        assert!(r.stdout.contains("No errors were found"), "{}", r.stdout);
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
}

#[test]
fn vhdx_images_oxcow_creates_and_writes_check_clean_and_read_back_in_qemu() {
    let d = tmp();
    let dir = d.path();
    let size = 24u64 << 20;
    for (i, opts) in [
        "",
        "subformat=fixed",
        "subformat=fixed,block_state_zero=off",
        "block_size=1M,log_size=2M,block_state_zero=off",
    ]
    .into_iter()
    .enumerate()
    {
        let f = format!("o{i}.vhdx");
        let mut args = vec!["create", "-f", "vhdx"];
        if !opts.is_empty() {
            args.extend_from_slice(&["-o", opts]);
        }
        let o = ok(dir, OXCOW, &[&args[..], &[&f, "24M"]].concat());
        let q = ok(dir, "qemu-img", &[&args[..], &["q.vhdx", "24M"]].concat());
        assert_eq!(o.stdout.replace(&f, "q.vhdx"), q.stdout, "{opts}");
        let r = ok(dir, "qemu-img", &["check", &f]);
        assert!(r.stdout.contains("No errors were found"), "{opts}: {}", r.stdout);
        let info = |f: &str| json(&ok(dir, "qemu-img", &["info", "--output=json", f]).stdout);
        assert_eq!(info(&f)["cluster-size"], info("q.vhdx")["cluster-size"], "{opts}");
        assert_writes_as_qemu(dir, &f, "vhdx", size, 50 + i as u64);
        assert_reads_as_qemu(dir, &f, "vhdx");
        // An image qemu-img made takes oxcow's writes as well.
        assert_writes_as_qemu(dir, "q.vhdx", "vhdx", size, 60 + i as u64);
    }
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "src.qcow2", "20M"]);
    fill(dir, "src.qcow2", "qcow2", 20 << 20, &mut Rng::new(12));
    ok(dir, OXCOW, &["convert", "-O", "vhdx", "src.qcow2", "c.vhdx"]);
    ok(dir, "qemu-img", &["compare", "src.qcow2", "c.vhdx"]);
    let r = ok(dir, "qemu-img", &["check", "c.vhdx"]);
    assert!(r.stdout.contains("No errors were found"), "{}", r.stdout);
    // What qemu-img refuses, refused in its words, no file left behind
    // where it leaves none.
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
    for args in [
        &["create", "-f", "vhdx", "-o", "block_size=3M", "x.vhdx", "8M"][..],
        &["create", "-f", "vhdx", "-o", "log_size=0", "x.vhdx", "8M"],
        &["create", "-f", "vhdx", "-o", "subformat=foo", "x.vhdx", "8M"],
        &["create", "-f", "vhdx", "x.vhdx", "65T"],
        &["create", "-f", "vhdx", "-b", "base.qcow2", "-F", "qcow2", "x.vhdx"],
    ] {
        let (o, q) = (oxcow(dir, args), qemu_img(dir, args));
        assert_eq!((o.code, &o.stdout), (q.code, &q.stdout), "{args:?}");
        assert_eq!(o.stderr.replace("oxcow: ", "qemu-img: "), q.stderr, "{args:?}");
    }
}

/// The bytes of VHDX image `b` with its BAT sector holding entry `idx`
/// put back to `old`, a log entry of log `guid` carrying the sector as it
/// is in `b`, and headers naming that log: the state a crash after the
/// log was flushed and before the BAT was written leaves.
fn vhdx_crashed_before_bat_write(b: &[u8], idx: usize, old: u64, guid: [u8; 16]) -> Vec<u8> {
    use oxcow::formats::vhdx::{build_entry, crc32c, BAT_GUID};
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let rt = 192 << 10;
    let bat = (0..2).map(|i| rt + 16 + 32 * i).find(|&e| b[e..e + 16] == BAT_GUID).map(|e| u64_at(e + 16)).unwrap();
    let log = u64_at((64 << 10) + 72) as usize;
    let sector_at = bat as usize + idx * 8 / 4096 * 4096;
    let e = build_entry(&guid, 1, 0, b.len() as u64, &[(sector_at as u64, &b[sector_at..sector_at + 4096])]).unwrap();
    let mut out = b.to_vec();
    out[bat as usize + idx * 8..bat as usize + idx * 8 + 8].copy_from_slice(&old.to_le_bytes());
    out[log..log + e.len()].copy_from_slice(&e);
    for off in [64 << 10, 128 << 10] {
        let h = &mut out[off..off + 4096];
        h[48..64].copy_from_slice(&guid);
        h[4..8].fill(0);
        let c = crc32c(h);
        h[4..8].copy_from_slice(&c.to_le_bytes());
    }
    out
}

#[test]
fn vhdx_closed_uncleanly_is_replayed_when_opened_writable_as_qemu_does() {
    let d = tmp();
    let dir = d.path();
    ok(dir, OXCOW, &["create", "-q", "-f", "vhdx", "-o", "block_size=1M", "w.vhdx", "8M"]);
    ok(dir, OXCOW, &["io", "-c", "write -q -P 0x5a 2M 64k", "w.vhdx"]);
    let b = std::fs::read(dir.join("w.vhdx")).unwrap();
    let crashed = vhdx_crashed_before_bat_write(&b, 2, 2, std::array::from_fn(|i| 0xa0 + i as u8));
    for f in ["o.vhdx", "q.vhdx"] {
        std::fs::write(dir.join(f), &crashed).unwrap();
    }
    // Read-only: refused by both, in the same words, nothing changed.
    let (o, q) = (oxcow(dir, &["info", "o.vhdx"]), qemu_img(dir, &["info", "q.vhdx"]));
    assert_eq!((o.code, q.code), (1, 1));
    assert!(
        q.stderr.contains("'q.vhdx' opened read-only, but contains a log that needs to be replayed"),
        "{}",
        q.stderr
    );
    assert!(
        o.stderr.contains("'o.vhdx' opened read-only, but contains a log that needs to be replayed"),
        "{}",
        o.stderr
    );
    assert!(std::fs::read(dir.join("o.vhdx")).unwrap() == crashed);
    // Writable: replayed, so the write the crash interrupted is there.
    let read = "read -q -P 0x5a 2M 64k";
    ok(dir, OXCOW, &["io", "-c", read, "o.vhdx"]);
    ok(dir, "qemu-io", &["-c", read, "q.vhdx"]);
    for f in ["o.vhdx", "q.vhdx"] {
        let r = ok(dir, "qemu-img", &["check", f]);
        assert!(r.stdout.contains("No errors were found"), "{f}: {}", r.stdout);
        ok(dir, "qemu-io", &["-r", "-c", read, f]);
    }
    ok(dir, "qemu-img", &["compare", "o.vhdx", "q.vhdx"]);
    ok(dir, "qemu-img", &["compare", "o.vhdx", "w.vhdx"]);
    // check -r replays it too, and counts the replay as a corruption fixed.
    std::fs::write(dir.join("c.vhdx"), &crashed).unwrap();
    assert_repair_as_qemu(dir, "c.vhdx", "vhdx", "all");
}

#[test]
fn vmdk_create_options_make_what_qemu_img_makes() {
    let d = tmp();
    let dir = d.path();
    ok(dir, "qemu-img", &["create", "-q", "-f", "vmdk", "base.vmdk", "8M"]);
    ok(dir, "qemu-io", &["-c", "write -q -P 9 1M 64k", "base.vmdk"]);
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "bq.qcow2", "8M"]);
    // The header and descriptor of a sparse image, or the descriptor
    // file, with the CID and the image's own name masked.
    let masked = |f: &str| {
        let b = std::fs::read(dir.join(f)).unwrap_or_default();
        let (head, text) = if b.starts_with(b"KDMV") {
            (b[..512].to_vec(), String::from_utf8_lossy(&b[512..21 * 512]).trim_end_matches('\0').to_string())
        } else {
            (Vec::new(), String::from_utf8_lossy(&b).into_owned())
        };
        let stem = f.trim_end_matches(".vmdk");
        let text = text
            .lines()
            .filter(|l| !l.starts_with("CID="))
            .collect::<Vec<_>>()
            .join("\n")
            .replace(f, "X.vmdk")
            .replace(&format!("\"{stem}-"), "\"X-");
        // A descriptor file's length follows its CID's digits (qemu-img
        // writes them unpadded); a sparse file's is its layout.
        (if head.is_empty() { 0 } else { b.len() }, head, text)
    };
    for (opts, backing) in [
        ("adapter_type=lsilogic,hwversion=6,toolsversion=1234,zeroed_grain=on", true),
        ("adapter_type=buslogic,subformat=streamOptimized,zeroed_grain=on", false),
        ("compat6=on,adapter_type=legacyESX,preallocation=full", false),
        ("subformat=twoGbMaxExtentSparse,zeroed_grain=on", true),
        ("compat6=on,hwversion=7", false),
        ("adapter_type=foo", false),
        ("subformat=monolithicFlat", true),
        ("preallocation=bogus", false),
        ("preallocation=metadata", false),
    ] {
        let mut args = vec!["create", "-f", "vmdk", "-o", opts];
        if backing {
            args.extend_from_slice(&["-b", "base.vmdk", "-F", "vmdk"]);
        }
        let (o, q) = (
            oxcow(dir, &[&args[..], &["o.vmdk", "8M"]].concat()),
            qemu_img(dir, &[&args[..], &["q.vmdk", "8M"]].concat()),
        );
        assert_eq!((o.code, o.stdout.replace("o.vmdk", "q.vmdk")), (q.code, q.stdout.clone()), "{opts}");
        let strip = |s: &str| {
            s.replace("o.vmdk", "q.vmdk")
                .lines()
                .map(|l| l.splitn(2, ": ").last().unwrap_or("").to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(strip(&o.stderr), strip(&q.stderr), "{opts}");
        if q.code == 0 {
            assert_eq!(masked("o.vmdk"), masked("q.vmdk"), "{opts}");
            let r = ok(dir, "qemu-img", &["check", "o.vmdk"]);
            assert!(r.stdout.contains("No errors were found"), "{opts}: {}", r.stdout);
            if backing {
                // The parent link holds: QEMU reads the base's data through it.
                ok(dir, "qemu-io", &["-r", "-c", "read -q -P 9 1M 64k", "o.vmdk"]);
                ok(dir, OXCOW, &["io", "-c", "write -q -P 3 1M 4k", "o.vmdk"]);
                ok(dir, "qemu-io", &["-r", "-c", "read -q -P 3 1M 4k", "-c", "read -q -P 9 1052672 61440", "o.vmdk"]);
            }
        }
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("o") || n.starts_with("q") {
                std::fs::remove_file(e.path()).unwrap();
            }
        }
    }
    // A backing file that is no VMDK is refused as qemu-img refuses it.
    let args = ["create", "-f", "vmdk", "-b", "bq.qcow2", "-F", "qcow2"];
    let (o, q) = (oxcow(dir, &[&args[..], &["o.vmdk"]].concat()), qemu_img(dir, &[&args[..], &["q.vmdk"]].concat()));
    assert_eq!((o.code, q.code), (1, 1));
    assert!(o.stderr.contains("backing_file must be a vmdk image"), "{}", o.stderr);
    assert!(q.stderr.contains("backing_file must be a vmdk image"), "{}", q.stderr);
}

/// A VHDX file cut short opened anywhere but `check`: QEMU refuses it with
/// the first block past the end; a last block cut inside the disk's tail
/// (the partial last block QEMU once wrote) still opens.
#[test]
fn vhdx_blocks_past_the_end_refuse_the_open_outside_check_as_qemu_does() {
    let d = tmp();
    let dir = d.path();
    ok(dir, "qemu-img", &["create", "-q", "-f", "vhdx", "-o", "block_size=1M", "p.vhdx", "3584K"]);
    ok(dir, "qemu-io", &["-c", "write -P 9 0 3584K", "p.vhdx"]);
    let full = std::fs::read(dir.join("p.vhdx")).unwrap();
    // The last block holds 512 KiB of the disk: cutting the file there keeps it whole.
    let keep = full.len() - (512 << 10);
    for (name, len, opens) in [("tail.vhdx", keep, true), ("cut.vhdx", keep - 4096, false)] {
        std::fs::write(dir.join(name), &full[..len]).unwrap();
        for args in [&["info", name][..], &["convert", "-O", "raw", name, "out.raw"][..]] {
            let (o, q) = (oxcow(dir, args), qemu_img(dir, args));
            assert_eq!(o.code, q.code, "{args:?}: {} / {}", o.stderr, q.stderr);
            assert_eq!(o.code == 0, opens, "{args:?}: {}", o.stderr);
            if !opens {
                let first = q.stderr.lines().next().unwrap().split_once(": ").unwrap().1;
                assert!(o.stderr.contains(first), "{args:?}: {} lacks {first}", o.stderr);
            }
        }
        assert_check_as_qemu(dir, name, "vhdx");
    }
}

/// `rebase` of a QED image, safe and unsafe, to a new base, to a raw base
/// (the no-probe bit) and to none: the same bytes as qemu-img's. Formats
/// that keep no backing name are refused in qemu-img's words, unchanged.
#[test]
fn rebase_of_qed_writes_what_qemu_img_writes_and_other_formats_refuse_it() {
    let d = tmp();
    let dir = d.path();
    for (name, pattern, at) in [("b1.qcow2", "1", "0"), ("b2.qcow2", "2", "1M")] {
        ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", name, "4M"]);
        ok(dir, "qemu-io", &["-c", &format!("write -P {pattern} {at} 1M"), name]);
    }
    ok(dir, "qemu-img", &["create", "-q", "-f", "qed", "-b", "b1.qcow2", "-F", "qcow2", "r.qed", "4M"]);
    ok(dir, "qemu-io", &["-c", "write -P 3 100k 50k", "r.qed"]);
    let modes: [&[&str]; 5] = [
        &["-u", "-b", "b2.qcow2", "-F", "qcow2"],
        &["-u", "-b", "b2.qcow2", "-F", "raw"],
        &["-u", "-b", ""],
        &["-b", "b2.qcow2", "-F", "qcow2"],
        &["-b", ""],
    ];
    for m in modes {
        std::fs::copy(dir.join("r.qed"), dir.join("o.qed")).unwrap();
        std::fs::copy(dir.join("r.qed"), dir.join("q.qed")).unwrap();
        ok(dir, OXCOW, &[&["rebase"], m, &["o.qed"]].concat());
        ok(dir, "qemu-img", &[&["rebase"], m, &["q.qed"]].concat());
        assert!(std::fs::read(dir.join("o.qed")).unwrap() == std::fs::read(dir.join("q.qed")).unwrap(), "rebase {m:?}");
    }
    ok(dir, "qemu-img", &["create", "-q", "-f", "vdi", "v.vdi", "4M"]);
    let before = std::fs::read(dir.join("v.vdi")).unwrap();
    for m in [&["-u", "-b", "b2.qcow2", "-F", "qcow2"][..], &["-b", "b2.qcow2", "-F", "qcow2"][..]] {
        let args = [&["rebase"], m, &["v.vdi"]].concat();
        let (o, q) = (oxcow(dir, &args), qemu_img(dir, &args));
        assert_eq!(o.code, q.code);
        assert_eq!(o.stderr.split_once(": ").unwrap().1, q.stderr.split_once(": ").unwrap().1);
        assert!(std::fs::read(dir.join("v.vdi")).unwrap() == before, "rebase {m:?} changed the VDI");
    }
}
