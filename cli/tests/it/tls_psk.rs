//! NBD over TLS with pre-shared keys (`tls-creds-psk`, `keys.psk` of
//! `username:hexkey` lines) between oxcow and QEMU's tools and libnbd,
//! both ways; a wrong key, an unknown user, or a user outside the
//! `--tls-authz` list are refused, by oxcow as by qemu-nbd.

use crate::support::process::{run, s};
use crate::tls_interop::{oxcow_serve, qemu_nbd, Server};
use std::path::{Path, PathBuf};

const OXCOW: &str = env!("CARGO_BIN_EXE_oxcow");

const ALICE: &str = "alice:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const BOB: &str = "bob:fedcba9876543210fedcba9876543210";

struct Setup {
    dir: tempfile::TempDir,
    img: PathBuf,
    sock: PathBuf,
    /// The server's keys: alice and bob.
    keys: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "16M"]);
    let keys = key_dir(dir.path(), "server", &format!("{ALICE}\n{BOB}\n"));
    let sock = dir.path().join("nbd.sock");
    Setup { dir, img, sock, keys }
}

fn key_dir(parent: &Path, name: &str, lines: &str) -> PathBuf {
    let d = parent.join(name);
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join("keys.psk"), lines).unwrap();
    d
}

fn server_obj(dir: &Path) -> String {
    format!("tls-creds-psk,id=tls0,dir={},endpoint=server", s(dir))
}

fn client_obj(dir: &Path, user: &str) -> String {
    format!("tls-creds-psk,id=tls0,dir={},username={user},endpoint=client", s(dir))
}

fn image_opts(sock: &Path) -> String {
    format!("driver=nbd,server.type=unix,server.path={},export=disk,tls-creds=tls0", s(sock))
}

/// Runs `prog` (qemu-io or `oxcow io`) commands on the export as `user`
/// with the keys in `dir`.
fn io_as(prog: &str, dir: &Path, user: &str, sock: &Path, cmds: &[&str]) -> (i32, String, String) {
    let obj = client_obj(dir, user);
    let opts = image_opts(sock);
    let mut args = vec![];
    if prog == OXCOW {
        args.push("io");
    }
    args.extend(["--object", &obj, "--image-opts"]);
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(&opts);
    run(prog, &args)
}

/// Whether `prog` as `user` (key from `dir`) reads the export.
fn reads(prog: &str, dir: &Path, user: &str, sock: &Path) -> bool {
    let (code, out, err) = io_as(prog, dir, user, sock, &["read 0 4k"]);
    code == 0 && !out.contains("failed") && !err.contains("failed")
}

#[test]
fn qemu_io_and_qemu_img_reach_oxcow_serve_with_psk() {
    let t = setup();
    let server = oxcow_serve(&t.img, &t.sock, &["--object", &server_obj(&t.keys), "--tls-creds", "tls0"]);
    let client = key_dir(t.dir.path(), "alice", &format!("{ALICE}\n"));
    let (code, out, err) = io_as("qemu-io", &client, "alice", &t.sock, &["write -P 0x5a 64k 128k"]);
    assert!(code == 0 && !out.contains("failed"), "{out}{err}");
    let (code, out, err) = io_as("qemu-io", &client, "alice", &t.sock, &["read -P 0x5a 64k 128k"]);
    assert!(code == 0 && !out.contains("failed"), "{out}{err}");
    let obj = client_obj(&client, "alice");
    let (code, out, err) = run("qemu-img", &["info", "--object", &obj, "--image-opts", &image_opts(&t.sock)]);
    assert!(code == 0 && out.contains("16 MiB"), "{out}{err}");
    // The same user with another key, and a user the server does not know.
    let wrong = key_dir(t.dir.path(), "wrong", "alice:00112233445566778899aabbccddeeff\n");
    assert!(!reads("qemu-io", &wrong, "alice", &t.sock), "a wrong key got in");
    let carol = key_dir(t.dir.path(), "carol", "carol:0123456789abcdef0123456789abcdef\n");
    assert!(!reads("qemu-io", &carol, "carol", &t.sock), "an unknown user got in");
    assert!(reads("qemu-io", &client, "alice", &t.sock), "refusals leave the server serving");
    server.term();
    let (code, out, err) = run("qemu-io", &["-c", "read -P 0x5a 64k 128k", s(&t.img)]);
    assert!(code == 0 && !out.contains("failed"), "the write reached the image: {out}{err}");
}

