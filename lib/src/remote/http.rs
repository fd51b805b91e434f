//! A read-only [`Storage`] over HTTP(S) range requests.
//!
//! Every read becomes one or more `GET` requests with a `Range` header on a
//! keep-alive pool, so the object must be served by something that honours
//! ranges (a plain web server does; a `200` answer to a ranged request is
//! refused rather than downloading the whole object). Small reads fetch a
//! whole readahead window, aligned to the window size so that windows never
//! overlap and a byte is fetched once while its window stays cached; large
//! reads are split into chunks fetched in parallel. Transient failures
//! (connection errors, timeouts, 5xx, 429) are retried a bounded number of
//! times with exponential backoff; 401/403/404 fail at once with one line.
//!
//! S3 objects use the same code: their [`Target`] signs a fresh URL for
//! every request (see [`super::s3`]).

use super::s3::S3Object;
use crate::storage::Storage;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use ureq::tls::{RootCerts, TlsConfig};

/// Options of the HTTP(S) driver (QEMU's curl driver's where they apply).
#[derive(Clone, PartialEq, Eq)]
pub struct HttpOptions {
    /// Bytes fetched at least per request (QEMU's `readahead`; 256 KiB).
    pub readahead: u64,
    /// Timeout of one request (QEMU's `timeout`, in seconds there).
    pub timeout: Duration,
    /// Verify the server's certificate (QEMU's `sslverify`).
    pub sslverify: bool,
    /// A PEM bundle of trusted roots; default `SSL_CERT_FILE`, then the
    /// system bundle.
    pub ca_file: Option<PathBuf>,
    /// Sent as the `Cookie` header (QEMU's `cookie` / `cookie-secret`).
    pub cookie: Option<String>,
    /// HTTP basic authentication (QEMU's `username`, `password-secret`).
    pub username: Option<String>,
    /// The password for `username`.
    pub password: Option<String>,
    /// Proxy URL; default the `https_proxy`/`http_proxy` environment as
    /// curl reads it, when set.
    pub proxy: Option<String>,
    /// Proxy credentials (QEMU's `proxy-username`, `proxy-password-secret`).
    pub proxy_username: Option<String>,
    /// The password for `proxy_username`.
    pub proxy_password: Option<String>,
    /// Retries of a request that failed transiently.
    pub retries: u32,
    /// Requests in flight at once for one large read.
    pub parallel: usize,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            readahead: 256 << 10,
            timeout: Duration::from_secs(30),
            sslverify: true,
            ca_file: None,
            cookie: None,
            username: None,
            password: None,
            proxy: None,
            proxy_username: None,
            proxy_password: None,
            retries: 4,
            parallel: 4,
        }
    }
}

impl std::fmt::Debug for HttpOptions {
    // Passwords and cookies stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpOptions")
            .field("readahead", &self.readahead)
            .field("timeout", &self.timeout)
            .field("sslverify", &self.sslverify)
            .field("ca_file", &self.ca_file)
            .field("username", &self.username)
            .field("proxy", &self.proxy)
            .field("retries", &self.retries)
            .field("parallel", &self.parallel)
            .finish_non_exhaustive()
    }
}

/// What the requests go to.
pub(crate) enum Target {
    /// A fixed URL.
    Url(String),
    /// An S3 object: each request gets a freshly signed URL.
    S3(Box<S3Object>),
}

impl Target {
    fn url(&self) -> String {
        match self {
            Target::Url(u) => u.clone(),
            Target::S3(o) => o.get_url(),
        }
    }
    /// The name errors show (never a signed URL).
    fn name(&self) -> String {
        match self {
            Target::Url(u) => strip_userinfo(u),
            Target::S3(o) => o.name(),
        }
    }
}

/// `u` without a `user:password@` part.
fn strip_userinfo(u: &str) -> String {
    match (u.find("://"), u.find('@')) {
        (Some(s), Some(a)) if a > s && !u[s + 3..a].contains('/') => format!("{}{}", &u[..s + 3], &u[a + 1..]),
        _ => u.to_string(),
    }
}

/// Requests and bytes a remote storage has fetched.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RemoteStats {
    /// GET requests that returned data (retries included).
    pub requests: u64,
    /// Bytes received in their bodies.
    pub bytes: u64,
    /// Failed attempts that were retried.
    pub retries: u64,
}

