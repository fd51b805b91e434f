//! `qemu-nbd -L`: oxcow's listing of a server's exports against QEMU's
//! qemu-nbd listing the same server, byte for byte.

use crate::dropin::{bare_sides, run, Side};
use crate::support::ok;
use crate::support::process::{s, wait_for_socket};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A server process, killed when dropped.
pub(crate) struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A persistent server (`-t`, so the listings' probes do not end it):
/// the qemu-nbd `program` run in `dir` on the Unix socket `sock`.
pub(crate) fn serve(program: &Path, dir: &Path, args: &[&str], sock: &Path) -> Server {
    let child = Command::new(program)
        .args(["-t", "-k", s(sock)])
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start qemu-nbd");
    let mut server = Server(child);
    wait_for_socket(sock, Some(&mut server.0), "qemu-nbd");
    server
}

fn image(side: &Side) {
    ok(side.dir.path(), "qemu-img", &["create", "-q", "-f", "qcow2", "x.qcow2", "4M"]);
}

/// Both tools list the server at `sock`: same output, same status.
fn same_listing(ours: &Side, theirs: &Side, sock: &Path) -> String {
    let o = run(ours, "qemu-nbd", &["-L", "-k", s(sock)], None);
    let t = run(theirs, "qemu-nbd", &["-L", "-k", s(sock)], None);
    assert_eq!(
        (o.code, &o.stdout),
        (t.code, &t.stdout),
        "oxcow:\n{}{}\nqemu:\n{}{}",
        o.stdout,
        o.stderr,
        t.stdout,
        t.stderr
    );
    o.stdout
}

/// QEMU's server speaks extended headers: the listing shows 64-bit
/// transactions, the block-status-payload flag and the
/// allocation-depth context, as in QEMU's iotest nbd-qemu-allocation.
#[test]
fn listing_a_qemu_server_reads_as_qemu_nbds() {
    let (ours, theirs) = bare_sides();
    image(&theirs);
    let sock = theirs.dir.path().join("q.sock");
    let _server =
        serve(&theirs.bin.join("qemu-nbd"), theirs.dir.path(), &["-r", "-A", "-f", "qcow2", "x.qcow2"], &sock);
    let out = same_listing(&ours, &theirs, &sock);
    assert!(out.contains("transaction size: 64-bit") && out.contains("qemu:allocation-depth"), "{out}");
}

/// An oxcow server with a name and a description, listed by both tools.
#[test]
fn listing_an_oxcow_server_reads_as_qemu_nbds() {
    let (ours, theirs) = bare_sides();
    image(&ours);
    let sock = ours.dir.path().join("o.sock");
    let args = ["-x", "disk", "-D", "some text", "-A", "-f", "qcow2", "x.qcow2"];
    let _server = serve(&ours.bin.join("qemu-nbd"), ours.dir.path(), &args, &sock);
    let out = same_listing(&ours, &theirs, &sock);
    assert!(out.contains(" export: 'disk'\n  description: some text\n"), "{out}");
}

/// Per-device options and file names make no sense with -L: refused in
/// qemu-nbd's words.
#[test]
fn listing_refuses_per_device_options_as_qemu_nbd() {
    let (ours, theirs) = bare_sides();
    let sock = "/nonexistent/x.sock";
    for args in [&["-L", "-k", sock, "x.qcow2"][..], &["-L", "-k", sock, "-x", "e"], &["-L", "--fork"]] {
        let o = run(&ours, "qemu-nbd", args, None);
        let t = run(&theirs, "qemu-nbd", args, None);
        assert_eq!((o.code, &o.stderr), (t.code, &t.stderr), "{args:?}");
    }
}
