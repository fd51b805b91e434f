//! The lifecycle subcommands (snapshot, commit, rebase, resize, amend,
//! measure) print what qemu-img prints and exit the same way.

use crate::support::*;

/// Runs the same arguments through qemu-img and oxcow on twin images
/// `q.qcow2` / `o.qcow2` (`{}` in an argument stands for the image) and
/// compares exit codes, stdout and stderr (program name aside).
fn twin(dir: &std::path::Path, args: &[&str]) {
    let qa: Vec<String> = args.iter().map(|a| a.replace("{}", "q.qcow2")).collect();
    let oa: Vec<String> = args.iter().map(|a| a.replace("{}", "o.qcow2")).collect();
    let q = qemu_img(dir, &qa.iter().map(String::as_str).collect::<Vec<_>>());
    let o = oxcow(dir, &oa.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(o.code, q.code, "{args:?}: oxcow {}{} qemu {}{}", o.stdout, o.stderr, q.stdout, q.stderr);
    assert_eq!(o.stdout.replace("o.qcow2", "q.qcow2"), q.stdout, "{args:?}");
    let strip = |s: &str| {
        s.replace("qemu-img: ", "").replace("oxcow: ", "").replace("o.qcow2", "q.qcow2").replace("qemu-img", "oxcow")
    };
    assert_eq!(strip(&o.stderr), strip(&q.stderr), "{args:?}");
}

fn setup(dir: &std::path::Path) {
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "q.qcow2", "4M"]);
    ok(dir, "qemu-io", &["-c", "write -P 1 0 300k", "-c", "write -z 1M 64k", "q.qcow2"]);
    std::fs::copy(dir.join("q.qcow2"), dir.join("o.qcow2")).unwrap();
}

#[test]
fn snapshot_cli() {
    let d = tmp();
    let dir = d.path();
    setup(dir);
    twin(dir, &["snapshot", "-l", "{}"]);
    twin(dir, &["snapshot", "-c", "first", "{}"]);
    twin(dir, &["snapshot", "-c", "second", "{}"]);
    // Dates differ by the second they were taken in: compare the rest.
    let q = ok(dir, "qemu-img", &["snapshot", "-l", "q.qcow2"]).stdout;
    let o = ok(dir, OXCOW, &["snapshot", "-l", "o.qcow2"]).stdout;
    let cut = |s: &str| {
        s.lines().map(|l| format!("{}{}", &l[..l.len().min(34)], l.get(53..).unwrap_or(""))).collect::<Vec<_>>()
    };
    assert_eq!(cut(&o), cut(&q));
    twin(dir, &["snapshot", "-a", "nope", "{}"]);
    twin(dir, &["snapshot", "-d", "1", "{}"]);
    twin(dir, &["snapshot", "-a", "1", "{}"]);
    twin(dir, &["snapshot", "-d", "first", "{}"]);
    twin(dir, &["snapshot", "-l", "-c", "x", "{}"]);
    twin(dir, &["compare", "{}", "q.qcow2"]);
    twin(dir, &["check", "{}"]);
}

#[test]
fn snapshot_dates_follow_the_time_zone_as_qemu_img() {
    // The date column is local time, as localtime(3) gives it: the same
    // snapshot listed by both tools under zones with other offsets, a
    // half-hour one and a POSIX rule must read alike.
    let d = tmp();
    let dir = d.path();
    setup(dir);
    ok(dir, "qemu-img", &["snapshot", "-c", "s1", "q.qcow2"]);
    let list = |prog: &str, tz: Option<&str>| {
        let mut c = std::process::Command::new(prog);
        c.args(["snapshot", "-l", "q.qcow2"]).current_dir(dir);
        match tz {
            Some(tz) => c.env("TZ", tz),
            None => c.env_remove("TZ"),
        };
        let out = c.output().unwrap();
        assert!(out.status.success(), "{prog} TZ={tz:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    for tz in [None, Some("UTC"), Some("America/New_York"), Some("Asia/Kolkata"), Some("EST5EDT,M3.2.0,M11.1.0")] {
        assert_eq!(list(OXCOW, tz), list("qemu-img", tz), "TZ={tz:?}");
    }
}

#[test]
fn resize_amend_measure_cli() {
    let d = tmp();
    let dir = d.path();
    setup(dir);
    for args in [
        &["resize", "{}", "1M"][..],
        &["resize", "{}", "-5M"],
        &["resize", "{}", "1000"],
        &["resize", "{}", "+1M"],
        &["resize", "--shrink", "{}", "-512k"],
        &["amend", "{}"],
        &["amend", "-o", "compat=0.10", "{}"],
        &["amend", "-o", "refcount_bits=8", "{}"],
        &["amend", "-o", "compat=1.1,lazy_refcounts=on", "{}"],
        &["amend", "-o", "cluster_size=4k", "{}"],
        &["measure", "{}"],
        &["measure", "-O", "qcow2", "{}"],
        &["measure", "-O", "qcow2", "--output=json", "{}"],
        &["measure", "-O", "qcow2", "--output=json", "-o", "cluster_size=4k,refcount_bits=1", "{}"],
        &["measure", "--size", "1G", "-O", "qcow2"],
        &["measure", "-o", "compat=1.1", "--size", "1G"],
        &["measure"],
        &["check", "{}"],
        &["compare", "{}", "q.qcow2"],
    ] {
        twin(dir, args);
    }
}

#[test]
fn commit_rebase_cli() {
    let d = tmp();
    let dir = d.path();
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "b.qcow2", "4M"]);
    ok(dir, "qemu-io", &["-c", "write -P 1 0 1M", "b.qcow2"]);
    std::fs::copy(dir.join("b.qcow2"), dir.join("c.qcow2")).unwrap();
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "q.qcow2"]);
    ok(dir, "qemu-io", &["-c", "write -P 2 512k 1M", "q.qcow2"]);
    std::fs::copy(dir.join("q.qcow2"), dir.join("o.qcow2")).unwrap();
    twin(dir, &["rebase", "{}"]);
    twin(dir, &["rebase", "-b", "c.qcow2", "{}"]);
    twin(dir, &["rebase", "-u", "-b", "c.qcow2", "-F", "qcow2", "{}"]);
    twin(dir, &["rebase", "-b", "b.qcow2", "-F", "qcow2", "{}"]);
    twin(dir, &["compare", "{}", "q.qcow2"]);
    // Both commit into the same base one after the other: same output.
    let q = ok(dir, "qemu-img", &["commit", "q.qcow2"]);
    ok(dir, "qemu-img", &["rebase", "-u", "-b", "c.qcow2", "-F", "qcow2", "o.qcow2"]);
    let o = ok(dir, OXCOW, &["commit", "o.qcow2"]);
    assert_eq!(o.stdout, q.stdout);
    twin(dir, &["compare", "b.qcow2", "c.qcow2"]);
    twin(dir, &["check", "{}"]);
    twin(dir, &["commit", "b.qcow2"]);
}
