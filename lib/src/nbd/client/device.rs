//! An NBD client: a remote export as a [`BlockDevice`], so a qcow2 image
//! can use a network export as its backing file (`nbd://HOST[:PORT]/NAME`,
//! `nbd+unix:///NAME?socket=PATH`).
//!
//! - Fixed newstyle negotiation with `NBD_OPT_GO` (falling back to
//!   `NBD_OPT_EXPORT_NAME` on servers without it), structured replies and
//!   the `base:allocation` metadata context when the server offers them.
//!   Holes in read replies arrive as hole chunks and are not transferred.
//! - Many requests in flight on one connection (see `conn`): every
//!   caller thread sends its own request and waits for its own reply.
//! - When the connection drops, the client reconnects and retries the
//!   failed request once; a second failure is reported.
//! - Requests are split at the server's maximum payload and widened to its
//!   minimum block size (unaligned writes become read-modify-write).

use super::conn::{plain_io_message, Conn, Event, ExportInfo, ReqError};
use super::url::NbdUrl;
use crate::device::{check_range, BlockDevice, BlockStatus};
use crate::nbd::proto::*;
use crate::nbd::tls::TlsClient;
use crate::{Error, Result};
use std::io;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Tuning of an [`NbdClient`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientOptions {
    /// Longest wait to connect and negotiate.
    pub connect_timeout: Duration,
    /// Longest wait for the reply to one request before the connection is
    /// considered dead (and the request retried once on a new one).
    pub request_timeout: Duration,
    /// Reconnect and retry once when the connection drops.
    pub reconnect: bool,
    /// Open read-only even when the server allows writes.
    pub read_only: bool,
    /// How long a reconnect keeps trying when the server is not back yet
    /// (QEMU's `reconnect-delay`); `None`: one attempt.
    pub reconnect_delay: Option<Duration>,
}

setters!(ClientOptions { connect_timeout: Duration, request_timeout: Duration, reconnect: bool, read_only: bool } opt { reconnect_delay: Duration });

/// Pause between two reconnect attempts within a reconnect delay.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(120),
            reconnect: true,
            read_only: false,
            reconnect_delay: None,
        }
    }
}

/// A remote NBD export as a block device.
pub struct NbdClient {
    url: NbdUrl,
    /// Credentials, loaded once, when the location asks for TLS.
    tls: Option<TlsClient>,
    opts: ClientOptions,
    info: ExportInfo,
    /// The live connection, with a generation number so that of several
    /// callers seeing the same dead connection only one reconnects.
    conn: Mutex<(u64, Option<Arc<Conn>>)>,
    /// Unaligned writes (read-modify-write) hold it exclusively, every
    /// other write, zeroing and trim shared: an aligned write landing
    /// between an RMW's read and write would otherwise be undone, also in
    /// the bytes the unaligned write never touched.
    rmw: RwLock<()>,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("url", &self.url)
            .field("size", &self.info.size)
            .field("flags", &self.info.flags)
            .finish_non_exhaustive()
    }
}

/// The error for a failed connection, worded like QEMU's.
fn connect_error(url: &NbdUrl, e: &io::Error) -> Error {
    if let Some(m) = super::conn::negotiation_message(e) {
        // Worded whole already; tools print it without the prefix.
        let inner = io::Error::new(e.kind(), super::conn::NegotiationError(m.to_string()));
        return Error::io(format!("Failed to connect to '{}'", url.addr), inner);
    }
    Error::io(format!("Failed to connect to '{}'", url.addr), io::Error::new(e.kind(), plain_io_message(e)))
}

impl NbdClient {
    /// Connects to the export named by `url` (see [`NbdUrl::parse`]).
    pub fn connect(url: &str) -> Result<NbdClient> {
        Self::connect_with(NbdUrl::parse(url)?, ClientOptions::default())
    }

