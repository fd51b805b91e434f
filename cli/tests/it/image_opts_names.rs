//! Images named by option strings (`--image-opts`) and commit's base
//! names, under the drop-in names against QEMU's qemu-img on the same
//! inputs (iotests 198, qcow2-encryption, 020): which name a message or
//! `info` shows, and which image `commit -b NAME` means.

use crate::dropin::{bare_sides, run, same_steps, Side};

const SEC0: &str = "secret,id=sec0,data=astrochicken";
const SEC1: &str = "secret,id=sec1,data=furby";

#[test]
fn could_not_open_names_the_option_string_as_qemu() {
    let (ours, theirs) = bare_sides();
    same_steps(
        &ours,
        &theirs,
        &[
            ("qemu-img", &["check", "--image-opts", "driver=qcow2,file.filename=missing.qcow2"]),
            ("qemu-img", &["info", "--image-opts", "driver=qcow2,file.filename=missing.qcow2"]),
            (
                "qemu-img",
                &["check", "--object", SEC0, "--image-opts", "file.filename=missing.qcow2,encrypt.key-secret=sec0"],
            ),
        ],
    );
}

#[test]
fn info_names_an_image_with_a_key_secret_by_json_without_looking_it_up() {
    let (ours, theirs) = bare_sides();
    let spec = "driver=qcow2,file.filename=e.qcow2,encrypt.key-secret=sec0";
    same_steps(
        &ours,
        &theirs,
        &[(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "--object",
                SEC0,
                "-o",
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
                "e.qcow2",
                "1M",
            ],
        )],
    );
    // No --object: the secret is named, never read. The volumes' random
    // parts (uuid, iteration counts) differ between the two images, and
    // so does a new encrypted image's disk usage (not looked at here).
    let fixed = |s: &str| {
        s.lines()
            .filter(|l| !l.contains("uuid:") && !l.contains("iters:") && !l.contains("disk size:"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    for args in [&["info", "--image-opts", spec][..], &["info", "--image-opts", "driver=qcow2,file.filename=e.qcow2"]] {
        let (o, t) = (run(&ours, "qemu-img", args, None), run(&theirs, "qemu-img", args, None));
        assert_eq!((o.code, fixed(&o.stdout), o.stderr), (t.code, fixed(&t.stdout), t.stderr), "{args:?}");
    }
}

#[test]
fn commit_takes_image_opts_with_key_secrets_as_qemu() {
    let (ours, theirs) = bare_sides();
    let base = "driver=qcow2,file.filename=b.qcow2,encrypt.key-secret=sec0";
    let chain = "driver=qcow2,file.filename=t.qcow2,encrypt.key-secret=sec1,backing.driver=qcow2,backing.file.filename=b.qcow2,backing.encrypt.key-secret=sec0";
    same_steps(
        &ours,
        &theirs,
        &[
            (
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "--object",
                    SEC0,
                    "-o",
                    "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
                    "b.qcow2",
                    "1M",
                ],
            ),
            ("qemu-io", &["--object", SEC0, "-c", "write -q -P 0xa 0 1M", "--image-opts", base]),
            (
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "--object",
                    SEC1,
                    "-o",
                    "encrypt.format=luks,encrypt.key-secret=sec1,encrypt.iter-time=10",
                    "-b",
                    "b.qcow2",
                    "-F",
                    "qcow2",
                    "t.qcow2",
                ],
            ),
            ("qemu-io", &["--object", SEC0, "--object", SEC1, "-c", "write -q -P 0x9 64k 128k", "--image-opts", chain]),
            ("qemu-img", &["commit", "--object", SEC0, "--object", SEC1, "--image-opts", chain]),
            (
                "qemu-io",
                &[
                    "--object",
                    SEC0,
                    "-c",
                    "read -q -P 0xa 0 64k",
                    "-c",
                    "read -q -P 0x9 64k 128k",
                    "--image-opts",
                    base,
                ],
            ),
            (
                "qemu-img",
                &[
                    "commit",
                    "--object",
                    SEC0,
                    "--image-opts",
                    "driver=qcow2,file.filename=t.qcow2,encrypt.key-secret=sec9",
                ],
            ),
        ],
    );
}

#[test]
fn commit_base_name_is_relative_to_the_overlay_as_qemu() {
    let (ours, theirs) = bare_sides();
    for side in [&ours, &theirs] {
        std::fs::create_dir(side.dir.path().join("sub")).expect("mkdir");
    }
    let abs = |s: &Side| s.dir.path().join("sub/t.qcow2.mid").display().to_string();
    same_steps(
        &ours,
        &theirs,
        &[
            ("qemu-img", &["create", "-q", "-f", "qcow2", "sub/t.qcow2.base", "1M"]),
            ("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "t.qcow2.base", "-F", "qcow2", "sub/t.qcow2.mid"]),
            ("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "t.qcow2.mid", "-F", "qcow2", "sub/t.qcow2"]),
            ("qemu-io", &["-f", "qcow2", "-c", "write -q -P 3 0 64k", "sub/t.qcow2"]),
            ("qemu-img", &["commit", "-b", "t.qcow2.mid", "sub/t.qcow2"]),
            ("qemu-img", &["commit", "-b", "sub/t.qcow2.mid", "sub/t.qcow2"]),
            ("qemu-io", &["-f", "qcow2", "-c", "read -q -P 3 0 64k", "sub/t.qcow2.mid"]),
        ],
    );
    // An absolute name means the same file on each side.
    let (o, t) = (
        run(&ours, "qemu-img", &["commit", "-b", &abs(&ours), "sub/t.qcow2"], None),
        run(&theirs, "qemu-img", &["commit", "-b", &abs(&theirs), "sub/t.qcow2"], None),
    );
    assert_eq!((o.code, o.stdout, o.stderr), (t.code, t.stdout, t.stderr));
}
