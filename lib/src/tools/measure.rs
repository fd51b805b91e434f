//! `qemu-img measure`: how large a new image would be, with the same
//! arithmetic as qemu-img (so the numbers are equal).

use crate::device::chain_status;
use crate::format::limits::MAX_L1_BYTES;
use crate::image::{Format, Image};
use crate::qcow2::Preallocation;
use crate::{BlockDevice, Error, Result};

/// What the new image would look like (`-O` and `-o`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MeasureOptions {
    /// Output format.
    pub format: Format,
    /// `cluster_size`.
    pub cluster_size: u64,
    /// `compat`: 2 or 3.
    pub version: u32,
    /// `refcount_bits`.
    pub refcount_bits: u32,
    /// `extended_l2`.
    pub extended_l2: bool,
    /// `preallocation`.
    pub preallocation: Preallocation,
    /// `backing_file` is set (its content is then assumed to share nothing).
    pub has_backing_file: bool,
}

setters!(MeasureOptions {
    format: Format,
    cluster_size: u64,
    version: u32,
    refcount_bits: u32,
    extended_l2: bool,
    preallocation: Preallocation,
    has_backing_file: bool,
});

impl Default for MeasureOptions {
    fn default() -> Self {
        MeasureOptions {
            format: Format::Raw,
            cluster_size: 65536,
            version: 3,
            refcount_bits: 16,
            extended_l2: false,
            preallocation: Preallocation::Off,
            has_backing_file: false,
        }
    }
}

impl MeasureOptions {
    /// Applies one `-o` option (qemu-img's names and messages).
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let raw = self.format == Format::Raw;
        let on = |v: &str| matches!(v, "on" | "yes" | "true");
        match key {
            "preallocation" => {
                self.preallocation = value
                    .parse::<Preallocation>()
                    .map_err(|_| Error::invalid(format!("Invalid parameter '{value}'")))?
            }
            "size" => {}
            _ if raw => return Err(Error::invalid(format!("Invalid parameter '{key}'"))),
            "cluster_size" => self.cluster_size = crate::size::parse_size(value)?,
            "compat" => {
                self.version = match value {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => return Err(Error::invalid(format!("Invalid compatibility level: '{value}'"))),
                }
            }
            "refcount_bits" => {
                self.refcount_bits = value.parse().map_err(|_| Error::invalid("Invalid refcount_bits"))?;
            }
            "extended_l2" => self.extended_l2 = on(value),
            "backing_file" => self.has_backing_file = true,
            "backing_fmt" | "lazy_refcounts" | "compression_type" | "data_file" | "data_file_raw" => {}
            _ => return Err(Error::invalid(format!("Invalid parameter '{key}'"))),
        }
        Ok(())
    }

    fn validate(&self) -> Result<()> {
        if self.format == Format::Raw {
            return Ok(());
        }
        let c = crate::qcow2::CreateOptions {
            size: 0,
            cluster_size: self.cluster_size,
            version: self.version,
            refcount_bits: self.refcount_bits,
            extended_l2: self.extended_l2,
            ..Default::default()
        };
        c.validate()
    }
}

/// The result, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    /// `required`: file size for the data the input holds.
    pub required: u64,
    /// `fully-allocated`: file size with every cluster allocated.
    pub fully_allocated: u64,
    /// `bitmaps`: persistent bitmap space, when qemu-img reports it
    /// (qcow2 v3 output from a qcow2 input).
    pub bitmaps: Option<u64>,
}

/// Bytes of refcount table and blocks needed to count `clusters` clusters
/// plus themselves (the fixed point qemu computes).
pub fn refcount_metadata_size(clusters: u64, cluster_size: u64, refcount_order: u32) -> u64 {
    let per_table_cluster = cluster_size / 8;
    let per_block = cluster_size * 8 / (1u64 << refcount_order);
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            break;
        }
    }
    (blocks + table) * cluster_size
}

