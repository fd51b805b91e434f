//! Creating new images, and growing the virtual size.
//!
//! A new image starts as four clusters (header, refcount table, one
//! refcount block, nothing mapped) and is then grown to its size by the
//! engine itself, so the L1 table is placed by the normal allocator and
//! every refcount width and cluster size works the same way.

use super::state::{Meta, MetaKind};
use super::units::{GuestCluster, HostOffset};
use super::{Qcow2, Qcow2Options};
use crate::format::be::encode_u64_table;
use crate::format::extensions::{Extensions, HeaderCluster};
use crate::format::header::{CompressionType, Header, V2_HEADER_LEN, V3_HEADER_LEN};
use crate::format::l2::{L2Entry, SubclusterBitmap};
use crate::format::limits::{MAX_L1_BYTES, MAX_VIRTUAL_SIZE};
use crate::format::refcount::RefcountLayout;
use crate::format::{Autoclear, Compatible, Incompatible};
use crate::storage::Storage;
use crate::{BlockDevice, Error, Result};
use std::sync::Arc;

/// qemu-img's `preallocation` option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Nothing allocated up front.
    #[default]
    Off,
    /// L2 tables and data clusters allocated, data left sparse.
    Metadata,
    /// As metadata, and the file's blocks reserved.
    Falloc,
    /// As metadata, and the data written with zeros.
    Full,
}

impl std::str::FromStr for Preallocation {
    type Err = Error;
    /// Parses qemu-img's names: `off`, `metadata`, `falloc`, `full`.
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "off" => Preallocation::Off,
            "metadata" => Preallocation::Metadata,
            "falloc" => Preallocation::Falloc,
            "full" => Preallocation::Full,
            other => return Err(Error::invalid(format!("Parameter 'preallocation' does not accept value '{other}'"))),
        })
    }
}

/// Options of a new qcow2 image (qemu-img's `-o` names in comments).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CreateOptions {
    /// Virtual size in bytes.
    pub size: u64,
    /// `cluster_size` (512..=2M, power of two).
    pub cluster_size: u64,
    /// `compat`: 2 for 0.10, 3 for 1.1.
    pub version: u32,
    /// `refcount_bits` (1..=64, power of two).
    pub refcount_bits: u32,
    /// `lazy_refcounts`.
    pub lazy_refcounts: bool,
    /// `extended_l2`.
    pub extended_l2: bool,
    /// `compression_type`.
    pub compression: CompressionType,
    /// `backing_file`.
    pub backing_file: Option<String>,
    /// `backing_fmt`.
    pub backing_format: Option<String>,
    /// `data_file` name recorded in the image.
    pub data_file: Option<String>,
    /// `data_file_raw`.
    pub data_file_raw: bool,
    /// `preallocation`.
    pub preallocation: Preallocation,
    /// `encrypt.format=luks`: the `encrypt.*` choices and the
    /// `encrypt.key-secret` password.
    pub encryption: Option<(crate::crypto::LuksParams, crate::crypto::Secret)>,
    /// `encrypt.format=aes`: legacy AES (crypt_method 1), which QEMU's
    /// tools still create. It has no header: the key is only needed to
    /// open the image.
    pub legacy_aes: bool,
    /// `journal` (oxcow's own): a recovery journal for lazy refcounts
    /// (`journal.rs`), so a crash is repaired from what changed since the
    /// last clean point instead of by a scan of every table.
    pub journal: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            version: 3,
            refcount_bits: 16,
            lazy_refcounts: false,
            extended_l2: false,
            compression: CompressionType::Zlib,
            backing_file: None,
            backing_format: None,
            data_file: None,
            data_file_raw: false,
            preallocation: Preallocation::Off,
            encryption: None,
            legacy_aes: false,
            journal: false,
        }
    }
}

setters!(CreateOptions {
    size: u64,
    cluster_size: u64,
    version: u32,
    refcount_bits: u32,
    lazy_refcounts: bool,
    journal: bool,
    extended_l2: bool,
    compression: CompressionType,
    data_file_raw: bool,
    preallocation: Preallocation,
    legacy_aes: bool,
} opt {
    backing_file: String,
    backing_format: String,
    data_file: String,
});

