//! A small in-test HTTP/1.1 server for the remote drivers' tests: serves
//! one file with range requests and can misbehave on purpose (ignore
//! ranges, fail transiently, answer a fixed status). It logs every ranged
//! GET so tests can count what the store saw.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How the server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// As a web server with range support.
    Ranges,
    /// The whole file with 200 to every GET, as servers without ranges.
    IgnoreRanges,
    /// `503` to the first N requests, then as `Ranges`.
    FailFirst(u64),
    /// This status to every request.
    Status(u16),
}

/// The running server; stops accepting when dropped.
pub struct HttpServer {
    pub port: u16,
    /// Every ranged GET answered with data, as (first, last) byte.
    pub ranges: Arc<Mutex<Vec<(u64, u64)>>>,
    /// Requests received (all kinds).
    pub requests: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

/// Headers of one request the test servers look at.
#[derive(Debug, Default)]
pub struct RequestHeaders {
    /// `Range: bytes=A-B`, as (A, B); B is None when absent or unparsable.
    pub range: Option<(u64, Option<u64>)>,
    /// `Content-Length`, 0 when absent.
    pub content_length: usize,
}

/// Reads header lines up to the blank line ending them.
pub fn read_headers(r: &mut impl BufRead) -> std::io::Result<RequestHeaders> {
    let mut out = RequestHeaders::default();
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            return Ok(out);
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                if let Some((a, b)) = v.trim().trim_start_matches("bytes=").split_once('-') {
                    out.range = Some((a.parse::<u64>().unwrap_or(0), b.parse::<u64>().ok()));
                }
            } else if k.eq_ignore_ascii_case("content-length") {
                out.content_length = v.trim().parse().unwrap_or(0);
            }
        }
    }
}

/// Accepts connections on `l` until `stop` is set (the owner sets it and
/// connects once to wake the loop), one thread per connection.
pub fn accept_loop(l: TcpListener, stop: Arc<AtomicBool>, handle: impl Fn(TcpStream) + Send + Sync + 'static) {
    let handle = Arc::new(handle);
    std::thread::spawn(move || {
        for c in l.incoming() {
            if stop.load(Ordering::Acquire) {
                return;
            }
            let Ok(c) = c else { continue };
            let h = Arc::clone(&handle);
            std::thread::spawn(move || h(c));
        }
    });
}

impl HttpServer {
    /// Serves `file` in `mode` on a free port of 127.0.0.1.
    pub fn start(file: PathBuf, mode: Mode) -> HttpServer {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let ranges = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, q) = (ranges.clone(), requests.clone());
        accept_loop(l, stop.clone(), move |c| {
            let _ = serve(c, &file, mode, &r, &q);
        });
        HttpServer { port, ranges, requests, stop }
    }

    /// The URL of the served file.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/base.img", self.port)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve(
    c: TcpStream,
    file: &std::path::Path,
    mode: Mode,
    log: &Mutex<Vec<(u64, u64)>>,
    n: &AtomicU64,
) -> std::io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(30)))?;
    let f = std::fs::File::open(file)?;
    let len = f.metadata()?.len();
    let mut r = BufReader::new(c.try_clone()?);
    let mut w = c;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let seen = n.fetch_add(1, Ordering::SeqCst);
        let range = read_headers(&mut r)?.range.map(|(a, b)| (a, b.unwrap_or(u64::MAX)));
        let status = match mode {
            Mode::Status(s) => Some(s),
            Mode::FailFirst(k) if seen < k => Some(503),
            _ => None,
        };
        if let Some(s) = status {
            write!(w, "HTTP/1.1 {s} Nope\r\nContent-Length: 0\r\n\r\n")?;
        } else if mode == Mode::IgnoreRanges || range.is_none() {
            let mut body = vec![0u8; len as usize];
            f.read_exact_at(&mut body, 0)?;
            write!(w, "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n")?;
            w.write_all(&body)?;
        } else if let Some((a, b)) = range.filter(|(a, _)| *a < len) {
            let b = b.min(len - 1);
            log.lock().unwrap().push((a, b));
            let mut body = vec![0u8; (b - a + 1) as usize];
            f.read_exact_at(&mut body, a)?;
            write!(
                w,
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {a}-{b}/{len}\r\n\r\n",
                body.len()
            )?;
            w.write_all(&body)?;
        } else {
            write!(
                w,
                "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\n\r\n"
            )?;
        }
        w.flush()?;
    }
}
