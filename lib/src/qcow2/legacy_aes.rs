//! Legacy AES encryption (crypt_method 1) in the data path. Its IVs
//! number *guest* sectors, where LUKS in qcow2 numbers host ones (as
//! QEMU does each), so guest data goes through here with both offsets.
//! Compressed clusters stay in the clear: QEMU neither encrypts nor
//! decrypts them. Other writes of the data area (preallocation, zero
//! expansion of `amend`) go to the file unencrypted, as QEMU's do.

use super::{Qcow2, Qcow2Options};
use crate::crypto::CryptStorage;
use crate::storage::Storage;
use crate::{Error, Result};
use std::io;
use std::sync::Arc;

/// The cipher view of a legacy AES image's file (none without I/O) and
/// the storage its other data accesses use.
pub(super) type Opened = (Option<Arc<CryptStorage>>, Arc<dyn Storage>);

/// Opens the data path of a legacy AES image.
pub(super) fn open(file: &Arc<dyn Storage>, opts: &Qcow2Options) -> Result<Opened> {
    if opts.no_io {
        return Ok((None, Arc::new(crate::crypto::NoKey)));
    }
    let key = opts
        .key_secret
        .as_ref()
        .ok_or_else(|| Error::invalid("Parameter 'encrypt.key-secret' is required for cipher"))?;
    let cipher = Arc::new(crate::crypto::legacy_aes_cipher(key)?);
    Ok((Some(Arc::new(CryptStorage::new(file.clone(), 0, cipher))), file.clone()))
}

impl Qcow2 {
    /// Reads guest bytes at `guest` from their host place `host`.
    pub(super) fn read_guest_data(&self, dst: &mut [u8], host: u64, guest: u64) -> io::Result<()> {
        match &self.aes {
            Some(c) => c.read_iv(dst, host, guest),
            None => self.data.read_at(dst, host),
        }
    }

    /// Writes guest bytes of `guest` to their host place `host`.
    pub(super) fn write_guest_data(&self, src: &[u8], host: u64, guest: u64) -> io::Result<()> {
        match &self.aes {
            Some(c) => c.write_iv(src, host, guest),
            None => self.data.write_at(src, host),
        }
    }

    /// Whether unwritten bytes of a new cluster read as noise rather than
    /// zeros once decrypted.
    pub(super) fn encrypted(&self) -> bool {
        self.luks.is_some() || self.aes.is_some()
    }
}