#[test]
fn oxcow_client_reaches_qemu_nbd_with_psk() {
    let t = setup();
    let _server = qemu_nbd(&t.img, &t.sock, &["--object", &server_obj(&t.keys), "--tls-creds", "tls0"]);
    let client = key_dir(t.dir.path(), "bob", &format!("{ALICE}\n{BOB}\n"));
    let (code, out, err) = io_as(OXCOW, &client, "bob", &t.sock, &["write -P 0x33 1m 64k", "read -P 0x33 1m 64k"]);
    assert!(code == 0 && !out.contains("failed"), "{out}{err}");
    // libnbd's URI form, with the username as a query parameter.
    let url =
        format!("nbds+unix:///disk?socket={}&tls-psk-file={}/keys.psk&tls-username=alice", s(&t.sock), s(&client));
    let (code, out, err) = run(OXCOW, &["io", "-f", "raw", "-r", "-c", "read -P 0 0 64k", &url]);
    assert!(code == 0 && !out.contains("failed"), "{out}{err}");
    let wrong = key_dir(t.dir.path(), "wrong", "bob:00112233445566778899aabbccddeeff\n");
    assert!(!reads(OXCOW, &wrong, "bob", &t.sock), "qemu-nbd let a wrong key in, or oxcow went on");
    // A username missing from the client's own file is an error up front.
    let (code, _, err) = io_as(OXCOW, &client, "carol", &t.sock, &["read 0 4k"]);
    assert!(code != 0 && err.contains("carol"), "{err}");
}

/// Which of alice and bob get in through `--tls-authz` with `authz`.
fn admitted(serve: fn(&Path, &Path, &[&str]) -> Server, authz: &str) -> (bool, bool) {
    let t = setup();
    let client = key_dir(t.dir.path(), "client", &format!("{ALICE}\n{BOB}\n"));
    let _server = serve(
        &t.img,
        &t.sock,
        &["--object", &server_obj(&t.keys), "--object", authz, "--tls-creds", "tls0", "--tls-authz", "auth0"],
    );
    (reads("qemu-io", &client, "alice", &t.sock), reads("qemu-io", &client, "bob", &t.sock))
}

/// `--tls-authz` under PSK matches the client's username, as QEMU's
/// documentation describes. (qemu-nbd 10 as tested here lets every user
/// with a valid key in regardless, so this is not compared against it.)
#[test]
fn psk_tls_authz_matches_the_username() {
    let simple = "authz-simple,id=auth0,identity=alice";
    assert_eq!(admitted(oxcow_serve, simple), (true, false), "{simple}");
    let list = "authz-list,id=auth0,policy=deny,rules.0.match=b*,rules.0.policy=allow,rules.0.format=glob";
    assert_eq!(admitted(oxcow_serve, list), (false, true), "{list}");
}

#[test]
fn libnbd_reaches_oxcow_serve_with_psk() {
    if !crate::support::process::have("nbdinfo") {
        eprintln!("skipped: nbdinfo (libnbd-bin) not installed");
        return;
    }
    let t = setup();
    let server = oxcow_serve(&t.img, &t.sock, &["--object", &server_obj(&t.keys), "--tls-creds", "tls0"]);
    let keys = format!("{}/keys.psk", s(&t.keys));
    let url = format!("nbds+unix://alice@/disk?socket={}&tls-psk-file={keys}", s(&t.sock));
    let (code, out, err) = run("nbdinfo", &["--size", &url]);
    assert!(code == 0 && out.trim() == "16777216", "{out}{err}");
    let url = format!("nbds+unix://carol@/disk?socket={}&tls-psk-file={keys}", s(&t.sock));
    let (code, out, err) = run("nbdinfo", &["--size", &url]);
    assert_ne!(code, 0, "an unknown user got in: {out}{err}");
    server.term();
}

#[test]
fn garbage_and_a_stalled_handshake_leave_a_psk_server_serving() {
    use std::io::Write;
    let t = setup();
    let extra = ["--object", &server_obj(&t.keys), "--tls-creds", "tls0", "--handshake-limit", "1"];
    let server = oxcow_serve(&t.img, &t.sock, &extra);
    let client = key_dir(t.dir.path(), "alice", &format!("{ALICE}\n"));
    let mut c = crate::tls_hostile::after_starttls(&t.sock);
    // A handshake record header announcing a ClientHello, then nonsense.
    c.write_all(&[0x16, 3, 1, 0, 8, 1, 0, 0, 4, 0xde, 0xad, 0xbe, 0xef]).unwrap();
    crate::tls_hostile::closed_by_server(c);
    let stalled = crate::tls_hostile::after_starttls(&t.sock);
    assert!(reads("qemu-io", &client, "alice", &t.sock), "served while a handshake stalls");
    // The handshake limit ends the stalled one.
    crate::tls_hostile::closed_by_server(stalled);
    assert!(reads("qemu-io", &client, "alice", &t.sock));
    server.term();
}
