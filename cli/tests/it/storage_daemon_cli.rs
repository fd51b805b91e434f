//! `oxcow storage-daemon`: NBD exports used by qemu-io and qemu-img, the
//! QMP monitor's replies and the startup errors compared with
//! qemu-storage-daemon's.

use crate::support::{ok, run_in, tmp, Run, OXCOW};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

pub fn show(r: &Run) -> String {
    format!("exit {}, stdout: {}, stderr: {}", r.code, r.stdout, r.stderr)
}

pub fn have_qsd() -> bool {
    let have =
        std::process::Command::new("qemu-storage-daemon").arg("--version").output().is_ok_and(|o| o.status.success());
    // qemu-utils brings it; under CI its absence is a failure.
    assert!(have || std::env::var_os("CI").is_none(), "qemu-storage-daemon is not installed");
    have
}

/// A daemon started with `--daemonize` (so it serves once the command
/// returns), killed on drop unless it quit.
pub struct Daemon {
    pid: u32,
    /// Seen gone: its pid may belong to another process by now.
    exited: std::cell::Cell<bool>,
}

impl Daemon {
    /// Starts `prog` (`[OXCOW, "storage-daemon"]` or qemu-storage-daemon)
    /// in `dir` with a pid file and a QMP monitor on `qmp.sock`.
    pub fn start(dir: &Path, prog: &[&str], args: &[String]) -> Daemon {
        let pidfile = dir.join("daemon.pid");
        let _ = std::fs::remove_file(&pidfile);
        let mut all: Vec<String> = prog[1..].iter().map(|s| s.to_string()).collect();
        all.extend(args.iter().cloned());
        all.extend(
            [
                "--chardev",
                &format!("socket,id=m,path={},server=on,wait=off", dir.join("qmp.sock").display()),
                "--monitor",
                "chardev=m",
                "--pidfile",
                &pidfile.display().to_string(),
                "--daemonize",
            ]
            .map(String::from),
        );
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        ok(dir, prog[0], &refs);
        let pid = std::fs::read_to_string(&pidfile).expect("pid file").trim().parse().expect("pid");
        Daemon { pid, exited: false.into() }
    }

    /// The daemon whose pid file is `dir/daemon.pid` (one started by
    /// other means than [`start`](Self::start)).
    pub fn from_pidfile(dir: &Path) -> Daemon {
        let pid = std::fs::read_to_string(dir.join("daemon.pid")).expect("pid file").trim().parse().expect("pid");
        Daemon { pid, exited: false.into() }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn alive(&self) -> bool {
        let proc = format!("/proc/{}", self.pid);
        // The main thread shows as a zombie as soon as it has exited,
        // while other threads may still be ending and holding the image's
        // files and locks: the process is gone with its last thread.
        let zombie = std::fs::read_to_string(format!("{proc}/stat")).is_ok_and(|s| s.contains(") Z "));
        let threads = std::fs::read_dir(format!("{proc}/task")).map_or(0, |d| d.count());
        Path::new(&proc).exists() && (!zombie || threads > 1)
    }

    /// Waits until the daemon has exited (a generous limit turns a hang
    /// into a failure).
    pub fn wait_exit(&self) {
        let limit = Instant::now() + Duration::from_secs(60);
        while self.alive() {
            assert!(Instant::now() < limit, "daemon {} did not exit", self.pid);
            std::thread::sleep(Duration::from_millis(10));
        }
        self.exited.set(true);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if !self.exited.get() && self.alive() {
            let _ = std::process::Command::new("kill").arg("-9").arg(self.pid.to_string()).status();
        }
    }
}

/// A QMP client.
pub struct Qmp {
    out: UnixStream,
    lines: std::io::Lines<BufReader<UnixStream>>,
}

impl Qmp {
    pub fn connect(path: &Path) -> (Qmp, Value) {
        let s = UnixStream::connect(path).expect("connect to QMP");
        let mut lines = BufReader::new(s.try_clone().unwrap()).lines();
        let greeting = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        (Qmp { out: s, lines }, greeting)
    }

