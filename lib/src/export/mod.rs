//! Exports that present a [`BlockDevice`](crate::BlockDevice) to something
//! other than an NBD client (that one is [`crate::nbd::server`]).
//!
//! - `fuse` (feature `fuse`): the device as a regular file on the host.

pub mod fuse;
