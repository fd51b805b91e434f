//! The qcow2 engine: caches, allocation, copy-on-write, flush ordering.
//!
//! The metadata state (`state::Meta`) is made of parts that keep their own
//! invariants: `mapping::Mapping` (L1, L2 cache), `refcounts::Refcounts`,
//! `allocator::Allocator` and `overlap::OverlapMap`. Positions are typed
//! (`units.rs`). The crash-safety contract is enforced in `flush.rs`
//! (write ordering) and `alloc.rs` (reuse of freed clusters); see the
//! comments there.
//!
//! # Locks and order
//!
//! | lock | guards |
//! |---|---|
//! | `meta` (`RwLock<Meta>`) | all metadata: header, L1, L2 and refcount caches, allocator, overlap map, snapshot list |
//! | `inflight` (`Mutex`) and its condition variables `inflight_done`, `cluster_done[64]` | the guest clusters whose L2 entry a writer changes around data I/O |
//! | `io_gate` (`RwLock<()>`) | nothing by itself: a barrier between data I/O through a looked-up mapping and the reuse of freed clusters |
//! | `poison` (`Mutex` and a flag read without it) | the failure that made the on-disk state unknown; requests read the flag, the lock is taken only once it is set |
//! | `bitmaps` (`bitmap::Tracker`: a `Mutex` and atomics) | the persistent dirty bitmaps in memory and their in-use state on disk |
//!
//! Order: `meta`, then `inflight` or `io_gate`; `meta`, then `bitmaps`
//! (a guest write marks its range with no other lock held, taking `meta`
//! then `bitmaps` only to set the in-use flags before its first write);
//! `poison` is a leaf, taken with or without the others. Nothing takes `meta` while holding
//! `inflight` or `io_gate`.
//!
//! - `meta` is taken exclusively for every change and for lookups that may
//!   read a table from disk (an L2 miss, a refcount). The read path takes
//!   it shared to look a mapping up in a cached L2 table, and so does an
//!   overwrite inside one owned cluster whose table and refcount block are
//!   cached (`write.rs`); both fall back to the exclusive lock otherwise. Metadata I/O (table reads, write-back,
//!   the fsyncs between write-back stages) runs under the exclusive lock.
//! - `inflight` is changed only with `meta` held exclusively. A writer
//!   waiting for a cluster takes `inflight`, then releases `meta` and waits
//!   on the condition variable; it takes `meta` again only after releasing
//!   `inflight`. Because the owner releases a cluster with both held, no
//!   wake-up is lost.
//! - `io_gate` is taken shared before `meta` is released by the paths that
//!   do data I/O through a mapping they looked up (reads, in-place
//!   overwrites), and held across that I/O; copy-on-read takes it shared,
//!   without `meta`, around its data writes. It is taken exclusively with
//!   `meta` held, by the write-back before deferred frees are applied and
//!   by `quiesce` as a barrier, so no I/O that looked up a mapping before a
//!   free lands in the cluster after it is reused.
//! - Outside every lock: guest data I/O (reads, in-place overwrites,
//!   writes into clusters this writer holds in flight), reads from the
//!   backing device (which takes its own image's locks: a chain is
//!   acyclic), and the final fsync of a flush.

mod alloc;
mod allocator;
mod amend;
mod amend_progress;
mod bitmap;
mod cache;
mod cache_opts;
mod check;
mod commit_empty;
mod compress;
mod cor;
mod create;
mod flush;
mod journal;
mod legacy_aes;
mod mapping;
mod overlap;
mod preallocation;
mod read;
mod refblock_place;
mod refcounts;
mod reftable_grow;
mod resize;
mod snapshot;
mod snapshot_table;
mod snapshot_validate;
mod snapshot_view;
mod state;
mod units;
mod vmstate;
mod write;

