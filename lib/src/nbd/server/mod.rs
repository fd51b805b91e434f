//! An NBD server: exports one [`BlockDevice`](crate::BlockDevice) over TCP
//! or a Unix socket, the way `qemu-nbd` does.
//!
//! Speaks fixed newstyle negotiation only, with `NBD_OPT_GO`/`NBD_OPT_INFO`,
//! structured replies (sparse reads as hole chunks), and two metadata
//! contexts for `NBD_CMD_BLOCK_STATUS`: `base:allocation` and QEMU's
//! `qemu:allocation-depth`. With [`ServeOptions::tls`] set, TLS is
//! required before anything else (qemu-nbd's `--tls-creds`). Extended
//! headers are not offered.
//!
//! Layout, one concern per file, each depending only on those above it:
//!
//! - `config`: [`ExportConfig`] and [`ServeOptions`], plain values;
//! - `conn`: the socket types served ([`Connection`], [`Listener`]);
//! - `export`: the state every connection shares, and the session one
//!   negotiation agrees on;
//! - `handshake`: option haggling up to the transmission phase;
//! - `status`, `transmission`: requests, worker threads and replies of
//!   one client;
//! - `accept`: [`Server`], the accept loop, connection limits and shutdown.
//!
//! ```no_run
//! use oxcow::nbd::server::{ExportConfig, ServeOptions, Server};
//! use oxcow::OpenOptions;
//! use std::sync::{atomic::AtomicBool, Arc};
//!
//! let image = oxcow::open("disk.qcow2", &OpenOptions::read_write())?;
//! let server = Server::new(image.device().clone(), ExportConfig::new("disk"));
//! let listener = std::net::TcpListener::bind("127.0.0.1:10809")?;
//! let stop = Arc::new(AtomicBool::new(false)); // set it to stop serving
//! server.serve(listener, stop, &ServeOptions::default().persistent(true))?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod accept;
mod config;
mod conn;
mod export;
mod handshake;
mod offset;
mod status;
mod transmission;

pub use accept::Server;
pub use config::{DetectZeroes, DiscardMode, ExportConfig, NegotiationLog, ServeOptions};
pub use conn::{Connection, Listener};
pub use offset::OffsetDevice;
