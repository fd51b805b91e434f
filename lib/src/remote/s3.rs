//! S3 objects: where the endpoint, region and credentials come from, the
//! signed URLs reads go to, and the multipart upload `convert` writes with.
//!
//! Signing is rusty-s3's (SigV4 query-string presigning, no I/O of its
//! own); requests go through the same ureq client as `http://` names, so
//! S3 reads get the HTTP driver's pool, readahead, parallelism and retries.
//! Each request is signed afresh, so a long stream never outlives its
//! signature.

use super::http::{HttpOptions, HttpStorage, Target};
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use std::collections::HashMap;
use std::io::{self, Read};
use std::path::PathBuf;
use std::time::Duration;

/// How long a signed URL stays valid: one request's lifetime, retries
/// included, with room for a slow link.
const SIGNATURE_LIFETIME: Duration = Duration::from_secs(3600);
/// Upload part size: S3's minimum is 5 MiB (except the last part) and its
/// maximum part count 10000, so this uploads objects up to 80 GiB.
pub const DEFAULT_PART_SIZE: usize = 8 << 20;

/// S3 settings given explicitly (`--image-opts`, `json:`); what is left
/// `None` comes from the environment and the AWS profile files.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct S3Options {
    /// The endpoint URL (`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`, the
    /// profile's `endpoint_url`; default AWS's regional endpoint). An
    /// `http://` endpoint is spoken to in plain HTTP.
    pub endpoint: Option<String>,
    /// The region (`AWS_REGION`, `AWS_DEFAULT_REGION`, the profile's
    /// `region`; default `us-east-1`).
    pub region: Option<String>,
    /// The access key id (`AWS_ACCESS_KEY_ID`, the profile's).
    pub access_key_id: Option<String>,
    /// The secret key (`AWS_SECRET_ACCESS_KEY`, the profile's).
    pub secret_access_key: Option<String>,
    /// A session token (`AWS_SESSION_TOKEN`, the profile's).
    pub session_token: Option<String>,
    /// The profile (`AWS_PROFILE`; default `default`).
    pub profile: Option<String>,
    /// Path-style (`true`) or virtual-host-style addressing; default
    /// path-style for a custom endpoint, virtual-host-style for AWS.
    pub path_style: Option<bool>,
    /// Sign nothing (public objects).
    pub anonymous: bool,
}

impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Options")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("profile", &self.profile)
            .field("path_style", &self.path_style)
            .finish_non_exhaustive()
    }
}

