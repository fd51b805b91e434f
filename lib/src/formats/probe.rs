//! Format probing as QEMU does it: every driver scores the first 2 KiB of
//! the file (zero-padded past its end) and the highest score wins, raw
//! (score 1) only when nobody else claims the file.
//!
//! The scores and rules are QEMU's facts: a magic at offset 0 scores 100
//! (qcow2 from version 2 on, qcow version 1, QED, VPC's "conectix" — so a
//! fixed VHD, whose footer is only at the end, probes as raw, as in QEMU —,
//! VHDX, VMDK's binary magics or a text descriptor whose first meaningful
//! line is `version=1|2|3`, LUKS version 1, Bochs, Parallels), VDI's
//! signature at offset 64 scores 100, and cloop's shell header and a name
//! ending in `.dmg` score 2. Formats oxcow does not read are still
//! recognised, so that none of them is ever opened as raw.

use crate::image::Format;

/// How many bytes QEMU probes.
pub const PROBE_BYTES: usize = 2048;

/// The outcome of probing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probed {
    /// A format oxcow opens.
    Format(Format),
    /// A format QEMU recognises and oxcow does not read (its QEMU name).
    Unsupported(&'static str),
}

fn starts(buf: &[u8], magic: &[u8]) -> bool {
    buf.len() >= magic.len() && &buf[..magic.len()] == magic
}

/// A NUL-terminated string field equal to `want` (C `strcmp` on a fixed
/// field).
fn cstr_is(buf: &[u8], off: usize, len: usize, want: &[u8]) -> bool {
    let Some(field) = buf.get(off..off + len) else { return false };
    let end = field.iter().position(|&b| b == 0).unwrap_or(len);
    &field[..end] == want
}

/// VMDK's text descriptor rule: comment lines (`#`) and lines of spaces
/// may come first; the first other line must be `version=1`, `2` or `3`.
fn vmdk_text(buf: &[u8]) -> bool {
    let end = buf.len();
    let mut p = 0;
    while p < end {
        if buf[p] == b'#' {
            while p < end && buf[p] != b'\n' {
                p += 1;
            }
            p += 1;
            continue;
        }
        if buf[p] == b' ' {
            while p < end && buf[p] == b' ' {
                p += 1;
            }
            if p < end && buf[p] == b'\r' {
                p += 1;
            }
            if p == end || buf[p] != b'\n' {
                return false;
            }
            p += 1;
            continue;
        }
        let rest = &buf[p..];
        return [b'1', b'2', b'3'].iter().any(|v| {
            let mut lf = b"version=X\n".to_vec();
            lf[8] = *v;
            let mut crlf = b"version=X\r\n".to_vec();
            crlf[8] = *v;
            starts(rest, &lf) || starts(rest, &crlf)
        });
    }
    false
}

/// The score each format gives `head` (the file's first bytes, at most
/// [`PROBE_BYTES`]) named `filename`, highest first in QEMU's order.
fn scores(head: &[u8], filename: &str) -> [(Probed, u32); 12] {
    let mut buf = [0u8; PROBE_BYTES];
    let n = head.len().min(PROBE_BYTES);
    buf[..n].copy_from_slice(&head[..n]);
    let be32 = |o: usize| super::be32(&buf, o);
    let le32 = |o: usize| super::le32(&buf, o);
    let score = |hit: bool, s: u32| if hit { s } else { 0 };
    let qfi = starts(&buf, b"QFI\xfb");
    [
        (Probed::Format(Format::Qcow2), score(qfi && be32(4) >= 2, 100)),
        (Probed::Unsupported("qcow"), score(qfi && be32(4) == 1, 100)),
        (Probed::Format(Format::Qed), score(starts(&buf, b"QED\0"), 100)),
        (Probed::Format(Format::Vdi), score(le32(64) == 0xbeda_107f, 100)),
        (Probed::Format(Format::Vpc), score(starts(&buf, b"conectix"), 100)),
        (Probed::Format(Format::Vhdx), score(starts(&buf, b"vhdxfile"), 100)),
        (Probed::Format(Format::Vmdk), score(starts(&buf, b"COWD") || starts(&buf, b"KDMV") || vmdk_text(&buf), 100)),
        (Probed::Unsupported("luks"), score(starts(&buf, b"LUKS\xba\xbe") && super::be16(&buf, 6) == 1, 100)),
        (
            Probed::Unsupported("bochs"),
            score(
                cstr_is(&buf, 0, 32, b"Bochs Virtual HD Image")
                    && cstr_is(&buf, 32, 16, b"Redolog")
                    && (cstr_is(&buf, 48, 16, b"Growing"))
                    && matches!(le32(64), 0x0002_0000 | 0x0001_0000),
                100,
            ),
        ),
        (
            Probed::Unsupported("parallels"),
            score((starts(&buf, b"WithoutFreeSpace") || starts(&buf, b"WithouFreSpacExt")) && le32(16) == 2, 100),
        ),
        (
            Probed::Unsupported("cloop"),
            score(
                starts(&buf, b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"),
                2,
            ),
        ),
        (Probed::Unsupported("dmg"), score(filename.len() > 4 && filename.ends_with(".dmg"), 2)),
    ]
}

/// Probes a file from its first bytes (`head`, at most [`PROBE_BYTES`]
/// are looked at) and its name; an empty file is raw, as in QEMU.
pub fn probe(head: &[u8], filename: &str) -> Probed {
    let mut best = (Probed::Format(Format::Raw), 1);
    if head.is_empty() {
        return best.0;
    }
    for (p, s) in scores(head, filename) {
        // Ties go to the first driver, as QEMU's strict comparison does.
        if s > best.1 {
            best = (p, s);
        }
    }
    best.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magics_probe_as_their_format_and_anything_else_as_raw() {
        assert_eq!(probe(b"QFI\xfb\0\0\0\x03", "x"), Probed::Format(Format::Qcow2));
        assert_eq!(probe(b"QFI\xfb\0\0\0\x01", "x"), Probed::Unsupported("qcow"));
        assert_eq!(probe(b"QFI\xfb\0\0\0\0", "x"), Probed::Format(Format::Raw));
        assert_eq!(probe(b"QED\0", "x"), Probed::Format(Format::Qed));
        assert_eq!(probe(b"conectix", "x"), Probed::Format(Format::Vpc));
        assert_eq!(probe(b"vhdxfile", "x"), Probed::Format(Format::Vhdx));
        assert_eq!(probe(b"KDMV", "x"), Probed::Format(Format::Vmdk));
        assert_eq!(probe(b"# c\n   \r\nversion=1\r\n", "x"), Probed::Format(Format::Vmdk));
        assert_eq!(probe(b"\nversion=1\n", "x"), Probed::Format(Format::Raw));
        assert_eq!(probe(b"version=4\n", "x"), Probed::Format(Format::Raw));
        let mut vdi = vec![0u8; 512];
        vdi[64..68].copy_from_slice(&0xbeda_107fu32.to_le_bytes());
        assert_eq!(probe(&vdi, "x"), Probed::Format(Format::Vdi));
        assert_eq!(probe(&[0u8; 100], "a.dmg"), Probed::Unsupported("dmg"));
        assert_eq!(probe(&[0u8; 100], ".dmg"), Probed::Format(Format::Raw));
        assert_eq!(probe(b"", "a.dmg"), Probed::Format(Format::Raw));
    }
}
