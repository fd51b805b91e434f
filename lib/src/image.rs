//! Opening images by file name: format detection, backing chains,
//! external data files.

use crate::backing::{BackingName, BackingPolicy, LocalBacking, NameRole, NetworkBacking};
use crate::cache_mode::CacheModeDevice;
use crate::device::BlockDevice;
use crate::format::limits::MAX_BACKING_DEPTH;
use crate::formats::mapped::MappedImage;
use crate::formats::probe::{probe, Probed, PROBE_BYTES};
use crate::formats::FormatInfo;
use crate::nbd::client::{ClientOptions, NbdStorage, NbdUrl};
use crate::qcow2::{read_header_cluster, Qcow2, Qcow2Options};
use crate::raw::RawImage;
use crate::storage::{FileStorage, LockMode, NoFlushStorage, OpenFlags, Storage};
use crate::{Error, Result};
use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

/// Image formats oxcow opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The file is the disk.
    Raw,
    /// QEMU's qcow2, v2 or v3.
    Qcow2,
    /// QEMU Enhanced Disk.
    Qed,
    /// VirtualBox's VDI.
    Vdi,
    /// Microsoft's VHD, QEMU's `vpc`.
    Vpc,
    /// VMware's VMDK.
    Vmdk,
    /// Hyper-V's VHDX.
    Vhdx,
    /// A raw LUKS1 volume.
    Luks,
}

impl Format {
    /// The format's name.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Qed => "qed",
            Format::Vdi => "vdi",
            Format::Vpc => "vpc",
            Format::Vmdk => "vmdk",
            Format::Vhdx => "vhdx",
            Format::Luks => "luks",
        }
    }

    /// Whether oxcow can open images of this format for writing.
    pub fn writable(self) -> bool {
        matches!(
            self,
            Format::Raw
                | Format::Qcow2
                | Format::Luks
                | Format::Qed
                | Format::Vdi
                | Format::Vpc
                | Format::Vmdk
                | Format::Vhdx
        )
    }
}

