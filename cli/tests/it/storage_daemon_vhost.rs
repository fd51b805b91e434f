//! `oxcow storage-daemon --export type=vhost-user-blk` without a guest:
//! QEMU's vhost-user-blk front end connecting and negotiating (features,
//! queue count, configuration) again and again on the same daemon, the
//! export managed over QMP, and its option errors. The guest-level tests
//! are in `storage_daemon_vhost_guest`.

use super::storage_daemon_cli::{quit, Daemon, Qmp};
use crate::support::{ok, run_in, tmp, Run, OXCOW};
use serde_json::json;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// QEMU with a vhost-user-blk device on `sock`, stopped before the guest
/// runs: realizing the device negotiates with the back end; then `quit`.
pub fn front_end(dir: &Path, sock: &Path, queues: u16) -> Run {
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-S", "-display", "none", "-nodefaults", "-m", "64"])
        .args(["-object", "memory-backend-memfd,id=mem,size=64M,share=on", "-machine", "memory-backend=mem"])
        .args(["-chardev", &format!("socket,id=c0,path={}", sock.display())])
        .args(["-device", &format!("vhost-user-blk-pci,chardev=c0,num-queues={queues}")])
        .args(["-monitor", "stdio"])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu-system-x86_64");
    // The monitor reads its input once the machine (and the device) exist.
    let _ = child.stdin.take().expect("stdin").write_all(b"quit\n");
    let out = child.wait_with_output().expect("wait for QEMU");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub fn qemu_system() -> bool {
    let have = Command::new("qemu-system-x86_64").arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(have || std::env::var_os("CI").is_none(), "qemu-system-x86_64 is not installed");
    if !have {
        eprintln!("skipped: qemu-system-x86_64 is not installed");
    }
    have
}

#[test]
fn vhost_user_blk_export_serves_successive_front_ends_and_is_managed_over_qmp() {
    if !qemu_system() {
        return;
    }
    let t = tmp();
    let dir = t.path();
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "a.qcow2", "16M"]);
    let sock = dir.join("vu.sock");
    let args: Vec<String> = [
        "--blockdev",
        "driver=file,node-name=f,filename=a.qcow2",
        "--blockdev",
        "driver=qcow2,node-name=q,file=f",
        "--export",
        &format!("type=vhost-user-blk,id=e,node-name=q,addr.type=unix,addr.path={},num-queues=2", sock.display()),
    ]
    .map(String::from)
    .to_vec();
    let d = Daemon::start(dir, &[OXCOW, "storage-daemon"], &args);
    // One front end after another on the same socket (QEMU reconnecting,
    // or a new VM): each negotiates from scratch.
    for queues in [2, 1, 2] {
        let r = front_end(dir, &sock, queues);
        assert_eq!(r.code, 0, "front end with {queues} queues: {}", r.stderr);
    }
    let r = front_end(dir, &sock, 3);
    assert!(
        r.code != 0 && r.stderr.contains("maximum number of queues supported by the backend is 2"),
        "3 queues on a 2-queue export: exit {}, {}",
        r.code,
        r.stderr
    );
    assert_eq!(front_end(dir, &sock, 1).code, 0, "the export stopped serving after a refused front end");

    let (mut q, _) = Qmp::connect(&dir.join("qmp.sock"));
    q.cmd(&json!({"execute": "qmp_capabilities"}));
    let list = q.cmd(&json!({"execute": "query-block-exports"}));
    assert_eq!(
        list.last().unwrap()["return"],
        json!([{"node-name": "q", "shutting-down": false, "type": "vhost-user-blk", "id": "e"}])
    );
    let r = q.cmd(&json!({"execute": "block-export-del", "arguments": {"id": "e"}}));
    assert_eq!(r.last().unwrap()["return"], json!({}), "{r:?}");
    assert!(!sock.exists(), "socket left behind by block-export-del");
    let sock2 = dir.join("vu2.sock");
    let add = json!({"execute": "block-export-add", "arguments": {
        "type": "vhost-user-blk", "id": "e2", "node-name": "q", "writable": true,
        "addr": {"type": "unix", "path": sock2.display().to_string()}, "logical-block-size": 4096}});
    let r = q.cmd(&add);
    assert_eq!(r.last().unwrap()["return"], json!({}), "{r:?}");
    assert_eq!(front_end(dir, &sock2, 1).code, 0);
    drop(q);
    quit(dir, &d);
    assert!(!sock2.exists(), "socket left behind at quit");
    ok(dir, "qemu-img", &["check", "a.qcow2"]);
}

#[test]
fn vhost_user_blk_export_options_are_checked() {
    let t = tmp();
    let dir = t.path();
    ok(dir, "qemu-img", &["create", "-q", "-f", "raw", "a.raw", "1M"]);
    let sock = dir.join("vu.sock").display().to_string();
    for (opts, says) in [
        ("logical-block-size=1000", "logical-block-size must be a power of 2 between 512 and 32768"),
        ("logical-block-size=256", "logical-block-size must be a power of 2 between 512 and 32768"),
        ("num-queues=0", "num-queues must be between 1 and 64"),
        ("num-queues=65", "num-queues must be between 1 and 64"),
        ("bogus=1", "Parameter 'bogus' is unexpected"),
    ] {
        let export = format!("type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={sock},{opts}");
        let r = run_in(
            dir,
            OXCOW,
            &["storage-daemon", "--blockdev", "driver=file,node-name=f,filename=a.raw", "--export", &export],
        );
        assert!(r.code != 0 && r.stderr.contains(says), "{opts}: exit {}, {}", r.code, r.stderr);
    }
    let export = "type=vhost-user-blk,id=e,node-name=f,addr.type=inet,addr.host=127.0.0.1,addr.port=1";
    let r = run_in(
        dir,
        OXCOW,
        &["storage-daemon", "--blockdev", "driver=file,node-name=f,filename=a.raw", "--export", export],
    );
    assert!(r.code != 0 && r.stderr.contains("Unix socket"), "inet: {}", r.stderr);
}
