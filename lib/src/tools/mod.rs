//! Image tools that work on any [`BlockDevice`](crate::BlockDevice).

pub mod bench;
pub mod commit;
pub mod compare;
pub mod convert;
pub mod measure;
pub mod prefetch;
pub mod rebase;
pub mod stream;
