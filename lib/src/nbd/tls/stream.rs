//! [`TlsStream`]: a TLS session over a socket that, like the plain
//! socket, can be cloned so one thread reads while others write.
//!
//! Both ends of NBD read on one thread and write replies or requests from
//! others, so rustls's single-owner `StreamOwned` does not fit. Here the
//! session state sits behind a mutex that is never held across a blocking
//! socket call: a reader decrypts what it has, and only when the session
//! needs more bytes does it read the socket, unlocked; a writer encrypts
//! under the session lock and sends the records under a separate send
//! lock, taken first, so records leave in the order they were sealed.

use super::engine::Engine;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// A read from a session the peer ended without closing it (no
/// close_notify), worded as QEMU's TLS channel reports it.
pub const TRUNCATED: &str = "Cannot read from TLS channel: The TLS connection was non-properly terminated.";

/// Raw TLS bytes read from the socket at once.
const READ_CHUNK: usize = 32 << 10;

/// What a socket under TLS must offer: cloning, shutdown from any thread
/// and timeouts, all through `&self`.
pub trait Socket: Read + Write + Send + Sync + 'static {
    /// Another handle to the same socket.
    fn try_clone_socket(&self) -> io::Result<Self>
    where
        Self: Sized;
    /// Shuts both directions down, waking any thread blocked on it.
    fn shutdown_socket(&self);
    /// Sets (or clears) the timeout of blocking reads.
    fn set_read_timeout_socket(&self, t: Option<Duration>) -> io::Result<()>;
    /// Sets (or clears) the timeout of blocking writes.
    fn set_write_timeout_socket(&self, t: Option<Duration>) -> io::Result<()>;
    /// Ends our direction only: the peer reads the end, and may still send.
    fn shutdown_write_socket(&self) {
        self.shutdown_socket();
    }
}

macro_rules! impl_socket {
    ($t:ty) => {
        impl Socket for $t {
            fn try_clone_socket(&self) -> io::Result<Self> {
                self.try_clone()
            }
            fn shutdown_socket(&self) {
                // The peer may be gone already; nothing is left to do then.
                let _ = self.shutdown(Shutdown::Both);
            }
            fn set_read_timeout_socket(&self, t: Option<Duration>) -> io::Result<()> {
                self.set_read_timeout(t)
            }
            fn set_write_timeout_socket(&self, t: Option<Duration>) -> io::Result<()> {
                self.set_write_timeout(t)
            }
            fn shutdown_write_socket(&self) {
                let _ = self.shutdown(Shutdown::Write);
            }
        }
    };
}
impl_socket!(TcpStream);
impl_socket!(UnixStream);

struct Session {
    tls: Engine,
    /// Raw bytes read from the socket that rustls has not taken yet (it
    /// takes no more while decrypted data waits to be read).
    raw: Vec<u8>,
    raw_pos: usize,
    /// The peer's side of the socket ended.
    eof: bool,
}

struct Inner<S> {
    session: Mutex<Session>,
    /// Taken before `session` by whoever sends records, and held until they
    /// are on the wire.
    sender: Mutex<S>,
    /// Held by the one reader while it waits on the socket, with the
    /// buffer it reads into.
    receiver: Mutex<(S, Vec<u8>)>,
    control: S,
}

/// A TLS session over a socket, after the handshake. Clones share the
/// session: any clone may read or write (one reader at a time makes sense).
pub struct TlsStream<S: Socket> {
    inner: Arc<Inner<S>>,
}

impl<S: Socket> std::fmt::Debug for TlsStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream").finish_non_exhaustive()
    }
}