impl CreateOptions {
    /// QEMU's defaults (64 KiB clusters, version 3, 16-bit refcounts, no
    /// backing file) for an image of `size` bytes.
    pub fn new(size: u64) -> CreateOptions {
        CreateOptions { size, ..CreateOptions::default() }
    }
    /// Checks the options with qemu-img's messages.
    pub fn validate(&self) -> Result<()> {
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
            return Err(Error::invalid("Cluster size must be a power of two between 512 and 2048k".to_string()));
        }
        if self.version != 2 && self.version != 3 {
            return Err(Error::invalid("Invalid compatibility level"));
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return Err(Error::invalid("Refcount width must be a power of two and may not exceed 64 bits"));
        }
        let v2 = self.version == 2;
        if v2 && self.refcount_bits != 16 {
            return Err(Error::invalid(
                "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)",
            ));
        }
        if v2 && self.lazy_refcounts {
            return Err(Error::invalid(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)",
            ));
        }
        if v2 && self.extended_l2 {
            return Err(Error::invalid("Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)"));
        }
        if v2 && self.compression != CompressionType::Zlib {
            return Err(Error::invalid(
                "Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)",
            ));
        }
        if v2 && self.data_file.is_some() {
            return Err(Error::invalid(
                "External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)",
            ));
        }
        if self.extended_l2 && cs < 16384 {
            return Err(Error::invalid(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            ));
        }
        if self.legacy_aes && self.encryption.is_some() {
            return Err(Error::invalid("legacy AES and LUKS encryption at once"));
        }
        if (self.encryption.is_some() || self.legacy_aes) && self.data_file.is_some() {
            return Err(Error::unsupported("encryption with an external data file"));
        }
        if let Some((p, _)) = &self.encryption {
            p.validate()?;
        }
        if self.data_file_raw && self.data_file.is_none() {
            return Err(Error::invalid("data-file-raw requires data-file"));
        }
        if self.data_file_raw && self.backing_file.is_some() {
            return Err(Error::invalid("Backing file and data-file-raw cannot be used at the same time"));
        }
        if self.backing_file.is_some() && self.preallocation != Preallocation::Off && !self.extended_l2 {
            // Preallocated clusters would hide the backing file: only
            // subcluster bitmaps can point at a cluster and still leave
            // every subcluster unallocated.
            return Err(Error::invalid(
                "Backing file and preallocation can only be used at the same time if extended_l2 is on",
            ));
        }
        if self.journal && !self.lazy_refcounts {
            return Err(Error::invalid("The recovery journal requires lazy_refcounts=on"));
        }
        if self.backing_format.is_some() && self.backing_file.is_none() {
            return Err(Error::invalid("Backing format cannot be used without backing file"));
        }
        if self.size > MAX_VIRTUAL_SIZE {
            return Err(Error::invalid("Image size is too large"));
        }
        let l1 = l1_entries(self.size, cs, self.extended_l2);
        if l1 * 8 > MAX_L1_BYTES {
            return Err(Error::invalid(
                "The image size is too large for file format 'qcow2' (try using a larger cluster size)",
            ));
        }
        if !self.size.is_multiple_of(512) {
            return Err(Error::invalid("Image size must be a multiple of 512 bytes"));
        }
        Ok(())
    }

    fn header_cluster(&self) -> HeaderCluster {
        let bits = self.cluster_size.trailing_zeros();
        let v3 = self.version >= 3;
        let mut inc = 0;
        if self.extended_l2 {
            inc |= Incompatible::EXTENDED_L2;
        }
        if self.compression != CompressionType::Zlib {
            inc |= Incompatible::COMPRESSION;
        }
        if self.data_file.is_some() {
            inc |= Incompatible::DATA_FILE;
        }
        let header = Header {
            version: self.version,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: bits,
            size: 0,
            crypt_method: if self.legacy_aes { 1 } else { 0 },
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: self.cluster_size,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: inc,
            compatible_features: if self.lazy_refcounts { Compatible::LAZY_REFCOUNTS } else { 0 },
            autoclear_features: if self.data_file_raw { Autoclear::DATA_FILE_RAW } else { 0 },
            refcount_order: self.refcount_bits.trailing_zeros(),
            header_length: if v3 { V3_HEADER_LEN } else { V2_HEADER_LEN },
            compression_type: self.compression,
            unknown_tail: Vec::new(),
        };
        let extensions = Extensions {
            backing_format: self.backing_format.clone(),
            feature_names: if v3 { Extensions::standard_feature_names() } else { Vec::new() },
            data_file: self.data_file.clone(),
            ..Default::default()
        };
        HeaderCluster { header, extensions, backing_file: self.backing_file.clone() }
    }
}

