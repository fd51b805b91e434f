//! `--nbd-server` (`nbd-server-start`): the one NBD listener of the
//! daemon and its accept loop.
//!
//! The library's server negotiates with a single export, so each client
//! is handed to the NBD export that exists when it connects; the daemon
//! therefore runs at most one NBD export at a time (see `daemon.rs`).

use super::export::Clients;
use crate::error::{os_message, CliError, CliResult};
use crate::object::{Object, Objects, Props};
use oxcow::export::inherited::InheritedListener;
use oxcow::nbd::server::{Connection, Listener, ServeOptions, Server};
use oxcow::nbd::tls::TlsServer;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the accept loop looks at its stop flag.
const POLL: Duration = Duration::from_millis(10);

/// What the accept loop asks for each client: the current NBD export.
pub type Lookup = Arc<dyn Fn() -> Option<(Server, Arc<Clients>)> + Send + Sync>;

/// A running NBD server.
pub struct NbdServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    socket_path: Option<String>,
}

impl NbdServer {
    /// Starts listening as `--nbd-server` says.
    pub fn start(mut p: Props, objects: &Objects, lookup: Lookup) -> CliResult<NbdServer> {
        let tls = tls(&mut p, objects)?;
        let max = match p.take("max-connections") {
            None => 0,
            Some(v) => v.parse::<usize>().map_err(|_| CliError::new("Parameter 'max-connections' expects uint32"))?,
        };
        let ty = p.require("addr.type")?;
        let opts = ServeOptions::default()
            .persistent(true)
            .workers(16)
            .tls(tls)
            .negotiation_log(Some(crate::cmd::serve::negotiation_log()));
        let stop = Arc::new(AtomicBool::new(false));
        let (thread, socket_path) = match ty.as_str() {
            "unix" => {
                let path = p.require("addr.path")?;
                p.finish()?;
                let _ = std::fs::remove_file(&path);
                let l = std::os::unix::net::UnixListener::bind(&path)
                    .map_err(|e| CliError::new(format!("Failed to bind socket to {path}: {}", os_message(&e))))?;
                (spawn(l, stop.clone(), opts, max, lookup)?, Some(path))
            }
            "inet" => {
                let host = p.require("addr.host")?;
                let port = p.require("addr.port")?;
                // IPv6 preferences are the resolver's business here.
                p.take_bool("addr.ipv4")?;
                p.take_bool("addr.ipv6")?;
                p.finish()?;
                let addr = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
                let l = std::net::TcpListener::bind(&addr)
                    .map_err(|e| CliError::new(format!("Failed to bind socket to {addr}: {}", os_message(&e))))?;
                (spawn(l, stop.clone(), opts, max, lookup)?, None)
            }
            "fd" => {
                let fd = p.require("addr.str")?;
                p.finish()?;
                // The parent owns the socket's name: nothing to remove.
                let thread = match super::inherited::listener(&fd)? {
                    InheritedListener::Unix(l) => spawn(l, stop.clone(), opts, max, lookup)?,
                    InheritedListener::Tcp(l) => spawn(l, stop.clone(), opts, max, lookup)?,
                };
                (thread, None)
            }
            other => return Err(CliError::new(format!("Parameter 'addr.type' does not accept value '{other}'"))),
        };
        Ok(NbdServer { stop, thread: Some(thread), socket_path })
    }

    /// Stops accepting clients and removes the socket file.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(p) = &self.socket_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The TLS settings `tls-creds`/`tls-authz` name.
fn tls(p: &mut Props, objects: &Objects) -> CliResult<Option<TlsServer>> {
    let authz_id = p.take("tls-authz");
    let Some(creds_id) = p.take("tls-creds") else {
        if authz_id.is_some() {
            return Err(CliError::new("'tls-authz' is not permitted without 'tls-creds'"));
        }
        return Ok(None);
    };
    let Some(Object::TlsCreds(creds)) = objects.get(&creds_id) else {
        return Err(CliError::new(format!("No TLS credentials with id '{creds_id}'")));
    };
    let authz = match &authz_id {
        None => None,
        Some(id) => match objects.get(id) {
            Some(Object::Authz(z)) => Some(z.0.clone()),
            _ => return Err(CliError::new(format!("Cannot find QAuthZ object with id '{id}'"))),
        },
    };
    creds.server(authz).map(Some).map_err(|e| CliError::new(e.msg))
}

fn spawn<L: Listener + 'static>(
    listener: L,
    stop: Arc<AtomicBool>,
    opts: ServeOptions,
    max: usize,
    lookup: Lookup,
) -> CliResult<JoinHandle<()>> {
    listener
        .set_nonblocking_listener(true)
        .map_err(|e| CliError::new(format!("configuring the NBD listener: {}", os_message(&e))))?;
    std::thread::Builder::new()
        .name("nbd-accept".into())
        .spawn(move || accept_loop(listener, stop, opts, max, lookup))
        .map_err(|e| CliError::new(format!("starting the NBD server: {}", os_message(&e))))
}

fn accept_loop<L: Listener>(listener: L, stop: Arc<AtomicBool>, opts: ServeOptions, max: usize, lookup: Lookup) {
    let active = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Acquire) {
        if max > 0 && active.load(Ordering::Acquire) >= max {
            std::thread::sleep(POLL);
            continue;
        }
        let conn = match listener.accept_conn() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(POLL);
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                std::thread::sleep(POLL * 10);
                continue;
            }
        };
        // No export: the client is turned away by closing the socket.
        let Some((server, clients)) = lookup() else { continue };
        let Ok(control) = conn.try_clone_conn() else { continue };
        let id = clients.register(Box::new(move || control.shutdown_conn()));
        active.fetch_add(1, Ordering::AcqRel);
        let (active2, opts2, clients2) = (Arc::clone(&active), opts.clone(), Arc::clone(&clients));
        let spawned = std::thread::Builder::new().name("nbd-conn".into()).spawn(move || {
            // A client's failure is its own business.
            let _ = server.serve_connection(conn, &opts2);
            clients2.unregister(id);
            active2.fetch_sub(1, Ordering::AcqRel);
        });
        if spawned.is_err() {
            clients.unregister(id);
            active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}
