//! [`Server`]: accepting clients, limiting how many are served at once,
//! and shutting down cleanly.

use super::conn::{Connection, Listener};
use super::{handshake, transmission, ExportConfig};
use crate::{BlockDevice, Error, Result};
use std::collections::HashMap;
use std::io;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the accept loop looks at the shutdown flag and the number of
/// live connections.
const POLL: Duration = Duration::from_millis(10);

/// Tuning of [`Server::serve`].
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Keep serving after the last client leaves (qemu-nbd's `-t`);
    /// otherwise serving ends once a client has come and all have gone.
    pub persistent: bool,
    /// Most clients served at once (qemu-nbd's `-e`, default 1; 0 counts
    /// as 1); further clients wait in the listen backlog until a slot
    /// frees, as with qemu-nbd.
    pub max_connections: usize,
    /// Worker threads per connection carrying out requests in parallel.
    pub workers: usize,
    /// Longest a client may take to finish negotiation.
    pub handshake_timeout: Duration,
    /// Longest the server waits on a client in the middle of a message,
    /// either way (the rest of a request once it has begun, or room to
    /// send a reply) before dropping it. Idle time between requests is not
    /// limited.
    pub io_timeout: Duration,
    /// Payload bytes (write data and read buffers) one client may have in
    /// flight before its further requests wait.
    pub max_in_flight_bytes: usize,
    /// Requests one client may have in flight before its further requests wait.
    pub max_in_flight_requests: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            persistent: false,
            max_connections: 1,
            workers: 4,
            handshake_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(60),
            max_in_flight_bytes: 64 << 20,
            max_in_flight_requests: 128,
        }
    }
}

/// State shared by every connection of a server.
pub(crate) struct Shared {
    pub device: Arc<dyn BlockDevice>,
    pub config: ExportConfig,
    /// Writes are refused (asked for, or the device itself is read-only).
    pub read_only: bool,
    stopping: AtomicBool,
    live: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    next: u64,
    shutdowns: HashMap<u64, Box<dyn Fn() + Send>>,
}

impl Shared {
    /// Whether `name` selects the export: its own name, or the empty name
    /// that means the default export (the only one here).
    pub fn name_matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.config.name.as_bytes()
    }
    /// The server is shutting down.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }
    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// Remembers how to shut a connection down; `None` when the server is
    /// already stopping (the connection is shut down at once).
    fn register(&self, shutdown: Box<dyn Fn() + Send>) -> Option<u64> {
        let mut r = self.registry();
        if self.is_stopping() {
            drop(r);
            shutdown();
            return None;
        }
        let id = r.next;
        r.next += 1;
        r.shutdowns.insert(id, shutdown);
        Some(id)
    }
    fn unregister(&self, id: u64) {
        self.registry().shutdowns.remove(&id);
    }
    fn stop_all(&self) {
        let r = self.registry();
        self.stopping.store(true, Ordering::Release);
        for s in r.shutdowns.values() {
            s();
        }
    }
}

/// An NBD server exporting one device. Cheap to clone; clones serve the
/// same export.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

impl Server {
    /// A server for `device`, presented as `config` says.
    pub fn new(device: Arc<dyn BlockDevice>, config: ExportConfig) -> Server {
        let read_only = config.read_only || device.is_read_only();
        Server {
            shared: Arc::new(Shared {
                device,
                config,
                read_only,
                stopping: AtomicBool::new(false),
                live: Mutex::new(Registry::default()),
            }),
        }
    }

    /// The export's configuration.
    pub fn config(&self) -> &ExportConfig {
        &self.shared.config
    }

    /// Whether the export refuses writes.
    pub fn is_read_only(&self) -> bool {
        self.shared.read_only
    }

    /// Serves TCP clients; see [`Server::serve`].
    pub fn serve_tcp(
        &self,
        listener: TcpListener,
        shutdown: Arc<AtomicBool>,
        persistent: bool,
        max_connections: usize,
    ) -> Result<()> {
        self.serve(listener, shutdown, &ServeOptions { persistent, max_connections, ..ServeOptions::default() })
    }

    /// Serves Unix socket clients; see [`Server::serve`].
    pub fn serve_unix(
        &self,
        listener: UnixListener,
        shutdown: Arc<AtomicBool>,
        persistent: bool,
        max_connections: usize,
    ) -> Result<()> {
        self.serve(listener, shutdown, &ServeOptions { persistent, max_connections, ..ServeOptions::default() })
    }

    /// Accepts and serves clients, each on its own threads, until
    /// `shutdown` is set (live clients are then disconnected once their
    /// in-flight requests finish) or, unless `opts.persistent`, until a
    /// client has come and every client has gone. The device is flushed
    /// before returning.
    ///
    /// Errors are those of the listener and of the final flush; a failing
    /// client only ever loses its own connection.
    pub fn serve<L: Listener>(&self, listener: L, shutdown: Arc<AtomicBool>, opts: &ServeOptions) -> Result<()> {
        listener.set_nonblocking_listener(true).map_err(|e| Error::io("configuring the NBD listener", e))?;
        let active = Arc::new(AtomicUsize::new(0));
        let mut served_any = false;
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let max = opts.max_connections.max(1);
        loop {
            if shutdown.load(Ordering::Acquire) {
                self.shared.stop_all();
                break;
            }
            threads.retain(|t| !t.is_finished());
            let n = active.load(Ordering::Acquire);
            if !opts.persistent && served_any && n == 0 {
                break;
            }
            if n >= max {
                std::thread::sleep(POLL);
                continue;
            }
            match listener.accept_conn() {
                Ok(conn) => {
                    served_any = true;
                    active.fetch_add(1, Ordering::AcqRel);
                    let guard = ActiveGuard(Arc::clone(&active));
                    let (server, opts) = (self.clone(), opts.clone());
                    let spawned = std::thread::Builder::new().name("nbd-conn".into()).spawn(move || {
                        let _guard = guard;
                        // A client's failure is its own business.
                        let _ = server.serve_connection(conn, &opts);
                    });
                    if let Ok(t) = spawned {
                        threads.push(t);
                    }
                    // On spawn failure the closure, the client socket and
                    // the guard are dropped: the client is refused.
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Aborted handshakes, descriptor exhaustion, ...: transient
                // for a listener; back off and keep serving.
                Err(_) => std::thread::sleep(POLL * 10),
            }
        }
        for t in threads {
            let _ = t.join();
        }
        self.shared.device.flush()
    }

    /// Serves one already connected client on the calling thread (with
    /// worker threads of its own) until it disconnects.
    pub fn serve_connection<C: Connection>(&self, mut conn: C, opts: &ServeOptions) -> io::Result<()> {
        conn.prepare()?;
        let control = conn.try_clone_conn()?;
        let Some(id) = self.shared.register(Box::new(move || control.shutdown_conn())) else {
            return Ok(());
        };
        let result = (|| match handshake::negotiate(&mut conn, &self.shared, opts.handshake_timeout)? {
            Some(session) => transmission::run(conn, Arc::clone(&self.shared), session, opts),
            None => Ok(()),
        })();
        self.shared.unregister(id);
        result
    }
}

/// Counts a connection as live until its thread ends.
struct ActiveGuard(Arc<AtomicUsize>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