pub use amend::{amend, amend_observed, amend_with_key, parse_refcount_bits, AmendEvent, AmendOptions};
pub use bitmap::{BitmapInfo, DirtyBitmap};
pub use cache_opts::CacheOptions;
pub use check::{CheckReport, Repair};
pub use create::{create, CreateOptions, Preallocation};
pub use preallocation::{preallocate_file_range, HostExtent};
pub use snapshot::{SnapshotWarning, SNAPSHOT_FREE_CONTEXT};
pub(crate) use snapshot_table::read_header_for_check;

use crate::device::{BlockDevice, BlockStatus};
use crate::format::be::u64_table;
use crate::format::extensions::{Extensions, HeaderCluster};
use crate::format::{Autoclear, Header, Incompatible};
use crate::storage::Storage;
use crate::{Error, Result};
use overlap::OverlapMap;
use state::{Geometry, Meta, MetaKind, Poison};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use units::GuestCluster;

/// The metadata lock held for writing.
pub(crate) type MetaGuard<'a> = RwLockWriteGuard<'a, Meta>;

/// Buckets of guest clusters with a condition variable each.
const INFLIGHT_BUCKETS: usize = 64;

/// How to open a qcow2 image.
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct Qcow2Options {
    /// Refuse writes.
    pub read_only: bool,
    /// Every write is durable before it completes (cache=writethrough).
    pub writethrough: bool,
    /// The opened backing image, if the image has one and it should be used.
    pub backing: Option<Arc<dyn BlockDevice>>,
    /// The opened external data file, for images with one.
    pub data_file: Option<Arc<dyn Storage>>,
    /// Bytes of L2 tables to cache (0 = default: 32 MiB or the whole disk);
    /// `cache.l2_cache_size` wins when set.
    pub l2_cache_bytes: u64,
    /// QEMU's cache options (`cache_opts.rs`).
    pub cache: CacheOptions,
    /// Open damaged images (corrupt bit) writable, for `check -r`.
    pub repair: bool,
    /// Copy-on-read: data read through to the backing file is also
    /// stored in this image (see `cor.rs`); needs a writable image.
    pub copy_on_read: bool,
    /// The password of a LUKS-encrypted image (`encrypt.key-secret`).
    pub key_secret: Option<crate::crypto::Secret>,
    /// Open an encrypted image without its key, for its metadata only
    /// (`info`): guest data I/O then fails.
    pub no_io: bool,
    /// Neither use nor keep the image's recovery journal (`journal.rs`):
    /// a dirty image is repaired by the full scan, and a writable open
    /// clears the journal's autoclear bit.
    pub ignore_journal: bool,
    /// QEMU's `lazy-refcounts` open option: postpone refcount updates
    /// (or not) whatever the header's bit says; `None` follows the bit.
    pub lazy_refcounts: Option<bool>,
    /// Opened by `check` (QEMU's check mode): a snapshot table breaking
    /// QEMU's limits is kept for the check to report or repair
    /// (`snapshot_table.rs`) instead of refusing the open.
    pub checking: bool,
}

