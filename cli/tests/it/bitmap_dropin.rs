//! Persistent bitmaps through the drop-in names, against QEMU's tools on
//! copies of the same images: where the stored bitmaps land in the file
//! (iotests 190 and 303 look at that), convert's refusal and skipping of
//! inconsistent bitmaps, `bitmap` on an image whose backing file is
//! missing or opened by option string, and qemu-nbd `-B` with a bitmap
//! of the backing file (qemu-img-bitmaps).

use crate::dropin::{bare_sides, run, same_on, Cmp, Side};
use crate::support::ok;
use crate::support::process::wait_for_socket;

/// Runs `tool args` on both sides; both must succeed.
fn both(ours: &Side, theirs: &Side, tool: &str, args: &[&str]) {
    for side in [ours, theirs] {
        let r = run(side, tool, args, None);
        assert_eq!(r.code, 0, "{tool} {args:?} in {}:\n{}{}", side.bin.display(), r.stdout, r.stderr);
    }
}

/// The same image, made by QEMU's qemu-img, on both sides.
fn qemu_made(ours: &Side, theirs: &Side, args: &[&str]) {
    for d in [ours.dir.path(), theirs.dir.path()] {
        ok(d, "qemu-img", args);
    }
}

/// `tool args` gives the same status and stderr on both sides, and the
/// same stdout but for the lines `skip` picks (host allocation).
fn same_but(ours: &Side, theirs: &Side, tool: &str, args: &[&str], skip: &str) {
    let keep = |s: &str| s.lines().filter(|l| !l.trim_start().starts_with(skip)).collect::<Vec<_>>().join("\n");
    let (o, t) = (run(ours, tool, args, None), run(theirs, tool, args, None));
    assert_eq!((o.code, &o.stderr), (t.code, &t.stderr), "{tool} {args:?}: status and stderr (oxcow, QEMU)");
    assert_eq!(keep(&o.stdout), keep(&t.stdout), "{tool} {args:?}: stdout (oxcow, QEMU)");
}

/// `qemu-img info`, but for the space the host gave the file.
fn same_info(ours: &Side, theirs: &Side, args: &[&str]) {
    let mut a = vec!["info"];
    a.extend_from_slice(args);
    same_but(ours, theirs, "qemu-img", &a, "disk size:");
}

fn same_file(ours: &Side, theirs: &Side, name: &str) {
    let a = std::fs::read(ours.dir.path().join(name)).unwrap();
    let b = std::fs::read(theirs.dir.path().join(name)).unwrap();
    assert_eq!(a.len(), b.len(), "{name}: file length (oxcow, QEMU)");
    if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!("{name}: first difference at byte {i:#x} (oxcow {:#x}, QEMU {:#x})", a[i], b[i]);
    }
}

/// Every store writes every consistent bitmap anew, data, table, then
/// the directory, unpadded, and frees (discarding the data clusters) the
/// old ones: the file comes out byte for byte as QEMU's, through adds,
/// guest writes, a writable open that writes nothing, merge and clear.
#[test]
fn bitmap_store_lays_out_the_file_as_qemu() {
    let (ours, theirs) = bare_sides();
    qemu_made(&ours, &theirs, &["create", "-q", "-f", "qcow2", "x.qcow2", "64M"]);
    both(&ours, &theirs, "qemu-img", &["bitmap", "--add", "-g", "32768", "x.qcow2", "b1"]);
    for d in [ours.dir.path(), theirs.dir.path()] {
        // Guest data written by QEMU on both sides: where oxcow places
        // new data clusters is not the question here.
        ok(d, "qemu-io", &["-c", "write 0 1M", "-c", "write 8M 64k", "x.qcow2"]);
    }
    both(&ours, &theirs, "qemu-io", &["-c", "read 0 512", "x.qcow2"]);
    same_file(&ours, &theirs, "x.qcow2");
    both(&ours, &theirs, "qemu-img", &["bitmap", "--add", "--disable", "x.qcow2", "b2"]);
    both(&ours, &theirs, "qemu-img", &["bitmap", "--merge", "b1", "x.qcow2", "b2"]);
    both(&ours, &theirs, "qemu-img", &["bitmap", "--clear", "x.qcow2", "b1"]);
    same_file(&ours, &theirs, "x.qcow2");
}

