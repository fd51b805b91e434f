//! The transmission phase of one client: a reader thread takes requests
//! off the socket, a small set of worker threads carries them out in
//! parallel, and replies go back in completion order (matched by cookie),
//! each written whole under the connection's write lock.

use super::config::{DetectZeroes, DiscardMode, ServeOptions};
use super::conn::Connection;
use super::export::{Session, Shared, ID_ALLOCATION_DEPTH, ID_BASE_ALLOCATION, ID_DIRTY_BITMAP, MAX_DIRTY_BITMAPS};
use super::status::{bitmap_status, block_status, read_segments, Segment, StatusReply};
use crate::nbd::proto::*;
use crate::storage::AlignedBuf;
use crate::Error;
use std::io::{self, BufRead, BufWriter, Read, Write};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking worker must not take the whole connection down with a
    // poisoned lock; the data behind these locks stays consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Bounds what one client can have in flight, so memory use is capped
/// whatever it sends: the reader stops taking requests until replies free
/// room (a single request larger than the byte budget still passes alone).
struct Budget {
    state: Mutex<InFlight>,
    freed: Condvar,
    max_bytes: usize,
    max_requests: usize,
}

#[derive(Default)]
struct InFlight {
    bytes: usize,
    requests: usize,
}

struct Permit {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Budget {
    fn acquire(self: &Arc<Self>, bytes: usize) -> Permit {
        let mut st = lock(&self.state);
        while (st.bytes > 0 && st.bytes + bytes > self.max_bytes) || st.requests >= self.max_requests {
            st = self.freed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.bytes += bytes;
        st.requests += 1;
        Permit { budget: Arc::clone(self), bytes }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut st = lock(&self.budget.state);
        st.bytes -= self.bytes;
        st.requests -= 1;
        self.budget.freed.notify_all();
    }
}

/// The reply side of a connection.
struct Replies<C: Connection> {
    out: Mutex<BufWriter<C>>,
    broken: AtomicBool,
    /// A handle kept only to shut the socket down when a reply fails, which
    /// wakes the reader blocked on the other handle.
    control: C,
}

impl<C: Connection> Replies<C> {
    /// Writes one whole reply; after a failure the connection is dead and
    /// later replies are dropped.
    fn send(&self, f: impl FnOnce(&mut BufWriter<C>) -> io::Result<()>) {
        if self.broken.load(Ordering::Acquire) {
            return;
        }
        let mut w = lock(&self.out);
        if f(&mut w).and_then(|()| w.flush()).is_err() {
            self.broken.store(true, Ordering::Release);
            self.control.shutdown_conn();
        }
    }
}

/// A request ready for a worker.
struct Job {
    req: ExtRequest,
    /// Aligned, so a device over O_DIRECT writes it without a copy.
    payload: AlignedBuf,
    _permit: Permit,
}

/// What a request came to.
enum Outcome {
    Done,
    /// `buf` is aligned, so a device over O_DIRECT reads into it directly.
    Read {
        buf: AlignedBuf,
        segments: Vec<Segment>,
    },
    Status(StatusReply, Selection),
    Failed {
        errno: u32,
        msg: String,
    },
}

/// The metadata contexts one block status request answers for: all those
/// negotiated, or the subset its payload names.
#[derive(Debug, Clone, Copy)]
struct Selection {
    base: bool,
    depth: bool,
    bitmaps: u64,
}

/// Largest range one block status request walks: a request (extended
/// headers allow 64 bits) for more gets a shorter answer, which the
/// protocol allows, and every descriptor length still fits 32 bits. A
/// multiple of 64 KiB, so of any minimum block size.
const MAX_STATUS_SPAN: u64 = 0xffff_0000;

fn fail(errno: u32, msg: impl Into<String>) -> Outcome {
    Outcome::Failed { errno, msg: msg.into() }
}

fn failed(e: &Error) -> Outcome {
    fail(errno_to_nbd(e.errno()), e.to_string())
}

/// Everything a worker needs.
struct Ctx<C: Connection> {
    shared: Arc<Shared>,
    session: Session,
    replies: Replies<C>,
    /// Jobs sent to the workers and not yet taken by one.
    waiting: AtomicUsize,
}

/// Serves requests until the client disconnects, breaks the protocol, or
/// the socket is shut down; in-flight requests are finished first.
pub(crate) fn run<C: Connection>(
    conn: C,
    shared: Arc<Shared>,
    session: Session,
    opts: &ServeOptions,
) -> io::Result<()> {
    conn.set_read_timeout_conn(None)?;
    // A client that stops reading its replies must not pin worker threads
    // forever.
    conn.set_write_timeout_conn(Some(opts.io_timeout))?;
    let ctx = Arc::new(Ctx {
        shared,
        session,
        replies: Replies {
            out: Mutex::new(BufWriter::with_capacity(64 << 10, conn.try_clone_conn()?)),
            broken: AtomicBool::new(false),
            control: conn.try_clone_conn()?,
        },
        waiting: AtomicUsize::new(0),
    });
    let budget = Arc::new(Budget {
        state: Mutex::new(InFlight::default()),
        freed: Condvar::new(),
        max_bytes: opts.max_in_flight_bytes.max(1),
        max_requests: opts.max_in_flight_requests.max(1),
    });
    let (tx, rx) = sync_channel::<Job>(opts.max_in_flight_requests.max(1));
    let rx = Arc::new(Mutex::new(rx));
    // Workers are started as the backlog asks for them, up to the limit:
    // one more whenever more than twice as many jobs wait as there are
    // workers (twice: a burst arrives before the workers just started take
    // anything; a client sending 16 requests at once gets 8). Each worker thread
    // costs a stack and a malloc arena, some 30 KiB resident: starting
    // all 16 at once kept `oxcow serve` above qemu-nbd's peak memory,
    // which serves from one thread.
    let max_workers = opts.workers.max(1);
    let spawn = |workers: &mut Vec<std::thread::JoinHandle<()>>| {
        let (ctx, rx) = (Arc::clone(&ctx), Arc::clone(&rx));
        std::thread::Builder::new().name("nbd-worker".into()).spawn(move || worker(&ctx, &rx)).map(|h| workers.push(h))
    };
    let mut workers = Vec::new();
    spawn(&mut workers)?;

    let mut reader = io::BufReader::with_capacity(64 << 10, conn);
    loop {
        // Idle between requests for as long as the client likes, as with
        // qemu-nbd; but once a message has begun it must keep coming.
        match reader.fill_buf() {
            Ok([]) | Err(_) => break,
            Ok(_) => {}
        }
        let Ok(req) = read_request(&mut reader, ctx.session.extended, opts.io_timeout) else {
            // Gone, or out of sync with the client: nothing later can be
            // trusted.
            break;
        };
        if req.command == CMD_DISC {
            break;
        }
        // A write always carries its payload: with extended headers the
        // specification asks for the payload-length flag on it, but
        // QEMU's client (10.0) sends writes without it. Any other command
        // carries one when flagged (extended headers only).
        let has_payload = req.command == CMD_WRITE || (ctx.session.extended && req.flags & CMD_FLAG_PAYLOAD_LEN != 0);
        let job = if has_payload {
            if req.length > u64::from(MAX_PAYLOAD) {
                // The payload cannot be buffered and skipping gigabytes
                // is what a denial of service wants: report and hang up,
                // as the specification allows.
                let msg = format!("payload of {} bytes exceeds the maximum of {MAX_PAYLOAD}", req.length);
                send_outcome(&ctx, &req, fail(EINVAL, msg));
                break;
            }
            let permit = budget.acquire(req.length as usize);
            let mut payload = AlignedBuf::for_direct_io(req.length as usize);
            if read_message(&mut reader, &mut payload, opts.io_timeout).is_err() {
                // Disconnected mid-payload: the partial write is dropped.
                break;
            }
            Job { req, payload, _permit: permit }
        } else if req.command == CMD_READ {
            let permit = budget.acquire(req.length.min(u64::from(MAX_PAYLOAD)) as usize);
            Job { req, payload: AlignedBuf::new(0, 1), _permit: permit }
        } else {
            Job { req, payload: AlignedBuf::new(0, 1), _permit: budget.acquire(0) }
        };
        let waiting = ctx.waiting.fetch_add(1, Ordering::AcqRel) + 1;
        if tx.send(job).is_err() {
            break;
        }
        // No job waits for one queued behind it (a writer waits only for
        // clusters another running job holds), so fewer workers than jobs
        // cost latency, never progress; a failed spawn is not fatal.
        if waiting > 2 * workers.len() && workers.len() < max_workers {
            let _ = spawn(&mut workers);
        }
    }
    drop(tx);
    for w in workers {
        let _ = w.join();
    }
    let _ = lock(&ctx.replies.out).flush();
    ctx.replies.control.shutdown_conn();
    Ok(())
}

/// Reads one request header, compact or extended as negotiated.
fn read_request<C: Connection>(
    reader: &mut io::BufReader<C>,
    extended: bool,
    timeout: Duration,
) -> io::Result<ExtRequest> {
    let bad = |e: ProtoError| io::Error::new(io::ErrorKind::InvalidData, e.0);
    if extended {
        let mut h = [0u8; ext_request::SIZE];
        read_message(reader, &mut h, timeout)?;
        ExtRequest::decode(&h).map_err(bad)
    } else {
        let mut h = [0u8; request::SIZE];
        read_message(reader, &mut h, timeout)?;
        Request::decode(&h).map(ExtRequest::from).map_err(bad)
    }
}

/// Reads the rest of a message that has begun, each read bounded by
/// `timeout` so a client stalling mid-message is dropped rather than
/// holding its connection slot forever. The socket's timeout is touched only
/// when the message is not already buffered.
fn read_message<C: Connection>(reader: &mut io::BufReader<C>, buf: &mut [u8], timeout: Duration) -> io::Result<()> {
    if reader.buffer().len() >= buf.len() {
        return reader.read_exact(buf);
    }
    reader.get_ref().set_read_timeout_conn(Some(timeout))?;
    reader.read_exact(buf)?;
    reader.get_ref().set_read_timeout_conn(None)
}

/// Largest read buffer a worker keeps for its next read: one per worker,
/// so a client's occasional huge read does not pin megabytes per thread.
const SPARE_MAX: usize = 128 << 10;

fn worker<C: Connection>(ctx: &Ctx<C>, rx: &Mutex<Receiver<Job>>) {
    // The last read's buffer, reused for the next read: a fresh one per
    // request left freed buffers behind in each worker's malloc arena.
    let mut spare = None;
    loop {
        let job = lock(rx).recv();
        let Ok(job) = job else { return };
        ctx.waiting.fetch_sub(1, Ordering::AcqRel);
        // A bug in a device must cost one request, not the connection
        // (whose other requests and client would hang without a reply).
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| execute(ctx, &job.req, &job.payload, spare.take())))
            .unwrap_or_else(|_| fail(EIO, "internal error while serving the request"));
        drop(job.payload);
        spare = send_outcome(ctx, &job.req, outcome).filter(|b| b.capacity() <= SPARE_MAX);
    }
}

