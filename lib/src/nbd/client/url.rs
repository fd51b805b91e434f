//! NBD locations: QEMU's URI syntax (`nbd://HOST[:PORT]/NAME`,
//! `nbd+unix:///NAME?socket=PATH`), its legacy `nbd:HOST:PORT` form, and
//! libnbd's TLS forms (`nbds://HOST[:PORT]/NAME?tls-certificates=DIR`,
//! `nbds+unix:///NAME?socket=PATH&tls-certificates=DIR`).

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
    /// Start TLS before anything else, with these credentials.
    pub tls: Option<UrlTls>,
}

/// The TLS settings of an `nbds:` location (libnbd's query parameters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlTls {
    /// Credential directory in QEMU's layout (`ca-cert.pem`, and
    /// `client-cert.pem`/`client-key.pem` when the server wants them):
    /// `tls-certificates=DIR`.
    pub certificates: PathBuf,
    /// Check the server's certificate (`tls-verify-peer=false` turns it off).
    pub verify_peer: bool,
    /// The name the server's certificate must carry, instead of the host
    /// connected to (`tls-hostname=NAME`).
    pub hostname: Option<String>,
    /// Pre-shared keys instead of certificates (`tls-psk-file=FILE`).
    pub psk: Option<UrlPsk>,
}

/// PSK login of an `nbds:` location: libnbd's `tls-psk-file=FILE` with the
/// URI's user (`nbds://USER@HOST/...`) or `tls-username=USER`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlPsk {
    /// A `keys.psk` file (`username:hexkey` lines).
    pub file: PathBuf,
    /// Who the client says it is (QEMU's default: `qemu`).
    pub username: String,
}

