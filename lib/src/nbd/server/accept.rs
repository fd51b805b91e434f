//! [`Server`]: accepting clients, limiting how many are served at once,
//! and shutting down cleanly.

use super::config::{ExportConfig, ServeOptions};
use super::conn::{Connection, Listener};
use super::export::Shared;
use super::handshake::{self, Outcome, Phase};
use super::transmission;
use crate::nbd::tls::Socket;
use crate::{BlockDevice, Error, Result};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the accept loop looks at the shutdown flag and the number of
/// live connections.
const POLL: Duration = Duration::from_millis(10);

/// An NBD server exporting one device. Cheap to clone; clones serve the
/// same export.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("config", &self.shared.config)
            .field("read_only", &self.shared.read_only)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// A server for `device`, presented as `config` says.
    pub fn new(device: Arc<dyn BlockDevice>, config: ExportConfig) -> Server {
        Server { shared: Arc::new(Shared::new(device, config)) }
    }

    /// The export's configuration.
    pub fn config(&self) -> &ExportConfig {
        &self.shared.config
    }

    /// Whether the export refuses writes.
    pub fn is_read_only(&self) -> bool {
        self.shared.read_only
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
    ///
    /// With [`ServeOptions::tls`] set, the client must start TLS before
    /// anything else (every other option is refused with
    /// `NBD_REP_ERR_TLS_REQD`, `NBD_OPT_EXPORT_NAME` ends the connection),
    /// and its certificate is checked during the TLS handshake.
    pub fn serve_connection<C: Connection + Socket>(&self, conn: C, opts: &ServeOptions) -> io::Result<()> {
        conn.prepare()?;
        let control = conn.try_clone_conn()?;
        let Some(id) = self.shared.register(Box::new(move || control.shutdown_conn())) else {
            return Ok(());
        };
        let result = self.negotiate_and_serve(conn, opts);
        self.shared.unregister(id);
        result
    }

    fn negotiate_and_serve<C: Connection + Socket>(&self, mut conn: C, opts: &ServeOptions) -> io::Result<()> {
        // A limit too large to add is no limit: a year will do.
        let now = Instant::now();
        let deadline = now.checked_add(opts.handshake_timeout).unwrap_or(now + Duration::from_secs(365 * 86400));
        let shared = &self.shared;
        // Negotiation failures are logged (transmission's are not).
        let logged = |r: io::Result<Outcome>| {
            if let (Err(e), Some(log)) = (&r, &opts.negotiation_log) {
                (log.0)(&crate::nbd::client::plain_message(e));
            }
            r
        };
        let Some(tls) = &opts.tls else {
            return match logged(handshake::negotiate(&mut conn, shared, deadline, Phase::NoTls))? {
                Outcome::Session(session) => transmission::run(conn, Arc::clone(shared), session, opts),
                Outcome::Closed | Outcome::StartTls(_) => Ok(()),
            };
        };
        let flags = match logged(handshake::negotiate(&mut conn, shared, deadline, Phase::BeforeTls))? {
            Outcome::StartTls(flags) => flags,
            Outcome::Session(_) | Outcome::Closed => return Ok(()),
        };
        let mut conn = match handshake::start_tls(conn, tls, deadline) {
            Ok(c) => c,
            Err(e) => return logged(Err(e)).map(|_| ()),
        };
        // QEMU's checks of the client once the handshake is over; a
        // refused client is dropped without a word of NBD.
        if let Err(e) = tls.check_client(conn.peer_certificates().as_deref()) {
            let r = logged(Err(e)).map(|_| ());
            conn.hang_up(deadline.saturating_duration_since(Instant::now()));
            return r;
        }
        match logged(handshake::negotiate_after_tls(&mut conn, shared, deadline, flags))? {
            Outcome::Session(session) => transmission::run(conn, Arc::clone(shared), session, opts),
            Outcome::Closed | Outcome::StartTls(_) => Ok(()),
        }
    }
}

/// Counts a connection as live until its thread ends.
struct ActiveGuard(Arc<AtomicUsize>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
