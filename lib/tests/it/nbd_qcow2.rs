//! The NBD server over the qcow2 engine: QEMU's clients drive it through
//! the export, then QEMU checks the image file itself.

use crate::support::nbd::*;
use crate::support::process::{connect_when_ready, run_within};
use oxcow::nbd::proto::*;
use oxcow::nbd::server::{DiscardMode, ExportConfig};
use oxcow::OpenOptions;
use std::path::Path;

const MIB: u64 = 1 << 20;

fn qemu_io_file(fmt: &str, path: &Path, cmds: &[&str]) {
    let mut c = std::process::Command::new("qemu-io");
    c.args(["-f", fmt]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(path);
    let out = run_within(&mut c, std::time::Duration::from_secs(60));
    let t = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !t.contains("failed") && !t.contains("Pattern"), "qemu-io {cmds:?}:\n{t}");
}

fn cfg(name: &str) -> ExportConfig {
    ExportConfig::new(name).discard(DiscardMode::Unmap)
}

#[test]
fn qcow2_export_under_qemu_io_and_bench_stays_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.qcow2");
    let p = path.to_str().unwrap();
    qemu_img_ok(&["create", "-q", "-f", "qcow2", p, "32M"]);
    let img = oxcow::open(&path, &OpenOptions::read_write()).unwrap();
    let srv = start_tcp(img.device().clone(), cfg("q"), opts(true, 2));
    let uri = srv.uri("q");
    qemu_io_ok(
        &uri,
        &[
            "write -P 0xab 0 64k",
            "read -P 0xab 0 64k",
            "write -P 0x11 1M 256k",
            "write -z 1M 64k",
            "read -P 0 1M 64k",
            "read -P 0x11 1088k 192k",
            "discard 1216k 64k",
            "write -P 0x77 5000k 3000",
            "flush",
        ],
    );
    qemu_img_ok(&["bench", "-f", "raw", "-d", "32", "-c", "2000", "-w", "--pattern=0x5c", "-o", "8M", &uri]);
    qemu_img_ok(&["bench", "-f", "raw", "-d", "32", "-c", "2000", "-o", "8M", &uri]);
    qemu_io_ok(&uri, &["read -P 0xab 0 64k", "read -P 0x5c 8M 8000k", "read -P 0x77 5000k 3000"]);
    srv.stop().unwrap();
    img.close().unwrap();
    drop(img);
    qemu_img_ok(&["check", "-f", "qcow2", p]);
    qemu_io_file(
        "qcow2",
        &path,
        &["read -P 0xab 0 64k", "read -P 0 1M 64k", "read -P 0x11 1088k 128k", "read -P 0x5c 8M 8000k"],
    );
}

#[test]
fn qcow2_overlay_reports_depths_and_sparse_reads() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    qemu_img_ok(&["create", "-q", "-f", "qcow2", b, "4M"]);
    qemu_io_file("qcow2", &base, &["write -P 0xb1 0 128k", "write -P 0xb2 1M 64k"]);
    qemu_img_ok(&["create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", t]);
    qemu_io_file("qcow2", &top, &["write -P 0x71 64k 64k", "write -P 0x72 2M 64k"]);

    let img = oxcow::open(&top, &OpenOptions::read_write()).unwrap();
    let srv = start_tcp(img.device().clone(), cfg("top"), opts(true, 2));
    let mut c = client(&srv, "top", true, &["base:allocation", "qemu:allocation-depth"]);
    let (ba, dp) = (c.contexts["base:allocation"], c.contexts["qemu:allocation-depth"]);
    let r = c.call(0, CMD_BLOCK_STATUS, 0, 4 * MIB as u32, &[]);
    assert_eq!(r.error, 0);
    let k = 65536u32;
    let hz = STATE_HOLE | STATE_ZERO;
    assert_eq!(
        r.extents(dp),
        [(k, 2), (k, 1), (14 * k, 0), (k, 2), (15 * k, 0), (k, 1), (31 * k, 0)],
        "allocation depth"
    );
    let base_ext = r.extents(ba);
    assert_eq!(base_ext[0], (2 * k, 0), "{base_ext:?}");
    assert_eq!(base_ext[1], (14 * k, hz), "{base_ext:?}");

    let d = c.read(0, 4 * MIB as u32);
    assert!(d[..65536].iter().all(|&x| x == 0xb1));
    assert!(d[65536..131072].iter().all(|&x| x == 0x71));
    assert!(d[131072..MIB as usize].iter().all(|&x| x == 0));
    assert!(d[MIB as usize..MIB as usize + 65536].iter().all(|&x| x == 0xb2));
    assert!(d[2 * MIB as usize..2 * MIB as usize + 65536].iter().all(|&x| x == 0x72));
    let r = c.call(0, CMD_READ, 0, 4 * MIB as u32, &[]);
    assert!(r.kinds().contains(&REPLY_TYPE_OFFSET_HOLE));
    c.disconnect();

    // What QEMU makes of it through the export matches the file itself
    // (read with -U: our server still holds the image as its writer).
    let via_nbd = qemu_img_ok(&["compare", "-U", "-f", "raw", "-F", "qcow2", &srv.uri("top"), t]);
    assert!(via_nbd.contains("identical"), "{via_nbd}");
    srv.stop().unwrap();
    img.close().unwrap();
    drop(img);
    qemu_img_ok(&["check", "-f", "qcow2", t]);
}

