//! NBD, both ends: a server that exports any [`BlockDevice`](crate::BlockDevice)
//! the way `qemu-nbd` does, and a client that opens a remote export as a
//! device or as storage under an image.
//!
//! Three layers, each depending only on those before it:
//!
//! - [`proto`]: the wire format (constants, message encoding and
//!   decoding), no I/O; shared by both ends;
//! - [`server`]: [`Server`](server::Server) and its handshake,
//!   transmission phase and block-status walks;
//! - [`tls`]: credentials, access lists and the TLS stream both ends use
//!   after `NBD_OPT_STARTTLS`;
//! - [`client`]: [`NbdClient`](client::NbdClient), a remote export as a
//!   [`BlockDevice`](crate::BlockDevice), and
//!   [`NbdStorage`](client::NbdStorage), the storage driver that
//!   [`open`](crate::open) uses for `nbd:` names.
//!
//! Server and client never import each other.

pub mod client;
pub mod proto;
pub mod server;
pub mod tls;