impl FromStr for Format {
    type Err = Error;
    /// Parses a driver name (`-f`): `raw`, `qcow2`, `qed`, `vdi`, `vpc`,
    /// `vmdk` or `vhdx`.
    fn from_str(s: &str) -> Result<Format> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            "qed" => Ok(Format::Qed),
            "vdi" => Ok(Format::Vdi),
            "vpc" => Ok(Format::Vpc),
            "vmdk" => Ok(Format::Vmdk),
            "vhdx" => Ok(Format::Vhdx),
            "luks" => Ok(Format::Luks),
            other => Err(Error::unsupported(format!("Unknown driver '{other}'"))),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
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

impl FromStr for CacheMode {
    type Err = Error;
    /// Parses QEMU's names: `writeback`, `none` (or `off`),
    /// `writethrough`, `directsync`, `unsafe`.
    fn from_str(s: &str) -> Result<CacheMode> {
        Ok(match s {
            "writeback" => CacheMode::Writeback,
            "none" | "off" => CacheMode::None,
            "writethrough" => CacheMode::Writethrough,
            "directsync" => CacheMode::Directsync,
            "unsafe" => CacheMode::Unsafe,
            other => return Err(Error::invalid(format!("Invalid cache option: {other}"))),
        })
    }
}

impl CacheMode {
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

/// How to open an image: [`OpenOptions::read_only`] or
/// [`OpenOptions::read_write`], then builder-style setters.
///
/// ```
/// use oxcow::{CacheMode, Format, OpenOptions};
/// let opts = OpenOptions::read_write().format(Format::Qcow2).cache(CacheMode::Writethrough);
/// assert!(opts.write);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
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
    /// Which backing file names found in images are followed (default:
    /// [`LocalBacking`], host files only).
    pub backing_policy: Arc<dyn BackingPolicy>,
    /// Open a damaged qcow2 image writable so `check -r` can repair it.
    pub repair: bool,
    /// Opened by `check` (QEMU's check mode): damage that `check` counts
    /// and reports does not refuse the open (a VHDX block table pointing
    /// past the end of the file).
    pub checking: bool,
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
    /// The password of an encrypted image (`encrypt.key-secret`).
    pub key_secret: Option<crate::crypto::Secret>,
    /// Open an encrypted image without its key, for its metadata only
    /// (`info`, as QEMU's no-I/O opens): its data reads then fail.
    pub no_io: bool,
    /// The format of the image's backing file, instead of the one the
    /// image names (QEMU's `backing.driver`); not passed further down.
    pub backing_driver: Option<Format>,
    /// The passwords of encrypted backing files, nearest first
    /// (`backing.encrypt.key-secret`, `backing.backing....`). A backing
    /// file without one here is tried with the overlay's password.
    pub backing_keys: Vec<Option<crate::crypto::Secret>>,
    /// Error-injection rules over the image's own file (QEMU's blkdebug
    /// driver; `blkdebug:CONFIG:FILE` names set them too); never passed
    /// to backing files.
    pub blkdebug: Option<crate::storage::BlkdebugRules>,
    /// Where requests stop at breakpoints, when a blkdebug layer is set
    /// (qemu-io's `break`); the layer marks them attached.
    pub blkdebug_breaks: Option<Arc<crate::storage::BlkdebugBreaks>>,
    /// The external data file to use instead of the one the image names
    /// (QEMU's `data-file` option): a file or a `null-co://` name; only for
    /// an image that has one, never passed to backing files.
    pub data_file: Option<PathBuf>,
    /// Error-injection rules over the external data file (a blkdebug node
    /// under QEMU's `data-file`).
    pub data_file_blkdebug: Option<crate::storage::BlkdebugRules>,
    /// The qcow2 cache options of the image (`l2-cache-size`, ...); its
    /// backing files keep the defaults, as in QEMU without `backing.*`.
    pub qcow2_cache: crate::qcow2::CacheOptions,
    /// The qcow2 `lazy-refcounts` open option (`None`: as the header says).
    pub qcow2_lazy_refcounts: Option<bool>,
    /// Neither use nor keep a qcow2 image's recovery journal
    /// (`Qcow2Options::ignore_journal`): a dirty image is repaired by the
    /// full scan.
    pub ignore_journal: bool,
    /// The file is itself an image of this format, whose virtual disk the
    /// image's format reads and writes (QEMU's `file.driver=qcow2`: a
    /// format over a format). The inner image opens with its own backing
    /// chain and these options' cache mode and locking.
    pub file_format: Option<Format>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            format: None,
            write: false,
            cache: CacheMode::default(),
            no_backing: false,
            backing_policy: Arc::new(LocalBacking),
            repair: false,
            checking: false,
            locking: true,
            force_share: false,
            copy_on_read: false,
            storage_hook: None,
            key_secret: None,
            no_io: false,
            backing_driver: None,
            backing_keys: Vec::new(),
            blkdebug: None,
            blkdebug_breaks: None,
            data_file: None,
            data_file_blkdebug: None,
            qcow2_cache: Default::default(),
            qcow2_lazy_refcounts: None,
            ignore_journal: false,
            file_format: None,
        }
    }
}

setters!(OpenOptions {
    write: bool,
    cache: CacheMode,
    no_backing: bool,
    repair: bool,
    checking: bool,
    copy_on_read: bool,
    locking: bool,
    force_share: bool,
    no_io: bool,
    qcow2_cache: crate::qcow2::CacheOptions,
    ignore_journal: bool,
} opt {
    format: Format,
    storage_hook: StorageHook,
    key_secret: crate::crypto::Secret,
    backing_driver: Format,
    blkdebug: crate::storage::BlkdebugRules,
    qcow2_lazy_refcounts: bool,
    blkdebug_breaks: Arc<crate::storage::BlkdebugBreaks>,
    data_file: PathBuf,
    data_file_blkdebug: crate::storage::BlkdebugRules,
    file_format: Format,
});

