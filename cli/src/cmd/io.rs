//! `oxcow io`: qemu-io's command language over an opened image.
//!
//! Output lines, pattern checks and the exit status follow qemu-io: a
//! command that fails prints its message and the run ends with status 1,
//! but later commands still run.

use crate::error::{CliError, CliResult};
use crate::util::{io_size, parse_format, parse_num};
use oxcow::{BlockDevice, CacheMode, Image, OpenOptions};
use std::io::{BufRead, Write};
use std::sync::Arc;
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
    /// AIO mode (threads, native, io_uring): accepted for qemu-io's sake;
    /// oxcow's I/O path is the same for all three.
    #[arg(short = 'i', long = "aio")]
    aio: Option<String>,
    /// Treat FILE as an option string (`driver=qcow2,file.filename=x`).
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// A command to run (repeatable); commands are read from stdin without any.
    #[arg(short = 'c', long = "cmd", allow_hyphen_values = true)]
    cmds: Vec<String>,
    /// Define an object (qemu's TYPE,id=ID,...), e.g. tls-creds-x509 for
    /// --image-opts driver=nbd,...,tls-creds=ID.
    #[arg(long = "object", value_name = "TYPE,id=ID,...")]
    objects: Vec<String>,
    /// Image file (or `open` it with a command).
    file: Option<String>,
}

/// How an image is opened: the command line's flags, which `open`'s own
/// flags start from.
#[derive(Clone)]
struct OpenCfg {
    format: Option<oxcow::Format>,
    read_only: bool,
    copy_on_read: bool,
    cache: CacheMode,
    force_share: bool,
    unmap: bool,
    snapshot: Option<String>,
    /// The `--object`s, for `--image-opts` names that refer to them.
    objects: Arc<crate::object::Objects>,
    /// `backing.driver`: the backing file's format, overriding the image's.
    backing_driver: Option<oxcow::Format>,
    /// Error-injection rules of a blkdebug layer over the image's file.
    blkdebug: Option<oxcow::storage::BlkdebugRules>,
    /// Zero-write limits of a blkdebug node above the format.
    zero_limits: super::io_limits::ZeroLimits,
    /// Named by an option string alone (`--image-opts`, `open -o` without
    /// a file name): qemu-io's open errors then name no device.
    unnamed: bool,
    /// Copy-on-read asked for by QEMU's `copy-on-read` filter driver
    /// rather than `-C` (which only changes the words of a refusal).
    cor_filter: bool,
    /// `data-file.*`: the external data file instead of the image's own,
    /// and blkdebug rules over it.
    data_file: Option<String>,
    data_file_blkdebug: Option<oxcow::storage::BlkdebugRules>,
    /// The `json:` name the image was opened by: qemu-io's open errors
    /// name the device so.
    json_name: Option<String>,
    /// qcow2 cache options of `open -o`, for the image named beside them.
    qcow2_cache: oxcow::qcow2::CacheOptions,
    /// `file.driver=FORMAT`: the file is itself an image of that format.
    file_format: Option<oxcow::Format>,
    /// `backing=null` (or empty): the backing chain stays closed.
    no_backing: bool,
    /// A protocol driver named as the top node (`driver=file`,
    /// `host_device`, `host_cdrom`): its file-type check applies.
    protocol: Option<String>,
    /// `locking=off|on|auto`.
    locking: Option<bool>,
    /// `detect-zeroes`: all-zero writes become zero writes.
    detect_zeroes: super::io_zeroes::DetectZeroes,
    /// An option value QEMU refuses only when it opens the image (its
    /// refusal then reads as an open failure).
    bad_open_option: Option<String>,
    /// Node names given at open (`node-name`, `file.node-name`,
    /// `backing.node-name`): a reopen may repeat them, not change them.
    node_names: Vec<(String, String)>,
    /// The qcow2 runtime options set by reopens, merged as QEMU merges
    /// them (`io_reopen.rs`).
    runtime: Vec<(String, String)>,
    /// qcow2 `lazy-refcounts` (open or reopen option; `None`: as the
    /// header says).
    lazy_refcounts: Option<bool>,
}

/// The open image, with the device commands go to (a snapshot's, or the
/// image's own).
struct Opened {
    img: Image,
    snap: Option<Arc<dyn BlockDevice>>,
    unmap: bool,
    read_only: bool,
    path: String,
    /// What it was opened with, for `reopen`.
    cfg: OpenCfg,
    /// Requests in flight and blkdebug breakpoints.
    aio: super::io_aio::Aio,
}

impl Opened {
    fn dev(&self) -> &dyn BlockDevice {
        match &self.snap {
            Some(d) => &**d,
            None => &**self.img.device(),
        }
    }
}

fn parse_cache(c: &str) -> CliResult<CacheMode> {
    c.parse::<CacheMode>().map_err(|_| CliError::new(format!("Invalid cache option: {c}")))
}

fn parse_discard(d: &str) -> CliResult<bool> {
    match d {
        "ignore" | "off" => Ok(false),
        "unmap" | "on" => Ok(true),
        other => Err(CliError::new(format!("Invalid discard option: {other}"))),
    }
}

/// Request-size limits that QEMU's blkdebug and file drivers take: they
/// change how requests are split, never what they read or write.
const LIMIT_KEYS: &[&str] =
    &["align", "max-transfer", "opt-write-zero", "max-write-zero", "opt-discard", "max-discard", "request-alignment"];

/// A `json:{...}` name opens what its option tree says, as with
/// `--image-opts`; any other name is a file name.
fn json_name(name: &str, cfg: &mut OpenCfg) -> CliResult<String> {
    match crate::image_opts::json_spec(name) {
        None => Ok(name.to_string()),
        Some(spec) => {
            cfg.json_name = Some(name.to_string());
            image_opts(&spec?, cfg)?.ok_or_else(|| CliError::new("A block device must be specified by filename"))
        }
    }
}

