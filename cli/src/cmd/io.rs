//! `oxcow io`: qemu-io's command language over an opened image.
//!
//! Output lines, pattern checks and the exit status follow qemu-io: a
//! command that fails prints its message and the run ends with status 1,
//! but later commands still run.

use crate::error::{CliError, CliResult};
use crate::util::{io_size, parse_format, parse_num};
use oxcow::{chain_status, BlockDevice, CacheMode, Image, OpenOptions};
use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// Image format (probed when omitted).
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Open read-only.
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Copy-on-read: data read from the backing chain is stored in the image.
    #[arg(short = 'C', long = "copy-on-read")]
    copy_on_read: bool,
    /// Cache mode (writeback, none, writethrough, directsync, unsafe).
    #[arg(short = 't', long = "cache")]
    cache: Option<String>,
    /// Open read-only even if another process has the image open for writing.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Bypass the host page cache (short for `-t none`).
    #[arg(short = 'n', long = "nocache")]
    nocache: bool,
    /// Open an internal snapshot instead of the active state, read-only
    /// (an oxcow extension, named after qemu-nbd's option).
    #[arg(short = 'l', long = "load-snapshot")]
    snapshot: Option<String>,
    /// Discard mode: `unmap` (the default, as in qemu-io) or `ignore`
    /// (discard requests succeed without doing anything).
    #[arg(short = 'd', long = "discard", default_value = "unmap")]
    discard: String,
    /// A command to run (repeatable); commands are read from stdin without any.
    #[arg(short = 'c', long = "cmd", allow_hyphen_values = true)]
    cmds: Vec<String>,
    #[command(flatten)]
    objects: crate::image_opts::ObjectArgs,
    /// Image file.
    file: String,
}

pub fn run(mut a: Args) -> CliResult<i32> {
    a.objects.apply(&mut a.file, &mut a.format)?;
    let format = parse_format(a.format.as_deref())?;
    let cache = match &a.cache {
        Some(c) => c.parse::<CacheMode>().map_err(|_| CliError::new(format!("Invalid cache option: {c}")))?,
        None if a.nocache => CacheMode::None,
        // qemu-io's default: each write durable before the next command.
        None => CacheMode::Writethrough,
    };
    let unmap = match a.discard.as_str() {
        "ignore" | "off" => false,
        "unmap" | "on" => true,
        other => return Err(CliError::new(format!("Invalid discard option: {other}"))),
    };
    let write = !a.read_only && a.snapshot.is_none();
    if a.force_share && write {
        return Err(CliError::new(format!(
            "can't open device {}: force-share=on can only be used with read-only images",
            a.file
        )));
    }
    let opts = OpenOptions::default()
        .format(format)
        .write(write)
        .cache(cache)
        .force_share(a.force_share)
        .copy_on_read(a.copy_on_read)
        .allow_network_backing(a.copy_on_read);
    let opts = crate::object::secret::with_key(&a.file, crate::util::with_network_permission(&opts));
    let img = oxcow::open(&a.file, &opts)
        .map_err(|e| CliError::new(format!("can't open device {}: {}", a.file, crate::error::message(&e))))?;
    crate::util::report_dirty_repair(&a.file, &img);
    let snap = match &a.snapshot {
        Some(name) => {
            let q = img.qcow2().ok_or_else(|| CliError::new("this image format does not support snapshots"))?;
            Some(q.snapshot_device(name).map_err(|e| {
                CliError::new(format!("Failed to load snapshot '{name}': {}", crate::error::message(&e)))
            })?)
        }
        None => None,
    };
    let dev: &dyn BlockDevice = match &snap {
        Some(d) => &**d,
        None => img.device(),
    };
    let mut failed = false;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let run_line = |line: &str, out: &mut dyn Write| -> bool {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.is_empty() {
            return true;
        }
        // A command that stopped early has already said why.
        exec(&img, dev, unmap, &words, out).unwrap_or(false)
    };
    if a.cmds.is_empty() {
        for line in std::io::stdin().lock().lines() {
            let line =
                line.map_err(|e| CliError::new(format!("reading commands: {}", crate::error::os_message(&e))))?;
            if matches!(line.trim(), "quit" | "q") {
                break;
            }
            failed |= !run_line(&line, &mut out);
        }
    } else {
        for c in &a.cmds {
            failed |= !run_line(c, &mut out);
        }
    }
    let _ = out.flush();
    if let Err(e) = img.close() {
        eprintln!("oxcow: closing {}: {}", a.file, crate::error::message(&e));
        failed = true;
    }
    Ok(i32::from(failed))
}

