//! [`NbdStorage`]: a remote export as [`Storage`], the storage driver
//! for `nbd:` names, so any format can sit on an export (a qcow2 image
//! served over NBD, for one) just as it sits on a local file.

use super::device::{io_of, ClientOptions, NbdClient};
use super::url::NbdUrl;
use crate::storage::Storage;
use crate::{BlockDevice, Error, Result};
use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// An export as byte storage, so any format can sit on it (a qcow2 image
/// served over NBD, for one). Reads past the end return zeros; the export
/// cannot grow.
#[derive(Debug)]
pub struct NbdStorage {
    client: Arc<NbdClient>,
    /// Truncating to a length at most the export's succeeds and changes
    /// nothing (see [`NbdStorage::for_new_image`]).
    inexact: bool,
}

impl NbdStorage {
    /// Connects to the export `name` names (any form [`NbdUrl::parse`]
    /// takes), as [`FileStorage::open`](crate::storage::FileStorage::open)
    /// opens a path. Without `opts.read_only`, an export the server offers
    /// only read-only is refused.
    pub fn open(name: &str, opts: ClientOptions) -> Result<NbdStorage> {
        let read_only = opts.read_only;
        let opts = match (opts.reconnect_delay, reconnect_delay_for(name)) {
            (None, Some(d)) => opts.reconnect_delay(d),
            _ => opts,
        };
        let c = NbdClient::connect_with(NbdUrl::parse(name)?, opts)?;
        if !read_only && c.is_read_only() {
            return Err(Error::ReadOnly(format!("NBD export '{name}' is read-only")));
        }
        Ok(NbdStorage { client: Arc::new(c), inexact: false })
    }

    /// Storage over an already connected client.
    pub fn new(client: Arc<NbdClient>) -> NbdStorage {
        NbdStorage { client, inexact: false }
    }

    /// The export as the file a new image is written on (`qemu-img create`
    /// or `convert` onto an existing export): an export has the size its
    /// server gives it, so the truncation that starts a new image cannot
    /// happen. As QEMU's inexact truncation of an NBD node, one to a length
    /// within the export succeeds without changing anything; the image's
    /// own metadata says which clusters it uses, not the length.
    pub fn for_new_image(self) -> NbdStorage {
        NbdStorage { inexact: true, ..self }
    }

    /// The client underneath, which is also the export's raw device: it
    /// knows the export's allocation and zeroes and trims natively.
    pub fn client(&self) -> &Arc<NbdClient> {
        &self.client
    }
}

/// Reconnect delays by location name (QEMU's `reconnect-delay` option of
/// the nbd driver, which `--image-opts` gives and a name cannot carry).
fn delays() -> &'static Mutex<HashMap<String, Duration>> {
    static D: OnceLock<Mutex<HashMap<String, Duration>>> = OnceLock::new();
    D.get_or_init(Default::default)
}

/// Sets the reconnect delay `name` is opened with from now on in this
/// process: a request that loses its connection waits that long for the
/// server to come back, then is sent again.
pub fn set_reconnect_delay(name: &str, delay: Duration) {
    delays().lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string(), delay);
}

fn reconnect_delay_for(name: &str) -> Option<Duration> {
    delays().lock().unwrap_or_else(|p| p.into_inner()).get(name).copied()
}

impl Storage for NbdStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let size = self.client.len();
        let n = if offset >= size { 0 } else { (size - offset).min(buf.len() as u64) as usize };
        if n > 0 {
            self.client.read_at(&mut buf[..n], offset).map_err(|e| io_of(&e))?;
        }
        buf[n..].fill(0);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.client.write_at(buf, offset).map_err(|e| io_of(&e))
    }
    fn flush(&self) -> io::Result<()> {
        self.client.flush().map_err(|e| io_of(&e))
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.client.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if len == self.client.len() || (self.inexact && len < self.client.len()) {
            return Ok(());
        }
        Err(io::Error::new(io::ErrorKind::Unsupported, "NBD exports cannot be resized"))
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.client.write_zeroes(offset, len, true).map_err(|e| io_of(&e))
    }
    fn extent_at(&self, offset: u64) -> Option<(bool, u64)> {
        let size = self.client.len();
        if offset >= size || !self.client.has_block_status() {
            return None;
        }
        let st = self.client.block_status(offset, size - offset).ok()?;
        Some((st.data, st.offset + st.length))
    }
}
