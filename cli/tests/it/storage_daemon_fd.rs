//! Listening sockets passed in by the parent process, as libvirt starts
//! qemu-storage-daemon: `--nbd-server addr.type=fd,addr.str=N`, a
//! vhost-user-blk export's `addr.type=fd,addr.str=N` and `--chardev
//! socket,fd=N,server=on` for the QMP monitor. A Python parent binds the
//! sockets and runs the daemon with them inherited (`pass_fds`); the same
//! command line runs under qemu-storage-daemon, and both serve.

use super::storage_daemon_cli::{have_qsd, quit, Daemon};
use super::storage_daemon_vhost::{front_end, qemu_system};
use crate::support::{ok, tmp, OXCOW};
use std::path::Path;

/// Binds `nbd.sock` and `qmp.sock` (listening) and `vu.sock` (bound
/// only: the daemon makes it listen, as QEMU does), then runs the command
/// line after `--`, where NBD_FD, VU_FD and QMP_FD stand for their
/// numbers; exits with its status.
const PARENT: &str = r#"
import os, socket, subprocess, sys
d = sys.argv[1]
def sock(name, listen):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(os.path.join(d, name))
    if listen:
        s.listen()
    return s
nbd, vu, qmp = sock("nbd.sock", True), sock("vu.sock", False), sock("qmp.sock", True)
fds = {"NBD_FD": nbd.fileno(), "VU_FD": vu.fileno(), "QMP_FD": qmp.fileno()}
args = sys.argv[2:]
for k, v in fds.items():
    args = [a.replace(k, str(v)) for a in args]
sys.exit(subprocess.run(args, pass_fds=tuple(fds.values())).returncode)
"#;

fn run_with_inherited_sockets(dir: &Path, prog: &[&str]) -> Daemon {
    std::fs::write(dir.join("parent.py"), PARENT).expect("write parent.py");
    let mut args: Vec<String> = vec!["parent.py".into(), dir.display().to_string()];
    args.extend(prog.iter().map(|s| s.to_string()));
    args.extend(
        [
            "--blockdev",
            "driver=file,node-name=f,filename=a.qcow2",
            "--blockdev",
            "driver=qcow2,node-name=q,file=f",
            "--nbd-server",
            "addr.type=fd,addr.str=NBD_FD",
            "--export",
            "type=nbd,id=n,node-name=q,name=disk,writable=on",
            "--export",
            "type=vhost-user-blk,id=v,node-name=q,addr.type=fd,addr.str=VU_FD",
            "--chardev",
            "socket,id=m,fd=QMP_FD,server=on,wait=off",
            "--monitor",
            "chardev=m",
            "--pidfile",
            "daemon.pid",
            "--daemonize",
        ]
        .map(String::from),
    );
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(dir, "python3", &refs);
    Daemon::from_pidfile(dir)
}

#[test]
fn nbd_vhost_user_blk_and_monitor_serve_on_sockets_inherited_from_the_parent() {
    if !qemu_system() {
        return;
    }
    let oxcow: &[&str] = &[OXCOW, "storage-daemon"];
    let qsd: &[&str] = &["qemu-storage-daemon"];
    let daemons: &[&[&str]] = if have_qsd() { &[oxcow, qsd] } else { &[oxcow] };
    for prog in daemons {
        let t = tmp();
        let dir = t.path();
        ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "a.qcow2", "16M"]);
        let d = run_with_inherited_sockets(dir, prog);
        let uri = format!("nbd+unix:///disk?socket={}", dir.join("nbd.sock").display());
        ok(dir, "qemu-io", &["-f", "raw", "-c", "write -P 0x4e 1M 64k", &uri]);
        ok(dir, "qemu-io", &["-f", "raw", "-c", "read -P 0x4e 1M 64k", &uri]);
        let r = front_end(dir, &dir.join("vu.sock"), 1);
        assert_eq!(r.code, 0, "{prog:?}: vhost-user front end on the inherited socket: {}", r.stderr);
        quit(dir, &d);
        ok(dir, "qemu-img", &["check", "a.qcow2"]);
        ok(dir, "qemu-io", &["-c", "read -P 0x4e 1M 64k", "a.qcow2"]);
    }
}

#[test]
fn descriptors_that_are_not_sockets_are_refused_in_qemu_storage_daemon_words() {
    let t = tmp();
    let dir = t.path();
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "a.qcow2", "4M"]);
    let f = "driver=file,node-name=f,filename=a.qcow2";
    let q = "driver=qcow2,node-name=q,file=f";
    let vhost = |fd: &str| format!("type=vhost-user-blk,id=e,node-name=q,addr.type=fd,addr.str={fd}");
    let cases: Vec<(Vec<String>, String)> = vec![
        (vec!["--nbd-server".into(), "addr.type=fd,addr.str=99".into()], "File descriptor '99' is not a socket".into()),
        // Standard input is a file here, not a socket.
        (vec!["--nbd-server".into(), "addr.type=fd,addr.str=0".into()], "File descriptor '0' is not a socket".into()),
        (vec!["--nbd-server".into(), "addr.type=fd,addr.str=foo".into()], "Unable to parse FD number foo".into()),
        (vec!["--nbd-server".into(), "addr.type=fd".into()], "Parameter 'addr.str' is missing".into()),
        (vec!["--export".into(), vhost("99")], "File descriptor '99' is not a socket".into()),
        (
            vec!["--chardev".into(), "socket,id=m,fd=98,server=on,wait=off".into()],
            "File descriptor '98' is not a socket".into(),
        ),
    ];
    let qsd = have_qsd();
    for (extra, says) in cases {
        let mut args: Vec<String> = vec!["--blockdev".into(), f.into(), "--blockdev".into(), q.into()];
        args.extend(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let stdin = || std::fs::File::open(dir.join("a.qcow2")).expect("open a.qcow2");
        let mut ours = std::process::Command::new(OXCOW);
        ours.arg("storage-daemon").args(&refs).current_dir(dir).stdin(stdin());
        let ours = crate::support::process::capture(&mut ours);
        let want = format!("oxcow: {}: {says}", refs[4..].join(" "));
        assert_eq!((ours.0, ours.2.trim()), (1, want.as_str()), "{refs:?}");
        if qsd {
            let mut theirs = std::process::Command::new("qemu-storage-daemon");
            theirs.args(&refs).current_dir(dir).stdin(stdin());
            let theirs = crate::support::process::capture(&mut theirs);
            let want = format!("qemu-storage-daemon: {}: {says}", refs[4..].join(" "));
            assert_eq!((theirs.0, theirs.2.trim()), (1, want.as_str()), "{refs:?}");
        }
    }
}
