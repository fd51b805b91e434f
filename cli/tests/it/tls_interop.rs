//! NBD over TLS between oxcow and QEMU's tools, both ways: `oxcow serve
//! --tls-creds` reached by qemu-io and qemu-img, and oxcow's client
//! reaching `qemu-nbd --tls-creds`; certificates made in the test, Unix
//! sockets so tests never race for ports.

use crate::support::certs::Ca;
use crate::support::process::{run, s, wait_for_socket, wait_ready};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const OXCOW: &str = env!("CARGO_BIN_EXE_oxcow");

/// A server process, killed when the test ends however it ends.
pub struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Server {
    fn start(prog: &str, args: &[&str], sock: &Path) -> Server {
        let mut child = Command::new(prog).args(args).stdout(Stdio::null()).spawn().unwrap();
        wait_for_socket(sock, Some(&mut child), prog);
        Server(child)
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Takes charge of an already started server.
    pub fn adopt(child: Child) -> Server {
        Server(child)
    }

    /// Asks the server to stop and checks it exits cleanly.
    pub fn term(mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        let mut status = None;
        wait_ready("server exit on SIGTERM", None, || {
            status = self.0.try_wait().unwrap();
            status.is_some()
        });
        assert!(status.unwrap().success(), "server exit status {:?}", status);
    }
}

/// `oxcow serve` of `img` on `sock` with `extra` flags (TLS objects and so on).
pub fn oxcow_serve(img: &Path, sock: &Path, extra: &[&str]) -> Server {
    let mut args = vec!["serve", "-t", "-e", "4", "-f", "qcow2", "-x", "disk", "-k", s(sock)];
    args.extend_from_slice(extra);
    args.push(s(img));
    Server::start(OXCOW, &args, sock)
}

/// `qemu-nbd` of `img` on `sock` with `extra` flags.
pub fn qemu_nbd(img: &Path, sock: &Path, extra: &[&str]) -> Server {
    let mut args = vec!["-t", "-e", "4", "-f", "qcow2", "-x", "disk", "-k", s(sock)];
    args.extend_from_slice(extra);
    args.push(s(img));
    Server::start("qemu-nbd", &args, sock)
}

pub fn server_creds(dir: &Path, verify_peer: bool) -> String {
    let vp = if verify_peer { "on" } else { "off" };
    format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer={vp}",
        dir.display().to_string().replace(',', ",,")
    )
}

pub fn client_creds(dir: &Path) -> String {
    format!("tls-creds-x509,id=tls0,dir={},endpoint=client", dir.display().to_string().replace(',', ",,"))
}

/// QEMU's `--image-opts` for the export on `sock` over TLS.
pub fn image_opts(sock: &Path) -> String {
    format!("driver=nbd,server.type=unix,server.path={},export=disk,tls-creds=tls0,tls-hostname=localhost", s(sock))
}

