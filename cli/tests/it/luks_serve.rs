//! `serve --image-opts` exporting an encrypted image decrypted, as
//! `qemu-nbd --object secret,... --image-opts ...,encrypt.key-secret=ID`.

use crate::support::process::{run, s, wait_for_socket, wait_ready};
use std::process::{Command, Stdio};

const SECRET: &str = "secret,id=s0,data=correct horse";

#[test]
fn serve_exports_an_encrypted_qcow2_decrypted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("e.qcow2");
    let sock = dir.path().join("e.sock");
    let o = "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10";
    let (code, _, err) =
        run(env!("CARGO_BIN_EXE_oxcow"), &["create", "-q", "-f", "qcow2", "--object", SECRET, "-o", o, s(&img), "4M"]);
    assert_eq!(code, 0, "{err}");
    let opts = format!("driver=qcow2,file.filename={},encrypt.key-secret=s0", s(&img));
    let mut child = Command::new(env!("CARGO_BIN_EXE_oxcow"))
        .args(["serve", "-t", "--object", SECRET, "--image-opts", "-k", s(&sock), &opts])
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn");
    wait_for_socket(&sock, Some(&mut child), "oxcow serve");
    let url = format!("nbd+unix:///?socket={}", s(&sock));
    let (code, out, err) = run("qemu-io", &["-f", "raw", "-c", "write -P 0x3c 64k 8k", &url]);
    assert_eq!(code, 0, "{out}{err}");
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    wait_ready("server exit on SIGTERM", None, || child.try_wait().ok().flatten().is_some());
    let cmd = ["--object", SECRET, "--image-opts", &opts, "-c", "read -P 0x3c 64k 8k"];
    let (code, out, err) = run("qemu-io", &cmd);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains("verification failed"), "{out}");
    let bytes = std::fs::read(&img).expect("read");
    assert!(!bytes.windows(512).step_by(512).any(|w| w == [0x3cu8; 512]), "plaintext in the file");
}
