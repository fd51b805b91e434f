//! [`NbdStorage`]: a remote export as [`Storage`], the storage driver
//! for `nbd:` names, so any format can sit on an export (a qcow2 image
//! served over NBD, for one) just as it sits on a local file.

use super::device::{io_of, ClientOptions, NbdClient};
use super::url::NbdUrl;
use crate::storage::Storage;
use crate::{BlockDevice, Error, Result};
use std::io;
use std::sync::Arc;

/// An export as byte storage, so any format can sit on it (a qcow2 image
/// served over NBD, for one). Reads past the end return zeros; the export
/// cannot grow.
#[derive(Debug)]
pub struct NbdStorage(Arc<NbdClient>);

impl NbdStorage {
    /// Connects to the export `name` names (any form [`NbdUrl::parse`]
    /// takes), as [`FileStorage::open`](crate::storage::FileStorage::open)
    /// opens a path. Without `opts.read_only`, an export the server offers
    /// only read-only is refused.
    pub fn open(name: &str, opts: ClientOptions) -> Result<NbdStorage> {
        let read_only = opts.read_only;
        let c = NbdClient::connect_with(NbdUrl::parse(name)?, opts)?;
        if !read_only && c.is_read_only() {
            return Err(Error::ReadOnly(format!("NBD export '{name}' is read-only")));
        }
        Ok(NbdStorage(Arc::new(c)))
    }

    /// Storage over an already connected client.
    pub fn new(client: Arc<NbdClient>) -> NbdStorage {
        NbdStorage(client)
    }

    /// The client underneath, which is also the export's raw device: it
    /// knows the export's allocation and zeroes and trims natively.
    pub fn client(&self) -> &Arc<NbdClient> {
        &self.0
    }
}

impl Storage for NbdStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let size = self.0.len();
        let n = if offset >= size { 0 } else { (size - offset).min(buf.len() as u64) as usize };
        if n > 0 {
            self.0.read_at(&mut buf[..n], offset).map_err(|e| io_of(&e))?;
        }
        buf[n..].fill(0);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_at(buf, offset).map_err(|e| io_of(&e))
    }
    fn flush(&self) -> io::Result<()> {
        self.0.flush().map_err(|e| io_of(&e))
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if len == self.0.len() {
            return Ok(());
        }
        Err(io::Error::new(io::ErrorKind::Unsupported, "NBD exports cannot be resized"))
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.write_zeroes(offset, len, true).map_err(|e| io_of(&e))
    }
    fn extent_at(&self, offset: u64) -> Option<(bool, u64)> {
        let size = self.0.len();
        if offset >= size || !self.0.has_block_status() {
            return None;
        }
        let st = self.0.block_status(offset, size - offset).ok()?;
        Some((st.data, st.offset + st.length))
    }
}
