//! Image tools that work on any [`BlockDevice`](crate::BlockDevice).
pub mod bench;
pub mod prefetch;
pub mod stream;
