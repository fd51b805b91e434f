//! One client connection to an NBD server: the handshake, and a reader
//! thread that dispatches replies by cookie to the callers waiting on them.
//!
//! Many requests may be in flight on one connection. A caller registers
//! its cookie before sending (so a fast reply always finds its waiter),
//! sends the request under the writer lock (requests never interleave on
//! the wire), then waits on its own channel for the events of its reply.
//! When the connection breaks, every waiter's channel is dropped, which
//! callers see as [`ReqError::Disconnected`] and may retry on a new
//! connection.

use crate::nbd::proto::*;
use crate::nbd::tls::{complete_handshake, Socket, TlsClient, TlsStream};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Chunks that carry no bulk data (errors, block status) larger than this
/// are a broken or hostile server.
const MAX_SMALL_CHUNK: u32 = 1 << 20;
/// Longest option reply read into memory during the handshake.
const MAX_OPTION_REPLY: u32 = 1 << 20;
/// Most option replies (e.g. `NBD_REP_INFO`s) accepted for one option.
const MAX_OPTION_REPLIES: usize = 64;

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    /// A TCP host (name or address) and port.
    Tcp {
        /// Host name or address (IPv6 without brackets).
        host: String,
        /// Port.
        port: u16,
    },
    /// A Unix socket path.
    Unix(PathBuf),
}

impl std::fmt::Display for NbdAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdAddr::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            NbdAddr::Tcp { host, port } => write!(f, "{host}:{port}"),
            NbdAddr::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

/// The socket under a connection, or the TLS session over it.
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(TlsStream<Stream>),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tls(s) => Stream::Tls(s.try_clone()?),
        })
    }
    fn shutdown(&self) {
        // The peer may be gone already; nothing is left to do then.
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tls(s) => {
                s.shutdown();
                Ok(())
            }
        };
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tls(s) => s.set_read_timeout(t),
        }
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tls(s) => s.set_write_timeout(t),
        }
    }
}

impl Socket for Stream {
    fn try_clone_socket(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_socket(&self) {
        self.shutdown()
    }
    fn set_read_timeout_socket(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)
    }
    fn set_write_timeout_socket(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_write_timeout(t)
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// Upgrades `s` to TLS: `NBD_OPT_STARTTLS`, then the TLS handshake
/// (bounded by the socket's timeouts, which the caller set).
fn start_tls(s: &mut Stream, tls: &TlsClient, host: Option<&str>) -> io::Result<()> {
    send_option(s, OPT_STARTTLS, &[])?;
    let replies = option_replies(s, OPT_STARTTLS)?;
    let (t, data) = replies.last().cloned().unwrap_or((REP_ERR_UNSUP, Vec::new()));
    if t != REP_ACK {
        if let Some(e) = refusal(s, OPT_STARTTLS, t, &data) {
            return Err(e);
        }
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("Server does not support the STARTTLS option: {}", reply_error_text(t, &data)),
        ));
    }
    let mut session = tls.session(host)?;
    let mut raw = s.try_clone()?;
    complete_handshake(&mut session, &mut raw).map_err(|e| {
        let why =
            if e.kind() == io::ErrorKind::UnexpectedEof { NOT_TERMINATED.to_string() } else { plain_io_message(&e) };
        negotiation_error(e.kind(), format!("TLS handshake failed: {why}"))
    })?;
    // The certificate checks QEMU makes once the handshake is over; on a
    // refusal the connection is dropped before a byte of NBD is sent.
    tls.check_server(session.peer_certificates().as_deref(), host)
        .map_err(|e| negotiation_error(e.kind(), e.to_string()))?;
    *s = Stream::Tls(TlsStream::new(session, raw)?);
    Ok(())
}

/// GnuTLS's words for a TLS session the peer ended without closing it,
/// as QEMU passes them on.
pub(crate) const NOT_TERMINATED: &str = "The TLS connection was non-properly terminated.";

/// A failure of negotiation worded as QEMU's client words it (hints on
/// further lines). Tools print it as it is, without the "Failed to
/// connect" of a socket that could not be opened.
#[derive(Debug)]
pub struct NegotiationError(pub String);

impl std::fmt::Display for NegotiationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NegotiationError {}

pub(crate) fn negotiation_error(kind: io::ErrorKind, msg: String) -> io::Error {
    io::Error::new(kind, NegotiationError(msg))
}

