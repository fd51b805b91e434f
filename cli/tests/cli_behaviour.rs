//! Command-line behaviour against qemu-img / qemu-io: messages, exit codes,
//! created images, conversions.

mod common;
use common::*;

/// Drops qemu-io's timing lines, which depend on the clock.
fn untimed(s: &str) -> String {
    s.lines().filter(|l| !l.contains(" ops; ")).collect::<Vec<_>>().join("\n")
}

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
    let r = oxcow(dir, &["create", "-f", "qcow2", "-o", "compat=0.10,lazy_refcounts=on", "z.qcow2", "1M"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("Lazy refcounts only supported with compatibility level 1.1"), "{}", r.stderr);
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
    let r = oxcow(a.path(), &["io", "-c", "read 8M 1", "img"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.starts_with("read failed: "), "{}", r.stderr);
    let r = oxcow(a.path(), &["io", "-r", "-c", "write 0 1", "img"]);
    assert_eq!(r.code, 1);
    let r = oxcow(a.path(), &["io", "-c", "read 0 1", "missing"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.starts_with("oxcow: can't open device missing"), "{}", r.stderr);
    // truncate grows the disk.
    let r = ok(a.path(), OXCOW, &["io", "-c", "truncate 16M", "-c", "length", "img"]);
    assert_eq!(r.stdout.trim(), "16 MiB");
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
    ];
    for (args, code) in runs {
        let r = oxcow(dir, &args);
        assert_eq!(r.code, code, "{args:?}: {}", r.stderr);
        assert!(r.stderr.starts_with("oxcow: "), "{args:?}: {}", r.stderr);
        assert_eq!(r.stderr.trim_end().lines().count(), 1, "{args:?}: {}", r.stderr);
        assert!(!r.stderr.contains("panicked"), "{args:?}: {}", r.stderr);
    }
}
