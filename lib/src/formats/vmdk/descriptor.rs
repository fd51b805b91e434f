//! VMDK text descriptors: `key=value` lines and extent lines
//! (`RW 131072 SPARSE "disk-s001.vmdk"`, `RW 4192256 FLAT "disk-f001.vmdk" 0`).

use crate::{Error, Result};

/// The create types QEMU opens.
pub const CREATE_TYPES: &[&str] = &[
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
    "vmfs",
    "vmfsSparse",
];

/// How an extent stores its sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Sectors as they are, from an offset of the file.
    Flat,
    /// A hosted sparse file (its own header and grain tables).
    Sparse,
    /// No file: zeros.
    Zero,
}

/// One extent line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentLine {
    /// The type as written (FLAT, SPARSE, VMFS, VMFSSPARSE, ZERO).
    pub type_name: String,
    /// How it stores data.
    pub kind: ExtentKind,
    /// Size in sectors.
    pub sectors: u64,
    /// File name, relative to the descriptor's directory.
    pub file: String,
    /// Start of the data in a flat file, in sectors.
    pub offset: u64,
}

/// A parsed descriptor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// `createType`.
    pub create_type: String,
    /// `CID`, hexadecimal in the file.
    pub cid: u32,
    /// `parentCID`.
    pub parent_cid: u32,
    /// `parentFileNameHint`, the backing file.
    pub parent: Option<String>,
    /// The extents in order.
    pub extents: Vec<ExtentLine>,
}

fn unquote(v: &str) -> &str {
    let v = v.trim();
    v.strip_prefix('"').and_then(|s| s.strip_suffix('"')).unwrap_or(v)
}

fn parse_extent(line: &str) -> Result<Option<ExtentLine>> {
    let mut words = line.splitn(3, char::is_whitespace);
    let (Some(access), Some(size), Some(rest)) = (words.next(), words.next(), words.next()) else { return Ok(None) };
    if !matches!(access, "RW" | "RDONLY" | "NOACCESS") {
        return Ok(None);
    }
    let bad = || Error::invalid(format!("Invalid extent line: {line}"));
    let sectors: u64 = size.parse().map_err(|_| bad())?;
    let rest = rest.trim_start();
    let (type_name, rest) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let kind = match type_name {
        "FLAT" | "VMFS" => ExtentKind::Flat,
        "SPARSE" | "VMFSSPARSE" => ExtentKind::Sparse,
        "ZERO" => ExtentKind::Zero,
        other => return Err(Error::unsupported(format!("Unsupported extent type '{other}'"))),
    };
    let rest = rest.trim();
    let (file, tail) = if kind == ExtentKind::Zero && rest.is_empty() {
        (String::new(), "")
    } else {
        let r = rest.strip_prefix('"').ok_or_else(bad)?;
        let end = r.find('"').ok_or_else(bad)?;
        (r[..end].to_string(), r[end + 1..].trim())
    };
    let offset = match (kind, tail) {
        (ExtentKind::Flat, "") => return Err(bad()),
        (ExtentKind::Flat, t) => t.parse().map_err(|_| bad())?,
        _ => 0,
    };
    if sectors == 0 {
        return Err(bad());
    }
    Ok(Some(ExtentLine { type_name: type_name.to_string(), kind, sectors, file, offset }))
}

impl Descriptor {
    /// Parses descriptor text (NULs end it, as in an embedded descriptor).
    pub fn parse(text: &[u8]) -> Result<Descriptor> {
        let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
        let text = String::from_utf8_lossy(&text[..end]);
        let mut d = Descriptor { cid: 0, parent_cid: u32::MAX, ..Descriptor::default() };
        let mut have_type = false;
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some((k, v)) = line.split_once('=') {
                let v = unquote(v);
                match k.trim() {
                    "createType" => {
                        d.create_type = v.to_string();
                        have_type = true;
                    }
                    "CID" => d.cid = u32::from_str_radix(v, 16).unwrap_or(0),
                    "parentCID" => d.parent_cid = u32::from_str_radix(v, 16).unwrap_or(u32::MAX),
                    "parentFileNameHint" if !v.is_empty() => d.parent = Some(v.to_string()),
                    _ => {}
                }
                continue;
            }
            if let Some(e) = parse_extent(line)? {
                d.extents.push(e);
            }
        }
        if !have_type {
            return Err(Error::invalid("invalid VMDK image descriptor"));
        }
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extent_lines_parse() {
        let d = Descriptor::parse(
            b"# Disk\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"twoGbMaxExtentFlat\"\n\
              RW 8192 FLAT \"a-f001.vmdk\" 0\nRDONLY 16 ZERO\nRW 4 SPARSE \"b c.vmdk\"\n",
        )
        .unwrap();
        assert_eq!(d.cid, 0xffff_fffe);
        assert_eq!(d.extents.len(), 3);
        assert_eq!(d.extents[0].kind, ExtentKind::Flat);
        assert_eq!(d.extents[1].kind, ExtentKind::Zero);
        assert_eq!(d.extents[2].file, "b c.vmdk");
        assert!(Descriptor::parse(b"version=1\nRW 1 FLAT \"x\"\n").is_err());
    }
}
