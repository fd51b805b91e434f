//! NBD locations: QEMU's URI syntax (`nbd://HOST[:PORT]/NAME`,
//! `nbd+unix:///NAME?socket=PATH`) and its legacy `nbd:HOST:PORT` form.

use super::conn::NbdAddr;
use crate::{Error, Result};
use std::path::PathBuf;

/// The default NBD port.
pub const DEFAULT_PORT: u16 = 10809;

/// A parsed NBD location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUrl {
    /// Where the server listens.
    pub addr: NbdAddr,
    /// The export name (may be empty: the server's default export).
    pub export: String,
}

fn percent_decode(s: &str) -> Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok());
            match hex {
                Some(v) => {
                    out.push(v);
                    i += 3;
                    continue;
                }
                None => return Err(Error::invalid(format!("bad percent escape in NBD URL '{s}'"))),
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).map_err(|_| Error::invalid(format!("NBD URL '{s}' is not UTF-8 once decoded")))
}

impl NbdUrl {
    /// Whether `name` is an NBD location rather than a file name.
    pub fn is_nbd(name: &str) -> bool {
        name.starts_with("nbd:") || name.starts_with("nbd+tcp://") || name.starts_with("nbd+unix://")
    }

    /// QEMU's legacy syntax: `nbd:HOST[:PORT][:exportname=NAME]` and
    /// `nbd:unix:PATH[:exportname=NAME]` (still found in old images).
    fn parse_legacy(url: &str, rest: &str) -> Result<NbdUrl> {
        let (target, export) = match rest.split_once(":exportname=") {
            Some((t, e)) => (t, e.to_string()),
            None => (rest, String::new()),
        };
        if let Some(path) = target.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(Error::invalid(format!("invalid NBD name '{url}': no socket path")));
            }
            return Ok(NbdUrl { addr: NbdAddr::Unix(PathBuf::from(path)), export });
        }
        let mut u = Self::parse(&format!("nbd://{target}"))
            .map_err(|_| Error::invalid(format!("invalid NBD name '{url}': expected nbd:HOST[:PORT]")))?;
        u.export = export;
        Ok(u)
    }

    /// Parses `nbd://HOST[:PORT][/NAME]`, `nbd+tcp://...` or
    /// `nbd+unix:///NAME?socket=PATH` (QEMU's URI syntax).
    pub fn parse(url: &str) -> Result<NbdUrl> {
        let bad = |why: &str| Error::invalid(format!("invalid NBD URL '{url}': {why}"));
        if let Some(rest) = url.strip_prefix("nbd+unix://") {
            let (path, query) = rest.split_once('?').ok_or_else(|| bad("a socket=PATH query is required"))?;
            if !path.is_empty() && !path.starts_with('/') {
                return Err(bad("nbd+unix URLs take no host"));
            }
            let export = percent_decode(path.strip_prefix('/').unwrap_or(path))?;
            let mut socket = None;
            for kv in query.split('&') {
                match kv.split_once('=') {
                    Some(("socket", v)) => socket = Some(percent_decode(v)?),
                    _ => return Err(bad(&format!("unknown query parameter '{kv}'"))),
                }
            }
            let socket = socket.filter(|s| !s.is_empty()).ok_or_else(|| bad("a socket=PATH query is required"))?;
            return Ok(NbdUrl { addr: NbdAddr::Unix(PathBuf::from(socket)), export });
        }
        let rest = match url.strip_prefix("nbd://").or_else(|| url.strip_prefix("nbd+tcp://")) {
            Some(r) => r,
            None => match url.strip_prefix("nbd:") {
                Some(r) if !r.contains("://") && !r.is_empty() => return Self::parse_legacy(url, r),
                _ => return Err(bad("expected nbd://, nbd+tcp://, nbd+unix:// or nbd:HOST:PORT")),
            },
        };
        if rest.contains('?') {
            return Err(bad("TCP URLs take no query"));
        }
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
            let (h, after) = h.split_once(']').ok_or_else(|| bad("unterminated [IPv6 address]"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p),
                None if after.is_empty() => None,
                None => return Err(bad("junk after ]")),
            };
            (h.to_string(), port)
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (hostport.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = match port {
            Some(p) => p.parse::<u16>().map_err(|_| bad(&format!("bad port '{p}'")))?,
            None => DEFAULT_PORT,
        };
        Ok(NbdUrl { addr: NbdAddr::Tcp { host, port }, export: percent_decode(path)? })
    }
}