/// A removal takes the bitmap off the disk at once in QEMU (its own
/// directory store, the space freed before the close's store): the file
/// still comes out byte for byte as QEMU's, a bitmap removed and added
/// again in one call included.
#[test]
fn bitmap_remove_lays_out_the_file_as_qemu() {
    let (ours, theirs) = bare_sides();
    qemu_made(&ours, &theirs, &["create", "-q", "-f", "qcow2", "x.qcow2", "64M"]);
    both(&ours, &theirs, "qemu-img", &["bitmap", "--add", "-g", "32768", "x.qcow2", "b1"]);
    both(&ours, &theirs, "qemu-img", &["bitmap", "--add", "x.qcow2", "b2"]);
    both(&ours, &theirs, "qemu-img", &["bitmap", "--add", "x.qcow2", "b3"]);
    for d in [ours.dir.path(), theirs.dir.path()] {
        ok(d, "qemu-io", &["-c", "write 0 1M", "-c", "write 8M 64k", "x.qcow2"]);
    }
    both(&ours, &theirs, "qemu-img", &["bitmap", "--remove", "x.qcow2", "b2"]);
    same_file(&ours, &theirs, "x.qcow2");
    both(&ours, &theirs, "qemu-img", &["bitmap", "--disable", "--remove", "--add", "x.qcow2", "b1"]);
    both(&ours, &theirs, "qemu-img", &["bitmap", "--remove", "x.qcow2", "b3"]);
    same_file(&ours, &theirs, "x.qcow2");
}

/// iotest 190's image: 2 TiB with 2 MiB clusters and two empty bitmaps.
/// The directory, last in the file, ends it (QEMU writes it unpadded), so
/// the file measured as raw gives QEMU's numbers.
#[test]
fn bitmap_directory_ends_the_file_as_qemu() {
    let (ours, theirs) = bare_sides();
    qemu_made(&ours, &theirs, &["create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", "x.qcow2", "2T"]);
    both(&ours, &theirs, "qemu-img", &["bitmap", "--add", "--granularity", "512", "-f", "qcow2", "x.qcow2", "b1"]);
    both(&ours, &theirs, "qemu-img", &["bitmap", "--add", "-g", "2M", "-f", "qcow2", "x.qcow2", "b2"]);
    same_file(&ours, &theirs, "x.qcow2");
    // The required size of a file read as raw follows the host's
    // allocation of it (iotest 190 hides it too).
    same_but(&ours, &theirs, "qemu-img", &["measure", "-O", "qcow2", "-f", "raw", "x.qcow2"], "required size:");
    same_on(&ours, &theirs, "qemu-img", &["measure", "-O", "qcow2", "-f", "qcow2", "x.qcow2"], None, Cmp::All);
}

/// An image whose bitmaps b0 and b1 were left in use by a crash, and a
/// consistent b2 added after.
fn broken_bitmaps(ours: &Side, theirs: &Side) {
    for d in [ours.dir.path(), theirs.dir.path()] {
        ok(d, "qemu-img", &["create", "-q", "-f", "qcow2", "x.qcow2", "4M"]);
        ok(d, "qemu-img", &["bitmap", "--add", "x.qcow2", "b0"]);
        ok(d, "qemu-img", &["bitmap", "--add", "--disable", "x.qcow2", "b1"]);
        let r = crate::support::run_in(d, "qemu-io", &["-c", "write 0 64k", "-c", "abort", "x.qcow2"]);
        assert_ne!(r.code, 0, "qemu-io abort");
        ok(d, "qemu-img", &["bitmap", "--add", "x.qcow2", "b2"]);
    }
}

/// QEMU goes through the bitmaps last in the directory first: the one it
/// refuses and the order of its warnings follow, worded with its name.
#[test]
fn convert_bitmaps_refuses_and_skips_inconsistent_ones_as_qemu() {
    let (ours, theirs) = bare_sides();
    broken_bitmaps(&ours, &theirs);
    same_on(&ours, &theirs, "qemu-img", &["convert", "--bitmaps", "-O", "qcow2", "x.qcow2", "y.qcow2"], None, Cmp::All);
    let skip = ["convert", "--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2", "x.qcow2", "y.qcow2"];
    same_on(&ours, &theirs, "qemu-img", &skip, None, Cmp::All);
    same_info(&ours, &theirs, &["y.qcow2"]);
}

