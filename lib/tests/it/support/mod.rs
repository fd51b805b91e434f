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