fn l1_entries(size: u64, cs: u64, extended: bool) -> u64 {
    let l2_entries = cs / if extended { 16 } else { 8 };
    size.div_ceil(cs).div_ceil(l2_entries)
}

/// Creates a qcow2 image on `file` (which should be empty). `data_file` is
/// the opened external data file when `opts.data_file` is set; `backing`
/// is only used for preallocation decisions and may be `None`.
pub fn create(file: Arc<dyn Storage>, data_file: Option<Arc<dyn Storage>>, opts: &CreateOptions) -> Result<()> {
    opts.validate()?;
    let cs = opts.cluster_size;
    let mut hc = opts.header_cluster();
    if opts.journal {
        super::journal::add_extension(&mut hc, cs)?;
    }
    let head = hc.encode()?;
    file.set_len(0).map_err(|e| Error::io("truncating new image", e))?;
    let mut cluster0 = vec![0u8; cs as usize];
    cluster0[..head.len()].copy_from_slice(&head);
    file.write_at(&cluster0, 0).map_err(|e| Error::io("writing header", e))?;
    // Refcount table: one entry, pointing at the block in cluster 2.
    let mut table = encode_u64_table(&[2 * cs]);
    table.resize(cs as usize, 0);
    file.write_at(&table, cs).map_err(|e| Error::io("writing refcount table", e))?;
    let rc = RefcountLayout { cluster_bits: cs.trailing_zeros(), refcount_order: opts.refcount_bits.trailing_zeros() };
    let mut block = vec![0u8; cs as usize];
    let covered = rc.block_entries().min(3);
    for i in 0..covered {
        rc.set(&mut block, i as usize, 1);
    }
    file.write_at(&block, 2 * cs).map_err(|e| Error::io("writing refcount block", e))?;
    if covered < 3 {
        // Tiny blocks (512-byte clusters, 64-bit refcounts cover 64
        // clusters) still cover three; this cannot happen, but keep the
        // image valid if it ever does.
        return Err(Error::invalid("refcount block too small for the initial layout"));
    }
    file.flush().map_err(|e| Error::io("flushing new image", e))?;
    if let Some(d) = &data_file {
        d.set_len(0).map_err(|e| Error::io("truncating data file", e))?;
    }
    // Legacy AES needs a key to open but nothing here goes through it
    // (preallocated clusters hold unencrypted zeros, as QEMU's do).
    let key_secret = opts.legacy_aes.then(|| crate::crypto::Secret::new(Vec::new()));
    let q = Qcow2::open(file.clone(), Qcow2Options { data_file: data_file.clone(), key_secret, ..Default::default() })?;
    q.grow(opts.size)?;
    let Some((params, password)) = &opts.encryption else {
        if opts.preallocation != Preallocation::Off {
            q.preallocate(opts.preallocation, opts.backing_file.is_some())?;
        }
        q.close_clean()?;
        drop(q);
        return cut_l1_padding(&*file);
    };
    // After the L1 table, as QEMU places it.
    q.set_up_encryption(&crate::crypto::format_luks(params, password)?.bytes)?;
    q.close_clean()?;
    drop(q);
    if opts.preallocation != Preallocation::Off {
        // Through the key, so preallocated zeros are written encrypted.
        let o = Qcow2Options { data_file, key_secret: Some(password.clone()), ..Default::default() };
        let q = Qcow2::open(file, o)?;
        q.preallocate(opts.preallocation, opts.backing_file.is_some())?;
        q.close_clean()?;
    }
    Ok(())
}

/// QEMU writes a new image's L1 table with its own length, not a whole
/// cluster, so its file ends right after the table's last entry (196616
/// bytes for the default 64 MiB image); the image is cut there when the
/// table is the last thing in the file. The rest of that cluster was
/// padding (the L1 table owns its clusters), and a later allocation
/// extends the file past it as usual.
fn cut_l1_padding(file: &dyn Storage) -> Result<()> {
    let h = super::read_header_cluster(file)?.header;
    let cs = 1u64 << h.cluster_bits;
    let l1_end = h.l1_table_offset + u64::from(h.l1_size) * 8;
    let len = file.len().map_err(|e| Error::io("reading image size", e))?;
    if h.l1_size == 0 || l1_end >= len || l1_end.div_ceil(cs) * cs != len {
        return Ok(());
    }
    file.set_len(l1_end).map_err(|e| Error::io("truncating new image", e))?;
    file.flush().map_err(|e| Error::io("flushing new image", e))
}