impl OpenOptions {
    /// Read-only, format probed.
    pub fn read_only() -> Self {
        OpenOptions::default()
    }
    /// Read-write, format probed.
    pub fn read_write() -> Self {
        OpenOptions { write: true, ..Default::default() }
    }
    /// Sets the policy for backing file names found in images.
    #[must_use]
    pub fn backing_policy(mut self, policy: impl BackingPolicy + 'static) -> Self {
        self.backing_policy = Arc::new(policy);
        self
    }
    /// Follows network (NBD) backing files too ([`NetworkBacking`]) when
    /// `allow`; otherwise host files only ([`LocalBacking`]).
    #[must_use]
    pub fn allow_network_backing(self, allow: bool) -> Self {
        if allow {
            self.backing_policy(NetworkBacking)
        } else {
            self.backing_policy(LocalBacking)
        }
    }
}

/// An opened image with what the inspection tools need to know about it.
pub struct Image {
    path: PathBuf,
    format: Format,
    device: Arc<dyn BlockDevice>,
    qcow2: Option<Arc<Qcow2>>,
    luks: Option<Arc<crate::crypto::LuksImage>>,
    file: Arc<dyn Storage>,
    backing: Option<Box<Image>>,
    backing_name: Option<String>,
    backing_format: Option<String>,
    format_info: Option<FormatInfo>,
    layout: Option<Arc<dyn crate::formats::Layout>>,
    probed: bool,
}

impl Image {
    /// A single-layer image (raw or LUKS): its device over `file`, no
    /// backing chain and no format metadata.
    fn without_backing(
        path: &Path,
        format: Format,
        device: Arc<dyn BlockDevice>,
        file: Arc<dyn Storage>,
        probed: bool,
    ) -> Image {
        Image {
            path: path.to_path_buf(),
            format,
            device,
            qcow2: None,
            luks: None,
            file,
            backing: None,
            backing_name: None,
            backing_format: None,
            format_info: None,
            layout: None,
            probed,
        }
    }

