//! Exports that present a [`BlockDevice`](crate::BlockDevice) to something
//! other than an NBD client (that one is [`crate::nbd::server`]).
//!
//! - `fuse` (feature `fuse`): the device as a regular file on the host.
//! - `vhost_user_blk` (feature `vhost-user-blk`, Linux): the device as a
//!   virtio-blk disk of a VM, served over a vhost-user socket.
//! - `inherited`: listening sockets passed in by a parent process.

#[cfg(feature = "fuse")]
pub mod fuse;
#[cfg(unix)]
pub mod inherited;
#[cfg(all(feature = "vhost-user-blk", target_os = "linux"))]
pub mod vhost_user_blk;
