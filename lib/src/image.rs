//! Opening images by file name: format detection, backing chains,
//! external data files.

use crate::cache_mode::CacheModeDevice;
use crate::device::BlockDevice;
use crate::format::limits::MAX_BACKING_DEPTH;
use crate::nbd::{ClientOptions, NbdClient, NbdStorage, NbdUrl};
use crate::qcow2::{read_header_cluster, Qcow2, Qcow2Options};
use crate::raw::RawImage;
use crate::storage::{FileStorage, LockMode, NoFlushStorage, OpenFlags, Storage};
use crate::{Error, Result};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Image formats oxcow opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The file is the disk.
    Raw,
    /// QEMU's qcow2, v2 or v3.
    Qcow2,
}

impl Format {
    /// Parses a `-f` value.
    pub fn from_name(s: &str) -> Result<Format> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            other => Err(Error::unsupported(format!("Unknown driver '{other}'"))),
        }
    }
    /// The format's name.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

/// QEMU's cache modes, and what each promises:
///
/// | mode         | host cache | a write (zeroes, discard) completes | flush  |
/// |--------------|------------|-------------------------------------|--------|
/// | writeback    | used       | when the host has it                | syncs  |
/// | none         | O_DIRECT   | when the host has it                | syncs  |
/// | writethrough | used       | once durable (synced)               | syncs  |
/// | directsync   | O_DIRECT   | once durable (synced)               | syncs  |
/// | unsafe       | used       | when the host has it                | no-op  |
///
/// They hold for every file of an image (backing files are read only;
/// external data files follow the image).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Host page cache, flushes honoured.
    #[default]
    Writeback,
    /// O_DIRECT, flushes honoured.
    None,
    /// Every write durable before it completes.
    Writethrough,
    /// O_DIRECT and writethrough.
    Directsync,
    /// Flushes ignored.
    Unsafe,
}

impl CacheMode {
    /// Parses qemu's names.
    pub fn from_name(s: &str) -> Result<CacheMode> {
        Ok(match s {
            "writeback" => CacheMode::Writeback,
            "none" | "off" => CacheMode::None,
            "writethrough" => CacheMode::Writethrough,
            "directsync" => CacheMode::Directsync,
            "unsafe" => CacheMode::Unsafe,
            other => return Err(Error::invalid(format!("Invalid cache option: {other}"))),
        })
    }
    /// Whether files bypass the host page cache (O_DIRECT).
    pub fn direct(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::Directsync)
    }
    /// Whether each write is durable before it completes.
    pub fn writethrough(self) -> bool {
        matches!(self, CacheMode::Writethrough | CacheMode::Directsync)
    }
    /// Whether flushes are ignored.
    pub fn ignores_flushes(self) -> bool {
        self == CacheMode::Unsafe
    }
}

/// A function applied to the storage of every file [`open`] opens (image,
/// backing and data files), beneath the cache mode's own layers: a seam
/// for tests that count or inject what reaches the files.
#[derive(Clone)]
pub struct StorageHook(pub Arc<WrapStorage>);

/// What a [`StorageHook`] calls: the file's path and storage in, the
/// storage to use out.
pub type WrapStorage = dyn Fn(&Path, Arc<dyn Storage>) -> Arc<dyn Storage> + Send + Sync;

impl std::fmt::Debug for StorageHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StorageHook")
    }
}

/// How to open an image.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// The format; probed from the magic when `None`.
    pub format: Option<Format>,
    /// Open for writing.
    pub write: bool,
    /// Cache mode.
    pub cache: CacheMode,
    /// Do not open the backing chain (reads of unallocated areas then
    /// return zeros).
    pub no_backing: bool,
    /// Follow backing names that point to the network.
    pub allow_network_backing: bool,
    /// Open a damaged qcow2 image writable so `check -r` can repair it.
    pub repair: bool,
    /// Copy-on-read for the top qcow2 image (never for its backing files).
    pub copy_on_read: bool,
    /// Take QEMU-compatible image locks on every file opened (default on;
    /// off is QEMU's `locking=off`).
    pub locking: bool,
    /// Read-only without refusing others the right to write (qemu-img
    /// `-U`, `force-share=on`); refused together with `write`.
    pub force_share: bool,
    /// Wraps the storage of every file opened (tests).
    pub storage_hook: Option<StorageHook>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            format: None,
            write: false,
            cache: CacheMode::default(),
            no_backing: false,
            allow_network_backing: false,
            repair: false,
            locking: true,
            force_share: false,
            copy_on_read: false,
            storage_hook: None,
        }
    }
}