/// An I/O error's words without Rust's " (os error N)".
pub fn plain_message(e: &io::Error) -> String {
    plain_io_message(e)
}

/// The message of a [`NegotiationError`] inside `e`, if that is what it is.
pub fn negotiation_message(e: &io::Error) -> Option<&str> {
    e.get_ref().and_then(|i| i.downcast_ref::<NegotiationError>()).map(|n| n.0.as_str())
}

/// QEMU's names of the options, for its error words.
fn option_name(opt: u32) -> &'static str {
    match opt {
        OPT_EXPORT_NAME => "export-name",
        OPT_ABORT => "abort",
        OPT_LIST => "list",
        OPT_STARTTLS => "starttls",
        OPT_INFO => "info",
        OPT_GO => "go",
        OPT_STRUCTURED_REPLY => "structured-reply",
        OPT_LIST_META_CONTEXT => "list-meta-context",
        OPT_SET_META_CONTEXT => "set-meta-context",
        _ => "<unknown>",
    }
}

/// The refusals QEMU's client words itself (a policy denial, TLS
/// required), with the server's message as a hint; the client then says
/// goodbye with `NBD_OPT_ABORT`, as QEMU's does, so the server has
/// nothing to complain about.
pub(crate) fn refusal(s: &mut Stream, opt: u32, reply_type: u32, data: &[u8]) -> Option<io::Error> {
    let mut msg = match reply_type {
        REP_ERR_POLICY => format!("Denied by server for option {opt} ({})", option_name(opt)),
        REP_ERR_TLS_REQD => format!(
            "TLS negotiation required before option {opt} ({})\nDid you forget a valid tls-creds?",
            option_name(opt)
        ),
        _ => return None,
    };
    if !data.is_empty() {
        msg += &format!("\nserver reported: {}", String::from_utf8_lossy(data));
    }
    let _ = send_option(s, OPT_ABORT, &[]);
    Some(negotiation_error(io::ErrorKind::PermissionDenied, msg))
}

/// `strerror` text of an I/O error without Rust's " (os error N)" suffix,
/// so messages read like QEMU's.
pub(crate) fn plain_io_message(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Opens the socket, bounded by `timeout`.
pub(crate) fn open_socket(addr: &NbdAddr, timeout: Duration) -> io::Result<Stream> {
    match addr {
        NbdAddr::Tcp { host, port } => {
            let mut last = None;
            for a in (host.as_str(), *port).to_socket_addrs()? {
                match TcpStream::connect_timeout(&a, timeout) {
                    Ok(s) => {
                        s.set_nodelay(true)?;
                        return Ok(Stream::Tcp(s));
                    }
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "host name has no address")))
        }
        NbdAddr::Unix(p) => Ok(Stream::Unix(UnixStream::connect(p)?)),
    }
}

/// What negotiation agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ExportInfo {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags (`FLAG_*`).
    pub flags: u16,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// Context id of `base:allocation` (or of the context asked for in
    /// its place, see [`NbdUrl::x_dirty_bitmap`]), when the server selected it.
    ///
    /// [`NbdUrl::x_dirty_bitmap`]: super::NbdUrl::x_dirty_bitmap
    pub base_allocation: Option<u32>,
    /// Minimum block size (requests are aligned to it).
    pub min_block: u32,
    /// Largest payload the server accepts.
    pub max_payload: u32,
}

fn proto_err(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

fn read_exact_vec(s: &mut Stream, n: usize) -> io::Result<Vec<u8>> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v)?;
    Ok(v)
}

pub(crate) fn send_option(s: &mut Stream, option: u32, data: &[u8]) -> io::Result<()> {
    let mut b = OptionHeader { option, length: data.len() as u32 }.encode().to_vec();
    b.extend_from_slice(data);
    s.write_all(&b)
}

