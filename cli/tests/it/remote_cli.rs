//! The CLI over network bases: `nbd://` names wherever a file name goes,
//! `io -C` (copy-on-read), `stream`, and network backing names followed
//! only when the user allows it.

use crate::support::process::{capture, s, wait_for_socket};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Runs with exactly the permission `env` gives, whatever the caller's
/// environment says.
fn run(cmd: &str, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    capture(Command::new(cmd).args(args).env_remove("OXCOW_ALLOW_NETWORK_BACKING").envs(env.iter().copied()))
}

fn ox(args: &[&str]) -> (i32, String, String) {
    run(env!("CARGO_BIN_EXE_oxcow"), args, &[])
}

struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu_nbd(base: &Path, sock: &Path) -> Server {
    let mut child = Command::new("qemu-nbd")
        .args(["-t", "-r", "-f", "raw", "-k", s(sock), s(base)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Persistent (-t), so the readiness probe does not end the server.
    wait_for_socket(sock, Some(&mut child), "qemu-nbd");
    Server(child)
}

#[test]
fn overlay_on_an_nbd_base_copy_on_read_and_stream() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.raw");
    run("qemu-img", &["create", "-q", "-f", "raw", s(&base), "8M"], &[]);
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x3c 0 3M", "-c", "write -P 0x3d 5M 1M", s(&base)], &[]);
    let sock = d.join("base.sock");
    let _srv = qemu_nbd(&base, &sock);
    let url = format!("nbd+unix:///?socket={}", s(&sock));

    // A network name typed by the user works like a file name.
    let (code, out, err) = ox(&["info", "--output=json", &url]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"virtual-size\": 8388608"), "{out}");
    let (code, _, err) = ox(&["compare", "-f", "raw", "-F", "raw", &url, s(&base)]);
    assert_eq!(code, 0, "{err}");

    let ov = d.join("ov.qcow2");
    let (code, _, err) = ox(&["create", "-q", "-f", "qcow2", "-b", &url, "-F", "raw", s(&ov)]);
    assert_eq!(code, 0, "{err}");
    // A network name inside an image needs the user's permission.
    let (code, _, err) = ox(&["map", s(&ov)]);
    assert_ne!(code, 0);
    assert!(err.contains("OXCOW_ALLOW_NETWORK_BACKING"), "{err}");
    let (code, _, err) =
        run(env!("CARGO_BIN_EXE_oxcow"), &["map", "--output=json", s(&ov)], &[("OXCOW_ALLOW_NETWORK_BACKING", "1")]);
    assert_eq!(code, 0, "{err}");

    // Copy-on-read: the data read is now local.
    let (code, out, err) = ox(&["io", "-C", "-c", "read -P 0x3c 0 1M", s(&ov)]);
    assert!(code == 0 && !out.contains("failed"), "{out}{err}");
    let (_, out, _) =
        run(env!("CARGO_BIN_EXE_oxcow"), &["map", "--output=json", s(&ov)], &[("OXCOW_ALLOW_NETWORK_BACKING", "1")]);
    assert!(out.contains("\"start\": 0, \"length\": 1048576, \"depth\": 0"), "{out}");

    // Stream the rest; the image becomes standalone.
    let (code, _, err) = ox(&["stream", s(&ov)]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(run("qemu-img", &["check", s(&ov)], &[]).0, 0);
    let (_, out, _) = run("qemu-img", &["info", s(&ov)], &[]);
    assert!(!out.contains("backing file"), "{out}");
    assert_eq!(run("qemu-img", &["compare", "-f", "qcow2", "-F", "raw", s(&ov), s(&base)], &[]).0, 0);
}