/// Runs qemu-io commands against the export on `sock` with client
/// credentials from `creds`.
pub fn qemu_io_tls(creds: &Path, sock: &Path, cmds: &[&str]) -> (i32, String, String) {
    let obj = client_creds(creds);
    let opts = image_opts(sock);
    let mut args = vec!["--object", &obj, "--image-opts"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(&opts);
    run("qemu-io", &args)
}

/// libnbd-style location of the export on `sock` over TLS.
pub fn nbds_url(creds: &Path, sock: &Path) -> String {
    format!("nbds+unix:///disk?socket={}&tls-certificates={}", s(sock), s(creds))
}

pub struct Setup {
    pub dir: tempfile::TempDir,
    pub img: PathBuf,
    pub sock: PathBuf,
    /// Server credentials, and a client certificate `CN=client1`.
    pub creds: PathBuf,
    /// The CA that signed them.
    pub ca: Ca,
}

pub fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Example");
    let creds = ca.dir(dir.path(), "creds", Some("client1"));
    let img = dir.path().join("img.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "16M"]);
    let sock = dir.path().join("nbd.sock");
    Setup { dir, img, sock, creds, ca }
}

#[test]
fn qemu_io_writes_and_reads_through_oxcow_serve_over_tls_with_client_certificates() {
    let t = setup();
    let server = oxcow_serve(&t.img, &t.sock, &["--object", &server_creds(&t.creds, true), "--tls-creds", "tls0"]);
    let (code, out, err) = qemu_io_tls(&t.creds, &t.sock, &["write -P 0x5a 0 1M", "write -z 2M 64k", "flush"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = qemu_io_tls(&t.creds, &t.sock, &["read -P 0x5a 0 1M", "read -P 0 2M 64k"]);
    assert!(code == 0 && !out.contains("failed"), "{out}{err}");
    // qemu-img as a client too, with the same objects.
    let obj = client_creds(&t.creds);
    let opts = image_opts(&t.sock);
    let (code, out, err) = run("qemu-img", &["info", "--object", &obj, "--image-opts", &opts]);
    assert!(code == 0 && out.contains("16 MiB"), "{out}{err}");
    server.term();
    assert_eq!(run("qemu-io", &["-c", "read -P 0x5a 0 1M", s(&t.img)]).0, 0);
}

#[test]
fn oxcow_client_reads_and_writes_through_qemu_nbd_over_tls() {
    let t = setup();
    let server = qemu_nbd(&t.img, &t.sock, &["--object", &server_creds(&t.creds, true), "--tls-creds", "tls0"]);
    let url = nbds_url(&t.creds, &t.sock);
    let (code, out, err) =
        run(OXCOW, &["io", "-f", "raw", "-c", "write -P 0x33 64k 128k", "-c", "read -P 0x33 64k 128k", &url]);
    assert!(code == 0 && !out.contains("failed"), "{out}{err}");
    let (code, out, err) = run(OXCOW, &["info", "-f", "raw", &url]);
    assert!(code == 0 && out.contains("16 MiB"), "{out}{err}");
    let copy = t.dir.path().join("copy.raw");
    let (code, out, err) = run(OXCOW, &["convert", "-f", "raw", "-O", "raw", &url, s(&copy)]);
    assert_eq!(code, 0, "{out}{err}");
    let data = std::fs::read(&copy).unwrap();
    assert!(data[64 << 10..192 << 10].iter().all(|&b| b == 0x33) && data[..64 << 10].iter().all(|&b| b == 0));
    // QEMU's own way of naming it works as well.
    let obj = client_creds(&t.creds);
    let opts = image_opts(&t.sock);
    let (code, out, err) = run(OXCOW, &["io", "--object", &obj, "--image-opts", "-c", "read -P 0x33 64k 128k", &opts]);
    assert!(code == 0 && !out.contains("failed"), "{out}{err}");
    let (code, out, err) = run(OXCOW, &["map", "--output=json", "--object", &obj, "--image-opts", &opts]);
    assert!(code == 0 && out.contains("\"data\": true"), "{out}{err}");
    drop(server);
}

#[test]
fn qcow2_over_tls_as_a_backing_file_with_network_backing_allowed() {
    let t = setup();
    // The server exports the qcow2 file's bytes (-f raw), so the client
    // reads the format itself.
    run("qemu-io", &["-c", "write -P 0x44 0 64k", s(&t.img)]);
    let mut args = vec!["serve", "-t", "-f", "raw", "-x", "disk", "-k", s(&t.sock)];
    let obj = server_creds(&t.creds, true);
    args.extend_from_slice(&["--object", &obj, "--tls-creds", "tls0", s(&t.img)]);
    let server = Server::start(OXCOW, &args, &t.sock);
    let url = nbds_url(&t.creds, &t.sock);
    let top = t.dir.path().join("top.qcow2");
    let (code, out, err) = run(OXCOW, &["create", "-f", "qcow2", "-F", "qcow2", "-b", &url, s(&top)]);
    assert_eq!(code, 0, "{out}{err}");
    let out = Command::new(OXCOW)
        .args(["io", "-c", "read -P 0x44 0 64k", s(&top)])
        .env("OXCOW_ALLOW_NETWORK_BACKING", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !text.contains("failed"), "{text}{}", String::from_utf8_lossy(&out.stderr));
    drop(server);
}

#[test]
fn libnbd_reaches_oxcow_serve_with_certificates_and_plaintext_libnbd_is_refused() {
    if !crate::support::process::have("nbdinfo") {
        assert!(std::env::var_os("CI").is_none(), "nbdinfo (libnbd-bin) is missing under CI");
        eprintln!("skipped: nbdinfo (libnbd-bin) not installed");
        return;
    }
    let t = setup();
    run("qemu-io", &["-c", "write -P 0x61 0 1M", s(&t.img)]);
    let server = oxcow_serve(&t.img, &t.sock, &["--object", &server_creds(&t.creds, true), "--tls-creds", "tls0"]);
    let url = nbds_url(&t.creds, &t.sock);
    let (code, out, err) = run("nbdinfo", &["--json", &url]);
    assert!(code == 0 && out.contains("\"export-size\": 16777216"), "{out}{err}");
    assert!(out.contains("\"uri\""), "{out}");
    let (code, out, err) = run("nbdinfo", &["--map", &url]);
    assert!(code == 0 && out.contains("data"), "{out}{err}");
    let plain = format!("nbd+unix:///disk?socket={}", s(&t.sock));
    let (code, out, err) = run("nbdinfo", &[&plain]);
    assert_ne!(code, 0, "plaintext libnbd got in: {out}{err}");
    if crate::support::process::have("nbdcopy") {
        let copy = t.dir.path().join("copy.raw");
        std::fs::write(&copy, vec![0u8; 16 << 20]).unwrap();
        let (code, out, err) = run("nbdcopy", &[&url, s(&copy)]);
        assert_eq!(code, 0, "{out}{err}");
        let data = std::fs::read(&copy).unwrap();
        assert!(data[..1 << 20].iter().all(|&b| b == 0x61) && data[1 << 20..].iter().all(|&b| b == 0));
    }
    server.term();
}

#[test]
fn concurrent_requests_over_tls_keep_their_data() {
    let t = setup();
    let server = oxcow_serve(&t.img, &t.sock, &["--object", &server_creds(&t.creds, true), "--tls-creds", "tls0"]);
    let url = nbds_url(&t.creds, &t.sock);
    // 16 requests in flight from oxcow's client: many writer threads
    // sealing records on one session, one reader thread opening them.
    for (pattern, size) in [("0x55", "4k"), ("0x66", "64k")] {
        let (code, out, err) =
            run(OXCOW, &["bench", "-f", "raw", "-w", "-d", "16", "-s", size, "-c", "4096", "--pattern", pattern, &url]);
        assert_eq!(code, 0, "{out}{err}");
        let (code, out, err) = qemu_io_tls(&t.creds, &t.sock, &[&format!("read -P {pattern} 0 16M")]);
        assert!(code == 0 && !out.contains("fail"), "{out}{err}");
        let (code, out, err) = run(OXCOW, &["bench", "-f", "raw", "-d", "16", "-s", size, "-c", "4096", &url]);
        assert_eq!(code, 0, "{out}{err}");
    }
    server.term();
}
