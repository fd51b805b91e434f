//! Amending an existing image (`qemu-img amend`): compat level, lazy
//! refcounts, refcount width, size; and rewriting the
//! backing file name (rebase).

use super::state::Meta;
use super::units::{HostCluster, HostOffset};
use super::{read_header_cluster, Qcow2, Qcow2Options};
use crate::format::be::encode_u64_table;
use crate::format::extensions::Extensions;
use crate::format::header::{CompressionType, V2_HEADER_LEN, V3_HEADER_LEN};
use crate::format::l1::L1Entry;
use crate::format::l2::{COPIED, ZERO};
use crate::format::limits::MAX_REFTABLE_BYTES;
use crate::format::refcount::{RefcountLayout, REFTABLE_OFFSET_MASK};
use crate::format::{Autoclear, Compatible, Incompatible, L2Entry};
use crate::storage::Storage;
use crate::{Error, Result};
use std::collections::BTreeSet;
use std::sync::Arc;

/// What `qemu-img amend -o` may change. `None` leaves a property alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AmendOptions {
    /// `compat`: 2 (0.10) or 3 (1.1).
    pub version: Option<u32>,
    /// `lazy_refcounts`.
    pub lazy_refcounts: Option<bool>,
    /// `refcount_bits`.
    pub refcount_bits: Option<u32>,
    /// `backing_file`: parsed, but refused by [`amend`] as by qemu-img 10
    /// (use rebase, or [`Qcow2::set_backing`]).
    pub backing_file: Option<String>,
    /// `backing_fmt`: refused like `backing_file`.
    pub backing_format: Option<String>,
    /// `size` in bytes (may shrink, as QEMU's amend allows).
    pub size: Option<u64>,
    /// `journal` (oxcow's own): add or remove the recovery journal.
    pub journal: Option<bool>,
    /// `data_file`: the external data file's name recorded in the image
    /// (empty: none recorded; the image then needs one given at open).
    /// Only the name changes, never the data.
    pub data_file: Option<String>,
    /// `data_file_raw`: may only be cleared (QEMU cannot know whether an
    /// existing data file holds the guest's data at its offsets).
    pub data_file_raw: Option<bool>,
}

setters!(AmendOptions {} opt {
    version: u32,
    lazy_refcounts: bool,
    refcount_bits: u32,
    backing_file: String,
    backing_format: String,
    size: u64,
    journal: bool,
    data_file: String,
    data_file_raw: bool,
});

const CREATE_ONLY: &[&str] = &[
    "cluster_size",
    "compression_type",
    "preallocation",
    "extended_l2",
    "encryption",
    "encrypt.format",
    "encrypt.key-secret",
    "nocow",
];

fn parse_bool(key: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(Error::invalid(format!("Parameter '{key}' expects 'on' or 'off'"))),
    }
}

impl AmendOptions {
    /// Parses qemu-img's `-o` string (`key=value,...`; `,,` is a literal
    /// comma), with qemu-img's messages for options amend cannot change.
    pub fn parse(s: &str) -> Result<AmendOptions> {
        let mut o = AmendOptions::default();
        for (key, value) in crate::options::split_options(s) {
            match key.as_str() {
                "compat" => {
                    o.version = Some(match value.as_str() {
                        "0.10" | "v2" => 2,
                        "1.1" | "v3" => 3,
                        other => return Err(Error::invalid(format!("Unknown compatibility level {other}"))),
                    })
                }
                "lazy_refcounts" => o.lazy_refcounts = Some(parse_bool(&key, &value)?),
                "journal" => o.journal = Some(parse_bool(&key, &value)?),
                "refcount_bits" => {
                    o.refcount_bits = Some(parse_refcount_bits(&value).ok_or_else(|| {
                        Error::invalid("Parameter 'refcount_bits' expects a non-negative number below 2^64")
                    })?)
                }
                "backing_file" => o.backing_file = Some(value),
                "backing_fmt" => o.backing_format = Some(value),
                "size" => o.size = Some(crate::size::parse_size(&value)?),
                k if CREATE_ONLY.contains(&k) => {
                    return Err(Error::invalid(format!(
                        "Invalid parameter '{k}'\nThis option is only supported for image creation"
                    )))
                }
                "data_file" => o.data_file = Some(value),
                "data_file_raw" => o.data_file_raw = Some(parse_bool(&key, &value)?),
                k => return Err(Error::invalid(format!("Invalid parameter '{k}'"))),
            }
        }
        Ok(o)
    }
}

