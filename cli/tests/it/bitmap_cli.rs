//! Persistent dirty bitmaps against QEMU: the same operation run by oxcow
//! and by QEMU's tools on copies of one image must leave the same bitmaps
//! (names, flags, granularity: `qemu-img info`) with the same dirty
//! ranges, and oxcow's image must check clean with `qemu-img check`.

use crate::support::{json, ok, oxcow, qemu_img, run_in, tmp};
use serde_json::Value;
use std::path::Path;

/// An image with QEMU's bitmaps: `b0` enabled, `b1` disabled at 128 KiB,
/// some data written while b0 was recording.
fn base(dir: &Path, name: &str) {
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", name, "64M"]);
    ok(dir, "qemu-img", &["bitmap", "--add", name, "b0"]);
    ok(dir, "qemu-img", &["bitmap", "--add", "-g", "128k", "--disable", name, "b1"]);
    ok(dir, "qemu-io", &["-c", "write -P 1 1M 64k", "-c", "write -z 8M 1M", name]);
}

fn bitmaps_info(dir: &Path, name: &str) -> Value {
    let r = ok(dir, "qemu-img", &["info", "--output=json", name]);
    json(&r.stdout)["format-specific"]["data"]["bitmaps"].clone()
}

/// A bitmap's name and its dirty ranges (or why it has none).
type DirtyMap = (String, Result<Vec<(u64, u64)>, String>);

/// Every bitmap's dirty ranges, read by oxcow's library (consistent
/// bitmaps only; inconsistent ones give their error text).
fn dirty_maps(dir: &Path, name: &str) -> Vec<DirtyMap> {
    let img = oxcow::open(dir.join(name), &oxcow::OpenOptions::read_only()).unwrap();
    let q = img.qcow2().unwrap();
    q.bitmaps()
        .unwrap()
        .into_iter()
        .map(|b| {
            let d = q.bitmap_data(&b.name).map(|d| d.dirty_extents()).map_err(|e| e.to_string());
            (b.name, d)
        })
        .collect()
}

fn assert_same_bitmaps(dir: &Path, ours: &str, theirs: &str) {
    assert_eq!(bitmaps_info(dir, ours), bitmaps_info(dir, theirs), "qemu-img info bitmaps");
    assert_eq!(dirty_maps(dir, ours), dirty_maps(dir, theirs), "dirty ranges");
    let c = qemu_img(dir, &["check", ours]);
    assert_eq!(c.code, 0, "qemu-img check of oxcow's image:\n{}{}", c.stdout, c.stderr);
    let c = oxcow(dir, &["check", ours]);
    assert_eq!(c.code, 0, "oxcow check:\n{}{}", c.stdout, c.stderr);
}