impl Qcow2 {
    /// Stores a new LUKS volume's header and key material (`volume`) in
    /// clusters of their own and points the header at them. The header
    /// switches to crypt_method 2 only once the volume is durable.
    fn set_up_encryption(&self, volume: &[u8]) -> Result<()> {
        let cs = self.g.cluster_size;
        let mut m = self.lock();
        self.check_writable(&m)?;
        let clusters = (volume.len() as u64).div_ceil(cs);
        let at = self.alloc_contiguous(&mut m, clusters)?;
        let mut bytes = volume.to_vec();
        bytes.resize((clusters * cs) as usize, 0);
        self.file.write_at(&bytes, at.0).map_err(|e| Error::io("writing the encryption header", e))?;
        self.write_back(&mut m)?;
        self.sync("flushing the encryption header")?;
        m.hc.header.crypt_method = 2;
        m.hc.extensions.fde = Some(crate::format::extensions::FdeExt { offset: at.0, length: volume.len() as u64 });
        self.write_header(&mut m)?;
        self.sync("flushing header")
    }

    /// Grows (or keeps) the virtual size to `new_size`, growing the L1
    /// table when needed. The new L1 table is durable before the header
    /// points at it; the old one is freed after.
    pub fn grow(&self, new_size: u64) -> Result<()> {
        self.grow_l1_and_size(new_size, new_size)
    }

    /// Sizes the L1 table for `l1_for` bytes and sets the virtual size to
    /// `new_size` (at most `l1_for`): resizing over a backing file grows
    /// the table first, zeroes the new tail, and only then the size.
    pub(super) fn grow_l1_and_size(&self, l1_for: u64, new_size: u64) -> Result<()> {
        let mut m = self.lock();
        self.check_writable(&m)?;
        if new_size < m.hc.header.size {
            return Err(Error::invalid("use shrink to make an image smaller"));
        }
        if l1_for > MAX_VIRTUAL_SIZE {
            return Err(Error::invalid("Image size is too large"));
        }
        let need = l1_entries(l1_for, self.g.cluster_size, self.g.extended);
        if need * 8 > MAX_L1_BYTES {
            return Err(Error::invalid(
                "The image size is too large for file format 'qcow2' (try using a larger cluster size)",
            ));
        }
        let r = self.grow_locked(&mut m, new_size, need);
        if let Err(e) = &r {
            self.poison(e);
        }
        r
    }

