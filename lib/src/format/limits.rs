//! The implementation limits QEMU enforces, checked before a field is used.

/// Smallest cluster_bits (512-byte clusters).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster_bits QEMU opens (2 MiB clusters).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Smallest cluster_bits with extended L2 entries (16 KiB clusters).
pub const MIN_EXTENDED_L2_CLUSTER_BITS: u32 = 14;
/// Largest L1 table, in bytes.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table, in bytes.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Most internal snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Largest snapshot table, in bytes.
pub const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 << 20;
/// Largest extra data of one snapshot table entry.
pub const MAX_SNAPSHOT_EXTRA_DATA: u32 = 1024;
/// Longest backing file name, in bytes.
pub const MAX_BACKING_NAME: u32 = 1023;
/// Host offsets in L1/L2 entries must stay below 2^56.
pub const MAX_HOST_OFFSET: u64 = (1 << 56) - 1;
/// Largest refcount_order (64-bit refcounts).
pub const MAX_REFCOUNT_ORDER: u32 = 6;
/// Most bitmaps in the bitmaps extension.
pub const MAX_BITMAPS: u32 = 65535;
/// Largest bitmap directory, in bytes.
pub const MAX_BITMAP_DIRECTORY_BYTES: u64 = 64 << 20;
/// Longest bitmap name.
pub const MAX_BITMAP_NAME: u16 = 1023;
/// Largest virtual size QEMU accepts (INT64_MAX rounded down to 512).
pub const MAX_VIRTUAL_SIZE: u64 = (i64::MAX as u64) & !511;
/// Deepest backing chain oxcow follows (a loop must not hang us).
pub const MAX_BACKING_DEPTH: usize = 64;
/// Longest file name in a string header extension oxcow accepts.
pub const MAX_EXT_STRING: usize = 4096;
