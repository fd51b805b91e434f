//! Command-line behaviour against qemu-img / qemu-io: messages, exit codes,
//! created images, conversions.

use crate::support::*;

#[test]
fn create_matches_qemu_img() {
    let cases: &[(&str, &[&str])] = &[
        ("qcow2", &[]),
        ("qcow2", &["-o", "compat=0.10"]),
        ("qcow2", &["-o", "cluster_size=4k,lazy_refcounts=on,refcount_bits=64"]),
        ("qcow2", &["-o", "compat=v3,extended_l2=on,compression_type=zstd"]),
        ("qcow2", &["-o", "data_file=img.data,data_file_raw=on"]),
        ("qcow2", &["-o", "preallocation=metadata,cluster_size=2M"]),
        ("qcow2", &["-o", "refcount_bits=1", "-o", "cluster_size=512"]),
        ("raw", &[]),
    ];
    for (fmt, opts) in cases {
        let (a, b) = (tmp(), tmp());
        let mut args = vec!["create", "-f", fmt];
        args.extend_from_slice(opts);
        args.extend_from_slice(&["img", "3M"]);
        let ours = ok(a.path(), OXCOW, &args);
        let theirs = ok(b.path(), "qemu-img", &args);
        assert_eq!(ours.stdout, theirs.stdout, "create {args:?}");
        if *fmt == "qcow2" {
            let c = qemu_img(a.path(), &["check", "img"]);
            assert_eq!(c.code, 0, "qemu-img check after create {args:?}: {}{}", c.stdout, c.stderr);
            let oi = json(&ok(a.path(), "qemu-img", &["info", "--output=json", "img"]).stdout);
            let ti = json(&ok(b.path(), "qemu-img", &["info", "--output=json", "img"]).stdout);
            assert_eq!(oi["virtual-size"], ti["virtual-size"]);
            assert_eq!(oi["cluster-size"], ti["cluster-size"]);
            assert_eq!(oi["format-specific"], ti["format-specific"], "create {args:?}");
            assert_map_matches(a.path(), "img", &[]);
        }
        let q = oxcow(a.path(), &["create", "-q", "-f", fmt, "img2", "1M"]);
        assert_eq!((q.code, q.stdout.as_str()), (0, ""));
    }
}

