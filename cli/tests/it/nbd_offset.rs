//! `qemu-nbd -o OFFSET`: exporting a file from an offset on (a disk inside
//! an archive, as in QEMU's iotest 302), against QEMU's qemu-nbd.

use crate::dropin::{bare_sides, run, Side};
use crate::support::process::{s, wait_for_socket};
use std::process::{Command, Stdio};

/// A 1536-byte header, then 64 KiB of pattern, in `f.tar` on each side.
fn archive(side: &Side) {
    let mut data = vec![0xeeu8; 1536];
    data.extend((0..65536u32).map(|i| (i / 512) as u8));
    std::fs::write(side.dir.path().join("f.tar"), data).unwrap();
}

/// Serves `f.tar` from offset 1536 with `-t`, runs qemu-io commands on
/// it (QEMU's qemu-io for both sides, so only the server differs), then
/// stops the server and returns qemu-io's output and the file.
fn serve_and_io(side: &Side, cmds: &[&str]) -> (String, Vec<u8>) {
    let sock = side.dir.path().join("n.sock");
    let mut child = Command::new(side.bin.join("qemu-nbd"))
        .args(["-t", "-k", s(&sock), "-f", "raw", "--offset", "1536", "f.tar"])
        .current_dir(side.dir.path())
        .stdout(Stdio::null())
        .spawn()
        .expect("qemu-nbd");
    wait_for_socket(&sock, Some(&mut child), "qemu-nbd");
    let url = format!("nbd+unix:///?socket={}", s(&sock));
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(&url);
    let out = Command::new("qemu-io").args(&args).output().expect("qemu-io");
    let _ = child.kill();
    let _ = child.wait();
    let text =
        String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.contains(" ops; ")).collect::<Vec<_>>().join("\n");
    (text, std::fs::read(side.dir.path().join("f.tar")).unwrap())
}

#[test]
fn offset_export_reads_and_writes_past_the_offset_as_qemu_nbd() {
    let (ours, theirs) = bare_sides();
    archive(&ours);
    archive(&theirs);
    let cmds = ["length", "read -P 0 0 512", "read -P 127 65024 512", "write -P 0x5a 512 1k", "read -P 0x5a 512 1k"];
    let o = serve_and_io(&ours, &cmds);
    let t = serve_and_io(&theirs, &cmds);
    assert_eq!(o.0, t.0);
    assert!(o.0.contains("64 KiB"), "{}", o.0);
    assert!(o.1 == t.1, "the files differ after the same writes");
}

#[test]
fn offset_errors_in_qemu_nbds_words() {
    let (ours, theirs) = bare_sides();
    archive(&ours);
    archive(&theirs);
    // (At the very end of the file, both serve an empty export.)
    for off in ["12k", "-5", "67073", "99999999"] {
        let sock = |side: &Side| side.dir.path().join("x.sock").to_string_lossy().into_owned();
        let (os, ts) = (sock(&ours), sock(&theirs));
        let o = run(&ours, "qemu-nbd", &["-k", &os, "-f", "raw", "-o", off, "f.tar"], None);
        let t = run(&theirs, "qemu-nbd", &["-k", &ts, "-f", "raw", "-o", off, "f.tar"], None);
        assert_eq!((o.code, &o.stderr), (t.code, &t.stderr), "-o {off}");
    }
}
