//! Damaged images at the command line, next to qemu-img on the same
//! files: backing chains that loop, snapshot table entries that lie.

mod common;

use common::*;
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
