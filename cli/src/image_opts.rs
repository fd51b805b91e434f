//! `--object` and `--image-opts` on the commands that open images: an
//! image named by QEMU's option string (`driver=nbd,server.type=unix,
//! server.path=S,export=E,tls-creds=ID`) instead of a file name, turned
//! into the format and the name `oxcow::open` takes.
//!
//! Only the drivers an option string is needed for are understood: `nbd`
//! (possibly under a format, `driver=qcow2,file.driver=nbd,...`) and
//! `file` (`filename=`).

use crate::error::{CliError, CliResult};
use crate::object::{parse_keyval, Object, Objects};
use oxcow::nbd::client::{NbdAddr, NbdUrl, DEFAULT_PORT};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The flags, flattened into a command's arguments.
#[derive(clap::Args, Debug, Default)]
pub struct ObjectArgs {
    /// Define an object (qemu's TYPE,id=ID,...), e.g. tls-creds-x509 for
    /// --image-opts ...,tls-creds=ID.
    #[arg(long = "object", value_name = "TYPE,id=ID,...")]
    pub objects: Vec<String>,
    /// Image names are option strings (driver=nbd,server.host=...,tls-creds=ID).
    #[arg(long = "image-opts")]
    pub image_opts: bool,
}

impl ObjectArgs {
    /// Checks the objects and, with `--image-opts`, rewrites `name` into
    /// a name `oxcow::open` takes and `format` into the format it names.
    pub fn apply(&self, name: &mut String, format: &mut Option<String>) -> CliResult<()> {
        self.apply_with(name, format, true)
    }

    /// As [`apply`](Self::apply), for commands that open the image
    /// without its data (`info`): key secrets are not looked up, as
    /// QEMU's tools do not then, so a missing one is no error.
    pub fn apply_without_secrets(&self, name: &mut String, format: &mut Option<String>) -> CliResult<()> {
        self.apply_with(name, format, false)
    }

    fn apply_with(&self, name: &mut String, format: &mut Option<String>, secrets: bool) -> CliResult<()> {
        let objects = Objects::parse(&self.objects)?;
        let original = name.clone();
        if let Some(spec) = json_spec(name) {
            // QEMU lets `-f` stand beside a json: name; the tree's driver
            // says the format where it names one.
            let spec = spec?;
            let (f, n) = match resolve_with(&spec, &objects, secrets) {
                Ok(r) => r,
                // Trees the option-string path does not take but the
                // library opens by their `json:` name (blkdebug or quorum
                // under the format) stay as they are.
                Err(_) if oxcow::json_name::parse(name).is_some_and(|r| r.is_ok()) => return Ok(()),
                Err(e) => return Err(e),
            };
            let nbd = is_bare_nbd(&spec);
            remember(&n, |e| {
                e.given = Some(original);
                e.bare_nbd = nbd;
            });
            *name = n;
            if f.is_some() {
                *format = f;
            }
            return Ok(());
        }
        if !self.image_opts {
            return Ok(());
        }
        if format.is_some() {
            return Err(CliError::new("--image-opts and --format are mutually exclusive"));
        }
        let (f, n) = resolve_with(name, &objects, secrets).map_err(|e| {
            // qemu-img finds the secret missing as it opens the image.
            if e.msg.starts_with("No secret with id") {
                CliError::new(format!("Could not open '{original}': {}", e.msg))
            } else {
                e
            }
        })?;
        let nbd = is_bare_nbd(name);
        remember(&n, |e| {
            e.given = Some(original);
            e.bare_nbd = nbd;
        });
        *name = n;
        *format = f;
        Ok(())
    }
}

/// What an image named by an option string is called in messages.
#[derive(Default)]
struct Names {
    /// The option string (or `json:` name) as given: qemu-img's "Could
    /// not open" quotes it.
    given: Option<String>,
    /// QEMU's name for the image when its options cannot be told by a
    /// file name (a key secret): `json:{...}`, as `info` shows it.
    json: Option<String>,
    /// The option string's top driver is `nbd` itself, with no format
    /// over it: `info` then shows the protocol as the format, as QEMU.
    bare_nbd: bool,
}