fn check_flags(req: &ExtRequest, allowed: u16) -> Result<(), Outcome> {
    let extra = req.flags & !allowed;
    if extra != 0 {
        return Err(fail(EINVAL, format!("flags {extra:#x} not valid for command {}", req.command)));
    }
    Ok(())
}

/// `offset + len` lies within the export.
fn in_range(offset: u64, len: u64, size: u64) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= size)
}

fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(64);
    chunks.by_ref().all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0) && chunks.remainder().iter().all(|&b| b == 0)
}

fn execute<C: Connection>(ctx: &Ctx<C>, req: &ExtRequest, payload: &[u8], spare: Option<AlignedBuf>) -> Outcome {
    match execute_inner(ctx, req, payload, spare) {
        Ok(o) | Err(o) => o,
    }
}

fn execute_inner<C: Connection>(
    ctx: &Ctx<C>,
    req: &ExtRequest,
    payload: &[u8],
    spare: Option<AlignedBuf>,
) -> Result<Outcome, Outcome> {
    let shared = &ctx.shared;
    let dev = &*shared.device;
    let size = dev.len();
    let (off, len) = (req.offset, req.length);
    // The payload-length flag is legal on a write (where extended headers
    // require it) and on block status, and only with extended headers.
    let payload_flag = if ctx.session.extended { CMD_FLAG_PAYLOAD_LEN } else { 0 };
    let cfg = &shared.config;
    let flush_if_fua = || -> Result<Outcome, Outcome> {
        if req.flags & CMD_FLAG_FUA != 0 {
            dev.flush().map_err(|e| failed(&e))?;
        }
        Ok(Outcome::Done)
    };
    let writable = || -> Result<(), Outcome> {
        if shared.read_only {
            return Err(fail(EPERM, "export is read-only"));
        }
        Ok(())
    };
    match req.command {
        CMD_READ => {
            check_flags(req, CMD_FLAG_FUA | if ctx.session.structured { CMD_FLAG_DF } else { 0 })?;
            if req.length > u64::from(MAX_PAYLOAD) {
                return Err(fail(EINVAL, format!("read of {len} bytes exceeds the maximum of {MAX_PAYLOAD}")));
            }
            if !in_range(off, len, size) {
                return Err(fail(EINVAL, format!("read of {len} bytes at {off} is past the end ({size} bytes)")));
            }
            let n = req.length as usize;
            let mut buf = AlignedBuf::reuse_for_direct_io(spare, n);
            let segments = if n == 0 {
                Vec::new()
            } else if ctx.session.structured && req.flags & CMD_FLAG_DF == 0 {
                read_segments(dev, off, n)
            } else {
                vec![Segment { rel: 0, len: n, zero: false }]
            };
            for s in segments.iter().filter(|s| !s.zero) {
                dev.read_at(&mut buf[s.rel..s.rel + s.len], off + s.rel as u64).map_err(|e| failed(&e))?;
            }
            Ok(Outcome::Read { buf, segments })
        }
        CMD_WRITE => {
            check_flags(req, CMD_FLAG_FUA | payload_flag)?;
            writable()?;
            if !in_range(off, len, size) {
                return Err(fail(ENOSPC, format!("write of {len} bytes at {off} is past the end ({size} bytes)")));
            }
            if payload.is_empty() {
                return Ok(Outcome::Done);
            }
            if cfg.detect_zeroes != DetectZeroes::Off && is_zero(payload) {
                let unmap = cfg.detect_zeroes == DetectZeroes::Unmap && cfg.discard == DiscardMode::Unmap;
                dev.write_zeroes(off, len, unmap).map_err(|e| failed(&e))?;
            } else {
                dev.write_at(payload, off).map_err(|e| failed(&e))?;
            }
            flush_if_fua()
        }
        CMD_FLUSH => {
            check_flags(req, CMD_FLAG_FUA)?;
            dev.flush().map_err(|e| failed(&e))?;
            Ok(Outcome::Done)
        }
        CMD_TRIM => {
            check_flags(req, CMD_FLAG_FUA)?;
            writable()?;
            if !in_range(off, len, size) {
                return Err(fail(EINVAL, format!("trim of {len} bytes at {off} is past the end ({size} bytes)")));
            }
            if len == 0 || cfg.discard == DiscardMode::Ignore {
                return Ok(Outcome::Done);
            }
            dev.discard(off, len).map_err(|e| failed(&e))?;
            flush_if_fua()
        }
        CMD_CACHE => {
            check_flags(req, CMD_FLAG_FUA)?;
            if req.length > u64::from(MAX_PAYLOAD) || !in_range(off, len, size) {
                return Err(fail(EINVAL, format!("cache of {len} bytes at {off} is out of bounds")));
            }
            // A hint only: the device has no cache worth warming.
            Ok(Outcome::Done)
        }
        CMD_WRITE_ZEROES => {
            check_flags(req, CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO)?;
            writable()?;
            if !in_range(off, len, size) {
                return Err(fail(
                    ENOSPC,
                    format!("write zeroes of {len} bytes at {off} is past the end ({size} bytes)"),
                ));
            }
            if len == 0 {
                return Ok(Outcome::Done);
            }
            let may_unmap = req.flags & CMD_FLAG_NO_HOLE == 0 && cfg.discard == DiscardMode::Unmap;
            // Zeroing is only faster than writing when it can deallocate:
            // a hole punch for raw files, zero clusters for qcow2. Anything
            // else writes real zeros and must refuse a fast request.
            let fast = may_unmap && matches!(dev.format_name(), "raw" | "qcow2");
            if req.flags & CMD_FLAG_FAST_ZERO != 0 && !fast {
                return Err(fail(ENOTSUP, "zeroing this range would not be faster than writing it"));
            }
            dev.write_zeroes(off, len, may_unmap).map_err(|e| failed(&e))?;
            flush_if_fua()
        }
        CMD_BLOCK_STATUS => {
            check_flags(req, CMD_FLAG_FUA | CMD_FLAG_REQ_ONE | payload_flag)?;
            let s = &ctx.session;
            if !s.base_allocation && !s.allocation_depth && s.dirty_bitmaps == 0 {
                return Err(fail(EINVAL, "no metadata context was negotiated"));
            }
            let all = Selection { base: s.base_allocation, depth: s.allocation_depth, bitmaps: s.dirty_bitmaps };
            let (len, sel) = if req.flags & CMD_FLAG_PAYLOAD_LEN != 0 {
                let p = StatusPayload::decode(payload).map_err(|e| fail(EINVAL, e.0))?;
                (p.length, select_ids(all, &p.ids)?)
            } else {
                (len, all)
            };
            if len == 0 || !in_range(off, len, size) {
                return Err(fail(EINVAL, format!("block status of {len} bytes at {off} is out of bounds")));
            }
            let span = len.min(MAX_STATUS_SPAN) as u32;
            let req_one = req.flags & CMD_FLAG_REQ_ONE != 0;
            let mut r = block_status(dev, off, span, req_one, sel.base, sel.depth).map_err(|e| failed(&e))?;
            for (i, name) in cfg.dirty_bitmaps.iter().enumerate().take(MAX_DIRTY_BITMAPS) {
                if sel.bitmaps & (1 << i) != 0 {
                    let d = bitmap_status(dev, name, off, span, req_one).map_err(|e| failed(&e))?;
                    r.bitmaps.push((i, d));
                }
            }
            Ok(Outcome::Status(r, sel))
        }
        other => Err(fail(EINVAL, format!("unknown command {other}"))),
    }
}