/// Reads option replies to `option` up to and including the final one
/// (an ACK or an error). Returns the replies, the final one last.
pub(crate) fn option_replies(s: &mut Stream, option: u32) -> io::Result<Vec<(u32, Vec<u8>)>> {
    let mut out = Vec::new();
    loop {
        let mut h = [0u8; option_reply::SIZE];
        s.read_exact(&mut h).map_err(|e| {
            // A server that refuses us right after the TLS handshake (an
            // access list) just drops the session: QEMU's words.
            if e.to_string() == crate::nbd::tls::TRUNCATED {
                negotiation_error(e.kind(), format!("Failed to read option reply: {e}"))
            } else {
                e
            }
        })?;
        let r = OptionReplyHeader::decode(&h).map_err(|e| proto_err(e.0))?;
        if r.option != option {
            return Err(proto_err(format!("server answered option {} to option {option}", r.option)));
        }
        if r.length > MAX_OPTION_REPLY {
            return Err(proto_err(format!("option reply of {} bytes is too long", r.length)));
        }
        let data = read_exact_vec(s, r.length as usize)?;
        let last = r.reply_type == REP_ACK || r.reply_type & (1 << 31) != 0;
        out.push((r.reply_type, data));
        if last {
            return Ok(out);
        }
        if out.len() > MAX_OPTION_REPLIES {
            return Err(proto_err("server sent too many option replies"));
        }
    }
}

pub(crate) fn reply_error_text(reply_type: u32, data: &[u8]) -> String {
    let what = match reply_type {
        REP_ERR_UNSUP => "unsupported",
        REP_ERR_POLICY => "refused by policy",
        REP_ERR_INVALID => "invalid",
        REP_ERR_PLATFORM => "not available on this platform",
        REP_ERR_TLS_REQD => "TLS required",
        REP_ERR_UNKNOWN => "export unknown",
        REP_ERR_SHUTDOWN => "server shutting down",
        REP_ERR_BLOCK_SIZE_REQD => "block size negotiation required",
        REP_ERR_TOO_BIG => "too big",
        _ => "error",
    };
    let msg = String::from_utf8_lossy(data);
    if msg.is_empty() {
        what.to_string()
    } else {
        format!("{what}: {msg}")
    }
}

/// How a server greeted us.
enum Hello {
    /// Fixed newstyle: options follow. Whether the server drops the zero
    /// padding of `NBD_OPT_EXPORT_NAME` replies.
    Newstyle(bool),
    /// Oldstyle: the export's size and transmission flags, and
    /// transmission begins at once.
    Oldstyle(u64, u16),
}

/// Oldstyle greeting after its two magic words: size (8 bytes), flags
/// (4), 124 reserved bytes.
const OLDSTYLE_REST: usize = 8 + 4 + 124;

/// The start of fixed newstyle negotiation: the greeting, our flags, and
/// TLS when `tls` is given. Returns whether the server drops the zero
/// padding of `NBD_OPT_EXPORT_NAME` replies.
pub(crate) fn greet(s: &mut Stream, tls: Option<(&TlsClient, Option<&str>)>) -> io::Result<bool> {
    match hello(s, tls)? {
        Hello::Newstyle(no_zeroes) => Ok(no_zeroes),
        Hello::Oldstyle(..) => Err(proto_err("server speaks only the oldstyle protocol, which has no options")),
    }
}

/// Reads the greeting; for a newstyle server, sends our flags and starts
/// TLS when `tls` is given.
fn hello(s: &mut Stream, tls: Option<(&TlsClient, Option<&str>)>) -> io::Result<Hello> {
    let mut g = [0u8; greeting::SIZE];
    s.read_exact(&mut g)?;
    let magic = u64::from_be_bytes(g[0..8].try_into().unwrap_or_default());
    let opt_magic = u64::from_be_bytes(g[8..16].try_into().unwrap_or_default());
    if magic != NBD_MAGIC {
        return Err(proto_err("not an NBD server (bad greeting magic)"));
    }
    if opt_magic == CLISERV_MAGIC {
        if tls.is_some() {
            return Err(proto_err("server speaks only the oldstyle protocol, which cannot start TLS"));
        }
        // Two bytes of the size came with the greeting's length.
        let mut rest = [0u8; OLDSTYLE_REST - 2];
        s.read_exact(&mut rest)?;
        let mut size = [0u8; 8];
        size[..2].copy_from_slice(&g[16..18]);
        size[2..].copy_from_slice(&rest[..6]);
        let flags = u32::from_be_bytes(rest[6..10].try_into().unwrap_or_default());
        // The transmission flags are the low half.
        return Ok(Hello::Oldstyle(u64::from_be_bytes(size), flags as u16));
    }
    if opt_magic != IHAVEOPT {
        return Err(proto_err("not an NBD server (bad option magic)"));
    }
    let hflags = u16::from_be_bytes([g[16], g[17]]);
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(proto_err("server does not speak fixed newstyle negotiation"));
    }
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let mut cflags = FLAG_C_FIXED_NEWSTYLE;
    if no_zeroes {
        cflags |= FLAG_C_NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes())?;
    if let Some((tls, host)) = tls {
        start_tls(s, tls, host)?;
    }
    Ok(Hello::Newstyle(no_zeroes))
}

