//! Image locking against QEMU's own tools: whoever holds an image, the
//! other side sees the same lock bytes and refuses (or coexists) the way
//! qemu-img would, with qemu-img's words.

use crate::support::process::READY_LIMIT;
use crate::support::{ok, run};
use oxcow::storage::lock::others_locks;
use oxcow::storage::{LockMode, Perms};
use oxcow::{Error, OpenOptions};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn new_qcow2(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&p), "4M"]);
    ok("qemu-io", &["-c", "write -P 0x5a 0 64k", s(&p)]);
    p
}

/// The lock bytes everybody but this caller's fresh descriptor holds.
fn locks_on(p: &Path) -> LockMode {
    others_locks(&File::open(p).unwrap()).unwrap()
}

const NO_LOCKS: LockMode = LockMode { held: Perms::NONE, unshared: Perms::NONE };

/// A QEMU tool holding an image until dropped.
struct Holder(Child);

impl Holder {
    /// Starts `cmd` and waits until the image carries `expect`'s locks.
    fn start(cmd: &mut Command, image: &Path, expect: LockMode) -> Holder {
        let mut h = Holder(cmd.stdin(Stdio::piped()).stdout(Stdio::null()).spawn().expect("spawn QEMU tool"));
        h.wait_for_locks(image, expect);
        h
    }