/// An open qcow2 image.
pub struct Qcow2 {
    file: Arc<dyn Storage>,
    data: Arc<dyn Storage>,
    /// The LUKS header of an encrypted image.
    luks: Option<crate::crypto::LuksHeader>,
    /// The cipher of a legacy AES image (`legacy_aes.rs`).
    aes: Option<Arc<crate::crypto::CryptStorage>>,
    backing: Option<Arc<dyn BlockDevice>>,
    g: Geometry,
    read_only: bool,
    writethrough: bool,
    size: AtomicU64,
    meta: RwLock<Meta>,
    /// Guest clusters whose L2 entry a writer is changing with data I/O in
    /// flight; others wait on the condition variables. Changed only with
    /// `meta` held for writing (see "Locks and order").
    inflight: Mutex<HashSet<GuestCluster, foldhash::fast::RandomState>>,
    /// How many clusters `inflight` holds, readable without its lock: it
    /// changes only with `meta` held exclusively, so a holder of `meta`
    /// sees it exact, and the common case (none in flight) costs no lock.
    inflight_count: AtomicUsize,
    /// How many threads wait on `inflight_done` or `cluster_done`;
    /// changed and read only with `inflight` locked, so a release with no
    /// waiter skips the wake-up system calls.
    inflight_waiters: AtomicUsize,
    /// Signalled whenever a guest cluster leaves `inflight`.
    inflight_done: Condvar,
    /// Signalled when a guest cluster leaves `inflight`, one per
    /// bucket of clusters, so a commit wakes only writers that may be
    /// waiting for that cluster, not every waiter.
    cluster_done: Vec<Condvar>,
    /// Fast-path data I/O holds this shared; a flush takes it exclusively
    /// before freed clusters become reusable, so no overwrite that looked
    /// up a mapping before the free can land in a reused cluster.
    io_gate: RwLock<()>,
    /// The report of the refcount repair run because the image was dirty.
    repaired_on_open: Option<check::CheckReport>,
    /// Reads store backing data in this image (`cor.rs`).
    copy_on_read: bool,
    /// The failure that left the on-disk state unknown, if any.
    poison: Poison,
    /// Persistent dirty bitmaps (`bitmap/`), a leaf lock after `meta`.
    bitmaps: bitmap::Tracker,
    /// Seconds between cache cleanings (`cache_opts.rs`; 0: none).
    clean_interval: u64,
    /// `Qcow2Options::lazy_refcounts`.
    lazy_refcounts: Option<bool>,
    /// The cache cleaner thread, woken when the image goes.
    cleaner: Mutex<Option<std::thread::Thread>>,
    /// Tells the cleaner to end.
    cleaner_stop: std::sync::atomic::AtomicBool,
}

/// Reads and parses cluster 0 of an image (header, extensions, backing
/// name) without opening it.
pub fn read_header_cluster(file: &dyn Storage) -> Result<HeaderCluster> {
    HeaderCluster::parse(&read_header_bytes(file)?)
}

/// The bytes of cluster 0 (at most), unparsed.
fn read_header_bytes(file: &dyn Storage) -> Result<Vec<u8>> {
    let len = file.len().map_err(|e| Error::io("reading image size", e))?;
    // The cluster size first, then that one cluster: reading the largest
    // cluster QEMU allows every time cost 2 MiB of touched memory that
    // stayed in the process (glibc raises its mmap threshold after the
    // first such buffer is freed, so the next one comes from the heap).
    let mut head = [0u8; 24];
    let got = len.min(head.len() as u64) as usize;
    file.read_at(&mut head[..got], 0).map_err(|e| Error::io("reading image header", e))?;
    let bits = u32::from_be_bytes([head[20], head[21], head[22], head[23]]);
    use crate::format::limits::{MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};
    // A bad header: the parser reports it, and needs only the start.
    let cluster =
        if (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) { 1u64 << bits } else { 1 << MIN_CLUSTER_BITS };
    let want = len.min(cluster) as usize;
    let mut buf = vec![0u8; want];
    file.read_at(&mut buf, 0).map_err(|e| Error::io("reading image header", e))?;
    Ok(buf)
}

