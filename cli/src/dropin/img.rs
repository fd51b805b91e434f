//! The `qemu-img` front: global options, the command word, then the
//! subcommand's own options, which `cmd/` already takes in qemu-img's
//! spelling.

use super::{prog, version_text, Tool, SUBCOMMAND};

/// qemu-img's commands; the ones oxcow lacks are refused as qemu-img
/// refuses a command it does not know (see [`offered`]).
const COMMANDS: &[(&str, &str)] = &[
    ("amend", "Update format-specific options of the image"),
    ("bench", "Run a simple image benchmark"),
    ("bitmap", "Change the persistent dirty bitmaps of an image"),
    ("check", "Check the image's metadata for consistency"),
    ("commit", "Commit an overlay's data into its backing image"),
    ("compare", "Compare the guest-visible contents of two images"),
    ("convert", "Copy an image, converting its format if asked"),
    ("create", "Create a new image file"),
    ("dd", "Copy between images dd-style"),
    ("info", "Show information about an image"),
    ("map", "Show the allocation map of an image"),
    ("measure", "Compute the host size a new image needs"),
    ("rebase", "Change the backing file of an image"),
    ("resize", "Change the virtual size of an image"),
    ("snapshot", "List, create, apply or delete internal snapshots"),
];

/// A qemu-img command that oxcow implements.
fn offered(cmd: &str) -> bool {
    COMMANDS.iter().any(|c| c.0 == cmd) && crate::has_subcommand(cmd)
}

fn try_help() {
    eprintln!("Try '{} --help' for more info", super::argv0());
}

fn help() -> String {
    let mut s = version_text(Tool::Img);
    s += "Disk image utility (oxcow answering as qemu-img).  Usage:\n\n";
    s += "  qemu-img [standard options] COMMAND [--help | command options]\n\n";
    s += "Standard options:\n";
    s += "  -h, --help\n     show this help and exit\n";
    s += "  -V, --version\n     show the version and exit\n";
    s += "  -T, --trace TRACE\n     tracing options (accepted, no trace points)\n\n";
    s += "Commands (qemu-img COMMAND --help shows a command's options):\n\n";
    for (c, what) in COMMANDS.iter().filter(|c| offered(c.0)) {
        s += &format!("  {c} - {what}\n");
    }
    s
}

pub fn run(args: &[String]) -> u8 {
    let mut i = 0;
    // Global options come before the command word.
    while let Some(a) = args.get(i) {
        match a.as_str() {
            "-h" | "--help" => {
                print!("{}", help());
                return 0;
            }
            "-V" | "--version" => {
                print!("{}", version_text(Tool::Img));
                return 0;
            }
            "-T" | "--trace" => i += 2,
            s if s.starts_with("--trace=") || (s.starts_with("-T") && s.len() > 2) => i += 1,
            s if s.starts_with('-') && s.len() > 1 => {
                if s.starts_with("--") {
                    eprintln!("{}: unrecognized option '{s}'", prog());
                } else {
                    eprintln!("{}: invalid option -- '{}'", prog(), &s[1..2]);
                }
                try_help();
                return 1;
            }
            _ => break,
        }
    }
    let Some(cmd) = args.get(i) else {
        eprintln!("{}: Not enough arguments", prog());
        try_help();
        return 1;
    };
    if !offered(cmd) {
        eprintln!("{}: Command not found: {cmd}", prog());
        try_help();
        return 1;
    }
    let _ = SUBCOMMAND.set(cmd.clone());
    let mut argv = vec![prog().to_string()];
    if args[i..].iter().any(|a| a == "--image-opts") && !NATIVE_IMAGE_OPTS.contains(&cmd.as_str()) {
        match image_opts(cmd, &args[i + 1..]) {
            Ok(rest) => {
                argv.push(cmd.clone());
                argv.extend(rest);
            }
            Err(msg) => {
                eprintln!("{}: {msg}", prog());
                return 1;
            }
        }
    } else {
        argv.extend(args[i..].iter().cloned());
    }
    super::oxcow(argv)
}

/// Commands whose oxcow subcommand takes `--image-opts` (and `--object`)
/// itself, NBD and TLS keys included.
const NATIVE_IMAGE_OPTS: &[&str] = &["amend", "bitmap", "check", "commit", "compare", "convert", "dd", "info", "map"];

/// Commands that take one image, named by `-f` and a file name.
const ONE_IMAGE: &[&str] =
    &["amend", "bench", "check", "commit", "info", "map", "measure", "rebase", "resize", "snapshot"];

/// `--image-opts`: each image is an option string; for the commands
/// with one image it becomes its file name and `-f DRIVER`. Keys beyond
/// the driver and file name are refused, not dropped.
fn image_opts(cmd: &str, args: &[String]) -> Result<Vec<String>, String> {
    if !ONE_IMAGE.contains(&cmd) {
        return Err(format!("--image-opts is not supported by oxcow {cmd}"));
    }
    let mut out = Vec::new();
    for a in args {
        if a == "--image-opts" {
            continue;
        }
        let opts = oxcow::options::split_options(a);
        if !a.contains('=') || !opts.iter().any(|(k, _)| k == "driver" || k.ends_with("filename")) {
            out.push(a.clone());
            continue;
        }
        let mut file = None;
        let mut driver = None;
        for (k, v) in opts {
            match k.as_str() {
                "driver" => driver = Some(v),
                "file.filename" | "filename" => file = Some(v),
                "file.driver" if v == "file" => {}
                _ => return Err(format!("Unsupported image option '{k}'")),
            }
        }
        let file = file.ok_or_else(|| "A block device must be specified by filename".to_string())?;
        if let Some(d) = driver.filter(|d| d != "file") {
            out.extend(["-f".to_string(), d]);
        }
        out.push(file);
    }
    Ok(out)
}
