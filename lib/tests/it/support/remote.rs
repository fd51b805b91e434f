//! Shared by the remote (NBD client) tests: a qemu-nbd base server, an
//! in-process oxcow server, and a TCP proxy that adds latency and counts
//! the READ requests passing through it.

pub use super::nbd::Addr as Upstream;
use super::nbd::{start_tcp, Running};
pub use super::process::have;
use super::process::{wait_for_socket, wait_ready};
use oxcow::nbd::proto::{CMD_READ, CMD_WRITE, IHAVEOPT, OPT_EXPORT_NAME, REQUEST_MAGIC};
use oxcow::nbd::server::{ExportConfig, ServeOptions};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A server process killed when dropped (qemu-nbd, nbdkit).
pub struct ServerProcess {
    child: Child,
    pub upstream: Upstream,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// qemu-nbd serving `file` (raw, read-only, persistent, several clients)
/// on a Unix socket in `dir`.
pub fn qemu_nbd(dir: &Path, file: &Path) -> ServerProcess {
    let sock = dir.join(format!("qemu-nbd-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let mut child = Command::new("qemu-nbd")
        .args(["-f", "raw", "-r", "-t", "-e", "16", "-x", "", "-k"])
        .arg(&sock)
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting qemu-nbd");
    wait_for_socket(&sock, Some(&mut child), "qemu-nbd");
    // Connecting above consumed one client slot briefly; qemu-nbd is
    // persistent, so that is harmless.
    ServerProcess { child, upstream: Upstream::Unix(sock) }
}

/// nbdkit with `plugin args...` on a Unix socket in `dir`.
pub fn nbdkit(dir: &Path, plugin_args: &[&str]) -> ServerProcess {
    let sock = dir.join(format!("nbdkit-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let pid = dir.join(format!("nbdkit-{}.pid", std::process::id()));
    let mut child = Command::new("nbdkit")
        .args(["-f", "-P"])
        .arg(&pid)
        .arg("-U")
        .arg(&sock)
        .args(plugin_args)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting nbdkit");
    // nbdkit writes its pid file once it accepts connections.
    wait_ready("nbdkit", Some(&mut child), || pid.exists());
    ServerProcess { child, upstream: Upstream::Unix(sock) }
}

/// An in-process oxcow server; stopped when dropped.
pub struct OxServer {
    pub upstream: Upstream,
    _server: Running,
}

impl OxServer {
    /// Serves `dev` on 127.0.0.1 (persistent, up to 16 clients).
    pub fn start(dev: Arc<dyn oxcow::BlockDevice>, read_only: bool) -> OxServer {
        let config = ExportConfig::default().read_only(read_only);
        let opts = ServeOptions::default().persistent(true).max_connections(16);
        let server = start_tcp(dev, config, opts);
        OxServer { upstream: server.addr.clone(), _server: server }
    }
}

enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Sock {
    fn connect(u: &Upstream) -> io::Result<Sock> {
        Ok(match u {
            Upstream::Tcp(a) => {
                let s = TcpStream::connect(a)?;
                s.set_nodelay(true)?;
                Sock::Tcp(s)
            }
            Upstream::Unix(p) => Sock::Unix(UnixStream::connect(p)?),
        })
    }
    fn try_clone(&self) -> io::Result<Sock> {
        Ok(match self {
            Sock::Tcp(s) => Sock::Tcp(s.try_clone()?),
            Sock::Unix(s) => Sock::Unix(s.try_clone()?),
        })
    }
    fn shutdown(&self) {
        let _ = match self {
            Sock::Tcp(s) => s.shutdown(Shutdown::Both),
            Sock::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Sock {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.read(b),
            Sock::Unix(s) => s.read(b),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write(b),
            Sock::Unix(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A gate closed by [`Proxy::hold`]: messages wait at it, in flight.
#[derive(Default)]
struct Gate {
    closed: Mutex<bool>,
    opened: Condvar,
}

impl Gate {
    fn set(&self, closed: bool) {
        *self.closed.lock().unwrap() = closed;
        self.opened.notify_all();
    }
    fn pass(&self) {
        let mut g = self.closed.lock().unwrap();
        while *g {
            g = self.opened.wait(g).unwrap();
        }
    }
}

/// Counters of what went through a proxy.
#[derive(Default)]
pub struct Counts {
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    pub requests: AtomicU64,
    pub connections: AtomicU64,
}

/// A TCP proxy in front of an NBD server: delays every transmission
/// request by `latency` (without serializing them: requests in flight stay
/// in flight) and counts them.
pub struct Proxy {
    pub addr: SocketAddr,
    pub counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    gate: Arc<Gate>,
    live: Arc<Mutex<Vec<Sock>>>,
    handle: Option<JoinHandle<()>>,
}

impl Proxy {
    pub fn start(upstream: Upstream, latency: Duration) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        l.set_nonblocking(true).expect("nonblocking");
        let addr = l.local_addr().expect("addr");
        let counts = Arc::new(Counts::default());
        let stop = Arc::new(AtomicBool::new(false));
        let live: Arc<Mutex<Vec<Sock>>> = Arc::default();
        let gate: Arc<Gate> = Arc::default();
        let (c, s, lv, gt) = (Arc::clone(&counts), Arc::clone(&stop), Arc::clone(&live), Arc::clone(&gate));
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Acquire) {
                match l.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        let _ = client.set_nodelay(true);
                        let Ok(server) = Sock::connect(&upstream) else { continue };
                        c.connections.fetch_add(1, Ordering::Relaxed);
                        let client = Sock::Tcp(client);
                        {
                            let mut g = lv.lock().unwrap();
                            g.push(client.try_clone().unwrap());
                            g.push(server.try_clone().unwrap());
                        }
                        spawn_pipes(client, server, latency, Arc::clone(&c), Arc::clone(&gt));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(2)),
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Proxy { addr, counts, stop, gate, live, handle: Some(handle) }
    }

    /// The NBD URL of the default export through the proxy.
    pub fn url(&self) -> String {
        format!("nbd://{}/", self.addr)
    }

    /// READ requests seen so far.
    pub fn reads(&self) -> u64 {
        self.counts.reads.load(Ordering::Acquire)
    }

    /// Bytes asked for by READ requests so far.
    pub fn read_bytes(&self) -> u64 {
        self.counts.read_bytes.load(Ordering::Acquire)
    }

    /// Holds every message from clients from now on until [`Proxy::release`]
    /// (so a test knows its requests are in flight).
    pub fn hold(&self) {
        self.gate.set(true);
    }

    /// Lets held and later messages through.
    pub fn release(&self) {
        self.gate.set(false);
    }

    /// Cuts every connection (both sides), as a network failure would.
    pub fn drop_connections(&self) {
        for s in self.live.lock().unwrap().drain(..) {
            s.shutdown();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.release();
        self.drop_connections();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn spawn_pipes(client: Sock, server: Sock, latency: Duration, counts: Arc<Counts>, gate: Arc<Gate>) {
    let (mut c_read, mut s_write) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let (mut s_read, mut c_write) = (server, client);
    // Server to client: a plain copy.
    std::thread::spawn(move || {
        let _ = io::copy(&mut s_read, &mut c_write);
        c_write.shutdown();
        s_read.shutdown();
    });
    // Client to server: parsed into messages, each released `latency`
    // after it arrived by a second thread.
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        while let Ok((due, bytes)) = rx.recv() {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            gate.pass();
            if s_write.write_all(&bytes).is_err() {
                break;
            }
        }
        s_write.shutdown();
    });
    std::thread::spawn(move || {
        let _ = client_to_server(&mut c_read, &tx, latency, &counts);
        c_read.shutdown();
    });
}

fn read_vec(r: &mut impl Read, n: usize) -> io::Result<Vec<u8>> {
    let mut v = vec![0u8; n];
    r.read_exact(&mut v)?;
    Ok(v)
}

fn client_to_server(
    r: &mut Sock,
    tx: &mpsc::Sender<(Instant, Vec<u8>)>,
    latency: Duration,
    counts: &Counts,
) -> io::Result<()> {
    let send = |b: Vec<u8>, delay: Duration| {
        tx.send((Instant::now() + delay, b)).map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))
    };
    // Client flags.
    send(read_vec(r, 4)?, Duration::ZERO)?;
    loop {
        let mut head = read_vec(r, 4)?;
        let w = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        if w == (IHAVEOPT >> 32) as u32 {
            head.extend(read_vec(r, 12)?);
            let opt = u32::from_be_bytes(head[8..12].try_into().unwrap());
            let len = u32::from_be_bytes(head[12..16].try_into().unwrap()) as usize;
            head.extend(read_vec(r, len)?);
            send(head, Duration::ZERO)?;
            let _ = opt == OPT_EXPORT_NAME;
        } else if w == REQUEST_MAGIC {
            head.extend(read_vec(r, 24)?);
            let cmd = u16::from_be_bytes([head[6], head[7]]);
            let len = u32::from_be_bytes(head[24..28].try_into().unwrap());
            counts.requests.fetch_add(1, Ordering::Relaxed);
            if cmd == CMD_READ {
                counts.reads.fetch_add(1, Ordering::Relaxed);
                counts.read_bytes.fetch_add(u64::from(len), Ordering::Relaxed);
            }
            if cmd == CMD_WRITE {
                head.extend(read_vec(r, len as usize)?);
            }
            send(head, latency)?;
        } else if w == EXTENDED_REQUEST_MAGIC {
            // QEMU's client negotiates extended headers with servers that
            // offer them (qemu-nbd does): 64-bit lengths, 32-byte headers.
            head.extend(read_vec(r, 28)?);
            let cmd = u16::from_be_bytes([head[6], head[7]]);
            let len = u64::from_be_bytes(head[24..32].try_into().unwrap());
            counts.requests.fetch_add(1, Ordering::Relaxed);
            if cmd == CMD_READ {
                counts.reads.fetch_add(1, Ordering::Relaxed);
                counts.read_bytes.fetch_add(len, Ordering::Relaxed);
            }
            if cmd == CMD_WRITE {
                head.extend(read_vec(r, len as usize)?);
            }
            send(head, latency)?;
        } else {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "proxy lost track of the stream"));
        }
    }
}

/// Magic of an extended-header request (`NBD_OPT_EXTENDED_HEADERS`).
const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;

/// A raw file of `size` bytes with deterministic data in most 64 KiB
/// blocks and holes in the rest, returned with its content.
pub fn patterned_base(dir: &Path, name: &str, size: u64, seed: u64) -> (PathBuf, Vec<u8>) {
    let p = dir.join(name);
    let mut content = vec![0u8; size as usize];
    let mut x = seed | 1;
    for (i, block) in content.chunks_mut(65536).enumerate() {
        // Every fourth block stays a hole.
        if i % 4 == 3 {
            continue;
        }
        for b in block.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
    let mut f = std::fs::File::create(&p).expect("create base");
    f.set_len(size).expect("set_len");
    for (i, block) in content.chunks(65536).enumerate() {
        if i % 4 != 3 {
            use std::os::unix::fs::FileExt;
            f.write_all_at(block, i as u64 * 65536).expect("write base");
        }
    }
    f.flush().unwrap();
    (p, content)
}