#[test]
fn create_backing_rules() {
    let d = tmp();
    let dir = d.path();
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "base.qcow2", "5M"]);
    let r = oxcow(dir, &["create", "-f", "qcow2", "-b", "base.qcow2", "top.qcow2"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.starts_with("oxcow: top.qcow2: Backing file specified without backing format"), "{}", r.stderr);
    // The size comes from the backing file when omitted.
    let args = ["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"];
    let (ours, theirs) = (ok(dir, OXCOW, &args), ok(dir, "qemu-img", &args));
    assert_eq!(ours.stdout, theirs.stdout);
    assert_info_matches(dir, "top.qcow2", &[]);
    let r = oxcow(dir, &["create", "-f", "qcow2", "nosize.qcow2"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("Image creation needs a size parameter"), "{}", r.stderr);
    let r = oxcow(dir, &["create", "-f", "qcow2", "-b", "missing.qcow2", "-F", "qcow2", "x.qcow2"]);
    assert_eq!(r.code, 1);
    // -u: no need for the backing file to exist when the size is given.
    ok(dir, OXCOW, &["create", "-q", "-f", "qcow2", "-u", "-b", "missing.qcow2", "-F", "qcow2", "y.qcow2", "1M"]);
    let r = oxcow(dir, &["create", "-f", "qcow2", "-o", "bogus=1", "z.qcow2", "1M"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("Invalid parameter 'bogus'"), "{}", r.stderr);
    refused_like_qemu(
        dir,
        &[
            "compat=2.0",
            "refcount_bits=3",
            "cluster_size=1000",
            "cluster_size=abc",
            "lazy_refcounts=maybe",
            "compression_type=lz4",
            "preallocation=bogus",
            "extended_l2=on,cluster_size=4k",
            "backing_fmt=qcow2",
        ],
    );
}

#[test]
fn preallocation_over_a_backing_file_keeps_the_backing_data_visible() {
    let d = tmp();
    let dir = d.path();
    // Sizes a multiple of every cluster size below: QEMU sizes the file of
    // a partly used last cluster differently (noted, not matched yet).
    ok(dir, "qemu-img", &["create", "-q", "-f", "raw", "base", "2M"]);
    qemu_write(dir, "base", &[(0x11, 0, 2 << 20)], &["-f", "raw"]);
    // Every preallocation mode, the smallest and largest clusters extended
    // L2 allows, and the write into the reserved cluster in every cache mode.
    let cases = ["metadata", "falloc", "full"]
        .iter()
        .flat_map(|m| ["16k", "2M"].map(move |c| (*m, c)))
        .zip(["none", "directsync", "writethrough", "writeback", "unsafe"].iter().cycle());
    for ((mode, cluster), cache) in cases {
        // Extended L2: the clusters are reserved, every subcluster left
        // unallocated; with metadata byte for byte what qemu-img writes
        // (falloc and full: QEMU moves its refcount table first).
        let ctx = format!("preallocation={mode},cluster_size={cluster}, write with -t {cache}");
        let o = format!("extended_l2=on,preallocation={mode},cluster_size={cluster}");
        let args = ["create", "-q", "-f", "qcow2", "-o", &o, "-b", "base", "-F", "raw"];
        ok(dir, OXCOW, &[&args[..], &["ours.qcow2", "2M"]].concat());
        ok(dir, "qemu-img", &[&args[..], &["theirs.qcow2", "2M"]].concat());
        let (a, b) = (std::fs::read(dir.join("ours.qcow2")).unwrap(), std::fs::read(dir.join("theirs.qcow2")).unwrap());
        assert!(mode != "metadata" || a == b, "{ctx}: the image differs from qemu-img's");
        assert_eq!(a.len(), b.len(), "{ctx}");
        assert_patterns(dir, "ours.qcow2", &[(0x11, 0, 2 << 20)], &[]);
        // A write lands in the reserved cluster; the rest still reads the base.
        ok(dir, OXCOW, &["io", "-t", cache, "-c", "write -P 0x22 4k 4k", "ours.qcow2"]);
        assert_patterns(dir, "ours.qcow2", &[(0x11, 0, 4096), (0x22, 4096, 4096), (0x11, 8192, (2 << 20) - 8192)], &[]);
        let c = qemu_img(dir, &["check", "ours.qcow2"]);
        assert_eq!(c.code, 0, "{ctx}: {}{}", c.stdout, c.stderr);
        assert_eq!(
            std::fs::metadata(dir.join("ours.qcow2")).unwrap().len(),
            b.len() as u64,
            "{ctx}: the write allocated anew"
        );
    }
    // Without subclusters a preallocated cluster would hide the base:
    // refused as qemu-img refuses it, and no file is left.
    let r = oxcow(
        dir,
        &["create", "-f", "qcow2", "-o", "preallocation=metadata", "-b", "base", "-F", "raw", "x.qcow2", "512k"],
    );
    let q = qemu_img(
        dir,
        &["create", "-f", "qcow2", "-o", "preallocation=metadata", "-b", "base", "-F", "raw", "y.qcow2", "512k"],
    );
    assert_eq!((r.code, q.code), (1, 1));
    assert_eq!(r.stderr.replace("oxcow: x.qcow2", "qemu-img: y.qcow2"), q.stderr);
    assert!(!dir.join("x.qcow2").exists() && !dir.join("y.qcow2").exists());
}

/// Refused options: qemu-img's first error line, after our prefix.
fn refused_like_qemu(dir: &std::path::Path, opts: &[&str]) {
    for o in opts {
        let (r, q) = (
            oxcow(dir, &["create", "-q", "-f", "qcow2", "-o", o, "z.qcow2", "1M"]),
            qemu_img(dir, &["create", "-q", "-f", "qcow2", "-o", o, "z.qcow2", "1M"]),
        );
        assert_eq!((r.code, q.code), (1, 1), "{o}");
        let first = q.stderr.lines().next().unwrap_or("").trim_start_matches("qemu-img: ");
        assert_eq!(r.stderr.trim_end(), format!("oxcow: {first}"), "{o}");
    }
}

#[test]
fn create_validation_messages_match() {
    let d = tmp();
    refused_like_qemu(
        d.path(),
        &[
            "compat=0.10,lazy_refcounts=on",
            "compat=0.10,refcount_bits=1",
            "compat=0.10,extended_l2=on",
            "compat=0.10,compression_type=zstd",
            "compat=0.10,data_file=x.raw",
            "data_file_raw=on",
        ],
    );
}

#[test]
fn compare_messages_and_codes() {
    let d = tmp();
    let dir = d.path();
    for f in ["a.qcow2", "b.qcow2"] {
        ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", f, "8M"]);
    }
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "big.qcow2", "16M"]);
    let cases: Vec<Vec<&str>> = vec![
        vec!["compare", "a.qcow2", "b.qcow2"],
        vec!["compare", "-s", "a.qcow2", "big.qcow2"],
        vec!["compare", "a.qcow2", "big.qcow2"],
        vec!["compare", "-q", "a.qcow2", "big.qcow2"],
    ];
    let same = |cases: &[Vec<&str>]| {
        for c in cases {
            let (o, q) = (oxcow(dir, c), qemu_img(dir, c));
            assert_eq!((o.code, &o.stdout), (q.code, &q.stdout), "{c:?}");
        }
    };
    same(&cases);
    ok(dir, "qemu-io", &["-c", "write -q -P 1 300007 1", "b.qcow2"]);
    ok(dir, "qemu-io", &["-c", "write -q -P 2 12M 3", "big.qcow2"]);
    ok(dir, "qemu-io", &["-c", "write -q -P 0 0 64k", "a.qcow2"]);
    let more: Vec<Vec<&str>> = vec![
        vec!["compare", "a.qcow2", "b.qcow2"],
        vec!["compare", "b.qcow2", "a.qcow2"],
        vec!["compare", "a.qcow2", "big.qcow2"],
        vec!["compare", "-s", "a.qcow2", "big.qcow2"],
        vec!["compare", "-q", "a.qcow2", "b.qcow2"],
    ];
    same(&more);
    let r = oxcow(dir, &["compare", "a.qcow2", "missing.qcow2"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.starts_with("oxcow: Could not open 'missing.qcow2'"), "{}", r.stderr);
}

#[test]
fn convert_targets() {
    let d = tmp();
    let dir = d.path();
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "base.qcow2", "6M"]);
    qemu_write(dir, "base.qcow2", &[(1, 0, 2 << 20), (2, 4 << 20, 65536)], &[]);
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "src.qcow2", "8M"]);
    qemu_write(dir, "src.qcow2", &[(3, 65536, 4096), (4, 7 << 20, 100000)], &[]);
    ok(dir, "qemu-io", &["-c", "write -q -z 1M 64k", "src.qcow2"]);

    // qcow2 output with options: valid, equal, honouring the options.
    ok(dir, OXCOW, &["convert", "-O", "qcow2", "-o", "cluster_size=4k,refcount_bits=1", "src.qcow2", "out.qcow2"]);
    let c = qemu_img(dir, &["check", "out.qcow2"]);
    assert_eq!(c.code, 0, "{}{}", c.stdout, c.stderr);
    ok(dir, "qemu-img", &["compare", "src.qcow2", "out.qcow2"]);
    let info = json(&ok(dir, OXCOW, &["info", "--output=json", "out.qcow2"]).stdout);
    assert_eq!(info["cluster-size"], 4096);
    assert_eq!(info["format-specific"]["data"]["refcount-bits"], 1);

    // -B: only what differs from the backing file is written.
    ok(dir, OXCOW, &["convert", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "src.qcow2", "diff.qcow2"]);
    ok(dir, "qemu-img", &["compare", "src.qcow2", "diff.qcow2"]);
    let c = qemu_img(dir, &["check", "diff.qcow2"]);
    assert_eq!(c.code, 0, "{}{}", c.stdout, c.stderr);
    let map = json(&ok(dir, "qemu-img", &["map", "--output=json", "diff.qcow2"]).stdout);
    let top_data: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert!(top_data <= 3 * 65536, "-B wrote {top_data} bytes of data into the top image");

    // Raw output is sparse; -S 0 allocates everything.
    ok(dir, OXCOW, &["convert", "-p", "-O", "raw", "src.qcow2", "sparse.raw"]);
    ok(dir, "qemu-img", &["compare", "-F", "raw", "src.qcow2", "sparse.raw"]);
    ok(dir, OXCOW, &["convert", "-S", "0", "-O", "raw", "src.qcow2", "full.raw"]);
    ok(dir, "qemu-img", &["compare", "-F", "raw", "src.qcow2", "full.raw"]);
    let blocks = |f: &str| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(dir.join(f)).unwrap().blocks() * 512
    };
    assert!(blocks("sparse.raw") < 3 << 20, "sparse raw allocates {}", blocks("sparse.raw"));
    assert!(blocks("full.raw") >= 8 << 20);

    // -c: compressed clusters qemu can read, with either compression type.
    for ct in ["zlib", "zstd"] {
        let o = format!("compression_type={ct}");
        ok(dir, OXCOW, &["convert", "-c", "-O", "qcow2", "-o", &o, "src.qcow2", "comp.qcow2"]);
        let c = qemu_img(dir, &["check", "comp.qcow2"]);
        assert_eq!(c.code, 0, "{}{}", c.stdout, c.stderr);
        ok(dir, "qemu-img", &["compare", "src.qcow2", "comp.qcow2"]);
        let map = json(&ok(dir, "qemu-img", &["map", "--output=json", "comp.qcow2"]).stdout);
        assert!(map.as_array().unwrap().iter().any(|e| e["compressed"] == true), "no compressed clusters ({ct})");
    }

    // -n writes into an existing image, zeroing what the source has as zeros.
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "existing.qcow2", "8M"]);
    qemu_write(dir, "existing.qcow2", &[(9, 0, 8 << 20)], &[]);
    ok(dir, OXCOW, &["convert", "-n", "-O", "qcow2", "src.qcow2", "existing.qcow2"]);
    ok(dir, "qemu-img", &["compare", "src.qcow2", "existing.qcow2"]);
    let c = qemu_img(dir, &["check", "existing.qcow2"]);
    assert_eq!(c.code, 0, "{}{}", c.stdout, c.stderr);
}

