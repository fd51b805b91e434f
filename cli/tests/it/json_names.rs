//! QEMU's `json:{...}` file names and `--image-opts` option trees, a
//! format over a protocol: a local file, and a qcow2 image read through
//! `qemu-nbd --tls-creds` (issue 18's client half), by oxcow's own
//! commands and under the drop-in names.

use crate::support::process::{run, s, wait_for_socket};
use crate::support::{ok, tmp, OXCOW};
use crate::tls_interop::{client_creds, server_creds, setup, Server};
use std::process::{Command, Stdio};

#[test]
fn json_names_open_a_format_over_a_file() {
    let d = tmp();
    let links = d.path().join("bin");
    ok(d.path(), OXCOW, &["install-links", s(&links)]);
    ok(d.path(), "qemu-img", &["create", "-q", "-f", "qcow2", "a,b.qcow2", "3M"]);
    ok(d.path(), "qemu-io", &["-f", "qcow2", "-c", "write -P 0x42 1M 64k", "a,b.qcow2"]);
    let name = r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"a,b.qcow2"}}"#;
    let info = ok(d.path(), OXCOW, &["info", "--output=json", name]);
    assert!(info.stdout.contains("\"virtual-size\": 3145728") && info.stdout.contains("\"format\": \"qcow2\""));
    let r = ok(d.path(), OXCOW, &["io", "-c", "read -P 0x42 1M 64k", "-c", "read -P 0 0 1M", name]);
    assert!(!r.stdout.contains("fail"), "{}", r.stdout);
    let qio = links.join("qemu-io");
    let r = ok(d.path(), s(&qio), &["-c", "write -P 0x43 2M 4k", name]);
    assert!(r.stdout.contains("wrote 4096/4096 bytes"), "{}", r.stdout);
    let r = ok(d.path(), "qemu-io", &["-f", "qcow2", "-c", "read -P 0x43 2M 4k", "a,b.qcow2"]);
    assert!(!r.stdout.contains("fail"), "{}", r.stdout);
    // Broken JSON is an error, not a file name.
    let r = run(OXCOW, &["info", "json:{\"driver\":"]);
    assert!(r.0 != 0 && r.2.contains("JSON"), "{r:?}");
}

/// A qcow2 image exported as raw bytes by qemu-nbd over TLS, opened by
/// oxcow as `qcow2` over `nbd` with `tls-creds`, the way QEMU names it.
#[test]
fn qcow2_over_nbd_over_tls_from_qemu_nbd_by_json_name_and_image_opts() {
    let t = setup();
    ok(t.dir.path(), "qemu-io", &["-f", "qcow2", "-c", "write -P 0x5a 4M 64k", s(&t.img)]);
    let sock = s(&t.sock);
    let sobj = server_creds(&t.creds, true);
    let mut child = Command::new("qemu-nbd")
        .args(["-t", "-f", "raw", "-x", "disk", "-k", sock, "--object", &sobj, "--tls-creds", "tls0", s(&t.img)])
        .stdout(Stdio::null())
        .spawn()
        .expect("start qemu-nbd");
    wait_for_socket(&t.sock, Some(&mut child), "qemu-nbd");
    let _server = Server::adopt(child);
    let obj = client_creds(&t.creds);
    let json = format!(
        r#"json:{{"driver":"qcow2","file":{{"driver":"nbd","server":{{"type":"unix","path":"{sock}"}},"export":"disk","tls-creds":"tls0","tls-hostname":"localhost"}}}}"#
    );
    let opts = format!(
        "driver=qcow2,file.driver=nbd,file.server.type=unix,file.server.path={sock},file.export=disk,file.tls-creds=tls0,file.tls-hostname=localhost"
    );
    let (code, out, err) = run(OXCOW, &["info", "--output=json", "--object", &obj, &json]);
    assert!(code == 0 && out.contains("\"format\": \"qcow2\"") && out.contains("16777216"), "{out}{err}");
    let (code, out, err) = run(OXCOW, &["info", "--output=json", "--object", &obj, "--image-opts", &opts]);
    assert!(code == 0 && out.contains("\"format\": \"qcow2\""), "{out}{err}");
    let (code, out, err) = run(OXCOW, &["io", "--object", &obj, "-c", "read -P 0x5a 4M 64k", &json]);
    assert!(code == 0 && out.contains("read 65536/65536") && !out.contains("fail"), "{out}{err}");
    let (code, out, err) = run(OXCOW, &["io", "--object", &obj, "--image-opts", "-c", "read -P 0 0 64k", &opts]);
    assert!(code == 0 && out.contains("read 65536/65536") && !out.contains("fail"), "{out}{err}");
    let copy = t.dir.path().join("copy.raw");
    let (code, out, err) = run(OXCOW, &["convert", "--object", &obj, "-O", "raw", &json, s(&copy)]);
    assert_eq!(code, 0, "{out}{err}");
    let data = std::fs::read(&copy).unwrap();
    assert!(data.len() == 16 << 20 && data[4 << 20..(4 << 20) + 65536].iter().all(|&b| b == 0x5a));
    // Without the credentials object the name is refused, not opened in plaintext.
    let (code, _, err) = run(OXCOW, &["info", &json]);
    assert!(code != 0 && err.contains("tls0"), "{err}");
}

/// iotest 150: QEMU's `null-co` driver as a convert source, named by a
/// `json:` name in QEMU's single-quoted JSON: it reads as zeros, so a
/// sparse convert allocates nothing and `-S 0` everything, as qemu-img.
#[test]
fn null_co_json_source_converts_as_qemu_img() {
    let d = tmp();
    let src = "json:{ 'driver': 'null-co', 'size': 1048576, 'read-zeroes': true }";
    for sparse in ["512", "0"] {
        for (prog, out) in [(OXCOW, "ox.qcow2"), ("qemu-img", "qm.qcow2")] {
            ok(d.path(), prog, &["convert", "-O", "qcow2", "-S", sparse, src, out]);
        }
        let map = |f: &str| ok(d.path(), "qemu-img", &["map", "--output=json", f]).stdout;
        let strip =
            |m: String| m.lines().map(|l| l.split(", \"offset\"").next().unwrap_or(l).to_string()).collect::<Vec<_>>();
        assert_eq!(strip(map("ox.qcow2")), strip(map("qm.qcow2")), "-S {sparse}");
    }
    let io = ok(
        d.path(),
        OXCOW,
        &["io", "-c", "write -P 1 0 4k", "-c", "read -P 0 0 4k", "json:{'driver':'null-co','size':8192}"],
    );
    assert!(!io.stdout.contains("fail"), "{}", io.stdout);
}