/// `--image-opts` / `open -o`: the driver and file name out of qemu's
/// option string; other keys are refused rather than silently dropped.
/// A blkdebug layer that only sets request limits passes straight through
/// to its image.
fn image_opts(spec: &str, cfg: &mut OpenCfg) -> CliResult<Option<String>> {
    let opts = oxcow::options::split_options(spec);
    if opts.iter().any(|(k, v)| {
        ((k == "driver" || k == "file.driver") && matches!(v.as_str(), "nbd" | "null-co" | "null-aio"))
            || k.ends_with("key-secret")
    }) {
        // NBD keys (server.*, export, tls-creds) become an NBD location,
        // null-co's a null one; a key secret is registered for the file
        // it opens.
        let (format, name) = crate::image_opts::resolve(spec, &cfg.objects)?;
        cfg.format = parse_format(format.as_deref())?;
        return Ok(Some(name));
    }
    let mut file = None;
    let mut rules = Vec::new();
    let mut blkdebug = Vec::new();
    let mut qcow2_cache = oxcow::qcow2::CacheOptions::default();
    let mut data_file = Vec::new();
    let mut ignore_journal = false;
    for (k, v) in copy_on_read_filter(opts, cfg) {
        if let Some(sub) = k.strip_prefix("data-file.") {
            data_file.push((sub.to_string(), v));
            continue;
        }
        let last = k.rsplit('.').next().unwrap_or(&k);
        if qcow2_cache.set(&k, &v).map_err(|e| CliError::new(crate::error::message(&e)))? {
            continue;
        }
        // blkdebug's own keys, on the format's file or on the top node.
        let bk = k.strip_prefix("file.").unwrap_or(&k);
        if bk.starts_with("inject-error.") || bk.starts_with("set-state.") {
            blkdebug.push((bk.to_string(), v));
            continue;
        }
        if bk == "config" {
            let r = oxcow::storage::BlkdebugRules::from_config_file(&v).map_err(|e| CliError::new(e.0))?;
            rules.extend(r.0);
            continue;
        }
        match k.as_str() {
            "driver" if matches!(v.as_str(), "file" | "host_device" | "host_cdrom") => {
                // A protocol alone: the bytes as they are, never probed.
                cfg.format = Some(oxcow::Format::Raw);
                cfg.protocol = Some(v);
            }
            "driver" | "image.driver" if v == "blkdebug" || v == "file" => {}
            "locking" | "file.locking" => {
                cfg.locking = match v.as_str() {
                    "auto" => None,
                    _ => Some(crate::util::parse_bool(&k, &v)?),
                }
            }
            "driver" | "image.driver" => cfg.format = parse_format(Some(&v))?,
            "backing.driver" => cfg.backing_driver = parse_format(Some(&v))?,
            "file.driver" | "file.image.driver" | "image.file.driver" if v == "file" || v == "blkdebug" => {}
            "file.driver" => cfg.file_format = parse_format(Some(&v))?,
            "file.file.driver" if v == "file" => {}
            "file.file.filename" => file = Some(v),
            "backing" if v == "null" || v.is_empty() => cfg.no_backing = true,
            "file.filename"
            | "filename"
            | "file"
            | "image.filename"
            | "file.image.filename"
            | "image.file.filename" => file = Some(v),
            "read-only" => cfg.read_only = crate::util::parse_bool(&k, &v)?,
            "cache.direct" if crate::util::parse_bool(&k, &v)? => cfg.cache = CacheMode::None,
            "cache.direct" | "cache.no-flush" => {}
            "discard" => cfg.unmap = parse_discard(&v)?,
            "node-name" | "file.node-name" | "backing.node-name" => cfg.node_names.push((k.clone(), v)),
            "detect-zeroes" => match super::io_zeroes::DetectZeroes::parse(&v) {
                Some(d) => cfg.detect_zeroes = d,
                None => cfg.bad_open_option = Some(super::io_zeroes::DetectZeroes::refusal(&v)),
            },
            "force-share" => cfg.force_share = crate::util::parse_bool(&k, &v)?,
            // qcow2's runtime flags, refused as QEMU refuses them: when it
            // opens the image. Only lazy-refcounts has an effect (oxcow
            // always checks for overlaps and decides discards itself).
            _ if super::io_reopen::is_flag(&k) => match super::io_reopen::check_flag(&k, &v) {
                Err(e) => cfg.bad_open_option = Some(e.msg),
                Ok(()) if k == "lazy-refcounts" => cfg.lazy_refcounts = crate::util::parse_bool(&k, &v).ok(),
                Ok(()) => {}
            },
            crate::qcow2_cache_opts::IGNORE_JOURNAL_KEY => ignore_journal = crate::util::parse_bool(&k, &v)?,
            _ if cfg.zero_limits.take(&k, &v) => {}
            _ if LIMIT_KEYS.contains(&last) => {}
            _ => return Err(CliError::new(format!("Unsupported image option '{k}'"))),
        }
    }
    rules.extend(
        oxcow::storage::parse_blkdebug_options(blkdebug.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .map_err(|e| CliError::new(e.0))?,
    );
    if !rules.is_empty() {
        cfg.blkdebug = Some(oxcow::storage::BlkdebugRules(rules));
    }
    if !data_file.is_empty() {
        data_file_opts(data_file, cfg)?;
    }
    if let Some(f) = &file {
        crate::qcow2_cache_opts::remember(f, qcow2_cache);
        if ignore_journal {
            crate::qcow2_cache_opts::remember_ignore_journal(f);
        }
    }
    cfg.qcow2_cache = qcow2_cache;
    Ok(file)
}

/// QEMU's file-type check of a protocol driver named explicitly: `file`
/// takes regular files only, `host_device`/`host_cdrom` character or
/// block devices only. A directory opened for writing fails earlier, at
/// the open itself, as QEMU's does.
fn protocol_refuses(driver: &str, path: &str, write: bool) -> Option<String> {
    use std::os::unix::fs::FileTypeExt;
    let t = std::fs::metadata(path).ok()?.file_type();
    if write && t.is_dir() {
        return None;
    }
    match driver {
        "file" if !t.is_file() => Some(format!("'file' driver requires '{path}' to be a regular file")),
        "host_device" | "host_cdrom" if !t.is_char_device() && !t.is_block_device() => {
            Some(format!("'{driver}' driver requires '{path}' to be either a character or block device"))
        }
        _ => None,
    }
}

/// QEMU's `data-file` option tree: a file, a `null-co` node, or either
/// under `raw` and `blkdebug` nodes (whose rules then act on the data
/// file's requests).
fn data_file_opts(opts: Vec<(String, String)>, cfg: &mut OpenCfg) -> CliResult<()> {
    let mut name = None;
    let mut null = false;
    let mut size = None;
    let mut rules = Vec::new();
    let mut blkdebug = Vec::new();
    for (k, v) in opts {
        // The nodes between the format and the file: raw's `file`,
        // blkdebug's `image`.
        let mut key = k.as_str();
        while let Some(sub) = key.strip_prefix("file.").or_else(|| key.strip_prefix("image.")) {
            key = sub;
        }
        match key {
            "driver" if v == "null-co" || v == "null-aio" => null = true,
            "driver" if matches!(v.as_str(), "raw" | "file" | "blkdebug") => {}
            "filename" => name = Some(v),
            "size" if null => size = Some(v),
            "config" => {
                let r = oxcow::storage::BlkdebugRules::from_config_file(&v).map_err(|e| CliError::new(e.0))?;
                rules.extend(r.0);
            }
            _ if key.starts_with("inject-error.") || key.starts_with("set-state.") => {
                blkdebug.push((key.to_string(), v))
            }
            _ if LIMIT_KEYS.contains(&key) => {}
            _ => return Err(CliError::new(format!("Unsupported image option 'data-file.{k}'"))),
        }
    }
    if null {
        let size = match size {
            Some(v) => {
                parse_num(&v).ok_or_else(|| CliError::new(format!("Parameter 'size' expects a size, got '{v}'")))?
            }
            None => oxcow::storage::NULL_DEFAULT_SIZE,
        };
        name = Some(oxcow::storage::NullStorage::name(size));
    }
    rules.extend(
        oxcow::storage::parse_blkdebug_options(blkdebug.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .map_err(|e| CliError::new(e.0))?,
    );
    if !rules.is_empty() {
        cfg.data_file_blkdebug = Some(oxcow::storage::BlkdebugRules(rules));
    }
    cfg.data_file = name;
    Ok(())
}

/// QEMU's `copy-on-read` filter over a node (`driver=copy-on-read,
/// file.driver=qcow2,...`) is oxcow's copy-on-read of that node: the
/// filter's keys go, its child's keys lose their `file.`.
fn copy_on_read_filter(opts: Vec<(String, String)>, cfg: &mut OpenCfg) -> Vec<(String, String)> {
    if !opts.iter().any(|(k, v)| k == "driver" && v == "copy-on-read") {
        return opts;
    }
    cfg.copy_on_read = true;
    cfg.cor_filter = true;
    opts.into_iter()
        .filter(|(k, _)| k != "driver")
        .map(|(k, v)| match k.strip_prefix("file.") {
            Some(sub) => (sub.to_string(), v),
            None => (k, v),
        })
        .collect()
}

fn open_image(path: &str, cfg: &OpenCfg) -> CliResult<Opened> {
    let write = !cfg.read_only && cfg.snapshot.is_none();
    if cfg.copy_on_read && !write && crate::dropin::active() {
        // QEMU refuses in the block layer's words (the filter needs a
        // writable child) or in -C's.
        let what =
            if cfg.cor_filter { "Block node is read-only" } else { "Can't use copy-on-read on read-only device" };
        let shown = cfg.json_name.as_deref().unwrap_or(path);
        let dev = if cfg.unnamed { String::new() } else { format!(" device {shown}") };
        return Err(CliError::new(format!("can't open{dev}: {what}")));
    }
    if let Some(what) = &cfg.bad_open_option {
        let shown = cfg.json_name.as_deref().unwrap_or(path);
        let dev = if cfg.unnamed { String::new() } else { format!(" device {shown}") };
        return Err(CliError::new(format!("can't open{dev}: {what}")));
    }
    if cfg.force_share && write {
        return Err(CliError::new(format!(
            "can't open device {path}: force-share=on can only be used with read-only images"
        )));
    }
    let aio = super::io_aio::Aio::default();
    let opts = OpenOptions::default()
        .format(cfg.format)
        .write(write)
        .cache(cfg.cache)
        .force_share(cfg.force_share)
        .copy_on_read(cfg.copy_on_read)
        .backing_driver(cfg.backing_driver)
        .blkdebug(cfg.blkdebug.clone())
        .blkdebug_breaks(aio.breaks.clone())
        .data_file(cfg.data_file.as_ref().map(std::path::PathBuf::from))
        .data_file_blkdebug(cfg.data_file_blkdebug.clone())
        .no_backing(cfg.no_backing)
        .allow_network_backing(cfg.copy_on_read);
    let opts = match cfg.file_format {
        Some(f) => opts.file_format(f),
        None => opts,
    };
    let opts = crate::object::secret::with_key(path, crate::util::with_network_permission(&opts));
    let mut opts = crate::qcow2_cache_opts::with_cache(path, opts);
    if cfg.qcow2_cache.is_set() {
        opts.qcow2_cache = cfg.qcow2_cache;
    }
    if let Some(l) = cfg.locking {
        opts.locking = l;
    }
    if cfg.lazy_refcounts.is_some() {
        opts.qcow2_lazy_refcounts = cfg.lazy_refcounts;
    }
    if let Some(p) = &cfg.protocol {
        if let Some(refused) = protocol_refuses(p, path, write) {
            let what = if cfg.unnamed { String::new() } else { format!(" device {path}") };
            return Err(CliError::new(format!("can't open{what}: {refused}")));
        }
    }
    let img = oxcow::open(path, &opts).map_err(|e| {
        let shown = cfg.json_name.as_deref().unwrap_or(path);
        let what = if cfg.unnamed { String::new() } else { format!(" device {shown}") };
        CliError::new(format!("can't open{what}: {}", crate::error::message(&e)))
    })?;
    crate::util::report_dirty_repair(path, &img);
    crate::util::warn_if_probed_raw(path, &img, write);
    let snap = match &cfg.snapshot {
        Some(name) => {
            let q = img.qcow2().ok_or_else(|| CliError::new("this image format does not support snapshots"))?;
            Some(q.snapshot_device(name).map_err(|e| {
                CliError::new(format!("Failed to load snapshot '{name}': {}", crate::error::message(&e)))
            })?)
        }
        None => None,
    };
    Ok(Opened { img, snap, unmap: cfg.unmap, read_only: !write, path: path.to_string(), cfg: cfg.clone(), aio })
}

/// The state commands run in: the open image, if any, and the flags a
/// later `open` starts from.
struct Session {
    cfg: OpenCfg,
    open: Option<Opened>,
}

impl Session {
    /// Ends what is in flight on the open image and prints it (see
    /// `io_aio`); `release` frees stopped requests first.
    fn drain(&self, out: &mut dyn Write, release: bool) -> bool {
        self.open.as_ref().is_none_or(|o| o.aio.drain(out, release))
    }

    fn close(&mut self) -> bool {
        match self.open.take() {
            Some(o) => match o.img.close() {
                Ok(()) => true,
                // QEMU's qcow2 driver writes back both of its caches on
                // close, each followed by a flush, and reports each
                // failure; the run's status stays as the commands left it.
                Err(e) if crate::dropin::active() && e.is_io() && o.img.qcow2().is_some() => {
                    let m = crate::error::request_message(&e);
                    for cache in ["L2 table", "refcount block"] {
                        eprintln!("{}: Failed to flush the {cache} cache: {m}", crate::dropin::prog());
                    }
                    true
                }
                Err(e) => {
                    eprintln!("{}: closing {}: {}", crate::dropin::prog(), o.path, crate::error::message(&e));
                    false
                }
            },
            None => true,
        }
    }
}

pub fn run(a: Args) -> CliResult<i32> {
    let mut cfg = OpenCfg {
        // null-co is a driver of its own name, whose options (a `json:`
        // name) say the rest.
        format: match a.format.as_deref() {
            Some("null-co" | "null-aio") => None,
            f => parse_format(f)?,
        },
        read_only: a.read_only,
        copy_on_read: a.copy_on_read,
        cache: match &a.cache {
            Some(c) => parse_cache(c)?,
            None if a.nocache => CacheMode::None,
            // qemu-io's default: each write durable before the next command.
            None => CacheMode::Writethrough,
        },
        force_share: a.force_share,
        unmap: parse_discard(&a.discard)?,
        snapshot: a.snapshot.clone(),
        objects: Arc::new(crate::object::Objects::parse(&a.objects)?),
        backing_driver: None,
        blkdebug: None,
        zero_limits: Default::default(),
        unnamed: false,
        cor_filter: false,
        data_file: None,
        data_file_blkdebug: None,
        json_name: None,
        qcow2_cache: Default::default(),
        file_format: None,
        no_backing: false,
        protocol: None,
        locking: None,
        detect_zeroes: Default::default(),
        bad_open_option: None,
        node_names: Vec::new(),
        runtime: Vec::new(),
        lazy_refcounts: None,
    };
    if let Some(m) = &a.aio {
        if !matches!(m.as_str(), "threads" | "native" | "io_uring") {
            return Err(CliError::new(format!("Invalid aio option: {m}")));
        }
    }
    let mut session = Session { cfg: cfg.clone(), open: None };
    if let Some(f) = &a.file {
        cfg.unnamed = a.image_opts;
        let path = if a.image_opts {
            image_opts(f, &mut cfg)?.ok_or_else(|| CliError::new("A block device must be specified by filename"))?
        } else {
            json_name(f, &mut cfg)?
        };
        session.open = Some(open_image(&path, &cfg)?);
    }
    let mut failed = false;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if a.cmds.is_empty() {
        // qemu-io prompts for each command, on a terminal or not.
        let prompt = format!("{}> ", crate::dropin::prog());
        let mut lines = std::io::stdin().lock().lines();
        loop {
            let _ = write!(out, "{prompt}");
            let _ = out.flush();
            let Some(line) = lines.next() else { break };
            let line =
                line.map_err(|e| CliError::new(format!("reading commands: {}", crate::error::os_message(&e))))?;
            match run_line(&mut session, &line, &mut out) {
                Flow::Quit => break,
                Flow::Done(ok) => failed |= !ok,
            }
        }
    } else {
        for c in &a.cmds {
            match run_line(&mut session, c, &mut out) {
                Flow::Quit => break,
                Flow::Done(ok) => failed |= !ok,
            }
        }
    }
    failed |= !session.drain(&mut out, true);
    let _ = out.flush();
    failed |= !session.close();
    Ok(i32::from(failed))
}

enum Flow {
    Done(bool),
    Quit,
}

fn run_line(s: &mut Session, line: &str, out: &mut dyn Write) -> Flow {
    let words: Vec<&str> = line.split_whitespace().collect();
    let Some(&typed) = words.first() else { return Flow::Done(true) };
    let cmd = canonical(typed);
    match cmd {
        "quit" => return Flow::Quit,
        "open" => {
            if !arg_count("open", typed, words.len() - 1) {
                return Flow::Done(false);
            }
            return Flow::Done(cmd_open(s, &words[1..], out));
        }
        "close" => {
            if !arg_count("close", typed, words.len() - 1) {
                return Flow::Done(false);
            }
            if s.open.is_none() {
                return Flow::Done(true);
            }
            let drained = s.drain(out, true);
            return Flow::Done(s.close() && drained);
        }
        "help" => {
            help(out, words.get(1).copied());
            return Flow::Done(true);
        }
        "sleep" => {
            let ms = words.get(1).and_then(|w| parse_num(w));
            return match ms {
                Some(ms) => {
                    std::thread::sleep(Duration::from_millis(ms));
                    Flow::Done(true)
                }
                None => {
                    eprintln!("sleep: invalid argument");
                    Flow::Done(false)
                }
            };
        }
        "abort" => std::process::abort(),
        "sigraise" => {
            if !arg_count("sigraise", typed, words.len() - 1) {
                return Flow::Done(false);
            }
            let Ok(n) = num(out, words[1]) else { return Flow::Done(false) };
            let Some(sig) = i32::try_from(n).ok().filter(|&s| s <= libc::SIGRTMAX()) else {
                let _ = writeln!(out, "signal argument '{}' is too large to be a valid signal", words[1]);
                return Flow::Done(false);
            };
            // What was printed so far must be out before the signal ends us.
            let _ = out.flush();
            return Flow::Done(signal_hook::low_level::raise(sig).is_ok());
        }
        _ => {}
    }
    if matches!(cmd, "reopen") {
        let drained = s.drain(out, true);
        return Flow::Done(cmd_reopen(s, &words[1..], out) && drained);
    }
    let Some(o) = s.open.as_ref() else {
        if !known(cmd) {
            eprintln!("command \"{cmd}\" not found");
        } else {
            eprintln!("no file open, try 'help open'");
        }
        return Flow::Done(false);
    };
    // Commands that need write permission are refused up front on a
    // read-only node, in the block layer's words.
    if matches!(cmd, "write" | "writev" | "aio_write" | "discard" | "truncate") && o.read_only {
        eprintln!("{}: Block node is read-only", crate::dropin::prog());
        return Flow::Done(false);
    }
    if matches!(cmd, "break" | "wait_break" | "resume" | "remove_break") {
        if !arg_count(cmd, typed, words.len() - 1) {
            return Flow::Done(false);
        }
        return Flow::Done(o.aio.debug_command(cmd, &words[1..], out));
    }
    let drained = !matches!(cmd, "aio_flush" | "flush") || o.aio.drain(out, false);
    // A command that stopped early has already said why.
    let limits = o.cfg.zero_limits;
    let detect = o.cfg.detect_zeroes;
    let plain = !limits.active() && detect == super::io_zeroes::DetectZeroes::Off;
    if matches!(cmd, "aio_read" | "aio_write") && o.aio.threaded() && plain {
        let dev = o.snap.clone().unwrap_or_else(|| o.img.device().clone());
        return Flow::Done(o.aio.start(dev, cmd, &words[1..], out).unwrap_or(false));
    }
    let limited = super::io_limits::Limited { dev: o.dev(), limits };
    let dev: &dyn BlockDevice = if limits.active() { &limited } else { o.dev() };
    let detecting = super::io_zeroes::Detecting { dev, mode: detect, discard_unmap: o.unmap };
    let dev: &dyn BlockDevice = if detect == super::io_zeroes::DetectZeroes::Off { dev } else { &detecting };
    let r = exec(&o.img, dev, o.unmap, &words, out);
    Flow::Done(r.unwrap_or(false) && drained)
}

/// `reopen [(-r|-w)] [-c cache] [-o options]`: the same file again with
/// changed flags; oxcow closes and opens it, which a qemu-io user cannot
/// tell apart.
fn cmd_reopen(s: &mut Session, args: &[&str], out: &mut dyn Write) -> bool {
    let prog = crate::dropin::prog();
    let Some(cur) = s.open.as_ref() else {
        eprintln!("no file open, try 'help open'");
        return false;
    };
    let o = match getopt(args, "c:o:rw") {
        Ok(o) => o,
        Err(c) => {
            eprintln!("reopen: invalid option -- '{c}'");
            usage(out, "reopen");
            return false;
        }
    };
    if !o.rest.is_empty() {
        usage(out, "reopen");
        return false;
    }
    let mut cfg = cur.cfg.clone();
    let path = cur.path.clone();
    if o.has('r') && o.has('w') {
        eprintln!("{prog}: Only one -r/-w option may be given");
        return false;
    }
    let r = reopen_cfg(cur, &o, &mut cfg);
    if let Err(e) = r {
        eprintln!("{prog}: {}", e.msg);
        return false;
    }
    if o.has('r') {
        cfg.read_only = true;
    }
    if o.has('w') {
        cfg.read_only = false;
    }
    let old = cur.cfg.clone();
    if !s.close() {
        return false;
    }
    match open_image(&path, &cfg) {
        Ok(op) => {
            s.open = Some(op);
            true
        }
        Err(e) => {
            eprintln!("{prog}: {}", e.msg);
            // QEMU's reopen is a transaction: a refused one leaves the
            // image open as it was.
            s.open = open_image(&path, &old).ok();
            false
        }
    }
}

/// The open settings `reopen`'s flags and `-o` options ask for, checked
/// in QEMU's order and words before anything is let go.
fn reopen_cfg(cur: &Opened, o: &Opts<'_>, cfg: &mut OpenCfg) -> CliResult<()> {
    let opts = o.value('o').map(oxcow::options::split_options).unwrap_or_default();
    let given = |key: &str| opts.iter().any(|(k, _)| k == key);
    if given("read-only") && (o.has('r') || o.has('w')) {
        return Err(CliError::new("Cannot set both -r/-w and 'read-only'"));
    }
    if (given("cache.direct") || given("cache.no-flush")) && o.has('c') {
        return Err(CliError::new("Cannot set both -c and the cache options"));
    }
    if let Some(c) = o.value('c') {
        cfg.cache = parse_cache(c)?;
    }
    let writethrough = matches!(cfg.cache, CacheMode::Writethrough | CacheMode::Directsync);
    let mut direct = matches!(cfg.cache, CacheMode::None | CacheMode::Directsync);
    let mut no_flush = cfg.cache == CacheMode::Unsafe;
    let mut runtime = Vec::new();
    let unchanged = |key: &str, now: Option<&str>, v: &str| match now == Some(v) {
        true => Ok(()),
        false => Err(CliError::new(format!("Cannot change the option '{key}'"))),
    };
    for (k, v) in &opts {
        let bool_of = || crate::util::parse_bool(k, v);
        match k.as_str() {
            "read-only" => cfg.read_only = bool_of()?,
            "force-share" => cfg.force_share = bool_of()?,
            "auto-read-only" => drop(bool_of()?),
            "cache.direct" => direct = bool_of()?,
            "cache.no-flush" => no_flush = bool_of()?,
            "node-name" | "file.node-name" | "backing.node-name" => {
                let now = cfg.node_names.iter().rev().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
                unchanged("node-name", now, v)?
            }
            "driver" => unchanged("driver", Some(cur.img.device().format_name()), v)?,
            "file.driver" => unchanged("driver", Some("file"), v)?,
            "backing.driver" => unchanged("driver", cur.img.device().backing().map(|b| b.format_name()), v)?,
            _ if super::io_reopen::is_runtime(k) && cur.img.qcow2().is_some() => runtime.push((k.clone(), v.clone())),
            other => return Err(CliError::new(format!("Cannot change the option '{other}'"))),
        }
    }
    if given("cache.direct") || given("cache.no-flush") {
        cfg.cache = match (no_flush, direct, writethrough) {
            (true, _, _) => CacheMode::Unsafe,
            (false, true, true) => CacheMode::Directsync,
            (false, true, false) => CacheMode::None,
            (false, false, true) => CacheMode::Writethrough,
            (false, false, false) => CacheMode::Writeback,
        };
    }
    if let (Some(q), false) = (cur.img.qcow2(), runtime.is_empty() && cfg.runtime.is_empty()) {
        let merged = super::io_reopen::join(&cfg.runtime, &runtime);
        let extended = q.header().extended_l2();
        cfg.qcow2_cache = super::io_reopen::check(&merged, q.len(), q.cluster_size(), extended)?;
        if let Some(lazy) = super::io_reopen::lazy_refcounts(&merged, q.header().version)? {
            cfg.lazy_refcounts = Some(lazy);
        }
        cfg.runtime = merged;
    }
    Ok(())
}

/// `open [-rsCnkU] [-t cache] [-d discard] [-o options] [path]`.
fn cmd_open(s: &mut Session, args: &[&str], out: &mut dyn Write) -> bool {
    let prog = crate::dropin::prog();
    if s.open.is_some() {
        eprintln!("{prog}: file open already, try 'help close'");
        return false;
    }
    let o = match getopt(args, "rsCnkUt:d:o:") {
        Ok(o) => o,
        Err(c) => {
            eprintln!("open: invalid option -- '{c}'");
            usage(out, "open");
            return false;
        }
    };
    if o.rest.len() > 1 {
        usage(out, "open");
        return false;
    }
    let mut cfg = s.cfg.clone();
    let r: CliResult<Opened> = (|| {
        for (c, v) in &o.flags {
            match (c, v) {
                ('r', _) => cfg.read_only = true,
                ('C', _) => cfg.copy_on_read = true,
                ('n', _) => cfg.cache = CacheMode::None,
                ('U', _) => cfg.force_share = true,
                ('t', Some(v)) => cfg.cache = parse_cache(v)?,
                ('d', Some(v)) => cfg.unmap = parse_discard(v)?,
                ('s', _) => return Err(CliError::new("open -s (temporary snapshot) is not supported by oxcow")),
                _ => {}
            }
        }
        let mut path = match o.rest.first() {
            Some(p) => Some(json_name(p, &mut cfg)?),
            None => None,
        };
        cfg.unnamed = path.is_none();
        if let Some(spec) = o.value('o') {
            if let Some(f) = image_opts(spec, &mut cfg)? {
                path = Some(f);
            }
        }
        let path = path.ok_or_else(|| CliError::new("A block device must be specified by filename"))?;
        open_image(&path, &cfg)
    })();
    match r {
        Ok(op) => {
            s.open = Some(op);
            true
        }
        Err(e) => {
            eprintln!("{prog}: {}", e.msg);
            false
        }
    }
}

/// A command failed after reporting why.
#[derive(Debug)]
pub(super) struct Stop;

/// Minimal getopt: `spec` lists option letters, a trailing `:` marks those
/// taking a value. Options end at the first non-option word.
pub(super) struct Opts<'a> {
    flags: Vec<(char, Option<&'a str>)>,
    pub(super) rest: Vec<&'a str>,
}

pub(super) fn getopt<'a>(words: &[&'a str], spec: &str) -> Result<Opts<'a>, char> {
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
    pub(super) fn has(&self, c: char) -> bool {
        self.flags.iter().any(|f| f.0 == c)
    }
    pub(super) fn value(&self, c: char) -> Option<&str> {
        self.flags.iter().rev().find(|f| f.0 == c).and_then(|f| f.1)
    }
}

