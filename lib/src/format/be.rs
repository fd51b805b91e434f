//! Big-endian integer access: every byte cast of the format layer lives here.
//!
//! Callers check lengths before calling (the structures validate their sizes
//! first); these helpers then index within bounds by construction.

/// Reads a big-endian u16 at `off`.
#[inline]
pub fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

/// Reads a big-endian u32 at `off`.
#[inline]
pub fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_be_bytes(a)
}

/// Reads a big-endian u64 at `off`.
#[inline]
pub fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

/// Writes a big-endian u16 at `off`.
#[inline]
pub fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_be_bytes());
}

/// Writes a big-endian u32 at `off`.
#[inline]
pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

/// Writes a big-endian u64 at `off`.
#[inline]
pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

/// Decodes a table of big-endian u64 entries (L1, L2, refcount table).
pub fn u64_table(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8).map(|c| u64_at(c, 0)).collect()
}

/// Encodes a table of u64 entries big-endian.
pub fn encode_u64_table(entries: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * 8);
    for e in entries {
        out.extend_from_slice(&e.to_be_bytes());
    }
    out
}

/// Rounds `n` up to a multiple of 8 (extension and snapshot padding).
#[inline]
pub fn pad8(n: usize) -> usize {
    (n + 7) & !7
}