/// Runs the fixed newstyle handshake, upgrading to TLS first when `tls`
/// is given (with the host name connected to, for the certificate
/// check), and enters transmission.
pub(crate) fn handshake(
    s: &mut Stream,
    export: &str,
    context: Option<&str>,
    tls: Option<(&TlsClient, Option<&str>)>,
) -> io::Result<ExportInfo> {
    let no_zeroes = match hello(s, tls)? {
        Hello::Newstyle(no_zeroes) => no_zeroes,
        Hello::Oldstyle(size, flags) => {
            if !export.is_empty() {
                return Err(proto_err("Server does not support non-empty export names"));
            }
            if size > i64::MAX as u64 {
                return Err(proto_err(format!("export size {size} is too large")));
            }
            let (min_block, max_payload) = (1, MAX_PAYLOAD);
            return Ok(ExportInfo { size, flags, structured: false, base_allocation: None, min_block, max_payload });
        }
    };
    // Structured replies first: metadata contexts need them.
    send_option(s, OPT_STRUCTURED_REPLY, &[])?;
    let structured = option_replies(s, OPT_STRUCTURED_REPLY)?.last().is_some_and(|(t, _)| *t == REP_ACK);

    let mut base_allocation = None;
    let wanted = context.unwrap_or(CONTEXT_BASE_ALLOCATION);
    if structured {
        let req = MetaContextRequest { export: export.as_bytes().to_vec(), queries: vec![wanted.as_bytes().to_vec()] };
        send_option(s, OPT_SET_META_CONTEXT, &req.encode())?;
        for (t, data) in option_replies(s, OPT_SET_META_CONTEXT)? {
            if t == REP_META_CONTEXT && data.len() >= 4 && &data[4..] == wanted.as_bytes() {
                base_allocation = Some(u32::from_be_bytes([data[0], data[1], data[2], data[3]]));
            }
        }
    }
    // Without base:allocation block status just reports data; a context
    // asked for by name must exist, or its answers would be made up.
    if let (Some(c), None) = (context, base_allocation) {
        return Err(io::Error::new(io::ErrorKind::NotFound, format!("requested x-dirty-bitmap {c} not found")));
    }

    let req = InfoRequest { name: export.as_bytes().to_vec(), requests: vec![INFO_BLOCK_SIZE] };
    send_option(s, OPT_GO, &req.encode())?;
    let replies = option_replies(s, OPT_GO)?;
    let mut export_info: Option<(u64, u16)> = None;
    let (mut min_block, mut max_payload) = (1u32, MAX_PAYLOAD);
    let (last_type, last_data) = replies.last().cloned().unwrap_or((REP_ERR_UNSUP, Vec::new()));
    if last_type == REP_ACK {
        for (t, d) in &replies {
            if *t != REP_INFO || d.len() < 2 {
                continue;
            }
            match u16::from_be_bytes([d[0], d[1]]) {
                INFO_EXPORT if d.len() >= 12 => {
                    let size = u64::from_be_bytes(d[2..10].try_into().unwrap_or_default());
                    export_info = Some((size, u16::from_be_bytes([d[10], d[11]])));
                }
                INFO_BLOCK_SIZE if d.len() >= 14 => {
                    let min = u32::from_be_bytes(d[2..6].try_into().unwrap_or_default());
                    let max = u32::from_be_bytes(d[10..14].try_into().unwrap_or_default());
                    // Keep only sane values: a power of two up to 64 KiB
                    // for the minimum, at least that for the maximum.
                    if min.is_power_of_two() && min <= 65536 {
                        min_block = min;
                    }
                    if max >= min_block && max > 0 {
                        max_payload = max.min(MAX_PAYLOAD);
                    }
                }
                _ => {}
            }
        }
    } else if last_type == REP_ERR_UNSUP {
        // An old server: NBD_OPT_EXPORT_NAME cannot report errors (the
        // server just closes on an unknown name), but it is all there is.
        send_option(s, OPT_EXPORT_NAME, export.as_bytes())?;
        let mut b = [0u8; export_name_reply::SIZE];
        s.read_exact(&mut b).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::new(io::ErrorKind::NotFound, format!("server refused export '{export}'"))
            } else {
                e
            }
        })?;
        if !no_zeroes {
            read_exact_vec(s, export_name_reply::PADDING)?;
        }
        export_info =
            Some((u64::from_be_bytes(b[0..8].try_into().unwrap_or_default()), u16::from_be_bytes([b[8], b[9]])));
    } else if let Some(e) = refusal(s, OPT_GO, last_type, &last_data) {
        return Err(e);
    } else {
        let kind = if last_type == REP_ERR_UNKNOWN { io::ErrorKind::NotFound } else { io::ErrorKind::Other };
        return Err(io::Error::new(
            kind,
            format!("server refused export '{export}': {}", reply_error_text(last_type, &last_data)),
        ));
    }
    let (size, flags) = export_info.ok_or_else(|| proto_err("server sent no export information"))?;
    if size > i64::MAX as u64 {
        return Err(proto_err(format!("export size {size} is too large")));
    }
    Ok(ExportInfo { size, flags, structured, base_allocation, min_block, max_payload })
}