#[test]
fn io_output_matches_qemu_io() {
    let (a, b) = (tmp(), tmp());
    for d in [&a, &b] {
        ok(d.path(), "qemu-img", &["create", "-q", "-f", "qcow2", "img", "8M"]);
    }
    let cmds: Vec<String> = [
        "write -P 0xab 0 4k",
        "read -P 0xab 0 4k",
        "read -P 0xac 0 4k",
        "read -v 0 40",
        "write -z 64k 64k",
        "write -z -u 128k 64k",
        "write 5000 3000",
        "read -P 0xcd 5000 3000",
        "read -P 0xcd -s 100 -l 200 4900 3000",
        "read -P 0xcd -s 50 -l 200 4900 3000",
        "write -f -P 7 9000 100",
        "write -c -P 0x21 256k 128k",
        "read -P 0x21 256k 128k",
        "write -c 1000 64k",
        "truncate 4M",
        "length",
        "read -P 0x21 256k 128k",
        "truncate 16M",
        "read -P 0 4M 1M",
        "discard 0 64k",
        "flush",
        "aio_flush",
        "length",
        "map",
        "info",
        "read 0 abc",
        "read -P 300 0 1",
        "write -u 0 4k",
        "read 0 1 2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let o = oxcow(a.path(), &io_args(&["io"], &cmds, "img"));
    let q = run_in(b.path(), "qemu-io", &io_args(&[], &cmds, "img"));
    assert_eq!(o.code, q.code);
    assert_eq!(untimed(&o.stdout), untimed(&q.stdout));
    let c = qemu_img(a.path(), &["check", "img"]);
    assert_eq!(c.code, 0, "{}{}", c.stdout, c.stderr);
    ok(a.path(), "qemu-img", &["compare", "img", &b.path().join("img").display().to_string()]);

    // Errors: unknown command, out of range, read-only, missing image.
    let r = oxcow(a.path(), &["io", "-c", "bogus", "img"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("command \"bogus\" not found"));
    let r = oxcow(a.path(), &["io", "-c", "read 16M 1", "img"]);
    assert_eq!(r.code, 1);
    // qemu-io reports a failed request on stdout.
    assert!(r.stdout.starts_with("read failed: "), "{}", r.stdout);
    let r = oxcow(a.path(), &["io", "-r", "-c", "write 0 1", "img"]);
    assert_eq!(r.code, 1);
    let r = oxcow(a.path(), &["io", "-c", "read 0 1", "missing"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.starts_with("oxcow: can't open device missing"), "{}", r.stderr);
    // Cache modes reach the same data (O_DIRECT included).
    for t in ["none", "writethrough", "directsync", "unsafe"] {
        ok(a.path(), OXCOW, &["io", "-t", t, "-c", "write -q -P 9 70000 5000", "-c", "read -q -P 9 70000 5000", "img"]);
    }
    ok(a.path(), OXCOW, &["io", "-n", "-c", "read -q -P 9 70000 5000", "img"]);
    ok(a.path(), "qemu-io", &["-r", "-c", "read -q -P 9 70000 5000", "img"]);
    // truncate grows the disk.
    let r = ok(a.path(), OXCOW, &["io", "-c", "truncate 32M", "-c", "length", "img"]);
    assert_eq!(r.stdout.trim(), "32 MiB");
}

#[test]
fn errors_are_one_line_without_panics() {
    let d = tmp();
    let dir = d.path();
    std::fs::write(dir.join("garbage.qcow2"), b"QFI\xfb\0\0\0\x09garbage-header-that-is-not-valid").unwrap();
    let runs: Vec<(Vec<&str>, i32)> = vec![
        (vec!["info", "missing"], 1),
        (vec!["map", "missing"], 1),
        (vec!["convert", "-O", "raw", "missing", "out.raw"], 1),
        (vec!["info", "garbage.qcow2"], 1),
        (vec!["map", "garbage.qcow2"], 1),
        (vec!["info", "--output=xml", "garbage.qcow2"], 1),
        (vec!["check", "missing"], 1),
        (vec!["compare", "missing", "garbage.qcow2"], 2),
        (vec!["create", "-f", "qcow2", "x.qcow2", "1Q"], 1),
        (vec!["convert", "-O", "vmdk", "garbage.qcow2", "x"], 1),
        (vec!["create", "-f", "qcow2", "x.qcow2", "1G", "2G"], 1),
        (vec!["info"], 1),
        (vec!["map", "--output=xml", "garbage.qcow2"], 1),
        (vec!["io", "-t", "bogus", "-c", "read 0 1", "garbage.qcow2"], 1),
    ];
    for (args, code) in runs {
        let r = oxcow(dir, &args);
        assert_eq!(r.code, code, "{args:?}: {}", r.stderr);
        assert!(r.stderr.starts_with("oxcow: "), "{args:?}: {}", r.stderr);
        assert_eq!(r.stderr.trim_end().lines().count(), 1, "{args:?}: {}", r.stderr);
        assert!(!r.stderr.contains("panicked"), "{args:?}: {}", r.stderr);
    }
}

/// Both tools' output, status and findings for `check ARGS`.
fn check_both(dir: &std::path::Path, args: &[&str]) {
    let (o, q) = (oxcow(dir, args), qemu_img(dir, args));
    assert_eq!((o.code, &o.stdout), (q.code, &q.stdout), "{args:?}\nstderr: {}", o.stderr);
}

/// Gives cluster `idx` of a 64k-cluster image a refcount of 1 although
/// nothing uses it (a leak), growing the file to cover it.
fn make_leak(file: &std::path::Path, idx: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(file).unwrap();
    f.write_all_at(&1u16.to_be_bytes(), 2 * 65536 + 2 * idx).unwrap();
    f.set_len((idx + 1) * 65536).unwrap();
}

#[test]
fn check_matches_qemu_img() {
    let d = tmp();
    let dir = d.path();
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "fresh.qcow2", "8M"]);
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "used.qcow2", "8M"]);
    qemu_write(dir, "used.qcow2", &[(1, 0, 65536), (2, 65536, 4096), (3, 1 << 20, 200000)], &[]);
    ok(dir, "qemu-img", &["snapshot", "-c", "s1", "used.qcow2"]);
    qemu_write(dir, "used.qcow2", &[(4, 0, 4096)], &[]);
    ok(dir, "qemu-img", &["convert", "-c", "-O", "qcow2", "used.qcow2", "comp.qcow2"]);
    ok(dir, "qemu-img", &["create", "-q", "-f", "raw", "disk.raw", "1M"]);
    for f in ["fresh.qcow2", "used.qcow2", "comp.qcow2"] {
        check_both(dir, &["check", f]);
        check_both(dir, &["check", "--output=json", f]);
        check_both(dir, &["check", "-q", f]);
    }
    check_both(dir, &["check", "disk.raw"]);
    assert_eq!(oxcow(dir, &["check", "-f", "raw", "disk.raw"]).code, 63);

    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "leak.qcow2", "8M"]);
    qemu_write(dir, "leak.qcow2", &[(1, 0, 65536)], &[]);
    make_leak(&dir.join("leak.qcow2"), 9);
    std::fs::copy(dir.join("leak.qcow2"), dir.join("leak2.qcow2")).unwrap();
    check_both(dir, &["check", "leak.qcow2"]);
    check_both(dir, &["check", "--output=json", "leak.qcow2"]);
    let (o, q) =
        (oxcow(dir, &["check", "-r", "leaks", "leak.qcow2"]), qemu_img(dir, &["check", "-r", "leaks", "leak2.qcow2"]));
    assert_eq!((o.code, &o.stdout), (q.code, &q.stdout));
    ok(dir, "qemu-img", &["check", "leak.qcow2"]);
}

