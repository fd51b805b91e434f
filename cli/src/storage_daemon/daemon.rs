//! The daemon's state and the operations the command line and the QMP
//! monitor share: nodes, exports, the NBD server, quitting.
//!
//! Limitation: the library's NBD server negotiates with a single export,
//! so one NBD export exists at a time; a second is refused with a clear
//! error instead of being served wrongly.

use super::blockdev::Nodes;
use super::export::{Clients, Export, ExportSpec, Handle, Kind, VhostAddr};
use super::nbd::{Lookup, NbdServer};
use crate::error::{CliError, CliResult};
use crate::object::{Objects, Props};
use oxcow::export::fuse::{FuseExport, FuseOptions};
#[cfg(target_os = "linux")]
use oxcow::export::inherited::InheritedListener;
#[cfg(target_os = "linux")]
use oxcow::export::vhost_user_blk::{VhostUserBlkExport, VhostUserBlkOptions};
use oxcow::nbd::server::{DiscardMode, ExportConfig, Server};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Everything the daemon runs.
pub struct Daemon {
    pub objects: Objects,
    pub nodes: Mutex<Nodes>,
    /// Newest first, as QEMU lists them.
    exports: Arc<Mutex<Vec<Export>>>,
    nbd: Mutex<Option<NbdServer>>,
    /// Set by `quit` and by SIGTERM/SIGINT.
    pub quit: Arc<AtomicBool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Daemon {
    pub fn new(objects: Objects, nodes: Nodes) -> Daemon {
        Daemon {
            objects,
            nodes: Mutex::new(nodes),
            exports: Arc::default(),
            nbd: Mutex::new(None),
            quit: Arc::new(AtomicBool::new(false)),
        }
    }

    /// `--nbd-server` / `nbd-server-start`.
    pub fn start_nbd(&self, p: Props) -> CliResult<()> {
        let mut nbd = lock(&self.nbd);
        if nbd.is_some() {
            return Err(CliError::new("NBD server already running"));
        }
        let exports = Arc::clone(&self.exports);
        let lookup: Lookup = Arc::new(move || {
            lock(&exports).iter().find_map(|e| match &e.handle {
                Handle::Nbd { server, clients } => Some((server.clone(), Arc::clone(clients))),
                _ => None,
            })
        });
        *nbd = Some(NbdServer::start(p, &self.objects, lookup)?);
        Ok(())
    }

    /// `nbd-server-stop`: clients of NBD exports stay connected, as in QEMU.
    pub fn stop_nbd(&self) -> CliResult<()> {
        let server = lock(&self.nbd).take().ok_or_else(|| CliError::new("NBD server not running"))?;
        server.stop();
        Ok(())
    }

    /// `--export` / `block-export-add`.
    pub fn add_export(&self, p: Props) -> CliResult<()> {
        let spec = ExportSpec::parse(p)?;
        let mut exports = lock(&self.exports);
        if exports.iter().any(|e| e.spec.id == spec.id) {
            return Err(CliError::new(format!("Block export id '{}' is already in use", spec.id)));
        }
        let (dev, io) = lock(&self.nodes).device(&spec.node_name)?;
        if spec.writable && dev.is_read_only() {
            return Err(CliError::new("Cannot export read-only node as writable"));
        }
        let handle = match &spec.kind {
            Kind::Nbd { name, description, allocation_depth } => {
                if lock(&self.nbd).is_none() {
                    return Err(CliError::new("NBD server not running"));
                }
                let nbd = |e: &&Export| matches!(e.handle, Handle::Nbd { .. });
                if exports.iter().filter(nbd).any(|e| matches!(&e.spec.kind, Kind::Nbd { name: n, .. } if n == name)) {
                    return Err(CliError::new(format!("NBD server already has export named '{name}'")));
                }
                if let Some(other) = exports.iter().find(nbd) {
                    return Err(CliError::new(format!(
                        "oxcow serves one NBD export at a time ('{}' is exported); delete it first",
                        other.spec.id
                    )));
                }
                let discard = if io.unmap { DiscardMode::Unmap } else { DiscardMode::Ignore };
                let config = ExportConfig::new(name.clone())
                    .description(description.clone())
                    .read_only(!spec.writable)
                    .discard(discard)
                    .detect_zeroes(io.detect_zeroes)
                    .multi_conn_ok(true)
                    .allocation_depth(*allocation_depth);
                Handle::Nbd { server: Server::new(dev, config), clients: Arc::default() }
            }
            Kind::Fuse { mountpoint, growable, allow_other } => {
                let opts = FuseOptions::default().writable(spec.writable).growable(*growable).allow_other(*allow_other);
                let mounted = FuseExport::mount(dev, std::path::Path::new(mountpoint), opts)
                    .map_err(|e| CliError::new(crate::error::message(&e)))?;
                Handle::Fuse(mounted)
            }
            #[cfg(not(target_os = "linux"))]
            Kind::VhostUserBlk { .. } => {
                return Err(CliError::new("vhost-user-blk exports are supported on Linux only"))
            }
            #[cfg(target_os = "linux")]
            Kind::VhostUserBlk { addr, num_queues, logical_block_size } => {
                let opts = VhostUserBlkOptions::default()
                    .writable(spec.writable)
                    .num_queues(*num_queues)
                    .logical_block_size(*logical_block_size)
                    .discard(io.unmap)
                    .detect_zeroes(io.detect_zeroes);
                let export = match addr {
                    VhostAddr::Path(path) => VhostUserBlkExport::start(dev, std::path::Path::new(path), opts),
                    VhostAddr::Fd(fd) => match super::inherited::listener(fd)? {
                        InheritedListener::Unix(l) => VhostUserBlkExport::start_on(dev, l, opts),
                        InheritedListener::Tcp(_) => {
                            return Err(CliError::new(format!("File descriptor '{fd}' is not a Unix socket")))
                        }
                    },
                }
                .map_err(|e| CliError::new(crate::error::message(&e)))?;
                Handle::VhostUserBlk(export)
            }
        };
        exports.insert(0, Export { spec, handle });
        Ok(())
    }

    /// `block-export-del`: `hard` disconnects clients; otherwise an export
    /// in use is kept and an error returned.
    pub fn del_export(&self, id: &str, hard: bool) -> CliResult<()> {
        let export = {
            let mut exports = lock(&self.exports);
            let i = exports
                .iter()
                .position(|e| e.spec.id == id)
                .ok_or_else(|| CliError::new(format!("Export '{id}' is not found")))?;
            let in_use = match &exports[i].handle {
                Handle::Nbd { clients, .. } => clients.count() > 0,
                #[cfg(target_os = "linux")]
                Handle::VhostUserBlk(v) => v.connected(),
                Handle::Fuse(_) => false,
            };
            if !hard && in_use {
                return Err(CliError::new(format!("export '{id}' still in use")));
            }
            exports.remove(i)
        };
        end(export)
    }

    /// `query-block-exports`.
    pub fn query_exports(&self) -> serde_json::Value {
        let list: Vec<_> = lock(&self.exports)
            .iter()
            .map(|e| {
                serde_json::json!({
                    "node-name": e.spec.node_name,
                    "shutting-down": false,
                    "type": e.spec.kind.type_name(),
                    "id": e.spec.id,
                })
            })
            .collect();
        serde_json::Value::Array(list)
    }

    /// Ends everything: stops the NBD server, disconnects every client,
    /// flushes and closes the images. Returns the ids of the exports
    /// deleted.
    pub fn shut_down(&self) -> CliResult<Vec<String>> {
        if let Some(s) = lock(&self.nbd).take() {
            s.stop();
        }
        let exports = std::mem::take(&mut *lock(&self.exports));
        let ids = exports.iter().map(|e| e.spec.id.clone()).collect();
        let mut first = None;
        for e in exports {
            if let Err(e) = end(e) {
                first.get_or_insert(e);
            }
        }
        lock(&self.nodes).close_all()?;
        first.map_or(Ok(ids), Err)
    }

    pub fn request_quit(&self) {
        self.quit.store(true, Ordering::Release);
    }
}

/// Stops serving an export.
fn end(export: Export) -> CliResult<()> {
    match export.handle {
        Handle::Nbd { clients, .. } => {
            disconnect(&clients);
            Ok(())
        }
        Handle::Fuse(f) => f.unmount().map_err(|e| CliError::new(crate::error::message(&e))),
        #[cfg(target_os = "linux")]
        Handle::VhostUserBlk(v) => {
            v.stop();
            Ok(())
        }
    }
}

/// Disconnects an export's clients and waits until their threads let go
/// of the device (they finish the requests in flight first).
fn disconnect(clients: &Clients) {
    // Again each round: a client accepted just before the export went
    // away registers late.
    while clients.count() > 0 {
        clients.disconnect_all();
        std::thread::sleep(Duration::from_millis(5));
    }
}