/// One event of a reply, as the reader thread hands it to the caller.
#[derive(Debug)]
pub(crate) enum Event {
    /// Data at an export offset.
    Data(u64, Vec<u8>),
    /// So many zeros (their offset was checked to lie in the request,
    /// and the caller's buffer starts zeroed).
    Hole(u32),
    /// Extents of a metadata context: (id, [(length, flags)]).
    Status(u32, Vec<(u32, u32)>),
    /// An error (NBD errno value and message).
    Error(u32, String),
    /// The reply is complete.
    Done,
}

/// Why a request failed.
#[derive(Debug)]
pub(crate) enum ReqError {
    /// The connection broke (or was already broken); the request may be
    /// retried on a new connection.
    Disconnected(String),
    /// The server answered with an error.
    Server(u32, String),
    /// The server broke the protocol in its reply.
    Protocol(String),
}

/// A registered request waiting for its reply.
struct Waiter {
    command: u16,
    offset: u64,
    length: u32,
    tx: Sender<Event>,
}

#[derive(Default)]
struct Pending {
    waiters: HashMap<u64, Waiter>,
    /// Why the connection is dead, once it is.
    dead: Option<String>,
}

struct Shared {
    writer: Mutex<Stream>,
    /// For shutting the socket down from any thread.
    control: Stream,
    pending: Mutex<Pending>,
    next_cookie: AtomicU64,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// Marks the connection dead and wakes every waiter.
    fn kill(&self, why: String) {
        let waiters = {
            let mut p = self.pending();
            if p.dead.is_none() {
                p.dead = Some(why);
            }
            std::mem::take(&mut p.waiters)
        };
        self.control.shutdown();
        // Dropping the senders ends every waiting caller's receive.
        drop(waiters);
    }
}