/// The contexts a block status payload names, each one negotiated and
/// named once (none named: all of them).
fn select_ids(all: Selection, ids: &[u32]) -> Result<Selection, Outcome> {
    if ids.is_empty() {
        return Ok(all);
    }
    let mut sel = Selection { base: false, depth: false, bitmaps: 0 };
    for &id in ids {
        let dup = match id {
            ID_BASE_ALLOCATION if all.base => std::mem::replace(&mut sel.base, true),
            ID_ALLOCATION_DEPTH if all.depth => std::mem::replace(&mut sel.depth, true),
            _ => {
                let bit =
                    id.checked_sub(ID_DIRTY_BITMAP).filter(|&i| (i as usize) < MAX_DIRTY_BITMAPS).map(|i| 1u64 << i);
                match bit {
                    Some(b) if all.bitmaps & b != 0 => {
                        let had = sel.bitmaps & b != 0;
                        sel.bitmaps |= b;
                        had
                    }
                    _ => return Err(fail(EINVAL, format!("metadata context {id} was not negotiated"))),
                }
            }
        };
        if dup {
            return Err(fail(EINVAL, format!("metadata context {id} named twice")));
        }
    }
    Ok(sel)
}

/// Encodes one context's block status chunk payload.
type EncodeStatus = fn(u32, &[(u32, u32)]) -> Vec<u8>;

