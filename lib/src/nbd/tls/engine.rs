//! [`Engine`]: one TLS session, driven through memory buffers whichever
//! library runs it, so [`super::TlsStream`] and the handshake code read
//! and write the socket themselves and never care which stack is inside.
//!
//! rustls serves certificates; OpenSSL serves pre-shared keys, which
//! rustls does not implement. OpenSSL is given a [`MemIo`] in place of a
//! socket: it reads the raw bytes the caller fed in and writes records
//! into a buffer the caller drains, the same shape as rustls's API.

use openssl::ssl::{ErrorCode, SslStream};
use std::io::{self, Read, Write};

/// OpenSSL's "socket": raw bytes in, records out, never blocking.
#[derive(Debug, Default)]
pub struct MemIo {
    incoming: Vec<u8>,
    /// How much of `incoming` OpenSSL has read (it reads a record header,
    /// then its body: consumed bytes are dropped only once all are).
    pos: usize,
    outgoing: Vec<u8>,
    /// The peer's side of the socket ended.
    eof: bool,
}

impl Read for MemIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let rest = &self.incoming[self.pos..];
        if rest.is_empty() {
            return if self.eof { Ok(0) } else { Err(io::ErrorKind::WouldBlock.into()) };
        }
        let n = buf.len().min(rest.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.pos += n;
        if self.pos == self.incoming.len() {
            self.incoming.clear();
            self.pos = 0;
        }
        Ok(n)
    }
}

impl Write for MemIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.outgoing.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A TLS session of either library.
pub enum Engine {
    /// Certificates (`tls-creds-x509`).
    Rustls(Box<rustls::Connection>),
    /// Pre-shared keys (`tls-creds-psk`).
    Openssl(Box<SslStream<MemIo>>),
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Engine::Rustls(_) => "Engine::Rustls",
            Engine::Openssl(_) => "Engine::Openssl",
        })
    }
}

fn tls_error(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
}

fn ssl_io_error(e: openssl::ssl::Error, eof: bool) -> io::Error {
    match e.code() {
        ErrorCode::WANT_READ if !eof => io::ErrorKind::WouldBlock.into(),
        _ if eof => io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed the TLS connection"),
        _ => tls_error(e),
    }
}

impl Engine {
    /// Whether the handshake is still running.
    pub fn is_handshaking(&self) -> bool {
        match self {
            Engine::Rustls(c) => c.is_handshaking(),
            Engine::Openssl(s) => !s.ssl().is_init_finished(),
        }
    }

    /// Decrypted data, `WouldBlock` when the session needs more raw bytes.
    pub fn read_plain(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Engine::Rustls(c) => c.reader().read(buf),
            Engine::Openssl(s) => match s.ssl_read(buf) {
                Ok(n) => Ok(n),
                // close_notify: a clean end.
                Err(e) if e.code() == ErrorCode::ZERO_RETURN => Ok(0),
                Err(e) => {
                    let eof = s.get_ref().eof;
                    Err(ssl_io_error(e, eof))
                }
            },
        }
    }

    /// Hands raw bytes from the socket to the session (an empty slice: the
    /// peer's side ended); returns how many it took.
    pub fn read_tls(&mut self, rest: &mut &[u8]) -> io::Result<usize> {
        match self {
            Engine::Rustls(c) => c.read_tls(rest),
            Engine::Openssl(s) => {
                let io = s.get_mut();
                if rest.is_empty() {
                    io.eof = true;
                }
                io.incoming.extend_from_slice(rest);
                let n = rest.len();
                *rest = &rest[n..];
                Ok(n)
            }
        }
    }

    /// Decrypts what [`Engine::read_tls`] gave (OpenSSL does so lazily,
    /// in [`Engine::read_plain`]).
    pub fn process_new_packets(&mut self) -> io::Result<()> {
        match self {
            Engine::Rustls(c) => c.process_new_packets().map(|_| ()).map_err(tls_error),
            Engine::Openssl(_) => Ok(()),
        }
    }

    /// Whether records wait to be sent.
    pub fn wants_write(&self) -> bool {
        match self {
            Engine::Rustls(c) => c.wants_write(),
            Engine::Openssl(s) => !s.get_ref().outgoing.is_empty(),
        }
    }

    /// Moves the records waiting to be sent into `out`.
    pub fn write_tls(&mut self, out: &mut Vec<u8>) -> io::Result<usize> {
        match self {
            Engine::Rustls(c) => c.write_tls(out),
            Engine::Openssl(s) => {
                let io = s.get_mut();
                let n = io.outgoing.len();
                out.append(&mut io.outgoing);
                Ok(n)
            }
        }
    }

    /// Encrypts `buf` into records.
    pub fn write_plain(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Engine::Rustls(c) => c.writer().write(buf),
            Engine::Openssl(_) if buf.is_empty() => Ok(0),
            Engine::Openssl(s) => s.ssl_write(buf).map_err(tls_error),
        }
    }

    /// The peer's certificate chain, end entity first (none under PSK).
    pub fn peer_certificates(&self) -> Option<Vec<rustls::pki_types::CertificateDer<'static>>> {
        match self {
            Engine::Rustls(c) => c.peer_certificates().map(|c| c.to_vec()),
            Engine::Openssl(_) => None,
        }
    }

    /// Runs the handshake over `io` (whose reads and writes the caller
    /// bounds), including what a TLS 1.3 server sends right after it.
    pub fn complete_handshake<T: Read + Write>(&mut self, io: &mut T) -> io::Result<()> {
        match self {
            Engine::Rustls(tls) => {
                while tls.is_handshaking() {
                    if let Err(e) = tls.complete_io(io) {
                        // Tell the peer why, when rustls has an alert queued.
                        let _ = tls.write_tls(io);
                        return Err(e);
                    }
                }
                while tls.wants_write() {
                    tls.write_tls(io)?;
                }
            }
            Engine::Openssl(s) => {
                let mut chunk = vec![0u8; 16 << 10];
                loop {
                    let r = s.do_handshake();
                    let out = std::mem::take(&mut s.get_mut().outgoing);
                    match r {
                        Ok(()) => {
                            io.write_all(&out)?;
                            break;
                        }
                        Err(e) if e.code() == ErrorCode::WANT_READ => {
                            io.write_all(&out)?;
                            io.flush()?;
                            let n = io.read(&mut chunk)?;
                            if n == 0 {
                                return Err(io::Error::new(
                                    io::ErrorKind::UnexpectedEof,
                                    "peer closed the connection during the TLS handshake",
                                ));
                            }
                            s.get_mut().incoming.extend_from_slice(&chunk[..n]);
                        }
                        Err(_) if super::psk::identity_refused(s.ssl()) => {
                            // An unknown user: dropped without an alert, and
                            // reported in GnuTLS's words, as under QEMU.
                            return Err(io::Error::new(
                                io::ErrorKind::PermissionDenied,
                                "An illegal parameter has been received.",
                            ));
                        }
                        Err(e) => {
                            // The alert saying why, best effort.
                            let _ = io.write_all(&out);
                            return Err(tls_error(e));
                        }
                    }
                }
            }
        }
        io.flush()
    }
}