/// Whether an option string's top driver is the `nbd` protocol.
fn is_bare_nbd(opts: &str) -> bool {
    parse_keyval(opts, None).is_ok_and(|kv| kv.iter().any(|(k, v)| k == "driver" && v == "nbd"))
}

/// Whether the image opened as `resolved` was given as a bare `nbd`
/// driver (`--image-opts driver=nbd,...` or `json:{"driver":"nbd",...}`).
pub fn bare_nbd(resolved: &str) -> bool {
    let names = NAMES.lock().unwrap_or_else(|p| p.into_inner());
    names.iter().any(|(n, e)| n == resolved && e.bare_nbd)
}

/// By the file name the option string resolved to.
static NAMES: std::sync::Mutex<Vec<(String, Names)>> = std::sync::Mutex::new(Vec::new());

fn remember(resolved: &str, set: impl FnOnce(&mut Names)) {
    let mut names = NAMES.lock().unwrap_or_else(|p| p.into_inner());
    let at = match names.iter().position(|(n, _)| n == resolved) {
        Some(i) => i,
        None => {
            names.push((resolved.to_string(), Names::default()));
            names.len() - 1
        }
    };
    set(&mut names[at].1);
}

/// The option string (or `json:` name) the image opened as `resolved`
/// was given by, if it was given by one.
pub fn given_name(resolved: &str) -> Option<String> {
    let names = NAMES.lock().unwrap_or_else(|p| p.into_inner());
    names.iter().find(|(n, _)| n == resolved).and_then(|(_, e)| e.given.clone())
}

/// QEMU's `json:{...}` name of the image opened as `resolved`, when its
/// option string holds options a file name cannot tell.
pub fn json_name(resolved: &str) -> Option<String> {
    let names = NAMES.lock().unwrap_or_else(|p| p.into_inner());
    names.iter().find(|(n, _)| n == resolved).and_then(|(_, e)| e.json.clone())
}

/// A `json:{...}` file name as the option string `--image-opts` takes
/// (nested objects become dotted keys, commas in values doubled); None
/// for any other name.
pub fn json_spec(name: &str) -> Option<CliResult<String>> {
    let text = name.strip_prefix("json:")?;
    let v: serde_json::Value = match serde_json::from_str(&oxcow::json_name::standard_json(text)) {
        Ok(v) => v,
        Err(e) => return Some(Err(CliError::new(format!("Could not parse the JSON options: {e}")))),
    };
    if !v.is_object() {
        return Some(Err(CliError::new("Invalid JSON object given")));
    }
    let mut pairs = Vec::new();
    crate::object::flatten_json("", &v, &mut pairs);
    let spec = pairs.iter().map(|(k, v)| format!("{k}={}", v.replace(',', ",,"))).collect::<Vec<_>>().join(",");
    Some(Ok(spec))
}

/// An option string's format (none when it names only a protocol and the
/// content is to be probed) and the name to open.
pub fn resolve(opts: &str, objects: &Objects) -> CliResult<(Option<String>, String)> {
    resolve_with(opts, objects, true)
}

