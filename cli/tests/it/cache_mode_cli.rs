//! The cache mode given on the command line reaches the files, on every
//! path that takes one (`io -t`, `bench -t`, `serve --cache`,
//! `convert -t`): oxcow reports the writes and syncs it sent to the host
//! (`OXCOW_REPORT_HOST_IO`), and for each mode they must be what it
//! promises. Issue 12: raw images in writethrough mode synced once at
//! the end instead of after each write.

use crate::support::{ok, tmp, OXCOW};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const REPORT: &str = "OXCOW_REPORT_HOST_IO";

#[derive(Debug, Clone, Copy)]
struct HostIo {
    writes: u64,
    syncs: u64,
}

fn parse_report(stderr: &str) -> HostIo {
    let line = stderr
        .lines()
        .find_map(|l| l.strip_prefix("oxcow: host I/O: "))
        .unwrap_or_else(|| panic!("no host I/O report in: {stderr}"));
    let nums: Vec<u64> = line.split(|c: char| !c.is_ascii_digit()).filter_map(|w| w.parse().ok()).collect();
    assert_eq!(nums.len(), 2, "bad report: {line}");
    HostIo { writes: nums[0], syncs: nums[1] }
}

/// Runs oxcow with the report on; requires success.
fn counted(dir: &Path, args: &[&str]) -> HostIo {
    let out = Command::new(OXCOW).args(args).current_dir(dir).env(REPORT, "1").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "oxcow {args:?}: {stderr}");
    parse_report(&stderr)
}

/// What a mode promises, given the number of guest write requests.
fn check(what: &str, mode: &str, requests: u64, io: HostIo, close_syncs: u64) {
    match mode {
        "writethrough" | "directsync" => {
            assert!(io.syncs >= requests, "{what} -t {mode}: {requests} writes but {io:?}")
        }
        "unsafe" => assert_eq!(io.syncs, 0, "{what} -t {mode}: {io:?}"),
        _ => assert!(io.syncs <= close_syncs, "{what} -t {mode}: synced outside flushes: {io:?}"),
    }
}

const MODES: [&str; 5] = ["writeback", "none", "writethrough", "directsync", "unsafe"];

/// Without `-t`, `io` is writethrough, as qemu-io is: three writes, four
/// syncs (one more at the end), as QEMU does.
#[test]
fn io_defaults_to_writethrough_like_qemu_io() {
    let d = tmp();
    let dir = d.path();
    ok(dir, "qemu-img", &["create", "-q", "-f", "raw", "img", "4M"]);
    let io = counted(dir, &["io", "-f", "raw", "-c", "write 0 4k", "-c", "write 1M 4k", "-c", "write 2M 4k", "img"]);
    assert!(io.syncs >= 3, "{io:?}");
}

#[test]
fn io_syncs_as_the_cache_mode_promises() {
    let d = tmp();
    let dir = d.path();
    for fmt in ["raw", "qcow2"] {
        for mode in MODES {
            ok(dir, "qemu-img", &["create", "-q", "-f", fmt, "img", "4M"]);
            let io = counted(
                dir,
                &["io", "-f", fmt, "-t", mode, "-c", "write 0 4k", "-c", "write 1M 4k", "-c", "write 2M 4k", "img"],
            );
            // The close of a fresh qcow2 image writes its metadata back in
            // three synced stages, plus one final sync.
            check(&format!("io -f {fmt}"), mode, 3, io, if fmt == "raw" { 1 } else { 4 });
        }
    }
}

#[test]
fn bench_syncs_as_the_cache_mode_promises() {
    let d = tmp();
    let dir = d.path();
    for fmt in ["raw", "qcow2"] {
        for mode in MODES {
            ok(dir, "qemu-img", &["create", "-q", "-f", fmt, "img", "4M"]);
            let io = counted(dir, &["bench", "-q", "-w", "-f", fmt, "-t", mode, "-c", "64", "-d", "4", "img"]);
            check(&format!("bench -f {fmt}"), mode, 64, io, if fmt == "raw" { 1 } else { 4 });
        }
    }
}

#[test]
fn convert_target_syncs_as_the_cache_mode_promises() {
    let d = tmp();
    let dir = d.path();
    let src: Vec<u8> = (0..3u32 << 20).map(|i| (i / 4096 % 251) as u8 + 1).collect();
    std::fs::write(dir.join("src.raw"), &src).unwrap();
    for mode in MODES {
        // -n: the target exists, so only the opened target's syncs count
        // (creating an image is not governed by the cache mode).
        ok(dir, "qemu-img", &["create", "-q", "-f", "raw", "dst.raw", "3M"]);
        let io = counted(dir, &["convert", "-n", "-f", "raw", "-O", "raw", "-t", mode, "src.raw", "dst.raw"]);
        // A raw target gets each guest write as one host write.
        check("convert -O raw", mode, io.writes, io, 1);
        assert!(io.writes > 0);
        ok(dir, "qemu-img", &["compare", "-f", "raw", "-F", "raw", "src.raw", "dst.raw"]);
    }
}

fn wait_for(path: &Path, server: &mut Child) {
    let start = Instant::now();
    while !path.exists() {
        assert!(server.try_wait().unwrap().is_none(), "server exited early");
        assert!(start.elapsed() < Duration::from_secs(20), "server did not create {path:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn serve_syncs_as_the_cache_mode_promises() {
    let d = tmp();
    let dir = d.path();
    for mode in MODES {
        ok(dir, "qemu-img", &["create", "-q", "-f", "raw", "img", "4M"]);
        let sock = dir.join("nbd.sock");
        let mut server = Command::new(OXCOW)
            .args(["serve", "-f", "raw", "--cache", mode, "-x", "disk", "-k", sock.to_str().unwrap(), "img"])
            .current_dir(dir)
            .env(REPORT, "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for(&sock, &mut server);
        let url = format!("nbd+unix:///disk?socket={}", sock.display());
        // The client in writeback mode flushes only when it closes the
        // export (by default qemu-io flushes after every write).
        let client = ["-f", "raw", "-t", "writeback", "-c", "write 0 4k", "-c", "write 1M 4k", "-c", "write 2M 4k"];
        let mut args = client.to_vec();
        args.push(&url);
        ok(dir, "qemu-io", &args);
        let _ = Command::new("kill").args(["-TERM", &server.id().to_string()]).status();
        let out = server.wait_with_output().unwrap();
        assert!(out.status.success(), "server: {}", String::from_utf8_lossy(&out.stderr));
        let io = parse_report(&String::from_utf8_lossy(&out.stderr));
        // One sync for the client's flush at close; the server's flush at
        // exit has nothing left to cover.
        check("serve", mode, 3, io, 1);
    }
}