/// Running [`RemoteStats`], bumped by the storages that share them.
#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    bytes: AtomicU64,
    retries: AtomicU64,
}

impl Counters {
    const fn new() -> Counters {
        Counters { requests: AtomicU64::new(0), bytes: AtomicU64::new(0), retries: AtomicU64::new(0) }
    }
    fn fetched(&self, bytes: usize) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }
    fn retried(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }
    fn snapshot(&self) -> RemoteStats {
        RemoteStats {
            requests: self.requests.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
        }
    }
}

static TOTAL: Counters = Counters::new();

/// Counters per object name, shared by every storage opened on it.
fn by_name() -> &'static Mutex<HashMap<String, Arc<Counters>>> {
    static BY_NAME: OnceLock<Mutex<HashMap<String, Arc<Counters>>>> = OnceLock::new();
    BY_NAME.get_or_init(Mutex::default)
}

/// What every remote storage of this process has fetched so far: the
/// store's view of a run (tests and the scale note count with it).
pub fn total_stats() -> RemoteStats {
    TOTAL.snapshot()
}

/// What the storages opened on `name` (as errors show it: `s3://B/K`, or
/// the URL without credentials) have fetched so far in this process, open
/// or since dropped: one object's view of a run while others run too.
pub fn stats_for(name: &str) -> RemoteStats {
    by_name().lock().unwrap_or_else(|p| p.into_inner()).get(name).map_or_else(RemoteStats::default, |c| c.snapshot())
}

/// Windows kept in memory; a boot reads with locality, and an L2 table
/// and the data it maps are rarely more than a few windows apart.
const CACHED_WINDOWS: usize = 16;
/// Reads at least this large bypass the window cache and go in parallel
/// chunks of this size.
const CHUNK: u64 = 4 << 20;

/// A read-only remote object as [`Storage`].
pub struct HttpStorage {
    agent: ureq::Agent,
    target: Target,
    opts: HttpOptions,
    len: u64,
    cache: Mutex<VecDeque<(u64, Arc<Vec<u8>>)>>,
    own: Counters,
    named: Arc<Counters>,
}

impl std::fmt::Debug for HttpStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpStorage").field("name", &self.target.name()).field("len", &self.len).finish()
    }
}

/// An `io::Error` of kind `kind` with a one-line message.
fn err(kind: io::ErrorKind, msg: String) -> io::Error {
    io::Error::new(kind, msg)
}

/// One attempt's failure: retry it or give up.
enum Failure {
    Transient(io::Error),
    Fatal(io::Error),
}

impl HttpStorage {
    /// Opens `url` (`http://` or `https://`), learning its length with a
    /// one-byte ranged request (which also checks that ranges work).
    pub fn open(url: &str, opts: HttpOptions) -> io::Result<HttpStorage> {
        Self::open_target(Target::Url(url.to_string()), opts)
    }

    pub(crate) fn open_target(target: Target, opts: HttpOptions) -> io::Result<HttpStorage> {
        let agent = agent(&opts)?;
        let named = by_name().lock().unwrap_or_else(|p| p.into_inner()).entry(target.name()).or_default().clone();
        let mut s = HttpStorage {
            agent,
            target,
            opts,
            len: 0,
            cache: Mutex::new(VecDeque::new()),
            own: Counters::new(),
            named,
        };
        s.len = s.probe_len()?;
        Ok(s)
    }

    /// What this storage has fetched so far.
    pub fn stats(&self) -> RemoteStats {
        self.own.snapshot()
    }

    fn count(&self, bytes: usize) {
        for c in [&self.own, &*self.named, &TOTAL] {
            c.fetched(bytes);
        }
    }