    /// Waits until `file` carries `expect`'s locks (QEMU takes them one
    /// file at a time: the image, then its data file).
    fn wait_for_locks(&mut self, file: &Path, expect: LockMode) {
        let deadline = Instant::now() + READY_LIMIT;
        loop {
            if locks_on(file) == expect {
                return;
            }
            if let Ok(Some(st)) = self.0.try_wait() {
                panic!("QEMU tool exited early: {st}");
            }
            assert!(Instant::now() < deadline, "QEMU tool never took its locks: {:?}", locks_on(file));
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `qemu-nbd` serving the image writable on a socket.
    fn qemu_nbd(image: &Path) -> Holder {
        let sock = image.with_extension("sock");
        Holder::start(
            Command::new("qemu-nbd").args(["-f", "qcow2", "-k", s(&sock), s(image)]),
            image,
            LockMode::writer(),
        )
    }

    /// Interactive `qemu-io` with extra flags, waiting on its standard input.
    fn qemu_io(flags: &[&str], image: &Path, expect: LockMode) -> Holder {
        Holder::start(Command::new("qemu-io").args(["-f", "qcow2"]).args(flags).arg(image), image, expect)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.0.stdin.take() {
            let _ = stdin.write_all(b"quit\n");
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn locked_message(e: Error) -> String {
    match e {
        Error::Locked(m) => m,
        other => panic!("expected a lock conflict, got {other}"),
    }
}

fn open_err(p: &Path, opts: &OpenOptions) -> String {
    locked_message(oxcow::open(p, opts).expect_err("open must be refused"))
}

fn force_share() -> OpenOptions {
    OpenOptions::read_only().force_share(true)
}

fn want(p: &Path, shared: bool, prefix: &str) -> String {
    let what = if shared { "shared \"write\"" } else { "\"write\"" };
    format!("{prefix}Failed to get {what} lock\nIs another process using the image [{}]?", p.display())
}

/// qemu-img's stderr for a refused command must be ours, word for word.
fn assert_qemu_refuses(tool: &str, args: &[&str], message: &str) {
    let (code, out, err) = run(tool, args);
    assert_ne!(code, 0, "{tool} {args:?} should be refused: {out}");
    assert!(err.contains(message), "{tool} {args:?} said {err:?}, we say {message:?}");
}

#[test]
fn a_qemu_writer_keeps_oxcow_out_unless_it_shares() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_qcow2(dir.path(), "a.qcow2");
    let before = std::fs::read(&p).unwrap();
    let _nbd = Holder::qemu_nbd(&p);

    let rw = open_err(&p, &OpenOptions::read_write());
    assert_eq!(rw, want(&p, false, ""));
    let (_, _, err) = run("qemu-io", &["-c", "read 0 512", s(&p)]);
    assert_eq!(err, format!("qemu-io: can't open device {}: {rw}\n", p.display()));
    // qemu-img refuses a read-only open the same way, and says the same.
    let ro = open_err(&p, &OpenOptions::read_only());
    assert_eq!(ro, want(&p, true, ""));
    let (_, _, err) = run("qemu-img", &["info", s(&p)]);
    assert_eq!(err, format!("qemu-img: Could not open '{}': {ro}\n", p.display()));

    // A refused open leaves no lock behind and wrote nothing.
    assert_eq!(locks_on(&p), LockMode::writer());
    assert_eq!(std::fs::read(&p).unwrap(), before);

    // -U reads regardless, as qemu-img -U does.
    let img = oxcow::open(&p, &force_share()).unwrap();
    let mut buf = vec![0u8; 4096];
    img.device().read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
    let rw_shared = OpenOptions::read_write().force_share(true);
    assert!(matches!(oxcow::open(&p, &rw_shared), Err(Error::InvalidArgument(_))));
}

#[test]
fn an_oxcow_writer_keeps_qemu_out_unless_it_shares() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_qcow2(dir.path(), "a.qcow2");
    let img = oxcow::open(&p, &OpenOptions::read_write()).unwrap();
    assert_eq!(locks_on(&p), LockMode::writer(), "the same bytes qemu-nbd takes");

    assert_qemu_refuses("qemu-img", &["info", s(&p)], &want(&p, true, ""));
    assert_qemu_refuses("qemu-img", &["check", s(&p)], &want(&p, true, ""));
    assert_qemu_refuses("qemu-io", &["-c", "write 0 512", s(&p)], &want(&p, false, ""));
    assert_qemu_refuses("qemu-io", &["-r", "-c", "read 0 512", s(&p)], &want(&p, true, ""));
    // QEMU writes nothing when refused: our writer's data are intact.
    img.device().write_at(&[7u8; 512], 0).unwrap();
    img.device().flush().unwrap();
    assert!(ok("qemu-img", &["info", "-U", s(&p)]).contains("file format: qcow2"));
    ok("qemu-io", &["-r", "-U", "-c", "read -P 7 0 512", s(&p)]);

    img.close().unwrap();
    drop(img);
    assert_eq!(locks_on(&p), NO_LOCKS, "closing releases everything");
    ok("qemu-img", &["info", s(&p)]);
}

#[test]
fn readers_coexist_across_tools_but_keep_writers_out() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_qcow2(dir.path(), "a.qcow2");
    {
        let qemu_reader = Holder::qemu_io(&["-r"], &p, LockMode::reader());
        let img = oxcow::open(&p, &OpenOptions::read_only()).unwrap();
        assert_eq!(open_err(&p, &OpenOptions::read_write()), want(&p, false, ""));
        drop(img);
        drop(qemu_reader);
    }
    let img = oxcow::open(&p, &OpenOptions::read_only()).unwrap();
    assert_eq!(locks_on(&p), LockMode::reader(), "the same bytes qemu-img info takes");
    ok("qemu-img", &["info", s(&p)]);
    ok("qemu-io", &["-r", "-c", "read -P 0x5a 0 64k", s(&p)]);
    assert_qemu_refuses("qemu-io", &["-c", "write 0 512", s(&p)], &want(&p, false, ""));
    drop(img);
    // A qemu -U reader takes only "consistent read", which refuses nobody.
    let _shared = Holder::qemu_io(&["-r", "-U"], &p, LockMode::force_share());
    oxcow::open(&p, &OpenOptions::read_write()).unwrap();
}

#[test]
fn oxcow_users_refuse_each_other_like_qemu_users() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_qcow2(dir.path(), "a.qcow2");
    {
        let _w = oxcow::open(&p, &OpenOptions::read_write()).unwrap();
        assert_eq!(open_err(&p, &OpenOptions::read_write()), want(&p, false, ""));
        assert_eq!(open_err(&p, &OpenOptions::read_only()), want(&p, true, ""));
        let _u = oxcow::open(&p, &force_share()).unwrap();
    }
    {
        let _r1 = oxcow::open(&p, &OpenOptions::read_only()).unwrap();
        let _r2 = oxcow::open(&p, &OpenOptions::read_only()).unwrap();
        assert_eq!(open_err(&p, &OpenOptions::read_write()), want(&p, false, ""));
    }
    {
        let _u = oxcow::open(&p, &force_share()).unwrap();
        assert_eq!(locks_on(&p), LockMode::force_share());
        let _w = oxcow::open(&p, &OpenOptions::read_write()).unwrap();
    }
    assert_eq!(locks_on(&p), NO_LOCKS);
}

#[test]
fn locking_off_takes_nothing_and_checks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_qcow2(dir.path(), "a.qcow2");
    let off = OpenOptions::read_write().locking(false);
    {
        let _img = oxcow::open(&p, &off).unwrap();
        assert_eq!(locks_on(&p), NO_LOCKS);
        ok("qemu-img", &["info", s(&p)]);
    }
    // Like QEMU's locking=off, it does not even look (the user's risk).
    let _nbd = Holder::qemu_nbd(&p);
    let ro_off = OpenOptions::read_only().locking(false);
    oxcow::open(&p, &ro_off).unwrap();
}