    /// Sends one command; returns the events before its reply, then the
    /// reply.
    pub fn cmd(&mut self, c: &Value) -> Vec<Value> {
        // One write: `writeln!` on the socket sends the JSON in pieces and
        // the newline last, and a daemon that acts on the object as soon
        // as it is complete may already have hung up after `quit` by then
        // (qemu-storage-daemon does under load: a broken pipe).
        self.out.write_all(format!("{c}\n").as_bytes()).unwrap();
        let mut got = Vec::new();
        loop {
            let line = self.lines.next().expect("QMP reply").unwrap();
            let v: Value = serde_json::from_str(&line).unwrap();
            let done = v.get("return").is_some() || v.get("error").is_some();
            got.push(v);
            if done {
                return got;
            }
        }
    }
}

/// Events without their timestamps.
fn untimed(mut v: Vec<Value>) -> Vec<Value> {
    for x in &mut v {
        if let Some(o) = x.as_object_mut() {
            o.remove("timestamp");
        }
    }
    v
}

pub fn nbd_args(dir: &Path, blockdevs: &[&str], export: &str) -> Vec<String> {
    let mut a = Vec::new();
    for b in blockdevs {
        a.push("--blockdev".to_string());
        a.push(b.to_string());
    }
    a.push("--nbd-server".into());
    a.push(format!("addr.type=unix,addr.path={}", dir.join("nbd.sock").display()));
    a.push("--export".into());
    a.push(export.to_string());
    a
}

pub fn nbd_uri(dir: &Path, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", dir.join("nbd.sock").display())
}

pub fn quit(dir: &Path, d: &Daemon) {
    let (mut q, _) = Qmp::connect(&dir.join("qmp.sock"));
    q.cmd(&json!({"execute": "qmp_capabilities"}));
    let r = q.cmd(&json!({"execute": "quit"}));
    assert_eq!(r.last().unwrap()["return"], json!({}));
    d.wait_exit();
}

#[test]
fn nbd_export_of_qcow2_overlay_serves_qemu_io_and_leaves_image_clean() {
    let t = tmp();
    let dir = t.path();
    ok(dir, "qemu-img", &["create", "-f", "qcow2", "base.qcow2", "8M"]);
    ok(dir, "qemu-io", &["-c", "write -P 0x11 0 4M", "base.qcow2"]);
    ok(dir, "qemu-img", &["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"]);
    let args = nbd_args(
        dir,
        &["driver=file,node-name=f,filename=top.qcow2", "driver=qcow2,node-name=q,file=f"],
        "type=nbd,id=e,node-name=q,name=disk,writable=on",
    );
    let d = Daemon::start(dir, &[OXCOW, "storage-daemon"], &args);
    let uri = nbd_uri(dir, "disk");
    ok(dir, "qemu-io", &["-f", "raw", "-c", "write -P 0x5a 1M 1M", "-c", "read -P 0x11 0 1M", &uri]);
    ok(dir, "qemu-io", &["-f", "raw", "-c", "read -P 0x5a 1M 1M", "-c", "read -P 0x11 2M 2M", &uri]);
    quit(dir, &d);
    assert!(!dir.join("nbd.sock").exists() && !dir.join("qmp.sock").exists(), "sockets left behind");
    ok(dir, "qemu-img", &["check", "top.qcow2"]);
    ok(dir, "qemu-io", &["-c", "read -P 0x5a 1M 1M", "-c", "read -P 0x11 0 1M", "top.qcow2"]);
    // The backing file was only read.
    ok(dir, "qemu-io", &["-c", "read -P 0x11 1M 1M", "base.qcow2"]);
}

#[test]
fn nbd_export_of_raw_file_node_is_read_only_unless_writable() {
    let t = tmp();
    let dir = t.path();
    std::fs::write(dir.join("disk.raw"), vec![0x22u8; 2 << 20]).unwrap();
    let args = nbd_args(dir, &["driver=file,node-name=f,filename=disk.raw"], "type=nbd,id=e,node-name=f");
    let d = Daemon::start(dir, &[OXCOW, "storage-daemon"], &args);
    // The export name defaults to the node name.
    let uri = nbd_uri(dir, "f");
    ok(dir, "qemu-io", &["-f", "raw", "-r", "-c", "read -P 0x22 0 2M", &uri]);
    let w = run_in(dir, "qemu-io", &["-f", "raw", "-c", "write -P 0x33 0 64k", &uri]);
    assert!(w.code != 0 || w.stderr.contains("Operation not permitted") || w.stdout.contains("failed"), "{}", show(&w));
    quit(dir, &d);
    assert!(std::fs::read(dir.join("disk.raw")).unwrap().iter().all(|&b| b == 0x22));
}

/// The same QMP conversation with both daemons gets the same replies
/// (apart from the greeting's version and the events' timestamps).
#[test]
fn qmp_replies_match_qemu_storage_daemon() {
    if !have_qsd() {
        eprintln!("skipped: qemu-storage-daemon is not installed");
        return;
    }
    let script = [
        json!({"execute": "query-block-exports"}),
        json!({"execute": "qmp_capabilities"}),
        json!({"execute": "qmp_capabilities", "id": "again"}),
        json!({"execute": "query-block-exports", "id": 1}),
        json!({"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e", "node-name": "q"}}),
        json!({"execute": "block-export-add", "arguments": {"type": "nbd", "id": "x", "node-name": "nope"}}),
        json!({"execute": "block-export-del", "arguments": {"id": "nope"}}),
        json!({"execute": "block-export-del", "arguments": {}}),
        json!({"execute": "block-export-del", "arguments": {"id": "e", "mode": "hard"}}),
        json!({"execute": "query-block-exports"}),
        json!({"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e2", "node-name": "q", "writable": true}}),
        json!({"execute": "query-block-exports"}),
        json!({"execute": "no-such-command", "id": "z"}),
        json!({"execute": "quit"}),
    ];
    let mut transcripts = Vec::new();
    for prog in [&[OXCOW, "storage-daemon"][..], &["qemu-storage-daemon"][..]] {
        let t = tmp();
        let dir = t.path();
        ok(dir, "qemu-img", &["create", "-f", "qcow2", "a.qcow2", "4M"]);
        let args = nbd_args(
            dir,
            &["driver=file,node-name=f,filename=a.qcow2", "driver=qcow2,node-name=q,file=f"],
            "type=nbd,id=e,node-name=q",
        );
        let d = Daemon::start(dir, prog, &args);
        let (mut q, greeting) = Qmp::connect(&dir.join("qmp.sock"));
        assert_eq!(greeting["QMP"]["capabilities"], json!(["oob"]));
        let mut transcript = Vec::new();
        for c in &script {
            transcript.push(untimed(q.cmd(c)));
        }
        d.wait_exit();
        ok(dir, "qemu-img", &["check", "a.qcow2"]);
        transcripts.push(transcript);
    }
    // qemu-storage-daemon also reports the exports it deletes on quit.
    let strip_quit_events = |mut t: Vec<Vec<Value>>| {
        if let Some(last) = t.last_mut() {
            last.retain(|v| v.get("event").is_none());
        }
        t
    };
    let qsd = strip_quit_events(transcripts.pop().unwrap());
    let ours = strip_quit_events(transcripts.pop().unwrap());
    for (i, (a, b)) in ours.iter().zip(&qsd).enumerate() {
        assert_eq!(a, b, "reply to {}", script[i]);
    }
}

