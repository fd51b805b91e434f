//! Running programs from tests: QEMU's tools, oxcow's binary, servers.
//! Shared by the library's and the CLI's test binaries.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to become ready. Generous: the machine is
/// shared, and the wait ends as soon as the server is ready anyway.
pub const READY_LIMIT: Duration = Duration::from_secs(120);

/// A path as a command-line argument.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// Runs `cmd` to completion: (status code, stdout, stderr).
pub fn capture(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a program, returning (status code, stdout, stderr).
pub fn run(cmd: &str, args: &[&str]) -> (i32, String, String) {
    capture(Command::new(cmd).args(args))
}

/// Runs a program and requires success; returns its stdout.
pub fn ok(cmd: &str, args: &[&str]) -> String {
    let (code, out, err) = run(cmd, args);
    assert_eq!(code, 0, "{cmd} {args:?} failed: {out}{err}");
    out
}

/// Runs a command to completion, killing it after `limit` (for clients of
/// a server under test, which could otherwise hang the suite).
pub fn run_within(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let start = Instant::now();
    loop {
        match child.try_wait().expect("wait") {
            Some(_) => break,
            None if start.elapsed() > limit => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("output");
                panic!(
                    "{cmd:?} timed out after {limit:?}\nstdout: {}\nstderr: {}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    child.wait_with_output().expect("output")
}

/// Whether a program is installed.
pub fn have(prog: &str) -> bool {
    Command::new(prog).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
}

/// Polls `ready` until it holds; panics if `child` exits first or after
/// [`READY_LIMIT`] (a hang guard, not a timing assumption).
pub fn wait_ready(what: &str, mut child: Option<&mut Child>, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        if let Some(c) = child.as_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                panic!("{what} exited before it was ready: {st}");
            }
        }
        assert!(start.elapsed() < READY_LIMIT, "{what} not ready after {READY_LIMIT:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until a server accepts connections on the Unix socket `path`.
/// The probe connects and closes at once, so only use it on servers that
/// outlive their clients (qemu-nbd -t, oxcow serve -t).
pub fn wait_for_socket(path: &Path, child: Option<&mut Child>, what: &str) {
    wait_ready(what, child, || std::os::unix::net::UnixStream::connect(path).is_ok());
}

/// Connects to the Unix socket `path` as soon as its server listens (for
/// servers that serve one client and leave, which a probe would end).
pub fn connect_when_ready(path: &Path, child: Option<&mut Child>, what: &str) -> std::os::unix::net::UnixStream {
    let mut stream = None;
    wait_ready(what, child, || {
        stream = std::os::unix::net::UnixStream::connect(path).ok();
        stream.is_some()
    });
    stream.expect("connected")
}
