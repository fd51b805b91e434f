//! Shared by the NBD tests: starting a server in-process, running QEMU's
//! tools against it with time limits, and a raw protocol client for the
//! cases QEMU's clients never produce.

use super::process::{run_within, READY_LIMIT};
use oxcow::nbd::proto::*;
use oxcow::nbd::server::{ExportConfig, ServeOptions, Server};
use oxcow::storage::{FileStorage, OpenFlags};
use oxcow::{BlockDevice, RawImage};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Where a test server listens.
#[derive(Debug, Clone)]
pub enum Addr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// A server running on its own thread; stopped when dropped.
pub struct Running {
    pub addr: Addr,
    pub shutdown: Arc<AtomicBool>,
    handle: Option<JoinHandle<oxcow::Result<()>>>,
}

impl Addr {
    /// The URI QEMU's tools (and oxcow) take for export `name`.
    pub fn uri(&self, name: &str) -> String {
        match self {
            Addr::Tcp(a) => format!("nbd://{a}/{name}"),
            Addr::Unix(p) => format!("nbd+unix:///{name}?socket={}", p.display()),
        }
    }
    /// The URI of the default export.
    pub fn url(&self) -> String {
        self.uri("")
    }
}

impl Running {
    /// The URI QEMU's tools take for export `name`.
    pub fn uri(&self, name: &str) -> String {
        self.addr.uri(name)
    }
    /// Asks the server to stop and waits (bounded) for it.
    pub fn stop(mut self) -> oxcow::Result<()> {
        self.shutdown.store(true, Ordering::Release);
        self.join(READY_LIMIT)
    }
    /// Waits (bounded) for the server to return by itself.
    pub fn join(&mut self, limit: Duration) -> oxcow::Result<()> {
        let h = self.handle.take().expect("already joined");
        let start = Instant::now();
        while !h.is_finished() {
            assert!(start.elapsed() < limit, "server did not return within {limit:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
        h.join().expect("server thread panicked")
    }
    /// Whether the serve loop has returned.
    pub fn is_finished(&self) -> bool {
        match &self.handle {
            Some(h) => h.is_finished(),
            None => true,
        }
    }
    /// Connects a raw TCP or Unix stream.
    pub fn connect(&self) -> Stream {
        let s = match &self.addr {
            Addr::Tcp(a) => Stream::Tcp(TcpStream::connect(a).expect("connect")),
            Addr::Unix(p) => Stream::Unix(UnixStream::connect(p).expect("connect")),
        };
        s.set_timeout(Some(Duration::from_secs(10)));
        s
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.store(true, Ordering::Release);
        if self.handle.is_some() && !std::thread::panicking() {
            let _ = self.join(READY_LIMIT);
        }
    }
}

pub fn opts(persistent: bool, max_connections: usize) -> ServeOptions {
    ServeOptions::default().persistent(persistent).max_connections(max_connections)
}

/// Starts a server on 127.0.0.1 with an ephemeral port.
pub fn start_tcp(dev: Arc<dyn BlockDevice>, config: ExportConfig, opts: ServeOptions) -> Running {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = Addr::Tcp(l.local_addr().expect("local addr"));
    let server = Server::new(dev, config);
    let shutdown = Arc::new(AtomicBool::new(false));
    let sd = Arc::clone(&shutdown);
    let handle = std::thread::spawn(move || server.serve(l, sd, &opts));
    Running { addr, shutdown, handle: Some(handle) }
}

/// Starts a server on a Unix socket at `path`.
pub fn start_unix(dev: Arc<dyn BlockDevice>, config: ExportConfig, opts: ServeOptions, path: &Path) -> Running {
    let l = UnixListener::bind(path).expect("bind unix");
    let server = Server::new(dev, config);
    let shutdown = Arc::new(AtomicBool::new(false));
    let sd = Arc::clone(&shutdown);
    let handle = std::thread::spawn(move || server.serve(l, sd, &opts));
    Running { addr: Addr::Unix(path.to_path_buf()), shutdown, handle: Some(handle) }
}

/// Creates a sparse raw file of `size` bytes.
pub fn sparse_file(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).expect("create");
    f.set_len(size).expect("set_len");
    p
}

/// Writes `data` at `offset` of a file.
pub fn write_file_at(path: &Path, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).expect("open");
    f.write_all_at(data, offset).expect("write");
}

