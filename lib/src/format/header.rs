//! The image header (first bytes of cluster 0).
//!
//! ```text
//!  off  size  field                      (v2 ends at 72; v3 has >= 104 bytes)
//!    0     4  magic "QFI\xfb"
//!    4     4  version (2 | 3)
//!    8     8  backing_file_offset
//!   16     4  backing_file_size
//!   20     4  cluster_bits
//!   24     8  size (virtual, bytes)
//!   32     4  crypt_method (0 none, 1 AES, 2 LUKS)
//!   36     4  l1_size (entries)
//!   40     8  l1_table_offset
//!   48     8  refcount_table_offset
//!   56     4  refcount_table_clusters
//!   60     4  nb_snapshots
//!   64     8  snapshots_offset
//!   72     8  incompatible_features   -- v3 from here
//!   80     8  compatible_features
//!   88     8  autoclear_features
//!   96     4  refcount_order
//!  100     4  header_length
//!  104     1  compression_type          (present if header_length > 104)
//!  105     7  padding
//!  ...        unknown additional fields, preserved verbatim
//! ```

use super::be::{put_u32, put_u64, u32_at, u64_at};
use super::features::Incompatible;
use super::limits::*;
use super::MAGIC;
use crate::{Error, Result};

/// Byte offsets of the header fields, as in the diagram above.
#[allow(missing_docs)]
pub mod off {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 4;
    pub const BACKING_FILE_OFFSET: usize = 8;
    pub const BACKING_FILE_SIZE: usize = 16;
    pub const CLUSTER_BITS: usize = 20;
    pub const SIZE: usize = 24;
    pub const CRYPT_METHOD: usize = 32;
    pub const L1_SIZE: usize = 36;
    pub const L1_TABLE_OFFSET: usize = 40;
    pub const REFCOUNT_TABLE_OFFSET: usize = 48;
    pub const REFCOUNT_TABLE_CLUSTERS: usize = 56;
    pub const NB_SNAPSHOTS: usize = 60;
    pub const SNAPSHOTS_OFFSET: usize = 64;
    pub const INCOMPATIBLE_FEATURES: usize = 72;
    pub const COMPATIBLE_FEATURES: usize = 80;
    pub const AUTOCLEAR_FEATURES: usize = 88;
    pub const REFCOUNT_ORDER: usize = 96;
    pub const HEADER_LENGTH: usize = 100;
    pub const COMPRESSION_TYPE: usize = 104;
}

/// Length of a version 2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Minimum length of a version 3 header.
pub const V3_MIN_HEADER_LEN: u32 = 104;
/// Length of the v3 header oxcow writes (with compression_type and padding).
pub const V3_HEADER_LEN: u32 = 112;

/// How compressed clusters are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompressionType {
    /// Raw deflate (RFC 1951), called "zlib" by QEMU.
    #[default]
    Zlib,
    /// Zstandard.
    Zstd,
}

impl CompressionType {
    /// The on-disk value.
    pub fn to_u8(self) -> u8 {
        match self {
            CompressionType::Zlib => 0,
            CompressionType::Zstd => 1,
        }
    }
    /// QEMU's name for it.
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

impl std::str::FromStr for CompressionType {
    type Err = Error;
    /// Parses QEMU's names, `zlib` and `zstd`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "zlib" => Ok(CompressionType::Zlib),
            "zstd" => Ok(CompressionType::Zstd),
            other => Err(Error::invalid(format!("Parameter 'compression-type' does not accept value '{other}'"))),
        }
    }
}

/// A parsed, validated qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Format version, 2 or 3.
    pub version: u32,
    /// Where the backing file name is stored; 0 without a backing file.
    pub backing_file_offset: u64,
    /// Length of the backing file name in bytes.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Host offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters the refcount table occupies.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (v3).
    pub incompatible_features: u64,
    /// Compatible feature bits (v3).
    pub compatible_features: u64,
    /// Autoclear feature bits (v3).
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits (4 for v2).
    pub refcount_order: u32,
    /// Header length in bytes (72 for v2).
    pub header_length: u32,
    /// Compression type of compressed clusters.
    pub compression_type: CompressionType,
    /// Header bytes past the fields oxcow knows (from byte 112 to
    /// header_length), kept so a rewrite preserves them.
    pub unknown_tail: Vec<u8>,
}