/// File size of a fully allocated qcow2 image of `size` bytes: header,
/// L2 and L1 tables, refcount structures and data.
pub fn qcow2_fully_allocated(size: u64, cluster_size: u64, refcount_order: u32, extended_l2: bool) -> u64 {
    let aligned = size.div_ceil(cluster_size) * cluster_size;
    let l2e = if extended_l2 { 16 } else { 8 };
    let mut meta = cluster_size;
    let nl2e = (aligned / cluster_size).div_ceil(cluster_size / l2e) * (cluster_size / l2e);
    meta += nl2e * l2e;
    let nl1e = (nl2e * l2e / cluster_size).div_ceil(cluster_size / 8) * (cluster_size / 8);
    meta += nl1e * 8;
    meta += refcount_metadata_size((meta + aligned) / cluster_size, cluster_size, refcount_order);
    meta + aligned
}

/// Bytes the input's data occupies once rounded to whole clusters of the
/// output, counting only extents that hold data (zeros and holes are free).
fn allocated_bytes(input: &dyn BlockDevice, cluster_size: u64) -> Result<u64> {
    let size = input.len();
    let mut required = 0u64;
    let mut pos = 0u64;
    while pos < size {
        let st = chain_status(input, pos, size - pos)?;
        let mut n = st.length.min(size - pos);
        if st.allocated && !st.zero && st.data {
            n = (pos + n).div_ceil(cluster_size) * cluster_size - pos;
            required += pos % cluster_size + n;
        }
        pos += n;
    }
    Ok(required)
}

/// Measures a new image of `opts` holding `input` (or, without input, a
/// new empty image of `size` bytes).
pub fn measure(input: Option<&Image>, size: Option<u64>, opts: &MeasureOptions) -> Result<Measurement> {
    opts.validate()?;
    let dev = input.map(|i| i.device());
    let in_size = match (dev, size) {
        (Some(i), None) => i.len(),
        (None, Some(s)) => s,
        (Some(_), Some(_)) => return Err(Error::invalid("--size N cannot be used together with a filename.")),
        (None, None) => return Err(Error::invalid("Either --size N or one filename must be specified.")),
    };
    if opts.format == Format::Raw {
        let n = if input.is_some() { in_size } else { in_size.div_ceil(512) * 512 };
        return Ok(Measurement { required: n, fully_allocated: n, bitmaps: None });
    }
    let cs = opts.cluster_size;
    let virtual_size = in_size.div_ceil(cs) * cs;
    if (virtual_size / cs).div_ceil(cs / if opts.extended_l2 { 16 } else { 8 }) * 8 > MAX_L1_BYTES {
        return Err(Error::invalid("The image size is too large (try using a larger cluster size)"));
    }
    let mut required = match dev {
        Some(_) if opts.has_backing_file => virtual_size,
        Some(i) => allocated_bytes(i, cs)?,
        None => 0,
    };
    if matches!(opts.preallocation, Preallocation::Full | Preallocation::Falloc) {
        required = virtual_size;
    }
    let fully = qcow2_fully_allocated(virtual_size, cs, opts.refcount_bits.trailing_zeros(), opts.extended_l2);
    // qemu-img reports bitmaps when both sides can hold persistent
    // bitmaps: qcow2 v3 in and out.
    let bitmaps = match input.and_then(|i| i.qcow2()) {
        Some(q) if opts.version >= 3 && q.header().version >= 3 => Some(bitmaps_size(q, cs)?),
        _ => None,
    };
    Ok(Measurement { required: fully - virtual_size + required, fully_allocated: fully, bitmaps })
}

/// Space the input's persistent bitmaps would take in the new image, as
/// qemu-img estimates it: every bitmap fully allocated, its table, and
/// the directory. QEMU loads bitmaps only while the autoclear bit says
/// they are consistent, so without it there are none.
fn bitmaps_size(q: &crate::qcow2::Qcow2, cs: u64) -> Result<u64> {
    let h = q.header();
    let Some(ext) = q.extensions().bitmaps else { return Ok(0) };
    if h.autoclear_features & crate::format::Autoclear::BITMAPS == 0 || ext.nb_bitmaps == 0 {
        return Ok(0);
    }
    let entries = q.bitmap_directory()?;
    let mut total = 0u64;
    let mut dir_size = 0u64;
    for e in entries {
        let bits = h.size.div_ceil(e.granularity());
        let clusters = bits.div_ceil(8).div_ceil(cs);
        total += clusters * cs;
        total += (clusters * 8).div_ceil(cs) * cs;
        dir_size += (crate::format::bitmap::DIR_ENTRY_FIXED as u64 + e.name.len() as u64).div_ceil(8) * 8;
    }
    Ok(total + dir_size.div_ceil(cs) * cs)
}