/// The LUKS header an encrypted image points at, and the data storage
/// that encrypts through its key (or refuses I/O without one).
fn open_luks(
    file: &Arc<dyn Storage>,
    hc: &HeaderCluster,
    opts: &Qcow2Options,
) -> Result<(crate::crypto::LuksHeader, Arc<dyn Storage>)> {
    use crate::crypto::{luks, CryptStorage, LuksHeader};
    let fde = hc.extensions.fde.ok_or_else(|| Error::invalid("Missing CRYPTO header for crypt method 2"))?;
    if fde.length < luks::HEADER_LEN as u64 || fde.length > 64 << 20 {
        return Err(Error::corrupt("encryption header extension: bad length"));
    }
    let mut b = vec![0u8; luks::HEADER_LEN];
    file.read_at(&mut b, fde.offset).map_err(io_err("reading the encryption header"))?;
    let header = LuksHeader::parse(&b)?;
    let data: Arc<dyn Storage> = match &opts.key_secret {
        _ if opts.no_io => Arc::new(crate::crypto::NoKey),
        Some(pw) => {
            let read = |buf: &mut [u8], off: u64| -> Result<()> {
                if off + buf.len() as u64 > fde.length {
                    return Err(Error::corrupt("LUKS key material past the encryption header"));
                }
                file.read_at(buf, fde.offset + off).map_err(io_err("reading LUKS key material"))
            };
            let cipher = header.unlock(pw, &read)?;
            Arc::new(CryptStorage::new(file.clone(), 0, Arc::new(cipher)))
        }
        None => return Err(Error::invalid("Parameter 'encrypt.key-secret' is required for cipher")),
    };
    Ok((header, data))
}

fn io_err(what: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |e| Error::io(what, e)
}

impl Qcow2 {
    /// Opens a qcow2 image on `file`.
    pub fn open(file: Arc<dyn Storage>, opts: Qcow2Options) -> Result<Qcow2> {
        let hc =
            if opts.checking { snapshot_table::read_header_for_check(&*file)? } else { read_header_cluster(&*file)? };
        let h = &hc.header;
        let crypt = match h.crypt_method {
            0 => None,
            1 => None,
            2 => Some(open_luks(&file, &hc, &opts)?),
            n => return Err(Error::unsupported(format!("encryption method {n}"))),
        };
        let aes = if h.crypt_method == 1 { Some(legacy_aes::open(&file, &opts)?) } else { None };
        let g = Geometry::from_header(h);
        if (crypt.is_some() || aes.is_some()) && g.external_data {
            return Err(Error::unsupported("encryption with an external data file"));
        }
        if g.external_data && h.nb_snapshots > 0 {
            return Err(Error::corrupt("image with an external data file has internal snapshots"));
        }
        let data = if g.external_data {
            opts.data_file
                .clone()
                .ok_or_else(|| Error::invalid("image needs its external data file, which was not given"))?
        } else if let Some((_, c)) = &crypt {
            c.clone()
        } else if let Some((_, d)) = &aes {
            d.clone()
        } else {
            file.clone()
        };
        if opts.copy_on_read && opts.read_only {
            return Err(Error::invalid("copy-on-read needs the image opened read-write"));
        }
        let mut read_only = opts.read_only;
        if h.is_corrupt() && !read_only && !opts.repair {
            return Err(Error::ReadOnly(
                "image is corrupt (corrupt bit set); it can be opened read-only only; repair it with 'oxcow check -r all'"
                    .into(),
            ));
        }
        let dirty_repair = h.is_dirty() && !read_only;
        if h.is_corrupt() && !opts.repair {
            read_only = true;
        }

        let l1_bytes = u64::from(h.l1_size) * 8;
        let mut l1_raw = vec![0u8; l1_bytes as usize];
        file.read_at(&mut l1_raw, h.l1_table_offset).map_err(io_err("reading L1 table"))?;
        let l1 = u64_table(&l1_raw);

        let rt_bytes = u64::from(h.refcount_table_clusters) * g.cluster_size;
        let mut rt_raw = vec![0u8; rt_bytes as usize];
        file.read_at(&mut rt_raw, h.refcount_table_offset).map_err(io_err("reading refcount table"))?;
        let reftable = u64_table(&rt_raw);

        let (snapshots, snapshot_findings) = snapshot_table::read_snapshot_table(&*file, h, opts.checking)?;
        let file_len = file.len().map_err(io_err("reading image size"))?;
        let file_end = file_len.div_ceil(g.cluster_size) * g.cluster_size;

        let mut cache = opts.cache;
        if cache.l2_cache_size.is_none() && opts.l2_cache_bytes > 0 {
            cache.l2_cache_size = Some(opts.l2_cache_bytes);
        }
        let sizes = cache.resolve(h.size, g.cluster_size, g.l2.entry_size() as u64)?;
        if opts.lazy_refcounts == Some(true) && !g.v3 {
            return Err(Error::invalid(
                "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level",
            ));
        }

        let mut meta = Meta {
            hc: hc.clone(),
            header_dirty: false,
            map: mapping::Mapping::new(l1, sizes.l2_slices, sizes.slice_bytes),
            refs: refcounts::Refcounts::new(reftable, sizes.refcount_blocks),
            alloc: allocator::Allocator::new(units::HostOffset(file_end), file_len),
            overlap: OverlapMap::default(),
            snapshots,
            snapshot_findings,
            cow_unsynced: false,
            corrupt: h.is_corrupt() && !opts.repair,
            journal: journal::Journal::default(),
        };
        meta.overlap = metadata_clusters(&g, &meta);
        let q = Qcow2 {
            file,
            data,
            luks: crypt.map(|(h, _)| h),
            aes: aes.and_then(|(c, _)| c),
            backing: opts.backing,
            g,
            read_only,
            writethrough: opts.writethrough,
            size: AtomicU64::new(hc.header.size),
            meta: RwLock::new(meta),
            inflight: Mutex::new(HashSet::default()),
            inflight_count: AtomicUsize::new(0),
            inflight_waiters: AtomicUsize::new(0),
            inflight_done: Condvar::new(),
            cluster_done: (0..INFLIGHT_BUCKETS).map(|_| Condvar::new()).collect(),
            io_gate: RwLock::new(()),
            repaired_on_open: None,
            copy_on_read: opts.copy_on_read,
            poison: Poison::default(),
            bitmaps: bitmap::Tracker::default(),
            clean_interval: sizes.clean_interval,
            lazy_refcounts: opts.lazy_refcounts,
            cleaner: Mutex::new(None),
            cleaner_stop: Default::default(),
        };
        let mut q = q;
        if dirty_repair {
            // As QEMU does: refcounts may be stale after a crash with lazy
            // refcounts; rebuild them before the first write.
            q.repaired_on_open = Some(q.repair_dirty(!opts.ignore_journal)?);
        }
        if !read_only {
            let mut m = q.lock();
            q.prepare_for_writing(&mut m)?;
            q.journal_open(&mut m, !opts.ignore_journal)?;
            drop(m);
            q.open_bitmaps(opts.repair)?;
        }
        Ok(q)
    }

