//! The `qemu-nbd` front: qemu-nbd's options turned into `oxcow serve`'s.

use super::getopt::{long, parse, HasArg::*, LongOpt};
use super::{prog, version_text, Tool};

const SHORTS: &str = "hVb:o:p:rsnc:dvk:e:f:tl:x:T:D:AB:L";
const LONGS: &[LongOpt] = &[
    long("help", No, "h"),
    long("version", No, "V"),
    long("bind", Required, "b"),
    long("port", Required, "p"),
    long("socket", Required, "k"),
    long("offset", Required, "o"),
    long("read-only", No, "r"),
    long("allocation-depth", No, "A"),
    long("bitmap", Required, "B"),
    long("connect", Required, "c"),
    long("disconnect", No, "d"),
    long("list", No, "L"),
    long("snapshot", No, "s"),
    long("load-snapshot", Required, "l"),
    long("nocache", No, "n"),
    long("cache", Required, "cache"),
    long("aio", Required, "aio"),
    long("discard", Required, "discard"),
    long("detect-zeroes", Required, "detect-zeroes"),
    long("shared", Required, "e"),
    long("format", Required, "f"),
    long("persistent", No, "t"),
    long("verbose", No, "v"),
    long("export-name", Required, "x"),
    long("description", Required, "D"),
    long("object", Required, "object"),
    long("tls-creds", Required, "tls-creds"),
    long("tls-authz", Required, "tls-authz"),
    long("tls-hostname", Required, "tls-hostname"),
    long("image-opts", No, "image-opts"),
    long("trace", Required, "T"),
    long("fork", No, "fork"),
    long("pid-file", Required, "pid-file"),
    long("selinux-label", Required, "selinux-label"),
    long("handshake-limit", Required, "handshake-limit"),
];

fn help() -> String {
    let rows: &[(&str, &str)] = &[
        ("-h, --help", "show this help and exit"),
        ("-V, --version", "show the version and exit"),
        ("-p, --port=PORT", "TCP port to listen on (default 10809)"),
        ("-b, --bind=IFACE", "address to listen on (default 0.0.0.0)"),
        ("-k, --socket=PATH", "listen on a Unix socket instead"),
        ("-e, --shared=NUM", "clients served at once (default 1)"),
        ("-t, --persistent", "keep serving after the last client leaves"),
        ("-x, --export-name=NAME", "export name (default empty)"),
        ("-D, --description=TEXT", "export description"),
        ("-A, --allocation-depth", "offer qemu:allocation-depth"),
        ("--object type,id=ID,...", "define an object (TLS credentials, ...)"),
        ("--tls-creds=ID", "serve over TLS with these credentials"),
        ("--tls-authz=ID", "authorize TLS clients with this object"),
        ("--fork", "return once the server listens"),
        ("--pid-file=PATH", "write the server's process ID here"),
        ("-f, --format=FORMAT", "image format (raw, qcow2)"),
        ("-o, --offset=OFFSET", "export from this byte offset of the image on"),
        ("-r, --read-only", "export read-only"),
        ("-l, --load-snapshot=NAME", "export an internal snapshot, read-only"),
        ("-n, --nocache", "bypass the host cache (--cache=none)"),
        ("--cache=MODE", "none, writeback (default), writethrough, directsync, unsafe"),
        ("--aio=MODE", "threads, native or io_uring (accepted)"),
        ("--discard=MODE", "ignore (default) or unmap"),
        ("--detect-zeroes=MODE", "off (default), on or unmap"),
    ];
    let mut s = String::from(
        "Usage: qemu-nbd [OPTIONS] FILE\n  or:  qemu-nbd -L [OPTIONS]\nNBD server (oxcow answering as qemu-nbd)\n\n",
    );
    for (o, what) in rows {
        s += &format!("  {o:<26}{what}\n");
    }
    s
}

fn fail(msg: &str) -> u8 {
    eprintln!("{}: {msg}", prog());
    1
}

/// `-l` takes a name or id, or `snapshot.name=X` / `snapshot.id=X`.
fn snapshot_param(v: &str) -> String {
    for (k, val) in oxcow::options::split_options(v) {
        if k == "snapshot.name" || k == "snapshot.id" {
            return val;
        }
    }
    v.to_string()
}

pub fn run(args: &[String]) -> u8 {
    let p = match parse(args, SHORTS, LONGS) {
        Ok(p) => p,
        Err(msg) => {
            let a = super::argv0();
            eprintln!("{a}: {msg}");
            eprintln!("{}: Try `{a} --help' for more information.", prog());
            return 1;
        }
    };
    if p.has("h") {
        print!("{}", help());
        return 0;
    }
    if p.has("V") {
        print!("{}", version_text(Tool::Nbd));
        return 0;
    }
    if let Some(dev) = p.last("c") {
        return match std::fs::metadata(dev) {
            Err(e) => fail(&format!("Failed to open {dev}: {}", crate::error::os_message(&e))),
            Ok(_) => fail("kernel NBD devices (-c) are not supported by oxcow; export over a socket instead"),
        };
    }
    if p.has("L") {
        return super::nbd_list::run(&p);
    }
    for (key, what) in [("d", "-d (kernel NBD device)"), ("s", "-s (temporary snapshot overlay)")] {
        if p.has(key) {
            return fail(&format!("{what} is not supported by oxcow"));
        }
    }
    let [file] = p.args.as_slice() else {
        eprintln!("{}: Invalid number of arguments", prog());
        eprintln!("Try `{} --help' for more information.", super::argv0());
        return 1;
    };
    let file = file.clone();
    if p.has("k") && (p.has("p") || p.has("b")) {
        return fail("-p and -b cannot be used together with -k");
    }
    if let Some(m) = p.last("aio") {
        if !matches!(m, "threads" | "native" | "io_uring") {
            return fail(&format!("invalid aio mode '{m}'"));
        }
    }
    let mut argv: Vec<String> = vec![prog().into(), "serve".into()];
    // qemu-nbd listens on every interface unless told otherwise.
    if !p.has("b") && !p.has("k") {
        argv.extend(["-b".to_string(), "0.0.0.0".to_string()]);
    }
    for (k, v) in &p.opts {
        let pair = |flag: &str, v: &Option<String>| vec![flag.to_string(), v.clone().unwrap_or_default()];
        match k.as_str() {
            "b" | "p" | "k" | "e" | "f" | "x" | "D" | "B" => argv.extend(pair(&format!("-{k}"), v)),
            // Joined, so that a negative value is not read as a flag.
            "o" => argv.push(format!("--offset={}", v.as_deref().unwrap_or(""))),
            "l" => argv.extend(["-l".to_string(), snapshot_param(v.as_deref().unwrap_or(""))]),
            "r" | "t" | "A" => argv.push(format!("-{k}")),
            "n" => argv.extend(["--cache".to_string(), "none".to_string()]),
            "cache" | "discard" | "detect-zeroes" | "pid-file" | "object" | "tls-creds" | "tls-authz"
            | "tls-hostname" => argv.extend(pair(&format!("--{k}"), v)),
            "fork" => argv.push("--fork".into()),
            "image-opts" => argv.push("--image-opts".into()),
            // Verbosity, tracing, SELinux labels and the handshake time
            // limit change nothing in what clients see.
            _ => {}
        }
    }
    argv.extend(["--".to_string(), file]);
    super::oxcow(argv)
}
