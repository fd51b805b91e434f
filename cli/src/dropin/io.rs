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
    if p.has("s") {
        eprintln!("{}: -s (temporary snapshot overlay) is not supported by oxcow", prog());
        return 1;
    }
    let mut argv: Vec<String> = vec![prog().into(), "io".into()];
    for (i, (k, v)) in p.opts.iter().enumerate() {
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
    if let Some(f) = p.args.first() {
        argv.extend(["--".to_string(), f.clone()]);
    }
    super::oxcow(argv)
}
