//! qemu-img's front-end commands and words under the drop-in name,
//! against QEMU's qemu-img on the same inputs: `dd`, `-o help` lists and
//! `-o` refusals, `convert -p` into a pipe, `convert -o backing_file=`,
//! `rebase -c`, `file:` names, what `commit` leaves in the base; and
//! qemu-io's `open -o` with qcow2 cache options and `-s`.

use crate::dropin::{run, same, sides, Cmp, Side};

/// Runs each command line on both sides in turn (same directories), with
/// the same messages and status, then compares the named files byte for
/// byte and their allocation as `qemu-img map` reports it.
fn same_runs(cmds: &[&[&str]], files: &[&str]) {
    let (ours, theirs) = sides();
    same_runs_in(&ours, &theirs, cmds, files);
}

fn same_runs_in(ours: &Side, theirs: &Side, cmds: &[&[&str]], files: &[&str]) {
    for args in cmds {
        let o = run(ours, "qemu-img", args, None);
        let t = run(theirs, "qemu-img", args, None);
        let ctx = format!(
            "{args:?}\n--- qemu ({}): {}{}--- oxcow ({}): {}{}",
            t.code, t.stdout, t.stderr, o.code, o.stdout, o.stderr
        );
        assert_eq!((o.code, &o.stdout, &o.stderr), (t.code, &t.stdout, &t.stderr), "{ctx}");
    }
    for f in files {
        let read = |d: &std::path::Path| std::fs::read(d.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(read(ours.dir.path()) == read(theirs.dir.path()), "{f} differs");
        let map = |d: &std::path::Path| {
            crate::support::ok(
                d,
                "qemu-img",
                &["map", "--output=json", "-f", if f.ends_with(".qcow2") { "qcow2" } else { "raw" }, f],
            )
            .stdout
        };
        assert_eq!(map(ours.dir.path()), map(theirs.dir.path()), "{f}: allocation differs");
    }
}

#[test]
fn qemu_img_dd_copies_like_qemu() {
    same_runs(
        &[
            &["dd", "if=x.qcow2", "of=whole.raw"],
            &["dd", "if=x.qcow2", "of=count.raw", "bs=4k", "count=3"],
            // count bounds the end of the copy, skip only shortens it.
            &["dd", "if=x.qcow2", "of=window.raw", "bs=4k", "skip=2", "count=20"],
            &["dd", "-f", "qcow2", "if=x.qcow2", "of=blocks.qcow2", "bs=1.5k", "skip=010", "-O", "qcow2"],
            &["dd", "if=x.qcow2", "of=empty.raw", "bs=64k", "count=0"],
        ],
        &["whole.raw", "count.raw", "window.raw", "blocks.qcow2", "empty.raw"],
    );
}

#[test]
fn qemu_img_dd_skip_past_the_end_leaves_an_empty_target() {
    same_runs(&[&["dd", "if=x.qcow2", "of=past.raw", "bs=4k", "skip=1000"]], &["past.raw"]);
}

#[test]
fn qemu_img_dd_refusals() {
    for args in [
        &["dd", "if=x.qcow2"][..],
        &["dd", "if=x.qcow2", "of=o", "bs=0"],
        &["dd", "if=x.qcow2", "of=o", "bs=x"],
        &["dd", "if=x.qcow2", "of=o", "count=1k"],
        &["dd", "if=x.qcow2", "of=o", "skip=-1"],
        &["dd", "if=x.qcow2", "of=o", "osize=1"],
        &["dd", "if=x.qcow2", "of=o", "junk"],
        &["dd", "if=x.qcow2", "of=o", "-O", "foo"],
        &["dd", "if=x.qcow2", "of=o", "-f", "foo"],
        &["dd", "if=missing", "of=o"],
        &["dd", "if=x.qcow2", "of=no/such/dir"],
        &["dd", "-q", "if=x.qcow2", "of=o"],
    ] {
        same("qemu-img", args, None, Cmp::All);
    }
}

#[test]
fn qemu_img_create_option_help_per_format() {
    for f in ["raw", "qcow2", "qed", "vdi", "vpc", "vmdk", "vhdx", "luks", "file", "bochs", "foo"] {
        same("qemu-img", &["create", "-f", f, "-o", "help"], None, Cmp::All);
        same("qemu-img", &["create", "-f", f, "-o", "cluster_size=4k,?", "t.img", "1M"], None, Cmp::All);
    }
    same("qemu-img", &["create", "-o", "help"], None, Cmp::All);
    same("qemu-img", &["create", "-f", "qcow2", "-o", "help=on", "t.img", "1M"], None, Cmp::All);
    same("qemu-img", &["create", "-f", "qcow2"], None, Cmp::All);
}

#[test]
fn qemu_img_convert_and_amend_option_help() {
    same("qemu-img", &["convert", "-O", "qcow2", "-o", "help", "x.qcow2", "y.qcow2"], None, Cmp::All);
    same("qemu-img", &["convert", "-O", "vmdk", "-o", "?"], None, Cmp::All);
    same("qemu-img", &["convert", "-o", "help"], None, Cmp::All);
    same("qemu-img", &["convert", "-O", "bochs", "-o", "help"], None, Cmp::All);
    for f in ["qcow2", "luks", "raw", "vmdk", "bochs", "foo"] {
        same("qemu-img", &["amend", "-f", f, "-o", "help"], None, Cmp::All);
    }
    same("qemu-img", &["amend", "-o", "help,bogus=1", "x.qcow2"], None, Cmp::All);
    same("qemu-img", &["amend", "-o", "help"], None, Cmp::All);
}

#[test]
fn qemu_img_malformed_option_lists_are_refused() {
    for list in
        [&["-o", "backing_file=x.qcow2,", "-o", "help"][..], &["-o", "a=b", "-o", ",help"], &["-o", ",,"], &["-o", ""]]
    {
        let mut args = vec!["create", "-f", "qcow2"];
        args.extend_from_slice(list);
        args.extend_from_slice(&["t.qcow2", "1M"]);
        same("qemu-img", &args, None, Cmp::All);
        let mut args = vec!["convert", "-O", "qcow2"];
        args.extend_from_slice(list);
        args.extend_from_slice(&["x.qcow2", "t.qcow2"]);
        same("qemu-img", &args, None, Cmp::All);
    }
    // A doubled comma is part of the value, quoted back doubled.
    same(
        "qemu-img",
        &["create", "-f", "qcow2", "-u", "-o", "backing_file=x.qcow2,,help", "-F", "qcow2", "t.qcow2", "1M"],
        None,
        Cmp::All,
    );
    same("qemu-img", &["amend", "-f", "qcow2", "-o", "backing_file=x.qcow2,,help", "x.qcow2"], None, Cmp::All);
}

#[test]
fn qemu_img_convert_copy_offloading_refusals() {
    for extra in [&["-S", "4k"][..], &["-c"], &["--salvage"]] {
        let mut args = vec!["convert", "-C", "-O", "qcow2"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["x.qcow2", "t.qcow2"]);
        same("qemu-img", &args, None, Cmp::All);
    }
}

#[test]
fn qemu_img_convert_progress_into_a_pipe_counts_data() {
    let (ours, theirs) = sides();
    for d in [ours.dir.path(), theirs.dir.path()] {
        crate::support::ok(d, "qemu-img", &["create", "-q", "-f", "qcow2", "p.qcow2", "64M"]);
        for at in ["0", "2M", "4M", "32M"] {
            crate::support::ok(d, "qemu-io", &["-f", "qcow2", "-c", &format!("write {at} 1M"), "p.qcow2"]);
        }
        crate::support::ok(d, "qemu-img", &["create", "-q", "-f", "qcow2", "empty.qcow2", "64M"]);
    }
    for args in [
        &["convert", "-p", "-O", "qcow2", "p.qcow2", "out.qcow2"][..],
        &["convert", "-p", "-O", "raw", "empty.qcow2", "out.raw"],
    ] {
        let o = run(&ours, "qemu-img", args, None);
        let t = run(&theirs, "qemu-img", args, None);
        assert!(t.stdout.starts_with("    (0.00/100%)\r"), "QEMU's own lines changed: {:?}", t.stdout);
        assert_eq!((o.code, &o.stdout, &o.stderr), (t.code, &t.stdout, &t.stderr), "{args:?}");
    }
}

/// iotest 313: zeros committed from the top free the base's clusters
/// (QEMU's commit writes them with unmapping allowed), on v2 and v3.
#[test]
fn qemu_img_commit_of_zeroes_frees_base_clusters() {
    for compat in ["1.1", "0.10"] {
        let (ours, theirs) = sides();
        let o = format!("compat={compat}");
        for d in [ours.dir.path(), theirs.dir.path()] {
            let ok = |args: &[&str]| crate::support::ok(d, args[0], &args[1..]);
            ok(&["qemu-img", "create", "-q", "-f", "qcow2", "-o", &o, "b0.qcow2", "4M"]);
            ok(&["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 4M", "b0.qcow2"]);
            ok(&["qemu-img", "create", "-q", "-f", "qcow2", "-o", &o, "-b", "b0.qcow2", "-F", "qcow2", "b1.qcow2"]);
            ok(&["qemu-io", "-f", "qcow2", "-c", "write -P 2 0 2M", "b1.qcow2"]);
            ok(&["qemu-img", "create", "-q", "-f", "qcow2", "-o", &o, "-b", "b1.qcow2", "-F", "qcow2", "top.qcow2"]);
            ok(&["qemu-io", "-f", "qcow2", "-c", "write -z 0 3M", "top.qcow2"]);
        }
        same_runs_in(&ours, &theirs, &[&["commit", "top.qcow2"], &["check", "b1.qcow2"]], &["b1.qcow2"]);
    }
}

/// iotest 019: `-o backing_file=` is -B by another name: what equals the
/// backing file stays unallocated in the target.
#[test]
fn qemu_img_convert_with_backing_file_option_copies_only_differences() {
    let (ours, theirs) = sides();
    for d in [ours.dir.path(), theirs.dir.path()] {
        let ok = |args: &[&str]| crate::support::ok(d, args[0], &args[1..]);
        ok(&["qemu-img", "create", "-q", "-f", "qcow2", "-b", "x.qcow2", "-F", "qcow2", "src.qcow2"]);
        ok(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x22 256k 64k", "src.qcow2"]);
    }
    let o = "backing_file=x.qcow2,backing_fmt=qcow2";
    same_runs_in(&ours, &theirs, &[&["convert", "-O", "qcow2", "-o", o, "src.qcow2", "out.qcow2"]], &["out.qcow2"]);
}

/// iotest 243: the file protocol's `extent_size_hint` and `nocow` are
/// taken by every format and quoted back after the format's options.
#[test]
fn qemu_img_create_takes_the_file_protocol_options() {
    for f in ["qcow2", "raw", "vmdk"] {
        for o in ["nocow=on,extent_size_hint=0", "extent_size_hint=4k,nocow=off", "nocow=maybe"] {
            same("qemu-img", &["create", "-f", f, "-o", o, "t.img", "1M"], None, Cmp::All);
        }
    }
}

/// iotest 314: `rebase -c` writes the clusters it copies compressed
/// (the disk's partial last cluster too); formats without compression
/// are refused in qemu-img's words.
#[test]
fn qemu_img_rebase_compressed_copies() {
    let (ours, theirs) = sides();
    for d in [ours.dir.path(), theirs.dir.path()] {
        let ok = |args: &[&str]| crate::support::ok(d, args[0], &args[1..]);
        ok(&["qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "300k"]);
        ok(&["qemu-io", "-f", "qcow2", "-c", "write -P 0xaa 0 300k", "base.qcow2"]);
        ok(&["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"]);
        ok(&["qemu-io", "-f", "qcow2", "-c", "write -P 0xbb 64k 64k", "top.qcow2"]);
    }
    same_runs_in(
        &ours,
        &theirs,
        &[
            &["rebase", "-c", "-b", "", "top.qcow2"],
            &["check", "top.qcow2"],
            &["rebase", "-c", "-f", "raw", "-b", "", "raw.img"],
        ],
        &[],
    );
    for side in [&ours, &theirs] {
        let r = crate::support::ok(
            side.dir.path(),
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "read -P 0xaa 0 64k",
                "-c",
                "read -P 0xbb 64k 64k",
                "-c",
                "read -P 0xaa 128k 172k",
                "top.qcow2",
            ],
        );
        assert!(!r.stdout.contains("Pattern verification failed"), "{}", r.stdout);
    }
}

/// iotest 126: `file:` names a plain file; a relative name with a colon
/// in it is shown with `./`, as QEMU shows it.
#[test]
fn qemu_img_file_protocol_prefix() {
    let (ours, theirs) = sides();
    same_runs_in(
        &ours,
        &theirs,
        &[
            &["create", "-f", "qcow2", "file:a:b.qcow2", "1M"],
            &["create", "-f", "qcow2", "-b", "./a:b.qcow2", "-F", "qcow2", "file:image:top.qcow2"],
            &["check", "file:x.qcow2"],
            &["map", "file:x.qcow2"],
            &["info", "file:missing.qcow2"],
        ],
        &[],
    );
    // New qcow2 files differ in length (oxcow pads the L1 table's
    // cluster): the names are what is compared here.
    let names = |side: &Side, f: &str| {
        let r = run(side, "qemu-img", &["info", f], None);
        r.stdout
            .lines()
            .filter(|l| l.starts_with("image:") || l.starts_with("backing file:"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    for f in ["file:image:top.qcow2", "file:x.qcow2", "file:./x.qcow2"] {
        assert_eq!(names(&ours, f), names(&theirs, f), "{f}");
    }
    assert!(names(&theirs, "file:image:top.qcow2").contains("./image:top.qcow2"));
}

/// iotest 103: qcow2 cache options given to qemu-io's `open -o` beside a
/// file name are applied, so sizes that do not fit together are refused.
#[test]
fn qemu_io_open_with_cache_options_beside_the_file_name() {
    for o in [
        "cache-size=1.25M,l2-cache-size=1M,refcount-cache-size=0.25M",
        "cache-size=1M,l2-cache-size=2M",
        "cache-size=1M,refcount-cache-size=2M",
        "l2-cache-entry-size=4242",
        "l2-cache-entry-size=128k",
        "cache-size=2M,l2-cache-size=1M",
    ] {
        same("qemu-io", &["-c", &format!("open -o {o} x.qcow2"), "-c", "read -P 0x11 64k 64k"], None, Cmp::All);
    }
}

/// iotest 052: qemu-io -s writes into a temporary overlay; the image
/// itself is left as it was, and no overlay is left behind.
#[test]
fn qemu_io_snapshot_mode_leaves_the_image_unchanged() {
    let (ours, theirs) = sides();
    let cmds: &[&[&str]] = &[
        &["-s", "-c", "write -P 0x77 0 128k", "-c", "read -P 0x77 0 128k", "x.qcow2"],
        &["-s", "-f", "qcow2", "-c", "write -z 64k 64k", "-c", "read -P 0 64k 64k", "x.qcow2"],
        &["-c", "read -P 0 0 64k", "-c", "read -P 0x11 64k 64k", "x.qcow2"],
        &["-s", "-c", "read 0 512", "missing.qcow2"],
    ];
    for args in cmds {
        let o = run(&ours, "qemu-io", args, None);
        let t = run(&theirs, "qemu-io", args, None);
        assert_eq!((o.code, &o.stdout, &o.stderr), (t.code, &t.stdout, &t.stderr), "{args:?}");
    }
    let pid_files = std::fs::read_dir(std::env::temp_dir())
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("oxcow-io-snapshot-"))
                .count()
        })
        .unwrap_or(0);
    // Other tests may be running theirs right now; a leak would pile up.
    assert!(pid_files < 8, "{pid_files} temporary overlays left behind");
}
