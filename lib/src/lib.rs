//! oxcow: copy-on-write virtual disk images, compatible with QEMU's qcow2
//! (versions 2 and 3).
//!
//! Layers, bottom up (each depends only on those below it):
//!
//! - [`storage`]: where bytes live ([`storage::Storage`]: files, memory,
//!   and the crash/fault test doubles);
//! - [`format`]: the on-disk structures, pure and total (no I/O);
//! - [`qcow2`]: the engine (caches, allocation, copy-on-write, snapshots,
//!   check and repair);
//! - [`device`]: [`BlockDevice`], the interface every opened image shows,
//!   implemented by [`raw::RawImage`] and [`qcow2::Qcow2`];
//! - [`image`]: opening files by name with format detection and backing
//!   chains;
//! - [`tools`]: convert, compare, map and friends, over `BlockDevice` only.
//!
//! ```no_run
//! use oxcow::{image, BlockDevice};
//! let img = image::open("disk.qcow2", &image::OpenOptions::read_only()).unwrap();
//! let mut buf = vec![0u8; 4096];
//! img.device().read_at(&mut buf, 0).unwrap();
//! ```
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod cache_mode;
pub mod device;
pub mod error;
pub mod format;
#[doc(hidden)]
pub mod fuzz_targets;
pub mod image;
pub mod nbd;
pub mod options;
pub mod qcow2;
pub mod raw;
pub mod size;
pub mod storage;
pub mod tools;

pub use device::{BlockDevice, BlockStatus};
pub use error::{Error, Result};
