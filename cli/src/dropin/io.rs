//! The `qemu-io` front: qemu-io's options (getopt_long, permuted), turned
//! into `oxcow io`'s.

use super::getopt::{long, parse, HasArg::*, LongOpt};
use super::{prog, version_text, Tool};

const SHORTS: &str = "hc:d:f:rsnCmkt:T:Ui:V";
const LONGS: &[LongOpt] = &[
    long("help", No, "h"),
    long("version", No, "V"),
    long("cmd", Required, "c"),
    long("format", Required, "f"),
    long("read-only", No, "r"),
    long("snapshot", No, "s"),
    long("nocache", No, "n"),
    long("copy-on-read", No, "C"),
    long("misalign", No, "m"),
    long("native-aio", No, "k"),
    long("discard", Required, "d"),
    long("cache", Required, "t"),
    long("trace", Required, "T"),
    long("object", Required, "object"),
    long("image-opts", No, "image-opts"),
    long("force-share", No, "U"),
    long("aio", Required, "i"),
];

fn help() -> String {
    let rows: &[(&str, &str)] = &[
        ("--object OBJECTDEF", "define an object (secret, ...)"),
        ("--image-opts", "FILE is an option string (driver=...,file.filename=...)"),
        ("-c, --cmd STRING", "run this command (repeatable)"),
        ("-f, --format FMT", "image format"),
        ("-r, --read-only", "open read-only"),
        ("-s, --snapshot", "write to a temporary overlay"),
        ("-n, --nocache", "bypass the host cache (-t none)"),
        ("-C, --copy-on-read", "copy data read from backing files into the image"),
        ("-m, --misalign", "misalign buffers (accepted)"),
        ("-k, --native-aio", "kernel AIO (accepted; same as -i native)"),
        ("-i, --aio=MODE", "AIO mode: threads, native or io_uring"),
        ("-t, --cache=MODE", "cache mode"),
        ("-d, --discard=MODE", "discard mode: ignore or unmap"),
        ("-T, --trace OPTS", "tracing options (accepted, no trace points)"),
        ("-U, --force-share", "share the image with a writer (read-only)"),
        ("-h, --help", "show this help and exit"),
        ("-V, --version", "show the version and exit"),
    ];
    let mut s = String::from(
        "Usage: qemu-io [OPTIONS]... [-c STRING]... [file]\nDisk exerciser (oxcow answering as qemu-io)\n\n",
    );
    for (o, what) in rows {
        s += &format!("  {o:<20} {what}\n");
    }
    s += "\nSee 'qemu-io -c help' for the commands.\n";
    s
}

pub fn run(args: &[String]) -> u8 {
    let p = match parse(args, SHORTS, LONGS) {
        Ok(p) => p,
        Err(msg) => {
            eprintln!("{}: {msg}", super::argv0());
            print!("{}", help());
            return 1;
        }
    };
    if p.has("h") {
        print!("{}", help());
        return 0;
    }
    if p.has("V") {
        print!("{}", version_text(Tool::Io));
        return 0;
    }
    if p.args.len() > 1 {
        print!("{}", help());
        return 1;
    }
    // -s: the image is the read-only backing file of a temporary qcow2
    // overlay that takes the writes and is deleted at the end.
    let overlay = match p.args.first().filter(|_| p.has("s")) {
        Some(_) if p.has("image-opts") => {
            eprintln!("{}: -s with --image-opts is not supported by oxcow", prog());
            return 1;
        }
        Some(file) => match temporary_overlay(file, p.last("f")) {
            Ok(o) => Some(o),
            Err(code) => return code,
        },
        None => None,
    };
    let mut argv: Vec<String> = vec![prog().into(), "io".into()];
    if overlay.is_some() {
        argv.extend(["-f".to_string(), "qcow2".to_string()]);
    }
    for (i, (k, v)) in p.opts.iter().enumerate() {
        if overlay.is_some() && k == "f" {
            continue;
        }
        // getopt lets a later value win; pass each single-valued option once.
        if k != "c" && k != "object" && p.opts[i + 1..].iter().any(|o| &o.0 == k) {
            continue;
        }
        match (k.as_str(), v) {
            ("c", Some(c)) => argv.extend(["-c".to_string(), c.clone()]),
            ("f" | "t" | "d" | "i", Some(v)) => argv.extend([format!("-{k}"), v.clone()]),
            ("r" | "n" | "C" | "U", None) => argv.push(format!("-{k}")),
            ("k", None) => argv.extend(["-i".to_string(), "native".to_string()]),
            ("image-opts", None) => argv.push("--image-opts".into()),
            ("object", Some(v)) => argv.extend(["--object".to_string(), v.clone()]),
            // Buffer alignment and tracing change nothing here.
            ("m" | "T", _) => {}
            _ => {}
        }
    }
    if let Some(f) = overlay.as_ref().or(p.args.first()) {
        argv.extend(["--".to_string(), f.clone()]);
    }
    let code = super::oxcow(argv);
    if let Some(o) = overlay {
        let _ = std::fs::remove_file(o);
    }
    code
}

/// Creates the temporary overlay of `-s` over `file` (of format `format`,
/// probed when not given); Err is the exit status after the message.
fn temporary_overlay(file: &str, format: Option<&str>) -> Result<String, u8> {
    let format = match format {
        Some(f) => f.to_string(),
        None => {
            let opts = oxcow::OpenOptions::default().no_io(true).no_backing(true);
            match oxcow::open(file, &opts) {
                Ok(img) => img.format().name().to_string(),
                Err(e) => {
                    eprintln!("{}: can't open device {file}: {}", prog(), crate::error::message(&e));
                    return Err(1);
                }
            }
        }
    };
    let backing = std::path::absolute(file).map_err(|e| {
        eprintln!("{}: can't open device {file}: {e}", prog());
        1u8
    })?;
    let overlay = std::env::temp_dir().join(format!("oxcow-io-snapshot-{}.qcow2", std::process::id()));
    let overlay = overlay.to_string_lossy().into_owned();
    let create = ["oxcow", "create", "-q", "-f", "qcow2", "-F", &format, "-b"];
    let code = crate::run_args(
        create.iter().map(|s| s.to_string()).chain([backing.to_string_lossy().into(), overlay.clone()]),
    );
    if code != 0 {
        let _ = std::fs::remove_file(&overlay);
        return Err(code);
    }
    Ok(overlay)
}