/// Reads `len` bytes at `offset` of a file.
pub fn read_file_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).expect("open");
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, offset).expect("read");
    b
}

/// Opens a raw image over a file.
pub fn raw_device(path: &Path, read_only: bool) -> Arc<dyn BlockDevice> {
    let st = FileStorage::open(path, OpenFlags::default().write(!read_only)).expect("open storage");
    Arc::new(RawImage::new(Arc::new(st), read_only, false).expect("raw image"))
}

pub fn named(name: &str) -> ExportConfig {
    ExportConfig::new(name)
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Runs `qemu-io -f raw URI -c ...` and returns (success, combined output),
/// where success means exit 0 and no failed command or pattern mismatch.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> (bool, String) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        // Bare options (like "-r") pass through; the rest are commands.
        if cmd.starts_with('-') {
            c.arg(cmd);
        } else {
            c.args(["-c", cmd]);
        }
    }
    c.arg(uri);
    let out = run_within(&mut c, Duration::from_secs(60));
    let t = format!("{}\n{}", out.status, text(&out));
    let ok = out.status.success() && !t.contains("failed") && !t.contains("Pattern verification");
    (ok, t)
}

/// Like [`qemu_io`] but every command must succeed.
pub fn qemu_io_ok(uri: &str, cmds: &[&str]) -> String {
    let (ok, t) = qemu_io(uri, cmds);
    assert!(ok, "qemu-io {cmds:?} on {uri} failed:\n{t}");
    t
}

/// Runs `qemu-img ARGS`; it must succeed. Returns stdout.
pub fn qemu_img_ok(args: &[&str]) -> String {
    let out = run_within(Command::new("qemu-img").args(args), Duration::from_secs(120));
    assert!(out.status.success(), "qemu-img {args:?} failed:\n{}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// --- A raw protocol client -------------------------------------------------

/// A TCP or Unix stream.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub fn set_timeout(&self, t: Option<Duration>) {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(t).unwrap();
                s.set_write_timeout(t).unwrap();
            }
            Stream::Unix(s) => {
                s.set_read_timeout(t).unwrap();
                s.set_write_timeout(t).unwrap();
            }
        }
    }
    /// True when the peer closed (EOF or reset) within the read timeout.
    pub fn closed_by_peer(&mut self) -> bool {
        let mut b = [0u8; 4096];
        loop {
            match self.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One structured chunk or simple reply.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub flags: u16,
    pub kind: u16,
    pub payload: Vec<u8>,
}

/// A complete reply to one request.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    /// Error of a simple reply or the first error chunk (0: success).
    pub error: u32,
    /// Data of a simple read reply.
    pub data: Vec<u8>,
    /// Structured chunks, in arrival order.
    pub chunks: Vec<Chunk>,
    pub simple: bool,
    /// The offset each extended chunk header carried.
    pub offsets: Vec<u64>,
}

