//! Issue 21 on a real file system that runs out of space: a size-limited
//! tmpfs mounted for each test (skipped, with the reason printed, where
//! mounting is not permitted; lib/tests/enospc_serve.rs covers the same
//! ground on a fault storage everywhere).
//!
//! `OXCOW_LONG=1` runs the reservation test at the issue's own size (a
//! 1 GiB image with 40 MiB free) instead of a scaled-down one.

use crate::support::{self, ok, run_in};
use oxcow::nbd::client::NbdClient;
use oxcow::BlockDevice;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn long_mode() -> bool {
    std::env::var("OXCOW_LONG").is_ok_and(|v| v == "1")
}

/// A tmpfs of a given size, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(bytes: u64) -> Option<Tmpfs> {
        let dir = support::tmp();
        let size = format!("size={bytes}");
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", &size, "tmpfs"]).arg(dir.path()).output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs { dir }),
            Ok(o) => {
                eprintln!("skipped: cannot mount a tmpfs here ({})", String::from_utf8_lossy(&o.stderr).trim());
                None
            }
            Err(e) => {
                eprintln!("skipped: cannot run mount ({e})");
                None
            }
        }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    /// Bytes free for an unprivileged writer.
    fn free(&self) -> u64 {
        let r = ok(self.path(), "df", &["--output=avail", "-B1", "."]);
        r.stdout.lines().nth(1).and_then(|l| l.trim().parse().ok()).expect("df output")
    }
    /// Takes space with a filler file until `leave` bytes are free.
    fn fill_leaving(&self, leave: u64) -> PathBuf {
        let filler = self.file("filler");
        let take = self.free().saturating_sub(leave);
        ok(self.path(), "fallocate", &["-l", &take.to_string(), filler.to_str().unwrap()]);
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let done = Command::new("umount").arg(self.dir.path()).status().is_ok_and(|st| st.success());
        if !done {
            // Still busy (a failed test's server): detach it anyway.
            let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
        }
    }
}

/// A server process, killed if the test fails before stopping it.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A qemu-io or oxcow io run that must succeed and report no failure.
fn io_ok(dir: &Path, prog: &str, args: &[&str]) {
    let r = run_in(dir, prog, args);
    let text = format!("{}{}", r.stdout, r.stderr);
    assert!(r.code == 0 && !text.contains("failed"), "{prog} {args:?}: exit {}\n{text}", r.code);
}

/// Issue 21, item 2: reserving space ahead (file_end/16) must not make
/// ENOSPC where the write itself fits. The image file is nearly as large
/// as the disk, so the reservation ahead is larger than the space left;
/// qemu-io and `oxcow io` write 1 MiB, `qemu-img snapshot -c` and `oxcow
/// snapshot -c` take a snapshot, all with the same space, and all succeed.
#[test]
fn reservation_ahead_falls_back_when_it_does_not_fit() {
    // (virtual size, data already written, space left before the writes)
    let (disk, data, free) =
        if long_mode() { (1024 * MIB, 950 * MIB, 40 * MIB) } else { (128 * MIB, 120 * MIB, 5 * MIB) };
    // Room for the two images and what is left free.
    let Some(fs) = Tmpfs::mount(2 * data + free + 16 * MIB) else { return };
    let (a, b) = (fs.file("oxcow.qcow2"), fs.file("qemu.qcow2"));
    ok(fs.path(), "qemu-img", &["create", "-q", "-f", "qcow2", s(&a), &disk.to_string()]);
    io_ok(fs.path(), "qemu-io", &["-f", "qcow2", "-c", &format!("write -P 0x11 0 {data}"), s(&a)]);
    ok(fs.path(), "cp", &[s(&a), s(&b)]);
    fs.fill_leaving(free);
    let left = fs.free();
    let write = format!("write -P 0x22 {data} 1M");
    io_ok(fs.path(), "qemu-io", &["-f", "qcow2", "-c", &write, s(&b)]);
    // What the old reservation needed (file_end/16) does not fit any more.
    assert!(fs.free() < data / 16, "the test needs less free space ({} left)", fs.free());
    io_ok(fs.path(), support::OXCOW, &["io", "-f", "qcow2", "-c", &write, s(&a)]);
    ok(fs.path(), "qemu-img", &["snapshot", "-c", "s1", s(&b)]);
    ok(fs.path(), support::OXCOW, &["snapshot", "-c", "s1", s(&a)]);
    eprintln!("{} MiB free before the writes, {} KiB after", left / MIB, fs.free() >> 10);
    for img in [&a, &b] {
        ok(fs.path(), "qemu-img", &["check", "-f", "qcow2", s(img)]);
    }
    ok(fs.path(), "qemu-img", &["compare", "-f", "qcow2", "-F", "qcow2", s(&a), s(&b)]);
    ok(fs.path(), "qemu-io", &["-f", "qcow2", "-c", &format!("read -P 0x22 {data} 1M"), s(&a)]);
}