/// How reply headers are framed on a connection.
#[derive(Clone, Copy)]
struct Framing {
    structured: bool,
    extended: bool,
    cookie: u64,
    /// The request's offset, which extended headers repeat.
    offset: u64,
}

impl Framing {
    /// Writes the header of a chunk with `len` bytes of payload.
    fn chunk<W: Write>(&self, w: &mut W, flags: u16, chunk_type: u16, len: usize) -> io::Result<()> {
        if self.extended {
            w.write_all(&encode_ext_chunk_header(flags, chunk_type, self.cookie, self.offset, len as u64))
        } else {
            w.write_all(&encode_chunk_header(flags, chunk_type, self.cookie, len as u32))
        }
    }
    /// A reply without data: success or an error.
    fn status<W: Write>(&self, w: &mut W, errno: u32, msg: &str) -> io::Result<()> {
        if errno == 0 && self.extended {
            // Extended headers leave no simple replies.
            self.chunk(w, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0)
        } else if errno == 0 || !self.structured {
            w.write_all(&encode_simple_reply(errno, self.cookie))
        } else {
            let p = encode_error_payload(errno, msg);
            self.chunk(w, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, p.len())?;
            w.write_all(&p)
        }
    }
}

/// Sends the reply of `req`; gives back a read's buffer for reuse.
fn send_outcome<C: Connection>(ctx: &Ctx<C>, req: &ExtRequest, outcome: Outcome) -> Option<AlignedBuf> {
    let f = Framing {
        structured: ctx.session.structured,
        extended: ctx.session.extended,
        cookie: req.cookie,
        offset: req.offset,
    };
    let mut back = None;
    ctx.replies.send(|w| match outcome {
        Outcome::Done => f.status(w, 0, ""),
        Outcome::Failed { errno, msg } => f.status(w, errno, &msg),
        Outcome::Read { buf, segments } => {
            let r = write_read_reply(w, req, f, &buf, &segments);
            back = Some(buf);
            r
        }
        Outcome::Status(r, sel) => {
            let (kind, encode): (u16, EncodeStatus) = if f.extended {
                (REPLY_TYPE_BLOCK_STATUS_EXT, encode_block_status_ext)
            } else {
                (REPLY_TYPE_BLOCK_STATUS, encode_block_status)
            };
            let mut chunks = Vec::new();
            if sel.base {
                chunks.push(encode(ID_BASE_ALLOCATION, &r.base));
            }
            if sel.depth {
                chunks.push(encode(ID_ALLOCATION_DEPTH, &r.depth));
            }
            for (i, d) in &r.bitmaps {
                chunks.push(encode(ID_DIRTY_BITMAP + *i as u32, d));
            }
            let last = chunks.len().saturating_sub(1);
            for (i, c) in chunks.iter().enumerate() {
                let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
                f.chunk(w, flags, kind, c.len())?;
                w.write_all(c)?;
            }
            Ok(())
        }
    });
    back
}

