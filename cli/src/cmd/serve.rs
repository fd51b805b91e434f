//! `oxcow serve`: export an image over NBD with qemu-nbd's flags.
//!
//! `--fork` re-runs this command as a child process and returns once the
//! child reports that it listens: the same effect as qemu-nbd's fork,
//! without unsafe process tricks.

use crate::error::{message, os_message, CliError, CliResult};
use crate::object::{Object, Objects};
use crate::util::{open_image, parse_format};
use oxcow::nbd::server::{DetectZeroes, DiscardMode, ExportConfig, NegotiationLog, ServeOptions, Server};
use oxcow::nbd::tls::TlsServer;
use oxcow::{CacheMode, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

/// Environment variable telling a forked child to report readiness.
const READY_ENV: &str = "OXCOW_SERVE_REPORT_READY";

#[derive(clap::Args)]
pub struct Args {
    /// Image format.
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Address to listen on (127.0.0.1 unless given: an export, without
    /// TLS, hands the whole disk to anyone who reaches the port).
    #[arg(short = 'b', long = "bind", default_value = "127.0.0.1")]
    bind: String,
    /// TCP port.
    #[arg(short = 'p', long = "port", default_value = "10809")]
    port: u16,
    /// Unix socket path (instead of TCP).
    #[arg(short = 'k', long = "socket")]
    socket: Option<String>,
    /// Export name.
    #[arg(short = 'x', long = "export-name", default_value = "")]
    name: String,
    /// Export description.
    #[arg(short = 'D', long = "description", default_value = "")]
    description: String,
    /// Export read-only.
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Keep serving after the last client disconnects.
    #[arg(short = 't', long = "persistent")]
    persistent: bool,
    /// Clients served at once.
    #[arg(short = 'e', long = "shared", default_value = "1")]
    shared: usize,
    /// Export an internal snapshot (read-only).
    #[arg(short = 'l', long = "load-snapshot")]
    snapshot: Option<String>,
    /// Offer the qemu:allocation-depth metadata context.
    #[arg(short = 'A', long = "allocation-depth")]
    allocation_depth: bool,
    /// Offer the persistent dirty bitmap NAME as the
    /// qemu:dirty-bitmap:NAME metadata context (repeatable).
    #[arg(short = 'B', long = "bitmap")]
    bitmap: Vec<String>,
    /// What discard requests do (ignore or unmap).
    #[arg(long = "discard", default_value = "ignore")]
    discard: String,
    /// Zero detection on writes (off, on, unmap).
    #[arg(long = "detect-zeroes", default_value = "off")]
    detect_zeroes: String,
    /// Cache mode.
    #[arg(long = "cache", default_value = "writeback")]
    cache: String,
    /// Return once the server listens, leaving it running.
    #[arg(long = "fork")]
    fork: bool,
    /// Write the server's process id to this file.
    #[arg(long = "pid-file")]
    pid_file: Option<String>,
    /// Open without conflicting with a writer (read-only exports only).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Copy data that reads fall through to the backing chain for into
    /// the image (the image file is opened writable, even with -r).
    #[arg(long = "copy-on-read")]
    copy_on_read: bool,
    /// Stream backing data into the image while clients are idle, at most
    /// RATE bytes per second when given (--prefetch=20M).
    #[arg(long = "prefetch", value_name = "RATE", num_args = 0..=1, require_equals = true, default_missing_value = "0")]
    prefetch: Option<String>,
    /// Define an object (qemu's TYPE,id=ID,...): tls-creds-x509,
    /// authz-simple, authz-list, authz-listfile.
    #[arg(long = "object", value_name = "TYPE,id=ID,...")]
    objects: Vec<String>,
    /// Require TLS with the credentials of this object (tls-creds-x509
    /// with endpoint=server).
    #[arg(long = "tls-creds", value_name = "ID")]
    tls_creds: Option<String>,
    /// Let in only clients whose certificate name this authz object allows.
    #[arg(long = "tls-authz", value_name = "ID")]
    tls_authz: Option<String>,
    /// Override the host name checked in the server's certificate (a
    /// client-side setting, accepted as qemu-nbd does).
    #[arg(long = "tls-hostname", value_name = "HOSTNAME")]
    tls_hostname: Option<String>,
    /// Longest a client may take to negotiate, TLS handshake included
    /// (seconds; 0: no limit).
    #[arg(long = "handshake-limit", value_name = "N", default_value = "10")]
    handshake_limit: u64,
    /// The image is an option string (driver=qcow2,file.driver=nbd,...,
    /// or file.filename=F,encrypt.key-secret=ID), as a `json:{...}` name
    /// is and as qemu-nbd --image-opts takes it.
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Export the image from this byte offset on (qemu-nbd's -o), e.g. a
    /// disk stored inside an archive.
    #[arg(short = 'o', long = "offset", value_name = "OFFSET")]
    offset: Option<String>,
    /// Image file.
    file: String,
}

/// qemu-nbd's `-o` value: an unsigned number, decimal, octal (leading 0)
/// or hexadecimal (leading 0x), as strtoull with base 0 reads it.
fn parse_offset(v: &str) -> CliResult<u64> {
    if v.trim_start().starts_with('-') {
        return Err(CliError::new(format!("Value '{v}' is out of range for parameter 'offset'")));
    }
    let bad = || CliError::new(format!("Invalid offset '{v}'"));
    let (digits, radix) = if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        (h, 16)
    } else if v.len() > 1 && v.starts_with('0') {
        (&v[1..], 8)
    } else {
        (v, 10)
    };
    u64::from_str_radix(digits, radix).map_err(|_| bad())
}

/// The TLS setup `--tls-creds` and `--tls-authz` name, checked as qemu-nbd
/// checks them, before the image is opened.
fn tls_setup(a: &Args) -> CliResult<Option<TlsServer>> {
    let objects = Objects::parse(&a.objects)?;
    let Some(creds_id) = &a.tls_creds else {
        if a.tls_authz.is_some() {
            return Err(CliError::new("--tls-authz is not permitted without --tls-creds"));
        }
        if a.tls_hostname.is_some() {
            return Err(CliError::new("--tls-hostname is not permitted without --tls-creds"));
        }
        return Ok(None);
    };
    let creds = match objects.get(creds_id) {
        Some(Object::TlsCreds(c)) => c,
        Some(_) => {
            return Err(CliError::new(format!(
                "Failed to get TLS creds: Object with id '{creds_id}' is not TLS credentials"
            )))
        }
        None => return Err(CliError::new(format!("Failed to get TLS creds: No TLS credentials with id '{creds_id}'"))),
    };
    let authz = match &a.tls_authz {
        None => None,
        Some(id) => match objects.get(id) {
            Some(Object::Authz(z)) => Some(z.0.clone()),
            _ => return Err(CliError::new(format!("Cannot find QAuthZ object with id '{id}'"))),
        },
    };
    creds.server(authz).map(Some).map_err(|e| CliError::new(format!("Failed to get TLS creds: {}", e.msg)))
}

pub fn run(a: Args) -> CliResult<i32> {
    if a.fork {
        return fork_and_wait();
    }
    let discard = a.discard.parse::<DiscardMode>().map_err(|e| CliError::new(e.to_string()))?;
    let detect_zeroes = a.detect_zeroes.parse::<DetectZeroes>().map_err(|e| CliError::new(e.to_string()))?;
    if a.force_share && !a.read_only {
        return Err(CliError::new("--share-rw/-U is not allowed for writable exports; use -r"));
    }
    let cache = a.cache.parse::<CacheMode>().map_err(|e| CliError::new(e.to_string()))?;
    let tls = tls_setup(&a)?;
    let read_only = a.read_only || a.snapshot.is_some();
    let caching = a.copy_on_read || a.prefetch.is_some();
    if caching && (a.snapshot.is_some() || a.force_share) {
        return Err(CliError::new("--copy-on-read and --prefetch need the image itself writable (not with -l or -U)"));
    }
    let prefetch_rate = match a.prefetch.as_deref() {
        None => None,
        Some(r) => {
            Some(crate::util::parse_num(r).ok_or_else(|| CliError::new(format!("Invalid prefetch rate '{r}'")))?)
        }
    };
    let (mut file, mut format) = (a.file.clone(), a.format.clone());
    crate::image_opts::ObjectArgs { objects: a.objects.clone(), image_opts: a.image_opts }
        .apply(&mut file, &mut format)?;
    let opts = OpenOptions::default()
        .format(parse_format(format.as_deref())?)
        .write(!read_only || caching)
        .cache(cache)
        .copy_on_read(a.copy_on_read)
        .allow_network_backing(caching);
    let img = open_image(&file, &opts)?;
    let mut prefetcher = None;
    let device = match (&a.snapshot, prefetch_rate) {
        (Some(name), _) => {
            let q = img.qcow2().ok_or_else(|| CliError::new("-l needs a qcow2 image"))?;
            q.snapshot_device(name)
                .map_err(|e| CliError::new(format!("Failed to load snapshot '{name}': {}", message(&e))))?
        }
        (None, Some(rate)) => {
            let popts = oxcow::tools::prefetch::PrefetchOptions::default().rate((rate > 0).then_some(rate));
            let (dev, p) = oxcow::tools::prefetch::for_export(&img, popts)?;
            prefetcher = Some(p);
            dev
        }
        (None, None) => img.device().clone(),
    };
    let device: std::sync::Arc<dyn oxcow::BlockDevice> = match a.offset.as_deref().map(parse_offset).transpose()? {
        Some(off) if off > 0 => std::sync::Arc::new(
            oxcow::nbd::server::OffsetDevice::new(device, off).map_err(|e| CliError::new(message(&e)))?,
        ),
        _ => device,
    };
    let config = ExportConfig::new(a.name.clone())
        .description(a.description.clone())
        .read_only(read_only)
        .discard(discard)
        .detect_zeroes(detect_zeroes)
        .multi_conn_ok(a.shared > 1)
        .allocation_depth(a.allocation_depth)
        .dirty_bitmaps(a.bitmap.clone());
    if a.bitmap.len() > 64 {
        return Err(CliError::new("at most 64 bitmaps can be exported"));
    }
    for b in &a.bitmap {
        check_bitmap(&img, b)?;
    }
    let server = Server::new(device, config);
    let shutdown = Arc::new(AtomicBool::new(false));
    // Nothing is written to an image opened read-only, so a stop signal
    // may end the process at once: its locks go with it, as fast as
    // qemu-nbd lets go of them (scripts kill the server and open the
    // image for writing in the next breath).
    let quick_exit = read_only && !caching;
    let socket_ident = Arc::new(OnceLock::new());
    watch_signals(
        Arc::clone(&shutdown),
        quick_exit.then(|| QuickExit { pid_file: a.pid_file.clone(), socket: Arc::clone(&socket_ident) }),
    )?;
    let serve_opts = ServeOptions::default()
        .persistent(a.persistent)
        .max_connections(a.shared.max(1))
        .workers(16)
        .tls(tls)
        .negotiation_log(Some(negotiation_log()));
    // No limit is a very distant one.
    let limit = if a.handshake_limit == 0 { u64::from(u32::MAX) } else { a.handshake_limit };
    let serve_opts = serve_opts.handshake_timeout(std::time::Duration::from_secs(limit));
    if let Some(p) = &a.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .map_err(|e| CliError::new(format!("Failed to write pid file '{p}': {}", os_message(&e))))?;
    }
    let result = match &a.socket {
        Some(path) => {
            let _ = std::fs::remove_file(path);
            let l = std::os::unix::net::UnixListener::bind(path)
                .map_err(|e| CliError::new(format!("Failed to bind socket to {path}: {}", os_message(&e))))?;
            report_ready();
            let ours = socket_identity(path);
            if let Some(id) = ours {
                let _ = socket_ident.set((path.clone(), id));
            }
            let r = server.serve(l, shutdown, &serve_opts);
            // A successor may already listen at the same path (a script
            // that stops one server and starts the next); its socket stays.
            if ours.is_some() && socket_identity(path) == ours {
                let _ = std::fs::remove_file(path);
            }
            r
        }
        None => {
            let addr = format!("{}:{}", a.bind, a.port);
            let l = std::net::TcpListener::bind(&addr)
                .map_err(|e| CliError::new(format!("Failed to bind socket to {addr}: {}", os_message(&e))))?;
            report_ready();
            server.serve(l, shutdown, &serve_opts)
        }
    };
    drop(server);
    if let Some(p) = prefetcher {
        p.stop();
    }
    let closed = if result.is_ok() { img.close() } else { Ok(()) };
    // The pid file goes last: whoever waits for it to vanish may use the
    // image at once, so it must be closed and its locks released.
    drop(img);
    if let Some(p) = &a.pid_file {
        let _ = std::fs::remove_file(p);
    }
    result?;
    closed?;
    Ok(0)
}

/// qemu-nbd's line for a client whose negotiation failed.
pub fn negotiation_log() -> NegotiationLog {
    NegotiationLog(Arc::new(|m: &str| eprintln!("{}: option negotiation failed: {m}", crate::dropin::prog())))
}

/// What a read-only server removes before it exits on a stop signal.
struct QuickExit {
    pid_file: Option<String>,
    /// The Unix socket bound, and its identity (see [`socket_identity`]).
    socket: Arc<OnceLock<(String, (u64, u64))>>,
}

/// Turns SIGTERM and SIGINT into `shutdown` (the server then stops in
/// order), or, with `quick`, into an immediate exit after removing the
/// socket and pid files.
fn watch_signals(shutdown: Arc<AtomicBool>, quick: Option<QuickExit>) -> CliResult<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let handler_error = |e: std::io::Error| CliError::new(format!("installing signal handler: {}", os_message(&e)));
    let Some(quick) = quick else {
        for sig in [SIGTERM, SIGINT] {
            signal_hook::flag::register(sig, shutdown.clone()).map_err(handler_error)?;
        }
        return Ok(());
    };
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).map_err(handler_error)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if signals.forever().next().is_some() {
                shutdown.store(true, std::sync::atomic::Ordering::Release);
                if let Some((path, id)) = quick.socket.get() {
                    if socket_identity(path) == Some(*id) {
                        let _ = std::fs::remove_file(path);
                    }
                }
                if let Some(p) = &quick.pid_file {
                    let _ = std::fs::remove_file(p);
                }
                std::process::exit(0);
            }
        })
        .map_err(|e| CliError::new(format!("installing signal handler: {}", os_message(&e))))?;
    Ok(())
}

