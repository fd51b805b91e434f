//! QEMU's `null-co` block driver as storage: a disk of a given size that
//! reads as zeros and drops what is written to it (benchmarks and iotests
//! use it as a bottomless source or sink). Named `null-co://?size=N`
//! (`size` in bytes, default 1 GiB as QEMU's); the CLI turns
//! `driver=null-co,size=N` option trees and `json:` names into that.

use std::io;

/// QEMU's default size for a null-co node.
pub const DEFAULT_SIZE: u64 = 1 << 30;

const PREFIX: &str = "null-co://";

/// Reads zeros, drops writes, keeps a fixed length.
#[derive(Debug)]
pub struct NullStorage {
    size: u64,
}

impl NullStorage {
    /// The null storage a `null-co://` name describes; `None` for other
    /// names, an error for a malformed size.
    pub fn from_name(name: &str) -> Option<io::Result<NullStorage>> {
        let rest = name.strip_prefix(PREFIX)?;
        let mut size = DEFAULT_SIZE;
        for kv in rest.trim_start_matches('?').split('&').filter(|s| !s.is_empty()) {
            match kv.split_once('=') {
                Some(("size", v)) => match v.parse() {
                    Ok(n) => size = n,
                    Err(_) => return Some(Err(invalid(format!("invalid null-co size '{v}'")))),
                },
                _ => return Some(Err(invalid(format!("unknown null-co option '{kv}'")))),
            }
        }
        Some(Ok(NullStorage { size }))
    }

    /// The name [`NullStorage::from_name`] takes for a disk of `size` bytes.
    pub fn name(size: u64) -> String {
        format!("{PREFIX}?size={size}")
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl super::Storage for NullStorage {
    fn read_at(&self, buf: &mut [u8], _offset: u64) -> io::Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.size)
    }
    fn set_len(&self, _len: u64) -> io::Result<()> {
        Err(io::Error::new(io::ErrorKind::Unsupported, "null-co has a fixed size"))
    }
    fn punch_hole(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    fn allocated_size(&self) -> io::Result<u64> {
        Ok(0)
    }
    /// All of it reads as zeros, as a hole does.
    fn extent_at(&self, offset: u64) -> Option<(bool, u64)> {
        Some((false, self.size.max(offset)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Storage;

    #[test]
    fn null_co_names_read_zeros_and_drop_writes() {
        assert!(NullStorage::from_name("x.raw").is_none());
        let s = NullStorage::from_name(&NullStorage::name(4096)).unwrap().unwrap();
        assert_eq!(s.len().unwrap(), 4096);
        s.write_at(&[7; 512], 0).unwrap();
        let mut b = [1u8; 512];
        s.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [0; 512]);
        assert_eq!(NullStorage::from_name("null-co://").unwrap().unwrap().len().unwrap(), DEFAULT_SIZE);
        assert!(NullStorage::from_name("null-co://?size=x").unwrap().is_err());
        assert!(NullStorage::from_name("null-co://?bogus=1").unwrap().is_err());
    }
}