/// Runs `ours` with oxcow and `theirs` with QEMU's tool on two copies of
/// the base image (`{}` in the arguments is the image) and compares.
fn same_as_qemu(ours: &[&str], qemu_prog: &str, theirs: &[&str], want: i32) {
    let d = tmp();
    let dir = d.path();
    base(dir, "a.qcow2");
    std::fs::copy(dir.join("a.qcow2"), dir.join("b.qcow2")).unwrap();
    let sub = |args: &[&str], f: &'static str| args.iter().map(|a| a.replace("{}", f)).collect::<Vec<_>>();
    let a = sub(ours, "a.qcow2");
    let b = sub(theirs, "b.qcow2");
    let ra = oxcow(dir, &a.iter().map(String::as_str).collect::<Vec<_>>());
    let rb = run_in(dir, qemu_prog, &b.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!((ra.code, rb.code), (want, want), "oxcow {}{}\nqemu {}{}", ra.stdout, ra.stderr, rb.stdout, rb.stderr);
    assert_same_bitmaps(dir, "a.qcow2", "b.qcow2");
}

#[test]
fn io_writes_zeroes_and_discards_are_recorded_in_enabled_bitmaps_only() {
    let cmds = ["-c", "write 2M 64k", "-c", "write -z 16M 3M", "-c", "discard 30M 128k", "-c", "write 63M 4k", "{}"];
    let mut ours = vec!["io"];
    ours.extend_from_slice(&cmds);
    same_as_qemu(&ours, "qemu-io", &cmds, 0);
}

#[test]
fn snapshot_create_and_delete_keep_bitmaps() {
    same_as_qemu(&["snapshot", "-c", "s1", "{}"], "qemu-img", &["snapshot", "-c", "s1", "{}"], 0);
}

#[test]
fn snapshot_apply_is_refused_with_bitmaps() {
    let d = tmp();
    let dir = d.path();
    base(dir, "a.qcow2");
    ok(dir, "qemu-img", &["snapshot", "-c", "s1", "a.qcow2"]);
    let r = oxcow(dir, &["snapshot", "-a", "s1", "a.qcow2"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("Could not apply snapshot 's1': Device has active dirty bitmaps"), "{}", r.stderr);
    let q = qemu_img(dir, &["snapshot", "-a", "s1", "a.qcow2"]);
    assert_eq!(q.code, 1);
    assert_eq!(qemu_img(dir, &["check", "a.qcow2"]).code, 0);
}

#[test]
fn resize_grows_and_shrinks_bitmaps() {
    same_as_qemu(&["resize", "{}", "128M"], "qemu-img", &["resize", "{}", "128M"], 0);
    same_as_qemu(&["resize", "--shrink", "{}", "2M"], "qemu-img", &["resize", "--shrink", "{}", "2M"], 0);
}

#[test]
fn amend_keeps_bitmaps() {
    same_as_qemu(
        &["amend", "-o", "lazy_refcounts=on", "{}"],
        "qemu-img",
        &["amend", "-o", "lazy_refcounts=on", "{}"],
        0,
    );
}

#[test]
fn check_repair_keeps_bitmaps() {
    same_as_qemu(&["check", "-r", "all", "{}"], "qemu-img", &["check", "-r", "all", "{}"], 0);
}

#[test]
fn bitmap_subcommand_matches_qemu_img() {
    let seqs: &[(&[&str], i32)] = &[
        (&["--add", "{}", "n"], 0),
        (&["--add", "-g", "512", "--disable", "{}", "n"], 0),
        (&["--remove", "{}", "b0"], 0),
        (&["--remove", "{}", "b1"], 0),
        (&["--clear", "{}", "b0"], 0),
        (&["--disable", "{}", "b0"], 0),
        (&["--enable", "{}", "b1"], 0),
        (&["--merge", "b0", "{}", "b1"], 0),
        (&["--add", "--merge", "b0", "-g", "4k", "{}", "n"], 0),
        (&["--add", "--remove", "{}", "n"], 0),
        (&["--add", "{}", "b0"], 1),
        (&["--remove", "{}", "zz"], 1),
        (&["--merge", "zz", "{}", "b1"], 1),
        (&["--add", "-g", "1000", "{}", "x"], 1),
    ];
    for &(seq, want) in seqs {
        let mut ours = vec!["bitmap"];
        ours.extend_from_slice(seq);
        let mut theirs = vec!["bitmap"];
        theirs.extend_from_slice(seq);
        same_as_qemu(&ours, "qemu-img", &theirs, want);
    }
}

#[test]
fn bitmap_errors_are_worded_as_qemu_img() {
    let d = tmp();
    let dir = d.path();
    base(dir, "a.qcow2");
    for (args, want) in [
        (&["--add", "a.qcow2", "b0"][..], "Operation add on bitmap b0 failed: Bitmap already exists: b0"),
        (&["--remove", "a.qcow2", "zz"], "Operation remove on bitmap zz failed: Dirty bitmap 'zz' not found"),
        (&["--add", "-g", "256", "a.qcow2", "x"], "failed: Granularity must be power of 2 and at least 512"),
        (&["--add", "a.qcow2"], "Expecting filename and bitmap name"),
    ] {
        let mut a = vec!["bitmap"];
        a.extend_from_slice(args);
        let r = oxcow(dir, &a);
        assert_eq!(r.code, 1, "{args:?}");
        assert!(r.stderr.contains(want), "{args:?}: {}", r.stderr);
    }
}

#[test]
fn merge_from_another_image() {
    let d = tmp();
    let dir = d.path();
    base(dir, "src.qcow2");
    base(dir, "a.qcow2");
    std::fs::copy(dir.join("a.qcow2"), dir.join("b.qcow2")).unwrap();
    ok(dir, "qemu-io", &["-c", "write 40M 64k", "src.qcow2"]);
    let args = |f: &'static str| ["bitmap", "--merge", "b0", "-b", "src.qcow2", "-F", "qcow2", f, "b1"];
    ok(dir, crate::support::OXCOW, &args("a.qcow2"));
    ok(dir, "qemu-img", &args("b.qcow2"));
    assert_same_bitmaps(dir, "a.qcow2", "b.qcow2");
}

/// A bitmap left in use by a crash (QEMU aborted while writing) stays
/// inconsistent through oxcow's writes and checks as qemu-img does.
#[test]
fn in_use_bitmap_after_a_crash_is_kept_inconsistent() {
    let d = tmp();
    let dir = d.path();
    base(dir, "a.qcow2");
    let r = run_in(dir, "qemu-io", &["-c", "write 0 64k", "-c", "abort", "a.qcow2"]);
    assert_ne!(r.code, 0, "qemu-io abort");
    std::fs::copy(dir.join("a.qcow2"), dir.join("b.qcow2")).unwrap();
    ok(dir, crate::support::OXCOW, &["io", "-c", "write 4M 64k", "a.qcow2"]);
    ok(dir, "qemu-io", &["-c", "write 4M 64k", "b.qcow2"]);
    assert_same_bitmaps(dir, "a.qcow2", "b.qcow2");
    let info = bitmaps_info(dir, "a.qcow2");
    assert_eq!(info[0]["flags"], serde_json::json!(["in-use", "auto"]));
    // QEMU's rules for an inconsistent bitmap: resize refused, removal works.
    let r = oxcow(dir, &["resize", "a.qcow2", "128M"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("Bitmap 'b0' is inconsistent and cannot be used"), "{}", r.stderr);
    let r = oxcow(dir, &["bitmap", "--clear", "a.qcow2", "b0"]);
    assert!(r.stderr.contains("Operation clear on bitmap b0 failed: Bitmap 'b0' is inconsistent"), "{}", r.stderr);
    ok(dir, crate::support::OXCOW, &["bitmap", "--remove", "a.qcow2", "b0"]);
    ok(dir, "qemu-img", &["bitmap", "--remove", "b.qcow2", "b0"]);
    assert_same_bitmaps(dir, "a.qcow2", "b.qcow2");
}

#[test]
fn info_human_output_matches_qemu_img() {
    let d = tmp();
    let dir = d.path();
    base(dir, "a.qcow2");
    let section = |s: &str| s.lines().skip_while(|l| !l.contains("bitmaps:")).take(12).collect::<Vec<_>>().join("\n");
    let ours = ok(dir, crate::support::OXCOW, &["info", "a.qcow2"]).stdout;
    let theirs = ok(dir, "qemu-img", &["info", "a.qcow2"]).stdout;
    assert_eq!(section(&ours), section(&theirs));
}

#[test]
fn convert_carries_bitmaps_as_qemu_img_does() {
    let d = tmp();
    let dir = d.path();
    base(dir, "src.qcow2");
    ok(dir, crate::support::OXCOW, &["convert", "--bitmaps", "-O", "qcow2", "src.qcow2", "a.qcow2"]);
    ok(dir, "qemu-img", &["convert", "--bitmaps", "-O", "qcow2", "src.qcow2", "b.qcow2"]);
    assert_same_bitmaps(dir, "a.qcow2", "b.qcow2");
    let r = oxcow(dir, &["convert", "--bitmaps", "-O", "raw", "src.qcow2", "x.raw"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("Format driver 'raw' does not support bitmaps"), "{}", r.stderr);
    // A bitmap left in use: refused, or skipped on request.
    assert_ne!(run_in(dir, "qemu-io", &["-c", "write 0 64k", "-c", "abort", "src.qcow2"]).code, 0);
    let r = oxcow(dir, &["convert", "--bitmaps", "-O", "qcow2", "src.qcow2", "c.qcow2"]);
    assert_eq!(r.code, 1);
    // QEMU names the last inconsistent bitmap of the directory.
    assert!(r.stderr.contains("Cannot copy inconsistent bitmap 'b1'"), "{}", r.stderr);
    let args = |f: &'static str| ["convert", "--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2", "src.qcow2", f];
    let r = ok(dir, crate::support::OXCOW, &args("c.qcow2"));
    assert!(r.stderr.contains("Skipping inconsistent bitmap 'b0'"), "{}", r.stderr);
    ok(dir, "qemu-img", &args("d.qcow2"));
    assert_same_bitmaps(dir, "c.qcow2", "d.qcow2");
}

/// Serves `file` with `prog` (oxcow serve or qemu-nbd) exporting bitmap
/// b0, runs guest writes over NBD, and returns `qemu-img map` of the
/// `qemu:dirty-bitmap:b0` context (checked equal to `oxcow map`'s) with
/// the server still running.
fn served_dirty_map(dir: &Path, prog: &[&str], file: &str, sock: &str) -> (Server, String) {
    use crate::support::process::wait_for_socket;
    let path = dir.join(sock);
    let mut args: Vec<&str> = prog[1..].to_vec();
    let sock_path = path.to_str().unwrap().to_string();
    args.extend_from_slice(&["-t", "-k", &sock_path, "-B", "b0", file]);
    if file.starts_with("multi") {
        args.splice(args.len() - 1.., ["-B", "b1", file]);
    }
    let mut child = std::process::Command::new(prog[0])
        .args(&args)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for_socket(&path, Some(&mut child), prog[0]);
    let child = Server(Some(child));
    let url = format!("nbd+unix:///?socket={sock_path}");
    ok(
        dir,
        "qemu-io",
        &["-f", "raw", "-c", "write -P 3 5M 64k", "-c", "write -z 50M 4k", "-c", "discard 60M 1M", &url],
    );
    let opts = format!("driver=nbd,server.type=unix,server.path={sock_path},x-dirty-bitmap=qemu:dirty-bitmap:b0");
    let map = ok(dir, "qemu-img", &["map", "--output=json", "--image-opts", &opts]).stdout;
    // oxcow's NBD client reads the context the same way (x-dirty-bitmap).
    let ours = ok(dir, crate::support::OXCOW, &["map", "--output=json", "--image-opts", &opts]).stdout;
    assert_eq!(ours, map, "oxcow map with x-dirty-bitmap");
    (child, map)
}

/// A server process, killed if a failing test leaves it running.
struct Server(Option<std::process::Child>);

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Stops a server as a user would (SIGTERM) and insists on a clean exit.
fn stop(mut server: Server) {
    let Some(mut child) = server.0.take() else { return };
    let _ = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    assert!(child.wait().unwrap().success());
}

/// `serve -B` answers block status of `qemu:dirty-bitmap:b0` as
/// `qemu-nbd -B` does, live (writes through the export show), and the
/// bitmap stored at exit has them.
#[test]
fn serve_exports_dirty_bitmap_as_qemu_nbd() {
    let d = tmp();
    let dir = d.path();
    base(dir, "a.qcow2");
    std::fs::copy(dir.join("a.qcow2"), dir.join("b.qcow2")).unwrap();
    let (ours, map_a) = served_dirty_map(dir, &[crate::support::OXCOW, "serve"], "a.qcow2", "a.sock");
    let (theirs, map_b) = served_dirty_map(dir, &["qemu-nbd"], "b.qcow2", "b.sock");
    assert_eq!(map_a, map_b, "dirty map over NBD");
    assert!(map_a.contains("\"start\": 5242880, \"length\": 65536"), "{map_a}");
    stop(ours);
    stop(theirs);
    assert_same_bitmaps(dir, "a.qcow2", "b.qcow2");
    // Several bitmaps: the same contexts listed, the same maps of each.
    std::fs::copy(dir.join("a.qcow2"), dir.join("multi-a.qcow2")).unwrap();
    std::fs::copy(dir.join("b.qcow2"), dir.join("multi-b.qcow2")).unwrap();
    let (ours, _) = served_dirty_map(dir, &[crate::support::OXCOW, "serve"], "multi-a.qcow2", "ma.sock");
    let (theirs, _) = served_dirty_map(dir, &["qemu-nbd"], "multi-b.qcow2", "mb.sock");
    let contexts = |sock: &str| {
        let out = ok(dir, "qemu-nbd", &["--list", "-k", dir.join(sock).to_str().unwrap()]).stdout;
        out.lines().skip_while(|l| !l.contains("available meta contexts")).map(String::from).collect::<Vec<_>>()
    };
    assert_eq!(contexts("ma.sock"), contexts("mb.sock"));
    for b in ["b0", "b1"] {
        let opts = |sock: &str| {
            let p = dir.join(sock);
            format!("driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{b}", p.display())
        };
        let map = |sock: &str| ok(dir, "qemu-img", &["map", "--output=json", "--image-opts", &opts(sock)]).stdout;
        assert_eq!(map("ma.sock"), map("mb.sock"), "{b}");
        // libnbd's view too, where it is installed.
        let nbdinfo = |sock: &str| {
            let url = format!("nbd+unix:///?socket={}", dir.join(sock).display());
            let ctx = format!("--map=qemu:dirty-bitmap:{b}");
            std::process::Command::new("nbdinfo").args([&ctx, &url]).output().ok().map(|o| o.stdout)
        };
        if let (Some(x), Some(y)) = (nbdinfo("ma.sock"), nbdinfo("mb.sock")) {
            assert_eq!(String::from_utf8_lossy(&x), String::from_utf8_lossy(&y), "nbdinfo --map of {b}");
        }
    }
    stop(ours);
    stop(theirs);
    assert_same_bitmaps(dir, "multi-a.qcow2", "multi-b.qcow2");
    let r = oxcow(dir, &["serve", "-k", "x.sock", "-B", "zz", "a.qcow2"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("Bitmap 'zz' is not found"), "{}", r.stderr);
}

/// The incremental backup workflow of QEMU's bitmap documentation, end
/// to end: full backup, guest writes through `oxcow serve`, a pull of
/// only the extents the bitmap calls dirty (block status over NBD),
/// applied to the backup, makes it equal to the image; then the bitmap
/// is cleared for the next round.
#[test]
fn incremental_backup_over_nbd_pulls_only_dirty_extents() {
    let d = tmp();
    let dir = d.path();
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "vm.qcow2", "64M"]);
    ok(dir, "qemu-io", &["-c", "write -P 1 0 8M", "vm.qcow2"]);
    // Full backup, and a bitmap that records from then on.
    ok(dir, crate::support::OXCOW, &["convert", "-O", "qcow2", "vm.qcow2", "backup.qcow2"]);
    ok(dir, crate::support::OXCOW, &["bitmap", "--add", "vm.qcow2", "b0"]);
    let (server, map) = served_dirty_map(dir, &[crate::support::OXCOW, "serve"], "vm.qcow2", "vm.sock");
    // Dirty extents are those the map shows as not present.
    let dirty: Vec<(u64, u64)> = json(&map)
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["present"] == false)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    // The discard is not among them: serve ignores discards by default,
    // as qemu-nbd does, so the disk did not change there.
    assert_eq!(dirty, vec![(5 << 20, 65536), (50 << 20, 65536)]);
    let url = format!("nbd+unix:///?socket={}", dir.join("vm.sock").display());
    let src = oxcow::open(&url, &oxcow::OpenOptions::read_only().format(Some(oxcow::Format::Raw))).unwrap();
    let dst = oxcow::open(dir.join("backup.qcow2"), &oxcow::OpenOptions::read_write()).unwrap();
    for (off, len) in dirty {
        let mut buf = vec![0u8; len as usize];
        src.device().read_at(&mut buf, off).unwrap();
        dst.device().write_at(&buf, off).unwrap();
    }
    dst.close().unwrap();
    drop((dst, src));
    stop(server);
    ok(dir, "qemu-img", &["compare", "vm.qcow2", "backup.qcow2"]);
    // Next round: a clean bitmap.
    ok(dir, crate::support::OXCOW, &["bitmap", "--clear", "vm.qcow2", "b0"]);
    let img = oxcow::open(dir.join("vm.qcow2"), &oxcow::OpenOptions::read_only()).unwrap();
    assert!(img.qcow2().unwrap().bitmap_data("b0").unwrap().dirty_extents().is_empty());
    assert_eq!(qemu_img(dir, &["check", "vm.qcow2"]).code, 0);
}

/// Commit writes into the base through its bitmaps; a safe rebase onto
/// nothing copies the old backing data into the overlay through its own:
/// both record what they write, as QEMU's do.
#[test]
fn commit_and_rebase_record_their_writes() {
    let d = tmp();
    let dir = d.path();
    for t in ["a", "b"] {
        let (base, top) = (format!("base-{t}.qcow2"), format!("top-{t}.qcow2"));
        ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", &base, "64M"]);
        ok(dir, "qemu-img", &["bitmap", "--add", &base, "b0"]);
        ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &top]);
        ok(dir, "qemu-io", &["-c", "write -P 4 3M 128k", &top]);
        ok(dir, "qemu-img", &["bitmap", "--add", &top, "t0"]);
        ok(dir, "qemu-io", &["-c", "write -P 5 9M 64k", &base]);
    }
    ok(dir, crate::support::OXCOW, &["rebase", "-b", "", "top-a.qcow2"]);
    ok(dir, "qemu-img", &["rebase", "-b", "", "top-b.qcow2"]);
    assert_same_bitmaps(dir, "top-a.qcow2", "top-b.qcow2");
    for t in ["a", "b"] {
        ok(
            dir,
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-b", &format!("base-{t}.qcow2"), "-F", "qcow2", &format!("o-{t}.qcow2")],
        );
        ok(dir, "qemu-io", &["-c", "write -P 6 20M 256k", &format!("o-{t}.qcow2")]);
    }
    ok(dir, crate::support::OXCOW, &["commit", "o-a.qcow2"]);
    ok(dir, "qemu-img", &["commit", "o-b.qcow2"]);
    assert_same_bitmaps(dir, "base-a.qcow2", "base-b.qcow2");
}