/// Serves `path` with qemu-nbd on a Unix socket (to one client) and
/// returns the child.
fn spawn_qemu_nbd(path: &Path, sock: &Path) -> std::process::Child {
    std::process::Command::new("qemu-nbd")
        .args(["-r", "-A", "-f", "qcow2", "-x", "top", "-k", sock.to_str().unwrap(), path.to_str().unwrap()])
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("qemu-nbd")
}

#[test]
fn block_status_matches_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    qemu_img_ok(&["create", "-q", "-f", "qcow2", b, "6M"]);
    qemu_io_file("qcow2", &base, &["write -P 0xb1 0 192k", "write -z 1M 128k", "write -P 3 3M 64k"]);
    qemu_img_ok(&["create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", t, "8M"]);
    qemu_io_file("qcow2", &top, &["write -P 0x71 64k 64k", "write -z 2M 64k", "write -P 9 3M 32k", "write -P 5 7M 4k"]);

    let query = |c: &mut Client, off: u64, len: u32, flags: u16| {
        let r = c.call(flags, CMD_BLOCK_STATUS, off, len, &[]);
        assert_eq!(r.error, 0);
        (r.extents(c.contexts["base:allocation"]), r.extents(c.contexts["qemu:allocation-depth"]))
    };
    let cases = [(0u64, 8 * MIB as u32, 0u16), (4096, 3 * MIB as u32, 0), (0, 8 * MIB as u32, CMD_FLAG_REQ_ONE)];

    let sock = dir.path().join("qemu.sock");
    let mut qemu = spawn_qemu_nbd(&top, &sock);
    let mut qc = Client::start(Stream::Unix(connect_when_ready(&sock, Some(&mut qemu), "qemu-nbd"))).go(
        "top",
        true,
        &["base:allocation", "qemu:allocation-depth"],
    );
    let theirs: Vec<_> = cases.iter().map(|&(o, l, f)| query(&mut qc, o, l, f)).collect();
    let their_read = qc.read(0, 8 * MIB as u32);
    let their_flags = qc.flags;
    qc.disconnect();
    let _ = qemu.wait();

    let img = oxcow::open(&top, &OpenOptions::read_only()).unwrap();
    let srv = start_tcp(img.device().clone(), cfg("top"), opts(true, 1));
    let mut c = client(&srv, "top", true, &["base:allocation", "qemu:allocation-depth"]);
    assert_eq!(c.flags & !FLAG_CAN_MULTI_CONN, their_flags & !FLAG_CAN_MULTI_CONN, "transmission flags");
    for (i, &(o, l, f)) in cases.iter().enumerate() {
        assert_eq!(query(&mut c, o, l, f), theirs[i], "block status at {o}+{l} flags {f}");
    }
    assert_eq!(c.read(0, 8 * MIB as u32), their_read);
    c.disconnect();
}