fn wait_for(path: &Path) {
    let start = Instant::now();
    while !path.exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "server did not create {path:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stop(child: &mut Child) -> std::process::ExitStatus {
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "server did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

const WRITERS: u64 = 16;
const BLOCKS: u64 = 32;
const BLOCK: u64 = 64 << 10;

fn pattern(w: u64, b: u64, round: u64) -> u8 {
    (1 + (w * 31 + b * 7 + round * 101) % 250) as u8
}

fn offset(w: u64, b: u64) -> u64 {
    (b * WRITERS + w) * BLOCK
}

/// Issue 21, item 1, as reported: `oxcow serve` with 16 writes in flight
/// on a nearly full file system. Every failure is ENOSPC; once space is
/// freed, flush and the failed writes succeed; and at exit every
/// acknowledged write is in the image, which QEMU finds clean.
#[test]
fn serve_on_a_full_tmpfs_reports_enospc_and_keeps_every_acknowledged_write() {
    let Some(fs) = Tmpfs::mount(64 * MIB) else { return };
    let img = fs.file("disk.qcow2");
    let sock = fs.file("nbd.sock");
    ok(fs.path(), "qemu-img", &["create", "-q", "-f", "qcow2", s(&img), &(WRITERS * BLOCKS * BLOCK).to_string()]);
    // 32 MiB of writes, 6 MiB of space.
    let filler = fs.fill_leaving(6 * MIB);
    let mut server = Server(
        Command::new(support::OXCOW)
            .args(["serve", "-t", "-e", "16", "-f", "qcow2", "-x", "disk", "-k", s(&sock), s(&img)])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(&sock);
    let url = format!("nbd+unix:///disk?socket={}", s(&sock));
    let clients: Vec<Arc<NbdClient>> =
        (0..WRITERS).map(|_| Arc::new(NbdClient::connect(&url).expect("connect"))).collect();
    let mut model: Vec<Vec<Option<u8>>> = std::thread::scope(|sc| {
        let hs: Vec<_> = clients
            .iter()
            .enumerate()
            .map(|(w, c)| {
                let w = w as u64;
                sc.spawn(move || {
                    (0..BLOCKS)
                        .map(|b| {
                            let p = pattern(w, b, 1);
                            match c.write_at(&vec![p; BLOCK as usize], offset(w, b)) {
                                Ok(()) => Some(p),
                                Err(e) => {
                                    assert_eq!(e.errno(), libc::ENOSPC, "writer {w} block {b}: {e}");
                                    None
                                }
                            }
                        })
                        .collect()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("writer panicked")).collect()
    });
    let failed = model.iter().flatten().filter(|p| p.is_none()).count();
    assert!(failed > 0, "the file system never ran out of space");
    if let Err(e) = clients[0].flush() {
        assert_eq!(e.errno(), libc::ENOSPC, "flush with the disk full: {e}");
    }
    eprintln!("{failed} of {} writes failed with ENOSPC", WRITERS * BLOCKS);

    // The admin frees space.
    std::fs::remove_file(&filler).unwrap();
    clients[0].flush().expect("flush once space is back");
    std::thread::scope(|sc| {
        for ((w, c), blocks) in clients.iter().enumerate().zip(model.iter_mut()) {
            let w = w as u64;
            sc.spawn(move || {
                for (b, slot) in blocks.iter_mut().enumerate() {
                    if slot.is_none() {
                        let p = pattern(w, b as u64, 2);
                        c.write_at(&vec![p; BLOCK as usize], offset(w, b as u64))
                            .unwrap_or_else(|e| panic!("rewrite {w}/{b} once space is back: {e}"));
                        *slot = Some(p);
                    }
                }
            });
        }
    });
    // No flush: the last writes are acknowledged but only in the cache.
    drop(clients);
    let st = stop(&mut server.0);
    assert!(st.success(), "oxcow serve exit status {st}");
    ok(fs.path(), "qemu-img", &["check", "-f", "qcow2", s(&img)]);
    let scratch = support::tmp();
    let raw = scratch.path().join("disk.raw");
    ok(fs.path(), "qemu-img", &["convert", "-f", "qcow2", "-O", "raw", s(&img), s(&raw)]);
    let bytes = std::fs::read(&raw).unwrap();
    for (w, blocks) in model.iter().enumerate() {
        for (b, p) in blocks.iter().enumerate() {
            let p = p.expect("every block written");
            let at = offset(w as u64, b as u64) as usize;
            assert!(bytes[at..at + BLOCK as usize].iter().all(|&x| x == p), "block {w}/{b} lost");
        }
    }
}