/// Each command: name, usage line, fewest and most arguments (None: no limit).
const USAGE: &[(&str, &str, usize, Option<usize>)] = &[
    ("abort", "abort -- simulate a program crash using abort(3)", 0, Some(0)),
    ("aio_flush", "aio_flush -- completes all outstanding aio requests", 0, Some(0)),
    ("aio_read", "aio_read [-Ciqrv] [-P pattern] off len [len..] -- asynchronously reads a number of bytes", 2, None),
    (
        "aio_write",
        "aio_write [-Cfiqruz] [-P pattern] off len [len..] -- asynchronously writes a number of bytes",
        2,
        None,
    ),
    ("alloc", "alloc offset [count] -- checks if offset is allocated in the file", 1, Some(2)),
    ("break", "break event tag -- sets a breakpoint on event and tags the stopped request as tag", 2, Some(2)),
    ("close", "close -- close the current open file", 0, Some(0)),
    ("discard", "discard [-Cq] off len -- discards a number of bytes at a specified offset", 2, None),
    ("flush", "flush -- flush all in-core file state to disk", 0, Some(0)),
    ("help", "help [command] -- help for one or all commands", 0, Some(1)),
    ("info", "info -- prints information about the current file", 0, Some(0)),
    ("length", "length -- gets the length of the current file", 0, Some(0)),
    ("map", "map  -- prints the allocated areas of a file", 0, Some(0)),
    ("open", "open [-rsCnkU] [-t cache] [-d discard] [-o options] [path] -- open the file specified by path", 1, None),
    ("quit", "quit -- exit the program", 0, Some(0)),
    ("reopen", "reopen [(-r|-w)] [-c cache] [-o options] -- reopens an image with new options", 0, None),
    (
        "read",
        "read [-abCqrv] [-P pattern [-s off] [-l len]] off len -- reads a number of bytes at a specified offset",
        2,
        None,
    ),
    ("readv", "readv [-Cqrv] [-P pattern] off len [len..] -- reads a number of bytes at a specified offset", 2, None),
    ("remove_break", "remove_break tag -- remove a breakpoint by tag", 1, Some(1)),
    ("resume", "resume tag -- resumes the request tagged as tag", 1, Some(1)),
    ("sigraise", "sigraise signal -- raises a signal", 1, Some(1)),
    ("sleep", "sleep -- waits for the given value in milliseconds", 1, Some(1)),
    ("truncate", "truncate [-m prealloc_mode] off -- truncates the current file at the given offset", 1, Some(3)),
    ("wait_break", "wait_break tag -- waits for the suspension of a request", 1, Some(1)),
    (
        "write",
        "write [-bcCfnqruz] [-P pattern | -s source_file] off len -- writes a number of bytes at a specified offset",
        2,
        None,
    ),
    (
        "writev",
        "writev [-Cfqr] [-P pattern] off len [len..] -- writes a number of bytes at a specified offset",
        2,
        None,
    ),
];

