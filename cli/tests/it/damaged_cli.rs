//! Damaged images at the command line, next to qemu-img on the same
//! files: backing chains that loop, snapshot table entries that lie.

use crate::support::*;
use std::path::Path;

/// The message without the tool's name in front.
fn message(stderr: &str) -> String {
    stderr.trim_end().split_once(": ").map(|(_, m)| m.to_string()).unwrap_or_default()
}

fn make_loop(dir: &Path) {
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "x.qcow2", "1M"]);
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "x.qcow2", "y.qcow2"]);
    ok(dir, "qemu-img", &["rebase", "-u", "-F", "qcow2", "-b", "y.qcow2", "x.qcow2"]);
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "self.qcow2", "1M"]);
    ok(dir, "qemu-img", &["rebase", "-u", "-F", "qcow2", "-b", "self.qcow2", "self.qcow2"]);
}

#[test]
fn info_backing_chain_names_the_loop_as_qemu_img_does() {
    let d = tmp();
    make_loop(d.path());
    std::fs::create_dir(d.path().join("sub")).unwrap();
    for (cwd, file) in [(d.path().to_path_buf(), "y.qcow2"), (d.path().join("sub"), "../y.qcow2")] {
        for f in [file.to_string(), file.replace("y.qcow2", "self.qcow2")] {
            let q = qemu_img(&cwd, &["info", "--backing-chain", &f]);
            let o = oxcow(&cwd, &["info", "--backing-chain", &f]);
            assert_eq!(q.code, 1, "qemu-img: {}", q.stderr);
            assert_eq!(o.code, 1, "oxcow: {}", o.stderr);
            assert!(o.stdout.is_empty(), "{}", o.stdout);
            assert_eq!(message(&o.stderr), message(&q.stderr), "{f} from {cwd:?}");
        }
    }
}

#[test]
fn every_command_that_follows_the_chain_refuses_a_loop() {
    let d = tmp();
    make_loop(d.path());
    let dir = d.path();
    let cmds: Vec<Vec<&str>> = vec![
        vec!["map", "y.qcow2"],
        vec!["map", "--output=json", "self.qcow2"],
        vec!["compare", "y.qcow2", "x.qcow2"],
        vec!["convert", "-O", "raw", "y.qcow2", "out.raw"],
        vec!["io", "-c", "read 0 512", "y.qcow2"],
        vec!["commit", "y.qcow2"],
        vec!["rebase", "-F", "qcow2", "-b", "x.qcow2", "self.qcow2"],
        vec!["create", "-f", "qcow2", "-F", "qcow2", "-b", "self.qcow2", "new.qcow2"],
        vec!["measure", "-O", "qcow2", "y.qcow2"],
    ];
    for args in cmds {
        let o = oxcow(dir, &args);
        assert_ne!(o.code, 0, "{args:?} succeeded");
        assert!(o.stderr.contains("creates an infinite loop."), "{args:?}: {}", o.stderr);
        assert!(!o.stderr.contains("panicked"), "{args:?}: {}", o.stderr);
    }
    // An unsafe rebase is how the user mends it.
    ok(dir, OXCOW, &["rebase", "-u", "-b", "", "x.qcow2"]);
    ok(dir, OXCOW, &["info", "--backing-chain", "y.qcow2"]);
}

/// An image whose snapshot "s1" records `disk_size`.
fn snapshot_with_disk_size(dir: &Path, name: &str, disk_size: u64) -> Vec<u8> {
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", name, "64M"]);
    ok(dir, "qemu-io", &["-f", "qcow2", "-c", "write -P 0x11 0 64k", name]);
    ok(dir, "qemu-img", &["snapshot", "-c", "s1", name]);
    let p = dir.join(name);
    let mut b = std::fs::read(&p).unwrap();
    let table = u64::from_be_bytes(b[64..72].try_into().unwrap()) as usize;
    // Extra data starts 40 bytes into the entry; the disk size is its
    // second field.
    b[table + 48..table + 56].copy_from_slice(&disk_size.to_be_bytes());
    std::fs::write(&p, &b).unwrap();
    b
}

#[test]
fn snapshot_apply_refuses_disk_sizes_qemu_img_refuses_and_changes_nothing() {
    let d = tmp();
    let dir = d.path();
    for size in [(2u64 << 50) + 512, 0x1a00_0000_0080_0000, (64 << 20) + 256] {
        let bytes = snapshot_with_disk_size(dir, "o.qcow2", size);
        snapshot_with_disk_size(dir, "q.qcow2", size);
        let o = oxcow(dir, &["snapshot", "-a", "s1", "o.qcow2"]);
        let q = qemu_img(dir, &["snapshot", "-a", "s1", "q.qcow2"]);
        assert_eq!(q.code, 1, "qemu-img applied {size:#x}");
        assert_eq!(o.code, 1, "{size:#x}: {}{}", o.stdout, o.stderr);
        assert!(o.stderr.starts_with("oxcow: Could not apply snapshot 's1': "), "{}", o.stderr);
        assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
        assert_eq!(std::fs::read(dir.join("o.qcow2")).unwrap(), bytes, "{size:#x}: the image changed");
        // Views of it are refused alike, at once.
        let v = oxcow(dir, &["io", "-l", "s1", "-c", "map", "o.qcow2"]);
        assert_eq!(v.code, 1, "{size:#x}: {}", v.stdout);
        assert!(v.stderr.contains("Failed to load snapshot 's1'"), "{}", v.stderr);
        let c = oxcow(dir, &["convert", "-l", "snapshot.name=s1", "-O", "raw", "o.qcow2", "out.raw"]);
        assert_eq!(c.code, 1, "{size:#x}: {}", c.stdout);
        assert!(c.stderr.contains("Failed to load snapshot"), "{}", c.stderr);
    }
}

#[test]
fn snapshot_view_of_a_2_pib_disk_maps_past_its_l1_table_at_once() {
    let d = tmp();
    let dir = d.path();
    snapshot_with_disk_size(dir, "big.qcow2", 2 << 50);
    let v = ok(dir, OXCOW, &["io", "-l", "s1", "-c", "map", "big.qcow2"]);
    let lines: Vec<&str> = v.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", v.stdout);
    assert!(lines[0].starts_with("64 KiB (0x10000) bytes     allocated at offset 0 bytes"), "{}", v.stdout);
    assert!(lines[1].contains("not allocated at offset 64 KiB (0x10000)"), "{}", v.stdout);
    ok(dir, OXCOW, &["io", "-l", "s1", "-c", "read -P 0x11 0 64k", "big.qcow2"]);
}