impl OpenOptions {
    /// Read-only, format probed.
    pub fn read_only() -> Self {
        OpenOptions::default()
    }
    /// Read-write, format probed.
    pub fn read_write() -> Self {
        OpenOptions { write: true, ..Default::default() }
    }
}

/// An opened image with what the inspection tools need to know about it.
pub struct Image {
    path: PathBuf,
    format: Format,
    device: Arc<dyn BlockDevice>,
    qcow2: Option<Arc<Qcow2>>,
    file: Arc<dyn Storage>,
    backing: Option<Box<Image>>,
    backing_name: Option<String>,
    backing_format: Option<String>,
}

impl Image {
    /// The image as a block device.
    pub fn device(&self) -> &dyn BlockDevice {
        &*self.device
    }
    /// A shared handle to the device.
    pub fn device_arc(&self) -> Arc<dyn BlockDevice> {
        self.device.clone()
    }
    /// The qcow2 engine, for qcow2 images.
    pub fn qcow2(&self) -> Option<&Qcow2> {
        self.qcow2.as_deref()
    }
    /// A shared handle to the qcow2 engine (for background work such as
    /// prefetching), for qcow2 images.
    pub fn qcow2_arc(&self) -> Option<Arc<Qcow2>> {
        self.qcow2.clone()
    }
    /// The path it was opened by.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Its format.
    pub fn format(&self) -> Format {
        self.format
    }
    /// The opened backing image, if any.
    pub fn backing(&self) -> Option<&Image> {
        self.backing.as_deref()
    }
    /// The backing file name as recorded in the image.
    pub fn backing_name(&self) -> Option<&str> {
        self.backing_name.as_deref()
    }
    /// The backing format as recorded in the image.
    pub fn backing_format(&self) -> Option<&str> {
        self.backing_format.as_deref()
    }
    /// Bytes the image file occupies on the host.
    pub fn actual_size(&self) -> u64 {
        self.file.allocated_size().unwrap_or(0)
    }
    /// The image file's storage.
    pub fn file(&self) -> &Arc<dyn Storage> {
        &self.file
    }
    /// Flushes and closes cleanly.
    pub fn close(&self) -> Result<()> {
        self.device.close()
    }
}

/// The local files of a backing chain, by identity (device and inode), so
/// that a chain coming back to a file already in it is refused as a loop
/// instead of being followed until memory or the depth limit runs out.
/// Names would miss loops through a symlink, a hard link or `./`.
#[derive(Debug, Default)]
pub struct ChainFiles(HashSet<(u64, u64)>);

impl ChainFiles {
    /// Records the file `path` names; refuses one already in the chain
    /// with qemu-img's message. Names that are no local file (network
    /// exports, missing files) are left for the open to report.
    pub fn enter(&mut self, path: &Path) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        let Ok(md) = std::fs::metadata(path) else { return Ok(()) };
        if !self.0.insert((md.dev(), md.ino())) {
            return Err(Error::invalid(format!("Backing file '{}' creates an infinite loop.", path.display())));
        }
        Ok(())
    }
}

/// Whether a backing name names a protocol rather than a file.
pub fn is_protocol_name(name: &str) -> bool {
    name.starts_with("json:") || name.contains("://") || name.starts_with("nbd:")
}

/// Resolves a backing file name relative to the directory of `image`.
pub fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    // Network names are locations, not paths relative to the image.
    if is_protocol_name(name) || NbdUrl::is_nbd(name) {
        return PathBuf::from(name);
    }
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match image.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(p),
        _ => p.to_path_buf(),
    }
}

/// The storage of an opened file as the image uses it: the hook, if any,
/// and the cache mode's flush policy on top of the file.
fn file_layers(path: &Path, file: FileStorage, opts: &OpenOptions) -> Arc<dyn Storage> {
    let mut st: Arc<dyn Storage> = Arc::new(file);
    if let Some(hook) = &opts.storage_hook {
        st = (hook.0)(path, st);
    }
    if opts.cache.ignores_flushes() {
        st = Arc::new(NoFlushStorage(st));
    }
    st
}

