//! An NBD server: exports one [`BlockDevice`](crate::BlockDevice) over TCP or
//! a Unix socket, the way `qemu-nbd` does.
//!
//! Speaks fixed newstyle negotiation only, with `NBD_OPT_GO`/`NBD_OPT_INFO`,
//! structured replies (sparse reads as hole chunks), and two metadata
//! contexts for `NBD_CMD_BLOCK_STATUS`: `base:allocation` and QEMU's
//! `qemu:allocation-depth`. TLS and extended headers are not offered.
//!
//! Layout, one concern per file:
//!
//! - [`proto`]: wire constants and message encoding, no I/O;
//! - `conn`: the socket types served ([`Connection`], [`Listener`]);
//! - `handshake`: option haggling up to the transmission phase;
//! - `transmission`: requests, worker threads and replies of one client;
//! - `server`: [`Server`], the accept loop, connection limits and shutdown.
//!
//! ```no_run
//! use oxcow::nbd::{ExportConfig, Server};
//! use oxcow::raw::RawImage;
//! use oxcow::storage::{FileStorage, OpenFlags};
//! use std::sync::{atomic::AtomicBool, Arc};
//!
//! let storage = Arc::new(FileStorage::open("disk.raw".as_ref(), OpenFlags { write: true, ..OpenFlags::default() }).unwrap());
//! let dev = Arc::new(RawImage::new(storage, false, false).unwrap());
//! let server = Server::new(dev, ExportConfig { name: "disk".into(), ..ExportConfig::default() });
//! let listener = std::net::TcpListener::bind("127.0.0.1:10809").unwrap();
//! server.serve_tcp(listener, Arc::new(AtomicBool::new(false)), true, 1).unwrap();
//! ```

pub mod client;
mod client_conn;
mod conn;
mod handshake;
pub mod proto;
mod server;
mod status;
mod transmission;

pub use client::{ClientOptions, NbdAddr, NbdClient, NbdStorage, NbdUrl};
pub use conn::{Connection, Listener};
pub use server::{ServeOptions, Server};

/// What `NBD_CMD_TRIM` does (qemu-nbd's `--discard`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiscardMode {
    /// Discard requests succeed without touching the image.
    #[default]
    Ignore,
    /// Discard requests deallocate (and write-zeroes may deallocate too).
    Unmap,
}

/// Whether written buffers of zeros are turned into zero writes
/// (qemu-nbd's `--detect-zeroes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetectZeroes {
    /// Write what the client sent.
    #[default]
    Off,
    /// Zero buffers become write-zeroes that keep the range allocated.
    On,
    /// Zero buffers become write-zeroes that may deallocate (only when
    /// [`DiscardMode::Unmap`] is also set, as in QEMU).
    Unmap,
}

/// How the one export of a [`Server`] is presented to clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportConfig {
    /// Export name (qemu-nbd's `-x`); clients asking for the empty name
    /// also get this export, since it is the server's only one.
    pub name: String,
    /// Description shown by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION` (`-D`).
    pub description: String,
    /// Refuse writes and advertise `NBD_FLAG_READ_ONLY` (`-r`); a device
    /// that is itself read-only is exported read-only regardless.
    pub read_only: bool,
    /// What discard requests do.
    pub discard: DiscardMode,
    /// Zero detection on writes.
    pub detect_zeroes: DetectZeroes,
    /// Advertise `NBD_FLAG_CAN_MULTI_CONN`. Every connection shares one
    /// device, so it is always true here; qemu-nbd advertises it exactly
    /// when `-e` allows more than one client.
    pub multi_conn_ok: bool,
    /// Offer the `qemu:allocation-depth` metadata context (qemu-nbd offers
    /// it only with `-A`; offering it costs nothing to clients that do not
    /// ask for it).
    pub allocation_depth: bool,
}

impl Default for ExportConfig {
    fn default() -> Self {
        ExportConfig {
            name: String::new(),
            description: String::new(),
            read_only: false,
            discard: DiscardMode::Ignore,
            detect_zeroes: DetectZeroes::Off,
            multi_conn_ok: false,
            allocation_depth: true,
        }
    }
}