impl Reply {
    /// Reassembles a read reply into `len` bytes starting at `offset`.
    pub fn read_data(&self, offset: u64, len: usize) -> Vec<u8> {
        if self.simple {
            return self.data.clone();
        }
        let mut out = vec![0u8; len];
        let mut covered = 0usize;
        for c in &self.chunks {
            match c.kind {
                REPLY_TYPE_OFFSET_DATA => {
                    let o = u64::from_be_bytes(c.payload[..8].try_into().unwrap());
                    let rel = (o - offset) as usize;
                    out[rel..rel + c.payload.len() - 8].copy_from_slice(&c.payload[8..]);
                    covered += c.payload.len() - 8;
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    covered += u32::from_be_bytes(c.payload[8..12].try_into().unwrap()) as usize;
                }
                _ => {}
            }
        }
        assert_eq!(covered, len, "read reply does not cover the request: {:?}", self.kinds());
        out
    }
    pub fn kinds(&self) -> Vec<u16> {
        self.chunks.iter().map(|c| c.kind).collect()
    }
    /// Block status descriptors of context `id`.
    pub fn extents(&self, id: u32) -> Vec<(u32, u32)> {
        for c in &self.chunks {
            if c.kind == REPLY_TYPE_BLOCK_STATUS && u32::from_be_bytes(c.payload[..4].try_into().unwrap()) == id {
                return c.payload[4..]
                    .chunks_exact(8)
                    .map(|d| {
                        (u32::from_be_bytes(d[..4].try_into().unwrap()), u32::from_be_bytes(d[4..].try_into().unwrap()))
                    })
                    .collect();
            }
        }
        Vec::new()
    }
    /// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` descriptors of context `id`,
    /// checking the descriptor count against the payload.
    pub fn extents_ext(&self, id: u32) -> Vec<(u64, u64)> {
        for c in &self.chunks {
            if c.kind == REPLY_TYPE_BLOCK_STATUS_EXT && u32::from_be_bytes(c.payload[..4].try_into().unwrap()) == id {
                let count = u32::from_be_bytes(c.payload[4..8].try_into().unwrap()) as usize;
                assert_eq!(c.payload.len(), 8 + 16 * count, "descriptor count disagrees with the payload");
                return c.payload[8..]
                    .chunks_exact(16)
                    .map(|d| {
                        (u64::from_be_bytes(d[..8].try_into().unwrap()), u64::from_be_bytes(d[8..].try_into().unwrap()))
                    })
                    .collect();
            }
        }
        Vec::new()
    }
}

/// A minimal NBD client speaking the protocol byte by byte.
pub struct Client {
    pub s: Stream,
    pub size: u64,
    pub flags: u16,
    pub structured: bool,
    /// Extended headers were agreed: 32-byte requests and replies.
    pub extended: bool,
    /// Context ids by name.
    pub contexts: HashMap<String, u32>,
    pending_reads: HashMap<u64, u32>,
    partial: HashMap<u64, Reply>,
    done: HashMap<u64, Reply>,
}