fn open_file(path: &Path, write: bool, cache: CacheMode, lock: Option<LockMode>) -> Result<FileStorage> {
    let flags = OpenFlags { write, direct: cache.direct(), ..OpenFlags::default() };
    let opened = match lock {
        Some(mode) => FileStorage::open_locked(path, flags, mode),
        None => FileStorage::open(path, flags).map_err(|e| Error::io(String::new(), e)),
    };
    match opened {
        Ok(f) => Ok(f),
        Err(Error::Io { source: e, .. }) if cache.direct() && e.raw_os_error() == Some(libc::EINVAL) => {
            Err(Error::io(format!("Could not open '{}': O_DIRECT is not supported here", path.display()), e))
        }
        Err(Error::Io { source: e, .. }) => Err(Error::io(format!("Could not open '{}'", path.display()), e)),
        Err(other) => Err(other),
    }
}

/// The locks to take on an image file of `format` (or on a backing file,
/// which is opened as a reader) under `opts`.
fn lock_mode(opts: &OpenOptions, format: Format) -> Option<LockMode> {
    if !opts.locking {
        return None;
    }
    Some(match format {
        // QEMU's qcow2 driver keeps others from writing or resizing under
        // its metadata even when only reading; over raw, QEMU's readers
        // refuse nobody, so ours do not either.
        Format::Raw if !opts.write => LockMode::raw_reader(),
        _ => LockMode::for_open(opts.write, opts.force_share),
    })
}

/// Probes the format of a file from its first bytes.
pub fn probe_format(file: &dyn Storage) -> Result<Format> {
    let mut magic = [0u8; 4];
    file.read_at(&mut magic, 0).map_err(|e| Error::io("reading image", e))?;
    Ok(if crate::format::has_magic(&magic) { Format::Qcow2 } else { Format::Raw })
}

/// Opens an image by file name.
///
/// Unless `opts.locking` is off, every file of the image takes
/// QEMU-compatible locks (see [`crate::storage::lock`]) before anything is
/// read or written, and a conflict with another user (QEMU or oxcow) is an
/// [`Error::Locked`] whose message reads as QEMU's after its
/// `Could not open 'PATH': ` (which the tools add in their own words).
///
/// Names starting with `nbd:` (`nbd://HOST[:PORT]/NAME`,
/// `nbd+unix:///NAME?socket=PATH`, QEMU's legacy `nbd:HOST:PORT`) open a
/// network export through [`crate::nbd::NbdClient`] (no locks: there is no
/// local file); a raw export's device is the client itself. Such names
/// inside an image, as backing files, are followed only with
/// `opts.allow_network_backing` (otherwise [`Error::NetworkBacking`]).
pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Image> {
    if opts.write && opts.force_share {
        return Err(Error::invalid("force-share=on can only be used with read-only images"));
    }
    let path = path.as_ref();
    let mut chain = ChainFiles::default();
    chain.enter(path)?;
    open_depth(path, opts, 0, &mut chain)
}

