//! Helpers shared by the library's integration tests. The most used ones
//! are re-exported here, so a test module imports `crate::support::*`.

pub mod garage;
pub mod http_server;
pub mod model;
pub mod nbd;
pub mod process;
pub mod qemu;
pub mod remote;
pub mod rng;
pub mod s3_server;

pub use model::{apply_model, Op};
pub use process::{ok, run};
pub use qemu::*;
pub use rng::Rng;

/// Cache options that cut L2 tables into the smallest slices QEMU allows
/// (512 bytes), so tests on small disks, whose default cache holds whole
/// tables, go through the slice paths (partial loads, tables assembled
/// from slices, new tables inserted slice by slice).
pub fn small_slices() -> oxcow::qcow2::CacheOptions {
    oxcow::qcow2::CacheOptions::default().l2_cache_entry_size(512)
}