    /// Connects with explicit options.
    pub fn connect_with(url: NbdUrl, opts: ClientOptions) -> Result<NbdClient> {
        let tls = match &url.tls {
            Some(t) => {
                let creds = match &t.psk {
                    Some(p) => TlsClient::from_psk_file(&p.file, &p.username)?,
                    None => TlsClient::from_x509_dir(&t.certificates, t.verify_peer)?,
                };
                Some(creds.with_hostname(t.hostname.clone()))
            }
            None => None,
        };
        let conn = Conn::open(
            &url.addr,
            &url.export,
            url.x_dirty_bitmap.as_deref(),
            tls.as_ref(),
            opts.connect_timeout,
            opts.request_timeout,
        )
        .map_err(|e| connect_error(&url, &e))?;
        let info = conn.info;
        Ok(NbdClient { url, tls, opts, info, conn: Mutex::new((0, Some(Arc::new(conn)))), rmw: RwLock::new(()) })
    }

    /// The location connected to.
    pub fn url(&self) -> &NbdUrl {
        &self.url
    }

    /// The transmission flags the server sent.
    pub fn transmission_flags(&self) -> u16 {
        self.info.flags
    }

    /// Whether block status comes from the server (`base:allocation`).
    pub fn has_block_status(&self) -> bool {
        self.info.base_allocation.is_some()
    }

    fn current(&self) -> Result<(u64, Arc<Conn>)> {
        let mut g = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = &g.1 {
            if !c.is_dead() {
                return Ok((g.0, Arc::clone(c)));
            }
        }
        if !self.opts.reconnect {
            return Err(Error::io(
                format!("connection to '{}' lost", self.url.addr),
                io::Error::new(io::ErrorKind::NotConnected, "reconnecting is disabled"),
            ));
        }
        // Dead, or not replaced after a failed reconnect.
        self.reconnect_locked(&mut g)
    }

    fn reconnect_locked(&self, g: &mut (u64, Option<Arc<Conn>>)) -> Result<(u64, Arc<Conn>)> {
        if let Some(old) = g.1.take() {
            old.kill("reconnecting");
        }
        // A server restarting takes a moment to listen again: within the
        // reconnect delay, failed attempts are retried.
        let give_up = self.opts.reconnect_delay.map(|d| Instant::now() + d);
        let conn = loop {
            let attempt = Conn::open(
                &self.url.addr,
                &self.url.export,
                self.url.x_dirty_bitmap.as_deref(),
                self.tls.as_ref(),
                self.opts.connect_timeout,
                self.opts.request_timeout,
            );
            match attempt {
                Ok(c) => break c,
                Err(_) if give_up.is_some_and(|t| Instant::now() + RECONNECT_PAUSE < t) => {
                    std::thread::sleep(RECONNECT_PAUSE)
                }
                Err(e) => return Err(connect_error(&self.url, &e)),
            }
        };
        if conn.info.size != self.info.size {
            return Err(Error::invalid(format!(
                "export '{}' changed size from {} to {} across a reconnect",
                self.url, self.info.size, conn.info.size
            )));
        }
        let c = Arc::new(conn);
        g.0 += 1;
        g.1 = Some(Arc::clone(&c));
        Ok((g.0, c))
    }

    /// Runs `f` on the current connection; when the connection dropped,
    /// reconnects (once for all callers that saw the same connection die)
    /// and runs it once more.
    /// Each attempt gets its own deadline (`request_timeout` from its start).
    fn with_conn<T>(&self, what: &str, f: impl Fn(&Conn, Instant) -> std::result::Result<T, ReqError>) -> Result<T> {
        let (gen, conn) = self.current()?;
        match f(&conn, self.deadline()) {
            Ok(v) => Ok(v),
            Err(ReqError::Disconnected(why)) if self.opts.reconnect => {
                let conn = {
                    let mut g = self.conn.lock().unwrap_or_else(|e| e.into_inner());
                    match &g.1 {
                        Some(c) if g.0 != gen && !c.is_dead() => Arc::clone(c),
                        _ => {
                            self.reconnect_locked(&mut g)
                                .map_err(|e| {
                                    Error::io(
                                        format!("{what}: connection to '{}' lost ({why})", self.url.addr),
                                        io_of(&e),
                                    )
                                })?
                                .1
                        }
                    }
                };
                f(&conn, self.deadline()).map_err(|e| self.req_error(what, e))
            }
            Err(e) => Err(self.req_error(what, e)),
        }
    }