/// `bitmap` opens neither image's backing file (qemu-img neither): an
/// image whose backing file is gone still takes bitmaps and gives them.
#[test]
fn bitmap_does_not_open_backing_files_as_qemu() {
    let (ours, theirs) = bare_sides();
    qemu_made(
        &ours,
        &theirs,
        &["create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", "s.qcow2", "1M"],
    );
    qemu_made(&ours, &theirs, &["create", "-q", "-f", "qcow2", "d.qcow2", "1M"]);
    same_on(&ours, &theirs, "qemu-img", &["bitmap", "--add", "-f", "qcow2", "s.qcow2", "s"], None, Cmp::All);
    let merge = ["bitmap", "--add", "--merge", "s", "-b", "s.qcow2", "-F", "qcow2", "d.qcow2", "d"];
    same_on(&ours, &theirs, "qemu-img", &merge, None, Cmp::All);
    for f in ["s.qcow2", "d.qcow2"] {
        same_info(&ours, &theirs, &["-U", "--backing-chain", f]);
    }
}

/// `bitmap --image-opts` takes the image as an option string.
#[test]
fn bitmap_takes_image_opts_as_qemu() {
    let (ours, theirs) = bare_sides();
    qemu_made(&ours, &theirs, &["create", "-q", "-f", "qcow2", "x.qcow2", "1M"]);
    qemu_made(&ours, &theirs, &["bitmap", "--add", "x.qcow2", "tmp"]);
    qemu_made(&ours, &theirs, &["bitmap", "--add", "x.qcow2", "keep"]);
    let opts = "driver=qcow2,file.driver=file,file.filename=x.qcow2";
    same_on(&ours, &theirs, "qemu-img", &["bitmap", "--remove", "--image-opts", opts, "tmp"], None, Cmp::All);
    same_on(&ours, &theirs, "qemu-img", &["bitmap", "--remove", "--image-opts", opts, "tmp"], None, Cmp::All);
    same_info(&ours, &theirs, &["x.qcow2"]);
}

/// A server process, killed if the test fails with it running.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// qemu-nbd `-B NAME` finds the bitmap in the backing file when the top
/// image has none of that name; `qemu-img map` of its context reads the
/// same through either server, and a name no layer has is refused alike.
#[test]
fn qemu_nbd_exports_a_backing_files_bitmap_as_qemu() {
    let (ours, theirs) = bare_sides();
    for d in [ours.dir.path(), theirs.dir.path()] {
        ok(d, "qemu-img", &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
        ok(d, "qemu-img", &["bitmap", "--add", "base.qcow2", "b0"]);
        ok(d, "qemu-io", &["-c", "write 1M 512k", "base.qcow2"]);
        ok(d, "qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"]);
        ok(d, "qemu-img", &["bitmap", "--add", "top.qcow2", "t0"]);
    }
    let maps: Vec<String> = [&ours, &theirs]
        .iter()
        .map(|side| {
            let sock = side.dir.path().join("nbd.sock");
            let sock_s = sock.to_str().unwrap().to_string();
            let child = std::process::Command::new(side.bin.join("qemu-nbd"))
                .args(["-t", "-r", "-f", "qcow2", "-k", &sock_s, "-B", "b0", "-B", "t0", "top.qcow2"])
                .current_dir(side.dir.path())
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap();
            let mut server = Server(child);
            wait_for_socket(&sock, Some(&mut server.0), "qemu-nbd");
            let opts = format!("driver=nbd,server.type=unix,server.path={sock_s},x-dirty-bitmap=qemu:dirty-bitmap:b0");
            let r = ok(side.dir.path(), "qemu-img", &["map", "--output=json", "--image-opts", &opts]);
            r.stdout
        })
        .collect();
    assert_eq!(maps[0], maps[1], "map of the backing file's bitmap (oxcow, QEMU)");
    assert!(maps[0].contains("\"start\": 1048576, \"length\": 524288"), "{}", maps[0]);
    // qemu-nbd wants the socket's path absolute: /tmp is neither side's.
    let k = ["-r", "-f", "qcow2", "-k", "/tmp/never-listened.sock", "-B", "zz", "top.qcow2"];
    same_on(&ours, &theirs, "qemu-nbd", &k, None, Cmp::All);
}