/// Applies `opts` to the qcow2 image in `file` (its external data file,
/// if any, in `data_file`). The image must not be open elsewhere.
///
/// Order, as QEMU's: upgrade, then lazy refcounts and size through the
/// engine; then the refcount width (rebuilt at file level,
/// since the engine's geometry is fixed while open); the downgrade last.
/// Everything refusable is refused before anything changes.
pub fn amend(file: Arc<dyn Storage>, data_file: Option<Arc<dyn Storage>>, opts: &AmendOptions) -> Result<()> {
    amend_with_key(file, data_file, opts, None)
}

/// [`amend`] of an encrypted image, opened with its password `key`.
pub fn amend_with_key(
    file: Arc<dyn Storage>,
    data_file: Option<Arc<dyn Storage>>,
    opts: &AmendOptions,
    key: Option<&crate::crypto::Secret>,
) -> Result<()> {
    amend_observed(file, data_file, opts, key, &mut |_| {})
}

/// What an amend tells while it runs (qemu-img prints both).
#[derive(Debug)]
#[non_exhaustive]
pub enum AmendEvent<'a> {
    /// Opening the image repaired it (dirty bit set by an unclean close
    /// with lazy refcounts): the repair's report, its lines included.
    Repaired(&'a super::CheckReport),
    /// The downgrade has visited `done` of `total` L1 entries (the active
    /// table's and every snapshot's), as QEMU counts its progress.
    Progress {
        /// Entries visited.
        done: u64,
        /// All entries.
        total: u64,
    },
}

