//! libnbd's Python module (`import nbd`, Debian's python3-libnbd) against
//! `oxcow serve` over TLS: with client certificates and with pre-shared
//! keys it writes, reads back and gets block status; without TLS, or with
//! the wrong key, it is refused. This is how backup tools written in
//! Python (and libnbd's own examples) talk to an export.

use crate::support::process::{run, s};
use crate::tls_interop::{oxcow_serve, server_creds, setup};
use std::path::Path;
use std::process::Command;

/// A Python interpreter that has libnbd's module. CI installs it; a
/// developer machine without it skips, CI fails.
fn python_with_nbd() -> Option<&'static str> {
    let found = ["/usr/bin/python3", "python3"]
        .into_iter()
        .find(|py| Command::new(py).args(["-c", "import nbd"]).output().map(|o| o.status.success()).unwrap_or(false));
    if found.is_none() {
        assert!(std::env::var_os("CI").is_none(), "python3-libnbd is missing under CI");
        eprintln!("skipped: no python3 with libnbd's module (apt-get install python3-libnbd)");
    }
    found
}

/// The script: connect with the TLS settings in `setup` (Python code run
/// on a handle `h`), write a pattern, read it back, check the allocation
/// map, print OK.
fn script(sock: &Path, setup: &str) -> String {
    format!(
        r#"
import nbd, sys
h = nbd.NBD()
{setup}
h.set_export_name("disk")
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_unix("{sock}")
assert h.get_size() == 16 << 20, h.get_size()
h.pwrite(b"\x5a" * 65536, 1 << 20)
h.flush()
assert h.pread(65536, 1 << 20) == b"\x5a" * 65536
assert h.pread(4096, 0) == bytes(4096)
seen = []
def extent(meta, offset, entries, err):
    seen.extend(entries)
    return 0
h.block_status(2 << 20, 0, extent)
assert len(seen) >= 2 and seen[0] > 0, seen
h.shutdown()
print("OK")
"#,
        sock = s(sock)
    )
}

fn run_python(py: &str, code: &str) -> (bool, String) {
    let out = Command::new(py).args(["-c", code]).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success() && text.contains("OK"), text)
}

#[test]
fn libnbd_python_reaches_oxcow_serve_with_certificates_and_without_tls_is_refused() {
    let Some(py) = python_with_nbd() else { return };
    let t = setup();
    let server = oxcow_serve(&t.img, &t.sock, &["--object", &server_creds(&t.creds, true), "--tls-creds", "tls0"]);
    let tls = format!("h.set_tls(nbd.TLS_REQUIRE)\nh.set_tls_certificates(\"{}\")", s(&t.creds));
    let (good, text) = run_python(py, &script(&t.sock, &tls));
    assert!(good, "{text}");
    let (good, text) = run_python(py, &script(&t.sock, "h.set_tls(nbd.TLS_DISABLE)"));
    assert!(!good, "plaintext libnbd got in: {text}");
    server.term();
    let (code, out, err) = run("qemu-io", &["-c", "read -P 0x5a 1M 64k", s(&t.img)]);
    assert!(code == 0 && !out.contains("fail"), "{out}{err}");
}

#[test]
fn libnbd_python_reaches_oxcow_serve_with_psk_and_a_wrong_key_is_refused() {
    let Some(py) = python_with_nbd() else { return };
    let t = setup();
    let keys = t.dir.path().join("psk");
    std::fs::create_dir(&keys).unwrap();
    std::fs::write(keys.join("keys.psk"), "alice:0123456789abcdef0123456789abcdef\n").unwrap();
    let obj = format!("tls-creds-psk,id=tls0,dir={},endpoint=server", s(&keys));
    let server = oxcow_serve(&t.img, &t.sock, &["--object", &obj, "--tls-creds", "tls0"]);
    let with_key = |key: &str| {
        let file = t.dir.path().join(format!("client-{key}.psk"));
        std::fs::write(&file, format!("alice:{key}\n")).unwrap();
        format!("h.set_tls(nbd.TLS_REQUIRE)\nh.set_tls_username(\"alice\")\nh.set_tls_psk_file(\"{}\")", s(&file))
    };
    let (good, text) = run_python(py, &script(&t.sock, &with_key("0123456789abcdef0123456789abcdef")));
    assert!(good, "{text}");
    let (good, text) = run_python(py, &script(&t.sock, &with_key("ffffffffffffffffffffffffffffffff")));
    assert!(!good, "a wrong key got in: {text}");
    server.term();
}
