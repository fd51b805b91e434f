//! `qemu-img info` on NBD names and `qemu-img convert` onto an NBD export
//! (QEMU's iotest 302), against QEMU's qemu-img on the same server.

use crate::dropin::{bare_sides, run};
use crate::nbd_list::{serve, Server};
use crate::support::ok;
use crate::support::process::s;

/// QEMU's qemu-nbd serving `file` as raw from `dir`, persistently.
fn qemu_nbd(dir: &std::path::Path, file: &str) -> (Server, String) {
    let sock = dir.join("n.sock");
    let server = serve(std::path::Path::new("qemu-nbd"), dir, &["-x", "exp", "-f", "raw", file], &sock);
    (server, s(&sock).to_string())
}

#[test]
fn info_on_nbd_names_reads_as_qemu_imgs() {
    let (ours, theirs) = bare_sides();
    let d = theirs.dir.path();
    ok(d, "qemu-img", &["create", "-q", "-f", "raw", "d.raw", "448k"]);
    let (_srv, sock) = qemu_nbd(d, "d.raw");
    let url = format!("nbd+unix:///exp?socket={sock}");
    let opts = format!("driver=nbd,server.type=unix,server.path={sock},export=exp");
    let json = format!(r#"json:{{"driver":"nbd","server":{{"type":"unix","path":"{sock}"}},"export":"exp"}}"#);
    for args in [
        vec!["info", url.as_str()],
        vec!["info", "--output=json", &url],
        vec!["info", "--image-opts", &opts],
        vec!["info", "--output=json", "--image-opts", &opts],
        vec!["info", &json],
    ] {
        let o = run(&ours, "qemu-img", &args, None);
        let t = run(&theirs, "qemu-img", &args, None);
        assert_eq!((o.code, &o.stdout, &o.stderr), (t.code, &t.stdout, &t.stderr), "{args:?}");
        assert!(o.stdout.contains("unavailable") || o.stdout.contains("\"nbd\""), "{}", o.stdout);
    }
}

/// A compressed qcow2 image written straight onto an existing export
/// (which cannot be created nor resized), then read back by QEMU.
#[test]
fn convert_onto_an_nbd_export_writes_a_qcow2_image_qemu_reads() {
    let (ours, theirs) = bare_sides();
    let d = ours.dir.path();
    ok(d, "qemu-img", &["create", "-q", "-f", "qcow2", "src.qcow2", "1G"]);
    ok(d, "qemu-io", &["-f", "qcow2", "-c", "write -P 0x5a 1M 64k", "src.qcow2"]);
    std::fs::write(d.join("t.raw"), vec![0xeeu8; 448 << 10]).unwrap();
    let (_srv, sock) = qemu_nbd(d, "t.raw");
    let url = format!("nbd+unix:///exp?socket={sock}");
    let o = run(&ours, "qemu-img", &["convert", "-f", "qcow2", "-O", "qcow2", "-c", "src.qcow2", &url], None);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let check = run(&theirs, "qemu-img", &["check", &url], None);
    assert_eq!(check.code, 0, "{}{}", check.stdout, check.stderr);
    assert!(check.stdout.contains("100.00% compressed clusters"), "{}", check.stdout);
    let cmp = run(&theirs, "qemu-img", &["compare", s(&d.join("src.qcow2")), &url], None);
    assert_eq!((cmp.code, cmp.stdout.trim()), (0, "Images are identical."), "{}", cmp.stderr);
}
