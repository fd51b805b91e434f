//! oxcow: copy-on-write virtual disk images, compatible with QEMU's qcow2
//! (versions 2 and 3), with an NBD server and client.
//!
//! # Opening, writing and snapshotting an image
//!
//! ```
//! use oxcow::qcow2::{self, CreateOptions};
//! use oxcow::{BlockDevice, OpenOptions};
//!
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("disk.qcow2");
//!
//! // A new 64 MiB image with QEMU's defaults (64 KiB clusters, v3).
//! qcow2::create(oxcow::create_file(&path)?, None, &CreateOptions::new(64 << 20))?;
//!
//! // Every opened image is a `BlockDevice`, whatever its format.
//! let image = oxcow::open(&path, &OpenOptions::read_write())?;
//! let disk = image.device();
//! disk.write_at(&[0xaa; 512], 0)?;
//!
//! // Internal snapshots are a qcow2 matter.
//! let q = image.qcow2().expect("a qcow2 image");
//! q.snapshot_create("before")?;
//! disk.write_at(&[0xbb; 512], 0)?;
//!
//! let mut buf = [0u8; 512];
//! q.snapshot_device("before")?.read_at(&mut buf, 0)?;
//! assert_eq!(buf, [0xaa; 512]);
//! disk.read_at(&mut buf, 0)?;
//! assert_eq!(buf, [0xbb; 512]);
//!
//! // A clean close flushes and leaves the image as QEMU expects it.
//! image.close()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # The surface
//!
//! - At the root: [`open`] an image by name ([`OpenOptions`], [`Format`],
//!   [`CacheMode`]) into an [`Image`], whose [`device`](Image::device) is a
//!   [`BlockDevice`], the one interface every image, backing file and
//!   network export shows; [`Error`] and [`Result`]; [`RawImage`];
//!   [`create_file`] for new images.
//! - [`qcow2`]: the engine, [`Qcow2`](qcow2::Qcow2) (snapshots, check and
//!   repair, resize, compressed writes), [`qcow2::create`] and
//!   [`qcow2::amend`].
//! - [`storage`]: where bytes live, [`Storage`](storage::Storage), with
//!   host files (QEMU-compatible locking included) and memory.
//! - [`backing`]: which backing files named inside images are followed.
//! - [`nbd`]: the NBD [`server`](nbd::server), [`client`](nbd::client)
//!   and wire format.
//! - [`tools`]: convert, commit, rebase, compare, measure, stream,
//!   prefetch and bench, over `BlockDevice` values.
//! - [`format`](mod@format): the on-disk structures, pure and total, for inspection.
//! - [`options`]: QEMU's option-list and size syntax.
//!
//! Option structs are `#[non_exhaustive]`: start from a constructor or
//! `Default` and chain the setters named after their fields. The enums
//! the command line takes (formats, cache modes, preallocation, ...)
//! parse with [`str::parse`] under QEMU's names.
//!
//! The `testing` feature adds test doubles (crash-recording,
//! fault-injecting and counting storages) and the fuzz entry points; it is
//! for this crate's tests and its fuzz targets, not for users.
#![deny(unsafe_code)]
#![warn(missing_docs)]
#![warn(missing_debug_implementations)]

/// Builder-style setters for the public fields of an option struct, one
/// per field and named after it, so that code outside the crate, where
/// `#[non_exhaustive]` forbids struct literals, builds options as
/// `CreateOptions::new(size).cluster_size(4096)`. Setters of `Option`
/// fields (listed after `opt`) take a value or an `Option`.
macro_rules! setters {
    ($t:ident $(<$lt:lifetime>)? { $($f:ident: $ty:ty),* $(,)? } $(opt { $($of:ident: $oty:ty),* $(,)? })?) => {
        impl$(<$lt>)? $t$(<$lt>)? {
            $(
                #[doc = concat!("Sets `", stringify!($f), "` (see the field of that name).")]
                #[must_use]
                pub fn $f(mut self, value: $ty) -> Self {
                    self.$f = value;
                    self
                }
            )*
            $($(
                #[doc = concat!("Sets `", stringify!($of), "` (see the field of that name) to a value or an `Option`.")]
                #[must_use]
                pub fn $of(mut self, value: impl Into<Option<$oty>>) -> Self {
                    self.$of = value.into();
                    self
                }
            )*)?
        }
    };
}

pub mod backing;
mod cache_mode;
pub mod crypto;
mod device;
mod error;
#[cfg(any(feature = "fuse", feature = "vhost-user-blk"))]
pub mod export;
pub mod format;
pub mod formats;
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod fuzz_targets;
mod image;
pub mod json_name;
pub mod nbd;
mod nested;
pub mod options;
pub mod qcow2;
mod raw;
pub mod remote;
mod size;
pub mod storage;
pub mod tools;

pub use device::{chain_status, check_range, read_backing, BlockDevice, BlockStatus};
pub use error::{Error, Result};
pub use image::{
    create_file, open, probe_format, resolve_backing, CacheMode, ChainFiles, Format, Image, OpenOptions, StorageHook,
    WrapStorage,
};
pub use raw::RawImage;
