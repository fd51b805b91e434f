//! In-memory storage for tests and scratch images.

use super::Storage;
use std::io;
use std::sync::RwLock;

/// A growable byte vector behind a lock; flush is a no-op.
#[derive(Debug)]
pub struct MemoryStorage {
    bytes: RwLock<Vec<u8>>,
    /// Writes or length changes past this fail like a full disk.
    max_len: u64,
}

impl Default for MemoryStorage {
    fn default() -> Self {
        MemoryStorage::from_bytes(Vec::new())
    }
}

impl MemoryStorage {
    /// An empty storage.
    pub fn new() -> Self {
        Self::default()
    }
    /// A storage holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        MemoryStorage { bytes: RwLock::new(bytes), max_len: MAX_MEMORY_LEN }
    }
    /// A storage holding `bytes` that refuses to grow past `max_len` (as a
    /// full disk would): hostile inputs must not make tests allocate
    /// whatever an image claims.
    pub fn with_limit(bytes: Vec<u8>, max_len: u64) -> Self {
        MemoryStorage { bytes: RwLock::new(bytes), max_len: max_len.min(MAX_MEMORY_LEN) }
    }
    /// A copy of the current contents.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.bytes.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn too_big() -> io::Error {
    io::Error::new(io::ErrorKind::OutOfMemory, "in-memory storage offset too large")
}

/// In-memory images are for tests; refuse sizes that would exhaust memory.
const MAX_MEMORY_LEN: u64 = 1 << 36;

impl Storage for MemoryStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let bytes = self.bytes.read().unwrap_or_else(|e| e.into_inner());
        buf.fill(0);
        let len = bytes.len() as u64;
        if offset < len {
            let start = offset as usize;
            let n = buf.len().min((len - offset) as usize);
            buf[..n].copy_from_slice(&bytes[start..start + n]);
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64).ok_or_else(too_big)?;
        if end > self.max_len {
            return Err(too_big());
        }
        let mut bytes = self.bytes.write().unwrap_or_else(|e| e.into_inner());
        if (bytes.len() as u64) < end {
            bytes.resize(end as usize, 0);
        }
        bytes[offset as usize..end as usize].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.bytes.read().unwrap_or_else(|e| e.into_inner()).len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if len > self.max_len {
            return Err(too_big());
        }
        self.bytes.write().unwrap_or_else(|e| e.into_inner()).resize(len as usize, 0);
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut bytes = self.bytes.write().unwrap_or_else(|e| e.into_inner());
        let size = bytes.len() as u64;
        let start = offset.min(size) as usize;
        let end = offset.saturating_add(len).min(size) as usize;
        bytes[start..end].fill(0);
        Ok(())
    }
}