/// As [`resolve`]; `secrets` false leaves key secrets unlooked-up.
fn resolve_with(opts: &str, objects: &Objects, secrets: bool) -> CliResult<(Option<String>, String)> {
    let mut map: BTreeMap<String, String> = parse_keyval(opts, None)?.into_iter().collect();
    // No driver over a `file.` child: QEMU probes the format.
    let driver = match map.remove("driver") {
        Some(d) => d,
        None if map.keys().any(|k| k.starts_with("file.")) => String::new(),
        None => return Err(CliError::new("Parameter 'driver' is missing")),
    };
    if driver == "blkdebug" {
        return resolve_with(&blkdebug_image(map)?, objects, secrets);
    }
    let (format, proto, mut props) = match driver.as_str() {
        "nbd" | "file" | "null-co" | "null-aio" | "http" | "https" | "s3" => (Some("raw".to_string()), driver, map),
        fmt => {
            // A format over a protocol: the protocol's keys are under `file.`.
            let mut inner = BTreeMap::new();
            let mut rest = BTreeMap::new();
            for (k, v) in map {
                match k.strip_prefix("file.") {
                    Some(sub) => inner.insert(sub.to_string(), v),
                    None => rest.insert(k, v),
                };
            }
            // Key secrets of the image (depth 0) and of its backing files
            // (`backing.encrypt.key-secret`, `backing.backing....`).
            let fname = inner.get("filename").cloned().unwrap_or_default();
            let key_opts: Vec<(usize, String)> = rest
                .keys()
                .filter_map(|k| {
                    let mut depth = 0;
                    let mut sub = k.as_str();
                    while let Some(r) = sub.strip_prefix("backing.") {
                        depth += 1;
                        sub = r;
                    }
                    matches!(sub, "encrypt.key-secret" | "key-secret").then(|| (depth, k.clone()))
                })
                .collect();
            for (depth, k) in key_opts {
                let id = rest.remove(&k).unwrap_or_default();
                if depth == 0 && inner.get("driver").is_none_or(|d| d == "file") {
                    remember(&fname, |e| e.json = Some(json_name_of(fmt, &k, &id, &fname)));
                }
                if !secrets {
                    continue;
                }
                let key = match objects.get(&id) {
                    Some(Object::Secret(s)) => s.0.clone(),
                    _ => return Err(CliError::new(format!("No secret with id '{id}'"))),
                };
                crate::object::secret::register_at(&fname, depth, key);
            }
            take_backing_keys(fmt, &fname, &mut rest)?;
            crate::qcow2_cache_opts::take(fmt, &fname, &mut rest, opts)?;
            if let Some(k) = rest.keys().next() {
                return Err(CliError::new(format!("Block format '{fmt}' does not support the option '{k}'")));
            }
            let proto = inner.remove("driver").unwrap_or_else(|| "file".into());
            ((!fmt.is_empty()).then(|| fmt.to_string()), proto, inner)
        }
    };
    let name = match proto.as_str() {
        "file" => props.remove("filename").ok_or_else(|| CliError::new("Parameter 'filename' is required"))?,
        "nbd" => nbd_name(&mut props, objects)?,
        "null-co" | "null-aio" => {
            let size = match props.remove("size") {
                None => oxcow::storage::NullStorage::name(oxcow::storage::NULL_DEFAULT_SIZE),
                Some(v) => crate::util::parse_num(&v)
                    .map(oxcow::storage::NullStorage::name)
                    .ok_or_else(|| CliError::new(format!("Parameter 'size' expects a size, got '{v}'")))?,
            };
            // Reads are zeros either way; timing knobs change no result.
            for k in ["read-zeroes", "latency-ns"] {
                props.remove(k);
            }
            size
        }
        "http" | "https" | "s3" => crate::remote_opts::remote_name(&proto, &mut props, objects)?,
        other => return Err(CliError::new(format!("Unknown driver '{other}'"))),
    };
    // Options the open path does not take (cache.*, discard, ...) are
    // refused rather than silently dropped.
    if let Some(k) = props.keys().next() {
        return Err(CliError::new(format!("Invalid parameter '{k}'")));
    }
    Ok((format, name))
}

/// QEMU's name for a format image over a file whose key secret is part
/// of its options: the options as JSON, the format's own first.
fn json_name_of(fmt: &str, key: &str, id: &str, filename: &str) -> String {
    let q = |s: &str| serde_json::Value::String(s.to_string()).to_string();
    format!(
        "json:{{{}: {}, \"driver\": {}, \"file\": {{\"driver\": \"file\", \"filename\": {}}}}}",
        q(key),
        q(id),
        q(fmt),
        q(filename)
    )
}

