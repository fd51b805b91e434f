//! Option haggling: from the greeting to the transmission phase.
//!
//! The whole negotiation runs under one deadline (qemu-nbd allows 10 s), so
//! a client that connects and stalls, or trickles options forever, cannot
//! hold a connection slot.

use super::conn::Connection;
use super::export::{Session, Shared, ID_ALLOCATION_DEPTH, ID_BASE_ALLOCATION, ID_DIRTY_BITMAP, MAX_DIRTY_BITMAPS};
use crate::nbd::proto::*;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

/// Option data longer than this is not read into memory: the longest
/// legitimate option (a metadata query list) is far smaller.
const MAX_OPTION_DATA: u32 = 64 << 10;
/// Option data longer than this is not even skipped: the client is hostile.
const MAX_OPTION_SKIP: u32 = 1 << 20;

/// The transmission flags advertised for this export.
pub(crate) fn transmission_flags(shared: &Shared, structured: bool) -> u16 {
    let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_CACHE;
    if shared.read_only {
        f |= FLAG_READ_ONLY;
    } else {
        f |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    }
    if structured {
        f |= FLAG_SEND_DF;
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

/// Runs the negotiation. `Ok(None)` means the client ended it (or asked for
/// an export we cannot give through `NBD_OPT_EXPORT_NAME`); errors are I/O
/// failures, timeouts and protocol violations, after which the connection
/// is simply dropped.
pub(crate) fn negotiate<C: Connection>(
    conn: &mut C,
    shared: &Shared,
    timeout: Duration,
) -> io::Result<Option<Session>> {
    let mut io = Deadlined { conn, deadline: Instant::now() + timeout };
    io.write_all(&encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))?;
    let mut cf = [0u8; 4];
    io.read_exact(&mut cf)?;
    let client_flags = u32::from_be_bytes(cf);
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(violation(format!("unknown client flags {client_flags:#x}")));
    }
    let fixed = client_flags & FLAG_C_FIXED_NEWSTYLE != 0;
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    let mut s = Session { structured: false, base_allocation: false, allocation_depth: false, dirty_bitmaps: 0 };

    loop {
        let mut h = [0u8; option_header::SIZE];
        io.read_exact(&mut h)?;
        let hdr = OptionHeader::decode(&h).map_err(|e| violation(e.0))?;
        let opt = hdr.option;
        if !fixed && opt != OPT_EXPORT_NAME {
            // Plain newstyle clients cannot parse option replies.
            return Err(violation(format!("option {opt} from a client without fixed newstyle")));
        }
        if hdr.length > MAX_OPTION_SKIP {
            return Err(violation(format!("option {opt} with {} bytes of data", hdr.length)));
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
        if shared.is_stopping() && opt != OPT_ABORT {
            if opt == OPT_EXPORT_NAME {
                return Ok(None);
            }
            reply(&mut io, opt, REP_ERR_SHUTDOWN, b"server is shutting down")?;
            continue;
        }

        match opt {
            OPT_EXPORT_NAME => {
                if !shared.name_matches(&data) {
                    // This option cannot carry an error: the specification
                    // says to end the session.
                    return Ok(None);
                }
                let flags = transmission_flags(shared, s.structured);
                io.write_all(&encode_export_name_reply(shared.device.len(), flags, no_zeroes))?;
                return Ok(Some(s));
            }
            OPT_ABORT => {
                // The client may already have closed; the ack is a courtesy.
                let _ = reply(&mut io, opt, REP_ACK, &[]);
                return Ok(None);
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
                let flags = transmission_flags(shared, s.structured);
                reply(&mut io, opt, REP_INFO, &encode_info_export(shared.device.len(), flags))?;
                if req.requests.contains(&INFO_NAME) {
                    reply(&mut io, opt, REP_INFO, &encode_info_string(INFO_NAME, shared.config.name.as_bytes()))?;
                }
                if req.requests.contains(&INFO_DESCRIPTION) && !shared.config.description.is_empty() {
                    let desc = truncate_utf8(&shared.config.description, MAX_STRING);
                    reply(&mut io, opt, REP_INFO, &encode_info_string(INFO_DESCRIPTION, desc.as_bytes()))?;
                }
                // Sent unasked too: it is a hint, and clients that ignore it
                // meet defaults we honour anyway.
                reply(
                    &mut io,
                    opt,
                    REP_INFO,
                    &encode_info_block_size(MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, MAX_PAYLOAD),
                )?;
                reply(&mut io, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    return Ok(Some(s));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply(&mut io, opt, REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")?;
                } else if s.structured {
                    reply(&mut io, opt, REP_ERR_INVALID, b"structured replies already negotiated")?;
                } else {
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
            OPT_STARTTLS => reply(&mut io, opt, REP_ERR_POLICY, b"TLS is not offered by this server")?,
            _ => reply(&mut io, opt, REP_ERR_UNSUP, b"option not supported")?,
        }
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