fn bad(field: &'static str, value: u64, reason: impl Into<String>) -> Error {
    Error::field(field, value, reason)
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }
    /// Whether L2 entries are extended (128-bit).
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & Incompatible::EXTENDED_L2 != 0
    }
    /// Whether guest data lives in an external data file.
    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & Incompatible::DATA_FILE != 0
    }
    /// Whether the dirty bit is set.
    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & Incompatible::DIRTY != 0
    }
    /// Whether the corrupt bit is set.
    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & Incompatible::CORRUPT != 0
    }
    /// L2 entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        let entry = if self.extended_l2() { 16 } else { 8 };
        self.cluster_size() / entry
    }
    /// L1 entries needed to map `size` bytes with this geometry.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(self.cluster_size()).div_ceil(self.l2_entries())
    }

    /// Parses and validates a header from the start of an image (at least
    /// the first cluster, or the whole file if shorter). `names` maps
    /// unknown incompatible bits to names from the feature name table when
    /// the caller has parsed it; validation of incompatible bits is left to
    /// [`Header::check_incompatible`] so it can use that table.
    pub fn parse(buf: &[u8]) -> Result<Header> {
        if buf.len() < V2_HEADER_LEN as usize {
            return Err(Error::corrupt("file too short for a qcow2 header"));
        }
        if buf[off::MAGIC..off::MAGIC + 4] != MAGIC {
            return Err(Error::corrupt("not a qcow2 image (bad magic)"));
        }
        let version = u32_at(buf, off::VERSION);
        if version != 2 && version != 3 {
            return Err(Error::unsupported(format!("qcow2 version {version}")));
        }
        let cluster_bits = u32_at(buf, off::CLUSTER_BITS);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(bad(
                "cluster_bits",
                cluster_bits.into(),
                format!("must be between {MIN_CLUSTER_BITS} and {MAX_CLUSTER_BITS}"),
            ));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: u64_at(buf, off::BACKING_FILE_OFFSET),
            backing_file_size: u32_at(buf, off::BACKING_FILE_SIZE),
            cluster_bits,
            size: u64_at(buf, off::SIZE),
            crypt_method: u32_at(buf, off::CRYPT_METHOD),
            l1_size: u32_at(buf, off::L1_SIZE),
            l1_table_offset: u64_at(buf, off::L1_TABLE_OFFSET),
            refcount_table_offset: u64_at(buf, off::REFCOUNT_TABLE_OFFSET),
            refcount_table_clusters: u32_at(buf, off::REFCOUNT_TABLE_CLUSTERS),
            nb_snapshots: u32_at(buf, off::NB_SNAPSHOTS),
            snapshots_offset: u64_at(buf, off::SNAPSHOTS_OFFSET),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: CompressionType::Zlib,
            unknown_tail: Vec::new(),
        };
        if version >= 3 {
            if buf.len() < V3_MIN_HEADER_LEN as usize {
                return Err(Error::corrupt("file too short for a qcow2 v3 header"));
            }
            h.incompatible_features = u64_at(buf, off::INCOMPATIBLE_FEATURES);
            h.compatible_features = u64_at(buf, off::COMPATIBLE_FEATURES);
            h.autoclear_features = u64_at(buf, off::AUTOCLEAR_FEATURES);
            h.refcount_order = u32_at(buf, off::REFCOUNT_ORDER);
            h.header_length = u32_at(buf, off::HEADER_LENGTH);
            if h.header_length < V3_MIN_HEADER_LEN {
                return Err(bad("header_length", h.header_length.into(), "qcow2 header too short"));
            }
            if u64::from(h.header_length) > cluster_size {
                return Err(bad("header_length", h.header_length.into(), "qcow2 header exceeds cluster size"));
            }
            if !h.header_length.is_multiple_of(8) {
                return Err(bad("header_length", h.header_length.into(), "must be a multiple of 8"));
            }
            let hl = h.header_length as usize;
            if buf.len() < hl {
                return Err(Error::corrupt("file too short for its header_length"));
            }
            if hl > off::COMPRESSION_TYPE {
                let ct = buf[off::COMPRESSION_TYPE];
                h.compression_type = match ct {
                    0 => CompressionType::Zlib,
                    1 => CompressionType::Zstd,
                    _ => return Err(bad("compression_type", ct.into(), "unknown compression type")),
                };
            }
            if hl > V3_HEADER_LEN as usize {
                h.unknown_tail = buf[V3_HEADER_LEN as usize..hl].to_vec();
            }
        }
        h.validate()?;
        Ok(h)
    }

    /// Checks every field against the format and QEMU's limits, in the
    /// order QEMU checks them and with its words (the first refusal is the
    /// one a user of either tool sees). The backing file name is checked
    /// with the header extensions, after these ([`super::HeaderCluster`]).
    pub fn validate(&self) -> Result<()> {
        let cs = self.cluster_size();
        if self.backing_file_offset > cs {
            return Err(bad("backing_file_offset", self.backing_file_offset, "Invalid backing file offset"));
        }
        if self.refcount_order > MAX_REFCOUNT_ORDER {
            return Err(bad("refcount_order", self.refcount_order.into(), "may not exceed 6"));
        }
        if self.version == 2 && self.refcount_order != 4 {
            return Err(bad("refcount_order", self.refcount_order.into(), "must be 4 for version 2"));
        }
        if self.crypt_method > 2 {
            return Err(bad("crypt_method", self.crypt_method.into(), "unknown encryption method"));
        }
        if self.size > MAX_VIRTUAL_SIZE {
            return Err(bad("size", self.size, "virtual size too large"));
        }
        let inc = self.incompatible_features;
        if inc & Incompatible::EXTENDED_L2 != 0 && self.cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS {
            return Err(bad(
                "cluster_bits",
                self.cluster_bits.into(),
                "extended L2 entries need clusters of at least 16 KiB",
            ));
        }
        let has_compression_bit = inc & Incompatible::COMPRESSION != 0;
        let non_default = self.compression_type != CompressionType::Zlib;
        if has_compression_bit && !non_default {
            return Err(bad("compression_type", 0, "compression type bit set but compression_type is deflate"));
        }
        if !has_compression_bit && non_default {
            return Err(bad(
                "compression_type",
                self.compression_type.to_u8().into(),
                "non-default compression type without the compression type bit",
            ));
        }
        if self.l1_entries_for(self.size) > i32::MAX as u64 {
            // QEMU's limit and words for a size no L1 table can map.
            return Err(bad("size", self.size, "Image is too big"));
        }
        let rt_bytes = u64::from(self.refcount_table_clusters) * cs;
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(bad(
                "refcount_table_clusters",
                self.refcount_table_clusters.into(),
                "Reference count table too large",
            ));
        }
        if self.refcount_table_clusters == 0 {
            return Err(bad("refcount_table_clusters", 0, "Image does not contain a reference count table"));
        }
        check_table("refcount_table_offset", "Reference count table", self.refcount_table_offset, cs, rt_bytes)?;
        if self.refcount_table_offset == 0 {
            return Err(bad("refcount_table_offset", 0, "refcount table overlaps the header"));
        }
        // The snapshot table's own size depends on its entries (checked
        // when it is read); here its count and offset, even with no
        // snapshot, by the 40 bytes each entry takes at least.
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(bad("nb_snapshots", self.nb_snapshots.into(), "Snapshot table too large"));
        }
        let sn_bytes = u64::from(self.nb_snapshots) * super::snapshot::FIXED_LEN as u64;
        check_table("snapshots_offset", "Snapshot table", self.snapshots_offset, cs, sn_bytes)?;
        if u64::from(self.l1_size) * 8 > MAX_L1_BYTES {
            return Err(bad("l1_size", self.l1_size.into(), "Active L1 table too large"));
        }
        check_table("l1_table_offset", "Active L1 table", self.l1_table_offset, cs, u64::from(self.l1_size) * 8)?;
        if self.l1_entries_for(self.size) > u64::from(self.l1_size) {
            return Err(bad("l1_size", self.l1_size.into(), "L1 table is too small"));
        }
        Ok(())
    }

    /// Checks where the backing file name lies (QEMU does so after reading
    /// the header extensions, which end where the name starts).
    pub fn validate_backing_name(&self) -> Result<()> {
        if self.backing_file_offset == 0 {
            return Ok(());
        }
        let room = self.cluster_size().saturating_sub(self.backing_file_offset);
        if u64::from(self.backing_file_size) > room.min(MAX_BACKING_NAME.into()) {
            return Err(bad("backing_file_size", self.backing_file_size.into(), "Backing file name too long"));
        }
        if self.backing_file_offset < u64::from(self.header_length) {
            return Err(bad(
                "backing_file_offset",
                self.backing_file_offset,
                "backing file name must lie in the first cluster after the header",
            ));
        }
        Ok(())
    }

    /// Refuses incompatible feature bits oxcow does not know, in QEMU's
    /// words: the names the image's feature name table gives them, in
    /// table order, then the bits without a name as one mask.
    pub fn check_incompatible(&self, names: &[super::FeatureName]) -> Result<()> {
        let mut unknown = self.incompatible_features & !Incompatible::KNOWN;
        if unknown == 0 {
            return Ok(());
        }
        let mut described = Vec::new();
        for n in names.iter().filter(|n| n.kind == 0 && n.bit < 64) {
            if unknown & (1u64 << n.bit) != 0 {
                described.push(n.name.clone());
                unknown &= !(1u64 << n.bit);
            }
        }
        if unknown != 0 {
            described.push(format!("Unknown incompatible feature: {unknown:x}"));
        }
        Err(Error::unsupported(format!("Unsupported qcow2 feature(s): {}", described.join(", "))))
    }

    /// Encodes the header alone (`header_length` bytes).
    pub fn encode(&self) -> Vec<u8> {
        let len = if self.version == 2 { V2_HEADER_LEN } else { self.header_length.max(V3_MIN_HEADER_LEN) };
        let mut b = vec![0u8; len as usize];
        b[..4].copy_from_slice(&MAGIC);
        put_u32(&mut b, off::VERSION, self.version);
        put_u64(&mut b, off::BACKING_FILE_OFFSET, self.backing_file_offset);
        put_u32(&mut b, off::BACKING_FILE_SIZE, self.backing_file_size);
        put_u32(&mut b, off::CLUSTER_BITS, self.cluster_bits);
        put_u64(&mut b, off::SIZE, self.size);
        put_u32(&mut b, off::CRYPT_METHOD, self.crypt_method);
        put_u32(&mut b, off::L1_SIZE, self.l1_size);
        put_u64(&mut b, off::L1_TABLE_OFFSET, self.l1_table_offset);
        put_u64(&mut b, off::REFCOUNT_TABLE_OFFSET, self.refcount_table_offset);
        put_u32(&mut b, off::REFCOUNT_TABLE_CLUSTERS, self.refcount_table_clusters);
        put_u32(&mut b, off::NB_SNAPSHOTS, self.nb_snapshots);
        put_u64(&mut b, off::SNAPSHOTS_OFFSET, self.snapshots_offset);
        if self.version >= 3 {
            put_u64(&mut b, off::INCOMPATIBLE_FEATURES, self.incompatible_features);
            put_u64(&mut b, off::COMPATIBLE_FEATURES, self.compatible_features);
            put_u64(&mut b, off::AUTOCLEAR_FEATURES, self.autoclear_features);
            put_u32(&mut b, off::REFCOUNT_ORDER, self.refcount_order);
            put_u32(&mut b, off::HEADER_LENGTH, len);
            if len as usize > off::COMPRESSION_TYPE {
                b[off::COMPRESSION_TYPE] = self.compression_type.to_u8();
            }
            if len > V3_HEADER_LEN {
                let tail = &mut b[V3_HEADER_LEN as usize..];
                let n = tail.len().min(self.unknown_tail.len());
                tail[..n].copy_from_slice(&self.unknown_tail[..n]);
            }
        }
        b
    }
}

