//! Helpers shared by the CLI's integration tests: running oxcow and QEMU's
//! tools in a directory, comparing their JSON. Process running and the
//! random generator are the library tests' own files.

// Shared files: not every helper in them serves both crates.
#[allow(dead_code)]
#[path = "../../../../lib/tests/it/support/garage.rs"]
pub mod garage;
#[allow(dead_code)]
#[path = "../../../../lib/tests/it/support/http_server.rs"]
pub mod http_server;
#[allow(dead_code)]
#[path = "../../../../lib/tests/it/support/process.rs"]
pub mod process;
#[allow(dead_code)]
#[path = "../../../../lib/tests/it/support/rng.rs"]
pub mod rng;
#[allow(dead_code)]
#[path = "../../../../lib/tests/it/support/s3_server.rs"]
pub mod s3_server;

pub mod certs;
pub mod nginx;

pub use rng::Rng;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

pub const OXCOW: &str = env!("CARGO_BIN_EXE_oxcow");

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `prog` with `dir` as its working directory (the test process's
/// own stays untouched: tests run in parallel in one process).
pub fn run_in(dir: &Path, prog: &str, args: &[&str]) -> Run {
    let (code, stdout, stderr) = process::capture(Command::new(prog).args(args).current_dir(dir));
    Run { code, stdout, stderr }
}

/// Runs and insists on exit status 0.
pub fn ok(dir: &Path, prog: &str, args: &[&str]) -> Run {
    let r = run_in(dir, prog, args);
    assert_eq!(r.code, 0, "{prog} {args:?} failed:\nstdout: {}\nstderr: {}", r.stdout, r.stderr);
    r
}

pub fn oxcow(dir: &Path, args: &[&str]) -> Run {
    run_in(dir, OXCOW, args)
}

pub fn qemu_img(dir: &Path, args: &[&str]) -> Run {
    run_in(dir, "qemu-img", args)
}

/// Runs qemu-io / oxcow io with one `-c` per command.
pub fn io_args<'a>(pre: &[&'a str], cmds: &'a [String], file: &'a str) -> Vec<&'a str> {
    let mut v: Vec<&str> = pre.to_vec();
    for c in cmds {
        v.push("-c");
        v.push(c);
    }
    v.push(file);
    v
}

/// Drops qemu-io's timing lines (" ops; "), which depend on the clock.
pub fn untimed(s: &str) -> String {
    s.lines().filter(|l| !l.contains(" ops; ")).collect::<Vec<_>>().join("\n")
}

pub fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("oxcow-cli-test").tempdir().expect("tempdir")
}

pub fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("bad JSON ({e}):\n{s}"))
}

pub const INFO_KEYS: &[&str] = &[
    "virtual-size",
    "filename",
    "cluster-size",
    "format",
    "actual-size",
    "dirty-flag",
    "backing-filename",
    "full-backing-filename",
    "backing-filename-format",
    "snapshots",
];

pub const FORMAT_KEYS: &[&str] = &[
    "compat",
    "compression-type",
    "lazy-refcounts",
    "refcount-bits",
    "corrupt",
    "extended-l2",
    "bitmaps",
    "data-file",
    "data-file-raw",
];

/// Compares `oxcow info --output=json` with qemu-img's on the keys qemu
/// users rely on; actual-size is compared loosely (it moves with the host
/// file system, and oxcow opens without touching the file).
pub fn assert_info_matches(dir: &Path, file: &str, extra: &[&str]) {
    let mut args = vec!["info", "--output=json"];
    args.extend_from_slice(extra);
    args.push(file);
    let ours = json(&ok(dir, OXCOW, &args).stdout);
    let theirs = json(&ok(dir, "qemu-img", &args).stdout);
    for k in INFO_KEYS {
        assert_eq!(ours.get(*k), theirs.get(*k), "info key {k} differs for {file}");
    }
    let (of, tf) = (&ours["format-specific"], &theirs["format-specific"]);
    assert_eq!(of.get("type"), tf.get("type"), "format-specific type for {file}");
    let (od, td) = (&of["data"], &tf["data"]);
    for k in FORMAT_KEYS {
        assert_eq!(od.get(*k), td.get(*k), "format-specific key {k} differs for {file}");
    }
    // The same set of format-specific keys, no more, no fewer.
    let keys = |v: &Value| v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>()).unwrap_or_default();
    assert_eq!(keys(od), keys(td), "format-specific keys for {file}");
}