/// `backing.driver` and `backing.file.filename` (`backing.file.driver=file`)
/// beside the keys, as iotests 189 and 198 give them: the backing file
/// must be the one the image names (oxcow opens no other), its format is
/// the one given.
fn take_backing_keys(fmt: &str, fname: &str, rest: &mut BTreeMap<String, String>) -> CliResult<()> {
    if rest.get("backing.file.driver").is_some_and(|d| d == "file") {
        rest.remove("backing.file.driver");
    }
    if let Some(b) = rest.remove("backing.file.filename") {
        let named = recorded_backing(fmt, fname);
        let same = |p: &std::path::Path| std::fs::canonicalize(p).ok();
        if named.is_none() || named.as_deref().and_then(same) != same(std::path::Path::new(&b)) {
            return Err(CliError::new(format!(
                "backing.file.filename: '{b}' is not the backing file '{fname}' names (oxcow opens only that one)"
            )));
        }
    }
    if let Some(d) = rest.remove("backing.driver") {
        let f = d.parse::<oxcow::Format>().map_err(|_| CliError::new(format!("Unknown driver '{d}'")))?;
        crate::object::secret::register_backing_driver(fname, f);
    }
    Ok(())
}

/// Where the qcow2 image `fname` says its backing file is.
fn recorded_backing(fmt: &str, fname: &str) -> Option<PathBuf> {
    if fmt != "qcow2" {
        return None;
    }
    let flags = oxcow::storage::OpenFlags::default();
    let st = oxcow::storage::FileStorage::open(std::path::Path::new(fname), flags).ok()?;
    let hc = oxcow::qcow2::read_header_cluster(&st).ok()?;
    Some(oxcow::resolve_backing(std::path::Path::new(fname), hc.backing_file.as_deref()?))
}

/// Request-size limits of QEMU's blkdebug driver: they change how
/// requests are split, never what they read or write.
const BLKDEBUG_LIMITS: &[&str] =
    &["align", "max-transfer", "opt-write-zero", "max-write-zero", "opt-discard", "max-discard"];

/// The options of the image under a top-level blkdebug node that only
/// sets request limits (which change nothing oxcow does). Rules there
/// would act above the format, on guest requests, which oxcow's blkdebug
/// layer (under the format, on its file) does not do: refused.
fn blkdebug_image(map: BTreeMap<String, String>) -> CliResult<String> {
    let mut inner = Vec::new();
    for (k, v) in map {
        match k.strip_prefix("image.") {
            Some(sub) => inner.push(format!("{sub}={}", v.replace(',', ",,"))),
            None if BLKDEBUG_LIMITS.contains(&k.as_str()) => {}
            None => {
                return Err(CliError::new(format!(
                    "blkdebug option '{k}' above a format layer is not supported by oxcow"
                )))
            }
        }
    }
    Ok(inner.join(","))
}