    /// The object's length from `Content-Range` of `bytes=0-0`.
    fn probe_len(&self) -> io::Result<u64> {
        self.with_retries(|| {
            let resp = self.send_get(Some((0, 0)))?;
            let status = resp.status().as_u16();
            if status == 416 {
                // Nothing to range over: an empty object.
                return Ok(0);
            }
            self.check_status(status)?;
            if status != 206 {
                return Err(Failure::Fatal(self.no_ranges(status)));
            }
            let total = resp
                .headers()
                .get("content-range")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.rsplit('/').next())
                .and_then(|t| t.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    Failure::Fatal(err(
                        io::ErrorKind::InvalidData,
                        format!("'{}': the server gave no object length (Content-Range)", self.target.name()),
                    ))
                })?;
            let mut body = Vec::new();
            read_body(resp, &mut body, 1).map_err(Failure::Transient)?;
            self.count(body.len());
            Ok(total)
        })
    }

    fn no_ranges(&self, status: u16) -> io::Error {
        err(
            io::ErrorKind::Unsupported,
            format!(
                "'{}': the server does not support range requests (answered {status} instead of 206)",
                self.target.name()
            ),
        )
    }

    /// Fails at once on statuses no retry can fix.
    fn check_status(&self, status: u16) -> Result<(), Failure> {
        let name = self.target.name();
        let fatal = |kind, what: &str| Err(Failure::Fatal(err(kind, format!("'{name}': {what} (HTTP {status})"))));
        match status {
            200..=299 => Ok(()),
            401 | 403 => fatal(io::ErrorKind::PermissionDenied, "access denied: check the credentials"),
            404 => fatal(io::ErrorKind::NotFound, "no such object"),
            408 | 429 | 500..=599 => {
                Err(Failure::Transient(err(io::ErrorKind::Other, format!("'{name}': server error (HTTP {status})"))))
            }
            _ => fatal(io::ErrorKind::Other, "request refused"),
        }
    }

    fn send_get(&self, range: Option<(u64, u64)>) -> Result<ureq::http::Response<ureq::Body>, Failure> {
        let mut req = self.agent.get(self.target.url());
        if let Some((first, last)) = range {
            req = req.header("Range", format!("bytes={first}-{last}"));
        }
        if let Some(c) = &self.opts.cookie {
            req = req.header("Cookie", c);
        }
        if let Some(u) = &self.opts.username {
            req = req.header("Authorization", basic_auth(u, self.opts.password.as_deref().unwrap_or("")));
        }
        req.call().map_err(|e| self.transport(e))
    }

    fn transport(&self, e: ureq::Error) -> Failure {
        let msg = format!("'{}': {e}", self.target.name());
        match e {
            ureq::Error::Tls(_)
            | ureq::Error::Rustls(_)
            | ureq::Error::Pem(_)
            | ureq::Error::BadUri(_)
            | ureq::Error::InvalidProxyUrl
            | ureq::Error::HostNotFound => Failure::Fatal(err(io::ErrorKind::InvalidInput, msg)),
            ureq::Error::Io(ref io) if io.kind() == io::ErrorKind::InvalidData => {
                // Certificate failures arrive as I/O errors from rustls.
                Failure::Fatal(err(io::ErrorKind::InvalidData, msg))
            }
            ureq::Error::Timeout(_) => Failure::Transient(err(io::ErrorKind::TimedOut, msg)),
            _ => Failure::Transient(err(io::ErrorKind::Other, msg)),
        }
    }

    /// Runs `f` until it succeeds, fails fatally, or has been retried
    /// `opts.retries` times (100 ms, 200 ms, ... up to 2 s apart).
    fn with_retries<T>(&self, mut f: impl FnMut() -> Result<T, Failure>) -> io::Result<T> {
        let mut attempt = 0;
        loop {
            match f() {
                Ok(v) => return Ok(v),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Transient(e)) if attempt >= self.opts.retries => {
                    let tries = attempt + 1;
                    return Err(err(e.kind(), format!("{e} (after {tries} attempts)")));
                }
                Err(Failure::Transient(_)) => {
                    for c in [&self.own, &*self.named, &TOTAL] {
                        c.retried();
                    }
                    std::thread::sleep(Duration::from_millis((100u64 << attempt.min(4)).min(2000)));
                    attempt += 1;
                }
            }
        }
    }

    /// Fetches exactly `buf.len()` bytes at `offset` (inside the object).
    fn fetch(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let last = offset + buf.len() as u64 - 1;
        self.with_retries(|| {
            let resp = self.send_get(Some((offset, last)))?;
            let status = resp.status().as_u16();
            self.check_status(status)?;
            if status != 206 {
                return Err(Failure::Fatal(self.no_ranges(status)));
            }
            let mut body = Vec::with_capacity(buf.len());
            read_body(resp, &mut body, buf.len() as u64).map_err(Failure::Transient)?;
            self.count(body.len());
            if body.len() != buf.len() {
                return Err(Failure::Transient(err(
                    io::ErrorKind::UnexpectedEof,
                    format!("'{}': short answer ({} of {} bytes)", self.target.name(), body.len(), buf.len()),
                )));
            }
            buf.copy_from_slice(&body);
            Ok(())
        })
    }

    /// Copies `buf` from cached windows, fetching those missing; false if
    /// the read is too large for the cache.
    fn read_windowed(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        let ra = self.opts.readahead;
        if ra == 0 || buf.len() as u64 > 2 * ra {
            return Ok(false);
        }
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = offset + pos as u64;
            let start = at / ra * ra;
            let win = self.window(start)?;
            let from = (at - start) as usize;
            let n = (win.len() - from).min(buf.len() - pos);
            buf[pos..pos + n].copy_from_slice(&win[from..from + n]);
            pos += n;
        }
        Ok(true)
    }

    /// The readahead window starting at `start`, from the cache or fetched.
    fn window(&self, start: u64) -> io::Result<Arc<Vec<u8>>> {
        if let Some(w) = lock(&self.cache).iter().find(|(s, _)| *s == start).map(|(_, w)| w.clone()) {
            return Ok(w);
        }
        let n = self.opts.readahead.min(self.len - start) as usize;
        let mut w = vec![0u8; n];
        self.fetch(&mut w, start)?;
        let w = Arc::new(w);
        let mut c = lock(&self.cache);
        if !c.iter().any(|(s, _)| *s == start) {
            if c.len() >= CACHED_WINDOWS {
                c.pop_front();
            }
            c.push_back((start, w.clone()));
        }
        Ok(w)
    }

    /// A large read: windows still cached are copied (so readahead never
    /// makes a byte travel twice), the runs between them are fetched in
    /// parallel chunks, uncached.
    fn read_large(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let ra = self.opts.readahead;
        if ra == 0 || lock(&self.cache).is_empty() {
            return self.read_parallel(buf, offset);
        }
        let end = offset + buf.len() as u64;
        let mut run_start = offset;
        let mut at = offset;
        while at < end {
            let start = at / ra * ra;
            let next = (start + ra).min(end);
            let cached = lock(&self.cache).iter().find(|(s, _)| *s == start).map(|(_, w)| w.clone());
            if let Some(w) = cached {
                if run_start < at {
                    let (a, b) = ((run_start - offset) as usize, (at - offset) as usize);
                    self.read_parallel(&mut buf[a..b], run_start)?;
                }
                let (a, b) = ((at - offset) as usize, (next - offset) as usize);
                let from = (at - start) as usize;
                buf[a..b].copy_from_slice(&w[from..from + (b - a)]);
                run_start = next;
            }
            at = next;
        }
        if run_start < end {
            let a = (run_start - offset) as usize;
            self.read_parallel(&mut buf[a..], run_start)?;
        }
        Ok(())
    }

    /// A large read as parallel chunk requests.
    fn read_parallel(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let chunks: Vec<(u64, &mut [u8])> =
            buf.chunks_mut(CHUNK as usize).enumerate().map(|(i, c)| (offset + i as u64 * CHUNK, c)).collect();
        if chunks.len() == 1 || self.opts.parallel <= 1 {
            for (off, c) in chunks {
                self.fetch(c, off)?;
            }
            return Ok(());
        }
        let work = Mutex::new(chunks);
        let first_err: Mutex<Option<io::Error>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..self.opts.parallel {
                s.spawn(|| loop {
                    if lock(&first_err).is_some() {
                        return;
                    }
                    let Some((off, c)) = lock(&work).pop() else { return };
                    if let Err(e) = self.fetch(c, off) {
                        lock(&first_err).get_or_insert(e);
                        return;
                    }
                });
            }
        });
        match first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Locks `m`, taking over a lock whose holder panicked (the data is a
/// cache or a work list, valid at every step).
pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads at most `limit` bytes of `resp`'s body into `out`.
fn read_body(resp: ureq::http::Response<ureq::Body>, out: &mut Vec<u8>, limit: u64) -> io::Result<()> {
    use std::io::Read;
    let mut r = resp.into_body().into_reader().take(limit);
    r.read_to_end(out).map(|_| ())
}

fn basic_auth(user: &str, password: &str) -> String {
    use base64_lite::encode;
    format!("Basic {}", encode(format!("{user}:{password}").as_bytes()))
}

/// Standard base64, for the one header that needs it.
mod base64_lite {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    pub fn encode(data: &[u8]) -> String {
        let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
        for c in data.chunks(3) {
            let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
                if i <= c.len() {
                    out.push(ALPHABET[((n >> shift) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
    #[cfg(test)]
    #[test]
    fn known_values() {
        assert_eq!(encode(b"Aladdin:open sesame"), "QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
        assert_eq!(encode(b"ab"), "YWI=");
        assert_eq!(encode(b""), "");
    }
}

/// The trusted roots: `ca_file`, else `SSL_CERT_FILE`, else the first
/// system bundle found.
fn root_certs(opts: &HttpOptions) -> io::Result<RootCerts> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    const SYSTEM: [&str; 3] =
        ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"];
    let path = match (&opts.ca_file, std::env::var_os("SSL_CERT_FILE")) {
        (Some(p), _) => p.clone(),
        (None, Some(p)) => PathBuf::from(p),
        (None, None) => match SYSTEM.iter().map(PathBuf::from).find(|p| p.exists()) {
            Some(p) => p,
            None => {
                return Err(err(
                    io::ErrorKind::NotFound,
                    "no CA certificate bundle found; set SSL_CERT_FILE or sslverify=off".into(),
                ))
            }
        },
    };
    let bad = |e: String| err(io::ErrorKind::InvalidData, format!("CA bundle '{}': {e}", path.display()));
    let certs: Vec<ureq::tls::Certificate<'static>> = CertificateDer::pem_file_iter(&path)
        .map_err(|e| bad(e.to_string()))?
        .filter_map(|c| c.ok())
        .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
        .collect();
    if certs.is_empty() {
        return Err(bad("no certificates in it".into()));
    }
    Ok(RootCerts::Specific(Arc::new(certs)))
}

/// The keep-alive agent `opts` describe.
pub(crate) fn agent(opts: &HttpOptions) -> io::Result<ureq::Agent> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = TlsConfig::builder().unversioned_rustls_crypto_provider(provider);
    if opts.sslverify {
        tls = tls.root_certs(root_certs(opts)?);
    } else {
        tls = tls.disable_verification(true);
    }
    let proxy = match &opts.proxy {
        Some(p) => {
            let url = match (&opts.proxy_username, p.split_once("://")) {
                (Some(u), Some((scheme, rest))) => {
                    let pw = opts.proxy_password.as_deref().unwrap_or("");
                    format!("{scheme}://{u}:{pw}@{rest}")
                }
                _ => p.clone(),
            };
            Some(
                ureq::Proxy::new(&url)
                    .map_err(|e| err(io::ErrorKind::InvalidInput, format!("proxy '{}': {e}", strip_userinfo(p))))?,
            )
        }
        None => ureq::Proxy::try_from_env(),
    };
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .tls_config(tls.build())
        .proxy(proxy)
        .timeout_global(Some(opts.timeout))
        .max_idle_connections_per_host(opts.parallel.max(1) * 2)
        // Ranges must come back as the bytes stored: no transparent
        // decompression is asked for.
        .accept_encoding("identity")
        .build();
    Ok(ureq::Agent::new_with_config(config))
}

impl Storage for HttpStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // Past the end reads as zeros, as for files.
        let inside = if offset >= self.len { 0 } else { (self.len - offset).min(buf.len() as u64) as usize };
        buf[inside..].fill(0);
        let buf = &mut buf[..inside];
        if buf.is_empty() || self.read_windowed(buf, offset)? {
            return Ok(());
        }
        self.read_large(buf, offset)
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(read_only())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.len)
    }
    fn set_len(&self, _len: u64) -> io::Result<()> {
        Err(read_only())
    }
    fn punch_hole(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(read_only())
    }
}

fn read_only() -> io::Error {
    err(io::ErrorKind::PermissionDenied, "remote objects are read-only".into())
}

#[cfg(test)]
mod tests {
    use super::strip_userinfo;

    #[test]
    fn credentials_stay_out_of_names() {
        assert_eq!(strip_userinfo("https://u:p@h/x"), "https://h/x");
        assert_eq!(strip_userinfo("https://h/a@b"), "https://h/a@b");
        assert_eq!(strip_userinfo("http://h:8/x"), "http://h:8/x");
    }
}