/// A live connection in the transmission phase.
pub(crate) struct Conn {
    shared: Arc<Shared>,
    /// What negotiation agreed on.
    pub info: ExportInfo,
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl Conn {
    /// Connects, negotiates and starts the reader thread.
    pub fn open(
        addr: &NbdAddr,
        export: &str,
        context: Option<&str>,
        tls: Option<&TlsClient>,
        timeout: Duration,
        io_timeout: Duration,
    ) -> io::Result<Conn> {
        let mut s = open_socket(addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        let host = match addr {
            NbdAddr::Tcp { host, .. } => Some(host.as_str()),
            NbdAddr::Unix(_) => None,
        };
        let info = handshake(&mut s, export, context, tls.map(|t| (t, host)))?;
        // Idle time between replies is unlimited (the caller bounds each
        // request instead); a server that stops taking our bytes is not.
        s.set_read_timeout(None)?;
        s.set_write_timeout(Some(io_timeout))?;
        let reader_stream = s.try_clone()?;
        let control = s.try_clone()?;
        let shared = Arc::new(Shared {
            writer: Mutex::new(s),
            control,
            pending: Mutex::new(Pending::default()),
            next_cookie: AtomicU64::new(1),
        });
        let sh = Arc::clone(&shared);
        let structured = info.structured;
        let reader = std::thread::Builder::new()
            .name("nbd-client-reader".into())
            .spawn(move || {
                let mut rs = reader_stream;
                let why = match reader_loop(&mut rs, &sh, structured) {
                    Ok(()) => "server closed the connection".to_string(),
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => "server closed the connection".to_string(),
                    Err(e) => plain_io_message(&e),
                };
                sh.kill(why);
            })
            .map_err(|e| io::Error::other(format!("starting the NBD reader thread: {e}")))?;
        Ok(Conn { shared, info, reader: Mutex::new(Some(reader)) })
    }

    /// Whether the connection has broken.
    pub fn is_dead(&self) -> bool {
        self.shared.pending().dead.is_some()
    }

    /// Breaks the connection (waiters see `Disconnected`).
    pub fn kill(&self, why: &str) {
        self.shared.kill(why.to_string());
    }

    /// Sends one request and returns the channel its reply events arrive on.
    pub fn submit(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<&[u8]>,
    ) -> Result<Receiver<Event>, ReqError> {
        let cookie = self.shared.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        {
            let mut p = self.shared.pending();
            if let Some(why) = &p.dead {
                return Err(ReqError::Disconnected(why.clone()));
            }
            p.waiters.insert(cookie, Waiter { command, offset, length, tx });
        }
        let header = Request { flags, command, cookie, offset, length }.encode();
        let sent = {
            let mut w = self.shared.writer.lock().unwrap_or_else(|e| e.into_inner());
            w.write_all(&header).and_then(|_| match payload {
                Some(p) => w.write_all(p),
                None => Ok(()),
            })
        };
        if let Err(e) = sent {
            // A half-sent request leaves the stream out of sync: the
            // connection cannot be used any more.
            let why = format!("sending a request: {}", plain_io_message(&e));
            self.shared.kill(why.clone());
            return Err(ReqError::Disconnected(why));
        }
        Ok(rx)
    }

    /// Waits for the next event of a reply, at most until `deadline`; a
    /// server that does not answer in time loses the connection.
    pub fn next_event(&self, rx: &Receiver<Event>, deadline: Instant) -> Result<Event, ReqError> {
        let wait = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait) {
            Ok(ev) => Ok(ev),
            Err(RecvTimeoutError::Timeout) => {
                let why = "the server did not answer in time".to_string();
                self.shared.kill(why.clone());
                Err(ReqError::Disconnected(why))
            }
            Err(RecvTimeoutError::Disconnected) => {
                let why = self.shared.pending().dead.clone().unwrap_or_else(|| "connection lost".into());
                Err(ReqError::Disconnected(why))
            }
        }
    }

    /// Sends `NBD_CMD_DISC` (best effort) and closes the socket.
    pub fn disconnect(&self) {
        if !self.is_dead() {
            let header = Request { flags: 0, command: CMD_DISC, cookie: 0, offset: 0, length: 0 }.encode();
            let mut w = self.shared.writer.lock().unwrap_or_else(|e| e.into_inner());
            let _ = w.write_all(&header);
        }
        self.shared.kill("disconnected".into());
        if let Some(h) = self.reader.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = h.join();
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.disconnect();
    }
}

/// Reads replies until the connection ends or breaks the protocol.
fn reader_loop(s: &mut Stream, sh: &Shared, structured: bool) -> io::Result<()> {
    loop {
        let mut magic = [0u8; 4];
        match s.read(&mut magic[..1]) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        s.read_exact(&mut magic[1..])?;
        let size = ReplyHeader::size_for_magic(magic).map_err(|e| proto_err(e.0))?;
        let mut h = vec![0u8; size];
        h[..4].copy_from_slice(&magic);
        s.read_exact(&mut h[4..])?;
        match ReplyHeader::decode(&h).map_err(|e| proto_err(e.0))? {
            ReplyHeader::Simple { error, cookie } => {
                let w = sh
                    .pending()
                    .waiters
                    .remove(&cookie)
                    .ok_or_else(|| proto_err(format!("reply to unknown cookie {cookie:#x}")))?;
                if w.command == CMD_READ && structured && error == 0 {
                    return Err(proto_err("simple reply with data to a read after structured replies were agreed"));
                }
                if error != 0 {
                    let _ = w.tx.send(Event::Error(error, String::new()));
                } else if w.command == CMD_READ {
                    let data = read_exact_vec(s, w.length as usize)?;
                    let _ = w.tx.send(Event::Data(w.offset, data));
                }
                let _ = w.tx.send(Event::Done);
            }
            ReplyHeader::Chunk { flags, chunk_type, cookie, length } => {
                if !structured {
                    return Err(proto_err("structured reply chunk without structured replies agreed"));
                }
                let (command, offset, req_len, tx) = {
                    let p = sh.pending();
                    let w = p
                        .waiters
                        .get(&cookie)
                        .ok_or_else(|| proto_err(format!("chunk for unknown cookie {cookie:#x}")))?;
                    (w.command, w.offset, w.length, w.tx.clone())
                };
                let limit =
                    if chunk_type == REPLY_TYPE_OFFSET_DATA { req_len.saturating_add(8) } else { MAX_SMALL_CHUNK };
                if length > limit {
                    return Err(proto_err(format!("reply chunk of {length} bytes is too long")));
                }
                let payload = read_exact_vec(s, length as usize)?;
                let ev = decode_chunk(chunk_type, &payload, command, offset, req_len)?;
                if let Some(ev) = ev {
                    let _ = tx.send(ev);
                }
                if flags & REPLY_FLAG_DONE != 0 {
                    sh.pending().waiters.remove(&cookie);
                    let _ = tx.send(Event::Done);
                }
            }
        }
    }
}

/// Checks one chunk against the request it answers and turns it into an event.
fn decode_chunk(chunk_type: u16, p: &[u8], command: u16, offset: u64, len: u32) -> io::Result<Option<Event>> {
    let within = |at: u64, n: u64| at >= offset && at.checked_add(n).is_some_and(|e| e <= offset + u64::from(len));
    let mut c = Cursor::new(p);
    let perr = |e: ProtoError| proto_err(e.0);
    match chunk_type {
        REPLY_TYPE_NONE => {
            if !p.is_empty() {
                return Err(proto_err("NBD_REPLY_TYPE_NONE chunk with a payload"));
            }
            Ok(None)
        }
        REPLY_TYPE_OFFSET_DATA if command == CMD_READ => {
            let b = c.bytes(8).map_err(perr)?;
            let at = u64::from_be_bytes(b.try_into().unwrap_or_default());
            let data = p[8..].to_vec();
            if data.is_empty() || !within(at, data.len() as u64) {
                return Err(proto_err("data chunk outside the requested range"));
            }
            Ok(Some(Event::Data(at, data)))
        }
        REPLY_TYPE_OFFSET_HOLE if command == CMD_READ => {
            let b = c.bytes(8).map_err(perr)?;
            let at = u64::from_be_bytes(b.try_into().unwrap_or_default());
            let n = c.u32().map_err(perr)?;
            if c.remaining() != 0 || n == 0 || !within(at, u64::from(n)) {
                return Err(proto_err("hole chunk outside the requested range"));
            }
            Ok(Some(Event::Hole(n)))
        }
        REPLY_TYPE_BLOCK_STATUS if command == CMD_BLOCK_STATUS => {
            let id = c.u32().map_err(perr)?;
            if c.remaining() == 0 || !c.remaining().is_multiple_of(8) {
                return Err(proto_err("malformed block status chunk"));
            }
            let mut extents = Vec::with_capacity(c.remaining() / 8);
            while c.remaining() > 0 {
                extents.push((c.u32().map_err(perr)?, c.u32().map_err(perr)?));
            }
            Ok(Some(Event::Status(id, extents)))
        }
        REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
            let errno = c.u32().map_err(perr)?;
            let msg_len = c.u16().map_err(perr)? as usize;
            let msg = String::from_utf8_lossy(c.bytes(msg_len).map_err(perr)?).into_owned();
            if errno == 0 {
                return Err(proto_err("error chunk with error value 0"));
            }
            Ok(Some(Event::Error(errno, msg)))
        }
        t if t & (1 << 15) != 0 => {
            // An unknown error type still carries the error value first.
            let errno = c.u32().map_err(perr)?;
            Ok(Some(Event::Error(errno.max(1), format!("error reply of unknown type {t}"))))
        }
        t => Err(proto_err(format!("unexpected reply chunk type {t} for command {command}"))),
    }
}