/// Percent-encodes what a query value or path segment cannot hold as is.
fn percent_encode(s: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || keep.contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The query of a URL: `socket` (Unix forms only) and, for `nbds:` forms,
/// the TLS parameters.
#[derive(Default)]
struct Query {
    socket: Option<String>,
    certificates: Option<String>,
    verify_peer: Option<bool>,
    hostname: Option<String>,
    psk_file: Option<String>,
    username: Option<String>,
}

impl Query {
    fn parse(query: &str, unix: bool, tls: bool, bad: &dyn Fn(&str) -> Error) -> Result<Query> {
        let mut q = Query::default();
        for kv in query.split('&').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').ok_or_else(|| bad(&format!("unknown query parameter '{kv}'")))?;
            let v = percent_decode(v)?;
            match k {
                "socket" if unix => q.socket = Some(v),
                "tls-certificates" if tls => q.certificates = Some(v),
                "tls-hostname" if tls => q.hostname = Some(v),
                "tls-psk-file" if tls => q.psk_file = Some(v),
                "tls-username" if tls => q.username = Some(v),
                "tls-verify-peer" if tls => {
                    q.verify_peer = Some(match v.as_str() {
                        "true" | "on" | "yes" | "1" => true,
                        "false" | "off" | "no" | "0" => false,
                        _ => return Err(bad(&format!("tls-verify-peer takes true or false, not '{v}'"))),
                    })
                }
                _ => return Err(bad(&format!("unknown query parameter '{kv}'"))),
            }
        }
        Ok(q)
    }

    fn tls(&self, bad: &dyn Fn(&str) -> Error) -> Result<UrlTls> {
        if let Some(file) = self.psk_file.as_ref().filter(|f| !f.is_empty()) {
            let username = self.username.clone().unwrap_or_else(|| crate::nbd::tls::DEFAULT_USERNAME.into());
            return Ok(UrlTls {
                certificates: PathBuf::new(),
                verify_peer: true,
                hostname: None,
                psk: Some(UrlPsk { file: PathBuf::from(file), username }),
            });
        }
        let dir = self.certificates.as_ref().filter(|d| !d.is_empty());
        let dir = dir.ok_or_else(|| bad("nbds URLs need tls-certificates=DIR (the credential directory)"))?;
        Ok(UrlTls {
            certificates: PathBuf::from(dir),
            verify_peer: self.verify_peer.unwrap_or(true),
            hostname: self.hostname.clone(),
            psk: None,
        })
    }
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
        name.starts_with("nbd:")
            || name.starts_with("nbd+tcp://")
            || name.starts_with("nbd+unix://")
            || name.starts_with("nbds://")
            || name.starts_with("nbds+tcp://")
            || name.starts_with("nbds+unix://")
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
            return Ok(NbdUrl { addr: NbdAddr::Unix(PathBuf::from(path)), export, tls: None });
        }
        let mut u = Self::parse(&format!("nbd://{target}"))
            .map_err(|_| Error::invalid(format!("invalid NBD name '{url}': expected nbd:HOST[:PORT]")))?;
        u.export = export;
        Ok(u)
    }

    /// Parses `nbd://HOST[:PORT][/NAME]`, `nbd+tcp://...` or
    /// `nbd+unix:///NAME?socket=PATH` (QEMU's URI syntax), and the same
    /// with `nbds` (TLS, libnbd's syntax) and a `tls-certificates=DIR`
    /// query, optionally `tls-verify-peer=false` and `tls-hostname=NAME`.
    pub fn parse(url: &str) -> Result<NbdUrl> {
        let bad = |why: &str| Error::invalid(format!("invalid NBD URL '{url}': {why}"));
        let unix = url
            .strip_prefix("nbd+unix://")
            .map(|r| (r, false))
            .or_else(|| url.strip_prefix("nbds+unix://").map(|r| (r, true)));
        if let Some((rest, tls)) = unix {
            let (path, query) = rest.split_once('?').ok_or_else(|| bad("a socket=PATH query is required"))?;
            if !path.is_empty() && !path.starts_with('/') {
                return Err(bad("nbd+unix URLs take no host"));
            }
            let export = percent_decode(path.strip_prefix('/').unwrap_or(path))?;
            let q = Query::parse(query, true, tls, &bad)?;
            let socket =
                q.socket.clone().filter(|s| !s.is_empty()).ok_or_else(|| bad("a socket=PATH query is required"))?;
            let tls = if tls { Some(q.tls(&bad)?) } else { None };
            return Ok(NbdUrl { addr: NbdAddr::Unix(PathBuf::from(socket)), export, tls });
        }
        let tcp = ["nbd://", "nbd+tcp://"].iter().find_map(|p| url.strip_prefix(p)).map(|r| (r, false));
        let tcp =
            tcp.or_else(|| ["nbds://", "nbds+tcp://"].iter().find_map(|p| url.strip_prefix(p)).map(|r| (r, true)));
        let (rest, tls) = match tcp {
            Some(r) => r,
            None => match url.strip_prefix("nbd:") {
                Some(r) if !r.contains("://") && !r.is_empty() => return Self::parse_legacy(url, r),
                _ => {
                    return Err(bad("expected nbd://, nbd+tcp://, nbd+unix://, nbds://, nbds+unix:// or nbd:HOST:PORT"))
                }
            },
        };
        let (rest, tls) = match (rest.split_once('?'), tls) {
            (Some(_), false) => return Err(bad("TCP URLs take no query")),
            (Some((r, query)), true) => {
                let mut q = Query::parse(query, false, true, &bad)?;
                // libnbd's PSK username: nbds://USER@HOST/...
                let authority = &r[..r.find('/').unwrap_or(r.len())];
                let r = match authority.split_once('@') {
                    Some((user, _)) => {
                        q.username.get_or_insert(percent_decode(user)?);
                        &r[user.len() + 1..]
                    }
                    None => r,
                };
                (r, Some(q.tls(&bad)?))
            }
            (None, true) => return Err(bad("nbds URLs need tls-certificates=DIR (the credential directory)")),
            (None, false) => (rest, None),
        };
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
        Ok(NbdUrl { addr: NbdAddr::Tcp { host, port }, export: percent_decode(path)?, tls })
    }
}

