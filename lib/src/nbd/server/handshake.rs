//! Option haggling: from the greeting to the transmission phase.
//!
//! The whole negotiation runs under one deadline (qemu-nbd allows 10 s), so
//! a client that connects and stalls, or trickles options forever, cannot
//! hold a connection slot.

use super::conn::Connection;
use super::export::{Session, Shared, ID_ALLOCATION_DEPTH, ID_BASE_ALLOCATION, ID_DIRTY_BITMAP, MAX_DIRTY_BITMAPS};
use crate::nbd::proto::*;
use crate::nbd::tls::{complete_handshake, Socket, TlsServer, TlsStream};
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

/// Option data longer than this is not read into memory: the longest
/// legitimate option (a metadata query list) is far smaller.
const MAX_OPTION_DATA: u32 = 64 << 10;
/// Option data longer than this is not even skipped: the client is hostile.
const MAX_OPTION_SKIP: u32 = 1 << 20;

/// The transmission flags advertised for this export to a session.
pub(crate) fn transmission_flags(shared: &Shared, s: &Session) -> u16 {
    let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_CACHE;
    if shared.read_only {
        f |= FLAG_READ_ONLY;
    } else {
        f |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    }
    if s.structured {
        f |= FLAG_SEND_DF;
    }
    if s.extended {
        // Offered whatever contexts were chosen, as qemu-nbd does (its
        // `-L` listing shows it).
        f |= FLAG_BLOCK_STAT_PAYLOAD;
    }
    if shared.config.multi_conn_ok {
        f |= FLAG_CAN_MULTI_CONN;
    }
    f
}

/// Reads and writes through a connection with every operation bounded by
/// one overall deadline.
struct Deadlined<'a, C: Connection> {
    conn: &'a mut C,
    deadline: Instant,
}

impl<C: Connection> Deadlined<'_, C> {
    fn remaining(&self) -> io::Result<Duration> {
        let now = Instant::now();
        if now >= self.deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "NBD negotiation took too long"));
        }
        Ok(self.deadline - now)
    }
}

impl<C: Connection> Read for Deadlined<'_, C> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let t = self.remaining()?;
        self.conn.set_read_timeout_conn(Some(t))?;
        self.conn.read(buf)
    }
}

impl<C: Connection> Write for Deadlined<'_, C> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let t = self.remaining()?;
        self.conn.set_write_timeout_conn(Some(t))?;
        self.conn.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.conn.flush()
    }
}

fn violation(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn reply<W: Write>(w: &mut W, option: u32, reply_type: u32, data: &[u8]) -> io::Result<()> {
    w.write_all(&encode_option_reply(option, reply_type, data))
}

fn skip<R: Read>(r: &mut R, len: u32) -> io::Result<()> {
    let copied = io::copy(&mut r.take(u64::from(len)), &mut io::sink())?;
    if copied != u64::from(len) {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "client closed during option data"));
    }
    Ok(())
}

/// Which contexts a list of queries names. `listing` enables the
/// namespace wildcards (`base:`, `qemu:`), which select nothing in
/// `NBD_OPT_SET_META_CONTEXT`; an empty list names everything when listing.
fn select_contexts(queries: &[Vec<u8>], listing: bool) -> (bool, bool) {
    if listing && queries.is_empty() {
        return (true, true);
    }
    let (mut base, mut depth) = (false, false);
    for q in queries {
        match q.as_slice() {
            b"base:allocation" => base = true,
            b"qemu:allocation-depth" => depth = true,
            b"base:" if listing => base = true,
            b"qemu:" if listing => depth = true,
            // Unknown namespaces and leaf names must be ignored.
            _ => {}
        }
    }
    (base, depth)
}

/// Whether the queries name the dirty bitmap context of bitmap `name`
/// (when listing, also the `qemu:` and `qemu:dirty-bitmap:` wildcards).
fn select_bitmap(queries: &[Vec<u8>], listing: bool, name: &str) -> bool {
    if listing && queries.is_empty() {
        return true;
    }
    let full = format!("{CONTEXT_QEMU_DIRTY_BITMAP}{name}");
    queries.iter().any(|q| {
        q.as_slice() == full.as_bytes()
            || (listing && (q.as_slice() == b"qemu:" || q.as_slice() == CONTEXT_QEMU_DIRTY_BITMAP.as_bytes()))
    })
}

/// Where a connection stands with respect to TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// The server offers no TLS: `NBD_OPT_STARTTLS` is refused by policy.
    NoTls,
    /// TLS is required and not started yet: only `NBD_OPT_STARTTLS` goes
    /// anywhere (qemu-nbd's and the specification's FORCEDTLS).
    BeforeTls,
    /// The session is encrypted.
    Tls,
}