    fn grow_locked(&self, m: &mut Meta, new_size: u64, need: u64) -> Result<()> {
        let cs = self.g.cluster_size;
        if need as usize > m.map.l1().len() {
            // Make everything else durable first: the L1 switch must not
            // race with dirty L2 tables or pending L1 entries.
            self.write_back(m)?;
            let old = HostOffset(m.hc.header.l1_table_offset).cluster(&self.g);
            let old_len = m.map.l1().len() as u64;
            let clusters = (need * 8).div_ceil(cs);
            let new_off = self.alloc_contiguous(m, clusters)?;
            for k in 0..clusters {
                m.overlap.insert(new_off.cluster(&self.g).add(k), MetaKind::ActiveL1);
            }
            m.map.grow_l1(need as usize);
            let mut bytes = encode_u64_table(m.map.l1());
            bytes.resize((clusters * cs) as usize, 0);
            self.write_back(m)?;
            self.write_meta(m, new_off, &bytes, MetaKind::ActiveL1)?;
            self.sync("flushing new L1 table")?;
            m.hc.header.l1_table_offset = new_off.0;
            m.hc.header.l1_size = need as u32;
            m.hc.header.size = new_size;
            self.write_header(m)?;
            self.sync("flushing header")?;
            m.map.l1_written();
            if old_len > 0 {
                for k in 0..(old_len * 8).div_ceil(cs) {
                    m.overlap.remove(old.add(k));
                    self.set_refcount(m, old.add(k), 0)?;
                }
            }
        } else {
            m.hc.header.size = new_size;
            self.write_header(m)?;
            self.sync("flushing header")?;
        }
        self.size.store(new_size, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Allocates every cluster of the disk (preallocation=metadata and up).
    /// Over a backing file (extended L2 only, see `validate`) the clusters
    /// are reserved with every subcluster left unallocated, as QEMU does,
    /// so the backing file still shows through until the guest writes.
    fn preallocate(&self, mode: Preallocation, over_backing: bool) -> Result<()> {
        let clusters = self.len().div_ceil(self.g.cluster_size);
        self.preallocate_clusters(mode, 0, clusters, over_backing, None)
    }

    /// Gives every guest cluster in `[first, end)` that has no host
    /// cluster one (clusters that already have one keep it). With falloc
    /// the new data clusters get their blocks, with full they are written
    /// with zeros, before the L2 entries pointing at them are; with
    /// metadata they stay holes, as QEMU leaves them (so a metadata-
    /// preallocated file takes little room on the host). Reused clusters
    /// (freed ones inside the file) are zeroed whatever the mode: they
    /// must read as zeros like the fresh ones. `lead_in` is a host range
    /// (offset, length) the caller preallocates too: when it ends where
    /// the new clusters start, it joins their one reservation.
    pub(super) fn preallocate_clusters(
        &self,
        mode: Preallocation,
        first: u64,
        end: u64,
        over_backing: bool,
        lead_in: Option<(u64, u64)>,
    ) -> Result<()> {
        let mut m = self.lock();
        self.check_writable(&m)?;
        // The allocator's reserve-ahead would fallocate the data clusters
        // of a metadata preallocation; the mode decides here instead.
        // Afterwards the file is reserved as far as it reaches. What was
        // reserved ahead before (for the L1 table, say) is given back
        // first, or it would stay allocated inside the data's holes.
        self.trim_reserved(&mut m)?;
        let reserved = m.alloc.prealloc_end();
        m.alloc.set_prealloc_end(HostOffset(u64::MAX));
        let r = self.preallocate_locked(&mut m, mode, first, end, over_backing, lead_in);
        let len = self.file.len().unwrap_or(0);
        m.alloc.set_prealloc_end(HostOffset(reserved.0.max(len)));
        r
    }

    fn preallocate_locked(
        &self,
        m: &mut Meta,
        mode: Preallocation,
        first: u64,
        end: u64,
        over_backing: bool,
        lead_in: Option<(u64, u64)>,
    ) -> Result<()> {
        let cs = self.g.cluster_size;
        // Host-contiguous runs of new data clusters: (start, bytes), and
        // the reused ones, which need zeros in any mode.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut reused: Vec<u64> = Vec::new();
        let new_from = m.alloc.file_end();
        for gc in first..end {
            let old = self.l2_entry(m, GuestCluster(gc))?;
            if self.has_host_cluster(old) {
                continue;
            }
            let (l1i, l2i) = GuestCluster(gc).split(&self.g);
            let l2 = self.writable_l2(m, l1i)?;
            let host = if self.g.external_data {
                gc * cs
            } else {
                let (h, fresh) = self.alloc_cluster_fresh(m)?;
                if !fresh {
                    reused.push(h.0);
                }
                h.0
            };
            match runs.last_mut() {
                Some((start, len)) if *start + *len == host => *len += cs,
                _ => runs.push((host, cs)),
            }
            // Plain allocated entries, as QEMU writes them: the new
            // clusters read as zeros. Zero flags (a grow over a longer
            // backing file set them) stay with metadata preallocation, as
            // in QEMU's image: the cluster is reserved, its data a hole.
            let keep_zero = mode == Preallocation::Metadata && self.g.v3;
            let e = if self.g.extended {
                let zero = if keep_zero { old.bitmap.zero() } else { 0 };
                let allocated = if over_backing { 0 } else { !zero };
                L2Entry {
                    word: host | crate::format::l2::COPIED,
                    bitmap: SubclusterBitmap::from_parts(allocated, zero),
                }
            } else {
                let zero = if keep_zero { old.word & crate::format::l2::ZERO } else { 0 };
                L2Entry { word: L2Entry::normal(host, true).word | zero, bitmap: SubclusterBitmap(0) }
            };
            self.set_l2_raw(m, l2, l2i, e)?;
        }
        let target: &dyn Storage = &*self.data;
        let err = |e| Error::io("preallocating", e);
        let new_to = m.alloc.file_end();
        let reserve_from = match lead_in {
            Some((at, len)) if at + len == new_from.0 => at,
            _ => new_from.0,
        };
        if mode != Preallocation::Metadata && !self.g.external_data && new_to > new_from {
            // Everything past the old end in one reservation, the new L2
            // tables and refcount blocks between the data runs too, as
            // QEMU's truncation of the file does: the data then sits in
            // one extent of the host file, and converting it on later
            // writes does not grow the file system's extent tree (which
            // iotest 125 would see as the file growing).
            self.file.allocate(reserve_from, new_to.0 - reserve_from).map_err(err)?;
        }
        for &(start, len) in &runs {
            match mode {
                Preallocation::Full => crate::storage::write_zeros_chunked(target, start, len).map_err(err)?,
                Preallocation::Falloc => target.allocate(start, len).map_err(err)?,
                _ => {}
            }
        }
        if mode != Preallocation::Full {
            for &h in &reused {
                crate::storage::write_zeros_chunked(target, h, cs).map_err(err)?;
            }
        }
        let end = runs.iter().map(|&(s, l)| s + l).max().unwrap_or(0);
        if target.len().map_err(err)? < end {
            target.set_len(end).map_err(err)?;
        }
        if mode != Preallocation::Metadata || !reused.is_empty() {
            self.sync("flushing preallocated data")?;
        }
        self.write_back(m)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;

    fn roundtrip(opts: CreateOptions) {
        let st = Arc::new(MemoryStorage::new());
        create(st.clone(), None, &opts).unwrap();
        let q = Qcow2::open(st.clone(), Qcow2Options::default()).unwrap();
        assert_eq!(q.len(), opts.size);
        let mut pattern = vec![0u8; 3 * opts.cluster_size as usize + 1000];
        for (i, b) in pattern.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let at = opts.size / 2 - 700;
        q.write_at(&pattern, at).unwrap();
        q.flush().unwrap();
        let mut back = vec![0u8; pattern.len()];
        q.read_at(&mut back, at).unwrap();
        assert_eq!(back, pattern);
        q.close().unwrap();
        drop(q);
        let q = Qcow2::open(st, Qcow2Options { read_only: true, ..Default::default() }).unwrap();
        let mut back = vec![0u8; pattern.len()];
        q.read_at(&mut back, at).unwrap();
        assert_eq!(back, pattern);
    }

    #[test]
    fn create_write_read_every_geometry() {
        for cs in [512u64, 4096, 65536, 2 << 20] {
            for bits in [1u32, 2, 16, 64] {
                roundtrip(CreateOptions {
                    size: 64 << 20,
                    cluster_size: cs,
                    refcount_bits: bits,
                    ..Default::default()
                });
            }
        }
        roundtrip(CreateOptions { size: 64 << 20, version: 2, ..Default::default() });
        roundtrip(CreateOptions { size: 64 << 20, extended_l2: true, cluster_size: 32768, ..Default::default() });
        roundtrip(CreateOptions { size: 64 << 20, lazy_refcounts: true, ..Default::default() });
        for p in [Preallocation::Metadata, Preallocation::Falloc, Preallocation::Full] {
            roundtrip(CreateOptions { size: 8 << 20, cluster_size: 4096, preallocation: p, ..Default::default() });
        }
    }

    /// iotest 125: the tail of the cluster holding the old end and the
    /// clusters after it are reserved in one call, so the host file
    /// system can give them one extent.
    #[test]
    fn resize_falloc_reserves_the_old_end_cluster_tail_with_the_new_clusters() {
        use crate::storage::CountingStorage;
        let mem: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
        let cs = 65536;
        let old = 2048000;
        let opts =
            CreateOptions { size: old, cluster_size: cs, preallocation: Preallocation::Metadata, ..Default::default() };
        create(mem.clone(), None, &opts).unwrap();
        let st = Arc::new(CountingStorage::new(mem));
        let q = Qcow2::open(st.clone(), Qcow2Options::default()).unwrap();
        st.take_reservations();
        q.grow_preallocated(old + 80 * 1024, Preallocation::Falloc).unwrap();
        let tail = st
            .take_reservations()
            .into_iter()
            .find(|&(at, _)| at % cs == old % cs)
            .expect("the old end's cluster tail is reserved");
        assert!(tail.1 >= (cs - old % cs) + cs, "tail and new cluster reserved apart: {tail:?}");
        let mut back = vec![1u8; 80 * 1024];
        q.read_at(&mut back, old).unwrap();
        assert!(back.iter().all(|&b| b == 0));
    }
}