    fn req_error(&self, what: &str, e: ReqError) -> Error {
        match e {
            ReqError::Disconnected(why) => Error::io(
                format!("{what}: connection to '{}' lost", self.url.addr),
                io::Error::new(io::ErrorKind::ConnectionAborted, why),
            ),
            ReqError::Server(errno, msg) => {
                let os = nbd_to_errno(errno);
                let ctx = if msg.is_empty() {
                    format!("{what}: NBD server error")
                } else {
                    format!("{what}: NBD server error ({msg})")
                };
                let src = io::Error::from_raw_os_error(os);
                Error::io(ctx, io::Error::new(src.kind(), plain_io_message(&src)))
            }
            ReqError::Protocol(why) => Error::io(
                format!("{what}: NBD server '{}' broke the protocol", self.url.addr),
                io::Error::new(io::ErrorKind::InvalidData, why),
            ),
        }
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.opts.request_timeout
    }

    /// One request without a data reply; waits for its completion.
    fn simple(
        conn: &Conn,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: Option<&[u8]>,
        deadline: Instant,
    ) -> std::result::Result<(), ReqError> {
        let rx = conn.submit(cmd, flags, offset, len, payload)?;
        let mut err = None;
        loop {
            match conn.next_event(&rx, deadline)? {
                Event::Done => break,
                Event::Error(e, m) => {
                    err.get_or_insert((e, m));
                }
                _ => return Err(ReqError::Protocol(format!("unexpected reply content for command {cmd}"))),
            }
        }
        match err {
            Some((e, m)) => Err(ReqError::Server(e, m)),
            None => Ok(()),
        }
    }

    /// Reads an aligned range no longer than the maximum payload.
    fn read_chunk(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u32;
        let data = self.with_conn("reading from NBD export", |conn, deadline| {
            let rx = conn.submit(CMD_READ, 0, offset, len, None)?;
            let mut out = vec![0u8; len as usize];
            let mut covered = 0u64;
            let mut err = None;
            loop {
                match conn.next_event(&rx, deadline)? {
                    Event::Done => break,
                    Event::Data(at, d) => {
                        let s = (at - offset) as usize;
                        out[s..s + d.len()].copy_from_slice(&d);
                        covered += d.len() as u64;
                    }
                    // Already zeros in `out`: holes cost no transfer.
                    Event::Hole(n) => covered += u64::from(n),
                    Event::Error(e, m) => {
                        err.get_or_insert((e, m));
                    }
                    Event::Status(..) => return Err(ReqError::Protocol("block status in a read reply".into())),
                }
            }
            if let Some((e, m)) = err {
                return Err(ReqError::Server(e, m));
            }
            if covered != u64::from(len) {
                return Err(ReqError::Protocol(format!("read reply covered {covered} of {len} bytes")));
            }
            Ok(out)
        })?;
        buf.copy_from_slice(&data);
        Ok(())
    }

    fn max_chunk(&self) -> u64 {
        let min = u64::from(self.info.min_block.max(1));
        (u64::from(self.info.max_payload) / min * min).max(min)
    }

    /// The read-modify-write lock, shared: held by every write, zeroing
    /// and trim that is not itself a read-modify-write.
    fn rmw_shared(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.rmw.read().unwrap_or_else(|e| e.into_inner())
    }

    fn align_down(&self, v: u64) -> u64 {
        let a = u64::from(self.info.min_block.max(1));
        v / a * a
    }

    fn align_up(&self, v: u64) -> u64 {
        let a = u64::from(self.info.min_block.max(1));
        v.div_ceil(a) * a
    }

    fn read_aligned(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        let step = self.max_chunk() as usize;
        while done < buf.len() {
            let n = step.min(buf.len() - done);
            self.read_chunk(&mut buf[done..done + n], offset + done as u64)?;
            done += n;
        }
        Ok(())
    }