/// `s3://BUCKET/KEY` split, or `None` for other names.
pub fn parse_name(name: &str) -> Option<(&str, &str)> {
    let rest = name.strip_prefix("s3://")?;
    let (bucket, key) = rest.split_once('/')?;
    (!bucket.is_empty() && !key.is_empty()).then_some((bucket, key))
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// One object, with what signing its requests takes.
pub(crate) struct S3Object {
    bucket: Bucket,
    credentials: Option<Credentials>,
    key: String,
}

impl S3Object {
    /// Resolves `s3://BUCKET/KEY` with `opts` over the environment.
    pub(crate) fn new(name: &str, opts: &S3Options) -> io::Result<S3Object> {
        let (bucket, key) =
            parse_name(name).ok_or_else(|| invalid(format!("'{name}': an S3 name is s3://BUCKET/KEY")))?;
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let profile_name = opts.profile.clone().or_else(|| env("AWS_PROFILE")).unwrap_or_else(|| "default".into());
        let profile = Profile::load(&profile_name);
        let region = opts
            .region
            .clone()
            .or_else(|| env("AWS_REGION"))
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .or_else(|| profile.get("region"))
            .unwrap_or_else(|| "us-east-1".into());
        let custom = opts
            .endpoint
            .clone()
            .or_else(|| env("AWS_ENDPOINT_URL_S3"))
            .or_else(|| env("AWS_ENDPOINT_URL"))
            .or_else(|| profile.get("endpoint_url"));
        let path_style = opts.path_style.unwrap_or(custom.is_some());
        let endpoint = custom.unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
        let url = endpoint.parse().map_err(|e| invalid(format!("S3 endpoint '{endpoint}': {e}")))?;
        let style = if path_style { UrlStyle::Path } else { UrlStyle::VirtualHost };
        let bucket = Bucket::new(url, style, bucket.to_string(), region)
            .map_err(|e| invalid(format!("S3 endpoint '{endpoint}': {e}")))?;
        let credentials = if opts.anonymous {
            None
        } else {
            let id = opts
                .access_key_id
                .clone()
                .or_else(|| env("AWS_ACCESS_KEY_ID"))
                .or_else(|| profile.get("aws_access_key_id"));
            let secret = opts
                .secret_access_key
                .clone()
                .or_else(|| env("AWS_SECRET_ACCESS_KEY"))
                .or_else(|| profile.get("aws_secret_access_key"));
            let token = opts
                .session_token
                .clone()
                .or_else(|| env("AWS_SESSION_TOKEN"))
                .or_else(|| profile.get("aws_session_token"));
            match (id, secret, token) {
                (Some(id), Some(secret), Some(token)) => Some(Credentials::new_with_token(id, secret, token)),
                (Some(id), Some(secret), None) => Some(Credentials::new(id, secret)),
                // No credentials anywhere: try the object as public.
                (None, None, _) => None,
                _ => {
                    return Err(invalid(format!(
                        "'{name}': an S3 access key id needs its secret key and the other way round"
                    )))
                }
            }
        };
        Ok(S3Object { bucket, credentials, key: key.to_string() })
    }

    /// A freshly signed URL for a GET of the object.
    pub(crate) fn get_url(&self) -> String {
        self.bucket.get_object(self.credentials.as_ref(), &self.key).sign(SIGNATURE_LIFETIME).to_string()
    }

    /// The `s3://` name, for messages.
    pub(crate) fn name(&self) -> String {
        format!("s3://{}/{}", self.bucket.name(), self.key)
    }
}

/// Opens `s3://BUCKET/KEY` read-only.
pub fn open(name: &str, s3: &S3Options, http: HttpOptions) -> io::Result<HttpStorage> {
    HttpStorage::open_target(Target::S3(Box::new(S3Object::new(name, s3)?)), http)
}

/// Keys of one AWS profile, from the credentials file over the config
/// file (`AWS_SHARED_CREDENTIALS_FILE`, `AWS_CONFIG_FILE`, default under
/// `~/.aws/`).
#[derive(Debug, Default)]
struct Profile(HashMap<String, String>);

impl Profile {
    fn load(name: &str) -> Profile {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
        let file = |var: &str, default: &str| {
            std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| home.join(".aws").join(default))
        };
        let mut keys = HashMap::new();
        // The config file names profiles `[profile NAME]` (but `[default]`).
        let config_section = if name == "default" { name.to_string() } else { format!("profile {name}") };
        if let Ok(text) = std::fs::read_to_string(file("AWS_CONFIG_FILE", "config")) {
            keys.extend(ini_section(&text, &config_section));
        }
        if let Ok(text) = std::fs::read_to_string(file("AWS_SHARED_CREDENTIALS_FILE", "credentials")) {
            keys.extend(ini_section(&text, name));
        }
        Profile(keys)
    }
    fn get(&self, key: &str) -> Option<String> {
        self.0.get(key).filter(|v| !v.is_empty()).cloned()
    }
}

/// The top-level `key = value` pairs of section `[section]` of an INI
/// text (nested sub-sections, indented, are skipped).
fn ini_section(text: &str, section: &str) -> Vec<(String, String)> {
    let mut inside = false;
    let mut out = Vec::new();
    for line in text.lines() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') || t.starts_with(';') {
            continue;
        }
        if let Some(h) = t.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            inside = h.trim() == section;
            continue;
        }
        if !inside || line.starts_with(char::is_whitespace) {
            continue;
        }
        if let Some((k, v)) = t.split_once('=') {
            out.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    out
}

