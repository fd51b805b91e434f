//! The qcow2 driver's run-time options on `--blockdev` (`l2-cache-size`,
//! `refcount-cache-size`, `cache-size`, `l2-cache-entry-size`,
//! `cache-clean-interval`, `lazy-refcounts`): bad values refused in
//! qemu-storage-daemon's words, and `lazy-refcounts` overriding the
//! image's header bit as it does there.

use super::storage_daemon_cli::{have_qsd, nbd_args, nbd_uri, quit, show, Daemon};
use crate::support::{ok, run_in, tmp, OXCOW};
use std::path::Path;

/// Both daemons refuse `--blockdev file node, --blockdev qcow2 node with
/// OPTS` with the same message.
fn same_refusal(dir: &Path, image: &str, opts: &str) {
    let f = format!("driver=file,node-name=f,filename={image}");
    let q = format!("driver=qcow2,node-name=q,file=f,{opts}");
    let args = ["--blockdev", &f, "--blockdev", &q];
    let ours = run_in(dir, OXCOW, &[&["storage-daemon"][..], &args].concat());
    let theirs = run_in(dir, "qemu-storage-daemon", &args);
    assert_eq!((ours.code, theirs.code), (1, 1), "{opts}: {} / {}", show(&ours), show(&theirs));
    let ours_msg = ours.stderr.trim().strip_prefix("oxcow: ").unwrap_or(&ours.stderr).to_string();
    let theirs_msg = theirs.stderr.trim().strip_prefix("qemu-storage-daemon: ").unwrap_or(&theirs.stderr);
    assert_eq!(ours_msg, theirs_msg, "{opts}");
}

#[test]
fn qcow2_blockdev_cache_and_lazy_refcount_option_errors_match_qemu_storage_daemon() {
    if !have_qsd() {
        eprintln!("skipped: qemu-storage-daemon is not installed");
        return;
    }
    let t = tmp();
    let dir = t.path();
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "a.qcow2", "64M"]);
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "64M"]);
    for opts in [
        "l2-cache-size=abc",
        // Integers only: no size suffixes on --blockdev.
        "l2-cache-size=1M",
        "l2-cache-size=-1",
        "l2-cache-size=1.5",
        "cache-size=",
        "refcount-cache-size=9223372036854775808",
        "cache-size=1048576,l2-cache-size=2097152",
        "cache-size=1048576,l2-cache-size=524288,refcount-cache-size=262144",
        "refcount-cache-size=2097152,cache-size=1048576",
        "l2-cache-entry-size=100",
        "l2-cache-entry-size=131072",
        "cache-clean-interval=-1",
        "cache-clean-interval=x",
        "cache-clean-interval=4294967296",
        "lazy-refcounts=maybe",
    ] {
        same_refusal(dir, "a.qcow2", opts);
    }
    same_refusal(dir, "v2.qcow2", "lazy-refcounts=on");
}

/// Allocates through an NBD export of a new image (`lazy_refcounts` in
/// its header or not) opened with `opts` by the daemon `prog`; returns
/// whether the image is marked dirty while the export still runs
/// (refcount updates postponed), and checks it clean after `quit`.
fn dirty_while_serving(dir: &Path, prog: &[&str], lazy_header: bool, opts: &str) -> bool {
    let image = "a.qcow2";
    let lazy = format!("lazy_refcounts={}", if lazy_header { "on" } else { "off" });
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "-o", &lazy, image, "64M"]);
    let f = format!("driver=file,node-name=f,filename={image}");
    let q = format!("driver=qcow2,node-name=q,file=f,{opts}");
    let args = nbd_args(dir, &[&f, &q], "type=nbd,id=e,node-name=q,name=disk,writable=on");
    let d = Daemon::start(dir, prog, &args);
    ok(dir, "qemu-io", &["-f", "raw", "-c", "write -P 0x5a 0 1M", &nbd_uri(dir, "disk")]);
    let info = ok(dir, "qemu-img", &["info", "-U", "--output=json", image]).stdout;
    quit(dir, &d);
    ok(dir, "qemu-img", &["check", image]);
    ok(dir, "qemu-io", &["-c", "read -P 0x5a 0 1M", image]);
    info.contains("\"dirty-flag\": true")
}

#[test]
fn qcow2_blockdev_lazy_refcounts_overrides_the_header_bit_and_cache_options_serve() {
    let t = tmp();
    let dir = t.path();
    let oxcow: &[&str] = &[OXCOW, "storage-daemon"];
    let qsd: &[&str] = &["qemu-storage-daemon"];
    let daemons: &[&[&str]] = if have_qsd() { &[oxcow, qsd] } else { &[oxcow] };
    for prog in daemons {
        let cache = "l2-cache-size=0x100000,refcount-cache-size=262144,l2-cache-entry-size=4096,cache-clean-interval=1";
        assert!(!dirty_while_serving(dir, prog, false, cache), "{prog:?}");
        assert!(dirty_while_serving(dir, prog, false, "lazy-refcounts=on"), "{prog:?}");
        assert!(dirty_while_serving(dir, prog, true, "cache-size=2097152"), "{prog:?}");
        assert!(!dirty_while_serving(dir, prog, true, "lazy-refcounts=off"), "{prog:?}");
    }
}