    fn write_aligned(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        let step = self.max_chunk() as usize;
        while done < buf.len() {
            let n = step.min(buf.len() - done);
            let chunk = &buf[done..done + n];
            let at = offset + done as u64;
            self.with_conn("writing to NBD export", |conn, deadline| {
                Self::simple(conn, CMD_WRITE, 0, at, n as u32, Some(chunk), deadline)
            })?;
            done += n;
        }
        Ok(())
    }

    fn writable(&self) -> Result<()> {
        if self.is_read_only() {
            return Err(Error::ReadOnly(format!("NBD export '{}' is read-only", self.url)));
        }
        Ok(())
    }

    /// Sends a command over `[offset, offset + len)` in pieces a u32 length holds.
    fn ranged(&self, what: &str, cmd: u16, flags: u16, offset: u64, len: u64) -> Result<()> {
        let step = self.align_down(1 << 30).max(u64::from(self.info.min_block));
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = step.min(end - pos);
            self.with_conn(what, |conn, deadline| Self::simple(conn, cmd, flags, pos, n as u32, None, deadline))?;
            pos += n;
        }
        Ok(())
    }
}

pub(super) fn io_of(e: &Error) -> io::Error {
    match e {
        Error::Io { source, .. } => io::Error::new(source.kind(), plain_io_message(source)),
        other => io::Error::other(other.to_string()),
    }
}

/// Maps an NBD error value back to a host errno.
fn nbd_to_errno(e: u32) -> i32 {
    match e {
        EPERM => libc::EPERM,
        ENOMEM => libc::ENOMEM,
        EINVAL => libc::EINVAL,
        ENOSPC => libc::ENOSPC,
        EOVERFLOW => libc::EOVERFLOW,
        ENOTSUP => libc::ENOTSUP,
        ESHUTDOWN => libc::ESHUTDOWN,
        _ => libc::EIO,
    }
}