fn known(cmd: &str) -> bool {
    USAGE.iter().any(|u| u.0 == cmd)
}

pub(super) fn usage(out: &mut dyn Write, cmd: &str) {
    if let Some(u) = USAGE.iter().find(|u| u.0 == cmd) {
        let _ = writeln!(out, "{}", u.1);
    }
}

fn help(out: &mut dyn Write, cmd: Option<&str>) {
    match cmd {
        Some(c) if known(c) => usage(out, c),
        Some(c) => {
            eprintln!("command {c} not found");
        }
        None => {
            for u in USAGE {
                let _ = writeln!(out, "{}", u.1);
            }
            let _ = writeln!(out, "\nUse 'help commandname' for extended help.");
        }
    }
}

/// Checks the argument count as qemu-io does, in its words.
/// qemu-io's one-letter names for its commands.
const ALIASES: &[(&str, &str)] = &[
    ("r", "read"),
    ("w", "write"),
    ("a", "alloc"),
    ("l", "length"),
    ("i", "info"),
    ("t", "truncate"),
    ("d", "discard"),
    ("o", "open"),
    ("c", "close"),
    ("q", "quit"),
    ("?", "help"),
    ("f", "flush"),
];

fn canonical(word: &str) -> &str {
    ALIASES.iter().find(|a| a.0 == word).map_or(word, |a| a.1)
}

