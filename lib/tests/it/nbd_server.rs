//! The NBD server against QEMU's own clients (qemu-io, qemu-img) over TCP
//! and Unix sockets.

use crate::support::nbd::*;
use crate::support::process::{run_within, READY_LIMIT};
use oxcow::nbd::server::{DiscardMode, ExportConfig};
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn writable(name: &str) -> ExportConfig {
    ExportConfig::new(name).discard(DiscardMode::Unmap)
}

#[test]
fn qemu_io_over_tcp_writes_reads_zeroes_discards() {
    let dir = tempfile::tempdir().unwrap();
    let path = sparse_file(dir.path(), "disk.raw", 4 * MIB);
    let srv = start_tcp(raw_device(&path, false), writable("disk"), opts(true, 4));
    let uri = srv.uri("disk");
    qemu_io_ok(
        &uri,
        &[
            "write -P 0xab 0 64k",
            "read -P 0xab 0 64k",
            "write -P 0x11 64k 64k",
            "write -z 64k 64k",
            "read -P 0 64k 64k",
            "write -P 0x22 128k 64k",
            "discard 128k 64k",
            "flush",
            "write -P 0xcd 1M 4k",
            "read -P 0xcd 1M 4k",
            "write -P 0x5e 4190208 4096",
            "read -P 0x5e 4190208 4096",
        ],
    );
    // A second session sees what the first wrote.
    qemu_io_ok(&uri, &["read -P 0xab 0 64k", "read -P 0 64k 64k", "read -P 0xcd 1M 4k", "read -P 0 2M 1M"]);
    srv.stop().unwrap();
    assert!(read_file_at(&path, 0, 65536).iter().all(|&b| b == 0xab));
    assert!(read_file_at(&path, 65536, 65536).iter().all(|&b| b == 0));
    // Discard with --discard=unmap punched the range: it reads as zeros.
    assert!(read_file_at(&path, 131072, 65536).iter().all(|&b| b == 0));
    assert!(read_file_at(&path, MIB, 4096).iter().all(|&b| b == 0xcd));
    assert!(read_file_at(&path, 4 * MIB - 4096, 4096).iter().all(|&b| b == 0x5e));
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 * MIB);
}

#[test]
fn qemu_io_over_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = sparse_file(dir.path(), "disk.raw", 2 * MIB);
    let sock = dir.path().join("nbd.sock");
    let srv = start_unix(raw_device(&path, false), writable("u"), opts(true, 1), &sock);
    let uri = srv.uri("u");
    qemu_io_ok(&uri, &["write -P 0x3c 4k 60k", "read -P 0x3c 4k 60k", "read -P 0 0 4k", "flush"]);
    qemu_io_ok(&uri, &["read -P 0x3c 4k 60k"]);
    srv.stop().unwrap();
    assert!(read_file_at(&path, 4096, 61440).iter().all(|&b| b == 0x3c));
}

#[test]
fn default_export_name_is_served_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = sparse_file(dir.path(), "disk.raw", MIB);
    write_file_at(&path, 0, &[0x77; 4096]);
    let srv = start_tcp(raw_device(&path, false), ExportConfig::default(), opts(true, 1));
    qemu_io_ok(&srv.uri(""), &["read -P 0x77 0 4k"]);
}

/// Parses the objects of `qemu-img map --output=json` into
/// (start, length, data, zero).
fn parse_map(json: &str) -> Vec<(u64, u64, bool, bool)> {
    let num = |obj: &str, key: &str| -> u64 {
        let i = obj.find(&format!("\"{key}\": ")).unwrap_or_else(|| panic!("no {key} in {obj}")) + key.len() + 4;
        obj[i..].chars().take_while(|c| c.is_ascii_digit()).collect::<String>().parse().unwrap()
    };
    let flag = |obj: &str, key: &str| obj.contains(&format!("\"{key}\": true"));
    json.split('}')
        .filter(|o| o.contains("\"start\""))
        .map(|o| (num(o, "start"), num(o, "length"), flag(o, "data"), flag(o, "zero")))
        .collect()
}

#[test]
fn qemu_img_map_sees_holes_and_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = sparse_file(dir.path(), "sparse.raw", 8 * MIB);
    write_file_at(&path, 2 * MIB, &vec![0x42; MIB as usize]);
    let srv = start_tcp(raw_device(&path, true), named("m"), opts(true, 1));
    let out = qemu_img_ok(&["map", "--output=json", "-f", "raw", &srv.uri("m")]);
    let map = parse_map(&out);
    assert!(!map.is_empty(), "{out}");
    let total: u64 = map.iter().map(|e| e.1).sum();
    assert_eq!(total, 8 * MIB, "{out}");
    let at = |off: u64| *map.iter().find(|e| e.0 <= off && off < e.0 + e.1).unwrap();
    let hole = at(0);
    assert!(!hole.2 && hole.3, "start of the file should be a zero hole: {out}");
    let data = at(2 * MIB);
    assert!(data.2 && !data.3, "written range should be data: {out}");
    assert!(data.0 + data.1 <= 3 * MIB + 4096, "data extent too long: {out}");
    let tail = at(6 * MIB);
    assert!(!tail.2 && tail.3, "end of the file should be a zero hole: {out}");
}