pub fn assert_map_matches(dir: &Path, file: &str, extra: &[&str]) {
    let mut args = vec!["map", "--output=json"];
    args.extend_from_slice(extra);
    args.push(file);
    let ours = json(&ok(dir, OXCOW, &args).stdout);
    let theirs = json(&ok(dir, "qemu-img", &args).stdout);
    if ours != theirs {
        let (a, b) = (ours.as_array().cloned().unwrap_or_default(), theirs.as_array().cloned().unwrap_or_default());
        let i = a.iter().zip(b.iter()).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len()));
        panic!(
            "map differs for {file} at extent {i}:\n  oxcow: {}\n  qemu:  {}\n  (previous: {})",
            a.get(i).map(|v| v.to_string()).unwrap_or_default(),
            b.get(i).map(|v| v.to_string()).unwrap_or_default(),
            i.checked_sub(1).and_then(|j| b.get(j)).map(|v| v.to_string()).unwrap_or_default()
        );
    }
    let mut h = vec!["map"];
    h.extend_from_slice(extra);
    h.push(file);
    // Human output refuses compressed clusters, with status 1, in both.
    let (a, b) = (oxcow(dir, &h), qemu_img(dir, &h));
    assert_eq!((a.code, a.stdout), (b.code, b.stdout), "human map differs for {file}");
}

/// oxcow's raw conversion must equal qemu-img's.
pub fn assert_convert_matches(dir: &Path, file: &str, extra: &[&str]) {
    let ours = format!("{file}.oxcow.raw");
    let theirs = format!("{file}.qemu.raw");
    let mut a = vec!["convert", "-O", "raw"];
    a.extend_from_slice(extra);
    a.push(file);
    let mut b = a.clone();
    a.push(&ours);
    b.push(&theirs);
    ok(dir, OXCOW, &a);
    ok(dir, "qemu-img", &b);
    ok(dir, "qemu-img", &["compare", "-f", "raw", "-F", "raw", &ours, &theirs]);
    std::fs::remove_file(dir.join(&ours)).ok();
    std::fs::remove_file(dir.join(&theirs)).ok();
}

/// `oxcow io -r` verifies every (pattern, offset, length); a wrong pattern
/// fails with qemu-io's message and status 1.
pub fn assert_patterns(dir: &Path, file: &str, pats: &[(u8, u64, u64)], extra: &[&str]) {
    let cmds: Vec<String> = pats.iter().map(|(p, o, l)| format!("read -q -P {p} {o} {l}")).collect();
    let mut pre = vec!["io", "-r"];
    pre.extend_from_slice(extra);
    let args = io_args(&pre, &cmds, file);
    let r = oxcow(dir, &args);
    assert_eq!(r.code, 0, "pattern check on {file}: {}{}", r.stdout, r.stderr);
    if let Some(&(p, o, l)) = pats.first() {
        let bad = [format!("read -P {} {o} {l}", p.wrapping_add(1))];
        let args = io_args(&pre, &bad, file);
        let r = oxcow(dir, &args);
        assert_eq!(r.code, 1, "wrong pattern must fail on {file}");
        assert!(
            r.stdout.contains(&format!("Pattern verification failed at offset {o}, {l} bytes")),
            "missing failure line: {}",
            r.stdout
        );
    }
}

/// Writes patterns with qemu-io and returns them for later checks.
pub fn qemu_write(dir: &Path, file: &str, pats: &[(u8, u64, u64)], extra: &[&str]) {
    let cmds: Vec<String> = pats.iter().map(|(p, o, l)| format!("write -q -P {p} {o} {l}")).collect();
    let args = io_args(extra, &cmds, file);
    ok(dir, "qemu-io", &args);
}
