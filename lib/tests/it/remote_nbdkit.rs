//! A base image over HTTP, the way docs/remote.md describes: a small
//! in-test HTTP server (range requests only) behind nbdkit's curl plugin,
//! with a local qcow2 overlay using copy-on-read and then stream.
//! Skipped (with a note) when nbdkit is not installed.

use crate::support;

use crate::support::remote::*;
use oxcow::qcow2::CreateOptions;
use oxcow::tools::stream::{stream, StreamOptions};
use oxcow::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const SIZE: u64 = 8 << 20;

/// Serves one file over HTTP/1.1: HEAD, and GET with a byte range.
struct Http {
    port: u16,
    gets: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Http {
    fn start(file: PathBuf) -> Http {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let gets = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (g, s) = (Arc::clone(&gets), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !s.load(Ordering::Acquire) {
                match l.accept() {
                    Ok((c, _)) => {
                        let (file, g) = (file.clone(), Arc::clone(&g));
                        std::thread::spawn(move || {
                            let _ = serve_http(c, &file, &g);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Http { port, gets, stop }
    }
}

impl Drop for Http {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

fn serve_http(c: TcpStream, file: &std::path::Path, gets: &AtomicU64) -> std::io::Result<()> {
    c.set_nonblocking(false)?;
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
        let method = line.split_whitespace().next().unwrap_or("").to_string();
        // Like real servers, clamp an end past the file (nbdkit 1.32 asks
        // for one byte more than it needs).
        let range = crate::support::http_server::read_headers(&mut r)?
            .range
            .map(|(a, b)| (a, b.unwrap_or(len - 1).min(len - 1)));
        match (method.as_str(), range) {
            ("HEAD", _) => write!(w, "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nAccept-Ranges: bytes\r\n\r\n")?,
            ("GET", Some((a, b))) if a <= b && b < len => {
                gets.fetch_add(1, Ordering::Relaxed);
                let mut body = vec![0u8; (b - a + 1) as usize];
                f.read_exact_at(&mut body, a)?;
                write!(
                    w,
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {a}-{b}/{len}\r\nAccept-Ranges: bytes\r\n\r\n",
                    body.len()
                )?;
                w.write_all(&body)?;
            }
            _ => write!(w, "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Length: 0\r\n\r\n")?,
        }
        w.flush()?;
    }
}

fn curl_plugin_available() -> bool {
    have("nbdkit")
        && Command::new("nbdkit").args(["--dump-plugin", "curl"]).output().map(|o| o.status.success()).unwrap_or(false)
}

#[test]
fn http_base_through_nbdkit_curl() {
    if !curl_plugin_available() {
        eprintln!("note: nbdkit or its curl plugin is not installed; skipping the HTTP base test");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (base, content) = patterned_base(dir.path(), "base.raw", SIZE, 21);
    let http = Http::start(base.clone());
    let url = format!("url=http://127.0.0.1:{}/base.raw", http.port);
    let k = nbdkit(dir.path(), &["--readonly", "curl", &url]);

    let overlay = dir.path().join("overlay.qcow2");
    let st = oxcow::create_file(&overlay).unwrap();
    let opts = CreateOptions::new(SIZE).backing_file(k.upstream.url()).backing_format(Some("raw".into()));
    oxcow::qcow2::create(st, None, &opts).unwrap();
    let oo = OpenOptions::default().write(true).allow_network_backing(true).copy_on_read(true);
    let img = oxcow::open(&overlay, &oo).unwrap();
    let mut buf = vec![0u8; 300_000];
    for off in [0u64, 1 << 20, 5_000_001] {
        img.device().read_at(&mut buf, off).unwrap();
        assert!(buf[..] == content[off as usize..off as usize + buf.len()]);
    }
    let gets = http.gets.load(Ordering::Relaxed);
    assert!(gets > 0);
    for off in [0u64, 1 << 20, 5_000_001] {
        img.device().read_at(&mut buf, off).unwrap();
        assert!(buf[..] == content[off as usize..off as usize + buf.len()]);
    }
    assert_eq!(http.gets.load(Ordering::Relaxed), gets, "copy-on-read re-fetched over HTTP");

    let r = stream(img.qcow2().unwrap(), &StreamOptions::default(), &mut |_| {}).unwrap();
    assert!(r.complete && r.detached);
    img.close().unwrap();
    drop(img);
    drop(k);
    drop(http);
    support::check_clean(&overlay);
    support::assert_same(&overlay, "qcow2", &base, "raw");
}