/// The NBD location the keys of QEMU's `nbd` driver describe, TLS included.
fn nbd_name(p: &mut BTreeMap<String, String>, objects: &Objects) -> CliResult<String> {
    if let Some(uri) = p.remove("uri") {
        if p.contains_key("tls-creds") {
            return Err(CliError::new("tls-creds with uri= is not supported; use server.* keys"));
        }
        return Ok(uri);
    }
    // The legacy keys (host, port, path) and the server.* struct.
    let path = p.remove("server.path").or_else(|| p.remove("path"));
    let host = p.remove("server.host").or_else(|| p.remove("host"));
    let port = p.remove("server.port").or_else(|| p.remove("port"));
    let kind = p.remove("server.type").unwrap_or_else(|| if path.is_some() { "unix".into() } else { "inet".into() });
    let addr = match kind.as_str() {
        "unix" => {
            NbdAddr::Unix(PathBuf::from(path.ok_or_else(|| CliError::new("Parameter 'server.path' is missing"))?))
        }
        "inet" => {
            let host = host.ok_or_else(|| CliError::new("Parameter 'server.host' is missing"))?;
            let port = match port {
                Some(v) => v.parse::<u16>().map_err(|_| CliError::new(format!("Invalid port '{v}'")))?,
                None => DEFAULT_PORT,
            };
            NbdAddr::Tcp { host, port }
        }
        other => return Err(CliError::new(format!("Parameter 'type' does not accept value '{other}'"))),
    };
    let export = p.remove("export").unwrap_or_default();
    let hostname = p.remove("tls-hostname");
    let tls = match p.remove("tls-creds") {
        None => None,
        Some(id) => {
            let creds = match objects.get(&id) {
                Some(Object::TlsCreds(c)) => c,
                Some(_) => return Err(CliError::new(format!("Object with id '{id}' is not TLS credentials"))),
                None => return Err(CliError::new(format!("No TLS credentials with id '{id}'"))),
            };
            let mut tls = creds.client(hostname)?;
            if tls.psk.is_none() && tls.hostname.is_none() && matches!(addr, NbdAddr::Unix(_)) {
                // QEMU has no name to check a certificate against then and
                // refuses it after the handshake; the empty name says so
                // (a libnbd-style URL without one checks the chain only).
                tls.hostname = Some(String::new());
            }
            Some(tls)
        }
    };
    let x_dirty_bitmap = p.remove("x-dirty-bitmap");
    let name = NbdUrl { addr, export, tls, x_dirty_bitmap }.to_string();
    // Seconds a request waits for a lost server to come back.
    if let Some(v) = p.remove("reconnect-delay") {
        let secs = v
            .parse::<u32>()
            .map_err(|_| CliError::new(format!("Parameter 'reconnect-delay' expects uint32_t, got '{v}'")))?;
        oxcow::nbd::client::set_reconnect_delay(&name, std::time::Duration::from_secs(secs.into()));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_option_strings_become_locations() {
        let none = Objects::default();
        let r = |s: &str| resolve(s, &none).map_err(|e| e.msg);
        assert_eq!(
            r("driver=nbd,server.type=unix,server.path=/s,export=disk").unwrap(),
            (Some("raw".into()), "nbd+unix:///disk?socket=/s".into())
        );
        assert_eq!(r("driver=nbd,host=h,port=99").unwrap(), (Some("raw".into()), "nbd://h:99/".into()));
        assert_eq!(
            r("driver=qcow2,file.driver=nbd,file.server.type=inet,file.server.host=h").unwrap(),
            (Some("qcow2".into()), "nbd://h:10809/".into())
        );
        assert_eq!(r("driver=qcow2,file.filename=a.qcow2").unwrap(), (Some("qcow2".into()), "a.qcow2".into()));
        assert_eq!(r("driver=nbd,host=h,tls-creds=t").unwrap_err(), "No TLS credentials with id 't'");
        assert!(r("driver=nbd,host=h,bogus=1").is_err() && r("host=h").is_err());
        let j = |s: &str| json_spec(s).map(|r| r.map_err(|e| e.msg));
        assert_eq!(j("x.qcow2"), None);
        assert_eq!(
            j(r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"a,b.qcow2"}}"#),
            Some(Ok("driver=qcow2,file.driver=file,file.filename=a,,b.qcow2".into()))
        );
        assert_eq!(
            r(&j(r#"json:{"driver":"nbd","server":{"type":"inet","host":"h","port":"99"},"export":"e"}"#)
                .unwrap()
                .unwrap())
            .unwrap(),
            (Some("raw".into()), "nbd://h:99/e".into())
        );
        assert!(j("json:[1]").unwrap().is_err() && j("json:{").unwrap().is_err());
        assert_eq!(
            j(r#"json:{ 'driver': 'null-co', 'size': 1048576, 'read-zeroes': true, 'x': 'it\'s "q"' }"#),
            Some(Ok(r#"driver=null-co,size=1048576,read-zeroes=on,x=it's "q""#.into()))
        );
        assert_eq!(
            r("driver=null-co,size=1M,read-zeroes=on").unwrap(),
            (Some("raw".into()), "null-co://?size=1048576".into())
        );
        assert_eq!(
            r("driver=blkdebug,image.driver=qcow2,image.file.driver=file,image.file.filename=t,align=4k").unwrap(),
            (Some("qcow2".into()), "t".into())
        );
        assert!(r("driver=blkdebug,image.filename=t,inject-error.0.event=l2_load").is_err());
        let objs = Objects::parse(&["authz-simple,id=a,identity=x".into()]).unwrap();
        assert_eq!(
            resolve("driver=nbd,host=h,tls-creds=a", &objs).unwrap_err().msg,
            "Object with id 'a' is not TLS credentials"
        );
    }
}