#[test]
fn check_fragmentation_matches() {
    let d = tmp();
    let dir = d.path();
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "big.qcow2", "4T"]);
    qemu_write(dir, "big.qcow2", &[(1, 0, 4096), (2, 4 << 30, 65536), (3, (4 << 40) - 65536, 65536)], &[]);
    check_both(dir, &["check", "big.qcow2"]);
}

#[test]
fn map_ranges_match_qemu_img() {
    let d = tmp();
    let dir = d.path();
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "img.qcow2", "8M"]);
    qemu_write(dir, "img.qcow2", &[(1, 0, 65536), (2, 200000, 70000), (3, 7 << 20, 4096)], &[]);
    ok(dir, "qemu-io", &["-c", "write -q -z 1M 128k", "img.qcow2"]);
    for r in [
        &["--start-offset", "100k", "--max-length", "1M"][..],
        &["-s", "0", "-l", "70000"],
        &["--start-offset=8M"],
        &["--start-offset=9M"],
        &["--max-length=1"],
    ] {
        assert_map_matches(dir, "img.qcow2", r);
    }
}

#[test]
fn force_share_reads_images_in_use() {
    let d = tmp();
    let dir = d.path();
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "img.qcow2", "4M"]);
    qemu_write(dir, "img.qcow2", &[(3, 0, 65536)], &[]);
    // qemu-io holds the image open for writing while we look at it: it
    // waits for commands on its standard input until told to quit, and
    // prompts for the first once the image is open (and locked). Probing
    // the lock with another QEMU tool instead would race with its opening.
    let mut holder = std::process::Command::new("qemu-io")
        .arg("img.qcow2")
        .current_dir(dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("qemu-io");
    let mut prompt = holder.stdout.take().expect("stdout");
    let mut seen = Vec::new();
    while !seen.ends_with(b"qemu-io> ") {
        use std::io::Read;
        let mut b = [0u8; 64];
        let n = prompt.read(&mut b).expect("reading qemu-io");
        assert!(n > 0, "qemu-io exited before holding the image: {:?}", holder.wait());
        seen.extend_from_slice(&b[..n]);
    }
    let r = oxcow(dir, &["info", "img.qcow2"]);
    assert_eq!(r.code, 1, "info must refuse an image in use: {}", r.stdout);
    assert!(r.stderr.contains("lock"), "{}", r.stderr);
    ok(dir, OXCOW, &["info", "-U", "img.qcow2"]);
    ok(dir, OXCOW, &["map", "-U", "img.qcow2"]);
    ok(dir, OXCOW, &["compare", "-U", "img.qcow2", "img.qcow2"]);
    ok(dir, OXCOW, &["convert", "-U", "-O", "raw", "img.qcow2", "out.raw"]);
    ok(dir, OXCOW, &["io", "-r", "-U", "-c", "read -q -P 3 0 64k", "img.qcow2"]);
    let r = oxcow(dir, &["io", "-U", "-c", "read 0 1", "img.qcow2"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("force-share=on can only be used with read-only images"), "{}", r.stderr);
    use std::io::Write;
    holder.stdin.take().expect("stdin").write_all(b"quit\n").expect("telling qemu-io to quit");
    assert!(holder.wait().expect("qemu-io exits").success());
}