/// The socket file's device and inode, to tell ours from a successor's.
fn socket_identity(path: &str) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// In a forked child: tell the parent the server listens.
fn report_ready() {
    if std::env::var_os(READY_ENV).is_some() {
        let mut out = std::io::stdout();
        let _ = writeln!(out, "ready");
        let _ = out.flush();
    }
}

/// Runs the same command line without `--fork` as a child, waits until it
/// listens (or fails), and returns.
fn fork_and_wait() -> CliResult<i32> {
    // Answering as qemu-nbd, the child must be started by that name too
    // (the executable itself is oxcow and would read the line as its own).
    let exe = match std::env::args_os().next() {
        Some(name) if crate::dropin::active() => std::path::PathBuf::from(name),
        _ => {
            std::env::current_exe().map_err(|e| CliError::new(format!("finding own executable: {}", os_message(&e))))?
        }
    };
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--fork").collect();
    // The server keeps our stderr, as qemu-nbd's forked server does: its
    // start-up errors and, later, its log lines (a client's failed
    // negotiation) go where ours would.
    let mut child = std::process::Command::new(exe)
        .args(&args)
        .env(READY_ENV, "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| CliError::new(format!("starting server: {}", os_message(&e))))?;
    let stdout = child.stdout.take().ok_or_else(|| CliError::new("starting server: no pipe"))?;
    let mut line = String::new();
    let _ = BufReader::new(stdout).read_line(&mut line);
    let ready = line.trim() == "ready";
    let code = if ready {
        0
    } else {
        let status = child.wait().map_err(|e| CliError::new(format!("waiting for server: {}", os_message(&e))))?;
        status.code().unwrap_or(1).max(1)
    };
    Ok(code)
}

/// qemu-nbd's refusals of `-B NAME`: no such bitmap in the image or its
/// backing chain (qemu-nbd takes the nearest layer's), or one left in use.
fn check_bitmap(img: &oxcow::Image, name: &str) -> CliResult<()> {
    let mut found = None;
    let mut layer = Some(img);
    while let (Some(i), None) = (layer, &found) {
        if let Some(q) = i.qcow2() {
            found = q.bitmaps()?.into_iter().find(|b| b.name == name);
        }
        layer = i.backing();
    }
    match found {
        None => Err(CliError::new(format!("Bitmap '{name}' is not found"))),
        Some(b) if b.in_use => Err(CliError::new(format!("Bitmap '{name}' is inconsistent and cannot be used"))),
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn offset_reads_as_strtoull_base_0() {
        assert_eq!(super::parse_offset("1536").ok(), Some(1536));
        assert_eq!(super::parse_offset("0x600").ok(), Some(1536));
        assert_eq!(super::parse_offset("03000").ok(), Some(1536));
        assert_eq!(super::parse_offset("0").ok(), Some(0));
        let e = super::parse_offset("12k").err().map(|e| e.to_string());
        assert_eq!(e.as_deref(), Some("Invalid offset '12k'"));
        let e = super::parse_offset("-5").err().map(|e| e.to_string());
        assert_eq!(e.as_deref(), Some("Value '-5' is out of range for parameter 'offset'"));
    }
}
