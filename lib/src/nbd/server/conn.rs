//! The sockets a server can serve: TCP and Unix streams and their listeners.

use crate::nbd::tls::{Socket, TlsStream};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

/// A client connection: a byte stream that can be cloned (one handle
/// reads requests while another writes replies), shut down from another
/// thread, and given timeouts.
pub trait Connection: Read + Write + Send + Sync + 'static {
    /// Another handle to the same socket.
    fn try_clone_conn(&self) -> io::Result<Self>
    where
        Self: Sized;
    /// Shuts both directions down, waking any thread blocked on the socket.
    fn shutdown_conn(&self);
    /// Sets (or clears) the timeout of blocking reads.
    fn set_read_timeout_conn(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// Sets (or clears) the timeout of blocking writes.
    fn set_write_timeout_conn(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// Puts a freshly accepted socket in the mode the server expects:
    /// blocking, and for TCP without Nagle's delay (the specification asks
    /// for `TCP_NODELAY`: replies are small and latency-bound).
    fn prepare(&self) -> io::Result<()>;
}

impl Connection for TcpStream {
    fn try_clone_conn(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_conn(&self) {
        // The peer may already be gone; there is nothing left to do then.
        let _ = self.shutdown(Shutdown::Both);
    }
    fn set_read_timeout_conn(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)
    }
    fn set_write_timeout_conn(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_write_timeout(timeout)
    }
    fn prepare(&self) -> io::Result<()> {
        self.set_nonblocking(false)?;
        self.set_nodelay(true)
    }
}

impl Connection for UnixStream {
    fn try_clone_conn(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_conn(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
    fn set_read_timeout_conn(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)
    }
    fn set_write_timeout_conn(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_write_timeout(timeout)
    }
    fn prepare(&self) -> io::Result<()> {
        self.set_nonblocking(false)
    }
}

/// A session after `NBD_OPT_STARTTLS`: what follows the handshake runs
/// over it as over the plain socket.
impl<S: Socket> Connection for TlsStream<S> {
    fn try_clone_conn(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_conn(&self) {
        self.shutdown();
    }
    fn set_read_timeout_conn(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)
    }
    fn set_write_timeout_conn(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_write_timeout(timeout)
    }
    fn prepare(&self) -> io::Result<()> {
        // The socket underneath was prepared before the handshake.
        Ok(())
    }
}

/// A listening socket the server accepts clients from.
pub trait Listener: Send {
    /// The connections it yields (sockets, which TLS can run over).
    type Conn: Connection + Socket;
    /// Accepts one client (non-blocking once [`Listener::set_nonblocking_listener`]
    /// was called with `true`).
    fn accept_conn(&self) -> io::Result<Self::Conn>;
    /// Switches accepting between blocking and non-blocking.
    fn set_nonblocking_listener(&self, nonblocking: bool) -> io::Result<()>;
}

impl Listener for TcpListener {
    type Conn = TcpStream;
    fn accept_conn(&self) -> io::Result<TcpStream> {
        self.accept().map(|(s, _)| s)
    }
    fn set_nonblocking_listener(&self, nonblocking: bool) -> io::Result<()> {
        self.set_nonblocking(nonblocking)
    }
}

impl Listener for UnixListener {
    type Conn = UnixStream;
    fn accept_conn(&self) -> io::Result<UnixStream> {
        self.accept().map(|(s, _)| s)
    }
    fn set_nonblocking_listener(&self, nonblocking: bool) -> io::Result<()> {
        self.set_nonblocking(nonblocking)
    }
}