/// A command failed after reporting why.
#[derive(Debug)]
struct Stop;

/// Minimal getopt: `spec` lists option letters, a trailing `:` marks those
/// taking a value. Options end at the first non-option word.
struct Opts<'a> {
    flags: Vec<(char, Option<&'a str>)>,
    rest: Vec<&'a str>,
}

fn getopt<'a>(words: &[&'a str], spec: &str) -> Result<Opts<'a>, char> {
    let mut flags = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let w = words[i];
        if w == "--" {
            i += 1;
            break;
        }
        if !w.starts_with('-') || w.len() == 1 {
            break;
        }
        let chars: Vec<char> = w[1..].chars().collect();
        let mut j = 0;
        while j < chars.len() {
            let c = chars[j];
            let Some(pos) = spec.find(c) else { return Err(c) };
            if spec[pos + 1..].starts_with(':') {
                let rest: String = chars[j + 1..].iter().collect();
                if !rest.is_empty() {
                    // Value attached to the flag (-P0xab): keep a borrowed
                    // slice of the original word.
                    let start = w.len() - rest.len();
                    flags.push((c, Some(&w[start..])));
                } else {
                    i += 1;
                    let Some(v) = words.get(i) else { return Err(c) };
                    flags.push((c, Some(*v)));
                }
                j = chars.len();
            } else {
                flags.push((c, None));
                j += 1;
            }
        }
        i += 1;
    }
    Ok(Opts { flags, rest: words[i..].to_vec() })
}

impl Opts<'_> {
    fn has(&self, c: char) -> bool {
        self.flags.iter().any(|f| f.0 == c)
    }
    fn value(&self, c: char) -> Option<&str> {
        self.flags.iter().rev().find(|f| f.0 == c).and_then(|f| f.1)
    }
}

const USAGE: &[(&str, &str, usize)] = &[
    (
        "read",
        "read [-abCqrv] [-P pattern [-s off] [-l len]] off len -- reads a number of bytes at a specified offset",
        2,
    ),
    (
        "write",
        "write [-bcCfnquz] [-P pattern | -s source_file] off len -- writes a number of bytes at a specified offset",
        2,
    ),
    ("discard", "discard [-Cq] off len -- discards a number of bytes at a specified offset", 2),
    ("flush", "flush -- flush all in-core file state to disk", 0),
    ("aio_flush", "aio_flush -- completes all outstanding aio requests", 0),
    ("truncate", "truncate [-m prealloc_mode] off -- truncates the current file at the given offset", 1),
    ("length", "length -- gets the length of the current file", 0),
    ("map", "map -- prints the allocation state of the whole file", 0),
    ("info", "info -- prints information about the current file", 0),
];

fn usage(out: &mut dyn Write, cmd: &str) {
    if let Some(u) = USAGE.iter().find(|u| u.0 == cmd) {
        let _ = writeln!(out, "{}", u.1);
    }
}

fn num(out: &mut dyn Write, s: &str) -> Result<u64, Stop> {
    parse_num(s).ok_or_else(|| {
        let _ = writeln!(out, "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {s}");
        Stop
    })
}

/// qemu's largest single request.
const MAX_REQUEST: u64 = 2147483136;

fn length(out: &mut dyn Write, s: &str, suffix: &str) -> Result<u64, Stop> {
    let n = num(out, s)?;
    if n > MAX_REQUEST {
        let _ = writeln!(out, "length cannot exceed {MAX_REQUEST}{suffix}, given {s}");
        return Err(Stop);
    }
    Ok(n)
}

fn pattern(out: &mut dyn Write, s: &str) -> Result<u8, Stop> {
    let v = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        i64::from_str_radix(h, 16).ok()
    } else if s.len() > 1 && s.starts_with('0') {
        i64::from_str_radix(&s[1..], 8).ok()
    } else {
        s.parse::<i64>().ok()
    };
    match v {
        Some(b) if (0..=255).contains(&b) => Ok(b as u8),
        _ => {
            let _ = writeln!(out, "{s} is not a valid pattern byte");
            Err(Stop)
        }
    }
}

fn report(out: &mut dyn Write, verb: &str, count: u64, offset: u64, elapsed: Duration) {
    let _ = writeln!(out, "{verb} {count}/{count} bytes at offset {offset}");
    let secs = elapsed.as_secs_f64().max(1e-9);
    let centis = elapsed.as_millis() / 10;
    let _ = writeln!(
        out,
        "{}, 1 ops; {:02}.{:02} sec ({}/sec and {:.4} ops/sec)",
        io_size(count as f64),
        centis / 100,
        centis % 100,
        io_size(count as f64 / secs),
        1.0 / secs
    );
}

