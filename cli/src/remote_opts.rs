//! The option keys of the remote drivers in `--image-opts` / `json:`:
//! QEMU's curl driver's for `http`/`https` (`url`, `readahead`, `timeout`,
//! `sslverify`, `cookie`, `cookie-secret`, `username`, `password-secret`,
//! `proxy-username`, `proxy-password-secret`), oxcow's own for `s3`.
//! They are handed to the library per name ([`oxcow::remote::configure`]),
//! and the name the image is then opened by is returned.

use crate::error::{CliError, CliResult};
use crate::object::{Object, Objects};
use crate::util::parse_bool;
use oxcow::remote::{HttpOptions, RemoteOptions};
use std::collections::BTreeMap;
use std::time::Duration;

/// The text of the secret object `id`.
fn secret_text(objects: &Objects, id: &str) -> CliResult<String> {
    match objects.get(id) {
        Some(Object::Secret(s)) => String::from_utf8(s.0.expose().to_vec())
            .map_err(|_| CliError::new(format!("Secret '{id}' is not valid UTF-8"))),
        _ => Err(CliError::new(format!("No secret with id '{id}'"))),
    }
}

/// Takes the keys of driver `proto` (`http`, `https` or `s3`) out of `p`,
/// registers them for the name, and returns the name.
pub fn remote_name(proto: &str, p: &mut BTreeMap<String, String>, objects: &Objects) -> CliResult<String> {
    let mut opts = RemoteOptions { http: http_options(p, objects)?, ..Default::default() };
    let url = match proto {
        "s3" => {
            let url = match (p.remove("url"), p.remove("bucket"), p.remove("key")) {
                (Some(u), None, None) => u,
                (None, Some(b), Some(k)) => format!("s3://{b}/{k}"),
                _ => return Err(CliError::new("driver s3 needs url=s3://BUCKET/KEY, or bucket= and key=")),
            };
            let s3 = &mut opts.s3;
            s3.endpoint = p.remove("endpoint");
            s3.region = p.remove("region");
            s3.profile = p.remove("profile");
            s3.access_key_id = p.remove("access-key-id");
            if let Some(id) = p.remove("secret-access-key-secret") {
                s3.secret_access_key = Some(secret_text(objects, &id)?);
            }
            if let Some(id) = p.remove("session-token-secret") {
                s3.session_token = Some(secret_text(objects, &id)?);
            }
            s3.path_style = match p.remove("addressing-style").as_deref() {
                None => None,
                Some("path") => Some(true),
                Some("virtual") => Some(false),
                Some(o) => return Err(CliError::new(format!("addressing-style must be path or virtual, not '{o}'"))),
            };
            if let Some(v) = p.remove("anonymous") {
                s3.anonymous = parse_bool("anonymous", &v)?;
            }
            url
        }
        _ => {
            let url = p.remove("url").ok_or_else(|| CliError::new("Parameter 'url' is required"))?;
            let scheme_ok = url.to_ascii_lowercase().starts_with(&format!("{proto}://"));
            if !scheme_ok {
                return Err(CliError::new(format!("driver {proto} needs a {proto}:// URL, not '{url}'")));
            }
            url
        }
    };
    oxcow::remote::configure(&url, opts);
    Ok(url)
}

fn http_options(p: &mut BTreeMap<String, String>, objects: &Objects) -> CliResult<HttpOptions> {
    let mut o = HttpOptions::default();
    let num = |k: &str, v: &str| -> CliResult<u64> {
        oxcow::options::parse_size(v).map_err(|_| CliError::new(format!("Parameter '{k}' expects a size, not '{v}'")))
    };
    if let Some(v) = p.remove("readahead") {
        o.readahead = num("readahead", &v)?;
    }
    if let Some(v) = p.remove("timeout") {
        let secs: u64 =
            v.parse().map_err(|_| CliError::new(format!("Parameter 'timeout' expects seconds, not '{v}'")))?;
        o.timeout = Duration::from_secs(secs.max(1));
    }
    if let Some(v) = p.remove("sslverify") {
        o.sslverify = parse_bool("sslverify", &v)?;
    }
    if let Some(v) = p.remove("cafile") {
        o.ca_file = Some(v.into());
    }
    o.cookie = p.remove("cookie");
    if let Some(id) = p.remove("cookie-secret") {
        o.cookie = Some(secret_text(objects, &id)?);
    }
    o.username = p.remove("username");
    if let Some(id) = p.remove("password-secret") {
        o.password = Some(secret_text(objects, &id)?);
    }
    o.proxy = p.remove("proxy");
    o.proxy_username = p.remove("proxy-username");
    if let Some(id) = p.remove("proxy-password-secret") {
        o.proxy_password = Some(secret_text(objects, &id)?);
    }
    if let Some(v) = p.remove("retries") {
        o.retries = v.parse().map_err(|_| CliError::new(format!("Parameter 'retries' expects a count, not '{v}'")))?;
    }
    if let Some(v) = p.remove("parallel") {
        let n: usize =
            v.parse().map_err(|_| CliError::new(format!("Parameter 'parallel' expects a count, not '{v}'")))?;
        o.parallel = n.clamp(1, 64);
    }
    Ok(o)
}