impl std::fmt::Display for NbdUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Some(tls) = &self.tls else {
            return match &self.addr {
                NbdAddr::Tcp { .. } => write!(f, "nbd://{}/{}", self.addr, self.export),
                NbdAddr::Unix(p) => write!(f, "nbd+unix:///{}?socket={}", self.export, p.display()),
            };
        };
        let export = percent_encode(&self.export, b"/");
        let mut query = Vec::new();
        if let NbdAddr::Unix(p) = &self.addr {
            query.push(format!("socket={}", percent_encode(&p.to_string_lossy(), b"/")));
        }
        if let Some(p) = &tls.psk {
            query.push(format!("tls-psk-file={}", percent_encode(&p.file.to_string_lossy(), b"/")));
            query.push(format!("tls-username={}", percent_encode(&p.username, b"")));
        } else {
            query.push(format!("tls-certificates={}", percent_encode(&tls.certificates.to_string_lossy(), b"/")));
        }
        if !tls.verify_peer {
            query.push("tls-verify-peer=false".into());
        }
        if let Some(h) = &tls.hostname {
            query.push(format!("tls-hostname={}", percent_encode(h, b"")));
        }
        match &self.addr {
            NbdAddr::Tcp { .. } => write!(f, "nbds://{}/{export}?{}", self.addr, query.join("&")),
            NbdAddr::Unix(_) => write!(f, "nbds+unix:///{export}?{}", query.join("&")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str) -> NbdUrl {
        NbdUrl { addr: NbdAddr::Tcp { host: host.into(), port }, export: export.into(), tls: None }
    }

    #[test]
    fn parses_libnbd_tls_forms() {
        let u = NbdUrl::parse("nbds://h:2/e%20x?tls-certificates=/etc/pki/q%2Cx").unwrap();
        assert_eq!(u.addr, NbdAddr::Tcp { host: "h".into(), port: 2 });
        assert_eq!(u.export, "e x");
        assert_eq!(
            u.tls,
            Some(UrlTls { certificates: "/etc/pki/q,x".into(), verify_peer: true, hostname: None, psk: None })
        );
        let u = NbdUrl::parse("nbds+unix:///d?socket=/s&tls-certificates=c&tls-verify-peer=false&tls-hostname=srv")
            .unwrap();
        assert_eq!(u.addr, NbdAddr::Unix("/s".into()));
        assert_eq!(
            u.tls,
            Some(UrlTls { certificates: "c".into(), verify_peer: false, hostname: Some("srv".into()), psk: None })
        );
        for round in [
            "nbds://h:2/e?tls-certificates=/d",
            "nbds+unix:///d?socket=/s&tls-certificates=c&tls-verify-peer=false&tls-hostname=srv",
        ] {
            assert_eq!(NbdUrl::parse(round).unwrap().to_string(), round);
            assert!(NbdUrl::is_nbd(round));
        }
        for bad in [
            "nbds://h/e",
            "nbds://h/e?tls-certificates=",
            "nbds://h/e?socket=/s&tls-certificates=/d",
            "nbds://h/e?tls-certificates=/d&tls-verify-peer=maybe",
            "nbd://h/e?tls-certificates=/d",
            "nbd+unix:///e?socket=/s&tls-certificates=/d",
            "nbds+unix:///e?socket=/s",
        ] {
            assert!(NbdUrl::parse(bad).is_err(), "{bad} accepted");
        }
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
            NbdUrl { addr: NbdAddr::Unix("/tmp/s.sock".into()), export: "exp".into(), tls: None }
        );
        assert_eq!(
            NbdUrl::parse("nbd+unix://?socket=/s").unwrap(),
            NbdUrl { addr: NbdAddr::Unix("/s".into()), export: "".into(), tls: None }
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
            NbdUrl { addr: NbdAddr::Unix("/tmp/s".into()), export: "e".into(), tls: None }
        );
        for bad in ["nbd:", "nbd:unix:", "nbd:h:x", "nbd:h/x?y"] {
            assert!(NbdUrl::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn parses_libnbd_psk_forms() {
        let psk = |file: &str, user: &str| UrlPsk { file: file.into(), username: user.into() };
        let u = NbdUrl::parse("nbds://alice@h:2/e?tls-psk-file=/k/keys.psk").unwrap();
        assert_eq!(u.addr, NbdAddr::Tcp { host: "h".into(), port: 2 });
        assert_eq!(u.tls.unwrap().psk, Some(psk("/k/keys.psk", "alice")));
        let u = NbdUrl::parse("nbds+unix:///d?socket=/s&tls-psk-file=k").unwrap();
        assert_eq!(u.tls.clone().unwrap().psk, Some(psk("k", "qemu")));
        assert_eq!(NbdUrl::parse(&u.to_string()).unwrap(), u);
        let u = NbdUrl::parse("nbds://h/e?tls-psk-file=k&tls-username=bob").unwrap();
        assert_eq!(NbdUrl::parse(&u.to_string()).unwrap(), u);
        assert_eq!(u.tls.unwrap().psk, Some(psk("k", "bob")));
    }
}