/// compat=0.10 has no bitmaps: QEMU's downgrade abandons them (leaked
/// clusters, `check` exit 3); oxcow's removes them and frees their
/// clusters, so the v2 image checks clean.
#[test]
fn amend_to_compat_0_10_drops_bitmaps_cleanly() {
    let d = tmp();
    let dir = d.path();
    base(dir, "a.qcow2");
    ok(dir, crate::support::OXCOW, &["amend", "-o", "compat=0.10", "a.qcow2"]);
    let c = qemu_img(dir, &["check", "a.qcow2"]);
    assert_eq!(c.code, 0, "{}{}", c.stdout, c.stderr);
    let info = json(&ok(dir, "qemu-img", &["info", "--output=json", "a.qcow2"]).stdout);
    assert_eq!(info["format-specific"]["data"]["compat"], "0.10");
    assert!(info["format-specific"]["data"]["bitmaps"].is_null());
    ok(dir, "qemu-io", &["-c", "read -P 1 1M 64k", "a.qcow2"]);
}

/// An image whose bitmaps a program without bitmap support touched (the
/// autoclear bit cleared, as oxcow itself did before it kept bitmaps):
/// QEMU ignores the extension, counts its clusters as leaks and drops it
/// on the next writable open; so does oxcow.
#[test]
fn bitmaps_without_their_autoclear_bit_are_ignored_and_dropped_as_qemu_does() {
    let d = tmp();
    let dir = d.path();
    base(dir, "a.qcow2");
    // Autoclear features: header bytes 88..96; bit 0 is the bitmaps bit.
    let mut bytes = std::fs::read(dir.join("a.qcow2")).unwrap();
    bytes[95] &= !1;
    std::fs::write(dir.join("a.qcow2"), &bytes).unwrap();
    std::fs::write(dir.join("b.qcow2"), &bytes).unwrap();
    let fmt = |f: &str, prog: &str| {
        let r = ok(dir, prog, &["info", "--output=json", f]);
        json(&r.stdout)["format-specific"].clone()
    };
    assert_eq!(fmt("a.qcow2", crate::support::OXCOW), fmt("b.qcow2", "qemu-img"));
    assert_eq!(oxcow(dir, &["check", "a.qcow2"]).code, 3);
    assert_eq!(qemu_img(dir, &["check", "b.qcow2"]).code, 3);
    ok(dir, crate::support::OXCOW, &["check", "-r", "all", "a.qcow2"]);
    ok(dir, "qemu-img", &["check", "-r", "all", "b.qcow2"]);
    assert_eq!(qemu_img(dir, &["check", "a.qcow2"]).code, 0);
    assert_eq!(fmt("a.qcow2", "qemu-img"), fmt("b.qcow2", "qemu-img"));
    let ours = ok(dir, crate::support::OXCOW, &["info", "a.qcow2"]).stdout;
    assert!(!ours.contains("bitmaps:"), "{ours}");
}