/// What the client said in reply to the greeting.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientFlags {
    fixed: bool,
    no_zeroes: bool,
}

/// How a negotiation ended.
pub(crate) enum Outcome {
    /// Transmission begins.
    Session(Session),
    /// The client left, or asked for an export we cannot give through
    /// `NBD_OPT_EXPORT_NAME`.
    Closed,
    /// `NBD_OPT_STARTTLS` was acknowledged: the TLS handshake comes next,
    /// then [`negotiate_after_tls`].
    StartTls(ClientFlags),
}

/// Sends the greeting and reads the client's flags.
fn greet<C: Connection>(io: &mut Deadlined<'_, C>) -> io::Result<ClientFlags> {
    io.write_all(&encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))?;
    let mut cf = [0u8; 4];
    io.read_exact(&mut cf)?;
    let client_flags = u32::from_be_bytes(cf);
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(violation(format!("unknown client flags {client_flags:#x}")));
    }
    Ok(ClientFlags {
        fixed: client_flags & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
    })
}

/// Runs the negotiation from the greeting, all of it bounded by
/// `deadline`. Errors are I/O failures, timeouts and protocol violations,
/// after which the connection is simply dropped.
pub(crate) fn negotiate<C: Connection>(
    conn: &mut C,
    shared: &Shared,
    deadline: Instant,
    phase: Phase,
) -> io::Result<Outcome> {
    let mut io = Deadlined { conn, deadline };
    let flags = greet(&mut io)?;
    options(&mut io, shared, phase, flags)
}

/// Goes on with the negotiation over the encrypted stream, where the
/// client starts over with its options (nothing negotiated before TLS
/// counts).
pub(crate) fn negotiate_after_tls<C: Connection>(
    conn: &mut C,
    shared: &Shared,
    deadline: Instant,
    flags: ClientFlags,
) -> io::Result<Outcome> {
    let mut io = Deadlined { conn, deadline };
    options(&mut io, shared, Phase::Tls, flags)
}

/// Runs the TLS handshake after an acknowledged `NBD_OPT_STARTTLS`,
/// within the negotiation's deadline. The client's certificate, when one
/// is required, is checked here (chain and access list), before any
/// option is read in the clear of the session.
pub(crate) fn start_tls<C: Connection + Socket>(
    conn: C,
    tls: &TlsServer,
    deadline: Instant,
) -> io::Result<TlsStream<C>> {
    let mut session = tls.session()?;
    let mut c = conn;
    complete_handshake(&mut session, &mut Deadlined { conn: &mut c, deadline }).map_err(|e| {
        let why = if e.kind() == io::ErrorKind::UnexpectedEof {
            "The TLS connection was non-properly terminated.".to_string()
        } else {
            e.to_string()
        };
        io::Error::new(e.kind(), format!("TLS handshake failed: {why}"))
    })?;
    TlsStream::new(session, c)
}

/// The reply qemu-nbd gives to every option but `NBD_OPT_STARTTLS` before
/// TLS: an error, without a word about the export.
fn refuse_before_tls<C: Connection>(io: &mut Deadlined<'_, C>, opt: u32) -> io::Result<()> {
    reply(io, opt, REP_ERR_TLS_REQD, format!("Option {opt:#x} not permitted before TLS").as_bytes())
}