#[test]
fn qemu_img_bench_then_data_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let path = sparse_file(dir.path(), "bench.raw", 16 * MIB);
    let srv = start_tcp(raw_device(&path, false), writable("b"), opts(true, 2));
    let uri = srv.uri("b");
    // 2000 writes of 4 KiB, 32 in flight.
    qemu_img_ok(&["bench", "-f", "raw", "-d", "32", "-c", "2000", "-w", "--pattern=0xa5", &uri]);
    // And as many parallel reads.
    qemu_img_ok(&["bench", "-f", "raw", "-d", "32", "-c", "2000", &uri]);
    qemu_io_ok(&uri, &["read -P 0xa5 0 8000k", "read -P 0 8000k 8000k"]);
    srv.stop().unwrap();
    assert!(read_file_at(&path, 0, 2000 * 4096).iter().all(|&b| b == 0xa5));
}

#[test]
fn qemu_img_convert_from_export_matches_source() {
    let dir = tempfile::tempdir().unwrap();
    let src = sparse_file(dir.path(), "src.raw", 12 * MIB + 512);
    let pattern: Vec<u8> = (0..MIB as usize * 3).map(|i| (i * 7 % 251) as u8).collect();
    write_file_at(&src, 0, &pattern[..100_000]);
    write_file_at(&src, 5 * MIB + 17, &pattern);
    write_file_at(&src, 12 * MIB, &[0xfe; 512]);
    let srv = start_tcp(raw_device(&src, true), named("c"), opts(true, 1));
    let out = dir.path().join("out.raw");
    qemu_img_ok(&["convert", "-f", "raw", "-O", "raw", &srv.uri("c"), out.to_str().unwrap()]);
    qemu_img_ok(&["compare", "-f", "raw", "-F", "raw", src.to_str().unwrap(), out.to_str().unwrap()]);
    // And the export compares equal to its own file.
    qemu_img_ok(&["compare", "-f", "raw", "-F", "raw", &srv.uri("c"), src.to_str().unwrap()]);
}

#[test]
fn read_only_export_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = sparse_file(dir.path(), "ro.raw", MIB);
    write_file_at(&path, 0, &[0x99; 8192]);
    let cfg = ExportConfig::new("ro").read_only(true);
    // The device itself is writable: the export's setting alone must hold.
    let srv = start_tcp(raw_device(&path, false), cfg, opts(true, 1));
    let uri = srv.uri("ro");
    qemu_io_ok(&uri, &["-r", "read -P 0x99 0 8k"]);
    // Opened read-write, qemu-io is refused at open (the export says
    // read-only); forced through, the write itself fails.
    let (ok, out) = qemu_io(&uri, &["write -P 0x01 0 4k"]);
    assert!(!ok, "write to a read-only export succeeded:\n{out}");
    let (ok, out) = qemu_io(&uri, &["-r", "write -P 0x01 0 4k"]);
    assert!(!ok, "write to a read-only export succeeded:\n{out}");
    srv.stop().unwrap();
    assert!(read_file_at(&path, 0, 8192).iter().all(|&b| b == 0x99));
}

#[test]
fn not_persistent_server_returns_after_the_client_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let path = sparse_file(dir.path(), "once.raw", MIB);
    let mut srv = start_tcp(raw_device(&path, false), named("o"), opts(false, 1));
    std::thread::sleep(Duration::from_millis(100));
    assert!(!srv.is_finished(), "server returned before any client came");
    qemu_io_ok(&srv.uri("o"), &["write -P 0x61 0 4k"]);
    srv.join(READY_LIMIT).unwrap();
    assert!(read_file_at(&path, 0, 4096).iter().all(|&b| b == 0x61));
}

#[test]
fn several_qemu_clients_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = sparse_file(dir.path(), "multi.raw", 8 * MIB);
    let cfg = writable("mc").multi_conn_ok(true);
    let srv = start_tcp(raw_device(&path, false), cfg, opts(true, 4));
    let uri = srv.uri("mc");
    let threads: Vec<_> = (0..4u8)
        .map(|i| {
            let uri = uri.clone();
            std::thread::spawn(move || {
                let off = u64::from(i) * 2 * MIB;
                let p = 0x10 + i;
                let w = format!("write -P {p:#x} {off} 1M");
                let r = format!("read -P {p:#x} {off} 1M");
                qemu_io_ok(&uri, &[&w, &r, "flush"]);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    srv.stop().unwrap();
    for i in 0..4u8 {
        assert!(read_file_at(&path, u64::from(i) * 2 * MIB, MIB as usize).iter().all(|&b| b == 0x10 + i));
    }
}

#[test]
fn qemu_nbd_lists_the_export() {
    let dir = tempfile::tempdir().unwrap();
    let path = sparse_file(dir.path(), "l.raw", 3 * MIB);
    let cfg = writable("lst").description("listed disk".into());
    let sock = dir.path().join("l.sock");
    let srv = start_unix(raw_device(&path, false), cfg, opts(true, 2), &sock);
    let out = run_within(
        std::process::Command::new("qemu-nbd").args(["-L", "-k", sock.to_str().unwrap()]),
        Duration::from_secs(30),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    for want in [
        "export: 'lst'",
        "description: listed disk",
        "size:  3145728",
        "min block: 1",
        "opt block: 4096",
        "max block: 33554432",
        "base:allocation",
        "qemu:allocation-depth",
    ] {
        assert!(text.contains(want), "no {want:?} in:\n{text}");
    }
    drop(srv);
}