/// A bitmap over 512 MiB (512-byte granularity past 2 TiB) is one QEMU
/// refuses to open: `bitmap --add` refuses it with qemu-img's words, and
/// `resize` refuses to grow an image past where a bitmap still fits
/// (QEMU resizes and then loses the bitmap), leaving the size and the
/// bitmap as they were.
#[test]
fn bitmaps_over_qemus_size_limit_are_refused_before_a_byte_changes() {
    let d = tmp();
    let dir = d.path();
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "big.qcow2", "3T"]);
    let q = qemu_img(dir, &["bitmap", "--add", "-g", "512", "big.qcow2", "b0"]);
    let o = oxcow(dir, &["bitmap", "--add", "-g", "512", "big.qcow2", "b0"]);
    assert_eq!((o.code, q.code), (1, 1));
    let words = "Too much space will be occupied by the bitmap. Use larger granularity";
    assert!(q.stderr.contains(words) && o.stderr.contains(words), "{}\n{}", q.stderr, o.stderr);

    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "a.qcow2", "1T"]);
    ok(dir, "qemu-img", &["bitmap", "--add", "-g", "512", "a.qcow2", "b0"]);
    ok(dir, "qemu-io", &["-c", "write 1M 4k", "a.qcow2"]);
    let before = (bitmaps_info(dir, "a.qcow2"), dirty_maps(dir, "a.qcow2"));
    let r = oxcow(dir, &["resize", "a.qcow2", "3T"]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("bitmap 'b0' would not fit"), "{}", r.stderr);
    let info = json(&ok(dir, "qemu-img", &["info", "--output=json", "a.qcow2"]).stdout);
    assert_eq!(info["virtual-size"], 1u64 << 40);
    assert!(
        before == (bitmaps_info(dir, "a.qcow2"), dirty_maps(dir, "a.qcow2")),
        "a refused resize changed the bitmap"
    );
    assert_eq!(qemu_img(dir, &["check", "a.qcow2"]).code, 0);
    // Exactly at the limit it fits, and QEMU still opens the bitmap.
    ok(dir, crate::support::OXCOW, &["resize", "a.qcow2", "2T"]);
    let info = bitmaps_info(dir, "a.qcow2");
    assert_eq!(info[0]["name"], "b0", "{info}");
    assert_eq!(qemu_img(dir, &["check", "a.qcow2"]).code, 0);
}

/// A metadata context the server does not offer is an open error, with
/// QEMU's words, never a map made up from nothing.
#[test]
fn x_dirty_bitmap_of_a_missing_context_is_refused() {
    let d = tmp();
    let dir = d.path();
    base(dir, "a.qcow2");
    let (server, _) = served_dirty_map(dir, &[crate::support::OXCOW, "serve"], "a.qcow2", "a.sock");
    let opts =
        format!("driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:nope", dir.join("a.sock").display());
    let r = oxcow(dir, &["map", "--image-opts", &opts]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("requested x-dirty-bitmap qemu:nope not found"), "{}", r.stderr);
    stop(server);
}
