//! How an export is presented ([`ExportConfig`]) and how a server runs
//! ([`ServeOptions`]): plain values, shared by the accept loop, the
//! handshake and the transmission phase.

use crate::nbd::tls::TlsServer;
use crate::Error;
use std::str::FromStr;
use std::time::Duration;

/// What `NBD_CMD_TRIM` does (qemu-nbd's `--discard`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiscardMode {
    /// Discard requests succeed without touching the image.
    #[default]
    Ignore,
    /// Discard requests deallocate (and write-zeroes may deallocate too).
    Unmap,
}

impl FromStr for DiscardMode {
    type Err = Error;
    /// qemu-nbd's `--discard` values: `ignore`/`off` and `unmap`/`on`.
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "ignore" | "off" => Ok(DiscardMode::Ignore),
            "unmap" | "on" => Ok(DiscardMode::Unmap),
            other => Err(Error::invalid(format!("Invalid discard mode '{other}'"))),
        }
    }
}

/// Whether written buffers of zeros are turned into zero writes
/// (qemu-nbd's `--detect-zeroes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetectZeroes {
    /// Write what the client sent.
    #[default]
    Off,
    /// Zero buffers become write-zeroes that keep the range allocated.
    On,
    /// Zero buffers become write-zeroes that may deallocate (only when
    /// [`DiscardMode::Unmap`] is also set, as in QEMU).
    Unmap,
}

impl FromStr for DetectZeroes {
    type Err = Error;
    /// qemu-nbd's `--detect-zeroes` values: `off`, `on` and `unmap`.
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "off" => Ok(DetectZeroes::Off),
            "on" => Ok(DetectZeroes::On),
            "unmap" => Ok(DetectZeroes::Unmap),
            other => Err(Error::invalid(format!("Invalid detect-zeroes mode '{other}'"))),
        }
    }
}

/// How the one export of a [`Server`](super::Server) is presented to clients.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExportConfig {
    /// Export name (qemu-nbd's `-x`); clients asking for the empty name
    /// also get this export, since it is the server's only one.
    pub name: String,
    /// Description shown by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION` (`-D`).
    pub description: String,
    /// Refuse writes and advertise `NBD_FLAG_READ_ONLY` (`-r`); a device
    /// that is itself read-only is exported read-only regardless.
    pub read_only: bool,
    /// What discard requests do.
    pub discard: DiscardMode,
    /// Zero detection on writes.
    pub detect_zeroes: DetectZeroes,
    /// Advertise `NBD_FLAG_CAN_MULTI_CONN`. Every connection shares one
    /// device, so it is always true here; qemu-nbd advertises it exactly
    /// when `-e` allows more than one client.
    pub multi_conn_ok: bool,
    /// Offer the `qemu:allocation-depth` metadata context (qemu-nbd offers
    /// it only with `-A`; offering it costs nothing to clients that do not
    /// ask for it).
    pub allocation_depth: bool,
    /// Offer these persistent dirty bitmaps of the device as
    /// `qemu:dirty-bitmap:NAME` metadata contexts (qemu-nbd's `-B NAME`,
    /// repeated; at most 64).
    pub dirty_bitmaps: Vec<String>,
    /// The minimum block size advertised in `NBD_INFO_BLOCK_SIZE` (a power
    /// of two up to 64 KiB; anything else advertises 1). Smaller requests
    /// are still served: it only asks clients to align theirs.
    pub min_block_size: u32,
}

setters!(ExportConfig {
    name: String,
    description: String,
    read_only: bool,
    discard: DiscardMode,
    detect_zeroes: DetectZeroes,
    multi_conn_ok: bool,
    allocation_depth: bool,
    dirty_bitmaps: Vec<String>,
    min_block_size: u32,
});

impl ExportConfig {
    /// An export named `name`, otherwise as [`ExportConfig::default`].
    pub fn new(name: impl Into<String>) -> ExportConfig {
        ExportConfig { name: name.into(), ..ExportConfig::default() }
    }
}

impl Default for ExportConfig {
    fn default() -> Self {
        ExportConfig {
            name: String::new(),
            description: String::new(),
            read_only: false,
            discard: DiscardMode::Ignore,
            detect_zeroes: DetectZeroes::Off,
            multi_conn_ok: false,
            allocation_depth: true,
            dirty_bitmaps: Vec::new(),
            min_block_size: crate::nbd::proto::MIN_BLOCK_SIZE,
        }
    }
}

/// Tuning of [`Server::serve`](super::Server::serve).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServeOptions {
    /// Keep serving after the last client leaves (qemu-nbd's `-t`);
    /// otherwise serving ends once a client has come and all have gone.
    pub persistent: bool,
    /// Most clients served at once (qemu-nbd's `-e`, default 1; 0 counts
    /// as 1); further clients wait in the listen backlog until a slot
    /// frees, as with qemu-nbd.
    pub max_connections: usize,
    /// Worker threads per connection carrying out requests in parallel.
    pub workers: usize,
    /// Longest a client may take to finish negotiation.
    pub handshake_timeout: Duration,
    /// Longest the server waits on a client in the middle of a message,
    /// either way (the rest of a request once it has begun, or room to
    /// send a reply) before dropping it. Idle time between requests is not
    /// limited.
    pub io_timeout: Duration,
    /// Payload bytes (write data and read buffers) one client may have in
    /// flight before its further requests wait.
    pub max_in_flight_bytes: usize,
    /// Requests one client may have in flight before its further requests wait.
    pub max_in_flight_requests: usize,
    /// Require TLS with these credentials (qemu-nbd's `--tls-creds`):
    /// clients must send `NBD_OPT_STARTTLS` before anything else.
    pub tls: Option<TlsServer>,
    /// Told why a client's negotiation failed (qemu-nbd logs "option
    /// negotiation failed: ..."); a client that says goodbye with
    /// `NBD_OPT_ABORT` is no failure.
    pub negotiation_log: Option<NegotiationLog>,
}

/// Where [`ServeOptions::negotiation_log`] reports.
#[derive(Clone)]
pub struct NegotiationLog(pub std::sync::Arc<dyn Fn(&str) + Send + Sync>);

impl std::fmt::Debug for NegotiationLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NegotiationLog")
    }
}

setters!(ServeOptions {
    negotiation_log: Option<NegotiationLog>,
    persistent: bool,
    max_connections: usize,
    workers: usize,
    handshake_timeout: Duration,
    io_timeout: Duration,
    max_in_flight_bytes: usize,
    max_in_flight_requests: usize,
    tls: Option<TlsServer>,
});

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            persistent: false,
            max_connections: 1,
            workers: 4,
            handshake_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(60),
            max_in_flight_bytes: 64 << 20,
            max_in_flight_requests: 128,
            tls: None,
            negotiation_log: None,
        }
    }
}
