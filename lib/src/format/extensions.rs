//! Header extensions, between the header and the end of cluster 0.
//!
//! ```text
//!  each extension:          feature name table entry (48 bytes):
//!   0  4  type               0   1  kind (0 incompat, 1 compat, 2 autoclear)
//!   4  4  length             1   1  bit number
//!   8  n  data               2  46  name, zero padded
//!   8+n   zero padding to a multiple of 8
//!
//!  bitmaps extension (24 bytes):       FDE pointer (16 bytes):
//!   0  4  nb_bitmaps                     0  8  offset
//!   4  4  reserved (0)                   8  8  length
//!   8  8  bitmap_directory_size
//!  16  8  bitmap_directory_offset
//! ```

use super::be::{pad8, put_u32, put_u64, u32_at, u64_at};
use super::header::Header;
use super::limits::{MAX_BITMAPS, MAX_BITMAP_DIRECTORY_BYTES, MAX_EXT_STRING};
use crate::{Error, Result};

/// Extension type codes.
#[allow(missing_docs)]
pub mod kind {
    pub const END: u32 = 0;
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    pub const FEATURE_NAMES: u32 = 0x6803_f857;
    pub const BITMAPS: u32 = 0x2385_2875;
    pub const FDE: u32 = 0x0537_be77;
    pub const DATA_FILE: u32 = 0x4441_5441;
}

/// Size of one feature name table entry.
pub const FEATURE_NAME_ENTRY: usize = 48;
/// Size of the bitmaps extension data.
pub const BITMAPS_EXT_LEN: usize = 24;
/// Size of the full-disk-encryption pointer extension data.
pub const FDE_EXT_LEN: usize = 16;

/// One entry of the feature name table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// Bit number within that bitmap.
    pub bit: u8,
    /// Human-readable name.
    pub name: String,
}

/// The bitmaps extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Number of bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Size of the bitmap directory in bytes.
    pub directory_size: u64,
    /// Host offset of the bitmap directory.
    pub directory_offset: u64,
}

/// Pointer to a full-disk-encryption (LUKS) header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdeExt {
    /// Host offset of the encryption header.
    pub offset: u64,
    /// Its length in bytes.
    pub length: u64,
}

/// An extension oxcow does not interpret, kept verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    /// Its type code.
    pub kind: u32,
    /// Its data (without padding).
    pub data: Vec<u8>,
}

/// All header extensions of an image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extensions {
    /// Format of the backing file ("qcow2", "raw", ...).
    pub backing_format: Option<String>,
    /// Names of feature bits.
    pub feature_names: Vec<FeatureName>,
    /// The bitmaps extension.
    pub bitmaps: Option<BitmapsExt>,
    /// Full-disk-encryption header pointer.
    pub fde: Option<FdeExt>,
    /// External data file name.
    pub data_file: Option<String>,
    /// Unknown extensions, preserved in order.
    pub unknown: Vec<Extension>,
}

fn string_ext(what: &'static str, data: &[u8], at: u64) -> Result<String> {
    if data.len() > MAX_EXT_STRING {
        return Err(Error::field(what, data.len() as u64, "header extension string too long"));
    }
    String::from_utf8(data.to_vec()).map_err(|_| Error::corrupt_at(format!("{what} is not valid UTF-8"), at))
}