/// Uploads everything `src` yields to `s3://BUCKET/KEY` in parts of
/// `part_size` bytes (S3's multipart upload); a failed upload is aborted
/// so no parts are left behind.
pub fn upload(name: &str, s3: &S3Options, http: &HttpOptions, src: &mut dyn Read, part_size: usize) -> io::Result<u64> {
    let obj = S3Object::new(name, s3)?;
    let part_size = part_size.max(5 << 20);
    let agent = super::http::agent(http)?;
    let creds = obj.credentials.as_ref();
    let create = obj.bucket.create_multipart_upload(creds, &obj.key).sign(SIGNATURE_LIFETIME);
    let text = send(&agent, http, &obj, "POST", create.as_str(), None)?.1;
    let created = rusty_s3::actions::CreateMultipartUpload::parse_response(&text)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("'{}': bad upload answer: {e}", obj.name())))?;
    let id = created.upload_id().to_string();
    let result = (|| {
        let (etags, total) = upload_parts(&agent, http, &obj, &id, src, part_size)?;
        let complete = obj.bucket.complete_multipart_upload(creds, &obj.key, &id, etags.iter().map(String::as_str));
        let url = complete.sign(SIGNATURE_LIFETIME);
        let body = complete.body();
        send(&agent, http, &obj, "POST", url.as_str(), Some(body.as_bytes()))?;
        Ok(total)
    })();
    if result.is_err() {
        let url = obj.bucket.abort_multipart_upload(creds, &obj.key, &id).sign(SIGNATURE_LIFETIME);
        let _ = send(&agent, http, &obj, "DELETE", url.as_str(), None);
    }
    result
}

/// Sends `src` as the parts of upload `id`, up to `http.parallel` at a
/// time (one request at a time leaves the link idle while the store hashes
/// and replicates each part); the parts' ETags in order and the bytes sent.
/// Memory stays bounded: the reader fills at most one part ahead of the
/// senders.
fn upload_parts(
    agent: &ureq::Agent,
    http: &HttpOptions,
    obj: &S3Object,
    id: &str,
    src: &mut dyn Read,
    part_size: usize,
) -> io::Result<(Vec<String>, u64)> {
    use super::http::lock;
    use std::sync::mpsc;
    use std::sync::Mutex;
    let senders = http.parallel.clamp(1, 16);
    let (tx, rx) = mpsc::sync_channel::<(u16, Vec<u8>)>(0);
    let rx = Mutex::new(rx);
    let etags: Mutex<Vec<Option<String>>> = Mutex::new(Vec::new());
    let failure: Mutex<Option<io::Error>> = Mutex::new(None);
    let creds = obj.credentials.as_ref();
    let mut total = 0u64;
    std::thread::scope(|scope| {
        for _ in 0..senders {
            scope.spawn(|| loop {
                // The lock is held only while waiting for the next part.
                let next = lock(&rx).recv();
                let Ok((number, buf)) = next else { return };
                // After a failure the parts still coming are drained, not
                // sent, so the reader never blocks on a channel nobody reads.
                if lock(&failure).is_some() {
                    continue;
                }
                let url = obj.bucket.upload_part(creds, &obj.key, number, id).sign(SIGNATURE_LIFETIME);
                let sent = send(agent, http, obj, "PUT", url.as_str(), Some(&buf)).and_then(|(etag, _)| {
                    etag.ok_or_else(|| {
                        io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("'{}': part {number} got no ETag", obj.name()),
                        )
                    })
                });
                match sent {
                    Ok(etag) => {
                        let mut e = lock(&etags);
                        let i = usize::from(number) - 1;
                        if e.len() <= i {
                            e.resize(i + 1, None);
                        }
                        e[i] = Some(etag);
                    }
                    Err(err) => {
                        lock(&failure).get_or_insert(err);
                    }
                }
            });
        }
        let read = (|| {
            let mut parts = 0usize;
            loop {
                if lock(&failure).is_some() {
                    return Ok(());
                }
                let mut buf = vec![0u8; part_size];
                let n = fill(src, &mut buf)?;
                // S3 wants at least one part, even of an empty object.
                if n == 0 && parts > 0 {
                    return Ok(());
                }
                parts += 1;
                let number = u16::try_from(parts).ok().filter(|n| *n <= 10000).ok_or_else(|| {
                    invalid(format!("'{}': more than 10000 parts; use a larger part size", obj.name()))
                })?;
                buf.truncate(n);
                total += n as u64;
                if tx.send((number, buf)).is_err() {
                    return Ok(());
                }
                if n < part_size {
                    return Ok(());
                }
            }
        })();
        // Closing the channel lets the senders finish the parts in flight.
        drop(tx);
        if let Err(e) = read {
            lock(&failure).get_or_insert(e);
        }
    });
    if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let etags = etags.into_inner().unwrap_or_else(|p| p.into_inner());
    let etags: Option<Vec<String>> = etags.into_iter().collect();
    let etags = etags.ok_or_else(|| io::Error::other(format!("'{}': a part was not sent", obj.name())))?;
    Ok((etags, total))
}

