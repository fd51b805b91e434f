//! `--export` / `block-export-add`: what an export definition says, and a
//! live export's handles (for NBD: the server of its node and the way to
//! cut its clients off; for FUSE the mount; for vhost-user-blk the socket).

use crate::error::{CliError, CliResult};
use crate::object::Props;
use oxcow::nbd::server::Server;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// A parsed export definition.
#[derive(Debug, Clone)]
pub struct ExportSpec {
    pub id: String,
    pub node_name: String,
    pub writable: bool,
    pub kind: Kind,
}

/// The type-specific part of a definition.
#[derive(Debug, Clone)]
pub enum Kind {
    Nbd {
        /// Export name clients ask for (the node name unless given).
        name: String,
        description: String,
        allocation_depth: bool,
    },
    Fuse {
        /// The regular file the image is mounted over.
        mountpoint: String,
        growable: bool,
        allow_other: bool,
    },
    VhostUserBlk {
        /// The Unix socket the front end connects to.
        addr: VhostAddr,
        num_queues: u16,
        logical_block_size: u32,
    },
}

/// Where a vhost-user-blk export listens.
#[derive(Debug, Clone)]
pub enum VhostAddr {
    /// `addr.type=unix,addr.path=P`: a socket file bound here.
    Path(String),
    /// `addr.type=fd,addr.str=N`: a socket the parent process passed in.
    Fd(String),
}

impl Kind {
    /// The QAPI name of the type.
    pub fn type_name(&self) -> &'static str {
        match self {
            Kind::Nbd { .. } => "nbd",
            Kind::Fuse { .. } => "fuse",
            Kind::VhostUserBlk { .. } => "vhost-user-blk",
        }
    }
}

impl ExportSpec {
    /// Reads a definition (every property must be understood).
    pub fn parse(mut p: Props) -> CliResult<ExportSpec> {
        let ty = p.require("type")?;
        let id = p.require("id")?;
        let node_name = p.require("node-name")?;
        let writable = p.take_bool("writable")?.unwrap_or(false);
        if p.take_bool("writethrough")?.unwrap_or(false) {
            return Err(CliError::new("writethrough=on is not supported (open the node with cache settings instead)"));
        }
        // Every export runs on its own threads; there are no iothreads.
        p.take("iothread");
        p.take_bool("fixed-iothread")?;
        let kind = match ty.as_str() {
            "nbd" => {
                let name = p.take("name").unwrap_or_else(|| node_name.clone());
                let description = p.take("description").unwrap_or_default();
                let allocation_depth = p.take_bool("allocation-depth")?.unwrap_or(false);
                if p.has_prefix("bitmaps") {
                    return Err(CliError::new("NBD exports of dirty bitmaps are not supported"));
                }
                Kind::Nbd { name, description, allocation_depth }
            }
            "fuse" => {
                let mountpoint = p.require("mountpoint")?;
                let growable = p.take_bool("growable")?.unwrap_or(false);
                // auto: allowed where the system permits, which for the
                // root this daemon mostly runs as means allowed.
                let allow_other =
                    p.take_enum("allow-other", &[("on", true), ("off", false), ("auto", true)])?.unwrap_or(true);
                Kind::Fuse { mountpoint, growable, allow_other }
            }
            "vhost-user-blk" => {
                let addr = match p.require("addr.type")?.as_str() {
                    "unix" => VhostAddr::Path(p.require("addr.path")?),
                    "fd" => VhostAddr::Fd(p.require("addr.str")?),
                    ty => {
                        return Err(CliError::new(format!(
                            "vhost-user-blk exports listen on a Unix socket, not addr.type={ty}"
                        )))
                    }
                };
                let num_queues = match p.take("num-queues") {
                    None => 1,
                    Some(v) => v
                        .parse::<u16>()
                        .ok()
                        .filter(|n| (1..=64).contains(n))
                        .ok_or_else(|| CliError::new(format!("num-queues must be between 1 and 64, not '{v}'")))?,
                };
                let logical_block_size = match p.take("logical-block-size") {
                    None => 512,
                    Some(v) => {
                        v.parse::<u32>().ok().filter(|n| n.is_power_of_two() && (512..=32768).contains(n)).ok_or_else(
                            || {
                                CliError::new(format!(
                                    "logical-block-size must be a power of 2 between 512 and 32768, not '{v}'"
                                ))
                            },
                        )?
                    }
                };
                Kind::VhostUserBlk { addr, num_queues, logical_block_size }
            }
            "vduse-blk" => return Err(CliError::new(format!("Export type '{ty}' is not supported yet"))),
            other => return Err(CliError::new(format!("Parameter 'type' does not accept value '{other}'"))),
        };
        p.finish()?;
        Ok(ExportSpec { id, node_name, writable, kind })
    }
}

/// The live clients of an export: how to disconnect each.
#[derive(Default)]
pub struct Clients {
    next: AtomicU64,
    live: Mutex<HashMap<u64, Box<dyn Fn() + Send>>>,
}

impl Clients {
    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Box<dyn Fn() + Send>>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// Remembers a client; the id unregisters it.
    pub fn register(&self, shutdown: Box<dyn Fn() + Send>) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.live().insert(id, shutdown);
        id
    }
    pub fn unregister(&self, id: u64) {
        self.live().remove(&id);
    }
    pub fn count(&self) -> usize {
        self.live().len()
    }
    /// Shuts every client's socket down; their threads then end.
    pub fn disconnect_all(&self) {
        self.live().values().for_each(|s| s());
    }
}

/// A running export.
pub struct Export {
    pub spec: ExportSpec,
    pub handle: Handle,
}

/// What serves a running export.
pub enum Handle {
    /// The NBD server of the export's node, and its clients.
    Nbd { server: Server, clients: std::sync::Arc<Clients> },
    /// The mounted file.
    Fuse(oxcow::export::fuse::FuseExport),
    /// The listening socket and its front end.
    #[cfg(target_os = "linux")]
    VhostUserBlk(oxcow::export::vhost_user_blk::VhostUserBlkExport),
}