impl BlockDevice for NbdClient {
    fn len(&self) -> u64 {
        self.info.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        let (a, b) = (self.align_down(offset), self.align_up(offset + buf.len() as u64).min(self.len()));
        if a == offset && b == offset + buf.len() as u64 {
            return self.read_aligned(buf, offset);
        }
        let mut tmp = vec![0u8; (b - a) as usize];
        self.read_aligned(&mut tmp, a)?;
        let s = (offset - a) as usize;
        buf.copy_from_slice(&tmp[s..s + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writable()?;
        check_range(offset, buf.len() as u64, self.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        let (a, b) = (self.align_down(offset), self.align_up(offset + buf.len() as u64).min(self.len()));
        if a == offset && b == offset + buf.len() as u64 {
            let _g = self.rmw_shared();
            return self.write_aligned(buf, offset);
        }
        // Read-modify-write of the blocks around an unaligned write.
        let _g = self.rmw.write().unwrap_or_else(|e| e.into_inner());
        let mut tmp = vec![0u8; (b - a) as usize];
        self.read_aligned(&mut tmp, a)?;
        let s = (offset - a) as usize;
        tmp[s..s + buf.len()].copy_from_slice(buf);
        self.write_aligned(&tmp, a)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.writable()?;
        check_range(offset, len, self.len())?;
        let aligned = self.align_down(offset) == offset && (self.align_up(offset + len) == offset + len);
        if self.info.flags & FLAG_SEND_WRITE_ZEROES != 0 && aligned {
            let flags = if may_unmap { 0 } else { CMD_FLAG_NO_HOLE };
            let _g = self.rmw_shared();
            return self.ranged("writing zeroes to NBD export", CMD_WRITE_ZEROES, flags, offset, len);
        }
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut pos = offset;
        while pos < offset + len {
            let n = CHUNK.min(offset + len - pos);
            self.write_at(&zeros[..n as usize], pos)?;
            pos += n;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.writable()?;
        check_range(offset, len, self.len())?;
        // Discards are advisory: without server support, or for the
        // unaligned edges, nothing needs to happen.
        if self.info.flags & FLAG_SEND_TRIM == 0 {
            return Ok(());
        }
        let (a, b) = (self.align_up(offset), self.align_down(offset + len));
        if a >= b {
            return Ok(());
        }
        let _g = self.rmw_shared();
        self.ranged("discarding on NBD export", CMD_TRIM, 0, a, b - a)
    }

    fn flush(&self) -> Result<()> {
        if self.is_read_only() || self.info.flags & FLAG_SEND_FLUSH == 0 {
            return Ok(());
        }
        self.with_conn("flushing NBD export", |conn, deadline| Self::simple(conn, CMD_FLUSH, 0, 0, 0, None, deadline))
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let size = self.len();
        if offset >= size || len == 0 {
            return Err(Error::invalid("block status past the end of the export"));
        }
        let len = len.min(size - offset);
        let data_status = |n: u64, zero: bool, data: bool| BlockStatus {
            offset,
            length: n,
            allocated: true,
            zero,
            data,
            compressed: false,
            host_offset: Some(offset),
            depth: 0,
        };
        let Some(id) = self.info.base_allocation else {
            return Ok(data_status(len, false, true));
        };
        // The request must be aligned to the minimum block size; the
        // answer for the aligned range covers `offset` too.
        let a = self.align_down(offset);
        let max = self.align_down(u32::MAX as u64).max(u64::from(self.info.min_block));
        let req_len = (self.align_up(offset + len).min(size) - a).min(max) as u32;
        let ext = self.with_conn("querying NBD block status", |conn, deadline| {
            let rx = conn.submit(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, a, req_len, None)?;
            let mut first = None;
            let mut err = None;
            loop {
                match conn.next_event(&rx, deadline)? {
                    Event::Done => break,
                    Event::Status(cid, ex) if cid == id => {
                        if first.is_none() {
                            first = ex.first().copied();
                        }
                    }
                    Event::Status(..) => {}
                    Event::Error(e, m) => {
                        err.get_or_insert((e, m));
                    }
                    _ => return Err(ReqError::Protocol("data in a block status reply".into())),
                }
            }
            if let Some((e, m)) = err {
                return Err(ReqError::Server(e, m));
            }
            first.ok_or_else(|| ReqError::Protocol("block status reply without base:allocation extents".into()))
        })?;
        let (ext_len, flags) = ext;
        if ext_len == 0 {
            return Err(self
                .req_error("querying NBD block status", ReqError::Protocol("block status extent of length 0".into())));
        }
        // The extent starts at `a`; what of it lies at or after `offset`.
        let ext_end = a + u64::from(ext_len);
        if ext_end <= offset {
            // An extent shorter than the alignment slack: report the
            // rest of the block as data, which is always safe.
            return Ok(data_status(self.align_up(offset + 1).min(size) - offset, false, true));
        }
        let n = (ext_end - offset).min(len);
        let (zero, data) = (flags & STATE_ZERO != 0, flags & STATE_HOLE == 0);
        let mut st = data_status(n, zero, data);
        // A dirty bitmap read as allocation (QEMU's x-dirty-bitmap): dirty
        // extents come as holes and show as not present, as QEMU maps them.
        if self.url.x_dirty_bitmap.is_some() && !(zero || data) {
            st.allocated = false;
            st.host_offset = None;
        }
        Ok(st)
    }

    fn format_name(&self) -> &'static str {
        "nbd"
    }

    fn is_read_only(&self) -> bool {
        self.opts.read_only || self.info.flags & FLAG_READ_ONLY != 0
    }

    fn close(&self) -> Result<()> {
        let r = self.flush();
        if let Some(c) = self.conn.lock().unwrap_or_else(|e| e.into_inner()).1.take() {
            c.disconnect();
        }
        r
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        if let Some(c) = self.conn.lock().unwrap_or_else(|e| e.into_inner()).1.take() {
            c.disconnect();
        }
    }
}
