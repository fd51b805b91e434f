//! QEMU 10's own clients (qemu-io, qemu-img, qemu-nbd -L) over oxcow's
//! NBD server, which now offers extended headers (QEMU's clients take
//! them whenever offered): the same commands against QEMU's qemu-nbd
//! serving the same image give the same output and the same image.

use crate::dropin::{bare_sides, run, Side};
use crate::nbd_list::Server;
use crate::support::ok;
use crate::support::process::s;
use std::process::Command;

/// `t.qcow2` over `t.base` (QEMU's iotest nbd-qemu-allocation's chain:
/// the base holds the first 2 MiB, the top 1 MiB to 3 MiB).
fn chain(side: &Side) {
    let d = side.dir.path();
    ok(d, "qemu-img", &["create", "-q", "-f", "qcow2", "t.base", "4M"]);
    ok(d, "qemu-io", &["-f", "qcow2", "-c", "write -P 0x11 0 2M", "t.base"]);
    ok(d, "qemu-img", &["create", "-q", "-f", "qcow2", "-b", "t.base", "-F", "qcow2", "t.qcow2", "4M"]);
    ok(d, "qemu-io", &["-f", "qcow2", "-c", "write -P 0x22 1M 2M", "t.qcow2"]);
}

/// The side's qemu-nbd serving `t.qcow2` persistently with `args`.
fn serve(side: &Side, args: &[&str]) -> (Server, String) {
    let sock = side.dir.path().join("x.sock");
    let all: Vec<&str> = ["-f", "qcow2"].iter().chain(args).chain(&["t.qcow2"]).copied().collect();
    let server = crate::nbd_list::serve(&side.bin.join("qemu-nbd"), side.dir.path(), &all, &sock);
    (server, s(&sock).to_string())
}

/// QEMU's tool `tool` (whichever side serves), its output with the
/// socket's directory and qemu-io's timings taken out.
fn qemu(side: &Side, tool: &str, args: &[&str]) -> String {
    let theirs = Side { dir: tempfile::tempdir().unwrap(), bin: "/usr/bin".into() };
    let o = run(&theirs, tool, args, None);
    let dir = format!("{}/", side.dir.path().display());
    format!("{}\n{}\n{}", o.code, o.stdout, o.stderr).replace(&dir, "DIR/")
}

/// Everything QEMU's clients see of the export at `sock`.
fn session(side: &Side, sock: &str) -> Vec<String> {
    let url = format!("nbd+unix:///?socket={sock}");
    let opts = format!("driver=nbd,server.type=unix,server.path={sock}");
    let depth = format!("{opts},x-dirty-bitmap=qemu:allocation-depth");
    let io = |cmds: &[&str]| {
        let mut a = vec!["-f", "raw"];
        for c in cmds {
            a.extend(["-c", *c]);
        }
        a.push(&url);
        qemu(side, "qemu-io", &a)
    };
    vec![
        qemu(side, "qemu-nbd", &["-L", "-k", sock]),
        qemu(side, "qemu-img", &["map", "--output=json", "--image-opts", &opts]),
        qemu(side, "qemu-img", &["map", "--output=json", "--image-opts", &depth]),
        io(&["read -P 0x11 0 1M", "read -P 0x22 1M 2M", "read -P 0 3M 1M"]),
        io(&["write -P 0x33 512 4k", "write -z 1M 64k", "write -z -u 2M 128k", "discard 3M 64k", "flush"]),
        io(&["read -P 0x33 512 4k", "read -P 0 1M 64k", "read -P 0 2M 128k", "read -P 0 3M 64k", "map"]),
        qemu(side, "qemu-img", &["map", "--output=json", "--image-opts", &opts]),
    ]
}

#[test]
fn qemu_clients_over_extended_headers_see_what_qemu_nbd_serves() {
    let (ours, theirs) = bare_sides();
    chain(&ours);
    chain(&theirs);
    let o = {
        let (_srv, sock) = serve(&ours, &["-A"]);
        session(&ours, &sock)
    };
    let t = {
        let (_srv, sock) = serve(&theirs, &["-A"]);
        session(&theirs, &sock)
    };
    for (i, (a, b)) in o.iter().zip(&t).enumerate() {
        assert_eq!(a, b, "step {i} differs:\noxcow:\n{a}\nqemu:\n{b}");
    }
    // The listing proves the transactions were extended.
    assert!(o[0].contains("transaction size: 64-bit"), "{}", o[0]);
    assert!(o[4].starts_with("0\n"), "{}", o[4]);
    // The images behind both servers hold the same data.
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "qcow2"])
        .arg(ours.dir.path().join("t.qcow2"))
        .arg(theirs.dir.path().join("t.qcow2"))
        .output()
        .expect("qemu-img compare");
    assert!(cmp.status.success(), "{}", String::from_utf8_lossy(&cmp.stdout));
}

/// QEMU's iotest nbd-qemu-allocation: a read-only export with the
/// allocation-depth context, listed by qemu-nbd -L as qemu-nbd's own.
#[test]
fn listing_a_read_only_allocation_depth_export_reads_as_qemu_nbds() {
    let (ours, theirs) = bare_sides();
    chain(&ours);
    chain(&theirs);
    let o = {
        let (_srv, sock) = serve(&ours, &["-r", "-A"]);
        qemu(&ours, "qemu-nbd", &["-L", "-k", &sock])
    };
    let t = {
        let (_srv, sock) = serve(&theirs, &["-r", "-A"]);
        qemu(&theirs, "qemu-nbd", &["-L", "-k", &sock])
    };
    assert_eq!(o, t);
    assert!(o.contains("flags: 0x148f ( readonly flush fua df cache block-status-payload )"), "{o}");
}