#[test]
fn backing_files_are_held_as_readers() {
    let dir = tempfile::tempdir().unwrap();
    let base = new_qcow2(dir.path(), "base.qcow2");
    let top = dir.path().join("top.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", s(&base), "-F", "qcow2", s(&top)]);
    {
        let img = oxcow::open(&top, &OpenOptions::read_write()).unwrap();
        assert_eq!(locks_on(&top), LockMode::writer());
        assert_eq!(locks_on(&base), LockMode::reader());
        ok("qemu-img", &["info", s(&base)]);
        assert_qemu_refuses("qemu-io", &["-c", "write 0 512", s(&base)], &want(&base, false, ""));
        drop(img);
    }
    {
        let _u = oxcow::open(&top, &force_share()).unwrap();
        assert_eq!(locks_on(&base), LockMode::force_share());
    }
    // A QEMU writer on the backing file stops us opening the overlay,
    // with qemu-img's message.
    let _nbd = Holder::qemu_nbd(&base);
    let e = open_err(&top, &OpenOptions::read_only());
    assert_eq!(e, want(&base, true, "Could not open backing file: "));
    let out = dir.path().join("out.raw");
    let (_, _, err) = run("qemu-img", &["convert", "-O", "raw", s(&top), s(&out)]);
    assert_eq!(err, format!("qemu-img: Could not open '{}': {e}\n", top.display()));
    oxcow::open(&top, &force_share()).unwrap();
    assert_eq!(locks_on(&top), NO_LOCKS, "a refused open leaves the overlay unlocked");
}

#[test]
fn external_data_files_are_locked_as_qemu_does() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.qcow2");
    let d = dir.path().join("x.data");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-o", &format!("data_file={}", s(&d)), s(&p), "4M"]);
    {
        let _w = oxcow::open(&p, &OpenOptions::read_write()).unwrap();
        assert_eq!(locks_on(&d), LockMode::data_file(true));
    }
    {
        let _r = oxcow::open(&p, &OpenOptions::read_only()).unwrap();
        assert_eq!(locks_on(&d), LockMode::data_file(false));
    }
    // Cross-check the bytes against QEMU holding the same image.
    let mut q = Holder::qemu_io(&[], &p, LockMode::writer());
    q.wait_for_locks(&d, LockMode::data_file(true));
}

#[test]
fn create_refuses_a_file_in_use_without_touching_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_qcow2(dir.path(), "a.qcow2");
    let before = std::fs::read(&p).unwrap();
    let _nbd = Holder::qemu_nbd(&p);
    let e = locked_message(oxcow::create_file(&p).expect_err("create must be refused"));
    assert_eq!(e, want(&p, false, ""));
    let (_, _, err) = run("qemu-img", &["create", "-q", "-f", "qcow2", s(&p), "4M"]);
    assert_eq!(err, format!("qemu-img: {}: {e}\n", p.display()));
    assert_eq!(std::fs::read(&p).unwrap(), before);
}

#[test]
fn raw_images_are_locked_as_qemu_locks_them() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r.raw");
    std::fs::write(&p, vec![0x3cu8; 1 << 20]).unwrap();
    // QEMU's raw readers refuse nobody, and neither do ours.
    {
        let _r = oxcow::open(&p, &OpenOptions::read_only()).unwrap();
        assert_eq!(locks_on(&p), LockMode::raw_reader());
        ok("qemu-io", &["-f", "raw", "-c", "write -P 1 0 512", s(&p)]);
    }
    // Our raw writer does not share writing, unlike qemu-io's, but leaves
    // QEMU's readers alone.
    {
        let w = oxcow::open(&p, &OpenOptions::read_write()).unwrap();
        assert_eq!(locks_on(&p), LockMode::writer());
        ok("qemu-img", &["info", "-f", "raw", s(&p)]);
        assert_qemu_refuses("qemu-io", &["-f", "raw", "-c", "write 0 512", s(&p)], &want(&p, false, ""));
        drop(w);
    }
    // qemu-nbd writing a raw image shares writes but not resizing; a
    // reader may look, our writer may not.
    let sock = p.with_extension("sock");
    let held = LockMode { held: Perms::CONSISTENT_READ | Perms::WRITE, unshared: Perms::RESIZE };
    let _nbd = Holder::start(Command::new("qemu-nbd").args(["-f", "raw", "-k", s(&sock), s(&p)]), &p, held);
    oxcow::open(&p, &OpenOptions::read_only()).unwrap();
    let e = open_err(&p, &OpenOptions::read_write());
    assert!(e.starts_with("Failed to get \"resize\" lock\n"), "{e}");
}
