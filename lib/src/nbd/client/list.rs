//! Listing a server's exports (`qemu-nbd -L`): `NBD_OPT_LIST` for the
//! names, then `NBD_OPT_INFO` and `NBD_OPT_LIST_META_CONTEXT` for each,
//! and `NBD_OPT_ABORT`. No export is entered, so asking for extended
//! headers is safe even though transmission here never uses them: the
//! answer only tells which transaction size the server would use.

use super::conn::{greet, open_socket, option_replies, refusal, reply_error_text, send_option, NbdAddr};
use crate::nbd::proto::*;
use crate::nbd::tls::{Socket, TlsClient};
use std::io;
use std::time::Duration;

/// Transmission flag names as qemu-nbd prints them, by bit.
const FLAG_NAMES: [(u16, &str); 12] = [
    (FLAG_READ_ONLY, "readonly"),
    (FLAG_SEND_FLUSH, "flush"),
    (FLAG_SEND_FUA, "fua"),
    (FLAG_ROTATIONAL, "rotational"),
    (FLAG_SEND_TRIM, "trim"),
    (FLAG_SEND_WRITE_ZEROES, "zeroes"),
    (FLAG_SEND_DF, "df"),
    (FLAG_CAN_MULTI_CONN, "multi"),
    (FLAG_SEND_RESIZE, "resize"),
    (FLAG_SEND_CACHE, "cache"),
    (FLAG_SEND_FAST_ZERO, "fast-zero"),
    (1 << 12, "block-status-payload"),
];

/// What a server says about one of its exports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportListing {
    /// Export name.
    pub name: String,
    /// Description (empty when the server gives none).
    pub description: String,
    /// Size and transmission flags, when the server answered `NBD_OPT_INFO`.
    pub size_flags: Option<(u64, u16)>,
    /// Minimum, preferred and maximum block sizes, when given.
    pub block_sizes: Option<(u32, u32, u32)>,
    /// Whether the server agreed to extended headers (64-bit transactions).
    pub extended: bool,
    /// Metadata contexts the export offers.
    pub contexts: Vec<String>,
}

impl ExportListing {
    /// The export described in `qemu-nbd -L`'s words (lines ending in
    /// newlines).
    pub fn render(&self) -> String {
        let mut s = format!(" export: '{}'\n", self.name);
        if !self.description.is_empty() {
            s += &format!("  description: {}\n", self.description);
        }
        if let Some((size, flags)) = self.size_flags {
            s += &format!("  size:  {size}\n  flags: 0x{flags:x} (");
            for (bit, name) in FLAG_NAMES {
                if flags & bit != 0 {
                    s += &format!(" {name}");
                }
            }
            s += " )\n";
        }
        if let Some((min, opt, max)) = self.block_sizes {
            s += &format!("  min block: {min}\n  opt block: {opt}\n  max block: {max}\n");
        }
        s += &format!("  transaction size: {}\n", if self.extended { "64-bit" } else { "32-bit" });
        if !self.contexts.is_empty() {
            s += &format!("  available meta contexts: {}\n", self.contexts.len());
            for c in &self.contexts {
                s += &format!("   {c}\n");
            }
        }
        s
    }
}

/// The whole listing in `qemu-nbd -L`'s words.
pub fn render_listing(exports: &[ExportListing]) -> String {
    let mut s = format!("exports available: {}\n", exports.len());
    for e in exports {
        s += &e.render();
    }
    s
}

fn failed(what: &str, t: u32, data: &[u8]) -> io::Error {
    io::Error::other(format!("{what}: {}", reply_error_text(t, data)))
}