    /// Clears autoclear bits oxcow does not maintain (the spec requires it
    /// before writing), and records the header change durably.
    fn prepare_for_writing(&self, m: &mut Meta) -> Result<()> {
        let h = &mut m.hc.header;
        if h.version < 3 {
            return Ok(());
        }
        // oxcow keeps the raw data file consistent and maintains
        // persistent bitmaps (`bitmap/`); `journal_open` decides on the
        // journal's bit.
        let keep = Autoclear::KNOWN | journal::AUTOCLEAR_JOURNAL;
        if h.autoclear_features & !keep != 0 {
            h.autoclear_features &= keep;
            self.write_header(m)?;
            self.file.flush().map_err(io_err("flushing header"))?;
        }
        Ok(())
    }

    /// Ends a writer's ownership of guest cluster `gc` and wakes those
    /// waiting for it (and those waiting for no cluster to be in flight).
    pub(crate) fn release_inflight(&self, _m: &mut Meta, gc: GuestCluster) {
        let mut set = self.inflight_set();
        set.remove(&gc);
        self.inflight_count.store(set.len(), Ordering::Release);
        if self.inflight_waiters.load(Ordering::Relaxed) == 0 {
            return;
        }
        self.cluster_done[(gc.0 % INFLIGHT_BUCKETS as u64) as usize].notify_all();
        if set.is_empty() {
            self.inflight_done.notify_all();
        }
    }

