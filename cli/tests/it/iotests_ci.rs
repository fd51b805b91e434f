//! The fast subset of QEMU's own qemu-iotests (`scripts/iotests.sh --ci`)
//! run against this build under its drop-in names: every test of it must
//! pass. The sources are QEMU's and never committed; `.ci/run` fetches
//! them into `target/qemu-iotests` (`scripts/iotests/fetch.sh`). Without
//! them the test says so and passes, unless `CI` or
//! `OXCOW_REQUIRE_IOTESTS` is set: there a missing suite is a failure.

use crate::support::OXCOW;
use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn required() -> bool {
    ["CI", "OXCOW_REQUIRE_IOTESTS"].iter().any(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()))
}

#[test]
fn iotests_ci_subset_passes() {
    let src = std::env::var_os("IOTESTS_SRC").map(PathBuf::from).unwrap_or_else(|| root().join("target/qemu-iotests"));
    let missing = !src.join("tests/qemu-iotests/check").exists();
    let no_python = Command::new("python3").arg("--version").output().is_err();
    if missing || no_python {
        let why = if missing {
            format!("no qemu-iotests sources in {} (scripts/iotests/fetch.sh {0})", src.display())
        } else {
            "no python3".to_string()
        };
        assert!(!required(), "iotests required (CI or OXCOW_REQUIRE_IOTESTS set) but {why}");
        eprintln!("skipped: {why}");
        return;
    }
    // Links and scratch files live in a directory of this test's own, so
    // the test runs beside a hand-started scripts/iotests.sh.
    let work = tempfile::Builder::new().prefix("oxcow-iotests").tempdir_in("/tmp").expect("tempdir");
    let bin = work.path().join("oxcow");
    std::os::unix::fs::symlink(OXCOW, &bin).expect("link the binary");
    let out = Command::new(root().join("scripts/iotests.sh"))
        .arg("--ci")
        .env("OXCOW_BIN", &bin)
        .env("IOTESTS_SRC", &src)
        .env("IOTESTS_WORK", work.path().join("run"))
        .output()
        .expect("run scripts/iotests.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stdout.lines().last().unwrap_or("");
    if !out.status.success() {
        // The diffs of the failed tests are what one needs to see.
        let mut logs = String::new();
        for line in std::fs::read_to_string(work.path().join("run/results.txt")).unwrap_or_default().lines() {
            let mut f = line.split_whitespace();
            if let (Some(name), Some(class)) = (f.next(), f.next()) {
                if class != "pass" {
                    let log = std::fs::read_to_string(work.path().join(format!("run/logs/{name}.log")));
                    logs += &format!("--- {name} ({class})\n{}\n", log.unwrap_or_default());
                }
            }
        }
        panic!("iotests --ci: {last}\n{stdout}\n{stderr}\n{logs}");
    }
    assert!(
        last.starts_with("iotests: ") && last.ends_with(" qcow2 tests pass"),
        "unexpected output:\n{stdout}\n{stderr}"
    );
}