impl Client {
    /// Reads the greeting and sends the client flags.
    pub fn start(mut s: Stream) -> Client {
        let mut g = [0u8; 18];
        s.read_exact(&mut g).expect("greeting");
        assert_eq!(&g[..8], &NBD_MAGIC.to_be_bytes());
        assert_eq!(&g[8..16], &IHAVEOPT.to_be_bytes());
        let hs = u16::from_be_bytes([g[16], g[17]]);
        assert_eq!(hs & FLAG_FIXED_NEWSTYLE, FLAG_FIXED_NEWSTYLE);
        s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes()).unwrap();
        Client {
            s,
            size: 0,
            flags: 0,
            structured: false,
            extended: false,
            contexts: HashMap::new(),
            pending_reads: HashMap::new(),
            partial: HashMap::new(),
            done: HashMap::new(),
        }
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) {
        self.s.write_all(&OptionHeader { option, length: data.len() as u32 }.encode()).unwrap();
        self.s.write_all(data).unwrap();
    }

    pub fn option_reply(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; option_reply::SIZE];
        self.s.read_exact(&mut h).expect("option reply");
        let r = OptionReplyHeader::decode(&h).expect("option reply header");
        let mut d = vec![0u8; r.length as usize];
        self.s.read_exact(&mut d).unwrap();
        (r.reply_type, d)
    }

    /// Sends an option and collects replies up to the final one.
    pub fn option(&mut self, option: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
        self.send_option(option, data);
        let mut out = Vec::new();
        loop {
            let (t, d) = self.option_reply();
            let fin = t == REP_ACK || t & (1 << 31) != 0;
            out.push((t, d));
            if fin {
                return out;
            }
        }
    }

    /// Negotiates extended headers, then contexts (when asked) and GO.
    pub fn go_extended(mut self, name: &str, contexts: &[&str]) -> Client {
        let r = self.option(OPT_EXTENDED_HEADERS, &[]);
        assert_eq!(r.last().unwrap().0, REP_ACK);
        self.extended = true;
        self.go(name, true, contexts)
    }

    /// Negotiates structured replies and contexts (when asked), then GO.
    pub fn go(mut self, name: &str, structured: bool, contexts: &[&str]) -> Client {
        if structured {
            if !self.extended {
                let r = self.option(OPT_STRUCTURED_REPLY, &[]);
                assert_eq!(r.last().unwrap().0, REP_ACK);
            }
            self.structured = true;
            if !contexts.is_empty() {
                let q = MetaContextRequest {
                    export: name.as_bytes().to_vec(),
                    queries: contexts.iter().map(|c| c.as_bytes().to_vec()).collect(),
                };
                for (t, d) in self.option(OPT_SET_META_CONTEXT, &q.encode()) {
                    if t == REP_META_CONTEXT {
                        let id = u32::from_be_bytes(d[..4].try_into().unwrap());
                        self.contexts.insert(String::from_utf8(d[4..].to_vec()).unwrap(), id);
                    } else {
                        assert_eq!(t, REP_ACK);
                    }
                }
            }
        }
        let req = InfoRequest { name: name.as_bytes().to_vec(), requests: vec![INFO_BLOCK_SIZE] };
        let replies = self.option(OPT_GO, &req.encode());
        let (last, msg) = replies.last().unwrap();
        assert_eq!(*last, REP_ACK, "GO failed: {}", String::from_utf8_lossy(msg));
        for (t, d) in &replies {
            if *t == REP_INFO && u16::from_be_bytes([d[0], d[1]]) == INFO_EXPORT {
                self.size = u64::from_be_bytes(d[2..10].try_into().unwrap());
                self.flags = u16::from_be_bytes([d[10], d[11]]);
            }
        }
        self
    }

    /// Sends a request (with `payload` for writes).
    pub fn send(&mut self, flags: u16, command: u16, cookie: u64, offset: u64, length: u32, payload: &[u8]) {
        if command == CMD_READ && !self.structured {
            self.pending_reads.insert(cookie, length);
        }
        let r = Request { flags, command, cookie, offset, length };
        self.s.write_all(&r.encode()).unwrap();
        self.s.write_all(payload).unwrap();
    }

    /// Sends an extended request (with `payload`, whose length the
    /// header then carries, when `CMD_FLAG_PAYLOAD_LEN` is in `flags`).
    pub fn send_ext(&mut self, flags: u16, command: u16, cookie: u64, offset: u64, length: u64, payload: &[u8]) {
        let r = ExtRequest { flags, command, cookie, offset, length };
        self.s.write_all(&r.encode()).unwrap();
        self.s.write_all(payload).unwrap();
    }

    /// Sends one extended request and waits for its reply.
    pub fn call_ext(&mut self, flags: u16, command: u16, offset: u64, length: u64, payload: &[u8]) -> Reply {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1 << 32);
        let cookie = NEXT.fetch_add(1, Ordering::Relaxed);
        self.send_ext(flags, command, cookie, offset, length, payload);
        self.wait(cookie)
    }

    /// Reads one extended reply chunk (its header's offset is kept for
    /// the test to check).
    fn pump_ext(&mut self) -> std::io::Result<()> {
        let mut h = [0u8; ext_chunk::SIZE];
        self.s.read_exact(&mut h)?;
        let c = ExtChunkHeader::decode(&h).expect("extended reply header (no simple replies after extended headers)");
        let mut payload = vec![0u8; c.length as usize];
        self.s.read_exact(&mut payload)?;
        let r = self.partial.entry(c.cookie).or_default();
        if c.chunk_type & (1 << 15) != 0 && r.error == 0 {
            r.error = u32::from_be_bytes(payload[..4].try_into().unwrap());
        }
        r.chunks.push(Chunk { flags: c.flags, kind: c.chunk_type, payload });
        r.offsets.push(c.offset);
        if c.flags & REPLY_FLAG_DONE != 0 {
            let r = self.partial.remove(&c.cookie).unwrap();
            assert!(!self.done.contains_key(&c.cookie), "second reply for cookie {}", c.cookie);
            self.done.insert(c.cookie, r);
        }
        Ok(())
    }

    /// Reads one message off the wire into the reply bookkeeping.
    pub fn pump(&mut self) -> std::io::Result<()> {
        if self.extended {
            return self.pump_ext();
        }
        let mut m = [0u8; 4];
        self.s.read_exact(&mut m)?;
        let size = ReplyHeader::size_for_magic(m).expect("reply magic");
        let mut h = vec![0u8; size];
        h[..4].copy_from_slice(&m);
        self.s.read_exact(&mut h[4..])?;
        match ReplyHeader::decode(&h).unwrap() {
            ReplyHeader::Simple { error, cookie } => {
                let mut data = Vec::new();
                if let Some(len) = self.pending_reads.remove(&cookie) {
                    if error == 0 {
                        data = vec![0u8; len as usize];
                        self.s.read_exact(&mut data)?;
                    }
                }
                assert!(!self.done.contains_key(&cookie), "second reply for cookie {cookie}");
                self.done.insert(cookie, Reply { error, data, chunks: Vec::new(), simple: true, offsets: Vec::new() });
            }
            ReplyHeader::Chunk { flags, chunk_type, cookie, length } => {
                let mut payload = vec![0u8; length as usize];
                self.s.read_exact(&mut payload)?;
                let r = self.partial.entry(cookie).or_default();
                if chunk_type & (1 << 15) != 0 && r.error == 0 {
                    r.error = u32::from_be_bytes(payload[..4].try_into().unwrap());
                }
                r.chunks.push(Chunk { flags, kind: chunk_type, payload });
                if flags & REPLY_FLAG_DONE != 0 {
                    let r = self.partial.remove(&cookie).unwrap();
                    assert!(!self.done.contains_key(&cookie), "second reply for cookie {cookie}");
                    self.done.insert(cookie, r);
                }
            }
        }
        Ok(())
    }

    /// Waits for the complete reply to `cookie`.
    pub fn wait(&mut self, cookie: u64) -> Reply {
        loop {
            if let Some(r) = self.done.remove(&cookie) {
                return r;
            }
            self.pump().unwrap_or_else(|e| panic!("waiting for reply {cookie}: {e}"));
        }
    }

    /// Sends one request and waits for its reply.
    pub fn call(&mut self, flags: u16, command: u16, offset: u64, length: u32, payload: &[u8]) -> Reply {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let cookie = NEXT.fetch_add(1, Ordering::Relaxed);
        self.send(flags, command, cookie, offset, length, payload);
        self.wait(cookie)
    }

    pub fn read(&mut self, offset: u64, length: u32) -> Vec<u8> {
        let r = self.call(0, CMD_READ, offset, length, &[]);
        assert_eq!(r.error, 0, "read failed");
        r.read_data(offset, length as usize)
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let r = self.call(0, CMD_WRITE, offset, data.len() as u32, data);
        assert_eq!(r.error, 0, "write failed");
    }

    /// Ends the session politely.
    pub fn disconnect(mut self) {
        let _ = if self.extended {
            self.s.write_all(&ExtRequest { flags: 0, command: CMD_DISC, cookie: 0, offset: 0, length: 0 }.encode())
        } else {
            self.s.write_all(&Request { flags: 0, command: CMD_DISC, cookie: 0, offset: 0, length: 0 }.encode())
        };
        assert!(self.s.closed_by_peer(), "server did not close after NBD_CMD_DISC");
    }
}

/// Connects, negotiates and returns a ready client.
pub fn client(r: &Running, name: &str, structured: bool, contexts: &[&str]) -> Client {
    Client::start(r.connect()).go(name, structured, contexts)
}
