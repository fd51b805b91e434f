//! Issue 12 as reported: `oxcow bench -w -t none -s 512` and `oxcow serve
//! --cache=none` driven by `qemu-img bench -w -s 512` lost most of the
//! 512-byte writes (concurrent read-modify-write cycles of one O_DIRECT
//! block). QEMU must read the pattern back everywhere.

use crate::support::{self, ok, tmp, OXCOW};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn fresh(dir: &Path, cluster: &str) {
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "-o", &format!("cluster_size={cluster}"), "img", "16M"]);
}

fn check_pattern(dir: &Path, what: &str) {
    let r = support::run_in(dir, "qemu-io", &["-r", "-c", "read -q -P 0xab 0 4M", "img"]);
    assert!(r.code == 0 && r.stdout.is_empty(), "{what}: acknowledged writes lost: {}{}", r.stdout, r.stderr);
    ok(dir, "qemu-img", &["check", "-q", "img"]);
}

#[test]
fn bench_with_cache_none_keeps_every_512_byte_write() {
    let d = tmp();
    let dir = d.path();
    for cluster in ["512", "4096", "65536"] {
        fresh(dir, cluster);
        let args = ["bench", "-q", "-w", "-t", "none", "-s", "512", "-S", "512", "-d", "32", "-c", "8192"];
        let mut args = args.to_vec();
        args.extend_from_slice(&["--pattern", "171", "img"]);
        ok(dir, OXCOW, &args);
        check_pattern(dir, &format!("bench, {cluster}-byte clusters"));
    }
}

#[test]
fn serve_with_cache_none_keeps_every_512_byte_write() {
    let d = tmp();
    let dir = d.path();
    fresh(dir, "512");
    let sock = dir.join("nbd.sock");
    let mut server = Command::new(OXCOW)
        .args(["serve", "--cache=none", "-f", "qcow2", "-k", sock.to_str().unwrap(), "img"])
        .current_dir(dir)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !sock.exists() {
        assert!(server.try_wait().unwrap().is_none(), "server exited early");
        assert!(start.elapsed() < Duration::from_secs(20), "server did not create its socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    let url = format!("nbd+unix:///?socket={}", sock.display());
    let bench = ["bench", "-w", "-f", "raw", "-s", "512", "-S", "512", "-d", "32", "-c", "8192", "--pattern", "171"];
    let mut args = bench.to_vec();
    args.push(&url);
    ok(dir, "qemu-img", &args);
    // The server exits when its only client has gone.
    assert!(server.wait().unwrap().success());
    check_pattern(dir, "serve");
}
