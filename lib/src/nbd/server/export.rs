//! What every connection of a server shares: the export ([`Shared`]),
//! and what one connection's negotiation agreed on ([`Session`]). The
//! handshake produces a session over the shared export; the transmission
//! phase consumes both; neither knows the accept loop.

use super::config::ExportConfig;
use crate::BlockDevice;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Context id of `base:allocation` on every connection (ids are opaque to
/// clients; fixed ids keep the code simple).
pub(crate) const ID_BASE_ALLOCATION: u32 = 1;
/// Context id of `qemu:allocation-depth`.
pub(crate) const ID_ALLOCATION_DEPTH: u32 = 2;
/// Context id of `qemu:dirty-bitmap:NAME` for the export's first bitmap
/// (the next ones follow).
pub(crate) const ID_DIRTY_BITMAP: u32 = 3;
/// Most dirty bitmaps one export offers (one bit each in a session).
pub(crate) const MAX_DIRTY_BITMAPS: usize = 64;

/// What negotiation agreed on, for the transmission phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Session {
    /// Structured replies were negotiated (also implied by extended
    /// headers).
    pub structured: bool,
    /// Extended headers were negotiated: 32-byte requests and replies,
    /// 64-bit effect lengths, no simple replies.
    pub extended: bool,
    /// `base:allocation` was selected.
    pub base_allocation: bool,
    /// `qemu:allocation-depth` was selected.
    pub allocation_depth: bool,
    /// Which of the export's `qemu:dirty-bitmap:NAME` contexts were
    /// selected (bit i: the export's bitmap i).
    pub dirty_bitmaps: u64,
}

/// State shared by every connection of a server.
pub(crate) struct Shared {
    pub device: Arc<dyn BlockDevice>,
    pub config: ExportConfig,
    /// Writes are refused (asked for, or the device itself is read-only).
    pub read_only: bool,
    stopping: AtomicBool,
    live: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    next: u64,
    shutdowns: HashMap<u64, Box<dyn Fn() + Send>>,
}

impl Shared {
    /// The state of a new server exporting `device`.
    pub fn new(device: Arc<dyn BlockDevice>, config: ExportConfig) -> Shared {
        let read_only = config.read_only || device.is_read_only();
        Shared { device, config, read_only, stopping: AtomicBool::new(false), live: Mutex::new(Registry::default()) }
    }
    /// Whether `name` selects the export: its own name, or the empty name
    /// that means the default export (the only one here).
    pub fn name_matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.config.name.as_bytes()
    }
    /// The server is shutting down.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }
    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// Remembers how to shut a connection down; `None` when the server is
    /// already stopping (the connection is shut down at once).
    pub fn register(&self, shutdown: Box<dyn Fn() + Send>) -> Option<u64> {
        let mut r = self.registry();
        if self.is_stopping() {
            drop(r);
            shutdown();
            return None;
        }
        let id = r.next;
        r.next += 1;
        r.shutdowns.insert(id, shutdown);
        Some(id)
    }
    pub fn unregister(&self, id: u64) {
        self.registry().shutdowns.remove(&id);
    }
    pub fn stop_all(&self) {
        let r = self.registry();
        self.stopping.store(true, Ordering::Release);
        for s in r.shutdowns.values() {
            s();
        }
    }
}
