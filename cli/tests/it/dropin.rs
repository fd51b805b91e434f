//! Drop-in names: oxcow started as `qemu-img`, `qemu-io` and `qemu-nbd`
//! (links made by `oxcow install-links`) against QEMU's own tools on the
//! same inputs. Each side gets its own copy of the images under the same
//! relative names, so messages that quote names compare byte for byte;
//! qemu-io's timing line is blanked as the iotests' filter blanks it.

use crate::support::process::{self, s};
use crate::support::{ok, tmp, OXCOW};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub(crate) struct Side {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) bin: PathBuf,
}

/// Two empty directories; `ours` holds the drop-in links in `bin`.
pub(crate) fn bare_sides() -> (Side, Side) {
    let ours = tmp();
    let links = ours.path().join("bin");
    ok(ours.path(), OXCOW, &["install-links", s(&links)]);
    (Side { dir: ours, bin: links }, Side { dir: tmp(), bin: PathBuf::from("/usr/bin") })
}

/// Two directories, each with `x.qcow2` (1 MiB, 64k clusters, one
/// written cluster) and `raw.img`; `bin` holds the programs to run.
pub(crate) fn sides() -> (Side, Side) {
    let (ours, theirs) = bare_sides();
    for d in [ours.dir.path(), theirs.dir.path()] {
        ok(d, "qemu-img", &["create", "-q", "-f", "qcow2", "x.qcow2", "1M"]);
        ok(d, "qemu-io", &["-f", "qcow2", "-c", "write -P 0x11 64k 64k", "x.qcow2"]);
        ok(d, "qemu-img", &["create", "-q", "-f", "raw", "raw.img", "64k"]);
    }
    (ours, theirs)
}

