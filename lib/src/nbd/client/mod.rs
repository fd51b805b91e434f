//! An NBD client: a remote export as a [`BlockDevice`](crate::BlockDevice)
//! ([`NbdClient`]) or as [`Storage`](crate::storage::Storage)
//! ([`NbdStorage`]), so a network export serves as an image, as the file
//! under an image, or as a backing file (`nbd://HOST[:PORT]/NAME`,
//! `nbd+unix:///NAME?socket=PATH`).
//!
//! - `url`: [`NbdUrl`], parsing QEMU's names for exports;
//! - `conn`: one connection, its handshake and the reader thread that
//!   hands replies to the callers waiting for them;
//! - `device`: [`NbdClient`], reconnection, request splitting and
//!   alignment;
//! - `list`: [`list_exports`], a server's exports as `qemu-nbd -L` shows them;
//! - `storage`: [`NbdStorage`], the storage driver over a client.

mod conn;
mod device;
mod list;
mod storage;
mod url;

pub use conn::{negotiation_message, plain_message, NbdAddr, NegotiationError};
pub use device::{ClientOptions, NbdClient};
pub use list::{list_exports, render_listing, ExportListing};
pub use storage::{set_reconnect_delay, NbdStorage};
pub use url::{NbdUrl, UrlPsk, UrlTls, DEFAULT_PORT};