fn fail(what: &str, e: oxcow::Error) -> Stop {
    eprintln!("{what} failed: {}", crate::error::request_message(&e));
    Stop
}

/// Runs one command; Ok(false) means it ran but reported a failure.
fn exec(img: &Image, dev: &dyn BlockDevice, unmap: bool, words: &[&str], out: &mut dyn Write) -> Result<bool, Stop> {
    let cmd = words[0];
    let args = &words[1..];
    let spec = match cmd {
        "read" => "P:vqCabrs:l:",
        "write" => "P:zuqCbcfn",
        "discard" => "qC",
        "truncate" => "m:",
        "flush" | "aio_flush" | "length" | "map" | "info" => "",
        _ => {
            eprintln!("command \"{cmd}\" not found");
            return Err(Stop);
        }
    };
    let o = match getopt(args, spec) {
        Ok(o) => o,
        Err(c) => {
            eprintln!("{cmd}: invalid option -- '{c}'");
            usage(out, cmd);
            return Err(Stop);
        }
    };
    let nargs = USAGE.iter().find(|u| u.0 == cmd).map_or(0, |u| u.2);
    if o.rest.len() != nargs {
        usage(out, cmd);
        return Err(Stop);
    }
    match cmd {
        "read" => {
            let off = num(out, o.rest[0])?;
            let len = length(out, o.rest[1], "")?;
            let pat = o.value('P').map(|p| pattern(out, p)).transpose()?;
            let mut buf = vec![0u8; usize::try_from(len).map_err(|_| Stop)?];
            let t = Instant::now();
            dev.read_at(&mut buf, off).map_err(|e| fail("read", e))?;
            let el = t.elapsed();
            let mut ok = true;
            if let Some(p) = pat {
                // -s/-l narrow the check to part of what was read.
                let ps = o.value('s').map(|v| num(out, v)).transpose()?.unwrap_or(0).min(len);
                let pl = o.value('l').map(|v| num(out, v)).transpose()?.unwrap_or(len - ps).min(len - ps);
                if buf[ps as usize..(ps + pl) as usize].iter().any(|&b| b != p) {
                    let _ = writeln!(out, "Pattern verification failed at offset {}, {pl} bytes", off + ps);
                    ok = false;
                }
            }
            if !o.has('q') {
                if o.has('v') {
                    dump(out, &buf, off);
                }
                report(out, "read", len, off, el);
            }
            Ok(ok)
        }
        "write" => {
            let off = num(out, o.rest[0])?;
            let len = if o.has('z') { num(out, o.rest[1])? } else { length(out, o.rest[1], " without -n")? };
            let zero = o.has('z');
            if o.has('u') && !zero {
                let _ = writeln!(out, "-u requires -z to be specified");
                return Err(Stop);
            }
            if o.has('b') {
                let _ = writeln!(out, "write: VM-state writes are not supported by oxcow");
                return Err(Stop);
            }
            if o.has('c') && zero {
                let _ = writeln!(out, "-c and -z cannot be specified at the same time");
                return Err(Stop);
            }
            if o.has('c') {
                for (v, what) in [(off, "offset"), (len, "count")] {
                    if !v.is_multiple_of(512) {
                        let _ = writeln!(out, "{v} is not a sector-aligned value for '{what}'");
                        return Err(Stop);
                    }
                }
            }
            if zero && o.has('P') {
                let _ = writeln!(out, "-z and -P cannot be specified at the same time");
                return Err(Stop);
            }
            let t = Instant::now();
            if zero {
                dev.write_zeroes(off, len, o.has('u')).map_err(|e| fail("write", e))?;
            } else {
                let p = o.value('P').map(|p| pattern(out, p)).transpose()?.unwrap_or(0xcd);
                let buf = vec![p; usize::try_from(len).map_err(|_| Stop)?];
                if o.has('c') {
                    write_compressed(img, &buf, off).map_err(|e| fail("write", e))?;
                } else {
                    dev.write_at(&buf, off).map_err(|e| fail("write", e))?;
                }
            }
            if o.has('f') {
                // Forced unit access: durable before the command completes.
                dev.flush().map_err(|e| fail("write", e))?;
            }
            if !o.has('q') {
                report(out, "wrote", len, off, t.elapsed());
            }
            Ok(true)
        }
        "discard" => {
            let off = num(out, o.rest[0])?;
            let len = num(out, o.rest[1])?;
            let t = Instant::now();
            if unmap {
                dev.discard(off, len).map_err(|e| fail("discard", e))?;
            }
            if !o.has('q') {
                report(out, "discard", len, off, t.elapsed());
            }
            Ok(true)
        }
        "flush" | "aio_flush" => {
            dev.flush().map_err(|e| fail(cmd, e))?;
            Ok(true)
        }
        "truncate" => {
            let size = num(out, o.rest[0])?;
            let r = match img.qcow2() {
                Some(q) => q.resize_to(size, true),
                None => dev.resize(size),
            };
            r.map_err(|e| fail("truncate", e))?;
            Ok(true)
        }
        "length" => {
            let _ = writeln!(out, "{}", io_size(dev.len() as f64));
            Ok(true)
        }
        "map" => {
            io_map(dev, out).map_err(|e| fail("map", e))?;
            Ok(true)
        }
        "info" => {
            io_info(img, out);
            Ok(true)
        }
        _ => Err(Stop),
    }
}

