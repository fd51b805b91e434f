//! `oxcow serve` as qemu-nbd: real clients over a Unix socket, clean
//! shutdown on SIGTERM, read-only and snapshot exports, --fork/--pid-file.

use crate::support::process::{run, s, wait_for_socket, wait_ready};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Waits until the server accepts connections: its socket file appears
/// at bind(), a moment before it listens.
fn wait_for(path: &Path, child: &mut Child) {
    wait_for_socket(path, Some(child), "oxcow serve");
}

fn serve(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_oxcow")).arg("serve").args(args).stdout(Stdio::null()).spawn().unwrap()
}

fn term(child: &mut Child) {
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let mut status = None;
    wait_ready("server exit on SIGTERM", None, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    let st = status.unwrap();
    assert!(st.success(), "server exit status {st}");
}

#[test]
fn qemu_io_over_unix_socket_then_sigterm_leaves_a_clean_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    let sock = dir.path().join("nbd.sock");
    run("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "64M"]);
    let mut child = serve(&["-t", "-f", "qcow2", "-x", "disk", "-k", s(&sock), s(&img)]);
    wait_for(&sock, &mut child);
    let url = format!("nbd+unix:///disk?socket={}", s(&sock));
    let (code, out, err) = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 1M",
            "-c",
            "write -z 2M 64k",
            "-c",
            "discard 4M 64k",
            "-c",
            "flush",
            &url,
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = run("qemu-io", &["-f", "raw", "-c", "read -P 0x5a 0 1M", "-c", "read -P 0 2M 64k", &url]);
    assert!(code == 0 && !out.contains("verification failed"), "{out}");
    let (code, out, err) = run("qemu-img", &["bench", "-f", "raw", "-w", "-d", "16", "-c", "2000", "-o", "8M", &url]);
    assert_eq!(code, 0, "{out}{err}");
    term(&mut child);
    assert!(!sock.exists(), "socket removed at exit");
    assert_eq!(run("qemu-img", &["check", s(&img)]).0, 0);
    assert_eq!(run("qemu-io", &["-c", "read -P 0x5a 0 1M", s(&img)]).0, 0);
}

#[test]
fn read_only_and_snapshot_exports() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("snap.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "16M"]);
    run("qemu-io", &["-c", "write -P 1 0 1M", s(&img)]);
    run("qemu-img", &["snapshot", "-c", "before", s(&img)]);
    run("qemu-io", &["-c", "write -P 2 0 1M", s(&img)]);
    let sock = dir.path().join("ro.sock");
    let mut child = serve(&["-t", "-l", "before", "-k", s(&sock), s(&img)]);
    wait_for(&sock, &mut child);
    let url = format!("nbd+unix:///?socket={}", s(&sock));
    let (code, out, _) = run("qemu-io", &["-f", "raw", "-r", "-c", "read -P 1 0 1M", &url]);
    assert!(code == 0 && !out.contains("failed"), "snapshot content: {out}");
    let (_, out, err) = run("qemu-io", &["-f", "raw", "-c", "write -P 3 0 4k", &url]);
    assert!(
        format!("{out}{err}").contains("ermission")
            || format!("{out}{err}").contains("read-only")
            || format!("{out}{err}").contains("Read-only"),
        "write refused: {out}{err}"
    );
    term(&mut child);
    assert_eq!(run("qemu-io", &["-c", "read -P 2 0 1M", s(&img)]).0, 0, "active state untouched");
}

#[test]
fn fork_returns_once_listening_and_writes_pid_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("f.qcow2");
    let sock = dir.path().join("f.sock");
    let pid = dir.path().join("pid");
    run("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "16M"]);
    let st = Command::new(env!("CARGO_BIN_EXE_oxcow"))
        .args(["serve", "--fork", "--pid-file", s(&pid), "-k", s(&sock), s(&img)])
        .status()
        .unwrap();
    assert!(st.success());
    assert!(sock.exists() && pid.exists());
    let url = format!("nbd+unix:///?socket={}", s(&sock));
    let (code, out, err) = run("qemu-io", &["-f", "raw", "-c", "write -P 7 0 64k", &url]);
    assert_eq!(code, 0, "{out}{err}");
    // Without -t the server leaves after its last client.
    wait_ready("server exit after its client", None, || !pid.exists());
    assert_eq!(run("qemu-img", &["check", s(&img)]).0, 0);
}

/// Stops a read-only export with SIGTERM the way qemu-iotests' helper
/// does (kill, no wait), then, once it is gone, crashes a writer on the
/// image (qemu-io `abort`), and returns `qemu-img info`'s bitmap list.
fn bitmaps_after_readonly_export_and_crashed_writer(server: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("b.qcow2");
    let sock = dir.path().join("b.sock");
    let pid = dir.path().join("b.pid");
    run("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "10M"]);
    run("qemu-img", &["bitmap", "--add", s(&img), "b0"]);
    let mut args = vec!["--fork", "--pid-file", s(&pid), "-t", "-r", "-f", "qcow2", "-B", "b0", "-k", s(&sock)];
    args.push(s(&img));
    let st = if server == "oxcow" {
        Command::new(env!("CARGO_BIN_EXE_oxcow")).arg("serve").args(&args).status().unwrap()
    } else {
        Command::new(server).args(&args).status().unwrap()
    };
    assert!(st.success(), "{server} did not start");
    let url = format!("nbd+unix:///?socket={}", s(&sock));
    let (code, out, err) = run("qemu-io", &["-r", "-f", "raw", "-c", "read 0 64k", &url]);
    assert_eq!(code, 0, "{out}{err}");
    let server_pid = std::fs::read_to_string(&pid).unwrap().trim().to_string();
    assert_eq!(Command::new("kill").args(["-TERM", &server_pid]).status().unwrap().code(), Some(0));
    // The server is not our child: wait for its socket and its process
    // to go (qemu-nbd leaves its pid file behind).
    let proc_dir = std::path::PathBuf::from(format!("/proc/{server_pid}"));
    wait_ready("server exit on SIGTERM", None, || !sock.exists() && !proc_dir.exists());
    wait_ready("image unlocked", None, || run("qemu-img", &["info", "-f", "qcow2", s(&img)]).0 == 0);
    let _ = run("qemu-io", &["-f", "qcow2", "-c", "abort", s(&img)]);
    let (code, out, err) = run("qemu-img", &["info", "--output=json", "-f", "qcow2", s(&img)]);
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["format-specific"]["data"]["bitmaps"].to_string()
}

/// qemu-img-bitmaps (iotest): a read-only export stopped with SIGTERM
/// leaves the image as qemu-nbd does, so a writer that crashes after
/// opening it leaves its bitmaps marked in use, for later commands to
/// refuse or skip.
#[test]
fn readonly_export_stopped_by_sigterm_leaves_bitmaps_as_qemu_nbd() {
    let ours = bitmaps_after_readonly_export_and_crashed_writer("oxcow");
    let qemu = bitmaps_after_readonly_export_and_crashed_writer("qemu-nbd");
    assert!(ours.contains("in-use"), "{ours}");
    assert_eq!(ours, qemu);
}