/// [`amend_with_key`], telling `on` what happens on the way.
pub fn amend_observed(
    file: Arc<dyn Storage>,
    data_file: Option<Arc<dyn Storage>>,
    opts: &AmendOptions,
    key: Option<&crate::crypto::Secret>,
    on: &mut dyn FnMut(AmendEvent<'_>),
) -> Result<()> {
    let keyed = |o: Qcow2Options| Qcow2Options { key_secret: key.cloned(), ..o };
    let hc = read_header_cluster(&*file)?;
    let h = &hc.header;
    let target_v = opts.version.unwrap_or(h.version);
    let bits = opts.refcount_bits.unwrap_or(h.refcount_bits());
    if !bits.is_power_of_two() || bits > 64 {
        return Err(Error::invalid("Refcount width must be a power of two and may not exceed 64 bits"));
    }
    if target_v == 2 {
        if opts.lazy_refcounts == Some(true) {
            return Err(Error::invalid(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
            ));
        }
        if bits != 16 {
            // As QEMU: a width asked for beside v2 is refused as such; the
            // image's own width is refused by the downgrade.
            return Err(Error::invalid(if opts.refcount_bits.is_some() {
                "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)"
            } else {
                "compat=0.10 requires refcount_bits=16"
            }));
        }
        if h.version >= 3 {
            downgrade_precheck(h)?;
        }
    }
    // QEMU's refusals, before anything changes.
    if opts.data_file.is_some() && !h.has_data_file() {
        return Err(Error::invalid("data-file can only be set for images that use an external data file"));
    }
    let raw_now = h.autoclear_features & Autoclear::DATA_FILE_RAW != 0;
    if opts.data_file_raw == Some(true) && !raw_now {
        return Err(Error::invalid("data-file-raw cannot be set on existing images"));
    }
    let same_backing = opts.backing_file == hc.backing_file && opts.backing_format == hc.extensions.backing_format;
    if (opts.backing_format.is_some() || opts.backing_file.is_some()) && !same_backing {
        // qemu-img 10 refuses a change: a new backing file changes what
        // the guest reads unless the data is compared, which is rebase's
        // job. Naming the ones the image has is no change.
        return Err(Error::invalid("Cannot amend the backing file\nYou can use 'oxcow rebase' instead."));
    }
    {
        let q = Qcow2::open(file.clone(), keyed(Qcow2Options { data_file: data_file.clone(), ..Default::default() }))?;
        if let Some(r) = q.repaired_on_open() {
            on(AmendEvent::Repaired(r));
        }
        if target_v == 3 && h.version == 2 {
            q.upgrade()?;
        }
        if let Some(lazy) = opts.lazy_refcounts {
            q.set_lazy_refcounts(lazy)?;
        }
        if let Some(size) = opts.size {
            q.resize_to(size, true)?;
        }
        if let Some(j) = opts.journal {
            q.set_journal(j)?;
        }
        if opts.data_file.is_some() || opts.data_file_raw == Some(false) {
            let name = opts.data_file.as_ref().map(|n| Some(n.clone()).filter(|n| !n.is_empty()));
            q.set_data_file_name(name, opts.data_file_raw == Some(false))?;
        }
        q.close_clean()?;
    }
    if bits != h.refcount_bits() {
        let mut progress = |done, total| on(AmendEvent::Progress { done, total });
        rebuild_refcounts(&file, data_file.clone(), bits.trailing_zeros(), key, &mut progress)?;
    }
    if target_v == 2 && h.version >= 3 {
        let q = Qcow2::open(file.clone(), keyed(Qcow2Options { data_file, ..Default::default() }))?;
        q.downgrade(&mut |done, total| on(AmendEvent::Progress { done, total }))?;
        q.close_clean()?;
    }
    Ok(())
}

fn downgrade_precheck(h: &crate::format::Header) -> Result<()> {
    if h.has_data_file() {
        return Err(Error::invalid("Cannot downgrade an image with a data file"));
    }
    let other = h.incompatible_features & !(Incompatible::DIRTY | Incompatible::COMPRESSION);
    if other != 0 {
        return Err(Error::invalid(format!("Cannot downgrade an image with incompatible features {other:#x} set")));
    }
    Ok(())
}

impl Qcow2 {
    /// Rewrites the backing file name and format in cluster 0 (what
    /// `rebase` and `amend -o backing_file` change). Only the header
    /// changes: callers keep the guest content the same (safe rebase) or
    /// take responsibility for it (unsafe rebase). The open image keeps
    /// reading through the backing device it was opened with; reopen it
    /// to use the new one.
    pub fn set_backing(&self, name: Option<String>, format: Option<String>) -> Result<()> {
        let mut m = self.lock();
        self.check_writable(&m)?;
        if name.is_some() && m.hc.header.has_data_file() && self.g.data_raw {
            return Err(Error::invalid("Backing file and data file cannot be used at the same time"));
        }
        let mut hc = m.hc.clone();
        hc.extensions.backing_format = if name.is_some() { format } else { None };
        hc.backing_file = name;
        // Encoding refuses a cluster 0 that would overflow before anything
        // is written; the header is then one write within one cluster.
        hc.encode()?;
        let old = std::mem::replace(&mut m.hc, hc);
        let r = self.write_header(&mut m).and_then(|_| self.sync("flushing header"));
        if r.is_err() {
            m.hc = old;
            let e = r.as_ref().err().map(|e| e.duplicate());
            if let Some(e) = e {
                self.poison(&e);
            }
        }
        r
    }

    /// Records another external data file name (`Some(None)`: none) and,
    /// with `clear_raw`, drops the data-file-raw bit. Only cluster 0
    /// changes, in one write; the open image keeps its data file.
    pub fn set_data_file_name(&self, name: Option<Option<String>>, clear_raw: bool) -> Result<()> {
        let mut m = self.quiesce()?;
        let mut hc = m.hc.clone();
        if let Some(name) = name {
            hc.extensions.data_file = name;
        }
        if clear_raw {
            hc.header.autoclear_features &= !Autoclear::DATA_FILE_RAW;
        }
        // Encoding refuses a cluster 0 that would overflow before anything
        // is written.
        hc.encode()?;
        let old = std::mem::replace(&mut m.hc, hc);
        let r = self.write_header(&mut m).and_then(|_| self.sync("flushing header"));
        if r.is_err() {
            m.hc = old;
        }
        self.fail(&mut m, r)
    }

    /// Turns lazy refcounts on or off. Turning them off writes every
    /// refcount and clears the dirty bit first.
    pub fn set_lazy_refcounts(&self, on: bool) -> Result<()> {
        let mut m = self.quiesce()?;
        if m.hc.header.version < 3 {
            return Err(Error::invalid(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
            ));
        }
        let r = (|| {
            if on {
                m.hc.header.compatible_features |= Compatible::LAZY_REFCOUNTS;
            } else {
                m.hc.header.compatible_features &= !Compatible::LAZY_REFCOUNTS;
                m.hc.header.incompatible_features &= !Incompatible::DIRTY;
                m.refs.set_lazy_active(false);
            }
            self.write_header(&mut m)?;
            self.sync("flushing header")
        })();
        self.fail(&mut m, r)
    }

    /// compat 0.10 -> 1.1. Snapshot entries get the extra data v3 needs
    /// (written first: it is valid v2 too), then the header switches.
    fn upgrade(&self) -> Result<()> {
        let mut m = self.quiesce()?;
        let r = (|| {
            if m.snapshots.iter().any(|s| s.extra_data_size < 16) {
                let size = m.hc.header.size;
                let list = m
                    .snapshots
                    .iter()
                    .cloned()
                    .map(|mut s| {
                        s.disk_size = Some(s.disk_size.unwrap_or(size));
                        s
                    })
                    .collect();
                self.rewrite_snapshot_table(&mut m, list)?;
            }
            let h = &mut m.hc.header;
            h.version = 3;
            h.header_length = V3_HEADER_LEN;
            h.incompatible_features = 0;
            h.compatible_features = 0;
            h.autoclear_features = 0;
            h.refcount_order = 4;
            h.compression_type = CompressionType::Zlib;
            m.hc.extensions.feature_names = Extensions::standard_feature_names();
            self.write_header(&mut m)?;
            self.sync("flushing header")
        })();
        self.fail(&mut m, r)
    }

    /// compat 1.1 -> 0.10: zero clusters are expanded (v2 has no zero
    /// flag), every refcount written, then the header rewritten as v2.
    fn downgrade(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
        let mut m = self.quiesce()?;
        downgrade_precheck(&m.hc.header)?;
        if m.hc.header.refcount_order != 4 {
            return Err(Error::invalid("compat=0.10 requires refcount_bits=16"));
        }
        // As QEMU: v2 programs would not know that a snapshot of another
        // disk size, or with a VM state past 32 bits, needs its extra data.
        let size = m.hc.header.size;
        if m.snapshots.iter().any(|sn| sn.vm_state_size > u64::from(u32::MAX) || sn.disk_size.unwrap_or(size) != size) {
            return Err(Error::invalid("Internal snapshots prevent downgrade of image"));
        }
        // Everything that can refuse the downgrade is read before anything
        // is written, outside `fail`: a bad snapshot L1 table found after
        // the bitmaps went would leave a v3 image without them, and a
        // refusal that poisoned the image would leave its bitmaps in use
        // at close (QEMU refuses with the image as it was).
        let entries = self.all_l1_entries(&mut m)?;
        self.refuse_zstd_compressed(&mut m, &entries)?;
        let r = self.downgrade_locked(&mut m, &entries, progress);
        self.fail(&mut m, r)
    }

    /// v2 knows only zlib: compressed clusters of another type cannot go.
    fn refuse_zstd_compressed(&self, m: &mut Meta, entries: &[u64]) -> Result<()> {
        if self.g.compression == CompressionType::Zlib {
            return Ok(());
        }
        let tables: BTreeSet<u64> = entries.iter().copied().filter(|&o| o != 0).collect();
        for off in tables {
            let t = self.l2_table(m, HostOffset(off))?;
            if (0..self.g.l2_entries as usize).any(|i| self.g.l2.get(&t, i).is_compressed()) {
                return Err(Error::invalid(
                    "Cannot downgrade an image with zstd compression type and existing compressed clusters",
                ));
            }
        }
        Ok(())
    }

    /// The L2 table offsets of every L1 entry, the active table's first,
    /// then each snapshot's (0 for none), in table order.
    fn all_l1_entries(&self, m: &mut Meta) -> Result<Vec<u64>> {
        let mut all: Vec<u64> = m.map.l1().iter().map(|&e| L1Entry(e).l2_offset()).collect();
        for sn in m.snapshots.clone() {
            all.extend(self.read_snapshot_l1(&sn)?.into_iter().map(|e| L1Entry(e).l2_offset()));
        }
        Ok(all)
    }

    fn downgrade_locked(&self, m: &mut Meta, entries: &[u64], progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
        let cs = self.g.cluster_size;
        // v2 cannot hold bitmaps: QEMU's downgrade abandons them (leaked);
        // they are removed here, their clusters freed.
        self.drop_bitmaps_for_v2(m)?;
        let has_backing = m.hc.backing_file.is_some();
        let zeros = vec![0u8; cs as usize];
        let total = entries.len() as u64;
        let mut expanded = BTreeSet::new();
        for (k, &off) in entries.iter().enumerate() {
            // A table shared between L1 tables is expanded once.
            if off == 0 || !expanded.insert(off) {
                progress(k as u64 + 1, total);
                continue;
            }
            let t = self.l2_table(m, HostOffset(off))?;
            let mut changes = Vec::new();
            for i in 0..self.g.l2_entries as usize {
                let e = self.g.l2.get(&t, i);
                if e.is_compressed() || e.word & ZERO == 0 {
                    continue;
                }
                let host = e.host_offset();
                let word = if host != 0 {
                    // Zeros into the preallocated cluster before the flag
                    // that hid its content goes.
                    self.data.write_at(&zeros, host).map_err(|e| Error::io("expanding zero cluster", e))?;
                    e.word & !ZERO
                } else if !has_backing {
                    // Unallocated reads as zeros without a backing file.
                    0
                } else {
                    // A real cluster of zeros, referenced once per L1 table
                    // that reaches this (possibly shared) L2 table.
                    let shares = self.refcount(m, HostOffset(off).cluster(&self.g))?;
                    let new = self.alloc_cluster(m)?;
                    self.set_refcount(m, new.cluster(&self.g), shares)?;
                    self.data.write_at(&zeros, new.0).map_err(|e| Error::io("expanding zero cluster", e))?;
                    new.0 | if shares == 1 { COPIED } else { 0 }
                };
                changes.push((i, L2Entry { word, bitmap: e.bitmap }));
            }
            if !changes.is_empty() {
                self.sync("flushing expanded zero clusters")?;
                for (i, e) in changes {
                    self.set_l2_raw(m, HostOffset(off), i, e)?;
                }
                // The new clusters' refcounts reach disk before this table.
                self.write_back_durable(m)?;
            }
            progress(k as u64 + 1, total);
        }
        self.write_back_durable(m)?;
        let h = &mut m.hc.header;
        h.version = 2;
        h.header_length = V2_HEADER_LEN;
        h.incompatible_features = 0;
        h.compatible_features = 0;
        h.autoclear_features = 0;
        h.refcount_order = 4;
        h.compression_type = CompressionType::Zlib;
        m.hc.extensions.feature_names.clear();
        m.hc.extensions.bitmaps = None;
        self.write_header(m)?;
        self.sync("flushing header")?;
        m.refs.set_lazy_active(false);
        Ok(())
    }
}

/// Rewrites the refcount structures of the image in `file` with
/// `2^order`-bit refcounts: every refcount is read with the old width,
/// new refcount blocks and table are written past the end of the file and
/// made durable, and only then does the header switch to them. The old
/// structures become free space.
fn rebuild_refcounts(
    file: &Arc<dyn Storage>,
    data_file: Option<Arc<dyn Storage>>,
    order: u32,
    key: Option<&crate::crypto::Secret>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let o = Qcow2Options { read_only: true, data_file, key_secret: key.cloned(), ..Default::default() };
    let q = Qcow2::open(file.clone(), o)?;
    let cs = q.g.cluster_size;
    let n = file.len().map_err(|e| Error::io("reading image size", e))?.div_ceil(cs);
    let mut counts = Vec::with_capacity(n as usize);
    let old;
    {
        let mut m = q.lock();
        for idx in 0..n {
            counts.push(q.refcount(&mut m, HostCluster(idx))?);
        }
        old = super::amend_progress::OldLayout {
            refcounts: counts.clone(),
            table_entries: u64::from(m.hc.header.refcount_table_clusters) * (cs / 8),
            block_entries: q.g.rc.block_entries(),
        };
        // The old refcount structures are not counted by the new ones.
        let h = &m.hc.header;
        for k in 0..u64::from(h.refcount_table_clusters) {
            if let Some(c) = counts.get_mut((h.refcount_table_offset / cs + k) as usize) {
                *c = 0;
            }
        }
        for &e in m.refs.table() {
            let off = e & REFTABLE_OFFSET_MASK;
            if let Some(c) = counts.get_mut((off / cs) as usize).filter(|_| off != 0) {
                *c = 0;
            }
        }
    }
    drop(q);
    let rc = RefcountLayout { cluster_bits: cs.trailing_zeros(), refcount_order: order };
    if let Some((idx, &c)) = counts.iter().enumerate().find(|(_, &c)| c > rc.max()) {
        return Err(Error::invalid(format!(
            "Cannot decrease refcount entry width to {} bits: Cluster at offset {:#x} has a refcount of {c}",
            rc.bits(),
            idx as u64 * cs
        )));
    }
    let per_block = rc.block_entries();
    // The progress qemu-img shows: every walk QEMU would take but the
    // last one now, that one once the new structures are written.
    let walks = super::amend_progress::allocating_walks(&old, per_block, cs).unwrap_or(2);
    for w in 0..walks {
        super::amend_progress::report_walk(w, walks, old.table_entries, progress);
    }
    let per_table_cluster = cs / 8;
    let (mut blocks, mut table) = (0u64, 0u64);
    loop {
        let total = n + blocks + table;
        let b = total.div_ceil(per_block);
        let t = b.div_ceil(per_table_cluster).max(1);
        if b == blocks && t == table {
            break;
        }
        blocks = b;
        table = t;
    }
    if table * cs > MAX_REFTABLE_BYTES {
        return Err(Error::invalid("refcount table would exceed 8 MiB"));
    }
    let table_off = n * cs;
    let blocks_off = table_off + table * cs;
    counts.resize((n + table + blocks) as usize, 1);
    for b in 0..blocks {
        let mut buf = vec![0u8; cs as usize];
        for i in 0..per_block {
            if let Some(&c) = counts.get((b * per_block + i) as usize) {
                rc.set(&mut buf, i as usize, c);
            }
        }
        file.write_at(&buf, blocks_off + b * cs).map_err(|e| Error::io("writing refcount block", e))?;
    }
    let entries: Vec<u64> = (0..blocks).map(|b| blocks_off + b * cs).collect();
    let mut tbytes = encode_u64_table(&entries);
    tbytes.resize((table * cs) as usize, 0);
    file.write_at(&tbytes, table_off).map_err(|e| Error::io("writing refcount table", e))?;
    file.flush().map_err(|e| Error::io("flushing refcount structures", e))?;
    let mut hc = read_header_cluster(&**file)?;
    hc.header.refcount_table_offset = table_off;
    hc.header.refcount_table_clusters = table as u32;
    hc.header.refcount_order = order;
    let bytes = hc.encode()?;
    file.write_at(&bytes, 0).map_err(|e| Error::io("writing image header", e))?;
    file.flush().map_err(|e| Error::io("flushing image header", e))?;
    super::amend_progress::report_walk(walks, walks, old.table_entries, progress);
    Ok(())
}
/// A `refcount_bits` value read as QEMU reads numbers: a negative one
/// wraps around (`-1` is 2^64 - 1), and any width too large for a `u32`
/// becomes one that the width rule refuses, in its words ("Refcount
/// width must be a power of two and may not exceed 64 bits").
pub fn parse_refcount_bits(value: &str) -> Option<u32> {
    let v = match value.parse::<u64>() {
        Ok(v) => v,
        Err(_) => value.parse::<i64>().ok()? as u64,
    };
    Some(u32::try_from(v).unwrap_or(u32::MAX))
}