/// Mistakes on the command line are refused with qemu-storage-daemon's
/// words (after the program name).
#[test]
fn startup_errors_match_qemu_storage_daemon() {
    if !have_qsd() {
        eprintln!("skipped: qemu-storage-daemon is not installed");
        return;
    }
    let t = tmp();
    let dir = t.path();
    ok(dir, "qemu-img", &["create", "-f", "qcow2", "a.qcow2", "4M"]);
    let sock = dir.join("n.sock").display().to_string();
    let nbd = format!("addr.type=unix,addr.path={sock}");
    let f = "driver=file,node-name=f,filename=a.qcow2";
    let q = "driver=qcow2,node-name=q,file=f";
    let cases: Vec<Vec<&str>> = vec![
        vec!["--monitor", "chardev=nope"],
        vec!["--export", "type=nbd,id=e,node-name=q"],
        vec!["--blockdev", f, "--blockdev", q, "--export", "type=nbd,id=e,node-name=q"],
        vec!["--blockdev", f, "--blockdev", q, "--nbd-server", &nbd, "--export", "type=nbd,id=e,node-name=zz"],
        vec!["--blockdev", f, "--blockdev", f],
        vec!["--blockdev", "driver=file,filename=a.qcow2"],
        vec!["--blockdev", "driver=qcow2,node-name=q,file=nope"],
        vec!["--blockdev", "driver=file,node-name=f,filename=a.qcow2,bogus=1"],
        vec!["--blockdev", "driver=file,node-name=f,filename=/nonexistent/x"],
        vec![
            "--blockdev",
            f,
            "--blockdev",
            "driver=qcow2,node-name=q,file=f,read-only=on",
            "--nbd-server",
            &nbd,
            "--export",
            "type=nbd,id=e,node-name=q,writable=on",
        ],
    ];
    for args in cases {
        let mut ours_args = vec!["storage-daemon"];
        ours_args.extend(&args);
        let ours = run_in(dir, OXCOW, &ours_args);
        let theirs = run_in(dir, "qemu-storage-daemon", &args);
        assert_eq!((ours.code, theirs.code), (1, 1), "{args:?}: {} / {}", show(&ours), show(&theirs));
        let ours_msg = ours.stderr.trim().strip_prefix("oxcow: ").unwrap_or(&ours.stderr).to_string();
        let theirs_msg = theirs.stderr.trim().strip_prefix("qemu-storage-daemon: ").unwrap_or(&theirs.stderr);
        assert_eq!(ours_msg, theirs_msg, "{args:?}");
    }
}