    /// Makes this writer the owner of guest cluster `gc` (the metadata
    /// lock held for writing, as the `&mut Meta` says).
    pub(crate) fn claim_inflight(&self, _m: &mut Meta, gc: GuestCluster) {
        let mut set = self.inflight_set();
        set.insert(gc);
        self.inflight_count.store(set.len(), Ordering::Release);
    }

    /// Whether a writer owns guest cluster `gc`.
    pub(crate) fn is_inflight(&self, _m: &Meta, gc: GuestCluster) -> bool {
        self.inflight_count.load(Ordering::Acquire) != 0 && self.inflight_set().contains(&gc)
    }

    fn inflight_set(&self) -> MutexGuard<'_, HashSet<GuestCluster, foldhash::fast::RandomState>> {
        self.inflight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until `gc` may have left the in-flight set (callers re-check).
    /// The in-flight lock is taken before the metadata lock is released,
    /// and a writer releases a cluster only with both held, so the wake-up
    /// cannot be missed.
    pub(crate) fn wait_for_cluster<'a>(&'a self, m: MetaGuard<'a>, gc: GuestCluster) -> MetaGuard<'a> {
        let set = self.inflight_set();
        if !set.contains(&gc) {
            return m;
        }
        drop(m);
        self.inflight_waiters.fetch_add(1, Ordering::Relaxed);
        let set =
            self.cluster_done[(gc.0 % INFLIGHT_BUCKETS as u64) as usize].wait(set).unwrap_or_else(|e| e.into_inner());
        self.inflight_waiters.fetch_sub(1, Ordering::Relaxed);
        drop(set);
        self.lock()
    }

    /// Waits until no guest cluster is in flight; returns the lock held
    /// with that true.
    pub(crate) fn wait_idle<'a>(&'a self, mut m: MetaGuard<'a>) -> MetaGuard<'a> {
        loop {
            let set = self.inflight_set();
            if set.is_empty() {
                return m;
            }
            drop(m);
            self.inflight_waiters.fetch_add(1, Ordering::Relaxed);
            let set = self.inflight_done.wait(set).unwrap_or_else(|e| e.into_inner());
            self.inflight_waiters.fetch_sub(1, Ordering::Relaxed);
            drop(set);
            m = self.lock();
        }
    }

    /// The metadata lock, for changes (and for lookups that may load).
    pub(crate) fn lock(&self) -> MetaGuard<'_> {
        self.meta.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The metadata lock shared: for lookups in what is cached.
    pub(crate) fn lock_shared(&self) -> RwLockReadGuard<'_, Meta> {
        self.meta.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The header as it is now.
    pub fn header(&self) -> Header {
        self.lock_shared().hc.header.clone()
    }
    /// The LUKS header of an encrypted image.
    pub fn luks_header(&self) -> Option<&crate::crypto::LuksHeader> {
        self.luks.as_ref()
    }