/// The reply to a read: a simple reply with the data, or structured
/// chunks (data, and holes for the ranges known to read as zeros).
fn write_read_reply<W: Write>(
    w: &mut W,
    req: &ExtRequest,
    f: Framing,
    buf: &[u8],
    segments: &[Segment],
) -> io::Result<()> {
    if !f.structured {
        w.write_all(&encode_simple_reply(0, req.cookie))?;
        return w.write_all(buf);
    }
    if segments.is_empty() {
        return f.chunk(w, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0);
    }
    let last = segments.len() - 1;
    for (i, s) in segments.iter().enumerate() {
        // Everything was read before the first byte went out, so
        // the last content chunk can close the reply.
        let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
        let abs = req.offset + s.rel as u64;
        if s.zero {
            f.chunk(w, flags, REPLY_TYPE_OFFSET_HOLE, 12)?;
            w.write_all(&encode_hole(abs, s.len as u32))?;
        } else {
            f.chunk(w, flags, REPLY_TYPE_OFFSET_DATA, 8 + s.len)?;
            w.write_all(&abs.to_be_bytes())?;
            w.write_all(&buf[s.rel..s.rel + s.len])?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{failed, is_zero, Outcome, EIO, ENOSPC};
    use crate::Error;
    use std::io;

    fn wire_errno(e: &Error) -> u32 {
        match failed(e) {
            Outcome::Failed { errno, .. } => errno,
            _ => unreachable!("failed() always fails"),
        }
    }

    #[test]
    fn enospc_reaches_the_client_as_enospc_also_from_a_poisoned_image() {
        let nospc = || Error::io("writing guest data", io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(wire_errno(&nospc()), ENOSPC);
        assert_eq!(wire_errno(&Error::Poisoned(Box::new(nospc()))), ENOSPC);
        let eio = Error::io("flushing image", io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(wire_errno(&Error::Poisoned(Box::new(eio))), EIO);
        // An error rebuilt from a message (as an NBD client's) keeps its kind.
        let rebuilt = Error::io("NBD server error", io::Error::new(io::ErrorKind::StorageFull, "No space left"));
        assert_eq!(wire_errno(&rebuilt), ENOSPC);
        assert_eq!(wire_errno(&Error::corrupt("L2 entry")), EIO);
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 4097]));
        let mut b = vec![0u8; 4097];
        b[4096] = 1;
        assert!(!is_zero(&b));
        b[4096] = 0;
        b[3] = 1;
        assert!(!is_zero(&b));
    }
}