impl Extensions {
    /// Parses the extension area: `area` holds cluster 0 from the end of the
    /// header up to where the extensions must stop (the backing file name or
    /// the end of the cluster); `base` is the file offset of `area[0]`.
    pub fn parse(area: &[u8], base: u64) -> Result<Extensions> {
        let mut exts = Extensions::default();
        let mut pos = 0usize;
        let mut seen: Vec<u32> = Vec::new();
        while pos < area.len() {
            // QEMU's words for an extension, or its 8-byte head, that does
            // not fit in the area.
            let too_large = |len: u64| Error::field("header extension length", len, "Header extension too large");
            if area.len() - pos < 8 {
                return Err(too_large(0));
            }
            let ty = u32_at(area, pos);
            let len = u32_at(area, pos + 4) as usize;
            let at = base + pos as u64;
            pos += 8;
            if ty == kind::END {
                return Ok(exts);
            }
            if len > area.len() - pos {
                return Err(too_large(len as u64));
            }
            let data = &area[pos..pos + len];
            // QEMU takes the last backing format given (older qemu-img
            // appended one instead of replacing it; iotest 114).
            if ty != kind::FEATURE_NAMES && ty != kind::BACKING_FORMAT && seen.contains(&ty) && is_known(ty) {
                return Err(Error::corrupt_at(format!("header extension {ty:#x} appears twice"), at));
            }
            seen.push(ty);
            match ty {
                kind::BACKING_FORMAT => exts.backing_format = Some(string_ext("backing format", data, at)?),
                kind::DATA_FILE => exts.data_file = Some(string_ext("data file name", data, at)?),
                kind::FEATURE_NAMES => {
                    // A short last entry counts, its name cut short, as
                    // QEMU reads the table into a zero-padded buffer.
                    for e in data.chunks(FEATURE_NAME_ENTRY).filter(|e| e.len() > 2) {
                        let raw = &e[2..];
                        let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
                        exts.feature_names.push(FeatureName {
                            kind: e[0],
                            bit: e[1],
                            name: String::from_utf8_lossy(&raw[..end]).into_owned(),
                        });
                    }
                }
                kind::BITMAPS => {
                    if len != BITMAPS_EXT_LEN {
                        return Err(Error::field("bitmaps extension length", len as u64, "must be 24"));
                    }
                    let b = BitmapsExt {
                        nb_bitmaps: u32_at(data, 0),
                        directory_size: u64_at(data, 8),
                        directory_offset: u64_at(data, 16),
                    };
                    if u32_at(data, 4) != 0 {
                        return Err(Error::field("bitmaps extension reserved", u32_at(data, 4).into(), "must be zero"));
                    }
                    if b.nb_bitmaps == 0 || b.nb_bitmaps > MAX_BITMAPS {
                        return Err(Error::field("nb_bitmaps", b.nb_bitmaps.into(), "must be between 1 and 65535"));
                    }
                    if b.directory_size > MAX_BITMAP_DIRECTORY_BYTES {
                        return Err(Error::field(
                            "bitmap_directory_size",
                            b.directory_size,
                            "bitmap directory too large",
                        ));
                    }
                    exts.bitmaps = Some(b);
                }
                kind::FDE => {
                    if len != FDE_EXT_LEN {
                        return Err(Error::field("encryption header extension length", len as u64, "must be 16"));
                    }
                    exts.fde = Some(FdeExt { offset: u64_at(data, 0), length: u64_at(data, 8) });
                }
                _ => exts.unknown.push(Extension { kind: ty, data: data.to_vec() }),
            }
            pos = pad8(pos + len).min(area.len());
        }
        // No end marker before the area ran out: QEMU accepts this.
        Ok(exts)
    }

    /// Encodes all extensions plus the end marker.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut push = |ty: u32, data: &[u8]| {
            let mut head = [0u8; 8];
            put_u32(&mut head, 0, ty);
            put_u32(&mut head, 4, data.len() as u32);
            out.extend_from_slice(&head);
            out.extend_from_slice(data);
            out.resize(pad8(out.len()), 0);
        };
        if let Some(f) = &self.backing_format {
            push(kind::BACKING_FORMAT, f.as_bytes());
        }
        if let Some(f) = &self.data_file {
            push(kind::DATA_FILE, f.as_bytes());
        }
        // QEMU's order: the encryption pointer before the feature table.
        if let Some(f) = &self.fde {
            let mut d = [0u8; FDE_EXT_LEN];
            put_u64(&mut d, 0, f.offset);
            put_u64(&mut d, 8, f.length);
            push(kind::FDE, &d);
        }
        if !self.feature_names.is_empty() {
            let mut t = Vec::new();
            for n in &self.feature_names {
                let mut e = [0u8; FEATURE_NAME_ENTRY];
                e[0] = n.kind;
                e[1] = n.bit;
                let name = n.name.as_bytes();
                let k = name.len().min(FEATURE_NAME_ENTRY - 2);
                e[2..2 + k].copy_from_slice(&name[..k]);
                t.extend_from_slice(&e);
            }
            push(kind::FEATURE_NAMES, &t);
        }
        if let Some(b) = &self.bitmaps {
            let mut d = [0u8; BITMAPS_EXT_LEN];
            put_u32(&mut d, 0, b.nb_bitmaps);
            put_u64(&mut d, 8, b.directory_size);
            put_u64(&mut d, 16, b.directory_offset);
            push(kind::BITMAPS, &d);
        }
        for u in &self.unknown {
            push(u.kind, &u.data);
        }
        push(kind::END, &[]);
        out
    }

    /// The feature name table QEMU writes into v3 images, so that older
    /// tools can name the features they refuse.
    pub fn standard_feature_names() -> Vec<FeatureName> {
        let n = |kind, bit, name: &str| FeatureName { kind, bit, name: name.to_string() };
        vec![
            n(0, 0, "dirty bit"),
            n(0, 1, "corrupt bit"),
            n(0, 2, "external data file"),
            n(0, 3, "compression type"),
            n(0, 4, "extended L2 entries"),
            n(1, 0, "lazy refcounts"),
            n(2, 0, "bitmaps"),
            n(2, 1, "raw external data"),
        ]
    }
}

fn is_known(ty: u32) -> bool {
    matches!(ty, kind::BACKING_FORMAT | kind::BITMAPS | kind::FDE | kind::DATA_FILE)
}

/// Everything stored in cluster 0: header, extensions and backing file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderCluster {
    /// The header proper.
    pub header: Header,
    /// Its extensions.
    pub extensions: Extensions,
    /// The backing file name, when there is one.
    pub backing_file: Option<String>,
}