    /// The header extensions.
    pub fn extensions(&self) -> Extensions {
        self.lock_shared().hc.extensions.clone()
    }
    /// The backing file name recorded in the image.
    pub fn backing_file(&self) -> Option<String> {
        self.lock_shared().hc.backing_file.clone()
    }
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.g.cluster_size
    }
    /// The image file's storage.
    pub fn file(&self) -> &Arc<dyn Storage> {
        &self.file
    }
    /// The refcount repair run at open because the dirty bit was set.
    pub fn repaired_on_open(&self) -> Option<&CheckReport> {
        self.repaired_on_open.as_ref()
    }
    /// Clears the corrupt bit after a successful repair.
    pub fn clear_corrupt(&self) -> Result<()> {
        let mut m = self.lock();
        m.hc.header.incompatible_features &= !Incompatible::CORRUPT;
        m.corrupt = false;
        self.write_header(&mut m)?;
        self.sync("clearing corrupt bit")
    }
    /// Whether the image has its dirty bit set on disk.
    pub fn is_dirty(&self) -> bool {
        self.lock_shared().hc.header.is_dirty()
    }
    /// Whether the image is marked corrupt.
    pub fn is_corrupt(&self) -> bool {
        let m = self.lock_shared();
        m.corrupt || m.hc.header.is_corrupt()
    }

    /// Whether another entry of the active L1 table points at the L2 table
    /// mapping guest offset `guest` (a damaged image aliasing two ranges of
    /// the disk, which only a full check sees).
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn l2_table_shared(&self, guest: u64) -> bool {
        let m = self.lock();
        let l1i = (guest / self.g.cluster_size / self.g.l2_entries) as usize;
        let table = |e: u64| e & crate::format::l1::OFFSET_MASK;
        match m.map.l1().get(l1i).map(|&e| table(e)) {
            Some(t) if t != 0 => m.map.l1().iter().enumerate().any(|(j, &e)| j != l1i && table(e) == t),
            _ => false,
        }
    }

    /// Refuses writes when the image is read-only, poisoned or corrupt.
    fn check_writable(&self, m: &Meta) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly("image opened read-only".into()));
        }
        self.poison.check()?;
        if m.corrupt {
            return Err(Error::ReadOnly("image is marked corrupt".into()));
        }
        Ok(())
    }

    /// Records a failure after which the on-disk state is unknown: the
    /// image refuses writes and flushes from now on, answering with that
    /// failure's errno, so nothing is silently lost.
    fn poison(&self, e: &Error) {
        self.poison.set(e);
    }

    /// Marks the image corrupt on disk (best effort) and refuses writes.
    fn mark_corrupt(&self, m: &mut Meta, what: String) -> Error {
        m.corrupt = true;
        if self.g.v3 && !self.read_only {
            m.hc.header.incompatible_features |= Incompatible::CORRUPT;
            // Cluster 0 is the header whatever else claims it: the corrupt
            // bit must get out even when the overlap is with the header.
            if self.write_header_unchecked(m).is_ok() {
                let _ = self.file.flush();
            }
        }
        Error::corrupt(format!("{what}{CORRUPTION_EVENT_END}"))
    }

    /// Writes cluster 0 (header, extensions, backing name), unless other
    /// metadata claims it too.
    fn write_header(&self, m: &mut Meta) -> Result<()> {
        self.check_overlap(m, units::HostOffset(0), Some(MetaKind::Header))?;
        self.write_header_unchecked(m)
    }

    fn write_header_unchecked(&self, m: &mut Meta) -> Result<()> {
        let bytes = m.hc.encode()?;
        self.file.write_at(&bytes, 0).map_err(io_err("writing image header"))?;
        m.header_dirty = false;
        self.journal_header_written(m, &bytes);
        Ok(())
    }

    /// Gives back the space reserved ahead of the allocation end but never
    /// used, at a clean close. Nothing anything points at is cut off: not
    /// metadata past the allocator's end (a damaged image's L1 table past
    /// the end of the file, say), nor guest data found mapped there.
    pub(crate) fn trim_reserved(&self, m: &mut Meta) -> Result<()> {
        let mut keep =
            m.alloc.file_end().max(m.alloc.keep_end()).0.max(m.overlap.end().saturating_mul(self.g.cluster_size));
        // A last cluster only partly written (a bitmap directory) ends
        // the file where its bytes end, as QEMU's does.
        if let Some(t) = m.alloc.short_tail(self.g.cluster_size).filter(|_| keep == m.alloc.file_end().0) {
            keep = t.0;
        }
        let len = self.file.len().map_err(io_err("reading image size"))?;
        if m.alloc.prealloc_end().0 > keep && len > keep {
            self.file.set_len(keep).map_err(io_err("trimming reserved space"))?;
            m.alloc.set_prealloc_end(units::HostOffset(keep));
        }
        Ok(())
    }
}