/// The option loop.
fn options<C: Connection>(
    io: &mut Deadlined<'_, C>,
    shared: &Shared,
    phase: Phase,
    flags: ClientFlags,
) -> io::Result<Outcome> {
    let ClientFlags { fixed, no_zeroes } = flags;
    let mut s = Session {
        structured: false,
        extended: false,
        base_allocation: false,
        allocation_depth: false,
        dirty_bitmaps: 0,
    };
    let mut io = io;

    loop {
        let mut h = [0u8; option_header::SIZE];
        io.read_exact(&mut h).map_err(|e| {
            // A client that drops the session after the TLS handshake (it
            // refused our certificate): QEMU's words for the log.
            if e.to_string() == crate::nbd::tls::TRUNCATED {
                io::Error::new(e.kind(), format!("Failed to read opts magic: {e}"))
            } else {
                e
            }
        })?;
        let hdr = OptionHeader::decode(&h).map_err(|e| violation(e.0))?;
        let opt = hdr.option;
        if !fixed && (opt != OPT_EXPORT_NAME || phase == Phase::BeforeTls) {
            // Plain newstyle clients cannot parse option replies (nor
            // start TLS).
            return Err(violation(format!("option {opt} from a client without fixed newstyle")));
        }
        if hdr.length > MAX_OPTION_SKIP {
            return Err(violation(format!("option {opt} with {} bytes of data", hdr.length)));
        }
        if phase == Phase::BeforeTls && opt == OPT_EXPORT_NAME {
            // It cannot carry an error, and the name must not be read in
            // plaintext: the connection ends (as with qemu-nbd).
            return Err(violation("NBD_OPT_EXPORT_NAME before TLS"));
        }
        if hdr.length > MAX_OPTION_DATA {
            if opt == OPT_EXPORT_NAME {
                return Err(violation("export name too long"));
            }
            skip(&mut io, hdr.length)?;
            reply(&mut io, opt, REP_ERR_TOO_BIG, b"option data too large")?;
            continue;
        }
        let mut data = vec![0u8; hdr.length as usize];
        io.read_exact(&mut data)?;
        if phase == Phase::BeforeTls {
            match opt {
                OPT_STARTTLS if !data.is_empty() => {
                    // A client that cannot start TLS correctly is dropped.
                    reply(io, opt, REP_ERR_INVALID, b"NBD_OPT_STARTTLS takes no data")?;
                    return Err(violation("NBD_OPT_STARTTLS with data"));
                }
                OPT_STARTTLS => {
                    reply(io, opt, REP_ACK, &[])?;
                    return Ok(Outcome::StartTls(flags));
                }
                OPT_ABORT => {
                    // The client may hang up before reading it.
                    let _ = refuse_before_tls(io, opt);
                    return Ok(Outcome::Closed);
                }
                _ => {
                    refuse_before_tls(io, opt)?;
                    continue;
                }
            }
        }
        if shared.is_stopping() && opt != OPT_ABORT {
            if opt == OPT_EXPORT_NAME {
                return Ok(Outcome::Closed);
            }
            reply(&mut io, opt, REP_ERR_SHUTDOWN, b"server is shutting down")?;
            continue;
        }

        match opt {
            OPT_EXPORT_NAME => {
                if s.extended {
                    // Forbidden to the client after extended headers: its
                    // reply has no way to confirm them.
                    return Err(violation("NBD_OPT_EXPORT_NAME after extended headers"));
                }
                if !shared.name_matches(&data) {
                    // This option cannot carry an error: the specification
                    // says to end the session.
                    return Ok(Outcome::Closed);
                }
                let tflags = transmission_flags(shared, &s);
                io.write_all(&encode_export_name_reply(shared.device.len(), tflags, no_zeroes))?;
                return Ok(Outcome::Session(s));
            }
            OPT_ABORT => {
                // The client may already have closed; the ack is a courtesy.
                let _ = reply(&mut io, opt, REP_ACK, &[]);
                return Ok(Outcome::Closed);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply(&mut io, opt, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                    continue;
                }
                let desc = truncate_utf8(&shared.config.description, MAX_STRING);
                reply(&mut io, opt, REP_SERVER, &encode_rep_server(shared.config.name.as_bytes(), desc.as_bytes()))?;
                reply(&mut io, opt, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let req = match InfoRequest::decode(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        reply(&mut io, opt, REP_ERR_INVALID, e.0.as_bytes())?;
                        continue;
                    }
                };
                if !shared.name_matches(&req.name) {
                    let msg = format!("export '{}' not available", String::from_utf8_lossy(&req.name));
                    reply(&mut io, opt, REP_ERR_UNKNOWN, truncate_utf8(&msg, MAX_STRING).as_bytes())?;
                    continue;
                }
                let tflags = transmission_flags(shared, &s);
                reply(&mut io, opt, REP_INFO, &encode_info_export(shared.device.len(), tflags))?;
                if req.requests.contains(&INFO_NAME) {
                    reply(&mut io, opt, REP_INFO, &encode_info_string(INFO_NAME, shared.config.name.as_bytes()))?;
                }
                if req.requests.contains(&INFO_DESCRIPTION) && !shared.config.description.is_empty() {
                    let desc = truncate_utf8(&shared.config.description, MAX_STRING);
                    reply(&mut io, opt, REP_INFO, &encode_info_string(INFO_DESCRIPTION, desc.as_bytes()))?;
                }
                // Sent unasked too: it is a hint, and clients that ignore it
                // meet defaults we honour anyway.
                let min = min_block(&shared.config);
                reply(
                    &mut io,
                    opt,
                    REP_INFO,
                    &encode_info_block_size(min, PREFERRED_BLOCK_SIZE.max(min), MAX_PAYLOAD),
                )?;
                reply(&mut io, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    return Ok(Outcome::Session(s));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply(&mut io, opt, REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")?;
                } else if s.extended {
                    reply(&mut io, opt, REP_ERR_EXT_HEADER_REQD, b"extended headers already negotiated")?;
                } else if s.structured {
                    reply(&mut io, opt, REP_ERR_INVALID, b"structured replies already negotiated")?;
                } else {
                    s.structured = true;
                    reply(&mut io, opt, REP_ACK, &[])?;
                }
            }
            OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    reply(&mut io, opt, REP_ERR_INVALID, b"NBD_OPT_EXTENDED_HEADERS takes no data")?;
                } else if s.extended {
                    reply(&mut io, opt, REP_ERR_INVALID, b"extended headers already negotiated")?;
                } else {
                    // They carry structured replies with them.
                    s.extended = true;
                    s.structured = true;
                    reply(&mut io, opt, REP_ACK, &[])?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let listing = opt == OPT_LIST_META_CONTEXT;
                if !listing {
                    // Replaces the selection even when the option fails.
                    s.base_allocation = false;
                    s.allocation_depth = false;
                    s.dirty_bitmaps = 0;
                }
                if !s.structured {
                    reply(&mut io, opt, REP_ERR_INVALID, b"structured replies must be negotiated first")?;
                    continue;
                }
                let req = match MetaContextRequest::decode(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        reply(&mut io, opt, REP_ERR_INVALID, e.0.as_bytes())?;
                        continue;
                    }
                };
                if !shared.name_matches(&req.export) {
                    reply(&mut io, opt, REP_ERR_UNKNOWN, b"export not available")?;
                    continue;
                }
                let (base, depth) = select_contexts(&req.queries, listing);
                let depth = depth && shared.config.allocation_depth;
                let mut bitmaps = 0u64;
                for (i, b) in shared.config.dirty_bitmaps.iter().enumerate().take(MAX_DIRTY_BITMAPS) {
                    if select_bitmap(&req.queries, listing, b) {
                        bitmaps |= 1 << i;
                    }
                }
                // Listing replies carry id 0, as the specification asks.
                let (id_base, id_depth) = if listing { (0, 0) } else { (ID_BASE_ALLOCATION, ID_ALLOCATION_DEPTH) };
                if base {
                    reply(&mut io, opt, REP_META_CONTEXT, &encode_meta_context(id_base, CONTEXT_BASE_ALLOCATION))?;
                }
                if depth {
                    reply(
                        &mut io,
                        opt,
                        REP_META_CONTEXT,
                        &encode_meta_context(id_depth, CONTEXT_QEMU_ALLOCATION_DEPTH),
                    )?;
                }
                // Last added first, as qemu-nbd lists them.
                for (i, b) in shared.config.dirty_bitmaps.iter().enumerate().rev() {
                    if bitmaps & (1 << i) != 0 {
                        let id = if listing { 0 } else { ID_DIRTY_BITMAP + i as u32 };
                        let name = format!("{CONTEXT_QEMU_DIRTY_BITMAP}{b}");
                        reply(&mut io, opt, REP_META_CONTEXT, &encode_meta_context(id, &name))?;
                    }
                }
                if !listing {
                    s.base_allocation = base;
                    s.allocation_depth = depth;
                    s.dirty_bitmaps = bitmaps;
                }
                reply(&mut io, opt, REP_ACK, &[])?;
            }
            OPT_STARTTLS if phase == Phase::Tls => reply(&mut io, opt, REP_ERR_INVALID, b"TLS is already enabled")?,
            OPT_STARTTLS => reply(&mut io, opt, REP_ERR_POLICY, b"TLS not configured")?,
            _ => reply(&mut io, opt, REP_ERR_UNSUP, b"option not supported")?,
        }
    }
}

/// The minimum block size an export advertises: its configured one when
/// the protocol allows it (a power of two, at most 64 KiB).
fn min_block(config: &super::config::ExportConfig) -> u32 {
    let m = config.min_block_size;
    if m.is_power_of_two() && m <= 64 << 10 {
        m
    } else {
        MIN_BLOCK_SIZE
    }
}

#[cfg(test)]
mod tests {
    use super::select_contexts;

    #[test]
    fn context_selection() {
        assert_eq!(select_contexts(&[], true), (true, true));
        assert_eq!(select_contexts(&[], false), (false, false));
        assert_eq!(select_contexts(&[b"base:".to_vec()], false), (false, false));
        assert_eq!(select_contexts(&[b"base:".to_vec()], true), (true, false));
        assert_eq!(select_contexts(&[b"qemu:allocation-depth".to_vec(), b"x-foo:bar".to_vec()], false), (false, true));
        assert_eq!(select_contexts(&[b"base:allocation".to_vec(), b"qemu:".to_vec()], true), (true, true));
    }
}