/// Runs the handshake of `tls` over `io` (whose reads and writes the
/// caller bounds), including the tickets a TLS 1.3 server sends after it.
pub fn complete_handshake<T: Read + Write>(tls: &mut Engine, io: &mut T) -> io::Result<()> {
    tls.complete_handshake(io)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<S: Socket> TlsStream<S> {
    /// Wraps a session whose handshake [`complete_handshake`] finished
    /// over `sock`.
    pub fn new(tls: Engine, sock: S) -> io::Result<TlsStream<S>> {
        let receiver = sock.try_clone_socket()?;
        let control = sock.try_clone_socket()?;
        Ok(TlsStream {
            inner: Arc::new(Inner {
                session: Mutex::new(Session { tls, raw: Vec::new(), raw_pos: 0, eof: false }),
                sender: Mutex::new(sock),
                receiver: Mutex::new((receiver, Vec::new())),
                control,
            }),
        })
    }

    /// The peer's certificate chain (end entity first), if it sent one.
    pub fn peer_certificates(&self) -> Option<Vec<rustls::pki_types::CertificateDer<'static>>> {
        lock(&self.inner.session).tls.peer_certificates()
    }

    /// Another handle to the same session.
    pub fn try_clone(&self) -> io::Result<TlsStream<S>> {
        Ok(TlsStream { inner: Arc::clone(&self.inner) })
    }

    /// Shuts the socket down, waking blocked readers and writers.
    pub fn shutdown(&self) {
        self.inner.control.shutdown_socket();
    }

    /// Hangs up on a peer refused after the handshake without a reset:
    /// our side ends (the peer reads the end of the session, not closed
    /// by TLS, as QEMU's server leaves it), then what the peer had sent
    /// meanwhile is read and dropped until it hangs up too or `limit`
    /// passes, so no unread data turns our close into a reset.
    pub fn hang_up(&mut self, limit: Duration) {
        self.inner.control.shutdown_write_socket();
        if self.set_read_timeout(Some(limit.max(Duration::from_millis(1)))).is_err() {
            return;
        }
        let mut sink = [0u8; 4096];
        while matches!(self.read(&mut sink), Ok(n) if n > 0) {}
    }

    /// Sets (or clears) the timeout of blocking reads.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.inner.control.set_read_timeout_socket(t)
    }

    /// Sets (or clears) the timeout of blocking writes.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.inner.control.set_write_timeout_socket(t)
    }

    /// Sends whatever records the session has sealed (alerts, key
    /// updates, or data a writer just gave it).
    fn send_pending(&self) -> io::Result<()> {
        let mut sock = lock(&self.inner.sender);
        let mut out = Vec::new();
        {
            let mut s = lock(&self.inner.session);
            while s.tls.wants_write() {
                s.tls.write_tls(&mut out)?;
            }
        }
        sock.write_all(&out)
    }
}

impl<S: Socket> Read for TlsStream<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut guard = lock(&self.inner.receiver);
        let (receiver, chunk) = &mut *guard;
        loop {
            let replies = {
                let mut guard = lock(&self.inner.session);
                let s = &mut *guard;
                match s.tls.read_plain(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                let pending = s.raw_pos < s.raw.len();
                if pending || s.eof {
                    // An empty slice tells rustls the peer's side ended.
                    let mut rest = &s.raw[s.raw_pos..];
                    let taken = s.tls.read_tls(&mut rest)?;
                    s.raw_pos += taken;
                    let processed = s.tls.process_new_packets();
                    let replies = s.tls.wants_write();
                    if let Err(e) = processed {
                        drop(guard);
                        // The alert explaining the failure, best effort.
                        let _ = self.send_pending();
                        return Err(e);
                    }
                    if !pending {
                        // The end, clean (close_notify: no more data) or
                        // truncated (an error, in GnuTLS's words as QEMU
                        // reports it).
                        return match s.tls.read_plain(buf) {
                            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::UnexpectedEof) => {
                                Err(io::Error::new(io::ErrorKind::UnexpectedEof, TRUNCATED))
                            }
                            other => other,
                        };
                    }
                    if taken == 0 && !replies {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, "TLS session takes no more data"));
                    }
                    Some(replies)
                } else {
                    None
                }
            };
            match replies {
                Some(true) => {
                    self.send_pending()?;
                    continue;
                }
                Some(false) => continue,
                None => {}
            }
            // The session needs bytes the socket has not delivered yet.
            chunk.resize(READ_CHUNK, 0);
            let n = match receiver.read(chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let mut s = lock(&self.inner.session);
            let consumed = s.raw_pos;
            s.raw.drain(..consumed);
            s.raw_pos = 0;
            if n == 0 {
                s.eof = true;
            } else {
                s.raw.extend_from_slice(&chunk[..n]);
            }
        }
    }
}

impl<S: Socket> Write for TlsStream<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut sock = lock(&self.inner.sender);
        let mut out = Vec::with_capacity(buf.len() + 64);
        let n = {
            let mut s = lock(&self.inner.session);
            let n = s.tls.write_plain(buf)?;
            while s.tls.wants_write() {
                s.tls.write_tls(&mut out)?;
            }
            n
        };
        sock.write_all(&out)?;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        lock(&self.inner.sender).flush()
    }
}
