//! A minimal in-test S3 endpoint (path-style): ranged GET, and multipart
//! upload (create, upload part, complete, abort). It checks which access
//! key a presigned request names (403 for any other) but not the
//! signature itself, which is rusty-s3's to get right; it stands in for a
//! real store where none is installed, to test oxcow's wiring: endpoint,
//! addressing, credentials, errors and the upload protocol.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
pub struct Store {
    /// Objects by "bucket/key".
    pub objects: HashMap<String, Vec<u8>>,
    /// Parts of open uploads by upload id, then part number.
    parts: HashMap<String, HashMap<u32, Vec<u8>>>,
    /// Ranged GETs served with data.
    pub gets: u64,
    /// Parts received.
    pub parts_received: u64,
    /// Uploads aborted.
    pub aborted: u64,
    /// A part number refused with 403 (a store failing mid-upload).
    pub refuse_part: Option<u32>,
    /// How long each part takes to arrive (a slow store), and the most
    /// parts seen in flight at once.
    pub part_delay: Duration,
    pub parts_in_flight: u64,
    pub max_parts_in_flight: u64,
    next_id: u64,
}

pub struct S3Server {
    pub port: u16,
    pub store: Arc<Mutex<Store>>,
    stop: Arc<AtomicBool>,
}

pub const KEY_ID: &str = "GKtestkey";
pub const SECRET: &str = "testsecret";

impl S3Server {
    pub fn start() -> S3Server {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let store = Arc::new(Mutex::new(Store::default()));
        let requests = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, q) = (store.clone(), requests.clone());
        super::http_server::accept_loop(l, stop.clone(), move |c| {
            let _ = serve(c, &st, &q);
        });
        S3Server { port, store, stop }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn reply(w: &mut TcpStream, status: &str, headers: &str, body: &[u8]) -> std::io::Result<()> {
    write!(w, "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\n\r\n", body.len())?;
    w.write_all(body)
}

fn serve(c: TcpStream, store: &Mutex<Store>, n: &AtomicU64) -> std::io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut r = BufReader::new(c.try_clone()?);
    let mut w = c;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        n.fetch_add(1, Ordering::SeqCst);
        let mut it = line.split_whitespace();
        let (method, target) = (it.next().unwrap_or("").to_string(), it.next().unwrap_or("").to_string());
        let headers = super::http_server::read_headers(&mut r)?;
        let range = headers.range.map(|(a, b)| (a, b.unwrap_or(u64::MAX)));
        let len = headers.content_length;
        let mut body = vec![0u8; len];
        r.read_exact(&mut body)?;
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let q: HashMap<&str, &str> = query.split('&').filter_map(|kv| kv.split_once('=').or(Some((kv, "")))).collect();
        let object = path.trim_start_matches('/').to_string();
        let cred = q.get("X-Amz-Credential").copied().unwrap_or("");
        if !cred.starts_with(&format!("{KEY_ID}%2F")) {
            reply(&mut w, "403 Forbidden", "", b"<Error><Code>InvalidAccessKeyId</Code></Error>")?;
            continue;
        }
        let delay = store.lock().unwrap().part_delay;
        if method == "PUT" && !delay.is_zero() {
            {
                let mut s = store.lock().unwrap();
                s.parts_in_flight += 1;
                s.max_parts_in_flight = s.max_parts_in_flight.max(s.parts_in_flight);
            }
            std::thread::sleep(delay);
            store.lock().unwrap().parts_in_flight -= 1;
        }
        let mut s = store.lock().unwrap();
        match method.as_str() {
            "GET" => match (s.objects.get(&object).cloned(), range) {
                (None, _) => reply(&mut w, "404 Not Found", "", b"<Error><Code>NoSuchKey</Code></Error>")?,
                (Some(o), Some((a, b))) if (a as usize) < o.len() => {
                    let b = b.min(o.len() as u64 - 1);
                    s.gets += 1;
                    let hdr = format!("Content-Range: bytes {a}-{b}/{}\r\n", o.len());
                    reply(&mut w, "206 Partial Content", &hdr, &o[a as usize..=b as usize])?;
                }
                (Some(o), _) => reply(&mut w, "200 OK", "", &o)?,
            },
            "POST" if q.contains_key("uploads") => {
                s.next_id += 1;
                let id = format!("up{}", s.next_id);
                s.parts.insert(id.clone(), HashMap::new());
                let xml = format!(
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?><InitiateMultipartUploadResult><Bucket>b</Bucket><Key>k</Key><UploadId>{id}</UploadId></InitiateMultipartUploadResult>"
                );
                reply(&mut w, "200 OK", "", xml.as_bytes())?;
            }
            "PUT" => {
                let (Some(id), Some(num)) = (q.get("uploadId"), q.get("partNumber").and_then(|p| p.parse().ok()))
                else {
                    reply(&mut w, "400 Bad Request", "", b"")?;
                    continue;
                };
                s.parts_received += 1;
                if s.refuse_part == Some(num) {
                    reply(&mut w, "403 Forbidden", "", b"<Error><Code>AccessDenied</Code></Error>")?;
                    continue;
                }
                match s.parts.get_mut(*id) {
                    Some(p) => {
                        p.insert(num, body);
                        reply(&mut w, "200 OK", &format!("ETag: \"etag{num}\"\r\n"), b"")?;
                    }
                    None => reply(&mut w, "404 Not Found", "", b"<Error><Code>NoSuchUpload</Code></Error>")?,
                }
            }
            "POST" => {
                let id = q.get("uploadId").copied().unwrap_or("");
                let text = String::from_utf8_lossy(&body).to_string();
                let Some(parts) = s.parts.remove(id) else {
                    reply(&mut w, "404 Not Found", "", b"")?;
                    continue;
                };
                // Parts in the order the completion lists them, each
                // with the ETag it was given.
                let mut data = Vec::new();
                let mut ok = true;
                for (i, _) in text.match_indices("<PartNumber>") {
                    let rest = &text[i + 12..];
                    let num: u32 = rest[..rest.find('<').unwrap_or(0)].parse().unwrap_or(0);
                    ok &= text.contains(&format!("etag{num}"));
                    match parts.get(&num) {
                        Some(p) => data.extend_from_slice(p),
                        None => ok = false,
                    }
                }
                if ok && (!data.is_empty() || parts.len() == 1) {
                    s.objects.insert(object, data);
                    reply(&mut w, "200 OK", "", b"<CompleteMultipartUploadResult/>")?;
                } else {
                    reply(&mut w, "400 Bad Request", "", b"<Error><Code>InvalidPart</Code></Error>")?;
                }
            }
            "DELETE" => {
                s.parts.remove(q.get("uploadId").copied().unwrap_or(""));
                s.aborted += 1;
                reply(&mut w, "204 No Content", "", b"")?;
            }
            _ => reply(&mut w, "405 Method Not Allowed", "", b"")?,
        }
        w.flush()?;
    }
}