impl std::fmt::Display for NbdUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.addr {
            NbdAddr::Tcp { .. } => write!(f, "nbd://{}/{}", self.addr, self.export),
            NbdAddr::Unix(p) => write!(f, "nbd+unix:///{}?socket={}", self.export, p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str) -> NbdUrl {
        NbdUrl { addr: NbdAddr::Tcp { host: host.into(), port }, export: export.into() }
    }

    #[test]
    fn parses_qemu_uri_forms() {
        assert_eq!(NbdUrl::parse("nbd://127.0.0.1:10810/disk").unwrap(), tcp("127.0.0.1", 10810, "disk"));
        assert_eq!(NbdUrl::parse("nbd://example.org").unwrap(), tcp("example.org", DEFAULT_PORT, ""));
        assert_eq!(NbdUrl::parse("nbd://h/").unwrap(), tcp("h", DEFAULT_PORT, ""));
        assert_eq!(NbdUrl::parse("nbd+tcp://h:1/a%20b").unwrap(), tcp("h", 1, "a b"));
        assert_eq!(NbdUrl::parse("nbd://[::1]:99/x/y").unwrap(), tcp("::1", 99, "x/y"));
        assert_eq!(
            NbdUrl::parse("nbd+unix:///exp?socket=/tmp/s.sock").unwrap(),
            NbdUrl { addr: NbdAddr::Unix("/tmp/s.sock".into()), export: "exp".into() }
        );
        assert_eq!(
            NbdUrl::parse("nbd+unix://?socket=/s").unwrap(),
            NbdUrl { addr: NbdAddr::Unix("/s".into()), export: "".into() }
        );
    }

    #[test]
    fn refuses_malformed_urls() {
        for bad in [
            "nbd://",
            "nbd://:80/",
            "nbd://h:99999/",
            "nbd://h:x/",
            "nbd://[::1/",
            "nbd://h/?socket=x",
            "nbd+unix:///x",
            "nbd+unix:///x?socket=",
            "nbd+unix:///x?sock=/s",
            "nbd+unix://host/x?socket=/s",
            "nbd://h/%zz",
            "http://h/",
        ] {
            assert!(NbdUrl::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn display_round_trips() {
        for u in ["nbd://h:1/e", "nbd://[::1]:5/", "nbd+unix:///e?socket=/s"] {
            assert_eq!(NbdUrl::parse(u).unwrap().to_string(), u);
        }
        assert!(NbdUrl::is_nbd("nbd://x") && NbdUrl::is_nbd("nbd+unix:///?socket=/s") && !NbdUrl::is_nbd("x/nbd:1"));
    }

    #[test]
    fn parses_legacy_names() {
        assert_eq!(NbdUrl::parse("nbd:localhost:10811").unwrap(), tcp("localhost", 10811, ""));
        assert_eq!(NbdUrl::parse("nbd:h:1:exportname=d").unwrap(), tcp("h", 1, "d"));
        assert_eq!(NbdUrl::parse("nbd:[::1]:2").unwrap(), tcp("::1", 2, ""));
        assert_eq!(
            NbdUrl::parse("nbd:unix:/tmp/s:exportname=e").unwrap(),
            NbdUrl { addr: NbdAddr::Unix("/tmp/s".into()), export: "e".into() }
        );
        for bad in ["nbd:", "nbd:unix:", "nbd:h:x", "nbd:h/x?y"] {
            assert!(NbdUrl::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