#[test]
fn qemu_storage_daemon_name_serves_nbd_export_and_answers_version() {
    let t = tmp();
    let dir = t.path();
    let bin = dir.join("bin");
    ok(dir, OXCOW, &["install-links", &bin.display().to_string()]);
    let qsd = bin.join("qemu-storage-daemon").display().to_string();
    let v = ok(dir, &qsd, &["--version"]);
    assert!(v.stdout.starts_with("qemu-storage-daemon version "), "{}", show(&v));
    ok(dir, "qemu-img", &["create", "-f", "qcow2", "d.qcow2", "4M"]);
    let args = nbd_args(
        dir,
        &["driver=file,node-name=f,filename=d.qcow2", "driver=qcow2,node-name=q,file=f"],
        "type=nbd,id=e,node-name=q,name=disk,writable=on",
    );
    let d = Daemon::start(dir, &[&qsd], &args);
    let uri = nbd_uri(dir, "disk");
    ok(dir, "qemu-io", &["-f", "raw", "-c", "write -P 0x3c 64k 64k", &uri]);
    quit(dir, &d);
    ok(dir, "qemu-img", &["check", "d.qcow2"]);
    ok(dir, "qemu-io", &["-c", "read -P 0x3c 64k 64k", "d.qcow2"]);
    // Startup errors carry the name it was started under.
    let r = run_in(dir, &qsd, &["--blockdev", "driver=file,node-name=f,filename=missing.img"]);
    assert!(r.code != 0 && r.stderr.starts_with("qemu-storage-daemon: "), "{}", show(&r));
}
