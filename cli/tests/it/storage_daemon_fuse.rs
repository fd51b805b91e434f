//! `oxcow storage-daemon --export type=fuse`: the image as a regular file
//! on the host, driven by qemu-io and qemu-img on the mounted file (their
//! raw driver uses pwrite, fallocate and SEEK_DATA/SEEK_HOLE on it).

use super::storage_daemon_cli::{quit, Daemon};
use crate::support::{json, ok, run_in, tmp, OXCOW};
use std::path::Path;

/// Mounting needs /dev/fuse and the right to mount (root here; without
/// root, fusermount3).
fn fuse_usable() -> bool {
    let ok = Path::new("/dev/fuse").exists()
        && (std::fs::read_to_string("/proc/self/status")
            .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
            || std::process::Command::new("fusermount3").arg("-V").output().is_ok());
    if !ok {
        let why = "FUSE is not usable here (no /dev/fuse, or neither root nor fusermount3)";
        // .ci/run provides it: under CI its absence is a failure.
        assert!(std::env::var_os("CI").is_none(), "{why}");
        eprintln!("skipped: {why}");
    }
    ok
}

/// Detaches a mount a failed test's killed daemon left behind (declared
/// before the daemon, so it runs after the daemon's kill).
pub struct Unmount(pub String);

impl Drop for Unmount {
    fn drop(&mut self) {
        let mounted = std::fs::read_to_string("/proc/self/mounts").is_ok_and(|m| m.contains(&format!(" {} ", self.0)));
        if mounted {
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

fn fuse_args(export: &str) -> Vec<String> {
    ["--blockdev", "driver=file,node-name=f,filename=img.qcow2", "--blockdev", "driver=qcow2,node-name=q,file=f"]
        .iter()
        .map(|s| s.to_string())
        .chain(["--export".to_string(), export.to_string()])
        .collect()
}

#[test]
fn fuse_export_writes_punches_zeroes_seeks_and_grows() {
    if !fuse_usable() {
        return;
    }
    let t = tmp();
    let dir = t.path();
    ok(dir, "qemu-img", &["create", "-f", "qcow2", "img.qcow2", "8M"]);
    std::fs::write(dir.join("disk"), b"").unwrap();
    let mnt = dir.join("disk").display().to_string();
    let export = format!("type=fuse,id=e,node-name=q,mountpoint={mnt},writable=on,growable=on");
    let _unmount = Unmount(mnt.clone());
    let d = Daemon::start(dir, &[OXCOW, "storage-daemon"], &fuse_args(&export));
    assert_eq!(std::fs::metadata(&mnt).unwrap().len(), 8 << 20);
    let io = |cmds: &[&str]| {
        let mut a = vec!["-f", "raw"];
        for c in cmds {
            a.extend(["-c", c]);
        }
        a.push(&mnt);
        ok(dir, "qemu-io", &a);
    };
    // Punch hole (discard) and zero range (write -z) on the file.
    io(&["write -P 0x5a 1M 1M", "write -P 0x33 3M 64k", "discard 1M 512k", "write -z 3M 64k", "flush"]);
    io(&["read -P 0 1M 512k", "read -P 0x5a 1536k 512k", "read -P 0 3M 64k"]);
    // SEEK_DATA/SEEK_HOLE: only the half that was not punched is data.
    let map = json(&ok(dir, "qemu-img", &["map", "--output=json", "-f", "raw", &mnt]).stdout);
    let data: Vec<(u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(data, vec![(1536 << 10, 512 << 10)], "{map}");
    // Growable: a write past the end grows the image (qemu-io's raw
    // driver refuses to write past the size it saw, so pwrite directly).
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&mnt).unwrap();
        f.write_all_at(&[0x77u8; 64 << 10], 8 << 20).unwrap();
        f.sync_all().unwrap();
    }
    assert_eq!(std::fs::metadata(&mnt).unwrap().len(), (8 << 20) + (64 << 10));
    quit(dir, &d);
    assert_eq!(std::fs::metadata(&mnt).unwrap().len(), 0, "still mounted after quit");
    ok(dir, "qemu-img", &["check", "img.qcow2"]);
    ok(
        dir,
        "qemu-io",
        &["-c", "read -P 0x5a 1536k 512k", "-c", "read -P 0x77 8M 64k", "-c", "read -P 0 1M 512k", "img.qcow2"],
    );
    let info = json(&ok(dir, "qemu-img", &["info", "--output=json", "img.qcow2"]).stdout);
    assert_eq!(info["virtual-size"], (8u64 << 20) + (64 << 10));
}

#[test]
fn fuse_export_is_read_only_unless_writable() {
    if !fuse_usable() {
        return;
    }
    let t = tmp();
    let dir = t.path();
    ok(dir, "qemu-img", &["create", "-f", "qcow2", "img.qcow2", "1M"]);
    ok(dir, "qemu-io", &["-c", "write -P 0x21 0 1M", "img.qcow2"]);
    std::fs::write(dir.join("disk"), b"").unwrap();
    let mnt = dir.join("disk").display().to_string();
    let export = format!("type=fuse,id=e,node-name=q,mountpoint={mnt}");
    let _unmount = Unmount(mnt.clone());
    let d = Daemon::start(dir, &[OXCOW, "storage-daemon"], &fuse_args(&export));
    assert_eq!(std::fs::read(&mnt).unwrap(), vec![0x21u8; 1 << 20]);
    let w = run_in(dir, "qemu-io", &["-f", "raw", "-c", "write -P 0x33 0 4k", &mnt]);
    assert_ne!(w.code, 0, "write to a read-only FUSE export: {}", w.stdout);
    assert!(std::fs::OpenOptions::new().write(true).open(&mnt).is_err());
    quit(dir, &d);
    ok(dir, "qemu-io", &["-c", "read -P 0x21 0 1M", "img.qcow2"]);
}