/// Reads until `buf` is full or `src` ends; the bytes read.
fn fill(src: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match src.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Sends one upload request with bounded retries; its ETag and body.
fn send(
    agent: &ureq::Agent,
    http: &HttpOptions,
    obj: &S3Object,
    method: &str,
    url: &str,
    body: Option<&[u8]>,
) -> io::Result<(Option<String>, String)> {
    let mut attempt = 0u32;
    loop {
        let resp = match (method, body) {
            ("PUT", b) => agent.put(url).send(b.unwrap_or(&[])),
            ("POST", Some(b)) => agent.post(url).send(b),
            ("POST", None) => agent.post(url).send_empty(),
            _ => agent.delete(url).call(),
        };
        let transient = match resp {
            Ok(r) if r.status().is_success() => {
                let etag = r.headers().get("etag").and_then(|v| v.to_str().ok()).map(str::to_string);
                let mut text = String::new();
                r.into_body().into_reader().take(1 << 20).read_to_string(&mut text)?;
                return Ok((etag, text));
            }
            Ok(r) => {
                let status = r.status().as_u16();
                let msg = format!("'{}': upload refused (HTTP {status})", obj.name());
                match status {
                    401 | 403 => {
                        return Err(io::Error::new(
                            io::ErrorKind::PermissionDenied,
                            format!("'{}': access denied: check the credentials (HTTP {status})", obj.name()),
                        ))
                    }
                    404 => {
                        return Err(io::Error::new(
                            io::ErrorKind::NotFound,
                            format!("'{}': no such bucket (HTTP 404)", obj.name()),
                        ))
                    }
                    408 | 429 | 500..=599 => msg,
                    _ => return Err(io::Error::other(msg)),
                }
            }
            Err(e) => format!("'{}': {e}", obj.name()),
        };
        if attempt >= http.retries {
            return Err(io::Error::other(format!("{transient} (after {} attempts)", attempt + 1)));
        }
        std::thread::sleep(Duration::from_millis((100u64 << attempt.min(4)).min(2000)));
        attempt += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_split_into_bucket_and_key() {
        assert_eq!(parse_name("s3://b/k/x.qcow2"), Some(("b", "k/x.qcow2")));
        assert_eq!(parse_name("s3://b/"), None);
        assert_eq!(parse_name("s3:///k"), None);
        assert_eq!(parse_name("https://b/k"), None);
    }

    #[test]
    fn profile_sections_are_read_as_aws_writes_them() {
        let text = "[default]\nregion = eu\n[profile dev]\nregion=garage\ns3 =\n  addressing_style = path\nendpoint_url = http://h:3900\n";
        assert_eq!(ini_section(text, "default"), vec![("region".into(), "eu".into())]);
        let dev = ini_section(text, "profile dev");
        assert!(dev.contains(&("region".into(), "garage".into())));
        assert!(dev.contains(&("endpoint_url".into(), "http://h:3900".into())));
        assert!(!dev.iter().any(|(k, _)| k == "addressing_style"));
    }
}