/// qemu-io's statistics line carries times and rates.
fn filter(s: &str) -> String {
    s.lines()
        .map(|l| match l.find(" ops; ") {
            Some(i) => format!("{} ops; XX", &l[..i]),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

pub(crate) struct Out {
    pub(crate) code: i32,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

pub(crate) fn run(side: &Side, tool: &str, args: &[&str], stdin: Option<&str>) -> Out {
    let mut cmd = Command::new(side.bin.join(tool));
    cmd.args(args).current_dir(side.dir.path());
    let (code, stdout, stderr) = match stdin {
        None => process::capture(cmd.stdin(Stdio::null())),
        Some(input) => {
            let f = side.dir.path().join("stdin.txt");
            std::fs::write(&f, input).expect("write stdin");
            process::capture(cmd.stdin(std::fs::File::open(&f).expect("open stdin")))
        }
    };
    // argv[0] is quoted whole in some messages: the programs' directories differ.
    let bin = format!("{}/", side.bin.display());
    Out { code, stdout: filter(&stdout).replace(&bin, "BIN/"), stderr: filter(&stderr).replace(&bin, "BIN/") }
}

#[derive(Clone, Copy)]
pub(crate) enum Cmp {
    /// stdout, stderr and exit status.
    All,
    /// stderr and exit status (stdout is a help text, ours in our words).
    NoStdout,
}

pub(crate) fn same(tool: &str, args: &[&str], stdin: Option<&str>, cmp: Cmp) {
    let (ours, theirs) = sides();
    same_on(&ours, &theirs, tool, args, stdin, cmp);
}

/// Runs `tool args` on both sides: exit status and stderr (and stdout
/// unless `cmp` says otherwise) must be QEMU's.
/// Runs `tool args` on both sides and compares them; returns ours.
pub(crate) fn same_on(ours: &Side, theirs: &Side, tool: &str, args: &[&str], stdin: Option<&str>, cmp: Cmp) -> Out {
    let o = run(ours, tool, args, stdin);
    let t = run(theirs, tool, args, stdin);
    let ctx = format!(
        "{tool} {args:?}\n--- qemu (status {}):\n{}\n{}\n--- oxcow (status {}):\n{}\n{}",
        t.code, t.stdout, t.stderr, o.code, o.stdout, o.stderr
    );
    assert_eq!(o.code, t.code, "exit status differs: {ctx}");
    assert_eq!(o.stderr, t.stderr, "stderr differs: {ctx}");
    if let Cmp::All = cmp {
        assert_eq!(o.stdout, t.stdout, "stdout differs: {ctx}");
    }
    o
}

fn io(args: &[&str]) {
    same("qemu-io", args, None, Cmp::All)
}

#[test]
fn qemu_io_reads_writes_and_pattern_checks() {
    io(&[
        "-f",
        "qcow2",
        "-c",
        "write -P 0xab 0 4k",
        "-c",
        "read -P 0xab 0 4k",
        "-c",
        "read -P 0xcd 0 4k",
        "-c",
        "read -q -P 0x11 64k 64k",
        "-c",
        "write -z 8k 4k",
        "-c",
        "read -v 4k 48",
        "x.qcow2",
    ]);
}

#[test]
fn qemu_io_options_after_the_file_and_repeated() {
    io(&["x.qcow2", "--cache", "writeback", "-t", "none", "--aio", "threads", "-f", "qcow2", "-c", "read 0 512"]);
}

#[test]
fn qemu_io_alloc_map_length_info() {
    io(&["-f", "qcow2", "-c", "alloc 0 64k", "-c", "alloc 64k 128k", "-c", "map", "-c", "length", "x.qcow2"]);
}

#[test]
fn qemu_io_command_errors() {
    io(&[
        "-f",
        "qcow2",
        "-c",
        "foo",
        "-c",
        "read 0",
        "-c",
        "read -z 0 1",
        "-c",
        "read 1M 512",
        "-c",
        "write -P 0x100 0 1",
        "-c",
        "read 0 1",
        "x.qcow2",
    ]);
}

#[test]
fn qemu_io_one_letter_command_names() {
    io(&[
        "-f",
        "qcow2",
        "-c",
        "w -P 3 0 512",
        "-c",
        "r -P 3 0 512",
        "-c",
        "r",
        "-c",
        "a 0",
        "-c",
        "l",
        "-c",
        "c 1",
        "x.qcow2",
    ]);
}

#[test]
fn qemu_io_sigraise_ends_the_run_by_the_signal() {
    io(&["-f", "qcow2", "-c", "sigraise x", "-c", "sigraise 99999", "x.qcow2"]);
    io(&["-f", "qcow2", "-c", "write -P 7 0 512", "-c", "sigraise 9", "-c", "read 0 512", "x.qcow2"]);
}

#[test]
fn qemu_io_read_only_refuses_writes() {
    io(&["-f", "qcow2", "-r", "-c", "write 0 512", "-c", "discard 0 64k", "-c", "read 0 512", "x.qcow2"]);
}

#[test]
fn qemu_io_open_close_and_no_file() {
    io(&["-c", "read 0 1", "-c", "open -o driver=qcow2 x.qcow2", "-c", "read 0 1", "-c", "close", "-c", "read 0 1"]);
}

#[test]
fn qemu_io_reopen_read_only_then_writable() {
    io(&["-f", "qcow2", "-c", "reopen -r", "-c", "write 0 512", "-c", "reopen -w", "-c", "write 0 512", "x.qcow2"]);
}

#[test]
fn qemu_io_vectored_and_aio() {
    io(&[
        "-f",
        "qcow2",
        "-c",
        "writev -P 5 0 512 1k",
        "-c",
        "readv -P 5 0 512 1k",
        "-c",
        "aio_write -P 6 4k 4k",
        "-c",
        "aio_flush",
        "-c",
        "aio_read -P 6 4k 4k",
        "-c",
        "aio_flush",
        "x.qcow2",
    ]);
}

#[test]
fn qemu_io_commands_from_a_pipe_with_prompts() {
    same("qemu-io", &["-f", "qcow2", "x.qcow2"], Some("read 0 512\nfoo\nwrite -P 1 0 512\n"), Cmp::All);
    same("qemu-io", &["-f", "qcow2", "x.qcow2"], Some("read 0 512\nquit\nread 0 512\n"), Cmp::All);
}

#[test]
fn qemu_io_open_failures() {
    io(&["-c", "read 0 1", "missing.qcow2"]);
    io(&["-f", "qcow2", "raw.img"]);
    same("qemu-io", &["--bogus", "x.qcow2"], None, Cmp::NoStdout);
    same("qemu-io", &["-z", "x.qcow2"], None, Cmp::NoStdout);
    same("qemu-io", &["-c"], None, Cmp::NoStdout);
}

#[test]
fn qemu_img_usage_errors() {
    same("qemu-img", &[], None, Cmp::All);
    same("qemu-img", &["frobnicate", "x.qcow2"], None, Cmp::All);
    same("qemu-img", &["info", "--foo", "x.qcow2"], None, Cmp::All);
    same("qemu-img", &["info", "-z", "x.qcow2"], None, Cmp::All);
    same("qemu-img", &["info"], None, Cmp::All);
}

#[test]
fn qemu_img_commands() {
    same("qemu-img", &["check", "x.qcow2"], None, Cmp::All);
    same("qemu-img", &["map", "--output=json", "x.qcow2"], None, Cmp::All);
    same("qemu-img", &["info", "missing.qcow2"], None, Cmp::All);
    same("qemu-img", &["create", "-f", "qcow2", "y.qcow2"], None, Cmp::All);
    same("qemu-img", &["compare", "x.qcow2", "x.qcow2"], None, Cmp::All);
    // Sizes differ and so does the common part: only the mismatch is told.
    same("qemu-img", &["compare", "x.qcow2", "raw.img"], None, Cmp::All);
    // The backing file is opened before its format is asked for.
    same("qemu-img", &["create", "-f", "qcow2", "-b", "missing.qcow2", "z.qcow2", "1M"], None, Cmp::All);
    same("qemu-img", &["create", "-f", "qcow2", "-b", "x.qcow2", "z.qcow2"], None, Cmp::All);
    same("qemu-img", &["create", "-f", "qcow2", "-u", "-b", "x.qcow2", "z.qcow2", "1M"], None, Cmp::All);
    // -B needs its format named.
    same("qemu-img", &["convert", "-O", "qcow2", "-B", "x.qcow2", "x.qcow2", "z.qcow2"], None, Cmp::All);
    // getopt lets options follow the first file name.
    same("qemu-img", &["convert", "x.qcow2", "-O", "raw", "y.raw"], None, Cmp::All);
}

#[test]
fn qemu_nbd_usage_errors() {
    same("qemu-nbd", &["--bogus", "x.qcow2"], None, Cmp::All);
    same("qemu-nbd", &["-z", "x.qcow2"], None, Cmp::All);
    same("qemu-nbd", &[], None, Cmp::All);
    same("qemu-nbd", &["x.qcow2", "raw.img"], None, Cmp::All);
    same("qemu-nbd", &["-c", "/dev/nbd-none", "x.qcow2"], None, Cmp::All);
}

#[test]
fn version_lines_have_the_tools_shape() {
    let (ours, _) = sides();
    for (tool, head) in [("qemu-img", "qemu-img version "), ("qemu-io", "qemu-io version "), ("qemu-nbd", "qemu-nbd ")]
    {
        let o = run(&ours, tool, &["--version"], None);
        assert_eq!(o.code, 0, "{tool} --version: {}", o.stderr);
        let first = o.stdout.lines().next().unwrap_or("");
        let rest = first.strip_prefix(head).unwrap_or_else(|| panic!("{tool}: {first}"));
        assert!(rest.starts_with("10."), "{tool}: {first}");
    }
}

#[test]
fn as_oxcow_messages_keep_oxcow_name() {
    let d = tmp();
    let r = crate::support::oxcow(d.path(), &["info", "missing.qcow2"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.starts_with("oxcow: Could not open 'missing.qcow2'"), "{}", r.stderr);
}

#[test]
fn install_links_is_idempotent_and_refuses_strangers() {
    let d = tmp();
    let bin = d.path().join("bin");
    ok(d.path(), OXCOW, &["install-links", s(&bin)]);
    ok(d.path(), OXCOW, &["install-links", s(&bin)]);
    std::fs::remove_file(bin.join("qemu-io")).expect("rm");
    std::fs::write(bin.join("qemu-io"), "#!/bin/sh\n").expect("write");
    let r = crate::support::oxcow(d.path(), &["install-links", s(&bin)]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("is not oxcow"), "{}", r.stderr);
    ok(d.path(), OXCOW, &["install-links", "--force", s(&bin)]);
    assert!(linked_here(&bin.join("qemu-io")));
}

fn linked_here(p: &Path) -> bool {
    let exe = Path::new(OXCOW).canonicalize().expect("exe");
    p.canonicalize().is_ok_and(|c| c == exe)
}

/// `qemu-nbd --fork` must start its child under the drop-in name too,
/// or the child would read qemu-nbd's command line as oxcow's.
#[test]
fn qemu_nbd_fork_serves_to_qemu_io() {
    let (ours, _) = sides();
    let sock = ours.dir.path().join("nbd.sock");
    let pid = ours.dir.path().join("nbd.pid");
    // The server keeps qemu-nbd's stderr (as QEMU's forked server does),
    // so it goes to a file: a pipe would stay open until the server ends.
    let log = ours.dir.path().join("nbd.log");
    let st = Command::new(ours.bin.join("qemu-nbd"))
        .args(["--fork", "--pid-file", s(&pid), "-k", s(&sock), "-f", "qcow2", "-r", "x.qcow2"])
        .current_dir(ours.dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .status()
        .expect("qemu-nbd");
    assert!(st.success(), "{}", std::fs::read_to_string(&log).unwrap_or_default());
    // Read before the client: the server leaves with its only client
    // (no -t) and takes its pid file with it.
    let server = std::fs::read_to_string(&pid).ok().and_then(|p| p.trim().parse::<i32>().ok());
    assert!(server.is_some(), "no pid file once --fork returned");
    let url = format!("nbd+unix:///?socket={}", s(&sock));
    let (code, out, err) = process::run("qemu-io", &["-r", "-f", "raw", "-c", "read -P 0x11 64k 64k", &url]);
    if code != 0 {
        if let Some(p) = server {
            let _ = Command::new("kill").arg(p.to_string()).status();
        }
    }
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("read 65536/65536 bytes at offset 65536"), "{out}");
}

/// Output into a pipe nobody reads ended in a panic and a backtrace; the
/// C tools end quietly there (SIGPIPE). The pipe's read end is closed
/// before the program starts, so its first write fails every time.
#[test]
fn info_into_a_closed_pipe_ends_quietly() {
    let (ours, _) = sides();
    let script = "import os, subprocess, sys\n\
                  r, w = os.pipe()\n\
                  os.close(r)\n\
                  p = subprocess.run(sys.argv[1:], stdout=w, stderr=subprocess.PIPE)\n\
                  sys.stdout.write('%d\\n%s' % (p.returncode, p.stderr.decode()))\n";
    for prog in [OXCOW.to_string(), ours.bin.join("qemu-img").display().to_string()] {
        let x = ours.dir.path().join("x.qcow2");
        let (code, out, err) = process::run("python3", &["-c", script, &prog, "info", s(&x)]);
        assert_eq!(code, 0, "{err}");
        let (status, stderr) = out.split_once('\n').unwrap_or((&out, ""));
        assert_eq!(status, "-13", "{prog}: not ended by SIGPIPE: {out}");
        assert_eq!(stderr, "", "{prog}");
    }
}

/// iotest 114: `open -o backing.driver=FMT` opens the backing file with
/// that format instead of the one the image names (here a wrong `raw`
/// for a qcow2 backing file), as qemu-io does; without it the backing
/// file reads as raw bytes and the pattern check fails on both sides.
#[test]
fn qemu_io_open_backing_driver_overrides_the_backing_format() {
    let (ours, theirs) = sides();
    for side in [&ours, &theirs] {
        let create = ["create", "-q", "-f", "qcow2", "-u", "-b", "x.qcow2", "-F", "raw", "top.qcow2", "1M"];
        ok(side.dir.path(), "qemu-img", &create);
    }
    for cmds in
        [["open -o backing.driver=qcow2 top.qcow2", "read -P 0x11 64k 64k"], ["open top.qcow2", "read -P 0x11 64k 64k"]]
    {
        let args = ["-c", cmds[0], "-c", cmds[1]];
        let (o, t) = (run(&ours, "qemu-io", &args, None), run(&theirs, "qemu-io", &args, None));
        assert_eq!((o.code, &o.stdout, &o.stderr), (t.code, &t.stdout, &t.stderr), "{cmds:?}");
        assert_eq!(
            o.stdout.contains("Pattern verification failed"),
            !cmds[0].contains("backing.driver"),
            "{}",
            o.stdout
        );
    }
}

/// blkdebug under the format, rules as a qemu-io option tree: an armed
/// `once` error fails one guest read, a set-state rule gates another
/// error to the second write.
#[test]
fn qemu_io_blkdebug_option_trees() {
    let tree = |rules: &str| {
        format!(
            r#"json:{{"driver":"qcow2","file":{{"driver":"blkdebug",{rules},"image":{{"driver":"file","filename":"x.qcow2"}}}}}}"#
        )
    };
    let once = tree(r#""inject-error":[{"event":"read_aio","once":true}]"#);
    io(&["-c", "read -P 0x11 64k 4k", "-c", "read -P 0x11 64k 4k", "-c", "read 0 4k", &once]);
    let gated = tree(
        r#""set-state":[{"event":"write_aio","new_state":2}],"inject-error":[{"event":"write_aio","state":2,"errno":28}]"#,
    );
    io(&["-c", "write 64k 4k", "-c", "write 64k 4k", "-c", "write 64k 4k", &gated]);
}

/// `blkdebug:CONFIG:FILE` names, with qemu-img compare's report of a
/// failed read (its own exit status, 4).
#[test]
fn qemu_img_compare_through_a_blkdebug_name() {
    let (ours, theirs) = sides();
    for d in [ours.dir.path(), theirs.dir.path()] {
        let conf = "[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\nonce =\"off\"\n";
        std::fs::write(d.join("b.conf"), conf).expect("write config");
        ok(d, "cp", &["x.qcow2", "y.qcow2"]);
    }
    for args in
        [&["compare", "blkdebug:b.conf:x.qcow2", "y.qcow2"][..], &["compare", "y.qcow2", "blkdebug:b.conf:x.qcow2"]]
    {
        let o = run(&ours, "qemu-img", args, None);
        let t = run(&theirs, "qemu-img", args, None);
        assert_eq!((o.code, &o.stdout, &o.stderr), (t.code, &t.stdout, &t.stderr), "{args:?}");
        assert_eq!(t.code, 4, "{args:?}: {}", t.stderr);
    }
}

/// Runs each command on both sides (same relative names), insisting on
/// the same status and words.
pub(crate) fn same_steps(ours: &Side, theirs: &Side, steps: &[(&str, &[&str])]) {
    for (tool, args) in steps {
        let o = run(ours, tool, args, None);
        let t = run(theirs, tool, args, None);
        assert_eq!(
            (o.code, &o.stdout, &o.stderr),
            (t.code, &t.stdout, &t.stderr),
            "{tool} {args:?}\n--- qemu: {}{}--- oxcow: {}{}",
            t.stdout,
            t.stderr,
            o.stdout,
            o.stderr
        );
    }
}