/// The clusters holding metadata that the overlap check protects (see
/// `overlap.rs`), as `m` describes them.
pub(crate) fn metadata_clusters(g: &Geometry, m: &Meta) -> OverlapMap {
    OverlapMap::build(g, m)
}

/// How the error of a corruption that marked the image corrupt ends.
const CORRUPTION_EVENT_END: &str = "; image marked corrupt, further writes refused";

/// When `e` is the error of the corruption that marked the image corrupt
/// (the first one: later requests are refused as read-only), what was
/// found, as QEMU's corruption event words it.
pub fn corruption_event(e: &Error) -> Option<&str> {
    match e {
        Error::Corrupt { what, .. } => what.strip_suffix(CORRUPTION_EVENT_END),
        _ => None,
    }
}

impl BlockDevice for Qcow2 {
    fn len(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if self.copy_on_read {
            return self.read_cor(buf, offset);
        }
        self.read(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.note_guest_write(offset, buf.len() as u64)?;
        self.write(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.note_guest_write(offset, len)?;
        self.zero_range(offset, len, may_unmap)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.note_guest_write(offset, len)?;
        self.discard_range(offset, len)
    }
    fn flush(&self) -> Result<()> {
        self.flush_all()
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let mut s = self.status(offset, len)?;
        // The bytes at an encrypted image's host offset are not the
        // guest's: QEMU reports no offset for them (`map` shows none).
        if self.encrypted() {
            s.host_offset = None;
        }
        Ok(s)
    }
    fn backing(&self) -> Option<&dyn BlockDevice> {
        self.backing.as_deref()
    }
    fn format_name(&self) -> &'static str {
        "qcow2"
    }
    fn is_read_only(&self) -> bool {
        self.read_only || self.lock_shared().corrupt
    }
    fn close(&self) -> Result<()> {
        self.close_clean()
    }
    fn resize(&self, new_len: u64) -> Result<()> {
        self.resize_to(new_len, true)
    }
    fn dirty_bitmap_extents(&self, name: &str, offset: u64, len: u64) -> Option<Result<Vec<(u64, u64, bool)>>> {
        Some(self.chain_bitmap_extents(name, offset, len))
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        self.stop_cache_cleaner();
        if !self.read_only {
            let _ = self.close_clean();
        }
    }
}

setters!(Qcow2Options {
    read_only: bool,
    writethrough: bool,
    l2_cache_bytes: u64,
    cache: CacheOptions,
    repair: bool,
    copy_on_read: bool,
    ignore_journal: bool,
    checking: bool,
    backing: Option<Arc<dyn BlockDevice>>,
    data_file: Option<Arc<dyn Storage>>,
} opt {
    lazy_refcounts: bool,
});

impl std::fmt::Debug for Qcow2Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Options")
            .field("read_only", &self.read_only)
            .field("writethrough", &self.writethrough)
            .field("backing", &self.backing.as_ref().map(|b| b.format_name()))
            .field("data_file", &self.data_file.is_some())
            .field("l2_cache_bytes", &self.l2_cache_bytes)
            .field("cache", &self.cache)
            .field("repair", &self.repair)
            .field("copy_on_read", &self.copy_on_read)
            .field("ignore_journal", &self.ignore_journal)
            .field("lazy_refcounts", &self.lazy_refcounts)
            .finish()
    }
}

impl std::fmt::Debug for Qcow2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2")
            .field("size", &self.size.load(Ordering::Relaxed))
            .field("cluster_size", &self.g.cluster_size)
            .field("read_only", &self.read_only)
            .field("writethrough", &self.writethrough)
            .field("backing", &self.backing.as_ref().map(|b| b.format_name()))
            .finish_non_exhaustive()
    }
}