impl HeaderCluster {
    /// Parses cluster 0 (or the whole file if shorter).
    pub fn parse(buf: &[u8]) -> Result<HeaderCluster> {
        let header = Header::parse(buf)?;
        let cs = header.cluster_size() as usize;
        let cluster0 = &buf[..buf.len().min(cs)];
        let hl = header.header_length as usize;
        // The extensions end where the backing file name starts, or with
        // the cluster (the header checked that the name starts within
        // it). A file that ends sooner reads as zeros there, as QEMU
        // reads it (zeros end the extensions).
        let ext_end = if header.backing_file_offset != 0 { header.backing_file_offset as usize } else { cs };
        // v2 images may carry extensions too (backing format).
        let extensions = if ext_end > hl {
            let mut area = cluster0[hl.min(cluster0.len())..ext_end.min(cluster0.len())].to_vec();
            area.resize(ext_end - hl, 0);
            Extensions::parse(&area, hl as u64)?
        } else {
            Extensions::default()
        };
        header.check_incompatible(&extensions.feature_names)?;
        // As QEMU: the name is checked after the extensions are read.
        header.validate_backing_name()?;
        let mut backing_file = None;
        if header.backing_file_offset != 0 {
            let start = header.backing_file_offset as usize;
            let end = start + header.backing_file_size as usize;
            if end > cluster0.len() {
                return Err(Error::corrupt("file too short for its backing file name"));
            }
            let name = String::from_utf8(cluster0[start..end].to_vec())
                .map_err(|_| Error::corrupt_at("backing file name is not valid UTF-8", start as u64))?;
            backing_file = Some(name);
        }
        Ok(HeaderCluster { header, extensions, backing_file })
    }

    /// Encodes cluster 0's used bytes, placing the backing file name after
    /// the extensions and filling in its offset and size.
    pub fn encode(&self) -> Result<Vec<u8>> {
        match self.encode_exact() {
            // The feature name table is optional: small clusters leave no
            // room for it (QEMU drops it too).
            Err(_) if !self.extensions.feature_names.is_empty() => {
                let mut slim = self.clone();
                slim.extensions.feature_names.clear();
                slim.encode_exact()
            }
            r => r,
        }
    }

    fn encode_exact(&self) -> Result<Vec<u8>> {
        let mut h = self.header.clone();
        let exts = self.extensions.encode();
        let head_len = h.encode().len();
        let name_at = head_len + exts.len();
        match &self.backing_file {
            Some(name) => {
                if name.len() > super::limits::MAX_BACKING_NAME as usize {
                    return Err(Error::invalid("backing file name too long (over 1023 bytes)"));
                }
                h.backing_file_offset = name_at as u64;
                h.backing_file_size = name.len() as u32;
            }
            None => {
                h.backing_file_offset = 0;
                h.backing_file_size = 0;
            }
        }
        let mut out = h.encode();
        out.extend_from_slice(&exts);
        if let Some(name) = &self.backing_file {
            out.extend_from_slice(name.as_bytes());
        }
        if out.len() as u64 > h.cluster_size() {
            return Err(Error::invalid("header, extensions and backing file name do not fit in the first cluster"));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_all_extensions() {
        let e = Extensions {
            backing_format: Some("qcow2".into()),
            feature_names: Extensions::standard_feature_names(),
            bitmaps: Some(BitmapsExt { nb_bitmaps: 2, directory_size: 80, directory_offset: 1 << 20 }),
            fde: Some(FdeExt { offset: 1 << 16, length: 4096 }),
            data_file: Some("data.raw".into()),
            unknown: vec![Extension { kind: 0x1234_5678, data: vec![1, 2, 3] }],
        };
        let b = e.encode();
        assert_eq!(b.len() % 8, 0);
        assert_eq!(Extensions::parse(&b, 112).unwrap(), e);
    }

    /// iotest 114: an image with a second backing format extension
    /// (appended by qcow2.py, as old qemu-img did) opens with the last.
    #[test]
    fn repeated_backing_format_extension_takes_the_last() {
        let mut b = Extensions { backing_format: Some("raw".into()), ..Default::default() }.encode();
        b.truncate(b.len() - 8);
        b.extend(Extensions { backing_format: Some("foo".into()), ..Default::default() }.encode());
        assert_eq!(Extensions::parse(&b, 0).unwrap().backing_format.as_deref(), Some("foo"));
        let data = Extensions { data_file: Some("d".into()), ..Default::default() }.encode();
        let mut twice = data[..data.len() - 8].to_vec();
        twice.extend(&data);
        assert!(Extensions::parse(&twice, 0).is_err(), "other known extensions stay unique");
    }

    #[test]
    fn overlong_extension_is_an_error() {
        let mut b = vec![0u8; 32];
        put_u32(&mut b, 0, kind::BACKING_FORMAT);
        put_u32(&mut b, 4, 1000);
        assert!(Extensions::parse(&b, 0).is_err());
    }

    #[test]
    fn bitmaps_extension_limits() {
        for (nb, size) in [(0u32, 8u64), (MAX_BITMAPS + 1, 8), (1, MAX_BITMAP_DIRECTORY_BYTES + 1)] {
            let e = Extensions {
                bitmaps: Some(BitmapsExt { nb_bitmaps: nb, directory_size: size, directory_offset: 0 }),
                ..Default::default()
            };
            assert!(Extensions::parse(&e.encode(), 0).is_err());
        }
    }
}
