//! The qcow2 on-disk format: parse, validate, encode. No I/O happens here.
//!
//! Every function in this layer is total: any byte string gives a typed value
//! or an [`Error`](crate::Error), never a panic, and no allocation is sized by
//! a field before that field has been checked against QEMU's limits
//! ([`limits`]). This is the surface the fuzz targets hammer.

pub(crate) mod be;
pub mod bitmap;
pub(crate) mod compressed;
pub mod extensions;
pub mod features;
pub mod header;
pub mod l1;
pub mod l2;
pub mod limits;
pub mod refcount;
pub mod snapshot;

pub use extensions::{BitmapsExt, Extension, Extensions, FdeExt, FeatureName};
pub use features::{Autoclear, Compatible, Incompatible};
pub use header::{CompressionType, Header};
pub use l1::L1Entry;
pub use l2::{ClusterKind, L2Entry, L2Layout, SubclusterBitmap};
pub use snapshot::SnapshotEntry;

/// The four bytes every qcow2 image starts with: "QFI\xfb".
pub const MAGIC: [u8; 4] = *b"QFI\xfb";

/// Whether `bytes` start with the qcow2 magic.
pub fn has_magic(bytes: &[u8]) -> bool {
    bytes.len() >= 4 && bytes[..4] == MAGIC
}