    /// The layout of an image of the formats in [`crate::formats`].
    pub(crate) fn layout(&self) -> Option<&Arc<dyn crate::formats::Layout>> {
        self.layout.as_ref()
    }
    /// What an image of the formats in [`crate::formats`] says about
    /// itself (cluster size, qemu-img's format-specific fields).
    pub fn format_info(&self) -> Option<&FormatInfo> {
        self.format_info.as_ref()
    }
    /// Checks an image of the formats in [`crate::formats`] as `qemu-img
    /// check` does (none for raw and qcow2, which have their own).
    pub fn check_format(&self) -> Option<Result<crate::qcow2::CheckReport>> {
        self.layout.as_ref().map(|l| l.check())
    }
    /// Repairs an image of the formats in [`crate::formats`] opened for
    /// writing, as `qemu-img check -r` does: (leaks, corruptions) fixed.
    pub fn repair_format(&self) -> Option<Result<(u64, u64)>> {
        self.layout.as_ref().map(|l| l.repair())
    }
    /// Whether the format was probed rather than given.
    pub fn format_probed(&self) -> bool {
        self.probed
    }
    /// The image as a block device (clone the `Arc` to share it, with an
    /// NBD server for one).
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.device
    }
    /// The qcow2 engine, for qcow2 images (clone the `Arc` for background
    /// work such as prefetching).
    pub fn qcow2(&self) -> Option<&Arc<Qcow2>> {
        self.qcow2.as_ref()
    }
    /// The LUKS device, for raw LUKS images.
    pub fn luks(&self) -> Option<&Arc<crate::crypto::LuksImage>> {
        self.luks.as_ref()
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

/// Resolves a backing file name relative to the directory of `image`.
pub fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    // Network names are locations, not paths relative to the image.
    if BackingName::new(name).is_protocol() {
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

/// Probes the format of a file from its first bytes, as QEMU does (see
/// [`crate::formats::probe`]); a format QEMU knows and oxcow does not read
/// is an error, never raw.
pub fn probe_format(file: &dyn Storage) -> Result<Format> {
    probe_named(file, Path::new(""))
}

/// [`probe_format`] for a file named `path` (QEMU's dmg rule looks at
/// the name).
fn probe_named(file: &dyn Storage, path: &Path) -> Result<Format> {
    let len = file.len().map_err(|e| Error::io("reading image", e))?;
    let mut head = vec![0u8; (len.min(PROBE_BYTES as u64)) as usize];
    file.read_at(&mut head, 0).map_err(|e| Error::io("reading image", e))?;
    match probe(&head, &path.to_string_lossy()) {
        Probed::Format(f) => Ok(f),
        Probed::Unsupported("luks") => Ok(Format::Luks),
        Probed::Unsupported(name) => {
            Err(Error::unsupported(format!("image format '{name}' is not supported by oxcow")))
        }
    }
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
/// network export through [`NbdStorage`] (no locks: there is no local
/// file); a raw export's device is the client itself. Such names
/// inside an image, as backing files, are followed only when
/// `opts.backing_policy` allows them (see [`crate::backing`]).
pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Image> {
    if opts.write && opts.force_share {
        return Err(Error::invalid("force-share=on can only be used with read-only images"));
    }
    let path = path.as_ref();
    if let Some(parsed) = path.to_str().and_then(crate::json_name::parse) {
        return open_json(parsed?, opts);
    }
    if let Some(parsed) = path.to_str().and_then(crate::storage::parse_blkdebug_name) {
        let (rules, file) = parsed.map_err(|e| Error::invalid(e.0))?;
        return open(file, &OpenOptions { blkdebug: Some(rules), ..opts.clone() });
    }
    let mut chain = ChainFiles::default();
    chain.enter(path)?;
    open_depth(path, opts, 0, &mut chain)
}

/// Opens what a `json:{...}` name describes: its file, in its format (or
/// the one given), under its blkdebug rules (or the ones given).
fn open_json(j: crate::json_name::JsonImage, opts: &OpenOptions) -> Result<Image> {
    if j.quorum && !opts.no_io {
        return Err(Error::unsupported("quorum is supported by oxcow only where no data is read (info)"));
    }
    let jopts = OpenOptions {
        format: j.format.or(opts.format),
        blkdebug: j.blkdebug.or(opts.blkdebug.clone()),
        ..opts.clone()
    };
    open(&j.file, &jopts)
}

/// Opens `path` as image number `depth` of a chain whose files so far are
/// in `chain`.
fn open_depth(path: &Path, opts: &OpenOptions, depth: usize, chain: &mut ChainFiles) -> Result<Image> {
    // Loops through local files are caught by `chain`; this bounds chains
    // through network exports, which have no file identity.
    if depth > MAX_BACKING_DEPTH {
        return Err(Error::invalid(format!("backing chain deeper than {MAX_BACKING_DEPTH}")));
    }
    let Opened { storage, native_raw, format, probed } = open_storage(path, opts)?;
    if opts.write && !format.writable() {
        return Err(Error::unsupported(format!(
            "oxcow cannot write {format} images yet; open it read-only, or convert it to qcow2"
        )));
    }
    match format {
        Format::Luks => {
            let dev =
                crate::crypto::LuksImage::open(storage.clone(), opts.key_secret.as_ref(), !opts.write, opts.no_io)?
                    .writethrough(opts.cache.writethrough());
            let dev = Arc::new(dev);
            Ok(Image { luks: Some(dev.clone()), ..Image::without_backing(path, format, dev, storage, probed) })
        }
        Format::Raw => {
            let dev: Arc<dyn BlockDevice> = match native_raw {
                Some(d) => d,
                None => Arc::new(
                    RawImage::new(storage.clone(), !opts.write, probed)?.writethrough(opts.cache.writethrough()),
                ),
            };
            Ok(Image::without_backing(path, format, dev, storage, probed))
        }
        Format::Qed | Format::Vdi | Format::Vpc | Format::Vmdk | Format::Vhdx => {
            let extra = |p: &Path| -> Result<Arc<dyn Storage>> {
                let f = open_file(p, opts.write, opts.cache, lock_mode(opts, format))?;
                Ok(file_layers(p, f, opts))
            };
            let opened = match format {
                Format::Qed => crate::formats::qed::open(storage.clone(), opts.write)?,
                Format::Vdi => crate::formats::vdi::open(storage.clone())?,
                Format::Vpc => crate::formats::vpc::open(storage.clone())?,
                Format::Vmdk => crate::formats::vmdk::open(storage.clone(), path, &extra)?,
                _ => crate::formats::vhdx::open(storage.clone(), path, opts.write, opts.checking)?,
            };
            let info = opened.info;
            let mut backing = None;
            if let (Some(name), false) = (&info.backing_name, opts.no_backing) {
                backing = Some(Box::new(open_backing(path, name, info.backing_format.as_deref(), opts, depth, chain)?));
            }
            let layout = opened.layout.clone();
            let mut dev = MappedImage::new(opened.layout, backing.as_ref().map(|b| b.device().clone()));
            if opts.write {
                dev = dev.writable(opts.cache.writethrough());
            }
            Ok(Image {
                path: path.to_path_buf(),
                format,
                device: Arc::new(dev),
                qcow2: None,
                luks: None,
                file: storage,
                backing,
                backing_name: info.backing_name.clone(),
                backing_format: info.backing_format.clone(),
                format_info: Some(info),
                layout: Some(layout),
                probed,
            })
        }
        Format::Qcow2 => {
            let hc = if opts.checking {
                crate::qcow2::read_header_for_check(&*storage)?
            } else {
                read_header_cluster(&*storage)?
            };
            let backing_name = hc.backing_file.clone();
            let backing_format = hc.extensions.backing_format.clone();
            let mut backing = None;
            if let (Some(name), false) = (&backing_name, opts.no_backing) {
                backing = Some(Box::new(open_backing(path, name, backing_format.as_deref(), opts, depth, chain)?));
            }
            let data_file = if hc.header.has_data_file() {
                // The data file given at open stands in for a recorded name
                // (QEMU's `data-file` option), also where none is recorded.
                let given = opts.data_file.as_ref().and_then(|p| p.to_str()).map(str::to_string);
                let recorded = given.is_none();
                let name = given
                    .or_else(|| hc.extensions.data_file.clone())
                    .ok_or_else(|| Error::invalid("'data-file' is required for this image"))?;
                let bname = BackingName::new(name.as_str());
                // Only a name the image records is refused for naming a
                // protocol: the user's own option may name one.
                if recorded && bname.is_protocol() {
                    return Err(bname.refused_as(
                        NameRole::DataFile,
                        format!("data file name '{name}' names a protocol; refusing"),
                    ));
                }
                // QEMU opens the data file by its name as given, relative
                // to the working directory (unlike backing files).
                let dpath = opts.data_file.clone().unwrap_or_else(|| PathBuf::from(&name));
                let lock = match lock_mode(opts, format) {
                    Some(_) if !opts.force_share => Some(LockMode::data_file(opts.write)),
                    other => other,
                };
                let mut d: Arc<dyn Storage> = match dpath.to_str().and_then(crate::storage::NullStorage::from_name) {
                    Some(null) => Arc::new(null.map_err(|e| Error::io("null-co", e))?),
                    None => file_layers(&dpath, open_file(&dpath, opts.write, opts.cache, lock)?, opts),
                };
                if let Some(rules) = &opts.data_file_blkdebug {
                    d = Arc::new(crate::storage::BlkdebugStorage::new(d, rules.clone()));
                }
                Some(d)
            } else if opts.data_file.is_some() {
                return Err(Error::invalid("'data-file' can only be set for images with an external data file"));
            } else {
                None
            };
            let q = Arc::new(Qcow2::open(
                storage.clone(),
                Qcow2Options {
                    read_only: !opts.write,
                    writethrough: opts.cache.writethrough(),
                    backing: backing.as_ref().map(|b| b.device().clone()),
                    data_file,
                    l2_cache_bytes: 0,
                    cache: opts.qcow2_cache,
                    repair: opts.repair,
                    copy_on_read: opts.copy_on_read,
                    key_secret: opts.key_secret.clone(),
                    no_io: opts.no_io,
                    ignore_journal: opts.ignore_journal,
                    lazy_refcounts: opts.qcow2_lazy_refcounts,
                    checking: opts.checking,
                },
            )?);
            Qcow2::start_cache_cleaner(&q);
            Ok(Image {
                path: path.to_path_buf(),
                format,
                device: q.clone(),
                qcow2: Some(q),
                luks: None,
                file: storage,
                backing,
                backing_name,
                backing_format,
                format_info: None,
                layout: None,
                probed,
            })
        }
    }
}

/// Opens the backing file `name` of the image at `path` (number `depth`
/// of its chain) read-only, in `format` when the image records one.
fn open_backing(
    path: &Path,
    name: &str,
    format: Option<&str>,
    opts: &OpenOptions,
    depth: usize,
    chain: &mut ChainFiles,
) -> Result<Image> {
    opts.backing_policy.check(&BackingName::new(name))?;
    // A `json:` name opens its file (relative to the working directory,
    // as in QEMU) in its format, under its blkdebug rules.
    let json = name.starts_with("json:").then(|| crate::json_name::parse(name)).flatten().transpose()?;
    if json.as_ref().is_some_and(|j| j.quorum && !opts.no_io) {
        return Err(Error::unsupported("quorum is supported by oxcow only where no data is read (info)"));
    }
    let bpath = match &json {
        Some(j) => j.file.clone(),
        None => resolve_backing(path, name),
    };
    let bfmt = match (opts.backing_driver, format) {
        (Some(f), _) => Some(f),
        (None, Some(f)) => Some(f.parse::<Format>().map_err(|e| match e {
            Error::Unsupported(m) => Error::Unsupported(format!("Could not open backing file: {m}")),
            other => other,
        })?),
        (None, None) => None,
    };
    let mut bopts = OpenOptions {
        format: bfmt,
        write: false,
        copy_on_read: false,
        backing_driver: None,
        blkdebug: None,
        data_file: None,
        file_format: None,
        data_file_blkdebug: None,
        qcow2_cache: Default::default(),
        qcow2_lazy_refcounts: None,
        ..opts.clone()
    };
    if let Some(j) = json {
        bopts.format = j.format.or(bopts.format);
        bopts.blkdebug = j.blkdebug;
    }
    if !opts.backing_keys.is_empty() {
        if let Some(k) = opts.backing_keys[0].clone() {
            bopts.key_secret = Some(k);
        }
        bopts.backing_keys = opts.backing_keys[1..].to_vec();
    }
    chain.enter(&bpath)?;
    open_depth(&bpath, &bopts, depth + 1, chain).map_err(|e| match e {
        Error::Io { context, source } => {
            Error::Io { context: format!("Could not open backing file: {context}"), source }
        }
        Error::Locked(m) => Error::Locked(format!("Could not open backing file: {m}")),
        other => other,
    })
}

/// The bytes under an image, opened by the storage driver its name
/// selects, and the image's format.
struct Opened {
    storage: Arc<dyn Storage>,
    /// A raw device the driver provides itself, used instead of
    /// [`RawImage`] for raw images.
    native_raw: Option<Arc<dyn BlockDevice>>,
    format: Format,
    /// The format was guessed from the content, not given.
    probed: bool,
}

/// Opens the storage `path` names: `nbd:` names open a network export (no
/// local file, so no locks), anything else a host file, locked once the
/// format is known.
/// Opens `path` as an image of format `inner` whose virtual disk is the
/// file of the image `opts` opens (a format over a format).
fn open_nested(path: &Path, inner: Format, opts: &OpenOptions) -> Result<Opened> {
    let inner_opts = OpenOptions {
        format: Some(inner),
        file_format: None,
        copy_on_read: false,
        data_file: None,
        data_file_blkdebug: None,
        qcow2_cache: Default::default(),
        ..opts.clone()
    };
    let storage: Arc<dyn Storage> = Arc::new(crate::nested::NestedStorage::new(open(path, &inner_opts)?));
    let (format, probed) = match opts.format {
        Some(f) => (f, false),
        None => (probe_format(&*storage)?, true),
    };
    Ok(Opened { storage, native_raw: None, format, probed })
}

fn open_storage(path: &Path, opts: &OpenOptions) -> Result<Opened> {
    if let Some(null) = path.to_str().and_then(crate::storage::NullStorage::from_name) {
        // QEMU's null-co: nothing to probe or lock.
        let storage = Arc::new(null.map_err(|e| Error::io("null-co", e))?);
        return Ok(Opened { storage, native_raw: None, format: opts.format.unwrap_or(Format::Raw), probed: false });
    }
    if let Some(name) = path.to_str().filter(|n| crate::remote::is_remote(n)) {
        return open_remote(name, opts);
    }
    if let Some(inner) = opts.file_format {
        return open_nested(path, inner, opts);
    }
    Ok(match path.to_str().filter(|n| NbdUrl::is_nbd(n)) {
        Some(name) => {
            let nbd = NbdStorage::open(name, ClientOptions { read_only: !opts.write, ..ClientOptions::default() })?;
            let (f, p) = match opts.format {
                Some(f) => (f, false),
                None => (probe_format(&nbd)?, true),
            };
            // The client is the export's raw device: it knows the
            // export's allocation and zeroes and trims natively.
            let mut raw: Arc<dyn BlockDevice> = nbd.client().clone();
            // The client keeps no cache-mode promise of its own.
            if opts.cache.writethrough() || opts.cache.ignores_flushes() {
                raw = Arc::new(CacheModeDevice::new(raw, opts.cache.writethrough(), opts.cache.ignores_flushes()));
            }
            let mut storage: Arc<dyn Storage> = Arc::new(nbd);
            if opts.cache.ignores_flushes() {
                storage = Arc::new(NoFlushStorage(storage));
            }
            Opened { storage, native_raw: Some(raw), format: f, probed: p }
        }
        None => {
            // Locked only once the format is known (which locks depend
            // on it); probing merely reads.
            let mut file = open_file(path, opts.write, opts.cache, None)?;
            let (format, probed) = match opts.format {
                Some(f) => (f, false),
                None => (probe_named(&file, path)?, true),
            };
            if let Some(mode) = lock_mode(opts, format) {
                file.lock(path, mode)?;
            }
            let mut storage = file_layers(path, file, opts);
            if let Some(rules) = &opts.blkdebug {
                storage = Arc::new(
                    crate::storage::BlkdebugStorage::new(storage, rules.clone())
                        .with_breaks(opts.blkdebug_breaks.clone()),
                );
            }
            Opened { storage, native_raw: None, format, probed }
        }
    })
}

/// Opens an `http://`, `https://` or `s3://` name: read-only, no locks
/// (no local file), the format probed unless given.
fn open_remote(name: &str, opts: &OpenOptions) -> Result<Opened> {
    if opts.write {
        return Err(Error::invalid(format!("'{name}' is read-only (remote objects are opened read-only)")));
    }
    let storage = crate::remote::open_storage(name).map_err(|e| {
        // The context names the object already; the driver's message
        // starts with the name too, for callers of the driver itself.
        let msg = e.to_string();
        let rest = msg.strip_prefix('\'').and_then(|m| m.split_once("': ")).map_or(msg.as_str(), |(_, r)| r);
        Error::io(format!("Could not open '{name}'"), std::io::Error::new(e.kind(), rest.to_string()))
    })?;
    let (format, probed) = match opts.format {
        Some(f) => (f, false),
        None => (probe_format(&*storage)?, true),
    };
    Ok(Opened { storage, native_raw: None, format, probed })
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

impl fmt::Debug for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Image")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("backing_name", &self.backing_name)
            .field("backing_format", &self.backing_format)
            .field("backing", &self.backing)
            .finish_non_exhaustive()
    }
}