/// A table must start on a cluster boundary and end below the 2^56 limit;
/// QEMU words both refusals alike, naming the table.
fn check_table(field: &'static str, name: &str, offset: u64, cluster_size: u64, bytes: u64) -> Result<()> {
    let misplaced = !offset.is_multiple_of(cluster_size);
    if misplaced || offset.checked_add(bytes).is_none_or(|end| end > MAX_HOST_OFFSET) {
        return Err(bad(field, offset, format!("{name} offset invalid")));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample(version: u32) -> Header {
        Header {
            version,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 3 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: if version == 2 { V2_HEADER_LEN } else { V3_HEADER_LEN },
            compression_type: CompressionType::Zlib,
            unknown_tail: Vec::new(),
        }
    }

    #[test]
    fn round_trip_v2_and_v3() {
        for v in [2, 3] {
            let h = sample(v);
            let b = h.encode();
            assert_eq!(Header::parse(&b).unwrap(), h);
        }
    }

    #[test]
    fn unknown_tail_is_preserved() {
        let mut h = sample(3);
        h.header_length = 128;
        h.unknown_tail = (1..=16).collect();
        let b = h.encode();
        assert_eq!(b.len(), 128);
        assert_eq!(Header::parse(&b).unwrap(), h);
    }

    fn field_of(e: Error) -> &'static str {
        match e {
            Error::InvalidField { field, .. } => field,
            other => panic!("expected a field error, got {other}"),
        }
    }

    #[test]
    fn each_limit_names_its_field() {
        type Mutation = Box<dyn Fn(&mut Header)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("cluster_bits", Box::new(|h| h.cluster_bits = 8)),
            ("cluster_bits", Box::new(|h| h.cluster_bits = 22)),
            ("refcount_order", Box::new(|h| h.refcount_order = 7)),
            ("l1_size", Box::new(|h| h.l1_size = (MAX_L1_BYTES / 8 + 1) as u32)),
            ("l1_size", Box::new(|h| h.l1_size = 1)),
            ("l1_table_offset", Box::new(|h| h.l1_table_offset = 4096)),
            ("refcount_table_offset", Box::new(|h| h.refcount_table_offset = 512)),
            ("refcount_table_clusters", Box::new(|h| h.refcount_table_clusters = 129)),
            ("refcount_table_clusters", Box::new(|h| h.refcount_table_clusters = 0)),
            ("nb_snapshots", Box::new(|h| h.nb_snapshots = MAX_SNAPSHOTS + 1)),
            ("snapshots_offset", Box::new(|h| h.snapshots_offset = 1)),
            (
                "backing_file_size",
                Box::new(|h| {
                    h.backing_file_offset = 512;
                    h.backing_file_size = 1024;
                }),
            ),
            (
                "backing_file_size",
                Box::new(|h| {
                    h.backing_file_offset = 65530;
                    h.backing_file_size = 100;
                }),
            ),
            ("backing_file_offset", Box::new(|h| h.backing_file_offset = 65537)),
            ("backing_file_offset", Box::new(|h| h.backing_file_offset = 64)),
            ("crypt_method", Box::new(|h| h.crypt_method = 3)),
            ("size", Box::new(|h| h.size = u64::MAX)),
            ("header_length", Box::new(|h| h.header_length = 108)),
            ("compression_type", Box::new(|h| h.incompatible_features |= Incompatible::COMPRESSION)),
        ];
        for (field, mutate) in cases {
            let mut h = sample(3);
            mutate(&mut h);
            let mut b = h.encode();
            if field == "header_length" {
                put_u32(&mut b, off::HEADER_LENGTH, h.header_length);
            }
            b.resize(1 << 16, 0);
            let r = Header::parse(&b).and_then(|h| h.validate_backing_name());
            assert_eq!(field_of(r.unwrap_err()), field, "case {field}");
        }
    }

    /// The first refusal, as QEMU's iotest 080 shows it: its order and
    /// words.
    #[test]
    fn refusals_in_qemus_order_and_words() {
        type Mutation = Box<dyn Fn(&mut Header)>;
        let reason = |mutate: Mutation| {
            let mut h = sample(3);
            mutate(&mut h);
            let mut b = h.encode();
            b.resize(1 << 16, 0);
            match Header::parse(&b).and_then(|h| h.validate_backing_name()).unwrap_err() {
                Error::InvalidField { reason, .. } => reason,
                other => panic!("expected a field error, got {other}"),
            }
        };
        let cases: Vec<(&str, Mutation)> = vec![
            ("Invalid backing file offset", Box::new(|h| h.backing_file_offset = u64::MAX)),
            ("Reference count table too large", Box::new(|h| h.refcount_table_clusters = u32::MAX)),
            ("Reference count table offset invalid", Box::new(|h| h.refcount_table_offset = 0x1234_5678_90ab_cdef)),
            (
                "Reference count table offset invalid",
                Box::new(|h| {
                    h.refcount_table_offset = 0xffff_ffff_ffff_0000;
                    h.refcount_table_clusters = 127;
                }),
            ),
            ("Snapshot table too large", Box::new(|h| h.nb_snapshots = u32::MAX)),
            (
                "Snapshot table offset invalid",
                Box::new(|h| {
                    h.snapshots_offset = 0xffff_ffff_ffff_0000;
                    h.nb_snapshots = 0xffff;
                }),
            ),
            // No snapshot, yet a misaligned table offset.
            ("Snapshot table offset invalid", Box::new(|h| h.snapshots_offset = 0x1234_5678_90ab_cdef)),
            ("Active L1 table too large", Box::new(|h| h.l1_size = u32::MAX)),
            ("Active L1 table offset invalid", Box::new(|h| h.l1_table_offset = 0x1234_5678_90ab_cdef)),
            ("L1 table is too small", Box::new(|h| h.l1_size = 0)),
            (
                "Backing file name too long",
                Box::new(|h| {
                    h.backing_file_offset = 4096;
                    h.backing_file_size = u32::MAX;
                }),
            ),
        ];
        for (want, mutate) in cases {
            assert_eq!(reason(mutate), want);
        }
    }

    #[test]
    fn unknown_incompatible_bit_uses_feature_table_name() {
        let mut h = sample(3);
        h.incompatible_features |= 1 << 40;
        let names = [super::super::FeatureName { kind: 0, bit: 40, name: "frobnication".into() }];
        let msg = h.check_incompatible(&names).unwrap_err().to_string();
        assert!(msg.contains("frobnication"), "{msg}");
        let msg = h.check_incompatible(&[]).unwrap_err().to_string();
        assert!(msg.contains("10000000000"), "{msg}");
        // QEMU's iotest 036: named bits in table order, the rest as one mask.
        h.incompatible_features |= 3 << 61;
        let names = [
            super::super::FeatureName { kind: 0, bit: 62, name: "test2".into() },
            super::super::FeatureName { kind: 0, bit: 40, name: "test1".into() },
        ];
        let msg = h.check_incompatible(&names).unwrap_err().to_string();
        assert!(
            msg.ends_with("Unsupported qcow2 feature(s): test2, test1, Unknown incompatible feature: 2000000000000000"),
            "{msg}"
        );
    }

    #[test]
    fn truncated_headers_are_errors() {
        let b = sample(3).encode();
        for n in 0..b.len() {
            assert!(Header::parse(&b[..n]).is_err());
        }
    }
}