/// `typed` is the name as given (messages quote it, alias or not).
fn arg_count(cmd: &str, typed: &str, n: usize) -> bool {
    let Some(&(_, _, min, max)) = USAGE.iter().find(|u| u.0 == cmd) else { return true };
    if n >= min && max.is_none_or(|m| n <= m) {
        return true;
    }
    let expected = match max {
        None => format!("at least {min}"),
        Some(m) if m == min => format!("{min}"),
        Some(m) => format!("between {min} and {m}"),
    };
    eprintln!("bad argument count {n} to {typed}, expected {expected} arguments");
    false
}

pub(super) fn num(out: &mut dyn Write, s: &str) -> Result<u64, Stop> {
    parse_num(s).ok_or_else(|| {
        let _ = writeln!(out, "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {s}");
        Stop
    })
}

/// qemu's largest single request.
const MAX_REQUEST: u64 = 2147483136;

pub(super) fn length(out: &mut dyn Write, s: &str, suffix: &str) -> Result<u64, Stop> {
    let n = num(out, s)?;
    if n > MAX_REQUEST {
        let _ = writeln!(out, "length cannot exceed {MAX_REQUEST}{suffix}, given {s}");
        return Err(Stop);
    }
    Ok(n)
}

pub(super) fn pattern(out: &mut dyn Write, s: &str) -> Result<u8, Stop> {
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

pub(super) fn report(out: &mut dyn Write, verb: &str, count: u64, offset: u64, elapsed: Duration) {
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

/// A request past the end of the device fails as the block layer fails
/// it, with EIO, before it reaches the image.
fn in_range(dev: &dyn BlockDevice, what: &str, off: u64, len: u64) -> Result<(), Stop> {
    if off.checked_add(len).is_some_and(|end| end <= dev.len()) {
        return Ok(());
    }
    println!("{what} failed: {}", crate::error::os_message(&std::io::Error::from_raw_os_error(libc::EIO)));
    Err(Stop)
}

/// qemu-io reports a failed request on stdout, where its result would go.
fn fail(what: &str, e: oxcow::Error) -> Stop {
    // QEMU's qcow2 driver says on stderr that it marks the image corrupt.
    if let Some(event) = oxcow::qcow2::corruption_event(&e).filter(|_| crate::dropin::active()) {
        eprintln!("qcow2: Marking image as corrupt: {event}; further corruption events will be suppressed");
    }
    println!("{what} failed: {}", crate::error::request_message(&e));
    Stop
}

/// Runs one command; Ok(false) means it ran but reported a failure.
fn exec(img: &Image, dev: &dyn BlockDevice, unmap: bool, words: &[&str], out: &mut dyn Write) -> Result<bool, Stop> {
    let typed = words[0];
    let cmd = canonical(typed);
    let args = &words[1..];
    let spec = match cmd {
        "read" => "P:vqCabprs:l:",
        "write" => "P:zuqCbcfnprs:",
        "readv" => "P:vqCr",
        "writev" => "P:qCfr",
        "aio_read" => "P:vqCir",
        "aio_write" => "P:zuqCfir",
        "discard" => "qC",
        "truncate" => "m:",
        "flush" | "aio_flush" | "length" | "map" | "info" | "alloc" => "",
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
    if !arg_count(cmd, typed, o.rest.len()) {
        return Err(Stop);
    }
    // These take any count past their least and check it themselves.
    let exact = match cmd {
        "read" | "write" | "discard" => Some(2),
        "truncate" => Some(1),
        _ => None,
    };
    if exact.is_some_and(|n| o.rest.len() != n) {
        usage(out, cmd);
        return Err(Stop);
    }
    match cmd {
        "readv" | "aio_read" => {
            let off = num(out, o.rest[0])?;
            let mut len = 0u64;
            for w in &o.rest[1..] {
                len += length(out, w, "")?;
            }
            if len > MAX_REQUEST {
                let _ = writeln!(out, "length cannot exceed {MAX_REQUEST}, given {len}");
                return Err(Stop);
            }
            let pat = o.value('P').map(|p| pattern(out, p)).transpose()?;
            in_range(dev, cmd, off, len)?;
            let mut buf = vec![0u8; usize::try_from(len).map_err(|_| Stop)?];
            let t = Instant::now();
            dev.read_at(&mut buf, off).map_err(|e| fail(cmd, e))?;
            let el = t.elapsed();
            let mut ok = true;
            if let Some(p) = pat {
                if buf.iter().any(|&b| b != p) {
                    let _ = writeln!(out, "Pattern verification failed at offset {off}, {len} bytes");
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
        "writev" | "aio_write" => {
            let off = num(out, o.rest[0])?;
            let mut len = 0u64;
            for w in &o.rest[1..] {
                len += length(out, w, "")?;
            }
            in_range(dev, cmd, off, len)?;
            let t = Instant::now();
            if o.has('z') {
                if o.has('P') {
                    let _ = writeln!(out, "-z and -P cannot be specified at the same time");
                    return Err(Stop);
                }
                dev.write_zeroes(off, len, o.has('u')).map_err(|e| fail(cmd, e))?;
            } else {
                let p = o.value('P').map(|p| pattern(out, p)).transpose()?.unwrap_or(0xcd);
                let buf = vec![p; usize::try_from(len).map_err(|_| Stop)?];
                dev.write_at(&buf, off).map_err(|e| fail(cmd, e))?;
            }
            if o.has('f') {
                dev.flush().map_err(|e| fail(cmd, e))?;
            }
            if !o.has('q') {
                report(out, "wrote", len, off, t.elapsed());
            }
            Ok(true)
        }
        "alloc" => {
            let off = num(out, o.rest[0])?;
            let count = match o.rest.get(1) {
                Some(c) => num(out, c)?,
                None => 512,
            };
            let end = off.saturating_add(count).min(dev.len());
            let mut pos = off;
            let mut allocated = 0u64;
            while pos < end {
                let st = dev.block_status(pos, end - pos).map_err(|e| fail("alloc", e))?;
                let n = st.length.max(1).min(end - pos);
                if st.allocated {
                    allocated += n;
                }
                pos += n;
            }
            let _ = writeln!(
                out,
                "{allocated}/{} bytes allocated at offset {}",
                end.saturating_sub(off),
                io_size(off as f64)
            );
            Ok(true)
        }
        "read" => {
            let off = num(out, o.rest[0])?;
            let len = length(out, o.rest[1], "")?;
            let pat = o.value('P').map(|p| pattern(out, p)).transpose()?;
            if o.has('b') {
                for (v, what) in [(off, "offset"), (len, "count")] {
                    if !v.is_multiple_of(512) {
                        let _ = writeln!(out, "{v} is not a sector-aligned value for '{what}'");
                        return Err(Stop);
                    }
                }
            } else {
                // The VM state area lies past the disk's end; the disk not.
                in_range(dev, "read", off, len)?;
            }
            let mut buf = vec![0u8; usize::try_from(len).map_err(|_| Stop)?];
            let t = Instant::now();
            if o.has('b') {
                super::io_vmstate::read(img, &mut buf, off).map_err(|e| fail("read", e))?;
            } else {
                dev.read_at(&mut buf, off).map_err(|e| fail("read", e))?;
            }
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
            // QEMU 10's checks, in its order and words. With -c, -z still
            // writes zeros (the compression flag does not apply to them).
            let refusal = if o.has('b') && zero {
                Some("-b and -z cannot be specified at the same time")
            } else if o.has('f') && (o.has('b') || o.has('c')) {
                Some("-f and -b or -c cannot be specified at the same time")
            } else if o.has('u') && !zero {
                Some("-u requires -z to be specified")
            } else if [zero, o.has('P'), o.has('s')].iter().filter(|&&f| f).count() > 1 {
                Some("Only one of -z, -P, and -s can be specified at the same time")
            } else {
                None
            };
            if let Some(r) = refusal {
                let _ = writeln!(out, "{r}");
                return Err(Stop);
            }
            if o.has('c') || o.has('b') {
                for (v, what) in [(off, "offset"), (len, "count")] {
                    if !v.is_multiple_of(512) {
                        let _ = writeln!(out, "{v} is not a sector-aligned value for '{what}'");
                        return Err(Stop);
                    }
                }
            }
            if !o.has('b') {
                in_range(dev, "write", off, len)?;
            }
            let t = Instant::now();
            if zero {
                dev.write_zeroes(off, len, o.has('u')).map_err(|e| fail("write", e))?;
            } else {
                let buf = match o.value('s') {
                    Some(f) => source_file(f, len)?,
                    None => {
                        let p = o.value('P').map(|p| pattern(out, p)).transpose()?.unwrap_or(0xcd);
                        vec![p; usize::try_from(len).map_err(|_| Stop)?]
                    }
                };
                if o.has('b') {
                    super::io_vmstate::write(img, &buf, off).map_err(|e| fail("write", e))?;
                } else if o.has('c') {
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
            in_range(dev, "discard", off, len)?;
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

/// `write -s FILE`: the request's bytes from the start of a file.
fn source_file(path: &str, len: u64) -> Result<Vec<u8>, Stop> {
    let data = std::fs::read(path).map_err(|e| {
        eprintln!("{}: Failed to open file '{path}': {}", crate::dropin::prog(), crate::error::os_message(&e));
        Stop
    })?;
    let n = usize::try_from(len).map_err(|_| Stop)?;
    if data.len() < n {
        eprintln!("{}: Failed to read file '{path}': file is shorter than the request", crate::dropin::prog());
        return Err(Stop);
    }
    Ok(data[..n].to_vec())
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
pub(super) fn dump(out: &mut dyn Write, buf: &[u8], base: u64) {
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

/// qemu-io's map: runs this layer decides versus runs falling through
/// to the backing chain (qemu-io asks the top layer only).
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
        let st = dev.block_status(pos, len - pos)?;
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
    let path = img.path().display().to_string();
    if oxcow::storage::NullStorage::from_name(&path).is_some() {
        // QEMU's null-co is its own format and protocol: qemu-io names it
        // twice and has nothing more to say about it.
        let _ = writeln!(out, "format name: null-co\nformat name: null-co");
        return;
    }
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