/// Lists the exports of the server at `addr` (over TLS with `tls`).
pub fn list_exports(addr: &NbdAddr, tls: Option<&TlsClient>, timeout: Duration) -> io::Result<Vec<ExportListing>> {
    let mut s = open_socket(addr, timeout)?;
    s.set_read_timeout_socket(Some(timeout))?;
    s.set_write_timeout_socket(Some(timeout))?;
    let host = match addr {
        NbdAddr::Tcp { host, .. } => Some(host.as_str()),
        NbdAddr::Unix(_) => None,
    };
    greet(&mut s, tls.map(|t| (t, host)))?;
    send_option(&mut s, OPT_EXTENDED_HEADERS, &[])?;
    let extended = option_replies(&mut s, OPT_EXTENDED_HEADERS)?.last().is_some_and(|(t, _)| *t == REP_ACK);
    let structured = extended || {
        send_option(&mut s, OPT_STRUCTURED_REPLY, &[])?;
        option_replies(&mut s, OPT_STRUCTURED_REPLY)?.last().is_some_and(|(t, _)| *t == REP_ACK)
    };

    send_option(&mut s, OPT_LIST, &[])?;
    let replies = option_replies(&mut s, OPT_LIST)?;
    let mut exports = Vec::new();
    match replies.last() {
        Some((t, _)) if *t == REP_ACK => {
            for (t, d) in &replies {
                if *t != REP_SERVER || d.len() < 4 {
                    continue;
                }
                let n = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize;
                let name = d.get(4..4 + n).ok_or_else(|| io::Error::other("malformed export list entry"))?;
                exports.push(ExportListing {
                    name: String::from_utf8_lossy(name).into_owned(),
                    description: String::from_utf8_lossy(&d[4 + n..]).into_owned(),
                    ..Default::default()
                });
            }
        }
        // A server that will not list still serves its default export.
        Some((t, _)) if *t == REP_ERR_UNSUP => exports.push(ExportListing::default()),
        Some((t, d)) => {
            return Err(refusal(&mut s, OPT_LIST, *t, d).unwrap_or_else(|| failed("Error listing exports", *t, d)));
        }
        None => return Err(io::Error::other("no reply to NBD_OPT_LIST")),
    }

    for e in &mut exports {
        e.extended = extended;
        let req = InfoRequest { name: e.name.as_bytes().to_vec(), requests: vec![INFO_BLOCK_SIZE] };
        send_option(&mut s, OPT_INFO, &req.encode())?;
        let replies = option_replies(&mut s, OPT_INFO)?;
        if let Some((t, d)) = replies.last().filter(|(t, _)| *t != REP_ACK) {
            return Err(failed(&format!("Error querying export '{}'", e.name), *t, d));
        }
        for (t, d) in &replies {
            if *t != REP_INFO || d.len() < 2 {
                continue;
            }
            let u32_at = |i: usize| u32::from_be_bytes([d[i], d[i + 1], d[i + 2], d[i + 3]]);
            match u16::from_be_bytes([d[0], d[1]]) {
                INFO_EXPORT if d.len() >= 12 => {
                    let size = u64::from_be_bytes(d[2..10].try_into().unwrap_or_default());
                    e.size_flags = Some((size, u16::from_be_bytes([d[10], d[11]])));
                }
                INFO_BLOCK_SIZE if d.len() >= 14 => e.block_sizes = Some((u32_at(2), u32_at(6), u32_at(10))),
                _ => {}
            }
        }
        if structured {
            e.contexts = list_contexts(&mut s, &e.name, &[])?;
            // A server may list nothing without a namespace asked for;
            // QEMU's own contexts are then asked for by theirs.
            if !e.contexts.is_empty() && !e.contexts.iter().any(|c| c.starts_with("qemu:")) {
                e.contexts.extend(list_contexts(&mut s, &e.name, &["qemu:"])?);
            }
        }
    }
    send_option(&mut s, OPT_ABORT, &[])?;
    // The server may close before acknowledging; the listing is complete.
    let _ = option_replies(&mut s, OPT_ABORT);
    Ok(exports)
}

fn list_contexts(s: &mut super::conn::Stream, export: &str, queries: &[&str]) -> io::Result<Vec<String>> {
    let req = MetaContextRequest {
        export: export.as_bytes().to_vec(),
        queries: queries.iter().map(|q| q.as_bytes().to_vec()).collect(),
    };
    send_option(s, OPT_LIST_META_CONTEXT, &req.encode())?;
    let mut out = Vec::new();
    for (t, d) in option_replies(s, OPT_LIST_META_CONTEXT)? {
        if t == REP_META_CONTEXT && d.len() >= 4 {
            out.push(String::from_utf8_lossy(&d[4..]).into_owned());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_reads_as_qemu_nbds() {
        let e = ExportListing {
            name: String::new(),
            description: String::new(),
            size_flags: Some((4194304, 0x148f)),
            block_sizes: Some((1, 4096, 33554432)),
            extended: true,
            contexts: vec!["base:allocation".into(), "qemu:allocation-depth".into()],
        };
        assert_eq!(
            render_listing(&[e]),
            "exports available: 1\n export: ''\n  size:  4194304\n  flags: 0x148f ( readonly flush fua df cache block-status-payload )\n  min block: 1\n  opt block: 4096\n  max block: 33554432\n  transaction size: 64-bit\n  available meta contexts: 2\n   base:allocation\n   qemu:allocation-depth\n"
        );
    }
}