/// Opens `path` as image number `depth` of a chain whose files so far are
/// in `chain`.
fn open_depth(path: &Path, opts: &OpenOptions, depth: usize, chain: &mut ChainFiles) -> Result<Image> {
    // Loops through local files are caught by `chain`; this bounds chains
    // through network exports, which have no file identity.
    if depth > MAX_BACKING_DEPTH {
        return Err(Error::invalid(format!("backing chain deeper than {MAX_BACKING_DEPTH}")));
    }
    // `nbd:` names open a network export (no local file, so no locks).
    let nbd = open_nbd_name(path, opts)?;
    let (storage, format, probed): (Arc<dyn Storage>, Format, bool) = match &nbd {
        Some(c) => {
            let mut s: Arc<dyn Storage> = Arc::new(NbdStorage(c.clone()));
            if opts.cache.ignores_flushes() {
                s = Arc::new(NoFlushStorage(s));
            }
            let (f, p) = match opts.format {
                Some(f) => (f, false),
                None => (probe_format(&*s)?, true),
            };
            (s, f, p)
        }
        None => {
            // Locked only once the format is known (which locks depends
            // on it); probing merely reads.
            let mut file = open_file(path, opts.write, opts.cache, None)?;
            let (format, probed) = match opts.format {
                Some(f) => (f, false),
                None => (probe_format(&file)?, true),
            };
            if let Some(mode) = lock_mode(opts, format) {
                file.lock(path, mode)?;
            }
            (file_layers(path, file, opts), format, probed)
        }
    };
    match format {
        Format::Raw => {
            let dev: Arc<dyn BlockDevice> = match nbd {
                // The client keeps no cache-mode promise of its own.
                Some(c) if opts.cache.writethrough() || opts.cache.ignores_flushes() => {
                    Arc::new(CacheModeDevice::new(c, opts.cache.writethrough(), opts.cache.ignores_flushes()))
                }
                Some(c) => c,
                None => Arc::new(
                    RawImage::new(storage.clone(), !opts.write, probed)?.writethrough(opts.cache.writethrough()),
                ),
            };
            Ok(Image {
                path: path.to_path_buf(),
                format,
                device: dev,
                qcow2: None,
                file: storage,
                backing: None,
                backing_name: None,
                backing_format: None,
            })
        }
        Format::Qcow2 => {
            let hc = read_header_cluster(&*storage)?;
            let backing_name = hc.backing_file.clone();
            let backing_format = hc.extensions.backing_format.clone();
            let mut backing = None;
            if let (Some(name), false) = (&backing_name, opts.no_backing) {
                if is_protocol_name(name) && !opts.allow_network_backing {
                    return Err(Error::NetworkBacking(format!(
                        "backing file name '{name}' names a protocol; refusing to follow it"
                    )));
                }
                // Network names are locations, not paths relative to the image.
                let bpath = if NbdUrl::is_nbd(name) { PathBuf::from(name) } else { resolve_backing(path, name) };
                let bfmt = match backing_format.as_deref() {
                    Some(f) => Some(Format::from_name(f)?),
                    None => None,
                };
                let bopts = OpenOptions { format: bfmt, write: false, copy_on_read: false, ..opts.clone() };
                chain.enter(&bpath)?;
                let b = open_depth(&bpath, &bopts, depth + 1, chain).map_err(|e| match e {
                    Error::Io { context, source } => {
                        Error::Io { context: format!("Could not open backing file: {context}"), source }
                    }
                    Error::Locked(m) => Error::Locked(format!("Could not open backing file: {m}")),
                    other => other,
                })?;
                backing = Some(Box::new(b));
            }
            let data_file = if hc.header.has_data_file() {
                let name = hc
                    .extensions
                    .data_file
                    .clone()
                    .ok_or_else(|| Error::invalid("image needs an external data file but names none"))?;
                if is_protocol_name(&name) {
                    return Err(Error::invalid(format!("data file name '{name}' names a protocol; refusing")));
                }
                // QEMU opens the data file by its name as given, relative
                // to the working directory (unlike backing files).
                let dpath = PathBuf::from(&name);
                let lock = match lock_mode(opts, format) {
                    Some(_) if !opts.force_share => Some(LockMode::data_file(opts.write)),
                    other => other,
                };
                let d = open_file(&dpath, opts.write, opts.cache, lock)?;
                Some(file_layers(&dpath, d, opts))
            } else {
                None
            };
            let q = Arc::new(Qcow2::open(
                storage.clone(),
                Qcow2Options {
                    read_only: !opts.write,
                    writethrough: opts.cache.writethrough(),
                    backing: backing.as_ref().map(|b| b.device_arc()),
                    data_file,
                    l2_cache_bytes: 0,
                    repair: opts.repair,
                    copy_on_read: opts.copy_on_read,
                },
            )?);
            Ok(Image {
                path: path.to_path_buf(),
                format,
                device: q.clone(),
                qcow2: Some(q),
                file: storage,
                backing,
                backing_name,
                backing_format,
            })
        }
    }
}

/// Connects to a network export when `path` is an NBD name.
fn open_nbd_name(path: &Path, opts: &OpenOptions) -> Result<Option<Arc<NbdClient>>> {
    let Some(name) = path.to_str().filter(|n| NbdUrl::is_nbd(n)) else {
        return Ok(None);
    };
    let url = NbdUrl::parse(name)?;
    let c = NbdClient::connect_with(url, ClientOptions { read_only: !opts.write, ..ClientOptions::default() })?;
    if opts.write && c.is_read_only() {
        return Err(Error::ReadOnly(format!("NBD export '{name}' is read-only")));
    }
    Ok(Some(Arc::new(c)))
}

/// Creates an empty file (or truncates one) for a new image, holding it
/// as a writer with QEMU-compatible locks; an existing file somebody else
/// uses is refused untouched.
pub fn create_file(path: &Path) -> Result<Arc<FileStorage>> {
    let flags = OpenFlags { write: true, create: true, ..OpenFlags::default() };
    match FileStorage::open_locked(path, flags, LockMode::writer()) {
        Ok(f) => Ok(Arc::new(f)),
        Err(Error::Io { source, .. }) => Err(Error::io(format!("Could not create '{}'", path.display()), source)),
        // A Locked error stays bare: qemu-img create puts "PATH: " in front.
        Err(other) => Err(other),
    }
}