/// `write -c`: whole clusters, each compressed on its own.
fn write_compressed(img: &Image, buf: &[u8], off: u64) -> oxcow::Result<()> {
    let q = img.qcow2().ok_or_else(|| oxcow::Error::unsupported("compressed writes on raw images"))?;
    let cs = q.cluster_size() as usize;
    if !off.is_multiple_of(cs as u64) || !buf.len().is_multiple_of(cs) {
        return Err(oxcow::Error::invalid("compressed writes must be cluster aligned"));
    }
    for (i, c) in buf.chunks(cs).enumerate() {
        q.write_compressed(off + (i * cs) as u64, c)?;
    }
    Ok(())
}

/// qemu-io's hex dump: offset, 16 bytes in hex, then their printable form.
fn dump(out: &mut dyn Write, buf: &[u8], base: u64) {
    for (i, chunk) in buf.chunks(16).enumerate() {
        let mut line = format!("{:08x}:  ", base + i as u64 * 16);
        for b in chunk {
            line += &format!("{b:02x} ");
        }
        line.push(' ');
        for &b in chunk {
            line.push(if (0x20..0x7f).contains(&b) { b as char } else { '.' });
        }
        let _ = writeln!(out, "{line}");
    }
}

/// qemu-io's map: runs of allocated-anywhere-in-the-chain versus not.
fn io_map(dev: &dyn BlockDevice, out: &mut dyn Write) -> oxcow::Result<()> {
    let len = dev.len();
    let mut pos = 0;
    let mut run: Option<(u64, u64, bool)> = None;
    let print = |out: &mut dyn Write, (start, n, alloc): (u64, u64, bool)| {
        let _ = writeln!(
            out,
            "{} (0x{n:x}) bytes {} at offset {} (0x{start:x})",
            io_size(n as f64),
            if alloc { "    allocated" } else { "not allocated" },
            io_size(start as f64)
        );
    };
    while pos < len {
        let st = chain_status(dev, pos, len - pos)?;
        let n = st.length.max(1).min(len - pos);
        match &mut run {
            Some(r) if r.2 == st.allocated => r.1 += n,
            _ => {
                if let Some(r) = run.take() {
                    print(out, r);
                }
                run = Some((pos, n, st.allocated));
            }
        }
        pos += n;
    }
    if let Some(r) = run {
        print(out, r);
    }
    Ok(())
}

fn io_info(img: &Image, out: &mut dyn Write) {
    let _ = writeln!(out, "format name: {}", img.format().name());
    match img.qcow2() {
        Some(q) => {
            let h = q.header();
            let cs = q.cluster_size();
            let per_l1 = h.l2_entries() * cs;
            let vm_state = h.size.div_ceil(per_l1) * per_l1;
            let _ = writeln!(out, "cluster size: {}", io_size(cs as f64));
            let _ = writeln!(out, "vm state offset: {}", io_size(vm_state as f64));
            if let Ok(v) = crate::cmd::info::image_info(img, &img.path().display().to_string()) {
                if let Some(d) = v.get("format-specific").and_then(|f| f.get("data")) {
                    let mut s = String::from("Format specific information:\n");
                    crate::cmd::info::dump_human(&mut s, d, 1);
                    let _ = write!(out, "{s}");
                }
            }
        }
        None => {
            let _ = writeln!(out, "cluster size: 0 bytes");
            let _ = writeln!(out, "vm state offset: 0 bytes");
        }
    }
}
